"""GRPO and the REINFORCE family (RLOO, REINFORCE++, ReMax): online RL without a value model.

Each step (Shao et al. 2024, "DeepSeekMath", Sec. 4.1; see minialign.algorithms.losses.grpo_loss):
  1. take `prompts_per_step` prompts (split over ranks) and sample G = `num_generations` responses
     to each with the KV-cache sampler at `temperature` (minialign.algorithms.rollout);
  2. reward each response: r = sum_k w_k r_k over `--reward_funcs` (rules, minialign.algorithms.reward_funcs) and
     optionally a trained reward model (`--reward_funcs ... reward_model --reward_model out/rm`);
  3. advantages, `--advantage_estimator` (minialign.algorithms.losses), from the rewards of the whole step (all ranks):
        grpo          A_i = (r_i - mean_G(r)) / (std_G(r) + eps)          (`--scale_rewards`; Shao et al. 2024)
        rloo          A_i = R_i - mean_{j≠i} R_j, R = r - β Σ_t k1_t        (leave-one-out; Ahmadian et al. 2024)
        reinforce_pp  A_t = r - β Σ_{t'>=t} k1_t', normalized over the global batch, no baseline (Hu 2025)
        remax         A_i = r_i - r(greedy response to the same prompt)   (one extra greedy generation; Li et al. 2023)
  4. `num_iterations` (μ) optimizer updates on this rollout, each minimizing over the step's tokens
        -min(ratio · A, clip(ratio, 1 - ε_low, 1 + ε_high) · A) + β · KL_k(π ‖ π_ref)    (KL in the loss),
        ratio = π(y_t) / π_old(y_t)
     where π_ref is the SFT model (built only when β > 0) and π_old the policy that sampled, computed
     by the TRAINING forward at the sampling temperature: with μ = 1 it is this update's own forward,
     detached; with μ > 1 a no-grad forward over the same micro-batches before the first update. So
     the first update's ratio is exactly 1, under autocast too (ratio/first_iteration_max_abs_dev);
     the sampler's own log-probs differ by rounding and are only compared (sampler/logp_max_abs_diff).
     The reduction over tokens is `--loss_type` (grpo | dapo | dr_grpo; unset: dr_grpo with the KL in the
     reward, grpo otherwise), normalized by the count of the WHOLE step over micro-batches and ranks (see
     `grpo_loss_sum`).
Where the KL goes (`--kl_in`, β > 0; TRL #4967, OpenRLHF #1309; the derivations in minialign.algorithms.losses
kl_penalty / kl_reward): in the LOSS, k3's gradient is the FORWARD KL's (k1's is 0, k2's the reverse KL's
on-policy); in the REWARD, -β·k1_t per token gives the gradient of E[r] - β KL(π ‖ π_ref) only with a constant
normalizer (--loss_type dr_grpo, the default there) and every response counted.
Speed: each prompt is prefilled once for its G samples, and every training forward packs a prompt's G responses
into one row [x | y_1 | ... | y_G] (minialign.algorithms.packing): the prompt is computed once, not G times.
A group whose rewards are all equal has zero advantages (grpo, rloo); when every advantage is 0 (and no KL loss)
there is nothing to learn and the update is skipped (logged as update_skipped), rather than letting
Adam's momentum move the weights on a zero gradient. Responses cut off at max_new_tokens get no loss
by default (--mask_truncated_completions): the gold rule does not read past a refusal or a benign
answer's first words, so a response that rambles on to the budget is rewarded in full (see the flag; remax
refuses it, pass --no-mask_truncated_completions: its advantages r_i - r(greedy) are mostly <= 0, and a
truncated response would escape them; measured with the mask: gold 0.52 at KL 70.8, without it 0.95).
Dropout is off in every model (RL needs the same log-probs in every forward); an MoE policy gets its
load-balancing loss from loop.train_step.

Run on one device:         python train_grpo.py                 (out/sft + data/rl_train.jsonl -> out/grpo)
Run on N processes / GPUs: torchrun --nproc_per_node=N train_grpo.py   (prompts_per_step split over ranks)
Other rewards:             python train_grpo.py --reward_funcs gold format --reward_weights 1.0 0.1
RLOO, and what it writes:  python train_grpo.py --advantage_estimator rloo --log_completions_every 10
GSM8K-style prompts:       python train_grpo.py --data gsm8k.jsonl --reward_funcs gsm8k --eval_data ''
With LoRA:                 python train_grpo.py --lora_r 8 --lr 3e-3   (gold 0.950, full 0.955; reference: adapters off)
At the end the policy is scored with the default task's gold rule on data/rl_eval.jsonl (eval.json),
with the KL to the SFT model it started from.

Simplified on purpose: one rollout per step (its μ updates use all of it, not shuffled minibatches);
no dynamic sampling (DAPO's refilling of zero-signal groups), no vLLM, no reward-model ensembling.
"""

