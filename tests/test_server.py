"""`retrieval serve`: the real server in a child process on a loopback port, asked over HTTP.

Every endpoint; the answers equal the engine's in-process answers; each bad input gets a 4xx JSON error and the
server serves on; the `where` sandbox over HTTP; the image route's traversal and symlink refusals; 16 concurrent
queries each get their own answer.
"""

from __future__ import annotations

import base64
import http.client
import io
import json
import os
import socket
import struct
import threading
import zlib
from pathlib import Path

import numpy as np
import pytest
from conftest import run_cli
from PIL import Image

from evaluation.bench.serve import ServerProcess, multipart
from retrieval.search import open_index

UPLOAD_LIMIT = 2**20


def request(port: int, method: str, path: str, body: bytes | None = None, content_type: str | None = None,
            headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    try:
        connection.request(method, path, body, ({"Content-Type": content_type} if content_type else {})
                           | (headers or {}))
        response = connection.getresponse()
        return response.status, dict(response.getheaders()), response.read()
    finally:
        connection.close()


def post_json(port: int, payload, path: str = "/search") -> tuple[int, object]:
    status, _, body = request(port, "POST", path, json.dumps(payload).encode(), "application/json")
    return status, json.loads(body)


def post_form(port: int, fields: dict[str, str], image: bytes | None = None) -> tuple[int, object]:
    body, content_type = multipart(fields, image)
    status, _, answer = request(port, "POST", "/search", body, content_type)
    return status, json.loads(answer)


def png_bytes(image: Image.Image) -> bytes:
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


# ---------------------------------------------------------------------------------------------- fixtures


def write_png(path: Path, colour: tuple[int, int, int]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (24, 24), colour).save(path)


@pytest.fixture(scope="module")
def hostile_corpus(tmp_path_factory) -> Path:
    """A corpus whose store will hold files the image route must refuse: a symlink out of the root (encoded with
    --follow-symlinks), a manifest path outside the root reached through a symlinked folder, and a file swapped
    for a symlink after encoding."""
    base = tmp_path_factory.mktemp("hostile")
    root, outside = base / "root", base / "outside"
    write_png(root / "inside.png", (200, 30, 30))
    write_png(outside / "secret.png", (1, 2, 3))
    write_png(outside / "other.png", (30, 200, 30))
    write_png(root / "swapped.png", (30, 30, 200))
    (root / "link.png").symlink_to(outside / "secret.png")
    (base / "outside-link").symlink_to(outside)
    rows = [{"id": "inside", "image": "inside.png"}, {"id": "link", "image": "link.png"},
            {"id": "other", "image": "../outside/other.png"}, {"id": "via-link", "image": "../outside-link/other.png"},
            {"id": "swapped", "image": "swapped.png"}]
    (root / "corpus.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


@pytest.fixture(scope="module")
def images_manifest(shapes_corpus, tmp_path_factory) -> Path:
    """40 images alone (no texts): an index any late-fusion mode may search."""
    rows = [json.loads(line) for line in shapes_corpus.read_text().splitlines()[:40]]
    out = tmp_path_factory.mktemp("images") / "images.jsonl"
    out.write_text("".join(json.dumps({"id": r["id"], "image": str(shapes_corpus.parent / r["image"])}) + "\n"
                           for r in rows))
    return out


@pytest.fixture(scope="module")
def indexes(shapes_store, hostile_corpus, images_manifest, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("served")
    out = {"tt": root / "tt", "hostile": root / "hostile", "images": root / "images"}
    run_cli("index", "build", shapes_store, "--out", out["tt"])
    run_cli("index", "build", hostile_corpus / "corpus.jsonl", "--model", "test-tiny", "--follow-symlinks",
            "--out", out["hostile"])
    run_cli("index", "build", images_manifest, "--model", "sparc-tiny", "--out", out["images"])
    swapped = hostile_corpus / "swapped.png"
    swapped.unlink()
    swapped.symlink_to(hostile_corpus.parent / "outside" / "secret.png")
    return out


@pytest.fixture(scope="module")
def server(indexes):
    args = [arg for name, folder in indexes.items() for arg in ("--index", f"{name}={folder}")]
    with ServerProcess([*args, "--device", "cpu", "--max-upload", f"{UPLOAD_LIMIT}B"]) as running:
        yield running
    assert running.proc.returncode is not None


@pytest.fixture(scope="module")
def port(server) -> int:
    return server.port


@pytest.fixture(scope="module")
def local(indexes):
    """The same indexes opened in this process: the answers the server must give."""
    return {name: open_index(folder, device="cpu") for name, folder in indexes.items()}


@pytest.fixture(scope="module")
def items(local) -> list[dict]:
    """The tt store's rows that have both an image and a text."""
    rows = local["tt"].metadata.to_pylist()
    return [r for r in rows if r["image"] and r["text"]]


def same_hits(got: list[dict], expected) -> None:
    assert [h["id"] for h in got] == [h.id for h in expected]
    np.testing.assert_allclose([h["score"] for h in got], [h.score for h in expected], atol=1e-4)


# ---------------------------------------------------------------------------------------------- endpoints


def test_healthz_and_indexes(port, local):
    status, _, body = request(port, "GET", "/healthz")
    assert status == 200 and json.loads(body) == {"status": "ok", "indexes": ["tt", "hostile", "images"]}
    described = {i["name"]: i for i in json.loads(request(port, "GET", "/indexes")[2])["indexes"]}
    tt = described["tt"]
    assert tt["count"] == local["tt"].info["count"] and tt["encoder"]["name"] == "test-tiny"
    assert tt["columns"]["split"] == "VARCHAR" and tt["columns"]["n_objects"] == "BIGINT"
    assert tt["fusion_modes"] == [] and tt["index_kind"] == local["tt"].info["factory"]
    assert described["images"]["fusion_modes"] == ["score", "head"]  # images alone: either mode


def test_text_query_matches_the_engine(port, local):
    status, answer = post_json(port, {"text": "a large red circle", "k": 5, "index": "tt"})
    assert status == 200
    same_hits(answer["hits"], local["tt"].search(text="a large red circle", k=5))
    assert set(answer["timings_ms"]) == {"decode", "queue", "encode", "search", "total"}
    hit = answer["hits"][0]
    assert hit["image_url"] == f"/items/tt/{hit['row']}/image" and "split" in hit


def test_composed_upload_and_base64_match_the_engine(port, local, items):
    item = items[7]
    data = Path(item["image"]).read_bytes()
    expected = local["tt"].search(image=item["image"], text="rotate 90 degrees", k=6, where="split = 'test'")
    fields = {"text": "rotate 90 degrees", "k": "6", "where": "split = 'test'"}
    status, answer = post_form(port, fields, data)
    assert status == 200
    same_hits(answer["hits"], expected)
    assert all(h["split"] == "test" for h in answer["hits"])
    for encoded in (base64.b64encode(data).decode(), "data:image/png;base64," + base64.encodebytes(data).decode()):
        status, answer = post_json(port, {"image": encoded, "text": "rotate 90 degrees", "k": 6,
                                          "where": "split = 'test'"})
        assert status == 200
        same_hits(answer["hits"], expected)


def test_a_list_of_queries_is_answered_in_order(port, local, items):
    queries = [{"text": "a small blue square", "k": 3},
               {"image": base64.b64encode(Path(items[1]["image"]).read_bytes()).decode(), "k": 4},
               {"image": base64.b64encode(Path(items[2]["image"]).read_bytes()).decode(), "index": "images",
                "k": 2}]
    status, answers = post_json(port, queries)
    assert status == 200 and [a["index"] for a in answers] == ["tt", "tt", "images"]
    same_hits(answers[0]["hits"], local["tt"].search(text="a small blue square", k=3))
    same_hits(answers[1]["hits"], local["tt"].search(image=items[1]["image"], k=4))
    same_hits(answers[2]["hits"], local["images"].search(image=items[2]["image"], k=2))


def test_fusion_is_chosen_per_query(port, local, items):
    image = Image.open(items[3]["image"])
    data = base64.b64encode(Path(items[3]["image"]).read_bytes()).decode()
    searcher = local["images"]
    for mode in ("head", "score"):
        status, answer = post_json(port, {"image": data, "text": "make it blue", "index": "images", "fusion": mode,
                                          "k": 5})
        assert status == 200
        vector = searcher.encoder_for(mode).encode(images=[image], texts=["make it blue"])
        same_hits(answer["hits"], searcher.search_embedded(vector, k=5))
    head, score = (post_json(port, {"image": data, "text": "make it blue", "index": "images", "fusion": m})[1]
                   for m in ("head", "score"))
    assert [h["score"] for h in head["hits"]] != [h["score"] for h in score["hits"]]


def test_items_and_their_images(port, local):
    status, _, body = request(port, "GET", "/items/tt/5")
    row = local["tt"].metadata.to_pylist()[5]
    item = json.loads(body)
    assert status == 200 and item["id"] == row["id"] and item["text"] == row["text"] and item["row"] == 5
    status, headers, data = request(port, "GET", "/items/tt/5/image")
    assert status == 200 and data == Path(row["image"]).read_bytes() and headers["content-type"] == "image/png"
    assert headers["x-content-type-options"] == "nosniff"
    status, headers, data = request(port, "GET", "/items/tt/5/image?size=16")
    thumb = Image.open(io.BytesIO(data))
    assert status == 200 and thumb.format == "PNG" and max(thumb.size) == 16


def test_the_page_is_served_whole_and_offline(port):
    status, headers, page = request(port, "GET", "/")
    assert status == 200 and b'<script src="/static/app.js"' in page
    assert "default-src 'self'" in headers["content-security-policy"]
    for path in ("/static/app.js", "/static/style.css"):
        status, _, body = request(port, "GET", path)
        assert status == 200 and body
        assert b"http://" not in body and b"https://" not in body  # nothing from a CDN
    assert b"http://" not in page and b"https://" not in page


# ---------------------------------------------------------------------------------------------- bad input


def huge_png() -> bytes:
    """A valid PNG header for a 20000 x 20000 image (400 Mpx) with almost no data: a decompression bomb's shape."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    header = struct.pack(">IIBBBBB", 20000, 20000, 8, 2, 0, 0, 0)
    data = zlib.compress(b"\0" * 100)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", data) + chunk(b"IEND", b"")


def noisy_png() -> bytes:
    return png_bytes(Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)))


BAD_FORMS = {
    "no image and no text": ({"k": "3"}, None, 400, "needs an image, a text"),
    "not an image": ({"text": "x"}, b"just some text, not pixels", 400, "cannot decode image"),
    "truncated image": ({"text": "x"}, noisy_png()[:4000], 400, "cannot decode image"),
    "over the pixel limit": ({}, huge_png(), 400, "image too large"),
    "over the upload limit": ({"text": "x"}, b"\0" * (UPLOAD_LIMIT + 10), 413, "upload limit"),
    "k zero": ({"text": "x", "k": "0"}, None, 400, "k must be a positive integer"),
    "k negative": ({"text": "x", "k": "-3"}, None, 400, "k must be a positive integer"),
    "k absurd": ({"text": "x", "k": "10000000000000000000000"}, None, 400, "k must be at most"),
    "k not a number": ({"text": "x", "k": "ten"}, None, 400, "k must be an integer"),
    "unknown index": ({"text": "x", "index": "nope"}, None, 400, "no index named 'nope'"),
    "bad sql": ({"text": "x", "where": "split = = 'test'"}, None, 400, "invalid --where filter"),
    "unknown column": ({"text": "x", "where": "colour = 'red'"}, None, 400, "invalid --where filter"),
    "early fusion asked for a mode": ({"text": "x", "fusion": "head"}, None, 400, "fuses early"),
    "unknown field": ({"txt": "x"}, None, 400, "unknown query field 'txt'"),
}


def bilevel_png(side: int) -> bytes:
    """A real side × side image of 1-bit pixels: a few KB that decode to side² RGB pixels."""
    out = io.BytesIO()
    Image.new("1", (side, side), 1).save(out, format="PNG")
    return out.getvalue()


def test_one_request_decodes_at_most_64_megapixels_in_all(port):
    image = base64.b64encode(bilevel_png(5000)).decode()  # 25 Mpx: two fit, the third does not
    got, answer = post_json(port, [{"image": image, "k": 1}] * 3)
    assert got == 400 and answer["error"] == "query 3: the images of one request may hold at most 64 megapixels"
    got, answers = post_json(port, [{"image": image, "k": 1}] * 2)
    assert got == 200 and len(answers) == 2


def test_a_page_of_another_site_and_a_rebound_host_are_refused(port):
    for headers, status in (({"Host": "attacker.example:8000"}, 421), ({"Host": f"evil.test:{port}"}, 421),
                            ({"Origin": "http://attacker.example"}, 403),
                            ({"Origin": f"http://localhost:{port}", "Host": f"127.0.0.1:{port}"}, 403)):
        got, _, body = request(port, "GET", "/items/photos/0", headers=headers)
        assert got == status and "error" in json.loads(body), headers
        got, _, _ = request(port, "POST", "/search", json.dumps({"text": "x"}).encode(), "application/json",
                            headers=headers)
        assert got == status
    for host in (f"localhost:{port}", f"127.0.0.1:{port}", f"[::1]:{port}"):  # the page's own requests
        got, _, _ = request(port, "POST", "/search", json.dumps({"text": "a red circle"}).encode(),
                            "application/json", headers={"Host": host, "Origin": f"http://{host}"})
        assert got == 200, host


def test_text_that_is_not_unicode_is_refused(port):
    body = b'[{"text": "ok"}, {"text": "\\ud800 a lone surrogate"}]'
    got, _, answer = request(port, "POST", "/search", body, "application/json")
    assert got == 400 and json.loads(answer)["error"].startswith("query 2: text is not valid text")


@pytest.mark.parametrize("case", list(BAD_FORMS))
def test_bad_input_is_a_4xx_json_error_and_the_server_serves_on(port, case):
    fields, image, status, message = BAD_FORMS[case]
    got, answer = post_form(port, fields, image)
    assert got == status and message in answer["error"] and "\n" not in answer["error"]
    assert request(port, "GET", "/healthz")[0] == 200
    assert post_json(port, {"text": "a red circle", "k": 1})[0] == 200


def test_a_body_over_the_limit_without_a_length_is_cut_off_as_it_streams(port):
    body, content_type = multipart({"text": "x"}, b"\0" * (2 * UPLOAD_LIMIT))
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    try:
        connection.request("POST", "/search", (body[i:i + 65536] for i in range(0, len(body), 65536)),
                           {"Content-Type": content_type}, encode_chunked=True)
        response = connection.getresponse()
        assert response.status == 413 and "upload limit of 1 MB" in json.loads(response.read())["error"]
    finally:
        connection.close()
    assert request(port, "GET", "/healthz")[0] == 200


@pytest.mark.parametrize("body, content_type, message", [
    (b"{not json", "application/json", "not valid JSON"),
    (b"[]", "application/json", "empty list"),
    (json.dumps([{"text": "x"}] * 65).encode(), "application/json", "at most 64 queries"),
    (b'{"text": 5}', "application/json", "text must be a string"),
    (b'{"image": "***"}', "application/json", "not valid base64"),
    (b'[{"text": "x"}, {"text": "y", "k": 0}]', "application/json", "query 2: k must be a positive integer"),
    (b"text=x", "text/plain", "application/json or multipart/form-data"),
])
def test_bad_json_bodies(port, body, content_type, message):
    status, _, answer = request(port, "POST", "/search", body, content_type)
    assert 400 <= status < 500 and message in json.loads(answer)["error"]


def test_where_cannot_read_write_or_reach_out(port, tmp_path):
    leak, db = tmp_path / "leak.csv", tmp_path / "x.db"
    escapes = ["read_csv('/etc/passwd') IS NOT NULL",
               "id IN (SELECT column0 FROM read_csv('/etc/passwd'))",
               f"1=1); COPY (SELECT 1) TO '{leak}'; SELECT (1",
               f"1=1) TO '{leak}' --",
               f"1=1; ATTACH '{db}'",
               "1=1; INSTALL httpfs",
               "1=1; LOAD httpfs",
               "getenv('HOME') IS NOT NULL"]
    for where in escapes:
        status, answer = post_json(port, {"text": "x", "where": where})
        assert status == 400 and "--where filter" in answer["error"], where
    assert not leak.exists() and not db.exists()


def test_items_refuse_bad_rows_and_traversal(port):
    for path in ("/items/tt/-1", "/items/tt/100000", "/items/nope/1", "/items/tt/1/image?size=5000",
                 "/items/tt/abc", "/items/tt/..%2F..%2F..%2Fetc%2Fpasswd/image", "/items/tt/%2e%2e/image",
                 "/items/..%2Ftt/1/image", "/items/tt/1/image/../../../../../etc/passwd",
                 "/items/tt/%2Fetc%2Fpasswd/image", "/items/tt/1%2F..%2F..%2Fetc%2Fpasswd/image"):
        status, _, body = request(port, "GET", path)
        assert 400 <= status < 500, path
        assert "error" in json.loads(body) and b"root:" not in body


def test_the_image_route_serves_only_the_corpus_files(port, local, hostile_corpus):
    rows = {r["id"]: r["row"] for r in local["hostile"].metadata.to_pylist()}
    assert set(rows) == {"inside", "link", "other", "via-link", "swapped"}  # all encoded (--follow-symlinks)
    secret = (hostile_corpus.parent / "outside" / "secret.png").read_bytes()
    status, _, data = request(port, "GET", f"/items/hostile/{rows['inside']}/image")
    assert status == 200 and data == (hostile_corpus / "inside.png").read_bytes()
    for name, reason in (("link", "symlink leads out of the corpus root"),
                         ("swapped", "symlink leads out of the corpus root"),
                         ("via-link", "reached through a symlink")):
        for query in ("", "?size=64"):
            status, _, body = request(port, "GET", f"/items/hostile/{rows[name]}/image{query}")
            assert status == 404 and reason in json.loads(body)["error"] and secret not in body, name
    # a manifest's own path outside its folder is what the store was encoded to read (without --root-only)
    status, _, data = request(port, "GET", f"/items/hostile/{rows['other']}/image")
    assert status == 200 and data == (hostile_corpus.parent / "outside" / "other.png").read_bytes()


# ---------------------------------------------------------------------------------------------- concurrency


def test_sixteen_concurrent_queries_each_get_their_own_answer(port, local, items):
    chosen = items[10:26]
    texts = ["make it red", "a small circle", "rotate", "what colour is the cross?"] * 4
    expected = [local["tt"].search(image=item["image"], text=text, k=5) for item, text in zip(chosen, texts)]
    barrier, answers = threading.Barrier(len(chosen)), [None] * len(chosen)

    def ask(i: int) -> None:
        body, content_type = multipart({"text": texts[i], "k": "5"}, Path(chosen[i]["image"]).read_bytes())
        barrier.wait(60)
        answers[i] = request(port, "POST", "/search", body, content_type)

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(chosen))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    for (status, _, body), want in zip(answers, expected):
        assert status == 200
        same_hits(json.loads(body)["hits"], want)


# ---------------------------------------------------------------------------------------------- the command


def test_serve_refuses_bad_options_with_one_line(indexes, tmp_path):
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen(1)
    try:
        cases = [(["--index", str(tmp_path / "missing")], "not an index folder"),
                 (["--index", f"tt={indexes['tt']}", "--index", f"tt={indexes['images']}"], "two indexes are named"),
                 (["--index", str(indexes["tt"]), "--port", "70000"], "--port must be 0 to 65535"),
                 (["--index", str(indexes["tt"]), "--port", str(taken.getsockname()[1])], "cannot listen on"),
                 (["--index", str(indexes["tt"]), "--max-upload", "lots"], "cannot read memory size"),
                 (["--index", str(indexes["tt"]), "--max-batch", "0"], "--max-batch must be at least 1")]
        for args, message in cases:
            proc = run_cli("serve", *args, check=False, timeout=120)
            assert proc.returncode == 2 and message in proc.stderr, (args, proc.stderr)
            assert len(proc.stderr.strip().splitlines()) == 1
    finally:
        taken.close()


def test_loopback_is_told_apart():
    from retrieval.server.run import is_loopback

    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("127.3.4.5")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.10") and not is_loopback("::")


def test_server_stops_on_sigterm(indexes):
    with ServerProcess(["--index", str(indexes["tt"]), "--device", "cpu"]) as running:
        assert request(running.port, "GET", "/healthz")[0] == 200
    assert running.proc.returncode is not None
    assert os.path.basename(str(indexes["tt"])) in " ".join(running.lines)
