"""Reward-model helpers: pair batches, scoring, held-out metrics, and a CLI that scores a JSONL file.

A reward model is a `ScalarModel` (minialign.model): a backbone plus a linear head that gives a score
at every position. The reward of a sequence is the score at its LAST REAL token, which is the
<|im_end|> closing the response (unless truncation cut it): the one position that has read the whole
prompt and response. Sequences are RIGHT-padded; with causal attention a real token never attends
to a later pad, so the model runs on the plain causal fast path with no attention mask, and the mask
serves only to find each row's last real token (`last_token_scores`).

Pair batch layout, B pairs -> 2B rows in ONE forward pass:
    rows 0 .. B-1     prompt_b + chosen_b    (+ pads)
    rows B .. 2B-1    prompt_b + rejected_b  (+ pads)
so `rewards[:B]` and `rewards[B:]` line up pair by pair.

A scored response is tokenized exactly as in training (minialign.data.tokenize_preferences): the
prompt rendered by `Tokenizer.render_prompt` (ending with the assistant header), then the response
tokens and <|im_end|>; the same truncation policy applies (prompt keeps its last max_len // 2
tokens, the response its first max_len - len(prompt)).

CLI (scores with a trained RM; errors name file:line like minialign.formats):
    python -m minialign.reward --ckpt out/rm --data file.jsonl [--out scores.jsonl]
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

from .data import pad_right, tokenize_preferences
from .engine import load_model
from .formats import DataError, load_preferences, load_prompts, read_jsonl
from .model import last_token_scores
from .preference import collate_pairs_shared_prompt
from .tokenizer import Tokenizer


# ---------------------------------------------------------------------------------------- batches

def collate_pairs(examples: list[dict], pad_id: int, layout: str = "two_rows") -> dict:
    """Tokenized pairs (from tokenize_preferences) -> one batch, in either layout of minialign.preference.

    two_rows: input_ids (2B, T) long, right-padded: [prompt+chosen rows..., prompt+rejected rows...];
      attention_mask (2B, T) bool, True = real token (used to find the last real token, not passed to
      the model).
    shared_prompt: B packed rows [x | y_c | y_r] (preference.collate_pairs_shared_prompt: the prompt
      computed once, the responses hidden from each other): input_ids, position_ids (B, T) long,
      attention_mask (B, T, T) bool, and chosen_last, rejected_last (B,) long: the column of each
      response's last token (its <|im_end|>), where its score is read.
    Either way, when the pairs carry a "margin" field (all of them or none), margin (B,) float32.
    """
    if layout == "shared_prompt":
        packed = collate_pairs_shared_prompt(examples, pad_id)
        P = torch.tensor([len(e["prompt"]) for e in examples])
        C = torch.tensor([len(e["chosen"]) for e in examples])
        R = torch.tensor([len(e["rejected"]) for e in examples])
        batch = {k: packed[k] for k in ("input_ids", "attention_mask", "position_ids")}
        batch["chosen_last"], batch["rejected_last"] = P + C - 1, P + C + R - 1
    elif layout == "two_rows":
        rows = [e["prompt"] + e["chosen"] for e in examples] + [e["prompt"] + e["rejected"] for e in examples]
        batch = {
            "input_ids": pad_right(rows, pad_id),  # (2B, T)
            "attention_mask": pad_right([[True] * len(r) for r in rows], False).bool(),  # (2B, T)
        }
    else:
        raise ValueError(f"unknown layout {layout!r}; choose shared_prompt or two_rows")
    with_margin = sum("margin" in e for e in examples)
    if with_margin:
        if with_margin != len(examples):
            raise ValueError(f"{with_margin} of {len(examples)} pairs have a 'margin' field: give it to every pair or none")
        batch["margin"] = torch.tensor([float(e["margin"]) for e in examples], dtype=torch.float32)  # (B,)
    return batch


def pair_count(batch: dict) -> int:
    """Pairs in a collate_pairs batch of either layout."""
    return batch["input_ids"].shape[0] if "chosen_last" in batch else batch["input_ids"].shape[0] // 2


def pair_rewards(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """One forward over a collate_pairs batch -> (chosen_rewards (B,), rejected_rewards (B,)), float32."""
    if "chosen_last" in batch:  # shared_prompt: one packed row per pair, scores read at each response's end
        scores = model(batch["input_ids"], attention_mask=batch["attention_mask"], position_ids=batch["position_ids"])  # (B, T)
        return (scores.gather(-1, batch["chosen_last"][:, None]).squeeze(-1),
                scores.gather(-1, batch["rejected_last"][:, None]).squeeze(-1))
    scores = model(batch["input_ids"])  # (2B, T): right padding, causal fast path, no mask needed
    rewards = last_token_scores(scores, batch["attention_mask"])  # (2B,) at each row's <|im_end|>
    n_pairs = rewards.shape[0] // 2
    return rewards[:n_pairs], rewards[n_pairs:]


def _length_ordered_batches(lengths: list[int], batch_size: int) -> list[list[int]]:
    """Index batches of similar lengths (less padding); callers put results back in input order."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


