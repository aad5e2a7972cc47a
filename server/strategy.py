"""FedAvg that validates client updates and reports per-round participation.

Clients send *updates* (new minus received parameters, see ``client/client_app.py``);
this strategy averages them weighted by ``num_examples`` (each capped at ``max_weight``, as
SecAgg+ caps it: the count is the client's claim) and adds the average to the current global
model. Averaging deltas equals averaging parameters, but keeps the
values small, which is what SecAgg+'s fixed ``clipping_range`` needs.

Why the legacy ``flwr.server.strategy.FedAvg``: ``SecAggPlusWorkflow`` (Flower 1.42)
drives the legacy ``Strategy`` interface through a ``LegacyContext``; the Message-API
strategies in ``flwr.serverapp.strategy`` have no SecAgg+ integration.

Per round it counts sampled / ok / declined (client chose not to train, zero weight) /
rejected (failed validation: NaN/inf, wrong count/shape/dtype, non-positive weight) /
failed (error reply, timeout, or SecAgg+ dropout) clients, and keeps a
:class:`FitRoundStats` / :class:`EvalRoundStats` per round for the round-end hook.

With user-level DP (a :class:`server.user_dp.UserLevelDP` passed as ``user_dp``) the
cohort is a Poisson sample and the aggregate step changes: every client has weight 1,
the sum of the (clipped) updates is divided by the *expected* cohort size and Gaussian
noise is added there - in the
one place both plain FedAvg and SecAgg+ (which hands over a single, already averaged
result) go through. See ``server/user_dp.py`` for the mechanism and its accounting.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from logging import INFO, WARNING
from typing import TYPE_CHECKING, Any, TypeAlias, TypeGuard

import numpy as np
import numpy.typing as npt
from flwr.common import (
    EvaluateIns,
    EvaluateRes,
    FitIns,
    FitRes,
    Parameters,
    Scalar,
    ndarrays_to_parameters,
)
from flwr.common.logger import log
from flwr.server.client_manager import ClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.strategy import FedAvg

from server.npy import parameters_to_arrays
from server.server_optimizer import ServerOptimizer, ServerOptimizerSettings
from shared.config import is_int
from shared.errors import ConfigError
from shared.federated.local_config import check_noise_shares
from shared.federated.task import (
    CONFIG_SERVER_ROUND,
    CONFIG_UPDATE_CLIP_NORM,
    METRIC_REASON,
    METRIC_STATUS,
    FitStatus,
)
from shared.federated.validation import (
    InvalidUpdateError,
    check_float_arrays,
    clip_update_l2,
    find_problem,
    l2_norm,
    median_clip_bound,
)

if TYPE_CHECKING:  # user_dp imports Opacus/torch: only where user-level DP is on
    from server.user_dp import UserLevelDP

Arrays: TypeAlias = list[npt.NDArray[np.floating]]
FitFailure: TypeAlias = tuple[ClientProxy, FitRes] | BaseException
EvalFailure: TypeAlias = tuple[ClientProxy, EvaluateRes] | BaseException

#: How many rejection/failure reasons a round keeps (the counts are always exact).
MAX_REASONS = 20
#: How much of one failure reason is kept and logged: a client's error reply carries any
#: text it likes, and the stats of every round stay in memory for the run.
MAX_REASON_CHARS = 500

#: How many metrics of one client's reply, and how long a key, become round statistics:
#: the task's own are a handful of short names; the rest are left out.
MAX_CLIENT_METRICS = 32
MAX_METRIC_KEY_CHARS = 100

#: Fit-config key: when true, clients report weight 1 instead of ``num_examples`` (so
#: SecAgg+'s weighted average becomes a plain one; user-level DP needs uniform weights).
#: Honoured under SecAgg+ by ``server.secagg.secaggplus_when_requested_mod``; in plain
#: mode the strategy ignores the reported weights itself.
CONFIG_UNIFORM_WEIGHT = "uniform-weight"
#: Version of :meth:`ValidatingFedAvg.state_dict`.
STRATEGY_STATE_VERSION = 1
#: ``update-clip-median-multiple``'s default: in plain mode without a fixed
#: ``update-clip-norm``, each round's updates are clipped to this many times their median
#: norm (:func:`~shared.federated.validation.median_clip_bound`). 0 turns it off.
UPDATE_CLIP_MEDIAN_MULTIPLE = 5.0


def check_clip_median_multiple(multiple: float) -> None:
    """Raise :class:`ConfigError` unless ``update-clip-median-multiple`` is 0 (off) or a
    finite number >= 1: below 1 it clipped the round's median, honest, update itself, and
    NaN compared false with every norm (nothing clipped, yet the setting looked on)."""
    if not (multiple == 0 or 1 <= multiple < math.inf):
        raise ConfigError(
            f"'update-clip-median-multiple' must be 0 (off) or a finite number >= 1, got "
            f"{multiple!r}: each round's updates are clipped to that many times their median "
            "norm, and below 1 that clips the median update itself; 5 is the default, or set "
            "a fixed 'update-clip-norm'"
        )


class StopTraining(Exception):
    """Raise from a round-end hook to end the run cleanly after the current round, or from
    the strategy's ``configure_fit`` to end it before the round it configures.

    ``server.secagg.run_rounds`` catches it, logs the message and returns normally
    (e.g. the next round would exceed the user-level privacy budget).
    """


@dataclass(frozen=True)
class FitRoundStats:
    """What happened in the fit phase of one round."""

    server_round: int
    sampled: int
    ok: int = 0
    declined: int = 0
    rejected: int = 0
    failed: int = 0
    num_examples: int = 0
    secure_aggregation: bool = False
    #: Whether the global model changed this round.
    updated: bool = False
    rejections: tuple[str, ...] = ()
    failures: tuple[str, ...] = ()
    #: ``num_examples``-weighted means of the numeric metrics of ok clients.
    client_metrics: Mapping[str, float] = field(default_factory=dict)
    #: L2 norm of the applied (averaged) update; 0 if not updated.
    update_norm: float = 0.0
    #: Accepted updates the server scaled down to ``clip_bound`` (plain mode only).
    clipped: int = 0
    #: The L2 bound the server clipped this round's updates to: ``update-clip-norm`` (or
    #: ``user-dp-clip``), else ``update-clip-median-multiple`` times their median norm;
    #: 0 when none applied (SecAgg+, clipping off, no update accepted).
    clip_bound: float = 0.0
    #: Cumulative user-level epsilon after this round (``None`` without user-level DP).
    epsilon_user: float | None = None

    def as_metrics(self) -> dict[str, Scalar]:
        """Flat metrics for Flower's history (counts plus client metric means)."""
        metrics: dict[str, Scalar] = {
            "clients-sampled": self.sampled,
            "clients-ok": self.ok,
            "clients-declined": self.declined,
            "clients-rejected": self.rejected,
            "clients-failed": self.failed,
            "clients-clipped": self.clipped,
            "num-examples": self.num_examples,
            "updated": self.updated,
            "update-norm": self.update_norm,
            "update-clip-bound": self.clip_bound,
        }
        if self.epsilon_user is not None:
            metrics["epsilon-user"] = self.epsilon_user
        metrics.update({f"client-{k}": v for k, v in self.client_metrics.items()})
        return metrics


