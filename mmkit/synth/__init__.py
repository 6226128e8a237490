"""The synthetic visual world: scenes of coloured shapes, their renderings, captions and LLaVA data."""
