"""Our small trainable image tokenizer: a convolutional VQ autoencoder over small images.

Only the encoder and the codebook turn images into ids; the decoder exists to train them
(`retrieval train tokenizer`) and is never part of an encoder checkpoint.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from torch import nn

from retrieval.encoders.fuselip.quantize import ImageTokenizer, VectorQuantizer


@dataclass
class ConvVQConfig:
    image_size: int = 64
    patch: int = 8  # a power of two: one stride-2 stage per halving
    channels: int = 64
    code_dim: int = 16
    codebook_size: int = 512
    l2_norm: bool = True

    @property
    def num_tokens(self) -> int:
        return (self.image_size // self.patch) ** 2

    def to_dict(self) -> dict:
        return {"type": "conv-vq", **asdict(self)}


def _stages(patch: int) -> int:
    stages = int(math.log2(patch))
    if 2 ** stages != patch or stages < 1:
        raise ValueError(f"patch {patch} must be a power of two ≥ 2")
    return stages


class ConvVQTokenizer(ImageTokenizer):
    """pixels [B, 3, S, S] in [0, 1] → ids [B, (S/patch)²] in row-major order."""

    def __init__(self, config: ConvVQConfig):
        super().__init__()
        self.config = config
        c = config.channels
        layers: list[nn.Module] = []
        in_ch = 3
        for _ in range(_stages(config.patch)):
            layers += [nn.Conv2d(in_ch, c, 4, stride=2, padding=1), nn.GELU()]
            in_ch = c
        layers += [nn.Conv2d(c, c, 3, padding=1), nn.GELU(), nn.Conv2d(c, config.code_dim, 1)]
        self.encoder = nn.Sequential(*layers)
        self.quantize = VectorQuantizer(config.codebook_size, config.code_dim, config.l2_norm)

    def latents(self, pixels: torch.Tensor) -> torch.Tensor:
        """[B, 3, S, S] → [B, N, D] in row-major patch order."""
        return self.encoder(pixels * 2 - 1).flatten(2).transpose(1, 2)

    @torch.no_grad()
    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.quantize.indices(self.latents(pixels))


class ConvVQDecoder(nn.Module):
    """Quantised latents [B, N, D] → pixels [B, 3, S, S] in [0, 1] (training only)."""

    def __init__(self, config: ConvVQConfig):
        super().__init__()
        self.grid = config.image_size // config.patch
        c = config.channels
        layers: list[nn.Module] = [nn.Conv2d(config.code_dim, c, 3, padding=1), nn.GELU()]
        for i in range(_stages(config.patch)):
            last = i == _stages(config.patch) - 1
            layers += [nn.ConvTranspose2d(c, 3 if last else c, 4, stride=2, padding=1)]
            if not last:
                layers.append(nn.GELU())
        self.decoder = nn.Sequential(*layers)

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        b, n, d = latents.shape
        x = latents.transpose(1, 2).reshape(b, d, self.grid, self.grid)
        return torch.sigmoid(self.decoder(x))
