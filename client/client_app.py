"""The Flower ``ClientApp``: unpack the instruction, call the task, pack the reply.

One ``ClientApp`` serves plain FedAvg and SecAgg+ runs: its app-level mod
(:func:`server.secagg.secaggplus_when_requested_mod`) engages Flower's
``secaggplus_mod`` only for train messages carrying the SecAgg+ config record (mods
are fixed when a ``ClientApp`` is built, and the bare ``secaggplus_mod`` raises on
plain train messages).

Wire format: Flower's legacy ``FitIns``/``FitRes``/``EvaluateIns``/``EvaluateRes``
record layout (``fitins.parameters``, ``fitres.metrics``, ...), because both
``DefaultWorkflow`` and ``SecAggPlusWorkflow`` speak it. A fit reply carries the
*update* (new - received parameters), validated and optionally L2-clipped; a declined
client sends a zero update with zero weight (neutral under FedAvg and SecAgg+) and the
kind of its decline only (the task's reason is logged here); a task
failure becomes a Flower error reply, so the server counts the client as failed and
the round goes on. The reply names only the kind of failure (:data:`ERROR_KINDS`): the
exception's text, which can hold local paths and device details, is logged here.
"""

from __future__ import annotations

import math
import sys
import threading
from collections.abc import Mapping, Sequence
from logging import INFO, WARNING
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.clientapp.typing import Mod
from flwr.common import (
    Code,
    EvaluateRes,
    FitRes,
    Scalar,
    Status,
    ndarrays_to_parameters,
)
from flwr.common.constant import ErrorCode
from flwr.common.logger import FLOWER_LOGGER, log
from flwr.compat.common.recorddict_compat import (
    evaluateres_to_recorddict,
    fitres_to_recorddict,
    recorddict_to_evaluateins,
    recorddict_to_fitins,
)

from server.npy import load_npy
from server.secagg import secaggplus_when_requested_mod, under_secagg
from shared.config import coerce, is_int
from shared.errors import ConfigError, DataError, ModelFileError, PrivacyBudgetExceededError
from shared.federated.local_config import noise_shares_clip_problem
from shared.federated.round_caps import (
    MAX_ROUND_EPSILON,
    MAX_ROUND_STEPS,
    ROUND_EPSILON_KEY,
    ROUND_STEPS_KEY,
    check_round_caps,
)
from shared.federated.task import (
    CONFIG_RUN_ID,
    CONFIG_UNDER_SECAGG,
    CONFIG_UPDATE_CLIP_NORM,
    METRIC_REASON,
    METRIC_STATUS,
    Arrays,
    ArraysKind,
    ClientStateful,
    EvalOutcome,
    FederatedTask,
    FitOutcome,
    FitStatus,
    MetricValue,
    RunConfigValue,
    get_task,
)
from shared.federated.validation import (
    NOT_AN_ARRAY,
    InvalidUpdateError,
    clip_update_l2,
    l2_norm,
    validate_update,
)
from shared.privacy.budget import PrivacyBudget, check_budget

DEFAULT_TASK = "toy-linear"

# Importing Opacus calls ``logging.basicConfig``, which gives the root logger a handler in
# every process that trains (Ray workers too). Flower's logger has its own handler at
# INFO and passes every record on to the root's, so each DEBUG line of the SecAgg+ mod
# (eight per client and round) was formatted and printed, and each INFO line twice.
FLOWER_LOGGER.propagate = False

# One task instance per (task name, run config) per process: a Ray actor serves many
# virtual clients and the ClientApp object is re-sent with every message, so the
# cache lives at module level.
_TASKS: dict[tuple[str, tuple[tuple[str, RunConfigValue], ...]], FederatedTask] = {}
_TASKS_LOCK = threading.Lock()


#: Name of the ``Context.state`` array record holding a ClientStateful task's state.
CLIENT_STATE_RECORD = "fedrec.client-state"


def _restore_state(task: FederatedTask, client_id: int, context: Context) -> None:
    if isinstance(task, ClientStateful):
        record = context.state.array_records.get(CLIENT_STATE_RECORD)
        arrays = {k: load_npy(v.data) for k, v in record.items()} if record is not None else {}
        task.import_client_state(client_id, arrays)


