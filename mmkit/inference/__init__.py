"""Answering prompts with a model: batched generation, its KV cache, and building a generator from a run's config."""
