"""SPARC (sparse fine-grained contrastive alignment): the encoder behind `sparc-*` models.

Besides the global embeddings it offers the fine-grained view: which patches each word of a text groups
in an image (`alignment`), and the token-to-grouped-patch score used to re-rank text → image hits.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from retrieval.encoders.late_fusion import LateFusionEncoder
from retrieval.encoders.sparc.model import SPARC
from retrieval.errors import RetrievalError


class SPARCEncoder(LateFusionEncoder):
    model_class = SPARC

    @torch.inference_mode()
    def alignment(self, text: str, images: list, batch_size: int = 64) -> tuple[list[str], torch.Tensor, torch.Tensor]:
        """(the text's words, their alignment weights over each image's patch grid [n, W, g, g], and the
        token-to-grouped-patch score of each image [n]: the mean over words of cos(t_l, c_l))."""
        ids = torch.tensor([self.tokenizer.row(text, self.config.context_length)], device=self.device)
        words = self.model.word_mask(ids)[0]
        if not words.any():
            raise RetrievalError(f"the text {text!r} has no words to align")
        _, tokens = self.model.text_outputs(ids)
        tokens = tokens[:, words]
        all_weights, all_scores = [], []
        for start in range(0, len(images), batch_size):
            chunk = images[start:start + batch_size]
            _, patches = self.model.image_outputs(self.pixels(chunk))
            weights, grouped = self.model.group(tokens.expand(len(chunk), -1, -1), patches)
            all_scores.append(F.cosine_similarity(grouped.float(), tokens.float(), dim=-1).mean(1).cpu())
            all_weights.append(weights.cpu())
        grid = self.model.config.grid
        labels = [self.tokenizer.backend.decode([i]).strip() for i in ids[0, words].tolist()]
        return labels, torch.cat(all_weights).reshape(len(images), -1, grid, grid), torch.cat(all_scores)

    def local_scores(self, text: str, images: list) -> np.ndarray:
        """Token-to-grouped-patch scores of `images` for `text` (SPARC's fine-grained similarity)."""
        return self.alignment(text, images)[2].numpy()
