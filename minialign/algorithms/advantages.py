"""A GRPO-family step's advantages and reward metrics, from the rollout's rewards (train_grpo.py).

step_advantages computes the --advantage_estimator (grpo, rloo, reinforce_pp, remax; the formulas are the
pure functions of minialign.algorithms.losses) on the rows of EVERY rank and keeps this rank's, so a 2-process
run equals a 1-process one; greedy_rewards is ReMax's baseline; rollout_metrics names the step's reward and
completion statistics as TRL does. completion_mask and count_units say which tokens and units a loss counts.
PPO's pieces (train_ppo.py): token_rewards, the KL-shaped per-token reward; whiten_all_ranks over every rank's rows.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from minialign.algorithms import packing
from minialign.algorithms.losses import (group_advantages, kl_reward, reinforce_pp_advantages, remax_advantages,
                                         returns_to_go, rloo_advantages, whiten)
from minialign.algorithms.rollout import Rollout, micro_batch_rows, rollout_forward, source_rewards
from minialign.training import runtime
from minialign.training.runtime import gather_columns, gather_token_rows


def completion_mask(response_mask: torch.Tensor, finished: torch.Tensor, mask_truncated: bool) -> torch.Tensor:
    """(R, N) bool, True = the token counts in the loss. With mask_truncated, responses that did not
    emit <|im_end|> count for nothing (DAPO: a truncated answer is not a wrong one)."""
    return response_mask & finished[:, None] if mask_truncated else response_mask


def default_loss_type(kl_in_reward: bool) -> str:
    """train_grpo.py's --loss_type when unset: dr_grpo when a KL penalty is in the reward (β > 0), grpo otherwise.
    The KL in the reward estimates the gradient of -β KL(π ‖ π_ref) only under a constant normalizer
    (losses.kl_reward; tests/test_exact_gradients.py), so the docs' "unbiased" holds at the default."""
    return "dr_grpo" if kl_in_reward else "grpo"


def advantages_per_token(estimator: str, kl_in_reward: bool) -> bool:
    """Whether step_advantages returns (R, N) per-token advantages (else (R,) one per response): reinforce_pp always;
    grpo and remax with the KL in the reward (A_t a return-to-go); rloo never (its baseline holds the whole R_i)."""
    return estimator == "reinforce_pp" or (kl_in_reward and estimator != "rloo")


def count_units(batch, loss_type: str):
    """Counted units of a GRPO micro-batch: tokens for dapo, sequences with a counted token otherwise."""
    return batch["loss_mask"].sum() if loss_type == "dapo" else batch["loss_mask"].any(-1).sum()


def step_advantages(g: dict, b_kl: torch.Tensor | None, loss_mask: torch.Tensor, rt, estimator: str, group_size: int,
                    scale_rewards: str = "group", beta: float = 0.0) -> torch.Tensor:
    """This rank's advantages by `estimator` (train_grpo.py's --advantage_estimator; minialign.algorithms.losses), computed
    on the step's rows of ALL ranks and then cut to this rank's, so a 2-process run equals a 1-process one.

    g: the step's per-response statistics over all ranks ("reward", and "greedy_reward" for remax);
    b_kl: this rank's (R, N) per-token k1 when the KL is in the reward (None otherwise);
    loss_mask: (R, N) bool, True = the token counts. Returns (R,) float32 one advantage per response, or
    (R, N) per token for reinforce_pp and, when b_kl is given, for grpo and remax (their baselined score on the
    last token, -β k1_t per token, returns-to-go); rloo stays per response with the KL inside its baseline
    (R_i = r_i - β Σ_t k1_it over the counted tokens, as Ahmadian et al. 2024). Sets g["advantage"] (all ranks;
    a per-token advantage at the first token: the whole response's return) for the completions log.
    """
    R, N, G, est = loss_mask.shape[0], loss_mask.shape[1], group_size, estimator
    per_token = advantages_per_token(est, b_kl is not None)
    if per_token:  # the step's per-token k1 and counted tokens over every rank: (R_all, N_max)
        mask = gather_token_rows(loss_mask, rt)
        kl = gather_token_rows(b_kl, rt) if b_kl is not None else torch.zeros(mask.shape, device=mask.device)
    beta = beta if b_kl is not None else 0.0  # no KL in the reward: nothing to subtract
    if est == "rloo":  # Ahmadian et al. 2024: R_i = r_i - β Σ_t k1_it, A_i = R_i - mean_{j≠i} R_j (a group sums to 0)
        R_seq = g["reward"]
        if b_kl is not None:
            mask, kl = gather_token_rows(loss_mask, rt), gather_token_rows(b_kl, rt)
            R_seq = R_seq - beta * kl.double().masked_fill(~mask, 0.0).sum(-1)  # the KL of the counted tokens
        A = rloo_advantages(R_seq, G)
    elif est == "reinforce_pp":
        A = reinforce_pp_advantages(g["reward"], kl, mask, beta)  # whiten(r - β Σ_{t'>=t} k1_t') over the batch
    else:
        A = {"grpo": lambda: group_advantages(g["reward"], G, scale_rewards),  # (r - mean_G) / std_G
             "remax": lambda: remax_advantages(g["reward"], g["greedy_reward"], G)}[est]()  # r_i - r(greedy)
        if b_kl is not None:  # the baselined score on the last token, -β k1_t on every token; A_t = return-to-go
            A = returns_to_go(kl_reward(A, kl, mask, beta), mask)
    g["advantage"] = A[:, 0] if per_token else A
    A = A[rt.rank * R : (rt.rank + 1) * R]
    return (A[:, :N] if per_token else A).float()


