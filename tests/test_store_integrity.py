"""A damaged store part never yields wrong scores unnoticed: opening for search checks each part's size and
footer checksum, every read checks page checksums and unit norms, and `retrieval store verify` checks the whole
of every file. Each damage keeps the part's size and modification time, as a flipped bit on disk would."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import run_cli

import retrieval
from retrieval import RetrievalError
from retrieval.encode import encode_corpus
from retrieval.indexing import build_index_folder
from retrieval.store import TAIL_BYTES, EmbeddingStore, tail_sha256

N = 1200  # two parts of 600 items: each part is larger than TAIL_BYTES, so its head is not in the cheap check


@pytest.fixture(scope="module")
def big_store(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("integrity")
    (root / "corpus.jsonl").write_text("".join(
        json.dumps({"id": f"t{i}", "text": f"caption number {i} of a {['red', 'blue'][i % 2]} scene"}) + "\n"
        for i in range(N)))
    out = root / "store"
    encode_corpus(root / "corpus.jsonl", out, "test-tiny", workers=0, part_size=600, progress=False)
    assert all(p.stat().st_size > 2 * TAIL_BYTES for p in EmbeddingStore(out).part_paths)
    build_index_folder(out, root / "index", index_key="Flat", progress=False)
    return out


@pytest.fixture
def copy(big_store, tmp_path) -> tuple[Path, Path]:
    store, index = tmp_path / "store", tmp_path / "index"
    shutil.copytree(big_store, store)
    shutil.copytree(big_store.parent / "index", index)
    info = json.loads((index / "index.json").read_text())
    (index / "index.json").write_text(json.dumps(info | {"store": info["store"] | {"path": str(store)}}))
    return store, index


def flip_byte(path: Path, offset: int) -> None:
    """Flip one byte in place, keeping the file's size and mtime."""
    st = path.stat()
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)[0]
        f.seek(offset)
        f.write(bytes([byte ^ 0x10]))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert path.stat().st_size == st.st_size


def column_offset(path: Path, column: str) -> int:
    """A byte in the middle of a column's pages in the first row group."""
    meta = pq.ParquetFile(path).metadata.row_group(0)
    chunk = next(meta.column(i) for i in range(meta.num_columns) if meta.column(i).path_in_schema.startswith(column))
    start = min(chunk.data_page_offset, chunk.dictionary_page_offset or chunk.data_page_offset)
    return start + chunk.total_compressed_size // 2


def test_a_flipped_byte_in_the_footer_is_refused_on_open(copy):
    store, index = copy
    part = EmbeddingStore(store).part_paths[1]
    flip_byte(part, part.stat().st_size - 20)
    with pytest.raises(RetrievalError, match=rf"store .* is damaged \({part.name}: its footer checksum differs"):
        retrieval.open_index(index, device="cpu")
    proc = run_cli("search", "--index", index, "--text", "a red scene", check=False)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1 and part.name in proc.stderr


@pytest.mark.parametrize("column", ["embedding", "id"])
def test_a_flipped_byte_in_a_data_page_is_refused_when_read(copy, column):
    store, index = copy
    part = EmbeddingStore(store).part_paths[0]
    flip_byte(part, column_offset(part, column))
    searcher = retrieval.open_index(index, device="cpu")  # the cheap check cannot see the head of a big part
    with pytest.raises(RetrievalError, match=rf"part .*{part.name} is damaged"):
        if column == "embedding":
            searcher.search(text="a red scene", k=5, where="id LIKE 't1%'")  # exact search reads the vectors
        else:
            searcher.search(text="a red scene", k=5)  # the hits' metadata is read


def test_a_vector_that_is_not_unit_is_refused_not_scored(copy):
    """Damage that page checksums cannot see (a part rewritten whole, its checksums recorded again, as a
    store from before page checksums could be): the norm check still refuses it."""
    store, index = copy
    part = EmbeddingStore(store).part_paths[0]
    table = pq.read_table(part)
    vectors = np.stack(table["embedding"].to_numpy(zero_copy_only=False)).astype(np.float32)
    vectors[3] *= 7.57
    column = pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1)), vectors.shape[1])
    pq.write_table(table.set_column(table.column_names.index("embedding"), "embedding", column), part)
    manifest = json.loads((store / "manifest.json").read_text())
    entry = manifest["parts"][0]
    entry |= {"bytes": part.stat().st_size, "tail_sha256": tail_sha256(part)}
    (store / "manifest.json").write_text(json.dumps(manifest))
    searcher = retrieval.open_index(index, device="cpu", model="test-tiny")
    with pytest.raises(RetrievalError, match="not unit vectors"):
        searcher.search_vectors(vectors[3:4] / 7.57, 5, where="row < 100")
    assert EmbeddingStore(store).damaged_parts(full=True)


