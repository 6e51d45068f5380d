"""Pretraining: next-token prediction on plain text, every token trained.

Objective: minimize -1/N * sum_t log pi(x_t | x_<t) over the N tokens of the whole optimizer step
(all micro-batches and ranks; see minialign.engine). Documents are cut into windows of max_len tokens,
each document ending with <|im_end|> (it doubles as end-of-document).

On the default task pretraining is optional: SFT from scratch already learns the format. It is here
for the full story, and for your own text corpora ({"text": ...} JSONL, or a .txt file).

Run on one device:         python train_pretrain.py             (data/pretrain.jsonl -> out/pretrain)
Run on N GPUs / processes: torchrun --nproc_per_node=N train_pretrain.py
Then:                      python train_sft.py --init_from out/pretrain
Needs a tokenizer first:   python -m minialign.tokenizer
"""

from dataclasses import dataclass

from tqdm import tqdm

from minialign import engine
from minialign.data import collate_lm, tokenize_pretrain
from minialign.engine import TrainConfig, knob
from minialign.formats import load_pretrain
from minialign.losses import token_logps
from minialign.tokenizer import Tokenizer


@dataclass
class Config(TrainConfig):
    data: str = knob("data/pretrain.jsonl", "text corpus: {\"text\": ...} JSONL(.gz) or a plain .txt file")


def lm_loss(model, batch):
    """Summed NLL over real tokens (engine.train_step divides by the step's token count)."""
    mask = batch["label_mask"]  # (B, T) bool: real (non-pad) tokens
    logits = model(batch["inputs"], logits_mask=mask)  # (M, V): the head skips pad positions
    logps = token_logps(logits[None], batch["labels"][mask][None])  # (1, M) float32
    base = engine.unwrap(model)
    return -logps.sum() + base.cfg.moe_aux_coef * base.backbone.moe_aux_loss() * mask.sum(), {}


def main(argv=None):
    cfg = engine.parse_config(Config, argv)
    cfg.out_dir = cfg.out_dir or "out/pretrain"
    rt = engine.setup_runtime(cfg)
    if rt.is_main:
        engine.check_writable(cfg.out_dir)
    tok_path = engine.tokenizer_path_for(cfg)
    tok = Tokenizer(tok_path)

    model = engine.load_model(cfg.init_from) if cfg.init_from else engine.new_model(cfg, tok.vocab_size)
    model.to(rt.device)
    engine.print0(rt, f"model: {model.num_params() / 1e6:.2f}M parameters, {model.cfg}")

    windows = tokenize_pretrain(load_pretrain(cfg.data), tok, cfg.max_len)
    lengths = [len(w) for w, _ in windows]
    global_batch = cfg.micro_batch_size * cfg.grad_accum * rt.world_size
    engine.print0(rt, f"data: {len(windows)} windows of <= {cfg.max_len} tokens, {sum(len(w) for w, _ in windows)} tokens; "
                      f"{cfg.max_steps} steps x {global_batch} sequences = {cfg.max_steps * global_batch / len(windows):.2f} epochs")

    optimizer = engine.make_optimizer(model, cfg, rt)
    scaler = rt.make_scaler()
    start_step = engine.resume_from_checkpoint(cfg, model, optimizer, scaler)
    model = engine.wrap_ddp(model, rt, cfg)
    log = engine.MetricsLog(cfg.out_dir, rt, resume_step=start_step if cfg.resume else None)
    stats = {}

    model.train()
    bar = tqdm(range(start_step, cfg.max_steps), initial=start_step, total=cfg.max_steps, desc="pretrain", disable=not rt.is_main)
    for step in bar:
        lr = engine.lr_at(step, cfg.lr, cfg.warmup_steps, cfg.max_steps, cfg.min_lr_ratio)
        engine.set_lr(optimizer, lr)
        batches = [collate_lm([windows[i] for i in idx], tok.pad_id) for idx in engine.step_batches(len(windows), step, cfg, rt, lengths)]
        batches = [{k: v.to(rt.device) for k, v in b.items()} for b in batches]
        metrics = engine.train_step(model, optimizer, scaler, batches, lm_loss, lambda b: b["label_mask"].sum(), rt, cfg)
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
            break
    engine.cleanup(rt)


if __name__ == "__main__":
    main()
