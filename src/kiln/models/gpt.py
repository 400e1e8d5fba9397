"""A GPT decoder: pre-LayerNorm blocks, causal self-attention, dropout, tied embeddings.

Shapes in comments: B batch, T sequence, C d_model, H heads, V vocabulary.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from kiln.streaming.chunks import StreamChunk


@dataclass(frozen=True)
class GPTShape:
    """Model sizes; built from the ``model`` config section plus vocabulary and context."""

    vocab_size: int
    context: int
    n_layers: int
    n_heads: int
    d_model: int
    mlp_ratio: int
    dropout: float
    bias: bool
    layernorm_eps: float
    init_std: float


@dataclass
class LayerCache:
    """Keys and values of the tokens a layer has already seen, for incremental decoding."""

    k: torch.Tensor | None = None  # (B, H, T_past, C/H)
    v: torch.Tensor | None = None

    @property
    def length(self) -> int:
        return 0 if self.k is None else self.k.shape[2]

    def extend(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Append the new tokens' keys and values; return all of them."""
        if self.k is not None and self.v is not None:
            k, v = torch.cat([self.k, k], dim=2), torch.cat([self.v, v], dim=2)
        self.k, self.v = k, v
        return k, v


class CausalSelfAttention(nn.Module):
    def __init__(self, shape: GPTShape) -> None:
        super().__init__()
        self.n_heads = shape.n_heads
        self.dropout = shape.dropout
        self.qkv = nn.Linear(shape.d_model, 3 * shape.d_model, bias=shape.bias)
        self.proj = nn.Linear(shape.d_model, shape.d_model, bias=shape.bias)
        self.resid_drop = nn.Dropout(shape.dropout)

    def forward(self, x: torch.Tensor, cache: LayerCache | None = None) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = self.qkv(x).split(c, dim=2)  # 3 x (B, T, C)
        # (B, T, C) -> (B, H, T, C/H)
        head = c // self.n_heads
        q, k, v = (z.view(b, t, self.n_heads, head).transpose(1, 2) for z in (q, k, v))
        past = 0
        if cache is not None:
            past = cache.length
            if past and t > 1:
                raise ValueError("with a filled cache, feed one token at a time")
            k, v = cache.extend(k, v)  # (B, H, past + T, C/H)
        # A single new token may see every cached one: only a from-scratch pass needs the mask.
        y = F.scaled_dot_product_attention(
            q, k, v, is_causal=past == 0, dropout_p=self.dropout if self.training else 0.0
        )  # (B, H, T, C/H)
        y = y.transpose(1, 2).contiguous().view(b, t, c)
        return self.resid_drop(self.proj(y))


class MLP(nn.Module):
    def __init__(self, shape: GPTShape) -> None:
        super().__init__()
        hidden = shape.mlp_ratio * shape.d_model
        self.up = nn.Linear(shape.d_model, hidden, bias=shape.bias)
        self.down = nn.Linear(hidden, shape.d_model, bias=shape.bias)
        self.drop = nn.Dropout(shape.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.down(F.gelu(self.up(x))))


class Block(nn.Module):
    """x + attn(ln(x)), then x + mlp(ln(x)): the skip path carries the gradient straight through."""

    def __init__(self, shape: GPTShape) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(shape.d_model, eps=shape.layernorm_eps, bias=shape.bias)
        self.attn = CausalSelfAttention(shape)
        self.ln2 = nn.LayerNorm(shape.d_model, eps=shape.layernorm_eps, bias=shape.bias)
        self.mlp = MLP(shape)

    def forward(self, x: torch.Tensor, cache: LayerCache | None = None) -> torch.Tensor:
        x = x + self.attn(self.ln1(x), cache)
        return x + self.mlp(self.ln2(x))


class _Embed(nn.Module):
    """Token plus position embeddings, then dropout: (B, T) ids -> (B, T, C)."""

    def __init__(self, gpt: GPT) -> None:
        super().__init__()
        self.tok_emb, self.pos_emb, self.drop = gpt.tok_emb, gpt.pos_emb, gpt.drop

    def forward(self, idx: torch.Tensor, past: int = 0) -> torch.Tensor:
        pos = torch.arange(past, past + idx.shape[1], device=idx.device)
        return self.drop(self.tok_emb(idx) + self.pos_emb(pos))


class _Head(nn.Module):
    """Final LayerNorm and the (tied) output projection: (B, T, C) -> (B, T, V)."""

    def __init__(self, gpt: GPT) -> None:
        super().__init__()
        self.ln_f, self.head = gpt.ln_f, gpt.head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.ln_f(x))


