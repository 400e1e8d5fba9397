"""Dialogue pairs: the packaged set, its generator, validation errors and the split."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from kiln.data.dialogue import DialoguePair, load_dialogue_pairs, split_pairs
from kiln.errors import DataError

TOOL = Path(__file__).resolve().parents[2] / "tools" / "make_dialogue_pairs.py"


def test_packaged_pairs_are_many_real_and_distinct() -> None:
    pairs = load_dialogue_pairs("packaged")
    assert len(pairs) >= 500
    assert len({p.answer for p in pairs}) == len(pairs)
    assert DialoguePair(
        "What does the function json.dumps do?", "Serialize ``obj`` to a JSON formatted ``str``."
    ) in pairs


@pytest.mark.skipif(sys.version_info[:2] != (3, 11), reason="the set is made from 3.11 docstrings")
def test_packaged_pairs_match_their_generator() -> None:
    check = subprocess.run(
        [sys.executable, str(TOOL), "--check"], capture_output=True, text=True, check=False
    )
    assert check.returncode == 0, check.stdout


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("{not json", "line 2: not valid JSON"),
        ('["q"]', "line 2: expected a JSON object with question, answer"),
        ('{"question": "q", "answer": 3}', "line 2: field 'answer' must be a non-empty string"),
        ('{"question": "q"}', "line 2: field 'answer' is missing"),
        # Exactly the two fields, as the README says: extra ones are rejected, not ignored.
        ('{"question": "q", "answer": "a", "id": 7}',
         "line 2: field 'id' is not known; the fields are question, answer"),
        ('{"question": "q", "answer": "a", "topic": "x"}', "line 2: field 'topic' is not known"),
    ],
)
def test_bad_lines_name_file_line_and_problem(tmp_path: Path, line: str, message: str) -> None:
    path = tmp_path / "pairs.jsonl"
    path.write_text('{"question": "q1", "answer": "a1"}\n' + line + "\n", encoding="utf-8")
    with pytest.raises(DataError) as err:
        load_dialogue_pairs(str(path))
    assert str(path) in str(err.value) and message in str(err.value)


def test_too_few_pairs_and_missing_file_are_data_errors(tmp_path: Path) -> None:
    one = tmp_path / "one.jsonl"
    one.write_text('{"question": "q", "answer": "a"}\n', encoding="utf-8")
    with pytest.raises(DataError, match="holds 1 dialogue pair"):
        load_dialogue_pairs(str(one))
    with pytest.raises(DataError, match=r"fix lattice\.dialogue_path"):
        load_dialogue_pairs(str(tmp_path / "absent.jsonl"))


def test_split_is_seeded_disjoint_and_complete() -> None:
    pairs = [DialoguePair(f"q{i}", f"a{i}") for i in range(50)]
    train, val = split_pairs(pairs, 0.2, seed=4)
    assert (train, val) == split_pairs(pairs, 0.2, seed=4)
    assert len(val) == 10 and sorted(train + val, key=pairs.index) == pairs
    assert split_pairs(pairs, 0.2, seed=5)[1] != val
    assert len(split_pairs(pairs[:2], 0.9, seed=0)[0]) == 1  # each side keeps a pair
