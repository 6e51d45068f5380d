"""The pipeline's report: a Markdown table of every stage's evaluation, and plots when matplotlib is installed.

    python -m minialign.evaluation.report --out out        # (re)write out/report.md and out/plots/*.png from a finished run

Everything is read back from what the stages wrote into their folders, so the report can be rebuilt
at any time: out/<stage>/eval.json (gold-rule evaluation on the held-out prompts), out/<stage>/metrics.jsonl
(training curves, and with --gold_eval_every the gold-vs-KL points), out/rm/rm_scores.json (reward-model
scores of the held-out chosen and rejected responses) and out/timings.json (wall seconds per stage).

Plots (out/plots/):
  training_curves.png   per stage, what it minimizes and what it is after (SFT loss; RM loss and pair
                        accuracy; DPO loss and reward margin; PPO reward-model score and KL; GRPO rule reward)
  rm_scores.png         reward-model scores of held-out chosen vs rejected responses
  gold_per_stage.png    gold score (sampled at T=1 and greedy) of every policy on the same prompts
  gold_vs_kl.png        gold score against KL(policy || SFT) as DPO, PPO and GRPO train: what each
                        method buys per nat of drift from the SFT model; with out/best_of_n/points.json
                        (python -m minialign.evaluation.best_of_n) also best-of-N at N = 1, 2, 4, ... against its
                        KL: exact for a judge with ties (the gold rule), log N - (N - 1) / N only where the
                        judge's scores of a prompt's samples are distinct (best_of_n.best_of_n_kl_per_prompt)

With OUT/rm_diagnostics.md (python -m minialign.evaluation.rm_diagnostics, the main job's last stage) the report
includes its section: each policy's reward-model score distribution, RM vs gold, length bias and the best-of-N
over-optimization curve, with its plots (out/plots/rm_*.png).

The optional stages (train_online_dpo.py as online_dpo and, with --rounds, iterative_dpo) get their rows,
curves and gold-vs-KL points like the others, and a table of gold score and KL after each round.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from pathlib import Path

from minialign.errors import run_cli

STAGES = ("sft", "rm", "dpo", "ppo", "grpo")  # the main job
OPTIONAL_STAGES = ("online_dpo", "iterative_dpo")  # reported when their folders exist
REPORTED = (*STAGES, *OPTIONAL_STAGES)
POLICY_STAGES = ("sft", "dpo", "ppo", "grpo", *OPTIONAL_STAGES)
COLORS = {"sft": "tab:gray", "dpo": "tab:blue", "ppo": "tab:orange", "grpo": "tab:green", "online_dpo": "tab:red",
          "iterative_dpo": "tab:purple", "best_of_n": "tab:brown"}

# (metric key, axis label) per stage: left panel = what the stage minimizes, right = what it is after
CURVES = {
    "sft": [("loss", "token NLL (assistant tokens)"), ("grad_norm", "gradient norm")],
    "rm": [("loss", "Bradley-Terry loss"), ("accuracy", "pair accuracy (train batch)")],
    "dpo": [("loss", "DPO loss"), ("rewards/margins", "reward margin (chosen - rejected)")],
    "ppo": [("objective/scores", "reward-model score"), ("objective/kl", "KL to SFT (per response)")],
    "grpo": [("reward", "rule reward (gold)"), ("completions/mean_length", "mean response length")],
    "online_dpo": [("loss", "DPO loss on its own samples"), ("objective/scores", "judge score of the samples")],
    "iterative_dpo": [("loss", "DPO loss on the round's pairs"), ("objective/scores", "judge score of the samples")],
}


def read_metrics(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def read_json(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.exists() else None


def load_timings(out: Path) -> dict:
    return read_json(out / "timings.json") or {}


def record_timing(out: Path, stage: str, seconds: float):
    """out/timings.json keeps each stage's wall time from the run that produced it (skips keep the old one)."""
    timings = load_timings(out)
    timings[stage] = round(seconds, 1)
    out.mkdir(parents=True, exist_ok=True)
    (out / "timings.json").write_text(json.dumps(timings, indent=2) + "\n")


COLUMNS = [  # (header, key in stage_values)
    ("wall s", "wall"), ("gold (T=1)", "sampled/gold_score"), ("gold (greedy)", "greedy/gold_score"),
    ("KL to SFT", "sampled/kl_to_ref"), ("mean length", "sampled/mean_length"), ("arith acc", "sampled/arith_acc"),
    ("harmful refused", "sampled/harmful_refusal_rate"), ("benign over-refused", "sampled/benign_over_refusal_rate"),
    ("RM pair acc", "rm_accuracy"),
]


