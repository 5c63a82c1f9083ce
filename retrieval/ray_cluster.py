"""Joining a Ray cluster for `--engine ray` (the optional extra `retrieval[ray]`)."""

from __future__ import annotations

from retrieval.errors import RetrievalError

ENGINES = ("local", "ray")  # where an encode job or a sharded build runs


def check_engine(engine: str) -> None:
    if engine not in ENGINES:
        raise RetrievalError(f"--engine must be {' or '.join(ENGINES)}, got {engine!r}")


def connect(address: str | None = None) -> None:
    """Join the Ray cluster at `address` ('auto': the one `ray start` runs on this machine), or start a local
    instance when none is given; a process that has already joined one stays in it."""
    try:
        import ray
    except ImportError:
        raise RetrievalError("--engine ray needs Ray: pip install 'retrieval[ray]'") from None
    if ray.is_initialized():
        return
    try:
        ray.init(address=address, include_dashboard=False, log_to_driver=False, configure_logging=False)
    except ConnectionError as e:
        raise RetrievalError(f"cannot join the Ray cluster at {address!r}: {str(e).splitlines()[0]}") from None
