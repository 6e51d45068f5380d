"""PPO for RLHF: a policy, a value model, a frozen reference and a frozen reward model (InstructGPT's recipe).

Each iteration (Ouyang et al. 2022, Sec. 3.5; Schulman et al. 2017; the numbers follow TRL's PPOTrainer):
  1. rollout: `prompts_per_step` prompts (split over ranks), one response each, sampled with the KV-cache
     sampler at `temperature` (minialign.algorithms.rollout); a response ends at its first <|im_end|> (included),
     or after `max_new_tokens`. Then, without gradients, in the TRAINING layout (minialign.algorithms.packing) and
     micro-batches of the first epoch: old_logps = log π_old(y_t) at that temperature, log π_ref(y_t), V_t
     and the reward model's score (the sampler's own log-probs only go to sampler/logp_max_abs_diff);
  2. score: s = sum_k w_k r_k over `--reward_funcs`: the reward model's score at the LAST RESPONSE TOKEN
     (its <|im_end|>, or the last token of a truncated response; never a pad) and/or rule rewards
     (minialign.algorithms.reward_funcs); minus `missing_eos_penalty` for responses without <|im_end|>;
  3. per-token reward (`token_rewards`):
        r_t = -kl_coef · kl_t            kl_t = k1 = log π_old(y_t) - log π_ref(y_t) (k3 refused, see the flag)
        r_{L-1} += s                      at the last response token t = L - 1 only
     optionally whitened (`--whiten_rewards`, scale only, as TRL);
  4. GAE (γ, λ) over V_t = V(s_t), s_t = prompt + y_<t, gives advantages A_t and returns R_t = A_t + V_t;
     A is whitened over the rollout (all ranks);
  5. `num_ppo_epochs` passes over `num_minibatches` shuffled minibatches, one optimizer step each, on
        L = ppo_policy_loss(log π(y_t), old_logps, A_t, ε) + vf_coef · ppo_value_loss(V_t, old V_t, R_t, ε_v)
     The first minibatch's forward repeats step 1's exactly (same micro-batches, same temperature), so
     its ratio π / π_old is exactly 1, under autocast too (val/ratio_first_max_abs_dev); with
     `--target_kl`, once a minibatch's approximate KL (½ mean (log π - log π_old)², measured in its
     forward) exceeds it, the iteration's remaining optimizer steps are not taken.

Normalization: a minibatch step's loss is the mean over the response tokens of the whole minibatch
(all micro-batches, all ranks): `ppo_loss_sum` returns token SUMS and loop.train_step divides them
by the global token count. Logged per-iteration values are means over the optimizer steps taken.

Models. Policy and reference from `--init_from` (SFT); reward model from `--reward_model`; the value
model starts as a copy of the reward model, or of the SFT backbone with a fresh head when there is none.
Policy and value are one module (`PolicyAndValue`, like TRL's PolicyAndValueWrapper) under ONE AdamW
and one DDP wrapper (the gradient norm clipped over both); train_step adds an MoE backbone's balance
loss. Dropout is off in all four models. Early advantages are noisy until the value model has fitted
the returns (loss/value_avg falls from about 3 to under 1).
With --lora_r (minialign.models.lora): reference = the policy, adapters off; value = adapters + a full head on the reward
model's backbone, and reward = that backbone, adapters off, with the RM's frozen head: 2 backbones in memory, not 4.

Determinism and --resume: the sampler is seeded from (seed, step, first prompt) and the stratified
minibatch shuffle (rollout.minibatch_slots) from (seed, step, epoch), so no generator state is saved and
a torchrun run equals a 1-process run; the checkpoint holds the policy (a loadable CausalLM checkpoint),
the value model, the joint optimizer, the scaler and the RNG states.

Run on one device:         python train_ppo.py                  (out/sft + out/rm + data/rl_train.jsonl -> out/ppo)
Run on N processes / GPUs: torchrun --nproc_per_node=N train_ppo.py  (prompts_per_step split over ranks)
Rule rewards instead:      python train_ppo.py --reward_funcs gold --reward_model ''
At the end the policy is scored with the default task's gold rule on data/rl_eval.jsonl (eval.json), with
the KL to the SFT reference. Measured at the defaults (from out/sft's sampled gold 0.593): sampled gold 0.868,
greedy 0.918, KL 1.87 nats, 174 s on 2 CPU cores. With TRL's kl_coef 0.05 it hacks the reward model instead.

Simplified on purpose: one response per prompt; the value model is a separate network (no shared
backbone); no adaptive KL controller (kl_coef is fixed, as in TRL's PPOTrainer); no vLLM.
"""

