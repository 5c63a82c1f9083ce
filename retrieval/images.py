"""Reading images safely and turning them into normalised tensors (PIL + numpy; no torchvision)."""

from __future__ import annotations

import io
import os
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from retrieval.errors import RetrievalError, first_line
from retrieval.files import atomic_path
from retrieval.paths import PathPolicy, PathRefused

ImageFile.LOAD_TRUNCATED_IMAGES = False  # a truncated file is an error, never a half-grey picture
MAX_IMAGE_PIXELS = 64_000_000
MAX_ASPECT = 16  # beyond this, the long side is not resized whole (image_to_array)
ANY_FILE = PathPolicy(os.sep, follow_symlinks=True)  # any regular file (no FIFO or device that would block)
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")
# The decoders a file may reach, whatever its name says: PIL would otherwise also try EPS (which runs
# Ghostscript), and dozens of rarer formats that have had bugs of their own.
IMAGE_FORMATS = ("JPEG", "PNG", "BMP", "GIF", "WEBP", "TIFF")  # JPEG opens multi-picture (MPO) files too


class ImageReadError(RetrievalError):
    """An image that cannot be used; the message is the reason recorded in errors.parquet."""


def load_image(path: str | os.PathLike, max_pixels: int = MAX_IMAGE_PIXELS, policy: PathPolicy = ANY_FILE
               ) -> Image.Image:
    """Open, check and fully decode an image as RGB (see `as_rgb`), or raise ImageReadError with the reason;
    `policy` says which files may be read (a corpus's root and symlink rules)."""
    path = Path(path)
    try:
        file = policy.open_file(path)
    except PathRefused as e:
        raise ImageReadError(f"image refused: {e}") from None
    except FileNotFoundError:
        raise ImageReadError(f"image not found: {path}") from None
    except OSError as e:
        raise ImageReadError(f"cannot read image: {e.strerror or e} ({path})") from None
    except ValueError:  # a NUL in the path
        raise ImageReadError(f"image path is not a valid path: {str(path)!r}") from None
    with file:
        if os.fstat(file.fileno()).st_size == 0:
            raise ImageReadError(f"empty image file: {path}")
        return _decode(file, path, max_pixels)


def decode_image(data: bytes, name: str = "upload", max_pixels: int = MAX_IMAGE_PIXELS) -> Image.Image:
    """`load_image` for an image's bytes in memory (an upload); `name` stands for the path in messages."""
    if not data:
        raise ImageReadError(f"empty image file: {name}")
    return _decode(io.BytesIO(data), name, max_pixels)


def _decode(file, path: Path | str, max_pixels: int) -> Image.Image:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(file, formats=IMAGE_FORMATS) as img:
                width, height = img.size
                if width * height > max_pixels:
                    raise ImageReadError(
                        f"image too large: {width}x{height} pixels > limit {max_pixels} ({path})"
                    )
                if width == 0 or height == 0:
                    raise ImageReadError(f"image has no pixels: {path}")
                img.load()
                return as_rgb(upright(img))
    except ImageReadError:
        raise
    except (Image.DecompressionBombWarning, Image.DecompressionBombError):
        raise ImageReadError(f"image too large (decompression bomb): {path}") from None
    except UnidentifiedImageError:
        raise ImageReadError(f"cannot decode image: not a {', '.join(IMAGE_FORMATS)} file ({path})") from None
    except Exception as e:  # PIL raises many types for corrupt data
        raise ImageReadError(f"cannot decode image: {first_line(e)} ({path})") from None


def upright(img: Image.Image) -> Image.Image:
    """A decoded file turned the way its EXIF orientation says, as every photo viewer shows it."""
    try:
        return ImageOps.exif_transpose(img)
    except Exception:  # a broken EXIF block: the pixels as stored, as viewers show them
        return img


WIDE_MODES = ("I", "F")  # and I;16*: samples wider than 8 bits


def as_rgb(img: Image.Image) -> Image.Image:
    """The pixels in 8-bit RGB as a viewer shows them: transparency over white (as transformers' CLIP
    preprocessing does), 16-bit and float samples scaled to 8 bits rather than clipped. (An image given in
    memory is taken as its pixels: its EXIF orientation is the caller's, applied or not.)"""
    if img.mode == "RGB":
        return img
    if img.mode.startswith("I;16"):
        return _grey_to_rgb(np.asarray(img), full_scale=65535.0)
    if img.mode in WIDE_MODES:
        return _grey_to_rgb(np.asarray(img))
    if img.has_transparency_data:
        rgba = img.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
    return img.convert("RGB")


