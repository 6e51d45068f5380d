"""Exact expected gradients of the RL scripts' losses, by enumeration of every outcome of tiny tabular policies.

What each script's docs call "the policy gradient of E[score] - β KL(π ‖ π_ref)" is checked here for every
configuration the script's parser accepts: the expectation over sampled responses (and, for the group
baselines, over every group of G responses) is a finite sum, computed exactly with autograd through the
script's own functions (the per-token KL estimate, the advantages, the loss and its normalization), and
compared with autograd's gradient of the exact objective. A configuration whose expected gradient is not
a positive multiple of the objective's must be refused at parse time (or documented where it is offered).

The policies:
  * PPO: one token from 5 (a one-step episode), logits θ (5,), reference logits fixed.
  * GRPO family: a 2-step policy with 4 parameters. Step 1 draws a ∈ {0, 1} from softmax(θ[0:2]); a = 0 ends
    the response (length 1), a = 1 draws b ∈ {0, 1} from softmax(θ[2:4]) (length 2). Three responses:
    (0), (1, 0), (1, 1); the lengths differ, which is what tells a constant normalizer from 1/|o_i|.
"""

import itertools
import sys
from pathlib import Path

import pytest
import torch

from minialign.algorithms.advantages import completion_mask, count_units, step_advantages
from minialign.algorithms.losses import gae, kl_penalty, ppo_policy_loss
from minialign.training import config, runtime

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import train_grpo  # noqa: E402
import train_ppo  # noqa: E402

RT = runtime.Runtime(torch.device("cpu"), torch.float32)
F64 = torch.float64
TOL = {"rtol": 1e-5, "atol": 1e-8}  # step_advantages returns float32; the biases tested are 10% and more


def parse_or_none(cls, argv):
    """The script's parsed Config, or None when its parser refuses the flags (argparse's SystemExit)."""
    try:
        return config.parse_config(cls, argv)
    except SystemExit:
        return None


