"""The ShapesWorld benchmark folder: images, corpus.jsonl, the task files of the test split, training pairs.

    DATA/corpus.jsonl            every scene: id, image, text, split, n_objects, shapes, colours, background
    DATA/tasks/{t2i,i2t,tgit,tgit-pool,vqa,pos}/   test-split tasks (evaluation/tasks.py)
    DATA/train/pairs.jsonl       train-split (query → target) pairs in groups of related items
    DATA/dataset.json            what was made, written last
"""

from __future__ import annotations

import hashlib
import os
import random
from collections import Counter
from pathlib import Path
from typing import Any

from PIL import Image
from tqdm import tqdm

from evaluation import transforms as tf
from evaluation.benchmark_folder import finish_dataset
from evaluation.scenes import (
    COLOURS,
    COLS,
    ROWS,
    SHAPES,
    Scene,
    Shape,
    caption,
    cell_crop,
    draw_scene,
    make_scenes,
    position_name,
    split_of,
)
from evaluation.tasks import Item, Query, Task, write_task
from retrieval.files import write_jsonl
from retrieval.images import save_image
from retrieval.training.pairs import pair

NUMBERS = ("zero", "one", "two", "three")
POSITIONS = tuple(position_name((r, c)) for r in range(len(ROWS)) for c in range(len(COLS)))
ANSWERS = ("yes", "no", *NUMBERS, *COLOURS, *SHAPES, *POSITIONS)


def plural(shape: str) -> str:
    return shape + ("es" if shape.endswith("s") else "s")


def questions(scene: Scene, rng: random.Random) -> list[tuple[str, str, str]]:
    """(type, question, answer) about a scene: colour, shape, count, presence and position, where unambiguous."""
    objs = scene.objects
    by_shape = Counter(o.shape for o in objs)
    by_colour = Counter(o.colour for o in objs)
    by_both = Counter((o.colour, o.shape) for o in objs)
    out = []
    if unique := [o for o in objs if by_shape[o.shape] == 1]:
        o = rng.choice(unique)
        out.append(("colour", f"what color is the {o.shape}?", o.colour))
    if unique := [o for o in objs if by_colour[o.colour] == 1]:
        o = rng.choice(unique)
        out.append(("shape", f"what shape is the {o.colour} object?", o.shape))
    if rng.random() < 0.5:
        out.append(("count", "how many objects are there?", NUMBERS[len(objs)]))
    else:
        shape = rng.choice(SHAPES)
        out.append(("count", f"how many {plural(shape)} are there?", NUMBERS[by_shape[shape]]))
    if rng.random() < 0.5:
        o = rng.choice(objs)
        out.append(("presence", f"is there a {o.colour} {o.shape}?", "yes"))
    else:
        colour, shape = rng.choice([(c, s) for c in COLOURS for s in SHAPES if (c, s) not in by_both])
        out.append(("presence", f"is there a {colour} {shape}?", "no"))
    if unique := [o for o in objs if by_both[(o.colour, o.shape)] == 1]:
        o = rng.choice(unique)
        out.append(("position", f"where is the {o.colour} {o.shape}?", o.position))
    return out


def twins(scene: Scene) -> tuple[Shape, Shape] | None:
    """The (left, right) pair of a shape that occurs exactly twice, in different columns, looking different."""
    by_shape = Counter(o.shape for o in scene.objects)
    for shape, count in by_shape.items():
        if count == 2:
            a, b = sorted((o for o in scene.objects if o.shape == shape), key=lambda o: o.cell[1])
            if a.cell[1] != b.cell[1] and (a.colour, a.size) != (b.colour, b.size):
                return a, b
    return None


class _Writer:
    """Saves derived images under the data folder and returns their paths."""

    def __init__(self, root: Path):
        self.root = root
        self.digests: dict[str, bytes] = {}  # path → pixel digest, to find candidates that look the same

    def save(self, image: Image.Image, rel: str) -> str:
        path = str(self.root / rel)
        save_image(image, path, durable=False)  # generated data: dataset.json, written last, marks it complete
        self.digests[path] = hashlib.blake2b(image.tobytes(), digest_size=16).digest()
        return path


