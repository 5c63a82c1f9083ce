"""`retrieval index build --shards N`: an IVF index filled in shards and merged into on-disk lists returns what the
unsharded index returns, is searched without reading its lists into RAM, follows its store and refuses what it
cannot build."""

from __future__ import annotations

import json
import re
import shutil
from contextlib import closing
from pathlib import Path

import faiss
import numpy as np
import pytest
from conftest import durability_calls, kill_at, needs_strace, run_cli

import retrieval.search as search
from retrieval.index_folder import read_index_folder
from retrieval.search import open_index

KEY = "IVF64,SQ8"


@pytest.fixture(scope="module")
def built(vector_store_20k, tmp_path_factory) -> tuple[Path, Path]:
    """The store indexed with the same key unsharded and in 4 shards, by the CLI."""
    root = tmp_path_factory.mktemp("shards")
    run_cli("index", "build", vector_store_20k, "--out", root / "whole", "--index-key", KEY)
    proc = run_cli("index", "build", vector_store_20k, "--out", root / "sharded", "--index-key", KEY, "--shards", "4")
    assert proc.stdout.startswith(f"index {root / 'sharded'}: {KEY} over 20000 vectors")
    return root / "whole", root / "sharded"


def queries(n: int = 50) -> np.ndarray:
    q = np.random.default_rng(1).standard_normal((n, 64)).astype(np.float32)
    return q / np.linalg.norm(q, axis=1, keepdims=True)


def test_shards_return_the_unsharded_top10(built, monkeypatch):
    whole, sharded = built
    (info_w, index_w), (info_s, index_s) = read_index_folder(whole), read_index_folder(sharded)
    centroids = [faiss.extract_index_ivf(i).quantizer.reconstruct_n(0, 64) for i in (index_w, index_s)]
    assert np.array_equal(*centroids), "the two builds trained different quantisers"
    assert info_s["search_params"] == info_w["search_params"] and info_s["shards"] == 4
    assert info_s["ann_recall@10"] == info_w["ann_recall@10"] >= 0.95
    monkeypatch.setattr(search, "EXACT_FILTER_MAX", 1_000)  # so that a filter is searched with an id selector
    with closing(open_index(whole, device="cpu")) as a, closing(open_index(sharded, device="cpu")) as b:
        for where in (None, "id LIKE 'v1%'"):  # the filter selects 11,111 rows
            scores_a, rows_a = a.search_vectors(queries(), 10, where=where)
            scores_b, rows_b = b.search_vectors(queries(), 10, where=where)
            assert np.array_equal(rows_a, rows_b) and (rows_a >= 0).all()
            np.testing.assert_allclose(scores_a, scores_b, rtol=1e-6)


def test_the_cli_searches_a_sharded_index(built):
    whole, sharded = built
    hits = [json.loads(run_cli("search", "--index", folder, "--text", "a red circle", "--k", "10", "--json").stdout)
            for folder in (whole, sharded)]
    assert hits[0] == hits[1] and len(hits[0]) == 10


def mapped_kib(path: Path) -> int:
    """Resident KiB of this process's mappings of `path` (from /proc/self/smaps)."""
    total, inside = 0, False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        if re.match(r"^[0-9a-f]+-[0-9a-f]+ ", line):
            inside = line.endswith(str(path))
        elif inside and line.startswith("Rss:"):
            total += int(line.split()[1])
    return total


def test_the_on_disk_lists_are_mapped_not_read(built):
    _, sharded = built
    info, index = read_index_folder(sharded)
    lists = (sharded / info["lists_file"]).resolve()
    invlists = faiss.downcast_InvertedLists(faiss.extract_index_ivf(index).invlists)
    assert isinstance(invlists, faiss.OnDiskInvertedLists) and invlists.read_only
    assert info["lists_bytes"] == lists.stat().st_size >= 20_000 * (64 + 8)  # SQ8 codes and ids
    assert info["index_bytes"] < info["lists_bytes"] / 10  # the index file: quantiser and list offsets only
    opened = mapped_kib(lists)
    faiss.extract_index_ivf(index).nprobe = 1
    _, rows = index.search(queries(1), 10)
    assert (rows >= 0).all()
    touched = mapped_kib(lists)
    # one list of 64 read: a few pages (and the kernel's read-around), far from the 1.3 MiB file
    assert opened <= touched < info["lists_bytes"] / 1024 / 8, (opened, touched)


