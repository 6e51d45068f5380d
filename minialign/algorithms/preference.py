"""Sequence log-probs for the preference losses (DPO family, KTO), from packed batches.

A preference pair is a prompt x with a chosen response y_c and a rejected one y_r (token ids from
minialign.data.batching.tokenize_preferences; each response ends with <|im_end|>). The DPO family needs, per
pair, the log-probability of each response given the prompt, summed (or averaged) over the RESPONSE
tokens only: log π(y | x) = Σ_t log π(y_t | x, y_<t). Prompt and padding tokens never count.

A pair goes through the model as one packed row [x | y_c | y_r] (minialign.algorithms.packing, G = 2: the prompt
computed once, each response seeing only the prompt and itself); `pair_logps` turns that forward into a
`PairLogps` with everything the losses and TRL's metrics need. KTO scores single (prompt, completion)
rows: packing.pack with G = 1 and `completion_logps`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from tqdm import tqdm

from minialign.algorithms.losses import (DPO_LOSS_TYPES, cpo_loss, dpo_loss, orpo_loss, sequence_logps, simpo_loss,
                                         unlikelihood_loss)
from minialign.algorithms.packing import length_sorted_chunks, pack, response_logps
from minialign.data.batching import tokenize_preferences
from minialign.data.formats import PreferencePair, UnpairedRecord
from minialign.training import runtime


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
    chosen_token_logps: torch.Tensor | None = None  # (B, N) per-token log π of y_c, 0 off chosen_mask (unlikelihood)
    rejected_token_logps: torch.Tensor | None = None  # (B, N) the same of y_r
    chosen_mask: torch.Tensor | None = None  # (B, N) bool, True = a token of y_c
    rejected_mask: torch.Tensor | None = None


def completion_logps(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A packed batch -> per response (sum of log-probs, mean log-prob, mean logit), each (R,) float32."""
    per_token, logit_means = response_logps(model, batch, logit_means=True)  # (R, N) each
    mask = batch["response_mask"]
    return (sequence_logps(per_token, mask), sequence_logps(per_token, mask, average=True),
            sequence_logps(logit_means, mask, average=True))


def pair_logps(model, batch: dict) -> PairLogps:
    """Sequence log-probs of chosen and rejected for a packing.collate_pairs batch (responses 2b, 2b + 1).

    Gradients flow unless called under torch.no_grad (the reference model).
    """
    per_token, logit_means = response_logps(model, batch, logit_means=True)  # (2B, N) each
    mask = batch["response_mask"]  # (2B, N): rows 2b chosen, 2b + 1 rejected
    total, avg, logit_mean = (t.view(-1, 2) for t in (sequence_logps(per_token, mask),
                                                      sequence_logps(per_token, mask, average=True),
                                                      sequence_logps(logit_means, mask, average=True)))  # (B, 2)
    return PairLogps(total[:, 0], total[:, 1], avg[:, 0], avg[:, 1], -avg[:, 0], logit_mean[:, 0], logit_mean[:, 1],
                     per_token[0::2], per_token[1::2], mask[0::2], mask[1::2])


# ------------------------------------------------------------------------ the DPO family's loss (train_dpo.py)

LOSS_TYPES = (*DPO_LOSS_TYPES, "simpo", "cpo", "orpo", "unlikelihood")  # train_dpo.py's --loss_type
REFERENCE_FREE = ("simpo", "cpo", "orpo", "unlikelihood")
LENGTH_AVERAGED = ("ipo", "simpo", "orpo", "unlikelihood")  # these use mean token log-probs, the others sums
TOKEN_LEVEL = ("unlikelihood",)  # these need the per-token log-probs (preference_terms' pol), not only sequence ones


