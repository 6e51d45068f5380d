"""From validated records (minialign.data.formats) to token tensors: tokenization, truncation, collation.

Truncation policy (explicit, counted, never silent):
  * SFT / pretraining: a sequence longer than max_len keeps its first max_len tokens. If that leaves
    no trained (assistant) token, the example is dropped. Both counts go into `stats` and the log.
  * Preferences: the prompt keeps its LAST max_prompt_len tokens (max_len // 2 by default: the end of
    the prompt is what the answer depends on); each response then keeps its first
    max_len - prompt_len tokens, which is at least max_len // 2, so a response is never emptied.
  * RL prompts: a prompt longer than max_prompt_len is dropped (generation needs the whole question).

Padding: training batches are RIGHT-padded and need no attention mask: with causal attention a real
token never sees a later pad, so the plain causal fast path gives the same logits for real tokens.
Pads are excluded from losses by the label mask. Generation prompts are LEFT-padded with a mask
(all rows must end at the same column to decode in lockstep).

Label convention: `inputs = ids[:, :-1]`, `labels = ids[:, 1:]`, `label_mask[b, t]` True when
labels[b, t] is a trained token; logits from `inputs` line up with `labels` position by position.
"""

from __future__ import annotations

import torch

from minialign.data import chatml
from minialign.data.formats import PreferencePair, PromptRecord
from minialign.data.tokenizer import Tokenizer


def _bump(stats: dict | None, key: str, n: int = 1):
    if stats is not None:
        stats[key] = stats.get(key, 0) + n


def tokenize_sft(conversations: list[list[dict]], tok: Tokenizer, max_len: int, stats: dict | None = None):
    """-> list of (ids, loss_mask) lists; loss on assistant tokens only (see Tokenizer.render_chat)."""
    out = []
    for conv in conversations:
        ids, mask = tok.render_chat(conv)
        if len(ids) > max_len:
            ids, mask = ids[:max_len], mask[:max_len]
            if not any(mask[1:]):
                _bump(stats, "dropped_no_response_tokens")
                continue
            _bump(stats, "truncated")
        out.append((ids, mask))
    _bump(stats, "examples", len(out))
    return out


def tokenize_pretrain(texts: list[str], tok: Tokenizer, max_len: int, stats: dict | None = None):
    """Plain text -> fixed windows of max_len tokens (the whole document is trained, split into chunks)."""
    out = []
    for text in texts:
        ids = tok.encode(text) + [tok.im_end_id]  # <|im_end|> doubles as end-of-document
        # windows overlap by one token, so every token but the document's first is a prediction target
        for i in range(0, len(ids) - 1, max_len - 1):
            chunk = ids[i : i + max_len]
            if len(chunk) >= 2:
                out.append((chunk, [True] * len(chunk)))
    _bump(stats, "examples", len(out))
    return out


def tokenize_preferences(pairs: list[PreferencePair], tok: Tokenizer, max_len: int, max_prompt_len: int | None = None,
                         stats: dict | None = None):
    """-> list of dicts {prompt, chosen, rejected} of token ids (responses end with <|im_end|>)."""
    max_prompt_len = max_prompt_len or max_len // 2
    if not 0 < max_prompt_len < max_len:  # else budget <= 0 below: empty, or end-cut, responses
        raise ValueError(f"max_prompt_len ({max_prompt_len}) must be in [1, max_len={max_len}) "
                         "so every response keeps a token")
    out = []
    for pair in pairs:
        prompt = tok.render_prompt(pair.prompt)
        chosen, rejected = (_response_ids(tok, msgs) for msgs in (pair.chosen, pair.rejected))
        if len(prompt) > max_prompt_len:
            prompt = prompt[-max_prompt_len:]
            _bump(stats, "prompt_truncated")
        budget = max_len - len(prompt)
        if len(chosen) > budget or len(rejected) > budget:
            chosen, rejected = chosen[:budget], rejected[:budget]
            _bump(stats, "response_truncated")
        out.append({"prompt": prompt, "chosen": chosen, "rejected": rejected, **pair.fields})
    _bump(stats, "examples", len(out))
    return out


def _response_ids(tok: Tokenizer, messages: list[dict]) -> list[int]:
    """Assistant turn(s) as they appear after render_prompt's assistant header, encoded apart from the prompt (as
    a sampled response is, and as TRL does): chatml.render_chat's pieces, also for a Hugging Face tokenizer, whose
    own render_chat encodes header and content in one span (see minialign.data.hf_tokenizer)."""
    ids, _ = chatml.render_chat(tok, messages)
    # render_chat starts with the assistant header, which render_prompt already ends with: drop it,
    # and drop the trailing newline after the final <|im_end|> (generation stops at <|im_end|>).
    header = len(tok._role_header[messages[0]["role"]])
    return ids[header : len(ids) - len(tok._newline)]


def tokenize_prompts(records: list[PromptRecord], tok: Tokenizer, max_prompt_len: int, stats: dict | None = None):
    """-> list of dicts {prompt_ids, prompt_text, **fields}; over-long prompts dropped and counted."""
    out = []
    _bump(stats, "dropped_prompt_too_long", 0)  # in the log even when 0
    for rec in records:
        ids = tok.render_prompt(rec.prompt)
        if len(ids) > max_prompt_len:
            _bump(stats, "dropped_prompt_too_long")
            continue
        out.append({"prompt_ids": ids, "prompt_text": rec.prompt[-1]["content"], "messages": rec.prompt, **rec.fields})
    _bump(stats, "examples", len(out))
    return out


def pad_right(seqs: list[list[int]], pad_value) -> torch.Tensor:
    T = max(len(s) for s in seqs)
    return torch.tensor([list(s) + [pad_value] * (T - len(s)) for s in seqs])


def pad_left(seqs: list[list[int]], pad_value) -> torch.Tensor:
    T = max(len(s) for s in seqs)
    return torch.tensor([[pad_value] * (T - len(s)) + list(s) for s in seqs])


def collate_lm(examples: list[tuple[list[int], list[bool]]], pad_id: int) -> dict:
    """SFT / pretraining batch, right-padded to the longest sequence in the batch.

    inputs (B, T-1), labels (B, T-1), label_mask (B, T-1) bool: True = this label is trained.
    """
    ids = pad_right([e[0] for e in examples], pad_id)  # (B, T)
    mask = pad_right([e[1] for e in examples], False).bool()  # (B, T)
    return {"inputs": ids[:, :-1], "labels": ids[:, 1:], "label_mask": mask[:, 1:]}


def collate_prompts(prompt_ids: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded prompts and their mask (True = real token), ready for generation."""
    ids = pad_left(prompt_ids, pad_id)
    mask = pad_left([[True] * len(p) for p in prompt_ids], False).bool()
    return ids, mask


def to_device(batch: dict, device) -> dict:
    """Every tensor of a batch dict on `device` (None and other values kept)."""
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
