"""Bandit evaluation against the synthetic world's ground truth: regret, coverage, diversity.

Why: offline logs cannot tell what a user *would* have clicked on an item they were never
shown; the synthetic world can (:meth:`~shared.data.synthetic.SyntheticWorld.true_preference`).
So this harness closes the loop: every policy serves simulated sessions and learns from the
clicks it causes.

The set-up, per seed:

1. The world (``world_seed``) is split by the protocol; the base model (EASE by default) is
   fitted on every non-cold user's training sequences.
2. ``n_users`` federated users are drawn (``seed``). Each user's history is their whole logged
   sequence; the candidates are the base model's top-N unseen items, fixed for the session.
3. Item features come from data, never from the latent truth: ``text`` = the LM text
   embeddings reduced to ``feature_dim`` by PCA; ``mf`` = item factors of the training
   interaction matrix (top eigenvectors of its item-item Gram matrix).
4. For ``steps`` steps the policy shows a slate of ``slate_size`` candidates; each shown item
   is clicked with probability ``true_preference(user, item)`` (the user's taste at the end of
   their logged sequence, constant during the session; the same Bernoulli draw as
   :meth:`~shared.data.synthetic.SyntheticWorld.sample_click`, vectorised over the slate); the
   policy learns from every click and non-click at once (semi-bandit feedback). Items may be
   shown again in later steps.

**Regret** (pseudo-regret, free of click noise): per step, the *oracle* shows the
``slate_size`` candidates with the highest true preference; regret is the oracle's expected
clicks minus the policy's, summed over steps and averaged over users. Re-ranking cannot do
better than its candidates, so this is the regret a re-ranker is responsible for.
``regret_vs_all_unseen`` uses the best unseen items of the whole catalog instead (it adds the
base model's candidate-generation loss, the same for every policy).

**Coverage** is the share of the catalog shown at least once to any simulated user (it cannot
exceed ``candidate_coverage``, the union of everyone's top-N); **user coverage** is the mean
number of distinct items one device showed, over the catalog size;
**intra-list diversity** is ``1 - mean pairwise cosine`` of the slate's LM text embeddings;
**novelty** is the slate's mean ``-log2`` popularity (share of users, add-one smoothed).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields
from typing import Any

import numpy as np
import numpy.typing as npt

from shared.bandits.diversity import item_popularity, normalize_rows, top_k
from shared.bandits.features import FEATURE_SOURCES, item_features, mf_features
from shared.bandits.policies import BanditConfig, make_policy
from shared.config import is_int
from shared.data.dataset import RecDataset
from shared.data.synthetic import SyntheticConfig, SyntheticWorld, generate_world
from shared.errors import ConfigError
from shared.eval.splits import SplitConfig, split_users
from shared.models.base import Recommender
from shared.models.baselines import EASE, ItemKNN, TextOnly

__all__ = [
    "Arm",
    "EmbedFn",
    "SimulationConfig",
    "default_arms",
    "fit_base_model",
    "run_simulation",
    "summarize_runs",
]

log = logging.getLogger(__name__)

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]
EmbedFn = Callable[[Sequence[str]], npt.NDArray[np.float32]]

REGRET_TARGET = 0.8
"""The issue's target: the best policy's regret after ``steps`` <= 0.8x greedy's ..."""
COVERAGE_TARGET = 3.0
"""... with catalog coverage >= 3x greedy's."""
BASE_MODELS: tuple[str, ...] = ("ease", "itemknn", "text")
MAX_STEPS = 100_000
"""Most steps per session: 500x the default. Every arm keeps ``users x steps`` traces (a few
GiB at this bound), so an unbounded ``--steps`` failed allocating them with a traceback."""


@dataclass(frozen=True)
class Arm:
    """One policy under evaluation: a display name and its deployment config."""

    name: str
    config: BanditConfig

    def stream_key(self) -> list[int]:
        """Seed words of this arm's exploration stream: a digest of its config (the policy
        and every setting), so an arm draws the same numbers whatever its place in the arm
        list and whichever other arms run beside it (an index in the list used to seed it).
        A numpy number counts as the Python number of the same value."""
        values = {
            k: v.item() if isinstance(v, np.generic) else v
            for k, v in self.config.as_dict().items()
        }
        spec = json.dumps(values, sort_keys=True).encode()
        digest = hashlib.sha256(spec).digest()
        return [int.from_bytes(digest[i : i + 4], "little") for i in range(0, 16, 4)]


