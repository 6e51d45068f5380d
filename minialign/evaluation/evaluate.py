"""The one evaluation of a policy: sample it on held-out prompts, score the samples, take KL(pi || ref).

For a policy pi, a reference pi_ref (the SFT model) and held-out prompts x, each sampled k times
(y ~ pi(.|x) at the given temperature, at most max_new_tokens, <|im_end|> included when emitted):

    score_j = E_x E_y [ r_j(x, y) ]      for every judge j (gold rule, reward model, classifier, reward functions)
    KL      = E_x E_y [ sum_t log pi(y_t | x, y_<t) - log pi_ref(y_t | x, y_<t) ]      (nats per sequence)

KL is the Monte-Carlo (k1) estimate of the sequence-level KL(pi(.|x) || pi_ref(.|x)), unbiased because y is drawn
from pi (so only at temperature 1, the distribution the KL is about). Both log-probs come from one packed
training-layout forward each (minialign.algorithms.packing.response_logps, float32 log-softmax), not from the
sampler's KV-cache log-probs, so a policy evaluated against itself gets exactly 0. A response cut at
max_new_tokens counts the tokens it has.

Sampling is the RL sampler (minialign.algorithms.rollout.sample_rollout at step 0; greedy_rollout at temperature 0)
with its seed rule: the generate() call starting at prompt i is seeded from (seed, 0, i). Every policy is scored on
the same prompts with the same random stream (common random numbers), in every script, in best-of-N, the report
and the IMDb experiment: `sample_and_score` is the only place a policy is sampled for evaluation.

On top of it:
  evaluate_policy   the default task's report (eval.json of every stage): gold score sampled at temperature 1 and
                    greedy, per-kind rates (minialign.task.gold.summarize), lengths, EOS rate, KL to the reference;
  gold_point        one point of a gold-vs-KL curve during training (the sampled half of evaluate_policy; with a
                    reward model also its mean score of the same responses);
  summarize         means and standard errors of any judge's scores and the KL (the IMDb frontier's points).

CLI: python -m minialign.evaluation.evaluate --ckpt out/sft [--ref out/sft] [--data data/rl_eval.jsonl] [--n 600]
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import dataclass
from typing import Callable

import torch

from minialign.algorithms.packing import response_logps, response_scores
from minialign.algorithms.rollout import (Rollout, greedy_rollout, micro_batch_rows, rollout_forward, sample_rollout,
                                          source_rewards)
from minialign.data.batching import tokenize_prompts
from minialign.data.formats import load_prompts
from minialign.data.tokenizer import Tokenizer, load_tokenizer
from minialign.errors import UserError, run_cli
from minialign.task import gold
from minialign.training.checkpoint import load_model

Judge = Callable[[Rollout], "torch.Tensor | list[float]"]  # a rollout -> one score per response (R,)


@dataclass
class Samples:
    """What sample_and_score returns; rows are prompt-major (R = prompts x samples_per_prompt)."""
    rollout: Rollout
    scores: dict[str, torch.Tensor]  # judge name -> (R,) float64
    kl: torch.Tensor | None  # (R,) float64 sum_t [log pi - log pi_ref], None without a reference

    @property
    def prompts(self) -> list[str]:
        return [r["prompt_text"] for r in self.rollout.rows]

    @property
    def completions(self) -> list[str]:
        return self.rollout.completions


@torch.no_grad()
def sequence_kl(policy, ref, ro: Rollout, micro_batch_size: int = 64) -> torch.Tensor:
    """(R,) float64 sum_t [log pi(y_t|..) - log pi_ref(y_t|..)] of each rollout response (its mask: up to and
    including <|im_end|>), both log-probs from the same packed training-layout forward."""
    mb = micro_batch_rows(ro, micro_batch_size)
    policy_logps = rollout_forward(lambda b: response_logps(policy, b), ro, mb)  # (R, N) float32
    ref_logps = rollout_forward(lambda b: response_logps(ref, b), ro, mb)  # (R, N)
    return (policy_logps.double() - ref_logps.double()).masked_fill(~ro.response_mask, 0.0).sum(-1)


@torch.no_grad()
def sample_and_score(policy, tok, prompts: list[dict], judges: dict[str, Judge] | None = None, ref=None, *,
                     samples_per_prompt: int = 1, temperature: float = 1.0, max_new_tokens: int = 48, seed: int = 0,
                     prompts_per_generate: int = 64, micro_batch_size: int = 64) -> Samples:
    """Sample `samples_per_prompt` responses per prompt from `policy`, score them with every judge, and take
    each response's KL to `ref` (None: no KL). temperature 0 = greedy (one response per prompt, no KL).

    prompts: tokenize_prompts dicts ("prompt_ids", "prompt_text", and the record's fields); judges: name ->
    f(rollout) -> (R,) scores (gold_judge, reward_model_judge, reward_funcs_judge, text_judge build them).
    The policy is put in eval mode for the call (dropout off) and back in its mode after.
    """
    if temperature <= 0 and (samples_per_prompt != 1 or ref is not None):
        raise ValueError("greedy evaluation (temperature 0) draws one response per prompt and has no KL")
    if ref is not None and temperature != 1.0:
        raise ValueError(f"the KL to the reference is about the policy at temperature 1, not {temperature}")
    was_training = policy.training
    policy.eval()
    try:
        if temperature > 0:
            ro = sample_rollout(policy, tok, prompts, samples_per_prompt, max_new_tokens, temperature, seed, 0, 0,
                                prompts_per_generate)
        else:
            ro = greedy_rollout(policy, tok, prompts, max_new_tokens, prompts_per_generate)
        scores = {name: torch.as_tensor(judge(ro), dtype=torch.float64).cpu() for name, judge in (judges or {}).items()}
        kl = sequence_kl(policy, ref, ro, micro_batch_size).cpu() if ref is not None else None
    finally:
        policy.train(was_training)
    return Samples(ro, scores, kl)


# ------------------------------------------------------------------------------------------ judges

def gold_judge(ro: Rollout) -> list[float]:
    """The default task's gold rule (minialign.task.gold): 1.0 per correct response, else 0.0."""
    return gold.gold_reward([r["prompt_text"] for r in ro.rows], ro.completions, [r["kind"] for r in ro.rows],
                            [r.get("answer") for r in ro.rows])


def reward_model_judge(reward_model, micro_batch_size: int = 64) -> Judge:
    """A trained reward model's score of each response (at its last token, in the packed layout)."""
    return lambda ro: rollout_forward(lambda b: response_scores(reward_model, b), ro,
                                      micro_batch_rows(ro, micro_batch_size))


def reward_funcs_judge(sources, reward_model=None, micro_batch_size: int = 64) -> Judge:
    """The weighted sum sum_k w_k s_k of --reward_funcs sources (minialign.algorithms.reward_funcs), "reward_model"
    among them scored by `reward_model`: the same reward an RL step computes."""
    def judge(ro):
        rm = reward_model_judge(reward_model, micro_batch_size)(ro) if reward_model is not None else None
        rewards = source_rewards(sources, ro, rm)
        return sum(s.weight * rewards[s.name] for s in sources)
    return judge


def text_judge(fn: Callable[[list[str], list[str]], list[float]]) -> Judge:
    """A function of (prompts, completions) -> scores, e.g. minialign.algorithms.reward_funcs.classifier_reward."""
    return lambda ro: fn([r["prompt_text"] for r in ro.rows], ro.completions)


# ------------------------------------------------------------------------------ the default task's report

def _gold_summary(samples: Samples, name: str) -> tuple[dict, list[dict]]:
    ro = samples.rollout
    verdicts = [gold.judge(r["prompt_text"], c, r["kind"], r.get("answer")) for r, c in zip(ro.rows, ro.completions)]
    summary = gold.summarize(verdicts)
    out = {f"{name}/gold_score": summary.pop("gold_score"), **{f"{name}/{k}": v for k, v in summary.items()},
           f"{name}/mean_length": float(ro.lengths.double().mean()),
           f"{name}/eos_rate": float(ro.finished.double().mean())}
    return out, verdicts


def evaluate_policy(model, tok: Tokenizer, prompts: list[dict], max_new_tokens: int = 48, ref_model=None,
                    seed: int = 0) -> dict:
    """Gold score sampled (temperature 1, with the KL to ref_model) and greedy, with lengths. Returns a flat dict."""
    result = {}
    for name, temperature in (("sampled", 1.0), ("greedy", 0.0)):
        samples = sample_and_score(model, tok, prompts, ref=ref_model if temperature == 1.0 else None,
                                   temperature=temperature, max_new_tokens=max_new_tokens, seed=seed)
        summary, verdicts = _gold_summary(samples, name)
        result.update(summary)
        if name == "sampled":
            ro = samples.rollout
            result["examples"] = [
                {"prompt": r["prompt_text"], "response": c, "length": int(n), "finished": bool(f),
                 "kind": r.get("kind"), "answer": r.get("answer"), "correct": v["correct"],
                 **({"kl": float(samples.kl[i])} if samples.kl is not None else {})}
                for i, (r, c, n, f, v) in enumerate(zip(ro.rows, ro.completions, ro.lengths, ro.finished, verdicts))
                if i < 8]
            if samples.kl is not None:
                result["sampled/kl_to_ref"] = float(samples.kl.mean())
    result["n_prompts"] = len(prompts)
    return result


def gold_point(model, tok: Tokenizer, prompts: list[dict], max_new_tokens: int, ref_model, seed: int = 0,
               reward_model=None) -> dict:
    """One point of a gold-vs-KL curve during training: the sampled half of evaluate_policy (same seed, same
    estimator). The sampler has its own seeded generator, so the training run's random stream is untouched.

    With a reward_model the point also has sampled/rm_score, the mean reward-model score (reward_model_judge) of
    the very same responses, so proxy and gold of a point are one set of samples (rm_diagnostics' PPO curve)."""
    judges = {"rm": reward_model_judge(reward_model)} if reward_model is not None else None
    samples = sample_and_score(model, tok, prompts, judges, ref=ref_model, max_new_tokens=max_new_tokens, seed=seed)
    summary, _ = _gold_summary(samples, "sampled")
    point = {k: summary[k] for k in ("sampled/gold_score", "sampled/mean_length")}
    if reward_model is not None:
        point["sampled/rm_score"] = float(samples.scores["rm"].mean())
    if samples.kl is not None:
        point["sampled/kl_to_ref"] = float(samples.kl.mean())
    return point


def summarize(samples: Samples, judge: str, n_examples: int = 4) -> dict:
    """Means and standard errors of one judge's scores and of the KL, and n_examples responses (one per prompt).
    The standard errors treat the responses as independent (those of one prompt are not quite)."""
    ro, score = samples.rollout, samples.scores[judge]
    n = len(score)

    def mean_se(x: torch.Tensor) -> tuple[float, float]:
        x = x.double()
        return float(x.mean()), (float(x.std() / math.sqrt(n)) if n > 1 else 0.0)

    reward, reward_se = mean_se(score)
    kl, kl_se = mean_se(samples.kl) if samples.kl is not None else (None, None)
    G = ro.group_size
    return {"reward": reward, "reward_se": reward_se, "kl": kl, "kl_se": kl_se, "n_samples": n,
            "mean_length": float(ro.lengths.double().mean()), "eos_rate": float(ro.finished.double().mean()),
            "examples": [{"prompt": ro.rows[i]["prompt_text"], "completion": ro.completions[i],
                          "reward": float(score[i]), **({"kl": float(samples.kl[i])} if samples.kl is not None else {})}
                         for i in range(0, min(n_examples * G, n), G)]}


def load_eval_prompts(path: str, tok: Tokenizer, n: int, max_new_tokens: int, max_seq_len: int) -> list[dict]:
    """The first n held-out prompts (0 = all) that leave room for max_new_tokens within the model's max_seq_len.

    Call it before training: a prompt too long to generate from is dropped and counted here (a DataError-
    like ValueError if none fits), never a crash after training finished.
    """
    stats = {}
    budget = max_seq_len - max_new_tokens
    if budget < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens} leaves no room for a prompt in max_seq_len={max_seq_len}")
    records = load_prompts(path)
    lacking = [r for r in records if r.fields.get("kind") not in gold.KINDS]
    if lacking:  # refused now, not after training: the gold rule reads each prompt's kind (and answer)
        where = f"{path}:{lacking[0].line}" if lacking[0].line else str(path)
        raise UserError(f"{where}: {len(lacking)} of {len(records)} prompts have no 'kind' ({', '.join(gold.KINDS)}), "
                        "which the default task's gold rule needs to judge them (and 'answer' for arith); these "
                        "held-out prompts are the default task's (data/rl_eval.jsonl): with other data pass --eval_data ''")
    prompts = tokenize_prompts(records, tok, budget, stats)
    if not prompts:
        raise ValueError(f"none of the {len(records)} prompts in {path} fits in max_seq_len - max_new_tokens = "
                         f"{budget} tokens")
    if stats.get("dropped_prompt_too_long"):
        print(f"evaluate: dropped {stats['dropped_prompt_too_long']} of {len(records)} prompts in {path} longer than "
              f"{budget} tokens (max_seq_len {max_seq_len} - {max_new_tokens} new tokens)")
    return prompts[:n] if n else prompts


