"""The REINFORCE family's advantage estimators (minialign.algorithms.losses): RLOO, ReMax, REINFORCE++ and the KL in the
reward (kl_reward, returns_to_go), beside GRPO's group_advantages; the KL estimators of the loss term and what
their gradients descend; the script-side dispatch (minialign.algorithms.advantages.step_advantages).

Every hand-computed number has its arithmetic in a comment.
"""

import math

import pytest
import torch
from torch.testing import assert_close

import minialign.algorithms.losses as L
from minialign.algorithms.advantages import step_advantages
from minialign.training import runtime

F64 = torch.float64
RT = runtime.Runtime(torch.device("cpu"), torch.float32)


def t(*values, dtype=torch.float32):
    return torch.tensor(values, dtype=dtype)


# ----------------------------------------------------------------------------------------------
# RLOO


def test_rloo_hand_computed():
    rewards = t(1.0, 2.0, 6.0, 0.0, 1.0, 0.0)
    # group 0 (G = 3): baselines (2 + 6)/2 = 4, (1 + 6)/2 = 3.5, (1 + 2)/2 = 1.5 -> A = -3, -1.5, 4.5
    #   (= G/(G-1) · (r - mean) = 1.5 · (-2, -1, 3))
    # group 1: baselines (1 + 0)/2 = 0.5, (0 + 0)/2 = 0, 0.5 -> A = -0.5, 1, -0.5
    assert_close(L.rloo_advantages(rewards, 3), t(-3.0, -1.5, 4.5, -0.5, 1.0, -0.5))
    # G = 2: the baseline is simply the other sample: A = ±(r_0 - r_1)
    assert_close(L.rloo_advantages(t(3.0, 1.0), 2), t(2.0, -2.0))


def test_rloo_baseline_excludes_the_sample_itself():
    """Raising r_0 by Δ raises A_0 by exactly Δ (its baseline does not move) and lowers every other A_j by
    Δ/(G-1); with GRPO's mean baseline (scale "none") A_0 would rise by only Δ·(1 - 1/G)."""
    rewards = t(1.0, 2.0, 6.0, 3.0, dtype=F64)
    bumped = rewards.clone()
    bumped[0] += 1.0  # Δ = 1, G = 4
    diff = L.rloo_advantages(bumped, 4) - L.rloo_advantages(rewards, 4)
    assert_close(diff, t(1.0, -1 / 3, -1 / 3, -1 / 3, dtype=F64))
    grpo_diff = L.group_advantages(bumped, 4, scale="none") - L.group_advantages(rewards, 4, scale="none")
    assert_close(grpo_diff[0], torch.tensor(0.75, dtype=F64))  # 1 - 1/4: the mean contains r_0
    # the baseline of i is the mean of the others, computed naively
    for i in range(4):
        others = torch.cat([rewards[:i], rewards[i + 1:]])
        assert_close(L.rloo_advantages(rewards, 4)[i], rewards[i] - others.mean())


def test_equal_rewards_give_exactly_zero_advantage_rloo_and_grpo():
    # 0.1 and 1/3 are not representable: (Σ - r_i)/(G-1) can be one ulp off r_i; still exactly 0
    rewards = torch.tensor([0.1] * 3 + [1 / 3] * 3 + [7.7] * 3 + [0.0, 0.0, 1.0])
    for advantages in [L.rloo_advantages(rewards, 3)] + [L.group_advantages(rewards, 3, s) for s in L.GROUP_SCALES]:
        assert (advantages[:9] == 0).all() and (advantages[9:] != 0).all()


def test_rloo_errors():
    with pytest.raises(ValueError, match="group_size must be >= 2"):
        L.rloo_advantages(torch.zeros(4), 1)
    with pytest.raises(ValueError, match="not divisible by group_size = 3"):
        L.rloo_advantages(torch.zeros(4), 3)
    assert L.rloo_advantages(torch.tensor([1, 0]), 2).dtype == torch.float32  # integer rewards are cast


