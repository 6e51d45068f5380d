"""GRPO: online RL without a value model, the baseline being the other completions for the same prompt.

Each step (Shao et al. 2024, "DeepSeekMath", Sec. 4.1; see minialign.losses.grpo_loss):
  1. take `prompts_per_step` prompts (split over ranks) and sample G = `num_generations` responses
     to each with the KV-cache sampler at `temperature` (minialign.rollout);
  2. reward each response: r = sum_k w_k r_k over `--reward_funcs` (rules, minialign.rewards) and
     optionally a trained reward model (`--reward_funcs ... reward_model --reward_model out/rm`);
  3. advantages relative to the group: A_i = (r_i - mean_G(r)) / (std_G(r) + eps)  (`--scale_rewards`);
  4. `num_iterations` (μ) optimizer updates on this rollout, each minimizing over the step's tokens
        -min(ratio · A, clip(ratio, 1 - ε_low, 1 + ε_high) · A) + β · KL_k3(π ‖ π_ref),
        ratio = π(y_t) / π_old(y_t)
     where π_old are the sampler's log-probs (same temperature as training, so ratio = 1 on the first
     update: logged as ratio/first_iteration_max_abs_dev) and π_ref is the SFT model, built only when
     β > 0. The reduction over tokens is `--loss_type` (grpo | dapo | dr_grpo), normalized by the
     count of the WHOLE step over micro-batches and ranks (see `grpo_loss_sum`).
Speed: each prompt is prefilled once for its G samples, and the training forwards (policy, and the
reference when β > 0) pack a prompt's G responses into one row [x | y_1 | ... | y_G] (`--layout
shared_prompt`, minialign.rollout.group_logps), so the prompt is computed once, not G times; the
log-probs equal the one-row-per-response layout's (`--layout rows`) to float error.
A group whose rewards are all equal has zero advantages; when every group is like that (and β = 0)
there is nothing to learn and the update is skipped (logged as update_skipped), rather than letting
Adam's momentum move the weights on a zero gradient. Responses cut off at max_new_tokens get no loss
by default (--mask_truncated_completions): the gold rule does not read past a refusal or a benign
answer's first words, so a response that rambles on to the budget is rewarded in full (see the flag).

Run on one device:         python train_grpo.py                 (out/sft + data/rl_train.jsonl -> out/grpo)
Run on N processes / GPUs: torchrun --nproc_per_node=N train_grpo.py   (prompts_per_step split over ranks)
Other rewards:             python train_grpo.py --reward_funcs gold format --reward_weights 1.0 0.1
GSM8K-style prompts:       python train_grpo.py --data gsm8k.jsonl --reward_funcs gsm8k --eval_data ''
At the end the policy is scored with the default task's gold rule on data/rl_eval.jsonl (eval.json),
with the KL to the SFT model it started from.

Simplified on purpose: one rollout per step (its μ updates use all of it, not shuffled minibatches);
no dynamic sampling (DAPO's refilling of zero-signal groups), no vLLM, no reward-model ensembling.
"""

import time
from dataclasses import dataclass

import torch
from tqdm import tqdm

from minialign import engine
from minialign.engine import TrainConfig, knob
from minialign.evaluate import evaluate_policy, format_result, gold_point, load_eval_prompts
from minialign.losses import GRPO_LOSS_TYPES, GROUP_SCALES, group_advantages, grpo_loss
from minialign.rewards import compute_rewards, parse_reward_funcs
from minialign.rollout import (all_gather_rows, all_reduce_max, frozen, load_reward_model, load_rl_prompts, micro_batches,
                               policy_logps, reward_fields, reward_model_scores, rows_per_micro_batch, rollout_logps, sample_rollout, step_prompt_indices)
from minialign.tokenizer import Tokenizer


