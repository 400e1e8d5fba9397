"""Compile rate: the share of generated programs that Python's compiler accepts.

Compiling parses the source and builds a code object; it never runs any of it, so this check is
safe on untrusted model output and needs no sandbox.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable

# Everything compile() raises for bad *input* rather than for a bug in Kiln: syntax and indentation
# errors, ValueError for NUL bytes (Python < 3.12), and recursion or memory errors from deeply
# nested or enormous expressions.
_REJECTIONS = (SyntaxError, ValueError, OverflowError, RecursionError, MemoryError)


def compiles(source: str) -> bool:
    """Whether ``source`` compiles as a Python module. The code is compiled, never executed."""
    if not isinstance(source, str):
        raise TypeError(f"compiles() takes source text (str), got {type(source).__name__}")
    try:
        # Warnings such as "invalid escape sequence" are noise here, and under `-W error` they
        # would turn into SyntaxErrors and count valid code as broken.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            compile(source, "<sample>", "exec", dont_inherit=True)
    except _REJECTIONS:
        return False
    return True


def compile_rate(samples: Iterable[str]) -> float:
    """Fraction of ``samples`` (full program texts) that compile; raises ValueError when empty."""
    total = accepted = 0
    for source in samples:
        total += 1
        accepted += compiles(source)
    if total == 0:
        raise ValueError("compile_rate() needs at least one sample")
    return accepted / total
