"""Offline preference optimization: DPO and its family, from an SFT checkpoint.

Objective (DPO, Rafailov et al. 2023 Eq. 7), over preference pairs (x, y_c, y_r):
    loss = mean over pairs of  -log σ(β [(log π(y_c|x) - log ref(y_c|x)) - (log π(y_r|x) - log ref(y_r|x))])
where log π(y|x) sums the log-probs of the response tokens only (the final <|im_end|> included), π is
the policy being trained and ref the frozen SFT model both start from. The mean is over every pair of
the optimizer step (all micro-batches and ranks, see minialign.training.loop). --loss_type picks the family
member; each formula is in minialign.algorithms.losses:

    sigmoid  DPO; cDPO with --label_smoothing ε           (summed log-probs)
    robust   rDPO, unbiased under label noise ε            (summed)
    hinge    SLiC: max(0, 1 - βx)                          (summed)
    ipo      IPO: (x - 1/(2β))²                            (length-averaged log-probs, as TRL)
    simpo    SimPO, reference-free, target margin γ        (averaged)   \
    cpo      CPO, reference-free DPO term + NLL(y_c)       (summed)      > no reference model is built
    orpo     ORPO, NLL(y_c) + odds-ratio term              (averaged)   /
    unlikelihood  Welleck et al. 2019: NLL(y_c) - β·mean_t log(1 - π(y_r,t)), per token (averaged; reference-free;
             β is the DPO paper's weight α of the unlikelihood term, default 1)
KTO, on unpaired examples, is its own script: train_kto.py.

Tuning β (sigmoid, 150 steps x 64 pairs from the default task's SFT model; sampled gold score on the
600 held-out prompts, SFT 0.593; KL to the SFT model in nats per response):
    β 0.1, lr 5e-4: 0.462 (KL 96: collapsed into garbage)    β 2, lr 1e-3: 0.788 (KL 7.1)
    β 0.1, lr 1e-4: 0.733 (KL 3.9)                           β 2, lr 5e-4: 0.860 (KL 2.5)
    β 0.5, lr 2e-4: 0.752 (100 steps, KL 7.3)                β 2, lr 3e-4: 0.877 (KL 1.5)
    β 1,   lr 5e-4: 0.773 (KL 6.3)                           β 2, lr 2e-4: 0.912, 0.895 --seed 1 (KL 1.0) <- default
    β 4,   lr 5e-4: 0.857 (KL 1.2)                           β 2, lr 1e-4: 0.892 (KL 0.7)
    β 4,   lr 3e-4: 0.878 (KL 0.7)
A β far above the usual 0.1 wins because the SFT model is very peaked (a whole chosen response has
log-prob ≈ -1.9): with a small β the loss keeps pushing the rejected log-probs down by tens of nats,
the mass goes to tokens nobody trained ("I to help."), and sampling at temperature 1 finds them.

A pair goes through the model as one packed row [prompt | chosen | rejected] (minialign.algorithms.packing), with
an attention mask that hides chosen from rejected, so the prompt is computed once; the log-probs equal
two plain rows' to float error (tested). In bench/bench_dpo.py (26M preset, 8 pairs of 64-token
prompts and responses, fp32 CPU, 1 thread, pairs/s) it measured: live reference two rows 1.52, packed
2.09; precomputed reference two rows 2.18, packed 2.71 (1.78x the plain live-reference run).

--precompute_ref computes the reference log-probs of every training and held-out pair once, before
training (a progress bar), then frees the reference model: one model in memory. Resuming recomputes
them (deterministic). --ref_update_every N (TR-DPO, Gorbatovski et al. 2024) instead moves the live
reference towards the policy every N steps: ref <- α·π + (1-α)·ref (α = 1: a hard copy).
--lora_r R trains adapters only (minialign.models.lora); the reference is then the policy with its adapters
off: one model in memory without precomputing (--precompute_ref still saves the reference forward of
each step; --ref_update_every is refused: that frozen base cannot move). LoRA r 8, alpha 16 wants a larger
lr: from an SFT model at sampled gold 0.617, full fine-tuning gave 0.925 (KL 0.85); LoRA lr 1e-3 0.878,
2e-3 0.885, 4e-3 0.908 (KL 1.4), 8e-3 0.815 (KL 6.7), r 32 alpha 64 lr 2e-3 0.868.

Evaluation: TRL's metrics on held-out pairs (eval_ prefix) every --eval_every steps and at the end;
then the default task's gold rule on --eval_prompts held-out prompts (minialign.evaluation.evaluate), with the
KL to the SFT checkpoint (loaded again for it when training had no live reference), into eval.json.

Run on one device:        python train_dpo.py                          (out/sft + data/pref_train.jsonl -> out/dpo)
Run on N GPUs / processes: torchrun --nproc_per_node=N train_dpo.py   (add --fsdp to shard the policy over them)
Other losses:             python train_dpo.py --loss_type ipo | simpo | orpo | unlikelihood ...
"""

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from minialign.algorithms.losses import DEFAULT_BETA, LABEL_SMOOTHED
from minialign.algorithms.packing import collate_pairs, length_sorted_chunks, pair_count, pair_lengths
from minialign.algorithms.preference import (LOSS_TYPES, REFERENCE_FREE, pair_logps, preference_terms,
                                             reference_logps, reference_table, used_logps)
