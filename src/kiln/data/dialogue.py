"""Dialogue pairs for the lattice job: JSON Lines of ``{"question": ..., "answer": ...}``.

The packaged set (``dialogue_path: packaged``) is made by ``tools/make_dialogue_pairs.py`` from
the Python standard library's docstrings. Bad lines are DataErrors naming the file and line.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from kiln.data.jsonl import jsonl_source, string_records
from kiln.errors import DataError

PACKAGED_DIALOGUE = "packaged"
DIALOGUE_FIELDS = ("question", "answer")


@dataclass(frozen=True)
class DialoguePair:
    question: str
    answer: str


def load_dialogue_pairs(path: str) -> list[DialoguePair]:
    """Pairs of a JSONL file (``packaged``: Kiln's own set); at least two are needed."""
    where, text = jsonl_source(
        path,
        (PACKAGED_DIALOGUE, "examples/dialogue_stdlib.jsonl"),
        "dialogue pairs",
        "fix lattice.dialogue_path",
    )
    pairs = [DialoguePair(**record) for _, record in string_records(text, where, DIALOGUE_FIELDS)]
    if len(pairs) < 2:
        raise DataError(
            f"{where} holds {len(pairs)} dialogue pair(s); at least 2 are needed (one to train "
            "on, one to validate)"
        )
    return pairs


def split_pairs(
    pairs: list[DialoguePair], val_fraction: float, seed: int
) -> tuple[list[DialoguePair], list[DialoguePair]]:
    """A seeded train/validation split; each side keeps at least one pair."""
    order = np.random.Generator(np.random.PCG64([seed, 0x1A77])).permutation(len(pairs))
    n_val = min(len(pairs) - 1, max(1, round(val_fraction * len(pairs))))
    val = sorted(order[:n_val].tolist())
    train = sorted(order[n_val:].tolist())
    return [pairs[i] for i in train], [pairs[i] for i in val]
