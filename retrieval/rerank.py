"""Fine-grained re-ranking of text → image results by a model's token-to-grouped-patch score (SPARC).

The first stage ranks by the global embeddings; the top `n` images are re-scored by
(1 − weight) · global + weight · local (ahead of the rest), where local is the mean over the query's words of
cos(word, the patches it groups in that image).
"""

from __future__ import annotations

import numpy as np

from retrieval.encoders.families import require

RERANK_WEIGHT = 0.5


def check_reranker(encoder) -> None:
    require(encoder, "word_alignment", "--rerank")


def rerank_top(encoder, text: str, images: list[str | None], scores: np.ndarray, n: int,
               weight: float = RERANK_WEIGHT) -> tuple[np.ndarray, np.ndarray]:
    """(candidate positions in the new order, their scores): the best `n` candidates that have an image,
    re-scored and sorted, then every other candidate in its first-stage order with its first-stage score."""
    check_reranker(encoder)
    scores = np.asarray(scores, dtype=np.float32)
    first = np.argsort(-scores, kind="stable")
    top = np.array([i for i in first if images[i] is not None][:n], dtype=np.int64)
    if not len(top):
        return first, scores[first]
    combined = (1 - weight) * scores[top] + weight * encoder.local_scores(text, [images[i] for i in top])
    best = np.argsort(-combined, kind="stable")
    rest = first[~np.isin(first, top)]
    return np.concatenate([top[best], rest]), np.concatenate([combined[best], scores[rest]]).astype(np.float32)