class GPT(nn.Module):
    """Token and position embeddings, N blocks, final LayerNorm, head tied to the embedding."""

    def __init__(self, shape: GPTShape) -> None:
        super().__init__()
        self.shape = shape
        self.tok_emb = nn.Embedding(shape.vocab_size, shape.d_model)
        self.pos_emb = nn.Embedding(shape.context, shape.d_model)
        self.drop = nn.Dropout(shape.dropout)
        self.blocks = nn.ModuleList(Block(shape) for _ in range(shape.n_layers))
        self.ln_f = nn.LayerNorm(shape.d_model, eps=shape.layernorm_eps, bias=shape.bias)
        self.head = nn.Linear(shape.d_model, shape.vocab_size, bias=False)
        self.head.weight = self.tok_emb.weight
        self._init_weights()

    def _init_weights(self) -> None:
        # Residual projections are scaled down by depth so the stream's variance stays bounded.
        resid_std = self.shape.init_std / math.sqrt(2 * self.shape.n_layers)
        for name, module in self.named_modules():
            if isinstance(module, nn.Linear):
                std = resid_std if name.endswith(("attn.proj", "mlp.down")) else self.shape.init_std
                nn.init.normal_(module.weight, mean=0.0, std=std)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, mean=0.0, std=self.shape.init_std)

    def forward(self, idx: torch.Tensor, cache: list[LayerCache] | None = None) -> torch.Tensor:
        """Token ids (B, T) -> logits (B, T, V).

        With ``cache`` (one entry per block), ``idx`` continues the tokens the cache has seen,
        and the cache is extended with them.
        """
        _, t = idx.shape
        past = cache[0].length if cache else 0
        if past + t > self.shape.context:
            raise ValueError(
                f"sequence of {past + t} tokens exceeds the context of {self.shape.context}"
            )
        x = _Embed(self)(idx, past)
        for i, block in enumerate(self.blocks):
            x = block(x, cache[i] if cache else None)
        return _Head(self)(x)

    def stream_chunks(self) -> list[StreamChunk]:
        """Embeddings, each block, the head: chained, they are ``forward`` without a cache.

        The head is tied to the token embedding, which the embeddings chunk owns: the head
        borrows it (read again when the head runs, updated once, by its owner).
        """
        return [
            StreamChunk("embed", _Embed(self)),
            *(StreamChunk(f"block{i}", block) for i, block in enumerate(self.blocks)),
            StreamChunk("head", _Head(self)),
        ]

    def num_parameters(self) -> int:
        """Trainable parameters, counting the tied embedding once."""
        return sum(p.numel() for p in self.parameters())

    @torch.no_grad()
    def generate(
        self,
        idx: torch.Tensor,
        max_new_tokens: int,
        *,
        temperature: float,
        top_k: int,
        generator: torch.Generator | None = None,
        stop_tokens: Sequence[int] = (),
    ) -> torch.Tensor:
        """Extend each row of ``idx`` (B, T) by sampling; greedy when temperature is 0.

        Stops early once every row has produced one of ``stop_tokens``; a row that stopped
        keeps receiving tokens until then, so callers cut each row at its first stop token.
        """
        stops = torch.tensor(list(stop_tokens), dtype=idx.dtype, device=idx.device)
        stopped = torch.zeros(idx.shape[0], dtype=torch.bool, device=idx.device)
        context = self.shape.context
        # Keys and values are cached while the text fits the context; past it, the window
        # slides and every position moves, so each step recomputes the last `context` tokens.
        cache = [LayerCache() for _ in self.blocks] if idx.shape[1] <= context else None
        unseen = idx  # tokens the cache has not seen yet
        for _ in range(max_new_tokens):
            if cache is not None and cache[0].length + unseen.shape[1] <= context:
                logits = self(unseen, cache)[:, -1, :].float()  # (B, V)
            else:
                cache = None
                logits = self(idx[:, -context:])[:, -1, :].float()
            if temperature == 0:
                nxt = logits.argmax(dim=-1, keepdim=True)
            else:
                # Shift the top logit to 0 first: a tiny temperature then sends the others to
                # -inf, not the top one to inf (the softmax is the same either way).
                logits = (logits - logits.amax(dim=-1, keepdim=True)) / temperature
                if top_k:
                    kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, -1:]
                    logits = logits.masked_fill(logits < kth, float("-inf"))
                probs = F.softmax(logits, dim=-1)
                nxt = torch.multinomial(probs, 1, generator=generator)
            idx = torch.cat([idx, nxt], dim=1)
            unseen = nxt
            if len(stops):
                stopped |= torch.isin(nxt.squeeze(1), stops)
                if bool(stopped.all()):
                    break
        return idx
