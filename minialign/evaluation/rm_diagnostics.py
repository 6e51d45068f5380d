"""Reward-model diagnostics: what the reward model does to each policy's responses, not only its pair accuracy.

    python -m minialign.evaluation.rm_diagnostics --out out      # reads a main-job folder, writes out/rm_diagnostics.json,
                                                                 # out/rm_diagnostics.md (report.md includes it) and,
                                                                 # with matplotlib, out/plots/rm_*.png
    python -m minialign.evaluation.rm_diagnostics --out out --ppo_runs out/ppo_long   # + more PPO runs' curves

An optional stage of the pipeline runs it after the main job (python -m minialign.pipeline --stages rm_diagnostics).
The IMDb experiment's folder has its own entry point on these functions (minialign.experiments.imdb.rm_diagnostics).

For every policy stage present in OUT (sft, dpo, ppo, grpo, online_dpo, iterative_dpo) it samples one response per
prompt at temperature 1 on the held-out prompts (data/rl_eval.jsonl, the first --n_eval) and on a random sample of
training prompts (data/rl_train.jsonl, --n_train of them), with the one evaluation
(minialign.evaluation.evaluate.sample_and_score: same prompts, same random stream for every policy), judged by the
reward model (OUT/rm) and the gold rule, with the KL to the SFT model. Per policy and split it writes:

  distribution   the RM scores' mean, std, quantiles and histogram (bin edges shared by all policies of a split),
                 and the gold reward's mean (the gold rule is 0/1: its distribution is its mean);
  rm_vs_gold     mean RM score among gold-correct and gold-incorrect responses, and the AUC: the probability that
                 the RM scores a random correct response above a random incorrect one (ties count 1/2);
  length_bias    the least-squares line of RM score on response length (tokens, <|im_end|> included), over all
                 responses, over the correct only and over the incorrect only (gold held fixed), with the slope's
                 standard error (fit_line). A slope that stays positive at fixed gold is a length preference
                 the gold rule does not share.
  samples        the raw (rm, gold, length) per response, so the plots can be redrawn from the JSON.

Over-optimization (Gao et al. 2022, "Scaling Laws for Reward Model Overoptimization", Fig. 1): best-of-N from the
SFT model judged by the reward model, N = 1, 2, 4, ..., --bon_max_n (256) on --bon_prompts held-out prompts
(minialign.evaluation.best_of_n: nested subsets of one set of samples, KL exact for ties), the proxy (RM) score and
the gold score of the kept response against sqrt(KL). Alongside, PPO along its training (OUT/ppo/metrics.jsonl, and
every --ppo_runs folder, e.g. a long small-KL run): the rows its --gold_eval_every evaluation logged
(minialign.evaluation.evaluate.gold_point with PPO's reward model) hold sampled/rm_score and sampled/gold_score, the
mean RM score and gold score of the SAME responses (T=1, --gold_eval_prompts held-out prompts), at
sqrt(sampled/kl_to_ref) of those responses. The curve starts at the SFT model's point (step 0, KL 0), taken here
with gold_point on the run's held-out prompts when the run's reward model is OUT/rm. A run logged before
sampled/rm_score existed falls back to its RM score on the training rollouts (objective/scores against
sqrt(objective/kl)) beside the held-out gold: different prompts and samples, marked same_samples false.
--bon_max_n 0 leaves best-of-N out.

Simplified: one sample per prompt per policy (the standard errors treat responses as independent); the training
prompts are a fresh sample of the file, not the ones each stage happened to draw.
"""

from __future__ import annotations

import argparse
import math
import random
from pathlib import Path

import torch

from minialign.algorithms.roles import frozen, load_reward_model
from minialign.data.tokenizer import load_tokenizer
from minialign.errors import UserError, run_cli
from minialign.evaluation import best_of_n
from minialign.evaluation.evaluate import (gold_judge, gold_point, load_eval_prompts, reward_model_judge,
                                           sample_and_score)
from minialign.evaluation.report import COLORS, POLICY_STAGES, read_json, read_metrics
from minialign.training import checkpoint
from minialign.training.runtime import Runtime

QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95)
N_BINS = 20
SPLITS = {"eval": "held-out prompts", "train": "training prompts"}
PLOTS = {  # file name -> caption (the report links the ones present)
    "rm_score_distributions.png": "Reward-model score distributions per policy, gold (IMDb: true) reward beside",
    "rm_length_bias.png": "Reward-model score against response length",
    "rm_overoptimization.png": "Over-optimization: proxy (RM) and gold reward against sqrt(KL)",
}


# ------------------------------------------------------------------------------------------ pure statistics

def fit_line(x, y) -> dict:
    """Ordinary least squares y = intercept + slope * x, with the slope's standard error.

        slope     = cov(x, y) / var(x) = sum((x - mean x)(y - mean y)) / sum((x - mean x)^2)
        intercept = mean y - slope * mean x
        se(slope) = sqrt( sum(resid^2) / (n - 2) / sum((x - mean x)^2) ),   resid = y - intercept - slope * x

    x, y: (n,) numbers. Returns {n, slope, intercept, se}; slope, intercept and se are None when the line is not
    determined (n < 2 or all x equal) and se is None when n < 3 (no residual degrees of freedom).
    """
    x = torch.as_tensor(x, dtype=torch.float64).flatten()
    y = torch.as_tensor(y, dtype=torch.float64).flatten()
    assert x.shape == y.shape, (x.shape, y.shape)
    n = len(x)
    out = {"n": n, "slope": None, "intercept": None, "se": None}
    if n < 2:
        return out
    dx = x - x.mean()
    sxx = float((dx * dx).sum())
    if sxx <= 0:
        return out
    slope = float((dx * (y - y.mean())).sum()) / sxx  # cov(x, y) / var(x)
    intercept = float(y.mean()) - slope * float(x.mean())
    out.update(slope=slope, intercept=intercept)
    if n >= 3:
        resid = y - intercept - slope * x
        out["se"] = math.sqrt(float((resid * resid).sum()) / (n - 2) / sxx)  # sqrt(s^2 / Sxx)
    return out


def length_bias(rm, gold, lengths, threshold: float = 0.5) -> dict:
    """RM score against length: fit_line over all responses, the gold-correct only (gold >= threshold) and the
    gold-incorrect only. A 0/1 gold rule splits by its outcome; a continuous one (IMDb's true reward in [0, 1]) is
    held fixed within the two bins."""
    rm, gold, lengths = (torch.as_tensor(v, dtype=torch.float64) for v in (rm, gold, lengths))
    correct = gold >= threshold
    return {"all": fit_line(lengths, rm), "correct": fit_line(lengths[correct], rm[correct]),
            "incorrect": fit_line(lengths[~correct], rm[~correct])}


def histogram_edges(values, n_bins: int = N_BINS) -> list[float]:
    """n_bins + 1 equal-width edges spanning the values (a unit-wide span around a single value)."""
    v = torch.as_tensor(values, dtype=torch.float64)
    lo, hi = float(v.min()), float(v.max())
    if hi <= lo:
        lo, hi = lo - 0.5, hi + 0.5
    return torch.linspace(lo, hi, n_bins + 1, dtype=torch.float64).tolist()


def distribution(values, edges: list[float]) -> dict:
    """Mean, std, QUANTILES and histogram counts over `edges` (bins [e_i, e_i+1), the last one closed)."""
    v = torch.as_tensor(values, dtype=torch.float64)
    e = torch.tensor(edges, dtype=torch.float64)
    idx = (torch.bucketize(v, e, right=True) - 1).clamp(0, len(edges) - 2)  # right edge goes into the last bin
    inside = (v >= e[0]) & (v <= e[-1])
    counts = torch.bincount(idx[inside], minlength=len(edges) - 1)
    return {"n": len(v), "mean": float(v.mean()), "std": float(v.std()) if len(v) > 1 else 0.0,
            "quantiles": {str(q): float(torch.quantile(v, q)) for q in QUANTILES},
            "edges": list(edges), "counts": counts.tolist()}


def auc(scores_pos, scores_neg) -> float | None:
    """P(a random positive scores above a random negative), ties 1/2 (the Mann-Whitney U / (n_pos n_neg))."""
    pos = torch.as_tensor(scores_pos, dtype=torch.float64)[:, None]
    neg = torch.as_tensor(scores_neg, dtype=torch.float64)[None, :]
    if pos.numel() == 0 or neg.numel() == 0:
        return None
    return float(((pos > neg).double() + 0.5 * (pos == neg).double()).mean())


