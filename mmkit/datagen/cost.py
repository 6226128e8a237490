"""A dry run of ``python -m mmkit.datagen``: the requests a run would send, their prompt tokens
by response type, and what they would cost, without sending one or writing a file.

Tokens are estimated at :data:`~mmkit.core.llm_client.CHARS_PER_TOKEN` characters a token (no
model tokenizer is available offline), plus :data:`MESSAGE_OVERHEAD` for each chat message's
framing. A reply is expected to be as long as the prompt's example replies of its type on
average, and can be no longer than the teacher's ``max_tokens``: the cost is given for both.
Replies asked for again because the first could not be used are not counted.
"""
from __future__ import annotations

from collections import Counter
from statistics import mean

from mmkit.core.llm_client import CHARS_PER_TOKEN, estimate_tokens
from mmkit.datagen.teacher import Teacher, text_rng
from mmkit.datagen.writer import DatagenSettings, build_source, chosen_images, load_teacher

# Tokens a chat API adds around each message (role and separators): about 3-4 in OpenAI's format.
MESSAGE_OVERHEAD = 4
PER_MILLION = 1_000_000


def dry_run(settings: DatagenSettings, price_in: float | None, price_out: float | None) -> str:
    """What a run with ``settings`` would ask for, as the lines to print; prices are dollars per
    million input (prompt) and output (reply) tokens."""
    source = build_source(settings.source, settings.source_options)
    teacher = load_teacher(settings.teacher, settings.options)
    images = chosen_images(source, settings.count)
    requests: Counter[str] = Counter()
    prompt_tokens: Counter[str] = Counter()
    for image in images:
        rng = text_rng(settings.seed, image.id)
        for response_type, messages in teacher.requests(source.view(image, rng), rng):
            requests[response_type] += 1
            prompt_tokens[response_type] += sum(estimate_tokens(m["content"]) + MESSAGE_OVERHEAD for m in messages)
    header = (f"dry run: {len(images)} {source.unit}s of {source.describe()}, {settings.teacher} teacher; "
              "nothing was sent or written")
    if not requests:
        return f"{header}\nthe {settings.teacher} teacher asks no model: no requests, no cost"
    expected = {t: _expected_reply_tokens(teacher, t) for t in requests}
    limit = teacher.max_reply_tokens
    lines = [header, f"{'type':<14}{'requests':>10}{'prompt tokens':>16}{'reply tokens':>15}{'at most':>12}"]
    for response_type in requests:
        count = requests[response_type]
        lines.append(f"{response_type:<14}{count:>10,}{prompt_tokens[response_type]:>16,}"
                     f"{count * expected[response_type]:>15,}{count * limit if limit else 0:>12,}")
    total_in = sum(prompt_tokens.values())
    total_out = sum(requests[t] * expected[t] for t in requests)
    most_out = sum(requests.values()) * limit if limit else total_out
    lines.append(f"{'total':<14}{sum(requests.values()):>10,}{total_in:>16,}{total_out:>15,}{most_out:>12,}")
    lines.append(f"tokens are estimates at {CHARS_PER_TOKEN} characters a token and {MESSAGE_OVERHEAD} a message; "
                 "reply tokens as long as the prompt's example replies on average, at most max_tokens")
    if price_in is None or price_out is None:
        lines.append("cost: give --price-in and --price-out (dollars per million tokens) for an estimate")
        return "\n".join(lines)
    cost_in = total_in * price_in / PER_MILLION
    lines.append(
        f"cost at ${price_in:g} / 1M prompt and ${price_out:g} / 1M reply tokens: prompts ${cost_in:,.4f}, "
        f"replies ${total_out * price_out / PER_MILLION:,.4f} (at most ${most_out * price_out / PER_MILLION:,.4f}); "
        f"total ${cost_in + total_out * price_out / PER_MILLION:,.4f} "
        f"(at most ${cost_in + most_out * price_out / PER_MILLION:,.4f})"
    )
    return "\n".join(lines)


def _expected_reply_tokens(teacher: Teacher, response_type: str) -> int:
    examples = teacher.example_replies(response_type)
    if not examples:
        return teacher.max_reply_tokens or 0
    return round(mean(estimate_tokens(reply) for reply in examples))
