"""The query layer: `open_index(DIR).search(image=..., text=..., k=..., where=...)`.

A query is embedded by the encoder recorded in index.json. A `where` filter (a DuckDB predicate over
the store's columns) picks the allowed rows: few → exact search over just them; many → FAISS with an
id selector (or over-fetch and filter where the index cannot take a selector, e.g. on the GPU).
"""

from __future__ import annotations

import copy
import math
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from indexers.kinds import selector_params, supports_gpu
from retrieval.errors import RetrievalError
from retrieval.index_folder import INDEX_JSON, read_index_folder
from retrieval.store import EmbeddingStore, VersionGone
from retrieval.store_manifest import current_version

EXACT_FILTER_MAX = 20_000  # allowed rows up to this are searched exactly
MAX_THREADS = 256  # OpenMP crashes long before 100,000 threads


def set_threads(n: int) -> None:
    """torch's and FAISS's intra-op thread counts for this process."""
    import faiss
    import torch

    check_threads(n)
    torch.set_num_threads(n)
    faiss.omp_set_num_threads(n)


@dataclass
class Hit:
    rank: int
    score: float
    row: int
    id: str
    image: str | None
    text: str | None
    metadata: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """The hit as JSON-ready values: a NaN or infinite metadata number (missing data) becomes None."""
        metadata = {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in self.metadata.items()}
        return {"rank": self.rank, "score": self.score, "id": self.id, "row": self.row, "image": self.image,
                "text": self.text, **metadata}