def tgit_group(image: Image.Image, sid: str, src: str, rng: random.Random, w: _Writer, sizes: dict[str, int],
               folder: str) -> dict[str, list[tuple[Item, tf.Transform, Item]]]:
    """Per TGIT type, (query, transform, target) triples; the colour and flip groups add the reverse pairs."""
    source = Item(f"{sid}-src", src)
    rotations = tf.all_rotations()
    if sizes["rotate"] < len(rotations):
        rotations = rng.sample(rotations, sizes["rotate"])
    forward = {"crop": tf.all_crops()[: sizes["crop"]], "rotate": rotations,
               "jitter": tf.distinct_jitters(rng, sizes["jitter"])}
    groups: dict[str, list[tuple[Item, tf.Transform, Item]]] = {}
    for kind, transforms in forward.items():
        groups[kind] = []
        for j, t in enumerate(transforms):
            target = Item(f"{sid}-{kind}{j}", w.save(t.apply(image), f"{folder}/{sid}/{kind}{j}.png"))
            groups[kind].append((source, t, target))
    flips = []
    for t in (tf.Transform("hflip"), tf.Transform("vflip")):
        flipped = Item(f"{sid}-{t.kind}", w.save(t.apply(image), f"{folder}/{sid}/{t.kind}.png"))
        flips += [(source, t, flipped), (flipped, t, source)]
    groups["flip"] = flips[::2] + flips[1::2]  # forward pairs first: [h, v, reverse h, reverse v]
    gray = Item(f"{sid}-gray", w.save(tf.Transform("grayscale").apply(image), f"{folder}/{sid}/gray.png"))
    groups["color"] = [(source, tf.Transform("grayscale"), gray), (gray, tf.Transform("colorize"), source)]
    return groups


def tgit_queries(groups: dict[str, list[tuple[Item, tf.Transform, Item]]], sid: str, rng: random.Random,
                 w: _Writer) -> list[tuple[Query, list[Item]]]:
    """One query per type: a random member of the group, ranked against every target of the group.

    Only a target that looks different from every other candidate is asked for (a centred circle
    rotates into itself; a crop of plain background equals another one); a type without one is skipped.
    """
    out = []
    for kind, triples in groups.items():
        candidates = [target for _, _, target in triples]
        ids = [f"{c.id}#{i}" if [x.id for x in candidates].count(c.id) > 1 else c.id
               for i, c in enumerate(candidates)]  # the flip group holds the source image twice
        looks = Counter(w.digests[c.image] for c in candidates)
        askable = [i for i in range(2 if kind == "flip" else len(triples))
                   if looks[w.digests[candidates[i].image]] == 1]
        if not askable:
            continue
        choice = rng.choice(askable)
        query_item, t, _ = triples[choice]
        query = Query(Item(f"{sid}-{kind}-q", query_item.image, t.instruction), (ids[choice],), tuple(ids), kind)
        out.append((query, [Item(i, c.image) for i, c in zip(ids, candidates)]))
    return out


def make_shapesworld(out: str | os.PathLike, n: int = 2000, size: int = 64, seed: int = 0,
                     train_pairs: bool = True, progress: bool = True) -> Path:
    """Generate the benchmark folder; returns the path of corpus.jsonl."""
    root = Path(out)
    w = _Writer(root)
    rng = random.Random(seed + 1)
    scenes = make_scenes(n, seed)
    corpus: list[dict[str, Any]] = []
    pairs: list[dict[str, Any]] = []
    captions_, tgit, vqa, pos = [], [], [], []
    for i, scene in enumerate(tqdm(scenes, desc="shapesworld", unit="scene", disable=not progress)):
        sid, split = f"shapes-{i:06d}", split_of(i, n)
        image = draw_scene(scene, size)
        src = w.save(image, f"images/{i:06d}.png")
        text = caption(scene, rng)
        corpus.append({"id": sid, "image": os.path.relpath(src, root), "text": text, "split": split,
                       "n_objects": len(scene.objects), "shapes": " ".join(sorted({o.shape for o in scene.objects})),
                       "colours": " ".join(sorted({o.colour for o in scene.objects})),
                       "background": scene.background.texture or scene.background.base})
        if split == "test":
            captions = [text, caption(scene, rng)]
            captions_.append((sid, src, captions))
            tgit += tgit_queries(tgit_group(image, sid, src, rng, w, tf.EVAL_GROUP_SIZES, "images/tgit"), sid, rng,
                                 w)
            vqa += [(Item(f"{sid}-vqa{j}", src, q), a, kind) for j, (kind, q, a) in enumerate(questions(scene, rng))]
            if pair_ := twins(scene):
                pos.append(pos_queries(scene, sid, src, image, pair_, rng, w))
        elif split == "train" and train_pairs:
            pairs += train_group(scene, sid, src, text, image, rng, w)
    write_jsonl(root / "corpus.jsonl", corpus)
    tasks = [*caption_tasks(captions_), *tgit_tasks(tgit, w), vqa_task(vqa), pos_task(pos)]
    for task in tasks:
        write_task(task, root / "tasks" / task.name)
    return finish_dataset(root, "shapesworld", {"n": n, "size": size, "seed": seed}, corpus, tasks,
                          pairs if train_pairs else None)


