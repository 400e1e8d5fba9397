"""Byte-level BPE: exact round trips, fixed special ids, deterministic training, save/load."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer
from tokenizers.pre_tokenizers import ByteLevel

from kiln.config import TokenizerSection
from kiln.data.tokenizer import (
    ANSWER,
    EOT,
    FIM_MIDDLE,
    FIM_PREFIX,
    FIM_SUFFIX,
    MAX_WORD_CHARS,
    PAD,
    REASONING,
    SPECIAL_TOKENS,
    KilnTokenizer,
    train_tokenizer,
)
from kiln.errors import DataError


def _texts(n: int = 60) -> list[str]:
    return [
        f"def function_{i}(value, other={i}):\n"
        f'    """Return the sum of value and {i}."""\n'
        f"    result = value + other * {i % 7}\n"
        f"    if result > {i}:\n        return result\n    return None\n"
        for i in range(n)
    ]


@pytest.fixture(scope="module")
def tok() -> KilnTokenizer:
    return train_tokenizer(_texts(), vocab_size=400, min_frequency=2)


TRICKY = [
    "",
    " ",
    "\t\n\r\n  \n",
    "  leading and trailing  ",
    "héllo wörld 日本語 😀 \u200b e\u0301",
    "\x00\x01\x7f\ufeff",
    "def f(x):\n\treturn x  # tab\n",
    f"literal {EOT} and {PAD} inside text",
    "x = '" + "A" * 3 * MAX_WORD_CHARS + "'" + " " * 2 * MAX_WORD_CHARS + "\n",
]


@pytest.mark.parametrize("text", TRICKY)
def test_round_trip(tok: KilnTokenizer, text: str) -> None:
    assert tok.decode(tok.encode(text)) == text


@settings(max_examples=200, deadline=None)
@given(st.text())
def test_round_trip_any_text(tok: KilnTokenizer, text: str) -> None:
    assert tok.decode(tok.encode(text)) == text


def test_long_runs_are_cut_into_words_the_trainer_can_afford(tok: KilnTokenizer) -> None:
    # Training time grows with the square of a word's length: a blob must not be one word.
    blob = "a" * (2 * MAX_WORD_CHARS + 10) + " " * (MAX_WORD_CHARS + 1)
    pre_tokenizer = Tokenizer.from_str(tok.to_json_str()).pre_tokenizer
    words = [word for word, _ in pre_tokenizer.pre_tokenize_str(blob)]
    assert max(len(word) for word in words) <= MAX_WORD_CHARS
    # Ordinary code is not affected: the same words as byte-level splitting alone.
    code = _texts(1)[0]
    plain = [w for w, _ in ByteLevel(add_prefix_space=False).pre_tokenize_str(code)]
    assert [word for word, _ in pre_tokenizer.pre_tokenize_str(code)] == plain


def test_special_tokens(tok: KilnTokenizer) -> None:
    assert SPECIAL_TOKENS == (EOT, PAD, FIM_PREFIX, FIM_MIDDLE, FIM_SUFFIX, REASONING, ANSWER)
    assert [tok.token_id(s) for s in SPECIAL_TOKENS] == list(range(7))
    assert (tok.eot_id, tok.pad_id) == (0, 1)
    assert tok.decode([tok.eot_id]) == EOT
    # Special strings inside source text are plain text, never control tokens.
    assert not set(tok.encode(f"a {EOT} b {FIM_MIDDLE} {ANSWER}")) & set(range(7))
    # The schema's smallest vocabulary holds the bytes and every special token.
    assert TokenizerSection.model_fields["vocab_size"].metadata[0].ge == 256 + len(SPECIAL_TOKENS)
    with pytest.raises(ValueError):
        tok.token_id("<|nope|>")


def test_decode_bytes_gives_every_byte_exactly(tok: KilnTokenizer) -> None:
    vocab = Tokenizer.from_str(tok.to_json_str()).get_vocab()
    # Characters whose UTF-8 holds every byte a valid text can hold (leads and continuations).
    codes = [*range(0x800), *range(0x800, 0xD800, 331), *range(0xE000, 0x10000, 331)]
    text = "".join(map(chr, [*codes, 0x10000, 0x40000, 0x80000, 0xC0000, 0x10FFFF]))
    assert {b for ch in text for b in ch.encode()} == set(range(256)) - {
        0xC0,
        0xC1,
        *range(0xF5, 256),
    }
    # The byte-level characters the library itself makes, one token each, decode to the bytes.
    pieces = ByteLevel(add_prefix_space=False, use_regex=False).pre_tokenize_str(text)
    ids = [vocab[ch] for piece, _ in pieces for ch in piece]
    assert tok.decode_bytes(ids) == text.encode("utf-8")
    # The alphabet's 256 one-character tokens are 256 different bytes (invalid ones included).
    alphabet = [vocab[ch] for ch in ByteLevel.alphabet()]
    assert sorted(b for i in alphabet for b in tok.decode_bytes([i])) == list(range(256))
    assert tok.decode_bytes(tok.encode("é"))[:1] == b"\xc3"  # half a character: raw bytes


def test_vocab_and_batch(tok: KilnTokenizer) -> None:
    assert 256 + len(SPECIAL_TOKENS) < tok.vocab_size <= 400
    texts = _texts(5)
    assert tok.encode_batch(texts) == [tok.encode(t) for t in texts]
    # Merges were learned: common code compresses well below one token per byte.
    assert len(tok.encode(texts[0])) < len(texts[0].encode()) / 2


def test_training_is_deterministic(tok: KilnTokenizer) -> None:
    again = train_tokenizer(iter(_texts()), vocab_size=400, min_frequency=2)
    assert again.to_json_str() == tok.to_json_str()
    assert again.fingerprint() == tok.fingerprint()
    other = train_tokenizer(_texts()[::-1][:30], vocab_size=400, min_frequency=2)
    assert other.fingerprint() != tok.fingerprint()


def test_save_load(tok: KilnTokenizer, tmp_path: Path) -> None:
    path = tmp_path / "tokenizer.json"
    tok.save(path)
    loaded = KilnTokenizer.load(path)
    assert loaded.to_json_str() == tok.to_json_str() == path.read_text(encoding="utf-8")
    assert loaded.fingerprint() == tok.fingerprint()
    assert loaded.encode(f"x {EOT} y") == tok.encode(f"x {EOT} y")
    assert [p.name for p in tmp_path.iterdir()] == ["tokenizer.json"]  # no temp file left


def test_load_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="cannot read"):
        KilnTokenizer.load(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text('{"version": "1.0", "model": ', encoding="utf-8")
    with pytest.raises(DataError, match="corrupt"):
        KilnTokenizer.load(bad)
    # A valid tokenizer.json whose special tokens are not Kiln's is rejected too.
    foreign = train_tokenizer(["abc abc"], vocab_size=300, min_frequency=1).to_json_str()
    (tmp_path / "foreign.json").write_text(foreign.replace(EOT, "<|other|>"), encoding="utf-8")
    with pytest.raises(DataError, match="not a Kiln tokenizer"):
        KilnTokenizer.load(tmp_path / "foreign.json")
