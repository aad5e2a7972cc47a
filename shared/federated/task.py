"""The pluggable task interface of the federation layer, plus a tiny toy task.

The federation layer (``server/``, ``client/``) is model-agnostic: it only moves
lists of float NumPy arrays around. Everything model- or data-specific sits behind
:class:`FederatedTask`, which the recommender's student model will implement later.
``get_task(name, run_config)`` picks the implementation by name so that the Flower
apps stay thin glue (unpack -> call task -> pack).

This module deliberately imports neither Flower nor torch: it is imported inside every
simulated client (Ray actor) and must stay cheap.
"""

from __future__ import annotations

import enum
import importlib
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol, TypeAlias, runtime_checkable

import numpy as np
import numpy.typing as npt

from shared.config import coerce
from shared.errors import ConfigError, DataError
from shared.federated.round_caps import ROUND_EPSILON_KEY, ROUND_STEPS_KEY

#: A value a task may put into its metrics (what Flower's ConfigRecord can carry).
MetricValue: TypeAlias = bool | int | float | str
#: A per-round instruction value the server sends to clients (Flower ``Scalar``).
ConfigValue: TypeAlias = bool | bytes | int | float | str
#: A ``context.run_config`` value (Flower ``UserConfigValue``).
RunConfigValue: TypeAlias = bool | int | float | str
RunConfig: TypeAlias = Mapping[str, RunConfigValue]
Arrays: TypeAlias = list[npt.NDArray[np.floating]]

# Keys of the per-round config the server sends with every fit/evaluate instruction.
STUDENT_TASK = "shared.federated.student_task:make_task"
"""The distilled student's task (``task`` in a run config): what the simulation always runs and
a deployment runs by default."""

CONFIG_SERVER_ROUND = "server-round"
CONFIG_UPDATE_CLIP_NORM = "update-clip-norm"
CONFIG_RUN_ID = "fedrec-run-id"
"""Added by the client glue (not sent by the server): the Flower run the message is from."""
CONFIG_UNDER_SECAGG = "fedrec-under-secagg"
"""Set by the client glue over whatever the server sent: whether this update will only be
seen inside the SecAgg+ sum (a task that splits its noise over that sum needs it)."""
# Keys the client glue adds to a fit reply's metrics (the wire protocol of a status).
METRIC_STATUS = "fedrec-status"
#: A decline's reason on the wire: its :data:`DECLINE_KINDS` kind, never the task's text.
METRIC_REASON = "fedrec-reason"

# Why a client declines, as its reply tells the server (:data:`METRIC_REASON`), in the clear
# (also for evaluation under SecAgg+). The task's own reason says more, e.g. a device's
# event count or the epsilon its ledger has spent, which are facts about its user: it stays
# in the client's log, for the owner; the server only counts declines.
#: Training would spend more privacy than the client's budget allows.
DECLINE_PRIVACY_BUDGET = "privacy-budget"
#: The client has too little local data to take part (e.g. a young device).
DECLINE_NO_LOCAL_DATA = "no-local-data"
#: The client (its owner) chose not to take part, e.g. keeps its evaluation metrics private.
DECLINE_OPTED_OUT = "opted-out"
#: Any other reason (a task that names none).
DECLINE_OTHER = "other"
#: The round would take more DP-SGD steps than the client's owner allows a round.
DECLINE_ROUND_STEPS = ROUND_STEPS_KEY
#: The round would spend more epsilon than the client's owner allows a round.
DECLINE_ROUND_EPSILON = ROUND_EPSILON_KEY
#: Every decline kind.
DECLINE_KINDS = frozenset(
    {
        DECLINE_PRIVACY_BUDGET,
        DECLINE_NO_LOCAL_DATA,
        DECLINE_OPTED_OUT,
        DECLINE_OTHER,
        DECLINE_ROUND_STEPS,
        DECLINE_ROUND_EPSILON,
    }
)


