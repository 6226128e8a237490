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
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch

from mmkit.core.cache import build_once, mmkit_home
from mmkit.core.errors import ConfigError
from mmkit.models.hub import register_resolver
from mmkit.zoo.clip import build_tiny_clip, build_tiny_clip_random
from mmkit.zoo.llama import build_tiny_llama
from mmkit.zoo.scale import pretraining_scale
from mmkit.zoo.shipping import shipped_folder, verify
from mmkit.zoo.text import build_tokenizer


@dataclass(frozen=True)
class ZooModel:
    """``build(out, *folders of requires)`` writes the model; bump ``version`` when its recipe
    changes, so caches are rebuilt. ``about`` says what it is for; ``minutes`` is its build time
    on 2 CPU cores at full pretraining scale (the ``train_seconds`` its quality.json records).
    ``resumable``: ``build`` takes a ``checkpoint`` file to save its progress to and resume from,
    so a killed build of hours goes on where it stopped."""

    version: int
    build: Callable[..., None]
    about: str
    minutes: float
    requires: tuple[str, ...] = ()
    resumable: bool = False


BUILDERS: dict[str, ZooModel] = {
    "tiny-tokenizer": ZooModel(4, build_tokenizer, "the BPE tokenizer of the zoo's language models", 0.2),
    "tiny-clip": ZooModel(5, build_tiny_clip, "the embedded default's vision tower, a CLIP ViT pretrained "
                          "contrastively on the synthetic world", 12.0, requires=("tiny-tokenizer",)),
    "tiny-clip-random": ZooModel(2, build_tiny_clip_random, "an untrained CLIP ViT, for ablations", 0.1),
    "tiny-llama": ZooModel(4, build_tiny_llama, "the embedded default's language model, a Llama pretrained on the "
                           "synthetic world's text", 3.5, requires=("tiny-tokenizer",), resumable=True),
    "tiny-llama-large": ZooModel(2, partial(build_tiny_llama, size="tiny-llama-large"), "a larger Llama, for the "
                                 "7B-vs-13B ablation's stand-in", 10.0, requires=("tiny-tokenizer",), resumable=True),
}


def names() -> list[str]:
    return sorted(BUILDERS)


def model_folder(name: str) -> Path:
    version = BUILDERS[name].version
    scale = pretraining_scale()
    suffix = "" if scale == 1 else f"-scale{scale:g}"
    return mmkit_home() / "zoo" / f"{name}-v{version}{suffix}"


def known(name: str) -> ZooModel:
    """The zoo model ``name``; a ConfigError naming the choices when there is none."""
    if name not in BUILDERS:
        raise ConfigError(f"zoo://{name}: unknown zoo model; available: {', '.join(names())}")
    return BUILDERS[name]


def shipped(name: str) -> Path | None:
    """The package's pretrained copy of ``name``, hash-checked, or None when it ships none (or
    when ``$MMKIT_ZOO_SCALE`` asks for small builds, which never mix with full-scale ones)."""
    folder = shipped_folder(name, known(name).version)
    if folder is None or pretraining_scale() != 1:
        return None
    verify(folder)
    return folder


def ensure_model(name: str) -> Path:
    """The folder of zoo model ``name``: the shipped one, else the cached build, built first if
    it is not there yet."""
    return shipped(name) or ensure_built(name)


def ensure_built(name: str) -> Path:
    """The cached build of ``name`` from its recipe (never the shipped copy), built first if it is
    not there yet; the models it requires are built from their recipes too."""
    model = known(name)
    required = [ensure_built(other) for other in model.requires]
    folder = model_folder(name)
    # Beside the cache folder, not in the build's temporary one, which a killed build loses.
    checkpoint = folder.with_name(f"{folder.name}.resume.pt")

    def build(out: Path) -> None:
        # Builders seed torch for their own reproducibility; the caller's random state must not
        # move, so a run seeded before its zoo models were built trains exactly like one that
        # found them cached.
        with torch.random.fork_rng(devices=[]):
            model.build(out, *required, **({"checkpoint": checkpoint} if model.resumable else {}))

    minutes = model.minutes * pretraining_scale()
    took = f"roughly {minutes:.0f} min" if minutes >= 1 else "under a minute"
    built = build_once(folder, build, announce=f"zoo: building {name}, {model.about} ({took} on 2 CPU cores)")
    checkpoint.unlink(missing_ok=True)
    return built


def present(name: str) -> Path | None:
    """The folder ``ensure_model`` would give without building anything, or None."""
    folder = shipped(name) or model_folder(name)
    return folder if folder.is_dir() else None


def quality(name: str) -> dict[str, Any] | None:
    """The quality report of the model ``ensure_model`` gives, if it is shipped or built."""
    folder = present(name)
    path = folder / "quality.json" if folder else None
    return json.loads(path.read_text()) if path and path.is_file() else None


register_resolver("zoo", ensure_model)
