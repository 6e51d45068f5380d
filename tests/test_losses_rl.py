"""Tests for minialign.algorithms.losses, part 2: KL estimators, GAE, whitening, PPO, GRPO, the normalizer.

Every hand-computed number has its arithmetic in a comment.
"""

import math

import pytest
import torch
from torch.testing import assert_close

import minialign.algorithms.losses as L

F64 = torch.float64


def t(*values, dtype=torch.float32):
    return torch.tensor(values, dtype=dtype)


# ----------------------------------------------------------------------------------------------
# KL estimators


def test_kl_penalty_hand_computed():
    logps, ref_logps = t(-1.0, -2.0), t(-2.0, -1.0)  # log_ratio = logp - ref = [1, -1]
    assert_close(L.kl_penalty(logps, ref_logps, "k1"), t(1.0, -1.0))
    assert_close(L.kl_penalty(logps, ref_logps, "k2"), t(0.5, 0.5))  # ½ · (±1)²
    # k3 = exp(ref - logp) - (ref - logp) - 1: exp(-1) + 1 - 1 = 0.367879; exp(1) - 1 - 1 = 0.718282
    assert_close(L.kl_penalty(logps, ref_logps, "k3"), t(math.exp(-1), math.e - 2))
    assert_close(L.kl_penalty(logps, ref_logps, "abs"), t(1.0, 1.0))
    assert L.kl_penalty(logps, ref_logps).equal(L.kl_penalty(logps, ref_logps, "k1"))  # default kind


@pytest.mark.parametrize("kind", L.KL_KINDS)
def test_kl_penalty_zero_when_equal(kind):
    torch.manual_seed(0)
    logps = -torch.rand(3, 5) * 10
    assert (L.kl_penalty(logps, logps.clone(), kind) == 0).all()


def test_k3_nonnegative_everywhere():
    torch.manual_seed(0)
    # wide range, plus tiny differences where exp(d) - d - 1 would cancel catastrophically
    logps = torch.cat([torch.randn(10_000) * 10, torch.randn(10_000) * 1e-4, torch.randn(1000) * 1e-7])
    ref_logps = torch.cat([torch.randn(10_000) * 10, torch.zeros(11_000)])
    k3 = L.kl_penalty(logps, ref_logps, "k3")
    assert (k3 >= 0).all()
    assert (L.kl_penalty(logps, ref_logps, "k2") >= 0).all()


def test_k1_and_k3_are_unbiased_estimates_of_kl():
    # sample tokens from p, average the estimators, compare with the exact KL(p ‖ q)
    gen = torch.Generator().manual_seed(0)
    logp = torch.log_softmax(torch.tensor([1.0, 0.5, -0.5, 0.0]), -1)
    logq = torch.log_softmax(torch.tensor([0.2, 0.9, 0.1, -0.3]), -1)
    exact = (logp.exp() * (logp - logq)).sum()
    tokens = torch.multinomial(logp.exp(), 200_000, replacement=True, generator=gen)
    for kind in ("k1", "k3"):
        estimate = L.kl_penalty(logp[tokens], logq[tokens], kind).mean()
        assert_close(estimate, exact, atol=3e-3, rtol=0)


def test_kl_penalty_bad_kind_and_gradcheck():
    with pytest.raises(ValueError, match=r"unknown kind 'k4'; valid values: 'k1', 'k2', 'k3', 'abs'"):
        L.kl_penalty(t(0.0), t(0.0), "k4")
    with pytest.raises(ValueError, match=r"ref_logps must have shape \(2, 3\), got \(3, 2\)"):
        L.kl_penalty(torch.zeros(2, 3), torch.zeros(3, 2))
    torch.manual_seed(0)
    logps = torch.randn(2, 3, dtype=F64, requires_grad=True)
    ref_logps = torch.randn(2, 3, dtype=F64)
    for kind in L.KL_KINDS:
        assert torch.autograd.gradcheck(lambda x: L.kl_penalty(x, ref_logps, kind), (logps,))


# ----------------------------------------------------------------------------------------------
# GAE


