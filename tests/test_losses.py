"""Tests for minialign.algorithms.losses, part 1: log-probs, reward model, DPO family, shared checks.

Part 2 (KL, GAE, whitening, PPO, GRPO, the normalizer) is tests/test_losses_rl.py.
Every hand-computed number has its arithmetic in a comment; σ is the logistic sigmoid.
"""

import math

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

import minialign.algorithms.losses as L


def t(*values, dtype=torch.float32):
    return torch.tensor(values, dtype=dtype)


def nlsig(x):
    """-log σ(x) in plain Python, to keep the hand arithmetic honest."""
    return math.log1p(math.exp(-x))


# ----------------------------------------------------------------------------------------------
# module surface


def test_public_api_is_exported():
    for name in L.__all__:
        assert hasattr(L, name), name
    assert L.IGNORE_INDEX == -100


B2, BT = torch.zeros(2), torch.zeros(2, 3)
MASK = torch.ones(2, 3, dtype=torch.bool)


@pytest.mark.parametrize("call, error, message", [
    # a shape or kind mismatch is refused at the boundary, naming the argument, instead of broadcasting silently
    (lambda: L.dpo_loss(B2, torch.zeros(3), B2, B2), ValueError, "policy_rejected_logps must have shape (2,), got (3,)"),
    (lambda: L.dpo_loss(B2, B2, B2, torch.zeros(2, 1)), ValueError, "ref_rejected_logps must have shape (2,)"),
    (lambda: L.bradley_terry_loss(B2, torch.zeros(1)), ValueError, "rejected_rewards must have shape (2,)"),
    (lambda: L.kto_loss(B2, B2, torch.ones(2), 0.0), TypeError, "is_desirable must be a torch.bool mask"),
    (lambda: L.sequence_logps(BT, MASK.float()), TypeError, "mask must be a torch.bool mask"),
    (lambda: L.gae(BT, BT, MASK[:, :2]), ValueError, "mask must have shape (2, 3), got (2, 2)"),
    (lambda: L.ppo_policy_loss(BT, BT, torch.zeros(3, 2), MASK), ValueError, "advantages must have shape (2, 3)"),
    (lambda: L.grpo_loss(BT, BT, None, torch.zeros(3), MASK), ValueError, "advantages must have shape (2,)"),
    (lambda: L.token_logps(torch.zeros(2, 3, 5), torch.zeros(2, 3)), TypeError, "must be an integer tensor"),
    (lambda: L.dpo_loss(B2, B2, B2, B2, loss_type="nope"), ValueError, "unknown loss_type 'nope'"),
])
def test_losses_refuse_mismatched_arguments_by_name(call, error, message):
    with pytest.raises(error) as info:
        call()
    assert message in str(info.value)


# ----------------------------------------------------------------------------------------------
# token_logps, sequence_logps, nll_loss


def test_token_logps_hand_computed():
    # logits = log([1, 3]) → softmax = [1/4, 3/4]
    logits = torch.log(t(1.0, 3.0)).expand(1, 3, 2).clone()
    labels = torch.tensor([[1, 0, L.IGNORE_INDEX]])
    # log(3/4) = -0.287682; log(1/4) = -1.386294; ignored label → 0
    assert_close(L.token_logps(logits, labels), t(math.log(0.75), math.log(0.25), 0.0).unsqueeze(0))


def test_token_logps_matches_cross_entropy_with_ignore_index():
    torch.manual_seed(0)
    B, T, V = 3, 7, 11
    logits = torch.randn(B, T, V) * 3
    labels = torch.randint(0, V, (B, T))
    labels[0, :2] = L.IGNORE_INDEX  # prompt
    labels[2, 4:] = L.IGNORE_INDEX  # padding
    expected = -F.cross_entropy(logits.reshape(-1, V), labels.reshape(-1), reduction="none").reshape(B, T)
    got = L.token_logps(logits, labels)
    assert_close(got, expected)
    assert (got[labels == L.IGNORE_INDEX] == 0).all()


def test_token_logps_bf16_logits_computed_in_float32():
    torch.manual_seed(1)
    logits = (torch.randn(2, 5, 50) * 4).to(torch.bfloat16)
    labels = torch.randint(0, 50, (2, 5))
    got = L.token_logps(logits, labels)
    assert got.dtype == torch.float32
    assert_close(got, L.token_logps(logits.float(), labels))


