"""The code language-model job: corpus -> BPE -> token shards -> GPT; next-token, FIM and CoT."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kiln.config import Config
from kiln.data.corpus import Source
from kiln.data.loader import Stream, WindowLoader, WindowTransform
from kiln.data.mixture import MixedBatches
from kiln.data.objectives import (
    COMPONENTS,
    CodeWindows,
    ComponentWeights,
    CotData,
    CotWeights,
    CotWindows,
    FimSpec,
    load_cot_records,
    split_cot_records,
)
from kiln.data.shards import TokenData, prepare_token_data
from kiln.data.tokenizer import KilnTokenizer
from kiln.engine.distributed import global_batch_size
from kiln.errors import ConfigError, DataError
from kiln.eval.perplexity import token_cross_entropy, validation_windows
from kiln.fsio import atomic_write
from kiln.jobs.lm_eval import LMEvaluator
from kiln.jobs.lm_sampling import NonFiniteWeights, sample_text
from kiln.models.gpt import GPT, GPTShape

TOKENIZER_FILE = "tokenizer.json"


def build_model(config: Config, vocab_size: int) -> GPT:
    """The GPT the config describes, freshly initialised from the global torch RNG."""
    m = config.model
    return GPT(
        GPTShape(
            vocab_size=vocab_size,
            context=config.data.seq_len,
            n_layers=m.n_layers,
            n_heads=m.n_heads,
            d_model=m.d_model,
            mlp_ratio=m.mlp_ratio,
            dropout=m.dropout,
            bias=m.bias,
            layernorm_eps=m.layernorm_eps,
            init_std=m.init_std,
        )
    )


def prepare_data(config: Config, log: Callable[[str], None]) -> TokenData:
    """Tokenizer and shards for the config's corpus, built once and reused by content hash."""
    d = config.data
    return prepare_token_data(
        [Source(s.root, tuple(s.include), tuple(s.exclude)) for s in d.sources],
        Path(d.cache_dir).expanduser(),
        vocab_size=d.tokenizer.vocab_size,
        min_frequency=d.tokenizer.min_frequency,
        val_fraction=d.val_fraction,
        split_seed=config.seed,
        shard_tokens=d.shard_tokens,
        max_files=d.max_files,
        tokenizer_train_bytes=d.tokenizer.train_bytes,
        log=log,
    )


