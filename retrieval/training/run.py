"""What `retrieval train` does: pick the model's objective, build or load the model, run the loop."""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from retrieval.encoders.base import Encoder
from retrieval.encoders.families import family
from retrieval.encoders.registry import (
    CHECKPOINT_DIR,
    family_class,
    get_config,
    initial_model,
    list_configs,
    load_encoder,
)
from retrieval.errors import RetrievalError
from retrieval.training.loop import TrainConfig, train
from retrieval.training.pairs import Pair, read_pairs

BUNDLED_TOKENIZERS = CHECKPOINT_DIR / "tokenizers"


def objective_for(encoder: Encoder, pairs: list[Pair], device: str, progress: bool):
    """The training objective of the encoder's family (one loop; the objective is what differs)."""
    objective = family(encoder.config.family).objective_class()
    return objective(encoder, pairs, device=device, progress=progress)


def fresh_encoder(name: str, tokenizers: str | os.PathLike | None) -> Encoder:
    """A registered model with initial weights (seeded) and the tokenizers from a `train tokenizer` folder
    (the text tokenizer, and the frozen image tokenizer of a model that reads image ids)."""
    from retrieval.training.tokenizers import load_tokenizers

    config = get_config(name)
    cls = family_class(config.family)
    model = initial_model(config)
    image_config = cls.image_tokenizer_config(config)
    text, image_state = load_tokenizers(tokenizers or BUNDLED_TOKENIZERS, image_config)
    if image_config is not None:
        model.image_tokenizer.load_state_dict(image_state)
    return cls(replace(config, checkpoint=None), model, tokenizer=text)


def encoder_to_train(model: str, tokenizers: str | os.PathLike | None = None) -> Encoder:
    """A registered model, fresh (with `tokenizers`, default the bundled ones), or a checkpoint folder to fine-tune."""
    if (Path(model) / "config.json").is_file():
        if tokenizers:
            raise RetrievalError("--tokenizers is for training a registered model from scratch; a checkpoint "
                                 "folder brings its own")
        return load_encoder(model, device="cpu")
    if model in list_configs():
        return fresh_encoder(model, tokenizers)
    raise RetrievalError(f"{model!r} is neither a registered model nor a checkpoint folder")


def train_model(model: str, data: list[str | os.PathLike], out: str | os.PathLike, config: TrainConfig,
                tokenizers: str | os.PathLike | None = None, device: str = "auto",
                progress: bool = True) -> dict[str, Any]:
    """Train registered model `model` from scratch, or fine-tune a checkpoint folder, on `data`'s pairs."""
    from retrieval.devices import resolve_device

    device = resolve_device(device)
    pairs = read_pairs(data)
    objective = objective_for(encoder_to_train(model, tokenizers), pairs, device, progress)
    torch.manual_seed(config.seed)
    return train(objective, pairs, config, out, device=device, progress=progress)
