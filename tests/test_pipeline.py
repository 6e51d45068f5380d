"""The main job in its miniature preset: every stage runs, writes its checkpoint, and the report has its row."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_pipeline_tiny(tmp_path):
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "minialign.pipeline", "--preset", "tiny", "--out", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert (out / "tokenizer" / "tokenizer.model").exists()
    assert (out / "sft" / "ckpt.pt").exists() and (out / "sft" / "metrics.jsonl").exists() and (out / "sft" / "config.json").exists()
    report = (out / "report.md").read_text()
    assert "| sft |" in report
    # a second run skips the finished stages
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "[sft] already done" in proc.stdout and "[tokenizer] already done" in proc.stdout
