"""``fedrec evaluate``: the protocol's evaluations from the command line."""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from dataclasses import asdict, replace
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.table import Table

from fedrec.options import (
    HOME_PATH,
    DataDirOpt,
    DatasetOpt,
    FormatOpt,
    OutputOpt,
    RunConfigOpt,
    SeedOpt,
    command_line,
    explicit_options,
    parsed_entries,
    print_table,
    say,
)
from shared.config import from_flat, kebab, unknown_keys_error
from shared.data.registry import dataset_key, load_dataset
from shared.errors import ConfigError, DatasetNotFoundError
from shared.eval.baseline_benchmark import (
    BaselineConfig,
    EmbeddingFn,
    run_baseline_benchmark,
    summary_rows,
)
from shared.eval.protocol import DEFAULT_SHOTS, EvalConfig, fewshot_recs_path
from shared.eval.splits import SplitConfig
from shared.io import REPORT_MODE, check_output_file, write_json_atomic

if TYPE_CHECKING:
    from shared.data.dataset import RecDataset
    from shared.data.provenance import DataProvenance
    from simulation.config import SimulationConfig

app = typer.Typer(help="Evaluate models under ../shared/PROTOCOL.md.", no_args_is_help=True)

ColdFractionOpt = Annotated[
    float, typer.Option(help="Share of users held out as cold-start (0 disables).")
]
PublicFractionOpt = Annotated[
    float, typer.Option(help="Share of the remaining users that are public.")
]


@app.command("baselines")
def baselines(
    ctx: typer.Context,
    dataset: DatasetOpt = "synthetic",
    data_dir: DataDirOpt = None,
    seed: SeedOpt = 42,
    cold_user_fraction: ColdFractionOpt = 0.1,
    public_fraction: PublicFractionOpt = 0.2,
    text: Annotated[
        bool, typer.Option("--text/--no-text", help="Run the LM text-only baseline.")
    ] = True,
    cold_items: Annotated[
        bool, typer.Option("--cold-items/--no-cold-items", help="Run the cold-start item split.")
    ] = True,
    export: Annotated[
        Path | None,
        typer.Option(
            "--export",
            click_type=HOME_PATH,
            help="Write recs.csv (user,item,rank; top 100), and with cold users "
            "recs-fewshot-kK.csv next to it per few-shot K.",
        ),
    ] = None,
    export_model: Annotated[
        str, typer.Option(help="Baseline whose top-100 is exported: pop, itemknn or ease.")
    ] = "ease",
    output: OutputOpt = None,
    fmt: FormatOpt = "table",
    run_config: RunConfigOpt = None,
) -> None:
    """Pop, ItemKNN, EASE and text-only, side by side on one seeded split."""
    if export is None and explicit_options(ctx, {"export_model": "export-model"}):
        raise ConfigError("--export-model chooses what --export writes; give --export FILE too")
    values = _values(ctx, run_config, {"cold_items": "cold-items"})
    values.setdefault("seed", seed)
    split_cfg, eval_cfg = _split_and_eval(values, BaselineConfig)
    base_cfg = from_flat(BaselineConfig, _pick(values, BaselineConfig))
    _check_outputs(output, export, shots=base_cfg.shots)
    ds = load_dataset(dataset, data_dir, synthetic_seed=split_cfg.seed)
    embed = _text_embedder() if text else None
    report = run_baseline_benchmark(
        ds,
        split_cfg,
        eval_cfg,
        base_cfg,
        embed=embed,
        export_path=export,
        export_model=export_model,
        progress=say,
    )
    _emit(report, output, fmt, eval_cfg.k)


