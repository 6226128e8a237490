"""Teachers: writers of instruction-following data from an image's symbolic view, and the
annotation sources that give the views.

Importing the package registers the built-in teachers: ``caption`` (stage-1 naive expansion),
``rules`` (the offline default) and ``openai`` (any OpenAI-compatible chat endpoint). The
sources (``coco``, ``jsonl``, ``synthetic``: :mod:`mmkit.datagen.sources`) register with the
other components (:mod:`mmkit.components`): the synthetic one needs the synthetic world, which
imports teachers. ``python -m mmkit.datagen`` writes a teacher's data as LLaVA JSON and shards,
with a quality report.
"""
import mmkit.datagen.caption  # noqa: F401
import mmkit.datagen.openai  # noqa: F401
import mmkit.datagen.rules  # noqa: F401
