"""TGIT: text-guided image transformations with FuseLIP's instruction strings, made with PIL and numpy.

Each `Transform` knows its instruction and how to apply itself, so ground truth can be recomputed.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np
from PIL import Image

CROP_ROWS = ("upper", "center", "lower")
CROP_COLS = ("left", "center", "right")
ROTATIONS = tuple(range(10, 100, 10))
TYPES = ("crop", "rotate", "jitter", "flip", "color")
EVAL_GROUP_SIZES = {"crop": 9, "rotate": 18, "jitter": 10, "flip": 4, "color": 2}
TRAIN_GROUP_SIZES = {"crop": 9, "rotate": 3, "jitter": 3, "flip": 4, "color": 2}
LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)


@dataclass(frozen=True)
class Transform:
    """One transformation: kind (crop, rotate, jitter, hflip, vflip, grayscale, colorize) and its parameters."""

    kind: str
    params: tuple = ()

    @property
    def type(self) -> str:
        """The TGIT type this transformation is scored under."""
        return {"hflip": "flip", "vflip": "flip", "grayscale": "color", "colorize": "color"}.get(self.kind, self.kind)

    @property
    def instruction(self) -> str:
        if self.kind == "crop":
            return f"crop to {CROP_ROWS[self.params[0]]} {CROP_COLS[self.params[1]]}"
        if self.kind == "rotate":
            degrees, clockwise = self.params
            return f"rotate {degrees} degrees {'clockwise' if clockwise else 'counter-clockwise'}"
        if self.kind == "jitter":
            parts = [f"{'increase' if f > 1 else 'decrease'} {name} by factor {f:.1f}"
                     for name, f in zip(("brightness", "contrast", "saturation"), self.params)]
            return " and ".join(parts)
        return {"hflip": "horizontal flip", "vflip": "vertical flip", "grayscale": "grayscale",
                "colorize": "colorize"}[self.kind]

    def apply(self, image: Image.Image) -> Image.Image:
        """The transformed image. `colorize` maps a grayscale image back to colour, so it needs the original."""
        image = image.convert("RGB")
        if self.kind == "crop":
            return crop(image, *self.params)
        if self.kind == "rotate":
            degrees, clockwise = self.params
            return image.rotate(-degrees if clockwise else degrees, resample=Image.BILINEAR, expand=False,
                                fillcolor=(0, 0, 0))
        if self.kind == "jitter":
            return jitter(image, *self.params)
        if self.kind == "hflip":
            return image.transpose(Image.FLIP_LEFT_RIGHT)
        if self.kind == "vflip":
            return image.transpose(Image.FLIP_TOP_BOTTOM)
        if self.kind == "grayscale":
            return image.convert("L").convert("RGB")
        raise ValueError(f"{self.kind} cannot be computed from its input alone")


def crop(image: Image.Image, row: int, col: int) -> Image.Image:
    """A square crop of half the side at the named 3×3 position, resized back to the full size."""
    w, h = image.size
    side = min(w, h) // 2
    x = (0, (w - side) // 2, w - side)[col]
    y = (0, (h - side) // 2, h - side)[row]
    return image.crop((x, y, x + side, y + side)).resize((w, h), Image.BILINEAR)


def _blend(a: np.ndarray, b: np.ndarray | float, factor: float) -> np.ndarray:
    return np.clip(factor * a + (1.0 - factor) * b, 0.0, 255.0)


def jitter(image: Image.Image, brightness: float, contrast: float, saturation: float) -> Image.Image:
    """Brightness (blend with black), then contrast (with the mean gray), then saturation (with the gray image)."""
    x = np.asarray(image, dtype=np.float32)
    x = _blend(x, 0.0, brightness)
    x = _blend(x, float((x @ LUMA).mean()), contrast)
    x = _blend(x, (x @ LUMA)[..., None], saturation)
    return Image.fromarray(np.round(x).astype(np.uint8))


def jitter_factor(rng: random.Random) -> float:
    """Uniform in [0.3, 2.0], rounded to 0.1; 1.0 (no change) becomes 1.1."""
    f = round(rng.uniform(0.3, 2.0), 1)
    return 1.1 if f == 1.0 else f


def random_jitter(rng: random.Random) -> Transform:
    return Transform("jitter", tuple(jitter_factor(rng) for _ in range(3)))


def all_crops() -> list[Transform]:
    return [Transform("crop", (r, c)) for r in range(3) for c in range(3)]


def all_rotations() -> list[Transform]:
    return [Transform("rotate", (d, cw)) for cw in (True, False) for d in ROTATIONS]


def distinct_jitters(rng: random.Random, count: int) -> list[Transform]:
    """`count` jitters with distinct instructions."""
    seen: dict[tuple, Transform] = {}
    while len(seen) < count:
        t = random_jitter(rng)
        seen.setdefault(t.params, t)
    return list(seen.values())
