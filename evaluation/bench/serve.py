"""`retrieval bench serve`: the server under load from concurrent clients, beside the same queries in process.

The queries are composed ones sampled as `bench query` samples them (a stored image with another item's
text). They first run in this process (`SearchIndex.search`, warm): the baseline. Then `retrieval serve`
starts as a child process on a free loopback port, once per `--max-batch` setting, and each concurrency's
clients (threads, one keep-alive connection each) send the same queries as multipart uploads, as a browser or
curl does; per concurrency: p50/p95/p99 latency, QPS, errors and the mean number of query items per model
forward. The server is stopped when the run ends, whatever happens.
"""

from __future__ import annotations

import http.client
import json
import os
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np

from evaluation.bench.common import format_table, thread_count
from evaluation.bench.query import BAR_MS, sample_queries

START_TIMEOUT_S = 300
REQUEST_TIMEOUT_S = 120


def multipart(fields: dict[str, str], image: bytes | None = None, filename: str = "query") -> tuple[bytes, str]:
    """A multipart/form-data body with text fields and an image file (if any), and its content type."""
    boundary = uuid.uuid4().hex
    parts = [f'--{boundary}\r\nContent-Disposition: form-data; name="{key}"\r\n\r\n{value}\r\n'.encode()
             for key, value in fields.items()]
    if image is not None:
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="{filename}"\r\n'
                     "Content-Type: application/octet-stream\r\n\r\n".encode() + image + b"\r\n")
    parts.append(f"--{boundary}--\r\n".encode())
    return b"".join(parts), f"multipart/form-data; boundary={boundary}"


class ServerProcess:
    """`retrieval serve` in a child process on a free loopback port; a context manager that always stops it."""

    def __init__(self, args: list[str]):
        self.args = args
        self.proc: subprocess.Popen | None = None
        self.port = 0
        self.lines: list[str] = []

    def __enter__(self) -> ServerProcess:
        from retrieval.errors import RetrievalError

        command = [sys.executable, "-m", "cli", "serve", "--host", "127.0.0.1", "--port", "0", *self.args]
        self.proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        found = threading.Event()
        threading.Thread(target=self._read, args=(found,), daemon=True).start()
        if not found.wait(START_TIMEOUT_S) or not self.port:
            self.stop()
            raise RetrievalError("the server did not start: " + " | ".join(self.lines[-5:]))
        return self

    def _read(self, found: threading.Event) -> None:
        for line in self.proc.stdout:
            self.lines.append(line.rstrip())
            if line.startswith("serving ") and not found.is_set():
                self.port = int(line.split(" on http://")[1].split("/")[0].rsplit(":", 1)[1])
                found.set()
        found.set()  # the process ended

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def __exit__(self, *exc) -> None:
        self.stop()


