"""Connectors: encoder features [B,N,D] -> decoder embeddings [B,N',E]."""
