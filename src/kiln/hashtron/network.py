"""A feed-forward hashtron network: layers of neurons joined by combiners.

    features [N, F] -> layer 0 -> bits [N, W0] -> combiner 0 -> features [N, W1] -> layer 1 -> ...
                    -> last layer -> bits [N, Wn] -> output code: bit j of neuron j (uint64)

Every layer but the last has a combiner; the last has none and its bits are the output code
(so at most 64 output neurons). Neuron ``i`` of the first layer reads feature ``i % F``, so a
network trained on ``F`` features gives other answers for another ``F``: ``n_features``
(where known) makes ``forward`` refuse inputs of another width. Labels are compared with the
code as integers. Everything runs over the whole dataset at once; the only Python loops are
over layers, program entries and probe rounds.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike, NDArray

from kiln.errors import ConfigError, DataError
from kiln.hashtron.combiners import Combiner
from kiln.hashtron.hash import MASK32, U32
from kiln.hashtron.layers import Layer

MAX_OUTPUT_BITS = 64


@dataclass(frozen=True)
class LayerSpec:
    """Shape of one layer: ``width`` neurons, input ``premodulo`` (0: none), the next combiner."""

    width: int
    premodulo: int = 0
    combiner: Combiner | None = None


def as_features(features: ArrayLike, where: str = "features") -> NDArray[np.uint32]:
    """Validate input features: integers in [0, 2**32), shape [N] or [N, F] -> uint32 [N, F]."""
    arr = np.asarray(features)
    if arr.ndim == 1:
        arr = arr[:, None]
    if arr.ndim != 2 or arr.shape[1] == 0:
        raise DataError(f"{where}: expected shape [samples] or [samples, features], got "
                        f"{arr.shape}")
    if arr.size and arr.dtype.kind not in "iub":
        raise DataError(f"{where}: features must be integers, got dtype {arr.dtype}; "
                        "quantise them to uint32 first")
    if arr.size and arr.dtype.kind in "iu" and (int(arr.min()) < 0 or int(arr.max()) > MASK32):
        raise DataError(f"{where}: features must lie in [0, 2**32), got "
                        f"[{int(arr.min())}, {int(arr.max())}]")
    return arr.astype(U32, copy=False)


def as_labels(labels: ArrayLike, samples: int, bits: int, where: str = "labels") -> NDArray:
    """Validate labels: ``samples`` non-negative integers below ``2**bits`` -> uint64 [N]."""
    arr = np.asarray(labels)
    if arr.ndim != 1 or arr.shape[0] != samples:
        raise DataError(f"{where}: expected shape [{samples}] (one label per sample), got "
                        f"{arr.shape}")
    if arr.size and arr.dtype.kind not in "iub":
        raise DataError(f"{where}: labels must be integers, got dtype {arr.dtype}")
    if arr.size and (int(arr.min()) < 0 or int(arr.max()) >= 1 << bits):
        raise DataError(
            f"{where}: labels must lie in [0, 2**{bits}) for a network with {bits} output "
            f"neurons, got [{int(arr.min())}, {int(arr.max())}]; widen the last layer"
        )
    return arr.astype(np.uint64)


def pack_code(bits: NDArray[np.bool_]) -> NDArray[np.uint64]:
    """Output code per sample: bit ``j`` of the code is column ``j`` of ``bits``."""
    weights = np.left_shift(np.uint64(1), np.arange(bits.shape[1], dtype=np.uint64))
    return (bits.astype(np.uint64) * weights).sum(axis=1, dtype=np.uint64)


class Network:
    """Layers of neurons; ``layers[i].combiner`` turns layer i's bits into layer i+1's input."""

    def __init__(self, layers: Sequence[Layer], where: str = "layers",
                 n_features: int | None = None) -> None:
        """Check that the layers fit together; errors name layer ``i`` as ``where[i]`` (a
        config's ``hashtron.layers``). ``n_features``: the input features per sample the
        network reads (None: any number)."""
        self.layers = list(layers)
        if n_features is not None and (isinstance(n_features, bool)
                                       or not isinstance(n_features, int) or n_features < 1):
            raise ConfigError(f"{where}: n_features must be an integer >= 1 or None, got "
                              f"{n_features!r}")
        self.n_features = n_features
        if not self.layers:
            raise ConfigError(f"{where}: a network needs at least one layer")
        for i, (layer, nxt) in enumerate(zip(self.layers, self.layers[1:], strict=False)):
            if layer.combiner is None:
                raise ConfigError(f"{where}[{i}] needs a combiner: every layer but the last "
                                  "feeds the next one through a combiner")
            try:
                layer.combiner.check(layer.width, nxt.width)
            except ConfigError as exc:
                raise ConfigError(f"{where}[{i}].combiner: {exc}") from None
        last = len(self.layers) - 1
        if self.layers[-1].combiner is not None:
            raise ConfigError(f"{where}[{last}] is the last layer: its bits are the output, "
                              "remove its combiner")
        if self.output_bits > MAX_OUTPUT_BITS:
            raise ConfigError(f"{where}[{last}].width: the last layer has {self.output_bits} "
                              f"neurons; at most {MAX_OUTPUT_BITS} output bits are supported")

    @classmethod
    def random(cls, specs: Sequence[LayerSpec], rng: np.random.Generator,
               where: str = "layers", n_features: int | None = None) -> Network:
        """A network of fresh random neurons shaped by ``specs`` (first layer first); errors
        name layer ``i`` as ``where[i]``; ``n_features`` as in ``Network``."""
        layers = [Layer.random(s.width, rng, s.premodulo, s.combiner) for s in specs]
        return cls(layers, where, n_features)

    @property
    def output_bits(self) -> int:
        """Width of the last layer: bits in the output code."""
        return self.layers[-1].width

    @property
    def n_neurons(self) -> int:
        """Total number of neurons."""
        return sum(layer.width for layer in self.layers)

    @property
    def nbytes(self) -> int:
        """Total size of all filters in bytes."""
        return sum(layer.nbytes for layer in self.layers)

    def features(self, x: ArrayLike, layer: int) -> NDArray[np.uint32]:
        """The features ``[N, F]`` that layer ``layer`` reads for inputs ``x``."""
        self._check_layer(layer)
        feats = self._inputs(x)
        for i in range(layer):
            feats = self.combine(i, self.layers[i].forward(feats))
        return feats

    def combine(self, layer: int, bits: NDArray[np.bool_]) -> NDArray[np.uint32]:
        """Layer ``layer``'s combiner on its bits: the next layer's features."""
        combiner = self.layers[layer].combiner
        assert combiner is not None, "the last layer has no combiner"
        return combiner.apply(bits, self.layers[layer + 1].width)

    def forward_from_bits(self, layer: int, bits: NDArray[np.bool_]) -> NDArray[np.uint64]:
        """Output codes when layer ``layer`` outputs ``bits`` ``[N, width]``."""
        for i in range(layer, len(self.layers) - 1):
            bits = self.layers[i + 1].forward(self.combine(i, bits))
        return pack_code(bits)

    def forward_from_features(
        self, layer: int, features: NDArray[np.uint32]
    ) -> NDArray[np.uint64]:
        """Output codes when layer ``layer`` reads ``features`` ``[N, F]``."""
        return self.forward_from_bits(layer, self.layers[layer].forward(features))

    def forward(self, x: ArrayLike) -> NDArray[np.uint64]:
        """Output code (uint64) of each sample of ``x`` (``[N]`` or ``[N, F]`` integers)."""
        return self.forward_from_features(0, self._inputs(x))

    def _inputs(self, x: ArrayLike) -> NDArray[np.uint32]:
        """``x`` as features ``[N, F]``; ``DataError`` unless ``F`` is ``n_features``."""
        feats = as_features(x)
        if self.n_features is not None and feats.shape[1] != self.n_features:
            raise DataError(
                f"features: got {feats.shape[1]} per sample, but this network reads "
                f"{self.n_features} (neuron i of its first layer reads feature i % F, so other "
                f"widths give other answers); pass an array of shape [samples, "
                f"{self.n_features}] with the features it was trained on, in the same order")
        return feats

    def accuracy(self, x: ArrayLike, labels: ArrayLike) -> float:
        """Fraction of samples whose output code equals the label."""
        codes = self.forward(x)
        if codes.size == 0:
            raise DataError("accuracy: the dataset has no samples")
        return float(np.mean(codes == as_labels(labels, codes.size, self.output_bits)))

    def _check_layer(self, layer: int) -> None:
        if not 0 <= layer < len(self.layers):
            raise IndexError(f"layer {layer} is outside this network of {len(self.layers)} "
                             "layers")