import time
from dataclasses import dataclass

import torch
import torch.nn as nn
from tqdm import tqdm

from minialign.algorithms.advantages import token_rewards, whiten_all_ranks
from minialign.algorithms.losses import SUM, gae, kl_penalty, ppo_policy_loss, ppo_value_loss
from minialign.algorithms.packing import response_logps, response_scores, response_values
from minialign.algorithms.reward_funcs import parse_reward_funcs
from minialign.algorithms.roles import disable_dropout, load_reward_model, sft_reference, value_and_reward
from minialign.algorithms.rollout import (load_rl_prompts, micro_batch_rows, minibatch_slots, packed_batch,
                                          rollout_forward, sample_rollout, source_rewards, step_prompt_indices)
from minialign.data.tokenizer import load_tokenizer
from minialign.errors import run_cli
from minialign.evaluation.evaluate import evaluate_policy, format_result, gold_point, load_eval_prompts
from minialign.models import lora
from minialign.training import checkpoint, config, logger, loop, runtime
from minialign.training.config import (FSDPConfig, GoldCurveConfig, OnlineLoRAConfig, SequenceBatch, TrainConfig,
                                       at_least, in_range, knob, non_negative, positive, rl_problems)
from minialign.training.runtime import gather_columns


@dataclass
class Config(TrainConfig, SequenceBatch, GoldCurveConfig, OnlineLoRAConfig, FSDPConfig):
    out_dir: str = knob("out/ppo", "output folder")
    init_from: str = knob("out/sft", "policy and reference checkpoint (SFT)",
                          (bool, "is required (PPO starts from an SFT policy, e.g. out/sft)"))
    data: str = knob("data/rl_train.jsonl", "prompts (JSONL: {prompt} or {messages}); other keys are reward fields")
    reward_model: str = knob("out/rm", "trained reward model (train_rm.py output), also the value model's start "
                                       "('' = none: the value model starts from --init_from with a fresh head)")
    reward_funcs: list[str] = knob(["reward_model"], "score terms: reward_model (needs --reward_model) | gold | "
                                                     "format | length | gsm8k (minialign.algorithms.reward_funcs)")
    reward_weights: list[float] = knob([], "one weight per --reward_funcs entry (empty = all 1.0)")
    prompts_per_step: int = knob(64, "prompts (= responses) per PPO iteration, over all ranks")
    max_new_tokens: int = knob(32, "generation budget (default-task responses are <= ~25 tokens)", at_least(1))
    temperature: float = knob(1.0, "sampling temperature, also of every training and reference log-prob", positive)
    prompts_per_generate: int = knob(0, "prompts per generate() call (0 = all of the rank's); make it divide each "
                                        "rank's share to get the same rollouts with any number of ranks", non_negative)
    missing_eos_penalty: float = knob(0.0, "subtracted from the score of a response without <|im_end|>", non_negative)
    kl_coef: float = knob(0.5, "β of the per-token KL penalty -β·kl_t. TRL's 0.05 assumes unit-scale scores; out/rm's "
                               "span about ±10. Measured: 0.05 -> gold 0.600, KL 8.3 (the policy hacks the reward "
                               "model, examples/reward_hacking.md); 0.5 -> gold 0.868, KL 1.9", non_negative)
    kl_estimator: str = knob("k1", "per-token KL estimate in the reward: k1 = log π_old/π_ref, the only one whose "
                                   "detached reward has the policy gradient of -kl_coef · KL(π ‖ π_ref)",
                             (lambda v: v == "k1", "is refused: as a detached per-token reward (-kl_coef · k3_t) its "
                                                   "expected policy gradient is ∇KL(π ‖ π_ref) - ∇KL(π_ref ‖ π), not "
                                                   "∇KL(π ‖ π_ref) (k3's value is unbiased, its gradient is not; "
                                                   "minialign.algorithms.losses.kl_penalty); use k1"))
    whiten_rewards: bool = knob(False, "rescale the per-token rewards to unit variance over the rollout (mean kept)")
    gamma: float = knob(1.0, "GAE discount γ", in_range(0, 1))
    lam: float = knob(0.95, "GAE λ", in_range(0, 1))
    num_ppo_epochs: int = knob(2, "passes over each rollout", at_least(1))
    num_minibatches: int = knob(2, "optimizer steps per epoch; each rank's share of prompts_per_step must divide by it",
                                at_least(1))
    cliprange: float = knob(0.2, "ε of the policy ratio clip", positive)
    cliprange_value: float = knob(0.2, "how far a value may move from its rollout value per update", positive)
    vf_coef: float = knob(0.1, "weight of the value loss", non_negative)
    target_kl: float = knob(0.0, "stop an iteration's optimizer steps once a minibatch's approximate KL to the rollout "
                                 "policy exceeds this (0 = off)", non_negative)
    max_steps: int = knob(100, "PPO iterations (rollouts); each takes num_ppo_epochs x num_minibatches optimizer "
                               "steps", at_least(1))
    lr: float = knob(3e-4, "peak learning rate (policy and value); measured at the defaults: 5e-4 drifts further from "
                           "SFT (KL 3.6 vs 1.9) and scores lower (gold 0.762 vs 0.868)", positive)
    warmup_steps: int = knob(5, "linear warmup, in iterations", non_negative)
    micro_batch_size: int = knob(64, "sequences (prompt + response) per forward pass per rank", at_least(1))
    log_every: int = knob(5, "log metrics every N iterations", at_least(1))
    eval_max_new_tokens: int = knob(48, "generation length for the evaluation (48, as for SFT)", at_least(1))

    def problems(self, world_size: int) -> list[str]:
        out, share = rl_problems(self, world_size), self.prompts_per_step // world_size
        if not out and share % self.num_minibatches:
            out.append(f"--num_minibatches={self.num_minibatches} must be >= 1 and divide each rank's {share} prompts")
        return out


