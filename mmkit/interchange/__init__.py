"""Models in and out of other formats: transformers' Llava folders and LLaVA's own checkpoints, each
becoming an mmkit run folder, and runs written back as transformers folders."""
