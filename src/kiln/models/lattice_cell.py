"""The lattice cell: a gMLP over a cell and its six neighbours; the weights of many cells stacked.

Every weight tensor has a leading group dimension G (one group per cell, per depth slice, or one
shared group), so all cells of all samples advance together in a few batched matmuls
(``torch.baddbmm``); there is no Python loop over cells.

Per cell, for its T = 7 tokens X (the cell's state plus a read of its private memory, then the
states of its neighbours z-1, z+1, y-1, y+1, x-1, x+1):

    Z = gelu(LN(X) U + b_U)                       (T, 2F), split into Z1, Z2 of (T, F)
    S = Z1 * (W LN(Z2) + b_W)                     spatial gating unit; W is (T, T): token mixing
    out = mean_T(S) V + b_V                       (C + 2M,): state update, memory candidate, gate
    d_state = out[:C]
    d_mem   = sigmoid(gate) * (tanh(candidate) - mem)   a GRU-style leaky write

W starts near 0 and b_W at 1 (so S ~ Z1, as in gMLP), and the mean over tokens comes before V
(the two commute since V is linear), which makes the output projection 7x cheaper.

Shapes in comments: G weight groups, R rows per group (cells of the group x batch), T tokens,
C state channels, M memory channels, F half width of the channel projection.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

TOKENS = 7  # the cell itself, then its neighbours z-1, z+1, y-1, y+1, x-1, x+1


def cell_parameter_count(channels: int, memory: int, hidden: int) -> int:
    """Parameters of one cell's gMLP (one weight group)."""
    c, m, f, t = channels, memory, hidden, TOKENS
    return (
        2 * c  # LayerNorm on the tokens
        + 2 * (c * f + f)  # channel projection U (value and gate halves)
        + 2 * f  # LayerNorm in the gating unit
        + t * t + t  # token mixing W, b_W
        + (f + 1) * (c + 2 * m)  # output projection V
        + m * c  # memory read into the cell's own token
    )


class StackedGMLPCell(nn.Module):
    """The gMLPs of ``groups`` cells, evaluated for all of them at once."""

    def __init__(
        self,
        groups: int,
        channels: int,
        memory: int,
        hidden: int,
        *,
        out_init_scale: float,
        mix_init: float,
        layernorm_eps: float,
    ) -> None:
        super().__init__()
        g, c, m, f, t = groups, channels, memory, hidden, TOKENS
        self.channels, self.memory, self.hidden = c, m, f
        self.out_init_scale, self.mix_init, self.eps = out_init_scale, mix_init, layernorm_eps
        self.norm_w = nn.Parameter(torch.empty(g, c))
        self.norm_b = nn.Parameter(torch.empty(g, c))
        # U as two halves: Z1 (values) and Z2 (gates) come out contiguous, no split/cat copies.
        self.value_w = nn.Parameter(torch.empty(g, c, f))
        self.value_b = nn.Parameter(torch.empty(g, f))
        self.gate_w = nn.Parameter(torch.empty(g, c, f))
        self.gate_b = nn.Parameter(torch.empty(g, f))
        self.gate_norm_w = nn.Parameter(torch.empty(g, f))
        self.gate_norm_b = nn.Parameter(torch.empty(g, f))
        self.mix_w = nn.Parameter(torch.empty(g, t, t))
        self.mix_b = nn.Parameter(torch.empty(g, t))
        self.down_w = nn.Parameter(torch.empty(g, f, c + 2 * m))
        self.down_b = nn.Parameter(torch.empty(g, c + 2 * m))
        self.mem_in = nn.Parameter(torch.empty(g, m, c)) if m else None
        self.reset_parameters()

    def matrices(self) -> list[nn.Parameter]:
        """The stacked weight matrices (G, in, out); the rest are stacked vectors."""
        found = [self.value_w, self.gate_w, self.mix_w, self.down_w, self.mem_in]
        return [p for p in found if p is not None]

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Fan-in scaled normal weights; the gating unit starts near the identity."""
        c, m, f = self.channels, self.memory, self.hidden
        self.norm_w.fill_(1.0)
        self.norm_b.zero_()
        for w, b in ((self.value_w, self.value_b), (self.gate_w, self.gate_b)):
            w.normal_(0.0, 1.0 / math.sqrt(c))
            b.zero_()
        self.gate_norm_w.fill_(1.0)
        self.gate_norm_b.zero_()
        self.mix_w.uniform_(-self.mix_init, self.mix_init)
        self.mix_b.fill_(1.0)
        self.down_w.normal_(0.0, self.out_init_scale / math.sqrt(f))
        self.down_b.zero_()
        if self.mem_in is not None:
            self.mem_in.normal_(0.0, 1.0 / math.sqrt(m))

    def forward(self, tokens: torch.Tensor, memory: torch.Tensor | None) -> torch.Tensor:
        """Tokens (G, T, R, C), memory (G, R, M) -> increments (G, R, C + M) of state and memory."""
        g, t, r, c = tokens.shape
        f, m = self.hidden, self.memory
        if memory is not None:
            # The private memory enters through the cell's own token only: neighbours never see it.
            own = tokens[:, 0] + torch.bmm(memory, self.mem_in)  # (G, R, C)
            tokens = torch.cat((own.unsqueeze(1), tokens[:, 1:]), dim=1)
        h = F.layer_norm(tokens, (c,), eps=self.eps)
        h = h * self.norm_w[:, None, None] + self.norm_b[:, None, None]
        h = h.view(g, t * r, c)  # (G, T*R, C)
        z1 = F.gelu(torch.baddbmm(self.value_b.unsqueeze(1), h, self.value_w))  # (G, T*R, F)
        z2 = F.gelu(torch.baddbmm(self.gate_b.unsqueeze(1), h, self.gate_w))  # (G, T*R, F)
        z2 = F.layer_norm(z2, (f,), eps=self.eps).view(g, t, r * f)
        # Token mixing, one (T, T) matrix per group, applied to the normalised Z2 before its affine:
        # W (gamma * n + beta) + b = gamma * (W n) + (rowsum(W) beta + b), one pass fewer.
        shift = self.mix_w.sum(-1, keepdim=True) * self.gate_norm_b.unsqueeze(1)  # (G, T, F)
        shift = (shift + self.mix_b.unsqueeze(-1)).unsqueeze(2)  # (G, T, 1, F)
        mixed = torch.bmm(self.mix_w, z2).view(g, t, r, f)  # (G, T, R, F)
        # Parameters follow the activations' dtype so bf16 autocast keeps these big tensors bf16.
        gate = mixed * self.gate_norm_w[:, None, None].to(mixed.dtype) + shift.to(mixed.dtype)
        # Mean over tokens as sum / T: the sum's backward is a cheap expand, mean's a full copy.
        pooled = (z1.view(g, t, r, f) * gate).sum(dim=1) / t  # (G, R, F)
        out = torch.baddbmm(self.down_b.unsqueeze(1), pooled, self.down_w)  # (G, R, C + 2M)
        if memory is None:
            return out  # (G, R, C)
        d_state, candidate, write = out.split((c, m, m), dim=-1)
        d_mem = torch.sigmoid(write) * (torch.tanh(candidate) - memory)  # (G, R, M)
        return torch.cat((d_state.to(d_mem.dtype), d_mem), dim=-1)  # (G, R, C + M)
