"""Online and iterative DPO: DPO on pairs the policy samples itself, judged by a reward model or a rule.

Online DPO (Guo et al. 2024, "Direct Language Model Alignment from Online AI Feedback", arXiv:2402.04792,
Algorithm 1), every optimizer step:
  1. take `prompts_per_step` prompts (split over ranks; the same data order as GRPO) and sample
     K = `num_generations` responses to each from the CURRENT policy with the KV-cache sampler at
     temperature 1 (minialign.algorithms.rollout: seeded from (seed, step), so --resume needs only the step);
  2. score every response with the judge: a trained reward model (--reward_model, its score at the
     response's last token) and/or rule rewards (--reward_funcs gold; minialign.algorithms.reward_funcs), s = Σ_k w_k s_k;
  3. per prompt, chosen = the best-scored response and rejected = the worst (with K > 2 the two
     extremes); a prompt whose K scores are all equal says nothing and is skipped (pairs/ties_skipped);
  4. one DPO step on the step's pairs against the frozen SFT reference (minialign.algorithms.losses.dpo_loss):
         loss = mean over pairs of -log σ(β [(log π(y_c|x) - log ref(y_c|x)) - (log π(y_r|x) - log ref(y_r|x))])
     a mean over every pair of the step on all ranks (loop.train_step, the counted unit is the pair).
The pairs of all ranks are gathered and dealt out again before the update, so a rank whose prompts all
tied still takes part, and any number of ranks takes the step one process takes.

Iterative DPO (--rounds R >= 1; Xu et al. 2023 "Some things are more CRINGE than others", Xiong et al.
2024 "Iterative Preference Learning from Human Feedback"): R rounds, each of which
  1. samples K responses for `prompts_per_round` prompts from the policy as the round starts, judges
     them and builds the round's pairs as above, once;
  2. trains max_steps / R steps of offline DPO on that fixed set (`pairs_per_step` pairs a step, its own
     warmup + cosine schedule) against `--ref`: sft (the SFT model in every round) or previous (the policy
     as the round started: the previous round's result);
  3. logs the gold score and KL to the SFT model on `gold_eval_prompts` held-out prompts (a row with `round`).

The reference log-probs are computed once per sampled response in the rollout's packed layout (one row
[x | y_1 | ... | y_K] per prompt, minialign.algorithms.packing) and travel with the pairs; the same forward gives
objective/kl. The policy's forward is DPO's: one packed row [x | y_c | y_r] per pair (packing.collate_pairs,
preference.pair_logps). Its log-probs are at temperature 1, the temperature the responses are sampled at.

Metrics (TRL's OnlineDPOTrainer names): objective/scores (mean judge score of all K samples), objective/kl
(mean over all samples of Σ_t log π(y_t) - log ref(y_t): KL of the sampling policy to the reference),
objective/entropy (-Σ_t log π(y_t)), objective/non_score_reward (-β kl), objective/rlhf_reward (scores - β kl),
rewards/chosen, rewards/rejected (β log π/ref, detached), rewards/margins, rewards/accuracies,
logps/chosen, logps/rejected, val/contain_eos_token (share of samples that ended with <|im_end|>), beta;
and pairs/used, pairs/ties_skipped, pairs/score_gap (mean best - worst score), update_skipped.

Run on one device:         python train_online_dpo.py --reward_funcs gold      (out/sft -> out/online_dpo)
With the reward model:     python train_online_dpo.py --reward_model out/rm
Run on N processes / GPUs: torchrun --nproc_per_node=N train_online_dpo.py --reward_funcs gold
Iterative DPO:             python train_online_dpo.py --reward_funcs gold --rounds 3 --lr 2e-4 \
                               --out_dir out/iterative_dpo          (--ref previous: each round against the last)
At the end the policy is scored with the default task's gold rule on data/rl_eval.jsonl (eval.json).

Simplified on purpose: sampling at temperature 1 only; one pair per prompt (best vs worst, not all
K(K-1)/2 pairs); only the DPO losses with a reference (sigmoid, ipo, hinge, robust).
"""

import time
from dataclasses import dataclass
from types import SimpleNamespace

import torch
from tqdm import tqdm

