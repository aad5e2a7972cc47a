"""``fedrec server start``: run Flower's SuperLink from a server state directory, keep its
device registrations in line with ``clients.json``, submit the federated run, follow it.

How Flower 1.42 is used (its deployment engine; nothing of it is reimplemented here):

* ``flower-superlink`` serves the Fleet API (devices), the Control API (``flwr`` CLI) and the
  runtime API on **one HTTPS port** (Control and runtime requests from another host are refused:
  :mod:`server.superlink_guard`; devices reach only the Fleet API), with
  ``--ssl-ca-certfile/--ssl-certfile/--ssl-keyfile`` from ``certs/``, ``--database superlink.db``
  (runs, nodes and registrations survive a restart), ``--enable-supernode-auth`` (a SuperNode must
  sign with a key registered through the Control API; any other is refused at activation) and
  ``--disable-runtime-dependency-installation`` (the SuperExec it starts runs the ServerApp
  with the packages already installed; nothing is fetched at run time: the app's FAB carries
  only a generated ``pyproject.toml`` whose components point at this installed package).
* ``flwr supernode unregister/ls``, ``flwr run`` and ``flwr ls/stop`` talk to the Control
  API with ``FLWR_HOME=STATE_DIR/flwr-home``, whose ``config.toml`` names this SuperLink
  (address + ``root-certificates = certs/ca.pem``). New keys are registered in one process
  over one connection, with the ``flwr`` CLI's own client code (:mod:`server.flwr_register`,
  the same FLWR_HOME: ``flwr supernode register`` takes one key a call, 2.3 s each).
* Registration takes effect at once on a running SuperLink (a revoked device's next request
  is refused); ``clients.json`` is the source of truth that every start re-applies (register
  what is missing, unregister what was revoked while the server was down, and any node no
  device in it holds).

Resume: every run is submitted with the same ``checkpoint-dir``, so a new run after a crash
(of this process, the SuperLink or the machine) continues from the newest checkpoint.
"""

from __future__ import annotations

import contextlib
import functools
import http.client
import json
import os
import re
import select
import shlex
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from server.pki import SubjectNames, check_pki, dns_name_key, server_names, unbracketed
from server.state import (
    ClientRecord,
    ClientRegistry,
    ProgressTail,
    ServerLayout,
    StateDirError,
    hold_server_lock,
    read_running,
    resumable_round,
    round_aggregated,
    running_server,
)
from shared.config import is_int
from shared.errors import ConfigError, FedRecError
from shared.federated.task import STUDENT_TASK, RunConfigValue
from shared.io import (
    DISK_FULL_ERRNOS,
    MIN_LOG_BYTES,
    disk_full,
    raise_naming,
    trim_log,
    write_bytes_atomic,
    write_json_atomic,
)
from shared.processes import (
    ProcessKey,
    console_script,
    descendants,
    die_with_parent,
    python_executable,
    reap_group,
    terminate_group,
    terminate_processes,
)

if TYPE_CHECKING:  # Flower: imported only when the run config is built
    from server.server_app import ServerConfig

CONNECTION = "fedrec"
#: The tasks whose run-config keys :func:`run_config_keys` lists.
BUILT_IN_TASKS = (STUDENT_TASK, "toy-linear")
DEPLOY_SERVERAPP = "server.deploy_app:app"
CLIENTAPP = "client.client_app:app"


class SuperLinkError(FedRecError):
    """The SuperLink did not start, died, or refused a request."""


class RunFailedError(FedRecError):
    """The federated run ended without completing."""


# --------------------------------------------------------------------------- executables


def flower_env(layout: ServerLayout) -> dict[str, str]:
    """Environment of every Flower process of this server (offline, own FLWR_HOME)."""
    env = dict(os.environ)
    # flower-superlink starts `flower-superexec` (and it `flwr-serverapp`) by name: the
    # installed console scripts go first on PATH (a virtual environment need not be active).
    bin_dir = str(Path(console_script("flower-superlink")).parent)
    env["PATH"] = os.pathsep.join(p for p in (bin_dir, env.get("PATH", "")) if p)
    env["FLWR_HOME"] = str(layout.flwr_home.resolve())
    env.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    env.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


# --------------------------------------------------------------------------- flwr CLI


