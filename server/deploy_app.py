"""The ServerApp ``fedrec server start`` submits: the simulation's ServerApp
(:func:`server.server_app.make_server_app`, same strategy, SecAgg+, checkpoints, resume,
artifacts), plus one line per finished round in ``progress-file`` for the operator's
follow-up display and ``fedrec server status``.

The progress line is written after the round's checkpoint (the ServerApp's round hook runs
after it), so a round shown as done is a round a restart resumes after. A crash between the
two left the round out of the progress for good; a restart now writes it from what its
checkpoint recorded (``backfilled``: no evaluation metrics, no device epsilon).
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from server.server_app import make_server_app
from server.strategy import RoundReport
from shared.io import append_line

#: Run-config key of this wrapper (removed before the inner ServerApp sees the config).
PROGRESS_FILE_KEY = "progress-file"


def round_record(report: RoundReport, num_rounds: int) -> dict[str, Any]:
    """The JSON line of one finished round."""
    fit = report.fit
    evaluation = report.evaluate
    # none under SecAgg+, which hides per-client fit metrics (a device's own is on its /status)
    client_eps = fit.client_metrics.get("epsilon")
    return {
        "round": report.server_round,
        "num_rounds": num_rounds,
        "time": time.time(),
        "clients_sampled": fit.sampled,
        "clients_ok": fit.ok,
        "clients_declined": fit.declined,
        "clients_failed": fit.failed + fit.rejected,
        # updates the server scaled down to the round's clip bound (plain mode)
        "clients_clipped": fit.clipped,
        "secure_aggregation": fit.secure_aggregation,
        "updated": fit.updated,
        "eval_clients": evaluation.ok if evaluation is not None else 0,
        "eval_declined": evaluation.declined if evaluation is not None else 0,
        "eval_loss": evaluation.loss if evaluation is not None else None,
        "eval_metrics": dict(evaluation.metrics) if evaluation is not None else {},
        "epsilon_record_mean": float(client_eps) if client_eps is not None else None,
        "epsilon_user": report.epsilon_user,
        "round_seconds": report.round_seconds,
    }


def backfill_progress(path: Path, checkpoint_dir: str, num_rounds: int) -> int:
    """Append the rounds a verifiable checkpoint holds past the progress file's last round
    (a crash came between the checkpoint and its line); returns how many were added."""
    from server.checkpoint import CheckpointStore
    from server.state import read_progress_file

    if not checkpoint_dir or not Path(checkpoint_dir).is_dir():
        return 0
    logged = [r.get("round") for r in read_progress_file(path)]
    last = max((r for r in logged if isinstance(r, int)), default=0)
    missing = CheckpointStore(checkpoint_dir, tidy=False).verified_after(last)
    for checkpoint in missing:
        m = checkpoint.metrics
        failed = sum(int(m.get(k) or 0) for k in ("clients-failed", "clients-rejected"))
        append_progress(
            path,
            {  # round_record's keys; what the checkpoint did not record is None or 0
                "round": checkpoint.server_round,
                "num_rounds": num_rounds,
                "time": checkpoint.created,
                "clients_sampled": m.get("clients-sampled"),
                "clients_ok": m.get("clients-ok"),
                "clients_declined": m.get("clients-declined"),
                "clients_failed": failed,
                "clients_clipped": m.get("clients-clipped"),
                "secure_aggregation": None,
                "updated": m.get("updated"),
                "eval_clients": 0,
                "eval_declined": 0,
                "eval_loss": m.get("eval-loss"),
                "eval_metrics": {},
                "epsilon_record_mean": None,
                "epsilon_user": m.get("epsilon-user"),
                "round_seconds": float(m.get("round-seconds") or 0.0),
                "backfilled": True,
            },
        )
    return len(missing)


def append_progress(path: Path, record: dict[str, Any]) -> None:
    """Append one JSON line and fsync it (a reader skips a torn last line). A value that is
    not a finite number (NaN, inf: a client's metric, an overflowing mean) is written as
    ``null``: strict JSON has none, and failing here would end the run after its round."""
    append_line(path, json.dumps(_finite(record), allow_nan=False, default=str))


def _finite(value: Any) -> Any:
    """``value`` with every non-finite float, however deep in dicts and lists, as ``None``."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run the simulation's ServerApp with a progress hook (see the module docstring)."""
    run_config = dict(context.run_config)
    progress = str(run_config.pop(PROGRESS_FILE_KEY, "") or "")
    num_rounds = int(run_config.get("num-rounds", 0) or 0)
    if progress:
        backfill_progress(Path(progress), str(run_config.get("checkpoint-dir", "")), num_rounds)

    def on_round_end(report: RoundReport) -> None:
        if progress:
            append_progress(Path(progress), round_record(report, num_rounds))

    inner = make_server_app(on_round_end=on_round_end)
    inner_context = Context(
        run_id=context.run_id,
        node_id=context.node_id,
        node_config=context.node_config,
        state=context.state,
        run_config=run_config,
    )
    inner(grid, inner_context)
