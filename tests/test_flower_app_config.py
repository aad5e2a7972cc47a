"""`[tool.flwr.app.config]` is what `flwr run` reads: it must parse into the server's typed
config, and every student-task knob must be declared there (else --run-config rejects it)."""

import tomllib
from pathlib import Path

from server.server_app import ServerConfig
from shared.config import field_names
from shared.federated.local_training import LocalTrainConfig
from shared.federated.student_task import StudentTaskConfig

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"


def _app() -> dict:
    return tomllib.loads(PYPROJECT.read_text())["tool"]["flwr"]["app"]


def test_components_point_at_the_apps() -> None:
    components = _app()["components"]
    assert components == {
        "serverapp": "server.server_app:app",
        "clientapp": "client.client_app:app",
    }


def test_app_config_parses_into_server_config() -> None:
    config = ServerConfig.from_run_config(_app()["config"])
    assert config.num_rounds >= 1


def test_every_student_task_knob_is_declared() -> None:
    declared = set(_app()["config"])
    wanted = (field_names(LocalTrainConfig) | field_names(StudentTaskConfig)) - {
        "max-examples",
        "momentum",
        "seed",
        "eval-negatives",
        "eval-seed",
        "num-threads",
    }
    assert wanted <= declared, sorted(wanted - declared)
