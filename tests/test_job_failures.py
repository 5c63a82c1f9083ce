"""Jobs that cannot go on stop with one `error:` line and lose nothing committed: a full disk (a file-size limit
stands in for it) during `encode` or `index build`, a second job on the same folder, nonsense options, an --out
that is a file; and a run killed at its very first commit is taken up by the rerun."""

from __future__ import annotations

import json
import random
import re
import resource
import shutil
import string
import subprocess
import time
from pathlib import Path

import duckdb
import pytest
from conftest import RETRIEVAL, STRACE, kill_at, needs_strace, run_cli

import retrieval
from retrieval.index_folder import INDEX_JSON, read_index_json
from retrieval.indexing import build_index_folder
from retrieval.store import EmbeddingStore

N = 240


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """Text items; the last 80 have long random captions, so the third part is far larger than the first two."""
    root = tmp_path_factory.mktemp("jobs")
    rng = random.Random(0)
    rows = [{"id": f"t{i}", "text": f"item {i} " + ("".join(rng.choices(string.ascii_lowercase + " ", k=3000))
                                                    if i >= 160 else "short")} for i in range(N)]
    (root / "corpus.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root / "corpus.jsonl"


def run_limited(max_file_bytes: int, *args) -> subprocess.CompletedProcess:
    """The CLI with no file allowed to grow past `max_file_bytes` (write() then fails with EFBIG)."""
    def limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (max_file_bytes, max_file_bytes))

    return subprocess.run([str(RETRIEVAL), *map(str, args)], capture_output=True, text=True, preexec_fn=limit,
                          env={"PYTHONDONTWRITEBYTECODE": "1", "PATH": "/usr/bin:/bin"}, timeout=300)


def one_error_line(proc: subprocess.CompletedProcess) -> str:
    """Exit 2 and one `error:` line, the last (progress bars may come before it), no traceback."""
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert [ln for ln in lines if ln.startswith("error: ")] == lines[-1:], proc.stderr
    return lines[-1]


ENCODE = ("--model", "test-tiny", "--workers", "0", "--part-size", "80", "--batch-size", "40")


@pytest.mark.slow
def test_a_full_disk_during_encode_keeps_the_committed_parts(corpus, tmp_path):
    out = tmp_path / "store"
    line = one_error_line(run_limited(60_000, "encode", corpus, "--out", out, *ENCODE))
    assert "File too large" in line and "run the same command again" in line
    store = EmbeddingStore(out)
    assert [p["count"] for p in store.manifest["parts"]] == [80, 80] and not store.complete
    assert store.damaged_parts(full=True) == []
    assert not [p for p in out.iterdir() if ".tmp-" in p.name]

    rerun = run_cli("encode", corpus, "--out", out, *ENCODE)
    assert "resumed after 160 items already committed" in rerun.stdout
    ids = [r[0] for r in duckdb.sql(f"SELECT id FROM '{out}/part-*.parquet' ORDER BY row").fetchall()]
    assert ids == [f"t{i}" for i in range(N)]


@pytest.mark.slow
def test_a_full_disk_during_index_build_keeps_the_committed_index(corpus, tmp_path):
    store, folder = tmp_path / "store", tmp_path / "index"
    run_cli("encode", corpus, "--out", store, *ENCODE)
    build_index_folder(store, folder, index_key="HNSW32", progress=False)
    before = read_index_json(folder)
    line = one_error_line(run_limited(40_000, "index", "build", store, "--out", folder, "--index-key", "Flat"))
    assert "FAISS could not write the index: File too large" in line
    assert read_index_json(folder) == before
    assert retrieval.open_index(folder, device="cpu").search(text="item 3 short", k=1)[0].id == "t3"
    run_cli("index", "build", store, "--out", folder, "--index-key", "Flat")
    assert read_index_json(folder)["index_key"] == "Flat"
    assert sorted(p.name for p in folder.iterdir()) == sorted([".lock", INDEX_JSON, read_index_json(folder)["file"]])


