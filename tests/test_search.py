"""End to end: `retrieval index build` then `retrieval search` (and `retrieval.open_index`) on ShapesWorld.

Indexes are built by the real CLI from the session's test-tiny store (or its corpus), queries are embedded
by the real test-tiny forward pass, and every answer is checked against the corpus and the store's vectors.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from conftest import run_cli

import retrieval
import retrieval.search as search_module
from retrieval import RetrievalError
from retrieval.encoders import load_encoder
from retrieval.store import EmbeddingStore

KINDS = {  # name: (source, extra build arguments, factory FAISS should get, search_params prefix)
    "store-auto": ("store", ["--index-key", "auto"], "IDMap2,Flat", ""),
    "corpus-auto": ("corpus", ["--model", "test-tiny", "--index-key", "auto", "--workers", "0"], "IDMap2,Flat", ""),
    "store-hnsw": ("store", ["--index-key", "HNSW32"], "IDMap2,HNSW32", "efSearch="),
    "store-ivf": ("store", ["--index-key", "IVF8,Flat"], "IVF8,Flat", "nprobe="),
}
METADATA = {"split", "n_objects", "shapes", "colours", "background"}


# ---------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def records(shapes_corpus) -> list[dict]:
    """The corpus rows in order, with absolute image paths; no item is skipped, so row == position."""
    rows = [json.loads(line) for line in shapes_corpus.read_text().splitlines() if line.strip()]
    for r in rows:
        r["image"] = str((shapes_corpus.parent / r["image"]).resolve())
    return rows


@pytest.fixture(scope="module")
def unique_items(records) -> list[dict]:
    """Items whose (image bytes, text) pair occurs once in the corpus (ShapesWorld may repeat a scene)."""
    keys = [(hashlib.sha256(Path(r["image"]).read_bytes()).hexdigest(), r["text"]) for r in records]
    counts = Counter(keys)
    unique = [dict(r, row=i) for i, (r, key) in enumerate(zip(records, keys)) if counts[key] == 1]
    assert len(unique) >= 20
    return unique


def pick(unique_items, split: str | None = None, nth: int = 0) -> dict:
    items = [r for r in unique_items if split is None or r["split"] == split]
    return items[nth % len(items)]


@pytest.fixture(scope="module")
def built(shapes_store, shapes_corpus, tmp_path_factory):
    """Build each index kind once, through the CLI, on first use; returns (index folder, CLI stdout)."""
    cache: dict[str, tuple[Path, str]] = {}
    root = tmp_path_factory.mktemp("indexes")

    def get(kind: str) -> tuple[Path, str]:
        if kind not in cache:
            source, extra, _, _ = KINDS[kind]
            out = root / kind
            proc = run_cli("index", "build", shapes_store if source == "store" else shapes_corpus, "--out", out,
                           *extra)
            cache[kind] = (out, proc.stdout)
        return cache[kind]

    return get


@pytest.fixture(scope="module")
def encoder():
    return load_encoder("test-tiny", device="cpu")


def search_json(index: Path, item: dict | None = None, k: int = 5, *extra: str, text: str | None = None,
                image: str | None = None) -> list[dict]:
    args = ["search", "--index", index, "-k", str(k), "--json", *extra]
    image = image if image is not None else (item["image"] if item else None)
    text = text if text is not None else (item["text"] if item else None)
    if image:
        args += ["--image", image]
    if text:
        args += ["--text", text]
    proc = run_cli(*args)
    assert "Traceback" not in proc.stderr
    return json.loads(proc.stdout)


def check_hits_against_corpus(hits: list[dict], records: list[dict], k: int) -> None:
    """Ranks 1..k, scores descending, and every field equal to the corpus row the hit names."""
    assert [h["rank"] for h in hits] == list(range(1, len(hits) + 1))
    scores = [h["score"] for h in hits]
    assert all(isinstance(s, float) for s in scores)
    assert scores == sorted(scores, reverse=True)
    assert len({h["row"] for h in hits}) == len(hits)
    for h in hits:
        assert set(h) == {"rank", "score", "id", "row", "image", "text"} | METADATA
        rec = records[h["row"]]
        assert h["id"] == rec["id"] and h["text"] == rec["text"]
        assert str(Path(h["image"]).resolve()) == rec["image"]
        assert (h["split"], h["n_objects"], h["shapes"]) == (rec["split"], rec["n_objects"], rec["shapes"])


def brute_force(index: retrieval.search.SearchIndex, query: np.ndarray, allowed: np.ndarray, k: int):
    """Exact top-k of `query` over the store's vectors of `allowed` rows, from the Parquet store itself."""
    vectors = index.store.read_vectors(allowed)
    scores = vectors @ query[0]
    top = np.argsort(-scores, kind="stable")[:k]
    return scores[top], allowed[top]