def test_gae_hand_computed():
    rewards = torch.tensor([[0.0, 0.0, 1.0], [0.0, 1.0, 9.0]])
    values = torch.tensor([[0.5, 0.5, 0.5], [0.5, 0.5, 7.0]])
    mask = torch.tensor([[True, True, True], [True, True, False]])
    advantages, returns = L.gae(rewards, values, mask, gamma=1.0, lam=0.5)
    # row 0 (γ = 1, λ = 0.5):
    #   t=2: δ = 1 + 0 (end) - 0.5 = 0.5;      A = 0.5
    #   t=1: δ = 0 + 0.5 - 0.5 = 0;            A = 0 + 0.5 · 0.5 = 0.25
    #   t=0: δ = 0 + 0.5 - 0.5 = 0;            A = 0 + 0.5 · 0.25 = 0.125
    # row 1 (last position masked: its reward 9 and value 7 are ignored):
    #   t=2: masked → A = 0
    #   t=1: δ = 1 + 0 (next not counted) - 0.5 = 0.5;  A = 0.5
    #   t=0: δ = 0 + 0.5 - 0.5 = 0;            A = 0.5 · 0.5 = 0.25
    assert_close(advantages, torch.tensor([[0.125, 0.25, 0.5], [0.25, 0.5, 0.0]]))
    # returns = A + V on counted positions, 0 elsewhere
    assert_close(returns, torch.tensor([[0.625, 0.75, 1.0], [0.75, 1.0, 0.0]]))


def test_gae_discount_hand_computed():
    # one step, γ = 0.9: δ_0 = 0 + 0.9 · 2 - 1 = 0.8; δ_1 = 1 - 2 = -1
    # λ = 1: A_0 = 0.8 + 0.9 · (-1) = -0.1; A_1 = -1
    advantages, returns = L.gae(t(0.0, 1.0).unsqueeze(0), t(1.0, 2.0).unsqueeze(0), torch.ones(1, 2, dtype=torch.bool),
                                gamma=0.9, lam=1.0)
    assert_close(advantages, t(-0.1, -1.0).unsqueeze(0))
    # λ = 1 gives the Monte Carlo return: R_0 = 0 + 0.9 · 1 = 0.9, R_1 = 1
    assert_close(returns, t(0.9, 1.0).unsqueeze(0))


def gae_reference(rewards, values, mask, gamma, lam):
    """Plain Python: A_t = Σ_l (γλ)^l δ_{t+l} over the counted run that starts at t (GAE Eq. 16)."""
    B, T = len(rewards), len(rewards[0])
    advantages = [[0.0] * T for _ in range(B)]
    for b in range(B):
        for t in range(T):
            if not mask[b][t]:
                continue
            total, k = 0.0, t
            while k < T and mask[b][k]:
                next_value = values[b][k + 1] if k + 1 < T and mask[b][k + 1] else 0.0
                delta = rewards[b][k] + gamma * next_value - values[b][k]
                total += (gamma * lam) ** (k - t) * delta
                k += 1
            advantages[b][t] = total
    return advantages


@pytest.mark.parametrize("mask_kind", ["right_padded", "random"])
def test_gae_matches_python_loop(mask_kind):
    gen = torch.Generator().manual_seed(0)
    for gamma, lam in [(1.0, 0.95), (0.99, 0.9), (0.9, 0.0), (1.0, 1.0)]:
        B, T = 6, 9
        rewards = torch.randn(B, T, dtype=F64, generator=gen)
        values = torch.randn(B, T, dtype=F64, generator=gen)
        if mask_kind == "right_padded":
            lengths = torch.randint(0, T + 1, (B,), generator=gen)
            mask = torch.arange(T)[None, :] < lengths[:, None]
        else:
            mask = torch.rand(B, T, generator=gen) < 0.7
        advantages, returns = L.gae(rewards, values, mask, gamma=gamma, lam=lam)
        expected = torch.tensor(gae_reference(rewards.tolist(), values.tolist(), mask.tolist(), gamma, lam), dtype=F64)
        assert_close(advantages, expected)
        assert_close(returns, torch.where(mask, expected + values, torch.zeros_like(values)))


def test_gae_fully_masked_row_and_nan_padding():
    rewards = torch.tensor([[1.0, float("nan")], [float("nan"), float("nan")]])
    values = torch.tensor([[0.5, float("nan")], [float("nan"), float("nan")]])
    mask = torch.tensor([[True, False], [False, False]])
    advantages, returns = L.gae(rewards, values, mask)
    # row 0: δ = 1 + 0 - 0.5 = 0.5; row 1 contributes nothing
    assert_close(advantages, torch.tensor([[0.5, 0.0], [0.0, 0.0]]))
    assert_close(returns, torch.tensor([[1.0, 0.0], [0.0, 0.0]]))


