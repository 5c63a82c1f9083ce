"""`test-tiny`: a seeded random-weight model over images, texts and both, for tests of the pipeline.

Random projections of pixels and of position-aware byte embeddings keep distinct inputs apart, so
self-retrieval is meaningful even without training. Text is tokenised as UTF-8 bytes.
"""

from __future__ import annotations

import torch
from PIL import Image
from torch import nn

from retrieval.encoders.base import Encoder, EncoderConfig
from retrieval.images import image_to_array

PAD = 256  # byte values are 0..255


class TinyTestModel(nn.Module):
    def __init__(self, image_size: int, context_length: int, dim: int, width: int, text_width: int):
        super().__init__()
        # zero-mean activations and no biases: random features that keep distinct inputs far apart
        self.image_proj = nn.Sequential(nn.Linear(3 * image_size * image_size, width, bias=False), nn.Tanh(),
                                        nn.Linear(width, width, bias=False))
        self.byte_embed = nn.Embedding(PAD + 1, text_width, padding_idx=PAD)
        self.pos_embed = nn.Parameter(torch.randn(context_length, text_width) * 0.5)
        self.text_proj = nn.Linear(text_width, width, bias=False)
        self.fuse = nn.Sequential(nn.Linear(2 * width + 2, width, bias=False), nn.Tanh(),
                                  nn.Linear(width, dim, bias=False))

    def forward(self, pixels, has_image, tokens, has_text):
        img = self.image_proj(pixels.flatten(1)) * has_image[:, None]
        mask = (tokens != PAD).to(pixels.dtype)
        h = torch.tanh(self.byte_embed(tokens) + self.pos_embed)
        txt = (h * mask[..., None]).sum(1) / mask.sum(1).clamp(min=1)[:, None]
        txt = self.text_proj(txt) * has_text[:, None]
        return self.fuse(torch.cat([img, txt, has_image[:, None], has_text[:, None]], dim=1))


class TinyTestEncoder(Encoder):
    fusion = "early"

    @classmethod
    def build_model(cls, config: EncoderConfig) -> nn.Module:
        return TinyTestModel(config.image_size, config.context_length, config.dim, **config.model)

    def prepare(self, image: Image.Image | None, text: str | None) -> dict[str, torch.Tensor]:
        size, length = self.config.image_size, self.config.context_length
        if image is not None:
            pixels = torch.from_numpy(image_to_array(image, size, self.config.mean, self.config.std))
        else:
            pixels = torch.zeros(3, size, size)
        data = list(text.encode("utf-8"))[:length] if text else []
        tokens = torch.full((length,), PAD, dtype=torch.long)
        tokens[: len(data)] = torch.tensor(data, dtype=torch.long)
        return {
            "pixels": pixels,
            "has_image": torch.tensor(float(image is not None)),
            "tokens": tokens,
            "has_text": torch.tensor(float(bool(text))),
        }
