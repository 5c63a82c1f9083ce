"""FDT (finite discrete tokens): the encoder behind `fdt-*` models.

Besides the dense embedding it exposes the sparse code of an item — which codebook tokens it activates,
with what weight — and, for explanations, which words or patches activate a token most.
"""

from __future__ import annotations

import torch

from retrieval.encoders.fdt.model import FDT
from retrieval.encoders.late_fusion import LateFusionEncoder
from retrieval.errors import RetrievalError

CODE_COLUMNS = ("image_code_ids", "image_code_weights", "text_code_ids", "text_code_weights")


class FDTEncoder(LateFusionEncoder):
    """`encode --sparse-codes` stores each item's image and text codes (active token ids and weights) beside
    its embedding, which `vectors_from_codes` rebuilds exactly."""

    extra_columns = CODE_COLUMNS

    model_class = FDT

    @torch.inference_mode()
    def codes(self, images: list | None = None, texts: list[str] | None = None) -> torch.Tensor:
        """Sparse codes w [n, C] of images (PIL or paths) or of texts (one modality per call)."""
        if (images is None) == (texts is None):
            raise RetrievalError("codes takes images or texts")
        if images is not None:
            return self.model.image_outputs(self.pixels(images))[1].float().cpu()
        ids = torch.tensor([self.tokenizer.row(t, self.config.context_length) for t in texts], device=self.device)
        return self.model.text_outputs(ids)[1].float().cpu()

    def forward_columns(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, list]]:
        vectors, image_codes, text_codes = self.model.embed_outputs(**batch, mode=self.fusion_mode)
        columns = {}
        sides = (("image", batch["has_image"], image_codes), ("text", batch["has_text"], text_codes))
        for side, present, codes in sides:
            ids, weights = [None] * len(vectors), [None] * len(vectors)
            codes = codes.float().cpu() if codes is not None else []  # one transfer, not one per item
            for row, code in zip(present.nonzero().flatten().tolist(), codes):
                active = code.nonzero().flatten()
                ids[row], weights[row] = active.tolist(), code[active].float().tolist()
            columns[f"{side}_code_ids"], columns[f"{side}_code_weights"] = ids, weights
        return vectors, columns

    @torch.inference_mode()
    def vectors_from_codes(self, rows: list[dict]) -> torch.Tensor:
        """The unit embeddings [n, dim] of store rows from their stored codes alone (Eᵀw, then the fusion)."""
        size, model = self.model.config.codebook_size, self.model

        def dense(ids, weights) -> torch.Tensor:
            code = torch.zeros(size, device=self.device)
            if ids is not None:
                where = torch.tensor(ids, dtype=torch.long, device=self.device)
                code[where] = torch.tensor(weights, device=self.device)
            return code

        image = torch.stack([dense(r["image_code_ids"], r["image_code_weights"]) for r in rows])
        text = torch.stack([dense(r["text_code_ids"], r["text_code_weights"]) for r in rows])
        has_image = torch.tensor([r["image_code_ids"] is not None for r in rows], device=self.device)
        has_text = torch.tensor([r["text_code_ids"] is not None for r in rows], device=self.device)
        return model.fuse(model.from_code(image), has_image, model.from_code(text), has_text, self.fusion_mode).cpu()

    @torch.inference_mode()
    def activations(self, image=None, text: str | None = None) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
        """For one image (PIL or path) or one text: its sparse code [C], the per-position scores [N, C] that
        were max-pooled into it (patches in row-major grid order, or the text's word pieces), and the
        positions' labels (the word pieces; empty for an image)."""
        model = self.model
        if image is not None:
            scores = model.scores(model.visual(self.pixels([image])), model.img_query_model)
            return model.code(scores)[0].float().cpu(), scores[0].float().cpu(), []
        ids = torch.tensor([self.tokenizer.row(text or "", self.config.context_length)], device=self.device)
        valid = model.text_valid(ids)
        scores = model.scores(model.encode_text(ids, valid), model.txt_query_model, valid)
        words = model.word_mask(ids)[0]
        labels = [self.tokenizer.backend.decode([i]).strip() for i in ids[0, words].tolist()]
        return model.code(scores)[0].float().cpu(), scores[0, words].float().cpu(), labels