def test_gae_gradcheck_and_errors():
    torch.manual_seed(0)
    rewards = torch.randn(2, 4, dtype=F64, requires_grad=True)
    values = torch.randn(2, 4, dtype=F64, requires_grad=True)
    mask = torch.tensor([[True, True, True, False], [True, False, True, True]])
    assert torch.autograd.gradcheck(lambda r, v: L.gae(r, v, mask, 0.9, 0.8), (rewards, values))
    with pytest.raises(TypeError, match="mask must be a torch.bool mask"):
        L.gae(torch.zeros(2, 3), torch.zeros(2, 3), torch.ones(2, 3))
    with pytest.raises(ValueError, match=r"values must have shape \(2, 3\), got \(2, 4\)"):
        L.gae(torch.zeros(2, 3), torch.zeros(2, 4), torch.ones(2, 3, dtype=torch.bool))


# ----------------------------------------------------------------------------------------------
# whiten


def test_whiten_hand_computed():
    x = torch.tensor([[1.0, 2.0], [3.0, 100.0]])
    mask = torch.tensor([[True, True], [True, False]])
    # counted: 1, 2, 3 → mean 2; unbiased var = ((1-2)² + 0 + (3-2)²) / (3 - 1) = 1; masked → 0
    assert_close(L.whiten(x, mask), torch.tensor([[-1.0, 0.0], [1.0, 0.0]]))
    # shift_mean=False keeps the mean: (x - 2) / 1 + 2
    assert_close(L.whiten(x, mask, shift_mean=False), torch.tensor([[1.0, 2.0], [3.0, 0.0]]))


def test_whiten_matches_unbiased_std_and_degenerate_masks():
    torch.manual_seed(0)
    x = torch.randn(4, 6) * 3 + 1
    mask = torch.rand(4, 6) < 0.6
    counted = x[mask]
    expected = (counted - counted.mean()) / torch.sqrt(counted.var(unbiased=True) + 1e-8)
    out = L.whiten(x, mask)
    assert_close(out[mask], expected)
    assert (out[~mask] == 0).all()
    # no counted position, or one: zeros, never NaN
    assert (L.whiten(x, torch.zeros_like(mask)) == 0).all()
    one = torch.zeros_like(mask)
    one[0, 0] = True
    assert (L.whiten(x, one) == 0).all()


def test_whiten_gradcheck():
    torch.manual_seed(0)
    x = torch.randn(2, 4, dtype=F64, requires_grad=True)
    mask = torch.tensor([[True, True, True, False], [True, False, True, True]])
    assert torch.autograd.gradcheck(lambda x: L.whiten(x, mask), (x,))


# ----------------------------------------------------------------------------------------------
# PPO policy and value losses


def ppo_inputs():
    # old_logps = 0, so ratio = exp(logps)
    ratios = torch.tensor([[1.5, 0.5, 1.1], [0.5, 3.0, 1.0]])
    advantages = torch.tensor([[1.0, -1.0, 1.0], [1.0, 1.0, 1.0]])
    mask = torch.tensor([[True, True, True], [True, False, False]])
    return torch.log(ratios), torch.zeros(2, 3), advantages, mask


def test_ppo_policy_loss_hand_computed_clips_both_sides():
    logps, old_logps, advantages, mask = ppo_inputs()
    logps.requires_grad_()
    loss, metrics = L.ppo_policy_loss(logps, old_logps, advantages, mask, cliprange=0.2)
    # token (0,0): ratio 1.5, A = +1: max(-1.5, -1.2) = -1.2   clipped above (clip active)
    # token (0,1): ratio 0.5, A = -1: max( 0.5,  0.8) =  0.8   clipped below (clip active)
    # token (0,2): ratio 1.1, A = +1: max(-1.1, -1.1) = -1.1   inside the range
    # token (1,0): ratio 0.5, A = +1: max(-0.5, -0.8) = -0.5   out of range, but the unclipped term wins
    # tokens (1,1), (1,2): masked
    # loss = (-1.2 + 0.8 - 1.1 - 0.5) / 4 = -0.5
    assert_close(loss, torch.tensor(-0.5))
    assert_close(metrics["clipfrac"], torch.tensor(0.5))  # 2 of 4 counted tokens
    assert_close(metrics["ratio_mean"], torch.tensor(0.9))  # (1.5 + 0.5 + 1.1 + 0.5) / 4
    # ½ (log² 1.5 + log² 0.5 + log² 1.1 + log² 0.5) / 4 = ½ (0.164402 + 0.480453 + 0.009084 + 0.480453) / 4
    assert_close(metrics["approx_kl"], torch.tensor(0.141799))
    assert all(not m.requires_grad and m.ndim == 0 for m in metrics.values())
    loss.backward()
    # clipped tokens get no gradient; d(-A·r)/d logp = -A·r / 4 for the others; masked tokens 0
    assert_close(logps.grad, torch.tensor([[0.0, 0.0, -1.1 / 4], [-0.5 / 4, 0.0, 0.0]]))


