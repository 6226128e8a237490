"""experiments/bench/bench_gpu.py: skips cleanly without CUDA, and its whole code path runs on a CPU
at a tiny shape (--cpu-smoke), including the out-of-memory layer search."""
from __future__ import annotations

import importlib.util
import json
import math
import os
from unittest import mock

import pytest
from conftest import REPO, run_cli

SCRIPT = REPO / "experiments" / "bench" / "bench_gpu.py"


def load_bench_gpu():
    with mock.patch.dict(os.environ):  # the script sets the CUDA allocator's options on import
        spec = importlib.util.spec_from_file_location("bench_gpu", SCRIPT)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_bench_gpu_without_cuda_prints_one_line_and_exits_0():
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is here: without flags the script would run the full benchmark")
    result = run_cli([str(SCRIPT)], timeout=120)
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    assert result.stdout.strip() == "bench_gpu: no CUDA device; skipped"


@pytest.mark.slow
def test_bench_gpu_cpu_smoke_measures_both_stages(tmp_path):
    out = tmp_path / "bench.json"
    result = run_cli([str(SCRIPT), "--cpu-smoke", "--profile", "--json", str(out)], timeout=180)
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    report = json.loads(out.read_text())
    assert report["cpu_smoke"] and report["device"] == "cpu" and report["precision"] == "32-true"
    assert set(report["stages"]) == {"stage1", "stage2"}
    stage1, stage2 = report["stages"]["stage1"], report["stages"]["stage2"]
    for entry in (stage1, stage2):
        assert entry["real_tokens_per_s"] > 0 and entry["model_flops_per_step"] > 0 and entry["step_s_median"] > 0
        assert entry["mfu"] is None and entry["peak_tflops"] is None and entry["peak_memory_gib"] is None
        assert entry["steps"] == 2 and entry["layers"] == 2
        assert all(math.isfinite(loss) for loss in entry["losses"])
        assert entry["profile"]["top"] and entry["profile"]["by_kind_share"] and entry["profile"]["steps"] == 2
        assert entry["replayed_step_s_mean"] > 0
    # Stage 2 trains the LM as well: more parameters, more FLOPs per step (4N -> 6N on the LM).
    assert stage2["trainable_parameters"] > stage1["trainable_parameters"] > 0
    assert stage2["model_flops_per_step"] > stage1["model_flops_per_step"]
    assert "| stage1 | connector |" in result.stdout and "| stage2 | connector+LM |" in result.stdout


@pytest.mark.slow
def test_bench_gpu_steps_down_a_layer_after_each_out_of_memory_error(tmp_path):
    out = tmp_path / "bench.json"
    result = run_cli([str(SCRIPT), "--cpu-smoke", "--stages", "stage2", "--layers", "4", "--simulate-oom-above", "2",
                      "--json", str(out)], timeout=180)
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    entry = json.loads(out.read_text())["stages"]["stage2"]
    assert entry["layers"] == 2 and entry["layer_search"]["out_of_memory"] == [4, 3]
    assert "4 layers ran out of memory" in result.stdout


def test_layers_that_fit_extrapolates_two_probes():
    bench_gpu = load_bench_gpu()
    gib = 2**30
    # 10 GiB fixed + 5 GiB a layer: 72 GiB holds 12 layers, not 13.
    assert bench_gpu.layers_that_fit({2: 20 * gib, 4: 30 * gib}, 72 * gib, 32) == 12
    assert bench_gpu.layers_that_fit({2: 20 * gib, 4: 30 * gib}, 500 * gib, 32) == 32
    assert bench_gpu.layers_that_fit({2: 20 * gib, 4: 30 * gib}, 5 * gib, 32) == 1


@pytest.mark.slow
def test_in_place_towers_match_mmkits_loaded_ones(tmp_path):
    """The benchmark builds its towers from configs instead of checkpoints; they must be set up
    exactly as ``hf_clip`` and ``hf_causal_lm`` set up loaded ones (same attributes, FLOPs, sizes)."""
    import sys

    import torch

    sys.path.insert(0, str(REPO / "experiments" / "bench"))
    from common import Shape, build_random_vlm

    from mmkit.training.throughput import FlopModel

    torch.set_num_threads(1)
    bench_gpu = load_bench_gpu()
    shape = Shape(image_size=56, vision_width=64, vision_layers=2, width=64, layers=2, heads=2, kv_heads=2,
                  intermediate=128, vocab=1000)
    _, loaded = build_random_vlm(tmp_path / "loaded", shape, attention="packed_sdpa")
    tokenizer = bench_gpu.write_tokenizer(tmp_path / "tokenizer", shape.vocab)
    built = bench_gpu.build_model(shape, torch.device("cpu"), tokenizer, "packed_sdpa", False, "32-true")
    for part in ("encoder", "decoder"):
        assert set(vars(getattr(built, part))) == set(vars(getattr(loaded, part))), part
    for name in ("hidden_size", "num_blocks", "num_patches", "num_prefix_tokens", "hidden_state_index", "layer",
                 "select", "frozen", "image_stats", "num_tokens"):
        assert getattr(built.encoder, name) == getattr(loaded.encoder, name), name
    assert built.num_image_tokens == loaded.num_image_tokens
    assert built.decoder.model.config._attn_implementation == loaded.decoder.model.config._attn_implementation
    for stage in ("stage1", "stage2"):
        bench_gpu.set_stage(built, stage)
        bench_gpu.set_stage(loaded, stage)
        assert FlopModel.of(built) == FlopModel.of(loaded), stage
        assert bench_gpu.parameter_count(built, True) == bench_gpu.parameter_count(loaded, True), stage
