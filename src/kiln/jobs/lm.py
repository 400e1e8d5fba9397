"""The code language-model job: corpus -> BPE -> token shards -> GPT, next-token loss."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from kiln.config import Config
from kiln.data.corpus import Source
from kiln.data.loader import WindowLoader
from kiln.data.shards import TokenData, prepare_token_data
from kiln.data.tokenizer import KilnTokenizer
from kiln.eval.perplexity import evaluate_perplexity, validation_windows
from kiln.fsio import atomic_write
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


def next_token_loss(
    model: nn.Module, batch: torch.Tensor
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Mean cross-entropy of predicting window[t+1] from window[:t+1]."""
    logits = model(batch[:, :-1])  # (B, T, V)
    loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), batch[:, 1:].reshape(-1))
    return loss, {"next_token": loss}


def window_tokens(batch: torch.Tensor) -> int:
    """Predicted tokens in a batch of windows: seq_len per window of seq_len + 1."""
    return batch.shape[0] * (batch.shape[1] - 1)


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
        self.model = build_model(config, self.tokenizer.vocab_size)
        t = config.training
        self.batches = WindowLoader(
            self.data.split("train"),
            seq_len=config.data.seq_len,
            samples_per_step=t.micro_batch_size * t.grad_accum_steps,
            shuffle=config.data.shuffle,
            seed=config.seed,
            prefetch=config.data.prefetch,
        )
        ev = config.eval
        self.eval_batch_size = ev.batch_size or t.micro_batch_size
        self.val_windows = validation_windows(
            self.data.split("val"), config.data.seq_len, ev.max_batches * self.eval_batch_size
        )
        log(
            f"model: GPT {self.model.num_parameters():,} parameters; data: "
            f"{len(self.data.split('train')):,} train / {len(self.data.split('val')):,} val tokens"
        )

    def loss(
        self, model: nn.Module, batch: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return next_token_loss(model, batch)

    def tokens_in(self, batch: torch.Tensor) -> int:
        return window_tokens(batch)

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        return evaluate_perplexity(model, self.val_windows, self.eval_batch_size, self.device)


def load_run_tokenizer(run_dir: Path) -> KilnTokenizer:
    """The tokenizer a run trained with (copied into the run directory at its start)."""
    return KilnTokenizer.load(run_dir / TOKENIZER_FILE)


def sample_text(
    model: GPT,
    tokenizer: KilnTokenizer,
    prompt: str,
    *,
    max_new_tokens: int,
    temperature: float,
    top_k: int,
    seed: int,
    device: torch.device,
) -> str:
    """Continue ``prompt``; a private generator keeps the training RNG streams untouched."""
    ids = tokenizer.encode(prompt) or [tokenizer.eot_id]
    generator = torch.Generator(device=device).manual_seed(seed)
    was_training = model.training
    model.eval()
    try:
        out = model.generate(
            torch.tensor([ids], device=device),
            max_new_tokens,
            temperature=temperature,
            top_k=top_k,
            generator=generator,
            stop_token=tokenizer.eot_id,
        )
    finally:
        model.train(was_training)
    return tokenizer.decode(out[0].tolist())