class PolicyAndValue(nn.Module):
    """The two trained networks as one module, so one DDP wrapper syncs both gradients and one
    loop.train_step (one optimizer) updates both. forward(packed batch) -> (logps, values), each (R, N)."""

    def __init__(self, policy, value):
        super().__init__()
        self.policy, self.value = policy, value

    def forward(self, batch: dict, temperature: float):
        return response_logps(self.policy, batch, temperature), response_values(self.value, batch)


def epoch_minibatches(ro, step: int, epoch: int, rt, cfg) -> list[list[list[int]]]:
    """An epoch's minibatches, each a list of micro-batches (lists of this rank's rollout rows)."""
    slots = minibatch_slots(cfg.prompts_per_step, cfg.num_minibatches, cfg.seed, step, epoch, rt)
    return [micro_batch_rows(ro, cfg.micro_batch_size, (slots == mb).nonzero().flatten().tolist(),
                             cfg.group_by_length) for mb in range(cfg.num_minibatches)]


@torch.no_grad()
def rollout_tensors(pv, ref_model, reward_model, ro, sources, step, rt, cfg) -> dict:
    """Steps 1-4 after sampling: everything computed from the rollout before the update, as this rank's
    row-aligned b_ tensors. pv is the bare PolicyAndValue; reward_model is None without a reward_model term."""
    mb_rows = [rows for mb in epoch_minibatches(ro, step, 0, rt, cfg) for rows in mb]  # the first update's cut
    T, mask = cfg.temperature, ro.response_mask  # (B, N): up to and including the first <|im_end|>
    with rt.autocast():
        b_old_logps = rollout_forward(lambda b: response_logps(pv.policy, b, T), ro, mb_rows)  # (B, N) log π_old
        b_values = rollout_forward(lambda b: response_values(pv.value, b), ro, mb_rows)  # (B, N) V_t
        b_ref_logps = rollout_forward(lambda b: response_logps(ref_model, b, T), ro, mb_rows)  # (B, N) log π_ref
        rm_scores = rollout_forward(lambda b: response_scores(reward_model, b), ro, mb_rows) if reward_model else None
    rewards = source_rewards(sources, ro, rm_scores)  # {name: (B,)} unweighted
    b_scores = sum(s.weight * rewards[s.name] for s in sources).float()  # s = Σ_k w_k r_k
    b_scores = b_scores - cfg.missing_eos_penalty * (~ro.finished).float()
    b_kl = kl_penalty(b_old_logps, b_ref_logps, cfg.kl_estimator).masked_fill(~mask, 0.0)  # (B, N) kl_t
    b_rewards, b_non_score_reward = token_rewards(b_scores, b_kl, mask, cfg.kl_coef)
    if cfg.whiten_rewards:
        b_rewards = whiten_all_ranks(b_rewards, mask, rt, shift_mean=False)
    b_advantages, b_returns = gae(b_rewards, b_values, mask, cfg.gamma, cfg.lam)  # A_t, R_t = A_t + V_t
    return {"old_logps": b_old_logps, "old_values": b_values, "advantages": whiten_all_ranks(b_advantages, mask, rt),
            "returns": b_returns, "scores": b_scores, "kl": b_kl, "non_score_reward": b_non_score_reward,
            "rewards": rewards}


