"""The embedding store: Parquet parts (metadata and vector in one row) plus manifest.json.

Each row: `row` (int64, dense and unique across the store), `id`, `image`, `text`, the corpus's
metadata columns, and `embedding` (a fixed-size list of float32 or float16, L2-normalised).
The manifest lists the committed parts in order; a part is only part of the store once listed.

Damage is caught at three depths: opening a store for search checks each part's size and the checksum of its
last bytes (the Parquet footer); every read verifies the CRC of each page it decodes and that each vector is
still a unit vector; `retrieval store verify` checks the whole of every file.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from retrieval.errors import RetrievalError, first_line
from retrieval.files import atomic_path, read_json, sha256_file, write_json
from retrieval.store_manifest import (
    FORMAT,
    MANIFEST,
    current_version,
    deletions_of,
    in_version,
    live_count,
    manifest_problem,
    oldest_version,
    parts_of,
)

ERRORS = "errors.parquet"
DTYPES = {"float32": (np.float32, pa.float32()), "float16": (np.float16, pa.float16())}
TAIL_BYTES = 65536  # the end of a part checked on open: the footer and the last pages
UNIT_TOLERANCE = 1e-2  # |‖v‖² − 1| allowed (float16 rounding is about 1e-3)


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


def write_part(path: Path, table: pa.Table) -> dict[str, Any]:
    """Write one part atomically, with page checksums; returns what the manifest records of it."""
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp, row_group_size=8192, write_page_checksum=True)
    return {"sha256": sha256_file(path), "bytes": path.stat().st_size, "tail_sha256": tail_sha256(path)}


def tail_sha256(path: Path) -> str:
    with open(path, "rb") as f:
        f.seek(max(0, os.fstat(f.fileno()).st_size - TAIL_BYTES))
        return hashlib.sha256(f.read()).hexdigest()


def check_unit(vectors: np.ndarray, where: Path) -> np.ndarray:
    """The vectors, if every one is a unit vector; a damaged part is refused rather than scored."""
    norms = np.einsum("ij,ij->i", vectors, vectors)
    bad = ~(np.abs(norms - 1.0) <= UNIT_TOLERANCE)  # NaN counts as bad
    if bad.any():
        raise RetrievalError(f"{where} is damaged: {int(bad.sum())} stored vectors are not unit vectors "
                             f"(squared norm {norms[bad][0]:.4g}); run `retrieval store verify` and encode again")
    return vectors


class VersionGone(RetrievalError):
    """A store version that a compaction has dropped."""


class EmbeddingStore:
    """Read access to one version of a store folder made by `retrieval encode` (default: the newest).

    A store object reads the version it opened however the folder changes later: its manifest is read once,
    and `pin()` maps its part files so that a compaction deleting them cannot pull them from under it.
    Row ids are unique and ascending in part order; deleted rows are left out of every read."""

    def __init__(self, path: str | os.PathLike, version: int | None = None):
        self.path = Path(path)
        manifest_path = self.path / MANIFEST
        if not manifest_path.is_file():
            raise RetrievalError(f"{self.path} is not an embedding store (no {MANIFEST})")
        try:
            self.manifest: dict[str, Any] = read_json(manifest_path)
        except (ValueError, RecursionError) as e:
            raise RetrievalError(f"{manifest_path} is not valid JSON ({type(e).__name__})") from None
        if not isinstance(self.manifest, dict) or self.manifest.get("format") != FORMAT:
            raise RetrievalError(f"{manifest_path} is not an embedding-store manifest")
        if problem := manifest_problem(self.manifest):
            raise RetrievalError(f"{manifest_path} is malformed: {problem}")
        self.version = current_version(self.manifest) if version is None else version
        if not oldest_version(self.manifest) <= self.version <= current_version(self.manifest):
            raise VersionGone(f"store {self.path} no longer holds version {self.version} (it holds "
                                 f"{oldest_version(self.manifest)} to {current_version(self.manifest)}): it was "
                                 "compacted since")
        self.parts = parts_of(self.manifest, self.version)
        self.deletions = deletions_of(self.manifest, self.version)
        self._pinned: dict[Path, pa.MemoryMappedFile] = {}
        self._part_rows: dict[str, np.ndarray] = {}
        self._live: np.ndarray | None = None
        self.deleted = self._read_deleted()

    @staticmethod
    def is_store(path: str | os.PathLike) -> bool:
        return (Path(path) / MANIFEST).is_file()

    @property
    def dim(self) -> int:
        return int(self.manifest["dim"])

    @property
    def count(self) -> int:
        """Live rows in this version."""
        return live_count(self.manifest, self.version)

    @property
    def encoder(self) -> dict[str, Any]:
        return self.manifest["encoder"]

    @property
    def complete(self) -> bool:
        return bool(self.manifest.get("complete"))

    @property
    def part_paths(self) -> list[Path]:
        return [self.path / p["file"] for p in self.parts]

    def fingerprint(self) -> str:
        """Changes whenever the version's parts, its deletions or the encoder change."""
        h = hashlib.sha256(self.encoder["weights_sha256"].encode())
        for part in (p for p in self.manifest["parts"] if in_version(p, self.version)):
            h.update(f"{part['file']}:{part['count']}:{part['sha256']}\n".encode())
        for deletion in self.deletions:
            h.update(f"deleted {deletion['file']}:{deletion['count']}:{deletion['sha256']}\n".encode())
        return h.hexdigest()

    def pin(self) -> None:
        """Map every part file of this version, so that reads keep working after a compaction removes it."""
        for path in self.part_paths:
            with reading(path):
                self._pinned.setdefault(path, pa.memory_map(str(path)))

    def _source(self, path: Path) -> str | pa.MemoryMappedFile:
        return self._pinned.get(path) or str(path)

    def _read_deleted(self) -> np.ndarray:
        """The version's deleted row ids, sorted; each deletion file checked against its recorded checksum."""
        rows = []
        for deletion in self.deletions:
            path = self.path / deletion["file"]
            with reading(path):
                if sha256_file(path) != deletion["sha256"]:
                    raise RetrievalError(f"deletion file {path} is damaged: its checksum differs from the manifest")
                rows.append(pq.read_table(path, columns=["row"]).column("row").to_numpy())
        deleted = np.sort(np.concatenate(rows)).astype(np.int64) if rows else np.zeros(0, np.int64)
        if len(deleted) != sum(d["count"] for d in self.deletions) or (np.diff(deleted) == 0).any():
            raise RetrievalError(f"the deletion files of store {self.path} do not match its manifest")
        return deleted

    def _keep(self, rows: np.ndarray) -> np.ndarray:
        """A mask of the rows that are not deleted."""
        return ~np.isin(rows, self.deleted) if len(self.deleted) else np.ones(len(rows), bool)

    def part_rows(self, part: dict[str, Any]) -> np.ndarray:
        """Every row id stored in a part (deleted ones too), ascending."""
        if part["count"] == part["rows"][1] - part["rows"][0]:
            return np.arange(*part["rows"], dtype=np.int64)
        if part["file"] not in self._part_rows:
            path = self.path / part["file"]
            with reading(path):
                rows = pq.read_table(self._source(path), columns=["row"]).column("row").to_numpy()
            if len(rows) != part["count"] or (np.diff(rows) <= 0).any() or (len(rows) and not (
                    part["rows"][0] <= rows[0] and rows[-1] < part["rows"][1])):
                raise RetrievalError(f"part {path} is damaged: its row ids do not match the manifest's range "
                                     f"{part['rows']}; run `retrieval store verify {self.path}`")
            self._part_rows[part["file"]] = rows.astype(np.int64)
        return self._part_rows[part["file"]]

    def live_rows(self) -> np.ndarray:
        """The row ids of this version, ascending."""
        if self._live is None:
            rows = np.concatenate([self.part_rows(p) for p in self.parts]) if self.parts else np.zeros(0, np.int64)
            self._live = rows[self._keep(rows)]
        return self._live

    def damaged_parts(self, full: bool = False) -> list[str]:
        """Parts whose file differs from the manifest, each with why. Cheap by default (size and the checksum
        of the last TAIL_BYTES; parts of stores written before that was recorded are hashed whole); `full`
        hashes every file whole and decodes it, checking page checksums, unit norms and row ids."""
        problems = []
        for part in self.parts:
            path = self.path / part["file"]
            try:
                size = path.stat().st_size
                if size != part.get("bytes", size):
                    problems.append(f"{part['file']}: {size} bytes, the manifest says {part['bytes']}")
                elif (full or "tail_sha256" not in part) and sha256_file(path) != part["sha256"]:
                    problems.append(f"{part['file']}: its checksum differs from the manifest")
                elif not full and tail_sha256(path) != part["tail_sha256"]:
                    problems.append(f"{part['file']}: its footer checksum differs from the manifest")
                elif problem := self._footer_problem(part, path):
                    problems.append(f"{part['file']}: {problem}")
                elif full:
                    rows = []
                    for batch in self._batches(path, ["row", "embedding"], 65536):
                        self._vectors(batch, path)
                        rows.append(batch.column("row").to_numpy())
                    self._part_rows.pop(part["file"], None)
                    if not np.array_equal(np.concatenate(rows) if rows else [], self.part_rows(part)):
                        raise RetrievalError(f"its row ids are not the manifest's range {part['rows']}")
            except FileNotFoundError:
                problems.append(f"{part['file']}: missing")
            except RetrievalError as e:
                problems.append(f"{part['file']}: {e}")
        return problems

    def _footer_problem(self, part: dict[str, Any], path: Path) -> str | None:
        """Whether the part's footer (its row count, the range of its row ids) agrees with the manifest."""
        with reading(path):
            meta = pq.ParquetFile(self._source(path)).metadata
        column = meta.schema.names.index("row") if "row" in meta.schema.names else None
        stats = [meta.row_group(g).column(column).statistics for g in range(meta.num_row_groups)] \
            if column is not None else []
        if meta.num_rows != part["count"] or column is None or not all(s is not None and s.has_min_max
                                                                          for s in stats):
            return f"it holds {meta.num_rows} rows, not the manifest's {part['count']}" \
                if meta.num_rows != part["count"] else "its row ids carry no statistics"
        lo, hi = min(s.min for s in stats), max(s.max for s in stats)
        dense = part["count"] == part["rows"][1] - part["rows"][0]
        if lo < part["rows"][0] or hi >= part["rows"][1] or (dense and (lo, hi) != (part["rows"][0],
                                                                             part["rows"][1] - 1)):
            return f"its row ids {lo} to {hi} do not match the manifest's range {part['rows']}"
        return None

    def require_intact(self) -> None:
        """Refuse a store one of whose parts fails the cheap check, naming it."""
        if problems := self.damaged_parts():
            raise RetrievalError(f"store {self.path} is damaged ({problems[0]}); check it with "
                                 f"`retrieval store verify {self.path}` and encode the corpus again")

    def require_complete(self) -> None:
        if not self.complete:
            raise RetrievalError(f"store {self.path} is incomplete: run the same `retrieval encode` "
                                 "command again to finish it")

    def iter_batches(self, batch_rows: int = 65536, between: tuple[int, int] | None = None
                     ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Stream the live (row ids int64 [n], vectors float32 [n, dim]) in row order, a bounded batch at a time;
        with `between` (lo, hi), only row ids lo ≤ row < hi, reading only the parts that hold them."""
        lo, hi = between or (0, np.iinfo(np.int64).max)
        for part in self.parts:
            if part["rows"][1] <= lo or part["rows"][0] >= hi:
                continue
            path = self.path / part["file"]
            for batch in self._batches(path, ["row", "embedding"], batch_rows):
                rows = batch.column("row").to_numpy().astype(np.int64, copy=False)
                keep = self._keep(rows) & (rows >= lo) & (rows < hi)
                vectors = self._vectors(batch, path)
                yield (rows, vectors) if keep.all() else (rows[keep], vectors[keep])

    def read_vectors(self, rows: np.ndarray) -> np.ndarray:
        """Vectors of the given row ids, in the given order, reading only the row groups that hold them."""
        rows = np.asarray(rows, dtype=np.int64)
        out = np.empty((len(rows), self.dim), np.float32)
        for part in self.parts:
            lo, hi = part["rows"]
            hit = np.flatnonzero((rows >= lo) & (rows < hi))
            if not len(hit):
                continue
            path = self.path / part["file"]
            stored = self.part_rows(part)
            offsets = np.searchsorted(stored, rows[hit])
            if (offsets >= len(stored)).any() or (stored[np.minimum(offsets, len(stored) - 1)] != rows[hit]).any():
                raise RetrievalError(f"store {self.path} holds no row {rows[hit][0]} in {part['file']}")
            with reading(path):
                parquet = pq.ParquetFile(self._source(path), page_checksum_verification=True)
                sizes = [parquet.metadata.row_group(g).num_rows for g in range(parquet.num_row_groups)]
                starts = np.concatenate([[0], np.cumsum(sizes)])
                group_of = np.searchsorted(starts, offsets, side="right") - 1
                groups = np.unique(group_of)
                table = parquet.read_row_groups(groups.tolist(), columns=["embedding"])
                read_starts = np.concatenate([[0], np.cumsum(np.diff(starts)[groups])[:-1]])
                local = read_starts[np.searchsorted(groups, group_of)] + offsets - starts[group_of]
                out[hit] = self._vectors(table.take(pa.array(local)), path)
        return out

    def _batches(self, path: Path, columns: list[str], batch_rows: int) -> Iterator[pa.RecordBatch]:
        with reading(path):
            parquet = pq.ParquetFile(self._source(path), page_checksum_verification=True)
            yield from parquet.iter_batches(batch_size=batch_rows, columns=columns)

    def _vectors(self, batch: pa.RecordBatch | pa.Table, path: Path) -> np.ndarray:
        column = batch.column("embedding")
        width = getattr(column.type, "list_size", None)
        if width != self.dim:
            raise RetrievalError(f"{path} holds vectors of width {width}, but the store's manifest says dim "
                                 f"{self.dim}; run `retrieval store verify {path.parent}`")
        return check_unit(vectors_of(column, self.dim), path)

    def sample(self, n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """A uniform random sample of at most n live (row ids, vectors), read part by part."""
        live = self.live_rows()
        rng = np.random.default_rng(seed)
        rows = np.sort(rng.choice(live, size=min(n, len(live)), replace=False)) if n and len(live) \
            else np.zeros(0, np.int64)
        return rows.astype(np.int64), self.read_vectors(rows)

    def metadata(self) -> pa.Table:
        """Every column but the embedding and extra columns (sparse codes), for the live rows in row order
        (`positions` maps row ids to positions in it)."""
        return self.read_table(skip=["embedding", *self.manifest.get("extra_columns", [])])

    def read_table(self, columns: list[str] | None = None, skip: list[str] = ()) -> pa.Table:
        """The live rows of this version as one Arrow table (`.to_pandas()` for pandas): `columns`, or all but
        `skip`."""
        tables = []
        for path in self.part_paths:
            with reading(path):
                source = self._source(path)
                names = columns or [c for c in pq.read_schema(source).names if c not in skip]
                table = pq.read_table(source, columns=names if "row" in names else ["row", *names],
                                      page_checksum_verification=True)
            keep = self._keep(table.column("row").to_numpy())
            table = table if keep.all() else table.filter(pa.array(keep))
            tables.append(table if "row" in names else table.drop_columns(["row"]))
        if not tables:  # no live rows: the columns of a part that holds none (a compaction keeps one)
            schema = self.schema()
            names = columns or [c for c in schema.names if c not in skip]
            return pa.schema([schema.field(c) for c in names]).empty_table() if schema else pa.table({})
        return pa.concat_tables(tables, promote_options="default")

    def schema(self) -> pa.Schema | None:
        """The columns of the version's parts, read from its first part file (None when it has no file)."""
        written = [p for p in self.manifest["parts"] if in_version(p, self.version) and p.get("sha256")]
        if not written:
            return None
        path = self.path / min(written, key=lambda p: p["rows"][0])["file"]
        with reading(path):
            return pq.read_schema(self._source(path))

    def positions(self, rows: np.ndarray) -> np.ndarray:
        """Where live row ids sit in `metadata()` and `read_table()`."""
        return np.searchsorted(self.live_rows(), np.asarray(rows, dtype=np.int64))

    def sql_source(self) -> str:
        """A DuckDB table expression over the live rows of this version."""
        def files(paths: list[Path]) -> str:
            return ", ".join("'" + str(p).replace("'", "''") + "'" for p in paths)

        parts = f"read_parquet([{files(self.part_paths)}])"
        if not self.deletions:
            return parts
        deleted = files([self.path / d["file"] for d in self.deletions])
        return f"(SELECT * FROM {parts} WHERE row NOT IN (SELECT row FROM read_parquet([{deleted}])))"


def write_manifest(path: Path, manifest: dict[str, Any]) -> None:
    write_json(path / MANIFEST, manifest)


@contextlib.contextmanager
def reading(path: Path) -> Iterator[None]:
    """Turn a failed read of a part (missing, truncated, a bad page checksum, garbage) into one clear error."""
    try:
        yield
    except FileNotFoundError:
        raise RetrievalError(f"part {path} is missing; run `retrieval store verify {path.parent}`") from None
    except (OSError, pa.ArrowException) as e:
        raise RetrievalError(f"part {path} is damaged ({first_line(e)}); run `retrieval store verify {path.parent}` "
                             "and encode the corpus again") from None