@dataclass(frozen=True)
class SimulationConfig:
    """The simulated sessions (see the module docstring); validated on construction.

    Attributes:
        world_seed: seed of the synthetic world and of its protocol split.
        n_world_users: users in the world (the default world has 1,000).
        seed: seed of the session users drawn, the clicks and the exploration.
        n_users: simulated users (devices), drawn from the federated users.
        steps: steps per session (``T``).
        features: item features for the policies: ``text`` (PCA of LM embeddings) or ``mf``.
        base_model: the candidate generator: ``ease``, ``itemknn`` or ``text`` (text-only).
        ease_l2: EASE's lambda.
        user_prior_weight: the user representation as the policies' prior: the feature
            weights' prior mean is the mean feature vector of the user's history, scaled to this
            norm (0 = off: the user enters only through the model's scores).
    """

    world_seed: int = 42
    n_world_users: int = 1000
    seed: int = 0
    n_users: int = 200
    steps: int = 200
    features: str = "text"
    base_model: str = "ease"
    ease_l2: float = 250.0
    user_prior_weight: float = 0.0

    def __post_init__(self) -> None:
        for name, low in (("world_seed", 0), ("n_world_users", 10), ("seed", 0)):
            _check_int(name, getattr(self, name), low)
        _check_int("n_users", self.n_users, 1)
        _check_int("steps", self.steps, 1, MAX_STEPS)
        if self.features not in FEATURE_SOURCES:
            raise ConfigError(
                f"--features must be one of {', '.join(FEATURE_SOURCES)}, got {self.features!r}"
            )
        if self.base_model not in BASE_MODELS:
            raise ConfigError(
                f"--base-model must be one of {', '.join(BASE_MODELS)}, got {self.base_model!r}"
            )
        if not (math.isfinite(self.ease_l2) and self.ease_l2 > 0):
            raise ConfigError(f"ease-l2 must be > 0, got {self.ease_l2}")
        w = self.user_prior_weight
        if isinstance(w, bool) or not isinstance(w, int | float) or not 0 <= w <= 100:
            raise ConfigError(f"user-prior-weight must be in [0, 100], got {w!r}")

    def as_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


#: The flags of `fedrec bandits` that set a simulation field of another name.
_FLAGS = {"n_users": "--users", "steps": "--steps", "seed": "--seed", "world_seed": "--seed"}


def _check_int(name: str, value: object, low: int, high: int | None = None) -> None:
    if not is_int(value) or value < low or (high is not None and value > high):
        key = _FLAGS.get(name, name.replace("_", "-"))
        bound = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise ConfigError(f"{key} must be an integer {bound}, got {value!r}")


def default_arms(base: BanditConfig | None = None) -> list[Arm]:
    """The policies compared by default, all sharing ``base``'s shape (top-N, k, d).

    Greedy without diversity is the baseline; every learning policy runs with the
    configured MMR diversity term, and greedy + MMR isolates what diversity alone does.
    """
    cfg = BanditConfig() if base is None else base
    lam = cfg.mmr_lambda

    def arm(policy: str, mmr: float) -> Arm:
        name = policy if mmr >= 1.0 else f"{policy}+mmr{mmr:g}"
        return Arm(name, _replace(cfg, policy=policy, mmr_lambda=mmr))

    arms = [arm("greedy", 1.0)]
    if lam < 1.0:
        arms.append(arm("greedy", lam))
    arms += [arm("epsilon_greedy", lam), arm("thompson", lam), arm("linucb", lam)]
    if lam < 1.0:
        arms.append(arm("linucb", 1.0))
    return arms


def _replace(cfg: BanditConfig, **changes: Any) -> BanditConfig:
    values = cfg.as_dict()
    values.update(changes)
    return BanditConfig(**values)


def fit_base_model(
    name: str,
    sequences: Sequence[IntArray],
    n_items: int,
    *,
    text_embeddings: npt.ArrayLike | None = None,
    ease_l2: float = 250.0,
) -> Recommender:
    """Fit the candidate generator ``name`` (``ease``, ``itemknn`` or ``text``)."""
    model: Recommender
    if name == "ease":
        model = EASE(l2=ease_l2)
    elif name == "itemknn":
        model = ItemKNN()
    elif name == "text":
        if text_embeddings is None:
            raise ConfigError("base model 'text' needs the item text embeddings")
        model = TextOnly(np.asarray(text_embeddings, dtype=np.float32))
    else:
        raise ConfigError(f"unknown base model {name!r}; use {', '.join(BASE_MODELS)}")
    return model.fit(sequences, n_items)