def allowed_rows(records: list[dict], predicate) -> np.ndarray:
    return np.array([i for i, r in enumerate(records) if predicate(r)], dtype=np.int64)


def assert_refused(proc, *fragments: str) -> None:
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    err = proc.stderr.strip()
    assert "Traceback" not in proc.stderr, proc.stderr
    assert err.startswith("error: ") and len(err.splitlines()) == 1, err
    for fragment in fragments:
        assert fragment.lower() in err.lower(), err


# ---------------------------------------------------------------------------------------------- building


@pytest.mark.parametrize("kind", list(KINDS))
def test_index_json_records_what_search_needs(kind, built, shapes_store, encoder):
    index, stdout = built(kind)
    info = json.loads((index / "index.json").read_text())
    _, extra, factory, params = KINDS[kind]
    key = extra[extra.index("--index-key") + 1]
    assert info["factory"] == factory
    assert info["index_key"] == ("Flat" if key == "auto" else key)
    assert (info["count"], info["dim"], info["metric"]) == (300, 64, "inner_product")
    if params:
        assert info["search_params"].startswith(params) and info["search_params"].split("=")[1].isdigit()
    else:
        assert info["search_params"] == ""
    assert info["ann_recall@10"] >= info["target_recall"] == 0.95
    assert info["ann_recall_queries"] == 30  # a tenth of the store, held out of the index while tuning
    assert info["encoder"]["name"] == "test-tiny"
    assert info["encoder"]["weights_sha256"] == encoder.weights_sha256
    index_file = index / info["file"]
    assert index_file.stat().st_size == info["index_bytes"] > 0
    assert hashlib.sha256(index_file.read_bytes()).hexdigest() == info["file_sha256"]
    assert sorted(p.name for p in index.glob("*.faiss")) == [info["file"]]
    store_path = Path(info["store"]["path"])
    if kind.startswith("corpus"):
        assert store_path == Path("store"), "a store inside the index folder is recorded relative to it"
        store = EmbeddingStore(index / "store")
    else:
        assert store_path == shapes_store.resolve()
        store = EmbeddingStore(shapes_store)
    assert info["store"]["fingerprint"] == store.fingerprint()
    assert info["store"]["count"] == store.count == 300
    assert f"{info['index_key']} over 300 vectors (dim 64)" in stdout


# ---------------------------------------------------------------------------------------------- self-retrieval


@pytest.mark.parametrize("kind", [kind if kind == "store-auto" else pytest.param(kind, marks=pytest.mark.slow)
                                  for kind in KINDS])  # one CLI search per index kind: the fast lane keeps one
def test_cli_self_retrieval(kind, built, unique_items, records):
    index, _ = built(kind)
    for item in (pick(unique_items, "train", 3), pick(unique_items, "test", 1)):
        hits = search_json(index, item, 5)
        assert len(hits) == 5
        assert hits[0]["id"] == item["id"] and hits[0]["row"] == item["row"], (item["id"], hits[:2])
        assert hits[0]["score"] > 0.999
        assert hits[1]["score"] < hits[0]["score"]
        check_hits_against_corpus(hits, records, 5)


def test_cli_table_output(built, unique_items):
    index, _ = built("store-auto")
    item = pick(unique_items, "val", 2)
    proc = run_cli("search", "--index", index, "--image", item["image"], "--text", item["text"], "-k", "3")
    lines = proc.stdout.splitlines()
    assert lines[0].split()[:3] == ["rank", "score", "id"]
    assert len(lines) == 4
    first = lines[1].split()
    assert first[0] == "1" and float(first[1]) > 0.999 and first[2] == item["id"]
    assert str(Path(lines[1].split()[-1]).resolve()) == item["image"]
    assert [line.split()[0] for line in lines[1:]] == ["1", "2", "3"]


