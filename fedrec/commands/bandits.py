"""``fedrec bandits``: exploration and diversity at serving time, evaluated.

``evaluate --world synthetic`` simulates sessions against the synthetic world's ground truth
(cumulative regret, coverage, diversity per policy); ``evaluate --world ml-100k`` replays the
MovieLens log (Li et al. 2011) and measures the HR@10 cost of the diversity term under the
protocol. Both write ``bandits-<world>[-tag].json`` and PNG plots into ``--output-dir``.
``tune`` runs the grid the defaults were chosen from, on seeds kept apart from the reported
ones.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import numpy.typing as npt
import typer

from fedrec.options import NON_EMPTY_PATH, FormatOpt, command_line, parsed_entries, say
from shared.bandits.harness import (
    COVERAGE_TARGET,
    REGRET_TARGET,
    Arm,
    SimulationConfig,
    default_arms,
    run_simulation,
    summarize_runs,
)
from shared.bandits.policies import BanditConfig
from shared.config import field_names, from_flat, unknown_keys_error
from shared.errors import ConfigError, DataError
from shared.eval.splits import MAX_SEED
from shared.io import (
    REPORT_MODE,
    check_file_name,
    check_output_dir,
    write_bytes_atomic,
    write_json_atomic,
)

app = typer.Typer(
    help="Bandit re-ranking (greedy, epsilon-greedy, Thompson, LinUCB) and MMR diversity.",
    no_args_is_help=True,
)

WORLDS = ("synthetic", "ml-100k")
DEFAULT_SEEDS = (42, 43, 44)
TUNING_SEEDS = (100, 101)
MMR_GRID = (1.0, 0.95, 0.9, 0.85, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2)
HR_BUDGET = 0.05
"""The issue's target: the default diversity setting costs at most 5% relative HR@10."""

WorldOpt = Annotated[str, typer.Option("--world", help="synthetic or ml-100k.")]
DataDirOpt = Annotated[
    Path | None,
    typer.Option(
        "--data-dir",
        click_type=NON_EMPTY_PATH,
        help="MovieLens 100K folder (u.data, u.item) for --world ml-100k; default: the "
        "dataset cache, downloaded with its checksum when missing (as `fedrec simulate`).",
    ),
]
OutDirOpt = Annotated[
    Path,
    typer.Option(
        "--output-dir",
        "-o",
        click_type=NON_EMPTY_PATH,
        help="Folder for the JSON report and PNG plots.",
    ),
]
TuneOutDirOpt = Annotated[
    Path,
    typer.Option(
        "--output-dir", "-o", click_type=NON_EMPTY_PATH, help="Folder for the JSON report."
    ),
]
SeedsOpt = Annotated[
    list[int] | None,
    typer.Option(
        "--seed",
        help="Repeatable. synthetic: world + session seed; ml-100k: protocol split seed. "
        "Default 42 43 44 (evaluate) or 100 101 (tune).",
    ),
]
UsersOpt = Annotated[
    int | None,
    typer.Option(
        "--users", help="synthetic: simulated users (default 200); ml-100k: replayed users cap."
    ),
]
StepsOpt = Annotated[int, typer.Option("--steps", help="synthetic: steps per session (T).")]
FeaturesOpt = Annotated[
    str, typer.Option("--features", help="Item features: mf (from interactions) or text (LM).")
]
RunConfigOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--run-config",
        help="BanditConfig overrides, e.g. 'alpha=0.5 mmr-lambda=0.8 top-n=50 slate-size=10'; "
        "may be repeated.",
    ),
]
TagOpt = Annotated[str, typer.Option("--tag", help="Suffix of the output file names.")]
PlotsOpt = Annotated[bool, typer.Option("--plots/--no-plots", help="Write the PNG plots.")]