from minialign.algorithms.losses import DEFAULT_BETA, DPO_LOSS_TYPES, dpo_loss
from minialign.algorithms.packing import collate_pairs, pair_count, pair_lengths, response_logps, response_scores
from minialign.algorithms.preference import best_and_worst, pair_logps
from minialign.algorithms.reward_funcs import parse_reward_funcs
from minialign.algorithms.roles import disable_dropout, frozen, load_reward_model
from minialign.algorithms.rollout import (load_rl_prompts, micro_batch_rows, rollout_forward, sample_rollout,
                                          source_rewards, step_prompt_indices)
from minialign.data.batching import to_device
from minialign.data.tokenizer import load_tokenizer
from minialign.errors import run_cli
from minialign.evaluation.evaluate import evaluate_policy, format_result, gold_point, load_eval_prompts
from minialign.training import checkpoint, logger, loop, runtime
from minialign.training.config import (FSDPConfig, GoldCurveConfig, PairBatch, TrainConfig, at_least, in_range, knob,
                                       non_negative, one_of, parse_config, positive)
from minialign.training.runtime import gather_columns

PROMPTS_PER_ROUND, PAIRS_PER_STEP = 1024, 64  # iterative DPO's sizes when --rounds is given without them


@dataclass
class Config(TrainConfig, PairBatch, GoldCurveConfig, FSDPConfig):
    out_dir: str = knob("out/online_dpo", "output folder")
    init_from: str = knob("out/sft", "SFT checkpoint: the policy starts from it and the reference is it",
                          (bool, "is required (online DPO starts from an SFT policy, e.g. out/sft)"))
    data: str = knob("data/rl_train.jsonl", "prompts (JSONL: {prompt} or {messages}; other keys are reward fields)")
    reward_funcs: list[str] = knob([], "rule judges: gold | format | length | gsm8k (minialign.algorithms.reward_funcs); "
                                       "give these and/or --reward_model")
    reward_weights: list[float] = knob([], "one weight per --reward_funcs entry (empty = all 1.0; the reward model's "
                                           "weight is 1)")
    reward_model: str = knob("", "trained reward model folder (train_rm.py output) as a judge")
    num_generations: int = knob(4, "K: responses sampled per prompt; its pair is (best, worst)",
                                (lambda v: v >= 2, "must be >= 2 (a pair needs two responses)"))
    prompts_per_step: int = knob(64, "online: prompts sampled per optimizer step, over all ranks", at_least(1))
    max_new_tokens: int = knob(32, "generation budget (default-task responses are <= ~25 tokens)", at_least(1))
    prompts_per_generate: int = knob(0, "prompts per generate() call (0 = all of the rank's); make it divide each "
                                        "rank's share to get the same samples with any number of ranks", non_negative)
    loss_type: str = knob("sigmoid", "sigmoid | robust | hinge | ipo (minialign.algorithms.losses.dpo_loss)",
                          one_of(*DPO_LOSS_TYPES))
    beta: float | None = knob(None, "β of the loss (> 0); unset = the loss type's default, as train_dpo.py's "
                                    f"{ {t: DEFAULT_BETA[t] for t in DPO_LOSS_TYPES} } (config.json holds the value "
                                    "used)", positive)
    label_smoothing: float = knob(0.0, "ε: cDPO (sigmoid), rDPO (robust); assumed rate of flipped labels",
                                  in_range(0, 0.5))
    rounds: int = knob(0, "0 = online DPO (new samples every step); R >= 1 = iterative DPO: R rounds of "
                          "max_steps / R steps on pairs sampled once per round", non_negative)
    prompts_per_round: int | None = knob(None, "iterative only (--rounds): prompts sampled at the start of each "
                                               f"round, over all ranks; unset = {PROMPTS_PER_ROUND}", at_least(1))
    pairs_per_step: int | None = knob(None, "iterative only (--rounds): pairs per optimizer step, over all ranks; "
                                            f"unset = {PAIRS_PER_STEP}", at_least(1))
    ref: str = knob("sft", "reference: sft (the SFT model) | previous (iterative: the policy as the round started)",
                    one_of("sft", "previous"))
    max_steps: int = knob(120, "optimizer steps (online: each samples anew; 120 divides into 2-6 rounds)")
    lr: float = knob(5e-4, "peak learning rate. Online (default task, gold judge): 5e-4 -> gold 0.950 / 0.943 / 0.945 "
                           "for seeds 1 / 2 / 3 (DPO's 2e-4 -> 0.908, seed 1337). Iterative: give DPO's 2e-4 (each "
                           "round is offline DPO on a few hundred pairs; at 5e-4 round 3 fell to 0.755, KL 4.4)")
    warmup_steps: int = knob(10, "linear warmup steps (iterative: in every round)")
    micro_batch_pairs: int = knob(64, "preference pairs per forward pass per rank (one packed row [x | y_c | y_r] "
                                      "each; the judge scores 2 x this many responses per forward)")
    log_every: int = knob(5, "log metrics every N steps", at_least(1))

    def problems(self, world_size):
        out = []
        if not self.reward_funcs and not self.reward_model:
            out.append("no judge: give --reward_funcs (e.g. gold) and/or --reward_model PATH")
        if "reward_model" in self.reward_funcs:
            out.append("--reward_funcs reward_model: give the model as --reward_model PATH instead")
        if self.max_new_tokens >= self.max_len:
            out.append(f"--max_new_tokens={self.max_new_tokens} must be < --max_len={self.max_len}")
        if self.loss_type == "robust" and self.label_smoothing >= 0.5:
            out.append(f"--label_smoothing={self.label_smoothing} must be < 0.5 for robust (it divides by 1 - 2ε)")
        if self.label_smoothing and self.loss_type not in ("sigmoid", "robust"):
            out.append(f"--label_smoothing is only defined for sigmoid and robust, not {self.loss_type}")
        for flag, value in (("--prompts_per_round", self.prompts_per_round), ("--pairs_per_step", self.pairs_per_step)):
            if value is not None and not self.rounds:
                out.append(f"{flag}={value} is read by iterative DPO only: give --rounds R >= 1 (online DPO samples "
                           "--prompts_per_step prompts every step)")
        if self.ref == "previous" and not self.rounds:
            out.append("--ref previous needs --rounds >= 1 (the reference of a round is the policy it started from)")
        if self.rounds and self.max_steps % self.rounds:
            out.append(f"--max_steps={self.max_steps} must be divisible by --rounds={self.rounds}")
        prompts = (("--prompts_per_round", self.prompts_per_round) if self.rounds
                   else ("--prompts_per_step", self.prompts_per_step))
        for flag, n in [prompts] + ([("--pairs_per_step", self.pairs_per_step)] if self.rounds else []):
            if n % world_size:
                out.append(f"{flag}={n} must be divisible by the {world_size} ranks")
        return out

    def resolve(self):
        if self.beta is None:
            self.beta = DEFAULT_BETA.get(self.loss_type)  # an unknown --loss_type is refused by its check
        if self.rounds:
            self.prompts_per_round = self.prompts_per_round or PROMPTS_PER_ROUND
            self.pairs_per_step = self.pairs_per_step or PAIRS_PER_STEP


