"""The configuration schema: every field that can change a result, with its documented default.

A config is YAML validated against ``Config``. Unknown keys, wrong types and out-of-range values
are ``ConfigError`` naming the key path, the bad value and what is expected. ``--set a.b=value``
overrides are applied to the raw mapping before validation, so they are checked the same way.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import os
import re
import typing
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    Strict,
    ValidationError,
    ValidationInfo,
    create_model,
    field_validator,
    model_validator,
)

from kiln.errors import ConfigError
from kiln.hashtron import settings as hashtron_settings

PACKAGED_CONFIGS = "kiln.configs"
DEFAULT_CONFIG_NAME = "default"

PositiveInt = Annotated[int, Field(ge=1)]
NonNegInt = Annotated[int, Field(ge=0)]
NonNegFloat = Annotated[float, Field(ge=0.0)]
Fraction = Annotated[float, Field(ge=0.0, le=1.0)]
Beta = Annotated[float, Field(ge=0.0, lt=1.0)]


def _positive_int_or_auto(value: Any) -> Any:
    """One clear error for a count that may also be 'auto' (instead of one per union member)."""
    if value == "auto" or (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
        return value
    raise ValueError("a whole number >= 1 or 'auto'")


PositiveIntOrAuto = Annotated[
    PositiveInt | Literal["auto"], BeforeValidator(_positive_int_or_auto)
]

_BYTE_UNITS = {
    "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
    "KiB": 2**10, "MiB": 2**20, "GiB": 2**30, "TiB": 2**40,
}  # fmt: skip
_BYTE_SIZE = re.compile(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([KMGT]i?B|B)\s*")


def _byte_size_or_auto(value: Any) -> Any:
    """Bytes as a whole number or a string with a unit ("512MiB", "1.5GB"), or 'auto'."""
    if isinstance(value, str) and (match := _BYTE_SIZE.fullmatch(value)):
        value = round(float(match[1]) * _BYTE_UNITS[match[2]])
    elif isinstance(value, float) and value.is_integer():  # 1e9, as YAML writes large numbers
        value = int(value)
    try:
        return _positive_int_or_auto(value)
    except ValueError:
        raise ValueError(
            "a whole number of bytes >= 1, a size with a unit (B, KB, MB, GB, TB or KiB, MiB, "
            "GiB, TiB; e.g. 512MiB) or 'auto'"
        ) from None


ByteSizeOrAuto = Annotated[PositiveInt | Literal["auto"], BeforeValidator(_byte_size_or_auto)]


class FilePath:
    """Marks a str field as a file-system path: ``resolve_config`` makes a relative one absolute,
    so a run resumed from another folder reads the same files. ``keywords`` are the field's
    values that name something packaged rather than a path."""

    def __init__(self, *keywords: str) -> None:
        self.keywords = keywords


def _type_parts(annotation: Any) -> list[Any]:
    """A field's type and everything inside it: union members, container origins and
    arguments, Annotated marks, Literal values."""
    parts = [annotation]
    origin = typing.get_origin(annotation)
    if origin is not None:
        parts.append(origin)
    for arg in typing.get_args(annotation):
        parts += _type_parts(arg)
    return parts


def _takes_a_bool(annotation: Any) -> bool:
    return any(p is bool or isinstance(p, bool) for p in _type_parts(annotation))


def _takes_a_number(annotation: Any) -> bool:
    return any(p is int or p is float for p in _type_parts(annotation))


class Section(BaseModel):
    """A config section: unknown keys are errors, values are checked on assignment too."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False)

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_for_a_number(cls, value: Any, info: ValidationInfo) -> Any:
        # pydantic reads true/false as 1/0 for numbers; `every_steps: false` would silently
        # mean 0 (no checkpoints), so a bool where a number belongs is an error.
        if isinstance(value, bool) and info.field_name is not None:
            annotation = cls.model_fields[info.field_name].annotation
            if _takes_a_number(annotation) and not _takes_a_bool(annotation):
                raise ValueError("a number, not true/false")
        return value


class RunSection(Section):
    """Where runs live and how they are named."""

    root: str = Field("experiments", description="Folder that holds one sub-folder per run.")
    name: str | None = Field(
        None, pattern=r"^[A-Za-z0-9_.-]+$", description="Optional label appended to the run id."
    )


class SourceSection(Section):
    """One corpus source: a root folder and glob patterns relative to it."""

    root: Annotated[str, FilePath("stdlib")] = Field(
        "stdlib", description="Folder to read; 'stdlib' is the running interpreter's stdlib."
    )
    include: list[str] = Field(["**/*.py"], min_length=1, description="Globs of files to read.")
    exclude: list[str] = Field(
        ["site-packages/**", "dist-packages/**", "**/test/**", "**/tests/**", "**/idle_test/**",
         "encodings/**"],
        description="Globs of files to skip (default: installed packages, the stdlib's tests "
        "and its generated codec tables).",
    )


