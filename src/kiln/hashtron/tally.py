"""The tally: what one neuron should answer, from a flip test over the whole dataset.

For the chosen neuron (``layer``, ``neuron``) and every sample at once:

1. run the network up to the neuron's layer: the neuron's input value (after the layer's
   premodulo) and, through its program, its key;
2. run the rest of the network twice, with the neuron's bit forced to 0 and to 1 (samples where
   the combiner's output does not change are not run again: they cannot vote);
3. compare both output codes with the label: ``loss0``, ``loss1`` = Hamming distances;
4. the sample's vote is for the bit that does better (``+`` for 1, ``-`` for 0):
   - ``"sign"`` (default): ``sign(loss0 - loss1)``, so ``S`` lies in ``[-N, +N]``;
   - ``"hamming"``: ``loss0 - loss1``, weighted by the change in Hamming distance (the
     reference's weighting for multi-bit outputs);
   - ``"correct"``: +-1 only where exactly one of the two runs gives the exact label.
   For a single output bit all three agree. For a neuron of the last layer "sign" and
   "hamming" both give ``2 * label_bit - 1`` (the label's bit votes), as in the reference.

Per key the votes add up to ``S_k``; the neuron's training set is ``key -> S_k > 0`` over keys with
``S_k != 0``; the neuron's sum is ``S = sum_k S_k`` and its margin ``|S| / N``.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike, NDArray

from kiln.hashtron.network import Network, as_features, as_labels
from kiln.hashtron.neuron import as_program, run_program

VOTE_MODES = ("sign", "hamming", "correct")


@dataclass(frozen=True, eq=False)
class Tally:
    """Per-sample and per-key votes for one neuron (arrays are aligned with the dataset)."""

    layer: int
    neuron: int
    inputs: NDArray[np.uint32]  # [N] the neuron's input value (after premodulo)
    keys: NDArray[np.uint32]  # [N] its filter key (after the program)
    current: NDArray[np.bool_]  # [N] the bit the neuron outputs now
    votes: NDArray[np.int32]  # [N] + for bit 1, - for bit 0, 0 for no opinion
    unique_keys: NDArray[np.uint32]  # [K] sorted
    key_sums: NDArray[np.int64]  # [K] S_k

    @property
    def n(self) -> int:
        """N: number of samples tallied."""
        return int(self.votes.size)

    @property
    def total(self) -> int:
        """S: the sum of all votes."""
        return int(self.key_sums.sum())

    @property
    def margin(self) -> float:
        """|S| / N (0 for an empty dataset)."""
        return abs(self.total) / self.n if self.n else 0.0

    @property
    def voters(self) -> int:
        """Samples whose vote is not 0."""
        return int(np.count_nonzero(self.votes))

    def rekeyed(self, program: Iterable[Iterable[int]]) -> Tally:
        """The same votes keyed under another program (votes do not depend on the program:
        only how they group into keys does), without running the flip test again."""
        keys = run_program(as_program(program), self.inputs)
        return _keyed(self.layer, self.neuron, self.inputs, keys, self.current, self.votes)

    def training_set(self) -> tuple[NDArray[np.uint32], NDArray[np.bool_]]:
        """``(keys, wanted)``: every key with ``S_k != 0`` and whether ``S_k > 0``."""
        keep = self.key_sums != 0
        return self.unique_keys[keep], self.key_sums[keep] > 0


def tally(
    network: Network,
    x: ArrayLike,
    labels: ArrayLike,
    layer: int,
    neuron: int,
    *,
    program: Iterable[Iterable[int]] | None = None,
    vote: str = "sign",
) -> Tally:
    """Tally neuron ``neuron`` of layer ``layer`` over the dataset ``(x, labels)``.

    ``program`` keys the votes under another program than the neuron's own (the trainer
    installs the neuron with that program afterwards); ``vote`` is one of ``VOTE_MODES``.
    """
    feats = as_features(x)
    y = as_labels(labels, feats.shape[0], network.output_bits)
    if not 0 <= layer < len(network.layers):
        raise IndexError(f"no neuron ({layer}, {neuron}) in this network")
    return tally_features(network, network.features(feats, layer), y, layer, neuron,
                          program=program, vote=vote)


def tally_features(
    network: Network,
    features: NDArray[np.uint32],
    labels: NDArray[np.uint64],
    layer: int,
    neuron: int,
    *,
    bits: NDArray[np.bool_] | None = None,
    program: Iterable[Iterable[int]] | None = None,
    vote: str = "sign",
) -> Tally:
    """``tally`` from the features ``[N, F]`` that layer ``layer`` reads and validated uint64
    ``labels``; ``bits`` may pass the layer's current output bits ``[N, width]`` when the
    caller has them (a trainer caching its forward passes)."""
    if vote not in VOTE_MODES:
        raise ValueError(f"vote must be one of {VOTE_MODES}, got {vote!r}")
    net_layer = network.layers[layer] if 0 <= layer < len(network.layers) else None
    if net_layer is None or not 0 <= neuron < net_layer.width:
        raise IndexError(f"no neuron ({layer}, {neuron}) in this network")
    if bits is None:
        bits = net_layer.forward(features)
    inputs = net_layer.neuron_inputs(features, neuron)
    prog = net_layer.neurons[neuron].program if program is None else as_program(program)
    loss0, loss1 = _flip_losses(network, layer, neuron, bits, labels)
    votes = _votes(loss0, loss1, vote)
    return _keyed(layer, neuron, inputs, run_program(prog, inputs), bits[:, neuron].copy(),
                  votes)


def _keyed(layer: int, neuron: int, inputs: NDArray[np.uint32], keys: NDArray[np.uint32],
           current: NDArray[np.bool_], votes: NDArray[np.int32]) -> Tally:
    unique_keys, inverse = np.unique(keys, return_inverse=True)
    key_sums = np.bincount(inverse.ravel(), weights=votes, minlength=unique_keys.size)
    return Tally(layer, neuron, inputs, keys, current, votes, unique_keys,
                 np.rint(key_sums).astype(np.int64))


def _flip_losses(
    network: Network, layer: int, neuron: int, bits: NDArray[np.bool_], y: NDArray[np.uint64]
) -> tuple[NDArray[np.int32], NDArray[np.int32]]:
    """Hamming losses of every sample with the neuron forced to 0 and to 1."""
    forced = [bits.copy(), bits.copy()]
    forced[0][:, neuron] = False
    forced[1][:, neuron] = True
    if layer == len(network.layers) - 1:
        codes = [network.forward_from_bits(layer, b) for b in forced]
        return _hamming(codes[0], y), _hamming(codes[1], y)
    feats = [network.combine(layer, b) for b in forced]
    moved = np.flatnonzero((feats[0] != feats[1]).any(axis=1))  # the rest can't vote
    both = np.concatenate([feats[0][moved], feats[1][moved]])
    codes = network.forward_from_features(layer + 1, both)
    loss0 = np.zeros(y.size, dtype=np.int32)
    loss1 = np.zeros(y.size, dtype=np.int32)
    loss0[moved] = _hamming(codes[: moved.size], y[moved])
    loss1[moved] = _hamming(codes[moved.size :], y[moved])
    return loss0, loss1


def _hamming(codes: NDArray[np.uint64], y: NDArray[np.uint64]) -> NDArray[np.int32]:
    diff = codes ^ y
    if hasattr(np, "bitwise_count"):  # numpy >= 2.0
        return np.bitwise_count(diff).astype(np.int32)
    count = np.zeros(diff.shape, dtype=np.int32)
    for _ in range(64):
        count += (diff & np.uint64(1)).astype(np.int32)
        diff = diff >> np.uint64(1)
    return count


def _votes(loss0: NDArray[np.int32], loss1: NDArray[np.int32], mode: str) -> NDArray[np.int32]:
    if mode == "hamming":
        return loss0 - loss1
    if mode == "sign":
        return np.sign(loss0 - loss1).astype(np.int32)
    # "correct": only where exactly one of the two runs is exact
    return (loss1 == 0).astype(np.int32) - (loss0 == 0).astype(np.int32)
