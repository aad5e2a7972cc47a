"""Offline evaluation on MovieLens: Li et al. (2011) replay of the policies, and what the
diversity term costs in HR@10 under the protocol.

Why two parts: real logs cannot say what a user would have done with an item they were never
shown, so a policy is scored only on the logged events it *agrees* with (replay), while the
accuracy price of diversity is measured exactly as every other model is (``PROTOCOL.md``).

**Replay** (Li, Chu, Langford & Wang, WSDM 2011, adapted to slates and to per-device
policies). Every federated user with enough history is one device. Their last ``window``
interactions (by time) are the logged stream; everything before is the history. The base model
(EASE) is fitted on the public users' and federated users' data *before* the stream (plus the
protocol training data of users who are not replayed), and the device re-ranks the model's
top-N unseen items. For each logged event ``(item, rating)`` in time order, the policy shows a
slate; if the logged item is in it the event is *matched*: its reward is ``rating >=
like_threshold`` (a "click"), the policy learns from it, and the replay click rate is
``clicks / matched``. Unmatched events are skipped (their impressions get no feedback). The
logged item then leaves the candidate pool (the user has consumed it). ``match_rate`` (matched
/ events) says how often the policy's slate contained what the user went on to watch.

Caveat, stated plainly: replay is unbiased only when the logging policy chose uniformly at
random. MovieLens ratings were not logged that way, so the replay click rate compares policies
on the events they share with the organic log; it is not a live click-through rate.

**HR@10 of the diversity term**: the greedy ranking (EASE) and the MMR re-ranking of its top-N
(:class:`~shared.bandits.diversity.MMRReranker`) are evaluated by
:func:`~shared.eval.protocol.evaluate_split` on the federated users: ``valid`` to choose the
default ``mmr_lambda``, ``test`` to report it.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from shared.bandits.diversity import (
    MMRReranker,
    intra_list_diversity,
    item_popularity,
    normalize_rows,
    novelty,
    top_k,
)
from shared.bandits.features import item_features
from shared.bandits.harness import Arm, EmbedFn, fit_base_model
from shared.bandits.policies import make_policy
from shared.config import is_int
from shared.data.cleaning import read_numeric_table
from shared.data.dataset import RecDataset
from shared.data.movielens import ML100K_RATING_COLUMNS
from shared.errors import ConfigError, DataError
from shared.eval.protocol import EvalConfig, evaluate_split, export_recs
from shared.eval.splits import ProtocolSplit, SplitConfig, split_users
from shared.io import home_path
from shared.models.base import Scorer

__all__ = [
    "ReplayConfig",
    "diversity_accuracy",
    "load_ml100k_ratings",
    "replay_streams",
    "run_replay",
]

log = logging.getLogger(__name__)

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]


@dataclass(frozen=True)
class ReplayConfig:
    """Replay set-up; validated on construction.

    Attributes:
        seed: protocol split seed (which users are cold / public / federated).
        window: logged interactions replayed per federated user (their last ones).
        min_history: a user is replayed only with at least this many interactions before the
            window (others keep their protocol training data in the base model).
        like_threshold: a rating at or above it is a click (reward 1), below it reward 0.
        max_users: cap on replayed users (``None`` = all eligible federated users).
        features: item features of the policies, ``text`` (PCA of LM embeddings) or ``mf``.
        ease_l2: EASE's lambda.
    """

    seed: int = 42
    window: int = 20
    min_history: int = 10
    like_threshold: float = 4.0
    max_users: int | None = None
    features: str = "text"
    ease_l2: float = 250.0

    def __post_init__(self) -> None:
        for name, low in (("seed", 0), ("window", 1), ("min_history", 1)):
            value = getattr(self, name)
            if not is_int(value) or value < low:
                raise ConfigError(f"replay.{name} must be an integer >= {low}, got {value!r}")
        if not math.isfinite(self.like_threshold):
            raise ConfigError(f"replay.like_threshold must be finite, got {self.like_threshold}")
        if self.max_users is not None and (
            isinstance(self.max_users, bool)
            or not isinstance(self.max_users, int)
            or self.max_users < 1
        ):
            raise ConfigError(f"replay.max_users must be >= 1 or None, got {self.max_users!r}")
        if self.features not in ("text", "mf"):
            raise ConfigError(f"replay.features must be 'text' or 'mf', got {self.features!r}")
        if not (math.isfinite(self.ease_l2) and self.ease_l2 > 0):
            raise ConfigError(f"replay.ease_l2 must be > 0, got {self.ease_l2}")

    def as_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


def load_ml100k_ratings(data_dir: str | Path, dataset: RecDataset) -> list[FloatArray]:
    """Ratings aligned with ``dataset.sequences`` (read from ``u.data`` in ``data_dir``).

    The protocol drops ratings (every rating is an interaction); the replay needs them to tell
    a liked item from a watched one. ml-100k has one rating per (user, item).
    """
    path = home_path(data_dir)
    if not (path / "u.data").is_file() and (path / "ml-100k" / "u.data").is_file():
        path = path / "ml-100k"
    file = path / "u.data"
    if not file.is_file():
        raise DataError(
            f"replay needs MovieLens 100K ratings: {file} not found; pass --data-dir pointing "
            "at the folder with u.data"
        )
    cols = read_numeric_table(file, sep="\t", columns=ML100K_RATING_COLUMNS, has_header=False)
    lookup = {
        (str(u), str(i)): float(r)
        for u, i, r in zip(cols["user id"], cols["item id"], cols["rating"], strict=True)
    }
    out: list[FloatArray] = []
    for u, seq in enumerate(dataset.sequences):
        uid = dataset.user_ids[u]
        try:
            out.append(np.array([lookup[(uid, dataset.item_ids[int(i)])] for i in seq]))
        except KeyError as err:
            raise DataError(f"no rating in {file} for (user, item) {err.args[0]}") from None
    return out


@dataclass(frozen=True)
class _Streams:
    users: IntArray
    histories: list[IntArray]
    events: list[IntArray]
    rewards: list[FloatArray]
    train: list[IntArray]


def replay_streams(
    dataset: RecDataset, split: ProtocolSplit, ratings: Sequence[FloatArray], cfg: ReplayConfig
) -> _Streams:
    """Replay users, their histories and logged streams, and the base model's training data."""
    users: list[int] = []
    histories: list[IntArray] = []
    events: list[IntArray] = []
    rewards: list[FloatArray] = []
    for u in split.federated_users:
        seq = dataset.sequences[int(u)]
        if len(seq) < cfg.window + cfg.min_history:
            continue
        users.append(int(u))
        histories.append(seq[: -cfg.window])
        events.append(seq[-cfg.window :])
        rewards.append((ratings[int(u)][-cfg.window :] >= cfg.like_threshold).astype(np.float64))
    if cfg.max_users is not None:
        keep = np.sort(
            np.random.default_rng([cfg.seed, 3]).permutation(len(users))[: cfg.max_users]
        )
        users = [users[i] for i in keep]
        histories = [histories[i] for i in keep]
        events = [events[i] for i in keep]
        rewards = [rewards[i] for i in keep]
    if not users:
        raise DataError(
            f"no federated user has window + min_history = {cfg.window + cfg.min_history} "
            "interactions; lower replay.window or replay.min_history"
        )
    replayed = dict(zip(users, histories, strict=True))
    train = [replayed.get(int(u), split.train[int(u)]) for u in split.population("all")]
    return _Streams(np.asarray(users, dtype=np.int64), histories, events, rewards, train)


