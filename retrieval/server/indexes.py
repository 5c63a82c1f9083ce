"""The indexes a server holds: each opened once under a name, described for clients, and its items' files.

The image route serves the file that the store recorded for the row: a request names a row, never a path.
The file is judged again as it is opened, by the corpus rules the store recorded (its root, and whether a
manifest's paths outside its folder were allowed: not with --root-only), made stricter: no symlink is followed
out of the root (even for a store encoded with --follow-symlinks), and outside the root no symlink at all.
"""

from __future__ import annotations

import io
import logging
import os
import re
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from retrieval.errors import RetrievalError, first_line
from retrieval.filters import column_types
from retrieval.images import ImageReadError, decode_image
from retrieval.index_folder import INDEX_JSON
from retrieval.paths import PathPolicy, PathRefused, is_within
from retrieval.search import SearchIndex, open_index
from retrieval.server.queries import DECODING
from retrieval.store import EmbeddingStore

NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
MEDIA_TYPES = {".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".png": "image/png", ".bmp": "image/bmp",
               ".gif": "image/gif", ".webp": "image/webp", ".tif": "image/tiff", ".tiff": "image/tiff"}
MAX_IMAGE_FILE = 64 * 2**20  # bytes of one served image file
THUMBNAIL_SIZES = range(16, 1025)
CHECK_SECONDS = 0.5  # how often a served index looks for a newer version of its folder
log = logging.getLogger("retrieval.serve")


class NotFound(RetrievalError):
    """A name or row the server does not have (HTTP 404)."""


class ServedIndex:
    """An index served under a name. It follows its folder: a watcher thread looks at index.json every
    CHECK_SECONDS, and when it has changed (an `index add`, `delete`, `compact`, `sync` or `build`) opens the new
    version with the same encoder and swaps it in; queries already running finish on the version they began with."""

    def __init__(self, name: str, folder: Path, searcher: SearchIndex):
        self.name, self.folder = name, Path(folder)
        self.searcher, self.columns = searcher, column_types(searcher.metadata)
        self._seen = self._signature()
        threading.Thread(target=self._watch, name=f"watch-{name}", daemon=True).start()

    def _signature(self) -> tuple[int, int, int] | None:
        try:
            st = os.stat(self.folder / INDEX_JSON)
        except OSError:
            return None
        return st.st_ino, st.st_mtime_ns, st.st_size

    def _watch(self) -> None:
        while True:
            time.sleep(CHECK_SECONDS)
            signature = self._signature()
            if signature != self._seen:
                self._reload()
                self._seen = signature

    def _reload(self) -> None:
        try:
            searcher = SearchIndex(self.folder, encoder=self.searcher.encoder)
            self.columns, self.searcher = column_types(searcher.metadata), searcher
            log.info("index %r: now serving store version %s", self.name, searcher.store.version)
        except Exception as e:  # a broken or mismatched change: keep serving what was open
            log.warning("index %r changed but cannot be opened, still serving the version before: %s",
                        self.name, first_line(e))

    def describe(self) -> dict[str, Any]:
        """What a client needs to query this index and build a filter form for it."""
        searcher = self.searcher
        info, encoder = searcher.info, searcher.encoder
        return {"name": self.name, "encoder": {"name": encoder.name, "family": encoder.config.family,
                                               "dim": encoder.dim, "fusion": encoder.fusion},
                "fusion_modes": searcher.fusion_modes(), "fusion_default": getattr(encoder, "fusion_mode", None),
                "count": searcher.store.count, "store_version": searcher.store.version,
                "index_kind": info.get("factory"), "search_params": info["search_params"], "columns": self.columns}

    def check_row(self, searcher: SearchIndex, row: int) -> int:
        """The row's position in the metadata of `searcher`, if it is a live row."""
        live = searcher.store.live_rows()
        position = int(np.searchsorted(live, row))
        if position >= len(live) or live[position] != row:
            raise NotFound(f"index {self.name!r} has no row {row}" + (" (it was deleted)" if row in
                                                                       searcher.store.deleted else ""))
        return position

    def item(self, row: int) -> dict[str, Any]:
        """One item's stored fields, as a search hit shows them (without rank and score)."""
        searcher = self.searcher
        self.check_row(searcher, row)
        hit = searcher.hits(np.zeros(1, np.float32), np.array([row], np.int64))[0].to_dict()
        return {key: value for key, value in hit.items() if key not in ("rank", "score")}

    def image_file(self, row: int, size: int | None = None) -> tuple[bytes, str]:
        """An item's image file as (bytes, media type), read from inside its corpus root only; with `size`, a
        PNG thumbnail whose longer side is at most that."""
        searcher = self.searcher
        position = self.check_row(searcher, row)
        metadata = searcher.metadata
        path = metadata["image"][position].as_py() if "image" in metadata.column_names else None
        if path is None:
            raise NotFound(f"item {row} of index {self.name!r} has no image")
        policy = corpus_images(searcher.store, row)
        if policy is None:
            raise NotFound(f"the store of index {self.name!r} records no corpus root, so no image is served")
        media = MEDIA_TYPES.get(Path(path).suffix.lower())
        if media is None:
            raise NotFound(f"item {row} of index {self.name!r}: not an image file name")
        if size is not None and size not in THUMBNAIL_SIZES:
            raise RetrievalError(f"size must be {THUMBNAIL_SIZES.start} to {THUMBNAIL_SIZES.stop - 1}")
        data = self._read(policy, path, row)
        if size is None:
            return data, media
        try:
            with DECODING:
                image = decode_image(data, path)
        except ImageReadError as e:
            raise NotFound(f"item {row} of index {self.name!r}: {e}") from None
        image.thumbnail((size, size))
        out = io.BytesIO()
        image.save(out, format="PNG")
        return out.getvalue(), "image/png"

    def _read(self, policy: PathPolicy, path: str, row: int) -> bytes:
        try:
            with policy.open_file(path) as file:
                real = os.path.realpath(f"/proc/self/fd/{file.fileno()}")
                if not is_within(path, policy.root) and real != os.path.normpath(path):
                    raise PathRefused(f"outside the corpus root, {path} is reached through a symlink")
                if os.fstat(file.fileno()).st_size > MAX_IMAGE_FILE:
                    raise NotFound(f"item {row} of index {self.name!r}: the image file is over "
                                   f"{MAX_IMAGE_FILE // 2**20} MB")
                return file.read()
        except PathRefused as e:
            raise NotFound(f"item {row} of index {self.name!r}: image refused: {e}") from None
        except OSError as e:
            raise NotFound(f"item {row} of index {self.name!r}: image not readable ({e.strerror or e})") from None


