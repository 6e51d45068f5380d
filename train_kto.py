"""KTO: preference optimization from unpaired examples, each completion labeled desirable or undesirable.

Objective (Ethayarajh et al. 2024, "KTO: Model Alignment as Prospect Theoretic Optimization", Eq. 8;
minialign.algorithms.losses.kto_loss), over examples (x, y, label):
    r(x, y) = log π(y|x) - log ref(y|x)                    the implicit reward (summed over y's tokens)
    z0      = max(0, mean over mismatched pairs (x, y') of r(x, y'))          the reference point
    loss    = λ_D (1 - σ(β (r - z0)))   for desirable y,    λ_U (1 - σ(β (z0 - r)))   for undesirable y
averaged over every example of the optimizer step (all micro-batches and ranks, see minialign.training.loop).
π is the policy being trained, ref the frozen SFT model both start from.

Data: --data {prompt, completion, label} (or {messages, label}, minialign.data.formats.load_unpaired), or
--pairs a preference file split into desirable (chosen) and undesirable (rejected) completions.

z0 is estimated as in the KTO paper and TRL: on MISMATCHED pairs, each prompt x with the completion y'
of another example (TRL's +1 offset, here over the whole dataset order: example i borrows example
i+1's completion, so the pairing is fixed and --precompute_ref can precompute it), detached and clamped
at 0. The borrowed completion was truncated for ITS prompt; it is cut again to fit x's row within
--max_len (at least one token kept), and such cuts are counted in the log. Its policy term is a no-grad
forward. Simplified: TRL also averages z0 over ranks; here it is per micro-batch, so a torchrun run
matches a single process only up to that estimate.

Run on one device:        python train_kto.py                           (out/sft + data/pref_train.jsonl split)
Run on N GPUs / processes: torchrun --nproc_per_node=N train_kto.py   (add --fsdp to shard the policy over them)
Unpaired data:            python train_kto.py --data my_unpaired.jsonl
With LoRA:                python train_kto.py --lora_r 8 --lr 4e-3  (reference: the policy, adapters off; lr as DPO's)
"""

from dataclasses import dataclass

import torch
from tqdm import tqdm

from minialign.algorithms.losses import kto_loss
from minialign.algorithms.preference import (collate_completions, completion_logps, kl_partner, reference_table,
                                             tokenize_unpaired, unpair)
from minialign.algorithms.roles import disable_dropout, sft_reference
from minialign.data.batching import to_device, tokenize_preferences
from minialign.data.formats import load_preferences, load_unpaired
from minialign.data.tokenizer import load_tokenizer
from minialign.errors import run_cli
from minialign.evaluation.evaluate import evaluate_policy, format_result, gold_point, load_eval_prompts
from minialign.models import lora
from minialign.training import checkpoint, logger, loop, runtime
from minialign.training.config import (FSDPConfig, GoldCurveConfig, LoRAConfig, OfflineConfig, PairsConfig,
                                       SequenceBatch, knob, non_negative, parse_config)


@dataclass
class Config(OfflineConfig, SequenceBatch, PairsConfig, GoldCurveConfig, LoRAConfig, FSDPConfig):
    out_dir: str = knob("out/kto", "output folder")
    init_from: str = knob("out/sft", "SFT checkpoint: the policy starts from it and the reference IS it")
    data: str = knob("", "unpaired examples {prompt, completion, label} or {messages, label} ('' = split --pairs)")
    pairs: str = knob("data/pref_train.jsonl", "preference pairs split into desirable / undesirable examples "
                                               "(used when --data is empty)")
    beta: float = knob(2.0, "β of the loss (the scale of DPO's summed log-ratios on the default task)", non_negative)
    desirable_weight: float = knob(1.0, "λ_D, weight of desirable examples", non_negative)
    undesirable_weight: float = knob(1.0, "λ_U, weight of undesirable examples", non_negative)
    precompute_ref: bool = knob(False, "compute reference log-probs once before training, then free the reference "
                                       "model")
    max_steps: int = knob(150, "optimizer steps")
    lr: float = knob(2e-4, "peak learning rate")
    warmup_steps: int = knob(10, "linear warmup steps")
    micro_batch_size: int = knob(64, "examples per forward pass per rank")

    def problems(self, world_size):
        out = [] if self.init_from else ["--init_from is required: the policy starts from, and the reference is, "
                                         "an SFT checkpoint"]
        return out + ([] if self.data or self.pairs else ["give --data (unpaired) or --pairs"])


def kl_completion(examples, i, max_len, stats=None):
    """Example i's mismatched completion (that of kl_partner(i)), cut to fit i's prompt in max_len, >= 1 token."""
    borrowed = examples[kl_partner(i, len(examples))]["completion"]
    room = max(1, max_len - len(examples[i]["prompt"]))
    if len(borrowed) > room and stats is not None:
        stats["kl_completion_truncated"] = stats.get("kl_completion_truncated", 0) + 1
    return borrowed[:room]