def recs_file(seed: int, lam: float) -> str:
    """The ``recs.csv``-format file of split ``seed``'s MMR re-ranking at ``lam``."""
    return f"recs-seed{seed}-mmr{lam:g}.csv"


def run_replay(
    dataset: RecDataset,
    ratings: Sequence[FloatArray],
    arms: Sequence[Arm],
    config: ReplayConfig,
    embed: EmbedFn,
    *,
    mmr_grid: Sequence[float] = (1.0, 0.95, 0.9, 0.85, 0.8, 0.7, 0.5),
    eval_config: EvalConfig | None = None,
    recs_dir: Path | None = None,
    recs_lambdas: Sequence[float] = (),
) -> dict[str, Any]:
    """Replay every arm and measure the diversity term's HR@10 cost; a JSON-able report.
    ``eval_config`` defaults to the protocol's with the split's seed (``config.seed``).

    ``recs_dir``: also write, for each MMR lambda of ``recs_lambdas``, the re-ranked top 100
    of every evaluated federated user (:func:`recs_file`), from which anyone can recompute
    that lambda's full-ranking figures."""
    if not arms:
        raise ConfigError("no arms (policies) to replay")
    shape = {(a.config.top_n, a.config.slate_size, a.config.feature_dim) for a in arms}
    if len(shape) != 1:
        raise ConfigError(f"arms disagree on (top_n, slate_size, feature_dim): {sorted(shape)}")
    top_n, k, dim = shape.pop()
    split = split_users(dataset, SplitConfig(seed=config.seed))
    eval_config = eval_config or EvalConfig(seed=config.seed)
    streams = replay_streams(dataset, split, ratings, config)
    text = np.asarray(embed(dataset.item_text), dtype=np.float64)
    unit_text = normalize_rows(text)
    feats = item_features(
        config.features,
        dim,
        text_embeddings=text,
        sequences=streams.train,
        n_items=dataset.n_items,
    )
    base = fit_base_model("ease", streams.train, dataset.n_items, ease_l2=config.ease_l2)
    popularity = item_popularity(streams.train, dataset.n_items)
    candidates: list[IntArray] = []
    cand_scores: list[FloatArray] = []
    for hist in streams.histories:
        s = np.asarray(base.score([hist])[0], dtype=np.float64)
        s[hist] = -np.inf
        cand = top_k(s, top_n)
        cand = cand[s[cand] > -np.inf]  # fewer unseen items than top_n: no history item
        candidates.append(cand)
        cand_scores.append(s[cand])

    replay: dict[str, Any] = {}
    for arm in arms:
        start = time.perf_counter()
        replay[arm.name] = _replay_arm(
            arm,
            streams,
            candidates,
            cand_scores,
            feats,
            unit_text,
            popularity,
            k,
            dataset.n_items,
            config.seed,
        )
        replay[arm.name]["seconds"] = round(time.perf_counter() - start, 2)
        log.info("replayed %s in %.1fs", arm.name, replay[arm.name]["seconds"])

    protocol_base = fit_base_model(
        "ease", split.train_sequences(), dataset.n_items, ease_l2=config.ease_l2
    )
    accuracy = diversity_accuracy(
        protocol_base,
        split,
        text,
        popularity=item_popularity(split.train_sequences(), dataset.n_items),
        top_n=top_n,
        grid=mmr_grid,
        eval_config=eval_config,
    )
    if recs_dir is not None:
        users = split.evaluable(split.federated_users, "test")
        histories = {int(u): split.history(int(u), "test") for u in users}
        for lam in recs_lambdas:
            reranked = MMRReranker(protocol_base, text, lam, top_n)
            export_recs(reranked, dataset, histories, recs_dir / recs_file(config.seed, lam))
    n_events = int(sum(len(e) for e in streams.events))
    return {
        "dataset": dataset.summary(),
        "replay_config": config.as_dict(),
        "replay_users": len(streams.users),
        "replay_events": n_events,
        "replay_like_rate": float(np.mean(np.concatenate(streams.rewards))),
        "replay": replay,
        "diversity_accuracy": accuracy,
    }