def rm_vs_gold(rm, gold, threshold: float = 0.5) -> dict:
    """Mean RM score among gold >= threshold ("correct") and below it, and the AUC between the two."""
    rm, gold = torch.as_tensor(rm, dtype=torch.float64), torch.as_tensor(gold, dtype=torch.float64)
    correct = gold >= threshold

    def mean(x):
        return float(x.mean()) if len(x) else None
    return {"gold_mean": float(gold.mean()), "rm_mean": float(rm.mean()), "rm_mean_correct": mean(rm[correct]),
            "rm_mean_incorrect": mean(rm[~correct]), "auc": auc(rm[correct], rm[~correct]),
            "n_correct": int(correct.sum()), "n_incorrect": int((~correct).sum())}


def split_diagnostics(samples: dict[str, dict]) -> dict:
    """samples: policy -> {"rm": [..], "gold": [..], "length": [..], ...} of one split -> per-policy distribution,
    rm_vs_gold and length_bias (histogram edges shared by the policies), and the length bias pooled over them."""
    edges = histogram_edges([s for v in samples.values() for s in v["rm"]])
    out = {"edges": edges, "policies": {}}
    for policy, v in samples.items():
        out["policies"][policy] = {"distribution": distribution(v["rm"], edges), "rm_vs_gold": rm_vs_gold(v["rm"], v["gold"]),
                                   "length_bias": length_bias(v["rm"], v["gold"], v["length"]),
                                   "mean_length": float(torch.tensor(v["length"], dtype=torch.float64).mean()),
                                   **({"kl_to_sft": v["kl_to_sft"]} if v.get("kl_to_sft") is not None else {})}
    pooled = {k: [x for v in samples.values() for x in v[k]] for k in ("rm", "gold", "length")}
    out["pooled_length_bias"] = length_bias(pooled["rm"], pooled["gold"], pooled["length"])
    return out


def overoptimization_points(scores: torch.Tensor, gold: torch.Tensor, ns: list[int]) -> list[dict]:
    """Best-of-N's points (minialign.evaluation.best_of_n.points: proxy = judge_score, gold_score, exact KL) with
    sqrt_kl, the x axis of Gao et al. 2022."""
    return [{**p, "sqrt_kl": math.sqrt(max(p["kl"], 0.0))} for p in best_of_n.points(scores, gold, ns)]


def ppo_curve(rows: list[dict]) -> dict:
    """A PPO run's over-optimization curve from its metrics.jsonl rows -> {"same_samples", "proxy", "gold"}, each
    list of {"step", "sqrt_kl", ...} by step ({} when the rows have none).

    Rows of its gold evaluation with sampled/rm_score: proxy (rm_score) and gold (gold_score) from those rows, the
    same responses, at sqrt(sampled/kl_to_ref). Otherwise (runs logged before sampled/rm_score) the proxy is
    objective/scores on the training rollouts at sqrt(objective/kl), and same_samples is False."""
    def num(r, k):
        return isinstance(r.get(k), (int, float))
    same = [r for r in rows if num(r, "sampled/rm_score") and num(r, "sampled/gold_score") and num(r, "sampled/kl_to_ref")]
    if same:
        pts = [{"step": r["step"], "sqrt_kl": math.sqrt(max(r["sampled/kl_to_ref"], 0.0)),
                "kl": r["sampled/kl_to_ref"], "rm_score": r["sampled/rm_score"], "gold_score": r["sampled/gold_score"]}
               for r in same]
        return {"same_samples": True, "proxy": pts, "gold": pts}
    proxy = [{"step": r["step"], "sqrt_kl": math.sqrt(max(r["objective/kl"], 0.0)), "rm_score": r["objective/scores"]}
             for r in rows if num(r, "objective/scores") and num(r, "objective/kl")]
    gold = [{"step": r["step"], "sqrt_kl": math.sqrt(max(r["sampled/kl_to_ref"], 0.0)),
             "gold_score": r["sampled/gold_score"]}
            for r in rows if num(r, "sampled/gold_score") and num(r, "sampled/kl_to_ref")]
    return {"same_samples": False, "proxy": proxy, "gold": gold} if proxy or gold else {}


