"""Issue 3's "A beats B" claims beyond one synthetic world: the default teacher, EASE fitted to
the same public users and the int8 ONNX student on several freshly generated worlds (one seed
each, none of them used to choose a default), per world and pooled over every world's users,
with paired 95% bootstrap intervals. Prints JSON.

One world's 720 federated users give intervals about +-0.03 wide, as wide as the differences
in question; pooling the worlds narrows them and removes the luck of one draw (the defaults
were tuned on seed 42, so its figures are optimistic).

    python bench/synthetic_worlds.py --seeds 3 7 5 11 19 23
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path
from typing import Any

import torch

from shared.compression.artifact import publish_student
from shared.eval.compare import compare_pairs
from shared.eval.protocol import CaseRanks, EvalConfig, split_ranks, summarize_each
from shared.models.baselines import EASE
from shared.ondevice.runtime import OnDeviceModel
from simulation.pretrain import cache_dir_argument, default_cache_root, pretrain_on
from simulation.provenance import provenance, require_seeds, run_bench

POPULATIONS = ("public", "federated")
MODELS = ("ease (public users)", "teacher", "teacher (attention only)", "student int8 onnx")
"""Every model a run can rank; "teacher (attention only)" only with ``--teacher-prior``."""
PAIRS = (
    ("teacher", "ease (public users)"),
    ("teacher (attention only)", "ease (public users)"),
    ("teacher", "teacher (attention only)"),
    ("student int8 onnx", "teacher"),
    ("student int8 onnx", "ease (public users)"),
)


def world_ranks(
    seed: int, cache_dir: Path, prior: bool = False
) -> tuple[dict[str, dict[str, CaseRanks]], str, float]:
    """Test ranks of the models of :data:`MODELS` on world ``seed`` (its own protocol split),
    and the reading and item-item prior weight validation chose for the teacher."""
    run = pretrain_on("synthetic", None, seed, cache_dir, teacher_prior=prior)
    ds, split, pre = run.dataset, run.split, run.pretrained
    cfg = EvalConfig(seed=seed)
    with tempfile.TemporaryDirectory() as tmp:
        artifact = publish_student(
            pre.student.model, ds.item_ids, Path(tmp) / "student.onnx", version="0"
        )
        models: dict[str, Any] = {
            "ease (public users)": EASE().fit(
                split.train_sequences(split.public_users), ds.n_items
            ),
            "teacher": pre.teacher,
            "student int8 onnx": OnDeviceModel(artifact.path),
        }
        if prior:
            models["teacher (attention only)"] = pre.teacher.attention_scorer()
        ranks = {
            name: split_ranks(m, split, POPULATIONS, "test", cfg) for name, m in models.items()
        }
    return ranks, str(pre.teacher.fitted_order), pre.teacher.prior_weight


def pool_worlds(
    by_world: list[dict[str, dict[str, CaseRanks]]], names: list[str]
) -> dict[str, dict[str, CaseRanks]]:
    """Every world's cases of each model in ``names`` side by side, per population, each
    world's users kept apart: a world numbers its users from 0, so user ``u`` of two worlds
    is two people, and the paired intervals resample users with all of their cases
    (:func:`~shared.eval.compare.paired_difference`); pooled under their own numbers, user
    ``u`` of every world would be drawn as one user (6 worlds: a sixth of the users, each
    with 6 unrelated cases)."""
    return {
        name: {
            pop: CaseRanks.concat([r[name][pop] for r in by_world], apart=True)
            for pop in POPULATIONS
        }
        for name in names
    }


def differences(ranks: dict[str, dict[str, CaseRanks]]) -> dict[str, Any]:
    """Paired HR@10 differences of :data:`PAIRS`, per population (``{population: {"a - b":
    ...}}``, as :func:`~shared.eval.compare.compare_pairs` gives them)."""
    pairs = tuple((a, b) for a, b in PAIRS if a in ranks and b in ranks)
    return compare_pairs(
        {pop: {name: ranks[name][pop] for name in ranks} for pop in POPULATIONS}, pairs
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--seeds",
        type=int,
        nargs="+",
        default=[3, 7, 5, 11, 19, 23],
        help="world (and split) seeds; the default leaves out 42, on which defaults were tuned",
    )
    parser.add_argument(
        "--cache-dir",
        type=cache_dir_argument,
        default=str(default_cache_root()),
        help="pretraining cache root",
    )
    parser.add_argument(
        "--teacher-prior",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="teachers with the item-item (EASE) prior, and their attention part alone beside",
    )
    args = parser.parse_args()
    require_seeds(parser, args.seeds)

    torch.set_num_threads(2)
    worlds: dict[str, Any] = {}
    by_world: list[dict[str, dict[str, CaseRanks]]] = []
    for seed in args.seeds:
        ranks, order, prior = world_ranks(seed, Path(args.cache_dir), args.teacher_prior)
        by_world.append(ranks)
        worlds[str(seed)] = {
            "teacher_order": order,
            "teacher_prior_weight": prior,
            "results": {name: summarize_each(ranks[name]) for name in ranks},
            "paired_differences_hr@10": differences(ranks),
        }
    names = [name for name in MODELS if name in by_world[0]]
    all_ranks = pool_worlds(by_world, names)
    out: dict[str, Any] = {
        "seeds": args.seeds,
        "pooled": {
            "results": {name: summarize_each(all_ranks[name]) for name in names},
            "paired_differences_hr@10": differences(all_ranks),
        },
        "worlds": worlds,
        **provenance("bench/synthetic_worlds.py"),
    }
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    raise SystemExit(run_bench(main))
