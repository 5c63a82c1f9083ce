"""`where` filters run in a child process with a memory limit, so that no filter can exhaust the searcher.

Some allowed SQL functions grow values without bound (`replace(text, ' ', text)` nested, edit distances over
those), and DuckDB's own memory limit does not cover them. The child holds one copy of the table, sent once
as an Arrow stream, and answers filters one at a time (retrieval.filters.SandboxedTable) under RLIMIT_DATA;
past it DuckDB or Python fails with out-of-memory, which comes back as one error line. A child that dies or
overruns its time is killed and replaced on the next filter. The child exits when its parent goes.

Messages, both ways, are an 8-byte length and a payload: first the table, then for each filter a JSON
request; the answer is JSON (`rows` count, or `error` and whether the child is `exiting`), followed by
the rows as int64 bytes.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import struct
import subprocess
import sys
import threading
import time

import numpy as np

from retrieval.errors import RetrievalError
from retrieval.filters import FILTER_SECONDS

FILTER_MEMORY = 2 * 2**30  # bytes a filter may use beyond the table the child holds
LENGTH = struct.Struct("<Q")


class FilterWorker:
    """Answers `rows(where)` over one Arrow table from a sandboxed child process."""

    def __init__(self, table):
        self.table = table
        self.proc: subprocess.Popen | None = None
        self.lock = threading.Lock()

    def rows(self, where: str, column: str = "row") -> np.ndarray:
        """The values of `column` (int64, ascending) of the rows that satisfy `where`."""
        if not self.lock.acquire(timeout=FILTER_SECONDS):
            raise RetrievalError(f"--where filter not run: other filters have held the filter process for "
                                 f"{FILTER_SECONDS:g} s; try again")
        with _held(self.lock):
            if self.proc is None or self.proc.poll() is not None:
                self._start()
            deadline = time.monotonic() + FILTER_SECONDS + 10
            try:
                _send(self.proc.stdin, json.dumps({"where": where, "column": column}).encode())
                answer = json.loads(_receive(self.proc.stdout.fileno(), deadline))
                rows = b"" if "error" in answer else _receive(self.proc.stdout.fileno(), deadline)
            except (TimeoutError, EOFError, BrokenPipeError) as e:
                self.close()
                what = "took too long" if isinstance(e, TimeoutError) else "needed more memory than a filter may use"
                raise RetrievalError(f"--where filter {what} and was stopped") from None
            except BaseException:  # interrupted mid-answer (Ctrl-C, a caller's timeout): its answer must not be
                self.close()       # read as the next filter's
                raise
            if answer.get("exiting"):
                self.close()
        if "error" in answer:
            raise RetrievalError(answer["error"])
        return np.frombuffer(rows, dtype=np.int64).copy()

    def _start(self) -> None:
        import pyarrow as pa

        limit = FILTER_MEMORY + 2 * self.table.nbytes
        here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # this very package, not one in the cwd
        code = f"import sys; sys.path.insert(0, {here!r}); from retrieval.filter_worker import serve; serve({limit})"
        self.proc = subprocess.Popen([sys.executable, "-I", "-c", code], stdin=subprocess.PIPE,  # -I: no module
                                     stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)  # from the cwd, no PYTHON*
        sink = pa.BufferOutputStream()
        with pa.ipc.new_stream(sink, self.table.schema) as writer:
            writer.write_table(self.table)
        _send(self.proc.stdin, sink.getvalue().to_pybytes())

    def close(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None

    def __del__(self) -> None:
        self.close()


@contextlib.contextmanager
def _held(lock: threading.Lock):
    """Release a lock already acquired when the block ends."""
    try:
        yield
    finally:
        lock.release()


def _send(pipe, payload: bytes) -> None:
    pipe.write(LENGTH.pack(len(payload)) + payload)
    pipe.flush()


def _receive(fd: int, deadline: float | None = None) -> bytes:
    (size,) = LENGTH.unpack(_read_exact(fd, LENGTH.size, deadline))
    return _read_exact(fd, size, deadline)


def _read_exact(fd: int, size: int, deadline: float | None) -> bytes:
    chunks, left = [], size
    while left:
        if deadline is not None and not select.select([fd], [], [], max(0.0, deadline - time.monotonic()))[0]:
            raise TimeoutError
        chunk = os.read(fd, min(left, 1 << 20))
        if not chunk:
            raise EOFError
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def serve(limit: int) -> None:
    """The child: read the table, then answer filters until the parent closes the pipe."""
    import resource

    import pyarrow as pa

    from retrieval.errors import first_line
    from retrieval.filters import SandboxedTable

    resource.setrlimit(resource.RLIMIT_DATA, (limit, limit))
    requests, answers = sys.stdin.buffer.fileno(), os.fdopen(os.dup(sys.stdout.fileno()), "wb")
    sys.stdout = sys.stderr  # nothing else may write into the answers
    try:
        table = SandboxedTable(pa.ipc.open_stream(_receive(requests)).read_all())
        while True:
            request = json.loads(_receive(requests))
            try:
                rows = table.rows(request["where"], request["column"])
            except RetrievalError as e:
                _send(answers, json.dumps({"error": str(e), "exiting": table.spent}).encode())
                if table.spent:
                    return  # stopped mid-filter: the next filter gets a fresh child
                continue
            except MemoryError:
                _send(answers, json.dumps({"error": "--where filter needed more memory than a filter may use and "
                                                    "was stopped", "exiting": True}).encode())
                return
            except Exception as e:  # anything else is the filter's fault too: one line, and a fresh child next
                _send(answers, json.dumps({"error": f"invalid --where filter: {first_line(e)}",
                                           "exiting": True}).encode())
                return
            _send(answers, json.dumps({"rows": len(rows)}).encode())
            _send(answers, rows.astype(np.int64).tobytes())
    except EOFError:
        return