@app.command("model")
def model(
    ctx: typer.Context,
    path: Annotated[
        Path,
        typer.Argument(help="A published ONNX model file."),
    ],
    dataset: DatasetOpt = "synthetic",
    data_dir: DataDirOpt = None,
    seed: SeedOpt = 42,
    cold_user_fraction: ColdFractionOpt = 0.1,
    public_fraction: PublicFractionOpt = 0.2,
    shots: Annotated[
        list[int] | None,
        typer.Option(
            "--shots",
            help="Few-shot support sizes K (repeat the flag; default: those of the run whose "
            "models/ holds PATH, else 1 3 5 10).",
        ),
    ] = None,
    export: Annotated[
        Path | None,
        typer.Option(
            "--export",
            click_type=HOME_PATH,
            help="Write recs.csv (user,item,rank; top 100), and with cold users "
            "recs-fewshot-kK.csv next to it per few-shot K.",
        ),
    ] = None,
    output: OutputOpt = None,
    fmt: FormatOpt = "table",
    run_config: RunConfigOpt = None,
) -> None:
    """A published ONNX model (PATH), HR@10 / NDCG@10 per population and K.

    PATH: model-vN.int8.onnx of a run's models/ (scored on that run's data
    and split, read from its config.json) or of the server's published
    folder (scored on the data and split its metadata records, when its
    bundle came from `fedrec simulate`; otherwise give the dataset, --seed
    and fractions it was trained with, or users it trained on are tested on
    what it learned). --data-dir says where that dataset is. A run's model is
    scored with that run's evaluation seed, reproducing its summary's int8
    (leave-one-out) figures, and at the run's K (its shots); --shots and
    --run-config still choose others."""
    from shared.eval.model_evaluation import evaluate_model
    from shared.ondevice.runtime import OnDeviceModel, catalog_fingerprint
    from simulation.pipeline import check_run_data, load_run_dataset, trained_with

    values = _values(ctx, run_config, {})
    run = trained_with(path)
    if run is not None:  # a simulation run's model: its own data and split, nothing else
        run_root = path.resolve().parent.parent
        source = f"was trained by the run in {run_root}"
        # before --data-dir is applied: a run's config refuses a folder for the synthetic
        # world, whose message ("add --dataset") would be wrong here
        _refuse_another_split(ctx, values, path, _split_of(run), source, "the run's")
        _refuse_data_dir_for_synthetic(path, source, run.dataset, data_dir)
        if data_dir is not None:
            run = replace(run, data_dir=str(data_dir))  # the same dataset, elsewhere
        values["seed"] = run.seed
    typed = dict(values)  # the settings asked for, which a model's recorded split checks
    values.setdefault("seed", seed)
    split_cfg, eval_cfg = _split_and_eval(values, unused=COLD_ITEM_KEYS)
    ks, ks_from = _shots_of(shots, run, run_root if run is not None else None)
    if any(k < 1 for k in ks) or len(set(ks)) != len(ks):
        raise ConfigError(f"--shots must be distinct positive support sizes, got {list(ks)}")
    _check_outputs(output, export, model=path, shots=ks)
    scorer = OnDeviceModel(path)
    meta = scorer.metadata
    if run is not None and meta.trained_on is not None:
        _refuse_another_runs_model(path, run_root, meta.trained_on, run)
    recorded = meta.trained_on if run is None else None
    if run is not None:
        try:
            ds = load_run_dataset(run)
        except DatasetNotFoundError as exc:
            if data_dir is not None or not run.data_dir:
                raise
            # leaving --data-dir out, as the loader's advice would have it, reads that folder
            raise DatasetNotFoundError(
                f"{path} {source} on {run.dataset} read from {run.data_dir} (its config.json), "
                f"which no longer holds it; pass --data-dir PATH to a copy of {run.dataset}"
            ) from exc
        check_run_data(
            run_root,
            run,
            ds,
            "the model would be tested on other users and items, some of what it trained on. "
            "Give the data it was trained on (--data-dir a copy of it)",
        )
        split_cfg = run.split_config()
    else:
        if recorded is not None:  # a published model that says what it was pretrained on
            source = "records the data and split it was pretrained with (its metadata)"
            _refuse_another_split(ctx, typed, path, _split_of(recorded), source, "recorded")
            # before the loader, whose advice for a folder ("add --dataset") is refused here
            _refuse_data_dir_for_synthetic(path, source, recorded.dataset, data_dir)
            dataset = recorded.dataset
            split_cfg = replace(
                split_cfg,
                seed=recorded.seed,
                cold_user_fraction=recorded.cold_user_fraction,
                public_fraction=recorded.public_fraction,
            )
            eval_cfg = replace(eval_cfg, seed=recorded.seed)  # as a run's seed is its eval's
        ds = load_dataset(
            dataset,
            data_dir,
            synthetic_seed=split_cfg.seed,
            # the world of the size it was trained on, not the default's
            synthetic_users=recorded.synthetic_users if recorded is not None else None,
            synthetic_items=recorded.synthetic_items if recorded is not None else None,
        )
    if meta.catalog_fingerprint != catalog_fingerprint(ds.item_ids):
        raise ConfigError(
            f"{path} was exported for another catalog ({meta.n_items} items, fingerprint "
            f"{meta.catalog_fingerprint}) than {ds.name} ({ds.n_items} items, "
            f"{catalog_fingerprint(ds.item_ids)}); evaluate it on the dataset it was trained "
            "on (--dataset, --data-dir)"
        )
    _refuse_changed_data(path, meta.trained_on, ds)
    name = f"{path.name} (v{meta.model_version}, {meta.quantization})"
    if run is not None:
        seed_from = "the run's"
    elif recorded is not None:
        seed_from = "recorded in its metadata"
    else:
        seed_from = "given" if "seed" in typed else "the default"
    sources = {"shots": ks_from, "seed": seed_from}
    # the rest of the protocol (k, the negatives) is EvalConfig's defaults, as in a run's
    # final evaluation, unless --run-config gives another
    typer.echo(
        f"evaluation settings: K {' '.join(map(str, ks))} ({ks_from}); HR@{eval_cfg.k} / "
        f"NDCG@{eval_cfg.k} against {eval_cfg.n_negatives} sampled negatives, seed "
        f"{eval_cfg.seed} ({seed_from})",
        err=True,
    )
    report = evaluate_model(scorer, name, ds, split_cfg, eval_cfg, ks, export)
    report["eval"] = {**report["eval"], "shots": list(ks), "source": sources}
    report["model"] = {
        "path": str(path),
        "version": meta.model_version,
        "quantization": meta.quantization,
        "n_items": meta.n_items,
        "max_len": meta.max_len,
        "trained_on": asdict(meta.trained_on) if meta.trained_on is not None else None,
    }
    _emit(report, output, fmt, eval_cfg.k)


