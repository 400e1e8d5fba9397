"""Write Kiln's packaged dialogue pairs: questions about the Python standard library, answered by
the first sentence of the documented object's own docstring.

"What does json.dumps do?" -> "Serialize ``obj`` to a JSON formatted ``str``." Every pair is real
text shipped with the interpreter (no network, no model); the set is the public functions and
classes of a fixed list of modules, in sorted order, skipping names without a usable docstring.
Docstrings change between Python releases, so the shipped file is tied to the minor version in
``PYTHON`` (``--check`` on another version says so instead of comparing); ``os`` is left out
because its functions differ between platforms.

    python tools/make_dialogue_pairs.py            # rewrite the packaged dialogue_stdlib.jsonl
    python tools/make_dialogue_pairs.py --check    # exit 1 if the shipped file differs
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import json
import re
import sys
from pathlib import Path

OUTPUT = Path(__file__).resolve().parents[1] / "src/kiln/data/examples/dialogue_stdlib.jsonl"
PYTHON = (3, 11)  # the docstrings of this minor version are the shipped ones
MODULES = (
    "base64", "binascii", "bisect", "calendar", "cmath", "codecs", "collections", "colorsys",
    "copy", "csv", "datetime", "decimal", "difflib", "fnmatch", "fractions", "functools", "glob",
    "gzip", "hashlib", "heapq", "hmac", "html", "inspect", "ipaddress", "itertools", "json",
    "keyword", "math", "operator", "os.path", "pathlib", "pickle", "pprint", "queue",
    "random", "re", "secrets", "shlex", "shutil", "statistics", "string", "struct", "tempfile",
    "textwrap", "threading", "time", "unicodedata", "urllib.parse", "uuid", "zlib",
)
MIN_WORDS = 3  # answers shorter than this say too little to learn from
MAX_CHARS = 300
Record = dict[str, str]


def first_sentence(doc: str) -> str | None:
    """The docstring's first paragraph up to its first full stop, on one line; None if unusable.

    Builtins often open with their signature ("dumps(obj, ...)"): such a line is skipped.
    """
    paragraphs = [p for p in re.split(r"\n\s*\n", inspect.cleandoc(doc)) if p.strip()]
    while paragraphs and re.match(r"^[\w.]+\(.*\)(\s*->.*)?$", paragraphs[0].splitlines()[0]):
        rest = paragraphs[0].splitlines()[1:]  # drop the signature line
        paragraphs = (["\n".join(rest)] if rest else []) + paragraphs[1:]
        paragraphs = [p for p in paragraphs if p.strip()]
    if not paragraphs:
        return None
    text = " ".join(paragraphs[0].split())
    match = re.search(r"(?<!\be\.g)(?<!\bi\.e)\.(\s|$)", text)
    sentence = text[: match.start() + 1] if match else text
    if len(sentence.split()) < MIN_WORDS or len(sentence) > MAX_CHARS:
        return None
    return sentence


def module_pairs(name: str) -> list[Record]:
    """One pair per public function or class defined (or re-exported) by module ``name``."""
    module = importlib.import_module(name)
    public = getattr(module, "__all__", None) or [n for n in dir(module) if not n.startswith("_")]
    records = []
    for attr in sorted(set(public)):
        obj = getattr(module, attr, None)
        if not (inspect.isfunction(obj) or inspect.isbuiltin(obj) or inspect.isclass(obj)):
            continue
        doc = obj.__doc__
        if not isinstance(doc, str):
            continue
        answer = first_sentence(doc)
        if answer is None:
            continue
        kind = "class" if inspect.isclass(obj) else "function"
        question = f"What does the {kind} {name}.{attr} do?"
        records.append({"question": question, "answer": answer})
    return records


def make_records() -> list[Record]:
    """All pairs in a fixed order; an answer shared by several questions is kept once."""
    records, seen = [], set()
    for name in MODULES:
        for record in module_pairs(name):
            if record["answer"] not in seen:
                seen.add(record["answer"])
                records.append(record)
    return records


def render(records: list[Record]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="compare instead of writing")
    args = parser.parse_args()
    if sys.version_info[:2] != PYTHON:
        want = ".".join(map(str, PYTHON))
        print(f"the shipped pairs come from Python {want}'s docstrings; run this with {want}")
        return 2 if args.check else 1
    text = render(make_records())
    if args.check:
        same = OUTPUT.read_text(encoding="utf-8") == text
        print("up to date" if same else f"{OUTPUT} differs from the generator's output")
        return 0 if same else 1
    OUTPUT.write_text(text, encoding="utf-8")
    print(f"wrote {len(text.splitlines())} pairs to {OUTPUT}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