def test_token_logps_rejects_bad_labels():
    with pytest.raises(TypeError, match="labels must be an integer tensor"):
        L.token_logps(torch.zeros(1, 2, 3), torch.zeros(1, 2))
    with pytest.raises(ValueError, match=r"labels must have shape \(1, 2\), got \(1, 3\)"):
        L.token_logps(torch.zeros(1, 2, 3), torch.zeros(1, 3, dtype=torch.long))


def test_sequence_logps_sum_mean_and_fully_masked_row():
    token_logps = t(-1.0, -2.0, -3.0).expand(2, 3)
    mask = torch.tensor([[True, True, False], [False, False, False]])
    # row 0: sum = -1 + -2 = -3, mean = -3 / 2 = -1.5; row 1: nothing counts → 0 (not NaN)
    assert_close(L.sequence_logps(token_logps, mask), t(-3.0, 0.0))
    assert_close(L.sequence_logps(token_logps, mask, average=True), t(-1.5, 0.0))


def test_sequence_logps_ignores_nan_at_masked_positions():
    token_logps = t(-1.0, float("nan")).unsqueeze(0)
    mask = torch.tensor([[True, False]])
    assert_close(L.sequence_logps(token_logps, mask), t(-1.0))


def test_nll_loss_hand_computed_and_normalizer():
    token_logps = torch.tensor([[-1.0, -2.0, -3.0], [-4.0, -5.0, -6.0]])
    mask = torch.tensor([[True, True, False], [True, False, False]])
    # -(-1 - 2 - 4) / 3 counted tokens = 7/3
    assert_close(L.nll_loss(token_logps, mask), torch.tensor(7 / 3))
    # with a global normalizer of 7 tokens: 7 / 7 = 1
    assert_close(L.nll_loss(token_logps, mask, normalizer=7), torch.tensor(1.0))
    assert_close(L.nll_loss(token_logps, mask, normalizer=torch.tensor(7)), torch.tensor(1.0))
    # nothing counts → 0, not NaN
    assert_close(L.nll_loss(token_logps, torch.zeros_like(mask)), torch.tensor(0.0))


def test_nll_loss_gradcheck():
    torch.manual_seed(0)
    x = torch.randn(2, 4, dtype=torch.float64, requires_grad=True)
    mask = torch.tensor([[True, True, False, False], [True, True, True, True]])
    assert torch.autograd.gradcheck(lambda x: L.nll_loss(x, mask), (x,))


def test_token_logps_gradcheck():
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 5, dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([[0, 4, L.IGNORE_INDEX], [2, L.IGNORE_INDEX, 1]])
    assert torch.autograd.gradcheck(lambda x: L.token_logps(x, labels), (logits,))


# ----------------------------------------------------------------------------------------------
# Bradley-Terry reward-model loss


def test_bradley_terry_hand_computed():
    r_c, r_r = t(2.0, 0.0), t(1.0, 0.0)
    # pair 0: -log σ(2 - 1) = 0.313262; pair 1: -log σ(0) = log 2 = 0.693147; mean = 0.503204
    assert_close(L.bradley_terry_loss(r_c, r_r), torch.tensor((nlsig(1) + math.log(2)) / 2))
    assert_close(L.bradley_terry_loss(r_c, r_r), torch.tensor(0.503204))
    # margin 1: -log σ(1 - 1) = 0.693147, -log σ(0 - 1) = 1.313262; mean = 1.003204
    assert_close(L.bradley_terry_loss(r_c, r_r, margin=1.0), torch.tensor(1.003204))
    assert_close(L.bradley_terry_loss(r_c, r_r, margin=t(1.0, 1.0)), torch.tensor(1.003204))
    # centering: 0.01 · mean((2 + 1)², (0 + 0)²) = 0.01 · 4.5 = 0.045
    assert_close(L.bradley_terry_loss(r_c, r_r, center_coef=0.01), torch.tensor(0.503204 + 0.045))


def test_bradley_terry_gradcheck_and_direction():
    torch.manual_seed(0)
    r_c = torch.randn(4, dtype=torch.float64, requires_grad=True)
    r_r = torch.randn(4, dtype=torch.float64, requires_grad=True)
    margin = torch.rand(4, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda a, b: L.bradley_terry_loss(a, b, margin, 0.1), (r_c, r_r))
    L.bradley_terry_loss(r_c, r_r).backward()
    assert (r_c.grad < 0).all() and (r_r.grad > 0).all()


