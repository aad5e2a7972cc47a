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

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from shared.io import write_bytes_atomic

K = 10


def write_report(summary: dict[str, Any], out_dir: str | Path) -> Path:
    """Write ``report.md`` and ``plots/*.png`` under ``out_dir``; returns the report path."""
    out = Path(out_dir)
    plots = out / "plots"
    plots.mkdir(parents=True, exist_ok=True)
    made = {
        "accuracy": _plot_rounds(summary, plots / "accuracy_per_round.png", "accuracy"),
        "epsilon": _plot_rounds(summary, plots / "epsilon_per_round.png", "epsilon"),
        "fewshot": _plot_fewshot(summary, plots / "fewshot_vs_k.png"),
        "baselines": _plot_final(summary, plots / "comparison.png"),
    }
    md = _markdown(summary, {k: v for k, v in made.items() if v is not None}, out)
    path = out / "report.md"
    write_bytes_atomic(path, md.encode())
    return path


def _plot_rounds(summary: dict[str, Any], path: Path, kind: str) -> Path | None:
    rounds = summary.get("rounds", [])
    if not rounds:
        return None
    x = [r["round"] for r in rounds]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    if kind == "accuracy":
        keys = [f"valid_sampled_hr@{K}", f"valid_full_hr@{K}"]
        ax.set_ylabel(f"HR@{K} (validation)")
    else:
        keys = ["epsilon_record", "epsilon_user"]
        ax.set_ylabel("epsilon spent")
    plotted = False
    for key in keys:
        ys = [r.get(key) for r in rounds]
        if any(y is not None for y in ys):
            ax.plot(x, [float("nan") if y is None else y for y in ys], marker="o", label=key)
            plotted = True
    if not plotted:
        plt.close(fig)
        return None
    ax.set_xlabel("round")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _plot_fewshot(summary: dict[str, Any], path: Path) -> Path | None:
    fewshot = summary.get("fewshot", {})
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
    ax.set_xlabel("K (support interactions)")
    ax.set_ylabel(f"sampled HR@{K}")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
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
    ax.set_ylabel("federated users, test")
    ax.legend()
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _markdown(summary: dict[str, Any], plots: dict[str, Path], out: Path) -> str:
    meta = summary.get("meta", {})
    lines = ["# Federated simulation report", ""]
    for key, value in meta.items():
        lines.append(f"- **{key}**: {value}")
    lines.append("")
    final = summary.get("final", {})
    if final:
        lines += [
            "## Test accuracy (leave-one-out)",
            "",
            f"| model | population | sampled HR@{K} | sampled NDCG@{K} | full HR@{K} "
            f"| full NDCG@{K} |",
            "|---|---|---|---|---|---|",
        ]
        for model, pops in final.items():
            for pop, m in pops.items():
                lines.append(
                    f"| {model} | {pop} | {m[f'sampled_hr@{K}']:.4f} | "
                    f"{m[f'sampled_ndcg@{K}']:.4f} | {m[f'full_hr@{K}']:.4f} | "
                    f"{m[f'full_ndcg@{K}']:.4f} |"
                )
        lines.append("")
    fewshot = summary.get("fewshot", {})
    if fewshot:
        lines += [
            "## Few-shot (cold-start users)",
            "",
            f"| model | K | users | sampled HR@{K} | full HR@{K} |",
            "|---|---|---|---|---|",
        ]
        for model, by_k in fewshot.items():
            for k, m in by_k.items():
                lines.append(
                    f"| {model} | {k} | {m.get('users', '')} | {m[f'sampled_hr@{K}']:.4f} | "
                    f"{m[f'full_hr@{K}']:.4f} |"
                )
        lines.append("")
    paired = summary.get("paired", {})
    if paired:
        lines += [
            f"## Paired differences (HR@{K}, A - B on the same users, 95% bootstrap interval)",
            "",
            "| cases | A - B | sampled | full |",
            "|---|---|---|---|",
        ]
        for cases, rows in paired.items():
            for pair, d in rows.items():
                lines.append(
                    f"| {cases} | {pair} | {format_difference(d[f'sampled_hr@{K}'])} | "
                    f"{format_difference(d[f'full_hr@{K}'])} |"
                )
        lines.append("")
    rounds = summary.get("rounds", [])
    if rounds:
        keys = [k for k in rounds[0] if k != "round"]
        lines += [
            "## Rounds",
            "",
            "| round | " + " | ".join(keys) + " |",
            "|---|" + "---|" * len(keys),
        ]
        for r in rounds:
            cells = [_fmt(r.get(k)) for k in keys]
            lines.append(f"| {r['round']} | " + " | ".join(cells) + " |")
        lines.append("")
    for title, p in plots.items():
        lines += [f"![{title}]({p.relative_to(out).as_posix()})", ""]
    return "\n".join(lines)


def format_difference(d: dict[str, float]) -> str:
    """``+0.031 [+0.001, +0.064], A better`` (or ``B better``, or ``within noise``)."""
    verdict = "A better" if d["low"] > 0 else "B better" if d["high"] < 0 else "within noise"
    return f"{d['mean']:+.3f} [{d['low']:+.3f}, {d['high']:+.3f}], {verdict}"


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4f}"
    return "" if value is None else str(value)
