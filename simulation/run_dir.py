"""A simulation's run directory: resolved config, ``metrics.jsonl``, TensorBoard logs,
checkpoints, plots and the report, all under one folder.

Metrics are appended one JSON object per line and flushed at once, so a crash loses at most
the line being written; TensorBoard gets the same scalars.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from shared.io import write_json_atomic


class RunDirectory:
    """Owns the layout of one run's folder."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.checkpoints.mkdir(exist_ok=True)
        self.plots.mkdir(exist_ok=True)
        self._tb: Any = None

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def plots(self) -> Path:
        return self.root / "plots"

    @property
    def metrics_path(self) -> Path:
        return self.root / "metrics.jsonl"

    @property
    def tensorboard(self) -> Path:
        return self.root / "tensorboard"

    def write_config(self, config: Mapping[str, Any]) -> None:
        write_json_atomic(self.root / "config.json", dict(config))

    def log(self, event: str, step: int, **metrics: Any) -> None:
        """Append one record to ``metrics.jsonl`` and its numeric fields to TensorBoard."""
        record = {"event": event, "step": step, "time": round(time.time(), 3), **metrics}
        with self.metrics_path.open("a") as fh:
            fh.write(json.dumps(record, default=_jsonable) + "\n")
            fh.flush()
        writer = self._writer()
        if writer is not None:
            for key, value in metrics.items():
                numeric = isinstance(value, int | float) and not isinstance(value, bool)
                if numeric and math.isfinite(float(value)):
                    writer.add_scalar(f"{event}/{key}", float(value), step)
            writer.flush()

    def records(self, event: str | None = None) -> Iterator[dict[str, Any]]:
        """Read back the logged records (a torn last line from a crash is skipped)."""
        if not self.metrics_path.exists():
            return
        for line in self.metrics_path.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if event is None or record.get("event") == event:
                yield record

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._tb = None

    def _writer(self) -> Any:
        if self._tb is None:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # tensorboard is a dependency; degrade rather than crash
                return None
            self._tb = SummaryWriter(log_dir=str(self.tensorboard))
        return self._tb


def _jsonable(value: Any) -> Any:
    if hasattr(value, "tolist"):
        return value.tolist()
    return str(value)