def _grey_to_rgb(values: np.ndarray, full_scale: float | None = None) -> Image.Image:
    """Grey samples scaled from their full scale to 8 bits. Mode I and F files do not say their scale: floats up
    to 1 are taken as [0, 1], other values as 8-, 16- or 32-bit by their largest sample."""
    floats = values.dtype.kind == "f"
    values = values.astype(np.float32)  # one working copy (a 64 Mpx image: 256 MB), changed in place
    np.nan_to_num(values, copy=False, nan=0.0, posinf=0.0, neginf=0.0)
    np.clip(values, 0, None, out=values)
    if full_scale is None:
        top = float(values.max()) if values.size else 0.0
        full_scale = 1.0 if floats and top <= 1.0 else next((s for s in (255.0, 65535.0) if top <= s), 4294967295.0)
    np.clip(values, 0, full_scale, out=values)
    values *= 255.0 / full_scale
    np.rint(values, out=values)
    return Image.fromarray(values.astype(np.uint8)).convert("RGB")


INTERPOLATIONS = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR}


def image_to_array(img: Image.Image, size: int, mean: tuple[float, ...], std: tuple[float, ...],
                   resize: int | None = None, interpolation: str = "bicubic") -> np.ndarray:
    """Resize the shorter side to `size`, centre-crop to size×size, scale to [0,1], normalise: float32 CHW.
    With `resize`, as torchvision's Resize(resize) + CenterCrop(size) do it (the long side truncated, the crop
    offset rounded), for models evaluated that way (FDT: 256, bilinear). Any mode, made RGB first by `as_rgb`."""
    img = as_rgb(img)
    w, h = img.size
    if resize is None:
        scale = size / min(w, h)
        new_w, new_h = max(size, round(w * scale)), max(size, round(h * scale))
        left, top = (new_w - size) // 2, (new_h - size) // 2
    else:
        new_w, new_h = (resize, int(resize * h / w)) if w <= h else (int(resize * w / h), resize)
        left, top = int(round((new_w - size) / 2)), int(round((new_h - size) / 2))
    method = INTERPOLATIONS[interpolation]
    if max(new_w, new_h) <= MAX_ASPECT * size:
        img = img.resize((new_w, new_h), method).crop((left, top, left + size, top + size))
    else:  # a sliver (1 × 2,000,000 px) would resize to gigabytes: resize just the crop's source box
        sx, sy = w / new_w, h / new_h
        box = (left * sx, top * sy, (left + size) * sx, (top + size) * sy)
        img = img.resize((size, size), method, box=box)
    arr = np.asarray(img, dtype=np.float32) / 255.0
    arr = (arr - np.asarray(mean, dtype=np.float32)) / np.asarray(std, dtype=np.float32)
    return np.ascontiguousarray(arr.transpose(2, 0, 1))


def squash_to_array(img: Image.Image, size: int) -> np.ndarray:
    """Resize to size×size ignoring the aspect ratio (bicubic), then make it RGB, scale to [0,1]: float32 CHW, no
    normalisation. FuseLIP's order: an 8-bit image is resized in its own mode (a palette one by its nearest
    pixel, alpha premultiplied) and then converted as PIL does (alpha dropped); 16-bit and float samples,
    which that conversion would clip, are scaled by `as_rgb` first."""
    if img.mode in WIDE_MODES or img.mode.startswith("I;16"):
        img = as_rgb(img)
    arr = np.asarray(img.resize((size, size), Image.Resampling.BICUBIC).convert("RGB"), dtype=np.float32) / 255.0
    return np.ascontiguousarray(arr.transpose(2, 0, 1))


def save_image(image: Image.Image, path: str | os.PathLike, durable: bool = True) -> None:
    """Write an image atomically, in the format its suffix names (fsynced unless not `durable`)."""
    path = Path(path)
    with atomic_path(path, durable=durable) as tmp:
        image.save(tmp, format=Image.registered_extensions()[path.suffix.lower()])
