"""Scalar pure-Python reference of the hashtron core: one value at a time, straight from the
reference notes (docs: /work/shared/reference/hashtron.md), written independently of the
vectorised ``kiln.hashtron`` code so the two can be compared value by value and timed against
each other (``benchmarks/hashtron_core.py`` loads this file by path). Not part of the package.

The filter builder is the reference's sequential algorithm: insert keys one by one, re-insert
all until nothing changes, grow the table 1.5x when the work exceeds the load budget.
"""

from __future__ import annotations

M32 = 0xFFFFFFFF
PROBE_ROUNDS = 64


def hash_scalar(n: int, s: int, modulo: int) -> int:
    m = (n - s) & M32
    m ^= (m << 2) & M32
    m ^= (m << 3) & M32
    m ^= m >> 5
    m ^= m >> 7
    m ^= (m << 11) & M32
    m ^= (m << 13) & M32
    m ^= m >> 17
    m ^= (m << 19) & M32
    m = (m + s) & M32
    return (m * modulo) >> 32


def _rotr1(x: int) -> int:
    return (x >> 1) | ((x << 31) & M32)


def filter_lookup_scalar(table: bytes, x: int) -> bool:
    """Reference lookup of a uint32 key in a packed 2-bit table."""
    cells = 4 * len(table)
    if cells == 0:
        return bool(x & 1)
    for rnd in range(PROBE_ROUNDS):
        h = hash_scalar(x, rnd, cells)
        cell = (table[h >> 2] >> ((h & 3) * 2)) & 3
        if cell == 0:
            return bool(x & 1)
        if cell == 1:
            return False
        if cell == 2:
            return True
        x = _rotr1(x)
    return False


def _insert(table: bytearray, x: int, answer: int) -> int:
    """Reference insert: returns the number of cell writes (+1 if it ran out of rounds)."""
    cells = 4 * len(table)
    written = 0
    for rnd in range(PROBE_ROUNDS):
        h = hash_scalar(x, rnd, cells)
        shift = (h & 3) * 2
        cell = (table[h >> 2] >> shift) & 3
        if cell == 0:
            if answer == x & 1:
                return written
            table[h >> 2] |= (answer + 1) << shift
            return written + 1
        if cell == 3:
            x = _rotr1(x)
            continue
        if cell == answer + 1:
            return written
        table[h >> 2] |= 3 << shift
        x = _rotr1(x)
        written += 1
    return written + 1


def filter_build_scalar(keys: list[int], wanted: list[bool]) -> bytes:
    """Reference build: sequential inserts, re-inserted until stable, growing 1.5x on overload."""
    n = len(keys)
    if n == 0:
        return b""
    size = (3 + (3 * n + 1) // 2) // 4
    max_load = n
    while True:
        table = bytearray(size)
        load, mutated = 0, True
        while mutated and load < max_load:
            inserted = 0
            for key, bit in zip(keys, wanted, strict=True):
                inserted += _insert(table, key, int(bit))
                if load + inserted >= max_load:
                    break
            mutated = inserted > 0
            load += inserted
        if not mutated:
            return bytes(table)
        size = (3 + (3 * (4 * size) + 1) // 2) // 4
        max_load = (3 * max_load + 1) // 2


def neuron_forward_scalar(program, bits: int, table: bytes, x: int) -> int:
    out = 0
    for j in range(bits):
        v = (x | (j << 16)) & M32
        for salt, modulo in program:
            v = hash_scalar(v, salt, modulo)
        out |= int(filter_lookup_scalar(table, v)) << j
    return out


def combine_scalar(combiner, bits: list[int], n_features: int) -> list[int]:
    """Features from one sample's layer bits, by the formulas in kiln.hashtron.combiners' doc."""
    kind = combiner.kind
    out = []
    for m in range(n_features):
        value = 0
        if kind == "full":
            for b in range(combiner.maxbits):
                value = (value << 1) | bits[m * combiner.step + b]
        elif kind == "sum":
            size = 1
            for d in combiner.dims:
                size *= d
            stride = 1
            for d in combiner.dims[: combiner.axis]:
                stride *= d
            length = combiner.dims[combiner.axis]
            value = sum(bits[(m * length + j * stride) % size] for j in range(length))
        else:
            p = combiner
            cells = p.width * p.height
            sub = p.subwidth * p.subheight
            block = (m // cells) % p.repeat
            top, left = divmod(m % cells, p.width)
            for y in range(p.capheight):
                for x in range(p.capwidth):
                    yy, xx = (top + y) % p.height, (left + x) % p.width
                    base = (block * cells + yy * p.width + xx) * sub
                    w = sum(1 if bits[base + k] else -1 for k in range(sub))
                    value = (value << 1) | int(w > p.bias)
        out.append(value)
    return out


def layer_bits_scalar(layer, features: list[int], force: tuple[int, int] | None = None):
    """One sample's bits of a layer; ``force`` = (neuron, bit) overrides one neuron's output."""
    bits = []
    for i, neuron in enumerate(layer.neurons):
        x = features[i % len(features)]
        if layer.premodulo:
            x = hash_scalar(x, i, layer.premodulo)
        bit = neuron_forward_scalar(neuron.program, 1, bytes(neuron.filter.data), x) & 1
        if force is not None and force[0] == i:
            bit = force[1]
        bits.append(bit)
    return bits


def network_forward_scalar(net, features: list[int], force=None) -> int:
    """One sample's output code; ``force`` = (layer, neuron, bit) overrides one neuron."""
    feats = list(features)
    for li, layer in enumerate(net.layers):
        f = (force[1], force[2]) if force is not None and force[0] == li else None
        bits = layer_bits_scalar(layer, feats, f)
        if layer.combiner is None:
            return sum(b << j for j, b in enumerate(bits))
        feats = combine_scalar(layer.combiner, bits, net.layers[li + 1].width)
    raise AssertionError("the last layer has a combiner")


def tally_votes_scalar(net, features, labels, layer: int, neuron: int, vote: str) -> list[int]:
    """Per-sample flip-test votes, one sample at a time."""
    votes = []
    for feats, label in zip(features, labels, strict=True):
        loss = []
        for bit in (0, 1):
            code = network_forward_scalar(net, feats, (layer, neuron, bit))
            loss.append(bin(code ^ label).count("1"))
        if vote == "hamming":
            votes.append(loss[0] - loss[1])
        elif vote == "sign":
            votes.append((loss[0] > loss[1]) - (loss[0] < loss[1]))
        else:
            votes.append(int(loss[1] == 0) - int(loss[0] == 0))
    return votes
