"""What the federation could reach at best: the pretrained student fine-tuned *centrally and
without privacy* on the federated users' training data. Prints JSON.

The federation trains the student's global group on the federated users' data under DP-SGD
and secure aggregation. Removing both and pooling the data gives an upper bound on what any
federated optimiser (FedAvg, FedAdam, more rounds) can extract with the same parameter
placement. The ``global+item-table`` mode also unfreezes the student's ID table: the bound for
a design that learns per-item parameters from federated data, which ``docs/parameters.md``
rules out under DP. ``--modes heads pool heads+norms+proj`` fine-tune parts of the global
group only: where the central gain comes from. Each mode trains with Adam for ``--epochs``
epochs, keeps the epoch with the best validation sampled NDCG@10 (the protocol's model
selection) and reports test.

    python bench/federation_ceiling.py --dataset ml-100k --data-dir ../shared/datasets/ml-100k
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from typing import Any

import torch
import torch.nn.functional as F

from shared.federated.local_training import pooled_examples
from simulation.pretrain import PretrainedRun, add_pretrain_arguments, pretrain_from_args
from simulation.provenance import provenance, require_counts, run_bench

MODES: dict[str, tuple[tuple[str, ...], bool]] = {
    "global": ((), False),
    "global+item-table": ((), True),
    "heads": (("head_text.", "head_id."), False),
    "pool": (("positions.", "query.", "key.", "norm_in.", "norm_out."), False),
    "heads+norms+proj": (
        ("head_text.", "head_id.", "norm_in.", "norm_out.", "items.text_proj.", "items.id_proj."),
        False,
    ),
}
"""Mode -> (the global tensors it trains, by name prefix; () = all of them; and whether the
ID table is unfrozen too). The subsets show which layers the central gain comes from, i.e.
which ones DP fine-tuning must move (``bench/dp_gradient_signal.py``)."""


def fine_tune(
    run: PretrainedRun,
    data: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    *,
    item_table: bool,
    only: tuple[str, ...] = (),
    epochs: int,
    lr: float,
    batch_size: int,
    seed: int,
) -> dict[str, Any]:
    """Adam on a copy of the pretrained student's global group (and its ID table if
    ``item_table``), or of its tensors whose names start with one of ``only``; the epoch with
    the best validation."""
    model = copy.deepcopy(run.pretrained.student.model)
    model.set_trainable(["global"])
    for name, param in model.named_parameters():
        if only and param.requires_grad and not name.startswith(only):
            param.requires_grad_(False)
    model.items.ids.weight.requires_grad_(item_table)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=lr)
    items, mask, targets = data
    generator = torch.Generator().manual_seed(seed)

    def row(epoch: int) -> dict[str, Any]:
        return {
            "epoch": epoch,
            "valid": run.evaluate_federated(model, "valid"),
            "test": run.evaluate_federated(model, "test"),
        }

    curve = [row(0)]
    for epoch in range(1, epochs + 1):
        model.train()
        order = torch.randperm(len(targets), generator=generator)
        for start in range(0, len(order), batch_size):
            batch = order[start : start + batch_size]
            optimizer.zero_grad(set_to_none=True)
            loss = F.cross_entropy(model(items[batch], mask[batch]), targets[batch])
            loss.backward()
            optimizer.step()
        model.eval()
        curve.append(row(epoch))
    best = max(curve, key=lambda r: float(r["valid"]["sampled_ndcg@10"]))
    return {"trainable": sum(p.numel() for p in params), "selected": best, "curve": curve}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_pretrain_arguments(parser, dataset="ml-100k")
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--per-user", type=int, default=256)
    parser.add_argument(
        "--modes",
        nargs="+",
        choices=list(MODES),
        default=["global", "global+item-table"],
        help="which parameters each fine-tune trains",
    )
    args = parser.parse_args()
    # no training would report the pretrained student as the ceiling
    require_counts(parser, args, "epochs", "batch_size", "per_user")
    if not args.lr > 0:
        parser.error(f"--lr must be > 0, got {args.lr}")

    torch.set_num_threads(2)
    start = time.perf_counter()
    run = pretrain_from_args(args)
    ds, split, pre = run.dataset, run.split, run.pretrained
    federated = split.federated_users
    sequences = [s for s in split.train_sequences(federated) if len(s) >= 2]
    # what every client trains on (its last per_user pairs: LocalTrainConfig.max_examples)
    data = pooled_examples(sequences, pre.student.model.config.max_len, args.per_user)
    modes = {
        name: fine_tune(
            run,
            data,
            item_table=MODES[name][1],
            only=MODES[name][0],
            epochs=args.epochs,
            lr=args.lr,
            batch_size=args.batch_size,
            seed=args.seed,
        )
        for name in args.modes
    }
    out = {
        "dataset": ds.summary(),
        "federated_users": len(federated),
        "training_examples": len(data[2]),
        "what": "pretrained student fine-tuned centrally, without DP, on the federated users' "
        "train data; test at the best validation epoch (federated users)",
        "modes": modes,
        "pretraining_cached": pre.cached,
        "seconds": round(time.perf_counter() - start, 1),
        **provenance("bench/federation_ceiling.py"),
    }
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    raise SystemExit(run_bench(main))
