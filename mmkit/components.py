"""mmkit's own components, registered the way plugins' are: pyproject.toml's ``mmkit.plugins``
entry point names this module, and importing it imports every built-in component module (each
registers itself) and the zoo (which serves ``zoo://`` model paths).

    python -m mmkit.components      (every registered name, mmkit's and the installed plugins', by kind)
"""
import mmkit.data.datasets.llava_json  # noqa: F401
import mmkit.data.datasets.mixture  # noqa: F401
import mmkit.data.datasets.scienceqa  # noqa: F401
import mmkit.data.datasets.shards  # noqa: F401
import mmkit.data.datasets.synthetic  # noqa: F401
import mmkit.data.templates.hf_chat  # noqa: F401
import mmkit.data.templates.llava_v0  # noqa: F401
import mmkit.data.templates.plain  # noqa: F401
import mmkit.data.templates.vicuna_v1  # noqa: F401
import mmkit.datagen.caption  # noqa: F401
import mmkit.datagen.rules  # noqa: F401
import mmkit.datagen.sources  # noqa: F401
import mmkit.evaluation.bias  # noqa: F401
import mmkit.evaluation.judge_validity  # noqa: F401
import mmkit.evaluation.judges  # noqa: F401
import mmkit.evaluation.llava_bench  # noqa: F401
import mmkit.evaluation.scienceqa  # noqa: F401
import mmkit.evaluation.synthetic  # noqa: F401
import mmkit.models.connectors.identity  # noqa: F401
import mmkit.models.connectors.linear  # noqa: F401
import mmkit.models.connectors.mlp  # noqa: F401
import mmkit.models.decoders.hf_causal_lm  # noqa: F401
import mmkit.models.encoders.hf_clip  # noqa: F401
import mmkit.models.encoders.timm_vit  # noqa: F401
import mmkit.zoo  # noqa: F401  (registers the zoo:// resolver)
from mmkit.core.registry import (
    CONNECTORS,
    DATASETS,
    DECODERS,
    ENCODERS,
    EVALUATORS,
    JUDGES,
    SOURCES,
    TEACHERS,
    TEMPLATES,
    load_components,
)


def main() -> None:
    """One line per kind of component; a plugin that failed to load is reported above them."""
    load_components()
    for registry in (ENCODERS, CONNECTORS, DECODERS, TEMPLATES, DATASETS, EVALUATORS, JUDGES, TEACHERS, SOURCES):
        print(f"{registry.kind}: {', '.join(registry.names())}")


if __name__ == "__main__":
    main()