def _replay_arm(
    arm: Arm,
    streams: _Streams,
    candidates: list[IntArray],
    cand_scores: list[FloatArray],
    feats: FloatArray,
    unit_text: FloatArray,
    popularity: FloatArray,
    k: int,
    n_items: int,
    seed: int,
) -> dict[str, Any]:
    """Li et al. replay of one arm over every device's stream."""
    matched = clicks = events = 0
    shown = np.zeros(n_items, dtype=bool)
    ild: list[float] = []
    nov: list[float] = []
    rejected = 0
    for row, user in enumerate(streams.users):
        policy = make_policy(arm.config, n_items)
        rng = np.random.default_rng([seed, int(user), 2, *arm.stream_key()])
        alive = np.ones(len(candidates[row]), dtype=bool)
        for item, reward in zip(streams.events[row], streams.rewards[row], strict=True):
            cand = candidates[row][alive]
            events += 1
            if len(cand) == 0:
                continue
            slate = policy.select(
                cand,
                cand_scores[row][alive],
                feats[cand],
                k,
                rng,
                diversity_embeddings=unit_text[cand],
            )
            shown[slate] = True
            ild.append(intra_list_diversity(slate, unit_text))
            nov.append(novelty(slate, popularity))
            if int(item) in set(slate.tolist()):
                matched += 1
                clicks += int(reward)
                policy.update(int(item), float(reward))
            policy.clear_pending()  # the log has no feedback for the other impressions
            alive &= candidates[row] != int(item)
        rejected += sum(v for key, v in policy.feedback_counts.items() if key.startswith("rej"))
    return {
        "policy": arm.config.policy,
        "config": arm.config.as_dict(),
        "events": events,
        "matched": matched,
        "match_rate": matched / events if events else 0.0,
        "replay_click_rate": clicks / matched if matched else None,
        "clicks_per_event": clicks / events if events else 0.0,
        "coverage": float(shown.mean()),
        "items_shown": int(shown.sum()),
        "intra_list_diversity": float(np.mean(ild)) if ild else 0.0,
        "novelty": float(np.mean(nov)) if nov else 0.0,
        "rejected_feedback": rejected,
    }


