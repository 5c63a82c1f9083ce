"""Images are read as they look: every PIL mode a file can hold becomes the 8-bit RGB picture a viewer shows
(16-bit and float samples scaled, transparency over white), and EXIF orientation is applied, for corpora and
for query images alike."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from retrieval.encoders import load_encoder
from retrieval.images import as_rgb, load_image

H, W = 24, 40
GREY = (np.arange(H * W).reshape(H, W) * 7 % 256).astype(np.uint8)  # a ramp that uses the whole 8-bit range
COLOUR = np.stack([GREY, 255 - GREY, (GREY // 3 + 40).astype(np.uint8)], axis=-1)
OPAQUE_RIGHT = np.where(np.arange(W) < W // 2, 0, 255).astype(np.uint8)[None, :].repeat(H, axis=0)


def grey_rgb(grey: np.ndarray) -> np.ndarray:
    return np.repeat(grey[..., None], 3, axis=-1)


def white_where_transparent(rgb: np.ndarray) -> np.ndarray:
    out = rgb.copy()
    out[OPAQUE_RIGHT == 0] = 255
    return out


def palette_image() -> tuple[Image.Image, np.ndarray]:
    """A P image whose index 0 is transparent, and the picture it shows."""
    p = Image.fromarray(COLOUR).quantize(32)
    shown = np.asarray(p.convert("RGB")).copy()
    shown[np.asarray(p) == 0] = 255
    return p, shown


def cases() -> dict[str, tuple[Image.Image, str, dict, np.ndarray, int]]:
    """Mode → (image in that mode, file format, save options, the RGB picture it shows, tolerance)."""
    p, p_shown = palette_image()
    bits = (GREY > 127).astype(np.uint8) * 255
    return {
        "1": (Image.fromarray(GREY > 127), "png", {}, grey_rgb(bits), 0),
        "L": (Image.fromarray(GREY), "png", {}, grey_rgb(GREY), 0),
        "LA": (Image.fromarray(np.dstack([GREY, OPAQUE_RIGHT])), "png", {}, white_where_transparent(grey_rgb(GREY)), 0),
        "P": (p, "png", {"transparency": 0}, p_shown, 0),
        "I;16": (Image.fromarray(GREY.astype(np.uint16) * 257), "png", {}, grey_rgb(GREY), 0),
        "I": (Image.fromarray(GREY.astype(np.int32) * 257), "tiff", {}, grey_rgb(GREY), 0),
        "F": (Image.fromarray(GREY.astype(np.float32) / 255), "tiff", {}, grey_rgb(GREY), 0),
        "RGB": (Image.fromarray(COLOUR), "png", {}, COLOUR, 0),
        "RGBA": (Image.fromarray(np.dstack([COLOUR, OPAQUE_RIGHT])), "png", {}, white_where_transparent(COLOUR), 0),
        "CMYK": (Image.fromarray(COLOUR).convert("CMYK"), "tiff", {}, COLOUR, 0),
        "YCbCr": (Image.fromarray(COLOUR).convert("YCbCr"), "tiff", {}, COLOUR, 3),
    }


@pytest.mark.parametrize("mode", list(cases()))
def test_each_mode_reads_as_it_looks(mode, tmp_path):
    image, fmt, options, shown, tolerance = cases()[mode]
    path = tmp_path / f"{mode.replace(';', '')}.{fmt}"
    image.save(path, **options)
    with Image.open(path) as stored:
        assert stored.mode == mode, "the file must hold the mode under test"
    loaded = load_image(path)
    assert loaded.mode == "RGB" and loaded.size == (W, H)
    assert np.abs(np.asarray(loaded, dtype=int) - shown.astype(int)).max() <= tolerance


def test_a_sixteen_bit_image_is_not_a_white_square(tmp_path):
    Image.fromarray(GREY.astype(np.uint16) * 257).save(tmp_path / "deep.png")
    loaded = np.asarray(load_image(tmp_path / "deep.png"))
    assert loaded.min() < 10 and loaded.max() > 245 and loaded.std() > 50


ORIENTATIONS = {  # EXIF orientation → the transpose a viewer applies to the stored pixels
    3: Image.Transpose.ROTATE_180, 6: Image.Transpose.ROTATE_270, 8: Image.Transpose.ROTATE_90,
    2: Image.Transpose.FLIP_LEFT_RIGHT,
}


@pytest.mark.parametrize("orientation", list(ORIENTATIONS))
def test_exif_orientation_is_applied(orientation, tmp_path):
    path = tmp_path / f"photo-{orientation}.jpg"
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(COLOUR).save(path, exif=exif, quality=95)
    with Image.open(path) as raw:
        stored = raw.convert("RGB")
    expected = np.asarray(stored.transpose(ORIENTATIONS[orientation]))
    loaded = load_image(path)
    assert np.array_equal(np.asarray(loaded), expected)
    if orientation in (6, 8):
        assert loaded.size == (H, W) != stored.size


def test_query_images_are_read_the_same_way(tmp_path):
    """A query image goes through the same reading: an oriented JPEG embeds as its upright pixels, a
    16-bit PNG as its 8-bit picture, and a PIL image in any mode as its RGB form."""
    encoder = load_encoder("test-tiny", device="cpu")
    path = tmp_path / "turned.jpg"
    exif = Image.Exif()
    exif[0x0112] = 8
    Image.fromarray(COLOUR).save(path, exif=exif, quality=95)
    with Image.open(path) as raw:
        upright = raw.convert("RGB").transpose(Image.Transpose.ROTATE_90)
    np.testing.assert_allclose(encoder.encode(images=[path]), encoder.encode(images=[upright]), atol=1e-6)

    deep = Image.fromarray(GREY.astype(np.uint16) * 257)
    deep.save(tmp_path / "deep.png")
    grey = Image.fromarray(grey_rgb(GREY))
    np.testing.assert_allclose(encoder.encode(images=[tmp_path / "deep.png"]), encoder.encode(images=[grey]),
                               atol=1e-6)
    np.testing.assert_allclose(encoder.encode(images=[deep]), encoder.encode(images=[grey]), atol=1e-6)
    white = encoder.encode(images=[Image.new("RGB", (W, H), "white")])
    assert float((encoder.encode(images=[deep]) @ white.T)[0, 0]) < 0.999


def test_as_rgb_leaves_a_plain_rgb_image_alone():
    image = Image.fromarray(COLOUR)
    assert as_rgb(image) is image


def test_only_image_formats_are_decoded_whatever_the_name(tmp_path):
    """PostScript named .png must not reach PIL's EPS plugin (which runs Ghostscript); a JPEG named .png is
    still a picture."""
    from retrieval.images import ImageReadError

    (tmp_path / "evil.png").write_bytes(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n")
    with pytest.raises(ImageReadError, match="cannot decode image: not a JPEG, PNG, BMP, GIF, WEBP, TIFF file"):
        load_image(tmp_path / "evil.png")
    Image.fromarray(COLOUR).save(tmp_path / "photo.png", format="JPEG")
    assert load_image(tmp_path / "photo.png").size == (W, H)


def test_a_sliver_image_is_resized_without_a_giant_intermediate(tmp_path):
    """1 × 2,000,000 pixels is under the pixel limit, but resizing its short side to 224 would make a
    224 × 448,000,000 picture; only the centre crop's box is resized (the same picture to a level or two)."""
    from retrieval.images import image_to_array

    sliver = Image.fromarray(np.tile(np.arange(256, dtype=np.uint8), 2_000_000 // 256 + 1)[None, :2_000_000])
    sliver.save(tmp_path / "sliver.png")
    array = image_to_array(load_image(tmp_path / "sliver.png"), 224, (0, 0, 0), (1, 1, 1))
    assert array.shape == (3, 224, 224) and np.isfinite(array).all()
    wide = Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 1000, 3), dtype=np.uint8))
    whole = wide.resize((5600, 224), Image.Resampling.BICUBIC).crop((2688, 0, 2912, 224))
    boxed = image_to_array(wide, 224, (0, 0, 0), (1, 1, 1)).transpose(1, 2, 0) * 255
    assert np.abs(boxed - np.asarray(whole, dtype=np.float32)).max() <= 3