def ppo_loss_sum(model, batch, cfg):
    """One packed micro-batch's PPO loss SUMMED over its response tokens -> (loss_sum, metric_sums, maxima).

    loop.train_step divides loss_sum and every metric sum by the response-token count of the whole
    minibatch (all micro-batches, all ranks), so the optimizer sees the exact token mean of
        ppo_policy_loss + vf_coef · ppo_value_loss
    (normalizer=SUM: the losses return their token sums). maxima: max |π/π_old - 1| over the batch's tokens,
    which must be 0 on the first minibatch (the policy has not moved since the rollout).
    """
    mask = batch["response_mask"]  # (b, n) bool
    logps, values = model(batch, cfg.temperature)  # (b, n) each; the same temperature as the sampler
    pg_loss_sum, pg = ppo_policy_loss(logps, batch["old_logps"], batch["advantages"], mask, cfg.cliprange, normalizer=SUM)
    vf_loss_sum, vf = ppo_value_loss(values, batch["old_values"], batch["returns"], mask, cfg.cliprange_value,
                                     normalizer=SUM)
    n_tokens = mask.sum()
    metric_sums = {"policy_loss": pg_loss_sum.detach(), "value_loss": vf_loss_sum.detach(),  # already token sums
                   "approxkl": pg["approx_kl"] * n_tokens, "clipfrac": pg["clipfrac"] * n_tokens,
                   "ratio": pg["ratio_mean"] * n_tokens, "vf_clipfrac": vf["clipfrac"] * n_tokens}
    ratio_dev = (logps.detach() - batch["old_logps"])[mask].exp().sub(1).abs().max()
    return pg_loss_sum + cfg.vf_coef * vf_loss_sum, metric_sums, {"ratio_max_abs_dev": ratio_dev}


