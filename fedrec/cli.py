"""``fedrec``: the console command's entry point, :func:`main` (pyproject's
``[project.scripts]``). The command tree is :mod:`fedrec.app`, imported by :func:`main` once
Ctrl-C is handled: importing it takes about a second, and a Ctrl-C then printed a Python
traceback instead of "aborted". So this module imports nothing heavy itself."""

from __future__ import annotations

import os
import signal
import sys
import threading
from types import FrameType
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import typer


def __getattr__(name: str) -> typer.Typer:
    """``fedrec.cli.app``: the command tree (:data:`fedrec.app.app`), imported on first use."""
    if name == "app":
        from fedrec.app import app

        return app
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


_interrupted = threading.Event()
"""Set by :func:`_note_interrupt`: Ctrl-C reached a command that has no handler of its own."""


def _note_interrupt(signum: int, frame: FrameType | None) -> None:
    """Python's own Ctrl-C (a KeyboardInterrupt), noted: Typer turns a command's
    KeyboardInterrupt into a silent exit status 130, which :func:`main` cannot tell from a
    command's own ``typer.Exit(130)`` (which has said why) without it."""
    _interrupted.set()
    raise KeyboardInterrupt


def _open_closed_std_fds() -> None:
    """Point a closed standard descriptor (``fedrec ... >&-``, a supervisor that closes them)
    at ``/dev/null``. Left closed, the next file the command opens takes its number: the device
    store, a key or a report would then receive whatever the SuperNode child or a library
    writes to "standard output". Python leaves ``sys.stdout`` ``None`` there, so output the
    command prints is dropped, as under ``> /dev/null``."""
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
        except OSError:  # closed: in this order, it is the lowest free number os.open takes
            os.open(os.devnull, os.O_RDWR)


def _refuse_a_removed_working_folder() -> None:
    """Exit 2 with one line when the current folder was removed after the shell entered it
    (``cd`` into a folder another process then deleted). Importing torch there aborted the
    process with "Intel oneMKL FATAL ERROR: Cannot load .../libtorch_cpu.so" (``simulate``,
    ``evaluate``, the device daemon), and a relative path given ended in a traceback from
    ``os.getcwd``."""
    try:
        os.getcwd()
    except FileNotFoundError:
        print(
            "error: the current folder no longer exists (removed after the shell entered it); "
            "cd to an existing folder and run the command again",
            file=sys.stderr,
        )
        sys.exit(2)


CLOSED_OUTPUT_STATUS = 141
"""The exit status when the reader of the output went away (``fedrec ... | head -1``):
128 + SIGPIPE, what the shell reports for ``cat``, ``grep`` or ``git`` there, so that ``set -o
pipefail`` treats ``fedrec`` like them. Exited with, not killed by the signal, so that
Python's own cleanup (``atexit``, logging) still runs."""


def _quit_closed_output() -> None:
    """Exit :data:`CLOSED_OUTPUT_STATUS`, silently: the reader of the output went away, so
    nothing is left to tell. Standard output and error are pointed at ``/dev/null`` first:
    Python flushes them at exit, and the broken pipe would then print "Exception ignored
    ... BrokenPipeError" and exit 120."""
    null = os.open(os.devnull, os.O_WRONLY)
    for fd in (1, 2):
        os.dup2(null, fd)
    os.close(null)
    sys.exit(CLOSED_OUTPUT_STATUS)


def main() -> None:
    """Entry point: user errors, paths that cannot be used and a full disk (also under the
    redirected output) become one line on stderr and exit code 2; Ctrl-C, where a command
    does not handle it itself, "aborted" and 130, also while the commands are imported;
    output whose reader went away (``| head -1``) a silent exit, status 141.
    Closed standard descriptors are opened on ``/dev/null`` first, and a current folder
    that was removed is refused (:func:`_refuse_a_removed_working_folder`)."""
    _open_closed_std_fds()
    _refuse_a_removed_working_folder()
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:  # not an ignored one
        signal.signal(signal.SIGINT, _note_interrupt)
    try:
        _run()
    except KeyboardInterrupt:  # while importing, before Click could turn it into an Abort
        print("aborted", file=sys.stderr)
        sys.exit(130)


def _run() -> None:
    """Import the command tree and run the command line (see :func:`main`)."""
    import logging

    import click
    import typer

    from fedrec.app import OutputClosed, app
    from fedrec.options import colored
    from shared.config import is_int
    from shared.errors import FedRecError
    from shared.io import disk_full, readable_message

    def error(message: str) -> None:
        """The one-line error, a byte of a path the locale cannot decode shown as ``\\xff``
        (printed as Python holds it, it read ``\\udcff``, ``?`` or a raw invalid byte, and a
        strict output encoding ended the command in a UnicodeEncodeError traceback)."""
        colored(readable_message(f"error: {message}"), "red")

    try:
        code = app(standalone_mode=False)
    except OutputClosed:
        _quit_closed_output()
    except FedRecError as err:
        error(str(err))
        sys.exit(2)
    except OSError as err:
        full = disk_full(err)
        if err.filename is None and not full:  # neither a path nor the disk: a real fault
            raise
        # a path given on the command line that cannot be created, read or written, or a
        # full disk: also where no file is named, as when the output redirected to a file
        # (`> report.json` on a full disk, `> /dev/full`) cannot be written
        logging.getLogger("fedrec").debug("file system error", exc_info=True)
        where = "" if err.filename is None else f": {err.filename}"
        where += f" -> {err.filename2}" if err.filename2 else ""
        fix = "free space on that disk and retry" if full else "check the path and its permissions"
        error(f"{err.strerror or err}{where}; {fix}")
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
