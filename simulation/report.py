"""The simulation report: markdown plus PNG plots (accuracy and epsilon per round, few-shot
accuracy against K, comparison with the baselines).

Input is the run's summary, a plain dict so it can also be rebuilt from ``summary.json``::

    {"rounds": [{"round": 1, "valid_sampled_hr@10": ..., "valid_full_hr@10": ...,
                 "epsilon_record": ..., "epsilon_user": ..., "seconds": ...}, ...],
     "final": {model: {population: {"sampled_hr@10": ..., ...}}},
     "fewshot": {model: {"k=1": {"sampled_hr@10": ..., ...}}},
     "paired": {cases: {"A - B": {"sampled_hr@10": {"mean", "low", "high", ...}, ...}}},
     "meta": {...}}
"""

from __future__ import annotations

import io
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from matplotlib.ticker import MaxNLocator

from shared.eval.compare import PairedDifference
from shared.io import REPORT_MODE, write_bytes_atomic

K = 10

#: What the columns of the round table (``metrics.jsonl``'s round records) mean.
ROUND_COLUMNS = {
    "clients_ok": "clients whose update was aggregated",
    "clients_declined": "clients that declined to train (e.g. their epsilon budget)",
    "clients_failed": "clients that failed or whose update was rejected",
    "clients_clipped": "aggregated updates the server scaled down to the round's L2 bound "
    "(update-clip-norm, else update-clip-median-multiple x the round's median norm; plain "
    "FedAvg only)",
    "updated": "whether the round changed the global model",
    "fit_seconds": "seconds from sending the round's training instructions to its last reply",
    "round_seconds": "seconds of the whole round: training, aggregation and evaluation",
    "elapsed_seconds": "seconds since this process started federating (a resumed run counts "
    "again from 0; the summary's federation seconds add the processes up)",
    "epsilon_record": "record-level epsilon, the most any client has spent so far",
    "epsilon_record_mean": "record-level epsilon, mean over the clients that have trained",
    "epsilon_user": "user-level epsilon of the server's noise, cumulative",
    f"valid_sampled_hr@{K}": f"sampled HR@{K} of federated evaluation (validation item)",
    f"valid_full_hr@{K}": f"full-ranking HR@{K} of federated evaluation (validation item)",
    "valid_loss": "next-item loss of federated evaluation",
    "backfilled": "logged from the checkpoint after a crash (no federated evaluation)",
}

_LEGEND = {
    "epsilon_record": "record-level, max over clients",
    "epsilon_record_mean": "record-level, mean over clients",
    "epsilon_user": "user-level",
    f"valid_sampled_hr@{K}": "sampled",
    f"valid_full_hr@{K}": "full ranking",
}


def write_report(summary: dict[str, Any], out_dir: str | Path) -> Path:
    """Write ``report.md`` and ``plots/*.png`` under ``out_dir``; returns the report path."""
    out = Path(out_dir)
    plots = out / "plots"
    plots.mkdir(parents=True, exist_ok=True)
    files = {
        "accuracy": plots / "accuracy_per_round.png",
        "epsilon": plots / "epsilon_per_round.png",
        "fewshot": plots / "fewshot_vs_k.png",
        "baselines": plots / "comparison.png",
    }
    made = {
        "accuracy": _plot_rounds(summary, files["accuracy"], "accuracy"),
        "epsilon": _plot_rounds(summary, files["epsilon"], "epsilon"),
        "fewshot": _plot_fewshot(summary, files["fewshot"]),
        "baselines": _plot_final(summary, files["baselines"]),
    }
    for title, plot in made.items():
        if plot is None:  # an earlier process's (a resumed run): not a figure of this summary
            files[title].unlink(missing_ok=True)
    md = _markdown(summary, {k: v for k, v in made.items() if v is not None}, out)
    path = out / "report.md"
    write_bytes_atomic(path, md.encode(), mode=REPORT_MODE)
    return path


