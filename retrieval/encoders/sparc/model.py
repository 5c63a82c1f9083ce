"""SPARC's dual encoder: a ViT without a CLS token, a text transformer, linear adaptors to a shared width.

Global image embedding: g_v(h_v(mean of patches)), h_v a single non-linear layer; global text embedding:
g_t(masked mean of tokens). Fine-grained grouping: raw token · patch similarities of the adapted
(un-normalised) embeddings, min-max over patches per token, a 1/P threshold, rows renormalised to sum 1.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from retrieval.encoders.late_fusion import DualEncoderModel, FusionHead, TowerConfig
from retrieval.encoders.layers import Transformer, full_precision
from retrieval.errors import RetrievalError

THRESHOLDS = ("minmax", "uniform", "off")


@dataclass(kw_only=True)
class SPARCConfig(TowerConfig):
    # where the 1/P threshold applies: on the min-max values (the paper, literally), on the
    # sum-normalised weights ("uniform": keep patches above a uniform share), or nowhere
    threshold: str = "minmax"
    epsilon: float = 1e-6

    def check(self) -> None:
        if self.threshold not in THRESHOLDS:
            raise RetrievalError(f"threshold must be one of {', '.join(THRESHOLDS)}, not {self.threshold!r}")


class VisionTower(nn.Module):
    """Patch embedding + learned positions + pre-LN transformer; one output per patch, no CLS."""

    def __init__(self, config: SPARCConfig):
        super().__init__()
        width = config.vision_width
        self.conv1 = nn.Conv2d(3, width, config.patch, stride=config.patch, bias=False)
        self.positional_embedding = nn.Parameter(torch.randn(config.grid ** 2, width) * width ** -0.5)
        self.ln_pre = nn.LayerNorm(width)
        self.transformer = Transformer(width, config.vision_heads, config.vision_layers, config.mlp_ratio)
        self.ln_post = nn.LayerNorm(width)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = self.conv1(pixels).flatten(2).transpose(1, 2) + self.positional_embedding
        return self.ln_post(self.transformer(self.ln_pre(x)))


class TextTower(nn.Module):
    """Token + position embeddings, bidirectional pre-LN transformer with padding masked, final LayerNorm."""

    def __init__(self, config: SPARCConfig):
        super().__init__()
        width = config.text_width
        self.pad = config.special_ids.pad
        self.token_embedding = nn.Embedding(config.text_vocab, width)
        self.positional_embedding = nn.Parameter(torch.randn(config.context_length, width) * 0.01)
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        self.transformer = Transformer(width, config.text_heads, config.text_layers, config.mlp_ratio)
        self.ln_final = nn.LayerNorm(width)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.token_embedding(ids) + self.positional_embedding[: ids.shape[1]]
        return self.ln_final(self.transformer(x, ids != self.pad))


class SPARC(DualEncoderModel):
    config_class = SPARCConfig

    def __init__(self, config: SPARCConfig):
        super().__init__()
        self.config = config
        self.visual = VisionTower(config)
        self.text = TextTower(config)
        self.h_v = nn.Sequential(nn.Linear(config.vision_width, config.vision_width), nn.GELU())
        self.g_v = nn.Linear(config.vision_width, config.dim)
        self.g_t = nn.Linear(config.text_width, config.dim)
        self.logit_scale = nn.Parameter(torch.tensor(config.init_logit_scale))
        head = config.fusion_head
        self.fusion_head = FusionHead(config.dim, head["heads"], head["layers"], config.mlp_ratio) if head else None

    def image_outputs(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(global feature [B, dim], local patches g_v(f_v) [B, P, dim]); neither normalised."""
        f_v = self.visual(pixels)
        return self.g_v(self.h_v(f_v.mean(1))), self.g_v(f_v)

    def text_outputs(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(global feature [B, dim] = masked mean of tokens, tokens g_t(f_t) [B, L, dim]); not normalised."""
        tokens = self.g_t(self.text(ids))
        valid = self.text_valid(ids).to(tokens.dtype)[..., None]
        return (tokens * valid).sum(1) / valid.sum(1).clamp(min=1), tokens

    def group(self, tokens: torch.Tensor, patches: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(alignment weights [B, L, P], language-grouped vision embeddings c [B, L, dim])."""
        weights = alignment_weights(tokens, patches, self.config.threshold, self.config.epsilon)
        return weights, weights @ patches


def alignment_weights(tokens: torch.Tensor, patches: torch.Tensor, threshold: str = "minmax",
                      epsilon: float = 1e-6) -> torch.Tensor:
    """SPARC's a_lp [B, L, P]: raw similarities, min-max over patches per token, the 1/P threshold, rows
    renormalised to sum 1. Gradients flow through the weights (the paper does not stop them)."""
    with full_precision(tokens):
        sim = tokens.float() @ patches.float().transpose(1, 2)
        low, high = sim.amin(-1, keepdim=True), sim.amax(-1, keepdim=True)
        scaled = (sim - low) / (high - low + epsilon)
        sigma = 1.0 / sim.shape[-1]
        if threshold == "minmax":
            scaled = torch.where(scaled >= sigma, scaled, torch.zeros_like(scaled))
        weights = scaled / scaled.sum(-1, keepdim=True).clamp(min=epsilon)
        if threshold == "uniform":
            weights = torch.where(weights >= sigma, weights, torch.zeros_like(weights))
            weights = weights / weights.sum(-1, keepdim=True).clamp(min=epsilon)
        # a degenerate token (all similarities equal) keeps nothing: give it uniform weights instead
        empty = weights.sum(-1, keepdim=True) <= 0
        return torch.where(empty, torch.full_like(weights, sigma), weights)
