"""The `retrieval` command line: parses arguments and calls the library. No logic of its own."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import typer

from indexers.errors import IndexerError
from retrieval.errors import RetrievalError

app = typer.Typer(help="Multimodal retrieval: encode corpora, build FAISS indexes, answer composed queries.",
                  no_args_is_help=True, pretty_exceptions_enable=False, add_completion=False)
index_app = typer.Typer(help="Build FAISS indexes and keep them in step with a changing corpus.", no_args_is_help=True)
models_app = typer.Typer(help="Registered encoders.", no_args_is_help=True)
data_app = typer.Typer(help="Benchmark data.", no_args_is_help=True)
store_app = typer.Typer(help="Embedding stores.", no_args_is_help=True)
bench_app = typer.Typer(help="Speed benchmarks, measured side by side in one process and printed as ratios.",
                        no_args_is_help=True)
app.add_typer(index_app, name="index")
app.add_typer(models_app, name="models")
app.add_typer(data_app, name="data")
app.add_typer(store_app, name="store")
app.add_typer(bench_app, name="bench")

DEVICE_HELP = "auto | cpu | cuda"
OPTIMIZE_HELP = ("What --index-key auto picks among the candidates it measures on a sample: latency (the most QPS "
                 "at the target recall), memory (the smallest) or build (the quickest to build).")
FUSION_HELP = ("Late-fusion models: how an image and a text become one vector, score | head "
               "(default: score; for search, the index's).")
# measured with `retrieval bench query` (100k index, 2 cores): composed p50 0.54 ms at 1 thread, 8 ms at 2
QUERY_THREADS_HELP = "torch and FAISS threads: one query gains nothing from more, and waking them costs ms."
FOLLOW_HELP = "Read files that symlinks under the corpus root lead to outside it (refused by default)."
ROOT_ONLY_HELP = ("Refuse manifest paths outside the manifest's folder (absolute or ../), as for a corpus "
                  "you did not write.")
RAY_ADDRESS_HELP = "--engine ray: the cluster to join (auto: the one `ray start` runs here); default: a local one."


@app.command()
def encode(
    corpus: Path = typer.Argument(..., help="A .jsonl/.csv/.parquet manifest or a folder of images."),
    model: str = typer.Option(..., "--model", help="Registered model name or checkpoint folder."),
    out: Path = typer.Option(..., "--out", help="Embedding store folder (rerun to resume)."),
    batch_size: int = typer.Option(256, "--batch-size"),
    workers: int | None = typer.Option(None, "--workers", help="Loader processes (default: min(4, cores))."),
    device: str = typer.Option("auto", "--device", help=DEVICE_HELP),
    dtype: str = typer.Option("float32", "--dtype", help="float32 | float16"),
    strict: bool = typer.Option(False, "--strict", help="Stop at the first bad item instead of skipping it."),
    part_size: int = typer.Option(10_000, "--part-size", help="Items per Parquet part (the resume unit)."),
    fusion: str | None = typer.Option(None, "--fusion", help=FUSION_HELP),
    sparse_codes: bool = typer.Option(False, "--sparse-codes", help="Models with sparse codes: also store each "
                                                                    "item's active codebook token ids and weights."),
    follow_symlinks: bool = typer.Option(False, "--follow-symlinks", help=FOLLOW_HELP),
    root_only: bool = typer.Option(False, "--root-only", help=ROOT_ONLY_HELP),
    engine: str = typer.Option("local", "--engine", help="local (this process and its loaders) | ray (a Ray "
                                                         "cluster: tasks read, an actor pool embeds)."),
    ray_address: str | None = typer.Option(None, "--ray-address", help=RAY_ADDRESS_HELP),
    actors: int = typer.Option(1, "--actors", help="--engine ray: embedding actors, each holding the model."),
    gpus_per_actor: float = typer.Option(0.0, "--gpus-per-actor", help="--engine ray: GPUs each actor holds "
                                                                       "(0: embed on the CPU)."),
) -> None:
    """Encode a corpus into a Parquet embedding store."""
    from retrieval.encode import encode_corpus

    summary = encode_corpus(corpus, out, model, batch_size=batch_size, workers=workers, device=device,
                            dtype=dtype, strict=strict, part_size=part_size, fusion=fusion,
                            sparse_codes=sparse_codes, follow_symlinks=follow_symlinks, root_only=root_only,
                            engine=engine, ray={"address": ray_address, "actors": actors,
                                                "gpus_per_actor": gpus_per_actor})
    typer.echo("\n".join(summary.lines()))


@index_app.command("build")
def index_build(
    source: Path = typer.Argument(..., help="An embedding store, or a corpus to encode first (needs --model)."),
    out: Path = typer.Option(..., "--out", help="Index folder."),
    model: str | None = typer.Option(None, "--model", help="Encoder for a corpus SOURCE."),
    index_key: str = typer.Option("auto", "--index-key", help="auto, or a FAISS factory string."),
    device: str = typer.Option("auto", "--device", help=DEVICE_HELP),
    memory_budget: str = typer.Option("4GB", "--memory-budget"),
    target_recall: float = typer.Option(0.95, "--target-recall", help="ann_recall@10 that tuning aims for."),
    optimize: str = typer.Option("latency", "--optimize", help=OPTIMIZE_HELP),
    batch_size: int = typer.Option(256, "--batch-size", help="Encoding batch size (corpus SOURCE)."),
    workers: int | None = typer.Option(None, "--workers", help="Encoding loader processes."),
    fusion: str | None = typer.Option(None, "--fusion", help=FUSION_HELP),
    follow_symlinks: bool = typer.Option(False, "--follow-symlinks", help=FOLLOW_HELP + " (corpus SOURCE)"),
    root_only: bool = typer.Option(False, "--root-only", help=ROOT_ONLY_HELP + " (corpus SOURCE)"),
    shards: int | None = typer.Option(None, "--shards", help="IVF keys: fill the lists in N shards in parallel and "
                                                             "merge them into one on-disk index."),
    engine: str = typer.Option("local", "--engine", help="Where shards are filled: local (processes) | ray."),
    ray_address: str | None = typer.Option(None, "--ray-address", help=RAY_ADDRESS_HELP),
) -> None:
    """Build a FAISS index (index-<sha>.faiss + index.json) from an embedding store or a corpus."""
    from retrieval.indexing import build_index_folder

    info = build_index_folder(source, out, model=model, index_key=index_key, device=device,
                              memory_budget=memory_budget, target_recall=target_recall, goal=optimize,
                              shards=shards, engine=engine, ray_address=ray_address,
                              encode_options={"batch_size": batch_size, "workers": workers, "device": device,
                                              "fusion": fusion, "follow_symlinks": follow_symlinks,
                                              "root_only": root_only})
    typer.echo(f"index {out}: {info['index_key']} over {info['count']} vectors (dim {info['dim']}), "
               f"{info['search_params'] or 'exact'}, ann_recall@10 {info['ann_recall@10']:.3f}, "
               f"built in {info['seconds']['total']:.1f} s on {info['device']}")
    for note in info["notes"]:
        typer.echo(f"note: {note}")


@index_app.command("add")
def index_add(
    index: Path = typer.Argument(..., help="Index folder."),
    corpus: Path = typer.Argument(..., help="Items to add: a corpus (folder, .jsonl, .csv, .parquet)."),
    upsert: bool = typer.Option(False, "--upsert", help="Replace live items whose id comes again with other "
                                                        "content (refused without it)."),
    batch_size: int = typer.Option(256, "--batch-size", help="Encoding batch size."),
    workers: int | None = typer.Option(None, "--workers", help="Encoding loader processes."),
    device: str = typer.Option("auto", "--device", help=DEVICE_HELP),
    strict: bool = typer.Option(False, "--strict", help="Stop at the first item that cannot be encoded."),
    follow_symlinks: bool = typer.Option(False, "--follow-symlinks", help=FOLLOW_HELP),
    root_only: bool = typer.Option(False, "--root-only", help=ROOT_ONLY_HELP),
) -> None:
    """Encode the corpus's new items with the index's encoder and add them to its store and index."""
    from retrieval.index_changes import add_items

    echo_lines(add_items(index, corpus, upsert=upsert, batch_size=batch_size, workers=workers, device=device,
                         strict=strict, follow_symlinks=follow_symlinks, root_only=root_only))


@index_app.command("delete")
def index_delete(
    index: Path = typer.Argument(..., help="Index folder."),
    ids: Path | None = typer.Option(None, "--ids", help="A text file of ids to delete, one per line."),
    where: str | None = typer.Option(None, "--where", help="Delete the items this DuckDB SQL predicate over the "
                                                           "store's columns picks."),
) -> None:
    """Remove items from search at once (recorded in the store as deleted; `compact` reclaims the space)."""
    from retrieval.index_changes import delete_items, read_ids

    echo_lines(delete_items(index, ids=read_ids(ids) if ids is not None else None, where=where))


@index_app.command("compact")
def index_compact(index: Path = typer.Argument(..., help="Index folder.")) -> None:
    """Rewrite the store without deleted rows, rebuild an index kind that kept them, drop old versions' files."""
    from retrieval.index_changes import compact_index

    echo_lines(compact_index(index, progress=True))


