"""Imports every built-in component module so that each registers itself."""
import mmkit.data.datasets.llava_json  # noqa: F401
import mmkit.data.datasets.scienceqa  # noqa: F401
import mmkit.data.datasets.shards  # noqa: F401
import mmkit.data.datasets.synthetic  # noqa: F401
import mmkit.data.templates.llava_v0  # noqa: F401
import mmkit.data.templates.plain  # noqa: F401
import mmkit.data.templates.vicuna_v1  # noqa: F401
import mmkit.datagen.caption  # noqa: F401
import mmkit.datagen.rules  # noqa: F401
import mmkit.evaluation.scienceqa  # noqa: F401
import mmkit.evaluation.synthetic  # noqa: F401
import mmkit.models.connectors.identity  # noqa: F401
import mmkit.models.connectors.linear  # noqa: F401
import mmkit.models.connectors.mlp  # noqa: F401
import mmkit.models.decoders.hf_causal_lm  # noqa: F401
import mmkit.models.encoders.hf_clip  # noqa: F401
import mmkit.models.encoders.timm_vit  # noqa: F401
