"""What every speed benchmark shares: timing, peak resident memory, and a plain-text table."""

from __future__ import annotations

import os
import resource
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager


def rss_bytes() -> int:
    """Current resident set size of this process (Linux /proc; 0 where unavailable)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


class PeakRSS:
    """Samples this process's RSS in a background thread: `peak`, and every (seconds, rss) in `samples`."""

    def __init__(self, interval: float = 0.02):
        self.interval = interval
        self.start = rss_bytes()
        self.peak = self.start
        self.samples: list[tuple[float, int]] = []
        self._t0 = time.perf_counter()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            rss = rss_bytes()
            self.samples.append((time.perf_counter() - self._t0, rss))
            self.peak = max(self.peak, rss)

    def __enter__(self) -> PeakRSS:
        self._t0 = time.perf_counter()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_bytes())

    def halves(self) -> tuple[int, int]:
        """Peak RSS in the first and in the second half of the sampled time (flat memory: about equal)."""
        if not self.samples:
            return self.peak, self.peak
        mid = self.samples[-1][0] / 2
        first = [r for t, r in self.samples if t <= mid] or [self.start]
        second = [r for t, r in self.samples if t > mid] or first
        return max(first), max(second)


def children_peak_rss() -> int:
    """The largest peak RSS of any finished child process (e.g. data-loader workers), in bytes."""
    return resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024


@contextmanager
def timed() -> Iterator[dict[str, float]]:
    """`with timed() as t: ...` then t["seconds"]."""
    out: dict[str, float] = {}
    start = time.perf_counter()
    try:
        yield out
    finally:
        out["seconds"] = time.perf_counter() - start


@contextmanager
def thread_count(n: int | None) -> Iterator[None]:
    """torch's and FAISS's thread counts set to `n` (None: torch's current count) for the block, then restored."""
    import faiss
    import torch

    from retrieval.search import set_threads

    old_torch, old_faiss = torch.get_num_threads(), faiss.omp_get_max_threads()
    set_threads(old_torch if n is None else n)
    try:
        yield
    finally:
        torch.set_num_threads(old_torch)
        faiss.omp_set_num_threads(old_faiss)


def format_table(rows: list[list[str]]) -> str:
    """Right-aligned columns (left-aligned first column) under a header row, for terminal output."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = []
    for j, r in enumerate(rows):
        cells = [c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))]
        lines.append("  ".join(cells).rstrip())
        if j == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def mib(n: int) -> str:
    """Bytes as MiB with one decimal (stores of small benchmarks are under 1 MiB)."""
    return f"{n / 2**20:.1f} MiB"
