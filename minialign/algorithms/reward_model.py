"""The reward model outside its training loop: pair batches, scoring, held-out metrics, and a CLI
that scores a JSONL file.

A reward model is a `ScalarModel` (minialign.models.decoder): a backbone plus a linear head that gives a score
at every position. The reward of a response is the score at its LAST token, which is the <|im_end|>
closing it (unless truncation cut it): the one position that has read the whole prompt and response.

Batches come from the one packer (minialign.algorithms.packing): a pair is a group of G = 2 responses to one
prompt, packed as one row [x | y_c | y_r], the prompt computed once; `response_scores` reads each
response's score at its last token, so the rewards of a pair come out as rows 2b (chosen) and 2b + 1
(rejected). Single responses (`score_responses`, the rollouts of PPO/GRPO) are groups of G = 1.

A scored response is tokenized exactly as in training (minialign.data.batching.tokenize_preferences): the
prompt rendered by `Tokenizer.render_prompt` (ending with the assistant header), then the response
tokens and <|im_end|>; the same truncation policy applies (prompt keeps its last max_len // 2
tokens, the response its first max_len - len(prompt)).

CLI (scores with a trained RM; errors name file:line like minialign.data.formats):
    python -m minialign.algorithms.reward_model --ckpt out/rm --data file.jsonl [--out scores.jsonl]
  {"prompt", "response"} lines       -> one score per line
  {"prompt", "chosen", "rejected"}   -> "chosen_score rejected_score" per pair, then pairwise accuracy
  (prompt: a string or a message list ending with a user turn; pairs: any format load_preferences reads)
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch

from minialign.algorithms.packing import collate_pairs, length_sorted_chunks, pack, pair_lengths, response_scores
from minialign.data.batching import to_device, tokenize_preferences
from minialign.data.formats import DataError, load_preferences, load_prompts, read_jsonl
from minialign.data.tokenizer import Tokenizer, load_tokenizer
from minialign.errors import run_cli
from minialign.training.checkpoint import load_model


def pair_rewards(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """One forward over a packing.collate_pairs / collate_groups batch -> (chosen_rewards (P,),
    rejected_rewards (P,)), float32: each response scored once, then read by every pair it is in."""
    rewards = response_scores(model, batch)  # (R,) one score per packed response
    return rewards[batch["pairs"][:, 0]], rewards[batch["pairs"][:, 1]]


# ---------------------------------------------------------------------------------------- scoring

@torch.no_grad()
def score_pairs(model, examples: list[dict], pad_id: int, batch_size: int = 64) -> tuple[list[float], list[float]]:
    """Rewards of every tokenized pair -> (chosen rewards, rejected rewards), in input order.

    Runs under the caller's autocast (if any); the model should be in eval mode.
    """
    device = next(model.parameters()).device
    chosen, rejected = [0.0] * len(examples), [0.0] * len(examples)
    for idx in length_sorted_chunks(pair_lengths(examples), batch_size):
        r_c, r_r = pair_rewards(model, to_device(collate_pairs([examples[i] for i in idx], pad_id), device))
        for j, i in enumerate(idx):
            chosen[i], rejected[i] = float(r_c[j]), float(r_r[j])
    return chosen, rejected


def tokenize_response(tok: Tokenizer, prompt: list[dict], response: str, max_len: int) -> tuple[list[int], list[int]]:
    """prompt messages + a response string -> (prompt ids, response ids) as a pair row has them in training."""
    prompt_ids = tok.render_prompt(prompt)[-(max_len // 2):]  # the prompt keeps its last max_len // 2 tokens
    response_ids = tok.encode(response) + [tok.im_end_id]
    return prompt_ids, response_ids[: max_len - len(prompt_ids)]


@torch.no_grad()
def score_ids(model, prompts: list[list[int]], responses: list[list[int]], pad_id: int,
              batch_size: int = 64) -> list[float]:
    """Reward of each (prompt ids, response ids), in input order (one G = 1 packed row each)."""
    device = next(model.parameters()).device
    scores = [0.0] * len(prompts)
    for idx in length_sorted_chunks([len(p) + len(r) for p, r in zip(prompts, responses)], batch_size):
        batch = pack([prompts[i] for i in idx], [responses[i] for i in idx], 1, pad_id)
        for j, s in zip(idx, response_scores(model, to_device(batch, device)).tolist()):
            scores[j] = s
    return scores


def score_responses(model, tok: Tokenizer, prompts: list, responses: list[str], batch_size: int = 64,
                    max_len: int | None = None) -> list[float]:
    """Reward of each (prompt, response); a prompt is a string (one user turn) or a message list.

    max_len: truncation as in training (default: the model's max_seq_len).
    """
    if len(prompts) != len(responses):
        raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
    max_len = max_len or model.cfg.max_seq_len
    rows = [tokenize_response(tok, [{"role": "user", "content": p}] if isinstance(p, str) else p, r, max_len)
            for p, r in zip(prompts, responses)]
    return score_ids(model, [p for p, _ in rows], [r for _, r in rows], tok.pad_id, batch_size)


def pair_metrics(chosen: list[float], rejected: list[float]) -> dict:
    """Held-out metrics under TRL RewardTrainer's names (plus the mean reward of each side)."""
    if not chosen or len(chosen) != len(rejected):
        raise ValueError("need as many chosen as rejected rewards, at least one: "
                         f"got {len(chosen)} and {len(rejected)}")
    every = chosen + rejected
    return {
        "accuracy": sum(c > r for c, r in zip(chosen, rejected)) / len(chosen),  # ties count as wrong, as in TRL
        "margin": statistics.fmean(c - r for c, r in zip(chosen, rejected)),
        "mean_reward": statistics.fmean(every),
        "min_reward": min(every),
        "max_reward": max(every),
        "rewards/chosen": statistics.fmean(chosen),
        "rewards/rejected": statistics.fmean(rejected),
    }


def save_histogram(chosen: list[float], rejected: list[float], path: str | Path, title: str = "") -> bool:
    """Overlaid histograms of chosen vs rejected rewards as a PNG; False (nothing written) without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")  # no display needed
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(6, 4))
    bins = 40
    ax.hist(chosen, bins=bins, alpha=0.6, label=f"chosen (mean {statistics.fmean(chosen):.2f})")
    ax.hist(rejected, bins=bins, alpha=0.6, label=f"rejected (mean {statistics.fmean(rejected):.2f})")
    ax.set_xlabel("reward")
    ax.set_ylabel("pairs")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


# -------------------------------------------------------------------------------------------- CLI

def load_scoring_file(path: str) -> list[tuple[list[dict], str]]:
    """{"prompt", "response"} lines -> [(prompt messages, response)]; DataError names file:line."""
    for line_no, obj in read_jsonl(path):  # keys and the response, with line numbers
        for key in ("prompt", "response"):
            if key not in obj:
                raise DataError(path, line_no, f"missing field '{key}' (scoring needs 'prompt' and 'response'; "
                                f"the line has {sorted(obj)})")
        if not isinstance(obj["response"], str):
            raise DataError(path, line_no, f"field 'response' must be a string, got {type(obj['response']).__name__}")
    records = load_prompts(path)  # validates each prompt (string or messages), errors name file:line
    return [(rec.prompt, rec.fields["response"]) for rec in records]


def _is_pair_file(path: str) -> bool:
    line_no, first = next(read_jsonl(path))
    if "response" in first:
        return False
    if "chosen" in first or "rejected" in first:
        return True
    raise DataError(path, line_no, f"expected {{prompt, response}} or a preference pair {{prompt, chosen, rejected}}; "
                                   f"the line has {sorted(first)}")


def _rm_max_len(ckpt_dir: str, model) -> int:
    """The max_len the RM was trained with (its config.json), else the model's position limit."""
    cfg_path = Path(ckpt_dir) / "config.json"
    if cfg_path.exists():
        return int(json.loads(cfg_path.read_text()).get("max_len", model.cfg.max_seq_len))
    return model.cfg.max_seq_len


def main(argv=None):
    ap = argparse.ArgumentParser(description="Score a JSONL of (prompt, response), or of preference pairs, "
                                             "with a trained reward model.")
    ap.add_argument("--ckpt", required=True, help="reward-model checkpoint folder (e.g. out/rm)")
    ap.add_argument("--data", required=True,
                    help="JSONL(.gz) of {prompt, response}, or of pairs {prompt, chosen, rejected}")
    ap.add_argument("--out", default="", help="also write one JSON object per scored line/pair here")
    ap.add_argument("--batch_size", type=int, default=64, help="sequences (or pairs) per forward pass")
    args = ap.parse_args(argv)
    tok = load_tokenizer(args.ckpt)
    model = load_model(args.ckpt, kind="scalar").eval()
    max_len = _rm_max_len(args.ckpt, model)
    try:
        pair_mode = _is_pair_file(args.data)
        if pair_mode:
            pairs = load_preferences(args.data)
        else:
            records = load_scoring_file(args.data)
    except DataError as e:
        raise SystemExit(f"error: {e}") from None

    rows = []
    if pair_mode:
        examples = tokenize_preferences(pairs, tok, max_len)
        chosen, rejected = score_pairs(model, examples, tok.pad_id, args.batch_size)
        for pair, c, r in zip(pairs, chosen, rejected):
            print(f"{c:.4f} {r:.4f}")
            rows.append({"prompt": pair.prompt[-1]["content"], "chosen_score": c, "rejected_score": r})
        m = pair_metrics(chosen, rejected)
        print(f"# {len(pairs)} pairs: accuracy {m['accuracy']:.4f}  margin {m['margin']:.4f}  "
              f"rewards/chosen {m['rewards/chosen']:.4f}  rewards/rejected {m['rewards/rejected']:.4f}")
    else:
        prompts, responses = [p for p, _ in records], [r for _, r in records]
        scores = score_responses(model, tok, prompts, responses, args.batch_size, max_len)
        for prompt, response, s in zip(prompts, responses, scores):
            print(f"{s:.4f}")
            rows.append({"prompt": prompt[-1]["content"], "response": response, "score": s})
        print(f"# {len(scores)} responses: mean score {statistics.fmean(scores):.4f}")
    if args.out:
        Path(args.out).write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")


if __name__ == "__main__":
    run_cli(main)
