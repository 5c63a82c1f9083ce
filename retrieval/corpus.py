"""Reading a corpus — a .jsonl/.csv/.parquet manifest or a folder of images — into checked rows.

Every source row keeps its `position`; rows that cannot be used carry an `error` (the reason) instead
of being dropped, so the encode job can report them in errors.parquet.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa

from retrieval.csv_manifest import as_numbers, read_csv_rows
from retrieval.errors import RetrievalError, first_line
from retrieval.files import sha256_file
from retrieval.images import IMAGE_SUFFIXES
from retrieval.paths import PathPolicy, PathRefused, read_text

MANIFEST_SUFFIXES = (".jsonl", ".csv", ".parquet")
RESERVED_COLUMNS = ("row", "embedding", "position", "error", "rank", "score")
MAX_TEXT_CHARS = 20_000
READ_ERROR: Any = object()  # the key under which a reader gives a record's reason: no column can be named so


@dataclass
class Corpus:
    """A read corpus: `table` has position, id, image (absolute path), text, error, and metadata columns;
    `paths` says which image files it may read."""

    source: Path
    table: pa.Table
    fingerprint: str
    paths: PathPolicy

    def __len__(self) -> int:
        return self.table.num_rows

    @property
    def metadata_columns(self) -> list[str]:
        return [c for c in self.table.column_names if c not in ("position", "id", "image", "text", "error")]


def is_corpus(path: str | os.PathLike) -> bool:
    path = Path(path)
    return path.is_dir() or path.suffix.lower() in MANIFEST_SUFFIXES


def read_corpus(path: str | os.PathLike, max_text_chars: int = MAX_TEXT_CHARS, follow_symlinks: bool = False,
                root_only: bool = False) -> Corpus:
    """Read and check a corpus; raises RetrievalError only when the whole source is unusable.

    Files under the corpus root reached through a symlink that leaves it are refused unless `follow_symlinks`;
    manifest paths outside the manifest's folder are read unless `root_only` (retrieval.paths)."""
    path = Path(path)
    if not path.exists():
        raise RetrievalError(f"corpus not found: {path}")
    root = (path if path.is_dir() else path.parent).resolve()
    policy = PathPolicy.for_root(root, follow_symlinks=follow_symlinks, root_only=root_only)
    if path.is_dir():
        files = _walk(root, follow_symlinks)
        records, fingerprint = _read_folder(root, files, policy, max_text_chars), _folder_fingerprint(root, files)
    else:
        suffix = path.suffix.lower()
        readers = {".jsonl": _read_jsonl, ".csv": _read_csv, ".parquet": _read_parquet}
        if suffix not in readers:
            raise RetrievalError(f"unsupported corpus {path}: use a folder or a {'/'.join(MANIFEST_SUFFIXES)} file")
        records, fingerprint = readers[suffix](path), sha256_file(path)
    rows = _check_rows(records, root, max_text_chars)
    if not rows:
        raise RetrievalError(f"corpus {path} has no rows")
    return Corpus(source=path.resolve(), table=_to_table(rows), fingerprint=fingerprint, paths=policy)


def corpus_from_records(records: list[dict[str, Any]], root: str | os.PathLike = ".", follow_symlinks: bool = False,
                        root_only: bool = False) -> Corpus:
    """A corpus of items given as dicts (id, image, text, metadata), their image paths relative to `root`."""
    if not isinstance(records, list) or not all(isinstance(r, dict) for r in records):
        raise RetrievalError("items must be a list of dicts (id, image, text and metadata)")
    rows = _check_rows([dict(r) for r in records], Path(root).resolve(), MAX_TEXT_CHARS)
    if not rows:
        raise RetrievalError("no items given")
    digest = hashlib.sha256(json.dumps(records, sort_keys=True, default=str).encode()).hexdigest()
    root = Path(root).resolve()
    policy = PathPolicy.for_root(root, follow_symlinks=follow_symlinks, root_only=root_only)
    return Corpus(source=root, table=_to_table(rows), fingerprint=digest, paths=policy)


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    records = []
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            line = raw.decode("utf-8-sig" if number == 1 else "utf-8", errors="surrogateescape").strip()
            if not line:
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                records.append({READ_ERROR: f"broken manifest row (line {number}): invalid JSON: {e.msg}"})
                continue
            if not isinstance(record, dict):
                records.append({READ_ERROR: f"broken manifest row (line {number}): not a JSON object"})
                continue
            records.append(record)
    return records