def _save_state(task: FederatedTask, client_id: int, context: Context) -> None:
    if isinstance(task, ClientStateful):
        state = task.export_client_state(client_id)
        context.state.array_records[CLIENT_STATE_RECORD] = ArrayRecord(
            {k: Array(np.asarray(v)) for k, v in state.items()}
        )


class TaskFailedError(RuntimeError):
    """The task reported ``FitStatus.ERROR`` instead of raising."""


def _task_for(run_config: Mapping[str, RunConfigValue]) -> FederatedTask:
    name = str(run_config.get("task", DEFAULT_TASK))
    key = (name, tuple(sorted(run_config.items())))
    with _TASKS_LOCK:
        task = _TASKS.get(key)
        if task is None:
            task = get_task(name, run_config)
            _TASKS[key] = task
    return task


#: ``--node-config`` key set by ``fedrec client start``: this node is a real device whose
#: state directory (encrypted event store, ledger) the ClientApp trains on.
NODE_DEVICE_DIR = "fedrec-device-dir"
#: ``--node-config`` key: the device's copy of the pretrained bundle.
NODE_BUNDLE = "fedrec-bundle"
#: ``--node-config`` key: the device owner lets federated evaluation see this device's
#: metrics (``fedrec client start --share-evaluation``); a device's own setting, never the
#: server's.
NODE_SHARE_EVALUATION = "fedrec-share-evaluation"
#: ``--node-config`` key: the most record-level epsilon this device spends, whatever the
#: server's ``epsilon-budget`` (``fedrec client start --max-epsilon``).
NODE_MAX_EPSILON = "fedrec-max-epsilon"
#: ``--node-config`` key: the largest record-level delta this device accepts (its
#: ``privacy-delta``), whatever the server's ``delta``.
NODE_MAX_DELTA = "fedrec-max-delta"
#: ``--node-config`` key: this device trains with DP-SGD only (``--allow-no-dp`` clears it).
NODE_REQUIRE_DP = "fedrec-require-dp"
#: ``--node-config`` key: the largest ``noise-shares`` this device adds its noise for
#: (``fedrec client start --max-noise-shares``, default 1: all of it, trusting no aggregation).
NODE_MAX_NOISE_SHARES = "fedrec-max-noise-shares"
#: ``--node-config`` key: the most DP-SGD steps this device takes in a round, whatever the
#: server's ``max-round-steps`` (``fedrec client start --max-round-steps``).
NODE_MAX_ROUND_STEPS = "fedrec-max-round-steps"
#: ``--node-config`` key: the most epsilon this device spends in a round, whatever the
#: server's ``max-round-epsilon`` (``fedrec client start --max-round-epsilon``).
NODE_MAX_ROUND_EPSILON = "fedrec-max-round-epsilon"
#: ``--node-config`` key: the environment variable holding this device's passphrase (the one
#: ``fedrec client start`` read, ``--passphrase-env`` or the one recorded at ``init``).
NODE_PASSPHRASE_ENV = "fedrec-passphrase-env"
DEVICE_TASK = "client.device.training:make_device_task"