def server_round(config: Mapping[str, ConfigValue]) -> int:
    """The round a fit or evaluate instruction names (:data:`CONFIG_SERVER_ROUND`; 0 when it
    names none), read by the rule every setting is read by (:func:`shared.config.coerce`).
    Anything that is no round (text, a fraction, NaN, inf, a negative number) is a
    :class:`ConfigError`: ``int()`` of it raised a bare ``ValueError`` or ``OverflowError``,
    which the client's reply called an internal failure, or rounded 1.5 down."""
    value: int = coerce(config.get(CONFIG_SERVER_ROUND, 0), int, CONFIG_SERVER_ROUND)
    if value < 0:
        raise ConfigError(f"'{CONFIG_SERVER_ROUND}' must be >= 0, got {value}")
    return value


def _check_decline_kind(kind: str) -> None:
    if kind not in DECLINE_KINDS:
        raise ValueError(f"unknown decline kind {kind!r}; one of {sorted(DECLINE_KINDS)}")


class FitStatus(enum.StrEnum):
    """What a client did with a fit instruction."""

    OK = "ok"
    #: The client chose not to train this round (e.g. opted out, too little new data).
    #: It is not an error: it contributes zero weight and the round goes on.
    DECLINED = "declined"
    #: The task failed (e.g. empty or malformed local data); the client replies with
    #: a Flower error message instead of a result.
    ERROR = "error"


class ArraysKind(enum.StrEnum):
    """Whether :attr:`FitOutcome.arrays` holds new parameters or an update (delta)."""

    PARAMETERS = "parameters"
    UPDATE = "update"


@dataclass(frozen=True)
class FitOutcome:
    """Result of one local training run on one client.

    Build it with the class methods rather than the constructor:
    :meth:`with_parameters`, :meth:`with_update`, :meth:`declined`, :meth:`failed`.
    The client glue turns ``arrays`` into an update (new - old) if needed, validates
    and optionally clips it, so tasks never deal with the wire format.
    """

    status: FitStatus
    arrays: Arrays = field(default_factory=list)
    num_examples: int = 0
    metrics: Mapping[str, MetricValue] = field(default_factory=dict)
    kind: ArraysKind = ArraysKind.PARAMETERS
    reason: str = ""
    #: What the server is told of a decline (:data:`DECLINE_KINDS`); ``reason`` stays local.
    decline_kind: str = DECLINE_OTHER

    def __post_init__(self) -> None:
        _check_decline_kind(self.decline_kind)
        if self.status is FitStatus.OK:
            if not self.arrays:
                raise ValueError("FitOutcome(status=ok) needs at least one array")
            if self.num_examples <= 0:
                raise ValueError(
                    f"FitOutcome(status=ok) needs num_examples > 0, got {self.num_examples}"
                )
        elif not self.reason:
            raise ValueError(f"FitOutcome(status={self.status.value}) needs a reason")

    @classmethod
    def with_parameters(
        cls,
        parameters: Sequence[npt.NDArray[np.floating]],
        num_examples: int,
        metrics: Mapping[str, MetricValue] | None = None,
    ) -> FitOutcome:
        """Successful fit that returns the locally updated model parameters."""
        return cls(FitStatus.OK, list(parameters), num_examples, dict(metrics or {}))

    @classmethod
    def with_update(
        cls,
        update: Sequence[npt.NDArray[np.floating]],
        num_examples: int,
        metrics: Mapping[str, MetricValue] | None = None,
    ) -> FitOutcome:
        """Successful fit that returns the update (new minus received parameters)."""
        return cls(FitStatus.OK, list(update), num_examples, dict(metrics or {}), ArraysKind.UPDATE)

    @classmethod
    def declined(cls, reason: str, kind: str = DECLINE_OTHER) -> FitOutcome:
        """The client does not take part this round (not an error). The server is told
        ``kind`` (:data:`DECLINE_KINDS`); ``reason``, which may state facts about the
        device, goes to the client's log only."""
        return cls(FitStatus.DECLINED, reason=reason, decline_kind=kind)

    @classmethod
    def failed(cls, reason: str) -> FitOutcome:
        """The task failed; equivalent to raising, but without a traceback."""
        return cls(FitStatus.ERROR, reason=reason)