import time
from dataclasses import dataclass

import torch
from tqdm import tqdm

from minialign.algorithms.advantages import (advantages_per_token, completion_mask, count_units, default_loss_type,
                                             greedy_rewards, rollout_metrics, step_advantages)
from minialign.algorithms.losses import (ADVANTAGE_ESTIMATORS, GROUP_SCALES, GRPO_LOSS_TYPES, SUM, grpo_loss,
                                         policy_gradient_loss)
from minialign.algorithms.packing import response_logps, response_scores
from minialign.algorithms.reward_funcs import parse_reward_funcs
from minialign.algorithms.roles import disable_dropout, load_reward_model, sft_reference
from minialign.algorithms.rollout import (greedy_rollout, load_rl_prompts, micro_batch_rows, packed_batch,
                                          rollout_forward, sample_rollout, source_rewards, step_prompt_indices)
from minialign.data.tokenizer import load_tokenizer
from minialign.errors import run_cli
from minialign.evaluation.evaluate import evaluate_policy, format_result, gold_point, load_eval_prompts
from minialign.models import lora
from minialign.training import checkpoint, config, logger, loop, runtime
from minialign.training.config import (FSDPConfig, GoldCurveConfig, OnlineLoRAConfig, SequenceBatch, TrainConfig,
                                       at_least, knob, non_negative, one_of, positive, rl_problems)
from minialign.training.logger import completions_log, log_completions
from minialign.training.runtime import gather_columns


