"""The main job in its miniature preset: every stage runs, writes its checkpoint, and the report has its row."""

import os
import subprocess
import sys
from pathlib import Path

from minialign.pipeline import STAGES

ROOT = Path(__file__).resolve().parents[1]
ENV = dict(os.environ, OMP_NUM_THREADS="1")  # tiny models: one thread, immune to a busy second core


def test_pipeline_tiny(tmp_path):
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "minialign.pipeline", "--preset", "tiny", "--out", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert (out / "tokenizer" / "tokenizer.model").exists()
    report = (out / "report.md").read_text()
    for stage in STAGES:
        for name in ("ckpt.pt", "metrics.jsonl", "config.json"):
            assert (out / stage / name).exists(), f"{stage}/{name} missing"
        assert f"| {stage} |" in report, f"no {stage} row in the report"
        if stage != "rm":
            assert (out / stage / "eval.json").exists()
    # a second run skips the finished stages
    proc = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0
    for stage in ("tokenizer", *STAGES):
        assert f"[{stage}] already done" in proc.stdout