from minialign.algorithms.roles import disable_dropout, sft_reference
from minialign.data.batching import to_device, tokenize_preferences
from minialign.data.formats import load_preferences
from minialign.data.tokenizer import load_tokenizer
from minialign.errors import run_cli
from minialign.evaluation.evaluate import evaluate_policy, format_result, gold_point, load_eval_prompts
from minialign.models import lora
from minialign.training import checkpoint, logger, loop, runtime
from minialign.training.config import (FSDPConfig, GoldCurveConfig, LoRAConfig, OfflineConfig, PairBatch, PairsConfig,
                                       in_range, knob, non_negative, one_of, parse_config, positive)


@dataclass
class Config(OfflineConfig, PairBatch, PairsConfig, GoldCurveConfig, LoRAConfig, FSDPConfig):
    out_dir: str = knob("out/dpo", "output folder")
    init_from: str = knob("out/sft", "SFT checkpoint: the policy starts from it and the reference IS it")
    data: str = knob("data/pref_train.jsonl", "preference pairs (JSONL(.gz) or JSON; formats in minialign.data.formats)")
    pref_eval_data: str = knob("data/pref_eval.jsonl", "held-out pairs for the eval_ metrics ('' = none)")
    loss_type: str = knob("sigmoid", "sigmoid | robust | hinge | ipo | simpo | cpo | orpo | unlikelihood (see the docstring)",
                          one_of(*LOSS_TYPES))
    beta: float | None = knob(None, f"β of the loss (> 0); unset = the loss type's default {DEFAULT_BETA} "
                                    "(config.json holds the value used)", positive)
    label_smoothing: float = knob(0.0, "ε: cDPO (sigmoid), rDPO (robust), simpo, cpo; assumed rate of flipped labels",
                                  in_range(0, 0.5))
    simpo_gamma_beta_ratio: float = knob(0.5, "simpo: target margin γ in units of β")
    cpo_alpha: float = knob(1.0, "cpo: weight of the NLL term")
    precompute_ref: bool = knob(False, "compute reference log-probs once before training, then free the reference "
                                       "model")
    ref_update_every: int = knob(0, "TR-DPO: move the reference towards the policy every N steps (0 = never)",
                                 non_negative)
    ref_update_alpha: float = knob(1.0, "TR-DPO: ref <- α·policy + (1-α)·ref (1 = hard copy)",
                                   (lambda v: 0 < v <= 1, "must be in (0, 1]"))
    max_steps: int = knob(150, "optimizer steps (150 x 64 pairs = 1.6 epochs of the default task)")
    lr: float = knob(2e-4, "peak learning rate (tuned with beta; see the docstring)")
    warmup_steps: int = knob(10, "linear warmup steps")
    micro_batch_pairs: int = knob(64, "preference pairs per forward pass per rank (one packed row [x | y_c | y_r] "
                                      "each)")
    eval_every: int = knob(0, "eval_ metrics on held-out pairs every N steps (0 = only at the end)", non_negative)

    def problems(self, world_size):
        out = []
        if not self.init_from:
            out.append("--init_from is required: the policy starts from, and the reference is, an SFT checkpoint")
        if self.label_smoothing and self.loss_type not in LABEL_SMOOTHED:
            out.append(f"--label_smoothing={self.label_smoothing} with --loss_type {self.loss_type}: label smoothing "
                       f"is defined for {', '.join(LABEL_SMOOTHED)} only")
        if self.loss_type == "robust" and self.label_smoothing >= 0.5:
            out.append(f"--label_smoothing={self.label_smoothing} must be < 0.5 for robust (it divides by 1 - 2ε)")
        defaults = type(self)()
        for flag, applies in (("simpo_gamma_beta_ratio", ("simpo",)), ("cpo_alpha", ("cpo",))):
            if getattr(self, flag) != getattr(defaults, flag) and self.loss_type not in applies:
                out.append(f"--{flag}={getattr(self, flag)} with --loss_type {self.loss_type}: it is read by "
                           f"{', '.join(applies)} only")
        if self.precompute_ref and self.loss_type in REFERENCE_FREE:
            out.append(f"--precompute_ref: {self.loss_type} is reference-free, there is nothing to precompute")
        if self.ref_update_every and (self.precompute_ref or self.loss_type in REFERENCE_FREE):
            out.append("--ref_update_every needs a live reference model (not --precompute_ref, not a reference-free "
                       "loss)")
        if self.fsdp and self.ref_update_every:
            out.append("--fsdp with --ref_update_every: not supported yet (TR-DPO copies the whole policy into the "
                       "reference)")
        return out

    def resolve(self):
        if self.beta is None:
            self.beta = DEFAULT_BETA.get(self.loss_type)  # an unknown --loss_type is refused by its check


