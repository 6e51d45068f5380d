"""PPO for RLHF: a policy, a value model, a frozen reference and a frozen reward model (InstructGPT's recipe).

Each iteration (Ouyang et al. 2022, Sec. 3.5; Schulman et al. 2017; the numbers follow TRL's PPOTrainer):
  1. rollout: `prompts_per_step` prompts (split over ranks), one response each, sampled with the KV-cache
     sampler at `temperature` (minialign.rollout); a response ends at its first <|im_end|> (included),
     or after `max_new_tokens`. old_logps = the sampler's log-probs under softmax(logits / temperature);
  2. score: s = sum_k w_k r_k over `--reward_funcs`: the reward model's score at the LAST RESPONSE TOKEN
     (its <|im_end|>, or the last token of a truncated response; never a pad) and/or rule rewards
     (minialign.rewards); minus `missing_eos_penalty` for responses without <|im_end|>;
  3. per-token reward (`token_rewards`):
        r_t = -kl_coef · kl_t            kl_t = KL estimate of log π_old(y_t) vs log π_ref(y_t) (k1 or k3)
        r_{L-1} += s                      at the last response token t = L - 1 only
     optionally whitened (`--whiten_rewards`, scale only, as TRL);
  4. values V_t = V(s_t) from the value model, s_t = prompt + y_<t (alignment below); GAE (γ, λ) gives
     advantages A_t and returns R_t = A_t + V_t; A is whitened over the rollout (all ranks);
  5. `num_ppo_epochs` passes over `num_minibatches` shuffled minibatches, one optimizer step each, on
        L = ppo_policy_loss(log π(y_t), old_logps, A_t, cliprange) + vf_coef · ppo_value_loss(V_t, old V_t, R_t, cliprange_value)
     with log π recomputed at the SAME temperature as sampling, so on the first minibatch of the first
     epoch the ratio π / π_old is exactly 1 (checked every iteration: val/ratio_first_max_abs_dev);
     with `--target_kl`, once a minibatch's approximate KL (½ mean (log π - log π_old)², measured in
     its forward) exceeds it, the iteration's remaining optimizer steps are not taken.

Value alignment. For a response y_0..y_{L-1} after a prompt of P tokens, the sequence prompt + y is fed
without its last token, and V_t (the value of the state s_t = prompt + y_<t, before y_t is sampled) is
the value head at position P - 1 + t: the position holding the state's last token, the same position
whose logits give π(y_t) (generation.response_logps). The reward model reads position P - 1 + L (after
y_{L-1}, the terminal state). `response_values` computes V at rollout time and in training alike.

Normalization, in one place: a minibatch step's loss is the mean over the response tokens of the whole
minibatch (all its micro-batches, all ranks): `ppo_loss_sum` returns both losses SUMMED over tokens
(normalizer=1) and engine.train_step divides by the global token count. Metrics are token means over
the step the same way; the per-iteration values logged are means over the optimizer steps taken.

Models. Policy and reference from `--init_from` (SFT); reward model from `--reward_model`; the value
model starts as a copy of the reward model (backbone and head), or of the SFT backbone with a fresh head
when no reward model is used. Policy and value are trained together as one module (`PolicyAndValue`,
like TRL's PolicyAndValueWrapper) by ONE AdamW over both (same lr; the global gradient norm clipped over
both), under one DDP wrapper, so both gradients are all-reduced. Dropout is off in all four models.
The reward model's scores at positions before the end are not values (on the default task they swing by
several points from token to token), so the first iterations' advantages are noisy until the value
model has fitted the returns (loss/value_avg falls from about 3 to under 1).

Determinism and --resume: the sampler is seeded from (seed, step, first prompt) and the minibatch
shuffle from (seed, step, epoch), so no generator state needs saving; the checkpoint holds the policy
(a loadable CausalLM checkpoint), the value model, the joint optimizer, the scaler and the RNG state.
The shuffle is stratified so that the minibatches are the same whatever the number of ranks: the
step's rows, in global order, are cut into chunks of `num_minibatches` rows and a random permutation of
each chunk sends one row to each minibatch (see `minibatch_slots`).

Run on one device:         python train_ppo.py                  (out/sft + out/rm + data/rl_train.jsonl -> out/ppo)
Run on N processes / GPUs: torchrun --nproc_per_node=N train_ppo.py  (prompts_per_step split over ranks)
Rule rewards instead:      python train_ppo.py --reward_funcs gold --reward_model ''
At the end the policy is scored with the default task's gold rule on data/rl_eval.jsonl (eval.json),
with the KL to the SFT reference. Measured at the defaults (out/sft sampled gold 0.593, 2-core CPU shared
with other jobs): sampled gold 0.868, greedy 0.918, KL to SFT 1.87 nats, 174 s wall in all. With TRL's
kl_coef 0.05 the policy exploits the reward model instead (examples/reward_hacking.md).

Simplified on purpose: one response per prompt; the value model is a separate network (no shared
backbone); no adaptive KL controller (kl_coef is fixed, as in TRL's PPOTrainer); no vLLM.
"""

