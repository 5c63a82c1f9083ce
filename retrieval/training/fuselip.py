"""FuseLIP's objective: SigLIP on the query and target embeddings + 0.25 × masked multimodal modelling.

Both sides go through the same encoder; the contrastive embeddings come from the same masked pass that
the mask-prediction head reads. The image tokenizer is frozen, so every training image is tokenised once.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm import tqdm

from retrieval.encoders.fuselip import FuseLIPEncoder
from retrieval.encoders.fuselip.model import (
    LENGTH_MULTIPLE,
    ROW_MULTIPLE,
    in_row_order,
    length_groups,
    row_lengths,
)
from retrieval.images import load_image
from retrieval.training.losses import MAX_LOGIT_SCALE, mask_tokens, masked_token_loss, siglip_loss
from retrieval.training.pairs import Pair, candidates


class FuseLIPObjective:
    length_multiple = LENGTH_MULTIPLE  # `bench train` sets one no row reaches: one padded batch
    row_multiple = ROW_MULTIPLE  # under CPU autocast only, where it keeps the bf16 kernels few

    def __init__(self, encoder: FuseLIPEncoder, pairs: list[Pair], mask_probability: float = 0.1,
                 mmm_weight: float = 0.25, device: str = "cpu", progress: bool = True):
        self.encoder = encoder
        self.model = encoder.model
        self.mask_probability = mask_probability
        self.mmm_weight = mmm_weight
        self.device = device
        self.images = sorted({p for pair in pairs for p in (pair.query_image, pair.target_image) if p})
        self.image_rows = {path: i for i, path in enumerate(self.images)}
        self.progress = progress
        self._codes: torch.Tensor | None = None
        self._text_rows: dict[str, list[int]] = {}
        ids = self.model.config.special_ids
        self.never_masked = [ids.eot, ids.pad] + ([ids.mask] if ids.mask is not None else [])

    @property
    def codes(self) -> torch.Tensor:
        """Every training image's ids, made on first use: after a resumed run has restored the tokenizer."""
        if self._codes is None:
            self._codes = tokenize_images(self.encoder, self.images, self.progress)
        return self._codes

    def text_row(self, text: str | None) -> list[int]:
        text = text or ""
        if text not in self._text_rows:
            self._text_rows[text] = self.encoder.tokenizer.row(text, self.model.config.context_length)
        return self._text_rows[text]

    def sequences(self, items: list[tuple[str | None, str | None]]) -> torch.Tensor:
        """Joint ids for (image path, text) items, with the cached image codes."""
        has_image = torch.tensor([image is not None for image, _ in items])
        codes = self.codes[[self.image_rows[image] if image else 0 for image, _ in items]]
        text = torch.tensor([self.text_row(t) for _, t in items])
        return self.model.sequence(codes, has_image, text)

    def batch(self, pairs: list[Pair], generator: torch.Generator) -> dict[str, Any]:
        targets, positives, query_is_target = candidates(pairs)  # equal targets are scored once
        # SigLIP scores each cell on its own, so a query's own item counts as a positive, nearly met already
        # (the two differ only by masking); as a negative, the near-copies could only be pushed apart by
        # shrinking the logit scale
        positives = positives | query_is_target
        sides = {}
        for name, items in (("left", [p.query for p in pairs]), ("right", targets)):
            ids = self.sequences(items)
            masked, where = mask_tokens(ids, self.mask_probability, self.model.config.special_ids.mask,
                                        self.never_masked, generator)
            sides[name] = (ids.to(self.device), masked.to(self.device), where.to(self.device))
        return {"sides": sides, "positives": positives.to(self.device)}

    def loss(self, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, float]]:
        model, embeddings, mmm = self.model, [], 0.0
        row_multiple = self.row_multiple if torch.is_autocast_enabled("cpu") else 1
        for ids, masked, where in batch["sides"].values():
            rows, pooled, logits, targets = [], [], [], []
            for group, chunk, hidden in model.hidden_by_length(masked, self.length_multiple, row_multiple):
                picked = where[group, : chunk.shape[1]]  # only padding is cut off, and it is never masked
                rows.append(group)
                pooled.append(model.pool(hidden, chunk))
                logits.append(model.mask_prediction_head(hidden[picked], model.token_embedding.weight))
                targets.append(ids[group, : chunk.shape[1]][picked])
            embeddings.append(F.normalize(in_row_order(rows, pooled).float(), dim=-1))
            mmm = mmm + masked_token_loss(torch.cat(logits), torch.cat(targets))
        contrastive = siglip_loss(*embeddings, batch["positives"], model.logit_scale, model.logit_bias)
        loss = contrastive + self.mmm_weight * mmm
        return loss, {"siglip": contrastive.item(), "mmm": float(mmm.detach())}

    def groups_per_side(self, batch: dict[str, Any], multiple: int) -> list[int]:
        """How many groups of lengths rounded to `multiple` each side of `batch` runs in (for `bench train`)."""
        pad = self.model.config.special_ids.pad
        return [len(length_groups(row_lengths(ids, pad), multiple)) for ids, _, _ in batch["sides"].values()]

    def after_step(self) -> None:
        with torch.no_grad():
            self.model.logit_scale.clamp_(0, MAX_LOGIT_SCALE)

    def save(self, out: Path) -> None:
        self.encoder.save(out)


@torch.no_grad()
def tokenize_images(encoder: FuseLIPEncoder, paths: list[str], progress: bool = True,
                    batch_size: int = 256) -> torch.Tensor:
    """Codebook indices [n, N] of every image, by the encoder's frozen image tokenizer."""
    tokenizer = encoder.model.image_tokenizer.eval()
    device = next(tokenizer.parameters()).device
    out = torch.zeros(max(1, len(paths)), tokenizer.num_tokens, dtype=torch.long)
    for start in tqdm(range(0, len(paths), batch_size), desc="tokenise images", unit="batch", disable=not progress):
        chunk = paths[start:start + batch_size]
        pixels = torch.stack([encoder.prepare(load_image(p), None)["pixels"] for p in chunk])
        out[start:start + len(chunk)] = tokenizer(pixels.to(device)).cpu()
    return out
