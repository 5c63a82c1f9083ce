"""FuseLIP (early fusion of discrete image tokens and text tokens): the encoder behind `fuselip-*` models."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from PIL import Image

from retrieval.encoders.base import Encoder, EncoderConfig
from retrieval.encoders.fuselip.model import FuseLIP, FuseLIPConfig
from retrieval.errors import RetrievalError
from retrieval.images import squash_to_array
from retrieval.text_tokenizer import TextTokenizer


def fuselip_config(config: EncoderConfig) -> FuseLIPConfig:
    return FuseLIPConfig.from_dict(config.model, config.context_length)


class FuseLIPEncoder(Encoder):
    """An image-only item is (image, ""); a composed query is (image, text); both give one vector."""

    fusion = "early"
    requires_checkpoint = True  # the text tokenizer lives beside the weights

    def __init__(self, config: EncoderConfig, model: FuseLIP, device: str = "cpu", checkpoint: str | None = None,
                 tokenizer: TextTokenizer | None = None):
        super().__init__(config, model, device, checkpoint)
        if tokenizer is None:
            if checkpoint is None:
                raise RetrievalError(f"{config.name} needs a checkpoint folder with its tokenizer.json")
            tokenizer = TextTokenizer.load(checkpoint, model.config.special_ids)
        if tokenizer.vocab_size > model.config.text_vocab:
            raise RetrievalError(f"tokenizer has {tokenizer.vocab_size} ids but {config.name} reserves "
                                 f"{model.config.text_vocab} text ids")
        self.tokenizer = tokenizer

    @classmethod
    def build_model(cls, config: EncoderConfig) -> FuseLIP:
        model_config = fuselip_config(config)
        if model_config.width != config.dim:
            raise RetrievalError(f"{config.name}: dim {config.dim} must equal the width {model_config.width}")
        return FuseLIP(model_config)

    @classmethod
    def image_tokenizer_config(cls, config: EncoderConfig):
        return fuselip_config(config).image_tokenizer

    def prepare(self, image: Image.Image | None, text: str | None) -> dict[str, torch.Tensor]:
        size = self.config.image_size
        pixels = torch.from_numpy(squash_to_array(image, size)) if image is not None else torch.zeros(3, size, size)
        return {
            "pixels": pixels,
            "has_image": torch.tensor(image is not None),
            "text": torch.tensor(self.tokenizer.row(text or "", self.config.context_length)),
        }

    def save(self, out_dir: str | os.PathLike) -> Path:
        out = super().save(out_dir)
        self.tokenizer.save(out)
        return out
