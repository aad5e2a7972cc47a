"""``fedrec client``: the on-device side — identity, local daemon, local API, models."""

from __future__ import annotations

import math
import sys
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from client.device.config import MAX_FEDERATION_PERSONAL_STEPS, MAX_WAIT_S, DaemonConfig
from fedrec.device_settings import DAEMON_SETTINGS_HELP, NOT_FLAGS
from fedrec.options import (
    HOME_PATH,
    NON_EMPTY_PATH,
    FormatOpt,
    config_flag_names,
    explicit_options,
    field_lines,
    kebab_run_config,
    with_config_flags,
)
from shared.bandits.policies import BanditConfig
from shared.errors import ConfigError, FedRecError
from shared.federated.local_config import LocalTrainConfig
from shared.federated.round_caps import MAX_ROUND_EPSILON, MAX_ROUND_STEPS
from shared.privacy.budget import PrivacyBudget

if TYPE_CHECKING:
    from collections.abc import Sequence

    from client.device.supernode import SuperNodeOptions
    from client.device.training import LearnerConfig

app = typer.Typer(
    help="On-device client: identity, encrypted local store, local API.", no_args_is_help=True
)

StateDirOpt = Annotated[
    Path,
    typer.Option(
        "--state-dir",
        click_type=NON_EMPTY_PATH,
        help="The device's state directory (identity, store, sealed models, privacy ledger).",
    ),
]
PassphraseEnvOpt = Annotated[
    str | None,
    typer.Option(
        "--passphrase-env",
        help="NAME of an environment variable holding the passphrase of the data key "
        "(the passphrase itself is never accepted on the command line).",
    ),
]
ConfigOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--config",
        help="Daemon settings as 'key=value ...' (kebab-case keys of DaemonConfig, e.g. "
        "'max-batch=500 candidate-pool=200'; the exploration policy as bandit-<key>, e.g. "
        "'bandit-policy=thompson bandit-mmr-lambda=0.6'); may be repeated. A flag of the same "
        "name wins over it.",
    ),
]
HostOpt = Annotated[str | None, typer.Option("--host", help="Address to bind (default 127.0.0.1).")]
PortOpt = Annotated[
    int | None, typer.Option("--port", help="Port to bind (default 8765; 0 = any free port).")
]


DAEMON_FLAGS = config_flag_names(DAEMON_SETTINGS_HELP, skip=NOT_FLAGS)
"""The flags of every daemon setting but --host and --port."""

daemon_flags = with_config_flags(
    (DaemonConfig, ("bandit_", BanditConfig)), DAEMON_SETTINGS_HELP, skip=NOT_FLAGS
)
"""Gives a command one flag per daemon setting (see :mod:`fedrec.device_settings`)."""


def _daemon_config(
    config: list[str] | None,
    host: str | None,
    port: int | None,
    ctx: typer.Context | None = None,
) -> DaemonConfig:
    """The daemon's settings: ``--config``, then the flags typed (``ctx``), which win."""
    # one spelling per setting: DaemonConfig reads max_batch as max-batch, and of the two
    # the last one won silently
    values = kebab_run_config(config, flag="--config")
    if ctx is not None:
        values.update(explicit_options(ctx, DAEMON_FLAGS))
    if host is not None:
        values["host"] = host
    if port is not None:
        values["port"] = port
    return DaemonConfig.from_values(values)


def _passphrase(state_dir: Path, passphrase_env: str | None) -> str | None:
    return _read_passphrase(_passphrase_var(state_dir, passphrase_env))


def _read_passphrase(var: str | None) -> str | None:
    from client.device.identity import read_passphrase_env

    return None if var is None else read_passphrase_env(var)


def _passphrase_var(state_dir: Path, passphrase_env: str | None) -> str | None:
    """The environment variable holding the device's passphrase (``None``: its data key is
    a key file): ``--passphrase-env``, else the one recorded at ``init``."""
    from client.device.identity import DeviceIdentity

    identity = DeviceIdentity.load(state_dir)
    if identity.data_key_mode != "passphrase":
        if passphrase_env is not None:
            raise ConfigError(
                f"the data key of {state_dir} is a random key file, not a passphrase; drop "
                f"--passphrase-env"
            )
        return None
    var = passphrase_env if passphrase_env is not None else identity.passphrase_env()
    if not var:
        raise ConfigError(
            "this device's data key is derived from a passphrase; pass --passphrase-env NAME "
            "with the passphrase exported in $NAME"
        )
    return var


