"""FDT (reference: /work/shared/reference/fdt.md §2, §5, §6) on tiny random models.

Sparsemax against a brute-force projection onto the simplex, its gradient against the analytic Jacobian, its
stability; sparsity against the temperature; the padding masks; sparse codes stored by `encode --sparse-codes`
and the embeddings rebuilt from them; the official checkpoint importer on a random state dict in the official
layout (with a forward pass rebuilt by hand from the raw tensors); a few training steps of FDTObjective; the
token explanations of `search --explain`.
"""

from __future__ import annotations

import json
import math
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import run_cli, write_shape_images
from PIL import Image
from test_fuselip_import import write_clip_bpe

from retrieval import RetrievalError
from retrieval.encoders.base import EncoderConfig
from retrieval.encoders.fdt import CODE_COLUMNS, FDTEncoder
from retrieval.encoders.fdt.model import FDT
from retrieval.encoders.fdt.sparsemax import sparsemax
from retrieval.encoders.registry import get_config, load_encoder
from retrieval.text_tokenizer import OWN_IDS, TextTokenizer
from retrieval.training.pairs import Pair

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny models: one thread

CTX = 12
GRID = 4  # 16 px, patch 4
CODEBOOK = 64
TOKENIZERS = "retrieval/checkpoints/tokenizers"


@pytest.fixture(scope="module")
def tok() -> TextTokenizer:
    return TextTokenizer.load(TOKENIZERS, OWN_IDS)


def tiny_config(context_length: int = CTX, **model) -> EncoderConfig:
    base = get_config("fdt-tiny").to_dict()
    small = {"dim": 32, "codebook_size": CODEBOOK, "patch": 4, "vision_width": 32, "vision_layers": 1,
             "vision_heads": 2, "text_width": 32, "text_layers": 1, "text_heads": 2, "mlp_ratio": 2.0,
             "fusion_head": {"layers": 1, "heads": 2}}
    return EncoderConfig.from_dict(base | {"name": "fdt-test", "dim": 32, "image_size": 16,
                                           "context_length": context_length, "checkpoint": None,
                                           "model": base["model"] | small | model})


def tiny_encoder(tok: TextTokenizer, seed: int = 0, fusion_mode: str = "score", **model) -> FDTEncoder:
    config = tiny_config(**model)
    torch.manual_seed(seed)
    return FDTEncoder(config, FDTEncoder.build_model(config), tokenizer=tok, fusion_mode=fusion_mode)


@pytest.fixture(scope="module")
def pictures(tmp_path_factory) -> dict[str, str]:
    """PNG files `<colour>-<shape>` for four colours and two shapes."""
    return write_shape_images(tmp_path_factory.mktemp("fdt-images"))


def cli_in_process(capsys, *args: str | Path) -> tuple[int, str]:
    """`retrieval ARGS` through cli.main in this process (no interpreter start-up): (exit code, stderr)."""
    import cli

    argv = sys.argv
    sys.argv = ["retrieval", *map(str, args)]
    capsys.readouterr()
    try:
        cli.main()
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    finally:
        sys.argv = argv
    return code, capsys.readouterr().err


@pytest.mark.parametrize("change, message", [
    ({"pad_mask": "mean"}, "pad_mask must be one of zero, neg_inf, not 'mean'"),
    ({"temperature": 0.0}, "the FDT temperature must be positive"),
    ({"patch": 5}, "image size 16 is not a multiple of the patch size 5"),
    ({"pool": "max"}, "unknown FDT model keys: pool"),
    ({"dim": 16}, "dim 32 must equal the model's dim 16"),
])
def test_bad_model_configs_are_refused(change, message):
    with pytest.raises(RetrievalError, match=re.escape(message)):
        FDTEncoder.build_model(tiny_config(**change))


# ---------------------------------------------------------------- 1-3. sparsemax


def simplex_projection(a: np.ndarray) -> np.ndarray:
    """argmin ||w − a||² over the simplex, by bisection on τ (Σ max(a − τ, 0) = 1), in float64."""
    a = np.asarray(a, dtype=np.float64)
    lo, hi = a.max() - 1.0, a.max()  # Σ max(a − lo, 0) ≥ 1 ≥ Σ max(a − hi, 0) = 0
    for _ in range(200):
        mid = (lo + hi) / 2
        if np.maximum(a - mid, 0).sum() > 1:
            lo = mid
        else:
            hi = mid
    return np.maximum(a - (lo + hi) / 2, 0)


def simplex_projection_by_support(a: np.ndarray) -> np.ndarray:
    """The same projection for tiny sizes from the KKT conditions, by trying every support S:
    τ = (Σ_S a − 1)/|S| with a_i > τ on S and a_j ≤ τ off S."""
    n = len(a)
    for mask in range(1, 2 ** n):
        support = [i for i in range(n) if mask >> i & 1]
        tau = (sum(a[i] for i in support) - 1) / len(support)
        if all(a[i] > tau for i in support) and all(a[j] <= tau for j in range(n) if j not in support):
            return np.array([a[i] - tau if i in support else 0.0 for i in range(n)])
    raise AssertionError("no support satisfies the KKT conditions")


def _threshold(a: np.ndarray) -> float:
    w = simplex_projection(a)
    i = int(np.argmax(w))
    return float(a[i] - w[i])


@pytest.mark.parametrize("n", [1, 2, 3, 5, 6])
def test_sparsemax_equals_the_projection_found_by_trying_every_support(n):
    gen = torch.Generator().manual_seed(n)
    for scale in (0.1, 1.0, 4.0):
        a = torch.randn(n, generator=gen, dtype=torch.float64) * scale
        expected = simplex_projection_by_support(a.tolist())
        np.testing.assert_allclose(sparsemax(a).numpy(), expected, atol=1e-12)
        np.testing.assert_allclose(simplex_projection(a.numpy()), expected, atol=1e-12)  # the two references agree