def _emit(report: dict[str, Any], output: Path | None, fmt: str, k: int) -> None:
    """Stamp the command line on ``report``, write it to ``output`` and show it."""
    report["command"] = command_line(sys.argv[1:])
    if output is not None:
        write_json_atomic(output, report, mode=REPORT_MODE)
    if fmt == "json":
        typer.echo(json.dumps(report, indent=2))
    else:
        _print_table(report, k)


def _shots_of(
    given: list[int] | None, run: SimulationConfig | None, root: Path | None
) -> tuple[tuple[int, ...], str]:
    """The few-shot K to score at and where they come from: ``given`` (``--shots``), else
    those of the run in ``root`` (settings ``run``) that trained the model, the K of its
    summary's few-shot table (a run made with ``shots=1,3`` was scored at 5 and 10 too),
    else :data:`DEFAULT_SHOTS` (a server's model: its metadata records no K; a run
    older than its ``shots`` setting, which ran at those)."""
    from simulation.run_dir import RunDirectory

    if given:
        return tuple(given), "--shots"
    if run is None or root is None:
        return DEFAULT_SHOTS, "the default"
    section = (RunDirectory.read_config(root) or {}).get("simulation") or {}
    if "shots" not in section:
        return DEFAULT_SHOTS, "the default: the run's config.json records no shots"
    return tuple(run.shots), "the run's shots"


def _split_of(trained: SimulationConfig | DataProvenance) -> dict[str, object]:
    """The dataset and split settings ``trained`` (a run's config, a model's recorded
    provenance) trained with, under their option names."""
    return {
        "dataset": trained.dataset,
        "seed": trained.seed,
        "cold-user-fraction": trained.cold_user_fraction,
        "public-fraction": trained.public_fraction,
    }


