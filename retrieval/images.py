"""Reading images safely and turning them into normalised tensors (PIL + numpy; no torchvision)."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile

from retrieval.errors import RetrievalError
from retrieval.files import atomic_path

ImageFile.LOAD_TRUNCATED_IMAGES = False  # a truncated file is an error, never a half-grey picture
MAX_IMAGE_PIXELS = 64_000_000
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")


class ImageReadError(RetrievalError):
    """An image that cannot be used; the message is the reason recorded in errors.parquet."""


def load_image(path: str | os.PathLike, max_pixels: int = MAX_IMAGE_PIXELS) -> Image.Image:
    """Open, check and fully decode an image as RGB, or raise ImageReadError with the reason."""
    path = Path(path)
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise ImageReadError(f"image not found: {path}") from None
    except OSError as e:
        raise ImageReadError(f"cannot read image: {e.strerror or e} ({path})") from None
    if not path.is_file():
        raise ImageReadError(f"image path is not a file: {path}")
    if size == 0:
        raise ImageReadError(f"empty image file: {path}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                width, height = img.size
                if width * height > max_pixels:
                    raise ImageReadError(
                        f"image too large: {width}x{height} pixels > limit {max_pixels} ({path})"
                    )
                if width == 0 or height == 0:
                    raise ImageReadError(f"image has no pixels: {path}")
                img.load()
                return img.convert("RGB")
    except ImageReadError:
        raise
    except (Image.DecompressionBombWarning, Image.DecompressionBombError):
        raise ImageReadError(f"image too large (decompression bomb): {path}") from None
    except Exception as e:  # PIL raises many types for corrupt data
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ImageReadError(f"cannot decode image: {reason} ({path})") from None


def image_to_array(img: Image.Image, size: int, mean: tuple[float, ...], std: tuple[float, ...]) -> np.ndarray:
    """Resize the shorter side to `size`, centre-crop to size×size, scale to [0,1], normalise: float32 CHW."""
    w, h = img.size
    scale = size / min(w, h)
    new_w, new_h = max(size, round(w * scale)), max(size, round(h * scale))
    img = img.resize((new_w, new_h), Image.Resampling.BICUBIC)
    left, top = (new_w - size) // 2, (new_h - size) // 2
    img = img.crop((left, top, left + size, top + size))
    arr = np.asarray(img, dtype=np.float32) / 255.0
    arr = (arr - np.asarray(mean, dtype=np.float32)) / np.asarray(std, dtype=np.float32)
    return np.ascontiguousarray(arr.transpose(2, 0, 1))


def squash_to_array(img: Image.Image, size: int) -> np.ndarray:
    """Resize to size×size ignoring the aspect ratio (bicubic), scale to [0,1]: float32 CHW, no normalisation."""
    arr = np.asarray(img.convert("RGB").resize((size, size), Image.Resampling.BICUBIC), dtype=np.float32) / 255.0
    return np.ascontiguousarray(arr.transpose(2, 0, 1))


def save_image(image: Image.Image, path: str | os.PathLike, durable: bool = True) -> None:
    """Write an image atomically, in the format its suffix names (fsynced unless not `durable`)."""
    path = Path(path)
    with atomic_path(path, durable=durable) as tmp:
        image.save(tmp, format=Image.registered_extensions()[path.suffix.lower()])
