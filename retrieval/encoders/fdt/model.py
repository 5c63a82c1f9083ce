"""FDT (finite discrete tokens): image and text embeddings as sparse mixtures of one shared codebook.

Per item: features (ViT patch outputs before ln_post with CLS dropped, or the text's ln_final outputs at
every position) → a query map per modality → dot products with the codebook E / √d → padding masked
(the official code sets padded scores to 0; −∞ is the alternative) → / T → max over positions →
sparsemax → w; the embedding is Eᵀw. Parameter names follow the official checkpoint (`space_dict`,
`img_query_model.q_map`, `visual.*`, `encode_text.*`) without the heads it never trains.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from retrieval.encoders.fdt.sparsemax import sparsemax
from retrieval.encoders.late_fusion import DualEncoderModel, FusionHead, TowerConfig
from retrieval.encoders.layers import Transformer, full_precision
from retrieval.errors import RetrievalError

PAD_MASKS = ("zero", "neg_inf")


@dataclass(kw_only=True)
class FDTConfig(TowerConfig):
    codebook_size: int
    temperature: float  # T: not in the official checkpoints; inference must use the training value
    pad_mask: str = "zero"  # "zero": the official behaviour; "neg_inf": padding cannot win the max
    text_causal: bool = True  # CLIP's text tower, as the official FDT
    quick_gelu: bool = False  # the official towers' blocks use QuickGELU (x·σ(1.702x)), not the exact GELU
    freeze_patch_embedding: bool = True  # the official recipe keeps conv1 at its random init

    def check(self) -> None:
        if self.pad_mask not in PAD_MASKS:
            raise RetrievalError(f"pad_mask must be one of {', '.join(PAD_MASKS)}, not {self.pad_mask!r}")
        if self.temperature <= 0:
            raise RetrievalError(f"the FDT temperature must be positive, not {self.temperature}")


class VisionTower(nn.Module):
    """CLIP's ViT up to its last block: patch embedding, CLS, positions, ln_pre, transformer. FDT reads the
    last block's patch outputs (CLS dropped) before ln_post, so ln_post and proj are not kept."""

    def __init__(self, config: FDTConfig):
        super().__init__()
        width, grid = config.vision_width, config.grid
        self.conv1 = nn.Conv2d(3, width, config.patch, stride=config.patch, bias=False)
        self.class_embedding = nn.Parameter(torch.randn(width) * width ** -0.5)
        self.positional_embedding = nn.Parameter(torch.randn(grid * grid + 1, width) * width ** -0.5)
        self.ln_pre = nn.LayerNorm(width)
        self.transformer = Transformer(width, config.vision_heads, config.vision_layers, config.mlp_ratio,
                                       config.quick_gelu)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = self.conv1(pixels).flatten(2).transpose(1, 2)
        x = torch.cat([self.class_embedding.to(x.dtype).expand(len(x), 1, -1), x], dim=1)
        return self.transformer(self.ln_pre(x + self.positional_embedding))[:, 1:]


class TextTower(nn.Module):
    def __init__(self, config: FDTConfig):
        super().__init__()
        width = config.text_width
        self.causal = config.text_causal
        self.pad = config.special_ids.pad
        self.token_embedding = nn.Embedding(config.text_vocab, width)
        self.positional_embedding = nn.Parameter(torch.randn(config.context_length, width) * 0.01)
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        self.transformer = Transformer(width, config.text_heads, config.text_layers, config.mlp_ratio,
                                       config.quick_gelu)
        self.ln_final = nn.LayerNorm(width)

    def forward(self, ids: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        x = self.token_embedding(ids) + self.positional_embedding[: ids.shape[1]]
        # causal attention already keeps padding (after EOT) out of every real position
        return self.ln_final(self.transformer(x, None if self.causal else valid, causal=self.causal))


class QueryMap(nn.Module):
    """φ: LayerNorm → Linear → GELU → LayerNorm → Linear, from a tower's width to the codebook's."""

    def __init__(self, width: int, dim: int):
        super().__init__()
        self.q_map = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, dim), nn.GELU(), nn.LayerNorm(dim),
                                   nn.Linear(dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.q_map(x)


class FDT(DualEncoderModel):
    config_class = FDTConfig

    def __init__(self, config: FDTConfig):
        super().__init__()
        self.config = config
        self.visual = VisionTower(config)
        self.encode_text = TextTower(config)
        self.img_query_model = QueryMap(config.vision_width, config.dim)
        self.txt_query_model = QueryMap(config.text_width, config.dim)
        self.space_dict = nn.Parameter(torch.randn(config.codebook_size, config.dim))
        self.logit_scale = nn.Parameter(torch.tensor(config.init_logit_scale))
        head = config.fusion_head
        self.fusion_head = FusionHead(config.dim, head["heads"], head["layers"], config.mlp_ratio) if head else None
        self.visual.conv1.weight.requires_grad_(not config.freeze_patch_embedding)

    def text_valid(self, ids: torch.Tensor) -> torch.Tensor:
        """Real positions: SOT, the words and the first EOT; padding after it is not (pad ids may be words)."""
        eot = (ids == self.config.special_ids.eot).int()
        return (eot.cumsum(1) - eot) == 0

    def scores(self, features: torch.Tensor, query_map: QueryMap, valid: torch.Tensor | None = None
               ) -> torch.Tensor:
        """Per-position codebook scores [B, N, C], scaled by 1/√d, masked, divided by T (before pooling)."""
        queries = query_map(features)
        with full_precision(queries):  # scores / T decide the support of sparsemax: no bfloat16 here
            s = queries.float() @ self.space_dict.float().T / math.sqrt(self.config.dim)
            if valid is not None:
                if self.config.pad_mask == "zero":
                    s = s * valid[..., None].to(s.dtype)
                else:
                    s = s.masked_fill(~valid[..., None], float("-inf"))
            return s / self.config.temperature

    def code(self, scores: torch.Tensor) -> torch.Tensor:
        """The sparse code w [B, C]: max over positions, then sparsemax."""
        return sparsemax(scores.amax(1))

    def from_code(self, code: torch.Tensor) -> torch.Tensor:
        """The (un-normalised) embedding Eᵀw of codes [B, C]."""
        with full_precision(code):
            return code.float() @ self.space_dict.float()

    def image_outputs(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(embedding Eᵀw [B, dim], code w [B, C])."""
        code = self.code(self.scores(self.visual(pixels), self.img_query_model))
        return self.from_code(code), code

    def text_outputs(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        valid = self.text_valid(ids)
        code = self.code(self.scores(self.encode_text(ids, valid), self.txt_query_model, valid))
        return self.from_code(code), code