@dataclass(frozen=True)
class EvalOutcome:
    """Result of evaluating the global model on one client's local data.

    A client that does not evaluate by choice or for want of data (its owner keeps
    metrics private, too few events for a held-out one) returns :meth:`declined`: the
    server counts it apart from failures, which are reserved for something broken.
    """

    loss: float
    num_examples: int
    metrics: Mapping[str, MetricValue] = field(default_factory=dict)
    status: FitStatus = FitStatus.OK
    reason: str = ""
    #: What the server is told of a decline (:data:`DECLINE_KINDS`); ``reason`` stays local.
    decline_kind: str = DECLINE_OTHER

    def __post_init__(self) -> None:
        _check_decline_kind(self.decline_kind)
        if self.status is FitStatus.ERROR:
            raise ValueError("EvalOutcome has no error status: raise instead")
        if self.status is FitStatus.DECLINED and not self.reason:
            raise ValueError("EvalOutcome.declined needs a reason")

    @classmethod
    def declined(cls, reason: str, kind: str = DECLINE_OTHER) -> EvalOutcome:
        """The client does not evaluate this round (not an error); as
        :meth:`FitOutcome.declined`, the server is told ``kind`` only."""
        return cls(0.0, 0, status=FitStatus.DECLINED, reason=reason, decline_kind=kind)


@runtime_checkable
class FederatedTask(Protocol):
    """What the federation layer needs from a model + local data.

    One instance lives per process (server, or each simulated client / Ray actor) and
    serves many clients, so per-client state must be keyed by ``client_id``.
    Parameters are lists of float NumPy arrays in a fixed order with fixed shapes and
    dtypes (the ones :meth:`initial_parameters` returns); anything else is rejected.
    """

    def initial_parameters(self) -> Arrays:
        """Initial global model; called once on the server."""
        ...

    def fit(
        self, client_id: int, parameters: Arrays, config: Mapping[str, ConfigValue]
    ) -> FitOutcome:
        """Train locally from ``parameters`` on the data of ``client_id``.

        May raise (e.g. :class:`shared.errors.DataError` for empty/malformed local
        data); the client glue turns that into a Flower error reply.
        """
        ...

    def evaluate(
        self, client_id: int, parameters: Arrays, config: Mapping[str, ConfigValue]
    ) -> EvalOutcome:
        """Evaluate ``parameters`` on the local held-out data of ``client_id``."""
        ...


@runtime_checkable
class ClientStateful(Protocol):
    """Optional extension: per-client state that must survive between rounds.

    A task instance is shared by many clients, and in a Ray simulation each round may
    serve a client from a different actor process, so state kept in the task object
    is lost. Tasks that need it (a personal adapter that never leaves the device, a
    privacy ledger) implement these two methods; the client glue stores the arrays in
    the node's Flower ``Context.state`` (which Flower persists per node) and hands
    them back before the next ``fit``/``evaluate`` of that client.
    """

    def import_client_state(
        self, client_id: int, state: Mapping[str, npt.NDArray[np.generic]]
    ) -> None:
        """Restore the state of ``client_id`` (empty mapping on first contact)."""
        ...

    def export_client_state(self, client_id: int) -> dict[str, npt.NDArray[np.generic]]:
        """The state of ``client_id`` to persist after ``fit``/``evaluate``."""
        ...


# --------------------------------------------------------------------------- toy task


def _client_set(run_config: RunConfig, key: str) -> frozenset[int]:
    """``key`` as a set of client ids: ``"1,3"``, ``"[1, 3]"`` or one id, by the rule every
    setting is read by (:func:`shared.config.coerce`, as a ``tuple[int, ...]``)."""
    ids: tuple[int, ...] = coerce(run_config.get(key, ""), tuple[int, ...], key)
    return frozenset(ids)