def caption_tasks(test: list[tuple[str, str, list[str]]]) -> list[Task]:
    images = [Item(sid, src) for sid, src, _ in test]
    texts = [Item(f"{sid}-cap{j}", text=c) for sid, _, caps in test for j, c in enumerate(caps)]
    t2i = [Query(Item(f"{t.id}-q", text=t.text), (t.id.rsplit("-cap", 1)[0],)) for t in texts]
    i2t = [Query(Item(f"{im.id}-q", im.image), tuple(t.id for t in texts if t.id.rsplit("-cap", 1)[0] == im.id))
           for im in images]
    return [Task("t2i", "shapesworld", "pool", "hit@1", "caption → its scene among all test images", t2i, images),
            Task("i2t", "shapesworld", "pool", "hit@1", "scene → its two captions among all test captions", i2t,
                 texts)]


def tgit_tasks(queries: list[tuple[Query, list[Item]]], w: _Writer) -> list[Task]:
    """`tgit` ranks each query among its own group; `tgit-pool` among every image of every group, each once.

    A `tgit-pool` query is only asked when its answer looks different from every image in the pool.
    """
    qs = [q for q, _ in queries]
    every = [c for _, cands in queries for c in cands]
    pool = list({c.image: Item(c.id.split("#")[0], c.image) for c in every}.values())  # '#': copies of a source
    looks = Counter(w.digests[c.image] for c in pool)
    image_of = {c.id: c.image for c in every}
    pool_queries = [Query(q.item, q.positives, None, q.type) for q in qs
                    if looks[w.digests[image_of[q.positives[0]]]] == 1]
    desc = "image + instruction → the transformed image among the {} (top-1 per type, mean over types)"
    return [Task("tgit", "shapesworld", "candidates", "top1", desc.format("transformations of that image"), qs,
                 list({c.id: c for c in every}.values()), by_type=True),
            Task("tgit-pool", "shapesworld", "pool", "top1", desc.format("transformations of every test image"),
                 pool_queries, pool, by_type=True)]


def vqa_task(questions_: list[tuple[Item, str, str]]) -> Task:
    answers = [Item(f"answer-{a.replace(' ', '-')}", text=a) for a in ANSWERS]
    queries = [Query(item, (f"answer-{a.replace(' ', '-')}",), None, kind) for item, a, kind in questions_]
    return Task("vqa", "shapesworld", "pool", "top1", "image + question → the answer among every possible answer",
                queries, answers)


def pos_queries(scene: Scene, sid: str, src: str, image: Image.Image, pair_: tuple[Shape, Shape],
                rng: random.Random, w: _Writer) -> tuple[list[Query], list[Item]]:
    """'the {shape} on the left|right' → the crop of that object, among the crops of the scene's objects
    and up to two empty cells."""
    occupied = [o.cell for o in scene.objects]
    empty = [(r, c) for r in range(3) for c in range(3) if (r, c) not in occupied]
    cells = occupied + rng.sample(empty, min(2, len(empty)))
    crops = {cell: Item(f"{sid}-crop{cell[0]}{cell[1]}", w.save(cell_crop(image, cell),
                                                               f"images/pos/{sid}/{cell[0]}{cell[1]}.png"))
             for cell in cells}
    ids = tuple(c.id for c in crops.values())
    queries = [Query(Item(f"{sid}-{side}", src, f"the {o.shape} on the {side}"), (crops[o.cell].id,), ids, side)
               for side, o in zip(("left", "right"), pair_)]
    return queries, list(crops.values())


def pos_task(per_scene: list[tuple[list[Query], list[Item]]]) -> Task:
    return Task("pos", "shapesworld", "candidates", "top1",
                "image + 'the {shape} on the left|right' → that object's crop among the crops of the image",
                [q for qs, _ in per_scene for q in qs], [c for _, cs in per_scene for c in cs])


def train_group(scene: Scene, sid: str, src: str, text: str, image: Image.Image, rng: random.Random,
                w: _Writer) -> list[dict[str, Any]]:
    """Every training pair made from one train scene, in one group: caption, TGIT, VQA and `pos` pairs."""
    pairs = [pair(sid, "caption", src, None, None, text)]
    for kind, triples in tgit_group(image, sid, src, rng, w, tf.TRAIN_GROUP_SIZES, "train/tgit").items():
        looks = Counter(w.digests[target.image] for _, _, target in triples)
        pairs += [pair(sid, f"tgit-{kind}", q.image, t.instruction, target.image, None) for q, t, target in triples
                  if kind in ("flip", "color") or looks[w.digests[target.image]] == 1]  # no look-alike targets
    pairs += [pair(sid, f"vqa-{kind}", src, q, None, a) for kind, q, a in questions(scene, rng)]
    if pair_ := twins(scene):
        for side, o in zip(("left", "right"), pair_):
            crop = w.save(cell_crop(image, o.cell), f"train/pos/{sid}/{o.cell[0]}{o.cell[1]}.png")
            pairs.append(pair(sid, "pos", src, f"the {o.shape} on the {side}", crop, None))
    return pairs
