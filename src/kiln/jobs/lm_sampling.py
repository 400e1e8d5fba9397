"""Text from a trained code LM: continuation, fill-in-the-middle, and batches of completions.

Every function samples with a private generator seeded by its caller, so sampling never moves the
training RNG streams and the same seed gives the same text.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from kiln.data.objectives import infill_prompt
from kiln.data.tokenizer import SPECIAL_TOKENS, KilnTokenizer
from kiln.errors import KilnError
from kiln.models.gpt import GPT


class NonFiniteWeights(KilnError):
    """The model holds NaN or infinite weights: there is no distribution to sample from."""


def check_finite(model: GPT) -> None:
    """Raise ``NonFiniteWeights`` naming the first bad tensors; sampling would otherwise stop
    with a bare RuntimeError from ``torch.multinomial``."""
    bad = [name for name, p in model.named_parameters() if not bool(torch.isfinite(p).all())]
    if bad:
        more = f" and {len(bad) - 3} more" if len(bad) > 3 else ""
        raise NonFiniteWeights(
            f"the model's weights are not finite (NaN or inf in {', '.join(bad[:3])}{more}): "
            "training diverged, so there is nothing to sample from; train again with a lower "
            "optimizer.lr or with training.grad_clip > 0"
        )


def generate_ids(
    model: GPT,
    prompt_ids: list[int],
    samples: int,
    *,
    max_new_tokens: int,
    temperature: float,
    top_k: int,
    seed: int,
    stop_tokens: Sequence[int],
) -> list[list[int]]:
    """``samples`` continuations of ``prompt_ids`` (new ids only, each cut before its stop).

    The model sees at most its context: a longer prompt keeps only its end.
    """
    check_finite(model)
    prompt_ids = prompt_ids[-(model.shape.context - 1) :]
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed)
    was_training = model.training
    model.eval()
    try:
        out = model.generate(
            torch.tensor([prompt_ids] * samples, device=device),
            max_new_tokens,
            temperature=temperature,
            top_k=top_k,
            generator=generator,
            stop_tokens=stop_tokens,
        )
    finally:
        model.train(was_training)
    rows = out[:, len(prompt_ids) :].tolist()
    return [_cut_at_first(row, set(stop_tokens)) for row in rows]


def _cut_at_first(row: list[int], stops: set[int]) -> list[int]:
    return next((row[:i] for i, token in enumerate(row) if token in stops), row)


def code_stops(tokenizer: KilnTokenizer) -> list[int]:
    """Every special token ends generated code: none of them can be part of a program."""
    return [tokenizer.token_id(token) for token in SPECIAL_TOKENS]


def sample_text(
    model: GPT,
    tokenizer: KilnTokenizer,
    prompt: str,
    *,
    max_new_tokens: int,
    temperature: float,
    top_k: int,
    seed: int,
) -> str:
    """``prompt`` followed by its sampled continuation, up to the first special token (the end
    of text, or a FIM or chain-of-thought marker that a model trained on those objectives may
    emit: text past it belongs to another task)."""
    ids = tokenizer.encode(prompt) or [tokenizer.eot_id]
    (new,) = generate_ids(
        model, ids, 1, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
        seed=seed, stop_tokens=code_stops(tokenizer),
    )
    return prompt + tokenizer.decode(new)


def infill_text(
    model: GPT,
    tokenizer: KilnTokenizer,
    prefix: str,
    suffix: str,
    *,
    max_new_tokens: int,
    temperature: float,
    top_k: int,
    seed: int,
) -> str:
    """The middle the model writes between ``prefix`` and ``suffix`` (PSM prompt)."""
    prompt = infill_prompt(tokenizer, prefix, suffix)
    if len(prompt) >= model.shape.context:
        raise KilnError(
            f"prefix and suffix take {len(prompt)} tokens with the FIM sentinels; the model's "
            f"context is {model.shape.context}: shorten them"
        )
    (middle,) = generate_ids(
        model, prompt, 1, max_new_tokens=max_new_tokens,
        temperature=temperature, top_k=top_k, seed=seed, stop_tokens=code_stops(tokenizer),
    )
    return tokenizer.decode(middle)


@dataclass(frozen=True)
class Completion:
    """Generated text and whether the model ended it (rather than the token limit)."""

    text: str
    finished: bool


def complete_texts(
    model: GPT,
    tokenizer: KilnTokenizer,
    prompt: str,
    samples: int,
    *,
    max_new_tokens: int,
    temperature: float,
    top_k: int,
    seed: int,
) -> list[Completion]:
    """``samples`` continuations of ``prompt`` (without the prompt), sampled as one batch."""
    rows = generate_ids(
        model, tokenizer.encode(prompt) or [tokenizer.eot_id], samples,
        max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, seed=seed,
        stop_tokens=code_stops(tokenizer),
    )
    return [Completion(tokenizer.decode(row), len(row) < max_new_tokens) for row in rows]
