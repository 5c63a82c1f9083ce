"""retrieval: a multimodal retrieval engine (composed image+text queries, Parquet stores, FAISS indexes).

Heavy modules (torch, faiss) are imported when used, so `import retrieval` and `retrieval --help` stay fast.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from retrieval.errors import RetrievalError

if TYPE_CHECKING:
    from retrieval.encoders.base import Encoder
    from retrieval.search import SearchIndex
    from retrieval.store import EmbeddingStore

__version__ = "0.1.0"
__all__ = ["RetrievalError", "load_encoder", "open_index", "open_store", "__version__"]


def load_encoder(name_or_checkpoint: str, device: str = "auto") -> Encoder:
    """An encoder by registered name (`retrieval models list`) or checkpoint folder."""
    from retrieval.encoders.registry import load_encoder as load

    return load(name_or_checkpoint, device=device)


def open_index(path: str, device: str = "auto", model: str | None = None) -> SearchIndex:
    """Open an index folder made by `retrieval index build` for searching."""
    from retrieval.search import open_index as open_

    return open_(path, device=device, model=model)


def open_store(path: str, version: int | None = None) -> EmbeddingStore:
    """An embedding store, at its newest version or `version`: `read_table()`, `sql_source()`, `live_rows()`."""
    from retrieval.store import EmbeddingStore

    return EmbeddingStore(path, version=version)
