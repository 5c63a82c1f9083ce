"""What every benchmark reader shares: the `Benchmark` it returns, and one-line refusals of a folder that is
not in the layout it expects."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from evaluation.tasks import Item, Query, Task
from retrieval.errors import RetrievalError
from retrieval.paths import is_within

T = TypeVar("T")


@dataclass(frozen=True)
class Summary:
    """A row made of other rows: `mean` averages their metrics key by key; `rsum` adds up hit@1/5/10 of each
    (the retrieval papers' R@1+R@5+R@10 over both directions)."""

    name: str
    tasks: tuple[str, ...]
    kind: str = "mean"
    defined: int = 0  # how many tasks the benchmark averages here, when --subsets left some out


@dataclass
class Benchmark:
    name: str
    root: Path
    protocol: str
    tasks: list[Task]
    summaries: list[Summary] = field(default_factory=list)
    folded: frozenset[str] = frozenset()  # tasks reported only through a summary (COCO's 1k folds)
    # candidates embedded as the normalised mean of several items (a class over its prompt templates)
    ensembles: dict[str, list[Item]] = field(default_factory=dict)

    def items(self) -> list[Item]:
        """Every item to embed — queries, candidates, ensemble members — each (image, text) once."""
        seen: dict[tuple[str | None, str | None], Item] = {}
        for task in self.tasks:
            for item in [*task.candidates, *(q.item for q in task.queries)]:
                for one in self.ensembles.get(item.id, [item]):
                    seen.setdefault((one.image, one.text or None), one)
        return list(seen.values())


class Layout:
    """Paths and records of one benchmark folder, refused with one line that names what is missing."""

    def __init__(self, name: str, root: Path, expected: str):
        self.name, self.root, self.expected = name, root, expected

    def refuse(self, problem: str) -> RetrievalError:
        return RetrievalError(f"{self.root} is not a {self.name} folder ({self.expected}): {problem}")

    def file(self, relative: str) -> Path:
        path = self.root / relative
        if not path.is_file():
            raise self.refuse(f"{relative} is missing")
        return path

    def json(self, relative: str, kind: type[T]) -> T:
        path = self.file(relative)
        try:
            data = json.loads(path.read_bytes())
        except (ValueError, UnicodeDecodeError, RecursionError) as e:
            raise self.refuse(f"{relative} is not JSON ({type(e).__name__}: {e})") from None
        if not isinstance(data, kind):
            raise self.refuse(f"{relative} holds a JSON {type(data).__name__}, not a {kind.__name__}")
        return data

    def value(self, record: Any, key: str, kind: type | tuple[type, ...], where: str) -> Any:
        """record[key], which must be a `kind`."""
        if not isinstance(record, dict) or key not in record:
            raise self.refuse(f"{where} has no {key!r}")
        value = record[key]
        if not isinstance(value, kind) or isinstance(value, bool):
            raise self.refuse(f"{where}: {key!r} is a {type(value).__name__}, not what the layout has")
        return value

    def strings(self, record: Any, key: str, where: str) -> list[str]:
        """record[key], which must be a list of strings."""
        value = self.value(record, key, list, where)
        if not all(isinstance(v, str) for v in value):
            raise self.refuse(f"{where}: {key!r} must be a list of strings")
        return value

    def image(self, relative: str, where: str, under: Path | None = None) -> str:
        """The absolute path of an image named relative to `under` (default: the root); refused if it would
        leave the root."""
        path = os.path.normpath((under or self.root) / relative)
        if os.path.isabs(relative) or not is_within(path, str(self.root)):
            raise self.refuse(f"{where} names an image outside the folder: {relative!r}")
        return path

    def check_images(self, tasks: Sequence[Task]) -> None:
        """Refuse a folder whose tasks name images that are not there, counting them."""
        paths = {i.image for t in tasks for i in [*t.candidates, *(q.item for q in t.queries)] if i.image}
        missing = sorted(p for p in paths if not os.path.isfile(p))
        if missing:
            first = os.path.relpath(missing[0], self.root)
            raise self.refuse(f"{len(missing)} of {len(paths)} images are missing, the first {first}")


def limited(queries: list[Query], limit: int | None) -> list[Query]:
    """At most `limit` queries, spread evenly over the list, so that every class of a sorted list stays in."""
    if limit is None or len(queries) <= limit:
        return queries
    return [queries[i * len(queries) // limit] for i in range(limit)]


def no_subsets(name: str, subsets: list[str] | None) -> None:
    if subsets:
        raise RetrievalError(f"{name} has no subsets to choose; leave out --subsets")


def pick_subsets(name: str, known: Sequence[str], subsets: list[str] | None) -> list[str]:
    """The subsets asked for, in the benchmark's order; all when none are named."""
    if not subsets:
        return list(known)
    unknown = [s for s in subsets if s not in known]
    if unknown:
        raise RetrievalError(f"{name} has no subset {unknown[0]!r}; known: {', '.join(known)}")
    return [s for s in known if s in subsets]