def deployment_run_config(
    run_config: Mapping[str, RunConfigValue], node_config: Mapping[str, object]
) -> dict[str, RunConfigValue]:
    """The run config a node uses: on a device (``fedrec-device-dir`` in its node config) the
    server's task is swapped for the device task and the server-side paths (``bundle``,
    ``state-dir``) for the device's own; elsewhere (simulation) it is unchanged."""
    merged = dict(run_config)
    device_dir = node_config.get(NODE_DEVICE_DIR)
    if device_dir:
        merged["task"] = DEVICE_TASK
        merged["state-dir"] = str(device_dir)
        merged["bundle"] = str(node_config.get(NODE_BUNDLE, ""))
        merged[NODE_SHARE_EVALUATION] = node_config.get(NODE_SHARE_EVALUATION) is True
        merged[NODE_PASSPHRASE_ENV] = str(node_config.get(NODE_PASSPHRASE_ENV) or "")
        # the device owner's privacy floor and caps on a round, whatever the server asks for
        merged[NODE_REQUIRE_DP] = node_config.get(NODE_REQUIRE_DP) is not False
        steps, epsilon = node_round_caps(node_config)
        caps = {
            **_privacy_caps(node_config),
            ROUND_STEPS_KEY: (steps, MAX_ROUND_STEPS),
            ROUND_EPSILON_KEY: (epsilon, MAX_ROUND_EPSILON),
        }
        for key, (cap, default) in caps.items():
            asked = _number(merged.get(key, default))
            # a server value that is no number (the task would read "100" as 100) gets the cap
            merged[key] = cap if asked is None else min(asked, cap)
        shares = max_noise_shares(node_config)
        merged[NODE_MAX_NOISE_SHARES] = shares
        asked_shares = _number(merged.get("noise-shares", 1))
        if asked_shares is not None and math.isnan(asked_shares):
            # int() of it raised a bare ValueError: an "internal" error of the device's own
            raise ConfigError(f"noise-shares must be an integer >= 1, got {asked_shares}")
        merged["noise-shares"] = shares if asked_shares is None else int(min(asked_shares, shares))
    return merged


def _privacy_caps(node_config: Mapping[str, object]) -> dict[str, tuple[float, float]]:
    """The device owner's caps by the run-config key they bound, each with that key's
    default: ``epsilon-budget`` (:data:`NODE_MAX_EPSILON`) and ``delta``
    (:data:`NODE_MAX_DELTA`), refused unless they make a budget (:func:`check_budget`): a NaN
    cap compares below no number, so ``min`` took the server's value uncapped."""
    caps: dict[str, tuple[float, float]] = {}
    for key, node_key, default in (
        ("epsilon-budget", NODE_MAX_EPSILON, PrivacyBudget.epsilon),
        ("delta", NODE_MAX_DELTA, PrivacyBudget.delta),
    ):
        cap = _number(node_config.get(node_key, default))
        if cap is None:
            raise ConfigError(f"node config {node_key} must be a number")
        caps[key] = (cap, default)
    check_budget(
        caps["epsilon-budget"][0],
        caps["delta"][0],
        names=(f"node config {NODE_MAX_EPSILON}", f"node config {NODE_MAX_DELTA}"),
    )
    return caps


def node_round_caps(node_config: Mapping[str, object]) -> tuple[int, float]:
    """The device owner's caps on one round, ``max-round-steps`` (:data:`NODE_MAX_ROUND_STEPS`)
    and ``max-round-epsilon`` (:data:`NODE_MAX_ROUND_EPSILON`), each its default
    (:mod:`shared.federated.round_caps`) when unset; a value that is no such cap (NaN, 0,
    2.5 steps) is refused (:func:`~shared.federated.round_caps.check_round_caps`), never
    read as no cap."""
    names = (f"node config {NODE_MAX_ROUND_STEPS}", f"node config {NODE_MAX_ROUND_EPSILON}")
    steps = coerce(node_config.get(NODE_MAX_ROUND_STEPS, MAX_ROUND_STEPS), int, names[0])
    epsilon = coerce(node_config.get(NODE_MAX_ROUND_EPSILON, MAX_ROUND_EPSILON), float, names[1])
    check_round_caps(steps, epsilon, names=names)
    return steps, epsilon


def max_noise_shares(config: Mapping[str, object]) -> int:
    """The device owner's cap on ``noise-shares`` (:data:`NODE_MAX_NOISE_SHARES`, default 1).

    Split noise (m > 1) adds 1/sqrt(m) of it and trusts the server to aggregate at least m
    updates, while the ledger charges all of it: a server that chose m freely (10000) could
    release this device's update nearly noise-free at the epsilon of the full noise."""
    value = config.get(NODE_MAX_NOISE_SHARES, 1)
    number = _number(value)
    # NaN and inf fail isfinite before int(), which raised a bare ValueError / OverflowError
    if number is None or not math.isfinite(number) or number < 1 or number != int(number):
        raise ConfigError(
            f"node config {NODE_MAX_NOISE_SHARES} must be an integer >= 1, got {value!r}"
        )
    return int(number)


