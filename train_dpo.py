"""Offline preference optimization: DPO and its family, from an SFT checkpoint.

Objective (DPO, Rafailov et al. 2023 Eq. 7), over preference pairs (x, y_c, y_r):
    loss = mean over pairs of  -log σ(β [(log π(y_c|x) - log ref(y_c|x)) - (log π(y_r|x) - log ref(y_r|x))])
where log π(y|x) sums the log-probs of the response tokens only (the final <|im_end|> included), π is
the policy being trained and ref the frozen SFT model both start from. The mean is over every pair of
the optimizer step (all micro-batches and ranks, see minialign.engine). --loss_type picks the family
member; each formula is in minialign.losses:

    sigmoid  DPO; cDPO with --label_smoothing ε           (summed log-probs)
    robust   rDPO, unbiased under label noise ε            (summed)
    hinge    SLiC: max(0, 1 - βx)                          (summed)
    ipo      IPO: (x - 1/(2β))²                            (length-averaged log-probs, as TRL)
    simpo    SimPO, reference-free, target margin γ        (averaged)   \
    cpo      CPO, reference-free DPO term + NLL(y_c)       (summed)      > no reference model is built
    orpo     ORPO, NLL(y_c) + odds-ratio term              (averaged)   /
    kto      KTO on unpaired examples: the pairs split into desirable (chosen) and undesirable
             (rejected) completions, or --unpaired_data {prompt, completion, label}.

KTO's reference point z0 is estimated as in the KTO paper and TRL: the mean over the micro-batch of
log π(y'|x) - log ref(y'|x) on MISMATCHED pairs, each prompt x with the completion y' of another
example (TRL's +1 offset, here over the whole dataset order: example i borrows example i+1's
completion, so the pairing is fixed and --precompute_ref can precompute it), detached and clamped at 0
(inside losses.kto_loss). Its policy term is a no-grad forward. Simplified: TRL also averages z0
over ranks; here it is per micro-batch, so a torchrun kto run matches a single process only up to
that estimate (the pair losses match exactly). Counted unit: pairs; for kto, examples (completions).

Tuning β (sigmoid, 150 steps x 64 pairs from the default task's SFT model; sampled gold score on the
600 held-out prompts, SFT 0.593; KL to the SFT model in nats per response):
    β 0.1, lr 5e-4: 0.462 (KL 96: collapsed into garbage)    β 2, lr 1e-3: 0.788 (KL 7.1)
    β 0.1, lr 1e-4: 0.733 (KL 3.9)                           β 2, lr 5e-4: 0.860 (KL 2.5)
    β 0.5, lr 2e-4: 0.752 (100 steps, KL 7.3)                β 2, lr 3e-4: 0.877 (KL 1.5)
    β 1,   lr 5e-4: 0.773 (KL 6.3)                           β 2, lr 2e-4: 0.912, 0.895 with --seed 1 (KL 1.0)  <- default
    β 4,   lr 5e-4: 0.857 (KL 1.2)                           β 2, lr 1e-4: 0.892 (KL 0.7)
    β 4,   lr 3e-4: 0.878 (KL 0.7)
A β far above the usual 0.1 wins because the SFT model is very peaked (a whole chosen response has
log-prob ≈ -1.9): with a small β the loss keeps pushing the rejected log-probs down by tens of nats,
the mass goes to tokens nobody trained ("I to help."), and sampling at temperature 1 finds them.

Two layouts give the same log-probs (minialign.preference, tested to 1e-5): "two_rows" puts
prompt+chosen and prompt+rejected in separate rows; "shared_prompt" packs [prompt | chosen | rejected]
in one row with an attention mask that hides chosen from rejected, so the prompt is computed once.
shared_prompt is the default, being faster in bench/bench_dpo.py (26M preset, 8 pairs of 64-token
prompts and responses, fp32 CPU, 1 thread, pairs/s): live reference two rows 1.52, shared prompt 2.09;
precomputed reference two rows 2.18, shared prompt 2.71 (1.78x the plain live-reference run).

--precompute_ref computes the reference log-probs of every training and held-out pair once, before
training (a progress bar), then frees the reference model: one model in memory. Resuming recomputes
them (deterministic). --ref_update_every N (TR-DPO, Gorbatovski et al. 2024) instead moves the live
reference towards the policy every N steps: ref <- α·π + (1-α)·ref (α = 1: a hard copy).

Evaluation: TRL's metrics on held-out pairs (eval_ prefix) every --eval_every steps and at the end;
then the default task's gold rule on --eval_prompts held-out prompts (minialign.evaluate), with the
KL to the SFT checkpoint (loaded again for it when training had no live reference), into eval.json.

Run on one device:        python train_dpo.py                          (out/sft + data/pref_train.jsonl -> out/dpo)
Run on N GPUs / processes: torchrun --nproc_per_node=N train_dpo.py
Other losses:             python train_dpo.py --loss_type ipo | simpo | kto ...
"""