@dataclass
class Config(TrainConfig):
    init_from: str = knob("out/sft", "policy (and reference) checkpoint to start from")
    data: str = knob("data/rl_train.jsonl", "prompts (JSONL: {prompt}, {messages} or GSM8K {question, answer}); other keys are reward fields")
    reward_funcs: list[str] = knob(["gold"], "reward terms: gold | format | length | gsm8k (minialign.rewards) | reward_model (needs --reward_model)")
    reward_weights: list[float] = knob([], "one weight per --reward_funcs entry (empty = all 1.0)")
    reward_model: str = knob("", "trained reward model folder (train_rm.py output) for the reward_model term")
    prompts_per_step: int = knob(16, "prompts per optimizer step, over all ranks")
    num_generations: int = knob(8, "G: responses sampled per prompt (the group)")
    max_new_tokens: int = knob(32, "generation budget (default-task responses are <= ~25 tokens)")
    temperature: float = knob(1.0, "sampling temperature, also used for every training log-prob")
    prompts_per_generate: int = knob(0, "prompts per generate() call (0 = all of the rank's); make it divide each rank's share to get the same rollouts with any number of ranks")
    num_iterations: int = knob(1, "μ: optimizer updates per rollout (1 = on-policy; > 1 reuses it with the clipped ratio)")
    loss_type: str = knob("grpo", "grpo (per-sequence token mean) | dapo (token mean over the step) | dr_grpo (tokens / (sequences x max_new_tokens))")
    scale_rewards: str = knob("group", "advantage scale: group std (GRPO) | batch std | none (Dr. GRPO)")
    epsilon_low: float = knob(0.2, "ratio clip below: 1 - epsilon_low")
    epsilon_high: float = knob(0.2, "ratio clip above: 1 + epsilon_high (DAPO's clip-higher uses 0.28)")
    beta: float = knob(0.0, "KL (k3) coefficient to the SFT reference; 0 = no reference model at all")
    mask_truncated_completions: bool = knob(True, "responses that hit max_new_tokens without <|im_end|> get no loss (DAPO). The harmful and benign rules do not "
                                                  "read past a response's first words, so rambling to the budget is rewarded; measured at the defaults: "
                                                  "KL to SFT 2.2 nats with the mask, 5.8 without, same gold score")
    max_steps: int = knob(150, "optimizer steps (= rollouts; each does num_iterations updates)")
    lr: float = knob(5e-4, "peak learning rate (measured on the default task: 1e-3 drifts further from SFT and scores lower)")
    warmup_steps: int = knob(5, "linear warmup steps")
    micro_batch_size: int = knob(64, "sequences (prompt + response) per forward pass per rank (shared_prompt: whole groups, at least one)")
    layout: str = knob("shared_prompt", "training forward: shared_prompt (a prompt's G responses packed in one row [x | y_1 | ... | y_G], "
                                         "the prompt computed once; minialign.rollout.group_logps) | rows (one row [x y_i] per response)")
    log_every: int = knob(5, "log metrics every N steps")
    eval_data: str = knob("data/rl_eval.jsonl", "held-out prompts scored by the default task's gold rule ('' = no eval)")
    eval_prompts: int = knob(600, "how many held-out prompts to evaluate at the end")
    eval_max_new_tokens: int = knob(48, "generation length for the evaluation (48, as for SFT)")
    gold_eval_every: int = knob(0, "every N steps also log the gold score (T=1) and KL to the SFT model on the first --gold_eval_prompts held-out prompts (points of the gold-vs-KL curve; 0 = off)")
    gold_eval_prompts: int = knob(200, "held-out prompts for --gold_eval_every")


