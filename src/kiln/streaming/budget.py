"""The memory budget: what ``auto`` means, what each chunk needs, and the check before training.

What the budget covers (all in bytes):
- the boundary activations of every chunk for every micro-batch of the step (kept between the
  forward and the backward passes), and the gradients flowing back across one boundary;
- for the chunk being computed: its weights and optimizer state, the weights of the chunks it
  borrows from, its gradients (one per parameter) plus the borrowed parameters' gradients held
  at that point of the backward (one per parameter per micro-batch, from the backward of the
  last chunk that borrows it to its owner's) and the activations autograd saves while it
  recomputes one micro-batch;
- whatever else fits: other cached chunks and prefetched reads.
Activation sizes are measured by running each chunk on the meta device (no memory, no compute)
and counting what autograd saves; the last chunk's loss gets three more copies of its output
(log-softmax, its gradient, the output's gradient).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils._pytree import tree_leaves, tree_map

from kiln.errors import ConfigError
from kiln.streaming.chunks import ChunkPlan

# A container's memory limit, cgroup v2 then v1: (limit, usage, stats, the stats' key for page
# cache the kernel can reclaim). /proc/meminfo shows the host's memory, not the limit.
_CGROUP_FILES = (
    (
        "/sys/fs/cgroup/memory.max",
        "/sys/fs/cgroup/memory.current",
        "/sys/fs/cgroup/memory.stat",
        "inactive_file",
    ),
    (
        "/sys/fs/cgroup/memory/memory.limit_in_bytes",
        "/sys/fs/cgroup/memory/memory.usage_in_bytes",
        "/sys/fs/cgroup/memory/memory.stat",
        "total_inactive_file",
    ),
)
_NO_LIMIT = 1 << 60  # cgroup v1 writes "no limit" as a number near 2**63


def _cgroup_available() -> int | None:
    """Bytes the process's memory cgroup has left (reclaimable page cache counted as free), or
    None where no limit is set or none can be read."""
    for limit_file, usage_file, stat_file, cache_key in _CGROUP_FILES:
        try:
            limit = Path(limit_file).read_text().strip()
            if limit == "max" or int(limit) >= _NO_LIMIT:
                return None
            usage = int(Path(usage_file).read_text())
            stats = dict(line.split() for line in Path(stat_file).read_text().splitlines())
        except (OSError, ValueError):
            continue
        return max(0, int(limit) - usage + int(stats.get(cache_key, 0)))
    return None


def resolve_budget(value: int | str, device: torch.device) -> int:
    """Bytes for ``strategy.memory_budget``; ``auto`` is half of what is available now (on a
    CPU: of the available RAM, or of what a container's memory limit leaves if that is less)."""
    if value != "auto":
        return int(value)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free // 2
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            available = int(line.split()[1]) * 1024
            limited = _cgroup_available()
            return (available if limited is None else min(available, limited)) // 2
    raise ConfigError(
        "strategy.memory_budget auto cannot read the available RAM on this system; "
        "give the budget in bytes"
    )


@dataclass(frozen=True)
class ChunkNeeds:
    """Bytes one chunk needs while it is computed (see the module docstring)."""

    name: str
    state: int  # its weights + optimizer state, and the borrowed owners' weights + state
    grads: int
    activations: int

    @property
    def total(self) -> int:
        return self.state + self.grads + self.activations


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


@contextlib.contextmanager
def _meta_weights(plan: ChunkPlan, index: int) -> Iterator[list[torch.Tensor]]:
    """Chunk ``index``'s parameters as meta tensors of its pieces' shapes, wherever the chunk
    or the model holds them (a chunk may reach its weights through another module of the
    model); yields those tensors. Swapped back afterwards.

    The swap is made here rather than with ``functional_call``, whose restore leaves the
    stand-in behind when one module is reachable by two names (a GPT block is both a chunk and
    a child of the model).
    """
    meta = {
        id(plan.params[n]): torch.empty(plan.shapes[n], dtype=plan.dtypes[n], device="meta")
        for n in plan.used[index]
    }
    slots = {}
    for root in (plan.chunks[index].module, plan.model):
        for module in root.modules():
            for attr, p in module._parameters.items():
                if p is not None and id(p) in meta:
                    slots[id(module), attr] = (module, attr, p)
    try:
        for module, attr, p in slots.values():
            module._parameters[attr] = meta[id(p)]
        yield list(meta.values())
    finally:
        for module, attr, p in slots.values():
            module._parameters[attr] = p


def _held(plan: ChunkPlan) -> list[list[str]]:
    """Per chunk: the borrowed pieces whose gradients are held while it runs its backward.

    A borrower's gradient is held from the backward of the last chunk that borrows the piece
    down to (and including) its owner's, where it is added to the owner's own.
    """
    last_use = {n: j for j in range(len(plan.chunks)) for n in plan.borrowed(j)}
    return [
        [n for n, last in last_use.items() if plan.owner[n] <= j <= last]
        for j in range(len(plan.chunks))
    ]


def _to_meta(value: Any) -> Any:
    return value.to("meta") if torch.is_tensor(value) else value


def measure_needs(
    plan: ChunkPlan, call: Any, micro_batches: int, state_per_weight: int
) -> tuple[list[ChunkNeeds], int]:
    """Per-chunk needs for micro-batches like ``call`` and the step's boundary bytes.

    ``call`` is the model's input for one micro-batch, ``(args, kwargs)``;
    ``state_per_weight`` is bytes of optimizer state per byte of weight (2 for AdamW).
    """
    saved: list[int] = []
    outputs: list[int] = []

    weights: set[int] = set()

    def pack(t: torch.Tensor) -> torch.Tensor:
        # A weight autograd keeps for the backward is the resident weight, counted as state.
        if id(t if t._base is None else t._base) not in weights:
            saved[-1] += _nbytes(t)
        return t

    def handed_on(t: Any) -> Any:
        """What the next chunk receives: a tensor passed on unchanged stays that tensor."""
        if not torch.is_tensor(t) or id(t) in inputs:
            return t
        return t.detach().requires_grad_() if t.is_floating_point() else t.detach()

    x = tree_map(_to_meta, call)
    for t in tree_leaves(x):
        if torch.is_tensor(t) and t.is_floating_point():
            t.requires_grad_()
    boundaries = 0
    kept: set[int] = set()  # boundary tensors counted so far: chunks may pass some on as is
    for j, chunk in enumerate(plan.chunks):
        received = [t for t in tree_leaves(x) if torch.is_tensor(t)]
        inputs = {id(t) for t in received}
        boundaries += micro_batches * sum(_nbytes(t) for t in received if id(t) not in kept)
        kept |= inputs
        saved.append(0)
        args, kwargs = x if j == 0 else ((x,), {})
        with (
            _meta_weights(plan, j) as meta,
            torch.enable_grad(),
            torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t),
        ):
            weights.clear()
            weights.update(id(t) for t in meta)
            x = tree_map(handed_on, chunk.module(*args, **kwargs))
        outputs.append(sum(_nbytes(t) for t in tree_leaves(x) if torch.is_tensor(t)))
    weight = {n: plan.shapes[n].numel() * plan.dtypes[n].itemsize for n in plan.params}
    held = _held(plan)
    needs = []
    for j, chunk in enumerate(plan.chunks):
        owners = set(plan.needed(j))
        state = sum(weight[n] for k in owners for n in plan.owned[k]) * (1 + state_per_weight)
        grads = sum(weight[n] for n in plan.owned[j]) + micro_batches * sum(
            weight[n] for n in held[j]
        )
        extra = 3 * outputs[j] if j == plan.last else 2 * outputs[j]
        needs.append(ChunkNeeds(chunk.name, state, grads, saved[j] + extra))
    return needs, boundaries


def check_budget(budget: int, needs: list[ChunkNeeds], boundaries: int) -> int:
    """The bytes left for caching beyond the largest chunk's working set; raises if none fit."""
    worst = max(needs, key=lambda n: n.total)
    minimum = boundaries + worst.total
    if budget < minimum:
        raise ConfigError(
            f"strategy.memory_budget {budget:,} bytes is too small: chunk {worst.name!r} needs "
            f"{worst.total:,} bytes (weights and optimizer state {worst.state:,}, gradients "
            f"{worst.grads:,}, activations {worst.activations:,}) on top of {boundaries:,} bytes "
            f"of chunk-boundary activations; the minimum budget is {minimum:,} bytes. Raise "
            "strategy.memory_budget, or lower training.micro_batch_size (or a sample's size, such "
            "as data.seq_len)."
        )
    return budget - boundaries - max(n.grads + n.activations for n in needs)
