"""Vector quantisation (the nearest codebook row of each latent, in fp32, optionally on the unit sphere) and
the base of the image tokenizers that end in it."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class VectorQuantizer(nn.Module):
    """A codebook (`embedding.weight` [C, D]); `l2_norm` compares unit vectors, as TiTok-S-128 does."""

    def __init__(self, codebook_size: int, dim: int, l2_norm: bool = False):
        super().__init__()
        self.embedding = nn.Embedding(codebook_size, dim)
        self.embedding.weight.data.uniform_(-1.0 / codebook_size, 1.0 / codebook_size)
        self.l2_norm = l2_norm

    @property
    def codebook_size(self) -> int:
        return self.embedding.num_embeddings

    def codebook(self) -> torch.Tensor:
        weight = self.embedding.weight.float()
        return F.normalize(weight, dim=-1) if self.l2_norm else weight

    def indices(self, z: torch.Tensor) -> torch.Tensor:
        """z [..., D] → codebook indices [...] by squared Euclidean distance, computed in fp32."""
        with torch.autocast(z.device.type, enabled=False):
            flat = z.float().reshape(-1, z.shape[-1])
            if self.l2_norm:
                flat = F.normalize(flat, dim=-1)
            book = self.codebook()
            dist = flat.pow(2).sum(1, keepdim=True) - 2 * flat @ book.T + book.pow(2).sum(1)[None]
            return dist.argmin(1).view(z.shape[:-1])

    def forward(self, z: torch.Tensor, beta: float = 0.25) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Training pass: (straight-through quantised z, indices, codebook + beta·commitment loss)."""
        idx = self.indices(z)
        zf = F.normalize(z.float(), dim=-1) if self.l2_norm else z.float()
        q = self.codebook()[idx]
        loss = F.mse_loss(q, zf.detach()) + beta * F.mse_loss(zf, q.detach())
        return zf + (q - zf).detach(), idx, loss


class ImageTokenizer(nn.Module):
    """pixels [B, 3, S, S] in [0, 1] → codebook indices [B, num_tokens]; `config` names both sizes."""

    @property
    def num_tokens(self) -> int:
        return self.config.num_tokens

    @property
    def codebook_size(self) -> int:
        return self.config.codebook_size