@pytest.mark.parametrize("kind", list(KINDS))
def test_python_api_self_retrieval(kind, built, unique_items, records, encoder):
    index = retrieval.open_index(built(kind)[0], device="cpu")
    assert index.encoder.weights_sha256 == encoder.weights_sha256
    everything = np.arange(300, dtype=np.int64)
    for item in unique_items[::4][:12]:
        hits = index.search(image=item["image"], text=item["text"], k=5)
        assert len(hits) == 5 and hits[0].id == item["id"] and hits[0].row == item["row"]
        assert hits[0].score > 0.999
        check_hits_against_corpus([h.to_dict() for h in hits], records, 5)
        # the scores are inner products with the stored vectors of the query the test embeds itself
        query = encoder.encode(images=[item["image"]], texts=[item["text"]])
        stored = index.store.read_vectors(np.array([h.row for h in hits]))
        np.testing.assert_allclose([h.score for h in hits], stored @ query[0], atol=1e-4)
        if kind.endswith("auto"):  # exact indexes: the very same list as brute force over the store
            want_scores, want_rows = brute_force(index, query, everything, 5)
            assert [h.row for h in hits] == want_rows.tolist()


@pytest.mark.parametrize("kind", list(KINDS))
def test_k_as_large_as_the_store_returns_every_item(kind, built):
    """-k N on an N-item index returns all N items, as a filter that matches everything already does."""
    index = retrieval.open_index(built(kind)[0], device="cpu")
    assert len(index.search(text="a red circle", k=300, where="n_objects > 0")) == 300
    for k in (300, 1000):
        hits = index.search(text="a red circle", k=k)
        assert sorted(h.row for h in hits) == list(range(300)), f"{kind}: {len(hits)} of 300 items for k={k}"


def test_moved_index_folder_still_opens(built, unique_items, tmp_path):
    """An index built from a corpus keeps its store inside the folder, recorded by a relative path."""
    moved = tmp_path / "moved"
    shutil.copytree(built("corpus-auto")[0], moved)
    item = pick(unique_items, "test", 4)
    hits = retrieval.open_index(moved, device="cpu").search(image=item["image"], text=item["text"], k=1)
    assert hits[0].id == item["id"] and hits[0].score > 0.999


# ---------------------------------------------------------------------------------------------- filters


@pytest.mark.parametrize("kind", ["store-auto", "store-hnsw"])
@pytest.mark.slow
def test_cli_where_filters(kind, built, unique_items, records):
    index, _ = built(kind)
    item = pick(unique_items, "test", 2)
    hits = search_json(index, item, 5, "--where", "split = 'test'")
    assert len(hits) == 5 and hits[0]["id"] == item["id"]
    assert all(records[h["row"]]["split"] == "test" for h in hits)
    check_hits_against_corpus(hits, records, 5)

    matching = {r["id"] for r in records if r["n_objects"] == 3 and r["split"] == "val"}
    assert 0 < len(matching) < 50
    hits = search_json(index, item, 50, "--where", "n_objects = 3 AND split = 'val'")
    assert {h["id"] for h in hits} == matching and len(hits) == len(matching)
    check_hits_against_corpus(hits, records, len(matching))

    if kind == "store-auto":
        assert search_json(index, item, 5, "--where", "n_objects = 99") == []
        proc = run_cli("search", "--index", index, "--text", item["text"], "--where", "split = 'nowhere'")
        assert "no results" in proc.stdout and item["id"] not in proc.stdout


@pytest.mark.parametrize("kind", list(KINDS))
def test_python_where_is_exact_over_allowed_rows(kind, built, unique_items, records, encoder):
    """Default path: few allowed rows → exact search over just them, even on an approximate index."""
    index = retrieval.open_index(built(kind)[0], device="cpu")
    item = pick(unique_items, "val", 5)
    query = encoder.encode(images=[item["image"]], texts=[item["text"]])
    for where, predicate in (("split = 'val'", lambda r: r["split"] == "val"),
                             ("n_objects = 3 AND split = 'val'", lambda r: r["n_objects"] == 3 and r["split"] == "val"),
                             ("n_objects >= 2 AND shapes LIKE '%star%'",
                              lambda r: r["n_objects"] >= 2 and "star" in r["shapes"])):
        allowed = allowed_rows(records, predicate)
        for k in (3, 7, 50):
            hits = index.search(image=item["image"], text=item["text"], k=k, where=where)
            want_scores, want_rows = brute_force(index, query, allowed, k)
            assert len(hits) == min(k, len(allowed))
            assert [h.row for h in hits] == want_rows.tolist(), (where, k)
            np.testing.assert_allclose([h.score for h in hits], want_scores, atol=1e-4)
    assert index.search(text=item["text"], k=5, where="n_objects = 99") == []
    assert index.search(text=item["text"], k=5, where="   ") != []  # a blank filter is no filter


