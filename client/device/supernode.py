"""The device's Flower SuperNode: the process ``fedrec client start`` runs next to the local API.

``flower-supernode`` connects to the server's SuperLink over TLS (``--root-certificates``: the
federation's CA from ``fedrec server init``), authenticates with the device key from
``fedrec client init`` (``--auth-supernode-private-key``; the server must have registered the
public key, otherwise the SuperLink refuses the node at activation), and runs the ClientApp
for every message it receives. Its ``--node-config`` names this device's state directory and
bundle, which makes the ClientApp train on this device's store
(:func:`client.client_app.deployment_run_config`). The SuperNode never installs packages at
run time (its default in Flower 1.42; ``--allow-runtime-dependency-installation`` is not
given).

The daemon supervises it (:class:`~client.device.daemon.ProcessSpec`): it is restarted with a
back-off capped at ``max_backoff_s`` for as long as the daemon runs, so a device whose key is
registered later, or a server that is down for a while, joins by itself. Its output goes to
``STATE_DIR/logs/supernode.log``; why a run ended (``/status``: ``processes[].last_error``) is
read from that run's lines by :func:`diagnose_supernode_exit`, and while it runs, a server
that does not answer shows as ``processes[].notice`` (:func:`supernode_notice`).
"""

from __future__ import annotations

import os
import re
import shlex
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from client.device.daemon import DaemonConfig, ProcessSpec, is_error_line, last_error_explained
from client.device.identity import DeviceLayout
from shared.errors import ConfigError
from shared.federated.round_caps import MAX_ROUND_EPSILON, MAX_ROUND_STEPS, check_round_caps
from shared.privacy.budget import PrivacyBudget, check_budget
from shared.processes import console_script


@dataclass(frozen=True)
class SuperNodeOptions:
    """How the device reaches the federation."""

    server: str
    root_cert: Path
    bundle: Path
    runtime_port: int = 9094
    max_backoff_s: float = 30.0
    #: answer the server's evaluation requests with this device's metrics (see
    #: ``make_device_task``); off by default: they are computed from the user's own events
    share_evaluation: bool = False
    #: the device's privacy floor (see :func:`client.client_app.deployment_run_config`):
    #: the most epsilon it spends, at a delta of at most ``max_delta``
    max_epsilon: float = PrivacyBudget.epsilon
    require_dp: bool = True
    max_delta: float = PrivacyBudget.delta
    #: the largest noise-shares this device accepts (1: it adds all its DP noise itself)
    max_noise_shares: int = 1
    #: the most DP-SGD steps and the most epsilon one round may take on this device (a round
    #: past either is declined; :mod:`shared.federated.round_caps`)
    max_round_steps: int = MAX_ROUND_STEPS
    max_round_epsilon: float = MAX_ROUND_EPSILON
    #: the environment variable the daemon read the passphrase from (``None``: a key file),
    #: passed on so that the ClientApp opens the store with the same one
    passphrase_env: str | None = None

    def __post_init__(self) -> None:
        host, sep, port = self.server.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ConfigError(
                f"--server {self.server!r} must be HOST:PORT of the SuperLink (e.g. "
                "fedrec.example.org:9093 or 127.0.0.1:9093)"
            )
        if "://" in self.server:
            raise ConfigError(f"--server {self.server!r}: give HOST:PORT without a scheme")
        check_budget(self.max_epsilon, self.max_delta, names=("--max-epsilon", "privacy-delta"))
        if isinstance(self.max_noise_shares, bool) or self.max_noise_shares < 1:
            raise ConfigError(f"--max-noise-shares must be >= 1, got {self.max_noise_shares}")
        check_round_caps(
            self.max_round_steps,
            self.max_round_epsilon,
            names=("--max-round-steps", "--max-round-epsilon"),
        )
        if not 0 < self.runtime_port < 65536:
            raise ConfigError(f"--supernode-port must be in 1..65535, got {self.runtime_port}")
        _check_root_cert(self.root_cert)
        if not self.bundle.is_file():
            raise ConfigError(
                f"--bundle {self.bundle} is not a file; every device needs the federation's "
                "pretrained bundle (the file the server runs with)"
            )
        for path in (self.root_cert, self.bundle):
            if "'" in str(path.resolve()):
                raise ConfigError(f"{path}: a path with a single quote cannot be passed on")


