"""The encode job: corpus → embedding store, resumable, with background Parquet writes.

Reader: worker processes of a torch DataLoader load images and run `encoder.prepare`.
Mapper: the main process embeds each batch on the device.
Writer: a thread assembles parts and commits them (part file, errors.parquet, then manifest.json,
each written atomically). The plan is deterministic — part i always covers corpus positions
[i·part_size, (i+1)·part_size) — so a killed job rerun with the same command resumes after the
last committed part and ends with every item exactly once.
With `engine="ray"` the reader and mapper run on a Ray cluster instead (retrieval.encode_ray); the writer and the
resume are the same, so the store is the same.
"""

from __future__ import annotations

import os
import queue
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from retrieval.corpus import Corpus, read_corpus
from retrieval.errors import RetrievalError
from retrieval.files import atomic_path, check_out_folder, folder_lock, remove_leftovers
from retrieval.images import ImageReadError, load_image
from retrieval.paths import PathPolicy, excerpt
from retrieval.ray_cluster import check_engine
from retrieval.store import DTYPES, ERRORS, embedding_array, write_part
from retrieval.store import write_manifest as commit_manifest
from retrieval.store_manifest import FORMAT, MANIFEST, VERSION, current_version, next_row, part_name


@dataclass
class EncodeSummary:
    store: Path
    items: int
    encoded: int
    errors: int
    seconds: float
    error_reasons: dict[str, int] = field(default_factory=dict)
    resumed_from: int = 0

    @property
    def items_per_second(self) -> float:
        done = self.items - self.resumed_from
        return done / self.seconds if self.seconds > 0 else 0.0

    def lines(self) -> list[str]:
        out = [f"store {self.store}: {self.encoded} items encoded, {self.errors} skipped "
               f"({self.items} in the corpus)"]
        if self.resumed_from:
            out.append(f"resumed after {self.resumed_from} items already committed")
        out.append(f"{self.seconds:.1f} s, {self.items_per_second:.1f} items/s")
        out += [f"  skipped: {n} × {reason}" for reason, n in sorted(self.error_reasons.items())]
        return out


class PreparedItems:
    """Map-style dataset over corpus positions; runs in loader workers."""

    def __init__(self, corpus: Corpus, encoder):
        t = corpus.table
        self.ids = t["id"].to_pylist()
        self.images = t["image"].to_pylist()
        self.texts = t["text"].to_pylist()
        self.errors = t["error"].to_pylist()
        self.paths = corpus.paths
        self.encoder = encoder

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, position: int) -> tuple[int, Any]:
        return position, prepare_item(self.encoder, self.images[position], self.texts[position],
                                      self.errors[position], self.paths)

    def collate(self, items: list[tuple[int, Any]]) -> tuple[list[int], Any, list[tuple[int, str]]]:
        good = [(p, x) for p, x in items if not isinstance(x, str)]
        bad = [(p, x) for p, x in items if isinstance(x, str)]
        batch = self.encoder.collate([x for _, x in good]) if good else None
        return [p for p, _ in good], batch, bad


def prepare_item(encoder, image: str | None, text: str | None, error: str | None, paths: PathPolicy) -> Any:
    """An item's prepared tensors, or the reason it cannot be encoded (a string)."""
    if error is not None:
        return error
    try:
        return encoder.prepare(load_image(image, policy=paths) if image else None, text)
    except ImageReadError as e:
        return str(e)
    except Exception as e:  # a bad item must never stop the job; its reason is kept
        return f"cannot prepare item: {type(e).__name__}: {e}"


def _worker_init(_: int) -> None:
    import torch

    torch.set_num_threads(1)


def reason_kind(reason: str) -> str:
    """The reason without its specifics, for counting: 'image not found: a.jpg' → 'image not found'."""
    return reason.split(":")[0].split(" (")[0].strip()


MAX_WORKERS = 64  # each is a process holding a copy of the corpus table


def default_workers() -> int:
    return min(4, os.cpu_count() or 1)


