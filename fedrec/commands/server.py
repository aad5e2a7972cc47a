"""``fedrec server``: the federation's server: TLS material, device registrations, the
Flower SuperLink and the federated run (logic in :mod:`server.state`, :mod:`server.pki`,
:mod:`server.superlink`)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from fedrec.options import (
    HOME_PATH,
    NON_EMPTY_PATH,
    FormatOpt,
    JsonAliasOpt,
    RunConfigOpt,
    config_flag_names,
    explicit_options,
    kebab_run_config,
    with_config_flags,
)
from fedrec.server_settings import DEPLOYMENT_DEFAULTS, NOT_FLAGS, START_SETTINGS_HELP
from server.server_app import ServerConfig
from server.superlink import SuperLinkOptions
from shared.config import MAX_ROUNDS
from shared.federated.local_config import LocalTrainConfig
from shared.federated.student_config import StudentTaskConfig

if TYPE_CHECKING:
    from server.state import ServerLayout

app = typer.Typer(
    help="Federation server: certificates, device registration, SuperLink and run.",
    no_args_is_help=True,
)

CA_VALID_DAYS = 3650
"""The lifetime of the CA `fedrec server init` creates (:func:`server.pki.create_pki`): no
server certificate it signs outlives it, so `renew-cert --valid-days` goes no further (a
larger number overflowed the date: a traceback)."""

START_FLAGS = config_flag_names(START_SETTINGS_HELP, skip=NOT_FLAGS)
"""The flags of every run setting ``fedrec server start`` does not declare itself."""

StateDirOpt = Annotated[
    Path,
    typer.Option(
        "--state-dir",
        click_type=NON_EMPTY_PATH,
        help="The server's state directory (certificates, registrations, SuperLink database, "
        "checkpoints, artifacts, progress).",
    ),
]


@app.command("init")
def init(
    state_dir: StateDirOpt,
    host: Annotated[
        list[str] | None,
        typer.Option(
            "--host",
            help="A DNS name or IP address devices use to reach the server (repeat). Each "
            "becomes a SAN of the server certificate, with localhost and 127.0.0.1, through "
            "which the server reaches its own SuperLink.",
        ),
    ] = None,
    force: Annotated[
        bool,
        typer.Option(
            "--force",
            help="Replace an existing state directory: new CA (devices must get the new "
            "ca.pem), registrations and run state wiped. The record of published model "
            "versions (artifacts/published.jsonl) stays: devices may hold them, so the next "
            "run numbers its versions after the highest recorded.",
        ),
    ] = False,
) -> None:
    """Create the state directory, a CA and a server certificate signed by it."""
    from server.pki import DEFAULT_HOSTS, server_names
    from server.state import init_state_dir

    layout = init_state_dir(state_dir, host or DEFAULT_HOSTS, force=force)
    pki = layout.pki
    typer.echo(
        "\n".join(
            [
                f"server state created in {layout.state_dir}",
                f"  CA certificate:     {pki.ca_cert} (give it to every device: "
                "fedrec client start --root-cert)",
                f"  server certificate: {pki.server_cert} for {', '.join(server_names(pki))}",
                f"  private keys:       {pki.ca_key}, {pki.server_key} (0600)",
                "next: fedrec server register-client DEVICE.pub, then fedrec server start",
            ]
        )
    )


@app.command("renew-cert")
def renew_cert(
    state_dir: StateDirOpt,
    host: Annotated[
        list[str] | None,
        typer.Option(
            "--host",
            help="The names the new certificate carries (repeat; localhost and 127.0.0.1 are "
            "added). Default: those of the current certificate.",
        ),
    ] = None,
    valid_days: Annotated[
        int,
        typer.Option(
            "--valid-days",
            min=1,
            max=CA_VALID_DAYS,
            help="Lifetime of the new certificate in days (cut to what is left of the CA's).",
        ),
    ] = 825,
) -> None:
    """Issue a new server certificate from the existing CA: when it expired, or to serve
    other host names. Devices keep their ca.pem; registrations, checkpoints, artifacts and
    the privacy journal stay. Takes effect at the next `fedrec server start`."""
    from server.pki import load_cert, renew_server_cert, server_names
    from server.state import ServerLayout

    layout = ServerLayout(state_dir).require()
    pki = renew_server_cert(layout.pki.directory, host or None, valid_days=valid_days)
    until = load_cert(pki.server_cert).not_valid_after_utc
    typer.echo(
        f"server certificate {pki.server_cert} renewed for {', '.join(server_names(pki))}, "
        f"valid until {until:%Y-%m-%d}, signed by the same CA ({pki.ca_cert})"
    )


def _not_applied_yet(layout: ServerLayout, what: str) -> str:
    """What happens to a registry change when no SuperLink could take it now."""
    from server.state import running_server

    if running_server(layout) is not None:  # its lock is held: starting, SuperLink not up
        return f"the server is starting: {what} once its SuperLink is up"
    return f"the server is not running: {what} at the next `fedrec server start`"


@app.command("register-client")
def register_client(
    public_key_file: Annotated[
        Path,
        typer.Argument(help="The device's OpenSSH EC public key (identity/client.pub)."),
    ],
    state_dir: StateDirOpt,
    name: Annotated[
        str | None, typer.Option("--name", help="A name for the device (default device-N).")
    ] = None,
) -> None:
    """Authorize a device's key. Takes effect at once on a running server, else at start."""
    from server.state import ClientRegistry, ServerLayout, read_public_key_file
    from server.superlink import SuperLinkError, apply_locked, live_cli

    layout = ServerLayout(state_dir).require()
    key, fingerprint = read_public_key_file(public_key_file)
    # one lock, one read of clients.json (each read checks every stored key): the key is
    # added, saved, applied, and its record says whether the SuperLink took it
    with ClientRegistry.locked(layout.registry) as registry:
        layout.require_registry()  # a new one holding only this key unregisters the others
        # under the lock: a server whose SuperLink is not up yet applies clients.json under
        # it once it is, so it sees this change; checked before the lock, a server that came
        # up and applied its registrations in between left the change for a restart
        cli = live_cli(layout)
        record = next(
            (c for c in registry.active() if c.fingerprint == fingerprint and not c.applied),
            None,
        )
        if record is None or cli is None:  # a retry of a save whose apply failed is not new
            record = registry.add(key, fingerprint, name)
            registry.save()
            typer.echo(f"registered {record.name} ({fingerprint})")
        else:
            typer.echo(f"{record.name} ({fingerprint}) is saved; applying it to the SuperLink")
        if cli is not None:
            for line in apply_locked(layout, cli, registry):
                typer.echo(f"  SuperLink: {line}")
    if cli is None:
        typer.echo(_not_applied_yet(layout, "the key is applied"))
    elif not record.applied:
        # the SuperLink's refusal of one key leaves `server start` registering the others,
        # so it is a line of the output; exiting 0 on it left a script unable to tell that
        # the device still cannot join
        raise SuperLinkError(
            f"the SuperLink did not register {record.name} ({fingerprint}): see its line "
            "above. The key stays in clients.json, and `server start` or this command again "
            "retries it"
        )


