"""What one client does with the student on its own data: DP-SGD on the global parameters
(Opacus), and the personal adapter fitted to the global model it is served with (a known
user's history, or a new user's few shots).

Accounting is not done here: the caller asks the client's persistent
:class:`~shared.privacy.ledger.PrivacyLedger` before training and records what
:func:`train_global_dp` reports (``noise_multiplier``, ``sample_rate``, ``steps``) after.
"""

from __future__ import annotations

import contextlib
import math
import random
import secrets
import warnings
import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader, TensorDataset

from shared.config import is_int, is_real
from shared.data.dataset import IntArray
from shared.errors import ConfigError, DataError
from shared.federated.local_config import LocalTrainConfig
from shared.models.sequence import module_device, next_item_cross_entropy, pad_histories
from shared.models.student import StudentModel
from shared.training.trainer import seeded


class FitCancelled(Exception):
    """:func:`fit_personal` stopped before its last step: its ``cancel`` said so."""


@dataclass(frozen=True)
class LocalResult:
    """What local training did: for the reply's metrics and the privacy ledger."""

    loss: float
    num_examples: int
    steps: int
    sample_rate: float


def next_item_examples(
    sequence: IntArray, max_len: int, max_examples: int | None = None, pad_to: int | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Every (window of the previous ``max_len`` items, next item) pair of one sequence.

    The most recent ``max_examples`` pairs are kept (recent behavior matters most). Windows
    are left-padded to the longest one, or to ``pad_to`` (e.g. ``max_len``, to pool the
    examples of several sequences).
    """
    seq = np.asarray(sequence, dtype=np.int64)
    if seq.ndim != 1:
        raise DataError(f"a local sequence must be 1-D item ids, got shape {seq.shape}")
    if len(seq) < 2:
        raise DataError(f"local data has {len(seq)} interaction(s); at least 2 are needed to train")
    starts = range(1, len(seq))
    if max_examples is not None:
        starts = range(max(1, len(seq) - max_examples), len(seq))
    prefixes = [seq[max(0, t - max_len) : t] for t in starts]
    items, mask = pad_histories(prefixes, max_len, pad_to=pad_to)
    targets = torch.as_tensor(seq[list(starts)], dtype=torch.long)
    return items, mask, targets


def pooled_examples(
    sequences: Sequence[IntArray], max_len: int, max_examples: int | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The :func:`next_item_examples` of several sequences (each its most recent
    ``max_examples``, as a client trains on), windows padded to ``max_len``, concatenated:
    ``items``/``mask`` ``[N, max_len]`` and ``targets [N]``, the first sequence's first."""
    parts = [next_item_examples(s, max_len, max_examples, pad_to=max_len) for s in sequences]
    items, mask, targets = (torch.cat(column) for column in zip(*parts, strict=True))
    return items, mask, targets


def check_items(sequence: IntArray, n_items: int) -> None:
    """Refuse local data with ids outside the catalog (malformed data)."""
    seq = np.asarray(sequence)
    if len(seq) and (seq.min() < 0 or seq.max() >= n_items):
        raise DataError(f"local data references items outside the catalog [0, {n_items})")


_dp_random: random.Random = secrets.SystemRandom()


def replay_dp_randomness(seed: int) -> None:
    """Benchmarks only: draw DP-SGD's batches and noise from ``seed`` in this process, so a
    run repeats. Nothing in the product calls it: there that randomness must be secret
    (see :func:`train_global_dp`)."""
    global _dp_random
    _dp_random = random.Random(seed)


def dp_sample_rate(n: int, batch_size: int) -> float:
    """The Poisson rate at which DP-SGD samples ``n`` examples with ``batch_size``: Opacus
    samples at ``1 / len(loader)``, i.e. ``1 / ceil(n / min(batch_size, n))``, for
    :func:`dp_epoch_steps` steps an epoch. The ledger must charge this rate, which is at most
    ``batch_size / n`` (charging that instead over-counted: 22.4 against 13.7 for 20
    examples in batches of 16 over 20 rounds)."""
    return 1.0 / dp_epoch_steps(n, batch_size)


def dp_epoch_steps(n: int, batch_size: int) -> int:
    """The steps of one DP-SGD epoch over ``n`` examples: ``ceil(n / min(batch_size, n))``,
    one over the sampling rate. Set on Opacus' sampler, whose own ``int(1 / rate)`` is one
    short where ``1 / (1 / k)`` rounds below ``k`` (k = 93, 99, 105, ...)."""
    return math.ceil(n / min(batch_size, n))


def round_steps(n: int, config: LocalTrainConfig) -> int:
    """The optimizer steps :func:`train_global_dp` takes in a round over ``n`` examples, with
    DP or without: ``local_epochs`` x :func:`dp_epoch_steps` (an empty Poisson batch is a
    step too), or the one released gradient under split noise (``noise_shares`` > 1). What
    the ledger is charged and what a client's ``max-round-steps`` bounds."""
    if config.noise_shares > 1:
        return 1
    return config.local_epochs * dp_epoch_steps(n, config.batch_size)


def _noise_only_step(
    optimizer: torch.optim.Optimizer,
    params: list[torch.nn.Parameter],
    config: LocalTrainConfig,
    generator: torch.Generator,
) -> None:
    """The step DP-SGD takes on an empty batch: the noise (its share) alone as the gradient
    (std ``noise_multiplier * max_grad_norm / sqrt(noise_shares)``), divided by the
    normaliser a real step divides by (``batch-size``), through the wrapped optimizer as a
    real step goes (its momentum too). Skipping it, or stepping outside the optimizer,
    would make the released model's noise reveal how many batches were empty, which the
    accounting does not cover."""
    std = config.noise_multiplier * config.max_grad_norm / math.sqrt(config.noise_shares)
    with torch.no_grad():
        for p in params:
            noise = torch.randn(p.shape, generator=generator, device=p.device, dtype=p.dtype)
            p.grad = noise * (std / config.batch_size)
    optimizer.step()


def train_global_dp(
    model: StudentModel,
    sequence: IntArray,
    config: LocalTrainConfig,
    groups: tuple[str, ...] = ("global",),
) -> LocalResult:
    """DP-SGD (Opacus, Poisson sampling, per-sample clipping + noise) on ``groups``.

    By default the global group only: personal and frozen parameters do not move. The
    meta-learning mode also trains the personal adapter from the shared initialization (its
    change is then released, so it is clipped and noised with the rest). Runs where the model
    is (CPU or CUDA). Returns the accounting inputs.
    """
    check_items(sequence, model.n_items)
    items, mask, targets = next_item_examples(sequence, model.config.max_len, config.max_examples)
    device = module_device(model)
    items, mask, targets = items.to(device), mask.to(device), targets.to(device)
    n = len(targets)
    batch = min(config.batch_size, n)
    rate = dp_sample_rate(n, config.batch_size)  # what the ledger is charged
    model.set_trainable(groups)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=config.lr, momentum=config.momentum)
    # Under DP the Poisson batches (and the noise) must be secret: the privacy accounting's
    # sampling rate assumes nobody can tell which examples a step used, and config.seed is
    # known to the server that sent it. Only training without DP follows the seed.
    seed = _dp_random.getrandbits(63) if config.dp else config.seed
    generator = torch.Generator().manual_seed(seed)
    loader = DataLoader(
        TensorDataset(items, mask, targets), batch_size=batch, shuffle=True, generator=generator
    )
    noise = torch.Generator(device).manual_seed(_dp_random.getrandbits(63))  # secret too
    if config.dp:
        from opacus import PrivacyEngine
        from opacus.utils.uniform_sampler import UniformWithReplacementSampler

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            engine = PrivacyEngine(accountant="rdp", secure_mode=False)
            module, optimizer, loader = engine.make_private(
                module=model,
                optimizer=optimizer,
                data_loader=loader,
                noise_multiplier=config.noise_multiplier / math.sqrt(config.noise_shares),
                max_grad_norm=config.max_grad_norm,
                poisson_sampling=True,
                noise_generator=noise,
            )
        if abs(loader.sample_rate - rate) > 1e-12:
            raise RuntimeError(  # the ledger charges dp_sample_rate: it must be the real one
                f"Opacus samples at {loader.sample_rate}, not at the charged {rate}; see "
                "dp_sample_rate"
            )
        sampler = loader.batch_sampler
        if not isinstance(sampler, UniformWithReplacementSampler):
            raise RuntimeError(f"Opacus' DP loader samples with {type(sampler).__name__}")
        sampler.steps = dp_epoch_steps(n, config.batch_size)  # the steps the check charged
        # A public normaliser: Opacus divides the noisy sum by int(n * rate), which moves
        # with n, so the noise's size in a released update would tell n from n + 1 (the
        # count, one record apart). batch-size is the same for every client and round.
        optimizer.expected_batch_size = config.batch_size
    else:
        module = model
    # without DP the seed the server sent decides everything, dropout included
    with contextlib.nullcontext() if config.dp else seeded(config.seed):
        steps, losses = _train_loop(module, optimizer, loader, params, config, noise)
    model.eval()
    return LocalResult(
        loss=float(np.mean(losses)) if losses else math.nan,
        num_examples=n,
        steps=steps,
        sample_rate=rate,
    )


