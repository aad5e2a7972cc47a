"""Every setting the Flower apps read is settable from `fedrec simulate`, or set by the
simulation itself for a stated reason; the simulation validates it as the apps do."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from fedrec.cli import app
from server.server_app import ServerConfig
from shared.config import field_names, from_flat
from shared.errors import ConfigError
from shared.federated.local_config import LocalTrainConfig
from shared.federated.student_config import StudentTaskConfig

#: One value per knob, none of them its default.
KNOBS: dict[str, Any] = {
    "momentum": 0.9,
    "max-examples": 64,
    "num-threads": 2,
    "eval-negatives": 49,
    "round-timeout": 60.0,
    "min-cohort": 3,
    "update-clip-norm": 5.0,
    "update-clip-median-multiple": 3.0,
    "secagg-quantization-range": 2**20,
    "secagg-modulus-range": 2**30,
    "secagg-max-weight": 500.0,
}


def test_every_key_the_apps_read_is_a_simulate_setting_or_set_by_it_for_a_reason() -> None:
    from simulation.config import APP_KEYS_SET_BY_SIMULATION, SimulationConfig

    read = field_names(ServerConfig) | field_names(LocalTrainConfig)
    read |= field_names(StudentTaskConfig)
    own, fixed = field_names(SimulationConfig), set(APP_KEYS_SET_BY_SIMULATION)
    assert read - own - fixed == set()  # none silently missing
    assert fixed <= read and not fixed & own  # a fixed key is the apps' and not a setting
    assert all(reason.strip() for reason in APP_KEYS_SET_BY_SIMULATION.values())
    assert set(KNOBS) <= own


def test_the_apps_knobs_reach_the_federation() -> None:
    from simulation.config import SimulationConfig

    config = from_flat(SimulationConfig, {"backend": "inprocess", **KNOBS})
    run_config = config.server_run_config(100)
    assert {k: run_config[k] for k in KNOBS} == KNOBS
    server = ServerConfig.from_run_config(run_config).to_run_config()
    assert {k: server[k] for k in KNOBS if k in server} == {
        k: v for k, v in KNOBS.items() if k in field_names(ServerConfig)
    }
    files = {"bundle": "b.pt", "state-dir": "state"}  # the pipeline sets them
    task = from_flat(
        StudentTaskConfig,
        {**{k: v for k, v in run_config.items() if k in field_names(StudentTaskConfig)}, **files},
    )
    train = from_flat(
        LocalTrainConfig,
        {k: v for k, v in run_config.items() if k in field_names(LocalTrainConfig)},
    )
    assert (task.num_threads, task.eval_negatives) == (2, 49)
    assert (train.momentum, train.max_examples) == (0.9, 64)


def test_the_apps_knobs_are_flags_and_run_config_keys(
    tmp_path: Path, captured_pipeline: Any
) -> None:
    args = ["simulate", "--backend", "inprocess", "--run-dir", str(tmp_path)]
    args += ["--momentum", "0.5", "--secagg-max-weight", "250", "--round-timeout", "9"]
    args += ["--run-config", "momentum=0.9 max-examples=32 eval-negatives=19"]
    result = CliRunner().invoke(app, args)
    assert isinstance(result.exception, captured_pipeline.Stop), result.output
    (config,) = captured_pipeline.seen
    assert (config.momentum, config.max_examples, config.eval_negatives) == (0.5, 32, 19)
    assert (config.secagg_max_weight, config.round_timeout) == (250.0, 9.0)


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"momentum": 1.0}, "momentum"),
        ({"max-examples": 0}, "max-examples"),
        ({"num-threads": 0}, "num-threads"),
        ({"eval-negatives": 0}, "eval-negatives"),
        ({"round-timeout": -1.0}, "round-timeout"),
        ({"min-cohort": 0}, "min-cohort"),
        ({"update-clip-norm": -1.0}, "update-clip-norm"),
        ({"update-clip-norm": 1.0, "user-dp": True, "user-dp-clip": 0.1}, "update-clip-norm"),
        ({"update-clip-median-multiple": 0.5}, "update-clip-median-multiple"),
        ({"secagg-quantization-range": 1}, "secagg-quantization-range"),
        ({"secagg-modulus-range": 3 * 2**20}, "secagg-modulus-range"),
        ({"secagg-max-weight": 0.0}, "secagg-max-weight"),
    ],
)
def test_the_apps_knobs_are_refused_before_any_work_as_the_apps_refuse_them(
    values: dict[str, Any], message: str
) -> None:
    from simulation.config import SimulationConfig

    assert set(values) <= field_names(SimulationConfig)  # refused as a value, not as a key
    with pytest.raises(ConfigError, match=message):
        from_flat(SimulationConfig, {"backend": "inprocess", **values})


def test_secagg_timeout_zero_means_no_timeout_and_the_help_says_so() -> None:
    from simulation.config import SimulationConfig

    config = SimulationConfig(backend="inprocess", secagg_timeout=0.0)
    settings = ServerConfig.from_run_config(config.server_run_config(10)).secagg_settings
    assert settings is not None and settings.timeout is None
    shown = CliRunner().invoke(app, ["simulate", "--help"], env={"COLUMNS": "250"}).output
    line = next(row for row in shown.splitlines() if "--secagg-timeout " in row)
    assert "0 = no timeout" in line


def test_user_dp_cohorts_too_small_for_any_guarantee_are_refused_before_pretraining(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Cohorts of 2 from about a hundred clients skip a round (fewer than min-cohort 2
    sampled) far too often for delta 1/clients: the server refuses the first round, and the
    simulation refused the run only after encoding the items and pretraining ("the
    federation finished no round"). Now it stops before, with the server's reason."""
    import simulation.pipeline
    from simulation.config import SimulationConfig

    class Pretrained(Exception):
        pass

    def no_work(*args: Any, **kwargs: Any) -> None:
        raise Pretrained

    monkeypatch.setattr(simulation.pipeline, "encode_items", no_work)
    tiny = {"synthetic-users": 150, "synthetic-items": 80, "backend": "inprocess"}
    dp = {"user-dp": True, "dp": False, "secagg": False, "run-dir": str(tmp_path)}
    config = from_flat(SimulationConfig, {**tiny, **dp, "cohort-size": 2})
    with pytest.raises(ConfigError, match="too small for user-level DP"):
        simulation.pipeline.run_pipeline(config)
    assert not any(tmp_path.iterdir())  # nothing left behind
    # every client in every round: no round is ever skipped, so the run goes on to its work
    with pytest.raises(Pretrained):
        simulation.pipeline.run_pipeline(replace(config, cohort_size=500))


