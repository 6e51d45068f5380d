"""Reward-model diagnostics of an IMDb experiment's output folder: what the learned RM does to each policy's samples.

    python -m minialign.experiments.imdb.rm_diagnostics --out out_imdb     # after python -m minialign.experiments.imdb
                                                                            # writes out_imdb/rm_diagnostics.json, .md
                                                                            # and, with matplotlib, plots/rm_*.png

The IMDb experiment has what the default task's diagnostics (minialign.evaluation.rm_diagnostics) need: a learned
reward model (OUT/rm, trained on pairs ranked by the true reward), the TRUE reward r(x, y) = P(positive | x + y)
of the sentiment classifier (OUT/classifier), and several policies (OUT/sft and the last checkpoint of every run in
OUT/runs). For each policy: one sample per held-out test prefix (OUT/data/eval_prompts.jsonl), and per training
prefix of a seeded sample of --n_train (OUT/data/rl_train.jsonl), at temperature 1 with the experiment's evaluation
seed (minialign.evaluation.evaluate.sample_and_score: same prompts, same random
stream for every policy), scored by the learned RM and the true reward, with the KL to the SFT model. Written with
the default task's functions:

  distribution   the RM scores' mean, std, quantiles and histogram (edges shared by the policies), and the true
                 reward's (edges over [0, 1]);
  rm_vs_true     mean RM score among responses with true reward >= 0.5 and < 0.5, the AUC between the two, and
                 the Pearson correlation of RM score and true reward;
  length_bias    least-squares RM score per token over all responses and within each true-reward bin (< 0.5,
                 >= 0.5: the continuous reward "held fixed" by binning), with standard errors (fit_line).

Over-optimization: best-of-N from the SFT model by the learned RM, its proxy (RM) and true reward against
sqrt(KL) (Gao et al. 2022). By default these are the points the experiment stored (OUT/best_of_n/points.json:
N = 1..max_n, 16 in --quick, on its best-of-N prefixes, KL exact for ties); --bon_max_n N samples a fresh curve to
N (e.g. 256) on the first --bon_prompts prefixes instead (minialign.evaluation.best_of_n).

PPO along its checkpoints: the experiment evaluates every run after each segment (its frontier points); since the
learned RM exists (the rm stage), every point also holds the RM's mean score of the same samples (rm_score), so
PPO's proxy and true reward are drawn against sqrt(KL) from the SFT point (sampled here as the experiment samples
a point). Runs evaluated before that have no rm_score and no curve.

Simplified: one sample per prefix per policy (standard errors treat the responses as independent); the true
reward is binned at 0.5 only.
"""

from __future__ import annotations

import argparse
import math
import random
from pathlib import Path

import torch

from minialign.algorithms.reward_funcs import classifier_reward
from minialign.algorithms.roles import frozen, load_reward_model
from minialign.algorithms.rollout import load_rl_prompts
from minialign.data.tokenizer import load_tokenizer
from minialign.errors import UserError, run_cli
from minialign.evaluation import best_of_n
from minialign.evaluation import rm_diagnostics as rd
from minialign.evaluation.evaluate import reward_model_judge, sample_and_score, text_judge
from minialign.evaluation.report import read_json
from minialign.experiments.imdb.run import COLORS, EVAL_SEED, QUICK, Scale
from minialign.training import checkpoint
from minialign.training.runtime import Runtime

SPLIT, TRAIN = "test", "train"
THRESHOLD = 0.5  # the true-reward bins for "held fixed": [0, 0.5) and [0.5, 1]
LABELS = {"gold_name": "true reward", "split_labels": {SPLIT: "held-out test prefixes", TRAIN: "training prefixes"},
          "outcome_labels": {"correct": f"true reward >= {THRESHOLD}", "incorrect": f"true reward < {THRESHOLD}"}}


def method_of(policy: str) -> str:
    """A run folder's method (runs/dpo_b0.1_s0 -> dpo, runs/ppo_gt_s0 -> ppo_gt)."""
    return next((m for m in sorted(COLORS, key=len, reverse=True) if policy == m or policy.startswith(m + "_")),
                policy)


def pearson(x, y) -> float | None:
    x, y = torch.as_tensor(x, dtype=torch.float64), torch.as_tensor(y, dtype=torch.float64)
    if len(x) < 2 or float(x.std()) == 0 or float(y.std()) == 0:
        return None
    return float(torch.corrcoef(torch.stack([x, y]))[0, 1])


