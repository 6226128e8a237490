"""The lowest layer: registries, config, schema, errors, caches, atomic I/O. It imports nothing else of mmkit."""
