"""Writers for `retrieval eval` reports: JSON for machines, a Markdown table and a PNG plot for people.

The report is one row per (model, fusion mode, dataset, task); see `evaluation` in DESIGN.md. A model
that appears with one fusion mode is named alone, one with several as "name (mode)". Tasks are named
"dataset/task". Metric values are fractions in [0, 1] and are printed as percentages with one decimal.
Models and tasks keep the order in which they first appear in `report["results"]`.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from evaluation.bench.common import format_table
from retrieval import files

MISSING = "–"
SUMS = {"rsum"}  # metrics that add up several shares: printed like the others, left out of the 0–100 % plot
Key = tuple[Any, Any]  # (model, fusion) for a model row, (dataset, task) for a task column


@dataclass
class _Grid:
    """The report arranged as model rows × task columns."""

    models: list[Key]
    tasks: list[Key]
    labels: dict[Key, str]
    cells: dict[tuple[Key, Key], dict[str, Any]]

    def row(self, model: Key, task: Key) -> dict[str, Any] | None:
        """The result row of one model row on one task, or None."""
        return self.cells.get((model, task))

    def task_rows(self, task: Key) -> list[dict[str, Any]]:
        """The result rows of one task, in model order."""
        return [r for m in self.models if (r := self.row(m, task)) is not None]

    def primary(self, task: Key) -> str:
        """The primary metric's name of a task."""
        return next((r["primary"] for r in self.task_rows(task) if r.get("primary")), "top1")

    def chance(self, task: Key) -> float | None:
        """The chance level of a task's primary metric, from its first row that states one."""
        return next((r["chance"] for r in self.task_rows(task) if r.get("chance") is not None), None)


def _unique(items: Iterable[Any]) -> list[Any]:
    return list(dict.fromkeys(items))


def _grid(report: dict[str, Any]) -> _Grid:
    results = report.get("results") or []
    models = _unique((r.get("model"), r.get("fusion")) for r in results)
    tasks = _unique((r.get("dataset"), r.get("task")) for r in results)
    modes: dict[Any, int] = {}
    for name, _ in models:
        modes[name] = modes.get(name, 0) + 1
    labels = {(name, mode): str(name) if modes[name] == 1 or mode is None else f"{name} ({mode})"
              for name, mode in models}
    labels.update({(ds, task): f"{ds}/{task}" for ds, task in tasks})
    cells = {((r.get("model"), r.get("fusion")), (r.get("dataset"), r.get("task"))): r for r in results}
    return _Grid(models, tasks, labels, cells)


def pct(value: Any) -> str:
    """A fraction in [0, 1] as a percentage with one decimal, or "–" when there is none."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return MISSING
    return f"{100 * float(value):.1f}"


def _chance_pct(value: float | None) -> str:
    if value is not None and 0 < 100 * value < 0.05:
        return "<0.1"
    return pct(value)


def _primary_value(row: dict[str, Any] | None) -> Any:
    return None if row is None else (row.get("metrics") or {}).get(row.get("primary", "top1"))


def _summary_rows(grid: _Grid) -> list[list[str]]:
    header = ["model"] + [grid.labels[t] for t in grid.tasks]
    return [header] + [[grid.labels[m]] + [pct(_primary_value(grid.row(m, t))) for t in grid.tasks]
                       for m in grid.models]


def _metric_names(report: dict[str, Any], rows: list[dict[str, Any]]) -> list[str]:
    """top1, mrr, hit@k, recall@k for the report's k list, then any other metric the rows carry."""
    ks = report.get("k") or sorted({int(n.split("@")[1]) for r in rows for n in r.get("metrics", {})
                                    if n.startswith(("hit@", "recall@")) and n.split("@")[1].isdigit()})
    names = ["top1", "mrr"] + [f"hit@{k}" for k in ks] + [f"recall@{k}" for k in ks]
    return names + [n for n in _unique(n for r in rows for n in r.get("metrics", {})) if n not in names]