def _number(value: object) -> float | None:
    """``value`` as the task's config reader (:func:`shared.config.coerce`) takes a number
    (``3``, ``3.5``, ``"3.5"``), or ``None``: a privacy cap must compare what the task will
    actually use."""
    try:
        return float(coerce(value, float, "value"))
    except ConfigError:
        return None


def client_id_of(context: Context) -> int:
    """The task-level client id: ``partition-id`` from the node config, else node id."""
    partition = context.node_config.get("partition-id")
    if is_int(partition):
        return partition
    if isinstance(partition, str) and partition.strip().lstrip("-").isdigit():
        return int(partition)
    return int(context.node_id)


def _checked_metrics(metrics: Mapping[str, MetricValue]) -> dict[str, Scalar]:
    out: dict[str, Scalar] = {}
    for key, value in metrics.items():
        if not isinstance(key, str) or key in (METRIC_STATUS, METRIC_REASON):
            raise DataError(f"task metric key {key!r} is not allowed")
        if not isinstance(value, bool | int | float | str):
            raise DataError(
                f"task metric '{key}' is a {type(value).__name__}; use bool/int/float/str"
            )
        out[key] = value
    return out


def encode_fit_outcome(
    outcome: FitOutcome, received: Arrays, *, clip_norm: float = 0.0
) -> RecordDict:
    """Turn a task's :class:`FitOutcome` into the ``FitRes`` records of the reply.

    Raises :class:`TaskFailedError` for ``FitStatus.ERROR`` and
    :class:`~shared.federated.validation.InvalidUpdateError` for unusable arrays.
    """
    if outcome.status is FitStatus.ERROR:
        raise TaskFailedError(outcome.reason)
    if outcome.status is FitStatus.DECLINED:
        update: Arrays = [np.zeros_like(p) for p in received]
        metrics: dict[str, Scalar] = _decline_metrics("fit", outcome)
        num_examples = 0
    else:
        what = "update" if outcome.kind is ArraysKind.UPDATE else "parameters"
        validate_update(outcome.arrays, received, what=f"task {what}")
        if outcome.kind is ArraysKind.UPDATE:
            update = [np.array(a, copy=True) for a in outcome.arrays]
        else:
            update = [
                (new - old).astype(old.dtype)
                for new, old in zip(outcome.arrays, received, strict=True)
            ]
        validate_update(update, received)  # e.g. inf - inf
        norm = l2_norm(update)
        clipped = False
        if clip_norm > 0 and norm > clip_norm:
            update, _ = clip_update_l2(update, clip_norm)
            clipped = True
        metrics = {
            **_checked_metrics(outcome.metrics),
            METRIC_STATUS: FitStatus.OK.value,
            "update-norm": norm,
            "update-clipped": clipped,
        }
        num_examples = outcome.num_examples
    fitres = FitRes(
        status=Status(code=Code.OK, message="Success"),
        parameters=ndarrays_to_parameters(update),
        num_examples=num_examples,
        metrics=metrics,
    )
    return fitres_to_recorddict(fitres, keep_input=False)


def _decline_metrics(phase: str, outcome: FitOutcome | EvalOutcome) -> dict[str, Scalar]:
    """The metrics of a decline's reply: its status and its kind
    (:data:`~shared.federated.task.DECLINE_KINDS`), which travel in the clear (evaluation
    too under SecAgg+). The task's reason, which can state facts about the device (its
    event count, the epsilon it has spent), is logged here, for its owner."""
    log(INFO, "fedrec %s declined (%s): %s", phase, outcome.decline_kind, outcome.reason)
    return {METRIC_STATUS: FitStatus.DECLINED.value, METRIC_REASON: outcome.decline_kind}


