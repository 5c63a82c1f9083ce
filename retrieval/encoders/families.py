"""Encoder families, each declared once by its package's `family.json` and found by a scan.

A family package holds `family.json` — its encoder class, its training objective, its official importer with
the importer's options, and its capabilities — and `configs/*.json`, its named models. The built-in families
are the packages under retrieval/encoders/; an installed package adds one through the `retrieval.families`
entry-point group (`name = "package"`). Classes are named as "module:attribute" and imported on first use,
so listing families and models imports no model code.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import os
import re
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

from retrieval.errors import RetrievalError
from retrieval.files import read_json

FAMILY_JSON = "family.json"
ENTRY_POINTS = "retrieval.families"
BUILT_IN = Path(__file__).parent

# capability -> (what it is, for messages; what the family's encoder must have to claim it)
CAPABILITIES: dict[str, tuple[str, tuple[str, ...]]] = {
    # `search --rerank`, and `--explain` by patches
    "word_alignment": ("word-to-patch alignment", ("alignment", "local_scores")),
    # `encode --sparse-codes`, and `--explain` by codebook tokens
    "sparse_codes": ("sparse codes", ("codes", "activations", "vectors_from_codes")),
    # `retrieval bench train`
    "length_groups": ("length-grouped training", ()),
}
OPTION_TYPES = {"float": float, "int": int, "str": str, "path": Path}
REFERENCE = re.compile(r"[A-Za-z_][\w.]*:[A-Za-z_]\w*")


def resolve(reference: str) -> Any:
    """The object a "module:attribute" reference names, imported now."""
    module, attribute = reference.split(":")
    return getattr(importlib.import_module(module), attribute)


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

    def encoder_class(self) -> type:
        """The encoder class, checked to have what each declared capability needs."""
        cls = resolve(self.encoder)
        for capability in sorted(self.capabilities):
            missing = [m for m in CAPABILITIES[capability][1] if not callable(getattr(cls, m, None))]
            if missing:
                raise RetrievalError(f"family {self.name!r} declares {capability!r} but {self.encoder} has no "
                                     f"{', '.join(missing)}")
        return cls

    def objective_class(self) -> type:
        if self.objective is None:
            raise RetrievalError(f"models of family {self.name!r} cannot be trained; trainable families: "
                                 f"{', '.join(n for n, f in families().items() if f.objective) or 'none'}")
        return resolve(self.objective)

    def import_checkpoint(self, source: str | os.PathLike, out: str | os.PathLike,
                          tokenizer: str | os.PathLike | None = None, options: dict[str, str] | None = None) -> Path:
        """Convert an official checkpoint to our format with the family's importer."""
        if self.importer is None:
            raise RetrievalError(f"family {self.name!r} has no importer; families with one: "
                                 f"{', '.join(n for n, f in families().items() if f.importer) or 'none'}")
        values = self.importer.parse(self.name, options or {})
        return resolve(self.importer.function)(source, out, tokenizer=tokenizer, **values)


def read_family(folder: Path) -> FamilySpec:
    """The spec in `folder`/family.json, checked."""
    path = folder / FAMILY_JSON
    data = read_json(path)
    known = {"family", "description", "encoder", "objective", "importer", "capabilities"}
    if not isinstance(data, dict) or set(data) - known or not {"family", "encoder"} <= set(data):
        raise RetrievalError(f"{path}: a family spec has the keys {', '.join(sorted(known))} "
                             "(family and encoder required)")
    references = [data["encoder"], data.get("objective")]
    importer = data.get("importer")
    if importer is not None:
        if not isinstance(importer, dict) or set(importer) - {"function", "source", "options"}:
            raise RetrievalError(f"{path}: importer has the keys function, source and options")
        references.append(importer.get("function"))
        for name, option in importer.get("options", {}).items():
            if not isinstance(option, dict) or option.get("type") not in OPTION_TYPES:
                raise RetrievalError(f"{path}: importer option {name!r} needs a type, one of "
                                     f"{', '.join(OPTION_TYPES)}")
        importer = ImporterSpec(importer.get("function"), importer.get("source", "SOURCE"),
                                importer.get("options", {}))
    bad = [r for r in references if r is not None and not (isinstance(r, str) and REFERENCE.fullmatch(r))]
    if bad:
        raise RetrievalError(f"{path}: {bad[0]!r} is not a \"module:attribute\" reference")
    capabilities = frozenset(data.get("capabilities", []))
    if capabilities - set(CAPABILITIES):
        raise RetrievalError(f"{path}: unknown capabilities {', '.join(sorted(capabilities - set(CAPABILITIES)))}; "
                             f"known: {', '.join(CAPABILITIES)}")
    return FamilySpec(name=data["family"], description=data.get("description", ""), encoder=data["encoder"],
                      objective=data.get("objective"), importer=importer, capabilities=capabilities,
                      folder=folder)


def family_folders() -> list[Path]:
    """The built-in family packages, then those of installed plugins."""
    folders = sorted(p.parent for p in BUILT_IN.glob(f"*/{FAMILY_JSON}"))
    for entry in importlib.metadata.entry_points(group=ENTRY_POINTS):
        spec = importlib.util.find_spec(entry.value)
        if spec is None or not spec.submodule_search_locations:
            raise RetrievalError(f"entry point {entry.name} = {entry.value!r} ({ENTRY_POINTS}) is not a package")
        folders.append(Path(next(iter(spec.submodule_search_locations))))
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


def with_capability(capability: str) -> list[str]:
    """The names of the families that have `capability`, for messages."""
    return [name for name, spec in families().items() if capability in spec.capabilities]


def require(encoder, capability: str, purpose: str) -> None:
    """Refuse `purpose` for an encoder whose family does not declare `capability`."""
    if not encoder.supports(capability):
        raise RetrievalError(f"{encoder.name} has no {CAPABILITIES[capability][0]}, which {purpose} needs "
                             f"(families with it: {', '.join(with_capability(capability)) or 'none'})")
