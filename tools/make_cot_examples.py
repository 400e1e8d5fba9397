"""Write Kiln's packaged chain-of-thought examples: small Python reasoning tasks with worked steps.

Every record is generated from a template with seeded random values, and every answer is computed
by running the (trusted, generated-here) expression, so answers are correct by construction.

    python tools/make_cot_examples.py            # rewrite src/kiln/data/examples/cot_python.jsonl
    python tools/make_cot_examples.py --check    # exit 1 if the shipped file differs
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from collections.abc import Callable
from pathlib import Path

OUTPUT = Path(__file__).resolve().parents[1] / "src/kiln/data/examples/cot_python.jsonl"
SEED = 20261121
PER_TEMPLATE = 45
WORDS = ["kiln", "clay", "glaze", "fire", "pot", "wheel", "ember", "ash", "slip", "bisque"]
Record = dict[str, str]


def floor_division(rng: random.Random) -> Record:
    a, b = rng.randint(10, 99), rng.randint(2, 9)
    q, r = divmod(a, b)
    return {
        "prompt": f"What is the value of `({a} // {b}, {a} % {b})` in Python?",
        "reasoning": f"{b} fits into {a} {q} times, since {b} * {q} = {b * q}. "
        f"The remainder is {a} - {b * q} = {r}. So // gives {q} and % gives {r}.",
        "answer": repr((q, r)),
    }


def string_repeat_length(rng: random.Random) -> Record:
    word, n = rng.choice(WORDS), rng.randint(2, 5)
    return {
        "prompt": f"What does `len({word!r} * {n})` evaluate to?",
        "reasoning": f"{word!r} * {n} repeats the string {n} times: {word * n!r}. "
        f"Each copy has {len(word)} characters, so the length is {len(word)} * {n} = "
        f"{len(word) * n}.",
        "answer": str(len(word) * n),
    }


def list_slice(rng: random.Random) -> Record:
    xs = rng.sample(range(1, 50), rng.randint(5, 8))
    i = rng.randint(0, len(xs) - 3)
    j = rng.randint(i + 1, len(xs))
    picked = ", ".join(f"index {k} is {xs[k]}" for k in range(i, j))
    return {
        "prompt": f"What is `{xs}[{i}:{j}]`?",
        "reasoning": f"A slice [{i}:{j}] takes the items from index {i} up to but not "
        f"including index {j}: {picked}.",
        "answer": repr(xs[i:j]),
    }


def sorted_index(rng: random.Random) -> Record:
    xs = rng.sample(range(1, 100), rng.randint(4, 7))
    k = rng.randint(0, len(xs) - 1)
    ordered = sorted(xs)
    return {
        "prompt": f"What is `sorted({xs})[{k}]`?",
        "reasoning": f"sorted returns a new list in ascending order: {ordered}. "
        f"Counting from 0, the item at index {k} is {ordered[k]}.",
        "answer": str(ordered[k]),
    }


def range_sum(rng: random.Random) -> Record:
    start, stop, step = rng.randint(0, 5), rng.randint(8, 20), rng.randint(1, 4)
    values = list(range(start, stop, step))
    return {
        "prompt": "What does this code print?\n\n"
        f"total = 0\nfor i in range({start}, {stop}, {step}):\n    total += i\nprint(total)",
        "reasoning": f"range({start}, {stop}, {step}) yields {', '.join(map(str, values))}. "
        f"Adding them up: {' + '.join(map(str, values))} = {sum(values)}.",
        "answer": str(sum(values)),
    }


def dict_get(rng: random.Random) -> Record:
    keys = rng.sample(WORDS, 3)
    d = {k: rng.randint(1, 9) for k in keys}
    key = rng.choice([*keys, rng.choice([w for w in WORDS if w not in keys])])
    default = rng.randint(0, 5) * 10
    present = key in d
    return {
        "prompt": f"What does `{d}.get({key!r}, {default})` return?",
        "reasoning": f"get returns the value stored under the key, or the default when the key "
        f"is missing. The keys are {list(d)}; {key!r} is "
        + (f"present with value {d[key]}." if present else f"not among them, so the default "
           f"{default} is returned."),
        "answer": str(d.get(key, default)),
    }


def string_methods(rng: random.Random) -> Record:
    words = rng.sample(WORDS, 3)
    sep = rng.choice(["-", "_", ", ", "/"])
    text = " ".join(words)
    result = sep.join(w.upper() for w in text.split())
    return {
        "prompt": f"What is `{sep!r}.join(w.upper() for w in {text!r}.split())`?",
        "reasoning": f"split() breaks {text!r} at the spaces into {text.split()}. upper() turns "
        f"each word into {[w.upper() for w in words]}. join puts {sep!r} between them.",
        "answer": repr(result),
    }


def boolean_logic(rng: random.Random) -> Record:
    a, b, c = rng.randint(0, 20), rng.randint(0, 20), rng.randint(0, 20)
    left, right = a < b, b <= c
    result = (left and not right) or a == c
    return {
        "prompt": f"With a = {a}, b = {b}, c = {c}, what is `a < b and not b <= c or a == c`?",
        "reasoning": f"`and` binds tighter than `or`. a < b is {left}; b <= c is {right}, so "
        f"`not b <= c` is {not right}; together `a < b and not b <= c` is "
        f"{left and not right}. a == c is {a == c}. {left and not right} or {a == c} "
        f"is {result}.",
        "answer": str(result),
    }


def comprehension(rng: random.Random) -> Record:
    n, m = rng.randint(5, 12), rng.randint(2, 4)
    kept = [x for x in range(n) if x % m == 0]
    return {
        "prompt": f"What is `[x * x for x in range({n}) if x % {m} == 0]`?",
        "reasoning": f"range({n}) gives 0 to {n - 1}. The condition keeps multiples of {m}: "
        f"{kept}. Squaring each gives {[x * x for x in kept]}.",
        "answer": repr([x * x for x in kept]),
    }


def write_function(rng: random.Random) -> Record:
    name = rng.choice(["values", "items", "numbers", "data", "xs"])
    tasks = [
        ("returns the sum of the squares of a list of numbers", "sum_of_squares",
         "Square each number with a generator expression and add them with sum().",
         f"def sum_of_squares({name}):\n    return sum(x * x for x in {name})\n"),
        ("returns the largest even number in a list, or None if there is none", "largest_even",
         "Keep the even numbers with a filter, then take max() with default=None so an empty "
         "selection gives None.",
         f"def largest_even({name}):\n    return max((x for x in {name} if x % 2 == 0), "
         "default=None)\n"),
        ("counts how often each item occurs in a list", "count_items",
         "Walk the list once and keep a dict from item to count, using get() with default 0.",
         f"def count_items({name}):\n    counts = {{}}\n    for x in {name}:\n"
         "        counts[x] = counts.get(x, 0) + 1\n    return counts\n"),
        ("returns the list without duplicates, keeping the first occurrence order",
         "unique_in_order",
         "A set remembers what was seen; append an item only the first time it appears.",
         f"def unique_in_order({name}):\n    seen = set()\n    out = []\n    for x in {name}:\n"
         "        if x not in seen:\n            seen.add(x)\n            out.append(x)\n"
         "    return out\n"),
        ("returns True if a list is sorted in ascending order", "is_sorted",
         "Compare each item with the next one; all pairs must be in order.",
         f"def is_sorted({name}):\n    return all(a <= b for a, b in zip({name}, {name}[1:]))\n"),
    ]
    what, func, reasoning, code = rng.choice(tasks)
    return {
        "prompt": f"Write a Python function `{func}({name})` that {what}.",
        "reasoning": reasoning,
        "answer": code,
    }


TEMPLATES: list[Callable[[random.Random], Record]] = [
    floor_division, string_repeat_length, list_slice, sorted_index, range_sum, dict_get,
    string_methods, boolean_logic, comprehension, write_function,
]


def make_records() -> list[Record]:
    """All records, deduplicated, in a fixed order."""
    rng = random.Random(SEED)
    records, seen = [], set()
    for template in TEMPLATES:
        for _ in range(PER_TEMPLATE):
            record = template(rng)
            key = record["prompt"]
            if key not in seen:
                seen.add(key)
                records.append(record)
    return records


def render(records: list[Record]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="compare instead of writing")
    args = parser.parse_args()
    text = render(make_records())
    if args.check:
        same = OUTPUT.is_file() and OUTPUT.read_text(encoding="utf-8") == text
        print("up to date" if same else f"{OUTPUT} differs from the generator's output")
        return 0 if same else 1
    OUTPUT.parent.mkdir(parents=True, exist_ok=True)
    OUTPUT.write_text(text, encoding="utf-8")
    print(f"wrote {len(text.splitlines())} records to {OUTPUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
