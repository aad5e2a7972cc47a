"""The baseline benchmark: Pop, ItemKNN, EASE (and text-only for cold items) side by side on
one protocol split, per population, few-shot K and cold-start items."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from shared.data.dataset import RecDataset
from shared.errors import ConfigError
from shared.eval.protocol import (
    DEFAULT_SHOTS,
    EvalConfig,
    check_recs_outputs,
    cold_item_cases,
    evaluate_fewshot,
    evaluate_split,
    export_model_recs,
    rank_cases,
)
from shared.eval.splits import ProtocolSplit, SplitConfig, split_cold_items, split_users
from shared.models.base import Recommender
from shared.models.baselines import EASE, ItemKNN, Pop, TextOnly

log = logging.getLogger(__name__)

EmbeddingFn = Callable[[Sequence[str]], npt.NDArray[np.float32]]

BASELINE_NAMES = ("pop", "itemknn", "ease")


@dataclass(frozen=True)
class BaselineConfig:
    """Hyper-parameters of the baselines (protocol defaults)."""

    ease_l2: float = 250.0
    knn_neighbors: int = 100
    shots: tuple[int, ...] = DEFAULT_SHOTS
    cold_items: bool = True

    def __post_init__(self) -> None:
        if not (self.ease_l2 > 0 and math.isfinite(self.ease_l2)) or self.knn_neighbors < 1:
            raise ConfigError(
                f"ease-l2 must be a finite number > 0 and knn-neighbors >= 1, got "
                f"{self.ease_l2} and {self.knn_neighbors}"
            )
        if not self.shots or any(k < 1 for k in self.shots):
            raise ConfigError(f"shots must be positive support sizes, got {list(self.shots)}")
        if len(set(self.shots)) != len(self.shots):
            raise ConfigError(f"shots must be distinct, got {list(self.shots)}")


def make_baseline(name: str, config: BaselineConfig) -> Recommender:
    """Build one baseline by name."""
    if name == "pop":
        return Pop()
    if name == "itemknn":
        return ItemKNN(neighbors=config.knn_neighbors)
    if name == "ease":
        return EASE(l2=config.ease_l2)
    raise ValueError(f"unknown baseline {name!r}; choose from {', '.join(BASELINE_NAMES)}")


def run_baseline_benchmark(
    dataset: RecDataset,
    split_config: SplitConfig = SplitConfig(),
    eval_config: EvalConfig = EvalConfig(),
    baseline_config: BaselineConfig = BaselineConfig(),
    embed: EmbeddingFn | None = None,
    export_path: Path | None = None,
    export_model: str = "ease",
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Fit every baseline on all non-cold users' train data and evaluate it.

    ``embed`` maps item texts to vectors for the text-only baseline (cold items); without it
    the text baseline is skipped. ``export_path`` writes ``recs.csv`` for ``export_model``,
    and its few-shot lists next to it (one :func:`~shared.eval.protocol.fewshot_recs_path`
    file per K) where there are cold-start users.
    ``progress`` is told each stage as it starts (the whole takes a minute on ml-100k).
    """
    say = progress if progress is not None else log.info
    shots = baseline_config.shots
    if export_path is not None:  # before the work, not after it
        if export_model not in BASELINE_NAMES:
            raise ConfigError(
                f"--export-model {export_model!r} is not one of {', '.join(BASELINE_NAMES)}"
            )
        check_recs_outputs(export_path, shots)
    split = split_users(dataset, split_config)
    populations = reported_populations(split)
    results: dict[str, Any] = {}
    fitted: dict[str, Recommender] = {}
    for name in BASELINE_NAMES:
        say(f"{name}: fitting and evaluating")
        start = time.perf_counter()
        model = make_baseline(name, baseline_config).fit(split.train_sequences(), dataset.n_items)
        fitted[name] = model
        entry: dict[str, Any] = {
            "loo": evaluate_split(model, split, populations, "test", eval_config)
        }
        if len(split.cold_users):
            entry["fewshot"] = evaluate_fewshot(model, split, baseline_config.shots, eval_config)
        entry["seconds"] = round(time.perf_counter() - start, 3)
        results[name] = entry
        log.info("%s done in %.1fs", name, entry["seconds"])

    if embed is not None:
        say(f"text: encoding {dataset.n_items} item texts with the language model")
    embeddings = embed(dataset.item_text) if embed is not None else None
    if embeddings is not None:
        say("text: evaluating")
        text = TextOnly(embeddings).fit(split.train_sequences(), dataset.n_items)
        results["text"] = {"loo": evaluate_split(text, split, populations, "test", eval_config)}
        if len(split.cold_users):
            results["text"]["fewshot"] = evaluate_fewshot(
                text, split, baseline_config.shots, eval_config
            )
    if baseline_config.cold_items:
        say("cold-start items: refitting on the held-out-items split")
        cold = _cold_item_run(dataset, split_config, eval_config, baseline_config, embeddings)
        for name, metrics in cold.items():
            results.setdefault(name, {})["cold_items"] = metrics

    if export_path is not None:
        say(f"exporting {export_model}'s top 100 to {export_path}")
        export_model_recs(
            fitted[export_model], dataset, split, export_path, shots, eval_config.batch_size
        )
    report = split_report(dataset, split, eval_config)
    return {**report, "baselines": asdict(baseline_config), "results": results}


