"""The ``fedrec`` command tree (Typer): the root only wires sub-commands. Its entry point is
:func:`fedrec.cli.main`, which imports this module once Ctrl-C is handled there."""

from __future__ import annotations

import logging

import typer

from fedrec.commands import bandits, client, data, evaluate, server, simulate

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