@pytest.mark.parametrize("kind", ["store-auto", "store-hnsw", "store-ivf"])
@pytest.mark.parametrize("path", ["selector", "over-fetch"])
def test_python_where_through_the_faiss_index(kind, path, built, unique_items, records, encoder, monkeypatch):
    """EXACT_FILTER_MAX = 0 sends filters through FAISS: an id selector, or over-fetch and filter."""
    monkeypatch.setattr(search_module, "EXACT_FILTER_MAX", 0)
    if path == "over-fetch":
        monkeypatch.setattr(search_module, "selector_params", lambda *args: None)
    exact_calls = []
    real_exact = search_module.SearchIndex._exact_search

    def spy(self, queries, allowed, k):
        exact_calls.append(len(allowed))
        return real_exact(self, queries, allowed, k)

    monkeypatch.setattr(search_module.SearchIndex, "_exact_search", spy)
    index = retrieval.open_index(built(kind)[0], device="cpu")

    for split in ("test", "val"):
        item = pick(unique_items, split, 1)
        query = encoder.encode(images=[item["image"]], texts=[item["text"]])
        allowed = allowed_rows(records, lambda r, s=split: r["split"] == s)
        exact_calls.clear()
        hits = index.search(image=item["image"], text=item["text"], k=5, where=f"split = '{split}'")
        assert len(hits) == 5 and hits[0].id == item["id"] and hits[0].score > 0.999
        assert all(records[h.row]["split"] == split for h in hits)
        assert [h.rank for h in hits] == [1, 2, 3, 4, 5]
        if kind == "store-auto":  # an exact index answers fully through FAISS: no exact fallback needed
            assert exact_calls == []
            want_scores, want_rows = brute_force(index, query, allowed, 5)
            assert [h.row for h in hits] == want_rows.tolist()
            np.testing.assert_allclose([h.score for h in hits], want_scores, atol=1e-4)

    # a very selective filter: still only matching rows, k of them while enough match, all when fewer
    matching = allowed_rows(records, lambda r: r["n_objects"] == 3 and r["split"] == "val")
    assert 3 < len(matching) < 50
    item = pick(unique_items, "val", 3)
    for k in (3, 50):
        hits = index.search(image=item["image"], text=item["text"], k=k, where="n_objects = 3 AND split = 'val'")
        assert len(hits) == min(k, len(matching))
        assert {h.row for h in hits} <= set(matching.tolist())
    assert index.search(text=item["text"], k=5, where="n_objects = 99") == []
    # the same through search_vectors, several queries at once
    queries = encoder.encode(texts=["a red circle", "a small blue star in the center"])
    scores, rows = index.search_vectors(queries, 4, where="split = 'test'")
    assert rows.shape == (2, 4) and np.isin(rows, allowed_rows(records, lambda r: r["split"] == "test")).all()
    assert (np.diff(scores, axis=1) <= 1e-6).all()


# ---------------------------------------------------------------------------------------------- refusals


@pytest.fixture(scope="module")
def corrupt_image(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("bad") / "corrupt.png"
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + b"this is not really a png" * 10)
    return path


@pytest.mark.parametrize("case", ["no-query", "blank-text", "k0", "k-1", "missing-image", "corrupt-image",
                                  "bad-sql", "unknown-column", "no-index"])
@pytest.mark.slow
def test_cli_refusals(case, built, corrupt_image, tmp_path):
    index, _ = built("store-auto")
    args, fragments = {
        "no-query": ([], ["needs an image, a text, or both"]),
        "blank-text": (["--text", "   "], ["needs an image, a text, or both"]),
        "k0": (["--text", "a red circle", "-k", "0"], ["k must be a positive integer, got 0"]),
        "k-1": (["--text", "a red circle", "-k", "-1"], ["k must be a positive integer, got -1"]),
        "missing-image": (["--image", str(tmp_path / "nope.png")], ["image not found", "nope.png"]),
        "corrupt-image": (["--image", str(corrupt_image), "--text", "x"], ["cannot decode image", "corrupt.png"]),
        "bad-sql": (["--text", "a red circle", "--where", "split = = 'x'"], ["invalid --where filter"]),
        "unknown-column": (["--text", "a red circle", "--where", "colour = 'red'"],
                           ["invalid --where filter", "colour"]),
        "no-index": (["--text", "a red circle"], ["is not an index folder"]),
    }[case]
    target = tmp_path / "no-such-index" if case == "no-index" else index
    proc = run_cli("search", "--index", target, *args, check=False)
    assert_refused(proc, *fragments)
    assert proc.stdout.strip() == ""