@app.command("evaluate")
def evaluate(
    world: WorldOpt = "synthetic",
    data_dir: DataDirOpt = None,
    output_dir: OutDirOpt = Path("bench/results"),
    seeds: SeedsOpt = None,
    users: UsersOpt = None,
    steps: StepsOpt = 200,
    features: FeaturesOpt = "mf",
    base_model: Annotated[
        str, typer.Option("--base-model", help="synthetic: ease, itemknn or text.")
    ] = "ease",
    run_config: RunConfigOpt = None,
    tag: TagOpt = "",
    plots: PlotsOpt = True,
    fmt: FormatOpt = "table",
    export: Annotated[
        Path | None,
        typer.Option(
            "--export",
            click_type=NON_EMPTY_PATH,
            help="ml-100k: folder for recs.csv-format files (user,item,rank; top 100 of every "
            "federated test user) of the greedy ranking and of the MMR re-ranking, per seed.",
        ),
    ] = None,
) -> None:
    """Compare the policies (greedy baseline, epsilon-greedy, Thompson, LinUCB, +MMR)."""
    if tag:
        check_file_name(tag, "--tag")
    folder = _check_common(world, output_dir, users, data_dir)
    if export is not None and world != "ml-100k":
        raise ConfigError(
            "--export writes the protocol's rankings, which only --world ml-100k evaluates "
            "(the synthetic world reports regret and coverage); drop --export"
        )
    if export is not None:  # before the replay, not after it; created when written
        check_output_dir(export)
    base = _bandit_config(run_config)
    arms = default_arms(base)
    chosen = _distinct_seeds(seeds, DEFAULT_SEEDS)
    stem = f"bandits-{world}" + (f"-{tag}" if tag else "")
    start = time.perf_counter()
    if world == "synthetic":
        report = _evaluate_synthetic(
            arms, chosen, 200 if users is None else users, steps, features, base_model
        )
    else:
        assert folder is not None
        report = _evaluate_ml100k(arms, chosen, folder, users, features, base.mmr_lambda, export)
    report["bandit_config"] = base.as_dict()
    report["seconds"] = round(time.perf_counter() - start, 1)
    report["command"] = _command_line("evaluate")
    if not plots:
        _remove_stale_plots(world, output_dir, stem)
    write_json_atomic(output_dir / f"{stem}.json", report, mode=REPORT_MODE)
    if plots:
        report["plots"] = _write_plots(world, report, output_dir, stem)
        write_json_atomic(output_dir / f"{stem}.json", report, mode=REPORT_MODE)
    if fmt == "json":
        typer.echo(json.dumps(report, indent=2))
    else:
        _print_summary(world, report)


@app.command("tune")
def tune(
    world: WorldOpt = "synthetic",
    data_dir: DataDirOpt = None,
    output_dir: TuneOutDirOpt = Path("bench/results"),
    seeds: SeedsOpt = None,
    users: Annotated[int, typer.Option("--users", help="synthetic: simulated users.")] = 50,
    steps: StepsOpt = 200,
    run_config: RunConfigOpt = None,
    fmt: FormatOpt = "table",
) -> None:
    """The grid the defaults come from, on tuning seeds (default 100 101) only.

    synthetic: exploration parameters per policy, for both feature sources, and the MMR
    lambda under LinUCB. ml-100k: the MMR lambda on the protocol's *validation* items.
    --run-config sets what the grid starts from (top-n, slate size...); the settings the
    grid varies are its own.
    """
    folder = _check_common(world, output_dir, users, data_dir)
    chosen = _distinct_seeds(seeds, TUNING_SEEDS)
    # the settings the grid varies from (top-n, slate size, features...), recorded: a
    # tuning run means nothing without the candidates it re-ranked
    base = _bandit_config(run_config)
    start = time.perf_counter()
    if world == "synthetic":
        report = _tune_synthetic(chosen, users, steps, base)
    else:
        assert folder is not None
        report = _tune_ml100k(chosen, folder, base)
    report["bandit_config"] = base.as_dict()
    report["seconds"] = round(time.perf_counter() - start, 1)
    report["command"] = _command_line("tune")
    write_json_atomic(output_dir / f"bandits-{world}-tuning.json", report, mode=REPORT_MODE)
    if fmt == "json":
        typer.echo(json.dumps(report, indent=2))
    else:
        typer.echo(json.dumps(report["selected"], indent=2))