@dataclass
class Config(TrainConfig, SequenceBatch, GoldCurveConfig, OnlineLoRAConfig, FSDPConfig):
    out_dir: str = knob("out/grpo", "output folder")
    init_from: str = knob("out/sft", "policy (and reference) checkpoint to start from",
                          (bool, "is required (GRPO starts from an SFT policy, e.g. out/sft)"))
    data: str = knob("data/rl_train.jsonl", "prompts (JSONL: {prompt}, {messages} or GSM8K {question, answer}); "
                                            "other keys are reward fields")
    reward_funcs: list[str] = knob(["gold"], "reward terms: gold | format | length | gsm8k (minialign.algorithms.reward_funcs) | "
                                             "reward_model (needs --reward_model)")
    reward_weights: list[float] = knob([], "one weight per --reward_funcs entry (empty = all 1.0)")
    reward_model: str = knob("", "trained reward model folder (train_rm.py output) for the reward_model term")
    prompts_per_step: int = knob(16, "prompts per optimizer step, over all ranks")
    num_generations: int = knob(8, "G: responses sampled per prompt (the group)",
                                (lambda v: v >= 2, "must be >= 2 (a group of one has no baseline)"))
    max_new_tokens: int = knob(32, "generation budget (default-task responses are <= ~25 tokens)", at_least(1))
    temperature: float = knob(1.0, "sampling temperature, also used for every training log-prob "
                                   "(the policy gradient needs sampled log-probs)", positive)
    prompts_per_generate: int = knob(0, "prompts per generate() call (0 = all of the rank's); make it divide each "
                                        "rank's share to get the same rollouts with any number of ranks", non_negative)
    num_iterations: int = knob(1, "μ: optimizer updates per rollout (1 = on-policy; > 1 reuses it with the clipped "
                                  "ratio)", at_least(1))
    loss_type: str | None = knob(None, "grpo (per-sequence token mean) | dapo (token mean over the step) | dr_grpo "
                                       "(tokens / (sequences x max_new_tokens)); unset = dr_grpo when β·KL is in the "
                                       "reward (its gradient is unbiased only with a constant normalizer), else grpo",
                                 one_of(*GRPO_LOSS_TYPES))
    advantage_estimator: str = knob("grpo", "baseline: grpo (group mean, std) | rloo (mean of the other G-1) | "
                                            "reinforce_pp (none; returns-to-go normalized over the global batch) | "
                                            "remax (greedy response's reward; refused without "
                                            "--no-mask_truncated_completions)",
                                    one_of(*ADVANTAGE_ESTIMATORS))
    scale_rewards: str = knob("group", "grpo's advantage scale: group std (GRPO) | batch std | none (Dr. GRPO)",
                              one_of(*GROUP_SCALES))
    epsilon_low: float = knob(0.2, "ratio clip below: 1 - epsilon_low", (lambda v: 0 <= v < 1, "must be in [0, 1)"))
    epsilon_high: float = knob(0.2, "ratio clip above: 1 + epsilon_high (DAPO's clip-higher uses 0.28)", non_negative)
    beta: float = knob(0.0, "β of the KL to the SFT reference (see --kl_in); 0 = no reference model", non_negative)
    kl_in: str = knob("auto", "where β·KL enters: loss (--kl_estimator; k3's gradient is biased, it descends the "
                              "forward KL) | reward (-β·k1_t per token: unbiased for the reverse KL under a constant "
                              "normalizer, --loss_type dr_grpo, its default there; TRL #4967, OpenRLHF #1309) | "
                              "auto = as each paper: loss for grpo, reward for the others",
                      one_of("auto", "loss", "reward"))
    kl_estimator: str = knob("auto", "KL estimate in the loss: k1 (zero gradient in expectation) | k2 (reverse-KL "
                                     "gradient on-policy) | k3 (GRPO's; forward-KL gradient) | auto = k3 in the "
                                     "loss, k1 in the reward (the only one it takes)", one_of("auto", "k1", "k2", "k3"))
    mask_truncated_completions: bool = knob(True, "responses that hit max_new_tokens without <|im_end|> get no loss "
                                                  "(DAPO). The harmful and benign rules do not read past a response's "
                                                  "first words, so rambling to the budget is rewarded; measured at the "
                                                  "defaults: KL to SFT 2.2 nats with the mask, 5.8 without, same gold; "
                                                  "remax refuses it (gold 0.52 at KL 70.8 on, 0.95 off; see the "
                                                  "docstring)")
    max_steps: int = knob(150, "optimizer steps (= rollouts; each does num_iterations updates)", at_least(1))
    lr: float = knob(5e-4, "peak learning rate (measured on the default task: 1e-3 drifts further from SFT and "
                           "scores lower)", positive)
    warmup_steps: int = knob(5, "linear warmup steps", non_negative)
    micro_batch_size: int = knob(64, "responses per forward pass per rank, as whole groups (at least one): "
                                     "micro_batch_size // G packed rows [x | y_1 | ... | y_G]", at_least(1))
    log_every: int = knob(5, "log metrics every N steps", at_least(1))
    log_completions_every: int = knob(0, "every N steps append each completion, its rewards, advantage and length to "
                                         "out_dir/completions.jsonl (all ranks) and print 3 (0 = off)", non_negative)
    eval_max_new_tokens: int = knob(48, "generation length for the evaluation (48, as for SFT)", at_least(1))

    def resolve(self):  # the effective --loss_type, printed and saved with the config
        if self.loss_type is None:
            self.loss_type = default_loss_type(self.kl_placement() == "reward" and self.beta > 0)

    def kl_placement(self) -> str:  # "loss" or "reward": --kl_in with auto resolved for the estimator
        return self.kl_in if self.kl_in != "auto" else ("loss" if self.advantage_estimator == "grpo" else "reward")

    def loss_kl(self) -> tuple[float, str]:  # (β, estimator) of the LOSS's KL term; β = 0: none (or in the reward)
        beta = self.beta if self.kl_placement() == "loss" else 0.0
        return beta, "k3" if self.kl_estimator == "auto" else self.kl_estimator

    def per_token_advantages(self) -> bool:  # as minialign.algorithms.advantages.step_advantages returns them
        return advantages_per_token(self.advantage_estimator, self.beta > 0 and self.kl_placement() == "reward")

    def problems(self, world_size: int) -> list[str]:
        out = rl_problems(self, world_size)
        if self.scale_rewards != "group" and self.advantage_estimator != "grpo":
            out.append(f"--scale_rewards={self.scale_rewards} is read by --advantage_estimator grpo only")
        if self.kl_placement() == "reward" and self.kl_estimator not in ("auto", "k1"):
            out.append(f"--kl_estimator={self.kl_estimator} with the KL in the reward (--kl_in): the reward takes k1 "
                       "only (a detached k2 or k3 reward does not give the KL's gradient); use --kl_in loss")
        if self.advantage_estimator == "remax" and self.mask_truncated_completions:
            out.append("--advantage_estimator remax with --mask_truncated_completions (the default) is refused: ReMax's "
                       "advantages r_i - r(greedy) are not centred, so a truncated response escapes its (mostly "
                       "negative) advantage and the policy drifts to truncation (measured: gold 0.52 at KL 70.8 against "
                       "0.95 without the mask); pass --no-mask_truncated_completions")
        return out


