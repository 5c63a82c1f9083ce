"""An index folder is whole or absent: index.json and the index file it names are committed by one rename, a
build SIGKILLed at any rename or fsync leaves a folder that searches as its index.json says (or, before the
first commit, is refused cleanly), a rerun completes and clears the leftovers, and a damaged or malformed
folder is one error line."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import durability_calls, kill_at, needs_strace, run_cli

import retrieval
from indexers.kinds import kind_of, kind_of_key
from retrieval import RetrievalError
from retrieval.index_folder import INDEX_JSON, read_index_folder, read_index_json
from retrieval.indexing import build_index_folder


def assert_whole(folder: Path, store: Path) -> str:
    """The folder opens, its index is the one index.json describes and answers like exact search; the key."""
    searcher = retrieval.open_index(folder, device="cpu")
    info = searcher.info
    assert kind_of(searcher.index) == kind_of_key(info["index_key"]) and searcher.index.ntotal == info["count"]
    query = searcher.store.read_vectors(np.array([7]))
    scores, rows = searcher.search_vectors(query, 5)
    assert rows[0, 0] == 7 and abs(scores[0, 0] - 1.0) < 1e-3
    return info["index_key"]


def assert_tidy(folder: Path) -> None:
    info = read_index_json(folder)
    assert sorted(p.name for p in folder.iterdir() if p.name != "store") == sorted([INDEX_JSON, info["file"], ".lock"])


@pytest.fixture(scope="module")
def flat_folder(shapes_store, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("flat") / "index"
    build_index_folder(shapes_store, out, index_key="Flat", progress=False)
    return out


def test_a_rebuild_replaces_the_pair_and_clears_what_a_killed_build_left(flat_folder, shapes_store, tmp_path):
    folder = tmp_path / "index"
    shutil.copytree(flat_folder, folder)
    old = read_index_json(folder)["file"]
    (folder / ".index.faiss.tmp-4242").write_bytes(b"half")
    (folder / "index-0123456789abcdef.faiss").write_bytes(b"never committed")
    build_index_folder(shapes_store, folder, index_key="HNSW32", progress=False)
    assert_tidy(folder)
    assert read_index_json(folder)["file"] != old and assert_whole(folder, shapes_store) == "HNSW32"


def test_a_reader_that_loses_the_race_with_a_commit_reads_the_new_pair(flat_folder, shapes_store, tmp_path,
                                                                      monkeypatch):
    import retrieval.index_folder as index_folder

    folder = tmp_path / "index"
    shutil.copytree(flat_folder, folder)
    stale = read_index_json(folder)
    build_index_folder(shapes_store, folder, index_key="HNSW32", progress=False)  # commits, removes stale file
    answers = iter([stale])
    real = index_folder.read_index_json
    monkeypatch.setattr(index_folder, "read_index_json", lambda f: next(answers, None) or real(f))
    info, index = read_index_folder(folder)
    assert info["index_key"] == "HNSW32" and kind_of(index).name == "hnsw"


@pytest.mark.slow
@needs_strace
@pytest.mark.parametrize("first", [True, False], ids=["first build", "rebuild"])
def test_sigkill_at_every_rename_and_fsync_of_index_build(first, flat_folder, shapes_store, tmp_path):
    args = ("index", "build", shapes_store, "--index-key", "HNSW32")
    base = tmp_path / "base"
    if not first:
        shutil.copytree(flat_folder, base)
    calls = durability_calls(*args, "--out", tmp_path / "traced", log=tmp_path / "strace.log")
    assert len(calls) >= 6, calls  # index file: fsync, rename, folder fsync; index.json: the same
    for i, call in enumerate(calls):
        folder = tmp_path / f"killed-{i}"
        if not first:
            shutil.copytree(base, folder)
        proc = kill_at(call, *args, "--out", folder)
        assert proc.returncode in (137, -9), (call, proc.returncode, proc.stderr)
        committed = (folder / INDEX_JSON).is_file() and read_index_json(folder)["index_key"] == "HNSW32"
        if first and not committed:
            refused = run_cli("search", "--index", folder, "--text", "a red circle", check=False)
            assert refused.returncode == 2 and refused.stderr.startswith("error: ") and \
                len(refused.stderr.strip().splitlines()) == 1, refused.stderr
        else:
            assert assert_whole(folder, shapes_store) == ("HNSW32" if committed else "Flat"), call
        run_cli(*args, "--out", folder)
        assert_tidy(folder)
        assert assert_whole(folder, shapes_store) == "HNSW32"


def damage(folder: Path, how: str) -> None:
    info = json.loads((folder / INDEX_JSON).read_text())
    index_file = folder / info["file"]
    data = index_file.read_bytes()

    def write(info: dict, **changes) -> None:
        new = {k: v for k, v in (info | changes).items() if v is not None}
        (folder / INDEX_JSON).write_text(json.dumps(new))
    edits = {
        "empty index file": lambda: index_file.write_bytes(b""),
        "truncated index file": lambda: index_file.write_bytes(data[: len(data) // 2]),
        "garbage index file": lambda: index_file.write_bytes(bytes(255 - b for b in data)),
        "one flipped byte": lambda: index_file.write_bytes(data[:100] + bytes([data[100] ^ 1]) + data[101:]),
        "index file missing": lambda: index_file.unlink(),
        "index.json not JSON": lambda: (folder / INDEX_JSON).write_text("{not json"),
        "index.json a list": lambda: (folder / INDEX_JSON).write_text("[1, 2]"),
        "index.json without count": lambda: write(info, count=None),
        "index.json with a string dim": lambda: write(info, dim="64"),
        "index.json with a bool count": lambda: write(info, count=True),
        "index.json store not an object": lambda: write(info, store="elsewhere"),
        "index.json naming a path": lambda: write(info, file="../../etc/passwd"),
        "search params it does not take": lambda: write(info, search_params="efSearch=notanumber"),
        "a checkpoint that is not a path": lambda: write(info, encoder=info["encoder"] | {"checkpoint": 5}),
        "a fusion mode that is a list": lambda: write(info, encoder=info["encoder"] | {"fusion_mode": [1]}),
        "deep nesting": lambda: (folder / INDEX_JSON).write_text("[" * 100_000 + "]" * 100_000),
        "no checksum": lambda: write(info, file_sha256=None),
        "an empty checksum": lambda: write(info, file_sha256=""),
        "legacy folder with garbage": lambda: legacy_garbage(folder, info, data),
    }
    edits[how]()


def legacy_garbage(folder: Path, info: dict, data: bytes) -> None:
    (folder / info["file"]).unlink()
    (folder / "index.faiss").write_bytes(data[:50] + b"\0" * 200)
    legacy = {k: v for k, v in info.items() if k not in ("file", "file_sha256", "index_bytes")} | {"version": 1}
    (folder / INDEX_JSON).write_text(json.dumps(legacy))


DAMAGE = ["empty index file", "truncated index file", "garbage index file", "one flipped byte", "index file missing",
          "index.json not JSON", "index.json a list", "index.json without count", "index.json with a string dim",
          "index.json with a bool count", "index.json store not an object", "index.json naming a path",
          "search params it does not take", "legacy folder with garbage", "a checkpoint that is not a path",
          "a fusion mode that is a list", "deep nesting", "no checksum", "an empty checksum"]


@pytest.mark.parametrize("how", DAMAGE)
def test_a_damaged_index_folder_is_one_clear_error(how, flat_folder, tmp_path):
    folder = tmp_path / "index"
    shutil.copytree(flat_folder, folder)
    damage(folder, how)
    with pytest.raises(RetrievalError) as refused:
        retrieval.open_index(folder, device="cpu")
    message = str(refused.value)
    assert "\n" not in message and ("rebuild the index" in message or "not an index manifest" in message), message


@pytest.mark.parametrize("how", ["truncated index file", pytest.param("index.json not JSON", marks=pytest.mark.slow),
                                 pytest.param("search params it does not take", marks=pytest.mark.slow)])
def test_a_damaged_index_folder_is_one_error_line_from_the_cli(how, flat_folder, tmp_path):
    folder = tmp_path / "index"
    shutil.copytree(flat_folder, folder)
    damage(folder, how)
    proc = run_cli("search", "--index", folder, "--text", "a red circle", check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and proc.stderr.startswith("error: "), proc.stderr


@pytest.mark.parametrize("key", ["HNSW0", "HNSW1", "NSG0", "HNSW-1", "HNSW99999999", "IVF0,Flat", "PQ0", "PCA0,Flat",
                                 "IDMap2,Flat", "OPQ1000,IVF1,Flat", "IVF4,PQ64x16", "Flat,Flat", "LSH", "Flat;",
                                 "", "RR100000,Flat", "OPQ16_100000,IVF1,Flat"])
def test_a_key_faiss_cannot_build_is_one_clear_error(key, shapes_store, tmp_path):
    """Keys that would abort the process inside FAISS (HNSW0), hang it (NSG0), exhaust memory (HNSW99999999),
    build an index that can never be searched (IVF0) or fail deep in training are refused up front or as one
    error, and leave no index folder behind."""
    with pytest.raises(RetrievalError, match="index.key|FAISS cannot build"):
        build_index_folder(shapes_store, tmp_path / "index", index_key=key, progress=False)
    assert not (tmp_path / "index" / INDEX_JSON).exists()


@pytest.mark.parametrize("theirs", [["index.faiss", "notes.md"], ["store/", "notes.md"]])
def test_a_folder_of_another_tool_is_not_taken_for_an_index_folder(theirs, shapes_store, tmp_path):
    folder = tmp_path / "theirs"
    folder.mkdir()
    for name in theirs:
        (folder / name).mkdir() if name.endswith("/") else (folder / name).write_text(f"their {name}")
    with pytest.raises(RetrievalError, match="exists and is not an index folder"):
        build_index_folder(shapes_store, folder, progress=False)
    assert sorted(p.name for p in folder.iterdir()) == sorted(n.rstrip("/") for n in theirs)
    assert all((folder / n).read_text() == f"their {n}" for n in theirs if not n.endswith("/"))