# ------------------------------------------------------------------------------------------ the loss

def pair_loss(model, batch, ref_model, cfg):
    """Summed loss over the batch's pairs and TRL's metrics summed over pairs (loop.train_step divides)."""
    pol = pair_logps(model, batch)
    pi_c, pi_r = used_logps(pol, cfg.loss_type)
    ref_c, ref_r = (None, None) if cfg.loss_type in REFERENCE_FREE else reference_logps(ref_model, batch, cfg)
    losses, chosen_rewards, rejected_rewards = preference_terms(cfg, pi_c, pi_r, pol.chosen_nll, ref_c, ref_r, pol)
    metrics = {
        "rewards/chosen": chosen_rewards.sum(),
        "rewards/rejected": rejected_rewards.sum(),
        "rewards/accuracies": (chosen_rewards > rejected_rewards).float().sum(),
        "rewards/margins": (chosen_rewards - rejected_rewards).sum(),
        "logps/chosen": pi_c.detach().sum(),
        "logps/rejected": pi_r.detach().sum(),
        "logits/chosen": pol.chosen_logits_mean.sum(),
        "logits/rejected": pol.rejected_logits_mean.sum(),
    }
    if cfg.loss_type in ("cpo", "orpo", "unlikelihood"):
        metrics["nll_loss"] = pol.chosen_nll.detach().sum()
    return losses.sum(), metrics


# ----------------------------------------------------------------------------------- helpers

def collate_pair_batch(pairs, idx, pad_id, ref_table=None):
    batch = collate_pairs([pairs[i] for i in idx], pad_id)
    if ref_table is not None:
        batch["ref_chosen_logps"], batch["ref_rejected_logps"] = ref_table[idx, 0], ref_table[idx, 1]
    return batch


def precompute_reference(ref_model, pairs, pad_id, cfg, rt, desc):
    """(n, 2) float32 table of the reference's (chosen, rejected) log-probs, as the loss type uses them."""
    def rows(idx):
        batch = to_device(collate_pairs([pairs[i] for i in idx], pad_id), rt.device)
        return torch.stack(used_logps(pair_logps(ref_model, batch), cfg.loss_type), dim=1)
    return reference_table(pair_lengths(pairs), cfg.micro_batch_pairs, 2, rows, rt, desc)


@torch.no_grad()
def evaluate_pairs(policy, ref_model, pairs, ref_table, cfg, pad_id, rt):
    """TRL's metrics and the loss on held-out pairs, means over pairs, eval_ prefix."""
    was_training = policy.training
    policy.eval()
    sums = {}
    for idx in length_sorted_chunks(pair_lengths(pairs), cfg.micro_batch_pairs):
        batch = to_device(collate_pair_batch(pairs, idx, pad_id, ref_table), rt.device)
        with rt.autocast():
            loss_sum, metrics = pair_loss(policy, batch, ref_model, cfg)
        for k, v in {"loss": loss_sum, **metrics}.items():
            sums[k] = sums.get(k, 0.0) + float(v)
    policy.train(was_training)
    return {f"eval_{k}": v / len(pairs) for k, v in sums.items()}


@torch.no_grad()
def update_reference(ref_model, policy, alpha):
    """TR-DPO: ref <- α·π + (1-α)·ref, parameter by parameter."""
    for p_ref, p in zip(ref_model.parameters(), runtime.unwrap(policy).parameters()):
        p_ref.lerp_(p.detach(), alpha)


