"""Walkthroughs of the offline stages: SFT, the reward model, the DPO family, KTO.

Each one takes step 0 of its script's data order (fewer examples: --batch), computes what the script's loss
function computes with the same package functions (minialign.algorithms.preference, packing, losses), prints
every quantity on the way, takes ONE AdamW step through loop.train_step, and prints how the quantities moved.
Simplified: one micro-batch; the peak learning rate without the scripts' warmup (so the step is visible).
"""

from __future__ import annotations

from types import SimpleNamespace

import torch

from minialign.algorithms.losses import DEFAULT_BETA, bradley_terry_loss, kto_loss, token_logps
from minialign.algorithms.packing import collate_groups, collate_pairs, group_pairs, pair_count, response_logps
from minialign.algorithms.preference import (LENGTH_AVERAGED, REFERENCE_FREE, collate_completions, completion_logps,
                                             kl_partner, pair_logps, preference_terms, reference_logps, unpair,
                                             used_logps)
from minialign.algorithms.reward_model import pair_rewards
from minialign.algorithms.roles import disable_dropout, sft_reference
from minialign.data.batching import collate_lm, tokenize_preferences, tokenize_sft
from minialign.data.formats import load_preferences, load_sft
from minialign.training import checkpoint, runtime
from minialign.walkthrough.context import MAX_LEN, SCRIPT_DEFAULTS, Context, first_step_indices, one_update, sft_loss
from minialign.walkthrough.trace import Trace, num, piece

# the loss each --loss_type computes, as printed (x = (π_c - ref_c) - (π_r - ref_r); minialign.algorithms.losses)
DPO_EQUATIONS = {
    "sigmoid": "losses = -log σ(β x)            (DPO, Rafailov et al. 2023 Eq. 7; cDPO with ε > 0)",
    "robust": "losses = (-(1-ε) log σ(βx) + ε log σ(-βx)) / (1 - 2ε)        (rDPO)",
    "hinge": "losses = max(0, 1 - β x)         (SLiC)",
    "ipo": "losses = (x - 1/(2β))²           (IPO; length-averaged log-probs)",
    "simpo": "losses = -log σ(β π_c - β π_r - γ)   (SimPO Eq. 6; averaged log-probs, no reference)",
    "cpo": "losses = -log σ(β (π_c - π_r)) + α NLL(y_c)   (CPO; no reference)",
    "orpo": "losses = NLL(y_c) - β log σ(log odds(y_c) - log odds(y_r))   (ORPO Eq. 6-7; averaged)",
    "unlikelihood": "losses = NLL(y_c) - β mean_t log(1 - π(y_r,t))   (Welleck et al. 2019; per token)",
}


def token_table(tr: Trace, tok, ids, columns: dict, rows: int) -> None:
    """t | id | token | one column per name: the first `rows` tokens of a response (all when rows = 0)."""
    n = len(ids) if not rows else min(rows, len(ids))
    tr.table(["t", "id", "token", *columns], [[str(t), str(int(ids[t])), piece(tok, ids[t]),
                                               *(float(c[t]) for c in columns.values())] for t in range(n)])
    if n < len(ids):
        tr.line(f"  ... {len(ids) - n} more tokens (--rows 0 prints all)")


def show_pairs(tr: Trace, tok, examples: list[dict]) -> None:
    for i, e in enumerate(examples):
        tr.line(f"  pair {i}: prompt {len(e['prompt'])} tokens, chosen {len(e['chosen'])}, rejected "
                f"{len(e['rejected'])}")
        tr.text_block("x", tok.decode(e["prompt"], skip_special=False))
        tr.text_block("y_c", tok.decode(e["chosen"], skip_special=False))
        tr.text_block("y_r", tok.decode(e["rejected"], skip_special=False))


def load_pairs(ctx: Context, batch_size: int) -> tuple[list[dict], list[int]]:
    """data/pref_train.jsonl tokenized as train_dpo.py / train_rm.py do, and step 0's first batch_size pairs."""
    pairs = tokenize_preferences(load_preferences(str(ctx.data_dir / "pref_train.jsonl")), ctx.tok, MAX_LEN)
    return pairs, first_step_indices(len(pairs), batch_size, ctx.seed, ctx.rt)


# ------------------------------------------------------------------------------------------------ SFT

