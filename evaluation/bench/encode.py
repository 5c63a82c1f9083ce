"""`retrieval bench encode`: the whole encode job against the bare model forward, side by side in one process.

Both run on the same ShapesWorld items, at the same batch size, device and torch thread count. The bare
forward is `encoder.embed` over batches already prepared and collated in memory (at most `MAX_PREPARED_BYTES`
of distinct items, cycled to cover all N); the job is `retrieval.encode.encode_corpus` from corpus.jsonl to
a complete Parquet store. The bare forward runs before and after the job; the faster pass is the reference,
and the spread between the two shows how noisy the machine was.
The bar (DESIGN.md): job ≥ 90 % of bare, and peak memory flat in the corpus size.
"""

from __future__ import annotations

import contextlib
import gc
import os
import platform
import tempfile
from pathlib import Path
from typing import Any

from evaluation.bench.common import PeakRSS, children_peak_rss, format_table, mib, rss_bytes, thread_count, timed

BAR_RATIO = 0.90
MAX_PREPARED_BYTES = 256 * 2**20  # distinct prepared items held in memory for the bare forward
WARMUP_BATCHES = 3


def batch_sizes(n: int, batch_size: int, part_size: int) -> list[int]:
    """The batch sizes of the encode job's plan: batches never straddle a part."""
    return [min(lo + batch_size, (p + 1) * part_size, n) - lo
            for p in range(-(-n // part_size))
            for lo in range(p * part_size, min((p + 1) * part_size, n), batch_size)]


def _prepared_batches(encoder, images: list[str], texts: list[str], batch_size: int, progress: bool
                      ) -> tuple[list, float]:
    """Collated batches of distinct prepared items within the byte cap, and the seconds decode + prepare took."""
    from tqdm import tqdm

    from retrieval.images import load_image

    first = encoder.prepare(load_image(images[0]), texts[0])
    per_item = sum(t.nelement() * t.element_size() for t in first.values())
    cap = max(batch_size, MAX_PREPARED_BYTES // max(per_item, 1) // batch_size * batch_size)
    count = min(len(images), cap)
    items = [first]
    with timed() as t:
        for img, txt in tqdm(zip(images[1:count], texts[1:count]), total=count - 1, desc="prepare (bare)",
                             unit="item", disable=not progress, dynamic_ncols=True):
            items.append(encoder.prepare(load_image(img), txt))
    return [encoder.collate(items[i:i + batch_size]) for i in range(0, count, batch_size)], t["seconds"]


def _bare_forward(encoder, batches: list, sizes: list[int], progress: bool) -> float:
    """Seconds to embed batches of the given sizes, cycling over the prepared ones."""
    from tqdm import tqdm

    for j in range(WARMUP_BATCHES):
        encoder.embed(batches[j % len(batches)]).numpy()
    bar = tqdm(total=sum(sizes), desc="bare forward", unit="item", disable=not progress, dynamic_ncols=True)
    with timed() as t:
        for j, size in enumerate(sizes):
            batch = batches[j % len(batches)]
            if size < len(next(iter(batch.values()))):
                batch = {key: value[:size] for key, value in batch.items()}
            encoder.embed(batch).numpy()
            bar.update(size)
    bar.close()
    return t["seconds"]


def _write_warmup_corpus(corpus: Path, count: int) -> Path:
    """A corpus of the first `count` items (same images), for warming the job's code paths."""
    path = corpus.with_name("warmup.jsonl")
    path.write_text("".join(line + "\n" for line in corpus.read_text().splitlines()[:count]))
    return path


def random_init_checkpoint(name: str, out: Path) -> str:
    """Registered model `name` with its seeded initial weights and a stand-in text tokenizer (the bundled BPE
    under the model's special ids), saved as a checkpoint folder: to time a full-size model whose weights are not
    here. A model that runs without a checkpoint is returned by name."""
    from dataclasses import replace

    from retrieval.encoders.registry import family_class, get_config, initial_model
    from retrieval.text_tokenizer import OWN_IDS, TextTokenizer
    from retrieval.training.run import BUNDLED_TOKENIZERS

    config = get_config(name)
    cls = family_class(config.family)
    if not cls.requires_checkpoint:
        return name
    model = initial_model(config)
    tokenizer = TextTokenizer.load(BUNDLED_TOKENIZERS, getattr(model.config, "special_ids", OWN_IDS))
    return str(cls(replace(config, checkpoint=None), model, tokenizer=tokenizer).save(out))


def bench_encode(model: str, n: int = 10_000, device: str = "auto", batch_size: int = 256,
                 workers: int | None = None, image_size: int | None = None, threads: int | None = None,
                 part_size: int = 10_000, seed: int = 0, work_dir: str | os.PathLike | None = None,
                 random_init: bool = False, progress: bool = True) -> dict[str, Any]:
    """Time the whole encode job and the bare forward on the same N ShapesWorld items; returns the report.
    `random_init`: a registered model at its initial weights (`random_init_checkpoint`)."""
    import torch

    from evaluation.shapesworld import make_shapesworld
    from retrieval.corpus import read_corpus
    from retrieval.devices import resolve_device
    from retrieval.encode import default_workers, encode_corpus
    from retrieval.encoders import load_encoder
    from retrieval.errors import RetrievalError
    from retrieval.store import EmbeddingStore

    if n <= 0 or batch_size <= 0 or part_size <= 0:
        raise RetrievalError("--n, --batch-size and --part-size must be positive")
    if threads is not None and threads <= 0:
        raise RetrievalError("--threads must be positive")
    if work_dir is not None and Path(work_dir).exists() and any(Path(work_dir).iterdir()):
        raise RetrievalError(f"{work_dir} is not empty: the bench needs a fresh folder (a store there would resume)")
    device = resolve_device(device)
    workers = default_workers() if workers is None else workers
    workspace = (tempfile.TemporaryDirectory(prefix="bench-encode-") if work_dir is None
                 else contextlib.nullcontext(str(work_dir)))
    with workspace as folder, thread_count(threads):
        root = Path(folder)
        if random_init:
            model = random_init_checkpoint(model, root / "random-init")
        encoder = load_encoder(model, device=device)
        image_size = image_size or encoder.config.image_size
        threads = torch.get_num_threads()
        with timed() as t_gen:
            corpus_path = make_shapesworld(root / "data", n=n, size=image_size, seed=seed, train_pairs=False,
                                           progress=progress)
        corpus = read_corpus(corpus_path)
        images, texts = corpus.table["image"].to_pylist(), corpus.table["text"].to_pylist()

        batches, prepare_seconds = _prepared_batches(encoder, images, texts, batch_size, progress)
        prepared = sum(len(next(iter(b.values()))) for b in batches)
        sizes = batch_sizes(n, batch_size, part_size)
        load_before = os.getloadavg()[0]
        bare_before = _bare_forward(encoder, batches, sizes, progress)
        del batches  # the job and its forked workers must not carry the bench's own data
        gc.collect()

        warm = _write_warmup_corpus(corpus_path, min(n, 2 * batch_size))
        encode_corpus(warm, root / "warmup-store", model, batch_size=batch_size, workers=workers, device=device,
                      part_size=part_size, progress=False)
        store_path = root / "store"
        rss_before = rss_bytes()
        with PeakRSS() as rss, timed() as t_job:
            summary = encode_corpus(corpus_path, store_path, model, batch_size=batch_size, workers=workers,
                                    device=device, part_size=part_size, progress=progress)
        first_half, second_half = rss.halves()
        store = EmbeddingStore(store_path)
        store_bytes = sum(p.stat().st_size for p in store.part_paths)
        job_seconds = t_job["seconds"]
        batches, _ = _prepared_batches(encoder, images, texts, batch_size, progress)
        bare_after = _bare_forward(encoder, batches, sizes, progress)  # a second pass: shows the noise
        load_after = os.getloadavg()[0]
        del batches

    bare_seconds = min(bare_before, bare_after)  # the faster pass is the reference: the harder bar
    bare_ips = n / bare_seconds if bare_seconds > 0 else float("inf")
    job_ips = n / job_seconds if job_seconds > 0 else float("inf")
    ratio = job_ips / bare_ips
    growth = max(rss.peak - rss_before, 0)
    return {
        "benchmark": "encode",
        "model": encoder.name,
        "random_init": random_init,
        "dim": encoder.dim,
        "device": device,
        "n": n,
        "image_size": image_size,
        "batch_size": batch_size,
        "workers": workers,
        "torch_threads": threads,
        "part_size": part_size,
        "cpu_count": os.cpu_count(),
        "machine": platform.machine(),
        "data_seconds": round(t_gen["seconds"], 3),
        "load_avg_1m": [round(load_before, 2), round(load_after, 2)],
        "bare": {"items": n, "distinct_prepared_items": prepared, "seconds": bare_seconds,
                 "items_per_s": bare_ips, "passes_items_per_s": [n / bare_before, n / bare_after]},
        "prepare": {"items": prepared - 1, "seconds": prepare_seconds,  # the first item sized the cap
                    "items_per_s": (prepared - 1) / prepare_seconds if prepare_seconds > 0 else None},
        "job": {"items": summary.items, "encoded": summary.encoded, "errors": summary.errors,
                "seconds": job_seconds, "items_per_s": job_ips, "store_complete": store.complete,
                "store_rows": store.count, "store": str(store_path) if work_dir is not None else None},
        "ratio": ratio,
        "bar": {"min_ratio": BAR_RATIO, "holds": ratio >= BAR_RATIO},
        "memory": {
            "rss_before_job": rss_before,
            "rss_peak_job": rss.peak,
            "rss_growth_job": growth,
            "rss_peak_first_half": first_half,
            "rss_peak_second_half": second_half,
            "second_over_first_half": second_half / first_half if first_half else None,
            "workers_peak_rss": children_peak_rss() if workers else None,
            "store_bytes": store_bytes,
            "vector_bytes": n * encoder.dim * 4,
            "growth_over_store": growth / store_bytes if store_bytes else None,
        },
    }


def report_lines(report: dict[str, Any]) -> list[str]:
    """The printed form of a `bench_encode` report: throughput table, ratio against the bar, memory table."""
    bare, job, mem, prep = report["bare"], report["job"], report["memory"], report["prepare"]
    verdict = "holds" if report["bar"]["holds"] else "MISSED"
    weights = " at random initial weights" if report.get("random_init") else ""
    lines = [f"encode bench: {report['model']}{weights} (dim {report['dim']}) on {report['device']}, {report['n']} "
             f"ShapesWorld items ({report['image_size']} px), batch {report['batch_size']}, "
             f"{report['workers']} loader workers, {report['torch_threads']} torch threads, "
             f"{report['cpu_count']} CPUs (1-min load average {report['load_avg_1m'][0]:.1f} before, "
             f"{report['load_avg_1m'][1]:.1f} after)", ""]
    lines.append(format_table([
        ["", "items", "seconds", "items/s", "vs bare"],
        ["bare forward (embed on prepared batches)", str(bare["items"]), f"{bare['seconds']:.2f}",
         f"{bare['items_per_s']:.0f}", "1.00"],
        ["whole job (read, decode, embed, write)", str(job["items"]), f"{job['seconds']:.2f}",
         f"{job['items_per_s']:.0f}", f"{report['ratio']:.2f}"],
    ] + ([["(info) decode + prepare alone, main process", str(prep["items"]), f"{prep['seconds']:.2f}",
           f"{prep['items_per_s']:.0f}", f"{prep['items_per_s'] / bare['items_per_s']:.2f}"]]
         if prep["items_per_s"] else [])))
    lines += ["", f"job / bare = {job['items_per_s']:.0f} / {bare['items_per_s']:.0f} items/s = "
              f"{report['ratio']:.3f}  (bar ≥ {report['bar']['min_ratio']:.2f}: {verdict})",
              "bare forward passes before / after the job: "
              + " / ".join(f"{x:.0f}" for x in bare["passes_items_per_s"]) + " items/s (the faster is the reference)",
              f"store: {job['store_rows']} rows, {job['errors']} errors, complete={job['store_complete']}", ""]
    growth_note = (f"{mem['growth_over_store']:.2f} × store size" if mem["growth_over_store"] is not None else "")
    halves = mem["second_over_first_half"]
    rows = [["memory", "bytes", "note"],
            ["main RSS before job", mib(mem["rss_before_job"]), ""],
            ["main RSS peak during job", mib(mem["rss_peak_job"]), f"+{mib(mem['rss_growth_job'])}"],
            ["  peak in 1st half of job", mib(mem["rss_peak_first_half"]), ""],
            ["  peak in 2nd half of job", mib(mem["rss_peak_second_half"]),
             f"{halves:.2f} × 1st half" if halves else ""],
            ["RSS growth over the job", mib(mem["rss_growth_job"]), growth_note],
            ["store (Parquet parts)", mib(mem["store_bytes"]), f"vectors alone {mib(mem['vector_bytes'])}"]]
    if mem["workers_peak_rss"] is not None:
        rows.insert(5, ["loader worker peak RSS", mib(mem["workers_peak_rss"]), "largest child"])
    lines.append(format_table(rows))
    return lines
