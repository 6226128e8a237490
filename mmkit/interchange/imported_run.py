"""An imported model written as an mmkit run folder, whatever format it came from (transformers'
Llava in ``hf_llava.py``, LLaVA's own in ``llava_original.py``).

The towers stay HF model folders that the run's config points at (``encoder.path``,
``decoder.path``); the projector becomes the connector of one finished stage. So the folder is
what a run that had trained that stage would leave: ``model=OUT`` commands load it as a run, and
``recipe.stages.<stage>.connector_from`` trains on from its connector.
"""
from __future__ import annotations

from pathlib import Path
from typing import Mapping

import torch
from omegaconf import OmegaConf

from mmkit.core.config import compose
from mmkit.models.checkpoint_io import WEIGHTS, save_stage_weights

# The stage whose checkpoint holds an imported model's projector (the same as hf_llava's).
IMPORTED_STAGE = "finetune"


def write_imported_run(out: Path, overrides: list[str], connector_state: Mapping[str, torch.Tensor],
                       source: str | Path) -> list[str]:
    """Save ``connector_state`` (``connector.*`` names) as ``out``'s finished stage and the config
    ``overrides`` compose to as its ``.hydra/config.yaml``. Returns the ``python -m mmkit.train``
    overrides that train on from it."""
    save_stage_weights(connector_state, set(connector_state), out / IMPORTED_STAGE, {"imported_from": str(source)})
    (out / ".hydra").mkdir(parents=True, exist_ok=True)
    # No evaluation: an imported model has no run of its own to evaluate at the end of.
    OmegaConf.save(compose([*overrides, "evaluation=none"]), out / ".hydra" / "config.yaml")
    weights = (out / IMPORTED_STAGE / WEIGHTS).resolve()
    return [*overrides, f"recipe.stages.{IMPORTED_STAGE}.connector_from={weights}"]
