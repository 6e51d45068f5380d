"""Walkthroughs of the online stages: PPO with GAE, GRPO and the REINFORCE family, online DPO.

Each samples step 0's rollout exactly as its script does (the prompts of step 0, the sampler seeded from
(seed, step, prompt)), computes what the script computes from it with the same package functions
(minialign.algorithms.rollout, packing, advantages, losses), prints it token by token, takes ONE AdamW step
through loop.train_step and prints what moved. Simplified: a few prompts (--batch), responses of at most
--max_new_tokens; PPO takes one minibatch per epoch and its second epoch's forward is shown without a step.
A column named ℓ_t is the library's own loss function called on that one token alone (a mask with one True
and normalizer 1), so it is the package's number, not a re-derivation.
"""

from __future__ import annotations

from types import SimpleNamespace

import torch
import torch.nn as nn

from minialign.algorithms.advantages import (completion_mask, count_units, greedy_rewards, step_advantages,
                                             token_rewards, whiten_all_ranks)
from minialign.algorithms.losses import (DEFAULT_BETA, SUM, dpo_loss, gae, grpo_loss, kl_penalty,
                                         policy_gradient_loss, ppo_policy_loss, ppo_value_loss)
from minialign.algorithms.packing import collate_pairs, pair_count, response_logps, response_scores, response_values
from minialign.algorithms.preference import best_and_worst, pair_logps
from minialign.algorithms.reward_funcs import parse_reward_funcs
from minialign.algorithms.roles import disable_dropout, load_reward_model, sft_reference
from minialign.algorithms.rollout import (greedy_rollout, load_rl_prompts, micro_batch_rows, packed_batch,
                                          rollout_forward, sample_rollout, source_rewards, step_prompt_indices)
from minialign.training import checkpoint, runtime
from minialign.training.runtime import gather_columns
from minialign.walkthrough.context import MAX_LEN, SCRIPT_DEFAULTS, Context, one_update
from minialign.walkthrough.trace import Trace, num, piece

MICRO_BATCH_SIZE = 64  # the scripts' --micro_batch_size (sequences per forward)


def per_token(loss_of_mask, mask_row: torch.Tensor, row: int) -> torch.Tensor:
    """(N,) the library loss on each counted token of `row` alone: loss_of_mask(a mask with that one True)."""
    out = torch.zeros(mask_row.shape[1])
    for t in mask_row[row].nonzero().flatten().tolist():
        one = torch.zeros_like(mask_row)
        one[row, t] = True
        out[t] = loss_of_mask(one)
    return out


def load_step_prompts(ctx: Context, sources, batch_size: int, max_new_tokens: int) -> list[dict]:
    """data/rl_train.jsonl as the RL scripts load it, and the prompts of step 0 (step_prompt_indices)."""
    prompts = load_rl_prompts(str(ctx.data_dir / "rl_train.jsonl"), ctx.tok, MAX_LEN - max_new_tokens, sources)
    return [prompts[i] for i in step_prompt_indices(len(prompts), 0, batch_size, ctx.seed, ctx.rt)]


def show_responses(tr: Trace, ro, extra: dict, width: int = 44) -> None:
    """One row per response: its text (cut), tokens, whether it ended with <|im_end|>, and the `extra` columns."""
    rows = []
    for i, text in enumerate(ro.completions):
        t = repr(text)
        rows.append([str(i), t if len(t) <= width else t[: width - 3] + "..'", str(int(ro.lengths[i])),
                     "yes" if ro.finished[i] else "no", *(float(v[i]) for v in extra.values())])
    tr.table(["i", "response", "tokens", "eos", *extra], rows)


# ------------------------------------------------------------------------------------------------ PPO