def grpo_loss_sum(model, batch, cfg):
    """One packed micro-batch's GRPO loss as a SUM over its counted units -> (loss_sum, metric_sums).

    Normalization, written once. loop.train_step divides every micro-batch's returned loss by the
    count of units of the WHOLE step (all micro-batches, all ranks; `count_units`), so we return
    grpo_loss with a normalizer that leaves exactly that division to do:
        loss_type  loss of the step                            unit counted        normalizer here
        grpo       1/S · Σ_i 1/|o_i| Σ_t ℓ_it                  S sequences         1
        dapo       1/T · Σ_i Σ_t ℓ_it                          T tokens            1
        dr_grpo    1/(S · L) · Σ_i Σ_t ℓ_it                    S sequences         L = max_new_tokens
    where a sequence counts when it has at least one counted token (grpo_loss's convention), ℓ is the
    per-token clipped objective + β k (KL in the loss), and S, T are over the step. The metrics (clip ratios, kl) are
    returned as sums over tokens; the caller rescales them to token means. Also returned, as maxima over the
    batch's tokens for the first-update checks: |π/π_old - 1| and |log π - log π_sampler|.
    """
    logps = response_logps(model, batch, cfg.temperature)  # (r, n) float32: the packed training forward
    old_logps = batch["old_logps"] if "old_logps" in batch else logps.detach()  # μ = 1: π_old is this forward
    m = batch["response_mask"]
    maxima = {"ratio_max_abs_dev": (logps.detach() - old_logps)[m].exp().sub(1).abs().max(),
              "sampler_logp_max_abs_diff": (logps.detach() - batch["sampler_logps"])[m].abs().max()}
    normalizer = cfg.max_new_tokens if cfg.loss_type == "dr_grpo" else SUM
    beta, kl_estimator = cfg.loss_kl()  # β = 0 when the KL is in the reward
    # one advantage per response (grpo, rloo, remax with the KL in the loss) or per token (reinforce_pp, or the KL
    # in the reward: A_t is a return-to-go); grpo_loss broadcasts the first over the response's tokens
    loss_fn = policy_gradient_loss if cfg.per_token_advantages() else grpo_loss
    loss_sum, metrics = loss_fn(logps, old_logps, batch.get("ref_logps"), batch["advantages"], batch["loss_mask"],
                                epsilon_low=cfg.epsilon_low, epsilon_high=cfg.epsilon_high, beta=beta,
                                loss_type=cfg.loss_type, max_new_tokens=cfg.max_new_tokens,
                                normalizer=normalizer, kl_estimator=kl_estimator)
    n_tokens = batch["loss_mask"].sum()
    return loss_sum, {k: v * n_tokens for k, v in metrics.items()}, maxima