class SearchIndex:
    """An index folder opened for queries, with its store and encoder checked against index.json."""

    def __init__(self, path: str | os.PathLike, device: str = "auto", model: str | None = None,
                 fusion: str | None = None, encoder=None):
        import faiss

        self.path = Path(path)
        self.info, self.index = read_index_folder(self.path)
        self.store = index_store(self.path, self.info)
        self.store.pin()
        self.behind = current_version(self.store.manifest) - self.store.version  # store versions not yet followed
        self._metadata = None
        self._filters = None
        self._composed: int | None = None
        self._fused: dict[str, Any] = {}
        self._opened = (device, model, fusion)
        recorded = self.info["encoder"]
        self.encoder = encoder or load_index_encoder(self.info, device, model, fusion)
        if self.encoder.weights_sha256 != recorded["weights_sha256"] or self.encoder.dim != self.info["dim"]:
            raise RetrievalError(
                f"encoder mismatch: this index was built with {recorded['name']!r} (dim {self.info['dim']}, "
                f"weights {recorded['weights_sha256'][:12]}), but {model!r} is {self.encoder.name!r} "
                f"(dim {self.encoder.dim}, weights {self.encoder.weights_sha256[:12]}); "
                "rebuild the index with this encoder")
        # rows deleted from the store but still in an index kind that cannot remove them: searched around
        self.hidden = self.store.deleted if self.info.get("removal") == "selector" else np.zeros(0, np.int64)
        self._hidden_selector = None
        built_with = recorded.get("fusion_mode")
        if built_with and self.encoder.fusion_mode != built_with and self.composed_rows():
            raise RetrievalError(f"this index holds {self.composed_rows()} items with an image and a text, embedded "
                                 f"with fusion {built_with!r}; search it with that fusion, or rebuild the index "
                                 f"with --fusion {self.encoder.fusion_mode}")
        if self.info["search_params"]:
            try:
                faiss.ParameterSpace().set_index_parameters(self.index, self.info["search_params"])
            except RuntimeError:
                raise RetrievalError(f"{self.path / INDEX_JSON} has search_params {self.info['search_params']!r}, "
                                     f"which its index ({self.info['file']}) does not take; rebuild the index"
                                     ) from None
        self.gpu_index = None
        if self.encoder.device.startswith("cuda"):
            from indexers.gpu import to_gpu

            if supports_gpu(self.index):
                gpu_index, where = to_gpu(self.index, [])
                self.gpu_index = gpu_index if where == "cuda" else None

    def add(self, items: str | os.PathLike | list[dict[str, Any]], upsert: bool = False, **options) -> list[str]:
        """Add a corpus's (or a list of dicts') new items to the index and its store, then search the new version;
        `options`: those of `retrieval index add` (batch_size, workers, strict, progress, ...)."""
        from retrieval.index_changes import add_items

        return self._changed(add_items(self.path, items, upsert=upsert, encoder=self.encoder,
                                       **{"progress": False} | options))

    def delete(self, ids: list[str] | None = None, where: str | None = None) -> list[str]:
        """Delete items by id or by a SQL predicate, then search the new version."""
        from retrieval.index_changes import delete_items

        return self._changed(delete_items(self.path, ids=ids, where=where))

    def compact(self) -> list[str]:
        """Rewrite the store without deleted rows (and rebuild an index kind that kept them)."""
        from retrieval.index_changes import compact_index

        return self._changed(compact_index(self.path))

    def _changed(self, lines: list[str]) -> list[str]:
        """Open the folder's newest version in place of this one (the same encoder); returns `lines`."""
        newer = SearchIndex(self.path, *self._opened, encoder=self.encoder)
        self.close()
        self.__dict__.update(newer.__dict__)
        return lines

    def close(self) -> None:
        """Stop the filter process, if one was started."""
        if self._filters is not None:
            self._filters.close()
            self._filters = None

    @property
    def metadata(self):
        """The store's live rows without vectors, loaded on first use (`store.positions` finds a row in it)."""
        if self._metadata is None:
            self._metadata = self.store.metadata().combine_chunks()  # one chunk: take() per query stays cheap
        return self._metadata

    def composed_rows(self) -> int:
        """How many stored items have both an image and a text (their vectors depend on the fusion mode)."""
        import pyarrow.compute as pc

        if self._composed is None:
            table = self.metadata
            self._composed = 0
            if "image" in table.column_names and "text" in table.column_names:
                both = pc.and_(pc.is_valid(table["image"]), pc.greater(pc.utf8_length(table["text"]), 0))
                self._composed = int(pc.sum(pc.fill_null(both, False)).as_py() or 0)
        return self._composed

    def fusion_modes(self) -> list[str]:
        """The fusion modes a query may ask for: a late-fusion model's modes, or only the one the index was built
        with where it holds composed items (their vectors were made that way); none for an early-fusion model."""
        built_with = self.info["encoder"].get("fusion_mode")
        if built_with and self.composed_rows():
            return [built_with]
        return list(self.encoder.fusion_modes)

    def encoder_for(self, fusion: str | None):
        """The encoder with its fusion mode set to `fusion` (None: the index's), sharing the loaded weights."""
        if fusion is None or fusion == getattr(self.encoder, "fusion_mode", None):
            return self.encoder
        modes = self.fusion_modes()
        if fusion not in modes:
            raise RetrievalError(f"fusion {fusion!r} is not available for this index: "
                                 + (f"use {' or '.join(modes)}" if modes else f"{self.encoder.name} fuses early"))
        if fusion not in self._fused:
            self._fused[fusion] = copy.copy(self.encoder)
            self._fused[fusion].fusion_mode = fusion
        return self._fused[fusion]

    def embed_query(self, image: str | os.PathLike | None = None, text: str | None = None) -> np.ndarray:
        """The query vector [1, dim] for an image, a text, or both."""
        text = check_query(image, text)
        return self.encoder.encode(images=[image] if image is not None else None,
                                   texts=[text] if text is not None else None)

    def search(self, image: str | os.PathLike | None = None, text: str | None = None, k: int = 10,
               where: str | None = None, rerank: int = 0) -> list[Hit]:
        """The k best items for an image, a text or both, among rows matching `where` (SQL) if given;
        `rerank` > 0 re-scores the best that many images of a text query by fine-grained alignment."""
        check_k(k)
        check_rerank(image, text, rerank, self.encoder)
        return self.search_embedded(self.embed_query(image, text), text, k, where, rerank)

    def search_embedded(self, query: np.ndarray, text: str | None = None, k: int = 10, where: str | None = None,
                        rerank: int = 0) -> list[Hit]:
        """`search` for a query already embedded ([1, dim]); `text` is its text, which re-ranking reads."""
        scores, rows = self.search_vectors(query, max(k, rerank), where)
        hits = self.hits(scores[0], rows[0])
        if rerank and hits:
            from retrieval.rerank import rerank_top

            order, new_scores = rerank_top(self.encoder, text, [h.image for h in hits],
                                           np.array([h.score for h in hits]), rerank)
            hits = [replace(hits[i], rank=r, score=float(s)) for r, (i, s) in enumerate(zip(order, new_scores), 1)]
        return hits[:k]

    def search_vectors(self, queries: np.ndarray, k: int, where: str | None = None
                       ) -> tuple[np.ndarray, np.ndarray]:
        """(scores, row ids) [m, k] for query vectors; missing results are -inf / -1."""
        check_k(k)
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        if where is not None and not isinstance(where, str):
            raise RetrievalError(f"invalid --where filter: it must be a string, not {type(where).__name__}")
        if not self.store.count:
            return np.zeros((len(queries), 0), np.float32), np.zeros((len(queries), 0), np.int64)
        if where is None or not where.strip():
            if len(self.hidden):
                scores, rows = self._selected_search(queries, self._not_hidden(), k, self.store.count)
            else:
                scores, rows = self._index_search(queries, k)
            if (rows[:, : min(k, self.store.count)] < 0).any():  # an ANN index can come up short for a big k
                return self._exact_search(queries, self.store.live_rows(), k)
            return scores, rows
        allowed = self.filter_rows(where)
        if len(allowed) <= max(EXACT_FILTER_MAX, k):
            return self._exact_search(queries, allowed, k)
        import faiss

        selector = faiss.IDSelectorBatch(allowed)
        scores, rows = self._selected_search(queries, (selector, lambda r: np.isin(r, allowed)), k, len(allowed))
        want = min(k, len(allowed))
        if (rows[:, :want] < 0).any():  # the approximate search came up short: be exact instead
            return self._exact_search(queries, allowed, k)
        return scores, rows

    def filter_rows(self, where: str) -> np.ndarray:
        """Row ids whose metadata satisfy a SQL predicate: checked and sandboxed (retrieval.filters), in a child
        process with a memory limit (retrieval.filter_worker), started on the first filter."""
        from retrieval.filter_worker import FilterWorker

        if self._filters is None:
            self._filters = FilterWorker(self.metadata)
        return self._filters.rows(where)

    def _index_search(self, queries: np.ndarray, k: int, params=None) -> tuple[np.ndarray, np.ndarray]:
        from indexers.gpu import GPU_MAX_K

        k = min(k, self.index.ntotal)
        index = self.gpu_index if self.gpu_index is not None and k <= GPU_MAX_K and params is None \
            else self.index
        return index.search(queries, k, params=params) if params is not None else index.search(queries, k)

    def _not_hidden(self):
        """A selector of the rows that are not hidden, and the same as a test of found rows."""
        import faiss

        if self._hidden_selector is None:
            inner = faiss.IDSelectorBatch(self.hidden)
            self._hidden_selector = (faiss.IDSelectorNot(inner), lambda r: ~np.isin(r, self.hidden), inner)
        return self._hidden_selector[:2]

    def _selected_search(self, queries: np.ndarray, selector, k: int, selected: int):
        """Search only the rows a (faiss selector, test of found rows) pair selects, `selected` of them: with the
        selector where the index takes one, else by over-fetching and testing."""
        faiss_selector, test = selector
        params = selector_params(self.index, faiss_selector, self.info.get("search_params"))
        if params is not None:
            return self._index_search(queries, k, params)
        fetch = min(self.index.ntotal, math.ceil(2 * k * self.index.ntotal / max(selected, 1)))
        scores, rows = self._index_search(queries, fetch)
        keep = test(rows)
        out_s = np.full((len(queries), k), -np.inf, np.float32)
        out_r = np.full((len(queries), k), -1, np.int64)
        for q in range(len(queries)):
            found = np.flatnonzero(keep[q])[:k]
            out_s[q, : len(found)], out_r[q, : len(found)] = scores[q, found], rows[q, found]
        return out_s, out_r

    def _exact_search(self, queries: np.ndarray, allowed: np.ndarray, k: int):
        scores = queries @ self.store.read_vectors(allowed).T if len(allowed) else np.zeros((len(queries), 0))
        k_found = min(k, len(allowed))
        top = np.argsort(-scores, axis=1, kind="stable")[:, :k_found]
        out_s = np.full((len(queries), k_found), -np.inf, np.float32)
        out_r = np.full((len(queries), k_found), -1, np.int64)
        if k_found:
            out_s[:] = np.take_along_axis(scores, top, axis=1)
            out_r[:] = allowed[top]
        return out_s, out_r

    def hits(self, scores: np.ndarray, rows: np.ndarray) -> list[Hit]:
        """Results with their store rows."""
        valid = rows >= 0
        scores, rows = scores[valid], rows[valid]
        table = self.metadata.take(self.store.positions(rows)).to_pylist() if len(rows) else []
        hits = []
        for rank, (score, row) in enumerate(zip(scores, table), start=1):
            meta = {k: v for k, v in row.items() if k not in ("row", "id", "image", "text")}
            hits.append(Hit(rank=rank, score=float(score), row=int(row["row"]), id=row["id"],
                            image=row.get("image"), text=row.get("text"), metadata=meta))
        return hits