def test_ppo_policy_loss_normalizer_and_fully_masked():
    logps, old_logps, advantages, mask = ppo_inputs()
    # global normalizer 8: (-2.0) / 8 = -0.25
    loss, _ = L.ppo_policy_loss(logps, old_logps, advantages, mask, normalizer=8)
    assert_close(loss, torch.tensor(-0.25))
    # nothing counts: loss and metrics are 0, gradients finite
    logps = logps.clone().requires_grad_()
    loss, metrics = L.ppo_policy_loss(logps, old_logps, advantages, torch.zeros_like(mask))
    loss.backward()
    assert loss.item() == 0 and all(m.item() == 0 for m in metrics.values())
    assert torch.isfinite(logps.grad).all()


def test_ppo_fully_masked_row_contributes_nothing():
    logps, old_logps, advantages, mask = ppo_inputs()
    extra = lambda x, fill: torch.cat([x, torch.full((1, 3), fill, dtype=x.dtype)])
    base, base_metrics = L.ppo_policy_loss(logps, old_logps, advantages, mask)
    # garbage in the padded row: NaN log-probs, -inf old log-probs (ratio = inf)
    logps2 = extra(logps, float("nan")).requires_grad_()
    with_row, row_metrics = L.ppo_policy_loss(logps2, extra(old_logps, -float("inf")),
                                              extra(advantages, 5.0), extra(mask, False))
    assert_close(with_row, base)
    for key in base_metrics:
        assert_close(row_metrics[key], base_metrics[key])
    with_row.backward()
    # no 0 · inf = NaN leaking back through the padding
    assert torch.isfinite(logps2.grad).all() and (logps2.grad[2] == 0).all()


def test_ppo_value_loss_fully_masked_row_contributes_nothing():
    values, mask = torch.tensor([[1.5, float("nan")]], requires_grad=True), torch.tensor([[True, False]])
    loss, metrics = L.ppo_value_loss(values, torch.tensor([[1.0, float("inf")]]), torch.tensor([[2.0, 0.0]]), mask)
    # ½ · max((1.5 - 2)², (1.2 - 2)²) = ½ · 0.64 = 0.32
    assert_close(loss, torch.tensor(0.32))
    loss.backward()
    assert torch.isfinite(values.grad).all() and values.grad[0, 1] == 0


def test_ppo_policy_loss_gradcheck():
    torch.manual_seed(0)
    logps = (torch.randn(3, 4, dtype=F64) * 0.3).requires_grad_()
    old_logps, advantages = torch.zeros(3, 4, dtype=F64), torch.randn(3, 4, dtype=F64)
    mask = torch.rand(3, 4) < 0.7
    assert torch.autograd.gradcheck(lambda x: L.ppo_policy_loss(x, old_logps, advantages, mask)[0], (logps,))


def test_ppo_value_loss_hand_computed():
    values = torch.tensor([[1.5, 0.875, 1.5, 9.0]], requires_grad=True)
    old_values = torch.tensor([[1.0, 1.0, 1.0, 1.0]])
    returns = torch.tensor([[2.0, 1.0, 0.0, 0.0]])
    mask = torch.tensor([[True, True, True, False]])
    loss, metrics = L.ppo_value_loss(values, old_values, returns, mask, cliprange_value=0.2)
    # token 0: v = 1.5 → clipped 1.0 + 0.2 = 1.2; (1.5 - 2)² = 0.25, (1.2 - 2)² = 0.64 → 0.64 (clipped larger)
    # token 1: v = 0.875 within ±0.2 of 1; (0.875 - 1)² = 0.015625 both → 0.015625 (not clipped)
    # token 2: v = 1.5 → 1.2; (1.5 - 0)² = 2.25, (1.2 - 0)² = 1.44 → 2.25 (unclipped larger)
    # token 3: masked
    # loss = ½ (0.64 + 0.015625 + 2.25) / 3 = ½ · 2.905625 / 3 = 0.484271
    assert_close(loss, torch.tensor(0.5 * 2.905625 / 3))
    assert_close(metrics["clipfrac"], torch.tensor(1 / 3))
    loss.backward()
    # token 0 is clipped: no gradient; token 2: ½ · 2 (1.5 - 0) / 3 = 0.5; token 1: (0.875 - 1) / 3
    assert_close(values.grad, torch.tensor([[0.0, -0.125 / 3, 0.5, 0.0]]))
    # global normalizer 6: ½ · 2.905625 / 6
    assert_close(L.ppo_value_loss(values, old_values, returns, mask, normalizer=6)[0], torch.tensor(0.5 * 2.905625 / 6))


