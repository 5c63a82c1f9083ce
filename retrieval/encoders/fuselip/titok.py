"""The TiTok 1-D image tokenizer (encoder + vector quantiser only), as the official FuseLIP weights use it.

A ViT over 16×16 patches plus a class token, with learned latent tokens appended; the latent outputs go
through `ln_post` and a 1×1 projection to the code size, then the nearest codebook row. TiTok-S-128 has
two quirks that its weights depend on: the latents are reinterpreted (B, N, E) → (B, E, N) by a reshape
without a permute before the projection, and latents and codes are L2-normalised before the distance.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

from retrieval.encoders.fuselip.quantize import ImageTokenizer, VectorQuantizer
from retrieval.encoders.layers import ResidualBlock


@dataclass
class TiTokConfig:
    width: int
    layers: int
    heads: int
    code_dim: int
    codebook_size: int
    l2_norm: bool
    legacy: bool
    image_size: int = 256
    patch: int = 16
    num_tokens: int = 128

    def to_dict(self) -> dict:
        return {"type": "titok", **asdict(self)}


TITOK_VARIANTS = {
    "s-128": TiTokConfig(width=512, layers=8, heads=8, code_dim=12, codebook_size=4096, l2_norm=True, legacy=True),
    "bl-128": TiTokConfig(width=768, layers=12, heads=12, code_dim=64, codebook_size=8192, l2_norm=False,
                          legacy=False),
}


class TiTokEncoder(nn.Module):
    def __init__(self, config: TiTokConfig):
        super().__init__()
        e, grid = config.width, config.image_size // config.patch
        self.config = config
        self.patch_embed = nn.Conv2d(3, e, config.patch, stride=config.patch)
        scale = e ** -0.5
        self.class_embedding = nn.Parameter(scale * torch.randn(1, e))
        self.positional_embedding = nn.Parameter(scale * torch.randn(grid * grid + 1, e))
        self.latent_token_positional_embedding = nn.Parameter(scale * torch.randn(config.num_tokens, e))
        self.ln_pre = nn.LayerNorm(e)
        self.transformer = nn.ModuleList(ResidualBlock(e, config.heads) for _ in range(config.layers))
        self.ln_post = nn.LayerNorm(e)
        self.conv_out = nn.Linear(e, config.code_dim)  # the official 1×1 conv, as a Linear

    def forward(self, pixels: torch.Tensor, latent_tokens: torch.Tensor) -> torch.Tensor:
        """pixels [B, 3, S, S] in [0, 1] → latents [B, N, code_dim]."""
        b, e = len(pixels), self.config.width
        x = self.patch_embed(pixels).flatten(2).transpose(1, 2)
        x = torch.cat([self.class_embedding.expand(b, 1, e).to(x.dtype), x], dim=1) + self.positional_embedding
        latents = (latent_tokens + self.latent_token_positional_embedding).expand(b, -1, -1).to(x.dtype)
        x = self.ln_pre(torch.cat([x, latents], dim=1))
        for block in self.transformer:
            x = block(x)
        x = self.ln_post(x[:, -self.config.num_tokens:])
        if self.config.legacy:
            x = x.reshape(b, e, self.config.num_tokens).transpose(1, 2)  # the legacy reinterpretation
        return self.conv_out(x)


class TiTokTokenizer(ImageTokenizer):
    """pixels [B, 3, S, S] in [0, 1] → codebook indices [B, N] in latent-token order."""

    def __init__(self, config: TiTokConfig):
        super().__init__()
        self.config = config
        self.latent_tokens = nn.Parameter(config.width ** -0.5 * torch.randn(config.num_tokens, config.width))
        self.encoder = TiTokEncoder(config)
        self.quantize = VectorQuantizer(config.codebook_size, config.code_dim, config.l2_norm)

    @torch.no_grad()
    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.quantize.indices(self.encoder(pixels, self.latent_tokens))
