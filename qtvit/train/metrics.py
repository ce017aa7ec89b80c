"""Per-run metric logs: JSON lines (every record) and CSV (one file per record kind), TensorBoard optional.

Records are appended, so a resumed run continues the same files. Each record has a ``kind``
(``step``, ``epoch``, ``eval``) and flat scalar fields.
"""

from __future__ import annotations

import csv
import json
import math
import os
from pathlib import Path

from ..errors import QtvitError


class MetricsLogger:
    """Append metric records under ``run_dir`` (``metrics.jsonl``, ``metrics_<kind>.csv``)."""

    def __init__(self, run_dir: str | os.PathLike, tensorboard: bool = False) -> None:
        self.run_dir = Path(run_dir)
        self.jsonl = self.run_dir / "metrics.jsonl"
        self.writer = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise QtvitError("run.tensorboard=true needs the tensorboard package "
                                 "(pip install tensorboard)") from None
            self.writer = SummaryWriter(str(self.run_dir / "tensorboard"))

    def log(self, kind: str, **fields: float | int | str | None) -> None:
        record = {"kind": kind, **{k: _plain(v) for k, v in fields.items()}}
        with open(self.jsonl, "a") as f:
            f.write(json.dumps(record) + "\n")
        path = self.run_dir / f"metrics_{kind}.csv"
        new = not path.exists()
        with open(path, "a", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(record), extrasaction="ignore")
            if new:
                writer.writeheader()
            writer.writerow(record)
        if self.writer is not None and "global_step" in fields:
            for key, value in record.items():
                if isinstance(value, (int, float)) and key != "global_step":
                    self.writer.add_scalar(f"{kind}/{key}", value, fields["global_step"])

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def _plain(value):
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no NaN/inf
    return value


def read_metrics(run_dir: str | os.PathLike, kind: str | None = None) -> list[dict]:
    """The records of ``run_dir/metrics.jsonl`` (optionally of one ``kind``)."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in records if kind is None or r.get("kind") == kind]
