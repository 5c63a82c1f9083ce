"""The store's manifest.json: its checks, and which parts and deletions make up each version.

The store is append-only. Version 1 is what `retrieval encode` wrote; each later change (items added, items
deleted, parts compacted) commits the next version in one atomic rewrite of manifest.json. Every part and every
deletion file records the version that `added` it and, once a compaction has replaced it, the version that
`removed` it; version V is the parts and deletions with added ≤ V < removed. A deletion file lists row ids
removed from search (a deletion vector); rows are never rewritten in place, and row ids are never reused.
"""

from __future__ import annotations

import re
from typing import Any

from retrieval.files import has_type

FORMAT = "retrieval.embedding-store"
VERSION = 2  # of the manifest's format; version 1 manifests (no versions yet) are read as store version 1
MANIFEST = "manifest.json"
MAX_DIM = 65536
CORE_COLUMNS = ("row", "id", "image", "text", "embedding")
PART_FILE = re.compile(r"part-(\d{5,})\.parquet")
DELETION_FILE = re.compile(r"deleted-(\d{5,})\.parquet")


def part_name(index: int) -> str:
    return f"part-{index:05d}.parquet"


def deletion_name(version: int) -> str:
    return f"deleted-{version:05d}.parquet"


def current_version(manifest: dict[str, Any]) -> int:
    return manifest.get("store_version", 1)


def oldest_version(manifest: dict[str, Any]) -> int:
    """The oldest version the store still holds (compaction drops the ones before it)."""
    return manifest.get("oldest_version", 1)


def in_version(entry: dict[str, Any], version: int) -> bool:
    return entry.get("added", 1) <= version and (entry.get("removed") is None or version < entry["removed"])


def parts_of(manifest: dict[str, Any], version: int) -> list[dict[str, Any]]:
    """The parts of a version that hold rows, in row order."""
    return sorted((p for p in manifest["parts"] if p["count"] > 0 and in_version(p, version)),
                  key=lambda p: p["rows"][0])


def deletions_of(manifest: dict[str, Any], version: int) -> list[dict[str, Any]]:
    return [d for d in manifest.get("deletions", []) if in_version(d, version)]


def next_row(manifest: dict[str, Any]) -> int:
    """The row id the next added item gets: one past every row id ever given (`next_row` keeps the mark when the
    parts that held the highest are dropped)."""
    return max([manifest.get("first_row", 0), manifest.get("next_row", 0), *(p["rows"][1] for p in manifest["parts"])])


def next_part(manifest: dict[str, Any]) -> int:
    """The number of the next part file: one past every part ever named."""
    return max([manifest.get("first_part", 0), manifest.get("next_part", 0),
                *(int(PART_FILE.fullmatch(p["file"])[1]) + 1 for p in manifest["parts"])])


def live_count(manifest: dict[str, Any], version: int) -> int:
    return sum(p["count"] for p in parts_of(manifest, version)) - sum(d["count"]
                                                                      for d in deletions_of(manifest, version))


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
    if not all(has_type(manifest.get(k, 1), int) and manifest.get(k, 1) >= 0
               for k in ("store_version", "oldest_version", "first_row", "first_part", "next_row", "next_part")):
        return "store_version, oldest_version, first_row, first_part, next_row and next_part must be whole numbers"
    if not 1 <= oldest_version(manifest) <= current_version(manifest):
        return "oldest_version must be 1 to store_version"
    if not isinstance(manifest.get("deletions", []), list):
        return "deletions must be a list"
    for i, part in enumerate(manifest["parts"]):
        if problem := _entry_problem(part, PART_FILE, (("rows", list),)):
            return f"part entry {i}: {problem}"
        lo, hi = part["rows"] if len(part["rows"]) == 2 and all(has_type(r, int) for r in part["rows"]) else (0, -1)
        if not 0 <= part["count"] <= hi - lo:
            return f"part entry {i} ({part['file']!r}) has a bad count or row range"
    for i, deletion in enumerate(manifest.get("deletions", [])):
        if problem := _entry_problem(deletion, DELETION_FILE, ()):
            return f"deletion entry {i}: {problem}"
    for key in ("parts", "deletions"):
        files = [str(e.get("file")) for e in manifest.get(key, [])]
        if len(set(files)) != len(files):
            return f"a {key[:-1]} file is listed twice"
    for version in (oldest_version(manifest), current_version(manifest)):
        expected = manifest.get("first_row", 0)
        for part in parts_of(manifest, version):
            if part["rows"][0] < expected:
                return f"version {version}: part {part['file']!r} overlaps the rows before it"
            expected = part["rows"][1]
    if live_count(manifest, current_version(manifest)) != manifest["count"]:
        return f"the current version holds {live_count(manifest, current_version(manifest))} live rows " \
               f"but count says {manifest['count']}"
    return None


def _entry_problem(entry: Any, name: re.Pattern, fields: tuple[tuple[str, type], ...]) -> str | None:
    if not isinstance(entry, dict) or not all(has_type(entry.get(k), t) for k, t in (("file", str), ("count", int),
                                                                                      *fields)):
        return "it lacks file, count" + "".join(f" or {k}" for k, _ in fields)
    if not name.fullmatch(entry["file"]) or entry["count"] < 0:
        return f"{entry['file']!r} is a bad file name or count"
    added, removed = entry.get("added", 1), entry.get("removed")
    if not (has_type(added, int) and added >= 1 and (removed is None or (has_type(removed, int) and removed > added))):
        return f"{entry['file']!r} has a bad added or removed version"
    if entry["count"] and not (has_type(entry.get("sha256"), str) and all(
            has_type(entry[k], t) for k, t in (("bytes", int), ("tail_sha256", str)) if k in entry)):
        return f"{entry['file']!r} lacks its checksums"
    return None
