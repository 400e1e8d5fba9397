"""A 3D cellular lattice: a D x H x W grid of gMLP cells that talk to their six neighbours.

The input (one vector per sample) is written onto the front face (z = 0), the lattice runs a number
of synchronous propagation steps, and the output is read from the back face (z = D-1). Each cell
has its own weights by default (``sharing="none"``); ``"per_depth"`` shares them within a depth
slice and ``"all"`` shares one set across the grid, which makes the lattice a 3D neural cellular
automaton.

State layout. The public state is one tensor (B, D, H, W, C + M): channels [:C] are the visible
state that neighbours read, channels [C:] the cell's private memory. Inside a step it is held as
(D, H, W, B, C + M), so that for every sharing mode the cells that share weights are contiguous
rows and a view gives the (G, R, ...) layout the stacked cell wants (see ``lattice_cell``).

Randomness (fire-rate masks) comes only from the ``generators`` argument, one
``torch.Generator`` per sample: when fire_rate < 1, each sample's generator draws one
``torch.rand((D, H, W))`` per step, step 0 first, and nothing otherwise. A sample's masks thus
depend on its own generator only, not on the other samples of its batch: a batch cut into
micro-batches (gradient accumulation, an out-of-memory retry) gets the same masks.

Shapes in comments: B batch, D depth, H height, W width, C state channels, M memory channels,
K = C + M, G weight groups, R rows per group.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from kiln.models.lattice_cell import TOKENS, StackedGMLPCell, cell_parameter_count

SHARING = ("none", "per_depth", "all")
BOUNDARIES = ("zero", "replicate", "periodic")
IO_MODES = ("direct", "linear")
INJECT = ("once", "every_step")


@dataclass(frozen=True)
class LatticeShape:
    """Everything that defines the lattice and its dynamics; the lead maps these to config.

    input_mode "direct": input_dim must be H*W; value i lands on front cell (y, x) = divmod(i, W)
    as value * a_i, with a learned per-cell vector a_i (C,) that starts as the unit vector of
    channel 0 (the raw value is written into channel 0). "linear": a dense layer maps the input to
    all H*W*C front-face channels. output_mode "direct": output_dim must be H*W; output i is
    <r_i, state of back cell i> + c_i with r_i starting as the unit vector of channel 0. "linear":
    a dense layer from the H*W*C back-face channels.

    Alive masking (when alive_threshold is set) follows NCA, but over the lattice's own
    neighbourhood: a cell is alive when the alive_channel of itself or one of its 6 neighbours
    exceeds the threshold (NCA's 2D 3x3 max-pool would be 3x3x3 here and reach diagonally), checked
    before and after the update; dead cells are zeroed, memory included. Fire rate < 1 and alive
    masking are off by default: the lattice is a deterministic network unless asked otherwise.
    Default sizes give 24,984 parameters per cell, 61,850,025 in all.
    """

    depth: int = 11
    height: int = 15
    width: int = 15
    channels: int = 32  # C: visible state per cell
    memory: int = 16  # M: private memory per cell; 0 disables it
    hidden: int = 184  # F: half width of the gMLP channel projection (C -> 2F)
    sharing: str = "none"  # none | per_depth | all
    boundary: str = "zero"  # what lies beyond the faces: zero | replicate | periodic
    steps: int | None = None  # propagation steps; None: depth - 1, just enough to cross the depth
    fire_rate: float = 1.0  # probability that a cell applies its update in a step
    alive_threshold: float | None = None  # None: no alive masking
    alive_channel: int = 0  # the channel tested against alive_threshold
    input_dim: int = 225
    output_dim: int = 225
    input_mode: str = "direct"  # direct | linear
    output_mode: str = "direct"  # direct | linear
    inject: str = "once"  # once: input added to the initial state; every_step: before each step
    out_init_scale: float = 1.0  # std of the cell output projection times sqrt(F); 0: NCA-style
    mix_init: float = 1e-3  # token-mixing weights start uniform in +-mix_init (bias 1)
    layernorm_eps: float = 1e-5
    checkpoint: bool = False  # recompute each step in backward (activation checkpointing)

    def __post_init__(self) -> None:
        for name in ("depth", "height", "width", "channels", "hidden"):
            if getattr(self, name) < 1:
                raise ValueError(f"lattice {name} must be >= 1, got {getattr(self, name)}")
        if self.memory < 0:
            raise ValueError(f"lattice memory must be >= 0, got {self.memory}")
        for name, value, allowed in (
            ("sharing", self.sharing, SHARING),
            ("boundary", self.boundary, BOUNDARIES),
            ("input_mode", self.input_mode, IO_MODES),
            ("output_mode", self.output_mode, IO_MODES),
            ("inject", self.inject, INJECT),
        ):
            if value not in allowed:
                raise ValueError(f"lattice {name} must be one of {allowed}, got {value!r}")
        if self.steps is not None and self.steps < 1:
            raise ValueError(f"lattice steps must be >= 1, got {self.steps}")
        if not 0.0 < self.fire_rate <= 1.0:
            raise ValueError(f"lattice fire_rate must be in (0, 1], got {self.fire_rate}")
        if not 0 <= self.alive_channel < self.channels:
            raise ValueError(f"lattice alive_channel must be in [0, {self.channels})")
        face = self.height * self.width
        if self.input_mode == "direct" and self.input_dim != face:
            raise ValueError(f"input_mode 'direct' needs input_dim == height*width == {face}")
        if self.output_mode == "direct" and self.output_dim != face:
            raise ValueError(f"output_mode 'direct' needs output_dim == height*width == {face}")

    @property
    def cells(self) -> int:
        return self.depth * self.height * self.width

    @property
    def groups(self) -> int:
        """Number of distinct weight sets (G)."""
        return {"none": self.cells, "per_depth": self.depth, "all": 1}[self.sharing]

    @property
    def num_steps(self) -> int:
        return self.steps if self.steps is not None else max(1, self.depth - 1)

    def group_of(self, z: int, y: int, x: int) -> int:
        """Index into the group dimension of the weights used by cell (z, y, x)."""
        if self.sharing == "none":
            return (z * self.height + y) * self.width + x
        return z if self.sharing == "per_depth" else 0

    def groups_at(self, depths: range) -> range:
        """The rows of the stacked cell weights that the cells at ``depths`` use."""
        face = self.height * self.width
        if self.sharing == "none":
            return range(depths.start * face, depths.stop * face)
        return depths if self.sharing == "per_depth" else range(1)

    def params_per_cell(self) -> int:
        """Parameters of one weight group (one cell's gMLP when sharing is none)."""
        return cell_parameter_count(self.channels, self.memory, self.hidden)

    def num_parameters(self) -> int:
        """groups * params_per_cell + input writer + output reader."""
        face = self.height * self.width * self.channels
        io_in = face if self.input_mode == "direct" else (self.input_dim + 1) * face
        io_out = (
            face + self.height * self.width
            if self.output_mode == "direct"
            else (face + 1) * self.output_dim
        )
        return self.groups * self.params_per_cell() + io_in + io_out


class LatticeOutput(NamedTuple):
    output: torch.Tensor  # (B, output_dim)
    state: torch.Tensor  # (B, D, H, W, C + M): the final state; detach it before reusing it


def _narrow(x: torch.Tensor, dim: int, start: int, stop: int) -> torch.Tensor:
    """Slices ``start:stop`` of ``dim``; ``x`` itself when that is all of it (autograd's backward
    of even a full-width slice is a zero fill and a copy of the whole tensor)."""
    return x if stop - start == x.size(dim) else x.narrow(dim, start, stop - start)


def _pad(x: torch.Tensor, dim: int, mode: str, span: range | None = None) -> torch.Tensor:
    """Slices ``span.start - 1`` to ``span.stop`` of ``dim`` (default span: all of it), where
    those past the faces are the world beyond them: (len(span) + 2) slices along ``dim``."""
    n = x.size(dim)
    lo, hi = (0, n) if span is None else (span.start, span.stop)
    parts = [_narrow(x, dim, max(lo - 1, 0), min(hi + 1, n))]
    # An interior span needs nothing beyond the faces: its window stays a view, no copy.
    if lo == 0 or hi == n:
        first, last = x.narrow(dim, 0, 1), x.narrow(dim, n - 1, 1)
        if mode == "zero":
            before = after = torch.zeros_like(first)
        elif mode == "replicate":
            before, after = first, last
        else:  # periodic
            before, after = last, first
        parts = [before, *parts] if lo == 0 else parts
        parts = [*parts, after] if hi == n else parts
    return torch.cat(parts, dim=dim) if len(parts) > 1 else parts[0]


def neighbours(x: torch.Tensor, mode: str, depths: range | None = None) -> list[torch.Tensor]:
    """(D, H, W, ...) -> [x, z-1, z+1, y-1, y+1, x-1, x+1] (token order) of the cells at
    ``depths`` (default: all), each (len(depths), H, W, ...).

    Only the slices next to ``depths`` are read, so one depth slice's tokens cost one slice's
    copies, not the whole lattice's.
    """
    depths = range(x.size(0)) if depths is None else depths
    p = _pad(_pad(_pad(x, 0, mode, depths), 1, mode), 2, mode)  # (len+2, H+2, W+2, ...)
    inner = slice(1, -1)
    return [
        _narrow(x, 0, depths.start, depths.stop),
        p[:-2, inner, inner], p[2:, inner, inner],
        p[inner, :-2, inner], p[inner, 2:, inner],
        p[inner, inner, :-2], p[inner, inner, 2:],
    ]


class Lattice(nn.Module):
    """The lattice network: surface input -> T propagation steps -> surface output."""

    def __init__(self, shape: LatticeShape) -> None:
        super().__init__()
        self.shape = shape
        s = shape
        self.cell = StackedGMLPCell(
            s.groups, s.channels, s.memory, s.hidden,
            out_init_scale=s.out_init_scale, mix_init=s.mix_init, layernorm_eps=s.layernorm_eps,
        )
        face, front = s.height * s.width, s.height * s.width * s.channels
        if s.input_mode == "direct":
            self.write_w = nn.Parameter(torch.zeros(face, s.channels))  # (H*W, C)
            self.write = None
        else:
            self.write_w = None
            self.write = nn.Linear(s.input_dim, front)
        if s.output_mode == "direct":
            self.read_w = nn.Parameter(torch.zeros(face, s.channels))  # (H*W, C)
            self.read_b = nn.Parameter(torch.zeros(face))
            self.read = None
        else:
            self.read_w = self.read_b = None
            self.read = nn.Linear(front, s.output_dim)
        with torch.no_grad():
            for w in (self.write_w, self.read_w):
                if w is not None:
                    w[:, 0] = 1.0  # start by writing/reading channel 0 as it is
        # Which dimension of (D, H, W, B, C) the 7 tokens are stacked at, so that a view gives
        # (G, T, R, C): after all three spatial dims for per-cell weights, after D for per-depth.
        self._token_dim = {"none": 3, "per_depth": 1, "all": 0}[s.sharing]

    def num_parameters(self) -> int:
        """Trainable parameters (equals ``shape.num_parameters()``)."""
        return sum(p.numel() for p in self.parameters())

    def decayed_parameters(self) -> list[nn.Parameter]:
        """The weight matrices, for weight decay: per-cell stacks of vectors are not matrices."""
        dense = [layer.weight for layer in (self.write, self.read) if layer is not None]
        return [*self.cell.matrices(), *dense]

    # ---- state ---------------------------------------------------------------------------------

    def initial_state(
        self, batch: int, *, device: torch.device | None = None, dtype: torch.dtype | None = None
    ) -> torch.Tensor:
        """The empty lattice: zeros (B, D, H, W, C + M)."""
        s = self.shape
        dtype = dtype or torch.float32
        return torch.zeros(
            batch, s.depth, s.height, s.width, s.channels + s.memory, device=device, dtype=dtype
        )

    def _front(self, x: torch.Tensor) -> torch.Tensor:
        """Input (B, input_dim) -> what is added to the front face, (H, W, B, K)."""
        s = self.shape
        b = x.shape[0]
        if self.write_w is not None:
            emb = x.t().unsqueeze(-1) * self.write_w.unsqueeze(1)  # (H*W, B, C)
        else:
            emb = self.write(x).view(b, s.height * s.width, s.channels).transpose(0, 1)
        emb = emb.reshape(s.height, s.width, b, s.channels)
        return F.pad(emb, (0, s.memory))  # memory channels receive nothing

    def _read(self, back: torch.Tensor) -> torch.Tensor:
        """Back face (H, W, B, K) -> output (B, output_dim)."""
        s = self.shape
        vis = back[..., : s.channels].reshape(s.height * s.width, -1, s.channels)  # (H*W, B, C)
        if self.read_w is not None:
            return torch.einsum("ibc,ic->bi", vis, self.read_w.to(vis.dtype)) + self.read_b
        return self.read(vis.transpose(0, 1).reshape(vis.shape[1], -1))

    def _begin(
        self, x: torch.Tensor, state: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Input and optional state -> internal state (D, H, W, B, K) and the front (H, W, B, K)
        still to be added before every step (None with inject "once": it is added now)."""
        if state is None:
            state = self.initial_state(x.shape[0], device=x.device)
        s = state.permute(1, 2, 3, 0, 4)  # (D, H, W, B, K)
        front = self._front(x).to(s.dtype)  # (H, W, B, K)
        if self.shape.inject == "once":
            return self._inject(s, front), None
        return s, front

    @staticmethod
    def _inject(s: torch.Tensor, front: torch.Tensor) -> torch.Tensor:
        """Add the front (H, W, B, K) to slice 0 of the state (D, H, W, B, K)."""
        return torch.cat((s[:1] + front, s[1:]), dim=0)

    def _end(self, s: torch.Tensor) -> LatticeOutput:
        """Final internal state (D, H, W, B, K) -> output read off the back face, public state."""
        return LatticeOutput(self._read(s[-1]), s.permute(3, 0, 1, 2, 4))

    # ---- dynamics ------------------------------------------------------------------------------

    def _alive(self, s: torch.Tensor) -> torch.Tensor:
        """(D, H, W, B, K) -> (D, H, W, B, 1): the cell or one of its 6 neighbours is alive."""
        alpha = s[..., self.shape.alive_channel]  # (D, H, W, B)
        near = torch.stack(neighbours(alpha, self.shape.boundary)).amax(dim=0)
        return (near > self.shape.alive_threshold).unsqueeze(-1)

    def _delta(self, s: torch.Tensor, depths: range) -> torch.Tensor:
        """The update of the cells at ``depths``: state (D, H, W, B, K) -> (n, H, W, B, K), n the
        number of depths.

        The cell's weights must hold exactly those cells' groups (``shape.groups_at(depths)``):
        all of them for the whole lattice, one slice's rows when a stream chunk runs.
        """
        shape = self.shape
        _, h, w, b, k = s.shape
        n, c, g = len(depths), shape.channels, len(shape.groups_at(depths))
        rows = n * h * w * b // g
        tokens = torch.stack(neighbours(s[..., :c], shape.boundary, depths), dim=self._token_dim)
        tokens = tokens.view(g, TOKENS, rows, c)  # (G, T, R, C)
        own = _narrow(s, 0, depths.start, depths.stop)
        memory = own[..., c:].reshape(g, rows, shape.memory) if shape.memory else None
        return self.cell(tokens, memory).view(n, h, w, b, k)

    def _finish(
        self, s: torch.Tensor, delta: torch.Tensor, fire: torch.Tensor | None
    ) -> torch.Tensor:
        """Apply a step's update (D, H, W, B, K) to the state, where ``fire`` (D, H, W, B, 1)
        lets it through; then alive masking."""
        if fire is not None:
            delta = delta * fire.to(s.dtype)
        new = s + delta
        if self.shape.alive_threshold is not None:
            # As in NCA: a cell must be alive before and after the update; dead cells are zeroed.
            new = new * (self._alive(s) & self._alive(new)).to(new.dtype)
        return new

    def _step(self, s: torch.Tensor, fire: torch.Tensor | None) -> torch.Tensor:
        """One synchronous update of every cell: (D, H, W, B, K) -> (D, H, W, B, K)."""
        return self._finish(s, self._delta(s, range(s.shape[0])), fire)

    def _fire_masks(
        self, s: torch.Tensor, generators: Sequence[torch.Generator] | None, steps: int
    ) -> torch.Tensor | None:
        """Bernoulli(fire_rate) per step, cell and sample: bool (steps, D, H, W, B, 1); None at
        rate 1.

        Each sample's generator draws step 0's ``torch.rand((D, H, W))``, then step 1's, ...:
        the generators are independent, so drawing all steps of one sample before the next gives
        the numbers that drawing step by step would.
        """
        if self.shape.fire_rate >= 1.0:
            return None
        d, h, w, b, _ = s.shape
        if generators is None or isinstance(generators, torch.Generator) or len(generators) != b:
            raise ValueError(
                f"fire_rate < 1 needs one torch.Generator per sample ({b}): generators=[...]"
            )
        u = torch.stack([
            torch.stack([torch.rand((d, h, w), generator=g, device=s.device) for _ in range(steps)])
            for g in generators
        ])  # (B, steps, D, H, W)
        return (u < self.shape.fire_rate).permute(1, 2, 3, 4, 0).unsqueeze(-1)

    def _run(
        self,
        s: torch.Tensor,
        steps: int,
        generators: Sequence[torch.Generator] | None,
        front: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Advance the internal-layout state; ``front`` (H, W, B, K) is added before every step."""
        # The masks are drawn outside the checkpointed function so recomputation reuses them.
        fire = self._fire_masks(s, generators, steps)
        for t in range(steps):
            if front is not None:
                s = self._inject(s, front)
            mask = None if fire is None else fire[t]
            if self.shape.checkpoint and torch.is_grad_enabled():
                s = checkpoint(self._step, s, mask, use_reentrant=False)
            else:
                s = self._step(s, mask)
        return s

    def advance(
        self,
        state: torch.Tensor,
        steps: int,
        *,
        generators: Sequence[torch.Generator] | None = None,
    ) -> torch.Tensor:
        """Run ``steps`` updates on a state (B, D, H, W, K) without input or output."""
        s = state.permute(1, 2, 3, 0, 4)  # (D, H, W, B, K)
        return self._run(s, steps, generators).permute(3, 0, 1, 2, 4)

    def forward(
        self,
        x: torch.Tensor,
        state: torch.Tensor | None = None,
        *,
        generators: Sequence[torch.Generator] | None = None,
    ) -> LatticeOutput:
        """Input (B, input_dim) [, state (B, D, H, W, K)] -> output (B, output_dim), final state.

        ``generators``: one generator per sample, on the state's device (needed when fire_rate < 1).
        Without a state the lattice starts empty. A state carried over from an earlier call must be
        detached by the caller (truncated backprop), or the next backward walks the old graph again.
        """
        s, front = self._begin(x, state)
        return self._end(self._run(s, self.shape.num_steps, generators, front))