def walk_sft(ctx: Context, tr: Trace, lr: float = 0.0, batch_size: int = 4, rows: int = 0) -> None:
    lr = lr or SCRIPT_DEFAULTS["sft"]["lr"]
    tok = ctx.tok
    runtime.seed_everything(ctx.seed)
    tr.line(f"walkthrough sft: ONE update of train_sft.py (lr {lr})")
    tr.line(f"  model: {ctx.where}")
    tr.line("  loss = -1/N Σ_t log π(y_t | y_<t), the sum over the N assistant tokens of the step (nll_loss)")

    convs = load_sft(str(ctx.data_dir / "sft_train.jsonl"))
    examples = tokenize_sft(convs, tok, MAX_LEN)
    idx = first_step_indices(len(examples), batch_size, ctx.seed, ctx.rt)
    tr.section(f"the conversations (data/sft_train.jsonl, step 0's first {batch_size})")
    for k, i in enumerate(idx):
        tr.line(f"  conversation {k}: {len(examples[i][0])} tokens, {sum(examples[i][1])} of them trained")
        for m in convs[i]:
            tr.text_block(m["role"], m["content"])

    batch = collate_lm([examples[i] for i in idx], tok.pad_id)
    inputs, labels, mask = batch["inputs"], batch["labels"], batch["label_mask"]
    tr.section("the ChatML row and the loss mask (conversation 0)")
    tr.line(f"  inputs = ids[:, :-1] {tuple(inputs.shape)}, labels = ids[:, 1:], label_mask {tuple(mask.shape)}: "
            "True = an assistant token")
    tr.note("Position t reads inputs[t] and is trained to predict labels[t] = the next token, only where "
            "label_mask[t] is True: the assistant's words and its <|im_end|>, never the template or the user.")
    first = int(mask[0].nonzero()[0])
    last = int(mask[0].nonzero()[-1])
    start = max(0, first - 3)
    shown = range(start, last + 1) if not rows else range(start, min(last + 1, start + rows))
    tr.table(["t", "input", "-> label", "id", "trained"],
             [[str(t), piece(tok, inputs[0, t]), piece(tok, labels[0, t]), str(int(labels[0, t])),
               "yes" if mask[0, t] else "no"] for t in shown])
    tr.keep("label_mask", mask)

    model = disable_dropout(checkpoint.load_model(ctx.ckpt))
    tr.section("log π(y_t) of every trained token (token_logps)")
    with torch.no_grad():
        logits = model(inputs, logits_mask=mask)  # (M, V): the head on trained positions only
        logps = token_logps(logits[None], labels[mask][None])[0]  # (M,)
    tr.tensor("logits", logits, "(M, V): the output head on the M trained positions only", k=3)
    tr.tensor("token_logps", logps, "(M,) log softmax(logits)[label]")
    row0 = logps[: int(mask[0].sum())]
    token_table(tr, tok, labels[0][mask[0]].tolist(), {"log π(y_t)": row0, "-log π(y_t)": -row0}, rows)
    tr.keep("token_logps_0", row0)

    tr.section("the loss: nll_loss = -Σ log π / N")
    with torch.no_grad():
        loss_sum, _ = sft_loss(model, batch)
    n_tokens = int(mask.sum())
    tr.scalar("sum of -log π", loss_sum, f"over the N = {n_tokens} trained tokens of the step")
    tr.scalar("loss", loss_sum / n_tokens, "= sum / N (loop.train_step divides by the step's token count)")
    tr.keep("n_tokens", n_tokens)

    tr.section(f"ONE update: AdamW at lr {lr} (loop.train_step)")
    metrics = one_update(model, [batch], sft_loss, lambda b: b["label_mask"].sum(), lr, ctx.rt)
    tr.scalar("train_step loss", metrics["loss"], "the same number, from the step itself")
    tr.scalar("grad_norm", metrics["grad_norm"], "before clipping at 1.0")

    tr.section("after the step: how log π(y_t) moved (conversation 0)")
    with torch.no_grad():
        after = token_logps(model(inputs, logits_mask=mask)[None], labels[mask][None])[0]
        loss_after = sft_loss(model, batch)[0] / n_tokens
    a0 = after[: int(mask[0].sum())]
    token_table(tr, tok, labels[0][mask[0]].tolist(), {"before": row0, "after": a0, "Δ": a0 - row0}, rows)
    tr.scalar("loss after", loss_after, f"(before {num(loss_sum / n_tokens)})")
    tr.keep("token_logps_0_after", a0)


# ----------------------------------------------------------------------------------------- reward model