def walk_ppo(ctx: Context, tr: Trace, kl_coef: float | None = None, lr: float = 0.0, batch_size: int = 4,
             rows: int = 0, max_new_tokens: int = 32) -> None:
    d = SCRIPT_DEFAULTS["ppo"]
    kl_coef = d["kl_coef"] if kl_coef is None else kl_coef
    lr = lr or d["lr"]
    T, gamma, lam, eps, eps_v, vf_coef = (d[k] for k in ("temperature", "gamma", "lam", "cliprange",
                                                         "cliprange_value", "vf_coef"))
    tok, rt = ctx.tok, ctx.rt
    sources = parse_reward_funcs(["reward_model"] if ctx.reward_model else ["gold"], [], ("reward_model",))
    runtime.seed_everything(ctx.seed)
    tr.line(f"walkthrough ppo: ONE update of train_ppo.py (kl_coef {kl_coef}, lr {lr}, γ {gamma}, λ {lam}, "
            f"ε {eps})")
    tr.line(f"  model: {ctx.where}")
    tr.line("  score: " + (f"the reward model {ctx.reward_model}" if ctx.reward_model else "the default task's gold rule"
                           " (no reward model: --reward_funcs gold --reward_model '')"))
    tr.line("  r_t = -kl_coef · kl_t (+ the score s at the last token);  GAE: δ_t = r_t + γ V_{t+1} - V_t,")
    tr.line("  A_t = δ_t + γλ A_{t+1},  R_t = A_t + V_t;  loss = ppo_policy_loss + vf_coef · ppo_value_loss")

    # the four models, as train_ppo.py: policy and reference from the SFT checkpoint, the judge, the value model
    cfg = SimpleNamespace(lora_r=0, init_from=ctx.ckpt)
    policy = disable_dropout(checkpoint.load_model(ctx.ckpt))
    ref_model = sft_reference(policy, cfg, rt)
    reward_model = load_reward_model(ctx.reward_model, rt, "walkthrough") if ctx.reward_model else None
    value = disable_dropout(checkpoint.load_model(ctx.reward_model or ctx.ckpt, kind="scalar"))
    step_prompts = load_step_prompts(ctx, sources, batch_size, max_new_tokens)

    tr.section(f"rollout: one response to each of step 0's {batch_size} prompts (sample_rollout, T = {T})")
    ro = sample_rollout(policy, tok, step_prompts, 1, max_new_tokens, T, ctx.seed, 0, 0)
    for i, p in enumerate(step_prompts):
        tr.text_block(f"prompt {i}", p["prompt_text"])
        tr.text_block("response", tok.decode(ro.response_ids[i][ro.response_mask[i]].tolist(), skip_special=False))
    mask = ro.response_mask
    tr.tensor("response_ids", ro.response_ids, "(B, N), right-padded", k=8)
    tr.keep("response_mask", mask)

    tr.section("no-grad forwards in the training layout: log π_old, log π_ref, V_t, the score")
    mb_rows = micro_batch_rows(ro, MICRO_BATCH_SIZE, list(range(len(ro.rows))), by_length=True)
    b_old_logps = rollout_forward(lambda b: response_logps(policy, b, T), ro, mb_rows)  # (B, N) log π_old
    b_values = rollout_forward(lambda b: response_values(value, b), ro, mb_rows)  # (B, N) V_t
    b_ref_logps = rollout_forward(lambda b: response_logps(ref_model, b, T), ro, mb_rows)  # (B, N) log π_ref
    rm_scores = rollout_forward(lambda b: response_scores(reward_model, b), ro, mb_rows) if reward_model else None
    tr.tensor("old_logps", b_old_logps, "(B, N) log π_old(y_t): the policy that sampled", k=4)
    tr.tensor("ref_logps", b_ref_logps, "(B, N) log π_ref(y_t): the frozen SFT model", k=4)
    tr.tensor("values", b_values, "(B, N) V_t = V(prompt + y_<t), read where π(y_t) is predicted", k=4)
    rewards = source_rewards(sources, ro, rm_scores)
    b_scores = sum(s.weight * rewards[s.name] for s in sources).float()  # s = Σ_k w_k r_k
    last = (ro.lengths - 1).tolist()
    tr.table(["i", "tokens", "eos", "last token", "score s"],
             [[str(i), str(int(ro.lengths[i])), "yes" if ro.finished[i] else "no",
               piece(tok, ro.response_ids[i, last[i]]), float(b_scores[i])] for i in range(len(ro.rows))])
    tr.keep("scores", b_scores)

    tr.section("per-token KL and reward: kl_t = log π_old - log π_ref (kl_penalty k1), token_rewards")
    b_kl = kl_penalty(b_old_logps, b_ref_logps, "k1").masked_fill(~mask, 0.0)
    b_rewards, _ = token_rewards(b_scores, b_kl, mask, kl_coef)
    tr.tensor("kl", b_kl, "(B, N)", k=4)
    tr.tensor("rewards", b_rewards, "(B, N): -kl_coef · kl_t, + s at each row's last token", k=4)
    tr.note("At step 0 the policy IS the reference, so kl_t = 0 and the only reward is the score, on the last "
            "token; once the policy moves, every token pays -kl_coef · kl_t.")
    r0 = ro.response_ids[0][mask[0]].tolist()
    n0 = len(r0) if not rows else min(rows, len(r0))
    tr.line("  response 0:")
    tr.table(["t", "id", "token", "log π_old", "log π_ref", "kl_t", "r_t"],
             [[str(t), str(r0[t]), piece(tok, r0[t]), float(b_old_logps[0, t]), float(b_ref_logps[0, t]),
               float(b_kl[0, t]), float(b_rewards[0, t])] for t in range(n0)])

    tr.section(f"GAE (gae, γ = {gamma}, λ = {lam}), then advantages whitened over the rollout (whiten)")
    b_advantages, b_returns = gae(b_rewards, b_values, mask, gamma, lam)  # A_t, R_t = A_t + V_t
    b_whitened = whiten_all_ranks(b_advantages, mask, rt)
    nxt = torch.cat([b_values[:, 1:] * mask[:, 1:], torch.zeros_like(b_values[:, :1])], dim=1)  # γ V_{t+1}, 0 at end
    delta = (b_rewards + gamma * nxt - b_values).masked_fill(~mask, 0.0)  # δ_t = r_t + γ V_{t+1} - V_t
    tr.line("  response 0, computed backwards from its last token:")
    tr.table(["t", "token", "r_t", "V_t", "V_{t+1}", "δ_t", "A_t", "R_t", "Â_t"],
             [[str(t), piece(tok, r0[t]), float(b_rewards[0, t]), float(b_values[0, t]), float(nxt[0, t]),
               float(delta[0, t]), float(b_advantages[0, t]), float(b_returns[0, t]), float(b_whitened[0, t])]
              for t in range(n0)])
    for name, v in (("old_logps", b_old_logps), ("ref_logps", b_ref_logps), ("values", b_values), ("kl", b_kl),
                    ("rewards", b_rewards), ("delta", delta), ("advantages_raw", b_advantages),
                    ("returns", b_returns), ("advantages", b_whitened)):
        tr.keep(name, v)
    tr.note("Â_t = (A_t - mean) / std over every response token of the rollout: the advantages the loss uses.")

    tr.section(f"ONE update: ppo_policy_loss + {vf_coef} · ppo_value_loss, AdamW at lr {lr} (loop.train_step)")
    pv = nn.ModuleDict({"policy": policy, "value": value})  # one optimizer over both, as train_ppo.PolicyAndValue
    tensors = {"old_logps": b_old_logps, "old_values": b_values, "advantages": b_whitened, "returns": b_returns}
    batches = [packed_batch(ro, rws, **tensors) for rws in mb_rows]

    def ppo_loss_sum(m, b):  # train_ppo.ppo_loss_sum: the token SUMS (train_step divides by the step's tokens)
        logps, values = response_logps(m["policy"], b, T), response_values(m["value"], b)
        b["logps"] = logps.detach()
        pg_sum, _ = ppo_policy_loss(logps, b["old_logps"], b["advantages"], b["response_mask"], eps, normalizer=SUM)
        vf_sum, _ = ppo_value_loss(values, b["old_values"], b["returns"], b["response_mask"], eps_v, normalizer=SUM)
        return pg_sum + vf_coef * vf_sum, {"policy_loss": pg_sum.detach(), "value_loss": vf_sum.detach()}

    metrics = one_update(pv, batches, ppo_loss_sum, lambda b: b["response_mask"].sum(), lr, rt)
    dev = max(float((b["logps"] - b["old_logps"])[b["response_mask"]].exp().sub(1).abs().max()) for b in batches)
    tr.scalar("max |ratio - 1|", dev, "ratio = π / π_old on the first update: exactly 1 (nothing has moved yet)")
    tr.scalar("policy_loss", metrics["policy_loss"], "mean of -Â_t · ratio = -mean(Â) = 0 (Â is whitened); "
                                                     "its gradient is not 0")
    tr.scalar("value_loss", metrics["value_loss"], "½ mean (V_t - R_t)²")
    tr.scalar("loss", metrics["loss"], "policy_loss + vf_coef · value_loss")
    tr.scalar("grad_norm", metrics["grad_norm"], "policy and value together, before clipping at 1.0")
    tr.keep("update_loss", metrics["loss"])

    tr.section("after the step: the next epoch's forward on the same rollout (ratio, clipping)")
    with torch.no_grad():
        new_logps = rollout_forward(lambda b: response_logps(policy, b, T), ro, mb_rows)
        new_values = rollout_forward(lambda b: response_values(value, b), ro, mb_rows)
        pg_loss, pg = ppo_policy_loss(new_logps, b_old_logps, b_whitened, mask, eps)
        vf_loss, vf = ppo_value_loss(new_values, b_values, b_returns, mask, eps_v)
    ratio = torch.exp(new_logps - b_old_logps).masked_fill(~mask, 1.0)  # r_t(θ) = π / π_old
    clipped = ratio.clamp(1 - eps, 1 + eps)
    is_clipped = (-b_whitened * clipped > -b_whitened * ratio) & mask  # the clipped branch is the larger loss
    k = int(is_clipped.sum(-1).argmax())  # the response with the most clipped tokens (0 if none is clipped)
    with torch.no_grad():
        pg_t = per_token(lambda one: ppo_policy_loss(new_logps, b_old_logps, b_whitened, one, eps, normalizer=SUM)[0],
                         mask, k)
        vf_t = per_token(lambda one: ppo_value_loss(new_values, b_values, b_returns, one, eps_v, normalizer=SUM)[0],
                         mask, k)
    rk = ro.response_ids[k][mask[k]].tolist()
    nk = len(rk) if not rows else min(rows, len(rk))
    tr.line(f"  response {k}, the one with the most clipped tokens:")
    tr.line(f"  ℓ_t = max(-Â_t · ratio, -Â_t · clip(ratio, {1 - eps:g}, {1 + eps:g}))")
    tr.table(["t", "token", "Â_t", "ratio", "-Â·ratio", "-Â·clip", "ℓ_t", "clipped"],
             [[str(t), piece(tok, rk[t]), float(b_whitened[k, t]), float(ratio[k, t]),
               float(-b_whitened[k, t] * ratio[k, t]), float(-b_whitened[k, t] * clipped[k, t]), float(pg_t[t]),
               "yes" if is_clipped[k, t] else "no"] for t in range(nk)])
    v_clip = b_values + (new_values - b_values).clamp(-eps_v, eps_v)
    tr.line(f"  response {k}: ℓ^V_t = ½ max((V - R)², (V_clip - R)²), V_clip = V_old + clip(V - V_old, ±{eps_v:g})")
    tr.table(["t", "V_old", "V", "V_clip", "R_t", "(V - R)²", "(V_clip - R)²", "ℓ^V_t"],
             [[str(t), float(b_values[k, t]), float(new_values[k, t]), float(v_clip[k, t]), float(b_returns[k, t]),
               float((new_values[k, t] - b_returns[k, t]) ** 2), float((v_clip[k, t] - b_returns[k, t]) ** 2),
               float(vf_t[t])] for t in range(nk)])
    for name, v in (("new_logps", new_logps), ("new_values", new_values), ("ratio", ratio), ("pg_token", pg_t),
                    ("vf_token", vf_t), ("clipped_response", k)):
        tr.keep(name, v)
    tr.scalar("ppo_policy_loss", pg_loss, f"clipfrac {num(pg['clipfrac'])}, approx_kl {num(pg['approx_kl'])}, "
                                          f"ratio_mean {num(pg['ratio_mean'])}")
    tr.scalar("ppo_value_loss", vf_loss, f"value clipfrac {num(vf['clipfrac'])}")
    tr.note("train_ppo.py takes num_ppo_epochs x num_minibatches = 4 such steps per rollout; a ratio outside "
            f"1 ± {eps:g} in the direction the advantage pushes is clipped: its gradient is 0.")


