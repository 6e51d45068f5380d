"""Reward model: a Bradley-Terry classifier of preference pairs, started from the SFT model.

Objective: minimize 1/N * sum over the N pairs of the WHOLE optimizer step (all micro-batches and
ranks, see minialign.training.loop) of
    -log σ(r(x, y_c) - r(x, y_r) - m)  +  center_coef * (r(x, y_c) + r(x, y_r))²
where r(x, y) is the scalar head's score at the last real token of prompt x + response y (its
<|im_end|>), m the pair's optional "margin" field (Llama 2, Eq. 2; 0 without it), and the centering
term (Eisenstein et al. 2023) pins the free offset of the rewards near 0. InstructGPT, Eq. 1.

The model is a ScalarModel: the SFT backbone and a fresh linear score head (dropout is 0 everywhere).
The loss sees only reward differences, so a shared offset is free: without centering the head's bias
gets a zero gradient up to rounding, which AdamW turns into lr-sized random steps (harmless to the
ranking; --center_coef pins the offset if the absolute reward matters, e.g. for PPO).
Chosen and rejected go through ONE forward pass as one packed row [x | y_c | y_r] per pair, the prompt
computed once (minialign.algorithms.packing; the rewards equal those of two plain rows to float error, tested).
Ranked outputs (a prompt with K responses, best first; minialign.data.formats): the K(K-1)/2 (--rank_rule all)
or K - 1 pairs of one prompt are ONE batch element, its K responses packed in one row and each scored
once (InstructGPT, Sec. 3.5: shuffled as independent examples, a prompt's correlated comparisons
overfit); the loss stays the mean over the step's pairs.
Evaluation (every --eval_every steps and at the end) scores the held-out pairs: pairwise accuracy,
mean margin, mean/min/max reward; the chosen and rejected reward lists go to <out_dir>/rm_scores.json
and, if matplotlib is installed, a histogram to <out_dir>/rm_scores.png.

Run on one device:         python train_rm.py                      (data/pref_train.jsonl -> out/rm, from out/sft)
Run on N GPUs / processes: torchrun --nproc_per_node=N train_rm.py   (add --fsdp to shard the model over them)
With LoRA:                 python train_rm.py --lora_r 8   (adapters on the SFT backbone; the score head trains in full)
Score any JSONL afterwards: python -m minialign.algorithms.reward_model --ckpt out/rm --data file.jsonl
Accepted data formats: see minialign.data.formats.load_preferences ({prompt, chosen, rejected}, implicit
prompt, Anthropic HH); an optional numeric "margin" key per pair (every pair or none).
"""

from dataclasses import dataclass

import torch
from tqdm import tqdm

from minialign.algorithms.losses import bradley_terry_loss
from minialign.algorithms.packing import collate_groups, group_lengths, group_pairs, pair_count
from minialign.algorithms.reward_model import pair_metrics, pair_rewards, save_histogram, score_pairs
from minialign.data.batching import to_device, tokenize_preferences
from minialign.data.formats import DataError, load_preferences
from minialign.data.tokenizer import load_tokenizer
from minialign.errors import run_cli
from minialign.models import lora
from minialign.training import checkpoint, logger, loop, runtime
from minialign.training.config import (FromScratch, FSDPConfig, LoRAConfig, OfflineConfig, PairBatch, PairsConfig,
                                       knob, non_negative, parse_config)


@dataclass
class Config(OfflineConfig, PairBatch, FromScratch, PairsConfig, LoRAConfig, FSDPConfig):
    out_dir: str = knob("out/rm", "output folder")
    data: str = knob("data/pref_train.jsonl", "preference pairs for training (JSONL(.gz) or JSON)")
    eval_data: str = knob("data/pref_eval.jsonl", "held-out pairs for accuracy and the score distributions "
                                                  "('' = no eval)")
    init_from: str = knob("out/sft", "SFT checkpoint: its backbone, a fresh score head ('' = random init from "
                                     "--preset)")
    max_steps: int = knob(400, "optimizer steps (400 x 32 pairs = 2.1 epochs of the default task; 0.97 held-out "
                               "accuracy)")
    lr: float = knob(5e-4, "peak learning rate (400 steps: 5e-4 -> 0.97 held-out accuracy, 1e-3 -> 0.95, "
                           "1.5e-3 -> 0.89)")
    warmup_steps: int = knob(10, "linear warmup steps")
    micro_batch_pairs: int = knob(8, "preference pairs per forward pass per rank (one packed row each; a ranked-output "
                                    "record's K responses and all their pairs count as one)")
    grad_accum: int = knob(4, "micro-batches per optimizer step (per rank): 4 x 8 = 32 pairs a step; length-grouped "
                              "micro-batches of 8 pad a quarter fewer tokens than one of 32, for the same update")
    eval_every: int = knob(100, "evaluate on the held-out pairs every N steps (0 = only at the end)", non_negative)
    center_coef: float = knob(0.0, "weight of the reward-centering term (r_c + r_r)²; e.g. 0.01 keeps rewards near 0",
                              non_negative)