# ---------------------------------------------------------------------------- simulation
@dataclass
class _ArmTrace:
    """Per-arm accumulators over users and steps."""

    expected: FloatArray  # (users, steps) expected clicks of the slate
    clicks: FloatArray  # (users, steps) realised clicks
    ild: FloatArray  # (users, steps)
    novelty: FloatArray  # (users, steps)
    shown: npt.NDArray[np.bool_]  # (n_items,) shown to anyone
    distinct_per_user: IntArray  # (users,)
    rejected: int = 0
    seconds: float = 0.0


def run_simulation(
    config: SimulationConfig,
    arms: Sequence[Arm],
    *,
    embed: EmbedFn | None = None,
    world: SyntheticWorld | None = None,
    synthetic: SyntheticConfig | None = None,
) -> dict[str, Any]:
    """Simulate sessions for every arm; returns a JSON-able report (see module docstring).

    Args:
        config: sessions, features and base model.
        arms: the policies; they must agree on ``top_n``, ``slate_size`` and ``feature_dim``.
        embed: item texts -> unit-norm embeddings (the LM encoder); needed for ``text``
            features, the ``text`` base model and diversity. Without it the world's text is
            not used: MMR and intra-list diversity fall back to the ``mf`` features.
        world: a pre-generated world (else generated from ``synthetic`` or ``world_seed``).
        synthetic: world config (default ``SyntheticConfig(seed=world_seed,
            n_users=n_world_users)``).
    """
    if not arms:
        raise ConfigError("no arms (policies) to simulate")
    shape = {(a.config.top_n, a.config.slate_size, a.config.feature_dim) for a in arms}
    if len(shape) != 1:
        raise ConfigError(f"arms disagree on (top_n, slate_size, feature_dim): {sorted(shape)}")
    top_n, k, dim = shape.pop()
    if world is None:
        wcfg = synthetic or SyntheticConfig(seed=config.world_seed, n_users=config.n_world_users)
        world = generate_world(wcfg)
    ds = world.dataset
    split = split_users(ds, SplitConfig(seed=config.world_seed))
    train = split.train_sequences()
    text = None if embed is None else np.asarray(embed(ds.item_text), dtype=np.float64)
    if text is None and (config.features == "text" or config.base_model == "text"):
        raise ConfigError("text features / the text base model need an embedding function")
    feats = item_features(
        config.features, dim, text_embeddings=text, sequences=train, n_items=ds.n_items
    )
    sim_vectors = normalize_rows(
        text if text is not None else mf_features(train, ds.n_items, max(dim, 8))
    )
    base = fit_base_model(
        config.base_model, train, ds.n_items, text_embeddings=text, ease_l2=config.ease_l2
    )
    popularity = item_popularity(train, ds.n_items)
    self_info = -np.log2(popularity)

    rng = np.random.default_rng([config.seed, 7])
    pool = split.federated_users
    if len(pool) < config.n_users:
        raise ConfigError(f"--users ({config.n_users}) exceeds the {len(pool)} federated users")
    users = np.sort(rng.choice(pool, size=config.n_users, replace=False))

    traces = {
        a.name: _ArmTrace(
            expected=np.zeros((len(users), config.steps)),
            clicks=np.zeros((len(users), config.steps)),
            ild=np.zeros((len(users), config.steps)),
            novelty=np.zeros((len(users), config.steps)),
            shown=np.zeros(ds.n_items, dtype=bool),
            distinct_per_user=np.zeros(len(users), dtype=np.int64),
        )
        for a in arms
    }
    if len({a.name for a in arms}) != len(arms):
        raise ConfigError("arm names must be distinct")
    candidate_pool = np.zeros(ds.n_items, dtype=bool)
    oracle = np.zeros(len(users))
    oracle_all = np.zeros(len(users))
    base_value = np.zeros(len(users))
    for row, user in enumerate(users):
        u = int(user)
        hist = ds.sequences[u]
        scores = np.asarray(base.score([hist])[0], dtype=np.float64)
        scores[hist] = -np.inf
        cand = top_k(scores, top_n)
        # fewer unseen items than top_n: the history (-inf) is no candidate, nor the oracle's
        cand = cand[scores[cand] > -np.inf]  # +inf (the surest item) stays; NaN never ranks
        candidate_pool[cand] = True
        prefs = np.asarray(world.true_preference(u, cand), dtype=np.float64)
        oracle[row] = float(np.sort(prefs)[-k:].sum())
        unseen = np.setdiff1d(np.arange(ds.n_items), hist)
        oracle_all[row] = float(np.sort(world.true_preference(u, unseen))[-k:].sum())
        base_value[row] = float(prefs[:k].sum())
        position = {int(item): pos for pos, item in enumerate(cand)}
        cand_sims = sim_vectors[cand] @ sim_vectors[cand].T
        user_prior = _user_prior(feats, hist, config.user_prior_weight)
        for arm in arms:
            start = time.perf_counter()
            tr = traces[arm.name]
            _run_session(
                arm.config,
                world,
                u,
                row,
                cand,
                scores[cand],
                feats[cand],
                sim_vectors[cand],
                prefs,
                position,
                cand_sims,
                self_info,
                config.steps,
                np.random.default_rng([config.seed, u, 1]),
                np.random.default_rng([config.seed, u, 2, *arm.stream_key()]),
                tr,
                user_prior,
            )
            tr.seconds += time.perf_counter() - start
        if (row + 1) % 25 == 0:
            log.info("simulated %d/%d users", row + 1, len(users))

    results = {
        arm.name: _arm_summary(arm, traces[arm.name], oracle, oracle_all, ds.n_items)
        for arm in arms
    }
    greedy = next((a.name for a in arms if a.name == "greedy"), None)
    if greedy is not None:
        g = results[greedy]
        for entry in results.values():
            entry["regret_ratio_vs_greedy"] = _ratio(entry["final_regret"], g["final_regret"])
            entry["coverage_ratio_vs_greedy"] = _ratio(entry["coverage"], g["coverage"])
            entry["user_coverage_ratio_vs_greedy"] = _ratio(
                entry["user_coverage"], g["user_coverage"]
            )
    return {
        "world": {**world.config.as_dict(), **_dataset_info(ds)},
        "simulation": config.as_dict(),
        "users": len(users),
        "oracle_expected_clicks_per_step": float(oracle.mean()),
        "oracle_all_unseen_expected_clicks_per_step": float(oracle_all.mean()),
        "base_top_k_expected_clicks_per_step": float(base_value.mean()),
        "candidate_coverage": float(candidate_pool.mean()),
        "arms": results,
    }


