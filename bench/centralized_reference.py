"""The centralized, non-private reference that issue 4's accuracy target names, measured on
this project's protocol splits, and the federated students paired against it. Prints JSON.

The issue's target for the federated int8 student (SecAgg+, record-level DP) is to "match a
centralized, non-private model": on the protocol split with all users, centralized EASE gives
about 0.645 / 0.140 sampled / full HR@10 and a centralized SASRec-style model (2 layers,
d = 64, full softmax) about 0.70 / 0.21. This benchmark trains that model here: the teacher's
architecture and training (``TeacherConfig`` defaults, ``--order`` reading) on every
non-cold user's train data, public and federated alike, early-stopped on both populations'
validation item, then scored on the federated users' test item beside EASE on the same data.

With ``--runs``, the federation benchmark's run directories (their ``ranks.npz`` and
``config.json``) of the same split seeds are paired case by case against the centralized
model: the difference the target is about, with a 95% bootstrap interval over users, per
split and pooled over the splits.

    python bench/centralized_reference.py --data-dir ../shared/datasets/ml-100k \\
        --seeds 42 1 2 3 --runs runs/bench/ml-100k-record-dp-split-seed*
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any, cast

import torch

from shared.data.registry import load_dataset
from shared.eval.compare import compare_pairs
from shared.eval.protocol import CaseRanks, EvalConfig, split_ranks, summarize_each
from shared.eval.splits import SplitConfig, split_users
from shared.models.baselines import EASE
from shared.models.history_order import Order
from shared.models.teacher import SASRecTeacher, TeacherConfig
from shared.text.encoder import encode_items
from shared.training.trainer import Validation
from simulation.pipeline import load_ranks
from simulation.pretrain import default_cache_root, encoder_config
from simulation.provenance import provenance, run_bench

CENTRAL = "sasrec (all users)"
EASE_ALL = "ease (all users)"
FEDERATED_MODELS = ("student int8 onnx", "student (federated + personal)")
"""The models of a federation run's ``ranks.npz`` paired against :data:`CENTRAL`."""


def central_ranks(
    dataset: str, data_dir: str | None, seed: int, order: str, cache_dir: Path
) -> tuple[dict[str, CaseRanks], dict[str, Any]]:
    """Federated users' test ranks of the centralized SASRec and EASE on split ``seed``, and
    what the SASRec run looked like (epochs, validation, seconds)."""
    ds = load_dataset(dataset, data_dir, synthetic_seed=seed)
    split = split_users(ds, SplitConfig(seed=seed))
    text = encode_items(ds.item_text, encoder_config("", cache_dir))
    everyone = split.train_sequences()  # public and federated users, never the cold ones
    start = time.perf_counter()
    sasrec = SASRecTeacher(text, TeacherConfig(order=cast(Order, order), seed=seed))
    sasrec.fit(everyone, ds.n_items, Validation(split, ("public", "federated")))
    seconds = time.perf_counter() - start
    ease = EASE().fit(everyone, ds.n_items)
    config = EvalConfig(seed=seed)
    ranks = {
        CENTRAL: split_ranks(sasrec, split, ("federated",), "test", config)["federated"],
        EASE_ALL: split_ranks(ease, split, ("federated",), "test", config)["federated"],
    }
    run = {
        "order": sasrec.fitted_order,
        "best_epoch": sasrec.history.best_epoch,
        "best_validation_sampled_ndcg@10": round(sasrec.history.best_metric, 4),
        "trainable": sum(p.numel() for p in sasrec.model.parameters() if p.requires_grad),
        "seconds": round(seconds, 1),
    }
    return ranks, run


def federation_runs(paths: list[Path]) -> dict[int, tuple[str, dict[str, CaseRanks]]]:
    """``{split seed: (run name, federated users' test ranks of FEDERATED_MODELS)}``."""
    out: dict[int, tuple[str, dict[str, CaseRanks]]] = {}
    for path in paths:
        config = json.loads((path / "config.json").read_text())["simulation"]
        seed = int(config["seed"])
        if seed in out:
            raise SystemExit(f"error: two runs of split seed {seed}: {out[seed][0]}, {path.name}")
        ranks = load_ranks(path / "ranks.npz")
        missing = [m for m in FEDERATED_MODELS if f"federated/{m}" not in ranks]
        if missing:
            raise SystemExit(f"error: {path}/ranks.npz has no federated ranks of {missing}")
        out[seed] = (path.name, {m: ranks[f"federated/{m}"] for m in FEDERATED_MODELS})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", default="ml-100k")
    parser.add_argument("--data-dir", default=None, help="dataset folder (not for synthetic)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[42], help="split seeds")
    parser.add_argument(
        "--order", choices=("sequence", "set", "auto"), default="sequence", help="history reading"
    )
    parser.add_argument(
        "--runs", type=Path, nargs="*", default=[], help="federation run directories to pair"
    )
    parser.add_argument(
        "--cache-dir", default=str(default_cache_root()), help="text-embedding cache root"
    )
    args = parser.parse_args()
    if len(set(args.seeds)) != len(args.seeds) or any(s < 0 for s in args.seeds):
        parser.error(f"--seeds must be distinct and >= 0, got {args.seeds}")
    for path in args.runs:
        if not (path / "ranks.npz").is_file() or not (path / "config.json").is_file():
            parser.error(f"--runs: {path} is not a finished run directory (no ranks.npz)")

    torch.set_num_threads(2)
    start = time.perf_counter()
    runs = federation_runs(args.runs)
    unmatched = sorted(set(runs) - set(args.seeds))
    if unmatched:
        parser.error(f"--runs include split seeds {unmatched} that --seeds does not train")
    models = (CENTRAL, EASE_ALL, *FEDERATED_MODELS) if runs else (CENTRAL, EASE_ALL)
    pairs = [(m, CENTRAL) for m in FEDERATED_MODELS] + [(CENTRAL, EASE_ALL)]
    per_seed: dict[str, Any] = {}
    paired_splits: list[dict[str, CaseRanks]] = []
    for seed in args.seeds:
        ranks, run = central_ranks(
            args.dataset, args.data_dir, seed, args.order, Path(args.cache_dir)
        )
        entry: dict[str, Any] = {"sasrec": run}
        if seed in runs:
            name, federated = runs[seed]
            entry["federation_run"] = name
            ranks = {**ranks, **federated}
            paired_splits.append(ranks)
        entry["federated_users_test"] = summarize_each(ranks)
        entry["paired_differences_hr@10"] = compare_pairs({"federated": ranks}, pairs)
        per_seed[str(seed)] = entry
    out: dict[str, Any] = {
        "dataset": args.dataset,
        "seeds": args.seeds,
        "what": "a centralized, non-private SASRec-style model (the teacher's architecture "
        "and training) on every non-cold user's train data, federated users' test item",
        "per_seed": per_seed,
    }
    if len(paired_splits) > 1:
        pooled = {m: CaseRanks.concat([r[m] for r in paired_splits]) for m in models}
        out["pooled_over_paired_splits"] = {
            "seeds": sorted(runs),
            "federated_users_test": summarize_each(pooled),
            "paired_differences_hr@10": compare_pairs({"federated": pooled}, pairs),
        }
    out["seconds"] = round(time.perf_counter() - start, 1)
    out.update(provenance("bench/centralized_reference.py"))
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    raise SystemExit(run_bench(main))