import json
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

from minialign import engine
from minialign.data import tokenize_preferences
from minialign.engine import TrainConfig, knob
from minialign.evaluate import evaluate_policy, format_result, gold_point, load_eval_prompts
from minialign.formats import load_preferences, load_unpaired
from minialign.losses import DPO_LOSS_TYPES, cpo_loss, dpo_loss, kto_loss, orpo_loss, simpo_loss
from minialign.preference import (LAYOUTS, collate_completions, collate_pairs, completion_logps, kl_partner, pair_lengths,
                                  pair_logps, tokenize_unpaired, unpair)
from minialign.tokenizer import Tokenizer

LOSS_TYPES = (*DPO_LOSS_TYPES, "simpo", "cpo", "orpo", "kto")
REFERENCE_FREE = ("simpo", "cpo", "orpo")
LENGTH_AVERAGED = ("ipo", "simpo", "orpo")  # these use mean token log-probs, the others sums
# β where --beta is 0. sigmoid: tuned on the default task (see the docstring); robust, hinge and kto share its
# scale (summed log-ratios), so its value; ipo: 1/(2β) = 0.5 nat per token target; simpo, cpo, orpo: their papers
DEFAULT_BETA = {"sigmoid": 2.0, "robust": 2.0, "hinge": 2.0, "kto": 2.0, "ipo": 1.0, "simpo": 2.0, "cpo": 0.1, "orpo": 0.1}


@dataclass
class Config(TrainConfig):
    init_from: str = knob("out/sft", "SFT checkpoint: the policy starts from it and the reference IS it")
    data: str = knob("data/pref_train.jsonl", "preference pairs (JSONL or JSONL.gz; formats in minialign.formats)")
    unpaired_data: str = knob("", "kto only: train on this unpaired file {prompt, completion, label} instead of --data")
    pref_eval_data: str = knob("data/pref_eval.jsonl", "held-out pairs for the eval_ metrics ('' = none)")
    loss_type: str = knob("sigmoid", "sigmoid | robust | hinge | ipo | simpo | cpo | orpo | kto (see the docstring)")
    beta: float = knob(0.0, f"β of the loss; 0 = the loss type's default {DEFAULT_BETA}")
    label_smoothing: float = knob(0.0, "ε: cDPO (sigmoid), rDPO (robust), simpo, cpo; assumed rate of flipped labels")
    simpo_gamma_beta_ratio: float = knob(0.5, "simpo: target margin γ in units of β")
    cpo_alpha: float = knob(1.0, "cpo: weight of the NLL term")
    kto_desirable_weight: float = knob(1.0, "kto: λ_D, weight of desirable examples")
    kto_undesirable_weight: float = knob(1.0, "kto: λ_U, weight of undesirable examples")
    precompute_ref: bool = knob(False, "compute reference log-probs once before training, then free the reference model")
    layout: str = knob("shared_prompt", "shared_prompt (prompt computed once per pair) | two_rows (kto always uses rows)")
    ref_update_every: int = knob(0, "TR-DPO: move the reference towards the policy every N steps (0 = never)")
    ref_update_alpha: float = knob(1.0, "TR-DPO: ref <- α·policy + (1-α)·ref (1 = hard copy)")
    max_steps: int = knob(150, "optimizer steps (150 x 64 pairs = 1.6 epochs of the default task)")
    lr: float = knob(2e-4, "peak learning rate (tuned with beta; see the docstring)")
    warmup_steps: int = knob(10, "linear warmup steps")
    micro_batch_size: int = knob(64, "pairs (kto: examples) per forward pass per rank")
    eval_every: int = knob(0, "eval_ metrics on held-out pairs every N steps (0 = only at the end)")
    eval_data: str = knob("data/rl_eval.jsonl", "held-out prompts scored by the default task's gold rule ('' = no eval)")
    gold_eval_every: int = knob(0, "every N steps also log the gold score (T=1) and KL to the SFT model on the first --gold_eval_prompts held-out prompts (points of the gold-vs-KL curve; 0 = off)")
    gold_eval_prompts: int = knob(200, "held-out prompts for --gold_eval_every")
    eval_prompts: int = knob(600, "how many held-out prompts to evaluate at the end")
    max_new_tokens: int = knob(48, "generation length for the evaluation")


