"""Composed queries for dual encoders (SPARC, FDT): score fusion, or a trained fusion head.

Both modes treat unimodal items alike and as the families' official code does: an image alone is its
image-tower embedding, a text alone its text-tower embedding, so plain text↔image search gives the
official embeddings and an index of images or texts serves either mode. They differ only for items with
an image and a text: `score` adds the two normalised embeddings, `head` runs the MagicLens-style fusion
module (a small transformer over [image, text] features, an attentional pooler, LayerNorm), trained to
land in the same space.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from retrieval.encoders.base import Encoder, EncoderConfig
from retrieval.encoders.layers import Transformer
from retrieval.errors import RetrievalError
from retrieval.images import image_to_array, load_image
from retrieval.text_tokenizer import OWN_IDS, SpecialIds, TextTokenizer

FUSION_MODES = ("score", "head")


@dataclass(kw_only=True)
class TowerConfig:
    """The sizes every dual-encoder family shares: a ViT over patches, a text transformer, a shared `dim`;
    a family's config adds its own fields and checks (`check`)."""

    dim: int
    image_size: int
    patch: int
    vision_width: int
    vision_layers: int
    vision_heads: int
    context_length: int
    text_vocab: int
    text_width: int
    text_layers: int
    text_heads: int
    mlp_ratio: float = 4.0
    special_ids: SpecialIds = OWN_IDS
    fusion_head: dict[str, int] | None = field(default_factory=lambda: {"layers": 2, "heads": 4})
    init_logit_scale: float = math.log(1 / 0.07)
    loss: dict[str, Any] = field(default_factory=dict)  # read by the training objective

    @classmethod
    def from_dict(cls, data: dict[str, Any], image_size: int, context_length: int):
        """From the `model` dict of an encoder config: unknown keys refused, special ids parsed, then checked."""
        unknown = sorted(set(data) - ({f.name for f in fields(cls)} - {"image_size", "context_length"}))
        if unknown:
            raise RetrievalError(f"unknown {cls.__name__.removesuffix('Config')} model keys: {', '.join(unknown)}")
        data = dict(data)
        if "special_ids" in data:
            data["special_ids"] = SpecialIds(**data["special_ids"])
        config = cls(**data, image_size=image_size, context_length=context_length)
        if image_size % config.patch:
            raise RetrievalError(f"image size {image_size} is not a multiple of the patch size {config.patch}")
        config.check()
        return config

    def check(self) -> None:
        """The family's own checks of its fields."""

    @property
    def grid(self) -> int:
        return self.image_size // self.patch


