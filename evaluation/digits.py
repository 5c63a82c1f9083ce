"""Digits: scikit-learn's 1,797 real 8×8 handwritten digits, upscaled, with template captions.

    DATA/corpus.jsonl   id, image, text, split (contiguous 80/10/10 by index), label, digit
    DATA/tasks/{zeroshot,t2i,i2t}/   test-split tasks (evaluation/tasks.py)
    DATA/train/pairs.jsonl           (image → caption) pairs of the train split
"""

from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from evaluation.benchmark_folder import finish_dataset
from evaluation.scenes import split_of
from evaluation.tasks import Item, Query, Task, write_task
from retrieval.files import write_jsonl
from retrieval.images import save_image
from retrieval.training.pairs import pair

WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
TEMPLATES = ("a handwritten digit {word}", "the number {digit} written by hand", "a scan of a handwritten {digit}",
             "an image of the digit {word}", "a {word} written with a pen", "a hand-drawn number {word}")
PROMPT = "a handwritten digit {word}"  # the zero-shot class prompt


def digit_image(pixels: np.ndarray, size: int) -> Image.Image:
    """8×8 intensities 0..16 → dark ink on white paper, upscaled to `size` pixels."""
    gray = (255 - np.asarray(pixels, dtype=np.float32).reshape(8, 8) * (255 / 16)).round().astype(np.uint8)
    return Image.fromarray(gray, mode="L").resize((size, size), Image.BICUBIC).convert("RGB")


def make_digits(out: str | os.PathLike, n: int | None = None, size: int = 64, seed: int = 0,
                train_pairs: bool = True, progress: bool = True) -> Path:
    """Write the Digits benchmark folder (the first `n` digits, all 1,797 by default); returns corpus.jsonl."""
    from sklearn.datasets import load_digits

    data = load_digits()
    total = len(data.target) if n is None else min(n, len(data.target))
    root = Path(out)
    rng = random.Random(seed)
    corpus, pairs, test = [], [], []
    for i in tqdm(range(total), desc="digits", unit="image", disable=not progress):
        label = int(data.target[i])
        rel = f"images/{i:05d}.png"
        save_image(digit_image(data.images[i], size), root / rel, durable=False)
        text = rng.choice(TEMPLATES).format(word=WORDS[label], digit=label)
        record = {"id": f"digit-{i:05d}", "image": rel, "text": text, "split": split_of(i, total),
                  "label": WORDS[label], "digit": label}
        corpus.append(record)
        if record["split"] == "test":
            test.append(record)
        elif record["split"] == "train":
            pairs.append(pair(record["id"], "caption", str(root / rel), None, None, text))
    write_jsonl(root / "corpus.jsonl", corpus)
    tasks = digit_tasks(root, test)
    for task in tasks:
        write_task(task, root / "tasks" / task.name)
    return finish_dataset(root, "digits", {"n": total, "size": size, "seed": seed}, corpus, tasks,
                          pairs if train_pairs else None)


def digit_tasks(root: Path, test: list[dict]) -> list[Task]:
    """zeroshot (image → class prompt), t2i and i2t (positives: every test item of the same digit)."""
    images = [Item(r["id"], str(root / r["image"])) for r in test]
    captions = [Item(f"{r['id']}-cap", text=r["text"]) for r in test]
    labels = [r["label"] for r in test]
    prompts = [Item(f"class-{w}", text=PROMPT.format(word=w)) for w in WORDS]
    same = {w: [i for i, x in enumerate(labels) if x == w] for w in set(labels)}
    zeroshot = [Query(Item(f"{im.id}-q", im.image), (f"class-{w}",)) for im, w in zip(images, labels)]
    t2i = [Query(Item(f"{c.id}-q", text=c.text), tuple(images[j].id for j in same[w]))
           for c, w in zip(captions, labels)]
    i2t = [Query(Item(f"{im.id}-q", im.image), tuple(captions[j].id for j in same[w]))
           for im, w in zip(images, labels)]
    return [Task("zeroshot", "digits", "pool", "top1", f"digit image → its class prompt ('{PROMPT}')", zeroshot,
                 prompts),
            Task("t2i", "digits", "pool", "hit@1", "caption → test images of that digit", t2i, images),
            Task("i2t", "digits", "pool", "hit@1", "digit image → test captions of that digit", i2t, captions)]
