"""`retrieval models import fuselip`: the official FuseLIP checkpoint (config.json + pytorch_model.bin)
into our format, offline and strictly.

The official file is a pickled flat state dict that also holds the frozen TiTok encoder and codebook,
so nothing needs downloading. Key changes: the `image_tokenizer.model.` prefix becomes
`image_tokenizer.`, TiTok's 1×1 `conv_out` becomes a Linear, and the mask-prediction decoder, a duplicate
of the token embedding (tied), is checked and dropped. Every other key keeps its name and shape.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import torch

from retrieval.encoders.base import EncoderConfig
from retrieval.encoders.fuselip import FuseLIPEncoder
from retrieval.encoders.fuselip.model import FuseLIP
from retrieval.encoders.fuselip.titok import TITOK_VARIANTS, TiTokConfig
from retrieval.encoders.official_state import check_keys, check_shapes, count_blocks, shape_of
from retrieval.errors import RetrievalError
from retrieval.files import read_json
from retrieval.text_tokenizer import CLIP_IDS, SpecialIds, TextTokenizer

CLIP_BPE_SIZE = 49408
TITOK_PREFIX = "image_tokenizer.model."
TIED_DECODER = "mask_prediction_head.decoder.weight"
CONV_OUT = "image_tokenizer.model.encoder.conv_out.weight"
DROPPED_PREFIXES = ("image_tokenizer.model.pixel_", "image_tokenizer.model.decoder")  # local training files only
# (codebook rows, code size) → TiTok variant; the variant fixes the legacy reshape and the L2-normalised VQ
VARIANT_BY_CODEBOOK = {(4096, 12): "s-128", (8192, 64): "bl-128"}
SIZE_NAMES = {384: "fuselip-s", 512: "fuselip-b"}


def read_official(folder: str | os.PathLike) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    folder = Path(folder)
    missing = [f for f in ("config.json", "pytorch_model.bin") if not (folder / f).is_file()]
    if missing:
        raise RetrievalError(f"{folder} is not an official FuseLIP checkpoint: missing {', '.join(missing)}")
    state = torch.load(folder / "pytorch_model.bin", map_location="cpu", weights_only=True)
    if not isinstance(state, dict):
        raise RetrievalError(f"{folder / 'pytorch_model.bin'} is not a state dict")
    state = {k.removeprefix("module."): v for k, v in state.items()}
    state = {k: v for k, v in state.items() if not k.startswith(DROPPED_PREFIXES)}
    return read_json(folder / "config.json"), state


def official_config(config: dict[str, Any], state: dict[str, torch.Tensor], name: str | None = None) -> EncoderConfig:
    """Our config for an official checkpoint: widths and depths from the shapes, heads from config.json."""
    mlm = float(config.get("mlm_probability", 0)) > 0
    if config.get("use_eoi", False):
        raise RetrievalError("config.json has use_eoi: true (an end-of-image id after the image ids), which no "
                             "released FuseLIP model uses and this importer does not insert: refused rather than "
                             "embedded unlike the official code")
    text_vocab = CLIP_BPE_SIZE + mlm
    codebook, code_dim = shape_of(state, TITOK_PREFIX + "quantize.embedding.weight")
    variant = VARIANT_BY_CODEBOOK.get((codebook, code_dim))
    if variant is None:
        raise RetrievalError(f"unknown TiTok codebook {codebook}×{code_dim}; known: "
                             + ", ".join(f"{c}×{d} ({v})" for (c, d), v in VARIANT_BY_CODEBOOK.items()))
    declared = str(config.get("image_tokenizer", ""))
    if declared and variant.replace("-", "") not in declared.replace("_", "").replace("-", ""):
        raise RetrievalError(f"config.json names image tokenizer {declared!r} but the codebook is {variant}'s")
    vocab, width = shape_of(state, "token_embedding.weight")
    if vocab != text_vocab + codebook:
        raise RetrievalError(f"token_embedding has {vocab} rows; expected {text_vocab} text + {codebook} image ids")
    text = config.get("text_config", {})
    heads = text.get("heads") or {384: 6, 512: 8}.get(width)
    if not heads:
        raise RetrievalError("config.json gives no text_config.heads, and the width is not a released size")
    context = shape_of(state, "positional_embedding")[0]
    titok_width = shape_of(state, TITOK_PREFIX + "latent_tokens")[1]
    patch = shape_of(state, TITOK_PREFIX + "encoder.patch_embed.weight")[-1]
    grid = math.isqrt(shape_of(state, TITOK_PREFIX + "encoder.positional_embedding")[0] - 1)
    base = TITOK_VARIANTS[variant]
    titok_layers = count_blocks(state, r"image_tokenizer\.model\.encoder\.transformer\.(\d+)\.")
    titok = TiTokConfig(width=titok_width, layers=titok_layers,
                        heads=max(1, titok_width // 64), code_dim=code_dim, codebook_size=codebook,
                        l2_norm=base.l2_norm, legacy=base.legacy, image_size=grid * patch, patch=patch,
                        num_tokens=shape_of(state, TITOK_PREFIX + "latent_tokens")[0])
    ids = SpecialIds(sot=CLIP_IDS.sot, eot=CLIP_IDS.eot, pad=CLIP_IDS.pad, mask=CLIP_IDS.mask if mlm else None)
    model = {"width": width, "heads": int(heads), "layers": count_blocks(state, r"transformer\.resblocks\.(\d+)\."),
             "mlp_ratio": float(text.get("mlp_ratio", 4.0)), "text_vocab": text_vocab,
             "image_offset": text_vocab, "special_ids": ids.to_dict(), "image_tokenizer": titok.to_dict(),
             "mask_head": TIED_DECODER in state}
    return EncoderConfig(name=name or SIZE_NAMES.get(width, "fuselip-imported"), family="fuselip", dim=width,
                         image_size=titok.image_size, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0),
                         context_length=context, model=model,
                         description=f"official FuseLIP ({variant} tokens, CLIP BPE), imported")


def ours_from_official(key: str) -> str:
    return "image_tokenizer." + key.removeprefix(TITOK_PREFIX) if key.startswith(TITOK_PREFIX) else key


def map_state(state: dict[str, torch.Tensor], model: FuseLIP) -> dict[str, torch.Tensor]:
    """Rename and reshape the official tensors into `model`'s keys; any missing or unexpected key,
    wrong shape or untied decoder is an error that names them."""
    ours = model.state_dict()
    expected = {k if not k.startswith("image_tokenizer.") else TITOK_PREFIX + k.removeprefix("image_tokenizer.")
                for k in ours}
    if model.mask_prediction_head is not None:
        expected.add(TIED_DECODER)
    check_keys(state, expected)
    mapped, official = {}, {}
    for key, tensor in state.items():
        if key == TIED_DECODER:
            if not torch.equal(tensor, state["token_embedding.weight"]):
                raise RetrievalError(f"{TIED_DECODER} differs from token_embedding.weight; FuseLIP ties them")
            continue
        if key == CONV_OUT:
            tensor = tensor.flatten(1)
        target = ours_from_official(key)
        mapped[target], official[target] = tensor, key
    check_shapes(mapped, ours, official.get)
    return mapped


def import_fuselip(folder: str | os.PathLike, out: str | os.PathLike, tokenizer: str | os.PathLike | None = None,
                   name: str | None = None) -> Path:
    """Convert an official checkpoint folder; the CLIP BPE (vocab.json + merges.txt) comes from `tokenizer`,
    else from the checkpoint folder itself."""
    config_json, state = read_official(folder)
    config = official_config(config_json, state, name)
    model = FuseLIPEncoder.build_model(config)
    model.load_state_dict(map_state(state, model), strict=True)
    text = TextTokenizer.from_clip_files(tokenizer or folder, mask=model.config.special_ids.mask is not None)
    return FuseLIPEncoder(config, model, tokenizer=text).save(out)