# ----------------------------------------------------------------------------------------------
# DPO


def dpo_inputs():
    # π_c = -1, π_r = -2, ref_c = ref_r = -1.5
    return t(-1.0), t(-2.0), t(-1.5), t(-1.5)


def test_dpo_sigmoid_hand_computed():
    losses, chosen_rewards, rejected_rewards = L.dpo_loss(*dpo_inputs(), beta=0.1)
    # logits = (-1 - -2) - (-1.5 - -1.5) = 1; loss = -log σ(0.1 · 1) = 0.644397
    assert_close(losses, t(0.644397))
    assert_close(losses, t(nlsig(0.1)))
    # rewards = 0.1 · (-1 - -1.5) = 0.05 and 0.1 · (-2 - -1.5) = -0.05
    assert_close(chosen_rewards, t(0.05))
    assert_close(rejected_rewards, t(-0.05))


def test_cdpo_label_smoothing_hand_computed():
    losses, _, _ = L.dpo_loss(*dpo_inputs(), beta=0.1, label_smoothing=0.1)
    # -log σ(-z) = -log σ(z) + z, so with a = -log σ(0.1) = 0.644397:
    # 0.9 · a + 0.1 · (a + 0.1) = a + 0.01 = 0.654397
    assert_close(losses, t(0.654397))


def test_robust_dpo_hand_computed():
    losses, _, _ = L.dpo_loss(*dpo_inputs(), beta=0.1, loss_type="robust", label_smoothing=0.1)
    # (0.9 · a - 0.1 · (a + 0.1)) / (1 - 0.2) = (0.8 a - 0.01) / 0.8 = a - 0.0125 = 0.631897
    assert_close(losses, t(0.631897))
    # ε = 0: plain DPO
    assert_close(L.dpo_loss(*dpo_inputs(), loss_type="robust")[0], L.dpo_loss(*dpo_inputs())[0])


def test_ipo_and_hinge_hand_computed():
    losses, _, _ = L.dpo_loss(*dpo_inputs(), beta=0.1, loss_type="ipo")
    # (x - 1/(2β))² = (1 - 5)² = 16
    assert_close(losses, t(16.0))
    losses, _, _ = L.dpo_loss(*dpo_inputs(), beta=0.1, loss_type="hinge")
    # max(0, 1 - 0.1 · 1) = 0.9
    assert_close(losses, t(0.9))
    # margin x = 20: max(0, 1 - 0.1 · 20) = 0
    assert_close(L.dpo_loss(t(0.0), t(-20.0), t(0.0), t(0.0), loss_type="hinge")[0], t(0.0))


@pytest.mark.parametrize("loss_type", L.DPO_LOSS_TYPES)
def test_dpo_policy_equals_reference_gives_zero_rewards(loss_type):
    torch.manual_seed(0)
    pi_c, pi_r = -torch.rand(5) * 20, -torch.rand(5) * 20
    losses, chosen_rewards, rejected_rewards = L.dpo_loss(pi_c, pi_r, pi_c, pi_r, beta=0.3, loss_type=loss_type)
    assert (chosen_rewards == 0).all() and (rejected_rewards == 0).all()
    if loss_type in ("sigmoid", "robust"):
        assert_close(losses, torch.full((5,), math.log(2)))  # -log σ(0) = log 2


def test_dpo_label_smoothing_zero_equals_plain_sigmoid():
    torch.manual_seed(0)
    inputs = [-torch.rand(6) * 10 for _ in range(4)]
    losses, _, _ = L.dpo_loss(*inputs, beta=0.2, label_smoothing=0.0)
    logits = (inputs[0] - inputs[2]) - (inputs[1] - inputs[3])
    assert_close(losses, -F.logsigmoid(0.2 * logits))


def test_ipo_is_minimal_at_margin_one_over_two_beta():
    beta = 0.25  # 1/(2β) = 2
    margins = t(1.0, 1.9, 2.0, 2.1, 3.0)
    losses, _, _ = L.dpo_loss(margins, torch.zeros(5), torch.zeros(5), torch.zeros(5), beta=beta, loss_type="ipo")
    assert losses[2] < 1e-12
    assert (losses[[0, 1, 3, 4]] > losses[2]).all()
    assert_close(losses, (margins - 2) ** 2)


