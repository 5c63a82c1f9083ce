"""`retrieval demo` through the real CLI, in a smaller setting: every output exists, the contact sheets are
PNGs with the query and k hits per model, and the printed eval table has every model and task."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from evaluation.demo import BUNDLED, CAPTION, KINDS, QUERY_COLS, THUMB
from tests.conftest import run_cli


@pytest.mark.slow
def test_demo_writes_sheets_and_prints_every_model_and_task(tmp_path):
    k = 3
    out = tmp_path / "demo"
    proc = run_cli("demo", "--out", out, "--n-shapes", "200", "--n-digits", "120", "-k", str(k), "--device", "cpu",
                   timeout=600)
    summary = json.loads((out / "demo.json").read_text())
    assert summary["models"] == list(BUNDLED)
    for kind in KINDS:
        assert f"{kind.name}: " in proc.stdout
        sheet = out / f"contact-{kind.slug}.png"
        with Image.open(sheet) as image:
            assert image.format == "PNG"
            # one row per model; the model name, the query (its image with its text beside it), then k hits
            columns = 1 + QUERY_COLS + k
            assert image.size == ((THUMB + 8) * columns, (THUMB + CAPTION + 8) * len(BUNDLED))
            pixels = image.convert("RGB")
            hit_cell = pixels.crop(((THUMB + 8) * (columns - 1), 0, (THUMB + 8) * columns, THUMB))
            colours = np.unique(np.asarray(hit_cell).reshape(-1, 3), axis=0)
            assert len(colours) > 10  # the last hit is drawn, not left blank
        for model in BUNDLED:
            assert len(summary["queries"][kind.name][model]) == k
    # the image + instruction query is asked as tgit asks it: among the rotations of its own scene only
    assert "asked among the 18 rotations of that scene only, as the tgit task asks it" in proc.stdout
    for model in BUNDLED:
        ids = summary["queries"]["image + instruction"][model]
        assert len({i.rsplit("-", 1)[0] for i in ids}) == 1 and all(i.rsplit("-", 1)[1].startswith("rotate")
                                                                     for i in ids), ids
    report = json.loads((out / "eval.json").read_text())
    tasks = {(r["dataset"], r["task"]) for r in report["results"]}
    assert {"t2i", "i2t", "tgit", "tgit-pool", "vqa", "pos", "zeroshot"} <= {t for _, t in tasks}
    table = proc.stdout[proc.stdout.index("model "):]
    header = table.splitlines()[0]
    for dataset, task in tasks:
        assert f"{dataset}/{task}" in header
    for model in BUNDLED:
        assert model in table
    assert (out / "eval.md").is_file()