def ppo_points(run_dir: Path) -> dict:
    """ppo_curve of RUN_DIR/metrics.jsonl, with the run's kl_coef and seed from its config.json."""
    curve = ppo_curve(read_metrics(Path(run_dir) / "metrics.jsonl"))
    cfg = read_json(Path(run_dir) / "config.json") or {}
    return {**curve, **{k: cfg[k] for k in ("kl_coef", "seed", "max_steps") if k in cfg}} if curve else {}


# ------------------------------------------------------------------------------------------ sampling

def policy_samples(policy, tok, prompts, reward_model, ref, max_new_tokens: int, seed: int) -> dict:
    """One response per prompt at T=1 -> {"rm", "gold", "length" lists, "kl_to_sft" mean}."""
    s = sample_and_score(policy, tok, prompts, {"rm": reward_model_judge(reward_model), "gold": gold_judge}, ref,
                         max_new_tokens=max_new_tokens, seed=seed)
    return {"rm": s.scores["rm"].tolist(), "gold": s.scores["gold"].tolist(),
            "length": s.rollout.lengths.tolist(), "kl_to_sft": float(s.kl.mean()) if s.kl is not None else None}


def sft_anchor(run_dir: Path, out: Path, ref, tok, reward_model) -> dict | None:
    """The SFT model's point (step 0) of a PPO run's same-samples curve: gold_point with OUT's reward model on the
    run's held-out prompts, generation length and seed 0, as the run's own evaluation would have taken it. None
    when the run did not start from OUT/sft against OUT/rm (its step 0 would be another model, its scores another
    RM's) or it logged no gold points."""
    cfg = read_json(Path(run_dir) / "config.json") or {}
    if not cfg.get("reward_model") or not cfg.get("eval_data") or not cfg.get("gold_eval_every"):
        return None
    if any(Path(cfg.get(k) or "").resolve() != (Path(out) / stage).resolve()
           for k, stage in (("reward_model", "rm"), ("init_from", "sft"))):
        return None
    prompts = load_eval_prompts(cfg["eval_data"], tok, cfg["gold_eval_prompts"], cfg["eval_max_new_tokens"],
                                ref.cfg.max_seq_len)
    p = gold_point(ref, tok, prompts, cfg["eval_max_new_tokens"], ref, reward_model=reward_model)
    return {"step": 0, "sqrt_kl": 0.0, "kl": p["sampled/kl_to_ref"], "rm_score": p["sampled/rm_score"],
            "gold_score": p["sampled/gold_score"]}


def ppo_run_curve(run_dir: Path, out: Path, ref, tok, reward_model) -> dict:
    """ppo_points of a run, its same-samples curve starting at the SFT anchor where one can be taken."""
    curve = ppo_points(run_dir)
    if curve.get("same_samples"):
        anchor = sft_anchor(run_dir, out, ref, tok, reward_model)
        if anchor is not None:
            curve["proxy"] = curve["gold"] = [anchor, *curve["proxy"]]
    return curve


