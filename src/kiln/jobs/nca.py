"""The Growing Neural Cellular Automata job: grow a target image from one seed cell.

The recipe of Mordvintsev et al. (2020) on the one training loop: a pool of states
(``kiln.jobs.nca_pool``), rollouts of 64-96 steps with full backprop through them, the RGBA
L2 loss, and (from the config) Adam with a step-decayed lr and per-tensor gradient
normalisation. Evaluation grows fresh patterns from the seed and measures how close they are
to the target after each of ``nca.eval_steps`` steps: past the training rollouts, this is
whether the target became an attractor.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kiln.config import Config, NcaSection
from kiln.data.nca_target import load_target, pad_target
from kiln.jobs.nca_pool import NCAPool, PoolSettings, diversity, sample_losses
from kiln.jobs.nca_render import RenderSettings, render_growth
from kiln.models.nca import NCA, NCAShape, grow

RENDER_DIR = "render"
# Offsets of the job's own generators from the run seed, so pool, evaluation and rendering
# draw independent streams and never touch the global RNGs.
POOL_STREAM, EVAL_STREAM, RENDER_STREAM = 1, 2, 3


def build_model(config: Config) -> NCA:
    """The automaton the ``nca`` section describes, initialised from the global torch RNG."""
    n = config.nca
    return NCA(
        NCAShape(
            channels=n.channels,
            hidden=n.hidden,
            fire_rate=n.fire_rate,
            alive_threshold=n.alive_threshold,
            boundary=n.boundary,
            checkpoint=n.activation_checkpointing,
        )
    )


def grid_target(nca: NcaSection) -> torch.Tensor:
    """The padded target (4, H, W) the automaton grows into."""
    return pad_target(load_target(nca.target, nca.target_size), nca.padding)


def render_settings(nca: NcaSection) -> RenderSettings:
    """The ``nca.render_*`` keys as the renderer takes them."""
    return RenderSettings(tuple(nca.render_steps), nca.render_gif_every, nca.render_scale)


def render_model(config: Config, model: NCA, out_dir: Path, name: str) -> tuple[Path, Path]:
    """Grow one pattern with ``model`` and write its growth strip and GIF into ``out_dir``."""
    _, h, w = grid_target(config.nca).shape
    seed = model.seed_state(1, h, w, device=next(model.parameters()).device)[0]
    generator = torch.Generator().manual_seed(config.seed + RENDER_STREAM)
    return render_growth(model, seed, render_settings(config.nca), generator, out_dir, name)


class NCAJob:
    """Everything the trainer needs to train a Growing NCA under a config."""

    def __init__(
        self, config: Config, run_dir: Path, device: torch.device, log: Callable[[str], None]
    ) -> None:
        self.config = config
        self.run_dir = run_dir
        self.device = device
        n, t = config.nca, config.training
        target = grid_target(n)
        self.model = build_model(config)
        _, h, w = target.shape
        seed = self.model.seed_state(1, h, w)[0]
        self.pool = NCAPool(
            seed,
            target,
            PoolSettings(
                pool_size=n.pool_size,
                batch_size=t.micro_batch_size * t.grad_accum_steps,
                rollout_min=n.rollout_min,
                rollout_max=n.rollout_max,
                fire_rate=n.fire_rate,
                damage=n.damage,
            ),
            config.seed + POOL_STREAM,
        )
        # the trainer may wrap ``batches`` (ranks); the job keeps its own handle on the pool
        self.batches = self.pool
        self.target = target.to(device)
        log(
            f"model: NCA {self.model.num_parameters():,} parameters; grid {h}x{w} "
            f"({n.target_size}-cell target {n.target!r}, padding {n.padding}); pool "
            f"{n.pool_size}, rollouts of {n.rollout_min}-{n.rollout_max} steps"
        )

    def loss(
        self, model: nn.Module, batch: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Mean RGBA L2 to the target after the batch's rollout; the grown states go back."""
        fire = batch["fire"]
        final = model(batch["state"], fire.shape[1], fire=fire)
        self.pool.put_back(batch["index"], final)
        losses = sample_losses(final, self.target)
        pool = torch.tensor(self.pool.last_diversity, device=losses.device)
        return losses.mean(), {"pool_diversity": pool}

    def tokens_in(self, batch: dict[str, torch.Tensor]) -> int:
        """Cell updates in the step: samples x rollout steps x cells."""
        return batch["fire"].numel()

    def evaluate(self, model: nn.Module, *, final: bool = False) -> dict[str, Any]:
        """Grow ``nca.eval_samples`` patterns from the seed; the loss after each eval step count.

        val_loss is the worst of them, so the best checkpoint is one whose pattern both forms
        and lasts. Uses its own generator, the same at every evaluation.
        """
        n = self.config.nca
        _, h, w = self.target.shape
        seed = model.seed_state(n.eval_samples, h, w, device=self.device)
        generator = torch.Generator().manual_seed(self.config.seed + EVAL_STREAM)
        states = grow(model, seed, n.eval_steps, generator)
        results: dict[str, Any] = {
            f"val_loss_at_{step}": sample_losses(states[step], self.target).mean().item()
            for step in sorted(states)
        }
        results["val_loss"] = max(results.values())
        results["val_diversity"] = diversity(states[max(states)])
        results["pool_diversity"] = self.pool.pool_diversity()
        return results

    def final_report(self, model: nn.Module) -> str | None:
        """Render the trained automaton's growth into the run directory and say where."""
        png, gif = render_model(self.config, model, self.run_dir / RENDER_DIR, "growth")
        return f"growth strip: {png}\nanimation: {gif}"

    def close(self) -> None:
        self.pool.close()