# ---------------------------------------------------------------------------- synthetic
def _evaluate_synthetic(
    arms: Sequence[Arm],
    seeds: Sequence[int],
    users: int,
    steps: int,
    features: str,
    base_model: str,
) -> dict[str, Any]:
    embed = _embedder()
    runs = []
    for n, seed in enumerate(seeds, start=1):
        cfg = SimulationConfig(
            world_seed=seed,
            seed=seed,
            n_users=users,
            steps=steps,
            features=features,
            base_model=base_model,
        )
        say(f"synthetic seed {seed} ({n} of {len(seeds)})")
        runs.append(run_simulation(cfg, arms, embed=embed))
    summary = summarize_runs(runs)
    return {
        "world": "synthetic",
        "seeds": list(seeds),
        "definitions": {
            "regret": "sum over steps of (expected clicks of the best slate_size candidates "
            "by true preference) - (expected clicks of the shown slate); mean over users",
            "coverage": "distinct items shown to any simulated user / catalog",
            "user_coverage": "distinct items shown to one user / catalog, mean over users",
            "candidate_coverage": "union of all users' top-N candidates / catalog: the most "
            "coverage any re-ranker can reach",
            "intra_list_diversity": "1 - mean pairwise cosine of the LM text embeddings",
            "novelty": "mean -log2(share of training users who interacted with the item)",
        },
        "targets": _synthetic_targets(summary, runs),
        "summary": summary,
        "runs": [_strip_curves(r) for r in runs],
    }


