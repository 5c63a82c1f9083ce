"""SPARC (sparse fine-grained contrastive alignment): the encoder behind `sparc-*` models.

Besides the global embeddings it offers the fine-grained view: which patches each word of a text groups
in an image (`alignment`), and the token-to-grouped-patch score used to re-rank text → image hits.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from retrieval.encoders.base import EncoderConfig
from retrieval.encoders.late_fusion import LateFusionEncoder
from retrieval.encoders.sparc.model import SPARC, SPARCConfig
from retrieval.errors import RetrievalError
from retrieval.images import load_image


def sparc_config(config: EncoderConfig) -> SPARCConfig:
    return SPARCConfig.from_dict(config.model, config.image_size, config.context_length)


class SPARCEncoder(LateFusionEncoder):
    @classmethod
    def build_model(cls, config: EncoderConfig) -> SPARC:
        model_config = sparc_config(config)
        if model_config.dim != config.dim:
            raise RetrievalError(f"{config.name}: dim {config.dim} must equal the model's dim {model_config.dim}")
        return SPARC(model_config)

    @torch.inference_mode()
    def alignment(self, text: str, images: list) -> tuple[list[str], torch.Tensor, torch.Tensor]:
        """(the text's words, their alignment weights over each image's patch grid [n, W, g, g], and the
        token-to-grouped-patch score of each image [n]: the mean over words of cos(t_l, c_l))."""
        ids = torch.tensor([self.tokenizer.row(text, self.config.context_length)], device=self.device)
        words = self.model.word_mask(ids)[0]
        if not words.any():
            raise RetrievalError(f"the text {text!r} has no words to align")
        _, tokens = self.model.text_outputs(ids)
        tokens = tokens[:, words]
        pixels = torch.stack([self.prepare(img if isinstance(img, Image.Image) else load_image(img), None)["pixels"]
                              for img in images]).to(self.device)
        _, patches = self.model.image_outputs(pixels)
        weights, grouped = self.model.group(tokens.expand(len(images), -1, -1), patches)
        scores = F.cosine_similarity(grouped.float(), tokens.float(), dim=-1).mean(1)
        grid = self.model.config.grid
        labels = [self.tokenizer.backend.decode([i]).strip() for i in ids[0, words].tolist()]
        return labels, weights.reshape(len(images), -1, grid, grid).cpu(), scores.cpu()

    def local_scores(self, text: str, images: list) -> np.ndarray:
        """Token-to-grouped-patch scores of `images` for `text` (SPARC's fine-grained similarity)."""
        return self.alignment(text, images)[2].numpy()
