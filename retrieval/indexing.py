"""`retrieval index build`: an embedding store (or a corpus, encoded first) → an index folder (its layout and
commit: retrieval.index_folder)."""

from __future__ import annotations

import os
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from retrieval.errors import RetrievalError, indexer_errors
from retrieval.files import check_out_folder, folder_lock
from retrieval.index_folder import (
    INDEX_FORMAT,
    INDEX_VERSION,
    clear_leftovers,
    commit,
    committed_file,
    is_index_folder,
    write_index_file,
    write_lists_file,
)
from retrieval.ray_cluster import check_engine
from retrieval.store import EmbeddingStore

RECALL_QUERIES = 1000


def store_location(store: Path, index_dir: Path) -> str:
    """Record the store relative to the index folder when it lives inside it, so the folder can move."""
    store, index_dir = store.resolve(), index_dir.resolve()
    return store.relative_to(index_dir).as_posix() if store.is_relative_to(index_dir) else str(store)


def open_source(source: str | os.PathLike, out: Path, model: str | None, encode_options: dict[str, Any],
                progress: bool) -> EmbeddingStore:
    """The store to index: SOURCE itself, or SOURCE (a corpus) encoded with --model into OUT/store."""
    from retrieval.corpus import is_corpus

    source = Path(source)
    if EmbeddingStore.is_store(source):
        store = EmbeddingStore(source)
        if model and model != store.encoder["name"] and Path(model).resolve() != Path(
                store.encoder["checkpoint"] or "").resolve():
            raise RetrievalError(f"store {source} was encoded with {store.encoder['name']!r}, not {model!r}; "
                                 "drop --model or encode the corpus again")
        fusion = encode_options.get("fusion")
        if fusion and fusion != store.encoder.get("fusion_mode"):
            raise RetrievalError(f"store {source} was encoded with fusion {store.encoder.get('fusion_mode')!r}, "
                                 f"not {fusion!r}; drop --fusion or encode the corpus again")
        return store
    if not source.exists():
        raise RetrievalError(f"source not found: {source}")
    if not is_corpus(source):
        raise RetrievalError(f"{source} is neither an embedding store nor a corpus (folder, .jsonl, .csv, .parquet)")
    if not model:
        raise RetrievalError("SOURCE is a corpus: give --model to encode it first")
    from retrieval.encode import encode_corpus

    summary = encode_corpus(source, out / "store", model, progress=progress, **encode_options)
    if progress:
        print("\n".join(summary.lines()))
    return EmbeddingStore(out / "store")


@indexer_errors()
def build_index_folder(source: str | os.PathLike, out: str | os.PathLike, model: str | None = None,
                       index_key: str = "auto", device: str = "auto", memory_budget: str = "4GB",
                       target_recall: float = 0.95, progress: bool = True,
                       encode_options: dict[str, Any] | None = None, goal: str = "latency",
                       shards: int | None = None, engine: str = "local", ray_address: str | None = None
                       ) -> dict[str, Any]:
    """Build an index folder and return what index.json records. With `shards`, an IVF index whose lists are
    filled in that many shards (local processes, or Ray tasks with `engine` "ray") and merged on disk."""
    from indexers.build import check_index_key
    from indexers.choose import parse_memory
    from indexers.select import check_goal
    from retrieval.encode import check_encode_options

    out = Path(out)
    encode_options = encode_options or {}
    if not 0 < target_recall <= 1:  # also refuses NaN
        raise RetrievalError(f"--target-recall must be in (0, 1], got {target_recall}")
    parse_memory(memory_budget)
    check_goal(goal)
    if index_key != "auto":
        check_index_key(index_key)
    check_engine(engine)
    if shards is not None:
        from indexers.shards import check_shards

        check_shards(shards)
    check_encode_options(**encode_options)
    check_out_folder(out, "an index folder", is_index_folder)
    with folder_lock(out, "index build"):
        return _build(source, out, model, index_key, device, memory_budget, target_recall, progress,
                      encode_options, goal, shards, engine, ray_address)


def _build(source: str | os.PathLike, out: Path, model: str | None, index_key: str, device: str,
           memory_budget: str, target_recall: float, progress: bool, encode_options: dict[str, Any],
           goal: str, shards: int | None = None, engine: str = "local", ray_address: str | None = None
           ) -> dict[str, Any]:
    import faiss

    from indexers.build import build_index
    from indexers.choose import IndexChoice, parse_memory, sharded_choice
    from indexers.gpu import resolve_faiss_device
    from indexers.kinds import estimate_bytes
    from indexers.select import SAMPLE, select_index

    started = time.perf_counter()
    clear_leftovers(out)
    previous = committed_file(out)
    store = open_source(source, out, model, encode_options, progress)
    store.require_complete()
    n, dim = store.count, store.dim
    if n == 0:
        raise RetrievalError(f"store {store.path} holds no vectors (every item was skipped: see errors.parquet)")
    budget = parse_memory(memory_budget)
    notes: list[str] = []
    gpu = resolve_faiss_device(device, notes) == "cuda"
    trials, fill = [], None
    if shards is not None:
        from retrieval.index_shards import sharded_fill

        fill = sharded_fill(store, out, shards, engine, ray_address)
    if index_key == "auto" and shards is not None:
        choice = sharded_choice(n, dim)
    elif index_key == "auto":
        selection = select_index(store.sample(SAMPLE, seed=3)[1], n, dim, budget, target_recall, goal=goal, gpu=gpu)
        choice, trials = selection.choice, [t.to_dict() for t in selection.trials]
    else:
        choice = IndexChoice(index_key, estimate_bytes(index_key, n, dim), "given with --index-key")
    if fill is not None:
        from indexers.shards import check_on_disk_key

        check_on_disk_key(choice.key, dim)
    recall_rows, recall_queries = store.sample(RECALL_QUERIES, seed=2)
    built = build_index(store.iter_batches, n, dim, choice.key,
                        sample_vectors=lambda m: store.sample(m, seed=1)[1],
                        recall_queries=recall_queries, recall_rows=recall_rows,
                        device=device, target_recall=target_recall, progress=progress, fill=fill)
    lists = write_lists_file(built.index, out) if fill else {}
    index_file, index_sha256 = write_index_file(built.index, out)
    info = {
        "format": INDEX_FORMAT,
        "version": INDEX_VERSION,
        "file": index_file.name,
        "file_sha256": index_sha256,
        "index_key": choice.key,
        "factory": built.factory,
        "choice": choice.reason,
        "candidates": trials,  # what `auto` measured on a sample before choosing
        "search_params": built.params,
        "metric": "inner_product",
        "count": n,
        "dim": dim,
        "ann_recall@10": round(built.recall.fair, 4),  # returned ids judged by their exact scores, ties right
        "plain_recall@10": round(built.recall.plain, 4),  # the share of the exact top-10 ids returned
        "ann_recall_queries": built.recall_queries,
        "target_recall": target_recall,
        "memory_budget": memory_budget,
        "estimated_bytes": choice.bytes,
        "index_bytes": index_file.stat().st_size,
        **lists,
        "shards": shards,
        "store": {"path": store_location(store.path, out), "version": store.version,
                  "fingerprint": store.fingerprint(), "count": n},
        "built_count": n,  # the vectors the quantiser was trained for; later adds are measured against it
        "encoder": store.encoder,
        "faiss_version": faiss.__version__,
        "device": built.device,
        "seconds": {k: round(v, 3) for k, v in built.seconds.items()}
        | {"total": round(time.perf_counter() - started, 3)},
        "notes": list(dict.fromkeys(notes + built.notes)),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    commit(out, info, previous)
    return info


