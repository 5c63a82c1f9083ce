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
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from retrieval.errors import RetrievalError, first_line
from retrieval.files import atomic_path, has_type, read_json, sha256_file, write_json

FORMAT = "retrieval.embedding-store"
VERSION = 1
MANIFEST = "manifest.json"
ERRORS = "errors.parquet"
DTYPES = {"float32": (np.float32, pa.float32()), "float16": (np.float16, pa.float16())}
TAIL_BYTES = 65536  # the end of a part checked on open: the footer and the last pages
UNIT_TOLERANCE = 1e-2  # |‖v‖² − 1| allowed (float16 rounding is about 1e-3)


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


class EmbeddingStore:
    """Read access to a store folder made by `retrieval encode`."""

    def __init__(self, path: str | os.PathLike):
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
    def parts(self) -> list[dict[str, Any]]:
        """The committed parts that hold rows."""
        return [p for p in self.manifest["parts"] if p["count"] > 0]

    @property
    def part_paths(self) -> list[Path]:
        return [self.path / p["file"] for p in self.parts]

    def fingerprint(self) -> str:
        """Changes whenever any committed part or the encoder changes."""
        h = hashlib.sha256(self.encoder["weights_sha256"].encode())
        for part in self.manifest["parts"]:
            h.update(f"{part['file']}:{part['count']}:{part['sha256']}\n".encode())
        return h.hexdigest()

    def damaged_parts(self, full: bool = False) -> list[str]:
        """Parts whose file differs from the manifest, each with why. Cheap by default (size and the checksum
        of the last TAIL_BYTES; parts of stores written before that was recorded are hashed whole); `full`
        hashes every file whole and decodes it, checking page checksums and unit norms."""
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
                elif full:
                    expected = part["rows"][0]
                    for batch in self._batches(path, ["row", "embedding"], 65536):
                        self._vectors(batch, path)
                        rows = batch.column("row").to_numpy()
                        if not np.array_equal(rows, np.arange(expected, expected + len(rows))):
                            raise RetrievalError(f"its row ids are not the manifest's range {part['rows']}")
                        expected += len(rows)
            except FileNotFoundError:
                problems.append(f"{part['file']}: missing")
            except RetrievalError as e:
                problems.append(f"{part['file']}: {e}")
        return problems

    def require_intact(self) -> None:
        """Refuse a store one of whose parts fails the cheap check, naming it."""
        if problems := self.damaged_parts():
            raise RetrievalError(f"store {self.path} is damaged ({problems[0]}); check it with "
                                 f"`retrieval store verify {self.path}` and encode the corpus again")

    def require_complete(self) -> None:
        if not self.complete:
            raise RetrievalError(f"store {self.path} is incomplete: run the same `retrieval encode` "
                                 "command again to finish it")

    def iter_batches(self, batch_rows: int = 65536) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Stream (row ids int64 [n], vectors float32 [n, dim]) in row order, a bounded batch at a time."""
        for path in self.part_paths:
            for batch in self._batches(path, ["row", "embedding"], batch_rows):
                yield batch.column("row").to_numpy().astype(np.int64, copy=False), self._vectors(batch, path)

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
            with reading(path):
                parquet = pq.ParquetFile(path, page_checksum_verification=True)
                offsets = rows[hit] - lo
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
            parquet = pq.ParquetFile(path, page_checksum_verification=True)
            yield from parquet.iter_batches(batch_size=batch_rows, columns=columns)

    def _vectors(self, batch: pa.RecordBatch | pa.Table, path: Path) -> np.ndarray:
        column = batch.column("embedding")
        width = getattr(column.type, "list_size", None)
        if width != self.dim:
            raise RetrievalError(f"{path} holds vectors of width {width}, but the store's manifest says dim "
                                 f"{self.dim}; run `retrieval store verify {path.parent}`")
        return check_unit(vectors_of(column, self.dim), path)

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
        tables = []
        for path in self.part_paths:
            with reading(path):
                columns = [c for c in pq.read_schema(path).names if c not in skip]
                tables.append(pq.read_table(path, columns=columns, page_checksum_verification=True))
        return pa.concat_tables(tables) if tables else pa.table({})

    def sql_source(self) -> str:
        """A DuckDB table expression over the parts."""
        files = ", ".join("'" + str(p).replace("'", "''") + "'" for p in self.part_paths)
        return f"read_parquet([{files}])"


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


MAX_DIM = 65536
CORE_COLUMNS = ("row", "id", "image", "text", "embedding")


def manifest_problem(manifest: dict[str, Any]) -> str | None:
    """What is wrong with the store manifest's fields that readers rely on, or None."""
    for key, kind in (("dim", int), ("count", int), ("parts", list), ("encoder", dict)):
        if not has_type(manifest.get(key), kind):
            return f"missing or wrong {key} ({kind.__name__})"
    if not 0 < manifest["dim"] <= MAX_DIM or manifest["count"] < 0:
        return f"dim must be 1 to {MAX_DIM} and count at least 0"
    if not all(has_type(manifest["encoder"].get(k), str) for k in ("name", "weights_sha256")):
        return "the encoder's name or weights_sha256 is missing"
    if not has_type(manifest.get("complete", False), bool):
        return "complete must be true or false"
    extra = manifest.get("extra_columns", [])
    if not isinstance(extra, list) or not all(isinstance(c, str) and c not in CORE_COLUMNS for c in extra):
        return f"extra_columns must be a list of column names other than {', '.join(CORE_COLUMNS)}"
    files = [p.get("file") for p in manifest["parts"] if isinstance(p, dict)]
    if len(set(map(str, files))) != len(files):
        return "a part file is listed twice"
    expected_row = 0
    for i, part in enumerate(manifest["parts"]):
        if not isinstance(part, dict) or not all(has_type(part.get(k), t) for k, t in
                                                 (("file", str), ("count", int), ("rows", list))):
            return f"part entry {i} lacks file, count or rows"
        if (not re.fullmatch(r"part-\d{5,}\.parquet", part["file"]) or part["count"] < 0
                or part["rows"] != [expected_row, expected_row + part["count"]]):
            return f"part entry {i} ({part['file']!r}) has a bad file name, count or row range"
        if part["count"] and not (has_type(part.get("sha256"), str) and all(
                has_type(part[k], t) for k, t in (("bytes", int), ("tail_sha256", str)) if k in part)):
            return f"part entry {i} ({part['file']!r}) lacks its checksums"
        expected_row += part["count"]
    if expected_row != manifest["count"]:
        return f"its parts hold {expected_row} rows but count says {manifest['count']}"
    return None