def diagnostics(samples: dict[str, dict], bon_points: list[dict] | None, n_prompts: int,
                train_samples: dict[str, dict] | None = None, n_train: int = 0, ppo_runs: dict | None = None) -> dict:
    """samples (held-out test prefixes) and train_samples (training prefixes): policy -> {"rm", "gold" (the true
    reward), "length" lists, "kl_to_sft"} -> the rm_diagnostics.json dict, laid out as the default task's so
    rm_diagnostics.write_plots draws it (test split first: the length-bias plot reads the first split)."""
    by_split = {SPLIT: samples, **({TRAIN: train_samples} if train_samples else {})}
    true_edges = torch.linspace(0, 1, rd.N_BINS + 1, dtype=torch.float64).tolist()
    splits = {}
    for name, split_samples in by_split.items():
        splits[name] = rd.split_diagnostics(split_samples)
        for policy, v in split_samples.items():
            d = splits[name]["policies"][policy]
            d["true_distribution"] = rd.distribution(v["gold"], true_edges)
            d["rm_vs_gold"]["pearson_rm_true"] = pearson(v["rm"], v["gold"])
    res = {**LABELS, "policies": list(samples), "n_prompts": {SPLIT: n_prompts, **({TRAIN: n_train} if train_samples
                                                                                  else {})},
           "splits": splits, "samples": by_split, "threshold": THRESHOLD,
           "colors": {p: COLORS.get(method_of(p), "black") for p in samples}}
    if bon_points:
        res["overoptimization"] = {"policy": "sft", "judge": "reward_model",
                                   "best_of_n": [{**p, "sqrt_kl": math.sqrt(max(p["kl"], 0.0))} for p in bon_points]}
    if ppo_runs:
        res.setdefault("overoptimization", {})["ppo_runs"] = ppo_runs
    return res


def frontier_curve(run_dir: Path, anchor: dict | None) -> dict:
    """A run's over-optimization curve from the experiment's frontier points (RUN/frontier/step_*.json: the true
    reward, KL and, for runs evaluated once the RM existed, rm_score, all of the SAME samples of each checkpoint),
    starting at the SFT point `anchor` ({} when no point has rm_score)."""
    raw = [read_json(p) for p in sorted(Path(run_dir, "frontier").glob("step_*.json"))]
    raw = sorted((p for p in raw if p and p.get("rm_score") is not None and p.get("kl") is not None),
                 key=lambda p: p["step"])
    if not raw:
        return {}
    pts = [{"step": p["step"], "kl": p["kl"], "sqrt_kl": math.sqrt(max(p["kl"], 0.0)), "rm_score": p["rm_score"],
            "gold_score": p["reward"]} for p in raw]
    pts = ([anchor] if anchor else []) + pts
    return {"same_samples": True, "proxy": pts, "gold": pts, "seed": raw[-1].get("seed")}


