"""Dataset components: each resolves its config to a set of WebDataset shards."""
