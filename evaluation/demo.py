"""`retrieval demo`: the whole path on generated data and the bundled models, offline, in a few minutes.

It makes small ShapesWorld and Digits corpora, builds an index per bundled model over the candidates of
four tasks, asks one query of each kind (image + instruction, image + question, text → image,
image → text), prints the top hits, writes one contact sheet per query kind, and ends with the eval
table of every model × task.
"""

from __future__ import annotations

import os
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw
from tqdm import tqdm

from evaluation.data import make_data
from evaluation.tasks import Query, read_task
from retrieval.files import write_json
from retrieval.images import load_image, save_image

BUNDLED = ("fuselip-tiny", "sparc-tiny", "fdt-tiny")
THUMB = 96
CAPTION = 30


@dataclass(frozen=True)
class QueryKind:
    name: str  # what the user asks
    slug: str  # file name of its contact sheet
    task: str  # the ShapesWorld task whose candidates are the gallery
    type: str | None = None  # the sub-task to take the query from


KINDS = (QueryKind("image + instruction", "image-instruction", "tgit", "rotate"),
         QueryKind("image + question", "image-question", "vqa", "count"),
         QueryKind("text → image", "text-image", "t2i"),
         QueryKind("image → text", "image-text", "i2t"))


def pick_query(task, kind: QueryKind) -> Query:
    """The first query of the kind's type (deterministic for a given data seed)."""
    return next(q for q in task.queries if kind.type is None or q.type == kind.type)


def run_demo(out: str | os.PathLike = "demo", models: tuple[str, ...] = BUNDLED, n_shapes: int = 400,
             n_digits: int = 300, k: int = 5, device: str = "auto", progress: bool = True,
             echo=print) -> dict[str, Any]:
    """Run the demo into `out`; returns what it wrote and found (also saved as demo.json)."""
    from evaluation import report
    from evaluation.evaluate import run_eval
    from retrieval.indexing import build_index_folder
    from retrieval.search import open_index

    out = Path(out)
    data = {name: out / "data" / name for name in ("shapesworld", "digits")}
    for name, n in (("shapesworld", n_shapes), ("digits", n_digits)):
        if not (data[name] / "dataset.json").is_file():
            make_data(name, data[name], n=n, train_pairs=False, progress=progress)
    tasks = {kind.task: read_task(data["shapesworld"] / "tasks" / kind.task) for kind in KINDS}
    results: dict[str, dict[str, list]] = {kind.name: {} for kind in KINDS}
    steps = [(model, kind) for model in models for kind in KINDS]
    for model, kind in tqdm(steps, desc="index + search", unit="index", disable=not progress):
        folder = out / "indexes" / model / kind.task
        if not (folder / "index.json").is_file():
            build_index_folder(tasks[kind.task].root / "candidates.jsonl", folder, model=model, device=device,
                               progress=False, encode_options={"device": device, "workers": 0})
        query = pick_query(tasks[kind.task], kind)
        hits = open_index(folder, device=device).search(image=query.item.image, text=query.item.text, k=k)
        results[kind.name][model] = [(h, h.id in query.positives) for h in hits]
    sheets = []
    for kind in KINDS:
        query = pick_query(tasks[kind.task], kind)
        echo("")
        echo(f"{kind.name}: {describe(query)}")
        for model in models:
            cells = [f"{'✓' if hit_ok else ' '}{short(h.text if h.text and not h.image else h.id)} {h.score:.2f}"
                     for h, hit_ok in results[kind.name][model]]
            echo(f"  {model:<13} " + " | ".join(cells))
        sheets.append(contact_sheet(query, results[kind.name], k, out / f"contact-{kind.slug}.png"))
    echo("")
    echo(f"(✓ marks a correct hit; contact sheets: {', '.join(str(s) for s in sheets)})")
    evaluation = run_eval("all", ",".join(models), data=list(data.values()), device=device, progress=progress)
    report.write_json(evaluation, out / "eval.json")
    report.write_markdown(evaluation, out / "eval.md")
    echo("")
    for line in report.summary_lines(evaluation):
        echo(line)
    summary = {"out": str(out), "models": list(models), "sheets": [str(s) for s in sheets],
               "eval": str(out / "eval.json"),
               "queries": {kind.name: {m: [h.id for h, _ in results[kind.name][m]] for m in models}
                           for kind in KINDS}}
    write_json(out / "demo.json", summary)
    return summary


def describe(query: Query) -> str:
    parts = [f"image {Path(query.item.image).name}" if query.item.image else None,
             f'"{query.item.text}"' if query.item.text else None]
    return " + ".join(p for p in parts if p) + f" (answer: {', '.join(query.positives)})"


def short(text: str, width: int = 24) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 1] + "…"


def contact_sheet(query: Query, hits_by_model: dict[str, list], k: int, path: Path) -> Path:
    """One row per model: the query (image and text) beside its top k hits, with scores; correct hits framed
    green, others grey."""
    models = list(hits_by_model)
    cell_w, cell_h = THUMB + 8, THUMB + CAPTION + 8
    sheet = Image.new("RGB", (cell_w * (k + 2), cell_h * len(models)), "white")
    draw = ImageDraw.Draw(sheet)
    for row, model in enumerate(models):
        top = row * cell_h
        draw.text((4, top + THUMB // 2), model, fill="black")
        paste_item(sheet, draw, (cell_w + 4, top + 4), query.item.image, query.item.text, "query", "blue")
        for col, (hit, correct) in enumerate(hits_by_model[model], start=2):
            paste_item(sheet, draw, (col * cell_w + 4, top + 4), hit.image, hit.text, f"#{hit.rank} {hit.score:.3f}",
                       "green" if correct else "gray")
    save_image(sheet, path)
    return path


def paste_item(sheet: Image.Image, draw: ImageDraw.ImageDraw, at: tuple[int, int], image: str | None,
               text: str | None, label: str, frame: str) -> None:
    """An item's thumbnail (or its text, wrapped) with a label underneath, in a coloured frame."""
    x, y = at
    if image:
        sheet.paste(load_image(image).convert("RGB").resize((THUMB, THUMB), Image.Resampling.BICUBIC), (x, y))
    if text:
        lines = textwrap.wrap(text, 16)[: (2 if image else 7)]
        start = y + THUMB - 12 * len(lines) if image else y + 2
        if image:  # a dark band under the words keeps them readable over any picture
            draw.rectangle((x, start - 1, x + THUMB - 1, y + THUMB - 1), fill=(0, 0, 0))
        for i, line in enumerate(lines):
            draw.text((x + 2, start + 12 * i), line, fill="white" if image else "black")
    draw.rectangle((x - 2, y - 2, x + THUMB + 1, y + THUMB + 1), outline=frame, width=2)
    draw.text((x, y + THUMB + 4), label, fill="black")