@index_app.command("sync")
def index_sync(index: Path = typer.Argument(..., help="Index folder.")) -> None:
    """Bring the index up to its store's newest version (changes made through another index over the store)."""
    from retrieval.index_changes import sync_index

    echo_lines(sync_index(index))


@index_app.command("rebuild")
def index_rebuild(
    index: Path = typer.Argument(..., help="Index folder."),
    index_key: str | None = typer.Option(None, "--index-key", help="auto, or a FAISS factory string "
                                                                   "(default: the index's own)."),
) -> None:
    """Build the index again over its store's live items (retraining an approximate index after many adds)."""
    from retrieval.index_changes import rebuild_index

    echo_lines(rebuild_index(index, index_key=index_key))


def echo_lines(lines: list[str]) -> None:
    for line in lines:
        typer.echo(line)


@app.command()
def search(
    index: Path = typer.Option(..., "--index", help="Index folder."),
    image: Path | None = typer.Option(None, "--image", help="Query image."),
    text: str | None = typer.Option(None, "--text", help="Query text (an instruction, a question, a caption)."),
    k: int = typer.Option(10, "-k", "--k", help="Number of results."),
    where: str | None = typer.Option(None, "--where", help="DuckDB SQL predicate over the store's columns."),
    as_json: bool = typer.Option(False, "--json", help="Print a JSON list instead of a table."),
    device: str = typer.Option("auto", "--device", help=DEVICE_HELP),
    threads: int = typer.Option(1, "--threads", help=QUERY_THREADS_HELP),
    fusion: str | None = typer.Option(None, "--fusion", help=FUSION_HELP),
    rerank: int = typer.Option(0, "--rerank", help="Text → image with models that align words to patches: "
                                                   "re-score the best N images by ½ global + ½ fine-grained "
                                                   "word-to-patch alignment; they come first, with that score."),
    explain: Path | None = typer.Option(None, "--explain", help="Write a PNG of why each hit matched: the patches "
                                                                "each query word groups (models that align words to "
                                                                "patches), or the hit's strongest codebook tokens "
                                                                "(models with sparse codes)."),
) -> None:
    """Search an index with an image, a text, or both."""
    from retrieval.search import check_k, check_query, check_rerank, open_index, set_threads

    check_k(k)
    check_query(image, text)  # before loading the index and model, so a bad query fails at once
    check_rerank(image, text, rerank)
    set_threads(threads)
    searcher = open_index(index, device=device, fusion=fusion)
    if searcher.behind:
        typer.echo(f"note: the store has {searcher.behind} newer versions than this index follows (changed through "
                   f"another index over it, or a change was cut short); `retrieval index sync {index}` catches up",
                   err=True)
    if explain is not None:
        from retrieval.explain import check_explain

        check_explain(searcher.encoder, text)
    hits = searcher.search(image=image, text=text, k=k, where=where, rerank=rerank)
    if as_json:
        typer.echo(json.dumps([h.to_dict() for h in hits], indent=2, default=str))
    elif not hits:
        typer.echo("no results")
    else:
        rows = [("rank", "score", "id", "text", "image")]
        rows += [(str(h.rank), f"{h.score:.4f}", h.id, _clip(h.text or "", 60), h.image or "") for h in hits]
        _echo_table(rows)
    if explain is not None and hits:
        from retrieval.explain import explain_hits

        explain_hits(searcher.encoder, text, hits, explain)
        typer.echo(f"wrote {explain}", err=True)