# ---------------------------------------------------------------------------------------- pairs

@torch.no_grad()
def sample_pairs(policy, ref_model, reward_model, tok, prompts, sources, sample_step, rt, cfg):
    """This rank's prompts -> K samples each, judged; (best, worst) per prompt with the reference's summed
    log-probs -> (every rank's pairs in global prompt order, the samples' statistics over all ranks)."""
    K = cfg.num_generations
    with rt.autocast():
        ro = sample_rollout(policy, tok, prompts, K, cfg.max_new_tokens, 1.0, cfg.seed, sample_step,
                            rt.rank * len(prompts), cfg.prompts_per_generate)
        mb_rows = micro_batch_rows(ro, 2 * cfg.micro_batch_pairs)  # whole groups, one packed row each
        ref_logps = rollout_forward(lambda b: response_logps(ref_model, b), ro, mb_rows).sum(-1)  # (R,)
        rm_scores = None
        if reward_model is not None:
            rm_scores = rollout_forward(lambda b: response_scores(reward_model, b), ro, mb_rows)  # (R,)
    rewards = source_rewards(sources, ro, rm_scores)  # {name: (R,)}, unweighted
    scores = sum(s.weight * rewards[s.name] for s in sources)  # s = Σ_k w_k s_k, (R,) float64
    best, worst, keep = best_and_worst(scores, K)
    pairs = []
    for b in keep.nonzero().flatten().tolist():
        c, r = b * K + int(best[b]), b * K + int(worst[b])
        pairs.append({"prompt": ro.rows[c]["prompt_ids"],
                      "chosen": ro.response_ids[c][ro.response_mask[c]].tolist(),
                      "rejected": ro.response_ids[r][ro.response_mask[r]].tolist(),
                      "ref_chosen_logps": float(ref_logps[c]), "ref_rejected_logps": float(ref_logps[r]),
                      "score_gap": float(scores[c] - scores[r])})
    pairs = [p for rank_pairs in runtime.all_gather_object(pairs, rt) for p in rank_pairs]
    g = gather_columns({"score": scores, "logp": ro.logps.sum(-1), "kl": ro.logps.sum(-1) - ref_logps,
                        "finished": ro.finished, "length": ro.lengths}, rt)
    kl = float(g["kl"].mean())  # k1 on the samples of the policy that drew them
    stats = {"objective/scores": float(g["score"].mean()),
             "objective/kl": kl,
             "objective/entropy": -float(g["logp"].mean()),  # of the whole response, nats
             "objective/non_score_reward": -cfg.beta * kl,
             "objective/rlhf_reward": float(g["score"].mean()) - cfg.beta * kl,
             "val/contain_eos_token": float(g["finished"].mean()),
             "completions/mean_length": float(g["length"].mean()),
             "pairs/used": len(pairs),
             "pairs/ties_skipped": int(runtime.all_reduce_sum(float((~keep).sum()), rt)),
             "pairs/score_gap": sum(p["score_gap"] for p in pairs) / max(len(pairs), 1)}
    return pairs, stats


