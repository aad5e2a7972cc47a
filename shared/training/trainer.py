"""Generic, seeded training utilities shared by the server (teacher, distillation) and the
federated client (local fine-tuning, with or without Opacus).

The pieces are deliberately small and independent:

* :func:`seeded` / :func:`limited_threads`: scoped RNG seeding and thread limits. All
  randomness of a run comes from one seed; the global RNG state is restored on exit.
* :func:`make_next_item_examples`: one ``(last max_len items, next item)`` example per
  transition, the natural "one sample" for per-sample DP-SGD on a client.
* :func:`make_causal_windows`: windows with a target at *every* position, for causal models
  (the teacher) that learn all transitions of a window in one pass.
* :func:`train_epoch`: one pass over a loader with any ``loss_fn(model, batch)``; works with
  an Opacus ``DPOptimizer`` unchanged (pass ``grad_clip=None`` there: DP clips per sample).
* :class:`Validation` + :func:`fit_with_early_stopping`: early stopping on the protocol's own
  leave-one-out metric at stage ``'valid'`` (``shared.eval.protocol.evaluate_split``), so
  the number a model is selected on is computed exactly like the number it is reported on.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Sampler, TensorDataset
from tqdm.auto import tqdm

from shared.data.dataset import IntArray
from shared.errors import ConfigError, FedRecError
from shared.eval.protocol import EvalConfig, evaluate_split
from shared.eval.splits import ProtocolSplit
from shared.models.base import Scorer
from shared.models.sequence import IGNORE_TARGET, PAD_ITEM

log = logging.getLogger(__name__)

Batch = tuple[torch.Tensor, ...]
LossFn = Callable[[nn.Module, Batch], torch.Tensor]

METRICS = (
    "sampled_hr@10",
    "sampled_ndcg@10",
    "full_hr@10",
    "full_ndcg@10",
)


class TrainingDivergedError(FedRecError):
    """The loss became NaN or infinite; lower the learning rate or check the data."""


@dataclass(frozen=True)
class TrainConfig:
    """How long and how fast to train, and what to select the best epoch on.

    ``epochs`` is the maximum; with a validation set the run stops after ``patience``
    validations (every ``eval_every`` epochs) without improvement of ``metric`` and restores
    the best weights. ``lr`` and ``weight_decay`` are finite. ``grad_clip`` is a global-norm
    clip (None disables; DP training clips per sample instead). ``num_threads`` limits
    torch's intra-op threads for the run.
    """

    epochs: int = 100
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 0.0
    grad_clip: float | None = 5.0
    eval_every: int = 1
    patience: int = 10
    metric: str = "sampled_ndcg@10"
    seed: int = 42
    progress: bool = False
    num_threads: int | None = None

    @classmethod
    def of(
        cls, model_config: Any, *, progress: bool = False, num_threads: int | None = None
    ) -> TrainConfig:
        """The training fields of a model config (teacher, student) as a TrainConfig."""
        shared = (
            "epochs",
            "batch_size",
            "lr",
            "weight_decay",
            "grad_clip",
            "eval_every",
            "patience",
            "metric",
            "seed",
        )
        values = {name: getattr(model_config, name) for name in shared}
        return cls(**values, progress=progress, num_threads=num_threads)

    def __post_init__(self) -> None:
        if self.epochs < 1:
            raise ConfigError(f"epochs must be >= 1, got {self.epochs}")
        if self.batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {self.batch_size}")
        # finite: an infinite rate or decay only failed after a first epoch of NaN weights,
        # as 'lower the learning rate' (a NaN decay as AdamW's bare ValueError)
        if not 0 < self.lr < math.inf:
            raise ConfigError(f"lr must be a finite number > 0, got {self.lr}")
        if not 0 <= self.weight_decay < math.inf:
            raise ConfigError(f"weight_decay must be a finite number >= 0, got {self.weight_decay}")
        if self.grad_clip is not None and not self.grad_clip > 0:
            raise ConfigError(f"grad_clip must be > 0 or None, got {self.grad_clip}")
        if self.eval_every < 1 or self.patience < 1:
            raise ConfigError("eval_every and patience must be >= 1")
        if self.metric not in METRICS:
            raise ConfigError(f"metric must be one of {', '.join(METRICS)}; got {self.metric!r}")
        if self.num_threads is not None and self.num_threads < 1:
            raise ConfigError(f"num_threads must be >= 1 or None, got {self.num_threads}")


# --------------------------------------------------------------------------- seeding, threads


@contextmanager
def seeded(seed: int) -> Iterator[torch.Generator]:
    """Seed torch's global RNGs for the ``with`` block only, and yield a private CPU generator.

    Model initialisation and dropout draw from the global RNGs (seeded here: the CPU's, and
    every initialised GPU's, where dropout on a GPU draws); shuffling should use the yielded
    generator. The previous states are restored on exit, so a seeded run never changes the
    randomness of code that runs after it.
    """
    gpus = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []
    with torch.random.fork_rng(devices=gpus):
        torch.manual_seed(seed)
        yield torch.Generator().manual_seed(seed)


@contextmanager
def limited_threads(num_threads: int | None) -> Iterator[None]:
    """Run the block with ``torch.set_num_threads(num_threads)``; None leaves it alone."""
    if num_threads is None:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(num_threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


# --------------------------------------------------------------------------- examples


@dataclass(frozen=True)
class NextItemExamples:
    """One example per transition: ``items``/``mask`` ``[N, L]`` (left-padded), ``targets [N]``."""

    items: torch.Tensor
    mask: torch.Tensor
    targets: torch.Tensor

    def __len__(self) -> int:
        return int(self.targets.shape[0])

    def dataset(self) -> TensorDataset:
        return TensorDataset(self.items, self.mask, self.targets)


@dataclass(frozen=True)
class CausalWindows:
    """Windows for causal models: ``items``/``mask``/``targets`` all ``[N, L]``, left-padded.

    ``targets[n, j]`` is the item that follows ``items[n, j]`` (``IGNORE_TARGET`` at padding).
    """

    items: torch.Tensor
    mask: torch.Tensor
    targets: torch.Tensor

    def __len__(self) -> int:
        return int(self.targets.shape[0])

    def dataset(self) -> TensorDataset:
        return TensorDataset(self.items, self.mask, self.targets)


def make_next_item_examples(
    sequences: Sequence[IntArray], max_len: int, *, min_history: int = 1
) -> NextItemExamples:
    """``(last max_len items before t, item t)`` for every ``t >= min_history`` of every sequence.

    The input window is left-padded to exactly ``max_len`` (use :func:`trim_padding` per batch
    to drop all-padding columns). This is the per-transition sample a federated client trains
    on: with DP-SGD, one example is one privacy unit of the per-sample clipping.
    """
    if max_len < 1 or min_history < 1:
        raise ConfigError(f"max_len and min_history must be >= 1, got {max_len}, {min_history}")
    windows, masks, targets = [], [], []
    for seq in sequences:
        seq = np.asarray(seq, dtype=np.int64)
        n = len(seq)
        if n <= min_history:
            continue
        padded = np.concatenate([np.full(max_len, PAD_ITEM, dtype=np.int64), seq])
        valid = np.concatenate([np.zeros(max_len, dtype=bool), np.ones(n, dtype=bool)])
        # window ending just before t (exclusive) starts at padded index t
        starts = np.arange(min_history, n)
        idx = starts[:, None] + np.arange(max_len)[None, :]
        windows.append(padded[idx])
        masks.append(valid[idx])
        targets.append(seq[min_history:])
    if not windows:
        empty = torch.zeros((0, max_len), dtype=torch.long)
        return NextItemExamples(empty, empty.bool(), torch.zeros(0, dtype=torch.long))
    return NextItemExamples(
        torch.from_numpy(np.concatenate(windows)),
        torch.from_numpy(np.concatenate(masks)),
        torch.from_numpy(np.concatenate(targets)),
    )


def make_causal_windows(sequences: Sequence[IntArray], max_len: int) -> CausalWindows:
    """Cut every sequence, from its end, into windows of ``max_len`` inputs with shifted targets.

    Windows do not overlap, so every transition of every sequence is the target of exactly
    one position (the first positions of an earlier window see a shorter context). Windows
    are right-aligned (left-padded) to ``max_len``, which matches how histories are scored:
    the latest item at the last position.
    """
    if max_len < 1:
        raise ConfigError(f"max_len must be >= 1, got {max_len}")
    rows_items, rows_targets = [], []
    for seq in sequences:
        seq = np.asarray(seq, dtype=np.int64)
        end = len(seq) - 2  # last input position that has a next item
        while end >= 0:
            start = max(0, end - max_len + 1)
            inputs = seq[start : end + 1]
            items_row = np.full(max_len, PAD_ITEM, dtype=np.int64)
            target_row = np.full(max_len, IGNORE_TARGET, dtype=np.int64)
            items_row[max_len - len(inputs) :] = inputs
            target_row[max_len - len(inputs) :] = seq[start + 1 : end + 2]
            rows_items.append(items_row)
            rows_targets.append(target_row)
            end = start - 1
    if not rows_items:
        empty = torch.zeros((0, max_len), dtype=torch.long)
        return CausalWindows(empty, empty.bool(), empty.clone())
    items = torch.from_numpy(np.stack(rows_items))
    targets = torch.from_numpy(np.stack(rows_targets))
    return CausalWindows(items, targets != IGNORE_TARGET, targets)


def trim_padding(
    items: torch.Tensor, mask: torch.Tensor, *others: torch.Tensor
) -> tuple[torch.Tensor, ...]:
    """Drop leading columns that are padding in every row (left-padded batches only).

    Models that number positions by recency (``shared.models.sequence.recency_index``) give
    identical outputs on the trimmed batch, at a fraction of the cost. ``others`` with the
    same ``[B, L]`` layout (e.g. causal targets) are trimmed alike; 1-D tensors pass through.
    """
    real = mask.any(dim=0)
    first = int(torch.argmax(real.to(torch.int8)).item()) if bool(real.any()) else mask.shape[1] - 1
    out = [items[:, first:], mask[:, first:]]
    out += [o[:, first:] if o.ndim == 2 and o.shape == mask.shape else o for o in others]
    return tuple(out)


class LengthBucketSampler(Sampler[list[int]]):
    """Batches of similar-length rows, in random order, for left-padded data.

    Each epoch shuffles the rows, cuts them into pools of ``pool_batches`` batches, sorts each
    pool by length and cuts it into batches, then shuffles the batches. With
    :func:`trim_padding` this skips most of the padding (the cost of a batch is its longest
    row) while keeping batches random. All draws come from ``generator``.
    """

    def __init__(
        self,
        lengths: torch.Tensor,
        batch_size: int,
        generator: torch.Generator,
        pool_batches: int = 32,
    ) -> None:
        self.lengths = lengths
        self.batch_size = batch_size
        self.generator = generator
        self.pool = batch_size * pool_batches

    def __len__(self) -> int:
        return math.ceil(len(self.lengths) / self.batch_size)

    def __iter__(self) -> Iterator[list[int]]:
        order = torch.randperm(len(self.lengths), generator=self.generator)
        batches: list[list[int]] = []
        for start in range(0, len(order), self.pool):
            pool = order[start : start + self.pool]
            pool = pool[torch.argsort(self.lengths[pool], stable=True)]
            batches += [
                pool[i : i + self.batch_size].tolist() for i in range(0, len(pool), self.batch_size)
            ]
        for i in torch.randperm(len(batches), generator=self.generator).tolist():
            yield batches[i]


def make_loader(
    dataset: TensorDataset,
    batch_size: int,
    generator: torch.Generator,
    *,
    lengths: torch.Tensor | None = None,
) -> DataLoader[tuple[torch.Tensor, ...]]:
    """A single-process shuffling loader drawing only from ``generator``.

    With ``lengths`` (e.g. ``mask.sum(1)``), batches group rows of similar length
    (:class:`LengthBucketSampler`).
    """
    if lengths is None:
        return DataLoader(dataset, batch_size=batch_size, shuffle=True, generator=generator)
    sampler = LengthBucketSampler(lengths, batch_size, generator)
    return DataLoader(dataset, batch_sampler=sampler)


# --------------------------------------------------------------------------- one epoch


def train_epoch(
    model: nn.Module,
    loader: Iterable[Batch] | Iterable[list[torch.Tensor]],
    optimizer: torch.optim.Optimizer,
    loss_fn: LossFn,
    grad_clip: float | None = None,
) -> float:
    """One pass over ``loader``; returns the example-weighted mean loss.

    ``loss_fn(model, batch)`` returns the batch's *mean* loss (what Opacus assumes with its
    default ``loss_reduction='mean'``). Empty batches (possible with Poisson sampling) still
    call ``optimizer.step()`` so a DP optimizer adds its noise, but contribute no loss.
    """
    model.train()
    total, count = 0.0, 0
    for raw in loader:
        batch = tuple(raw)
        size = int(batch[0].shape[0])
        optimizer.zero_grad(set_to_none=True)
        if size == 0:
            optimizer.step()
            continue
        loss = loss_fn(model, batch)
        if not torch.isfinite(loss):
            raise TrainingDivergedError(
                f"loss is {loss.item()}; lower the learning rate or check the input data"
            )
        loss.backward()
        if grad_clip is not None:
            nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], grad_clip)
        optimizer.step()
        total += float(loss.item()) * size
        count += size
    return total / max(count, 1)


# --------------------------------------------------------------------------- validation


class _FiniteScorer:
    """``scorer``, refusing (:class:`TrainingDivergedError`) scores that are not finite."""

    def __init__(self, scorer: Scorer) -> None:
        self.scorer = scorer

    @property
    def n_items(self) -> int:
        return self.scorer.n_items

    def score(self, histories: Sequence[IntArray]) -> npt.NDArray[np.float32]:
        scores = self.scorer.score(histories)
        if not np.isfinite(scores).all():
            raise TrainingDivergedError(
                "the model scores NaN or infinity on validation histories; lower the learning "
                "rate or check the input data"
            )
        return scores


def _check_finite_parameters(model: nn.Module) -> None:
    """Raise :class:`TrainingDivergedError` if a parameter of ``model`` is NaN or infinite
    (a last step that overflowed leaves no non-finite loss behind to notice it by)."""
    for name, parameter in model.named_parameters():
        if not bool(torch.isfinite(parameter).all()):
            raise TrainingDivergedError(
                f"parameter {name} is not finite; lower the learning rate or check the input data"
            )


@dataclass(frozen=True)
class Validation:
    """Leave-one-out validation of the protocol: ``populations`` of ``split`` at stage 'valid'.

    The input history is the user's train sequence and the target the validation item, ranked
    with the protocol's sampled/full metrics by :func:`shared.eval.protocol.evaluate_split`.
    Without a ``config`` the sampled negatives are drawn from the split's seed, as the run's
    reported figures are (a fixed default seed had every run select on seed 42's negatives).

    A model that scores NaN or infinity has diverged: :class:`TrainingDivergedError` is
    raised. (The protocol counts such scores as misses, so the metric would be a finite 0.0,
    which early stopping could take for the first best epoch of a broken model.)
    """

    split: ProtocolSplit
    populations: tuple[str, ...] = ("public",)
    config: EvalConfig | None = None

    def evaluate(self, scorer: Scorer) -> dict[str, dict[str, float]]:
        config = self.config or EvalConfig(seed=self.split.config.seed)
        return evaluate_split(_FiniteScorer(scorer), self.split, self.populations, "valid", config)

    def metric(self, scorer: Scorer, name: str) -> float:
        """``name`` averaged over the populations, weighted by their number of users."""
        results = self.evaluate(scorer)
        users = sum(r["users"] for r in results.values())
        if users == 0:
            raise ConfigError(f"no user of {self.populations} has a validation item")
        return sum(r[name] * r["users"] for r in results.values()) / users


@dataclass
class TrainHistory:
    """What happened during a run (for logs, benchmarks and tests)."""

    losses: list[float] = field(default_factory=list)
    validations: list[tuple[int, float]] = field(default_factory=list)
    best_epoch: int = 0
    best_metric: float = float("nan")
    stopped_early: bool = False
    diverged: bool = False  # the loss stopped being finite; training ended at the best epoch
    seconds: float = 0.0


@dataclass
class EarlyStopping:
    """The stopping rule of :func:`fit_with_early_stopping`: a validation value is a new best
    when it beats every earlier one, and training stops once ``patience`` validations in a
    row brought none. Replayable on a recorded curve (``bench/teacher_curve.py``)."""

    patience: int
    best: float = -math.inf
    bad: int = 0

    def update(self, value: float) -> bool:
        """Record one validation value; True when it is a new best."""
        if value > self.best:
            self.best, self.bad = value, 0
            return True
        self.bad += 1
        return False

    @property
    def exhausted(self) -> bool:
        """``patience`` validations in a row without a new best."""
        return self.bad >= self.patience


def fit_with_early_stopping(
    model: nn.Module,
    run_epoch: Callable[[int], float],
    validate: Callable[[], float] | None,
    config: TrainConfig,
    desc: str = "train",
) -> TrainHistory:
    """Call ``run_epoch(epoch)`` up to ``config.epochs`` times with early stopping.

    ``validate()`` (called in eval mode every ``eval_every`` epochs and after the last epoch)
    returns the selection metric, higher is better; the best weights are restored at the end.
    Without ``validate`` the model simply trains for ``config.epochs`` epochs.

    A loss, a parameter or a validation score (:class:`Validation`) that stops being finite
    after a validated epoch ends training there (the best weights restored,
    ``history.diverged`` set, a warning logged); before any, it raises
    :class:`TrainingDivergedError` naming ``desc``.
    """
    history = TrainHistory()
    start = time.perf_counter()
    best_state: dict[str, torch.Tensor] | None = None
    stopping = EarlyStopping(config.patience)
    bar = tqdm(range(1, config.epochs + 1), desc=desc, disable=not config.progress, leave=False)
    for epoch in bar:
        value: float | None = None
        try:
            loss = run_epoch(epoch)
            _check_finite_parameters(model)
            if validate is not None and (epoch % config.eval_every == 0 or epoch == config.epochs):
                model.eval()
                with torch.no_grad():
                    value = float(validate())
        except TrainingDivergedError as err:
            if best_state is None:
                raise TrainingDivergedError(f"{desc}, epoch {epoch}: {err}") from err
            log.warning(
                "%s diverged in epoch %d (%s); keeping its best epoch %d",
                desc,
                epoch,
                err,
                history.best_epoch,
            )
            history.diverged = True
            break
        history.losses.append(loss)
        postfix = {"loss": f"{loss:.4f}"}
        if value is not None:
            history.validations.append((epoch, value))
            postfix[config.metric] = f"{value:.4f}"
            if stopping.update(value):
                history.best_epoch, history.best_metric = epoch, value
                best_state = copy.deepcopy(model.state_dict())
            elif stopping.exhausted:
                history.stopped_early = True
                bar.set_postfix(postfix)
                break
        bar.set_postfix(postfix)
        log.debug("%s epoch %d: %s", desc, epoch, postfix)
    bar.close()
    if best_state is not None:
        model.load_state_dict(best_state)
    elif validate is None:
        history.best_epoch = len(history.losses)
    model.eval()
    history.seconds = time.perf_counter() - start
    return history


def count_parameters(params: Iterable[nn.Parameter]) -> int:
    """Number of scalars in ``params``."""
    return int(sum(p.numel() for p in params))


def next_item_loss(model: nn.Module, batch: Batch) -> torch.Tensor:
    """Mean cross-entropy of ``model(items, mask) -> [B, n_items]`` against ``targets [B]``.

    The loss for :class:`NextItemExamples` batches ``(items, mask, targets)``; padding-only
    leading columns are trimmed first.
    """
    items, mask, targets = trim_padding(*batch)
    return F.cross_entropy(model(items, mask), targets)