def _refuse_another_split(
    ctx: typer.Context,
    values: dict[str, Any],
    path: Path,
    trained: dict[str, object],
    source: str,
    whose: str,
) -> None:
    """A model whose data and split are known (``trained``, :func:`_split_of`: its run's, or
    recorded in its metadata) is evaluated on them: a dataset or split setting given
    (``values``: those typed, :func:`_values`) that differs would test it on its training
    users. ``source`` says how they are known ("was trained by the run in ..."), ``whose``
    names them in the message ("the run's")."""
    given = {**values, **explicit_options(ctx, {"dataset": "dataset"})}
    differing = [
        f"{key} {given[key]!r} ({whose}: {value!r})"
        for key, value in trained.items()
        if key in given
        and (dataset_key(str(given[key])) if key == "dataset" else given[key]) != value
    ]
    if differing:
        raise ConfigError(
            f"{path} {source}, on another split than asked ({'; '.join(differing)}); it "
            "would be tested on users it trained on. Drop those options: the data and split "
            "it was trained with are used"
        )


def _refuse_data_dir_for_synthetic(
    path: Path, source: str, trained: str, data_dir: Path | None
) -> None:
    """A model whose dataset is known (``trained``: its run's, or recorded in its metadata;
    ``source`` says how, as for :func:`_refuse_another_split`) to be the synthetic world
    reads no files: a ``data_dir`` given is refused with "drop it". The loader's own advice,
    "add --dataset for that folder", would be refused next as another dataset than the
    model's."""
    if data_dir is not None and dataset_key(trained) == "synthetic":
        raise ConfigError(
            f"{path} {source} on the synthetic world, which is generated and reads no files; "
            f"drop --data-dir {data_dir}"
        )


def _refuse_changed_data(path: Path, recorded: DataProvenance | None, ds: RecDataset) -> None:
    """A model whose metadata records the content fingerprint of its training data
    (``recorded``) is refused on data ``ds`` with other content: a changed copy of the same
    catalog (ratings added, timestamps edited) passes the catalog check, but its split tests
    other users on other items, some of them what the model trained on. A model recording no
    fingerprint (an older bundle's) is not compared."""
    from simulation.run_dir import refuse_other_data

    if recorded is None or recorded.data_fingerprint is None:
        return
    refuse_other_data(
        f"{path} was",
        recorded.data_fingerprint,
        ds.fingerprint(),
        ds.name,
        "it would be tested on other users and items, some of what it trained on. Give the "
        "data it was trained on (--data-dir a copy of it)",
    )


def _refuse_another_runs_model(
    path: Path, root: Path, recorded: DataProvenance, run: SimulationConfig
) -> None:
    """A model in the ``models/`` folder of the run in ``root`` (settings ``run``) whose
    metadata records other data or another split (``recorded``) than that run's
    config is another run's model, copied there: scored on this run's split it was tested
    on other data, or on users it trained on. A setting the model does not record (an older
    bundle's, without the synthetic world's size; a run's that recorded no data
    fingerprint) is not compared."""
    from simulation.run_dir import RunDirectory, recorded_fingerprint

    expected = asdict(run.data_provenance(recorded_fingerprint(RunDirectory.read_config(root))))
    differing = [
        f"{key.replace('_', '-')} {value!r} (the run's: {expected[key]!r})"
        for key, value in asdict(recorded).items()
        if value is not None and expected[key] is not None and value != expected[key]
    ]
    if differing:
        raise ConfigError(
            f"{path} is in the models/ folder of the run in {root} but records that it was "
            f"pretrained on other data or another split than that run's ("
            f"{'; '.join(differing)}): it is another run's model. Copy it out of that "
            "models/ folder to evaluate it on the data and split it records"
        )


