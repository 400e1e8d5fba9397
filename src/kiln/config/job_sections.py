"""The config sections that one job alone reads: hashtron, lattice and nca."""

from __future__ import annotations

import dataclasses
import typing
from typing import Annotated, Any, Literal

from pydantic import BaseModel, Field, Strict, create_model, model_validator

from kiln.config.fields import FilePath, NonNegFloat, NonNegInt, PositiveInt, Section
from kiln.errors import ConfigError
from kiln.hashtron import settings as hashtron_settings


def _hashtron_subsection(settings_cls: type, where: str) -> type[Section]:
    """A config section with the keys, defaults and docs of a ``kiln.hashtron.settings`` class.

    The hashtron settings live next to the hashtron code (one frozen dataclass per concern, with
    a ``DOCS`` table and a ``check`` of the ranges); this derives their schema instead of
    copying it. Types are strict (``epochs: 2.5`` or ``true`` is not an integer); ranges are
    checked by the dataclass itself, with the key path.
    """
    hints = typing.get_type_hints(settings_cls)
    fields: dict[str, Any] = {}
    for f in dataclasses.fields(settings_cls):
        default: dict[str, Any] = (
            {"default_factory": f.default_factory}
            if f.default is dataclasses.MISSING
            else {"default": f.default}
        )
        fields[f.name] = (
            Annotated[hints[f.name], Strict()],
            Field(**default, description=settings_cls.DOCS[f.name]),
        )

    def check_ranges(section: BaseModel) -> BaseModel:
        try:
            settings_cls(**dict(section)).check(where)
        except ConfigError as exc:
            raise ValueError(str(exc)) from None
        return section

    return create_model(
        f"Hashtron{settings_cls.__name__.removesuffix('Settings')}Section",
        __base__=Section,
        __doc__=settings_cls.__doc__,
        __validators__={"check_ranges": model_validator(mode="after")(check_ranges)},
        **fields,
    )


HashtronTaskSection = _hashtron_subsection(hashtron_settings.TaskSettings, "hashtron.task")
HashtronPipelineSection = _hashtron_subsection(
    hashtron_settings.PipelineSettings, "hashtron.pipeline"
)
HashtronCapacitySection = _hashtron_subsection(
    hashtron_settings.CapacitySettings, "hashtron.capacity"
)
HashtronGoldZoneSection = _hashtron_subsection(
    hashtron_settings.GoldZoneSettings, "hashtron.gold_zone"
)
HashtronCacheSection = _hashtron_subsection(hashtron_settings.CacheSettings, "hashtron.cache")
HashtronAlertsSection = _hashtron_subsection(hashtron_settings.AlertSettings, "hashtron.alerts")
_LAYERS_DOC = next(
    f.metadata["doc"]
    for f in dataclasses.fields(hashtron_settings.HashtronSettings)
    if f.name == "layers"
)


class HashtronSection(Section):
    """The hashtron job (``job: hashtron``): a network of hashing neurons trained one neuron
    per step by the backward (or forward) pipeline. Keys, defaults, docs and range checks come
    from ``kiln.hashtron.settings``; the layers and the task are checked when the run starts,
    before its directory is created."""

    task: HashtronTaskSection = Field(default_factory=HashtronTaskSection)
    layers: list[dict[str, Any]] | None = Field(None, min_length=1, description=_LAYERS_DOC)
    pipeline: HashtronPipelineSection = Field(default_factory=HashtronPipelineSection)
    capacity: HashtronCapacitySection = Field(default_factory=HashtronCapacitySection)
    gold_zone: HashtronGoldZoneSection = Field(default_factory=HashtronGoldZoneSection)
    cache: HashtronCacheSection = Field(default_factory=HashtronCacheSection)
    alerts: HashtronAlertsSection = Field(default_factory=HashtronAlertsSection)

    def to_settings(self) -> hashtron_settings.HashtronSettings:
        """The validated section as the settings object the hashtron pipeline takes."""
        return hashtron_settings.HashtronSettings.from_dict(self.model_dump())


