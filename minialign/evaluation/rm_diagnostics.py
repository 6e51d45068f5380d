"""Reward-model diagnostics: what the reward model does to each policy's responses, not only its pair accuracy.

    python -m minialign.evaluation.rm_diagnostics --out out      # reads a main-job folder, writes out/rm_diagnostics.json,
                                                                 # out/rm_diagnostics.md (report.md includes it) and,
                                                                 # with matplotlib, out/plots/rm_*.png

The main job runs it as its last stage (minialign.pipeline, stage rm_diagnostics) before the report.

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
the gold score of the kept response against sqrt(KL). Alongside, PPO's logged points if OUT/ppo/metrics.jsonl has
them: its RM score on the training rollouts (objective/scores) against sqrt(objective/kl), and its gold score on
--gold_eval_prompts held-out prompts against sqrt(sampled/kl_to_ref). (Simplified: PPO's proxy and gold are on
different prompts and samples; best-of-N's are the same responses.) --bon_max_n 0 leaves best-of-N out.

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
from minialign.evaluation.evaluate import gold_judge, load_eval_prompts, reward_model_judge, sample_and_score
from minialign.evaluation.report import COLORS, POLICY_STAGES, read_metrics
from minialign.training import checkpoint
from minialign.training.runtime import Runtime

QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95)
N_BINS = 20
SPLITS = {"eval": "held-out prompts", "train": "training prompts"}
PLOTS = {  # file name -> caption (the report links the ones present)
    "rm_score_distributions.png": "Reward-model score distributions per policy, gold beside",
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


def length_bias(rm, gold, lengths) -> dict:
    """RM score against length: fit_line over all responses, the gold-correct only and the gold-incorrect only."""
    rm, gold, lengths = (torch.as_tensor(v, dtype=torch.float64) for v in (rm, gold, lengths))
    correct = gold > 0.5
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


def rm_vs_gold(rm, gold) -> dict:
    rm, gold = torch.as_tensor(rm, dtype=torch.float64), torch.as_tensor(gold, dtype=torch.float64)
    correct = gold > 0.5

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


def ppo_points(out: Path) -> dict:
    """PPO's logged curve (OUT/ppo/metrics.jsonl): proxy = objective/scores on the training rollouts against
    sqrt(objective/kl); gold = sampled/gold_score on held-out prompts against sqrt(sampled/kl_to_ref)."""
    rows = read_metrics(out / "ppo" / "metrics.jsonl")
    proxy = [{"step": r["step"], "sqrt_kl": math.sqrt(max(r["objective/kl"], 0.0)), "rm_score": r["objective/scores"]}
             for r in rows if isinstance(r.get("objective/scores"), (int, float)) and
             isinstance(r.get("objective/kl"), (int, float))]
    gold = [{"step": r["step"], "sqrt_kl": math.sqrt(max(r["sampled/kl_to_ref"], 0.0)),
             "gold_score": r["sampled/gold_score"]}
            for r in rows if r.get("sampled/gold_score") is not None and r.get("sampled/kl_to_ref") is not None]
    return {"proxy": proxy, "gold": gold} if proxy or gold else {}


# ------------------------------------------------------------------------------------------ sampling

def policy_samples(policy, tok, prompts, reward_model, ref, max_new_tokens: int, seed: int) -> dict:
    """One response per prompt at T=1 -> {"rm", "gold", "length" lists, "kl_to_sft" mean}."""
    s = sample_and_score(policy, tok, prompts, {"rm": reward_model_judge(reward_model), "gold": gold_judge}, ref,
                         max_new_tokens=max_new_tokens, seed=seed)
    return {"rm": s.scores["rm"].tolist(), "gold": s.scores["gold"].tolist(),
            "length": s.rollout.lengths.tolist(), "kl_to_sft": float(s.kl.mean()) if s.kl is not None else None}


def diagnose(out: Path, *, eval_data: str = "data/rl_eval.jsonl", train_data: str = "data/rl_train.jsonl",
             n_eval: int = 200, n_train: int = 200, max_new_tokens: int = 48, seed: int = 0, bon_prompts: int = 32,
             bon_max_n: int = 256, rt: Runtime | None = None) -> dict:
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
    ppo = ppo_points(out)
    if ppo:
        res.setdefault("overoptimization", {})["ppo"] = ppo
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

    # 1. overlaid RM score distributions per policy (one row per split), gold rate beside
    fig, axes = plt.subplots(len(SPLITS), 2, figsize=(10, 3.2 * len(SPLITS)), squeeze=False,
                             gridspec_kw={"width_ratios": [3, 1]})
    for (ax, ax_gold), split in zip(axes, SPLITS):
        d = res["splits"][split]
        for p in policies:
            dist = d["policies"][p]["distribution"]
            ax.stairs(dist["counts"], dist["edges"], color=COLORS.get(p, "black"), lw=1.6,
                      label=f"{p} (mean {dist['mean']:.2f})")
        ax.set_xlabel("reward-model score", fontsize=8)
        ax.set_ylabel("responses", fontsize=8)
        ax.set_title(f"RM scores of each policy's samples, {SPLITS[split]} (n={res['n_prompts'][split]})", fontsize=9)
        ax.legend(fontsize=7)
        golds = [d["policies"][p]["rm_vs_gold"]["gold_mean"] for p in policies]
        ax_gold.bar(range(len(policies)), golds, color=[COLORS.get(p, "black") for p in policies])
        ax_gold.set_xticks(range(len(policies)), policies, fontsize=7)
        ax_gold.set_ylim(0, 1.05)
        ax_gold.set_title("gold reward (same responses)", fontsize=9)
    fig.tight_layout()
    fig.savefig(plots / "rm_score_distributions.png", dpi=90)
    plt.close(fig)
    written.append("rm_score_distributions.png")

    # 2. RM score vs length on held-out prompts: per policy, and pooled with gold held fixed
    fig, (ax_p, ax_g) = plt.subplots(1, 2, figsize=(11, 4))
    samples = res["samples"]["eval"]
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
        ax_p.scatter(xs, v["rm"], s=6, alpha=0.35, color=COLORS.get(p, "black"))
        line(ax_p, res["splits"]["eval"]["policies"][p]["length_bias"]["all"], v["length"], COLORS.get(p, "black"), p)
    ax_p.set_title("per policy (all responses)", fontsize=9)
    pooled = {k: [x for p in policies for x in samples[p][k]] for k in ("rm", "gold", "length")}
    for outcome, color in (("correct", "tab:green"), ("incorrect", "tab:red")):
        keep = [(l, r) for l, r, g in zip(pooled["length"], pooled["rm"], pooled["gold"]) if (g > 0.5) == (outcome == "correct")]
        if keep:
            ax_g.scatter([l + jitter.uniform(-0.3, 0.3) for l, _ in keep], [r for _, r in keep], s=6, alpha=0.3,
                         color=color)
        line(ax_g, res["splits"]["eval"]["pooled_length_bias"][outcome], [l for l, _ in keep], color,
             f"gold {outcome}")
    ax_g.set_title("all policies pooled, gold outcome held fixed", fontsize=9)
    for ax in (ax_p, ax_g):
        ax.set_xlabel("response length (tokens)", fontsize=8)
        ax.set_ylabel("reward-model score", fontsize=8)
        if ax.get_legend_handles_labels()[0]:  # no line when the lengths are all equal
            ax.legend(fontsize=7)
    fig.suptitle("RM score vs response length, held-out prompts (least-squares lines, slope ± s.e.)", fontsize=10)
    fig.tight_layout()
    fig.savefig(plots / "rm_length_bias.png", dpi=90)
    plt.close(fig)
    written.append("rm_length_bias.png")

    # 3. over-optimization: proxy and gold against sqrt(KL)
    over = res.get("overoptimization") or {}
    if over.get("best_of_n") or over.get("ppo"):
        fig, (ax_rm, ax_gold) = plt.subplots(1, 2, figsize=(11, 4))
        if over.get("best_of_n"):
            pts = over["best_of_n"]
            xs = [p["sqrt_kl"] for p in pts]
            ax_rm.plot(xs, [p["judge_score"] for p in pts], "D-", color=COLORS["best_of_n"], label="best-of-N (kept)")
            ax_gold.plot(xs, [p["gold_score"] for p in pts], "D-", color=COLORS["best_of_n"],
                         label=f"best-of-N, N=1..{pts[-1]['n']}")
            for p in pts[::2]:
                ax_gold.annotate(f"N={p['n']}", (p["sqrt_kl"], p["gold_score"]), fontsize=6)
        if over.get("ppo"):
            ppo = over["ppo"]
            if ppo["proxy"]:
                ax_rm.plot([p["sqrt_kl"] for p in ppo["proxy"]], [p["rm_score"] for p in ppo["proxy"]], "o-",
                           color=COLORS["ppo"], ms=3, label="PPO (training rollouts)")
            if ppo["gold"]:
                ax_gold.plot([p["sqrt_kl"] for p in ppo["gold"]], [p["gold_score"] for p in ppo["gold"]], "o-",
                             color=COLORS["ppo"], ms=3, label="PPO (held-out, --gold_eval_every)")
        ax_rm.set_ylabel("proxy: reward-model score", fontsize=8)
        ax_gold.set_ylabel("gold reward", fontsize=8)
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
    lines += [f"### {PLOTS[name]}\n\n![{PLOTS[name]}](plots/{name})\n" for name in plots]
    return "\n".join(lines) + "\n"


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
                   bon_prompts=args.bon_prompts, bon_max_n=args.bon_max_n)
    checkpoint.write_json(res, out / "rm_diagnostics.json")
    plots = write_plots(out, res)
    text = reading(res, plots)
    (out / "rm_diagnostics.md").write_text(text)
    print(text)
    print(f"wrote {out / 'rm_diagnostics.json'}" + (f" and {', '.join(str(out / 'plots' / p) for p in plots)}"
                                                   if plots else " (no plots: pip install matplotlib)"))


if __name__ == "__main__":
    run_cli(main)
