"""Data: conversation templates, image processing, LLaVA JSON, WebDataset shards, streaming."""
