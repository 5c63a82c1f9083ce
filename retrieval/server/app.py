"""The HTTP API and the web page over indexes held warm (FastAPI).

GET / (the page) and /static/{file}; GET /healthz; GET /indexes; POST /search; GET /items/{index}/{row} and
/items/{index}/{row}/image. A refusal is a 4xx JSON body `{"error": "one line"}`, and the server serves on.
Query images are decoded and results looked up on worker threads; the model runs on the batcher's thread.
"""

from __future__ import annotations

import asyncio
import logging
import time
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException

from retrieval.errors import RetrievalError, first_line
from retrieval.server.batcher import EncodeBatcher
from retrieval.server.indexes import NotFound, ServedIndex
from retrieval.server.queries import PixelBudget, Query, form_query, json_queries, parse_query, read_upload

STATIC = Path(__file__).with_name("static")
PAGE = {"/": ("index.html", "text/html; charset=utf-8"), "/static/app.js": ("app.js", "text/javascript"),
        "/static/style.css": ("style.css", "text/css")}
# The page loads nothing but its own files and the server's images; no frame may embed it.
PAGE_HEADERS = {"Content-Security-Policy": "default-src 'self'; img-src 'self' blob: data:; object-src 'none'; "
                                           "base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
                "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer", "Cache-Control": "no-cache"}
IMAGE_HEADERS = {"X-Content-Type-Options": "nosniff", "Content-Security-Policy": "default-src 'none'",
                 "Cache-Control": "private, max-age=3600"}
log = logging.getLogger("retrieval.server")


class BodyTooLarge(Exception):
    def __init__(self, limit: int):
        self.limit = limit


