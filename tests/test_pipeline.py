"""The main job in its miniature preset: every stage runs, writes its checkpoint, and the report has its row
and its plots; the other presets' flags are all accepted by the stage scripts."""

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from minialign.evaluation import best_of_n, report, rm_diagnostics
from minialign.evaluation.rm_diagnostics import PLOTS as RM_PLOTS
from minialign.pipeline import PRESETS, STAGES, stage_commands
from minialign.training import checkpoint, config

ROOT = Path(__file__).resolve().parents[1]
ENV = dict(os.environ, OMP_NUM_THREADS="1")  # tiny models: one thread, immune to a busy second core
SCRIPTS = {"sft": "train_sft", "rm": "train_rm", "dpo": "train_dpo", "ppo": "train_ppo", "grpo": "train_grpo",
           "online_dpo": "train_online_dpo", "iterative_dpo": "train_online_dpo"}
HAS_MATPLOTLIB = importlib.util.find_spec("matplotlib") is not None


def check_rm_diagnostics(out, report_md: str):
    """The main job's last stage, rm_diagnostics at the tiny preset's size (16 held-out + 16 training prompts per
    policy, best-of-N to 8 on 4 prompts): every policy's samples on both splits, the best-of-N curve, PPO's
    same-samples curve from the SFT point, and its section in the report."""
    res = json.loads((out / "rm_diagnostics.json").read_text())
    assert res["policies"] == ["sft", "dpo", "ppo", "grpo"] and res["n_prompts"] == {"eval": 16, "train": 16}
    for split in ("eval", "train"):
        for p in res["policies"]:
            v, d = res["samples"][split][p], res["splits"][split]["policies"][p]
            assert len(v["rm"]) == len(v["gold"]) == len(v["length"]) == res["n_prompts"][split]
            assert sum(d["distribution"]["counts"]) == len(v["rm"])
            assert d["rm_vs_gold"]["n_correct"] == sum(g > 0.5 for g in v["gold"])
    # the training prompts are a sample of rl_train.jsonl, not the held-out ones: different samples
    assert res["samples"]["train"]["sft"]["rm"] != res["samples"]["eval"]["sft"]["rm"]
    assert res["splits"]["eval"]["policies"]["sft"]["kl_to_sft"] == 0.0
    bon = res["overoptimization"]["best_of_n"]
    assert [p["n"] for p in bon] == [1, 2, 4, 8] and bon[0]["sqrt_kl"] == 0.0
    ppo = res["overoptimization"]["ppo"]  # the tiny PPO logs gold points (with its RM's score) every step
    assert ppo["same_samples"] and ppo["gold"] and ppo["proxy"] == ppo["gold"]
    assert ppo["gold"][0]["step"] == 0 and ppo["gold"][0]["sqrt_kl"] == 0.0  # the SFT point, taken there
    assert [p["step"] for p in ppo["gold"][1:]] == [1]  # max_steps 2: a gold point after step 1 (not at the end)
    assert "## Reward-model diagnostics" in report_md and "| train | ppo |" in report_md