def reading(res: dict, plots: list[str] = ()) -> str:
    """The Markdown behind the plots (OUT/rm_diagnostics.md; links relative to OUT)."""
    def f(v):
        return "-" if v is None else f"{v:.3f}"
    t = res["threshold"]
    lines = ["## Reward-model diagnostics (IMDb)\n",
             f"One continuation per held-out test prefix at T=1 from each policy ({res['n_prompts'][SPLIT]} prefixes, "
             "the experiment's evaluation seed), scored by the learned reward model (OUT/rm) and the true reward "
             "(the sentiment classifier); minialign.experiments.imdb.rm_diagnostics, numbers in rm_diagnostics.json. "
             f"AUC: P(RM scores a response with true reward >= {t} above one below). r: Pearson correlation of RM "
             "score and true reward. Length slope: least-squares RM score per token, ± its s.e., over all responses "
             f"and within each true-reward bin.\n",
             f"| policy | true reward | RM mean | RM median | RM (true >= {t}) | RM (true < {t}) | AUC | r | KL to SFT | "
             f"mean length | length slope (all) | slope (true >= {t}) | slope (true < {t}) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for p, d in res["splits"][SPLIT]["policies"].items():
        g, lb = d["rm_vs_gold"], d["length_bias"]
        lines.append(f"| {p} | {f(g['gold_mean'])} | {f(g['rm_mean'])} | {f(d['distribution']['quantiles']['0.5'])} | "
                     f"{f(g['rm_mean_correct'])} | {f(g['rm_mean_incorrect'])} | {f(g['auc'])} | "
                     f"{f(g['pearson_rm_true'])} | {f(d.get('kl_to_sft'))} | {d['mean_length']:.1f} | "
                     f"{rd._fmt_fit(lb['all'])} | {rd._fmt_fit(lb['correct'])} | {rd._fmt_fit(lb['incorrect'])} |")
    pooled = res["splits"][SPLIT]["pooled_length_bias"]
    lines.append(f"\nAll policies pooled: RM score per token {rd._fmt_fit(pooled['all'])}; with true reward >= {t} "
                 f"{rd._fmt_fit(pooled['correct'])}; below {rd._fmt_fit(pooled['incorrect'])}.\n")
    if TRAIN in res["splits"]:
        lines += [f"Training prefixes ({res['n_prompts'][TRAIN]}, a seeded sample of the RL prompts), one "
                  "continuation each:\n", "| policy | true reward | RM mean | AUC | r | length slope (all) |",
                  "|---|---|---|---|---|---|"]
        for p, d in res["splits"][TRAIN]["policies"].items():
            g = d["rm_vs_gold"]
            lines.append(f"| {p} | {f(g['gold_mean'])} | {f(g['rm_mean'])} | {f(g['auc'])} | "
                         f"{f(g['pearson_rm_true'])} | {rd._fmt_fit(d['length_bias']['all'])} |")
        lines.append("")
    for run, c in ((res.get("overoptimization") or {}).get("ppo_runs") or {}).items():
        lines += [f"PPO against the learned RM along its checkpoints ({Path(run).name}; the experiment's frontier "
                  "points, proxy and true reward of the same samples, from the SFT point):\n",
                  "| step | sqrt(KL) | proxy RM | true reward |", "|---|---|---|---|",
                  *[f"| {p['step']} | {p['sqrt_kl']:.3f} | {p['rm_score']:.3f} | {p['gold_score']:.3f} |"
                    for p in c["proxy"]], ""]
    bon = (res.get("overoptimization") or {}).get("best_of_n")
    if bon:
        peak = max(bon, key=lambda p: p["gold_score"])
        lines += [f"Best-of-N from SFT by the learned RM ({res['overoptimization'].get('source', '')}); the true "
                  f"reward of the kept continuation peaks at N={peak['n']} ({peak['gold_score']:.3f}):\n",
                  "| N | sqrt(KL) | proxy RM (kept) | true reward (kept) |", "|---|---|---|---|",
                  *[f"| {p['n']} | {p['sqrt_kl']:.3f} | {p['judge_score']:.3f} | {p['gold_score']:.3f} |" for p in bon],
                  ""]
    lines += [f"### {rd.PLOTS[name]}\n\n![{rd.PLOTS[name]}](plots/{name})\n" for name in plots]
    return "\n".join(lines) + "\n"


def policy_dirs(out: Path) -> dict[str, Path]:
    """sft and every finished run in OUT/runs (its last checkpoint), by name."""
    dirs = {"sft": out / "sft"}
    for d in sorted((out / "runs").glob("*")) if (out / "runs").is_dir() else []:
        if (checkpoint.run_state(d) or {}).get("checkpoint"):
            dirs[d.name] = d
    return dirs


@torch.no_grad()
def diagnose(out: Path, scale: Scale = QUICK, n_prompts: int = 0, bon_max_n: int = 0, bon_prompts: int = 32,
             rt: Runtime | None = None, n_train: int = 128) -> dict:
    """Everything in the module docstring for the IMDb output folder `out`."""
    out = Path(out)
    prog = "python -m minialign.experiments.imdb.rm_diagnostics"
    for need in ("sft", "rm", "classifier/classifier.pt", "data/eval_prompts.jsonl"):
        if not (out / need).exists():
            raise UserError(f"{prog}: {out / need} is missing (run python -m minialign.experiments.imdb first)")
    rt = rt or Runtime(torch.device("cuda" if torch.cuda.is_available() else "cpu"), torch.float32)
    tok = load_tokenizer(out / "sft" / "tokenizer.model")
    ref = frozen(checkpoint.load_model(out / "sft"), rt)
    reward_model = load_reward_model(str(out / "rm"), rt, prog)
    true_reward = text_judge(classifier_reward(str(out / "classifier" / "classifier.pt")))
    prompts = load_rl_prompts(out / "data" / "eval_prompts.jsonl", tok, ref.cfg.max_seq_len - scale.max_new_tokens, [])
    prompts = prompts[: n_prompts or None]
    train = []
    if n_train and (out / "data" / "rl_train.jsonl").exists():  # a seeded sample of the training prefixes
        train = load_rl_prompts(out / "data" / "rl_train.jsonl", tok, ref.cfg.max_seq_len - scale.max_new_tokens, [])
        train = random.Random(EVAL_SEED).sample(train, min(n_train, len(train)))
    judges = {"rm": reward_model_judge(reward_model), "true": true_reward}

    def policy_samples(policy, split_prompts):
        s = sample_and_score(policy, tok, split_prompts, judges, ref, max_new_tokens=scale.max_new_tokens,
                             seed=EVAL_SEED)
        return {"rm": s.scores["rm"].tolist(), "gold": s.scores["true"].tolist(),
                "length": s.rollout.lengths.tolist(), "kl_to_sft": float(s.kl.mean())}

    samples, train_samples = {}, {}
    for name, d in policy_dirs(out).items():
        policy = ref if name == "sft" else frozen(checkpoint.load_model(d), rt)
        samples[name] = policy_samples(policy, prompts)
        if train:
            train_samples[name] = policy_samples(policy, train)
    # PPO (learned RM) along its checkpoints: the experiment's frontier points, proxy and true reward of the same
    # samples, from the SFT point taken as the experiment takes every point (all test prefixes, its samples per
    # prefix and seed)
    ppo_dirs = {n: d for n, d in policy_dirs(out).items() if method_of(n) == "ppo"}
    ppo_runs = {}
    if any(frontier_curve(d, None) for d in ppo_dirs.values()):
        every = load_rl_prompts(out / "data" / "eval_prompts.jsonl", tok, ref.cfg.max_seq_len - scale.max_new_tokens, [])
        per_prompt = ((read_json(out / "results.json") or {}).get("config") or {}).get("eval_samples",
                                                                                        scale.eval_samples)
        s = sample_and_score(ref, tok, every, judges, ref, samples_per_prompt=per_prompt,
                             max_new_tokens=scale.max_new_tokens, seed=EVAL_SEED)
        anchor = {"step": 0, "kl": 0.0, "sqrt_kl": 0.0, "rm_score": float(s.scores["rm"].double().mean()),
                  "gold_score": float(s.scores["true"].double().mean())}
        ppo_runs = {str(d): c for d in ppo_dirs.values() if (c := frontier_curve(d, anchor))}
    if bon_max_n > 0:  # a fresh curve, to larger N than the experiment stored
        bon = best_of_n.sample_and_judge(ref, tok, prompts[:bon_prompts], reward_model_judge(reward_model),
                                         true_reward, bon_max_n, scale.max_new_tokens, EVAL_SEED)
        ns = sorted({2**i for i in range(int(math.log2(bon_max_n)) + 1)} | {bon_max_n})
        points, source = best_of_n.points(bon["scores"], bon["gold"], ns), f"sampled here, {len(bon['scores'])} prefixes"
    else:
        stored = read_json(out / "best_of_n" / "points.json") or {}
        points = stored.get("points")
        source = f"the experiment's best_of_n/points.json, {stored.get('n_prompts')} prefixes" if points else ""
    res = diagnostics(samples, points, len(prompts), train_samples, len(train), ppo_runs)
    if points:
        res["overoptimization"]["source"] = source
    res.update(out=str(out), seed=EVAL_SEED, max_new_tokens=scale.max_new_tokens)
    return res


def main(argv=None):
    ap = argparse.ArgumentParser(description="Reward-model diagnostics of an IMDb experiment folder: RM score "
                                             "distributions per policy beside the true reward, length bias at fixed "
                                             "true reward, best-of-N over-optimization.")
    ap.add_argument("--out", required=True, help="the IMDb experiment's --out (reads it, writes OUT/rm_diagnostics.* "
                                                 "and OUT/plots/rm_*.png)")
    ap.add_argument("--n_prompts", type=int, default=0, help="the first N held-out prefixes (0 = all of them)")
    ap.add_argument("--n_train", type=int, default=128, help="training prefixes sampled (seeded) for the train split")
    ap.add_argument("--bon_max_n", type=int, default=0,
                    help="0 = the experiment's stored best-of-N points; N = sample a fresh curve to N (e.g. 256)")
    ap.add_argument("--bon_prompts", type=int, default=32, help="prefixes for a fresh best-of-N curve")
    args = ap.parse_args(argv)
    if args.n_prompts < 0 or args.n_train < 0 or args.bon_max_n < 0 or args.bon_prompts < 1:
        ap.error("--n_prompts, --n_train and --bon_max_n must be >= 0, --bon_prompts >= 1")
    out = Path(args.out)
    res = diagnose(out, n_prompts=args.n_prompts, bon_max_n=args.bon_max_n, bon_prompts=args.bon_prompts,
                   n_train=args.n_train)
    rd.write_outputs(out, res, reading)


if __name__ == "__main__":
    run_cli(main)
