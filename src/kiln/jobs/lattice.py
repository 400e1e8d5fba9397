"""The lattice job: a 3D cellular lattice learns to answer questions in embedding space.

A question's teacher embedding goes through the trainable adapter onto the lattice's front face;
after the propagation steps, the back face is compared with the answer's embedding (through the
same adapter, without gradient, so the adapter cannot make the targets easy by shrinking or
collapsing them). Each sample starts from a pool state (``lattice_pool.py``) and its detached
final state goes back to the pool: truncated backprop, so no step reaches into an earlier
step's graph and memory stays flat however long the run.

Loss = surface * MSE(output, target) + internal * depth smoothness + dialogue * (1 - cos), with
the weights fixed by ``lattice.loss`` (plain floats, never parameters). The internal term is the
mean squared difference between adjacent depth slices of the final visible state: it keeps the
pool's states bounded (they are reused step after step) and asks information to change gradually
on its way from the front face to the back. Each component is logged as ``loss_<name>``
(unweighted); ``loss`` is the weighted sum.

With fire_rate < 1, every sample's fire masks come from its own generator, seeded by the pool's
per-sample seed (training) or by its held-out index (evaluation), so cutting a batch into
micro-batches changes nothing but the order of float sums.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from kiln.config import Config, LatticeSection
from kiln.data.dialogue import load_dialogue_pairs, split_pairs
from kiln.data.embedding_cache import EmbeddingCache
from kiln.data.text_encoders import build_encoder
from kiln.engine.precision import autocast
from kiln.errors import DataError
from kiln.jobs.lattice_pool import LatticePool
from kiln.models.lattice import LatticeShape
from kiln.models.lattice_adapter import AdaptedLattice, seed_state

COMPONENTS = ("surface", "internal", "dialogue")
EVAL_SEED_SALT = 0x5EED


def lattice_shape(section: LatticeSection) -> LatticeShape:
    """The model shape a ``lattice`` section describes (the schema has checked every value)."""
    face = section.height * section.width
    return LatticeShape(
        depth=section.depth, height=section.height, width=section.width,
        channels=section.channels, memory=section.memory, hidden=section.hidden,
        sharing=section.sharing, boundary=section.boundary, steps=section.steps,
        fire_rate=section.fire_rate, alive_threshold=section.alive_threshold,
        inject=section.inject, input_dim=face, output_dim=face,
        checkpoint=section.activation_checkpointing,
    )


def build_model(config: Config, encoder_dim: int) -> AdaptedLattice:
    """The adapter + lattice the config describes, initialised from the global torch RNG."""
    return AdaptedLattice(lattice_shape(config.lattice), encoder_dim)


def sample_losses(
    model: AdaptedLattice,
    question: torch.Tensor,
    answer: torch.Tensor,
    state: torch.Tensor,
    generators: list[torch.Generator] | None,
) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
    """Per-sample loss components (each (B,)), the output (B, H*W) and the final state."""
    output, final = model(question, state, generators=generators)
    with torch.no_grad(), torch.autocast(question.device.type, enabled=False):
        target = model.surface(answer.float())  # fp32 targets, no gradient into the adapter
    output = output.float()
    visible = final[..., : model.lattice.shape.channels].float()  # (B, D, H, W, C)
    parts = {
        "surface": (output - target).square().mean(dim=-1),
        "internal": (visible[:, 1:] - visible[:, :-1]).square().mean(dim=(1, 2, 3, 4)),
        "dialogue": 1.0 - F.cosine_similarity(output, target, dim=-1),
    }
    return parts, output, final


class LatticeJob:
    """Everything the trainer needs to train the lattice under a config."""

    def __init__(
        self, config: Config, run_dir: Path, device: torch.device, log: Callable[[str], None]
    ) -> None:
        self.config = config
        self.device = device
        section = config.lattice
        self.weights = {name: float(getattr(section.loss, name)) for name in COMPONENTS}
        shape = lattice_shape(section)
        samples = config.training.micro_batch_size * config.training.grad_accum_steps
        pairs = load_dialogue_pairs(section.dialogue_path)
        train, val = split_pairs(pairs, section.val_fraction, config.seed)
        if len(train) < samples:
            raise DataError(
                f"{section.dialogue_path}: {len(train)} training pairs after holding out "
                f"lattice.val_fraction {section.val_fraction} of {len(pairs)}, fewer than a "
                f"step's batch of {samples} (training.micro_batch_size x grad_accum_steps); "
                "add pairs, lower the batch or lower lattice.val_fraction"
            )
        encoder = build_encoder(section.encoder, section.encoder_dim)
        self.model = build_model(config, encoder.dim)
        cache = EmbeddingCache(encoder, Path(section.cache_dir) if section.cache_dir else None)
        val = val[: section.eval_pairs]
        # A teacher loaded on a cache miss may draw from the global RNG; a hit loads nothing.
        # Forking keeps the run's random stream the same either way.
        with torch.random.fork_rng(devices=[]):
            self.train_q = cache.embed([p.question for p in train]).to(device)
            self.train_a = cache.embed([p.answer for p in train]).to(device)
            self.val_q = cache.embed([p.question for p in val]).to(device)
            self.val_a = cache.embed([p.answer for p in val]).to(device)
        self.seed_state = seed_state(shape, section.seed_scale)  # (D, H, W, K), on the CPU
        self.pool = LatticePool(
            pool_size=section.pool_size,
            seed_state=self.seed_state,
            num_pairs=len(train),
            samples=samples,
            seed=config.seed,
            replace_worst=section.replace_worst,
            channels_last=section.channels_last_3d,
        )
        # the trainer may wrap ``batches`` (ranks); the job keeps its own handle on the pool
        self.batches = self.pool
        adapter = sum(p.numel() for p in self.model.adapter.parameters())
        groups = f"{shape.groups:,} group{'s' * (shape.groups != 1)}"
        log(
            f"model: lattice {shape.depth}x{shape.height}x{shape.width} = {shape.cells:,} cells, "
            f"{shape.params_per_cell():,} parameters per weight group ({groups}, "
            f"sharing {shape.sharing}), {self.model.num_parameters():,} parameters in all "
            f"(adapter {encoder.dim} -> {shape.input_dim}: {adapter:,}); "
            f"{shape.num_steps} propagation steps"
        )
        log(
            f"data: {len(train)} train / {len(val)} val dialogue pairs from "
            f"{section.dialogue_path}; teacher {encoder.name} ({encoder.dim} dims), embedding "
            f"cache {cache.stats.hits} hits / {cache.stats.misses} misses"
        )

    def _generators(self, seeds: torch.Tensor) -> list[torch.Generator] | None:
        """One fire-mask generator per sample (seeds (B,)); None when every cell always fires."""
        if self.config.lattice.fire_rate >= 1.0:
            return None
        return [torch.Generator(device=self.device).manual_seed(s) for s in seeds.tolist()]

    def _weighted(self, parts: dict[str, torch.Tensor]) -> torch.Tensor:
        return sum(self.weights[name] * parts[name] for name in COMPONENTS)

    def loss(
        self, model: nn.Module, batch: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Weighted loss of a micro-batch; its final states go back to the pool, detached."""
        pair = batch["pair"]
        generators = self._generators(batch["seed"])
        parts, _, final = sample_losses(
            model, self.train_q[pair], self.train_a[pair], batch["state"], generators
        )
        per_sample = self._weighted(parts)
        self.pool.write_back(batch["slot"], final, per_sample)
        return per_sample.mean(), {name: value.mean() for name, value in parts.items()}

    def tokens_in(self, batch: dict[str, torch.Tensor]) -> int:
        """Samples (the lattice's unit of throughput)."""
        return int(batch["pair"].shape[0])

    @torch.no_grad()
    def evaluate(self, model: nn.Module, *, final: bool = False) -> dict[str, Any]:
        """Held-out pairs from the seed state: the losses, answer retrieval and pool diversity.

        Retrieval: a question counts as answered when its output is closer (cosine) to its own
        answer's target than to any other held-out answer's.
        """
        size = self.config.eval.batch_size or self.config.training.micro_batch_size
        base = self.config.seed ^ EVAL_SEED_SALT  # pair i's masks: seed base + i, every time
        sums = dict.fromkeys(COMPONENTS, 0.0)
        outputs = []
        for start in range(0, self.val_q.shape[0], size):
            q, a = self.val_q[start : start + size], self.val_a[start : start + size]
            state = self.seed_state.to(self.device).expand(q.shape[0], *self.seed_state.shape)
            generators = self._generators(torch.arange(base + start, base + start + q.shape[0]))
            parts, output, _ = sample_losses(model, q, a, state, generators)
            outputs.append(output)
            for name in COMPONENTS:
                sums[name] += float(parts[name].sum())
        count = self.val_q.shape[0]
        means = {name: value / count for name, value in sums.items()}
        with torch.autocast(self.device.type, enabled=False):
            targets = model.surface(self.val_a.float())
        similarity = F.normalize(torch.cat(outputs), dim=-1) @ F.normalize(targets, dim=-1).T
        hits = (similarity.argmax(dim=1) == torch.arange(count, device=self.device)).sum()
        return {
            "val_loss": sum(self.weights[name] * means[name] for name in COMPONENTS),
            **{f"val_{name}": value for name, value in means.items()},
            "val_retrieval": float(hits) / count,
            "pool_diversity": self.pool.diversity(),
        }

    def final_report(self, model: nn.Module) -> str | None:
        """The held-out results in one line, under the trainer's evaluation precision."""
        model.eval()
        try:
            with autocast(self.config.precision, self.device):
                results = self.evaluate(model, final=True)
        finally:
            model.train()
        return (
            f"held-out: loss {results['val_loss']:.4f} (surface {results['val_surface']:.4f}, "
            f"internal {results['val_internal']:.4f}, dialogue {results['val_dialogue']:.4f}); "
            f"answer retrieval {results['val_retrieval']:.1%} of {self.val_q.shape[0]}; "
            f"pool diversity {results['pool_diversity']:.4f}"
        )

    def close(self) -> None:
        self.pool.close()