@dataclass(frozen=True)
class EvalRoundStats:
    """What happened in the federated-evaluation phase of one round."""

    server_round: int
    sampled: int
    ok: int = 0
    #: replied without evaluating (owner keeps metrics private, too few local events)
    declined: int = 0
    failed: int = 0
    loss: float | None = None
    num_examples: int = 0
    metrics: Mapping[str, float] = field(default_factory=dict)
    failures: tuple[str, ...] = ()


@dataclass(frozen=True)
class RoundReport:
    """Everything the round-end hook gets: the new global model and what happened."""

    server_round: int
    parameters: Arrays
    fit: FitRoundStats
    evaluate: EvalRoundStats | None
    fit_seconds: float
    round_seconds: float

    @property
    def epsilon_user(self) -> float | None:
        """Cumulative user-level epsilon after this round (``None`` without user DP)."""
        return self.fit.epsilon_user


RoundCallback: TypeAlias = Callable[[RoundReport], None]


def bounded_reason(text: str) -> str:
    """``text`` on one printable line, cut to :data:`MAX_REASON_CHARS` (its length said)
    where longer: what is kept and logged of a reason a client wrote. A character that is
    not printable (a newline, an ANSI escape, a bidi override) is written as its escape: a
    client's text forged whole lines of the server's log and took over its terminal."""
    text = "".join(c if c.isprintable() else c.encode("unicode_escape").decode() for c in text)
    if len(text) <= MAX_REASON_CHARS:
        return text
    return f"{text[:MAX_REASON_CHARS]}... ({len(text)} characters)"


def _failure_reason(failure: FitFailure | EvalFailure) -> str:
    if isinstance(failure, BaseException):
        return bounded_reason(str(failure))
    _, res = failure
    return bounded_reason(f"status {res.status.code.name}: {res.status.message}")


def _dedupe(failures: Sequence[FitFailure]) -> list[FitFailure]:
    """Drop repeated reports of the same error reply.

    Flower 1.42's ``SecAggPlusWorkflow.collect_masked_vectors_stage`` appends every
    error reply of that stage to ``failures`` twice (two loops over the replies), each
    time as a new ``Exception(msg.error)`` around the same ``Error`` object.
    """
    seen: set[int] = set()
    unique: list[FitFailure] = []
    for failure in failures:
        key = (
            id(failure.args[0])
            if isinstance(failure, BaseException) and failure.args
            else id(failure)
        )
        if key not in seen:
            seen.add(key)
            unique.append(failure)
    return unique


def _failure_summary(
    sampled: int, replied: int, failures: Sequence[FitFailure | EvalFailure]
) -> tuple[int, tuple[str, ...]]:
    """Failed-client count and reasons: error replies plus clients that never replied.

    Timed-out clients appear neither in ``results`` nor in ``failures`` (Flower's
    workflows simply do not get their reply), so they are inferred from the sample. Under
    SecAgg+ a client can be in both: one that sent its masked update and then dropped in
    the unmask stage is summed (its mask is rebuilt from its neighbours' shares), so it
    counts as a contributor, not also as a failure; its error is still listed.
    """
    silent = max(0, sampled - replied - len(failures))
    reasons = [_failure_reason(f) for f in failures[:MAX_REASONS]]
    if silent:
        reasons.append(f"{silent} client(s) did not reply in time (timeout or dropout)")
    return min(len(failures) + silent, max(0, sampled - replied)), tuple(reasons)


def _weighted_mean(pairs: Sequence[tuple[float, float]]) -> float | None:
    """The ``weight``-weighted mean of finite ``(weight, value)`` pairs, ``None`` without
    weight. The weights are normalised first, so the mean of finite values stays finite: a
    client's metric of 1e308 times its example count overflowed to inf, which no JSON
    progress line holds (the round hook failed, and the run with it). They are brought near
    1 first (:func:`_unit_scale`): the sum of two finite counts near the float range
    overflowed, and ``math.fsum`` raised ``OverflowError`` out of the aggregation."""
    exponent = _unit_scale(w for w, _ in pairs)
    scaled = [(math.ldexp(w, exponent), v) for w, v in pairs]
    total = math.fsum(w for w, _ in scaled)
    if not total > 0:
        return None
    return math.fsum((w / total) * v for w, v in scaled)


def _unit_scale(weights: Iterable[float]) -> int:
    """The power of two that brings the largest of ``weights`` into [0.5, 1) (0 without a
    positive one). Scaling by a power of two is exact, so a weighted mean of scaled weights
    is the same, bit for bit, as of the weights themselves, only without overflowing."""
    largest = max(weights, default=0.0)
    return -math.frexp(largest)[1] if largest > 0 else 0


def _weighted_means(pairs: Sequence[tuple[float, Mapping[str, Scalar]]]) -> dict[str, float]:
    """``num_examples``-weighted means of the numeric (non-bool) metric values."""
    values: dict[str, list[tuple[float, float]]] = {}
    for n, metrics in pairs:
        for key, value in metrics.items():
            if isinstance(value, bool) or not isinstance(value, int | float):
                continue
            if not math.isfinite(float(value)):
                continue
            values.setdefault(key, []).append((float(n), float(value)))
    means = {k: _weighted_mean(v) for k, v in values.items()}
    return {k: m for k, m in means.items() if m is not None}


def _finite_number(value: object) -> TypeGuard[int | float]:
    """``value`` is a finite int or float (not NaN, inf, a bool, or the list of numbers a
    client may put in a MetricRecord where a number belongs)."""
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _positive_weight(value: object) -> bool:
    """A client's reported weight is usable: a finite number > 0 (:func:`_finite_number`)."""
    return _finite_number(value) and value > 0


def _status_of(res: FitRes | EvaluateRes) -> str:
    return str(res.metrics.get(METRIC_STATUS, FitStatus.OK.value))


