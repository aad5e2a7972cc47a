"""Teacher and student quality on the protocol split, next to EASE; prints JSON.

Fits, on one protocol split (seed 42, 10% cold users, 20% of the rest public):

* ``ease_public``: EASE (lambda 250) on the public users' train data only (what the server
  could do without the federation; the bar the teacher must clear);
* ``ease_all``: EASE on every non-cold user's train data (the protocol's central baseline,
  which a real deployment cannot train: it needs the federated users' data);
* ``teacher``: SASRec-style teacher on the public users, early-stopped on their validation item;
* ``student``: distilled from the teacher on the public users.

and reports HR@10 / NDCG@10 (sampled and full) at the test stage (history = train + valid)
for the public and the federated users, parameter counts and train times.

Usage::

    python bench/teacher_student_quality.py [--data-dir /work/shared/datasets/ml-100k]
        [--threads 2] [--output bench/results/teacher_student_quality.json] [--progress]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from shared.data.dataset import RecDataset
from shared.eval.protocol import EvalConfig, evaluate_split
from shared.eval.splits import SplitConfig, split_users
from shared.models.baselines import EASE
from shared.models.student import DistilledStudent, StudentConfig
from shared.models.teacher import SASRecTeacher, TeacherConfig
from shared.training.trainer import Validation

DEFAULT_DATA_DIR = "/work/shared/datasets/ml-100k"
METRICS = ("sampled_hr@10", "sampled_ndcg@10", "full_hr@10", "full_ndcg@10")


def load(data_dir: str) -> RecDataset:
    """MovieLens 100K through the registry (the project's loader)."""
    from shared.data.registry import load_dataset

    return load_dataset("ml-100k", data_dir, download=False)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data-dir", default=DEFAULT_DATA_DIR)
    parser.add_argument("--seed", type=int, default=42, help="split seed")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    parser.add_argument("--output", type=Path, default=None, help="also write the JSON here")
    parser.add_argument("--progress", action="store_true", help="show progress bars")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)

    dataset = load(args.data_dir)
    from shared.text.encoder import encode_items

    start = time.perf_counter()
    text = encode_items(dataset.item_text)
    text_seconds = time.perf_counter() - start

    split = split_users(dataset, SplitConfig(seed=args.seed))
    public = split.train_sequences(split.public_users)
    eval_config = EvalConfig()
    validation = Validation(split, ("public",), eval_config)
    results: dict[str, Any] = {}

    def record(name: str, model: Any, seconds: float, params: dict[str, int]) -> None:
        metrics = evaluate_split(model, split, ("public", "federated"), "test", eval_config)
        results[name] = {"train_seconds": round(seconds, 2), "parameters": params, **metrics}

    for name, sequences in (("ease_public", public), ("ease_all", split.train_sequences())):
        start = time.perf_counter()
        ease = EASE(250.0).fit(sequences, dataset.n_items)
        record(name, ease, time.perf_counter() - start, {"weights": int(ease.weights.size)})

    teacher_config = TeacherConfig()
    start = time.perf_counter()
    teacher = SASRecTeacher(text, teacher_config, progress=args.progress)
    teacher.fit(public, dataset.n_items, validation)
    teacher_params = teacher.num_trainable_parameters()
    record("teacher", teacher, time.perf_counter() - start, {"trainable": teacher_params})
    results["teacher"]["best_epoch"] = teacher.history.best_epoch
    results["teacher"]["epochs_run"] = len(teacher.history.losses)

    student_config = StudentConfig()
    start = time.perf_counter()
    student = DistilledStudent(teacher, student_config, progress=args.progress)
    student.fit(public, dataset.n_items, validation)
    model = student.model
    student_params = {
        "trainable": model.num_parameters(("global", "personal")),
        "global": model.num_parameters(("global",)),
        "personal": model.num_parameters(("personal",)),
        "frozen": model.num_parameters(("frozen",)),
    }
    record("student", student, time.perf_counter() - start, student_params)
    results["student"]["best_epoch"] = student.history.best_epoch
    results["student"]["epochs_run"] = len(student.history.losses)

    checks: dict[str, Any] = {
        "student_trainable_over_teacher": round(student_params["trainable"] / teacher_params, 4),
    }
    for population in ("public", "federated"):
        for metric in METRICS:
            t = results["teacher"][population][metric]
            checks[f"teacher_minus_ease_public/{population}/{metric}"] = round(
                t - results["ease_public"][population][metric], 4
            )
            checks[f"student_minus_teacher/{population}/{metric}"] = round(
                results["student"][population][metric] - t, 4
            )
    report = {
        "dataset": dataset.name,
        "items": dataset.n_items,
        "users": {
            "public": len(split.public_users),
            "federated": len(split.federated_users),
            "cold": len(split.cold_users),
        },
        "split_seed": args.seed,
        "threads": args.threads,
        "text_encoding_seconds": round(text_seconds, 2),
        "models": results,
        "checks": checks,
        "teacher_config": dataclasses.asdict(teacher_config),
        "student_config": dataclasses.asdict(student_config),
    }
    text_out = json.dumps(report, indent=2, default=_jsonable)
    print(text_out)
    if args.output is not None:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(text_out + "\n")
    return report


def _jsonable(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


if __name__ == "__main__":
    main(sys.argv[1:])
