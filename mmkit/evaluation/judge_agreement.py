"""Judged scores that say how far to trust them: every pair in both orders, panels of judges, and
how often the judges agree.

A judge sees two answers, Answer 1 and Answer 2. LLaVA-Bench always shows the reference first; a
judge that favours whichever answer comes first then shifts every score the same way. Here each
review is judged as given (reference first) and swapped (candidate first), the scores of the
swapped review mapped back to (reference, candidate). The reported score is the mean of the two
orders, and the *order effect* is how many points the first position is worth::

    order_effect = mean( (reference - candidate | reference first) + (candidate - reference | candidate first) ) / 2

which is the margin a judge gives the first answer, and 0 for a judge that ignores the order.
With several judges, each item's *verdict* (candidate better, tie, reference better) is compared
between judges: Cohen's kappa for each pair, Fleiss' kappa across all of them.
"""
from __future__ import annotations

import itertools
import statistics
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import torch

from mmkit.core.registry import JUDGES
from mmkit.evaluation.judges import Judge, Review, Scores

VERDICTS = ("reference better", "tie", "candidate better")


def swapped(review: Review) -> Review:
    return Review(review.category, review.context, review.question, review.candidate, review.reference)


def build_judges(spec: Mapping[str, Any] | Sequence[Mapping[str, Any]] | None, key: str = "task.judge") -> list[Judge]:
    """``judge=`` is one judge's options or a list of them (a panel)."""
    specs = [spec or {"name": "rules"}] if spec is None or isinstance(spec, Mapping) else list(spec)
    return [JUDGES.build(dict(options), key if len(specs) == 1 else f"{key}[{index}]") for index, options in enumerate(specs)]


@dataclass
class ItemScores:
    """One judge's scores of one item over runs: (reference, candidate) per order, None if unscored."""

    reference_first: list[Scores | None] = field(default_factory=list)
    candidate_first: list[Scores | None] = field(default_factory=list)

    def pairs(self) -> list[Scores]:
        return [pair for pair in self.reference_first + self.candidate_first if pair is not None]

    def mean(self) -> Scores | None:
        pairs = self.pairs()
        if not pairs:
            return None
        return statistics.fmean(p[0] for p in pairs), statistics.fmean(p[1] for p in pairs)

    def order_effects(self) -> list[float]:
        """Per run with both orders scored: the points the first position is worth."""
        return [((first[0] - first[1]) + (second[1] - second[0])) / 2
                for first, second in zip(self.reference_first, self.candidate_first)
                if first is not None and second is not None]

    def verdict(self) -> int | None:
        mean = self.mean()
        if mean is None:
            return None
        return 1 + (mean[1] > mean[0]) - (mean[1] < mean[0])  # index into VERDICTS


def judge_items(judge: Judge, reviews: Sequence[Review], runs: int, swap: bool) -> list[ItemScores]:
    """Every review judged ``runs`` times in the given order, and as often swapped when ``swap``."""
    items = [ItemScores() for _ in reviews]
    for run in range(runs):
        for item, pair in zip(items, judge.score(reviews, run)):
            item.reference_first.append(pair)
            if swap and judge.order_free:  # the same scores in either order: its order effect is 0
                item.candidate_first.append(pair)
        if swap and not judge.order_free:
            for item, pair in zip(items, judge.score([swapped(r) for r in reviews], run)):
                item.candidate_first.append(None if pair is None else (pair[1], pair[0]))
    return items


def relative_score(pairs: Sequence[Scores]) -> float | None:
    """LLaVA-Bench's relative score: mean candidate score over mean reference score, x 100."""
    if not pairs:
        return None
    reference = statistics.fmean(p[0] for p in pairs)
    return 100 * statistics.fmean(p[1] for p in pairs) / reference if reference else None


def summarise(items: Sequence[ItemScores], runs: int) -> dict[str, Any]:
    """One judge over a set of items: relative score (both orders) with its spread over runs, the
    relative score of each order alone, and the order effect in points."""
    per_run = [value for run in range(runs) if (value := relative_score(_run_pairs(items, run))) is not None]
    effects = [effect for item in items for effect in item.order_effects()]
    return {
        "relative": statistics.fmean(per_run) if per_run else None,
        "relative_std": statistics.stdev(per_run) if len(per_run) > 1 else 0.0 if per_run else None,
        "relative_reference_first": relative_score([p for item in items for p in item.reference_first if p is not None]),
        "relative_candidate_first": relative_score([p for item in items for p in item.candidate_first if p is not None]),
        "order_effect": statistics.fmean(effects) if effects else None,
        "scored": sum(1 for item in items if item.pairs()),
    }


def _run_pairs(items: Sequence[ItemScores], run: int) -> list[Scores]:
    """Every pair judge run ``run`` scored, in both orders."""
    pairs = [item.reference_first[run] for item in items]
    pairs += [item.candidate_first[run] for item in items if len(item.candidate_first) > run]
    return [pair for pair in pairs if pair is not None]


def cohen_kappa(first: Sequence[int], second: Sequence[int]) -> float | None:
    """Agreement of two judges' verdicts beyond chance; None where chance agreement is total."""
    from torchmetrics.functional.classification import multiclass_cohen_kappa

    if not first:
        return None
    value = multiclass_cohen_kappa(torch.tensor(first), torch.tensor(second), num_classes=len(VERDICTS)).item()
    return None if value != value else value  # NaN: both judges gave one and the same verdict throughout


def fleiss_kappa(verdicts: Sequence[Sequence[int]]) -> float | None:
    """Agreement of several judges; ``verdicts[judge][item]``."""
    from torchmetrics.functional.nominal import fleiss_kappa as torchmetrics_fleiss_kappa

    if not verdicts or not verdicts[0]:
        return None
    counts = torch.zeros(len(verdicts[0]), len(VERDICTS), dtype=torch.long)
    for judge_verdicts in verdicts:
        for item, verdict in enumerate(judge_verdicts):
            counts[item, verdict] += 1
    value = torchmetrics_fleiss_kappa(counts, mode="counts").item()
    return None if value != value else value


def agreement(per_judge: Sequence[Sequence[ItemScores]]) -> dict[str, float | None]:
    """Kappas over the items every judge gave a verdict on."""
    verdicts = [[item.verdict() for item in items] for items in per_judge]
    common = [index for index in range(len(verdicts[0])) if all(v[index] is not None for v in verdicts)]
    kept = [[v[index] for index in common] for v in verdicts]
    result: dict[str, float | None] = {"agreement_items": len(common)}
    for a, b in itertools.combinations(range(len(kept)), 2):
        result[f"kappa_{a}_{b}"] = cohen_kappa(kept[a], kept[b])
    if len(kept) > 2:
        result["fleiss_kappa"] = fleiss_kappa(kept)
    return result
