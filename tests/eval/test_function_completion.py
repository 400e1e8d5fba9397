"""Function prompts from held-out code, and where a generated function ends."""

from __future__ import annotations

from kiln.eval.compile_check import compiles
from kiln.eval.function_completion import function_prompts, function_sample

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
