"""Preference batches and their sequence log-probs: the two ways to put a pair through the model.

A preference pair is a prompt x with a chosen response y_c and a rejected one y_r (token ids from
minialign.data.tokenize_preferences; each response ends with <|im_end|>). The DPO family needs, per
pair, the log-probability of each response given the prompt, summed (or averaged) over the RESPONSE
tokens only: log π(y | x) = Σ_t log π(y_t | x, y_<t). Prompt and padding tokens never count.

Two layouts compute the same numbers:

* "two_rows" (`collate_pairs_two_rows`): the plain layout of every DPO implementation. 2B
  right-padded rows, [x_1 y_c1, ..., x_B y_cB, x_1 y_r1, ..., x_B y_rB], one causal forward. The
  prompt is computed twice per pair.
* "shared_prompt" (`collate_pairs_shared_prompt`): one packed row per pair, [x | y_c | y_r], with a
  (B, T, T) attention mask that hides y_c from y_r and position ids that restart after the prompt
  for y_r, so y_r "sees" exactly what it sees in its own row. The prompt is computed once.
  See that function's docstring for the diagram and the shift subtlety.

`pair_logps(model, batch, layout)` runs either batch through `model.forward` (so DDP's hooks run),
with `logits_mask` so only the positions that predict a response token go through the output head,
and returns a `PairLogps` with everything the DPO-family losses and TRL's metrics need.

KTO scores single (prompt, completion) rows: `collate_completions` + `completion_logps`.

Label convention as in minialign.data: masks are bool, True = the token counts; labels that are not
predicted are IGNORE_INDEX.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .data import pad_right, segment_attention_mask, tokenize_preferences
from .formats import PreferencePair, UnpairedRecord
from .losses import IGNORE_INDEX, sequence_logps, token_logps

LAYOUTS = ("shared_prompt", "two_rows")


# --------------------------------------------------------------------------------------- collation

def collate_completions(prompts: list[list[int]], completions: list[list[int]], pad_id: int) -> dict:
    """Rows [prompt + completion], right-padded, shifted for next-token prediction.

    inputs (N, T-1), labels (N, T-1), label_mask (N, T-1) bool: True where labels[n, t] is a
    completion token (the final <|im_end|> included). Right padding needs no attention mask (see
    minialign.data): a real token never attends to a later pad.
    """
    if len(prompts) != len(completions):
        raise ValueError(f"{len(prompts)} prompts but {len(completions)} completions")
    if any(len(c) == 0 for c in completions):
        raise ValueError("every completion needs at least one token")
    ids = pad_right([p + c for p, c in zip(prompts, completions)], pad_id)  # (N, T)
    mask = pad_right([[False] * len(p) + [True] * len(c) for p, c in zip(prompts, completions)], False).bool()
    labels = ids[:, 1:].masked_fill(~mask[:, 1:], IGNORE_INDEX)
    return {"inputs": ids[:, :-1], "labels": labels, "label_mask": mask[:, 1:]}


def collate_pairs_two_rows(examples: list[dict], pad_id: int) -> dict:
    """B pairs -> 2B rows [x_1 y_c1, ..., x_B y_cB, x_1 y_r1, ..., x_B y_rB] (chosen half first).

    examples: dicts with "prompt", "chosen", "rejected" token-id lists (tokenize_preferences).
    Returns collate_completions' inputs / labels / label_mask, each (2B, T-1).
    """
    prompts = [e["prompt"] for e in examples]
    return collate_completions(prompts + prompts, [e["chosen"] for e in examples] + [e["rejected"] for e in examples], pad_id)


def collate_pairs_shared_prompt(examples: list[dict], pad_id: int) -> dict:
    """B pairs -> B packed rows [x | y_c | y_r] with a mask that keeps the two responses apart.

    One row, prompt length P = 3, chosen C = 2, rejected R = 3 (then padding):

        column          0   1   2   3   4   5   6   7   8
        token           x0  x1  x2  c0  c1  r0  r1  r2  pad
        position_ids    0   1   2   3   4   3   4   5   0      <- y_r restarts at P, like in its own row
        segment         P   P   P   C   C   R   R   R   -

        attention (query row attends to key column where 1; causal within the segment rules):
                  x0 x1 x2 c0 c1 r0 r1 r2 pad
            x0     1  .  .  .  .  .  .  .  .
            x1     1  1  .  .  .  .  .  .  .
            x2     1  1  1  .  .  .  .  .  .
            c0     1  1  1  1  .  .  .  .  .
            c1     1  1  1  1  1  .  .  .  .
            r0     1  1  1  .  .  1  .  .  .      <- the rejected tokens never see the chosen ones
            r1     1  1  1  .  .  1  1  .  .
            r2     1  1  1  .  .  1  1  1  .
            pad    .  .  .  .  .  .  .  .  1      (a pad sees itself only, so softmax has a key)

    With these positions and this mask every token's hidden state equals the one it has in the
    plain layout (collate_pairs_two_rows), so the log-probs agree to float error (tested).

    The shift. In the plain layout the logits at column t predict the token at t + 1. Here that
    holds for the chosen response (c0 is predicted from x2, c1 from c0) and for r1, r2 (from r0,
    r1), but NOT for r0: r0 is predicted from the LAST PROMPT column (x2, column P - 1), while the
    column before r0 is c1 (the last chosen token, whose logits predict nothing). So each side gets
    its own labels in packed-column coordinates, "the label predicted from this column":

        column               0   1   2   3   4   5   6   7   8
        chosen_labels        -   -   c0  c1  -   -   -   -   -       chosen_mask   at 2, 3
        rejected_labels      -   -   r0  -   -   r1  r2  -   -       rejected_mask at 2, 5, 6

    Column P - 1 predicts c0 AND r0; column P + C - 1 (c1) and the row's last column predict nothing.
    Only columns in chosen_mask | rejected_mask go through the output head (pair_logps).

    Returns:
        input_ids (B, T) long; attention_mask (B, T, T) bool, True = query row may attend to key
        column; position_ids (B, T) long; chosen_labels, rejected_labels (B, T) long (IGNORE_INDEX
        where not predicted); chosen_mask, rejected_mask (B, T) bool.
    """
    B = len(examples)
    lengths = [len(e["prompt"]) + len(e["chosen"]) + len(e["rejected"]) for e in examples]
    T = max(lengths)
    input_ids = torch.full((B, T), pad_id, dtype=torch.long)
    position_ids = torch.zeros(B, T, dtype=torch.long)
    segment = torch.full((B, T), -1, dtype=torch.long)  # 0 prompt, 1 chosen, 2 rejected, -1 pad
    chosen_labels = torch.full((B, T), IGNORE_INDEX, dtype=torch.long)
    rejected_labels = torch.full((B, T), IGNORE_INDEX, dtype=torch.long)
    for b, e in enumerate(examples):
        x, yc, yr = e["prompt"], e["chosen"], e["rejected"]
        P, C, R = len(x), len(yc), len(yr)
        if P == 0 or C == 0 or R == 0:
            raise ValueError(f"pair {b}: prompt, chosen and rejected each need at least one token (got {P}, {C}, {R})")
        input_ids[b, : P + C + R] = torch.tensor(x + yc + yr)
        position_ids[b, : P + C] = torch.arange(P + C)
        position_ids[b, P + C : P + C + R] = torch.arange(P, P + R)  # y_r restarts right after the prompt
        segment[b, :P], segment[b, P : P + C], segment[b, P + C : P + C + R] = 0, 1, 2
        chosen_labels[b, P - 1 : P + C - 1] = torch.tensor(yc)  # c_j predicted from column P - 1 + j
        rejected_labels[b, P - 1] = yr[0]  # r_0 predicted from the last prompt column
        rejected_labels[b, P + C : P + C + R - 1] = torch.tensor(yr[1:], dtype=torch.long)  # r_j from column P + C + j - 1
    attention_mask = segment_attention_mask(segment)  # (B, T, T): prompt + own response, causal; pads see themselves
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "position_ids": position_ids,
        "chosen_labels": chosen_labels,
        "rejected_labels": rejected_labels,
        "chosen_mask": chosen_labels != IGNORE_INDEX,
        "rejected_mask": rejected_labels != IGNORE_INDEX,
    }


def collate_pairs(examples: list[dict], pad_id: int, layout: str) -> dict:
    if layout == "two_rows":
        return collate_pairs_two_rows(examples, pad_id)
    if layout == "shared_prompt":
        return collate_pairs_shared_prompt(examples, pad_id)
    raise ValueError(f"unknown layout {layout!r}; choose one of {LAYOUTS}")


def pair_lengths(examples: list[dict], layout: str) -> list[int]:
    """Tokens each pair occupies in a batch of `layout` (for engine.step_batches' length grouping)."""
    if layout == "shared_prompt":
        return [len(e["prompt"]) + len(e["chosen"]) + len(e["rejected"]) for e in examples]
    return [len(e["prompt"]) + max(len(e["chosen"]), len(e["rejected"])) for e in examples]


# ------------------------------------------------------------------------------------ log-probs

@dataclass
class PairLogps:
    """Per-pair quantities of one forward, each (B,) float32 (float64 for a float64 model)."""
    chosen_logps: torch.Tensor  # Σ_t log π(y_c,t | x, y_c,<t)   (DPO, cDPO, hinge, robust, CPO, KTO)
    rejected_logps: torch.Tensor  # Σ_t log π(y_r,t | ...)
    chosen_logps_avg: torch.Tensor  # the same divided by |y_c|    (IPO, SimPO, ORPO)
    rejected_logps_avg: torch.Tensor
    chosen_nll: torch.Tensor  # mean token NLL of y_c = -chosen_logps_avg (CPO / ORPO's SFT term)
    chosen_logits_mean: torch.Tensor  # mean raw logit over y_c's positions and the vocabulary (logging only, detached)
    rejected_logits_mean: torch.Tensor


def _scatter_stats(logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor):
    """Head rows of one side -> (sum logps (N,), mean logps (N,), mean logit (N,)).

    logits (M, V): one row per True of `mask`, in row-major order; labels (N, T); mask (N, T) bool.
    """
    lp = token_logps(logits[None], labels[mask][None])[0]  # (M,) float32
    per_token = torch.zeros(mask.shape, dtype=lp.dtype, device=lp.device).masked_scatter(mask, lp)  # (N, T)
    logit_means = torch.zeros(mask.shape, dtype=lp.dtype, device=lp.device).masked_scatter(
        mask, logits.detach().to(lp.dtype).mean(-1))  # (N, T)
    return (sequence_logps(per_token, mask), sequence_logps(per_token, mask, average=True),
            sequence_logps(logit_means, mask, average=True))


def completion_logps(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rows of collate_completions -> (sum logps (N,), mean logps (N,), mean logit (N,))."""
    mask = batch["label_mask"]  # (N, T-1)
    logits = model(batch["inputs"], logits_mask=mask)  # (M, V), M = mask.sum(): only response positions
    return _scatter_stats(logits, batch["labels"], mask)


def pair_logps(model, batch: dict, layout: str) -> PairLogps:
    """Sequence log-probs of chosen and rejected for a batch from collate_pairs(..., layout).

    Gradients flow unless called under torch.no_grad (the reference model).
    """
    if layout == "two_rows":
        total, avg, logit_mean = completion_logps(model, batch)  # each (2B,)
        B = total.shape[0] // 2
        halves = [(t[:B], t[B:]) for t in (total, avg, logit_mean)]
        (c_sum, r_sum), (c_avg, r_avg), (c_logit, r_logit) = halves
    elif layout == "shared_prompt":
        c_mask, r_mask = batch["chosen_mask"], batch["rejected_mask"]  # (B, T) each
        head = c_mask | r_mask  # columns whose logits predict a response token
        logits = model(batch["input_ids"], attention_mask=batch["attention_mask"], position_ids=batch["position_ids"],
                       logits_mask=head)  # (M, V)
        # the last prompt column is in both masks: its logits row serves c_0 and r_0
        c_sum, c_avg, c_logit = _scatter_stats(logits[c_mask[head]], batch["chosen_labels"], c_mask)
        r_sum, r_avg, r_logit = _scatter_stats(logits[r_mask[head]], batch["rejected_labels"], r_mask)
    else:
        raise ValueError(f"unknown layout {layout!r}; choose one of {LAYOUTS}")
    return PairLogps(c_sum, r_sum, c_avg, r_avg, -c_avg, c_logit, r_logit)


# ---------------------------------------------------------------------------------- unpaired (KTO)

def tokenize_unpaired(records: list[UnpairedRecord], tok, max_len: int, stats: dict | None = None) -> list[dict]:
    """KTO records -> dicts {prompt, completion, label} of token ids / bool.

    Goes through tokenize_preferences (with the completion on both sides) so the truncation policy
    is exactly the preference one.
    """
    pairs = [PreferencePair(r.prompt, r.completion, r.completion, r.fields) for r in records]
    out = tokenize_preferences(pairs, tok, max_len, stats=stats)
    return [{"prompt": e["prompt"], "completion": e["chosen"], "label": r.label} for e, r in zip(out, records)]


def unpair(pairs: list[dict]) -> list[dict]:
    """Pairs -> unpaired examples: every chosen desirable, every rejected undesirable.

    Order: [chosen_1 .. chosen_N, rejected_1 .. rejected_N], so that the +1 offset of kl_partner
    pairs a prompt with another prompt's response (never its own pair's).
    """
    return ([{"prompt": p["prompt"], "completion": p["chosen"], "label": True} for p in pairs]
            + [{"prompt": p["prompt"], "completion": p["rejected"], "label": False} for p in pairs])


def kl_partner(i: int, n: int) -> int:
    """Example whose completion is paired with example i's prompt for KTO's KL estimate (TRL's +1 offset)."""
    return (i + 1) % n
