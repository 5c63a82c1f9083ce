"""`retrieval index build`: an embedding store (or a corpus, encoded first) → an index folder.

The folder holds `index-<sha>.faiss` files and `index.json`, which names the one in use (with its size and
checksum) and says what it is. A build writes its new index file under a new name, then replaces index.json
in one atomic rename: that rename is the commit. A reader sees the old pair or the new pair, never a mix; a
build killed at any moment leaves the last committed pair, and the next build clears what the killed one left.
"""

from __future__ import annotations

import errno
import json
import os
import re
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from retrieval.errors import RetrievalError
from retrieval.files import (
    LOCK_FILE,
    check_out_folder,
    durable_rename,
    folder_lock,
    has_type,
    is_leftover,
    sha256_file,
    temporary_name,
    write_json,
)
from retrieval.store import EmbeddingStore

INDEX_JSON = "index.json"
INDEX_FORMAT = "retrieval.index"
INDEX_VERSION = 2
FILE_DIGEST = 16  # hex digits of the checksum in an index file's name
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


def build_index_folder(source: str | os.PathLike, out: str | os.PathLike, model: str | None = None,
                       index_key: str = "auto", device: str = "auto", memory_budget: str = "4GB",
                       target_recall: float = 0.95, progress: bool = True,
                       encode_options: dict[str, Any] | None = None) -> dict[str, Any]:
    """Build an index folder and return what index.json records."""
    from indexers.build import check_index_key
    from indexers.choose import parse_memory
    from retrieval.encode import check_encode_options

    out = Path(out)
    if not 0 < target_recall <= 1:  # also refuses NaN
        raise RetrievalError(f"--target-recall must be in (0, 1], got {target_recall}")
    parse_memory(memory_budget)
    if index_key != "auto":
        check_index_key(index_key)
    check_encode_options(**(encode_options or {}))
    check_out_folder(out, "an index folder", is_index_folder)
    with folder_lock(out, "index build"):
        return _build(source, out, model, index_key, device, memory_budget, target_recall, progress,
                      encode_options or {})


def is_index_folder(folder: Path) -> bool:
    """An index folder, or what a killed first build left of one (its store, an index file not yet committed)."""
    store = folder / "store"
    return ((folder / INDEX_JSON).is_file() or any(BUILT_FILE.fullmatch(p.name) for p in folder.iterdir())
            or EmbeddingStore.is_store(store) or (store.is_dir() and all(is_leftover(p) for p in store.iterdir())))


