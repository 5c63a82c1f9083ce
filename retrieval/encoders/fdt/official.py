"""`retrieval models import fdt`: an official FDT checkpoint (`ckpt_*.pth.tar`) into our format, offline
and strictly.

The file is a pickled dict {'model': DDP state dict, 'optimizer', 'last_iter'}; keys carry `module.`.
Every key keeps its name and shape, except the heads FDT never trains (the CLS path's `ln_post` and
`proj`, the text projection, the unused `logit_scale_sd`), which must be there and are dropped. The
temperature T is not stored in the checkpoint, so it is given on the command line.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch

from retrieval.encoders.base import EncoderConfig
from retrieval.encoders.fdt import FDTEncoder
from retrieval.encoders.official_state import check_keys, check_shapes, count_blocks, shape_of
from retrieval.errors import RetrievalError
from retrieval.text_tokenizer import SpecialIds, TextTokenizer

UNTRAINED = ("visual.ln_post.weight", "visual.ln_post.bias", "visual.proj", "encode_text.text_projection.weight",
             "encode_text.text_projection.bias", "logit_scale_sd")
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
FDT_VOCAB = 49409  # the CLIP BPE with <|mask|> put before SOT and EOT


def read_official(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    path = Path(path)
    if not path.is_file():
        raise RetrievalError(f"{path} is not a file: give the official .pth.tar")
    raw = torch.load(path, map_location="cpu", weights_only=True)
    state = raw.get("model", raw) if isinstance(raw, dict) else None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise RetrievalError(f"{path} holds no state dict (expected a dict with a 'model' state dict)")
    return {k.removeprefix("module."): v for k, v in state.items()}


def official_config(state: dict[str, torch.Tensor], temperature: float, name: str | None = None) -> EncoderConfig:
    """Our config for an official checkpoint: sizes from the shapes, heads by CLIP's rule (width / 64)."""
    codebook, dim = shape_of(state, "space_dict")
    vision_width, _, patch, _ = shape_of(state, "visual.conv1.weight")
    grid = math.isqrt(shape_of(state, "visual.positional_embedding")[0] - 1)
    vocab, text_width = shape_of(state, "encode_text.token_embedding.weight")
    if vocab != FDT_VOCAB:
        raise RetrievalError(f"encode_text.token_embedding has {vocab} rows; FDT's vocabulary has {FDT_VOCAB}")
    ids = SpecialIds(sot=vocab - 2, eot=vocab - 1, pad=0, mask=vocab - 3)
    model = {"dim": dim, "codebook_size": codebook, "temperature": float(temperature), "patch": patch,
             "vision_width": vision_width, "vision_heads": max(1, vision_width // 64),
             "vision_layers": count_blocks(state, r"visual\.transformer\.resblocks\.(\d+)\."),
             "text_vocab": vocab, "text_width": text_width, "text_heads": max(1, text_width // 64),
             "text_layers": count_blocks(state, r"encode_text\.transformer\.resblocks\.(\d+)\."),
             "special_ids": ids.to_dict(), "pad_mask": "zero", "text_causal": True, "quick_gelu": True,
             "fusion_head": None}
    # the official evaluation: shorter side to 256 (bilinear), centre crop of 224 (scaled for other sizes)
    return EncoderConfig(name=name or "fdt-imported", family="fdt", dim=dim, image_size=grid * patch,
                         resize=grid * patch * 256 // 224, interpolation="bilinear", mean=IMAGENET_MEAN,
                         std=IMAGENET_STD,
                         context_length=shape_of(state, "encode_text.positional_embedding")[0], model=model,
                         description=f"official FDT ({codebook} tokens, T = {temperature:g}), imported")


def map_state(state: dict[str, torch.Tensor], ours: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The official tensors under our keys; missing, unexpected or misshapen keys are errors that name them."""
    check_keys(state, set(ours) | set(UNTRAINED))
    mapped = {k: v for k, v in state.items() if k not in UNTRAINED}
    if "logit_scale" in mapped and mapped["logit_scale"].numel() == 1:
        mapped["logit_scale"] = mapped["logit_scale"].reshape(ours["logit_scale"].shape)
    check_shapes(mapped, ours)
    return mapped


def import_fdt(path: str | os.PathLike, out: str | os.PathLike, temperature: float | None = None,
               tokenizer: str | os.PathLike | None = None, name: str | None = None) -> Path:
    """Convert an official `.pth.tar`; the CLIP BPE (vocab.json + merges.txt) comes from `tokenizer`, else from
    the checkpoint's folder. `temperature` must be the one the model was trained with (1000 in the release)."""
    if temperature is None:
        raise RetrievalError("FDT checkpoints do not store their temperature: give --option temperature=T "
                             "(1000 for the released CC3M models)")
    state = read_official(path)
    config = official_config(state, temperature, name)
    model = FDTEncoder.build_model(config)
    model.load_state_dict(map_state(state, model.state_dict()), strict=True)
    text = TextTokenizer.from_clip_files(tokenizer or Path(path).parent, mask_before=True)
    return FDTEncoder(config, model, tokenizer=text).save(out)