@pytest.fixture
def copied_store_index(shapes_store, tmp_path):
    """A copy of the session store (so changing it harms no other test) and an index built from it."""
    store = tmp_path / "store"
    shutil.copytree(shapes_store, store)
    index = tmp_path / "index"
    run_cli("index", "build", store, "--out", index)
    return store, index


def test_search_refuses_a_part_file_changed_after_the_build(copied_store_index, unique_items):
    import pyarrow.parquet as pq

    store, index = copied_store_index
    part = EmbeddingStore(store).part_paths[1]
    table = pq.read_table(part)
    embedding = table.column("embedding")
    # the same rows with the vectors in reverse order: a different part, the manifest left as it was
    pq.write_table(table.set_column(table.column_names.index("embedding"), "embedding",
                                    embedding.take(np.arange(len(embedding))[::-1].copy())), part)
    item = pick(unique_items, "train", 0)
    proc = run_cli("search", "--index", index, "--text", item["text"], check=False)
    assert_refused(proc, "is damaged", part.name, "retrieval store verify")


def test_search_refuses_a_store_encoded_again(copied_store_index, shapes_corpus, unique_items):
    from retrieval.encode import encode_corpus

    store, index = copied_store_index
    shutil.rmtree(store)
    encode_corpus(shapes_corpus, store, "test-tiny", batch_size=64, workers=0, part_size=100, progress=False)
    item = pick(unique_items, "train", 0)
    proc = run_cli("search", "--index", index, "--image", item["image"], "--text", item["text"], check=False)
    assert_refused(proc, "changed since this index was built", str(store.name))
    with pytest.raises(RetrievalError, match="changed since this index was built"):
        retrieval.open_index(index, device="cpu")


@pytest.mark.slow
def test_search_refuses_changed_checkpoint_weights(shapes_corpus, unique_items, tmp_path):
    import torch
    from safetensors.torch import load_file, save_file

    checkpoint = load_encoder("test-tiny", device="cpu").save(tmp_path / "ckpt")
    index = tmp_path / "index"
    run_cli("index", "build", shapes_corpus, "--model", checkpoint, "--out", index, "--workers", "0")
    info = json.loads((index / "index.json").read_text())
    assert Path(info["encoder"]["checkpoint"]) == checkpoint.resolve()
    item = pick(unique_items, "test", 3)
    hits = retrieval.open_index(index, device="cpu").search(image=item["image"], text=item["text"], k=1)
    assert hits[0].id == item["id"] and hits[0].score > 0.999

    weights = checkpoint / "model.safetensors"
    state = load_file(str(weights))
    name = sorted(state)[0]
    with torch.no_grad():
        state[name] = state[name] * -1.0
    save_file(state, str(weights))
    proc = run_cli("search", "--index", index, "--image", item["image"], "--text", item["text"], check=False)
    assert_refused(proc, "encoder mismatch", "rebuild the index")


def test_open_index_refuses_another_model(built):
    index, _ = built("store-auto")
    with pytest.raises(RetrievalError, match=r"encoder mismatch.*'test-tiny'.*dim 64.*'test-tiny-128'.*dim 128"):
        retrieval.open_index(index, device="cpu", model="test-tiny-128")
    with pytest.raises(RetrievalError, match="k must be a positive integer"):
        retrieval.open_index(index, device="cpu").search(text="a red circle", k=0)
    with pytest.raises(RetrievalError, match="needs an image, a text, or both"):
        retrieval.open_index(index, device="cpu").search(k=3)


# ---------------------------------------------------------------------------------------------- metadata


def test_metadata_columns_named_like_result_fields_do_not_hide_rank_and_score(tmp_path):
    """A corpus column called `score` or `rank` must not replace the search's own rank and score in --json.

    Either the corpus is refused with a clear message, or the results keep their real rank and score.
    """
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"id": f"t{i}", "text": f"item number {i} of the score test",
                                          "score": "high" if i % 2 else "low", "rank": 10 * i}) + "\n"
                              for i in range(20)))
    index = tmp_path / "index"
    proc = run_cli("index", "build", corpus, "--model", "test-tiny", "--out", index, "--workers", "0", check=False)
    if proc.returncode != 0:
        assert_refused(proc, "reserved")
        assert "'rank'" in proc.stderr or "'score'" in proc.stderr
        return
    hits = search_json(index, None, 2, text="item number 3 of the score test")
    assert hits[0]["id"] == "t3"
    assert [h["rank"] for h in hits] == [1, 2]
    assert isinstance(hits[0]["score"], float) and hits[0]["score"] > 0.999
