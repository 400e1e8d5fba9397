"""Hashtron core throughput: Kiln's vectorised numpy code against a scalar pure-Python version.

Three measurements, each on the same inputs for both sides, in one process:

- hash:     ``kiln.hashtron.hash.hash32`` over an array of uint32 values (one salt and modulo)
            against ``hash_scalar`` called once per value;
- training: ``kiln.hashtron.filter.build_filter`` (a neuron's training from a key -> bit map)
            against the reference's sequential insert-until-stable build, ``filter_build_scalar``;
            both filters are checked to answer every key, and their bytes per key are printed;
- lookup:   ``QuaternaryFilter.lookup`` of every training key against ``filter_lookup_scalar``.

The scalar side is ``tests/hashtron/hashtron_scalar.py`` (tests and benchmarks only), loaded by
path. Every measurement is repeated ``--repeats`` times (after one untimed warm-up call of the
vectorised side), alternating which side runs first; medians are reported, in keys per second,
with the ratio vectorised / scalar.

    .venv/bin/python benchmarks/hashtron_core.py
    .venv/bin/python benchmarks/hashtron_core.py --keys 20000 --repeats 5 --json out.json
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib.util
import json
import os
import platform
import shlex
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from kiln.hashtron.filter import QuaternaryFilter, build_filter
from kiln.hashtron.hash import hash32

ROOT = Path(__file__).resolve().parent.parent
SCALAR_PATH = ROOT / "tests" / "hashtron" / "hashtron_scalar.py"


def load_scalar():
    """Import the scalar reference module from the tests folder by path."""
    spec = importlib.util.spec_from_file_location("hashtron_scalar", SCALAR_PATH)
    module = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    spec.loader.exec_module(module)
    return module


def timed(fn: Callable[[], object]) -> tuple[float, object]:
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def compare(name: str, count: int, fast: Callable[[], object], slow: Callable[[], object],
            repeats: int, check: Callable[[object, object], None]) -> dict:
    """Median keys/s of both sides over ``repeats`` alternating rounds."""
    fast_t, slow_t = [], []
    fast()  # warm-up: first calls pay for numpy's lazy set-up
    for r in range(repeats):
        order = [("fast", fast), ("slow", slow)] if r % 2 == 0 else [("slow", slow),
                                                                      ("fast", fast)]
        results = {}
        for side, fn in order:
            seconds, results[side] = timed(fn)
            (fast_t if side == "fast" else slow_t).append(seconds)
        check(results["fast"], results["slow"])
    fast_rate = count / statistics.median(fast_t)
    slow_rate = count / statistics.median(slow_t)
    return {"name": name, "keys": count, "vectorised_keys_per_s": fast_rate,
            "scalar_keys_per_s": slow_rate, "ratio": fast_rate / slow_rate,
            "vectorised_s": fast_t, "scalar_s": slow_t}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hash-values", type=int, default=200_000,
                        help="values hashed per round (default 200000)")
    parser.add_argument("--keys", type=int, default=50_000,
                        help="keys per neuron training / lookup round (default 50000)")
    parser.add_argument("--repeats", type=int, default=3, help="rounds per measurement")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="also write the results to this file")
    args = parser.parse_args(argv)
    scalar = load_scalar()
    rng = np.random.default_rng(args.seed)
    rows = []

    values = rng.integers(0, 2**32, args.hash_values, dtype=np.uint64).astype(np.uint32)
    value_list = values.tolist()
    salt, modulo = 0x9E3779B9, 1_000_003
    rows.append(compare(
        "hash", values.size,
        lambda: hash32(values, salt, modulo),
        lambda: [scalar.hash_scalar(v, salt, modulo) for v in value_list],
        args.repeats,
        lambda f, s: _require(f.tolist() == s, "hash results differ"),
    ))

    keys = rng.choice(2**32, args.keys, replace=False).astype(np.uint32)
    wanted = rng.integers(0, 2, keys.size).astype(bool)
    key_list, wanted_list = keys.tolist(), wanted.tolist()
    sizes = {}

    def check_filters(fast: QuaternaryFilter, slow: bytes) -> None:
        _require(bool((fast.lookup(keys) == wanted).all()), "vectorised filter is wrong")
        slow_filter = QuaternaryFilter(np.frombuffer(slow, dtype=np.uint8))
        _require(bool((slow_filter.lookup(keys) == wanted).all()), "scalar filter is wrong")
        sizes["vectorised"], sizes["scalar"] = fast.nbytes, len(slow)

    rows.append(compare(
        "neuron training (filter build)", keys.size,
        lambda: build_filter(keys, wanted),
        lambda: scalar.filter_build_scalar(key_list, wanted_list),
        args.repeats, check_filters,
    ))
    rows[-1]["bytes_per_key"] = {k: v / keys.size for k, v in sizes.items()}

    filt = build_filter(keys, wanted)
    table = bytes(filt.data)
    rows.append(compare(
        "filter lookup (neuron forward)", keys.size,
        lambda: filt.lookup(keys),
        lambda: [scalar.filter_lookup_scalar(table, k) for k in key_list],
        args.repeats,
        lambda f, s: _require(f.tolist() == s, "lookups differ"),
    ))

    command = "python " + " ".join(shlex.quote(a) for a in [sys.argv[0], *(argv or sys.argv[1:])])
    print(f"command: {command}")
    print(f"date: {dt.datetime.now(dt.timezone.utc).isoformat(timespec='seconds')}")
    print(f"machine: {platform.platform()}, {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} CPUs; Python {platform.python_version()}, numpy {np.__version__}")
    print(f"load average (1/5/15 min) at the end: {_load()}")
    print()
    print("| measurement | keys | vectorised keys/s | scalar keys/s | ratio |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for row in rows:
        print(f"| {row['name']} | {row['keys']} | {row['vectorised_keys_per_s']:,.0f} | "
              f"{row['scalar_keys_per_s']:,.0f} | {row['ratio']:.1f}x |")
    per_key = rows[1]["bytes_per_key"]
    print(f"\nfilter size: vectorised {per_key['vectorised']:.3f} bytes/key, "
          f"scalar (reference algorithm) {per_key['scalar']:.3f} bytes/key")
    if args.json:
        args.json.write_text(json.dumps({"command": command, "rows": rows}, indent=2))
    return 0


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise SystemExit(f"benchmark check failed: {message}")


def _load() -> str:
    try:
        return " ".join(f"{v:.2f}" for v in os.getloadavg())
    except OSError:
        return "n/a"


if __name__ == "__main__":
    raise SystemExit(main())
