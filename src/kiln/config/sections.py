"""The engine's config sections: run, data, model, optimizer, schedule, training, hardware,
strategy, checkpoints, evaluation, logging and sampling."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, model_validator

from kiln.config.fields import (
    Beta,
    ByteSizeOrAuto,
    FilePath,
    Fraction,
    NonNegFloat,
    NonNegInt,
    PositiveInt,
    PositiveIntOrAuto,
    Section,
)


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