def one_epsilon_cap(
    config: DaemonConfig, options: SuperNodeOptions
) -> tuple[DaemonConfig, SuperNodeOptions]:
    """The device's two epsilon settings as one cap, the smaller of them: ``--max-epsilon``
    (what its training enforces) and ``privacy-epsilon`` (what ``/status`` reports as the
    budget). Otherwise lowering only ``privacy-epsilon`` would *show* a tighter budget than
    the one the device spends by, and ``--max-epsilon`` alone would show the default 8
    until the first round's ledger. The device's ``privacy-delta`` is its delta cap: a
    server asking for a larger delta (a weaker guarantee at the same epsilon) gets it."""
    cap = min(config.privacy_epsilon, options.max_epsilon)
    return replace(config, privacy_epsilon=cap), replace(
        options, max_epsilon=cap, max_delta=config.privacy_delta
    )


def _check_root_cert(path: Path) -> None:
    from cryptography import x509

    try:
        cert = x509.load_pem_x509_certificate(path.read_bytes())
    except FileNotFoundError:
        raise ConfigError(
            f"--root-cert {path} does not exist; copy the server's certs/ca.pem (from "
            "`fedrec server init`) to the device"
        ) from None
    except (OSError, ValueError) as exc:
        raise ConfigError(
            f"--root-cert {path} is not a PEM certificate ({exc}); use the server's certs/ca.pem"
        ) from None
    try:
        is_ca = cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        is_ca = False
    if not is_ca:  # the SuperNode would retry forever, failing to verify the server
        raise ConfigError(
            f"--root-cert {path} is not a CA certificate (the server's own server.pem?); a "
            "device trusts the CA that signed the server's certificate: the server's "
            "certs/ca.pem"
        )


def supernode_spec(layout: DeviceLayout, options: SuperNodeOptions) -> ProcessSpec:
    """The :class:`ProcessSpec` of this device's SuperNode."""
    from client.client_app import (
        NODE_BUNDLE,
        NODE_DEVICE_DIR,
        NODE_MAX_DELTA,
        NODE_MAX_EPSILON,
        NODE_MAX_NOISE_SHARES,
        NODE_MAX_ROUND_EPSILON,
        NODE_MAX_ROUND_STEPS,
        NODE_PASSPHRASE_ENV,
        NODE_REQUIRE_DP,
        NODE_SHARE_EVALUATION,
    )

    key = layout.private_key
    if not key.is_file():
        raise ConfigError(
            f"{key} is missing; create the device identity with `fedrec client init "
            f"--state-dir {shlex.quote(str(layout.state_dir))}`"
        )
    state_dir = layout.state_dir.resolve()
    if "'" in str(state_dir):
        raise ConfigError(f"--state-dir {state_dir}: a path with a single quote cannot be used")
    share = "true" if options.share_evaluation else "false"
    node_config = (
        f"{NODE_DEVICE_DIR}='{state_dir}' {NODE_BUNDLE}='{options.bundle.resolve()}' "
        f"{NODE_SHARE_EVALUATION}={share} {NODE_MAX_EPSILON}={float(options.max_epsilon)!r} "
        f"{NODE_MAX_DELTA}={float(options.max_delta)!r} "
        f"{NODE_MAX_NOISE_SHARES}={int(options.max_noise_shares)} "
        f"{NODE_MAX_ROUND_STEPS}={int(options.max_round_steps)} "
        f"{NODE_MAX_ROUND_EPSILON}={float(options.max_round_epsilon)!r} "
        f"{NODE_REQUIRE_DP}={'true' if options.require_dp else 'false'}"
    )
    if options.passphrase_env:  # a variable name (checked when the daemon read it)
        node_config += f" {NODE_PASSPHRASE_ENV}='{options.passphrase_env}'"
    argv = (
        console_script("flower-supernode"),
        "--superlink",
        options.server,
        "--root-certificates",
        str(options.root_cert.resolve()),
        "--auth-supernode-private-key",
        str(key.resolve()),
        "--node-config",
        node_config,
        "--port",
        str(options.runtime_port),
    )
    # flower-supernode starts `flower-superexec` and `flwr-clientapp` by name: put the
    # installed console scripts first on PATH (a virtual environment need not be activated).
    bin_dir = str(Path(argv[0]).parent)
    path = os.environ.get("PATH", "")
    env = (
        ("PATH", f"{bin_dir}{os.pathsep}{path}" if path else bin_dir),
        ("FLWR_HOME", str(state_dir / "flwr-home")),
        ("FLWR_TELEMETRY_ENABLED", "0"),
        ("FLWR_DISABLE_UPDATE_CHECK", "1"),
        ("PYTHONUNBUFFERED", "1"),
    )
    return ProcessSpec(
        name="supernode",
        argv=argv,
        env=env,
        # not wherever the daemon was started: a folder removed meanwhile (a deploy's old
        # release) made every restarted SuperNode's ClientApp abort in torch's import
        cwd=str(state_dir),
        restart=True,
        max_restarts=1_000_000,
        backoff_s=2.0,
        max_backoff_s=options.max_backoff_s,
        log_file=str(DeviceLayout(state_dir).supernode_log),
        explain=explain_supernode_error,
        diagnose=diagnose_supernode_exit,
        watch=supernode_notice,
    )


