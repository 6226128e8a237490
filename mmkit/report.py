"""Gather finished runs into one table: the overrides that varied against the metrics.

    python -m mmkit.train -m encoder.layer=-1,-2 seed=0,1,2
    python -m mmkit.report multirun/2026-11-26/12-00-00
    python -m mmkit.report runs/a runs/b --metrics acc acc_colour --out report/

Every run folder under the given paths (one holding ``summary.json`` and
``.hydra/overrides.yaml``, as ``python -m mmkit.train`` writes them) is one row of data. Runs that
differ only in ``seed`` are replicates: the table gives each metric's mean ± standard deviation
over them. Writes ``report.md``, ``report.csv`` and ``report.png`` (grouped bars with the spread;
a metric's ``blind_`` counterpart, where the evaluator gives one, as a black mark).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from mmkit.core.errors import ConfigError, MmkitError
from mmkit.evaluation.sweep_report import default_metrics, find_runs, group, write_csv, write_markdown, write_plot


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mmkit.report", description=__doc__.splitlines()[0])
    parser.add_argument("paths", nargs="+", type=Path, help="a multirun folder, run folders, or folders holding them")
    parser.add_argument("--metrics", nargs="+", help="which metrics (default: every evaluation metric but blind_*)")
    parser.add_argument("--out", type=Path, help="where report.md/.csv/.png go (default: the first path)")
    parser.add_argument("--title", default=None)
    args = parser.parse_args(argv)
    try:
        runs = find_runs(args.paths)
        metrics = args.metrics or default_metrics(runs)
        unknown = [m for m in metrics if not any(m in run.metrics for run in runs)]
        if unknown:
            known = sorted({name for run in runs for name in run.metrics})
            raise ConfigError(f"--metrics {' '.join(unknown)}: not in these runs; they have: {', '.join(known)}")
        varied, rows = group(runs)
        out = args.out or args.paths[0]
        out.mkdir(parents=True, exist_ok=True)
        table = write_markdown(varied, rows, metrics, out / "report.md")
        write_csv(varied, rows, metrics, out / "report.csv")
        title = args.title or ("varied: " + ", ".join(varied) if varied else f"{len(runs)} runs")
        write_plot(rows, metrics, out / "report.png", title)
    except MmkitError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(table)
    print(f"\n{len(runs)} runs -> {out / 'report.md'}, {out / 'report.csv'}, {out / 'report.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
