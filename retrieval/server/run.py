"""Starting a server: open the indexes and their encoders, warm them, bind the port, and serve until stopped.

The port is bound before uvicorn starts, so `--port 0` takes a free one and the line printed names it; the
server listens only once every index is loaded and warm, so `/healthz` answering means ready.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Callable

from retrieval.errors import RetrievalError, indexer_errors
from retrieval.search import set_threads

MAX_CONNECTIONS = 256  # open at once; beyond, uvicorn answers 503
KEEP_ALIVE_S = 15


LOOPBACK_NAMES = {"localhost", "127.0.0.1", "::1"}
SHUTDOWN_S = 5  # after Ctrl-C or SIGTERM, requests still running get this long


def serve(index_specs: list[str], host: str = "127.0.0.1", port: int = 8000, device: str = "auto",
          threads: int = 1, max_upload: str = "10MB", max_batch: int = 32, allowed_hosts: list[str] = (),
          echo: Callable[[str], None] = print) -> None:
    """Serve the indexes (`DIR` or `NAME=DIR` each) on host:port until interrupted. On loopback it answers only
    requests addressed to a loopback name or one of `allowed_hosts`; elsewhere any name unless some are given."""
    import uvicorn
    from PIL import Image

    from indexers.choose import parse_memory
    from retrieval.server.app import create_app
    from retrieval.server.indexes import open_served, parse_index_specs

    specs = parse_index_specs(index_specs)
    with indexer_errors():
        upload_limit = parse_memory(max_upload)
    if max_batch <= 0:
        raise RetrievalError(f"--max-batch must be at least 1, got {max_batch}")
    sock = bind(host, port)
    set_threads(threads)
    served = open_served(specs, device=device)
    blank = Image.new("RGB", (64, 64), "white")
    for index in served.values():  # the first real query should not pay for lazy set-up (the filter process too)
        index.searcher.search(image=blank, text="warm up", k=1, where="row >= 0")
    bound_host, bound_port = sock.getsockname()[:2]
    names = {name.lower() for name in allowed_hosts}
    allowed = LOOPBACK_NAMES | names if is_loopback(bound_host) else (names | {bound_host} if names else None)
    app = create_app(served, max_upload=upload_limit, max_batch=max_batch, allowed_hosts=allowed)
    config = uvicorn.Config(app, log_level="warning", access_log=False, limit_concurrency=MAX_CONNECTIONS,
                            timeout_keep_alive=KEEP_ALIVE_S, server_header=False,
                            timeout_graceful_shutdown=SHUTDOWN_S)
    where = f"[{bound_host}]" if ":" in bound_host else bound_host
    if not is_loopback(bound_host):
        echo(f"warning: listening on {bound_host}, not loopback: anyone who can reach this port can search these "
             "indexes and read their items and images; there is no authentication (see the README, Serve)")
    echo(f"serving {', '.join(served)} on http://{where}:{bound_port}/ (Ctrl-C stops)")
    uvicorn.Server(config).run(sockets=[sock])


def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket on host:port (port 0: a free one), or one clear error."""
    if not 0 <= port <= 65535:
        raise RetrievalError(f"--port must be 0 to 65535, got {port}")
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(512)
    except socket.gaierror as e:
        raise RetrievalError(f"cannot listen on {host!r}: {e.strerror}") from None
    except OSError as e:
        raise RetrievalError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    sock.set_inheritable(True)
    return sock


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host.split("%")[0]).is_loopback
    except ValueError:
        return False
