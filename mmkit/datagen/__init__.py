"""Teachers: writers of instruction-following data from an image's symbolic view.

Importing the package registers the built-in teachers: ``caption`` (stage-1 naive expansion),
``rules`` (the offline default) and ``openai`` (any OpenAI-compatible chat endpoint).
``python -m mmkit.datagen`` writes a teacher's data as LLaVA JSON and shards.
"""
import mmkit.datagen.caption  # noqa: F401
import mmkit.datagen.openai  # noqa: F401
import mmkit.datagen.rules  # noqa: F401