@pytest.mark.parametrize("n", [7, 50, 1000])
def test_sparsemax_equals_the_bisection_projection(n):
    gen = torch.Generator().manual_seed(n)
    a = torch.randn(4, n, generator=gen, dtype=torch.float64) * torch.tensor([[0.05], [1.0], [3.0], [20.0]],
                                                                             dtype=torch.float64)
    out = sparsemax(a)
    assert out.dtype == torch.float64 and out.shape == a.shape
    for row, got in zip(a.numpy(), out.numpy()):
        expected = simplex_projection(row)
        np.testing.assert_allclose(got, expected, atol=1e-10)
        assert (got >= 0).all() and got.sum() == pytest.approx(1.0, abs=1e-12)
        tau = _threshold(row)
        clear = np.abs(row - tau) > 1e-9  # entries not on the edge of the support
        assert np.array_equal(got[clear] == 0, expected[clear] == 0)  # exact zeros exactly where projected to 0
    # a spread-out input is mostly exact zeros; a flat one is dense
    spread, flat = out[3].numpy(), out[0].numpy()
    assert (spread == 0).sum() >= 0.8 * n and (spread > 0).sum() >= 1
    if n <= 50:
        assert (flat > 0).sum() >= 0.5 * n


@pytest.mark.parametrize("dim", [0, 1, 2, -1, -2])
def test_sparsemax_along_any_dimension(dim):
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(4, 5, 6, generator=gen, dtype=torch.float64) * 2
    out = sparsemax(x, dim)
    expected = np.apply_along_axis(simplex_projection, dim % 3, x.numpy())
    np.testing.assert_allclose(out.numpy(), expected, atol=1e-10)
    np.testing.assert_allclose(out.sum(dim).numpy(), 1.0, atol=1e-12)
    assert (out >= 0).all() and (out == 0).any()
    two_d = torch.randn(6, 9, generator=gen, dtype=torch.float64) * 2
    for d in (0, 1):
        np.testing.assert_allclose(sparsemax(two_d, d).numpy(),
                                   np.apply_along_axis(simplex_projection, d, two_d.numpy()), atol=1e-10)


def _without_ties(shape: tuple[int, ...], dim: int, seed: int) -> torch.Tensor:
    """A random float64 input whose entries are all at least 1e-3 away from their slice's threshold τ (so the
    support does not change under gradcheck's finite differences)."""
    for s in range(seed, seed + 100):
        x = torch.randn(*shape, generator=torch.Generator().manual_seed(s), dtype=torch.float64) * 1.5
        slices = np.moveaxis(x.numpy(), dim, -1).reshape(-1, shape[dim])
        if all(np.abs(row - _threshold(row)).min() > 1e-3 for row in slices):
            return x
    raise AssertionError("no input without near-ties")