def _synthetic_targets(summary: dict[str, Any], runs: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Which arm is best (lowest mean regret ratio), whether it meets the targets, and which
    arms meet both targets (regret <= 0.8x and catalog coverage >= 3x greedy's) on every seed.

    Also the most catalog coverage any re-ranker could reach relative to greedy: the union of
    the users' top-N candidates over greedy's coverage, per seed.
    """
    learning = {n: e for n, e in summary.items() if "regret_ratio_vs_greedy" in e}
    learning.pop("greedy", None)
    if not learning:
        return {}
    best = min(learning, key=lambda n: learning[n]["regret_ratio_vs_greedy"])
    e = learning[best]
    return {
        "regret_target": REGRET_TARGET,
        "coverage_target": COVERAGE_TARGET,
        "best_policy": best,
        "regret_ratio_vs_greedy_per_seed": e["regret_ratio_vs_greedy_per_seed"],
        "coverage_ratio_vs_greedy_per_seed": e["coverage_ratio_vs_greedy_per_seed"],
        "user_coverage_ratio_vs_greedy_per_seed": e["user_coverage_ratio_vs_greedy_per_seed"],
        "meets_regret_and_catalog_coverage": e["meets_targets_coverage_every_seed"],
        "meets_regret_and_user_coverage": e["meets_targets_user_coverage_every_seed"],
        "policies_meeting_regret_and_catalog_coverage": sorted(
            n for n, entry in learning.items() if entry["meets_targets_coverage_every_seed"]
        ),
        "catalog_coverage_upper_bound_ratio_per_seed": [
            r["candidate_coverage"] / r["arms"]["greedy"]["coverage"]
            for r in runs
            if "greedy" in r["arms"] and r["arms"]["greedy"]["coverage"] > 0
        ],
    }


def _strip_curves(run: dict[str, Any]) -> dict[str, Any]:
    """A run without its per-step curves (the summary keeps the mean curve)."""
    out = dict(run)
    out["arms"] = {
        name: {k: v for k, v in arm.items() if k != "cumulative_regret"}
        for name, arm in run["arms"].items()
    }
    return out


def _tune_synthetic(
    seeds: Sequence[int], users: int, steps: int, base: BanditConfig
) -> dict[str, Any]:
    embed = _embedder()
    grid: list[Arm] = [Arm("greedy", _with(base, policy="greedy", mmr_lambda=1.0))]
    for alpha in (0.25, 0.5, 0.75, 1.0):
        grid.append(
            Arm(f"linucb:alpha={alpha}", _with(base, policy="linucb", alpha=alpha, mmr_lambda=1.0))
        )
    for scale in (0.05, 0.1, 0.25):
        grid.append(
            Arm(
                f"thompson:thompson_scale={scale}",
                _with(base, policy="thompson", thompson_scale=scale, mmr_lambda=1.0),
            )
        )
    for eps in (0.02, 0.05, 0.1):
        grid.append(
            Arm(
                f"epsilon_greedy:epsilon={eps}",
                _with(base, policy="epsilon_greedy", epsilon=eps, mmr_lambda=1.0),
            )
        )
    results: dict[str, Any] = {}
    for features in ("mf", "text"):
        say(f"synthetic grid, {features} features, seeds {', '.join(map(str, seeds))}")
        arms = list(grid)
        if features == "mf":
            for lam in (0.9, 0.8, 0.7, 0.5):
                arms.append(
                    Arm(f"linucb:mmr_lambda={lam}", _with(base, policy="linucb", mmr_lambda=lam))
                )
        runs = [
            run_simulation(
                SimulationConfig(
                    world_seed=s, seed=s, n_users=users, steps=steps, features=features
                ),
                arms,
                embed=embed,
            )
            for s in seeds
        ]
        summary = summarize_runs(runs)
        for entry in summary.values():
            entry.pop("cumulative_regret", None)
        results[features] = summary
    return {
        "world": "synthetic",
        "seeds": list(seeds),
        "users": users,
        "steps": steps,
        "rule": "per policy, the lowest mean regret ratio vs greedy among settings whose mean "
        "per-user coverage ratio is >= 3 (else the lowest regret ratio); features: the source "
        "whose best LinUCB has the lower regret ratio",
        "selected": _select_synthetic(results),
        "results": results,
    }


def _select_synthetic(results: dict[str, Any]) -> dict[str, Any]:
    selected: dict[str, Any] = {}
    best_source = min(
        results,
        key=lambda f: min(
            e["regret_ratio_vs_greedy"]
            for n, e in results[f].items()
            if n.startswith("linucb:alpha")
        ),
    )
    selected["features"] = best_source
    table = results[best_source]
    for policy in ("linucb", "thompson", "epsilon_greedy"):
        options = {
            n: e for n, e in table.items() if n.split(":")[0] == policy and "mmr_lambda" not in n
        }
        wide = {n: e for n, e in options.items() if e["user_coverage_ratio_vs_greedy"] >= 3.0}
        pool = wide or options
        best = min(pool, key=lambda n: pool[n]["regret_ratio_vs_greedy"])
        selected[policy] = {
            "setting": best.split(":", 1)[1],
            "regret_ratio_vs_greedy": pool[best]["regret_ratio_vs_greedy"],
            "user_coverage_ratio_vs_greedy": pool[best]["user_coverage_ratio_vs_greedy"],
        }
    return selected


# ---------------------------------------------------------------------------- ml-100k
def _evaluate_ml100k(
    arms: Sequence[Arm],
    seeds: Sequence[int],
    data_dir: Path,
    users: int | None,
    features: str,
    lam: float,
    export: Path | None = None,
) -> dict[str, Any]:
    from shared.bandits.replay import ReplayConfig, load_ml100k_ratings, run_replay
    from shared.data.registry import load_dataset

    dataset = load_dataset("ml-100k", data_dir)
    ratings = load_ml100k_ratings(data_dir, dataset)
    embed = _embedder()
    grid = sorted({*MMR_GRID, lam}, reverse=True)
    runs = []
    for n, seed in enumerate(seeds, start=1):
        cfg = ReplayConfig(seed=seed, max_users=users, features=features)
        say(f"ml-100k replay, seed {seed} ({n} of {len(seeds)})")
        runs.append(
            run_replay(
                dataset,
                ratings,
                arms,
                cfg,
                embed,
                mmr_grid=grid,
                recs_dir=export,
                recs_lambdas=sorted({1.0, lam}, reverse=True),
            )
        )
    return {
        "world": "ml-100k",
        "seeds": list(seeds),
        "definitions": {
            "replay_click_rate": "Li et al. 2011 replay: clicks (rating >= 4) / events whose "
            "logged item was in the policy's slate; biased (MovieLens was not logged at random)",
            "match_rate": "events whose logged item was in the slate / events",
            "coverage": "distinct items shown in any slate during the replay / catalog",
            "intra_list_diversity": "1 - mean pairwise cosine of the LM text embeddings",
            "novelty": "mean -log2(share of training users who interacted with the item)",
            "hr_cost": "relative change of full-ranking HR@10 (protocol, federated users, test "
            "items) of the MMR re-ranked EASE top-N vs EASE",
        },
        "targets": _ml100k_targets(runs, lam),
        "replay_summary": _replay_summary(runs),
        "runs": runs,
    }


def _ml100k_targets(runs: Sequence[dict[str, Any]], lam: float) -> dict[str, Any]:
    key = f"{lam:g}"
    per_seed = {
        stage: {
            metric: [r["diversity_accuracy"][key][stage][f"{metric}_relative_change"] for r in runs]
            for metric in ("full_hr@10", "sampled_hr@10")
        }
        for stage in ("valid", "test")
    }
    test_full = per_seed["test"]["full_hr@10"]
    return {
        "hr_budget": HR_BUDGET,
        "default_mmr_lambda": lam,
        "relative_hr_change_per_seed": per_seed,
        "mean_test_full_hr_relative_change": float(np.mean(test_full)),
        "meets_budget_on_mean": bool(np.mean(test_full) >= -HR_BUDGET),
        "meets_budget_every_seed": bool(all(v >= -HR_BUDGET for v in test_full)),
    }


def _replay_summary(runs: Sequence[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name in runs[0]["replay"]:
        entry: dict[str, Any] = {}
        for key in (
            "replay_click_rate",
            "match_rate",
            "clicks_per_event",
            "coverage",
            "intra_list_diversity",
            "novelty",
        ):
            values = [r["replay"][name][key] for r in runs]
            if any(v is None for v in values):
                continue
            entry[key] = float(np.mean(values))
            entry[f"{key}_per_seed"] = [float(v) for v in values]
        out[name] = entry
    return out


def _tune_ml100k(seeds: Sequence[int], data_dir: Path, base: BanditConfig) -> dict[str, Any]:
    from shared.bandits.diversity import item_popularity
    from shared.bandits.replay import diversity_accuracy
    from shared.data.registry import load_dataset
    from shared.eval.splits import SplitConfig, split_users
    from shared.models.baselines import EASE

    dataset = load_dataset("ml-100k", data_dir)
    text = _embedder()(dataset.item_text)
    per_seed = {}
    for n, seed in enumerate(seeds, start=1):
        say(f"ml-100k MMR grid, seed {seed} ({n} of {len(seeds)})")
        split = split_users(dataset, SplitConfig(seed=seed))
        train = split.train_sequences()
        model = EASE().fit(train, dataset.n_items)
        per_seed[str(seed)] = diversity_accuracy(
            model,
            split,
            text,
            popularity=item_popularity(train, dataset.n_items),
            top_n=base.top_n,
            grid=MMR_GRID,
        )
    mean_cost = {
        f"{lam:g}": float(
            np.mean(
                [per_seed[str(s)][f"{lam:g}"]["valid"]["full_hr@10_relative_change"] for s in seeds]
            )
        )
        for lam in MMR_GRID
    }
    ok = [lam for lam in MMR_GRID if mean_cost[f"{lam:g}"] >= -HR_BUDGET / 2]
    return {
        "world": "ml-100k",
        "seeds": list(seeds),
        "rule": "the smallest MMR lambda (most diversity) whose mean relative change of "
        "validation full HR@10 is >= -2.5% (half the 5% budget, as a margin for noise)",
        "mean_valid_full_hr_relative_change": mean_cost,
        "selected": {"mmr_lambda": min(ok) if ok else 1.0},
        "results": per_seed,
    }


# ---------------------------------------------------------------------------- plots
PLOTS = {"synthetic": ("regret", "coverage"), "ml-100k": ("coverage", "diversity")}
"""The PNGs ``evaluate`` writes per world, as ``<stem>-<name>.png``."""


def _remove_stale_plots(world: str, out: Path, stem: str) -> None:
    """With ``--no-plots``, the plots an earlier run wrote under the same name would sit next
    to a report they no longer belong to: remove them."""
    for name in PLOTS[world]:
        stale = out / f"{stem}-{name}.png"
        if stale.exists():
            stale.unlink()
            typer.echo(f"removed {stale} (from an earlier run; --no-plots)", err=True)


def _write_plots(world: str, report: dict[str, Any], out: Path, stem: str) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths: list[str] = []
    if world == "synthetic":
        summary = report["summary"]
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for name, entry in summary.items():
            curve = entry["cumulative_regret"]
            ax.plot(np.arange(1, len(curve) + 1), curve, label=name)
        ax.set_xlabel("step")
        ax.set_ylabel("cumulative regret (expected clicks)")
        ax.set_title(f"Synthetic world: mean cumulative regret per user, seeds {report['seeds']}")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
        paths.append(_save(fig, out / f"{stem}-regret.png"))
        plt.close(fig)
        points = {
            n: (e["user_coverage"], e["coverage"], e["expected_clicks_per_step"])
            for n, e in summary.items()
        }
        fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
        for ax, idx, label in (
            (axes[0], 1, "catalog coverage (all users)"),
            (axes[1], 0, "per-user coverage"),
        ):
            for i, (name, p) in enumerate(points.items()):
                ax.scatter(p[idx], p[2], label=name, color=f"C{i}", s=40)
            ax.set_xlabel(label)
            ax.set_ylabel("expected clicks per step")
            ax.grid(alpha=0.3)
        axes[0].legend(fontsize=8)
        fig.suptitle("Coverage vs reward (mean over seeds)")
        paths.append(_save(fig, out / f"{stem}-coverage.png"))
        plt.close(fig)
    else:
        summary = report["replay_summary"]
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for i, (name, e) in enumerate(summary.items()):
            if "replay_click_rate" in e:
                ax.scatter(e["coverage"], e["replay_click_rate"], label=name, color=f"C{i}", s=40)
        ax.legend(fontsize=8)
        ax.set_xlabel("catalog coverage during replay")
        ax.set_ylabel("replay click rate (rating >= 4 | matched)")
        ax.set_title("ml-100k replay: coverage vs reward")
        ax.grid(alpha=0.3)
        paths.append(_save(fig, out / f"{stem}-coverage.png"))
        plt.close(fig)
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for run in report["runs"]:
            acc = run["diversity_accuracy"]
            lams = sorted(acc, key=float, reverse=True)
            ax.plot(
                [acc[lam]["top10_intra_list_diversity"] for lam in lams],
                [acc[lam]["test"]["full_hr@10"] for lam in lams],
                marker="o",
                label=f"seed {run['replay_config']['seed']}",
            )
            shown = {"1", "0.8", "0.6", "0.4", "0.2", f"{report['bandit_config']['mmr_lambda']:g}"}
            for lam in (x for x in lams if x in shown):
                ax.annotate(
                    f"λ={lam}",
                    (acc[lam]["top10_intra_list_diversity"], acc[lam]["test"]["full_hr@10"]),
                    fontsize=7,
                )
        ax.set_xlabel("intra-list diversity of the top-10")
        ax.set_ylabel("full-ranking HR@10 (federated users, test)")
        ax.set_title("ml-100k: MMR diversity vs accuracy")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
        paths.append(_save(fig, out / f"{stem}-diversity.png"))
        plt.close(fig)
    return paths


def _save(fig: Any, path: Path) -> str:
    """Save a plot atomically (:func:`~shared.io.write_bytes_atomic`): rendered in memory,
    so a full disk is the one-line error naming the file (``savefig`` to a file raised an
    OSError naming none, a traceback) and leaves no temporary file or torn picture."""
    import io

    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    write_bytes_atomic(path, buf.getvalue(), mode=REPORT_MODE)
    return str(path)


# ---------------------------------------------------------------------------- helpers
def _check_common(
    world: str, output_dir: Path, users: int | None, data_dir: Path | None
) -> Path | None:
    """What can be refused before the run: the world, its data, the user count
    and an output folder that cannot be written (which would fail only after the run).
    Returns the MovieLens 100K folder for ``--world ml-100k``: ``data_dir`` (or its
    ``ml-100k/``), or the dataset cache (downloaded when missing)."""
    if world not in WORLDS:
        raise ConfigError(f"--world must be one of {', '.join(WORLDS)}, got {world!r}")
    from shared.data.registry import dataset_dir

    folder = None
    if world == "ml-100k" and data_dir is not None:
        try:  # the folder itself or its ml-100k/, as every command reads --data-dir
            folder = dataset_dir("ml-100k", data_dir, download=False)
        except DataError:
            raise ConfigError(
                f"--world ml-100k reads MovieLens 100K from --data-dir, and {data_dir} holds "
                "no u.data and u.item (nor does its ml-100k/); point --data-dir at your copy "
                "(the folder with u.data and u.item), or leave it out to use the dataset cache"
            ) from None
    if users is not None and users < 1:
        raise ConfigError(f"--users must be >= 1, got {users}")
    check_output_dir(output_dir)
    if world == "ml-100k" and folder is None:
        folder = dataset_dir("ml-100k")  # the cache, or a checked download (clear offline)
    return folder


def _distinct_seeds(seeds: Sequence[int] | None, default: Sequence[int]) -> list[int]:
    """The seeds given (else ``default``); a repeated one is refused: each seed is one run,
    and the means would count it twice. So is one the splits cannot take, before the run:
    ``tune --world ml-100k`` refused it only after encoding every item's text (minutes)."""
    chosen = list(seeds) if seeds else list(default)
    for seed in chosen:
        if not 0 <= seed <= MAX_SEED:
            raise ConfigError(f"--seed must be an integer >= 0 and at most 2**63 - 1, got {seed}")
    if len(set(chosen)) != len(chosen):
        raise ConfigError(f"--seed values must be distinct (each is one run), got {chosen}")
    return chosen


def _bandit_config(run_config: list[str] | None) -> BanditConfig:
    values = parsed_entries(run_config)
    if "seed" in values:
        raise ConfigError(
            "--run-config seed does not apply here: the evaluation draws each run from its "
            "world seed; give the seeds with --seed (repeatable)"
        )
    if "policy" in values:
        raise ConfigError(
            "--run-config policy does not apply here: the evaluation compares every policy "
            "(greedy, epsilon_greedy, thompson, linucb, with and without diversity); a device "
            "picks its own with --config bandit-policy=... (fedrec client start or serve-api)"
        )
    valid = field_names(BanditConfig) - {"seed", "policy"}  # both refused above
    unknown = set(k.replace("_", "-") for k in values) - valid
    if unknown:
        raise unknown_keys_error(unknown, valid)
    return from_flat(BanditConfig, values)


def _command_line(command: str) -> str:
    """The command as a user types it (``fedrec bandits <command> ...``), for the report."""
    args = sys.argv[1:]
    tail = args[args.index(command) :] if command in args else [command]
    return command_line(["bandits", *tail])


def _with(cfg: BanditConfig, **changes: Any) -> BanditConfig:
    values = cfg.as_dict()
    values.update(changes)
    return BanditConfig(**values)


def _embedder() -> Any:
    from shared.text.encoder import EncoderConfig, encode_items

    def embed(texts: Sequence[str]) -> npt.NDArray[np.float32]:
        return encode_items(texts, EncoderConfig(show_progress=False))

    return embed


def _print_summary(world: str, report: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    if world == "synthetic":
        table = Table(title=f"synthetic world, seeds {report['seeds']} (mean)")
        cols = ("arm", "regret", "x greedy", "coverage", "x greedy", "user cov x", "ILD", "novelty")
        for col in cols:
            table.add_column(col, justify="left" if col == "arm" else "right")
        for name, e in report["summary"].items():
            table.add_row(
                name,
                f"{e['final_regret']:.1f}",
                f"{e.get('regret_ratio_vs_greedy', float('nan')):.3f}",
                f"{e['coverage']:.3f}",
                f"{e.get('coverage_ratio_vs_greedy', float('nan')):.2f}",
                f"{e.get('user_coverage_ratio_vs_greedy', float('nan')):.2f}",
                f"{e['intra_list_diversity']:.3f}",
                f"{e['novelty']:.2f}",
            )
    else:
        table = Table(title=f"ml-100k replay, seeds {report['seeds']} (mean)")
        for col in ("arm", "replay CTR", "match rate", "coverage", "ILD", "novelty"):
            table.add_column(col, justify="left" if col == "arm" else "right")
        for name, e in report["replay_summary"].items():
            table.add_row(
                name,
                f"{e.get('replay_click_rate', float('nan')):.3f}",
                f"{e['match_rate']:.3f}",
                f"{e['coverage']:.3f}",
                f"{e['intra_list_diversity']:.3f}",
                f"{e['novelty']:.2f}",
            )
    Console(width=max(100, Console().width)).print(table)
    typer.echo(json.dumps(report["targets"], indent=2))
