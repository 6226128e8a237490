"""The README's figures for the embedded default, measured: one script regenerates them all.

    python experiments/default_run.py                  # every step: about half an hour on 2 CPU cores
    python experiments/default_run.py --skip suite     # without timing the test suite

Steps, each a real subprocess with a fresh ``$MMKIT_HOME`` (so nothing cached on this machine
counts) in a temporary folder:

- ``cold``: ``python -m mmkit.train`` with an empty cache, so the zoo and the data are built first;
- ``warm``: the same command again, with the cache the cold run filled;
- ``scienceqa_untrained``: ``python -m mmkit.evaluate task=scienceqa`` on the warm run's model,
  which never saw ScienceQA's format (and a uniform guess's accuracy on the same problems);
- ``scienceqa_trained``: ``python -m mmkit.train data=scienceqa evaluation=scienceqa``;
- ``suite``: ``make test``'s pytest command, in this checkout.

Writes ``experiments/default_run/results.json`` (each step's wall time, the load average
before and after, its figures, and the machine), the cold run's first lines of output
(``experiments/default_run/cold_start.txt``), and replaces
``experiments/sample_answers_default/`` with the warm run's ``sample_answers.md`` and images.
``tests/test_readme_figures.py`` fails when the README and these files disagree.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from importlib.metadata import version
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
RESULTS = HERE / "default_run"
SAMPLE_ANSWERS = HERE / "sample_answers_default"
STEPS = ("cold", "warm", "scienceqa_untrained", "scienceqa_trained", "suite")
COLD_START_LINES = 16
SUITE_COMMAND = ["-m", "pytest", "-q", "-n", "2", "--dist", "loadfile"]


def cpu_model() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    lines = cpuinfo.read_text().splitlines() if cpuinfo.exists() else []
    names = (line.split(":", 1)[1].strip() for line in lines if line.startswith("model name"))
    return next(names, platform.processor())


def machine() -> dict:
    return {
        "cpus": len(os.sched_getaffinity(0)),
        "cpu_model": cpu_model(),
        "python": platform.python_version(),
        "torch": version("torch"),
        "transformers": version("transformers"),
        "lightning": version("lightning"),
    }


def run_step(name: str, arguments: list[str], work: Path, env: dict[str, str], cwd: Path) -> dict:
    """Run ``python ARGUMENTS``, echoing its output to the terminal and to ``work/<name>.log``."""
    log_path = work / f"{name}.log"
    print(f"== {name}: python {' '.join(arguments)} (log: {log_path})", flush=True)
    load_before = os.getloadavg()
    started = time.perf_counter()
    # Bytes, not text: text mode would turn each progress bar's "\r" redraw into a line of its own.
    with log_path.open("wb") as log:
        process = subprocess.Popen([sys.executable, *arguments], cwd=cwd, env=env,
                                   stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        for chunk in iter(lambda: process.stdout.read1(65536), b""):
            sys.stdout.buffer.write(chunk)
            sys.stdout.buffer.flush()
            log.write(chunk)
        returncode = process.wait()
    wall_s = time.perf_counter() - started
    if returncode != 0:
        sys.exit(f"{name} failed (exit {returncode}); its output is in {log_path}")
    return {
        "command": f"python {' '.join(arguments)}",
        "wall_s": round(wall_s, 1),
        "load_before": [round(load, 2) for load in load_before],
        "load_after": [round(load, 2) for load in os.getloadavg()],
    }


def synthetic_figures(run_dir: Path) -> dict:
    synthetic = json.loads((run_dir / "summary.json").read_text())["evaluation"]["synthetic"]
    return {"acc": synthetic["acc"], "blind_acc": synthetic["blind_acc"]}


def scienceqa_figures(eval_dir: Path) -> dict:
    metrics = json.loads((eval_dir / "results.json").read_text())
    problems = len((eval_dir / "predictions.jsonl").read_text().splitlines())
    return {"problems": problems, "acc": metrics["acc"], "lenient_acc": metrics["lenient_acc"],
            "unparsed_official": metrics["unparsed_official"]}


def chance_accuracy(mmkit_home: Path) -> float:
    """A uniform guess's expected accuracy on the synthetic ScienceQA-format test split (%)."""
    problems_files = sorted((mmkit_home / "data").glob("scienceqa-synthetic-*/problems.json"))
    if len(problems_files) != 1:
        sys.exit(f"expected one synthetic ScienceQA set under {mmkit_home / 'data'}, found {len(problems_files)}")
    problems = json.loads(problems_files[0].read_text())
    test = json.loads((problems_files[0].parent / "pid_splits.json").read_text())["test"]
    return round(100 * sum(1 / len(problems[pid]["choices"]) for pid in test) / len(test), 2)


