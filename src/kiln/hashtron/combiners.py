"""Combiners: turn a layer's output bits into the input features of the next layer.

Every combiner maps bits ``[N, W]`` (one column per neuron) to uint32 features ``[N, K]``, where
``K`` is the width of the next layer: neuron ``i`` of that layer reads feature ``i``. Each is a
precomputed gather followed by a reduction, so a whole dataset is combined in a few numpy calls.
Packed features put their first bit in the highest position, as the reference does.

- ``MajPool2D``: the ``W`` bits are ``repeat`` blocks of a ``height x width`` grid whose cells are
  groups of ``subheight * subwidth`` consecutive bits. A cell's vote is ``ones - zeros > bias``.
  Feature ``m`` packs the votes of the ``capheight x capwidth`` window whose top-left cell is
  ``divmod(m % (height*width), width)`` in block ``(m // (height*width)) % repeat``; windows wrap
  around the grid edges. (With ``repeat`` 1 this is the reference's feature ``m``; for more
  blocks the reference derives the block differently, Kiln cycles through them.)
- ``Full``: feature ``m`` packs bits ``[m*step, m*step + maxbits)``.
- ``Sum``: the bits viewed as an array of shape ``dims`` (first axis fastest, as in the
  reference); feature ``n`` counts the ones among ``dims[axis]`` bits starting at
  ``n * dims[axis]`` and stepping along ``axis``, wrapping at the end.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import InitVar, asdict, dataclass
from functools import lru_cache
from typing import Any, ClassVar

import numpy as np
from numpy.typing import NDArray

from kiln.errors import ConfigError
from kiln.hashtron.settings import check_int

MAX_FEATURE_BITS = 32


def pack_msb_first(bits: NDArray[np.bool_]) -> NDArray[np.uint32]:
    """Pack the last axis (at most 32 bits) into uint32, the first bit highest."""
    n = bits.shape[-1]
    weights = np.left_shift(np.uint32(1), np.arange(n - 1, -1, -1, dtype=np.uint32))
    return (bits.astype(np.uint32) * weights).sum(axis=-1, dtype=np.uint32)


# Every combiner checks its fields in ``__post_init__``, naming them ``<where>.<field>``:
# ``where`` is the combiner's key path when it comes from a config (``combiner_from_dict``),
# else its kind.


@dataclass(frozen=True)
class MajPool2D:
    """Majority pooling over a 2-D grid of bit groups, features packing windows of votes."""

    kind: ClassVar[str] = "majpool2d"
    width: int
    height: int
    subwidth: int
    subheight: int
    capwidth: int
    capheight: int
    repeat: int = 1
    bias: int = 0
    where: InitVar[str] = ""

    def __post_init__(self, where: str) -> None:
        where = where or self.kind
        for name in ("width", "height", "subwidth", "subheight", "capwidth", "capheight",
                     "repeat"):
            check_int(f"{where}.{name}", getattr(self, name), low=1)
        check_int(f"{where}.bias", self.bias)
        if self.capwidth * self.capheight > MAX_FEATURE_BITS:
            raise ConfigError(
                f"{where}: capwidth x capheight = {self.capwidth * self.capheight} bits per "
                f"feature; at most {MAX_FEATURE_BITS} fit in a uint32 feature"
            )

    @property
    def in_width(self) -> int:
        """Number of input bits (neurons in the layer before)."""
        return self.repeat * self.height * self.width * self.subheight * self.subwidth

    def check(self, in_width: int, n_features: int) -> None:
        """Raise ``ConfigError`` unless this combiner fits a layer of ``in_width`` neurons."""
        if in_width != self.in_width:
            raise ConfigError(
                f"majpool2d needs repeat*height*width*subheight*subwidth = {self.in_width} "
                f"input neurons, but the layer before it has {in_width}; change the layer "
                "width or the pooling shape"
            )

    def apply(self, bits: NDArray[np.bool_], n_features: int) -> NDArray[np.uint32]:
        """Features ``[N, n_features]`` from bits ``[N, in_width]``."""
        sub = self.subwidth * self.subheight
        ones = bits.reshape(bits.shape[0], bits.shape[1] // sub, sub).sum(axis=-1, dtype=np.int32)
        votes = (2 * ones - sub) > self.bias  # ones - zeros > bias, per grid cell
        return pack_msb_first(votes[:, _majpool_windows(self, n_features)])


@lru_cache(maxsize=256)
def _majpool_windows(pool: MajPool2D, n_features: int) -> NDArray[np.intp]:
    """Grid-cell indices ``[n_features, capheight*capwidth]`` of each feature's window."""
    cells = pool.width * pool.height
    m = np.arange(n_features)
    block = (m // cells) % pool.repeat
    top, left = np.divmod(m % cells, pool.width)
    dy, dx = np.divmod(np.arange(pool.capheight * pool.capwidth), pool.capwidth)
    y = (top[:, None] + dy[None, :]) % pool.height
    x = (left[:, None] + dx[None, :]) % pool.width
    return block[:, None] * cells + y * pool.width + x


@dataclass(frozen=True)
class Full:
    """Feature ``m`` packs ``maxbits`` consecutive bits starting at bit ``m * step``."""

    kind: ClassVar[str] = "full"
    step: int
    maxbits: int
    where: InitVar[str] = ""

    def __post_init__(self, where: str) -> None:
        where = where or self.kind
        check_int(f"{where}.step", self.step, low=1)
        check_int(f"{where}.maxbits", self.maxbits, low=1, high=MAX_FEATURE_BITS)

    def check(self, in_width: int, n_features: int) -> None:
        """Raise ``ConfigError`` if the last feature would read past the layer's bits."""
        need = (n_features - 1) * self.step + self.maxbits
        if need > in_width:
            raise ConfigError(
                f"full combiner: {n_features} features of {self.maxbits} bits every "
                f"{self.step} bits need {need} input neurons, the layer before has {in_width}; "
                "lower step/maxbits, narrow the next layer or widen this one"
            )

    def apply(self, bits: NDArray[np.bool_], n_features: int) -> NDArray[np.uint32]:
        """Features ``[N, n_features]`` from bits ``[N, W]``."""
        idx = np.arange(n_features)[:, None] * self.step + np.arange(self.maxbits)[None, :]
        return pack_msb_first(bits[:, idx])


@dataclass(frozen=True)
class Sum:
    """Feature ``n`` counts the true bits along axis ``axis`` of the bits shaped ``dims``."""

    kind: ClassVar[str] = "sum"
    dims: tuple[int, ...]
    axis: int = 0
    where: InitVar[str] = ""

    def __post_init__(self, where: str) -> None:
        where = where or self.kind
        if not isinstance(self.dims, (list, tuple)) or not self.dims:
            raise ConfigError(f"{where}.dims: got {self.dims!r}, expected a non-empty list of "
                              "integers >= 1")
        for i, d in enumerate(self.dims):
            check_int(f"{where}.dims[{i}]", d, low=1)
        object.__setattr__(self, "dims", tuple(self.dims))
        check_int(f"{where}.axis", self.axis, low=0, high=len(self.dims) - 1)

    def check(self, in_width: int, n_features: int) -> None:
        """Raise ``ConfigError`` unless ``prod(dims)`` equals the layer width."""
        if math.prod(self.dims) != in_width:
            raise ConfigError(
                f"sum combiner: dims {list(self.dims)} hold {math.prod(self.dims)} bits but "
                f"the layer before has {in_width} neurons; make their product match"
            )

    def apply(self, bits: NDArray[np.bool_], n_features: int) -> NDArray[np.uint32]:
        """Features ``[N, n_features]`` from bits ``[N, prod(dims)]``."""
        size = math.prod(self.dims)
        length = self.dims[self.axis]
        stride = math.prod(self.dims[: self.axis])
        idx = (np.arange(n_features)[:, None] * length
               + np.arange(length)[None, :] * stride) % size
        return bits[:, idx].sum(axis=-1, dtype=np.uint32)


Combiner = MajPool2D | Full | Sum
COMBINERS: dict[str, type] = {cls.kind: cls for cls in (MajPool2D, Full, Sum)}


def combiner_to_dict(combiner: Combiner) -> dict[str, Any]:
    """JSON-ready description: ``{"kind": ..., <fields>}``."""
    fields = asdict(combiner)
    if isinstance(combiner, Sum):
        fields["dims"] = list(combiner.dims)
    return {"kind": combiner.kind, **fields}


def combiner_from_dict(spec: dict[str, Any], where: str = "combiner") -> Combiner:
    """Build a combiner from ``combiner_to_dict`` output; ``ConfigError`` names what is wrong."""
    if not isinstance(spec, dict) or "kind" not in spec:
        raise ConfigError(f"{where}: expected a mapping with a 'kind' key, got {spec!r}")
    fields = dict(spec)
    kind = fields.pop("kind")
    cls = COMBINERS.get(kind)
    if cls is None:
        raise ConfigError(f"{where}.kind: unknown combiner {kind!r}; use one of "
                          f"{sorted(COMBINERS)}")
    known = dataclasses.fields(cls)
    unknown = sorted(set(fields) - {f.name for f in known})
    missing = [f.name for f in known if f.default is dataclasses.MISSING and f.name not in fields]
    if unknown or missing:
        problem = f"unknown key(s) {unknown}" if unknown else f"missing {missing}"
        raise ConfigError(f"{where}: bad fields for {kind}: {problem}; {kind} takes "
                          f"{[f.name for f in known]}")
    return cls(**fields, where=where)
