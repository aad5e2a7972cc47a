"""A real federation on loopback: `fedrec server init/register-client/start` and
`fedrec client init/start` as separate processes (the commands the Docker images run), TLS with
the init'd CA, SuperNode authentication, SecAgg+, the tiny student on each device's own store.

The main test walks one deployment through: three registered devices and one unregistered
(refused), events through each daemon's HTTP API, round 1, the server killed (-9) and started
again (it resumes from the round-1 checkpoint), round 2; every registered device then serves
global model version 2 with changed recommendations. A device killed in the middle of a round
is the separate, slower test (-m slow).

Timing on 2 loaded CPUs: each SecAgg+ stage costs a SuperNode poll (<= 3 s) plus one
`flwr-clientapp` process per device (and the daemons import torch at start). Measured with
other jobs loading the 2 CPUs (load average ~10): ~100 s per round, ~6-7 min for the main test.
With the test alone on them (load average ~2, what it makes itself) it takes 169-179 s, in
seconds: setup commands 11, device daemons up 14, events and adaptation 3, `server start` to
its run submitted 12-17 and to the first message at a device 5-7 more (its `flwr` CLI calls
and the ServerApp's start), round 1 44-52, kill 3, restart to the new run's first message
15-22, round 2 41-49, the run's end to `server start` exiting 5-7, the devices' stop 3-4. A
round's five messages per device (four SecAgg+ stages, evaluation) each wait for the
SuperNode's next pull (Flower polls every 3 s), the SuperExec's task poll (1 s) and a
ClientApp process's start (~1.5 s); training and evaluation compute is the rest. The
SuperNodes' reconnect back-off after the kill (Flower's: jittered, capped at 20 s) cost at
most ~2 s in 5 runs: the restarted SuperLink is up ~5 s after the kill, the new run's first
message 12-17 s after it (`server start`'s `flwr` CLI calls, the ServerApp's start).
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytestmark = pytest.mark.network

N_ITEMS = 40


def fedrec_cmd() -> list[str]:
    beside = Path(sys.executable).with_name("fedrec")
    return [str(beside)] if beside.exists() else [sys.executable, "-m", "fedrec.cli"]


_HANDED_OUT: set[int] = set()


def free_port() -> int:
    """A loopback port free now, below the kernel's ephemeral range (32768 and up by
    default). A port-0 bind picks from that range, where every outgoing connection of the
    federation also takes its local port: one once took a picked port before the device
    daemon bound it ("Address already in use")."""
    rng = random.Random()
    for _ in range(1000):
        port = rng.randrange(20000, 32000)
        if port in _HANDED_OUT:
            continue
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
        _HANDED_OUT.add(port)
        return port
    raise RuntimeError("no free loopback port in 20000-32000")


def wait_for(what: str, check: Callable[[], Any], timeout: float, interval: float = 0.5) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


class Device:
    """One `fedrec client start` process and its local HTTP API."""

    def __init__(
        self,
        root: Path,
        index: int,
        *,
        prefix: Sequence[str] = (),
        api_port: int | None = None,
        supernode_port: int | None = None,
    ) -> None:
        self.state = root / f"device-{index}"
        self.index = index
        self.proc: subprocess.Popen[bytes] | None = None
        self.prefix = list(prefix)  # before the command, e.g. `ip netns exec NS`
        self.api_port = api_port or free_port()
        self.supernode_port = supernode_port or free_port()

    def init(self) -> None:
        subprocess.run(
            [*fedrec_cmd(), "client", "init", "--state-dir", str(self.state)],
            check=True,
            capture_output=True,
        )

    @property
    def public_key(self) -> Path:
        return self.state / "identity" / "client.pub"

    @property
    def supernode_log(self) -> Path:
        return self.state / "logs" / "supernode.log"

    def start(self, server: str, ca: Path, bundle: Path) -> None:
        log = open(self.state.parent / f"device-{self.index}.out", "ab")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [
                *self.prefix,
                *fedrec_cmd(),
                "client",
                "start",
                "--state-dir",
                str(self.state),
                "--server",
                server,
                "--root-cert",
                str(ca),
                "--bundle",
                str(bundle),
                "--supernode-port",
                str(self.supernode_port),
                "--port",
                str(self.api_port),
                "--adapt-debounce",
                "0.2",
                # devices 0 and 1 share evaluation metrics; device 2 keeps the default
                *(["--share-evaluation"] if self.index < 2 else []),
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()

    def ready(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            out = (self.state.parent / f"device-{self.index}.out").read_text()
            raise AssertionError(f"device {self.index} exited ({self.proc.returncode}): {out}")
        if not (self.state / "api.json").exists():
            return False
        try:  # api.json is written when the socket is bound, a moment before it accepts
            self.status()
        except OSError:
            return False
        return True

    def call(self, method: str, path: str, body: Any = None) -> Any:
        token = (self.state / "identity" / "api.token").read_text().strip()
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(
            f"http://127.0.0.1:{self.api_port}{path}",
            data=data,
            method=method,
            headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=30) as response:
            return json.loads(response.read() or b"null")

    def status(self) -> dict[str, Any]:
        return dict(self.call("GET", "/status"))

    def scores(self) -> dict[str, float]:
        items = self.call("GET", "/recommendations?k=10")["items"]
        return {it["item_id"]: round(float(it["score"]), 4) for it in items}

    def stop(self, sig: int = signal.SIGTERM) -> int | None:
        """Signal the daemon and wait for it; its exit status (``None``: never started)."""
        self.signal(sig)
        return self.wait_stopped()

    def signal(self, sig: int = signal.SIGTERM) -> None:
        """Send ``sig`` to the daemon if it still runs (:meth:`wait_stopped` waits for it)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)

    def wait_stopped(self) -> int | None:
        """The daemon's exit status, killing it after 40 s (``None``: never started)."""
        if self.proc is None:
            return None
        try:
            return self.proc.wait(timeout=40)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()