_KEY_REFUSED = (
    "the server does not accept this device's key: register the public key printed "
    "by `fedrec client init` with `fedrec server register-client`; a revoked key "
    "needs a new one (`fedrec client rotate-key` keeps the device's data)"
)

#: Flower's words when the SuperLink refuses a node's authentication on a call after
#: activation (the key was revoked while it was connected): the HTTP Fleet API answers 401,
#: the gRPC one UNAUTHENTICATED.
_AUTH_REFUSED = (
    "401 Unauthorized",
    "Invalid SuperNode authentication",
    "UNAUTHENTICATED",
    "Invalid node ID",
)

#: Flower's notice that a call failed and is retried. The SuperNode logs it while the
#: server is unreachable, but so does its SuperExec child (same log) once the SuperNode has
#: exited for any reason, e.g. a refused key: never the cause when the run says another.
_RETRY_NOTICE = "Connection attempt failed"

#: What the SuperNode (not its SuperExec) logs when it stops on a signal of its own.
_STOPPED_GRACEFULLY = "SuperNode terminated gracefully"

_STOPPED_ITSELF = (
    "the SuperNode stopped itself without an error: Flower does this when the server "
    "refuses its authentication, i.e. this device's key was revoked (or replaced) while it "
    "was connected; a revoked key needs a new one (`fedrec client rotate-key`, then "
    "`fedrec server register-client`). The restart will say whether the server still "
    "refuses it"
)


def explain_supernode_error(line: str) -> str | None:
    """What a SuperNode log error means for the device's owner, where Flower's words do not
    say it: a node the SuperLink will not activate, or whose calls it refuses as
    unauthenticated, has a key it does not accept."""
    if "Failed to activate SuperNode" in line or "FLEET_NODE_ACTIVATION_FAILED" in line:
        return _KEY_REFUSED
    if any(words in line for words in _AUTH_REFUSED):
        return _KEY_REFUSED
    if "not valid for" in line or "Hostname mismatch" in line or "doesn't match" in line:
        return (
            "--server names the server by a name or address its certificate does not list: "
            "use one of those given to `fedrec server init --host`"
        )
    if "not yet valid" in line:
        return (
            "the server's certificate is not valid yet by this device's clock, which is "
            "behind: set this device's date and time (and time zone)"
        )
    if "has expired" in line:
        return (
            "the server's certificate has expired by this device's clock: set this device's "
            "date and time if it is ahead, else the server needs `fedrec server renew-cert`"
        )
    if "CERTIFICATE_VERIFY_FAILED" in line or "certificate verify failed" in line:
        return (
            "the server's certificate does not verify against --root-cert (or not at this "
            "device's clock: check its date and time)"
        )
    if "handshake" in line.lower():
        return (
            "the TLS handshake with --server failed: is --root-cert the server's certs/ca.pem, "
            "does --server name the SuperLink's Fleet API port (not another service), and "
            "is this device's clock right (a certificate is only valid between two dates)?"
        )
    if _RETRY_NOTICE in line:
        return (
            "the server at --server does not answer (not running yet, a wrong address or "
            "port, or a firewall); the SuperNode keeps retrying and joins once it answers"
        )
    if "address already in use" in line.lower() or "Runtime HTTP API failed to start" in line:
        return (
            "another program holds the SuperNode's port: start the device with another "
            "--supernode-port"
        )
    return None


