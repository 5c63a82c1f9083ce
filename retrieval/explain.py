"""`search --explain OUT.png`: why each hit matched, drawn as one row per hit.

SPARC: the hit's image, then one heatmap per word of the query text — the word's alignment weights over
the patch grid — with the rank, the global score and the fine-grained score under the image.
FDT: the hit's image (or text), then its strongest codebook tokens — each a heatmap of the patches that
activate it, labelled with its weight in the hit's code and the query words that activate it most. A hit
with an image and a text is shown by its image's code.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from retrieval.encoders.families import names_where
from retrieval.errors import RetrievalError
from retrieval.images import load_image, save_image

CELL = 96
LABEL = 14
HEAT = np.array([255, 32, 0], dtype=np.float32)


TOP_TOKENS = 5


def check_explain(encoder, text: str | None) -> None:
    if not (encoder.supports("word_alignment") or encoder.supports("sparse_codes")):
        raise RetrievalError(f"{encoder.name} has neither word-to-patch alignment nor sparse codes, one of which "
                             f"--explain needs (families with them: "
                             f"{names_where(lambda spec: spec.capabilities & {'word_alignment', 'sparse_codes'})})")
    if not (text and text.strip()):
        raise RetrievalError("--explain needs a query --text: it shows where the query's words land in the hits")


def explain_hits(encoder, text: str | None, hits: list, out: str | os.PathLike) -> Path:
    """Draw why each hit matched `text` (see the module docstring); returns the PNG path."""
    check_explain(encoder, text)
    by_patches = encoder.supports("word_alignment")
    sheet = alignment_sheet(encoder, text, hits) if by_patches else token_sheet(encoder, text, hits)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_image(sheet, out)
    return out


def alignment_sheet(encoder, text: str, hits: list) -> Image.Image:
    """SPARC: one heatmap per query word over every hit that has an image."""
    shown = [h for h in hits if h.image]
    if not shown:
        raise RetrievalError("--explain: no hit has an image to show")
    images = [load_image(h.image).convert("RGB") for h in shown]
    words, weights, local = encoder.alignment(text, images)
    sheet = Image.new("RGB", (CELL * (len(words) + 1), LABEL + (CELL + LABEL) * len(shown)), "white")
    draw = ImageDraw.Draw(sheet)
    draw.text((3, 1), "score / fine", fill="black")
    for j, word in enumerate(words, start=1):
        draw.text((j * CELL + 3, 1), word[:14], fill="black")
    for i, (hit, image) in enumerate(zip(shown, images)):
        top = LABEL + i * (CELL + LABEL)
        cell = image.resize((CELL, CELL), Image.Resampling.BICUBIC)
        sheet.paste(cell, (0, top))
        draw.text((3, top + CELL + 1), f"#{hit.rank} {hit.score:.2f} / {float(local[i]):.2f}", fill="black")
        for j in range(len(words)):
            sheet.paste(heatmap(cell, weights[i, j].numpy()), ((j + 1) * CELL, top))
    return sheet


def token_sheet(encoder, text: str, hits: list) -> Image.Image:
    """FDT: each hit's strongest tokens, with the patches and the query words that activate them."""
    if not hits:
        raise RetrievalError("--explain: there are no hits to show")
    _, word_scores, words = encoder.activations(text=text)
    grid = encoder.model.config.grid
    sheet = Image.new("RGB", (CELL * (TOP_TOKENS + 1), (CELL + 2 * LABEL) * len(hits)), "white")
    draw = ImageDraw.Draw(sheet)
    for i, hit in enumerate(hits):
        top = i * (CELL + 2 * LABEL)
        original = load_image(hit.image).convert("RGB") if hit.image else None
        code, scores, _ = encoder.activations(image=original) if original else encoder.activations(text=hit.text)
        image = original.resize((CELL, CELL), Image.Resampling.BICUBIC) if original else None
        if image:
            sheet.paste(image, (0, top))
        else:
            draw.text((3, top + 3), (hit.text or "")[:14], fill="black")
        draw.text((3, top + CELL + 1), f"#{hit.rank} {hit.score:.2f}", fill="black")
        for j, token in enumerate(code.argsort(descending=True)[:TOP_TOKENS].tolist(), start=1):
            if code[token] <= 0:
                break
            if image:
                sheet.paste(heatmap(image, scores[:, token].clamp(min=0).reshape(grid, grid).numpy()), (j * CELL, top))
            strongest = [words[k] for k in word_scores[:, token].argsort(descending=True)[:2].tolist()] if words else []
            draw.text((j * CELL + 3, top + CELL + 1), f"t{token} w={float(code[token]):.2f}", fill="black")
            draw.text((j * CELL + 3, top + CELL + LABEL), " ".join(strongest)[:16], fill="black")
    return sheet


def heatmap(image: Image.Image, weights: np.ndarray) -> Image.Image:
    """`image` tinted by `weights` [g, g] (scaled to their maximum), upsampled to the image's size."""
    scaled = weights / weights.max() if weights.max() > 0 else weights
    mask = Image.fromarray((scaled * 255).astype(np.uint8)).resize(image.size, Image.Resampling.BILINEAR)
    alpha = np.asarray(mask, dtype=np.float32)[..., None] / 255 * 0.75
    base = np.asarray(image, dtype=np.float32) * 0.6  # dimmed, so the tint stands out
    return Image.fromarray((base * (1 - alpha) + HEAT * alpha).clip(0, 255).astype(np.uint8))