def _plot_rounds(summary: dict[str, Any], path: Path, kind: str) -> Path | None:
    rounds = summary.get("rounds", [])
    if not rounds:
        return None
    x = [r["round"] for r in rounds]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    if kind == "accuracy":
        keys = [f"valid_sampled_hr@{K}", f"valid_full_hr@{K}"]
        ax.set_title("Federated evaluation per round")
        ax.set_ylabel(f"HR@{K} (validation)")
    else:
        keys = ["epsilon_record", "epsilon_record_mean", "epsilon_user"]
        ax.set_title("Privacy spent per round (cumulative)")
        ax.set_ylabel("epsilon")
    plotted = False
    for key in keys:
        ys = [r.get(key) for r in rounds]
        if any(y is not None for y in ys):
            ys_plot = [float("nan") if y is None else y for y in ys]
            # an epsilon is no guarantee without its delta: the legend names it, as the table
            label = _LEGEND.get(key, key) + _at_delta(key, summary.get("meta", {}))
            ax.plot(x, ys_plot, marker="o", label=label)
            plotted = True
    if not plotted:
        plt.close(fig)
        return None
    ax.set_xlabel("round")
    if len(x) <= 20:
        ax.set_xticks(x)
    else:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    _save(fig, path)
    return path


def _save(fig: Any, path: Path) -> None:
    """Save a plot with its outside legend, if any, in the picture; atomically, as the
    report that links it (a run killed while saving keeps the earlier plot whole)."""
    fig.tight_layout()
    buf = io.BytesIO()
    try:
        fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    finally:
        plt.close(fig)
    write_bytes_atomic(path, buf.getvalue(), mode=REPORT_MODE)


def _evaluated(by_k: dict[str, Any]) -> dict[str, Any]:
    """The K values some cold user was evaluated at (a K no user has more than K
    interactions for has no figure, not a figure of 0)."""
    return {k: m for k, m in by_k.items() if m.get("users", 0)}


def _plot_fewshot(summary: dict[str, Any], path: Path) -> Path | None:
    fewshot = {
        model: evaluated
        for model, by_k in summary.get("fewshot", {}).items()
        if (evaluated := _evaluated(by_k))
    }
    if not fewshot:
        return None
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for model, by_k in fewshot.items():
        ks = sorted(by_k, key=lambda s: int(s.split("=")[1]))
        ax.plot(
            [int(k.split("=")[1]) for k in ks],
            [by_k[k][f"sampled_hr@{K}"] for k in ks],
            marker="o",
            label=model,
        )
    ax.set_title("Few-shot: cold-start users after K interactions")
    ax.set_xlabel("K (support interactions)")
    ax.set_ylabel(f"sampled HR@{K}")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0))
    _save(fig, path)
    return path


def _plot_final(summary: dict[str, Any], path: Path) -> Path | None:
    final = summary.get("final", {})
    rows = [(m, r["federated"]) for m, r in final.items() if "federated" in r]
    if not rows:
        return None
    fig, ax = plt.subplots(figsize=(7, 3.8))
    width = 0.4
    xs = range(len(rows))
    ax.bar(
        [x - width / 2 for x in xs],
        [r[f"sampled_hr@{K}"] for _, r in rows],
        width,
        label=f"sampled HR@{K}",
    )
    ax.bar(
        [x + width / 2 for x in xs],
        [r[f"full_hr@{K}"] for _, r in rows],
        width,
        label=f"full HR@{K}",
    )
    ax.set_xticks(list(xs), [m for m, _ in rows], rotation=30, ha="right")
    ax.set_title("Test accuracy, federated users", pad=24)
    ax.set_ylabel(f"HR@{K}")
    ax.legend(fontsize="small", loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=2)
    ax.grid(axis="y", alpha=0.3)
    _save(fig, path)
    return path


