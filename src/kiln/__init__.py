"""Kiln: reproducible, resumable, memory-bounded training."""

__version__ = "0.1.0"
