"""Training losses: SigLIP's sigmoid loss and masked-token prediction."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def siglip_loss(left: torch.Tensor, right: torch.Tensor, positives: torch.Tensor, logit_scale: torch.Tensor,
                logit_bias: torch.Tensor) -> torch.Tensor:
    """−Σ log σ(±(e^s·l·r + b)) / B over all B×U pairs; `positives` [B, U] marks the +1 labels.

    `left` and `right` are unit vectors; `logit_scale` is stored as a log."""
    logits = logit_scale.exp() * left @ right.T + logit_bias
    signs = positives.to(logits.dtype) * 2 - 1
    return -F.logsigmoid(signs * logits).sum() / len(left)


def mask_tokens(ids: torch.Tensor, probability: float, mask_id: int, never: list[int],
                generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Replace each maskable position by `mask_id` with `probability` (no 80/10/10 split); returns
    (masked ids, where). Ids in `never` (end of text, padding, the mask itself) are never masked."""
    draw = torch.rand(ids.shape, generator=generator, device="cpu").to(ids.device) < probability
    where = draw & ~torch.isin(ids, torch.tensor(never, device=ids.device))
    return ids.masked_fill(where, mask_id), where


def masked_token_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over the masked positions; zero (with a gradient path) when none was masked."""
    if len(targets) == 0:
        return logits.sum() * 0.0
    return F.cross_entropy(logits.float(), targets)
