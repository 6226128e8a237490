"""Teachers: writers of instruction-following data from an image's symbolic view."""
