"""mmkit: a plugin-based toolkit for LLaVA-style visual instruction tuning."""

__version__ = "0.1.0"
