"""The streamed optimizer step: chunks flow disk -> RAM (-> GPU) and back, one at a time.

One step, for micro-batches b_1..b_M of the step's batch:

1. forward, chunk-major: each chunk but the last is read once and run on every micro-batch;
   only the boundary activations (each chunk's input, per micro-batch) are kept;
2. backward, chunks in reverse: each chunk is read, recomputes its forward from its boundary
   inputs (the last chunk together with the job's loss), back-propagates the gradient arriving
   at its output and accumulates its parameter gradients over the micro-batches in order -
   exactly the sum the in-memory trainer forms - then adds the L2/L1 gradients of its own
   parameters, and (3) updates itself with its own optimizer state and writes the new version
   behind while the next chunk computes.

Without clipping the update happens during the one backward pass (28 bytes moved per
parameter per step with AdamW: read w in the forward, w, m, v in the backward; write w, m, v).
Global-norm clipping needs every gradient before any update: the first backward pass only
measures each parameter's gradient norm (reading weights only), then a second backward pass
recomputes the gradients, scales them by the clip coefficient and updates (32 bytes per
parameter, and one more backward's compute). Gradients never touch the disk.

Resident mode: when the budget holds every chunk, every gradient and every activation of the
step, the forward keeps its autograd graphs (no recomputation) and the norm pass keeps its
gradients (no second backward), so a step costs what an in-memory step costs plus the writes.

Which file holds each chunk part, and the commit after each step, are ``kiln.streaming.versions``.

Dropout masks are drawn in chunk-major order, so with dropout > 0 a streamed run is
deterministic and resumable but draws different masks than an in-memory run; each chunk's
recomputation replays its forward's RNG state, as activation checkpointing does.
"""

from __future__ import annotations

import contextlib
import errno
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_leaves, tree_map

from kiln.checkpoint import check_shapes
from kiln.config import Config
from kiln.engine.allocator import map_large_allocations, release_free_memory
from kiln.engine.job import TrainableJob, batch_size, batch_to, split_batch
from kiln.engine.optim import build_optimizer, decayed_parameters
from kiln.engine.precision import autocast
from kiln.errors import ConfigError
from kiln.streaming.budget import check_budget, measure_needs, resolve_budget
from kiln.streaming.cache import ChunkCache, IOStats, Key
from kiln.streaming.chunks import build_plan, slice_of
from kiln.streaming.location import note_committed, refuse_a_missing_store, store_root
from kiln.streaming.memory import current_rss, peak_rss, reset_peak
from kiln.streaming.store import MANIFEST, ChunkStore
from kiln.streaming.versions import STATE, WEIGHTS, ChunkVersions

# Bytes of optimizer state per byte of weight, for the budget check.
_STATE_PER_WEIGHT = {"adamw": 2, "sgd": 1}


def _uncreatable(folder: Path) -> str | None:
    """Why ``folder`` could not be created (its nearest existing ancestor is a file or is not
    writable), or None if it exists or can be made."""
    existing = folder
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        return os.strerror(errno.ENOTDIR)
    if not os.access(existing, os.W_OK | os.X_OK):
        return os.strerror(errno.EACCES)
    return None


Call = tuple[tuple[Any, ...], dict[str, Any]]  # what the model's forward receives: args, kwargs


class _Captured(Exception):
    def __init__(self, call: Call) -> None:
        super().__init__("model input captured")
        self.call = call


class _Probe(nn.Module):
    """Stands in for the model to learn what the job's loss feeds it."""

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        raise _Captured((args, kwargs))


class _Output(nn.Module):
    """Stands in for the model inside the job's loss: returns the last chunk's output.

    Any other attribute is the model's own, so a loss may use the model's helpers too; the
    weights those read are resident only if the last chunk uses (borrows) them.
    """

    def __init__(self, out: Any, model: nn.Module) -> None:
        super().__init__()
        self.out = out
        self.__dict__["_model"] = model  # a plain attribute: not a submodule

    def forward(self, *_args: Any, **_kwargs: Any) -> Any:
        return self.out

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.__dict__["_model"], name)


