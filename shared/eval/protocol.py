"""Evaluation under ``../shared/PROTOCOL.md``: sampled (99 negatives) and full ranking,
leave-one-out per population, few-shot for cold-start users, cold-start items, and the
``recs.csv`` export (with one ``recs-fewshot-kK.csv`` per few-shot K).

Every function takes any :class:`~shared.models.base.Scorer`, so baselines, the teacher, the
student and the int8 on-device model are measured by the same code.
"""

from __future__ import annotations

import csv
import glob
import logging
import os
import re
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt

from shared.data.dataset import IntArray, RecDataset
from shared.errors import ConfigError, DataError
from shared.eval.metrics import FloatArray, hit_rate_at_k, ndcg_at_k, ranks_from_scores
from shared.eval.splits import ColdItemSplit, ProtocolSplit
from shared.io import (
    REPORT_MODE,
    check_output_file,
    ensure_dir,
    fsync_dir,
    raise_naming,
    remove_stale_temps,
)
from shared.models.base import Scorer

logger = logging.getLogger(__name__)

DEFAULT_SHOTS: tuple[int, ...] = (1, 3, 5, 10)
"""The few-shot support sizes K the protocol reports (``../shared/PROTOCOL.md``,
"Few-shot"): the default of every evaluation that scores cold-start users."""

_WARNED_SHORT_POOLS: set[tuple[int, int]] = set()
"""``(catalog size, negatives)`` already warned about by :func:`case_ranks`."""


@dataclass(frozen=True)
class EvalConfig:
    """``k`` for HR/NDCG, number of sampled negatives (at least ``k``, else the sampled
    figures are trivially 1), seed of the negative sampler."""

    k: int = 10
    n_negatives: int = 99
    seed: int = 42
    batch_size: int = 512

    def __post_init__(self) -> None:
        for key, value in (
            ("k", self.k),
            ("n-negatives", self.n_negatives),
            ("batch-size", self.batch_size),
        ):
            if value < 1:
                raise ConfigError(f"{key} must be >= 1, got {value}")
        if self.n_negatives < self.k:
            raise ConfigError(
                f"n-negatives ({self.n_negatives}) must be >= k ({self.k}): with fewer sampled "
                f"negatives than k every sampled HR@{self.k} is 1; raise n-negatives or lower k"
            )


@dataclass(frozen=True)
class EvalCase:
    """One ranking case: score the catalog from ``history``, find ``target``.

    ``exclude`` are items never used as candidates (the history, plus any other items the
    protocol excludes); ``seen`` are items never drawn as sampled negatives.
    """

    user: int
    history: IntArray
    target: int
    exclude: IntArray
    seen: IntArray


def sample_negatives(seen: IntArray, n_items: int, n: int, seed: int, user: int) -> IntArray:
    """``n`` distinct items the user never interacted with, seeded per user (order-free)."""
    rng = np.random.default_rng([seed, user])
    allowed = np.ones(n_items, dtype=bool)
    allowed[seen] = False
    pool = np.flatnonzero(allowed)
    if len(pool) <= n:
        return pool.astype(np.int64)
    return np.sort(rng.choice(pool, size=n, replace=False)).astype(np.int64)


@dataclass(frozen=True)
class CaseRanks:
    """0-based rank of each case's target (``np.inf`` = miss), sampled and full, in case order,
    and the user of each case (``None`` where unknown: ranks saved by an older version).

    Kept per case so that two models ranked on the same cases can be compared pairwise
    (:func:`shared.eval.compare.paired_difference`); the users let a comparison resample
    users rather than cases where one user has several (splits pooled).
    """

    sampled: FloatArray
    full: FloatArray
    users: npt.NDArray[np.int64] | None = None

    @classmethod
    def concat(cls, parts: Sequence[CaseRanks], *, apart: bool = False) -> CaseRanks:
        """The cases of ``parts`` side by side, in order: several worlds' or splits' cases
        pooled into one case list (splits of one dataset may hold a user more than once;
        the users are kept where every part has them).

        ``apart``: the parts are of different worlds (e.g. synthetic worlds generated per
        seed), each numbering its users from 0, so user ``u`` of two parts is two people:
        each part's users are renumbered above every earlier part's (from the users alone,
        so two models' ranks of the same parts stay paired). Pooled under their own numbers,
        a paired interval would draw them as one user."""
        if not parts:
            raise DataError("no case ranks to pool")
        users = [p.users for p in parts]
        pooled: npt.NDArray[np.int64] | None = None
        if all(u is not None for u in users):
            shifted, offset = [], 0
            for u in users:
                assert u is not None  # narrowed above
                shifted.append(u + np.int64(offset) if apart else u)
                offset += int(u.max()) + 1 if len(u) else 0
            pooled = np.concatenate(shifted)
        return cls(
            np.concatenate([p.sampled for p in parts]),
            np.concatenate([p.full for p in parts]),
            pooled,
        )


