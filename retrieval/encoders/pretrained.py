"""The `pretrained` key of a family.json: released checkpoints by name, each on the Hugging Face hub (`repo`,
pulled by retrieval/hub.py) or imported by hand from `source` where it is not on the hub.

Repository ids, revisions and file names are checked here once, as plain ASCII names (no "..", no "--", no
"/" beyond the separators), so that nothing built from them can name a folder outside the caches.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from retrieval.errors import RetrievalError
from retrieval.files import has_type

if TYPE_CHECKING:
    from retrieval.encoders.families import ImporterSpec

REPO_ID = re.compile(r"(?!.*(\.\.|--))[A-Za-z0-9][A-Za-z0-9_.-]{0,95}/[A-Za-z0-9][A-Za-z0-9_.-]{0,95}")
# a branch, a tag, a commit, or a path-like ref such as refs/pr/1
REVISION = re.compile(r"(?!.*(\.\.|--|//))[A-Za-z0-9][A-Za-z0-9_./-]{0,99}(?<!/)")
FILE_NAME = re.compile(r"(?!.*\.\.)[A-Za-z0-9_][A-Za-z0-9_.-]{0,199}")


@dataclass(frozen=True)
class Pretrained:
    """A released checkpoint by name (retrieval/hub.py): on the hub (`repo`, converted on `models pull`), or imported
    by hand from `source` (`models import ... --name NAME`) where it is not on the hub."""

    name: str
    family: str
    repo: str | None
    revision: str
    source: str | None
    options: dict[str, str]  # the importer options it needs (`--option NAME=VALUE`)
    dim: int | None
    size: str
    description: str


@dataclass(frozen=True)
class PretrainedSpec:
    """`pretrained` of family.json: the files the importer reads from a hub repository (where it can read one),
    the hub repository of the tokenizer files it takes as `tokenizer=`, and the released checkpoints by name."""

    files: tuple[str, ...]
    tokenizer: tuple[str, str, tuple[str, ...]] | None  # (repo, revision, files)
    models: dict[str, Pretrained]


def read_pretrained(data: Any, family: str, importer: ImporterSpec,
                    refuse: Callable[[str], RetrievalError]) -> PretrainedSpec:
    def names(value: Any, what: str) -> tuple[str, ...]:
        if not (isinstance(value, list) and value and all(has_type(v, str) and FILE_NAME.fullmatch(v) for v in value)):
            raise refuse(f"{what} must be a non-empty list of plain file names")
        return tuple(value)

    if not isinstance(data, dict) or set(data) - {"files", "tokenizer", "models"} or "models" not in data:
        raise refuse("pretrained has the keys models (required), files and tokenizer")
    files = names(data["files"], "pretrained files") if "files" in data else ()
    tokenizer = data.get("tokenizer")
    if tokenizer is not None:
        if not (isinstance(tokenizer, dict) and set(tokenizer) == {"repo", "revision", "files"}
                and has_type(tokenizer["repo"], str) and REPO_ID.fullmatch(tokenizer["repo"])
                and has_type(tokenizer["revision"], str) and REVISION.fullmatch(tokenizer["revision"])):
            raise refuse("pretrained tokenizer has the keys repo (ORG/NAME), revision and files")
        tokenizer = (tokenizer["repo"], tokenizer["revision"], names(tokenizer["files"], "pretrained tokenizer files"))
    if not isinstance(data["models"], dict):
        raise refuse("pretrained models must be an object of NAME: {repo or source, ...}")
    models = {}
    for name, entry in data["models"].items():
        where = f"pretrained model {name!r}"
        keys = {"repo", "revision", "source", "options", "dim", "size", "description"}
        if not re.fullmatch(r"[a-z][a-z0-9.-]*", name) or not isinstance(entry, dict) or set(entry) - keys \
                or ("repo" in entry) == ("source" in entry):
            raise refuse(f"{where}: a lower-case name with the keys {', '.join(sorted(keys))} "
                         "(repo: a hub repository, or source: where to download it by hand)")
        repo, revision = entry.get("repo"), entry.get("revision", "main")
        if repo is not None and not (has_type(repo, str) and REPO_ID.fullmatch(repo) and files):
            raise refuse(f"{where}: repo must be a hub repository ORG/NAME, in a family whose pretrained gives files")
        if not (has_type(revision, str) and REVISION.fullmatch(revision)):
            raise refuse(f"{where}: revision must be a branch, tag or commit name")
        options = entry.get("options", {})
        if not (isinstance(options, dict) and all(has_type(v, str) for v in options.values())):
            raise refuse(f"{where}: options must be an object of NAME: \"VALUE\"")
        try:
            importer.parse(family, options)
        except RetrievalError as e:
            raise refuse(f"{where}: {e}") from None
        dim = entry.get("dim")
        if dim is not None and not (has_type(dim, int) and dim > 0):
            raise refuse(f"{where}: dim must be a positive integer")
        if not all(has_type(entry.get(key, ""), str) for key in ("source", "size", "description")):
            raise refuse(f"{where}: source, size and description must be strings")
        models[name] = Pretrained(name, family, repo, revision, entry.get("source"), options, dim,
                                  entry.get("size", ""), entry.get("description", ""))
    return PretrainedSpec(files, tokenizer, models)