def collate_kto(examples, idx, pad_id, max_len, ref_table=None):
    """Rows for examples idx, their mismatched KL rows (prompt i, completion of kl_partner(i)), labels."""
    ex = [examples[i] for i in idx]
    prompts = [e["prompt"] for e in ex]
    batch = collate_completions(prompts, [e["completion"] for e in ex], pad_id)
    kl = collate_completions(prompts, [kl_completion(examples, i, max_len) for i in idx], pad_id)
    batch["kl"] = kl
    batch["is_desirable"] = torch.tensor([e["label"] for e in ex], dtype=torch.bool)
    if ref_table is not None:
        batch["ref_logps"], batch["ref_kl_logps"] = ref_table[idx, 0], ref_table[idx, 1]
    return batch


def batch_to(batch, device):
    return {**to_device(batch, device), "kl": to_device(batch["kl"], device)}


def kto_batch_loss(model, batch, ref_model, cfg):
    """Summed KTO loss over the batch's examples; metrics as sums, with the desirable / undesirable counts."""
    with torch.no_grad():  # z0's policy term, detached anyway; run first so the MoE term is the main forward's
        policy_kl_logps = completion_logps(model, batch["kl"])[0]
    policy_logps, _, logit_means = completion_logps(model, batch)  # (N,)
    if "ref_logps" in batch:
        ref_logps, ref_kl_logps = batch["ref_logps"], batch["ref_kl_logps"]
    else:
        with torch.no_grad():
            ref_logps, ref_kl_logps = completion_logps(ref_model, batch)[0], completion_logps(ref_model, batch["kl"])[0]
    z0 = (policy_kl_logps - ref_kl_logps).mean()  # KL(π ‖ ref) on mismatched pairs; kto_loss clamps it at 0
    desirable = batch["is_desirable"]
    losses, rewards = kto_loss(policy_logps, ref_logps, desirable, z0, cfg.beta, cfg.desirable_weight,
                               cfg.undesirable_weight)
    d, u = desirable.float(), (~desirable).float()
    sums = {
        "kl": z0.clamp(min=0) * len(losses),
        "count/chosen": d.sum(), "count/rejected": u.sum(),
        "rewards/chosen": (rewards * d).sum(), "rewards/rejected": (rewards * u).sum(),
        "logps/chosen": (policy_logps.detach() * d).sum(), "logps/rejected": (policy_logps.detach() * u).sum(),
        "logits/chosen": (logit_means * d).sum(), "logits/rejected": (logit_means * u).sum(),
    }
    return losses.sum(), sums


def side_means(metrics):
    """train_step's means over all examples -> means over desirable (chosen) / undesirable (rejected) ones."""
    n = {side: metrics.pop(f"count/{side}") for side in ("chosen", "rejected")}
    for key in [k for k in metrics if k.endswith(("/chosen", "/rejected"))]:
        side = key.rsplit("/", 1)[1]
        metrics[key] = metrics[key] / n[side] if n[side] else float("nan")
    metrics["rewards/margins"] = metrics["rewards/chosen"] - metrics["rewards/rejected"]
    return metrics


def precompute_reference(ref_model, examples, pad_id, cfg, rt):
    """(n, 2) float32 table of the reference's log-probs of each example's row and of its KL row."""
    def rows(idx):
        batch = batch_to(collate_kto(examples, idx, pad_id, cfg.max_len), rt.device)
        return torch.stack([completion_logps(ref_model, batch)[0], completion_logps(ref_model, batch["kl"])[0]], dim=1)
    lengths = [len(e["prompt"]) + len(e["completion"]) for e in examples]
    return reference_table(lengths, cfg.micro_batch_size, 2, rows, rt, "reference log-probs")


