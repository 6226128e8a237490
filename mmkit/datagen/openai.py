"""A teacher that writes LLaVA's three response types through an OpenAI-compatible chat API.

Any server that speaks ``POST {base_url}/chat/completions`` works (see :mod:`mmkit.core.llm_client`
for retries, backoff and the reply cache); requests run on a thread pool of ``concurrency``.

- Each (image, response type) is one request built by :mod:`mmkit.datagen.prompts` from the
  image's view and the type's few-shot prompt folder (``prompts``: LLaVA's layout; the shipped
  folders by default); the reply is parsed back into LLaVA turns.
- A reply that cannot be used (it does not parse, it was cut off at ``max_tokens``, it speaks of
  the notes rather than the image) is counted and asked for once more, as a second sample (cached
  apart); if that one cannot be used either, the response is skipped with its reason.
"""
from __future__ import annotations

import random
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Iterable, Iterator, Sequence

from mmkit.core.llm_client import ChatClient
from mmkit.core.registry import TEACHERS
from mmkit.datagen.prompts import FewShotPrompt, build_messages, load_prompts, parse_reply
from mmkit.datagen.rules import DETAILED_INSTRUCTIONS
from mmkit.datagen.teacher import RESPONSE_TYPES, Failed, Teacher, UnusableOutput, Written, conversation, response_types


@TEACHERS.register("openai")
class OpenAITeacher(Teacher):
    """LLaVA's three response types written by a chat model that sees captions and boxes only.

    ``api_key_env`` names the environment variable holding the key (sent as a Bearer token);
    ``None`` sends no Authorization header, for local servers that take no key.
    """

    operational_options = frozenset(
        {"api_key_env", "concurrency", "max_retries", "backoff_s", "timeout_s", "cache_dir"}
    )

    def __init__(
        self, types: str | Sequence[str] = RESPONSE_TYPES, prompts: str | dict[str, str] | None = None, **options: Any
    ) -> None:
        """``prompts``: a folder in LLaVA's ``playground/data/prompts`` layout, or a folder per
        response type (see :func:`mmkit.datagen.prompts.prompt_folders`). ``options``: those of
        :class:`mmkit.core.llm_client.ChatClient` (base_url, model, api_key_env, temperature,
        max_tokens, concurrency, max_retries, backoff_s, timeout_s, cache_dir)."""
        self.types = response_types(types, key="teacher.types")
        self.prompts: dict[str, FewShotPrompt] = load_prompts(prompts, self.types)
        self.client = ChatClient.from_options(options, "teacher")
        self.unusable_replies = 0  # first replies that could not be used, each asked for again
        self.recovered = 0  # ... and how many of those the second reply made good

    # -----------------------------------------------------------------------------------------
    # Teacher interface

    def write(self, scene_view: dict[str, Any], rng: random.Random) -> list[Written]:
        plan = self._plan(scene_view, rng)
        written: list[Written] = []
        for response_type, messages, extra in plan:
            outcome = self._outcome(response_type, messages, self.client.complete(messages), extra)
            if isinstance(outcome, Failed):
                raise UnusableOutput(outcome.type, outcome.reason)
            written.append(outcome)
        return written

    def write_many(
        self, views: Iterable[tuple[dict[str, Any], random.Random]]
    ) -> Iterator[list[Written | Failed]]:
        """Requests of up to ``concurrency`` at a time; results still come in scene order. Scenes
        are taken from ``views`` a few at a time, so only a bounded number is in flight."""
        window = 4 * self.client.concurrency
        pending: deque[list[tuple[str, list[dict[str, str]], Future, Any]]] = deque()
        pairs = iter(views)
        pool = ThreadPoolExecutor(max_workers=self.client.concurrency, thread_name_prefix="mmkit-teacher")
        try:
            while True:
                while len(pending) < window:
                    item = next(pairs, None)
                    if item is None:
                        break
                    view, rng = item
                    plan = self._plan(view, rng)
                    pending.append([(t, messages, pool.submit(self.client.complete, messages), extra)
                                    for t, messages, extra in plan])
                if not pending:
                    return
                yield [self._outcome(t, messages, future.result(), extra) for t, messages, future, extra in pending.popleft()]
        finally:
            # Stopped early (an error, or the caller broke off): what is queued never starts; the
            # requests already under way finish (and land in the cache) before this returns.
            pool.shutdown(wait=True, cancel_futures=True)

    def stats(self) -> dict[str, int]:
        return {**self.client.stats(), "unusable replies asked again": self.unusable_replies,
                "made good by the second reply": self.recovered}

    def requests(self, view: dict[str, Any], rng: random.Random) -> list[tuple[str, list[dict[str, str]]]]:
        return [(response_type, messages) for response_type, messages, _ in self._plan(view, rng)]

    @property
    def max_reply_tokens(self) -> int | None:
        return self.client.max_tokens

    def example_replies(self, response_type: str) -> list[str]:
        return [conv for _, conv in self.prompts[response_type].examples]

    # -----------------------------------------------------------------------------------------

    def _plan(self, view: dict[str, Any], rng: random.Random) -> list[tuple[str, list[dict[str, str]], Any]]:
        """The requests for one scene, with every random draw made here, in the caller's thread,
        so the conversations do not depend on the order in which replies arrive."""
        plan = []
        for response_type in self.types:
            instruction = rng.choice(DETAILED_INSTRUCTIONS) if response_type == "detailed" else None
            placement = random.Random(rng.getrandbits(64))
            plan.append((response_type, build_messages(response_type, view, self.prompts), (instruction, placement)))
        return plan

    def _outcome(self, response_type: str, messages: list[dict[str, str]], reply: dict[str, Any], extra: Any
                 ) -> Written | Failed:
        outcome = self._parsed(response_type, reply, extra)
        if isinstance(outcome, Written):
            return outcome
        self.unusable_replies += 1  # outcomes are made in the caller's thread, one at a time
        second = self._parsed(response_type, self.client.complete(messages, sample=1), extra)
        if isinstance(second, Failed):
            return Failed(response_type, f"{second.reason} (and so was the first reply: {outcome.reason})"
                          if second.reason != outcome.reason else f"{outcome.reason} (twice)")
        self.recovered += 1
        return second

    def _parsed(self, response_type: str, reply: dict[str, Any], extra: Any) -> Written | Failed:
        instruction, placement = extra
        if reply.get("finish_reason") == "length":
            return Failed(response_type, f"the reply was cut off at max_tokens={self.client.max_tokens}")
        try:
            pairs = parse_reply(response_type, reply.get("content"))
        except UnusableOutput as exc:
            return Failed(response_type, exc.reason)
        if response_type == "detailed":
            pairs = [(instruction, pairs[0][1])]
        return Written(response_type, conversation(pairs, placement))
