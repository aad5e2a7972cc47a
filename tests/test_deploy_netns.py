"""The deployment across separate hosts, simulated with Linux network namespaces: the server
in one namespace, each device daemon in its own, joined by veth pairs on a bridge (which
lives in a namespace of its own, so the test adds no interface to the host). Nothing crosses
between them but the 10.77.0.0/24 link: each namespace has its own loopback, so a server that
bound 127.0.0.1 only, a certificate valid for localhost only, or a daemon that assumed the
SuperLink on loopback would fail here, where `tests/test_deploy_e2e.py` passes.

The server is initialised for its link address (`fedrec server init --host 10.77.0.1`, to
which init adds the loopback names) and listens on all its addresses (the default): its own
SuperLink executor connects through 127.0.0.1, which a certificate without the loopback names
failed (the run stayed pending for ever). Every device runs with the default ports (8765 for
its API, 9094 for its SuperNode), as on separate machines.
The test reaches each device's local API (127.0.0.1 in the device's namespace) from a thread
that joined that namespace with setns(2).

Needs root and a working `ip netns` (veth, bridge); skipped otherwise. The federation test is
slow (-m slow): one SecAgg+ round with three devices; measured ~4 min in all (the round itself
73 s) on two CPUs shared with another federation test. The SuperLink's Control API test takes
seconds.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import shutil
import signal
import subprocess
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.test_deploy_e2e import (  # noqa: F401  (cleanup: a fixture)
    N_ITEMS,
    SECAGG,
    Device,
    Federation,
    _events,
    _global_version,
    cleanup,
    start_devices,
    wait_for,
)

pytestmark = pytest.mark.network

SUBNET = "10.77.0"
SERVER_IP = f"{SUBNET}.1"
SERVER_PORT = 9093  # `fedrec server start`'s default
API_PORT = 8765  # `fedrec client start`'s defaults: each device is alone on its host
SUPERNODE_PORT = 9094
N_DEVICES = 3
CLONE_NEWNET = 0x40000000


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True)


def _netns_unavailable() -> str | None:
    """Why namespaces with veth pairs and a bridge cannot be built here (None: they can)."""
    if os.geteuid() != 0:
        return "needs root (creates network namespaces)"
    if shutil.which("ip") is None:
        return "needs iproute2's `ip`"
    probe = f"fedrec-probe-{uuid.uuid4().hex[:8]}"
    try:
        _ip("netns", "add", probe)
    except subprocess.CalledProcessError as exc:
        return f"`ip netns add` fails: {exc.stderr.strip()}"
    try:
        _ip("-n", probe, "link", "add", "name", "br0", "type", "bridge")
        _ip("-n", probe, "link", "add", "name", "v0", "type", "veth", "peer", "name", "v1")
    except subprocess.CalledProcessError as exc:
        return f"no bridge or veth in a network namespace: {exc.stderr.strip()}"
    finally:
        subprocess.run(["ip", "netns", "del", probe], check=False, capture_output=True)
    return None


@dataclass
class Network:
    """Namespaces `<prefix>-sw` (the bridge), `<prefix>-srv` (SERVER_IP) and
    `<prefix>-dev<i>` (SUBNET.<i+2>), each host with `lo` and `eth0` up."""

    prefix: str
    namespaces: list[str] = field(default_factory=list)

    @property
    def switch(self) -> str:
        return f"{self.prefix}-sw"

    @property
    def server(self) -> str:
        return f"{self.prefix}-srv"

    def device(self, index: int) -> str:
        return f"{self.prefix}-dev{index}"

    @staticmethod
    def device_ip(index: int) -> str:
        return f"{SUBNET}.{index + 2}"

    def add(self, name: str) -> None:
        _ip("netns", "add", name)
        self.namespaces.append(name)
        _ip("-n", name, "link", "set", "lo", "up")

    def build(self, n_devices: int) -> None:
        self.add(self.switch)
        _ip("-n", self.switch, "link", "add", "name", "br0", "type", "bridge")
        _ip("-n", self.switch, "link", "set", "br0", "up")
        hosts = [(self.server, SERVER_IP)]
        hosts += [(self.device(i), self.device_ip(i)) for i in range(n_devices)]
        for port, (ns, address) in enumerate(hosts):
            self.add(ns)
            # one end on the bridge, the other as the host's eth0
            _ip(
                "-n",
                self.switch,
                "link",
                "add",
                "name",
                f"p{port}",
                "type",
                "veth",
                "peer",
                "name",
                "eth0",
                "netns",
                ns,
            )
            _ip("-n", self.switch, "link", "set", f"p{port}", "master", "br0", "up")
            _ip("-n", ns, "addr", "add", f"{address}/24", "dev", "eth0")
            _ip("-n", ns, "link", "set", "eth0", "up")

    def teardown(self) -> list[str]:
        """Kill what still runs in the namespaces (only this test starts anything there),
        then delete them (their veth pairs and the bridge go with them)."""
        problems = []
        for ns in reversed(self.namespaces):
            pids = subprocess.run(
                ["ip", "netns", "pids", ns], capture_output=True, text=True, check=False
            ).stdout.split()
            for pid in pids:
                problems.append(f"process {pid} still ran in {ns}; killed")
                with contextlib.suppress(ProcessLookupError, ValueError):
                    os.kill(int(pid), signal.SIGKILL)
            done = subprocess.run(["ip", "netns", "del", ns], capture_output=True, text=True)
            if done.returncode:
                problems.append(f"ip netns del {ns}: {done.stderr.strip()}")
        self.namespaces.clear()
        return problems


@pytest.fixture
def network() -> Iterator[Network]:
    reason = _netns_unavailable()
    if reason is not None:
        pytest.skip(reason)
    net = Network(f"fedrec-{os.getpid()}-{uuid.uuid4().hex[:6]}")
    try:
        net.build(N_DEVICES)
        yield net
    finally:
        # requested before `cleanup`, so torn down after it stopped the processes
        leftovers = net.teardown()
        if leftovers:
            print("\n".join(leftovers))


def _namespace_thread(ns: str) -> ThreadPoolExecutor:
    """One worker thread that joined network namespace `ns` (setns(2) moves only the
    calling thread); sockets it opens live in that namespace."""
    libc = ctypes.CDLL(None, use_errno=True)

    def enter() -> None:
        fd = os.open(f"/run/netns/{ns}", os.O_RDONLY)
        try:
            if libc.setns(fd, CLONE_NEWNET) != 0:
                errno = ctypes.get_errno()
                raise OSError(errno, f"setns({ns}): {os.strerror(errno)}")
        finally:
            os.close(fd)

    return ThreadPoolExecutor(max_workers=1, initializer=enter)


class HostDevice(Device):
    """A device daemon alone in network namespace `ns`, with the default ports; its local
    API is reached from a thread inside that namespace."""

    def __init__(self, root: Path, index: int, ns: str) -> None:
        prefix = ["ip", "netns", "exec", ns]  # it execs: proc is the daemon itself
        super().__init__(
            root, index, prefix=prefix, api_port=API_PORT, supernode_port=SUPERNODE_PORT
        )
        self._thread = _namespace_thread(ns)

    def call(self, method: str, path: str, body: Any = None) -> Any:
        return self._thread.submit(Device.call, self, method, path, body).result()

    def stop(self, sig: int = signal.SIGTERM) -> int | None:
        try:
            return super().stop(sig)
        finally:
            self._thread.shutdown(wait=False)


class HostFederation(Federation):
    """The server state initialised for SERVER_IP (`server init --host SERVER_IP`), `fedrec
    server start` in namespace `ns` listening on all of its addresses (the default)."""

    def __init__(self, root: Path, write_bundle: Callable[[Path, int], list[str]], ns: str) -> None:
        prefix = ["ip", "netns", "exec", ns]
        super().__init__(
            root, write_bundle, hosts=[SERVER_IP], listen="0.0.0.0", port=SERVER_PORT,
            prefix=prefix,
        )  # fmt: skip
        self.ns = ns

    def peers(self) -> set[str]:
        """Addresses with an established TCP connection to the SuperLink's port now."""
        listing = subprocess.run(
            [
                "ip",
                "netns",
                "exec",
                self.ns,
                "ss",
                "-Htn",
                "state",
                "established",
                f"( sport = :{self.port} )",
            ],
            capture_output=True,
            text=True,
            check=False,
        ).stdout
        return {line.split()[-1].rsplit(":", 1)[0] for line in listing.splitlines() if line}