def _read_csv(path: Path) -> list[dict[str, Any]]:
    header, rows = read_csv_rows(path)
    records = [{k: (v if v != "" else None) for k, v in zip(header, values)} if isinstance(values, list)
               else {READ_ERROR: values} for values in rows]
    for column in set(header) - {"id", "image", "text"}:
        kept = [r for r in records if READ_ERROR not in r and r.get(column) is not None]
        parsed = as_numbers([r[column] for r in kept])
        for r, value in zip(kept, parsed or []):
            r[column] = value
    return records


def _read_parquet(path: Path) -> list[dict[str, Any]]:
    import pyarrow.parquet as pq

    try:
        return pq.read_table(path).to_pylist()
    except (pa.ArrowException, OSError) as e:
        raise RetrievalError(f"cannot read corpus {path}: {e}") from None


def _walk(root: Path, follow_symlinks: bool) -> list[Path]:
    """Every file under `root` in a stable order. Linked folders are entered only when following symlinks, and
    then each real folder once (a link loop ends)."""
    files, seen = [], set()
    for folder, _, names in os.walk(root, followlinks=follow_symlinks):
        if follow_symlinks:
            st = os.stat(folder)
            if (st.st_dev, st.st_ino) in seen:
                continue
            seen.add((st.st_dev, st.st_ino))
        files += [Path(folder, name) for name in names]
    return sorted(files)


def _read_folder(root: Path, files: list[Path], policy: PathPolicy, max_chars: int) -> list[dict[str, Any]]:
    listed = set(files)
    records = []
    for path in (p for p in files if p.suffix.lower() in IMAGE_SUFFIXES):
        rel = path.relative_to(root).as_posix()
        record: dict[str, Any] = {"id": rel, "image": rel}
        sidecar = path.with_suffix(".txt")
        if sidecar in listed:
            record.update(_read_sidecar(sidecar, policy, max_chars))
        records.append(record)
    if not records:
        raise RetrievalError(f"no images ({', '.join(IMAGE_SUFFIXES)}) found under {root}")
    return records


def _read_sidecar(path: Path, policy: PathPolicy, max_chars: int) -> dict[str, Any]:
    """{"text": ...} read from a caption file, at most `max_chars` of it; with an "error" when it is unusable."""
    try:
        with policy.open_file(path) as f:
            text, more = read_text(f, max_chars)
    except PathRefused as e:
        return {READ_ERROR: f"sidecar text refused: {e}"}
    except OSError as e:
        return {READ_ERROR: f"cannot read sidecar text: {e.strerror or e} ({path})"}
    if more:
        return {"text": text, READ_ERROR: f"text too long: {path.name} has more than {max_chars} characters"}
    return {"text": text.strip()}


def _folder_fingerprint(root: Path, files: list[Path]) -> str:
    h = hashlib.sha256()
    for path in files:
        try:
            st = path.stat()
        except OSError:  # a broken link: it counts by its name
            st = os.stat_result((0,) * 10)
        h.update(f"{path.relative_to(root).as_posix()}\0{st.st_size}\0{st.st_mtime_ns}\n"
                 .encode("utf-8", "surrogateescape"))  # a file name need not be UTF-8
    return h.hexdigest()


def _has_bad_utf8(value: Any) -> bool:
    return isinstance(value, str) and any("\udc80" <= ch <= "\udcff" for ch in value)


def _check_rows(records: list[dict[str, Any]], root: Path, max_text_chars: int) -> list[dict[str, Any]]:
    """Give each record its position, id, absolute image path and an error (or None)."""
    first_seen: dict[str, int] = {}
    rows = []
    for position, record in enumerate(records):
        clash = [c for c in RESERVED_COLUMNS if any(isinstance(k, str) and k.casefold() == c for k in record)]
        if clash:
            raise RetrievalError(f"corpus column {clash[0]!r} is reserved by the embedding store; rename it")
        row = {"position": position, **record}
        row["error"] = row.pop(READ_ERROR, None)
        rid = row.get("id")
        row["id"] = str(position) if rid is None else str(rid)
        image, text = row.get("image"), row.get("text")
        if row["error"] is None:
            row["error"] = _row_error(row, image, text, max_text_chars, first_seen)
        if row["error"] is None:
            first_seen[row["id"]] = position
        row["image"] = os.path.normpath(root / image) if isinstance(image, str) and image.strip() else None
        row["text"] = text if isinstance(text, str) else None
        for key, value in row.items():
            if _has_bad_utf8(value):  # keep the row (with its error) storable: arrow needs valid UTF-8
                row[key] = value.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
        rows.append(row)
    return rows


