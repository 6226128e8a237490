"""Language decoders: causal LMs with a tokenizer that knows the <image> token."""