def weighted_token_loss(
    model: nn.Module, batch: dict[str, torch.Tensor]
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Every objective's loss from one forward pass over a batch of weighted windows.

    The batch carries step-level normalisers (``data/mixture.py``): the returned loss, weighted
    by the trainer by this micro-batch's share of samples, sums to the step's weighted mean, and
    each component to its mean over the step's trained tokens of that component.
    """
    ce = token_cross_entropy(model, batch["tokens"])  # (B, T)
    positions = ce.numel()
    loss = (ce * batch["weights"]).sum() / positions
    scaled = ce.detach() * batch["component_scale"]
    components = batch["components"]
    # One host read for all components: which of them this micro-batch trains at all.
    present = torch.bincount(
        components[batch["component_scale"] > 0], minlength=len(COMPONENTS)
    ).tolist()
    parts = {
        name: (scaled * (components == index)).sum() / positions
        for index, name in enumerate(COMPONENTS)
        if present[index] > 0
    }
    return loss, parts


def window_tokens(batch: dict[str, torch.Tensor]) -> int:
    """Predicted tokens in a batch of windows: seq_len per window of seq_len + 1."""
    tokens = batch["tokens"]
    return tokens.shape[0] * (tokens.shape[1] - 1)


def objective_settings(config: Config) -> tuple[ComponentWeights, FimSpec, CotWeights]:
    """The objectives section as the data transforms take it."""
    o = config.objectives
    return (
        ComponentWeights(o.weights.next_token, o.weights.fim, o.weights.cot),
        FimSpec(o.fim_rate, o.fim_spm_rate),
        CotWeights(o.cot.prompt_weight, o.cot.reasoning_weight, o.cot.answer_weight),
    )


def step_split(config: Config) -> tuple[int, int]:
    """Windows per step over all ranks from the corpus and from the chain-of-thought data.

    Every rank draws this global step batch and trains its slice of it
    (``kiln.engine.distributed.RankBatches``), so the data order and the per-step normalisation
    do not depend on the world size.
    """
    total = global_batch_size(config)
    if config.objectives.cot.path is None:
        return total, 0
    cot = max(1, round(config.objectives.cot.fraction * total))
    if cot >= total:
        raise ConfigError(
            f"objectives.cot.fraction {config.objectives.cot.fraction} leaves no corpus windows "
            f"in a step of {total}; lower it or raise training.micro_batch_size"
        )
    return total - cot, cot


class LMJob:
    """Everything the trainer needs to train the code LM under a config."""

    def __init__(
        self, config: Config, run_dir: Path, device: torch.device, log: Callable[[str], None]
    ) -> None:
        self.config = config
        self.device = device
        self.data = prepare_data(config, log)
        self.tokenizer = self.data.tokenizer
        tokenizer_copy = run_dir / TOKENIZER_FILE
        if not tokenizer_copy.exists():
            atomic_write(tokenizer_copy, self.tokenizer.to_json_str())
        elif load_run_tokenizer(run_dir).fingerprint() != self.tokenizer.fingerprint():
            raise DataError(
                f"the corpus now gives another tokenizer ({self.data.root / TOKENIZER_FILE}) "
                f"than the one this run trained with ({tokenizer_copy}): the files under "
                "data.sources changed since the run started; restore them, or start a new run"
            )
        self.model = build_model(config, self.tokenizer.vocab_size)
        weights, fim, role_weights = objective_settings(config)
        seq_len = config.data.seq_len
        code_windows, cot_windows = step_split(config)

        def loader(
            stream: Stream, samples: int, transform: WindowTransform, source: str, data_id: str
        ) -> WindowLoader:
            return WindowLoader(
                stream,
                seq_len=seq_len,
                samples_per_step=samples,
                shuffle=config.data.shuffle,
                seed=config.seed,
                prefetch=config.data.prefetch,
                transform=transform,
                source=source,
                data_id=data_id,
            )

        train_stream, val_stream = self.data.split("train"), self.data.split("val")
        ev = config.eval
        eval_batch_size = ev.batch_size or config.training.micro_batch_size
        val_count = ev.max_batches * eval_batch_size
        code = CodeWindows(self.tokenizer, weights, fim, config.seed)
        code_val = CodeWindows(self.tokenizer, weights, fim, config.seed, validation=True)
        loaders = {
            "code": loader(
                train_stream, code_windows, code, "the code corpus", self.data.index["key"]
            )
        }
        val_windows = [
            validation_windows(val_stream, seq_len, val_count, code_val)
        ]
        if not val_windows[0]:
            raise DataError(
                f"the corpus val split ({self.data.root}) has {len(val_stream):,} tokens, fewer "
                f"than one window of seq_len + 1 = {seq_len + 1}, so no val_loss can be "
                "measured; raise data.val_fraction, lower data.seq_len or add files"
            )
        if cot_windows:
            records = load_cot_records(config.objectives.cot.path)
            train, val = split_cot_records(records, config.objectives.cot.val_fraction, config.seed)
            cot_train = CotData.build(self.tokenizer, train)
            cot_val = CotData.build(self.tokenizer, val)
            loaders["cot"] = loader(
                cot_train.stream,
                cot_windows,
                CotWindows(cot_train, seq_len, role_weights, weights),
                f"the chain-of-thought training records ({config.objectives.cot.path})",
                cot_train.content_id(),
            )
            val_cot = CotWindows(cot_val, seq_len, role_weights, weights)
            val_windows.append(
                validation_windows(cot_val.stream, seq_len, val_count, val_cot)
            )
            log(f"chain of thought: {len(train)} train / {len(val)} val records")
            if not val_windows[-1]:
                log(
                    f"warning: the {len(val)} chain-of-thought val records hold fewer than "
                    f"seq_len + 1 = {seq_len + 1} tokens, so no val_cot_loss is reported; add "
                    "records or raise objectives.cot.val_fraction"
                )
        self.batches = MixedBatches(loaders)
        self.evaluator = LMEvaluator(
            config, self.tokenizer, val_windows, val_stream, eval_batch_size, device
        )
        log(
            f"model: GPT {self.model.num_parameters():,} parameters; data: "
            f"{len(train_stream):,} train / {len(val_stream):,} val tokens"
        )

    def loss(
        self, model: nn.Module, batch: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return weighted_token_loss(model, batch)

    def tokens_in(self, batch: dict[str, torch.Tensor]) -> int:
        return window_tokens(batch)

    def evaluate(self, model: nn.Module, *, final: bool = False) -> dict[str, Any]:
        """Perplexity always; the generation suites when within the time budget or final."""
        return self.evaluator.run(model, self.config.eval.suites, budgeted=not final)

    def final_report(self, model: nn.Module) -> str | None:
        """A code sample from the trained model, as configured in ``sample``."""
        sample = self.config.sample
        if not sample.max_new_tokens:
            return None
        try:
            text = sample_text(
                model,
                self.tokenizer,
                sample.prompt,
                max_new_tokens=sample.max_new_tokens,
                temperature=sample.temperature,
                top_k=sample.top_k,
                seed=self.config.seed,
            )
        except NonFiniteWeights as exc:  # a diverged run still ends with its summary written
            return f"sample: none: {exc}"
        return "sample:\n" + text

    def close(self) -> None:
        self.batches.close()


def load_run_tokenizer(run_dir: Path) -> KilnTokenizer:
    """The tokenizer a run trained with (copied into the run directory at its start)."""
    return KilnTokenizer.load(run_dir / TOKENIZER_FILE)