def _md_cell(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _md_table(rows: list[list[str]]) -> list[str]:
    """A Markdown table: the first row is the header; the first column is left-aligned, the rest right."""
    lines = ["| " + " | ".join(_md_cell(c) for c in rows[0]) + " |",
             "|" + "|".join([":---"] + ["---:"] * (len(rows[0]) - 1)) + "|"]
    lines += ["| " + " | ".join(_md_cell(c) for c in r) + " |" for r in rows[1:]]
    return lines


def _counts(rows: list[dict[str, Any]], key: str) -> str:
    values = _unique(r.get(key) for r in rows if r.get(key) is not None)
    return " / ".join(f"{v:,}" if isinstance(v, int) else str(v) for v in values) or MISSING


def _details(report: dict[str, Any], grid: _Grid, task: Key) -> list[str]:
    rows = grid.task_rows(task)
    primary, names = grid.primary(task), _metric_names(report, rows)
    lines = [f"### {grid.labels[task]}", "",
             f"{_counts(rows, 'queries')} queries, {_counts(rows, 'candidates')} candidates; "
             f"primary metric `{primary}`, chance {_chance_pct(grid.chance(task))}%. Values in %.", ""]
    table = [["model"] + names + ["seconds"]]
    for m in grid.models:
        if (r := grid.row(m, task)) is not None:
            metrics, secs = r.get("metrics") or {}, r.get("seconds")
            table.append([grid.labels[m]] + [pct(metrics.get(n)) for n in names]
                         + [MISSING if secs is None else f"{secs:.1f}"])
    lines += _md_table(table)
    typed = [r for r in rows if r.get("by_type")]
    if typed:
        types = _unique(t for r in typed for t in r["by_type"])
        how = "is their mean" if all(r.get("type_mean") for r in typed) else "is the mean over all queries"
        lines += ["", f"Per type, `{primary}` in % (the task's `{primary}` {how}):", ""]
        table = [["model"] + [str(t) for t in types]]
        for m in grid.models:
            if (r := grid.row(m, task)) is not None and r.get("by_type"):
                table.append([grid.labels[m]] + [pct((r["by_type"].get(t) or {}).get(primary)) for t in types])
        lines += _md_table(table)
    return lines + [""]


def markdown(report: dict[str, Any]) -> str:
    """The report as Markdown: a summary table of model rows × tasks, then every metric per task."""
    grid = _grid(report)
    lines = ["# Retrieval eval", ""]
    meta = [f"created {report['created']}"] if report.get("created") else []
    if report.get("k"):
        meta.append("k = " + ", ".join(str(k) for k in report["k"]))
    lines += ["; ".join(meta) + ".", ""] if meta else []
    for name, where in (report.get("data") or {}).items():
        lines.append(f"- data `{name}`: `{where}`")
    lines += [""] if report.get("data") else []
    if not grid.models:
        return "\n".join(lines + ["No results.", ""])
    lines += ["## Summary", ""] + _md_table(_summary_rows(grid)) + [""]
    chance = ", ".join(f"{grid.labels[t]} `{grid.primary(t)}` {_chance_pct(grid.chance(t))}" for t in grid.tasks)
    lines += [f"Cells: each task's primary metric in %; {MISSING} where a model was not run. "
              f"Primary metric and chance level per task: {chance}.", "", "## Details", ""]
    for task in grid.tasks:
        lines += _details(report, grid, task)
    return "\n".join(lines).rstrip("\n") + "\n"


def summary_lines(report: dict[str, Any]) -> list[str]:
    """The summary table for the terminal: a header, a rule, one line per model row, then chance."""
    grid = _grid(report)
    if not grid.models:
        return ["no results"]
    rows = _summary_rows(grid) + [["(chance)"] + [_chance_pct(grid.chance(t)) for t in grid.tasks]]
    return format_table(rows).splitlines()


def write_json(report: dict[str, Any], path: str | os.PathLike) -> None:
    """Write the report as JSON, atomically."""
    files.write_json(path, report)


def write_markdown(report: dict[str, Any], path: str | os.PathLike) -> None:
    """Write the report as Markdown, atomically."""
    with files.atomic_path(path) as tmp:
        tmp.write_text(markdown(report), encoding="utf-8")


def plot(report: dict[str, Any], path: str | os.PathLike) -> None:
    """Write a PNG of grouped horizontal bars: one group per task, one bar per model row, chance marked."""
    import matplotlib
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    grid = _grid(report)
    tasks = [t for t in grid.tasks if grid.primary(t) not in SUMS]
    n_tasks, n_models = max(len(tasks), 1), max(len(grid.models), 1)
    group = 0.82  # share of a task's band the bars fill
    bar = group / n_models
    height = 1.6 + n_tasks * (0.26 * n_models + 0.3)
    fig = Figure(figsize=(10, height), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    cmap = matplotlib.colormaps["tab10" if n_models <= 10 else "tab20"]
    palette = [cmap(i % cmap.N) for i in range(n_models)]
    for i, task in enumerate(tasks):
        if i % 2:
            ax.axhspan(i - 0.5, i + 0.5, color="0.94", zorder=0)
        for j, m in enumerate(grid.models):
            y = i - group / 2 + bar * (j + 0.5)
            value = _primary_value(grid.row(m, task))
            if value is None:
                chance = grid.chance(task) or 0.0
                ax.text(100 * chance + 0.8, y, "not run", va="center", ha="left", fontsize=7, color="0.5",
                        style="italic")
                continue
            ax.barh(y, 100 * value, height=bar * 0.9, color=palette[j], zorder=2)
            ax.text(100 * value + 0.8, y, pct(value), va="center", ha="left", fontsize=7.5, zorder=3)
        chance = grid.chance(task)
        if chance is not None:
            ax.plot([100 * chance] * 2, [i - 0.47, i + 0.47], color="black", lw=1.4, ls=(0, (3, 2)), zorder=4)
    ax.set_yticks(range(len(tasks)))
    ax.set_yticklabels([f"{grid.labels[t]}\n{grid.primary(t)}"
                        + ("" if grid.chance(t) is None else f", chance {_chance_pct(grid.chance(t))}")
                        for t in tasks], fontsize=9)
    ax.set_ylim(n_tasks - 0.5, -0.5)  # first task at the top, first model at the top of each group
    ax.set_xlim(0, 108)
    ax.set_xticks(range(0, 101, 10))
    ax.set_xlabel("primary metric (%)")
    ax.xaxis.grid(True, color="0.85", zorder=1)
    ax.set_axisbelow(True)
    ax.tick_params(axis="y", length=0)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
    if not grid.models:
        ax.text(54, 0, "no results", ha="center", va="center", fontsize=12, color="0.4")
    handles = [Patch(color=palette[j], label=grid.labels[m]) for j, m in enumerate(grid.models)]
    handles.append(Line2D([], [], color="black", lw=1.4, ls=(0, (3, 2)), label="chance"))
    ncol = math.ceil(len(handles) / math.ceil(len(handles) / 5))  # at most 5 per row, rows balanced
    ax.legend(handles=handles, loc="lower left", bbox_to_anchor=(0, 1.0), ncol=ncol, frameon=False, fontsize=9)
    title = "Retrieval eval: primary metric per task"
    fig.suptitle(title + (f"  ({report['created']})" if report.get("created") else ""), fontsize=12)
    with files.atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
