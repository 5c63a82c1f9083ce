"""FuseLIP: one bidirectional transformer over a joint vocabulary of text BPE ids and discrete image ids.

Sequence: [image ids…][SOT][text…][EOT][pad…], cut to the context length with EOT kept. The embedding is
the final-LayerNorm state at the first EOT, with no projection. Image ids are codebook indices shifted
by `image_offset` (49409 in the released models: the CLIP BPE, then [MASK]).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from retrieval.encoders.fuselip.titok import TiTokConfig, TiTokTokenizer
from retrieval.encoders.fuselip.vq import ConvVQConfig, ConvVQTokenizer
from retrieval.encoders.layers import Transformer
from retrieval.text_tokenizer import SpecialIds

LENGTH_MULTIPLE = 8  # rows of a batch run in groups of equal length rounded up to this
ROW_MULTIPLE = 4  # training under CPU autocast runs each group padded to a multiple of this many rows


@dataclass
class FuseLIPConfig:
    width: int
    heads: int
    layers: int
    context_length: int
    text_vocab: int  # rows reserved for text ids (BPE + specials + [MASK])
    image_offset: int  # id of image code 0
    special_ids: SpecialIds
    image_tokenizer: ConvVQConfig | TiTokConfig
    mlp_ratio: float = 4.0
    mask_head: bool = True
    init_logit_scale: float = math.log(10)
    init_logit_bias: float = -10.0

    @property
    def vocab_size(self) -> int:
        return self.image_offset + self.image_tokenizer.codebook_size

    @classmethod
    def from_dict(cls, data: dict[str, Any], context_length: int) -> FuseLIPConfig:
        data = dict(data)
        tok = dict(data.pop("image_tokenizer"))
        kind = tok.pop("type")
        image_tokenizer = {"conv-vq": ConvVQConfig, "titok": TiTokConfig}[kind](**tok)
        ids = SpecialIds(**data.pop("special_ids"))
        return cls(context_length=context_length, special_ids=ids, image_tokenizer=image_tokenizer, **data)


def build_image_tokenizer(config: ConvVQConfig | TiTokConfig) -> nn.Module:
    return ConvVQTokenizer(config) if isinstance(config, ConvVQConfig) else TiTokTokenizer(config)


class MaskPredictionHead(nn.Module):
    """dense → GELU → LayerNorm, then logits against the (tied) token embedding plus a bias."""

    def __init__(self, width: int, vocab_size: int):
        super().__init__()
        self.dense = nn.Linear(width, width)
        self.layer_norm = nn.LayerNorm(width)
        self.bias = nn.Parameter(torch.zeros(vocab_size))

    def forward(self, hidden: torch.Tensor, embedding: torch.Tensor) -> torch.Tensor:
        return self.layer_norm(F.gelu(self.dense(hidden))) @ embedding.T + self.bias


class FuseLIP(nn.Module):
    def __init__(self, config: FuseLIPConfig):
        super().__init__()
        self.config = config
        w = config.width
        self.image_tokenizer = build_image_tokenizer(config.image_tokenizer).requires_grad_(False).eval()
        self.token_embedding = nn.Embedding(config.vocab_size, w)
        self.positional_embedding = nn.Parameter(torch.empty(config.context_length, w))
        self.transformer = Transformer(w, config.heads, config.layers, config.mlp_ratio)
        self.ln_final = nn.LayerNorm(w)
        self.mask_prediction_head = MaskPredictionHead(w, config.vocab_size) if config.mask_head else None
        self.logit_scale = nn.Parameter(torch.tensor(config.init_logit_scale))
        self.logit_bias = nn.Parameter(torch.tensor(config.init_logit_bias))
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)

    def train(self, mode: bool = True) -> FuseLIP:
        super().train(mode)
        self.image_tokenizer.eval()  # frozen, always in eval mode
        return self

    def image_codes(self, pixels: torch.Tensor, has_image: torch.Tensor) -> torch.Tensor:
        """Codebook indices [B, N] for the rows that have an image (zeros elsewhere)."""
        codes = torch.zeros(len(pixels), self.image_tokenizer.num_tokens, dtype=torch.long, device=pixels.device)
        rows = has_image.bool().nonzero().squeeze(1)
        if len(rows):
            codes[rows] = self.image_tokenizer(pixels[rows])
        return codes

    def sequence(self, codes: torch.Tensor, has_image: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """Joint ids [B, L] from image codes [B, N] and text rows [B, context length] (`TextTokenizer.row`):
        image ids first where there is an image, then the text row; cut to the context length with EOT forced
        into the last place if it fell off, then trimmed to the longest first-EOT + 1."""
        eot, ctx = self.config.special_ids.eot, self.config.context_length
        with_image = torch.cat([codes + self.config.image_offset, text], dim=1)[:, :ctx]
        lost = ~(with_image == eot).any(1)
        with_image[lost, ctx - 1] = eot
        ids = torch.where(has_image.bool()[:, None], with_image, text)
        length = int(first_eot(ids, eot).max()) + 1
        return ids[:, :length]

    def hidden(self, ids: torch.Tensor) -> torch.Tensor:
        """Transformer states before the final LayerNorm, [B, L, W]; padding is masked as a key."""
        x = self.token_embedding(ids) + self.positional_embedding[: ids.shape[1]]
        return self.transformer(x, ids != self.config.special_ids.pad)

    def pool(self, hidden: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """The final-LayerNorm state at the first EOT, [B, W] (not normalised)."""
        rows = torch.arange(len(ids), device=ids.device)
        return self.ln_final(hidden[rows, first_eot(ids, self.config.special_ids.eot)])

    def hidden_by_length(self, ids: torch.Tensor, multiple: int = LENGTH_MULTIPLE, row_multiple: int = 1
                         ) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """(rows, their ids cut after the group's longest row, their `hidden` states) for each group of rows of
        equal length rounded up to `multiple`: a short row need not pay for the padding of the batch's longest
        one. Padding is masked as a key, so a row's states do not depend on its group.

        With `row_multiple` > 1 (training under CPU autocast), a group runs cut to its rounded length (at most
        the batch's) and with repeats of its first row up to a multiple of that many rows, dropped after: so few
        shapes occur that the CPU's bf16 matrix kernels, which oneDNN compiles once per shape, are mostly reused."""
        lengths = row_lengths(ids, self.config.special_ids.pad)
        for rounded, rows in length_groups(lengths, multiple):
            cut = min(rounded, ids.shape[1]) if row_multiple > 1 else int(lengths[rows].max())
            chunk = ids[rows, :cut]
            repeats = -len(rows) % row_multiple
            padded = torch.cat([chunk, chunk[:1].expand(repeats, -1)]) if repeats else chunk
            yield rows, chunk, self.hidden(padded)[: len(rows)]

    def embed_ids(self, ids: torch.Tensor) -> torch.Tensor:
        rows, pooled = [], []
        for group, chunk, hidden in self.hidden_by_length(ids):
            rows.append(group)
            pooled.append(self.pool(hidden, chunk))
        return in_row_order(rows, pooled) if rows else ids.new_zeros(0, self.config.width, dtype=torch.float)

    def forward(self, pixels: torch.Tensor, has_image: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        return self.embed_ids(self.sequence(self.image_codes(pixels, has_image), has_image, text))


def first_eot(ids: torch.Tensor, eot: int) -> torch.Tensor:
    return (ids == eot).int().argmax(1)


def row_lengths(ids: torch.Tensor, pad: int) -> torch.Tensor:
    """1 + the position of each row's last non-padding id."""
    return (ids != pad).int().cumsum(1).argmax(1) + 1


def length_groups(lengths: torch.Tensor, multiple: int) -> list[tuple[int, torch.Tensor]]:
    """(rounded length, row indices) for the rows grouped by length rounded up to a multiple of `multiple`,
    shortest group first."""
    keys = (lengths + multiple - 1) // multiple
    return [(int(key) * multiple, (keys == key).nonzero().squeeze(1)) for key in keys.unique()]


def in_row_order(rows: list[torch.Tensor], values: list[torch.Tensor]) -> torch.Tensor:
    """The per-group `values` put back into the order of the rows they came from."""
    return torch.cat(values)[torch.cat(rows).argsort()]