def _row_error(row: dict, image: Any, text: Any, max_chars: int, first_seen: dict[str, int]) -> str | None:
    bad = [key for key, value in row.items() if _has_bad_utf8(value)]
    if bad:
        return f"{bad[0]} is not valid UTF-8"
    if row["id"] in first_seen:
        return f"duplicate id: {row['id']!r} (first at position {first_seen[row['id']]})"
    if image is not None and not isinstance(image, str):
        return f"image must be a path string, got {type(image).__name__}"
    if text is not None and not isinstance(text, str):
        return f"text must be a string, got {type(text).__name__}"
    has_image = isinstance(image, str) and image.strip() != ""
    if text is not None and len(text) > max_chars:
        return f"text too long: {len(text)} characters > limit {max_chars}"
    if not has_image and (text is None or not text.strip()):
        return "empty text and no image" if text is not None else "item has neither image nor text"
    return None


def check_column_names(names: list[Any]) -> None:
    """Column names a store and SQL filters can tell apart: strings without control characters, unique
    regardless of case (SQL identifiers ignore it, so `ROW` would be `row`)."""
    seen: dict[str, str] = {}
    for name in names:
        if not isinstance(name, str) or not name or any(ord(ch) < 32 for ch in name):
            raise RetrievalError(f"corpus column name {name!r} is empty or holds control characters; rename it")
        folded = name.casefold()
        if folded in seen:
            raise RetrievalError(f"corpus columns {seen[folded]!r} and {name!r} differ only in case, which SQL "
                                 "filters cannot tell apart; rename one")
        seen[folded] = name


def _as_strings(rows: list[dict[str, Any]], key: str) -> None:
    """Store a column's values as text: JSON for objects and lists, str() for the rest."""
    for row in rows:
        if row.get(key) is not None and not isinstance(row[key], str):
            row[key] = json.dumps(row[key]) if isinstance(row[key], (dict, list)) else str(row[key])


def _parquet_can_hold(field: pa.Field) -> bool:
    import pyarrow.parquet as pq

    try:
        pq.ParquetWriter(pa.BufferOutputStream(), pa.schema([field])).close()
        return True
    except (pa.ArrowException, OverflowError):
        return False


def _to_table(rows: list[dict[str, Any]]) -> pa.Table:
    """Build the table; a metadata column whose values mix types is kept as strings."""
    columns: dict[str, set[type]] = {}
    for row in rows:
        for key, value in row.items():
            if value is not None:
                columns.setdefault(key, set()).add(type(value))
    for key, types in columns.items():
        mixed = len(types - {int, float}) > 0 and len(types) > 1
        if mixed or (int in types and any(abs(r[key]) >= 2**63 for r in rows if isinstance(r.get(key), int))):
            _as_strings(rows, key)
    fixed = {"position": pa.int64(), "id": pa.string(), "image": pa.string(), "text": pa.string(),
             "error": pa.string()}
    names = list(dict.fromkeys(key for row in rows for key in row))  # every key, not just the first row's
    check_column_names(names)
    try:
        table = pa.Table.from_pydict({key: [row.get(key) for row in rows] for key in names})
        for name, typ in fixed.items():
            if name not in table.column_names:
                table = table.append_column(name, pa.nulls(table.num_rows, typ))
            elif table.schema.field(name).type != typ:
                table = table.set_column(table.column_names.index(name), name, table[name].cast(typ))
    except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError, OverflowError) as e:
        raise RetrievalError(f"corpus metadata cannot be stored: {first_line(e)}") from None
    unstorable = [name for name in table.column_names if not _parquet_can_hold(table.schema.field(name))]
    if unstorable:  # a struct with no fields ({} in every row), say: kept as its JSON text
        for name in unstorable:
            _as_strings(rows, name)
        return _to_table(rows)
    order = list(fixed) + [c for c in table.column_names if c not in fixed]
    return table.select(order)

