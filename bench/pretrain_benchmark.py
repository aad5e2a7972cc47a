"""Issue 3's benchmark: EASE (public users only / all), text-only, teacher, student fp32 and
the int8 ONNX student, side by side on one protocol split; parameter counts, file sizes (the
teacher counted with its language model), one-thread full-catalog latency, and paired
differences (95% bootstrap intervals over users) behind each "A beats B" claim. Prints JSON.

    python bench/pretrain_benchmark.py --dataset ml-100k --data-dir ../shared/datasets/ml-100k
    python bench/pretrain_benchmark.py --dataset synthetic
"""

from __future__ import annotations

import argparse
import io
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from shared.compression.artifact import publish_student
from shared.compression.prune import publish_prune
from shared.compression.quantize import top_k_agreement
from shared.errors import ConfigError
from shared.eval.compare import compare_pairs
from shared.eval.protocol import CaseRanks, EvalConfig, split_ranks, summarize_each
from shared.models.baselines import EASE, TextOnly
from shared.models.epochs import STUDENT_EPOCHS, TEACHER_EPOCHS
from shared.ondevice.runtime import MIN_LATENCY_CALLS, OnDeviceModel
from shared.text.encoder import EncoderConfig, ItemEncoder
from shared.training.trainer import count_parameters
from simulation.pretrain import add_pretrain_arguments, pretrain_from_args
from simulation.provenance import provenance, run_bench


def _latency(model: OnDeviceModel, history: np.ndarray, calls: int) -> dict[str, float]:
    for _ in range(50):
        model.score([history])
    times = []
    for _ in range(calls):
        t = time.perf_counter()
        model.score([history])
        times.append(time.perf_counter() - t)
    ms = np.array(times) * 1e3
    return {"p50_ms": float(np.percentile(ms, 50)), "p99_ms": float(np.percentile(ms, 99))}