@app.command("init")
def init(
    state_dir: StateDirOpt,
    passphrase_env: PassphraseEnvOpt = None,
    force: Annotated[
        bool,
        typer.Option(
            "--force",
            help="Replace an existing identity. The local store and sealed models (encrypted "
            "with the old key), the last federation's global model and logs/supernode.log are "
            "erased; the privacy ledger, rounds joined and catalog are kept.",
        ),
    ] = False,
    catalog: Annotated[
        Path | None,
        typer.Option(
            "--catalog",
            click_type=HOME_PATH,
            help="Install this catalog (JSON list of raw item ids).",
        ),
    ] = None,
) -> None:
    """Create the device identity: EC key pair, data key, API token (all secrets 0600).

    Prints the OpenSSH public key on stdout (register it on the server with
    `fedrec server register-client`); everything else goes to stderr. Refused while a daemon
    runs on STATE_DIR (it holds STATE_DIR/daemon.lock): stop it first.
    """
    from client.device.identity import DeviceLayout, init_identity, read_passphrase_env
    from client.device.sealed import Catalog

    parsed_catalog = Catalog.load(catalog) if catalog is not None else None
    passphrase = read_passphrase_env(passphrase_env) if passphrase_env is not None else None
    # under the state directory's single-writer lock: with --force, the store and sealed
    # models (encrypted with the old data key) are erased there, and the catalog installed
    result = init_identity(
        state_dir,
        passphrase=passphrase,
        passphrase_env=passphrase_env,
        force=force,
        catalog=parsed_catalog,
    )
    layout: DeviceLayout = result.layout
    key_note = (
        f"passphrase (scrypt n=2**15, r=8, p=1) from ${passphrase_env}"
        if passphrase_env
        else f"random, {layout.data_key} (0600)"
    )
    lines = [
        f"device identity created in {layout.state_dir}",
        f"  device id:   {result.device_id}",
        f"  private key: {layout.private_key} (0600; flower-supernode "
        f"--auth-supernode-private-key)",
        f"  public key:  {layout.public_key}",
        f"  data key:    {key_note}",
        f"  API token:   {layout.api_token} (0600)",
        f"register the public key on the server (copy {layout.public_key} there, or save "
        f"the line printed on stdout): fedrec server register-client client.pub --state-dir "
        f"SERVER_STATE (it runs flwr supernode register against the SuperLink)",
    ]
    if result.previous_device_ids:  # init --force: the replaced key may still be registered
        lines.append(
            f"replaced keys are kept in {layout.previous_public_key}; "
            + _revoke_advice(result.previous_device_ids)
        )
    if result.erased:  # init --force: what went and what stayed (of what is there)
        present = {
            "the privacy ledger": layout.ledger,
            "the rounds joined": layout.state_dir / "federated" / "joined.json",
            # one given with --catalog replaced it
            "the catalog": layout.catalog if catalog is None else None,
        }
        kept = [name for name, path in present.items() if path is not None and path.exists()]
        note = f"erased {_and_join(result.erased)}"
        lines.append(f"{note}; kept {_and_join(kept)}" if kept else note)
    typer.echo("\n".join(lines), err=True)
    typer.echo(result.public_key_openssh)


def _and_join(names: Sequence[str]) -> str:
    """``names`` as a list in words: "a", "a and b", "a, b and c"."""
    return " and ".join([", ".join(names[:-1]), names[-1]] if len(names) > 1 else names)


def _revoke_advice(replaced: tuple[str, ...]) -> str:
    """How to revoke the keys a device replaced (oldest first, the last one just now) on the
    server: the newest, or an earlier one if that was never registered."""
    if not replaced:  # a damaged client.key and no client.pub: no replaced key to name
        return (
            "revoke the replaced key, which could not be read (neither client.key nor "
            "client.pub): find this device's name in `fedrec server status --state-dir "
            "SERVER_STATE` and run fedrec server revoke-client NAME --state-dir SERVER_STATE"
        )
    earlier = (
        f" (if that one was never registered, an earlier one: {', '.join(replaced[:-1])})"
        if len(replaced) > 1
        else ""
    )
    return (
        "revoke the replaced key it has registered (unless it is revoked already): "
        f"fedrec server revoke-client {replaced[-1]} --state-dir SERVER_STATE{earlier}"
    )


