"""Byte-level BPE tokenizer: every string round-trips exactly, special tokens have fixed ids."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Sequence
from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

from kiln.errors import DataError
from kiln.fsio import atomic_write

EOT = "<|endoftext|>"
PAD = "<|pad|>"
FIM_PREFIX = "<|fim_prefix|>"
FIM_MIDDLE = "<|fim_middle|>"
FIM_SUFFIX = "<|fim_suffix|>"
REASONING = "<|reasoning|>"
ANSWER = "<|answer|>"
# Reserved first, in this order, so their ids are 0..6 in every tokenizer.
SPECIAL_TOKENS = (EOT, PAD, FIM_PREFIX, FIM_MIDDLE, FIM_SUFFIX, REASONING, ANSWER)
# The BPE trainer's time grows with the square of a word's length (a 300 KB run of one letter
# takes a minute, 3 MB hours), so runs of this many non-space or space characters are cut into
# separate words first. No file of the default corpus has such a run; minified or encoded blobs
# in a user's corpus do.
MAX_WORD_CHARS = 256


def _byte_level_chars() -> dict[str, int]:
    """Which byte each character of a byte-level token stands for.

    Byte-level BPE writes every byte as a printable character: the bytes that already are
    printable Latin-1 characters stand for themselves, the other 68 take the code points from
    256 upwards, in byte order.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1)]
    printable += range(ord("®"), ord("ÿ") + 1)
    others = [b for b in range(256) if b not in printable]
    chars = {chr(b): b for b in printable}
    chars |= {chr(256 + n): b for n, b in enumerate(others)}
    return chars


# str.translate table: a token's characters to the Latin-1 characters of its bytes.
_TOKEN_CHARS_TO_LATIN1 = str.maketrans({ch: chr(b) for ch, b in _byte_level_chars().items()})


class KilnTokenizer:
    """A ``tokenizers.Tokenizer`` with Kiln's invariants checked on construction."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        for expected, token in enumerate(SPECIAL_TOKENS):
            if tokenizer.token_to_id(token) != expected:
                raise ValueError(f"special token {token!r} must have id {expected}")
        # Text that merely contains "<|endoftext|>" (this very file, say) is encoded as plain
        # bytes; only the data pipeline inserts real special ids. Not serialized, so set here.
        tokenizer.encode_special_tokens = True
        self._tok = tokenizer

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` (no special tokens added)."""
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids of each text, in order (encoded in parallel by the Rust library)."""
        return [e.ids for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Iterable[int]) -> str:
        """The text of ``ids``; special tokens decode to their literal strings."""
        return self._tok.decode(list(ids), skip_special_tokens=False)

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        """The exact bytes of regular (not special) tokens ``ids``.

        Unlike :meth:`decode`, a character cut by the edge of a token range stays as its raw
        bytes instead of becoming U+FFFD, so a caller can tell a cut from a real U+FFFD.
        """
        text = "".join(self._tok.id_to_token(i) for i in ids)
        return text.translate(_TOKEN_CHARS_TO_LATIN1).encode("latin-1")

    @property
    def vocab_size(self) -> int:
        """Number of ids, special tokens included."""
        return self._tok.get_vocab_size(with_added_tokens=True)

    @property
    def eot_id(self) -> int:
        """Id of the end-of-text token that separates documents."""
        return self.token_id(EOT)

    @property
    def pad_id(self) -> int:
        """Id of the padding token."""
        return self.token_id(PAD)

    def token_id(self, special: str) -> int:
        """Id of one of :data:`SPECIAL_TOKENS`."""
        if special not in SPECIAL_TOKENS:
            raise ValueError(f"{special!r} is not one of {SPECIAL_TOKENS}")
        return SPECIAL_TOKENS.index(special)

    def to_json_str(self) -> str:
        """The tokenizer.json text."""
        return self._tok.to_str()

    def fingerprint(self) -> str:
        """SHA-256 of the canonical JSON (sorted keys, no whitespace): stable across formatting."""
        canonical = json.dumps(
            json.loads(self.to_json_str()),
            sort_keys=True,
            separators=(",", ":"),
            ensure_ascii=False,
        )
        return hashlib.sha256(canonical.encode("utf-8")).hexdigest()

    def save(self, path: Path) -> None:
        """Write tokenizer.json to the file ``path`` atomically."""
        atomic_write(Path(path), self.to_json_str())

    @classmethod
    def load(cls, path: Path) -> KilnTokenizer:
        """Read a tokenizer.json file written by :meth:`save`."""
        try:
            text = Path(path).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise DataError(
                f"cannot read tokenizer {path} ({exc}); rebuild the token cache"
            ) from exc
        try:
            return cls(Tokenizer.from_str(text))
        except Exception as exc:  # the Rust parser raises plain Exception on bad JSON
            raise DataError(
                f"tokenizer {path} is corrupt or not a Kiln tokenizer ({exc}); "
                "delete it and rebuild the token cache"
            ) from exc


def train_tokenizer(texts: Iterable[str], vocab_size: int, min_frequency: int) -> KilnTokenizer:
    """Train byte-level BPE on ``texts`` (streamed).

    Deterministic: the trainer breaks count ties by pair id and ids follow the fixed byte
    alphabet, so the same texts in the same order give a byte-identical tokenizer.json whatever
    the thread count (checked across processes and RAYON_NUM_THREADS values).
    """
    tok = Tokenizer(models.BPE())
    long_run = Regex(rf"\S{{{MAX_WORD_CHARS}}}|\s{{{MAX_WORD_CHARS}}}")
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(long_run, behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return KilnTokenizer(tok)
