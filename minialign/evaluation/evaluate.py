"""Evaluate a policy checkpoint on held-out prompts with the default task's gold rule.

Reports, over the same prompts for every stage:
  gold_score (mean of the rule's 0/1 verdicts) sampled at temperature 1, and greedy;
  per-kind rates from minialign.task.gold.summarize (arithmetic accuracy, refusal of harmful requests,
  over-refusal of benign ones); mean response length in tokens; the share of responses that ended
  with <|im_end|>; and, given a reference checkpoint, KL(policy || ref) per sequence estimated from the
  temperature-1 samples: mean over samples of sum_t [log pi(y_t) - log ref(y_t)] (the k1 estimator,
  unbiased for the sequence KL because y ~ pi).

CLI: python -m minialign.evaluation.evaluate --ckpt out/sft [--ref out/sft] [--data data/rl_eval.jsonl] [--n 600]
"""

from __future__ import annotations

import argparse
import json

import torch

from minialign.algorithms.generation import generate
from minialign.algorithms.packing import pack_padded, response_logps
from minialign.data.batching import collate_prompts, to_device, tokenize_prompts
from minialign.data.formats import load_prompts
from minialign.data.tokenizer import Tokenizer, load_tokenizer
from minialign.task import gold
from minialign.training.checkpoint import load_model


@torch.no_grad()
def sample(model, tok: Tokenizer, prompts: list[dict], temperature: float, max_new_tokens: int, batch_size: int = 64,
           seed: int = 0, ref_model=None) -> list[dict]:
    """Generate one response per prompt; returns per-prompt dicts with text, length, finished, (kl)."""
    device = next(model.parameters()).device
    gen = torch.Generator(device=device).manual_seed(seed)
    out = []
    for i in range(0, len(prompts), batch_size):
        chunk = prompts[i : i + batch_size]
        p_ids, p_mask = collate_prompts([p["prompt_ids"] for p in chunk], tok.pad_id)
        p_ids, p_mask = p_ids.to(device), p_mask.to(device)
        g = generate(model, p_ids, p_mask, max_new_tokens, tok.eos_id, tok.pad_id, temperature=temperature,
                     generator=gen)
        kl = None
        if ref_model is not None:
            rows = to_device(pack_padded(p_ids, p_mask, g.response_ids, g.response_mask, 1, tok.pad_id), device)
            ref = response_logps(ref_model, rows)  # (b, N') with N' = the longest response
            kl = (g.logps[:, : ref.shape[1]] - ref).masked_fill(~rows["response_mask"], 0).sum(-1).tolist()
        for j, p in enumerate(chunk):
            ids = g.response_ids[j][g.response_mask[j]].tolist()
            row = {"prompt": p["prompt_text"], "response": tok.decode(ids), "length": len(ids),
                   "finished": bool(g.finished[j]),
                   "kind": p.get("kind"), "answer": p.get("answer")}
            if kl is not None:
                row["kl"] = kl[j]
            out.append(row)
    return out


def evaluate_policy(model, tok: Tokenizer, prompts: list[dict], max_new_tokens: int = 48, ref_model=None,
                    batch_size: int = 64, seed: int = 0) -> dict:
    """Gold score sampled (temperature 1) and greedy, with lengths and KL to ref. Returns a flat dict."""
    result = {}
    for name, temperature in (("sampled", 1.0), ("greedy", 0.0)):
        rows = sample(model, tok, prompts, temperature, max_new_tokens, batch_size, seed,
                      ref_model if temperature == 1.0 else None)
        verdicts = [gold.judge(r["prompt"], r["response"], r["kind"], r["answer"]) for r in rows]
        summary = gold.summarize(verdicts)
        result[f"{name}/gold_score"] = summary.pop("gold_score")
        result.update({f"{name}/{k}": v for k, v in summary.items()})
        result[f"{name}/mean_length"] = sum(r["length"] for r in rows) / len(rows)
        result[f"{name}/eos_rate"] = sum(r["finished"] for r in rows) / len(rows)
        if name == "sampled":
            result["examples"] = [dict(r, correct=v["correct"]) for r, v in list(zip(rows, verdicts))[:8]]
            if ref_model is not None:
                result["sampled/kl_to_ref"] = sum(r["kl"] for r in rows) / len(rows)
    result["n_prompts"] = len(prompts)
    return result


def gold_point(model, tok: Tokenizer, prompts: list[dict], max_new_tokens: int, ref_model) -> dict:
    """One point of a gold-vs-KL curve during training: the gold score sampled at temperature 1 and
    KL(policy || ref) on `prompts` (the same estimator and seed as evaluate_policy, no greedy pass).
    Sampling uses its own seeded generator, so the training run's random stream is untouched."""
    was_training = model.training
    model.eval()
    rows = sample(model, tok, prompts, 1.0, max_new_tokens, ref_model=ref_model)
    model.train(was_training)
    verdicts = [gold.judge(r["prompt"], r["response"], r["kind"], r["answer"]) for r in rows]
    point = {"sampled/gold_score": gold.summarize(verdicts)["gold_score"],
             "sampled/mean_length": sum(r["length"] for r in rows) / len(rows)}
    if ref_model is not None:
        point["sampled/kl_to_ref"] = sum(r["kl"] for r in rows) / len(rows)
    return point


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
    main()