def stage_values(out: Path) -> dict[str, dict]:
    """{stage: {column key: value}} for every stage of a pipeline output folder that has results."""
    timings, values = load_timings(out), {}
    for stage in REPORTED:
        if stage == "rm":
            scores = read_json(out / "rm" / "rm_scores.json")
            r = {"rm_accuracy": scores["eval_accuracy"]} if scores is not None else None
        else:
            r = read_json(out / stage / "eval.json")
        if r is None:
            continue
        values[stage] = {key: r.get(key) for _, key in COLUMNS if key != "wall"}
        values[stage]["wall"] = timings.get(stage)
    return values


def _row(stage: str, cells: list[str]) -> str:
    return f"| {stage} | " + " | ".join(cells) + " |"


def _header() -> list[str]:
    return ["| stage | " + " | ".join(h for h, _ in COLUMNS) + " |", "|---" * (len(COLUMNS) + 1) + "|"]


def table(out: Path) -> str:
    """One row per stage that has results: wall time, gold sampled/greedy, KL, length, task rates, RM accuracy."""
    def fmt(v, key):
        return "-" if v is None else (f"{v:.0f}" if key == "wall" else f"{v:.3f}")
    rows = [_row(stage, [fmt(v.get(key), key) for _, key in COLUMNS]) for stage, v in stage_values(out).items()]
    return "\n".join([*_header(), *rows])


def seed_table(outs: list[Path]) -> str:
    """The table over several seeds' runs: each cell the median [min, max] over the seeds that have it."""
    per_seed = [stage_values(o) for o in outs]
    rows = []
    for stage in REPORTED:
        if not any(stage in v for v in per_seed):
            continue
        cells = []
        for _, key in COLUMNS:
            xs = sorted(v[stage][key] for v in per_seed if stage in v and v[stage].get(key) is not None)
            if not xs:
                cells.append("-")
                continue
            f = (lambda x: f"{x:.0f}") if key == "wall" else (lambda x: f"{x:.3f}")
            cells.append(f"{f(statistics.median(xs))} [{f(xs[0])}, {f(xs[-1])}]")
        rows.append(_row(stage, cells))
    return "\n".join([*_header(), *rows])


def matmul_gflops(n: int = 1024, repeats: int = 9) -> float:
    """This machine's fp32 matmul speed (median of `repeats` n x n x n products, torch's current threads), to
    scale the wall times in a report: the same code ran 1.7-2.2x slower on a machine with 105 vs 174 GFLOP/s."""
    import time

    import torch
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - t0)
    return 2 * n**3 / statistics.median(times) / 1e9


def gold_vs_kl_points(out: Path, stage: str) -> list[tuple[float, float]]:
    """(KL to SFT, sampled gold) from the stage's metrics: the --gold_eval_every points and the final evaluation."""
    pts = [(r["sampled/kl_to_ref"], r["sampled/gold_score"]) for r in read_metrics(out / stage / "metrics.jsonl")
           if r.get("sampled/kl_to_ref") is not None and r.get("sampled/gold_score") is not None]
    return pts


def has_exact_kl(res: dict | None) -> bool:
    """Whether a best-of-N points.json (its dict) has minialign.evaluation.best_of_n's KL ("kl"); an older one has
    only log N - (N - 1) / N, which overstates a judge with ties: the stages that read it redo or leave it out."""
    return bool(res and res.get("points") and "kl" in res["points"][0])


def best_of_n_table(out: Path) -> str:
    """out/best_of_n/points.json as a Markdown section ('' when absent)."""
    res = read_json(out / "best_of_n" / "points.json")
    if not res:
        return ""
    if not has_exact_kl(res):
        return ("## Best-of-N\n\nout/best_of_n/points.json predates the exact KL (it has only log N - (N - 1) / N, "
                "which overstates the KL of a judge with ties): rerun python -m minialign.evaluation.best_of_n.\n")
    rows = [f"| {p['n']} | {p['gold_score']:.3f} | {p['judge_score']:.3f} | {p['kl']:.3f} | {p['kl_analytic']:.3f} |"
            for p in res["points"]]
    return (f"## Best-of-N\n\nN samples per prompt from {res['ckpt']} (T=1), the one {res['judge']} scores highest "
            f"kept; gold score of the kept response on {res['n_prompts']} prompts of {res['data']}. "
            "KL(best-of-N || policy): per prompt, log N - (N - 1) / N where the judge's scores of its samples are "
            "all distinct, else the exact KL of best-of-N on their empirical distribution, Σ_v q_v log(q_v / p_v) "
            "with q_v = F(v)^N - F(v-)^N (minialign.evaluation.best_of_n); mean over prompts. "
            f"{res['points'][-1]['prompts_with_ties']:.0%} of the prompts have tied scores.\n\n"
            + "\n".join(["| N | gold (kept) | judge score (kept) | KL | log N - (N-1)/N (distinct scores) |",
                          "|---|---|---|---|---|", *rows])
            + "\n")