@pytest.mark.parametrize("shape, dim", [((3, 7), -1), ((5, 4), 0), ((2, 6, 3), 1)])
def test_sparsemax_passes_gradcheck(shape, dim):
    x = _without_ties(shape, dim, seed=10).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda t: sparsemax(t, dim), (x,), eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_sparsemax_gradient_is_the_analytic_jacobian(dtype):
    """∂w/∂a = diag(s) − s sᵀ/|S| (s: the support indicator), applied to a random upstream gradient."""
    a = _without_ties((4, 9), -1, seed=20)
    g = torch.randn(4, 9, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    x = a.clone().to(dtype).requires_grad_(True)
    (sparsemax(x) * g.to(dtype)).sum().backward()
    assert x.grad.dtype == dtype
    for row, grad, upstream in zip(a.numpy(), x.grad.double().numpy(), g.numpy()):
        s = (simplex_projection(row) > 0).astype(np.float64)
        jacobian = np.diag(s) - np.outer(s, s) / s.sum()
        np.testing.assert_allclose(grad, jacobian.T @ upstream, atol=1e-12 if dtype == torch.float64 else 1e-6)
        assert (grad[s == 0] == 0).all()  # no gradient reaches the entries outside the support


def test_sparsemax_is_stable_for_huge_inputs():
    gen = torch.Generator().manual_seed(5)
    a = torch.randn(3, 40, generator=gen, dtype=torch.float64)
    expected = np.stack([simplex_projection(r) for r in a.numpy()])
    # float64: a shift of 1e4 changes nothing (τ shifts with it)
    np.testing.assert_allclose(sparsemax(a + 1e4).numpy(), expected, atol=1e-9)
    # float32: multiples of 2⁻⁸ + 1e4 are exact in float32, so the float32 result must match the float64 one
    q = torch.round(a * 256) / 256
    got = sparsemax((q + 1e4).float())
    assert got.dtype == torch.float32
    np.testing.assert_allclose(got.numpy(), np.stack([simplex_projection(r) for r in q.numpy()]), atol=1e-6)
    # 1e30: ties share the mass, entries 2e30 below get none, and nothing overflows
    for dtype in (torch.float64, torch.float32, torch.bfloat16):
        x = torch.tensor([[1e30, 1e30, 0.0, -1e30], [1e30, 1e30, 1e30, 1e30], [-1e30, 1e30, 0.0, 5.0]], dtype=dtype)
        out = sparsemax(x)
        assert out.dtype == dtype and torch.isfinite(out).all()
        torch.testing.assert_close(out.double(), torch.tensor([[0.5, 0.5, 0, 0], [0.25] * 4, [0, 1.0, 0, 0]],
                                                              dtype=torch.float64), atol=0, rtol=0)
        spread = torch.randn(5, 30, generator=gen).to(dtype) * 1e30
        out = sparsemax(spread)
        assert torch.isfinite(out).all()
        assert torch.equal(out.double(), F.one_hot(spread.double().argmax(1), 30).double())


@pytest.mark.parametrize("dtype, atol", [(torch.float16, 1e-3), (torch.bfloat16, 4e-3)])
def test_sparsemax_in_half_precision_matches_float64(dtype, atol):
    gen = torch.Generator().manual_seed(7)
    x = (torch.randn(6, 64, generator=gen) * torch.tensor([[0.02], [0.3], [1.0], [2.0], [5.0], [30.0]])).to(dtype)
    out = sparsemax(x)
    assert out.dtype == dtype and torch.isfinite(out).all() and (out >= 0).all()
    for row, got in zip(x.double().numpy(), out.double().numpy()):  # the reference on the rounded input
        expected = simplex_projection(row)
        np.testing.assert_allclose(got, expected, atol=atol)
        assert got.sum() == pytest.approx(1.0, abs=atol * 8)
        assert np.array_equal(got[expected > 2 * atol] > 0, np.ones(int((expected > 2 * atol).sum()), bool))
        assert (got[expected == 0] == 0).all()  # exact zeros survive the cast
    # values near the float16 maximum: k · z would overflow in float16 without the shift and the float32 compute
    big = torch.tensor([[65504.0, 65504.0, 65472.0, -65504.0], [60000.0, 59999.0, 1.0, 0.0]], dtype=dtype)
    out = sparsemax(big)
    assert torch.isfinite(out).all()
    expected = np.stack([simplex_projection(r) for r in big.double().numpy()])
    np.testing.assert_allclose(out.double().numpy(), expected, atol=atol)


# ---------------------------------------------------------------- 4. sparsity and the temperature


def test_sparsity_grows_as_the_temperature_falls(tok, pictures):
    enc = tiny_encoder(tok, seed=1, codebook_size=128)
    images = [Image.open(p).convert("RGB") for p in pictures.values()]
    texts = ["a red square", "a small blue circle left of a green square", "yellow", "what colour is it?"]
    counts = {}
    for temperature in (100.0, 10.0, 1.0, 0.1):
        enc.model.config.temperature = temperature
        codes = {"image": enc.codes(images=images), "text": enc.codes(texts=texts)}
        for side, code in codes.items():
            assert code.shape == (len(images) if side == "image" else len(texts), 128)
            assert (code >= 0).all()
            torch.testing.assert_close(code.sum(1), torch.ones(len(code)), atol=1e-5, rtol=0)
        counts[temperature] = {side: (code > 0).sum(1) for side, code in codes.items()}
    for side in ("image", "text"):
        active = torch.stack([counts[t][side] for t in (100.0, 10.0, 1.0, 0.1)]).float()  # [T, items]
        assert (active[1:] <= active[:-1]).all(), active  # per item, and so on average
        means = active.mean(1)
        assert means[-1] < means[0], means
        assert means[0] > 64 and means[-1] <= 4, means  # nearly dense at T = 100, a few tokens at T = 0.1


# ---------------------------------------------------------------- 9. padding masks


def _valid_by_hand(row: list[int], eot: int) -> list[bool]:
    first = row.index(eot)
    return [j <= first for j in range(len(row))]


def test_text_valid_ends_at_the_first_eot(tok):
    model = tiny_encoder(tok).model
    ids = torch.tensor([[1, 40, 41, 2, 0, 0], [1, 2, 50, 2, 60, 0], [1, 40, 41, 42, 43, 2]])
    expected = torch.tensor([_valid_by_hand(r, OWN_IDS.eot) for r in ids.tolist()])
    assert torch.equal(model.text_valid(ids), expected)


def test_neg_inf_padding_does_not_change_the_text_code(tok):
    """−∞ masking: padding can never win the max, and the causal tower keeps it out of real positions, so a
    row and the same row with extra trailing padding (pad ids, or any ids after EOT) give the same code."""
    model = tiny_encoder(tok, seed=2, pad_mask="neg_inf", temperature=1.0).model
    short = tok.row("a red square", 8)
    assert short.index(OWN_IDS.eot) == 4
    padded = short + [OWN_IDS.pad] * 4
    junk = short + [tok.pieces("blue")[0], OWN_IDS.sot, 7, OWN_IDS.eot]
    with torch.no_grad():
        emb_short, code_short = model.text_outputs(torch.tensor([short]))
        emb_padded, code_padded = model.text_outputs(torch.tensor([padded, junk]))
        scores = model.scores(model.encode_text(torch.tensor([padded]), model.text_valid(torch.tensor([padded]))),
                              model.txt_query_model, model.text_valid(torch.tensor([padded])))
    for k in range(2):
        torch.testing.assert_close(code_padded[k], code_short[0], atol=1e-6, rtol=0)
        torch.testing.assert_close(emb_padded[k], emb_short[0], atol=1e-6, rtol=0)
    assert torch.isneginf(scores[0, 5:]).all() and torch.isfinite(scores[0, :5]).all()
    # the code is the sparsemax of the max over the five real positions alone
    expected = simplex_projection(scores[0, :5].amax(0).double().numpy())
    np.testing.assert_allclose(code_short[0].numpy(), expected, atol=1e-6)


def test_zero_padding_sets_every_padded_score_to_zero(tok):
    """The official masking: every padded position (after the first EOT, whatever its id) scores exactly 0
    for every token before the max; real positions are left alone."""
    model = tiny_encoder(tok, seed=3, pad_mask="zero").model
    assert model.config.pad_mask == "zero"
    rows = [tok.row("a red square", CTX), tok.row("blue", CTX)[:6] + [tok.pieces("circle")[0], OWN_IDS.eot] + [9] * 4]
    ids = torch.tensor(rows)
    valid = torch.tensor([_valid_by_hand(r, OWN_IDS.eot) for r in rows])
    with torch.no_grad():
        features = model.encode_text(ids, valid)
        scores = model.scores(features, model.txt_query_model, valid)
        unmasked = model.scores(features, model.txt_query_model)
    assert (scores[~valid] == 0).all() and (scores[valid] != 0).all()
    torch.testing.assert_close(scores[valid], unmasked[valid], atol=0, rtol=0)
    assert (unmasked[~valid] != 0).any()  # the padding would score without the mask
    # pooled: the max over the real positions, floored at 0 by the padded zeros (reference §6.2)
    with torch.no_grad():
        code = model.text_outputs(ids)[1]
    for k in range(2):
        pooled = torch.maximum(scores[k][valid[k]].amax(0), torch.zeros(())).double().numpy()
        np.testing.assert_allclose(code[k].numpy(), simplex_projection(pooled), atol=1e-6)


# ---------------------------------------------------------------- 5. sparse codes in the store


@pytest.fixture(scope="module")
def checkpoint(tok, tmp_path_factory) -> Path:
    """A tiny FDT (T = 1, so the codes are sparse) with random weights, saved as a checkpoint folder."""
    return tiny_encoder(tok, seed=4, temperature=1.0).save(tmp_path_factory.mktemp("fdt") / "ckpt")


@pytest.fixture(scope="module")
def manifest(pictures, tmp_path_factory) -> Path:
    """12 items: 4 images alone, 4 texts alone, 4 images with a text."""
    names = list(pictures)
    rows = [{"id": f"img{i}", "image": pictures[names[i]]} for i in range(4)]
    rows += [{"id": f"txt{i}", "text": t} for i, t in enumerate(["a red square", "a green circle", "blue",
                                                                 "a yellow circle left of a red square"])]
    rows += [{"id": f"both{i}", "image": pictures[names[4 + i]], "text": t}
             for i, t in enumerate(["make it red", "make it a square", "what colour is it?", "bigger"])]
    path = tmp_path_factory.mktemp("corpus") / "corpus.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def stores(checkpoint, manifest, tmp_path_factory) -> dict[str, Path]:
    """The manifest encoded with sparse codes in both fusion modes (2 parts of 7 and 5, batches of 4)."""
    out = {}
    for mode in ("score", "head"):
        out[mode] = tmp_path_factory.mktemp(f"store-{mode}") / "store"
        run_cli("encode", manifest, "--model", checkpoint, "--out", out[mode], "--sparse-codes", "--workers", "0",
                "--device", "cpu", "--batch-size", "4", "--part-size", "7", "--fusion", mode)
    return out


def read_rows(store: Path) -> list[dict]:
    import duckdb

    result = duckdb.sql(f"select * from read_parquet('{store}/part-*.parquet') order by row").arrow()
    table = result.read_all() if hasattr(result, "read_all") else result
    return table.to_pylist()


def _dense(ids: list[int] | None, weights: list[float] | None) -> np.ndarray:
    code = np.zeros(CODEBOOK)
    if ids is not None:
        code[ids] = weights
    return code


def _unit(v: np.ndarray) -> np.ndarray:
    return v / np.linalg.norm(v)


def test_stored_codes_rebuild_the_stored_embeddings(stores, checkpoint, manifest):
    rows = {mode: read_rows(store) for mode, store in stores.items()}
    items = [json.loads(line) for line in manifest.read_text().splitlines()]
    enc = load_encoder(checkpoint, device="cpu")
    codebook = enc.model.space_dict.detach().double().numpy()
    empty_code = enc.codes(texts=[""])[0].double().numpy()
    for mode in ("score", "head"):
        assert [r["id"] for r in rows[mode]] == [i["id"] for i in items]
        assert [r["row"] for r in rows[mode]] == list(range(12))
        for row, item in zip(rows[mode], items):
            for side in ("image", "text"):
                ids, weights = row[f"{side}_code_ids"], row[f"{side}_code_weights"]
                if item.get(side) is None:
                    assert ids is None and weights is None, (row["id"], side)
                    continue
                assert len(ids) == len(weights) >= 1 and len(set(ids)) == len(ids)
                assert all(0 <= i < CODEBOOK for i in ids) and all(w > 0 for w in weights)
                assert sum(weights) == pytest.approx(1.0, abs=1e-5)
                # the stored code is the item's code, as `codes` computes it
                code = (enc.codes(images=[item["image"]]) if side == "image" else enc.codes(texts=[item["text"]]))[0]
                np.testing.assert_allclose(_dense(ids, weights), code.numpy(), atol=1e-6)
        assert sum(r["image_code_ids"] is not None and r["text_code_ids"] is not None for r in rows[mode]) == 4
        assert any(len(r["text_code_ids"] or []) < CODEBOOK // 2 for r in rows[mode])  # sparse at T = 1

        # vectors_from_codes: the store's own embeddings, from the codes alone
        enc.fusion_mode = mode
        stored = np.array([r["embedding"] for r in rows[mode]], dtype=np.float64)
        rebuilt = enc.vectors_from_codes(rows[mode])
        assert rebuilt.shape == (12, 32)
        np.testing.assert_allclose(rebuilt.numpy(), stored, atol=1e-5)

    # score mode by hand from the codebook: f = Eᵀw; image alone n(n(f_I) + n(f_empty)); both n(n(f_I) + n(f_T))
    for row in rows["score"]:
        image = _dense(row["image_code_ids"], row["image_code_weights"]) @ codebook
        text = _dense(row["text_code_ids"], row["text_code_weights"]) @ codebook
        if row["image_code_ids"] is None:
            expected = _unit(text)
        else:
            expected = _unit(_unit(image) + _unit(text if row["text_code_ids"] is not None else empty_code @ codebook))
        np.testing.assert_allclose(row["embedding"], expected, atol=1e-5)
    # the modes differ only on items with both an image and a text
    for score_row, head_row in zip(rows["score"], rows["head"]):
        both = score_row["image_code_ids"] is not None and score_row["text_code_ids"] is not None
        close = np.allclose(score_row["embedding"], head_row["embedding"], atol=1e-6)
        assert close != both, score_row["id"]
        for column in CODE_COLUMNS:
            assert score_row[column] == head_row[column]


def test_code_columns_are_not_metadata(stores):
    from retrieval.store import EmbeddingStore

    store = EmbeddingStore(stores["score"])
    assert store.manifest["extra_columns"] == list(CODE_COLUMNS)
    columns = store.metadata().column_names
    assert "id" in columns and not set(CODE_COLUMNS) & set(columns) and "embedding" not in columns
    assert len(store.manifest["parts"]) == 2


def test_sparse_codes_of_a_model_without_codes_are_refused(manifest, tmp_path, capsys):
    code, stderr = cli_in_process(capsys, "encode", manifest, "--model", "test-tiny", "--out", tmp_path / "store",
                                  "--sparse-codes", "--workers", "0", "--device", "cpu")
    assert code == 2 and "Traceback" not in stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and "test-tiny has no sparse codes" in lines[0], stderr
    assert not (tmp_path / "store").exists()


# ---------------------------------------------------------------- 8. activations and --explain


@pytest.mark.parametrize("pad_mask", ["zero", "neg_inf"])
def test_text_activations_are_the_code_the_word_scores_and_the_word_pieces(tok, pad_mask):
    enc = tiny_encoder(tok, seed=5, pad_mask=pad_mask, temperature=1.0)
    model, text = enc.model, "a red square left of blue"
    code, word_scores, labels = enc.activations(text=text)
    assert labels == ["a", "red", "square", "left", "of", "blue"] and len(labels) == len(tok.pieces(text))
    row = tok.row(text, CTX)
    valid = torch.tensor([_valid_by_hand(row, OWN_IDS.eot)])
    with torch.no_grad():
        ids = torch.tensor([row])
        scores = model.scores(model.encode_text(ids, valid), model.txt_query_model, valid)[0]
    real = scores[valid[0]]  # SOT, the words, EOT
    assert len(real) == len(labels) + 2
    pooled = real.amax(0)
    if pad_mask == "zero":  # the padded positions' zeros take part in the max (reference §6.2)
        pooled = torch.maximum(pooled, torch.zeros(()))
    np.testing.assert_allclose(code.numpy(), simplex_projection(pooled.double().numpy()), atol=1e-6)
    torch.testing.assert_close(word_scores, real[1:-1], atol=1e-6, rtol=0)
    assert word_scores.shape == (len(labels), CODEBOOK)
    with torch.no_grad():
        torch.testing.assert_close(code, model.text_outputs(ids)[1][0], atol=1e-6, rtol=0)


def test_image_activations_are_the_code_and_the_patch_scores(tok, pictures):
    enc = tiny_encoder(tok, seed=5, temperature=1.0)
    code, patch_scores, labels = enc.activations(image=pictures["red-square"])
    assert labels == [] and patch_scores.shape == (GRID * GRID, CODEBOOK)
    np.testing.assert_allclose(code.numpy(), simplex_projection(patch_scores.amax(0).double().numpy()), atol=1e-6)
    torch.testing.assert_close(code, enc.codes(images=[pictures["red-square"]])[0], atol=1e-6, rtol=0)


def test_explain_draws_the_strongest_tokens_of_each_hit(stores, tmp_path):
    from retrieval.explain import CELL, LABEL, TOP_TOKENS
    from retrieval.indexing import build_index_folder

    index = tmp_path / "idx"
    build_index_folder(stores["score"], index, device="cpu", progress=False)
    out = tmp_path / "explain.png"
    k = 4
    proc = run_cli("search", "--index", index, "--text", "a red square", "-k", str(k), "--json", "--device", "cpu",
                   "--explain", out)
    hits = json.loads(proc.stdout)
    assert len(hits) == k
    with Image.open(out) as sheet:
        assert sheet.format == "PNG"
        assert sheet.size == (CELL * (TOP_TOKENS + 1), (CELL + 2 * LABEL) * k)
        pixels = np.asarray(sheet.convert("RGB"))
    for i, hit in enumerate(hits):  # an image hit: its picture, then the heatmap of its strongest token
        top = i * (CELL + 2 * LABEL)
        first_token = pixels[top:top + CELL, CELL:2 * CELL]
        assert (first_token != 255).any() == bool(hit.get("image")), hit


# ---------------------------------------------------------------- 7. training


def make_pairs(paths: dict[str, str]) -> list[Pair]:
    def pair(group, qi, qt, ti, tt):
        return Pair(group=group, task="t", query_image=qi, query_text=qt, target_image=ti, target_text=tt)

    captions = [pair(f"cap{i}", paths[name], None, None, f"a {name.replace('-', ' ')}")
                for i, name in enumerate(["red-square", "green-circle", "blue-square", "yellow-circle",
                                          "blue-circle", "green-square"])]
    composed = [pair("edit0", paths["red-square"], "make it blue", paths["blue-square"], None),
                pair("edit1", paths["green-circle"], "make it yellow", paths["yellow-circle"], None),
                pair("edit2", paths["blue-square"], "make it a circle", paths["blue-circle"], None),
                pair("edit3", paths["yellow-circle"], "make it green", paths["green-circle"], None),
                pair("edit4", paths["green-square"], "make it red", paths["red-square"], None)]
    vqa = [pair("vqa", paths["red-square"], "what colour is the square?", None, "red")]
    return captions + composed + vqa


def test_a_few_steps_lower_the_loss_on_a_fixed_batch(tok, pictures):
    from retrieval.training.fdt import FDTObjective
    from retrieval.training.loop import TrainConfig, make_optimizer
    from retrieval.training.run import objective_for

    torch.manual_seed(0)
    enc = tiny_encoder(tok, seed=6)
    pairs = make_pairs(pictures)
    objective = objective_for(enc, pairs, "cpu", False)
    assert isinstance(objective, FDTObjective)
    batch = objective.batch(pairs, torch.Generator().manual_seed(0))
    model = objective.model.train()
    conv = model.visual.conv1.weight
    assert not conv.requires_grad
    conv_before, codebook_before = conv.detach().clone(), model.space_dict.detach().clone()
    optimizer = make_optimizer(model, TrainConfig(lr=3e-3, weight_decay=0.01))
    assert all(p is not conv for group in optimizer.param_groups for p in group["params"])
    losses, logs_seen = [], []
    for _ in range(15):
        loss, logs = objective.loss(batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        objective.after_step()
        assert 3.0 <= model.logit_scale.item() <= 6.0
        losses.append(loss.item())
        logs_seen.append(logs)
    assert all(math.isfinite(v) for v in losses)
    for key in ("global", "fused", "head", "active_image", "active_text"):
        assert key in logs_seen[0] and key in logs_seen[-1], logs_seen[0]
    for logs in logs_seen:
        assert 1 <= logs["active_image"] <= CODEBOOK and 1 <= logs["active_text"] <= CODEBOOK
    assert losses[-1] < 0.6 * losses[0], losses  # about 0.37 on this seed
    assert torch.equal(conv.detach(), conv_before) and conv.grad is None
    assert not torch.equal(model.space_dict.detach(), codebook_before)
    # the logged active counts are the mean numbers of non-zero code entries over the batch's images and texts
    with torch.no_grad():
        _, logs = objective.loss(batch)
        image_codes = model.image_outputs(batch["pixels"])[1]
        text_codes = model.text_outputs(batch["text"])[1]
    assert logs["active_image"] == pytest.approx(float((image_codes > 0).sum(1).float().mean()))
    assert logs["active_text"] == pytest.approx(float((text_codes > 0).sum(1).float().mean()))


# ---------------------------------------------------------------- 6. the official checkpoint importer

V_W, V_LAYERS, PATCH, IMAGE = 64, 2, 32, 64
T_W, T_LAYERS, OFF_CTX = 64, 2, 16
OFF_C, OFF_D = 64, 32
FDT_VOCAB = 49409
SOT, EOT, MASK = 49407, 49408, 49406
UNTRAINED_KEYS = ("visual.ln_post.weight", "visual.ln_post.bias", "visual.proj", "encode_text.text_projection.weight",
                  "encode_text.text_projection.bias", "logit_scale_sd")


def official_shapes(vision_width: int, vision_layers: int, patch: int, image: int, text_width: int,
                    text_layers: int, context: int, codebook: int, dim: int, vocab: int) -> dict[str, tuple[int, ...]]:
    """The official FDT state-dict keys (without `module.`) and shapes of reference §5."""
    shapes: dict[str, tuple[int, ...]] = {"space_dict": (codebook, dim), "logit_scale": (1,), "logit_scale_sd": (1,)}

    def block(prefix: str, w: int) -> None:
        shapes.update({
            prefix + "attn.in_proj_weight": (3 * w, w), prefix + "attn.in_proj_bias": (3 * w,),
            prefix + "attn.out_proj.weight": (w, w), prefix + "attn.out_proj.bias": (w,),
            prefix + "ln_1.weight": (w,), prefix + "ln_1.bias": (w,),
            prefix + "mlp.c_fc.weight": (4 * w, w), prefix + "mlp.c_fc.bias": (4 * w,),
            prefix + "mlp.c_proj.weight": (w, 4 * w), prefix + "mlp.c_proj.bias": (w,),
            prefix + "ln_2.weight": (w,), prefix + "ln_2.bias": (w,),
        })

    v = vision_width
    shapes.update({"visual.conv1.weight": (v, 3, patch, patch), "visual.class_embedding": (v,),
                   "visual.positional_embedding": ((image // patch) ** 2 + 1, v),
                   "visual.ln_pre.weight": (v,), "visual.ln_pre.bias": (v,)})
    for i in range(vision_layers):
        block(f"visual.transformer.resblocks.{i}.", v)
    shapes.update({"visual.ln_post.weight": (v,), "visual.ln_post.bias": (v,), "visual.proj": (v, dim)})
    t = text_width
    shapes.update({"encode_text.token_embedding.weight": (vocab, t), "encode_text.positional_embedding": (context, t)})
    for i in range(text_layers):
        block(f"encode_text.transformer.resblocks.{i}.", t)
    shapes.update({"encode_text.ln_final.weight": (t,), "encode_text.ln_final.bias": (t,),
                   "encode_text.text_projection.weight": (dim, t), "encode_text.text_projection.bias": (dim,)})
    for side, width in (("img", v), ("txt", t)):
        q = f"{side}_query_model.q_map."
        shapes.update({q + "0.weight": (width,), q + "0.bias": (width,), q + "1.weight": (dim, width),
                       q + "1.bias": (dim,), q + "3.weight": (dim,), q + "3.bias": (dim,), q + "4.weight": (dim, dim),
                       q + "4.bias": (dim,)})
    return shapes


def test_official_key_table_matches_the_reference_counts():
    """§5: the released ViT-B/32 model has 321 tensors, 160.85 M parameters, 8.39 M of them the codebook."""
    shapes = official_shapes(768, 12, 32, 224, 512, 12, 77, 16384, 512, FDT_VOCAB)
    assert len(shapes) == 321
    assert round(sum(math.prod(s) for s in shapes.values()) / 1e6, 2) == 160.85
    assert round(math.prod(shapes["space_dict"]) / 1e6, 2) == 8.39
    assert shapes["visual.positional_embedding"] == (50, 768) and shapes["visual.proj"] == (768, 512)


def random_official_state(seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    shapes = official_shapes(V_W, V_LAYERS, PATCH, IMAGE, T_W, T_LAYERS, OFF_CTX, OFF_C, OFF_D, FDT_VOCAB)
    state = {}
    for key, shape in shapes.items():
        if key in ("logit_scale", "logit_scale_sd"):
            state[key] = torch.tensor([math.log(1 / 0.07)])
        elif key.endswith(("ln_1.weight", "ln_2.weight", "ln_pre.weight", "ln_post.weight", "ln_final.weight",
                           "q_map.0.weight", "q_map.3.weight")):
            state[key] = 1.0 + 0.2 * torch.randn(shape, generator=gen)
        elif key.endswith("bias"):
            state[key] = 0.1 * torch.randn(shape, generator=gen)
        elif key == "space_dict":
            state[key] = torch.randn(shape, generator=gen)
        elif len(shape) >= 2 and "embedding" not in key:
            state[key] = torch.randn(shape, generator=gen) / math.sqrt(math.prod(shape[1:]))
        else:  # token, positional and class embeddings
            state[key] = 0.5 * torch.randn(shape, generator=gen)
    assert all(tuple(state[k].shape) == shapes[k] for k in shapes)
    return state


def save_official(state: dict[str, torch.Tensor], path: Path) -> Path:
    torch.save({"model": {"module." + k: v for k, v in state.items()}, "optimizer": {}, "last_iter": 3}, path)
    return path


@pytest.fixture(scope="module")
def official(tmp_path_factory):
    """A random official-layout checkpoint beside a tiny CLIP BPE, imported with `retrieval models import`."""
    folder = tmp_path_factory.mktemp("official")
    state = random_official_state()
    path = save_official(state, folder / "ckpt_3.pth.tar")
    vocab = write_clip_bpe(folder)
    out = tmp_path_factory.mktemp("imported") / "fdt"
    proc = run_cli("models", "import", "fdt", path, "--out", out, "--temperature", "1000")
    assert str(out) in proc.stdout
    return {"folder": folder, "path": path, "out": out, "state": state, "vocab": vocab}


def test_import_config_ids_and_tensors(official):
    from safetensors.torch import load_file

    out, state, vocab = official["out"], official["state"], official["vocab"]
    config = json.loads((out / "config.json").read_text())
    assert config["family"] == "fdt" and config["dim"] == OFF_D
    assert (config["image_size"], config["context_length"]) == (IMAGE, OFF_CTX)
    assert tuple(config["mean"]) == (0.485, 0.456, 0.406) and tuple(config["std"]) == (0.229, 0.224, 0.225)
    model = config["model"]
    expected = {"dim": OFF_D, "codebook_size": OFF_C, "temperature": 1000.0, "patch": PATCH, "vision_width": V_W,
                "vision_layers": V_LAYERS, "vision_heads": 1, "text_vocab": FDT_VOCAB, "text_width": T_W,
                "text_layers": T_LAYERS, "text_heads": 1, "pad_mask": "zero", "text_causal": True,
                "fusion_head": None}
    assert {k: model[k] for k in expected} == expected
    assert model["special_ids"] == {"sot": SOT, "eot": EOT, "pad": 0, "mask": MASK}

    saved = load_file(str(out / "model.safetensors"))
    assert set(saved) == set(state) - set(UNTRAINED_KEYS)
    for key, tensor in saved.items():
        assert torch.equal(tensor.reshape(state[key].shape), state[key]), key

    enc = load_encoder(out, device="cpu")
    assert enc.tokenizer.vocab_size == FDT_VOCAB
    assert enc.tokenizer.row("red cat", 8) == [SOT, vocab["red</w>"], vocab["cat</w>"], EOT, 0, 0, 0, 0]
    assert enc.model.config.temperature == 1000.0


def test_import_save_load_round_trip(official, tmp_path):
    enc = load_encoder(official["out"], device="cpu")
    again = load_encoder(enc.save(tmp_path / "again"), device="cpu")
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (IMAGE, IMAGE, 3), dtype=np.uint8))
    texts = ["red cat", "the dog on the cat", ""]
    assert np.array_equal(enc.encode(texts=texts), again.encode(texts=texts))
    assert np.array_equal(enc.encode(images=[image]), again.encode(images=[image]))
    both = {"images": [image], "texts": ["red dog"]}
    assert np.array_equal(enc.encode(**both), again.encode(**both))
    assert torch.equal(enc.codes(texts=texts), again.codes(texts=texts))


def _layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + 1e-5) * weight + bias


def _exact_gelu(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * x * (1 + torch.erf(x / math.sqrt(2)))


def _quick_gelu(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(1.702 * x)


def _block_by_hand(x: torch.Tensor, sd: dict[str, torch.Tensor], prefix: str, heads: int, causal: bool,
                   act) -> torch.Tensor:
    """One CLIP residual block on x [L, W]: x + attn(ln_1(x)), then x + c_proj(act(c_fc(ln_2(x))))."""
    length, width = x.shape
    h = _layer_norm(x, sd[prefix + "ln_1.weight"], sd[prefix + "ln_1.bias"])
    q, k, v = (h @ sd[prefix + "attn.in_proj_weight"].T + sd[prefix + "attn.in_proj_bias"]).split(width, -1)
    size = width // heads
    out = torch.zeros_like(x)
    for head in range(heads):
        cols = slice(head * size, (head + 1) * size)
        logits = q[:, cols] @ k[:, cols].T / math.sqrt(size)
        if causal:
            logits = logits.masked_fill(torch.ones(length, length).triu(1).bool(), float("-inf"))
        out[:, cols] = logits.softmax(-1) @ v[:, cols]
    x = x + out @ sd[prefix + "attn.out_proj.weight"].T + sd[prefix + "attn.out_proj.bias"]
    h = _layer_norm(x, sd[prefix + "ln_2.weight"], sd[prefix + "ln_2.bias"])
    h = act(h @ sd[prefix + "mlp.c_fc.weight"].T + sd[prefix + "mlp.c_fc.bias"])
    return x + h @ sd[prefix + "mlp.c_proj.weight"].T + sd[prefix + "mlp.c_proj.bias"]


def _fdt_by_hand(features: torch.Tensor, sd: dict[str, torch.Tensor], side: str, real: torch.Tensor | None,
                 temperature: float) -> tuple[np.ndarray, np.ndarray]:
    """q_map → codebook / √d → padded scores set to 0 → / T → max over positions → sparsemax; (Eᵀw, w)."""
    q = f"{side}_query_model.q_map."
    x = _layer_norm(features, sd[q + "0.weight"], sd[q + "0.bias"])
    x = _exact_gelu(x @ sd[q + "1.weight"].T + sd[q + "1.bias"])  # the query map's GELU is nn.GELU
    x = _layer_norm(x, sd[q + "3.weight"], sd[q + "3.bias"])
    x = x @ sd[q + "4.weight"].T + sd[q + "4.bias"]
    scores = x @ sd["space_dict"].T / math.sqrt(sd["space_dict"].shape[1])
    if real is not None:
        scores = scores * real[:, None].double()
    w = simplex_projection((scores / temperature).amax(0).numpy())
    return w @ sd["space_dict"].numpy(), w


def official_text_by_hand(sd: dict[str, torch.Tensor], ids: list[int], temperature: float, act):
    x = sd["encode_text.token_embedding.weight"][ids] + sd["encode_text.positional_embedding"][: len(ids)]
    for i in range(T_LAYERS):
        x = _block_by_hand(x, sd, f"encode_text.transformer.resblocks.{i}.", T_W // 64, True, act)
    x = _layer_norm(x, sd["encode_text.ln_final.weight"], sd["encode_text.ln_final.bias"])
    first_eot = ids.index(EOT)
    real = torch.tensor([j <= first_eot for j in range(len(ids))])
    return _fdt_by_hand(x, sd, "txt", real, temperature)


def official_image_by_hand(sd: dict[str, torch.Tensor], pixels: torch.Tensor, temperature: float, act):
    """pixels [3, H, W] → conv1 as a matmul over row-major patches → CLS + positions → ln_pre → blocks → patch
    outputs before ln_post, CLS dropped."""
    grid = pixels.shape[-1] // PATCH
    patches = pixels.reshape(3, grid, PATCH, grid, PATCH).permute(1, 3, 0, 2, 4).reshape(grid * grid, -1)
    x = patches @ sd["visual.conv1.weight"].reshape(V_W, -1).T
    x = torch.cat([sd["visual.class_embedding"][None], x]) + sd["visual.positional_embedding"]
    x = _layer_norm(x, sd["visual.ln_pre.weight"], sd["visual.ln_pre.bias"])
    for i in range(V_LAYERS):
        x = _block_by_hand(x, sd, f"visual.transformer.resblocks.{i}.", V_W // 64, False, act)
    return _fdt_by_hand(x[1:], sd, "img", None, temperature)


def _compare_with_official_forward(official, act) -> None:
    sd = {k: v.double() for k, v in official["state"].items()}
    enc = load_encoder(official["out"], device="cpu")
    ids = enc.tokenizer.row("the red cat on the dog", OFF_CTX)
    assert ids[0] == SOT and ids.index(EOT) == 7 and ids[8:] == [0] * 8
    pixels = torch.randn(1, 3, IMAGE, IMAGE, generator=torch.Generator().manual_seed(3))
    # the imported T = 1000 (every code nearly uniform, so tight tolerances), and T = 10 (sparse codes)
    for temperature, atol in ((1000.0, 2e-6), (10.0, 2e-5)):
        enc.model.config.temperature = temperature
        with torch.no_grad():
            text_emb, text_code = enc.model.text_outputs(torch.tensor([ids]))
            image_emb, image_code = enc.model.image_outputs(pixels)
        want_text_emb, want_text_code = official_text_by_hand(sd, ids, temperature, act)
        want_image_emb, want_image_code = official_image_by_hand(sd, pixels[0].double(), temperature, act)
        if temperature == 10.0:
            assert 1 < (want_text_code > 0).sum() < OFF_C // 2 and 1 < (want_image_code > 0).sum() < OFF_C // 2
        np.testing.assert_allclose(text_code[0].numpy(), want_text_code, atol=atol)
        np.testing.assert_allclose(text_emb[0].numpy(), want_text_emb, atol=atol)
        np.testing.assert_allclose(image_code[0].numpy(), want_image_code, atol=atol)
        np.testing.assert_allclose(image_emb[0].numpy(), want_image_emb, atol=atol)


def test_imported_model_computes_the_official_forward(official):
    """The hand computation from the raw official tensors: causal text tower and ViT patches before ln_post with
    QuickGELU blocks (the official CLIP blocks), q_map, codebook / √d, zero padding, / T, max, sparsemax, Eᵀw."""
    _compare_with_official_forward(official, _quick_gelu)


def test_the_exact_gelu_would_not_match_the_official_forward(official):
    """The activation matters: with exact-GELU blocks the hand computation no longer matches the import."""
    with pytest.raises(AssertionError):
        _compare_with_official_forward(official, _exact_gelu)


def _broken(state: dict[str, torch.Tensor], case: str) -> dict[str, torch.Tensor]:
    state = dict(state)
    if case == "missing_untrained":
        del state["visual.proj"]
    elif case == "missing_block_key":
        del state["encode_text.transformer.resblocks.1.mlp.c_proj.bias"]
    elif case == "unexpected":
        state["visual.extra_head.weight"] = torch.zeros(3)
    elif case == "shape":
        state["txt_query_model.q_map.4.weight"] = torch.zeros(OFF_D, OFF_D - 1)
    elif case == "vocab":
        state["encode_text.token_embedding.weight"] = state["encode_text.token_embedding.weight"][:49408]
    return state


@pytest.mark.parametrize("case, message", [
    ("missing_untrained", "missing keys: visual.proj"),
    ("missing_block_key", "missing keys: encode_text.transformer.resblocks.1.mlp.c_proj.bias"),
    ("unexpected", "unexpected keys: visual.extra_head.weight"),
    ("shape", "txt_query_model.q_map.4.weight (32, 31) (expected (32, 32))"),
    ("vocab", "encode_text.token_embedding has 49408 rows"),
    ("no_temperature", "give --temperature"),
])
def test_import_refusals_name_the_problem(official, tmp_path, capsys, case, message):
    path = save_official(_broken(official["state"], case), tmp_path / "ckpt_3.pth.tar")
    write_clip_bpe(tmp_path)
    out = tmp_path / "out"
    temperature = [] if case == "no_temperature" else ["--temperature", "1000"]
    code, stderr = cli_in_process(capsys, "models", "import", "fdt", path, "--out", out, *temperature)
    assert code == 2 and message in stderr and "Traceback" not in stderr, stderr
    assert len(stderr.strip().splitlines()) == 1
    assert not out.exists()


def test_fdt_model_is_a_dual_encoder_with_the_official_parameter_names(tok):
    """Our parameter names are the official ones (less the untrained heads), plus the fusion head."""
    model = tiny_encoder(tok).model
    assert isinstance(model, FDT)
    names = set(model.state_dict())
    official_names = set(official_shapes(32, 1, 4, 16, 32, 1, CTX, CODEBOOK, 32, 1024)) - set(UNTRAINED_KEYS)
    assert names - official_names == {n for n in names if n.startswith("fusion_head.")}
    assert official_names <= names