def case_ranks(
    scorer: Scorer, cases: Sequence[EvalCase], config: EvalConfig = EvalConfig()
) -> CaseRanks:
    """The target's rank in every case, among 99 sampled negatives and among the full catalog."""
    n_items = scorer.n_items
    sampled: list[FloatArray] = []
    full: list[FloatArray] = []
    short = 0  # cases with fewer unseen items than config.n_negatives
    for batch in _batches(cases, config.batch_size):
        scores = np.asarray(scorer.score([c.history for c in batch]), dtype=np.float64)
        targets = np.array([c.target for c in batch], dtype=np.int64)
        target_scores = scores[np.arange(len(batch)), targets]
        full_mask = np.ones_like(scores, dtype=bool)
        sampled_mask = np.zeros_like(scores, dtype=bool)
        for row, c in enumerate(batch):
            full_mask[row, c.exclude] = False
            full_mask[row, c.target] = False
            negs = sample_negatives(c.seen, n_items, config.n_negatives, config.seed, c.user)
            short += len(negs) < config.n_negatives
            sampled_mask[row, negs] = True
        full.append(ranks_from_scores(target_scores, scores, full_mask))
        sampled.append(ranks_from_scores(target_scores, scores, sampled_mask))
    if short and (n_items, config.n_negatives) not in _WARNED_SHORT_POOLS:
        # e.g. a tiny catalog: the sampled metric is then easier than the protocol's (said
        # once per catalog size: a run evaluates many models on the same users)
        _WARNED_SHORT_POOLS.add((n_items, config.n_negatives))
        logger.warning(
            "%d of %d users have fewer than %d items they never interacted with: their sampled "
            "rank is against all of those, so sampled HR/NDCG overstate the protocol's figure "
            "(the catalog has %d items)",
            short,
            len(cases),
            config.n_negatives,
            n_items,
        )
    return CaseRanks(
        np.concatenate(sampled) if sampled else np.zeros(0),
        np.concatenate(full) if full else np.zeros(0),
        np.array([c.user for c in cases], dtype=np.int64),
    )


def rank_cases(
    scorer: Scorer, cases: Sequence[EvalCase], config: EvalConfig = EvalConfig()
) -> dict[str, float]:
    """HR@k / NDCG@k, sampled and full, over ``cases``."""
    return summarize_ranks(case_ranks(scorer, cases, config), config.k)


def summarize_ranks(ranks: CaseRanks, k: int = 10) -> dict[str, float]:
    """HR@k / NDCG@k, sampled and full, of per-case ranks (and how many cases)."""
    return {
        "users": len(ranks.full),
        f"sampled_hr@{k}": hit_rate_at_k(ranks.sampled, k),
        f"sampled_ndcg@{k}": ndcg_at_k(ranks.sampled, k),
        f"full_hr@{k}": hit_rate_at_k(ranks.full, k),
        f"full_ndcg@{k}": ndcg_at_k(ranks.full, k),
    }


def loo_cases(split: ProtocolSplit, users: IntArray, stage: str = "test") -> list[EvalCase]:
    """Leave-one-out cases for ``users`` at ``stage`` ('valid' or 'test')."""
    cases = []
    for u in split.evaluable(np.asarray(users, dtype=np.int64), stage):
        u = int(u)
        hist = split.history(u, stage)
        cases.append(EvalCase(u, hist, split.target(u, stage), hist, split.full_sequences[u]))
    return cases


