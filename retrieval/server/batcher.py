"""Query embedding for a server: one model thread, and the queries that wait while it works go in one forward.

Nothing waits on purpose: a query that finds the thread idle runs at once, alone; queries that arrive while a
forward runs are taken together next (up to `max_batch` items, grouped by encoder), which is where batching pays,
under load. A batch that fails is retried query by query, so that one bad query fails alone.
"""

from __future__ import annotations

import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass
class Embedded:
    vectors: np.ndarray  # [n, dim], one row per item of the job
    queued_s: float  # from submit until its forward started
    encode_s: float  # that forward (shared with the other jobs of its batch)
    batch_items: int  # items in that forward


@dataclass
class _Job:
    encoder: Any
    items: list[tuple[Any, str | None]]  # (PIL image or None, text or None)
    future: Future = field(default_factory=Future)
    submitted: float = field(default_factory=time.perf_counter)


class EncodeBatcher:
    """`submit(encoder, items)` → a Future of `Embedded`; embedding runs on one thread of its own."""

    def __init__(self, max_batch: int = 32):
        if max_batch <= 0:
            raise ValueError("max_batch must be positive")
        self.max_batch = max_batch
        self._jobs: queue.Queue[_Job | None] = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="encode-batcher", daemon=True)
        self._thread.start()

    def submit(self, encoder, items: list[tuple[Any, str | None]]) -> Future:
        job = _Job(encoder, items)
        self._jobs.put(job)
        return job.future

    def close(self) -> None:
        self._jobs.put(None)
        self._thread.join()

    def _run(self) -> None:
        while (first := self._jobs.get()) is not None:
            jobs, size, stop = [first], len(first.items), False
            while size < self.max_batch:
                try:
                    job = self._jobs.get_nowait()
                except queue.Empty:
                    break
                if job is None:
                    stop = True
                    break
                jobs.append(job)
                size += len(job.items)
            groups: dict[int, list[_Job]] = {}
            for job in jobs:
                if job.future.set_running_or_notify_cancel():  # a job its caller cancelled is skipped
                    groups.setdefault(id(job.encoder), []).append(job)
            for group in groups.values():
                try:
                    self._embed(group)
                except BaseException as error:  # nothing may end this thread: its jobs fail, the next ones run
                    for job in group:
                        if not job.future.done():
                            job.future.set_exception(error)
            if stop:
                return

    def _embed(self, jobs: list[_Job]) -> None:
        items = [item for job in jobs for item in job.items]
        started = time.perf_counter()
        try:
            vectors = jobs[0].encoder.encode(images=[i for i, _ in items], texts=[t for _, t in items])
        except Exception as error:
            if len(jobs) > 1:
                for job in jobs:
                    self._embed([job])
            else:
                jobs[0].future.set_exception(error)
            return
        took = time.perf_counter() - started
        at = 0
        for job in jobs:
            n = len(job.items)
            job.future.set_result(Embedded(vectors[at:at + n], started - job.submitted, took, len(items)))
            at += n