@pytest.mark.parametrize("loss_type", L.DPO_LOSS_TYPES)
def test_dpo_gradient_raises_chosen_lowers_rejected(loss_type):
    torch.manual_seed(0)
    pi_c = (-torch.rand(4) * 5).requires_grad_()
    pi_r = (-torch.rand(4) * 5).requires_grad_()
    ref_c, ref_r = -torch.rand(4) * 5, -torch.rand(4) * 5
    # small β so the hinge and IPO are in their active region (βx < 1, x < 1/(2β))
    smoothing = 0.1 if loss_type == "robust" else 0.0
    losses, _, _ = L.dpo_loss(pi_c, pi_r, ref_c, ref_r, beta=0.01, loss_type=loss_type, label_smoothing=smoothing)
    losses.sum().backward()
    # gradient descent moves against the gradient: d/dπ_c < 0 raises π_c, d/dπ_r > 0 lowers π_r
    assert (pi_c.grad < 0).all() and (pi_r.grad > 0).all()


@pytest.mark.parametrize(
    "loss_type,smoothing", [("sigmoid", 0.0), ("sigmoid", 0.2), ("robust", 0.2), ("ipo", 0.0), ("hinge", 0.0)]
)
def test_dpo_gradcheck(loss_type, smoothing):
    torch.manual_seed(0)
    pi_c = (-torch.rand(4, dtype=torch.float64) * 5).requires_grad_()
    pi_r = (-torch.rand(4, dtype=torch.float64) * 5).requires_grad_()
    ref_c, ref_r = -torch.rand(4, dtype=torch.float64) * 5, -torch.rand(4, dtype=torch.float64) * 5
    fn = lambda a, b: L.dpo_loss(a, b, ref_c, ref_r, beta=0.1, loss_type=loss_type, label_smoothing=smoothing)[0]
    assert torch.autograd.gradcheck(fn, (pi_c, pi_r))


def test_dpo_reference_is_detached_and_rewards_detached():
    pi_c, pi_r, ref_c, ref_r = (x.clone().requires_grad_() for x in dpo_inputs())
    losses, chosen_rewards, rejected_rewards = L.dpo_loss(pi_c, pi_r, ref_c, ref_r)
    assert not chosen_rewards.requires_grad and not rejected_rewards.requires_grad
    losses.sum().backward()
    assert ref_c.grad is None and ref_r.grad is None


def test_dpo_bad_arguments():
    with pytest.raises(ValueError, match=r"unknown loss_type 'kto'; valid values: 'sigmoid', 'ipo', 'hinge', 'robust'"):
        L.dpo_loss(*dpo_inputs(), loss_type="kto")
    with pytest.raises(ValueError, match="label_smoothing is only defined"):
        L.dpo_loss(*dpo_inputs(), loss_type="ipo", label_smoothing=0.1)
    with pytest.raises(ValueError, match=r"label_smoothing must be in \[0, 0.5\)"):
        L.dpo_loss(*dpo_inputs(), loss_type="robust", label_smoothing=0.5)
    with pytest.raises(ValueError, match="beta must be > 0"):
        L.dpo_loss(*dpo_inputs(), beta=0.0)
    with pytest.raises(ValueError, match=r"ref_rejected_logps must have shape \(1,\), got \(2,\)"):
        L.dpo_loss(t(-1.0), t(-2.0), t(-1.0), t(-1.0, -2.0))
    with pytest.raises(TypeError, match="policy_chosen_logps must be a torch.Tensor"):
        L.dpo_loss(-1.0, t(-2.0), t(-1.0), t(-1.0))
    with pytest.raises(TypeError, match="must be a floating-point tensor"):
        L.dpo_loss(torch.tensor([1]), torch.tensor([1]), torch.tensor([1]), torch.tensor([1]))


# ----------------------------------------------------------------------------------------------
# SimPO, CPO, ORPO, KTO


def test_simpo_hand_computed():
    # β = 2, γ = 0.5 · 2 = 1: z = 2 · (-1 - -2) - 1 = 1; loss = -log σ(1) = 0.313262
    losses, chosen_rewards, rejected_rewards = L.simpo_loss(t(-1.0), t(-2.0), beta=2.0, gamma_beta_ratio=0.5)
    assert_close(losses, t(0.313262))
    # rewards = β · avg logp = 2 · -1 = -2 and 2 · -2 = -4
    assert_close(chosen_rewards, t(-2.0))
    assert_close(rejected_rewards, t(-4.0))
    # label smoothing 0.1: 0.9 · 0.313262 + 0.1 · (0.313262 + 1) = 0.413262
    assert_close(L.simpo_loss(t(-1.0), t(-2.0), label_smoothing=0.1)[0], t(0.413262))


