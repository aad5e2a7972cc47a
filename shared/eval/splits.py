"""The protocol's seeded splits: cold-start users, public users, federated users, leave-one-out
by time inside every non-cold user, and (a separate run) cold-start items.

See ``../shared/PROTOCOL.md``. All randomness comes from ``SplitConfig.seed``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace

import numpy as np

from shared.config import is_int, is_real
from shared.data.dataset import IntArray, RecDataset
from shared.errors import ConfigError

log = logging.getLogger(__name__)


MAX_SEED = 2**63 - 1
"""Seeds reach torch, which takes a signed 64-bit integer."""


def check_seed(seed: int) -> None:
    """Refuse a seed the samplers cannot take (torch raised "Overflow when unpacking long
    long" deep inside a run)."""
    if not is_int(seed) or not 0 <= seed <= MAX_SEED:
        raise ConfigError(f"seed must be an integer in [0, 2**63 - 1], got {seed!r}")


@dataclass(frozen=True)
class SplitConfig:
    """Split fractions and seed.

    ``cold_user_fraction``: share of users never seen in training (few-shot evaluation; 0
    disables). ``public_fraction``: share of the *remaining* users whose data may be
    centralized on the server. ``cold_item_fraction``: share of items (among those with at
    least ``cold_item_min_interactions``) held out in the cold-item run.
    """

    seed: int = 42
    cold_user_fraction: float = 0.1
    public_fraction: float = 0.2
    cold_item_fraction: float = 0.1
    cold_item_min_interactions: int = 5

    def __post_init__(self) -> None:
        # errors name the keys as users type them (--run-config, CLI flags)
        check_seed(self.seed)
        for name in ("cold-user-fraction", "public-fraction", "cold-item-fraction"):
            value = getattr(self, name.replace("-", "_"))
            if not is_real(value):
                raise ConfigError(f"{name} must be a finite number, got {value!r}")
            if not 0.0 <= value < 1.0:
                raise ConfigError(f"{name} must be in [0, 1), got {value}")
        if not is_int(self.cold_item_min_interactions) or self.cold_item_min_interactions < 1:
            raise ConfigError(
                "cold-item-min-interactions must be an integer >= 1, got "
                f"{self.cold_item_min_interactions!r}"
            )


@dataclass(frozen=True)
class ProtocolSplit:
    """User populations and per-user leave-one-out, in the dataset's dense ids.

    ``train[u]`` is user ``u``'s chronological training sequence (empty for cold users);
    ``valid[u]`` / ``test[u]`` are items, or -1 where the user has none (cold users, or users
    with fewer than 3 interactions, who then keep everything in train and are not evaluated).
    """

    config: SplitConfig
    n_items: int
    cold_users: IntArray
    public_users: IntArray
    federated_users: IntArray
    train: list[IntArray]
    valid: IntArray
    test: IntArray
    full_sequences: list[IntArray] = field(repr=False)

    def history(self, user: int, stage: str = "test") -> IntArray:
        """The model input for ``stage``: train for validation, train + valid for test."""
        if stage == "valid":
            return self.train[user]
        if stage == "test":
            if self.valid[user] < 0:
                return self.train[user]
            return np.append(self.train[user], self.valid[user])
        raise ConfigError(f"stage must be 'valid' or 'test', got {stage!r}")

    def target(self, user: int, stage: str = "test") -> int:
        return int(self.valid[user] if stage == "valid" else self.test[user])

    def population(self, name: str) -> IntArray:
        """Users of one population: 'public', 'federated', 'cold' or 'all' (public+federated)."""
        if name == "public":
            return self.public_users
        if name == "federated":
            return self.federated_users
        if name == "cold":
            return self.cold_users
        if name == "all":
            return np.sort(np.concatenate([self.public_users, self.federated_users]))
        raise ConfigError(
            f"unknown population {name!r}; use 'public', 'federated', 'cold' or 'all'"
        )

    def train_sequences(self, users: IntArray | None = None) -> list[IntArray]:
        """Training sequences of ``users`` (default: every non-cold user)."""
        chosen = self.population("all") if users is None else users
        return [self.train[int(u)] for u in chosen]

    def evaluable(self, users: IntArray, stage: str = "test") -> IntArray:
        """The subset of ``users`` that has a target for ``stage``."""
        targets = self.valid if stage == "valid" else self.test
        return users[targets[users] >= 0]


def split_users(dataset: RecDataset, config: SplitConfig = SplitConfig()) -> ProtocolSplit:
    """Seeded user populations plus leave-one-out by time (the sequences are already sorted)."""
    rng = np.random.default_rng(config.seed)
    n = dataset.n_users
    perm = rng.permutation(n)
    n_cold = round(config.cold_user_fraction * n)
    cold = np.sort(perm[:n_cold])
    rest = perm[n_cold:]
    n_public = round(config.public_fraction * len(rest))
    _check_populations(config, n, n_cold, n_public)
    public = np.sort(rest[:n_public])
    federated = np.sort(rest[n_public:])

    train: list[IntArray] = []
    valid = np.full(n, -1, dtype=np.int64)
    test = np.full(n, -1, dtype=np.int64)
    cold_set = set(cold.tolist())
    short = 0
    for u, seq in enumerate(dataset.sequences):
        if u in cold_set:
            train.append(np.zeros(0, dtype=np.int64))
        elif len(seq) < 3:
            short += 1
            train.append(seq.copy())
        else:
            train.append(seq[:-2].copy())
            valid[u] = seq[-2]
            test[u] = seq[-1]
    if short:
        log.info("%d users have fewer than 3 interactions: train only, not evaluated", short)
    return ProtocolSplit(
        config=config,
        n_items=dataset.n_items,
        cold_users=cold.astype(np.int64),
        public_users=public.astype(np.int64),
        federated_users=federated.astype(np.int64),
        train=train,
        valid=valid,
        test=test,
        full_sequences=dataset.sequences,
    )


def _check_populations(config: SplitConfig, n: int, n_cold: int, n_public: int) -> None:
    """Refuse fractions that, rounded on ``n`` users, leave no federated user (or every user
    cold): every figure of the empty population would be reported as 0.0."""
    fractions = (
        f"cold-user-fraction {config.cold_user_fraction}, public-fraction {config.public_fraction}"
    )
    if n_cold >= n:
        raise ConfigError(
            f"the split makes all {n} users cold ({fractions}), leaving no public or "
            "federated user to train and evaluate on; lower cold-user-fraction or use more users"
        )
    if n_cold + n_public >= n:
        raise ConfigError(
            f"the split leaves no federated user: of the {n} users, {n_cold} are cold and the "
            f"other {n - n_cold} public ({fractions}); lower public-fraction or "
            "cold-user-fraction, or use more users"
        )


@dataclass(frozen=True)
class ColdItemSplit:
    """The cold-item run: a dataset with every interaction on ``held_out`` items removed."""

    held_out: IntArray
    dataset: RecDataset
    original: RecDataset


def split_cold_items(dataset: RecDataset, config: SplitConfig = SplitConfig()) -> ColdItemSplit:
    """Hold out ``cold_item_fraction`` of the items with enough interactions (seeded)."""
    counts = np.bincount(np.concatenate(dataset.sequences), minlength=dataset.n_items)
    eligible = np.flatnonzero(counts >= config.cold_item_min_interactions)
    rng = np.random.default_rng([config.seed, 1])
    n_hold = round(config.cold_item_fraction * len(eligible))
    held = np.sort(rng.choice(eligible, size=n_hold, replace=False)).astype(np.int64)
    is_held = np.zeros(dataset.n_items, dtype=bool)
    is_held[held] = True
    seqs, stamps = [], []
    for seq, ts in zip(dataset.sequences, dataset.timestamps, strict=True):
        keep = ~is_held[seq]
        seqs.append(seq[keep])
        stamps.append(ts[keep])
    reduced = replace(dataset, name=f"{dataset.name}-colditems", sequences=seqs, timestamps=stamps)
    return ColdItemSplit(held_out=held, dataset=reduced, original=dataset)
