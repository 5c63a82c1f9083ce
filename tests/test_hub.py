"""Released checkpoints by name (retrieval/hub.py) against a loopback Hugging Face hub: a real http.server answering
the endpoints huggingface_hub calls (`/api/models/{repo}/revision/{rev}`, HEAD/GET `/{repo}/resolve/{rev}/{file}`
with X-Repo-Commit, ETag, Content-Length and Range), serving a reduced random FuseLIP checkpoint in the official
layout and a tiny CLIP BPE. The CLI runs as a subprocess with HF_ENDPOINT, HF_HOME and RETRIEVAL_CACHE pointed at
it and at temporary folders: `models pull` downloads (resuming a cut download) and converts once, and later uses
work offline with the server gone."""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import re
import shutil
import subprocess
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import RETRIEVAL, durability_calls, install_plugin, kill_at, needs_strace
from PIL import Image
from test_fuselip_import import official_config_json, random_official_state, write_clip_bpe

from retrieval.encoders.registry import load_encoder

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CLIP_REPO = "openai/clip-vit-base-patch32"  # the tokenizer repository fuselip's family.json names
TINY = "test/FuseLIP-tiny"


def CUT_AT(size: int) -> int:  # noqa: N802
    """Where a cut body stops: past huggingface_hub's first 10 MB chunk (the reduced weights are ~15 MB), so that
    some bytes reach the file before the connection drops."""
    return size - (1 << 20)


def sha(n: int) -> str:
    return hashlib.sha1(str(n).encode()).hexdigest()


def state_bytes(state) -> bytes:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.getvalue()


def official_files(state=None, config=None) -> dict[str, bytes]:
    return {"config.json": json.dumps(config or official_config_json()).encode(),
            "pytorch_model.bin": state_bytes(random_official_state() if state is None else state),
            "README.md": b"# a reduced random FuseLIP\n"}


def clip_files(tmp: Path) -> dict[str, bytes]:
    tmp.mkdir(parents=True, exist_ok=True)
    write_clip_bpe(tmp)
    return {name: (tmp / name).read_bytes() for name in ("vocab.json", "merges.txt")}


class Hub:
    """A loopback hub: repos[repo] = (commit, {file: bytes}); `cut` files lose their connection half-way through
    the body on their first GET; `log` holds (method, path, Range header) of every request."""

    def __init__(self, repos: dict[str, tuple[str, dict[str, bytes]]], cut: set[str] = frozenset()):
        self.repos, self.cut, self.log, self.down = repos, set(cut), [], False
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_HEAD(self):
                self.answer(body=False)

            def do_GET(self):
                self.answer(body=True)

            def fail(self, code: str):
                self.send_response(404)
                self.send_header("X-Error-Code", code)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def answer(self, body: bool):
                hub.log.append((self.command, self.path, self.headers.get("Range")))
                if hub.down:  # an overloaded hub
                    self.send_response(503)
                    self.send_header("Content-Length", "0")
                    return self.end_headers()
                parts = self.path.split("?")[0].strip("/").split("/")
                if parts[:2] == ["api", "models"] and len(parts) == 6 and parts[4] == "revision":
                    repo = "/".join(parts[2:4])
                    if repo not in hub.repos:
                        return self.fail("RepoNotFound")
                    commit, files = hub.repos[repo]
                    data = json.dumps({"id": repo, "sha": commit,
                                       "siblings": [{"rfilename": name} for name in files]}).encode()
                    self.send_response(200)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    return self.wfile.write(data) if body else None
                if len(parts) < 5 or parts[2] != "resolve" or "/".join(parts[:2]) not in hub.repos:
                    return self.fail("RepoNotFound")
                commit, files = hub.repos["/".join(parts[:2])]
                name = "/".join(parts[4:])
                if name not in files:
                    return self.fail("EntryNotFound")
                data, start = files[name], 0
                wanted = self.headers.get("Range")
                if body and wanted:
                    start = int(wanted.removeprefix("bytes=").split("-")[0])
                self.send_response(206 if start else 200)
                self.send_header("X-Repo-Commit", commit)
                self.send_header("ETag", '"' + hashlib.sha256(data).hexdigest() + '"')
                self.send_header("Accept-Ranges", "bytes")
                self.send_header("Content-Length", str(len(data) - start))
                if start:
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                self.end_headers()
                if not body:
                    return
                if name in hub.cut and not start:
                    hub.cut.discard(name)
                    self.wfile.write(data[:CUT_AT(len(data))])
                    self.wfile.flush()
                    self.close_connection = True
                    return
                self.wfile.write(data[start:])

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def hub_env(tmp: Path, url: str | None = None, offline: bool = False, extra_path: Path | None = None) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING"))}
    env |= {"HF_HOME": str(tmp / "hf"), "RETRIEVAL_CACHE": str(tmp / "cache"), "HF_HUB_DISABLE_TELEMETRY": "1",
            "HF_ENDPOINT": url or "http://127.0.0.1:9", "OMP_NUM_THREADS": "1"}
    if offline:
        env["HF_HUB_OFFLINE"] = "1"
    if extra_path:
        env["PYTHONPATH"] = os.pathsep.join([str(extra_path), os.environ.get("PYTHONPATH", "")])
    return env