@app.command("rotate-key")
def rotate_key(state_dir: StateDirOpt) -> None:
    """Give the device a new SuperNode key pair, keeping its data, models and privacy ledger.

    For a key the server revoked (the SuperLink never accepts it again) or one that may have
    leaked. Prints the new OpenSSH public key on stdout; every replaced key is appended to
    identity/client.pub.previous. Refused while a daemon runs on STATE_DIR: stop it first.
    """
    from client.device.identity import rotate_key as rotate

    result = rotate(state_dir)
    layout = result.layout
    replaced = result.previous_device_ids
    register = (
        f"on the server (copy {layout.public_key} there, or save the line printed on "
        "stdout): fedrec server register-client client.pub --state-dir SERVER_STATE, then "
    )
    lines = [
        f"new device key in {layout.private_key} (0600)",
        f"  device id:     {replaced[-1] if replaced else 'unknown'} -> {result.device_id}",
        f"  public key:    {layout.public_key}",
        f"  replaced keys: {layout.previous_public_key} ({len(replaced)})",
        register + _revoke_advice(replaced),
        "then start the daemon again",
    ]
    typer.echo("\n".join(lines), err=True)
    typer.echo(result.public_key_openssh)


def _run_daemon(
    ctx: typer.Context,
    state_dir: Path,
    passphrase_env: str | None,
    config: list[str] | None,
    host: str | None,
    port: int | None,
    federation: SuperNodeOptions | None = None,
    learner: LearnerConfig | None = None,
) -> None:
    from client.device.daemon import Daemon

    cfg = _daemon_config(config, host, port, ctx)
    if federation is not None:
        from client.device.supernode import one_epsilon_cap

        cfg, federation = one_epsilon_cap(cfg, federation)
        if federation.runtime_port == cfg.port:
            raise ConfigError(
                f"--supernode-port {cfg.port} is also the local API's port (--port); the "
                "SuperNode and the API each need their own: give them different ports"
            )
    var = _passphrase_var(state_dir, passphrase_env)
    daemon = Daemon.open(state_dir, passphrase=_read_passphrase(var), config=cfg)
    if federation is not None:
        from client.device.supernode import supernode_spec
        from client.device.training import DeviceLearner

        # the ClientApp opens the store too: with the variable the daemon read, not the
        # one recorded at init
        federation = replace(federation, passphrase_env=var)

        try:
            daemon.add_process(supernode_spec(daemon.layout, federation))
            DeviceLearner(daemon, federation.bundle, learner).attach()
        except BaseException:
            daemon.shutdown()
            raise

    def ready(url: str) -> None:
        typer.echo(
            f"device API on {url} (bearer token in {daemon.layout.api_token}); "
            "SIGTERM or Ctrl-C stops it",
            err=True,
        )

    code = daemon.run(api=True, on_ready=ready)
    if code:
        raise typer.Exit(code)


