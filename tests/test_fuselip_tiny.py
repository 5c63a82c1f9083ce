"""The bundled `fuselip-tiny`: it loads offline from the repository, is small, and answers composed
queries through the real CLI (index build → search) and `retrieval eval` well above chance."""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path

import pytest

from evaluation.shapesworld import make_shapesworld
from evaluation.transforms import Transform, all_rotations
from retrieval.encoders.registry import default_checkpoint, get_config, load_encoder
from retrieval.images import load_image, save_image
from retrieval.search import open_index
from tests.conftest import run_cli


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> Path:
    """ShapesWorld at the size fuselip-tiny was trained on (64 px), without training pairs."""
    root = tmp_path_factory.mktemp("shapes64")
    make_shapesworld(root, n=200, size=64, seed=0, train_pairs=False, progress=False)
    return root


def test_bundled_checkpoint_is_complete_and_small():
    folder = default_checkpoint(get_config("fuselip-tiny"))
    files = {p.name: p.stat().st_size for p in folder.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(files)
    assert sum(files.values()) <= 20 * 2**20
    encoder = load_encoder("fuselip-tiny", device="cpu")
    assert encoder.fusion == "early" and encoder.dim == 128
    vectors = encoder.encode(texts=["a red circle", "rotate 90 degrees clockwise"])
    assert vectors.shape == (2, 128)


def _test_scenes(shapes: Path, n: int) -> list[dict]:
    corpus = [json.loads(line) for line in (shapes / "corpus.jsonl").read_text().splitlines()]
    return [r for r in corpus if r["split"] == "test"][:n]


def _search_top(index: Path, image: Path, text: str) -> str:
    out = run_cli("search", "--index", index, "--image", image, "--text", text, "-k", "3", "--json",
                  "--device", "cpu").stdout
    return json.loads(out)[0]["id"]


@pytest.fixture(scope="module")
def rotations(shapes, tmp_path_factory) -> tuple[Path, list[dict]]:
    """`index build` over the 20 test scenes and their 90° clockwise rotations: (the index, the scenes asked
    for their rotation). A scene whose rotation has its very pixels is not asked, as in `tgit`."""
    out = tmp_path_factory.mktemp("rotations")
    rows, asked = [], []
    for r in _test_scenes(shapes, 20):
        image = load_image(shapes / r["image"])
        rotated = Transform("rotate", (90, True)).apply(image)
        rows.append({"id": r["id"], "image": str(shapes / r["image"])})
        if rotated.tobytes() != image.tobytes():
            save_image(rotated, out / f"{r['id']}-90-cw.png")
            rows.append({"id": f"{r['id']}-90-cw", "image": str(out / f"{r['id']}-90-cw.png")})
            asked.append(r)
    (out / "corpus.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    run_cli("index", "build", out / "corpus.jsonl", "--model", "fuselip-tiny", "--out", out / "idx", "--device", "cpu")
    return out / "idx", asked


@pytest.mark.slow
def test_search_answers_the_rotation_more_often_than_the_source(shapes, rotations):
    """"rotate 90 degrees clockwise" with a scene's image returns its rotation at rank 1 for most scenes. A model
    that ignored the instruction would return the source itself, the nearest image to its own query."""
    path, asked = rotations
    index = open_index(path, device="cpu")  # in-process for speed; the CLI must give the same first answer
    tops = [index.search(image=shapes / r["image"], text="rotate 90 degrees clockwise", k=1)[0].id for r in asked]
    assert _search_top(path, shapes / asked[0]["image"], "rotate 90 degrees clockwise") == tops[0]
    kinds = Counter("rotation" if top == f"{r['id']}-90-cw" else "source" if top == r["id"] else "other"
                    for r, top in zip(asked, tops))
    assert len(asked) >= 15 and kinds["rotation"] > len(asked) / 2, kinds


@pytest.mark.xfail(strict=True, reason="fuselip-tiny (27 min on 2 cores) ranks scene 180's unrotated source first: "
                   "its rotation is at rank 1 for 14 of 19 test scenes (the test above), not for all; over 100 "
                   "test scenes the query is nearer the rotation than the source in 72 % (issue 4)")
@pytest.mark.slow
def test_search_finds_the_rotated_image(shapes, rotations):
    """In the same index, each of the first five scenes + "rotate 90 degrees clockwise" finds its own rotation at
    rank 1 through the CLI (not itself, not another rotation)."""
    path, asked = rotations
    for r in asked[:5]:
        assert _search_top(path, shapes / r["image"], "rotate 90 degrees clockwise") == f"{r['id']}-90-cw"


@pytest.mark.xfail(strict=True, reason="fuselip-tiny confuses 90° clockwise with counter-clockwise (tgit rotate "
                   "top-1 0.52; clockwise nearer than counter-clockwise in 84 % of 100 test scenes; "
                   "issue 4)")
@pytest.mark.slow
def test_search_tells_the_rotation_apart(shapes, tmp_path):
    """The harder TGIT form: all 18 rotations (10°–90°, both ways) of five test images in one index."""
    rows = []
    scenes = _test_scenes(shapes, 5)
    for r in scenes:
        image = load_image(shapes / r["image"])
        for t in all_rotations():
            path = tmp_path / f"{r['id']}-{t.params[0]}-{'cw' if t.params[1] else 'ccw'}.png"
            save_image(t.apply(image), path)
            rows.append({"id": path.stem, "image": str(path)})
    (tmp_path / "corpus.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    run_cli("index", "build", tmp_path / "corpus.jsonl", "--model", "fuselip-tiny", "--out", tmp_path / "idx",
            "--device", "cpu")
    for r in scenes:
        assert _search_top(tmp_path / "idx", shapes / r["image"], "rotate 90 degrees clockwise") == f"{r['id']}-90-cw"


@pytest.mark.slow
def test_eval_is_far_above_chance(shapes, tmp_path):
    """tgit, vqa and t2i beat chance by more than 3 binomial standard errors of a chance-level model: a broken
    preprocessing or loading path falls to chance. (`pos` has 12 queries here, too few to tell its weaker signal
    from chance; the closing note of issue 4 has it on the full test split.)"""
    run_cli("eval", "tgit,vqa,t2i", "--model", "fuselip-tiny", "--data", shapes, "--json",
            tmp_path / "eval.json", "--device", "cpu")
    rows = {r["task"]: r for r in json.loads((tmp_path / "eval.json").read_text())["results"]}
    for task in ("tgit", "vqa", "t2i"):
        row = rows[task]
        score, chance, n = row["metrics"][row["primary"]], row["chance"], row["queries"]
        assert score > chance + 3 * math.sqrt(chance * (1 - chance) / n), (task, score, chance, n)


def test_transform_names_match_the_training_instructions():
    """The query strings used above are the ones the model was trained on."""
    assert Transform("rotate", (90, True)).instruction == "rotate 90 degrees clockwise"