def stop_devices(devices: Sequence[Device]) -> list[int | None]:
    """Stop the daemons together, their exit statuses in order: each one's stop takes ~3 s
    (its SuperNode's and SuperExec's exits, then the daemon's own), one after another most
    of the main test's last 10 s."""
    for device in devices:
        device.signal()
    return [device.wait_stopped() for device in devices]


class Federation:
    """The server state directory and its `fedrec server start` process."""

    def __init__(
        self,
        root: Path,
        write_bundle: Callable[[Path, int], list[str]],
        *,
        hosts: Sequence[str] = (),
        listen: str = "127.0.0.1",
        port: int | None = None,
        prefix: Sequence[str] = (),
    ) -> None:
        """``hosts``: `server init --host` names (the first is what devices connect to;
        none: the loopback defaults); ``listen``: `server start --host`; ``prefix``: before
        `server start`, e.g. `ip netns exec NS`."""
        self.root = root
        self.state = root / "server"
        self.bundle = root / "bundle.pt"
        self.port = port or free_port()
        self.connect_host = hosts[0] if hosts else "127.0.0.1"
        self.listen = listen
        self.prefix = list(prefix)
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0
        write_bundle(self.bundle, N_ITEMS)
        names = [arg for host in hosts for arg in ("--host", host)]
        subprocess.run(
            [*fedrec_cmd(), "server", "init", "--state-dir", str(self.state), *names],
            check=True,
            capture_output=True,
        )

    @property
    def address(self) -> str:
        return f"{self.connect_host}:{self.port}"

    @property
    def ca(self) -> Path:
        return self.state / "certs" / "ca.pem"

    def register(self, device: Device, name: str) -> None:
        subprocess.run(
            [
                *fedrec_cmd(),
                "server",
                "register-client",
                str(device.public_key),
                "--state-dir",
                str(self.state),
                "--name",
                name,
            ],
            check=True,
            capture_output=True,
        )

    def start(self, rounds: int, min_clients: int, run_config: str) -> None:
        self.starts += 1
        out = open(self.root / f"server-{self.starts}.out", "ab")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [
                *self.prefix,
                *fedrec_cmd(),
                "server",
                "start",
                "--state-dir",
                str(self.state),
                "--bundle",
                str(self.bundle),
                "--rounds",
                str(rounds),
                "--min-clients",
                str(min_clients),
                "--host",
                self.listen,
                "--port",
                str(self.port),
                "--run-config",
                run_config,
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
        out.close()

    def output(self) -> str:
        return "\n".join(
            (self.root / f"server-{i}.out").read_text() for i in range(1, self.starts + 1)
        )

    def progress(self) -> list[dict[str, Any]]:
        path = self.state / "progress.jsonl"
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

    def cli(self, command: str, *args: str) -> str:
        """`fedrec server COMMAND ... --state-dir STATE`; its output."""
        return subprocess.run(
            [*fedrec_cmd(), "server", command, *args, "--state-dir", str(self.state)],
            check=True,
            capture_output=True,
            text=True,
        ).stdout

    def ready(self) -> bool:
        with contextlib.suppress(OSError, ValueError):
            return bool(json.loads((self.state / "running.json").read_text()).get("ready"))
        return False

    def superlink_pid(self) -> int | None:
        with contextlib.suppress(OSError, ValueError, KeyError):
            return int(json.loads((self.state / "running.json").read_text())["superlink_pid"])
        return None

    def kill(self) -> None:
        """SIGKILL `fedrec server start` and wait until its SuperLink is gone too."""
        assert self.proc is not None
        superlink = self.superlink_pid()
        self.proc.kill()
        self.proc.wait()
        if superlink is not None:
            wait_for("the SuperLink to exit", lambda: not _alive(superlink), 60)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with contextlib.suppress(OSError, IndexError):
        return Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1][0] != "Z"
    return True


