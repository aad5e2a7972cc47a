"""The server optimiser (FedAvg / FedAdam): hand-computed steps, exact resume from its
checkpointed state, refusal of foreign state, and its place in the strategy."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays

from server.server_app import ServerConfig
from server.server_optimizer import ServerOptimizer, ServerOptimizerSettings
from server.strategy import ValidatingFedAvg
from shared.errors import ConfigError
from shared.federated.task import METRIC_STATUS

SHAPES = [(2,), (1, 2)]


def _update(*values: float) -> list[np.ndarray]:
    return [np.array(values[:2]), np.array([values[2:4]])]


def test_fedavg_step_is_the_mean_update_times_the_server_lr() -> None:
    opt = ServerOptimizer(ServerOptimizerSettings("avg", lr=0.5), SHAPES)
    step = opt.step(_update(1.0, -2.0, 4.0, 0.0))
    np.testing.assert_allclose(step[0], [0.5, -1.0])
    np.testing.assert_allclose(step[1], [[2.0, 0.0]])


def test_fedadam_two_steps_by_hand() -> None:
    s = ServerOptimizerSettings("adam", lr=0.1, beta1=0.5, beta2=0.75, tau=0.01)
    opt = ServerOptimizer(s, [(1,)])
    # step 1: m = 0.5 * 2 = 1, v = 0.25 * 4 = 1; bias-corrected m_hat = 2, v_hat = 4
    first = opt.step([np.array([2.0])])[0][0]
    assert first == pytest.approx(0.1 * 2.0 / (2.0 + 0.01))
    # step 2 with u = -1: m = 0.5 * 1 - 0.5 = 0, so the step is 0 whatever v is
    assert opt.step([np.array([-1.0])])[0][0] == pytest.approx(0.0)
    # step 3 with u = 0: m = 0, still 0; v keeps decaying
    assert opt.step([np.array([0.0])])[0][0] == pytest.approx(0.0)
    # step 4 with u = 1: m = 0.5, m_hat = 0.5 / (1 - 0.5^4); v by the recursion
    v = 0.0
    for u in (2.0, -1.0, 0.0, 1.0):
        v = 0.75 * v + 0.25 * u * u
    m_hat = 0.5 / (1 - 0.5**4)
    v_hat = v / (1 - 0.75**4)
    assert opt.step([np.array([1.0])])[0][0] == pytest.approx(
        0.1 * m_hat / (math.sqrt(v_hat) + 0.01)
    )


def test_fedadam_resumes_exactly_from_its_json_state() -> None:
    rng = np.random.default_rng(0)
    updates = [[rng.normal(size=s) for s in SHAPES] for _ in range(4)]
    settings = ServerOptimizerSettings("adam", lr=0.01)
    straight = ServerOptimizer(settings, SHAPES)
    expected = [straight.step(u) for u in updates][-1]
    first = ServerOptimizer(settings, SHAPES)
    for u in updates[:3]:
        first.step(u)
    state = json.loads(json.dumps(first.state_dict(), allow_nan=False))
    resumed = ServerOptimizer(settings, SHAPES)
    resumed.load_state_dict(state)
    assert resumed.steps == 3
    for a, b in zip(resumed.step(updates[3]), expected, strict=True):
        np.testing.assert_array_equal(a, b)


def test_foreign_or_broken_state_is_refused() -> None:
    adam = ServerOptimizer(ServerOptimizerSettings("adam"), SHAPES)
    adam.step(_update(1, 2, 3, 4))
    state = adam.state_dict()
    with pytest.raises(ConfigError, match=r"server-optimizer='adam'.*'avg'"):
        ServerOptimizer(ServerOptimizerSettings("avg"), SHAPES).load_state_dict(state)
    with pytest.raises(ConfigError, match="holds 2 values, the model needs 3"):
        ServerOptimizer(ServerOptimizerSettings("adam"), [(2,), (3,)]).load_state_dict(state)
    with pytest.raises(ConfigError, match="not valid base64"):
        adam.load_state_dict({**state, "m": ["@@", state["m"][1]]})
    with pytest.raises(ConfigError, match="step count"):
        adam.load_state_dict({**state, "steps": -1})
    with pytest.raises(ConfigError, match="update shapes"):
        adam.step([np.zeros(3), np.zeros((1, 2))])


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"kind": "sgd"}, "'server-optimizer' must be one of 'avg', 'adam'"),
        ({"lr": 0.0}, "'server-lr' must be a finite number > 0"),
        ({"beta2": 1.0}, r"'server-beta2' must be in \[0, 1\)"),
        ({"tau": float("nan")}, "'server-tau'"),
    ],
)
def test_settings_are_validated(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        ServerOptimizerSettings(**kwargs)  # type: ignore[arg-type]


def test_server_config_reads_the_optimiser_and_noise_shares() -> None:
    config = ServerConfig.from_run_config(
        {
            "server-optimizer": "adam",
            "server-lr": 0.003,
            "noise-shares": 4,
            "secagg": True,
            "cohort-size": 5,
            "secagg-reconstruction-threshold": 3,
        }
    )
    assert config.server_optimizer_settings == ServerOptimizerSettings("adam", lr=0.003)
    assert config.noise_shares == 4
    # the run-config keys the settings write are the ones the server's config reads back
    settings = ServerOptimizerSettings("adam", lr=0.02, beta1=0.5, beta2=0.75, tau=0.01)
    assert ServerConfig.from_run_config(settings.run_config()).server_optimizer_settings == settings
    # the split noise bounds a record's share of the mean only with uniform weights
    assert config.secagg_settings is not None and config.secagg_settings.max_weight == 1.0
    with pytest.raises(ConfigError, match="did you mean 'server-optimizer'"):
        ServerConfig.from_run_config({"server-optimiser": "adam"})
    with pytest.raises(ConfigError, match="set secagg=true, or noise-shares=1"):
        ServerConfig.from_run_config({"noise-shares": 4})
    with pytest.raises(ConfigError, match="exceeds 'cohort-size'"):
        ServerConfig.from_run_config(
            {"noise-shares": 6, "secagg": True, "cohort-size": 5, "secagg-num-shares": 3}
        )
    # each update carries 1/m of the noise: clipping it before the secure sum breaks the
    # Gaussian argument the ledgers are charged for
    split = {"noise-shares": 4, "secagg": True, "cohort-size": 5}
    for clip in ({"update-clip-norm": 1.0}, {"user-dp": True, "user-dp-clip": 0.1}):
        with pytest.raises(ConfigError, match="noise-shares > 1 cannot be combined"):
            ServerConfig.from_run_config({**split, **clip})
    assert ServerConfig.from_run_config({**split, "update-clip-norm": 1.0, "noise-shares": 1})


def _fitres(update: list[np.ndarray], n: int) -> FitRes:
    return FitRes(
        status=Status(Code.OK, "Success"),
        parameters=ndarrays_to_parameters(update),
        num_examples=n,
        metrics={METRIC_STATUS: "ok"},
    )


def test_strategy_steps_with_fedadam_and_checkpoints_its_moments() -> None:
    from unittest.mock import MagicMock

    ref = [np.zeros(2, np.float32)]
    settings = ServerOptimizerSettings("adam", lr=0.1, tau=1e-8)
    strategy = ValidatingFedAvg(initial_parameters=ref, server_optimizer=settings)
    results = [
        (MagicMock(node_id=i), _fitres([np.array([u, -u], np.float32)], 1))
        for i, u in enumerate((1e-3, 3e-3))
    ]
    params, _ = strategy.aggregate_fit(1, results, [])
    assert params is not None
    # Adam's first step is lr * sign(mean update): tiny updates still move the model by lr
    np.testing.assert_allclose(parameters_to_ndarrays(params)[0], [0.1, -0.1], rtol=1e-4)
    state = json.loads(json.dumps(strategy.state_dict()))
    assert state["server_optimizer"]["kind"] == "adam" and state["server_optimizer"]["steps"] == 1
    # a resumed strategy continues with the same moments; a plain-FedAvg one refuses them
    resumed = ValidatingFedAvg(
        initial_parameters=parameters_to_ndarrays(params), server_optimizer=settings
    )
    resumed.load_state_dict(state)
    assert resumed.optimizer.steps == 1
    with pytest.raises(ConfigError, match="server-optimizer='adam'"):
        ValidatingFedAvg(initial_parameters=ref).load_state_dict(state)
    # a checkpoint from before the optimiser existed was plain FedAvg
    legacy = {k: v for k, v in state.items() if k != "server_optimizer"}
    ValidatingFedAvg(initial_parameters=ref).load_state_dict(legacy)


def test_strategy_refuses_split_noise_without_secure_aggregation() -> None:
    with pytest.raises(ConfigError, match="set secagg=true, or noise-shares=1"):
        ValidatingFedAvg(initial_parameters=[np.zeros(2, np.float32)], noise_shares=3)


def test_a_damaged_optimizer_state_names_its_checkpoint_and_the_way_out() -> None:
    """The error said only "server optimizer state: m[0] holds 0 values": not which of the
    checkpoints held it, nor that moving that round away resumes from the one before."""
    ref = [np.zeros(2, np.float32)]
    settings = ServerOptimizerSettings("adam")
    state = ValidatingFedAvg(initial_parameters=ref, server_optimizer=settings).state_dict()
    source = "/state/checkpoints/round-00000003.json"
    damaged = {**state, "server_optimizer": {**state["server_optimizer"], "m": ["AAAA"]}}
    strategy = ValidatingFedAvg(initial_parameters=ref, server_optimizer=settings)
    with pytest.raises(ConfigError, match=r"round-00000003\.json: server optimizer state: m\[0\]"):
        strategy.load_state_dict(damaged, source=source)
    with pytest.raises(ConfigError, match="move that round's files away"):
        strategy.load_state_dict(damaged, source=source)
    # another optimiser is the config's choice, not damage: its own advice, no file shuffling
    with pytest.raises(ConfigError, match=r"round-00000003\.json: .*'adam'") as refused:
        ValidatingFedAvg(initial_parameters=ref).load_state_dict(state, source=source)
    assert "move that round's files away" not in str(refused.value)
