"""On-device re-ranking policies: greedy, epsilon-greedy, linear Thompson sampling, LinUCB.

Why: a model that always shows its own top-k never learns what it got wrong and keeps showing
the same few items (a closed feedback loop). A bandit on the device re-ranks the model's top-N
candidates, shows a slate, and learns from every click at once, without sending anything off
the device.

Every policy has the same small interface::

    slate = policy.select(candidates, model_scores, item_features, k, rng)
    policy.update(item, reward)          # once per impression, as feedback arrives
    state = policy.state_dict()          # JSON-able; persist it on the device
    policy.load_state_dict(state)        # validated: corrupt state is refused

**Context.** A candidate's context vector is ``x = [1, z(score), f]``: an intercept, the model
score standardised over the candidate set (clipped to ±3) and the item features ``f``
(``feature_dim`` of them, e.g. the LM text embedding reduced by PCA). So ``d = feature_dim + 2
<= 64``. Vectors longer than ``max_feature_norm`` are brought down to it, their features
first (so that an untrained policy still ranks like the model). The context an item
had when it was *shown* is cached with the impression and is what its reward updates: the
policy learns from what it actually decided on, and feedback cannot smuggle in new features.

**Posterior.** The learning policies share one Bayesian ridge posterior (:class:`LinearPosterior`)
with precision ``A = I / prior_variance + sum x x^T`` and ``b = A_0 theta_0 + sum r x``; the prior
mean ``theta_0 = [0, score_prior, user_prior]`` makes an untrained policy's *mean* rank like
the model (the user representation, if given, seeds the feature part). Its uncertainty does
not: the standardised score is a context entry with unit prior variance, so LinUCB's bonus
and Thompson's draws also favour candidates far from the slate's average score, at both ends,
until clicks pin the score's weight down. That early exploration is part of what the regret
figures measure (``bench/results/bandits-synthetic.json``, top 50: LinUCB 0.21x greedy's regret;
``bandits-synthetic-top200.json``, top 200: 0.28x). A candidate
whose score is NaN or -inf is shown only when nothing else is left. ``A^-1`` is kept up to date with
Sherman-Morrison (one reward) or Woodbury (a slate of rewards) in ``O(d^2)`` and recomputed
from ``A`` by Cholesky every ``refresh_every`` updates, or at once if a rank update ever looks
wrong, so rounding error never accumulates.

**Bad feedback never reaches the posterior.** Feedback for an unknown item, for an item with
no outstanding impression (never shown, or already answered), or with a NaN/inf reward is
refused with a logged reason and counted in :attr:`Policy.feedback_counts`; finite rewards
outside ``[reward_min, reward_max]`` are clipped (and counted). With bounded rewards and
contexts, ``A`` stays symmetric positive definite and ``theta`` stays within the closed-form
bound ``||theta - theta_0|| <= sqrt(n * prior_variance) * (R + ||theta_0|| M)`` (ridge
regression can never fit worse than its prior mean).
"""

from __future__ import annotations

import logging
import math
import numbers
from abc import ABC, abstractmethod
from collections import Counter, OrderedDict, deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any, ClassVar, TypeGuard

import numpy as np
import numpy.typing as npt
import scipy.linalg

from shared.bandits.diversity import mmr_select, top_k
from shared.config import is_int
from shared.errors import ConfigError, DataError, ModelFileError

__all__ = [
    "MAX_CONTEXT_DIM",
    "POLICY_NAMES",
    "STATE_FORMAT",
    "BanditConfig",
    "EpsilonGreedyPolicy",
    "GreedyPolicy",
    "LinUCBPolicy",
    "LinearPosterior",
    "Policy",
    "PolicyCheckpoint",
    "ThompsonPolicy",
    "make_policy",
]

logger = logging.getLogger(__name__)

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]

POLICY_NAMES: tuple[str, ...] = ("greedy", "epsilon_greedy", "thompson", "linucb")
"""Every policy :func:`make_policy` builds."""

MAX_CONTEXT_DIM = 64
"""Largest posterior dimension ``d`` (a d x d matrix lives on the device)."""

STATE_FORMAT = "fedrec-bandit/v1"
"""Tag of :meth:`Policy.state_dict` payloads; bumped when the layout changes."""

_SCORE_CLIP = 3.0


def _is_count(value: object) -> TypeGuard[int]:
    """A non-negative int (not a bool)."""
    return is_int(value) and value >= 0