def check_config(cfg, rt):
    """Refuse impossible or unsupported combinations with a message naming the flag."""
    checks = [
        (cfg.init_from != "", "--init_from is required (GRPO starts from an SFT policy, e.g. out/sft)"),
        (cfg.num_generations >= 2, f"--num_generations={cfg.num_generations} must be >= 2 (a group of one has no baseline)"),
        (cfg.prompts_per_step % rt.world_size == 0, f"--prompts_per_step={cfg.prompts_per_step} must be divisible by the {rt.world_size} ranks"),
        (cfg.prompts_per_generate >= 0, "--prompts_per_generate must be >= 0"),
        (cfg.num_iterations >= 1, "--num_iterations must be >= 1"),
        (cfg.max_new_tokens >= 1, "--max_new_tokens must be >= 1"),
        (cfg.max_new_tokens < cfg.max_len, f"--max_new_tokens={cfg.max_new_tokens} must be < --max_len={cfg.max_len} (prompts get the difference)"),
        (cfg.prompts_per_step >= rt.world_size, f"--prompts_per_step={cfg.prompts_per_step} must be >= the {rt.world_size} rank(s)"),
        (cfg.temperature > 0, "--temperature must be > 0 (the policy gradient needs sampled log-probs)"),
        (cfg.loss_type in GRPO_LOSS_TYPES, f"--loss_type must be one of {GRPO_LOSS_TYPES}"),
        (cfg.layout in ("shared_prompt", "rows"), "--layout must be shared_prompt or rows"),
        (not cfg.compile, "--compile is not offered for GRPO: the sampler's ever-changing shapes would recompile at every step"),
        (cfg.scale_rewards in GROUP_SCALES, f"--scale_rewards must be one of {GROUP_SCALES}"),
        (0 <= cfg.epsilon_low < 1 and cfg.epsilon_high >= 0, "--epsilon_low must be in [0, 1) and --epsilon_high >= 0"),
        (cfg.beta >= 0, "--beta must be >= 0"),
        (cfg.grad_accum == 1, "--grad_accum is not used by GRPO: a step's micro-batches follow from prompts_per_step x num_generations / micro_batch_size"),
        (("reward_model" in cfg.reward_funcs) == bool(cfg.reward_model), "--reward_model PATH and 'reward_model' in --reward_funcs go together"),
    ]
    for ok, msg in checks:
        if not ok:
            raise SystemExit(f"train_grpo.py: error: {msg}")


def completion_mask(response_mask: torch.Tensor, finished: torch.Tensor, mask_truncated: bool) -> torch.Tensor:
    """(B, N) bool, True = the token counts in the loss. With mask_truncated, responses that did not
    emit <|im_end|> count for nothing (DAPO: a truncated answer is not a wrong one)."""
    return response_mask & finished[:, None] if mask_truncated else response_mask


def grpo_loss_sum(model, batch, cfg):
    """One micro-batch's GRPO loss as a SUM over its counted units -> (loss_sum, logps, metric_sums).

    Normalization, written once. engine.train_step divides every micro-batch's returned loss by the
    count of units of the WHOLE step (all micro-batches, all ranks; `count_units`), so we return
    grpo_loss with a normalizer that leaves exactly that division to do:
        loss_type  loss of the step                            unit counted        normalizer here
        grpo       1/S · Σ_i 1/|o_i| Σ_t ℓ_it                  S sequences         1
        dapo       1/T · Σ_i Σ_t ℓ_it                          T tokens            1
        dr_grpo    1/(S · L) · Σ_i Σ_t ℓ_it                    S sequences         L = max_new_tokens
    where a sequence counts when it has at least one counted token (grpo_loss's convention), ℓ is the
    per-token clipped objective + β k3, and S, T are over the step. The metrics (clip ratios, kl) are
    returned as sums over tokens; the caller rescales them to token means.
    """
    group = cfg.num_generations if cfg.layout == "shared_prompt" else 0
    logps = policy_logps(model, batch, cfg.temperature, group)  # (b, n) float32, same temperature as the sampler
    normalizer = cfg.max_new_tokens if cfg.loss_type == "dr_grpo" else 1
    loss_sum, metrics = grpo_loss(logps, batch["old_logps"], batch.get("ref_logps"), batch["advantages"], batch["loss_mask"],
                                  cfg.epsilon_low, cfg.epsilon_high, cfg.beta, cfg.loss_type, cfg.max_new_tokens, normalizer)
    n_tokens = batch["loss_mask"].sum()
    return loss_sum, logps.detach(), {k: v * n_tokens for k, v in metrics.items()}


def count_units(batch, loss_type: str):
    """Counted units of a micro-batch: tokens for dapo, sequences with a counted token otherwise."""
    return batch["loss_mask"].sum() if loss_type == "dapo" else batch["loss_mask"].any(-1).sum()