#: The kind of failure an error reply names, most specific class first, with the generic
#: text the server gets for it. The exception's own text stays in this client's log: it can
#: hold local paths (a device's state directory, its bundle), counts of its user's events or
#: other device details, and the server needs only to count the client as failed and to
#: tell a configuration it sent apart from a problem on the device.
ERROR_KINDS: tuple[tuple[type[BaseException], str, str], ...] = (
    (PrivacyBudgetExceededError, "privacy-budget", "the client's privacy budget refused it"),
    (InvalidUpdateError, "invalid-update", "the received or trained arrays failed validation"),
    (ConfigError, "config", "the client refused the run or round configuration"),
    (ModelFileError, "model-file", "the client's model files are missing or do not match"),
    (DataError, "data", "the client's local data cannot be used for this task"),
    (TaskFailedError, "task", "the task reported a failure"),
    (MemoryError, "out-of-memory", "the client ran out of memory"),
    (OSError, "io", "a file or device operation on the client failed"),
)
#: The kind of any other exception.
ERROR_KIND_INTERNAL = ("internal", "unexpected error in the client app")


def error_kind(exc: BaseException) -> tuple[str, str]:
    """The stable kind of ``exc`` and the generic text an error reply carries for it."""
    for cls, kind, text in ERROR_KINDS:
        if isinstance(exc, cls):
            return kind, text
    return ERROR_KIND_INTERNAL


def _error_reply(msg: Message, exc: BaseException, phase: str) -> Message:
    """An error reply naming only the kind of failure (:func:`error_kind`); the full
    exception goes to this client's log (the SuperNode's stderr on a device), for its owner."""
    kind, text = error_kind(exc)
    log(WARNING, "fedrec %s failed (%s): %s: %s", phase, kind, type(exc).__name__, exc)
    reason = f"fedrec {phase} failed: {kind}: {text} (details in the client's log)"
    return Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=reason), reply_to=msg)


def _update_clip_norm(config: Mapping[str, Any]) -> float:
    """The L2 bound the server asks the update to be clipped to (0: no clipping). A value
    that is not a finite number >= 0 is refused: read as 0 it switched clipping off."""
    clip = config.get(CONFIG_UPDATE_CLIP_NORM, 0.0)
    if isinstance(clip, bool) or not isinstance(clip, int | float) or not 0 <= clip < math.inf:
        raise ConfigError(
            f"{CONFIG_UPDATE_CLIP_NORM} must be a finite number >= 0 (0: no clipping), got {clip!r}"
        )
    return float(clip)


def _node_run_config(
    context: Context, overrides: Mapping[str, RunConfigValue] | None
) -> dict[str, RunConfigValue]:
    """The run config this node trains with: the context's, under the Python API's
    ``overrides`` (:func:`make_client_app`), for this node (:func:`deployment_run_config`).
    An override no app reads is refused, as the server refuses it: a misspelt client setting
    would be ignored and the client train with its default."""
    merged = {**context.run_config, **(overrides or {})}
    if overrides:
        _check_override_keys(overrides, str(merged.get("task", DEFAULT_TASK)))
    return deployment_run_config(merged, context.node_config)


def _check_override_keys(overrides: Mapping[str, RunConfigValue], task: str) -> None:
    from server.server_app import check_run_config_keys

    check_run_config_keys(overrides, task)


def _received_arrays(tensors: Sequence[bytes]) -> Arrays:
    """The arrays of an instruction (:func:`~server.npy.load_npy`: thread-safe reading). A blob
    that is no ``.npy`` array is an :class:`InvalidUpdateError` ("invalid-update", like any
    other unusable parameters the server sent): load_npy's bare ``ValueError`` made the reply
    an "internal" error of the client."""
    arrays: Arrays = []
    for i, blob in enumerate(tensors):
        try:
            arrays.append(load_npy(blob))
        except ValueError as err:
            raise InvalidUpdateError(
                NOT_AN_ARRAY, f"received array {i} is unreadable: {err}"
            ) from err
    return arrays


