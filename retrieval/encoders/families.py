"""Encoder families, each declared once by its package's `family.json` and found by a scan.

A family package holds `family.json` — its encoder class, its training objective, its official importer with
the importer's options, and its capabilities — and `configs/*.json`, its named models. The built-in families
are the packages under retrieval/encoders/; an installed package adds one through the `retrieval.families`
entry-point group (`name = "package"`). Classes are named as "module:attribute" and imported on first use,
so reading the specs imports no family's code. docs/families.md says how to add a family.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

from retrieval.errors import RetrievalError
from retrieval.files import has_type, read_json

FAMILY_JSON = "family.json"
ENTRY_POINTS = "retrieval.families"
BUILT_IN = Path(__file__).parent
OPTION_TYPES = {"float": float, "int": int, "str": str, "path": Path}
RESERVED_OPTIONS = {"source", "out", "tokenizer"}  # the importer's own arguments
REFERENCE = re.compile(r"[A-Za-z_][\w.]*:[A-Za-z_]\w*")
# hub repository ids and revisions as `pretrained` and `hf-hub:ORG/REPO@REVISION` may name them: plain names only
# (no "..", "--", "/" beyond the one separator), so that they can only name folders inside the caches
REPO_ID = re.compile(r"(?!.*(\.\.|--))[A-Za-z0-9][\w.-]{0,95}/[A-Za-z0-9][\w.-]{0,95}")
REVISION = re.compile(r"(?!.*\.\.)[A-Za-z0-9][\w.-]{0,99}")
FILE_NAME = re.compile(r"(?!.*\.\.)[A-Za-z0-9_][\w.-]{0,199}")


@dataclass(frozen=True)
class Capability:
    """A promise that the family's classes have certain attributes (methods, or a non-empty tuple)."""

    description: str  # for messages: "test-tiny has no <description>"
    encoder: tuple[str, ...] = ()
    objective: tuple[str, ...] = ()


CAPABILITIES = {
    # `search --rerank`, `eval --rerank`, and `--explain` by patches
    "word_alignment": Capability("word-to-patch alignment", encoder=("alignment", "local_scores")),
    # `encode --sparse-codes`, and `--explain` by codebook tokens
    "sparse_codes": Capability("sparse codes", encoder=("codes", "activations", "vectors_from_codes",
                                                        "extra_columns")),
    # `retrieval bench train`
    "length_groups": Capability("length-grouped training",
                                objective=("length_multiple", "row_multiple", "groups_per_side")),
}


def resolve(reference: str) -> Any:
    """The object a "module:attribute" reference names, imported now."""
    module, attribute = reference.split(":")
    try:
        return getattr(importlib.import_module(module), attribute)
    except (ImportError, AttributeError) as e:
        raise RetrievalError(f"cannot load {reference}: {e}") from None


def check_has(cls: type, names: tuple[str, ...], owner: str, capability: str) -> None:
    missing = [name for name in names if not getattr(cls, name, None)]
    if missing:
        raise RetrievalError(f"family {owner!r} declares {capability!r} but {cls.__module__}.{cls.__name__} has "
                             f"no {', '.join(missing)}")


@dataclass(frozen=True)
class ImporterSpec:
    """An official-checkpoint converter: function(source, out, tokenizer=None, **options) -> checkpoint folder."""

    function: str
    source: str  # what SOURCE is, for help and errors
    options: dict[str, dict[str, str]]  # name -> {"type": float | int | str | path, "help": ...}

    def parse(self, family: str, given: dict[str, str]) -> dict[str, Any]:
        """`--option NAME=VALUE` texts as the importer's typed keyword arguments."""
        values = {}
        for name, text in given.items():
            if name not in self.options:
                known = ", ".join(self.options) or "none"
                raise RetrievalError(f"the {family} importer has no option {name!r}; its options: {known}")
            kind = self.options[name]["type"]
            try:
                values[name] = OPTION_TYPES[kind](text)
            except ValueError:
                raise RetrievalError(f"--option {name}={text}: {name} must be a {kind}") from None
        return values


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


@dataclass(frozen=True)
class FamilySpec:
    name: str
    description: str
    encoder: str
    objective: str | None
    importer: ImporterSpec | None
    capabilities: frozenset[str]
    folder: Path  # the package folder: family.json and configs/
    pretrained: PretrainedSpec | None = None

    def encoder_class(self) -> type:
        """The encoder class, checked to be one and to have what each declared capability needs."""
        from retrieval.encoders.base import Encoder

        cls = resolve(self.encoder)
        if not (isinstance(cls, type) and issubclass(cls, Encoder)):
            raise RetrievalError(f"family {self.name!r}: {self.encoder} is not an Encoder class")
        for capability in sorted(self.capabilities):
            check_has(cls, CAPABILITIES[capability].encoder, self.name, capability)
        return cls

    def objective_class(self) -> type:
        """The training objective's class, checked to have what each declared capability needs."""
        if self.objective is None:
            raise RetrievalError(f"models of family {self.name!r} cannot be trained; trainable families: "
                                 f"{names_where(lambda spec: spec.objective)}")
        cls = resolve(self.objective)
        for capability in sorted(self.capabilities):
            check_has(cls, CAPABILITIES[capability].objective, self.name, capability)
        return cls

    def import_checkpoint(self, source: str | os.PathLike, out: str | os.PathLike,
                          tokenizer: str | os.PathLike | None = None, options: dict[str, str] | None = None) -> Path:
        """Convert an official checkpoint to our format with the family's importer."""
        if self.importer is None:
            raise RetrievalError(f"family {self.name!r} has no importer; families with one: "
                                 f"{names_where(lambda spec: spec.importer)}")
        values = self.importer.parse(self.name, options or {})
        return resolve(self.importer.function)(source, out, tokenizer=tokenizer, **values)


