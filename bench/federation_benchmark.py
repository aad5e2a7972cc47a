"""Federated fine-tuning benchmark: the whole pipeline once per privacy / learning mode,
side by side, as one JSON document (issue 4's table).

Every variant is one ``fedrec simulate`` run (:func:`simulation.pipeline.run_pipeline`) on the
same data, split and cached pretrained student, so rows differ only in the federation:

* ``no-dp``: FedAvg, no DP, no SecAgg+;
* ``record-dp``: SecAgg+ and record-level DP-SGD on every client (Opacus; per-client budget);
* ``user-dp``: user-level DP (clipped weight-1 updates, server noise), delta = 1 / clients,
  at a cohort of 300 (the noise on the average scales with 1 / cohort);
* ``meta``: as ``record-dp`` with the Reptile meta-learning mode (few-shot comparison);
* ``no-dp-fedadam``: one full-batch gradient per client and FedAdam on the server, 100 rounds
  (the recipe that learns: ``docs/parameters.md``);
* ``record-dp-split``: the same with SecAgg+ and record-level DP whose noise is split over the
  cohort (``noise-shares`` 50, z 3, per-example clip C 30); its DP cost is measured against
  ``no-dp-fedadam``.

Rows (federated users, the protocol's test item): the baselines, the student before
federation, after each variant (global model, and with each device's personal adapter), the
int8 artifact; few-shot K = 1, 3, 5, 10 for the cold users against EASE fold-in and Pop;
privacy spent; seconds, rounds and client updates per second. Each check comes with the paired
difference behind it (95% bootstrap interval over users, from the runs' ``ranks.npz``): a
variant's global model against the no-DP one on the same federated users, and the adapted
few-shot student against EASE fold-in on the same cold users at each K.

``--seeds`` repeats the whole comparison on several protocol splits (each its own cold,
public and federated users, pretraining and federation) and adds a ``pooled`` section: every
split's users side by side, so the paired intervals of the checks shrink with the number of
users (a split has only 94 cold users on ml-100k, whose few-shot intervals span about
+-0.08). A user in several splits is one user (on a real dataset; the synthetic dataset's
seeds generate worlds of their own, whose users are kept apart): the intervals resample
users with all of their cases (with leave-one-out by time a user's test item is the same
in every split, so resampling cases as independent made the intervals against a fixed model
1.2- to 1.7-fold too narrow on ml-100k's four splits). ``--reuse-runs`` recomputes the
document from the finished runs in ``--run-dir``.

The checks read the ranks, unrounded: the accuracy targets are the shipped int8 student's;
"dp cost <= 10%" needs the upper end of the cost's 95% interval within 10% (the point
estimate is reported beside it); few-shot must beat EASE fold-in on sampled and full HR@10.

Example (MovieLens 100K, the committed result)::

    python bench/federation_benchmark.py --dataset ml-100k \\
        --data-dir ../shared/datasets/ml-100k --out bench/results/federation-ml-100k.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

from shared.config import from_flat, parse_run_config, to_flat
from shared.eval.compare import compare_ranks, relative_cost
from shared.eval.protocol import CaseRanks, summarize_ranks
from simulation.config import RESUMABLE_KEYS, SimulationConfig
from simulation.pipeline import run_pipeline, run_ranks, stored_config
from simulation.provenance import provenance, require_counts, require_seeds, run_bench

#: The non-private references run without the plain path's default median-norm clipping
#: (a defence against a hostile device, which would bound honest but uneven updates too and
#: make DP's cost look smaller); every other variant runs under SecAgg+, where it never applies.
UNCLIPPED = {"update_clip_median_multiple": 0.0}

VARIANTS: dict[str, dict[str, Any]] = {
    "no-dp": {"dp": False, "secagg": False, **UNCLIPPED},
    "record-dp": {"dp": True, "secagg": True},
    # User-level DP noise on the mean is z * C / cohort, so a larger cohort at about the same
    # epsilon wins (cohort 100 / z 0.8, epsilon 6.71: 0.579 / 0.105 int8 HR@10 on ml-100k), and
    # C should sit near the clients' update norms, not above them: with C = 1 the noise was
    # about ten times what the median update (norm 0.096) needed, and cohort 300 / z 1.4 gave
    # 0.627 / 0.131. The emulator (bench/federation_emulator.py --user-dp) reports that median
    # and, at C = 0.1, matched its own no-DP run exactly (0.675 / 0.171 after 20 rounds); here
    # C = 0.1 gave 0.673 / 0.166 against no DP's 0.670 / 0.166 with Poisson cohorts, a
    # −0.4% / 0.0% cost (federation-ml-100k-user-dp-cohort300.json, the f66ae78 rerun).
    "user-dp": {
        "dp": False,
        "secagg": True,
        "user_dp": True,
        "cohort_size": 300,
        "user_dp_noise_multiplier": 1.4,
        "user_dp_clip": 0.1,
    },
    "meta": {"dp": True, "secagg": True, "meta_learning": True},
    # One gradient per client per round (a batch of up to 256 examples, lr 1), FedAdam on the
    # server; emulated first (bench/results/federation-emulator-ml-100k-*fedadam.json).
    "no-dp-fedadam": {
        "dp": False,
        "secagg": False,
        **UNCLIPPED,
        "rounds": 100,
        "batch_size": 256,
        "lr": 1.0,
        "max_grad_norm": 1000.0,
        "server_optimizer": "adam",
        "server_lr": 0.001,
    },
    "record-dp-split": {
        "dp": True,
        "secagg": True,
        "rounds": 100,
        "batch_size": 256,
        "lr": 1.0,
        "max_grad_norm": 30.0,
        "noise_multiplier": 3.0,
        "noise_shares": 50,
        "server_optimizer": "adam",
        "server_lr": 0.001,
    },
}
#: The no-DP run a variant's DP cost is measured against (same optimiser and rounds).
BASELINES = {"record-dp-split": "no-dp-fedadam"}
NO_DP = ("no-dp", "no-dp-fedadam")


def _baseline(name: str) -> str:
    """The no-DP variant ``name``'s DP cost is measured against."""
    return BASELINES.get(name, "no-dp")


