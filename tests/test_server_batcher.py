"""The server's encode batcher: queries that wait while a forward runs share the next one, each gets its own rows,
and a query that fails, fails alone."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from retrieval.encoders import load_encoder
from retrieval.errors import RetrievalError
from retrieval.server.batcher import EncodeBatcher


class HeldEncoder:
    """test-tiny whose first forward waits until released, so that the jobs submitted meanwhile queue up."""

    def __init__(self, encoder, refuse: str | None = None):
        self.encoder, self.refuse = encoder, refuse
        self.release, self.started = threading.Event(), threading.Event()
        self.batches: list[int] = []

    def encode(self, images, texts):
        self.started.set()
        self.release.wait(30)
        if self.refuse in texts:
            raise RetrievalError(f"refused {self.refuse!r}")
        self.batches.append(len(texts))
        return self.encoder.encode(images=images, texts=texts)


@pytest.fixture(scope="module")
def tiny():
    return load_encoder("test-tiny", device="cpu")


TEXTS = ["a red circle", "a blue square", "two green stars", "a small cross", "a large purple circle"]


def test_queued_jobs_share_one_forward_and_get_their_own_rows(tiny):
    held = HeldEncoder(tiny)
    batcher = EncodeBatcher(max_batch=32)
    try:
        first = batcher.submit(held, [(None, TEXTS[0])])
        assert held.started.wait(30)
        later = [batcher.submit(held, [(None, t)]) for t in TEXTS[1:3]] + [batcher.submit(held, [(None, TEXTS[3]),
                                                                                                 (None, TEXTS[4])])]
        held.release.set()
        results = [first.result(30)] + [f.result(30) for f in later]
    finally:
        batcher.close()
    assert held.batches == [1, 4]  # the first alone; the three jobs that queued meanwhile (4 items) in one forward
    assert [r.batch_items for r in results] == [1, 4, 4, 4]
    got = np.concatenate([r.vectors for r in results])
    np.testing.assert_allclose(got, tiny.encode(texts=TEXTS), atol=1e-5)


def test_max_batch_caps_the_forward(tiny):
    held = HeldEncoder(tiny)
    batcher = EncodeBatcher(max_batch=2)
    try:
        first = batcher.submit(held, [(None, TEXTS[0])])
        assert held.started.wait(30)
        later = [batcher.submit(held, [(None, t)]) for t in TEXTS[1:]]
        held.release.set()
        for future in [first, *later]:
            future.result(30)
    finally:
        batcher.close()
    assert held.batches == [1, 2, 2]


def test_a_failing_query_fails_alone(tiny):
    held = HeldEncoder(tiny, refuse="bad")
    batcher = EncodeBatcher(max_batch=32)
    try:
        first = batcher.submit(held, [(None, TEXTS[0])])
        assert held.started.wait(30)
        good, bad, other = (batcher.submit(held, [(None, t)]) for t in (TEXTS[1], "bad", TEXTS[2]))
        held.release.set()
        first.result(30)
        with pytest.raises(RetrievalError, match="refused 'bad'"):
            bad.result(30)
        np.testing.assert_allclose(good.result(30).vectors, tiny.encode(texts=[TEXTS[1]]), atol=1e-5)
        np.testing.assert_allclose(other.result(30).vectors, tiny.encode(texts=[TEXTS[2]]), atol=1e-5)
    finally:
        batcher.close()


def test_a_cancelled_query_is_skipped_and_the_thread_serves_on(tiny):
    held = HeldEncoder(tiny)
    batcher = EncodeBatcher(max_batch=8)
    try:
        first = batcher.submit(held, [(None, TEXTS[0])])
        assert held.started.wait(30)
        cancelled, after = batcher.submit(held, [(None, TEXTS[1])]), batcher.submit(held, [(None, TEXTS[2])])
        assert cancelled.cancel()
        held.release.set()
        assert first.result(30).vectors.shape[0] == 1 and after.result(30).vectors.shape[0] == 1
        assert held.batches == [1, 1]  # the cancelled query took no place in a forward
        assert batcher.submit(held, [(None, TEXTS[3])]).result(30).vectors.shape[0] == 1
    finally:
        batcher.close()