import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from minialign import engine
from minialign.engine import TrainConfig, knob
from minialign.evaluate import evaluate_policy, format_result, gold_point, load_eval_prompts
from minialign.generation import response_logps
from minialign.losses import gae, kl_penalty, ppo_policy_loss, ppo_value_loss, whiten
from minialign.rewards import compute_rewards, parse_reward_funcs
from minialign.rollout import (all_gather_rows, all_reduce_max, disable_dropout, frozen, load_reward_model, load_rl_prompts, micro_batches, reward_fields, reward_model_scores,
                               rollout_logps, sample_rollout, step_prompt_indices)
from minialign.tokenizer import Tokenizer


@dataclass
class Config(TrainConfig):
    init_from: str = knob("out/sft", "policy and reference checkpoint (SFT)")
    data: str = knob("data/rl_train.jsonl", "prompts (JSONL: {prompt} or {messages}); other keys are reward fields")
    reward_model: str = knob("out/rm", "trained reward model (train_rm.py output), also the value model's start ('' = none: "
                                       "the value model starts from --init_from with a fresh head)")
    reward_funcs: list[str] = knob(["reward_model"], "score terms: reward_model (needs --reward_model) | gold | format | length | gsm8k (minialign.rewards)")
    reward_weights: list[float] = knob([], "one weight per --reward_funcs entry (empty = all 1.0)")
    prompts_per_step: int = knob(64, "prompts (= responses) per PPO iteration, over all ranks")
    max_new_tokens: int = knob(32, "generation budget (default-task responses are <= ~25 tokens)")
    temperature: float = knob(1.0, "sampling temperature, also used for every training and reference log-prob")
    prompts_per_generate: int = knob(0, "prompts per generate() call (0 = all of the rank's); make it divide each rank's share to get the same rollouts with any number of ranks")
    missing_eos_penalty: float = knob(0.0, "subtracted from the score of a response that did not emit <|im_end|> (0 = off)")
    kl_coef: float = knob(0.5, "β of the per-token KL penalty -β·kl_t to the reference. TRL's 0.05 assumes scores of about unit scale; "
                               "out/rm's span about ±10. Measured: 0.05 -> gold 0.600, KL 8.3 (the policy hacks the reward model, "
                               "examples/reward_hacking.md); 0.5 -> gold 0.868, KL 1.9")
    kl_estimator: str = knob("k1", "per-token KL estimate in the reward: k1 (log π/π_ref, unbiased) | k3 (unbiased, >= 0)")
    whiten_rewards: bool = knob(False, "rescale the per-token rewards to unit variance over the rollout (mean kept)")
    gamma: float = knob(1.0, "GAE discount γ")
    lam: float = knob(0.95, "GAE λ")
    num_ppo_epochs: int = knob(2, "passes over each rollout")
    num_minibatches: int = knob(2, "optimizer steps per epoch; each rank's share of prompts_per_step must divide by it")
    cliprange: float = knob(0.2, "ε of the policy ratio clip")
    cliprange_value: float = knob(0.2, "how far a value may move from its rollout value per update")
    vf_coef: float = knob(0.1, "weight of the value loss")
    target_kl: float = knob(0.0, "stop an iteration's optimizer steps once a minibatch's approximate KL to the rollout policy exceeds this (0 = off)")
    max_steps: int = knob(100, "PPO iterations (rollouts); each takes num_ppo_epochs x num_minibatches optimizer steps")
    lr: float = knob(3e-4, "peak learning rate (policy and value); measured at the defaults: 5e-4 drifts further from SFT (KL 3.6 vs 1.9) and scores lower (gold 0.762 vs 0.868)")
    warmup_steps: int = knob(5, "linear warmup, in iterations")
    micro_batch_size: int = knob(64, "sequences (prompt + response) per forward pass per rank")
    log_every: int = knob(5, "log metrics every N iterations")
    eval_data: str = knob("data/rl_eval.jsonl", "held-out prompts scored by the default task's gold rule ('' = no eval)")
    eval_prompts: int = knob(600, "how many held-out prompts to evaluate at the end")
    eval_max_new_tokens: int = knob(48, "generation length for the evaluation (48, as for SFT)")
    gold_eval_every: int = knob(0, "every N steps also log the gold score (T=1) and KL to the SFT model on the first --gold_eval_prompts held-out prompts (points of the gold-vs-KL curve; 0 = off)")
    gold_eval_prompts: int = knob(200, "held-out prompts for --gold_eval_every")