TARGETS = {
    "sampled_hr@10": 0.70,
    "full_hr@10": 0.20,
    "dp_relative_cost": 0.10,
    "epsilon": 8.0,
    "updates_per_second": 10.0,
}


def _row(
    results: dict[str, Any], name: str, population: str = "federated"
) -> dict[str, float] | None:
    entry = results.get(name, {}).get(population)
    return None if entry is None else {k: round(float(v), 4) for k, v in entry.items()}


_STUDENT_ROWS = {
    "federated": "student (federated)",
    "federated + personal": "student (federated + personal)",
    "int8 onnx": "student int8 onnx",
}
"""Each variant's rows: the label in the results and the model in the simulation's summary."""

_SHARED_MODELS = ("pop", "ease (public)", "ease (all)", "teacher", "student (pretrained)")
"""The rows every variant of a split shares (they do not depend on the federation)."""


def _variant_summary(name: str, summary: dict[str, Any]) -> dict[str, Any]:
    final = summary["final"]
    rounds = summary.get("rounds", [])
    last = rounds[-1] if rounds else {}
    seconds = [r["round_seconds"] for r in rounds if r.get("round", 0) > 1]
    return {
        **{label: _row(final, model) for label, model in _STUDENT_ROWS.items()},
        # the protocol's second population: the same models on the public users' test item
        "public users": {
            label: _row(final, model, "public") for label, model in _STUDENT_ROWS.items()
        },
        "fewshot": {k: v for k, v in summary.get("fewshot", {}).items() if k.startswith("student")},
        "epsilon_record_max": last.get("epsilon_record"),
        "epsilon_user": last.get("epsilon_user"),
        "rounds": len(rounds),
        "seconds_per_round_median": statistics.median(seconds) if seconds else None,
        "federation_seconds": summary["meta"]["federation seconds"],
        "client_updates_per_second": summary["meta"]["client updates per second"],
        "valid_sampled_hr@10_per_round": [r.get("valid_sampled_hr@10") for r in rounds],
    }


def _shots(ranks: dict[str, CaseRanks], *, with_cases: bool = False) -> list[str]:
    """The few-shot case groups of a run's ranks (``'fewshot k=1'``, ...), by K; with
    ``with_cases``, only those with cases to compare (the simulation keeps a K that no cold
    user's history reaches as a group without cases, whose comparison is undefined)."""
    return sorted(
        {
            key.split("/")[0]
            for key, r in ranks.items()
            if key.startswith("fewshot ") and (len(r.sampled) > 0 or not with_cases)
        },
        key=lambda shot: int(shot.rsplit("=", 1)[1]),
    )


