"""Training batches: whole groups, and with a caption share, image–caption pairs drawn apart from the groups in a
seeded order that a resumed run repeats exactly; a batch's candidates and which of them each pair counts as
positive."""

from __future__ import annotations

import itertools
from collections import Counter

import pytest

from retrieval import RetrievalError
from retrieval.training.loop import TrainConfig, caption_slots
from retrieval.training.pairs import Pair, batch_stream, candidates, caption_pairs, groups_of


def pairs_of(n_groups: int = 20, edits: int = 9) -> list[Pair]:
    """Groups like ShapesWorld's: one caption pair and `edits` edit pairs per scene."""
    out = []
    for g in range(n_groups):
        out.append(Pair(f"sw/{g}", "sw/caption", f"{g}.png", None, None, f"caption {g}"))
        out += [Pair(f"sw/{g}", "sw/tgit-rotate", f"{g}.png", f"edit {e}", f"{g}-{e}.png", None) for e in range(edits)]
    return out


def take(stream, n: int) -> list[list[int]]:
    return list(itertools.islice(stream, n))


def test_without_a_share_batches_are_cut_from_whole_groups_in_order():
    pairs = pairs_of()
    batches = take(batch_stream(groups_of(pairs), 30, seed=0), 6)
    assert all(len(b) == 30 for b in batches)
    epoch = [i for b in batches[:6] for i in b]  # 200 pairs → 6 full batches per epoch
    assert len(set(epoch)) == len(epoch) == 180
    runs = [k for k, _ in itertools.groupby(pairs[i].group for i in epoch)]
    assert len(runs) == len(set(runs))  # each group's pairs are contiguous


def test_a_caption_share_adds_every_caption_equally_often():
    pairs = pairs_of()
    groups, captions = groups_of(pairs), caption_pairs(pairs)
    slots = caption_slots(TrainConfig(batch_size=30, caption_share=0.2))
    assert slots == 6
    batches = take(batch_stream(groups, 30, seed=0, captions=captions, caption_slots=slots), 40)
    assert all(len(b) == 30 for b in batches)
    drawn = [i for b in batches for i in b[-slots:]]
    assert all(pairs[i].task == "sw/caption" for i in drawn)
    counts = Counter(drawn)  # 240 draws over 20 captions in rounds of a permutation each: 12 times each
    assert set(counts) == set(captions) and set(counts.values()) == {12}
    grouped = take(batch_stream(groups, 24, seed=0), 40)
    assert [b[:-slots] for b in batches] == grouped  # the grouped part is the same stream at the smaller size


def test_caption_draws_depend_on_the_seed_and_resume_exactly():
    pairs = pairs_of()
    groups, captions = groups_of(pairs), caption_pairs(pairs)

    def stream(seed: int, start: int = 0):
        return batch_stream(groups, 30, seed=seed, start=start, captions=captions, caption_slots=6)

    full = take(stream(0), 15)
    assert take(stream(0, start=7), 8) == full[7:]
    assert [b[-6:] for b in take(stream(1), 15)] != [b[-6:] for b in full]  # the caption draw itself is seeded


def test_bad_caption_shares_are_refused():
    with pytest.raises(RetrievalError, match="caption-share"):
        TrainConfig(caption_share=1.0)
    with pytest.raises(RetrievalError, match="caption-share"):
        TrainConfig(caption_share=-0.1)
    no_captions = [p for p in pairs_of() if not p.task.endswith("/caption")]
    with pytest.raises(RetrievalError, match="image–caption pairs"):
        next(batch_stream(groups_of(no_captions), 30, seed=0, captions=[], caption_slots=6))
    with pytest.raises(RetrievalError, match="no room for groups"):
        next(batch_stream(groups_of(pairs_of()), 4, seed=0, captions=[0], caption_slots=4))


def test_candidates_are_the_distinct_targets_and_a_query_can_be_a_target_itself():
    pairs = [Pair("sw/0", "sw/caption", "0.png", None, None, "a red circle"),
             Pair("sw/0", "sw/tgit-flip", "0.png", "horizontal flip", "0-h.png", None),
             Pair("sw/0", "sw/tgit-flip", "0-h.png", "horizontal flip", "0.png", None),
             Pair("sw/0", "sw/tgit-rotate", "0.png", "rotate 90 degrees clockwise", "0-90.png", None),
             Pair("sw/0", "sw/vqa-presence", "0.png", "is there a circle?", None, "yes"),
             Pair("sw/1", "sw/vqa-presence", "1.png", "is there a square?", None, "yes")]
    targets, positives, query_is_target = candidates(pairs)
    assert targets == [(None, "a red circle"), ("0-h.png", None), ("0.png", None), ("0-90.png", None), (None, "yes")]

    def marked(cells):
        return [[targets[j] for j in row.nonzero().flatten()] for row in cells]

    assert marked(positives) == [[(None, "a red circle")], [("0-h.png", None)], [("0.png", None)],
                                 [("0-90.png", None)], [(None, "yes")], [(None, "yes")]]
    # the image whose caption is asked for is the flip-back's target; a composed query (image + edit) is not
    # the image alone
    assert marked(query_is_target) == [[("0.png", None)], [], [], [], [], []]