@dataclass(frozen=True)
class FlwrCli:
    """The ``flwr`` command against this server's SuperLink (``--format json`` parsed)."""

    layout: ServerLayout
    timeout_s: float = 60.0

    def call(self, *args: str) -> dict[str, Any]:
        argv = [console_script("flwr"), *args, "--format", "json"]
        try:
            done = subprocess.run(
                argv,
                env=flower_env(self.layout),
                capture_output=True,
                text=True,
                timeout=self.timeout_s,
                cwd=self.layout.state_dir,
                check=False,
            )
        except subprocess.TimeoutExpired:
            raise SuperLinkError(
                f"`flwr {args[0]}` did not answer in {self.timeout_s:.0f} s; is the SuperLink "
                f"up? (see {self.layout.superlink_log})"
            ) from None
        text = done.stdout.strip()
        start = text.find("{")
        try:
            result = json.loads(text[start:]) if start >= 0 else {}
        except json.JSONDecodeError:
            result = {}
        if not isinstance(result, dict) or not result.get("success", False):
            message = result.get("error-message") if isinstance(result, dict) else None
            detail = str(message or done.stderr.strip() or text or f"exit status {done.returncode}")
            raise SuperLinkError(f"`flwr {' '.join(args[:2])}` failed: {detail.strip()}")
        return result

    def nodes(self) -> dict[int, str]:
        """Registered node ids and their status (``registered``, ``online``, ...)."""
        out = self.call("supernode", "ls", CONNECTION)
        return {int(n["node-id"]): str(n.get("status", "")) for n in out.get("nodes", [])}

    def register_keys(self, public_keys: Sequence[str]) -> Iterator[int | SuperLinkError]:
        """Register each OpenSSH public key line, in order, over one connection (one
        process, :mod:`server.flwr_register`; one ``flwr`` call a key cost 2.3 s a device):
        yields its node id, or the :class:`SuperLinkError` that refused that key alone (a key
        in use, one Flower does not take), and goes on with the next. The next key is sent
        only once the caller asked for its result (it saved the last one). A failure that is
        not about one key (the SuperLink unreachable, no answer in ``timeout_s``) is raised,
        and no key after it is registered."""
        if not public_keys:
            return
        argv = [python_executable(), "-m", "server.flwr_register", CONNECTION]
        env = flower_env(self.layout)
        # this very code (a checkout run in place, too), whatever the state dir's folder
        root = str(Path(__file__).resolve().parent.parent)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
        with (
            tempfile.TemporaryFile() as stderr,
            subprocess.Popen(
                argv,
                env=env,
                cwd=self.layout.state_dir,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=stderr,
                text=True,
            ) as helper,
        ):
            assert helper.stdin is not None and helper.stdout is not None
            try:
                for key in public_keys:
                    answer = self._exchange(helper, key, stderr)
                    error = answer.get("error")
                    if error is None:
                        yield int(answer["node-id"])
                        continue
                    failure = SuperLinkError(f"`flwr supernode register` failed: {error}")
                    if answer.get("fatal", True):
                        raise failure
                    yield failure
            finally:
                with contextlib.suppress(OSError):
                    helper.stdin.close()
                try:
                    helper.wait(timeout=self.timeout_s)
                except subprocess.TimeoutExpired:
                    helper.kill()

    def _exchange(self, helper: subprocess.Popen[str], key: str, stderr: Any) -> dict[str, Any]:
        """Send ``key`` to the registering process and read its answer (a SuperLinkError
        when there is none in ``timeout_s``, or when it died: with what it printed)."""
        assert helper.stdin is not None and helper.stdout is not None
        try:
            helper.stdin.write(key.strip() + "\n")
            helper.stdin.flush()
        except OSError:  # it died already; its exit is reported below
            pass
        ready, _, _ = select.select([helper.stdout], [], [], self.timeout_s)
        line = helper.stdout.readline() if ready else None
        if line is None:
            helper.kill()
            raise SuperLinkError(
                f"`flwr supernode register` did not answer in {self.timeout_s:.0f} s; is the "
                f"SuperLink up? (see {self.layout.superlink_log})"
            )
        try:
            answer = json.loads(line)
        except json.JSONDecodeError:
            answer = None
        if not isinstance(answer, dict):
            helper.wait()
            stderr.seek(0)
            detail = stderr.read().decode(errors="replace").strip().splitlines()[-1:]
            raise SuperLinkError(
                "`flwr supernode register` failed: "
                f"{detail[0] if detail else f'exit status {helper.returncode}'}"
            )
        return answer

    def unregister(self, node_id: int) -> None:
        self.call("supernode", "unregister", str(node_id), CONNECTION)

    def run(self, app_dir: Path) -> int:
        out = self.call("run", str(app_dir.resolve()), CONNECTION)
        return int(out["run-id"])

    def runs(self) -> list[dict[str, Any]]:
        runs = self.call("ls", CONNECTION).get("runs", [])
        return [r for r in runs if isinstance(r, dict)]

    def run_status(self, run_id: int) -> str:
        for run in self.call("ls", CONNECTION, "--run-id", str(run_id)).get("runs", []):
            if str(run.get("run-id")) == str(run_id):
                return str(run.get("status", ""))
        return ""

    def stop(self, run_id: int) -> None:
        self.call("stop", str(run_id), CONNECTION)

    def save_log(self, run_id: int, path: Path) -> str | None:
        """Write the run's logs (ServerApp output) to ``path``; best effort: ``None`` once
        saved, else why not (a full disk, ``flwr log`` not answering), so that no message
        points at a log that was never written."""
        argv = [console_script("flwr"), "log", str(run_id), CONNECTION, "--show"]
        try:
            done = subprocess.run(
                argv,
                env=flower_env(self.layout),
                capture_output=True,
                timeout=self.timeout_s,
                cwd=self.layout.state_dir,
                check=False,
            )
            write_bytes_atomic(path, done.stdout + done.stderr)
        except subprocess.TimeoutExpired:
            return f"`flwr log` did not answer in {self.timeout_s:.0f} s"
        except OSError as exc:
            return f"{exc.strerror or exc}{': free space on that disk' if disk_full(exc) else ''}"
        return None


def write_connection(layout: ServerLayout, address: str) -> None:
    """``FLWR_HOME/config.toml``: the ``fedrec`` connection to this SuperLink over TLS."""
    import tomli_w

    config = {
        "superlink": {
            "default": CONNECTION,
            CONNECTION: {
                "address": address,
                "root-certificates": str(layout.pki.ca_cert.resolve()),
            },
        }
    }
    write_bytes_atomic(layout.flwr_home / "config.toml", tomli_w.dumps(config).encode())


# --------------------------------------------------------------------------- registrations


def apply_registrations(layout: ServerLayout, cli: FlwrCli) -> list[str]:
    """Make the SuperLink's registrations match ``clients.json``; returns what was done.

    Holds the registry's lock throughout, so a concurrent ``register-client`` or
    ``revoke-client`` waits instead of being overwritten; each change is saved as soon as
    the SuperLink made it (a node id the SuperLink gave and a process killed before the
    end lost could never be unregistered: a later revocation would leave the device
    accepted), and again when a later SuperLink call fails."""
    with ClientRegistry.locked(layout.registry) as registry:
        layout.require_registry()
        return apply_locked(layout, cli, registry)


def apply_locked(layout: ServerLayout, cli: FlwrCli, registry: ClientRegistry) -> list[str]:
    """:func:`apply_registrations` on a registry its caller loaded and still holds locked
    (:meth:`ClientRegistry.locked`); the outcome for each key is in its record (``node_id``,
    ``applied``), saved as there. ``register-client`` adds its key and applies it under one
    lock, so it reads ``clients.json`` once: each read checks every stored key (0.4 s at
    10,000 devices), and it read the file again to apply and a third time to see whether its
    key was taken."""
    try:
        return _apply(layout, cli, registry)
    finally:
        registry.save()


