"""The encoder interface every family implements: prepare (in loader workers), embed (batched, on device)."""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from retrieval.devices import autocast_for
from retrieval.errors import RetrievalError
from retrieval.files import atomic_path, has_type, write_json
from retrieval.images import INTERPOLATIONS, load_image

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass
class EncoderConfig:
    """One named model: its family, output size, preprocessing and family-specific hyper-parameters."""

    name: str
    family: str
    dim: int
    image_size: int = 224
    mean: tuple[float, ...] = CLIP_MEAN
    std: tuple[float, ...] = CLIP_STD
    context_length: int = 77
    resize: int | None = None  # shorter side before the centre crop, torchvision-style (default: image_size)
    interpolation: str = "bicubic"  # or bilinear
    model: dict[str, Any] = field(default_factory=dict)
    seed: int = 0
    checkpoint: str | None = None
    description: str = ""

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> EncoderConfig:
        if not isinstance(data, dict):
            raise RetrievalError("an encoder config is a JSON object")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise RetrievalError(f"unknown encoder config keys: {', '.join(unknown)}")
        if not (has_type(data.get("name"), str) and has_type(data.get("family"), str)
                and has_type(data.get("dim"), int) and data["dim"] > 0):
            raise RetrievalError("an encoder config needs a name and a family (strings) and a dim (a positive integer)")
        if data.get("interpolation", "bicubic") not in INTERPOLATIONS:
            raise RetrievalError(f"interpolation must be one of {', '.join(INTERPOLATIONS)}")
        resize = data.get("resize")
        if resize is not None and not (has_type(resize, int) and resize >= data.get("image_size", 224)):
            raise RetrievalError("resize must be an integer no smaller than image_size")
        data = dict(data)
        for key in ("mean", "std"):
            if key in data:
                data[key] = tuple(data[key])
        return cls(**data)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class Encoder:
    """A model plus its preprocessing. Subclasses build `model` and implement `prepare` and `forward`.

    `prepare(image, text)` runs in data-loader workers and returns CPU tensors for one item;
    `collate` stacks them; `embed` runs the batch on the device and returns unit vectors.
    An item may have an image, a text or both.
    """

    fusion: str = "early"
    fusion_modes: tuple[str, ...] = ()  # a late-fusion model's ways of making one vector of an image and a text
    extra_columns: tuple[str, ...] = ()  # store columns `forward_columns` can add beside the embedding
    requires_checkpoint: bool = False  # True where random weights cannot run (e.g. no tokenizer without one)

    def __init__(self, config: EncoderConfig, model: torch.nn.Module, device: str = "cpu",
                 checkpoint: str | None = None):
        self.config = config
        self.model = model.eval().to(device)
        self.device = device
        self.checkpoint = checkpoint
        self._weights_sha256: str | None = None

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def dim(self) -> int:
        return self.config.dim

    @classmethod
    def build_model(cls, config: EncoderConfig) -> torch.nn.Module:
        raise NotImplementedError

    @classmethod
    def image_tokenizer_config(cls, config: EncoderConfig) -> Any:
        """The settings of the frozen image tokenizer (`model.image_tokenizer`) the model reads ids from, or None."""
        return None

    def supports(self, capability: str) -> bool:
        """Whether this encoder's family declares `capability` (see retrieval.encoders.families)."""
        from retrieval.encoders.families import family

        return capability in family(self.config.family).capabilities

    def prepare(self, image: Image.Image | None, text: str | None) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def preparer(self) -> Encoder:
        """A copy that prepares and collates items but holds no model: light to send to another process."""
        clone = copy.copy(self)
        clone.model = None
        return clone

    def collate(self, items: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        return {key: torch.stack([item[key] for item in items]) for key in items[0]}

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.model(**batch)

    def forward_columns(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, list]]:
        """`forward` plus the per-item values of `extra_columns` (e.g. FDT's sparse codes)."""
        raise RetrievalError(f"{self.name} has no extra store columns")

    def embed(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Embed a collated batch on the device (autocast on CUDA); returns float32 unit vectors on the CPU."""
        return self.embed_with_columns(batch, columns=False)[0]

    @torch.inference_mode()
    def embed_with_columns(self, batch: dict[str, torch.Tensor], columns: bool = True
                           ) -> tuple[torch.Tensor, dict[str, list]]:
        """`embed`, plus the `extra_columns` values of each item when `columns`."""
        batch = {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}
        with autocast_for(self.device):
            out, extra = self.forward_columns(batch) if columns else (self.forward(batch), {})
        return F.normalize(out.float(), dim=-1).cpu(), extra

    def encode(self, images: list | None = None, texts: list[str | None] | None = None,
               batch_size: int = 64) -> np.ndarray:
        """Embed images (PIL images or paths), texts, or aligned pairs of both; returns float32 [n, dim]."""
        if images is None and texts is None:
            raise RetrievalError("encode needs images, texts or both")
        n = len(images) if images is not None else len(texts)
        if images is not None and texts is not None and len(texts) != n:
            raise RetrievalError(f"encode got {n} images but {len(texts)} texts")
        images = images if images is not None else [None] * n
        texts = texts if texts is not None else [None] * n
        out = []
        for start in range(0, n, batch_size):
            items = []
            for img, txt in zip(images[start:start + batch_size], texts[start:start + batch_size]):
                if img is not None and not isinstance(img, Image.Image):  # in memory: the family makes it RGB
                    img = load_image(img)
                items.append(self.prepare(img, txt))
            out.append(self.embed(self.collate(items)).numpy())
        return np.concatenate(out) if out else np.zeros((0, self.dim), np.float32)

    @property
    def weights_sha256(self) -> str:
        """A checksum of the weights, recorded in stores and indexes to catch a changed model."""
        if self._weights_sha256 is None:
            h = hashlib.sha256()
            for key, tensor in sorted(self.model.state_dict().items()):
                h.update(key.encode())
                h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
            self._weights_sha256 = h.hexdigest()
        return self._weights_sha256

    def describe(self) -> dict[str, Any]:
        """What stores and indexes record about the encoder that made them."""
        return {
            "name": self.name,
            "family": self.config.family,
            "dim": self.dim,
            "fusion": self.fusion,
            "checkpoint": self.checkpoint,
            "weights_sha256": self.weights_sha256,
            "config": self.config.to_dict(),
        }

    def save(self, out_dir: str | os.PathLike) -> Path:
        """Write our checkpoint format: config.json + model.safetensors."""
        from safetensors.torch import save_file

        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().cpu().contiguous() for k, v in self.model.state_dict().items()}
        with atomic_path(out / "model.safetensors") as tmp:
            save_file(state, str(tmp))
        config = self.config.to_dict() | {"checkpoint": None}
        write_json(out / "config.json", config)
        return out

