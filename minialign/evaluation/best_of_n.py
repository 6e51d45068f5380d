"""Best-of-N sampling: draw N responses per prompt from a policy and keep the one a judge scores highest.

For N in {1, 2, 4, ..., max_n} it measures the gold score of the kept response on held-out prompts, with
the KL of the best-of-N policy to the policy it samples from, so best-of-N sits on the report's gold-vs-KL
plot next to DPO, PPO and GRPO: what selection at inference buys per nat of drift, with no training at all.

The KL (`best_of_n_kl_per_prompt`), per prompt, from the judge's scores of that prompt's max_n samples:
  * scores all distinct: the analytic KL(best-of-N || π) = log N - (N - 1) / N (Stiennon et al. 2020,
    App. G.3), exact when the judge's scores are almost surely distinct (a continuous reward model);
  * scores with ties (the 0/1 gold rule, any rule, a reward model on duplicate samples): the best-of-N
    policy is then a mixture, and log N - (N - 1) / N overstates its KL (Beirami et al. 2024, "Theoretical
    guarantees on the best-of-n alignment policy", show it is an upper bound). For the empirical score
    distribution, sorted distinct values v with probabilities p_v and F(v) = P(score <= v), best-of-N keeps a
    sample of value v with probability q_v = F(v)^N - F(v-)^N, and within a value it keeps a draw of π given
    that value (the first sample of the best value: ties do not favour any response), so the response-level KL
    equals the score-level one, KL = Σ_v q_v log(q_v / p_v) (Beirami et al.'s formula for a finite support).
    With a 0/1 judge and pass rate p it is KL(Bern(1 - (1 - p)^N) || Bern(p)) <= log(1 / p): at p = 0.6,
    N = 16, 0.51 nats, not 1.83.
The reported KL is the mean over prompts; `kl_analytic` (log N - (N - 1) / N) stays in points.json beside it
for comparison, with the share of prompts whose samples tie. The plug-in estimate is that of the max_n
samples' empirical distribution: with few samples a continuous judge's prompt is called tie-free and a
discrete judge's rare values are estimated coarsely (simplified: no smoothing, no confidence interval).

Nested subsets: max_n samples are drawn once per prompt (the KV-cache sampler at temperature 1, each
prompt prefilled once, seeded per chunk of prompts); best-of-N keeps the best of the FIRST N of them, so
the points share their samples. Ties go to the earlier sample.

Judge: a trained reward model (--reward_model out/rm, its score at the response's last token) and/or rule
rewards (--reward_funcs gold; minialign.algorithms.reward_funcs), s = Σ_k w_k s_k. With the gold rule itself as the
judge, the gold score of best-of-N is the share of prompts with a correct response among N (pass@N):
the ceiling any judge could reach with these samples.

Rejection-sampling fine-tuning (RAFT, Dong et al. 2023; expert iteration): --sft_out writes each prompt's
kept response of best-of-max_n as an SFT conversation {"messages": [..., {"role": "assistant", ...}]},
only the ones that ended with <|im_end|>, have visible text and scored >= --sft_min_score. One round, on
training prompts:
    python -m minialign.evaluation.best_of_n --ckpt out/sft --reward_funcs gold --data data/rl_train.jsonl \
        --n_prompts 2000 --max_n 8 --sft_min_score 1 --sft_out out/rft/data.jsonl --out_dir out/rft_samples
    python train_sft.py --init_from out/sft --data out/rft/data.jsonl --eval_data data/rl_eval.jsonl \
        --out_dir out/rft --max_steps 60 --lr 3e-4 --warmup_steps 5
A second round samples from out/rft the same way. (Simplified: the kept response is trained on like any
SFT data; RAFT's reward-ranked filtering is the score threshold and the choice of the best of N.)

CLI: python -m minialign.evaluation.best_of_n --ckpt out/sft --reward_model out/rm [--n_prompts 200] [--max_n 16]
     -> out/best_of_n/points.json
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch

from minialign.algorithms.reward_funcs import parse_reward_funcs
from minialign.algorithms.roles import frozen, load_reward_model
from minialign.algorithms.rollout import load_rl_prompts
from minialign.data.tokenizer import load_tokenizer
from minialign.errors import run_cli
from minialign.evaluation.evaluate import gold_judge, reward_funcs_judge, sample_and_score
from minialign.training import checkpoint
from minialign.training.runtime import Runtime


def best_of_n_kl(n: int) -> float:
    """KL(best-of-n || π) = log n - (n - 1) / n nats (0 for n = 1; grows like log n)."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    return math.log(n) - (n - 1) / n