def rounds_table(out: Path, stage: str) -> str:
    """The rows a --rounds run of train_online_dpo.py logs after each round, as a Markdown section ('' if none)."""
    rows = [r for r in read_metrics(out / stage / "metrics.jsonl") if "round" in r and "sampled/gold_score" in r]
    if not rows:
        return ""
    lines = [f"| {r['round']} | {r['step']} | {r['sampled/gold_score']:.3f} | "
             f"{r.get('sampled/kl_to_ref', math.nan):.3f} | {r['pairs/used']} | {r['pairs/ties_skipped']} |"
             for r in rows]
    return (f"## {stage}: after each round\n\nGold score (T=1) and KL to SFT on the run's --gold_eval_prompts "
            "held-out prompts; the pairs the round trained on and the prompts it skipped as ties.\n\n"
            + "\n".join(["| round | step | gold (T=1) | KL to SFT | pairs used | ties skipped |",
                          "|---|---|---|---|---|---|", *lines]) + "\n")


def write_plots(out: Path) -> list[str]:
    """Write out/plots/*.png; returns the file names written ([] without matplotlib)."""
    try:
        import matplotlib
        matplotlib.use("Agg")  # files only, no display
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    from minialign.algorithms.reward_model import save_histogram

    plots = out / "plots"
    plots.mkdir(parents=True, exist_ok=True)
    written = []

    # training curves: one row per stage that has metrics
    stages = [s for s in REPORTED if read_metrics(out / s / "metrics.jsonl")]
    if stages:
        fig, axes = plt.subplots(len(stages), 2, figsize=(10, 2.4 * len(stages)), squeeze=False)
        for row, stage in zip(axes, stages):
            metrics = read_metrics(out / stage / "metrics.jsonl")
            for ax, (key, label) in zip(row, CURVES[stage]):
                pts = [(r["step"], r[key]) for r in metrics
                       if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]
                if pts:
                    ax.plot(*zip(*pts), color=COLORS.get(stage, "tab:purple"), label="train")
                eval_key = f"eval_{key}"
                eval_pts = [(r["step"], r[eval_key]) for r in metrics if isinstance(r.get(eval_key), (int, float))]
                if eval_pts:
                    ax.plot(*zip(*eval_pts), "o--", color="black", label="held-out")
                    ax.legend(fontsize=7)
                ax.set_title(f"{stage}: {label}", fontsize=9)
                ax.set_xlabel("step", fontsize=8)
                ax.tick_params(labelsize=7)
        fig.tight_layout()
        fig.savefig(plots / "training_curves.png", dpi=90)
        plt.close(fig)
        written.append("training_curves.png")

    scores = read_json(out / "rm" / "rm_scores.json")
    if scores and scores.get("chosen"):
        title = f"reward model on held-out pairs: accuracy {scores['eval_accuracy']:.3f}"
        if save_histogram(scores["chosen"], scores["rejected"], plots / "rm_scores.png", title):
            written.append("rm_scores.png")

    evals = {s: read_json(out / s / "eval.json") for s in POLICY_STAGES}
    evals = {s: r for s, r in evals.items() if r is not None}
    if evals:
        fig, ax = plt.subplots(figsize=(6, 3.5))
        names = list(evals)
        xs = range(len(names))
        sampled = [evals[s]["sampled/gold_score"] for s in names]
        greedy = [evals[s]["greedy/gold_score"] for s in names]
        ax.bar([x - 0.2 for x in xs], sampled, 0.4, label="sampled (T=1)", color=[COLORS[s] for s in names])
        ax.bar([x + 0.2 for x in xs], greedy, 0.4, label="greedy", color=[COLORS[s] for s in names], alpha=0.45)
        for x, v in zip(xs, sampled):
            ax.text(x - 0.2, v + 0.01, f"{v:.2f}", ha="center", fontsize=8)
        ax.set_xticks(list(xs), names)
        ax.set_ylim(0, 1.08)
        ax.set_ylabel("gold score (held-out prompts)")
        ax.set_title("gold score per stage (solid: T=1, pale: greedy)", fontsize=10)
        fig.tight_layout()
        fig.savefig(plots / "gold_per_stage.png", dpi=90)
        plt.close(fig)
        written.append("gold_per_stage.png")

    curves = {s: gold_vs_kl_points(out, s) for s in ("dpo", "ppo", "grpo", *OPTIONAL_STAGES)}
    curves = {s: p for s, p in curves.items() if p}
    best_of_n = read_json(out / "best_of_n" / "points.json")
    if best_of_n and not has_exact_kl(best_of_n):  # an old points.json: its KL overstates ties (the table says so)
        best_of_n = None
    if curves or best_of_n:
        fig, ax = plt.subplots(figsize=(6, 4))
        sft_gold = evals["sft"]["sampled/gold_score"] if "sft" in evals else None
        if sft_gold is not None:
            ax.plot([0], [sft_gold], "s", color=COLORS["sft"], label="sft", markersize=8)
        for stage, pts in curves.items():
            if sft_gold is not None:
                pts = [(0.0, sft_gold), *pts]
            ax.plot(*zip(*pts), "o-", color=COLORS[stage], label=stage, markersize=4)
            ax.plot(*pts[-1], "*", color=COLORS[stage], markersize=14)
        if best_of_n:  # no training: N samples, the judge's favourite kept; KL exact for a judge with ties
            pts = [(p["kl"], p["gold_score"]) for p in best_of_n["points"]]
            ax.plot(*zip(*pts), "D--", color=COLORS["best_of_n"], markersize=4,
                    label=f"best-of-N by {best_of_n['judge']}, N={best_of_n['points'][0]['n']}.."
                          f"{best_of_n['points'][-1]['n']}")
        ax.set_xlabel("KL(policy || SFT) per response, nats")
        ax.set_ylabel("gold score sampled at T=1")
        ax.set_title("gold score vs drift from SFT (star: final evaluation)", fontsize=10)
        ax.legend()
        fig.tight_layout()
        fig.savefig(plots / "gold_vs_kl.png", dpi=90)
        plt.close(fig)
        written.append("gold_vs_kl.png")
    return written


