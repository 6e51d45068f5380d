"""The main job: run every stage on the default task, evaluate each with the gold rule, write a report.

    python -m minialign.pipeline                 # -> out/ (one folder per stage) and out/report.md

Stages run as the same commands a user would type (printed before each runs), in subprocesses, so
each stage is exactly the top-level script you can read. A finished stage is skipped unless --force; an
unfinished one (an interrupted pipeline) continues from its checkpoint with --resume, and a stage run again
gets --overwrite (the scripts refuse a folder holding a run without one of them). On a CPU machine two
stages that do not depend on each other run at once (--jobs 2: RM then PPO beside DPO then GRPO), each
with half the cores and its output in out/logs/<stage>.log; a stage that must run alone (SFT) runs in
the foreground with its progress bar. --jobs 1 runs them one after the other, all in the foreground.

Stages: tokenizer -> SFT -> reward model -> DPO, PPO (with the reward model), GRPO (with the gold rule),
each policy evaluated on the same 600 held-out prompts of data/rl_eval.jsonl (gold score sampled at
temperature 1 and greedy, KL to the SFT model, length, refusal rates); the reward model by its
pairwise accuracy on data/pref_eval.jsonl. Each stage prints a one-line summary as it ends.

The report (minialign/evaluation/report.py; rebuild it any time with `python -m minialign.evaluation.report --out out`):
out/report.md with the table, and with matplotlib installed out/plots/ with the training curves, the
reward model's chosen vs rejected scores, the gold score per stage, and gold score against KL to SFT.

    python -m minialign.pipeline --preset full --out out_full   # every script at its own defaults (2.3-3.1x the
                                                                # main job's RM and RL steps), in its own folder
    python -m minialign.pipeline --preset gpu --out out_gpu     # MiniMind 26M on a CUDA machine (bf16), more steps
    python -m minialign.pipeline --stages sft rm # only some stages (each needs the ones before it)
    python -m minialign.pipeline --seeds 1337 1 2 --out out_seeds   # the README's figures

The main job ends with rm_diagnostics (python -m minialign.evaluation.rm_diagnostics: each policy's reward-model
score distribution, RM vs gold, length bias, the best-of-N over-optimization curve) at its cheap size (the cpu
preset: 200 held-out + 100 training prompts per policy, best-of-N to N = 64 on 32 prompts), into
out/rm_diagnostics.json, out/plots/rm_*.png and the report; `python -m minialign.evaluation.rm_diagnostics --out
out` afterwards redoes it at the module's size (200 + 200 prompts, N to 256).

Optional stages, not in the main job (it stays within its time budget), run when named:
    python -m minialign.pipeline --stages online_dpo iterative_dpo best_of_n    # after sft and rm exist
  online_dpo     train_online_dpo.py --reward_funcs gold: DPO on the policy's own samples, judged by the rule
  iterative_dpo  the same with --rounds 3 --lr 2e-4: 3 rounds of (sample, judge, offline DPO against SFT)
  best_of_n      python -m minialign.evaluation.best_of_n with the reward model as the judge: gold vs exact KL, N <= 16

--seeds runs the whole pipeline once per seed (every stage gets --seed S) into OUT/seed_S/, sharing one
tokenizer, and writes OUT/seeds.md: each number as the median [min, max] over the seeds, with this
machine's measured fp32 matmul GFLOP/s so the wall times can be scaled to another machine.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import platform
import shlex
import sys
import time
from pathlib import Path

from minialign.errors import run_cli
from minialign.evaluation import report
from minialign.evaluation.report import OPTIONAL_STAGES, STAGES
from minialign.experiments import stages

DIAGNOSTICS = "rm_diagnostics"  # reads every stage folder present, writes OUT/rm_diagnostics.*
EXTRA_STAGES = (*OPTIONAL_STAGES, "best_of_n")  # run only when named in --stages
MAIN_JOB = (*STAGES, DIAGNOSTICS)  # the cpu preset draws its cheap part (below); the module's defaults do it all

# Extra flags per stage, on top of the scripts' own defaults.
#   cpu  : the main job, sized to finish within 10 minutes on a 2-core CPU with ~100 GFLOP/s fp32 matmul
#          (the "cpu" model preset, 0.9M parameters): SFT at its script's 600 steps (most of the time, but
#          fewer lose the arithmetic and every later stage pays: 520 steps cost PPO and GRPO 4-12 points of
#          gold over two seeds), the RM, DPO, PPO and GRPO at 32-43% of their scripts' steps, plus
#          gold-vs-KL points (100 prompts) as they train.
#   full : every script's own defaults (2.3-3.1x the RM and RL steps of cpu; the better numbers of each script's docs).
#   gpu  : the MiniMind 26M architecture (dim 512, 8 layers) with learning rates scaled down for its size
#          and more steps; run it on a CUDA machine (bf16 autocast is the default there).
#   tiny : every stage (the optional ones too) for a few steps, for tests.
GOLD_CURVE = ["--gold_eval_every", "30"]
PRESETS = {
    "cpu": {"sft": [], "rm": ["--max_steps", "160"],
            "dpo": ["--max_steps", "64", "--gold_eval_every", "16", "--gold_eval_prompts", "100"],
            "ppo": ["--max_steps", "32", "--gold_eval_every", "8", "--gold_eval_prompts", "100"],
            "grpo": ["--max_steps", "64", "--gold_eval_every", "16", "--gold_eval_prompts", "100"],
            # the cheap part of the diagnostics: 200 held-out + 100 training prompts per policy, best-of-N to 64 on
            # 32 prompts (`python -m minialign.evaluation.rm_diagnostics --out out` afterwards: 600 + 200, N to 256)
            DIAGNOSTICS: ["--n_eval", "200", "--n_train", "100", "--bon_prompts", "32", "--bon_max_n", "64"]},
    "full": {"sft": [], "rm": [], "dpo": GOLD_CURVE, "ppo": ["--gold_eval_every", "20"], "grpo": GOLD_CURVE},
    "gpu": {
        "sft": ["--preset", "minimind-26m", "--lr", "1e-3", "--warmup_steps", "50", "--max_steps", "1500"],
        "rm": ["--lr", "1e-4", "--max_steps", "600"],
        "dpo": ["--lr", "5e-5", "--max_steps", "300", "--gold_eval_every", "30"],
        "ppo": ["--lr", "5e-5", "--max_steps", "200", "--gold_eval_every", "20"],
        "grpo": ["--lr", "1e-4", "--max_steps", "300", "--prompts_per_step", "32", "--gold_eval_every", "30"],
    },
    "tiny": {
        "sft": ["--max_steps", "6", "--eval_prompts", "16", "--micro_batch_size", "8"],
        "rm": ["--max_steps", "4", "--micro_batch_pairs", "4", "--eval_every", "0"],
        "dpo": ["--max_steps", "3", "--micro_batch_pairs", "8", "--eval_prompts", "16", "--gold_eval_every", "1",
                "--gold_eval_prompts", "8"],
        "ppo": ["--max_steps", "2", "--prompts_per_step", "8", "--eval_prompts", "16", "--max_new_tokens", "16",
                "--gold_eval_every", "1", "--gold_eval_prompts", "8"],
        "grpo": ["--max_steps", "2", "--prompts_per_step", "4", "--num_generations", "4", "--eval_prompts", "16",
                 "--max_new_tokens", "16",
                 "--gold_eval_every", "1", "--gold_eval_prompts", "8"],
        "online_dpo": ["--max_steps", "2", "--prompts_per_step", "4", "--num_generations", "3", "--eval_prompts", "16",
                       "--max_new_tokens", "16", "--gold_eval_every", "1", "--gold_eval_prompts", "8"],
        "iterative_dpo": ["--max_steps", "3", "--prompts_per_round", "8", "--pairs_per_step", "4",
                          "--eval_prompts", "16", "--max_new_tokens", "16", "--gold_eval_prompts", "8"],
        "best_of_n": ["--n_prompts", "8", "--max_n", "4", "--max_new_tokens", "16"],
        "rm_diagnostics": ["--n_eval", "16", "--n_train", "16", "--max_new_tokens", "16", "--bon_prompts", "4",
                           "--bon_max_n", "8"],
    },
}


def stage_done(out: Path, stage: str) -> bool:
    if stage == "tokenizer":
        return (out / "tokenizer" / "tokenizer.model").exists()
    if stage == DIAGNOSTICS:
        return (out / "rm_diagnostics.json").exists() and (out / "rm_diagnostics.md").exists()
    if stage == "best_of_n":  # an older points.json (analytic KL only) is redone
        return report.has_exact_kl(report.read_json(out / "best_of_n" / "points.json"))
    return stages.run_finished(out / stage)


def summary(out: Path, stage: str) -> str:
    """The one line printed when a stage ends: what its evaluation says."""
    if stage == "best_of_n":
        res = report.read_json(out / "best_of_n" / "points.json")
        return ", ".join(f"N={p['n']} gold {p['gold_score']:.3f} (KL {p['kl']:.2f})"
                         for p in res["points"][:: max(1, len(res["points"]) - 1)]) if res else ""
    if stage == DIAGNOSTICS:
        res = report.read_json(out / "rm_diagnostics.json")
        if not res:
            return ""
        fit = res["splits"]["eval"]["pooled_length_bias"]["all"]
        slope = (f"RM score per token {fit['slope']:+.4f} ± {fit['se']:.4f}" if fit.get("se") is not None
                 else "RM length slope undetermined")
        bon = (res.get("overoptimization") or {}).get("best_of_n")
        bon_text = (f", best-of-{bon[-1]['n']} proxy {bon[-1]['judge_score']:.2f} gold {bon[-1]['gold_score']:.3f}"
                    if bon else "")
        return f"{slope} (held-out, all policies){bon_text}; {out / 'rm_diagnostics.md'}"
    if stage == "rm":
        scores = report.read_json(out / "rm" / "rm_scores.json")
        return f"held-out pair accuracy {scores['eval_accuracy']:.3f}" if scores else ""
    r = report.read_json(out / stage / "eval.json")
    if not r:
        return ""
    kl = f", KL to SFT {r['sampled/kl_to_ref']:.2f}" if r.get("sampled/kl_to_ref") is not None else ""
    return (f"gold {r['sampled/gold_score']:.3f} sampled, {r['greedy/gold_score']:.3f} greedy{kl}, "
            f"mean length {r['sampled/mean_length']:.1f}")


TRAINING = {"sft", "rm", "dpo", "ppo", "grpo", "online_dpo", "iterative_dpo"}  # stages that are train_*.py scripts

NEEDS = {  # the stages whose outputs a stage reads
    "sft": (), "rm": ("sft",), "dpo": ("sft",), "ppo": ("sft", "rm"), "grpo": ("sft",),
    "online_dpo": ("sft",), "iterative_dpo": ("sft",), "best_of_n": ("sft", "rm"),
    DIAGNOSTICS: (*STAGES, *OPTIONAL_STAGES),  # every policy present (those not run are skipped)
}


def finished(out: Path, name: str, seconds: float):
    print(f"[{name}] done in {seconds:.0f}s: {summary(out, name)}".rstrip(": "), flush=True)


def stage(out: Path, name: str, cmd: list) -> stages.Stage:
    return stages.Stage(name, cmd, done=lambda: stage_done(out, name), needs=NEEDS.get(name, ()), where=str(out / name))


def main(argv=None):
    ap = argparse.ArgumentParser(description="Run the whole minialign pipeline on the default task.")
    ap.add_argument("--out", default="out", help="output root; one folder per stage")
    ap.add_argument("--preset", default="cpu", choices=sorted(PRESETS),
                    help="cpu: the main job, 0.9M model, minutes on a 2-core laptop; full: every script's own "
                         "defaults; gpu: MiniMind 26M on a CUDA machine; tiny: seconds, for tests")
    ap.add_argument("--force", action="store_true", help="rerun stages whose outputs exist (their scripts get --overwrite)")
    ap.add_argument("--stages", nargs="+", default=list(MAIN_JOB), choices=(*MAIN_JOB, *EXTRA_STAGES),
                    help="stages to run after the tokenizer (in this order); the default is the main job, "
                         f"{', '.join(EXTRA_STAGES)} are optional")
    ap.add_argument("--seeds", nargs="+", type=int, default=[],
                    help="run the pipeline once per seed into OUT/seed_S and write OUT/seeds.md (medians and ranges)")
    ap.add_argument("--jobs", type=int, default=0,
                    help="stages run at once where they do not depend on each other (0 = auto: 2 on a CPU machine "
                         "with >= 2 cores, else 1); with 1 each stage prints its progress here")
    args = ap.parse_args(argv)
    if args.jobs < 0:
        ap.error(f"--jobs={args.jobs} must be >= 0")
    jobs = args.jobs or auto_jobs(args.preset)
    out = Path(args.out).resolve()
    t0 = time.time()
    seconds = stages.run(stage(out, "tokenizer", [sys.executable, "-m", "minialign.data.tokenizer", "--out",
                                                  out / "tokenizer"]), out, args.force)
    if seconds is not None:
        finished(out, "tokenizer", seconds)
    tok = str(out / "tokenizer/tokenizer.model")
    if not args.seeds:
        table = run_stages(out, tok, args.stages, PRESETS[args.preset], [], args.force, jobs)
        seconds = time.time() - t0
        print(f"\n{table}\n\npipeline finished in {seconds:.0f}s (this machine's fp32 matmul: "
              f"{report.matmul_gflops():.0f} GFLOP/s, to scale the time); report: {out / 'report.md'}"
              + ("" if importlib.util.find_spec("matplotlib") else " (no plots: pip install matplotlib)"))
        return
    walls = []
    for seed in args.seeds:
        print(f"===== seed {seed} =====", flush=True)
        t_seed = time.time()
        run_stages(out / f"seed_{seed}", tok, args.stages, PRESETS[args.preset], ["--seed", str(seed)], args.force,
                   jobs)
        walls.append(time.time() - t_seed)
        print(f"===== seed {seed} finished in {walls[-1]:.0f}s", flush=True)
    gflops = report.matmul_gflops()
    table = report.seed_table([out / f"seed_{seed}" for seed in args.seeds])
    given = argv if argv is not None else sys.argv[1:]
    cmd = "python -m minialign.pipeline " + " ".join(shlex.quote(str(a)) for a in given)
    (out / "seeds.md").write_text(
        f"# minialign pipeline over {len(args.seeds)} seeds\n\nEach cell: median [min, max] over seeds "
        f"{', '.join(map(str, args.seeds))} (preset {args.preset}). Command: `{cmd}`. This machine: "
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, fp32 matmul {gflops:.0f} GFLOP/s "
        f"(measured at the end, torch {torch_version()}); total wall time {time.time() - t0:.0f} s; per seed (its "
        f"stages, with --jobs {jobs}): {', '.join(f'{w:.0f} s' for w in walls)}.\n\n{table}\n")
    print(f"\n{table}\n\n{len(args.seeds)} seeds finished in {time.time() - t0:.0f}s; fp32 matmul {gflops:.0f} "
          f"GFLOP/s; summary: {out / 'seeds.md'}")


def auto_jobs(preset: str) -> int:
    """2 on a CPU machine with >= 2 cores (the stages' tiny models use a second thread poorly, a second stage well);
    1 with a GPU (one device) or for the gpu preset."""
    import torch
    if preset == "gpu" or torch.cuda.is_available() or (os.cpu_count() or 1) < 2:
        return 1
    return 2


def torch_version() -> str:
    import torch
    return torch.__version__


def stage_commands(out: Path, tok: str) -> dict[str, list[str]]:
    """Each stage's command (before --out_dir and the preset's flags)."""
    py = sys.executable
    return {
        "sft": [py, "train_sft.py", "--tokenizer", tok],
        "rm": [py, "train_rm.py", "--init_from", str(out / "sft")],
        "dpo": [py, "train_dpo.py", "--init_from", str(out / "sft")],
        "ppo": [py, "train_ppo.py", "--init_from", str(out / "sft"), "--reward_model", str(out / "rm")],
        "grpo": [py, "train_grpo.py", "--init_from", str(out / "sft")],
        "online_dpo": [py, "train_online_dpo.py", "--init_from", str(out / "sft"), "--reward_funcs", "gold",
                       "--gold_eval_every", "30"],
        "iterative_dpo": [py, "train_online_dpo.py", "--init_from", str(out / "sft"), "--reward_funcs", "gold",
                          "--rounds", "3", "--lr", "2e-4"],
        "best_of_n": [py, "-m", "minialign.evaluation.best_of_n", "--ckpt", str(out / "sft"), "--reward_model", str(out / "rm")],
        DIAGNOSTICS: [py, "-m", "minialign.evaluation.rm_diagnostics", "--out", str(out)],
    }


def run_stages(out: Path, tok: str, names, steps: dict, extra: list[str], force: bool, jobs: int = 1) -> str:
    """Every stage as its script, in order, into out/<stage>; then out/report.md. Returns the table."""
    commands = stage_commands(out, tok)
    cmds = {name: [*commands[name], *(["--out_dir", str(out / name)] if name != DIAGNOSTICS else []),
                   *steps.get(name, []), *extra,
                   *(stages.continue_flags(out / name, force) if name in TRAINING else [])]
            for name in names}
    stages.run_all([stage(out, name, cmd) for name, cmd in cmds.items()], out, force, jobs,
                   on_done=lambda name, seconds: finished(out, name, seconds))
    return report.write_report(out)


if __name__ == "__main__":
    run_cli(main)