def start_devices(
    devices: Sequence[Device], fed: Federation, cleanup: list[Device | Federation]
) -> None:
    """Start every device's daemon against ``fed`` and wait for each one's local API."""
    for device in devices:
        device.start(fed.address, fed.ca, fed.bundle)
        cleanup.append(device)
    for device in devices:
        wait_for(f"device {device.index}'s API", device.ready, 120)


@pytest.fixture
def cleanup() -> Iterator[list[Device | Federation]]:
    started: list[Device | Federation] = []
    yield started
    for thing in started:
        if isinstance(thing, Federation) and thing.proc is not None and thing.proc.poll() is None:
            thing.proc.terminate()
            try:
                thing.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                thing.proc.kill()
    stop_devices([thing for thing in started if isinstance(thing, Device)])


def _events(index: int) -> dict[str, Any]:
    rng = np.random.default_rng(100 + index)
    items = rng.choice(N_ITEMS, size=12, replace=False)
    return {
        "events": [
            {"item_id": f"item-{int(i)}", "kind": "click", "timestamp": 1_700_000_000 + k}
            for k, i in enumerate(items)
        ]
    }


def _global_version(status: dict[str, Any]) -> int:
    return int(str(status["model_version"]).split("+", 1)[0])


# Generous timeouts: they only bind when a ClientApp starts slowly, e.g. on a loaded CI
# machine (at 150 s a round once went on with 2 of 3 clients while another job shared the
# two cores); a healthy run finishes its rounds in seconds either way.
SECAGG = (
    "secagg-num-shares=3 secagg-reconstruction-threshold=2 secagg-timeout=300 "
    "round-timeout=300 batch-size=4 availability-timeout=360"
)


