"""Options shared by several commands, declared once."""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import os
import shlex
import typing
from collections.abc import Callable, Collection, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, TypeVar

import click
import typer

from shared.config import Scalar, kebab, parse_run_config
from shared.errors import ConfigError
from shared.io import home_path, readable_message, readable_path

if TYPE_CHECKING:
    from rich.console import Console
    from rich.table import Table

F = TypeVar("F", bound=Callable[..., Any])


def expand_home(text: str, param: click.Parameter | None, ctx: click.Context | None) -> Path:
    """``text`` as a path whose leading ``~`` (or ``~user``) is that home folder, as the
    shell reads it except after ``=``. A ``~user`` that names no user is a usage error
    (pathlib's expansion raised a RuntimeError: a traceback)."""
    try:
        return home_path(text)
    except ConfigError as err:
        raise click.BadParameter(readable_message(str(err)), ctx=ctx, param=param) from None


class NonEmptyPath(click.ParamType):
    """A folder option that refuses ``""`` (``Path("")`` is the current directory, so an empty
    variable in a script would silently write a state directory, or read a dataset, there)
    and an existing file (every later error would name a path inside it). A leading ``~`` is
    the home folder, as the shell reads it except after ``=`` (``--state-dir=~/fedrec``
    made a folder named ``~`` in the current one)."""

    name = "path"

    def convert(
        self, value: object, param: click.Parameter | None, ctx: click.Context | None
    ) -> Path:
        if isinstance(value, Path):
            return value
        text = str(value)
        if not text.strip():
            self.fail("must not be empty (give a folder; '.' for the current one)", param, ctx)
        path = expand_home(text, param, ctx)
        if path.exists() and not path.is_dir():
            # a name the locale cannot decode as \xff, as the CLI's own error lines show it
            self.fail(f"{readable_path(text)} is a file, not a folder", param, ctx)
        return path


NON_EMPTY_PATH = NonEmptyPath()
"""``click_type`` of every folder option."""


class HomePath(click.ParamType):
    """A file option whose leading ``~`` is the home folder, as for a folder option (the
    shell leaves it alone after ``=``: ``--output=~/report.json`` wrote ``./~/report.json``)."""

    name = "file"

    def convert(
        self, value: object, param: click.Parameter | None, ctx: click.Context | None
    ) -> Path:
        return value if isinstance(value, Path) else expand_home(str(value), param, ctx)


HOME_PATH = HomePath()
"""``click_type`` of every file option."""

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
    list[str] | None,
    typer.Option(
        "--run-config",
        help="Overrides as 'key=value key2=value2' (kebab-case keys, TOML values); may be "
        "repeated (a key given twice is refused).",
    ),
]


def parsed_entries(texts: list[str] | None, *, flag: str = "--run-config") -> dict[str, Scalar]:
    """The entries of a repeatable ``key=value ...`` option, each repetition split on its
    own (joined, a quote left open in one swallowed the next: ``a=it's`` then ``b=isn't``
    read as ``a="its b=isnt"``); a key given twice, also across repetitions, is refused
    (the last would win silently)."""
    out: dict[str, Scalar] = {}
    for text in texts or []:
        for key, value in parse_run_config(text, flag=flag).items():
            if key in out:
                raise ConfigError(f"{flag}: {key!r} is given twice; give each key once")
            out[key] = value
    return out


def kebab_run_config(
    texts: list[str] | None,
    *,
    known: Collection[str] | None = None,
    flag: str = "--run-config",
) -> dict[str, Any]:
    """The entries of ``flag`` (``--run-config``, the device's ``--config``) with one
    spelling per setting: a snake-case key (``batch_size``) is its kebab-case one
    (``batch-size``), as every reader takes it, so that a flag of the same setting replaces
    it and nothing downstream reads it under both names. A setting given in both spellings
    is refused. With ``known``, only keys whose kebab-case form is in it are respelled (a
    custom task may read keys of its own)."""
    values: dict[str, Any] = {}
    spelled: dict[str, str] = {}
    for key, value in parsed_entries(texts, flag=flag).items():
        name = kebab(key) if known is None or kebab(key) in known else key
        if name in values:
            raise ConfigError(
                f"{flag} gives '{name}' twice ({spelled[name]} and {key}); give it once"
            )
        values[name], spelled[name] = value, key
    return values