def grpo_batches(ro, sources, reward_model, ref_model, rt, cfg, policy=None, greedy=None) -> tuple[list[dict], dict]:
    """Rewards (gathered over ranks), advantages, and the reference log-probs (KL in the loss) or per-token k1
    (KL in the reward; `policy` gives log π_old) of a rollout -> (the packed micro-batches the updates train on,
    the step's per-response statistics over all ranks by name). greedy: ReMax's greedy rollout, or None."""
    mb_rows = micro_batch_rows(ro, cfg.micro_batch_size, by_length=cfg.group_by_length)  # whole groups
    rm_scores = b_ref_logps = b_kl = None
    with rt.autocast():
        if reward_model is not None:
            rm_scores = rollout_forward(lambda b: response_scores(reward_model, b), ro, mb_rows)  # (R,)
        if ref_model is not None:
            b_ref_logps = rollout_forward(lambda b: response_logps(ref_model, b, cfg.temperature), ro, mb_rows)
        if ref_model is not None and cfg.kl_placement() == "reward":  # k1_t = log π_old(y_t) - log π_ref(y_t)
            b_old_logps = rollout_forward(lambda b: response_logps(policy, b, cfg.temperature), ro, mb_rows)
            b_kl = (b_old_logps - b_ref_logps).masked_fill(~ro.response_mask, 0.0)  # (R, N)
    rewards = source_rewards(sources, ro, rm_scores)  # {name: (R,)}, unweighted
    columns = {**{f"rewards/{k}": v for k, v in rewards.items()}, "length": ro.lengths, "finished": ro.finished}
    g = gather_columns({**columns, **({"kl": b_kl.sum(-1)} if b_kl is not None else {})}, rt)  # all ranks
    g["reward"] = sum(s.weight * g[f"rewards/{s.name}"] for s in sources)  # r = Σ_k w_k r_k
    if greedy is not None:
        g["greedy_reward"] = greedy_rewards(greedy, sources, reward_model, rt, cfg.micro_batch_size)
    loss_mask = completion_mask(ro.response_mask, ro.finished, cfg.mask_truncated_completions)
    b_advantages = step_advantages(g, b_kl, loss_mask, rt, cfg.advantage_estimator, cfg.num_generations,
                                   cfg.scale_rewards, cfg.beta)  # (R,) or per token (R, N), over all ranks' rows
    tensors = {"loss_mask": loss_mask, "advantages": b_advantages, "sampler_logps": ro.logps}
    if b_ref_logps is not None and b_kl is None:
        tensors["ref_logps"] = b_ref_logps
    return [packed_batch(ro, rows, **tensors) for rows in mb_rows], g