# ----------------------------------------------------------------------------------------------
# ReMax


def test_remax_baseline_is_the_greedy_reward():
    rewards = t(1.0, 0.0, 0.5, 0.0, 0.0, 1.0)
    greedy = t(0.5, 1.0)  # prompt 0's greedy response scored 0.5, prompt 1's scored 1
    # prompt 0: 1 - 0.5, 0 - 0.5, 0.5 - 0.5;  prompt 1: 0 - 1, 0 - 1, 1 - 1
    assert_close(L.remax_advantages(rewards, greedy, 3), t(0.5, -0.5, 0.0, -1.0, -1.0, 0.0))
    # a group where every sample ties with the greedy response has nothing to learn
    assert (L.remax_advantages(t(2.0, 2.0), t(2.0), 2) == 0).all()
    # unlike a group baseline, equal samples that beat the greedy response are all reinforced
    assert_close(L.remax_advantages(t(1.0, 1.0), t(0.0), 2), t(1.0, 1.0))
    with pytest.raises(ValueError, match="must be greedy_rewards.numel\\(\\) = 2 x group_size = 2"):
        L.remax_advantages(rewards, greedy, 2)


# ----------------------------------------------------------------------------------------------
# the KL in the reward, returns-to-go, REINFORCE++


def test_kl_reward_hand_computed():
    scores = t(2.0, -1.0)
    kl = torch.tensor([[0.1, 0.2, 0.3], [0.5, -0.4, float("nan")]])  # the masked position holds garbage
    mask = torch.tensor([[True, True, True], [True, True, False]])
    rewards = L.kl_reward(scores, kl, mask, beta=0.5)
    # row 0: -0.5·(0.1, 0.2, 0.3) and the score 2 on the last token: (-0.05, -0.1, -0.15 + 2 = 1.85)
    # row 1: -0.5·(0.5, -0.4), score -1 on its last counted token (column 1): (-0.25, 0.2 - 1 = -0.8), pad 0
    assert_close(rewards, torch.tensor([[-0.05, -0.1, 1.85], [-0.25, -0.8, 0.0]]))
    # Σ_t r_t = score - β Σ_t kl_t: 2 - 0.5 · 0.6 = 1.7;  -1 - 0.5 · 0.1 = -1.05
    assert_close(rewards.sum(-1), t(1.7, -1.05))
    # a row with no counted token gets nothing (no score at column -1)
    assert (L.kl_reward(t(5.0), torch.ones(1, 2), torch.zeros(1, 2, dtype=torch.bool), 0.5) == 0).all()


def test_kl_in_reward_sums_to_score_minus_beta_k1_sum():
    """The per-token rewards of a response sum to score - β Σ_t k1_t, and the return-to-go of the first token
    (REINFORCE's credit for the whole response) is that sum."""
    torch.manual_seed(0)
    logps, ref_logps = -torch.rand(4, 6, dtype=F64) * 3, -torch.rand(4, 6, dtype=F64) * 3
    lengths = torch.tensor([6, 3, 1, 4])
    mask = torch.arange(6) < lengths[:, None]  # right-padded responses
    scores, beta = torch.randn(4, dtype=F64), 0.3
    k1 = L.kl_penalty(logps, ref_logps, "k1")  # log π - log π_ref
    rewards = L.kl_reward(scores, k1, mask, beta)
    expected = scores - beta * (k1 * mask).sum(-1)  # score - β Σ_t k1_t
    assert_close(rewards.sum(-1), expected)
    assert_close(L.returns_to_go(rewards, mask)[:, 0], expected)


