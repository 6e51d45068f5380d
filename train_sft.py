"""Supervised fine-tuning: next-token loss on the assistant tokens of chat conversations.

Objective: minimize -1/N * sum over every assistant token y_t of the step of log pi(y_t | y_<t), where
N counts the assistant tokens (including each turn's <|im_end|>) of the WHOLE optimizer step, over
all micro-batches and ranks (see minialign.engine). System, user and template tokens are context only.

Run on one device:        python train_sft.py                         (data/sft_train.jsonl -> out/sft)
Run on N GPUs / processes: torchrun --nproc_per_node=N train_sft.py
Start from pretraining:   python train_sft.py --init_from out/pretrain
Accepted data formats: see minialign.formats (messages, conversations, prompt/completion, alpaca).
"""

from dataclasses import dataclass

import torch
from tqdm import tqdm

from minialign import engine
from minialign.data import collate_lm, tokenize_sft
from minialign.engine import TrainConfig, knob
from minialign.evaluate import evaluate_policy, format_result, load_eval_prompts
from minialign.formats import load_sft
from minialign.losses import token_logps
from minialign.tokenizer import Tokenizer


@dataclass
class Config(TrainConfig):
    data: str = knob("data/sft_train.jsonl", "SFT conversations (JSONL or JSONL.gz)")
    max_steps: int = knob(600, "optimizer steps (600 x 128 sequences = 7 epochs of the default task)")
    lr: float = knob(3e-3, "peak learning rate")
    grad_accum: int = knob(4, "micro-batches per optimizer step (per rank); 4 x 32 = 128 sequences a step")
    eval_data: str = knob("data/rl_eval.jsonl", "held-out prompts scored by the default task's gold rule ('' = no eval)")
    eval_prompts: int = knob(600, "how many held-out prompts to evaluate at the end")
    max_new_tokens: int = knob(48, "generation length for the evaluation")


def sft_loss(model, batch):
    """Summed NLL over trained tokens (normalized by the step's token count in engine.train_step)."""
    mask = batch["label_mask"]  # (B, T) bool: assistant tokens
    # right padding needs no attention mask (see minialign.data); the head runs on trained positions only
    logits = model(batch["inputs"], logits_mask=mask)  # (M, V), M = mask.sum()
    logps = token_logps(logits[None], batch["labels"][mask][None])  # (1, M) float32
    nll_sum = -logps.sum()
    moe = engine.unwrap(model).backbone.moe_aux_loss()
    moe_coef = engine.unwrap(model).cfg.moe_aux_coef
    # the MoE balance loss is per micro-batch; scale it by the token count so it is a mean after normalization
    return nll_sum + moe_coef * moe * mask.sum(), {}


def main(argv=None):
    cfg = engine.parse_config(Config, argv)
    cfg.out_dir = cfg.out_dir or "out/sft"
    rt = engine.setup_runtime(cfg)
    if rt.is_main:
        engine.check_writable(cfg.out_dir)
    tok_path = engine.tokenizer_path_for(cfg)
    tok = Tokenizer(tok_path)

    # ---- model
    model = engine.load_model(cfg.init_from) if cfg.init_from else engine.new_model(cfg, tok.vocab_size)
    model.to(rt.device)
    engine.print0(rt, f"model: {model.num_params() / 1e6:.2f}M parameters, {model.cfg}")

    # ---- data
    stats = {}
    examples = tokenize_sft(load_sft(cfg.data), tok, cfg.max_len, stats)
    n_tokens = sum(sum(m) for _, m in examples)
    lengths = [len(ids) for ids, _ in examples]
    global_batch = cfg.micro_batch_size * cfg.grad_accum * rt.world_size
    engine.print0(rt, f"data: {len(examples)} conversations, {n_tokens} trained tokens; truncated {stats.get('truncated', 0)}, "
                      f"dropped {stats.get('dropped_no_response_tokens', 0)} (no assistant token within max_len={cfg.max_len})")
    engine.print0(rt, f"global batch {global_batch} sequences = {cfg.micro_batch_size} x {cfg.grad_accum} accum x {rt.world_size} ranks; "
                      f"{cfg.max_steps} steps = {cfg.max_steps * global_batch / len(examples):.2f} epochs")

    # ---- optimizer, resume
    optimizer = engine.make_optimizer(model, cfg, rt)
    scaler = rt.make_scaler()
    start_step = engine.resume_from_checkpoint(cfg, model, optimizer, scaler)
    model = engine.wrap_ddp(model, rt, cfg)
    log = engine.MetricsLog(cfg.out_dir, rt, resume_step=start_step if cfg.resume else None)

    # ---- train
    model.train()
    bar = tqdm(range(start_step, cfg.max_steps), initial=start_step, total=cfg.max_steps, desc="sft", disable=not rt.is_main)
    for step in bar:
        lr = engine.lr_at(step, cfg.lr, cfg.warmup_steps, cfg.max_steps, cfg.min_lr_ratio)
        engine.set_lr(optimizer, lr)
        batches = [collate_lm([examples[i] for i in idx], tok.pad_id) for idx in engine.step_batches(len(examples), step, cfg, rt, lengths)]
        batches = [{k: v.to(rt.device) for k, v in b.items()} for b in batches]
        metrics = engine.train_step(model, optimizer, scaler, batches, sft_loss, lambda b: b["label_mask"].sum(), rt, cfg)
        engine.check_finite(metrics["loss"], metrics["grad_norm"], step, cfg, stats)
        bar.set_postfix(loss=f"{metrics['loss']:.3f}")
        if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.max_steps:
            log.log(step + 1, {"loss": metrics["loss"], "grad_norm": metrics["grad_norm"], "learning_rate": lr,
                               "nonfinite_steps_skipped": stats.get("nonfinite_steps_skipped", 0)}, bar)
        if engine.should_save(step + 1, start_step, cfg):
            engine.save_checkpoint(cfg.out_dir, model=model, optimizer=optimizer, scaler=scaler, step=step + 1, cfg=cfg,
                                   tokenizer_path=tok_path, finished=step + 1 == cfg.max_steps, rt=rt)
        if engine.should_stop(step + 1, start_step, cfg):
            engine.print0(rt, f"stopping after {cfg.stop_after_steps} steps as asked; continue with --resume")
            engine.cleanup(rt)
            return
    bar.close()

    # ---- evaluate with the gold rule
    if cfg.eval_data and rt.is_main:
        policy = engine.unwrap(model).eval()
        res = evaluate_policy(policy, tok, load_eval_prompts(cfg.eval_data, tok, cfg.eval_prompts), cfg.max_new_tokens)
        engine.write_json(res, f"{cfg.out_dir}/eval.json")
        log.log(cfg.max_steps, {k: v for k, v in res.items() if k != "examples"})
        print(f"sft eval on {res['n_prompts']} held-out prompts: {format_result(res)}")
    engine.cleanup(rt)


if __name__ == "__main__":
    main()