def test_tls_authenticated_secagg_federation_with_server_restart(
    tmp_path: Path,
    cleanup: list[Device | Federation],
    write_tiny_bundle: Callable[[Path, int], list[str]],
) -> None:
    fed = Federation(tmp_path, write_tiny_bundle)
    cleanup.append(fed)
    devices = [Device(tmp_path, i) for i in range(4)]
    for device in devices:
        device.init()
    for device in devices[:3]:
        fed.register(device, f"dev{device.index}")
    # device 3 is never registered
    start_devices(devices, fed, cleanup)

    # Events through each daemon's HTTP API; the few-shot adaptation makes the model personal.
    before: dict[int, dict[str, float]] = {}
    for device in devices[:3]:
        assert device.call("POST", "/events", _events(device.index)) == {"stored": 12}
    for device in devices[:3]:
        wait_for(
            "the personal adaptation",
            lambda d=device: d.status()["model_version"] == "0+personal",
            60,
        )
        before[device.index] = device.scores()

    fed.start(rounds=2, min_clients=3, run_config=SECAGG)

    # The unregistered device is refused by the SuperLink (Flower exit code 305 per attempt).
    unregistered = devices[3]
    wait_for(
        "the unregistered device to be refused",
        lambda: (
            unregistered.supernode_log.exists()
            and "Failed to activate" in unregistered.supernode_log.read_text()
        ),
        120,
    )
    status = unregistered.status()
    assert _global_version(status) == 0 and status["rounds_joined"] == 0
    assert unregistered.stop() == 0  # it only costs CPU from here on

    # Registration and revocation apply to the running SuperLink at once.
    wait_for("the run to be submitted", fed.ready, 120)
    late = fed.cli("register-client", str(unregistered.public_key), "--name", "late")
    assert "SuperLink: registered late as node" in late
    assert "SuperLink: unregistered late" in fed.cli("revoke-client", "late")

    # Round 1, then the server dies hard; a new `fedrec server start` resumes.
    wait_for("round 1", lambda: len(fed.progress()) >= 1, 700, interval=1.0)
    fed.kill()
    assert [r["round"] for r in fed.progress()] == [1]
    first = fed.progress()[0]
    assert first["clients_ok"] == 3 and first["secure_aggregation"] is True
    fed.start(rounds=2, min_clients=3, run_config=SECAGG)
    assert fed.proc is not None
    assert fed.proc.wait(timeout=800) == 0, fed.output()
    rounds = [r["round"] for r in fed.progress()]
    assert rounds == [1, 2], fed.output()  # round 1 was not run again
    # Round 2 may go on without one device: when the kill lands just after the killed run
    # sent its round-2 instruction, a SuperNode still running that stale ClientApp can miss
    # a SecAgg+ stage of the new run (seen in 2 of 5 runs of this test, in fresh clones), and
    # SecAgg+ then completes with the survivors above its threshold, as it should.
    second = fed.progress()[1]
    assert second["clients_ok"] + second["clients_failed"] == 3, second
    assert second["clients_ok"] >= 2 and second["updated"] is True, second
    run_logs = list((fed.state / "logs").glob("run-*.log"))
    assert any("resuming from the checkpoint of round 1" in p.read_text() for p in run_logs)
    # the killed server's run is kept too (found stale by the restart): two runs, two logs
    assert len(run_logs) == 2, fed.output()

    # Every registered device serves global model 2, counted its rounds and spent privacy.
    for device in devices[:3]:
        status = wait_for(
            f"device {device.index} to serve model version 2",
            lambda d=device: (s := d.status()) and _global_version(s) == 2 and s,
            90,
        )
        assert status["rounds_joined"] >= 2
        assert status["privacy"]["epsilon_spent"] > 0
        assert device.scores() != before[device.index]

    server_status = json.loads(
        subprocess.run(
            [*fedrec_cmd(), "server", "status", "--state-dir", str(fed.state), "--json"],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
    )
    assert server_status["checkpoint_round"] == 2 and server_status["running"] is False
    assert (server_status["clients_registered"], server_status["clients_revoked"]) == (3, 1)
    assert server_status["latest_artifact"] == "model-v2.int8.onnx"
    # SecAgg+ hides the devices' epsilon (fit replies are scrubbed, evaluation never has it)
    assert server_status["last"]["epsilon_record_mean"] is None
    # only the two devices whose owners share evaluation answered it; the third declined
    assert all(
        (record["eval_clients"], record["eval_declined"]) == (2, 1) for record in fed.progress()
    ), fed.progress()
    assert stop_devices(devices[:3]) == [0, 0, 0]


@pytest.mark.slow
def test_a_device_killed_mid_round_does_not_stop_the_round(
    tmp_path: Path,
    cleanup: list[Device | Federation],
    write_tiny_bundle: Callable[[Path, int], list[str]],
) -> None:
    """Four devices, SecAgg+ threshold 2: one daemon is SIGKILLed (its SuperNode dies with
    it) after it received the round's training instruction; the three others finish it."""
    fed = Federation(tmp_path, write_tiny_bundle)
    cleanup.append(fed)
    devices = [Device(tmp_path, i) for i in range(4)]
    for device in devices:
        device.init()
        fed.register(device, f"dev{device.index}")
    start_devices(devices, fed, cleanup)
    for device in devices:
        device.call("POST", "/events", _events(device.index))
    # Without the victim, no 4 devices are available again: evaluation is skipped after
    # availability-timeout (the round itself is what this test is about).
    fed.start(
        rounds=1,
        min_clients=4,
        run_config=(
            "secagg-num-shares=3 secagg-reconstruction-threshold=2 secagg-timeout=60 "
            "round-timeout=60 batch-size=4 availability-timeout=90 eval-fraction=0"
        ),
    )
    victim = devices[3]
    # SecAgg+ sends three train messages before the unmasking one; kill after the third
    # (the one carrying the model to train): the device has sent its keys and shares.
    wait_for(
        "the victim to receive the training stage",
        lambda: (
            victim.supernode_log.exists()
            and victim.supernode_log.read_text().count("Receiving: train message") >= 3
        ),
        400,
    )
    victim.stop(signal.SIGKILL)
    assert fed.proc is not None
    assert fed.proc.wait(timeout=500) == 0, fed.output()
    (record,) = fed.progress()
    assert record["clients_sampled"] == 4 and record["clients_ok"] == 3, record
    assert record["updated"] is True
    for device in devices[:3]:  # the survivors trained (and the daemons counted it)
        wait_for(
            f"device {device.index} to count the round",
            lambda d=device: d.status()["rounds_joined"] == 1,
            60,
        )
    assert (fed.state / "artifacts" / "model-v1.int8.onnx").exists()