def walk_rm(ctx: Context, tr: Trace, lr: float = 0.0, batch_size: int = 4, rows: int = 0) -> None:
    lr = lr or SCRIPT_DEFAULTS["rm"]["lr"]
    tok = ctx.tok
    runtime.seed_everything(ctx.seed)  # as runtime.setup: the fresh score head below is drawn from it
    tr.line(f"walkthrough rm: ONE update of train_rm.py (lr {lr})")
    tr.line(f"  model: {ctx.where}")
    tr.line("  loss = mean over pairs of -log σ(r(x, y_c) - r(x, y_r))   (Bradley-Terry; bradley_terry_loss)")

    examples, idx = load_pairs(ctx, batch_size)
    tr.section(f"the pairs (data/pref_train.jsonl, step 0's first {batch_size})")
    show_pairs(tr, tok, [examples[i] for i in idx])
    groups = group_pairs([examples[i] for i in idx])  # as train_rm.py: a plain pair is a group of two
    batch = collate_groups(groups, tok.pad_id)

    model = disable_dropout(checkpoint.load_model(ctx.ckpt, kind="scalar"))
    tr.section("the reward model: the SFT backbone and a fresh linear score head")
    tr.note("A ScalarModel gives a score at every position; the reward of a response is the score at its LAST "
            "token (its <|im_end|>): the one position that has read the whole prompt and response.")
    flat_ids = batch["input_ids"].flatten()
    tr.table(["pair", "chosen: last token", "column", "rejected: last token", "column"],
             [[str(i), piece(tok, flat_ids[batch["last"][2 * i]]), str(int(batch["last"][2 * i])),
               piece(tok, flat_ids[batch["last"][2 * i + 1]]), str(int(batch["last"][2 * i + 1]))]
              for i in range(len(idx))])

    tr.section("rewards, margin, loss (pair_rewards, bradley_terry_loss)")
    with torch.no_grad():
        r_c, r_r = pair_rewards(model, batch)
        loss = bradley_terry_loss(r_c, r_r)
        per_pair = torch.stack([bradley_terry_loss(r_c[i : i + 1], r_r[i : i + 1]) for i in range(len(r_c))])
    tr.tensor("chosen_rewards", r_c, "r_c = r(x, y_c)")
    tr.tensor("rejected_rewards", r_r, "r_r = r(x, y_r)")
    tr.table(["pair", "r_c", "r_r", "r_c - r_r", "-log σ(r_c - r_r)", "r_c > r_r"],
             [[str(i), float(r_c[i]), float(r_r[i]), float(r_c[i] - r_r[i]), float(per_pair[i]),
               "yes" if r_c[i] > r_r[i] else "no"] for i in range(len(r_c))])
    tr.keep("per_pair_losses", per_pair)
    tr.scalar("loss", loss, "mean over pairs; the head is new, so about log 2 = 0.6931")
    tr.scalar("accuracy", float((r_c > r_r).float().mean()), "share of pairs with r_c > r_r")

    def rm_loss(m, b):  # train_rm.rm_loss without its logging: the per-pair SUM (train_step divides by the pairs)
        c, r = pair_rewards(m, b)
        return len(c) * bradley_terry_loss(c, r, b.get("margin")), {}

    tr.section(f"ONE update: AdamW at lr {lr} (loop.train_step)")
    metrics = one_update(model, [batch], rm_loss, pair_count, lr, ctx.rt)
    tr.scalar("train_step loss", metrics["loss"])
    tr.scalar("grad_norm", metrics["grad_norm"], "before clipping at 1.0")

    tr.section("after the step: how the rewards moved")
    with torch.no_grad():
        a_c, a_r = pair_rewards(model, batch)
    tr.table(["pair", "r_c before", "after", "r_r before", "after", "margin before", "after"],
             [[str(i), float(r_c[i]), float(a_c[i]), float(r_r[i]), float(a_r[i]), float(r_c[i] - r_r[i]),
               float(a_c[i] - a_r[i])] for i in range(len(r_c))])
    tr.keep("chosen_rewards_after", a_c)
    tr.keep("rejected_rewards_after", a_r)
    tr.scalar("loss after", bradley_terry_loss(a_c, a_r), f"(before {num(loss)})")


# ------------------------------------------------------------------------------------------ DPO family