def test_the_summary_and_report_name_the_delta_each_epsilon_is_at(tmp_path: Path) -> None:
    """summary.json and report.md gave epsilon per round but not the delta it is at; the
    user-level one is 1 / clients unless user-dp-delta is set."""
    from simulation.config import SimulationConfig
    from simulation.pipeline import privacy_meta
    from simulation.report import write_report

    both = SimulationConfig(backend="inprocess", user_dp=True, delta=1e-6)
    assert privacy_meta(both, 200)["delta"] == 1e-6
    assert privacy_meta(both, 200)["user-level delta"] == pytest.approx(1 / 200)
    explicit = replace(both, user_dp_delta=1e-3)
    assert privacy_meta(explicit, 200)["user-level delta"] == 1e-3
    assert "user-level delta" not in privacy_meta(replace(both, user_dp=False), 200)
    assert "delta" not in privacy_meta(replace(both, dp=False), 200)

    rounds = [{"round": 1, "epsilon_record": 0.5, "epsilon_user": 0.7}]
    summary = {"rounds": rounds, "meta": privacy_meta(both, 200), "final": {}, "fewshot": {}}
    text = write_report(summary, tmp_path).read_text()
    assert "- **delta**: 1e-06" in text and "- **user-level delta**: 0.005" in text
    explained = {line.split("`")[1]: line for line in text.splitlines() if line.startswith("- `")}
    assert "delta 1e-06" in explained["epsilon_record"]
    assert "delta 0.005" in explained["epsilon_user"]
