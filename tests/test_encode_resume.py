"""The encode job resumed after SIGKILL at several points, and rerun once complete: the same store as one run."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import RETRIEVAL, run_cli
from test_encode import (
    _assert_dense_unique,
    _assert_manifest_matches_files,
    _errors,
    _file_digests,
    _manifest,
    _single_error_line,
    _store_rows,
    _store_vectors,
    _summary_first_line,
)

from evaluation.shapesworld import make_shapesworld
from retrieval.encode import encode_corpus
from retrieval.errors import RetrievalError
from retrieval.files import sha256_file
from retrieval.store import EmbeddingStore

pytestmark = pytest.mark.slow  # SIGKILL and rerun, at four points, of a 600-item job: about 25 s

# ---------------------------------------------------------------- 4. resume after SIGKILL

RESUME_N, RESUME_PART = 600, 50
RESUME_ARGS = ("--model", "test-tiny", "--part-size", str(RESUME_PART), "--batch-size", "16", "--workers", "2")
RESUME_MISSING = (10, 123, 377, 598)  # positions whose image file is missing: errors spread over parts


@pytest.fixture(scope="module")
def resume_corpus(tmp_path_factory) -> tuple[Path, list[str], list[str]]:
    """600 ShapesWorld items (a few with a missing image); returns (manifest, good ids, bad ids)."""
    manifest = make_shapesworld(tmp_path_factory.mktemp("resume"), n=RESUME_N, size=32, seed=1, train_pairs=False,
                                progress=False)
    records = [json.loads(line) for line in manifest.read_text().splitlines()]
    for p in RESUME_MISSING:
        records[p]["image"] = f"images/missing-{p}.png"
    records[5].pop("image")  # a text-only item too
    path = manifest.with_name("resume.jsonl")
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    bad = [records[p]["id"] for p in RESUME_MISSING]
    return path, [r["id"] for r in records if r["id"] not in bad], bad


@pytest.fixture(scope="module")
def resume_reference(resume_corpus, tmp_path_factory) -> Path:
    """The same job run once, uninterrupted, in-process."""
    corpus, _, _ = resume_corpus
    out = tmp_path_factory.mktemp("reference") / "store"
    encode_corpus(corpus, out, "test-tiny", batch_size=16, workers=0, part_size=RESUME_PART, progress=False)
    return out


def _assert_same_as_reference(out: Path, reference: Path, good: list[str], bad: list[str]) -> None:
    manifest = _assert_manifest_matches_files(out)
    ref_manifest = _manifest(reference)
    assert manifest["complete"] is True
    assert (manifest["count"], manifest["errors"]) == (len(good), len(bad)) == (RESUME_N - 4, 4)
    assert [(p["file"], p["rows"], p["positions"], p["errors"]) for p in manifest["parts"]] == \
           [(p["file"], p["rows"], p["positions"], p["errors"]) for p in ref_manifest["parts"]]
    rows = _assert_dense_unique(out, good)
    assert rows == _store_rows(reference)
    ids, vectors = _store_vectors(out)
    ref_ids, ref_vectors = _store_vectors(reference)
    assert ids == ref_ids
    np.testing.assert_allclose(vectors, ref_vectors, atol=1e-5)
    errors = _errors(out)
    assert [(p, i) for p, i, _ in errors] == [(p, i) for p, i in zip(RESUME_MISSING, bad)]
    assert all("image not found" in e for _, _, e in errors)


def _children(pid: int) -> list[int]:
    """Process ids whose parent is `pid` (the job's data-loader workers)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def _wait_for_parts(proc: subprocess.Popen, out: Path, parts: int, timeout: float = 120) -> None:
    """Poll until the manifest lists at least `parts` committed parts (0: until it exists)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            manifest = _manifest(out)
        except json.JSONDecodeError:  # never expected: the manifest is replaced atomically
            raise AssertionError("manifest.json was read half-written") from None
        if manifest is not None and len(manifest["parts"]) >= parts:
            return
        time.sleep(0.002)
    raise AssertionError(f"the job ended or stalled before committing {parts} parts (rc {proc.poll()})")


@pytest.mark.parametrize("kill_after_parts", [None, 0, 1, 6],
                         ids=["at-spawn", "at-first-manifest", "after-1-part", "after-6-parts"])
def test_resume_after_sigkill(kill_after_parts, resume_corpus, resume_reference, tmp_path):
    corpus, good, bad = resume_corpus
    out = tmp_path / "store"
    args = ["encode", corpus, *RESUME_ARGS, "--out", out]
    with open(tmp_path / "killed.log", "w") as log:
        proc = subprocess.Popen([str(RETRIEVAL), *map(str, args)], stdout=log, stderr=subprocess.STDOUT)
        try:
            if kill_after_parts is not None:
                _wait_for_parts(proc, out, kill_after_parts)
            assert proc.poll() is None, "the job finished before it could be killed"
            workers = _children(proc.pid)
            os.kill(proc.pid, signal.SIGKILL)
        finally:
            proc.wait(timeout=120)
    assert proc.returncode == -signal.SIGKILL
    for pid in workers:  # its loader workers would notice the dead parent within seconds; end them now
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)

    manifest = _manifest(out)
    committed = 0
    if manifest is not None:  # whatever was committed before the kill is intact; the store is incomplete
        assert manifest["complete"] is False
        committed = len(manifest["parts"])
        assert kill_after_parts is None or committed >= kill_after_parts
        assert committed < RESUME_N // RESUME_PART
        for part in manifest["parts"]:
            assert part["count"] == 0 or sha256_file(out / part["file"]) == part["sha256"]
        with pytest.raises(RetrievalError, match="incomplete"):
            EmbeddingStore(out).require_complete()
    else:
        assert kill_after_parts is None

    rerun = run_cli(*args)
    lines = rerun.stdout.strip().splitlines()
    assert lines[0] == f"store {out}: {len(good)} items encoded, {len(bad)} skipped ({RESUME_N} in the corpus)"
    if committed:
        assert f"resumed after {committed * RESUME_PART} items already committed" in lines
    else:
        assert not any(ln.startswith("resumed") for ln in lines)
    assert "  skipped: 4 × image not found" in lines
    _assert_same_as_reference(out, resume_reference, good, bad)


def test_rerun_of_complete_job_changes_nothing_and_other_jobs_are_refused(resume_corpus, resume_reference,
                                                                         shapes_corpus, tmp_path):
    corpus, good, bad = resume_corpus
    out = tmp_path / "store"
    shutil.copytree(resume_reference, out)
    before_files, before_manifest = _file_digests(out), _manifest(out)

    rerun = run_cli("encode", corpus, *RESUME_ARGS, "--out", out)
    assert _summary_first_line(rerun.stdout) == \
        f"store {out}: {len(good)} items encoded, {len(bad)} skipped ({RESUME_N} in the corpus)"
    assert f"resumed after {RESUME_N} items already committed" in rerun.stdout
    assert _file_digests(out) == before_files
    assert _manifest(out) == before_manifest
    _assert_same_as_reference(out, resume_reference, good, bad)

    manifest_bytes = (out / "manifest.json").read_bytes()
    others = {
        "another model": ["encode", corpus, *RESUME_ARGS, "--out", out, "--model", "test-tiny-128"],
        "another corpus": ["encode", shapes_corpus, *RESUME_ARGS, "--out", out],
    }
    for what, args in others.items():
        line = _single_error_line(run_cli(*args, check=False))
        assert str(out) in line and "another corpus, model" in line, (what, line)
        assert (out / "manifest.json").read_bytes() == manifest_bytes, what
        assert _file_digests(out) == before_files, what
