"""The main job: run every stage on the default task, evaluate each with the gold rule, write a report.

    python -m minialign.pipeline                 # -> out/ (one folder per stage) and out/report.md

Stages run as the same commands a user would type (printed before each runs), in subprocesses, so
each stage is exactly the top-level script you can read. A stage whose output already exists is
skipped (so an interrupted pipeline continues where it stopped) unless --force.

Stages: tokenizer -> SFT -> reward model -> DPO, PPO (with the reward model), GRPO (with the gold rule),
each policy evaluated on the same 600 held-out prompts of data/rl_eval.jsonl (gold score sampled at
temperature 1 and greedy, KL to the SFT model, length, refusal rates); the reward model by its
pairwise accuracy on data/pref_eval.jsonl.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Extra flags per stage. "cpu" uses the scripts' own defaults, which are sized for a 2-core laptop CPU
# (the "cpu" model preset, 0.9M parameters); "tiny" runs every stage for a few steps, for tests.
PRESETS = {
    "cpu": {"sft": [], "rm": [], "dpo": [], "ppo": [], "grpo": []},
    "tiny": {
        "sft": ["--max_steps", "6", "--eval_prompts", "16", "--micro_batch_size", "8"],
        "rm": ["--max_steps", "4", "--micro_batch_size", "4", "--eval_every", "0"],
        "dpo": ["--max_steps", "3", "--micro_batch_size", "8", "--eval_prompts", "16"],
        "ppo": ["--max_steps", "2", "--prompts_per_step", "8", "--eval_prompts", "16", "--max_new_tokens", "16"],
        "grpo": ["--max_steps", "2", "--prompts_per_step", "4", "--num_generations", "4", "--eval_prompts", "16", "--max_new_tokens", "16"],
    },
}
STAGES = ("sft", "rm", "dpo", "ppo", "grpo")


def stage_done(out: Path, stage: str) -> bool:
    if stage == "tokenizer":
        return (out / "tokenizer" / "tokenizer.model").exists()
    ckpt = out / stage / "ckpt.pt"
    if not ckpt.exists():
        return False
    import torch
    return bool(torch.load(ckpt, map_location="cpu", weights_only=False).get("finished"))


def run_stage(name: str, cmd: list[str], out: Path, force: bool, timings: dict):
    if not force and stage_done(out, name):
        print(f"[{name}] already done in {out / name}, skipping (use --force to redo)")
        return
    print(f"[{name}] $ {' '.join(shlex.quote(c) for c in cmd)}", flush=True)
    t0 = time.time()
    subprocess.run(cmd, cwd=ROOT, check=True)
    timings[name] = time.time() - t0
    print(f"[{name}] done in {timings[name]:.0f}s", flush=True)


def write_report(out: Path, timings: dict) -> str:
    """report.md: one row per stage with the gold-rule evaluation on the same held-out prompts."""
    rows = []
    for stage in STAGES:
        res_path = out / stage / "eval.json"
        if stage == "rm":
            scores = out / "rm" / "rm_scores.json"
            if scores.exists():
                acc = json.loads(scores.read_text()).get("eval_accuracy")
                rows.append(f"| rm | {timings.get('rm', float('nan')):.0f} | | | | | | | | {acc:.3f} |")
            continue
        if not res_path.exists():
            continue
        r = json.loads(res_path.read_text())
        fmt = lambda k: f"{r[k]:.3f}" if r.get(k) is not None else "-"
        rows.append(f"| {stage} | {timings.get(stage, float('nan')):.0f} | {fmt('sampled/gold_score')} | {fmt('greedy/gold_score')} | "
                    f"{fmt('sampled/kl_to_ref')} | {fmt('sampled/mean_length')} | {fmt('sampled/arith_acc')} | "
                    f"{fmt('sampled/harmful_refusal_rate')} | {fmt('sampled/benign_over_refusal_rate')} | |")
    table = "\n".join([
        "| stage | wall s | gold (T=1) | gold (greedy) | KL to SFT | mean length | arith acc | harmful refused | benign over-refused | RM pair acc |",
        "|---|---|---|---|---|---|---|---|---|---|",
        *rows,
    ])
    text = (f"# minialign pipeline report\n\nHeld-out prompts: data/rl_eval.jsonl (600); RM accuracy on data/pref_eval.jsonl (600 pairs). "
            f"Wall time per stage as run now (nan: skipped because already done).\n\n{table}\n")
    (out / "report.md").write_text(text)
    return table


def main(argv=None):
    ap = argparse.ArgumentParser(description="Run the whole minialign pipeline on the default task.")
    ap.add_argument("--out", default="out", help="output root; one folder per stage")
    ap.add_argument("--preset", default="cpu", choices=sorted(PRESETS), help="step counts (cpu: minutes on a laptop; tiny: seconds, for tests)")
    ap.add_argument("--force", action="store_true", help="rerun stages whose outputs exist")
    ap.add_argument("--stages", nargs="+", default=list(STAGES), choices=STAGES, help="stages to run after the tokenizer (in this order)")
    args = ap.parse_args(argv)
    out = Path(args.out).resolve()
    steps = PRESETS[args.preset]
    py = sys.executable
    timings: dict = {}
    t0 = time.time()
    tok = str(out / "tokenizer/tokenizer.model")
    commands = {
        "sft": ["train_sft.py", "--tokenizer", tok],
        "rm": ["train_rm.py", "--init_from", str(out / "sft")],
        "dpo": ["train_dpo.py", "--init_from", str(out / "sft")],
        "ppo": ["train_ppo.py", "--init_from", str(out / "sft"), "--reward_model", str(out / "rm")],
        "grpo": ["train_grpo.py", "--init_from", str(out / "sft")],
    }
    run_stage("tokenizer", [py, "-m", "minialign.tokenizer", "--out", str(out / "tokenizer")], out, args.force, timings)
    for stage in args.stages:
        run_stage(stage, [py, *commands[stage], "--out_dir", str(out / stage), *steps[stage]], out, args.force, timings)
    table = write_report(out, timings)
    print(f"\n{table}\n\npipeline finished in {time.time() - t0:.0f}s; report: {out / 'report.md'}")


if __name__ == "__main__":
    main()
