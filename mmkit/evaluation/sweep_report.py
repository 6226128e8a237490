"""Finished runs gathered into one table: the overrides that varied against the metrics, mean ±
standard deviation over replicates (runs that differ only in ``seed``), as Markdown, CSV and a
bar plot."""
from __future__ import annotations

import csv
import json
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import yaml

from mmkit.core.errors import ConfigError

REPLICATE_KEY = "seed"


@dataclass(frozen=True)
class Run:
    folder: Path
    overrides: dict[str, str]
    metrics: dict[str, float]


def find_runs(paths: Sequence[Path]) -> list[Run]:
    runs = []
    for path in paths:
        if not path.exists():
            raise ConfigError(f"{path}: no such folder")
        for summary in sorted(path.rglob("summary.json")):
            overrides_file = summary.parent / ".hydra" / "overrides.yaml"
            if overrides_file.is_file():
                runs.append(_read_run(summary.parent, overrides_file))
    if not runs:
        raise ConfigError(f"no finished runs (summary.json + .hydra/overrides.yaml) under {', '.join(map(str, paths))}")
    return runs


def _read_run(folder: Path, overrides_file: Path) -> Run:
    overrides = {}
    for override in yaml.safe_load(overrides_file.read_text()) or []:
        key, _, value = str(override).lstrip("+~").partition("=")
        if not key.startswith("hydra."):
            overrides[key] = value
    summary = json.loads((folder / "summary.json").read_text())
    metrics = {}
    for task, values in (summary.get("evaluation") or {}).items():
        for name, value in values.items():
            if isinstance(value, (int, float)):
                metrics[name if len(summary["evaluation"]) == 1 else f"{task}/{name}"] = float(value)
    for stage, values in (summary.get("stages") or {}).items():
        if isinstance(values.get("final_loss"), (int, float)):
            metrics[f"{stage}/final_loss"] = float(values["final_loss"])
    return Run(folder, overrides, metrics)


@dataclass(frozen=True)
class Row:
    setting: dict[str, str]  # the varied overrides' values
    runs: list[Run]

    def stat(self, metric: str) -> tuple[float, float] | None:
        values = [run.metrics[metric] for run in self.runs if metric in run.metrics]
        if not values:
            return None
        return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def group(runs: list[Run]) -> tuple[list[str], list[Row]]:
    """The overrides that vary (seed aside), and one row per combination of their values."""
    keys = sorted({key for run in runs for key in run.overrides})
    varied = [k for k in keys if k != REPLICATE_KEY and len({run.overrides.get(k, "(default)") for run in runs}) > 1]
    rows: dict[tuple[str, ...], list[Run]] = {}
    for run in runs:
        rows.setdefault(tuple(run.overrides.get(k, "(default)") for k in varied), []).append(run)
    return varied, [Row(dict(zip(varied, values)), members) for values, members in rows.items()]


def default_metrics(runs: list[Run]) -> list[str]:
    names = list(dict.fromkeys(name for run in runs for name in run.metrics))
    evaluated = [n for n in names if "final_loss" not in n and not n.split("/")[-1].startswith("blind_")]
    return evaluated or names


def _label(setting: dict[str, str]) -> str:
    changed = [f"{k}={v}" for k, v in setting.items() if v != "(default)"]
    return ", ".join(changed) or ("defaults" if setting else "all runs")


def write_markdown(varied: list[str], rows: list[Row], metrics: list[str], path: Path) -> str:
    header = [*(varied or ["runs"]), "seeds", *metrics]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(varied or ["runs"]) + "---:|" * (1 + len(metrics))]
    for row in rows:
        cells = list(row.setting.values()) or ["(all)"]
        cells.append(str(len(row.runs)))
        for metric in metrics:
            stat = row.stat(metric)
            cells.append("-" if stat is None else f"{stat[0]:.2f} ± {stat[1]:.2f}")
        lines.append("| " + " | ".join(cells) + " |")
    table = "\n".join(lines)
    path.write_text(f"Mean ± standard deviation over seeds ({len(rows)} settings, "
                    f"{sum(len(r.runs) for r in rows)} runs).\n\n{table}\n")
    return table


def write_csv(varied: list[str], rows: list[Row], metrics: list[str], path: Path) -> None:
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow([*varied, "seeds", *(f"{m}_{part}" for m in metrics for part in ("mean", "sd"))])
        for row in rows:
            stats = [row.stat(metric) for metric in metrics]
            writer.writerow([*row.setting.values(), len(row.runs),
                             *(value for stat in stats for value in (stat if stat else ("", "")))])


def write_plot(rows: list[Row], metrics: list[str], path: Path, title: str) -> None:
    # Deferred: matplotlib takes a second to import, and only the plot needs it.
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    width = 0.8 / len(rows)
    figure, axes = plt.subplots(figsize=(max(6.0, 1.3 * len(metrics) + 2), 5.0 + 0.25 * len(rows)))
    for index, row in enumerate(rows):
        stats = [row.stat(metric) or (0.0, 0.0) for metric in metrics]
        positions = [k + (index - (len(rows) - 1) / 2) * width for k in range(len(metrics))]
        axes.bar(positions, [m for m, _ in stats], width, yerr=[s for _, s in stats], capsize=2,
                 label=f"{_label(row.setting)} (n={len(row.runs)})")
    blind = [(k, rows[0].stat(_blind(metric))) for k, metric in enumerate(metrics)]
    marks = [(k, stat[0]) for k, stat in blind if stat is not None]
    if marks:
        axes.scatter(*zip(*marks), marker="_", s=900, color="black", zorder=3, label="blind baseline")
    axes.set_xticks(range(len(metrics)), metrics, rotation=30 if len(metrics) > 6 else 0, ha="right" if len(metrics) > 6 else "center")
    axes.set_title(title)
    # Below the axes, so it never hides a bar.
    axes.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.2 if len(metrics) > 6 else -0.1),
                ncol=min(3, len(rows) + 1), frameon=False)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def _blind(metric: str) -> str:
    head, _, name = metric.rpartition("/")
    return f"{head}/blind_{name}" if head else f"blind_{name}"
