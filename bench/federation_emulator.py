"""The federation's optimisation without Flower: for tuning rounds, rates and server optimisers
in minutes instead of a full benchmark run. Prints JSON.

Each round samples a cohort of federated users, runs the client's own local step
(:func:`shared.federated.local_training.train_global_dp`: Opacus DP-SGD on the student's global
group, or clipped SGD without DP) from the current global parameters, averages the deltas
with equal weights (what SecAgg+ releases) and applies the server's own optimiser
(:class:`server.server_optimizer.ServerOptimizer`) to the mean delta: ``avg`` (FedAvg,
``server-lr`` 1 is plain averaging) or ``adam`` (FedAdam, Reddi et al. 2021).
``--noise-shares m`` runs the clients' distributed-noise step (one gradient per round with
1/m of the noise variance; the cohort's sum carries all of it), charged in the ledgers as
the real client charges it. No secure aggregation and no budget: every sampled
client trains. Under record-level DP each client's runs go into a
:class:`~shared.privacy.ledger.PrivacyLedger` as the real client records them, and the output
reports the largest epsilon any client reached and how many clients passed
``--epsilon-budget`` (the real system would have had them decline). Validation and test
(federated users, protocol metrics) every ``--every`` rounds.

``--user-dp`` emulates user-level DP-FedAvg instead, with the server's own mechanism
(:class:`server.user_dp.UserLevelDP`): clients train without record-level noise, clip their
whole update to ``--user-dp-clip`` (:func:`shared.federated.validation.clip_update_l2`, as
``client/client_app.py`` does), the cohort is a Poisson sample (each user with chance
``q = m / N``, :meth:`~server.user_dp.UserLevelDP.sample_cohort`), and the server adds
``N(0, (z C / m)^2)`` to the sum over ``m`` and charges one step at ``q`` per round. Each
evaluated row then carries the user-level epsilon so far, and the output the clients'
median update norm before clipping (to size the clip). The cohorts and the noise are
seeded here, unlike in the server.

``--ema D ...`` also evaluates exponential moving averages of the global parameters over
rounds (decay ``D``), which a server could publish instead of the last round's model: an
average of the iterates cancels part of the DP noise, at no privacy cost.

    python bench/federation_emulator.py --data-dir ../shared/datasets/ml-100k --rounds 20

It answers "would this recipe move the model?"; the benchmark answers "what does the real
system give?". The two agree on the default recipe: 20 rounds leave the pretrained student
where it was (``bench/results/federation-ml-100k.json``).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from dataclasses import replace
from typing import Any

import numpy as np
import torch

from server.server_optimizer import SERVER_OPTIMIZERS, ServerOptimizer, ServerOptimizerSettings
from server.user_dp import UserDPSettings, UserLevelDP
from shared.errors import ConfigError
from shared.federated.local_config import LocalTrainConfig
from shared.federated.local_training import replay_dp_randomness, train_global_dp
from shared.federated.validation import clip_update_l2
from shared.privacy.ledger import PrivacyBudget, PrivacyLedger
from simulation.config import SimulationConfig
from simulation.pretrain import PretrainedRun, add_pretrain_arguments, pretrain_from_args
from simulation.provenance import provenance, require_counts, run_bench

REPORTED = ("sampled_hr@10", "full_hr@10")


def _row(run: PretrainedRun, rnd: int) -> dict[str, Any]:
    """The reported validation and test metrics of the current global model (trained in
    place) after round ``rnd``."""
    row: dict[str, Any] = {"round": rnd}
    for stage in ("valid", "test"):
        metrics = run.evaluate_federated(run.pretrained.student.model, stage)
        row[stage] = {k: metrics[k] for k in REPORTED}
    return row


def _average_rows(
    run: PretrainedRun,
    rnd: int,
    params: dict[str, torch.nn.Parameter],
    averages: dict[float, dict[str, torch.Tensor]],
) -> dict[str, Any]:
    """:func:`_row` of each moving average of the global parameters (decay -> row), the
    current parameters restored afterwards."""
    current = {n: params[n].detach().clone() for n in next(iter(averages.values()))}
    rows: dict[str, Any] = {}
    try:
        for decay, average in averages.items():
            with torch.no_grad():
                for n, value in average.items():
                    params[n].copy_(value)
            rows[str(decay)] = {k: v for k, v in _row(run, rnd).items() if k != "round"}
    finally:
        with torch.no_grad():
            for n, value in current.items():
                params[n].copy_(value)
    return rows


def _privacy(ledgers: dict[int, PrivacyLedger], budget: PrivacyBudget) -> dict[str, Any]:
    """Record-level privacy spent per client: the largest epsilon, and how many clients went
    past the budget (in the real system they decline once it would be exceeded)."""
    spent = [ledger.epsilon() for ledger in ledgers.values()]
    return {
        "delta": budget.delta,
        "clients_trained": len(spent),
        "max_epsilon": round(max(spent), 3) if spent else 0.0,
        "clients_over_budget": sum(e > budget.epsilon for e in spent),
        "epsilon_budget": budget.epsilon,
    }


def _user_dp_settings(args: argparse.Namespace, population: int) -> UserDPSettings:
    """The server's user-level DP settings from the ``--user-dp-*`` options (validated)."""
    return UserDPSettings.create(
        noise_multiplier=args.user_dp_noise_multiplier,
        clip_norm=args.user_dp_clip,
        population=population,
        delta=args.user_dp_delta,
    )


