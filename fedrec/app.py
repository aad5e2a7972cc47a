"""The ``fedrec`` command tree (Typer): the root only wires sub-commands. Its entry point is
:func:`fedrec.cli.main`, which imports this module once Ctrl-C is handled there."""

from __future__ import annotations

import contextlib
import errno
import logging
import sys
from collections.abc import Iterator
from typing import Any

import click
import typer
from typer.core import TyperGroup

from fedrec.commands import bandits, client, data, evaluate, server, simulate


class OutputClosed(Exception):
    """The reader of standard output (or error) went away while a command wrote to it:
    ``fedrec data info | head -1``. Not an :class:`OSError`, so that Click's own handler
    (exit status 1) lets it through to :func:`fedrec.cli.main`."""


def _stream_closed(fd: int) -> bool:
    """Whether ``fd`` is a pipe or socket whose reader has gone (``poll`` reports an
    error or a hang-up on it). Without ``poll`` (Windows), any broken pipe counts."""
    import select

    if not hasattr(select, "poll"):
        return True
    poller = select.poll()
    poller.register(fd, select.POLLOUT)
    try:
        return any(event & (select.POLLERR | select.POLLHUP) for _, event in poller.poll(0))
    except OSError:
        return False


def _closed_output(err: OSError) -> bool:
    """``err`` is a broken pipe and standard output or error is the pipe that broke (another
    broken pipe, a socket or a child's stdin, stays an error of the command)."""
    return err.errno == errno.EPIPE and any(_stream_closed(fd) for fd in (1, 2))


@contextlib.contextmanager
def _reader_gone() -> Iterator[None]:
    """Raise :class:`OutputClosed` for a write to a standard stream whose reader went away:
    the broken pipe itself, or the ``SystemExit(1)`` Rich turns it into (its tables and
    Typer's ``--help`` print through Rich, which also points standard output at
    ``/dev/null`` first)."""
    try:
        yield
    except OSError as err:
        if _closed_output(err):
            raise OutputClosed from err
        raise
    except SystemExit as exit_:
        if exit_.code == 1 and isinstance(exit_.__context__, BrokenPipeError):
            raise OutputClosed from exit_.__context__
        raise


class _RootGroup(TyperGroup):
    """The root command, turning a write to a standard stream whose reader went away into
    :class:`OutputClosed` (:func:`_reader_gone`): while the command line and ``--help`` are
    read (:meth:`make_context`) and while a command runs (:meth:`invoke`, also the
    sub-commands' ``--help``). Click, Typer and Rich exited 1 on it (``fedrec server status
    | head -1`` "failed" under ``set -o pipefail``)."""

    def make_context(
        self,
        info_name: str | None,
        args: list[str],
        parent: click.Context | None = None,
        **extra: Any,
    ) -> click.Context:
        with _reader_gone():
            return super().make_context(info_name, args, parent, **extra)

    def invoke(self, ctx: click.Context) -> Any:
        with _reader_gone():
            result = super().invoke(ctx)
            if sys.stdout is not None:  # what is still buffered breaks here, not at the exit
                sys.stdout.flush()
            return result


app = typer.Typer(
    name="fedrec",
    cls=_RootGroup,
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