def _number(run_config: RunConfig, key: str, default: float) -> float:
    """``key`` as a float, by the rule every setting is read by (:func:`shared.config.coerce`)."""
    value: float = coerce(run_config.get(key, default), float, key)
    return value


def _integer(run_config: RunConfig, key: str, default: int, minimum: int = 0) -> int:
    """``key`` as an int (:func:`shared.config.coerce`: ``4.0`` is 4, ``4.5`` is refused),
    at least ``minimum``."""
    value: int = coerce(run_config.get(key, default), int, key)
    if value < minimum:
        raise ConfigError(f"'{key}' must be >= {minimum}, got {value}")
    return value


@dataclass(frozen=True)
class ToyLinearConfig:
    """Settings of :class:`ToyLinearTask`; run-config keys are ``toy-<field>``.

    The ``*_clients`` sets inject faults for tests and benchmarks; they are empty by
    default and never used by the real recommender.
    """

    dim: int = 8
    examples: int = 32
    examples_spread: int = 16
    eval_examples: int = 16
    noise: float = 0.1
    lr: float = 0.1
    local_steps: int = 5
    seed: int = 0
    heterogeneity: float = 0.0
    empty_clients: frozenset[int] = frozenset()
    decline_clients: frozenset[int] = frozenset()
    nan_clients: frozenset[int] = frozenset()
    malicious_clients: frozenset[int] = frozenset()
    malicious_value: float = 1e6
    sleep_clients: frozenset[int] = frozenset()
    sleep_s: float = 0.0

    @classmethod
    def from_run_config(cls, run_config: RunConfig) -> ToyLinearConfig:
        """Read ``toy-*`` keys (kebab-case) from a Flower run config."""
        d = cls()
        return cls(
            dim=_integer(run_config, "toy-dim", d.dim, minimum=1),
            examples=_integer(run_config, "toy-examples", d.examples),
            examples_spread=_integer(run_config, "toy-examples-spread", d.examples_spread),
            eval_examples=_integer(run_config, "toy-eval-examples", d.eval_examples),
            noise=_number(run_config, "toy-noise", d.noise),
            lr=_number(run_config, "toy-lr", d.lr),
            local_steps=_integer(run_config, "toy-local-steps", d.local_steps, minimum=1),
            seed=_integer(run_config, "toy-seed", d.seed),
            heterogeneity=_number(run_config, "toy-heterogeneity", d.heterogeneity),
            empty_clients=_client_set(run_config, "toy-empty-clients"),
            decline_clients=_client_set(run_config, "toy-decline-clients"),
            nan_clients=_client_set(run_config, "toy-nan-clients"),
            malicious_clients=_client_set(run_config, "toy-malicious-clients"),
            malicious_value=_number(run_config, "toy-malicious-value", d.malicious_value),
            sleep_clients=_client_set(run_config, "toy-sleep-clients"),
            sleep_s=_number(run_config, "toy-sleep-s", d.sleep_s),
        )


@dataclass(frozen=True)
class _ClientData:
    x: npt.NDArray[np.float64]
    y: npt.NDArray[np.float64]
    x_eval: npt.NDArray[np.float64]
    y_eval: npt.NDArray[np.float64]


