"""Ranking metrics as pure functions (``../shared/PROTOCOL.md``).

Ties count against the model: the rank of the target is the number of candidates whose score
is greater than **or equal to** the target's score. A non-finite target score is a miss; a NaN
candidate counts as above the target. So a model that scores everything the same gets 0.

Ranks are 0-based (rank 0 = best); a miss is ``np.inf``.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from shared.errors import DataError

FloatArray = npt.NDArray[np.float64]


def rank_of_target(target_score: float, candidate_scores: npt.ArrayLike) -> float:
    """0-based rank of one target among candidates (target excluded), ties against the model.

    >>> rank_of_target(0.9, [0.1, 0.5])
    0.0
    >>> rank_of_target(0.5, [0.5, 0.1])
    1.0
    >>> rank_of_target(float("nan"), [0.1])
    inf
    """
    cand = np.asarray(candidate_scores, dtype=np.float64)
    if not np.isfinite(target_score):
        return float("inf")
    return float(np.count_nonzero((cand >= target_score) | np.isnan(cand)))


def ranks_from_scores(
    target_scores: npt.ArrayLike, candidate_scores: npt.ArrayLike, candidate_mask: npt.ArrayLike
) -> FloatArray:
    """Batched ranks: row ``i`` ranks ``target_scores[i]`` among ``candidate_scores[i, mask[i]]``.

    ``candidate_scores`` and ``candidate_mask`` are (B, N); the mask selects the candidates
    (it must exclude the target itself). Returns B float ranks (``inf`` for a miss).
    """
    t = np.asarray(target_scores, dtype=np.float64)
    c = np.asarray(candidate_scores, dtype=np.float64)
    m = np.asarray(candidate_mask, dtype=bool)
    if c.shape != m.shape or c.ndim != 2 or t.shape != (c.shape[0],):
        raise DataError(f"shape mismatch: targets {t.shape}, candidates {c.shape}, mask {m.shape}")
    above = ((c >= t[:, None]) | np.isnan(c)) & m
    ranks = above.sum(axis=1).astype(np.float64)
    ranks[~np.isfinite(t)] = np.inf
    return ranks


def hit_rate_at_k(ranks: npt.ArrayLike, k: int = 10) -> float:
    """Share of users whose target ranks in the top ``k``; in [0, 1]. Empty input gives 0.

    >>> hit_rate_at_k([0, 9, 10, float("inf")], k=10)
    0.5
    """
    _check_k(k)
    r = np.asarray(ranks, dtype=np.float64)
    return float(np.mean(r < k)) if r.size else 0.0


def ndcg_at_k(ranks: npt.ArrayLike, k: int = 10) -> float:
    """Mean NDCG@k with one relevant item: ``1/log2(rank + 2)`` inside the top ``k``; in [0, 1].

    >>> round(ndcg_at_k([0, 1], k=10), 4)
    0.8155
    """
    _check_k(k)
    r = np.asarray(ranks, dtype=np.float64)
    if not r.size:
        return 0.0
    gains = np.zeros_like(r)
    hit = r < k
    gains[hit] = 1.0 / np.log2(r[hit] + 2.0)
    return float(np.mean(gains))


def _check_k(k: int) -> None:
    if k < 1:
        raise DataError(f"k must be >= 1, got {k}")
