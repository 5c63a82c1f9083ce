"""A SPARC checkpoint through the real CLI: index build and search in both fusion modes, fine-grained
re-ranking, the --explain sheet, the fusion-mode checks, and the eval row of the re-ranker."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from evaluation.data import make_data
from evaluation.evaluate import run_eval
from retrieval.encoders.registry import load_encoder
from retrieval.explain import CELL, LABEL
from retrieval.rerank import RERANK_WEIGHT
from retrieval.training.run import fresh_encoder
from tests.conftest import run_cli


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """sparc-tiny with its seeded initial weights and the bundled tokenizer, saved as a checkpoint folder."""
    return fresh_encoder("sparc-tiny", None).save(tmp_path_factory.mktemp("sparc") / "ckpt")


@pytest.fixture(scope="module")
def gallery(shapes_corpus, tmp_path_factory) -> Path:
    """A manifest of the corpus's images alone (no texts): what composed queries search."""
    rows = [json.loads(line) for line in shapes_corpus.read_text().splitlines()][:120]
    path = tmp_path_factory.mktemp("gallery") / "images.jsonl"
    path.write_text("".join(json.dumps({"id": r["id"], "image": str(shapes_corpus.parent / r["image"]),
                                        "colours": r["colours"]}) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def index(checkpoint, gallery, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("index") / "idx"
    run_cli("index", "build", gallery, "--model", checkpoint, "--out", out, "--device", "cpu", "--workers", "0")
    return out


def _search(index: Path, *args: str | Path) -> list[dict]:
    return json.loads(run_cli("search", "--index", index, "--json", "--device", "cpu", *args).stdout)


def test_both_fusion_modes_answer_composed_queries_from_one_index(index, gallery, checkpoint):
    """An index of images serves both modes: the composed query's vector differs, the gallery's does not,
    and each mode's scores are the inner products of its own query vector with the stored unit vectors."""
    image = json.loads(gallery.read_text().splitlines()[3])["image"]
    query = ("--image", image, "--text", "rotate 90 degrees clockwise", "-k", "5")
    hits = {mode: _search(index, *query, "--fusion", mode) for mode in ("score", "head")}
    from retrieval.search import open_index

    searcher = open_index(index, device="cpu")
    stored = searcher.store.read_vectors(np.arange(searcher.index.ntotal, dtype=np.int64))
    assert np.allclose(np.linalg.norm(stored, axis=1), 1, atol=1e-5)
    vectors = {}
    for mode in ("score", "head"):
        encoder = load_encoder(checkpoint, device="cpu", fusion=mode)
        vectors[mode] = encoder.encode(images=[image], texts=["rotate 90 degrees clockwise"])[0]
        assert abs(np.linalg.norm(vectors[mode]) - 1) < 1e-5
        expected = np.sort(stored @ vectors[mode])[::-1][:5]
        assert np.allclose([h["score"] for h in hits[mode]], expected, atol=1e-4)
    assert not np.allclose(vectors["score"], vectors["head"])


def test_rerank_reorders_the_best_images_by_fine_grained_alignment(index, checkpoint):
    """--rerank N: the best N first-stage images re-scored by (1 − w)·global + w·local, sorted."""
    text = "a large red circle in the center"
    first = _search(index, "--text", text, "-k", "8")
    reranked = _search(index, "--text", text, "-k", "8", "--rerank", "8")
    assert sorted(h["id"] for h in reranked) == sorted(h["id"] for h in first)
    encoder = load_encoder(checkpoint, device="cpu")
    local = encoder.local_scores(text, [h["image"] for h in first])
    combined = {h["id"]: (1 - RERANK_WEIGHT) * h["score"] + RERANK_WEIGHT * s for h, s in zip(first, local)}
    assert [h["id"] for h in reranked] == sorted(combined, key=combined.get, reverse=True)
    assert np.allclose([h["score"] for h in reranked], [combined[h["id"]] for h in reranked], atol=1e-4)


def test_explain_draws_each_word_over_each_hit(index, checkpoint, tmp_path):
    """One row per hit, one column per word piece of the query (plus the hit itself)."""
    out = tmp_path / "explain.png"
    hits = _search(index, "--text", "a small blue square", "-k", "3", "--explain", out)
    words = load_encoder(checkpoint, device="cpu").alignment("a small blue square", [hits[0]["image"]])[0]
    assert "".join(words) == "asmallbluesquare"
    with Image.open(out) as sheet:
        assert sheet.format == "PNG"
        assert sheet.size == (CELL * (len(words) + 1), LABEL + (CELL + LABEL) * len(hits))


@pytest.mark.parametrize("args, message", [
    (("--image", "{image}", "--rerank", "5"), "give a --text and no --image"),
    (("--image", "{image}", "--explain", "{out}"), "--explain needs a query --text"),
    (("--text", "a red circle", "--fusion", "sum"), "fusion mode must be one of score, head"),
    (("--text", "a red circle", "--rerank", "-1"), "--rerank must be ≥ 0"),
])
@pytest.mark.slow
def test_bad_search_options_get_one_clear_line(index, gallery, tmp_path, args, message):
    image = json.loads(gallery.read_text().splitlines()[0])["image"]
    args = [a.format(image=image, out=tmp_path / "x.png") for a in args]
    proc = run_cli("search", "--index", index, "--device", "cpu", *args, check=False)
    assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "x.png").exists()


@pytest.mark.slow
def test_a_store_of_composed_items_keeps_its_fusion_mode(shapes_corpus, checkpoint, tmp_path):
    """Items with an image and a text are embedded by the fusion mode: searching them with the other mode is
    refused; the mode recorded at build time is the default."""
    run_cli("index", "build", shapes_corpus, "--model", checkpoint, "--out", tmp_path / "idx", "--device", "cpu",
            "--workers", "0", "--fusion", "head")
    assert json.loads((tmp_path / "idx" / "index.json").read_text())["encoder"]["fusion_mode"] == "head"
    assert _search(tmp_path / "idx", "--text", "a red circle", "-k", "2")
    proc = run_cli("search", "--index", tmp_path / "idx", "--text", "a red circle", "--fusion", "score",
                   "--device", "cpu", check=False)
    assert proc.returncode == 2 and "embedded with fusion 'head'" in proc.stderr


def test_early_fusion_models_have_no_fusion_option(gallery, tmp_path):
    proc = run_cli("index", "build", gallery, "--model", "test-tiny", "--out", tmp_path / "idx", "--fusion", "head",
                   check=False)
    assert proc.returncode == 2 and "has no fusion modes" in proc.stderr
    assert not (tmp_path / "idx" / "index.json").exists()


@pytest.mark.slow
def test_eval_adds_a_rerank_row_for_text_to_image_tasks(checkpoint, tmp_path):
    data = make_data("digits", tmp_path / "digits", n=120, train_pairs=False, progress=False).parent
    report = run_eval("t2i,zeroshot", str(checkpoint), data=[data], device="cpu", progress=False, rerank=10)
    rows = {(r["fusion"], r["task"]) for r in report["results"]}
    assert rows == {("score", "t2i"), ("score", "zeroshot"), ("head", "t2i"), ("head", "zeroshot"),
                    ("rerank@10", "t2i")}
    by = {(r["fusion"], r["task"]): r["metrics"] for r in report["results"]}
    assert by[("score", "t2i")] == by[("head", "t2i")]  # no composed item in t2i: the modes agree
    # re-ranking only reorders each query's best 10: hit@k beyond 10 cannot change
    assert by[("rerank@10", "t2i")]["hit@10"] == by[("score", "t2i")]["hit@10"]
