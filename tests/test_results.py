"""The results page: written from measurements of this run, with every model × task row, the bench sections and
the published numbers (marked as theirs)."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from evaluation.data import make_data
from evaluation.published import published_markdown
from evaluation.results import write_results


@pytest.mark.slow
def test_results_page_has_every_model_task_bench_and_published_numbers(tmp_path):
    data = [make_data("shapesworld", tmp_path / "shapes", n=120, train_pairs=False, progress=False).parent,
            make_data("digits", tmp_path / "digits", n=100, train_pairs=False, progress=False).parent]
    path = write_results(tmp_path / "docs", models=("sparc-tiny", "fdt-tiny"), rerank=5, index_n=3000, encode_n=64,
                         device="cpu", data=data, progress=False)
    text = path.read_text()
    measured = json.loads((tmp_path / "docs" / "results-eval.json").read_text())
    summary = text[text.index("### Summary"):text.index("### Details")]
    for row in measured["results"]:
        assert f"{row['dataset']}/{row['task']}" in summary
    for label in ("sparc-tiny (score)", "sparc-tiny (head)", "sparc-tiny (rerank@5)", "fdt-tiny (score)",
                  "fdt-tiny (head)"):
        assert label in summary
    assert "## ANN fidelity and speed" in text and "recall@10" in text and "plain recall@10" in text
    assert text.count("encode bench: ") == 2
    assert published_markdown().strip() in text and "theirs, on their data" in text
    assert "| FuseLIP-B, CC3M+MM | 23.3 | 17.5 | 15.0 | 82.4 | 18.1 |" in text  # the README's own table, row by row
    assert "/tmp" not in summary  # no machine-local paths in the tables
    with Image.open(tmp_path / "docs" / "results-eval.png") as plot:
        assert plot.format == "PNG"