@app.command()
def serve(
    index: list[str] = typer.Option(..., "--index", help="Index folder, or NAME=DIR to name it (default: the "
                                                         "folder's name); repeat for several."),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on. Anything but loopback exposes "
                                                         "every index and its images, with no authentication."),
    port: int = typer.Option(8000, "--port", help="TCP port (0: a free one, printed)."),
    device: str = typer.Option("auto", "--device", help=DEVICE_HELP),
    threads: int = typer.Option(1, "--threads", help=QUERY_THREADS_HELP),
    max_upload: str = typer.Option("10MB", "--max-upload", help="Largest request body (an uploaded image, or "
                                                                "base64 images in JSON)."),
    max_batch: int = typer.Option(32, "--max-batch", help="Most query items embedded in one model forward: "
                                                          "queries that arrive while one runs go together "
                                                          "(1: each alone)."),
    allowed_host: list[str] = typer.Option([], "--allowed-host", help="A host name requests may be addressed to "
                                                                      "besides loopback ones (repeatable); off "
                                                                      "loopback, only these when given."),
) -> None:
    """Serve indexes over HTTP, warm: a JSON API (POST /search, /indexes, /items) and a web page at /."""
    from retrieval.server.run import serve as run

    run(index, host=host, port=port, device=device, threads=threads, max_upload=max_upload, max_batch=max_batch,
        allowed_hosts=allowed_host, echo=lambda line: typer.echo(line, err=line.startswith("warning")))