def check_config(cfg):
    """Refuse unsupported combinations with a message naming the flag (after engine's own checks)."""
    problems = []
    if cfg.loss_type not in LOSS_TYPES:
        problems.append(f"--loss_type={cfg.loss_type!r} must be one of {', '.join(LOSS_TYPES)}")
    if cfg.layout not in LAYOUTS:
        problems.append(f"--layout={cfg.layout!r} must be one of {', '.join(LAYOUTS)}")
    if not cfg.init_from:
        problems.append("--init_from is required: the policy starts from, and the reference is, an SFT checkpoint")
    if cfg.beta < 0:
        problems.append(f"--beta={cfg.beta} must be > 0 (or 0 for the loss type's default)")
    if not (0 <= cfg.label_smoothing <= 0.5 and (cfg.loss_type != "robust" or cfg.label_smoothing < 0.5)):
        problems.append(f"--label_smoothing={cfg.label_smoothing} must be in [0, 0.5] ([0, 0.5) for robust): the assumed rate of flipped labels")
    if cfg.unpaired_data and cfg.loss_type != "kto":
        problems.append("--unpaired_data is for --loss_type kto only")
    if cfg.precompute_ref and cfg.loss_type in REFERENCE_FREE:
        problems.append(f"--precompute_ref: {cfg.loss_type} is reference-free, there is nothing to precompute")
    if cfg.ref_update_every and (cfg.precompute_ref or cfg.loss_type in REFERENCE_FREE):
        problems.append("--ref_update_every needs a live reference model (not --precompute_ref, not a reference-free loss)")
    if cfg.ref_update_every < 0 or not 0 < cfg.ref_update_alpha <= 1:
        problems.append("--ref_update_every must be >= 0 and --ref_update_alpha in (0, 1]")
    if problems:
        sys.exit("train_dpo.py: error: " + "; ".join(problems))


# ------------------------------------------------------------------------------------- pair losses

def used_logps(pl, loss_type):
    """(chosen, rejected) log-probs the loss type works with: length-averaged or summed."""
    if loss_type in LENGTH_AVERAGED:
        return pl.chosen_logps_avg, pl.rejected_logps_avg
    return pl.chosen_logps, pl.rejected_logps


def reference_logps(ref_model, batch, cfg):
    """(ref_chosen, ref_rejected) (B,): precomputed ones from the batch, else a no-grad forward."""
    if "ref_chosen_logps" in batch:
        return batch["ref_chosen_logps"], batch["ref_rejected_logps"]
    with torch.no_grad():
        return used_logps(pair_logps(ref_model, batch, cfg.layout), cfg.loss_type)


def preference_terms(cfg, policy_chosen_logps, policy_rejected_logps, policy_chosen_nll, ref_chosen_logps, ref_rejected_logps):
    """-> per-pair losses (B,) (None for kto, whose loss is on unpaired examples), chosen and rejected rewards (B,)."""
    t, beta = cfg.loss_type, cfg.beta
    if t in DPO_LOSS_TYPES:
        return dpo_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta, t, cfg.label_smoothing)
    if t == "simpo":
        return simpo_loss(policy_chosen_logps, policy_rejected_logps, beta, cfg.simpo_gamma_beta_ratio, cfg.label_smoothing)
    if t == "cpo":
        return cpo_loss(policy_chosen_logps, policy_rejected_logps, policy_chosen_nll, beta, cfg.cpo_alpha, "sigmoid", cfg.label_smoothing)
    if t == "orpo":
        return orpo_loss(policy_chosen_logps, policy_rejected_logps, policy_chosen_nll, beta)
    # kto, evaluated on pairs: its implicit rewards β(π - ref) of each side; no pair loss
    return None, beta * (policy_chosen_logps - ref_chosen_logps).detach(), beta * (policy_rejected_logps - ref_rejected_logps).detach()