def grpo_update(model, optimizer, scaler, batches, step, rt, cfg, stats) -> dict:
    """num_iterations optimizer steps on the rollout's micro-batches (none when nothing can be learned)."""
    counts = runtime.all_reduce_sum_dict({
        "units": sum(float(count_units(b, cfg.loss_type)) for b in batches),
        "tokens": sum(float(b["loss_mask"].sum()) for b in batches),
        "signal": sum(float(((b["advantages"] != 0).view(len(b["loss_mask"]), -1) & b["loss_mask"]).any(-1).sum())
                      for b in batches),  # responses with a nonzero advantage at a counted token
    }, rt)
    kl_loss = cfg.loss_kl()[0] > 0
    skip = counts["units"] == 0 or (counts["signal"] == 0 and not kl_loss)  # the same decision on every rank
    if cfg.num_iterations > 1 and not skip:  # π_old: the same training-layout forward, before any update
        with torch.no_grad(), rt.autocast():
            for b in batches:
                b["old_logps"] = response_logps(runtime.unwrap(model), b, cfg.temperature)
    sums, updates, first = {}, 0, {"ratio_dev": 0.0, "sampler_diff": 0.0}
    for it in range(0 if skip else cfg.num_iterations):
        out = loop.train_step(model, optimizer, scaler, batches, lambda m, b: grpo_loss_sum(m, b, cfg),
                                  lambda b: count_units(b, cfg.loss_type), rt, cfg.max_grad_norm)
        loop.check_finite(out, step, cfg, stats, scaler)
        ratio_dev, sampler_diff = out.pop("ratio_max_abs_dev"), out.pop("sampler_logp_max_abs_diff")
        if it == 0:  # the policy had not moved: ratio = π / π_old must be exactly 1 (maxima over all ranks)
            first = {"ratio_dev": ratio_dev, "sampler_diff": sampler_diff}
        for k, v in out.items():
            sums[k] = sums.get(k, 0.0) + v
        updates += 1
    if first["ratio_dev"] > 1e-4 and rt.device.type == "cpu":
        raise RuntimeError(f"GRPO ratio on the first update deviates from 1 by {first['ratio_dev']:.3g}: two training "
                           "forwards of the same micro-batches disagree (dropout on? a nondeterministic kernel?)")
    metrics = {k: v / max(updates, 1) for k, v in sums.items()}
    to_token_mean = counts["units"] / counts["tokens"] if counts["tokens"] else 0.0  # train_step divided by units
    for k in ("clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean") + (("kl",) if kl_loss else ()):
        metrics[k] = metrics.get(k, 0.0) * to_token_mean
    return {"loss": metrics.get("loss", 0.0), "grad_norm": metrics.get("grad_norm", 0.0), **metrics,
            "ratio/first_iteration_max_abs_dev": first["ratio_dev"],  # must be 0
            "sampler/logp_max_abs_diff": first["sampler_diff"],  # KV-cache sampler vs training forward (rounding)
            "update_skipped": float(skip)}