# ------------------------------------------------------------------------------ GRPO, REINFORCE family

def walk_grpo(ctx: Context, tr: Trace, estimator: str = "grpo", loss_type: str = "grpo", beta: float | None = None,
              lr: float = 0.0, batch_size: int = 2, rows: int = 0, num_generations: int = 4,
              max_new_tokens: int = 32) -> None:
    d = SCRIPT_DEFAULTS["grpo"]
    beta = d["beta"] if beta is None else beta
    lr = lr or d["lr"]
    T, eps_low, eps_high, G = d["temperature"], d["epsilon_low"], d["epsilon_high"], num_generations
    kl_in = "loss" if estimator == "grpo" else "reward"  # train_grpo.py's --kl_in auto
    beta_loss = beta if kl_in == "loss" else 0.0
    mask_truncated = estimator != "remax"  # train_grpo.py: remax needs --no-mask_truncated_completions
    tok, rt = ctx.tok, ctx.rt
    sources = parse_reward_funcs(["gold"], [], ("reward_model",))
    runtime.seed_everything(ctx.seed)
    tr.line(f"walkthrough grpo: ONE update of train_grpo.py --advantage_estimator {estimator} --loss_type {loss_type}")
    tr.line(f"  G {G}, beta {beta}" + (f" (KL in the {kl_in})" if beta else "") + f", lr {lr}")
    tr.line(f"  model: {ctx.where}")
    tr.line("  reward: the default task's gold rule (--reward_funcs gold, the script's default)")
    tr.line({"grpo": "  A_i = (r_i - mean(r)) / (std(r) + 1e-4) within each group   (group_advantages)",
             "rloo": "  A_i = r_i - mean of the other G-1 rewards   (rloo_advantages)",
             "reinforce_pp": "  A_t = r - β Σ_{t'>=t} kl_t', whitened over the whole batch   (reinforce_pp_advantages)",
             "remax": "  A_i = r_i - r(greedy response to the same prompt)   (remax_advantages)"}[estimator])
    tr.line("  ℓ_t = -min(ratio · A_t, clip(ratio, 1 - ε_low, 1 + ε_high) · A_t)"
            + (" + β k3_t" if beta_loss else "") + "   (policy_gradient_loss)")

    cfg = SimpleNamespace(lora_r=0, init_from=ctx.ckpt)
    policy = disable_dropout(checkpoint.load_model(ctx.ckpt))
    ref_model = sft_reference(policy, cfg, rt) if beta > 0 else None  # as train_grpo.py: only when β > 0
    step_prompts = load_step_prompts(ctx, sources, batch_size, max_new_tokens)

    tr.section(f"rollout: G = {G} responses to each of step 0's {batch_size} prompts (sample_rollout), rewarded")
    ro = sample_rollout(policy, tok, step_prompts, G, max_new_tokens, T, ctx.seed, 0, 0)
    greedy = greedy_rollout(policy, tok, step_prompts, max_new_tokens) if estimator == "remax" else None
    mb_rows = micro_batch_rows(ro, MICRO_BATCH_SIZE, by_length=True)  # whole groups, one packed row per prompt
    b_ref_logps = b_kl = None
    if ref_model is not None:
        b_ref_logps = rollout_forward(lambda b: response_logps(ref_model, b, T), ro, mb_rows)
        if kl_in == "reward":  # k1_t = log π_old(y_t) - log π_ref(y_t), the KL in the reward
            b_old = rollout_forward(lambda b: response_logps(policy, b, T), ro, mb_rows)
            b_kl = (b_old - b_ref_logps).masked_fill(~ro.response_mask, 0.0)
    rewards = source_rewards(sources, ro)
    g = gather_columns({**{f"rewards/{k}": v for k, v in rewards.items()}, "length": ro.lengths,
                        "finished": ro.finished}, rt)
    g["reward"] = sum(s.weight * g[f"rewards/{s.name}"] for s in sources)  # r = Σ_k w_k r_k
    if greedy is not None:
        g["greedy_reward"] = greedy_rewards(greedy, sources, None, rt, MICRO_BATCH_SIZE)
    loss_mask = completion_mask(ro.response_mask, ro.finished, mask_truncated)
    b_advantages = step_advantages(g, b_kl, loss_mask, rt, estimator, G, "group", beta)
    per_token_adv = b_advantages.dim() == 2
    first_adv = b_advantages[:, 0] if per_token_adv else b_advantages  # a per-token advantage at t = 0
    tr.keep("reward", g["reward"])
    tr.keep("advantages", b_advantages)
    tr.keep("loss_mask", loss_mask)

    tr.section("rewards and advantages" + (" (step_advantages)"))
    grouped = g["reward"].view(-1, G)
    for p in range(len(step_prompts)):
        r = grouped[p]
        tr.text_block(f"prompt {p}", step_prompts[p]["prompt_text"])
        extra = {"reward r_i": r}
        if estimator == "grpo":
            extra["r_i - mean"] = r - r.mean()
        elif estimator == "rloo":
            extra["baseline_i"] = (r.sum() - r) / (G - 1)
        extra["A_i" if not per_token_adv else "A_0"] = first_adv[p * G:(p + 1) * G]
        sub = SimpleNamespace(completions=ro.completions[p * G:(p + 1) * G], lengths=ro.lengths[p * G:(p + 1) * G],
                              finished=ro.finished[p * G:(p + 1) * G])
        show_responses(tr, sub, extra)
        if estimator == "grpo":
            tr.line(f"  mean(r) = {num(r.mean())}, std(r) = {num(r.std())} (unbiased)"
                    + ("; all rewards equal: no signal, A = 0" if bool((r == r[0]).all()) else ""))
            tr.keep(f"group_mean_{p}", r.mean())
            tr.keep(f"group_std_{p}", r.std())
        elif estimator == "remax":
            tr.text_block("greedy", greedy.completions[p])
            tr.line(f"  r(greedy) = {num(g['greedy_reward'][p])}: the baseline of this prompt's {G} samples")
    if estimator == "remax":
        tr.keep("greedy_reward", g["greedy_reward"])
    if not mask_truncated:
        tr.note("remax: truncated responses are trained on (--no-mask_truncated_completions, as train_grpo.py "
                "advises): its advantages are mostly <= 0, and a masked response would escape them.")
    else:
        tr.note("A response that hit max_new_tokens without <|im_end|> gets no loss (--mask_truncated_completions, "
                "the script's default): its loss_mask row is all False.")

    batches = [packed_batch(ro, rws, loss_mask=loss_mask, advantages=b_advantages, sampler_logps=ro.logps,
                            **({"ref_logps": b_ref_logps} if b_ref_logps is not None and b_kl is None else {}))
               for rws in mb_rows]
    counted = loss_mask.any(-1)
    signal = ((b_advantages != 0).view(len(loss_mask), -1) & loss_mask).any(-1)
    if not bool(signal.any()) and beta_loss == 0:
        tr.section("nothing to learn")
        tr.note("Every counted response has advantage 0 (each group's rewards are equal), so the gradient is 0: "
                "train_grpo.py skips this update (update_skipped = 1). Try another --seed or more --batch.")
        return

    tr.section("the per-token loss (policy_gradient_loss; grpo_loss broadcasts A_i to every token)")
    with torch.no_grad():
        logps = rollout_forward(lambda b: response_logps(policy, b, T), ro, mb_rows)  # (R, N) log π
    A_tok = b_advantages if per_token_adv else b_advantages[:, None].expand_as(logps)
    ref_all = b_ref_logps if beta_loss else None

    def pg(mask, loss_t=loss_type, normalizer=None):  # the library loss on the rollout's tokens under `mask`
        return policy_gradient_loss(logps, logps, ref_all, A_tok, mask, eps_low, eps_high, beta_loss, loss_t,
                                    max_new_tokens, normalizer)

    moving = (signal & counted).nonzero().flatten().tolist() or counted.nonzero().flatten().tolist() or [0]
    show = moving[0]  # the first response that moves (else the first that counts)
    ids = ro.response_ids[show][ro.response_mask[show]].tolist()
    n = len(ids) if not rows else min(rows, len(ids))
    ell = per_token(lambda one: pg(one, "dapo", SUM)[0], loss_mask, show)
    tr.line(f"  response {show}: ratio = π / π_old = 1 on the first update (π_old is this forward, detached)")
    tr.table(["t", "id", "token", "log π", "ratio", "A_t", "ℓ_t", "counts"],
             [[str(t), str(ids[t]), piece(tok, ids[t]), float(logps[show, t]), 1.0, float(A_tok[show, t]),
               float(ell[t]), "yes" if loss_mask[show, t] else "no"] for t in range(n)])
    tr.keep("logps", logps)
    tr.keep("per_token_loss", ell)
    tr.keep("shown_response", show)
    seq = torch.stack([per_token(lambda one: pg(one, "dapo", SUM)[0], loss_mask, i).sum() for i in range(len(ro.rows))])
    lengths = loss_mask.sum(-1)
    tr.table(["i", "counted tokens", "A_0", "Σ_t ℓ_t", "(1/|o_i|) Σ_t ℓ_t"],
             [[str(i), str(int(lengths[i])), float(A_tok[i, 0]), float(seq[i]),
               float(seq[i] / max(int(lengths[i]), 1))] for i in range(len(ro.rows))])
    tr.keep("sequence_sums", seq)
    loss, metrics = (grpo_loss(logps, logps, ref_all, b_advantages, loss_mask, eps_low, eps_high, beta_loss, loss_type,
                               max_new_tokens) if not per_token_adv else pg(loss_mask))
    how = {"grpo": "mean over each sequence's tokens, then over the counted sequences",
           "dapo": "Σ over every counted token / their count",
           "dr_grpo": f"Σ over every counted token / (counted sequences × {max_new_tokens})"}[loss_type]
    tr.scalar("loss", loss, how)
    tr.keep("loss", loss)

    def grpo_loss_sum(m, b):  # train_grpo.grpo_loss_sum: a SUM over the counted units (train_step divides)
        lp = response_logps(m, b, T)
        fn = grpo_loss if b["advantages"].dim() == 1 else policy_gradient_loss
        return fn(lp, lp.detach(), b.get("ref_logps"), b["advantages"], b["loss_mask"], eps_low, eps_high, beta_loss,
                  loss_type, max_new_tokens, max_new_tokens if loss_type == "dr_grpo" else SUM)[0], {}

    tr.section(f"ONE update: AdamW at lr {lr} (loop.train_step, normalized by count_units)")
    out = one_update(policy, batches, grpo_loss_sum, lambda b: count_units(b, loss_type), lr, rt)
    tr.scalar("train_step loss", out["loss"], "the same loss: its value is about 0, its gradient is not")
    tr.scalar("grad_norm", out["grad_norm"], "before clipping at 1.0")

    tr.section("after the step: each response's mean log π, by the sign of its advantage")
    with torch.no_grad():
        after = rollout_forward(lambda b: response_logps(policy, b, T), ro, mb_rows)
    m = ro.response_mask
    before_mean = (logps * m).sum(-1) / m.sum(-1)
    after_mean = (after * m).sum(-1) / m.sum(-1)
    tr.table(["i", "A_0", "counts", "mean log π before", "after", "Δ"],
             [[str(i), float(A_tok[i, 0]), "yes" if counted[i] else "no", float(before_mean[i]), float(after_mean[i]),
               float(after_mean[i] - before_mean[i])] for i in range(len(ro.rows))])
    tr.keep("logps_after", after)
    up = int(((after_mean - before_mean > 0) == (A_tok[:, 0] > 0))[signal & counted].sum())
    tr.line(f"  {up} of {int((signal & counted).sum())} counted responses with A != 0 moved the way A points")


