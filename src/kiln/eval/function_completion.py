"""Function-completion prompts from held-out code, and where a generated function ends.

A compile-rate prompt is a function's signature line (dedented, so a method becomes a plain
function) plus its docstring when it has one; the model must write the body. A generated sample
ends at the first non-blank line back at column 0 (the function is over), at the end of the text,
or, when generation ran out of tokens, at the last complete line. A prompt with a docstring already
compiles on its own, so a sample counts only if its body holds a statement (``body_compiles``): the
metric cannot be passed by generating nothing.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

import numpy as np

from kiln.eval.compile_check import compiles

_SIGNATURE = re.compile(r"^[ \t]*(async[ \t]+)?def[ \t]+\w+[ \t]*\(.*\).*:[ \t]*(#.*)?$")
_DOCSTRING_OPEN = re.compile(r'^[ \t]*[rRbBuU]?("""|\'\'\')')


def function_prompts(documents: Iterable[str], count: int, seed: int) -> list[str]:
    """Up to ``count`` prompts drawn (seeded, without replacement) from the documents' functions."""
    candidates = [p for text in documents for p in _prompts_in(text)]
    if len(candidates) <= count:
        return candidates
    rng = np.random.Generator(np.random.PCG64(seed))
    return [candidates[i] for i in sorted(rng.choice(len(candidates), count, replace=False))]


def _prompts_in(text: str) -> list[str]:
    lines = text.splitlines()
    prompts = []
    for i, line in enumerate(lines):
        match = _SIGNATURE.match(line)
        if match is None:
            continue
        end = i + 1
        if end < len(lines) and _DOCSTRING_OPEN.match(lines[end]):
            end = _docstring_end(lines, end)
            if end is None:
                continue
        # Dedent by the signature's indent: textwrap.dedent would keep it whenever a docstring
        # line sits further left, and an indented prompt can never compile.
        indent = line[: len(line) - len(line.lstrip())]
        block = [text[len(indent) :] if text.startswith(indent) else text for text in lines[i:end]]
        prompts.append("\n".join(block) + "\n")
    return prompts


def _docstring_end(lines: list[str], start: int) -> int | None:
    """Index after the docstring that opens on ``lines[start]``; None if it never closes."""
    quote = _DOCSTRING_OPEN.match(lines[start]).group(1)  # type: ignore[union-attr]
    first = lines[start].split(quote, 1)[1]
    if quote in first:
        return start + 1
    for j in range(start + 1, len(lines)):
        if quote in lines[j]:
            return j + 1
    return None


def function_sample(prompt: str, completion: str, *, finished: bool) -> str:
    """``prompt`` plus the part of ``completion`` that belongs to the function's body.

    ``finished`` says generation stopped by itself (end of text) rather than at the token
    limit; an unfinished completion loses its last, possibly cut, line.
    """
    lines = completion.split("\n")
    if not finished:
        lines = lines[:-1]
    # Only a prompt that ends inside a line has its last line continued by the completion's first.
    continues_line = not prompt.endswith("\n")
    body: list[str] = []
    for index, line in enumerate(lines):
        if line.strip() and not line[0].isspace() and not (index == 0 and continues_line):
            break  # back at column 0: the function is over
        body.append(line)
    return prompt + "\n".join(body).rstrip() + "\n"


def has_body(prompt: str, sample: str) -> bool:
    """Whether ``sample`` adds a statement to ``prompt``, not just blank lines or comments."""
    return any(
        line.strip() and not line.lstrip().startswith("#")
        for line in sample[len(prompt) :].split("\n")
    )


def body_compiles(prompt: str, sample: str) -> bool:
    """Whether ``sample`` (``prompt`` plus the model's body) writes a statement and compiles:
    what the compile rate counts."""
    return has_body(prompt, sample) and compiles(sample)
