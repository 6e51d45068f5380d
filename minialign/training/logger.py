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

from minialign.training import runtime
from minialign.training.runtime import Runtime


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


# ---------------------------------------------------------------------------------- completions log
def completions_log(out_dir, rt, resume_step: int | None):
    """Path of out_dir/completions.jsonl on rank 0 (None on the others). A fresh run removes an old file;
    a --resume drops the rows logged after the checkpoint (they will be logged again)."""
    if not rt.is_main:
        return None
    path = Path(out_dir) / "completions.jsonl"
    if path.exists() and resume_step is None:
        path.unlink()
    elif path.exists():
        lines = [l for l in path.read_text().splitlines(keepends=True) if l.endswith("\n") and l.strip()]
        path.write_text("".join(l for l in lines if json.loads(l)["step"] <= resume_step))
    return path


def log_completions(path, step: int, ro, g: dict, sources, rt, bar=None, n_print: int = 3) -> None:
    """Append one row per completion of the step (every rank's, gathered to rank 0) to `path`
    (completions.jsonl), and print the first completion of the first `n_print` prompts via bar.write:
        {step, prompt, completion, rewards/<name> (unweighted, one per reward function), reward (weighted sum),
         advantage, length}
    g: the step's per-response statistics over all ranks (train_grpo.grpo_batches), with "advantage"
    (for a per-token advantage, its value at the first token; a truncated response that gets no loss under
    --mask_truncated_completions still shows its estimator's advantage, or 0 per token). Called on every
    rank (the gather is collective); only rank 0 writes."""
    texts = runtime.all_gather_object([(r["prompt_text"], c) for r, c in zip(ro.rows, ro.completions)], rt)
    if path is None:
        return
    texts = [t for part in texts for t in part]  # rank order = global prompt order, as g
    names = [f"rewards/{s.name}" for s in sources]
    rows = [{"step": step, "prompt": p, "completion": c, **{k: float(g[k][i]) for k in names},
             "reward": float(g["reward"][i]), "advantage": float(g["advantage"][i]), "length": int(g["length"][i])}
            for i, (p, c) in enumerate(texts)]
    with open(path, "a") as f:
        f.writelines(json.dumps(row) + "\n" for row in rows)
    for row in rows[:: ro.group_size][:n_print]:
        (bar.write if bar is not None else print)(
            f"  step {step} reward {row['reward']:+.3f} advantage {row['advantage']:+.3f} | "
            f"{row['prompt'][:50]!r} -> {row['completion'][:70]!r}")