class TokenizerSection(Section):
    """Byte-level BPE trained on the training split of the corpus."""

    # 256 byte tokens + the 7 special tokens (tests check this against the tokenizer).
    vocab_size: int = Field(8192, ge=256 + 7, le=1 << 20, description="Vocabulary size.")
    min_frequency: PositiveInt = Field(2, description="Minimum pair count for a merge.")
    train_bytes: PositiveInt = Field(
        8 << 20, description="Text budget (bytes) for tokenizer training."
    )


class DataSection(Section):
    """The corpus, its tokenization into shards, and the loader."""

    sources: list[SourceSection] = Field(
        default_factory=lambda: [SourceSection()], min_length=1, description="Corpus sources."
    )
    max_files: PositiveInt | None = Field(None, description="Read at most this many files.")
    cache_dir: Annotated[str, FilePath()] = Field(
        "~/.cache/kiln", description="Tokenizer and token shards, reused by content hash."
    )
    tokenizer: TokenizerSection = Field(default_factory=TokenizerSection)
    seq_len: PositiveInt = Field(256, description="Tokens per training window.")
    val_fraction: Annotated[float, Field(gt=0.0, lt=1.0)] = Field(
        0.02, description="Fraction of documents held out for validation."
    )
    shard_tokens: PositiveInt = Field(1 << 24, description="Maximum tokens per shard file.")
    shuffle: bool = Field(True, description="Seeded shuffle of windows each epoch.")
    prefetch: NonNegInt = Field(2, description="Batches prepared ahead in a background thread.")


class ComponentWeightsSection(Section):
    """Loss weight of each objective's tokens."""

    next_token: NonNegFloat = Field(1.0, description="Weight of plain next-token tokens.")
    fim: NonNegFloat = Field(1.0, description="Weight of tokens of FIM-transformed fragments.")
    cot: NonNegFloat = Field(1.0, description="Weight of chain-of-thought tokens (x role weight).")


class CotSection(Section):
    """Chain-of-thought records (JSONL: prompt, reasoning, answer) mixed into every step."""

    path: Annotated[str, FilePath("examples")] | None = Field(
        None, description="JSONL file of records; 'examples' is the packaged set; null: no CoT."
    )
    fraction: Annotated[float, Field(gt=0.0, lt=1.0)] = Field(
        0.25, description="Share of each step's windows drawn from the CoT data."
    )
    val_fraction: Annotated[float, Field(gt=0.0, lt=1.0)] = Field(
        0.1, description="Share of records held out for validation."
    )
    prompt_weight: NonNegFloat = Field(0.0, description="Weight of prompt tokens.")
    reasoning_weight: NonNegFloat = Field(1.0, description="Weight of reasoning tokens.")
    answer_weight: NonNegFloat = Field(1.0, description="Weight of answer tokens.")


class ObjectivesSection(Section):
    """What the LM learns: next token, fill-in-the-middle and chain of thought, in one pass."""

    weights: ComponentWeightsSection = Field(default_factory=ComponentWeightsSection)
    fim_rate: Fraction = Field(
        0.0, description="Probability that a document fragment of a window is FIM-transformed."
    )
    fim_spm_rate: Fraction = Field(
        0.5, description="Of the transformed fragments, the share in SPM order (else PSM)."
    )
    cot: CotSection = Field(default_factory=CotSection)


class ModelSection(Section):
    """GPT decoder sizes (pre-LayerNorm, causal attention, tied embeddings)."""

    n_layers: PositiveInt = Field(4, description="Transformer blocks.")
    n_heads: PositiveInt = Field(4, description="Attention heads per block.")
    d_model: PositiveInt = Field(256, description="Residual stream width.")
    mlp_ratio: PositiveInt = Field(4, description="MLP hidden width as a multiple of d_model.")
    dropout: Annotated[float, Field(ge=0.0, lt=1.0)] = Field(0.0, description="Dropout rate.")
    bias: bool = Field(True, description="Biases in linear layers and LayerNorms.")
    layernorm_eps: Annotated[float, Field(gt=0.0)] = Field(1e-5, description="LayerNorm epsilon.")
    init_std: Annotated[float, Field(gt=0.0)] = Field(0.02, description="Weight init std.")

    @model_validator(mode="after")
    def _heads_divide_width(self) -> ModelSection:
        if self.d_model % self.n_heads:
            raise ValueError(
                f"d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads})"
            )
        return self


