"""No run silently destroys another: a training script whose --out_dir already holds a run (a ckpt.pt or a
metrics.jsonl) refuses to start unless --resume or --overwrite says what to do with it
(minialign.training.checkpoint.check_out_dir); the drivers (the main job, the IMDb experiment) pass the flag they
mean (minialign.experiments.stages.continue_flags)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import ROOT

import train_sft
from minialign.errors import UserError
from minialign.experiments import stages
from minialign.experiments.imdb import run as imdb
from minialign.training import checkpoint


@pytest.fixture(scope="module")
def sft_data(tmp_path_factory):
    path = tmp_path_factory.mktemp("overwrite") / "sft.jsonl"
    path.write_text("".join((ROOT / "data" / "sft_train.jsonl").read_text().splitlines(True)[:64]))
    return path


def sft_args(tok, data, out, *extra):
    return ["--data", str(data), "--eval_data", "", "--tokenizer", tok.path, "--out_dir", str(out),
            "--micro_batch_size", "8", "--grad_accum", "1", "--max_steps", "3", "--warmup_steps", "1",
            "--log_every", "1", *extra]


def snapshot(folder: Path) -> dict:
    """Every file under folder with its bytes and mtime, and the folder's own mtime: what "nothing touched" means."""
    files = {str(p.relative_to(folder)): (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(folder.rglob("*"))
             if p.is_file()}
    return {"files": files, "dir_mtime": folder.stat().st_mtime_ns}


def logged_steps(out):
    return [json.loads(l)["step"] for l in (Path(out) / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def finished_run(tok, sft_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "sft"
    train_sft.main(sft_args(tok, sft_data, out))
    return out


def test_a_folder_holding_a_run_is_refused_in_one_line_and_nothing_is_touched(tok, sft_data, finished_run):
    before = snapshot(finished_run)
    proc = subprocess.run([sys.executable, "train_sft.py", *sft_args(tok, sft_data, finished_run, "--max_steps", "5")],
                          cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "MINIALIGN_DEBUG": "", "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    (line,) = proc.stderr.strip().splitlines()
    assert line == (f"train_sft.py: error: --out_dir {finished_run} already holds a run (train_sft.py, step 3 of 3, "
                    "finished; ckpt.pt, metrics.jsonl, config.json): pass --resume to continue it, --overwrite to "
                    "replace it, or another --out_dir")
    assert snapshot(finished_run) == before  # refused before anything was written


def test_resume_and_overwrite_together_are_refused_naming_both(tok, sft_data, finished_run, capsys):
    before = snapshot(finished_run)
    with pytest.raises(SystemExit) as err:
        train_sft.main(sft_args(tok, sft_data, finished_run, "--resume", "--overwrite"))
    assert err.value.code == 2
    assert "--resume and --overwrite together" in capsys.readouterr().err
    assert snapshot(finished_run) == before


def test_overwrite_replaces_the_run(tok, sft_data, tmp_path):
    out = tmp_path / "sft"
    train_sft.main(sft_args(tok, sft_data, out))
    old = torch.load(out / "ckpt.pt", weights_only=False)
    train_sft.main(sft_args(tok, sft_data, out, "--overwrite", "--max_steps", "2", "--seed", "7"))
    new = torch.load(out / "ckpt.pt", weights_only=False)
    assert new["step"] == 2 and new["finished"] and new["config"]["seed"] == 7 and old["config"]["seed"] == 1337
    assert logged_steps(out) == [1, 2]  # the old metrics.jsonl went with the old run
    assert new["script"] == "train_sft.py"


def test_resume_continues_the_run_and_a_plain_rerun_of_a_stopped_one_is_refused(tok, sft_data, tmp_path):
    out = tmp_path / "sft"
    train_sft.main(sft_args(tok, sft_data, out, "--stop_after_steps", "1"))
    with pytest.raises(UserError, match=r"already holds a run \(train_sft.py, step 1 of 3, not finished; ckpt.pt"):
        train_sft.main(sft_args(tok, sft_data, out))
    train_sft.main(sft_args(tok, sft_data, out, "--resume"))
    ckpt = torch.load(out / "ckpt.pt", weights_only=False)
    assert ckpt["step"] == 3 and ckpt["finished"] and logged_steps(out) == [1, 2, 3]


def test_leftovers_without_a_checkpoint_are_a_run_too_and_resume_needs_a_checkpoint(tok, sft_data, tmp_path):
    out = tmp_path / "killed_early"
    out.mkdir()
    (out / "metrics.jsonl").write_text('{"step": 1, "loss": 5.0}\n{"step": 2, "loss": 4.')  # killed mid-line
    with pytest.raises(UserError, match="metrics.jsonl logged up to step 1 and no checkpoint"):
        train_sft.main(sft_args(tok, sft_data, out))
    with pytest.raises(UserError, match=r"--resume: --out_dir .* holds no checkpoint \(ckpt.pt\) to continue"):
        train_sft.main(sft_args(tok, sft_data, out, "--resume"))
    with pytest.raises(UserError, match="holds no checkpoint"):
        train_sft.main(sft_args(tok, sft_data, tmp_path / "empty", "--resume"))
    train_sft.main(sft_args(tok, sft_data, out, "--overwrite", "--max_steps", "1"))
    assert logged_steps(out) == [1]


def test_an_empty_or_unrelated_folder_is_fine(tok, sft_data, tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    train_sft.main(sft_args(tok, sft_data, out, "--max_steps", "1"))
    assert (out / "notes.txt").read_text() == "mine" and (out / "ckpt.pt").exists()


def fake_run(folder: Path, step: int, finished: bool):
    folder.mkdir(parents=True, exist_ok=True)
    torch.save({"step": step, "finished": finished, "config": {"max_steps": 10}, "script": "train_dpo.py"},
               folder / "ckpt.pt")


def test_drivers_name_the_flag_they_mean(tmp_path):
    """continue_flags: an empty folder needs nothing, an unfinished checkpoint is resumed, a rerun (--force) or
    leftovers without a checkpoint are overwritten; the IMDb runs resume from a checkpoint, else overwrite."""
    assert stages.continue_flags(tmp_path / "none") == []
    fake_run(tmp_path / "stopped", 4, finished=False)
    assert stages.continue_flags(tmp_path / "stopped") == ["--resume"]
    assert stages.continue_flags(tmp_path / "stopped", force=True) == ["--overwrite"]
    fake_run(tmp_path / "done", 10, finished=True)
    assert stages.continue_flags(tmp_path / "done", force=True) == ["--overwrite"]
    (tmp_path / "early").mkdir()
    (tmp_path / "early" / "metrics.jsonl").write_text('{"step": 2}\n')
    assert stages.continue_flags(tmp_path / "early") == ["--overwrite"]
    assert checkpoint.run_state(tmp_path / "stopped") == {
        "script": "train_dpo.py", "step": 4, "max_steps": 10, "finished": False, "checkpoint": True,
        "files": ["ckpt.pt"]}
    assert imdb.ckpt_step(tmp_path / "early") == 0 and imdb.ckpt_step(tmp_path / "stopped") == 4
    assert imdb.continue_or_start(0) == ["--overwrite"] and imdb.continue_or_start(4) == ["--resume"]


def test_the_main_job_passes_resume_or_overwrite(tmp_path, monkeypatch):
    """The main job's commands: a stopped stage gets --resume, an empty one nothing, and with --force --overwrite."""
    from minialign import pipeline
    seen = {}
    monkeypatch.setattr(stages, "run_all", lambda st, *a, **k: seen.update({s.name: s.cmd for s in st}))
    monkeypatch.setattr(pipeline.report, "write_report", lambda out: "")
    fake_run(tmp_path / "dpo", 2, finished=False)
    fake_run(tmp_path / "sft", 6, finished=True)
    pipeline.run_stages(tmp_path, "tok.model", ["sft", "rm", "dpo"], pipeline.PRESETS["tiny"], [], force=False)
    assert "--resume" in seen["dpo"] and not {"--resume", "--overwrite"} & set(seen["rm"])
    pipeline.run_stages(tmp_path, "tok.model", ["sft", "rm", "dpo"], pipeline.PRESETS["tiny"], [], force=True)
    assert "--overwrite" in seen["sft"] and "--overwrite" in seen["dpo"] and "--overwrite" not in seen["rm"]


def test_imdb_force_deletes_only_a_folder_of_its_own(tmp_path):
    """--force deletes --out, so it refuses a --out holding what the experiment never writes (here a main job's
    seed folder), before reading any data."""
    out = tmp_path / "out"
    fake_run(out / "sft", 6, finished=True)
    (out / "seed_1").mkdir()
    before = snapshot(out)
    with pytest.raises(UserError, match=r"--force deletes --out .*, which holds what this experiment does not write "
                                         r"\(seed_1\); give the experiment its own --out"):
        imdb.run_experiment(tmp_path / "no_such_imdb.tar.gz", out, force=True)
    assert snapshot(out) == before
