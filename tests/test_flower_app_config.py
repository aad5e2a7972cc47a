"""`[tool.flwr.app.config]` is what `flwr run` reads: it must parse into the server's typed
config, and every student-task knob must be declared there (else --run-config rejects it)."""

import contextlib
import os
import re
import signal
import subprocess
import sys
import tomllib
from dataclasses import fields
from pathlib import Path

from server.server_app import ServerConfig
from shared.config import field_names
from shared.federated.local_config import LocalTrainConfig
from shared.federated.student_config import StudentTaskConfig
from shared.federated.task import ToyLinearConfig
from simulation.config import SimulationConfig

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


#: Read from the run config without needing a declaration (pyproject declares it all the
#: same): the clients re-seed every round from the server's ``seed``. The toy task's
#: fault-injection sets are test fixtures, never declared.
UNDECLARED = {"seed"}


def _toy_keys() -> set[str]:
    return {f"toy-{name}" for name in field_names(ToyLinearConfig)}


def test_every_knob_the_apps_read_is_declared() -> None:
    """`flwr run --run-config` only overrides declared keys: a key the server or a client
    reads but pyproject lacks could not be set the Flower way."""
    declared = set(_app()["config"])
    wanted = (
        field_names(ServerConfig) | field_names(LocalTrainConfig) | field_names(StudentTaskConfig)
    ) - UNDECLARED
    assert wanted <= declared, sorted(wanted - declared)
    toy_scalars = {
        f"toy-{f.name.replace('_', '-')}"
        for f in fields(ToyLinearConfig)
        if not isinstance(f.default, frozenset)
    }
    assert toy_scalars <= declared, sorted(toy_scalars - declared)
    assert declared <= wanted | _toy_keys() | {"seed"}, sorted(declared - wanted - _toy_keys())


def test_declared_values_are_the_dataclass_defaults() -> None:
    """pyproject.toml repeats the defaults for `flwr run`; they must not drift from the
    dataclasses that own them (which the simulation and the daemon also use)."""
    declared = _app()["config"]
    for cls, prefix in (
        (ServerConfig, ""),
        (LocalTrainConfig, ""),
        (StudentTaskConfig, ""),
        (ToyLinearConfig, "toy-"),
    ):
        for f in fields(cls):
            key = prefix + f.name.replace("_", "-")
            if key in declared:  # `seed` too: declared, though the apps need not declare it
                value = declared[key]
                # the type too: `lr = 1` or `dp = 1` would equal 1.0 / True
                assert value == f.default and type(value) is type(f.default), (
                    cls.__name__,
                    key,
                    value,
                    f.default,
                )


#: The simulation's preset where it differs from the apps' defaults (README: a cohort and an
#: evaluation sample of 50 virtual clients, SecAgg+ on with 3 shares over them, a seed, and
#: stage timeouts for a loaded machine); every other setting both have is one default.
SIMULATION_PRESET = {
    "cohort-size",
    "eval-size",
    "seed",
    "secagg",
    "secagg-num-shares",
    "secagg-reconstruction-threshold",
    "secagg-timeout",
}


def test_the_simulation_and_the_server_share_their_other_defaults() -> None:
    """Only three privacy defaults were compared; the rest both dataclasses write (the
    SecAgg+ clipping range, checkpoint-keep, ...) could drift apart unnoticed."""
    simulation, server = SimulationConfig(), ServerConfig()
    assert simulation.user_dp_clip == server.user_dp_clip > 0
    shared_keys = field_names(SimulationConfig) & field_names(ServerConfig)
    assert shared_keys > SIMULATION_PRESET and len(shared_keys) > len(SIMULATION_PRESET) + 10

    names = {key: key.replace("-", "_") for key in shared_keys}
    # key -> (the simulation's default, the apps')
    pairs = {key: (getattr(simulation, n), getattr(server, n)) for key, n in names.items()}
    for key in sorted(shared_keys - SIMULATION_PRESET):
        ours, theirs = pairs[key]
        assert ours == theirs and type(ours) is type(theirs), (key, ours, theirs)
    differing = {key for key, (ours, theirs) in pairs.items() if ours != theirs}
    assert differing == SIMULATION_PRESET  # a preset that came back to the default: drop it


# --------------------------------------------------------------------------- the Flower way


def _kill_processes_of(flwr_home: Path) -> None:
    """Stop what ``flwr run`` left behind for this FLWR_HOME: its managed local SuperLink and
    SuperExec are detached daemons. Matched by environment, so nothing else is touched."""
    marker = f"FLWR_HOME={flwr_home}".encode()
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            environ = (proc / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if marker in environ:
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(proc.name), signal.SIGKILL)


def test_flwr_run_local_simulation_runs_the_declared_apps_with_secagg(tmp_path: Path) -> None:
    """`flwr run . local-simulation` (Flower's own entry point, managed local SuperLink,
    simulation runtime) runs the declared ServerApp/ClientApp: two SecAgg+ rounds over three
    virtual clients, every client contributing, and the distributed loss falls."""
    home = tmp_path / "flwr-home"
    home.mkdir()
    (home / "config.toml").write_text(
        '[superlink.local-simulation]\naddress = ":local:"\noptions.num-supernodes = 3\n'
    )
    bin_dir = Path(sys.executable).parent
    env = {
        **os.environ,
        "FLWR_HOME": str(home),
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        # as the README says for offline machines: else the managed SuperLink runs `uv sync`
        # on the app's dependencies, which needs uv and a package index (a GPU machine with
        # neither failed with Flower's exit code 700)
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    }
    run_config = (
        "num-rounds=2 secagg=true secagg-num-shares=3 secagg-reconstruction-threshold=2 "
        "min-available-clients=3"
    )
    try:
        command = [str(bin_dir / "flwr"), "run", str(PYPROJECT.parent), "local-simulation"]
        done = subprocess.run(
            [*command, "--stream", "--run-config", run_config],
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
    finally:
        _kill_processes_of(home)
    out = done.stdout + done.stderr
    assert done.returncode == 0, out[-4000:]
    for round_ in (1, 2):
        assert f"round {round_} fit: 3 sampled, 3 ok, 0 declined, 0 rejected, 0 failed" in out
    assert out.count("Secure aggregation completed") >= 2
    losses = [float(x) for x in re.findall(r"round [12]: ([0-9.]+)\s*$", out, re.MULTILINE)]
    assert len(losses) >= 2 and losses[1] < losses[0], out[-2000:]
