"""Supervised fine-tuning: next-token loss on the assistant tokens of chat conversations.

Objective: minimize -1/N * sum over every assistant token y_t of the step of log pi(y_t | y_<t), where
N counts the assistant tokens (including each turn's <|im_end|>) of the WHOLE optimizer step, over
all micro-batches and ranks (see minialign.training.loop). System, user and template tokens are context only.

Run on one device:        python train_sft.py                         (data/sft_train.jsonl -> out/sft)
Run on N GPUs / processes: torchrun --nproc_per_node=N train_sft.py   (add --fsdp to shard the model over them)
Start from pretraining:   python train_sft.py --init_from out/pretrain
LoRA on a pretrained model: python train_sft.py --init_from out/pretrain --lora_r 8   (minialign.models.lora)
Accepted data formats: see minialign.data.formats (messages, conversations, prompt/completion, alpaca).
"""

from dataclasses import dataclass

import torch
from tqdm import tqdm

from minialign.algorithms.losses import SUM, nll_loss, token_logps
from minialign.data.batching import collate_lm, to_device, tokenize_sft
from minialign.data.formats import load_sft
from minialign.data.tokenizer import load_tokenizer
from minialign.errors import run_cli
from minialign.evaluation.evaluate import evaluate_policy, format_result, load_eval_prompts
from minialign.models import lora
from minialign.training import checkpoint, logger, loop, runtime
from minialign.training.config import (EvalConfig, FromScratch, FSDPConfig, LoRAConfig, OfflineConfig, SequenceBatch,
                                       knob, parse_config)


@dataclass
class Config(OfflineConfig, SequenceBatch, FromScratch, EvalConfig, LoRAConfig, FSDPConfig):
    out_dir: str = knob("out/sft", "output folder")
    init_from: str = knob("", "checkpoint folder to start from (e.g. out/pretrain); empty = random init from --preset")
    data: str = knob("data/sft_train.jsonl", "SFT conversations: JSONL(.gz) or JSON (formats: minialign.data.formats)")
    max_steps: int = knob(600, "optimizer steps (600 x 128 sequences = 7 epochs of the default task)")
    lr: float = knob(3e-3, "peak learning rate")
    grad_accum: int = knob(4, "micro-batches per optimizer step (per rank); 4 x 32 = 128 sequences a step")


def sft_loss(model, batch):
    """Summed NLL over trained tokens (loop.train_step divides by the step's token count)."""
    mask = batch["label_mask"]  # (B, T) bool: assistant tokens
    # right padding needs no attention mask (see minialign.data.batching); the head runs on trained positions only
    logits = model(batch["inputs"], logits_mask=mask)  # (M, V), M = mask.sum()
    logps = token_logps(logits[None], batch["labels"][mask][None])  # (1, M) float32
    return nll_loss(logps, torch.ones_like(logps, dtype=torch.bool), normalizer=SUM), {}  # -Σ log π(y_t)