def _train_loop(
    module: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    loader: DataLoader[tuple[torch.Tensor, ...]],
    params: list[torch.nn.Parameter],
    config: LocalTrainConfig,
    noise: torch.Generator,
) -> tuple[int, list[float]]:
    """:func:`train_global_dp`'s epochs on ``module`` (Opacus' wrapper under DP, which is
    closed at the end); returns the steps taken and the batches' losses."""
    losses: list[float] = []
    steps = 0
    try:
        with warnings.catch_warnings():
            # Opacus' hooks fire on module outputs when the inputs (item ids) need no gradient.
            warnings.filterwarnings("ignore", message="Full backward hook is firing")
            for _ in range(config.local_epochs):
                for b_items, b_mask, b_targets in loader:
                    steps += 1  # counted even when empty: the accounting stays conservative
                    optimizer.zero_grad(set_to_none=True)
                    if len(b_targets) == 0:
                        if config.dp:  # an empty Poisson batch still releases its noise
                            inner = optimizer.original_optimizer  # type: ignore[attr-defined]
                            _noise_only_step(inner, params, config, noise)
                        if config.noise_shares > 1:
                            break  # the one released gradient of this round
                        continue
                    loss = next_item_cross_entropy(
                        module(b_items, b_mask),
                        b_items,
                        b_mask,
                        b_targets,
                        exclude_seen=config.exclude_seen,
                    )
                    loss.backward()
                    if not config.dp:
                        torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
                    optimizer.step()
                    losses.append(float(loss.detach()))
                    if config.noise_shares > 1:
                        break  # one released gradient per round (local_epochs is 1)
    finally:
        if config.dp:
            module._close()  # type: ignore[operator]  # removes Opacus' hooks, grad samples
    return steps, losses