def fewshot_cases(split: ProtocolSplit, k_shots: int) -> list[EvalCase]:
    """Cold-start users with more than ``k_shots`` interactions: first K support, K+1 query.

    Sampled negatives exclude the support set and the query only, not the user's later
    interactions: our reading of PROTOCOL.md's "negatives exclude the whole support set and
    the query", since at query time the user has interacted with nothing else."""
    return _first_k_cases(
        [split.full_sequences[int(u)] for u in split.cold_users], split.cold_users, k_shots
    )


def pseudo_cold_cases(split: ProtocolSplit, k_shots: int) -> list[EvalCase]:
    """Few-shot cases the server may tune on: each *public* user's training sequence read as
    a newcomer's (first K support, K+1 query; users with more than K training interactions).

    The cold users are the protocol's few-shot test set, so nothing may be chosen on them;
    the public users' data is the server's already, and their training sequences never hold
    the validation or test item their own figures are measured on. They are not unseen
    (pretraining read them), so a choice made here favours a model that already knows the
    user: a conservative reading of how much a new user's adaptation helps.
    """
    return _first_k_cases(
        [split.train[int(u)] for u in split.public_users], split.public_users, k_shots
    )


def _first_k_cases(sequences: Sequence[IntArray], users: IntArray, k_shots: int) -> list[EvalCase]:
    cases = []
    for u, seq in zip(users, sequences, strict=True):
        if len(seq) <= k_shots:
            continue
        support = seq[:k_shots]
        seen = np.append(support, seq[k_shots])
        cases.append(EvalCase(int(u), support, int(seq[k_shots]), support, seen))
    return cases


def cold_item_cases(cold: ColdItemSplit, users: IntArray) -> list[EvalCase]:
    """One case per interaction of an evaluation user with a held-out item.

    The history is the user's sequence without held-out items; negatives come from items the
    user never interacted with.
    """
    is_held = np.zeros(cold.original.n_items, dtype=bool)
    is_held[cold.held_out] = True
    cases = []
    for u in users:
        seq = cold.original.sequences[int(u)]
        hist = seq[~is_held[seq]]
        for item in np.unique(seq[is_held[seq]]):
            cases.append(EvalCase(int(u), hist, int(item), hist, seq))
    return cases


def split_ranks(
    scorer: Scorer,
    split: ProtocolSplit,
    populations: Sequence[str] = ("public", "federated"),
    stage: str = "test",
    config: EvalConfig = EvalConfig(),
) -> dict[str, CaseRanks]:
    """Leave-one-out ranks per population (what :func:`evaluate_split` summarises)."""
    return {
        pop: case_ranks(scorer, loo_cases(split, split.population(pop), stage), config)
        for pop in populations
    }


def evaluate_split(
    scorer: Scorer,
    split: ProtocolSplit,
    populations: Sequence[str] = ("public", "federated"),
    stage: str = "test",
    config: EvalConfig = EvalConfig(),
) -> dict[str, dict[str, float]]:
    """Leave-one-out metrics per population."""
    return summarize_each(split_ranks(scorer, split, populations, stage, config), config.k)


def fewshot_ranks(
    scorer: Scorer,
    split: ProtocolSplit,
    shots: Sequence[int] = DEFAULT_SHOTS,
    config: EvalConfig = EvalConfig(),
) -> dict[str, CaseRanks]:
    """Few-shot ranks per ``'k=K'`` (what :func:`evaluate_fewshot` summarises)."""
    return {f"k={k}": case_ranks(scorer, fewshot_cases(split, k), config) for k in shots}


def evaluate_fewshot(
    scorer: Scorer,
    split: ProtocolSplit,
    shots: Sequence[int] = DEFAULT_SHOTS,
    config: EvalConfig = EvalConfig(),
) -> dict[str, dict[str, float]]:
    """Few-shot metrics per K for the cold-start users (fold-in from the support set)."""
    return summarize_each(fewshot_ranks(scorer, split, shots, config), config.k)


