"""Released checkpoints by name: `retrieval models pull NAME` and `--model NAME`, where NAME is a `pretrained` name
of a family.json or `hf-hub:ORG/REPO[@REVISION]` of a family whose importer reads a hub repository.

The first use downloads the files the family's spec names through huggingface_hub (its cache, HF_HOME,
HF_HUB_OFFLINE, HF_ENDPOINT and token, its progress bars), with the tokenizer files from the spec's tokenizer
repository; converts them ONCE with the family's strict importer into a temporary folder; renames that into
place and writes the ref, the one file a later use reads — all under one lock, so that concurrent pulls of the
same model wait for each other and convert it once:

    $RETRIEVAL_CACHE/models/STEM@COMMIT/    our checkpoint (config.json, model.safetensors, tokenizer) + pulled.json
    $RETRIEVAL_CACHE/models/refs/STEM@REV   {"folder": "STEM@COMMIT", "repo": ..., "revision": ...}

STEM is the released name, or hf-hub--ORG--REPO; REV the revision asked for ("/" written "--"; a registered name
asks for the revision its family.json pins, so a new pin is a new ref). A checkpoint imported by hand (`models
import FAMILY SOURCE --name NAME`, for one that is not on the hub) is NAME@import-SHA12 (the converted weights'
sha256) with the ref NAME@import. A later `--model NAME` reads the ref, checks the folder it names, and never
touches the network; `models pull NAME` asks the hub again and converts only a new commit. Folder names come
from validated names and a 40-hex commit id only, so nothing the hub answers can name a path outside the cache.
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import re
import shutil
import sys
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from retrieval.cache import cache_root
from retrieval.encoders.families import FamilySpec, families, family, resolve
from retrieval.encoders.pretrained import REPO_ID, REVISION, Pretrained
from retrieval.encoders.registry import list_pretrained
from retrieval.errors import RetrievalError, first_line
from retrieval.files import atomic_path, folder_lock, fsync_folder, read_json, sha256_file, temporary_name, write_json

HF_HUB = "hf-hub:"
FORMAT = 2  # of a converted folder (pulled.json); a folder of another format is converted again
COMMIT = re.compile(r"[0-9a-f]{40}")
FOLDER = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*@[A-Za-z0-9_.-]+")
PROVENANCE = "pulled.json"


class HubUnreachable(RetrievalError):
    """No connection to the hub (or HF_HUB_OFFLINE): a cached copy may still serve."""


@dataclass(frozen=True)
class Wanted:
    model: str  # as the user wrote it
    stem: str  # its folders are STEM@VERSION
    repo: str | None  # None: not on the hub (imported by hand)
    revision: str  # the revision asked for; "import" for a checkpoint imported by hand
    entry: Pretrained | None  # None for hf-hub:

    @property
    def ref(self) -> str:
        return f"{self.stem}@{self.revision.replace('/', '--')}"


def models_dir() -> Path:
    return cache_root() / "models"


def wanted(model: str) -> Wanted:
    if model.startswith(HF_HUB):
        repo, at, revision = model.removeprefix(HF_HUB).partition("@")
        if not REPO_ID.fullmatch(repo) or (at and not REVISION.fullmatch(revision)):
            raise RetrievalError(f"{model!r} is not hf-hub:ORG/REPO[@REVISION] (ASCII letters, digits, . _ -; a "
                                 "revision may have / between its parts)")
        return Wanted(model, "hf-hub--" + repo.replace("/", "--"), repo, revision or "main", None)
    if model not in list_pretrained():
        raise RetrievalError(f"{model!r} is not a released checkpoint; released: {', '.join(list_pretrained())}, "
                             "or hf-hub:ORG/REPO[@REVISION]")
    entry = list_pretrained()[model]
    return Wanted(model, model, entry.repo, entry.revision if entry.repo else "import", entry)


def usable(folder: Path, w: Wanted) -> bool:
    """A converted folder of the current format, whose config has the dimension `w` registers."""
    try:
        if read_json(folder / PROVENANCE).get("format") != FORMAT:
            return False
        config = read_json(folder / "config.json")
    except (OSError, ValueError, AttributeError):
        return False
    return w.entry is None or w.entry.dim is None or config.get("dim") == w.entry.dim


def cached(model: str) -> Path | None:
    """The converted folder `model` loads, if it is in the cache (no network)."""
    w = wanted(model)
    names = []
    with contextlib.suppress(OSError, ValueError):
        ref = json.loads((models_dir() / "refs" / w.ref).read_text(encoding="utf-8"))
        if isinstance(ref, dict) and (ref.get("repo"), ref.get("revision")) == (w.repo, w.revision):
            names.append(ref.get("folder"))
    if w.repo and COMMIT.fullmatch(w.revision):  # a commit names its folder: no ref needed
        names.append(f"{w.stem}@{w.revision}")
    for name in names:
        if isinstance(name, str) and FOLDER.fullmatch(name) and name.startswith(f"{w.stem}@") \
                and usable(models_dir() / name, w):
            return models_dir() / name
    return None


def offline() -> bool:
    from huggingface_hub import constants

    return constants.is_offline_mode()


def missing_message(w: Wanted, why: str) -> str:
    if w.repo is None:
        assert w.entry is not None
        options = "".join(f" --option {k}={v}" for k, v in w.entry.options.items())
        return (f"{w.model} is not in the model cache ({models_dir()}); it is not on the Hugging Face hub: download "
                f"{w.entry.source} and run `retrieval models import {w.entry.family} FILE --tokenizer CLIP_BPE_DIR"
                f"{options} --name {w.model}`")
    return (f"{w.model} is not in the model cache ({models_dir()}) and {why}; run `retrieval models pull {w.model}` "
            "where there is a network (or copy that cache folder here, or point RETRIEVAL_CACHE at a copy)")


def cached_checkpoint(model: str) -> Path:
    """The checkpoint folder of `model`: from the cache, else pulled now (an error line when offline)."""
    folder = cached(model)
    if folder is not None:
        return folder
    w = wanted(model)
    if w.repo is None or offline():
        raise RetrievalError(missing_message(w, "HF_HUB_OFFLINE is set"))
    return pull(model)


@contextlib.contextmanager
def hub_errors(w: Wanted, repo: str | None = None, revision: str | None = None) -> Iterator[None]:
    """huggingface_hub's exceptions (many lines; some are OSErrors) as one line each, naming the repository asked
    (`repo`, default the model's own)."""
    from huggingface_hub import constants, errors

    repo, revision = repo or w.repo, revision or w.revision
    try:
        yield
    except errors.RevisionNotFoundError:
        raise RetrievalError(f"{w.model}: {repo} has no revision {revision!r}") from None
    except errors.RepositoryNotFoundError:
        raise RetrievalError(f"{w.model}: no repository {repo} on {constants.ENDPOINT} (a private or gated one "
                             "needs a token: HF_TOKEN or `hf auth login`)") from None
    except errors.HfHubHTTPError as e:
        status = getattr(getattr(e, "response", None), "status_code", None)
        if status == 429 or (isinstance(status, int) and status >= 500):  # busy or down: as good as unreachable
            raise HubUnreachable(missing_message(w, f"the hub ({constants.ENDPOINT}) answered {status}")) from None
        raise RetrievalError(f"{w.model}: the hub refused a request for {repo}: {first_line(e)}") from None
    except (errors.LocalEntryNotFoundError, errors.OfflineModeIsEnabled):
        raise HubUnreachable(missing_message(w, f"the hub ({constants.ENDPOINT}) cannot be reached")) from None
    except Exception as e:
        if type(e).__module__.split(".")[0] in ("httpx", "httpx2"):  # huggingface_hub's HTTP client: no connection
            raise HubUnreachable(missing_message(w, f"the hub ({constants.ENDPOINT}) cannot be reached: "
                                                    f"{first_line(e)}")) from None
        raise


def family_of(w: Wanted, files: set[str]) -> FamilySpec:
    """The family whose importer reads this repository: the registered one, or the one whose files it holds."""
    candidates = [family(w.entry.family)] if w.entry else [
        spec for spec in families().values() if spec.pretrained and spec.pretrained.files]
    fits = [spec for spec in candidates if set(spec.pretrained.files) <= files]
    if len(fits) > 1:
        raise RetrievalError(f"{w.model}: {w.repo} holds the files of several families: "
                             f"{', '.join(spec.name for spec in fits)}")
    if not fits:
        needs = "; ".join(f"{spec.name} needs {', '.join(spec.pretrained.files)} (missing "
                          f"{', '.join(sorted(set(spec.pretrained.files) - files))})" for spec in candidates)
        raise RetrievalError(f"{w.model}: {w.repo}@{w.revision} is not a checkpoint of a known family: "
                             f"{needs or 'no family reads hub repositories'}")
    return fits[0]


def download(repo: str, revision: str, files: tuple[str, ...]) -> Path:
    """The snapshot folder (in huggingface_hub's cache) holding `files` of repo@revision."""
    from huggingface_hub import hf_hub_download

    folders = {Path(hf_hub_download(repo, name, revision=revision)).parent for name in files}
    assert len(folders) == 1, folders
    return folders.pop()


def pull(model: str) -> Path:
    """Download `model` from the hub and convert it, unless its newest commit is converted already; its folder.
    Offline, or the hub out of reach (no connection, 5xx, 429): the cached folder (with a note), or the error
    line."""
    from huggingface_hub import constants

    w = wanted(model)
    if w.repo is None or offline():  # nothing to ask the hub: what the cache holds, or the error line
        return cached_checkpoint(model)
    try:
        return _pull(w)
    except HubUnreachable:
        folder = cached(model)
        if folder is None:
            raise
        print(f"{model}: the hub ({constants.ENDPOINT}) is out of reach; the cached {folder.name} is kept",
              file=sys.stderr)
        return folder


def _pull(w: Wanted) -> Path:
    from huggingface_hub import HfApi

    with hub_errors(w):
        info = HfApi().model_info(w.repo, revision=w.revision)
    if not (isinstance(info.sha, str) and COMMIT.fullmatch(info.sha)):
        raise RetrievalError(f"{w.model}: the hub gave no commit id for {w.repo}@{w.revision} ({info.sha!r})")
    spec = family_of(w, {sibling.rfilename for sibling in info.siblings or []})
    if usable(models_dir() / f"{w.stem}@{info.sha}", w):
        return convert(spec, w, None, None, {}, {}, info.sha)  # converted before: only the ref is written
    # downloads run outside the conversion lock; huggingface_hub locks its own cache
    provenance = {"model": w.model, "repo": w.repo, "revision": w.revision, "commit": info.sha}
    with hub_errors(w):
        source = download(w.repo, info.sha, spec.pretrained.files)
    tokenizer = None
    if spec.pretrained.tokenizer:
        repo, revision, files = spec.pretrained.tokenizer
        with hub_errors(w, repo, revision):
            tokenizer = download(repo, revision, files)
        provenance["tokenizer"] = {"repo": repo, "revision": revision, "commit": tokenizer.name}
    options = spec.importer.parse(spec.name, w.entry.options if w.entry else {})
    return convert(spec, w, source, tokenizer, options, provenance, info.sha)


def import_named(family_name: str, source: str | os.PathLike, name: str, tokenizer: str | os.PathLike | None = None,
                 options: dict[str, str] | None = None) -> Path:
    """`models import FAMILY SOURCE --name NAME`: a released checkpoint downloaded by hand, converted into the cache
    under its registered name (with the importer options it is registered with)."""
    released = list_pretrained()
    if name not in released:
        raise RetrievalError(f"--name {name!r} is not a released checkpoint's name; they are: {', '.join(released)}")
    w = wanted(name)
    if w.entry.family != family_name:
        raise RetrievalError(f"{name} is a {w.entry.family} checkpoint, not {family_name}")
    spec = family(family_name)
    given = spec.importer.parse(family_name, options or {})
    registered = spec.importer.parse(family_name, w.entry.options)
    for key, value in registered.items():
        if given.get(key, value) != value:
            raise RetrievalError(f"{name} is registered with --option {key}={w.entry.options[key]}")
    provenance = {"model": name, "source": str(Path(source).resolve()), "imported": time.strftime("%Y-%m-%d %H:%M")}
    return convert(spec, w, Path(source), Path(tokenizer) if tokenizer else None, registered | given, provenance)


def convert(spec: FamilySpec, w: Wanted, source: Path | None, tokenizer: Path | None, options: dict[str, Any],
            provenance: dict[str, Any], commit: str | None = None) -> Path:
    """Under the cache's lock (waiting for another conversion): unless STEM@COMMIT is converted already, run the
    family's importer into a temporary folder and rename it to STEM@COMMIT (STEM@import-SHA12 without a commit);
    then write the ref. A killed conversion leaves only a dot-named temporary folder, removed by the next one."""
    root = models_dir()
    with folder_lock(root, "model conversion", wait=True):
        target = root / f"{w.stem}@{commit}" if commit else None
        if target is None or not usable(target, w):
            if source is None:
                raise RetrievalError(f"{w.model}: the converted {target} went missing; run the command again")
            target = _convert(spec, w, source, tokenizer, options, provenance, commit)
        with atomic_path(root / "refs" / w.ref) as tmp:
            tmp.write_text(json.dumps({"folder": target.name, "repo": w.repo, "revision": w.revision}) + "\n",
                           encoding="utf-8")
        return target


def _convert(spec: FamilySpec, w: Wanted, source: Path, tokenizer: Path | None, options: dict[str, Any],
             provenance: dict[str, Any], commit: str | None) -> Path:
    root = models_dir()
    for leftover in root.glob(".*.tmp-*"):
        shutil.rmtree(leftover, ignore_errors=True)
    tmp = root / temporary_name(f"{w.stem}@{commit or 'import'}")
    # the config is named so that an index built with it finds it again: the registered name, or the commit
    name = w.entry.name if w.entry else f"{HF_HUB}{w.repo}@{commit}"
    try:
        try:
            with warnings.catch_warnings():  # a hostile pickle's protocol is refused below, not warned about
                warnings.filterwarnings("ignore", message="Detected pickle protocol")
                resolve(spec.importer.function)(source, tmp, tokenizer=tokenizer, name=name, **options)
        except RetrievalError as e:  # the importer's checks: missing files, not a state dict, keys, shapes
            raise RetrievalError(f"cannot import {w.model}: {e}") from None
        except pickle.UnpicklingError:
            raise RetrievalError(f"cannot import {w.model}: {source} holds a pickle of more than tensors, which "
                                 "torch.load(weights_only=True) refuses") from None
        except (EOFError, RuntimeError) as e:  # a truncated or corrupt file
            raise RetrievalError(f"cannot import {w.model} from {source}: {first_line(e)}") from None
        dim = read_json(tmp / "config.json").get("dim")
        if w.entry and w.entry.dim and dim != w.entry.dim:
            raise RetrievalError(f"cannot import {w.model}: {source} gives {dim}-dimensional embeddings, but "
                                 f"{w.model} is registered with {w.entry.dim}; is it the right file?")
        write_json(tmp / PROVENANCE, provenance | {"format": FORMAT})
        target = root / f"{w.stem}@{commit or 'import-' + sha256_file(tmp / 'model.safetensors')[:12]}"
        if usable(target, w):
            return target  # the same weights, converted before
        if target.exists():  # an older format, or a partial copy: replaced
            shutil.rmtree(target)
        os.rename(tmp, target)
        fsync_folder(root)
        return target
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def describe(name: str) -> tuple[str, str]:
    """(source, status) of a released checkpoint, for `models list`."""
    w = wanted(name)
    folder = cached(name)
    source = f"{HF_HUB}{w.repo}@{w.revision}" if w.repo else f"by hand: {w.entry.source}"
    if folder:
        return source, f"cached: {folder}"
    how = f"retrieval models pull {name}" if w.repo else f"retrieval models import {w.entry.family} FILE --name {name}"
    return source, f"not cached: {how}"