def diagnose(out: Path, *, eval_data: str = "data/rl_eval.jsonl", train_data: str = "data/rl_train.jsonl",
             n_eval: int = 200, n_train: int = 200, max_new_tokens: int = 48, seed: int = 0, bon_prompts: int = 32,
             bon_max_n: int = 256, ppo_runs: tuple = (), rt: Runtime | None = None) -> dict:
    """Everything in the module docstring, for the main-job folder `out` -> the rm_diagnostics.json dict."""
    out = Path(out)
    rt = rt or Runtime(torch.device("cpu"), torch.float32)
    prog = "python -m minialign.evaluation.rm_diagnostics"
    if not (out / "rm").is_dir() or not (out / "sft").is_dir():
        raise UserError(f"{prog}: {out} has no rm/ and sft/ stage folders (run the main job first)")
    policies = [s for s in POLICY_STAGES if (checkpoint.run_state(out / s) or {}).get("finished")]
    tok = load_tokenizer(checkpoint.tokenizer_path_for(str(out / "sft")))
    reward_model = load_reward_model(str(out / "rm"), rt, prog)
    ref = frozen(checkpoint.load_model(str(out / "sft")), rt)
    max_seq_len = ref.cfg.max_seq_len
    prompts = {"eval": load_eval_prompts(eval_data, tok, n_eval, max_new_tokens, max_seq_len)}
    train_all = load_eval_prompts(train_data, tok, 0, max_new_tokens, max_seq_len)
    prompts["train"] = random.Random(seed).sample(train_all, min(n_train, len(train_all)))
    samples = {split: {} for split in SPLITS}
    for policy_name in policies:
        policy = ref if policy_name == "sft" else frozen(checkpoint.load_model(str(out / policy_name)), rt)
        for split in SPLITS:
            samples[split][policy_name] = policy_samples(policy, tok, prompts[split], reward_model, ref,
                                                         max_new_tokens, seed)
    res = {"reward_model": str(out / "rm"), "policies": policies, "max_new_tokens": max_new_tokens, "seed": seed,
           "data": {"eval": eval_data, "train": train_data},
           "n_prompts": {split: len(p) for split, p in prompts.items()},
           "splits": {split: split_diagnostics(samples[split]) for split in SPLITS},
           "samples": samples}
    if bon_max_n > 0:
        bon = best_of_n.sample_and_judge(ref, tok, prompts["eval"][:bon_prompts], reward_model_judge(reward_model),
                                         gold_judge, bon_max_n, max_new_tokens, seed)
        ns = sorted({2**i for i in range(int(math.log2(bon_max_n)) + 1)} | {bon_max_n})
        res["overoptimization"] = {"policy": "sft", "judge": "reward_model", "n_prompts": len(bon["scores"]),
                                   "best_of_n": overoptimization_points(bon["scores"], bon["gold"], ns)}
    ppo = ppo_run_curve(out / "ppo", out, ref, tok, reward_model)
    if ppo:
        res.setdefault("overoptimization", {})["ppo"] = ppo
    runs = {}
    for run_dir in ppo_runs:
        curve = ppo_run_curve(Path(run_dir), out, ref, tok, reward_model)
        if not curve:
            raise UserError(f"{prog}: --ppo_runs {run_dir}: no PPO metrics in {Path(run_dir) / 'metrics.jsonl'}")
        runs[str(run_dir)] = curve
    if runs:
        res.setdefault("overoptimization", {})["ppo_runs"] = runs
    return res


# ------------------------------------------------------------------------------------------ plots and reading