def walk_dpo(ctx: Context, tr: Trace, loss_type: str = "sigmoid", beta: float = 0.0, lr: float = 0.0,
             batch_size: int = 4, rows: int = 0, label_smoothing: float = 0.0) -> None:
    beta = beta or DEFAULT_BETA[loss_type]
    lr = lr or SCRIPT_DEFAULTS["dpo"]["lr"]
    tok = ctx.tok
    # the fields of train_dpo.py's Config that the loss reads (preference_terms) and sft_reference reads
    cfg = SimpleNamespace(loss_type=loss_type, beta=beta, label_smoothing=label_smoothing, simpo_gamma_beta_ratio=0.5,
                          cpo_alpha=1.0, lora_r=0, init_from=ctx.ckpt)
    free, avg = loss_type in REFERENCE_FREE, loss_type in LENGTH_AVERAGED
    runtime.seed_everything(ctx.seed)
    tr.line(f"walkthrough dpo: ONE update of train_dpo.py --loss_type {loss_type} (beta {beta}, lr {lr})")
    tr.line(f"  model: {ctx.where}")
    tr.line("  x = (π_c - ref_c) - (π_r - ref_r),  π = log π(y | x) " + ("averaged" if avg else "summed")
            + " over the response tokens")
    tr.line("  " + DPO_EQUATIONS[loss_type])

    examples, idx = load_pairs(ctx, batch_size)
    pairs = [examples[i] for i in idx]
    tr.section(f"the pairs (data/pref_train.jsonl, step 0's first {batch_size})")
    show_pairs(tr, tok, pairs)
    batch = collate_pairs(pairs, tok.pad_id)
    tr.section("one packed row per pair [x | y_c | y_r] (minialign.algorithms.packing)")
    tr.line(f"  input_ids {tuple(batch['input_ids'].shape)}: pair b's prompt computed once, then y_c, then y_r "
            "(y_r cannot see y_c)")
    tr.line(f"  response_ids {tuple(batch['response_ids'].shape)}: rows 2b (chosen) and 2b+1 (rejected), "
            "response_mask True on real tokens")

    model = disable_dropout(checkpoint.load_model(ctx.ckpt))
    ref_model = None if free else sft_reference(model, cfg, ctx.rt)  # as train_dpo.py: a frozen copy
    tr.section("token log-probs of pair 0 under the policy" + ("" if free else " and the reference")
               + " (response_logps)")
    with torch.no_grad():
        tok_pi = response_logps(model, batch)  # (2B, N)
        tok_ref = None if free else response_logps(ref_model, batch)
    tr.tensor("policy token log-probs", tok_pi, "(2B, N), 0 off the mask", k=4)
    tr.keep("response_mask", batch["response_mask"])
    if not free:
        tr.keep("ref token log-probs", tok_ref)
        tr.note("At step 0 the policy IS the reference (both are the SFT model), so the two columns agree.")
    for side, r in (("chosen y_c", 0), ("rejected y_r", 1)):
        m = batch["response_mask"][r]
        cols = {"log π": tok_pi[r][m]} if free else {"log π": tok_pi[r][m], "log π_ref": tok_ref[r][m]}
        tr.line(f"  pair 0, {side}:")
        token_table(tr, tok, batch["response_ids"][r][m].tolist(), cols, rows)

    tr.section("sequence log-probs: the " + ("means" if avg else "sums") + " over each response (pair_logps)")
    with torch.no_grad():
        pol = pair_logps(model, batch)
        pi_c, pi_r = used_logps(pol, loss_type)
        ref_c, ref_r = (None, None) if free else reference_logps(ref_model, batch, cfg)
    tr.tensor("policy_chosen_logps", pi_c, "π_c = " + ("mean" if avg else "Σ") + "_t log π(y_c,t | x, y_c,<t)")
    tr.tensor("policy_rejected_logps", pi_r, "π_r")
    if not free:
        tr.tensor("ref_chosen_logps", ref_c, "ref_c, the same under the frozen reference")
        tr.tensor("ref_rejected_logps", ref_r, "ref_r")
    if loss_type in ("cpo", "orpo"):
        tr.tensor("policy_chosen_nll", pol.chosen_nll, "mean token NLL of y_c (the SFT term)")
    tr.keep("policy_chosen_nll", pol.chosen_nll)

    tr.section("implicit rewards, margin, loss (preference_terms -> "
               + {"simpo": "simpo_loss", "cpo": "cpo_loss", "orpo": "orpo_loss",
                  "unlikelihood": "unlikelihood_loss"}.get(loss_type, "dpo_loss") + ")")
    with torch.no_grad():
        losses, chosen_rewards, rejected_rewards = preference_terms(cfg, pi_c, pi_r, pol.chosen_nll, ref_c, ref_r, pol)
    reward_eq = "π (no β)" if loss_type == "unlikelihood" else "β π" if free else "β (log π - log π_ref)"
    tr.tensor("chosen_rewards", chosen_rewards, f"{reward_eq} of y_c")
    tr.tensor("rejected_rewards", rejected_rewards, f"{reward_eq} of y_r")
    header = ["pair", "chosen_rewards", "rejected_rewards", "margin", "losses"]
    table = [[str(i), float(chosen_rewards[i]), float(rejected_rewards[i]),
              float(chosen_rewards[i] - rejected_rewards[i]), float(losses[i])] for i in range(len(losses))]
    if not free:
        x = (pi_c - ref_c) - (pi_r - ref_r)
        header.insert(4, "x")
        for row, v in zip(table, x.tolist()):
            row.insert(4, v)
        tr.keep("x", x)
    tr.table(header, table)
    tr.keep("losses", losses)
    loss = losses.mean()
    tr.scalar("loss", loss, "mean over the pairs of the step" + ("; at π = π_ref: log 2 = 0.6931"
                                                                   if loss_type == "sigmoid" and not label_smoothing
                                                                   else ""))

    def pair_loss(m, b):  # train_dpo.pair_loss without its logging: the per-pair SUM (train_step divides)
        p = pair_logps(m, b)
        c, r = used_logps(p, loss_type)
        rc, rr = (None, None) if free else reference_logps(ref_model, b, cfg)
        return preference_terms(cfg, c, r, p.chosen_nll, rc, rr, p)[0].sum(), {}

    tr.section(f"ONE update: AdamW at lr {lr} (loop.train_step)")
    metrics = one_update(model, [batch], pair_loss, pair_count, lr, ctx.rt)
    tr.scalar("train_step loss", metrics["loss"], "the same loss, from the step itself")
    tr.scalar("grad_norm", metrics["grad_norm"], "before clipping at 1.0")

    tr.section("after the step: how each sequence log-prob moved")
    with torch.no_grad():
        a_c, a_r = used_logps(pair_logps(model, batch), loss_type)
        after = pair_logps(model, batch)
        a_losses = preference_terms(cfg, a_c, a_r, after.chosen_nll, ref_c, ref_r, after)[0]
    tr.table(["pair", "π_c before", "after", "Δ π_c", "π_r before", "after", "Δ π_r", "loss after"],
             [[str(i), float(pi_c[i]), float(a_c[i]), float(a_c[i] - pi_c[i]), float(pi_r[i]), float(a_r[i]),
               float(a_r[i] - pi_r[i]), float(a_losses[i])] for i in range(len(losses))])
    tr.keep("policy_chosen_logps_after", a_c)
    tr.keep("policy_rejected_logps_after", a_r)
    up = int(((a_c - pi_c) > (a_r - pi_r)).sum())
    tr.line(f"  the chosen response gained on the rejected one in {up} of {len(losses)} pairs")
    tr.scalar("loss after", a_losses.mean(), f"(before {num(loss)})")