REPORTED_POPULATIONS = ("public", "federated", "all")
"""Who every report gives figures for: each population, and both together (the cold users
are evaluated apart, in few-shot)."""


def reported_populations(split: ProtocolSplit) -> tuple[str, ...]:
    """The :data:`REPORTED_POPULATIONS` that have users to evaluate on ``split``."""
    return tuple(p for p in REPORTED_POPULATIONS if len(split.evaluable(split.population(p))))


def split_report(
    dataset: RecDataset, split: ProtocolSplit, eval_config: EvalConfig
) -> dict[str, Any]:
    """What every evaluation report says of its data and split: the dataset, the split and
    evaluation settings, and the populations' sizes."""
    return {
        "dataset": dataset.summary(),
        "split": asdict(split.config),
        "eval": asdict(eval_config),
        "populations": {
            "cold": len(split.cold_users),
            "public": len(split.public_users),
            "federated": len(split.federated_users),
        },
    }


COLD_ITEM_POPULATIONS = REPORTED_POPULATIONS
"""Who the cold-item run reports on (the cold users are never trained on: they are left out)."""


def _cold_item_run(
    dataset: RecDataset,
    split_config: SplitConfig,
    eval_config: EvalConfig,
    baseline_config: BaselineConfig,
    embeddings: npt.NDArray[np.float32] | None,
) -> dict[str, dict[str, dict[str, float]]]:
    """Hold out items, retrain on the reduced data, rank held-out items for evaluation users:
    per population (public, federated, and both), as the protocol reports every figure.
    ``cases`` counts interactions with a held-out item, ``users`` the users they belong to."""
    cold = split_cold_items(dataset, split_config)
    split = split_users(cold.dataset, split_config)
    cases = {pop: cold_item_cases(cold, split.population(pop)) for pop in COLD_ITEM_POPULATIONS}
    out: dict[str, dict[str, dict[str, float]]] = {}
    models: list[Recommender] = [make_baseline(n, baseline_config) for n in BASELINE_NAMES]
    if embeddings is not None:
        models.append(TextOnly(embeddings))
    for model in models:
        model.fit(split.train_sequences(), dataset.n_items)
        out[model.name] = {}
        for pop, pop_cases in cases.items():
            metrics = rank_cases(model, pop_cases, eval_config)
            row = {k: v for k, v in metrics.items() if not k.startswith("full")}
            row.update(
                cases=len(pop_cases),
                users=len({c.user for c in pop_cases}),
                held_out_items=len(cold.held_out),
            )
            out[model.name][pop] = row
    return out


def summary_rows(
    report: dict[str, Any], k: int = 10
) -> list[tuple[str, str, str, float | None, float | None]]:
    """Flatten a report into (model, section, population, HR@k, NDCG@k) rows for a table;
    HR and NDCG are None for a group without cases (no users, e.g. a shot count above every
    user's history), which is no result rather than a score of 0."""
    rows: list[tuple[str, str, str, float | None, float | None]] = []

    def add(model: str, section: str, group: str, m: dict[str, Any], proto: str) -> None:
        empty = m.get("users") == 0
        hr, ndcg = m[f"{proto}_hr@{k}"], m[f"{proto}_ndcg@{k}"]
        rows.append((model, section, group, None if empty else hr, None if empty else ndcg))

    for model, entry in report["results"].items():
        for pop, m in entry.get("loo", {}).items():
            for proto in ("sampled", "full"):
                add(model, f"loo/{proto}", pop, m, proto)
        for shot, m in entry.get("fewshot", {}).items():
            add(model, "fewshot/sampled", shot, m, "sampled")
            add(model, "fewshot/full", shot, m, "full")
        for pop, m in entry.get("cold_items", {}).items():
            add(model, "cold-items/sampled", pop, m, "sampled")
    return rows
