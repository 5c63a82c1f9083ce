"""`retrieval data make` as a real subprocess, its bad input, and `index build` on the data it writes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import run_cli
from test_benchmark_data import pixels, read_jsonl

from evaluation.data import make_data
from retrieval.errors import RetrievalError


@pytest.fixture(scope="module")
def cli_data(tmp_path_factory) -> tuple[Path, object]:
    out = tmp_path_factory.mktemp("cli") / "sw50"
    proc = run_cli("data", "make", "shapesworld", "--out", out, "--n", "50", "--size", "32", timeout=120)
    return out, proc


# ---------------------------------------------------------------------------------------------------- CLI


def test_cli_data_make_prints_task_counts(cli_data):
    out, proc = cli_data
    meta = json.loads((out / "dataset.json").read_text())
    assert (meta["name"], meta["n"], meta["size"], meta["items"]) == ("shapesworld", 50, 32, 50)
    assert set(meta["tasks"]) == {"t2i", "i2t", "tgit", "tgit-pool", "vqa", "pos"}
    for name, v in meta["tasks"].items():
        assert f"{name} ({v['queries']} queries)" in proc.stdout
        assert v["queries"] == len(read_jsonl(out / "tasks" / name / "queries.jsonl"))
    assert "wrote 50 items" in proc.stdout
    assert f"training pairs: {meta['train_pairs']} in 40 groups" in proc.stdout
    assert "Traceback" not in proc.stderr
    assert pixels(out / "images" / "000000.png")[0] == (32, 32)


@pytest.mark.parametrize("args", [("shapesworld", "--size", "8"), ("shapesworld", "--n", "3"), ("nope",),
                                  ("digits", "--size", "300"), ("digits", "--n", "0"), ("file",)])
def test_cli_data_make_bad_input(tmp_path, args):
    out = tmp_path / "out"
    if args == ("file",):
        out.write_text("not a folder")
        args = ("shapesworld", "--n", "20")
    proc = run_cli("data", "make", *args, "--out", out, check=False, timeout=120)
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert "Traceback" not in proc.stderr
    assert out.is_file() or not out.exists()


def test_make_data_refuses_bad_arguments(tmp_path):
    for kwargs in ({"name": "nope"}, {"name": "shapesworld", "n": 9}, {"name": "digits", "size": 15},
                   {"name": "shapesworld", "size": 257}):
        with pytest.raises(RetrievalError):
            make_data(out=tmp_path / "x", progress=False, **kwargs)
    assert not (tmp_path / "x").exists()


def _index_info(idx: Path) -> tuple[dict, dict]:
    return json.loads((idx / "index.json").read_text()), json.loads((idx / "store" / "manifest.json").read_text())


def test_index_build_accepts_the_generated_corpus(cli_data, tmp_path):
    out, _ = cli_data
    idx = tmp_path / "idx"
    proc = run_cli("index", "build", out / "corpus.jsonl", "--model", "test-tiny", "--out", idx, "--device", "cpu",
                   "--workers", "0")
    assert "50 items encoded, 0 skipped" in proc.stdout
    info, manifest = _index_info(idx)
    assert info["count"] == 50 and manifest["errors"] == 0
    assert set(manifest["metadata_columns"]) == {"split", "n_objects", "shapes", "colours", "background"}


@pytest.mark.slow  # two more CLI index builds: 6 s
@pytest.mark.parametrize("task", ["tgit-pool", "vqa"])
def test_index_build_accepts_task_candidates(cli_data, tmp_path, task):
    out, _ = cli_data
    manifest_path = out / "tasks" / task / "candidates.jsonl"
    count = len(read_jsonl(manifest_path))
    idx = tmp_path / "idx"
    proc = run_cli("index", "build", manifest_path, "--model", "test-tiny", "--out", idx, "--device", "cpu",
                   "--workers", "0")
    assert f"{count} items encoded, 0 skipped" in proc.stdout
    info, manifest = _index_info(idx)
    assert info["count"] == count and manifest["errors"] == 0
