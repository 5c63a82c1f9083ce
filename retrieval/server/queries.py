"""A search request's queries, read and checked: a JSON object (or a list of them, with base64 images) or a
multipart form (one query, its image an uploaded file). Every refusal is a RetrievalError with one line."""

from __future__ import annotations

import base64
import binascii
import json
import re
import threading
from dataclasses import dataclass
from typing import Any

from PIL import Image

from retrieval.errors import RetrievalError
from retrieval.images import MAX_IMAGE_PIXELS, ImageReadError, decode_image
from retrieval.search import check_k, check_query, check_rerank

FIELDS = ("index", "image", "text", "k", "where", "fusion", "rerank")
MAX_K = 1000
MAX_QUERIES = 64  # in one request
REQUEST_PIXELS = 64_000_000  # decoded pixels of all the images of one request
QUERY_SIDE = 1024  # a query image is kept at most this large (the encoders read 224 to 256 px)
DECODING = threading.BoundedSemaphore(2)  # images decoded at once: each may briefly take 256 MB


class PixelBudget:
    """What is left of one request's REQUEST_PIXELS."""

    def __init__(self, pixels: int = REQUEST_PIXELS):
        self.left = pixels


@dataclass
class Query:
    index: str
    image: Image.Image | None
    text: str | None
    k: int = 10
    where: str | None = None
    fusion: str | None = None
    rerank: int = 0


def json_queries(body: bytes) -> tuple[list[dict[str, Any]], bool]:
    """The raw queries of a JSON body, and whether it was a list."""
    try:
        value = json.loads(body)
    except (ValueError, RecursionError):
        raise RetrievalError("the request body is not valid JSON") from None
    many = isinstance(value, list)
    queries = value if many else [value]
    if not queries:
        raise RetrievalError("the request holds an empty list of queries")
    if len(queries) > MAX_QUERIES:
        raise RetrievalError(f"a request may hold at most {MAX_QUERIES} queries, not {len(queries)}")
    if not all(isinstance(q, dict) for q in queries):
        raise RetrievalError("a query is a JSON object with an image and/or a text (and k, where, fusion, index)")
    return queries, many


def form_query(form) -> dict[str, Any]:
    """The raw query of a multipart form: text fields, and the image as the bytes of its upload."""
    query: dict[str, Any] = {}
    for key, value in form.multi_items():
        if key in query:
            raise RetrievalError(f"field {key!r} is given twice; one query per form (send a JSON list for several)")
        query[key] = value
    return query


async def read_upload(query: dict[str, Any]) -> dict[str, Any]:
    """The form's uploaded image replaced by its bytes (an empty file field counts as no image)."""
    image = query.get("image")
    if hasattr(image, "read"):
        data = await image.read()
        query = query | {"image": data or None}
    return query


def parse_query(raw: dict[str, Any], indexes: list[str], budget: PixelBudget | None = None) -> Query:
    """A checked query, its image decoded (within `budget`); `indexes` are the names served (the first is the
    default)."""
    unknown = sorted(set(raw) - set(FIELDS))
    if unknown:
        raise RetrievalError(f"unknown query field {unknown[0]!r}: the fields are {', '.join(FIELDS)}")
    index = _text_field(raw, "index") or indexes[0]
    if index not in indexes:
        raise RetrievalError(f"no index named {index!r}: this server has {', '.join(indexes)}")
    image = _image(raw.get("image"), budget or PixelBudget())
    text = _text_field(raw, "text")
    text = check_query(image, text)
    k = _int_field(raw, "k", 10)
    check_k(k)
    if k > MAX_K:
        raise RetrievalError(f"k must be at most {MAX_K}, got {k}")
    rerank = _int_field(raw, "rerank", 0)
    if rerank > MAX_K:
        raise RetrievalError(f"rerank must be at most {MAX_K}, got {rerank}")
    check_rerank(image, text, rerank)
    where = _text_field(raw, "where")
    return Query(index=index, image=image, text=text, k=k, where=where if where and where.strip() else None,
                 fusion=_text_field(raw, "fusion") or None, rerank=rerank)


def _text_field(raw: dict[str, Any], key: str) -> str | None:
    value = raw.get(key)
    if value is not None and not isinstance(value, str):
        raise RetrievalError(f"{key} must be a string, not {_kind(value)}")
    if value is not None and any("\ud800" <= ch <= "\udfff" for ch in value):
        raise RetrievalError(f"{key} is not valid text: it holds a lone UTF-16 surrogate")
    return value


def _int_field(raw: dict[str, Any], key: str, default: int) -> int:
    value = raw.get(key, default)
    if isinstance(value, str):  # a form field
        if not re.fullmatch(r"\s*[+-]?\d{1,40}\s*", value):
            raise RetrievalError(f"{key} must be an integer, got {value[:40]!r}")
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool):
        raise RetrievalError(f"{key} must be an integer, not {_kind(value)}")
    return value


def _image(value: Any, budget: PixelBudget) -> Image.Image | None:
    """A query image from an upload's bytes or a base64 string (optionally a data: URL), decoded within the
    request's pixel budget and kept at most QUERY_SIDE px a side."""
    if value is None or value == "":
        return None
    if isinstance(value, str):
        if value.startswith("data:"):
            head, _, value = value.partition(",")
            if not head.endswith(";base64"):
                raise RetrievalError("an image given as a data: URL must be base64 (data:image/png;base64,...)")
        try:
            value = base64.b64decode("".join(value.split()), validate=True)  # line breaks as `base64` wraps
        except (binascii.Error, ValueError):
            raise RetrievalError("image is not valid base64 (give the file's bytes, base64-encoded)") from None
    if not isinstance(value, bytes):
        raise RetrievalError(f"image must be an uploaded file or a base64 string, not {_kind(value)}")
    over = f"the images of one request may hold at most {REQUEST_PIXELS // 1_000_000} megapixels"
    if budget.left <= 0:
        raise RetrievalError(over)
    limit = min(budget.left, MAX_IMAGE_PIXELS)
    with DECODING:
        try:
            image = decode_image(value, "the uploaded image", max_pixels=limit)
        except ImageReadError as e:
            if limit < MAX_IMAGE_PIXELS and str(e).startswith("image too large:"):
                raise RetrievalError(over) from None
            raise
        budget.left -= image.width * image.height
        image.thumbnail((QUERY_SIDE, QUERY_SIDE), Image.Resampling.BICUBIC)
    return image


def _kind(value: Any) -> str:
    return {dict: "an object", list: "a list", bool: "a boolean", float: "a number", int: "an integer",
            str: "a string"}.get(type(value), type(value).__name__)