def _apply(layout: ServerLayout, cli: FlwrCli, registry: ClientRegistry) -> list[str]:
    statuses = cli.nodes()
    listed = {n for n, status in statuses.items() if status != "unregistered"}
    done: list[str] = []
    new = [
        record
        for record in registry.clients
        if record.revoked is None and not (record.node_id is not None and record.node_id in listed)
    ]
    # all new keys over one connection (cli.register_keys); each result saved before the
    # next key is sent, and a key the SuperLink refuses leaves the others to go on
    for record, result in zip(new, cli.register_keys([r.public_key for r in new]), strict=False):
        if isinstance(result, int):
            record.node_id = result
            listed.add(result)
            record.applied = True
            done.append(f"registered {record.name} as node {record.node_id}")
        elif "already in use" not in str(result):
            record.applied = False
            done.append(f"could not register {record.name} ({record.fingerprint}): {result}")
        elif record.node_id is not None and statuses.get(record.node_id) == "unregistered":
            record.applied = False
            done.append(_locked_out(record))
        else:
            record.applied = True
            done.append(f"{record.name}: already registered")
        registry.save()
    for record in registry.clients:
        present = record.node_id is not None and record.node_id in listed
        if record.revoked is None:  # registered above, or already
            record.applied = record.applied or present
            continue
        if present and record.node_id is not None:
            cli.unregister(record.node_id)
            record.applied = False
            registry.save()
            done.append(f"unregistered {record.name} (node {record.node_id})")
        elif record.applied and record.node_id is None:
            done.append(
                f"could not unregister {record.name}: the SuperLink holds its key under a node "
                "id this registry does not know; find it with `flwr supernode ls` and remove "
                "it with `flwr supernode unregister NODE_ID`"
            )
        else:
            record.applied = False
    done += _unregister_unknown(cli, registry, listed)
    return done


def _locked_out(record: ClientRecord) -> str:
    """What to do about an active device whose key the SuperLink unregistered (by hand, with
    `flwr supernode unregister`): Flower never registers an unregistered key again."""
    return (
        f"{record.name} is refused by the SuperLink: its key was unregistered there outside "
        f"fedrec (node {record.node_id}), and the SuperLink never accepts an unregistered key "
        "again; the device must run `fedrec client rotate-key` and its new key be registered "
        f"(`fedrec server revoke-client {record.name}` first)"
    )


def _unregister_unknown(cli: FlwrCli, registry: ClientRegistry, listed: set[int]) -> list[str]:
    """Unregister the SuperLink's nodes no record of ``registry`` holds (a key registered
    with ``flwr supernode register`` outside ``register-client``): ``clients.json`` decides
    which devices may join. None is touched while an active device has no node id the
    SuperLink lists, since its key may be held under one of those."""
    known = {record.node_id for record in registry.clients}
    unknown = sorted(listed - known)
    if not unknown:
        return []
    active = [record.node_id for record in registry.clients if record.revoked is None]
    if not all(node_id in listed for node_id in active):
        return [
            f"node {node_id} is registered with the SuperLink but held by no device in "
            "clients.json; kept, as a registered device's key may be under it: check with "
            "`flwr supernode ls`, and remove it with `flwr supernode unregister NODE_ID`"
            for node_id in unknown
        ]
    done = []
    for node_id in unknown:
        cli.unregister(node_id)
        done.append(
            f"unregistered node {node_id}: no device in clients.json holds it (registered "
            "outside `fedrec server register-client`)"
        )
    return done


def live_cli(layout: ServerLayout) -> FlwrCli | None:
    """A CLI for the running server of ``layout``, or ``None`` when none runs."""
    # running.json is written once the SuperLink answers, before registrations
    if running_server(layout) is None or read_running(layout) is None:
        return None
    return FlwrCli(layout)


# --------------------------------------------------------------------------- the app


def deployment_run_config(
    layout: ServerLayout,
    *,
    bundle: Path | None,
    num_rounds: int,
    overrides: Mapping[str, RunConfigValue],
) -> dict[str, RunConfigValue]:
    """The run config of the submitted run: server defaults, the deployment's paths, and
    the operator's overrides (``--run-config``)."""
    from server.server_app import ServerConfig
    from shared.federated.bundle import bundle_digest

    fixed: dict[str, RunConfigValue] = {
        "checkpoint-dir": str(layout.checkpoints.resolve()),
        "artifact-dir": str(layout.artifacts.resolve()),
        "progress-file": str(layout.progress.resolve()),
    }
    for key in fixed:
        if key in overrides and overrides[key] != fixed[key]:
            raise ConfigError(
                f"'{key}' is part of the state directory and cannot be overridden; use "
                "another --state-dir instead"
            )
    config: dict[str, RunConfigValue] = dict(ServerConfig().to_run_config())
    config.update({"num-rounds": num_rounds, "secagg": True, **fixed})
    quorum = config["secagg-reconstruction-threshold"]  # a deployment's default minimum
    if isinstance(quorum, int) and isinstance(config["min-available-clients"], int):
        config["min-available-clients"] = max(config["min-available-clients"], quorum)
    if bundle is not None:
        if not bundle.is_file():
            raise ConfigError(
                f"--bundle {bundle} is not a file; write one with `fedrec simulate` "
                "(runs/<name>/deploy-bundle.pt) and give every device the same file"
            )
        config.update(
            {
                "task": STUDENT_TASK,
                "bundle": str(bundle.resolve()),
                "bundle-sha256": bundle_digest(bundle),
                "state-dir": str(layout.task_state.resolve()),
            }
        )
    config.update(overrides)
    if config.get("task") in BUILT_IN_TASKS:  # a custom task may read keys of its own
        check_known_keys(overrides, given="--run-config")
    if config.get("task") == STUDENT_TASK and not config.get("bundle"):
        raise ConfigError("the student task needs --bundle (the pretrained bundle)")
    if bundle is None and "task" not in overrides:
        raise ConfigError(
            "give --bundle (the pretrained bundle from `fedrec simulate`), or "
            "--run-config task=toy-linear for a smoke test without a model"
        )
    # the server's settings as the ServerApp reads them (shared.config.coerce): this process
    # reads num-rounds, secagg, ... from the run config too, and must not read
    # num-rounds=4.0 or secagg=0 otherwise
    config.update(_check_apps_accept(config).to_run_config())
    _check_secagg_quorum(config)
    return config


def _check_secagg_quorum(config: Mapping[str, RunConfigValue]) -> None:
    """Refuse a deployment whose rounds could start with fewer devices than SecAgg+ (on
    unless ``--no-secagg``) needs to unmask: such a run completed with every round failed
    ("Insufficient available nodes" in the ServerApp's log)."""
    if config.get("secagg") is False:
        return
    threshold = config.get("secagg-reconstruction-threshold")
    least = config.get("min-available-clients")
    cohort = config.get("cohort-size", 0)
    if is_int(threshold) and isinstance(least, int) and cohort == 0 and threshold > least:
        raise ConfigError(
            f"SecAgg+ needs at least 'secagg-reconstruction-threshold' = {threshold} devices "
            f"in a round, but the run may start with 'min-available-clients' = {least} "
            f"(--min-clients); raise --min-clients to {threshold} or lower the threshold"
        )