def rm_loss(model, batch, center_coef: float, seen_rewards: list):
    """Summed Bradley-Terry loss over the batch's pairs (loop.train_step divides by the step's pair count).

    bradley_terry_loss returns the MEAN over the B pairs of both terms (log-sigmoid and centering),
    so B times it is the per-pair SUM of the whole per-pair loss, centering included.
    """
    chosen_rewards, rejected_rewards = pair_rewards(model, batch)  # (B,), (B,) float32
    n_pairs = chosen_rewards.shape[0]
    loss_sum = n_pairs * bradley_terry_loss(chosen_rewards, rejected_rewards, batch.get("margin"), center_coef)
    r_c, r_r = chosen_rewards.detach(), rejected_rewards.detach()
    seen_rewards.append(torch.cat([r_c, r_r]))
    metric_sums = {  # summed per pair; train_step turns them into means over the step's pairs
        "accuracy": (r_c > r_r).sum(),
        "margin": (r_c - r_r).sum(),
        "mean_reward": (r_c + r_r).sum() / 2,  # mean over the 2N rewards once divided by N
        "rewards/chosen": r_c.sum(),
        "rewards/rejected": r_r.sum(),
    }
    return loss_sum, metric_sums


def reward_range(seen_rewards: list, rt) -> tuple[float, float]:
    """(min, max) reward over this optimizer step, across ranks."""
    rewards = torch.cat(seen_rewards)
    return -runtime.all_reduce_max(-float(rewards.min()), rt), runtime.all_reduce_max(float(rewards.max()), rt)


@torch.no_grad()
def evaluate_rm(model, examples, cfg, rt, pad_id: int) -> tuple[dict, list, list]:
    """Held-out metrics (prefixed eval_ as TRL does) and the chosen / rejected reward lists."""
    model.eval()
    with rt.autocast():
        chosen, rejected = score_pairs(model, examples, pad_id, batch_size=2 * cfg.micro_batch_pairs)
    model.train()
    margin = torch.tensor([float(e["margin"]) for e in examples]) if "margin" in examples[0] else None
    loss = bradley_terry_loss(torch.tensor(chosen), torch.tensor(rejected), margin, cfg.center_coef)
    metrics = {"loss": float(loss), **pair_metrics(chosen, rejected)}
    return {f"eval_{k}": v for k, v in metrics.items()}, chosen, rejected


def check_margins(examples: list[dict], path: str):
    """The optional "margin" field: a number on every pair, or on none."""
    with_margin = [e for e in examples if "margin" in e]
    if len(with_margin) not in (0, len(examples)):
        raise DataError(path, None, f"{len(with_margin)} of {len(examples)} pairs have a 'margin' field; give it to "
                                    "every pair or to none")
    for i, e in enumerate(with_margin):
        if isinstance(e["margin"], bool) or not isinstance(e["margin"], (int, float)):
            raise DataError(path, None, f"field 'margin' must be a number; loaded pair {i + 1} has {e['margin']!r}")


