"""Function prompts from held-out code, and where a generated function ends."""

from __future__ import annotations

import pytest

from kiln.eval.compile_check import compiles
from kiln.eval.function_completion import function_prompts, function_sample, has_body

SOURCE = '''import os

def plain(a, b):
    return a + b

class Thing:
    def method(self, x):
        """Scale x.

        By two.
        """
        return 2 * x

    async def fetch(self) -> int:  # trailing comment
        return 1

def broken(x):
    """never closed
'''


def test_prompts_are_dedented_signatures_with_their_docstrings() -> None:
    prompts = function_prompts([SOURCE], count=10, seed=0)
    assert prompts == [
        "def plain(a, b):\n",
        'def method(self, x):\n    """Scale x.\n\n    By two.\n    """\n',
        "async def fetch(self) -> int:  # trailing comment\n",
    ]


def test_prompts_are_a_seeded_sample() -> None:
    docs = [f"def f{i}(x):\n    return x\n" for i in range(50)]
    a = function_prompts(docs, count=5, seed=1)
    assert len(a) == 5 and a == function_prompts(docs, count=5, seed=1)
    assert a != function_prompts(docs, count=5, seed=2)


def test_sample_ends_where_the_function_ends() -> None:
    prompt = "def f(x):\n"
    completion = "    y = x + 1\n\n    return y\nprint(f(2))\nimport os\n"
    sample = function_sample(prompt, completion, finished=True)
    assert sample == "def f(x):\n    y = x + 1\n\n    return y\n"
    assert compiles(sample)


def test_an_unfinished_completion_loses_its_cut_last_line() -> None:
    sample = function_sample("def f(x):\n", "    return x\n    if x ==", finished=False)
    assert sample == "def f(x):\n    return x\n"
    assert compiles(sample)


def test_generating_nothing_does_not_compile() -> None:
    assert not compiles(function_sample("def f(x):\n", "", finished=True))
    assert not compiles(function_sample("def f(x):\n", "x = 1\n", finished=True))


def test_an_unfinished_single_line_is_cut_too() -> None:
    # "    return x" may be the start of "    return x * 2": no complete line, no body.
    sample = function_sample("def f(x):\n", "    return x", finished=False)
    assert sample == "def f(x):\n\n"
    assert not compiles(sample)


@pytest.mark.parametrize(
    "completion", ["", "\n\n", "    # todo\n", "x = 1\n", "\ndef g():\n    pass\n"]
)
def test_generating_nothing_after_a_docstring_does_not_count(completion: str) -> None:
    # The docstring alone is a valid body, so compiling is not enough: the model wrote nothing.
    prompt = 'def f(x):\n    """Double x."""\n'
    sample = function_sample(prompt, completion, finished=True)
    assert sample.startswith(prompt)
    assert not has_body(prompt, sample)


def test_a_written_body_counts() -> None:
    prompt = 'def f(x):\n    """Double x."""\n'
    sample = function_sample(prompt, "    return 2 * x\nprint(f(1))\n", finished=True)
    assert sample == prompt + "    return 2 * x\n"
    assert has_body(prompt, sample) and compiles(sample)
    # A prompt that ends inside a line is continued by the completion's first line.
    sample = function_sample("def f(x):\n    ", "return 2 * x\n", finished=True)
    assert sample == "def f(x):\n    return 2 * x\n"
    assert has_body("def f(x):\n    ", sample)


def test_a_docstring_further_left_than_its_method_still_gives_a_dedented_prompt() -> None:
    source = 'class A:\n    def run(self):\n        """Run.\n\nDetails at column 0.\n"""\n'
    (prompt,) = function_prompts([source], count=5, seed=0)
    assert prompt == 'def run(self):\n    """Run.\n\nDetails at column 0.\n"""\n'
    assert compiles(prompt + "    return 1\n")