def test_simpo_margin_gamma_shifts_the_optimum():
    # at β(π_c - π_r) = γ the loss is -log σ(0) = log 2
    losses, _, _ = L.simpo_loss(t(-1.0), t(-1.25), beta=2.0, gamma_beta_ratio=0.25)  # 2 · 0.25 - 0.5 = 0
    assert_close(losses, t(math.log(2)))


def test_cpo_hand_computed():
    # x = -1 - -2 = 1
    # sigmoid: -log σ(0.1) + 1 · 1.5 = 0.644397 + 1.5 = 2.144397
    losses, chosen_rewards, rejected_rewards = L.cpo_loss(t(-1.0), t(-2.0), t(1.5), beta=0.1, alpha=1.0)
    assert_close(losses, t(2.144397))
    assert_close(chosen_rewards, t(-0.1))  # 0.1 · -1
    assert_close(rejected_rewards, t(-0.2))  # 0.1 · -2
    # alpha = 0.5: 0.644397 + 0.75 = 1.394397
    assert_close(L.cpo_loss(t(-1.0), t(-2.0), t(1.5), alpha=0.5)[0], t(1.394397))
    # hinge: max(0, 1 - 0.1) + 1.5 = 2.4; ipo: (1 - 5)² + 1.5 = 17.5
    assert_close(L.cpo_loss(t(-1.0), t(-2.0), t(1.5), loss_type="hinge")[0], t(2.4))
    assert_close(L.cpo_loss(t(-1.0), t(-2.0), t(1.5), loss_type="ipo")[0], t(17.5))


def test_cpo_bad_loss_type():
    with pytest.raises(ValueError, match=r"unknown loss_type 'robust'; valid values: 'sigmoid', 'ipo', 'hinge'"):
        L.cpo_loss(t(-1.0), t(-2.0), t(1.5), loss_type="robust")


def test_orpo_hand_computed():
    # π_c = log 0.5 → odds = 0.5/0.5 = 1, log odds = 0
    # π_r = log 0.2 → odds = 0.2/0.8 = 0.25, log odds = log 0.25
    # log OR = 0 - log 0.25 = log 4; σ(log 4) = 4/5; -log σ = -log 0.8 = 0.223144
    # loss = nll + β · 0.223144 = 0.693147 + 0.0223144 = 0.715461
    pi_c, pi_r = t(math.log(0.5)), t(math.log(0.2))
    losses, chosen_rewards, rejected_rewards = L.orpo_loss(pi_c, pi_r, -pi_c, beta=0.1)
    assert_close(losses, t(0.715461))
    assert_close(chosen_rewards, 0.1 * pi_c)  # β · logp = -0.0693147
    assert_close(rejected_rewards, 0.1 * pi_r)  # -0.160944


def test_orpo_certain_response_is_finite():
    # logp = 0 (p = 1 in float32) would give log odds = +inf; the clamp keeps everything finite
    pi_c, pi_r = t(0.0, 0.0, -1e-12), t(0.0, -1.0, 0.0)
    pi_c.requires_grad_()
    losses, _, _ = L.orpo_loss(pi_c, pi_r, -pi_c)
    losses.sum().backward()
    assert torch.isfinite(losses).all() and torch.isfinite(pi_c.grad).all()


def test_kto_hand_computed():
    # r = π - ref = [-1 - -2, -3 - -2] = [1, -1], z0 = 0.5, β = 0.1
    # desirable:   2 · (1 - σ(0.1 · (1 - 0.5)))  = 2 · (1 - σ(0.05)) = 2 · 0.487503 = 0.975005
    # undesirable: 3 · (1 - σ(0.1 · (0.5 - -1))) = 3 · (1 - σ(0.15)) = 3 · 0.462570 = 1.387710
    losses, rewards = L.kto_loss(t(-1.0, -3.0), t(-2.0, -2.0), torch.tensor([True, False]), 0.5,
                                 beta=0.1, desirable_weight=2.0, undesirable_weight=3.0)
    assert_close(losses, t(0.975005, 1.387710))
    assert_close(rewards, t(0.1, -0.1))  # β · r