class BodyLimit:
    """ASGI middleware: refuse a request body over `limit` bytes, by its Content-Length or as it streams in."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.limit:
            response = too_large(self.limit)
            return await response(scope, receive, send)
        seen = 0

        async def counted():
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.limit:
                raise BodyTooLarge(self.limit)
            return message

        await self.app(scope, counted, send)


class HostCheck:
    """ASGI middleware: answer only requests whose Host is one of `allowed` (None: any), and refuse a request from
    a page of another origin. A server on loopback is otherwise reachable from any web page the user opens, by
    DNS rebinding (a Host of the attacker's name) or by cross-site POSTs."""

    def __init__(self, app, allowed: set[str] | None):
        self.app, self.allowed = app, allowed

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        host = headers.get(b"host", b"").decode("latin-1")
        if self.allowed is not None and host_name(host) not in self.allowed:
            return await error(421, f"this server answers to {', '.join(sorted(self.allowed))}, not {host[:100]!r} "
                                    "(serve --allowed-host adds a name)")(scope, receive, send)
        origin = headers.get(b"origin", b"").decode("latin-1")
        if origin and origin != "null" and urlsplit(origin).netloc.lower() != host.lower():
            return await error(403, "requests from the pages of other sites are refused")(scope, receive, send)
        await self.app(scope, receive, send)


def host_name(host: str) -> str:
    """The name of a Host header, without its port: 'localhost:8000' → 'localhost', '[::1]:80' → '::1'."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[1:].partition("]")[0]
    return host.rpartition(":")[0] if host.count(":") == 1 else host


def too_large(limit: int) -> JSONResponse:
    size = next(f"{limit / 2**p:.4g} {unit}" for p, unit in ((20, "MB"), (10, "KB"), (0, "bytes")) if limit >= 2**p)
    return error(413, f"the request is over the upload limit of {size} (--max-upload)")


def error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


def create_app(indexes: dict[str, ServedIndex], max_upload: int = 10 * 2**20, max_batch: int = 32,
               allowed_hosts: set[str] | None = None) -> FastAPI:
    """The app over indexes already opened; `max_upload`: bytes of one request body; `max_batch`: most query
    items in one model forward; `allowed_hosts`: the Host names it answers to (None: any)."""
    batcher = EncodeBatcher(max_batch)
    names = list(indexes)
    page = {route: ((STATIC / file).read_bytes(), media) for route, (file, media) in PAGE.items()}

    @asynccontextmanager
    async def lifespan(_app: FastAPI):
        yield
        batcher.close()

    app = FastAPI(title="retrieval", lifespan=lifespan, docs_url=None, redoc_url=None)  # their pages load a CDN
    app.add_middleware(BodyLimit, limit=max_upload)
    app.add_middleware(HostCheck, allowed=allowed_hosts)

    @app.exception_handler(RetrievalError)
    async def refused(_request: Request, e: RetrievalError) -> JSONResponse:
        return error(404 if isinstance(e, NotFound) else 400, str(e))

    @app.exception_handler(BodyTooLarge)
    async def over_limit(_request: Request, e: BodyTooLarge) -> JSONResponse:
        return too_large(e.limit)

    @app.exception_handler(HTTPException)
    async def http_error(_request: Request, e: HTTPException) -> JSONResponse:
        return JSONResponse({"error": str(e.detail)}, status_code=e.status_code, headers=e.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(_request: Request, e: RequestValidationError) -> JSONResponse:
        problem = e.errors()[0] if e.errors() else {}
        where = ".".join(str(part) for part in problem.get("loc", ()) if part not in ("path", "query", "body"))
        return error(422, f"{where}: {problem.get('msg', 'invalid value')}" if where else "invalid request")

    @app.exception_handler(Exception)
    async def failed(_request: Request, e: Exception) -> JSONResponse:
        log.exception("request failed")
        return error(500, f"internal error ({type(e).__name__}: {first_line(e)})")

    def page_route(route: str):
        body, media = page[route]

        async def serve_file() -> Response:
            return Response(body, media_type=media, headers=PAGE_HEADERS)

        app.get(route, include_in_schema=False)(serve_file)

    for route in page:
        page_route(route)

    @app.get("/healthz")
    async def healthz() -> dict[str, Any]:
        return {"status": "ok", "indexes": names}

    @app.get("/indexes")
    async def list_indexes() -> dict[str, Any]:
        return {"indexes": [served.describe() for served in indexes.values()]}

    @app.post("/search")
    async def search(request: Request):
        """One query (a JSON object, or a multipart form with an image file) or several (a JSON list)."""
        started = time.perf_counter()
        raws, many = await _read_queries(request)
        queries = await run_in_threadpool(_parse_all, raws, names)
        decoded = time.perf_counter()
        encoders = [_encoder(indexes[q.index], q, i, many) for i, q in enumerate(queries)]
        groups: dict[int, list[int]] = {}
        for i, encoder in enumerate(encoders):
            groups.setdefault(id(encoder), []).append(i)
        futures = {key: batcher.submit(encoders[members[0]], [(queries[i].image, queries[i].text) for i in members])
                   for key, members in groups.items()}
        embedded = dict(zip(futures, await asyncio.gather(*(asyncio.wrap_future(f) for f in futures.values()))))
        results = await run_in_threadpool(_answer_all, queries, groups, embedded, many)
        total = time.perf_counter() - started
        for result in results:
            result["timings_ms"] |= {"decode": _ms(decoded - started), "total": _ms(total)}
        return results if many else results[0]

    async def _read_queries(request: Request) -> tuple[list[dict[str, Any]], bool]:
        media = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if media == "multipart/form-data":
            async with request.form(max_files=1, max_fields=len(Query.__dataclass_fields__),
                                    max_part_size=1 * 2**20) as form:
                return [await read_upload(form_query(form))], False
        if media in ("application/json", ""):
            return json_queries(await request.body())
        raise RetrievalError(f"send the query as application/json or multipart/form-data, not {media!r}")

    def _answer_all(queries: list[Query], groups, embedded, many: bool) -> list[dict[str, Any]]:
        results: list[dict[str, Any] | None] = [None] * len(queries)
        for key, members in groups.items():
            done = embedded[key]
            for position, i in enumerate(members):
                query, served = queries[i], indexes[queries[i].index]
                t0 = time.perf_counter()
                try:
                    hits = served.searcher.search_embedded(done.vectors[position:position + 1], query.text, query.k,
                                                           query.where, query.rerank)
                except RetrievalError as e:
                    raise type(e)(_numbered(e, i, many)) from None
                took = time.perf_counter() - t0
                results[i] = {"index": served.name, "hits": [_hit(served.name, h.to_dict()) for h in hits],
                              "timings_ms": {"queue": _ms(done.queued_s), "encode": _ms(done.encode_s),
                                             "search": _ms(took)}, "batch_items": done.batch_items}
        return results

    @app.get("/items/{index}/{row}")
    def item(index: str, row: int) -> dict[str, Any]:
        return _hit(index, _served(index).item(row))

    @app.get("/items/{index}/{row}/image")
    def item_image(index: str, row: int, size: int | None = None) -> Response:
        body, media = _served(index).image_file(row, size)
        return Response(body, media_type=media, headers=IMAGE_HEADERS)

    def _served(index: str) -> ServedIndex:
        if index not in indexes:
            raise NotFound(f"no index named {index!r}: this server has {', '.join(names)}")
        return indexes[index]

    return app


def _parse_all(raws: list[dict[str, Any]], names: list[str]) -> list[Query]:
    queries, budget = [], PixelBudget()
    for i, raw in enumerate(raws):
        try:
            queries.append(parse_query(raw, names, budget))
        except RetrievalError as e:
            raise RetrievalError(_numbered(e, i, len(raws) > 1)) from None
    return queries


def _encoder(served: ServedIndex, query: Query, i: int, many: bool):
    """The encoder (in the query's fusion mode) that embeds this query; checks that it can re-rank if asked."""
    from retrieval.search import check_rerank

    try:
        encoder = served.searcher.encoder_for(query.fusion)
        check_rerank(query.image, query.text, query.rerank, encoder)
    except RetrievalError as e:
        raise RetrievalError(_numbered(e, i, many)) from None
    return encoder


def _numbered(error: RetrievalError, i: int, many: bool) -> str:
    return f"query {i + 1}: {error}" if many else str(error)


def _hit(index: str, hit: dict[str, Any]) -> dict[str, Any]:
    """A hit (or item) as JSON, with the URL of its image on this server."""
    return hit | {"image_url": f"/items/{index}/{hit['row']}/image" if hit.get("image") else None}


def _ms(seconds: float) -> float:
    return round(seconds * 1000, 3)