def encode_corpus(corpus_path: str | os.PathLike, out: str | os.PathLike, model: str,
                  batch_size: int = 256, workers: int | None = None, device: str = "auto",
                  dtype: str = "float32", strict: bool = False, part_size: int = 10_000,
                  progress: bool = True, fusion: str | None = None, sparse_codes: bool = False,
                  follow_symlinks: bool = False, root_only: bool = False, engine: str = "local",
                  ray: dict[str, Any] | None = None) -> EncodeSummary:
    """Encode a corpus into an embedding store at `out`, resuming a previous run of the same job.
    `follow_symlinks` / `root_only`: which files the corpus may read (retrieval.paths). `engine` "ray" runs the
    reading and embedding on a Ray cluster, with `ray` options (retrieval.encode_ray.RayOptions)."""
    check_encode_options(batch_size=batch_size, workers=workers, dtype=dtype, part_size=part_size)
    check_engine(engine)
    embedded = None
    if engine == "ray":
        from retrieval.encode_ray import RayOptions, ray_embedded

        options = RayOptions(**(ray or {}), device=device, fusion=fusion, model=model)
        embedded = ray_embedded(options)
        device = "cpu"  # the driver's copy of the encoder only describes the model and prepares nothing
    out = Path(out)
    check_out_folder(out, "an embedding store", lambda folder: (folder / MANIFEST).is_file())
    from retrieval.encoders import load_encoder
    from retrieval.encoders.families import require

    started = time.perf_counter()
    corpus = read_corpus(corpus_path, follow_symlinks=follow_symlinks, root_only=root_only)
    encoder = load_encoder(model, device=device, fusion=fusion)
    if sparse_codes:
        require(encoder, "sparse_codes", "--sparse-codes")
    with folder_lock(out, "encode job"):
        return encode_items(corpus, out, encoder, batch_size, workers, dtype, strict, part_size, progress,
                            sparse_codes, started, embedded=embedded)


def check_encode_options(batch_size: int = 256, workers: int | None = None, dtype: str = "float32",
                         part_size: int = 10_000, **_: Any) -> None:
    """Refuse encode options that cannot work, before anything is read or written."""
    if dtype not in DTYPES:
        raise RetrievalError(f"unknown dtype {dtype!r}: use {' or '.join(DTYPES)}")
    if batch_size <= 0 or part_size <= 0:
        raise RetrievalError("--batch-size and --part-size must be positive")
    if workers is not None and not 0 <= workers <= MAX_WORKERS:
        raise RetrievalError(f"--workers must be 0 (read in this process) to {MAX_WORKERS}, got {workers}")


Embedded = tuple[range, list[int], np.ndarray, dict[str, list], list[tuple[int, str]]]
"""A run of consecutive corpus positions, embedded: (positions, the good ones, their vectors, their extra column
values, (position, reason) of the bad ones)."""
Embedder = Callable[[Corpus, Any, int, int, bool, int], Iterator[Embedded]]
"""(corpus, encoder, first position, batch size, sparse codes, part size) → the embedded runs, in corpus order."""


def encode_items(corpus: Corpus, out: Path, encoder, batch_size: int, workers: int | None, dtype: str, strict: bool,
                 part_size: int, progress: bool, sparse_codes: bool, started: float, first_row: int = 0,
                 first_part: int = 0, embedded: Embedder | None = None) -> EncodeSummary:
    """Encode a read corpus into the store at `out` (locked by the caller), resuming; its rows get ids from
    `first_row` and its parts numbers from `first_part` (a store that items are added to gives both).
    `embedded`: where the items are prepared and embedded (default: here, with `workers` loader processes)."""
    from tqdm import tqdm

    manifest = _start_or_resume(out, corpus, encoder, dtype, part_size, sparse_codes, first_row, first_part)
    n = len(corpus)
    done_parts = len(manifest["parts"])
    start = min(done_parts * part_size, n)
    errors = _committed_errors(out, start)
    if strict and errors:
        raise RetrievalError(f"--strict: item {errors[0]['id']!r}: {errors[0]['error']}")
    embedded = embedded or local_embedded(workers)
    writer = _PartWriter(out, corpus, manifest, dtype, errors)
    bar = tqdm(total=n, initial=start, unit="item", desc=f"encode {encoder.name}",
               disable=not progress, dynamic_ncols=True)
    ids = corpus.table["id"]
    try:
        for positions, good, vectors, extra, bad in embedded(corpus, encoder, start, batch_size, sparse_codes,
                                                             part_size):
            if strict and bad:
                raise RetrievalError(f"--strict: item {ids[bad[0][0]].as_py()!r}: {bad[0][1]}")
            writer.put(positions, good, vectors, extra, bad)
            bar.update(len(positions))
        writer.close()
    except BaseException:
        writer.abort()
        raise
    finally:
        bar.close()
    manifest = writer.manifest
    if not (out / ERRORS).is_file():
        write_errors(out, writer.errors)
    manifest["complete"] = True
    commit_manifest(out, manifest)
    reasons = Counter(reason_kind(e["error"]) for e in writer.errors)
    return EncodeSummary(store=out, items=n, encoded=manifest["count"], errors=len(writer.errors),
                         seconds=time.perf_counter() - started, error_reasons=dict(reasons),
                         resumed_from=start)