class OptimizerSection(Section):
    """Optimizer and the explicit objective terms lambda_W*||theta||^2 + lambda_sparse*|theta|_1."""

    name: Literal["adamw", "adamw8bit", "sgd"] = Field(
        "adamw",
        description="adamw (default), adamw8bit (bitsandbytes 8-bit AdamW, the 'bnb' extra) "
        "or sgd.",
    )
    lr: Annotated[float, Field(gt=0.0)] = Field(1e-3, description="Peak learning rate.")
    betas: tuple[Beta, Beta] = Field((0.9, 0.95), description="AdamW betas, each in [0, 1).")
    eps: Annotated[float, Field(gt=0.0)] = Field(1e-8, description="AdamW epsilon.")
    weight_decay: NonNegFloat = Field(
        0.1, description="Decoupled weight decay (AdamW) or L2 decay (SGD); 2-D weights only."
    )
    momentum: Fraction = Field(0.9, description="SGD momentum.")
    nesterov: bool = Field(False, description="SGD Nesterov momentum.")
    l2: NonNegFloat = Field(0.0, description="lambda_W: adds l2 * sum(theta^2) to the loss.")
    l1: NonNegFloat = Field(0.0, description="lambda_sparse: adds l1 * sum(|theta|) to the loss.")


class ScheduleSection(Section):
    """Learning-rate schedule: linear warmup then decay to min_lr_ratio * lr (or in steps)."""

    name: Literal["cosine", "linear", "constant", "step"] = Field(
        "cosine", description="Decay shape: cosine, linear, constant, or step (multiply by "
        "gamma at each milestone)."
    )
    warmup_steps: NonNegInt = Field(24, description="Linear warmup steps from 0 to lr.")
    min_lr_ratio: Fraction = Field(0.1, description="Final lr as a fraction of the peak.")
    milestones: list[PositiveInt] = Field(
        [], description="step: optimizer steps (0-based) from which the lr is multiplied again."
    )
    gamma: Annotated[float, Field(gt=0.0)] = Field(
        0.1, description="step: the factor applied at each milestone."
    )


class TrainingSection(Section):
    """Loop length, batch shape and clipping."""

    max_steps: PositiveInt = Field(240, description="Optimizer steps to train.")
    micro_batch_size: PositiveInt = Field(16, description="Windows per forward/backward.")
    grad_accum_steps: PositiveInt = Field(1, description="Micro-batches per optimizer step.")
    grad_clip: NonNegFloat = Field(1.0, description="Global gradient-norm clip; 0 disables.")
    grad_normalization: Literal["none", "per_tensor"] = Field(
        "none",
        description="per_tensor: after clipping, divide each parameter's gradient by its own "
        "norm (+1e-8), as the Growing NCA recipe does.",
    )
    oom_retry: bool = Field(
        True, description="On out-of-memory halve the micro-batch, double accumulation, retry."
    )


class PrecisionSection(Section):
    """Compute precision. fp16 uses dynamic loss scaling; bf16 and fp32 do not need it."""

    dtype: Literal["fp32", "bf16", "fp16"] = Field("fp32", description="Autocast dtype.")
    loss_scale_init: Annotated[float, Field(gt=0.0)] = Field(
        65536.0, description="fp16 initial loss scale."
    )
    loss_scale_growth_interval: PositiveInt = Field(
        2000, description="fp16: steps without overflow before the scale grows."
    )


class HardwareSection(Section):
    """Where the run executes and how the CPU is used."""

    device: Literal["cpu", "cuda", "auto"] = Field("auto", description="auto picks cuda if any.")
    threads: PositiveIntOrAuto = Field(
        "auto",
        description="Torch intra-op threads; 'auto' resolves to the CPU count at start (divided "
        "among the data-parallel ranks on the machine) and the resolved number is recorded, "
        "since results differ in the last bits across counts.",
    )
    deterministic: bool = Field(True, description="Deterministic algorithms and cuDNN flags.")
    keep_freed_memory: bool = Field(
        False,
        description="glibc: keep large freed blocks on the heap for reuse instead of returning "
        "them to the OS (faster steps with big temporaries, e.g. the full lattice; resident "
        "memory stays at its peak).",
    )