def collate_sampled_pairs(pairs, pad_id, loss_type):
    """Pairs -> a packing.collate_pairs batch plus their reference log-probs ((B,) each; ipo: per token)."""
    batch = collate_pairs(pairs, pad_id)
    ref = torch.tensor([[p["ref_chosen_logps"], p["ref_rejected_logps"]] for p in pairs])  # (B, 2) summed
    if loss_type == "ipo":  # IPO works with length-averaged log-probs (as train_dpo.py and TRL)
        ref = ref / torch.tensor([[len(p["chosen"]), len(p["rejected"])] for p in pairs])
    batch["ref_chosen_logps"], batch["ref_rejected_logps"] = ref[:, 0], ref[:, 1]
    return batch


# ------------------------------------------------------------------------------------------ the loss

def online_dpo_loss(model, batch, cfg):
    """Summed DPO loss over the batch's pairs and TRL's metrics summed over pairs (loop.train_step divides)."""
    pol = pair_logps(model, batch)
    pi_c, pi_r = (pol.chosen_logps_avg, pol.rejected_logps_avg) if cfg.loss_type == "ipo" else (pol.chosen_logps,
                                                                                                  pol.rejected_logps)
    losses, chosen_rewards, rejected_rewards = dpo_loss(pi_c, pi_r, batch["ref_chosen_logps"],
                                                        batch["ref_rejected_logps"], cfg.beta, cfg.loss_type,
                                                        cfg.label_smoothing)
    return losses.sum(), {"rewards/chosen": chosen_rewards.sum(), "rewards/rejected": rejected_rewards.sum(),
                          "rewards/margins": (chosen_rewards - rejected_rewards).sum(),
                          "rewards/accuracies": (chosen_rewards > rejected_rewards).float().sum(),
                          "logps/chosen": pi_c.detach().sum(), "logps/rejected": pi_r.detach().sum()}