def history_seed(history: IntArray, seed: int = 0) -> int:
    """A seed that depends on ``seed`` and the items of ``history`` (in order) alone."""
    items = np.ascontiguousarray(history, dtype=np.int64).tobytes()
    return zlib.crc32(items, seed & 0xFFFFFFFF)


def check_fit_settings(steps: int, lr: float) -> None:
    """Refuse a personal adapter fit's ``steps`` (an integer >= 0) or, with steps to take,
    its ``lr`` (a finite number > 0): :func:`fit_personal`'s check."""
    if not is_int(steps) or steps < 0:
        raise ConfigError(
            f"the personal adapter's steps must be an integer >= 0 (0: no fit), got {steps!r}"
        )
    if steps > 0 and (not is_real(lr) or lr <= 0):
        raise ConfigError(
            f"the personal adapter's learning rate must be a finite number > 0, got {lr!r}"
        )


def fit_personal(
    model: StudentModel,
    history: IntArray,
    init: Mapping[str, torch.Tensor],
    steps: int,
    lr: float,
    max_examples: int = 256,
    exclude_seen: bool = True,
    seed: int = 0,
    cancel: Callable[[], bool] | None = None,
) -> float:
    """The personal adapter for the global parameters ``model`` holds now: reset to ``init``
    (the identity, or the meta-learned initialization), then ``steps`` full-batch Adam steps
    on the adapter alone, each interaction of ``history`` predicted from the ones before it.
    With fewer than 2 interactions there is nothing to fit and ``init`` is served. Either way
    the model is left in eval mode, ready to serve. Returns the last loss (NaN if nothing was
    trained).

    The fit's dropout is drawn from torch's generators seeded by ``seed`` and the history's
    items (:func:`history_seed`; restored afterwards), and the adapter starts from its seeded
    projection, so the fitted adapter depends on the global model and the history alone: a
    device and the simulation's evaluation (:class:`simulation.pipeline.AdaptedStudent`) fit
    the same adapter from the same history, and a refit repeats.

    A device calls this whenever the global model it serves changes, never continuing an
    adapter fitted against an older one: adapters kept across rounds (each fitted for a few
    steps against the global model of the round its device last trained) cost the served
    model up to 0.022 full HR@10 on ml-100k; refitted ones cost nothing (``docs/parameters.md``,
    section 4).

    ``steps`` must be an integer >= 0 (0: no fit) and, when it is above 0, ``lr`` a finite
    number > 0: anything else is a :class:`ConfigError` before the adapter is touched, for
    every history. A negative count used to serve the initialization as if it were 0, an
    infinite rate fitted an adapter of NaNs (every score NaN, every case a miss), and a NaN
    or negative one raised Adam's bare ``ValueError`` only once a history had two
    interactions, leaving the model half set up for training.

    ``cancel``: asked before each step; once it answers ``True`` the fit stops and raises
    :class:`FitCancelled`, the model left in eval mode with a partly fitted adapter (not to
    be served): a device's daemon stopping, or erasing the history being fitted, must not
    wait for thousands of steps.
    """
    check_fit_settings(steps, lr)
    model.adapter.load_state_dict(init)
    if steps <= 0 or len(history) < 2:
        model.eval()
        return math.nan
    check_items(history, model.n_items)
    items, mask, targets = next_item_examples(history, model.config.max_len, max_examples)
    device = module_device(model)
    items, mask, targets = items.to(device), mask.to(device), targets.to(device)
    model.set_trainable(["personal"])
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=lr)
    loss = torch.tensor(math.nan)
    try:
        with seeded(history_seed(history, seed)):
            for _ in range(steps):
                if cancel is not None and cancel():
                    raise FitCancelled("the personal fit was cancelled")
                optimizer.zero_grad(set_to_none=True)
                loss = next_item_cross_entropy(
                    model(items, mask), items, mask, targets, exclude_seen=exclude_seen
                )
                loss.backward()
                optimizer.step()
    finally:
        model.eval()
        model.set_trainable(["global"])
    return float(loss.detach())
