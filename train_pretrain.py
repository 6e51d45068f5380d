"""Pretraining: next-token prediction on plain text, every token trained.

Objective: minimize -1/N * sum_t log pi(x_t | x_<t) over the N tokens of the whole optimizer step
(all micro-batches and ranks; see minialign.training.loop). Documents are cut into windows of max_len tokens,
each document ending with <|im_end|> (it doubles as end-of-document).

On the default task pretraining is optional: SFT from scratch already learns the format. It is here
for the full story, and for your own text corpora ({"text": ...} JSONL, or a .txt file).

Run on one device:         python train_pretrain.py             (data/pretrain.jsonl -> out/pretrain)
Run on N GPUs / processes: torchrun --nproc_per_node=N train_pretrain.py   (add --fsdp to shard the model over them)
Then:                      python train_sft.py --init_from out/pretrain
Needs a tokenizer first:   python -m minialign.data.tokenizer
"""

from dataclasses import dataclass

import torch
from tqdm import tqdm

from minialign.algorithms.losses import SUM, nll_loss, token_logps
from minialign.data.batching import collate_lm, to_device, tokenize_pretrain
from minialign.data.formats import load_pretrain
from minialign.data.tokenizer import load_tokenizer
from minialign.errors import run_cli
from minialign.training import checkpoint, logger, loop, runtime
from minialign.training.config import (FromScratch, FSDPConfig, OfflineConfig, SequenceBatch, knob, one_of,
                                       parse_config)


@dataclass
class Config(OfflineConfig, SequenceBatch, FromScratch, FSDPConfig):
    out_dir: str = knob("out/pretrain", "output folder")
    init_from: str = knob("", "checkpoint folder to continue from; empty = random init from --preset")
    data: str = knob("data/pretrain.jsonl", "text corpus: {\"text\": ...} JSONL(.gz), JSON, or a plain .txt file")
    text_split: str = knob("auto", ".txt files: paragraph (documents end at blank lines) | line (one document per "
                                   "line) | auto (paragraph if the file has blank lines between text, else line)",
                           one_of("auto", "paragraph", "line"))


def lm_loss(model, batch):
    """Summed NLL over real tokens (loop.train_step divides by the step's token count)."""
    mask = batch["label_mask"]  # (B, T) bool: real (non-pad) tokens
    logits = model(batch["inputs"], logits_mask=mask)  # (M, V): the head skips pad positions
    logps = token_logps(logits[None], batch["labels"][mask][None])  # (1, M) float32
    return nll_loss(logps, torch.ones_like(logps, dtype=torch.bool), normalizer=SUM), {}  # -Σ log π(x_t)


def main(argv=None):
    cfg = parse_config(Config, argv)
    checkpoint.check_out_dir(cfg)  # an out_dir holding a run: --resume or --overwrite, else refused
    rt = runtime.setup(cfg)
    if rt.is_main:
        checkpoint.check_writable(cfg.out_dir)
    tok_path = checkpoint.tokenizer_path_for(cfg.init_from, cfg.tokenizer)
    tok = load_tokenizer(tok_path)

    model = checkpoint.load_model(cfg.init_from) if cfg.init_from else checkpoint.new_model(cfg, tok.vocab_size)
    model.to(rt.device)
    runtime.print0(rt, f"model: {model.num_params() / 1e6:.2f}M parameters, {model.cfg}")

    stats = {}
    documents = load_pretrain(cfg.data, stats, text_split=cfg.text_split)
    windows = tokenize_pretrain(documents, tok, cfg.max_len)
    lengths = [len(w) for w, _ in windows]
    global_batch = cfg.micro_batch_size * cfg.grad_accum * rt.world_size
    epochs = cfg.max_steps * global_batch / len(windows)
    split = f" (.txt split by {stats['text_split']})" if "text_split" in stats else ""
    runtime.print0(rt, f"data: {len(documents)} documents{split} -> {len(windows)} windows of <= {cfg.max_len} tokens, "
                       f"{sum(lengths)} tokens; "
                       f"{cfg.max_steps} steps x {global_batch} sequences = {epochs:.2f} epochs")

    # ---- DDP or FSDP, optimizer (over the sharded parameters with --fsdp), resume
    model = runtime.wrap_ddp(model, rt, cfg.compile, gradient_checkpointing=cfg.gradient_checkpointing, fsdp=cfg.fsdp)
    optimizer = loop.make_optimizer(model, cfg, rt)
    scaler = rt.make_scaler()
    start_step = checkpoint.resume(cfg, model, optimizer, scaler, rt)
    log = logger.MetricsLog(cfg.out_dir, rt, start_step if cfg.resume else None, cfg.tensorboard)

    model.train()
    bar = tqdm(range(start_step, cfg.max_steps), initial=start_step, total=cfg.max_steps, desc="pretrain",
               disable=not rt.is_main)
    for step in bar:
        lr = loop.lr_at(step, cfg.lr, cfg.warmup_steps, cfg.max_steps, cfg.min_lr_ratio)
        loop.set_lr(optimizer, lr)
        order = loop.step_batches(len(windows), step, cfg, rt, lengths)
        batches = [to_device(collate_lm([windows[i] for i in idx], tok.pad_id), rt.device) for idx in order]
        metrics = loop.train_step(model, optimizer, scaler, batches, lm_loss, lambda b: b["label_mask"].sum(), rt,
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
            break
    runtime.cleanup(rt)


if __name__ == "__main__":
    run_cli(main)
