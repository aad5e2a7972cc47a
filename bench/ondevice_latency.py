"""On-device benchmark: artifact sizes, int8 fidelity and one-user full-catalog latency.

Usage (from the repo root)::

    python bench/ondevice_latency.py                      # stand-in student, 1682 items, d=64
    python bench/ondevice_latency.py --model student.onnx # an exported fp32 (or int8) student
    python bench/ondevice_latency.py --n-items 20000 --out latency-20k.json  # a larger catalog

Prints one JSON object: fp32/int8 file sizes (raw and gzip-9), top-10 agreement of each int8
variant with the fp32 model, and p50/p99 latency of ``OnDeviceModel.score([history])`` (one
thread, pre-allocated buffers) over ``--calls`` calls after ``--warmup`` calls. Timing is
wall-clock of the full Python call, i.e. what a client pays.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import platform
import sys
import tempfile
import time
from dataclasses import replace
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from shared.compression.onnx_export import export_onnx
from shared.compression.quantize import (
    QuantizeConfig,
    quantize_onnx,
    random_histories,
    top_k_agreement,
)
from shared.errors import ModelFileError
from shared.io import write_json_atomic
from shared.ondevice.runtime import MIN_LATENCY_CALLS, OnDeviceModel, RuntimeConfig
from simulation.provenance import provenance, require_counts, run_bench


class StandInStudent(nn.Module):
    """Student-shaped stand-in: embed -> additive attention pooling -> LayerNorm -> table.

    The item table is clustered (items = cluster centre + noise) so top-10 lists are
    meaningful and int8 fidelity is measured on a ranking with real structure. The input
    embedding is tied to the output item table, as a distilled student typically is.
    """

    def __init__(
        self,
        n_items: int = 1682,
        dim: int = 64,
        max_len: int = 50,
        n_clusters: int = 24,
        noise: float = 0.35,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.n_items = n_items
        self.max_len = max_len
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            centers = torch.randn(n_clusters, dim)
            table = centers[torch.randint(0, n_clusters, (n_items,))]
            table = table + noise * torch.randn(n_items, dim)
            self.item_emb = nn.Embedding(n_items, dim)
            self.pos = nn.Parameter(0.02 * torch.randn(max_len, dim))
            self.att_hidden = nn.Linear(dim, dim)
            self.att_score = nn.Linear(dim, 1)
            self.proj = nn.Linear(dim, dim)
            self.norm = nn.LayerNorm(dim)
            with torch.no_grad():
                self.item_emb.weight.copy_(table)
                self.proj.weight.copy_(torch.eye(dim) + 0.05 * torch.randn(dim, dim))
        self.item_table = self.item_emb.weight

    def precompute_item_table(self) -> None:
        """No-op here (the table is a parameter); the real student builds it from features."""

    def forward(self, items: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = self.item_emb(items) + self.pos[-items.shape[1] :]
        logits = self.att_score(torch.tanh(self.att_hidden(x))).squeeze(-1)
        weights = torch.softmax(logits.masked_fill(~mask, -1e4), dim=-1) * mask
        h = self.norm(self.proj((weights.unsqueeze(-1) * x).sum(dim=1)))
        return h @ self.item_table.T


def latency_ms(
    model: OnDeviceModel, history: np.ndarray, calls: int, warmup: int
) -> dict[str, float]:
    """p50/p99/mean of one-user ``score`` in milliseconds."""
    for _ in range(warmup):
        model.score([history])
    times = np.empty(calls)
    clock = time.perf_counter_ns
    for i in range(calls):
        t0 = clock()
        model.score([history])
        times[i] = clock() - t0
    times /= 1e6
    return {
        "p50_ms": round(float(np.percentile(times, 50)), 4),
        "p99_ms": round(float(np.percentile(times, 99)), 4),
        "mean_ms": round(float(times.mean()), 4),
    }


def file_sizes(path: Path) -> dict[str, int]:
    data = path.read_bytes()
    return {"bytes": len(data), "gzip_bytes": len(gzip.compress(data, 9))}


def run(args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="fedrec-bench-") as tmp:
        return _run(args, Path(tmp))


def _run(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    result: dict[str, Any] = {
        "onnxruntime": metadata.version("onnxruntime"),
        "torch": torch.__version__,
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "threads": args.threads,
        "calls": args.calls,
        "warmup": args.warmup,
    }
    torch_model: StandInStudent | None = None
    if args.model:
        fp32 = Path(args.model)  # may also be an int8 file: then only it is measured
        result["model"] = str(fp32)
    else:
        torch_model = StandInStudent(args.n_items, args.dim, args.max_len, seed=args.seed)
        fp32 = tmp / "student_fp32.onnx"
        export_onnx(torch_model, fp32, model_version="bench-standin", catalog_fingerprint="bench")
        result["model"] = f"stand-in (n_items={args.n_items}, d={args.dim}, max_len={args.max_len})"
    cfg = RuntimeConfig(intra_op_num_threads=args.threads)
    ref = OnDeviceModel(fp32, config=cfg)
    n_items, max_len = ref.n_items, ref.max_len
    result.update({"n_items": n_items, "max_len": max_len, "history_len": args.history_len})
    histories = random_histories(n_items, max_len, args.n_validation, seed=args.seed + 1)
    ref_scores = ref.score(histories)
    is_fp32 = ref.metadata.quantization == "none"
    variants: dict[str, Path] = {"fp32" if is_fp32 else ref.metadata.quantization: fp32}
    reports: dict[str, dict[str, object]] = {}
    if is_fp32:
        configs: dict[str, QuantizeConfig] = {
            # the shipped default: weight-only int8, gated at top-10 agreement >= 0.97
            "weight_int8": QuantizeConfig(),
            # ORT quantize_dynamic, ungated (for comparison; it usually fails the gate)
            "dynamic_int8": QuantizeConfig(method="dynamic_int8", min_agreement=None),
        }
        for name, qcfg in configs.items():
            out = tmp / f"student_{name}.onnx"
            gate: dict[str, object] = {}
            try:
                report = quantize_onnx(fp32, out, config=qcfg)
            except ModelFileError as exc:  # gate failed: still measure, and say so
                gate = {"gate_failed": str(exc)}
                report = quantize_onnx(fp32, out, config=replace(qcfg, min_agreement=None))
            variants[name] = out
            reports[name] = {
                **gate,
                "min_elements": report.min_elements,
                "attempts": [list(a) for a in report.attempts],
                "n_quantized": len(report.quantized),
            }
    rng = np.random.default_rng(args.seed)
    history = rng.choice(n_items, size=min(args.history_len, n_items), replace=False)
    if torch_model is not None:
        items = np.stack(
            [np.pad(h[-max_len:], (max_len - len(h[-max_len:]), 0)) for h in histories]
        )
        mask = np.stack([np.arange(max_len) >= max_len - len(h[-max_len:]) for h in histories])
        with torch.no_grad():
            torch_scores = torch_model(torch.from_numpy(items), torch.from_numpy(mask)).numpy()
    for name, path in variants.items():
        model = OnDeviceModel(path, config=cfg)
        scores = model.score(histories)
        entry: dict[str, Any] = {**file_sizes(path), **reports.get(name, {})}
        if is_fp32:
            entry["top10_agreement_vs_fp32_onnx"] = round(
                top_k_agreement(ref_scores, scores, 10), 4
            )
        if torch_model is not None:
            entry["top10_agreement_vs_torch"] = round(top_k_agreement(torch_scores, scores, 10), 4)
        entry.update(latency_ms(model, history, args.calls, args.warmup))
        result[name] = entry
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="exported student .onnx (default: a stand-in)")
    parser.add_argument("--n-items", type=int, default=1682)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--max-len", type=int, default=50)
    parser.add_argument("--history-len", type=int, default=50)
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--warmup", type=int, default=200)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--n-validation", type=int, default=512)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", help="also write the JSON here (atomically)")
    args = parser.parse_args(argv)
    if args.calls < MIN_LATENCY_CALLS:
        parser.error(f"--calls must be >= {MIN_LATENCY_CALLS} for a stable p99, got {args.calls}")
    require_counts(
        parser, args, "n_items", "dim", "max_len", "history_len", "n_validation", "threads"
    )
    result = {**run(args), **provenance("bench/ondevice_latency.py", argv)}
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        write_json_atomic(args.out, result)


if __name__ == "__main__":
    raise SystemExit(run_bench(main))
