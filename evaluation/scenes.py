"""ShapesWorld scenes: 1–3 coloured shapes on plain or textured backgrounds, drawn and captioned.

Everything is drawn from one seed. A scene is its set of objects (shape, colour, size, 3×3 cell);
no scene occurs twice, so the train / val / test splits never share one.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle", "star", "cross")
COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (235, 210, 40),
           "purple": (140, 60, 190), "orange": (245, 140, 30), "white": (245, 245, 245),
           "black": (20, 20, 20)}
SIZES = ("small", "large")
ROWS, COLS = ("upper", "middle", "lower"), ("left", "center", "right")
PLAIN = {"gray": (128, 128, 128), "slate": (90, 110, 130), "sand": (150, 130, 100), "moss": (70, 90, 70)}
TEXTURES = ("striped", "checkered", "dotted", "noisy")
SPLITS = (("train", 0.8), ("val", 0.1), ("test", 0.1))
MAX_SIZE = 256


@dataclass(frozen=True, order=True)
class Shape:
    shape: str
    colour: str
    size: str
    cell: tuple[int, int]  # (row, col) in the 3×3 grid

    @property
    def position(self) -> str:
        return position_name(self.cell)

    def phrase(self) -> str:
        return f"a {self.size} {self.colour} {self.shape}"


@dataclass(frozen=True)
class Background:
    base: str  # a PLAIN colour name
    texture: str | None = None  # one of TEXTURES, or None for a plain background
    seed: int = 0


@dataclass(frozen=True)
class Scene:
    objects: tuple[Shape, ...]
    background: Background

    @property
    def key(self) -> tuple[Shape, ...]:
        """What makes two scenes the same scene: their objects, whatever the background."""
        return tuple(sorted(self.objects))


def position_name(cell: tuple[int, int]) -> str:
    row, col = cell
    if (row, col) == (1, 1):
        return "center"
    return f"middle {COLS[col]}" if row == 1 else f"{ROWS[row]} {COLS[col]}"


def random_objects(rng: random.Random, max_objects: int = 3) -> tuple[Shape, ...]:
    cells = rng.sample([(r, c) for r in range(3) for c in range(3)], rng.randint(1, max_objects))
    return tuple(Shape(rng.choice(SHAPES), rng.choice(list(COLOURS)), rng.choice(SIZES), cell) for cell in cells)


def twin_objects(rng: random.Random) -> tuple[Shape, ...]:
    """Two objects of one shape in different columns and of different colours, maybe one more of another shape."""
    shape = rng.choice(SHAPES)
    left_col, right_col = sorted(rng.sample(range(3), 2))
    colours = rng.sample(list(COLOURS), 3)
    objects = [Shape(shape, colours[0], rng.choice(SIZES), (rng.randrange(3), left_col)),
               Shape(shape, colours[1], rng.choice(SIZES), (rng.randrange(3), right_col))]
    if rng.random() < 0.5:
        free = [(r, c) for r in range(3) for c in range(3) if (r, c) not in {o.cell for o in objects}]
        objects.append(Shape(rng.choice([s for s in SHAPES if s != shape]), colours[2], rng.choice(SIZES),
                             rng.choice(free)))
    rng.shuffle(objects)
    return tuple(objects)


def random_background(rng: random.Random) -> Background:
    texture = rng.choice(TEXTURES) if rng.random() < 0.5 else None
    return Background(rng.choice(list(PLAIN)), texture, rng.randrange(2**31))


def make_scenes(n: int, seed: int, twin_share: float = 0.25) -> list[Scene]:
    """`n` distinct scenes; about `twin_share` of them hold two same-shape objects (for the `pos` task)."""
    rng = random.Random(seed)
    seen: set[tuple[Shape, ...]] = set()
    scenes = []
    attempts = 0
    while len(scenes) < n:
        attempts += 1
        if attempts > 50 * n + 1000:
            raise ValueError(f"cannot draw {n} distinct scenes")
        objects = twin_objects(rng) if rng.random() < twin_share else random_objects(rng)
        scene = Scene(objects, random_background(rng))
        if scene.key not in seen:
            seen.add(scene.key)
            scenes.append(scene)
    return scenes


def split_of(i: int, n: int) -> str:
    """Contiguous 80/10/10 blocks by index: train first, then val, then test."""
    bound = 0.0
    for name, share in SPLITS:
        bound += share * n
        if i < round(bound):
            return name
    return SPLITS[-1][0]


def draw_background(bg: Background, size: int) -> Image.Image:
    base = np.array(PLAIN[bg.base], dtype=np.float32)
    if bg.texture is None:
        return Image.new("RGB", (size, size), tuple(int(v) for v in base))
    rng = np.random.default_rng(bg.seed)
    y, x = np.mgrid[0:size, 0:size] / size
    period = rng.uniform(6, 12)
    if bg.texture == "striped":
        angle = rng.choice([0.0, math.pi / 4, math.pi / 2, 3 * math.pi / 4])
        pattern = np.sign(np.sin((x * math.cos(angle) + y * math.sin(angle)) * period * math.pi))
    elif bg.texture == "checkered":
        pattern = np.sign(np.sin(x * period * math.pi) * np.sin(y * period * math.pi))
    elif bg.texture == "dotted":
        pattern = (np.sin(x * period * 2 * math.pi) * np.sin(y * period * 2 * math.pi) > 0.6) * 2.0 - 1.0
    else:
        pattern = rng.uniform(-1, 1, (size, size))
    pixels = base + 22.0 * pattern[..., None]
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def object_box(shape: Shape, size: int) -> tuple[float, float, float]:
    """Centre x, centre y and radius of an object in a `size`-pixel image."""
    cell = size / 3
    return (shape.cell[1] + 0.5) * cell, (shape.cell[0] + 0.5) * cell, cell * (0.42 if shape.size == "large"
                                                                             else 0.24)


def draw_scene(scene: Scene, size: int) -> Image.Image:
    if not 16 <= size <= MAX_SIZE:
        raise ValueError(f"image size must be between 16 and {MAX_SIZE} pixels")
    img = draw_background(scene.background, size)
    draw = ImageDraw.Draw(img)
    for s in scene.objects:
        cx, cy, r = object_box(s, size)
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


def cell_crop(image: Image.Image, cell: tuple[int, int]) -> Image.Image:
    """The 3×3 grid cell at `cell`, resized to the full image size (the candidates of the `pos` task)."""
    size = image.size[0]
    row, col = cell
    box = (round(col * size / 3), round(row * size / 3), round((col + 1) * size / 3), round((row + 1) * size / 3))
    return image.crop(box).resize((size, size), Image.BILINEAR)


# Captions: every object is named with its size, colour, shape and position; the wording varies.
AT = ("in the {}", "at the {}", "in the {} part", "placed in the {}")
LEADS = ("{}", "a picture of {}", "an image showing {}", "there is {}", "this scene has {}", "we see {}")


def caption(scene: Scene, rng: random.Random) -> str:
    objects = list(scene.objects)
    rng.shuffle(objects)
    lead = rng.choice(LEADS)
    parts = [f"{s.phrase()} {rng.choice(AT).format(s.position)}" for s in objects]
    if lead == "{}" and rng.random() < 0.3:  # "in the upper left, a large red circle …"
        parts[0] = f"{rng.choice(AT).format(objects[0].position)}, {objects[0].phrase()}"
    body = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + rng.choice((" and ", ", and ", "; ")) + parts[-1]
    text = lead.format(body)
    if scene.background.texture and rng.random() < 0.3:
        text += f" on a {scene.background.texture} background"
    return text