def test_kto_reference_point_detached_and_clamped():
    pi = t(-1.0, -3.0).requires_grad_()
    z0 = torch.tensor(-2.0, requires_grad=True)
    desirable = torch.tensor([True, False])
    losses, rewards = L.kto_loss(pi, t(-2.0, -2.0), desirable, z0)
    # a negative KL estimate is clamped to 0
    assert_close(losses, L.kto_loss(pi, t(-2.0, -2.0), desirable, 0.0)[0])
    losses.sum().backward()
    assert z0.grad is None and not rewards.requires_grad
    # desirable: loss falls as π rises; undesirable: loss falls as π falls
    assert pi.grad[0] < 0 and pi.grad[1] > 0
    with pytest.raises(ValueError, match="kl_ref_point must be a number or a 0-dim tensor"):
        L.kto_loss(pi, t(-2.0, -2.0), desirable, torch.zeros(2))
    with pytest.raises(TypeError, match="is_desirable must be a torch.bool mask"):
        L.kto_loss(pi, t(-2.0, -2.0), torch.tensor([1, 0]), 0.0)


def test_reference_free_losses_gradcheck():
    torch.manual_seed(0)
    pi_c = (-torch.rand(4, dtype=torch.float64) * 2 - 0.1).requires_grad_()
    pi_r = (-torch.rand(4, dtype=torch.float64) * 2 - 0.1).requires_grad_()
    nll = torch.rand(4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: L.simpo_loss(a, b, label_smoothing=0.1)[0], (pi_c, pi_r))
    for loss_type in L.CPO_LOSS_TYPES:
        assert torch.autograd.gradcheck(lambda a, b, n: L.cpo_loss(a, b, n, loss_type=loss_type)[0], (pi_c, pi_r, nll))
    assert torch.autograd.gradcheck(lambda a, b, n: L.orpo_loss(a, b, n)[0], (pi_c, pi_r, nll))
    ref = -torch.rand(4, dtype=torch.float64)
    desirable = torch.tensor([True, False, True, False])
    assert torch.autograd.gradcheck(lambda a: L.kto_loss(a, ref, desirable, 0.3)[0], (pi_c,))


@pytest.mark.parametrize("fn", ["simpo", "cpo", "orpo"])
def test_reference_free_gradient_raises_chosen_lowers_rejected(fn):
    pi_c = t(-1.0, -2.0).requires_grad_()
    pi_r = t(-1.5, -0.5).requires_grad_()
    if fn == "simpo":
        losses = L.simpo_loss(pi_c, pi_r)[0]
    elif fn == "cpo":
        losses = L.cpo_loss(pi_c, pi_r, -pi_c)[0]
    else:
        losses = L.orpo_loss(pi_c, pi_r, -pi_c)[0]
    losses.sum().backward()
    assert (pi_c.grad < 0).all() and (pi_r.grad > 0).all()


# ----------------------------------------------------------------------------------------------
# half precision: bf16 / fp16 inputs are computed in float32


PAIR_FNS = {  # (chosen, rejected, ref_chosen, ref_rejected) -> float tensor
    "dpo": lambda c, r, rc, rr: L.dpo_loss(c, r, rc, rr, loss_type="robust", label_smoothing=0.1)[0],
    "ipo": lambda c, r, rc, rr: L.dpo_loss(c, r, rc, rr, loss_type="ipo")[0],
    "dpo_rewards": lambda c, r, rc, rr: L.dpo_loss(c, r, rc, rr)[1],
    "simpo": lambda c, r, rc, rr: L.simpo_loss(c, r)[0],
    "cpo": lambda c, r, rc, rr: L.cpo_loss(c, r, -c)[0],
    "orpo": lambda c, r, rc, rr: L.orpo_loss(c, r, -c)[0],
    "kto": lambda c, r, rc, rr: L.kto_loss(c, rc, torch.tensor([True, False, True]), 0.1)[0],
    "bt": lambda c, r, rc, rr: L.bradley_terry_loss(c, r, margin=0.5, center_coef=0.01),
}