def parse_index_specs(values: list[str]) -> dict[str, Path]:
    """`--index DIR` or `--index NAME=DIR` → {name: folder}; a bare folder is named after itself."""
    specs: dict[str, Path] = {}
    for value in values:
        name, sep, folder = value.partition("=")
        if not sep or not NAME.fullmatch(name):  # a folder whose own name holds `=`
            name, folder = Path(value).resolve().name, value
        if not NAME.fullmatch(name):
            raise RetrievalError(f"cannot name index {value!r} after its folder: give it as NAME=DIR, NAME being "
                                 "letters, digits, '.', '_' or '-'")
        if name in specs:
            raise RetrievalError(f"two indexes are named {name!r}: give one as NAME=DIR")
        specs[name] = Path(folder)
    if not specs:
        raise RetrievalError("serve needs at least one --index")
    return specs


def corpus_images(store: EmbeddingStore, row: int) -> PathPolicy | None:
    """The corpus rules recorded for the row's part (items added later may come from another corpus), as the
    policy its image is served by (never following symlinks)."""
    part = next((p for p in store.parts if p["rows"][0] <= row < p["rows"][1]), {})
    corpus = store.manifest.get("corpus")
    paths = part.get("paths") or (corpus.get("paths") if isinstance(corpus, dict) else None)
    if not (isinstance(paths, dict) and isinstance(paths.get("root"), str)):
        return None
    return PathPolicy.for_root(paths["root"], follow_symlinks=False, root_only=paths.get("root_only") is not False)


def open_served(specs: dict[str, Path], device: str = "auto") -> dict[str, ServedIndex]:
    """Open every index with its encoder, once."""
    served = {}
    for name, folder in specs.items():
        try:
            searcher = open_index(folder, device=device)
        except RetrievalError as e:
            raise RetrievalError(f"index {name!r}: {e}") from None
        served[name] = ServedIndex(name, folder, searcher)
    return served