def check_threads(n: int) -> None:
    if not 0 < n <= MAX_THREADS:
        raise RetrievalError(f"--threads must be 1 to {MAX_THREADS}, got {n}")


def check_k(k: int) -> None:
    if not isinstance(k, int) or isinstance(k, bool) or k <= 0:
        raise RetrievalError(f"k must be a positive integer, got {k}")


def check_rerank(image, text: str | None, rerank: int, encoder=None) -> None:
    """Refuse a re-ranking request that cannot be met (and, given the encoder, one it cannot do)."""
    if rerank < 0:
        raise RetrievalError(f"--rerank must be ≥ 0, got {rerank}")
    if rerank and (image is not None or not (text and text.strip())):
        raise RetrievalError("--rerank re-scores text → image results: give a --text and no --image")
    if rerank and encoder is not None:
        from retrieval.rerank import check_reranker

        check_reranker(encoder)


def check_query(image, text: str | None) -> str | None:
    """The query's text (None when blank); a query with neither image nor text is refused."""
    from PIL import Image

    if text is not None and not isinstance(text, str):
        raise RetrievalError(f"the query text must be a string, not {type(text).__name__}")
    if image is not None and not isinstance(image, (str, os.PathLike, Image.Image)):
        raise RetrievalError(f"the query image must be a path or a PIL image, not {type(image).__name__}")
    text = text if text and text.strip() else None
    if text is not None and any("\udc80" <= ch <= "\udcff" for ch in text):  # bytes that were not UTF-8
        raise RetrievalError("the query text is not valid UTF-8")
    if image is None and text is None:
        raise RetrievalError("a query needs an image, a text, or both (--image / --text)")
    return text


