"""Tests of the federation layer: task, validation, config, handlers, strategy, runs.

Most end-to-end tests use the in-process loopback runtime (``run_in_process``): the
same ServerApp/ClientApp/SecAgg+ code as the Ray simulation, without Ray start-up.
The Ray runtime itself is covered by the ``network``-marked tests at the end.
"""

from __future__ import annotations

import ast
import io
import logging
import math
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import FrozenInstanceError
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

from flwr.app import ConfigRecord, Context, Error, Message, RecordDict
from flwr.common import (
    Code,
    EvaluateIns,
    EvaluateRes,
    FitIns,
    FitRes,
    Parameters,
    Scalar,
    Status,
    ndarray_to_bytes,
    ndarrays_to_parameters,
    parameters_to_ndarrays,
)
from flwr.common.constant import ErrorCode
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS as SECAGG_RESULTS
from flwr.common.secure_aggregation.secaggplus_constants import Key
from flwr.compat.common.recorddict_compat import (
    evaluateins_to_recorddict,
    fitins_to_recorddict,
    fitres_to_recorddict,
    recorddict_to_evaluateres,
    recorddict_to_fitres,
)
from flwr.server.client_proxy import ClientProxy
from flwr.server.compat.grid_client_proxy import GridClientProxy
from flwr.supercore.task_identity import TaskIdentity

from client.client_app import CLIENT_STATE_RECORD, client_id_of, make_client_app
from server import secagg as secagg_module
from server import server_app as server_app_module
from server.secagg import SECAGG_RECORD, SecAggSettings
from server.server_app import (
    SIMULATED_NODE_ID_BASE,
    InProcessGrid,
    ServerConfig,
    SimulationBackend,
    check_ray_reachable,
    make_server_app,
    run_in_process,
    run_simulation,
)
from server.strategy import RoundReport, ValidatingFedAvg
from shared.errors import ConfigError, DataError, FedRecError
from shared.federated import (
    METRIC_REASON,
    METRIC_STATUS,
    EvalOutcome,
    FitOutcome,
    InvalidUpdateError,
    ToyLinearConfig,
    ToyLinearTask,
    available_tasks,
    clip_update_l2,
    find_problem,
    get_task,
    l2_norm,
    register_task,
    validate_update,
)
from shared.federated.task import STUDENT_TASK
from shared.federated.validation import median_clip_bound
from tests.conftest import flower_log

Arrays = list[npt.NDArray[Any]]
RunConfig = dict[str, bool | int | float | str]


@pytest.fixture(autouse=True)
def _task_identity() -> None:
    """Instruction messages need a process task identity (Flower's runtimes set it)."""
    try:
        _ = TaskIdentity.run_id
    except RuntimeError:
        TaskIdentity.run_id = 1
        TaskIdentity.node_id = 1
        TaskIdentity.task_id = 1


@pytest.fixture
def client_log(caplog: pytest.LogCaptureFixture) -> Iterator[pytest.LogCaptureFixture]:
    """``caplog`` with the WARNING lines of Flower's logger (the ClientApp's log), which
    does not pass its records on to the root logger's handlers."""
    with flower_log(caplog, logging.WARNING):
        yield caplog


# ----------------------------------------------------------------------------- helpers


def _context(partition_id: int = 3, run_config: RunConfig | None = None) -> Context:
    return Context(
        run_id=1,
        node_id=100 + partition_id,
        node_config={"partition-id": partition_id, "num-partitions": 10},
        state=RecordDict(),
        run_config=dict(run_config or {}),
    )


def _fit_message(params: Arrays, config: dict[str, Scalar] | None = None) -> Message:
    ins = FitIns(ndarrays_to_parameters(params), dict(config or {"server-round": 1}))
    return Message(fitins_to_recorddict(ins, keep_input=True), 103, "train", group_id="1")


def _eval_message(params: Arrays) -> Message:
    ins = EvaluateIns(ndarrays_to_parameters(params), {"server-round": 1})
    return Message(evaluateins_to_recorddict(ins, keep_input=True), 103, "evaluate")


def _run(
    run_config: RunConfig, num_nodes: int, *, extra_mods: Sequence[Any] = ()
) -> list[RoundReport]:
    reports: list[RoundReport] = []
    run_in_process(
        make_server_app(run_config, on_round_end=reports.append),
        make_client_app(extra_mods=extra_mods),
        num_nodes,
        run_config=run_config,
    )
    return reports


def _expected_fedavg(task: ToyLinearTask, clients: Sequence[int], params: Arrays) -> Arrays:
    """Plain weighted average of the survivors' updates, applied to ``params``."""
    total = 0
    sums = [np.zeros(p.shape, dtype=np.float64) for p in params]
    for c in clients:
        out = task.fit(c, params, {})
        total += out.num_examples
        for acc, new, old in zip(sums, out.arrays, params, strict=True):
            acc += out.num_examples * (new.astype(np.float32) - old).astype(np.float64)
    return [p.astype(np.float64) + s / total for p, s in zip(params, sums, strict=True)]


def _secagg_tolerance(task: ToyLinearTask, clients: Sequence[int], c: float, q: int) -> float:
    """Bound on SecAgg+ quantization error: one level per client, over summed weights."""
    sum_r = sum(task.num_examples(i) for i in clients) / 1000.0  # max_weight = 1000
    return 4 * len(clients) * (2 * c / q) / sum_r + 1e-5


def _max_diff(a: Arrays, b: Arrays) -> float:
    return max(float(np.max(np.abs(x.astype(np.float64) - y))) for x, y in zip(a, b, strict=True))


# ------------------------------------------------------------------------- toy task


def test_toy_task_is_deterministic_and_training_reduces_loss() -> None:
    task_a, task_b = ToyLinearTask(), ToyLinearTask()
    params = task_a.initial_parameters()
    out_a = task_a.fit(4, params, {})
    out_b = task_b.fit(4, params, {})
    for x, y in zip(out_a.arrays, out_b.arrays, strict=True):
        np.testing.assert_array_equal(x, y)
    assert float(out_a.metrics["train-loss"]) < float(out_a.metrics["train-loss-before"])
    assert out_a.num_examples == task_a.num_examples(4)
    assert [a.dtype for a in out_a.arrays] == [np.float32, np.float32]
    before = task_a.evaluate(4, params, {}).loss
    assert task_a.evaluate(4, out_a.arrays, {}).loss < before


def test_toy_task_clients_have_different_sizes() -> None:
    task = ToyLinearTask()
    assert len({task.num_examples(c) for c in range(10)}) > 3


def test_fit_outcome_requires_consistent_fields() -> None:
    with pytest.raises(ValueError, match="at least one array"):
        FitOutcome.with_parameters([], num_examples=3)
    with pytest.raises(ValueError, match="num_examples > 0"):
        FitOutcome.with_parameters([np.zeros(2, np.float32)], num_examples=0)
    with pytest.raises(ValueError, match="needs a reason"):
        FitOutcome.declined("")
    assert FitOutcome.declined("opted out").reason == "opted out"
    assert FitOutcome.declined("opted out").decline_kind == "other"
    with pytest.raises(ValueError, match="unknown decline kind 'client 3 has 1 event'"):
        FitOutcome.declined("too few events", "client 3 has 1 event")
    with pytest.raises(ValueError, match="unknown decline kind"):
        EvalOutcome.declined("too few events", "few")


def test_get_task_by_name_reference_and_unknown() -> None:
    assert "toy-linear" in available_tasks()
    task = get_task("toy-linear", {"toy-dim": 3})
    assert [p.shape for p in task.initial_parameters()] == [(3,), (1,)]
    by_ref = get_task("shared.federated.task:ToyLinearTask.from_run_config", {"toy-dim": 2})
    assert by_ref.initial_parameters()[0].shape == (2,)
    with pytest.raises(ConfigError, match="unknown federated task 'nope'; known tasks"):
        get_task("nope", {})
    with pytest.raises(ConfigError, match="cannot import task module"):
        get_task("no_such_module_xyz:factory", {})


def test_toy_config_parses_client_lists_and_rejects_bad_values() -> None:
    cfg = ToyLinearConfig.from_run_config({"toy-empty-clients": "1, 3", "toy-nan-clients": 2})
    assert cfg.empty_clients == frozenset({1, 3}) and cfg.nan_clients == frozenset({2})
    with pytest.raises(ConfigError, match="toy-dim must be int, got 'eight'"):
        ToyLinearConfig.from_run_config({"toy-dim": "eight"})
    # read by the rule every setting is read by (shared.config.coerce), worded as every error
    cfg = ToyLinearConfig.from_run_config({"toy-empty-clients": "[1, 3]", "toy-nan-clients": ""})
    assert cfg.empty_clients == frozenset({1, 3}) and cfg.nan_clients == frozenset()
    assert ToyLinearConfig.from_run_config({"toy-decline-clients": 2.0}).decline_clients == {2}
    for bad, shown in (("a,b", "'a'"), (True, "True"), ("1,2.5", "'2.5'")):
        with pytest.raises(ConfigError, match=f"toy-empty-clients must be int, got {shown}"):
            ToyLinearConfig.from_run_config({"toy-empty-clients": bad})


# ----------------------------------------------------------------------- validation

REF = [np.zeros((2, 3), np.float32), np.zeros(4, np.float32)]


@pytest.mark.parametrize(
    ("arrays", "code", "message"),
    [
        (
            [np.array([[0, np.nan, 0], [0, 0, 0]], np.float32), np.zeros(4, np.float32)],
            "non-finite",
            r"update array 0 contains 1 NaN and 0 inf values",
        ),
        (
            [np.zeros((2, 3), np.float32), np.array([0, np.inf, -np.inf, 0], np.float32)],
            "non-finite",
            r"update array 1 contains 0 NaN and 2 inf values",
        ),
        (
            [np.zeros((3, 2), np.float32), np.zeros(4, np.float32)],
            "shape-mismatch",
            r"update array 0 has shape \(3, 2\), expected \(2, 3\)",
        ),
        ([np.zeros((2, 3), np.float32)], "count-mismatch", "update has 1 arrays, expected 2"),
        (
            [np.zeros((2, 3), np.float64), np.zeros(4, np.float32)],
            "dtype-mismatch",
            "update array 0 has dtype float64, expected float32",
        ),
        (
            [np.zeros((2, 3), np.int32), np.zeros(4, np.float32)],
            "not-float",
            "update array 0 has dtype int32, expected a float dtype",
        ),
    ],
)
def test_validation_rejects_bad_updates(arrays: Arrays, code: str, message: str) -> None:
    with pytest.raises(InvalidUpdateError, match=message) as info:
        validate_update(arrays, REF)
    assert info.value.code == code
    assert isinstance(info.value, DataError)
    problem = find_problem(arrays, REF)
    assert problem is not None and problem.code == code


def test_validation_accepts_good_update_and_names_arrays() -> None:
    good = [np.ones((2, 3), np.float32), np.ones(4, np.float32)]
    validate_update(good, REF)
    assert find_problem(good, REF) is None
    bad = [np.ones((2, 3), np.float32), np.full(4, np.nan, np.float32)]
    with pytest.raises(InvalidUpdateError, match=r"array 1 \('bias'\)"):
        validate_update(bad, REF, names=["weight", "bias"])


def test_clip_update_l2_scales_down_only_above_the_bound() -> None:
    update = [np.array([3.0, 0.0], np.float32), np.array([4.0], np.float32)]  # norm 5
    clipped, norm = clip_update_l2(update, 1.0)
    assert norm == pytest.approx(5.0)
    assert l2_norm(clipped) == pytest.approx(1.0, rel=1e-6)
    assert [a.dtype for a in clipped] == [np.float32, np.float32]
    np.testing.assert_allclose(clipped[0], [0.6, 0.0], rtol=1e-6)  # same direction
    same, _ = clip_update_l2(update, 10.0)
    np.testing.assert_array_equal(same[1], update[1])
    with pytest.raises(InvalidUpdateError, match="NaN"):
        clip_update_l2([np.array([np.nan], np.float32)], 1.0)
    with pytest.raises(ValueError, match="positive"):
        clip_update_l2(update, 0.0)


def test_a_clipped_update_is_within_the_bound_after_rounding_to_its_dtype() -> None:
    """The clip scaled a float32 update in float32: the rounding left its norm up to about
    1e-7 above the bound (1.0000000656 for a bound of 1), which is what a client's influence,
    user-level DP's sensitivity, is argued from. Now it is at most the bound, and still
    the bound to float32 precision, in the update's direction."""
    rng = np.random.default_rng(0)
    worst = 0.0
    for _ in range(300):
        update = [
            (rng.normal(size=int(rng.integers(1, 50))) * rng.uniform(0.1, 100)).astype(np.float32)
            for _ in range(3)
        ]
        clipped, norm = clip_update_l2(update, 1.0)
        assert norm > 1.0 and [a.dtype for a in clipped] == [np.float32] * 3
        worst = max(worst, l2_norm(clipped))
        np.testing.assert_allclose(clipped[0], update[0] / norm, rtol=1e-5, atol=1e-7)
    assert 1.0 - 1e-6 < worst <= 1.0


@pytest.mark.parametrize(
    "update",
    [
        [np.array([3e38, -3e38], np.float32)],  # float32 times a scale below 1e-38 was 0
        [np.array([3e200, -3e200], np.float64)],  # its squares overflowed: the norm was inf
    ],
)
def test_clipping_a_huge_update_keeps_its_direction_instead_of_zeroing_it(
    update: Arrays,
) -> None:
    clipped, norm = clip_update_l2(update, 1e-30)
    assert norm == pytest.approx(float(np.abs(update[0][0])) * math.sqrt(2))
    assert l2_norm(clipped) == pytest.approx(1e-30, rel=1e-5)
    assert l2_norm(clipped) <= 1e-30
    np.testing.assert_allclose(clipped[0] * 1e30, [1 / math.sqrt(2), -1 / math.sqrt(2)], rtol=1e-5)


# --------------------------------------------------------------------------- config


def test_server_config_defaults_and_kebab_keys() -> None:
    cfg = ServerConfig.from_run_config(
        {"num-rounds": 5, "cohort-size": 7, "secagg": True, "toy-dim": 3, "round-timeout": 2}
    )
    assert (cfg.num_rounds, cfg.cohort_size, cfg.secagg, cfg.round_timeout) == (5, 7, True, 2.0)
    assert cfg.secagg_settings is not None and cfg.secagg_settings.num_shares == 5
    assert ServerConfig.from_run_config(cfg.to_run_config()) == cfg
    assert ServerConfig().secagg_settings is None
    with pytest.raises(FrozenInstanceError):
        cfg.num_rounds = 1  # type: ignore[misc]


