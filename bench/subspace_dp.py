"""DP-SGD in a subspace found from public data (PDP-SGD, Zhou et al. 2021): would it let the
federation's record-level DP move the student? Prints JSON.

``bench/dp_gradient_signal.py`` found one round's summed update at about a third of the
noise's norm: DP-SGD noises all 22,112 coordinates of the global group, while most of every
example's gradient sits in a few directions. Projecting each example's gradient onto the
top ``k`` right singular vectors of the *public* users' per-example gradients (the server may
compute them: public data costs no privacy), clipping and noising there, and mapping the
noisy sum back, noises ``k`` coordinates instead: the same Gaussian mechanism at the same
``noise_multiplier`` and clip, so the same epsilon, with a noise norm ``sqrt(D / k)`` times
smaller. Whether that helps depends on the federated users' useful direction lying in the
public users' gradient subspace.

Each round is the ``record-dp-split`` recipe's single step (cohort of federated users, one
clipped gradient per example, Gaussian noise of std ``z * clip`` on the cohort's sum, FedAdam
on the server), the basis recomputed every round at the current model from a fresh sample of
public examples. ``--variants K:CLIP ...``: ``0:30`` is the plain full-space step (the
control), ``64:5`` projects on 64 directions and clips there at 5. ``--group G`` takes the
basis from averages of ``G`` public examples (directions of mean gradients rather than of
single examples). All variants start from the same pretrained student and see the same
cohorts.

    python bench/subspace_dp.py --data-dir ../shared/datasets/ml-100k --variants 0:30 64:5
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling benchmark's helper
from dp_gradient_signal import per_example_gradients

from server.server_optimizer import ServerOptimizer, ServerOptimizerSettings
from shared.federated.local_config import LocalTrainConfig
from shared.federated.local_training import pooled_examples
from shared.models.student import StudentModel
from simulation.pretrain import (
    PretrainedRun,
    add_pretrain_arguments,
    pretrain_from_args,
)
from simulation.provenance import provenance, require_counts, run_bench

REPORTED = ("sampled_hr@10", "full_hr@10")
FULL_SPACE_CLIP = 30.0
"""The federation's record-level clip (the ``record-dp-split`` recipe): the full-space sum
a subspace's ``captured`` fraction is measured against."""


def public_basis(grads: torch.Tensor, k: int, group: int = 1) -> torch.Tensor:
    """``[k, D]`` orthonormal rows: the top ``k`` right singular vectors of the per-example
    gradients ``grads [n, D]`` (of averages of ``group`` consecutive rows when ``group > 1``),
    i.e. the directions that carry most of their second moment."""
    if group > 1:
        usable = len(grads) // group * group
        grads = grads[:usable].reshape(-1, group, grads.shape[1]).mean(dim=1)
    if not 1 <= k <= min(grads.shape):
        raise ValueError(f"k must be in 1..{min(grads.shape)} for gradients {tuple(grads.shape)}")
    # randomized SVD: the exact one of a 2,000 x 22,112 matrix takes seconds every round
    _, _, v = torch.svd_lowrank(grads, q=min(k + 16, *grads.shape), niter=4)
    return v[:, :k].T.contiguous()


def noisy_sum(
    grads: torch.Tensor,
    basis: torch.Tensor | None,
    *,
    clip: float,
    noise_multiplier: float,
    generator: torch.Generator,
) -> tuple[torch.Tensor, dict[str, float]]:
    """The DP release of one round, mapped back to ``[D]``: each example's gradient (projected
    on ``basis`` if given) clipped to ``clip``, summed, plus ``N(0, (noise_multiplier * clip)^2)``
    on every released coordinate. Also the norms of the clipped sum and of the noise, and the
    examples' median norm before clipping, in the released space."""
    released = grads if basis is None else grads @ basis.T
    norms = released.norm(dim=1)
    scale = torch.clamp(clip / norms.clamp_min(1e-12), max=1.0).unsqueeze(1)
    total = (released * scale).sum(dim=0)
    noise = torch.randn(total.shape, generator=generator, dtype=total.dtype)
    noise *= noise_multiplier * clip
    stats = {
        "signal_norm": float(total.norm()),
        "noise_norm": float(noise.norm()),
        "median_example_norm": float(norms.median()),
    }
    out = total + noise
    return (out if basis is None else basis.T @ out), stats


def captured_fraction(grads: torch.Tensor, basis: torch.Tensor, clip: float) -> float:
    """How much of the full-space sum of the examples' gradients, each clipped to ``clip``,
    lies in the span of ``basis``: ``|basis @ g| / |g|`` (1: all of it, 0: none)."""
    scale = torch.clamp(clip / grads.norm(dim=1).clamp_min(1e-12), max=1.0).unsqueeze(1)
    total = (grads * scale).sum(dim=0)
    return float((basis @ total).norm() / total.norm().clamp_min(1e-12))


def _parse_variant(text: str) -> tuple[int, float]:
    k, _, clip = text.partition(":")
    try:
        parsed = int(k), float(clip)
    except ValueError:
        raise argparse.ArgumentTypeError(f"a variant is K:CLIP (e.g. 64:5), got {text!r}") from None
    if parsed[0] < 0 or not parsed[1] > 0:
        raise argparse.ArgumentTypeError(f"K must be >= 0 and CLIP > 0, got {text!r}")
    return parsed