class ToyLinearTask:
    """Linear regression ``y = X w + b + noise`` with per-client synthetic data.

    Parameters are ``[w (dim,), b (1,)]`` as float32. Each client's data is drawn from
    ``(seed, client_id)``, so any process regenerates the same data for a client.
    Client ``c`` has ``examples + (7919 c mod (examples_spread + 1))`` training
    examples, so FedAvg weights differ between clients. Local training is
    ``local_steps`` full-batch gradient-descent steps on the mean squared error.
    """

    def __init__(self, config: ToyLinearConfig | None = None) -> None:
        self.config = config or ToyLinearConfig()
        rng = np.random.default_rng([self.config.seed, 0xC0FFEE])
        self._w_true = rng.normal(size=self.config.dim)
        self._b_true = float(rng.normal())
        self._cache: dict[int, _ClientData] = {}
        self._lock = threading.Lock()

    @classmethod
    def from_run_config(cls, run_config: RunConfig) -> ToyLinearTask:
        """Registry factory: build from ``toy-*`` run-config keys."""
        return cls(ToyLinearConfig.from_run_config(run_config))

    def num_examples(self, client_id: int) -> int:
        """Number of local training examples of ``client_id``."""
        if client_id in self.config.empty_clients:
            return 0
        spread = self.config.examples_spread + 1
        return self.config.examples + (7919 * client_id) % spread

    def client_data(self, client_id: int) -> _ClientData:
        """Deterministic synthetic data of one client (cached)."""
        with self._lock:
            cached = self._cache.get(client_id)
        if cached is not None:
            return cached
        cfg = self.config
        rng = np.random.default_rng([cfg.seed, abs(client_id), 1 if client_id < 0 else 0])
        w = self._w_true + cfg.heterogeneity * rng.normal(size=cfg.dim)
        n = self.num_examples(client_id)
        n_eval = 0 if client_id in cfg.empty_clients else cfg.eval_examples
        x = rng.normal(size=(n, cfg.dim))
        x_eval = rng.normal(size=(n_eval, cfg.dim))
        y = x @ w + self._b_true + cfg.noise * rng.normal(size=n)
        y_eval = x_eval @ w + self._b_true + cfg.noise * rng.normal(size=n_eval)
        data = _ClientData(x, y, x_eval, y_eval)
        with self._lock:
            self._cache[client_id] = data
        return data

    def initial_parameters(self) -> Arrays:
        """Zero weights and bias."""
        return [np.zeros(self.config.dim, dtype=np.float32), np.zeros(1, dtype=np.float32)]

    @staticmethod
    def _mse(
        w: npt.NDArray[np.float64],
        b: float,
        x: npt.NDArray[np.float64],
        y: npt.NDArray[np.float64],
    ) -> float:
        return float(np.mean((x @ w + b - y) ** 2))

    def _unpack(self, parameters: Arrays) -> tuple[npt.NDArray[np.float64], float]:
        if len(parameters) != 2 or parameters[0].shape != (self.config.dim,):
            raise DataError(
                f"toy-linear expects parameters [w ({self.config.dim},), b (1,)], "
                f"got shapes {[p.shape for p in parameters]}"
            )
        return parameters[0].astype(np.float64), float(parameters[1].reshape(-1)[0])

    def fit(
        self, client_id: int, parameters: Arrays, config: Mapping[str, ConfigValue]
    ) -> FitOutcome:
        """Run ``local_steps`` gradient steps; fault injection per the config sets."""
        cfg = self.config
        if client_id in cfg.decline_clients:
            return FitOutcome.declined(
                f"client {client_id} opted out of training", DECLINE_OPTED_OUT
            )
        if client_id in cfg.sleep_clients and cfg.sleep_s > 0:
            time.sleep(cfg.sleep_s)
        data = self.client_data(client_id)
        if len(data.y) == 0:
            raise DataError(f"client {client_id} has no local training examples")
        started = time.perf_counter()
        w, b = self._unpack(parameters)
        loss_before = self._mse(w, b, data.x, data.y)
        n = len(data.y)
        for _ in range(cfg.local_steps):
            err = data.x @ w + b - data.y
            w = w - cfg.lr * (2.0 / n) * (data.x.T @ err)
            b = b - cfg.lr * 2.0 * float(np.mean(err))
        loss_after = self._mse(w, b, data.x, data.y)
        new_w = w.astype(np.float32)
        new_b = np.array([b], dtype=np.float32)
        if client_id in cfg.nan_clients:
            new_w[0] = np.nan
        if client_id in cfg.malicious_clients:
            new_w = new_w + np.float32(cfg.malicious_value)
            new_b = new_b + np.float32(cfg.malicious_value)
        return FitOutcome.with_parameters(
            [new_w, new_b],
            num_examples=n,
            metrics={
                "train-loss": loss_after,
                "train-loss-before": loss_before,
                "train-seconds": time.perf_counter() - started,
            },
        )

    def evaluate(
        self, client_id: int, parameters: Arrays, config: Mapping[str, ConfigValue]
    ) -> EvalOutcome:
        """Mean squared error on the client's held-out examples (an opted-out client,
        ``decline_clients``, declines evaluation too)."""
        if client_id in self.config.decline_clients:
            return EvalOutcome.declined(
                f"client {client_id} opted out of evaluation", DECLINE_OPTED_OUT
            )
        data = self.client_data(client_id)
        if len(data.y_eval) == 0:
            raise DataError(f"client {client_id} has no local evaluation examples")
        w, b = self._unpack(parameters)
        loss = self._mse(w, b, data.x_eval, data.y_eval)
        return EvalOutcome(loss=loss, num_examples=len(data.y_eval), metrics={"mse": loss})