def write_plots(out: Path, res: dict) -> list[str]:
    """OUT/plots/rm_*.png from an rm_diagnostics.json dict; [] without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    plots = Path(out) / "plots"
    plots.mkdir(parents=True, exist_ok=True)
    written = []
    policies = res["policies"]
    splits = list(res["splits"])  # eval, train here; IMDb's diagnostics have one split
    gold_name = res.get("gold_name", "gold reward")  # IMDb: the true reward
    outcome = res.get("outcome_labels", {"correct": "gold correct", "incorrect": "gold incorrect"})
    split_labels = res.get("split_labels", SPLITS)
    colors = {**COLORS, **res.get("colors", {})}  # IMDb: its runs' names, colored by method

    # 1. overlaid RM score distributions per policy (one row per split), gold rate beside
    fig, axes = plt.subplots(len(splits), 2, figsize=(10, 3.2 * len(splits)), squeeze=False,
                             gridspec_kw={"width_ratios": [3, 1]})
    for (ax, ax_gold), split in zip(axes, splits):
        d = res["splits"][split]
        for p in policies:
            dist = d["policies"][p]["distribution"]
            ax.stairs(dist["counts"], dist["edges"], color=colors.get(p, "black"), lw=1.6,
                      label=f"{p} (mean {dist['mean']:.2f})")
        ax.set_xlabel("reward-model score", fontsize=8)
        ax.set_ylabel("responses", fontsize=8)
        ax.set_title(f"RM scores of each policy's samples, {split_labels.get(split, split)} (n={res['n_prompts'][split]})",
                     fontsize=9)
        ax.legend(fontsize=7)
        golds = [d["policies"][p]["rm_vs_gold"]["gold_mean"] for p in policies]
        ax_gold.bar(range(len(policies)), golds, color=[colors.get(p, "black") for p in policies])
        ax_gold.set_xticks(range(len(policies)), policies, fontsize=7, rotation=45 if len(policies) > 5 else 0,
                           ha="right" if len(policies) > 5 else "center")
        ax_gold.set_ylim(0, 1.05)
        ax_gold.set_title(f"{gold_name} (same responses)", fontsize=9)
    fig.tight_layout()
    fig.savefig(plots / "rm_score_distributions.png", dpi=90)
    plt.close(fig)
    written.append("rm_score_distributions.png")

    # 2. RM score vs length on held-out prompts: per policy, and pooled with gold held fixed
    fig, (ax_p, ax_g) = plt.subplots(1, 2, figsize=(11, 4))
    samples = res["samples"][splits[0]]
    jitter = random.Random(0)

    def line(ax, fit, xs, color, label):
        if fit["slope"] is None or not xs:
            return
        lo, hi = min(xs), max(xs)
        se = f" ± {fit['se']:.3f}" if fit["se"] is not None else ""
        ax.plot([lo, hi], [fit["intercept"] + fit["slope"] * lo, fit["intercept"] + fit["slope"] * hi], color=color,
                lw=2, label=f"{label}: slope {fit['slope']:.3f}{se}/token")
    for p in policies:
        v = samples[p]
        xs = [x + jitter.uniform(-0.3, 0.3) for x in v["length"]]
        ax_p.scatter(xs, v["rm"], s=6, alpha=0.35, color=colors.get(p, "black"))
        line(ax_p, res["splits"][splits[0]]["policies"][p]["length_bias"]["all"], v["length"], colors.get(p, "black"), p)
    ax_p.set_title("per policy (all responses)", fontsize=9)
    pooled = {k: [x for p in policies for x in samples[p][k]] for k in ("rm", "gold", "length")}
    for key, color in (("correct", "tab:green"), ("incorrect", "tab:red")):
        keep = [(l, r) for l, r, g in zip(pooled["length"], pooled["rm"], pooled["gold"]) if (g >= 0.5) == (key == "correct")]
        if keep:
            ax_g.scatter([l + jitter.uniform(-0.3, 0.3) for l, _ in keep], [r for _, r in keep], s=6, alpha=0.3,
                         color=color)
        line(ax_g, res["splits"][splits[0]]["pooled_length_bias"][key], [l for l, _ in keep], color, outcome[key])
    ax_g.set_title(f"all policies pooled, {gold_name} held fixed (within each bin)", fontsize=9)
    for ax in (ax_p, ax_g):
        ax.set_xlabel("response length (tokens)", fontsize=8)
        ax.set_ylabel("reward-model score", fontsize=8)
        if ax.get_legend_handles_labels()[0]:  # no line when the lengths are all equal
            ax.legend(fontsize=7)
    fig.suptitle(f"RM score vs response length, {split_labels.get(splits[0], splits[0])} (least-squares lines, slope ± s.e.)",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(plots / "rm_length_bias.png", dpi=90)
    plt.close(fig)
    written.append("rm_length_bias.png")

    # 3. over-optimization: proxy and gold against sqrt(KL)
    over = res.get("overoptimization") or {}
    curves = {**({"PPO (main job)": over["ppo"]} if over.get("ppo") else {}),
              **{ppo_label(d, c): c for d, c in (over.get("ppo_runs") or {}).items()}}
    if over.get("best_of_n") or curves:
        fig, (ax_rm, ax_gold) = plt.subplots(1, 2, figsize=(11, 4))
        if over.get("best_of_n"):
            pts = over["best_of_n"]
            xs = [p["sqrt_kl"] for p in pts]
            ax_rm.plot(xs, [p["judge_score"] for p in pts], "D-", color=COLORS["best_of_n"], label="best-of-N (kept)")
            ax_gold.plot(xs, [p["gold_score"] for p in pts], "D-", color=COLORS["best_of_n"],
                         label=f"best-of-N, N=1..{pts[-1]['n']}")
            for p in pts[::2]:
                ax_gold.annotate(f"N={p['n']}", (p["sqrt_kl"], p["gold_score"]), fontsize=6)
        markers = iter("os^v<>ph" * 4)
        for i, (label, c) in enumerate(curves.items()):
            color, m = (COLORS["ppo"] if i == 0 else f"C{i + 2}"), next(markers)
            where = "held-out, same samples" if c["same_samples"] else "training rollouts"
            if c["proxy"]:
                ax_rm.plot([p["sqrt_kl"] for p in c["proxy"]], [p["rm_score"] for p in c["proxy"]], f"{m}-",
                           color=color, ms=3, label=f"{label} ({where})")
            if c["gold"]:
                ax_gold.plot([p["sqrt_kl"] for p in c["gold"]], [p["gold_score"] for p in c["gold"]], f"{m}-",
                             color=color, ms=3, label=f"{label} (held-out)")
        ax_rm.set_ylabel("proxy: reward-model score", fontsize=8)
        ax_gold.set_ylabel(gold_name, fontsize=8)
        for ax in (ax_rm, ax_gold):
            ax.set_xlabel("sqrt(KL to SFT), sqrt(nats)", fontsize=8)
            ax.legend(fontsize=7)
        fig.suptitle("reward over-optimization (Gao et al. 2022): proxy vs gold as the policy moves from SFT",
                     fontsize=10)
        fig.tight_layout()
        fig.savefig(plots / "rm_overoptimization.png", dpi=90)
        plt.close(fig)
        written.append("rm_overoptimization.png")
    return written


def ppo_label(run_dir: str, curve: dict) -> str:
    """A --ppo_runs curve's name: its folder, kl_coef and seed."""
    extra = ", ".join(f"{k} {curve[k]:g}" for k in ("kl_coef", "seed") if isinstance(curve.get(k), (int, float)))
    return f"{Path(run_dir).name}" + (f" ({extra})" if extra else "")