def summarize_each(ranks: dict[str, CaseRanks], k: int = 10) -> dict[str, dict[str, float]]:
    """:func:`summarize_ranks` of every entry, keys kept."""
    return {key: summarize_ranks(r, k) for key, r in ranks.items()}


def export_recs(
    scorer: Scorer,
    dataset: RecDataset,
    histories: dict[int, IntArray],
    path: str | Path,
    top_n: int = 100,
    batch_size: int = 512,
) -> int:
    """Write ``user,item,rank`` (raw ids, rank 1 = best) with each user's top ``top_n`` items,
    history excluded. Returns the number of rows written. Written atomically.

    Ties count against the model, as in the metrics: an item's rank is the number of the
    user's candidates (items outside the history) scoring at least as high, itself included,
    so tied items share the rank of the last of them. "The test item is a hit if its rank is
    at most 10" then gives exactly the reported full-ranking HR@10 (with distinct scores the
    ranks are 1, 2, 3, ...).

    An item the model scores NaN or infinite is left out, so a user may get fewer than
    ``top_n`` rows: the metrics count such a test item a miss (PROTOCOL.md), and no rank, not
    even the last, would say so where a user has few candidates.
    """
    path = check_output_file(path)  # the link's target, if a link: the link stays
    ensure_dir(path.parent, what="the output folder", fix="give a writable path")
    # a temporary name of its own: with a fixed "<name>.tmp", two exports to one file wrote
    # into the same temporary file, and one's rows ended up in the other's published file
    remove_stale_temps(path.parent, f".{glob.escape(path.name)}.*.tmp")  # from killed exports
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    tmp = Path(tmp_name)
    users = sorted(histories)
    rows = 0
    try:
        # UTF-8 whatever the locale: the loaders read UTF-8, and under a C / ASCII locale
        # (PYTHONUTF8=0 LC_ALL=C) an item id like "映画" was a UnicodeEncodeError traceback
        with open(fd, "w", encoding="utf-8", newline="") as fh:
            os.fchmod(fd, REPORT_MODE)  # shared like a report, not mkstemp's owner-only
            writer = csv.writer(fh)
            writer.writerow(["user", "item", "rank"])
            for start in range(0, len(users), batch_size):
                chunk = users[start : start + batch_size]
                scores = np.asarray(scorer.score([histories[u] for u in chunk]), dtype=np.float64)
                for row, u in enumerate(chunk):
                    candidate = np.ones(dataset.n_items, dtype=bool)
                    candidate[histories[u]] = False
                    items = np.flatnonzero(candidate)
                    user_scores = scores[row][items]
                    ranks = _pessimistic_ranks(user_scores)
                    listed = np.flatnonzero(np.isfinite(user_scores))  # non-finite: a miss
                    order = listed[np.argsort(ranks[listed], kind="stable")][:top_n]
                    for item, rank in zip(items[order], ranks[order], strict=True):
                        writer.writerow(
                            [dataset.user_ids[u], dataset.item_ids[int(item)], int(rank)]
                        )
                        rows += 1
            fh.flush()
            os.fsync(fh.fileno())  # on disk before it replaces the old file
        tmp.replace(path)
        fsync_dir(path.parent)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise_naming(exc, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return rows


def export_split_recs(
    scorer: Scorer,
    dataset: RecDataset,
    split: ProtocolSplit,
    path: str | Path,
    batch_size: int = EvalConfig.batch_size,
) -> int:
    """:func:`export_recs` for every user evaluated on ``split`` (public and federated), each
    with the history its test figure is scored from (train + validation), scored
    ``batch_size`` users at a time (the evaluation's ``batch-size``, so the export needs no
    more memory than the figures did)."""
    users = split.evaluable(split.population("all"))
    histories = {int(u): split.history(int(u)) for u in users}
    rows = export_recs(scorer, dataset, histories, path, batch_size=batch_size)
    logger.info("wrote %d rows to %s", rows, path)
    return rows


def fewshot_recs_path(path: str | Path, k_shots: int | str) -> Path:
    """Where the few-shot export at support size ``k_shots`` of the model whose
    leave-one-out export is ``path`` goes: next to it, ``recs.csv`` -> ``recs-fewshot-k3.csv``
    (``"*"`` gives the glob of every K's file)."""
    path = Path(path)
    return path.with_name(f"{path.stem}-fewshot-k{k_shots}{path.suffix}")


def check_recs_outputs(path: str | Path, shots: Sequence[int]) -> None:
    """:func:`~shared.io.check_output_file` of an export's ``recs.csv`` (``path``) and of its
    few-shot file at each K of ``shots``, before the work that produces them."""
    for target in (path, *(fewshot_recs_path(path, k) for k in shots)):
        check_output_file(target)


def export_fewshot_recs(
    scorer: Scorer,
    dataset: RecDataset,
    split: ProtocolSplit,
    path: str | Path,
    shots: Sequence[int],
    batch_size: int = EvalConfig.batch_size,
) -> int:
    """:func:`export_recs` of the few-shot figures: for every K in ``shots``, one file
    (:func:`fewshot_recs_path` of ``path``) with the top 100 of every cold-start user the
    figure at K counts, scored from their support set (the history, and the items excluded)
    as :func:`fewshot_cases` scores them, so the few-shot full-ranking figures can be
    recomputed from it and the query items. Returns the rows written in all; a split without
    cold-start users has no few-shot figures, and gets no file."""
    rows = 0
    for k in shots if len(split.cold_users) else ():
        histories = {c.user: c.history for c in fewshot_cases(split, k)}
        target = fewshot_recs_path(path, k)
        written = export_recs(scorer, dataset, histories, target, batch_size=batch_size)
        logger.info("wrote %d rows to %s", written, target)
        rows += written
    return rows


def export_model_recs(
    scorer: Scorer,
    dataset: RecDataset,
    split: ProtocolSplit,
    path: str | Path,
    shots: Sequence[int],
    batch_size: int = EvalConfig.batch_size,
) -> int:
    """One model's whole export at ``path``: :func:`export_split_recs` and
    :func:`export_fewshot_recs` at each K of ``shots``. Returns the rows written in all.

    Every few-shot list an earlier export left beside ``path`` goes first
    (:func:`remove_fewshot_recs`): one of a K not evaluated now (or of a split without
    cold-start users) stayed next to this model's ``recs.csv`` as if of this model, and an
    export interrupted after ``recs.csv`` left every older list there. Each file present is
    then this model's, or the older ``recs.csv`` alone."""
    remove_fewshot_recs(path)
    rows = export_split_recs(scorer, dataset, split, path, batch_size)
    return rows + export_fewshot_recs(scorer, dataset, split, path, shots, batch_size)


def remove_fewshot_recs(path: str | Path) -> None:
    """Remove the few-shot lists (:func:`fewshot_recs_path`, of any K) of the export at
    ``path``; other files beside it stay, including names that only look alike."""
    path = Path(path)
    own = re.compile(re.escape(path.stem) + r"-fewshot-k[0-9]+" + re.escape(path.suffix))
    for old in path.parent.glob(glob.escape(path.stem) + "-fewshot-k*"):
        if own.fullmatch(old.name) and not old.is_dir():
            old.unlink(missing_ok=True)


def _pessimistic_ranks(scores: FloatArray) -> npt.NDArray[np.int64]:
    """Each candidate's 1-based rank as the metrics count it when it is the target: the
    candidates scoring at least as high, itself included, plus every NaN (a NaN candidate
    counts as above the target). A non-finite score is a miss: its rank here is meaningless,
    and :func:`export_recs` leaves such items out."""
    nans = int(np.isnan(scores).sum())
    above = np.sort(-scores[~np.isnan(scores)])  # -score ascending: best first, +inf first
    ranks = np.searchsorted(above, -scores, side="right") + nans
    return ranks.astype(np.int64)


def _batches(cases: Sequence[EvalCase], size: int) -> Iterator[Sequence[EvalCase]]:
    for start in range(0, len(cases), size):
        yield cases[start : start + size]