def main(argv=None):
    cfg = parse_config(Config, argv)  # resolves an unset --beta to the loss type's default
    checkpoint.check_out_dir(cfg)  # an out_dir holding a run: --resume or --overwrite, else refused
    rt = runtime.setup(cfg)
    if rt.is_main:
        checkpoint.check_writable(cfg.out_dir)
    tok_path = checkpoint.tokenizer_path_for(cfg.init_from)
    tok = load_tokenizer(tok_path)

    # ---- models: the policy, and the frozen reference (same weights) unless the loss is reference-free
    model = disable_dropout(checkpoint.load_model(cfg.init_from))
    model = lora.from_config(model, cfg, cfg.init_from).to(rt.device)  # --lora_r 0: unchanged
    runtime.print0(rt, f"policy from {cfg.init_from}: {lora.describe(model)}; loss {cfg.loss_type}, beta {cfg.beta}")
    ref_model = None
    if cfg.loss_type in REFERENCE_FREE:
        runtime.print0(rt, f"reference: none ({cfg.loss_type} is reference-free)")
    else:  # LoRA: the policy with its adapters off; else a frozen copy of the same weights
        ref_model = runtime.shard_frozen(sft_reference(model, cfg, rt), rt, cfg)  # --fsdp --shard_frozen
        freed = ", precomputed then freed" if cfg.precompute_ref else ""
        what = "the policy with its adapters off" if cfg.lora_r else f"frozen copy of {cfg.init_from}"
        runtime.print0(rt, f"reference: {what}{freed}")

    # ---- data
    stats = {}
    pairs = tokenize_preferences(load_preferences(cfg.data, stats, **cfg.pair_options()), tok, cfg.max_len, stats=stats)
    lengths = pair_lengths(pairs)
    eval_pairs = []
    if cfg.pref_eval_data:
        eval_pairs = tokenize_preferences(load_preferences(cfg.pref_eval_data, **cfg.pair_options()), tok, cfg.max_len)
    global_batch = cfg.micro_batch_pairs * cfg.grad_accum * rt.world_size
    runtime.print0(rt, f"data: {len(pairs)} pairs; truncated {stats.get('prompt_truncated', 0)} prompts, "
                       f"{stats.get('response_truncated', 0)} response pairs (max_len={cfg.max_len}); global batch "
                       f"{global_batch} pairs = {cfg.micro_batch_pairs} x {cfg.grad_accum} accum x {rt.world_size} "
                       f"ranks; "
                       f"{cfg.max_steps} steps = {cfg.max_steps * global_batch / len(pairs):.2f} epochs")

    # ---- reference log-probs computed once, then the reference model freed
    ref_table = eval_ref_table = None
    if cfg.precompute_ref:
        with runtime.gathered(ref_model):  # --shard_frozen: the ranks' shares of the table differ in size
            ref_table = precompute_reference(ref_model, pairs, tok.pad_id, cfg, rt, "reference log-probs")
            if eval_pairs:
                eval_ref_table = precompute_reference(ref_model, eval_pairs, tok.pad_id, cfg, rt,
                                                      "reference log-probs (eval)")
        ref_model = None  # freed: from here on one model in memory
        if rt.device.type == "cuda":
            torch.cuda.empty_cache()

    # ---- DDP or FSDP (the reference whole on every rank unless --shard_frozen), optimizer over the (sharded)
    # parameters, resume
    model = runtime.wrap_ddp(model, rt, cfg.compile, gradient_checkpointing=cfg.gradient_checkpointing, fsdp=cfg.fsdp)
    optimizer = loop.make_optimizer(model, cfg, rt)
    scaler = rt.make_scaler()
    start_step = checkpoint.resume(cfg, model, optimizer, scaler, rt)
    if cfg.resume and cfg.ref_update_every:
        ref_model.load_state_dict(checkpoint.load(cfg.out_dir)["ref_model"])
    log = logger.MetricsLog(cfg.out_dir, rt, start_step if cfg.resume else None, cfg.tensorboard)

    def kl_reference():  # the SFT model for KL: the live reference while it is still that model, else a fresh copy
        if ref_model is not None and not cfg.ref_update_every:
            return ref_model
        return sft_reference(model, cfg, rt)  # LoRA: the adapters-off policy

    # held-out prompts for the gold rule, loaded before training (too-long ones dropped and counted now)
    eval_prompts = gold_ref = None
    if cfg.eval_data and rt.is_main:
        eval_prompts = load_eval_prompts(cfg.eval_data, tok, 0, cfg.eval_max_new_tokens,
                                         runtime.unwrap(model).cfg.max_seq_len)  # (model: DDP-wrapped by now)
        gold_ref = kl_reference() if cfg.gold_eval_every else None

    # ---- train
    model.train()
    bar = tqdm(range(start_step, cfg.max_steps), initial=start_step, total=cfg.max_steps, desc=f"dpo-{cfg.loss_type}",
               disable=not rt.is_main)
    for step in bar:
        lr = loop.lr_at(step, cfg.lr, cfg.warmup_steps, cfg.max_steps, cfg.min_lr_ratio)
        loop.set_lr(optimizer, lr)
        batches = [to_device(collate_pair_batch(pairs, idx, tok.pad_id, ref_table), rt.device)
                   for idx in loop.step_batches(len(pairs), step, cfg, rt, lengths)]
        metrics = loop.train_step(model, optimizer, scaler, batches, lambda m, b: pair_loss(m, b, ref_model, cfg),
                                      pair_count, rt, cfg.max_grad_norm)
        loop.check_finite(metrics, step, cfg, stats, scaler)
        if cfg.ref_update_every and (step + 1) % cfg.ref_update_every == 0:
            update_reference(ref_model, model, cfg.ref_update_alpha)
        bar.set_postfix(loss=f"{metrics['loss']:.3f}", acc=f"{metrics['rewards/accuracies']:.2f}")
        done = step + 1
        if done % cfg.log_every == 0 or done == cfg.max_steps:
            log.log(done, {**metrics, "learning_rate": lr, **loop.skip_counts(stats)}, bar)
        pairs_due = eval_pairs and cfg.eval_every and done % cfg.eval_every == 0 and done < cfg.max_steps
        gold_due = cfg.eval_data and cfg.gold_eval_every and done % cfg.gold_eval_every == 0 and done < cfg.max_steps
        if pairs_due or gold_due:
            with runtime.gathered(model, ref_model):  # --fsdp: rank 0 evaluates alone on the gathered weights
                if pairs_due and rt.is_main:
                    res = evaluate_pairs(runtime.unwrap(model), ref_model, eval_pairs, eval_ref_table, cfg,
                                         tok.pad_id, rt)
                    log.log(done, res, bar)
                if gold_due and gold_ref is not None:
                    point = gold_point(runtime.unwrap(model), tok, eval_prompts[:cfg.gold_eval_prompts],
                                       cfg.eval_max_new_tokens, gold_ref)
                    log.log(done, point, bar)
        if checkpoint.should_save(done, start_step, cfg):
            extra = {"ref_model": ref_model.state_dict()} if cfg.ref_update_every else None
            checkpoint.save(cfg.out_dir, model=model, optimizer=optimizer, scaler=scaler, step=done, cfg=cfg,
                            tokenizer_path=tok_path, finished=done == cfg.max_steps, extra=extra, rt=rt)
        if checkpoint.should_stop(done, start_step, cfg):
            runtime.print0(rt, f"stopping after {cfg.stop_after_steps} steps as asked; continue with --resume")
            runtime.cleanup(rt)
            return
    bar.close()

    # ---- evaluate: held-out pairs, then the gold rule with the KL to the SFT model (--fsdp: rank 0 alone, on the
    # gathered weights)
    with runtime.gathered(model, ref_model):
        policy = runtime.unwrap(model).eval()
        if eval_pairs and rt.is_main:
            res = evaluate_pairs(policy, ref_model, eval_pairs, eval_ref_table, cfg, tok.pad_id, rt)
            log.log(cfg.max_steps, res)
            checkpoint.write_json(res, f"{cfg.out_dir}/eval_pairs.json")
        if eval_prompts:
            res = evaluate_policy(policy, tok, eval_prompts[:cfg.eval_prompts or None], cfg.eval_max_new_tokens,
                                  gold_ref or kl_reference())
            checkpoint.write_json(res, f"{cfg.out_dir}/eval.json")
            log.log(cfg.max_steps, {k: v for k, v in res.items() if k != "examples"})
            before = Path(cfg.init_from) / "eval.json"
            if before.exists():
                print(f"sft eval ({before}): {format_result(json.loads(before.read_text()))}")
            print(f"dpo ({cfg.loss_type}) eval on {res['n_prompts']} held-out prompts: {format_result(res)}")
    runtime.cleanup(rt)


if __name__ == "__main__":
    run_cli(main)
