"""Compile rate: accepted, rejected and pathological sources; nothing is ever executed."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest

from kiln.eval.compile_check import compile_rate, compiles


@pytest.mark.parametrize(
    "source",
    [
        "",
        "x = 1\n",
        "def f(a, b):\n    return a + b\n",
        "class A:\n    pass\n",
        "async def g():\n    await h()\n",
        "x = undefined_name + 1\n",  # names are resolved at run time, not at compile time
        'pattern = "\\d+"\n',  # invalid escape: a warning, still valid code
    ],
)
def test_valid_sources_compile(source: str) -> None:
    assert compiles(source) is True


@pytest.mark.parametrize(
    "source",
    [
        "def f(:\n",
        "def f():\nreturn 1\n",  # IndentationError
        "if True:\n\tx = 1\n        y = 2\n",  # TabError / inconsistent indentation
        "x = (1,\n",
        "return 5\n",  # 'return' outside function
        "x = 1\x00\n",  # NUL byte: ValueError on Python < 3.12, SyntaxError later
        "from __future__ import braces\n",
        "(" * 5000 + ")" * 5000,  # too deeply nested for the parser
        "x = " + "9" * 5000 + "\n",  # over the int-string conversion limit
    ],
)
def test_invalid_sources_do_not_compile(source: str) -> None:
    assert compiles(source) is False


def test_huge_flat_expression_returns_a_bool_without_raising() -> None:
    assert isinstance(compiles("x = " + " + ".join(["1"] * 100_000) + "\n"), bool)
    assert compiles("x = [" + "[" * 300 + "]" * 300 + "]\n") in (True, False)


def test_warnings_are_suppressed_even_when_they_are_errors() -> None:
    source = 'pattern = "\\d+"\nassert (1, "never a tuple check")\n'
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("error")
        assert compiles(source) is True
    assert caught == []


def test_source_is_compiled_but_never_run(tmp_path: Path) -> None:
    target = tmp_path / "should_not_exist.txt"
    assert compiles(f"open({str(target)!r}, 'w').write('ran')\nraise SystemExit(3)\n") is True
    assert not target.exists()


def test_compile_rate_is_the_fraction_of_compiling_samples() -> None:
    samples = ["x = 1\n", "def (\n", "y = 2\n", "z = '\x00'\n"]
    assert compile_rate(samples) == 0.5
    assert compile_rate(iter(["a = 1", "b = 2"])) == 1.0
    assert compile_rate(["?"]) == 0.0


def test_compile_rate_rejects_empty_input_and_non_text() -> None:
    with pytest.raises(ValueError, match="at least one sample"):
        compile_rate([])
    with pytest.raises(TypeError, match="str"):
        compiles(b"x = 1")  # type: ignore[arg-type]
