"""Errors that mmkit reports to the user as one line, without a traceback."""
from __future__ import annotations


class MmkitError(Exception):
    """Base of the errors the command-line entry points print as a single line."""


class ConfigError(MmkitError, ValueError):
    """A config value is wrong; the message names the key at fault."""


class DataError(MmkitError):
    """Input data cannot be used; the message names the file or sample at fault."""


class TrainingError(MmkitError):
    """Training cannot go on (e.g. the loss stayed non-finite); the message says what was kept."""