@functools.cache
def run_config_keys() -> frozenset[str]:
    """Every key the submitted apps read: the server's, the clients' training and student
    task settings, the toy task's (``toy-*``), the shared ``seed`` and the progress file.
    Fixed by the code, so built once: a simulation's clients check their settings against
    it at every message."""
    from dataclasses import fields

    from server.deploy_app import PROGRESS_FILE_KEY
    from server.server_app import ServerConfig
    from shared.config import field_names
    from shared.federated.local_config import LocalTrainConfig
    from shared.federated.student_config import StudentTaskConfig
    from shared.federated.task import ToyLinearConfig

    toy = {f"toy-{f.name.replace('_', '-')}" for f in fields(ToyLinearConfig)}
    readers = (ServerConfig, LocalTrainConfig, StudentTaskConfig)
    return frozenset().union(*(field_names(c) for c in readers), toy, {"seed", PROGRESS_FILE_KEY})


def check_known_keys(run_config: Mapping[str, RunConfigValue], *, given: str) -> None:
    """Refuse a key no app reads (a typo would otherwise be ignored silently, e.g. a privacy
    setting that never takes effect), naming the closest valid keys; ``given`` names where
    the keys came from (``--run-config``, or the Python API's ``run_config``)."""
    import difflib

    from shared.config import kebab

    known = run_config_keys()
    for key in run_config:
        if kebab(key) not in known:  # snake_case is the same setting to every reader
            close = difflib.get_close_matches(key, sorted(known), n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise ConfigError(
                f"unknown {given} key {key!r}{hint} (the keys are those of "
                "[tool.flwr.app.config] in the project's pyproject.toml)"
            )


def _check_apps_accept(config: Mapping[str, RunConfigValue]) -> ServerConfig:
    """Refuse now what the ServerApp would refuse at its start: its settings, the task, the
    task's model (a bundle that is not one) and a checkpoint it could not resume from.
    After submission such a failure only shows
    as a failed run whose reason is inside the ServerApp's log, and every restart of the
    server would submit the same failing run. Returns the server's settings."""
    from server.server_app import ServerConfig, bundle_digest_of, check_resume, server_task
    from shared.config import field_names, from_flat
    from shared.federated.local_config import LocalTrainConfig

    server = ServerConfig.from_run_config(config)
    # the devices' training settings, whatever the task (the toy task ignores them, but a
    # deployment's flags are checked all the same: they are what devices would train with)
    training = field_names(LocalTrainConfig)
    from_flat(LocalTrainConfig, {k: v for k, v in config.items() if k in training})
    task = server_task(server, config)
    initial = task.initial_parameters()
    from shared.federated.student_task import StudentTask

    if isinstance(task, StudentTask):  # the bundle the task just read, not a second read
        from shared.federated.bundle import check_deployable

        check_deployable(task.bundle, task.config.bundle)
    check_resume(server, initial, bundle_digest_of(config))
    return server


def write_app(layout: ServerLayout, run_config: Mapping[str, RunConfigValue]) -> Path:
    """Generate the Flower app submitted by ``flwr run``: only a ``pyproject.toml`` whose
    components are this installed package's ServerApp/ClientApp and whose config is the
    run config (``flwr run`` only accepts keys the app declares)."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as package_version

    import tomli_w

    try:
        version = package_version("fedrec")
    except PackageNotFoundError:
        version = "0.1.0"
    pyproject = {
        "build-system": {"requires": ["setuptools>=68"], "build-backend": "setuptools.build_meta"},
        "project": {
            "name": "fedrec-deployment",
            "version": version if version.count(".") == 2 else "0.1.0",
            "description": "fedrec federated run (generated by `fedrec server start`)",
            "license": "Apache-2.0",
            "dependencies": [],
        },
        "tool": {
            "flwr": {
                "app": {
                    "publisher": "fedrec",
                    "components": {"serverapp": DEPLOY_SERVERAPP, "clientapp": CLIENTAPP},
                    "config": dict(run_config),
                }
            }
        },
    }
    path = layout.app_dir / "pyproject.toml"
    write_bytes_atomic(path, tomli_w.dumps(pyproject).encode())
    return layout.app_dir


# --------------------------------------------------------------------------- the SuperLink


@dataclass(frozen=True)
class SuperLinkOptions:
    """Where the SuperLink listens, and how patiently it is supervised."""

    host: str = "0.0.0.0"
    port: int = 9093
    ready_timeout_s: float = 60.0
    max_restarts: int = 3
    status_interval_s: float = 5.0
    #: the first status check's delay once the run's final round is recorded: the run
    #: ends moments later (the ServerApp's summary and exit), and `server start` with it;
    #: later checks double it, back to ``status_interval_s`` (each is a `flwr` process)
    final_status_interval_s: float = 0.5
    # a submitted run that no executor has picked up (still "pending") after this long
    # never will: it is reported instead of waited for
    pending_timeout_s: float = 300.0
    #: the most ``logs/superlink.log`` holds: the SuperLink logs calls of every device in
    #: every round, for as long as the federation runs; beyond it the oldest lines are
    #: dropped, keeping the newest half
    max_log_bytes: int = 100 * 1024 * 1024
    #: the most ``logs/run-ID.log`` kept (one is saved for each run a start submits): the
    #: oldest are removed when one is saved, never the followed run's nor one a message of
    #: this start names
    max_run_logs: int = 50

    def __post_init__(self) -> None:
        # an IPv6 address written as in a URL ([::1]), which `server init --host` takes too:
        # the SuperLink, the port probe and the certificate check want the address itself
        object.__setattr__(self, "host", unbracketed(self.host))
        if not 0 < self.port < 65536:
            raise ConfigError(f"--port must be in 1..65535, got {self.port}")
        if self.max_restarts < 0:
            raise ConfigError(f"--max-restarts must be >= 0, got {self.max_restarts}")
        if not self.ready_timeout_s > 0:
            raise ConfigError(f"the ready timeout must be > 0, got {self.ready_timeout_s}")
        if not self.pending_timeout_s > 0:
            raise ConfigError("the pending timeout must be > 0")
        if self.max_log_bytes < MIN_LOG_BYTES:
            raise ConfigError(
                f"--max-log-bytes must be >= {MIN_LOG_BYTES} (a trimmed log keeps half of "
                f"it), got {self.max_log_bytes}"
            )
        if self.max_run_logs < 1:
            raise ConfigError(f"--max-run-logs must be >= 1, got {self.max_run_logs}")


_WILDCARD_LOOPBACK = {"0.0.0.0": "127.0.0.1", "": "127.0.0.1", "::": "::1"}
"""The loopback address Flower's SuperLink gives its SuperExec when it listens on a wildcard
(``flwr.supercore.address.resolve_bind_address``); TLS is checked on that connection."""


def control_host(layout: ServerLayout, listen_host: str) -> str:
    """The name this machine uses to reach its own SuperLink; it must be in the
    certificate's SANs (TLS is checked on this connection too).

    Listening on a wildcard, the SuperLink's own SuperExec connects through the loopback
    address, so the certificate must name it: without it the SuperExec fails the TLS check
    and no run ever starts.
    """
    names = server_names(layout.pki)
    loopback = _WILDCARD_LOOPBACK.get(listen_host)
    if loopback is None:
        # junk is refused as junk, not as a missing SAN; names compare as TLS does
        asked = SubjectNames.parse([listen_host])
        if not set(asked.dns) | set(map(str, asked.ips)) <= set(map(dns_name_key, names)):
            raise ConfigError(
                f"--host {listen_host} is not in the server certificate ({', '.join(names)}); "
                f"listen on one of those, or add it with `fedrec server renew-cert --host "
                f"{shlex.quote(listen_host)} ...` (the same CA: devices keep their ca.pem)"
            )
        return listen_host
    if loopback not in names:
        also = "" if loopback == "127.0.0.1" else f" --host {loopback}"
        raise ConfigError(
            f"the server certificate ({', '.join(names)}) does not name {loopback}, which the "
            f"SuperLink's own run executor connects to when it listens on all addresses: pass "
            f"`--host {names[0]}` to listen on that address only, or add it with "
            f"`fedrec server renew-cert --host ...{also}` (it adds localhost and 127.0.0.1)"
        )
    return loopback


class SuperLinkProcess:
    """``flower-superlink`` as a child process (stdout/stderr to ``logs/superlink.log``)."""

    def __init__(self, layout: ServerLayout, options: SuperLinkOptions) -> None:
        self.layout = layout
        self.options = options
        self.popen: subprocess.Popen[bytes] | None = None
        #: where the SuperLink is reached (``host`` to connect to, ``address`` as HOST:PORT
        #: with an IPv6 host in brackets, which Flower's CLI and gRPC need)
        self.host = control_host(layout, options.host)
        self.address = (
            f"[{self.host}]:{options.port}" if ":" in self.host else f"{self.host}:{options.port}"
        )
        # its SuperExec and ServerApps as last seen: a crashed SuperLink's orphans are stopped
        # with it although they left its process group (see remember_descendants)
        self._descendants: set[ProcessKey] = set()
        #: where this start's output begins in the (appended) log
        self._log_offset = 0

    def trim_log(self) -> None:
        """Keep ``logs/superlink.log`` under ``max_log_bytes`` (called while following a run;
        where this start's output begins moves with it)."""
        dropped = trim_log(self.layout.superlink_log, self.options.max_log_bytes)
        self._log_offset = max(0, self._log_offset - dropped)

    def remember_descendants(self) -> None:
        """Note the processes the SuperLink runs now (called while following a run)."""
        if self.popen is not None and self.alive():
            self._descendants |= descendants(self.popen.pid)

    def argv(self) -> list[str]:
        pki = self.layout.pki
        console_script("flower-superlink")  # installed (its SuperExec is started by name)
        return [
            # flower-superlink's own code, with the Control and runtime APIs refused to
            # other hosts (see server.superlink_guard)
            python_executable(),
            "-m",
            "server.superlink_guard",
            "--ssl-ca-certfile",
            str(pki.ca_cert.resolve()),
            "--ssl-certfile",
            str(pki.server_cert.resolve()),
            "--ssl-keyfile",
            str(pki.server_key.resolve()),
            "--database",
            str(self.layout.database.resolve()),
            "--enable-supernode-auth",
            "--disable-runtime-dependency-installation",
            "--host",
            self.options.host,
            "--port",
            str(self.options.port),
        ]

    def start(self) -> None:
        self.layout.logs.mkdir(parents=True, exist_ok=True)
        self._check_port_free()
        # unbuffered: a banner the disk has no room for fails in its write, named below,
        # and not again (unnamed, a traceback) in the close's flush
        with open(self.layout.superlink_log, "ab", buffering=0) as log:
            try:
                log.write(f"\n=== fedrec server start: {time.ctime()} ===\n".encode())
            except OSError as exc:  # a full disk names no file
                raise_naming(exc, self.layout.superlink_log)
            self._log_offset = log.tell()
            self.popen = subprocess.Popen(
                self.argv(),
                env=flower_env(self.layout),
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=self.layout.state_dir,
                preexec_fn=die_with_parent if sys.platform == "linux" else None,
                # its own process group: stop() reaches the SuperExec and ServerApp it starts
                start_new_session=True,
            )
        self.wait_ready()

    def _check_port_free(self) -> None:
        """Refuse a port something already accepts connections on, and a ``--host`` this
        machine cannot resolve (the SuperLink could not listen there: a DNS name only the
        devices resolve ended ``server start`` with a raw ``socket.gaierror``)."""
        host = "127.0.0.1" if self.options.host in ("0.0.0.0", "") else self.options.host
        try:
            addresses = socket.getaddrinfo(host, self.options.port, type=socket.SOCK_STREAM)
        except socket.gaierror as exc:
            raise ConfigError(
                f"--host {host} does not resolve on this machine ({exc.strerror}), so the "
                "SuperLink cannot listen on it; give one of this machine's addresses, or "
                "0.0.0.0 to listen on all of them"
            ) from None
        for family, kind, proto, _, address in addresses:
            with socket.socket(family, kind, proto) as sock:
                sock.settimeout(1.0)
                if sock.connect_ex(address) == 0:
                    raise SuperLinkError(
                        f"port {self.options.port} is already in use on {host}; another "
                        "SuperLink may be running - stop it or pick another --port"
                    )

    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def wait_ready(self) -> None:
        """Until ``GET /health`` answers over TLS (verifying the certificate chain)."""
        host, port = self.host, self.options.port
        context = ssl.create_default_context(cafile=str(self.layout.pki.ca_cert))
        deadline = time.monotonic() + self.options.ready_timeout_s
        last = "no answer"
        while time.monotonic() < deadline:
            if not self.alive():
                raise SuperLinkError(self._exit_reason())
            try:
                conn = http.client.HTTPSConnection(host, port, context=context, timeout=2)
                conn.request("GET", "/health")
                if conn.getresponse().status == 200:
                    return
            except ssl.SSLCertVerificationError as exc:
                raise SuperLinkError(
                    f"the SuperLink's certificate does not verify against certs/ca.pem for "
                    f"{host} ({exc.verify_message}); `fedrec server renew-cert` issues a new one"
                ) from exc
            except OSError as exc:
                last = str(exc)
            time.sleep(0.3)
        self.stop()
        raise SuperLinkError(
            f"the SuperLink did not answer on https://{self.address} within "
            f"{self.options.ready_timeout_s:.0f} s ({last}); see {self.layout.superlink_log}"
        )

    def _exit_reason(self) -> str:
        """Why the SuperLink exited during start-up, from what this start wrote to its log.

        Its HTTPS port taken by a process the pre-start probe could not reach (bound but not
        accepting, or listening on another of this machine's addresses) made it exit at
        once, and the log alone said so: the message names the port instead."""
        code = self.popen.returncode if self.popen else "?"
        try:
            with open(self.layout.superlink_log, "rb") as log:
                log.seek(self._log_offset)
                output = log.read().decode(errors="replace")
        except OSError:
            output = ""
        if "address already in use" in output.lower():
            return (
                f"port {self.options.port} is already in use on {self.options.host or '*'}: "
                "flower-superlink could not listen on it (another SuperLink or program holds "
                f"it); stop that program or pick another --port (see {self.layout.superlink_log})"
            )
        errors = [line.strip() for line in output.splitlines() if "ERROR" in line]
        detail = f" ({errors[-1]})" if errors else ""
        return (
            f"flower-superlink exited with status {code} during start-up{detail}; see "
            f"{self.layout.superlink_log}"
        )

    def stop(self, grace_s: float = 10.0) -> None:
        """SIGTERM the SuperLink's process group, SIGKILL after ``grace_s``; then whatever
        of the group outlived it (a ServerApp still running) after a short grace; then every
        descendant seen running under it that is still alive, wherever it went (a ServerApp
        in a session of its own, or orphaned by a SuperLink that crashed)."""
        proc = self.popen
        if proc is None:
            return
        family = self._descendants | (descendants(proc.pid) if self.alive() else set())
        terminate_group(proc, grace_s)
        reap_group(proc.pid, 3.0)
        terminate_processes(family, 3.0)
        self._descendants = set()


# --------------------------------------------------------------------------- start + follow


def format_round(record: Mapping[str, Any]) -> str:
    """One progress line for people."""
    metrics = record.get("eval_metrics") or {}
    acc = next((metrics[k] for k in ("sampled_hr@10", "full_hr@10", "mse") if k in metrics), None)
    acc_name = next((k for k in ("sampled_hr@10", "full_hr@10", "mse") if k in metrics), "acc")
    eps = record.get("epsilon_record_mean")
    eps_user = record.get("epsilon_user")
    clipped = record.get("clients_clipped")
    parts = [
        f"round {record.get('round')}/{record.get('num_rounds')}",
        f"clients {record.get('clients_ok')}/{record.get('clients_sampled')} ok "
        f"({record.get('clients_declined', 0)} declined, "
        f"{record.get('clients_failed', 0)} failed"
        + (f", {clipped} clipped)" if isinstance(clipped, int) and clipped > 0 else ")"),
        f"{acc_name} {acc:.4f}" if isinstance(acc, int | float) else f"{acc_name} n/a",
        f"eval loss {record['eval_loss']:.4f}"
        if isinstance(record.get("eval_loss"), int | float)
        else "eval loss n/a",
        f"mean device epsilon {eps:.3f}"
        if isinstance(eps, int | float)
        else "mean device epsilon n/a",
    ]
    if isinstance(eps_user, int | float):
        parts.append(f"user-level epsilon {eps_user:.3f}")
    seconds = record.get("round_seconds")
    parts.append(f"{seconds:.1f} s" if isinstance(seconds, int | float) else "n/a s")
    if record.get("backfilled"):
        parts.append("(from its checkpoint: a crash lost its progress line)")
    return ", ".join(parts)


_FINISHED = "finished:"


class ServerRunner:
    """One ``fedrec server start``: SuperLink up, registrations applied, run submitted and
    followed; a SuperLink that dies is restarted and the run resubmitted (it resumes)."""

    def __init__(
        self,
        layout: ServerLayout,
        options: SuperLinkOptions,
        run_config: Mapping[str, RunConfigValue],
        echo: Callable[[str], None],
    ) -> None:
        self.layout = layout.require()
        check_pki(layout.pki)
        self.options = options
        self.run_config = dict(run_config)
        self.echo = echo
        self.superlink = SuperLinkProcess(layout, options)
        self.cli = FlwrCli(layout)
        self.run_id: int | None = None
        #: the run logs this start's messages named: never removed to bound logs/
        self._named_logs: set[Path] = set()
        self._stopping = False
        self._stop_status = 130  # a Ctrl-C (SIGINT); _on_signal sets another signal's

    def _write_running(self, ready: bool) -> None:
        write_json_atomic(
            self.layout.running,
            {
                "pid": os.getpid(),
                "superlink_pid": self.superlink.popen.pid if self.superlink.popen else None,
                "address": self.superlink.address,
                "listen": f"{self.options.host}:{self.options.port}",
                "run_id": str(self.run_id) if self.run_id is not None else None,
                "ready": ready,
                "started": time.time(),
                # this run's total: `fedrec server status` shows it, not that of the progress
                # file's last line, which a resumed run with more rounds wrote before it
                "num_rounds": self.run_config.get("num-rounds"),
            },
        )

    def _on_signal(self, signum: int, frame: object) -> None:
        self._stopping = True
        self._stop_status = 128 + signum  # 143 for SIGTERM, as `fedrec simulate`
        raise KeyboardInterrupt

    def run(self) -> int:
        """Start, follow to the end of the run; the exit status (0 = completed)."""
        # without a lock file no server of this version ran here, but one of an earlier
        # version (which took no lock) might still run: running_server checks its pid then
        earlier = None if self.layout.server_lock.exists() else running_server(self.layout)
        if earlier is not None:
            raise StateDirError(
                f"a server already runs from {self.layout.state_dir} (pid {earlier['pid']}, "
                f"{earlier.get('address')}); stop it first"
            )
        with hold_server_lock(self.layout):
            total, done = self.run_config.get("num-rounds"), resumable_round(self.layout)
            if is_int(total) and (done or 0) >= total:
                # nothing to train: no SuperLink, no run that would only say "completed"; an
                # earlier start's failure is no longer the run's situation
                self.layout.last_start.unlink(missing_ok=True)
                self.echo(
                    f"all {total} rounds are done (the checkpoint of round {done}); nothing to "
                    "run. Give more --rounds to continue the run"
                )
                return 0
            return self._recorded_run()

    def _recorded_run(self) -> int:
        """:meth:`_run`, recorded in ``last-start.json`` when it begins and when it ends, so
        that ``fedrec server status`` tells a failed, stopped or killed start from a
        completed run (:func:`server.state.describe_last_start`)."""
        record: dict[str, Any] = {
            "pid": os.getpid(),
            "started": time.time(),
            "num_rounds": self.run_config.get("num-rounds"),
        }
        write_json_atomic(self.layout.last_start, record)

        def ended(**how: Any) -> None:
            # best effort: failing to record how it ended must not hide how it ended
            with contextlib.suppress(OSError):
                write_json_atomic(self.layout.last_start, {**record, "ended": time.time(), **how})

        try:
            code = self._run()
        except KeyboardInterrupt:  # a signal outside the loop that answers it with 130/143
            ended(exit_code=self._stop_status)
            raise
        except Exception as exc:
            ended(error=str(exc) or type(exc).__name__)
            raise
        ended(exit_code=code)
        return code

    def _run(self) -> int:
        write_connection(self.layout, self.superlink.address)
        write_app(self.layout, self.run_config)
        # SIGTERM stops this run like Ctrl-C; the previous handler is back once it ended
        previous = signal.signal(signal.SIGTERM, self._on_signal) if threading_main() else None
        restarts = 0  # deaths in a row, with no round checkpointed in between
        try:
            while True:
                before = resumable_round(self.layout) or 0
                self._start_superlink()
                outcome = self._follow()
                if outcome is not None:
                    return outcome
                self.superlink.stop()  # the rest of its process group
                if (resumable_round(self.layout) or 0) > before:
                    restarts = 0  # it checkpointed a round before it died: no crash loop
                if restarts >= self.options.max_restarts:
                    raise SuperLinkError(
                        f"the SuperLink died {restarts + 1} times; giving up (see "
                        f"{self.layout.superlink_log})"
                    )
                restarts += 1
                self.echo(
                    f"the SuperLink exited unexpectedly; restarting it ({restarts}/"
                    f"{self.options.max_restarts}); the run resumes from its checkpoint"
                )
        except KeyboardInterrupt:
            self.echo("stopping (the next `fedrec server start` resumes from the checkpoint)")
            if self.run_id is not None and self.superlink.alive():
                self._save_run_log(self.run_id)
            return self._stop_status
        finally:
            with signals_deferred():  # a second Ctrl-C must not leave the SuperLink running
                self.superlink.stop()
                self.layout.running.unlink(missing_ok=True)
            if previous is not None:
                signal.signal(signal.SIGTERM, previous)

    def _warn_if_too_few_devices(self) -> None:
        """Each round waits for ``min-available-clients`` devices (under SecAgg+ at least the
        fewest a secure round completes with): say so when fewer are registered than that,
        or the run looks hung."""
        from server.server_app import ServerConfig

        config = ServerConfig.from_run_config(self.run_config)
        needed = config.clients_needed
        registered = len(ClientRegistry.load(self.layout.registry).active())
        if registered < needed:
            why = (
                f"--min-clients {config.min_available_clients}"
                if needed == config.min_available_clients
                else "the fewest a SecAgg+ round completes with at these --secagg-num-shares / "
                "--secagg-reconstruction-threshold, --min-cohort and --noise-shares"
            )
            self.echo(
                f"warning: each round waits for {needed} devices ({why}) and {registered} "
                "are registered: register more (`fedrec server register-client`) or lower it"
            )

    def _start_superlink(self) -> None:
        self.superlink.start()
        self._write_running(ready=False)
        for line in apply_registrations(self.layout, self.cli):
            self.echo(line)
        self._warn_if_too_few_devices()
        self._handle_stale_runs()
        done = resumable_round(self.layout)
        if done:
            self.echo(f"resuming: the run continues after round {done} (its checkpoint)")
        self.run_id = self.cli.run(self.layout.app_dir)
        self._write_running(ready=True)
        self.echo(
            f"SuperLink on https://{self.superlink.address} (listening on "
            f"{self.options.host}:{self.options.port}); run {self.run_id} submitted "
            f"({self.run_config.get('num-rounds')} rounds, task {self.run_config.get('task')})"
        )

    def _handle_stale_runs(self) -> None:
        """Save the logs of the runs of earlier processes, and stop those unfinished."""
        runs = self.cli.runs()
        # the newest runs, whose logs are kept: an older finished run's missing log was
        # removed to keep logs/ bounded, not lost (saving it again would undo that)
        newest = sorted(runs, key=lambda r: str(r.get("pending-at") or ""), reverse=True)
        recent = {str(r.get("run-id")) for r in newest[: self.options.max_run_logs]}
        for run in runs:
            # a run of a previous process (its ServerApp died with that SuperLink): keep its
            # log, where whatever went wrong is. Whatever its status: the SuperLink may have
            # marked it finished (failed) by the time it is back, and then nobody saved it.
            earlier, status = int(run["run-id"]), str(run.get("status", ""))
            run_log = self._run_log(earlier)
            if status.startswith(_FINISHED):
                if not run_log.exists() and str(earlier) in recent:
                    self._save_run_log(earlier, named=False)
                continue
            if run_log.exists():
                self._named_logs.add(run_log)
                log_is = f"is in {run_log}"
            else:
                log_is = self._save_run_log(earlier)
            with contextlib.suppress(SuperLinkError):
                self.cli.stop(earlier)
                self.echo(f"stopped stale run {earlier} ({status}); its log {log_is}")

    def _run_log(self, run_id: int) -> Path:
        """Where the ServerApp's log of ``run_id`` is kept: saved when the run finishes, when
        the server is stopped, and when a restart finds the run stale."""
        return self.layout.logs / f"run-{run_id}.log"

    def _save_run_log(self, run_id: int, named: bool = True) -> str:
        """Save the ServerApp's log of ``run_id``; what a message says of it: ``"is in
        PATH"``, or ``"could not be saved to PATH (why)"`` where the disk had no room for it
        (a message pointed at a file that was never written). Older run logs are removed
        past ``max_run_logs``; this one is kept for this start where a message ``named``
        it."""
        path = self._run_log(run_id)
        problem = self.cli.save_log(run_id, path)
        if named:
            self._named_logs.add(path)
        self._prune_run_logs()
        return f"is in {path}" if problem is None else f"could not be saved to {path} ({problem})"

    def _prune_run_logs(self) -> None:
        """Keep the newest ``max_run_logs`` of ``logs/run-ID.log`` (by when each was saved),
        and the followed run's and those this start named whatever their age: logs/ grew
        with every run. Best effort: a log that cannot be removed stays."""
        keep = set(self._named_logs)
        if self.run_id is not None:
            keep.add(self._run_log(self.run_id))
        logs: list[tuple[float, Path]] = []
        for path in self.layout.logs.glob("run-*.log"):
            with contextlib.suppress(OSError):
                logs.append((path.stat().st_mtime, path))
        logs.sort(reverse=True)
        for _, path in logs[self.options.max_run_logs :]:
            if path not in keep:
                with contextlib.suppress(OSError):
                    path.unlink()

    def _rounds_left(self) -> int:
        """How many of the run's ``num-rounds`` no checkpoint covers yet."""
        total = self.run_config.get("num-rounds")
        if not is_int(total):
            return 0
        return max(0, total - (resumable_round(self.layout) or 0))

    def _follow(self) -> int | None:
        """Print each finished round; the exit status at the end of the run, or ``None``
        when the SuperLink died (the caller restarts it)."""
        assert self.run_id is not None
        progress = ProgressTail(self.layout.progress)  # this run's rounds are the new records
        # of this run's rounds, less those a restart wrote from an earlier process's
        # checkpoints: whether any ran, and whether any changed the global model
        ran = aggregated = False

        def show_new_rounds() -> bool:
            """Print the rounds recorded since the last call; whether the final one was."""
            nonlocal ran, aggregated
            final = False
            for record in progress.new_records():
                self.echo(format_round(record))
                if not record.get("backfilled"):
                    ran = True
                    aggregated = aggregated or round_aggregated(record)
                final = final or _final_round(record)
            return final

        next_check = 0.0
        interval = self.options.status_interval_s
        pending_until = time.monotonic() + self.options.pending_timeout_s
        while True:
            if show_new_rounds():
                # checked every status_interval_s, a run that had ended was noticed
                # seconds late (5 s, with the default, after the last round's line)
                interval = min(self.options.final_status_interval_s, interval)
                next_check = min(next_check, time.monotonic() + interval)
            if not self.superlink.alive():
                return None
            now = time.monotonic()
            if now >= next_check:
                next_check = now + interval
                interval = min(2 * interval, self.options.status_interval_s)
                self.superlink.remember_descendants()
                self.superlink.trim_log()
                try:
                    status = self.cli.run_status(self.run_id)
                except SuperLinkError:
                    if not self.superlink.alive():
                        return None
                    raise
                if status == "pending" and now > pending_until:
                    raise RunFailedError(
                        f"run {self.run_id} is still pending after "
                        f"{self.options.pending_timeout_s:.0f} s: the SuperLink's run executor "
                        f"did not start it; see {self.layout.superlink_log} for why"
                    )
                if status.startswith(_FINISHED):
                    show_new_rounds()
                    run_log = self._run_log(self.run_id)
                    log_is = self._save_run_log(self.run_id)
                    if status == "finished:completed":
                        unfinished = self._rounds_left()
                        if not ran and unfinished:
                            self.echo(
                                f"run {self.run_id} completed without running a round, with "
                                f"{unfinished} of its rounds still to run (e.g. the user-level "
                                f"privacy budget is spent); the ServerApp's log {log_is}"
                            )
                            return 1
                        if ran and not aggregated:
                            self.echo(
                                f"run {self.run_id} completed, but no round changed the global "
                                "model: every sampled device failed or declined (the reasons "
                                "are in the devices' logs/supernode.log and the ServerApp's "
                                f"log, which {log_is})"
                            )
                            return 1
                        self.echo(f"run {self.run_id} completed")
                        return 0
                    raise RunFailedError(
                        f"run {self.run_id} ended as {status}{_failure_cause(run_log)}; the "
                        f"ServerApp's log {log_is} (`fedrec server start` again "
                        "resumes from the last checkpoint)"
                    )
            time.sleep(0.5)


_EXCEPTION_LINE = re.compile(r"^(?:[A-Za-z_][\w.]*\.)?\w*(?:Error|Exception): .+$")
"""The last line of a Python traceback: ``OSError: [Errno 28] No space left on device: ...``."""


def _failure_cause(run_log: Path) -> str:
    """``" (CAUSE)"``, CAUSE the last exception the failed run's ServerApp logged in
    ``run_log`` (its traceback's last line), with the fix for a full disk; ``""`` when the
    log holds none or could not be read. A checkpoint the disk had no room for failed the
    run with only "ended as finished:failed; the ServerApp's log is in ...", the reason
    somewhere in that log."""
    try:
        text = run_log.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""
    lines = (_ANSI.sub("", line).strip() for line in reversed(text.splitlines()))
    cause = next((line for line in lines if _EXCEPTION_LINE.match(line)), None)
    if cause is None:
        return ""
    if len(cause) > 300:
        cause = cause[:300] + "..."
    full = any(f"[Errno {code}]" in cause for code in DISK_FULL_ERRNOS)
    return f" ({cause}{': free space on that disk' if full else ''})"


_ANSI = re.compile(r"\x1b\[[0-9;]*m")
"""A terminal colour code (Flower colours its log levels)."""


def _final_round(record: dict[str, Any]) -> bool:
    """Whether progress ``record`` is of its run's last round (``num_rounds``)."""
    done, total = record.get("round"), record.get("num_rounds")
    return is_int(done) and is_int(total) and done >= total


@contextlib.contextmanager
def signals_deferred() -> Iterator[None]:
    """Ignore SIGINT and SIGTERM for the duration (in the main thread; elsewhere no signal
    handler runs anyway): the stop of the SuperLink's processes, bounded by its grace
    periods, runs to its end. A second Ctrl-C raised out of it and left them running."""
    if not threading_main():
        yield
        return
    saved = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, signal.SIG_DFL if handler is None else handler)


def threading_main() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()
