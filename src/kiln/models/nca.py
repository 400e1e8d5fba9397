"""Growing Neural Cellular Automata (Mordvintsev et al., Distill 2020), in 2D.

Every cell of an H x W grid holds 16 channels (RGBA + 12 hidden). Each step a cell perceives its
3 x 3 neighbourhood through fixed filters (identity, Sobel-x, Sobel-y per channel: a depthwise
conv), a small update network shared by all cells (1x1 convs 48 -> 128 -> 16, the last one
zero-initialised so the first step changes nothing) proposes a residual update, a random half of
the cells apply it (fire rate), and cells without a live neighbour (alpha > 0.1 in the 3 x 3
max-pool, before and after the update) are cleared.

Randomness (fire-rate masks, damage) comes only from explicit ``torch.Generator`` arguments: each
step draws one ``torch.rand((B, 1, H, W))`` when fire_rate < 1, unless the caller passes the
masks in (``fire=``). Pool sampling lives in the job.

Shapes in comments: B batch, C channels, H height, W width.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

ALPHA = 3  # RGBA occupy channels 0..3; alpha decides which cells are alive
PADDING = {"zero": "constant", "replicate": "replicate", "periodic": "circular"}


@dataclass(frozen=True)
class NCAShape:
    """Everything that defines the automaton; the lead maps these to config."""

    channels: int = 16  # RGBA + hidden
    hidden: int = 128  # width of the update network
    fire_rate: float = 0.5  # probability that a cell applies its update in a step
    alive_threshold: float | None = 0.1  # None: no alive masking
    boundary: str = "zero"  # what perception sees beyond the edges: zero | replicate | periodic
    checkpoint: bool = False  # recompute each step in backward (activation checkpointing)

    def __post_init__(self) -> None:
        if self.channels < 4:
            raise ValueError(f"nca channels must be >= 4 (RGBA), got {self.channels}")
        if self.hidden < 1:
            raise ValueError(f"nca hidden must be >= 1, got {self.hidden}")
        if not 0.0 < self.fire_rate <= 1.0:
            raise ValueError(f"nca fire_rate must be in (0, 1], got {self.fire_rate}")
        if self.boundary not in PADDING:
            raise ValueError(f"nca boundary must be one of {tuple(PADDING)}, got {self.boundary!r}")

    def num_parameters(self) -> int:
        """(3C + 1) * hidden + (hidden + 1) * C: 8,336 at the defaults."""
        return (3 * self.channels + 1) * self.hidden + (self.hidden + 1) * self.channels


def perception_kernels(channels: int) -> torch.Tensor:
    """Depthwise filters (3C, 1, 3, 3): per channel identity, Sobel-x, Sobel-y (each / 8)."""
    identity = torch.zeros(3, 3)
    identity[1, 1] = 1.0
    # Sobel-x: a [1, 2, 1] smoothing down the rows times a [-1, 0, 1] difference along x.
    sobel_x = torch.outer(torch.tensor([1.0, 2.0, 1.0]), torch.tensor([-1.0, 0.0, 1.0])) / 8.0
    filters = torch.stack((identity, sobel_x, sobel_x.t()))  # (3, 3, 3)
    return filters.repeat(channels, 1, 1).unsqueeze(1)  # (3C, 1, 3, 3)


class NCA(nn.Module):
    """The automaton: ``forward(state, steps, generator)`` runs ``steps`` updates."""

    def __init__(self, shape: NCAShape) -> None:
        super().__init__()
        self.shape = shape
        c = shape.channels
        # Fixed filters, rebuilt on construction, so not part of the checkpointed state.
        self.register_buffer("kernels", perception_kernels(c), persistent=False)
        self.hidden = nn.Conv2d(3 * c, shape.hidden, 1)
        self.out = nn.Conv2d(shape.hidden, c, 1)
        nn.init.xavier_uniform_(self.hidden.weight)
        nn.init.zeros_(self.hidden.bias)
        # Zero update at start: the automaton begins as the identity and learns to grow.
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def num_parameters(self) -> int:
        """Trainable parameters (the perception filters are fixed)."""
        return sum(p.numel() for p in self.parameters())

    def seed_state(
        self,
        batch: int,
        height: int,
        width: int,
        *,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> torch.Tensor:
        """The seed (B, C, H, W): all zero but the centre cell, whose alpha and hidden are 1."""
        state = torch.zeros(batch, self.shape.channels, height, width, device=device, dtype=dtype)
        state[:, ALPHA:, height // 2, width // 2] = 1.0
        return state

    @staticmethod
    def rgba(state: torch.Tensor) -> torch.Tensor:
        """The visible channels (B, 4, H, W), unclipped (the loss compares them to the target)."""
        return state[:, :4]

    def perceive(self, state: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, 3C, H, W): per channel its value and its x and y gradients."""
        padded = F.pad(state, (1, 1, 1, 1), mode=PADDING[self.shape.boundary])
        return F.conv2d(padded, self.kernels.to(state.dtype), groups=self.shape.channels)

    def alive(self, state: torch.Tensor) -> torch.Tensor:
        """(B, 1, H, W) bool: some cell in the 3 x 3 neighbourhood has alpha > threshold."""
        alpha = state[:, ALPHA : ALPHA + 1]
        if self.shape.boundary == "zero":
            pooled = F.max_pool2d(alpha, 3, stride=1, padding=1)  # nothing lives beyond the edge
        else:
            alpha = F.pad(alpha, (1, 1, 1, 1), mode=PADDING[self.shape.boundary])
            pooled = F.max_pool2d(alpha, 3, stride=1)
        return pooled > self.shape.alive_threshold

    def _step(self, state: torch.Tensor, fire: torch.Tensor | None) -> torch.Tensor:
        dx = self.out(F.relu(self.hidden(self.perceive(state))))  # (B, C, H, W)
        if fire is not None:
            dx = dx * fire
        new = state + dx
        if self.shape.alive_threshold is not None:
            new = new * (self.alive(state) & self.alive(new)).to(new.dtype)
        return new

    def step(
        self,
        state: torch.Tensor,
        generator: torch.Generator | None = None,
        *,
        fire: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """One update of every cell: (B, C, H, W) -> (B, C, H, W).

        ``fire`` (B, 1, H, W), 1 where a cell applies its update, replaces the mask that would
        otherwise be drawn from ``generator`` (the pool job draws its masks ahead, per sample).
        """
        if fire is None and self.shape.fire_rate < 1.0:
            if generator is None:
                raise ValueError("fire_rate < 1 needs an explicit torch.Generator (generator=...)")
            b, _, h, w = state.shape
            u = torch.rand((b, 1, h, w), generator=generator, device=state.device)
            fire = u < self.shape.fire_rate
        if fire is not None:
            fire = fire.to(state.dtype)
        if self.shape.checkpoint and torch.is_grad_enabled():
            # The mask is drawn outside so that recomputation in backward reuses it.
            return checkpoint(self._step, state, fire, use_reentrant=False)
        return self._step(state, fire)

    def forward(
        self,
        state: torch.Tensor,
        steps: int,
        *,
        generator: torch.Generator | None = None,
        fire: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Run ``steps`` updates from ``state`` (B, C, H, W); full backprop through the rollout.

        ``fire`` (B, steps, H, W), if given, holds every step's update mask.
        """
        for t in range(steps):
            mask = None if fire is None else fire[:, t : t + 1]
            state = self.step(state, generator, fire=mask)
        return state


def damage(
    state: torch.Tensor,
    generator: torch.Generator,
    *,
    radius: tuple[float, float] = (0.1, 0.4),
    centre: tuple[float, float] = (-0.5, 0.5),
) -> torch.Tensor:
    """Erase one random disc per sample (the regeneration experiment): returns a new state.

    Coordinates span [-1, 1] across the grid; each sample's disc has its centre uniform in
    ``centre`` on both axes and its radius uniform in ``radius``.
    """
    b, _, h, w = state.shape
    dev = state.device
    u = torch.rand((b, 3), generator=generator, device=dev)  # centre x, centre y, radius
    cx, cy = (centre[0] + (centre[1] - centre[0]) * u[:, :2]).unbind(1)
    r = radius[0] + (radius[1] - radius[0]) * u[:, 2]
    ys = torch.linspace(-1.0, 1.0, h, device=dev).view(1, h, 1)
    xs = torch.linspace(-1.0, 1.0, w, device=dev).view(1, 1, w)
    dist2 = (xs - cx.view(b, 1, 1)) ** 2 + (ys - cy.view(b, 1, 1)) ** 2  # (B, H, W)
    keep = (dist2 >= (r * r).view(b, 1, 1)).unsqueeze(1)  # (B, 1, H, W)
    return state * keep.to(state.dtype)


def grow(
    model: NCA, start: torch.Tensor, record_at: list[int], generator: torch.Generator
) -> dict[int, torch.Tensor]:
    """Run ``model`` from ``start`` (B, C, H, W) and keep the states after each ``record_at`` step.

    The fire masks come from ``generator`` on the CPU, one (B, 1, H, W) draw per step, so the
    same generator grows the same pattern on any device. Returns {step: state}; step 0 is
    ``start`` itself.
    """
    b, _, h, w = start.shape
    wanted = set(record_at)
    states = {0: start} if 0 in wanted else {}
    state = start
    for t in range(1, max(wanted, default=0) + 1):
        fire = torch.rand((b, 1, h, w), generator=generator) < model.shape.fire_rate
        state = model.step(state, fire=fire.to(start.device))
        if t in wanted:
            states[t] = state
    return states
