"""FDT sparse codes stored by `encode --sparse-codes`, the embeddings rebuilt from them, and `search --explain`."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import run_cli
from PIL import Image
from test_fdt import CODEBOOK, cli_in_process, tiny_encoder

from retrieval.encoders.fdt import CODE_COLUMNS
from retrieval.encoders.registry import load_encoder

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny models: one thread


# ---------------------------------------------------------------- 5. sparse codes in the store


@pytest.fixture(scope="module")
def checkpoint(tok, tmp_path_factory) -> Path:
    """A tiny FDT (T = 1, so the codes are sparse) with random weights, saved as a checkpoint folder."""
    return tiny_encoder(tok, seed=4, temperature=1.0).save(tmp_path_factory.mktemp("fdt") / "ckpt")


@pytest.fixture(scope="module")
def manifest(pictures, tmp_path_factory) -> Path:
    """12 items: 4 images alone, 4 texts alone, 4 images with a text."""
    names = list(pictures)
    rows = [{"id": f"img{i}", "image": pictures[names[i]]} for i in range(4)]
    rows += [{"id": f"txt{i}", "text": t} for i, t in enumerate(["a red square", "a green circle", "blue",
                                                                 "a yellow circle left of a red square"])]
    rows += [{"id": f"both{i}", "image": pictures[names[4 + i]], "text": t}
             for i, t in enumerate(["make it red", "make it a square", "what colour is it?", "bigger"])]
    path = tmp_path_factory.mktemp("corpus") / "corpus.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def stores(checkpoint, manifest, tmp_path_factory) -> dict[str, Path]:
    """The manifest encoded with sparse codes in both fusion modes (2 parts of 7 and 5, batches of 4)."""
    out = {}
    for mode in ("score", "head"):
        out[mode] = tmp_path_factory.mktemp(f"store-{mode}") / "store"
        run_cli("encode", manifest, "--model", checkpoint, "--out", out[mode], "--sparse-codes", "--workers", "0",
                "--device", "cpu", "--batch-size", "4", "--part-size", "7", "--fusion", mode)
    return out


def read_rows(store: Path) -> list[dict]:
    import duckdb

    result = duckdb.sql(f"select * from read_parquet('{store}/part-*.parquet') order by row").arrow()
    table = result.read_all() if hasattr(result, "read_all") else result
    return table.to_pylist()


def _dense(ids: list[int] | None, weights: list[float] | None) -> np.ndarray:
    code = np.zeros(CODEBOOK)
    if ids is not None:
        code[ids] = weights
    return code


def _unit(v: np.ndarray) -> np.ndarray:
    return v / np.linalg.norm(v)


def test_stored_codes_rebuild_the_stored_embeddings(stores, checkpoint, manifest):
    rows = {mode: read_rows(store) for mode, store in stores.items()}
    items = [json.loads(line) for line in manifest.read_text().splitlines()]
    enc = load_encoder(checkpoint, device="cpu")
    codebook = enc.model.space_dict.detach().double().numpy()
    for mode in ("score", "head"):
        assert [r["id"] for r in rows[mode]] == [i["id"] for i in items]
        assert [r["row"] for r in rows[mode]] == list(range(12))
        for row, item in zip(rows[mode], items):
            for side in ("image", "text"):
                ids, weights = row[f"{side}_code_ids"], row[f"{side}_code_weights"]
                if item.get(side) is None:
                    assert ids is None and weights is None, (row["id"], side)
                    continue
                assert len(ids) == len(weights) >= 1 and len(set(ids)) == len(ids)
                assert all(0 <= i < CODEBOOK for i in ids) and all(w > 0 for w in weights)
                assert sum(weights) == pytest.approx(1.0, abs=1e-5)
                # the stored code is the item's code, as `codes` computes it
                code = (enc.codes(images=[item["image"]]) if side == "image" else enc.codes(texts=[item["text"]]))[0]
                np.testing.assert_allclose(_dense(ids, weights), code.numpy(), atol=1e-6)
        assert sum(r["image_code_ids"] is not None and r["text_code_ids"] is not None for r in rows[mode]) == 4
        assert any(len(r["text_code_ids"] or []) < CODEBOOK // 2 for r in rows[mode])  # sparse at T = 1

        # vectors_from_codes: the store's own embeddings, from the codes alone
        enc.fusion_mode = mode
        stored = np.array([r["embedding"] for r in rows[mode]], dtype=np.float64)
        rebuilt = enc.vectors_from_codes(rows[mode])
        assert rebuilt.shape == (12, 32)
        np.testing.assert_allclose(rebuilt.numpy(), stored, atol=1e-5)

    # score mode by hand from the codebook: f = Eᵀw; image alone n(f_I), as the official code; both n(n(f_I) + n(f_T))
    for row in rows["score"]:
        image = _dense(row["image_code_ids"], row["image_code_weights"]) @ codebook
        text = _dense(row["text_code_ids"], row["text_code_weights"]) @ codebook
        if row["image_code_ids"] is None:
            expected = _unit(text)
        else:
            expected = _unit(_unit(image) + (_unit(text) if row["text_code_ids"] is not None else 0))
        np.testing.assert_allclose(row["embedding"], expected, atol=1e-5)
    # the modes differ only on items with both an image and a text
    for score_row, head_row in zip(rows["score"], rows["head"]):
        both = score_row["image_code_ids"] is not None and score_row["text_code_ids"] is not None
        close = np.allclose(score_row["embedding"], head_row["embedding"], atol=1e-6)
        assert close != both, score_row["id"]
        for column in CODE_COLUMNS:
            assert score_row[column] == head_row[column]


def test_code_columns_are_not_metadata(stores):
    from retrieval.store import EmbeddingStore

    store = EmbeddingStore(stores["score"])
    assert store.manifest["extra_columns"] == list(CODE_COLUMNS)
    columns = store.metadata().column_names
    assert "id" in columns and not set(CODE_COLUMNS) & set(columns) and "embedding" not in columns
    assert len(store.manifest["parts"]) == 2


def test_sparse_codes_of_a_model_without_codes_are_refused(manifest, tmp_path, capsys):
    code, stderr = cli_in_process(capsys, "encode", manifest, "--model", "test-tiny", "--out", tmp_path / "store",
                                  "--sparse-codes", "--workers", "0", "--device", "cpu")
    assert code == 2 and "Traceback" not in stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and "test-tiny has no sparse codes" in lines[0], stderr
    assert not (tmp_path / "store").exists()


# ---------------------------------------------------------------- 8. --explain


@pytest.mark.slow  # an index build and a CLI search: 6 s
def test_explain_draws_the_strongest_tokens_of_each_hit(stores, tmp_path):
    from retrieval.explain import CELL, LABEL, TOP_TOKENS
    from retrieval.indexing import build_index_folder

    index = tmp_path / "idx"
    build_index_folder(stores["score"], index, device="cpu", progress=False)
    out = tmp_path / "explain.png"
    k = 4
    proc = run_cli("search", "--index", index, "--text", "a red square", "-k", str(k), "--json", "--device", "cpu",
                   "--explain", out)
    hits = json.loads(proc.stdout)
    assert len(hits) == k
    with Image.open(out) as sheet:
        assert sheet.format == "PNG"
        assert sheet.size == (CELL * (TOP_TOKENS + 1), (CELL + 2 * LABEL) * k)
        pixels = np.asarray(sheet.convert("RGB"))
    for i, hit in enumerate(hits):  # an image hit: its picture, then the heatmap of its strongest token
        top = i * (CELL + 2 * LABEL)
        first_token = pixels[top:top + CELL, CELL:2 * CELL]
        assert (first_token != 255).any() == bool(hit.get("image")), hit