def _run_session(
    cfg: BanditConfig,
    world: SyntheticWorld,
    user: int,
    row: int,
    cand: IntArray,
    cand_scores: FloatArray,
    cand_feats: FloatArray,
    cand_emb: FloatArray,
    prefs: FloatArray,
    position: dict[int, int],
    cand_sims: FloatArray,
    self_info: FloatArray,
    steps: int,
    click_rng: np.random.Generator,
    policy_rng: np.random.Generator,
    tr: _ArmTrace,
    user_prior: FloatArray | None,
) -> None:
    """One user's session under one policy; fills row ``row`` of the trace."""
    policy = make_policy(cfg, world.n_items, user_prior)
    shown_here = np.zeros(len(cand), dtype=bool)
    for step in range(steps):
        slate = policy.select(
            cand, cand_scores, cand_feats, cfg.slate_size, policy_rng, diversity_embeddings=cand_emb
        )
        pos = np.fromiter((position[int(i)] for i in slate), dtype=np.int64, count=len(slate))
        p = prefs[pos]
        # exactly SyntheticWorld.sample_click (rng.random() < true_preference), vectorised
        clicked = click_rng.random(len(pos)) < p
        policy.update_many(slate.tolist(), clicked.astype(np.float64).tolist())
        tr.expected[row, step] = float(p.sum())
        tr.clicks[row, step] = float(clicked.sum())
        if len(pos) > 1:
            sub = cand_sims[np.ix_(pos, pos)]
            n = len(pos)
            tr.ild[row, step] = 1.0 - (sub.sum() - np.trace(sub)) / (n * (n - 1))
        tr.novelty[row, step] = float(self_info[slate].mean())
        shown_here[pos] = True
    tr.shown[cand[shown_here]] = True
    tr.distinct_per_user[row] = int(shown_here.sum())
    tr.rejected += sum(v for key, v in policy.feedback_counts.items() if key.startswith("rej"))