def test_ppo_value_loss_gradcheck():
    torch.manual_seed(0)
    values = torch.randn(3, 4, dtype=F64, requires_grad=True)
    old_values, returns = values.detach() + 0.3 * torch.randn(3, 4, dtype=F64), torch.randn(3, 4, dtype=F64)
    mask = torch.rand(3, 4) < 0.7
    assert torch.autograd.gradcheck(lambda v: L.ppo_value_loss(v, old_values, returns, mask)[0], (values,))


def test_ppo_shape_and_mask_errors():
    x = torch.zeros(2, 3)
    with pytest.raises(ValueError, match=r"old_logps must have shape \(2, 3\), got \(2, 4\)"):
        L.ppo_policy_loss(x, torch.zeros(2, 4), x, x.bool())
    with pytest.raises(TypeError, match="mask must be a torch.bool mask"):
        L.ppo_policy_loss(x, x, x, x.long())
    with pytest.raises(TypeError, match="mask must be a torch.bool mask"):
        L.ppo_value_loss(x, x, x, x)
    with pytest.raises(ValueError, match=r"returns must have shape \(2, 3\), got \(3,\)"):
        L.ppo_value_loss(x, x, torch.zeros(3), x.bool())
    with pytest.raises(ValueError, match="normalizer must be > 0"):
        L.ppo_policy_loss(x, x, x, x.bool(), normalizer=0)


# ----------------------------------------------------------------------------------------------
# group advantages


def test_group_advantages_hand_computed():
    rewards = t(1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 2.0)
    # group 0: mean 0.5 → centered ±0.5; unbiased std = sqrt(4 · 0.25 / 3) = 0.577350
    #          A = ±0.5 / (0.577350 + 1e-4) = ±0.865875;  group 1: all equal → 0
    assert_close(L.group_advantages(rewards, 4), t(0.865875, -0.865875, -0.865875, 0.865875, 0, 0, 0, 0))
    # "none" (Dr. GRPO): just centered
    assert_close(L.group_advantages(rewards, 4, scale="none"), t(0.5, -0.5, -0.5, 0.5, 0, 0, 0, 0))
    # "batch": batch mean 1.25; Σ(r - 1.25)² = 2 · 0.0625 + 2 · 1.5625 + 4 · 0.5625 = 5.5;
    #          std = sqrt(5.5 / 7) = 0.886405; A = ±0.5 / (0.886405 + 1e-4) = ±0.564012
    assert_close(L.group_advantages(rewards, 4, scale="batch"), t(0.564012, -0.564012, -0.564012, 0.564012, 0, 0, 0, 0))


def test_group_advantages_equal_rewards_exactly_zero():
    # 0.1 is not representable: a float mean of equal values can be one ulp off; still exactly 0
    rewards = torch.tensor([0.1] * 3 + [1 / 3] * 3 + [7.7] * 3 + [0.0, 0.0, 1.0])
    for scale in L.GROUP_SCALES:
        advantages = L.group_advantages(rewards, 3, scale=scale)
        assert torch.isfinite(advantages).all()
        assert (advantages[:9] == 0).all(), scale
    # a batch where every group is flat: all zeros, no NaN even for the batch std
    assert (L.group_advantages(torch.ones(6), 3, scale="batch") == 0).all()


def test_group_advantages_integer_rewards_and_errors():
    assert_close(L.group_advantages(torch.tensor([1, 0]), 2, scale="none"), t(0.5, -0.5))
    assert L.group_advantages(torch.tensor([True, False]), 2).dtype == torch.float32
    with pytest.raises(ValueError, match="rewards.numel\\(\\) = 5 is not divisible by group_size = 2"):
        L.group_advantages(torch.zeros(5), 2)
    with pytest.raises(ValueError, match="group_size must be >= 2"):
        L.group_advantages(torch.zeros(4), 1)
    with pytest.raises(ValueError, match=r"unknown scale 'std'; valid values: 'group', 'batch', 'none'"):
        L.group_advantages(torch.zeros(4), 2, scale="std")
    with pytest.raises(ValueError, match=r"rewards must have shape \(any,\), got \(2, 2\)"):
        L.group_advantages(torch.zeros(2, 2), 2)


# ----------------------------------------------------------------------------------------------
# GRPO


def grpo_inputs():
    # old_logps = 0, so ratio = exp(logps); row 0 has A = +1, row 1 has A = -1 and one masked token
    logps = torch.log(torch.tensor([[1.5, 1.0], [0.5, 2.0]]))
    return logps, torch.zeros(2, 2), t(1.0, -1.0), torch.tensor([[True, True], [True, False]])