def test_returns_to_go_hand_computed():
    rewards = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 9.0]])
    mask = torch.tensor([[True, True, True], [True, True, False]])
    # γ = 1: (1 + 2 + 3, 2 + 3, 3) = (6, 5, 3);  row 1: (4 + 5, 5), the masked 9 is not a reward
    assert_close(L.returns_to_go(rewards, mask), torch.tensor([[6.0, 5.0, 3.0], [9.0, 5.0, 0.0]]))
    # γ = 0.5: G_2 = 3, G_1 = 2 + 0.5 · 3 = 3.5, G_0 = 1 + 0.5 · 3.5 = 2.75
    assert_close(L.returns_to_go(rewards[:1], mask[:1], gamma=0.5), torch.tensor([[2.75, 3.5, 3.0]]))


def test_reinforce_pp_hand_computed():
    # β = 0: every token's return is its response's score. Rows (1, 1) and (0, pad): counted values 1, 1, 0;
    # mean 2/3; unbiased var = ((1/3)² · 2 + (2/3)²) / 2 = 1/3, std = 0.577350;
    # A = (1/3) / 0.577350 = 0.577350 (twice) and (-2/3) / 0.577350 = -1.154701
    mask = torch.tensor([[True, True], [True, False]])
    A = L.reinforce_pp_advantages(t(1.0, 0.0), torch.zeros(2, 2), mask, beta=0.0)
    assert_close(A, torch.tensor([[0.577350, 0.577350], [-1.154701, 0.0]]), atol=1e-5, rtol=0)
    # with the KL: score 1, k1 = (0.2, 0.4), β = 1: returns (1 - 0.6, 1 - 0.4) = (0.4, 0.6);
    # mean 0.5, unbiased var = (0.1² + 0.1²) / 1 = 0.02, std = 0.141421: A = ±0.1 / 0.141421 = ∓0.707107
    A = L.reinforce_pp_advantages(t(1.0), torch.tensor([[0.2, 0.4]]), torch.ones(1, 2, dtype=torch.bool), beta=1.0)
    assert_close(A, torch.tensor([[-0.707107, 0.707107]]), atol=1e-5, rtol=0)


def test_reinforce_pp_normalizes_over_the_batch_not_the_group():
    """No group baseline: a group of equal rewards still gets an advantage from the batch statistics
    (where RLOO and GRPO give it 0); the batch's counted advantages have mean 0 and std 1."""
    rewards = t(1.0, 1.0, 0.0, 1.0)  # group 0 all 1 (G = 2); group 1 mixed
    mask = torch.ones(4, 3, dtype=torch.bool)
    A = L.reinforce_pp_advantages(rewards, torch.zeros(4, 3), mask, beta=0.0)
    assert (A[:2] > 0).all()  # group 0 is above the batch mean 0.75
    assert (L.rloo_advantages(rewards, 2)[:2] == 0).all() and (L.group_advantages(rewards, 2)[:2] == 0).all()
    assert abs(float(A.mean())) < 1e-6 and abs(float(A.flatten().std()) - 1) < 1e-4


# ----------------------------------------------------------------------------------------------
# the loss's KL term: estimators, and what their gradients descend


def test_policy_gradient_loss_kl_estimators_hand_computed():
    logps = torch.log(torch.tensor([[1.5, 1.0], [0.5, 2.0]]))
    old_logps, mask = torch.zeros(2, 2), torch.tensor([[True, True], [True, False]])
    advantages = t(1.0, -1.0)
    ref_logps = logps + math.log(2)  # log π - log π_ref = -log 2 at every token
    # the policy term is -0.15 (tests/test_losses_rl.py::test_grpo_loss_hand_computed_all_loss_types); β = 0.04:
    #   k1 = -log 2 = -0.693147:        -0.15 + 0.04 · -0.693147 = -0.177726
    #   k2 = ½ (log 2)² = 0.240227:     -0.15 + 0.04 · 0.240227 = -0.140391
    #   k3 = 2 - log 2 - 1 = 0.306853:  -0.15 + 0.04 · 0.306853 = -0.137726
    for kind, loss in (("k1", -0.177726), ("k2", -0.140391), ("k3", -0.137726)):
        got, metrics = L.grpo_loss(logps, old_logps, ref_logps, advantages, mask, beta=0.04, kl_estimator=kind)
        assert_close(got, torch.tensor(loss)), kind
        # the same loss from policy_gradient_loss with the advantage at every token
        same, _ = L.policy_gradient_loss(logps, old_logps, ref_logps, advantages[:, None].expand(2, 2), mask,
                                         beta=0.04, kl_estimator=kind)
        assert same.item() == got.item()
    with pytest.raises(ValueError, match="unknown kl_estimator 'abs'"):
        L.grpo_loss(logps, old_logps, ref_logps, advantages, mask, kl_estimator="abs")
    with pytest.raises(ValueError, match=r"advantages must have shape \(2, 2\), got \(2,\)"):
        L.policy_gradient_loss(logps, old_logps, None, advantages, mask, beta=0.0)


