"""Encoder families (retrieval/encoders/families.py): the built-in specs, refusals of bad ones, and a fourth family
that an outside package adds through the `retrieval.families` entry point, trained, imported and searched with
through the CLI without a change to the engine."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
from conftest import RETRIEVAL, install_plugin
from safetensors.torch import load_file, save_file

from evaluation.shapesworld import make_shapesworld
from retrieval.encoders.families import CAPABILITIES, families, read_family
from retrieval.encoders.registry import family_class, list_configs, load_encoder
from retrieval.errors import RetrievalError

PLUGIN = {
    "__init__.py": '''
        """A made-up fourth family: test-tiny's model behind an encoder of its own."""
        from retrieval.encoders.test_tiny import TinyTestEncoder


        class QuadEncoder(TinyTestEncoder):
            def __init__(self, config, model, device="cpu", checkpoint=None, tokenizer=None):
                super().__init__(config, model, device, checkpoint)  # bytes in: no tokenizer to keep
    ''',
    "objective.py": '''
        """InfoNCE from query to target over the batch."""
        import torch
        import torch.nn.functional as F

        from retrieval.images import load_image


        class QuadObjective:
            def __init__(self, encoder, pairs, device="cpu", progress=True):
                self.encoder, self.model, self.device = encoder, encoder.model, device

            def side(self, items):
                prepared = [self.encoder.prepare(load_image(i) if i else None, t) for i, t in items]
                batch = {k: v.to(self.device) for k, v in self.encoder.collate(prepared).items()}
                return F.normalize(self.model(**batch), dim=-1)

            def batch(self, pairs, generator):
                return {"query": [p.query for p in pairs], "target": [p.target for p in pairs]}

            def loss(self, batch):
                logits = self.side(batch["query"]) @ self.side(batch["target"]).T / 0.1
                return F.cross_entropy(logits, torch.arange(len(logits), device=logits.device)), {}

            def after_step(self):
                pass

            def save(self, out):
                self.encoder.save(out)
    ''',
    "official.py": '''
        """The "official" layout: the same tensors under a prefix."""
        from dataclasses import replace

        from safetensors.torch import load_file

        from quadlip import QuadEncoder
        from retrieval.encoders.registry import get_config


        def import_quad(source, out, tokenizer=None, prefix="net."):
            state = {k[len(prefix):]: v for k, v in load_file(str(source)).items() if k.startswith(prefix)}
            config = replace(get_config("quad-tiny"), name="quad-imported")
            model = QuadEncoder.build_model(config)
            model.load_state_dict(state, strict=True)
            return QuadEncoder(config, model).save(out)
    ''',
    "family.json": {
        "family": "quad", "description": "a made-up family from a plugin",
        "encoder": "quadlip:QuadEncoder", "objective": "quadlip.objective:QuadObjective",
        "importer": {"function": "quadlip.official:import_quad", "source": "a prefixed safetensors file",
                     "options": {"prefix": {"type": "str", "help": "the key prefix"}}},
    },
    "configs/quad-tiny.json": {"name": "quad-tiny", "family": "quad", "dim": 32, "image_size": 16,
                               "context_length": 48, "model": {"width": 64, "text_width": 32}, "seed": 3},
}


def write_plugin(root: Path) -> dict[str, str]:
    """The `quadlip` package and its dist-info (the entry point) under `root`; the environment that finds it."""
    return install_plugin(root, "quadlip", "quad", PLUGIN)


def cli(env: dict[str, str], *args) -> str:
    proc = subprocess.run([str(RETRIEVAL), *map(str, args)], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, f"retrieval {' '.join(map(str, args))}:\n{proc.stderr}"
    return proc.stdout


def test_built_in_families_declare_what_their_encoders_have():
    found = families()
    assert set(found) == {"test", "fuselip", "sparc", "fdt"}
    assert {name for name, spec in found.items() if spec.objective} == {"fuselip", "sparc", "fdt"}
    assert {name for name, spec in found.items() if spec.importer} == {"fuselip", "fdt"}
    assert {c: sorted(n for n, s in found.items() if c in s.capabilities) for c in CAPABILITIES} == {
        "word_alignment": ["sparc"], "sparse_codes": ["fdt"], "length_groups": ["fuselip"]}
    for spec in found.values():
        spec.encoder_class()  # each declared capability's methods are there
    assert {config.family for config in list_configs().values()} == set(found)


@pytest.mark.parametrize("spec, message", [
    ({"family": "x"}, "family and encoder required"),
    ({"family": "x", "encoder": "os.path"}, "is not a \"module:attribute\" reference"),
    ({"family": "x", "encoder": "a:B", "objective": "a:B; import os"}, "is not a \"module:attribute\""),
    ({"family": "x", "encoder": "a:B", "capabilities": ["telepathy"]}, "unknown capabilities telepathy"),
    ({"family": "x", "encoder": "a:B", "importer": {"function": "a:f", "options": {"t": {"type": "bytes"}}}},
     "importer option 't' needs a type"),
    ({"family": "x", "encoder": "a:B", "extra": 1}, "a family spec has the keys"),
    ({"family": ["x"], "encoder": "a:B"}, "family must be a lower-case name"),
    ({"family": "x", "encoder": "a:B", "description": 5}, "description must be a string"),
    ({"family": "x", "encoder": "a:B", "capabilities": "sparse_codes"}, "capabilities must be a list of names"),
    ({"family": "x", "encoder": "a:B", "importer": {"source": "s"}}, r"importer has the keys function \(required\)"),
    ({"family": "x", "encoder": "a:B", "importer": {"function": "a:f", "options": ["t"]}}, "options must be an object"),
    ({"family": "x", "encoder": "a:B", "importer": {"function": "a:f", "options": {"tokenizer": {"type": "path"}}}},
     "importer option 'tokenizer' must be a lower-case name other than"),
])
def test_bad_family_specs_are_refused(tmp_path, spec, message):
    (tmp_path / "family.json").write_text(json.dumps(spec))
    with pytest.raises(RetrievalError, match=message):
        read_family(tmp_path)


def test_bad_family_json_and_unloadable_classes_are_one_line_errors(tmp_path):
    (tmp_path / "family.json").write_text("{not json")
    with pytest.raises(RetrievalError, match="cannot read .*family.json"):
        read_family(tmp_path)
    for encoder, message in (("json:JSONDecoder", "json:JSONDecoder is not an Encoder class"),
                             ("no_such_module_here:E", "cannot load no_such_module_here:E: No module named")):
        (tmp_path / "family.json").write_text(json.dumps({"family": "x", "encoder": encoder}))
        with pytest.raises(RetrievalError, match=message):
            read_family(tmp_path).encoder_class()


def test_a_broken_plugin_is_named_in_one_line(tmp_path):
    info = tmp_path / "broken-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: broken\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[retrieval.families]\nbroken = no_such_package_at_all\n")
    env = os.environ | {"PYTHONPATH": str(tmp_path)}
    proc = subprocess.run([str(RETRIEVAL), "models", "list"], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        "error: entry point broken = 'no_such_package_at_all' (retrieval.families) is not a package"], proc.stderr


def test_option_assignments_are_parsed_once_each():
    from cli import parse_assignments

    assert parse_assignments(["prefix=", "name=a=b"], "--option") == {"prefix": "", "name": "a=b"}
    for bad, message in ((["temperature"], "takes NAME=VALUE"), (["=1"], "takes NAME=VALUE"),
                         (["t=1", "t=2"], "--option t=… is given twice")):
        with pytest.raises(RetrievalError, match=message):
            parse_assignments(bad, "--option")


def test_a_capability_the_encoder_lacks_is_refused(tmp_path):
    spec = {"family": "x", "encoder": "retrieval.encoders.test_tiny:TinyTestEncoder", "capabilities": ["sparse_codes"]}
    (tmp_path / "family.json").write_text(json.dumps(spec))
    with pytest.raises(RetrievalError, match="declares 'sparse_codes' but .*TinyTestEncoder has no codes, activations"):
        read_family(tmp_path).encoder_class()


def test_features_follow_capabilities_not_families():
    test_tiny = load_encoder("test-tiny", device="cpu")
    assert not test_tiny.supports("word_alignment") and family_class("sparc").fusion_modes
    from retrieval.rerank import check_reranker

    with pytest.raises(RetrievalError, match=r"test-tiny has no word-to-patch alignment, which --rerank needs "
                                             r"\(families with it: sparc\)"):
        check_reranker(test_tiny)


def test_importer_options_are_typed_and_named(capsys):
    fdt = families()["fdt"]
    assert fdt.importer.parse("fdt", {"temperature": "1000"}) == {"temperature": 1000.0}
    with pytest.raises(RetrievalError, match="temperature must be a float"):
        fdt.importer.parse("fdt", {"temperature": "hot"})
    with pytest.raises(RetrievalError, match="the fuselip importer has no option 'temperature'; its options: none"):
        families()["fuselip"].import_checkpoint("x", "y", options={"temperature": "1"})
    with pytest.raises(RetrievalError, match="family 'sparc' has no importer; families with one: fdt, fuselip"):
        families()["sparc"].import_checkpoint("x", "y")


@pytest.mark.slow
def test_a_plugin_family_trains_imports_and_searches_through_the_cli(tmp_path):
    env = write_plugin(tmp_path / "plugins")
    listed = cli(env, "models", "families")
    assert any(line.split()[:3] == ["quad", "yes", "a"] for line in listed.splitlines()), listed
    assert "quad-tiny" in cli(env, "models", "list")

    make_shapesworld(tmp_path / "shapes", n=40, size=16, seed=0, train_pairs=True, progress=False)
    cli(env, "train", "quad-tiny", "--data", tmp_path / "shapes", "--out", tmp_path / "trained", "--steps", "3",
        "--batch-size", "16", "--warmup", "1", "--device", "cpu")
    trained = load_file(str(tmp_path / "trained" / "model.safetensors"))
    save_file({f"v2/{k}": v for k, v in trained.items()}, str(tmp_path / "official.safetensors"))

    cli(env, "models", "import", "quad", tmp_path / "official.safetensors", "--out", tmp_path / "imported",
        "--option", "prefix=v2/")
    imported = load_file(str(tmp_path / "imported" / "model.safetensors"))
    assert imported.keys() == trained.keys() and all((imported[k] == trained[k]).all() for k in trained)

    cli(env, "index", "build", tmp_path / "shapes" / "corpus.jsonl", "--model", tmp_path / "imported",
        "--out", tmp_path / "idx", "--device", "cpu")
    corpus = [json.loads(line) for line in (tmp_path / "shapes" / "corpus.jsonl").read_text().splitlines()]
    item = corpus[7]  # an image with its caption: the same composed query finds it
    hits = json.loads(cli(env, "search", "--index", tmp_path / "idx", "--image", tmp_path / "shapes" / item["image"],
                          "--text", item["text"], "-k", "3", "--json", "--device", "cpu"))
    assert hits[0]["id"] == item["id"] and hits[0]["score"] == pytest.approx(1.0, abs=1e-4)