#: Flower's retry notice ends with the wait before the next attempt.
_RETRY_WAIT = re.compile(r"retrying in ([0-9]+(?:\.[0-9]+)?) seconds")

#: Seconds past a retry notice's announced wait after which the attempt it announced is taken
#: to have succeeded: a failed one logs the next notice once its connection attempt fails,
#: at once when refused, but only when Flower's HTTP client gives up (30 s: its connect and
#: read timeouts) when the server's packets are dropped, so the grace must be longer than
#: that. A success is logged ("Connection successful after ..."), which ends the notice
#: at once; the grace only bounds a notice whose success went unlogged (a higher
#: FLWR_LOG_LEVEL).
_RETRY_GRACE_S = 60.0


def supernode_notice(lines: Sequence[str], quiet_s: float) -> str | None:
    """What is wrong with a running SuperNode now, from its current run's log ``lines``
    (oldest first) and the seconds ``quiet_s`` since the log last grew: the server does not
    answer, while its last line is Flower's "Connection attempt failed, retrying in T
    seconds" and the log has been quiet for less than T (plus a grace): the retry it
    announced has not happened, or failed and is being announced again. A SuperNode that got
    through logs "Connection successful after ...", which ends the notice; one older than
    its wait plus the grace is read as a success too. One without a wait (an older Flower's
    "retrying...") counts while the log is quiet for under the grace (a minute)."""
    last = next((line for line in reversed(lines) if line), None)
    if last is None or _RETRY_NOTICE not in last:
        return None
    wait = _RETRY_WAIT.search(last)
    if quiet_s > (float(wait.group(1)) if wait else 0.0) + _RETRY_GRACE_S:
        return None
    return f"{last[:300]} ({explain_supernode_error(last)})"


def diagnose_supernode_exit(lines: Sequence[str]) -> str | None:
    """Why a SuperNode run ended, from the lines it logged (oldest first): the line that
    says it, with what it means (:func:`explain_supernode_error`); ``None`` if none does.

    Its last error line is often not the cause. A SuperNode whose key the server refuses
    exits at once, while its SuperExec child, writing to the same log, goes on logging
    "Connection attempt failed, retrying" until the daemon reaps it; and one whose key is
    revoked while connected gets a 401 (gRPC: UNAUTHENTICATED), which Flower answers by
    stopping itself "gracefully". Read last-line-first, both blamed the network. So, in
    order: the last line with a known cause other than a retry notice (a refused key, a
    certificate, a port), a graceful stop (no signal came from the daemon: the 401 case),
    any other error line, and only then a retry notice (the server not answering).
    """
    errors = [line[:300] for line in lines if is_error_line(line)]
    causes = [line for line in errors if _RETRY_NOTICE not in line]
    for line in reversed(causes):
        meaning = explain_supernode_error(line)
        if meaning is not None:
            return f"{line} ({meaning})"
    for line in reversed(lines):
        # the SuperNode's own words: its SuperExec child logs "SuperExec terminated
        # gracefully" after any exit of the SuperNode (its parent monitor raises SIGINT)
        if _STOPPED_GRACEFULLY in line:
            return f"{line[:300]} ({_STOPPED_ITSELF})"
    return last_error_explained(causes, explain_supernode_error) or last_error_explained(
        errors, explain_supernode_error
    )