class AttentionalPooler(nn.Module):
    """One learned query attending over a sequence (CoCa / MagicLens pooling)."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.query = nn.Parameter(torch.randn(1, 1, width) * width ** -0.5)
        self.ln_k = nn.LayerNorm(width)
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kv = self.ln_k(x)
        out, _ = self.attn(self.query.expand(len(x), -1, -1), kv, kv, need_weights=False)
        return out[:, 0]


class FusionHead(nn.Module):
    """[image feature, text feature] → transformer → attentional pooler → LayerNorm (un-normalised)."""

    def __init__(self, dim: int, heads: int, layers: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.modality = nn.Parameter(torch.zeros(2, dim))
        self.transformer = Transformer(dim, heads, layers, mlp_ratio)
        self.pool = AttentionalPooler(dim, heads)
        self.ln = nn.LayerNorm(dim)

    def forward(self, image: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        x = torch.stack([image, text], dim=1) + self.modality
        return self.ln(self.pool(self.transformer(x)))


class DualEncoderModel(nn.Module):
    """What a late-fusion family provides: `image_outputs` and `text_outputs`, each (un-normalised global
    features [B, dim], the family's per-item extras: SPARC's patches or tokens, FDT's sparse codes), and an
    optional `fusion_head`. `embed` turns them into the item embeddings of a fusion mode."""

    fusion_head: FusionHead | None

    def image_outputs(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def text_outputs(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def text_valid(self, ids: torch.Tensor) -> torch.Tensor:
        """The real positions of id rows [B, L]: everything but padding."""
        return ids != self.config.special_ids.pad

    def word_mask(self, ids: torch.Tensor) -> torch.Tensor:
        """The words of id rows: real positions other than SOT and EOT (what explanations and SPARC's
        fine-grained loss look at)."""
        special = self.config.special_ids
        return self.text_valid(ids) & (ids != special.sot) & (ids != special.eot)

    def image_features(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.image_outputs(pixels)[0]

    def text_features(self, ids: torch.Tensor) -> torch.Tensor:
        return self.text_outputs(ids)[0]

    def embed(self, pixels: torch.Tensor, has_image: torch.Tensor, text: torch.Tensor, has_text: torch.Tensor,
              mode: str = "score") -> torch.Tensor:
        """Unit embeddings [B, dim] of items with an image, a text or both."""
        return self.embed_outputs(pixels, has_image, text, has_text, mode)[0]

    def embed_outputs(self, pixels: torch.Tensor, has_image: torch.Tensor, text: torch.Tensor,
                      has_text: torch.Tensor, mode: str = "score"
                      ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """(unit embeddings, the image extras of the rows with an image, the text extras of the rows with a
        text); the towers run only on what is there."""
        text_feats = image_feats = pixels.new_zeros(len(text), self.config.dim)
        text_extras = image_extras = None
        if has_text.any():
            texts, text_extras = self.text_outputs(text[has_text])
            text_feats = texts.new_zeros(len(text), texts.shape[-1])
            text_feats[has_text] = texts
        if has_image.any():
            images, image_extras = self.image_outputs(pixels[has_image])
            image_feats = images.new_zeros(len(text), images.shape[-1])
            image_feats[has_image] = images
        return self.fuse(image_feats, has_image, text_feats, has_text, mode), image_extras, text_extras

    def fuse(self, image: torch.Tensor, has_image: torch.Tensor, text: torch.Tensor, has_text: torch.Tensor,
             mode: str = "score") -> torch.Tensor:
        """Item embeddings from un-normalised features [B, dim] (rows without that modality are ignored)."""
        image_unit, text_unit = F.normalize(image.float(), dim=-1), F.normalize(text.float(), dim=-1)
        out = image_unit * has_image[:, None] + text_unit * has_text[:, None]
        both = has_image & has_text
        if mode == "head" and both.any():
            if self.fusion_head is None:
                raise RetrievalError("this model has no fusion head; use fusion mode 'score'")
            out = out.clone()
            out[both] = self.fusion_head(image[both], text[both]).float()
        return F.normalize(out, dim=-1)


class LateFusionEncoder(Encoder):
    """The encoder of a dual-encoder family; `fusion_mode` picks how an image and a text become one vector."""

    fusion = "late"
    fusion_modes = FUSION_MODES
    requires_checkpoint = True  # the text tokenizer lives beside the weights
    model_class: type[DualEncoderModel]  # the family's model; its `config_class` has from_dict(...)

    @classmethod
    def model_config(cls, config: EncoderConfig):
        return cls.model_class.config_class.from_dict(config.model, config.image_size, config.context_length)

    @classmethod
    def build_model(cls, config: EncoderConfig) -> DualEncoderModel:
        model_config = cls.model_config(config)
        if model_config.dim != config.dim:
            raise RetrievalError(f"{config.name}: dim {config.dim} must equal the model's dim {model_config.dim}")
        return cls.model_class(model_config)

    def __init__(self, config: EncoderConfig, model: DualEncoderModel, device: str = "cpu",
                 checkpoint: str | None = None, tokenizer: TextTokenizer | None = None, fusion_mode: str = "score"):
        super().__init__(config, model, device, checkpoint)
        if tokenizer is None:
            if checkpoint is None:
                raise RetrievalError(f"{config.name} needs a checkpoint folder with its tokenizer.json")
            tokenizer = TextTokenizer.load(checkpoint, self.special_ids(config))
        vocab = getattr(model.config, "text_vocab", None)
        if vocab is not None and tokenizer.vocab_size > vocab:
            raise RetrievalError(f"tokenizer has {tokenizer.vocab_size} ids but {config.name} has {vocab} text ids")
        self.tokenizer = tokenizer
        self.fusion_modes = tuple(m for m in FUSION_MODES if m != "head" or model.fusion_head is not None)
        self.fusion_mode = fusion_mode

    @staticmethod
    def special_ids(config: EncoderConfig):
        from retrieval.text_tokenizer import OWN_IDS, SpecialIds

        return SpecialIds(**config.model["special_ids"]) if "special_ids" in config.model else OWN_IDS

    @property
    def fusion_mode(self) -> str:
        return self._fusion_mode

    @fusion_mode.setter
    def fusion_mode(self, mode: str) -> None:
        if mode not in self.fusion_modes:
            raise RetrievalError(f"fusion mode must be one of {', '.join(self.fusion_modes)}, not {mode!r}"
                                 + (" (this model has no fusion head)" if mode == "head" else ""))
        self._fusion_mode = mode

    def prepare(self, image: Image.Image | None, text: str | None) -> dict[str, torch.Tensor]:
        size = self.config.image_size
        pixels = (torch.from_numpy(image_to_array(image, size, self.config.mean, self.config.std, self.config.resize,
                                                  self.config.interpolation))
                  if image is not None else torch.zeros(3, size, size))
        return {"pixels": pixels, "has_image": torch.tensor(image is not None),
                "text": torch.tensor(self.tokenizer.row(text or "", self.config.context_length)),
                "has_text": torch.tensor(bool(text))}

    def pixels(self, images: list) -> torch.Tensor:
        """Prepared pixels [n, 3, S, S] of images (PIL images or paths), on the device."""
        return torch.stack([self.prepare(i if isinstance(i, Image.Image) else load_image(i), None)["pixels"]
                            for i in images]).to(self.device)

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.model.embed(**batch, mode=self.fusion_mode)

    def describe(self) -> dict[str, Any]:
        return super().describe() | {"fusion_mode": self.fusion_mode}

    def save(self, out_dir: str | os.PathLike) -> Path:
        out = super().save(out_dir)
        self.tokenizer.save(out)
        return out