def main(argv=None):
    cfg = parse_config(Config, argv)  # resolves --beta and, for --rounds, the iterative sizes
    checkpoint.check_out_dir(cfg)  # an out_dir holding a run: --resume or --overwrite, else refused
    rt = runtime.setup(cfg)
    names = cfg.reward_funcs + ["reward_model"] * bool(cfg.reward_model)
    weights = cfg.reward_weights + [1.0] * bool(cfg.reward_model and cfg.reward_weights)
    try:
        sources = parse_reward_funcs(names, weights, model_names=("reward_model",))
    except ValueError as e:
        raise SystemExit(f"train_online_dpo.py: error: {e}")
    if rt.is_main:
        checkpoint.check_writable(cfg.out_dir)
    tok_path = checkpoint.tokenizer_path_for(cfg.init_from)
    tok = load_tokenizer(tok_path)

    # ---- models: policy; the frozen SFT model (the reference with --ref sft, and the KL baseline); the judge
    policy = disable_dropout(checkpoint.load_model(cfg.init_from)).to(rt.device)
    sft_model = runtime.shard_frozen(frozen(checkpoint.load_model(cfg.init_from), rt), rt, cfg)  # --shard_frozen
    ref_model = sft_model if cfg.ref == "sft" else policy  # previous: the policy as each round starts
    reward_model = load_reward_model(cfg.reward_model, rt, "train_online_dpo.py") if cfg.reward_model else None
    reward_model = runtime.shard_frozen(reward_model, rt, cfg)
    if reward_model is not None and reward_model.cfg.vocab_size != policy.cfg.vocab_size:
        raise SystemExit(f"train_online_dpo.py: error: the reward model's vocabulary ({reward_model.cfg.vocab_size}) "
                         f"differs from the policy's ({policy.cfg.vocab_size})")
    runtime.print0(rt, f"policy: {policy.num_params() / 1e6:.2f}M parameters from {cfg.init_from}; loss "
                       f"{cfg.loss_type}, beta {cfg.beta}; reference: {cfg.ref}; judge: "
                   + " + ".join(f"{s.weight:g} x {s.name}" for s in sources))

    # ---- data: prompts fit max_len together with the generation budget
    stats = {}
    try:
        prompts = load_rl_prompts(cfg.data, tok, cfg.max_len - cfg.max_new_tokens, sources, stats)
    except ValueError as e:
        raise SystemExit(f"train_online_dpo.py: error: {e}") from None
    steps_per_round = cfg.max_steps // cfg.rounds if cfg.rounds else 1  # online: every step samples its own pairs
    n_sampled = cfg.prompts_per_round if cfg.rounds else cfg.prompts_per_step
    runtime.print0(rt, f"data: {len(prompts)} prompts (dropped {stats.get('dropped_prompt_too_long', 0)} too long); "
                   + (f"{cfg.rounds} rounds of {cfg.prompts_per_round} prompts x K={cfg.num_generations}, then "
                      f"{steps_per_round} steps x {cfg.pairs_per_step} pairs" if cfg.rounds else
                      f"a step = {cfg.prompts_per_step} prompts x K={cfg.num_generations} samples -> at most "
                      f"{cfg.prompts_per_step} pairs; {cfg.max_steps} steps = "
                      f"{cfg.max_steps * cfg.prompts_per_step / len(prompts):.2f} epochs of prompts"))

    # ---- DDP or FSDP, optimizer, resume (online sampling is seeded from (seed, step); a round's pairs are in the
    # checkpoint)
    model = runtime.wrap_ddp(policy, rt, gradient_checkpointing=cfg.gradient_checkpointing, fsdp=cfg.fsdp)
    optimizer = loop.make_optimizer(policy, cfg, rt)
    scaler = rt.make_scaler()
    start_step = checkpoint.resume(cfg, policy, optimizer, scaler, rt)
    pairs, round_stats = None, {}
    if cfg.rounds and start_step % steps_per_round:
        saved = checkpoint.load(cfg.out_dir)
        pairs, round_stats = saved["round_pairs"], saved["round_stats"]
    log = logger.MetricsLog(cfg.out_dir, rt, start_step if cfg.resume else None, tensorboard=cfg.tensorboard)
    eval_prompts = None
    if cfg.eval_data and rt.is_main:
        eval_prompts = load_eval_prompts(cfg.eval_data, tok, 0, cfg.eval_max_new_tokens, policy.cfg.max_seq_len)

    model.train()
    t0 = time.time()
    bar = tqdm(range(start_step, cfg.max_steps), initial=start_step, total=cfg.max_steps, desc="online-dpo",
               disable=not rt.is_main)
    for step in bar:
        rnd, s = divmod(step, steps_per_round)  # round, step within it
        lr = (loop.lr_at(s, cfg.lr, cfg.warmup_steps, steps_per_round, cfg.min_lr_ratio) if cfg.rounds
              else loop.lr_at(step, cfg.lr, cfg.warmup_steps, cfg.max_steps, cfg.min_lr_ratio))
        loop.set_lr(optimizer, lr)
        # 1-3. sample K per prompt from the current policy, judge, keep (best, worst): every step, or once a round
        if s == 0:
            mine = [prompts[i] for i in step_prompt_indices(len(prompts), rnd, n_sampled, cfg.seed, rt)]
            with runtime.gathered(policy):  # --fsdp: the policy's full weights while sampling
                pairs, round_stats = sample_pairs(policy, ref_model, reward_model, tok, mine, sources, rnd, rt, cfg)
        # 4. a DPO step on this rank's part of the pairs
        lengths = pair_lengths(pairs)
        if cfg.rounds:  # pairs_per_step of the round's pairs, in the data order of the round
            order = SimpleNamespace(micro_batch=cfg.pairs_per_step // rt.world_size, grad_accum=1,
                                    seed=cfg.seed + rnd, group_by_length=cfg.group_by_length)
            idx = loop.step_batches(len(pairs), s, order, rt, lengths)[0] if pairs else []
        else:  # every pair of the step, dealt out over the ranks
            idx = list(range(rt.rank, len(pairs), rt.world_size))
            idx = sorted(idx, key=lambda i: lengths[i]) if cfg.group_by_length else idx
        fewest = len(pairs) // rt.world_size if not cfg.rounds else len(idx)  # the smallest rank's share
        batches = [to_device(collate_sampled_pairs([pairs[i] for i in part], tok.pad_id, cfg.loss_type), rt.device)
                   for part in loop.micro_batches(idx, cfg.micro_batch_pairs, fewest, cfg.fsdp)]
        skip = len(pairs) < rt.world_size  # same on every rank; each needs a pair (DDP all-reduces in backward)
        metrics = {"update_skipped": float(skip)}
        if not skip:
            metrics.update(loop.train_step(model, optimizer, scaler, batches,
                                               lambda m, b: online_dpo_loss(m, b, cfg), pair_count, rt,
                                               cfg.max_grad_norm))
            loop.check_finite(metrics, step, cfg, stats, scaler)
        metrics = {**metrics, **round_stats, "beta": cfg.beta, "learning_rate": lr,
                   **({"round": rnd + 1} if cfg.rounds else {})}
        bar.set_postfix(score=f"{round_stats['objective/scores']:.3f}", pairs=round_stats["pairs/used"])
        done = step + 1
        if done % cfg.log_every == 0 or done == cfg.max_steps:
            log.log(done, {**metrics, **loop.skip_counts(stats)}, bar)
        round_end = cfg.rounds and done % steps_per_round == 0
        if cfg.eval_data and (round_end or (cfg.gold_eval_every and done % cfg.gold_eval_every == 0
                                            and done < cfg.max_steps)):
            with runtime.gathered(policy, sft_model):  # --fsdp: rank 0 samples alone on the gathered weights
                point = eval_prompts and gold_point(policy, tok, eval_prompts[: cfg.gold_eval_prompts],
                                                    cfg.eval_max_new_tokens, sft_model)
            if point and round_end:  # the round's row: its gold score, KL to SFT, and how many pairs it trained on
                point = {"round": rnd + 1, **point, "pairs/used": round_stats["pairs/used"],
                         "pairs/ties_skipped": round_stats["pairs/ties_skipped"]}
            if point:
                log.log(done, point, bar)
        if checkpoint.should_save(done, start_step, cfg):
            extra = {"round_pairs": pairs, "round_stats": round_stats} if cfg.rounds else None
            checkpoint.save(cfg.out_dir, model=policy, optimizer=optimizer, scaler=scaler, step=done, cfg=cfg,
                            tokenizer_path=tok_path, finished=done == cfg.max_steps, extra=extra, rt=rt)
        if checkpoint.should_stop(done, start_step, cfg):
            runtime.print0(rt, f"stopping after {cfg.stop_after_steps} steps as asked; continue with --resume")
            runtime.cleanup(rt)
            return
    bar.close()
    runtime.print0(rt, f"trained {cfg.max_steps - start_step} steps in {time.time() - t0:.0f}s")

    # ---- evaluate with the gold rule, KL measured against the SFT model we started from
    with runtime.gathered(policy, sft_model):  # --fsdp: rank 0 evaluates alone on the gathered weights
        if eval_prompts:
            res = evaluate_policy(policy.eval(), tok, eval_prompts[: cfg.eval_prompts or None],
                                  cfg.eval_max_new_tokens, sft_model)
            checkpoint.write_json(res, f"{cfg.out_dir}/eval.json")
            log.log(cfg.max_steps, {k: v for k, v in res.items() if k != "examples"})
            print(f"online dpo eval on {res['n_prompts']} held-out prompts: {format_result(res)}")
    runtime.cleanup(rt)


if __name__ == "__main__":
    run_cli(main)