def test_grpo_loss_hand_computed_all_loss_types():
    logps, old_logps, advantages, mask = grpo_inputs()
    # row 0: ratio 1.5 → -min(1.5, 1.2) = -1.2;  ratio 1.0 → -1.0;        sequence mean -1.1
    # row 1: ratio 0.5 → -min(-0.5, -0.8) = 0.8; second token masked;     sequence mean  0.8
    kw = dict(beta=0.0, epsilon_low=0.2, epsilon_high=0.2)
    loss, metrics = L.grpo_loss(logps, old_logps, None, advantages, mask, loss_type="grpo", **kw)
    assert_close(loss, torch.tensor(-0.15))  # (-1.1 + 0.8) / 2 sequences
    loss, _ = L.grpo_loss(logps, old_logps, None, advantages, mask, loss_type="dapo", **kw)
    assert_close(loss, torch.tensor(-1.4 / 3))  # (-1.2 - 1.0 + 0.8) / 3 tokens
    loss, _ = L.grpo_loss(logps, old_logps, None, advantages, mask, loss_type="dr_grpo", max_new_tokens=4, **kw)
    assert_close(loss, torch.tensor(-0.175))  # -1.4 / (2 sequences · 4)
    # low clip: row 1 token 0 (0.5 < 0.8, A < 0); high clip: row 0 token 0 (1.5 > 1.2, A > 0); of 3 tokens
    assert_close(metrics["clip_ratio/low_mean"], torch.tensor(1 / 3))
    assert_close(metrics["clip_ratio/high_mean"], torch.tensor(1 / 3))
    assert_close(metrics["clip_ratio/region_mean"], torch.tensor(2 / 3))
    assert "kl" not in metrics


def test_grpo_loss_kl_term_hand_computed():
    logps, old_logps, advantages, mask = grpo_inputs()
    ref_logps = logps + math.log(2)  # ref - logp = log 2 at every token
    loss, metrics = L.grpo_loss(logps, old_logps, ref_logps, advantages, mask, beta=0.04)
    # k3 = exp(log 2) - log 2 - 1 = 1 - 0.693147 = 0.306853 per token;
    # loss = -0.15 + 0.04 · 0.306853 = -0.137726
    assert_close(loss, torch.tensor(-0.137726))
    assert_close(metrics["kl"], torch.tensor(1 - math.log(2)))


def test_grpo_clip_higher():
    logps, old_logps, advantages, mask = grpo_inputs()
    loss, metrics = L.grpo_loss(logps, old_logps, None, advantages, mask, beta=0.0, epsilon_high=0.6)
    # row 0 token 0: ratio 1.5 < 1.6 is no longer clipped: -1.5; row 0 mean (-1.5 - 1.0) / 2 = -1.25
    # loss = (-1.25 + 0.8) / 2 = -0.225
    assert_close(loss, torch.tensor(-0.225))
    assert metrics["clip_ratio/high_mean"].item() == 0


def test_grpo_beta_zero_never_touches_reference():
    logps, old_logps, advantages, mask = grpo_inputs()
    loss_none, _ = L.grpo_loss(logps, old_logps, None, advantages, mask, beta=0.0)
    # a reference of the wrong shape is never read when beta = 0
    loss_bad, _ = L.grpo_loss(logps, old_logps, torch.zeros(7), advantages, mask, beta=0.0)
    assert_close(loss_none, loss_bad)
    with pytest.raises(ValueError, match="ref_logps is required when beta != 0"):
        L.grpo_loss(logps, old_logps, None, advantages, mask, beta=0.04)


@pytest.mark.parametrize("loss_type", L.GRPO_LOSS_TYPES)
def test_grpo_fully_masked_row_contributes_nothing(loss_type):
    logps, old_logps, advantages, mask = grpo_inputs()
    ref_logps = logps - 0.3
    kw = dict(beta=0.04, loss_type=loss_type, max_new_tokens=4)
    base, base_metrics = L.grpo_loss(logps, old_logps, ref_logps, advantages, mask, **kw)
    pad = lambda x, fill: torch.cat([x, torch.full((1, 2), fill)])
    logps2 = pad(logps, float("nan")).requires_grad_()
    with_row, metrics = L.grpo_loss(logps2, pad(old_logps, 0.0), pad(ref_logps, 0.0), torch.cat([advantages, t(3.0)]),
                                    pad(mask, False), **kw)
    assert_close(with_row, base)
    for key in base_metrics:
        assert_close(metrics[key], base_metrics[key])
    with_row.backward()
    assert (logps2.grad[2] == 0).all() and torch.isfinite(logps2.grad).all()
    # nothing counts at all: zero loss, no NaN
    empty, metrics = L.grpo_loss(logps, old_logps, ref_logps, advantages, torch.zeros_like(mask), **kw)
    assert empty.item() == 0 and all(m.item() == 0 for m in metrics.values())


