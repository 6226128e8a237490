"""Evaluation: evaluators (registered components) and batched generation."""