# ---------------------------------------------------------------------------------------- online DPO

def walk_online_dpo(ctx: Context, tr: Trace, loss_type: str = "sigmoid", beta: float = 0.0, lr: float = 0.0,
                    batch_size: int = 4, rows: int = 0, num_generations: int = 4, max_new_tokens: int = 32) -> None:
    beta = beta or DEFAULT_BETA[loss_type]
    lr = lr or SCRIPT_DEFAULTS["online_dpo"]["lr"]
    K, tok, rt = num_generations, ctx.tok, ctx.rt
    sources = parse_reward_funcs(["gold"], [], ("reward_model",))
    runtime.seed_everything(ctx.seed)
    tr.line(f"walkthrough online_dpo: ONE update of train_online_dpo.py --reward_funcs gold --loss_type {loss_type}")
    tr.line(f"  K {K}, beta {beta}, lr {lr}")
    tr.line(f"  model: {ctx.where}")
    tr.line("  sample K responses per prompt from the policy, judge them, (best, worst) = (y_c, y_r), DPO")

    policy = disable_dropout(checkpoint.load_model(ctx.ckpt))
    ref_model = sft_reference(policy, SimpleNamespace(lora_r=0, init_from=ctx.ckpt), rt)
    step_prompts = load_step_prompts(ctx, sources, batch_size, max_new_tokens)

    tr.section(f"K = {K} samples of each of step 0's {batch_size} prompts (sample_rollout, T = 1), judged")
    ro = sample_rollout(policy, tok, step_prompts, K, max_new_tokens, 1.0, ctx.seed, 0, 0)
    mb_rows = micro_batch_rows(ro, 2 * MICRO_BATCH_SIZE)
    ref_logps = rollout_forward(lambda b: response_logps(ref_model, b), ro, mb_rows).sum(-1)  # (R,) log π_ref(y)
    rewards = source_rewards(sources, ro)
    scores = sum(s.weight * rewards[s.name] for s in sources)  # (R,)
    best, worst, keep = best_and_worst(scores, K)
    for p in range(len(step_prompts)):
        tr.text_block(f"prompt {p}", step_prompts[p]["prompt_text"])
        sub = SimpleNamespace(completions=ro.completions[p * K:(p + 1) * K], lengths=ro.lengths[p * K:(p + 1) * K],
                              finished=ro.finished[p * K:(p + 1) * K])
        show_responses(tr, sub, {"score": scores[p * K:(p + 1) * K]})
        tr.line(f"  -> y_c = response {int(best[p])}, y_r = response {int(worst[p])}" if keep[p]
                else "  -> every score equal: no pair (counted as pairs/ties_skipped)")
    tr.keep("scores", scores)
    tr.keep("keep", keep)
    pairs = []
    for b in keep.nonzero().flatten().tolist():  # as train_online_dpo.sample_pairs
        c, r = b * K + int(best[b]), b * K + int(worst[b])
        pairs.append({"prompt": ro.rows[c]["prompt_ids"], "chosen": ro.response_ids[c][ro.response_mask[c]].tolist(),
                      "rejected": ro.response_ids[r][ro.response_mask[r]].tolist(),
                      "ref_chosen_logps": float(ref_logps[c]), "ref_rejected_logps": float(ref_logps[r])})
    if not pairs:
        tr.section("nothing to learn")
        tr.note("Every prompt's K scores tied, so there is no pair: train_online_dpo.py skips the update "
                "(update_skipped = 1). Try another --seed or more --batch.")
        return

    tr.section(f"DPO on the {len(pairs)} pairs against the SFT reference (pair_logps, dpo_loss)")
    batch = collate_pairs(pairs, tok.pad_id)  # train_online_dpo.collate_pair_batch: + the reference log-probs
    ref = torch.tensor([[p["ref_chosen_logps"], p["ref_rejected_logps"]] for p in pairs])
    if loss_type == "ipo":  # length-averaged, as train_online_dpo.py
        ref = ref / torch.tensor([[len(p["chosen"]), len(p["rejected"])] for p in pairs])
    batch["ref_chosen_logps"], batch["ref_rejected_logps"] = ref[:, 0], ref[:, 1]

    def used(pl):
        return (pl.chosen_logps_avg, pl.rejected_logps_avg) if loss_type == "ipo" else (pl.chosen_logps,
                                                                                        pl.rejected_logps)

    with torch.no_grad():
        pi_c, pi_r = used(pair_logps(policy, batch))
        losses, chosen_rewards, rejected_rewards = dpo_loss(pi_c, pi_r, batch["ref_chosen_logps"],
                                                            batch["ref_rejected_logps"], beta, loss_type)
    tr.table(["pair", "π_c", "ref_c", "π_r", "ref_r", "chosen_rewards", "rejected_rewards", "losses"],
             [[str(i), float(pi_c[i]), float(ref[i, 0]), float(pi_r[i]), float(ref[i, 1]), float(chosen_rewards[i]),
               float(rejected_rewards[i]), float(losses[i])] for i in range(len(pairs))])
    for name, v in (("policy_chosen_logps", pi_c), ("policy_rejected_logps", pi_r), ("ref_chosen_logps", ref[:, 0]),
                    ("ref_rejected_logps", ref[:, 1]), ("losses", losses)):
        tr.keep(name, v)
    tr.note("The samples come from the policy itself, which at step 0 is the reference: π = ref and the loss is "
            "log 2 for sigmoid. The reference log-probs come from the rollout's packed layout, the policy's from "
            "the pair's, so they agree to float rounding.")
    tr.scalar("loss", losses.mean(), "mean over the pairs")

    def online_dpo_loss(m, b):  # train_online_dpo.online_dpo_loss without its logging
        c, r = used(pair_logps(m, b))
        return dpo_loss(c, r, b["ref_chosen_logps"], b["ref_rejected_logps"], beta, loss_type)[0].sum(), {}

    tr.section(f"ONE update: AdamW at lr {lr} (loop.train_step)")
    out = one_update(policy, [batch], online_dpo_loss, pair_count, lr, rt)
    tr.scalar("train_step loss", out["loss"])
    tr.scalar("grad_norm", out["grad_norm"], "before clipping at 1.0")

    tr.section("after the step: how log π(y_c) and log π(y_r) moved")
    with torch.no_grad():
        a_c, a_r = used(pair_logps(policy, batch))
    tr.table(["pair", "π_c before", "after", "Δ π_c", "π_r before", "after", "Δ π_r"],
             [[str(i), float(pi_c[i]), float(a_c[i]), float(a_c[i] - pi_c[i]), float(pi_r[i]), float(a_r[i]),
               float(a_r[i] - pi_r[i])] for i in range(len(pairs))])
    tr.keep("policy_chosen_logps_after", a_c)
    tr.keep("policy_rejected_logps_after", a_r)