def main(argv=None):
    cfg = parse_config(Config, argv)
    checkpoint.check_out_dir(cfg)  # an out_dir holding a run: --resume or --overwrite, else refused
    rt = runtime.setup(cfg)
    if rt.is_main:
        checkpoint.check_writable(cfg.out_dir)
    tok_path = checkpoint.tokenizer_path_for(cfg.init_from, cfg.tokenizer)
    tok = load_tokenizer(tok_path)

    # ---- model: SFT backbone + fresh score head
    if cfg.init_from:
        model = checkpoint.load_model(cfg.init_from, kind="scalar")
    else:
        model = checkpoint.new_model(cfg, tok.vocab_size, kind="scalar")
    model = lora.from_config(model, cfg, cfg.init_from, trainable=("score_head.",)).to(rt.device)
    runtime.print0(rt, f"reward model: {lora.describe(model)}; {model.cfg}")

    # ---- data
    stats = {}
    pairs = load_preferences(cfg.data, stats, **cfg.pair_options())
    examples = tokenize_preferences(pairs, tok, cfg.max_len, stats=stats)
    check_margins(examples, cfg.data)
    groups = group_pairs(examples)  # a ranked-output record's pairs are one group: one batch element
    lengths = group_lengths(groups)
    eval_examples = []
    if cfg.eval_data:
        eval_examples = tokenize_preferences(load_preferences(cfg.eval_data, **cfg.pair_options()), tok, cfg.max_len)
        check_margins(eval_examples, cfg.eval_data)
    global_batch = cfg.micro_batch_pairs * cfg.grad_accum * rt.world_size
    ranked = sum(len(g["pairs"]) > 1 for g in groups)
    with_margins = " with margins" if "margin" in examples[0] else ""
    runtime.print0(rt, f"data: {len(examples)} pairs{with_margins} in {len(groups)} "
                       f"groups ({ranked} ranked groups of several pairs); prompts truncated "
                       f"{stats.get('prompt_truncated', 0)}, responses truncated {stats.get('response_truncated', 0)}; "
                       f"{len(eval_examples)} held-out pairs")
    epochs = cfg.max_steps * global_batch / len(groups)
    runtime.print0(rt, f"global batch {global_batch} groups (pairs, or a ranked prompt's pairs) = "
                       f"{cfg.micro_batch_pairs} x {cfg.grad_accum} accum x {rt.world_size} ranks; "
                       f"{cfg.max_steps} steps = {epochs:.2f} epochs")

    # ---- DDP or FSDP, optimizer (over the sharded parameters with --fsdp), resume
    model = runtime.wrap_ddp(model, rt, cfg.compile, gradient_checkpointing=cfg.gradient_checkpointing, fsdp=cfg.fsdp)
    optimizer = loop.make_optimizer(model, cfg, rt)
    scaler = rt.make_scaler()
    start_step = checkpoint.resume(cfg, model, optimizer, scaler, rt)
    log = logger.MetricsLog(cfg.out_dir, rt, start_step if cfg.resume else None, cfg.tensorboard)

    def evaluate(step: int):
        metrics, chosen, rejected = evaluate_rm(runtime.unwrap(model), eval_examples, cfg, rt, tok.pad_id)
        log.log(step, metrics, bar)
        checkpoint.write_json({"step": step, **metrics, "chosen": chosen, "rejected": rejected},
                              f"{cfg.out_dir}/rm_scores.json")
        save_histogram(chosen, rejected, f"{cfg.out_dir}/rm_scores.png", f"held-out rewards at step {step}")
        return metrics

    # ---- train
    model.train()
    bar = tqdm(range(start_step, cfg.max_steps), initial=start_step, total=cfg.max_steps, desc="rm",
               disable=not rt.is_main)
    for step in bar:
        lr = loop.lr_at(step, cfg.lr, cfg.warmup_steps, cfg.max_steps, cfg.min_lr_ratio)
        loop.set_lr(optimizer, lr)
        order = loop.step_batches(len(groups), step, cfg, rt, lengths)
        batches = [to_device(collate_groups([groups[i] for i in idx], tok.pad_id), rt.device) for idx in order]
        seen_rewards = []
        metrics = loop.train_step(model, optimizer, scaler, batches,
                                      lambda m, b: rm_loss(m, b, cfg.center_coef, seen_rewards), pair_count, rt,
                                      cfg.max_grad_norm)
        loop.check_finite(metrics, step, cfg, stats, scaler)
        metrics["min_reward"], metrics["max_reward"] = reward_range(seen_rewards, rt)
        bar.set_postfix(loss=f"{metrics['loss']:.3f}", acc=f"{metrics['accuracy']:.2f}")
        if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.max_steps:
            log.log(step + 1, {**metrics, "learning_rate": lr, **loop.skip_counts(stats)}, bar)
        at_eval = (cfg.eval_every and (step + 1) % cfg.eval_every == 0) or step + 1 == cfg.max_steps
        if eval_examples and at_eval:
            with runtime.gathered(model):  # --fsdp: rank 0 evaluates alone on the gathered weights
                final = evaluate(step + 1) if rt.is_main else None
        if checkpoint.should_save(step + 1, start_step, cfg):
            checkpoint.save(cfg.out_dir, model=model, optimizer=optimizer, scaler=scaler, step=step + 1, cfg=cfg,
                            tokenizer_path=tok_path, finished=step + 1 == cfg.max_steps, rt=rt)
        if checkpoint.should_stop(step + 1, start_step, cfg):
            runtime.print0(rt, f"stopping after {cfg.stop_after_steps} steps as asked; continue with --resume")
            runtime.cleanup(rt)
            return
    bar.close()

    if eval_examples and start_step == cfg.max_steps:  # resumed a finished run: nothing trained, evaluate it anyway
        with runtime.gathered(model):
            final = evaluate(cfg.max_steps) if rt.is_main else None
    if eval_examples and rt.is_main:
        print(f"rm eval on {len(eval_examples)} held-out pairs: accuracy {final['eval_accuracy']:.4f}  "
              f"margin {final['eval_margin']:.3f}  "
              f"rewards chosen {final['eval_rewards/chosen']:.3f} rejected {final['eval_rewards/rejected']:.3f}  "
              f"min {final['eval_min_reward']:.3f} max {final['eval_max_reward']:.3f}  -> {cfg.out_dir}/rm_scores.json")
    runtime.cleanup(rt)


if __name__ == "__main__":
    run_cli(main)
