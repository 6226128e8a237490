"""python -m mmkit.report: a Hydra multirun (or run folders) -> one table of what varied vs metrics."""
from __future__ import annotations

import csv
import json
import statistics

import pytest
from conftest import TINY_RUN, run_cli

from mmkit.report import main


def _fake_run(folder, overrides: list[str], acc: float, colour: float) -> None:
    (folder / ".hydra").mkdir(parents=True)
    (folder / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
    (folder / "summary.json").write_text(json.dumps({
        "stages": {"finetune": {"final_loss": 0.5}},
        "evaluation": {"synthetic": {"acc": acc, "blind_acc": 31.0, "acc_colour": colour, "blind_acc_colour": 15.0}},
    }))


def test_replicates_are_averaged_and_only_what_varied_is_a_column(tmp_path):
    values = {("linear", 0): (40.0, 10.0), ("linear", 1): (44.0, 14.0), ("mlp2x_gelu", 0): (50.0, 20.0),
              ("mlp2x_gelu", 1): (51.0, 30.0), ("mlp2x_gelu", 2): (55.0, 25.0)}
    for index, ((connector, seed), (acc, colour)) in enumerate(values.items()):
        _fake_run(tmp_path / str(index), [f"connector={connector}", f"seed={seed}", "data.finetune.count=32",
                                          f"hydra.run.dir=/x/{index}"], acc, colour)
    assert main([str(tmp_path)]) == 0
    rows = list(csv.DictReader(open(tmp_path / "report.csv")))
    assert [r["connector"] for r in rows] == ["linear", "mlp2x_gelu"] and "data.finetune.count" not in rows[0]
    mlp = rows[1]
    assert mlp["seeds"] == "3" and set(mlp) >= {"acc_mean", "acc_sd", "acc_colour_mean"} and "blind_acc_mean" not in mlp
    assert float(mlp["acc_mean"]) == pytest.approx(statistics.fmean([50, 51, 55]))
    assert float(mlp["acc_sd"]) == pytest.approx(statistics.stdev([50, 51, 55]))
    assert "| mlp2x_gelu | 3 | 52.00 ± 2.65 | 25.00 ± 5.00 |" in (tmp_path / "report.md").read_text()
    assert (tmp_path / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bad_paths_and_metrics_are_one_line(tmp_path, capsys):
    assert main([str(tmp_path / "nowhere")]) == 2
    assert "nowhere: no such folder" in capsys.readouterr().err
    _fake_run(tmp_path / "a", ["seed=0"], 40.0, 10.0)
    assert main([str(tmp_path), "--metrics", "acc_shape"]) == 2
    assert "--metrics acc_shape: not in these runs; they have: acc, acc_colour" in capsys.readouterr().err


@pytest.mark.slow
def test_a_multirun_sweep_becomes_a_table_and_a_plot(tmp_path):
    sweep = tmp_path / "sweep"
    # Two settings, one seed each, keep it quick; replicates are checked on the runs above.
    result = run_cli(["-m", "mmkit.train", "-m", "connector=linear,mlp2x_gelu", "recipe=stage1_only",
                      *[o for o in TINY_RUN if "finetune" not in o], f"hydra.sweep.dir={sweep}"])
    assert result.returncode == 0, result.stderr[-3000:]
    report = run_cli(["-m", "mmkit.report", str(sweep)])
    assert report.returncode == 0, report.stderr[-3000:]
    rows = list(csv.DictReader(open(sweep / "report.csv")))
    assert [(r["connector"], r["seeds"]) for r in rows] == [("linear", "1"), ("mlp2x_gelu", "1")]
    assert "acc_mean" in rows[0] and "| connector | seeds | acc |" in report.stdout
    from PIL import Image

    assert Image.open(sweep / "report.png").size[0] >= 600