def _echo_table(rows: list[tuple[str, ...]]) -> None:
    """Columns padded to their widest cell; the last column is left unpadded."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    for r in rows:
        typer.echo("  ".join(c.ljust(w) for c, w in zip(r, widths)) + "  " + r[-1])


def _clip(text: str, width: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 1] + "…"


@models_app.command("list")
def models_list() -> None:
    """Registered encoders and released checkpoints: dimension, source, size and where the weights are."""
    from retrieval.encoders.registry import default_checkpoint, family_class, list_configs, list_pretrained
    from retrieval.hub import describe

    rows = [("name", "family", "dim", "source", "size", "weights", "description")]
    for name, config in list_configs().items():
        checkpoint = default_checkpoint(config)
        if checkpoint:
            where = str(checkpoint) if checkpoint.is_dir() else f"{checkpoint} (missing)"
        else:
            where = "none: import or train one" if family_class(config.family).requires_checkpoint else \
                f"random init (seed {config.seed})"
        rows.append((name, config.family, str(config.dim), "bundled" if checkpoint else "-", "-", where,
                     config.description))
    for name, entry in list_pretrained().items():
        source, status = describe(name)
        rows.append((name, entry.family, str(entry.dim or "-"), source, entry.size or "-", status, entry.description))
    _echo_table(rows)


@models_app.command("pull")
def models_pull(
    name: str = typer.Argument(..., help="A released checkpoint (`retrieval models list`) or hf-hub:ORG/REPO[@REV]."),
) -> None:
    """Download a released checkpoint from the Hugging Face hub and convert it once into the cache."""
    from retrieval.hub import pull

    typer.echo(f"{name} → {pull(name)} (use it as --model {name}; offline from now on)")


@models_app.command("families")
def models_families() -> None:
    """Encoder families: what each provides (training, an official importer and its options, capabilities)."""
    from retrieval.encoders.families import families

    rows = [("family", "trains", "imports", "capabilities", "description")]
    for name, spec in families().items():
        imports = "-"
        if spec.importer:
            imports = "; ".join([spec.importer.source] + [f"--option {key}=<{option['type']}>: {option.get('help', '')}"
                                                          for key, option in spec.importer.options.items()])
        rows.append((name, "yes" if spec.objective else "no", imports, ",".join(sorted(spec.capabilities)) or "-",
                     spec.description))
    _echo_table(rows)


@models_app.command("import")
def models_import(
    family: str = typer.Argument(..., help="The encoder family (`retrieval models families` lists importers)."),
    source: Path = typer.Argument(..., help="The official checkpoint, as its family's importer takes it."),
    out: Path | None = typer.Option(None, "--out", help="Checkpoint folder to write (our format)."),
    name: str | None = typer.Option(None, "--name", help="Instead of --out: convert into the cache as this "
                                                         "released checkpoint (`retrieval models list`), usable as "
                                                         "--model NAME."),
    tokenizer: Path | None = typer.Option(None, "--tokenizer", help="Folder with CLIP's vocab.json and merges.txt "
                                                                    "(default: the checkpoint's folder)."),
    option: list[str] = typer.Option([], "--option", help="NAME=VALUE: an option of the family's importer "
                                                          "(repeatable; `retrieval models families` lists them)."),
) -> None:
    """Convert an official checkpoint to our format, offline; strict about every key."""
    from retrieval.encoders.families import family as family_spec
    from retrieval.hub import import_named

    options = parse_assignments(option, "--option")
    if out is not None and name is not None:
        raise RetrievalError("give --out DIR (a checkpoint folder) or --name NAME (into the cache), not both")
    if out is None and name is None:
        raise RetrievalError("give --out DIR (a checkpoint folder) or --name NAME (a released checkpoint, into the "
                             "cache)")
    if name is not None:
        path = import_named(family, source, name, tokenizer=tokenizer, options=options)
        typer.echo(f"imported {source} → {path} (use it as --model {name})")
        return
    path = family_spec(family).import_checkpoint(source, out, tokenizer=tokenizer, options=options)
    typer.echo(f"imported {source} → {path} (use it as --model {path})")


@store_app.command("verify")
def store_verify(
    store: Path = typer.Argument(..., help="Embedding store folder."),
) -> None:
    """Check every part of a store in full: checksums, page checksums and unit vectors."""
    from retrieval.store import EmbeddingStore

    opened = EmbeddingStore(store)
    problems = opened.damaged_parts(full=True)
    for problem in problems:
        typer.echo(f"damaged: {problem}")
    if problems:
        raise RetrievalError(f"store {store}: {len(problems)} of {len(opened.parts)} parts are damaged; "
                             "encode the corpus again into a new folder")
    typer.echo(f"store {store}: {len(opened.parts)} parts, {opened.count} vectors, all intact")


@data_app.command("make")
def data_make(
    name: str = typer.Argument(..., help="shapesworld | digits"),
    out: Path = typer.Option(..., "--out"),
    n: int | None = typer.Option(None, "--n", help="Items (default: 2,000 scenes; all 1,797 digits)."),
    size: int = typer.Option(64, "--size", help="Image size in pixels (16-256)."),
    seed: int = typer.Option(0, "--seed"),
    train_pairs: bool = typer.Option(True, "--train-pairs/--no-train-pairs", help="Also write train/pairs.jsonl."),
) -> None:
    """Generate a benchmark data set offline: images, corpus.jsonl, task files and training pairs."""
    from evaluation.benchmark_folder import read_dataset
    from evaluation.data import make_data

    manifest = make_data(name, out, n=n, size=size, seed=seed, train_pairs=train_pairs)
    meta = read_dataset(out)
    tasks = ", ".join(f"{t} ({v['queries']} queries)" for t, v in meta["tasks"].items())
    typer.echo(f"wrote {meta['items']} items to {manifest} (splits {meta['splits']}); tasks: {tasks}")
    if meta["train_pairs"] is not None:
        typer.echo(f"training pairs: {meta['train_pairs']} in {meta['train_groups']} groups ({out}/train/pairs.jsonl)")


def parse_assignments(items: list[str], option: str) -> dict[str, str]:
    """`OPTION NAME=VALUE` options as {NAME: VALUE}; each NAME once."""
    values = {}
    for item in items:
        name, equals, value = item.partition("=")
        if not (name and equals):
            raise RetrievalError(f"{option} takes NAME=VALUE, not {item!r}")
        if name in values:
            raise RetrievalError(f"{option} {name}=… is given twice")
        values[name] = value
    return values


def parse_repeats(items: list[str]) -> dict[str, int]:
    """`--repeat NAME=K` options as {NAME: K}."""
    repeats = parse_assignments(items, "--repeat")
    for name, times in repeats.items():
        if not times.isdigit() or int(times) < 1:
            raise RetrievalError(f"--repeat takes NAME=K with K ≥ 1, not {name}={times}")
    return {name: int(times) for name, times in repeats.items()}


TRAINING_DATA_HELP = "Benchmark folder with training pairs (repeatable)."
REPEAT_HELP = "NAME=K: take data set NAME's groups K times per epoch (repeatable)."
CAPTION_SHARE_HELP = "Share of each batch given to image–caption pairs drawn apart from the groups"
PRECISION_HELP = ("Forward pass: auto (bf16 autocast on CUDA, float32 on the CPU), bf16 or fp32. On a CPU with AMX, "
                  "bf16 makes a length-grouped step faster in `retrieval bench train`, not yet over a whole run")


@app.command("train")
def train_(
    what: str = typer.Argument(..., help="`tokenizer`, a registered model (from scratch) or a checkpoint folder "
                                         "(fine-tune)."),
    data: list[Path] = typer.Option(..., "--data", help=TRAINING_DATA_HELP),
    out: Path = typer.Option(..., "--out", help="Output folder (rerun to resume)."),
    tokenizers: Path | None = typer.Option(None, "--tokenizers",
                                           help="`train tokenizer` output for a model from scratch "
                                                "(default: the bundled tokenizers)."),
    steps: int = typer.Option(1000, "--steps"),
    batch_size: int = typer.Option(128, "--batch-size", help="Pairs per batch, cut from whole groups."),
    lr: float = typer.Option(1e-3, "--lr"),
    weight_decay: float = typer.Option(0.1, "--weight-decay", help="AdamW decay on ≥2-D parameters."),
    warmup: int = typer.Option(100, "--warmup", help="Linear warm-up steps, then cosine to 0."),
    seed: int = typer.Option(0, "--seed"),
    repeat: list[str] = typer.Option([], "--repeat", help=REPEAT_HELP),
    caption_share: float = typer.Option(0.0, "--caption-share",
                                        help=CAPTION_SHARE_HELP + " (default 0: whole groups only)."),
    vocab_size: int = typer.Option(1024, "--vocab-size", help="tokenizer: BPE vocabulary size."),
    for_model: str = typer.Option("fuselip-tiny", "--for", help="tokenizer: the registered model whose image "
                                                                "tokenizer settings to train."),
    precision: str = typer.Option("auto", "--precision", help=PRECISION_HELP + "."),
    device: str = typer.Option("auto", "--device", help=DEVICE_HELP),
) -> None:
    """Train the tokenizers or a model on the training pairs of benchmark folders."""
    from retrieval.training.pairs import read_pairs

    if what == "tokenizer":
        from retrieval.training.tokenizers import image_tokenizer_config, train_tokenizers

        stats = train_tokenizers(read_pairs(data), out, image_tokenizer_config(for_model), vocab_size=vocab_size,
                                 steps=steps, batch_size=batch_size, seed=seed)
        typer.echo(json.dumps(stats))
        return
    from retrieval.training.loop import TrainConfig
    from retrieval.training.run import train_model

    config = TrainConfig(steps=steps, batch_size=batch_size, lr=lr, weight_decay=weight_decay, warmup=warmup,
                         seed=seed, repeats=parse_repeats(repeat), caption_share=caption_share,
                         precision=precision)
    summary = train_model(what, data, out, config, tokenizers=tokenizers, device=device)
    typer.echo(f"trained {what} for {summary['steps_done']} steps on {summary['pairs']} pairs "
               f"(final loss {summary['final_loss']:.4f}) → {out}")


@app.command("eval")
def eval_(
    tasks: str = typer.Argument(..., help="A benchmark in its published layout (mmeb, cirr, fashioniq, coco, "
                                          "flickr30k, imagefolder; with --data DIR), or generated tasks: all, "
                                          "t2i,i2t,zeroshot,tgit,tgit-pool,vqa,pos (or dataset/task, e.g. "
                                          "digits/t2i)."),
    model: str = typer.Option(..., "--model", help="Model names or checkpoint folders, comma-separated, or all."),
    data: list[Path] | None = typer.Option(None, "--data", help="The benchmark's folder; for generated tasks a "
                                                               "benchmark folder (repeatable), default: "
                                                               "generated ShapesWorld and Digits."),
    subsets: str | None = typer.Option(None, "--subsets", help="Benchmark subsets, comma-separated (MMEB's "
                                                               "datasets, FashionIQ's categories); default all."),
    limit: int | None = typer.Option(None, "--limit", help="At most N queries per benchmark task, spread evenly "
                                                          "(candidate pools stay whole)."),
    protocol: str | None = typer.Option(None, "--protocol", help="mmeb only: mmeb (MMEB's own texts, the "
                                                                 "default) or fuselip (FuseLIP's changes)."),
    k: str | None = typer.Option(None, "--k", help="Generated tasks: cut-offs for hit@k and recall@k "
                                                  "(default 1,5,10); benchmarks use their own."),
    json_out: Path | None = typer.Option(None, "--json", help="Write the report as JSON."),
    markdown_out: Path | None = typer.Option(None, "--markdown", help="Write the report as Markdown."),
    plot_out: Path | None = typer.Option(None, "--plot", help="Write a PNG bar chart."),
    device: str = typer.Option("auto", "--device", help=DEVICE_HELP),
    batch_size: int = typer.Option(128, "--batch-size"),
    rerank: int = typer.Option(0, "--rerank", help="Also score text → image tasks with the best N re-ranked by "
                                                   "word-to-patch alignment, where a model has it: a 'rerank@N' row."),
    follow_symlinks: bool = typer.Option(False, "--follow-symlinks", help="Benchmarks: read images through "
                                                                          "symlinks that leave --data."),
) -> None:
    """Recall@k benchmarks: one table of every model (and fusion mode) × task."""
    from evaluation import report
    from evaluation.benchmarks import BENCHMARKS

    if tasks in BENCHMARKS:
        from evaluation.benchmark_eval import run_benchmark

        if len(data or []) != 1:
            raise RetrievalError(f"eval {tasks} needs --data DIR: the folder holding the benchmark")
        if k is not None or rerank:
            raise RetrievalError(f"{tasks} has its own cut-offs and no re-ranking: leave out --k and --rerank")
        chosen = [s.strip() for s in subsets.split(",") if s.strip()] if subsets else None
        result = run_benchmark(tasks, data[0], model, chosen, limit, protocol, device=device, batch_size=batch_size,
                               follow_symlinks=follow_symlinks)
    else:
        from evaluation.evaluate import run_eval

        if subsets or limit is not None or protocol or follow_symlinks:
            raise RetrievalError("--subsets, --limit, --protocol and --follow-symlinks are for benchmarks "
                                 f"({', '.join(BENCHMARKS)})")
        try:
            ks = [int(x) for x in (k or "1,5,10").split(",") if x.strip()]
        except ValueError:
            raise RetrievalError(f"--k must be comma-separated integers, not {k!r}") from None
        result = run_eval(tasks, model, data=data, ks=ks, device=device, batch_size=batch_size, rerank=rerank)
    typer.echo("\n".join(report.summary_lines(result)))
    for path, write in ((json_out, report.write_json), (markdown_out, report.write_markdown),
                        (plot_out, report.plot)):
        if path is not None:
            write(result, path)
            typer.echo(f"wrote {path}")


@app.command()
def demo(
    out: Path = typer.Option(Path("demo"), "--out", help="Folder for the data, indexes, contact sheets and eval."),
    models: str = typer.Option("fuselip-tiny,sparc-tiny,fdt-tiny", "--models", help="Comma-separated models."),
    n_shapes: int = typer.Option(400, "--n-shapes", help="ShapesWorld scenes to generate."),
    n_digits: int = typer.Option(300, "--n-digits", help="Digits to use."),
    k: int = typer.Option(5, "-k", "--k", help="Hits shown per query."),
    device: str = typer.Option("auto", "--device", help=DEVICE_HELP),
) -> None:
    """The whole path offline: generate data, index it with each bundled model, ask every kind of query,
    write contact sheets, print the eval table."""
    from evaluation.demo import run_demo
    from retrieval.search import check_k

    check_k(k)
    names = tuple(m.strip() for m in models.split(",") if m.strip())
    if not names:
        raise RetrievalError("--models needs at least one model")
    run_demo(out, names, n_shapes=n_shapes, n_digits=n_digits, k=k, device=device, echo=typer.echo)


@app.command()
def results(
    out: Path = typer.Option(Path("docs"), "--out", help="Folder for results.md and its plot."),
    models: str = typer.Option("fuselip-tiny,sparc-tiny,fdt-tiny", "--models", help="Comma-separated models."),
    bench: bool = typer.Option(True, "--bench/--no-bench", help="Also run the index and encode benchmarks "
                                                                "(about 25 minutes on 2 cores)."),
    index_n: int = typer.Option(1_000_000, "--index-n", help="Vectors for the index benchmark."),
    encode_n: int = typer.Option(5_000, "--encode-n", help="Items for the encode benchmark."),
    device: str = typer.Option("auto", "--device", help=DEVICE_HELP),
) -> None:
    """Measure everything and write the results page: eval of every model, bench figures, published numbers."""
    from evaluation.results import write_results

    names = tuple(m.strip() for m in models.split(",") if m.strip())
    if not names:
        raise RetrievalError("--models needs at least one model")
    path = write_results(out, names, index_n=index_n, encode_n=encode_n, bench=bench, device=device)
    typer.echo(f"wrote {path}")


def _print_bench(report: dict, lines: list[str], json_out: Path | None) -> None:
    typer.echo("\n".join(lines))
    if json_out is not None:
        from retrieval.files import write_json

        write_json(json_out, report)
        typer.echo(f"wrote {json_out}")


JSON_HELP = "Also write the report as JSON."


@bench_app.command("encode")
def bench_encode(
    model: str = typer.Option(..., "--model", help="Registered model name or checkpoint folder."),
    n: int = typer.Option(10_000, "--n", help="Generated ShapesWorld items."),
    device: str = typer.Option("auto", "--device", help=DEVICE_HELP),
    batch_size: int = typer.Option(256, "--batch-size"),
    workers: int | None = typer.Option(None, "--workers", help="Loader processes (default: min(4, cores))."),
    random_init: bool = typer.Option(False, "--random-init", help="A registered model at its seeded initial weights "
                                                                  "(with a stand-in tokenizer): to time a full-size "
                                                                  "model without its weights."),
    threads: int | None = typer.Option(None, "--threads", help="torch threads for both runs (default: torch's)."),
    json_out: Path | None = typer.Option(None, "--json", help=JSON_HELP),
) -> None:
    """The whole encode job against the bare model forward: items/s, their ratio, peak RSS."""
    from evaluation.bench import encode

    report = encode.bench_encode(model, n=n, device=device, batch_size=batch_size, workers=workers, threads=threads,
                                 random_init=random_init)
    _print_bench(report, encode.report_lines(report), json_out)


@bench_app.command("train")
def bench_train(
    data: list[Path] = typer.Option(..., "--data", help=TRAINING_DATA_HELP),
    model: str = typer.Option("fuselip-tiny", "--model", help="Registered model with length-grouped training "
                                                               "(fresh) or a checkpoint of one."),
    steps: int = typer.Option(40, "--steps", help="Steps, each run all three ways (the first few untimed)."),
    batch_size: int = typer.Option(128, "--batch-size"),
    caption_share: float = typer.Option(0.25, "--caption-share", help=CAPTION_SHARE_HELP + "."),
    repeat: list[str] = typer.Option([], "--repeat", help=REPEAT_HELP),
    seed: int = typer.Option(0, "--seed", help="The training seed whose batches and masking to use."),
    device: str = typer.Option("auto", "--device", help=DEVICE_HELP),
    threads: int | None = typer.Option(None, "--threads", help="torch threads (default: torch's)."),
    json_out: Path | None = typer.Option(None, "--json", help=JSON_HELP),
) -> None:
    """A training step three ways: one padded batch, length groups, and length groups in bf16: s/step and ratios."""
    from evaluation.bench import train

    report = train.bench_train(model, data, steps=steps, batch_size=batch_size, caption_share=caption_share,
                               repeats=parse_repeats(repeat), seed=seed, device=device, threads=threads)
    _print_bench(report, train.report_lines(report), json_out)


@bench_app.command("index")
def bench_index(
    n: int = typer.Option(1_000_000, "--n", help="Synthetic vectors (ignored with --store)."),
    dim: int = typer.Option(256, "--dim", help="Synthetic dimension (ignored with --store)."),
    store: Path | None = typer.Option(None, "--store", help="Benchmark a real embedding store instead."),
    keys: str | None = typer.Option(None, "--keys", help="Comma-separated FAISS factory strings to compare."),
    queries: int = typer.Option(1000, "--queries"),
    memory_budget: str = typer.Option("4GB", "--memory-budget"),
    target_recall: float = typer.Option(0.95, "--target-recall"),
    threads: int | None = typer.Option(None, "--threads", help="FAISS threads (default: all cores)."),
    optimize: str = typer.Option("latency", "--optimize", help=OPTIMIZE_HELP),
    compare_hnsw: bool = typer.Option(False, "--compare-hnsw", help="Also HNSW32 tuned to the auto index's recall."),
    json_out: Path | None = typer.Option(None, "--json", help=JSON_HELP),
) -> None:
    """Exact search against the automatic index and the other candidates: build s, QPS, recall@10, bytes."""
    from evaluation.bench import index

    report = index.bench_index(n=n, dim=dim, store=store, keys=keys.split(",") if keys else None, queries=queries,
                               memory_budget=memory_budget, target_recall=target_recall, threads=threads,
                               goal=optimize, compare_hnsw=compare_hnsw)
    _print_bench(report, index.report_lines(report), json_out)


@bench_app.command("ray")
def bench_ray(
    model: str = typer.Option("test-tiny", "--model", help="Registered model name or checkpoint folder."),
    n: int = typer.Option(10_000, "--n", help="Generated ShapesWorld items."),
    batch_size: int = typer.Option(256, "--batch-size"),
    actors: int = typer.Option(1, "--actors", help="Embedding actors of the Ray run."),
    json_out: Path | None = typer.Option(None, "--json", help=JSON_HELP),
) -> None:
    """The local encode job against --engine ray on a local Ray instance: items/s and their ratio."""
    from evaluation.bench import scale

    report = scale.bench_ray(model, n=n, batch_size=batch_size, actors=actors)
    _print_bench(report, scale.ray_lines(report), json_out)


@bench_app.command("shards")
def bench_shards(
    n: int = typer.Option(1_000_000, "--n", help="Synthetic vectors."),
    dim: int = typer.Option(256, "--dim"),
    shards: int = typer.Option(4, "--shards", help="Compared with --shards 1."),
    index_key: str = typer.Option("auto", "--index-key", help="auto (a sharded build's choice) or an IVF key."),
    json_out: Path | None = typer.Option(None, "--json", help=JSON_HELP),
) -> None:
    """index build --shards 1 against --shards N: seconds, peak RSS of the largest process, file sizes, recall."""
    from evaluation.bench import scale

    report = scale.bench_shards(n=n, dim=dim, shards=shards, key=index_key)
    _print_bench(report, scale.shards_lines(report), json_out)


@bench_app.command("query")
def bench_query(
    index: Path = typer.Option(..., "--index", help="Index folder."),
    n: int = typer.Option(200, "--n", help="Timed queries per kind."),
    k: int = typer.Option(10, "-k", "--k"),
    device: str = typer.Option("auto", "--device", help=DEVICE_HELP),
    threads: int = typer.Option(1, "--threads", help=QUERY_THREADS_HELP + " (As `search`.)"),
    json_out: Path | None = typer.Option(None, "--json", help=JSON_HELP),
) -> None:
    """Warm latency p50/p95 of image, text and composed queries, split into encode and search."""
    from evaluation.bench import query

    report = query.bench_query(index, n=n, k=k, device=device, threads=threads)
    _print_bench(report, query.report_lines(report), json_out)


@bench_app.command("serve")
def bench_serve(
    index: Path = typer.Option(..., "--index", help="Index folder (items with an image and a text)."),
    clients: str = typer.Option("1,4,16", "--clients", help="Comma-separated counts of concurrent clients."),
    requests: int = typer.Option(400, "--requests", help="Timed requests per client count."),
    max_batch: str = typer.Option("1,32", "--max-batch", help="Comma-separated `serve --max-batch` settings, each "
                                                              "run as its own server: 1 embeds each query alone."),
    k: int = typer.Option(10, "-k", "--k"),
    device: str = typer.Option("auto", "--device", help=DEVICE_HELP),
    threads: int = typer.Option(1, "--threads", help=QUERY_THREADS_HELP + " (As `serve`.)"),
    json_out: Path | None = typer.Option(None, "--json", help=JSON_HELP),
) -> None:
    """Composed queries through `retrieval serve` on a loopback port from concurrent clients: p50/p95/p99 and QPS,
    beside the same queries in process."""
    from evaluation.bench import serve

    report = serve.bench_serve(index, clients=parse_counts(clients, "--clients"), requests=requests, k=k,
                               max_batches=parse_counts(max_batch, "--max-batch"), threads=threads, device=device)
    _print_bench(report, serve.report_lines(report), json_out)


@bench_app.command("update")
def bench_update(
    model: str = typer.Option("fuselip-tiny", "--model", help="Encoder for the add against rebuild comparison."),
    n: int = typer.Option(2000, "--n", help="ShapesWorld items indexed first."),
    add: int = typer.Option(500, "--add", help="Items then added (the rebuild encodes and indexes n + add)."),
    drift_n: int = typer.Option(100_000, "--drift-n", help="Synthetic vectors the IVF index is trained on "
                                                           "(0: skip the drift measurement)."),
    dim: int = typer.Option(256, "--dim", help="Synthetic dimension."),
    index_key: str | None = typer.Option(None, "--index-key", help="The IVF key to drift (default IVF{4√n},Flat)."),
    json_out: Path | None = typer.Option(None, "--json", help=JSON_HELP),
) -> None:
    """`index add` against a full rebuild (items/s), and an IVF index's ann_recall@10 after adds of 50, 100 and
    200 % with its old training."""
    from evaluation.bench import update

    if min(n, add) <= 0 or drift_n < 0:
        raise RetrievalError("--n and --add must be at least 1, --drift-n at least 0")
    report = {"add": update.bench_add(model, n=n, add=add)}
    if drift_n:
        report["drift"] = update.bench_drift(drift_n, dim, key=index_key)
    _print_bench(report, update.report_lines(report), json_out)


def parse_counts(text: str, option: str) -> list[int]:
    """'1,4,16' → [1, 4, 16]: positive integers."""
    try:
        counts = [int(part) for part in text.split(",")]
    except ValueError:
        raise RetrievalError(f"{option} takes comma-separated whole numbers, like 1,4,16; got {text!r}") from None
    if not counts or min(counts) <= 0:
        raise RetrievalError(f"{option} counts must be at least 1; got {text!r}")
    return counts


def main() -> None:
    try:
        app()
    except (RetrievalError, IndexerError) as e:
        typer.echo(f"error: {e}", err=True)
        sys.exit(2)
    except KeyboardInterrupt:
        typer.echo("interrupted: run the same command again to resume", err=True)
        sys.exit(130)
    except OSError as e:  # a full disk, a file over a size limit, a folder it may not write
        typer.echo(f"error: {describe_os_error(e)}", err=True)
        sys.exit(2)


def describe_os_error(error: OSError) -> str:
    import errno

    where = f" ({error.filename})" if error.filename else ""
    line = f"{error.strerror or error}{where}"
    if error.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EIO):
        line += "; what was committed before is intact: make room and run the same command again"
    return line


if __name__ == "__main__":
    main()
