"""One trained model (a published int8 / fp32 ONNX artifact, or any scorer) evaluated under
the protocol on one seeded split: leave-one-out per population and few-shot per K, in the
report shape of :func:`shared.eval.baseline_benchmark.run_baseline_benchmark`, so the same
table and readers serve both.

A model trained by the federation has seen its split's public and federated *train* data;
evaluating it on another seed's split (or another dataset) would test it on what it was
trained on. The split settings must be the ones it was trained with.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from shared.data.dataset import RecDataset
from shared.eval.baseline_benchmark import reported_populations, split_report
from shared.eval.protocol import (
    DEFAULT_SHOTS,
    EvalConfig,
    check_recs_outputs,
    evaluate_fewshot,
    evaluate_split,
    export_model_recs,
)
from shared.eval.splits import SplitConfig, split_users
from shared.models.base import Scorer


def evaluate_model(
    scorer: Scorer,
    name: str,
    dataset: RecDataset,
    split_config: SplitConfig = SplitConfig(),
    eval_config: EvalConfig = EvalConfig(),
    shots: Sequence[int] = DEFAULT_SHOTS,
    export_path: Path | None = None,
) -> dict[str, Any]:
    """``scorer``'s test figures per population (and few-shot per K, no adaptation: the
    model scores the support set as a history) on ``dataset`` split by ``split_config``.
    ``export_path`` writes its ``recs.csv`` for every evaluated user (history = train +
    validation) and, where the few-shot figures are evaluated, one
    :func:`~shared.eval.protocol.fewshot_recs_path` file per K (history = support set)."""
    if export_path is not None:  # before the work, not after it
        check_recs_outputs(export_path, shots)
    split = split_users(dataset, split_config)
    populations = reported_populations(split)
    entry: dict[str, Any] = {"loo": evaluate_split(scorer, split, populations, "test", eval_config)}
    if len(split.cold_users) and shots:
        entry["fewshot"] = evaluate_fewshot(scorer, split, shots, eval_config)
    if export_path is not None:
        export_model_recs(scorer, dataset, split, export_path, shots, eval_config.batch_size)
    return {**split_report(dataset, split, eval_config), "results": {name: entry}}