@app.command("revoke-client")
def revoke_client(
    client: Annotated[
        str, typer.Argument(help="The device: its name, key fingerprint (SHA256:...) or node id.")
    ],
    state_dir: StateDirOpt,
) -> None:
    """Withdraw a device's key. A running SuperLink refuses the device from its next request.
    A name reused after a revocation (a device that rotated its key) means its active key."""
    from server.state import ClientRegistry, ServerLayout, describe_client
    from server.superlink import apply_locked, live_cli
    from shared.errors import ConfigError

    layout = ServerLayout(state_dir).require()
    with ClientRegistry.locked(layout.registry) as registry:  # one read, as in register-client
        layout.require_registry()  # else "no registered client", as if none had been
        cli = live_cli(layout)  # under the lock, as in register-client
        record = registry.find(client)
        if record.revoked is None:
            record.revoked = time.time()
            registry.save()
            typer.echo(f"revoked {record.name} ({record.fingerprint})")
        elif record.applied and cli is not None:  # saved, but the SuperLink did not hear it
            typer.echo(f"{record.name} is revoked; applying it to the SuperLink")
        else:  # a no-op, refused like registering a registered key
            revoked = registry.matching(client)
            if len(revoked) > 1:  # e.g. both keys of a device that rotated its key
                which = ", ".join(describe_client(c) for c in revoked)
                raise ConfigError(
                    f"{client!r} matches only clients already revoked ({which}); nothing to do"
                )
            raise ConfigError(
                f"{record.name} ({record.fingerprint}) is already revoked; nothing to do"
            )
        if cli is not None:
            for line in apply_locked(layout, cli, registry):
                typer.echo(f"  SuperLink: {line}")
    if cli is None:
        typer.echo(_not_applied_yet(layout, "the SuperLink unregisters it"))