def diversity_accuracy(
    model: Scorer,
    split: ProtocolSplit,
    text_embeddings: npt.ArrayLike,
    *,
    popularity: FloatArray,
    top_n: int = 50,
    grid: Sequence[float] = (1.0, 0.9, 0.8),
    eval_config: EvalConfig = EvalConfig(),
    population: str = "federated",
) -> dict[str, Any]:
    """HR@10 / NDCG@10 (protocol) of ``model`` re-ranked by MMR at each lambda of ``grid``.

    Per lambda and stage (``valid``, ``test``): the protocol metrics, their relative change
    against lambda = 1 (the greedy ranking), and the top-10 lists' intra-list diversity,
    novelty and catalog coverage over the population's users.
    """
    emb = np.asarray(text_embeddings, dtype=np.float64)
    unit = normalize_rows(emb)
    out: dict[str, Any] = {}
    users = split.evaluable(split.population(population), "test")
    k = eval_config.k
    for lam in sorted(set(float(g) for g in grid) | {1.0}, reverse=True):
        scorer = MMRReranker(model, emb, lam, top_n)
        entry: dict[str, Any] = {}
        for stage in ("valid", "test"):
            entry[stage] = evaluate_split(scorer, split, (population,), stage, eval_config)[
                population
            ]
        lists = _top_lists(scorer, split, users, k)
        entry["top10_intra_list_diversity"] = float(
            np.mean([intra_list_diversity(s, unit) for s in lists])
        )
        entry["top10_novelty"] = float(np.mean([novelty(s, popularity) for s in lists]))
        seen = np.zeros(model.n_items, dtype=bool)
        for s in lists:
            seen[s] = True
        entry["top10_coverage"] = float(seen.mean())
        out[f"{lam:g}"] = entry
    greedy = out["1"]
    for entry in out.values():
        for stage in ("valid", "test"):
            for metric in (f"full_hr@{k}", f"sampled_hr@{k}", f"full_ndcg@{k}"):
                g = greedy[stage][metric]
                entry[stage][f"{metric}_relative_change"] = (
                    float(entry[stage][metric] / g - 1.0) if g > 0 else None
                )
    return out


def _top_lists(scorer: Scorer, split: ProtocolSplit, users: IntArray, k: int) -> list[IntArray]:
    """Each user's top-``k`` (test-stage history excluded)."""
    lists: list[IntArray] = []
    batch = 256
    for start in range(0, len(users), batch):
        chunk = [int(u) for u in users[start : start + batch]]
        hists = [split.history(u, "test") for u in chunk]
        scores = np.asarray(scorer.score(hists), dtype=np.float64)
        for row, hist in enumerate(hists):
            s = scores[row]
            s[hist] = -np.inf
            lists.append(top_k(s, k))
    return lists
