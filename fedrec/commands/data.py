"""``fedrec data``: inspect datasets."""

from __future__ import annotations

import json

import typer
from shared.data.registry import load_dataset

from fedrec.options import DataDirOpt, DatasetOpt, SeedOpt

app = typer.Typer(help="Inspect datasets.", no_args_is_help=True)


@app.command("info")
def info(
    dataset: DatasetOpt = "synthetic",
    data_dir: DataDirOpt = None,
    seed: SeedOpt = 42,
) -> None:
    """Load a dataset (applying the documented filters) and print its summary as JSON."""
    ds = load_dataset(dataset, data_dir, synthetic_seed=seed)
    typer.echo(json.dumps(ds.summary(), indent=2))