OutputOpt = Annotated[
    Path | None,
    typer.Option("--output", "-o", click_type=HOME_PATH, help="Write the JSON report here."),
]
FORMATS = ("table", "json")
"""What ``--format`` takes: every command that prints a report offers both, ``table`` by
default (``simulate``, ``server status``, ``evaluate``, ``bandits``, ``data info``,
``client status``)."""

FormatOpt = Annotated[
    str,
    typer.Option(
        "--format",
        click_type=click.Choice(FORMATS),
        help="'table' for people, 'json' for machines.",
    ),
]
JsonAliasOpt = Annotated[
    bool, typer.Option("--json", hidden=True, help="The same as --format json (older spelling).")
]


def field_lines(record: Mapping[str, Any], indent: str = "") -> list[str]:
    """``record`` (a JSON object) for people: one ``name: value`` line per field, in its
    order, names with spaces for underscores and values aligned; a nested object is an
    indented block under its name, a list of objects one block each (titled by its
    ``name`` where it has one), ``null`` is ``-``. Every field is shown, also one this
    version does not know (a device daemon of another version answers ``client status``)."""
    lines: list[str] = []
    width = max((len(str(key)) for key in record), default=0) + 1
    for key, value in record.items():
        label = f"{indent}{str(key).replace('_', ' ') + ':':<{width}}"
        if isinstance(value, Mapping):
            lines += [label.rstrip(), *field_lines(value, indent + "  ")]
        elif isinstance(value, list) and value and all(isinstance(v, Mapping) for v in value):
            lines.append(label.rstrip())
            for number, item in enumerate(value, 1):
                title = item.get("name", f"#{number}")
                rest = {k: v for k, v in item.items() if k != "name" or title != v}
                lines += [f"{indent}  {title}", *field_lines(rest, indent + "    ")]
        elif isinstance(value, list):
            lines.append(f"{label} {', '.join(_field_text(v) for v in value) or '-'}")
        else:
            lines.append(f"{label} {_field_text(value)}")
    return lines


