"""Serving a trained model over HTTP: request checks, batching, the OpenAI-compatible API."""