def _state_bytes(module: torch.nn.Module) -> int:
    buf = io.BytesIO()
    torch.save(module.state_dict(), buf)
    return buf.tell()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_pretrain_arguments(parser, dataset="synthetic")
    parser.add_argument("--teacher-epochs", type=int, default=TEACHER_EPOCHS)
    parser.add_argument("--student-epochs", type=int, default=STUDENT_EPOCHS)
    parser.add_argument("--latency-calls", type=int, default=2000)
    parser.add_argument(
        "--prune-sparsity",
        type=float,
        default=0.0,
        help="magnitude-prune every weight matrix the int8 artifact executes (pooling layers, "
        "positions, folded item tables) to this fraction of zeros before export (default 0)",
    )
    args = parser.parse_args()
    try:
        prune = publish_prune(args.prune_sparsity)  # as `prune-sparsity` prunes a published one
    except ConfigError as err:
        parser.error(str(err))
    if args.latency_calls < MIN_LATENCY_CALLS:
        parser.error(
            f"--latency-calls must be >= {MIN_LATENCY_CALLS} for a stable p99, "
            f"got {args.latency_calls}"
        )

    torch.set_num_threads(2)
    run = pretrain_from_args(
        args, teacher_epochs=args.teacher_epochs, student_epochs=args.student_epochs
    )
    ds, split, text, pre = run.dataset, run.split, run.text, run.pretrained
    pops = ("public", "federated")
    cfg = EvalConfig(seed=args.seed)
    results: dict[str, Any] = {}
    models: dict[str, Any] = {
        "ease (public users)": EASE().fit(split.train_sequences(split.public_users), ds.n_items),
        "ease (all users)": EASE().fit(split.train_sequences(), ds.n_items),
        "text-only": TextOnly(text).fit([], ds.n_items),
        "teacher": pre.teacher,
        "student fp32": pre.student,
    }
    if pre.teacher.config.members > 1:  # what averaging members adds over the first alone
        models["teacher (first member alone)"] = pre.teacher.member_scorer(0)
    if pre.teacher.prior_weight:  # what the item-item prior adds to self-attention
        models["teacher (attention only)"] = pre.teacher.attention_scorer()
    with tempfile.TemporaryDirectory() as tmp:
        artifact = publish_student(
            pre.student.model, ds.item_ids, Path(tmp) / "student.onnx", version="0", prune=prune
        )
        int8 = OnDeviceModel(artifact.path)
        models["student int8 onnx"] = int8
        ranks: dict[str, dict[str, CaseRanks]] = {}
        for name, model in models.items():
            ranks[name] = split_ranks(model, split, pops, "test", cfg)
            results[name] = summarize_each(ranks[name], cfg.k)
        users = split.evaluable(split.population("all"))
        hist = [split.history(int(u)) for u in users]
        agreement = top_k_agreement(pre.student.score(hist), int8.score(hist), k=10)
        longest = max(hist, key=len)[-pre.student.config.max_len :]
        latency = _latency(OnDeviceModel(artifact.path), longest, args.latency_calls)

    lm_dir = ItemEncoder(EncoderConfig(model_path=args.text_model or None)).model_dir
    lm_bytes = sum(p.stat().st_size for p in Path(lm_dir).rglob("*") if p.is_file())
    teacher_trainable = count_parameters(
        p for p in pre.teacher.model.parameters() if p.requires_grad
    )
    member_trainable = count_parameters(
        p for p in pre.teacher.model.first.parameters() if p.requires_grad
    )
    # "A beats B" claims, paired on the same users, with 95% bootstrap intervals over users
    pairs = [
        ("teacher", "ease (public users)"),
        ("student int8 onnx", "teacher"),
        ("student int8 onnx", "ease (public users)"),
    ]
    if "teacher (first member alone)" in ranks:
        pairs.append(("teacher", "teacher (first member alone)"))
    if "teacher (attention only)" in ranks:
        pairs.append(("teacher", "teacher (attention only)"))
        pairs.append(("teacher (attention only)", "ease (public users)"))
    by_pop = compare_pairs({pop: {n: r[pop] for n, r in ranks.items()} for pop in pops}, pairs)
    comparisons = {  # keyed pair first, then population, as in the committed results
        f"{a} - {b}": {pop: rows[f"{a} - {b}"] for pop, rows in by_pop.items()} for a, b in pairs
    }
    student_model = pre.student.model
    out: dict[str, Any] = {
        "dataset": ds.summary(),
        "split": {"public": len(split.public_users), "federated": len(split.federated_users)},
        "results": results,
        "paired_differences_hr@10": comparisons,
        "teacher_members": {  # independently seeded teachers whose log-probabilities are averaged
            "count": pre.teacher.config.members,
            "validation_" + pre.teacher.config.metric: pre.teacher.member_scores,
        },
        "teacher_prior": {  # the item-item term's weight, chosen on public validation
            "weight": pre.teacher.prior_weight,
            "validation_" + pre.teacher.config.metric: {
                str(w): v for w, v in pre.teacher.prior_scores.items()
            },
        },
        "teacher_order": {  # how the teacher reads histories, chosen on public validation
            "chosen": pre.teacher.fitted_order,
            "dim": pre.teacher.fitted_config.dim,
            "max_len": pre.teacher.fitted_config.max_len,
            "validation_" + pre.teacher.config.metric: pre.teacher.order_scores,
        },
        "parameters": {
            "teacher_trainable": teacher_trainable,
            "teacher_member_trainable": member_trainable,
            "student_trainable": student_model.num_parameters(("global", "personal")),
            "student_global": student_model.num_parameters(("global",)),
            "student_personal": student_model.num_parameters(("personal",)),
            "student_frozen": student_model.num_parameters(("frozen",)),
            "student_over_teacher": student_model.num_parameters(("global", "personal"))
            / teacher_trainable,
            "student_over_teacher_member": student_model.num_parameters(("global", "personal"))
            / member_trainable,
        },
        "sizes_bytes": {
            "teacher_state": _state_bytes(pre.teacher.model),
            "language_model": lm_bytes,
            "teacher_with_lm": _state_bytes(pre.teacher.model) + lm_bytes,
            "student_fp32_onnx": artifact.fp32_bytes,
            "student_int8_onnx": artifact.int8_bytes,
        },
        "int8_vs_fp32_top10_agreement": agreement,
        "latency_full_catalog_one_thread": latency,
        "pretraining_seconds": round(pre.seconds, 1),
        "pretraining_cached": pre.cached,
        **provenance("bench/pretrain_benchmark.py"),
    }
    out["pruning"] = {"requested": args.prune_sparsity, "achieved": artifact.sparsity}
    out["int8_over_teacher_size"] = (
        out["sizes_bytes"]["student_int8_onnx"] / out["sizes_bytes"]["teacher_with_lm"]
    )
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    raise SystemExit(run_bench(main))