def grpo_step(model, ref_model, reward_model, optimizer, scaler, prompts, sources, step, tok, rt, cfg, stats) -> dict:
    """Roll out this rank's `prompts`, reward, compute group advantages, do num_iterations updates.

    Returns the step's metrics (global over ranks). `model` may be DDP-wrapped; `ref_model` is None
    when beta == 0; `reward_model` is None unless a reward_model source is used.
    """
    policy, G = engine.unwrap(model), cfg.num_generations
    # ---- 1. rollout (no grad), this rank's prompts start at global position rank * share
    with rt.autocast():
        ro = sample_rollout(policy, tok, prompts, G, cfg.max_new_tokens, cfg.temperature, cfg.seed, step,
                            first_prompt=rt.rank * len(prompts), prompts_per_generate=cfg.prompts_per_generate)
    B = len(ro.rows)
    group = G if cfg.layout == "shared_prompt" else 0  # > 0: the training forward packs each prompt's G responses

    # ---- 2. rewards: each source unweighted, then gathered so advantages and metrics are global
    texts, fields = reward_fields(ro)
    per_source = compute_rewards(sources, texts, ro.completions, fields)
    if reward_model is not None:
        with rt.autocast():
            per_source["reward_model"] = reward_model_scores(reward_model, ro, cfg.micro_batch_size).tolist()
    local = torch.tensor([per_source[s.name] for s in sources] + [ro.lengths.tolist(), ro.finished.tolist()],
                         dtype=torch.float64, device=rt.device).T  # (B, K + 2)
    everything = all_gather_rows(local, rt)  # (B_global, K + 2), rank order = global prompt order
    K = len(sources)
    rewards_per_func, lengths, finished = everything[:, :K], everything[:, K], everything[:, K + 1]
    weights = torch.tensor([s.weight for s in sources], dtype=torch.float64, device=rt.device)
    rewards = rewards_per_func @ weights  # (B_global,) r = Σ_k w_k r_k
    advantages = group_advantages(rewards, G, cfg.scale_rewards)  # (B_global,) A_i
    local_adv = advantages[rt.rank * B : (rt.rank + 1) * B].float()  # (B,)

    # ---- 3. the tensors the loss needs, cut into micro-batches
    loss_mask = completion_mask(ro.response_mask, ro.finished, cfg.mask_truncated_completions)  # (B, N)
    tensors = {"prompt_ids": ro.prompt_ids, "prompt_mask": ro.prompt_mask, "response_ids": ro.response_ids,
               "response_mask": ro.response_mask, "loss_mask": loss_mask, "old_logps": ro.logps, "advantages": local_adv}
    if ref_model is not None:
        with rt.autocast():
            tensors["ref_logps"] = rollout_logps(ref_model, ro, cfg.temperature, cfg.micro_batch_size, group)  # (B, N)
    order = None
    if group:  # micro-batches of whole groups; similar packed lengths together
        if cfg.group_by_length:
            packed_len = (ro.prompt_mask.sum(-1) + ro.lengths).view(-1, G).sum(-1).tolist()
            order = [g * G + j for g in sorted(range(B // G), key=lambda g: packed_len[g]) for j in range(G)]
    elif cfg.group_by_length:  # similar total lengths together: less padding, same loss
        total_len = (ro.prompt_mask.sum(-1) + ro.lengths).tolist()
        order = sorted(range(B), key=lambda i: total_len[i])
    batches = micro_batches(tensors, rows_per_micro_batch(cfg.micro_batch_size, group), order)

    # ---- 4. num_iterations updates on this rollout
    n_units = engine.all_reduce_sum(sum(float(count_units(b, cfg.loss_type)) for b in batches), rt)
    n_tokens = engine.all_reduce_sum(float(loss_mask.sum()), rt)
    n_signal = engine.all_reduce_sum(float(((local_adv != 0) & loss_mask.any(-1)).sum()), rt)
    skip = n_units == 0 or (n_signal == 0 and cfg.beta == 0)  # the same decision on every rank
    first_dev = [0.0]  # max |ratio - 1| over the sampled tokens on the first update

    def loss_fn(m, batch, first):
        loss_sum, logps, metric_sums = grpo_loss_sum(m, batch, cfg)
        if first:  # the policy has not moved since sampling: ratio = π / π_old must be 1
            dev = (logps - batch["old_logps"]).exp().sub(1).abs().masked_fill(~batch["response_mask"], 0)
            first_dev[0] = max(first_dev[0], float(dev.max()))
        return loss_sum, metric_sums

    sums, updates = {}, 0
    for it in range(0 if skip else cfg.num_iterations):
        out = engine.train_step(model, optimizer, scaler, batches, lambda m, b: loss_fn(m, b, it == 0),
                                lambda b: count_units(b, cfg.loss_type), rt, cfg)
        engine.check_finite(out["loss"], out["grad_norm"], step, cfg, stats)
        for k, v in out.items():
            sums[k] = sums.get(k, 0.0) + v
        updates += 1
    per_update = {k: v / max(updates, 1) for k, v in sums.items()}
    to_token_mean = n_units / n_tokens if n_tokens else 0.0  # train_step divided the token sums by n_units

    grouped = rewards.view(-1, G)  # (N_prompts_global, G)
    metrics = {
        "loss": per_update.get("loss", 0.0),
        "grad_norm": per_update.get("grad_norm", 0.0),
        "reward": float(rewards.mean()),
        "reward_std": float(grouped.std(dim=1).mean()),  # mean within-group std (TRL's reward_std)
    }
    for k, src in enumerate(sources):
        metrics[f"rewards/{src.name}/mean"] = float(rewards_per_func[:, k].mean())
        metrics[f"rewards/{src.name}/std"] = float(rewards_per_func[:, k].std())
    metrics["frac_reward_zero_std"] = float((grouped == grouped[:, :1]).all(dim=1).double().mean())
    for k in ("clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean") + (("kl",) if cfg.beta > 0 else ()):
        metrics[k] = per_update.get(k, 0.0) * to_token_mean
    metrics.update({
        "completions/mean_length": float(lengths.mean()),
        "completions/min_length": float(lengths.min()),
        "completions/max_length": float(lengths.max()),
        "completions/clipped_ratio": float(1 - finished.mean()),  # no <|im_end|> within max_new_tokens
        "ratio/first_iteration_max_abs_dev": all_reduce_max(first_dev[0], rt),
        "update_skipped": float(skip),
    })
    return metrics


def main(argv=None):
    cfg = engine.parse_config(Config, argv)
    cfg.out_dir = cfg.out_dir or "out/grpo"
    rt = engine.setup_runtime(cfg)
    check_config(cfg, rt)
    try:
        sources = parse_reward_funcs(cfg.reward_funcs, cfg.reward_weights, model_names=("reward_model",))
    except ValueError as e:
        raise SystemExit(f"train_grpo.py: error: {e}")
    if rt.is_main:
        engine.check_writable(cfg.out_dir)
    tok_path = engine.tokenizer_path_for(cfg)
    tok = Tokenizer(tok_path)

    # ---- models: policy; reference only when beta > 0; reward model only when asked for
    model = engine.load_model(cfg.init_from).to(rt.device)
    ref_model = frozen(engine.load_model(cfg.init_from), rt) if cfg.beta > 0 else None
    reward_model = load_reward_model(cfg.reward_model, rt, "train_grpo.py") if cfg.reward_model else None
    if reward_model is not None and reward_model.cfg.vocab_size != model.cfg.vocab_size:
        raise SystemExit(f"train_grpo.py: error: the reward model's vocabulary ({reward_model.cfg.vocab_size}) differs from the policy's ({model.cfg.vocab_size})")
    if cfg.max_len > model.cfg.max_seq_len:
        raise SystemExit(f"train_grpo.py: error: --max_len={cfg.max_len} exceeds the model's max_seq_len={model.cfg.max_seq_len}")
    engine.print0(rt, f"policy: {model.num_params() / 1e6:.2f}M parameters from {cfg.init_from}; reference: "
                      f"{'frozen copy of ' + cfg.init_from if ref_model is not None else 'none (beta = 0)'}; reward: "
                      + " + ".join(f"{s.weight:g} x {s.name}" for s in sources))

    # ---- data: prompts fit max_len together with the generation budget
    stats = {}
    try:  # before any training: every line has the fields its reward functions read, and some prompt fits
        prompts = load_rl_prompts(cfg.data, tok, cfg.max_len - cfg.max_new_tokens, sources, stats)
    except ValueError as e:
        raise SystemExit(f"train_grpo.py: error: {e}") from None
    share = cfg.prompts_per_step // rt.world_size
    rows = share * cfg.num_generations
    engine.print0(rt, f"data: {len(prompts)} prompts (dropped {stats.get('dropped_prompt_too_long', 0)} longer than "
                      f"{cfg.max_len - cfg.max_new_tokens} tokens); a step = {cfg.prompts_per_step} prompts x G={cfg.num_generations} "
                      f"= {cfg.prompts_per_step * cfg.num_generations} responses ({rows} per rank, {-(-rows // cfg.micro_batch_size)} "
                      f"micro-batches), {cfg.num_iterations} update(s) each; {cfg.max_steps} steps = "
                      f"{cfg.max_steps * cfg.prompts_per_step / len(prompts):.2f} epochs of prompts")

    # ---- optimizer, resume (the sampler needs no state: it is seeded from (seed, step), see minialign.rollout)
    optimizer = engine.make_optimizer(model, cfg, rt)
    scaler = rt.make_scaler()
    start_step = engine.resume_from_checkpoint(cfg, model, optimizer, scaler)
    model = engine.wrap_ddp(model, rt)
    log = engine.MetricsLog(cfg.out_dir, rt, resume_step=start_step if cfg.resume else None)

    # ---- train
    gold_prompts = gold_ref = None  # --gold_eval_every: rank 0 scores the policy against the SFT model as it trains
    if cfg.gold_eval_every and cfg.eval_data and rt.is_main:
        gold_prompts = load_eval_prompts(cfg.eval_data, tok, cfg.gold_eval_prompts)
        gold_ref = ref_model if ref_model is not None else frozen(engine.load_model(cfg.init_from), rt)

    model.train()
    t0 = time.time()
    bar = tqdm(range(start_step, cfg.max_steps), initial=start_step, total=cfg.max_steps, desc="grpo", disable=not rt.is_main)
    for step in bar:
        lr = engine.lr_at(step, cfg.lr, cfg.warmup_steps, cfg.max_steps, cfg.min_lr_ratio)
        engine.set_lr(optimizer, lr)
        step_prompts = [prompts[i] for i in step_prompt_indices(len(prompts), step, cfg.prompts_per_step, cfg.seed, rt)]
        metrics = grpo_step(model, ref_model, reward_model, optimizer, scaler, step_prompts, sources, step, tok, rt, cfg, stats)
        bar.set_postfix(reward=f"{metrics['reward']:.3f}")
        if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.max_steps:
            log.log(step + 1, {**metrics, "learning_rate": lr}, bar)
        if gold_prompts and (step + 1) % cfg.gold_eval_every == 0 and step + 1 < cfg.max_steps:
            log.log(step + 1, gold_point(engine.unwrap(model), tok, gold_prompts, cfg.eval_max_new_tokens, gold_ref), bar)
        if engine.should_save(step + 1, start_step, cfg):
            engine.save_checkpoint(cfg.out_dir, model=model, optimizer=optimizer, scaler=scaler, step=step + 1, cfg=cfg,
                                   tokenizer_path=tok_path, finished=step + 1 == cfg.max_steps, rt=rt)
        if engine.should_stop(step + 1, start_step, cfg):
            engine.print0(rt, f"stopping after {cfg.stop_after_steps} steps as asked; continue with --resume")
            engine.cleanup(rt)
            return
    bar.close()
    engine.print0(rt, f"trained {cfg.max_steps - start_step} steps in {time.time() - t0:.0f}s")

    # ---- evaluate with the gold rule, KL measured against the SFT model we started from
    if cfg.eval_data and rt.is_main:
        policy = engine.unwrap(model).eval()
        ref = gold_ref if gold_ref is not None else ref_model  # the SFT model, if already loaded
        if ref is None:
            ref = frozen(engine.load_model(cfg.init_from), rt)
        res = evaluate_policy(policy, tok, load_eval_prompts(cfg.eval_data, tok, cfg.eval_prompts), cfg.eval_max_new_tokens, ref)
        engine.write_json(res, f"{cfg.out_dir}/eval.json")
        log.log(cfg.max_steps, {k: v for k, v in res.items() if k != "examples"})
        print(f"grpo eval on {res['n_prompts']} held-out prompts: {format_result(res)}")
    engine.cleanup(rt)


if __name__ == "__main__":
    main()