def check_config(cfg, rt):
    """Refuse impossible or unsupported combinations with a message naming the flag."""
    share = cfg.prompts_per_step // rt.world_size
    checks = [
        (cfg.init_from != "", "--init_from is required (PPO starts from an SFT policy, e.g. out/sft)"),
        (cfg.prompts_per_step % rt.world_size == 0, f"--prompts_per_step={cfg.prompts_per_step} must be divisible by the {rt.world_size} ranks"),
        (cfg.num_minibatches >= 1 and share % cfg.num_minibatches == 0,
         f"--num_minibatches={cfg.num_minibatches} must be >= 1 and divide each rank's {share} prompts"),
        (cfg.num_ppo_epochs >= 1, "--num_ppo_epochs must be >= 1"),
        (cfg.prompts_per_generate >= 0, "--prompts_per_generate must be >= 0"),
        (cfg.max_new_tokens >= 1, "--max_new_tokens must be >= 1"),
        (cfg.max_new_tokens < cfg.max_len, f"--max_new_tokens={cfg.max_new_tokens} must be < --max_len={cfg.max_len} (prompts get the difference)"),
        (cfg.prompts_per_step >= rt.world_size, f"--prompts_per_step={cfg.prompts_per_step} must be >= the {rt.world_size} rank(s)"),
        (cfg.temperature > 0, "--temperature must be > 0 (the policy gradient needs sampled log-probs)"),
        (cfg.kl_estimator in ("k1", "k3"), "--kl_estimator must be k1 or k3"),
        (not cfg.compile, "--compile is not offered for PPO: the sampler's ever-changing shapes would recompile at every step"),
        (cfg.kl_coef >= 0 and cfg.missing_eos_penalty >= 0 and cfg.vf_coef >= 0 and cfg.target_kl >= 0,
         "--kl_coef, --missing_eos_penalty, --vf_coef and --target_kl must be >= 0"),
        (cfg.cliprange > 0 and cfg.cliprange_value > 0, "--cliprange and --cliprange_value must be > 0"),
        (0 <= cfg.gamma <= 1 and 0 <= cfg.lam <= 1, "--gamma and --lam must be in [0, 1]"),
        (cfg.grad_accum == 1, "--grad_accum is not used by PPO: a minibatch is cut into micro-batches of --micro_batch_size"),
        (("reward_model" in cfg.reward_funcs) == bool(cfg.reward_model),
         "--reward_model PATH and 'reward_model' in --reward_funcs go together (rules only: --reward_funcs gold --reward_model '')"),
    ]
    for ok, msg in checks:
        if not ok:
            raise SystemExit(f"train_ppo.py: error: {msg}")