def test_pipeline_tiny(tmp_path):
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "minialign.pipeline", "--preset", "tiny", "--out", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert (out / "tokenizer" / "tokenizer.model").exists()
    report_md = (out / "report.md").read_text()
    timings = json.loads((out / "timings.json").read_text())
    for stage in STAGES:
        # each stage trained exactly its preset's steps, from the stage before it, and finished
        ckpt = checkpoint.load(out / stage)
        steps = PRESETS["tiny"][stage][PRESETS["tiny"][stage].index("--max_steps") + 1]
        assert ckpt["step"] == int(steps) and ckpt["finished"], (stage, ckpt["step"])
        cfg = json.loads((out / stage / "config.json").read_text())
        assert cfg["out_dir"] == str(out / stage)
        if stage != "sft":
            assert cfg["init_from"] == str(out / "sft"), (stage, cfg["init_from"])
        if stage == "ppo":
            assert cfg["reward_model"] == str(out / "rm")
        rows = [json.loads(line) for line in (out / stage / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in rows if "loss" in r][-1] == int(steps)
        if stage != "rm":  # the report's row holds this stage's evaluation numbers and its wall time
            ev = json.loads((out / stage / "eval.json").read_text())
            assert ev["n_prompts"] == 16 and 0 <= ev["sampled/gold_score"] <= 1
            row = f"| {stage} | {timings[stage]:.0f} | {ev['sampled/gold_score']:.3f} | {ev['greedy/gold_score']:.3f} |"
            assert row in report_md, (row, report_md)
            line = proc.stdout.split(f"[{stage}] done in")[1].splitlines()[0]
            assert f"{ev['sampled/gold_score']:.3f}" in line
    assert "held-out pair accuracy" in proc.stdout.split("[rm] done in")[1].splitlines()[0]
    # the gold-vs-KL curve has a point logged during training (step 1 of 2 or 3), besides the final evaluation
    for stage in ("dpo", "ppo", "grpo"):
        rows = [json.loads(l) for l in (out / stage / "metrics.jsonl").read_text().splitlines()]
        gold_steps = [r["step"] for r in rows if "sampled/gold_score" in r and "sampled/kl_to_ref" in r]
        assert gold_steps[0] == 1 and len(gold_steps) >= 2, (stage, gold_steps)
    check_rm_diagnostics(out, report_md)
    plots = ["training_curves.png", "rm_scores.png", "gold_per_stage.png", "gold_vs_kl.png", *RM_PLOTS]
    if HAS_MATPLOTLIB:
        for name in plots:
            assert (out / "plots" / name).stat().st_size > 1000, name
            assert f"(plots/{name})" in report_md
    else:
        assert "No plots: matplotlib is not installed" in report_md
    # a second run skips the finished stages and keeps their wall times in the report
    proc = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0
    for stage in ("tokenizer", *STAGES):
        assert f"[{stage}] already done" in proc.stdout
    assert json.loads((out / "timings.json").read_text()) == timings
    assert (out / "report.md").read_text() == report_md
    # the optional stages have tiny presets too, and run from the finished SFT (and RM) stages
    proc = subprocess.run(cmd + ["--stages", "online_dpo", "iterative_dpo", "best_of_n"], cwd=ROOT, env=ENV,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for stage in ("online_dpo", "iterative_dpo"):
        assert "sampled/gold_score" in json.loads((out / stage / "eval.json").read_text())
        assert f"| {stage} | " in (out / "report.md").read_text()
    rounds = [json.loads(l) for l in (out / "iterative_dpo" / "metrics.jsonl").read_text().splitlines()]
    assert sorted({r["round"] for r in rounds if "round" in r}) == [1, 2, 3]
    points = json.loads((out / "best_of_n" / "points.json").read_text())["points"]
    assert [p["n"] for p in points] == [1, 2, 4] and "N=4 gold" in proc.stdout


def test_report_without_matplotlib_still_writes_the_table(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    (tmp_path / "sft").mkdir()
    (tmp_path / "sft" / "eval.json").write_text(json.dumps({"sampled/gold_score": 0.5, "greedy/gold_score": 0.75,
                                                            "sampled/mean_length": 12.0, "n_prompts": 3}))
    report.record_timing(tmp_path, "sft", 61.4)
    table = report.write_report(tmp_path)
    assert "| sft | 61 | 0.500 | 0.750 | - | 12.000 |" in table
    text = (tmp_path / "report.md").read_text()
    assert "No plots: matplotlib is not installed" in text and not (tmp_path / "plots").exists()


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_every_preset_flag_is_accepted_by_its_script(preset, monkeypatch):
    """A typo in a preset (e.g. the GPU one, which no test here can run) fails now, not after an hour of SFT."""
    monkeypatch.syspath_prepend(str(ROOT))
    commands = stage_commands(ROOT / "out", "out/tokenizer/tokenizer.model")
    for stage, flags in PRESETS[preset].items():
        modules = {"best_of_n": best_of_n, "rm_diagnostics": rm_diagnostics}  # the -m modules among the stages
        base = commands[stage][3 if stage in modules else 2:]  # after the interpreter and the script (-m module)
        if stage in modules:
            cfg = modules[stage].build_parser().parse_args(base + flags)
        else:
            cfg = config.parse_config(importlib.import_module(SCRIPTS[stage]).Config, base + flags)
        for flag, value in zip(flags, flags[1:]):
            if flag.startswith("--"):
                assert str(getattr(cfg, flag[2:])) == value or getattr(cfg, flag[2:]) == type(getattr(cfg, flag[2:]))(value)


def test_seeds_run_each_seed_and_write_medians_with_the_machine(tmp_path):
    """--seeds: one pipeline per seed (stages get --seed S), one shared tokenizer, seeds.md with median [min, max]
    over the seeds and the measured matmul GFLOP/s. Two seeds, SFT and RM only, to stay quick."""
    from conftest import run
    out = tmp_path / "out"
    proc = run([sys.executable, "-m", "minialign.pipeline", "--preset", "tiny", "--out", out, "--stages", "sft", "rm",
                "--seeds", "3", "4"], timeout=600)
    for seed in (3, 4):
        assert json.loads((out / f"seed_{seed}" / "sft" / "config.json").read_text())["seed"] == seed
        assert (out / f"seed_{seed}" / "report.md").exists()
    assert not (out / "seed_3" / "tokenizer").exists()  # shared: out/tokenizer
    gold = sorted(json.loads((out / f"seed_{s}" / "sft" / "eval.json").read_text())["sampled/gold_score"] for s in (3, 4))
    text = (out / "seeds.md").read_text()
    assert "GFLOP/s" in text and "median [min, max] over seeds 3, 4" in text
    median = (gold[0] + gold[1]) / 2  # statistics.median of two values
    assert "| sft | " in text and f"{median:.3f} [{gold[0]:.3f}, {gold[1]:.3f}]" in text
    assert "2 seeds finished" in proc.stdout


def test_negative_jobs_is_refused_naming_the_flag(tmp_path, capsys):
    from minialign import pipeline
    with pytest.raises(SystemExit) as err:
        pipeline.main(["--jobs", "-1", "--out", str(tmp_path)])
    assert err.value.code == 2 and "--jobs=-1 must be >= 0" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())  # refused before the tokenizer stage