# ------------------------------------------------------------------------------------------------- KTO

def kto_rows(examples: list[dict], idx: list[int], pad_id: int) -> dict:
    """train_kto.collate_kto's batch: the examples' rows, their KL rows (prompt i with the completion of
    kl_partner(i), cut to fit MAX_LEN) and labels. tests/test_walkthrough.py checks it against the script's."""
    ex = [examples[i] for i in idx]
    prompts = [e["prompt"] for e in ex]
    borrowed = [examples[kl_partner(i, len(examples))]["completion"][: max(1, MAX_LEN - len(examples[i]["prompt"]))]
                for i in idx]
    batch = collate_completions(prompts, [e["completion"] for e in ex], pad_id)
    batch["kl"] = collate_completions(prompts, borrowed, pad_id)
    batch["is_desirable"] = torch.tensor([e["label"] for e in ex], dtype=torch.bool)
    batch["kl_completions"] = borrowed
    return batch


def walk_kto(ctx: Context, tr: Trace, beta: float = 0.0, lr: float = 0.0, batch_size: int = 4, rows: int = 0) -> None:
    beta = beta or SCRIPT_DEFAULTS["kto"]["beta"]
    lr = lr or SCRIPT_DEFAULTS["kto"]["lr"]
    tok = ctx.tok
    cfg = SimpleNamespace(lora_r=0, init_from=ctx.ckpt)
    runtime.seed_everything(ctx.seed)
    tr.line(f"walkthrough kto: ONE update of train_kto.py (beta {beta}, lr {lr})")
    tr.line(f"  model: {ctx.where}")
    tr.line("  r = log π(y|x) - log π_ref(y|x);  z0 = max(0, mean of r on mismatched (x, y') rows)")
    tr.line("  losses = 1 - σ(β (r - z0)) if y is desirable,  1 - σ(β (z0 - r)) if not   (kto_loss)")

    pairs = tokenize_preferences(load_preferences(str(ctx.data_dir / "pref_train.jsonl")), tok, MAX_LEN)
    examples = unpair(pairs)  # every chosen desirable, every rejected undesirable
    idx = first_step_indices(len(examples), batch_size, ctx.seed, ctx.rt)
    batch = kto_rows(examples, idx, tok.pad_id)
    tr.section(f"the examples (data/pref_train.jsonl split into {len(examples)} unpaired ones; step 0's first "
               f"{batch_size})")
    for k, i in enumerate(idx):
        e = examples[i]
        tr.line(f"  example {k}: {'desirable' if e['label'] else 'undesirable'}")
        tr.text_block("x", tok.decode(e["prompt"], skip_special=False))
        tr.text_block("y", tok.decode(e["completion"], skip_special=False))
        tr.text_block("KL row y'", tok.decode(batch["kl_completions"][k], skip_special=False))

    model = disable_dropout(checkpoint.load_model(ctx.ckpt))
    ref_model = sft_reference(model, cfg, ctx.rt)
    tr.section("log-probs of each completion and of its KL row (completion_logps)")
    with torch.no_grad():
        policy_kl_logps = completion_logps(model, batch["kl"])[0]
        policy_logps = completion_logps(model, batch)[0]
        ref_logps, ref_kl_logps = completion_logps(ref_model, batch)[0], completion_logps(ref_model, batch["kl"])[0]
    z0 = (policy_kl_logps - ref_kl_logps).mean()  # KL(π ‖ ref) on mismatched pairs; kto_loss clamps it at 0
    tr.table(["example", "label", "log π(y)", "log π_ref(y)", "r", "log π(y')", "log π_ref(y')"],
             [[str(k), "desirable" if batch["is_desirable"][k] else "undesirable", float(policy_logps[k]),
               float(ref_logps[k]), float(policy_logps[k] - ref_logps[k]), float(policy_kl_logps[k]),
               float(ref_kl_logps[k])] for k in range(len(idx))])
    for name, v in (("policy_logps", policy_logps), ("ref_logps", ref_logps), ("policy_kl_logps", policy_kl_logps),
                    ("ref_kl_logps", ref_kl_logps)):
        tr.keep(name, v)
    tr.scalar("z0", z0, "mean over the KL rows of log π(y') - log π_ref(y'), clamped at 0 in kto_loss")

    tr.section("the loss (kto_loss)")
    with torch.no_grad():
        losses, rewards = kto_loss(policy_logps, ref_logps, batch["is_desirable"], z0, beta)
    tr.tensor("rewards", rewards, "β r, detached")
    tr.tensor("losses", losses)
    tr.scalar("loss", losses.mean(), "mean over the examples; at π = π_ref: 1 - σ(0) = 0.5")

    def kto_batch_loss(m, b):  # train_kto.kto_batch_loss without its logging: the per-example SUM
        with torch.no_grad():
            pkl = completion_logps(m, b["kl"])[0]
        pl = completion_logps(m, b)[0]
        return kto_loss(pl, ref_logps, b["is_desirable"], (pkl - ref_kl_logps).mean(), beta)[0].sum(), {}

    tr.section(f"ONE update: AdamW at lr {lr} (loop.train_step)")
    metrics = one_update(model, [batch], kto_batch_loss, lambda b: len(b["is_desirable"]), lr, ctx.rt)
    tr.scalar("train_step loss", metrics["loss"])
    tr.scalar("grad_norm", metrics["grad_norm"], "before clipping at 1.0")

    tr.section("after the step: how each log-ratio r moved")
    with torch.no_grad():
        after = completion_logps(model, batch)[0]
    tr.table(["example", "label", "r before", "r after", "Δ r"],
             [[str(k), "desirable" if batch["is_desirable"][k] else "undesirable",
               float(policy_logps[k] - ref_logps[k]), float(after[k] - ref_logps[k]), float(after[k] - policy_logps[k])]
              for k in range(len(idx))])
    tr.keep("policy_logps_after", after)