# --------------------------------------------------------------------------- registry

TaskFactory: TypeAlias = Callable[[RunConfig], FederatedTask]

# Name -> factory, or "package.module:attr[.attr]" resolved lazily on first use so that
# heavy tasks (torch models) are imported only in processes that use them. Built-ins are
# listed here rather than registered at runtime because simulated clients run in other
# processes (Ray actors) that never see runtime registrations made in the driver.
_REGISTRY: dict[str, TaskFactory | str] = {
    "toy-linear": ToyLinearTask.from_run_config,
}
_REGISTRY_LOCK = threading.Lock()


def register_task(name: str, factory: TaskFactory | str, *, replace: bool = False) -> None:
    """Register a task factory under ``name`` (in this process only).

    ``factory`` is a callable ``run_config -> FederatedTask`` or a lazy reference
    ``"package.module:attr"``. Prefer adding built-in tasks to ``_REGISTRY`` or using a
    ``"module:attr"`` task name directly, since registrations do not reach other
    processes (Ray actors).
    """
    with _REGISTRY_LOCK:
        if name in _REGISTRY and not replace:
            raise ConfigError(f"a federated task named '{name}' is already registered")
        _REGISTRY[name] = factory


def available_tasks() -> list[str]:
    """Names of the registered tasks."""
    with _REGISTRY_LOCK:
        return sorted(_REGISTRY)


def _resolve(reference: str) -> TaskFactory:
    module_name, _, attr_path = reference.partition(":")
    if not module_name or not attr_path:
        raise ConfigError(f"task reference '{reference}' must look like 'package.module:factory'")
    try:
        obj: object = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(f"cannot import task module '{module_name}': {exc}") from exc
    for part in attr_path.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise ConfigError(f"task reference '{reference}': no attribute '{part}'") from None
    if not callable(obj):
        raise ConfigError(f"task reference '{reference}' is not callable")
    return obj


def get_task(name: str, run_config: RunConfig | None = None) -> FederatedTask:
    """Build the task called ``name`` from ``run_config``.

    ``name`` is a registered name (see :func:`available_tasks`) or a lazy reference
    ``"package.module:factory"`` to a callable taking the run config.
    """
    with _REGISTRY_LOCK:
        entry = _REGISTRY.get(name)
    if entry is None:
        if ":" not in name:
            raise ConfigError(
                f"unknown federated task '{name}'; known tasks: {', '.join(available_tasks())}"
                " (or give 'package.module:factory')"
            )
        entry = name
    factory = _resolve(entry) if isinstance(entry, str) else entry
    task = factory(dict(run_config or {}))
    if not isinstance(task, FederatedTask):
        raise ConfigError(
            f"task '{name}' built a {type(task).__name__}, which lacks "
            "initial_parameters/fit/evaluate"
        )
    return task
