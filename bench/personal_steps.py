"""How many steps should a device spend fitting its personal adapter? Prints JSON.

Takes the run directory of a finished ``fedrec simulate`` run, rebuilds its protocol split
from ``config.json``, loads the final global model from the newest checkpoint, and scores the
federated users with adapters fitted against that model from its initialization
(:class:`simulation.pipeline.AdaptedStudent`, what a device does before it serves a model),
for each number of steps. Reports HR@10 / NDCG@10 on the validation item (for choosing) and
the test item, and the paired difference to no adapter with a 95% bootstrap interval.

    python bench/personal_steps.py runs/ml-100k-shares --steps 0 5 20 35
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch

from shared.errors import DataError
from shared.eval.compare import compare_ranks
from shared.eval.protocol import EvalConfig, case_ranks, loo_cases, summarize_ranks
from simulation.pipeline import AdaptedStudent, load_finished_run
from simulation.provenance import provenance, run_bench


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", type=Path, help="run directory of `fedrec simulate`")
    parser.add_argument("--steps", type=int, nargs="+", default=[0, 5, 20, 35])
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--data-dir", default=None, help="override the run's dataset folder")
    parser.add_argument(
        "--exclude-seen",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="leave the window's own items out of the adapter's next-item softmax",
    )
    args = parser.parse_args()
    if any(k < 0 for k in args.steps) or not args.lr > 0:
        parser.error("--steps must be >= 0 and --lr > 0")
    if 0 not in args.steps:
        args.steps = [0, *args.steps]  # the reference every difference is taken against

    torch.set_num_threads(2)
    start = time.perf_counter()
    try:
        run = load_finished_run(args.run, args.data_dir)
    except DataError as exc:
        parser.error(str(exc))
    model, init, split = run.model, run.adapter_init, run.split
    eval_cfg = EvalConfig(seed=run.config.seed)

    out: dict[str, Any] = {
        "run": str(args.run),
        "round": run.server_round,
        "lr": args.lr,
        "exclude_seen": args.exclude_seen,
    }
    for stage in ("valid", "test"):
        cases = loo_cases(split, split.federated_users, stage)
        rows: dict[str, Any] = {}
        reference = None
        for steps in sorted(args.steps):
            adapted = AdaptedStudent(model, steps, args.lr, init, args.exclude_seen)
            ranks = case_ranks(adapted, cases, eval_cfg)
            row: dict[str, Any] = {k: round(float(v), 4) for k, v in summarize_ranks(ranks).items()}
            if reference is None:
                reference = ranks
            else:
                row["minus_no_adapter"] = {
                    k: d.as_dict() for k, d in compare_ranks(ranks, reference).items()
                }
            rows[str(steps)] = row
        out[stage] = rows
    out["seconds"] = round(time.perf_counter() - start, 1)
    out.update(provenance("bench/personal_steps.py"))
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    raise SystemExit(run_bench(main))