def index_store(folder: Path, info: dict[str, Any]) -> EmbeddingStore:
    """The store version an index reflects, checked to be the one it was made from."""
    store_path = Path(info["store"]["path"])
    try:
        store = EmbeddingStore(store_path if store_path.is_absolute() else folder / store_path,
                               version=info["store"].get("version"))
    except VersionGone as e:
        raise RetrievalError(f"{e} by another index over it; run `retrieval index rebuild {folder}`") from None
    if (store.fingerprint() != info["store"]["fingerprint"] or store.dim != info["dim"]
            or store.count != info["store"].get("count", info["count"])):
        raise RetrievalError(f"the store {store.path} changed since this index was built; "
                             f"rebuild it with `retrieval index build {store.path} --out {folder}`")
    store.require_intact()
    return store


def load_index_encoder(info: dict[str, Any], device: str = "auto", model: str | None = None,
                       fusion: str | None = None):
    """The encoder index.json names: its checkpoint where that is still there, else the model of that name."""
    from retrieval.encoders import load_encoder
    from retrieval.encoders.registry import is_released, list_configs

    recorded = info["encoder"]
    if model is None:
        checkpoint = recorded.get("checkpoint")
        if checkpoint and (Path(checkpoint) / "config.json").is_file():
            model = checkpoint
        elif recorded["name"] in list_configs() or is_released(recorded["name"]):
            model = recorded["name"]  # a released checkpoint: from the model cache, pulled if need be
        else:
            raise RetrievalError(f"the encoder of this index, {recorded['name']!r} "
                                 f"(checkpoint {checkpoint}), is not available here")
    return load_encoder(model, device=device, fusion=fusion or recorded.get("fusion_mode"))


def open_index(path: str | os.PathLike, device: str = "auto", model: str | None = None,
               fusion: str | None = None) -> SearchIndex:
    """Open an index folder made by `retrieval index build` for searching (`fusion`: a late-fusion model's
    mode for composed queries; default: the one the index was built with)."""
    return SearchIndex(path, device=device, model=model, fusion=fusion)
