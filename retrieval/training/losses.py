"""Training losses: SigLIP's sigmoid loss, masked-token prediction, CLIP's InfoNCE and SPARC's fine-grained loss."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from retrieval.encoders.layers import full_precision

MAX_LOGIT_SCALE = math.log(100)  # CLIP's and SigLIP's cap on the logit scale e^s


def siglip_loss(left: torch.Tensor, right: torch.Tensor, positives: torch.Tensor, logit_scale: torch.Tensor,
                logit_bias: torch.Tensor) -> torch.Tensor:
    """−Σ log σ(±(e^s·l·r + b)) / B over all B×U pairs; `positives` [B, U] marks the +1 labels.

    `left` and `right` are unit vectors; `logit_scale` is stored as a log."""
    with full_precision(left):  # near the bias of −10, bf16 steps of 1/16 would merge hard negatives
        logits = logit_scale.float().exp() * left.float() @ right.float().T + logit_bias.float()
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


def info_nce(left: torch.Tensor, right: torch.Tensor, positives: torch.Tensor, logit_scale: torch.Tensor
             ) -> torch.Tensor:
    """CLIP's symmetric InfoNCE with e^s · cosine logits; `positives` [B, U] may mark several targets per row
    (equal targets scored once); each row's and column's loss is −log of its positives' softmax share."""
    with full_precision(left):
        logits = logit_scale.float().exp() * left.float() @ right.float().T
    hidden = torch.finfo(logits.dtype).min

    def side(scores: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        has = pos.any(1)  # a column no row of this batch points to is only a negative
        return (scores[has].logsumexp(1) - scores[has].masked_fill(~pos[has], hidden).logsumexp(1)).mean()

    return 0.5 * (side(logits, positives) + side(logits.T, positives.T))


def fine_grained_loss(tokens: torch.Tensor, grouped: torch.Tensor, words: torch.Tensor, logit_scale: torch.Tensor,
                      mean: str = "token") -> torch.Tensor:
    """SPARC's sequence-wise loss: InfoNCE between each word t_l and its grouped vision embedding c_l, with the
    other words of the same caption as the only negatives, both ways. tokens, grouped [B, L, d]; words [B, L]
    marks real words: padding is masked as a candidate and dropped as an anchor.
    `mean`: "token" (the pseudo-code: one mean over all words of the batch) or "caption" (Eq. 6: per caption,
    then over captions)."""
    t, c = F.normalize(tokens.float(), dim=-1), F.normalize(grouped.float(), dim=-1)
    with full_precision(t):
        logits = logit_scale.float().exp() * c @ t.transpose(1, 2)  # [B, L(c), L(t)]
    hidden = torch.finfo(logits.dtype).min
    columns = words[:, None, :]
    losses = []
    for scores in (logits, logits.transpose(1, 2)):  # anchors c_l against words, then words against c_l
        scores = scores.masked_fill(~columns, hidden)
        per_anchor = scores.logsumexp(-1) - scores.diagonal(dim1=1, dim2=2)
        losses.append(torch.where(words, per_anchor, torch.zeros_like(per_anchor)))
    per_anchor = 0.5 * (losses[0] + losses[1])
    counts = words.sum(1)
    if mean == "token":
        return per_anchor.sum() / counts.sum().clamp(min=1)
    if mean == "caption":
        has = counts > 0
        return (per_anchor.sum(1)[has] / counts[has]).sum() / has.sum().clamp(min=1)
    raise ValueError(f"mean must be 'token' or 'caption', not {mean!r}")
