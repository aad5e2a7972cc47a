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
model, each variant's int8 student and its personal-adapter student: the difference the
target is about, with a 95% bootstrap interval over users, per split and pooled over the
splits. Runs without DP beside runs with it tell what the federation costs and what DP adds.

    python bench/centralized_reference.py --data-dir ../shared/datasets/ml-100k \\
        --seeds 42 1 2 3 --runs runs/bench/ml-100k-*-seed*
"""

from __future__ import annotations

import argparse
import json
import re
import time
from pathlib import Path
from typing import Any, cast

import torch

from shared.data.registry import load_dataset
from shared.errors import DataError
from shared.eval.compare import compare_pairs
from shared.eval.protocol import CaseRanks, EvalConfig, split_ranks, summarize_each
from shared.eval.splits import SplitConfig, split_users
from shared.models.baselines import EASE
from shared.models.history_order import Order
from shared.models.teacher import SASRecTeacher, TeacherConfig
from shared.text.encoder import encode_items
from shared.training.trainer import Validation, count_parameters
from simulation.pipeline import run_ranks
from simulation.pretrain import cache_dir_argument, default_cache_root, encoder_config
from simulation.provenance import provenance, require_seeds, run_bench

CENTRAL = "sasrec (all users)"
EASE_ALL = "ease (all users)"
FEDERATED_MODELS = {"student int8 onnx": "int8", "student (federated + personal)": "personal"}
"""The models of a federation run's ``ranks.npz`` paired against :data:`CENTRAL`, and how
they are labelled here (after the run's variant)."""
RUN_STAMP = re.compile(r"-seed\d+(-\d{8}-\d{6})?$")
"""What the federation benchmark appends to a variant's run name: the seed (and, before it
replaced earlier runs in place, the time)."""


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
        "trainable": count_parameters(p for p in sasrec.model.parameters() if p.requires_grad),
        "seconds": round(seconds, 1),
    }
    return ranks, run


def federation_runs(paths: list[Path]) -> dict[int, dict[str, CaseRanks]]:
    """``{split seed: {"<variant>: <model>": federated users' test ranks}}`` for the
    :data:`FEDERATED_MODELS` of every run; the variant is the run's name without the seed and
    time the federation benchmark stamps on it. Every variant must cover the same seeds."""
    out: dict[int, dict[str, CaseRanks]] = {}
    seeds_of: dict[str, set[int]] = {}
    for path in paths:
        config = json.loads((path / "config.json").read_text())["simulation"]
        seed, variant = int(config["seed"]), RUN_STAMP.sub("", path.name)
        if seed in seeds_of.setdefault(variant, set()):
            raise DataError(f"two runs of variant {variant!r} on split seed {seed}")
        seeds_of[variant].add(seed)
        ranks = run_ranks(path)
        for model, label in FEDERATED_MODELS.items():
            if f"federated/{model}" not in ranks:
                raise DataError(f"{path}/ranks.npz has no federated ranks of {model!r}")
            out.setdefault(seed, {})[f"{variant}: {label}"] = ranks[f"federated/{model}"]
    if len({frozenset(s) for s in seeds_of.values()}) > 1:
        raise DataError(f"the runs' variants cover different split seeds: {seeds_of}")
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
        "--cache-dir",
        type=cache_dir_argument,
        default=str(default_cache_root()),
        help="text-embedding cache root",
    )
    args = parser.parse_args()
    require_seeds(parser, args.seeds)
    for path in args.runs:
        if not (path / "ranks.npz").is_file() or not (path / "config.json").is_file():
            parser.error(f"--runs: {path} is not a finished run directory (no ranks.npz)")

    torch.set_num_threads(2)
    start = time.perf_counter()
    runs = federation_runs(args.runs)
    unmatched = sorted(set(runs) - set(args.seeds))
    if unmatched:
        parser.error(f"--runs include split seeds {unmatched} that --seeds does not train")
    federated = sorted(next(iter(runs.values()))) if runs else []
    models = (CENTRAL, EASE_ALL, *federated)
    pairs = [(m, CENTRAL) for m in federated] + [(CENTRAL, EASE_ALL)]
    per_seed: dict[str, Any] = {}
    paired_splits: list[dict[str, CaseRanks]] = []
    for seed in args.seeds:
        ranks, run = central_ranks(
            args.dataset, args.data_dir, seed, args.order, Path(args.cache_dir)
        )
        if seed in runs:
            ranks = {**ranks, **runs[seed]}
            paired_splits.append(ranks)
        per_seed[str(seed)] = {
            "sasrec": run,
            "federated_users_test": summarize_each(ranks),
            "paired_differences_hr@10": compare_pairs({"federated": ranks}, pairs),
        }
    out: dict[str, Any] = {
        "dataset": args.dataset,
        "seeds": args.seeds,
        "what": "a centralized, non-private SASRec-style model (the teacher's architecture "
        "and training) on every non-cold user's train data, federated users' test item",
        "per_seed": per_seed,
    }
    if len(paired_splits) > 1:
        # the synthetic dataset generates a world of its own for every seed: its users are others
        apart = args.dataset == "synthetic"
        pooled = {m: CaseRanks.concat([r[m] for r in paired_splits], apart=apart) for m in models}
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
