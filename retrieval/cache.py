"""The one cache folder of the engine: `$RETRIEVAL_CACHE`, default ~/.cache/retrieval (generated benchmark data in
data/, released checkpoints converted to our format in models/)."""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    return Path(os.environ.get("RETRIEVAL_CACHE") or Path.home() / ".cache" / "retrieval").expanduser().absolute()