def test_grpo_equal_reward_group_gives_no_policy_gradient():
    advantages = L.group_advantages(torch.tensor([1.0, 1.0, 1.0, 1.0]), 4)
    logps = (torch.randn(4, 3) * 0.1).requires_grad_()
    loss, _ = L.grpo_loss(logps, logps.detach(), None, advantages, torch.ones(4, 3, dtype=torch.bool), beta=0.0)
    loss.backward()
    assert loss.item() == 0 and (logps.grad == 0).all()


@pytest.mark.parametrize("loss_type", L.GRPO_LOSS_TYPES)
def test_grpo_gradcheck(loss_type):
    torch.manual_seed(0)
    logps = (torch.randn(3, 4, dtype=F64) * 0.3).requires_grad_()
    old_logps = torch.zeros(3, 4, dtype=F64)
    ref_logps = torch.randn(3, 4, dtype=F64) * 0.3
    advantages = torch.randn(3, dtype=F64)
    mask = torch.tensor([[True, True, False, False], [True, True, True, True], [True, False, True, False]])
    fn = lambda x: L.grpo_loss(x, old_logps, ref_logps, advantages, mask, beta=0.1, loss_type=loss_type,
                               max_new_tokens=4, epsilon_high=0.28)[0]
    assert torch.autograd.gradcheck(fn, (logps,))


def test_grpo_bad_arguments():
    logps, old_logps, advantages, mask = grpo_inputs()
    with pytest.raises(ValueError, match=r"unknown loss_type 'bnpo'; valid values: 'grpo', 'dapo', 'dr_grpo'"):
        L.grpo_loss(logps, old_logps, None, advantages, mask, beta=0.0, loss_type="bnpo")
    with pytest.raises(ValueError, match="'dr_grpo' needs max_new_tokens"):
        L.grpo_loss(logps, old_logps, None, advantages, mask, beta=0.0, loss_type="dr_grpo")
    with pytest.raises(ValueError, match=r"advantages must have shape \(2,\), got \(2, 2\)"):
        L.grpo_loss(logps, old_logps, None, torch.zeros(2, 2), mask, beta=0.0)
    with pytest.raises(TypeError, match="mask must be a torch.bool mask"):
        L.grpo_loss(logps, old_logps, None, advantages, mask.float(), beta=0.0)
    with pytest.raises(ValueError, match=r"ref_logps must have shape \(2, 2\), got \(2, 3\)"):
        L.grpo_loss(logps, old_logps, torch.zeros(2, 3), advantages, mask, beta=0.1)


# ----------------------------------------------------------------------------------------------
# normalizer: 4 uneven micro-batches with the global count == one big batch


LENGTHS = [3, 7, 1, 5, 2, 6, 4, 8]  # tokens per sequence
MICRO_BATCHES = [[0, 1], [2, 3], [4, 5], [6, 7]]  # padded to widths 7, 5, 6, 8


def pad_rows(rows, fill=3.0):
    """Stack 1-D tensors right-padded with garbage `fill` (masked out) → (B, T) tensor and bool mask."""
    width = max(len(r) for r in rows)
    out = torch.stack([torch.cat([r, torch.full((width - len(r),), fill, dtype=r.dtype)]) for r in rows])
    mask = torch.arange(width)[None, :] < torch.tensor([len(r) for r in rows])[:, None]
    return out, mask


def per_row_inputs(seed):
    gen = torch.Generator().manual_seed(seed)
    logps = [(torch.randn(n, dtype=F64, generator=gen) * 0.3).requires_grad_() for n in LENGTHS]
    old = [torch.randn(n, dtype=F64, generator=gen) * 0.3 for n in LENGTHS]
    ref = [torch.randn(n, dtype=F64, generator=gen) * 0.3 for n in LENGTHS]
    token_adv = [torch.randn(n, dtype=F64, generator=gen) for n in LENGTHS]
    seq_adv = torch.randn(len(LENGTHS), dtype=F64, generator=gen)
    return logps, old, ref, token_adv, seq_adv