def ppo_update(model, optimizer, scaler, ro, b, step, rt, cfg, stats) -> dict:
    """Step 5: num_ppo_epochs x num_minibatches optimizer steps (fewer once --target_kl is exceeded)."""
    tensors = {k: b[k] for k in ("old_logps", "old_values", "advantages", "returns")}
    minibatches = [rows for epoch in range(cfg.num_ppo_epochs) for rows in epoch_minibatches(ro, step, epoch, rt, cfg)]
    sums, updates, ratio_dev = {}, 0, 0.0
    for mb_rows in minibatches:  # one optimizer step per minibatch
        batches = [packed_batch(ro, rows, **tensors) for rows in mb_rows]
        out = loop.train_step(model, optimizer, scaler, batches, lambda m, mb: ppo_loss_sum(m, mb, cfg),
                                  lambda mb: mb["response_mask"].sum(), rt, cfg.max_grad_norm)
        loop.check_finite(out, step, cfg, stats, scaler)
        if updates == 0:  # the policy has not moved since old_logps: π / π_old must be exactly 1 (all ranks)
            ratio_dev = out.pop("ratio_max_abs_dev")
        out.pop("ratio_max_abs_dev", None)
        for k, v in out.items():
            sums[k] = sums.get(k, 0.0) + v
        updates += 1
        if cfg.target_kl and out["approxkl"] > cfg.target_kl:  # all-reduced: the same decision on every rank
            break
    if ratio_dev > 1e-4 and rt.device.type == "cpu":  # two forwards of the same micro-batches disagree: dropout on?
        raise RuntimeError(f"PPO ratio on the first minibatch deviates from 1 by {ratio_dev:.3g}")
    avg = {k: v / updates for k, v in sums.items()}
    return {"policy/approxkl_avg": avg["approxkl"], "policy/clipfrac_avg": avg["clipfrac"],
            "loss/policy_avg": avg["policy_loss"], "loss/value_avg": avg["value_loss"],
            "val/clipfrac_avg": avg["vf_clipfrac"], "val/ratio": avg["ratio"],  # mean π / π_old over the steps
            "val/ratio_first_max_abs_dev": ratio_dev,  # max |π / π_old - 1| on the first minibatch: must be 0
            "policy/optimizer_steps": updates,  # < num_ppo_epochs x num_minibatches when --target_kl stopped it
            "loss": avg["loss"], "grad_norm": avg["grad_norm"]}


def rollout_metrics(ro, b, sources, rt) -> dict:
    """TRL's objective/ and completion metrics: means over every rank's responses."""
    mask = ro.response_mask
    g = gather_columns({"scores": b["scores"], "kl": b["kl"].sum(-1),
                        "non_score_reward": b["non_score_reward"].sum(-1),
                        "entropy": -b["old_logps"].masked_fill(~mask, 0).sum(-1), "length": ro.lengths,
                        "eos": ro.finished, **{f"rewards/{s.name}/mean": b["rewards"][s.name] for s in sources}}, rt)
    mean = {k: float(v.mean()) for k, v in g.items()}
    metrics = {
        "objective/kl": mean["kl"],  # mean over responses of Σ_t kl_t
        "objective/entropy": mean["entropy"],  # mean of Σ_t -log π_old(y_t): a sampled sequence-entropy estimate
        "objective/non_score_reward": mean["non_score_reward"],  # mean of Σ_t -β kl_t
        "objective/rlhf_reward": mean["scores"] + mean["non_score_reward"],  # what PPO maximizes
        "objective/scores": mean["scores"],  # mean sequence score s (after the missing-eos penalty)
        "completions/mean_length": mean["length"],
        "completions/eos_rate": mean["eos"],  # fraction of responses that ended with <|im_end|>
        "sampler/logp_max_abs_diff": runtime.all_reduce_max(float((b["old_logps"] - ro.logps)[mask].abs().max()), rt),
    }
    if len(sources) > 1:
        metrics.update({f"rewards/{s.name}/mean": mean[f"rewards/{s.name}/mean"] for s in sources})
    return metrics