def read_family(folder: Path) -> FamilySpec:
    """The spec in `folder`/family.json, checked field by field."""
    path = folder / FAMILY_JSON
    try:
        data = read_json(path)
    except (OSError, ValueError) as e:
        raise RetrievalError(f"cannot read {path}: {e}") from None

    def refuse(problem: str) -> RetrievalError:
        return RetrievalError(f"{path}: {problem}")

    known = {"family", "description", "encoder", "objective", "importer", "capabilities", "pretrained"}
    if not isinstance(data, dict) or set(data) - known or not {"family", "encoder"} <= set(data):
        raise refuse(f"a family spec has the keys {', '.join(sorted(known))} (family and encoder required)")
    if not (has_type(data["family"], str) and re.fullmatch(r"[a-z][a-z0-9_-]*", data["family"])):
        raise refuse("family must be a lower-case name")
    if not has_type(data.get("description", ""), str):
        raise refuse("description must be a string")
    references = [data["encoder"], data.get("objective")]
    importer = data.get("importer")
    if importer is not None:
        importer = read_importer(importer, refuse)
        references.append(importer.function)
    bad = [r for r in references if r is not None and not (isinstance(r, str) and REFERENCE.fullmatch(r))]
    if bad:
        raise refuse(f"{bad[0]!r} is not a \"module:attribute\" reference")
    capabilities = data.get("capabilities", [])
    if not (isinstance(capabilities, list) and all(has_type(c, str) for c in capabilities)):
        raise refuse("capabilities must be a list of names")
    unknown = sorted(set(capabilities) - set(CAPABILITIES))
    if unknown:
        raise refuse(f"unknown capabilities {', '.join(unknown)}; known: {', '.join(CAPABILITIES)}")
    pretrained = None
    if "pretrained" in data:
        if importer is None:
            raise refuse("pretrained needs an importer")
        pretrained = read_pretrained(data["pretrained"], data["family"], importer, refuse)
    return FamilySpec(name=data["family"], description=data.get("description", ""), encoder=data["encoder"],
                      objective=data.get("objective"), importer=importer, capabilities=frozenset(capabilities),
                      folder=folder, pretrained=pretrained)


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


def read_importer(data: Any, refuse: Callable[[str], RetrievalError]) -> ImporterSpec:
    if not isinstance(data, dict) or set(data) - {"function", "source", "options"} or "function" not in data:
        raise refuse("importer has the keys function (required), source and options")
    options = data.get("options", {})
    if not isinstance(options, dict):
        raise refuse("importer options must be an object of NAME: {type, help}")
    for name, option in options.items():
        if name in RESERVED_OPTIONS or not re.fullmatch(r"[a-z_][a-z0-9_]*", name):
            raise refuse(f"importer option {name!r} must be a lower-case name other than "
                         f"{', '.join(sorted(RESERVED_OPTIONS))}")
        if not isinstance(option, dict) or option.get("type") not in OPTION_TYPES \
                or not has_type(option.get("help", ""), str):
            raise refuse(f"importer option {name!r} needs a type, one of {', '.join(OPTION_TYPES)} (and a help text)")
    if not has_type(data.get("source", ""), str):
        raise refuse("importer source must be a string")
    return ImporterSpec(data["function"], data.get("source", "SOURCE"), options)


def family_folders() -> list[Path]:
    """The built-in family packages, then those of installed plugins."""
    folders = sorted(p.parent for p in BUILT_IN.glob(f"*/{FAMILY_JSON}"))
    for entry in importlib.metadata.entry_points(group=ENTRY_POINTS):
        where = f"entry point {entry.name} = {entry.value!r} ({ENTRY_POINTS})"
        try:
            spec = importlib.util.find_spec(entry.value)
        except (ImportError, ValueError) as e:
            raise RetrievalError(f"{where}: cannot find the package: {e}") from None
        if spec is None or not spec.submodule_search_locations:
            raise RetrievalError(f"{where} is not a package")
        folder = Path(next(iter(spec.submodule_search_locations)))
        if not (folder / FAMILY_JSON).is_file():
            raise RetrievalError(f"{where}: the package has no {FAMILY_JSON}")
        folders.append(folder)
    return folders


@cache
def families() -> dict[str, FamilySpec]:
    """Every registered family, by name."""
    found: dict[str, FamilySpec] = {}
    for folder in family_folders():
        spec = read_family(folder)
        if spec.name in found:
            raise RetrievalError(f"family {spec.name!r} is declared twice: in {found[spec.name].folder} and {folder}")
        found[spec.name] = spec
    return found


def family(name: str) -> FamilySpec:
    if name not in families():
        raise RetrievalError(f"unknown encoder family {name!r}; known: {', '.join(families())}")
    return families()[name]


def names_where(test: Callable[[FamilySpec], Any]) -> str:
    """The names of the families that pass `test`, for messages ("none" if no family does)."""
    return ", ".join(name for name, spec in families().items() if test(spec)) or "none"


def require(encoder, capability: str, purpose: str) -> None:
    """Refuse `purpose` for an encoder whose family does not declare `capability`."""
    if not encoder.supports(capability):
        raise RetrievalError(f"{encoder.name} has no {CAPABILITIES[capability].description}, which {purpose} needs "
                             f"(families with it: {names_where(lambda spec: capability in spec.capabilities)})")
