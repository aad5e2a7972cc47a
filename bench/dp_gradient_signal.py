"""Where a federated client's DP-SGD clipping budget goes, tensor by tensor. Prints JSON.

For the pretrained student's global group and the federated users' own training examples
(what :func:`shared.federated.local_training.train_global_dp` computes, the window's items
out of the softmax), it measures every example's gradient with Opacus' per-sample hooks and
reports, per parameter tensor: its share of the squared per-example norm, its per-example
norm (median, 90th percentile), and the signal-to-noise ratio of one round's summed update
at the federation's recipe. That ratio is the RMS over the tensor's coordinates of
``|sum of the round's clipped gradients| / (noise_multiplier * max_grad_norm)``, the sum taken
as ``examples_per_round`` times the mean clipped gradient; 1 means signal as large as the noise.

It answers "which layers can DP fine-tuning move at all?": on ml-100k the two output heads
hold about 93% of every example's gradient norm, every example is clipped at the default
``max-grad-norm``, and the pooling layers (positions, query, key) get a ratio of 0.02 to 0.03
(against the heads' 0.6 to 0.7; ``bench/results/dp-gradient-signal-ml-100k.json``),
while central fine-tuning owes much of its gain to them (``federation_ceiling.py --modes``).

    python bench/dp_gradient_signal.py --data-dir ../shared/datasets/ml-100k
"""

from __future__ import annotations

import argparse
import copy
import json
import time
import warnings
from typing import Any

import numpy as np
import torch

from shared.federated.local_config import LocalTrainConfig
from shared.federated.local_training import pooled_examples
from shared.models.sequence import next_item_cross_entropy
from simulation.pretrain import add_pretrain_arguments, pretrain_from_args
from simulation.provenance import provenance, require_counts, run_bench


def per_example_gradients(
    model: torch.nn.Module, data: tuple[torch.Tensor, ...], batch_size: int
) -> dict[str, torch.Tensor]:
    """``name -> [n_examples, n_scalars]`` gradients of each example's next-item loss with
    respect to the trainable parameters (Opacus' hooks, as DP-SGD computes them)."""
    from opacus import GradSampleModule

    wrapped = GradSampleModule(copy.deepcopy(model), loss_reduction="sum")
    wrapped.train()  # Opacus records activations in training mode only
    for module in wrapped.modules():
        if isinstance(module, torch.nn.Dropout):
            module.eval()  # no dropout: the gradient of the model as it is
    names = [n for n, p in wrapped.named_parameters() if p.requires_grad]
    params = dict(wrapped.named_parameters())
    parts: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    items, mask, targets = data
    for start in range(0, len(targets), batch_size):
        batch = slice(start, start + batch_size)
        wrapped.zero_grad(set_to_none=True)
        logits = wrapped(items[batch], mask[batch])
        loss = next_item_cross_entropy(logits, items[batch], mask[batch], targets[batch])
        with warnings.catch_warnings():  # the item ids need no gradient: hooks fire on outputs
            warnings.filterwarnings("ignore", message="Full backward hook is firing")
            (loss * len(targets[batch])).backward()
        for n in names:
            sample = params[n].grad_sample
            assert sample is not None
            parts[n].append(sample.detach().reshape(sample.shape[0], -1).clone())
            params[n].grad_sample = None
    return {n.removeprefix("_module."): torch.cat(parts[n]) for n in names}


def signal_report(
    grads: dict[str, torch.Tensor],
    *,
    max_grad_norm: float,
    noise_multiplier: float,
    examples_per_round: float,
) -> dict[str, Any]:
    """Per-tensor norms, shares and round signal-to-noise of per-example ``grads``."""
    flat = torch.cat(list(grads.values()), dim=1)
    norms = flat.norm(dim=1)
    scale = torch.clamp(max_grad_norm / norms.clamp_min(1e-12), max=1.0).unsqueeze(1)
    squared = (flat**2).sum(dim=1).clamp_min(1e-24)
    noise = noise_multiplier * max_grad_norm
    tensors: dict[str, Any] = {}
    for name, g in grads.items():
        mean_clipped = (g * scale).mean(dim=0)
        own = g.norm(dim=1)
        tensors[name] = {
            "scalars": g.shape[1],
            "norm_share": round(float(((g**2).sum(dim=1) / squared).mean()), 4),
            "norm_median": round(float(own.median()), 4),
            "norm_p90": round(float(torch.quantile(own, 0.9)), 4),
            "round_snr": round(
                float(examples_per_round * mean_clipped.norm() / (noise * g.shape[1] ** 0.5)), 4
            ),
        }
    total_signal = examples_per_round * (flat * scale).mean(dim=0).norm()
    return {
        "examples": int(flat.shape[0]),
        "norm_quantiles": {
            str(q): round(float(torch.quantile(norms, q)), 3) for q in (0.1, 0.5, 0.9)
        },
        "clipped_fraction": round(float((norms > max_grad_norm).float().mean()), 4),
        "round_signal_norm": round(float(total_signal), 1),
        "round_noise_norm": round(noise * flat.shape[1] ** 0.5, 1),
        "tensors": tensors,
    }


def main() -> None:
    defaults = LocalTrainConfig()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_pretrain_arguments(parser, dataset="ml-100k")
    parser.add_argument("--users", type=int, default=120, help="federated users sampled")
    parser.add_argument("--cohort", type=int, default=50, help="clients per round")
    # the record-dp-split recipe of bench/federation_benchmark.py
    parser.add_argument("--noise-multiplier", type=float, default=3.0)
    parser.add_argument("--max-grad-norm", type=float, default=30.0)
    parser.add_argument("--batch-size", type=int, default=256, help="examples per backward")
    args = parser.parse_args()
    require_counts(parser, args, "users", "cohort", "batch_size")
    if not (args.noise_multiplier > 0 and args.max_grad_norm > 0):
        parser.error("--noise-multiplier and --max-grad-norm must be > 0")

    torch.set_num_threads(1)
    start = time.perf_counter()
    run = pretrain_from_args(args)
    model = run.pretrained.student.model
    model.set_trainable(["global"])
    split = run.split
    sequences = [s for s in split.train_sequences(split.federated_users) if len(s) >= 2]
    rng = np.random.default_rng(args.seed)
    picked = rng.choice(len(sequences), min(args.users, len(sequences)), replace=False)
    data = pooled_examples(
        [sequences[i] for i in picked], model.config.max_len, defaults.max_examples
    )
    per_user = len(data[2]) / len(picked)
    grads = per_example_gradients(model, data, args.batch_size)
    out = {
        "what": "per-example gradients of the pretrained student's global group on federated "
        "users' examples: where the clipping budget goes and each tensor's round SNR",
        "settings": vars(args),
        "examples_per_user": round(per_user, 1),
        "examples_per_round": round(per_user * args.cohort, 1),
        **signal_report(
            grads,
            max_grad_norm=args.max_grad_norm,
            noise_multiplier=args.noise_multiplier,
            examples_per_round=per_user * args.cohort,
        ),
        "pretraining_cached": run.pretrained.cached,
        "seconds": round(time.perf_counter() - start, 1),
        **provenance("bench/dp_gradient_signal.py"),
    }
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    raise SystemExit(run_bench(main))