def pair_loss(model, batch, ref_model, cfg):
    """Summed loss over the batch's pairs and TRL's metrics summed over pairs (engine.train_step divides)."""
    pol = pair_logps(model, batch, cfg.layout)
    pi_c, pi_r = used_logps(pol, cfg.loss_type)
    ref_c, ref_r = (None, None) if cfg.loss_type in REFERENCE_FREE else reference_logps(ref_model, batch, cfg)
    losses, chosen_rewards, rejected_rewards = preference_terms(cfg, pi_c, pi_r, pol.chosen_nll, ref_c, ref_r)
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
    if cfg.loss_type in ("cpo", "orpo"):
        metrics["nll_loss"] = pol.chosen_nll.detach().sum()
    if losses is None:
        return None, metrics
    return losses.sum() + moe_term(model, len(losses)), metrics


def moe_term(model, n_units):
    """MoE balance loss of the last forward, scaled by the unit count so it is a mean after normalization."""
    base = engine.unwrap(model)
    return base.cfg.moe_aux_coef * base.backbone.moe_aux_loss() * n_units


# ----------------------------------------------------------------------------------------------- KTO

KL_KEYS = ("inputs", "labels", "label_mask")


def kto_loss_fn(model, batch, ref_model, cfg):
    """Summed KTO loss over the batch's examples; metrics as sums + counts (finish_kto_metrics divides)."""
    kl_rows = {k: batch[f"kl_{k}"] for k in KL_KEYS}
    with torch.no_grad():  # z0's policy term, detached anyway; run first so the MoE loss below is the main forward's
        policy_kl_logps = completion_logps(model, kl_rows)[0]
    policy_logps, _, logit_means = completion_logps(model, batch)  # (N,)
    if "ref_logps" in batch:
        ref_logps, ref_kl_logps = batch["ref_logps"], batch["ref_kl_logps"]
    else:
        with torch.no_grad():
            ref_logps, ref_kl_logps = completion_logps(ref_model, batch)[0], completion_logps(ref_model, kl_rows)[0]
    z0 = (policy_kl_logps - ref_kl_logps).mean()  # KL(π ‖ ref) on mismatched pairs; kto_loss clamps it at 0
    desirable = batch["is_desirable"]
    losses, rewards = kto_loss(policy_logps, ref_logps, desirable, z0, cfg.beta, cfg.kto_desirable_weight, cfg.kto_undesirable_weight)
    d, u = desirable.float(), (~desirable).float()
    metrics = {
        "kl": z0.clamp(min=0) * len(losses),
        "_n/chosen": d.sum(), "_n/rejected": u.sum(),
        "rewards/chosen": (rewards * d).sum(), "rewards/rejected": (rewards * u).sum(),
        "logps/chosen": (policy_logps.detach() * d).sum(), "logps/rejected": (policy_logps.detach() * u).sum(),
        "logits/chosen": (logit_means * d).sum(), "logits/rejected": (logit_means * u).sum(),
    }
    return losses.sum() + moe_term(model, len(losses)), metrics


def finish_kto_metrics(metrics):
    """Step means over all examples -> means over desirable (chosen) / undesirable (rejected) ones."""
    n = {side: metrics.pop(f"_n/{side}") for side in ("chosen", "rejected")}
    for key in [k for k in metrics if k.endswith(("/chosen", "/rejected"))]:
        side = key.rsplit("/", 1)[1]
        metrics[key] = metrics[key] / n[side] if n[side] else float("nan")
    metrics["rewards/margins"] = metrics["rewards/chosen"] - metrics["rewards/rejected"]
    return metrics


def collate_kto(examples, idx, pad_id, ref_table=None):
    """Rows for examples idx, their mismatched KL rows (prompt i, completion of kl_partner(i)), labels."""
    ex = [examples[i] for i in idx]
    prompts = [e["prompt"] for e in ex]
    batch = collate_completions(prompts, [e["completion"] for e in ex], pad_id)
    kl = collate_completions(prompts, [examples[kl_partner(i, len(examples))]["completion"] for i in idx], pad_id)
    batch.update({f"kl_{k}": v for k, v in kl.items()})
    batch["is_desirable"] = torch.tensor([e["label"] for e in ex], dtype=torch.bool)
    if ref_table is not None:
        batch["ref_logps"], batch["ref_kl_logps"] = ref_table[idx, 0], ref_table[idx, 1]
    return batch