def _fmt_fit(fit: dict) -> str:
    if fit["slope"] is None:
        return f"undetermined (n={fit['n']})"
    se = f" ± {fit['se']:.4f}" if fit["se"] is not None else ""
    return f"{fit['slope']:+.4f}{se} per token (n={fit['n']})"


def reading(res: dict, plots: list[str] = ()) -> str:
    """A Markdown section with the numbers behind the plots and links to the `plots` drawn (OUT/rm_diagnostics.md,
    which report.md includes; the links are relative to OUT)."""
    lines = ["## Reward-model diagnostics\n",
             f"One response per prompt at T=1 from each policy on {res['n_prompts']['eval']} held-out and "
             f"{res['n_prompts']['train']} training prompts, scored by the reward model and the gold rule "
             "(minialign.evaluation.rm_diagnostics; numbers in rm_diagnostics.json). AUC: P(RM scores a correct "
             "response above an incorrect one). Length slope: least-squares RM score per token, ± its s.e.\n",
             "| split | policy | gold | RM mean | RM median | RM correct | RM incorrect | AUC | mean length | "
             "length slope (all) | slope (correct only) | slope (incorrect only) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]

    def f(v):
        return "-" if v is None else f"{v:.3f}"
    for split in SPLITS:
        for p, d in res["splits"][split]["policies"].items():
            g, lb = d["rm_vs_gold"], d["length_bias"]
            lines.append(f"| {split} | {p} | {f(g['gold_mean'])} | {f(g['rm_mean'])} | "
                         f"{f(d['distribution']['quantiles']['0.5'])} | {f(g['rm_mean_correct'])} | "
                         f"{f(g['rm_mean_incorrect'])} | {f(g['auc'])} | {d['mean_length']:.1f} | "
                         f"{_fmt_fit(lb['all'])} | {_fmt_fit(lb['correct'])} | {_fmt_fit(lb['incorrect'])} |")
    pooled = res["splits"]["eval"]["pooled_length_bias"]
    lines.append(f"\nHeld-out, all policies pooled: RM score per token {_fmt_fit(pooled['all'])}; among gold-correct "
                 f"responses {_fmt_fit(pooled['correct'])}; among gold-incorrect {_fmt_fit(pooled['incorrect'])}.\n")
    bon = (res.get("overoptimization") or {}).get("best_of_n")
    if bon:
        lines += [f"Best-of-N from SFT judged by the reward model on {res['overoptimization']['n_prompts']} held-out "
                  "prompts (KL exact for ties, minialign.evaluation.best_of_n):\n",
                  "| N | sqrt(KL) | proxy RM (kept) | gold (kept) |", "|---|---|---|---|",
                  *[f"| {p['n']} | {p['sqrt_kl']:.3f} | {p['judge_score']:.3f} | {p['gold_score']:.3f} |" for p in bon],
                  ""]
    lines += ppo_table(res)
    lines += [f"### {PLOTS[name]}\n\n![{PLOTS[name]}](plots/{name})\n" for name in plots]
    return "\n".join(lines) + "\n"


def ppo_table(res: dict) -> list[str]:
    """Markdown rows of every PPO curve measured on the same samples (step, sqrt KL, RM score, gold)."""
    over = res.get("overoptimization") or {}
    curves = {**({"PPO (main job, OUT/ppo)": over["ppo"]} if over.get("ppo") else {}),
              **{ppo_label(d, c): c for d, c in (over.get("ppo_runs") or {}).items()}}
    lines = []
    for label, c in curves.items():
        if not c.get("same_samples"):
            lines.append(f"{label}: logged before sampled/rm_score (proxy on training rollouts, gold held-out).\n")
            continue
        peak = max(c["gold"], key=lambda p: p["gold_score"])
        lines += [f"{label}, along its training: RM score and gold of the same held-out responses (T=1); gold peaks at "
                  f"step {peak['step']} ({peak['gold_score']:.3f}):\n",
                  "| step | sqrt(KL) | RM score | gold |", "|---|---|---|---|",
                  *[f"| {p['step']} | {p['sqrt_kl']:.3f} | {p['rm_score']:.3f} | {p['gold_score']:.3f} |"
                    for p in c["gold"]], ""]
    return lines


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description="Reward-model diagnostics of a main-job folder: score distributions per "
                                             "policy, length bias, over-optimization curve.")
    ap.add_argument("--out", default="out", help="the main job's output root (reads its stage folders, writes "
                                                 "OUT/rm_diagnostics.json and OUT/plots/rm_*.png)")
    ap.add_argument("--eval_data", default="data/rl_eval.jsonl", help="held-out prompts (default task, with 'kind')")
    ap.add_argument("--train_data", default="data/rl_train.jsonl", help="training prompts, sampled --n_train of them")
    ap.add_argument("--n_eval", type=int, default=200, help="the first N held-out prompts (0 = all)")
    ap.add_argument("--n_train", type=int, default=200, help="training prompts drawn at random (seeded by --seed)")
    ap.add_argument("--max_new_tokens", type=int, default=48, help="generation length (48, as every evaluation)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--bon_prompts", type=int, default=32, help="held-out prompts for the best-of-N curve")
    ap.add_argument("--bon_max_n", type=int, default=256,
                    help="best-of-N curve at N = 1, 2, 4, ... this (0 = no best-of-N curve; costs bon_prompts x this samples)")
    ap.add_argument("--ppo_runs", nargs="*", default=[],
                    help="more PPO run folders (train_ppo.py --gold_eval_every, e.g. a long small-KL run) to draw as "
                         "proxy and gold curves against sqrt(KL)")
    return ap