def _float_leaves(tree: Any) -> list[torch.Tensor]:
    """The floating-point tensors of a chunk's input or output, in a fixed order."""
    return [t for t in tree_leaves(tree) if torch.is_tensor(t) and t.is_floating_point()]


def _as_leaves(tree: Any) -> Any:
    """``tree`` with each floating-point tensor detached into a leaf that requires grad."""

    def leaf(t: Any) -> Any:
        return t.detach().requires_grad_() if torch.is_tensor(t) and t.is_floating_point() else t

    return tree_map(leaf, tree)


def _rng_state(device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), cuda


def _set_rng_state(state: tuple[torch.Tensor, torch.Tensor | None], device: torch.device) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)


@dataclass
class _Step:
    """What one step carries between its passes."""

    micros: list[Any]
    weights: list[float]
    bounds: list[list[torch.Tensor]] = field(default_factory=list)  # chunk -> micro -> input
    rng: dict[tuple[int, int], Any] = field(default_factory=dict)
    rng_end: Any = None
    sums: dict[str, torch.Tensor] = field(default_factory=dict)
    squares: dict[str, torch.Tensor] = field(default_factory=dict)
    absolutes: dict[str, torch.Tensor] = field(default_factory=dict)
    schedule: list[tuple[int, tuple[str, ...]]] = field(default_factory=list)
    cursor: int = 0
    leaves: dict[tuple[int, int], torch.Tensor] = field(default_factory=dict)  # resident mode
    kept: dict[int, dict[str, torch.Tensor]] = field(default_factory=dict)  # resident mode


@dataclass(frozen=True)
class _Update:
    """How the update pass updates: clip coefficient (None: no clipping), lrs, new version."""

    coef: torch.Tensor | None
    lrs: list[float]
    version: int