def _is_number(value: object) -> bool:
    """A real number, Python's or numpy's, not a bool (finite or not: callers say which)."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _key(name: str) -> str:
    """A field as users type it (``mmr-lambda``; ``bandit-mmr-lambda`` in a daemon's
    --config)."""
    return name.replace("_", "-")


def _check_int(name: str, value: object, low: int, high: int | None = None) -> None:
    if not is_int(value):
        raise ConfigError(f"bandit setting {_key(name)} must be an integer, got {value!r}")
    if value < low or (high is not None and value > high):
        bound = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise ConfigError(f"bandit setting {_key(name)} must be {bound}, got {value}")


def _check_float(
    name: str, value: object, low: float, high: float | None = None, *, low_open: bool = False
) -> None:
    if not _is_number(value):
        raise ConfigError(f"bandit setting {_key(name)} must be a number, got {value!r}")
    v = float(value)  # type: ignore[arg-type]
    too_low = v <= low if low_open else v < low
    if not math.isfinite(v) or too_low or (high is not None and v > high):
        lo = f"({low}" if low_open else f"[{low}"
        hi = "inf)" if high is None else f"{high}]"
        raise ConfigError(
            f"bandit setting {_key(name)} must be finite and in {lo}, {hi}, got {value!r}"
        )


#: The :class:`BanditConfig` fields a learned posterior depends on: its prior, its context
#: features (their number and scale, the candidate set the score is standardised over) and
#: the range its rewards were clipped to.
POSTERIOR_FIELDS = (
    "prior_variance",
    "score_prior",
    "feature_dim",
    "max_feature_norm",
    "top_n",
    "reward_min",
    "reward_max",
)


@dataclass(frozen=True)
class BanditConfig:
    """One deployment's re-ranking policy; validated on construction.

    Defaults are the tuned ones, chosen by ``fedrec bandits tune`` on seeds 100 and 101 only
    (``bench/results/bandits-*-tuning.json``) and reported on seeds 42, 43 and 44:
    ``alpha``, ``thompson_scale`` and ``epsilon`` on the synthetic world (lowest regret among
    settings that show each user >= 3x greedy's distinct items), ``mmr_lambda`` on ml-100k's
    validation items (the most diversity whose mean HR@10 cost is within 2.5%). Those
    committed grids ran at the top_n of the time, 50 (``tune`` starts from these defaults,
    or from its ``--run-config``, and records them as ``bandit_config``). ``top_n`` is
    200: the union of the users' top-50 candidates covers only about twice greedy's catalog
    coverage on the synthetic world, so no re-ranker could reach 3x there; at 200 the bound
    is 3.0-3.5x (``bench/results/bandits-*-top200.json``).

    Attributes:
        policy: one of :data:`POLICY_NAMES`. ``greedy`` is the baseline (the model's top-k,
            never learns); the others learn a linear posterior from clicks.
        epsilon: epsilon-greedy: chance that a slate slot is a uniformly random candidate.
        alpha: LinUCB: width of the upper confidence bound, ``x theta + alpha sqrt(x A^-1 x)``.
        thompson_scale: Thompson sampling: ``theta ~ N(theta_hat, thompson_scale^2 A^-1)``.
        prior_variance: prior variance of every weight (``A_0 = I / prior_variance``); larger
            trusts clicks sooner.
        score_prior: prior mean weight of the standardised model score, so that an untrained
            policy ranks like the model.
        mmr_lambda: diversity: MMR trade-off over the item text embeddings, ``lambda *
            relevance - (1 - lambda) * max similarity to the slate``; 1 turns it off, 0 is pure
            diversity.
        top_n: the policy re-ranks the model's top-N candidates.
        slate_size: items shown per step (``k``; 1 = one item per step).
        feature_dim: item features per candidate (the context adds 2: intercept, score).
        max_feature_norm: context vectors longer than this are brought down to it (their
            features first, ``[1, z]`` only when that alone is longer).
        reward_min: rewards below are clipped up (and counted).
        reward_max: rewards above are clipped down (and counted).
        max_pending: impressions kept waiting for feedback; the oldest expire beyond it.
        refresh_every: recompute ``A^-1`` from ``A`` by Cholesky after this many updates.
        seed: seed of the policy's own generator (used when ``select`` gets no ``rng``).
    """

    policy: str = "linucb"
    epsilon: float = 0.02
    alpha: float = 0.75
    thompson_scale: float = 0.25
    prior_variance: float = 1.0
    score_prior: float = 0.1
    mmr_lambda: float = 0.4
    top_n: int = 200
    slate_size: int = 10
    feature_dim: int = 16
    max_feature_norm: float = 10.0
    reward_min: float = 0.0
    reward_max: float = 1.0
    max_pending: int = 1024
    refresh_every: int = 64
    seed: int = 0

    def __post_init__(self) -> None:
        if self.policy not in POLICY_NAMES:
            raise ConfigError(
                f"bandit setting policy must be one of {', '.join(POLICY_NAMES)}, "
                f"got {self.policy!r}"
            )
        _check_float("epsilon", self.epsilon, 0.0, 1.0)
        _check_float("alpha", self.alpha, 0.0, 100.0)
        _check_float("thompson_scale", self.thompson_scale, 0.0, 100.0)
        _check_float("prior_variance", self.prior_variance, 1e-6, 1e6)
        _check_float("score_prior", self.score_prior, -100.0, 100.0)
        _check_float("mmr_lambda", self.mmr_lambda, 0.0, 1.0)
        _check_int("top_n", self.top_n, 1)
        _check_int("slate_size", self.slate_size, 1)
        if self.slate_size > self.top_n:
            raise ConfigError(
                f"bandit setting slate-size ({self.slate_size}) must not exceed top-n "
                f"({self.top_n}): the slate is chosen among the top-N candidates"
            )
        _check_int("feature_dim", self.feature_dim, 0, MAX_CONTEXT_DIM - 2)
        _check_float("max_feature_norm", self.max_feature_norm, 0.0, 1e6, low_open=True)
        _check_float("reward_min", self.reward_min, -1e6, 1e6)
        _check_float("reward_max", self.reward_max, -1e6, 1e6)
        if self.reward_max <= self.reward_min:
            raise ConfigError(
                f"bandit setting reward-max ({self.reward_max}) must exceed reward-min "
                f"({self.reward_min})"
            )
        _check_int("max_pending", self.max_pending, 1)
        if self.max_pending < self.slate_size:
            raise ConfigError(
                f"bandit setting max-pending ({self.max_pending}) must be at least slate-size "
                f"({self.slate_size}): the oldest impressions of every slate would expire "
                "before their feedback could arrive"
            )
        _check_int("refresh_every", self.refresh_every, 1)
        _check_int("seed", self.seed, 0)

    @property
    def context_dim(self) -> int:
        """Posterior dimension ``d``: intercept + standardised score + item features."""
        return self.feature_dim + 2

    def as_dict(self) -> dict[str, Any]:
        """Plain dict (for JSON reports and the persisted state)."""
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def posterior_settings(self) -> dict[str, Any]:
        """The settings that give a learned posterior its meaning (:data:`POSTERIOR_FIELDS`):
        a posterior learned under others would be silently wrong, while the rest (how
        boldly to explore, the slate's size, diversity, the seed) can change under it."""
        return {name: getattr(self, name) for name in POSTERIOR_FIELDS}


class LinearPosterior:
    """Gaussian posterior of a linear reward model: precision ``A`` and vector ``b``.

    ``theta = A^-1 b`` is the ridge estimate shrunk toward ``theta_0``. ``A^-1`` is maintained
    with rank updates and periodically recomputed from ``A`` (see the module docstring).
    """

    def __init__(
        self,
        dim: int,
        prior_variance: float = 1.0,
        prior_mean: FloatArray | None = None,
        refresh_every: int = 64,
    ) -> None:
        if not 1 <= dim <= MAX_CONTEXT_DIM:
            raise ConfigError(f"posterior dimension must be in [1, {MAX_CONTEXT_DIM}], got {dim}")
        theta0 = np.zeros(dim) if prior_mean is None else np.asarray(prior_mean, np.float64)
        if theta0.shape != (dim,) or not np.isfinite(theta0).all():
            raise ConfigError(f"prior mean must be {dim} finite numbers, got shape {theta0.shape}")
        self.dim = dim
        self.prior_precision = 1.0 / float(prior_variance)
        self.prior_mean = theta0.copy()
        self.refresh_every = refresh_every
        self.A = np.eye(dim) * self.prior_precision
        self.b = self.prior_precision * theta0
        self.A_inv = np.eye(dim) / self.prior_precision
        self.n_updates = 0
        self._since_refresh = 0
        self._chol: FloatArray | None = None

    @property
    def theta(self) -> FloatArray:
        """Posterior mean (the ridge estimate)."""
        return np.asarray(self.A_inv @ self.b, dtype=np.float64)

    def mean(self, contexts: FloatArray) -> FloatArray:
        """Expected reward of each context row."""
        return np.asarray(contexts @ self.theta, dtype=np.float64)

    def width(self, contexts: FloatArray) -> FloatArray:
        """Posterior standard deviation ``sqrt(x A^-1 x)`` of each context row's mean."""
        quad = np.einsum("ij,jk,ik->i", contexts, self.A_inv, contexts)
        return np.sqrt(np.maximum(quad, 0.0))

    def sample(self, rng: np.random.Generator, scale: float) -> FloatArray:
        """One draw of ``theta ~ N(theta_hat, scale^2 A^-1)`` via the Cholesky factor of ``A``.

        With ``A = L L^T``, ``L^-T z`` has covariance ``A^-1``: no inverse square root needed.
        """
        if self._chol is None:
            self._chol = np.asarray(np.linalg.cholesky(self.A), dtype=np.float64)
        z = rng.standard_normal(self.dim)
        step = scipy.linalg.solve_triangular(self._chol, z, lower=True, trans="T")
        return np.asarray(self.theta + scale * step, dtype=np.float64)

    def update(self, contexts: FloatArray, rewards: FloatArray) -> bool:
        """Add observations (rows of ``contexts`` with ``rewards``); ``False`` if refused.

        Inputs must already be finite and bounded (the policy checks them); a result that is
        still not finite is rolled back rather than stored.
        """
        x = np.atleast_2d(np.asarray(contexts, dtype=np.float64))
        r = np.atleast_1d(np.asarray(rewards, dtype=np.float64))
        if x.shape[0] == 0:
            return True
        new_a = self.A + x.T @ x
        new_b = self.b + x.T @ r
        if not (np.isfinite(new_a).all() and np.isfinite(new_b).all()):
            return False
        new_a = 0.5 * new_a + 0.5 * new_a.T  # halves first: no overflow near the limit
        old = (self.A, self.b, self.A_inv)
        self.A, self.b = new_a, new_b
        self._chol = None
        self.n_updates += x.shape[0]
        self._since_refresh += x.shape[0]
        if self._since_refresh >= self.refresh_every or not self._rank_update(x):
            try:
                self.refresh()
            except np.linalg.LinAlgError:
                self.A, self.b, self.A_inv = old
                self.n_updates -= x.shape[0]
                return False
        return True

    def _rank_update(self, x: FloatArray) -> bool:
        """Sherman-Morrison (one row) or Woodbury (several) on ``A^-1``; ``False`` if unsafe."""
        a_inv = self.A_inv
        if x.shape[0] == 1:
            ax = a_inv @ x[0]
            denom = 1.0 + float(x[0] @ ax)
            new = a_inv - np.outer(ax, ax) / denom
        else:
            ax = a_inv @ x.T  # (d, m)
            inner = np.eye(x.shape[0]) + x @ ax
            try:
                new = a_inv - ax @ np.linalg.solve(inner, ax.T)
            except np.linalg.LinAlgError:
                return False
        new = 0.5 * (new + new.T)
        if not np.isfinite(new).all() or np.any(np.diag(new) <= 0.0):
            return False
        self.A_inv = new
        return True

    def refresh(self) -> None:
        """Recompute ``A^-1`` exactly from ``A`` (Cholesky); raises if ``A`` is not SPD."""
        chol = np.linalg.cholesky(self.A)
        inv = scipy.linalg.cho_solve((chol, True), np.eye(self.dim))
        self.A_inv = 0.5 * (inv + inv.T)
        self._chol = np.asarray(chol, dtype=np.float64)
        self._since_refresh = 0

    def state_dict(self) -> dict[str, Any]:
        return {
            "A": self.A.tolist(),
            "b": self.b.tolist(),
            "prior_mean": self.prior_mean.tolist(),
            "prior_precision": self.prior_precision,
            "n_updates": self.n_updates,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore from :meth:`state_dict`; refuses anything not finite, symmetric and SPD."""
        try:
            a = np.asarray(state["A"], dtype=np.float64)
            b = np.asarray(state["b"], dtype=np.float64)
            theta0 = np.asarray(state["prior_mean"], dtype=np.float64)
            precision = float(state["prior_precision"])
            n_updates = state["n_updates"]
        except (KeyError, TypeError, ValueError) as err:
            raise ModelFileError(f"bandit posterior state is malformed: {err}") from None
        d = self.dim
        if a.shape != (d, d) or b.shape != (d,) or theta0.shape != (d,):
            raise ModelFileError(
                f"bandit posterior state has shapes A={a.shape}, b={b.shape}, "
                f"prior_mean={theta0.shape}; this policy needs d={d}"
            )
        if not (np.isfinite(a).all() and np.isfinite(b).all() and np.isfinite(theta0).all()):
            raise ModelFileError("bandit posterior state holds NaN or infinite values")
        if not math.isfinite(precision) or precision <= 0:
            raise ModelFileError(f"bandit prior precision must be > 0, got {precision}")
        if not _is_count(n_updates):
            raise ModelFileError(f"bandit n_updates must be an integer >= 0, got {n_updates!r}")
        if not np.allclose(a, a.T, rtol=1e-10, atol=1e-10 * max(1.0, float(np.abs(a).max()))):
            raise ModelFileError("bandit posterior matrix A is not symmetric")
        # halves first: a + a.T overflows for entries near the float64 limit (a corrupt but
        # finite A then became infinite here and every later select failed)
        sym = 0.5 * a + 0.5 * a.T
        try:
            np.linalg.cholesky(sym)
        except np.linalg.LinAlgError:
            raise ModelFileError("bandit posterior matrix A is not positive definite") from None
        if abs(precision - self.prior_precision) > 1e-9 * self.prior_precision:
            raise ModelFileError(
                f"bandit prior precision {precision} does not match the config's "
                f"{self.prior_precision}"
            )
        # A = A_0 + sum x x^T can never have an eigenvalue below the prior precision, up to
        # rounding: the sums that built A and eigvalsh are exact only to a few eps * ||A||
        # (||A||_2 <= d max|a_ij|, no overflow near the float limit; measured: up to about
        # 13 eps max|a_ij| after 1e5 updates), which for a large A and a weak prior
        # (prior-variance 1e6) exceeded a tolerance relative to the prior alone and refused
        # a device's own posterior after a few hundred updates
        rounding = 64 * self.dim * np.finfo(np.float64).eps * float(np.abs(sym).max())
        if float(np.linalg.eigvalsh(sym).min()) < precision * (1 - 1e-6) - rounding:
            raise ModelFileError("bandit posterior matrix A is below its prior precision")
        self.A = sym
        self.b = b
        self.prior_mean = theta0
        self.prior_precision = precision
        self.n_updates = n_updates
        self.refresh()


@dataclass(frozen=True)
class PolicyCheckpoint:
    """A policy's in-memory state at one moment (:meth:`Policy.checkpoint`); opaque.

    The posterior's arrays are kept by reference: every update replaces them, none writes
    into them. The pending impressions' contexts are never written to either, so copying
    their containers is enough (a deep copy of 1024 of them would cost more than a slate).
    """

    pending: OrderedDict[int, tuple[int, FloatArray, str | None]]
    pending_by_item: dict[int, deque[int]]
    next_impression: int
    feedback_counts: Counter[str]
    warned: frozenset[str]
    rng: np.random.Generator
    rng_state: Mapping[str, Any]
    posterior: dict[str, Any]


class Policy(ABC):
    """Re-ranks the model's top-N candidates into a slate and learns from feedback.

    One instance is one device's (one user's) policy. Subclasses define :meth:`_index` (a
    score per candidate); selection, diversity, impressions and feedback checks are shared.
    """

    name: ClassVar[str] = "policy"

    def __init__(
        self, config: BanditConfig, n_items: int, user_prior: FloatArray | None = None
    ) -> None:
        if not isinstance(config, BanditConfig):
            raise ConfigError(f"expected a BanditConfig, got {type(config).__name__}")
        if not is_int(n_items) or n_items < 1:
            raise ConfigError(f"n_items must be a positive integer, got {n_items!r}")
        self.config = config
        self.n_items = int(n_items)
        self.rng = np.random.default_rng(config.seed)
        self.feedback_counts: Counter[str] = Counter()
        # impression id -> (item, context, slate tag); per item, its impression ids oldest first
        self._pending: OrderedDict[int, tuple[int, FloatArray, str | None]] = OrderedDict()
        self._pending_by_item: dict[int, deque[int]] = {}
        self._next_impression = 0
        self._warned: set[str] = set()
        theta0 = np.zeros(config.context_dim)
        theta0[1] = config.score_prior
        if user_prior is not None:
            prior = np.asarray(user_prior, dtype=np.float64)
            if prior.shape != (config.feature_dim,) or not np.isfinite(prior).all():
                raise ConfigError(
                    f"user_prior must be {config.feature_dim} finite numbers, "
                    f"got shape {prior.shape}"
                )
            theta0[2:] = prior
        self.posterior = LinearPosterior(
            config.context_dim, config.prior_variance, theta0, config.refresh_every
        )

    # ------------------------------------------------------------------ selection
    def select(
        self,
        candidates: npt.ArrayLike,
        model_scores: npt.ArrayLike,
        item_features: npt.ArrayLike,
        k: int | None = None,
        rng: np.random.Generator | None = None,
        diversity_embeddings: npt.ArrayLike | None = None,
        tag: str | None = None,
    ) -> IntArray:
        """Choose a slate of ``k`` item ids (default ``slate_size``) among ``candidates``.

        Args:
            candidates: distinct item ids, the model's top-N (at most ``max(top_n, k)`` are
                used, the best-scored ones).
            model_scores: the model's score of each candidate (NaN ranks last).
            item_features: ``(len(candidates), feature_dim)`` features (non-finite -> 0).
            k: slate size; capped at the number of candidates.
            rng: randomness for exploration (default: the policy's own seeded generator).
            diversity_embeddings: ``(len(candidates), e)`` vectors whose cosine similarity the
                MMR term uses (the LM text embeddings); default ``item_features``.
            tag: names this slate (the device's recommendation id), so that feedback carrying
                the same tag is matched to this slate's impression of an item even when the
                item is pending in several slates, each with its own context.

        Returns the slate in display order. Every shown item becomes a pending impression.
        """
        if tag is not None and not isinstance(tag, str):
            raise DataError(f"slate tag must be a string, got {type(tag).__name__}")
        cand, scores, feats, emb = self._check_inputs(
            candidates, model_scores, item_features, diversity_embeddings
        )
        size = self.config.slate_size if k is None else int(k)
        if size < 1:
            raise DataError(f"slate size k must be >= 1, got {k}")
        # best-scored first: the clipped score context ties the top outliers, and a tie in
        # the index goes to the earlier candidate, which must be the higher-scored one (with
        # no exploration the slate is then exactly the model's top k, in any input order)
        by_score = np.argsort(-np.nan_to_num(scores, nan=-np.inf), kind="stable")
        cand, scores, feats = cand[by_score], scores[by_score], feats[by_score]
        emb = emb[by_score] if emb is not None else None
        pool = max(self.config.top_n, size)  # a slate larger than top_n still fills up
        if len(cand) > pool:
            keep = top_k(scores, pool)
            cand, scores, feats = cand[keep], scores[keep], feats[keep]
            emb = emb[keep] if emb is not None else None
        size = min(size, len(cand))
        generator = self.rng if rng is None else rng
        contexts = self.contexts(scores, feats)
        index = self._index(contexts, scores, generator)
        sim_source = feats if emb is None else emb
        # NaN / -inf scores map to the lowest z, which the exploration terms would reward:
        # such candidates only fill a slate the others cannot
        valid = np.flatnonzero(~(np.isnan(scores) | (scores == -np.inf)))
        picked = self._choose(index[valid], sim_source[valid], min(size, len(valid)), generator)
        rest = np.setdiff1d(np.arange(len(cand)), valid)[: size - len(picked)]
        chosen = np.concatenate([valid[picked], rest]).astype(np.int64)
        for pos in chosen:
            self._add_impression(int(cand[pos]), contexts[pos], tag)
        return cand[chosen].astype(np.int64)

    def contexts(self, scores: FloatArray, features: FloatArray) -> FloatArray:
        """Context rows ``[1, z(score), f]``, each brought down to ``max_feature_norm``.

        A row too long gives up its features' length first, ``[1, z]`` only when that alone
        is longer (then its features are 0): scaled whole, an item with long features lost
        its score's place, and a policy exploring nothing no longer showed the model's top-k.
        """
        n = len(scores)
        finite = np.isfinite(scores)
        z = np.full(n, -_SCORE_CLIP)  # -inf (and NaN, mapped to -inf) scores: the lowest z
        z[scores == np.inf] = _SCORE_CLIP
        if finite.any():
            s = scores[finite]
            s = s / max(float(np.abs(s).max()), 1e-300)  # no overflow for scores near 1e308
            std = float(s.std())
            z[finite] = (s - s.mean()) / std if std > 0 else 0.0
        z = np.clip(np.nan_to_num(z), -_SCORE_CLIP, _SCORE_CLIP)
        cap = self.config.max_feature_norm
        head = np.sqrt(1.0 + z * z)  # the length of [1, z]
        # the features' length, dividing by their largest entry first: it stays finite for
        # entries near the float64 limit
        feats = np.array(features, dtype=np.float64)
        peak = np.abs(feats).max(axis=1) if feats.shape[1] else np.zeros(n)
        unit = np.divide(feats, peak[:, None], out=np.zeros_like(feats), where=peak[:, None] > 0)
        unit_norm = np.linalg.norm(unit, axis=1)
        room = np.sqrt(np.maximum(cap * cap - head * head, 0.0))
        shrink = peak * unit_norm > room  # the row is longer than cap
        feats[shrink] = unit[shrink] * (room[shrink] / unit_norm[shrink])[:, None]
        scale = np.minimum(1.0, cap / head)
        x = np.empty((n, self.config.context_dim))
        x[:, 0] = scale
        x[:, 1] = z * scale
        x[:, 2:] = feats
        return x

    @abstractmethod
    def _index(
        self, contexts: FloatArray, scores: FloatArray, rng: np.random.Generator
    ) -> FloatArray:
        """The policy's value of each candidate (higher is shown first)."""

    def _choose(
        self, index: FloatArray, embeddings: FloatArray, k: int, rng: np.random.Generator
    ) -> IntArray:
        """Top-``k`` positions by ``index``, diversified by MMR when ``mmr_lambda < 1``."""
        return mmr_select(index, embeddings, k, self.config.mmr_lambda)

    # ------------------------------------------------------------------ feedback
    def update(self, item: object, reward: object) -> bool:
        """Learn from the reward of one shown item; ``False`` (logged, counted) if refused."""
        return self.update_many([item], [reward]) == 1

    def update_many(
        self,
        items: Sequence[object],
        rewards: Sequence[object],
        tags: Sequence[str | None] | None = None,
    ) -> int:
        """Feedback for several impressions at once (one rank-m posterior update).

        ``tags`` (one per item) name the slate each feedback is about (the ``tag`` given to
        :meth:`select`): the item's impression in that slate is consumed, and feedback for a
        slate the item is no longer pending in is refused. Without a tag, the item's oldest
        pending impression is consumed.

        Returns how many were accepted; refused ones are logged and counted by reason, one
        count per report (a batch the posterior cannot take without turning non-finite is
        refused whole: ``rejected_numerical`` grows by its size).
        """
        if len(items) != len(rewards):
            raise DataError(f"{len(items)} items but {len(rewards)} rewards")
        if tags is None:
            tags = [None] * len(items)
        elif len(tags) != len(items):
            raise DataError(f"{len(items)} items but {len(tags)} slate tags")
        rows: list[FloatArray] = []
        values: list[float] = []
        for item, reward, tag in zip(items, rewards, tags, strict=True):
            accepted = self._accept(item, reward, tag)
            if accepted is not None:
                rows.append(accepted[0])
                values.append(accepted[1])
        if not rows:
            return 0
        if self._learns and not self.posterior.update(np.stack(rows), np.asarray(values)):
            self._refuse(
                "numerical",
                f"{len(rows)} updates would make the posterior non-finite",
                count=len(rows),
            )
            return 0
        self.feedback_counts["accepted"] += len(rows)
        return len(rows)

    _learns: ClassVar[bool] = True

    def _accept(
        self, item: object, reward: object, tag: str | None = None
    ) -> tuple[FloatArray, float] | None:
        """Validate one feedback; consume its impression and return (context, clipped reward)."""
        if not is_int(item):
            self._refuse("bad_item", f"item id {item!r} is not an integer")
            return None
        idx = int(item)
        if not 0 <= idx < self.n_items:
            self._refuse("unknown_item", f"item {idx} is not in the catalog [0, {self.n_items})")
            return None
        if isinstance(reward, bool | np.bool_):
            reward = float(reward)  # a click flag
        if not _is_number(reward):
            self._refuse("bad_reward", f"reward {reward!r} for item {idx} is not a number")
            return None
        if not math.isfinite(float(reward)):  # type: ignore[arg-type]
            self._refuse("nonfinite_reward", f"reward {reward!r} for item {idx} is not finite")
            return None
        queue = self._pending_by_item.get(idx)
        if tag is None:
            impression = queue[0] if queue else None
        else:  # the slate's own impression; else one shown before slates had tags
            impression = next((i for i in queue or () if self._pending[i][2] == tag), None)
            if impression is None:
                impression = next((i for i in queue or () if self._pending[i][2] is None), None)
        if impression is None:
            where = "" if tag is None else f" in slate {tag!r}"
            self._refuse("not_shown", f"item {idx} has no impression{where} awaiting feedback")
            return None
        assert queue is not None
        queue.remove(impression)
        if not queue:
            del self._pending_by_item[idx]
        _, context, _ = self._pending.pop(impression)
        value = float(reward)  # type: ignore[arg-type]
        clipped = min(max(value, self.config.reward_min), self.config.reward_max)
        if clipped != value:
            self.feedback_counts["clipped_reward"] += 1
        return context, clipped

    def _refuse(self, reason: str, detail: str, count: int = 1) -> None:
        """Count ``count`` refused reports (one each, as accepted ones are); warn once per
        reason without their items or slates (which items a user was shown or clicked is
        behaviour: on a device it stays out of the logs unless their owner asks for DEBUG)."""
        self.feedback_counts[f"rejected_{reason}"] += count
        if reason not in self._warned:
            self._warned.add(reason)
            logger.warning("bandit feedback ignored (%s); counted in feedback_counts", reason)
        logger.debug("bandit feedback ignored (%s): %s", reason, detail)

    def _add_impression(self, item: int, context: FloatArray, tag: str | None = None) -> None:
        while len(self._pending) >= self.config.max_pending:
            _, (old_item, _, _) = self._pending.popitem(last=False)
            queue = self._pending_by_item[old_item]
            queue.popleft()
            if not queue:
                del self._pending_by_item[old_item]
            self.feedback_counts["expired_impressions"] += 1
        impression = self._next_impression
        self._next_impression += 1
        self._pending[impression] = (item, context.copy(), tag)
        self._pending_by_item.setdefault(item, deque()).append(impression)

    def clear_pending(self) -> int:
        """Forget every impression still waiting for feedback (counted as expired)."""
        n = len(self._pending)
        self._pending.clear()
        self._pending_by_item.clear()
        self.feedback_counts["expired_impressions"] += n
        return n

    @property
    def n_pending(self) -> int:
        """Impressions still waiting for feedback."""
        return len(self._pending)

    # ------------------------------------------------------------------ state
    def checkpoint(self) -> PolicyCheckpoint:
        """The in-memory state now, for :meth:`rollback`: a device that could not save a
        slate does not show it, and the slate must then leave no trace (no impression that
        feedback could match, no expiry, no count, no random draw)."""
        post = self.posterior
        return PolicyCheckpoint(
            pending=OrderedDict(self._pending),
            pending_by_item={item: deque(q) for item, q in self._pending_by_item.items()},
            next_impression=self._next_impression,
            feedback_counts=Counter(self.feedback_counts),
            warned=frozenset(self._warned),
            rng=self.rng,
            rng_state=self.rng.bit_generator.state,
            posterior=dict(vars(post)),
        )

    def rollback(self, checkpoint: PolicyCheckpoint) -> None:
        """Return to the state :meth:`checkpoint` took (undo every later select and update)."""
        self._pending = OrderedDict(checkpoint.pending)
        self._pending_by_item = {i: deque(q) for i, q in checkpoint.pending_by_item.items()}
        self._next_impression = checkpoint.next_impression
        self.feedback_counts = Counter(checkpoint.feedback_counts)
        self._warned = set(checkpoint.warned)
        self.rng = checkpoint.rng
        self.rng.bit_generator.state = checkpoint.rng_state
        vars(self.posterior).update(checkpoint.posterior)

    def state_dict(self, *, pending: bool = True) -> dict[str, Any]:
        """Everything the device must persist, as JSON-able values.

        ``pending=False`` leaves the pending impressions out (and records the next impression
        id instead): a device keeps each of them as its own record
        (:meth:`pending_entries`), so that a slate writes its own impressions rather than
        all of them again.
        """
        out = {
            "format": STATE_FORMAT,
            "policy": self.name,
            "config": self.config.as_dict(),
            "n_items": self.n_items,
            "posterior": self.posterior.state_dict(),
            "feedback_counts": dict(self.feedback_counts),
        }
        if pending:
            out["pending"] = list(self.pending_entries().values())
        else:
            out["next_impression"] = self._next_impression
        return out

    def awaits(self, item: int, tag: str | None) -> bool:
        """Whether the impression of ``item`` in slate ``tag`` (exactly that tag) still
        awaits feedback: feedback on it was never learned from."""
        return any(self._pending[i][2] == tag for i in self._pending_by_item.get(item, ()))

    def pending_ids(self) -> set[int]:
        """The ids of the impressions awaiting feedback (ids grow with every impression)."""
        return set(self._pending)

    def pending_entries(self, ids: Iterable[int] | None = None) -> dict[int, list[Any]]:
        """Each impression awaiting feedback by its id (all, or those of ``ids``), in the
        order shown, as JSON-able ``[item, context, tag]``."""
        wanted = self._pending.keys() if ids is None else sorted(set(ids) & self._pending.keys())
        out: dict[int, list[Any]] = {}
        for i in wanted:
            item, ctx, tag = self._pending[i]
            out[i] = [item, ctx.tolist(), tag]
        return out

    def load_state_dict(
        self, state: dict[str, Any], pending: Mapping[int, object] | None = None
    ) -> None:
        """Restore :meth:`state_dict` output; refuses (``ModelFileError``) anything invalid.

        A state saved with ``pending=False`` takes its pending impressions from ``pending``
        (:meth:`pending_entries` output, ids kept); one saved with them ignores ``pending``.
        The saved config must agree with this policy's on :data:`POSTERIOR_FIELDS`: a
        posterior learned under other features, priors or reward range would be silently
        wrong. The other settings may differ (an owner tuning exploration keeps what the
        policy learned).
        """
        if not isinstance(state, dict):
            raise ModelFileError(f"bandit state must be a mapping, got {type(state).__name__}")
        if state.get("format") != STATE_FORMAT:
            raise ModelFileError(
                f"bandit state format is {state.get('format')!r}, expected {STATE_FORMAT!r}"
            )
        if state.get("policy") != self.name:
            raise ModelFileError(
                f"bandit state is for policy {state.get('policy')!r}, not {self.name!r}"
            )
        saved = state.get("config")
        saved = saved if isinstance(saved, dict) else {}
        changed = sorted(
            k for k, v in self.config.posterior_settings().items() if saved.get(k) != v
        )
        if changed:
            raise ModelFileError(
                f"bandit state was learned under other {', '.join(changed)} than the config's"
            )
        if state.get("n_items") != self.n_items:
            raise ModelFileError(
                f"bandit state is for {state.get('n_items')!r} items, this catalog has "
                f"{self.n_items}"
            )
        counts = state.get("feedback_counts")
        if not isinstance(counts, dict) or not all(
            isinstance(k, str) and _is_count(v) for k, v in counts.items()
        ):
            raise ModelFileError("bandit feedback_counts must map names to integers >= 0")
        entries: dict[int, object]
        if "pending" in state:
            raw = state["pending"]
            if not isinstance(raw, list):
                raise ModelFileError("bandit pending impressions must be a list")
            entries, next_impression = dict(enumerate(raw)), len(raw)
        else:
            entries, stored = dict(pending or {}), state.get("next_impression")
            if not _is_count(stored) or not all(_is_count(i) and i < stored for i in entries):
                raise ModelFileError(
                    "bandit pending impression ids must be integers below next_impression"
                )
            next_impression = stored
        # more pending impressions than max_pending (an owner lowered it): the oldest expire,
        # as they would have while waiting; the posterior is kept (max_pending shapes no part
        # of what it learned)
        parsed = {i: self._parse_entry(entries[i]) for i in sorted(entries)}
        posterior = state.get("posterior")
        if not isinstance(posterior, dict):
            raise ModelFileError("bandit state has no posterior mapping")
        self.posterior.load_state_dict(posterior)
        self.feedback_counts = Counter(counts)
        self._pending.clear()
        self._pending_by_item.clear()
        for impression, (item, ctx, tag) in parsed.items():
            self._next_impression = impression
            self._add_impression(item, ctx, tag)
        self._next_impression = next_impression

    def _parse_entry(self, entry: object) -> tuple[int, FloatArray, str | None]:
        """A pending impression ``[item, context]`` or ``[item, context, tag]`` (the tag came
        later; states written before it still load, untagged)."""
        ok = isinstance(entry, list | tuple) and len(entry) in (2, 3)
        item = entry[0] if ok else None  # type: ignore[index]
        tag = entry[2] if ok and len(entry) == 3 else None  # type: ignore[arg-type,index]
        if (
            not ok
            or isinstance(item, bool)
            or not isinstance(item, int)
            or not (tag is None or isinstance(tag, str))
        ):
            raise ModelFileError(f"bad pending impression {entry!r}")
        if not 0 <= item < self.n_items:
            raise ModelFileError(f"pending impression of unknown item {item}")
        try:
            ctx = np.asarray(entry[1], dtype=np.float64)  # type: ignore[index]
        except (TypeError, ValueError):
            raise ModelFileError(f"bad pending context for item {item}") from None
        if ctx.shape != (self.config.context_dim,) or not np.isfinite(ctx).all():
            raise ModelFileError(f"bad pending context for item {item}")
        if float(np.linalg.norm(ctx)) > self.config.max_feature_norm * (1 + 1e-9):
            raise ModelFileError(f"pending context of item {item} exceeds max_feature_norm")
        return item, ctx, tag

    # ------------------------------------------------------------------ checks
    def _check_inputs(
        self,
        candidates: npt.ArrayLike,
        model_scores: npt.ArrayLike,
        item_features: npt.ArrayLike,
        diversity_embeddings: npt.ArrayLike | None,
    ) -> tuple[IntArray, FloatArray, FloatArray, FloatArray | None]:
        raw = np.asarray(candidates)
        if raw.ndim != 1 or raw.size == 0 or not np.issubdtype(raw.dtype, np.integer):
            raise DataError(f"candidates must be a non-empty 1-D integer array, got {raw!r}")
        cand = raw.astype(np.int64)
        if cand.min() < 0 or cand.max() >= self.n_items:
            raise DataError(f"candidates must be item ids in [0, {self.n_items})")
        if len(np.unique(cand)) != len(cand):
            raise DataError("candidates must be distinct item ids")
        scores = np.asarray(model_scores, dtype=np.float64).copy()
        if scores.shape != cand.shape:
            raise DataError(f"model_scores has shape {scores.shape}, expected {cand.shape}")
        if not np.isfinite(scores).all():
            self.feedback_counts["nonfinite_scores"] += int((~np.isfinite(scores)).sum())
            scores[np.isnan(scores)] = -np.inf
        feats = np.asarray(item_features, dtype=np.float64).copy()
        d = self.config.feature_dim
        if feats.shape != (len(cand), d):
            raise DataError(f"item_features has shape {feats.shape}, expected {(len(cand), d)}")
        bad = ~np.isfinite(feats)
        if bad.any():
            self.feedback_counts["nonfinite_features"] += int(bad.any(axis=1).sum())
            feats[bad] = 0.0
        emb: FloatArray | None = None
        if diversity_embeddings is not None:
            emb = np.asarray(diversity_embeddings, dtype=np.float64)
            if emb.ndim != 2 or emb.shape[0] != len(cand):
                raise DataError(
                    f"diversity_embeddings has shape {emb.shape}, expected ({len(cand)}, e)"
                )
            emb = np.where(np.isfinite(emb), emb, 0.0)
        return cand, scores, feats, emb


class GreedyPolicy(Policy):
    """The baseline: the model's own top-k (plus MMR if configured); never learns.

    Feedback is still checked and counted, so devices report the same counters whatever the
    policy.
    """

    name = "greedy"
    _learns = False

    def _index(
        self, contexts: FloatArray, scores: FloatArray, rng: np.random.Generator
    ) -> FloatArray:
        return scores


class EpsilonGreedyPolicy(Policy):
    """Posterior-mean ranking; each slate slot is a uniformly random candidate w.p. epsilon.

    With ``epsilon = 0`` and no feedback yet it is exactly greedy (the prior ranks by score).
    """

    name = "epsilon_greedy"

    def _index(
        self, contexts: FloatArray, scores: FloatArray, rng: np.random.Generator
    ) -> FloatArray:
        return self.posterior.mean(contexts)

    def _choose(
        self, index: FloatArray, embeddings: FloatArray, k: int, rng: np.random.Generator
    ) -> IntArray:
        exploit = mmr_select(index, embeddings, len(index), self.config.mmr_lambda)
        taken = np.zeros(len(index), dtype=bool)
        slate: list[int] = []
        cursor = 0
        for _ in range(k):
            if rng.random() < self.config.epsilon:
                pos = int(rng.choice(np.flatnonzero(~taken)))
            else:
                while taken[exploit[cursor]]:
                    cursor += 1
                pos = int(exploit[cursor])
            taken[pos] = True
            slate.append(pos)
        return np.asarray(slate, dtype=np.int64)


class ThompsonPolicy(Policy):
    """Gaussian linear Thompson sampling: rank by ``x . theta~`` with one posterior draw."""

    name = "thompson"

    def _index(
        self, contexts: FloatArray, scores: FloatArray, rng: np.random.Generator
    ) -> FloatArray:
        theta = self.posterior.sample(rng, self.config.thompson_scale)
        return np.asarray(contexts @ theta, dtype=np.float64)


class LinUCBPolicy(Policy):
    """LinUCB (Li et al. 2010): rank by ``x . theta_hat + alpha sqrt(x A^-1 x)``."""

    name = "linucb"

    def _index(
        self, contexts: FloatArray, scores: FloatArray, rng: np.random.Generator
    ) -> FloatArray:
        post = self.posterior
        return post.mean(contexts) + self.config.alpha * post.width(contexts)


_POLICIES: dict[str, type[Policy]] = {
    cls.name: cls for cls in (GreedyPolicy, EpsilonGreedyPolicy, ThompsonPolicy, LinUCBPolicy)
}


def make_policy(config: BanditConfig, n_items: int, user_prior: FloatArray | None = None) -> Policy:
    """Build the policy ``config.policy`` for a catalog of ``n_items`` items.

    ``user_prior`` (``feature_dim`` numbers) seeds the posterior mean of the feature weights
    with the user's representation (e.g. a scaled mean of their history's item features).
    """
    return _POLICIES[config.policy](config, n_items, user_prior)
