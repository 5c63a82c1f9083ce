"""New items for a store: a corpus matched against the store's live items by id, the new and changed ones encoded
into a staging store inside it (resumable, like any encode job), whose parts then join the store.

An item whose id is live with the same image path, text and metadata is already there and is skipped, so that
adding the same corpus twice (or again after a killed run) changes nothing. One whose content differs is refused,
or with `upsert` replaces the live one (its row is deleted in the same version that adds the new row).
"""

from __future__ import annotations

import hashlib
import os
import shutil
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from retrieval.corpus import Corpus
from retrieval.encode import EncodeSummary, encode_items
from retrieval.errors import RetrievalError, first_line
from retrieval.files import atomic_path, fsync_folder
from retrieval.store import EmbeddingStore
from retrieval.store_manifest import next_part, next_row

STAGING = "adding"  # the staging store's folder, inside the store
CORE = ("id", "image", "text")


@dataclass
class AddPlan:
    items: Corpus  # the items to encode: new ids, and with upsert the changed ones
    replacing: dict[str, int]  # id → live row, of the changed items (replaced only once their new row is encoded)
    unchanged: int  # items already live with the same content


def store_columns(store: EmbeddingStore) -> pa.Schema:
    """The store's item columns (id, image, text and metadata), as its first part holds them."""
    skip = {"row", "embedding", *store.manifest.get("extra_columns", [])}
    schema = store.schema() or pa.schema([(c, pa.string()) for c in CORE])
    return pa.schema([f for f in schema if f.name not in skip])


def conform(corpus: Corpus, columns: pa.Schema) -> Corpus:
    """The corpus with the store's columns, in its order and of its types; a column the store lacks is refused,
    one the corpus lacks is null."""
    table = corpus.table
    unknown = [c for c in corpus.metadata_columns if c not in columns.names]
    if unknown:
        raise RetrievalError(f"column {unknown[0]!r} of {corpus.source} is not in the store (its columns: "
                             f"{', '.join(columns.names)}); add items with the store's columns")
    arrays = {"position": table["position"], "error": table["error"]}
    for field in columns:
        values = table[field.name] if field.name in table.column_names else pa.nulls(table.num_rows, field.type)
        try:
            arrays[field.name] = pc.cast(values, field.type)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as e:
            raise RetrievalError(f"column {field.name!r} of {corpus.source} cannot be read as the store's "
                                 f"{field.type} ({first_line(e)})") from None
    order = ["position", *columns.names, "error"]
    return replace(corpus, table=pa.table({name: arrays[name] for name in order}))


def plan_add(store: EmbeddingStore, corpus: Corpus, upsert: bool) -> AddPlan:
    """Which items of the corpus to encode and which live rows they replace."""
    corpus = conform(corpus, store_columns(store))
    live = store.read_table(columns=["row", *store_columns(store).names])
    row_of = dict(zip(live["id"].to_pylist(), live["row"].to_pylist()))
    stored = {r["id"]: r for r in live.drop_columns(["row"]).to_pylist()}
    items = corpus.table.drop_columns(["position", "error"]).to_pylist()
    errors = corpus.table["error"].to_pylist()
    take, replaced, changed = [], [], []
    for position, (item, error) in enumerate(zip(items, errors)):
        old = stored.get(item["id"]) if error is None else None
        if old is None:
            take.append(position)
        elif old != item:
            changed.append(item["id"])
            take.append(position)
            replaced.append(item["id"])
    if changed and not upsert:
        raise RetrievalError(f"items whose id is already in the index with other content: {len(changed)} (first: "
                             f"{changed[0]!r}); give --upsert to replace them")
    digest = hashlib.sha256(f"{corpus.fingerprint}:{upsert}:".encode() + np.asarray(take, np.int64).tobytes())
    chosen = replace(corpus, table=corpus.table.take(pa.array(take, pa.int64())), fingerprint=digest.hexdigest())
    return AddPlan(chosen, {i: row_of[i] for i in replaced}, len(items) - len(take))


def stage(plan: AddPlan, store: EmbeddingStore, encoder, batch_size: int, workers: int | None, strict: bool,
          progress: bool, started: float) -> tuple[list[dict[str, Any]], EncodeSummary | None]:
    """Encode the plan's items into the staging store and link its parts into the store under their final names;
    returns their manifest entries (to commit) and the encode summary."""
    staging = store.path / STAGING
    if not len(plan.items):
        shutil.rmtree(staging, ignore_errors=True)
        return [], None
    manifest = store.manifest
    first_row, first_part = next_row(manifest), next_part(manifest)
    if (staging / "manifest.json").is_file():
        staged = EmbeddingStore(staging).manifest
        if (staged["corpus"]["fingerprint"], staged.get("first_row"), staged.get("first_part")) != (
                plan.items.fingerprint, first_row, first_part):
            shutil.rmtree(staging)  # a killed add of other items, or of the same before the store changed
    summary = encode_items(plan.items, staging, encoder, batch_size, workers, manifest["dtype"], strict,
                           manifest.get("part_size", 10_000), progress, bool(manifest.get("extra_columns")), started,
                           first_row=first_row, first_part=first_part)
    staged = EmbeddingStore(staging).manifest
    entries = []
    for part in staged["parts"]:
        if part["count"] == 0:
            continue
        target = store.path / part["file"]
        target.unlink(missing_ok=True)
        try:
            os.link(staging / part["file"], target)
        except OSError:  # a file system without hard links: a durable copy instead
            with atomic_path(target) as tmp:
                shutil.copyfile(staging / part["file"], tmp)
        entries.append({k: v for k, v in part.items() if k not in ("positions", "errors")}
                       | {"corpus": staged["corpus"]["source"], "paths": staged["corpus"]["paths"]})
    fsync_folder(store.path)  # the links are durable before a manifest names them
    return entries, summary


def replaced_rows(plan: AddPlan, store: Path, entries: list[dict[str, Any]]) -> np.ndarray:
    """The live rows that the encoded parts replace: a changed item whose new version could not be encoded (a
    broken image) keeps its old row."""
    encoded = {i for entry in entries for i in pq.read_table(store / entry["file"], columns=["id"])["id"].to_pylist()}
    return np.array(sorted(row for i, row in plan.replacing.items() if i in encoded), np.int64)


def finish(store: Path) -> None:
    """Remove the staging store once its parts are committed (or found to be unneeded)."""
    shutil.rmtree(store / STAGING, ignore_errors=True)
