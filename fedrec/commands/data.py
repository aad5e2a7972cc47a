"""``fedrec data``: inspect datasets."""

from __future__ import annotations

import json
from typing import Annotated

import typer

from fedrec.options import DataDirOpt, DatasetOpt, SeedOpt
from shared.data.registry import load_dataset_with_report

app = typer.Typer(help="Inspect datasets.", no_args_is_help=True)


@app.command("info")
def info(
    dataset: DatasetOpt = "synthetic",
    data_dir: DataDirOpt = None,
    seed: SeedOpt = 42,
    min_user_interactions: Annotated[
        int, typer.Option(help="Drop users with fewer interactions (logged with counts).")
    ] = 3,
) -> None:
    """Load a dataset, apply the documented filters, print its summary and what was dropped."""
    loaded = load_dataset_with_report(
        dataset, data_dir, synthetic_seed=seed, min_user_interactions=min_user_interactions
    )
    out = {"summary": loaded.dataset.summary(), "cleaning": loaded.report.as_dict()}
    typer.echo(json.dumps(out, indent=2))
