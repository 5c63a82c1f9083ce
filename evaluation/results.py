"""`retrieval results`: docs/results.md — every bundled model × task × fusion mode, the speed and ANN
figures of `retrieval bench`, and the published numbers of the three papers beside them.

Everything is measured when the command runs (nothing is copied from an earlier run), on the default
benchmark data; the published numbers come from `evaluation/published.json`.
"""

from __future__ import annotations

import os
import platform
from datetime import datetime, timezone
from pathlib import Path

from evaluation.demo import BUNDLED
from evaluation.published import published_markdown
from retrieval.files import atomic_path


def write_results(out: str | os.PathLike = "docs", models: tuple[str, ...] = BUNDLED, rerank: int = 20,
                  index_n: int = 1_000_000, encode_n: int = 5_000, bench: bool = True, device: str = "auto",
                  data: list[str | os.PathLike] | None = None, progress: bool = True) -> Path:
    """Measure and write OUT/results.md with its plot OUT/results-eval.png; returns the Markdown path.
    `data`: benchmark folders (default: the generated default ShapesWorld and Digits)."""
    from evaluation import report
    from evaluation.bench import encode as encode_bench
    from evaluation.bench import index as index_bench
    from evaluation.evaluate import run_eval

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    evaluation = run_eval("all", ",".join(models), data=data, device=device, progress=progress, rerank=rerank)
    report.plot(evaluation, out / "results-eval.png")
    report.write_json(evaluation, out / "results-eval.json")
    now = datetime.now(timezone.utc).strftime("%Y-%m-%d")
    parts = ["# Results", "",
             f"Measured on {now} by `retrieval results` ({platform.machine()}, {os.cpu_count()} CPUs, device "
             f"{device}). Regenerate with `make results`.", "",
             "## Every bundled model × task × fusion mode", "",
             f"`retrieval eval all --model {','.join(models)} --rerank {rerank}` on the default test splits. "
             "Late-fusion models have one row per fusion mode (they differ only on composed queries) and a "
             f"`rerank@{rerank}` row for SPARC's fine-grained re-ranking of text → image.", "",
             "![eval](results-eval.png)", "", eval_tables(report.markdown(evaluation)), ""]
    if bench:
        index_report = index_bench.bench_index(n=index_n, compare_hnsw=True, progress=progress)
        parts += ["## ANN fidelity and speed", "",
                  f"`retrieval bench index --n {index_n} --compare-hnsw` (embedding-like synthetic vectors; exact "
                  "search is the "
                  "baseline, measured in the same process):", "", "```",
                  *index_bench.report_lines(index_report), "```", ""]
        parts += ["## Encoding throughput", "",
                  f"`retrieval bench encode --model M --n {encode_n}`: the whole encode job against the bare "
                  "forward pass at the same batch size (the bar: ≥ 0.90).", ""]
        for model in models:
            encode_report = encode_bench.bench_encode(model, n=encode_n, device=device, progress=progress)
            parts += ["```", *encode_bench.report_lines(encode_report), "```", ""]
    parts.append(published_markdown().strip())
    path = out / "results.md"
    with atomic_path(path) as tmp:
        Path(tmp).write_text("\n".join(parts) + "\n", encoding="utf-8")
    return path


def eval_tables(markdown: str) -> str:
    """The eval report's summary and details, one heading level down (without its title and local paths)."""
    body = markdown[markdown.index("## Summary"):]
    return "\n".join("#" + line if line.startswith("## ") else line for line in body.splitlines()).strip()