# --------------------------------------------------------------------------------- shared helpers

def collate_pair_batch(pairs, idx, pad_id, layout, ref_table=None):
    batch = collate_pairs([pairs[i] for i in idx], pad_id, layout)
    if ref_table is not None:
        batch["ref_chosen_logps"], batch["ref_rejected_logps"] = ref_table[idx, 0], ref_table[idx, 1]
    return batch


def count_units(batch):
    """The counted units of a batch: examples (kto), else pairs (one packed row, or two rows, per pair)."""
    if "is_desirable" in batch:
        return len(batch["is_desirable"])
    return len(batch["chosen_mask"]) if "chosen_mask" in batch else len(batch["inputs"]) // 2


def to_device(batch, device):
    return {k: v.to(device) for k, v in batch.items()}


def length_sorted_chunks(lengths, batch_size, indices=None):
    """Index lists of at most batch_size, by increasing length (little padding for no-grad passes)."""
    order = sorted(indices if indices is not None else range(len(lengths)), key=lambda i: lengths[i])
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


@torch.no_grad()
def precompute_reference(ref_model, n, lengths, make_batch, score, rt, batch_size, desc):
    """(n, 2) float32 table of reference log-probs, each rank computing a shard, then summed across ranks."""
    table = torch.zeros(n, 2, device=rt.device)
    mine = list(range(rt.rank, n, rt.world_size))
    for idx in tqdm(length_sorted_chunks(lengths, batch_size, mine), desc=desc, disable=not rt.is_main):
        with rt.autocast():
            table[idx] = torch.stack(score(ref_model, to_device(make_batch(idx), rt.device)), dim=1).float()
    if rt.ddp:
        dist.all_reduce(table)  # every row was filled by exactly one rank, zeros elsewhere
    return table


@torch.no_grad()
def evaluate_pairs(policy, ref_model, pairs, ref_table, cfg, pad_id, rt):
    """TRL's metrics (and the loss, except for kto) on held-out pairs, means over pairs, eval_ prefix."""
    was_training = policy.training
    policy.eval()
    sums = {}
    for idx in length_sorted_chunks(pair_lengths(pairs, cfg.layout), cfg.micro_batch_size):
        batch = to_device(collate_pair_batch(pairs, idx, pad_id, cfg.layout, ref_table), rt.device)
        with rt.autocast():
            loss_sum, metrics = pair_loss(policy, batch, ref_model, cfg)
        if loss_sum is not None:
            metrics["loss"] = loss_sum
        for k, v in metrics.items():
            sums[k] = sums.get(k, 0.0) + float(v)
    policy.train(was_training)
    return {f"eval_{k}": v / len(pairs) for k, v in sums.items()}


@torch.no_grad()
def update_reference(ref_model, policy, alpha):
    """TR-DPO: ref <- α·π + (1-α)·ref, parameter by parameter."""
    for p_ref, p in zip(ref_model.parameters(), engine.unwrap(policy).parameters()):
        p_ref.lerp_(p.detach(), alpha)