class StreamedTraining:
    """Out-of-core training of a job's model under ``config.strategy`` (name ``streaming``)."""

    def __init__(
        self,
        config: Config,
        job: TrainableJob,
        run_dir: Path,
        device: torch.device,
        log: Callable[[str], None],
    ) -> None:
        if config.precision.dtype == "fp16":
            raise ConfigError(
                "strategy.name streaming does not support precision.dtype fp16: its loss "
                "scaler decides to skip a step after all gradients exist, but streamed chunks "
                "update as they go. Use fp32 or bf16."
            )
        self.cfg = config
        self.job = job
        self.device = device
        self.log = log
        self.plan = build_plan(job.model)
        self._decayed = decayed_parameters(job.model)  # a chunk's parameters alone can't tell
        self.run_dir = Path(run_dir)
        root = store_root(config, self.run_dir)
        # The folder itself is made at the first write, so that a run refused at start-up
        # leaves nothing behind in strategy.store_dir; check now that it can be made.
        problem = _uncreatable(root)
        if problem is not None:
            raise ConfigError(
                f"strategy.store_dir: cannot create the chunk store folder {root} "
                f"({problem}). Fix strategy.store_dir (now "
                f"{config.strategy.store_dir!r}; empty: inside the run directory) to name a "
                "folder Kiln can create and write to, or free disk space."
            )
        self.store = ChunkStore(root, direct=config.strategy.direct_io)
        self.budget = resolve_budget(config.strategy.memory_budget, device)
        self.stats = IOStats()
        self.versions = ChunkVersions(
            self.store, self.plan, first_commit=lambda: note_committed(self.run_dir, root)
        )
        self.cache: ChunkCache | None = None
        self.metrics: dict[str, float] = {}
        self._empty = {n: torch.empty(0, dtype=d) for n, d in self.plan.dtypes.items()}
        self._rss_base = 0
        self._resident = False

    # ------------------------------------------------------------------ state and commit

    def _release_model(self) -> None:
        """Drop the model's own parameter storage: the store holds the weights now."""
        for name, p in self.plan.params.items():
            p.data = self._empty[name]
            p.grad = None
        release_free_memory()
        self._rss_base = current_rss()

    def _initialize(self) -> None:
        """Write version 0 of every chunk, then free the model's copy of the weights."""
        self.versions.initialize()
        self.log(
            f"streaming: {len(self.plan.chunks)} chunks written to {self.store.root}, "
            f"memory budget {self.budget:,} bytes"
        )
        self._release_model()

    def resume(self) -> dict[str, Any] | None:
        """The trainer state of the last commit (chunks verified), or None before the first.

        Raises ``CheckpointError`` if the run has committed but its store has no manifest:
        starting again from step 0 would silently throw its steps away.
        """
        state = self.versions.resume()
        if state is None:
            refuse_a_missing_store(self.cfg, self.run_dir)
            return None
        note_committed(self.run_dir, self.store.root)  # a run from before the note has none
        # The chunk names matched; an edited model size can still change their tensors.
        found: dict[str, tuple[int, ...]] = {}
        for j in range(len(self.plan.chunks)):
            record = self.versions.record(j, WEIGHTS)
            assert record is not None  # every chunk has weights from version 0 on
            found |= self.store.shapes(record)
        expected = {name: tuple(shape) for name, shape in self.plan.shapes.items()}
        check_shapes(self.store.root / MANIFEST, expected, found)
        self._release_model()
        return state

    def commit(self, step: int, state: dict[str, Any], meta: dict[str, Any]) -> None:
        """Commit this step's chunk versions and ``state`` (in the background once a step has
        run; see ``ChunkVersions.commit``)."""
        if not self.versions.started:
            self._initialize()
        self.versions.commit(step, state, meta, self.cache)

    @contextlib.contextmanager
    def model_in_memory(self) -> Iterator[None]:
        """The current weights loaded into the model (for evaluation), released afterwards."""
        self.load_model()
        try:
            yield
        finally:
            self._release_model()

    def load_model(self) -> None:
        """Load the current weights into the model's parameters (4 bytes per parameter)."""
        if not self.versions.started:  # never streamed: the model still holds its weights
            return
        self.versions.flush()
        plan = self.plan
        whole: dict[str, torch.Tensor] = {}  # split parameters, filled piece by piece
        for j in range(len(plan.chunks)):
            if self.cache is not None:  # this step's version may still be on its way to disk
                self.cache.wait_write((j, WEIGHTS))
            tensors = self.store.read(self.versions.record(j, WEIGHTS))  # type: ignore[arg-type]
            for name in plan.owned[j]:
                if name not in plan.rows:
                    plan.params[name].data = tensors[name].to(self.device, copy=True)
                    continue
                param, rows = plan.rows[name]
                if param not in whole:
                    shape, dtype = plan.whole_shape(name), plan.dtypes[name]
                    whole[param] = torch.empty(shape, dtype=dtype, device=self.device)
                whole[param][slice_of(rows)] = tensors[name]
        for param, tensor in whole.items():
            plan.params[plan.pieces[param][0]].data = tensor

    def close(self) -> None:
        """Wait for the last commit, stop the I/O threads, delete the store's spare files and
        release the store."""
        if self.cache is None:
            self.store.unlock()
            return
        try:
            self.versions.flush()
        finally:
            self.cache.close()
            self.cache = None
            self.store.drop_spares()
            self.store.unlock()

    # ------------------------------------------------------------------ the step

    def train_step(
        self, batch: Any, micro_batch_size: int, lrs: list[float], step: int
    ) -> tuple[float, dict[str, float], float]:
        """One optimizer step; returns (loss, loss components, total gradient norm)."""
        total = batch_size(batch)
        micros = [batch_to(m, self.device) for m in split_batch(batch, micro_batch_size)]
        st = _Step(micros, [batch_size(m) / total for m in micros])
        inputs = [self._model_input(m) for m in micros]
        if self.cache is None:
            self._prepare(inputs[0], len(micros))
        if not self.versions.started:
            self._initialize()
        assert self.cache is not None
        self.versions.raise_failed()
        reset_peak()
        started = time.perf_counter()
        self.stats.reset(self.cache.resident)
        clip = self.cfg.training.grad_clip
        last = self.plan.last
        forward = [(j, (WEIGHTS,)) for j in range(last)]
        norm_pass = [(j, (WEIGHTS,)) for j in range(last, -1, -1)]
        update_pass = [(j, (WEIGHTS, STATE)) for j in range(last, -1, -1)]
        st.schedule = forward + (norm_pass + update_pass if clip else update_pass)
        try:
            self._forward(st, inputs)
            if clip:
                total_norm = self._total_norm(self._backward(st, None))
                coef = torch.clamp(clip / (total_norm + 1e-6), max=1.0)
                self._backward(st, _Update(coef, lrs, step + 1))
            else:
                total_norm = self._total_norm(self._backward(st, _Update(None, lrs, step + 1)))
        except BaseException:
            # Resident copies may be half updated; the committed files are untouched. Back to
            # the last commit (after the one in flight, if any, has run).
            self.cache.clear()
            self.versions.rollback()
            for name, p in self.plan.params.items():
                p.data, p.grad = self._empty[name], None
            raise
        _set_rng_state(st.rng_end, self.device)
        self._record_metrics(time.perf_counter() - started)
        values = {name: value.item() for name, value in self._logged(st).items()}
        return values.pop("loss"), values, float(total_norm)

    def _model_input(self, micro: Any) -> Call:
        """What the job's loss passes to the model for ``micro`` (the first chunk's input)."""
        try:
            self.job.loss(_Probe(), micro)
        except _Captured as captured:
            return captured.call
        raise ConfigError(
            "streaming needs a job whose loss calls the model once; "
            f"{type(self.job).__name__}.loss does not. Use strategy.name single."
        )

    def _prepare(self, sample: torch.Tensor, micro_batches: int) -> None:
        """Check the budget against every chunk (before any chunk I/O) and size the cache."""
        needs, boundaries = measure_needs(
            self.plan, sample, micro_batches, self._state_per_weight
        )
        capacity = check_budget(self.budget, needs, boundaries)
        self.cache = ChunkCache(self.store, capacity, self.stats)
        weights = sum(s.numel() * self.plan.dtypes[n].itemsize for n, s in self.plan.shapes.items())
        everything = weights * (2 + self._state_per_weight) + micro_batches * sum(
            n.activations for n in needs
        )
        # When the budget holds every chunk, gradient and activation, nothing is recomputed.
        self._resident = everything <= capacity
        mode = "resident (no recomputation)" if self._resident else "streamed"
        if not self._resident:
            map_large_allocations()
        self.log(f"streaming: cache capacity {capacity:,} bytes; {mode} steps")

    @property
    def _state_per_weight(self) -> int:
        """Bytes of optimizer state per byte of weight."""
        o = self.cfg.optimizer
        return 0 if o.name == "sgd" and not o.momentum else _STATE_PER_WEIGHT[o.name]

    def _acquire(self, st: _Step, index: int, parts: tuple[str, ...]) -> None:
        """Make chunk ``index`` (and the chunks it borrows from) resident; point the params."""
        assert self.cache is not None
        for k in self.plan.needed(index):
            for part in parts if k == index else (WEIGHTS,):
                tensors = self.cache.get((k, part), self.versions.record(k, part))
                if part == WEIGHTS:
                    for name in self.plan.owned[k]:
                        if name in self.plan.used[index]:
                            self.plan.params[name].data = tensors[name].to(self.device)
        st.cursor += 1
        for j, upcoming in st.schedule[st.cursor : st.cursor + self.cfg.strategy.prefetch_chunks]:
            for k in self.plan.needed(j):
                for part in upcoming if k == j else (WEIGHTS,):
                    self.cache.prefetch((k, part), self.versions.record(k, part))

    def _release(self, index: int) -> None:
        assert self.cache is not None
        for k in self.plan.needed(index):
            self.cache.unpin((k, WEIGHTS))
            self.cache.unpin((k, STATE))
        for name in self.plan.used[index]:
            self.plan.params[name].data = self._empty[name]

    @contextlib.contextmanager
    def _replay_rng(self, st: _Step, index: int, micro: int) -> Iterator[None]:
        """The RNG state this chunk's forward on this micro-batch first ran with."""
        if (index, micro) in st.rng:
            _set_rng_state(st.rng[index, micro], self.device)
        else:
            st.rng[index, micro] = _rng_state(self.device)
        yield

    def _forward(self, st: _Step, inputs: list[Any]) -> None:
        """Every chunk but the last, each on all micro-batches; keep the boundaries.

        In resident mode each chunk's autograd graph is kept for the backward instead.
        """
        x = inputs
        st.bounds = [x]
        with torch.set_grad_enabled(self._resident):
            for j in range(self.plan.last):
                self._acquire(st, j, (WEIGHTS,))
                outs = []
                for m, xm in enumerate(x):
                    if self._resident and j > 0:
                        xm = st.leaves[j, m] = _as_leaves(xm)
                    with self._replay_rng(st, j, m), autocast(self.cfg.precision, self.device):
                        outs.append(self._call(j, xm))
                self._release(j)
                x, outs = outs, []
                st.bounds.append(x)

    def _call(self, j: int, x: Any) -> Any:
        """Chunk ``j`` on its input: the model's call for the first chunk, else one value."""
        if j == 0:
            args, kwargs = x
            return self.plan.chunks[0].module(*args, **kwargs)
        return self.plan.chunks[j].module(x)

    def _backward(self, st: _Step, update: _Update | None) -> dict[str, torch.Tensor]:
        """Chunks in reverse: recompute, back-propagate, accumulate; update if asked.

        Returns each owned parameter's gradient norm (before clipping).
        """
        plan = self.plan
        first = st.rng_end is None
        upstream: list[list[torch.Tensor | None]] = [[] for _ in st.micros]
        held: dict[str, list[torch.Tensor | None]] = {}  # borrowed params' grads per micro
        norms: dict[str, torch.Tensor] = {}
        for j in range(plan.last, -1, -1):
            self._acquire(st, j, (WEIGHTS, STATE) if update else (WEIGHTS,))
            if update is not None and j in st.kept:  # resident mode: gradients from pass 1
                acc = st.kept.pop(j)
                self._update(j, [n for n in plan.owned[j] if n in acc], acc, update)
                self._release(j)
                continue
            # Frozen parameters get no gradient, as in memory (where backward skips them).
            names = [n for n in plan.used[j] if plan.params[n].requires_grad]
            leaves = [plan.params[n] for n in names]
            acc: dict[str, torch.Tensor] = {}
            downstream: list[list[torch.Tensor | None]] = []
            for m, x in enumerate(st.bounds[j]):
                # The first chunk's input is data: no gradient is wanted for it.
                x_in = _as_leaves(x) if j > 0 else x
                with (
                    self._replay_rng(st, j, m),
                    torch.enable_grad(),
                    autocast(self.cfg.precision, self.device),
                ):
                    if j < plan.last and self._resident:  # the forward's graph, kept
                        x_in, out = st.leaves.pop((j, m), x), st.bounds[j + 1][m]
                    else:
                        out = self._call(j, x_in)
                    if j == plan.last:
                        loss, parts = self.job.loss(_Output(out, self.job.model), st.micros[m])
                        outs, grad_outs = [loss * st.weights[m]], None
                        if first:
                            for name, value in {"loss": loss, **parts}.items():
                                st.sums[name] = (
                                    st.sums.get(name, 0.0) + value.detach().float() * st.weights[m]
                                )
                    else:  # the gradient arriving at each output tensor that has one
                        flows = [
                            (o, g)
                            for o, g in zip(_float_leaves(out), upstream[m], strict=True)
                            if g is not None and o.requires_grad
                        ]
                        outs, grad_outs = [o for o, _ in flows], [g for _, g in flows]
                inputs = _float_leaves(x_in) if j > 0 else []
                wrt = [*leaves, *inputs]
                # Nothing to differentiate: a frozen first chunk fed token ids.
                grads = (
                    torch.autograd.grad(outs, wrt, grad_outs, allow_unused=True)
                    if wrt and outs
                    else [None] * len(wrt)
                )
                for name, g in zip(names, grads[: len(names)], strict=True):
                    self._accumulate(j, m, name, g, acc, held, len(st.micros))
                downstream.append(list(grads[len(names) :]))
            if first and j == plan.last:
                st.rng_end = _rng_state(self.device)
            self._regularize(j, acc, st, record=first)
            owned = [n for n in plan.owned[j] if n in acc]
            if owned:
                # The per-tensor norm clip_grad_norm_ forms (its foreach kernel).
                chunk_norms = torch._foreach_norm([acc[n] for n in owned], 2.0)
                norms |= dict(zip(owned, chunk_norms, strict=True))
            if update is not None:
                self._update(j, owned, acc, update)
            elif self._resident:
                st.kept[j] = acc
            self._release(j)
            # Free this chunk's gradients and graph before the next chunk arrives.
            upstream, downstream = downstream, []
            del acc, grads, out, outs, wrt
        return norms

    def _accumulate(
        self,
        j: int,
        m: int,
        name: str,
        g: torch.Tensor | None,
        acc: dict[str, torch.Tensor],
        held: dict[str, list[torch.Tensor | None]],
        micros: int,
    ) -> None:
        """Add one micro-batch's gradient (None: the chunk did not use the parameter) the way
        autograd's accumulation would.

        In one in-memory backward, a tied parameter's contributions are summed first and that
        sum is added to ``.grad``; a borrower's contribution is held until the owner's arrives,
        and reaches the parameter even if the owner itself does not use it.
        """
        if self.plan.owner[name] != j:
            if g is not None:
                slot = held.setdefault(name, [None] * micros)
                slot[m] = g if slot[m] is None else slot[m] + g
            return
        borrowed = held.get(name)
        if borrowed is not None and borrowed[m] is not None:
            g = borrowed[m] if g is None else borrowed[m] + g
            borrowed[m] = None  # added in: free it now, as the budget assumes
        if g is None:
            return
        if name in acc:
            acc[name].add_(g)
        else:
            acc[name] = g

    def _regularize(self, j: int, acc: dict[str, torch.Tensor], st: _Step, record: bool) -> None:
        """Add the L2/L1 terms' gradients of chunk ``j``'s own parameters (after the loss's)."""
        o = self.cfg.optimizer
        if not (o.l2 or o.l1):
            return
        names = [n for n in self.plan.owned[j] if self.plan.params[n].requires_grad]
        leaves = [self.plan.params[n] for n in names]
        with torch.enable_grad():
            squares = [p.float().pow(2).sum() for p in leaves] if o.l2 else []
            absolutes = [p.float().abs().sum() for p in leaves] if o.l1 else []
            terms = [o.l2 * sum(squares)] if o.l2 else []
            terms += [o.l1 * sum(absolutes)] if o.l1 else []
            grads = torch.autograd.grad(sum(terms), leaves, allow_unused=True)
        for name, g in zip(names, grads, strict=True):
            if g is not None:
                acc[name] = acc[name].add_(g) if name in acc else g
        if record:
            # Empty when that term is off.
            st.squares |= {n: s.detach() for n, s in zip(names, squares)}  # noqa: B905
            st.absolutes |= {n: a.detach() for n, a in zip(names, absolutes)}  # noqa: B905

    def _update(self, j: int, owned: list[str], acc: dict[str, torch.Tensor], up: _Update) -> None:
        """Clip, step chunk ``j``'s own optimizer, and write its new version behind."""
        assert self.cache is not None
        params = [self.plan.params[n] for n in owned]
        grads = [acc[n] for n in owned]
        if up.coef is not None and grads:
            torch._foreach_mul_(grads, up.coef.to(self.device))
        for p, g in zip(params, grads, strict=True):
            p.grad = g
        state_key: Key = (j, STATE)
        weights = self.cache.get((j, WEIGHTS), self.versions.record(j, WEIGHTS))
        saved = self.cache.get(state_key, self.versions.record(j, STATE))
        # This chunk's previous versions may still be on their way to disk.
        self.cache.wait_write((j, WEIGHTS))
        self.cache.wait_write(state_key)
        if params:
            if not saved:  # the optimizer creates its state now: evict to make room for it
                self.cache.make_room(self._state_per_weight * sum(_nbytes(p) for p in params))
            optimizer = build_optimizer(
                nn.ParameterList(params), self.cfg.optimizer, self._decayed
            )
            for group, lr in zip(optimizer.param_groups, up.lrs, strict=True):
                group["lr"] = lr
            for name, p in zip(owned, params, strict=True):
                keys = {k[len(name) + 1 :]: k for k in saved if k.rsplit(".", 1)[0] == name}
                optimizer.state[p] = {short: saved[k].to(self.device) for short, k in keys.items()}
            optimizer.step()
            new_state = {}
            for name, p in zip(owned, params, strict=True):
                for short, value in optimizer.state[p].items():
                    if torch.is_tensor(value):
                        new_state[f"{name}.{short}"] = _to_host(value, saved.get(f"{name}.{short}"))
                _to_host(p.data, weights[name])
                p.grad = None
            # An optimizer sits in reference cycles: drop its tensors now, not at the next GC.
            optimizer.state.clear()
            self.cache.put(state_key, new_state)
        name = self.plan.chunks[j].name
        for part in (WEIGHTS, STATE):
            self.cache.write_behind((j, part), name, up.version, self.versions.written(j, part))

    def _total_norm(self, norms: dict[str, torch.Tensor]) -> torch.Tensor:
        """The global 2-norm over parameters in the model's order, as clip_grad_norm_ forms it."""
        ordered = [norms[n] for n in self.plan.params if n in norms]
        return torch.linalg.vector_norm(torch.stack(ordered), 2.0)

    def _logged(self, st: _Step) -> dict[str, torch.Tensor]:
        """The step's loss and components, with the L2/L1 terms summed in the model's order."""
        o = self.cfg.optimizer
        sums = dict(st.sums)
        names = [n for n, p in self.plan.params.items() if p.requires_grad]
        terms = {}
        if o.l2:
            terms["l2"] = o.l2 * sum(st.squares[n] for n in names)
        if o.l1:
            terms["l1"] = o.l1 * sum(st.absolutes[n] for n in names)
        if terms:
            sums["loss"] = sums["loss"] + sum(terms.values())
            sums.update(terms)
        return sums

    def _record_metrics(self, elapsed: float) -> None:
        s = self.stats
        moved = s.bytes_read + s.bytes_written
        self.metrics = {
            "stream_bytes_read": s.bytes_read,
            "stream_bytes_written": s.bytes_written,
            "stream_cache_hits": s.hits,
            "stream_cache_misses": s.misses,
            "stream_io_wait_sec": s.io_wait,
            "stream_io_busy_sec": s.io_busy(),
            "stream_bandwidth_bytes_per_sec": moved / elapsed if elapsed > 0 else 0.0,
            "stream_resident_bytes": s.peak_resident,
            "stream_rss_growth_bytes": max(0, peak_rss() - self._rss_base),
        }


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _to_host(value: torch.Tensor, host: torch.Tensor | None) -> torch.Tensor:
    """The host copy of a device tensor: ``host`` updated in place when there is one."""
    if host is None:
        return value.cpu()
    if value is not host:
        host.copy_(value)
    return host