def test_policy_gradient_loss_per_token_advantages():
    """A per-token advantage weights each token's ratio: with ratio 1 (old = logps) and the "dapo" token mean,
    the loss is -mean(A) and its gradient w.r.t. logp_t is -A_t / n."""
    logps = torch.tensor([[-1.0, -2.0, -0.5]], requires_grad=True)
    A = torch.tensor([[0.5, -1.0, 2.0]])
    mask = torch.tensor([[True, True, False]])
    loss, _ = L.policy_gradient_loss(logps, logps.detach(), None, A, mask, beta=0.0, loss_type="dapo")
    loss.backward()
    assert_close(loss, torch.tensor(0.25))  # -(0.5 - 1.0) / 2 counted tokens
    assert_close(logps.grad, torch.tensor([[-0.25, 0.5, 0.0]]))  # -A_t / 2, the masked token gets nothing


def test_kl_gradients_descend_the_documented_divergences():
    """Exact expectations over a 5-token categorical π_θ = softmax(θ) (no sampling noise), as [KLG] states:
    E_π[∇k1] = 0;  E_π[∇k2] = ∇KL(π ‖ ref);  E_π[∇k3] = ∇KL(ref ‖ π) (the forward KL);
    and k1 in the REWARD (REINFORCE: E_π[k1 · ∇log π] with k1 a constant) = ∇KL(π ‖ ref)."""
    theta0 = torch.tensor([0.3, -1.0, 0.8, 0.0, -0.4], dtype=F64)
    ref = torch.log_softmax(torch.tensor([0.0, 0.5, -0.5, 1.0, 0.2], dtype=F64), -1)

    def grad(f):
        theta = theta0.clone().requires_grad_()
        (g,) = torch.autograd.grad(f(torch.log_softmax(theta, -1)), theta)
        return g

    p = torch.softmax(theta0, -1)  # the sampling distribution: a constant weight
    reverse = grad(lambda logp: (logp.exp() * (logp - ref)).sum())  # ∇ KL(π ‖ ref)
    forward = grad(lambda logp: (ref.exp() * (ref - logp)).sum())  # ∇ KL(ref ‖ π)
    expect = {k: grad(lambda logp: (p * L.kl_penalty(logp, ref, k)).sum()) for k in ("k1", "k2", "k3")}
    assert_close(expect["k1"], torch.zeros(5, dtype=F64), atol=1e-12, rtol=0)
    assert_close(expect["k2"], reverse)
    assert_close(expect["k3"], forward)
    assert (expect["k3"] - reverse).abs().max() > 1e-2  # the two divergences really differ here
    k1_in_reward = grad(lambda logp: (p * logp * L.kl_penalty(logp, ref, "k1").detach()).sum())
    assert_close(k1_in_reward, reverse)


# ----------------------------------------------------------------------------------------------
# the script's dispatch (one process; the 2-process equality is tests/test_grpo.py's torchrun test)