def format_result(res: dict) -> str:
    keys = ["sampled/gold_score", "greedy/gold_score", "sampled/mean_length", "sampled/kl_to_ref",
            "sampled/arith_acc", "sampled/harmful_refusal_rate", "sampled/benign_over_refusal_rate"]
    return "  ".join(f"{k.split('/')[-1] if k.startswith('sampled') else 'greedy_gold'}={res[k]:.3f}"
                     for k in keys if res.get(k) is not None)


def main(argv=None):
    ap = argparse.ArgumentParser(description="Gold-rule evaluation of a policy checkpoint.")
    ap.add_argument("--ckpt", required=True, help="policy checkpoint folder (e.g. out/sft)")
    ap.add_argument("--ref", default="", help="reference checkpoint folder for the KL estimate")
    ap.add_argument("--data", default="data/rl_eval.jsonl", help="held-out prompts")
    ap.add_argument("--n", type=int, default=600, help="number of prompts (0 = all)")
    ap.add_argument("--max_new_tokens", type=int, default=48)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="", help="write the result JSON here")
    args = ap.parse_args(argv)
    torch.set_grad_enabled(False)
    tok = load_tokenizer(args.ckpt)
    model = load_model(args.ckpt).eval()
    ref = load_model(args.ref).eval() if args.ref else None
    prompts = load_eval_prompts(args.data, tok, args.n, args.max_new_tokens, model.cfg.max_seq_len)
    res = evaluate_policy(model, tok, prompts, args.max_new_tokens, ref, seed=args.seed)
    print(format_result(res))
    for ex in res["examples"][:4]:
        print(f"  [{'ok' if ex['correct'] else 'x '}] {ex['prompt']!r} -> {ex['response']!r}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(res, f, indent=2)


if __name__ == "__main__":
    run_cli(main)