def cli(env: dict, *args, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([str(RETRIEVAL), *map(str, args)], capture_output=True, text=True, env=env, timeout=timeout)


def plugin(root: Path) -> Path:
    """An installed family `hubtest` that registers the released name `tiny-hub-s` (FuseLIP's classes and importer,
    the loopback hub's repository): how a registered name is tested without a test entry in the real registry."""
    install_plugin(root, "hubtest", "hubtest", {"__init__.py": "", "family.json": {
        "family": "hubtest", "encoder": "retrieval.encoders.fuselip:FuseLIPEncoder",
        "importer": {"function": "retrieval.encoders.fuselip.official:import_fuselip", "source": "a folder"},
        "pretrained": {"files": ["config.json", "pytorch_model.bin"],
                       "tokenizer": {"repo": CLIP_REPO, "revision": "main", "files": ["vocab.json", "merges.txt"]},
                       "models": {"tiny-hub-s": {"repo": TINY, "dim": 64, "size": "14 MB"}}}}})
    return root


def tiny_corpus(folder: Path) -> Path:
    folder.mkdir(parents=True)
    rows = []
    for i, colour in enumerate(("red", "green", "blue")):
        Image.new("RGB", (40, 30), colour).save(folder / f"{i}.png")
        rows.append({"id": str(i), "image": f"{i}.png", "text": f"a {colour} dog" if i else None})
    rows.append({"id": "t", "text": "the red cat"})
    (folder / "corpus.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder / "corpus.jsonl"


@pytest.fixture(scope="module")
def pulled(tmp_path_factory):
    """`models pull` of hf-hub:test/FuseLIP-tiny (its weights cut half-way the first time) and of the registered
    name tiny-hub-s, through one loopback hub, which is stopped afterwards."""
    tmp = tmp_path_factory.mktemp("hub")
    files = official_files()
    hub = Hub({TINY: (sha(1), files), CLIP_REPO: (sha(2), clip_files(tmp / "clip"))}, cut={"pytorch_model.bin"})
    try:
        env = hub_env(tmp, hub.url)
        first = cli(env, "models", "pull", f"hf-hub:{TINY}")
        log_after_first = list(hub.log)
        plugin_env = hub_env(tmp, hub.url, extra_path=plugin(tmp / "plugins"))
        registered = cli(plugin_env, "models", "pull", "tiny-hub-s")
        again = cli(env, "models", "pull", f"hf-hub:{TINY}")
        listed = cli(plugin_env, "models", "list")
    finally:
        hub.stop()
    official = tmp / "official"
    official.mkdir()
    for name, data in files.items():
        (official / name).write_bytes(data)
    write_clip_bpe(official)
    return {"tmp": tmp, "env": env, "plugin_env": plugin_env, "first": first, "registered": registered,
            "again": again, "listed": listed, "log": log_after_first, "official": official}


@pytest.mark.slow  # the shared pull from the loopback hub takes about 13 s
def test_pull_downloads_and_converts_into_the_cache(pulled):
    assert pulled["first"].returncode == 0, pulled["first"].stderr
    models = pulled["tmp"] / "cache" / "models"
    folder = models / f"hf-hub--test--FuseLIP-tiny@{sha(1)}"
    assert (folder / "config.json").is_file() and (folder / "model.safetensors").is_file()
    assert json.loads((models / "refs" / "hf-hub--test--FuseLIP-tiny@main").read_text()) == {
        "folder": folder.name, "repo": TINY, "revision": "main"}
    # the config is named by its commit, so that an index built with it finds it again
    assert json.loads((folder / "config.json").read_text())["name"] == f"hf-hub:{TINY}@{sha(1)}"
    assert str(folder) in pulled["first"].stdout
    provenance = json.loads((folder / "pulled.json").read_text())
    assert provenance["commit"] == sha(1) and provenance["tokenizer"] == {
        "repo": CLIP_REPO, "revision": "main", "commit": sha(2)}
    assert not [p for p in models.iterdir() if p.name.startswith(".") and ".tmp-" in p.name]


@pytest.mark.slow  # the shared pull from the loopback hub takes about 13 s
def test_a_cut_download_resumes_with_a_range_request(pulled):
    gets = [(path, ranged) for method, path, ranged in pulled["log"]
            if method == "GET" and path.endswith("/pytorch_model.bin")]
    assert len(gets) == 2 and gets[0][1] is None, gets
    start = int(gets[1][1].removeprefix("bytes=").removesuffix("-"))
    assert 0 < start <= CUT_AT(len(official_files()["pytorch_model.bin"]))


@pytest.mark.slow  # a CLI run against the loopback hub
def test_a_registered_name_converts_once_and_pulls_again_without_converting(pulled):
    assert pulled["registered"].returncode == 0, pulled["registered"].stderr
    models = pulled["tmp"] / "cache" / "models"
    folder = models / f"tiny-hub-s@{sha(1)}"
    assert json.loads((folder / "config.json").read_text())["name"] == "tiny-hub-s"
    assert json.loads((models / "refs" / "tiny-hub-s@main").read_text())["folder"] == folder.name
    # a second pull asks the hub, finds the commit converted, and converts nothing
    assert pulled["again"].returncode == 0 and str(models / f"hf-hub--test--FuseLIP-tiny@{sha(1)}") in \
        pulled["again"].stdout
    assert len([p for p in models.iterdir() if p.is_dir() and p.name != "refs"]) == 2
    row = next(line for line in pulled["listed"].stdout.splitlines() if line.startswith("tiny-hub-s "))
    assert f"hf-hub:{TINY}@main" in row and "14 MB" in row and f"cached: {folder}" in row
    fuselip = next(line for line in pulled["listed"].stdout.splitlines() if line.startswith("fuselip-b-cc12m "))
    assert "hf-hub:chs20/FuseLIP-B-CC12M-MM@main" in fuselip and "not cached: retrieval models pull" in fuselip


@pytest.mark.slow  # a CLI run against the loopback hub
def test_later_uses_are_offline_with_the_server_gone(pulled, tmp_path):
    corpus = tiny_corpus(tmp_path / "corpus")
    for env, model in ((pulled["env"], f"hf-hub:{TINY}"), (pulled["plugin_env"], "tiny-hub-s")):
        env = env | {"HF_HUB_OFFLINE": "1"}
        out = tmp_path / model.replace(":", "-").replace("/", "-")
        proc = cli(env, "encode", corpus, "--model", model, "--out", out, "--workers", "0")
        assert proc.returncode == 0, proc.stderr
    # without HF_HUB_OFFLINE too: a cached name never asks the (stopped) hub
    proc = cli(pulled["env"], "encode", corpus, "--model", f"hf-hub:{TINY}", "--out", tmp_path / "again",
               "--workers", "0")
    assert proc.returncode == 0, proc.stderr


@pytest.mark.slow  # a CLI run against the loopback hub
def test_pulled_embeddings_equal_models_import_on_the_same_files(pulled, tmp_path, monkeypatch):
    out = tmp_path / "imported"
    proc = cli(pulled["env"], "models", "import", "fuselip", pulled["official"], "--out", out)
    assert proc.returncode == 0, proc.stderr
    monkeypatch.setenv("RETRIEVAL_CACHE", str(pulled["tmp"] / "cache"))
    pulled_encoder = load_encoder(f"hf-hub:{TINY}", device="cpu")
    imported = load_encoder(out, device="cpu")
    assert pulled_encoder.checkpoint.startswith(str(pulled["tmp"] / "cache" / "models"))
    images = [Image.new("RGB", (40, 30), "red"), None, Image.new("RGB", (20, 50), "blue")]
    texts = ["", "A red cat on the dog!", "the red dog"]
    np.testing.assert_array_equal(pulled_encoder.encode(images=images, texts=texts),
                                  imported.encode(images=images, texts=texts))
    assert pulled_encoder.weights_sha256 == imported.weights_sha256


def one_error_line(proc: subprocess.CompletedProcess) -> str:
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    return lines[0]


@pytest.mark.parametrize("model", ["fuselip-s-cc3m", pytest.param(f"hf-hub:{TINY}@v1", marks=pytest.mark.slow)])
def test_offline_and_not_cached_is_one_line(model, tmp_path):
    corpus = tiny_corpus(tmp_path / "corpus")
    env = hub_env(tmp_path, offline=True)
    for args in (("encode", corpus, "--model", model, "--out", tmp_path / "emb"), ("models", "pull", model)):
        line = one_error_line(cli(env, *args))
        assert model in line and str(tmp_path / "cache" / "models") in line and \
            f"run `retrieval models pull {model}`" in line and "HF_HUB_OFFLINE" in line
    # not offline, but no hub to reach (a closed port): the same line, saying so
    line = one_error_line(cli(hub_env(tmp_path), "models", "pull", model))
    assert "cannot be reached" in line and f"retrieval models pull {model}" in line
    assert not (tmp_path / "cache" / "models").exists() or not [
        p for p in (tmp_path / "cache" / "models").iterdir() if "@" in p.name]


@pytest.mark.slow  # a CLI run against the loopback hub
def test_a_name_not_on_the_hub_says_how_to_import_it(tmp_path):
    line = one_error_line(cli(hub_env(tmp_path), "models", "pull", "fdt-b32-cc3m"))
    assert "not on the Hugging Face hub" in line and "retrieval models import fdt FILE --tokenizer CLIP_BPE_DIR " \
                                                     "--option temperature=1000 --name fdt-b32-cc3m" in line


class Code:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


HOSTILE = {  # repository → (its files, the refusal: a regular expression)
    "test/Readme-only": ({"README.md": b"hi"}, re.escape("not a checkpoint of a known family: fuselip needs "
                                                         "config.json, pytorch_model.bin (missing config.json, "
                                                         "pytorch_model.bin)")),
    "test/No-weights": ({"config.json": b"{}"}, r"fuselip needs .* \(missing pytorch_model.bin\)"),
    "test/A-list": ({"config.json": b"{}", "pytorch_model.bin": state_bytes([1, 2])},
                    "cannot import hf-hub:test/A-list: .*pytorch_model.bin is not a state dict"),
    "test/Code": ({"config.json": b"{}", "pytorch_model.bin": pickle.dumps(Code(), protocol=4)},
                  r"cannot import hf-hub:test/Code: .* holds a pickle of more than tensors, which "
                  r"torch.load\(weights_only=True\) refuses"),
    "test/Wrong-shape": (official_files(state={**random_official_state(), "ln_final.weight": torch.zeros(3)}),
                         r"cannot import hf-hub:test/Wrong-shape: .*wrong shapes: ln_final.weight \(3,\)"),
}


@pytest.mark.slow
@pytest.mark.parametrize("repo", list(HOSTILE))
def test_a_hostile_repository_is_refused_by_name(repo, tmp_path):
    files, message = HOSTILE[repo]
    hub = Hub({repo: (sha(3), files), CLIP_REPO: (sha(2), clip_files(tmp_path / "clip"))})
    try:
        line = one_error_line(cli(hub_env(tmp_path, hub.url), "models", "pull", f"hf-hub:{repo}"))
    finally:
        hub.stop()
    assert re.search(message, line), line
    models = tmp_path / "cache" / "models"
    assert not models.exists() or not [p for p in models.iterdir() if "@" in p.name]


@pytest.mark.slow  # a CLI run against the loopback hub
def test_unknown_family_and_a_commit_id_that_is_a_path_are_refused(tmp_path):
    hub = Hub({"test/Readme-only": (sha(3), {"README.md": b"hi"}), "test/Evil": ("../../../outside", official_files())})
    try:
        env = hub_env(tmp_path, hub.url)
        line = one_error_line(cli(env, "models", "pull", "hf-hub:test/Readme-only"))
        assert "hf-hub:test/Readme-only: test/Readme-only@main is not a checkpoint of a known family: fuselip needs " \
               "config.json, pytorch_model.bin (missing config.json, pytorch_model.bin)" in line
        line = one_error_line(cli(env, "models", "pull", "hf-hub:test/Evil"))
        assert "the hub gave no commit id for test/Evil@main ('../../../outside')" in line
    finally:
        hub.stop()
    assert [method for method, _, _ in hub.log] == ["GET", "GET"]  # two listings; nothing downloaded
    assert not (tmp_path / "cache" / "models").exists()


@pytest.mark.parametrize("bad", ["hf-hub:../etc", "hf-hub:a/b/c", "hf-hub:a/b@../x", "hf-hub:a--b/c", "hf-hub:a/.b",
                                 "hf-hub:a/b@", "hf-hub:a/b@x--y", "hf-hub:a/b@refs//pr", "hf-hub:a/b@refs/",
                                 "hf-hub:a/b@/x", "hf-hub:é/b", "hf-hub:a/b@vé"])
def test_hub_names_that_could_name_a_path_are_refused(bad):
    from retrieval.errors import RetrievalError
    from retrieval.hub import wanted

    with pytest.raises(RetrievalError, match="is not hf-hub:ORG/REPO"):
        wanted(bad)


def test_a_revision_with_slashes_or_dashes_in_the_repository_name_is_one_ref_file():
    from retrieval.hub import wanted

    w = wanted("hf-hub:org/my-model@refs/pr/1")  # the revision of a hub pull request
    assert (w.stem, w.revision, w.ref) == ("hf-hub--org--my-model", "refs/pr/1", "hf-hub--org--my-model@refs--pr--1")
    assert "/" not in w.ref and wanted("hf-hub:org/my-model").ref == "hf-hub--org--my-model@main"


@pytest.mark.slow  # uses the shared pull
def test_the_cache_answers_only_for_the_revision_and_format_it_holds(pulled, tmp_path, monkeypatch):
    from retrieval.hub import cached

    cache = tmp_path / "cache"
    shutil.copytree(pulled["tmp"] / "cache", cache)
    monkeypatch.setenv("RETRIEVAL_CACHE", str(cache))
    folder = cache / "models" / f"hf-hub--test--FuseLIP-tiny@{sha(1)}"
    assert cached(f"hf-hub:{TINY}") == folder
    assert cached(f"hf-hub:{TINY}@{sha(1)}") == folder  # a commit names its folder without a ref
    assert cached(f"hf-hub:{TINY}@v2") is None and cached(f"hf-hub:{TINY}@{sha(9)}") is None
    ref = cache / "models" / "refs" / "hf-hub--test--FuseLIP-tiny@main"
    ref.write_text(json.dumps({"folder": folder.name, "repo": TINY, "revision": "v2"}))
    assert cached(f"hf-hub:{TINY}") is None  # a ref written for another revision is not this one's
    ref.write_text(json.dumps({"folder": "../../etc", "repo": TINY, "revision": "main"}))
    assert cached(f"hf-hub:{TINY}") is None
    ref.write_text(json.dumps({"folder": folder.name, "repo": TINY, "revision": "main"}))
    assert cached(f"hf-hub:{TINY}") == folder
    provenance = json.loads((folder / "pulled.json").read_text())
    (folder / "pulled.json").write_text(json.dumps(provenance | {"format": 1}))
    assert cached(f"hf-hub:{TINY}") is None  # converted by an older version: converted again on the next pull


@pytest.mark.slow  # uses the shared pull
def test_a_pull_with_the_hub_unreachable_keeps_the_cached_copy(pulled):
    proc = cli(pulled["env"], "models", "pull", f"hf-hub:{TINY}")  # the hub is stopped: a closed port
    folder = pulled["tmp"] / "cache" / "models" / f"hf-hub--test--FuseLIP-tiny@{sha(1)}"
    assert proc.returncode == 0, proc.stderr
    assert str(folder) in proc.stdout and "is out of reach; the cached" in proc.stderr


@pytest.mark.slow  # a CLI run against the loopback hub
def test_a_pull_from_a_hub_answering_503_keeps_the_cached_copy(pulled, tmp_path):
    cache = tmp_path / "cache"
    shutil.copytree(pulled["tmp"] / "cache", cache)
    hub = Hub({})
    hub.down = True
    try:
        env = pulled["env"] | {"HF_ENDPOINT": hub.url, "RETRIEVAL_CACHE": str(cache)}
        proc = cli(env, "models", "pull", f"hf-hub:{TINY}")
        line = one_error_line(cli(env | {"RETRIEVAL_CACHE": str(tmp_path / "empty")}, "models", "pull",
                                  f"hf-hub:{TINY}"))
    finally:
        hub.stop()
    assert proc.returncode == 0, proc.stderr
    assert str(cache / "models" / f"hf-hub--test--FuseLIP-tiny@{sha(1)}") in proc.stdout
    assert "is out of reach; the cached" in proc.stderr
    assert "is not in the model cache" in line and "answered 503" in line


@pytest.mark.slow  # CLI runs against the loopback hub
def test_an_index_found_again_by_its_released_name_in_a_moved_cache(pulled, tmp_path):
    """The index records the checkpoint folder; with the cache moved elsewhere, search loads the model by the name
    the index records (the commit it was built with), from the new cache, offline."""
    corpus = tiny_corpus(tmp_path / "corpus")
    env = pulled["env"] | {"HF_HUB_OFFLINE": "1", "RETRIEVAL_CACHE": str(tmp_path / "first")}
    shutil.copytree(pulled["tmp"] / "cache", tmp_path / "first")
    proc = cli(env, "index", "build", corpus, "--model", f"hf-hub:{TINY}", "--out", tmp_path / "idx", "--workers", "0")
    assert proc.returncode == 0, proc.stderr
    shutil.move(tmp_path / "first", tmp_path / "moved")
    proc = cli(env | {"RETRIEVAL_CACHE": str(tmp_path / "moved")}, "search", "--index", tmp_path / "idx",
               "--text", "the red cat", "-k", "4", "--json")
    assert proc.returncode == 0, proc.stderr
    assert sorted(hit["id"] for hit in json.loads(proc.stdout)) == ["0", "1", "2", "t"]


@pytest.mark.slow  # CLI runs against the loopback hub
def test_concurrent_pulls_of_one_model_convert_it_once(tmp_path):
    hub = Hub({TINY: (sha(1), official_files()), CLIP_REPO: (sha(2), clip_files(tmp_path / "clip"))})
    try:
        env = hub_env(tmp_path, hub.url)
        runs = [subprocess.Popen([str(RETRIEVAL), "models", "pull", f"hf-hub:{TINY}"], env=env, text=True,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in range(3)]
        outputs = [run.communicate(timeout=300) for run in runs]
    finally:
        hub.stop()
    assert [run.returncode for run in runs] == [0, 0, 0], [err for _, err in outputs]
    models = tmp_path / "cache" / "models"
    assert [p.name for p in models.iterdir() if "@" in p.name] == [f"hf-hub--test--FuseLIP-tiny@{sha(1)}"]
    assert all(str(models / f"hf-hub--test--FuseLIP-tiny@{sha(1)}") in out for out, _ in outputs)


@pytest.mark.slow  # a CLI run against the loopback hub
def test_a_missing_tokenizer_repository_is_named(tmp_path):
    hub = Hub({TINY: (sha(1), official_files())})  # no CLIP BPE repository
    try:
        line = one_error_line(cli(hub_env(tmp_path, hub.url), "models", "pull", f"hf-hub:{TINY}"))
    finally:
        hub.stop()
    assert f"no repository {CLIP_REPO} on " in line and line.startswith(f"error: hf-hub:{TINY}: ")


@needs_strace
@pytest.mark.slow
def test_a_conversion_killed_before_its_rename_leaves_no_half_folder(tmp_path, monkeypatch):
    """SIGKILL at the rename that moves the converted folder into place: only a dot-named temporary folder is
    left, and no ref, so the name is not cached; the next pull removes the leftover and finishes."""
    hub = Hub({TINY: (sha(1), official_files()), CLIP_REPO: (sha(2), clip_files(tmp_path / "clip"))})
    try:
        env = hub_env(tmp_path, hub.url)
        for key in os.environ:
            if key.startswith(("HF_", "HUGGING")):
                monkeypatch.delenv(key)
        for key, value in env.items():
            monkeypatch.setenv(key, value)  # conftest's strace helpers run the CLI with os.environ
        calls = durability_calls("models", "pull", f"hf-hub:{TINY}", log=tmp_path / "strace.log")
        models = tmp_path / "cache" / "models"
        shutil.rmtree(tmp_path / "cache")
        shutil.rmtree(tmp_path / "hf")
        renames = [call for call in calls if call[0].startswith("rename")]
        killed = kill_at(renames[-2], "models", "pull", f"hf-hub:{TINY}")  # the last rename is the ref's
        assert killed.returncode != 0, killed.stdout
        left = [p.name for p in models.iterdir() if "@" in p.name]
        assert len(left) == 1 and left[0].startswith(f".hf-hub--test--FuseLIP-tiny@{sha(1)}.tmp-"), left
        assert not (models / "refs").exists()
        assert cli(env, "models", "pull", f"hf-hub:{TINY}").returncode == 0
        assert [p.name for p in models.iterdir() if "@" in p.name] == [f"hf-hub--test--FuseLIP-tiny@{sha(1)}"]
    finally:
        hub.stop()


GOOD = {"files": ["config.json"], "models": {"m": {"repo": "o/r"}}}


@pytest.mark.parametrize("pretrained, message", [
    ({"models": {}, "extra": 1}, "pretrained has the keys models"),
    ({**GOOD, "files": ["../config.json"]}, "pretrained files must be a non-empty list of plain file names"),
    ({**GOOD, "tokenizer": {"repo": "o/r", "files": ["v.json"]}}, "pretrained tokenizer has the keys repo"),
    ({**GOOD, "tokenizer": {"repo": "o/../r", "revision": "main", "files": ["v"]}}, "pretrained tokenizer has"),
    ({"models": {"m": {"repo": "o/r"}}}, "repo must be a hub repository ORG/NAME, in a family whose pretrained"),
    ({**GOOD, "models": {"M": {"repo": "o/r"}}}, "pretrained model 'M': a lower-case name"),
    ({**GOOD, "models": {"m": {"repo": "o/r", "source": "s"}}}, "repo: a hub repository, or source"),
    ({**GOOD, "models": {"m": {"repo": "a--b/r"}}}, "repo must be a hub repository"),
    ({**GOOD, "models": {"m": {"repo": "o/r", "revision": "../x"}}}, "revision must be a branch, tag or commit"),
    ({**GOOD, "models": {"m": {"source": "s", "options": {"t": 1}}}}, r"options must be an object of NAME"),
    ({**GOOD, "models": {"m": {"source": "s", "options": {"t": "1"}}}}, "the x importer has no option 't'"),
    ({**GOOD, "models": {"m": {"repo": "o/r", "dim": 0}}}, "dim must be a positive integer"),
    ({**GOOD, "models": {"m": {"repo": "o/r", "size": 5}}}, "source, size and description must be strings"),
])
def test_bad_pretrained_specs_are_refused_field_by_field(pretrained, message, tmp_path):
    from retrieval.encoders.families import read_family
    from retrieval.errors import RetrievalError

    spec = {"family": "x", "encoder": "a:B", "importer": {"function": "a:f"}, "pretrained": pretrained}
    (tmp_path / "family.json").write_text(json.dumps(spec))
    with pytest.raises(RetrievalError, match=message):
        read_family(tmp_path)
    del spec["importer"]
    (tmp_path / "family.json").write_text(json.dumps(spec))
    with pytest.raises(RetrievalError, match="pretrained needs an importer"):
        read_family(tmp_path)


def test_the_released_names_are_registered_as_data():
    from retrieval.encoders.registry import list_configs, list_pretrained

    released = list_pretrained()
    assert {name: (e.family, e.repo, e.dim) for name, e in released.items() if e.repo} == {
        f"fuselip-{s}-{d}": ("fuselip", f"chs20/FuseLIP-{s.upper()}-{d.upper()}-MM", {"s": 384, "b": 512}[s])
        for s in "sb" for d in ("cc3m", "cc12m")}
    assert released["fdt-b32-cc3m"].repo is None and released["fdt-b32-cc3m"].options == {"temperature": "1000"}
    assert not set(released) & set(list_configs())


@pytest.mark.slow  # a CLI run against the loopback hub
def test_an_unknown_released_name_is_one_error_line(tmp_path):
    line = one_error_line(cli(hub_env(tmp_path), "models", "pull", "fuselip-z-cc99m"))
    assert "'fuselip-z-cc99m' is not a released checkpoint; released: " in line and "fuselip-b-cc12m" in line


def test_a_hand_import_under_a_released_name_checks_its_dimension(tmp_path, monkeypatch):
    """`models import fdt FILE --name fdt-b32-cc3m`: a file of another size is refused by name; one of the
    registered 512 dimensions lands in the cache, where the name then finds it offline."""
    from test_fdt_import import random_official_state, save_official

    from retrieval.errors import RetrievalError
    from retrieval.hub import cached, import_named

    monkeypatch.setenv("RETRIEVAL_CACHE", str(tmp_path / "cache"))
    bpe = tmp_path / "clip"
    bpe.mkdir()
    write_clip_bpe(bpe)
    small = save_official(random_official_state(), tmp_path / "small.pth.tar")
    with pytest.raises(RetrievalError, match="gives 32-dimensional embeddings, but fdt-b32-cc3m is registered "
                                             "with 512"):
        import_named("fdt", small, "fdt-b32-cc3m", tokenizer=bpe, options={"temperature": "1000"})
    assert cached("fdt-b32-cc3m") is None
    right = save_official(random_official_state(dim=512), tmp_path / "right.pth.tar")
    folder = import_named("fdt", right, "fdt-b32-cc3m", tokenizer=bpe)  # the registered temperature applies
    assert cached("fdt-b32-cc3m") == folder and folder.name.startswith("fdt-b32-cc3m@import-")
    assert json.loads((folder / "config.json").read_text())["model"]["temperature"] == 1000.0