# ------------------------------------------------------------------------------------------ models

class PolicyAndValue(nn.Module):
    """The two trained networks as one module, so one DDP wrapper syncs both gradients and one
    engine.train_step (one optimizer) updates both. forward -> (logps, values), each (B, N)."""

    def __init__(self, policy, value):
        super().__init__()
        self.policy, self.value = policy, value

    def forward(self, prompt_ids, prompt_mask, response_ids, response_mask, temperature: float):
        logps = response_logps(self.policy, prompt_ids, prompt_mask, response_ids, response_mask, temperature)
        return logps, response_values(self.value, prompt_ids, prompt_mask, response_ids, response_mask)


def response_values(value_model, prompt_ids, prompt_mask, response_ids, response_mask):
    """V_t for each response token t: the value head at position P - 1 + t of prompt + response (the last
    token of the state s_t = prompt + y_<t; the position whose logits give π(y_t)). (B, N) float32, 0 off the mask.
    prompt_ids, prompt_mask (B, P) left-padded; response_ids, response_mask (B, N) right-padded; masks bool."""
    N = response_ids.shape[1]
    ids = torch.cat([prompt_ids, response_ids], dim=1)[:, :-1]  # (B, P + N - 1): the last token starts no state
    mask = torch.cat([prompt_mask, response_mask], dim=1)[:, :-1]
    return value_model(ids, mask)[:, -N:].float().masked_fill(~response_mask, 0.0)  # (B, N)


@torch.no_grad()
def rollout_values(value_model, ro, micro_batch_size: int) -> torch.Tensor:
    """(B, N) values of the rollout's states, in micro-batches."""
    return torch.cat([response_values(value_model, ro.prompt_ids[s], ro.prompt_mask[s], ro.response_ids[s], ro.response_mask[s])
                      for s in (slice(i, i + micro_batch_size) for i in range(0, len(ro.rows), micro_batch_size))])


# ----------------------------------------------------------------------------------- the rewards