def test_step_advantages_dispatch():
    rewards = t(1.0, 0.0, 0.0, 2.0, dtype=F64)
    g = {"reward": rewards, "greedy_reward": t(0.5, 1.0, dtype=F64)}
    mask = torch.tensor([[True, True], [True, False], [True, True], [True, True]])
    assert_close(step_advantages(g, None, mask, RT, "grpo", 2), L.group_advantages(rewards, 2).float())
    assert_close(step_advantages(g, None, mask, RT, "rloo", 2), t(1.0, -1.0, -2.0, 2.0))
    assert_close(step_advantages(g, None, mask, RT, "remax", 2), t(0.5, -0.5, -1.0, 1.0))
    assert_close(g["advantage"], t(0.5, -0.5, -1.0, 1.0, dtype=F64))  # for the completions log
    assert_close(step_advantages(g, None, mask, RT, "reinforce_pp", 2),
                 L.reinforce_pp_advantages(rewards, torch.zeros(4, 2), mask, 0.0).float())
    # the KL in the reward, ReMax: its baselined score on the last token, -β k1_t on every token, returns-to-go
    kl = torch.tensor([[0.2, 0.4], [1.0, 0.0], [0.0, 0.0], [-0.2, 0.2]])
    A = step_advantages(g, kl, mask, RT, "remax", 2, beta=0.5)
    # row 0: A = 0.5, k1 (0.2, 0.4): returns (0.5 - 0.5 · 0.6, 0.5 - 0.5 · 0.4) = (0.2, 0.3)
    # row 1: A = -0.5, one token k1 = 1: -0.5 - 0.5 = -1;  row 3: A = 1, k1 (-0.2, 0.2): (1 - 0, 1 - 0.1)
    assert_close(A, torch.tensor([[0.2, 0.3], [-1.0, 0.0], [-1.0, -1.0], [1.0, 0.9]]))
    assert_close(g["advantage"].float(), t(0.2, -1.0, -1.0, 1.0))  # the first token's: the whole return
    # RLOO: one advantage per response, the KL inside the baseline (R_i = r_i - β Σ_t k1_it, counted tokens only)
    # R = (1 - 0.5 · 0.6, 0 - 0.5 · 1, 0 - 0, 2 - 0.5 · 0) = (0.7, -0.5, 0, 2); A_i = R_i - R_other
    assert_close(step_advantages(g, kl, mask, RT, "rloo", 2, beta=0.5), t(1.2, -1.2, -2.0, 2.0))


def test_rloo_with_the_kl_in_the_reward_baselines_the_whole_sequence_reward():
    """Ahmadian et al. 2024 (RLOO): R_i = r_i - β KL_i, A_i = R_i - mean_{j≠i} R_j, so a group's advantages sum to 0.
    Equal scores, KL sums (1, 0, 2, 0.4) over the responses' tokens, β = 0.5: R = -0.5 · KL = (-0.5, 0, -1, -0.2);
    A_0 = -0.5 - (0 - 1 - 0.2)/3 = -0.1, A_1 = 0 - (-0.5 - 1 - 0.2)/3 = 0.567, A_2 = -1 - (-0.5 + 0 - 0.2)/3 = -0.767,
    A_3 = -0.2 - (-0.5 + 0 - 1)/3 = 0.3. (A baseline of the scores alone, the KL added per token as a return-to-go,
    gives first-token advantages (-0.5, 0, -1, -0.2), summing to -1.7.)"""
    g = {"reward": t(3.0, 3.0, 3.0, 3.0, dtype=F64)}
    kl = torch.tensor([[0.25, 0.75, 9.0], [0.0, 0.0, 0.0], [1.5, 0.5, 0.0], [0.4, 0.0, 0.0]])  # 9.0: not counted
    mask = torch.tensor([[True, True, False], [True, True, True], [True, True, True], [True, False, False]])
    A = step_advantages(g, kl, mask, RT, "rloo", 4, beta=0.5)
    assert A.shape == (4,)  # one advantage per response: the whole R_i is baselined
    assert_close(A, t(-0.1, 0.5 + 0.2 / 3, -1 + 0.7 / 3, 0.3))
    assert abs(float(A.sum())) < 1e-6
    assert_close(g["advantage"].float(), A)
