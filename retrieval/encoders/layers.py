"""Transformer building blocks shared by the encoder families (pre-LN, fused q/k/v, exact or quick GELU).

Parameter names follow the OpenAI-CLIP / OpenCLIP layout (`ln_1`, `attn.in_proj_weight`, `attn.out_proj`,
`ln_2`, `mlp.c_fc`, `mlp.c_proj`), which is also the layout of the official FuseLIP and TiTok weights.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Attention(nn.Module):
    """Multi-head self-attention with one fused q/k/v projection (rows in q, k, v order)."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        if width % heads:
            raise ValueError(f"width {width} is not divisible by {heads} heads")
        self.heads = heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * width))
        self.out_proj = nn.Linear(width, width)
        nn.init.xavier_uniform_(self.in_proj_weight)
        nn.init.zeros_(self.out_proj.bias)

    def forward(self, x: torch.Tensor, keep: torch.Tensor | None = None, causal: bool = False) -> torch.Tensor:
        """x [B, L, W]; keep [B, L] bool, False for padding keys that no position may attend to; `causal`:
        each position attends only to itself and earlier ones (CLIP's text tower)."""
        b, n, w = x.shape
        q, k, v = F.linear(x, self.in_proj_weight, self.in_proj_bias).view(b, n, 3, self.heads, -1).unbind(2)
        mask = None if keep is None else keep[:, None, None, :]
        if causal:
            lower = torch.ones(n, n, dtype=torch.bool, device=x.device).tril()
            mask = lower if mask is None else mask & lower
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        if x.device.type == "cpu" and torch.is_autocast_enabled("cpu"):
            # the CPU's bf16 attention kernel is about 8× slower than its float32 one; the projections stay bf16
            with full_precision(x):
                out = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.out_proj(out.transpose(1, 2).reshape(b, n, w))


def full_precision(x: torch.Tensor) -> torch.autocast:
    """A context with autocast off, so that float32 math stays float32 (logits, min-max, sparsemax)."""
    return torch.autocast(x.device.type, enabled=False)


def sigmoid_gelu(x: torch.Tensor) -> torch.Tensor:
    """x · σ(1.702 x): the GELU approximation of OpenAI's CLIP blocks (and of the official FDT towers)."""
    return x * torch.sigmoid(1.702 * x)


class MLP(nn.Module):
    def __init__(self, width: int, hidden: int, quick: bool = False):
        super().__init__()
        self.c_fc = nn.Linear(width, hidden)
        self.c_proj = nn.Linear(hidden, width)
        self.activation = sigmoid_gelu if quick else F.gelu

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(self.activation(self.c_fc(x)))


class ResidualBlock(nn.Module):
    """x + attn(LN(x)), then x + MLP(LN(x)); bidirectional unless causal, LayerNorm eps 1e-5, no dropout;
    exact GELU unless `quick_gelu`."""

    def __init__(self, width: int, heads: int, mlp_ratio: float = 4.0, quick_gelu: bool = False):
        super().__init__()
        self.ln_1 = nn.LayerNorm(width)
        self.attn = Attention(width, heads)
        self.ln_2 = nn.LayerNorm(width)
        self.mlp = MLP(width, int(width * mlp_ratio), quick_gelu)

    def forward(self, x: torch.Tensor, keep: torch.Tensor | None = None, causal: bool = False) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), keep, causal)
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    def __init__(self, width: int, heads: int, layers: int, mlp_ratio: float = 4.0, quick_gelu: bool = False):
        super().__init__()
        self.resblocks = nn.ModuleList(ResidualBlock(width, heads, mlp_ratio, quick_gelu) for _ in range(layers))

    def forward(self, x: torch.Tensor, keep: torch.Tensor | None = None, causal: bool = False) -> torch.Tensor:
        for block in self.resblocks:
            x = block(x, keep, causal)
        return x