class LatticeLossSection(Section):
    """Fixed weights of the lattice job's loss components (config values, never trained)."""

    surface: NonNegFloat = Field(
        1.0, description="Mean squared error between the back-face output and the answer embedding."
    )
    internal: NonNegFloat = Field(
        0.1,
        description="Smoothness of the internal state: mean squared difference between "
        "adjacent depth slices of the visible channels.",
    )
    dialogue: NonNegFloat = Field(
        1.0, description="1 - cosine between the output and the answer embedding."
    )


class LatticeSection(Section):
    """The lattice job (``job: lattice``): a 3D grid of gMLP cells maps a question's embedding,
    written on its front face, to the answer's embedding, read from its back face."""

    depth: int = Field(
        11, ge=2, description="Cells along z (input face z=0, output z=D-1, so at least 2)."
    )
    height: PositiveInt = Field(15, description="Cells along y.")
    width: PositiveInt = Field(15, description="Cells along x; a face holds height*width values.")
    channels: PositiveInt = Field(32, description="Visible state channels per cell.")
    memory: NonNegInt = Field(16, description="Private memory channels per cell; 0: none.")
    hidden: PositiveInt = Field(184, description="Half width of a cell's gMLP channel projection.")
    sharing: Literal["none", "per_depth", "all"] = Field(
        "none", description="Weights per cell (none), per depth slice, or one set (all: 3D NCA)."
    )
    boundary: Literal["zero", "replicate", "periodic"] = Field(
        "zero", description="What neighbours beyond the faces read."
    )
    steps: PositiveInt | None = Field(
        None, description="Propagation steps per sample; null: depth - 1 (crosses the depth)."
    )
    fire_rate: Annotated[float, Field(gt=0.0, le=1.0)] = Field(
        1.0, description="Probability that a cell applies its update in a step (seeded)."
    )
    alive_threshold: float | None = Field(
        None, description="NCA alive masking on channel 0 at this threshold; null: off."
    )
    inject: Literal["once", "every_step"] = Field(
        "once", description="Write the input on the front face once or before every step."
    )
    encoder: Literal["minilm", "hashed"] = Field(
        "minilm",
        description="Teacher text encoder: minilm (all-MiniLM-L6-v2, the 'minilm' extra) or "
        "hashed (deterministic trigram hashing, no model).",
    )
    encoder_dim: PositiveInt = Field(64, description="Embedding size of the hashed encoder.")
    dialogue_path: Annotated[str, FilePath("packaged")] = Field(
        "packaged", description="JSONL of {question, answer}; 'packaged' is Kiln's stdlib set."
    )
    val_fraction: Annotated[float, Field(gt=0.0, lt=1.0)] = Field(
        0.1, description="Share of dialogue pairs held out for validation (seeded split)."
    )
    eval_pairs: PositiveInt = Field(
        32, description="Validation pairs used per evaluation (the first N of the held-out set)."
    )
    cache_dir: Annotated[str, FilePath()] | None = Field(
        "~/.cache/kiln/embeddings",
        description="Teacher embeddings cached by content hash; null: no cache.",
    )
    pool_size: PositiveInt = Field(
        32, description="Lattice states kept between steps (at least the step's batch)."
    )
    seed_scale: NonNegFloat = Field(
        1.0,
        description="Seed state: visible channels alternate +seed_scale, -seed_scale; 0 is the "
        "empty lattice, whose LayerNorms make gradients explode with depth.",
    )
    replace_worst: bool = Field(
        True, description="Each step, reset the batch's highest-loss pool state to the seed."
    )
    loss: LatticeLossSection = Field(default_factory=LatticeLossSection)
    activation_checkpointing: bool = Field(
        False, description="Recompute each propagation step in backward (less memory, slower)."
    )
    channels_last_3d: bool = Field(
        True,
        description="Keep pool states channels-last (B, D, H, W, K), the model's layout; false "
        "stores them channels-first (B, K, D, H, W) and permutes per batch.",
    )

    @model_validator(mode="after")
    def _output_can_depend_on_the_question(self) -> LatticeSection:
        """Refuse shapes that run but would train a constant: no question reaches the answer."""
        steps = self.steps if self.steps is not None else self.depth - 1
        # A step moves information by one cell, so the front face needs depth - 1 steps to reach
        # the back face; a periodic boundary makes the two faces neighbours.
        if self.boundary != "periodic" and steps < self.depth - 1:
            raise ValueError(
                f"lattice.steps {steps} is fewer than lattice.depth - 1 ({self.depth - 1}): "
                "the question written on the front face would never reach the back face the "
                "answer is read from; set lattice.steps to at least depth - 1 (or null), or use "
                "lattice.boundary: periodic"
            )
        if self.channels < 2:
            # LayerNorm over a single channel is 0 for every input: the cells would see nothing.
            raise ValueError(
                "lattice.channels 1: a cell normalises its neighbours' channels, and one channel "
                "normalises to 0 whatever it holds, so no state could pass between cells; set "
                "lattice.channels to 2 or more"
            )
        return self


