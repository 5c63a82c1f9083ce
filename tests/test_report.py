"""The eval report writers: Markdown tables, terminal summary, JSON and the PNG plot."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
from PIL import Image

from evaluation import report as rep

KS = [1, 5, 10]
TASKS = [("shapesworld", "t2i", "hit@10", 0.01), ("shapesworld", "tgit", "top1", 0.05),
         ("digits", "zeroshot", "top1", 0.1)]
MODELS = [("tiny-clip", "late"), ("tiny-fuse", "score"), ("tiny-fuse", "head")]
TYPES = ["crop", "rotate", "flip"]


def _metrics(base: float) -> dict[str, float]:
    m = {"top1": base, "mrr": base + 0.01}
    for k in KS:
        m[f"hit@{k}"] = min(1.0, base + 0.02 * k)
        m[f"recall@{k}"] = min(1.0, base + 0.015 * k)
    return m


def _report() -> dict:
    results = []
    for i, (model, fusion) in enumerate(MODELS):
        for j, (ds, task, primary, chance) in enumerate(TASKS):
            if model == "tiny-clip" and task == "zeroshot":
                continue  # one (model, task) not run
            row = {"model": model, "fusion": fusion, "dataset": ds, "task": task, "primary": primary,
                   "queries": 100 + j, "candidates": 1000 + j, "chance": chance,
                   "metrics": _metrics(0.1234 + 0.1 * i + 0.2 * j), "seconds": 0.5 + i}
            if task == "tgit":
                row["by_type"] = {t: _metrics(0.05 * (n + 1) + 0.01 * i) for n, t in enumerate(TYPES)}
            results.append(row)
    return {"format": "retrieval.eval", "created": "2026-11-23T10:00:00Z", "k": KS,
            "data": {"shapesworld": "/data/sw", "digits": "/data/dg"}, "results": results}


def _tables(md: str) -> list[list[list[str]]]:
    """Every Markdown table as a list of rows of stripped cells (the alignment row dropped)."""
    tables, current = [], None
    for line in md.splitlines():
        if line.startswith("|"):
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if all(set(c) <= set(":-") and c for c in cells):
                continue
            if current is None:
                current = []
                tables.append(current)
            current.append(cells)
        else:
            current = None
    return tables


def _pct(x: float) -> str:
    return f"{100 * x:.1f}"


def _row(report: dict, model: str, fusion: str, task: str) -> dict | None:
    return next((r for r in report["results"] if (r["model"], r["fusion"], r["task"]) == (model, fusion, task)), None)


def test_markdown_summary_table():
    report = _report()
    md = rep.markdown(report)
    summary = _tables(md)[0]
    assert summary[0] == ["model", "shapesworld/t2i", "shapesworld/tgit", "digits/zeroshot"]
    labels = [r[0] for r in summary[1:]]
    assert labels == ["tiny-clip", "tiny-fuse (score)", "tiny-fuse (head)"]
    for (model, fusion), cells in zip(MODELS, summary[1:]):
        for (_, task, primary, _), cell in zip(TASKS, cells[1:]):
            row = _row(report, model, fusion, task)
            assert cell == ("–" if row is None else _pct(row["metrics"][primary]))
    assert summary[1][3] == "–"
    assert summary[2][1] == _pct(_metrics(0.2234)["hit@10"])  # primary of t2i is hit@10, not top1
    # the line under the table names the cells and each task's chance level
    after = md.split("\n".join(["| " + " | ".join(summary[-1]) + " |"]))[1].strip().splitlines()[0]
    assert "primary metric" in after
    for ds, task, primary, chance in TASKS:
        assert f"{ds}/{task} `{primary}` {_pct(chance)}" in after


def test_markdown_details():
    report = _report()
    md = rep.markdown(report)
    for ds, task, _, _ in TASKS:
        assert f"### {ds}/{task}" in md
    tables = _tables(md)
    metric_names = ["top1", "mrr", "hit@1", "hit@5", "hit@10", "recall@1", "recall@5", "recall@10"]
    details = [t for t in tables[1:] if t[0][1:] == metric_names + ["seconds"]]
    assert len(details) == len(TASKS)
    for (_, task, _, _), table in zip(TASKS, details):
        for cells in table[1:]:
            name = cells[0]
            model, fusion = next(m for m in MODELS if name in (m[0], f"{m[0]} ({m[1]})"))
            row = _row(report, model, fusion, task)
            assert cells[1:-1] == [_pct(row["metrics"][n]) for n in metric_names]
    zeroshot = details[2]
    assert [c[0] for c in zeroshot[1:]] == ["tiny-fuse (score)", "tiny-fuse (head)"]
    by_type = [t for t in tables if t[0] == ["model"] + TYPES]
    assert len(by_type) == 1
    for cells in by_type[0][1:]:
        model, fusion = next(m for m in MODELS if cells[0] in (m[0], f"{m[0]} ({m[1]})"))
        row = _row(report, model, fusion, "tgit")
        assert cells[1:] == [_pct(row["by_type"][t]["top1"]) for t in TYPES]
    assert "100 queries, 1,000 candidates" in md and "102 queries, 1,002 candidates" in md


def test_markdown_is_deterministic_and_handles_empty(tmp_path):
    report = _report()
    assert rep.markdown(report) == rep.markdown(json.loads(json.dumps(report)))
    assert "No results" in rep.markdown({"format": "retrieval.eval", "k": KS, "results": []})
    rep.write_markdown(report, tmp_path / "sub" / "report.md")
    assert (tmp_path / "sub" / "report.md").read_text(encoding="utf-8") == rep.markdown(report)
    assert [p.name for p in (tmp_path / "sub").iterdir()] == ["report.md"]


def test_single_mode_model_named_alone():
    report = _report()
    report["results"] = [r for r in report["results"] if r["fusion"] != "head"]
    labels = [r[0] for r in _tables(rep.markdown(report))[0][1:]]
    assert labels == ["tiny-clip", "tiny-fuse"]


def test_json_round_trip(tmp_path):
    report = _report()
    path = tmp_path / "report.json"
    rep.write_json(report, path)
    assert json.loads(path.read_text()) == report
    assert [p.name for p in tmp_path.iterdir()] == ["report.json"]


def test_summary_lines():
    report = _report()
    lines = rep.summary_lines(report)
    header, rule, *rows = lines
    assert header.split() == ["model", "shapesworld/t2i", "shapesworld/tgit", "digits/zeroshot"]
    assert set(rule) <= {"-", " "}
    model_rows = [r for r in rows if not r.startswith("(chance)")]
    assert len(model_rows) == len(MODELS)
    assert model_rows[0].startswith("tiny-clip ") and model_rows[0].split()[-1] == "–"
    assert model_rows[1].startswith("tiny-fuse (score)") and model_rows[2].startswith("tiny-fuse (head)")
    assert model_rows[1].split()[-3:] == [_pct(_row(report, "tiny-fuse", "score", t)["metrics"][p])
                                          for _, t, p, _ in TASKS]
    assert len({len(line) for line in [header, rule]}) == 1


def test_plot_png(tmp_path):
    path = tmp_path / "plot.png"
    rep.plot(_report(), path)
    assert [p.name for p in tmp_path.iterdir()] == ["plot.png"]
    with Image.open(path) as im:
        assert im.format == "PNG"
        assert im.width >= 400 and im.height >= 300
        pixels = np.asarray(im.convert("RGB"))
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 10


def test_plot_leaves_out_sums_but_the_tables_keep_them(tmp_path):
    """rsum (R@1+R@5+R@10 of both directions, up to 600 %) has no place on a 0–100 % axis."""
    report = _report()
    rsum = {"model": MODELS[0][0], "fusion": MODELS[0][1], "dataset": "coco", "task": "rsum", "primary": "rsum",
            "metrics": {"rsum": 2.345}, "chance": None}
    rep.plot(report, tmp_path / "without.png")
    rep.plot({**report, "results": report["results"] + [rsum]}, tmp_path / "with.png")
    with Image.open(tmp_path / "without.png") as without, Image.open(tmp_path / "with.png") as with_sum:
        assert without.size == with_sum.size  # no band was added for it
    assert "234.5" in rep.markdown({**report, "results": report["results"] + [rsum]})


def test_plot_empty_report(tmp_path):
    rep.plot({"format": "retrieval.eval", "k": KS, "results": []}, tmp_path / "empty.png")
    with Image.open(tmp_path / "empty.png") as im:
        assert im.format == "PNG"


def test_import_is_light():
    code = "import sys, evaluation.report; assert 'matplotlib' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