def _contributors(
    results: Sequence[tuple[ClientProxy, FitRes]],
) -> list[tuple[ClientProxy, FitRes]]:
    """The replies that carry an update: all but the declines."""
    return [(p, r) for p, r in results if _status_of(r) != FitStatus.DECLINED.value]


def _unit_weights(contributors: int, unmasked_weight: float | None, server_round: int) -> float:
    """How many weight-1 updates a SecAgg+ mean under uniform weights averages: the weight
    the unmasked sum holds, where the workflow told it (else the replies not declined).

    A reply that says ok but whose masked weight is 0 (which only a modified client sends:
    the plain path rejects such a reply) adds nothing to the sum; counted, it scaled the
    honest updates' sum by k / (k - 1), each user's influence past the clip the user-level
    DP noise is calibrated to."""
    if unmasked_weight is None:
        return contributors
    if unmasked_weight != contributors:
        log(
            WARNING,
            "round %s: the SecAgg+ sum holds client weights adding up to %.6g, but %s "
            "client(s) replied ok: a client did not weigh its update 1; the sum counts the "
            "weights it holds",
            server_round,
            unmasked_weight,
            contributors,
        )
    return unmasked_weight


def _public_metrics(metrics: Mapping[str, Scalar]) -> dict[str, Scalar]:
    """The metrics of a reply that become round statistics: not its status, and at most
    :data:`MAX_CLIENT_METRICS` keys of at most :data:`MAX_METRIC_KEY_CHARS` characters (a
    client chooses them, and each became a statistic kept all run and written into every
    checkpoint, progress line and Flower's history log)."""
    public: dict[str, Scalar] = {}
    for key, value in metrics.items():
        if len(public) == MAX_CLIENT_METRICS:
            break
        if key not in (METRIC_STATUS, METRIC_REASON) and len(key) <= MAX_METRIC_KEY_CHARS:
            public[key] = value
    return public


def secure_least_cohort(min_cohort: int, noise_shares: int, secagg_least: int) -> int:
    """The fewest sampled clients a SecAgg+ round completes with: ``min-cohort``, 2 (a sum
    of one is that client's update), ``secagg_least`` (the shares' reconstruction threshold:
    Flower halts a round with fewer) and ``noise-shares`` (a sum of fewer is never unmasked,
    see :meth:`ValidatingFedAvg.short_secure_aggregate`)."""
    return max(2, min_cohort, noise_shares, secagg_least)


def round_quorum(
    min_available: int, min_cohort: int, noise_shares: int, secagg_least: int | None
) -> int:
    """The connected clients a round waits for: ``min-available-clients``, and under SecAgg+
    (``secagg_least`` its reconstruction threshold; ``None`` without SecAgg+) at least
    :func:`secure_least_cohort` (with fewer every round would halt before unmasking, yet
    count). The one rule, for the strategy and the server's config alike."""
    if secagg_least is None:
        return min_available
    return max(min_available, secure_least_cohort(min_cohort, noise_shares, secagg_least))


def wait_for_clients(
    client_manager: ClientManager, minimum: int, timeout: float, poll_s: float = 0.05
) -> int:
    """Wait until ``minimum`` clients are available (asking every ``poll_s``); return how
    many there are.

    Polls ``num_available()`` because in Flower 1.42 that call (not ``wait_for``)
    refreshes the node list from the grid; ``wait_for`` alone can sleep through the
    first 5 s registration interval of ``DefaultWorkflow``'s updater thread.
    """
    deadline = time.monotonic() + timeout
    available = client_manager.num_available()
    while available < minimum and time.monotonic() < deadline:
        time.sleep(poll_s)
        available = client_manager.num_available()
    return available