def used_logps(pl: PairLogps, loss_type: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(chosen, rejected) log-probs the loss type works with: length-averaged or summed."""
    if loss_type in LENGTH_AVERAGED:
        return pl.chosen_logps_avg, pl.rejected_logps_avg
    return pl.chosen_logps, pl.rejected_logps


def reference_logps(ref_model, batch: dict, cfg) -> tuple[torch.Tensor, torch.Tensor]:
    """(ref_chosen, ref_rejected) (B,): precomputed ones from the batch, else a no-grad forward."""
    if "ref_chosen_logps" in batch:
        return batch["ref_chosen_logps"], batch["ref_rejected_logps"]
    with torch.no_grad():
        return used_logps(pair_logps(ref_model, batch), cfg.loss_type)


def preference_terms(cfg, policy_chosen_logps, policy_rejected_logps, policy_chosen_nll, ref_chosen_logps,
                     ref_rejected_logps, pol: PairLogps | None = None):
    """The --loss_type's loss from minialign.algorithms.losses -> per-pair losses (B,), chosen and rejected implicit
    rewards (B,), detached. cfg: loss_type, beta, label_smoothing, simpo_gamma_beta_ratio, cpo_alpha (train_dpo.py's).
    pol: the policy's PairLogps, needed by the TOKEN_LEVEL loss types (unlikelihood, its β = the weight α)."""
    t, beta, eps = cfg.loss_type, cfg.beta, cfg.label_smoothing
    if t in TOKEN_LEVEL:
        if pol is None:
            raise ValueError(f"loss_type {t!r} needs the per-token log-probs: pass pol=pair_logps(...)")
        return unlikelihood_loss(pol.chosen_token_logps, pol.chosen_mask, pol.rejected_token_logps, pol.rejected_mask,
                                 alpha=beta)
    if t in DPO_LOSS_TYPES:
        return dpo_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta, t, eps)
    if t == "simpo":
        return simpo_loss(policy_chosen_logps, policy_rejected_logps, beta, cfg.simpo_gamma_beta_ratio, eps)
    if t == "cpo":
        return cpo_loss(policy_chosen_logps, policy_rejected_logps, policy_chosen_nll, beta, cfg.cpo_alpha, "sigmoid",
                        eps)
    return orpo_loss(policy_chosen_logps, policy_rejected_logps, policy_chosen_nll, beta)


def best_and_worst(scores: torch.Tensor, group_size: int):
    """Online DPO's pair of each prompt (train_online_dpo.py): scores (B*K,) of B prompts' K responses (rows
    b*K .. b*K + K - 1) -> best (B,), worst (B,) indices within each group (the first of equal scores),
    keep (B,) bool: False where all K scores are equal."""
    grouped = scores.view(-1, group_size)  # (B, K)
    return grouped.argmax(1), grouped.argmin(1), grouped.amax(1) > grouped.amin(1)


# ------------------------------------------------------------------------------------ single rows (KTO)

def collate_completions(prompts: list[list[int]], completions: list[list[int]], pad_id: int) -> dict:
    """(prompt, completion) rows -> a packed batch of plain rows (G = 1), for completion_logps."""
    return pack(prompts, completions, 1, pad_id)


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


@torch.no_grad()
def reference_table(lengths: list[int], micro_batch: int, columns: int, rows_fn, rt, desc: str) -> torch.Tensor:
    """A frozen reference's per-example numbers, computed once before training (--precompute_ref): (n, columns)
    float32, row i = rows_fn(idx)[idx.index(i)].

    rows_fn(idx) -> (len(idx), columns) for a list of example indices (e.g. DPO: the chosen and rejected
    log-probs of those pairs; KTO: an example's and its KL row's). Each rank computes every world_size-th
    example in length-sorted chunks of `micro_batch`; the table is then summed across ranks, every row
    having been filled by exactly one rank.
    """
    table = torch.zeros(len(lengths), columns, device=rt.device)
    mine = list(range(rt.rank, len(lengths), rt.world_size))
    for idx in tqdm(length_sorted_chunks(lengths, micro_batch, mine), desc=desc, disable=not rt.is_main):
        with rt.autocast():
            table[idx] = rows_fn(idx).float()
    return runtime.all_reduce_tensor_(table, rt)
