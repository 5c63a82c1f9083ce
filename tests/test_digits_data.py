"""The generated Digits benchmark data (scikit-learn's 1,797 handwritten digits), checked by recomputation:
items, images and captions against the digits themselves, the splits, the zero-shot, t2i and i2t tasks."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from test_benchmark_data import _pixels, as_pixels, contiguous_blocks, digest_tree, load, pixels, read_jsonl

from evaluation.data import make_data
from evaluation.digits import digit_image, make_digits
from evaluation.tasks import read_task

DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


@pytest.fixture(scope="module")
def digits_all(tmp_path_factory) -> Path:
    """Every digit (the default n), at the smallest size, without training pairs."""
    root = tmp_path_factory.mktemp("digits_all") / "data"
    make_digits(root, size=16, train_pairs=False, progress=False)
    return root


@pytest.fixture(scope="module")
def digits_small(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("digits_small") / "data"
    make_digits(root, n=150, size=40, seed=3, train_pairs=True, progress=False)
    return root


def test_digits_are_deterministic(tmp_path):
    a = make_digits(tmp_path / "a", n=60, size=16, seed=5, progress=False).parent
    b = make_digits(tmp_path / "b", n=60, size=16, seed=5, progress=False).parent
    for name in ("corpus.jsonl", "train/pairs.jsonl", "dataset.json"):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    assert digest_tree(a, "tasks/*/*") == digest_tree(b, "tasks/*/*")
    assert digest_tree(a, "**/*.png") == digest_tree(b, "**/*.png")


def test_digits_default_is_every_digit(digits_all):
    from sklearn.datasets import load_digits

    target = load_digits().target
    rows = read_jsonl(digits_all / "corpus.jsonl")
    assert len(rows) == len(target) == 1797
    meta = json.loads((digits_all / "dataset.json").read_text())
    assert (meta["name"], meta["n"], meta["items"], meta["size"]) == ("digits", 1797, 1797, 16)
    assert meta["train_pairs"] is None and not (digits_all / "train").exists()
    assert contiguous_blocks([r["split"] for r in rows]) == [("train", 1438), ("val", 179), ("test", 180)]
    for i, r in enumerate(rows):
        assert r["id"] == f"digit-{i:05d}" and r["digit"] == int(target[i]) and r["label"] == DIGIT_WORDS[target[i]]
        size, mode, _ = _pixels(str((digits_all / r["image"]).resolve()))
        assert (size, mode) == ((16, 16), "RGB")


def _names_digits(text: str) -> set[int]:
    return {d for d, w in enumerate(DIGIT_WORDS) if re.search(rf"\b({w}|{d})\b", text)}


def test_digits_items_images_and_captions(digits_small):
    from sklearn.datasets import load_digits

    data = load_digits()
    rows = read_jsonl(digits_small / "corpus.jsonl")
    assert len(rows) == 150
    assert json.loads((digits_small / "dataset.json").read_text())["n"] == 150
    assert contiguous_blocks([r["split"] for r in rows]) == [("train", 120), ("val", 15), ("test", 15)]
    for i, r in enumerate(rows):
        assert r["digit"] == int(data.target[i]) and r["label"] == DIGIT_WORDS[r["digit"]]
        assert _names_digits(r["text"]) == {r["digit"]}, r["text"]
        size, mode, _ = _pixels(str((digits_small / r["image"]).resolve()))
        assert (size, mode) == ((40, 40), "RGB")
        assert pixels(digits_small / r["image"]) == as_pixels(digit_image(data.images[i], 40))
    assert len({re.sub(r"\b(\d|" + "|".join(DIGIT_WORDS) + r")\b", "D", r["text"]) for r in rows}) >= 5
    ink = np.asarray(load(digits_small / rows[0]["image"]))
    assert ink.min() < 60 and ink.max() > 240  # dark ink on white paper
    pairs = read_jsonl(digits_small / "train" / "pairs.jsonl")
    train = [r for r in rows if r["split"] == "train"]
    assert [p["group"] for p in pairs] == [r["id"] for r in train]
    for p, r in zip(pairs, train):
        assert p["task"] == "caption" and p["target_text"] == r["text"]
        assert (digits_small / "train" / p["query_image"]).resolve() == (digits_small / r["image"]).resolve()


def test_digits_tasks(digits_small):
    rows = read_jsonl(digits_small / "corpus.jsonl")
    test = {r["id"]: r for r in rows if r["split"] == "test"}
    label_of_image = {str((digits_small / r["image"]).resolve()): r for r in test.values()}
    zs = read_task(digits_small / "tasks" / "zeroshot")
    prompts = {c.id: c.text for c in zs.candidates}
    assert len(prompts) == 10 == len(set(prompts.values()))
    assert all(c.image is None for c in zs.candidates)
    for d, w in enumerate(DIGIT_WORDS):
        assert _names_digits(prompts[f"class-{w}"]) == {d}
    assert len(zs.queries) == len(test)
    for q in zs.queries:
        r = label_of_image[str(Path(q.item.image).resolve())]
        assert q.positives == (f"class-{r['label']}",) and not q.item.text
    t2i, i2t = read_task(digits_small / "tasks" / "t2i"), read_task(digits_small / "tasks" / "i2t")
    assert {c.id for c in t2i.candidates} == set(test)
    assert {str(Path(c.image).resolve()) for c in t2i.candidates} == set(label_of_image)
    for q in t2i.queries:
        (d,) = _names_digits(q.item.text)
        assert set(q.positives) == {i for i, r in test.items() if r["digit"] == d}
        assert len(q.positives) == len(set(q.positives))
    caption_digit = {c.id: _names_digits(c.text) for c in i2t.candidates}
    assert all(len(v) == 1 for v in caption_digit.values()) and len(caption_digit) == len(test)
    for q in i2t.queries:
        r = label_of_image[str(Path(q.item.image).resolve())]
        assert set(q.positives) == {cid for cid, ds in caption_digit.items() if ds == {r["digit"]}}
        assert len(q.positives) == len(set(q.positives))


def test_make_data_digits_n_beyond_the_set_is_every_digit(tmp_path):
    make_data("digits", tmp_path / "d", n=5000, size=16, train_pairs=False, progress=False)
    assert json.loads((tmp_path / "d" / "dataset.json").read_text())["items"] == 1797


