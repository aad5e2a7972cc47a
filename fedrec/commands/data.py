"""``fedrec data``: inspect datasets."""

from __future__ import annotations

import json
from typing import Annotated

import typer

from fedrec.options import DataDirOpt, DatasetOpt, FormatOpt, explicit_options
from shared.data.cleaning import DEFAULT_MIN_USER_INTERACTIONS, check_min_user_interactions
from shared.data.registry import dataset_key, load_dataset_with_report
from shared.errors import ConfigError

app = typer.Typer(help="Inspect datasets.", no_args_is_help=True)


@app.command("info")
def info(
    ctx: typer.Context,
    dataset: DatasetOpt = "synthetic",
    data_dir: DataDirOpt = None,
    seed: Annotated[
        int,
        typer.Option(
            "--seed", min=0, max=2**63 - 1, help="Seed of the synthetic world it generates."
        ),
    ] = 42,
    min_user_interactions: Annotated[
        int | None,
        typer.Option(
            help="Drop users with fewer interactions (logged with counts); default "
            f"{DEFAULT_MIN_USER_INTERACTIONS}, for loaded datasets only (the synthetic world "
            "is generated unfiltered).",
            show_default=False,
        ),
    ] = None,
    fmt: FormatOpt = "table",
) -> None:
    """Load a dataset, apply the documented filters, print its summary and what was dropped."""
    dataset = dataset_key(dataset)  # 'Synthetic' is the synthetic world too
    if dataset == "synthetic" and min_user_interactions is not None:
        raise ConfigError(
            "the synthetic world is generated unfiltered: --min-user-interactions does not "
            "apply to it; add --dataset (e.g. ml-100k)"
        )
    if dataset != "synthetic" and explicit_options(ctx, {"seed": "seed"}):
        raise ConfigError(
            f"--seed seeds the synthetic world; {dataset} is read as it is (its splits are "
            "seeded by the commands that split it, e.g. `fedrec evaluate baselines --seed`)"
        )
    if min_user_interactions is None:
        min_user_interactions = DEFAULT_MIN_USER_INTERACTIONS
    check_min_user_interactions(min_user_interactions)  # before a large file is read
    loaded = load_dataset_with_report(
        dataset, data_dir, synthetic_seed=seed, min_user_interactions=min_user_interactions
    )
    summary = loaded.dataset.summary()
    if fmt == "json":
        out = {"summary": summary, "cleaning": loaded.report.as_dict()}
        typer.echo(json.dumps(out, indent=2))
        return
    head = (
        f"{summary['name']}: {summary['users']} users, {summary['items']} items, "
        f"{summary['interactions']} interactions (density {summary['density']:.4g}, median "
        f"{summary['median_seq_len']:g} interactions a user)"
    )
    typer.echo("\n".join([head, *loaded.report.lines()]))