@app.command("start")
@daemon_flags
def start(
    ctx: typer.Context,
    state_dir: StateDirOpt,
    server: Annotated[
        str | None,
        typer.Option(
            "--server",
            help="The federation's SuperLink as HOST:PORT (e.g. fedrec.example.org:9093).",
        ),
    ] = None,
    root_cert: Annotated[
        Path | None,
        typer.Option(
            "--root-cert",
            click_type=HOME_PATH,
            help="The federation's CA certificate (the server's certs/ca.pem) to verify TLS.",
        ),
    ] = None,
    bundle: Annotated[
        Path | None,
        typer.Option(
            "--bundle",
            click_type=HOME_PATH,
            help="The federation's pretrained bundle (same file as the server).",
        ),
    ] = None,
    supernode_port: Annotated[
        int,
        typer.Option(
            "--supernode-port",
            help="Local port of the SuperNode's runtime API (distinct per device on one host).",
        ),
    ] = 9094,
    adapt_debounce: Annotated[
        float,
        typer.Option(
            "--adapt-debounce",
            help="Seconds after the last new event before the personal adapter is refitted.",
        ),
    ] = 2.0,
    personal_steps: Annotated[
        int | None,
        typer.Option(
            "--personal-steps",
            help="Adam steps that refit the personal adapter against each served global model "
            "(0: serve the global model as it is). Default: the federation's run config "
            f"(personal-steps, at most {MAX_FEDERATION_PERSONAL_STEPS}), else "
            f"{LocalTrainConfig.personal_steps}.",
        ),
    ] = None,
    personal_lr: Annotated[
        float | None,
        typer.Option(
            "--personal-lr",
            help="Learning rate of those steps. Default: the federation's run config "
            f"(personal-lr), else {LocalTrainConfig.personal_lr}.",
        ),
    ] = None,
    exclude_seen: Annotated[
        bool | None,
        typer.Option(
            "--exclude-seen/--no-exclude-seen",
            help="Leave the history window's own items out of those steps' softmax. Default: "
            f"the federation's run config (exclude-seen), else {LocalTrainConfig.exclude_seen}.",
            show_default=False,
        ),
    ] = None,
    share_evaluation: Annotated[
        bool,
        typer.Option(
            "--share-evaluation/--no-share-evaluation",
            help="Answer the server's federated evaluation with this device's metrics: the "
            "evaluated model's loss, HR@10 and NDCG@10 on the newest event (sent in the clear "
            "and not covered by DP). Off: the device declines evaluation and still takes the "
            "evaluated model.",
        ),
    ] = False,
    max_epsilon: Annotated[
        float,
        typer.Option(
            "--max-epsilon",
            help="The most record-level epsilon this device spends, whatever the server's "
            "epsilon-budget (the smaller of the two applies; so does a smaller --config "
            "privacy-epsilon).",
        ),
    ] = PrivacyBudget.epsilon,
    max_noise_shares: Annotated[
        int,
        typer.Option(
            "--max-noise-shares",
            min=1,
            help="The largest noise-shares this device accepts: with m > 1 it adds 1/sqrt(m) "
            "of its DP noise and trusts the server to unmask only sums of at least m updates "
            "(its ledger charges all of it). 1 (default): all the noise, trusting no one.",
        ),
    ] = 1,
    max_round_steps: Annotated[
        int,
        typer.Option(
            "--max-round-steps",
            help="The most DP-SGD steps this device takes in one round (local-epochs x "
            "batches of its examples), whatever the server's max-round-steps (the smaller "
            "applies); a round asking more is declined.",
        ),
    ] = MAX_ROUND_STEPS,
    max_round_epsilon: Annotated[
        float,
        typer.Option(
            "--max-round-epsilon",
            help="The most record-level epsilon this device spends in one round, as its "
            "ledger predicts before training, whatever the server's max-round-epsilon (the "
            "smaller applies); a round asking more is declined.",
        ),
    ] = MAX_ROUND_EPSILON,
    allow_no_dp: Annotated[
        bool,
        typer.Option(
            "--allow-no-dp",
            help="Let the server have this device train without DP-SGD (dp=false). Off: "
            "such a round is refused.",
        ),
    ] = False,
    passphrase_env: PassphraseEnvOpt = None,
    host: HostOpt = None,
    port: PortOpt = None,
    config: ConfigOpt = None,
    **settings: Any,
) -> None:
    """Run the device daemon: the local API plus a Flower SuperNode (TLS, device key) whose
    ClientApp trains on this device's store; new global models and new events refresh the
    served model.

    Stops cleanly on SIGTERM/SIGINT. Writes STATE_DIR/api.json (host, port, pid) while
    running (`fedrec client status` reads it); the SuperNode logs to
    STATE_DIR/logs/supernode.log. One daemon per state directory: it holds
    STATE_DIR/daemon.lock, and a second one on the same directory is refused.
    """
    from client.device.supernode import SuperNodeOptions
    from client.device.training import LearnerConfig

    missing = [
        flag
        for flag, value in (("--server", server), ("--root-cert", root_cert), ("--bundle", bundle))
        if value is None
    ]
    if missing:
        raise ConfigError(
            f"`fedrec client start` joins a federation and needs {', '.join(missing)} "
            "(--server HOST:PORT of the SuperLink, --root-cert the server's certs/ca.pem, "
            "--bundle the federation's pretrained bundle); `fedrec client serve-api` runs the "
            "local API alone"
        )
    assert server is not None and root_cert is not None and bundle is not None
    learner = LearnerConfig(
        debounce_s=adapt_debounce,
        personal_steps=personal_steps,
        personal_lr=personal_lr,
        exclude_seen=exclude_seen,
    )
    options = SuperNodeOptions(
        server=server,
        root_cert=root_cert,
        bundle=bundle,
        runtime_port=supernode_port,
        share_evaluation=share_evaluation,
        max_epsilon=max_epsilon,
        require_dp=not allow_no_dp,
        max_noise_shares=max_noise_shares,
        max_round_steps=max_round_steps,
        max_round_epsilon=max_round_epsilon,
    )
    _run_daemon(ctx, state_dir, passphrase_env, config, host, port, options, learner)


@app.command("serve-api")
@daemon_flags
def serve_api(
    ctx: typer.Context,
    state_dir: StateDirOpt,
    passphrase_env: PassphraseEnvOpt = None,
    host: HostOpt = None,
    port: PortOpt = None,
    config: ConfigOpt = None,
    **settings: Any,
) -> None:
    """Serve only the local HTTP API (no federated processes). One daemon per state directory
    (STATE_DIR/daemon.lock): a second one on the same directory is refused."""
    _run_daemon(ctx, state_dir, passphrase_env, config, host, port)