def best_of_n_kl_per_prompt(scores: torch.Tensor, n: int) -> torch.Tensor:
    """scores (P, M) of M samples per prompt -> (P,) float64 KL(best-of-n || π) in nats, per prompt: the analytic
    log n - (n - 1) / n where the M scores are all distinct, else the exact KL of best-of-n on their empirical
    distribution, Σ_v q_v log(q_v / p_v) with q_v = F(v)^n - F(v-)^n (see the module docstring)."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    out = []
    for row in scores.detach().double().cpu():
        values, counts = torch.unique(row, sorted=True, return_counts=True)  # distinct values, ascending
        if len(values) == len(row) or n == 1:  # no ties: the continuous-judge formula (and best-of-1 is π: 0)
            out.append(best_of_n_kl(n))
            continue
        p = counts.double() / len(row)  # p_v
        F = p.cumsum(0).clamp(max=1.0)  # F(v) = P(score <= v)
        q = F**n - torch.cat([F.new_zeros(1), F[:-1]]) ** n  # q_v = F(v)^n - F(v-)^n > 0
        terms = torch.where(q > 0, q * (q / p).log(), torch.zeros_like(q))  # 0 log 0 = 0: F(v)^n underflows
        out.append(float(terms.sum().clamp(min=0.0)))  # Σ_v q_v log(q_v / p_v)    (at n = 256, F = 1/256)
    return torch.tensor(out, dtype=torch.float64)


def best_indices(scores: torch.Tensor, n: int) -> torch.Tensor:
    """scores (P, M) of M samples per prompt -> (P,) index of the best among the first n (the first of equals)."""
    if not 1 <= n <= scores.shape[1]:
        raise ValueError(f"n={n} must be in [1, {scores.shape[1]}] (samples per prompt)")
    return scores[:, :n].argmax(1)


def points(scores: torch.Tensor, gold: torch.Tensor, ns: list[int]) -> list[dict]:
    """scores, gold (P, M) -> per n: the mean gold and judge score of the kept samples, the KL (mean over prompts
    of best_of_n_kl_per_prompt: exact for ties), the analytic log n - (n - 1) / n, and the share of prompts
    whose M scores tie."""
    ties = float(torch.tensor([len(torch.unique(r)) < len(r) for r in scores.detach().cpu()]).double().mean())
    out = []
    for n in ns:
        keep = best_indices(scores, n)[:, None]  # (P, 1)
        out.append({"n": n, "gold_score": float(gold.gather(1, keep).mean()),
                    "judge_score": float(scores.gather(1, keep).mean()),
                    "kl": float(best_of_n_kl_per_prompt(scores, n).mean()), "kl_analytic": best_of_n_kl(n),
                    "prompts_with_ties": ties})
    return out


def sample_and_judge(model, tok, prompts: list[dict], judge, gold, max_n: int, max_new_tokens: int, seed: int,
                     prompts_per_generate: int = 16) -> dict:
    """max_n samples per prompt (minialign.evaluation.evaluate.sample_and_score), scored by `judge` (the selector)
    and `gold` (what the kept response is worth) -> {scores (P, max_n) float64, gold (P, max_n) float64,
    completions [P][max_n] str, finished (P, max_n) bool}."""
    samples = sample_and_score(model, tok, prompts, {"judge": judge, "gold": gold}, samples_per_prompt=max_n,
                               max_new_tokens=max_new_tokens, seed=seed, prompts_per_generate=prompts_per_generate)
    ro = samples.rollout
    return {"scores": samples.scores["judge"].view(-1, max_n), "gold": samples.scores["gold"].view(-1, max_n),
            "completions": [ro.completions[i : i + max_n] for i in range(0, len(ro.rows), max_n)],
            "finished": ro.finished.view(-1, max_n).cpu()}


def sft_records(prompts: list[dict], res: dict, n: int, min_score: float) -> tuple[list[dict], dict]:
    """The kept response of best-of-n per prompt as SFT conversations, if it finished, has visible text and scored
    >= min_score -> (records, how many were left out for each reason)."""
    keep = best_indices(res["scores"], n).tolist()
    out, counts = [], {"unfinished": 0, "empty": 0, "below_min_score": 0}
    for b, (p, k) in enumerate(zip(prompts, keep)):
        if not res["finished"][b, k]:
            counts["unfinished"] += 1
        elif not res["completions"][b][k].strip():  # SFT data needs visible text (minialign.data.formats refuses it)
            counts["empty"] += 1
        elif res["scores"][b, k] < min_score:
            counts["below_min_score"] += 1
        else:
            out.append({"messages": [*p["messages"], {"role": "assistant", "content": res["completions"][b][k]}]})
    return out, counts


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description="Best-of-N sampling: gold score against the KL (exact for a judge with "
                                             "ties), and RAFT data.")
    ap.add_argument("--ckpt", required=True, help="policy checkpoint folder (e.g. out/sft)")
    ap.add_argument("--reward_model", default="", help="trained reward model folder (train_rm.py output) as the judge")
    ap.add_argument("--reward_funcs", nargs="*", default=[], help="rule judges: gold | format | length | gsm8k")
    ap.add_argument("--reward_weights", nargs="*", type=float, default=[],
                    help="one weight per --reward_funcs entry (empty = all 1.0; the reward model's weight is 1)")
    ap.add_argument("--data", default="data/rl_eval.jsonl", help="prompts (held-out for the points; training "
                                                                  "prompts for --sft_out)")
    ap.add_argument("--n_prompts", type=int, default=200, help="the first N prompts of --data (0 = all)")
    ap.add_argument("--max_n", type=int, default=16, help="samples per prompt; points at N = 1, 2, 4, ... max_n")
    ap.add_argument("--max_new_tokens", type=int, default=48, help="generation length (48, as every evaluation)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out_dir", default="out/best_of_n", help="writes points.json here")
    ap.add_argument("--sft_out", default="", help="also write best-of-max_n responses as SFT JSONL here (RAFT)")
    ap.add_argument("--sft_min_score", type=float, default=-math.inf, help="--sft_out keeps responses scored >= this")
    ap.add_argument("--device", default="auto", help="auto | cpu | cuda")
    return ap


def main(argv=None):
    ap = build_parser()
    args = ap.parse_args(argv)
    prog = "python -m minialign.evaluation.best_of_n"
    if not args.reward_model and not args.reward_funcs:
        ap.error("no judge: give --reward_funcs (e.g. gold) and/or --reward_model PATH")
    if args.max_n < 1 or args.n_prompts < 0:
        ap.error(f"--max_n={args.max_n} must be >= 1 and --n_prompts={args.n_prompts} >= 0")
    names = args.reward_funcs + ["reward_model"] * bool(args.reward_model)
    weights = args.reward_weights + [1.0] * bool(args.reward_model and args.reward_weights)
    try:
        sources = parse_reward_funcs(names, weights, model_names=("reward_model",))
    except ValueError as e:
        ap.error(str(e))
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    rt = Runtime(device, torch.float32)
    tok = load_tokenizer(checkpoint.tokenizer_path_for(args.ckpt))
    model = frozen(checkpoint.load_model(args.ckpt), rt)
    reward_model = load_reward_model(args.reward_model, rt, prog) if args.reward_model else None
    prompts = load_rl_prompts(args.data, tok, model.cfg.max_seq_len - args.max_new_tokens, sources)
    prompts = prompts[: args.n_prompts or None]
    if any("kind" not in p for p in prompts):
        ap.error(f"{args.data}: the gold score needs the default task's 'kind' (and 'answer') fields")
    judge = reward_funcs_judge(sources, reward_model, 4 * args.max_n)
    res = sample_and_judge(model, tok, prompts, judge, gold_judge, args.max_n, args.max_new_tokens, args.seed)
    ns = sorted({2**i for i in range(int(math.log2(args.max_n)) + 1)} | {args.max_n})
    judge_name = " + ".join(f"{s.weight:g} x {s.name}" for s in sources)
    out = {"ckpt": args.ckpt, "judge": judge_name, "data": args.data, "n_prompts": len(prompts), "seed": args.seed,
           "max_new_tokens": args.max_new_tokens, "points": points(res["scores"], res["gold"], ns)}
    Path(args.out_dir).mkdir(parents=True, exist_ok=True)
    checkpoint.write_json(out, Path(args.out_dir) / "points.json")
    print(f"best-of-N of {args.ckpt} judged by {judge_name} on {len(prompts)} prompts of {args.data}:")
    for p in out["points"]:
        print(f"  N={p['n']:3d}  gold {p['gold_score']:.3f}  judge {p['judge_score']:.3f}  KL {p['kl']:.3f} "
              f"(log N - (N-1)/N: {p['kl_analytic']:.3f}; {p['prompts_with_ties']:.0%} of prompts with tied scores)")
    if args.sft_out:
        records, counts = sft_records(prompts, res, args.max_n, args.sft_min_score)
        Path(args.sft_out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.sft_out).write_text("".join(json.dumps(r) + "\n" for r in records))
        print(f"wrote {len(records)} SFT conversations to {args.sft_out} (left out: {counts['unfinished']} unfinished,"
              f" {counts['empty']} empty, {counts['below_min_score']} scored below {args.sft_min_score})")


if __name__ == "__main__":
    run_cli(main)