def _san(cert: Path) -> tuple[list[str], list[str]]:
    from cryptography import x509

    loaded = x509.load_pem_x509_certificate(cert.read_bytes())
    san = loaded.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return san.get_values_for_type(x509.DNSName), [
        str(ip) for ip in san.get_values_for_type(x509.IPAddress)
    ]


@pytest.mark.slow
def test_secagg_round_between_hosts_in_network_namespaces(
    tmp_path: Path,
    network: Network,
    cleanup: list[Device | Federation],  # noqa: F811  (the fixture imported above)
    write_tiny_bundle: Callable[[Path, int], list[str]],
) -> None:
    fed = HostFederation(tmp_path, write_tiny_bundle, network.server)
    cleanup.append(fed)
    # the certificate names the server's link address, and its loopback for itself
    assert _san(fed.state / "certs" / "server.pem") == (["localhost"], [SERVER_IP, "127.0.0.1"])

    devices = [HostDevice(tmp_path, i, network.device(i)) for i in range(N_DEVICES)]
    for device in devices:
        device.init()
        fed.register(device, f"dev{device.index}")
    start_devices(devices, fed, cleanup)
    for device in devices:
        assert device.call("POST", "/events", _events(device.index)) == {"stored": 12}
        assert _global_version(device.status()) == 0

    fed.start(rounds=1, min_clients=N_DEVICES, run_config=SECAGG)
    assert fed.proc is not None
    peers: set[str] = set()

    def finished() -> bool:
        peers.update(fed.peers())
        log_path = fed.state / "logs" / "superlink.log"
        superlink_log = log_path.read_text(errors="replace") if log_path.exists() else ""
        # fail at once rather than after the timeout (a certificate the executor refuses)
        assert "CERTIFICATE_VERIFY_FAILED" not in superlink_log, superlink_log[-3000:]
        return fed.proc is not None and fed.proc.poll() is not None

    wait_for("the server to finish its round", finished, 900, interval=2.0)
    assert fed.proc.returncode == 0, fed.output()

    # the devices reached the SuperLink over the link, each from its own address
    assert {Network.device_ip(i) for i in range(N_DEVICES)} <= peers, peers
    (record,) = fed.progress()
    assert record["round"] == 1 and record["clients_ok"] == N_DEVICES, record
    assert record["secure_aggregation"] is True and record["updated"] is True, record
    assert (record["eval_clients"], record["eval_declined"]) == (2, 1), record  # 0 and 1 share

    server_status = json.loads(fed.cli("status", "--json"))
    assert server_status["checkpoint_round"] == 1 and server_status["running"] is False
    assert server_status["clients_registered"] == N_DEVICES
    assert server_status["latest_artifact"] == "model-v1.int8.onnx"

    # every registered device serves the new global model, and spent privacy on the round
    for device in devices:
        status = wait_for(
            f"device {device.index} to serve model version 1",
            lambda d=device: (s := d.status()) and _global_version(s) == 1 and s,
            90,
        )
        assert status["rounds_joined"] == 1, status
        assert status["privacy"]["epsilon_spent"] > 0, status
    for device in devices:
        assert device.stop() == 0


