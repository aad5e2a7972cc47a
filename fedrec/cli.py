"""``fedrec``: the one console command. The root only wires sub-commands."""

from __future__ import annotations

import errno
import logging
import signal
import sys
import threading
from types import FrameType

import click
import typer

from fedrec.commands import bandits, client, data, evaluate, server, simulate
from shared.config import is_int
from shared.errors import FedRecError

app = typer.Typer(
    name="fedrec",
    help="Federated, privacy-preserving, few-shot recommender.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
app.add_typer(data.app, name="data")
app.add_typer(evaluate.app, name="evaluate")
app.add_typer(client.app, name="client")
app.add_typer(server.app, name="server")
app.add_typer(bandits.app, name="bandits")
app.command("simulate")(simulate.simulate)


def _print_version(wanted: bool) -> None:
    """``--version``: the installed package's version, before any command runs."""
    if wanted:
        from importlib.metadata import PackageNotFoundError, version

        try:
            typer.echo(f"fedrec {version('fedrec')}")
        except PackageNotFoundError:  # run from a checkout that was never installed
            typer.echo("fedrec (not installed: run ./scripts/setup.sh)")
        raise typer.Exit()


@app.callback()
def _root(
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Log progress at INFO level."),
    show_version: bool = typer.Option(
        False,
        "--version",
        callback=_print_version,
        is_eager=True,
        help="Print the installed version and exit.",
    ),
) -> None:
    """Federated, privacy-preserving, few-shot recommender."""
    level = logging.INFO if verbose else logging.WARNING
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # Flower logs through its own handler; keep it from printing everything twice and from
    # flooding the live progress display unless asked to. Importing Flower sets its
    # logger's level (DEBUG), so import it before setting ours: the commands import Flower
    # later, lazily.
    from flwr.common.logger import FLOWER_LOGGER

    FLOWER_LOGGER.propagate = False
    FLOWER_LOGGER.setLevel(level)


_interrupted = threading.Event()
"""Set by :func:`_note_interrupt`: Ctrl-C reached a command that has no handler of its own."""


def _note_interrupt(signum: int, frame: FrameType | None) -> None:
    """Python's own Ctrl-C (a KeyboardInterrupt), noted: Typer turns a command's
    KeyboardInterrupt into a silent exit status 130, which :func:`main` cannot tell from a
    command's own ``typer.Exit(130)`` (which has said why) without it."""
    _interrupted.set()
    raise KeyboardInterrupt


def main() -> None:
    """Entry point: user errors become one line on stderr and exit code 2; Ctrl-C, where a
    command does not handle it itself, "aborted" and 130."""
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:  # not an ignored one
        signal.signal(signal.SIGINT, _note_interrupt)
    try:
        code = app(standalone_mode=False)
    except FedRecError as err:
        typer.secho(f"error: {err}", fg="red", err=True)
        sys.exit(2)
    except OSError as err:
        if err.filename is None:  # not about a path the user gave: a real fault, keep it loud
            raise
        # a path given on the command line that cannot be created, read or written
        logging.getLogger("fedrec").debug("file system error", exc_info=True)
        where = f"{err.filename}" + (f" -> {err.filename2}" if err.filename2 else "")
        full = err.errno in (errno.ENOSPC, errno.EDQUOT)
        fix = "free space on that disk and retry" if full else "check the path and its permissions"
        typer.secho(f"error: {err.strerror or err}: {where}; {fix}", fg="red", err=True)
        sys.exit(2)
    except (click.exceptions.Abort, KeyboardInterrupt):
        typer.echo("aborted", err=True)
        sys.exit(130)
    except click.ClickException as err:
        if isinstance(err, click.NoSuchOption) and err.option_name in ("-v", "--verbose"):
            name = err.option_name
            err = click.UsageError(
                f"No such option {name!r} here; it goes before the command: "
                f"fedrec {name} COMMAND ...",
                ctx=err.ctx,
            )
        err.show()
        sys.exit(err.exit_code)
    except click.exceptions.Exit as err:
        sys.exit(err.exit_code)
    # without standalone mode Click *returns* a typer.Exit's status instead of exiting with
    # it: `server start` and `client start` exited 0 after a failed run or a signal
    if is_int(code) and code != 0:
        if code == 130 and _interrupted.is_set():  # Typer swallowed the KeyboardInterrupt
            typer.echo("aborted", err=True)
        sys.exit(code)


if __name__ == "__main__":
    main()