def _values(
    ctx: typer.Context, run_config: list[str] | None, extra: dict[str, str]
) -> dict[str, Any]:
    """``--run-config`` entries, overridden by the split options typed on the command line
    (the defaults of those options are left out: the caller decides what applies).

    Keys are kebab-case whichever way they were typed: a snake-case ``cold_user_fraction``
    kept as such escaped the check of a model's recorded split (:func:`_refuse_another_split`
    looks the option names up), and the recorded value silently replaced the one asked for;
    it also clashed with the typed flag instead of giving way to it."""
    values: dict[str, Any] = {}
    for key, value in parsed_entries(run_config).items():
        if kebab(key) in values:
            raise ConfigError(
                f"{kebab(key)!r} is given twice in --run-config (snake and kebab case name "
                "the same setting); give each key once"
            )
        values[kebab(key)] = value
    values.update(
        explicit_options(
            ctx,
            {
                "seed": "seed",
                "cold_user_fraction": "cold-user-fraction",
                "public_fraction": "public-fraction",
                **extra,
            },
        )
    )
    return values


COLD_ITEM_KEYS = frozenset({"cold-item-fraction", "cold-item-min-interactions"})
"""The split settings of the cold-item run only, which ``evaluate model`` does not run."""


def _split_and_eval(
    values: dict[str, Any], *others: type, unused: frozenset[str] = frozenset()
) -> tuple[SplitConfig, EvalConfig]:
    """The split and evaluation configs of ``values``, whose every key must belong to them
    or to one of ``others``, and not be one of the ``unused`` settings of the command (taken
    and recorded in its report, it would claim an effect it does not have)."""
    valid = _keys(SplitConfig) | _keys(EvalConfig)
    for cls in others:
        valid |= _keys(cls)
    valid -= unused
    unknown = {k.replace("_", "-") for k in values} - valid
    if unknown:
        raise unknown_keys_error(unknown, valid, unused=unused)
    split_cfg = from_flat(SplitConfig, _pick(values, SplitConfig))
    return split_cfg, from_flat(EvalConfig, _pick(values, EvalConfig))


def _check_outputs(
    output: Path | None,
    export: Path | None,
    model: Path | None = None,
    shots: Sequence[int] = (),
) -> None:
    """Both outputs writable and distinct, before any work, and neither the ``model`` file
    being evaluated (which it would replace once scored). ``export`` stands for every file
    it writes: ``recs.csv`` and its few-shot file at each K of ``shots``."""
    exported = [] if export is None else [export, *(fewshot_recs_path(export, k) for k in shots)]
    for flag, paths in (("--output", [] if output is None else [output]), ("--export", exported)):
        if model is not None and any(p.resolve() == model.resolve() for p in paths):
            raise ConfigError(
                f"{flag} names the model being evaluated ({model}): writing it would replace "
                "the model; give another file"
            )
    if output is not None:
        check_output_file(output)
        clash = next((p for p in exported if p.resolve() == output.resolve()), None)
        if clash is not None:
            raise ConfigError(
                f"--export and --output both name {output} (--export writes {clash.name}): "
                "the JSON report would replace the exported recommendations; give them "
                "different files"
            )


def _text_embedder() -> EmbeddingFn:
    from shared.text.encoder import encode_items

    return encode_items


def _keys(cls: type) -> set[str]:
    from shared.config import field_names

    return field_names(cls)


def _pick(values: dict[str, Any], cls: type) -> dict[str, Any]:
    keys = _keys(cls)
    return {k: v for k, v in values.items() if k.replace("_", "-") in keys}


def _print_table(report: dict[str, Any], k: int) -> None:
    table = Table(title=f"{report['dataset']['name']}: HR@{k} / NDCG@{k}")
    for col in ("model", "protocol", "population", f"HR@{k}", f"NDCG@{k}"):
        table.add_column(col, justify="right" if col.startswith(("HR", "NDCG")) else "left")
    for model, section, pop, hr, ndcg in summary_rows(report, k):
        cells = (
            ("n/a: no users", "") if hr is None or ndcg is None else (f"{hr:.4f}", f"{ndcg:.4f}")
        )
        table.add_row(model, section, pop, *cells)
    print_table(table)
