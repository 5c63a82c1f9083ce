"""`retrieval demo`: the whole path on generated data and the bundled models, offline, in a few minutes.

It makes small ShapesWorld and Digits corpora, builds an index per bundled model over the candidates of
four tasks, asks one query of each kind (image + instruction, image + question, text → image,
image → text) the way its task asks it (an image + instruction among the edits of that scene of the
instruction's type, as `tgit` does; the others among the task's whole pool), prints the top hits, writes
one contact sheet per query kind, and ends with the eval table of every model × task.
"""

from __future__ import annotations

import os
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
QUERY_COLS = 2  # the query's cell: its image, and its text beside it


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


EDITS = {"crop": "crops", "rotate": "rotations", "jitter": "colour jitters", "flip": "flips",
         "color": "colour versions"}  # a tgit type's edits, in words
POOLS = {"t2i": "test images", "i2t": "test captions", "vqa": "answers"}  # a pool task's candidates, in words
POOL_NOTE = {"tgit": " (tgit-pool: among every edit of every test scene)"}  # how the task's pool twin asks it


def pick_query(task, kind: QueryKind) -> Query:
    """The first query of the kind's type (deterministic for a given data seed)."""
    return next(q for q in task.queries if kind.type is None or q.type == kind.type)


def gallery(task, query: Query) -> tuple[str | None, str]:
    """Where the task ranks this query: a `where` filter (None: the whole pool) and that gallery in words.

    A `candidates` task (tgit) ranks each query among its own candidates, the edits of its scene of the
    instruction's type; a `pool` task among every candidate."""
    if query.candidates is None:
        return None, f"among all {len(task.candidates)} {POOLS.get(task.name, task.name + ' candidates')}"
    where = "id IN (" + ", ".join("'" + c.replace("'", "''") + "'" for c in query.candidates) + ")"
    edits = EDITS.get(query.type or "", f"{query.type} edits")
    return where, f"among the {len(query.candidates)} {edits} of that scene only"


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
        where, _ = gallery(tasks[kind.task], query)
        hits = open_index(folder, device=device).search(image=query.item.image, text=query.item.text, k=k,
                                                        where=where)
        results[kind.name][model] = [(h, h.id in query.positives) for h in hits]
    sheets = []
    for kind in KINDS:
        query = pick_query(tasks[kind.task], kind)
        _, among = gallery(tasks[kind.task], query)
        echo("")
        echo(f"{kind.name}: {describe(query)}")
        echo(f"  asked {among}, as the {kind.task} task asks it{POOL_NOTE.get(kind.task, '')}")
        for model in models:
            cells = [f"{'✓' if hit_ok else ' '}{short(h.text if h.text and not h.image else h.id)} {h.score:.2f}"
                     for h, hit_ok in results[kind.name][model]]
            echo(f"  {model:<13} " + " | ".join(cells))
        sheets.append(contact_sheet(query, results[kind.name], k, out / f"contact-{kind.slug}.png", among))
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


def contact_sheet(query: Query, hits_by_model: dict[str, list], k: int, path: Path, among: str = "") -> Path:
    """One row per model: the model's name, the query (its image, with its text and gallery beside it, so
    the words hide nothing) and its top k hits with rank and score; correct hits framed green, others grey."""
    models = list(hits_by_model)
    cell_w, cell_h = THUMB + 8, THUMB + CAPTION + 8
    sheet = Image.new("RGB", (cell_w * (k + 1 + QUERY_COLS), cell_h * len(models)), "white")
    draw = ImageDraw.Draw(sheet)
    for row, model in enumerate(models):
        top = row * cell_h
        draw.text((4, top + THUMB // 2), model, fill="black")
        paste_query(sheet, draw, (cell_w + 4, top + 4), query, among, width=QUERY_COLS * cell_w - 8)
        for col, (hit, correct) in enumerate(hits_by_model[model], start=1 + QUERY_COLS):
            x, y = col * cell_w + 4, top + 4
            paste_item(sheet, draw, (x, y), hit.image, hit.text, "green" if correct else "gray")
            score = f"{hit.score:.3f}"  # rank left, score right-aligned: parted by more than a thin space
            draw.text((x, y + THUMB + 4), f"#{hit.rank}", fill="black")
            draw.text((x + THUMB - draw.textlength(score), y + THUMB + 4), score, fill="black")
    save_image(sheet, path)
    return path


def paste_query(sheet: Image.Image, draw: ImageDraw.ImageDraw, at: tuple[int, int], query: Query, among: str,
                width: int) -> None:
    """The query in a blue frame `width` wide: its image on the left and its words beside it (or, without an
    image, across), then, in grey, where it is asked."""
    x, y = at
    text_x = x + 4
    if query.item.image:
        sheet.paste(thumbnail(query.item.image), (x, y))
        text_x += THUMB
    notes = wrap(draw, among, x + width - text_x)[:3]
    lines = wrap(draw, query.item.text or "", x + width - text_x)[: ROWS - 1 - len(notes)]
    for i, line in enumerate(lines):
        draw_words(draw, (text_x, y + 2 + LINE * i), line, "black")
    for i, line in enumerate(notes, start=len(lines) + 1 if lines else 0):  # a blank row between
        draw_words(draw, (text_x, y + 2 + LINE * i), line, "dimgray")
    draw.rectangle((x - 2, y - 2, x + width + 1, y + THUMB + 1), outline="blue", width=2)
    draw.text((x, y + THUMB + 4), "query", fill="black")


def thumbnail(image: str) -> Image.Image:
    return load_image(image).convert("RGB").resize((THUMB, THUMB), Image.Resampling.BICUBIC)


def paste_item(sheet: Image.Image, draw: ImageDraw.ImageDraw, at: tuple[int, int], image: str | None,
               text: str | None, frame: str) -> None:
    """A hit: its thumbnail, or its text wrapped, in a coloured frame."""
    x, y = at
    if image:
        sheet.paste(thumbnail(image), (x, y))
    elif text:
        rows = wrap(draw, text, THUMB - 4)
        if len(rows) > ROWS:  # cut: its last word gives way to an ellipsis
            rows = rows[:ROWS]
            rows[-1] = rows[-1][:-1] + ["…"]
        for i, line in enumerate(rows):
            draw_words(draw, (x + 2, y + 2 + LINE * i), line, "black")
    draw.rectangle((x - 2, y - 2, x + THUMB + 1, y + THUMB + 1), outline=frame, width=2)


LINE = 12  # px per row of text
ROWS = (THUMB - 4) // LINE  # rows of text in a cell
GAP = 4  # px between words: the default font's space is 2 px, which runs words together


def wrap(draw: ImageDraw.ImageDraw, text: str, width: float) -> list[list[str]]:
    """`text`'s words in rows at most `width` px wide, words GAP px apart (a longer word gets a row of its own)."""
    rows: list[list[str]] = []
    used = width + 1
    for word in text.split():
        length = draw.textlength(word)
        if rows and used + GAP + length <= width:
            rows[-1].append(word)
            used += GAP + length
        else:
            rows.append([word])
            used = length
    return rows


def draw_words(draw: ImageDraw.ImageDraw, at: tuple[float, float], words: list[str], fill: str) -> None:
    x, y = at
    for word in words:
        draw.text((x, y), word, fill=fill)
        x += draw.textlength(word) + GAP