class StrategySection(Section):
    """How the loop is placed: one process, data parallel over torch.distributed ranks, or one
    process streaming its weights from disk."""

    name: Literal["single", "ddp", "fsdp", "streaming"] = Field(
        "single",
        description="single: one process, one device; ddp: DistributedDataParallel replicas; "
        "fsdp: FSDP2 fully_shard (parameters, gradients and optimizer state sharded); "
        "streaming: parameters and optimizer state live on disk in chunks and stream through "
        "memory (README: Out-of-core training).",
    )
    world_size: PositiveIntOrAuto = Field(
        "auto",
        description="Ranks the global batch is planned for (global batch = micro_batch_size x "
        "grad_accum_steps x world_size); 'auto' records the launched world size at start. A "
        "resume with another world size keeps this global batch.",
    )
    backend: Literal["auto", "gloo", "nccl"] = Field(
        "auto", description="torch.distributed backend; auto: nccl on CUDA, gloo on CPU."
    )
    timeout_s: Annotated[float, Field(gt=0.0)] = Field(
        300.0,
        description="Collective timeout: a rank that dies or hangs fails the job after at most "
        "this long (must exceed the slowest checkpoint save or evaluation).",
    )
    memory_budget: ByteSizeOrAuto = Field(
        "auto",
        description="streaming: bytes of chunks, gradients and activations held in memory (a "
        "number, or with a unit: 512MiB, 2GB); auto: half the available RAM (GPU memory when "
        "training on cuda).",
    )
    store_dir: Annotated[str, FilePath()] | None = Field(
        None,
        description="streaming: folder of the chunk store; null: <run dir>/stream, else "
        "<store_dir>/<run id>.",
    )
    prefetch_chunks: NonNegInt = Field(
        1, description="streaming: chunks read ahead in the background while one computes."
    )
    direct_io: bool = Field(
        True,
        description="streaming: read and write chunk files with direct I/O (O_DIRECT), "
        "bypassing the page cache, where the filesystem supports it (not tmpfs); false: "
        "through the page cache.",
    )


class CheckpointSection(Section):
    """When checkpoints are written and how many are kept."""

    every_steps: NonNegInt = Field(80, description="Checkpoint every N steps; 0 disables.")
    every_minutes: NonNegFloat = Field(0.0, description="Also every N minutes; 0 disables.")
    keep_last: PositiveInt = Field(3, description="Newest checkpoints kept.")
    keep_best: bool = Field(True, description="Also keep the one with the best val loss.")


class SamplingSection(Section):
    """How an evaluation samples code from the model."""

    max_new_tokens: PositiveInt = Field(96, description="Token limit of one completion.")
    temperature: NonNegFloat = Field(0.8, description="Sampling temperature; 0 is greedy.")
    top_k: NonNegInt = Field(50, description="Sample among the top k tokens; 0 disables.")


class CompileEvalSection(SamplingSection):
    """Compile rate: functions completed from signatures found in held-out files."""

    prompts: PositiveInt = Field(32, description="Function prompts drawn from the val split.")
    scan_tokens: PositiveInt = Field(
        1 << 20, description="Val-split tokens searched for function signatures."
    )


class PassAtKSection(SamplingSection):
    """pass@k on function-completion problems with unit tests (runs generated code)."""

    problems: Annotated[str, FilePath("packaged")] = Field(
        "packaged", description="JSONL problem file; 'packaged' is Kiln's own set."
    )
    max_problems: PositiveInt | None = Field(None, description="Use the first N problems.")
    n: PositiveInt = Field(10, description="Samples per problem.")
    ks: list[PositiveInt] = Field([1, 10], min_length=1, description="k values reported.")
    timeout_s: Annotated[float, Field(gt=0.0)] = Field(
        5.0, description="Wall-clock limit of one candidate's tests."
    )
    cpu_seconds: PositiveInt = Field(5, description="CPU-time limit of one candidate.")
    memory_mb: PositiveInt = Field(512, description="Address-space limit of one candidate.")

    @model_validator(mode="after")
    def _some_k_fits_n(self) -> PassAtKSection:
        # A k above n is skipped; with none left, the first evaluation would fail after training.
        if min(self.ks) > self.n:
            raise ValueError(
                f"no k in ks {self.ks} can be estimated from n = {self.n} samples per problem; "
                f"raise n to at least {min(self.ks)} or add a k <= {self.n}"
            )
        return self