def _field_text(value: object) -> str:
    """One value of :func:`field_lines`: ``-`` for ``null``, ``true``/``false`` as in the
    JSON, anything else as ``str`` writes it."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


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


def with_config_flags(
    config_cls: type | Sequence[type | tuple[str, type]],
    topics: Mapping[str, Mapping[str, str]],
    *,
    skip: Collection[str],
    defaults: Mapping[str, Any] | None = None,
) -> Callable[[F], F]:
    """Give a command one flag per field of the dataclass(es) ``config_cls`` that it does not
    declare itself (``skip``), named like the field's run-config key and listed under its
    topic in ``--help``. A field of several classes (one run-config key read by several
    apps) gets one flag, typed and defaulted by the first; a class given as ``(prefix,
    class)`` has its fields named with the prefix (``("bandit_", BanditConfig)``:
    ``--bandit-policy``). ``defaults`` replaces the shown default where the command's differs
    from the dataclass's. The command takes them as ``**settings``; :func:`explicit_options`
    with :func:`config_flag_names` returns the ones the user typed."""
    classes = [config_cls] if isinstance(config_cls, type) else list(config_cls)
    hints: dict[str, Any] = {}
    shown: dict[str, Any] = {}
    for item in reversed(classes):  # the first class wins a shared field
        prefix, cls = item if isinstance(item, tuple) else ("", item)
        types = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            hints[prefix + f.name] = types[f.name]
            shown[prefix + f.name] = f.default
    shown.update(defaults or {})

    def decorate(func: F) -> F:
        signature = inspect.signature(func, eval_str=True)
        own = [p for p in signature.parameters.values() if p.kind is not p.VAR_KEYWORD]
        extra: list[inspect.Parameter] = []
        for topic, fields in topics.items():
            for name, text in fields.items():
                if name in skip:
                    continue
                default = shown[name]
                extra.append(
                    inspect.Parameter(
                        name,
                        inspect.Parameter.KEYWORD_ONLY,
                        default=list(default) if isinstance(default, tuple) else default,
                        annotation=_flag_annotation(name, hints[name], text, topic),
                    )
                )
        func.__signature__ = signature.replace(parameters=[*own, *extra])  # type: ignore[attr-defined]
        return func

    return decorate


def config_flag_names(
    topics: Mapping[str, Mapping[str, str]], *, skip: Collection[str]
) -> dict[str, str]:
    """``{parameter name: run-config key}`` of the flags :func:`with_config_flags` adds."""
    return {name: kebab(name) for fields in topics.values() for name in fields if name not in skip}


def _flag_annotation(name: str, hint: Any, text: str, topic: str) -> Any:
    flag = "--" + kebab(name)
    kind: Any = hint
    if hint is bool:
        flag = f"{flag}/--no-{flag[2:]}"
    elif typing.get_origin(hint) is tuple:  # a repeated flag: --shots 1 --shots 3
        kind = list[typing.get_args(hint)[0]]  # type: ignore[misc]
    elif hint == int | float:  # a count or a fraction, e.g. secagg-num-shares
        return Annotated[
            str, typer.Option(flag, click_type=COUNT_OR_FRACTION, help=text, rich_help_panel=topic)
        ]
    elif hint not in (int, float, str):
        raise TypeError(f"no flag type for {name}: {hint!r}")
    return Annotated[kind, typer.Option(flag, help=text, rich_help_panel=topic)]


class CountOrFraction(click.ParamType):
    """A number that is an ``int`` when written as one (``5``: a count) and a ``float``
    otherwise (``0.5``: a fraction), as TOML reads it in ``--run-config``."""

    name = "number"

    def convert(
        self, value: object, param: click.Parameter | None, ctx: click.Context | None
    ) -> int | float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return value
        text = str(value).strip()
        try:
            return int(text)
        except ValueError:
            pass
        try:
            return float(text)
        except ValueError:
            self.fail(f"{text!r} is not a number (a count like 5 or a fraction like 0.5)")


COUNT_OR_FRACTION = CountOrFraction()


def command_line(args: Sequence[str]) -> str:
    """``fedrec ARGS`` as the shell reads it back, each argument quoted where it needs it:
    the command a report records, to be typed again (joined with spaces,
    ``--run-config "k=5 seed=3"`` became ``--run-config k=5 seed=3``, another command)."""
    return shlex.join(["fedrec", *args])


def say(what: str) -> None:
    """One progress line on stderr (stdout holds only the report): for commands whose work
    takes minutes and would otherwise be silent until their report. A reader of them that
    went away (``2>&1 >/dev/null | head -1``) ends these lines, not the command: the
    BrokenPipeError ended it, exit status 1, before its ``-o`` report was written."""
    with contextlib.suppress(OSError):
        typer.echo(f"{what} ...", err=True)


def colored(message: str, fg: str) -> None:
    """``message`` on stderr in colour ``fg`` where colours are wanted: on a terminal, unless
    ``NO_COLOR`` is set (no-color.org) or ``TERM`` is ``dumb`` or ``unknown``, which Rich's
    tables and usage errors already honour (Click's own test is only "is it a terminal")."""
    plain = os.environ.get("NO_COLOR", "") != "" or os.environ.get("TERM") in ("dumb", "unknown")
    typer.secho(message, fg=fg, err=True, color=False if plain else None)


def print_table(table: Table, console: Console | None = None) -> None:
    """``table`` on ``console`` (standard output's by default) at its width or, where that is
    too narrow for the table, at one that cuts no word (each column at least as wide as its
    longest word; ``console`` keeps that width): the terminal wraps the longer lines instead.
    Rich cut the cells that did not fit to "…", figures included (in a 20-column terminal
    every HR and NDCG of ``evaluate baselines`` read "…"; at 60, ``fedrec simulate``'s
    populations and model names did)."""
    from rich.cells import cell_len
    from rich.console import Console
    from rich.measure import Measurement
    from rich.segment import Segment

    console = console or Console()
    for column in table.columns:
        texts = (str(column.header), *(str(cell) for cell in column.cells))
        column.min_width = max(cell_len(word) for text in texts for word in text.split() or [""])
    natural = Measurement.get(console, console.options.update_width(2**16), table).maximum
    width = console.width
    while width < natural:  # Rich may narrow a column below its minimum, then widen it again
        segments = console.render(table, console.options.update_width(width))
        used = max(Segment.get_line_length(line) for line in Segment.split_lines(segments))
        if used <= width:
            break
        width = used
    console.width = max(console.width, min(width, natural))
    console.print(table)
