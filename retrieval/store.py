"""The embedding store: Parquet parts (metadata and vector in one row) plus manifest.json.

Each row: `row` (int64, dense and unique across the store), `id`, `image`, `text`, the corpus's
metadata columns, and `embedding` (a fixed-size list of float32 or float16, L2-normalised).
The manifest lists the committed parts in order; a part is only part of the store once listed.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from retrieval.errors import RetrievalError
from retrieval.files import atomic_path, read_json, sha256_file, write_json

FORMAT = "retrieval.embedding-store"
VERSION = 1
MANIFEST = "manifest.json"
ERRORS = "errors.parquet"
DTYPES = {"float32": (np.float32, pa.float32()), "float16": (np.float16, pa.float16())}


def part_name(index: int) -> str:
    return f"part-{index:05d}.parquet"


def embedding_array(vectors: np.ndarray, dtype: str) -> pa.FixedSizeListArray:
    np_type, pa_type = DTYPES[dtype]
    flat = pa.array(np.ascontiguousarray(vectors, dtype=np_type).reshape(-1), type=pa_type)
    return pa.FixedSizeListArray.from_arrays(flat, vectors.shape[1])


def vectors_of(column: pa.ChunkedArray | pa.Array, dim: int) -> np.ndarray:
    """The embedding column as a float32 [n, dim] array."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks() if column.num_chunks != 1 else column.chunk(0)
    values = column.flatten().to_numpy(zero_copy_only=False)
    return values.reshape(-1, dim).astype(np.float32, copy=False)


def write_part(path: Path, table: pa.Table) -> str:
    """Write one part atomically; returns its sha256."""
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp, row_group_size=8192)
    return sha256_file(path)


class EmbeddingStore:
    """Read access to a store folder made by `retrieval encode`."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        manifest_path = self.path / MANIFEST
        if not manifest_path.is_file():
            raise RetrievalError(f"{self.path} is not an embedding store (no {MANIFEST})")
        self.manifest: dict[str, Any] = read_json(manifest_path)
        if self.manifest.get("format") != FORMAT:
            raise RetrievalError(f"{manifest_path} is not an embedding-store manifest")

    @staticmethod
    def is_store(path: str | os.PathLike) -> bool:
        return (Path(path) / MANIFEST).is_file()

    @property
    def dim(self) -> int:
        return int(self.manifest["dim"])

    @property
    def count(self) -> int:
        return int(self.manifest["count"])

    @property
    def encoder(self) -> dict[str, Any]:
        return self.manifest["encoder"]

    @property
    def complete(self) -> bool:
        return bool(self.manifest.get("complete"))

    @property
    def part_paths(self) -> list[Path]:
        return [self.path / p["file"] for p in self.manifest["parts"] if p["count"] > 0]

    def fingerprint(self) -> str:
        """Changes whenever any committed part or the encoder changes."""
        h = hashlib.sha256(self.encoder["weights_sha256"].encode())
        for part in self.manifest["parts"]:
            h.update(f"{part['file']}:{part['count']}:{part['sha256']}\n".encode())
        return h.hexdigest()

    def file_stats(self) -> dict[str, list[int]]:
        """(size, mtime_ns) of each part file: a cheap first check that no part was rewritten."""
        stats = {p.name: p.stat() for p in self.part_paths}
        return {name: [st.st_size, st.st_mtime_ns] for name, st in stats.items()}

    def changed_parts(self, recorded: dict[str, list[int]]) -> list[str]:
        """Parts whose file no longer matches its manifest checksum (hashing only those whose stat changed)."""
        sha = {p["file"]: p["sha256"] for p in self.manifest["parts"]}
        now = self.file_stats()
        return [name for name, stat in now.items()
                if stat != recorded.get(name) and sha256_file(self.path / name) != sha[name]]

    def require_complete(self) -> None:
        if not self.complete:
            raise RetrievalError(f"store {self.path} is incomplete: run the same `retrieval encode` "
                                 "command again to finish it")

    def iter_batches(self, batch_rows: int = 65536) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Stream (row ids int64 [n], vectors float32 [n, dim]) in row order, a bounded batch at a time."""
        for path in self.part_paths:
            parquet = pq.ParquetFile(path)
            for batch in parquet.iter_batches(batch_size=batch_rows, columns=["row", "embedding"]):
                yield (batch.column("row").to_numpy().astype(np.int64, copy=False),
                       vectors_of(batch.column("embedding"), self.dim))

    def read_vectors(self, rows: np.ndarray) -> np.ndarray:
        """Vectors of the given row ids, in the given order, reading only the row groups that hold them."""
        rows = np.asarray(rows, dtype=np.int64)
        out = np.empty((len(rows), self.dim), np.float32)
        for part in self.manifest["parts"]:
            lo, hi = part["rows"]
            hit = np.flatnonzero((rows >= lo) & (rows < hi))
            if not len(hit):
                continue
            parquet = pq.ParquetFile(self.path / part["file"])
            offsets = rows[hit] - lo
            sizes = [parquet.metadata.row_group(g).num_rows for g in range(parquet.num_row_groups)]
            starts = np.concatenate([[0], np.cumsum(sizes)])
            group_of = np.searchsorted(starts, offsets, side="right") - 1
            groups = np.unique(group_of)
            column = parquet.read_row_groups(groups.tolist(), columns=["embedding"])["embedding"]
            read_starts = np.concatenate([[0], np.cumsum(np.diff(starts)[groups])[:-1]])
            local = read_starts[np.searchsorted(groups, group_of)] + offsets - starts[group_of]
            out[hit] = vectors_of(column.take(pa.array(local)), self.dim)
        return out

    def sample(self, n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """A uniform random sample of at most n (row ids, vectors), read part by part."""
        n = min(n, self.count)
        rng = np.random.default_rng(seed)
        rows = np.sort(rng.choice(self.count, size=n, replace=False)) if n else np.zeros(0, np.int64)
        return rows.astype(np.int64), self.read_vectors(rows)

    def metadata(self) -> pa.Table:
        """Every column but the embedding and extra columns (sparse codes), for all rows in row order
        (row == position in this table)."""
        skip = {"embedding", *self.manifest.get("extra_columns", [])}
        columns = [c for c in pq.read_schema(self.part_paths[0]).names if c not in skip]
        tables = [pq.read_table(p, columns=columns) for p in self.part_paths]
        return pa.concat_tables(tables) if tables else pa.table({})

    def sql_source(self) -> str:
        """A DuckDB table expression over the parts."""
        files = ", ".join("'" + str(p).replace("'", "''") + "'" for p in self.part_paths)
        return f"read_parquet([{files}])"


def write_manifest(path: Path, manifest: dict[str, Any]) -> None:
    write_json(path / MANIFEST, manifest)
