"""The chunk protocol: a model as an ordered sequence of chunks, and who owns which parameter.

A streamable model exposes ``stream_chunks()``: modules whose composition, applied in order to
what the model's ``forward`` receives, is that ``forward``. ``nn.Sequential`` models stream one
chunk per child without writing anything. A parameter belongs to the first chunk that uses it;
a later chunk that uses it too (the GPT head, tied to the token embedding) borrows it: the
owner's weights are read again when the borrower runs, the borrower's gradient is held until
the owner's backward, and only the owner stores and updates the parameter.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch
from torch import nn

from kiln.errors import ConfigError


@dataclass(frozen=True)
class StreamChunk:
    """One step of a model's forward: ``output = module(input)``."""

    name: str
    module: nn.Module


@runtime_checkable
class StreamableModel(Protocol):
    """A model that can train out of core."""

    def stream_chunks(self) -> list[StreamChunk]:
        """Chunks in forward order; chaining them must equal ``forward``."""
        ...


@dataclass
class ChunkPlan:
    """Chunks plus parameter ownership, in the model's own parameter order."""

    chunks: list[StreamChunk]
    params: dict[str, nn.Parameter]  # model.named_parameters() order: the in-memory order
    owned: list[list[str]]  # per chunk: parameters it stores and updates
    used: list[list[str]]  # per chunk: every parameter its module touches (owned + borrowed)
    owner: dict[str, int]
    state_keys: list[tuple[str, str]]  # model.state_dict() key -> parameter name (ties repeat)
    shapes: dict[str, torch.Size]  # recorded at planning: the model's storage is released later
    dtypes: dict[str, torch.dtype]

    @property
    def last(self) -> int:
        return len(self.chunks) - 1

    def needed(self, index: int) -> list[int]:
        """Chunks whose weights must be resident to run chunk ``index``, itself first."""
        owners = {self.owner[n] for n in self.used[index]} - {index}
        return [index, *sorted(owners)]

    def borrowed(self, index: int) -> list[str]:
        return [n for n in self.used[index] if self.owner[n] != index]


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
    for index, chunk in enumerate(chunks):
        names = []
        for p in chunk.module.parameters():
            if id(p) not in name_of:
                raise ConfigError(
                    f"chunk {chunk.name!r} has a parameter that the model does not register; "
                    "stream_chunks() must reuse the model's own modules."
                )
            names.append(name_of[id(p)])
        used.append(names)
        owned.append([n for n in names if n not in owner])
        owner.update({n: index for n in owned[-1]})
    missing = [n for n in params if n not in owner]
    if missing:
        raise ConfigError(
            f"the chunks of {type(model).__name__} do not use parameters {missing[:3]}; "
            "stream_chunks() must cover the whole forward."
        )
    state_keys = [(key, name_of[id(t)]) for key, t in model.state_dict(keep_vars=True).items()]
    shapes = {n: p.shape for n, p in params.items()}
    dtypes = {n: p.dtype for n, p in params.items()}
    return ChunkPlan(chunks, params, owned, used, owner, state_keys, shapes, dtypes)
