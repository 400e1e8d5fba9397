"""FIM and chain-of-thought transforms: what the model sees, token weights, determinism."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from kiln.data.objectives import (
    COT,
    FIM,
    NEXT_TOKEN,
    CodeWindows,
    ComponentWeights,
    CotData,
    CotRecord,
    CotWeights,
    CotWindows,
    FimSpec,
    infill_prompt,
    load_cot_records,
    render_cot,
    split_cot_records,
)
from kiln.data.tokenizer import (
    ANSWER,
    EOT,
    FIM_MIDDLE,
    FIM_PREFIX,
    FIM_SUFFIX,
    PAD,
    REASONING,
    KilnTokenizer,
    train_tokenizer,
)
from kiln.errors import DataError

DOCS = [
    f"def helper_{i}(items, scale={i}):\n    total = 0\n    for item in items:\n"
    f"        total += item * scale\n    return total  # café {i}\n"
    for i in range(40)
]


@pytest.fixture(scope="module")
def tok() -> KilnTokenizer:
    return train_tokenizer(DOCS, vocab_size=400, min_frequency=2)


def window_of(tok: KilnTokenizer, docs: list[str], length: int) -> np.ndarray:
    ids: list[int] = []
    for doc in docs:
        ids += [*tok.encode(doc), tok.eot_id]
    assert len(ids) >= length
    return np.array(ids[:length], dtype=np.uint16)


def rebuild_fim_fragment(tok: KilnTokenizer, ids: list[int]) -> tuple[str, str]:
    """The original text of one transformed fragment, and its format (psm or spm)."""
    pre, suf, mid = (tok.token_id(t) for t in (FIM_PREFIX, FIM_SUFFIX, FIM_MIDDLE))
    assert ids[0] == pre
    if ids[1] == suf:  # SPM: PRE SUF suffix MID prefix+middle
        m = ids.index(mid)
        return tok.decode(ids[m + 1 :]) + tok.decode(ids[2:m]), "spm"
    s, m = ids.index(suf), ids.index(mid)
    return tok.decode(ids[1:s]) + tok.decode(ids[m + 1 :]) + tok.decode(ids[s + 1 : m]), "psm"


def test_without_fim_the_window_is_unchanged(tok: KilnTokenizer) -> None:
    window = window_of(tok, DOCS[:6], 129)
    out = CodeWindows(tok, ComponentWeights(next_token=0.5), FimSpec(rate=0.0), seed=1)(
        window, 0, 3
    )
    assert out["tokens"].tolist() == window.tolist()
    assert out["weights"].shape == out["components"].shape == (128,)
    assert set(out["weights"].tolist()) == {0.5}
    assert set(out["components"].tolist()) == {NEXT_TOKEN}


def test_fim_keeps_length_and_every_fragment_rebuilds_its_text(tok: KilnTokenizer) -> None:
    window = window_of(tok, [DOCS[0], DOCS[1], DOCS[2] * 20], 400)
    formats = set()
    for window_id in range(20):
        out = CodeWindows(tok, ComponentWeights(), FimSpec(rate=1.0, spm_rate=0.5), seed=3)(
            window, 0, window_id
        )
        tokens = out["tokens"].tolist()
        assert len(tokens) == len(window)
        ends = [i for i, t in enumerate(tokens) if t == tok.eot_id]
        # The first two documents fit whole: each transformed fragment holds exactly its text.
        first, second = tokens[: ends[0]], tokens[ends[0] + 1 : ends[1]]
        for fragment, doc in ((first, DOCS[0]), (second, DOCS[1])):
            text, fmt = rebuild_fim_fragment(tok, fragment)
            assert text == doc
            formats.add(fmt)
        assert set(out["components"][: ends[1]].tolist()) == {FIM}
    assert formats == {"psm", "spm"}


def test_fim_is_a_pure_function_of_seed_epoch_and_window(tok: KilnTokenizer) -> None:
    window = window_of(tok, DOCS[:8], 257)
    make = lambda seed: CodeWindows(tok, ComponentWeights(), FimSpec(rate=0.5), seed)  # noqa: E731
    a = make(7)(window, 2, 11)["tokens"]
    assert np.array_equal(a, make(7)(window, 2, 11)["tokens"])
    others = [make(7)(window, 3, 11)["tokens"], make(8)(window, 2, 11)["tokens"]]
    assert all(not np.array_equal(a, o) for o in others)
    validation = CodeWindows(tok, ComponentWeights(), FimSpec(rate=0.5), 7, validation=True)
    assert not np.array_equal(a, validation(window, 2, 11)["tokens"])


def test_fim_and_spm_rates_are_respected(tok: KilnTokenizer) -> None:
    window = window_of(tok, DOCS[:4], 120)  # four fragments per window
    windows = CodeWindows(tok, ComponentWeights(), FimSpec(rate=0.3, spm_rate=0.8), seed=0)
    fragments = transformed = spm = 0
    formats_seen = 0
    for window_id in range(400):
        tokens = windows(window, 0, window_id)["tokens"].tolist()
        pieces = np.split(np.array(tokens), np.flatnonzero(np.array(tokens) == tok.eot_id))
        for piece in pieces:
            piece = piece[piece != tok.eot_id]
            if len(piece) == 0:
                continue
            fragments += 1
            if piece[0] == tok.token_id(FIM_PREFIX):
                transformed += 1
                if len(piece) > 1:  # the window's end can cut a fragment right after PRE
                    formats_seen += 1
                    spm += int(piece[1] == tok.token_id(FIM_SUFFIX))
    assert transformed / fragments == pytest.approx(0.3, abs=0.05)
    assert spm / formats_seen == pytest.approx(0.8, abs=0.06)


def test_fim_tokens_take_the_fim_weight_and_padding_is_not_trained(tok: KilnTokenizer) -> None:
    # One short document filling the window: FIM re-tokenization may shorten it, which pads.
    window = window_of(tok, [DOCS[0], DOCS[1]], 60)
    weights = ComponentWeights(next_token=1.0, fim=0.25)
    for window_id in range(30):
        out = CodeWindows(tok, weights, FimSpec(rate=1.0), seed=5)(window, 0, window_id)
        targets = out["tokens"][1:]
        pad = targets == tok.token_id(PAD)
        assert np.all(out["weights"][pad] == 0.0)
        fim = (out["components"] == FIM) & ~pad
        assert np.all(out["weights"][fim] == 0.25)


def test_a_window_edge_inside_a_character_is_dropped_not_garbled(tok: KilnTokenizer) -> None:
    ids = tok.encode("é" * 30)
    cut = np.array(ids[1:], dtype=np.int64)  # may start inside the two-byte character
    out = CodeWindows(tok, ComponentWeights(), FimSpec(rate=1.0), seed=0)(cut, 0, 0)
    text, _ = rebuild_fim_fragment(tok, out["tokens"][out["tokens"] != tok.pad_id].tolist())
    assert "\ufffd" not in text and set(text) <= {"é"}


def test_a_real_replacement_character_at_a_fragment_edge_is_kept(tok: KilnTokenizer) -> None:
    text = "\ufffd = 'é'\ufffd"
    window = window_of(tok, [text, DOCS[0]], len(tok.encode(text)) + 20)
    out = CodeWindows(tok, ComponentWeights(), FimSpec(rate=1.0), seed=0)(window, 0, 0)
    tokens = out["tokens"].tolist()
    rebuilt, _ = rebuild_fim_fragment(tok, tokens[: tokens.index(tok.eot_id)])
    assert rebuilt == text


def test_infill_prompt_is_psm_ending_in_the_middle_sentinel(tok: KilnTokenizer) -> None:
    ids = infill_prompt(tok, "def f(x):\n", "\n    return y\n")
    assert ids[0] == tok.token_id(FIM_PREFIX) and ids[-1] == tok.token_id(FIM_MIDDLE)
    assert tok.token_id(FIM_SUFFIX) in ids


# ---------------------------------------------------------------------- chain of thought

RECORD = CotRecord("What is 2 + 3?", "Two plus three is five.", "5")


def test_render_cot_marks_each_part_with_its_role(tok: KilnTokenizer) -> None:
    tokens, roles = render_cot(tok, RECORD)
    reasoning_at = tokens.index(tok.token_id(REASONING))
    answer_at = tokens.index(tok.token_id(ANSWER))
    assert tok.decode(tokens[:reasoning_at]) == RECORD.prompt
    assert tok.decode(tokens[reasoning_at + 1 : answer_at]) == RECORD.reasoning
    assert tok.decode(tokens[answer_at + 1 : -1]) == RECORD.answer
    assert tokens[-1] == tok.token_id(EOT)
    assert roles == [0] * reasoning_at + [1] * (answer_at - reasoning_at) + [2] * (
        len(tokens) - answer_at
    )


def test_cot_windows_weight_tokens_by_role(tok: KilnTokenizer) -> None:
    data = CotData.build(tok, [RECORD] * 6)
    windows = CotWindows(
        data, 16, CotWeights(prompt=0.0, reasoning=0.5, answer=2.0), ComponentWeights(cot=3.0)
    )
    window = data.stream.read(16, 17)
    out = windows(window, 0, 1)
    roles = data.roles[17:33]  # the roles of the window's targets
    expected = np.array([0.0, 1.5, 6.0], dtype=np.float32)[roles]
    assert np.array_equal(out["weights"], expected)
    assert set(out["components"].tolist()) == {COT}


def test_packaged_examples_load_and_match_their_generator() -> None:
    records = load_cot_records("examples")
    assert len(records) >= 300
    assert all(r.prompt and r.reasoning and r.answer for r in records)
    tool = Path(__file__).resolve().parents[2] / "tools" / "make_cot_examples.py"
    check = subprocess.run(
        [sys.executable, str(tool), "--check"], capture_output=True, text=True, check=False
    )
    assert check.returncode == 0, check.stdout


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("{not json", "line 2: not valid JSON"),
        ('["a"]', "line 2: expected a JSON object with prompt, reasoning, answer"),
        ('{"prompt": "p", "reasoning": 3, "answer": "a"}', "'reasoning' must be a non-empty"),
        ('{"prompt": "p", "answer": "a"}', "field 'reasoning' is missing"),
        ('{"prompt": "p", "reasoning": "r", "answer": "a", "x": 1}', "field 'x' is not known"),
    ],
)
def test_bad_cot_lines_name_file_line_and_problem(tmp_path: Path, line: str, message: str) -> None:
    path = tmp_path / "cot.jsonl"
    good = json.dumps({"prompt": "p", "reasoning": "r", "answer": "a"})
    path.write_text(f"{good}\n{line}\n")
    with pytest.raises(DataError, match=re.escape(message)) as err:
        load_cot_records(str(path))
    assert str(path) in str(err.value)


def test_missing_or_empty_cot_file(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"objectives\.cot\.path"):
        load_cot_records(str(tmp_path / "missing.jsonl"))
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(DataError, match="no chain-of-thought records"):
        load_cot_records(str(tmp_path / "empty.jsonl"))


def test_cot_split_is_seeded_disjoint_and_complete() -> None:
    records = [CotRecord(str(i), "r", "a") for i in range(50)]
    train, val = split_cot_records(records, 0.1, seed=4)
    assert len(val) == 5 and len(train) == 45
    assert sorted(r.prompt for r in train + val) == sorted(r.prompt for r in records)
    assert (train, val) == split_cot_records(records, 0.1, seed=4)
    assert val != split_cot_records(records, 0.1, seed=5)[1]