def _paired(ranks: dict[str, dict[str, CaseRanks]], name: str) -> dict[str, Any]:
    """User-by-user comparisons behind the checks: this variant's global model against the
    no-DP one on the same federated users (the DP cost, absolute and relative), and its
    adapted few-shot student against EASE fold-in on the same cold users at every K."""
    own = ranks[name]
    out: dict[str, Any] = {}
    key = _GLOBAL
    reference = _baseline(name)
    if name not in NO_DP and reference in ranks:
        base = ranks[reference][key]
        diffs = compare_ranks(own[key], base)
        label = f"global - {reference} global"
        out[label] = {}
        for metric, d in diffs.items():
            which = "sampled" if metric.startswith("sampled") else "full"
            # the cost's interval from the same paired draws (the ratio in every draw)
            users = own[key].users if base.users is not None else None
            cost = relative_cost(getattr(own[key], which), getattr(base, which), users=users)
            out[label][metric] = {
                **d.as_dict(),
                "relative_cost": None if cost is None else [cost[1], cost[2]],
            }
    shots = _shots(own, with_cases=True)
    if shots:
        out["fewshot"] = {
            shot.removeprefix("fewshot "): {
                metric: d.as_dict()
                for metric, d in compare_ranks(
                    own[f"{shot}/student (adapted)"], own[f"{shot}/ease fold-in"]
                ).items()
            }
            for shot in shots
        }
    return out


_INT8 = "federated/student int8 onnx"
_GLOBAL = "federated/student (federated)"
_HR = ("sampled_hr@10", "full_hr@10")


def _checks(
    variants: dict[str, Any], variant_ranks: dict[str, dict[str, CaseRanks]]
) -> dict[str, Any]:
    """Every variant's targets, DP cost and few-shot checks, each with its paired intervals.

    Figures come from the ranks, unrounded (the rows are rounded for display): the accuracy
    targets are the shipped int8 student's; the DP cost compares the global models and
    passes only when the upper end of its 95% interval is within 10% (the point estimate is
    reported beside it); few-shot must beat EASE fold-in on sampled and full HR@10.
    """
    checks: dict[str, Any] = {}
    for name, v in variants.items():
        own = variant_ranks.get(name, {})
        check: dict[str, Any] = {}
        if _INT8 in own:
            shipped = summarize_ranks(own[_INT8])
            check["int8 sampled_hr@10 >= 0.70"] = shipped["sampled_hr@10"] >= TARGETS[_HR[0]]
            check["int8 full_hr@10 >= 0.20"] = shipped["full_hr@10"] >= TARGETS[_HR[1]]
        eps = v["epsilon_user"] if name == "user-dp" else v["epsilon_record_max"]
        paired = _paired(variant_ranks, name)
        if name not in NO_DP:
            check["epsilon <= 8"] = eps is not None and eps <= TARGETS["epsilon"]
            base = variant_ranks.get(_baseline(name), {}).get(_GLOBAL)
            if base is not None and _GLOBAL in own:
                mine, theirs = summarize_ranks(own[_GLOBAL]), summarize_ranks(base)
                costs = {m: 1 - mine[m] / max(theirs[m], 1e-9) for m in _HR}
                for metric, rel in costs.items():
                    check[f"relative {metric} cost vs {_baseline(name)}"] = round(rel, 4)
                limit = TARGETS["dp_relative_cost"]
                check["dp cost <= 10% (point estimate)"] = max(costs.values()) <= limit
                intervals = paired.get(f"global - {_baseline(name)} global", {})
                check["dp cost <= 10%"] = bool(intervals) and all(
                    d["relative_cost"] is not None and d["relative_cost"][1] <= limit
                    for d in intervals.values()
                )
        shots = _shots(own, with_cases=True)
        if shots:
            check["few-shot beats EASE fold-in at every K"] = all(
                summarize_ranks(own[f"{shot}/student (adapted)"])[m]
                > summarize_ranks(own[f"{shot}/ease fold-in"])[m]
                for shot in shots
                for m in _HR
            )
        if paired:
            check["paired differences hr@10 (95% interval over users)"] = paired
        if "fewshot" in paired:
            check["few-shot beats EASE fold-in at every K beyond noise"] = all(
                d[m]["low"] > 0 for d in paired["fewshot"].values() for m in _HR
            )
        checks[name] = check
    return checks


def _metrics(ranks: CaseRanks) -> dict[str, float]:
    """HR@10 / NDCG@10, sampled and full, of a set of cases' ranks, rounded as ``_row``."""
    return {key: round(float(value), 4) for key, value in summarize_ranks(ranks).items()}


def _pool(
    per_seed: list[dict[str, dict[str, CaseRanks]]], apart: bool = False
) -> dict[str, dict[str, CaseRanks]]:
    """Each variant's ranks of every split, side by side (keys every split has); ``apart``:
    the splits are of different worlds, whose users are different people
    (:meth:`CaseRanks.concat`)."""
    pooled: dict[str, dict[str, CaseRanks]] = {}
    for name in per_seed[0]:
        keys = set.intersection(*(set(ranks[name]) for ranks in per_seed))
        pooled[name] = {
            key: CaseRanks.concat([ranks[name][key] for ranks in per_seed], apart=apart)
            for key in sorted(keys)
        }
    return pooled


