"""ShapesWorld: synthetic scenes of coloured shapes with captions, generated from a seed."""

from __future__ import annotations

import json
import math
import os
import random
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw

from retrieval.files import atomic_path

SHAPES = ("circle", "square", "triangle", "star", "cross")
COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (235, 210, 40),
           "purple": (140, 60, 190), "orange": (245, 140, 30), "white": (245, 245, 245),
           "black": (20, 20, 20)}
ROWS, COLS = ("upper", "middle", "lower"), ("left", "center", "right")
BACKGROUNDS = ((128, 128, 128), (90, 110, 130), (150, 130, 100), (70, 90, 70))


@dataclass(frozen=True)
class Shape:
    shape: str
    colour: str
    size: str
    cell: tuple[int, int]  # (row, col) in the 3×3 grid

    @property
    def position(self) -> str:
        row, col = self.cell
        if (row, col) == (1, 1):
            return "center"
        if row == 1:
            return f"middle {COLS[col]}"
        return f"{ROWS[row]} {COLS[col]}"

    def phrase(self) -> str:
        return f"a {self.size} {self.colour} {self.shape} in the {self.position}"


def random_scene(rng: random.Random, max_objects: int = 3) -> list[Shape]:
    cells = rng.sample([(r, c) for r in range(3) for c in range(3)], rng.randint(1, max_objects))
    return [Shape(rng.choice(SHAPES), rng.choice(list(COLOURS)), rng.choice(("small", "large")), cell)
            for cell in cells]


def caption(scene: list[Shape], rng: random.Random) -> str:
    phrases = [s.phrase() for s in scene]
    body = phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]
    template = rng.choice(("{}", "a picture of {}", "an image showing {}", "there is {}"))
    return template.format(body)


def draw_scene(scene: list[Shape], size: int, background: tuple[int, int, int]) -> Image.Image:
    img = Image.new("RGB", (size, size), background)
    draw = ImageDraw.Draw(img)
    cell = size / 3
    for s in scene:
        cx, cy = (s.cell[1] + 0.5) * cell, (s.cell[0] + 0.5) * cell
        r = cell * (0.42 if s.size == "large" else 0.24)
        fill = COLOURS[s.colour]
        if s.shape == "circle":
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
        elif s.shape == "square":
            draw.rectangle([cx - r * 0.85, cy - r * 0.85, cx + r * 0.85, cy + r * 0.85], fill=fill)
        elif s.shape == "triangle":
            draw.polygon([(cx, cy - r), (cx - r, cy + r * 0.8), (cx + r, cy + r * 0.8)], fill=fill)
        elif s.shape == "star":
            pts = [(cx + (r if i % 2 == 0 else r * 0.45) * math.sin(i * math.pi / 5),
                    cy - (r if i % 2 == 0 else r * 0.45) * math.cos(i * math.pi / 5)) for i in range(10)]
            draw.polygon(pts, fill=fill)
        else:  # cross
            w = r * 0.35
            draw.rectangle([cx - r, cy - w, cx + r, cy + w], fill=fill)
            draw.rectangle([cx - w, cy - r, cx + w, cy + r], fill=fill)
    return img


def make_shapesworld(out: str | os.PathLike, n: int = 500, size: int = 64, seed: int = 0) -> Path:
    """Write `n` scenes as PNGs plus `corpus.jsonl` (id, image, text, split, n_objects); returns the manifest."""
    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    records = []
    for i in range(n):
        scene = random_scene(rng)
        img = draw_scene(scene, size, rng.choice(BACKGROUNDS))
        rel = f"images/{i:06d}.png"
        with atomic_path(out / rel) as tmp:
            img.save(tmp, format="PNG")
        split = "train" if i % 10 < 8 else ("val" if i % 10 == 8 else "test")
        records.append({"id": f"shapes-{i:06d}", "image": rel, "text": caption(scene, rng), "split": split,
                        "n_objects": len(scene), "shapes": " ".join(sorted({s.shape for s in scene}))})
    manifest = out / "corpus.jsonl"
    with atomic_path(manifest) as tmp:
        tmp.write_text("".join(json.dumps(r) + "\n" for r in records))
    return manifest
