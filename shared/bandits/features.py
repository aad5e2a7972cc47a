"""Item features for the exploration policies: from text, from interactions, or from a model.

LinUCB and Thompson sampling learn a linear reward over ``[1, z(score), features]``, and MMR
needs a similarity between items. Every builder returns ``(n_items, dim)`` rows scaled to unit
mean square, so the policies' unit prior means the same thing whatever the source:

* ``text``: PCA of the LM text embeddings (server side: evaluation harnesses).
* ``mf``: item factors of the training interaction matrix (server side).
* :func:`model_features`: what the device itself can compute from the model it serves, with
  no data but the model: the item factors of the model's own single-item-history scores.
  The student's item representation is built from the LM text embedding, so these carry the
  text knowledge too.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import numpy.typing as npt

from shared.config import is_int
from shared.errors import ConfigError, DataError
from shared.models.item_factors import cooccurrence_factors, unit_mean_square

__all__ = [
    "FEATURE_SOURCES",
    "item_features",
    "mf_features",
    "model_features",
    "pca_features",
]

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]
ScoreFn = Callable[[Sequence[npt.NDArray[np.int64]]], npt.NDArray[np.floating]]

FEATURE_SOURCES: tuple[str, ...] = ("text", "mf")


def pca_features(embeddings: npt.ArrayLike, dim: int) -> FloatArray:
    """Project ``embeddings`` on their top ``dim`` principal components.

    Scaled so the mean squared row norm is 1: the policies' unit prior then means the same
    thing whatever the source. Deterministic (signs fixed so each component's largest
    loading is positive).
    """
    x = np.asarray(embeddings, dtype=np.float64)
    if x.ndim != 2 or not np.isfinite(x).all():
        raise DataError(f"embeddings must be a finite 2-D array, got shape {x.shape}")
    if dim == 0:
        return np.zeros((x.shape[0], 0))
    if dim > min(x.shape):
        raise ConfigError(f"feature_dim {dim} exceeds the embedding rank bound {min(x.shape)}")
    centred = x - x.mean(axis=0)
    _, _, vt = np.linalg.svd(centred, full_matrices=False)
    comps = vt[:dim]
    signs = np.sign(comps[np.arange(dim), np.argmax(np.abs(comps), axis=1)])
    proj = centred @ (comps * signs[:, None]).T
    return unit_mean_square(proj)


def mf_features(sequences: Sequence[IntArray], n_items: int, dim: int) -> FloatArray:
    """Item factors of the training interactions (:func:`cooccurrence_factors`)."""
    if dim >= n_items:
        raise ConfigError(f"feature_dim {dim} must be below the number of items {n_items}")
    return cooccurrence_factors(sequences, n_items, dim)


def item_features(
    source: str,
    dim: int,
    *,
    text_embeddings: npt.ArrayLike | None,
    sequences: Sequence[IntArray],
    n_items: int,
) -> FloatArray:
    """Features of every item from ``source`` (``text`` or ``mf``), ``(n_items, dim)``."""
    if source == "text":
        if text_embeddings is None:
            raise ConfigError("features 'text' need the item text embeddings")
        return pca_features(text_embeddings, dim)
    if source == "mf":
        return mf_features(sequences, n_items, dim)
    raise ConfigError(f"unknown feature source {source!r}; use {', '.join(FEATURE_SOURCES)}")


def model_features(
    score: ScoreFn,
    n_items: int,
    dim: int,
    *,
    max_probes: int = 512,
    batch_size: int = 256,
    seed: int = 0,
) -> FloatArray:
    """Item factors of a model's scores: what an item looks like to the model.

    The model scores the catalog for ``min(n_items, max_probes)`` one-item histories (a
    seeded sample of items when the catalog is larger). The doubly centred ``probes x items``
    score matrix (user offsets and item popularity removed; popularity already enters the
    policy as the model score) has the items' factors as its right singular vectors; items
    get ``V sqrt(S)``, signs fixed, rows scaled to unit mean square. Two items the model
    ranks alike for every probe get the same features.

    Cost: ``max_probes`` scoring rows plus one SVD of a ``max_probes x n_items`` matrix
    (about a second for 1,682 items on one core); compute once per model version.
    """
    if not is_int(n_items) or n_items < 1:
        raise ConfigError(f"n_items must be a positive integer, got {n_items!r}")
    if not is_int(dim) or dim < 0:
        raise ConfigError(f"feature_dim must be an integer >= 0, got {dim!r}")
    # no probe scores nothing: the model would say nothing about its items
    if not is_int(max_probes) or max_probes < 1:
        raise ConfigError(f"max_probes must be an integer >= 1, got {max_probes!r}")
    if not is_int(batch_size) or batch_size < 1:
        raise ConfigError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    n_probes = min(n_items, max_probes)
    # a doubly centred n_probes x n_items matrix has at most n_probes - 1 factors: a catalog
    # that small gets them, and zero columns (which the policy never learns from) for the rest
    rank = min(dim, n_probes - 1)
    if rank == 0:
        return np.zeros((n_items, dim))
    if n_probes == n_items:
        probes = np.arange(n_items, dtype=np.int64)
    else:
        rng = np.random.default_rng(seed)
        probes = np.sort(rng.choice(n_items, size=n_probes, replace=False)).astype(np.int64)
    rows = []
    for start in range(0, n_probes, batch_size):
        chunk = probes[start : start + batch_size]
        out = np.asarray(score([np.array([int(i)], dtype=np.int64) for i in chunk]))
        if out.shape != (len(chunk), n_items):
            raise DataError(
                f"the model returned scores of shape {out.shape}, expected {(len(chunk), n_items)}"
            )
        rows.append(out.astype(np.float64))
    s = np.concatenate(rows)
    if not np.isfinite(s).all():
        raise DataError("the model returned non-finite scores; it cannot give item features")
    s -= s.mean(axis=1, keepdims=True)
    s -= s.mean(axis=0, keepdims=True)
    _, sv, vt = np.linalg.svd(s, full_matrices=False)
    factors = vt[:rank].T * np.sqrt(sv[:rank])
    signs = np.sign(factors[np.argmax(np.abs(factors), axis=0), np.arange(rank)])
    signs[signs == 0] = 1.0
    features = unit_mean_square(factors * signs)
    return np.pad(features, ((0, 0), (0, dim - rank)))
