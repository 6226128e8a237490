"""The paper's ablations on the embedded default, each on several seeds: table and bar plot.

    python experiments/ablations.py                       # 5 variants x 3 seeds, resumable
    python experiments/ablations.py --seeds 0 --variants full linear
    python experiments/ablations.py --report-only         # rebuild the table/plot from finished runs

Every run is a real ``python -m mmkit.train`` subprocess with the variant's overrides and
``seed=S``, in ``experiments/runs/ablations/<variant>/seed<S>``; a run whose ``summary.json``
exists is not repeated, so an interrupted sweep resumes. The default config *is* the
``mlp2x_gelu`` and ``encoder.layer=-2`` arm, so those rows reuse the ``full`` runs.
Writes ``experiments/ablations.md`` (mean and spread per question type) and
``experiments/ablations.png`` (a PNG).
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RUNS = HERE / "runs" / "ablations"

# variant -> (what it tests, train overrides); "full" is the default recipe as shipped.
VARIANTS: dict[str, tuple[str, list[str]]] = {
    "full": ("full recipe (mlp2x_gelu, layer -2)", []),
    "no_stage1": ("no stage 1 (no feature alignment)", ["recipe=no_stage1"]),
    "stage1_only": ("stage 1 only (no instruction tuning)", ["recipe=stage1_only"]),
    "linear": ("linear connector (LLaVA)", ["connector=linear"]),
    "layer_last": ("encoder.layer=-1 (last layer)", ["encoder.layer=-1"]),
}
# Rows of the table: the paper's comparisons, each pointing at the runs that answer it.
ROWS: list[tuple[str, str]] = [
    ("full recipe", "full"),
    ("no stage 1", "no_stage1"),
    ("stage 1 only", "stage1_only"),
    ("connector linear", "linear"),
    ("connector mlp2x_gelu", "full"),
    ("encoder.layer -1", "layer_last"),
    ("encoder.layer -2", "full"),
]


def run_dir(variant: str, seed: int) -> Path:
    return RUNS / variant / f"seed{seed}"


def run_one(variant: str, seed: int) -> None:
    out = run_dir(variant, seed)
    if (out / "summary.json").is_file():
        print(f"[{variant} seed {seed}] done already", flush=True)
        return
    command = [sys.executable, "-m", "mmkit.train", *VARIANTS[variant][1], f"seed={seed}", f"hydra.run.dir={out}"]
    print(f"[{variant} seed {seed}] {' '.join(command[1:])}", flush=True)
    started = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "stdout.log", "w") as log:
        result = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT)
    if result.returncode != 0:
        raise SystemExit(f"[{variant} seed {seed}] failed (exit {result.returncode}); see {out / 'stdout.log'}")
    print(f"[{variant} seed {seed}] {time.perf_counter() - started:.0f} s", flush=True)


def collect(seeds: list[int]) -> dict[str, list[dict[str, float]]]:
    """variant -> the synthetic evaluator's metrics of each finished seed."""
    found: dict[str, list[dict[str, float]]] = {}
    for variant in VARIANTS:
        for seed in seeds:
            path = run_dir(variant, seed) / "summary.json"
            if path.is_file():
                found.setdefault(variant, []).append(json.loads(path.read_text())["evaluation"]["synthetic"])
    return found


def _mean_spread(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def question_kinds(metrics: dict[str, float]) -> list[str]:
    return [key[len("acc_"):] for key in metrics if key.startswith("acc_")]


def write_table(found: dict[str, list[dict[str, float]]], path: Path) -> None:
    any_metrics = next(iter(found.values()))[0]
    kinds = question_kinds(any_metrics)
    lines = [
        "| variant | seeds | overall | " + " | ".join(kinds) + " |",
        "|---|---:|---:|" + "---:|" * len(kinds),
    ]
    for label, variant in ROWS:
        runs = found.get(variant)
        if not runs:
            continue
        cells = []
        for key in ["acc", *(f"acc_{kind}" for kind in kinds)]:
            mean, spread = _mean_spread([run[key] for run in runs])
            cells.append(f"{mean:.1f} ± {spread:.1f}")
        lines.append(f"| {label} | {len(runs)} | " + " | ".join(cells) + " |")
    blind = [f"{any_metrics['blind_acc']:.1f}", *(f"{any_metrics[f'blind_acc_{kind}']:.1f}" for kind in kinds)]
    lines.append("| blind baseline (no image) | - | " + " | ".join(blind) + " |")
    path.write_text(
        "Held-out exact match (%) of the synthetic evaluator, mean ± standard deviation over seeds.\n\n"
        + "\n".join(lines) + "\n"
    )
    print(path.read_text())


def write_plot(found: dict[str, list[dict[str, float]]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    any_metrics = next(iter(found.values()))[0]
    kinds = ["overall", *question_kinds(any_metrics)]
    rows = [(label, found[variant]) for label, variant in ROWS if variant in found]
    width = 0.8 / len(rows)
    figure, axes = plt.subplots(figsize=(12, 4.5))
    for index, (label, runs) in enumerate(rows):
        keys = ["acc", *(f"acc_{kind}" for kind in kinds[1:])]
        stats = [_mean_spread([run[key] for run in runs]) for key in keys]
        positions = [k + (index - (len(rows) - 1) / 2) * width for k in range(len(kinds))]
        axes.bar(positions, [m for m, _ in stats], width, yerr=[s for _, s in stats], capsize=2, label=label)
    blind = [any_metrics["blind_acc"], *(any_metrics[f"blind_acc_{kind}"] for kind in kinds[1:])]
    axes.scatter(range(len(kinds)), blind, marker="_", s=900, color="black", zorder=3, label="blind baseline")
    axes.axhline(85, color="grey", linestyle=":", linewidth=1)
    axes.set_xticks(range(len(kinds)), kinds)
    axes.set_ylabel("held-out exact match (%)")
    axes.set_ylim(0, 100)
    axes.set_title("mmkit embedded default: ablations (mean ± sd over seeds; dotted line: the 85% target)")
    axes.legend(fontsize=8, ncol=4, loc="upper left")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    print(f"plot: {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    parser.add_argument("--report-only", action="store_true", help="only rebuild the table and plot")
    args = parser.parse_args()
    if not args.report_only:
        for seed in args.seeds:
            for variant in args.variants:
                run_one(variant, seed)
    found = collect(args.seeds)
    if not found:
        raise SystemExit(f"no finished runs under {RUNS}")
    write_table(found, HERE / "ablations.md")
    write_plot(found, HERE / "ablations.png")


if __name__ == "__main__":
    main()
