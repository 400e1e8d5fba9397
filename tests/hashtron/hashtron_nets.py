"""Small networks with trained-looking neurons, shared by the network, tally and save tests."""

from __future__ import annotations

import math

import numpy as np

from kiln.hashtron import Full, LayerSpec, MajPool2D, Network, Neuron, Sum


def random_neuron(rng: np.random.Generator) -> Neuron:
    """A neuron with a 0-2 entry program and a filter over its (small) key range."""
    length = int(rng.integers(0, 3))
    modulo = int(rng.integers(2, 200))
    program = [(int(rng.integers(0, 2**32)), int(rng.integers(2, 2**32))) for _ in range(length)]
    if program:
        program[-1] = (program[-1][0], modulo)
    keys = np.arange(modulo if program else 2**10, dtype=np.uint32)
    keep = rng.random(keys.size) < 0.7  # some keys stay unseen: they answer parity
    return Neuron(program).fit(keys[keep], rng.integers(0, 2, int(keep.sum())))


def small_network(seed: int) -> Network:
    """Three layers joined by majpool2d and sum, plus a full-combiner variant via ``seed``."""
    rng = np.random.default_rng(seed)
    if seed % 2:
        specs = [LayerSpec(24, 2**10, MajPool2D(4, 2, 3, 1, 3, 2)),
                 LayerSpec(6, 0, Sum((3, 2), axis=0)),
                 LayerSpec(3, 2**9)]
    else:
        specs = [LayerSpec(12, 0, Full(step=2, maxbits=4)),
                 LayerSpec(5, 2**12, Sum((5,))),
                 LayerSpec(2, 2**8)]
    net = Network.random(specs, rng)
    for layer in net.layers:
        for i in range(layer.width):
            if rng.random() < 0.8:
                layer.set_neuron(i, random_neuron(rng))
    return net


def capacity_law(s: int, n: int, previous: int | None, factor: float = 10.0) -> int:
    """The spec's capacity law written out on its own, to check Kiln's against:
    premodulo = (N / (|S| + 1))^2 with the capacity in [1, N], moved at most ``factor`` times
    from the ``previous`` premodulo (rounded outward), within [1, min(N^2, 2**32 - 1)]."""
    top = 2**32 - 1
    cap = min(max(n / (abs(s) + 1), 1.0), float(n))
    p = min(max(math.floor(cap * cap + 0.5), 1), top)
    if previous is not None and factor:
        p = min(max(p, math.floor(previous / factor)), math.ceil(previous * factor))
    return min(max(p, 1), min(n * n, top))
