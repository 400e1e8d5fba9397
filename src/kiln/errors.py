"""Errors a user can cause. The CLI prints them without a traceback and exits 2.

Every message says what is wrong, where (key path, file, offset) and what to do about it.
"""

from __future__ import annotations


class KilnError(Exception):
    """Base class of every error a user can cause and fix."""


class ConfigError(KilnError):
    """The configuration is invalid: unknown key, wrong type or out-of-range value."""


class DataError(KilnError):
    """Training data is missing, empty or corrupt."""


class CheckpointError(KilnError):
    """No valid checkpoint can be loaded, or one is corrupt."""


class ExportError(KilnError):
    """An export bundle cannot be written or fails verification."""


class RunError(KilnError):
    """A run directory is missing, malformed or in a state that forbids the command."""