class EvalSection(Section):
    """Periodic evaluation, bounded in cost."""

    every_steps: NonNegInt = Field(80, description="Evaluate every N steps; 0: only at the end.")
    max_batches: PositiveInt = Field(8, description="Validation batches per evaluation.")
    batch_size: PositiveInt | None = Field(None, description="Default: micro_batch_size.")
    suites: list[Literal["ppl", "compile", "passk"]] = Field(
        ["ppl"], min_length=1, description="Suites run during training (ppl is required)."
    )
    max_time_fraction: Annotated[float, Field(gt=0.0, le=1.0)] = Field(
        0.2,
        description="A periodic compile/passk evaluation is skipped when it would take the "
        "time spent evaluating above this share of wall time; the final one always runs.",
    )
    allow_code_execution: bool = Field(
        False, description="Opt in to running generated code (needed by the passk suite)."
    )
    compile: CompileEvalSection = Field(default_factory=CompileEvalSection)
    passk: PassAtKSection = Field(default_factory=PassAtKSection)

    @model_validator(mode="after")
    def _suites_are_runnable(self) -> EvalSection:
        if "ppl" not in self.suites:
            raise ValueError(
                "suites must include 'ppl': validation loss picks the best checkpoint"
            )
        if "passk" in self.suites and not self.allow_code_execution:
            raise ValueError(
                "the passk suite runs model-generated code; set eval.allow_code_execution: true "
                "to opt in (see README: pass@k and the code-execution sandbox)"
            )
        return self


class LoggingSection(Section):
    """Metrics cadence, progress display and memory spike detection."""

    every_steps: PositiveInt = Field(10, description="Write a metrics row every N steps.")
    sample_ids: bool = Field(
        False,
        description="Debug aid: each rank appends the window ids it trains on per step to "
        "samples/rank<r>.jsonl.",
    )
    progress: bool = Field(True, description="Show a progress bar on a terminal.")
    memory_spike_ratio: Annotated[float, Field(gt=1.0)] = Field(
        1.25, description="Log a spike when memory exceeds this multiple of its running peak."
    )


class SampleSection(Section):
    """The code sample generated at the end of training (and `kiln generate` defaults)."""

    prompt: str = Field("def ", description="Prompt for the end-of-run sample.")
    max_new_tokens: NonNegInt = Field(64, description="Tokens to generate.")
    temperature: NonNegFloat = Field(0.8, description="Sampling temperature; 0 is greedy.")
    top_k: NonNegInt = Field(50, description="Sample among the top k tokens; 0 disables.")


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
JOB_SECTIONS = ("hashtron", "lattice", "nca")
_LM_ONLY = ("model", "data", "objectives", "sample")
_GRADIENT_ONLY = ("optimizer", "schedule", "training", "precision", "eval")
# What each job never reads: a value set there would change nothing, without a word.
UNREAD_SECTIONS: dict[str, tuple[str, ...]] = {
    "lm": JOB_SECTIONS,
    "lattice": (*_LM_ONLY, "hashtron", "nca"),
    "nca": (*_LM_ONLY, "hashtron", "lattice"),
    "hashtron": (*_LM_ONLY, *_GRADIENT_ONLY, "lattice", "nca"),
}


