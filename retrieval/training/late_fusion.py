"""The objective of a late-fusion dual encoder (SPARC, FDT): a global contrastive loss on image–caption
pairs, plus the composed-query losses; a family adds its own terms (SPARC's fine-grained loss).

L = λ_global · L_global             InfoNCE of the global image and caption embeddings (equal captions, as
                                     Digits' templates, share every image they describe)
  + λ_fused · L_fused               InfoNCE of every pair's query and target embeddings as search makes
                                     them in score-fusion mode
  + λ_head · L_head                 the same for composed queries through the fusion head
  + the family's terms
One learned temperature is shared by all terms, clamped to the family's bounds after every step.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from retrieval.encoders.late_fusion import LateFusionEncoder
from retrieval.errors import RetrievalError
from retrieval.images import load_image
from retrieval.training.losses import MAX_LOGIT_SCALE, info_nce
from retrieval.training.pairs import Pair, candidates


class LateFusionObjective:
    loss_defaults: dict[str, Any] = {"lambda_global": 1.0, "lambda_fused": 1.0, "lambda_head": 1.0}
    logit_scale_bounds = (0.0, MAX_LOGIT_SCALE)

    def __init__(self, encoder: LateFusionEncoder, pairs: list[Pair], device: str = "cpu", progress: bool = True):
        self.encoder = encoder
        self.model = encoder.model
        self.device = device
        unknown = sorted(set(self.model.config.loss) - set(self.loss_defaults))
        if unknown:
            raise RetrievalError(f"unknown loss settings {', '.join(unknown)}; known: {', '.join(self.loss_defaults)}")
        self.weights = self.loss_defaults | self.model.config.loss
        self._pixels: dict[str, torch.Tensor] = {}
        self._rows: dict[str, list[int]] = {}

    def pixels(self, path: str) -> torch.Tensor:
        if path not in self._pixels:  # decoded once per run; half precision keeps the cache small
            self._pixels[path] = self.encoder.prepare(load_image(path), None)["pixels"].half()
        return self._pixels[path]

    def text_row(self, text: str) -> list[int]:
        if text not in self._rows:
            self._rows[text] = self.encoder.tokenizer.row(text, self.encoder.config.context_length)
        return self._rows[text]

    def batch(self, pairs: list[Pair], generator: torch.Generator) -> dict[str, Any]:
        # a query's own item stays a negative here: as an InfoNCE positive it would take its row's and its
        # column's whole share, silencing both (the bundled dual encoders were trained this way)
        targets, positives, _ = candidates(pairs)
        images = list(dict.fromkeys(i for p in pairs for i in (p.query_image, p.target_image) if i))
        texts = list(dict.fromkeys(t for p in pairs for t in (p.query_text, p.target_text) if t))
        image_at, text_at = {p: i for i, p in enumerate(images)}, {t: i for i, t in enumerate(texts)}

        def refs(items: list[tuple[str | None, str | None]]) -> tuple[torch.Tensor, torch.Tensor]:
            return (torch.tensor([image_at[i] if i else -1 for i, _ in items], dtype=torch.long),
                    torch.tensor([text_at[t] if t else -1 for _, t in items], dtype=torch.long))

        captions = [(p.query_image or p.target_image, p.target_text or p.query_text) for p in pairs
                    if (p.query_image is None) != (p.target_image is None)
                    and not (p.query_image and p.query_text) and not (p.target_image and p.target_text)]
        caption_images = list(dict.fromkeys(i for i, _ in captions))
        caption_texts = list(dict.fromkeys(t for _, t in captions))
        caption_positives = torch.zeros(len(caption_texts), len(caption_images), dtype=torch.bool)
        row, column = {t: j for j, t in enumerate(caption_texts)}, {i: j for j, i in enumerate(caption_images)}
        for i, t in captions:  # equal captions (Digits' templates) share every image they describe
            caption_positives[row[t], column[i]] = True
        size = self.encoder.config.image_size
        pixels = torch.stack([self.pixels(p) for p in images]) if images else torch.zeros(0, 3, size, size)
        batch = {"pixels": pixels.float(),
                 "text": torch.tensor([self.text_row(t) for t in texts], dtype=torch.long).reshape(
                     len(texts), self.encoder.config.context_length),
                 "left": refs([p.query for p in pairs]), "right": refs(targets),
                 "positives": positives,
                 "caption_pairs": refs(captions),
                 "caption_images": torch.tensor([image_at[i] for i in caption_images], dtype=torch.long),
                 "caption_texts": torch.tensor([text_at[t] for t in caption_texts], dtype=torch.long),
                 "caption_positives": caption_positives}
        return {k: tuple(x.to(self.device) for x in v) if isinstance(v, tuple) else v.to(self.device)
                for k, v in batch.items()}

    def loss(self, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, float]]:
        model = self.model
        absent = (torch.zeros(1, model.config.dim, device=self.device), None)  # rows gathered from it are masked
        text_global, text_local = model.text_outputs(batch["text"]) if len(batch["text"]) else absent
        image_global, image_local = model.image_outputs(batch["pixels"]) if len(batch["pixels"]) else absent
        scale = model.logit_scale

        def embed(refs: tuple[torch.Tensor, torch.Tensor], mode: str) -> torch.Tensor:
            image, text = refs
            return model.fuse(image_global[image.clamp(min=0)], image >= 0, text_global[text.clamp(min=0)],
                              text >= 0, mode)

        right = embed(batch["right"], "score")
        terms = {"fused": info_nce(embed(batch["left"], "score"), right, batch["positives"], scale)}
        composed = (batch["left"][0] >= 0) & (batch["left"][1] >= 0)
        if model.fusion_head is not None and composed.any():
            left = embed(tuple(r[composed] for r in batch["left"]), "head")
            terms["head"] = info_nce(left, right, batch["positives"][composed], scale)
        if len(batch["caption_texts"]):
            caption_texts = F.normalize(text_global[batch["caption_texts"]], dim=-1)
            caption_images = F.normalize(image_global[batch["caption_images"]], dim=-1)
            terms["global"] = info_nce(caption_texts, caption_images, batch["caption_positives"], scale)
        family_terms, logs = self.family_terms(batch, image_local, text_local)
        terms |= family_terms
        loss = sum(self.weights[f"lambda_{name}"] * value for name, value in terms.items())
        return loss, {name: value.item() for name, value in terms.items()} | logs

    def family_terms(self, batch: dict[str, Any], image_local: torch.Tensor, text_local: torch.Tensor
                     ) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
        """The family's own loss terms (weighted by `lambda_NAME`) and logs; none by default."""
        return {}, {}

    def after_step(self) -> None:
        with torch.no_grad():
            self.model.logit_scale.clamp_(*self.logit_scale_bounds)

    def save(self, out: Path) -> None:
        self.encoder.save(out)

