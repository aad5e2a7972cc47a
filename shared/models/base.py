"""The one contract every recommender implements, baselines and neural models alike.

A model is fitted on training sequences and then scores the whole catalog *from a history*.
Scoring from a history (rather than from a user id) is what makes fold-in for few-shot users,
on-device scoring and the evaluation protocol the same call.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Protocol

import numpy as np
import numpy.typing as npt

from shared.data.dataset import IntArray

ScoreArray = npt.NDArray[np.float32]


class Scorer(Protocol):
    """Anything that scores the catalog for a batch of histories."""

    @property
    def n_items(self) -> int: ...

    def score(self, histories: Sequence[IntArray]) -> ScoreArray:
        """Return a (len(histories), n_items) array; higher is better."""
        ...


class Recommender(ABC):
    """Base class: ``fit`` on training sequences, ``score`` histories."""

    name: str = "recommender"

    def __init__(self) -> None:
        self._n_items = 0

    @property
    def n_items(self) -> int:
        return self._n_items

    @abstractmethod
    def fit(self, sequences: Sequence[IntArray], n_items: int) -> Recommender:
        """Learn from users' chronological training sequences over ``n_items`` items."""

    @abstractmethod
    def score(self, histories: Sequence[IntArray]) -> ScoreArray:
        """Score every item for each history; shape (len(histories), n_items)."""


def history_matrix(histories: Sequence[IntArray], n_items: int) -> npt.NDArray[np.float32]:
    """Binary (len(histories), n_items) matrix of the items in each history."""
    x = np.zeros((len(histories), n_items), dtype=np.float32)
    for row, h in enumerate(histories):
        if len(h):
            x[row, np.asarray(h, dtype=np.int64)] = 1.0
    return x