def token_rewards(scores: torch.Tensor, kl: torch.Tensor, response_mask: torch.Tensor, kl_coef: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token rewards r_t = -kl_coef · kl_t, plus the sequence score at the LAST response token.

    scores (B,) float; kl (B, N) per-token KL estimates; response_mask (B, N) bool, True for each row's
    first L_b positions (right-padded, contiguous, L_b >= 1). Returns (rewards (B, N), non_score_reward
    (B, N)), both 0 at pads; the score sits at column L_b - 1, the last real token, never on a pad.
    """
    lengths = response_mask.sum(-1)  # (B,) L_b
    if not bool((lengths >= 1).all()) or not torch.equal(response_mask, torch.arange(response_mask.shape[1], device=lengths.device) < lengths[:, None]):
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
    width = int(all_reduce_max(N, rt))
    xs = all_gather_rows(F.pad(x.float(), (0, width - N)), rt)  # (B * world, width)
    ms = all_gather_rows(F.pad(mask.to(torch.uint8), (0, width - N)), rt).bool()  # gloo gathers no bool
    return whiten(xs, ms, shift_mean)[rt.rank * B : (rt.rank + 1) * B, :N]


def minibatch_slots(prompts_per_step: int, num_minibatches: int, seed: int, step: int, epoch: int, rt) -> torch.Tensor:
    """(B_local,) minibatch index of each of this rank's rows for one epoch (a stratified shuffle).

    The step's global rows are cut into chunks of M = num_minibatches consecutive rows; a random
    permutation of each chunk (seeded from (seed, step, epoch), the same on every rank) sends one row of
    the chunk to each minibatch. Each rank's share divides by M, so it holds whole chunks, and the
    union over ranks of "my rows in minibatch m" is the same set as in a one-process run.
    """
    M = num_minibatches
    g = torch.Generator().manual_seed(int(np.random.SeedSequence([seed, step, epoch, 7]).generate_state(1, np.uint64)[0] >> 1))
    slots = torch.rand(prompts_per_step // M, M, generator=g).argsort(-1)  # (chunks, M): a permutation per chunk
    share = prompts_per_step // rt.world_size
    return slots.flatten()[rt.rank * share : (rt.rank + 1) * share]


# ----------------------------------------------------------------------------------- the update

def ppo_loss_sum(model, batch, cfg):
    """One micro-batch's PPO loss SUMMED over its response tokens -> (loss_sum, logps, metric_sums).

    engine.train_step divides loss_sum and every metric sum by the response-token count of the whole
    minibatch (all micro-batches, all ranks), so the optimizer sees the exact token mean of
        ppo_policy_loss + vf_coef · ppo_value_loss.
    """
    mask = batch["response_mask"]  # (b, n) bool
    logps, values = model(batch["prompt_ids"], batch["prompt_mask"], batch["response_ids"], mask, cfg.temperature)  # (b, n) each; same temperature as the sampler
    pg_loss_sum, pg = ppo_policy_loss(logps, batch["old_logps"], batch["advantages"], mask, cfg.cliprange, normalizer=1)
    vf_loss_sum, vf = ppo_value_loss(values, batch["old_values"], batch["returns"], mask, cfg.cliprange_value, normalizer=1)
    n_tokens = mask.sum()
    metric_sums = {"policy_loss": pg_loss_sum.detach(), "value_loss": vf_loss_sum.detach(),  # already sums over tokens
                   "approxkl": pg["approx_kl"] * n_tokens, "clipfrac": pg["clipfrac"] * n_tokens,
                   "ratio": pg["ratio_mean"] * n_tokens, "vf_clipfrac": vf["clipfrac"] * n_tokens}
    return pg_loss_sum + cfg.vf_coef * vf_loss_sum, logps.detach(), metric_sums


def ppo_iteration(model, ref_model, reward_model, optimizer, scaler, prompts, sources, step, tok, rt, cfg, stats) -> dict:
    """Roll out this rank's `prompts`, score, compute advantages, run the PPO epochs. Returns the
    iteration's metrics (global over ranks). `model` is a (possibly DDP-wrapped) PolicyAndValue;
    `reward_model` is None unless a reward_model source is used."""
    pv = engine.unwrap(model)
    # ---- 1. rollout and everything computed from it without gradients
    with torch.no_grad(), rt.autocast():
        ro = sample_rollout(pv.policy, tok, prompts, 1, cfg.max_new_tokens, cfg.temperature, cfg.seed, step,
                            first_prompt=rt.rank * len(prompts), prompts_per_generate=cfg.prompts_per_generate)
        ref_logps = rollout_logps(ref_model, ro, cfg.temperature, cfg.micro_batch_size)  # (B, N)
        old_values = rollout_values(pv.value, ro, cfg.micro_batch_size)  # (B, N) V_t
        rm_scores = reward_model_scores(reward_model, ro, cfg.micro_batch_size) if reward_model is not None else None
    B, mask = len(ro.rows), ro.response_mask  # mask (B, N): up to and including the first <|im_end|>

    # ---- 2. the sequence score s: weighted sum of the sources, minus the missing-eos penalty
    texts, fields = reward_fields(ro)
    per_source = compute_rewards(sources, texts, ro.completions, fields)
    if rm_scores is not None:
        per_source["reward_model"] = rm_scores.tolist()
    per_source_t = torch.tensor([per_source[s.name] for s in sources], dtype=torch.float32, device=rt.device).T  # (B, K)
    scores = per_source_t @ torch.tensor([s.weight for s in sources], dtype=torch.float32, device=rt.device)  # (B,)
    scores = scores - cfg.missing_eos_penalty * (~ro.finished).float()

    # ---- 3. per-token rewards, GAE, whitened advantages
    kl = kl_penalty(ro.logps, ref_logps, cfg.kl_estimator).masked_fill(~mask, 0.0)  # (B, N) kl_t
    rewards, non_score_reward = token_rewards(scores, kl, mask, cfg.kl_coef)
    if cfg.whiten_rewards:
        rewards = whiten_all_ranks(rewards, mask, rt, shift_mean=False)
    advantages, returns = gae(rewards, old_values, mask, cfg.gamma, cfg.lam)  # (B, N) A_t, R_t = A_t + V_t
    advantages = whiten_all_ranks(advantages, mask, rt)

    # ---- 4. PPO epochs over stratified-shuffled minibatches
    tensors = {"prompt_ids": ro.prompt_ids, "prompt_mask": ro.prompt_mask, "response_ids": ro.response_ids, "response_mask": mask,
               "old_logps": ro.logps, "old_values": old_values, "advantages": advantages, "returns": returns}
    total_len = (ro.prompt_mask.sum(-1) + ro.lengths).tolist()
    first_dev = [0.0]  # max |ratio - 1| on the first minibatch of the first epoch

    def loss_fn(m, batch, first):
        loss_sum, logps, metric_sums = ppo_loss_sum(m, batch, cfg)
        if first:  # the policy has not moved since sampling: π / π_old must be 1
            dev = (logps - batch["old_logps"]).exp().sub(1).abs().masked_fill(~batch["response_mask"], 0)
            first_dev[0] = max(first_dev[0], float(dev.max()))
        return loss_sum, metric_sums

    sums, updates, stopped = {}, 0, False
    for epoch in range(cfg.num_ppo_epochs):
        slots = minibatch_slots(cfg.prompts_per_step, cfg.num_minibatches, cfg.seed, step, epoch, rt)  # (B,)
        for mb in range(cfg.num_minibatches):
            rows = (slots == mb).nonzero().squeeze(-1).tolist()
            if cfg.group_by_length:  # similar lengths in a micro-batch: less padding, same loss
                rows.sort(key=lambda i: total_len[i])
            batches = micro_batches({k: v[rows] for k, v in tensors.items()}, cfg.micro_batch_size)
            first = epoch == 0 and mb == 0
            out = engine.train_step(model, optimizer, scaler, batches, lambda m, b: loss_fn(m, b, first),
                                    lambda b: b["response_mask"].sum(), rt, cfg)
            engine.check_finite(out["loss"], out["grad_norm"], step, cfg, stats)
            for k, v in out.items():
                sums[k] = sums.get(k, 0.0) + v
            updates += 1
            if cfg.target_kl and out["approxkl"] > cfg.target_kl:  # all-reduced: the same decision on every rank
                stopped = True
                break
        if stopped:
            break
    avg = {k: v / updates for k, v in sums.items()}
    first_dev = all_reduce_max(first_dev[0], rt)
    if first_dev > 1e-3 and rt.device.type == "cpu" and rt.dtype == torch.float32:
        raise RuntimeError(f"PPO ratio on the first minibatch deviates from 1 by {first_dev:.3g}: the training log-probs do not "
                           f"reproduce the sampler's (temperature, dropout or a policy changed before the update?)")

    # ---- 5. metrics (TRL's names), per sequence then gathered over ranks
    per_seq = torch.stack([scores, kl.sum(-1), non_score_reward.sum(-1), -ro.logps.masked_fill(~mask, 0).sum(-1),
                           ro.lengths.float(), ro.finished.float(), *per_source_t.T]).T.double()  # (B, 6 + K)
    g = all_gather_rows(per_seq, rt).mean(0).tolist()
    metrics = {
        "objective/kl": g[1],  # mean over responses of Σ_t kl_t
        "objective/entropy": g[3],  # mean over responses of Σ_t -log π_old(y_t): a sampled estimate of the sequence entropy
        "objective/non_score_reward": g[2],  # mean of Σ_t -β kl_t
        "objective/rlhf_reward": g[0] + g[2],  # score + non-score reward: what PPO maximizes
        "objective/scores": g[0],  # mean sequence score s (after the missing-eos penalty)
        "policy/approxkl_avg": avg["approxkl"],
        "policy/clipfrac_avg": avg["clipfrac"],
        "loss/policy_avg": avg["policy_loss"],
        "loss/value_avg": avg["value_loss"],
        "val/clipfrac_avg": avg["vf_clipfrac"],
        "val/ratio": avg["ratio"],  # mean π / π_old over the iteration's minibatch steps
        "val/ratio_first_max_abs_dev": first_dev,  # max |π / π_old - 1| on the first minibatch: must be ~0
        "completions/mean_length": g[4],
        "completions/eos_rate": g[5],  # fraction of responses that ended with <|im_end|>
        "policy/optimizer_steps": updates,  # < num_ppo_epochs x num_minibatches when --target_kl stopped the iteration
        "loss": avg["loss"],
        "grad_norm": avg["grad_norm"],
        "episode": (step + 1) * cfg.prompts_per_step,
    }
    if len(sources) > 1:
        metrics.update({f"rewards/{s.name}/mean": g[6 + k] for k, s in enumerate(sources)})
    return metrics


# ---------------------------------------------------------------------------------------- main

def main(argv=None):
    cfg = engine.parse_config(Config, argv)
    cfg.out_dir = cfg.out_dir or "out/ppo"
    rt = engine.setup_runtime(cfg)
    check_config(cfg, rt)
    try:
        sources = parse_reward_funcs(cfg.reward_funcs, cfg.reward_weights, model_names=("reward_model",))
    except ValueError as e:
        raise SystemExit(f"train_ppo.py: error: {e}")
    if rt.is_main:
        engine.check_writable(cfg.out_dir)
    tok_path = engine.tokenizer_path_for(cfg)
    tok = Tokenizer(tok_path)

    # ---- four models: policy and value (trained), reference and reward model (frozen)
    policy = disable_dropout(engine.load_model(cfg.init_from)).to(rt.device)
    ref_model = frozen(engine.load_model(cfg.init_from), rt)
    reward_model = load_reward_model(cfg.reward_model, rt, "train_ppo.py") if cfg.reward_model else None
    value = disable_dropout(engine.load_model(cfg.reward_model or cfg.init_from, kind="scalar")).to(rt.device)
    if value.cfg.vocab_size != policy.cfg.vocab_size:
        raise SystemExit(f"train_ppo.py: error: the reward model's vocabulary ({value.cfg.vocab_size}) differs from the policy's ({policy.cfg.vocab_size})")
    if cfg.max_len > min(policy.cfg.max_seq_len, value.cfg.max_seq_len):
        raise SystemExit(f"train_ppo.py: error: --max_len={cfg.max_len} exceeds the models' max_seq_len")
    engine.print0(rt, f"policy: {policy.num_params() / 1e6:.2f}M parameters from {cfg.init_from} (reference: a frozen copy); "
                      f"value: {value.num_params() / 1e6:.2f}M from {cfg.reward_model or cfg.init_from + ' (fresh head)'}; score: "
                      + " + ".join(f"{s.weight:g} x {s.name}" for s in sources))

    # ---- data: prompts fit max_len together with the generation budget
    stats = {}
    try:  # before any training: every line has the fields its reward functions read, and some prompt fits
        prompts = load_rl_prompts(cfg.data, tok, cfg.max_len - cfg.max_new_tokens, sources, stats)
    except ValueError as e:
        raise SystemExit(f"train_ppo.py: error: {e}") from None
    share = cfg.prompts_per_step // rt.world_size
    engine.print0(rt, f"data: {len(prompts)} prompts (dropped {stats.get('dropped_prompt_too_long', 0)} longer than "
                      f"{cfg.max_len - cfg.max_new_tokens} tokens); an iteration = {cfg.prompts_per_step} responses ({share} per rank), "
                      f"{cfg.num_ppo_epochs} epochs x {cfg.num_minibatches} minibatches of {cfg.prompts_per_step // cfg.num_minibatches} "
                      f"= {cfg.num_ppo_epochs * cfg.num_minibatches} optimizer steps; {cfg.max_steps} iterations = "
                      f"{cfg.max_steps * cfg.prompts_per_step / len(prompts):.2f} epochs of prompts")

    # ---- one optimizer over policy + value, resume (the value model rides in the checkpoint's extra)
    model = PolicyAndValue(policy, value)
    optimizer = engine.make_optimizer(model, cfg, rt)
    scaler = rt.make_scaler()
    start_step = engine.resume_from_checkpoint(cfg, policy, optimizer, scaler)
    if cfg.resume:
        ckpt = engine.load_checkpoint(cfg.out_dir)
        value.load_state_dict(ckpt["value_model"])
    model = engine.wrap_ddp(model, rt)
    log = engine.MetricsLog(cfg.out_dir, rt, resume_step=start_step if cfg.resume else None)

    def save(step_done):
        engine.save_checkpoint(cfg.out_dir, model=policy, optimizer=optimizer, scaler=scaler, step=step_done, cfg=cfg, tokenizer_path=tok_path,
                               finished=step_done == cfg.max_steps, rt=rt,
                               extra={"value_model": value.state_dict(), "value_model_config": value.cfg.to_dict()})

    # ---- train
    gold_prompts = load_eval_prompts(cfg.eval_data, tok, cfg.gold_eval_prompts) if cfg.gold_eval_every and cfg.eval_data and rt.is_main else None

    model.train()
    t0 = time.time()
    bar = tqdm(range(start_step, cfg.max_steps), initial=start_step, total=cfg.max_steps, desc="ppo", disable=not rt.is_main)
    for step in bar:
        lr = engine.lr_at(step, cfg.lr, cfg.warmup_steps, cfg.max_steps, cfg.min_lr_ratio)
        engine.set_lr(optimizer, lr)
        step_prompts = [prompts[i] for i in step_prompt_indices(len(prompts), step, cfg.prompts_per_step, cfg.seed, rt)]
        metrics = ppo_iteration(model, ref_model, reward_model, optimizer, scaler, step_prompts, sources, step, tok, rt, cfg, stats)
        bar.set_postfix(score=f"{metrics['objective/scores']:.3f}", kl=f"{metrics['objective/kl']:.2f}")
        if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.max_steps:
            log.log(step + 1, {**metrics, "learning_rate": lr}, bar)
        if gold_prompts and (step + 1) % cfg.gold_eval_every == 0 and step + 1 < cfg.max_steps:
            log.log(step + 1, gold_point(policy, tok, gold_prompts, cfg.eval_max_new_tokens, ref_model), bar)
        if engine.should_save(step + 1, start_step, cfg):
            save(step + 1)
        if engine.should_stop(step + 1, start_step, cfg):
            engine.print0(rt, f"stopping after {cfg.stop_after_steps} iterations as asked; continue with --resume")
            engine.cleanup(rt)
            return
    bar.close()
    engine.print0(rt, f"trained {cfg.max_steps - start_step} iterations in {time.time() - t0:.0f}s")

    # ---- evaluate with the gold rule, KL measured against the SFT reference
    if cfg.eval_data and rt.is_main:
        res = evaluate_policy(policy.eval(), tok, load_eval_prompts(cfg.eval_data, tok, cfg.eval_prompts), cfg.eval_max_new_tokens, ref_model)
        engine.write_json(res, f"{cfg.out_dir}/eval.json")
        log.log(cfg.max_steps, {k: v for k, v in res.items() if k != "examples"})
        print(f"ppo eval on {res['n_prompts']} held-out prompts: {format_result(res)}")
    engine.cleanup(rt)


if __name__ == "__main__":
    main()