def test_refusals(vector_store_20k, tmp_path):
    for args, message in [
        (("--index-key", "HNSW32", "--shards", "2"), "error: --index-key HNSW32 cannot be built in shards: it has no "
                                                     "inverted lists (only IVF kinds can be sharded); use an IVF key"),
        (("--index-key", "IVF64,PQ16x4fs", "--shards", "2"), "error: --index-key IVF64,PQ16x4fs cannot be built in "
                                                              "shards: IndexIVFPQFastScan packs its lists"),
        (("--shards", "0"), "error: --shards must be 1 to 4096, got 0"),
        (("--shards", "2", "--engine", "spark"), "error: --engine must be local or ray, got 'spark'"),
    ]:
        proc = run_cli("index", "build", vector_store_20k, "--out", tmp_path / "out", *args, check=False)
        assert proc.returncode == 2 and proc.stderr.strip().startswith(message), proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1
        assert not any((tmp_path / "out").glob("*.faiss")) and not any((tmp_path / "out").glob("*.ivfdata"))


def test_a_sharded_index_follows_its_store(vector_store_20k, tmp_path):
    """A delete commits a new store version; the on-disk index cannot change its read-only lists, so it is built
    again in as many shards, and the old files go."""
    shutil.copytree(vector_store_20k, tmp_path / "store")
    run_cli("index", "build", tmp_path / "store", "--out", tmp_path / "idx", "--index-key", KEY, "--shards", "2")
    before = json.loads((tmp_path / "idx" / "index.json").read_text())
    proc = run_cli("index", "delete", tmp_path / "idx", "--where", "id LIKE 'v1%'")
    assert "rebuilt the index" in proc.stdout, proc.stdout
    after = json.loads((tmp_path / "idx" / "index.json").read_text())
    assert after["count"] == 20_000 - 11_111 and after["shards"] == 2 and after["lists_file"] != before["lists_file"]
    assert sorted(p.name for p in (tmp_path / "idx").iterdir() if p.suffix in (".faiss", ".ivfdata")) == sorted(
        [after["file"], after["lists_file"]])
    with closing(open_index(tmp_path / "idx", device="cpu")) as index:
        _, rows = index.search_vectors(queries(), 10)
        ids = index.metadata.take(index.store.positions(rows.ravel()))["id"].to_pylist()
        assert (rows >= 0).all() and not any(i.startswith("v1") for i in ids)


@pytest.mark.slow
@needs_strace
def test_sigkill_at_every_rename_of_a_sharded_rebuild(built, vector_store_20k, tmp_path):
    """Killed as it renames the lists file, the index file or index.json into place: the folder searches as the
    index it had or the new one, never a mix, and the same command then completes and leaves only its own files."""
    args = ("index", "build", vector_store_20k, "--index-key", "IVF32,SQ8", "--shards", "2")
    _, sharded = built
    shutil.copytree(sharded, tmp_path / "traced")
    renames = [c for c in durability_calls(*args, "--out", tmp_path / "traced", log=tmp_path / "strace.log")
               if c[0].startswith("rename")]
    assert len(renames) == 3, renames  # the lists file, the index file, index.json
    for i, call in enumerate(renames):
        folder = tmp_path / f"killed-{i}"
        shutil.copytree(sharded, folder)
        proc = kill_at(call, *args, "--out", folder)
        assert proc.returncode in (137, -9), (call, proc.returncode, proc.stderr)
        info, index = read_index_folder(folder)
        assert info["index_key"] == KEY and index.ntotal == 20_000  # each call killed is not made: the old pair
        run_cli(*args, "--out", folder)
        info = json.loads((folder / "index.json").read_text())
        assert sorted(p.name for p in folder.iterdir()) == sorted([".lock", "index.json", info["file"],
                                                                   info["lists_file"]])


@pytest.mark.parametrize("how", ["truncated", "a flipped last byte", "missing", "named with a path"])
def test_a_damaged_lists_file_is_one_error_line(how, built, tmp_path):
    folder = tmp_path / "index"
    shutil.copytree(built[1], folder)
    info = json.loads((folder / "index.json").read_text())
    lists = folder / info["lists_file"]
    data = lists.read_bytes()
    if how == "truncated":
        lists.write_bytes(data[:-4096])
    elif how == "a flipped last byte":
        lists.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    elif how == "missing":
        lists.unlink()
    else:
        (folder / "index.json").write_text(json.dumps(info | {"lists_file": "../" + info["lists_file"]}))
    proc = run_cli("search", "--index", folder, "--text", "a red circle", check=False)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert proc.stderr.startswith("error: ") and ("damaged" in proc.stderr or "malformed" in proc.stderr
                                                  or "missing" in proc.stderr), proc.stderr