def _row(run: PretrainedRun, model: StudentModel, rnd: int) -> dict[str, Any]:
    row: dict[str, Any] = {"round": rnd}
    for stage in ("valid", "test"):
        metrics = run.evaluate_federated(model, stage)
        row[stage] = {k: metrics[k] for k in REPORTED}
    return row


def run_variant(
    run: PretrainedRun, args: argparse.Namespace, k: int, clip: float
) -> dict[str, Any]:
    """``args.rounds`` rounds of the projected (``k > 0``) or plain DP step from the
    pretrained student; the curve and the first rounds' signal and noise."""
    split = run.split
    model = copy.deepcopy(run.pretrained.student.model)
    model.set_trainable(["global"])
    max_len, per_user = model.config.max_len, LocalTrainConfig().max_examples  # as clients
    federated = {
        int(u): s
        for u, s in zip(
            split.federated_users, split.train_sequences(split.federated_users), strict=True
        )
        if len(s) >= 2
    }
    users = np.array(sorted(federated))
    public = pooled_examples(
        [s for s in split.train_sequences(split.public_users) if len(s) >= 2], max_len, per_user
    )
    params = dict(model.named_parameters())
    names = [n for n in params if model.parameter_group(n) == "global"]
    shapes = [tuple(params[n].shape) for n in names]
    sizes = [params[n].numel() for n in names]
    server = ServerOptimizer(ServerOptimizerSettings("adam", args.server_lr), shapes)
    rng = np.random.default_rng(args.seed)  # same cohorts and public samples in every variant
    noise = torch.Generator().manual_seed(args.seed + 1)

    def flat(data: tuple[torch.Tensor, ...]) -> torch.Tensor:
        grads = per_example_gradients(model, data, 512)
        return torch.cat([grads[n] for n in names], dim=1)

    curve, stats = [_row(run, model, 0)], []
    start = time.perf_counter()
    for rnd in range(1, args.rounds + 1):
        sample = rng.choice(len(public[2]), min(args.public_examples, len(public[2])), False)
        basis = public_basis(flat(tuple(t[sample] for t in public)), k, args.group) if k else None
        cohort = rng.choice(users, min(args.cohort, len(users)), replace=False)
        data = pooled_examples([federated[int(u)] for u in cohort], max_len, per_user)
        grads = flat(data)
        released, round_stats = noisy_sum(
            grads, basis, clip=clip, noise_multiplier=args.noise_multiplier, generator=noise
        )
        if rnd <= 3:
            if basis is not None:  # does the subspace hold the direction of the round's sum?
                round_stats["captured"] = captured_fraction(grads, basis, FULL_SPACE_CLIP)
            stats.append({"round": rnd, **{s: round(v, 3) for s, v in round_stats.items()}})
        gradient = released / len(data[2])
        step = server.step(
            [
                -g.reshape(shape).double().numpy()
                for g, shape in zip(gradient.split(sizes), shapes, strict=True)
            ]
        )
        with torch.no_grad():
            for n, d in zip(names, step, strict=True):
                params[n].add_(torch.from_numpy(d).to(params[n].dtype))
        if rnd % args.every == 0 or rnd == args.rounds:
            row = {**_row(run, model, rnd), "seconds": round(time.perf_counter() - start, 1)}
            curve.append(row)
            print(json.dumps({"k": k, "clip": clip, **row}), file=sys.stderr, flush=True)
    return {
        "k": k,
        "clip": clip,
        "released_coordinates": k or sum(sizes),
        "first_rounds": stats,
        "curve": curve,
        "best_by_validation": max(curve, key=lambda r: float(r["valid"]["sampled_hr@10"])),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_pretrain_arguments(parser, dataset="ml-100k")
    parser.add_argument(
        "--variants", nargs="+", type=_parse_variant, default=[(0, 30.0), (64, 5.0)]
    )
    parser.add_argument("--rounds", type=int, default=100)
    parser.add_argument("--cohort", type=int, default=50)
    parser.add_argument("--every", type=int, default=20, help="evaluate every N rounds")
    parser.add_argument("--noise-multiplier", type=float, default=3.0)
    parser.add_argument("--server-lr", type=float, default=0.001)
    parser.add_argument("--public-examples", type=int, default=2000, help="per basis")
    parser.add_argument("--group", type=int, default=1, help="public examples per average")
    args = parser.parse_args()
    require_counts(parser, args, "rounds", "cohort", "every", "public_examples", "group")
    if not (args.noise_multiplier > 0 and args.server_lr > 0):
        parser.error("--noise-multiplier and --server-lr must be > 0")

    torch.set_num_threads(1)
    torch.manual_seed(args.seed)
    start = time.perf_counter()
    run = pretrain_from_args(args)
    variants = [run_variant(run, args, k, clip) for k, clip in args.variants]
    out = {
        "what": "one DP-SGD step per round on the federated users' examples, in the full space "
        "or projected on the top-k directions of public users' per-example gradients "
        "(same noise multiplier and clip: same epsilon); FedAdam",
        "settings": {**vars(args), "variants": [f"{k}:{c:g}" for k, c in args.variants]},
        "variants": variants,
        "pretraining_cached": run.pretrained.cached,
        "seconds": round(time.perf_counter() - start, 1),
        **provenance("bench/subspace_dp.py"),
    }
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    raise SystemExit(run_bench(main))