def test_store_verify_checks_every_byte(copy):
    store, _ = copy
    proc = run_cli("store", "verify", store)
    assert proc.stdout.strip().endswith(f"2 parts, {N} vectors, all intact")
    part = EmbeddingStore(store).part_paths[0]
    flip_byte(part, column_offset(part, "text"))
    assert EmbeddingStore(store).damaged_parts() == []  # the cheap check does not reach it ...
    proc = run_cli("store", "verify", store, check=False)  # ... the full one does
    assert proc.returncode == 2
    assert f"damaged: {part.name}: its checksum differs from the manifest" in proc.stdout
    assert proc.stderr.strip() == f"error: store {store}: 1 of 2 parts are damaged; encode the corpus again into a " \
                                  "new folder"


EDITS = ["not JSON", "a list", "count off", "a part outside the folder", "no parts", "a part without checksums",
         "extra_columns a number", "extra_columns of objects", "another dim", "deep nesting", "complete a string",
         "negative count", "extra_columns naming row", "a part listed twice"]


@pytest.mark.parametrize("edit", EDITS)
def test_a_malformed_store_manifest_is_one_clear_error(copy, edit):
    store, index = copy
    manifest = json.loads((store / "manifest.json").read_text())
    text = {
        "not JSON": "{",
        "a list": "[]",
        "count off": json.dumps(manifest | {"count": N + 1}),
        "a part outside the folder": json.dumps(manifest | {"parts": [manifest["parts"][0] | {"file": "../x.parquet"}]
                                                            + manifest["parts"][1:]}),
        "no parts": json.dumps({k: v for k, v in manifest.items() if k != "parts"}),
        "a part without checksums": json.dumps(manifest | {"parts": [
            {k: v for k, v in manifest["parts"][0].items() if k != "sha256"}] + manifest["parts"][1:]}),
        "extra_columns a number": json.dumps(manifest | {"extra_columns": 5}),
        "extra_columns of objects": json.dumps(manifest | {"extra_columns": [{}]}),
        "another dim": json.dumps(manifest | {"dim": 7}),
        "deep nesting": "[" * 100_000 + "]" * 100_000,
        "complete a string": json.dumps(manifest | {"complete": "false"}),
        "negative count": json.dumps(manifest | {"count": -5, "parts": []}),
        "extra_columns naming row": json.dumps(manifest | {"extra_columns": ["row"]}),
        "a part listed twice": json.dumps(manifest | {"parts": [manifest["parts"][0], manifest["parts"][0] | {
            "rows": [600, 1200]}]}),
    }[edit]
    (store / "manifest.json").write_text(text)
    proc = run_cli("store", "verify", store, check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    error = proc.stderr.strip().splitlines()[-1]
    assert error.startswith("error: ") and "manifest" in error + proc.stdout, proc.stderr
    with pytest.raises(RetrievalError):
        retrieval.open_index(index, device="cpu")


def test_store_verify_checks_row_ids_against_the_manifest(copy):
    """A part whose row ids are not its manifest range (rewritten whole, its checksums recorded again) would
    give hits the wrong metadata: the footer's row-id statistics give it away, to the cheap check too."""
    store, _ = copy
    part = EmbeddingStore(store).part_paths[1]
    table = pq.read_table(part)
    pq.write_table(table.set_column(0, "row", pa.array(np.arange(len(table), dtype=np.int64))), part)
    manifest = json.loads((store / "manifest.json").read_text())
    manifest["parts"][1] |= {"sha256": hashlib.sha256(part.read_bytes()).hexdigest(), "bytes": part.stat().st_size,
                             "tail_sha256": tail_sha256(part)}
    (store / "manifest.json").write_text(json.dumps(manifest))
    proc = run_cli("store", "verify", store, check=False)
    assert proc.returncode == 2 and \
        f"damaged: {part.name}: its row ids 0 to 599 do not match the manifest's range [600, 1200]" in proc.stdout
    assert EmbeddingStore(store).damaged_parts() == [f"{part.name}: its row ids 0 to 599 do not match the "
                                                     "manifest's range [600, 1200]"]
