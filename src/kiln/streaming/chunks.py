"""The chunk protocol: a model as an ordered sequence of chunks, and who owns which parameter.

A streamable model exposes ``stream_chunks()``: modules whose composition, applied in order to
what the model's ``forward`` receives, is that ``forward``. ``nn.Sequential`` models stream one
chunk per child without writing anything. A parameter belongs to the first chunk that uses it;
a later chunk that uses it too (the GPT head, tied to the token embedding) borrows it: the
owner's weights are read again when the borrower runs, the borrower's gradient is held until
the owner's backward, and only the owner stores and updates the parameter.

A model that stacks the weights of many units along a leading dimension (the lattice's per-cell
weights, one row per cell) can hand each chunk a range of rows of such a parameter
(``StreamChunk.rows``): the rows are then a parameter piece of their own, stored, updated and
owned like a whole parameter. While the chunk runs, the parameter holds just its rows.

Chunk ``0`` receives what the model's ``forward`` receives; every later chunk receives the
previous chunk's output as its one argument. Outputs may be tensors or tuples (named or not) of
tensors and other values; gradients flow through their floating-point tensors.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import torch
from torch import nn

from kiln.errors import ConfigError


@dataclass(frozen=True)
class StreamChunk:
    """One step of a model's forward: ``output = module(input)``.

    ``rows`` maps a parameter of ``module`` to the range of its rows (dim 0) the chunk uses;
    while the chunk runs, that parameter's data is those rows alone.
    """

    name: str
    module: nn.Module
    rows: dict[nn.Parameter, range] = field(default_factory=dict)


@runtime_checkable
class StreamableModel(Protocol):
    """A model that can train out of core."""

    def stream_chunks(self) -> list[StreamChunk]:
        """Chunks in forward order; chaining them must equal ``forward``."""
        ...


@dataclass
class ChunkPlan:
    """Chunks plus parameter ownership, in the model's own parameter order.

    The plan's unit is the *piece*: a whole parameter (named as in the model), or a range of
    rows of one (``name[start:stop]``, see ``StreamChunk.rows``).
    """

    chunks: list[StreamChunk]
    params: dict[str, nn.Parameter]  # piece -> its parameter, in model.named_parameters() order
    owned: list[list[str]]  # per chunk: pieces it stores and updates
    used: list[list[str]]  # per chunk: every piece its module touches (owned + borrowed)
    owner: dict[str, int]
    state_keys: list[tuple[str, str]]  # model.state_dict() key -> parameter name (ties repeat)
    shapes: dict[str, torch.Size]  # recorded at planning: the model's storage is released later
    dtypes: dict[str, torch.dtype]
    pieces: dict[str, list[str]]  # a parameter split into row ranges -> its pieces, in row order
    rows: dict[str, tuple[str, range]]  # such a piece -> its parameter and rows
    model: nn.Module

    @property
    def last(self) -> int:
        return len(self.chunks) - 1

    def needed(self, index: int) -> list[int]:
        """Chunks whose weights must be resident to run chunk ``index``, itself first."""
        owners = {self.owner[n] for n in self.used[index]} - {index}
        return [index, *sorted(owners)]

    def borrowed(self, index: int) -> list[str]:
        return [n for n in self.used[index] if self.owner[n] != index]

    def data(self, name: str) -> torch.Tensor:
        """A piece's values in the model's parameter (before the model's storage is released)."""
        tensor = self.params[name].detach()
        return tensor if name not in self.rows else tensor[slice_of(self.rows[name][1])]

    def whole_shape(self, name: str) -> torch.Size:
        """The shape of the parameter the piece ``name`` belongs to."""
        if name not in self.rows:
            return self.shapes[name]
        last = self.pieces[self.rows[name][0]][-1]
        return torch.Size((self.rows[last][1].stop, *self.shapes[name][1:]))


def slice_of(rows: range) -> slice:
    return slice(rows.start, rows.stop)


def assemble(
    tensors: dict[str, torch.Tensor], pieces: dict[str, list[str]]
) -> dict[str, torch.Tensor]:
    """Tensors by piece -> by parameter: each split parameter's rows concatenated in order."""
    whole = dict(tensors)
    for name, parts in pieces.items():
        whole[name] = torch.cat([whole.pop(piece) for piece in parts])
    return whole


def piece_name(name: str, rows: range | None) -> str:
    """The name of a parameter's piece: the parameter's own, or ``name[start:stop]``."""
    return name if rows is None else f"{name}[{rows.start}:{rows.stop}]"


def model_chunks(model: nn.Module) -> list[StreamChunk]:
    """The model's chunks: its own ``stream_chunks()``, or one per child of an nn.Sequential."""
    if isinstance(model, StreamableModel):
        return model.stream_chunks()
    if isinstance(model, nn.Sequential):
        return [StreamChunk(f"{i}.{type(m).__name__}", m) for i, m in enumerate(model)]
    raise ConfigError(
        f"strategy.name streaming needs a model that exposes its chunks; {type(model).__name__} "
        "has no stream_chunks() and is not an nn.Sequential. Implement stream_chunks() (see "
        "README: Out-of-core training) or use strategy.name single."
    )


# A chunk's name is part of its file names (``c0003-<name>.w.v00000012.safetensors``).
_MAX_NAME_BYTES = 200  # the rest of the file name fits too within the usual 255-byte limit


def _check_name(name: str, model: str) -> None:
    """Refuse a chunk name that cannot be part of a file name."""
    if (
        not name
        or "/" in name
        or any(ord(c) < 32 for c in name)
        or len(name.encode("utf-8", "surrogatepass")) > _MAX_NAME_BYTES
    ):
        raise ConfigError(
            f"{model}.stream_chunks() names a chunk {name!r}, which cannot be part of a file "
            f"name; give each StreamChunk a non-empty name of at most {_MAX_NAME_BYTES} bytes "
            "without '/' or control characters."
        )


def build_plan(model: nn.Module) -> ChunkPlan:
    """Ownership of every parameter; raises ``ConfigError`` if the chunks do not cover the model."""
    chunks = model_chunks(model)
    if not chunks:
        raise ConfigError(f"{type(model).__name__}.stream_chunks() returned no chunks")
    for chunk in chunks:
        _check_name(chunk.name, type(model).__name__)
    params = dict(model.named_parameters())
    name_of = {id(p): n for n, p in params.items()}
    persistent = [n for n, _ in model.named_buffers() if n in model.state_dict()]
    if persistent:
        raise ConfigError(
            f"streaming trains parameters only, but {type(model).__name__} has persistent "
            f"buffers {persistent[:3]}; use strategy.name single for this model."
        )
    owner: dict[str, int] = {}
    owned: list[list[str]] = []
    used: list[list[str]] = []
    split: dict[str, dict[str, range]] = {}  # parameter -> its pieces' rows
    for index, chunk in enumerate(chunks):
        _check_rows(chunk, {id(p) for p in chunk.module.parameters()})
        names = []
        for p in chunk.module.parameters():
            if id(p) not in name_of:
                raise ConfigError(
                    f"chunk {chunk.name!r} has a parameter that the model does not register; "
                    "stream_chunks() must reuse the model's own modules."
                )
            name, rows = name_of[id(p)], chunk.rows.get(p)
            if rows is not None:
                split.setdefault(name, {})[piece_name(name, rows)] = rows
            names.append(piece_name(name, rows))
        used.append(names)
        owned.append([n for n in names if n not in owner])
        owner.update({n: index for n in owned[-1]})
    pieces = {name: _tiling(name, params[name], rows, owner) for name, rows in split.items()}
    missing = [n for n in params if n not in owner and n not in pieces]
    if missing:
        raise ConfigError(
            f"the chunks of {type(model).__name__} do not use parameters {missing[:3]}; "
            "stream_chunks() must cover the whole forward."
        )
    state_keys = [(key, name_of[id(t)]) for key, t in model.state_dict(keep_vars=True).items()]
    order = [piece for n in params for piece in pieces.get(n, [n])]
    rows_of = {piece: (name, r) for name, ranges in split.items() for piece, r in ranges.items()}
    by_piece = {n: params[rows_of[n][0] if n in rows_of else n] for n in order}
    shapes = {
        n: p.shape if n not in rows_of else torch.Size((len(rows_of[n][1]), *p.shape[1:]))
        for n, p in by_piece.items()
    }
    dtypes = {n: p.dtype for n, p in by_piece.items()}
    return ChunkPlan(
        chunks, by_piece, owned, used, owner, state_keys, shapes, dtypes, pieces, rows_of, model
    )


def _check_rows(chunk: StreamChunk, own: set[int]) -> None:
    """Refuse row ranges of parameters the chunk does not use, or ranges that are not rows."""
    for p, rows in chunk.rows.items():
        if id(p) not in own:
            raise ConfigError(
                f"chunk {chunk.name!r} gives rows of a parameter its module does not use; "
                "StreamChunk.rows may only name the module's own parameters."
            )
        if rows.step != 1 or not 0 <= rows.start < rows.stop <= (p.shape[0] if p.ndim else 0):
            raise ConfigError(
                f"chunk {chunk.name!r} gives rows {rows} of a parameter of shape "
                f"{tuple(p.shape)}; rows must be a non-empty range(start, stop) within dim 0."
            )


def _tiling(
    name: str, param: nn.Parameter, rows: dict[str, range], owner: dict[str, int]
) -> list[str]:
    """The pieces of ``name`` in row order; raises unless they cover its rows exactly once and
    no chunk uses the parameter whole as well."""
    ordered = sorted(rows, key=lambda piece: rows[piece].start)
    ends = [0] + [rows[piece].stop for piece in ordered]
    starts = [rows[piece].start for piece in ordered] + [param.shape[0]]
    if name in owner or ends != starts:
        raise ConfigError(
            f"the chunks use rows {[rows[p] for p in ordered]} of parameter {name!r} (dim 0 of "
            f"size {param.shape[0]}){' and the whole parameter' * (name in owner)}; its pieces "
            "must cover every row exactly once, with no chunk using it whole."
        )
    return ordered