def main() -> None:
    defaults, sim = LocalTrainConfig(), SimulationConfig()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_pretrain_arguments(parser, dataset="ml-100k")
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--cohort", type=int, default=50)
    parser.add_argument("--every", type=int, default=5, help="evaluate every N rounds")
    parser.add_argument("--no-dp", action="store_true", help="clipped SGD without noise")
    parser.add_argument("--noise-multiplier", type=float, default=defaults.noise_multiplier)
    parser.add_argument("--max-grad-norm", type=float, default=defaults.max_grad_norm)
    parser.add_argument("--lr", type=float, default=defaults.lr, help="client learning rate")
    parser.add_argument("--local-epochs", type=int, default=defaults.local_epochs)
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size)
    parser.add_argument(
        "--exclude-seen",
        action=argparse.BooleanOptionalAction,
        default=defaults.exclude_seen,
        help="the window's own items out of the clients' next-item softmax",
    )
    opt = ServerOptimizerSettings()
    parser.add_argument("--server-opt", choices=SERVER_OPTIMIZERS, default=opt.kind)
    parser.add_argument("--server-lr", type=float, default=opt.lr)
    parser.add_argument("--beta1", type=float, default=opt.beta1)
    parser.add_argument("--beta2", type=float, default=opt.beta2)
    parser.add_argument("--tau", type=float, default=opt.tau, help="FedAdam's epsilon")
    parser.add_argument(
        "--noise-shares",
        type=int,
        default=defaults.noise_shares,
        help="> 1: each client adds 1/m of the record-level noise (distributed DP over SecAgg+)",
    )
    parser.add_argument("--epsilon-budget", type=float, default=PrivacyBudget.epsilon)
    parser.add_argument("--delta", type=float, default=PrivacyBudget.delta)
    parser.add_argument(
        "--user-dp", action="store_true", help="user-level DP-FedAvg (clients train without DP)"
    )
    parser.add_argument(
        "--user-dp-noise-multiplier", type=float, default=sim.user_dp_noise_multiplier
    )
    parser.add_argument("--user-dp-clip", type=float, default=sim.user_dp_clip)
    parser.add_argument(
        "--user-dp-delta", type=float, default=sim.user_dp_delta, help="0 = 1 / number of clients"
    )
    parser.add_argument(
        "--ema",
        type=float,
        nargs="*",
        default=[],
        help="also evaluate exponential moving averages of the global parameters over rounds "
        "with these decays (server-side post-processing: no privacy cost)",
    )
    args = parser.parse_args()
    require_counts(parser, args, "rounds", "cohort", "every")
    if any(not 0 < d < 1 for d in args.ema):
        parser.error(f"--ema decays must be in (0, 1), got {args.ema}")
    try:  # the client and server settings are checked before any loading or training
        server_settings = ServerOptimizerSettings(
            args.server_opt, args.server_lr, args.beta1, args.beta2, args.tau
        )
        client = LocalTrainConfig(
            local_epochs=args.local_epochs,
            batch_size=args.batch_size,
            lr=args.lr,
            dp=not (args.no_dp or args.user_dp),
            noise_multiplier=args.noise_multiplier,
            max_grad_norm=args.max_grad_norm,
            personal_steps=0,
            noise_shares=args.noise_shares,
            exclude_seen=args.exclude_seen,
        )
        if args.noise_shares > args.cohort:
            raise ConfigError(f"--noise-shares {args.noise_shares} exceeds --cohort {args.cohort}")
        budget = PrivacyBudget(args.epsilon_budget, args.delta)
        if args.user_dp:  # the population is known only after loading; 2 checks the rest
            _user_dp_settings(args, population=2)
    except ConfigError as err:
        parser.error(str(err))

    torch.set_num_threads(1)
    # Dropout draws from torch's global RNG, which a fresh process seeds at random, and the
    # clients' DP batches and noise from secret randomness: seed both so a run is repeatable
    # (a benchmark's choice; the product never replays DP randomness).
    torch.manual_seed(args.seed)
    replay_dp_randomness(args.seed)
    start = time.perf_counter()
    run = pretrain_from_args(args)
    split, model = run.split, run.pretrained.student.model
    federated = split.federated_users
    sequences = {
        int(u): s
        for u, s in zip(federated, split.train_sequences(federated), strict=True)
        if len(s) >= 2
    }
    users = np.array(sorted(sequences))
    user_dp = (
        UserLevelDP(
            _user_dp_settings(args, population=len(users)), rng=np.random.default_rng(args.seed + 1)
        )
        if args.user_dp
        else None
    )
    norms: list[float] = []
    params = dict(model.named_parameters())
    names = [n for n in params if model.parameter_group(n) == "global"]
    server = ServerOptimizer(server_settings, [tuple(params[n].shape) for n in names])
    rng = np.random.default_rng(args.seed)
    ledgers: dict[int, PrivacyLedger] = {}
    curve: list[dict[str, Any]] = [_row(run, 0)]
    averages = {decay: {n: params[n].detach().clone() for n in names} for decay in args.ema}
    for rnd in range(1, args.rounds + 1):
        reference = {n: params[n].detach().clone() for n in names}
        total = {n: torch.zeros_like(params[n]) for n in names}  # sum of the (clipped) deltas
        expected = min(args.cohort, len(users))
        if user_dp is None:
            cohort = rng.choice(users, expected, replace=False)
        else:  # as the server samples and charges (no round is skipped here: risk 0)
            cohort = np.array(
                user_dp.sample_cohort(list(users), expected, random.Random(f"{args.seed}-{rnd}"))
            )
            user_dp.charge_round(rnd, expected)
        for user in cohort:
            with torch.no_grad():
                for n in names:
                    params[n].copy_(reference[n])
            local = replace(client, seed=int(user) * 1000 + rnd)
            result = train_global_dp(model, sequences[int(user)], local)
            if client.dp:
                ledger = ledgers.setdefault(int(user), PrivacyLedger(budget))
                ledger.record(client.noise_multiplier, result.sample_rate, result.steps)
            with torch.no_grad():
                update = [(params[n] - reference[n]).numpy() for n in names]
                if user_dp is not None:
                    update, norm = clip_update_l2(update, args.user_dp_clip)
                    norms.append(norm)
                for n, u in zip(names, update, strict=True):
                    total[n] += torch.from_numpy(u)
        if user_dp is None:
            mean_delta = {n: total[n] / len(cohort) for n in names}
        else:  # the server's noisy mean of the clipped sum, over the expected cohort
            noisy = user_dp.noisy_mean([total[n].numpy() for n in names], expected)
            mean_delta = {
                n: torch.from_numpy(a).to(params[n].dtype)
                for n, a in zip(names, noisy, strict=True)
            }
        step = server.step([mean_delta[n].double().numpy() for n in names])
        with torch.no_grad():
            for n, d in zip(names, step, strict=True):
                params[n].copy_(reference[n] + torch.from_numpy(d).to(params[n].dtype))
        with torch.no_grad():
            for decay, average in averages.items():
                for n in names:
                    average[n].mul_(decay).add_(params[n], alpha=1 - decay)
        if rnd % args.every == 0 or rnd == args.rounds:
            row = {**_row(run, rnd), "seconds": round(time.perf_counter() - start, 1)}
            if averages:
                row["ema"] = _average_rows(run, rnd, params, averages)
            if user_dp is not None:
                row["user_epsilon"] = round(user_dp.epsilon(), 3)
            curve.append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)  # progress; stdout is the JSON
    best = max(curve, key=lambda r: float(r["valid"]["sampled_hr@10"]))
    out = {
        "what": "Flower-free emulation of the federation's optimisation (federated users)",
        "settings": vars(args),
        "curve": curve,
        "best_by_validation": best,
        "privacy": _privacy(ledgers, budget) if client.dp else None,
        "user_dp": None
        if user_dp is None
        else {
            "epsilon": round(user_dp.epsilon(), 3),
            "delta": user_dp.settings.delta,
            "median_update_norm": round(float(np.median(norms)), 4),
        },
        "pretraining_cached": run.pretrained.cached,
        "seconds": round(time.perf_counter() - start, 1),
        **provenance("bench/federation_emulator.py"),
    }
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    raise SystemExit(run_bench(main))
