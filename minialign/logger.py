"""Metrics of a run: one JSON object per logged step in out_dir/metrics.jsonl (rank 0 only), the same
line on stdout, and with --tensorboard the same scalars as TensorBoard events in out_dir/tb.

metrics.jsonl is the record (the report and the tests read it); TensorBoard is a view of it for people
who watch curves there (`pip install -e ".[tensorboard]"`; `tensorboard --logdir out`).
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch

from .runtime import Runtime


class MetricsLog:
    """Appends one JSON object per logged step to out_dir/metrics.jsonl (rank 0 only).

    resume_step: the step of the checkpoint a --resume run continues from (lines logged after it are
    dropped, they will be logged again); None for a fresh run (an old metrics.jsonl is removed).
    """

    def __init__(self, out_dir, rt: Runtime, resume_step: int | None = None, tensorboard: bool = False):
        self.path = Path(out_dir) / "metrics.jsonl"
        self.enabled = rt.is_main
        self.t0 = time.time()
        self.tb = None
        if tensorboard and self.enabled:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as e:
                raise SystemExit("--tensorboard needs the tensorboard package: "
                                 f"pip install -e \".[tensorboard]\" ({e})")
            self.tb = SummaryWriter(str(Path(out_dir) / "tb"), purge_step=resume_step + 1 if resume_step else None)
        if self.enabled and resume_step is not None and self.path.exists():
            # drop lines logged after the checkpoint we resume from (they will be logged again), and a
            # last line cut short by the kill (no newline: it was being written)
            lines = [l for l in self.path.read_text().splitlines(keepends=True) if l.endswith("\n") and l.strip()]
            keep = [l.rstrip("\n") for l in lines if json.loads(l).get("step", 0) <= resume_step]
            self.path.write_text("".join(l + "\n" for l in keep))
        elif self.enabled and resume_step is None and self.path.exists():
            self.path.unlink()

    def log(self, step: int, metrics: dict, bar=None):
        if not self.enabled:
            return
        row = {"step": step, "time_s": round(time.time() - self.t0, 3), **{k: _jsonable(v) for k, v in metrics.items()}}
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        if self.tb is not None:
            for k, v in row.items():
                if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool):
                    self.tb.add_scalar(k, v, step)
            self.tb.flush()
        text = " ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items() if k != "time_s")
        (bar.write if bar is not None else print)(text)


def _jsonable(v):
    if isinstance(v, torch.Tensor):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    return v