def write_report(out: Path) -> str:
    """Write out/report.md (table + plots); returns the table."""
    out = Path(out)
    tab = table(out)
    plots = write_plots(out)
    eval_json = read_json(out / "sft" / "eval.json") or read_json(out / "dpo" / "eval.json") or {}
    n_prompts = eval_json.get("n_prompts", "?")
    parts = [
        "# minialign pipeline report\n",
        f"Every policy is evaluated on the same {n_prompts} held-out prompts (data/rl_eval.jsonl) "
        "with the default task's "
        "gold rule, sampled at temperature 1 and greedily; KL to SFT is the mean per-response sum of "
        "log pi - log pi_SFT over the temperature-1 samples. "
        "RM accuracy is on the held-out pairs (data/pref_eval.jsonl). "
        "Wall seconds are from the run that produced each stage.\n",
        tab + "\n",
        *[t for t in [rounds_table(out, s) for s in OPTIONAL_STAGES] + [best_of_n_table(out)] if t],
    ]
    diagnostics = out / "rm_diagnostics.md"  # python -m minialign.evaluation.rm_diagnostics (the main job's last stage)
    if diagnostics.exists():
        parts.append(diagnostics.read_text())
    if plots:
        captions = {"training_curves.png": "Training curves",
                    "rm_scores.png": "Reward-model scores, held-out chosen vs rejected",
                    "gold_per_stage.png": "Gold score per stage",
                    "gold_vs_kl.png": "Gold score against KL to the SFT model"}
        for name in plots:
            parts.append(f"## {captions[name]}\n\n![{captions[name]}](plots/{name})\n")
    else:
        parts.append("(No plots: matplotlib is not installed. `pip install matplotlib`, "
                     "then `python -m minialign.evaluation.report --out "
                     f"{out}` draws them from this run.)\n")
    (out / "report.md").write_text("\n".join(parts))
    return tab


def main(argv=None):
    ap = argparse.ArgumentParser(description="Write report.md and plots from a pipeline output folder.")
    ap.add_argument("--out", default="out", help="the pipeline's output root")
    args = ap.parse_args(argv)
    print(write_report(Path(args.out)))
    print(f"report: {Path(args.out) / 'report.md'}")


if __name__ == "__main__":
    run_cli(main)