@app.command("status")
def status(
    state_dir: StateDirOpt,
    timeout: Annotated[
        float,
        typer.Option(
            "--timeout", min=0.1, max=MAX_WAIT_S, help="Seconds to wait for the daemon's answer."
        ),
    ] = 30.0,
    fmt: FormatOpt = "table",
) -> None:
    """Print the running daemon's GET /status, found through STATE_DIR/api.json (--format
    json: its JSON as the API answered it).

    Refused (exit 2, saying so) when no daemon runs on STATE_DIR, also when api.json is
    left over from a daemon that was killed (SIGKILL): the file counts only while its
    daemon holds STATE_DIR/daemon.lock.
    """
    import json
    import urllib.error
    import urllib.request

    from client.device.identity import DeviceIdentity, running_api

    if math.isnan(timeout):  # passes Click's range, then fails in the socket: a traceback
        raise ConfigError(
            f"--timeout must be a number of seconds in [0.1, {MAX_WAIT_S:g}], got {timeout}"
        )
    api = running_api(state_dir)
    token = DeviceIdentity.load(state_dir).api_token()
    request = urllib.request.Request(
        f"{api.url}/status", headers={"Authorization": f"Bearer {token}"}
    )
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback: no proxy
    try:
        with opener.open(request, timeout=timeout) as response:
            body = json.load(response)
    except urllib.error.HTTPError as exc:
        raise FedRecError(
            f"the daemon's API at {api.url} answered {exc.code} to GET /status: "
            f"{exc.read().decode('utf-8', 'replace')[:300]}"
        ) from None
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise FedRecError(
            f"the daemon on {state_dir} (pid {api.pid}) does not answer at {api.url} "
            f"({reason}); it may be stopping: retry, or see its log"
        ) from None
    if fmt == "json" or not isinstance(body, dict):
        typer.echo(json.dumps(body, indent=2))
        return
    from shared.io import readable_path  # a name the locale cannot decode: \xff, no crash

    typer.echo("\n".join([f"device {readable_path(state_dir)}", *field_lines(body, "  ")]))


@app.command("install-model")
@daemon_flags
def install_model(
    ctx: typer.Context,
    state_dir: StateDirOpt,
    model: Annotated[
        Path, typer.Option("--model", click_type=HOME_PATH, help="An exported (int8) ONNX student.")
    ],
    catalog: Annotated[
        Path | None,
        typer.Option(
            "--catalog",
            click_type=HOME_PATH,
            help="Its catalog (JSON list of raw item ids, model order).",
        ),
    ] = None,
    passphrase_env: PassphraseEnvOpt = None,
    config: ConfigOpt = None,
    **settings: Any,
) -> None:
    """Validate a model against the catalog, seal it and make it current (refused while a
    daemon runs on STATE_DIR: it is the only writer of the sealed model store).

    Give it the daemon's settings (--config / the same flags as `start`): installing prunes
    the sealed versions beyond keep-models, so without them a device run with more kept
    versions would lose all but the default 3."""
    from client.device.daemon import Daemon
    from client.device.sealed import Catalog

    cfg = _daemon_config(config, None, None, ctx)
    parsed = Catalog.load(catalog) if catalog is not None else None
    try:
        data = model.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read --model {model}: {exc.strerror or exc}") from exc
    passphrase = _passphrase(state_dir, passphrase_env)
    with Daemon.open(state_dir, passphrase=passphrase, config=cfg) as daemon:
        info = daemon.install_model(data, parsed, name=str(model))
    typer.echo(f"installed {info.model_version} as {info.path.name}")


@app.command("openapi")
def openapi(
    output: Annotated[
        Path | None,
        typer.Option(
            "--output", "-o", click_type=HOME_PATH, help="Write the schema here (else stdout)."
        ),
    ] = None,
    config: ConfigOpt = None,
) -> None:
    """Write the local API's OpenAPI schema (JSON)."""
    from client.device.api import ApiConfig, openapi_json
    from shared.io import REPORT_MODE, check_output_file, write_bytes_atomic

    cfg = _daemon_config(config, None, None)
    text = openapi_json(ApiConfig.from_daemon(cfg))
    if output is None:
        sys.stdout.write(text)
    else:
        target = check_output_file(output, stdout_hint="leave out --output")
        write_bytes_atomic(target, text.encode(), mode=REPORT_MODE)
        typer.echo(f"wrote {output}", err=True)