def main(argv=None):
    cfg = parse_config(Config, argv)
    checkpoint.check_out_dir(cfg)  # an out_dir holding a run: --resume or --overwrite, else refused
    rt = runtime.setup(cfg)
    if rt.is_main:
        checkpoint.check_writable(cfg.out_dir)
    tok_path = checkpoint.tokenizer_path_for(cfg.init_from)
    tok = load_tokenizer(tok_path)

    # ---- models: the policy and its frozen reference (the same SFT weights)
    model = lora.from_config(disable_dropout(checkpoint.load_model(cfg.init_from)), cfg, cfg.init_from).to(rt.device)
    ref_model = sft_reference(model, cfg, rt)  # LoRA: the policy with its adapters off; else a frozen copy
    ref_model = runtime.shard_frozen(ref_model, rt, cfg)  # --fsdp --shard_frozen; else whole on every rank
    runtime.print0(rt, f"policy from {cfg.init_from}: {lora.describe(model)}; beta {cfg.beta}; reference: "
                       + ("adapters off" if cfg.lora_r else "frozen copy")
                       + (", precomputed then freed" if cfg.precompute_ref else ""))

    # ---- data: unpaired examples, each KL row's borrowed completion cut to fit (counted)
    stats = {}
    if cfg.data:
        examples = tokenize_unpaired(load_unpaired(cfg.data, stats), tok, cfg.max_len, stats)
    else:
        pairs = load_preferences(cfg.pairs, stats, **cfg.pair_options())
        examples = unpair(tokenize_preferences(pairs, tok, cfg.max_len, stats=stats))
    for i in range(len(examples)):
        kl_completion(examples, i, cfg.max_len, stats)
    lengths = [len(e["prompt"]) + len(e["completion"]) for e in examples]
    n_desirable = sum(e["label"] for e in examples)
    global_batch = cfg.micro_batch_size * cfg.grad_accum * rt.world_size
    runtime.print0(rt, f"data: {len(examples)} examples ({n_desirable} desirable, {len(examples) - n_desirable} "
                       f"undesirable) from {cfg.data or cfg.pairs + ' (pairs split)'}; truncated "
                       f"{stats.get('prompt_truncated', 0)} prompts, {stats.get('response_truncated', 0)} completions, "
                       f"{stats.get('kl_completion_truncated', 0)} borrowed KL completions (max_len={cfg.max_len}); "
                       f"{cfg.max_steps} steps = {cfg.max_steps * global_batch / len(examples):.2f} epochs")
    eval_prompts = None
    if cfg.eval_data and rt.is_main:
        eval_prompts = load_eval_prompts(cfg.eval_data, tok, 0, cfg.eval_max_new_tokens, model.cfg.max_seq_len)

    ref_table = None
    if cfg.precompute_ref:
        with runtime.gathered(ref_model):  # --shard_frozen: the ranks' shares of the table differ in size
            ref_table = precompute_reference(ref_model, examples, tok.pad_id, cfg, rt)
        ref_model = None  # freed: one model in memory while training

    def kl_reference():  # the SFT model for KL: the live reference, or loaded again if precompute freed it
        return ref_model if ref_model is not None else sft_reference(model, cfg, rt)

    gold_ref = kl_reference() if eval_prompts and cfg.gold_eval_every else None

    # ---- DDP or FSDP, optimizer (over the sharded parameters with --fsdp), resume
    model = runtime.wrap_ddp(model, rt, cfg.compile, gradient_checkpointing=cfg.gradient_checkpointing, fsdp=cfg.fsdp)
    optimizer = loop.make_optimizer(model, cfg, rt)
    scaler = rt.make_scaler()
    start_step = checkpoint.resume(cfg, model, optimizer, scaler, rt)
    log = logger.MetricsLog(cfg.out_dir, rt, start_step if cfg.resume else None, cfg.tensorboard)

    # ---- train
    model.train()
    bar = tqdm(range(start_step, cfg.max_steps), initial=start_step, total=cfg.max_steps, desc="kto",
               disable=not rt.is_main)
    for step in bar:
        lr = loop.lr_at(step, cfg.lr, cfg.warmup_steps, cfg.max_steps, cfg.min_lr_ratio)
        loop.set_lr(optimizer, lr)
        batches = [batch_to(collate_kto(examples, idx, tok.pad_id, cfg.max_len, ref_table), rt.device)
                   for idx in loop.step_batches(len(examples), step, cfg, rt, lengths)]
        metrics = loop.train_step(model, optimizer, scaler, batches,
                                      lambda m, b: kto_batch_loss(m, b, ref_model, cfg),
                                      lambda b: len(b["is_desirable"]), rt, cfg.max_grad_norm)
        metrics = side_means(metrics)
        loop.check_finite(metrics, step, cfg, stats, scaler)
        bar.set_postfix(loss=f"{metrics['loss']:.3f}")
        done = step + 1
        if done % cfg.log_every == 0 or done == cfg.max_steps:
            log.log(done, {**metrics, "learning_rate": lr, **loop.skip_counts(stats)}, bar)
        if cfg.eval_data and cfg.gold_eval_every and done % cfg.gold_eval_every == 0 and done < cfg.max_steps:
            with runtime.gathered(model, ref_model):  # --fsdp: rank 0 samples alone on the gathered weights
                if gold_ref is not None:
                    log.log(done, gold_point(runtime.unwrap(model), tok, eval_prompts[:cfg.gold_eval_prompts],
                                             cfg.eval_max_new_tokens, gold_ref), bar)
        if checkpoint.should_save(done, start_step, cfg):
            checkpoint.save(cfg.out_dir, model=model, optimizer=optimizer, scaler=scaler, step=done, cfg=cfg,
                            tokenizer_path=tok_path, finished=done == cfg.max_steps, rt=rt)
        if checkpoint.should_stop(done, start_step, cfg):
            runtime.print0(rt, f"stopping after {cfg.stop_after_steps} steps as asked; continue with --resume")
            runtime.cleanup(rt)
            return
    bar.close()

    # ---- evaluate with the gold rule, KL measured against the SFT model
    with runtime.gathered(model, ref_model):  # --fsdp: rank 0 evaluates alone on the gathered weights
        if eval_prompts:
            res = evaluate_policy(runtime.unwrap(model).eval(), tok, eval_prompts[:cfg.eval_prompts or None],
                                  cfg.eval_max_new_tokens, gold_ref or kl_reference())
            checkpoint.write_json(res, f"{cfg.out_dir}/eval.json")
            log.log(cfg.max_steps, {k: v for k, v in res.items() if k != "examples"})
            print(f"kto eval on {res['n_prompts']} held-out prompts: {format_result(res)}")
    runtime.cleanup(rt)


if __name__ == "__main__":
    run_cli(main)
