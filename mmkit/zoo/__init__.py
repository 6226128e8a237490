"""mmkit's own small pretrained models, built on first use and cached in HF format under
``$MMKIT_HOME/zoo`` (see ``python -m mmkit.zoo``).

They use the real architectures (a CLIP vision tower, a Llama decoder, a BPE tokenizer), so the
embedded default loads them through exactly the ``from_pretrained`` path that loads
openai/clip-vit-large-patch14 or lmsys/vicuna-7b-v1.5. Like the paper's towers they are
*pretrained* before LLaVA's stages begin: the vision tower contrastively on the synthetic
world's image-caption pairs, the LM on the world's text. Each folder holds ``quality.json``.
"""
from __future__ import annotations

import json
import os
from functools import partial
from pathlib import Path
from typing import Any, Callable

from mmkit.data.datasets.base import build_once, mmkit_home
from mmkit.errors import ConfigError


def _builders() -> dict[str, tuple[int, Callable[[Path], None]]]:
    # Imported lazily: building needs torch/transformers, listing does not.
    from mmkit.zoo.clip import build_tiny_clip, build_tiny_clip_random
    from mmkit.zoo.llama import build_tiny_llama
    from mmkit.zoo.text import build_tokenizer

    # name -> (version, builder); bump a version when its recipe changes so caches are rebuilt.
    return {
        "tiny-tokenizer": (2, build_tokenizer),
        "tiny-clip": (3, build_tiny_clip),
        "tiny-clip-random": (2, build_tiny_clip_random),
        "tiny-llama": (3, build_tiny_llama),
        "tiny-llama-large": (1, partial(build_tiny_llama, size="tiny-llama-large")),
    }


def names() -> list[str]:
    return sorted(_builders())


def pretraining_scale() -> float:
    """``$MMKIT_ZOO_SCALE`` scales every zoo model's pretraining steps and corpus (default 1).

    The test suite runs the real pretraining code at a small scale; such models are cached
    apart from full-scale ones so the two never mix."""
    value = os.environ.get("MMKIT_ZOO_SCALE", "1")
    try:
        scale = float(value)
    except ValueError:
        scale = -1.0
    if not 0 < scale <= 1:
        raise ConfigError(f"MMKIT_ZOO_SCALE={value!r}: use a number in (0, 1]")
    return scale


def scaled(count: int) -> int:
    return max(1, round(count * pretraining_scale()))


def model_folder(name: str) -> Path:
    version = _builders()[name][0]
    scale = pretraining_scale()
    suffix = "" if scale == 1 else f"-scale{scale:g}"
    return mmkit_home() / "zoo" / f"{name}-v{version}{suffix}"


def ensure_model(name: str) -> Path:
    """The cached folder of zoo model ``name``, built first if it is not there yet."""
    builders = _builders()
    if name not in builders:
        raise ConfigError(f"zoo://{name}: unknown zoo model; available: {', '.join(sorted(builders))}")
    return build_once(model_folder(name), _keeping_random_state(builders[name][1]))


def _keeping_random_state(builder: Callable[[Path], None]) -> Callable[[Path], None]:
    """Builders seed torch for their own reproducibility; the caller's random state must not move,
    so a run seeded before its zoo models were built trains exactly like one that found them cached."""

    def build(out: Path) -> None:
        import torch

        with torch.random.fork_rng(devices=[]):
            builder(out)

    return build


def quality(name: str) -> dict[str, Any] | None:
    path = model_folder(name) / "quality.json"
    return json.loads(path.read_text()) if path.is_file() else None


def write_quality(folder: Path, report: dict[str, Any]) -> None:
    (folder / "quality.json").write_text(json.dumps(report, indent=2))
