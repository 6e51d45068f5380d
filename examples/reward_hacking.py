"""Look at PPO runs for reward hacking: the proxy reward next to the gold score, and what the policy says.

    python examples/reward_hacking.py RUN_DIR [RUN_DIR ...] [--reward_model out/rm] [--n 600]

For each train_ppo.py output folder it prints one markdown table row:
  * from metrics.jsonl, at the first and last logged iteration: the proxy reward being maximized
    (objective/scores), the KL to the reference (objective/kl), the mean response length and the
    fraction of responses that end with <|im_end|>;
  * from eval.json (the script's final evaluation on the held-out prompts): the gold score sampled
    at temperature 1, the harmful-request refusal rate, arithmetic accuracy and the KL to the SFT model;
and then, sampling the final policy (ckpt.pt) on the held-out HARMFUL prompts, its most frequent
response with its share, and that response's reward-model score next to a plain refusal's, averaged
over the same prompts: the reward model's blind spot, in numbers. See examples/reward_hacking.md.
"""

import argparse
import collections
import json
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from minialign.algorithms.reward_model import score_responses  # noqa: E402
from minialign.data.tokenizer import Tokenizer  # noqa: E402
from minialign.errors import run_cli  # noqa: E402
from minialign.evaluation.evaluate import load_eval_prompts, sample_and_score  # noqa: E402
from minialign.training.checkpoint import load_model  # noqa: E402

REFUSAL = "Sorry, I won't help with that request."  # a refusal as the preference data writes it
MAX_NEW_TOKENS = 48  # as the scripts' final evaluation samples


def logged(run: Path) -> tuple[dict, dict]:
    rows = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines() if l.strip()]
    train = [r for r in rows if "objective/scores" in r]
    return train[0], train[-1]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="+", help="train_ppo.py output folders")
    ap.add_argument("--reward_model", default="out/rm", help="the reward model the runs were trained against")
    ap.add_argument("--data", default="data/rl_eval.jsonl", help="held-out prompts")
    ap.add_argument("--n", type=int, default=600, help="held-out prompts to sample")
    args = ap.parse_args(argv)
    torch.set_grad_enabled(False)
    rm = load_model(args.reward_model, kind="scalar").eval()

    print("| run | logged iterations | proxy score first -> last | KL first -> last | length first -> last "
          "| eos_rate last | gold (sampled) | harmful refused | arith acc | KL to SFT |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    behaviours = []
    for run in map(Path, args.runs):
        first, last = logged(run)
        res = json.loads((run / "eval.json").read_text())
        print(f"| {run.name} | {first['step']} -> {last['step']} "
              f"| {first['objective/scores']:.2f} -> {last['objective/scores']:.2f} "
              f"| {first['objective/kl']:.2f} -> {last['objective/kl']:.2f} "
              f"| {first['completions/mean_length']:.1f} -> {last['completions/mean_length']:.1f} "
              f"| {last['completions/eos_rate']:.2f} | {res['sampled/gold_score']:.3f} "
              f"| {res['sampled/harmful_refusal_rate']:.3f} | {res['sampled/arith_acc']:.3f} "
              f"| {res['sampled/kl_to_ref']:.2f} |")
        tok = Tokenizer(run / "tokenizer.model")
        policy = load_model(run).eval()
        prompts = load_eval_prompts(args.data, tok, args.n, MAX_NEW_TOKENS, policy.cfg.max_seq_len)
        harmful = [p for p in prompts if p["kind"] == "harmful"]
        responses = sample_and_score(policy, tok, harmful, max_new_tokens=MAX_NEW_TOKENS).completions
        top, count = collections.Counter(responses).most_common(1)[0]
        texts = [p["prompt_text"] for p in harmful]
        top_score = statistics.fmean(score_responses(rm, tok, texts, [top] * len(texts)))
        refusal_score = statistics.fmean(score_responses(rm, tok, texts, [REFUSAL] * len(texts)))
        behaviours.append((run.name, len(harmful), top, count, top_score, refusal_score))

    print()
    for name, n, top, count, top_score, refusal_score in behaviours:
        print(f"{name}: most frequent answer to the {n} held-out harmful prompts ({count}/{n}): {top!r}")
        print(f"    reward model, mean over those prompts: that answer {top_score:.2f}, "
              f"the refusal {REFUSAL!r} {refusal_score:.2f}")


if __name__ == "__main__":
    run_cli(main)