class Config(Section):
    """The whole truth about a run."""

    seed: NonNegInt = Field(1337, description="Seeds python, numpy and torch RNGs.")
    job: Literal["lm", "hashtron", "lattice", "nca"] = Field(
        "lm", description="What is trained: lm (the GPT code model), hashtron, lattice or nca."
    )
    run: RunSection = Field(default_factory=RunSection)
    model: ModelSection = Field(default_factory=ModelSection)
    data: DataSection = Field(default_factory=DataSection)
    objectives: ObjectivesSection = Field(default_factory=ObjectivesSection)
    optimizer: OptimizerSection = Field(default_factory=OptimizerSection)
    schedule: ScheduleSection = Field(default_factory=ScheduleSection)
    training: TrainingSection = Field(default_factory=TrainingSection)
    precision: PrecisionSection = Field(default_factory=PrecisionSection)
    hardware: HardwareSection = Field(default_factory=HardwareSection)
    strategy: StrategySection = Field(default_factory=StrategySection)
    checkpoint: CheckpointSection = Field(default_factory=CheckpointSection)
    eval: EvalSection = Field(default_factory=EvalSection)
    logging: LoggingSection = Field(default_factory=LoggingSection)
    sample: SampleSection = Field(default_factory=SampleSection)
    hashtron: HashtronSection = Field(default_factory=HashtronSection)
    lattice: LatticeSection = Field(default_factory=LatticeSection)
    nca: NcaSection = Field(default_factory=NcaSection)

    @model_validator(mode="after")
    def _strategy_fits_job(self) -> Config:
        name = self.strategy.name
        if name == "single":
            return self
        if self.job == "hashtron":
            raise ValueError(
                f"strategy.name: {name} trains gradient jobs only; the hashtron job runs in one "
                "process (set strategy.name: single)"
            )
        if name == "streaming" and self.optimizer.name not in ("adamw", "sgd"):
            raise ValueError(
                f"strategy.name: streaming keeps each chunk's optimizer state on disk for adamw "
                f"and sgd only, not {self.optimizer.name}; set optimizer.name: adamw or sgd"
            )
        if name == "streaming" and self.hardware.keep_freed_memory:
            raise ValueError(
                "hardware.keep_freed_memory keeps freed memory resident, which defeats "
                "strategy.name: streaming's memory budget; set it to false"
            )
        if self.job in ("lattice", "nca") and name in ("ddp", "fsdp"):
            raise ValueError(
                f"strategy.name: {name} is not available for the {self.job} job: its state pool "
                "lives in one process (set strategy.name: single)"
            )
        if name == "fsdp" and (self.optimizer.l1 or self.optimizer.l2):
            raise ValueError(
                "strategy.name: fsdp does not support optimizer.l1/l2 (the explicit terms are "
                "computed on whole parameters); set them to 0 or use strategy.name: ddp"
            )
        if name == "fsdp" and set(self.eval.suites) - {"ppl"}:
            raise ValueError(
                "strategy.name: fsdp evaluates ppl only during training (every rank must run "
                "the same forwards); set eval.suites: [ppl] and run `kiln eval` on the run"
            )
        return self

    @model_validator(mode="after")
    def _an_objective_has_weight(self) -> Config:
        if self.job != "lm":
            return self
        o = self.objectives
        cot = o.cot
        roles = cot.prompt_weight + cot.reasoning_weight + cot.answer_weight
        if not (
            o.weights.next_token > 0
            or (o.fim_rate > 0 and o.weights.fim > 0)
            or (cot.path is not None and o.weights.cot > 0 and roles > 0)
        ):
            raise ValueError(
                "objectives: every token would have loss weight 0, so nothing would train; "
                "give objectives.weights.next_token a positive weight (or weights.fim with "
                "fim_rate > 0, or weights.cot with cot.path set)"
            )
        return self

    @model_validator(mode="after")
    def _lattice_pool_fits_the_batch(self) -> Config:
        batch = self.training.micro_batch_size * self.training.grad_accum_steps
        if self.job == "lattice" and self.lattice.pool_size < batch:
            raise ValueError(
                f"lattice.pool_size ({self.lattice.pool_size}) must be at least the batch of "
                f"training.micro_batch_size x grad_accum_steps ({batch})"
            )
        return self

    @model_validator(mode="after")
    def _nca_pool_fits_the_batch(self) -> Config:
        batch = self.training.micro_batch_size * self.training.grad_accum_steps
        n = self.nca
        if self.job != "nca":
            return self
        if 0 < n.pool_size < batch:
            raise ValueError(
                f"nca.pool_size ({n.pool_size}) must be 0 or at least the batch of "
                f"training.micro_batch_size x grad_accum_steps ({batch})"
            )
        if n.damage and not n.pool_size:
            raise ValueError("nca.damage needs a pool (nca.pool_size > 0): it damages pool states")
        if n.damage >= batch:
            raise ValueError(
                f"nca.damage ({n.damage}) must be below the batch of "
                f"training.micro_batch_size x grad_accum_steps ({batch}): the worst sample "
                "is reseeded, so it cannot also be damaged"
            )
        return self

    def to_yaml(self) -> str:
        """The resolved config as YAML (the run's snapshot), without other jobs' sections."""
        others = {name for name in JOB_SECTIONS if name != self.job}
        return yaml.safe_dump(self.model_dump(mode="json", exclude=others), sort_keys=False)

    def fingerprint(self) -> str:
        """Short hash of the resolved config."""
        return hashlib.sha256(self.to_yaml().encode()).hexdigest()[:12]


def packaged_config_names() -> list[str]:
    """Names accepted by ``--config NAME``."""
    folder = resources.files(PACKAGED_CONFIGS)
    return sorted(p.name[: -len(".yaml")] for p in folder.iterdir() if p.name.endswith(".yaml"))


def read_config_source(name_or_path: str | None) -> tuple[dict[str, Any], str]:
    """Load the raw mapping of a packaged config name or a YAML file; return it and its origin."""
    name = name_or_path or DEFAULT_CONFIG_NAME
    path = Path(name).expanduser()
    if path.suffix in (".yaml", ".yml") or os.sep in name or path.exists():
        if path.is_dir():
            raise ConfigError(f"config file {path} is a folder; pass a YAML file inside it")
        if not path.is_file():
            raise ConfigError(
                f"config file {path} does not exist; pass a YAML file or one of the packaged "
                f"names: {', '.join(packaged_config_names())}"
            )
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as exc:  # e.g. saved as UTF-16 by an editor
            raise ConfigError(
                f"config file {path} is not UTF-8 text ({exc.reason} at byte {exc.start}); "
                "save it as UTF-8"
            ) from None
        return _parse_yaml(text, str(path)), str(path)
    if name not in packaged_config_names():
        raise ConfigError(
            f"unknown config {name!r}: not a file and not a packaged config "
            f"(packaged: {', '.join(packaged_config_names())})"
        )
    text = resources.files(PACKAGED_CONFIGS).joinpath(f"{name}.yaml").read_text(encoding="utf-8")
    return _parse_yaml(text, f"packaged config {name!r}"), f"packaged:{name}"


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, except that a key given twice in one mapping is an error (PyYAML keeps
    the last one silently, so a second `model:` section would replace the first)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} appears twice in one mapping", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep)