def handle_train(
    msg: Message, context: Context, run_config: Mapping[str, RunConfigValue] | None = None
) -> Message:
    """Train handler: ``FitIns`` -> ``task.fit`` -> ``FitRes`` (or an error reply)."""
    try:
        merged = _node_run_config(context, run_config)
        fitins = recorddict_to_fitins(msg.content, keep_input=True)
        received = _received_arrays(fitins.parameters.tensors)
        # what this client knows, over anything the server sent under these keys: the task
        # refuses to split its noise (noise-shares) for an update seen outside SecAgg+
        config = {
            **fitins.config,
            CONFIG_RUN_ID: context.run_id,
            CONFIG_UNDER_SECAGG: under_secagg(),
        }
        clip_norm = _update_clip_norm(config)  # checked before anything is trained or spent
        shares = _number(merged.get("noise-shares", 1))
        if clip_norm > 0 and shares is not None and shares > 1:  # whatever the server allows
            raise ConfigError(noise_shares_clip_problem(clip_norm))
        task, client_id = _task_for(merged), client_id_of(context)
        _restore_state(task, client_id, context)
        outcome = task.fit(client_id, received, config)
        _save_state(task, client_id, context)
        content = encode_fit_outcome(outcome, received, clip_norm=clip_norm)
    except Exception as exc:
        return _error_reply(msg, exc, "fit")
    return Message(content, reply_to=msg)


def encode_eval_outcome(outcome: EvalOutcome) -> EvaluateRes:
    """The ``EvaluateRes`` of a task's :class:`EvalOutcome`: a decline is a reply with no
    examples and the status in its metrics, as for fit. Raises :class:`DataError` for a
    loss that is not finite."""
    if outcome.status is FitStatus.DECLINED:
        return EvaluateRes(
            status=Status(code=Code.OK, message="Success"),
            loss=0.0,
            num_examples=0,
            metrics=_decline_metrics("evaluate", outcome),
        )
    if not math.isfinite(outcome.loss):
        raise DataError(f"evaluation loss is not finite ({outcome.loss})")
    return EvaluateRes(
        status=Status(code=Code.OK, message="Success"),
        loss=float(outcome.loss),
        num_examples=outcome.num_examples,
        metrics=_checked_metrics(outcome.metrics),
    )


def handle_evaluate(
    msg: Message, context: Context, run_config: Mapping[str, RunConfigValue] | None = None
) -> Message:
    """Evaluate handler: ``EvaluateIns`` -> ``task.evaluate`` -> ``EvaluateRes``."""
    try:
        merged = _node_run_config(context, run_config)
        ins = recorddict_to_evaluateins(msg.content, keep_input=True)
        parameters = _received_arrays(ins.parameters.tensors)
        task, client_id = _task_for(merged), client_id_of(context)
        _restore_state(task, client_id, context)
        outcome = task.evaluate(
            client_id, parameters, {**ins.config, CONFIG_RUN_ID: context.run_id}
        )
        _save_state(task, client_id, context)
        content = evaluateres_to_recorddict(encode_eval_outcome(outcome))
    except Exception as exc:
        return _error_reply(msg, exc, "evaluate")
    return Message(content, reply_to=msg)


def make_client_app(
    run_config: Mapping[str, RunConfigValue] | None = None,
    *,
    extra_mods: Sequence[Mod] = (),
) -> ClientApp:
    """Build the ``ClientApp``.

        ``run_config`` entries override ``context.run_config`` (the Python simulation API
        gives clients an empty run config); a key no app reads is refused, here when
        ``run_config`` names the task, else in each reply (an error reply of kind ``config``;
    the client's log names the key).
        ``extra_mods`` run outermost, before the
        SecAgg+ mod (e.g. message-size logging, or fault injection in tests).
    """
    overrides = dict(run_config or {})
    if "task" in overrides:  # it wins over the context's: the task is known now
        _check_override_keys(overrides, str(overrides["task"]))
    client_app = ClientApp(mods=[*extra_mods, secaggplus_when_requested_mod])

    @client_app.train()
    def train(msg: Message, context: Context) -> Message:
        return handle_train(msg, context, overrides)

    @client_app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        return handle_evaluate(msg, context, overrides)

    return client_app


#: Entry point for ``flwr run`` (``clientapp = "client.client_app:app"``).
app = make_client_app()

# ``flwr run . local-simulation`` loads this module in the simulation engine's process
# before the engine starts its dispatcher and Ray backend: tune them there as
# ``server_app.run_simulation`` does (see ``server.vce_runtime``). In a SuperNode the
# engine is not loaded and nothing changes.
if "flwr.server.superlink.fleet.vce.vce_api" in sys.modules:
    from server.vce_runtime import tune_simulation_runtime

    tune_simulation_runtime()