@pytest.mark.parametrize(
    ("run_config", "message"),
    [
        ({"num-rounds": "three"}, "num-rounds must be int, got 'three'"),
        ({"num-rounds": 0}, "'num-rounds' must be between 1 and 1,000,000, got 0"),
        ({"num-rounds": "1e22"}, "'num-rounds' must be between 1 and 1,000,000"),
        ({"num-rounds": 2.5}, "num-rounds must be int, got 2.5"),
        ({"secagg": 2}, "secagg must be true or false, got 2"),
        ({"cohort-fraction": 1.5}, r"'cohort-fraction' must be in \(0, 1\]"),
        ({"num-round": 3}, "unknown server setting 'num-round'; did you mean 'num-rounds'"),
        ({"secagg-shares": 3}, "unknown server setting 'secagg-shares'"),
        (
            {"secagg-num-shares": 3, "secagg-reconstruction-threshold": 3},
            "must be < secagg-num-shares",
        ),
        ({"secagg-num-shares": 2}, "secagg-num-shares as an integer must be >= 3"),
        ({"secagg-modulus-range": 1000}, "secagg-modulus-range must be a power of two"),
        (
            {"secagg": True, "cohort-size": 2000},
            "'cohort-size' 2000 overflows SecAgg",
        ),
        (
            {"secagg": True, "cohort-size": 2, "secagg-reconstruction-threshold": 3},
            "exceeds 'cohort-size'",
        ),
        # a fractional threshold: 3 of 5 shares need 3 clients, and every round would halt
        (
            {
                "secagg": True,
                "cohort-size": 2,
                "secagg-num-shares": 5,
                "secagg-reconstruction-threshold": 0.6,
            },
            "'cohort-size' 2 is below the 3 clients SecAgg",
        ),
        # above the least cohort, 0.1 shares of 20 clients give each 3 neighbours, under 4
        (
            {
                "secagg": True,
                "cohort-size": 20,
                "min-available-clients": 20,
                "secagg-num-shares": 0.1,
                "secagg-reconstruction-threshold": 4,
            },
            "'cohort-size' 20 gives each client 3 SecAgg",
        ),
        (
            {"secagg": True, "min-cohort": 2000, "min-available-clients": 2000},
            "'min-cohort' 2000 exceeds the 1023 clients SecAgg",
        ),
        ({"secagg": True, "noise-shares": 2000}, "'noise-shares' 2000 exceeds the 1023 clients"),
        # rounds start with min-available-clients devices: a larger min-cohort never held;
        # both fixes are named (one device without SecAgg+ needs --min-cohort 1, since
        # --min-clients 1 alone met the default min-cohort 2 and was told to raise it)
        (
            {"min-cohort": 5, "min-available-clients": 2},
            "'min-cohort' must be at most min-av.*--min-clients.* or lower 'min-cohort', --min-c",
        ),
        (
            {"user-dp": True, "user-dp-epsilon-budget": float("inf")},
            r"'user-dp-epsilon-budget' must be a finite number >= 0 \(0: no budget\)",
        ),
    ],
)
def test_server_config_rejects_bad_values(run_config: RunConfig, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        ServerConfig.from_run_config(run_config)


def test_client_resources_beyond_this_machine_are_refused_before_any_work() -> None:
    """num-cpus-per-client above the machine's CPUs built an empty Ray actor pool: three
    tracebacks, then a process hung at exit."""
    from server.server_app import check_client_resources

    cpus = os.cpu_count() or 1
    check_client_resources(float(cpus), 0.0, attach=False)
    with pytest.raises(ConfigError, match=f"this machine has {cpus} CPU"):
        check_client_resources(cpus + 1.0, 0.0, attach=False)
    check_client_resources(cpus + 1.0, 0.0, attach=True)  # a cluster's CPUs are its own


def test_a_gpu_share_above_one_must_be_whole_gpus() -> None:
    """Ray gives a client a fraction of one GPU or whole GPUs: 1.5 passed the check on a
    machine (or cluster) with two GPUs, pretraining ran, and Ray refused to create the
    clients ("GPU resource quantities >1 must be whole numbers")."""
    from server.server_app import check_client_resources

    with pytest.raises(ConfigError, match="num-gpus-per-client above 1 must be a whole number"):
        check_client_resources(1.0, 1.5, attach=True)
    check_client_resources(1.0, 2, attach=True)
    check_client_resources(1.0, 0.5, attach=True)


def test_secagg_fraction_parameters_are_kept_as_floats() -> None:
    cfg = ServerConfig.from_run_config(
        {"secagg": True, "secagg-num-shares": 0.5, "secagg-reconstruction-threshold": 0.6}
    )
    settings = cfg.secagg_settings
    assert settings is not None
    assert isinstance(settings.num_shares, float) and isinstance(settings.num_shares, float)
    assert SecAggSettings().max_cohort == 1023


@pytest.mark.parametrize(
    ("shares", "threshold", "least"), [(5, 0.6, 3), (3, 1.0, 3), (0.5, 4, 7), (0.5, 0.6, 2)]
)
def test_secagg_least_cohort_is_the_fewest_clients_a_round_completes_with(
    shares: float, threshold: float, least: int
) -> None:
    """A fractional threshold was taken as 2 clients: but with an integer secagg-num-shares
    it is a fraction of those shares (0.6 of 5: 3), and with a fractional one a round of
    few clients gives each fewer neighbours than an integer threshold (0.5 of 6 clients:
    3 neighbours, under 4). Rounds of fewer clients halt; under user-level DP a Poisson
    cohort that small was run (and halted) instead of skipped and counted as skipped."""
    assert (
        SecAggSettings(num_shares=shares, reconstruction_threshold=threshold).least_cohort == least
    )
    # a fixed cohort-size below `least` is refused up front (test_server_config_rejects_
    # bad_values), and a round waits for `least` clients to connect (test_a_secagg_round_
    # waits_for_the_clients_it_completes_with): with that many, it completes. (A fractional
    # num-shares with an integer threshold needs a cohort-size: larger cohorts' shares
    # outgrow twice the threshold, test_secagg_settings_refuse_a_threshold_that_is_no_...)
    fixed = isinstance(shares, float) and isinstance(threshold, int)
    config: RunConfig = {
        "num-rounds": 1,
        "eval-fraction": 0.0,
        "secagg": True,
        "cohort-size": least if fixed else 0,
        "cohort-fraction": 1.0,
        "min-available-clients": 2,
        "secagg-num-shares": shares,
        "secagg-reconstruction-threshold": threshold,
    }
    (report,) = _run(config, num_nodes=least)
    assert report.fit.updated, report.fit


def test_a_secagg_round_waits_for_the_clients_it_completes_with(
    client_log: pytest.LogCaptureFixture,
) -> None:
    """With secagg on, the default 5 shares / threshold 3 and min-available-clients 2, two
    connected devices started every round, and every round halted before unmasking yet was
    counted, checkpointed and published: the run used its rounds up training nothing. A
    cohort drawn by fraction (0.1 of 10: 1, raised to min-cohort 2) fell short the same way.
    A round now waits for the 3 clients a secure round completes with and samples no fewer."""
    from server.secagg import _wait_for_cohort

    strategy = ValidatingFedAvg(
        initial_parameters=[np.zeros(2, np.float32)],
        cohort_fraction=0.1,
        min_cohort=2,
        min_available_clients=2,
        secure_aggregation=True,
        secagg_least=SecAggSettings().least_cohort,
        availability_timeout=0.2,
    )
    assert strategy.num_fit_clients(10)[0] == 3
    assert ServerConfig.from_run_config({"secagg": True}).clients_needed == 3
    assert ServerConfig.from_run_config({"secagg": False}).clients_needed == 2
    # the server's config and the strategy built from it wait for the same clients
    from server.server_app import build_strategy

    for values in (
        {"secagg": True},
        {"secagg": False, "min-available-clients": 4},
        {"secagg": True, "min-cohort": 5, "min-available-clients": 5},
        {"secagg": True, "noise-shares": 7, "cohort-size": 8},
        {"secagg": True, "secagg-num-shares": 9, "secagg-reconstruction-threshold": 8},
    ):
        config = ServerConfig.from_run_config(values)
        built = build_strategy(config, [np.zeros(2, np.float32)])
        assert config.clients_needed == built.clients_needed(), values

    class Manager:
        def __init__(self) -> None:
            self.calls = 0

        def num_available(self) -> int:
            self.calls += 1
            return 2 if self.calls < 8 else 3  # a third device connects after a while

    manager = Manager()
    _wait_for_cohort(manager, strategy, 1)  # type: ignore[arg-type]
    assert manager.calls >= 8
    assert "round 1 waits for clients: 2 of the 3" in client_log.text


def test_secagg_ranges_whose_modulus_holds_no_completable_round_are_refused() -> None:
    """A modulus of 2**23 holds one client's quantized update (levels 0..2**22), and a
    SecAgg+ round needs 2 or more: accepted, a cohort-fraction run capped every cohort at
    1 client and aborted every round ('The number of samples should be greater than 1'),
    the run 'finishing' with nothing trained; so did a threshold of 4 with room for 3."""
    with pytest.raises(ConfigError, match=r"of at most 1 client\(s\).* needs at least 2"):
        ServerConfig.from_run_config(
            {"secagg": True, "cohort-fraction": 0.5, "secagg-modulus-range": 2**23}
        )
    with pytest.raises(ConfigError, match=r"of at most 3 client\(s\).* needs at least 4"):
        SecAggSettings(num_shares=5, reconstruction_threshold=4, modulus_range=2**24)
    fits = SecAggSettings(num_shares=5, reconstruction_threshold=3, modulus_range=2**24)
    assert (fits.least_cohort, fits.max_cohort) == (3, 3)


def test_simulation_backend_config_is_cpu_only_and_can_attach() -> None:
    local = SimulationBackend(num_cpus_per_client=0.5, ray_num_cpus=2).to_backend_config()
    assert local["client_resources"] == {"num_cpus": 0.5, "num_gpus": 0.0}
    assert local["init_args"]["num_gpus"] == 0 and local["init_args"]["num_cpus"] == 2
    # a private cluster whatever RAY_ADDRESS says or a `ray start` left on this machine:
    # left unset, Ray attached to that one and refused the resources above ("When
    # connecting to an existing cluster, num_cpus and num_gpus must not be provided")
    assert local["init_args"]["address"] == "local"
    attached = SimulationBackend(ray_address="127.0.0.1:6379").to_backend_config()
    assert attached["init_args"]["address"] == "127.0.0.1:6379"
    assert "num_cpus" not in attached["init_args"]
    with pytest.raises(ConfigError, match="ray_num_cpus cannot be set"):
        SimulationBackend(ray_address="auto", ray_num_cpus=2)
    with pytest.raises(ConfigError, match="num-cpus-per-client must be a finite number > 0"):
        SimulationBackend(num_cpus_per_client=0)


# ------------------------------------------------------------------ client handlers


def test_train_handler_replies_with_the_update() -> None:
    # Prepare
    task = ToyLinearTask()
    params = task.initial_parameters()
    app = make_client_app()
    msg, ctx = _fit_message(params), _context(partition_id=3)
    # Execute
    reply = app(msg, ctx)
    # Assert
    assert reply.has_content() and reply.metadata.reply_to_message_id == msg.metadata.message_id
    fitres = recorddict_to_fitres(reply.content, keep_input=True)
    expected = task.fit(3, params, {})
    assert fitres.status.code == Code.OK
    assert fitres.num_examples == expected.num_examples
    assert fitres.metrics[METRIC_STATUS] == "ok"
    update = parameters_to_ndarrays(fitres.parameters)
    for got, new, old in zip(update, expected.arrays, params, strict=True):
        np.testing.assert_allclose(got, new - old, rtol=1e-6)
        assert got.dtype == old.dtype


def test_train_handler_clips_the_update_norm() -> None:
    params = ToyLinearTask().initial_parameters()
    reply = make_client_app()(
        _fit_message(params, {"server-round": 1, "update-clip-norm": 0.01}), _context()
    )
    fitres = recorddict_to_fitres(reply.content, keep_input=True)
    assert l2_norm(parameters_to_ndarrays(fitres.parameters)) == pytest.approx(0.01, rel=1e-5)
    assert fitres.metrics["update-clipped"] is True
    assert float(fitres.metrics["update-norm"]) > 0.01


@pytest.mark.parametrize("clip", [float("nan"), -1.0, float("inf"), "big"])
def test_train_handler_refuses_an_update_clip_that_would_switch_clipping_off(
    clip: object, client_log: pytest.LogCaptureFixture
) -> None:
    params = ToyLinearTask().initial_parameters()
    reply = make_client_app()(
        _fit_message(params, {"server-round": 1, "update-clip-norm": clip}),  # type: ignore[dict-item]
        _context(),
    )
    assert reply.has_error() and "fedrec fit failed: config:" in reply.error.reason
    assert "update-clip-norm must be a finite number >= 0" in client_log.text


def test_train_handler_refuses_to_clip_an_update_that_carries_split_noise(
    client_log: pytest.LogCaptureFixture,
) -> None:
    """With noise-shares > 1 an update holds 1/m of the round's DP noise; clipping it before
    the secure sum voids the argument the ledger is charged for. The client refuses it
    whatever the server sends, before training."""
    params = ToyLinearTask().initial_parameters()
    app = make_client_app()
    split = _context(3, {"noise-shares": 2})
    reply = app(_fit_message(params, {"server-round": 1, "update-clip-norm": 0.01}), split)
    assert reply.has_error() and "fedrec fit failed: config:" in reply.error.reason
    assert "noise-shares > 1 cannot be combined" in client_log.text
    # either alone trains
    assert not app(_fit_message(params), split).has_error()
    clipped = _fit_message(params, {"server-round": 1, "update-clip-norm": 0.01})
    assert not app(clipped, _context(3)).has_error()


def test_train_handler_declined_client_sends_zero_weight() -> None:
    params = ToyLinearTask().initial_parameters()
    reply = make_client_app({"toy-decline-clients": "3"})(_fit_message(params), _context(3))
    fitres = recorddict_to_fitres(reply.content, keep_input=True)
    assert fitres.num_examples == 0
    assert fitres.metrics[METRIC_STATUS] == "declined"
    assert fitres.metrics[METRIC_REASON] == "opted-out"
    assert all(not np.any(a) for a in parameters_to_ndarrays(fitres.parameters))


class _TellingDecliner(ToyLinearTask):
    """Declines as a device does, with facts about it in the reason and no kind named."""

    def fit(self, client_id: int, parameters: Arrays, config: Mapping[str, Any]) -> FitOutcome:
        return FitOutcome.declined("this device has 1 event(s); training needs >= 2")

    def evaluate(self, client_id: int, parameters: Arrays, config: Mapping[str, Any]) -> Any:
        return EvalOutcome.declined("this device has 1 event(s); evaluation needs >= 2")


def test_decline_replies_name_the_kind_of_decline_but_no_device_detail(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A decline's reply carried the task's reason in the clear (evaluation too under
    SecAgg+): 'this device has 1 event(s)' told the server about its user's history. The
    reply names the kind of decline; the reason is in the client's log, for its owner."""
    register_task("telling-decliner-test", lambda _cfg: _TellingDecliner(), replace=True)
    params = ToyLinearTask().initial_parameters()
    app = make_client_app({"task": "telling-decliner-test"})
    with flower_log(caplog, logging.INFO):
        fit = app(_fit_message(params), _context())
        evaluate = app(_eval_message(params), _context())
    fit_metrics = recorddict_to_fitres(fit.content, keep_input=True).metrics
    eval_res = recorddict_to_evaluateres(evaluate.content)
    for metrics in (fit_metrics, eval_res.metrics):
        assert metrics == {METRIC_STATUS: "declined", METRIC_REASON: "other"}
    assert eval_res.num_examples == 0
    assert "fedrec fit declined (other): this device has 1 event(s)" in caplog.text
    assert "fedrec evaluate declined (other): this device has 1 event(s)" in caplog.text


@pytest.mark.parametrize(
    ("run_config", "kind", "logged"),
    [
        ({"toy-empty-clients": "3"}, "data", "DataError: client 3 has no local training examples"),
        (
            {"toy-nan-clients": "3"},
            "invalid-update",
            "InvalidUpdateError: task parameters array 0 contains 1 NaN",
        ),
        ({"task": "nope"}, "config", "ConfigError: unknown federated task 'nope'"),
    ],
)
def test_train_handler_turns_task_failures_into_error_replies(
    run_config: RunConfig, kind: str, logged: str, client_log: pytest.LogCaptureFixture
) -> None:
    params = ToyLinearTask().initial_parameters()
    reply = make_client_app()(_fit_message(params), _context(3, run_config))
    assert reply.has_error() and not reply.has_content()
    assert reply.error.code == ErrorCode.CLIENT_APP_RAISED_EXCEPTION
    assert f"fedrec fit failed: {kind}: " in str(reply.error.reason)
    assert logged in client_log.text and logged not in str(reply.error.reason)


class _LeakyTask(ToyLinearTask):
    """Fails as a device's task can: its errors name local paths and the user's data."""

    def fit(self, client_id: int, parameters: Arrays, config: Mapping[str, Any]) -> FitOutcome:
        raise DataError("event store /home/alice/.fedrec/events.db holds 1 event: 'Heat (1995)'")

    def evaluate(self, client_id: int, parameters: Arrays, config: Mapping[str, Any]) -> Any:
        raise FileNotFoundError(2, "No such file", "/home/alice/.fedrec/bundle/student.pt")


def test_error_replies_name_the_kind_of_failure_but_no_device_detail(
    client_log: pytest.LogCaptureFixture,
) -> None:
    """An error reply carried the exception's text to the server: local paths, the user's
    events. It names the kind of failure only; the text stays in the client's log."""
    register_task("leaky-test", lambda _cfg: _LeakyTask(), replace=True)
    params = ToyLinearTask().initial_parameters()
    app = make_client_app({"task": "leaky-test"})
    fit, evaluate = app(_fit_message(params), _context()), app(_eval_message(params), _context())
    assert fit.error.reason.startswith("fedrec fit failed: data: ")
    assert evaluate.error.reason.startswith("fedrec evaluate failed: io: ")
    for reply in (fit, evaluate):
        assert "alice" not in reply.error.reason and "Heat" not in reply.error.reason
    assert "/home/alice/.fedrec/events.db" in client_log.text and "student.pt" in client_log.text


def test_train_handler_survives_a_malformed_message() -> None:
    msg = Message(RecordDict(), 103, "train")
    reply = make_client_app()(msg, _context())
    assert reply.has_error() and "fedrec fit failed" in str(reply.error.reason)


def test_parameters_that_are_no_arrays_are_an_invalid_update_reply(
    client_log: pytest.LogCaptureFixture,
) -> None:
    """A blob the server sent that is no .npy array raised load_npy's ValueError, which the
    reply called an "internal" error of the client instead of what it received."""
    bad = Parameters(tensors=[b"not an npy blob", b""], tensor_type="numpy.ndarray")
    fit = Message(fitins_to_recorddict(FitIns(bad, {"server-round": 1}), True), 103, "train")
    ins = EvaluateIns(bad, {"server-round": 1})
    evaluate = Message(evaluateins_to_recorddict(ins, True), 103, "evaluate")
    app = make_client_app()
    for phase, msg in (("fit", fit), ("evaluate", evaluate)):
        reply = app(msg, _context())
        assert reply.has_error()
        assert reply.error.reason.startswith(f"fedrec {phase} failed: invalid-update: ")
    assert "received array 0 is unreadable: not an .npy blob" in client_log.text


def test_evaluate_handler_reports_loss_and_examples() -> None:
    task = ToyLinearTask()
    params = task.initial_parameters()
    reply = make_client_app()(_eval_message(params), _context(2))
    res = recorddict_to_evaluateres(reply.content)
    expected = task.evaluate(2, params, {})
    assert res.loss == pytest.approx(expected.loss)
    assert res.num_examples == expected.num_examples
    assert res.metrics["mse"] == pytest.approx(expected.loss)


def test_secagg_mod_errors_become_replies_not_crashes(
    client_log: pytest.LogCaptureFixture,
) -> None:
    params = ToyLinearTask().initial_parameters()
    msg = _fit_message(params)
    # A SecAgg+ stage out of order (share_keys before setup) must not crash the app.
    msg.content.config_records[SECAGG_RECORD] = ConfigRecord({"stage": "share_keys"})
    reply = make_client_app()(msg, _context())
    assert reply.has_error() and reply.error.code == ErrorCode.CLIENT_APP_RAISED_EXCEPTION
    assert reply.error.reason.startswith("secagg+ stage 'share_keys' failed: internal: ")
    assert "expect setup stage" in client_log.text  # Flower's text: in the client's log


def test_secagg_mod_error_replies_name_the_kind_of_failure_but_no_device_detail(
    monkeypatch: pytest.MonkeyPatch, client_log: pytest.LogCaptureFixture
) -> None:
    """The SecAgg+ mod's error reply carried '<Type>: <message>' to the server, as the
    ClientApp's did before it named only the kind: a failure in a stage (a file the
    client's state could not be written to) told the server a device's local path."""

    def failing_mod(msg: Message, ctxt: Context, call_next: Any) -> Message:
        raise PermissionError(13, "Permission denied", "/home/alice/.fedrec/state/secagg.bin")

    monkeypatch.setattr(secagg_module, "secaggplus_mod", failing_mod)
    msg = _fit_message(ToyLinearTask().initial_parameters())
    msg.content.config_records[SECAGG_RECORD] = ConfigRecord({"stage": "setup"})
    reply = make_client_app()(msg, _context())
    assert reply.has_error() and reply.error.code == ErrorCode.CLIENT_APP_RAISED_EXCEPTION
    assert reply.error.reason.startswith("secagg+ stage 'setup' failed: io: ")
    assert "alice" not in reply.error.reason and "Permission" not in reply.error.reason
    assert "PermissionError" in client_log.text and "/home/alice/.fedrec" in client_log.text


class _CountingTask(ToyLinearTask):
    """Counts fits per client in client state only (forgets it after each export)."""

    def __init__(self) -> None:
        super().__init__()
        self.live: dict[int, int] = {}

    def import_client_state(self, client_id: int, state: Mapping[str, Any]) -> None:
        self.live[client_id] = int(state["count"][0]) if "count" in state else 0

    def export_client_state(self, client_id: int) -> dict[str, npt.NDArray[Any]]:
        return {"count": np.array([self.live.pop(client_id)], dtype=np.int64)}

    def fit(self, client_id: int, parameters: Arrays, config: Mapping[str, Any]) -> FitOutcome:
        self.live[client_id] += 1
        out = super().fit(client_id, parameters, config)
        return FitOutcome.with_parameters(
            out.arrays, out.num_examples, {"fit-count": self.live[client_id]}
        )


def test_client_state_of_a_stateful_task_persists_in_the_node_context() -> None:
    register_task("counting-test", lambda _cfg: _CountingTask(), replace=True)
    params = ToyLinearTask().initial_parameters()
    app = make_client_app({"task": "counting-test"})
    ctx = _context(partition_id=2)
    counts = []
    for _ in range(3):
        reply = app(_fit_message(params), ctx)
        counts.append(recorddict_to_fitres(reply.content, keep_input=True).metrics["fit-count"])
    assert counts == [1, 2, 3]
    assert CLIENT_STATE_RECORD in ctx.state.array_records
    other = app(_fit_message(params), _context(partition_id=5))
    assert recorddict_to_fitres(other.content, keep_input=True).metrics["fit-count"] == 1


def test_client_id_prefers_partition_id() -> None:
    assert client_id_of(_context(partition_id=5)) == 5
    ctx = Context(run_id=1, node_id=77, node_config={}, state=RecordDict(), run_config={})
    assert client_id_of(ctx) == 77


# ------------------------------------------------------------------------ strategy


def _proxy(node_id: int) -> ClientProxy:
    return GridClientProxy(node_id=node_id, grid=None, run_id=0)  # type: ignore[arg-type]


def _fitres(update: Arrays, n: int, status: str = "ok") -> FitRes:
    return FitRes(
        status=Status(Code.OK, "Success"),
        parameters=ndarrays_to_parameters(update),
        num_examples=n,
        metrics={METRIC_STATUS: status, "train-loss": float(n)},
    )


def test_strategy_validates_counts_and_averages() -> None:
    ref = [np.ones(3, np.float32), np.zeros(1, np.float32)]
    strategy = ValidatingFedAvg(initial_parameters=ref)
    u1 = [np.full(3, 1.0, np.float32), np.full(1, 1.0, np.float32)]
    u2 = [np.full(3, 4.0, np.float32), np.full(1, -2.0, np.float32)]
    results = [
        (_proxy(1), _fitres(u1, 10)),
        (_proxy(2), _fitres(u2, 30)),
        (_proxy(3), _fitres([np.full(3, np.nan, np.float32), u1[1]], 10)),
        (_proxy(4), _fitres([np.zeros(2, np.float32), u1[1]], 10)),
        (_proxy(5), _fitres([np.zeros(3, np.float32), np.zeros(1, np.float32)], 0, "declined")),
    ]
    params, metrics = strategy.aggregate_fit(1, results, [RuntimeError("boom")])
    assert params is not None
    new = parameters_to_ndarrays(params)
    np.testing.assert_allclose(new[0], 1.0 + (10 * 1.0 + 30 * 4.0) / 40)
    np.testing.assert_allclose(new[1], (10 * 1.0 + 30 * -2.0) / 40)
    stats = strategy.fit_stats[1]
    assert (stats.ok, stats.rejected, stats.declined, stats.failed) == (2, 2, 1, 1)
    assert metrics["clients-rejected"] == 2 and metrics["client-train-loss"] == pytest.approx(25)
    assert any("contains 3 NaN" in r for r in stats.rejections)
    assert any("shape-mismatch" in r or "has shape (2,)" in r for r in stats.rejections)


@pytest.mark.parametrize("optimizer", ["avg", "adam"])
def test_a_step_that_overflows_the_global_model_is_refused(optimizer: str) -> None:
    """Each update is finite, but the model plus the step is not a float32 any more: an inf
    model would be checkpointed and published, and every later round (and every resume)
    would train from it. The round is refused and the model, and the optimiser, kept."""
    from server.server_optimizer import ServerOptimizerSettings

    ref = [np.full(2, 3e38, np.float32)]
    strategy = ValidatingFedAvg(
        initial_parameters=ref,
        # Adam's step is about lr per coordinate, whatever the update: a huge lr overflows
        server_optimizer=ServerOptimizerSettings(
            kind=optimizer, lr=1.0 if optimizer == "avg" else 1e38
        ),
    )
    before = strategy.optimizer.state_dict()
    huge = [(_proxy(1), _fitres([np.full(2, 3e38, np.float32)], 5))]
    params, metrics = strategy.aggregate_fit(1, huge, [])
    assert params is None and metrics["updated"] is False
    stats = strategy.fit_stats[1]
    assert (stats.ok, stats.rejected) == (0, 1)
    assert "non-finite" in stats.rejections[-1]
    assert strategy.optimizer.state_dict() == before
    np.testing.assert_array_equal(strategy.current_parameters[0], ref[0])
    small = [(_proxy(1), _fitres([np.full(2, -1e38, np.float32)], 5))]
    params, _ = strategy.aggregate_fit(2, small, [])
    assert params is not None and np.all(np.isfinite(parameters_to_ndarrays(params)[0]))


def test_strategy_keeps_model_when_everything_is_rejected_and_clips_in_plain_mode() -> None:
    ref = [np.zeros(2, np.float32)]
    strategy = ValidatingFedAvg(initial_parameters=ref, update_clip_norm=1.0)
    bad = [(_proxy(1), _fitres([np.array([np.inf, 0], np.float32)], 5))]
    params, metrics = strategy.aggregate_fit(1, bad, [])
    assert params is None and metrics["updated"] is False
    big = [(_proxy(1), _fitres([np.array([30.0, 40.0], np.float32)], 5))]
    params, _ = strategy.aggregate_fit(2, big, [])
    assert params is not None
    np.testing.assert_allclose(parameters_to_ndarrays(params)[0], [0.6, 0.8], rtol=1e-6)


def _plain_round(
    updates: Sequence[Arrays], **strategy: Any
) -> tuple[npt.NDArray[np.floating], Mapping[str, Any]]:
    """The global model after one plain round (from zeros) of ``updates``, each weighing 1,
    and the round's metrics."""
    fedavg = ValidatingFedAvg(initial_parameters=[np.zeros(2, np.float64)], **strategy)
    results = [(_proxy(i + 1), _fitres(u, 1)) for i, u in enumerate(updates)]
    params, metrics = fedavg.aggregate_fit(1, results, [])
    assert params is not None
    return parameters_to_ndarrays(params)[0], metrics


#: Four honest updates of norms 1 to 4 along x, and one attacker's along -y, 10**6 times
#: the largest honest norm (finite, so validation lets it through).
_HONEST = [[np.array([float(a), 0.0])] for a in (1, 2, 3, 4)]
_ATTACKER = [np.array([0.0, -4e6])]


@pytest.mark.parametrize("multiple", [1.0, 3.0, 5.0])
def test_plain_fedavg_bounds_a_huge_update_by_a_multiple_of_the_rounds_median_norm(
    multiple: float,
) -> None:
    """Without SecAgg+ or user-level DP nothing bounded one device's update: finite, it moved
    the global model by update / cohort (here 8e5). Each update is now clipped to M times the
    round's median norm (the lower median of 1, 2, 3, 4, 4e6 is 3) before averaging: the
    attacker moves the model by exactly M x 3 / 5, the honest updates count as they are."""
    new, metrics = _plain_round([*_HONEST, _ATTACKER], update_clip_median_multiple=multiple)
    bound = multiple * 3.0
    honest_mean_share = (1 + 2 + 3 + 4) / 5  # the honest updates, unclipped, over the cohort
    clipped_honest = sum(max(0.0, a - bound) for a in (1, 2, 3, 4)) / 5  # M = 1 clips 4 to 3
    np.testing.assert_allclose(new, [honest_mean_share - clipped_honest, -bound / 5], rtol=1e-12)
    assert metrics["clients-clipped"] == 1 + sum(a > bound for a in (1, 2, 3, 4))
    assert metrics["update-clip-bound"] == pytest.approx(bound)
    assert metrics["clients-ok"] == 5


def test_the_median_clip_leaves_an_honest_round_as_it_was() -> None:
    honest = [*_HONEST, [np.array([-2.5, 1.5])]]
    off, off_metrics = _plain_round(honest, update_clip_median_multiple=0)
    new, metrics = _plain_round(honest)  # the default multiple
    np.testing.assert_array_equal(new, off)
    assert metrics["clients-clipped"] == 0 and off_metrics["clients-clipped"] == 0
    assert off_metrics["update-clip-bound"] == 0.0  # off: no bound applied


def test_median_clip_off_restores_the_unbounded_mean() -> None:
    new, metrics = _plain_round([*_HONEST, _ATTACKER], update_clip_median_multiple=0)
    np.testing.assert_allclose(new, [2.0, -8e5], rtol=1e-12)
    assert metrics["clients-clipped"] == 0


def test_a_fixed_update_clip_norm_wins_over_the_median_clip() -> None:
    new, metrics = _plain_round(
        [*_HONEST, _ATTACKER], update_clip_norm=2.0, update_clip_median_multiple=5.0
    )
    np.testing.assert_allclose(new, [(1 + 2 + 2 + 2) / 5, -2 / 5], rtol=1e-6)
    assert (metrics["clients-clipped"], metrics["update-clip-bound"]) == (3, 2.0)


def test_the_median_clip_of_one_or_two_updates() -> None:
    """One update is its own median: nothing to compare it with, so it stands (a one-client
    round's step is that client's update anyway). Of two, the lower median bounds the larger
    by the smaller's multiple (their mean would grow with the attacker and bound nothing)."""
    alone, metrics = _plain_round([_ATTACKER])
    np.testing.assert_array_equal(alone, _ATTACKER[0])
    assert metrics["clients-clipped"] == 0
    pair, metrics = _plain_round([_HONEST[0], _ATTACKER], update_clip_median_multiple=5.0)
    np.testing.assert_allclose(pair, [0.5, -2.5], rtol=1e-12)
    assert metrics["clients-clipped"] == 1


def test_a_median_of_zero_updates_zeroes_the_others() -> None:
    zero = [np.zeros(2)]
    new, metrics = _plain_round([zero, zero, _ATTACKER])
    np.testing.assert_array_equal(new, [0.0, 0.0])
    assert metrics["clients-clipped"] == 1


def test_the_median_clip_never_touches_a_secure_aggregate() -> None:
    """Under SecAgg+ the server sees only the sum (secagg-clipping-range bounds each value
    there): the aggregate is applied as unmasked, nothing counted as clipped."""
    fedavg = ValidatingFedAvg(
        initial_parameters=[np.zeros(2, np.float64)], secure_aggregation=True, min_cohort=2
    )
    aggregate = _fitres(_ATTACKER, 0)
    params, metrics = fedavg.aggregate_fit(1, [(_proxy(1), aggregate), (_proxy(2), aggregate)], [])
    assert params is not None
    np.testing.assert_array_equal(parameters_to_ndarrays(params)[0], _ATTACKER[0])
    assert (metrics["clients-clipped"], metrics["update-clip-bound"]) == (0, 0.0)
    assert "median" not in repr(fedavg) and "5x median" in repr(
        ValidatingFedAvg(initial_parameters=[np.zeros(2)])
    )


@pytest.mark.parametrize("multiple", [0.5, -1.0, math.nan, math.inf])
def test_a_bad_median_clip_multiple_is_refused(multiple: float) -> None:
    with pytest.raises(ConfigError, match=r"'update-clip-median-multiple' must be 0 \(off\)"):
        ValidatingFedAvg(initial_parameters=[np.zeros(2)], update_clip_median_multiple=multiple)
    with pytest.raises(ConfigError, match="update-clip-median-multiple"):
        ServerConfig.from_run_config({"update-clip-median-multiple": multiple})


def _evalres(loss: Any, n: Any, metrics: Mapping[str, Any] | None = None) -> EvaluateRes:
    return EvaluateRes(
        status=Status(Code.OK, "Success"), loss=loss, num_examples=n, metrics=dict(metrics or {})
    )


def test_means_of_clients_reporting_huge_example_counts_do_not_crash_the_round() -> None:
    """Two finite counts near the float range: their sum overflowed in math.fsum, and the
    OverflowError of aggregate_evaluate (or of aggregate_fit's metric means) ended the run."""
    strategy = ValidatingFedAvg(initial_parameters=[np.zeros(2, np.float32)])
    loss, metrics = strategy.aggregate_evaluate(
        1,
        [
            (_proxy(1), _evalres(1.0, 1e308, {"hr": 0.25})),
            (_proxy(2), _evalres(3.0, 1e308, {"hr": 0.75})),
        ],
        [],
    )
    assert loss == pytest.approx(2.0) and metrics["hr"] == pytest.approx(0.5)
    update = [np.full(2, 0.5, np.float32)]
    huge: Any = 1e308
    _, fit_metrics = strategy.aggregate_fit(
        1, [(_proxy(1), _fitres(update, huge)), (_proxy(2), _fitres(update, huge))], []
    )
    assert fit_metrics["client-train-loss"] == pytest.approx(1e308)


def test_the_fedavg_mean_holds_for_huge_example_counts() -> None:
    """Weights are finite and > 0, so the round is a weighted mean of finite updates. Their
    product with the update (or their sum) overflowed float64: two counts of 1e308 turned a
    mean update of 1.0 into 0 (the sum divided by an infinite total), and a count of 1e300
    made a finite mean look like a step off the float range, refusing the round."""
    strategy = ValidatingFedAvg(initial_parameters=[np.zeros(2, np.float32)])
    huge: Any = 1e308
    results = [
        (_proxy(1), _fitres([np.full(2, 0.5, np.float32)], huge)),
        (_proxy(2), _fitres([np.full(2, 1.5, np.float32)], huge)),
    ]
    params, _ = strategy.aggregate_fit(1, results, [])
    assert params is not None
    np.testing.assert_allclose(parameters_to_ndarrays(params)[0], 1.0)
    large: Any = 1e300
    results = [
        (_proxy(1), _fitres([np.full(2, 1e10, np.float32)], large)),
        (_proxy(2), _fitres([np.full(2, -1e10, np.float32)], 1)),
    ]
    params, _ = strategy.aggregate_fit(2, results, [])
    assert params is not None and strategy.fit_stats[2].ok == 2
    np.testing.assert_allclose(parameters_to_ndarrays(params)[0], 1.0 + 1e10, rtol=1e-6)


def test_plain_fedavg_caps_a_claimed_example_count_as_secagg_does(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A device's FedAvg weight is the count it claims. Under SecAgg+ it is capped at the
    round's max-weight (1 where DP clients weigh 1); in plain mode it was taken as sent, so
    one device claiming 10**12 examples made its update the whole round's step, and its
    epsilon the "mean device epsilon" the operator sees. The same cap holds in both modes."""
    from server.server_app import build_strategy

    def aggregate(values: Mapping[str, Any]) -> tuple[float, Mapping[str, float]]:
        config = ServerConfig.from_run_config({"secagg": False, **values})
        strategy = build_strategy(config, [np.zeros(2, np.float32)])
        honest = [(_proxy(i), _fitres([np.full(2, 1.0, np.float32)], 1)) for i in range(1, 4)]
        liar = _fitres([np.full(2, -1.0, np.float32)], 10**12)
        params, _ = strategy.aggregate_fit(1, [*honest, (_proxy(9), liar)], [])
        assert params is not None
        return float(parameters_to_ndarrays(params)[0][0]), strategy.fit_stats[1].client_metrics

    # DP student clients weigh 1 (max-weight 1): the plain mean of the four updates
    step, metrics = aggregate({"task": STUDENT_TASK, "dp": True})
    assert step == pytest.approx(0.5)
    assert metrics["train-loss"] == pytest.approx((3 * 1.0 + 1e12) / 4)
    # without DP, counts up to secagg-max-weight: the liar weighs 1000, not 10**12
    with flower_log(caplog, logging.WARNING):
        step, _ = aggregate({"dp": False, "secagg-max-weight": 1000.0})
    assert step == pytest.approx((3 - 1000) / 1003)
    assert "1 client(s) reported more examples than max-weight 1000" in caplog.text


def test_federated_evaluation_caps_a_claimed_example_count() -> None:
    """Every device evaluates one held-out event (num_examples 1); one claiming 10**12 made
    its loss and HR@10 the round's validation figures. Weights are capped as in fit."""
    from server.server_app import build_strategy

    config = ServerConfig.from_run_config({"task": STUDENT_TASK, "dp": True})
    strategy = build_strategy(config, [np.zeros(2, np.float32)])
    honest = [(_proxy(i), _evalres(2.0, 1, {"full_hr@10": 0.0})) for i in range(1, 4)]
    liar = (_proxy(9), _evalres(0.0, 10**12, {"full_hr@10": 1.0}))
    loss, metrics = strategy.aggregate_evaluate(1, [*honest, liar], [])
    assert loss == pytest.approx(1.5) and metrics["full_hr@10"] == pytest.approx(0.25)


def test_a_client_cannot_flood_the_round_stats_with_metric_keys() -> None:
    """Every numeric metric a client sends becomes a round statistic (``client-KEY``), kept
    for the whole run, written into every checkpoint and the progress file, and logged in
    Flower's history: one client sending 10,000 keys, or a key of a megabyte, made each of
    them that large. A reply's first few short keys are kept; the honest ones stay."""
    strategy = ValidatingFedAvg(initial_parameters=[np.zeros(2, np.float32)])
    update = [np.full(2, 0.5, np.float32)]
    flood = _fitres(update, 1)
    flood.metrics.update({f"junk-{i}": float(i) for i in range(10_000)})
    flood.metrics["k" * 1_000_000] = 1.0
    _, metrics = strategy.aggregate_fit(
        1, [(_proxy(1), _fitres(update, 1)), (_proxy(2), flood)], []
    )
    stats = strategy.fit_stats[1]
    assert stats.client_metrics["train-loss"] == pytest.approx(1.0)
    assert len(stats.client_metrics) <= 64 and len(metrics) < 80
    assert max(map(len, stats.client_metrics)) <= 100
    _, evaluated = strategy.aggregate_evaluate(
        1,
        [(_proxy(1), _evalres(1.0, 1, {"hr": 0.5})), (_proxy(2), _evalres(1.0, 1, flood.metrics))],
        [],
    )
    assert evaluated["hr"] == pytest.approx(0.5) and len(evaluated) < 80


def test_a_client_metric_cannot_overwrite_the_evaluation_counts() -> None:
    """The evaluation's metrics (Flower's history, logged at the end of the run) held the
    clients' metric means after the server's counts, so a client reporting a metric named
    ``clients-failed`` replaced the count of failed clients with its number."""
    strategy = ValidatingFedAvg(initial_parameters=[np.zeros(2, np.float32)])
    forged = {"clients-failed": 0.0, "clients-ok": 1000.0, "hr": 0.5}
    _, metrics = strategy.aggregate_evaluate(
        1, [(_proxy(1), _evalres(1.0, 1, forged)), (_proxy(2), _evalres(math.nan, 1))], []
    )
    assert (metrics["clients-ok"], metrics["clients-failed"]) == (1, 1)
    assert metrics["hr"] == pytest.approx(0.5)


def test_a_reply_with_a_list_for_a_number_is_counted_not_fatal() -> None:
    """A MetricRecord value may be a list: a client (buggy or hostile) sending its loss, or
    under SecAgg+ its num_examples, as one made float() / sum() raise TypeError in the
    strategy, ending the run. The evaluation counts it as failed; the secure round goes on."""
    strategy = ValidatingFedAvg(initial_parameters=[np.zeros(2, np.float32)])
    listed: Any = [1.0]
    loss, metrics = strategy.aggregate_evaluate(
        1, [(_proxy(1), _evalres(listed, 3)), (_proxy(2), _evalres(2.0, 3))], []
    )
    assert loss == pytest.approx(2.0)
    assert (metrics["clients-ok"], metrics["clients-failed"]) == (1, 1)
    # counted failed with a reason (there was none: a failure nothing explained)
    (reason,) = strategy.eval_stats[1].failures
    assert reason.startswith("node 1: loss [1.0] with 3 example(s)"), reason
    secure = ValidatingFedAvg(initial_parameters=[np.zeros(2, np.float32)], secure_aggregation=True)
    mean = [np.full(2, 0.5, np.float32)]
    odd = FitRes(Status(Code.OK, "Success"), ndarrays_to_parameters(mean), listed, {})
    params, fit_metrics = secure.aggregate_fit(
        1, [(_proxy(1), odd), (_proxy(2), _fitres(mean, 0))], []
    )
    assert params is not None and fit_metrics["clients-ok"] == 2
    np.testing.assert_allclose(parameters_to_ndarrays(params)[0], 0.5)


def test_a_secure_round_reports_no_client_metrics_whatever_a_client_sends() -> None:
    """Under SecAgg+ every honest client's mod strips its fit metrics and count (0, only the
    status), so what a reply still carries comes from a client without it: its numbers were
    the round's "client metrics", and its epsilon the "mean device epsilon" of the operator's
    progress line, which the README says is n/a under SecAgg+. They are left out."""
    from server.deploy_app import round_record

    secure = ValidatingFedAvg(initial_parameters=[np.zeros(2, np.float32)], secure_aggregation=True)
    mean = [np.full(2, 0.5, np.float32)]
    honest = FitRes(Status(Code.OK, "Success"), ndarrays_to_parameters(mean), 0, {})
    forged = FitRes(
        Status(Code.OK, "Success"), ndarrays_to_parameters(mean), 7, {"epsilon": 0.0001}
    )
    params, _ = secure.aggregate_fit(1, [(_proxy(1), honest), (_proxy(2), forged)], [])
    assert params is not None
    stats = secure.fit_stats[1]
    assert stats.client_metrics == {} and stats.num_examples == 0
    report = RoundReport(1, parameters_to_ndarrays(params), stats, None, 1.0, 1.0)
    assert round_record(report, 3)["epsilon_record_mean"] is None


def test_strategy_rejects_unusable_initial_parameters() -> None:
    with pytest.raises(InvalidUpdateError, match="initial parameters array 0 has dtype int64"):
        ValidatingFedAvg(initial_parameters=[np.zeros(2, np.int64)])


# ------------------------------------------------------------- in-process federation


def test_plain_federation_converges_with_five_clients() -> None:
    reports = _run({"num-rounds": 2, "toy-local-steps": 5}, num_nodes=5)
    assert [r.server_round for r in reports] == [1, 2]
    assert all(r.fit.ok == 5 and r.fit.failed == 0 for r in reports)
    losses = [r.evaluate.loss for r in reports if r.evaluate is not None]
    initial = float(
        np.mean(
            [
                ToyLinearTask().evaluate(c, ToyLinearTask().initial_parameters(), {}).loss
                for c in range(5)
            ]
        )
    )
    assert losses[0] is not None and losses[1] is not None
    assert losses[1] < losses[0] < initial


def test_round_aggregate_equals_weighted_fedavg() -> None:
    task = ToyLinearTask()
    reports = _run({"num-rounds": 1, "eval-fraction": 0.0}, num_nodes=5)
    expected = _expected_fedavg(task, range(5), task.initial_parameters())
    assert _max_diff(reports[0].parameters, expected) < 1e-5
    assert reports[0].evaluate is None


@pytest.mark.parametrize("secagg", [False, True])
def test_erroring_client_does_not_stop_the_round(secagg: bool) -> None:
    task = ToyLinearTask()
    reports = _run(
        {"num-rounds": 2, "secagg": secagg, "secagg-timeout": 10.0, "toy-empty-clients": "1"},
        num_nodes=5,
    )
    assert len(reports) == 2
    first = reports[0]
    assert (first.fit.ok, first.fit.failed, first.fit.updated) == (4, 1, True)
    assert "fedrec fit failed: data: " in first.fit.failures[0]
    assert first.evaluate is not None and first.evaluate.failed == 1
    expected = _expected_fedavg(task, [0, 2, 3, 4], task.initial_parameters())
    assert _max_diff(first.parameters, expected) < _secagg_tolerance(task, [0, 2, 3, 4], 8.0, 2**22)


@pytest.mark.parametrize("secagg", [False, True])
def test_declined_client_is_neutral(secagg: bool) -> None:
    task = ToyLinearTask()
    reports = _run(
        {"num-rounds": 1, "secagg": secagg, "eval-fraction": 0.0, "toy-decline-clients": "0"},
        num_nodes=4,
    )
    assert (reports[0].fit.declined, reports[0].fit.ok) == (1, 3)
    expected = _expected_fedavg(task, [1, 2, 3], task.initial_parameters())
    assert _max_diff(reports[0].parameters, expected) < _secagg_tolerance(
        task, [1, 2, 3], 8.0, 2**22
    )


def test_a_client_that_declines_evaluation_is_counted_apart_from_failures() -> None:
    reports = _run(
        {"num-rounds": 1, "toy-decline-clients": "0", "toy-empty-clients": "1"}, num_nodes=5
    )
    evaluation = reports[0].evaluate
    assert evaluation is not None
    assert (evaluation.ok, evaluation.declined, evaluation.failed) == (3, 1, 1)
    task = ToyLinearTask()
    served = reports[0].parameters
    outcomes = [task.evaluate(c, served, {}) for c in (2, 3, 4)]
    expected = sum(o.loss * o.num_examples for o in outcomes) / sum(
        o.num_examples for o in outcomes
    )
    assert evaluation.loss == pytest.approx(expected, rel=1e-5)  # the decline weighs nothing


def test_a_secure_aggregate_of_one_client_is_discarded() -> None:
    """The others declined, in the clear: the masked "sum" was one device's own update, and
    the server applied it (a device audit saw clients 1/3 ok, updated)."""
    task = ToyLinearTask()
    reports = _run(
        {"num-rounds": 1, "secagg": True, "eval-fraction": 0.0, "toy-decline-clients": "0,1"},
        num_nodes=3,
    )
    fit = reports[0].fit
    assert fit.declined == 2 and not fit.updated
    assert any("fewer than 2 (min-cohort)" in r for r in fit.rejections)
    assert _max_diff(reports[0].parameters, task.initial_parameters()) == 0.0


def test_a_secagg_round_where_every_client_declines_keeps_the_model_quietly(
    recwarn: pytest.WarningsRecorder,
) -> None:
    """Flower's unmask stage divided by the zero total weight and numpy printed a
    RuntimeWarning in the middle of the run's output."""
    task = ToyLinearTask()
    reports = _run(
        {"num-rounds": 1, "secagg": True, "eval-fraction": 0.0, "toy-decline-clients": "0,1,2"},
        num_nodes=3,
    )
    assert (reports[0].fit.declined, reports[0].fit.ok) == (3, 0)
    assert _max_diff(reports[0].parameters, task.initial_parameters()) == 0.0
    assert not [w for w in recwarn if issubclass(w.category, RuntimeWarning)]


def test_cohort_sampling_by_count_is_seeded() -> None:
    config: RunConfig = {"num-rounds": 2, "cohort-size": 3, "eval-size": 2, "seed": 7}
    first, second = _run(config, num_nodes=6), _run(config, num_nodes=6)
    assert [r.fit.sampled for r in first] == [3, 3]
    assert [r.evaluate.sampled for r in first if r.evaluate] == [2, 2]
    assert _max_diff(first[-1].parameters, second[-1].parameters) == 0.0


def test_the_python_api_refuses_a_misspelt_key_as_the_cli_does() -> None:
    """A misspelt client setting given to make_server_app or run_in_process was ignored (the
    clients trained with its default), where `fedrec server start` and `fedrec simulate`
    refuse it naming the key meant."""
    with pytest.raises(
        ConfigError, match=r"unknown run_config key 'local-epoch'; did you mean local-epochs"
    ):
        make_server_app({"task": "toy-linear", "local-epoch": 2})  # before any run
    with pytest.raises(ConfigError, match=r"unknown run_config key 'toy-dimm'.*toy-dim"):
        run_in_process(make_server_app(), make_client_app(), 2, run_config={"toy-dimm": 3})
    # the task is the context's: refused when the run starts, before any round
    reports: list[RoundReport] = []
    with pytest.raises(ConfigError, match=r"unknown run_config key 'noise-multiplyer'"):
        run_in_process(
            make_server_app({"noise-multiplyer": 2.0}, on_round_end=reports.append),
            make_client_app(),
            2,
            run_config={"num-rounds": 1},
        )
    assert reports == []
    # a custom task may read keys of its own
    make_server_app({"task": "shared.federated.task:ToyLinearTask.from_run_config", "mine": 1})
    make_client_app({"task": "shared.federated.task:ToyLinearTask.from_run_config", "mine": 1})
    # the clients' own settings (make_client_app) too: at once when they name the task ...
    with pytest.raises(ConfigError, match=r"unknown run_config key 'local-epoch'"):
        make_client_app({"task": "toy-linear", "local-epoch": 2})
    # ... else in each reply: every client fails (its log names the key); nothing is trained
    reports: list[RoundReport] = []
    run_in_process(
        make_server_app({"num-rounds": 1, "eval-fraction": 0.0}, on_round_end=reports.append),
        make_client_app({"lr-typo": 0.1}),
        3,
    )
    (report,) = reports
    assert report.fit.ok == 0 and not report.fit.updated
    assert all("fedrec fit failed: config: " in f for f in report.fit.failures)


def test_in_process_nodes_get_a_context_only_once_they_get_a_message(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Every node's context (and its copy of the run config) was made up front: 2.3 KB per
    node, 47 MB for 20,000 nodes, for nodes most rounds never reach. One is made on a node's
    first message, and kept for its next ones."""
    made: list[int] = []

    def counted(**kwargs: Any) -> Context:
        made.append(kwargs["node_id"])
        return Context(**kwargs)

    monkeypatch.setattr(server_app_module, "Context", counted)

    def app(message: Message, context: Context) -> Message:
        records = context.state.config_records
        count = int(records.get("seen", ConfigRecord({"n": 0}))["n"]) + 1  # type: ignore[arg-type]
        records["seen"] = ConfigRecord({"n": count})
        seen = ConfigRecord({"n": count, **context.node_config})
        return Message(RecordDict({"seen": seen}), reply_to=message)

    grid = InProcessGrid(app, 10_000, run_config={"k": 1}, max_workers=2)  # type: ignore[arg-type]
    try:
        node = SIMULATED_NODE_ID_BASE + 7
        assert len(list(grid.get_node_ids())) == 10_000 and made == []
        for expected in (1, 2):
            message = Message(RecordDict(), node, "query", group_id="1")
            (reply,) = grid.send_and_receive([message])
            seen = reply.content.config_records["seen"]
            assert (seen["n"], seen["partition-id"], seen["num-partitions"]) == (
                expected,
                7,
                10_000,
            )
        assert made == [node]
        assert grid.node_context(node).run_config == {"k": 1}
        with pytest.raises(ValueError, match="unknown node id"):
            grid.push_messages([Message(RecordDict(), SIMULATED_NODE_ID_BASE + 10_000, "query")])
    finally:
        grid.close()


def test_run_in_process_judges_keys_by_the_task_the_apps_were_built_with() -> None:
    """Apps built for a custom task (make_server_app / make_client_app with its name) ran
    with a run_config of that task's own keys; run_in_process judged them by toy-linear,
    as its run_config names no task, and refused a key the custom task reads."""
    custom = "shared.federated.task:ToyLinearTask.from_run_config"
    apps = {"task": custom, "num-rounds": 1, "eval-fraction": 0.0}
    reports: list[RoundReport] = []
    run_in_process(
        make_server_app(apps, on_round_end=reports.append),
        make_client_app(apps),
        2,
        run_config={"my-setting": 1},
    )
    assert len(reports) == 1
    # a built-in task named by the server app: still refused
    with pytest.raises(ConfigError, match=r"unknown run_config key 'toy-dimm'"):
        run_in_process(
            make_server_app({"task": "toy-linear"}),
            make_client_app(),
            2,
            run_config={"toy-dimm": 3},
        )


def test_round_hook_failure_stops_the_run() -> None:
    def hook(report: RoundReport) -> None:
        raise OSError(f"disk full while checkpointing round {report.server_round}")

    with pytest.raises(OSError, match="disk full while checkpointing round 1"):
        run_in_process(make_server_app({"num-rounds": 3}, on_round_end=hook), make_client_app(), 3)


def test_secagg_aggregate_matches_plain_fedavg_within_quantization_error() -> None:
    task = ToyLinearTask()
    base: RunConfig = {"num-rounds": 1, "eval-fraction": 0.0, "secagg-clipping-range": 8.0}
    plain = _run({**base, "secagg": False}, num_nodes=5)[0]
    secure = _run({**base, "secagg": True}, num_nodes=5)[0]
    assert secure.fit.secure_aggregation and secure.fit.ok == 5
    # Nothing per-client leaks next to the masked vectors.
    assert secure.fit.client_metrics == {} and secure.fit.num_examples == 0
    assert plain.fit.client_metrics["train-loss"] > 0 and plain.fit.num_examples > 0
    tol = _secagg_tolerance(task, range(5), 8.0, 2**22)
    assert _max_diff(secure.parameters, [p.astype(np.float64) for p in plain.parameters]) < tol
    assert _max_diff(plain.parameters, secure.parameters) > 0  # it did go through SecAgg+


@pytest.mark.parametrize("secure", [False, True])
def test_a_round_parses_every_npy_header_one_at_a_time(
    secure: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """numpy parses an ``.npy`` header with ``ast.literal_eval``, which two of a
    simulation's threads (server and clients, one interpreter) can break by parsing at once
    (CPython 3.11: "AST constructor recursion depth mismatch"): every parse in a round,
    the ClientApp's, the SecAgg+ mod's and the strategy's, goes through
    :func:`server.npy.load_npy`'s lock."""
    from server import npy

    unlocked: list[str] = []
    parse = ast.literal_eval

    def checked(node_or_string: Any) -> Any:
        if not npy._PARSE_LOCK.locked():
            unlocked.append(str(node_or_string)[:80])
        return parse(node_or_string)

    monkeypatch.setattr(ast, "literal_eval", checked)
    npy._layout.cache_clear()
    config: RunConfig = {"num-rounds": 1, "eval-fraction": 0.5, "secagg": secure}
    assert _run(config, num_nodes=5)[0].fit.ok == 5
    assert unlocked == []


def _dropout_mod(clients: set[int], stage: str) -> Callable[..., Message]:
    """Client mod that makes ``clients`` fail in the given SecAgg+ stage."""

    def mod(
        msg: Message, ctx: Context, call_next: Callable[[Message, Context], Message]
    ) -> Message:
        records = msg.content.config_records if msg.has_content() else {}
        if (
            SECAGG_RECORD in records
            and client_id_of(ctx) in clients
            and records[SECAGG_RECORD].get("stage") == stage
        ):
            raise ConnectionError(f"client {client_id_of(ctx)} dropped in {stage}")
        return call_next(msg, ctx)

    return mod


@pytest.mark.parametrize("stage", ["setup", "share_keys"])
@pytest.mark.parametrize("dropped", [{1}, {1, 4}])
def test_secagg_early_dropouts_leave_the_survivor_aggregate(
    stage: str, dropped: set[int], caplog: pytest.LogCaptureFixture
) -> None:
    # Flower 1.42 alone halts here (KeyError on every survivor in the unmask stage);
    # EarlyDropoutTolerantSecAggPlusWorkflow forgets clients that never sent masks.
    task = ToyLinearTask()
    config: RunConfig = {"num-rounds": 1, "secagg": True, "eval-fraction": 0.0}
    with caplog.at_level("WARNING"):
        reports = _run(config, num_nodes=6, extra_mods=[_dropout_mod(dropped, stage)])
    # the log names every dropped node and why (an operator had only a count)
    (line,) = [r.getMessage() for r in caplog.records if "dropped before sending" in r.getMessage()]
    for client in dropped:
        assert f"client {client} dropped in {stage}" in line
    assert line.count("(error: ") == len(dropped)
    survivors = [c for c in range(6) if c not in dropped]
    assert (reports[0].fit.ok, reports[0].fit.failed) == (len(survivors), len(dropped))
    expected = _expected_fedavg(task, survivors, task.initial_parameters())
    tol = _secagg_tolerance(task, survivors, 8.0, 2**22)
    assert _max_diff(reports[0].parameters, expected) < tol


def test_a_client_error_text_cannot_write_lines_or_escapes_into_the_server_log(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A client's error reply carries any text it likes, and the server logs it (a SecAgg+
    dropout's cause): a newline and ANSI escapes in it forged a log line of the server's
    own, and took over the operator's terminal. They are logged escaped, on one line."""
    evil = "oops\nINFO :      round 1 done: all ok\x1b[2J\x1b]0;owned\x07\u202e"

    def hostile(
        msg: Message, ctx: Context, call_next: Callable[[Message, Context], Message]
    ) -> Message:
        records = msg.content.config_records if msg.has_content() else {}
        if client_id_of(ctx) == 1 and SECAGG_RECORD in records:
            error = Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=evil)
            return Message(error, reply_to=msg)
        return call_next(msg, ctx)

    config: RunConfig = {"num-rounds": 1, "secagg": True, "eval-fraction": 0.0}
    with flower_log(caplog, logging.WARNING):
        _run(config, num_nodes=4, extra_mods=[hostile])
    (line,) = [r.getMessage() for r in caplog.records if "dropped before sending" in r.getMessage()]
    assert "oops\\nINFO" in line and "\\x1b[2J" in line, line
    assert line.isprintable(), line


def test_secagg_dropout_in_unmask_stage_keeps_its_masked_update() -> None:
    # A client that already sent its masked vector and then drops is still summed:
    # its private mask is removed with the shares its neighbours hold.
    task = ToyLinearTask()
    config: RunConfig = {"num-rounds": 1, "secagg": True, "eval-fraction": 0.0}
    reports = _run(config, num_nodes=6, extra_mods=[_dropout_mod({2}, "unmask")])
    assert reports[0].fit.updated
    # it counts once, as a contributor: its later error is not a second client failing
    fit = reports[0].fit
    assert (fit.sampled, fit.ok, fit.failed) == (6, 6, 0), fit
    assert any("unmask" in reason for reason in fit.failures), fit.failures
    expected = _expected_fedavg(task, range(6), task.initial_parameters())
    assert _max_diff(reports[0].parameters, expected) < _secagg_tolerance(
        task, range(6), 8.0, 2**22
    )


def test_secagg_dropouts_past_timeout_in_collect_stage_up_to_threshold() -> None:
    # num-shares 5 / threshold 3 with 6 clients: every client keeps >= 3 live neighbours
    # when 2 clients sleep past the stage timeout after the key exchange.
    task = ToyLinearTask()
    config: RunConfig = {
        "num-rounds": 1,
        "secagg": True,
        "secagg-timeout": 1.0,
        "eval-fraction": 0.0,
        "toy-sleep-clients": "2,5",
        "toy-sleep-s": 2.5,
    }
    reports = _run(config, num_nodes=6)
    survivors = [0, 1, 3, 4]
    assert (reports[0].fit.ok, reports[0].fit.failed, reports[0].fit.updated) == (4, 2, True)
    expected = _expected_fedavg(task, survivors, task.initial_parameters())
    assert _max_diff(reports[0].parameters, expected) < _secagg_tolerance(
        task, survivors, 8.0, 2**22
    )


def test_secagg_timeout_zero_waits_for_every_stage_whatever_the_round_timeout() -> None:
    # secagg-timeout 0 means no timeout for the SecAgg+ stages (training happens in one):
    # round-timeout bounds the plain fit/evaluate replies only, and a slow client is
    # still summed instead of being dropped after round-timeout seconds.
    config: RunConfig = {
        "num-rounds": 1,
        "secagg": True,
        "secagg-timeout": 0,
        "round-timeout": 0.5,
        "eval-fraction": 0.0,
        "toy-sleep-clients": "2",
        "toy-sleep-s": 1.5,
    }
    fit = _run(config, num_nodes=5)[0].fit
    assert (fit.ok, fit.failed, fit.updated) == (5, 0, True), fit


def test_a_client_masking_with_flowers_32_bit_generator_counts_as_a_dropout() -> None:
    # a client app that does not draw its masks from the whole seed (one that never saw
    # the server's request for them) would turn the unmasked sum into noise; it is dropped
    # and its pairwise masks on the others' vectors removed (they are the full-seed ones)
    def old_client_1(msg: Message, ctx: Context, call_next: Any) -> Message:
        if msg.has_content() and client_id_of(ctx) == 1:
            msg.content.config_records.pop(secagg_module.MASKS_RECORD, None)
        return call_next(msg, ctx)

    task = ToyLinearTask()
    config: RunConfig = {"num-rounds": 1, "secagg": True, "eval-fraction": 0.0}
    report = _run(config, num_nodes=6, extra_mods=[old_client_1])[0]
    assert (report.fit.ok, report.fit.failed) == (5, 1), report.fit
    assert "generator the server unmasks with" in report.fit.failures[0]
    survivors = [0, 2, 3, 4, 5]
    expected = _expected_fedavg(task, survivors, task.initial_parameters())
    tol = _secagg_tolerance(task, survivors, 8.0, 2**22)
    assert _max_diff(report.parameters, expected) < tol


def _halted_secagg_round(extra: RunConfig | None = None) -> RoundReport:
    """One SecAgg+ round of 5 clients with threshold 4, two of which drop at share_keys: too
    many for the unmasking, so it halts."""
    config: RunConfig = {
        "num-rounds": 1,
        "secagg": True,
        "secagg-num-shares": 5,
        "secagg-reconstruction-threshold": 4,
        "eval-fraction": 0.0,
        **(extra or {}),
    }
    return _run(config, num_nodes=5, extra_mods=[_dropout_mod({0, 1}, "share_keys")])[0]


def test_secagg_halts_and_keeps_model_when_too_many_drop() -> None:
    report = _halted_secagg_round()
    assert report.fit.updated is False and report.fit.ok == 0
    assert "secure aggregation halted" in report.fit.failures[0]
    for arr in report.parameters:
        assert not np.any(arr)  # still the initial (zero) model


def test_secagg_halted_under_user_dp_releases_the_noise_alone() -> None:
    """The round was charged and its cohort asked: an exactly unchanged model would be an
    output no noise covers, so the halted round applies the mechanism's noise alone."""
    report = _halted_secagg_round(
        {"user-dp": True, "user-dp-clip": 0.5, "user-dp-epsilon-budget": 0.0, "toy-dim": 4000}
    )
    fit = report.fit
    assert fit.updated is True and fit.ok == 0
    assert "secure aggregation halted" in fit.failures[0]
    noise = np.concatenate([a.ravel() for a in report.parameters]).astype(np.float64)
    assert float(np.std(noise)) == pytest.approx(1.0 * 0.5 / 5, rel=0.05)


def test_user_dp_secagg_sums_only_the_weights_it_unmasked(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Under user-level DP the SecAgg+ mean was turned back into a sum as mean x k, k the
    replies not declined: a client whose reply says ok but whose masked weight is 0 (a
    modified client; the plain path rejects such a reply) added nothing to the mean yet
    was counted, so the honest updates' sum was scaled by k / (k - 1), each honest user's
    influence above the clip C the noise is calibrated to. The sum is now the mean times
    the weights the unmasked sum holds: the honest updates, as the plain path sums them."""
    from flwr.app import MetricRecord
    from flwr.compat.common.recorddict_compat import recorddict_to_fitres

    from server.user_dp import UserLevelDP

    sent: list[Arrays] = []
    honest_unit_weight = secagg_module._report_unit_weight

    def first_weighs_nothing(content: RecordDict) -> None:
        honest_unit_weight(content)
        update = parameters_to_ndarrays(recorddict_to_fitres(content, keep_input=True).parameters)
        if not sent:  # the first reply: status ok, weight 0
            content.metric_records[secagg_module.FITRES_NUM_EXAMPLES] = MetricRecord(
                {"num_examples": 0}
            )
        sent.append(update)

    sums: list[list[npt.NDArray[np.floating]]] = []
    noisy_mean = UserLevelDP.noisy_mean

    def recorded(self: UserLevelDP, update_sum: Any, cohort: int) -> Any:
        sums.append([np.array(a, dtype=np.float64) for a in update_sum])
        return noisy_mean(self, update_sum, cohort)

    monkeypatch.setattr(secagg_module, "_report_unit_weight", first_weighs_nothing)
    monkeypatch.setattr(UserLevelDP, "noisy_mean", recorded)
    config: RunConfig = {
        "num-rounds": 1,
        "eval-fraction": 0.0,
        "secagg": True,
        "user-dp": True,
        "user-dp-clip": 0.5,
        "user-dp-epsilon-budget": 0.0,
        "cohort-size": 5,
    }
    report = _run(config, num_nodes=5)[0]
    assert report.fit.updated and len(sent) == 5 and len(sums) == 1
    honest = [sum(u[i].astype(np.float64) for u in sent[1:]) for i in range(len(sent[0]))]
    assert _max_diff(sums[0], honest) < 5 * 4 * 2 * 8.0 / 2**22  # a step per client
    assert "weights adding up to 4, but 5 client(s) replied ok" in caplog.text


def test_secagg_clipping_range_bounds_a_malicious_client() -> None:
    task = ToyLinearTask()
    params = task.initial_parameters()
    clip = 1.0
    base: RunConfig = {
        "num-rounds": 1,
        "eval-fraction": 0.0,
        "toy-malicious-clients": "0",
        "toy-malicious-value": 1e6,
        "secagg-clipping-range": clip,
    }
    plain = _run({**base, "secagg": False, "update-clip-median-multiple": 0}, num_nodes=5)[0]
    secure = _run({**base, "secagg": True}, num_nodes=5)[0]
    honest = _expected_fedavg(task, range(1, 5), params)
    # Without SecAgg+ clipping (or the plain path's median clip) the attacker moves the
    # model by ~1e6 * its weight share.
    assert _max_diff(plain.parameters, honest) > 1e4
    # With it, each client adds clip(r_i * u_i, +-c) / sum(r): the attacker's pull is at
    # most (c + |r_0 * honest|) / sum(r) per coordinate.
    r = np.array([task.num_examples(c) for c in range(5)]) / 1000.0
    bound = 2 * clip / r.sum()
    assert _max_diff(secure.parameters, honest) < bound
    # ...and the result is exactly the clipped weighted sum (within quantization).
    attacked = ToyLinearTask.from_run_config(base)
    values, deltas = [], []
    for c in range(5):
        out = attacked.fit(c, params, {})
        delta = [
            (a.astype(np.float32) - p).astype(np.float64)
            for a, p in zip(out.arrays, params, strict=True)
        ]
        deltas.append(delta)
        values.append([np.clip(r[c] * d, -clip, clip) for d in delta])
    expected = [sum(v[i] for v in values) / r.sum() for i in range(len(params))]
    assert _max_diff(secure.parameters, expected) < _secagg_tolerance(task, range(5), clip, 2**22)
    # Plain mode by default: each update clipped to 5 x the round's median norm, then the
    # weighted mean (weights r): the attacker's pull is at most r_0 x 5 x median / sum(r).
    bounded = _run({**base, "secagg": False}, num_nodes=5)[0]
    median_bound = median_clip_bound([l2_norm(d) for d in deltas], 5.0)
    kept = [clip_update_l2(d, median_bound)[0] for d in deltas]
    mean = [sum(r[c] * kept[c][i] for c in range(5)) / r.sum() for i in range(len(params))]
    assert (bounded.fit.clipped, bounded.fit.clip_bound) == (1, pytest.approx(median_bound))
    new = [p + m for p, m in zip(params, mean, strict=True)]
    assert _max_diff(bounded.parameters, new) < 1e-5


def _client_0_reports_weight(monkeypatch: pytest.MonkeyPatch, weight: float) -> Any:
    """Make the toy client 0 report ``weight`` examples with its honest update; returns the
    honest ``fit``."""
    honest_fit = ToyLinearTask.fit

    def reweighted(self: ToyLinearTask, cid: int, p: Arrays, config: Any) -> FitOutcome:
        out = honest_fit(self, cid, p, config)
        if cid == 0:
            return FitOutcome.with_parameters(out.arrays, weight, out.metrics)  # type: ignore[arg-type]
        return out

    monkeypatch.setattr(ToyLinearTask, "fit", reweighted)
    return honest_fit


@pytest.mark.parametrize("weight", [1_023_835, float("nan")])
def test_secagg_caps_a_clients_weight_at_max_weight(
    monkeypatch: pytest.MonkeyPatch, weight: float
) -> None:
    """A client that reported num_examples 1,023,835 (an honest update) wrapped the summed
    weight mod 2**32: the aggregate left the clipping bound ~100-fold (max |coord| 8340).
    Its weight is capped at secagg-max-weight (1000) before masking, so the result is the
    clipped sum with weight 1 for it; a NaN weight counts as 0."""
    task = ToyLinearTask()
    params = task.initial_parameters()
    honest_fit = _client_0_reports_weight(monkeypatch, weight)
    report = _run({"num-rounds": 1, "eval-fraction": 0.0, "secagg": True}, num_nodes=5)[0]
    clip = 8.0
    r = np.array([task.num_examples(c) for c in range(5)]) / 1000.0
    r[0] = 1.0 if weight == weight else 0.0  # capped at max_weight / max_weight; NaN: 0
    deltas = []
    for c in range(5):
        out = honest_fit(task, c, params, {})
        deltas.append(
            [
                (a.astype(np.float32) - q).astype(np.float64)
                for a, q in zip(out.arrays, params, strict=True)
            ]
        )
    expected = [
        params[i] + sum(np.clip(r[c] * deltas[c][i], -clip, clip) for c in range(5)) / r.sum()
        for i in range(len(params))
    ]
    assert _max_diff(report.parameters, expected) < _secagg_tolerance(task, range(5), clip, 2**22)


@pytest.mark.parametrize("weight", [float("nan"), float("inf")])
def test_a_non_finite_weight_is_rejected_before_aggregation(
    monkeypatch: pytest.MonkeyPatch, weight: float
) -> None:
    """num_examples NaN passed the `<= 0` check and made the global model NaN."""
    _client_0_reports_weight(monkeypatch, weight)
    report = _run({"num-rounds": 1, "eval-fraction": 0.0, "secagg": False}, num_nodes=4)[0]
    assert (report.fit.ok, report.fit.rejected) == (3, 1)
    assert any(
        f"num_examples is {weight}, expected a number > 0" in r for r in report.fit.rejections
    )
    assert all(np.isfinite(a).all() for a in report.parameters)


def test_a_fractional_secagg_cohort_is_capped_at_what_the_modulus_holds(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """cohort-fraction 0.5 of 8 clients is 4, one more than this modulus holds (3): the run
    crashed in the first round that saw that many clients; the cohort is capped instead."""
    config: RunConfig = {
        "num-rounds": 1,
        "eval-fraction": 0.0,
        "secagg": True,
        "secagg-num-shares": 3,
        "secagg-reconstruction-threshold": 2,
        "cohort-fraction": 0.5,
        "secagg-modulus-range": 2**24,  # (2**24 - 1) // 2**22 = 3 clients
    }
    with caplog.at_level("WARNING"):
        report = _run(config, num_nodes=8)[0]
    assert report.fit.secure_aggregation and report.fit.ok == 3 and report.fit.updated
    assert any("capped at 3" in r.getMessage() for r in caplog.records)


def _malformed_by_client_0(secagg: bool, damage: str = "shape") -> Any:
    """A client mod: client 0's train replies are damaged (a SecAgg+ masked vector with an
    array of the wrong shape, one byte too many, or of unsigned 64-bit integers; a plain
    reply without its status)."""

    def mod(msg: Message, ctx: Context, call_next: Any) -> Message:
        reply = call_next(msg, ctx)
        if client_id_of(ctx) != 0 or not reply.has_content():
            return reply
        records = reply.content.config_records
        if (
            secagg
            and SECAGG_RESULTS in records
            and Key.MASKED_PARAMETERS in records[SECAGG_RESULTS]
        ):
            vector = list(records[SECAGG_RESULTS][Key.MASKED_PARAMETERS])
            if damage == "shape":
                vector[1] = ndarray_to_bytes(np.zeros(5, dtype=np.int64))
            elif damage == "uint64":  # int64 + uint64 is float64 in numpy
                vector = [
                    ndarray_to_bytes(np.load(io.BytesIO(v)).astype(np.uint64))  # type: ignore[arg-type]
                    for v in vector
                ]
            else:  # np.load ignores trailing bytes, the workflow's decoder does not
                vector[1] = bytes(vector[1]) + b"\0"  # type: ignore[arg-type]
            records[SECAGG_RESULTS][Key.MASKED_PARAMETERS] = vector
        elif not secagg and "fitres.status" in records:
            del records["fitres.status"]
        return reply

    return mod


@pytest.mark.parametrize(
    ("secagg", "damage"), [(False, ""), (True, "shape"), (True, "bytes"), (True, "uint64")]
)
def test_a_malformed_reply_counts_as_a_failed_client_not_a_crashed_run(
    secagg: bool, damage: str
) -> None:
    """One damaged reply raised out of Flower's workflow (a broadcast error summing the
    masked vectors, a TypeError taking the float64 sum of int64 and uint64 vectors modulo;
    a KeyError reading the FitRes) and ended the run for every client."""
    task = ToyLinearTask()
    config: RunConfig = {"num-rounds": 2, "eval-fraction": 0.0, "secagg": secagg}
    reports = _run(config, num_nodes=5, extra_mods=[_malformed_by_client_0(secagg, damage)])
    assert [r.server_round for r in reports] == [1, 2]
    first = reports[0]
    assert (first.fit.ok, first.fit.failed, first.fit.updated) == (4, 1, True)
    assert any("malformed reply" in f for f in first.fit.failures), first.fit.failures
    # the others' aggregate (SecAgg+ recovers the dropped client's masks)
    expected = _expected_fedavg(task, [1, 2, 3, 4], task.initial_parameters())
    assert _max_diff(first.parameters, expected) < _secagg_tolerance(task, [1, 2, 3, 4], 8.0, 2**22)


def _drop(key: str) -> Callable[[RecordDict], None]:
    def damage(content: RecordDict) -> None:
        del content.config_records[SECAGG_RESULTS][key]

    return damage


def _one_more(key: str) -> Callable[[RecordDict], None]:
    def damage(content: RecordDict) -> None:
        values = list(content.config_records[SECAGG_RESULTS][key])  # type: ignore[arg-type]
        content.config_records[SECAGG_RESULTS][key] = values + values[:1]

    return damage


def _repeated_destination(content: RecordDict) -> None:
    """The first share sent twice to the same neighbour (who masks with its key twice)."""
    records = content.config_records[SECAGG_RESULTS]
    for key in (Key.DESTINATION_LIST, Key.CIPHERTEXT_LIST):
        values = list(records[key])  # type: ignore[arg-type]
        records[key] = values + values[:1]


def _missing_destination(content: RecordDict) -> None:
    """No share for the first neighbour (who then never masks with this client's key)."""
    records = content.config_records[SECAGG_RESULTS]
    for key in (Key.DESTINATION_LIST, Key.CIPHERTEXT_LIST):
        records[key] = list(records[key])[1:]  # type: ignore[arg-type]


def _garbage_key(content: RecordDict) -> None:
    content.config_records[SECAGG_RESULTS][Key.PUBLIC_KEY_2] = b"not a PEM public key"


def _key_of(public_key: ec.EllipticCurvePublicKey | rsa.RSAPublicKey) -> bytes:
    return public_key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _rsa_key(content: RecordDict) -> None:
    """A PEM public key, but no elliptic-curve one: no ECDH with it."""
    key = _key_of(rsa.generate_private_key(public_exponent=65537, key_size=1024).public_key())
    content.config_records[SECAGG_RESULTS][Key.PUBLIC_KEY_2] = key


def _other_curve_key(content: RecordDict) -> None:
    """An elliptic-curve public key on another curve than its neighbours' keys."""
    key = _key_of(ec.generate_private_key(ec.SECP256R1()).public_key())
    content.config_records[SECAGG_RESULTS][Key.PUBLIC_KEY_2] = key


def _one_key_twice(content: RecordDict) -> None:
    """Its first public key sent as its second one too."""
    records = content.config_records[SECAGG_RESULTS]
    records[Key.PUBLIC_KEY_2] = records[Key.PUBLIC_KEY_1]


def _unknown_node(content: RecordDict) -> None:
    nids = list(content.config_records[SECAGG_RESULTS][Key.NODE_ID_LIST])  # type: ignore[arg-type]
    content.config_records[SECAGG_RESULTS][Key.NODE_ID_LIST] = [999_999, *nids[1:]]


def _short_share(content: RecordDict) -> None:
    shares = list(content.config_records[SECAGG_RESULTS][Key.SHARE_LIST])  # type: ignore[arg-type]
    content.config_records[SECAGG_RESULTS][Key.SHARE_LIST] = [bytes(shares[0])[:-16], *shares[1:]]


def _share_index_zero(content: RecordDict) -> None:
    shares = list(content.config_records[SECAGG_RESULTS][Key.SHARE_LIST])  # type: ignore[arg-type]
    content.config_records[SECAGG_RESULTS][Key.SHARE_LIST] = [
        b"\0\0\0\0" + bytes(shares[0])[4:],
        *shares[1:],
    ]


def _no_result_records(content: RecordDict) -> None:
    for records in (content.config_records, content.metric_records, content.array_records):
        for name in [n for n in records if n.startswith(("fitres.", "evaluateres."))]:
            del records[name]


def _damaged_by_client_0(stage: str, damage: Callable[[RecordDict], None]) -> Any:
    """A client mod: client 0's reply to SecAgg+ ``stage`` (``"plain"``: its plain train
    reply; ``"evaluate"``: its evaluate reply) goes through ``damage``."""

    def mod(msg: Message, ctx: Context, call_next: Any) -> Message:
        asked = msg.content.config_records.get(SECAGG_RECORD) if msg.has_content() else None
        if asked is not None:
            this = str(asked.get(Key.STAGE))  # read first: the SecAgg+ mod consumes it
        else:
            this = "evaluate" if msg.metadata.message_type == "evaluate" else "plain"
        reply = call_next(msg, ctx)
        if client_id_of(ctx) == 0 and this == stage and reply.has_content():
            damage(reply.content)
        return reply

    return mod


@pytest.mark.parametrize(
    ("stage", "damage"),
    [
        ("setup", _drop(Key.PUBLIC_KEY_1)),
        ("setup", _garbage_key),
        ("setup", _rsa_key),
        ("setup", _other_curve_key),
        ("setup", _one_key_twice),
        ("share_keys", _drop(Key.DESTINATION_LIST)),
        ("share_keys", _one_more(Key.CIPHERTEXT_LIST)),
        ("share_keys", _repeated_destination),
        ("share_keys", _missing_destination),
        ("collect_masked_vectors", _drop(Key.MASKED_PARAMETERS)),
        ("collect_masked_vectors", _no_result_records),
        ("unmask", _drop(Key.SHARE_LIST)),
        ("unmask", _one_more(Key.SHARE_LIST)),
        ("unmask", _unknown_node),
        ("plain", _no_result_records),
    ],
    ids=lambda value: value if isinstance(value, str) else value.__qualname__.split(".")[0],
)
def test_a_malformed_protocol_reply_counts_as_a_dropout_not_a_crashed_run(
    stage: str, damage: Callable[[RecordDict], None]
) -> None:
    """A reply of one client without the fields the stage reads (a public key, the share
    destinations, the masked vector, its FitRes records, the unmasking shares), with lists
    of different lengths, a share for a node it was not asked about or a share cut short
    raised a KeyError or ValueError out of Flower's workflow: the run ended with a
    traceback for every client. It is now a dropout; as after any dropout the others'
    aggregate is applied (and a client that sent its masked vector is still in it).
    Shares sent twice to one neighbour, or to none, left that neighbour's pairwise mask
    with this client on its vector twice, or not at all: the unmasked sum was noise,
    applied as the round's update (coordinates off by ~40). A public key that parses but
    is no key on the curve of the others' (RSA, P-256) made every neighbour fail in the
    share-keys stage: one client halted the round, as did one that sent the same key as
    both of its keys (each neighbour refused the repeated key)."""
    task = ToyLinearTask()
    secagg = stage != "plain"
    config: RunConfig = {"num-rounds": 2, "eval-fraction": 0.0, "secagg": secagg}
    reports = _run(config, num_nodes=5, extra_mods=[_damaged_by_client_0(stage, damage)])
    assert [r.server_round for r in reports] == [1, 2]
    fit = reports[0].fit
    assert fit.updated and any("malformed reply" in f for f in fit.failures), fit.failures
    summed = range(5) if stage == "unmask" else [1, 2, 3, 4]
    assert (fit.ok, fit.failed) == (len(summed), 5 - len(summed))
    expected = _expected_fedavg(task, summed, task.initial_parameters())
    assert _max_diff(reports[0].parameters, expected) < _secagg_tolerance(task, summed, 8.0, 2**22)


def test_clients_sending_the_same_public_keys_are_dropouts_not_the_end_of_the_round() -> None:
    """Two clients with one key pair (a fixed one, a copy): every neighbour of theirs
    refused the repeated keys in the share-keys stage and the round halted. Both are
    dropped after the setup stage; the others' round completes."""
    keys = [_key_of(ec.generate_private_key(ec.SECP384R1()).public_key()) for _ in range(2)]

    def same_keys(msg: Message, ctx: Context, call_next: Any) -> Message:
        asked = msg.content.config_records.get(SECAGG_RECORD) if msg.has_content() else None
        setup = asked is not None and asked.get(Key.STAGE) == "setup"
        reply = call_next(msg, ctx)
        if setup and client_id_of(ctx) in (0, 1) and reply.has_content():
            records = reply.content.config_records[SECAGG_RESULTS]
            records[Key.PUBLIC_KEY_1], records[Key.PUBLIC_KEY_2] = keys
        return reply

    task = ToyLinearTask()
    config: RunConfig = {"num-rounds": 1, "eval-fraction": 0.0, "secagg": True}
    report = _run(config, num_nodes=6, extra_mods=[same_keys])[0]
    fit = report.fit
    assert (fit.ok, fit.failed, fit.updated) == (4, 2, True), fit
    assert sum("public key also sent by another client" in f for f in fit.failures) == 2, fit
    survivors = [2, 3, 4, 5]
    expected = _expected_fedavg(task, survivors, task.initial_parameters())
    tol = _secagg_tolerance(task, survivors, 8.0, 2**22)
    assert _max_diff(report.parameters, expected) < tol


@pytest.mark.parametrize("damage", [_short_share, _share_index_zero])
def test_a_damaged_unmasking_share_halts_the_round_not_the_run(
    damage: Callable[[RecordDict], None],
) -> None:
    """A share cut by a block or given index 0 (well formed, so not a dropout) made the
    secret unrecoverable: combine_shares' ValueError ended the run. Nothing tells which
    share was damaged, so no sum can be unmasked: the round halts, the model is kept and
    the next round runs."""
    reports = _run(
        {"num-rounds": 2, "eval-fraction": 0.0, "secagg": True},
        num_nodes=5,
        extra_mods=[_damaged_by_client_0("unmask", damage)],
    )
    assert [r.server_round for r in reports] == [1, 2]
    for report in reports:
        assert not report.fit.updated
        assert "the masks could not be removed" in report.fit.failures[0], report.fit
        assert all(not np.any(a) for a in report.parameters)  # the initial (zero) model


def _shifted_masked_entry(array: int) -> Callable[[RecordDict], None]:
    """Damage: half the modulus (2**31) added to the first entry of the masked vector's
    ``array`` (0: the weight); a well-formed reply, but its sum is no clipped update."""

    def damage(content: RecordDict) -> None:
        records = content.config_records[SECAGG_RESULTS]
        vector = [np.load(io.BytesIO(v)) for v in records[Key.MASKED_PARAMETERS]]  # type: ignore[union-attr, arg-type]
        vector[array].flat[0] = (vector[array].flat[0] + 2**31) % 2**32
        records[Key.MASKED_PARAMETERS] = [ndarray_to_bytes(v) for v in vector]

    return damage


@pytest.mark.parametrize("array", [0, 1])
def test_an_unmasked_sum_no_clipped_updates_add_up_to_halts_the_round(
    array: int, caplog: pytest.LogCaptureFixture
) -> None:
    """A masked vector off by half the modulus in one entry (a client that masks badly, or
    on purpose) was unmasked and applied: a weight entry moved the model by ~2, a model
    entry by ~35,000 (the clipping range is 8). Each of k clients adds at most
    quantization-range to an entry, so a sum above k times that is no sum of clipped
    updates: the round halts, the model is kept, and the next round runs."""
    with caplog.at_level("ERROR"):
        reports = _run(
            {"num-rounds": 2, "eval-fraction": 0.0, "secagg": True},
            num_nodes=5,
            extra_mods=[
                _damaged_by_client_0("collect_masked_vectors", _shifted_masked_entry(array))
            ],
        )
    assert [r.server_round for r in reports] == [1, 2]
    for report in reports:
        assert not report.fit.updated, report.fit
        assert "no sum of 5 clipped updates" in report.fit.failures[0], report.fit
        assert all(not np.any(a) for a in report.parameters)  # the initial (zero) model
    assert any("no sum of 5 clipped updates" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("secagg", [False, True])
def test_a_clients_huge_error_reason_is_kept_and_logged_cut_short(
    secagg: bool, caplog: pytest.LogCaptureFixture
) -> None:
    """A client's error reply carries any reason it likes: one of 2,000,000 characters was
    logged whole (the SecAgg+ dropout line) and kept whole in the round's stats, which the
    strategy holds for every round of the run: a client could grow the server's log and
    memory by megabytes a round. Each reason is kept, and logged, cut short."""

    def loud(msg: Message, ctx: Context, call_next: Any) -> Message:
        if client_id_of(ctx) == 0 and msg.metadata.message_type == "train":
            error = Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason="z" * 2_000_000)
            return Message(error, reply_to=msg)
        return call_next(msg, ctx)

    with flower_log(caplog, logging.DEBUG):
        report = _run(
            {"num-rounds": 1, "eval-fraction": 0.0, "secagg": secagg},
            num_nodes=5,
            extra_mods=[loud],
        )[0]
    assert (report.fit.ok, report.fit.failed, report.fit.updated) == (4, 1, True), report.fit
    (reason,) = report.fit.failures
    assert reason.startswith("Error(") and "zzzz" in reason and len(reason) < 1000, len(reason)
    logged = [r.getMessage() for r in caplog.records]
    assert logged and max(len(m) for m in logged) < 5000
    if secagg:  # the SecAgg+ dropout line names the reason, cut short
        assert any("zzzz" in m for m in logged)


def test_an_evaluate_reply_without_its_records_counts_as_a_failure_not_a_crashed_run() -> None:
    reports = _run(
        {"num-rounds": 1, "eval-fraction": 1.0},
        num_nodes=4,
        extra_mods=[_damaged_by_client_0("evaluate", _no_result_records)],
    )
    (report,) = reports
    assert report.evaluate is not None, report
    assert (report.evaluate.ok, report.evaluate.failed) == (3, 1), report.evaluate
    assert any("malformed reply" in f for f in report.evaluate.failures)


def test_infinite_secagg_and_clipping_settings_are_refused_at_start() -> None:
    """Accepted, they made every round train nothing (NaN sums, clients refusing the clip)."""
    for key in ("secagg-clipping-range", "secagg-max-weight"):
        with pytest.raises(ConfigError, match=f"{key} must be a finite number > 0"):
            ServerConfig.from_run_config({"secagg": True, key: float("inf")})
    with pytest.raises(ConfigError, match="update-clip-norm"):
        ServerConfig.from_run_config({"update-clip-norm": float("inf")})


# ------------------------------------------------------------------ Ray simulation


def _record_visible_gpus(folder: Path) -> Any:
    """A client mod that writes the ``CUDA_VISIBLE_DEVICES`` its process sees into
    ``folder`` (one file per process)."""

    def mod(message: Message, context: Context, call_next: Any) -> Message:
        seen = os.environ.get("CUDA_VISIBLE_DEVICES")
        (folder / str(os.getpid())).write_text("unset" if seen is None else repr(seen))
        return call_next(message, context)

    return mod


@pytest.mark.network
def test_ray_simulation_five_clients_two_rounds_with_a_failing_client(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Wait for all 5 nodes: Flower starts the ServerApp before the nodes register.
    config: RunConfig = {
        "num-rounds": 2,
        "toy-empty-clients": "4",
        "round-timeout": 60.0,
        "min-available-clients": 5,
    }
    # Clients without a GPU share must not see the machine's GPUs (they would train on
    # them with device=auto): RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO=0 left them visible
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    reports: list[RoundReport] = []
    run_simulation(
        make_server_app(config, on_round_end=reports.append),
        make_client_app(config, extra_mods=[_record_visible_gpus(tmp_path)]),
        num_supernodes=5,
        backend_config=SimulationBackend(num_cpus_per_client=1.0, ray_num_cpus=2),
    )
    assert [r.server_round for r in reports] == [1, 2]
    assert all((r.fit.ok, r.fit.failed) == (4, 1) for r in reports)
    seen = {path.read_text() for path in tmp_path.iterdir()}
    assert seen == {"''"}, seen
    losses = [r.evaluate.loss for r in reports if r.evaluate is not None]
    assert len(losses) == 2 and losses[1] is not None and losses[0] is not None
    assert losses[1] < losses[0]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.mark.network
def test_ray_simulation_secagg_on_an_existing_cluster() -> None:
    ray_cli = shutil.which("ray") or str(Path(sys.executable).with_name("ray"))
    port = _free_port()
    # Ray's unix socket paths must stay short: pytest's tmp_path is too long.
    temp_dir = tempfile.mkdtemp(prefix="ray", dir="/tmp")
    head = subprocess.Popen(
        [
            ray_cli, "start", "--head", "--block", f"--port={port}", "--num-cpus=2",
            "--num-gpus=0", "--include-dashboard=false", "--disable-usage-stats",
            f"--temp-dir={temp_dir}",
        ],
        env={**os.environ, "RAY_USAGE_STATS_ENABLED": "0"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 90
        while True:
            with socket.socket() as probe:
                if probe.connect_ex(("127.0.0.1", port)) == 0:
                    break
            if head.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"ray head did not start (exit code {head.poll()})")
            time.sleep(0.5)
        task = ToyLinearTask()
        # Wait for all 5 nodes, as above: a round started with 2 registered failed SecAgg+
        # (threshold 3) in one CI run
        config: RunConfig = {
            "num-rounds": 1,
            "secagg": True,
            "eval-fraction": 0.0,
            "min-available-clients": 5,
        }
        reports: list[RoundReport] = []
        run_simulation(
            make_server_app(config, on_round_end=reports.append),
            make_client_app(config),
            num_supernodes=5,
            backend_config=SimulationBackend(ray_address=f"127.0.0.1:{port}"),
        )
        assert reports[0].fit.secure_aggregation and reports[0].fit.ok == 5
        expected = _expected_fedavg(task, range(5), task.initial_parameters())
        tol = _secagg_tolerance(task, range(5), 8.0, 2**22)
        assert _max_diff(reports[0].parameters, expected) < tol
    finally:
        head.terminate()  # `ray start --block` stops its raylet/GCS on SIGTERM
        try:
            head.wait(timeout=30)
        except subprocess.TimeoutExpired:
            head.kill()
            head.wait(timeout=10)
        shutil.rmtree(temp_dir, ignore_errors=True)


def test_unreachable_ray_address_fails_fast() -> None:
    port = _free_port()  # nothing listens there
    started = time.monotonic()
    with pytest.raises(ConfigError, match=f"cannot reach the Ray cluster at 127.0.0.1:{port}"):
        run_simulation(
            make_server_app({"num-rounds": 1}),
            make_client_app(),
            num_supernodes=2,
            backend_config=SimulationBackend(ray_address=f"127.0.0.1:{port}"),
        )
    assert time.monotonic() - started < 10


def test_a_reachable_ipv6_ray_address_is_not_refused() -> None:
    """``[::1]:6379`` is a form the simulation's ray-address accepts, but the reachability
    check connected to the host ``[::1]``, brackets and all: no such name, so a running
    cluster at an IPv6 address was always refused as unreachable."""
    try:
        listener = socket.socket(socket.AF_INET6)
        listener.bind(("::1", 0))
    except OSError:
        pytest.skip("no IPv6 loopback here")
    address = f"[::1]:{listener.getsockname()[1]}"
    with listener:
        listener.listen()
        check_ray_reachable(address)
    with pytest.raises(ConfigError, match=re.escape(f"cannot reach the Ray cluster at {address}")):
        check_ray_reachable(address)  # closed now


def test_an_engine_that_fails_to_start_stops_the_server_and_says_why(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Ray failing under the ServerApp (no cluster at ``--ray-address auto``, no client
    fitting on it) ended Flower's engine, not the ServerApp's thread: ``run_simulation``
    raised Flower's "An error was encountered" while the server went on sending rounds to
    nobody, for ever with the default round-timeout 0 (the process never exited). The
    server now stops with the engine, and the error names the cause (no Ray start here)."""
    from server.vce_runtime import PipelinedRayBackend

    def no_cluster(self: PipelinedRayBackend, backend_config: Any) -> None:
        raise ConnectionError("Could not find any running Ray instance")

    monkeypatch.setattr(PipelinedRayBackend, "init_ray", no_cluster)
    config: RunConfig = {"num-rounds": 1, "round-timeout": 1.0}
    reports: list[RoundReport] = []
    with pytest.raises(FedRecError, match="Could not find any running Ray instance"):
        run_simulation(
            make_server_app(config, on_round_end=reports.append),
            make_client_app(config),
            num_supernodes=2,
            backend_config=SimulationBackend(),
        )
    servers = [t for t in threading.enumerate() if "server_th" in t.name]
    assert not servers, "the ServerApp outlived the engine"
    time.sleep(3)  # a server still running would finish its 1 s round meanwhile
    assert reports == []


def test_a_server_thread_ended_by_system_exit_is_an_error_not_a_finished_run() -> None:
    """Flower's server thread catches ``Exception`` only: a ``SystemExit`` raised in a
    round-end hook (Rich's answer to a progress reader that went away) ended that thread
    alone, and ``run_simulation`` returned as if the federation had finished, with fewer
    rounds than asked. It is now an error that names it."""
    config: RunConfig = {"num-rounds": 3, "eval-fraction": 0.0, "min-available-clients": 2}
    reports: list[RoundReport] = []

    def leave_after_round_one(report: RoundReport) -> None:
        reports.append(report)
        raise SystemExit(1)

    with pytest.raises(FedRecError, match=r"stopped before the run ended \(SystemExit: 1\)"):
        run_simulation(
            make_server_app(config, on_round_end=leave_after_round_one),
            make_client_app(config),
            num_supernodes=2,
            backend_config=SimulationBackend(ray_num_cpus=2),
        )
    assert [r.server_round for r in reports] == [1]


def test_parameters_helper_roundtrip() -> None:
    """Guard for the wire format: float32 arrays survive ``Parameters`` unchanged."""
    arrays = [np.arange(6, dtype=np.float32).reshape(2, 3)]
    back = parameters_to_ndarrays(ndarrays_to_parameters(arrays))
    assert isinstance(ndarrays_to_parameters(arrays), Parameters)
    np.testing.assert_array_equal(back[0], arrays[0])


def test_a_training_process_prints_flowers_records_once_and_no_debug_lines() -> None:
    """Opacus' import-time ``logging.basicConfig`` must not make Flower's records print
    twice, nor its DEBUG records (the SecAgg+ mod's per-stage lines) print at all."""
    script = (
        "from logging import DEBUG, INFO\n"
        "import client.client_app, opacus\n"  # what a Ray worker imports
        "from flwr.common.logger import log\n"
        "log(DEBUG, 'debug-marker')\n"
        "log(INFO, 'info-marker')\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=Path(__file__).resolve().parents[1],
        check=True,
    )
    printed = out.stdout + out.stderr
    assert printed.count("info-marker") == 1
    assert "debug-marker" not in printed


def test_split_noise_trains_through_secagg() -> None:
    """The refusal outside SecAgg+ is tested on the student task (test_student_task.py);
    through SecAgg+ the setting trains (the toy task ignores the noise itself)."""
    base: RunConfig = {"num-rounds": 1, "eval-fraction": 0.0, "secagg": True}
    report = _run({**base, "noise-shares": 2}, num_nodes=5)[0]
    assert report.fit.secure_aggregation and report.fit.ok == 5


def test_a_round_waits_for_its_clients_instead_of_running_with_none(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A server started before its devices ran every round with 0 clients once the
    availability timeout passed, checkpointing and publishing each: its rounds were used up
    with nothing trained. The round now waits (a warning per timeout) until they connect."""
    from server.secagg import _wait_for_cohort

    class Manager:
        def __init__(self) -> None:
            self.calls = 0

        def num_available(self) -> int:
            self.calls += 1
            return 0 if self.calls < 10 else 3  # the devices connect after a while

    strategy = ValidatingFedAvg(
        initial_parameters=[np.zeros(2, np.float32)],
        min_available_clients=3,
        availability_timeout=0.3,
    )
    manager = Manager()
    with caplog.at_level(logging.WARNING):
        _wait_for_cohort(manager, strategy, 4)  # type: ignore[arg-type]
    assert manager.calls >= 10
    assert "round 4 waits for clients: 0 of the 3" in caplog.text


def test_a_client_refuses_to_unmask_a_node_listed_as_active_and_dropped(
    monkeypatch: pytest.MonkeyPatch, client_log: pytest.LogCaptureFixture
) -> None:
    """Flower's client mod answers an unmask request with the share of each active node's
    mask seed and of each dropped node's mask key: a server listing a node in both lists
    gets both and reads that node's own update. The client now refuses such a request
    (an error reply) before Flower's mod sends anything."""
    from flwr.common.secure_aggregation.secaggplus_constants import Stage

    called: list[str] = []
    monkeypatch.setattr(
        secagg_module, "secaggplus_mod", lambda msg, ctxt, nxt: called.append("flower")
    )
    for dead, refused in (([7], True), ([9], False)):
        called.clear()
        configs = ConfigRecord(
            {
                Key.STAGE: Stage.UNMASK,
                Key.ACTIVE_NODE_ID_LIST: [5, 6, 7],
                Key.DEAD_NODE_ID_LIST: dead,
            }
        )
        msg = Message(RecordDict({SECAGG_RECORD: configs}), 100, "train")
        context = Context(1, 100, {}, RecordDict(), {})
        reply = secagg_module.secaggplus_when_requested_mod(
            msg, context, lambda m, c: pytest.fail("no training in the unmask stage")
        )
        if refused:
            assert reply.has_error() and "unmask" in reply.error.reason
            assert called == [] and "as both active and dropped" in client_log.text
        else:
            assert called == ["flower"]


class _SecAggCohort:
    """Clients running the project's SecAgg+ mod (with Flower's ``secaggplus_mod``) in a
    full share graph, driven stage by stage by the test as a (hostile) server would."""

    def __init__(self, size: int, threshold: int, **setup: int | float) -> None:
        from flwr.common.secure_aggregation.secaggplus_constants import Stage

        self.ids = list(range(101, 101 + size))
        self.contexts = {nid: Context(1, nid, {}, RecordDict(), {}) for nid in self.ids}
        self.setup_replies = self._stage_all(
            {
                Key.STAGE: Stage.SETUP,
                Key.SAMPLE_NUMBER: size,
                Key.SHARE_NUMBER: size,
                Key.THRESHOLD: threshold,
                Key.CLIPPING_RANGE: 8.0,
                Key.TARGET_RANGE: 2**22,
                Key.MOD_RANGE: 2**32,
                Key.MAX_WEIGHT: 1.0,
                **setup,
            }
        )

    def send(self, nid: int, configs: dict[str, Any]) -> Message:
        msg = Message(RecordDict({SECAGG_RECORD: ConfigRecord(configs)}), nid, "train")

        def train(m: Message, c: Context) -> Message:
            fitres = FitRes(Status(Code.OK, "ok"), ndarrays_to_parameters([np.full(3, 0.5)]), 1, {})
            return Message(fitres_to_recorddict(fitres, keep_input=False), reply_to=m)

        return secagg_module.secaggplus_when_requested_mod(msg, self.contexts[nid], train)

    def _stage_all(self, configs: dict[str, Any]) -> dict[int, Message]:
        return {nid: self.send(nid, dict(configs)) for nid in self.ids}

    def run_to_unmask(self) -> None:
        """Share keys and collect masked vectors, all honestly."""
        from flwr.common.secure_aggregation.secaggplus_constants import Stage

        keys = {
            str(nid): [
                r.content[SECAGG_RESULTS][key] for key in (Key.PUBLIC_KEY_1, Key.PUBLIC_KEY_2)
            ]
            for nid, r in self.setup_replies.items()
        }
        inbox: dict[int, list[tuple[int, bytes]]] = {nid: [] for nid in self.ids}
        for nid, reply in self._stage_all({Key.STAGE: Stage.SHARE_KEYS, **keys}).items():
            record = reply.content[SECAGG_RESULTS]
            for dst, ciphertext in zip(
                record[Key.DESTINATION_LIST], record[Key.CIPHERTEXT_LIST], strict=True
            ):
                inbox[int(dst)].append((nid, ciphertext))
        for nid in self.ids:
            reply = self.send(
                nid,
                {
                    Key.STAGE: Stage.COLLECT_MASKED_VECTORS,
                    Key.SOURCE_LIST: [src for src, _ in inbox[nid]],
                    Key.CIPHERTEXT_LIST: [ct for _, ct in inbox[nid]],
                },
            )
            assert not reply.has_error(), reply.error.reason

    def unmask(self, nid: int, active: list[int], dead: list[int]) -> Message:
        from flwr.common.secure_aggregation.secaggplus_constants import Stage

        return self.send(
            nid,
            {Key.STAGE: Stage.UNMASK, Key.ACTIVE_NODE_ID_LIST: active, Key.DEAD_NODE_ID_LIST: dead},
        )


def test_a_client_refuses_an_unmask_request_that_repeats_a_node() -> None:
    """Flower's client checks only that the unmask request's active list is as long as the
    threshold, and the overlap check compares the lists as sets: a server listing the node
    it targets ``threshold`` times as active and every other neighbour as dropped got, from
    ``threshold`` clients, the shares of that node's mask seed and of every other node's
    mask key, and read its update exactly (5 clients, threshold 3). Repeated ids are refused."""
    cohort = _SecAggCohort(5, 3)
    cohort.run_to_unmask()
    target, *others = cohort.ids
    for nid in others[:3]:
        reply = cohort.unmask(nid, [target] * 3, others)
        assert reply.has_error() and "unmask" in reply.error.reason
    reply = cohort.unmask(others[3], [target, others[3]], [others[0], others[0]])
    assert reply.has_error()


def test_a_client_refuses_to_be_unmasked_as_a_dropped_node() -> None:
    """A client that is asked to unmask is alive: listing it as dropped asks it for the
    share of its own mask key, which no honest request does (Flower's workflow lists the
    neighbours it holds as active, itself among them)."""
    cohort = _SecAggCohort(5, 3)
    cohort.run_to_unmask()
    nid, *others = cohort.ids
    reply = cohort.unmask(nid, others, [nid])
    assert reply.has_error() and "unmask" in reply.error.reason
    # an honest request of the same round: itself and its neighbours active
    assert not cohort.unmask(others[0], cohort.ids, []).has_error()


def test_a_client_refuses_a_secagg_threshold_below_two() -> None:
    """With a reconstruction threshold of 1 every Shamir share is the secret itself: one
    client's answer to one unmask request (a neighbour active, the others dropped) gave the
    server that neighbour's mask seed and every other mask key, i.e. its update. Flower's
    client checks only the threshold's type; the project's server never sends < 2."""
    for threshold in (1, 0, -3):
        replies = _SecAggCohort(3, threshold).setup_replies
        assert all(r.has_error() and "setup" in r.error.reason for r in replies.values())
    assert not any(r.has_error() for r in _SecAggCohort(3, 2).setup_replies.values())


def test_a_client_refuses_a_secagg_threshold_that_is_no_strict_majority_of_its_shares() -> None:
    """With a threshold at most half the shares (5 shares, threshold 2) a server could list a
    client as active to some of its neighbours and as dropped to others: none sees both
    lists, yet the server collects the shares of its mask seed and of its mask key, i.e. its
    update. The client refuses a setup unless ``2 * threshold > num_shares`` (its share count,
    itself included), as the project's server settings do."""
    for shares, threshold in ((5, 2), (4, 2), (7, 3)):
        replies = _SecAggCohort(5, threshold, **{Key.SHARE_NUMBER: shares}).setup_replies
        assert all(
            r.has_error() and "setup' failed: config:" in r.error.reason for r in replies.values()
        ), (shares, threshold)
    for shares, threshold in ((5, 3), (4, 3), (3, 2)):
        replies = _SecAggCohort(5, threshold, **{Key.SHARE_NUMBER: shares}).setup_replies
        assert not any(r.has_error() for r in replies.values()), (shares, threshold)


def test_secagg_settings_refuse_a_threshold_that_is_no_strict_majority_of_the_shares() -> None:
    """The server refuses SecAgg+ settings whose threshold is no strict majority of the share
    count (each client's neighbours, itself included) in a round it can run: a dishonest
    server could otherwise split the view of a client's neighbours and read its update. A
    fractional secagg-num-shares is resolved against the cohort (or every cohort, without a
    cohort-size)."""
    rule = r"secagg-reconstruction-threshold.*strict majority of secagg-num-shares"
    for shares, threshold in ((5, 2), (7, 3), (5, 0.4), (9, 0.4)):
        with pytest.raises(ConfigError, match=rule):
            SecAggSettings(num_shares=shares, reconstruction_threshold=threshold)
    for values in (
        {"cohort-size": 10, "secagg-num-shares": 0.5, "secagg-reconstruction-threshold": 2},
        {"secagg-num-shares": 0.5, "secagg-reconstruction-threshold": 4},
        {"cohort-size": 4, "secagg-num-shares": 1.0, "secagg-reconstruction-threshold": 0.6},
    ):
        with pytest.raises(ConfigError, match=rule + r".*cohort"):
            ServerConfig.from_run_config({"secagg": True, **values})
    for values in (
        {},
        {"secagg-num-shares": 3, "secagg-reconstruction-threshold": 2},
        {"secagg-num-shares": 7, "secagg-reconstruction-threshold": 4},
        {"cohort-size": 10, "secagg-num-shares": 0.5, "secagg-reconstruction-threshold": 3},
        {"secagg-num-shares": 0.5, "secagg-reconstruction-threshold": 0.6},
        {"cohort-size": 5, "secagg-num-shares": 1.0, "secagg-reconstruction-threshold": 0.6},
    ):
        assert ServerConfig.from_run_config({"secagg": True, **values}).secagg_settings


@pytest.mark.parametrize("shares", [4, 6, 50])
def test_an_even_integer_secagg_num_shares_is_refused(shares: int) -> None:
    """Flower's setup stage sends the clients an even integer share count, then gives each
    client one neighbour more in any larger cohort: the clients run out of shares in the
    key-sharing stage and every round failed (num-shares 4, threshold 3, 6 clients: 6 of 6
    failed, 'secure aggregation halted'). Refused up front, naming the odd count to use."""
    with pytest.raises(
        ConfigError, match=rf"num-shares as an integer must be odd.*use {shares + 1}"
    ):
        SecAggSettings(num_shares=shares, reconstruction_threshold=shares // 2 + 1)
    with pytest.raises(ConfigError, match="must be odd"):
        ServerConfig.from_run_config(
            {"secagg": True, "secagg-num-shares": shares, "secagg-reconstruction-threshold": 3}
        )
    odd = SecAggSettings(num_shares=shares + 1, reconstruction_threshold=shares // 2 + 1)
    assert odd.completes(shares + 5)


@pytest.mark.parametrize("modulus", [2**40, 2**33, 3 * 2**30, 2**22, 2**10])
def test_a_client_refuses_a_secagg_modulus_its_masks_cannot_hide_in(modulus: int) -> None:
    """The masks drawn from the whole seed (:func:`secagg_module.full_seed_masks`) are 32-bit
    words reduced by the modulus: under a modulus above 2**32 (that the server chooses in
    the setup stage) they covered a sliver of it and the masked vector still correlated
    with the update; one that is no power of two biases them. A modulus not above the
    quantization range wraps the update itself. The client refuses such a setup, as the
    project's server settings do (:class:`SecAggSettings`)."""
    replies = _SecAggCohort(3, 2, **{Key.MOD_RANGE: modulus}).setup_replies
    assert all(r.has_error() and "setup" in r.error.reason for r in replies.values())


@pytest.mark.parametrize(
    "run_config",
    [{"min-available-clients": 3}, {"secagg": True}],
    ids=["min-available-clients", "secagg-threshold"],
)
def test_an_in_process_run_with_too_few_nodes_is_refused_instead_of_waiting_for_ever(
    run_config: RunConfig,
) -> None:
    """In-process, the nodes are all there from the start and no other ever connects: a run
    whose rounds need more (3 available, or SecAgg+'s default threshold of 3) waited for
    them for ever, a warning every availability-timeout."""
    import threading

    config: RunConfig = {"num-rounds": 1, "availability-timeout": 0.2, **run_config}
    raised: list[BaseException] = []

    def run() -> None:
        try:
            _run(config, num_nodes=2)
        except BaseException as exc:  # the outcome is checked below
            raised.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(timeout=30)
    assert not thread.is_alive(), "the run is still waiting for nodes that cannot connect"
    assert len(raised) == 1 and isinstance(raised[0], ConfigError)
    assert "2 node(s)" in str(raised[0]) and "waits for 3" in str(raised[0])
