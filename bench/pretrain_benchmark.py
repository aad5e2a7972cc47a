"""Issue 3's benchmark: EASE (public users only / all), text-only, teacher, student fp32 and
the int8 ONNX student, side by side on one protocol split; parameter counts, file sizes (the
teacher counted with its language model) and one-thread full-catalog latency. Prints JSON.

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
from shared.compression.quantize import top_k_agreement
from shared.eval.protocol import EvalConfig, evaluate_split
from shared.models.baselines import EASE, TextOnly
from shared.ondevice.runtime import OnDeviceModel
from shared.text.encoder import EncoderConfig, ItemEncoder
from shared.training.trainer import count_parameters
from simulation.pretrain import add_pretrain_arguments, pretrain_from_args


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
    parser.add_argument("--teacher-epochs", type=int, default=200)
    parser.add_argument("--student-epochs", type=int, default=100)
    parser.add_argument("--latency-calls", type=int, default=2000)
    args = parser.parse_args()

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
    with tempfile.TemporaryDirectory() as tmp:
        artifact = publish_student(
            pre.student.model, ds.item_ids, Path(tmp) / "student.onnx", version="0"
        )
        int8 = OnDeviceModel(artifact.path)
        models["student int8 onnx"] = int8
        for name, model in models.items():
            results[name] = evaluate_split(model, split, pops, "test", cfg)
        users = split.evaluable(split.population("all"))
        hist = [split.history(int(u)) for u in users]
        agreement = top_k_agreement(pre.student.score(hist), int8.score(hist), k=10)
        longest = max(hist, key=len)[-pre.student.config.max_len :]
        latency = _latency(OnDeviceModel(artifact.path), longest, args.latency_calls)

    lm_dir = ItemEncoder(EncoderConfig(show_progress=False)).model_dir
    lm_bytes = sum(p.stat().st_size for p in Path(lm_dir).rglob("*") if p.is_file())
    teacher_trainable = count_parameters(
        p for p in pre.teacher.model.parameters() if p.requires_grad
    )
    student_model = pre.student.model
    out: dict[str, Any] = {
        "dataset": ds.summary(),
        "split": {"public": len(split.public_users), "federated": len(split.federated_users)},
        "results": results,
        "teacher_order": {  # how the teacher reads histories, chosen on public validation
            "chosen": pre.teacher.fitted_order,
            "validation_" + pre.teacher.config.metric: pre.teacher.order_scores,
        },
        "parameters": {
            "teacher_trainable": teacher_trainable,
            "student_trainable": student_model.num_parameters(("global", "personal")),
            "student_global": student_model.num_parameters(("global",)),
            "student_personal": student_model.num_parameters(("personal",)),
            "student_frozen": student_model.num_parameters(("frozen",)),
            "student_over_teacher": student_model.num_parameters(("global", "personal"))
            / teacher_trainable,
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
        "command": "python bench/pretrain_benchmark.py "
        + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if v is not None),
    }
    out["int8_over_teacher_size"] = (
        out["sizes_bytes"]["student_int8_onnx"] / out["sizes_bytes"]["teacher_with_lm"]
    )
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