def grads_full_vs_micro(loss_fn, normalizer, seed=0):
    """loss_fn(rows, normalizer) on the whole batch vs summed over micro-batches; returns both grads."""
    logps = per_row_inputs(seed)[0]
    full = loss_fn(list(range(len(LENGTHS))), logps, None)
    full_grads = torch.autograd.grad(full, logps)
    micro = sum(loss_fn(rows, logps, normalizer) for rows in MICRO_BATCHES)
    micro_grads = torch.autograd.grad(micro, logps)
    return full, micro, full_grads, micro_grads


def assert_same(full, micro, full_grads, micro_grads):
    assert_close(micro, full)
    for g_full, g_micro in zip(full_grads, micro_grads):
        assert_close(g_micro, g_full)


def test_normalizer_ppo_policy_loss_micro_batches():
    _, old, _, token_adv, _ = per_row_inputs(0)

    def loss_fn(rows, logps, normalizer):
        x, mask = pad_rows([logps[i] for i in rows])
        return L.ppo_policy_loss(x, pad_rows([old[i] for i in rows])[0], pad_rows([token_adv[i] for i in rows])[0],
                                 mask, normalizer=normalizer)[0]

    assert_same(*grads_full_vs_micro(loss_fn, normalizer=sum(LENGTHS)))
    # the naive mean of micro-batch means is a different (biased) gradient: the test can fail
    full, naive, _, _ = grads_full_vs_micro(lambda r, lp, n: loss_fn(r, lp, None) / 4, normalizer=None)
    assert not torch.allclose(full, naive)


@pytest.mark.parametrize("loss_type,normalizer", [("grpo", len(LENGTHS)), ("dapo", sum(LENGTHS)),
                                                  ("dr_grpo", len(LENGTHS) * 8)])
def test_normalizer_grpo_loss_micro_batches(loss_type, normalizer):
    _, old, ref, _, seq_adv = per_row_inputs(0)

    def loss_fn(rows, logps, normalizer):
        x, mask = pad_rows([logps[i] for i in rows])
        return L.grpo_loss(x, pad_rows([old[i] for i in rows])[0], pad_rows([ref[i] for i in rows])[0], seq_adv[rows],
                           mask, beta=0.04, loss_type=loss_type, max_new_tokens=8, normalizer=normalizer)[0]

    assert_same(*grads_full_vs_micro(loss_fn, normalizer=normalizer))


def test_normalizer_token_nll_micro_batches():
    def loss_fn(rows, logps, normalizer):
        x, mask = pad_rows([logps[i] for i in rows])
        return L.nll_loss(x, mask, normalizer=normalizer)

    assert_same(*grads_full_vs_micro(loss_fn, normalizer=sum(LENGTHS)))


def test_normalizer_as_tensor():
    logps, old_logps, advantages, mask = ppo_inputs()
    assert_close(L.ppo_policy_loss(logps, old_logps, advantages, mask, normalizer=torch.tensor(8.0))[0],
                 torch.tensor(-0.25))


# ----------------------------------------------------------------------------------------------
# half precision


RL_FNS = {  # (a, b, c) (2, 4) float tensors → float tensor
    "kl_k3": lambda a, b, c, m: L.kl_penalty(a, b, "k3"),
    "gae": lambda a, b, c, m: torch.stack(L.gae(a, b, m, 0.99, 0.95)),
    "whiten": lambda a, b, c, m: L.whiten(a, m),
    "ppo_policy": lambda a, b, c, m: torch.stack(
        [L.ppo_policy_loss(a, b, c, m)[0], *L.ppo_policy_loss(a, b, c, m)[1].values()]),
    "ppo_value": lambda a, b, c, m: L.ppo_value_loss(a, b, c, m)[0],
    "grpo": lambda a, b, c, m: torch.stack(
        [L.grpo_loss(a, b, c, a[:, 0], m)[0], *L.grpo_loss(a, b, c, a[:, 0], m)[1].values()]),
    "sequence_logps": lambda a, b, c, m: L.sequence_logps(a, m, average=True),
    "group_advantages": lambda a, b, c, m: L.group_advantages(a.reshape(-1), 4),
}


@pytest.mark.parametrize("half", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", sorted(RL_FNS))
def test_rl_half_precision_inputs_give_float32(name, half):
    gen = torch.Generator().manual_seed(0)
    inputs = [torch.randn(2, 4, generator=gen) * 0.3 - 0.5 for _ in range(3)]
    mask = torch.tensor([[True, True, True, False], [True, True, False, False]])
    half_inputs = [x.to(half) for x in inputs]
    out = RL_FNS[name](*half_inputs, mask)
    assert out.dtype == torch.float32
    assert_close(out, RL_FNS[name](*(x.float() for x in half_inputs), mask))
    assert_close(out, RL_FNS[name](*inputs, mask), atol=0.05, rtol=0.05)