def suite_figures(log: str) -> dict:
    # pytest's last line: "590 passed, 6 skipped in 959.12s (0:15:59)"
    final = log.strip().splitlines()[-1]
    counts = {kind: int(count) for count, kind in re.findall(r"(\d+) (passed|failed|skipped|errors?)", final)}
    if "passed" not in counts:
        sys.exit(f"suite: no pytest summary in its last line: {final!r}")
    return {"counts": counts, "summary": final.strip("= ")}


def copy_sample_answers(run_dir: Path) -> None:
    shutil.rmtree(SAMPLE_ANSWERS, ignore_errors=True)
    SAMPLE_ANSWERS.mkdir()
    shutil.copy2(run_dir / "sample_answers.md", SAMPLE_ANSWERS / "sample_answers.md")
    shutil.copytree(run_dir / "sample_answers", SAMPLE_ANSWERS / "sample_answers")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--skip", nargs="*", default=[], choices=STEPS,
                        help="steps to leave out (their old figures stay)")
    parser.add_argument("--work", type=Path, default=None,
                        help="keep the runs here (default: a temporary folder, removed)")
    args = parser.parse_args()

    RESULTS.mkdir(exist_ok=True)
    results_path = RESULTS / "results.json"
    results = json.loads(results_path.read_text()) if results_path.exists() else {}
    results["machine"] = machine()
    work = args.work or Path(tempfile.mkdtemp(prefix="mmkit_default_run_"))
    work.mkdir(parents=True, exist_ok=True)
    # A fresh cache: the cold run builds everything, as on a new machine; the rest reuse it.
    env = {**os.environ, "MMKIT_HOME": str(work / "mmkit_home")}
    warm_run = work / "warm"

    def train(name: str, *overrides: str) -> Path:
        run_dir = work / name
        results[name] = run_step(name, ["-m", "mmkit.train", *overrides, f"hydra.run.dir={run_dir}"], work, env, work)
        return run_dir

    try:
        if "cold" not in args.skip:
            run_dir = train("cold")
            results["cold"]["figures"] = synthetic_figures(run_dir)
            # Each line as a terminal leaves it: a progress bar's last redraw.
            lines = [line.split("\r")[-1] for line in (work / "cold.log").read_bytes().decode().split("\n")]
            (RESULTS / "cold_start.txt").write_text("\n".join(lines[:COLD_START_LINES]) + "\n")
        if "warm" not in args.skip:
            if not (work / "mmkit_home" / "data").is_dir():
                sys.exit("warm reuses the cache a cold run filled in the same --work folder: run the cold step too")
            run_dir = train("warm")
            results["warm"]["figures"] = synthetic_figures(run_dir)
            copy_sample_answers(run_dir)
        if "scienceqa_untrained" not in args.skip:
            if not (warm_run / "summary.json").exists():
                sys.exit("scienceqa_untrained evaluates the warm run's model: run the warm step too")
            out_dir = work / "scienceqa_untrained"
            results["scienceqa_untrained"] = run_step(
                "scienceqa_untrained",
                ["-m", "mmkit.evaluate", "task=scienceqa", f"model={warm_run}", f"out_dir={out_dir}",
                 f"hydra.run.dir={out_dir}"], work, env, work)
            results["scienceqa_untrained"]["figures"] = scienceqa_figures(out_dir)
            results["scienceqa_chance_acc"] = chance_accuracy(work / "mmkit_home")
        if "scienceqa_trained" not in args.skip:
            run_dir = train("scienceqa_trained", "data=scienceqa", "evaluation=scienceqa")
            results["scienceqa_trained"]["figures"] = scienceqa_figures(run_dir / "eval" / "scienceqa")
        if "suite" not in args.skip:
            # The suite runs on the machine's own cache, as `make test` does.
            results["suite"] = run_step("suite", SUITE_COMMAND, work, dict(os.environ), REPO)
            results["suite"]["figures"] = suite_figures((work / "suite.log").read_text())
    finally:
        results_path.write_text(json.dumps(results, indent=2) + "\n")
        print(f"results: {results_path}")
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
