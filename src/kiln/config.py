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
import typing
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    Strict,
    ValidationError,
    create_model,
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


class Section(BaseModel):
    """A config section: unknown keys are errors, values are checked on assignment too."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False)


class RunSection(Section):
    """Where runs live and how they are named."""

    root: str = Field("experiments", description="Folder that holds one sub-folder per run.")
    name: str | None = Field(
        None, pattern=r"^[A-Za-z0-9_.-]+$", description="Optional label appended to the run id."
    )


class SourceSection(Section):
    """One corpus source: a root folder and glob patterns relative to it."""

    root: str = Field(
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
    cache_dir: str = Field(
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

    path: str | None = Field(
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

    name: Literal["adamw", "sgd"] = Field("adamw", description="adamw (default) or sgd.")
    lr: Annotated[float, Field(gt=0.0)] = Field(1e-3, description="Peak learning rate.")
    betas: tuple[Fraction, Fraction] = Field((0.9, 0.95), description="AdamW betas.")
    eps: Annotated[float, Field(gt=0.0)] = Field(1e-8, description="AdamW epsilon.")
    weight_decay: NonNegFloat = Field(
        0.1, description="Decoupled weight decay (AdamW) or L2 decay (SGD); 2-D weights only."
    )
    momentum: Fraction = Field(0.9, description="SGD momentum.")
    nesterov: bool = Field(False, description="SGD Nesterov momentum.")
    l2: NonNegFloat = Field(0.0, description="lambda_W: adds l2 * sum(theta^2) to the loss.")
    l1: NonNegFloat = Field(0.0, description="lambda_sparse: adds l1 * sum(|theta|) to the loss.")


class ScheduleSection(Section):
    """Learning-rate schedule: linear warmup then decay to min_lr_ratio * lr."""

    name: Literal["cosine", "linear", "constant"] = Field("cosine", description="Decay shape.")
    warmup_steps: NonNegInt = Field(24, description="Linear warmup steps from 0 to lr.")
    min_lr_ratio: Fraction = Field(0.1, description="Final lr as a fraction of the peak.")


class TrainingSection(Section):
    """Loop length, batch shape and clipping."""

    max_steps: PositiveInt = Field(240, description="Optimizer steps to train.")
    micro_batch_size: PositiveInt = Field(16, description="Windows per forward/backward.")
    grad_accum_steps: PositiveInt = Field(1, description="Micro-batches per optimizer step.")
    grad_clip: NonNegFloat = Field(1.0, description="Global gradient-norm clip; 0 disables.")
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
    threads: PositiveInt | Literal["auto"] = Field(
        "auto",
        description="Torch intra-op threads; 'auto' resolves to the CPU count at start and the "
        "resolved number is recorded, since results differ in the last bits across counts.",
    )
    deterministic: bool = Field(True, description="Deterministic algorithms and cuDNN flags.")


class StrategySection(Section):
    """How the loop is placed. More strategies arrive with their own issues."""

    name: Literal["single", "streaming"] = Field(
        "single",
        description="single: one process, one device. streaming: parameters and optimizer "
        "state live on disk in chunks and stream through memory (README: Out-of-core training).",
    )
    memory_budget: PositiveInt | Literal["auto"] = Field(
        "auto",
        description="streaming: bytes of chunks, gradients and activations held in memory; "
        "auto: half the available RAM (GPU memory when training on cuda).",
    )
    store_dir: str | None = Field(
        None,
        description="streaming: folder of the chunk store; null: <run dir>/stream, else "
        "<store_dir>/<run id>.",
    )
    prefetch_chunks: NonNegInt = Field(
        1, description="streaming: chunks read ahead in the background while one computes."
    )
    drop_page_cache: bool = Field(
        False,
        description="streaming: advise the kernel to drop chunk file pages after each read "
        "and write, so chunks really come from disk (benchmarks).",
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

    problems: str = Field(
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


class Config(Section):
    """The whole truth about a run."""

    seed: NonNegInt = Field(1337, description="Seeds python, numpy and torch RNGs.")
    job: Literal["lm", "hashtron"] = Field(
        "lm", description="What is trained: lm (the GPT code model) or hashtron."
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

    def to_yaml(self) -> str:
        """The full resolved config as YAML (the run's snapshot)."""
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)

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
        if not path.is_file():
            raise ConfigError(
                f"config file {path} does not exist; pass a YAML file or one of the packaged "
                f"names: {', '.join(packaged_config_names())}"
            )
        return _parse_yaml(path.read_text(encoding="utf-8"), str(path)), str(path)
    if name not in packaged_config_names():
        raise ConfigError(
            f"unknown config {name!r}: not a file and not a packaged config "
            f"(packaged: {', '.join(packaged_config_names())})"
        )
    text = resources.files(PACKAGED_CONFIGS).joinpath(f"{name}.yaml").read_text(encoding="utf-8")
    return _parse_yaml(text, f"packaged config {name!r}"), f"packaged:{name}"


def _parse_yaml(text: str, origin: str) -> dict[str, Any]:
    try:
        raw = yaml.safe_load(text)
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
            value = yaml.safe_load(text) if text.strip() else ""
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
        model = (
            annotation
            if isinstance(annotation, type) and issubclass(annotation, BaseModel)
            else None
        )


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
        path = ".".join(str(p) for p in err["loc"]) or "(top level)"
        if err["type"] == "extra_forbidden":
            lines.append(
                f"  {path}: unknown key (value {err['input']!r}); remove it or fix its spelling"
            )
            continue
        if isinstance(err["input"], dict):  # a whole section failed a cross-field check
            message = _expected(err)
            named = message.startswith(f"{path}.")  # the check already names the key path
            lines.append(f"  {message}" if named else f"  {path}: {message}")
            continue
        lines.append(f"  {path}: got {err['input']!r}; expected {_expected(err)}")
    return "\n".join(lines)


def _expected(err: Any) -> str:
    msg: str = err["msg"]
    for prefix in ("Input should be ", "Value error, "):
        if msg.startswith(prefix):
            msg = msg[len(prefix) :]
    return msg


def load_config(name_or_path: str | None = None, overrides: list[str] | None = None) -> Config:
    """Read, override and validate a config; the one way the CLI turns input into a Config."""
    raw, _ = read_config_source(name_or_path)
    return validate_config(apply_overrides(raw, overrides or []))


def resolve_config(config: Config) -> Config:
    """Pin values that 'auto' leaves open on this machine, so the snapshot records them."""
    resolved = config.model_copy(deep=True)
    if resolved.hardware.threads == "auto":
        resolved.hardware.threads = os.cpu_count() or 1
    if resolved.hardware.device == "auto":
        import torch

        resolved.hardware.device = "cuda" if torch.cuda.is_available() else "cpu"
    return resolved
