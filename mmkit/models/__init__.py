"""Model components: vision encoders, connectors, language decoders, and the VLM that joins them."""