def _user_prior(feats: FloatArray, history: IntArray, weight: float) -> FloatArray | None:
    """The user's representation in feature space, as a prior mean of norm ``weight``."""
    if weight <= 0 or len(history) == 0 or feats.shape[1] == 0:
        return None
    profile = feats[history].mean(axis=0)
    norm = float(np.linalg.norm(profile))
    return profile * (weight / norm) if norm > 0 else None


def _arm_summary(
    arm: Arm, tr: _ArmTrace, oracle: FloatArray, oracle_all: FloatArray, n_items: int
) -> dict[str, Any]:
    regret = oracle[:, None] - tr.expected  # (users, steps)
    cumulative = np.cumsum(regret.mean(axis=0))
    cumulative_all = np.cumsum((oracle_all[:, None] - tr.expected).mean(axis=0))
    per_user_final = regret.sum(axis=1)
    steps = regret.shape[1]
    return {
        "policy": arm.config.policy,
        "config": arm.config.as_dict(),
        "final_regret": float(cumulative[-1]),
        "final_regret_sem": float(per_user_final.std(ddof=1) / math.sqrt(len(per_user_final)))
        if len(per_user_final) > 1
        else 0.0,
        "regret_vs_all_unseen": float(cumulative_all[-1]),
        "cumulative_regret": [float(v) for v in cumulative],
        "expected_clicks_per_step": float(tr.expected.mean()),
        "clicks_per_step": float(tr.clicks.mean()),
        "total_clicks_per_user": float(tr.clicks.sum(axis=1).mean()),
        "late_regret_per_step": float(regret[:, steps // 2 :].mean()),
        "coverage": float(tr.shown.mean()),
        "items_shown": int(tr.shown.sum()),
        "distinct_items_per_user": float(tr.distinct_per_user.mean()),
        "user_coverage": float(tr.distinct_per_user.mean() / n_items),
        "intra_list_diversity": float(tr.ild.mean()),
        "novelty": float(tr.novelty.mean()),
        "rejected_feedback": tr.rejected,
        "seconds": round(tr.seconds, 2),
    }


def _ratio(a: float, b: float) -> float | None:
    return float(a / b) if b > 0 else None


def _dataset_info(ds: RecDataset) -> dict[str, Any]:
    return {"items": ds.n_items, "interactions": ds.n_interactions}


def summarize_runs(runs: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Aggregate :func:`run_simulation` reports over seeds: per arm mean and per-seed values.

    Also checks the issue's targets per arm on every seed: final regret <= 0.8x greedy's
    together with coverage >= 3x greedy's, once for catalog coverage over all simulated users
    (``meets_targets_coverage_every_seed``) and once for per-user coverage, the distinct items
    each device showed (``meets_targets_user_coverage_every_seed``).
    """
    if not runs:
        raise ConfigError("no runs to summarize")
    names = list(runs[0]["arms"])
    out: dict[str, Any] = {}
    for name in names:
        per_seed = [r["arms"][name] for r in runs]
        entry: dict[str, Any] = {"policy": per_seed[0]["policy"]}
        for key in (
            "final_regret",
            "regret_vs_all_unseen",
            "expected_clicks_per_step",
            "clicks_per_step",
            "coverage",
            "distinct_items_per_user",
            "user_coverage",
            "intra_list_diversity",
            "novelty",
            "regret_ratio_vs_greedy",
            "coverage_ratio_vs_greedy",
            "user_coverage_ratio_vs_greedy",
        ):
            values = [p.get(key) for p in per_seed]
            if any(v is None for v in values):
                continue
            arr = np.asarray(values, dtype=np.float64)
            entry[key] = float(arr.mean())
            entry[f"{key}_per_seed"] = [float(v) for v in arr]
        curves = np.asarray([p["cumulative_regret"] for p in per_seed])
        entry["cumulative_regret"] = [float(v) for v in curves.mean(axis=0)]
        if "regret_ratio_vs_greedy" in entry:
            reg = entry["regret_ratio_vs_greedy_per_seed"]
            for kind in ("coverage", "user_coverage"):
                cov = entry[f"{kind}_ratio_vs_greedy_per_seed"]
                entry[f"meets_targets_{kind}_every_seed"] = bool(
                    all(r <= REGRET_TARGET for r in reg) and all(c >= COVERAGE_TARGET for c in cov)
                )
        out[name] = entry
    return out
