"""FDT (reference: /work/shared/reference/fdt.md §2, §5, §6) on tiny random models.

Sparsity against the temperature; the padding masks; the token activations; a few training steps of
FDTObjective. Sparsemax is tested in test_fdt_sparsemax.py, the sparse codes stored by `encode --sparse-codes`
and the token explanations of `search --explain` in test_fdt_codes.py, the official checkpoint importer in
test_fdt_import.py.
"""

from __future__ import annotations

import math
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TOKENIZERS  # noqa: F401 (test_fdt_import.py imports it from here)
from PIL import Image
from test_fdt_sparsemax import simplex_projection

from retrieval import RetrievalError
from retrieval.encoders.base import EncoderConfig
from retrieval.encoders.fdt import FDTEncoder
from retrieval.encoders.registry import get_config
from retrieval.text_tokenizer import OWN_IDS, TextTokenizer
from retrieval.training.pairs import Pair

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny models: one thread

CTX = 12
GRID = 4  # 16 px, patch 4
CODEBOOK = 64


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
