"""Training pairs (query → target): their folder format, and batches made of whole groups.

A data folder holds its pairs as train/pairs.jsonl (image paths relative to it), then train/pairs.json (the
data set's name and counts, written last). Pairs of one group (every transform of one image, every question
on one scene) land in the same batch, so they are each other's hard negatives; FuseLIP's TGIT and position
results depend on it.
"""

from __future__ import annotations

import os
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from retrieval.errors import RetrievalError
from retrieval.files import has_type, read_json, read_jsonl, write_json, write_jsonl

if TYPE_CHECKING:
    import torch

PAIRS = "train/pairs.jsonl"
PAIRS_JSON = "train/pairs.json"
PAIRS_FORMAT = "retrieval.pairs"


@dataclass(frozen=True)
class Pair:
    group: str
    task: str
    query_image: str | None
    query_text: str | None
    target_image: str | None
    target_text: str | None

    @property
    def query(self) -> tuple[str | None, str | None]:
        """What the query is, in the form of `target`: an empty text is no text."""
        return self.query_image, self.query_text or None

    @property
    def target(self) -> tuple[str | None, str | None]:
        """What the target is; two pairs with the same target are both positives for either query."""
        return self.target_image, self.target_text or None


def pair(group: str, task: str, query_image: str | None, query_text: str | None, target_image: str | None,
         target_text: str | None) -> dict[str, Any]:
    """One training pair (query → target). Pairs of one `group` are related: a trainer batches them together."""
    return {"group": group, "task": task, "query_image": query_image, "query_text": query_text,
            "target_image": target_image, "target_text": target_text}


def write_pairs(root: Path, name: str, pairs: list[dict[str, Any]]) -> None:
    """Data set `name`'s pairs into `root`/train: pairs.jsonl with image paths relative to it, then pairs.json."""
    base = root / "train"
    write_jsonl(root / PAIRS, ({k: os.path.relpath(v, base) if k.endswith("_image") and v else v
                                for k, v in p.items()} for p in pairs))
    write_json(root / PAIRS_JSON, {"format": PAIRS_FORMAT, "name": name})


def read_pairs(data_dirs: list[str | os.PathLike]) -> list[Pair]:
    """Every training pair of the given data folders, image paths absolute, groups made unique."""
    pairs = []
    for folder in data_dirs:
        path = Path(folder) / PAIRS_JSON
        if not path.is_file():
            raise RetrievalError(f"{folder} has no training pairs ({PAIRS_JSON}); make them with "
                                 "`retrieval data make` (without --no-train-pairs)")
        meta = read_json(path)
        if not (isinstance(meta, dict) and meta.get("format") == PAIRS_FORMAT and has_type(meta.get("name"), str)
                and meta["name"] and "/" not in meta["name"]):
            raise RetrievalError(f"{path} is not a training pairs description (format {PAIRS_FORMAT}, a name)")
        path = Path(folder) / PAIRS
        base = path.parent

        def image(rel: str | None, base: Path = base) -> str | None:
            return str((base / rel).resolve()) if rel else None

        pairs.extend(Pair(group=f"{meta['name']}/{r['group']}", task=f"{meta['name']}/{r['task']}",
                          query_image=image(r["query_image"]), query_text=r["query_text"],
                          target_image=image(r["target_image"]), target_text=r["target_text"])
                     for r in read_jsonl(path))
    if not pairs:
        raise RetrievalError("no training pairs in " + ", ".join(map(str, data_dirs)))
    return pairs


def groups_of(pairs: list[Pair], repeats: dict[str, int] | None = None) -> list[list[int]]:
    """Pair indices by group; a data set named in `repeats` has each of its groups that many times per epoch."""
    groups: dict[str, list[int]] = {}
    for i, p in enumerate(pairs):
        groups.setdefault(p.group, []).append(i)
    names = {p.group.split("/", 1)[0] for p in pairs}
    unknown = sorted(set(repeats or {}) - names)
    if unknown:
        raise RetrievalError(f"--repeat names data sets not in the training data: {', '.join(unknown)}")
    return [g for key, g in groups.items() for _ in range((repeats or {}).get(key.split("/", 1)[0], 1))]


def grouped_batches(groups: list[list[int]], batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """Shuffle the groups (deterministically per epoch), concatenate them, cut full batches."""
    order = list(groups)
    random.Random(seed * 1_000_003 + epoch).shuffle(order)
    flat = [i for g in order for i in g]
    return [flat[s:s + batch_size] for s in range(0, len(flat) - batch_size + 1, batch_size)]


def caption_pairs(pairs: list[Pair]) -> list[int]:
    """Indices of the image–caption pairs (tasks named `caption`), the pool a caption share draws from."""
    return [i for i, p in enumerate(pairs) if p.task.endswith("/caption")]


def batch_stream(groups: list[list[int]], batch_size: int, seed: int, start: int = 0,
                 captions: list[int] | None = None, caption_slots: int = 0) -> Iterator[list[int]]:
    """Batches from step `start` on, epoch after epoch; the same steps for the same seed, so runs resume.

    With `caption_slots`, each batch is batch_size − caption_slots pairs of whole groups plus that many
    image–caption pairs from `captions`, drawn in a seeded order of their own: a group holds one caption
    among dozens of edits and questions, so otherwise a batch aligns images with only a handful of captions.
    """
    grouped_size = batch_size - caption_slots
    if grouped_size < 1:
        raise RetrievalError(f"a caption share of {caption_slots} of {batch_size} pairs leaves no room for groups")
    if sum(len(g) for g in groups) < grouped_size:
        raise RetrievalError(f"fewer training pairs than one batch of {grouped_size}")
    if caption_slots and not captions:
        raise RetrievalError("a caption share needs image–caption pairs in the training data")
    epoch, step = 0, 0
    while True:
        for batch in grouped_batches(groups, grouped_size, seed, epoch):
            if step >= start:
                yield batch + caption_draw(captions or [], step, caption_slots, seed)
            step += 1
        epoch += 1


def caption_draw(captions: list[int], step: int, slots: int, seed: int) -> list[int]:
    """The caption pairs of step `step`: slots [step·slots, (step+1)·slots) of the captions in seeded rounds."""
    rounds: dict[int, list[int]] = {}
    for k in range(step * slots, (step + 1) * slots):
        if k // len(captions) not in rounds:
            rounds[k // len(captions)] = order = list(captions)
            random.Random(seed * 1_000_003 + 7_919 * (k // len(captions)) + 1).shuffle(order)
    return [rounds[k // len(captions)][k % len(captions)] for k in range(step * slots, (step + 1) * slots)]


def candidates(pairs: list[Pair]) -> tuple[list[tuple[str | None, str | None]], torch.Tensor, torch.Tensor]:
    """The right side of a batch: its distinct targets, `positives` [len(pairs), len(targets)] (each pair's
    own target; VQA answers repeat, so a column may serve several pairs), and `query_is_target`, where a
    target is the very item a pair's query is (an image whose caption is asked for is also the target of
    its flip's "flip back")."""
    index = {item: j for j, item in enumerate(dict.fromkeys(p.target for p in pairs))}
    import torch

    positives = torch.zeros(len(pairs), len(index), dtype=torch.bool)
    query_is_target = torch.zeros_like(positives)
    for i, p in enumerate(pairs):
        positives[i, index[p.target]] = True
        if p.query in index:
            query_is_target[i, index[p.query]] = True
    return list(index), positives, query_is_target