# PyYAML follows YAML 1.1, where a float needs a dot: `1e-4` would be the string "1e-4", which a
# strict field then refuses. Read exponent floats as YAML 1.2 does, in files and overrides alike.
_UniqueKeyLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."),
)


def _parse_yaml(text: str, origin: str) -> dict[str, Any]:
    try:
        raw = yaml.load(text, Loader=_UniqueKeyLoader)  # a SafeLoader: no arbitrary objects
    except yaml.YAMLError as exc:
        raise ConfigError(f"{origin} is not valid YAML: {exc}") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(
            f"{origin} must be a mapping of sections (seed, model, data, ...), "
            f"got {type(raw).__name__}"
        )
    return raw


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``key.path=value`` overrides; values are parsed as YAML scalars or lists."""
    result = copy.deepcopy(raw)
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {item!r} must look like key.path=value")
        parts = key.strip().split(".")
        try:
            value = yaml.load(text, Loader=_UniqueKeyLoader) if text.strip() else ""
        except yaml.YAMLError as exc:
            raise ConfigError(f"override {item!r}: value is not valid YAML: {exc}") from None
        _check_known_path(parts, item)
        node = result
        for part in parts[:-1]:
            child = node.get(part)
            if not isinstance(child, dict):
                child = {}
                node[part] = child
            node = child
        node[parts[-1]] = value
    return result


def _check_known_path(parts: list[str], item: str) -> None:
    """Reject an override whose key path the schema does not have, naming the valid keys."""
    model: type[BaseModel] | None = Config
    for depth, part in enumerate(parts):
        if model is None:
            break
        fields = model.model_fields
        if part not in fields:
            where = ".".join(parts[:depth]) or "the top level"
            raise ConfigError(
                f"override {item!r}: unknown key {'.'.join(parts[: depth + 1])!r}; "
                f"valid keys at {where}: {', '.join(fields)}"
            )
        annotation = fields[part].annotation
        section = isinstance(annotation, type) and issubclass(annotation, BaseModel)
        mapping = annotation is dict or typing.get_origin(annotation) is dict  # free-form keys
        if depth + 1 < len(parts) and not (section or mapping):
            key = ".".join(parts[: depth + 1])
            if any(p is list for p in _type_parts(annotation)):
                raise ConfigError(
                    f"override {item!r}: {key} is a list; an override sets it whole, e.g. "
                    f"--set '{key}=[...]' (YAML flow style)"
                )
            raise ConfigError(f"override {item!r}: {key} is a single value, it has no keys")
        model = annotation if section else None


def validate_config(raw: dict[str, Any]) -> Config:
    """Validate a raw mapping into a Config, turning pydantic errors into one clear ConfigError."""
    try:
        return Config.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc)) from None


def format_validation_error(exc: ValidationError) -> str:
    """One line per problem: key path, bad value, what is expected."""
    lines = [f"invalid config ({exc.error_count()} problem{'s' * (exc.error_count() > 1)}):"]
    for err in exc.errors():
        path = _key_path(err["loc"]) or "(top level)"
        if err["type"] == "extra_forbidden":
            lines.append(
                f"  {path}: unknown key (value {err['input']!r}); remove it or fix its spelling"
            )
            continue
        if isinstance(err["input"], dict):  # a whole section failed a cross-field check
            message = _expected(err)
            # a whole-config check, or one that already names the key path, speaks for itself
            named = not err["loc"] or message.startswith(f"{path}.")
            lines.append(f"  {message}" if named else f"  {path}: {message}")
            continue
        lines.append(f"  {path}: got {err['input']!r}; expected {_expected(err)}")
    return "\n".join(lines)


def _key_path(loc: tuple[int | str, ...]) -> str:
    """``('data', 'sources', 0, 'root')`` -> ``data.sources[0].root``."""
    path = ""
    for part in loc:
        path += f"[{part}]" if isinstance(part, int) else f"{'.' if path else ''}{part}"
    return path


def _expected(err: Any) -> str:
    msg: str = err["msg"]
    for prefix in ("Input should be ", "Value error, "):
        if msg.startswith(prefix):
            msg = msg[len(prefix) :]
    return msg


def load_config(name_or_path: str | None = None, overrides: list[str] | None = None) -> Config:
    """Read, override and validate a config; the one way the CLI turns input into a Config."""
    raw, _ = read_config_source(name_or_path)
    config = validate_config(apply_overrides(raw, overrides or []))
    _refuse_unread_settings(config)
    return config


def _refuse_unread_settings(config: Config) -> None:
    """A ConfigError naming every setting, changed from its default, that the job never reads.

    Checked on what the user gave, not on run snapshots: resolving a config rewrites paths in
    sections the job ignores, and an old run must stay resumable.
    """
    unread = [
        f"{name}.{key}"
        for name in UNREAD_SECTIONS[config.job]
        for key in _changed_keys(
            getattr(config, name).model_dump(), type(getattr(config, name))().model_dump()
        )
    ]
    if unread:
        own = f" ({config.job}'s own settings are under {config.job}.*)" * (
            config.job in JOB_SECTIONS
        )
        raise ConfigError(
            f"job {config.job} does not read {', '.join(unread)}: a value set there changes "
            f"nothing; remove it, or set `job` to the job that reads it{own}"
        )


def _changed_keys(values: dict[str, Any], defaults: dict[str, Any], prefix: str = "") -> list[str]:
    """Dotted keys whose value differs from the default, nested sections followed."""
    changed = []
    for key, value in values.items():
        default = defaults.get(key)
        if isinstance(value, dict) and isinstance(default, dict) and value and default:
            changed += _changed_keys(value, default, f"{prefix}{key}.")
        elif value != default:
            changed.append(f"{prefix}{key}")
    return changed


def resolve_config(config: Config) -> Config:
    """Pin what 'auto' and the current folder leave open, so the snapshot records it: the thread
    count, the device, and every relative file path (made absolute)."""
    resolved = config.model_copy(deep=True)
    for setting in path_settings(resolved):
        setting.set(_absolute(setting.value))
    if resolved.hardware.threads == "auto":
        # torchrun's workers on this machine (LOCAL_WORLD_SIZE) share its CPUs: threads beyond
        # their share oversubscribe the cores and slow every rank down.
        ranks_here = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        resolved.hardware.threads = max(1, (os.cpu_count() or 1) // ranks_here)
    if resolved.hardware.device == "auto":
        import torch

        resolved.hardware.device = "cuda" if torch.cuda.is_available() else "cpu"
    return resolved


def _absolute(path: str) -> str:
    """``path`` made absolute against the current folder; a ``~`` path is left as written."""
    return path if os.path.isabs(os.path.expanduser(path)) else os.path.abspath(path)


@dataclasses.dataclass(frozen=True)
class PathSetting:
    """One file-system path a config names: its key path, its value, and how to change it."""

    key: str
    value: str
    set: typing.Callable[[str], None]


def path_settings(config: Config) -> list[PathSetting]:
    """Every path the config names: ``FilePath`` fields holding a path (not a packaged name, not
    null) in the sections the job reads, and the hashtron task's ``path``/``root`` options.

    The sections a job never reads keep their defaults, so its snapshot (an export's
    config.yaml) loads again with ``load_config``."""
    found: list[PathSetting] = []
    _collect_paths(config, "", set(UNREAD_SECTIONS[config.job]), found)
    options = config.hashtron.task.options
    if config.job == "hashtron":
        for key in ("path", "root"):  # the csv/jsonl file and the MNIST folder
            if isinstance(options.get(key), str):
                found.append(PathSetting(f"hashtron.task.options.{key}", options[key],
                                         lambda v, k=key: options.__setitem__(k, v)))
    return found


def _collect_paths(
    section: BaseModel, prefix: str, skip: set[str], found: list[PathSetting]
) -> None:
    for name, field in type(section).model_fields.items():
        if name in skip:
            continue
        value, key = getattr(section, name), f"{prefix}{name}"
        # pydantic keeps a plain Annotated field's marks in field.metadata, a union's in its type
        marks = [
            m for m in (*field.metadata, *_type_parts(field.annotation)) if isinstance(m, FilePath)
        ]
        if marks and isinstance(value, str) and value not in marks[0].keywords:
            found.append(PathSetting(key, value, lambda v, o=section, n=name: setattr(o, n, v)))
        children = value if isinstance(value, list) else [value]
        for index, child in enumerate(children):
            if isinstance(child, BaseModel):
                where = f"{key}[{index}]." if isinstance(value, list) else f"{key}."
                _collect_paths(child, where, set(), found)