@pytest.mark.parametrize("half", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", sorted(PAIR_FNS))
def test_half_precision_inputs_give_float32(name, half):
    inputs = [t(-1.3, -0.2, -2.7), t(-1.1, -0.9, -0.4), t(-1.25, -0.3, -2.2), t(-1.0, -1.2, -0.7)]
    half_inputs = [x.to(half) for x in inputs]
    out = PAIR_FNS[name](*half_inputs)
    assert out.dtype == torch.float32
    # identical to float32 math on the rounded inputs: no half-precision arithmetic inside ...
    assert_close(out, PAIR_FNS[name](*(x.float() for x in half_inputs)))
    # ... and close to float32 math on the unrounded inputs (the only error is the input rounding)
    assert_close(out, PAIR_FNS[name](*inputs), atol=0.05, rtol=0.05)


def test_float64_inputs_stay_float64():
    c, r = t(-1.0, dtype=torch.float64), t(-2.0, dtype=torch.float64)
    assert L.dpo_loss(c, r, c, r)[0].dtype == torch.float64
    assert L.sequence_logps(t(-1.0, dtype=torch.float64).unsqueeze(0), torch.tensor([[True]])).dtype == torch.float64


# ----------------------------------------------------------------------------------------------
# Unlikelihood (Welleck et al. 2019; the DPO paper's fourth IMDb baseline)


def test_unlikelihood_hand_computed():
    # chosen y_w: π = 0.5, 0.25       -> likelihood  (log 0.5 + log 0.25) / 2 = (-0.693147 - 1.386294) / 2 = -1.039721
    # rejected y_l: π = 0.5, 0.9, pad -> log(1 - π): log 0.5 = -0.693147, log 0.1 = -2.302585; the pad (NaN) does
    #                                    not count: mean (-0.693147 - 2.302585) / 2 = -1.497866
    # α = 1:   loss = 1.039721 + 1.497866 = 2.537587;  α = 0.5: 1.039721 + 0.748933 = 1.788654
    # (log p(y_l) instead of log(1 - p): 1.039721 + 0.399 = 1.44; sums instead of means: 5.08; pad counted: NaN)
    lp_w = torch.tensor([[math.log(0.5), math.log(0.25), 0.0]])
    m_w = torch.tensor([[True, True, False]])
    lp_l = torch.tensor([[math.log(0.5), math.log(0.9), float("nan")]])
    m_l = torch.tensor([[True, True, False]])
    losses, chosen_rewards, rejected_rewards = L.unlikelihood_loss(lp_w, m_w, lp_l, m_l, alpha=1.0)
    assert_close(losses, t(2.537587))
    assert_close(L.unlikelihood_loss(lp_w, m_w, lp_l, m_l, alpha=0.5)[0], t(1.788654))
    assert_close(chosen_rewards, t(-1.039721))  # mean token log-prob of y_w
    assert_close(rejected_rewards, t((math.log(0.5) + math.log(0.9)) / 2))  # -0.399254


def test_unlikelihood_gradient_and_certain_token_are_finite():
    # d/dl [-log(1 - e^l)] = e^l / (1 - e^l) = π / (1 - π): at π = 0.9, 9 (per token, / |y_l| = 2 -> 4.5)
    lp_l = torch.tensor([[math.log(0.9), -60.0]], dtype=torch.float64, requires_grad=True)
    m = torch.tensor([[True, True]])
    lp_w = torch.tensor([[-1.0, -1.0]], dtype=torch.float64)
    loss = L.unlikelihood_loss(lp_w, m, lp_l, m)[0].sum()
    loss.backward()
    assert_close(lp_l.grad, torch.tensor([[4.5, math.exp(-60.0) / 2]], dtype=torch.float64))
    # π = 1 (log π = 0) and π a hair below 1: clamped at 1 - π = 1e-5, so -log(1e-5) = 11.512925 per token
    lp_l = torch.tensor([[0.0, -1e-12]], requires_grad=True)
    losses = L.unlikelihood_loss(torch.zeros(1, 2), m, lp_l, m)[0]
    assert_close(losses, t(-math.log(1e-5)), rtol=1e-4, atol=1e-4)
    losses.sum().backward()
    assert torch.isfinite(lp_l.grad).all()
    assert torch.autograd.gradcheck(
        lambda a, b: L.unlikelihood_loss(a, m, b, m, 0.7)[0],
        (torch.tensor([[-0.3, -2.0]], dtype=torch.float64, requires_grad=True),
         torch.tensor([[-0.2, -3.0]], dtype=torch.float64, requires_grad=True)))


def test_unlikelihood_checks_shapes():
    with pytest.raises(ValueError, match="rejected_mask must have shape"):
        L.unlikelihood_loss(torch.zeros(2, 3), torch.ones(2, 3, dtype=torch.bool), torch.zeros(2, 4),
                            torch.ones(2, 3, dtype=torch.bool))
