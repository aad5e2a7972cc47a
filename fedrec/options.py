"""Options shared by several commands, declared once."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import click
import typer


class NonEmptyPath(click.ParamType):
    """A path option that refuses ``""``: ``Path("")`` is the current directory, so an empty
    variable in a script would silently write a state directory, or read a dataset, there."""

    name = "path"

    def convert(
        self, value: object, param: click.Parameter | None, ctx: click.Context | None
    ) -> Path:
        if isinstance(value, Path):
            return value
        text = str(value)
        if not text.strip():
            self.fail("must not be empty (give a folder; '.' for the current one)", param, ctx)
        return Path(text)


NON_EMPTY_PATH = NonEmptyPath()
"""``click_type`` of every folder option."""

DatasetOpt = Annotated[
    str,
    typer.Option(
        "--dataset",
        "-d",
        help="synthetic (embedded default), ml-100k, ml-1m, ml-latest-small, ml-latest, "
        "ml-25m or generic.",
    ),
]
DataDirOpt = Annotated[
    Path | None,
    typer.Option(
        "--data-dir",
        click_type=NON_EMPTY_PATH,
        help="Local copy of the dataset (e.g. ../shared/datasets/ml-100k). Without it, "
        "ml-100k, ml-1m and ml-latest-small are downloaded into the cache and "
        "checksum-verified; ml-latest and ml-25m must be downloaded by hand.",
    ),
]
SeedOpt = Annotated[
    int,
    typer.Option("--seed", help="Seed of every split and sampler.", min=0, max=2**63 - 1),
]
RunConfigOpt = Annotated[
    str,
    typer.Option(
        "--run-config",
        help="Overrides as 'key=value key2=value2' (kebab-case keys, TOML values).",
    ),
]
OutputOpt = Annotated[
    Path | None, typer.Option("--output", "-o", help="Write the JSON report here.")
]
FormatOpt = Annotated[
    str, typer.Option("--format", help="'table' for people, 'json' for machines.")
]


def explicit_options(ctx: typer.Context, names: dict[str, str]) -> dict[str, object]:
    """The options the user actually typed, as ``{config key: value}``.

    ``names`` maps parameter names to config keys. Defaults are left out so that values from
    ``--run-config`` are only overridden by flags the user gave.
    """
    import click

    out: dict[str, object] = {}
    for param, key in names.items():
        source = ctx.get_parameter_source(param)
        if source not in (None, click.core.ParameterSource.DEFAULT):
            out[key] = ctx.params[param]
    return out
