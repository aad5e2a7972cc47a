"""Diversity at serving time: MMR re-ranking and the beyond-accuracy metrics that judge it.

Why: a top-k list built from relevance alone tends to be k near-duplicates (ten sequels of the
same film), and a whole user base sees the same popular head of the catalog. Maximal Marginal
Relevance (Carbonell & Goldstein 1998) trades a little relevance for lists whose items differ,
using the LM text embeddings as the notion of "similar". The metrics here (intra-list
diversity, novelty, catalog coverage) make that trade visible next to HR@10.

All functions are pure; :class:`MMRReranker` wraps any :class:`~shared.models.base.Scorer` so
the protocol's evaluation functions measure the re-ranked list exactly like the original.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
import numpy.typing as npt

from shared.errors import ConfigError, DataError
from shared.models.base import ScoreArray, Scorer

__all__ = [
    "MMRReranker",
    "catalog_coverage",
    "cosine_similarity",
    "intra_list_diversity",
    "item_popularity",
    "mmr_select",
    "normalize_rows",
    "novelty",
    "top_k",
]

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]


def top_k(scores: npt.ArrayLike, k: int) -> IntArray:
    """Positions of the ``k`` highest scores, best first; ties keep the lower position.

    NaN ranks below everything (a broken score never wins a slot).

    >>> top_k([0.1, 0.9, 0.5, 0.9], 3).tolist()
    [1, 3, 2]
    """
    s = np.asarray(scores, dtype=np.float64)
    key = np.where(np.isnan(s), -np.inf, s)
    return np.argsort(-key, kind="stable")[: max(0, int(k))].astype(np.int64)


def normalize_rows(vectors: npt.ArrayLike) -> FloatArray:
    """Unit-norm rows; zero (or non-finite) rows stay zero, so they are similar to nothing."""
    v = np.asarray(vectors, dtype=np.float64)
    v = np.where(np.isfinite(v), v, 0.0)
    if v.size:  # divide by each row's largest entry first: no overflow near 1e308
        peak = np.abs(v).max(axis=1, keepdims=True)
        v = np.divide(v, peak, out=np.zeros_like(v), where=peak > 0)
    norms = np.linalg.norm(v, axis=1, keepdims=True)
    return np.divide(v, norms, out=np.zeros_like(v), where=norms > 1e-12)


def cosine_similarity(vectors: npt.ArrayLike) -> FloatArray:
    """Pairwise cosine similarity of the rows, ``(n, n)``, clipped to ``[-1, 1]``."""
    unit = normalize_rows(vectors)
    return np.clip(unit @ unit.T, -1.0, 1.0)


def mmr_select(relevance: npt.ArrayLike, embeddings: npt.ArrayLike, k: int, lam: float) -> IntArray:
    """Maximal Marginal Relevance: ``k`` positions in display order.

    Step by step, pick the candidate maximising ``lam * rel - (1 - lam) * max_sim``, where
    ``rel`` is the relevance min-max scaled to ``[0, 1]`` over the candidates (so it is on the
    same scale as a cosine) and ``max_sim`` the largest cosine similarity to the items already
    picked (0 for the first pick). Ties go to the more relevant, then the earlier candidate.

    ``lam = 1`` is exactly the top-k by relevance; ``lam = 0`` is greedy max-min
    diversification (the most relevant item first, then always the item least similar to the
    list so far).
    """
    if not 0.0 <= lam <= 1.0:
        raise ConfigError(f"MMR lambda must be in [0, 1], got {lam}")
    rel_raw = np.asarray(relevance, dtype=np.float64)
    n = len(rel_raw)
    k = min(int(k), n)
    if k <= 0:
        return np.zeros(0, dtype=np.int64)
    order = top_k(rel_raw, n)  # relevance order: also the tie-break
    if lam >= 1.0 or k == 1:
        return order[:k]
    emb = np.asarray(embeddings, dtype=np.float64)
    if emb.ndim != 2 or emb.shape[0] != n:
        raise DataError(f"MMR embeddings must be ({n}, e), got shape {emb.shape}")
    finite = np.isfinite(rel_raw)
    rel = np.zeros(n)
    if finite.any():
        # divided by the largest first: hi - lo overflows for relevances spanning more than
        # the float range (every relevance but the top one became 0)
        vals = rel_raw[finite]
        peak = float(np.abs(vals).max())
        vals = vals / peak if peak > 0 else vals
        lo, hi = float(vals.min()), float(vals.max())
        rel[finite] = (vals - lo) / (hi - lo) if hi > lo else 1.0
    rel[~finite] = -1.0  # -inf / NaN: below any finite candidate, still pickable at the end
    rel[rel_raw == np.inf] = 1.0
    # work in relevance order so that argmax's first-index tie-break is "more relevant first"
    rel_o = rel[order]
    unit = normalize_rows(emb[order])
    max_sim = np.zeros(n)  # no penalty before the first pick
    taken = np.zeros(n, dtype=bool)
    picked: list[int] = []
    for step in range(k):
        objective = lam * rel_o - (1.0 - lam) * max_sim
        objective[taken] = -np.inf
        pos = int(np.argmax(objective))
        picked.append(pos)
        taken[pos] = True
        # one similarity row per pick (k mat-vecs instead of the full n x n Gram matrix)
        sims = np.clip(unit @ unit[pos], -1.0, 1.0)
        max_sim = sims if step == 0 else np.maximum(max_sim, sims)
    return order[np.asarray(picked, dtype=np.int64)]


def intra_list_diversity(slate: npt.ArrayLike, embeddings: npt.ArrayLike) -> float:
    """``1 - mean pairwise cosine`` of the slate's item embeddings (0 for fewer than 2 items).

    ``embeddings`` is indexed by item id (the whole catalog's text embeddings).
    """
    items = np.asarray(slate, dtype=np.int64)
    if len(items) < 2:
        return 0.0
    sims = cosine_similarity(np.asarray(embeddings)[items])
    n = len(items)
    mean_sim = (sims.sum() - np.trace(sims)) / (n * (n - 1))
    return float(1.0 - mean_sim)


def novelty(slate: npt.ArrayLike, popularity: npt.ArrayLike) -> float:
    """Mean self-information ``-log2 p(i)`` of the slate's items (higher = less mainstream).

    ``popularity[i]`` is the share of users who interacted with item ``i``, in ``(0, 1]``;
    use :func:`item_popularity`-style smoothing so never-seen items stay finite.
    """
    items = np.asarray(slate, dtype=np.int64)
    if len(items) == 0:
        return 0.0
    p = np.asarray(popularity, dtype=np.float64)[items]
    if np.any(~(p > 0)):
        raise DataError("novelty needs popularity > 0 for every shown item (smooth it)")
    return float(np.mean(-np.log2(p)))


def item_popularity(sequences: Sequence[npt.ArrayLike], n_items: int) -> FloatArray:
    """Share of users who interacted with each item, add-one smoothed: ``(c + 1) / (U + 1)``."""
    counts = np.zeros(n_items, dtype=np.float64)
    for seq in sequences:
        items = np.unique(np.asarray(seq, dtype=np.int64))
        counts[items] += 1.0
    return (counts + 1.0) / (len(sequences) + 1.0)


def catalog_coverage(slates: Iterable[npt.ArrayLike], n_items: int) -> float:
    """Distinct items shown in any slate / catalog size."""
    seen = np.zeros(n_items, dtype=bool)
    for slate in slates:
        seen[np.asarray(slate, dtype=np.int64)] = True
    return float(seen.mean()) if n_items else 0.0


class MMRReranker:
    """A :class:`~shared.models.base.Scorer` that re-ranks another scorer's top-N by MMR.

    The top-N items (the history and items scored NaN or -inf excluded; +inf is a score) keep
    their set of score *values*, re-assigned in MMR order: the best value goes to MMR's first
    pick, and so on. Every other item (history included) keeps its base score. So with
    ``lam = 1`` the scores are the base scores exactly, ties stay ties (the protocol counts
    them against the model), and the protocol's :func:`~shared.eval.protocol.evaluate_split`
    measures what a device running MMR over the model's top-N would show, on the same footing
    as the model itself.
    """

    def __init__(
        self, base: Scorer, item_embeddings: npt.ArrayLike, lam: float, top_n: int = 50
    ) -> None:
        emb = np.asarray(item_embeddings, dtype=np.float64)
        if emb.ndim != 2 or emb.shape[0] != base.n_items:
            raise DataError(f"item embeddings must be ({base.n_items}, e), got shape {emb.shape}")
        if not 0.0 <= lam <= 1.0:
            raise ConfigError(f"MMR lambda must be in [0, 1], got {lam}")
        if top_n < 1:
            raise ConfigError(f"top_n must be >= 1, got {top_n}")
        self.base = base
        self.embeddings = normalize_rows(emb)
        self.lam = float(lam)
        self.top_n = int(top_n)

    @property
    def n_items(self) -> int:
        return self.base.n_items

    def score(self, histories: Sequence[npt.NDArray[np.int64]]) -> ScoreArray:
        """Base scores with the top-N's values permuted into MMR order."""
        base = np.asarray(self.base.score(histories), dtype=np.float32)
        out = base.copy()
        if self.lam >= 1.0:
            return out
        for row, hist in enumerate(histories):
            masked = base[row].astype(np.float64)
            masked[np.isnan(masked)] = -np.inf
            masked[np.asarray(hist, dtype=np.int64)] = -np.inf
            # NaN, -inf and the history are no candidates; +inf (the surest item) is one
            n = min(self.top_n, int((masked > -np.inf).sum()))
            cand = top_k(masked, n)
            picked = cand[mmr_select(masked[cand], self.embeddings[cand], n, self.lam)]
            out[row, picked] = np.sort(base[row, cand])[::-1]
        return out