def run_clients(port: int, bodies: list[tuple[bytes, str]], clients: int, requests: int) -> dict[str, Any]:
    """`requests` searches spread over `clients` threads, each with its own keep-alive connection."""
    latencies: list[float] = []
    batch_items: list[int] = []
    errors: list[str] = []
    lock = threading.Lock()

    def client(worker: int) -> None:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=REQUEST_TIMEOUT_S)
        try:
            for i in range(worker, requests, clients):
                body, content_type = bodies[i % len(bodies)]
                t0 = time.perf_counter()
                try:
                    connection.request("POST", "/search", body, {"Content-Type": content_type})
                    response = connection.getresponse()
                    payload = response.read()
                except (OSError, http.client.HTTPException) as e:
                    connection.close()
                    with lock:
                        errors.append(f"{type(e).__name__}: {e}")
                    continue
                took = time.perf_counter() - t0
                with lock:
                    if response.status == 200:
                        latencies.append(took)
                        batch_items.append(json.loads(payload)["batch_items"])
                    else:
                        errors.append(f"{response.status}: {payload[:200]!r}")
        finally:
            connection.close()

    started = time.perf_counter()
    threads = [threading.Thread(target=client, args=(w,)) for w in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - started
    ms = np.asarray(latencies) * 1000 if latencies else np.full(1, np.nan)
    return {"clients": clients, "requests": requests, "ok": len(latencies), "errors": len(errors),
            "first_errors": errors[:3], "p50_ms": float(np.percentile(ms, 50)), "p95_ms": float(np.percentile(ms, 95)),
            "p99_ms": float(np.percentile(ms, 99)), "qps": len(latencies) / wall,
            "mean_batch_items": float(np.mean(batch_items)) if batch_items else 0.0}


def in_process(index, queries: list[tuple[str, str]], k: int, warmup: int) -> dict[str, float]:
    """p50 and p95 of the same composed queries through `SearchIndex.search` in this process."""
    for image, text in queries[:warmup]:
        index.search(image=image, text=text, k=k)
    took = []
    for image, text in queries[warmup:]:
        t0 = time.perf_counter()
        index.search(image=image, text=text, k=k)
        took.append(time.perf_counter() - t0)
    ms = np.asarray(took) * 1000
    return {"p50_ms": float(np.percentile(ms, 50)), "p95_ms": float(np.percentile(ms, 95))}


def bench_serve(index: str | os.PathLike, clients: list[int] | None = None, requests: int = 400, k: int = 10,
                max_batches: list[int] | None = None, threads: int = 1, device: str = "auto",
                warmup: int = 20, seed: int = 0) -> dict[str, Any]:
    """Latency and QPS of composed queries through HTTP per client count (and per --max-batch setting)."""
    from retrieval.errors import RetrievalError
    from retrieval.search import check_k, open_index

    clients = clients or [1, 4, 16]
    max_batches = max_batches or [1, 32]
    check_k(k)
    if requests <= 0 or warmup < 0 or min(clients) <= 0 or min(max_batches) <= 0:
        raise RetrievalError("--requests, --clients and --max-batch must be positive")
    path = Path(index)
    if not (path / "index.json").is_file():
        raise RetrievalError(f"{path} is not an index folder (no index.json)")
    distinct = min(requests, 200)
    with thread_count(threads):
        searcher = open_index(path, device=device)
        queries = sample_queries(searcher.metadata, distinct + warmup, seed)["composed"]
        baseline = in_process(searcher, queries, k, warmup)
        model, count, where = searcher.encoder.name, searcher.info["count"], searcher.encoder.device
        del searcher
    bodies = [multipart({"text": text, "k": str(k)}, Path(image).read_bytes(), Path(image).name)
              for image, text in queries]
    runs = []
    for max_batch in max_batches:
        args = ["--index", str(path), "--threads", str(threads), "--device", device, "--max-batch", str(max_batch)]
        with ServerProcess(args) as server:
            run_clients(server.port, bodies[:warmup] or bodies[:1], 1, max(warmup, 1))
            runs += [{"max_batch": max_batch} | run_clients(server.port, bodies[warmup:], c, requests) for c in clients]
    one_client = [r for r in runs if r["clients"] == 1]
    best_single = min((r["p50_ms"] for r in one_client), default=float("nan"))
    most = max(clients)
    return {"benchmark": "serve", "index": str(path), "model": model, "count": count, "device": where, "k": k,
            "threads": threads, "cpu_count": os.cpu_count(), "requests": requests, "warmup": warmup,
            "in_process": baseline, "runs": runs,
            "bar": {"max_p50_ms": BAR_MS, "one_client_p50_ms": best_single, "holds": best_single <= BAR_MS,
                    "errors_at_most_clients": sum(r["errors"] for r in runs if r["clients"] == most),
                    "most_clients": most}}


def report_lines(report: dict[str, Any]) -> list[str]:
    """The printed form of a `bench_serve` report."""
    base = report["in_process"]
    lines = [f"serve bench: {report['index']} — {report['model']}, {report['count']} items, device {report['device']}, "
             f"{report['threads']} torch/faiss threads, {report['cpu_count']} CPUs; composed queries, k={report['k']}, "
             f"{report['requests']} requests per row (after {report['warmup']} warm-up)",
             f"in process (SearchIndex.search, the same queries): p50 {base['p50_ms']:.2f} ms, "
             f"p95 {base['p95_ms']:.2f} ms", ""]
    rows = [["max batch", "clients", "p50 ms", "p95 ms", "p99 ms", "QPS", "errors", "items/forward",
             "p50 / in-process"]]
    rows += [[str(r["max_batch"]), str(r["clients"]), f"{r['p50_ms']:.2f}", f"{r['p95_ms']:.2f}",
              f"{r['p99_ms']:.2f}", f"{r['qps']:.1f}", str(r["errors"]), f"{r['mean_batch_items']:.2f}",
              f"{r['p50_ms'] / base['p50_ms']:.2f}"] for r in report["runs"]]
    lines.append(format_table(rows))
    lines += [f"error (max batch {r['max_batch']}, {r['clients']} clients): {e}"
              for r in report["runs"] for e in r["first_errors"]]
    bar = report["bar"]
    lines += ["", f"one client: p50 {bar['one_client_p50_ms']:.2f} ms (aim ≤ {bar['max_p50_ms']:.0f} ms): "
                  f"{'holds' if bar['holds'] else 'MISSED'}; errors at {bar['most_clients']} clients: "
                  f"{bar['errors_at_most_clients']}"]
    return lines
