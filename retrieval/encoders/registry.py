"""Named encoder configs (one JSON file per model, in its family's configs/), released checkpoints by name (each
family.json's `pretrained`, fetched and converted once by retrieval/hub.py), and the one factory, `load_encoder`."""

from __future__ import annotations

import os
from functools import cache
from pathlib import Path

from retrieval.encoders.base import Encoder, EncoderConfig
from retrieval.encoders.families import families, family
from retrieval.encoders.pretrained import Pretrained
from retrieval.errors import RetrievalError
from retrieval.files import read_json

CHECKPOINT_DIR = Path(__file__).resolve().parents[1] / "checkpoints"


@cache
def list_configs() -> dict[str, EncoderConfig]:
    """Every registered model, by name, sorted."""
    configs: dict[str, tuple[EncoderConfig, Path]] = {}
    for spec in families().values():
        for path in sorted((spec.folder / "configs").glob("*.json")):
            try:
                config = EncoderConfig.from_dict(read_json(path))
            except (RetrievalError, ValueError) as e:
                raise RetrievalError(f"{path}: {e}") from None
            if config.name != path.stem:
                raise RetrievalError(f"{path}: config name {config.name!r} differs from the file name")
            if config.family != spec.name:
                raise RetrievalError(f"{path}: a {config.family!r} model among the configs of family {spec.name!r}")
            if config.name in configs:
                raise RetrievalError(f"model {config.name!r} is registered twice: {configs[config.name][1]} and {path}")
            configs[config.name] = (config, path)
    return {name: configs[name][0] for name in sorted(configs)}


@cache
def list_pretrained() -> dict[str, Pretrained]:
    """Every released checkpoint by name (the `pretrained` models of each family), sorted."""
    found: dict[str, Pretrained] = {}
    for spec in families().values():
        for name, entry in (spec.pretrained.models if spec.pretrained else {}).items():
            if name in list_configs() or name in found:
                other = f"family {found[name].family!r}" if name in found else "a model config"
                raise RetrievalError(f"model {name!r} is registered twice: {spec.folder / 'family.json'} and {other}")
            found[name] = entry
    return {name: found[name] for name in sorted(found)}


def is_released(name: str) -> bool:
    """A released checkpoint's name, or `hf-hub:ORG/REPO[@REVISION]`."""
    from retrieval.hub import HF_HUB

    return name.startswith(HF_HUB) or name in list_pretrained()


def get_config(name: str) -> EncoderConfig:
    configs = list_configs()
    if name not in configs:
        raise RetrievalError(f"unknown model {name!r}; registered models: {', '.join(configs)}")
    return configs[name]


def family_class(name: str) -> type[Encoder]:
    """The encoder class of family `name`."""
    return family(name).encoder_class()


def default_checkpoint(config: EncoderConfig) -> Path | None:
    """The bundled checkpoint folder of a registered model, or None for random-init test models."""
    if not config.checkpoint:
        return None
    path = Path(config.checkpoint)
    return path if path.is_absolute() else CHECKPOINT_DIR / path


def initial_model(config: EncoderConfig):
    """The family's model for `config` with its initial weights, drawn from `config.seed` alone."""
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        return family_class(config.family).build_model(config)


def load_encoder(name_or_checkpoint: str | os.PathLike, device: str = "auto", fusion: str | None = None) -> Encoder:
    """Build an encoder from a registered name or a checkpoint folder (config.json + model.safetensors);
    `fusion` picks a late-fusion model's mode for items with an image and a text (default: score)."""

    from retrieval.devices import resolve_device

    device = resolve_device(device)
    path = Path(name_or_checkpoint)
    if (path / "config.json").is_file():
        config = EncoderConfig.from_dict(read_json(path / "config.json"))
        checkpoint: Path | None = path
    elif str(name_or_checkpoint) in list_configs():
        config = get_config(str(name_or_checkpoint))
        checkpoint = default_checkpoint(config)
    elif is_released(str(name_or_checkpoint)):  # converted once into the cache, then read from there offline
        from retrieval.hub import cached_checkpoint

        checkpoint = cached_checkpoint(str(name_or_checkpoint))
        config = EncoderConfig.from_dict(read_json(checkpoint / "config.json"))
    elif path.exists():
        raise RetrievalError(f"{path} is not a checkpoint folder: it has no config.json")
    else:
        raise RetrievalError(f"unknown model {str(name_or_checkpoint)!r}; registered models: "
                             f"{', '.join(list_configs())}; released checkpoints (downloaded once): "
                             f"{', '.join(list_pretrained())}, or hf-hub:ORG/REPO; or a checkpoint folder")
    cls = family_class(config.family)
    if fusion is not None and not cls.fusion_modes:
        raise RetrievalError(f"{config.name} fuses early and has no fusion modes; drop --fusion")
    if checkpoint is None and cls.requires_checkpoint:
        raise RetrievalError(f"{config.name} has no bundled weights; import or train a checkpoint "
                             f"(`retrieval models import`, `retrieval train`) and pass its folder as the model")
    model = initial_model(config)
    if checkpoint is not None:
        weights = checkpoint / "model.safetensors"
        if not weights.is_file():
            raise RetrievalError(f"checkpoint {checkpoint} has no model.safetensors")
        from safetensors.torch import load_file

        state = load_file(str(weights))
        missing, unexpected = model.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise RetrievalError(
                f"checkpoint {checkpoint} does not fit model {config.name!r}: "
                f"missing keys {missing[:5]}, unexpected keys {unexpected[:5]}"
            )
    encoder = cls(config, model, device=device, checkpoint=str(checkpoint.resolve()) if checkpoint else None)
    if fusion is not None:
        encoder.fusion_mode = fusion
    return encoder