def main(argv=None):
    ap = build_parser()
    args = ap.parse_args(argv)
    if args.n_eval < 0 or args.n_train < 1 or args.bon_max_n < 0 or args.bon_prompts < 1:
        ap.error("--n_eval must be >= 0, --n_train and --bon_prompts >= 1, --bon_max_n >= 0")
    torch.set_grad_enabled(False)
    out = Path(args.out)
    res = diagnose(out, eval_data=args.eval_data, train_data=args.train_data, n_eval=args.n_eval,
                   n_train=args.n_train, max_new_tokens=args.max_new_tokens, seed=args.seed,
                   bon_prompts=args.bon_prompts, bon_max_n=args.bon_max_n, ppo_runs=tuple(args.ppo_runs))
    write_outputs(out, res, reading)


def write_outputs(out: Path, res: dict, reading_fn) -> None:
    """OUT/rm_diagnostics.json, the plots (with matplotlib), OUT/rm_diagnostics.md from reading_fn(res, plots)
    (this module's `reading`, or the IMDb one's), and the reading printed."""
    checkpoint.write_json(res, out / "rm_diagnostics.json")
    plots = write_plots(out, res)
    text = reading_fn(res, plots)
    (out / "rm_diagnostics.md").write_text(text)
    print(text)
    print(f"wrote {out / 'rm_diagnostics.json'}" + (f" and {', '.join(str(out / 'plots' / p) for p in plots)}"
                                                   if plots else " (no plots: pip install matplotlib)"))


if __name__ == "__main__":
    run_cli(main)