@app.command("start")
@with_config_flags(
    (ServerConfig, LocalTrainConfig, StudentTaskConfig),
    START_SETTINGS_HELP,
    skip=NOT_FLAGS,
    defaults=DEPLOYMENT_DEFAULTS,
)
def start(
    ctx: typer.Context,
    state_dir: StateDirOpt,
    bundle: Annotated[
        Path | None,
        typer.Option(
            "--bundle",
            click_type=HOME_PATH,
            help="The pretrained model-only bundle (runs/<name>/deploy-bundle.pt from `fedrec "
            "simulate`; its bundle.pt holds the simulated users' data and is refused); the "
            "devices run with the same file.",
        ),
    ] = None,
    rounds: Annotated[
        int, typer.Option("--rounds", min=1, max=MAX_ROUNDS, help="Federated rounds in total.")
    ] = 3,
    min_clients: Annotated[
        int,
        typer.Option(
            "--min-clients",
            min=1,
            help="Devices that must be connected to start; at least SecAgg+'s reconstruction "
            "threshold (3 by default) and --min-cohort (2 by default).",
        ),
    ] = 3,
    host: Annotated[
        str, typer.Option("--host", help="Address the SuperLink listens on.")
    ] = SuperLinkOptions.host,
    port: Annotated[
        int, typer.Option("--port", help="The SuperLink's HTTPS port.")
    ] = SuperLinkOptions.port,
    run_config: RunConfigOpt = None,
    max_restarts: Annotated[
        int,
        typer.Option(
            "--max-restarts",
            help="Restarts of a SuperLink that dies, in a row (a round checkpointed between "
            "two deaths starts the count again).",
        ),
    ] = SuperLinkOptions.max_restarts,
    max_log_bytes: Annotated[
        int,
        typer.Option(
            "--max-log-bytes",
            help="Most bytes logs/superlink.log holds; beyond, its oldest lines are dropped "
            "(the newest half kept).",
        ),
    ] = SuperLinkOptions.max_log_bytes,
    max_run_logs: Annotated[
        int,
        typer.Option(
            "--max-run-logs",
            help="Most ServerApp logs (logs/run-ID.log, one per run) kept; beyond, the oldest "
            "are removed.",
        ),
    ] = SuperLinkOptions.max_run_logs,
    **settings: Any,
) -> None:
    """Run the SuperLink (TLS, device authentication, state database, no run-time installs),
    submit the federated run and follow it; resumes from the last checkpoint.

    Every setting of the run is a flag named like its run-config key (below, by topic). A
    flag given on the command line wins over the same setting in --run-config (as in
    `fedrec simulate`)."""
    from server.state import ServerLayout
    from server.superlink import ServerRunner, deployment_run_config, run_config_keys

    layout = ServerLayout(state_dir).require()
    # one spelling per setting: a device caps the kebab-case privacy keys and refused every
    # round of a run that also carried them snake-case (epsilon_budget), and a flag typed
    # must replace the setting, not clash with it
    overrides = kebab_run_config(run_config, known=run_config_keys())
    flags = {"rounds": "num-rounds", "min_clients": "min-available-clients", **START_FLAGS}
    overrides.update(explicit_options(ctx, flags))  # a flag typed wins over --run-config
    overrides.setdefault("num-rounds", rounds)
    overrides.setdefault("min-available-clients", min_clients)
    config = deployment_run_config(layout, bundle=bundle, num_rounds=rounds, overrides=overrides)
    options = SuperLinkOptions(
        host=host,
        port=port,
        max_restarts=max_restarts,
        max_log_bytes=max_log_bytes,
        max_run_logs=max_run_logs,
    )
    runner = ServerRunner(layout, options, config, echo=lambda line: typer.echo(line))
    code = runner.run()
    if code:
        raise typer.Exit(code)


@app.command("status")
def status(
    state_dir: StateDirOpt,
    fmt: FormatOpt = "table",
    as_json: JsonAliasOpt = False,
) -> None:
    """Round, clients, accuracy and privacy spent, read from the state directory (whether or
    not the server runs)."""
    from server.state import ClientRegistry, ServerLayout, describe_last_start, server_status
    from server.superlink import format_round

    layout = ServerLayout(state_dir)
    info = server_status(layout)
    if as_json or fmt == "json":
        typer.echo(json.dumps(info.to_json(), indent=2))
        return
    if not info.running:
        ended = describe_last_start(info.last_start) if info.last_start else None
        state = f"not running: {ended}" if ended else "not running"
    elif info.pid is None:  # the lock is held, running.json not written yet
        state = "starting"
    else:
        state = f"running (pid {info.pid}, https://{info.address}, run {info.run_id})"
    if info.checkpoint_round is not None:
        checkpoint = f"round {info.checkpoint_round}"
    elif info.checkpoint_problem is not None:  # `start` refuses: never "none yet"
        checkpoint = f"none usable: {info.checkpoint_problem}"
    else:
        checkpoint = "none yet"
    last = info.last
    if last is not None and info.num_rounds is not None:  # out of this run's rounds
        last = {**last, "num_rounds": info.num_rounds}
    lines = [
        f"server {layout.state_dir}: {state}",
        f"  checkpoint: {checkpoint}",
        f"  last round: {format_round(last)}" if last else "  last round: none yet",
        f"  model:      {info.latest_artifact or 'none published yet'}",
        f"  clients:    {info.clients_problem}"
        if info.clients_problem
        else f"  clients:    {info.clients_registered} registered, {info.clients_revoked} revoked",
    ]
    for record in ClientRegistry.load(layout.registry).clients:
        mark = "revoked" if record.revoked is not None else f"node {record.node_id or '-'}"
        lines.append(f"    {record.name:<14} {record.fingerprint}  {mark}")
    typer.echo("\n".join(lines))