def _worlds_apart(runs: list[dict[str, Any]]) -> bool:
    """Whether the splits' users are different people: the synthetic dataset generates a
    world of its own for every seed (:func:`simulation.pipeline.load_run_dataset`)."""
    return any(
        config.get("dataset") == "synthetic"
        for run in runs
        for config in run.get("configs", {}).values()
    )


def _pooled_section(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The checks on every split's users together: accuracy and few-shot from the pooled
    ranks, epsilon the largest any split spent, throughput the median of the splits."""
    ranks = _pool([run["ranks"] for run in runs], apart=_worlds_apart(runs))
    variants: dict[str, Any] = {}
    for name, own in ranks.items():
        shots = _shots(own)
        per_split = [run["variants"][name] for run in runs]

        def largest(key: str, splits: list[dict[str, Any]] = per_split) -> float | None:
            values = [v[key] for v in splits if v[key] is not None]
            return max(values) if values else None

        variants[name] = {
            "federated": _metrics(own[_GLOBAL]),
            **({"int8 onnx": _metrics(own[_INT8])} if _INT8 in own else {}),
            "fewshot": {
                "student (adapted)": {
                    shot.removeprefix("fewshot "): _metrics(own[f"{shot}/student (adapted)"])
                    for shot in shots
                }
            },
            "epsilon_record_max": largest("epsilon_record_max"),
            "epsilon_user": largest("epsilon_user"),
            "client_updates_per_second_median": float(
                np.median([v["client_updates_per_second"] for v in per_split])
            ),
        }
    first = next(iter(ranks.values()))
    shared_rows = {
        "fewshot": {
            "ease fold-in": {
                key.split("/")[0].removeprefix("fewshot "): _metrics(r)
                for key, r in first.items()
                if key.startswith("fewshot ") and key.endswith("/ease fold-in")
            }
        }
    }
    return {
        "variants": variants,
        "baselines_and_pretrained": shared_rows,
        "checks": _checks(variants, ranks),
    }


def _fresh(run_dir: Path) -> None:
    """Every variant starts from scratch in its own run directory under ``--run-dir`` (the
    benchmark's scratch space): one left by an earlier benchmark run is removed, since the
    simulation would resume it (or refuse it, if the settings changed)."""
    if run_dir.exists():
        print(f"replacing {run_dir} (an earlier benchmark run)", file=sys.stderr, flush=True)
        shutil.rmtree(run_dir)


def _split_configs(args: argparse.Namespace, seed: int, tag: str) -> dict[str, SimulationConfig]:
    """The configs of every requested variant on one protocol split (``seed``); built (and
    so checked) for every split before the first run, so that a setting refused for a late
    variant does not cost the runs before it."""
    common: dict[str, Any] = {  # a variant's own settings (VARIANTS) override these
        "dataset": args.dataset,
        "data_dir": args.data_dir,
        "seed": seed,
        "rounds": args.rounds,
        "cohort_size": args.cohort,
        "teacher_epochs": args.teacher_epochs,
        "student_epochs": args.student_epochs,
        "backend": args.backend,
        "run_dir": args.run_dir,
        "progress": False,
    }
    overrides = {k.replace("-", "_"): v for k, v in parse_run_config(args.run_config).items()}
    return {
        name: from_flat(  # coerces --run-config's values (e.g. shots=1,3) to the field types
            SimulationConfig,
            {**common, **VARIANTS[name], **overrides, "name": f"{args.dataset}-{name}{tag}"},
        )
        for name in args.variants
    }


def _reused(cfg: SimulationConfig) -> tuple[dict[str, Any], dict[str, CaseRanks]]:
    """The summary and ranks (:func:`~simulation.pipeline.run_ranks`) of the finished run
    ``cfg`` names (``--reuse-runs``), refused unless it was run with these settings."""
    root = Path(cfg.run_dir) / cfg.name
    stored = stored_config(root)
    if stored is None or not (root / "summary.json").exists():
        raise SystemExit(f"--reuse-runs: {root} holds no finished run; run without it")
    mine, theirs = to_flat(cfg), to_flat(stored)
    runtime = RESUMABLE_KEYS | {"progress", "text-model"}  # stored_config resets these
    differ = sorted(k for k in mine if k not in runtime and mine[k] != theirs.get(k))
    if differ:
        raise SystemExit(f"--reuse-runs: {root} was run with other {', '.join(differ)}")
    return json.loads((root / "summary.json").read_text()), run_ranks(root)


def _run_split(
    split_configs: dict[str, SimulationConfig], tag: str, reuse: bool = False
) -> dict[str, Any]:
    """Every requested variant on one protocol split (``reuse``: the runs already there)."""
    variants: dict[str, Any] = {}
    variant_ranks: dict[str, dict[str, CaseRanks]] = {}
    shared_rows: dict[str, Any] = {}
    configs: dict[str, Any] = {}
    for name, cfg in split_configs.items():
        if reuse:
            summary, variant_ranks[name] = _reused(cfg)
        else:
            _fresh(Path(cfg.run_dir) / cfg.name)
            stamp = time.strftime("%H:%M:%S")
            print(f"[{stamp}] variant {name}{tag} ...", file=sys.stderr, flush=True)
            summary = run_pipeline(cfg)
            variant_ranks[name] = run_ranks(Path(summary["meta"]["run directory"]))
        configs[name] = to_flat(cfg)
        variants[name] = _variant_summary(name, summary)
        if not shared_rows:
            final = summary["final"]
            for model in _SHARED_MODELS:
                shared_rows[model] = _row(final, model)
            shared_rows["public users"] = {m: _row(final, m, "public") for m in _SHARED_MODELS}
            fewshot = summary.get("fewshot", {})
            shared_rows["fewshot"] = {
                k: v for k, v in fewshot.items() if k in ("pop", "ease fold-in")
            }
        print(json.dumps({name: variants[name]}, default=str), file=sys.stderr, flush=True)
    return {
        "configs": configs,
        "baselines_and_pretrained": shared_rows,
        "variants": variants,
        "checks": _checks(variants, variant_ranks),
        "ranks": variant_ranks,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", default="ml-100k")
    parser.add_argument("--data-dir", default="")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument(
        "--seeds",
        nargs="+",
        type=int,
        default=[SimulationConfig.seed],
        help="protocol splits to run; more than one adds a pooled section (module doc)",
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=20,
        help="rounds of the variants that do not fix their own (--run-config rounds=N forces all)",
    )
    parser.add_argument("--cohort", type=int, default=50)
    parser.add_argument("--teacher-epochs", type=int, default=SimulationConfig.teacher_epochs)
    parser.add_argument("--student-epochs", type=int, default=SimulationConfig.student_epochs)
    parser.add_argument("--backend", default="ray", choices=["ray", "inprocess"])
    parser.add_argument(
        "--run-dir",
        default="runs/bench",
        help="scratch folder of the variants' run directories (earlier ones are replaced)",
    )
    parser.add_argument(
        "--run-config",
        default="",
        help="SimulationConfig overrides for every variant, e.g. 'user-dp-noise-multiplier=0.8'",
    )
    parser.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    parser.add_argument(
        "--reuse-runs",
        action="store_true",
        help="recompute the JSON from the finished runs already in --run-dir (same arguments "
        "otherwise), without training: after a change to the checks or the intervals",
    )
    args = parser.parse_args(argv)
    require_seeds(parser, args.seeds)

    require_counts(parser, args, "rounds", "cohort")

    started = time.perf_counter()
    several = len(args.seeds) > 1
    tags = [f"-seed{seed}" if several else "" for seed in args.seeds]
    plans = [_split_configs(args, seed, tag) for seed, tag in zip(args.seeds, tags, strict=True)]
    runs = [
        _run_split(plan, tag, reuse=args.reuse_runs) for plan, tag in zip(plans, tags, strict=True)
    ]
    document: dict[str, Any] = {
        "dataset": args.dataset,
        **provenance("bench/federation_benchmark.py", argv),
    }
    if several:
        document["seeds"] = args.seeds
        document["per_seed"] = {
            str(seed): {k: v for k, v in run.items() if k != "ranks"}
            for seed, run in zip(args.seeds, runs, strict=True)
        }
        document["pooled"] = _pooled_section(runs)
    else:
        document.update({k: v for k, v in runs[0].items() if k != "ranks"})
    if args.reuse_runs:
        document["reused_runs"] = (
            "figures recomputed (--reuse-runs) from the runs an earlier invocation trained in "
            f"{args.run_dir}: `code` names the code that recomputed them, not the code that "
            "trained the runs (which the runs do not record)"
        )
    document["targets"] = TARGETS
    document["seconds"] = round(time.perf_counter() - started, 1)
    text = json.dumps(document, indent=2, default=str)
    print(text)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(run_bench(main))