def main(argv=None):
    cfg = config.parse_config(Config, argv)
    checkpoint.check_out_dir(cfg)  # an out_dir holding a run: --resume or --overwrite, else refused
    rt = runtime.setup(cfg)
    try:
        sources = parse_reward_funcs(cfg.reward_funcs, cfg.reward_weights, model_names=("reward_model",))
    except ValueError as e:
        raise SystemExit(f"train_ppo.py: error: {e}")
    if rt.is_main:
        checkpoint.check_writable(cfg.out_dir)
    tok_path = checkpoint.tokenizer_path_for(cfg.init_from)
    tok = load_tokenizer(tok_path)

    # ---- four models, dropout off in all: policy and value (trained), reference and reward model (frozen)
    policy = lora.from_config(disable_dropout(checkpoint.load_model(cfg.init_from)), cfg, cfg.init_from).to(rt.device)
    ref_model = sft_reference(policy, cfg, rt)  # LoRA: the policy with its adapters off
    reward_model = load_reward_model(cfg.reward_model, rt, "train_ppo.py") if cfg.reward_model else None
    value = disable_dropout(checkpoint.load_model(cfg.reward_model or cfg.init_from, kind="scalar"))
    value, reward_model = value_and_reward(value, reward_model, cfg, cfg.reward_model or cfg.init_from)
    value.to(rt.device)
    ref_model, reward_model = (runtime.shard_frozen(m, rt, cfg) for m in (ref_model, reward_model))  # --shard_frozen
    if value.cfg.vocab_size != policy.cfg.vocab_size:
        raise SystemExit(f"train_ppo.py: error: the reward model's vocabulary ({value.cfg.vocab_size}) differs from "
                         f"the policy's ({policy.cfg.vocab_size})")
    if cfg.max_len > min(policy.cfg.max_seq_len, value.cfg.max_seq_len):
        raise SystemExit(f"train_ppo.py: error: --max_len={cfg.max_len} exceeds the models' max_seq_len")
    runtime.print0(rt, f"policy and reference from {cfg.init_from}: {lora.describe(policy)}; value from "
                       f"{cfg.reward_model or cfg.init_from}: {lora.describe(value)}; score: "
                   + " + ".join(f"{s.weight:g} x {s.name}" for s in sources))

    # ---- data: prompts fit max_len together with the generation budget
    stats = {}
    try:  # before any training: every line has the fields its reward functions read, and some prompt fits
        prompts = load_rl_prompts(cfg.data, tok, cfg.max_len - cfg.max_new_tokens, sources, stats)
    except ValueError as e:
        raise SystemExit(f"train_ppo.py: error: {e}") from None
    runtime.print0(rt, f"data: {len(prompts)} prompts (dropped {stats.get('dropped_prompt_too_long', 0)} longer than "
                       f"{cfg.max_len - cfg.max_new_tokens} tokens); an iteration = {cfg.prompts_per_step} responses, "
                       f"{cfg.num_ppo_epochs} epochs x {cfg.num_minibatches} minibatches (optimizer steps)")

    # ---- one optimizer over policy + value, resume (the value model rides in the checkpoint's extra)
    # (DDP wraps the pair; FSDP shards the policy and the value model, each its own root)
    pv = PolicyAndValue(policy, value)
    model = runtime.wrap_ddp(pv, rt, gradient_checkpointing=cfg.gradient_checkpointing, fsdp=cfg.fsdp)
    optimizer = loop.make_optimizer(pv, cfg, rt)
    scaler = rt.make_scaler()
    start_step = checkpoint.resume(cfg, policy, optimizer, scaler, rt, root=pv, extra_models={"value_model": value})
    log = logger.MetricsLog(cfg.out_dir, rt, start_step if cfg.resume else None, tensorboard=cfg.tensorboard)
    eval_prompts = None  # held-out prompts for the gold rule, loaded before training (too-long ones dropped now)
    if cfg.eval_data and rt.is_main:
        eval_prompts = load_eval_prompts(cfg.eval_data, tok, 0, cfg.eval_max_new_tokens, policy.cfg.max_seq_len)

    # ---- train
    model.train()
    t0 = time.time()
    bar = tqdm(range(start_step, cfg.max_steps), initial=start_step, total=cfg.max_steps, desc="ppo",
               disable=not rt.is_main)
    for step in bar:
        lr = loop.lr_at(step, cfg.lr, cfg.warmup_steps, cfg.max_steps, cfg.min_lr_ratio)
        loop.set_lr(optimizer, lr)
        step_prompts = [prompts[i] for i in step_prompt_indices(len(prompts), step, cfg.prompts_per_step, cfg.seed, rt)]
        # 1. rollout: one response per prompt, no gradients; this rank's prompts start at global position rank * share
        with rt.autocast(), lora.merged_for_sampling(policy), runtime.gathered(pv):  # LoRA merged; FSDP gathered
            ro = sample_rollout(policy, tok, step_prompts, 1, cfg.max_new_tokens, cfg.temperature, cfg.seed, step,
                                rt.rank * len(step_prompts), cfg.prompts_per_generate)
            # 2-4. old log-probs, reference, values, scores, per-token rewards, GAE; 5. the PPO epochs
            b = rollout_tensors(pv, ref_model, reward_model, ro, sources, step, rt, cfg)
        metrics = {**rollout_metrics(ro, b, sources, rt), "episode": (step + 1) * cfg.prompts_per_step,
                   **ppo_update(model, optimizer, scaler, ro, b, step, rt, cfg, stats)}
        bar.set_postfix(score=f"{metrics['objective/scores']:.3f}", kl=f"{metrics['objective/kl']:.2f}")
        if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.max_steps:
            log.log(step + 1, {**metrics, "learning_rate": lr, **loop.skip_counts(stats)}, bar)
        if cfg.eval_data and cfg.gold_eval_every and (step + 1) % cfg.gold_eval_every == 0 and step + 1 < cfg.max_steps:
            with runtime.gathered(pv, ref_model, reward_model):  # --fsdp: rank 0 alone, on the gathered weights
                if eval_prompts:  # + the RM's score of the same samples
                    log.log(step + 1, gold_point(policy, tok, eval_prompts[: cfg.gold_eval_prompts],
                                                 cfg.eval_max_new_tokens, ref_model, reward_model=reward_model), bar)
        if checkpoint.should_save(step + 1, start_step, cfg):
            checkpoint.save(cfg.out_dir, model=policy, optimizer=optimizer, scaler=scaler, step=step + 1, cfg=cfg,
                            tokenizer_path=tok_path, finished=step + 1 == cfg.max_steps, rt=rt,
                            extra=checkpoint.extra_model("value_model", value), root=pv)
        if checkpoint.should_stop(step + 1, start_step, cfg):
            runtime.print0(rt, f"stopping after {cfg.stop_after_steps} iterations as asked; continue with --resume")
            runtime.cleanup(rt)
            return
    bar.close()
    runtime.print0(rt, f"trained {cfg.max_steps - start_step} iterations in {time.time() - t0:.0f}s")

    # ---- evaluate with the gold rule, KL measured against the SFT reference
    with runtime.gathered(pv, ref_model):  # --fsdp: rank 0 evaluates alone on the gathered weights
        if cfg.eval_data and rt.is_main:
            res = evaluate_policy(policy.eval(), tok, eval_prompts[: cfg.eval_prompts or None],
                                  cfg.eval_max_new_tokens, ref_model)
            checkpoint.write_json(res, f"{cfg.out_dir}/eval.json")
            log.log(cfg.max_steps, {k: v for k, v in res.items() if k != "examples"})
            print(f"ppo eval on {res['n_prompts']} held-out prompts: {format_result(res)}")
    runtime.cleanup(rt)


if __name__ == "__main__":
    run_cli(main)