def main(argv=None):
    cfg = engine.parse_config(Config, argv)
    check_config(cfg)
    cfg.beta = cfg.beta or DEFAULT_BETA[cfg.loss_type]
    cfg.out_dir = cfg.out_dir or "out/dpo"
    rt = engine.setup_runtime(cfg)
    if rt.is_main:
        engine.check_writable(cfg.out_dir)
    tok_path = engine.tokenizer_path_for(cfg)
    tok = Tokenizer(tok_path)
    is_kto = cfg.loss_type == "kto"

    # ---- models: the policy, and the frozen reference (same weights) unless the loss is reference-free
    model = engine.load_model(cfg.init_from).to(rt.device)
    engine.print0(rt, f"policy: {model.num_params() / 1e6:.2f}M parameters from {cfg.init_from}; loss {cfg.loss_type}, beta {cfg.beta}")
    ref_model = None
    if cfg.loss_type in REFERENCE_FREE:
        engine.print0(rt, f"reference: none ({cfg.loss_type} is reference-free)")
    else:
        ref_model = engine.load_model(cfg.init_from).to(rt.device).eval().requires_grad_(False)
        engine.print0(rt, f"reference: frozen copy of {cfg.init_from}" + (", precomputed then freed" if cfg.precompute_ref else ""))

    # ---- data
    stats = {}
    if is_kto:
        if cfg.unpaired_data:
            examples = tokenize_unpaired(load_unpaired(cfg.unpaired_data), tok, cfg.max_len, stats)
        else:
            examples = unpair(tokenize_preferences(load_preferences(cfg.data), tok, cfg.max_len, stats=stats))
        lengths = [len(e["prompt"]) + len(e["completion"]) for e in examples]
        n_desirable = sum(e["label"] for e in examples)
        engine.print0(rt, f"data: {len(examples)} kto examples ({n_desirable} desirable, {len(examples) - n_desirable} undesirable), "
                          f"from {cfg.unpaired_data or cfg.data + ' (pairs split)'}; layout ignored (kto scores single rows)")
        n_units, unit = len(examples), "examples"
    else:
        examples = tokenize_preferences(load_preferences(cfg.data), tok, cfg.max_len, stats=stats)
        lengths = pair_lengths(examples, cfg.layout)
        engine.print0(rt, f"data: {len(examples)} pairs, layout {cfg.layout}")
        n_units, unit = len(examples), "pairs"
    engine.print0(rt, f"truncated: {stats.get('prompt_truncated', 0)} prompts, {stats.get('response_truncated', 0)} response pairs (max_len={cfg.max_len})")
    eval_pairs = tokenize_preferences(load_preferences(cfg.pref_eval_data), tok, cfg.max_len) if cfg.pref_eval_data else []
    global_batch = cfg.micro_batch_size * cfg.grad_accum * rt.world_size
    engine.print0(rt, f"global batch {global_batch} {unit} = {cfg.micro_batch_size} x {cfg.grad_accum} accum x {rt.world_size} ranks; "
                      f"{cfg.max_steps} steps = {cfg.max_steps * global_batch / n_units:.2f} epochs")

    # ---- reference log-probs computed once, then the reference model freed
    ref_table = eval_ref_table = None
    if cfg.precompute_ref:
        if is_kto:
            ref_table = precompute_reference(
                ref_model, n_units, lengths, lambda idx: collate_kto(examples, idx, tok.pad_id),
                lambda m, b: (completion_logps(m, b)[0], completion_logps(m, {k: b[f"kl_{k}"] for k in KL_KEYS})[0]),
                rt, cfg.micro_batch_size, "reference log-probs")
        else:
            ref_table = precompute_reference(
                ref_model, n_units, lengths, lambda idx: collate_pair_batch(examples, idx, tok.pad_id, cfg.layout),
                lambda m, b: used_logps(pair_logps(m, b, cfg.layout), cfg.loss_type), rt, cfg.micro_batch_size, "reference log-probs")
        if eval_pairs:
            eval_ref_table = precompute_reference(
                ref_model, len(eval_pairs), pair_lengths(eval_pairs, cfg.layout),
                lambda idx: collate_pair_batch(eval_pairs, idx, tok.pad_id, cfg.layout),
                lambda m, b: used_logps(pair_logps(m, b, cfg.layout), cfg.loss_type), rt, cfg.micro_batch_size, "reference log-probs (eval)")
        ref_model = None  # freed: from here on one model in memory
        if rt.device.type == "cuda":
            torch.cuda.empty_cache()

    # ---- optimizer, resume
    optimizer = engine.make_optimizer(model, cfg, rt)
    scaler = rt.make_scaler()
    start_step = engine.resume_from_checkpoint(cfg, model, optimizer, scaler)
    if cfg.resume and cfg.ref_update_every:
        ref_model.load_state_dict(engine.load_checkpoint(cfg.out_dir)["ref_model"])
    model = engine.wrap_ddp(model, rt, cfg)
    log = engine.MetricsLog(cfg.out_dir, rt, resume_step=start_step if cfg.resume else None)

    def make_batch(idx):
        if is_kto:
            return collate_kto(examples, idx, tok.pad_id, ref_table)
        return collate_pair_batch(examples, idx, tok.pad_id, cfg.layout, ref_table)

    def loss_fn(m, batch):
        return (kto_loss_fn if is_kto else pair_loss)(m, batch, ref_model, cfg)

    def save(step, finished):
        extra = {"ref_model": ref_model.state_dict()} if cfg.ref_update_every else None
        engine.save_checkpoint(cfg.out_dir, model=model, optimizer=optimizer, scaler=scaler, step=step, cfg=cfg,
                               tokenizer_path=tok_path, finished=finished, extra=extra, rt=rt)

    # ---- train
    def sft_reference():  # the SFT model for KL: the live reference while it is still that model, else a fresh copy
        if ref_model is not None and not cfg.ref_update_every:
            return ref_model
        return engine.load_model(cfg.init_from).to(rt.device).eval().requires_grad_(False)

    gold_prompts = gold_ref = None  # --gold_eval_every: rank 0 scores the policy against the SFT model as it trains
    if cfg.gold_eval_every and cfg.eval_data and rt.is_main:
        gold_prompts = load_eval_prompts(cfg.eval_data, tok, cfg.gold_eval_prompts)
        gold_ref = sft_reference()

    model.train()
    bar = tqdm(range(start_step, cfg.max_steps), initial=start_step, total=cfg.max_steps, desc=f"dpo-{cfg.loss_type}", disable=not rt.is_main)
    for step in bar:
        lr = engine.lr_at(step, cfg.lr, cfg.warmup_steps, cfg.max_steps, cfg.min_lr_ratio)
        engine.set_lr(optimizer, lr)
        batches = [to_device(make_batch(idx), rt.device) for idx in engine.step_batches(n_units, step, cfg, rt, lengths)]
        metrics = engine.train_step(model, optimizer, scaler, batches, loss_fn, count_units, rt, cfg)
        if is_kto:
            metrics = finish_kto_metrics(metrics)
        engine.check_finite(metrics["loss"], metrics["grad_norm"], step, cfg, stats)
        if cfg.ref_update_every and (step + 1) % cfg.ref_update_every == 0:
            update_reference(ref_model, model, cfg.ref_update_alpha)
        bar.set_postfix(loss=f"{metrics['loss']:.3f}", acc=f"{metrics.get('rewards/accuracies', float('nan')):.2f}")
        if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.max_steps:
            log.log(step + 1, {**metrics, "learning_rate": lr}, bar)
        if eval_pairs and rt.is_main and cfg.eval_every and (step + 1) % cfg.eval_every == 0 and step + 1 < cfg.max_steps:
            log.log(step + 1, evaluate_pairs(engine.unwrap(model), ref_model, eval_pairs, eval_ref_table, cfg, tok.pad_id, rt), bar)
        if gold_prompts and (step + 1) % cfg.gold_eval_every == 0 and step + 1 < cfg.max_steps:
            log.log(step + 1, gold_point(engine.unwrap(model), tok, gold_prompts, cfg.max_new_tokens, gold_ref), bar)
        if engine.should_save(step + 1, start_step, cfg):
            save(step + 1, finished=step + 1 == cfg.max_steps)
        if engine.should_stop(step + 1, start_step, cfg):
            engine.print0(rt, f"stopping after {cfg.stop_after_steps} steps as asked; continue with --resume")
            engine.cleanup(rt)
            return
    bar.close()

    # ---- evaluate: held-out pairs, then the gold rule with the KL to the SFT model
    if rt.is_main:
        policy = engine.unwrap(model).eval()
        if eval_pairs:
            res = evaluate_pairs(policy, ref_model, eval_pairs, eval_ref_table, cfg, tok.pad_id, rt)
            log.log(cfg.max_steps, res)
            engine.write_json(res, f"{cfg.out_dir}/eval_pairs.json")
        if cfg.eval_data:
            sft_ref = gold_ref if gold_ref is not None else sft_reference()
            res = evaluate_policy(policy, tok, load_eval_prompts(cfg.eval_data, tok, cfg.eval_prompts), cfg.max_new_tokens, sft_ref)
            engine.write_json(res, f"{cfg.out_dir}/eval.json")
            log.log(cfg.max_steps, {k: v for k, v in res.items() if k != "examples"})
            before = Path(cfg.init_from) / "eval.json"
            if before.exists():
                print(f"sft eval ({before}): {format_result(json.loads(before.read_text()))}")
            print(f"dpo ({cfg.loss_type}) eval on {res['n_prompts']} held-out prompts: {format_result(res)}")
    engine.cleanup(rt)


if __name__ == "__main__":
    main()
