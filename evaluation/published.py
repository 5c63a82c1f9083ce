"""The papers' published figures (published.json): rows beside a benchmark run, and the results page's tables.

Each entry is one model of one paper on one benchmark: {task: {metric: value in %}}, with its source. A figure
measured under a protocol (FuseLIP's MMEB changes) names it and is shown only beside a run under the same one.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from retrieval.files import read_json

PUBLISHED = Path(__file__).with_name("published.json")


def entries() -> list[dict[str, Any]]:
    return read_json(PUBLISHED)["entries"]


def published_rows(benchmark: str, protocol: str, tasks: set[str]) -> list[dict[str, Any]]:
    """Report rows of the figures for these tasks of `benchmark`, their models named "… [published]"."""
    out = []
    for entry in entries():
        if entry["benchmark"] != benchmark or entry.get("protocol", protocol) != protocol:
            continue
        for task, metrics in entry["values"].items():
            if task in tasks:
                out.append({"model": f"{entry['model']} [published]", "fusion": None, "published": True,
                            "source": entry["source"], "dataset": benchmark, "task": task,
                            "primary": next(iter(metrics)), "metrics": {m: v / 100 for m, v in metrics.items()},
                            "chance": None})
    return out


def published_markdown() -> str:
    """Every figure as Markdown: one table per paper, a row per model, a column per benchmark/task metric."""
    data = read_json(PUBLISHED)
    lines = ["## Published numbers (theirs, on their data — for context only)", "", data["note"], "",
             "`retrieval eval BENCH` puts them beside a run on the same benchmark ([benchmarks](benchmarks.md)); "
             "`fuselip-tasks` are FuseLIP's own tasks, which share names with ours, not data. Values in %.", ""]
    papers: dict[str, list[dict[str, Any]]] = {}
    for entry in data["entries"]:
        papers.setdefault(entry["paper"], []).append(entry)
    for paper, found in papers.items():
        columns = list(dict.fromkeys((e["benchmark"], task, metric) for e in found
                                     for task, metrics in e["values"].items() for metric in metrics))
        models = list(dict.fromkeys(e["model"] for e in found))
        cells = {(e["model"], e["benchmark"], task, metric): value for e in found
                 for task, metrics in e["values"].items() for metric, value in metrics.items()}
        lines += [f"**{paper}** ({data['papers'][paper]}):", "",
                  "| model | " + " | ".join(f"{b}/{t} {m}" for b, t, m in columns) + " |",
                  "|---|" + "---|" * len(columns)]
        lines += ["| " + " | ".join([model] + [f"{cells[(model, *c)]:.1f}" if (model, *c) in cells else "–"
                                              for c in columns]) + " |" for model in models]
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"