def main(argv=None):
    cfg = parse_config(Config, argv)
    checkpoint.check_out_dir(cfg)  # an out_dir holding a run: --resume or --overwrite, else refused
    rt = runtime.setup(cfg)
    if rt.is_main:
        checkpoint.check_writable(cfg.out_dir)
    tok_path = checkpoint.tokenizer_path_for(cfg.init_from, cfg.tokenizer)
    tok = load_tokenizer(tok_path)

    # ---- model
    model = checkpoint.load_model(cfg.init_from) if cfg.init_from else checkpoint.new_model(cfg, tok.vocab_size)
    model = lora.from_config(model, cfg, cfg.init_from).to(rt.device)  # --lora_r 0: unchanged
    runtime.print0(rt, f"model: {lora.describe(model)}; {model.cfg}")

    # ---- data
    stats = {}
    examples = tokenize_sft(load_sft(cfg.data), tok, cfg.max_len, stats)
    n_tokens = sum(sum(m) for _, m in examples)
    lengths = [len(ids) for ids, _ in examples]
    global_batch = cfg.micro_batch_size * cfg.grad_accum * rt.world_size
    runtime.print0(rt, f"data: {len(examples)} conversations, {n_tokens} trained tokens; "
                       f"truncated {stats.get('truncated', 0)}, dropped {stats.get('dropped_no_response_tokens', 0)} "
                       f"(no assistant token within max_len)")
    epochs = cfg.max_steps * global_batch / len(examples)
    runtime.print0(rt, f"global batch {global_batch} sequences = {cfg.micro_batch_size} x {cfg.grad_accum} accum x "
                       f"{rt.world_size} ranks; {cfg.max_steps} steps = {epochs:.2f} epochs")

    eval_prompts = None  # held-out prompts for the gold rule, loaded now: too-long ones dropped and counted up front
    if cfg.eval_data and rt.is_main:
        eval_prompts = load_eval_prompts(cfg.eval_data, tok, cfg.eval_prompts, cfg.eval_max_new_tokens,
                                         model.cfg.max_seq_len)

    # ---- DDP or FSDP, optimizer (over the sharded parameters with --fsdp), resume
    model = runtime.wrap_ddp(model, rt, cfg.compile, gradient_checkpointing=cfg.gradient_checkpointing, fsdp=cfg.fsdp)
    optimizer = loop.make_optimizer(model, cfg, rt)
    scaler = rt.make_scaler()
    start_step = checkpoint.resume(cfg, model, optimizer, scaler, rt)
    log = logger.MetricsLog(cfg.out_dir, rt, start_step if cfg.resume else None, cfg.tensorboard)

    # ---- train
    model.train()
    bar = tqdm(range(start_step, cfg.max_steps), initial=start_step, total=cfg.max_steps, desc="sft",
               disable=not rt.is_main)
    for step in bar:
        lr = loop.lr_at(step, cfg.lr, cfg.warmup_steps, cfg.max_steps, cfg.min_lr_ratio)
        loop.set_lr(optimizer, lr)
        order = loop.step_batches(len(examples), step, cfg, rt, lengths)
        batches = [to_device(collate_lm([examples[i] for i in idx], tok.pad_id), rt.device) for idx in order]
        metrics = loop.train_step(model, optimizer, scaler, batches, sft_loss, lambda b: b["label_mask"].sum(), rt,
                                      cfg.max_grad_norm)
        loop.check_finite(metrics, step, cfg, stats, scaler)
        bar.set_postfix(loss=f"{metrics['loss']:.3f}")
        if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.max_steps:
            log.log(step + 1, {**metrics, "learning_rate": lr, **loop.skip_counts(stats)}, bar)
        if checkpoint.should_save(step + 1, start_step, cfg):
            checkpoint.save(cfg.out_dir, model=model, optimizer=optimizer, scaler=scaler, step=step + 1, cfg=cfg,
                            tokenizer_path=tok_path, finished=step + 1 == cfg.max_steps, rt=rt)
        if checkpoint.should_stop(step + 1, start_step, cfg):
            runtime.print0(rt, f"stopping after {cfg.stop_after_steps} steps as asked; continue with --resume")
            runtime.cleanup(rt)
            return
    bar.close()

    # ---- evaluate with the gold rule
    with runtime.gathered(model):  # --fsdp: rank 0 evaluates alone on the gathered weights
        if eval_prompts:
            res = evaluate_policy(runtime.unwrap(model).eval(), tok, eval_prompts, cfg.eval_max_new_tokens)
            checkpoint.write_json(res, f"{cfg.out_dir}/eval.json")
            log.log(cfg.max_steps, {k: v for k, v in res.items() if k != "examples"})
            print(f"sft eval on {res['n_prompts']} held-out prompts: {format_result(res)}")
    runtime.cleanup(rt)


if __name__ == "__main__":
    run_cli(main)