class ValidatingFedAvg(FedAvg):
    """FedAvg over client updates with validation, seeded cohort sampling and stats.

    Parameters
    ----------
    initial_parameters:
        Initial global model (list of float arrays); fixes the expected shapes/dtypes.
    cohort_size / cohort_fraction:
        Clients per fit round: ``cohort_size`` if > 0, else
        ``max(min_cohort, int(fraction * available))``; never more than available.
    eval_size / eval_fraction:
        Same for federated evaluation; both 0 disables it.
    update_clip_norm:
        If > 0, sent to clients (they clip their update's L2 norm) and, in plain mode,
        enforced again here since the server sees individual updates.
    update_clip_median_multiple:
        In plain mode without user-level DP and with ``update_clip_norm`` 0: each round's
        accepted updates are clipped to this many times their (lower) median L2 norm
        (:func:`~shared.federated.validation.median_clip_bound`) before they are weighed
        and averaged, so that one device's huge but finite update moves the global model
        by at most about ``multiple x median / cohort``, not by ``update / cohort``. 0 =
        off; otherwise at least 1 (:func:`check_clip_median_multiple`). It never applies
        under SecAgg+ (the server sees only the sum; ``secagg-clipping-range`` bounds each
        value there) nor under user-level DP (its fixed clip ``C`` holds). A round's one
        update is its own median, so it is never clipped.
    secure_aggregation:
        Results arrive already summed by ``SecAggPlusWorkflow`` (every ``FitRes``
        carries the same aggregate); only the aggregate can be validated. Clients
        withhold per-client metrics and ``num_examples`` in this mode (see
        ``server.secagg``), so the stats have empty ``client_metrics`` and
        ``num_examples`` 0.
    secagg_max_cohort:
        Largest cohort SecAgg+ can sum without overflowing its modulus.
    secagg_least:
        Fewest clients SecAgg+ completes a round with (an integer reconstruction
        threshold; 2 otherwise).
    secagg_halting:
        Larger cohort sizes SecAgg+ still halts
        (:attr:`server.secagg.SecAggSettings.halting_cohorts`); under user-level DP a
        Poisson cohort of such a size is skipped like one below ``secagg_least``.
    user_dp:
        User-level DP (DP-FedAvg): Poisson cohorts, uniform client weights,
        ``sum / expected cohort`` plus Gaussian noise, one accountant step per round.
        ``update_clip_norm`` must then equal the mechanism's clip norm ``C``.
    server_optimizer:
        How the round's mean update becomes the global step (FedAvg or FedAdam,
        :mod:`server.server_optimizer`); default plain averaging.
    max_weight:
        The largest weight a client's update (in plain mode) or evaluation gets: a larger reported
        ``num_examples`` is capped at it, as SecAgg+ caps it before masking
        (``secagg-max-weight``, 1 where DP clients weigh 1); a client's claim of 10**12
        examples made its update the round's step, and its metrics the round's means.
    noise_shares:
        Record-level DP noise split over the clients (``noise-shares`` > 1, see
        :class:`~shared.federated.local_config.LocalTrainConfig`): each contributor added
        ``1/noise_shares`` of the noise variance, so a secure aggregate of fewer
        contributors carries less noise than the clients' ledgers charged for and is
        discarded (the global model stays). Needs ``secure_aggregation``.
    """

    def __init__(
        self,
        *,
        initial_parameters: Arrays,
        cohort_size: int = 0,
        cohort_fraction: float = 1.0,
        min_cohort: int = 2,
        min_available_clients: int = 2,
        eval_size: int = 0,
        eval_fraction: float = 1.0,
        min_eval: int = 1,
        update_clip_norm: float = 0.0,
        update_clip_median_multiple: float = UPDATE_CLIP_MEDIAN_MULTIPLE,
        secure_aggregation: bool = False,
        secagg_max_cohort: int | None = None,
        secagg_least: int = 2,
        secagg_halting: Sequence[int] = (),
        seed: int = 0,
        availability_timeout: float = 120.0,
        extra_fit_config: Mapping[str, Scalar] | None = None,
        extra_eval_config: Mapping[str, Scalar] | None = None,
        user_dp: UserLevelDP | None = None,
        server_optimizer: ServerOptimizerSettings | None = None,
        noise_shares: int = 1,
        max_weight: float = math.inf,
    ) -> None:
        check_float_arrays(initial_parameters, what="initial parameters")
        check_clip_median_multiple(update_clip_median_multiple)
        check_noise_shares(
            noise_shares, secure_aggregation=secure_aggregation, cohort_size=cohort_size
        )
        if user_dp is not None and update_clip_norm != user_dp.settings.clip_norm:
            raise ConfigError(
                f"user-level DP clips updates to {user_dp.settings.clip_norm}, but "
                f"update_clip_norm is {update_clip_norm}; they must be equal"
            )
        super().__init__(
            fraction_fit=cohort_fraction,
            fraction_evaluate=eval_fraction,
            min_fit_clients=min_cohort,
            min_evaluate_clients=min_eval,
            min_available_clients=min_available_clients,
            initial_parameters=ndarrays_to_parameters(initial_parameters),
            accept_failures=True,
        )
        self.cohort_size = cohort_size
        self.eval_size = eval_size
        self.update_clip_norm = update_clip_norm
        self.update_clip_median_multiple = update_clip_median_multiple
        self.secure_aggregation = secure_aggregation
        self.secagg_max_cohort = secagg_max_cohort
        self.secagg_least = secagg_least
        self.secagg_halting = frozenset(secagg_halting)
        self.seed = seed
        self.availability_timeout = availability_timeout
        self.extra_fit_config = dict(extra_fit_config or {})
        self.extra_eval_config = dict(extra_eval_config or {})
        self.user_dp = user_dp
        self.noise_shares = noise_shares
        self.max_weight = max_weight
        self.optimizer = ServerOptimizer(
            server_optimizer or ServerOptimizerSettings(),
            [np.shape(a) for a in initial_parameters],
        )
        self._reference: Arrays = [np.array(a, copy=True) for a in initial_parameters]
        self._sampled: dict[int, int] = {}
        #: user-level DP: the round's expected cohort, the fixed denominator of its mean
        self._denominator: dict[int, int] = {}
        self._eval_sampled: dict[int, int] = {}
        #: why :meth:`_apply` refused the step of the round being aggregated, or None
        self._refused_step: str | None = None
        #: The weight the SecAgg+ sum being aggregated holds, in client weights of
        #: max-weight (its summed weight / quantization range): set by the SecAgg+ workflow
        #: as it unmasks the sum (:func:`server.secagg.bounded_factor_extract`), read once.
        self.unmasked_weight: float | None = None
        self.fit_stats: dict[int, FitRoundStats] = {}
        self.eval_stats: dict[int, EvalRoundStats] = {}

    def __repr__(self) -> str:
        """Short description for Flower's logs."""
        mode = "secagg+" if self.secure_aggregation else "plain"
        dp = f", {self.user_dp!r}" if self.user_dp is not None else ""
        shares = f", noise_shares={self.noise_shares}" if self.noise_shares > 1 else ""
        clip = (
            f"{self.update_clip_median_multiple:g}x median"
            if self._median_clipping()
            else self.update_clip_norm
        )
        return f"ValidatingFedAvg({mode}, {self.optimizer!r}, clip={clip}{shares}{dp})"

    def _median_clipping(self) -> bool:
        """Whether this strategy clips each round's updates to a multiple of their median
        norm: in plain mode, without user-level DP or a fixed ``update_clip_norm``."""
        return (
            self.update_clip_median_multiple > 0
            and self.update_clip_norm <= 0
            and self.user_dp is None
            and not self.secure_aggregation
        )

    # ------------------------------------------------------------------ state

    def state_dict(self) -> dict[str, Any]:
        """JSON-serializable state for a checkpoint.

        Cohort sampling is a pure function of ``(seed, round)`` (``random.Random`` salted
        with ``fit-{seed}-{round}``), so the seed *is* the sampler state: a resumed run
        samples the same cohorts as an uninterrupted one (except under user-level DP,
        whose cohorts are secret, see :meth:`_sample`). The server optimiser's moments
        are part of it. The user-level DP ledger is checkpointed separately
        (``UserLevelDP.state_dict``).
        """
        return {
            "version": STRATEGY_STATE_VERSION,
            "sampler": "random.Random(salt=fit|eval-{seed}-{round})",
            "seed": self.seed,
            "sampled": {str(r): n for r, n in sorted(self._sampled.items())},
            "server_optimizer": self.optimizer.state_dict(),
        }

    def load_state_dict(self, state: Mapping[str, Any], source: str = "") -> None:
        """Restore :meth:`state_dict` (the sampler seed of the checkpointed run wins);
        ``source`` (the checkpoint file it came from) is named in the errors."""
        what = f"the strategy state in {source}" if source else "strategy state"
        fix = (
            "; restore the checkpoint from a backup, or move that round's files away to resume "
            "from the round before"
            if source
            else ""
        )
        if state.get("version") != STRATEGY_STATE_VERSION:
            raise ConfigError(
                f"{what} has version {state.get('version')!r}, expected "
                f"{STRATEGY_STATE_VERSION}{fix}"
            )
        seed = state.get("seed")
        if not is_int(seed):
            raise ConfigError(f"{what} has a malformed seed {seed!r}{fix}")
        if seed != self.seed:
            log(
                WARNING,
                "checkpoint was sampled with seed %s, config says %s; keeping %s so the "
                "resumed run samples like the original",
                seed,
                self.seed,
                seed,
            )
            self.seed = seed
        sampled = state.get("sampled", {})
        try:
            restored = {int(r): int(n) for r, n in dict(sampled).items()}
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"{what} has malformed 'sampled' counts: {exc}{fix}") from None
        self._sampled.update(restored)
        # checkpoints written before the server optimiser existed were plain FedAvg
        optimizer = state.get("server_optimizer", {"kind": "avg", "steps": 0})
        if not isinstance(optimizer, Mapping):
            raise ConfigError(f"{what} has a malformed server optimizer {optimizer!r}{fix}")
        try:
            self.optimizer.load_state_dict(optimizer)
        except ConfigError as exc:
            # another optimiser is the run's setting (its error says what to do); anything
            # else is a damaged state, which the round before may not share
            damaged = optimizer.get("kind") == self.optimizer.settings.kind
            raise ConfigError(f"{what}: {exc}{fix if damaged else ''}") from None

    # ------------------------------------------------------------------ sampling

    def num_fit_clients(self, num_available_clients: int) -> tuple[int, int]:
        """Cohort size for this round (count or fraction), capped by availability."""
        if self.cohort_size > 0:
            wanted = self.cohort_size
        else:
            # under SecAgg+ never fewer than a secure round completes with
            wanted = max(int(num_available_clients * self.fraction_fit), self.least_cohort())
            most = self.secagg_max_cohort if self.secure_aggregation else None
            if most is not None and wanted > most:
                # a fraction grows with the clients connected: capped, not a crash in
                # whichever round first sees that many (a cohort-size is refused instead)
                log(
                    WARNING,
                    "cohort of %s (cohort-fraction %s) capped at %s, the most a SecAgg+ sum "
                    "holds without overflowing its modulus",
                    wanted,
                    self.fraction_fit,
                    most,
                )
                wanted = most
        return min(wanted, num_available_clients), self.min_available_clients

    def num_evaluation_clients(self, num_available_clients: int) -> tuple[int, int]:
        """Evaluation cohort size (count or fraction), capped by availability."""
        if self.eval_size > 0:
            wanted = self.eval_size
        elif self.fraction_evaluate <= 0:
            return 0, self.min_available_clients
        else:
            wanted = max(
                int(num_available_clients * self.fraction_evaluate), self.min_evaluate_clients
            )
        return min(wanted, num_available_clients), self.min_available_clients

    def least_cohort(self) -> int:
        """The fewest sampled clients a round trains with: ``min-cohort``, and under
        SecAgg+ :func:`secure_least_cohort`."""
        if self.secure_aggregation:
            return secure_least_cohort(self.min_fit_clients, self.noise_shares, self.secagg_least)
        return max(1, self.min_fit_clients)

    def clients_needed(self) -> int:
        """The connected clients a round waits for: ``min-available-clients``, and under
        SecAgg+ at least :meth:`least_cohort` (with fewer every round would halt before
        unmasking, yet count): :func:`round_quorum`."""
        return round_quorum(
            self.min_available_clients,
            self.min_fit_clients,
            self.noise_shares,
            self.secagg_least if self.secure_aggregation else None,
        )

    def _cohort_bounds(self) -> tuple[int, int | None]:
        """The fewest (:meth:`least_cohort`) and most (SecAgg+'s modulus, else no bound)
        sampled clients a round trains with."""
        return self.least_cohort(), self.secagg_max_cohort if self.secure_aggregation else None

    def _halting(self) -> frozenset[int]:
        """The cohort sizes between :meth:`_cohort_bounds` that SecAgg+ halts (none in
        plain mode)."""
        return self.secagg_halting if self.secure_aggregation else frozenset()

    def user_dp_round(self, user_dp: UserLevelDP, connected: int) -> tuple[int, float]:
        """Under user-level DP, a round's expected cohort ``m`` (its rate is ``m /
        population``, whoever is connected) and the chance that its Poisson cohort from the
        clients ``connected`` is skipped for falling outside :meth:`_cohort_bounds`
        (:meth:`server.user_dp.UserDPSettings.round_risk`) or for a size SecAgg+ halts
        (:meth:`_halting`)."""
        size = self.num_fit_clients(user_dp.settings.population)[0]
        least, most = self._cohort_bounds()
        risk = user_dp.settings.round_risk(size, connected, least, most, self._halting())
        return size, risk

    def _connected(
        self, client_manager: ClientManager, size_fn: Callable[[int], tuple[int, int]], salt: str
    ) -> tuple[dict[str, ClientProxy], int]:
        """The connected clients and the cohort size wanted from them (0 when fewer than
        ``min-available-clients`` are there)."""
        available = wait_for_clients(
            client_manager, self.min_available_clients, self.availability_timeout
        )
        size, minimum = size_fn(available)
        if available < minimum or size <= 0:
            log(WARNING, "%s: %s clients available, need %s; skipping", salt, available, minimum)
            return {}, 0
        return client_manager.all(), size

    def _sample(
        self,
        client_manager: ClientManager,
        size_fn: Callable[[int], tuple[int, int]],
        salt: str,
    ) -> list[ClientProxy]:
        """A uniform sample of the connected clients, seeded by ``salt`` (str seeds are
        deterministic across processes)."""
        clients, size = self._connected(client_manager, size_fn, salt)
        chosen = random.Random(salt).sample(sorted(clients), min(size, len(clients)))
        return [clients[cid] for cid in chosen]

    def _sample_user_dp(
        self, server_round: int, client_manager: ClientManager, user_dp: UserLevelDP
    ) -> list[ClientProxy]:
        """Under user-level DP: charge the round and draw its Poisson cohort (secret: the
        seed is in the run config, and amplification by sampling assumes nobody outside
        the server can tell who was sampled; a resumed run samples others, each round
        charged once). Empty when the draw is skipped; raises :class:`StopTraining` when the
        budget or the guarantee forbids the round with the clients connected."""
        salt = f"fit-{self.seed}-{server_round}"
        clients, wanted = self._connected(client_manager, self.num_fit_clients, salt)
        if not wanted:
            return []
        # q = m / N, N the population (public): the rate does not depend on who is
        # connected, and fewer connected only means a smaller cohort
        size, risk = self.user_dp_round(user_dp, len(clients))
        self._check_secagg_cohort(size)
        refusal = user_dp.refusal(size, risk)
        if refusal is not None:
            # The server loop plans with the whole population connected and stops before a
            # round past the budget; with fewer connected a round's cohort is skipped more
            # often, a risk this round's guarantee must carry, so the verdict here is the one
            # that holds. Refusing round after round would only report each as aborted, the
            # model unchanged, until the run's rounds were used up: the run ends instead,
            # nothing charged, the last checkpoint kept for a restart.
            raise StopTraining(
                f"round {server_round}: {refusal} ({len(clients)} of the population of "
                f"{user_dp.settings.population} connected); ending the run, its checkpoint "
                "kept: restart it with more clients connected"
            )
        chosen = user_dp.sample_cohort(sorted(clients), size)
        eps = user_dp.charge_round(server_round, size, risk)
        self._denominator[server_round] = size
        log(INFO, "round %s: user-level epsilon %.4g after this round", server_round, eps)
        least, most = self._cohort_bounds()
        halts = len(chosen) in self._halting()
        if least <= len(chosen) and (most is None or len(chosen) <= most) and not halts:
            return [clients[cid] for cid in chosen]
        reason = (
            f"Poisson cohort of {len(chosen)} clients (at least {least}"
            f"{'' if most is None else f', at most {most}'}"
            f"{', a size SecAgg+ halts: too few neighbours for its threshold' if halts else ''}"
            "): round skipped, charged, and its chance counted in the guarantee"
        )
        log(WARNING, "round %s: %s", server_round, reason)
        # recorded here, so the round is reported as skipped rather than as aborted
        self.fit_stats[server_round] = FitRoundStats(
            server_round=server_round,
            sampled=len(chosen),
            secure_aggregation=self.secure_aggregation,
            failures=(reason,),
        )
        return []

    def _check_secagg_cohort(self, cohort: int) -> None:
        """Refuse a SecAgg+ cohort (the expected one under user-level DP) whose sum would
        overflow the modulus."""
        most = self.secagg_max_cohort
        if self.secure_aggregation and most is not None and cohort > most:
            raise ConfigError(
                f"SecAgg+ cohort of {cohort} clients would overflow the modulus "
                f"(max {most}); lower secagg-quantization-range, raise "
                "secagg-modulus-range (<= 2**32) or sample fewer clients"
            )

    def configure_fit(
        self, server_round: int, parameters: Parameters, client_manager: ClientManager
    ) -> list[tuple[ClientProxy, FitIns]]:
        """Sample the cohort (seeded; secret Poisson under user-level DP) and send the
        global model plus round config."""
        self._reference = parameters_to_arrays(parameters)
        if self.user_dp is not None:
            clients = self._sample_user_dp(server_round, client_manager, self.user_dp)
        else:
            clients = self._sample(
                client_manager, self.num_fit_clients, f"fit-{self.seed}-{server_round}"
            )
            self._check_secagg_cohort(len(clients))
        self._sampled[server_round] = len(clients)
        config: dict[str, Scalar] = {
            **self.extra_fit_config,
            CONFIG_SERVER_ROUND: server_round,
            CONFIG_UPDATE_CLIP_NORM: float(self.update_clip_norm),
        }
        if self.user_dp is not None or self.noise_shares > 1:
            # both noise mechanisms bound one client's (or one record's) share of the mean
            # only when every contributor weighs the same
            config[CONFIG_UNIFORM_WEIGHT] = True
        fit_ins = FitIns(parameters, config)
        return [(client, fit_ins) for client in clients]

    def configure_evaluate(
        self, server_round: int, parameters: Parameters, client_manager: ClientManager
    ) -> list[tuple[ClientProxy, EvaluateIns]]:
        """Sample the evaluation cohort (seeded); empty when evaluation is off."""
        if self.eval_size <= 0 and self.fraction_evaluate <= 0:
            return []
        clients = self._sample(
            client_manager, self.num_evaluation_clients, f"eval-{self.seed}-{server_round}"
        )
        self._eval_sampled[server_round] = len(clients)
        config: dict[str, Scalar] = {**self.extra_eval_config, CONFIG_SERVER_ROUND: server_round}
        evaluate_ins = EvaluateIns(parameters, config)
        return [(client, evaluate_ins) for client in clients]

    # ------------------------------------------------------------------ aggregation

    def sampled_in_round(self, server_round: int) -> int:
        """How many clients ``configure_fit`` sampled in ``server_round`` (0 if none)."""
        return self._sampled.get(server_round, 0)

    @property
    def current_parameters(self) -> Arrays:
        """The global model as of the last ``configure_fit`` / ``aggregate_fit``."""
        return [np.array(a, copy=True) for a in self._reference]

    def _noise_only(self, server_round: int) -> tuple[Arrays | None, float]:
        """Under user-level DP, the step of a charged round that was sent to its cohort but
        has no sum to release (every client declined, failed or was rejected; a secure sum
        too short to unmask, or one SecAgg+ could not complete): the mechanism's output for
        an empty sum, the noise alone, over the round's expected cohort. Keeping the model
        exactly unchanged instead would tell apart, with certainty, the dataset in which one
        user's update was the round's only one from the dataset without that user: an
        unbounded privacy loss the accountant never charged. ``(None, 0.0)`` otherwise (no
        user-level DP, or a round skipped before any client was asked)."""
        cohort = self._denominator.get(server_round)
        if self.user_dp is None or cohort is None or self._sampled.get(server_round, 0) <= 0:
            return None, 0.0
        zeros = [np.zeros(np.shape(ref), dtype=np.float64) for ref in self._reference]
        return self._apply(self.user_dp.noisy_mean(zeros, cohort))

    def release_noise_only(self, server_round: int) -> tuple[Arrays | None, float]:
        """:meth:`_noise_only` for a round whose fit never reached :meth:`aggregate_fit` (a
        SecAgg+ round that halted); the global model becomes its result."""
        new, norm = self._noise_only(server_round)
        if new is not None:
            self._reference = new
        return new, norm

    def _apply(
        self, mean_update: Sequence[npt.NDArray[np.floating]]
    ) -> tuple[Arrays | None, float]:
        """The new global model from the round's mean update (through the server optimiser)
        and the L2 norm of the step taken; ``(None, 0.0)``, the optimiser untouched and the
        reason in ``_refused_step``, when the new model would not be finite."""
        saved = self.optimizer.snapshot()
        delta = self.optimizer.step(mean_update)
        wide = [
            ref.astype(np.float64) + d.astype(np.float64)
            for ref, d in zip(self._reference, delta, strict=True)
        ]
        for ref, arr in zip(self._reference, wide, strict=True):
            limit = np.finfo(ref.dtype).max if np.issubdtype(ref.dtype, np.floating) else np.inf
            if not bool(np.all(np.abs(arr) <= limit)):  # NaN fails the comparison too
                # finite updates whose step leaves the model's float range: an inf model
                # would be checkpointed and published, and every later round train from it
                self.optimizer.restore(saved)
                self._refused_step = (
                    "the round's step would make the global model non-finite (beyond the "
                    f"range of {ref.dtype}): the round is refused and the model kept"
                )
                return None, 0.0
        norm = math.sqrt(sum(float(np.sum(np.square(d, dtype=np.float64))) for d in delta))
        return [arr.astype(ref.dtype) for ref, arr in zip(self._reference, wide, strict=True)], norm

    def aggregate_fit(
        self,
        server_round: int,
        results: list[tuple[ClientProxy, FitRes]],
        failures: list[FitFailure],
    ) -> tuple[Parameters | None, dict[str, Scalar]]:
        """Validate, average the accepted updates, and apply them to the global model."""
        failures = _dedupe(failures)
        self._refused_step = None
        if self.secure_aggregation:
            stats, new = self._aggregate_secure(server_round, results, failures)
        else:
            stats, new = self._aggregate_plain(server_round, results, failures)
        if self._refused_step is not None:
            log(WARNING, "round %s: %s", server_round, self._refused_step)
            stats = replace(
                stats,
                ok=0,
                rejected=stats.rejected + stats.ok,
                rejections=(*stats.rejections, self._refused_step),
            )
        if self.user_dp is not None:
            stats = replace(stats, epsilon_user=self.user_dp.epsilon_after(server_round))
        self.fit_stats[server_round] = stats
        log(
            INFO,
            "round %s fit: %s sampled, %s ok, %s declined, %s rejected, %s failed%s",
            server_round,
            stats.sampled,
            stats.ok,
            stats.declined,
            stats.rejected,
            stats.failed,
            "" if stats.updated else " (global model unchanged)",
        )
        if new is None:
            return None, stats.as_metrics()
        self._reference = new
        return ndarrays_to_parameters(new), stats.as_metrics()

    def _weight(self, num_examples: float) -> float:
        """A client's weight in plain mode and in evaluation: its reported count, capped at
        ``max_weight`` as SecAgg+ caps it before masking (the count is the client's claim)."""
        return min(float(num_examples), self.max_weight)

    def _aggregate_plain(
        self,
        server_round: int,
        results: list[tuple[ClientProxy, FitRes]],
        failures: list[FitFailure],
    ) -> tuple[FitRoundStats, Arrays | None]:
        declined = 0
        rejections: list[str] = []
        accepted: list[tuple[int, Arrays, Mapping[str, Scalar]]] = []
        for proxy, res in results:
            if _status_of(res) == FitStatus.DECLINED.value:
                declined += 1
                continue
            try:
                update = parameters_to_arrays(res.parameters)
            except Exception as exc:  # malformed bytes from a client
                rejections.append(f"node {proxy.node_id}: undecodable update ({exc})")
                continue
            problem = find_problem(update, self._reference)
            if problem is None and not _positive_weight(res.num_examples):
                problem = InvalidUpdateError(  # NaN passed `<= 0` and made the model NaN
                    "bad-weight", f"num_examples is {res.num_examples}, expected a number > 0"
                )
            if problem is not None:
                rejections.append(f"node {proxy.node_id}: {problem}")
                continue
            accepted.append((res.num_examples, update, res.metrics))
        accepted, clipped, bound = self._clip(server_round, accepted)

        capped = sum(1 for n, _, _ in accepted if n > self.max_weight)
        if capped and self.user_dp is None:
            log(
                WARNING,
                "round %s: %s client(s) reported more examples than max-weight %s; each "
                "update is weighed %s (secagg-max-weight, 1 where DP clients weigh 1)",
                server_round,
                capped,
                self.max_weight,
                self.max_weight,
            )
        new: Arrays | None = None
        norm = 0.0
        total = sum(n for n, _, _ in accepted)
        sampled = self._sampled.get(server_round, len(results) + len(failures))
        if accepted:
            # the counts brought near 1 by a power of two (exact: the mean is the same, bit
            # for bit): a finite but huge num_examples times an update, or the counts' sum,
            # overflowed float64 and made the round's mean 0 or NaN
            exponent = _unit_scale(self._weight(n) for n, _, _ in accepted)
            weights = [
                1.0 if self.user_dp is not None else math.ldexp(self._weight(n), exponent)
                for n, _, _ in accepted
            ]
            sums = [np.zeros(ref.shape, dtype=np.float64) for ref in self._reference]
            for weight, (_, update, _) in zip(weights, accepted, strict=True):
                for acc, arr in zip(sums, update, strict=True):
                    acc += weight * arr.astype(np.float64)
            if self.user_dp is not None:
                cohort = self._denominator.get(server_round, max(sampled, len(accepted)))
                new, norm = self._apply(self.user_dp.noisy_mean(sums, cohort))
            else:
                weight_total = math.fsum(weights)
                new, norm = self._apply([s / weight_total for s in sums])
        else:
            new, norm = self._noise_only(server_round)
        failed, reasons = _failure_summary(sampled, len(results), failures)
        stats = FitRoundStats(
            server_round=server_round,
            sampled=sampled,
            ok=len(accepted),
            declined=declined,
            rejected=len(rejections),
            failed=failed,
            num_examples=total,
            secure_aggregation=False,
            updated=new is not None,
            rejections=tuple(rejections[:MAX_REASONS]),
            failures=reasons,
            client_metrics=_weighted_means(
                [(self._weight(n), _public_metrics(m)) for n, _, m in accepted]
            ),
            update_norm=norm,
            clipped=clipped,
            clip_bound=bound,
        )
        return stats, new

    def _clip(
        self, server_round: int, accepted: list[tuple[int, Arrays, Mapping[str, Scalar]]]
    ) -> tuple[list[tuple[int, Arrays, Mapping[str, Scalar]]], int, float]:
        """The accepted updates clipped to the round's L2 bound, how many of them were, and
        the bound (0 when none applies): ``update_clip_norm`` when set, else (see
        :meth:`_median_clipping`) ``update_clip_median_multiple`` times their median norm.
        An update within the bound is kept as it is; of a median norm of 0 (most updates
        exactly zero) every update that is not becomes zero."""
        if not accepted or not (self.update_clip_norm > 0 or self._median_clipping()):
            return accepted, 0, 0.0
        norms = [l2_norm(update) for _, update, _ in accepted]
        bound = (
            self.update_clip_norm
            if self.update_clip_norm > 0
            else median_clip_bound(norms, self.update_clip_median_multiple)
        )
        kept: list[tuple[int, Arrays, Mapping[str, Scalar]]] = []
        for (n, update, metrics), norm in zip(accepted, norms, strict=True):
            if norm > bound:
                update = (
                    clip_update_l2(update, bound)[0]
                    if bound > 0
                    else [np.zeros_like(a) for a in update]
                )
            kept.append((n, update, metrics))
        clipped = sum(1 for norm in norms if norm > bound)
        if clipped:
            log(
                INFO,
                "round %s: %s of %s update(s) clipped to L2 norm %.6g (%s)",
                server_round,
                clipped,
                len(accepted),
                bound,
                "update-clip-norm"
                if self.update_clip_norm > 0
                else f"{self.update_clip_median_multiple:g} x their median norm, "
                "update-clip-median-multiple",
            )
        return kept, clipped, bound

    def short_secure_aggregate(self, results: Sequence[tuple[ClientProxy, FitRes]]) -> str | None:
        """Why the secure sum of ``results`` must never be unmasked, or ``None`` if it may be:
        counting the updates sent (the declines are in the clear), a sum of so few shows the
        server what they sent (fewer than ``max(2, min-cohort)``), or carries less DP noise
        than their ledgers were charged for (fewer than ``noise-shares``, each adding 1/m of
        it). A round everyone declined sums nothing and may be."""
        contributors = len(_contributors(results))
        if not contributors:
            return None
        least = max(2, self.min_fit_clients)
        if contributors < least:
            return (
                f"secure aggregate of {contributors} contribution(s), fewer than {least} "
                "(min-cohort): it would show the server what so few clients sent, so it is "
                "not unmasked"
            )
        if contributors < self.noise_shares:
            return (
                f"secure aggregate of {contributors} contributions, fewer than "
                f"noise-shares={self.noise_shares}: it would carry less DP noise than the "
                "clients were charged for, so it is not unmasked"
            )
        return None

    def _aggregate_secure(
        self,
        server_round: int,
        results: list[tuple[ClientProxy, FitRes]],
        failures: list[FitFailure],
    ) -> tuple[FitRoundStats, Arrays | None]:
        contributors = _contributors(results)
        unmasked_weight, self.unmasked_weight = self.unmasked_weight, None  # this sum's only
        declined = len(results) - len(contributors)
        rejections: list[str] = []
        new: Arrays | None = None
        norm = 0.0
        sampled = self._sampled.get(server_round, len(results) + len(failures))
        short = self.short_secure_aggregate(results)
        if short is not None:
            rejections.append(short)  # never unmasked (the SecAgg+ workflow asks first)
            new, norm = self._noise_only(server_round)
        elif contributors:
            # SecAggPlusWorkflow already divided the masked sum by the summed weights and
            # put that same average into every FitRes; one copy is enough.
            aggregate = parameters_to_arrays(contributors[0][1].parameters)
            problem = find_problem(aggregate, self._reference, what="aggregate", check_dtype=False)
            if problem is not None:
                rejections.append(f"secure aggregate: {problem}")
                new, norm = self._noise_only(server_round)
            elif self.user_dp is not None:
                # Clients reported weight 1 (CONFIG_UNIFORM_WEIGHT), so the aggregate is
                # the plain mean over the weights in the sum: times their number = the sum.
                k = _unit_weights(len(contributors), unmasked_weight, server_round)
                sums = [a.astype(np.float64) * k for a in aggregate]
                cohort = self._denominator.get(server_round, max(sampled, len(contributors)))
                new, norm = self._apply(self.user_dp.noisy_mean(sums, cohort))
            else:
                new, norm = self._apply(aggregate)
        else:
            new, norm = self._noise_only(server_round)
        # every client's SecAgg+ mod withholds its count and metrics here (0, only the status,
        # server.secagg._scrub_fit_reply): what a reply still carries is from a client without
        # it, and made up the round's client metrics (the operator's "mean device epsilon")
        failed, reasons = _failure_summary(sampled, len(results), failures)
        stats = FitRoundStats(
            server_round=server_round,
            sampled=sampled,
            ok=len(contributors) if not rejections else 0,
            declined=declined,
            rejected=len(contributors) if rejections and contributors else 0,
            failed=failed,
            num_examples=0,
            secure_aggregation=True,
            updated=new is not None,
            rejections=tuple(rejections),
            failures=reasons,
            update_norm=norm,
        )
        return stats, new

    def aggregate_evaluate(
        self,
        server_round: int,
        results: list[tuple[ClientProxy, EvaluateRes]],
        failures: list[EvalFailure],
    ) -> tuple[float | None, dict[str, Scalar]]:
        """Weighted loss/metric means over clients that returned a finite loss."""
        answered = [(p, r) for p, r in results if _status_of(r) != FitStatus.DECLINED.value]
        declined = len(results) - len(answered)
        good = [
            (p, r)
            for p, r in answered
            if _positive_weight(r.num_examples) and _finite_number(r.loss)
        ]
        bad = len(answered) - len(good)
        total = sum(r.num_examples for _, r in good)
        # weights capped as in fit: a count of 10**12 made one device's loss and HR the round's
        loss = _weighted_mean([(self._weight(r.num_examples), float(r.loss)) for _, r in good])
        sampled = self._eval_sampled.get(server_round, len(results) + len(failures))
        failed, reasons = _failure_summary(sampled, len(results), failures)
        # the replies counted failed for what they hold: said why, as the other failures
        usable = {id(r) for _, r in good}
        unusable = [
            bounded_reason(
                f"node {p.node_id}: loss {r.loss!r} with {r.num_examples!r} example(s), "
                "expected a finite loss over more than 0 examples"
            )
            for p, r in answered
            if id(r) not in usable
        ]
        reasons = (*reasons, *unusable[: max(0, MAX_REASONS - len(reasons))])
        stats = EvalRoundStats(
            server_round=server_round,
            sampled=sampled,
            ok=len(good),
            declined=declined,
            failed=failed + bad,
            loss=loss,
            num_examples=total,
            metrics=_weighted_means(
                [(self._weight(r.num_examples), _public_metrics(r.metrics)) for _, r in good]
            ),
            failures=reasons,
        )
        self.eval_stats[server_round] = stats
        metrics: dict[str, Scalar] = {
            **stats.metrics,  # first: a client's metric named like a count does not replace it
            "clients-sampled": stats.sampled,
            "clients-ok": stats.ok,
            "clients-declined": stats.declined,
            "clients-failed": stats.failed,
        }
        return loss, metrics