# ---------------------------------------------------------------------------------------- scoring

@torch.no_grad()
def score_pairs(model, examples: list[dict], pad_id: int, batch_size: int = 64, layout: str = "two_rows") -> tuple[list[float], list[float]]:
    """Rewards of every tokenized pair -> (chosen rewards, rejected rewards), in input order.

    Runs under the caller's autocast (if any); the model should be in eval mode.
    """
    device = next(model.parameters()).device
    chosen, rejected = [0.0] * len(examples), [0.0] * len(examples)
    lengths = [len(e["prompt"]) + max(len(e["chosen"]), len(e["rejected"])) for e in examples]
    for idx in _length_ordered_batches(lengths, batch_size):
        batch = collate_pairs([{k: examples[i][k] for k in ("prompt", "chosen", "rejected")} for i in idx], pad_id, layout)
        r_c, r_r = pair_rewards(model, {k: v.to(device) for k, v in batch.items()})
        for j, i in enumerate(idx):
            chosen[i], rejected[i] = float(r_c[j]), float(r_r[j])
    return chosen, rejected


def tokenize_response(tok: Tokenizer, prompt: list[dict], response: str, max_len: int) -> list[int]:
    """prompt messages + a response string -> the ids a pair row has in training (same truncation)."""
    prompt_ids = tok.render_prompt(prompt)[-(max_len // 2):]  # the prompt keeps its last max_len // 2 tokens
    response_ids = tok.encode(response) + [tok.im_end_id]
    return prompt_ids + response_ids[: max_len - len(prompt_ids)]


@torch.no_grad()
def score_responses(model, tok: Tokenizer, prompts: list, responses: list[str], batch_size: int = 64,
                    max_len: int | None = None) -> list[float]:
    """Reward of each (prompt, response); a prompt is a string (one user turn) or a message list.

    max_len: truncation as in training (default: the model's max_seq_len).
    """
    if len(prompts) != len(responses):
        raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
    max_len = max_len or model.cfg.max_seq_len
    device = next(model.parameters()).device
    seqs = [tokenize_response(tok, [{"role": "user", "content": p}] if isinstance(p, str) else p, r, max_len)
            for p, r in zip(prompts, responses)]
    scores = [0.0] * len(seqs)
    for idx in _length_ordered_batches([len(s) for s in seqs], batch_size):
        ids = pad_right([seqs[i] for i in idx], tok.pad_id).to(device)  # (b, T)
        mask = pad_right([[True] * len(seqs[i]) for i in idx], False).bool().to(device)  # (b, T)
        rewards = last_token_scores(model(ids), mask)  # (b,)
        for j, i in enumerate(idx):
            scores[i] = float(rewards[j])
    return scores


def pair_metrics(chosen: list[float], rejected: list[float]) -> dict:
    """Held-out metrics under TRL RewardTrainer's names (plus the mean reward of each side)."""
    if not chosen or len(chosen) != len(rejected):
        raise ValueError(f"need as many chosen as rejected rewards, at least one: got {len(chosen)} and {len(rejected)}")
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
                raise DataError(path, line_no, f"missing field '{key}' (scoring needs 'prompt' and 'response'; the line has {sorted(obj)})")
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
    ap = argparse.ArgumentParser(description="Score a JSONL of (prompt, response), or of preference pairs, with a trained reward model.")
    ap.add_argument("--ckpt", required=True, help="reward-model checkpoint folder (e.g. out/rm)")
    ap.add_argument("--data", required=True, help="JSONL(.gz) of {prompt, response}, or of pairs {prompt, chosen, rejected}")
    ap.add_argument("--out", default="", help="also write one JSON object per scored line/pair here")
    ap.add_argument("--batch_size", type=int, default=64, help="sequences (or pairs) per forward pass")
    args = ap.parse_args(argv)
    tok = Tokenizer(Path(args.ckpt) / "tokenizer.model")
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
    main()
