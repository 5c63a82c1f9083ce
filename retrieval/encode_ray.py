"""`retrieval encode --engine ray`: the encode job's reader and mapper on a Ray cluster (the `retrieval[ray]` extra).

The corpus rows still to encode become a Ray dataset. Ray tasks load and prepare its items with the local job's
`prepare_item` (so a bad item gets the same reason) and stack them into arrays; an actor pool that holds the model
embeds them (a GPU per actor where asked, with the local job's autocast); the driver takes the embedded batches
back in corpus order and hands them to the local job's writer, which commits the same parts, manifest,
errors.parquet and row ids, and resumes the same way. A worker that dies is replaced by Ray and its batch computed
again; a driver that dies leaves the committed parts, after which the same command resumes.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from retrieval.corpus import Corpus
from retrieval.encode import Embedded, Embedder, prepare_item
from retrieval.errors import RetrievalError
from retrieval.paths import PathPolicy

BLOCK_BATCHES = 4  # batches per block of the dataset the driver makes of the corpus rows


@dataclass(frozen=True)
class RayOptions:
    model: str
    device: str = "auto"
    fusion: str | None = None
    address: str | None = None  # None: a local Ray instance
    actors: int = 1  # embedding actors, each holding the model
    gpus_per_actor: float = 0.0


def prepare_batch(rows: dict[str, np.ndarray], preparer, paths: PathPolicy) -> dict[str, np.ndarray]:
    """Ray task: load and prepare a batch of corpus rows into stacked arrays (`x.<name>`); a bad row keeps its
    reason in `error` (a good one: "") and zeros in the arrays."""
    items = [prepare_item(preparer, text_or_none(image), text_or_none(text), text_or_none(error), paths)
             for image, text, error in zip(rows["image"], rows["text"], rows["error"])]
    template = next((item for item in items if not isinstance(item, str)), None) or preparer.prepare(None, "")
    out: dict[str, np.ndarray] = {"position": rows["position"],
                                  "error": np.array([i if isinstance(i, str) else "" for i in items], dtype=object)}
    for key, value in template.items():
        blank = np.zeros_like(value.numpy())
        out[f"x.{key}"] = np.stack([blank if isinstance(i, str) else i[key].numpy() for i in items])
    return out


def text_or_none(value: Any) -> str | None:
    """A string cell of a batch as Ray hands it over: a null may come as None or as NaN."""
    return value if isinstance(value, str) else None


class EmbedActor:
    """Ray actor: holds the model and embeds prepared batches; bad rows get zero vectors (the writer drops them)."""

    def __init__(self, model: str, device: str, fusion: str | None, sparse_codes: bool, threads: int):
        import torch

        from retrieval.encoders import load_encoder

        torch.set_num_threads(threads)
        self.encoder = load_encoder(model, device=device, fusion=fusion)
        self.sparse_codes = sparse_codes

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        import torch

        good = np.flatnonzero(batch["error"] == "")
        keys = [k for k in batch if k.startswith("x.")]
        vectors = np.zeros((len(batch["error"]), self.encoder.dim), np.float32)
        columns = self.encoder.extra_columns if self.sparse_codes else ()
        extra = {c: np.empty(len(vectors), dtype=object) for c in columns}
        if len(good):
            items = [{k[2:]: torch.from_numpy(np.array(batch[k][i])) for k in keys} for i in good]
            embedded, values = self.encoder.embed_with_columns(self.encoder.collate(items), self.sparse_codes)
            vectors[good] = embedded.numpy()
            for c in columns:
                extra[c][good] = [np.asarray(v) for v in values[c]]
        return {"position": batch["position"], "error": batch["error"], "embedding": vectors,
                **{f"extra.{c}": v for c, v in extra.items()}}


def model_bytes(encoder) -> int:
    return sum(p.numel() * p.element_size() for p in encoder.model.parameters())


def check_capacity(options: RayOptions) -> None:
    """Refuse an actor pool the cluster cannot hold beside one reading task: Ray would wait for it for ever."""
    import ray

    resources = ray.cluster_resources()
    cpus, gpus = resources.get("CPU", 0), resources.get("GPU", 0)
    if options.actors + 1 > cpus:
        raise RetrievalError(f"--actors {options.actors} needs {options.actors + 1} CPUs in the Ray cluster (one per "
                             f"actor and one to read with); it has {cpus:g}")
    if options.actors * options.gpus_per_actor > gpus:
        raise RetrievalError(f"--actors {options.actors} × --gpus-per-actor {options.gpus_per_actor:g} needs "
                             f"{options.actors * options.gpus_per_actor:g} GPUs; the Ray cluster has {gpus:g}")


def ray_embedded(options: RayOptions) -> Embedder:
    if options.actors < 1 or options.gpus_per_actor < 0:
        raise RetrievalError("--actors must be at least 1 and --gpus-per-actor at least 0")

    def embedded(corpus: Corpus, encoder, start: int, batch_size: int, sparse_codes: bool,
                 part_size: int) -> Iterator[Embedded]:
        from retrieval.ray_cluster import connect

        connect(options.address)
        check_capacity(options)
        yield from _run(options, corpus, encoder, start, batch_size, sparse_codes)
    return embedded


def _run(options: RayOptions, corpus: Corpus, encoder, start: int, batch_size: int,
         sparse_codes: bool) -> Iterator[Embedded]:
    import logging

    import ray.data

    logging.getLogger("ray.data").setLevel(logging.ERROR)  # its progress reports would interleave with the bar
    context = ray.data.DataContext.get_current()
    context.execution_options.preserve_order = True  # the writer commits parts in corpus order
    context.enable_progress_bars = False  # the job's own bar counts items
    context.print_on_execution_start = False
    rows = corpus.table.select(["position", "image", "text", "error"]).slice(start)
    if not rows.num_rows:
        return
    block = batch_size * BLOCK_BATCHES
    dataset = ray.data.from_arrow([rows.slice(lo, block) for lo in range(0, rows.num_rows, block)])
    device = "cuda" if options.gpus_per_actor > 0 else ("cpu" if options.device == "auto" else options.device)
    dataset = dataset.map_batches(prepare_batch, fn_kwargs={"preparer": encoder.preparer(), "paths": corpus.paths},
                                  batch_size=batch_size, batch_format="numpy", num_cpus=1)
    dataset = dataset.map_batches(
        EmbedActor, fn_constructor_kwargs={"model": options.model, "device": device, "fusion": options.fusion,
                                           "sparse_codes": sparse_codes, "threads": 1},
        compute=ray.data.ActorPoolStrategy(size=options.actors), num_cpus=1, num_gpus=options.gpus_per_actor,
        # each actor reserves its model's memory; that also keeps Ray from fusing the reading into the actors
        # (it fuses steps with the same options), so reading runs in tasks of its own, beside the embedding
        memory=model_bytes(encoder),
        batch_size=batch_size, batch_format="numpy")
    expected = start
    for batch in dataset.iter_batches(batch_size=None, batch_format="numpy"):
        positions = batch["position"]
        if len(positions) and not np.array_equal(positions, np.arange(expected, expected + len(positions))):
            raise RetrievalError(f"Ray returned corpus positions out of order (from {positions[0]}, expected "
                                 f"{expected}): the store was not written past the last committed part")
        expected += len(positions)
        errors = batch["error"]
        good = np.flatnonzero(errors == "")
        extra = {k[len("extra."):]: [v.tolist() for v in batch[k][good]] for k in batch if k.startswith("extra.")}
        yield (range(int(positions[0]), int(positions[0]) + len(positions)) if len(positions) else range(0),
               [int(p) for p in positions[good]], batch["embedding"][good], extra,
               [(int(p), str(e)) for p, e in zip(positions, errors) if e != ""])