def _build(source: str | os.PathLike, out: Path, model: str | None, index_key: str, device: str,
           memory_budget: str, target_recall: float, progress: bool, encode_options: dict[str, Any]
           ) -> dict[str, Any]:
    import faiss

    from indexers.build import build_index
    from indexers.choose import IndexChoice, choose_index, estimate_bytes, parse_memory
    from indexers.gpu import resolve_faiss_device

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
    if index_key == "auto":
        choice = choose_index(n, dim, budget, gpu=gpu)
    else:
        choice = IndexChoice(index_key, estimate_bytes(index_key, n, dim), "given with --index-key")
    recall_rows, recall_queries = store.sample(RECALL_QUERIES, seed=2)
    built = build_index(store.iter_batches, n, dim, choice.key,
                        sample_vectors=lambda m: store.sample(m, seed=1)[1],
                        recall_queries=recall_queries, recall_rows=recall_rows,
                        device=device, target_recall=target_recall, progress=progress)
    index_file, index_sha256 = write_index_file(built.index, out)
    info = {
        "format": INDEX_FORMAT,
        "version": INDEX_VERSION,
        "file": index_file.name,
        "file_sha256": index_sha256,
        "index_key": choice.key,
        "factory": built.factory,
        "choice": choice.reason,
        "search_params": built.params,
        "metric": "inner_product",
        "count": n,
        "dim": dim,
        "ann_recall@10": round(built.ann_recall, 4),
        "ann_recall_queries": built.recall_queries,
        "target_recall": target_recall,
        "memory_budget": memory_budget,
        "estimated_bytes": choice.bytes,
        "index_bytes": index_file.stat().st_size,
        "store": {"path": store_location(store.path, out), "fingerprint": store.fingerprint(), "count": n},
        "encoder": store.encoder,
        "faiss_version": faiss.__version__,
        "device": built.device,
        "seconds": {k: round(v, 3) for k, v in built.seconds.items()}
        | {"total": round(time.perf_counter() - started, 3)},
        "notes": list(dict.fromkeys(notes + built.notes)),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    write_json(out / INDEX_JSON, info)  # the commit
    if previous and previous != index_file.name:
        (out / previous).unlink(missing_ok=True)
    clear_leftovers(out)
    return info


def write_index_file(index, out: Path) -> tuple[Path, str]:
    """Write the index durably under a name made from its checksum, never over the committed file (unless it
    is the very same bytes); returns its path and sha256."""
    import faiss

    tmp = out / temporary_name("index.faiss")
    try:
        try:
            faiss.write_index(index, str(tmp))
        except RuntimeError as e:  # FAISS reports a failed write (a full disk) this way, the OS's reason last
            reason = re.search(r"\(([^()]*)\)\s*$", str(e))
            raise OSError(errno.EIO, f"FAISS could not write the index: {reason[1] if reason else 'write error'}",
                          str(tmp)) from None
        digest = sha256_file(tmp)
        final = out / f"index-{digest[:FILE_DIGEST]}.faiss"
        durable_rename(tmp, final)
    finally:
        if tmp.exists():
            tmp.unlink()
    return final, digest


def committed_file(out: Path) -> str | None:
    """The index file that index.json names, if there is a readable index.json."""
    try:
        return read_index_json(out)["file"] if (out / INDEX_JSON).is_file() else None
    except RetrievalError:
        return None


def clear_leftovers(out: Path) -> None:
    """Remove what a killed build left: temporary files, and index files of ours that index.json does not name."""
    if not out.is_dir():
        return
    keep = committed_file(out)
    for path in out.iterdir():
        stale_index = BUILT_FILE.fullmatch(path.name) and path.name != keep
        if (is_leftover(path) and path.name != LOCK_FILE) or stale_index:
            path.unlink()


# What a reader needs from index.json, with its type; a folder whose index.json lacks one is refused whole.
REQUIRED = {"format": str, "version": int, "count": int, "dim": int, "search_params": str, "store": dict,
            "encoder": dict}
REQUIRED_IN = {"store": {"path": str, "fingerprint": str}, "encoder": {"name": str, "weights_sha256": str}}
OPTIONAL_IN = {"encoder": {"checkpoint": str, "fusion_mode": str}}  # absent or null, or of this type
BUILT_FILE = re.compile(rf"index-[0-9a-f]{{{FILE_DIGEST}}}\.faiss")  # the files a build writes
FILE_NAME = re.compile(rf"{BUILT_FILE.pattern}|index\.faiss")  # what index.json may name (version 1: index.faiss)


def read_index_json(folder: str | os.PathLike) -> dict[str, Any]:
    """index.json of an index folder, checked: every field a reader relies on is there, with its type."""
    path = Path(folder) / INDEX_JSON
    if not path.is_file():
        raise RetrievalError(f"{folder} is not an index folder (no {INDEX_JSON}); build one with "
                             "`retrieval index build`")
    try:
        info = json.loads(path.read_bytes())
    except (ValueError, RecursionError) as e:
        raise RetrievalError(f"{path} is not valid JSON ({type(e).__name__}); rebuild the index") from None
    if not isinstance(info, dict) or info.get("format") != INDEX_FORMAT:
        raise RetrievalError(f"{path} is not an index manifest")
    if info.get("version") == 1:  # before index files were named by their checksum
        info = {"file": "index.faiss", "file_sha256": None} | info
    problems = [f"{key} ({kind.__name__})" for key, kind in REQUIRED.items() if not has_type(info.get(key), kind)]
    problems += [f"{outer}.{key} ({kind.__name__})" for outer, fields in REQUIRED_IN.items()
                 if isinstance(info.get(outer), dict) for key, kind in fields.items()
                 if not has_type(info[outer].get(key), kind)]
    problems += [f"{outer}.{key} ({kind.__name__} or null)" for outer, fields in OPTIONAL_IN.items()
                 if isinstance(info.get(outer), dict) for key, kind in fields.items()
                 if info[outer].get(key) is not None and not isinstance(info[outer][key], kind)]
    if not (isinstance(info.get("file"), str) and FILE_NAME.fullmatch(info["file"])):
        problems.append("file (an index-<sha>.faiss name)")
    if not problems and (info["count"] < 0 or info["dim"] <= 0):
        problems.append("count ≥ 0 and dim > 0")
    if problems:
        raise RetrievalError(f"{path} is malformed: missing or wrong {', '.join(problems)}; rebuild the index")
    return info



def read_index_file(folder: str | os.PathLike, info: dict[str, Any]):
    """The FAISS index that `info` names, checked against its recorded size, checksum, dim and count."""
    import faiss

    path = Path(folder) / info["file"]
    size = path.stat().st_size  # FileNotFoundError: a build committed since index.json was read (the caller retries)
    if size != info.get("index_bytes", size) or (info["file_sha256"] and sha256_file(path) != info["file_sha256"]):
        raise RetrievalError(f"{path} is damaged: its size or checksum differs from {INDEX_JSON}; rebuild the index")
    try:
        index = faiss.read_index(str(path))
    except RuntimeError as e:
        raise RetrievalError(f"{path} is not a readable FAISS index ({str(e).strip().splitlines()[-1]}); "
                             "rebuild the index") from None
    if index.d != info["dim"] or index.ntotal != info["count"]:
        raise RetrievalError(f"{path} does not match {INDEX_JSON} (dim {index.d}, {index.ntotal} vectors); "
                             "rebuild the index")
    return index
