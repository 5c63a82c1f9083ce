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

from retrieval.encoders.pretrained import PretrainedSpec, read_pretrained
from retrieval.errors import RetrievalError
from retrieval.files import has_type, read_json

FAMILY_JSON = "family.json"
ENTRY_POINTS = "retrieval.families"
BUILT_IN = Path(__file__).parent
OPTION_TYPES = {"float": float, "int": int, "str": str, "path": Path}
RESERVED_OPTIONS = {"source", "out", "tokenizer"}  # the importer's own arguments
REFERENCE = re.compile(r"[A-Za-z_][\w.]*:[A-Za-z_]\w*")


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