def local_embedded(workers: int | None) -> Embedder:
    """Items prepared by `workers` DataLoader processes (0: in this process) and embedded here, a batch at a time;
    a batch never crosses a part boundary."""
    def embedded(corpus: Corpus, encoder, start: int, batch_size: int, sparse_codes: bool,
                 part_size: int) -> Iterator[Embedded]:
        import torch

        n = len(corpus)
        plan = [range(lo, min(lo + batch_size, (lo // part_size + 1) * part_size, n))
                for p in range(start // part_size, -(-n // part_size))
                for lo in range(max(p * part_size, start), min((p + 1) * part_size, n), batch_size)]
        count = default_workers() if workers is None else workers
        dataset = PreparedItems(corpus, encoder)
        loader = torch.utils.data.DataLoader(
            dataset, batch_sampler=[list(positions) for positions in plan], num_workers=count,
            collate_fn=dataset.collate, worker_init_fn=_worker_init if count else None,
            prefetch_factor=4 if count else None)
        for positions, (good, batch, bad) in zip(plan, loader):
            if batch is not None:
                vectors, extra = encoder.embed_with_columns(batch, sparse_codes)
                vectors = vectors.numpy()
            else:
                vectors, extra = np.zeros((0, encoder.dim), np.float32), {c: [] for c in encoder.extra_columns}
            yield positions, good, vectors, extra, bad
    return embedded


def _start_or_resume(out: Path, corpus: Corpus, encoder, dtype: str, part_size: int, sparse_codes: bool,
                     first_row: int, first_part: int) -> dict[str, Any]:
    """Return the committed manifest of this same job, or a fresh one; refuse a folder of another job."""
    job = {"corpus": {"source": str(corpus.source), "fingerprint": corpus.fingerprint, "items": len(corpus),
                      "paths": corpus.paths.to_dict()},
           "dtype": dtype, "part_size": part_size,
           "extra_columns": list(encoder.extra_columns) if sparse_codes else [],
           "first_row": first_row, "first_part": first_part}
    if (out / MANIFEST).is_file():
        from retrieval.store import EmbeddingStore

        manifest = EmbeddingStore(out).manifest
        if current_version(manifest) > 1:
            raise RetrievalError(f"store {out} has changed since it was encoded (items were added or deleted: "
                                 f"version {current_version(manifest)}); add items with `retrieval index add`, or "
                                 "encode into a new --out folder")
        recorded_paths = manifest["corpus"].get("paths", {})
        same = (manifest["corpus"]["fingerprint"] == corpus.fingerprint
                and all(recorded_paths.get(k, False) == v for k, v in job["corpus"]["paths"].items() if k != "root")
                and manifest["encoder"]["weights_sha256"] == encoder.weights_sha256
                and manifest["encoder"].get("fusion_mode") == encoder.describe().get("fusion_mode")
                and manifest["dtype"] == dtype and manifest["part_size"] == part_size
                and manifest.get("extra_columns", []) == job["extra_columns"]
                and (manifest.get("first_row", 0), manifest.get("first_part", 0)) == (first_row, first_part))
        if not same:
            raise RetrievalError(f"{out} holds a store of another corpus, model, fusion mode, dtype, part size, "
                                 "columns or symlink and root rules; use a new --out folder")
    else:
        now = datetime.now(timezone.utc).isoformat(timespec="seconds")
        manifest = {"format": FORMAT, "version": VERSION, "encoder": encoder.describe(), "dim": encoder.dim,
                    **job, "normalized": True, "metadata_columns": corpus.metadata_columns,
                    "parts": [], "count": 0, "errors": 0, "complete": False, "created": now}
        out.mkdir(parents=True, exist_ok=True)
        commit_manifest(out, manifest)
    committed = {p["file"] for p in manifest["parts"]}
    for path in out.glob("part-*.parquet"):  # written by a killed run but never committed
        if path.name not in committed:
            path.unlink()
    remove_leftovers(out)
    return manifest


def _committed_errors(out: Path, start: int) -> list[dict[str, Any]]:
    path = out / ERRORS
    if not path.is_file():
        return []
    return [e for e in pq.read_table(path).to_pylist() if e["position"] < start]


class _PartWriter:
    """A background thread that builds and commits parts in order while the next batches are embedded."""

    def __init__(self, out: Path, corpus: Corpus, manifest: dict[str, Any], dtype: str,
                 errors: list[dict[str, Any]]):
        self.out, self.corpus, self.manifest, self.dtype = out, corpus, manifest, dtype
        self.errors = errors
        self.columns = [c for c in corpus.table.column_names if c not in ("position", "error")]
        self.queue: queue.Queue = queue.Queue(maxsize=8)
        self.failure: BaseException | None = None
        self.pending: list[tuple[list[int], np.ndarray, dict[str, list], list[tuple[int, str]]]] = []
        self.thread = threading.Thread(target=self._run, name="store-writer", daemon=True)
        self.thread.start()

    def put(self, positions: range, good: list[int], vectors: np.ndarray, extra: dict[str, list],
            bad: list[tuple[int, str]]) -> None:
        """Queue a run of consecutive embedded positions, split where parts end."""
        if self.failure:
            raise self.failure
        size, n = self.manifest["part_size"], len(self.corpus)
        good_at = np.asarray(good, dtype=np.int64)
        lo = positions.start
        while lo < positions.stop:
            part = lo // size
            hi = min(positions.stop, (part + 1) * size)
            take = np.flatnonzero((good_at >= lo) & (good_at < hi))
            self.queue.put((part, [good[i] for i in take], vectors[take],
                            {c: [values[i] for i in take] for c, values in extra.items()},
                            [(p, r) for p, r in bad if lo <= p < hi], hi == min((part + 1) * size, n)))
            lo = hi

    def close(self) -> None:
        self.queue.put(None)
        self.thread.join()
        if self.failure:
            raise self.failure

    def abort(self) -> None:
        self.queue.put(None)
        self.thread.join(timeout=60)

    def _run(self) -> None:
        try:
            while (item := self.queue.get()) is not None:
                part, good, vectors, extra, bad, last = item
                self.pending.append((good, vectors, extra, bad))
                if last:
                    self._commit(part)
                    self.pending = []
        except BaseException as e:  # surfaced in the main thread by put/close
            self.failure = e
            while self.queue.get() is not None:
                pass

    def _commit(self, part: int) -> None:
        positions = [p for good, _, _, _ in self.pending for p in good]
        bad = [b for _, _, _, batch_bad in self.pending for b in batch_bad]
        first_row = next_row(self.manifest)
        entry: dict[str, Any] = {"file": part_name(self.manifest.get("first_part", 0) + part), "count": len(positions),
                                 "rows": [first_row, first_row + len(positions)],
                                 "positions": [part * self.manifest["part_size"],
                                               part * self.manifest["part_size"] + len(positions) + len(bad)],
                                 "errors": len(bad), "sha256": None}
        if positions:
            table = self.corpus.table.take(pa.array(positions, pa.int64())).select(self.columns)
            vectors = np.concatenate([v for _, v, _, _ in self.pending if len(v)])
            table = table.add_column(0, "row", pa.array(np.arange(*entry["rows"], dtype=np.int64)))
            table = table.append_column("embedding", embedding_array(vectors, self.dtype))
            for column in self.manifest.get("extra_columns", []):
                values = [v for _, _, extra, _ in self.pending for v in extra[column]]
                kind = pa.int32() if column.endswith("_ids") else pa.float32()
                table = table.append_column(column, pa.array(values, pa.list_(kind)))
            table = table.replace_schema_metadata({"retrieval.dim": str(vectors.shape[1]),
                                                   "retrieval.dtype": self.dtype})
            entry |= write_part(self.out / entry["file"], table)
        if bad:
            t = self.corpus.table
            self.errors += [{"position": p, "id": t["id"][p].as_py(), "image": t["image"][p].as_py(),
                             "text": excerpt(t["text"][p].as_py()), "error": reason} for p, reason in bad]
            write_errors(self.out, self.errors)
        self.manifest["parts"].append(entry)
        self.manifest["count"] += entry["count"]
        self.manifest["errors"] = len(self.errors)
        self.manifest["updated"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
        commit_manifest(self.out, self.manifest)


def write_errors(out: Path, errors: list[dict[str, Any]]) -> None:
    schema = pa.schema([("position", pa.int64()), ("id", pa.string()), ("image", pa.string()),
                        ("text", pa.string()), ("error", pa.string())])
    with atomic_path(out / ERRORS) as tmp:
        pq.write_table(pa.Table.from_pylist(errors, schema=schema), tmp)
