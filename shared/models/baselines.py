"""Non-neural baselines of the protocol: Pop, ItemKNN (cosine), EASE, text-only.

All score from a history, so few-shot users are folded in with the same call: EASE and
ItemKNN score a cold-start user from the support set alone.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import numpy.typing as npt
import scipy.sparse as sp

from shared.config import is_int, is_real
from shared.data.dataset import IntArray
from shared.errors import ConfigError, DataError
from shared.models.base import Recommender, ScoreArray, check_histories, history_matrix


def interaction_matrix(sequences: Sequence[IntArray], n_items: int) -> sp.csr_matrix:
    """Binary users x items CSR matrix (repeats collapse to 1: implicit feedback)."""
    check_histories(sequences, n_items, "training sequence")
    rows = np.repeat(np.arange(len(sequences)), [len(s) for s in sequences])
    cols = np.concatenate(sequences) if sequences else np.zeros(0, dtype=np.int64)
    x = sp.csr_matrix(
        (np.ones(len(cols), dtype=np.float32), (rows, cols)), shape=(len(sequences), n_items)
    )
    x.data[:] = 1.0
    return x


class Pop(Recommender):
    """Train-set popularity; the same list for everyone."""

    name = "pop"

    def fit(self, sequences: Sequence[IntArray], n_items: int) -> Pop:
        self._n_items = n_items
        x = interaction_matrix(sequences, n_items)
        self.counts = np.asarray(x.sum(axis=0)).ravel().astype(np.float32)
        return self

    def score(self, histories: Sequence[IntArray]) -> ScoreArray:
        return np.tile(self.counts, (len(histories), 1))


class ItemKNN(Recommender):
    """Item-item cosine similarity; a history's score is the sum of its items' similarities.

    ``neighbors`` keeps each item's top-k most similar items (None keeps all); among items tied
    at the cut, the lowest ids are kept.
    """

    name = "itemknn"

    def __init__(self, neighbors: int | None = 100, shrink: float = 0.0) -> None:
        super().__init__()
        if neighbors is not None and (not is_int(neighbors) or neighbors < 1):
            raise ConfigError(
                f"ItemKNN neighbors must be an integer >= 1 or None, got {neighbors!r}"
            )
        if not (is_real(shrink) and shrink >= 0):  # NaN: every similarity NaN
            raise ConfigError(f"ItemKNN shrink must be a finite number >= 0, got {shrink!r}")
        self.neighbors = neighbors
        self.shrink = shrink

    def fit(self, sequences: Sequence[IntArray], n_items: int) -> ItemKNN:
        self._n_items = n_items
        x = interaction_matrix(sequences, n_items)
        co = (x.T @ x).toarray().astype(np.float32)
        norms = np.sqrt(np.diag(co)).astype(np.float32)
        sim = co / (np.outer(norms, norms) + self.shrink + 1e-12)
        np.fill_diagonal(sim, 0.0)
        if self.neighbors is not None and self.neighbors < n_items:
            # a stable sort, so that ties at the cut keep the lowest item ids: argpartition
            # leaves the order inside a partition undefined and kept an arbitrary subset of
            # the tied items, and ml-100k has such ties (equal counts give equal cosines), so
            # the neighbours, and the figures, depended on numpy's selection algorithm
            cut = np.argsort(-sim, axis=0, kind="stable")[self.neighbors :]
            np.put_along_axis(sim, cut, 0.0, axis=0)
        self.similarity = sim
        return self

    def score(self, histories: Sequence[IntArray]) -> ScoreArray:
        return history_matrix(histories, self._n_items) @ self.similarity


class EASE(Recommender):
    """EASE^R (Steck 2019): closed-form item-item weights with a zero diagonal."""

    name = "ease"

    def __init__(self, l2: float = 250.0) -> None:
        super().__init__()
        if not (is_real(l2) and l2 > 0):  # NaN passed "l2 <= 0": every weight NaN
            raise ConfigError(f"EASE l2 (lambda) must be a finite number > 0, got {l2!r}")
        self.l2 = l2

    def fit(self, sequences: Sequence[IntArray], n_items: int) -> EASE:
        self._n_items = n_items
        x = interaction_matrix(sequences, n_items)
        gram = (x.T @ x).toarray().astype(np.float64)
        gram[np.diag_indices(n_items)] += self.l2
        p = np.linalg.inv(gram)
        b = -p / np.diag(p)[None, :]
        b[np.diag_indices(n_items)] = 0.0
        self.weights = b.astype(np.float32)
        return self

    def score(self, histories: Sequence[IntArray]) -> ScoreArray:
        return history_matrix(histories, self._n_items) @ self.weights


class TextOnly(Recommender):
    """Cosine similarity between each item's text embedding and the mean of the history's.

    Needs no interactions, so it scores items nobody has seen (cold-start items).
    """

    name = "text"

    def __init__(self, item_embeddings: npt.NDArray[np.float32]) -> None:
        super().__init__()
        emb = np.asarray(item_embeddings, dtype=np.float32)
        if emb.ndim != 2:
            raise ConfigError(f"item embeddings must be 2-D, got shape {emb.shape}")
        norms = np.linalg.norm(emb, axis=1, keepdims=True)
        self.embeddings = emb / np.maximum(norms, 1e-12)
        self._n_items = emb.shape[0]

    def fit(self, sequences: Sequence[IntArray], n_items: int) -> TextOnly:
        if n_items != self._n_items:
            raise DataError(
                f"text embeddings cover {self._n_items} items but the data has {n_items}"
            )
        return self

    def score(self, histories: Sequence[IntArray]) -> ScoreArray:
        x = history_matrix(histories, self._n_items)
        counts = np.maximum(x.sum(axis=1, keepdims=True), 1.0)
        profile = (x @ self.embeddings) / counts
        return (profile @ self.embeddings.T).astype(np.float32)
