"""The teacher's learning curve, to judge its early-stopping criterion. Prints JSON.

Trains one teacher reading on the public users for ``--epochs`` epochs without stopping and,
every ``--eval-every`` epochs, records what the server can see (the public users'
validation item: sampled NDCG@10, full NDCG@10, and its negative log-likelihood under the
softmax over the items outside the history) next to what it cannot (the federated users'
test HR@10, sampled / full). ``picks`` says which epoch each criterion would keep (its best
over the whole curve) and what that epoch scores on the federated users; ``default_stop`` is
where the default early stopping (sampled NDCG@10, patience ``TeacherConfig.patience``
validations) ends.

    python bench/teacher_curve.py --dataset ml-100k --data-dir ../shared/datasets/ml-100k \\
        --order sequence --epochs 70
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt
import torch

from shared.data.registry import load_dataset
from shared.errors import FedRecError
from shared.eval.protocol import evaluate_split, loo_cases
from shared.eval.splits import ProtocolSplit, SplitConfig, split_users
from shared.models.base import Scorer
from shared.models.teacher import SASRecTeacher, TeacherConfig
from shared.text.encoder import EncoderConfig, encode_items
from shared.training.trainer import EarlyStopping, Validation
from simulation.provenance import provenance, run_bench

CRITERIA = {  # name -> (row key, True when larger is better)
    "public validation sampled NDCG@10": ("valid_sampled_ndcg@10", True),
    "public validation full NDCG@10": ("valid_full_ndcg@10", True),
    "public validation NLL": ("valid_nll", False),
}


def validation_nll(scorer: Scorer, split: ProtocolSplit, users: npt.ArrayLike) -> float:
    """Mean negative log-likelihood of each user's validation item, softmax over the items
    outside the user's history."""
    cases = loo_cases(split, np.asarray(users, dtype=np.int64), "valid")
    scores = np.asarray(scorer.score([c.history for c in cases]), dtype=np.float64)
    for row, case in enumerate(cases):
        scores[row, case.exclude] = -np.inf
    top = scores.max(axis=1, keepdims=True)
    log_norm = np.log(np.exp(scores - top).sum(axis=1)) + top[:, 0]
    targets = np.array([c.target for c in cases])
    return float(np.mean(log_norm - scores[np.arange(len(cases)), targets]))


@dataclass(frozen=True)
class RecordingValidation(Validation):
    """The default validation metric, plus one curve row per call."""

    rows: list[dict[str, float]] = field(default_factory=list)

    def metric(self, scorer: Scorer, name: str) -> float:
        public = evaluate_split(scorer, self.split, ("public",), "valid")["public"]
        federated = evaluate_split(scorer, self.split, ("federated",), "test")["federated"]
        self.rows.append(
            {
                "valid_sampled_ndcg@10": round(public["sampled_ndcg@10"], 4),
                "valid_full_ndcg@10": round(public["full_ndcg@10"], 4),
                "valid_nll": round(validation_nll(scorer, self.split, self.split.public_users), 4),
                "federated_test_sampled_hr@10": round(federated["sampled_hr@10"], 4),
                "federated_test_full_hr@10": round(federated["full_hr@10"], 4),
            }
        )
        return float(public[name])


def default_stop(values: list[float], patience: int) -> int:
    """Index of the row the default early stopping (:class:`EarlyStopping`) keeps."""
    stopping, kept = EarlyStopping(patience), 0
    for i, value in enumerate(values):
        if stopping.update(value):
            kept = i
        elif stopping.exhausted:
            break
    return kept


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", default="ml-100k")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--seed", type=int, default=42, help="split and synthetic-world seed")
    parser.add_argument("--order", choices=("sequence", "set"), default="sequence")
    parser.add_argument("--epochs", type=int, default=70)
    parser.add_argument("--eval-every", type=int, default=TeacherConfig.eval_every)
    args = parser.parse_args()
    if args.epochs < 1 or args.eval_every < 1:
        parser.error("--epochs and --eval-every must be >= 1")
    torch.set_num_threads(2)
    start = time.perf_counter()

    try:
        ds = load_dataset(args.dataset, args.data_dir, synthetic_seed=args.seed)
    except FedRecError as err:
        parser.error(str(err))
    split = split_users(ds, SplitConfig(seed=args.seed))
    text = encode_items(ds.item_text, EncoderConfig(show_progress=False))
    config = TeacherConfig(
        seed=args.seed,
        order=args.order,
        epochs=args.epochs,
        eval_every=args.eval_every,
        patience=args.epochs + 1,  # never stops: the whole curve
    )
    validation = RecordingValidation(split, ("public",))
    SASRecTeacher(text, config).fit(
        split.train_sequences(split.public_users), ds.n_items, validation
    )
    # the trainer validates every eval_every epochs and after the last one
    validated = [
        e for e in range(1, args.epochs + 1) if e % args.eval_every == 0 or e == args.epochs
    ]
    rows: list[dict[str, Any]] = [
        # zip stops early where training diverged and ended at its best epoch
        {"epoch": epoch, **row}
        for epoch, row in zip(validated, validation.rows, strict=False)
    ]

    def at(index: int) -> dict[str, Any]:
        return {k: rows[index][k] for k in ("epoch", *(k for k in rows[index] if "test" in k))}

    picks = {}
    for name, (key, larger) in CRITERIA.items():
        values = [float(r[key]) if larger else -float(r[key]) for r in rows]
        picks[name] = at(int(np.argmax(values)))
    stop = default_stop([float(r["valid_sampled_ndcg@10"]) for r in rows], TeacherConfig.patience)
    out = {
        "dataset": ds.summary(),
        "order": args.order,
        "curve": rows,
        "picks": picks,
        "default_stop": at(stop),
        "seconds": round(time.perf_counter() - start, 1),
        **provenance("bench/teacher_curve.py"),
    }
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    raise SystemExit(run_bench(main))