def test_another_host_cannot_register_a_device_through_the_control_api(
    tmp_path: Path, network: Network
) -> None:
    """Flower serves its Control API, which registers SuperNode keys and stops runs without
    authenticating the caller, on the port devices reach: from another host, `flwr supernode
    register` with the server's ca.pem registered the caller's own key, and that device then
    trained in the next round although `clients.json` never named it. The SuperLink now
    answers Control requests from its own machine only; the Fleet API still answers there."""
    import ssl
    import urllib.error
    import urllib.request

    from client.device.identity import init_identity
    from server.state import init_state_dir
    from server.superlink import (
        CONNECTION,
        FlwrCli,
        SuperLinkError,
        SuperLinkOptions,
        SuperLinkProcess,
        write_connection,
    )

    layout = init_state_dir(tmp_path / "server", [SERVER_IP])
    superlink = SuperLinkProcess(layout, SuperLinkOptions(port=SERVER_PORT))  # all addresses
    on_server, on_device = _namespace_thread(network.server), _namespace_thread(network.device(0))
    try:
        on_server.submit(superlink.start).result()  # its child runs in the server's namespace
        write_connection(layout, superlink.address)
        intruder_key = init_identity(tmp_path / "intruder").layout.public_key
        # the device's flwr, with the server's ca.pem and address, as any device could set up
        intruder = init_state_dir(tmp_path / "intruder-home", [SERVER_IP])
        (intruder.pki.ca_cert).write_bytes(layout.pki.ca_cert.read_bytes())
        write_connection(intruder, f"{SERVER_IP}:{SERVER_PORT}")
        register = ("supernode", "register", str(intruder_key), CONNECTION)  # plain `flwr`
        with pytest.raises(SuperLinkError, match="only on its own machine"):
            on_device.submit(FlwrCli(intruder).call, *register).result()
        with pytest.raises(SuperLinkError, match="only on its own machine"):
            on_device.submit(FlwrCli(intruder).runs).result()
        assert on_server.submit(FlwrCli(layout).nodes).result() == {}  # nothing was registered

        def get(path: str) -> int:
            context = ssl.create_default_context(cafile=str(layout.pki.ca_cert))
            url = f"https://{SERVER_IP}:{SERVER_PORT}{path}"
            try:
                with urllib.request.urlopen(url, timeout=10, context=context) as response:
                    return int(response.status)
            except urllib.error.HTTPError as exc:
                return exc.code

        assert on_device.submit(get, "/health").result() == 200  # reached over the link
        # the server itself still registers devices (what `register-client` runs)
        keys = [intruder_key.read_text()]
        (node,) = on_server.submit(lambda: list(FlwrCli(layout).register_keys(keys))).result()
        assert isinstance(node, int) and node > 0
    finally:
        on_server.submit(superlink.stop).result()
        on_server.shutdown()
        on_device.shutdown()