def main(argv=None):
    cfg = config.parse_config(Config, argv)
    checkpoint.check_out_dir(cfg)  # an out_dir holding a run: --resume or --overwrite, else refused
    rt = runtime.setup(cfg)
    try:
        sources = parse_reward_funcs(cfg.reward_funcs, cfg.reward_weights, model_names=("reward_model",))
    except ValueError as e:
        raise SystemExit(f"train_grpo.py: error: {e}")
    if rt.is_main:
        checkpoint.check_writable(cfg.out_dir)
    tok_path = checkpoint.tokenizer_path_for(cfg.init_from)
    tok = load_tokenizer(tok_path)

    # ---- models: policy; reference only when beta > 0; reward model only when asked for; dropout off in all
    policy = lora.from_config(disable_dropout(checkpoint.load_model(cfg.init_from)), cfg, cfg.init_from).to(rt.device)
    ref_model = sft_reference(policy, cfg, rt) if cfg.beta > 0 else None  # LoRA: the policy, adapters off
    reward_model = load_reward_model(cfg.reward_model, rt, "train_grpo.py") if cfg.reward_model else None
    ref_model, reward_model = (runtime.shard_frozen(m, rt, cfg) for m in (ref_model, reward_model))  # --shard_frozen
    if reward_model is not None and reward_model.cfg.vocab_size != policy.cfg.vocab_size:
        raise SystemExit(f"train_grpo.py: error: the reward model's vocabulary ({reward_model.cfg.vocab_size}) differs "
                         f"from the policy's ({policy.cfg.vocab_size})")
    if cfg.max_len > policy.cfg.max_seq_len:
        raise SystemExit(f"train_grpo.py: error: --max_len={cfg.max_len} exceeds the model's "
                         f"max_seq_len={policy.cfg.max_seq_len}")
    kl = f" (KL in the {cfg.kl_placement()}, {cfg.loss_kl()[1] if cfg.kl_placement() == 'loss' else 'k1'})"
    ref = ("adapters off" if cfg.lora_r else "frozen copy of " + cfg.init_from) + kl
    runtime.print0(rt, f"policy from {cfg.init_from}: {lora.describe(policy)}; reference: "
                       f"{ref if ref_model is not None else 'none (beta = 0)'}; "
                       f"advantages: {cfg.advantage_estimator}; loss_type: {cfg.loss_type}; reward: "
                   + " + ".join(f"{s.weight:g} x {s.name}" for s in sources))

    # ---- data: prompts fit max_len together with the generation budget
    stats = {}
    try:  # before any training: every line has the fields its reward functions read, and some prompt fits
        prompts = load_rl_prompts(cfg.data, tok, cfg.max_len - cfg.max_new_tokens, sources, stats)
    except ValueError as e:
        raise SystemExit(f"train_grpo.py: error: {e}") from None
    share = cfg.prompts_per_step // rt.world_size
    groups_per_micro_batch = max(1, cfg.micro_batch_size // cfg.num_generations)
    runtime.print0(rt, f"data: {len(prompts)} prompts (dropped {stats.get('dropped_prompt_too_long', 0)} longer than "
                       f"{cfg.max_len - cfg.max_new_tokens} tokens); a step = {cfg.prompts_per_step} prompts x "
                       f"G={cfg.num_generations} = {cfg.prompts_per_step * cfg.num_generations} responses ({share} "
                       f"packed rows per rank, {-(-share // groups_per_micro_batch)} micro-batches), "
                       f"{cfg.num_iterations} update(s) each; {cfg.max_steps} steps = "
                       f"{cfg.max_steps * cfg.prompts_per_step / len(prompts):.2f} epochs of prompts")

    # ---- DDP or FSDP, optimizer, resume (the sampler needs no state: it is seeded from (seed, step), see
    # minialign.algorithms.rollout)
    model = runtime.wrap_ddp(policy, rt, gradient_checkpointing=cfg.gradient_checkpointing, fsdp=cfg.fsdp)
    optimizer = loop.make_optimizer(policy, cfg, rt)
    scaler = rt.make_scaler()
    start_step = checkpoint.resume(cfg, policy, optimizer, scaler, rt)
    log = logger.MetricsLog(cfg.out_dir, rt, start_step if cfg.resume else None, tensorboard=cfg.tensorboard)
    completions = completions_log(cfg.out_dir, rt, start_step if cfg.resume else None)  # rank 0's path

    # ---- held-out prompts for the gold rule, loaded before training (too-long ones dropped and counted now);
    # with --gold_eval_every rank 0 also scores the policy against the SFT model as it trains
    eval_prompts = gold_ref = None
    if cfg.eval_data and rt.is_main:
        eval_prompts = load_eval_prompts(cfg.eval_data, tok, 0, cfg.eval_max_new_tokens, policy.cfg.max_seq_len)
        if cfg.gold_eval_every:
            gold_ref = ref_model if ref_model is not None else sft_reference(policy, cfg, rt)

    model.train()
    t0 = time.time()
    bar = tqdm(range(start_step, cfg.max_steps), initial=start_step, total=cfg.max_steps, desc="grpo",
               disable=not rt.is_main)
    for step in bar:
        lr = loop.lr_at(step, cfg.lr, cfg.warmup_steps, cfg.max_steps, cfg.min_lr_ratio)
        loop.set_lr(optimizer, lr)
        step_prompts = [prompts[i] for i in step_prompt_indices(len(prompts), step, cfg.prompts_per_step, cfg.seed, rt)]
        # 1. rollout: G responses per prompt, no gradients; this rank's prompts start at global position rank * share
        with rt.autocast(), lora.merged_for_sampling(policy), runtime.gathered(policy):  # LoRA merged; FSDP gathered
            ro = sample_rollout(policy, tok, step_prompts, cfg.num_generations, cfg.max_new_tokens, cfg.temperature,
                                cfg.seed, step, rt.rank * share, cfg.prompts_per_generate)
            greedy = (greedy_rollout(policy, tok, step_prompts, cfg.max_new_tokens, cfg.prompts_per_generate)
                      if cfg.advantage_estimator == "remax" else None)  # ReMax's baseline, one per prompt (untrained)
        # 2-3. rewards, advantages, reference log-probs or KL rewards, packed micro-batches; 4. the μ updates
        batches, g = grpo_batches(ro, sources, reward_model, ref_model, rt, cfg, policy, greedy)
        metrics = {**grpo_update(model, optimizer, scaler, batches, step, rt, cfg, stats),
                   **rollout_metrics(g, sources, cfg.num_generations)}
        bar.set_postfix(reward=f"{metrics['reward']:.3f}")
        if cfg.log_completions_every and (step + 1) % cfg.log_completions_every == 0:
            log_completions(completions, step + 1, ro, g, sources, rt, bar)
        if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.max_steps:
            log.log(step + 1, {**metrics, "learning_rate": lr, **loop.skip_counts(stats)}, bar)
        if cfg.eval_data and cfg.gold_eval_every and (step + 1) % cfg.gold_eval_every == 0 and step + 1 < cfg.max_steps:
            with runtime.gathered(policy, ref_model, reward_model):  # --fsdp: rank 0 alone, on gathered weights
                if gold_ref is not None:  # + the RM's score of the same samples when GRPO has a reward model
                    log.log(step + 1, gold_point(policy, tok, eval_prompts[: cfg.gold_eval_prompts],
                                                 cfg.eval_max_new_tokens, gold_ref, reward_model=reward_model), bar)
        if checkpoint.should_save(step + 1, start_step, cfg):
            checkpoint.save(cfg.out_dir, model=policy, optimizer=optimizer, scaler=scaler, step=step + 1, cfg=cfg,
                            tokenizer_path=tok_path, finished=step + 1 == cfg.max_steps, rt=rt)
        if checkpoint.should_stop(step + 1, start_step, cfg):
            runtime.print0(rt, f"stopping after {cfg.stop_after_steps} steps as asked; continue with --resume")
            runtime.cleanup(rt)
            return
    bar.close()
    runtime.print0(rt, f"trained {cfg.max_steps - start_step} steps in {time.time() - t0:.0f}s")

    # ---- evaluate with the gold rule, KL measured against the SFT model we started from (if already loaded)
    with runtime.gathered(policy, ref_model):  # --fsdp: rank 0 evaluates alone on the gathered weights
        if cfg.eval_data and rt.is_main:
            ref = gold_ref if gold_ref is not None else ref_model
            if ref is None:
                ref = sft_reference(policy, cfg, rt)
            res = evaluate_policy(policy.eval(), tok, eval_prompts[: cfg.eval_prompts or None],
                                  cfg.eval_max_new_tokens, ref)
            checkpoint.write_json(res, f"{cfg.out_dir}/eval.json")
            log.log(cfg.max_steps, {k: v for k, v in res.items() if k != "examples"})
            print(f"grpo eval on {res['n_prompts']} held-out prompts: {format_result(res)}")
    runtime.cleanup(rt)


if __name__ == "__main__":
    run_cli(main)
