"""Judges that score a candidate answer and a reference answer 1-10, as in LLaVA-Bench.

- ``openai``: a chat model behind any OpenAI-compatible endpoint (the same client as the
  ``openai`` teacher: retries, backoff, an on-disk cache keyed by the request, so a re-run costs
  nothing). It sees the image's text context (captions, boxes), the question and both answers,
  and must put the two scores on its first line; a reply without them is asked again, then
  counted as a failure, never as a score of 0.
- ``rules``: offline and deterministic, for the synthetic world. It scores an answer by the
  facts it states (colours, shapes, sizes, places, numbers, yes/no) against the facts of the
  reference, which the ``rules`` teacher wrote from the scene: 1 + 9 x F1. The reference scores 10.
"""
from __future__ import annotations

import re
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Sequence

from mmkit.core.errors import DataError
from mmkit.core.llm_client import ChatClient
from mmkit.core.registry import JUDGES
from mmkit.synth.world import COLOURS, SHAPES, SIZES

Scores = tuple[float, float]  # (reference, candidate)


@dataclass(frozen=True)
class Review:
    category: str  # conv, detail or complex
    context: str  # the image as text: captions and boxes
    question: str
    reference: str
    candidate: str


class Judge:
    name: str  # reported beside every score: published scores shift with the judge
    #: True for a judge that never sees the answers' order (it checks the candidate against the
    #: reference as ground truth): swapping would only mislabel which answer is the reference.
    order_free: bool = False

    def score(self, reviews: Sequence[Review], run: int) -> list[Scores | None]:
        """Scores for each review in judge run ``run``; None where the judge gave no usable score."""
        raise NotImplementedError

    def model_endpoint(self) -> tuple[str, str] | None:
        """(model, base URL) of a judge that is a served model, for comparing it with the teacher."""
        return None


JUDGES.set_base(Judge)

# Our review instruction, written to the paper's scheme: two answers to one question about an
# image the judge knows only as text, each rated 1-10 on helpfulness, relevance, accuracy and
# level of detail, the two scores alone on the first line, then the reasons.
REVIEW_SYSTEM = "You review answers to questions about an image fairly, precisely and without favouring either answer."
CATEGORY_FOCUS = {
    "conv": "The question asks for a short fact about the image; judge correctness first.",
    "detail": "The question asks for a detailed description; judge how completely and correctly each answer covers what is in the image.",
    "complex": "The question needs reasoning over several facts; judge whether each answer's reasoning and conclusion are right.",
}
REVIEW_TEMPLATE = """[Image, described in text]
{context}

[Question]
{question}

[Answer 1]
{reference}
[End of Answer 1]

[Answer 2]
{candidate}
[End of Answer 2]

[Task]
{focus} Rate each answer from 1 to 10 for its helpfulness, relevance, accuracy and level of detail, \
where 10 is best. The first line of your reply must hold only the two ratings, Answer 1's first, \
separated by a space. From the second line on, explain your ratings briefly and impartially; the \
order in which the answers appear must not affect them."""

_SCORE_LINE = re.compile(r"^\s*(\d+(?:\.\d+)?)[\s,]+(\d+(?:\.\d+)?)\s*$")


def parse_scores(content: Any) -> Scores | None:
    """The two 1-10 ratings on the reply's first line, or None."""
    if not isinstance(content, str) or not content.strip():
        return None
    match = _SCORE_LINE.match(content.strip().splitlines()[0])
    if not match:
        return None
    first, second = float(match.group(1)), float(match.group(2))
    return (first, second) if 1 <= first <= 10 and 1 <= second <= 10 else None


def review_messages(review: Review) -> list[dict[str, str]]:
    focus = CATEGORY_FOCUS.get(review.category, CATEGORY_FOCUS["conv"])
    text = REVIEW_TEMPLATE.format(focus=focus, context=review.context, question=review.question,
                                  reference=review.reference, candidate=review.candidate)
    return [{"role": "system", "content": REVIEW_SYSTEM}, {"role": "user", "content": text}]


@JUDGES.register("openai")
class OpenAIJudge(Judge):
    def __init__(self, **options: Any) -> None:
        """Options of :class:`mmkit.core.llm_client.ChatClient` (base_url, model, api_key_env, ...);
        a judge samples at temperature 0.2 unless told otherwise, as LLaVA's reviews did."""

        self.client = ChatClient.from_options(options, "task.judge", temperature=0.2, max_tokens=512)
        self.name = f"{self.client.model} at {self.client.base_url}"
        self.failures: list[str] = []

    def model_endpoint(self) -> tuple[str, str]:
        return self.client.model, self.client.base_url

    def score(self, reviews: Sequence[Review], run: int) -> list[Scores | None]:
        with ThreadPoolExecutor(max_workers=self.client.concurrency, thread_name_prefix="mmkit-judge") as pool:
            return list(pool.map(lambda review: self._score_one(review, run), reviews))

    def _score_one(self, review: Review, run: int) -> Scores | None:
        try:
            reply = self.client.complete(
                review_messages(review), sample=run, accept=lambda r: parse_scores(r.get("content")) is not None
            )
        except DataError as exc:
            self.failures.append(str(exc))
            return None
        return parse_scores(reply["content"])


NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five")
FACT_WORDS = frozenset(
    [*COLOURS, *SHAPES, *SIZES, *NUMBER_WORDS, "top", "bottom", "left", "right", "above", "below", "yes", "no"]
)


def facts(text: str) -> Counter:
    """The fact words an answer states, with their counts (plurals folded: "circles" -> "circle")."""
    words = re.findall(r"[a-z]+", text.lower())
    return Counter(word.removesuffix("s") if word.removesuffix("s") in SHAPES else word
                   for word in words if word in FACT_WORDS or word.removesuffix("s") in SHAPES)


def fact_f1(candidate: str, reference: str) -> float:
    stated, true = facts(candidate), facts(reference)
    if not true:
        return 1.0 if not stated else 0.0
    overlap = sum((stated & true).values())
    if overlap == 0:
        return 0.0
    precision, recall = overlap / sum(stated.values()), overlap / sum(true.values())
    return 2 * precision * recall / (precision + recall)


@JUDGES.register("rules")
class RulesJudge(Judge):
    name = "rules (fact F1 against the rules teacher's reference)"
    order_free = True

    def score(self, reviews: Sequence[Review], run: int) -> list[Scores | None]:
        return [(10.0, round(1 + 9 * fact_f1(r.candidate, r.reference), 2)) for r in reviews]