def _markdown(summary: dict[str, Any], plots: dict[str, Path], out: Path) -> str:
    meta = summary.get("meta", {})
    lines = ["# Federated simulation report", ""]
    for key, value in meta.items():
        lines.append(f"- **{key}**: {value}")
    lines.append("")
    final = summary.get("final", {})
    lines += _table(
        "Test accuracy (leave-one-out)",
        ["model", "population", *(f"{m}@{K}" for m in _FINAL_COLUMNS)],
        (
            [model, pop, *(f"{m[key]:.4f}" for key in _FINAL_KEYS)]
            for model, pops in final.items()
            for pop, m in pops.items()
        ),
    )
    fewshot = summary.get("fewshot", {})
    # HR and NDCG, sampled and full, as PROTOCOL.md reports few-shot (and as the test table)
    lines += _table(
        "Few-shot (cold-start users)",
        ["model", "K", "users", *(f"{c}@{K}" for c in _FINAL_COLUMNS)],
        (
            [
                model,
                k,
                str(m.get("users", "")),
                *(f"{m[key]:.4f}" if m.get("users", 0) else "n/a (no user)" for key in _FINAL_KEYS),
            ]
            for model, by_k in fewshot.items()
            for k, m in by_k.items()
        ),
    )
    paired = summary.get("paired", {})
    lines += _table(
        f"Paired differences (HR@{K}, A - B on the same users, 95% bootstrap interval)",
        ["cases", "A - B", "sampled", "full"],
        (
            [
                cases,
                pair,
                format_difference(d[f"sampled_hr@{K}"]),
                format_difference(d[f"full_hr@{K}"]),
            ]
            for cases, rows in paired.items()
            for pair, d in rows.items()
        ),
    )
    rounds = summary.get("rounds", [])
    keys = list(dict.fromkeys(k for r in rounds for k in r if k != "round"))
    lines += _table(
        "Rounds",
        ["round", *keys],
        ([str(r["round"]), *(_fmt(r.get(k)) for k in keys)] for r in rounds),
    )
    explained = [
        f"- `{k}`: {ROUND_COLUMNS[k]}{_at_delta(k, meta)}" for k in keys if k in ROUND_COLUMNS
    ]
    if explained:
        lines += [*explained, ""]
    for title, p in plots.items():
        lines += [f"![{title}]({p.relative_to(out).as_posix()})", ""]
    return "\n".join(lines)


#: The summary's ``meta`` key of the delta each epsilon column is reported at.
_DELTA_OF = {
    "epsilon_record": "delta",
    "epsilon_record_mean": "delta",
    "epsilon_user": "user-level delta",
}


def _at_delta(column: str, meta: dict[str, Any]) -> str:
    """``, at delta 1e-05`` for an epsilon column whose delta the summary records (a
    summary written before it did has none), else nothing."""
    delta = meta.get(_DELTA_OF.get(column, ""))
    return f", at delta {delta:.3g}" if isinstance(delta, int | float) else ""


_FINAL_COLUMNS = ("sampled HR", "sampled NDCG", "full HR", "full NDCG")
_FINAL_KEYS = tuple(f"{m}@{K}" for m in ("sampled_hr", "sampled_ndcg", "full_hr", "full_ndcg"))


def _table(title: str, header: list[str], rows: Iterable[list[str]]) -> list[str]:
    """A markdown section: ``## title`` and a table, or nothing when there is no row."""
    body = ["| " + " | ".join(row) + " |" for row in rows]
    if not body:
        return []
    head = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return [f"## {title}", "", *head, *body, ""]


def format_difference(d: dict[str, Any]) -> str:
    """``+0.031 [+0.001, +0.064], A better`` (or ``B better``, or ``within noise``) for a
    :meth:`PairedDifference.as_dict` of the summary."""
    diff = PairedDifference(**d)
    verdict = "A better" if diff.a_better else "B better" if diff.b_better else "within noise"
    return f"{diff.mean:+.3f} [{diff.low:+.3f}, {diff.high:+.3f}], {verdict}"


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4f}"
    return "" if value is None else str(value)
