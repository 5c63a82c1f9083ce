"""The indexes a server holds: each opened once under a name, described for clients, and its items' files.

The image route serves the file that the store recorded for the row: a request names a row, never a path.
The file is judged again as it is opened, by the corpus rules the store recorded (its root, and whether a
manifest's paths outside its folder were allowed: not with --root-only), made stricter: no symlink is followed
out of the root (even for a store encoded with --follow-symlinks), and outside the root no symlink at all.
"""

from __future__ import annotations

import io
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from retrieval.errors import RetrievalError
from retrieval.images import ImageReadError, decode_image
from retrieval.paths import PathPolicy, PathRefused, is_within
from retrieval.search import SearchIndex, open_index

NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
MEDIA_TYPES = {".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".png": "image/png", ".bmp": "image/bmp",
               ".gif": "image/gif", ".webp": "image/webp", ".tif": "image/tiff", ".tiff": "image/tiff"}
MAX_IMAGE_FILE = 64 * 2**20  # bytes of one served image file
THUMBNAIL_SIZES = range(16, 1025)


class NotFound(RetrievalError):
    """A name or row the server does not have (HTTP 404)."""


@dataclass
class ServedIndex:
    name: str
    searcher: SearchIndex
    images: PathPolicy | None  # the corpus root its images may be served from; None where none is recorded
    columns: dict[str, str] = field(default_factory=dict)  # metadata column → SQL type

    def describe(self) -> dict[str, Any]:
        """What a client needs to query this index and build a filter form for it."""
        info, encoder = self.searcher.info, self.searcher.encoder
        return {"name": self.name, "encoder": {"name": encoder.name, "family": encoder.config.family,
                                               "dim": encoder.dim, "fusion": encoder.fusion},
                "fusion_modes": self.searcher.fusion_modes(), "fusion_default": getattr(encoder, "fusion_mode", None),
                "count": info["count"], "index_kind": info.get("factory"), "search_params": info["search_params"],
                "columns": self.columns}

    def check_row(self, row: int) -> None:
        if not 0 <= row < self.searcher.info["count"]:
            raise NotFound(f"index {self.name!r} has no row {row} (it holds rows 0 to "
                           f"{self.searcher.info['count'] - 1})")

    def item(self, row: int) -> dict[str, Any]:
        """One item's stored fields, as a search hit shows them (without rank and score)."""
        self.check_row(row)
        hit = self.searcher.hits(np.zeros(1, np.float32), np.array([row], np.int64))[0].to_dict()
        return {key: value for key, value in hit.items() if key not in ("rank", "score")}

    def image_file(self, row: int, size: int | None = None) -> tuple[bytes, str]:
        """An item's image file as (bytes, media type), read from inside its corpus root only; with `size`, a
        PNG thumbnail whose longer side is at most that."""
        self.check_row(row)
        path = self.searcher.metadata["image"][row].as_py() if "image" in self.searcher.metadata.column_names \
            else None
        if path is None:
            raise NotFound(f"item {row} of index {self.name!r} has no image")
        if self.images is None:
            raise NotFound(f"the store of index {self.name!r} records no corpus root, so no image is served")
        media = MEDIA_TYPES.get(Path(path).suffix.lower())
        if media is None:
            raise NotFound(f"item {row} of index {self.name!r}: not an image file name")
        if size is not None and size not in THUMBNAIL_SIZES:
            raise RetrievalError(f"size must be {THUMBNAIL_SIZES.start} to {THUMBNAIL_SIZES.stop - 1}")
        data = self._read(path, row)
        if size is None:
            return data, media
        try:
            image = decode_image(data, path)
        except ImageReadError as e:
            raise NotFound(f"item {row} of index {self.name!r}: {e}") from None
        image.thumbnail((size, size))
        out = io.BytesIO()
        image.save(out, format="PNG")
        return out.getvalue(), "image/png"

    def _read(self, path: str, row: int) -> bytes:
        try:
            with self.images.open_file(path) as file:
                real = os.path.realpath(f"/proc/self/fd/{file.fileno()}")
                if not is_within(path, self.images.root) and real != os.path.normpath(path):
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


def corpus_images(searcher: SearchIndex) -> PathPolicy | None:
    """The corpus rules the store recorded, as the policy its images are served by (never following symlinks)."""
    corpus = searcher.store.manifest.get("corpus")
    paths = corpus.get("paths") if isinstance(corpus, dict) else None
    if not (isinstance(paths, dict) and isinstance(paths.get("root"), str)):
        return None
    return PathPolicy.for_root(paths["root"], follow_symlinks=False, root_only=paths.get("root_only") is not False)


def open_served(specs: dict[str, Path], device: str = "auto") -> dict[str, ServedIndex]:
    """Open every index with its encoder, once."""
    from retrieval.filters import column_types

    served = {}
    for name, folder in specs.items():
        try:
            searcher = open_index(folder, device=device)
        except RetrievalError as e:
            raise RetrievalError(f"index {name!r}: {e}") from None
        columns = column_types(searcher.metadata)
        served[name] = ServedIndex(name, searcher, corpus_images(searcher), columns)
    return served