def parallel_part(g: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The projection of g on target: g itself iff g is a multiple of target."""
    return target * (g @ target) / (target @ target)


# ---------------------------------------------------------------------------------------------- PPO


def test_ppo_reward_kl_estimators_give_the_reverse_kl_gradient():
    """train_ppo.py's per-token reward -kl_coef · kl_t, kl_t = kl_penalty(log π_old, log π_ref, --kl_estimator), is
    detached: its expected policy gradient is E_π[kl(y) ∇log π(y)]. For k1 that is ∇KL(π ‖ π_ref); for k3, whose
    VALUE is unbiased, it is ∇KL(π ‖ π_ref) - ∇KL(π_ref ‖ π). Every estimator the parser accepts must give
    kl_coef · ∇KL(π ‖ π_ref) exactly, through the script's token_rewards, GAE (V = 0, λ = 1: A = r) and the
    clipped policy loss at ratio 1."""
    torch.manual_seed(0)
    theta0, ref = torch.randn(5, dtype=F64), torch.log_softmax(torch.randn(5, dtype=F64), -1)
    kl_coef = 0.5
    theta = theta0.clone().requires_grad_()
    logp = torch.log_softmax(theta, -1)
    (exact,) = torch.autograd.grad(kl_coef * (logp.exp() * (logp - ref)).sum(), theta)  # β ∇KL(π ‖ π_ref)
    accepted = []
    for estimator in ("k1", "k3"):
        cfg = parse_or_none(train_ppo.Config, ["--kl_estimator", estimator, "--kl_coef", str(kl_coef)])
        if cfg is None:
            continue
        accepted.append(estimator)
        theta = theta0.clone().requires_grad_()
        logp = torch.log_softmax(theta, -1)
        p = logp.detach().exp()  # the sampling distribution: a constant weight
        expected = torch.zeros(5, dtype=F64)
        for y in range(5):  # E_y~π [∇ loss(y)]: every outcome, weighted by its probability
            lp, old, r = logp[y].view(1, 1), logp[y].detach().view(1, 1), ref[y].view(1, 1)
            mask = torch.ones(1, 1, dtype=torch.bool)
            kl = kl_penalty(old, r, cfg.kl_estimator)
            rewards, _ = train_ppo.token_rewards(torch.zeros(1, dtype=F64), kl, mask, cfg.kl_coef)
            advantages, _ = gae(rewards, torch.zeros_like(rewards), mask, cfg.gamma, 1.0)
            loss, _ = ppo_policy_loss(lp, old, advantages, mask, cfg.cliprange)
            (g,) = torch.autograd.grad(loss, theta, retain_graph=True)
            expected += p[y] * g
        torch.testing.assert_close(expected, exact, msg=lambda m: f"--kl_estimator {estimator}: E[∇loss] = "
                                   f"{expected.tolist()}, β∇KL(π ‖ π_ref) = {exact.tolist()}\n{m}")
    assert accepted == ["k1"]  # k1 is the default and is kept


def test_ppo_refuses_k3_in_the_reward_naming_the_flags(capsys):
    with pytest.raises(SystemExit):
        config.parse_config(train_ppo.Config, ["--kl_estimator", "k3"])
    err = capsys.readouterr().err
    assert "--kl_estimator='k3'" in err and "--kl_coef" in err and "KL(π_ref ‖ π)" in err


# ------------------------------------------------------------------------------------- the GRPO family

RESPONSES = [(0,), (1, 0), (1, 1)]  # the 2-step policy's three responses (module docstring)
L = 2  # the longest response: --max_new_tokens


def token_logps(theta: torch.Tensor, response: tuple) -> torch.Tensor:
    """(L,) log π of each token of `response` under the 2-step policy, 0 past its end."""
    steps = [torch.log_softmax(theta[0:2], -1), torch.log_softmax(theta[2:4], -1)]
    out = [steps[t][a] for t, a in enumerate(response)]
    return torch.stack(out + [theta.new_zeros(())] * (L - len(out)))


def objective_gradient(theta0, ref_theta, score, beta):
    """∇θ of the exact objective J = E_π[score] - β KL(π ‖ π_ref), KL over whole responses."""
    theta = theta0.clone().requires_grad_()
    logp = torch.stack([token_logps(theta, o).sum() for o in RESPONSES])  # log π(o)
    ref = torch.stack([token_logps(ref_theta, o).sum() for o in RESPONSES])
    J = (logp.exp() * torch.tensor([score[o] for o in RESPONSES], dtype=F64)).sum() \
        - beta * (logp.exp() * (logp - ref)).sum()
    (g,) = torch.autograd.grad(J, theta)
    return g


def expected_loss_gradient(cfg, theta0, ref_theta, score, finished, greedy_reward=0.0, group_size=2,
                           monkeypatch=None):
    """E over every group of `group_size` responses drawn from π of ∇θ of train_grpo's loss of that step, exactly:
    the rewards, the per-token k1 = log π_old - log π_ref (KL in the reward), completion_mask, step_advantages
    and grpo_loss_sum (its loss type and normalizer), divided by the step's count_units as loop.train_step does."""
    theta = theta0.clone().requires_grad_()
    monkeypatch.setattr(train_grpo, "response_logps", lambda model, batch, temperature: batch["theta_logps"])
    prob = {o: float(token_logps(theta0, o).sum().exp()) for o in RESPONSES}
    expected = torch.zeros_like(theta0)
    for group in itertools.product(RESPONSES, repeat=group_size):
        logps = torch.stack([token_logps(theta, o) for o in group])  # (G, L)
        response_mask = torch.tensor([[t < len(o) for t in range(L)] for o in group])
        k1 = (logps.detach() - torch.stack([token_logps(ref_theta, o) for o in group])).masked_fill(~response_mask, 0)
        g = {"reward": torch.tensor([score[o] for o in group], dtype=F64),
             "greedy_reward": torch.tensor([greedy_reward], dtype=F64)}
        loss_mask = completion_mask(response_mask, torch.tensor([finished[o] for o in group]),
                                    cfg.mask_truncated_completions)
        kl = k1 if cfg.kl_placement() == "reward" and cfg.beta > 0 else None
        advantages = step_advantages(g, kl, loss_mask, RT, cfg.advantage_estimator, group_size, cfg.scale_rewards,
                                     cfg.beta)
        batch = {"theta_logps": logps, "old_logps": logps.detach(), "advantages": advantages.to(F64),
                 "loss_mask": loss_mask, "response_mask": response_mask, "sampler_logps": logps.detach()}
        units = count_units(batch, cfg.loss_type)
        if units == 0:
            continue
        loss_sum = train_grpo.grpo_loss_sum(None, batch, cfg)[0]  # (loss_sum, metric sums, first-update maxima)
        (grad,) = torch.autograd.grad(loss_sum / units, theta)
        expected += torch.tensor([prob[o] for o in group], dtype=F64).prod() * grad
    return expected


THETA0, REF_THETA = torch.tensor([0.3, -0.4, 0.8, 0.1], dtype=F64), torch.tensor([-0.2, 0.5, 0.0, 0.6], dtype=F64)


@pytest.mark.parametrize("estimator", ["rloo", "remax", "grpo"])
def test_kl_in_the_reward_is_unbiased_for_the_reverse_kl(estimator, monkeypatch):
    """train_grpo.py says the KL in the reward gives the policy gradient of -β KL(π ‖ π_ref). With equal scores
    (every score advantage 0) the expected gradient of the loss at the parser's defaults must be a positive
    multiple of β ∇KL(π ‖ π_ref). Under --loss_type grpo each response's tokens are averaged by 1/|o_i| first,
    which weights a response's KL by its inverse length: not a multiple. A constant normalizer (dr_grpo) is."""
    beta, score, finished = 0.5, {o: 1.0 for o in RESPONSES}, {o: True for o in RESPONSES}
    argv = ["--advantage_estimator", estimator, "--beta", str(beta), "--max_new_tokens", str(L), "--kl_in", "reward",
            "--no-mask_truncated_completions"]
    cfg = config.parse_config(train_grpo.Config, argv)
    expected = expected_loss_gradient(cfg, THETA0, REF_THETA, score, finished, greedy_reward=1.0,
                                      monkeypatch=monkeypatch)
    target = -objective_gradient(THETA0, REF_THETA, score, beta)  # descending the loss ascends J: β ∇KL here
    torch.testing.assert_close(expected, parallel_part(expected, target), **TOL,
                               msg=lambda m: f"--loss_type {cfg.loss_type}: E[∇loss] = {expected.tolist()}, "
                                             f"β∇KL = {target.tolist()}\n{m}")
    assert expected @ target > 0
    torch.testing.assert_close(expected, target / L, **TOL)  # dr_grpo: exactly 1/(G·L) Σ_i Σ_t, i.e. ∇J / L per response


@pytest.mark.parametrize("estimator", ["rloo", "remax"])
def test_the_reinforce_family_is_unbiased_for_its_objective(estimator, monkeypatch):
    """With scores that differ and the KL in the reward, the expected gradient of the loss of rloo (Ahmadian et al.
    2024: A_i = R_i - mean_{j≠i} R_j, R = score - β Σ_t k1_t) and remax (its greedy baseline, a constant here) at
    the defaults is ∇(E[score] - β KL(π ‖ π_ref)) / L, over every group of G = 2 and G = 3 responses."""
    beta, score, finished = 0.3, {(0,): 0.0, (1, 0): 1.0, (1, 1): 0.25}, {o: True for o in RESPONSES}
    cfg = config.parse_config(train_grpo.Config, ["--advantage_estimator", estimator, "--beta", str(beta),
                                                  "--max_new_tokens", str(L), "--no-mask_truncated_completions"])
    target = -objective_gradient(THETA0, REF_THETA, score, beta) / L
    for G in (2, 3):
        expected = expected_loss_gradient(cfg, THETA0, REF_THETA, score, finished, greedy_reward=0.6, group_size=G,
                                          monkeypatch=monkeypatch)
        torch.testing.assert_close(expected, target, **TOL, msg=lambda m: f"G={G}, --loss_type {cfg.loss_type}: E[∇loss] = "
                                   f"{expected.tolist()}, ∇J / L = {target.tolist()}\n{m}")


def test_remax_at_its_default_mask_is_unbiased_or_refused(monkeypatch, capsys):
    """ReMax's advantages r_i - r(greedy) are not centred. With --mask_truncated_completions (the script's default)
    a truncated response gets no loss, so its negative advantage is never applied, and the expected gradient is
    not ∇E[score]: here the truncated (1, 1) scores 0 against the greedy 1, yet the step-2 logits get no gradient
    at all (nothing steers from (1, 1) to (1, 0)), and step 1 is pushed to continue. The parser must refuse remax
    with the mask on (naming both flags); with the mask off the expected gradient is exact."""
    score = {(0,): 0.0, (1, 0): 1.0, (1, 1): 0.0}  # (1, 1) hits max_new_tokens = 2 without <|im_end|>
    finished = {(0,): True, (1, 0): True, (1, 1): False}
    argv = ["--advantage_estimator", "remax", "--beta", "0", "--max_new_tokens", str(L), "--loss_type", "dr_grpo"]
    cfg = parse_or_none(train_grpo.Config, argv)  # the default --mask_truncated_completions
    if cfg is None:
        err = capsys.readouterr().err
        assert "--advantage_estimator remax" in err and "--no-mask_truncated_completions" in err
        cfg = config.parse_config(train_grpo.Config, argv + ["--no-mask_truncated_completions"])
    target = -objective_gradient(THETA0, REF_THETA, score, 0.0) / L
    expected = expected_loss_gradient(cfg, THETA0, REF_THETA, score, finished, greedy_reward=1.0,
                                      monkeypatch=monkeypatch)
    torch.testing.assert_close(expected, target, **TOL, msg=lambda m: f"mask_truncated_completions="
                               f"{cfg.mask_truncated_completions}: E[∇loss] = {expected.tolist()}, ∇E[score] / L = "
                               f"{target.tolist()}\n{m}")
