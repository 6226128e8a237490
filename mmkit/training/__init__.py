"""Training: the LightningModule, recipes of stages, checkpoints of trainable weights."""