@needs_strace
@pytest.mark.slow
def test_a_second_encode_into_the_same_folder_is_refused(corpus, tmp_path):
    """The same command twice: the first is held (strace delays one of its fsyncs) once its manifest exists, so
    the second surely meets it at work; the second is refused, and the first then finishes unharmed."""
    out = tmp_path / "store"
    args = ["encode", str(corpus), "--out", str(out), *ENCODE]
    first = subprocess.Popen([STRACE, "-f", "-qq", "-o", "/dev/null", "-e", "trace=fsync",
                              "-e", "inject=fsync:delay_enter=15s:when=3", str(RETRIEVAL), *args],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not (out / "manifest.json").is_file() and time.monotonic() < deadline and first.poll() is None:
            time.sleep(0.01)
        assert first.poll() is None, "the first job ended before the second could start"
        second = run_cli(*args, check=False)
        assert re.search(r"is in use by encode job \(process \d+\)", one_error_line(second))
        assert first.poll() is None
    finally:
        _, stderr = first.communicate(timeout=300)
    assert first.returncode == 0, stderr
    assert EmbeddingStore(out).count == N and EmbeddingStore(out).damaged_parts(full=True) == []


@pytest.mark.parametrize("args, fragment", [
    (["encode", "{corpus}", "--model", "test-tiny", "--out", "{tmp}/s", "--workers", "-1"], "--workers must be 0"),
    (["index", "build", "{corpus}", "--model", "test-tiny", "--out", "{tmp}/s", "--workers", "-2"],
     "--workers must be 0"),
    (["encode", "{corpus}", "--model", "test-tiny", "--out", "{tmp}/a-file"], "is a file"),
    (["index", "build", "{corpus}", "--model", "test-tiny", "--out", "{tmp}/a-file"], "is a file"),
    (["encode", "{corpus}", "--model", "test-tiny", "--out", "{tmp}/s", "--workers", "100000"], "--workers must be 0"),
    (["index", "build", "{corpus}", "--model", "test-tiny", "--out", "{tmp}/s", "--target-recall", "nan"],
     "--target-recall must be in (0, 1]"),
    (["index", "build", "{corpus}", "--model", "test-tiny", "--out", "{tmp}/s", "--target-recall", "2"],
     "--target-recall must be in (0, 1]"),
    (["index", "build", "{corpus}", "--model", "test-tiny", "--out", "{tmp}/s", "--memory-budget", "0"],
     "must be more than 0"),
    (["bench", "index", "--n", "100", "--threads", "100000"], "--threads must be 1 to"),
])
def test_nonsense_options_are_one_error_line(args, fragment, corpus, tmp_path):
    (tmp_path / "a-file").write_text("precious")
    proc = run_cli(*[a.format(corpus=corpus, tmp=tmp_path) for a in args], check=False)
    assert fragment in one_error_line(proc)
    assert (tmp_path / "a-file").read_text() == "precious" and not (tmp_path / "s").exists()


@needs_strace
@pytest.mark.slow
def test_a_run_killed_at_its_first_commit_is_taken_up_by_the_rerun(corpus, tmp_path):
    """Killed at the rename of its first manifest, the folder holds only a temporary file and the lock; the
    rerun starts over by itself instead of refusing a folder that is 'not an embedding store'."""
    out = tmp_path / "store"
    proc = kill_at(("rename", 1), "encode", corpus, "--out", out, *ENCODE)
    assert proc.returncode in (137, -9), proc.stderr
    assert not (out / "manifest.json").exists() and any(".tmp-" in p.name for p in out.iterdir())
    run_cli("encode", corpus, "--out", out, *ENCODE)
    assert EmbeddingStore(out).count == N
    assert not [p for p in out.iterdir() if ".tmp-" in p.name]


@pytest.mark.slow
def test_a_killed_first_index_build_is_taken_up_by_the_rerun(corpus, tmp_path):
    """What a killed first build of an index from a corpus leaves (its store, an uncommitted index file) is the
    rerun's to finish, not an 'existing folder' to refuse."""
    folder = tmp_path / "index"
    build_index_folder(corpus, folder, model="test-tiny", index_key="Flat", progress=False,
                       encode_options={"workers": 0})
    shutil.move(folder / INDEX_JSON, tmp_path / "index.json.away")
    run_cli("index", "build", corpus, "--model", "test-tiny", "--out", folder, "--workers", "0")
    assert read_index_json(folder)["count"] == N


def test_a_search_with_nonsense_is_one_error_line(corpus, tmp_path):
    """Checked before the index and model are loaded: too many threads (OpenMP would crash), a query text
    that is not UTF-8 (bytes the shell passed through)."""
    import os

    for args, fragment in ((["--text", "x", "--threads", "100000"], "--threads must be 1 to"),
                           (["--text", os.fsdecode(b"\xff\xfe bad")], "not valid UTF-8")):
        proc = subprocess.run([os.fsencode(RETRIEVAL), b"search", b"--index", os.fsencode(tmp_path / "none"),
                               *map(os.fsencode, args)], capture_output=True, text=True, timeout=120)
        assert fragment in one_error_line(proc)