def greedy_rewards(greedy: Rollout, sources, reward_model, rt, micro_batch_size: int) -> torch.Tensor:
    """ReMax's baseline: the weighted reward of each prompt's greedy response, over all ranks (prompts,)."""
    rm_scores = None
    if reward_model is not None:
        with rt.autocast():
            rm_scores = rollout_forward(lambda b: packing.response_scores(reward_model, b), greedy,
                                        micro_batch_rows(greedy, micro_batch_size))
    rewards = source_rewards(sources, greedy, rm_scores)
    return gather_columns({"reward": sum(s.weight * rewards[s.name] for s in sources)}, rt)["reward"]


def rollout_metrics(g: dict, sources, group_size: int) -> dict:
    """TRL's reward and completion metrics from a GRPO step's per-response statistics over all ranks (g: by name,
    train_grpo.grpo_batches); "kl" when the KL is in the reward (g["kl"]: each response's Σ_t k1_t)."""
    grouped = g["reward"].view(-1, group_size)  # (prompts, G)
    metrics = {"reward": float(g["reward"].mean()),
               "reward_std": float(grouped.std(dim=1).mean())}  # mean within-group std (TRL's reward_std)
    for s in sources:
        metrics[f"rewards/{s.name}/mean"] = float(g[f"rewards/{s.name}"].mean())
        metrics[f"rewards/{s.name}/std"] = float(g[f"rewards/{s.name}"].std())
    if "kl" in g:  # KL in the reward: the rollout's mean k1 per response token
        metrics["kl"] = float(g["kl"].sum() / g["length"].sum())
    return {**metrics,
            "frac_reward_zero_std": float((grouped == grouped[:, :1]).all(dim=1).double().mean()),
            "completions/mean_length": float(g["length"].mean()),
            "completions/min_length": float(g["length"].min()),
            "completions/max_length": float(g["length"].max()),
            "completions/clipped_ratio": float(1 - g["finished"].mean())}  # no <|im_end|> within max_new_tokens


def token_rewards(scores: torch.Tensor, kl: torch.Tensor, response_mask: torch.Tensor, kl_coef: float):
    """PPO's per-token rewards: r_t = -kl_coef · kl_t, plus the sequence score at the LAST response token.

    scores (B,) float; kl (B, N) per-token KL estimates; response_mask (B, N) bool, True for each row's
    first L_b positions (right-padded, contiguous, L_b >= 1). Returns (rewards (B, N), non_score_reward
    (B, N)), both 0 at pads; the score sits at column L_b - 1, the last real token, never on a pad.
    """
    lengths = response_mask.sum(-1)  # (B,) L_b
    columns = torch.arange(response_mask.shape[1], device=lengths.device)
    if not bool((lengths >= 1).all()) or not torch.equal(response_mask, columns < lengths[:, None]):
        raise ValueError("response_mask must be right-padded and non-empty in every row")
    non_score_reward = (-kl_coef * kl).masked_fill(~response_mask, 0.0)  # r_t = -β kl_t
    last = (lengths - 1)[:, None]  # (B, 1) column of the last response token
    rewards = non_score_reward.scatter_add(1, last, scores[:, None].to(non_score_reward.dtype))  # r_{L-1} += s
    return rewards, non_score_reward


def whiten_all_ranks(x: torch.Tensor, mask: torch.Tensor, rt, shift_mean: bool = True) -> torch.Tensor:
    """losses.whiten with the statistics of every rank's rows (the same numbers as one process holding
    the whole rollout); returns this rank's rows. x, mask (B, N), B equal on every rank."""
    if not rt.ddp:
        return whiten(x, mask, shift_mean)
    B, N = x.shape
    width = int(runtime.all_reduce_max(N, rt))
    xs = runtime.all_gather_rows(F.pad(x.float(), (0, width - N)), rt)  # (B * world, width)
    ms = runtime.all_gather_rows(F.pad(mask.to(torch.uint8), (0, width - N)), rt).bool()  # gloo gathers no bool
    return whiten(xs, ms, shift_mean)[rt.rank * B : (rt.rank + 1) * B, :N]
