"""FDT (reference: /work/shared/reference/fdt.md §2, §5, §6) on tiny random models.

Sparsemax against a brute-force projection onto the simplex, its gradient against the analytic Jacobian, its
stability; sparsity against the temperature; the padding masks; sparse codes stored by `encode --sparse-codes`
and the embeddings rebuilt from them; a few training steps of FDTObjective; the token explanations of
`search --explain`. The official checkpoint importer is tested in test_fdt_import.py.
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

from retrieval import RetrievalError
from retrieval.encoders.base import EncoderConfig
from retrieval.encoders.fdt import CODE_COLUMNS, FDTEncoder
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