class NcaSection(Section):
    """The Growing Neural Cellular Automata job (``job: nca``): a 2-D automaton grown from one
    seed cell into a target image, trained from a pool of states (Mordvintsev et al. 2020)."""

    target: Annotated[str, FilePath("default")] = Field(
        "default", description="RGBA PNG to grow; 'default' is the packaged kiln-flame image."
    )
    target_size: PositiveInt = Field(
        40, description="Longer side of the target in cells; the image is scaled down to it "
        "(never up)."
    )
    padding: NonNegInt = Field(16, description="Empty cells around the target on each side.")
    channels: Annotated[int, Field(ge=4)] = Field(
        16, description="State channels per cell: RGBA + hidden."
    )
    hidden: PositiveInt = Field(128, description="Width of the update network.")
    fire_rate: Annotated[float, Field(gt=0.0, le=1.0)] = Field(
        0.5, description="Probability that a cell applies its update in a step."
    )
    alive_threshold: Annotated[float, Field(ge=0.0)] | None = Field(
        0.1, description="A cell lives while some alpha in its 3x3 neighbourhood exceeds this; "
        "null: no alive masking."
    )
    boundary: Literal["zero", "replicate", "periodic"] = Field(
        "zero", description="What perception sees beyond the grid's edges: zero, replicate "
        "(the edge cell) or periodic (the opposite edge)."
    )
    activation_checkpointing: bool = Field(
        False, description="Recompute each automaton step in backward instead of storing it."
    )
    pool_size: NonNegInt = Field(
        1024, description="States in the sample pool; 0: every batch grows from the seed."
    )
    rollout_min: PositiveInt = Field(64, description="Fewest automaton steps per rollout.")
    rollout_max: PositiveInt = Field(96, description="Most automaton steps per rollout.")
    damage: NonNegInt = Field(
        0, description="Lowest-loss samples of each batch that get a random disc erased "
        "(regeneration training; the paper uses 3)."
    )
    eval_steps: list[PositiveInt] = Field(
        [96, 192], min_length=1, description="Evaluation grows patterns from the seed and "
        "reports the loss after each of these step counts; val_loss is the worst of them."
    )
    eval_samples: PositiveInt = Field(8, description="Patterns grown per evaluation.")
    render_steps: list[NonNegInt] = Field(
        [0, 16, 32, 64, 96, 192, 384], min_length=1,
        description="Steps shown side by side in the growth strip (the GIF runs to the last).",
    )
    render_gif_every: PositiveInt = Field(4, description="Automaton steps per GIF frame.")
    render_scale: PositiveInt = Field(4, description="Pixels per cell in rendered images.")

    @model_validator(mode="after")
    def _rollout_range(self) -> NcaSection:
        if self.rollout_min > self.rollout_max:
            raise ValueError(
                f"nca.rollout_min ({self.rollout_min}) must be <= nca.rollout_max "
                f"({self.rollout_max})"
            )
        return self


# Sections that only one job reads (named like the job): nothing else can change a result.
