"""experiments/bench/bench_generate.py at its smallest: it runs, and both sides generate the same ids."""
from __future__ import annotations

import json

import pytest
from conftest import REPO, run_cli

SCRIPT = REPO / "experiments" / "bench" / "bench_generate.py"
SMALLEST = ["--new-tokens", "3", "--repeats", "1", "--hidden", "64", "--layers", "1", "--heads", "2",
            "--vision-hidden", "32", "--vision-layers", "1"]


@pytest.mark.slow
def test_bench_generate_runs_and_both_sides_generate_the_same_ids(tmp_path):
    out = tmp_path / "bench.json"
    result = run_cli([str(SCRIPT), *SMALLEST, "--workdir", str(tmp_path / "work"), "--json", str(out)], timeout=300)
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    report = json.loads(out.read_text())
    rows = {r["batch"]: r for r in report["results"]}
    assert sorted(rows) == [1, 8]
    for batch, row in rows.items():
        assert row["prompts_equal"] and row["ids_equal"], row
        assert row["shapes"] == {"mmkit": [batch, 3], "transformers": [batch, 3]}
        assert row["mmkit_tok_s"] > 0 and row["transformers_tok_s"] > 0
    assert "| 8 |" in result.stdout and "| yes |" in result.stdout
