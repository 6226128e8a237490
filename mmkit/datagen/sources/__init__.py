"""The built-in annotation sources (see :mod:`mmkit.datagen.source`); importing the package
registers them: ``coco``, ``jsonl`` and ``synthetic``."""
import mmkit.datagen.sources.coco  # noqa: F401
import mmkit.datagen.sources.jsonl  # noqa: F401
import mmkit.datagen.sources.synthetic  # noqa: F401
