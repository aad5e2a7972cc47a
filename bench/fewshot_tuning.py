"""How many steps, at what learning rate, should a new user's adapter train? Prints JSON.

``adapt-steps`` / ``adapt-lr`` set the few-shot adaptation (a new user's personal adapter
fitted on their first K interactions, :func:`shared.federated.local_training.fit_personal`).
They may not be chosen on the cold users: those are the protocol's few-shot test set. This
chooses them on what the server holds: each *public* user's training sequence read as a
newcomer's (:func:`shared.eval.protocol.pseudo_cold_cases`), then reports the cold users.

For each finished ``fedrec simulate`` run (one per split seed; their cases are pooled), for
each setting of the grid (``--steps`` x ``--lr``; 0 steps, no adaptation, once) and each K of
``--shots`` (K = 1 has no pair of interactions to fit, so it is left out): HR@10 / NDCG@10,
sampled and full, on the public users' pseudo-cold cases and on the cold users' few-shot
cases. The choice is fixed before the cold users are read: the setting with the highest mean,
over K, of the average of sampled and full NDCG@10 on the pseudo-cold cases. Against the
cold users it reports the chosen setting minus the run's own (``adapt-steps`` /
``adapt-lr``) and minus EASE fold-in, as paired HR@10 differences with 95% intervals over
users (at each K some cold user's history reaches).

The public users are not unseen: pretraining read them, so the choice favours a model that
already knows the user, a conservative reading of what adaptation gains.

    python bench/fewshot_tuning.py runs/bench/ml-100k-record-dp-split-seed* \\
        --steps 0 10 30 --lr 0.0003 0.001 0.003
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from shared.errors import DataError
from shared.eval.compare import compare_ranks
from shared.eval.protocol import (
    CaseRanks,
    EvalCase,
    EvalConfig,
    case_ranks,
    fewshot_cases,
    pseudo_cold_cases,
    summarize_ranks,
)
from shared.eval.splits import ProtocolSplit
from shared.models.baselines import EASE
from simulation.pipeline import AdaptedStudent, FinishedRun, load_finished_run
from simulation.provenance import provenance, run_bench

Setting = tuple[int, float]
CASES: dict[str, Callable[[ProtocolSplit, int], list[EvalCase]]] = {
    "public (pseudo-cold)": pseudo_cold_cases,
    "cold": fewshot_cases,
}


def _label(setting: Setting) -> str:
    steps, lr = setting
    return "no adaptation" if steps == 0 else f"steps={steps} lr={lr:g}"


def _criterion(metrics: dict[str, dict[str, float]]) -> float:
    """Mean over K of the average of sampled and full NDCG@10: what the choice maximises."""
    return float(
        np.mean([(m["sampled_ndcg@10"] + m["full_ndcg@10"]) / 2 for m in metrics.values()])
    )


def _rank_run(
    run: FinishedRun, settings: Sequence[Setting], shots: Sequence[int]
) -> dict[str, dict[str, dict[str, CaseRanks]]]:
    """``{cases: {K: {model: ranks}}}`` for one run: every setting, and EASE fold-in."""
    eval_cfg = EvalConfig(seed=run.config.seed)
    ease = EASE().fit(run.split.train_sequences(), run.dataset.n_items)
    exclude_seen = run.config.exclude_seen
    out: dict[str, dict[str, dict[str, CaseRanks]]] = {}
    for name, build in CASES.items():
        out[name] = {}
        for k in shots:
            cases = build(run.split, k)
            by_model = {"ease fold-in": case_ranks(ease, cases, eval_cfg)}
            for steps, lr in settings:
                adapted = AdaptedStudent(run.model, steps, lr, run.adapter_init, exclude_seen)
                by_model[_label((steps, lr))] = case_ranks(adapted, cases, eval_cfg)
            out[name][f"k={k}"] = by_model
    return out


def _pool(
    per_run: Sequence[dict[str, dict[str, dict[str, CaseRanks]]]], apart: bool = False
) -> dict[str, dict[str, dict[str, CaseRanks]]]:
    """Every run's cases side by side; ``apart``: the runs are of different worlds, whose
    users are different people (:meth:`CaseRanks.concat`)."""
    first = per_run[0]
    return {
        name: {
            k: {m: CaseRanks.concat([r[name][k][m] for r in per_run], apart=apart) for m in models}
            for k, models in by_k.items()
        }
        for name, by_k in first.items()
    }


def _rounded(metrics: dict[str, float]) -> dict[str, float]:
    return {k: round(float(v), 4) for k, v in metrics.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", type=Path, nargs="+", help="run directories of `fedrec simulate`")
    parser.add_argument("--steps", type=int, nargs="+", default=[0, 10, 30])
    parser.add_argument("--lr", type=float, nargs="+", default=[3e-4, 1e-3, 3e-3])
    parser.add_argument("--shots", type=int, nargs="+", default=[3, 5, 10])
    parser.add_argument("--data-dir", default=None, help="override the runs' dataset folder")
    args = parser.parse_args()
    if any(s < 0 for s in args.steps) or not all(lr > 0 for lr in args.lr):
        parser.error("--steps must be >= 0 and every --lr > 0")
    if any(k < 2 for k in args.shots):
        parser.error("--shots must be >= 2: with one interaction there is nothing to fit")
    torch.set_num_threads(2)
    start = time.perf_counter()
    try:
        runs = [load_finished_run(root, args.data_dir) for root in args.runs]
    except DataError as exc:
        parser.error(str(exc))
    own = {(r.config.adapt_steps, r.config.adapt_lr) for r in runs}
    if len(own) != 1:
        parser.error(f"the runs adapt differently ({sorted(own)}); give runs of one setting")
    (default,) = own
    settings = sorted(
        {(0, 0.0)} | {(s, lr) for s in args.steps if s > 0 for lr in args.lr} | {default}
    )
    # the synthetic dataset generates a world of its own for every seed: its users are others
    apart = any(r.config.dataset == "synthetic" for r in runs)
    pooled = _pool([_rank_run(run, settings, args.shots) for run in runs], apart)

    summary = {
        name: {_label(s): {k: summarize_ranks(by_k[k][_label(s)]) for k in by_k} for s in settings}
        for name, by_k in pooled.items()
    }
    choosing = summary["public (pseudo-cold)"]
    chosen = max(settings, key=lambda s: _criterion(choosing[_label(s)]))
    cold = pooled["cold"]
    against: dict[str, Any] = {}
    for reference in (_label(default), "ease fold-in"):
        against[f"chosen - {reference}"] = {
            k: {
                m: d.as_dict()
                for m, d in compare_ranks(by_model[_label(chosen)], by_model[reference]).items()
            }
            for k, by_model in cold.items()
            if len(by_model[reference].sampled) > 0  # a K no cold user reaches: no pairs
        }
    out: dict[str, Any] = {
        "runs": [str(r) for r in args.runs],
        "rounds": [r.server_round for r in runs],
        "criterion": "mean over K of (sampled + full NDCG@10) / 2, public pseudo-cold cases",
        "run_setting": _label(default),
        "chosen": _label(chosen),
        "criterion_by_setting": {
            _label(s): round(_criterion(choosing[_label(s)]), 4) for s in settings
        },
        "metrics": {
            name: {
                model: {k: _rounded(m) for k, m in by_k.items()}
                for model, by_k in {
                    **rows,
                    "ease fold-in": {
                        k: summarize_ranks(pooled[name][k]["ease fold-in"]) for k in pooled[name]
                    },
                }.items()
            }
            for name, rows in summary.items()
        },
        "cold_paired_hr@10": against,
        "seconds": round(time.perf_counter() - start, 1),
    }
    out.update(provenance("bench/fewshot_tuning.py"))
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    raise SystemExit(run_bench(main))
