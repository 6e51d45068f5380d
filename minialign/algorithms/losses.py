"""Loss functions for alignment: reward models, the DPO family, PPO (with GAE), GRPO and the REINFORCE family
(RLOO, REINFORCE++, ReMax advantages).

Every function here is pure: tensors and floats in, tensors out. Nothing calls a model, reads a
config or prints. Read a function top to bottom and you have read the algorithm; the equation each
line implements sits in a comment beside it.

Notation
--------
    B       batch size (sequences, or preference pairs for the DPO family)
    T       tokens per sequence (after padding)
    V       vocabulary size
    G       group size: completions sampled per prompt (GRPO)
    π       log-probability of a response under the policy being trained (π_c chosen, π_r rejected)
    ref     the same under the frozen reference model
    old     the same under the policy that sampled the data (PPO / GRPO)
    σ       logistic sigmoid; log σ(x) is computed as F.logsigmoid(x)
    β       inverse temperature / KL strength (each function says which)
    A       advantage;  V(s) value;  R return;  r reward
    mask    boolean, True = this position counts. The one mask convention of minialign.
    IGNORE_INDEX = -100: a label that is not predicted (prompt or padding); see token_logps.

Conventions
-----------
* Computation is float32 whatever the input dtype (bf16 / fp16 inputs are upcast first), or
  float64 when any input is float64 (so gradcheck works). Outputs have that dtype.
* Shapes, dtypes and masks are checked at entry; a mismatch raises ValueError / TypeError naming
  the argument (a raise, not an `assert`, so `python -O` keeps the checks).
* Quantities that the math treats as constants (old log-probs, advantages, returns, reference
  log-probs, the KTO reference point) are detached inside the function.
* Positions outside the mask are set to 0 before any arithmetic, so garbage there (NaN, inf, -inf
  log-probs of padding) changes neither the loss nor the gradient. A fully masked row contributes
  nothing, and a call where nothing counts returns 0, never NaN.
* Metrics come back as a dict of detached 0-dim tensors; they are means over this call's counted
  positions (local, not global; average them across ranks yourself if you need to).
* `normalizer`: token-level losses return sum(per-token loss) / normalizer. Left as None it is the
  count of this call (a plain mean). For gradient accumulation or DDP pass the count of the *whole
  optimizer step* (all micro-batches, all ranks): then the sum of the micro-batch losses has
  exactly the gradient of one big batch, instead of the biased mean of micro-batch means.
  `normalizer=SUM` (= 1) asks for the plain sum, for a caller that divides by the global count
  itself (minialign.training.loop.train_step does).

What is simplified
------------------
* GAE treats a gap in the mask as the end of the episode (no skipping over masked tool output).
* The IPO, SimPO and ORPO papers use length-averaged log-probs; DPO, CPO and KTO use summed ones.
  The functions take whatever you give them: choose with `sequence_logps(..., average=...)`.

References
----------
[BT]     Bradley & Terry 1952; reward-model loss as in Ouyang et al. 2022 (InstructGPT), Eq. 1;
         margin as in Touvron et al. 2023 (Llama 2), Eq. 2; centering as in Eisenstein et al.
         2023 ("Helping or Herding?").
[DPO]    Rafailov et al. 2023, "Direct Preference Optimization", Eq. 7.
[cDPO]   Mitchell 2023, "A note on DPO with noisy preferences and relationship to IPO".
[rDPO]   Chowdhury et al. 2024, "Provably Robust DPO: Aligning Language Models with Noisy Feedback".
[IPO]    Azar et al. 2023, "A General Theoretical Paradigm to Understand Learning from Human
         Preferences", Sec. 5 (the sampled IPO loss).
[SLiC]   Zhao et al. 2023, "SLiC-HF" (the hinge loss).
[SimPO]  Meng et al. 2024, "SimPO: Simple Preference Optimization with a Reference-Free Reward", Eq. 6.
[CPO]    Xu et al. 2024, "Contrastive Preference Optimization", Sec. 3 (L_CPO = L_prefer + L_NLL).
[ORPO]   Hong et al. 2024, "ORPO: Monolithic Preference Optimization without Reference Model",
         Eq. 6 (objective) and Eq. 7 (odds-ratio loss).
[UL]     Welleck et al. 2019, "Neural Text Generation with Unlikelihood Training", Eq. 4 (token-level
         unlikelihood); as the fourth IMDb baseline of [DPO] Sec. 6.1 (likelihood of y_w, unlikelihood of y_l).
[KTO]    Ethayarajh et al. 2024, "KTO: Model Alignment as Prospect Theoretic Optimization", Sec. 4.
[PPO]    Schulman et al. 2017, "Proximal Policy Optimization Algorithms", Eq. 7 (L^CLIP) and Eq. 9.
[GAE]    Schulman et al. 2015, "High-Dimensional Continuous Control Using Generalized Advantage
         Estimation", Eq. 16.
[KL]     Schulman 2020, "Approximating KL Divergence" (blog post: estimators k1, k2, k3).
[GRPO]   Shao et al. 2024, "DeepSeekMath", Eq. 3 (objective) and Eq. 4 (k3 KL).
[DAPO]   Yu et al. 2025, "DAPO: An Open-Source LLM Reinforcement Learning System at Scale"
         (clip-higher; token-level loss).
[DrGRPO] Liu et al. 2025, "Understanding R1-Zero-Like Training: A Critical Perspective" (Dr. GRPO).
[RLOO]   Ahmadian et al. 2024, "Back to Basics: Revisiting REINFORCE Style Optimization for Learning from
         Human Feedback in LLMs" (arXiv 2402.14740): the RLOO estimator, the leave-one-out baseline of
         Kool et al. 2019; the KL as -β log(π/π_ref) in the reward.
[RPP]    Hu 2025, "REINFORCE++: An Efficient RLHF Algorithm with Robustness to Both Prompt and Reward
         Models" (arXiv 2501.03262): token-level k1 KL penalty in the reward, advantage = return-to-go,
         normalized over the global batch; no baseline. (OpenRLHF's advantage_estimator="reinforce".)
[ReMax]  Li et al. 2023, "ReMax: A Simple, Effective, and Efficient Reinforcement Learning Method for
         Aligning Large Language Models", Algorithm 1 (baseline: the reward of the greedy response).
[KLG]    Where the KL enters and the bias of its gradient: TRL issue #4967 ("k1 in reward" is unbiased for
         the reverse KL, "k3 in loss" is not), OpenRLHF PR #1309 (k1's gradient vanishes in the loss,
         k3's descends the forward KL, k2's is the reverse-KL gradient on-policy); see policy_gradient_loss.
         k1 in the reward is unbiased only with a constant normalizer (see kl_reward), and k2 / k3 in the
         reward are not (see kl_penalty). tests/test_exact_gradients.py checks each claim by enumeration.
Where an equation number is not given, the section named holds the formula.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F

__all__ = [
    "IGNORE_INDEX",
    "token_logps",
    "sequence_logps",
    "nll_loss",
    "bradley_terry_loss",
    "dpo_loss",
    "simpo_loss",
    "cpo_loss",
    "orpo_loss",
    "unlikelihood_loss",
    "kto_loss",
    "kl_penalty",
    "gae",
    "whiten",
    "ppo_policy_loss",
    "ppo_value_loss",
    "group_advantages",
    "rloo_advantages",
    "remax_advantages",
    "kl_reward",
    "returns_to_go",
    "reinforce_pp_advantages",
    "policy_gradient_loss",
    "grpo_loss",
]

IGNORE_INDEX = -100  # label value that is not predicted (prompt, padding); same as F.cross_entropy's default

DPO_LOSS_TYPES = ("sigmoid", "ipo", "hinge", "robust")
CPO_LOSS_TYPES = ("sigmoid", "ipo", "hinge")
KL_KINDS = ("k1", "k2", "k3", "abs")
GROUP_SCALES = ("group", "batch", "none")
GRPO_LOSS_TYPES = ("grpo", "dapo", "dr_grpo")
ADVANTAGE_ESTIMATORS = ("grpo", "rloo", "reinforce_pp", "remax")
LOSS_KL_KINDS = ("k1", "k2", "k3")  # the KL estimators offered for the loss term (see policy_gradient_loss)
REWARD_KL_KINDS = ("k1",)  # the only estimator whose detached reward -β·k has the gradient of -β KL (kl_penalty)

Number = Union[int, float]
Normalizer = Union[None, int, float, torch.Tensor]  # global count for the optimizer step; None = this call's count
SUM = 1  # normalizer=SUM: return the sum over the counted units, not a mean (see the module doc)


# ----------------------------------------------------------------------------------------------
# small private helpers: argument checks, dtype, masked reductions


def _check(name: str, x, shape: Optional[Sequence[Optional[int]]], kind: str = "float") -> None:
    """Raise unless `x` is a tensor of `shape` (None = any shape; a None entry = any size) and `kind`.

    kind: "float" (floating point), "bool" (a mask), "int" (token ids) or "any" (real numbers).
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if shape is not None and (x.ndim != len(shape) or any(s is not None and s != n for s, n in zip(shape, x.shape))):
        want = "(" + ", ".join("any" if s is None else str(s) for s in shape) + ("," if len(shape) == 1 else "") + ")"
        raise ValueError(f"{name} must have shape {want}, got {tuple(x.shape)}")
    if kind == "bool" and x.dtype != torch.bool:
        raise TypeError(f"{name} must be a torch.bool mask (True = the position counts), got {x.dtype}; use .bool()")
    if kind == "float" and not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {x.dtype}")
    if kind == "int" and (x.is_floating_point() or x.is_complex() or x.dtype == torch.bool):
        raise TypeError(f"{name} must be an integer tensor, got {x.dtype}")
    if kind == "any" and x.is_complex():
        raise TypeError(f"{name} must be real, got {x.dtype}")


def _dtype(*xs: Optional[torch.Tensor]) -> torch.dtype:
    """float64 if any input is float64, else float32 (bf16 / fp16 inputs are computed in float32)."""
    return torch.float64 if any(x is not None and x.dtype == torch.float64 for x in xs) else torch.float32


def _check_choice(name: str, value: str, valid: Sequence[str]) -> None:
    if value not in valid:
        raise ValueError(f"unknown {name} {value!r}; valid values: {', '.join(repr(v) for v in valid)}")


def _zero_padding(mask: torch.Tensor, *xs: torch.Tensor) -> tuple:
    """Set the positions that do not count to 0 before any math.

    Masking only the final sum is not enough: garbage at a padded position (inf, NaN, a -inf
    log-prob) gives a 0 · inf = NaN gradient in the backward pass and poisons the model.
    """
    return tuple(x.masked_fill(~mask, 0.0) for x in xs)


def _masked_sum(x: torch.Tensor, mask: torch.Tensor, dim: Optional[int] = None) -> torch.Tensor:
    # masked_fill, not x * mask: a NaN or inf at a padded position must not leak into the sum
    x = x.masked_fill(~mask, 0.0)
    return x.sum() if dim is None else x.sum(dim)


def _masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: Optional[int] = None) -> torch.Tensor:
    """Mean over counted positions; 0 (not NaN) where nothing counts."""
    count = mask.sum() if dim is None else mask.sum(dim)
    return _masked_sum(x, mask, dim) / count.clamp(min=1)


def _divide(total: torch.Tensor, normalizer, default: torch.Tensor) -> torch.Tensor:
    """total / normalizer, where normalizer is the caller's global count or, if None, `default` (>= 1)."""
    if normalizer is None:
        return total / default.clamp(min=1)
    if isinstance(normalizer, torch.Tensor):
        if normalizer.numel() != 1:
            raise ValueError(f"normalizer must be a number or a 1-element tensor, got shape {tuple(normalizer.shape)}")
        return total / normalizer.reshape(()).to(total.dtype)
    if not normalizer > 0:
        raise ValueError(f"normalizer must be > 0, got {normalizer}")
    return total / normalizer


# ----------------------------------------------------------------------------------------------
# log-probabilities


def token_logps(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Log-probability of each label token: log p(labels[b, t] | logits[b, t]).

    Formula: logp = logits[label] - logsumexp(logits), computed in float32 (float64 for float64
    logits). The full (B, T, V) log-softmax is never materialised: we gather one logit per position
    and subtract the log-normaliser. (The float32 copy of bf16 logits is still saved by autograd for
    the backward of logsumexp while training; under torch.no_grad it is freed right away.)

    Args:
        logits: (B, T, V) any float dtype. Row t predicts labels[:, t]; shift them yourself
            (labels = input_ids[:, 1:] against logits[:, :-1]).
        labels: (B, T) integer token ids; IGNORE_INDEX (-100) marks positions that are not predicted.

    Returns:
        (B, T) log-probabilities, 0.0 where labels == IGNORE_INDEX (the label is clamped to a valid
        id before the gather, so -100 never indexes the vocabulary).
    """
    _check("logits", logits, (None, None, None))
    _check("labels", labels, tuple(logits.shape[:2]), kind="int")
    logits = logits.to(_dtype(logits))
    ignore = labels == IGNORE_INDEX
    safe_labels = labels.masked_fill(ignore, 0).long()  # any valid id; the result is zeroed below
    label_logits = logits.gather(-1, safe_labels.unsqueeze(-1)).squeeze(-1)  # (B, T)
    logps = label_logits - torch.logsumexp(logits, dim=-1)  # log softmax at the label only
    return logps.masked_fill(ignore, 0.0)


def sequence_logps(token_logps: torch.Tensor, mask: torch.Tensor, average: bool = False) -> torch.Tensor:
    """Log-probability of each sequence: sum (or mean) of its counted token log-probs.

    Formula: sum_t mask[b,t] * logp[b,t]          (average=False; DPO, CPO, KTO)
             that sum / sum_t mask[b,t]            (average=True; IPO, SimPO, ORPO)
    A row with no counted token gives 0 in both cases (never NaN).

    Args:
        token_logps: (B, T) per-token log-probs, e.g. from token_logps().
        mask: (B, T) bool, True = the token belongs to the response and counts.
        average: mean instead of sum.

    Returns:
        (B,) float32 (float64 for float64 input).
    """
    _check("token_logps", token_logps, (None, None))
    _check("mask", mask, tuple(token_logps.shape), kind="bool")
    token_logps = token_logps.to(_dtype(token_logps))
    if average:
        return _masked_mean(token_logps, mask, dim=-1)  # (1/|y|) Σ_t log π(y_t | x, y_<t)
    return _masked_sum(token_logps, mask, dim=-1)  # Σ_t log π(y_t | x, y_<t)


def nll_loss(token_logps: torch.Tensor, mask: torch.Tensor, normalizer: Normalizer = None) -> torch.Tensor:
    """Token-level negative log-likelihood (the SFT loss): -Σ_{counted} logp / normalizer.

    Formula: loss = -sum_{b,t} mask[b,t] * logp[b,t] / N, N = normalizer or mask.sum().
    Pass normalizer = the number of counted tokens of the whole optimizer step (all micro-batches,
    all ranks) to get the exact global token mean under gradient accumulation / DDP.

    Args:
        token_logps: (B, T) per-token log-probs of the targets.
        mask: (B, T) bool, True = the token is a target and counts.
        normalizer: optional number or 1-element tensor, the global count of counted tokens.

    Returns:
        0-dim loss.
    """
    _check("token_logps", token_logps, (None, None))
    _check("mask", mask, tuple(token_logps.shape), kind="bool")
    token_logps = token_logps.to(_dtype(token_logps))
    return _divide(-_masked_sum(token_logps, mask), normalizer, mask.sum())  # -Σ log p / N


# ----------------------------------------------------------------------------------------------
# reward model


def bradley_terry_loss(
    chosen_rewards: torch.Tensor,
    rejected_rewards: torch.Tensor,
    margin: Union[None, Number, torch.Tensor] = None,
    center_coef: float = 0.0,
) -> torch.Tensor:
    """Pairwise reward-model loss under the Bradley-Terry model.

    Formula: loss = mean_b[ -log σ(r_c - r_r - m) ] + center_coef * mean_b[ (r_c + r_r)² ]
    (InstructGPT Eq. 1; the margin m as in Llama 2 Eq. 2; the centering term, which pins the
    otherwise free offset of the rewards near 0, as in Eisenstein et al. 2023.)

    Args:
        chosen_rewards: (B,) scalar reward of the preferred response.
        rejected_rewards: (B,) scalar reward of the other response.
        margin: None (0), a number, or (B,) tensor: how much the chosen reward must exceed the rejected.
        center_coef: weight of the centering term; 0 disables it.

    Returns:
        0-dim loss.
    """
    _check("chosen_rewards", chosen_rewards, (None,))
    _check("rejected_rewards", rejected_rewards, tuple(chosen_rewards.shape))
    dtype = _dtype(chosen_rewards, rejected_rewards, margin if isinstance(margin, torch.Tensor) else None)
    r_c, r_r = chosen_rewards.to(dtype), rejected_rewards.to(dtype)
    logits = r_c - r_r  # (B,)
    if isinstance(margin, torch.Tensor):
        _check("margin", margin, tuple(chosen_rewards.shape))
        logits = logits - margin.to(dtype).detach()
    elif margin is not None:
        logits = logits - float(margin)
    loss = -F.logsigmoid(logits).mean()  # InstructGPT Eq. 1: -log σ(r_c - r_r - m)
    if center_coef:
        loss = loss + center_coef * ((r_c + r_r) ** 2).mean()  # center_coef · (r_c + r_r)²
    return loss


# ----------------------------------------------------------------------------------------------
# DPO family (offline preference optimisation)


def _check_pairs(*named: tuple) -> torch.dtype:
    """Check that all (name, tensor) pairs are (B,) floats of the first one's B; return the compute dtype."""
    first_name, first = named[0]
    _check(first_name, first, (None,))
    for name, x in named[1:]:
        _check(name, x, tuple(first.shape))
    return _dtype(*(x for _, x in named))


def _check_label_smoothing(loss_type: str, label_smoothing: float, smoothed: Sequence[str]) -> None:
    if label_smoothing != 0.0 and loss_type not in smoothed:
        raise ValueError(
            f"label_smoothing is only defined for loss_type in {tuple(smoothed)}, got loss_type={loss_type!r}"
        )
    upper_ok = label_smoothing < 0.5 if loss_type == "robust" else label_smoothing <= 0.5
    if not (0.0 <= label_smoothing and upper_ok):
        bound = "[0, 0.5)" if loss_type == "robust" else "[0, 0.5]"
        raise ValueError(f"label_smoothing must be in {bound} for loss_type={loss_type!r}, got {label_smoothing}")


def _smoothed_sigmoid_loss(z: torch.Tensor, label_smoothing: float) -> torch.Tensor:
    # -(1-ε) log σ(z) - ε log σ(-z): cross-entropy against a label that is flipped with prob. ε
    return -(1 - label_smoothing) * F.logsigmoid(z) - label_smoothing * F.logsigmoid(-z)


# β of each DPO-family loss when a script's --beta is not given. sigmoid: tuned on the default task (train_dpo.py's
# docstring); robust and hinge share its scale (summed log-ratios); ipo: 1/(2β) = a 0.5-nat target margin of the
# token-averaged log-ratios; simpo, cpo, orpo: their papers' values
DEFAULT_BETA = {"sigmoid": 2.0, "robust": 2.0, "hinge": 2.0, "ipo": 1.0, "simpo": 2.0, "cpo": 0.1, "orpo": 0.1,
                "unlikelihood": 1.0}  # unlikelihood: β is the weight α of the unlikelihood term ([DPO] Sec. 6.1)
# the loss types whose --label_smoothing means something (cDPO, rDPO, and the smoothed sigmoid of SimPO and CPO)
LABEL_SMOOTHED = ("sigmoid", "robust", "simpo", "cpo")


def dpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float = 0.1,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Direct Preference Optimization and its close relatives (one loss per pair).

    With the preference logit  x = (π_c - ref_c) - (π_r - ref_r)  (log-probs of whole responses):
        "sigmoid" (DPO, Rafailov et al. 2023 Eq. 7):   -log σ(βx)
            with label_smoothing ε > 0 it is conservative DPO (cDPO, Mitchell 2023):
                                                      -(1-ε) log σ(βx) - ε log σ(-βx)
        "robust"  (rDPO, Chowdhury et al. 2024):       (-(1-ε) log σ(βx) + ε log σ(-βx)) / (1 - 2ε)
            (unbiased under preference labels flipped with probability ε; needs ε < 0.5)
        "ipo"     (IPO, Azar et al. 2023 Sec. 5):      (x - 1/(2β))²   (β plays the role of IPO's τ;
            the paper and TRL use length-averaged log-probs here: sequence_logps(average=True))
        "hinge"   (SLiC, Zhao et al. 2023):            max(0, 1 - βx)
    Implicit rewards (for logging): β(π_c - ref_c) and β(π_r - ref_r), detached.

    Args:
        policy_chosen_logps: (B,) log π(y_c | x) under the policy being trained.
        policy_rejected_logps: (B,) log π(y_r | x) under the policy.
        ref_chosen_logps: (B,) log π_ref(y_c | x), treated as constant (detached).
        ref_rejected_logps: (B,) log π_ref(y_r | x), treated as constant (detached).
        beta: β > 0, strength of the implicit KL constraint to the reference (higher = closer).
        loss_type: one of "sigmoid", "ipo", "hinge", "robust".
        label_smoothing: ε, assumed probability that a preference label is flipped ("sigmoid"
            and "robust" only).

    Returns:
        losses (B,), chosen_rewards (B,), rejected_rewards (B,); reduce the losses with .mean().
    """
    _check_choice("loss_type", loss_type, DPO_LOSS_TYPES)
    _check_label_smoothing(loss_type, label_smoothing, ("sigmoid", "robust"))
    if not beta > 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    dtype = _check_pairs(
        ("policy_chosen_logps", policy_chosen_logps),
        ("policy_rejected_logps", policy_rejected_logps),
        ("ref_chosen_logps", ref_chosen_logps),
        ("ref_rejected_logps", ref_rejected_logps),
    )
    pi_c, pi_r = policy_chosen_logps.to(dtype), policy_rejected_logps.to(dtype)
    ref_c, ref_r = ref_chosen_logps.to(dtype).detach(), ref_rejected_logps.to(dtype).detach()

    logits = (pi_c - ref_c) - (pi_r - ref_r)  # x = (π_c - ref_c) - (π_r - ref_r)
    if loss_type == "sigmoid":
        losses = _smoothed_sigmoid_loss(beta * logits, label_smoothing)  # Eq. 7: -log σ(βx) (cDPO if ε > 0)
    elif loss_type == "robust":
        eps = label_smoothing
        losses = (-(1 - eps) * F.logsigmoid(beta * logits) + eps * F.logsigmoid(-beta * logits)) / (1 - 2 * eps)  # rDPO
    elif loss_type == "ipo":
        losses = (logits - 1 / (2 * beta)) ** 2  # IPO: (x - 1/(2β))²
    else:  # "hinge"
        losses = torch.relu(1 - beta * logits)  # SLiC: max(0, 1 - βx)

    chosen_rewards = beta * (pi_c - ref_c).detach()  # implicit reward β log(π/ref)
    rejected_rewards = beta * (pi_r - ref_r).detach()
    return losses, chosen_rewards, rejected_rewards


def simpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    beta: float = 2.0,
    gamma_beta_ratio: float = 0.5,
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """SimPO: reference-free, length-normalised DPO with a target reward margin γ.

    Formula (Meng et al. 2024 Eq. 6):  -log σ(β π_c - β π_r - γ),  γ = gamma_beta_ratio · β,
    where π are LENGTH-AVERAGED log-probs (sequence_logps(..., average=True)). With label_smoothing ε:
    -(1-ε) log σ(z) - ε log σ(-z) on the same z. Rewards: β · π, detached.

    Args:
        policy_chosen_logps: (B,) mean token log-prob of the chosen response under the policy.
        policy_rejected_logps: (B,) mean token log-prob of the rejected response.
        beta: β, reward scale.
        gamma_beta_ratio: γ/β, the target margin in units of β (the SimPO repository's parameter).
        label_smoothing: ε in [0, 0.5].

    Returns:
        losses (B,), chosen_rewards (B,), rejected_rewards (B,).
    """
    _check_label_smoothing("sigmoid", label_smoothing, ("sigmoid",))
    dtype = _check_pairs(("policy_chosen_logps", policy_chosen_logps), ("policy_rejected_logps", policy_rejected_logps))
    pi_c, pi_r = policy_chosen_logps.to(dtype), policy_rejected_logps.to(dtype)
    gamma = gamma_beta_ratio * beta
    logits = beta * (pi_c - pi_r) - gamma  # Eq. 6: β/|y_c| log π(y_c) - β/|y_r| log π(y_r) - γ
    losses = _smoothed_sigmoid_loss(logits, label_smoothing)  # -log σ(...)
    return losses, beta * pi_c.detach(), beta * pi_r.detach()


def cpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    policy_chosen_nll: torch.Tensor,
    beta: float = 0.1,
    alpha: float = 1.0,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Contrastive Preference Optimization: a reference-free DPO term plus NLL on the chosen response.

    Formula (Xu et al. 2024 Sec. 3, L_CPO = L_prefer + L_NLL), with x = π_c - π_r:
        "sigmoid": -log σ(βx)  (with label_smoothing ε: -(1-ε) log σ(βx) - ε log σ(-βx))
        "hinge":   max(0, 1 - βx)
        "ipo":     (x - 1/(2β))²
        loss = preference term + alpha · NLL(y_c)
    Rewards: β · π, detached.

    Args:
        policy_chosen_logps: (B,) log π(y_c | x) (summed over tokens, as in the paper).
        policy_rejected_logps: (B,) log π(y_r | x).
        policy_chosen_nll: (B,) negative log-likelihood of the chosen response (e.g. its mean token
            NLL: -sequence_logps(..., average=True)), the behaviour-cloning regulariser.
        beta: β of the preference term.
        alpha: weight of the NLL term.
        loss_type: one of "sigmoid", "hinge", "ipo".
        label_smoothing: ε ("sigmoid" only).

    Returns:
        losses (B,), chosen_rewards (B,), rejected_rewards (B,).
    """
    _check_choice("loss_type", loss_type, CPO_LOSS_TYPES)
    _check_label_smoothing(loss_type, label_smoothing, ("sigmoid",))
    if not beta > 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    dtype = _check_pairs(
        ("policy_chosen_logps", policy_chosen_logps),
        ("policy_rejected_logps", policy_rejected_logps),
        ("policy_chosen_nll", policy_chosen_nll),
    )
    pi_c, pi_r, nll = policy_chosen_logps.to(dtype), policy_rejected_logps.to(dtype), policy_chosen_nll.to(dtype)
    logits = pi_c - pi_r  # x = log π(y_c) - log π(y_r)
    if loss_type == "sigmoid":
        prefer = _smoothed_sigmoid_loss(beta * logits, label_smoothing)  # L_prefer = -log σ(βx)
    elif loss_type == "hinge":
        prefer = torch.relu(1 - beta * logits)  # max(0, 1 - βx)
    else:  # "ipo"
        prefer = (logits - 1 / (2 * beta)) ** 2  # (x - 1/(2β))²
    losses = prefer + alpha * nll  # L_CPO = L_prefer + α L_NLL
    return losses, beta * pi_c.detach(), beta * pi_r.detach()


def orpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    policy_chosen_nll: torch.Tensor,
    beta: float = 0.1,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ORPO: SFT loss plus an odds-ratio preference term, no reference model.

    Formula (Hong et al. 2024 Eq. 6-7), with p = exp(π) and π the LENGTH-AVERAGED log-prob:
        log odds(y) = log(p / (1 - p)) = π - log(1 - exp(π))
        loss = NLL(y_c) - β · log σ(log odds(y_c) - log odds(y_r))
    β is the paper's λ. log(1 - exp(π)) is computed as log(-expm1(π)) with π clamped to ≤ -1e-6,
    so a (numerically) certain response gives a large finite log-odds instead of inf / NaN.
    Rewards: β · π, detached.

    Args:
        policy_chosen_logps: (B,) mean token log-prob of the chosen response (must be < 0).
        policy_rejected_logps: (B,) mean token log-prob of the rejected response.
        policy_chosen_nll: (B,) NLL of the chosen response (the SFT term, usually -policy_chosen_logps).
        beta: β (λ in the paper), weight of the odds-ratio term.

    Returns:
        losses (B,), chosen_rewards (B,), rejected_rewards (B,).
    """
    dtype = _check_pairs(
        ("policy_chosen_logps", policy_chosen_logps),
        ("policy_rejected_logps", policy_rejected_logps),
        ("policy_chosen_nll", policy_chosen_nll),
    )
    pi_c, pi_r, nll = policy_chosen_logps.to(dtype), policy_rejected_logps.to(dtype), policy_chosen_nll.to(dtype)

    def log_odds(logp: torch.Tensor) -> torch.Tensor:
        logp = logp.clamp(max=-1e-6)  # p < 1 strictly, so 1 - p > 0
        return logp - torch.log(-torch.expm1(logp))  # log p - log(1 - p)

    log_odds_ratio = log_odds(pi_c) - log_odds(pi_r)  # log(odds(y_c) / odds(y_r))
    losses = nll - beta * F.logsigmoid(log_odds_ratio)  # Eq. 6-7: L_SFT + λ · (-log σ(log OR))
    return losses, beta * pi_c.detach(), beta * pi_r.detach()

def unlikelihood_loss(
    policy_chosen_token_logps: torch.Tensor,
    chosen_mask: torch.Tensor,
    policy_rejected_token_logps: torch.Tensor,
    rejected_mask: torch.Tensor,
    alpha: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Unlikelihood training on a preference pair: likelihood of y_w, unlikelihood of every token of y_l.

    Formula (Welleck et al. 2019 Eq. 4, the token-level unlikelihood term, with the negative candidate
    at step t being the rejected token itself; Rafailov et al. 2023 Sec. 6.1, with their coefficient α):
        loss = -(1/|y_w|) Σ_t log π(y_w,t | x, y_w,<t)  -  α (1/|y_l|) Σ_t log(1 - π(y_l,t | x, y_l,<t))
    Normalization: a token MEAN within each response (as ORPO's and CPO's NLL term), then one loss per pair;
    the caller averages pairs. A response with no counted token contributes 0 to its term.
    Numerics: log(1 - exp(l)) for l = log π <= 0 is log1mexp(l) (Mächler 2012): log(-expm1(l)) for
    l > -log 2, log1p(-exp(l)) otherwise, each accurate on its side. l is first clamped to
    <= log(1 - 1e-5), so 1 - π >= 1e-5 (the clamp in Welleck et al.'s code): a (numerically) certain rejected
    token costs at most -log(1e-5) = 11.5 nats instead of inf. Reference-free; no β inside: α is train_dpo's --beta.
    Rewards (for logging): the mean token log-prob of each response, detached.

    Args:
        policy_chosen_token_logps: (B, T) per-token log π of the chosen response y_w.
        chosen_mask: (B, T) bool, True = a token of y_w (counts).
        policy_rejected_token_logps: (B, T') per-token log π of the rejected response y_l.
        rejected_mask: (B, T') bool, True = a token of y_l (counts).
        alpha: α >= 0, weight of the unlikelihood term (0 = SFT on y_w alone).

    Returns:
        losses (B,), chosen_rewards (B,), rejected_rewards (B,).
    """
    _check("policy_chosen_token_logps", policy_chosen_token_logps, (None, None))
    _check("chosen_mask", chosen_mask, tuple(policy_chosen_token_logps.shape), kind="bool")
    _check("policy_rejected_token_logps", policy_rejected_token_logps, (policy_chosen_token_logps.shape[0], None))
    _check("rejected_mask", rejected_mask, tuple(policy_rejected_token_logps.shape), kind="bool")
    if not alpha >= 0:
        raise ValueError(f"alpha must be >= 0, got {alpha}")
    dtype = _dtype(policy_chosen_token_logps, policy_rejected_token_logps)
    (lp_w,) = _zero_padding(chosen_mask, policy_chosen_token_logps.to(dtype))
    (lp_l,) = _zero_padding(rejected_mask, policy_rejected_token_logps.to(dtype))
    lp_l = lp_l.clamp(max=math.log1p(-1e-5))  # 1 - π >= 1e-5: the unlikelihood term stays finite
    log_one_minus_p = torch.where(lp_l > -math.log(2), torch.log(-torch.expm1(lp_l)),
                                  torch.log1p(-torch.exp(lp_l)))  # log(1 - π(y_l,t)), log1mexp
    likelihood = _masked_mean(lp_w, chosen_mask, dim=-1)  # (1/|y_w|) Σ_t log π(y_w,t)
    unlikelihood = _masked_mean(log_one_minus_p, rejected_mask, dim=-1)  # (1/|y_l|) Σ_t log(1 - π(y_l,t))
    losses = -likelihood - alpha * unlikelihood  # -log-likelihood(y_w) - α · log-unlikelihood(y_l)
    rejected_avg = _masked_mean(policy_rejected_token_logps.to(dtype).detach().masked_fill(~rejected_mask, 0.0),
                                rejected_mask, dim=-1)
    return losses, likelihood.detach(), rejected_avg


def kto_loss(
    policy_logps: torch.Tensor,
    ref_logps: torch.Tensor,
    is_desirable: torch.Tensor,
    kl_ref_point: Union[Number, torch.Tensor],
    beta: float = 0.1,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """KTO: unpaired desirable / undesirable examples, each judged against a reference point z0.

    Formula (Ethayarajh et al. 2024 Sec. 4), with r = π - ref (log-ratio of the response):
        desirable:    w_d · (1 - σ(β(r - z0)))
        undesirable:  w_u · (1 - σ(β(z0 - r)))
    z0 estimates KL(π ‖ ref) on unrelated (mismatched) completions; it is detached and clamped at 0.
    Rewards: β · r, detached.

    Args:
        policy_logps: (B,) log π(y | x) (summed over tokens).
        ref_logps: (B,) log π_ref(y | x), treated as constant (detached).
        is_desirable: (B,) bool, True = y is a desirable response, False = undesirable.
        kl_ref_point: z0, a number or 0-dim tensor (treated as constant, clamped to >= 0).
        beta: β, the value-function sharpness.
        desirable_weight: w_d (λ_D in the paper).
        undesirable_weight: w_u (λ_U in the paper); w_u > w_d models loss aversion.

    Returns:
        losses (B,), rewards (B,).
    """
    dtype = _check_pairs(("policy_logps", policy_logps), ("ref_logps", ref_logps))
    _check("is_desirable", is_desirable, tuple(policy_logps.shape), kind="bool")
    if isinstance(kl_ref_point, torch.Tensor) and kl_ref_point.ndim != 0:
        raise ValueError(f"kl_ref_point must be a number or a 0-dim tensor, got shape {tuple(kl_ref_point.shape)}")
    pi, ref = policy_logps.to(dtype), ref_logps.to(dtype).detach()
    z0 = torch.as_tensor(kl_ref_point, dtype=dtype, device=pi.device).detach().clamp(min=0)  # z0 = max(KL, 0)

    logratios = pi - ref  # r = log π(y|x) - log π_ref(y|x)
    desirable_losses = desirable_weight * (1 - torch.sigmoid(beta * (logratios - z0)))  # λ_D (1 - σ(β(r - z0)))
    undesirable_losses = undesirable_weight * (1 - torch.sigmoid(beta * (z0 - logratios)))  # λ_U (1 - σ(β(z0 - r)))
    losses = torch.where(is_desirable, desirable_losses, undesirable_losses)
    return losses, beta * logratios.detach()


# ----------------------------------------------------------------------------------------------
# KL estimators, GAE, whitening


def kl_penalty(logps: torch.Tensor, ref_logps: torch.Tensor, kind: str = "k1") -> torch.Tensor:
    """Per-token estimate of KL(π ‖ ref) from log-probs of tokens sampled from π (Schulman 2020).

    With log_ratio = logp - ref_logp:
        "k1":  log_ratio                              unbiased, can be negative, high variance
        "k2":  ½ log_ratio²                           biased, >= 0, low variance
        "k3":  exp(-log_ratio) - 1 + log_ratio        unbiased, >= 0, low variance (GRPO Eq. 4)
        "abs": |log_ratio|                            biased, >= 0
    k3 is computed as expm1(d) - d with d = ref - logp, which is exact near 0 and never negative.
    "Unbiased" is about the VALUE: E_π[k] = KL(π ‖ ref). The GRADIENT of an estimate used as a detached
    per-token reward -β·k (PPO, the REINFORCE family) is E_π[k ∇log π], which for k1 is ∇KL(π ‖ ref) but for
    k3 is ∇KL(π ‖ ref) - ∇KL(ref ‖ π) (E_π[(ref/π) ∇log π] = Σ ref ∇log π = -∇KL(ref ‖ π)), and for k2 neither;
    so only k1 goes in a reward (REWARD_KL_KINDS). In the loss, see policy_gradient_loss.
    All four are 0 where logps == ref_logps. ref_logps is treated as constant (detached).

    Args:
        logps: (B, T) (any shape) log π of the sampled tokens.
        ref_logps: same shape, log π_ref of the same tokens.
        kind: one of "k1", "k2", "k3", "abs".

    Returns:
        Same shape as logps, float32 (float64 for float64 input). Mask it yourself.
    """
    _check_choice("kind", kind, KL_KINDS)
    _check("logps", logps, None)
    _check("ref_logps", ref_logps, tuple(logps.shape))
    dtype = _dtype(logps, ref_logps)
    log_ratio = logps.to(dtype) - ref_logps.to(dtype).detach()  # log π/π_ref
    if kind == "k1":
        return log_ratio  # k1 = log(π/ref)
    if kind == "k2":
        return 0.5 * log_ratio**2  # k2 = ½ (log(π/ref))²
    if kind == "abs":
        return log_ratio.abs()  # |log(π/ref)|
    d = -log_ratio  # d = log(ref/π)
    return torch.expm1(d) - d  # k3 = ref/π - log(ref/π) - 1


def gae(
    rewards: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor,
    gamma: float = 1.0,
    lam: float = 0.95,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalized Advantage Estimation over the tokens of each response.

    Formula (Schulman et al. 2015 Eq. 16), computed backwards in time:
        delta_t  = r_t + γ V_{t+1} · nonterminal_t - V_t
        A_t      = delta_t + γ λ · nonterminal_t · A_{t+1}
        R_t      = A_t + V_t     (the target of the value loss)
    where nonterminal_t = mask[t+1]: the episode goes on only if the next position counts. So:
      * after the last counted token of a right-padded response, V_{t+1} = 0 (the response ended);
      * a masked position has A_t = R_t = 0 and passes nothing backwards;
      * a gap inside the mask (True False True) is treated as an episode boundary: the counted
        run before it is bootstrapped with 0, not with the value after the gap. (Documented
        simplification: skipping over masked tool output in multi-turn data is not supported.)
    The loop runs over T (short) and is vectorised over B; call it under torch.no_grad() in PPO.

    Args:
        rewards: (B, T) per-token reward r_t (e.g. -β·KL per token, plus the score on the last token).
        values: (B, T) value estimates V_t of the state before token t.
        mask: (B, T) bool, True = token t is a response token that counts.
        gamma: discount γ.
        lam: GAE λ (0: one-step TD, 1: Monte Carlo return minus V).

    Returns:
        advantages (B, T), returns (B, T); both 0 at masked positions.
    """
    _check("rewards", rewards, (None, None))
    _check("values", values, tuple(rewards.shape))
    _check("mask", mask, tuple(rewards.shape), kind="bool")
    dtype = _dtype(rewards, values)
    rewards, values = _zero_padding(mask, rewards.to(dtype), values.to(dtype))
    B, T = rewards.shape
    zeros = rewards.new_zeros(B)

    last_gae = zeros  # A_{t+1}
    advantages_reversed = []
    for t in reversed(range(T)):
        if t + 1 < T:
            nonterminal = mask[:, t + 1].to(dtype)  # 1 if position t+1 counts, else the episode ended
            next_values = values[:, t + 1]  # V_{t+1}
        else:
            nonterminal, next_values = zeros, zeros  # past the last column: the episode ended
        delta = rewards[:, t] + gamma * next_values * nonterminal - values[:, t]  # δ_t = r_t + γ V_{t+1} - V_t
        last_gae = delta + gamma * lam * nonterminal * last_gae  # A_t = δ_t + γλ A_{t+1}
        last_gae = torch.where(mask[:, t], last_gae, zeros)  # masked positions: A_t = 0
        advantages_reversed.append(last_gae)
    advantages = torch.stack(advantages_reversed[::-1], dim=1)  # (B, T)
    returns = torch.where(mask, advantages + values, torch.zeros_like(values))  # R_t = A_t + V_t
    return advantages, returns


def whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8) -> torch.Tensor:
    """Masked standardisation: (x - mean) / std over all counted positions of the batch.

    Formula: mean = Σ mask·x / n,  var = Σ mask·(x - mean)² / (n - 1)  (unbiased, like TRL),
             out = (x - mean) / sqrt(var + eps)           if shift_mean
             out = (x - mean) / sqrt(var + eps) + mean    otherwise (rescale, keep the mean)
    n is the number of counted positions; with n <= 1 the divisor is clamped to 1 (var = 0), and an
    all-False mask returns zeros, never NaN. Masked positions are returned as 0.

    Args:
        x: (B, T) (any shape) values to whiten, e.g. PPO advantages.
        mask: same shape, bool, True = counts (enters the statistics and gets a value).
        shift_mean: subtract the mean (True) or only rescale (False).
        eps: added to the variance.

    Returns:
        Same shape as x, float32 (float64 for float64 input).
    """
    _check("x", x, None)
    _check("mask", mask, tuple(x.shape), kind="bool")
    (x,) = _zero_padding(mask, x.to(_dtype(x)))
    n = mask.sum()
    mean = _masked_sum(x, mask) / n.clamp(min=1)
    var = _masked_sum((x - mean) ** 2, mask) / (n - 1).clamp(min=1)  # Bessel-corrected variance
    whitened = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        whitened = whitened + mean
    return whitened.masked_fill(~mask, 0.0)


# ----------------------------------------------------------------------------------------------
# PPO


def ppo_policy_loss(
    logps: torch.Tensor,
    old_logps: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    cliprange: float = 0.2,
    normalizer: Normalizer = None,
) -> tuple[torch.Tensor, dict]:
    """PPO clipped surrogate policy loss, per token.

    Formula (Schulman et al. 2017 Eq. 7, written as a loss to minimise):
        ratio = exp(logp - old_logp)
        pg    = max(-A · ratio, -A · clip(ratio, 1 - ε, 1 + ε))
        loss  = Σ_{counted} pg / N,   N = normalizer or mask.sum()

    Metrics (detached, means over this call's counted tokens):
        "clipfrac":   fraction of tokens where the clipped branch is the active one (gradient 0)
        "approx_kl":  mean of ½ (logp - old_logp)², the k2 estimate of KL(old ‖ π)
        "ratio_mean": mean of ratio

    Args:
        logps: (B, T) log π(token) under the policy being trained.
        old_logps: (B, T) log π_old(token) from the rollout, treated as constant (detached).
        advantages: (B, T) per-token advantages (e.g. whitened GAE), treated as constant.
        mask: (B, T) bool, True = response token that counts.
        cliprange: ε, clipping range of the ratio.
        normalizer: optional global count of counted tokens of the optimizer step (see module doc).

    Returns:
        loss (0-dim), metrics dict.
    """
    _check("logps", logps, (None, None))
    for name, x in (("old_logps", old_logps), ("advantages", advantages)):
        _check(name, x, tuple(logps.shape))
    _check("mask", mask, tuple(logps.shape), kind="bool")
    dtype = _dtype(logps, old_logps, advantages)
    logps, old_logps, advantages = logps.to(dtype), old_logps.to(dtype).detach(), advantages.to(dtype).detach()
    logps, old_logps, advantages = _zero_padding(mask, logps, old_logps, advantages)

    log_ratio = logps - old_logps
    ratio = torch.exp(log_ratio)  # r_t(θ) = π(a_t|s_t) / π_old(a_t|s_t)
    pg_losses = -advantages * ratio  # -r_t A_t
    pg_losses_clipped = -advantages * torch.clamp(ratio, 1 - cliprange, 1 + cliprange)  # -clip(r_t, 1-ε, 1+ε) A_t
    pg = torch.max(pg_losses, pg_losses_clipped)  # Eq. 7: -min(r_t A_t, clip(r_t) A_t)
    loss = _divide(_masked_sum(pg, mask), normalizer, mask.sum())

    metrics = {
        "clipfrac": _masked_mean((pg_losses_clipped > pg_losses).to(dtype), mask).detach(),
        "approx_kl": _masked_mean(0.5 * log_ratio**2, mask).detach(),
        "ratio_mean": _masked_mean(ratio, mask).detach(),
    }
    return loss, metrics


def ppo_value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    cliprange_value: float = 0.2,
    normalizer: Normalizer = None,
) -> tuple[torch.Tensor, dict]:
    """Clipped value loss, per token (the L^VF term of PPO Eq. 9, with value clipping).

    Formula:
        v_clipped = old_v + clip(v - old_v, -ε, ε)
        loss      = ½ · Σ_{counted} max((v - R)², (v_clipped - R)²) / N,   N = normalizer or mask.sum()
    Value clipping is not in the PPO paper; it comes from OpenAI's baselines implementation (and is
    what TRL / OpenRLHF do): the value may not move more than ε from its rollout value per update.

    Metrics (detached): "clipfrac", fraction of counted tokens where the clipped error is the larger.

    Args:
        values: (B, T) V(s_t) from the value model being trained.
        old_values: (B, T) V(s_t) at rollout time, treated as constant (detached).
        returns: (B, T) targets R_t (e.g. from gae), treated as constant (detached).
        mask: (B, T) bool, True = response token that counts.
        cliprange_value: ε, how far the value may move from old_values.
        normalizer: optional global count of counted tokens of the optimizer step (see module doc).

    Returns:
        loss (0-dim), metrics dict.
    """
    _check("values", values, (None, None))
    for name, x in (("old_values", old_values), ("returns", returns)):
        _check(name, x, tuple(values.shape))
    _check("mask", mask, tuple(values.shape), kind="bool")
    dtype = _dtype(values, old_values, returns)
    values, old_values, returns = values.to(dtype), old_values.to(dtype).detach(), returns.to(dtype).detach()
    values, old_values, returns = _zero_padding(mask, values, old_values, returns)

    values_clipped = old_values + torch.clamp(values - old_values, -cliprange_value, cliprange_value)  # old + clip(v - old, -ε, ε)
    vf_losses = (values - returns) ** 2  # (v - R)²
    vf_losses_clipped = (values_clipped - returns) ** 2  # (v_clipped - R)²
    loss = 0.5 * _divide(_masked_sum(torch.max(vf_losses, vf_losses_clipped), mask), normalizer, mask.sum())
    metrics = {"clipfrac": _masked_mean((vf_losses_clipped > vf_losses).to(dtype), mask).detach()}
    return loss, metrics


# ----------------------------------------------------------------------------------------------
# GRPO


def group_advantages(
    rewards: torch.Tensor,
    group_size: int,
    scale: str = "group",
    eps: float = 1e-4,
) -> torch.Tensor:
    """Group-relative advantages: each completion's reward against the others for the same prompt.

    Formula (GRPO, Shao et al. 2024 Sec. 4.1.2, outcome supervision), per group of G completions:
        "group": A_i = (r_i - mean(r)) / (std(r) + eps)        GRPO
        "batch": A_i = (r_i - mean(r)) / (std(all rewards) + eps)
        "none":  A_i =  r_i - mean(r)                          Dr. GRPO (no difficulty bias)
    std is the unbiased (n - 1) standard deviation, torch.std's default, as in TRL. A group whose
    rewards are all equal carries no signal: its advantages are set to exactly 0 (a floating-point
    mean can be one ulp off the common value, which would otherwise leave ±tiny advantages).

    Args:
        rewards: (N·G,) one scalar reward per completion, the G completions of a prompt contiguous.
            Integer or bool rewards (e.g. correctness) are accepted and cast to float32.
        group_size: G >= 2.
        scale: "group", "batch" or "none".
        eps: added to the std.

    Returns:
        (N·G,) advantages, float32 (float64 for float64 rewards).
    """
    _check_choice("scale", scale, GROUP_SCALES)
    _check("rewards", rewards, (None,), kind="any")
    if group_size < 2:
        raise ValueError(f"group_size must be >= 2 (a group of one has no baseline), got {group_size}")
    if rewards.numel() % group_size != 0:
        raise ValueError(f"rewards.numel() = {rewards.numel()} is not divisible by group_size = {group_size}")
    rewards = rewards.to(_dtype(rewards))
    grouped = rewards.view(-1, group_size)  # (N, G)
    centered = grouped - grouped.mean(dim=1, keepdim=True)  # r_i - mean(r)
    all_equal = (grouped == grouped[:, :1]).all(dim=1, keepdim=True)  # (N, 1)
    centered = centered.masked_fill(all_equal, 0.0)
    if scale == "group":
        advantages = centered / (grouped.std(dim=1, keepdim=True) + eps)  # (r_i - mean) / (std_group + eps)
    elif scale == "batch":
        advantages = centered / (rewards.std() + eps)  # (r_i - mean) / (std_batch + eps)
    else:
        advantages = centered  # Dr. GRPO: no std division
    return advantages.reshape(-1)


def _check_groups(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    _check("rewards", rewards, (None,), kind="any")
    if group_size < 2:
        raise ValueError(f"group_size must be >= 2 (a group of one has no baseline), got {group_size}")
    if rewards.numel() % group_size != 0:
        raise ValueError(f"rewards.numel() = {rewards.numel()} is not divisible by group_size = {group_size}")
    return rewards.to(_dtype(rewards)).view(-1, group_size)  # (N, G)


def rloo_advantages(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """REINFORCE Leave-One-Out: each completion's baseline is the mean reward of the OTHER G - 1 completions.

    Formula (Ahmadian et al. 2024, the RLOO estimator; the leave-one-out baseline of Kool et al. 2019), per group:
        A_i = r_i - 1/(G-1) · Σ_{j≠i} r_j   ( = G/(G-1) · (r_i - mean(r)) )
    The baseline does not contain r_i, so it is independent of sample i and the estimate is unbiased
    (GRPO's mean contains r_i; its (1 - 1/G) shrinkage is what G/(G-1) undoes). No std scaling. A group
    of equal rewards gets exactly 0 (as in group_advantages: no ±1-ulp leftovers). With a KL penalty the paper
    baselines the whole sequence reward: pass R_i = r_i - β Σ_t k1_it (k1 = log π_old/π_ref per token), so the
    KL enters the baseline too and a group's advantages sum to 0 (advantages.step_advantages does).

    Args:
        rewards: (N·G,) one scalar reward per completion, the G completions of a prompt contiguous
            (with the KL in the reward: the KL-penalised R_i).
        group_size: G >= 2.

    Returns:
        (N·G,) advantages, float32 (float64 for float64 rewards).
    """
    grouped = _check_groups(rewards, group_size)  # (N, G)
    baseline = (grouped.sum(dim=1, keepdim=True) - grouped) / (group_size - 1)  # 1/(G-1) Σ_{j≠i} r_j
    advantages = grouped - baseline  # r_i - baseline_i
    all_equal = (grouped == grouped[:, :1]).all(dim=1, keepdim=True)  # (N, 1)
    return advantages.masked_fill(all_equal, 0.0).reshape(-1)


def remax_advantages(rewards: torch.Tensor, greedy_rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """ReMax: the baseline of every completion of a prompt is the reward of that prompt's GREEDY response.

    Formula (Li et al. 2023, Algorithm 1), completion i of prompt b:
        A_i = r_i - r(x_b, ȳ_b),   ȳ_b = argmax decoding of the current policy (not trained on)
    The greedy response does not depend on the sampled ones, so the baseline is unbiased; it costs one
    greedy generation per prompt instead of a value model. (The paper samples one response per prompt;
    here each of the G samples is compared with the same greedy baseline.) Unlike the group baselines the
    advantages are not centred: their mean is E[r] - r(ȳ), negative when the greedy response is usually the
    better one, so a response the loss does not see (a masked truncated one) escapes a mostly negative push.

    Args:
        rewards: (N·G,) one scalar reward per sampled completion, the G completions of a prompt contiguous.
        greedy_rewards: (N,) the reward of each prompt's greedy response, with the same reward functions.
        group_size: G >= 1.

    Returns:
        (N·G,) advantages, float32 (float64 for float64 input).
    """
    _check("rewards", rewards, (None,), kind="any")
    _check("greedy_rewards", greedy_rewards, (None,), kind="any")
    if group_size < 1 or rewards.numel() != greedy_rewards.numel() * group_size:
        raise ValueError(f"rewards.numel() = {rewards.numel()} must be greedy_rewards.numel() = "
                         f"{greedy_rewards.numel()} x group_size = {group_size}")
    dtype = _dtype(rewards, greedy_rewards)
    grouped = rewards.to(dtype).view(-1, group_size)  # (N, G)
    return (grouped - greedy_rewards.to(dtype)[:, None]).reshape(-1)  # r_i - r(x, ȳ)


def kl_reward(scores: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, beta: float) -> torch.Tensor:
    """Per-token rewards with the KL penalty folded in: -β·kl_t at every token, plus the score at the last.

    Formula (the RLHF reward of Ouyang et al. 2022 / Ziegler et al. 2019, per token as in PPO and [RPP]):
        r_t = -β · kl_t + [t = last counted token] · score,     so   Σ_t r_t = score - β Σ_t kl_t
    With kl_t = k1 = log π_old(y_t) - log π_ref(y_t) the sum is score - β · (an unbiased estimate of
    KL(π ‖ π_ref) of the sequence), and the policy gradient of that reward, Σ_t A_t ∇log π(y_t) with A_t its
    return-to-go, is an unbiased estimate of ∇(E[score] - β KL(π ‖ π_ref)) (TRL #4967) ON CONDITION that the
    loss sums each response's tokens with a CONSTANT normalizer (policy_gradient_loss's "dr_grpo": 1/(G·L)) and
    counts every response. The per-response 1/|o_i| of "grpo" (and "dapo"'s 1/Σ_i |o_i|, a random count) weights
    each response's KL by its inverse length, and the expectation is then not a multiple of ∇KL(π ‖ π_ref);
    a truncated response dropped from the loss drops its KL too. With a k2 or k3 kl_t no normalizer helps
    (kl_penalty). Everything here is a constant for the loss (detached).
    A row with no counted token gets nothing (its score is dropped).

    Args:
        scores: (B,) sequence-level score of each response (or an advantage from a group baseline).
        kl: (B, T) per-token KL estimate (k1) at each response token.
        mask: (B, T) bool, True = the token counts; the score goes on each row's last True position.
        beta: β >= 0.

    Returns:
        (B, T) per-token rewards, 0 where mask is False, float32 (float64 for float64 input).
    """
    _check("kl", kl, (None, None))
    B, T = kl.shape
    _check("scores", scores, (B,), kind="any")
    _check("mask", mask, (B, T), kind="bool")
    dtype = _dtype(scores, kl)
    (kl,) = _zero_padding(mask, kl.to(dtype).detach())
    last = mask & (mask.cumsum(dim=1) == mask.sum(dim=1, keepdim=True))  # (B, T): each row's last counted token
    rewards = -beta * kl + last.to(dtype) * scores.to(dtype).detach()[:, None]  # r_t = -β kl_t + [t = L] s
    return rewards.masked_fill(~mask, 0.0)


def returns_to_go(rewards: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0) -> torch.Tensor:
    """Per-token return-to-go: G_t = Σ_{t' >= t} γ^(t'-t) r_t' over each response's counted tokens.

    This is `gae` with V ≡ 0 and λ = 1 (δ_t = r_t, A_t = r_t + γ A_{t+1}), so it shares its convention:
    a gap in the mask ends the episode, masked positions get 0. REINFORCE with a causal (reward-to-go)
    credit assignment: token t is credited only with the rewards at and after it.

    Args:
        rewards: (B, T) per-token rewards (e.g. kl_reward).
        mask: (B, T) bool, True = the token counts.
        gamma: discount γ (1 for language: the episode is one response).

    Returns:
        (B, T) returns, 0 where mask is False.
    """
    _check("rewards", rewards, (None, None))
    return gae(rewards, torch.zeros_like(rewards), mask, gamma, lam=1.0)[0]  # A_t with V ≡ 0, λ = 1: G_t


def reinforce_pp_advantages(scores: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, beta: float) -> torch.Tensor:
    """REINFORCE++ advantages: returns-to-go of the KL-penalised reward, normalized over the whole batch.

    Formula (Hu 2025, [RPP]; OpenRLHF's advantage_estimator="reinforce"):
        A_t      = score - β Σ_{t' >= t} kl_t'                  (kl_reward, then returns_to_go)
        A^norm_t = (A_t - mean(A)) / std(A)                      mean and std over every counted token of the
                                                                 GLOBAL batch (all prompts, all ranks)
    No per-prompt baseline: the batch normalization is what centres the advantages. Call it on the
    whole step's rows (under DDP gather them first; train_grpo.py does), or the statistics are a rank's.

    Args:
        scores: (B,) sequence-level score of each response (the weighted reward).
        kl: (B, T) per-token k1 (zeros when β = 0).
        mask: (B, T) bool, True = the token counts (and enters the statistics).
        beta: β >= 0 of the KL penalty.

    Returns:
        (B, T) advantages, 0 where mask is False, float32 (float64 for float64 input).
    """
    returns = returns_to_go(kl_reward(scores, kl, mask, beta), mask)  # score - β Σ_{t'>=t} kl_t'
    return whiten(returns, mask)  # (A - mean) / std over the batch's counted tokens


def policy_gradient_loss(
    logps: torch.Tensor,
    old_logps: torch.Tensor,
    ref_logps: Optional[torch.Tensor],
    advantages: torch.Tensor,
    mask: torch.Tensor,
    epsilon_low: float = 0.2,
    epsilon_high: float = 0.2,
    beta: float = 0.04,
    loss_type: str = "grpo",
    max_new_tokens: Optional[int] = None,
    normalizer: Normalizer = None,
    kl_estimator: str = "k3",
) -> tuple[torch.Tensor, dict]:
    """The clipped policy-gradient loss of the critic-free family (GRPO, RLOO, REINFORCE++, ReMax), per token.

    Per token (Shao et al. 2024 Eq. 3; separate ε_low / ε_high is DAPO's "clip-higher"):
        ratio     = exp(logp - old_logp)
        per_token = -min(ratio · A_t, clip(ratio, 1 - ε_low, 1 + ε_high) · A_t) + β · k(logp, ref_logp)
    with a per-token advantage A_t (grpo_loss broadcasts one advantage per completion) and k the
    `kl_estimator` (kl_penalty). Differentiated in the loss, on tokens sampled from π ([KLG]):
        k1 = log π/π_ref           E[∇k1] = E[∇log π] = 0: no KL gradient in expectation, only noise
        k2 = ½ (log π/π_ref)²      E[∇k2] = E[log(π/π_ref) ∇log π] = ∇KL(π ‖ π_ref) per token, on-policy
                                   (biased once the policy moved from the sampler, μ > 1)
        k3 = π_ref/π - log(π_ref/π) - 1   (GRPO Eq. 4): unbiased VALUE, but E[∇k3] = E[(1 - π_ref/π) ∇log π]
                                   = -E_{π_ref}[∇log π] = ∇KL(π_ref ‖ π): it descends the FORWARD KL
    (the unbiased alternative is k1 in the reward: kl_reward, β = 0 here).
    Reduction (n_seq = rows with at least one counted token; fully masked rows contribute nothing):
        "grpo":    mean over each sequence's tokens, then Σ over sequences / (normalizer or n_seq)
        "dapo":    Σ over all counted tokens / (normalizer or mask.sum())            (DAPO)
        "dr_grpo": Σ over all counted tokens / (normalizer or n_seq · max_new_tokens) (Dr. GRPO)
    Only "dr_grpo" has a constant weight per token, so only it makes E[∇loss] a multiple of the policy gradient
    of the reward the advantages estimate (the KL in the reward included: kl_reward); "grpo" weights a
    response's tokens by 1/|o_i|, "dapo" by 1 over the step's random token count.
    For gradient accumulation / DDP pass normalizer = the global count for the optimizer step:
    sequences for "grpo", counted tokens for "dapo", sequences × max_new_tokens for "dr_grpo".

    Metrics (detached, means over this call's counted tokens):
        "clip_ratio/low_mean":    ratio < 1 - ε_low and A < 0 (clipped from below)
        "clip_ratio/high_mean":   ratio > 1 + ε_high and A > 0 (clipped from above)
        "clip_ratio/region_mean": either
        "kl":                     mean of the KL estimate (only when beta > 0)

    Args:
        logps: (B, T) log π of the completion tokens under the policy being trained.
        old_logps: (B, T) log π_old from sampling time, treated as constant (pass logps.detach()
            when each batch is used for one step only).
        ref_logps: (B, T) log π_ref, treated as constant; may be None when beta == 0 (never read then).
        advantages: (B, T) per-token advantages (e.g. reinforce_pp_advantages), treated as constant.
        mask: (B, T) bool, True = completion token that counts.
        epsilon_low: ε_low, lower clip range of the ratio.
        epsilon_high: ε_high, upper clip range (DAPO uses 0.28).
        beta: β, weight of the KL penalty in the loss; 0 disables it (DAPO, Dr. GRPO, KL in the reward).
        loss_type: "grpo", "dapo" or "dr_grpo".
        max_new_tokens: L, the generation budget; required for "dr_grpo" without normalizer.
        normalizer: optional global count for the optimizer step (see above).
        kl_estimator: "k1", "k2" or "k3" (GRPO's).

    Returns:
        loss (0-dim), metrics dict.
    """
    _check_choice("loss_type", loss_type, GRPO_LOSS_TYPES)
    _check_choice("kl_estimator", kl_estimator, LOSS_KL_KINDS)
    _check("logps", logps, (None, None))
    B, T = logps.shape
    _check("old_logps", old_logps, (B, T))
    _check("advantages", advantages, (B, T))
    _check("mask", mask, (B, T), kind="bool")
    if beta != 0:
        if ref_logps is None:
            raise ValueError("ref_logps is required when beta != 0 (pass beta=0.0 to train without a reference)")
        _check("ref_logps", ref_logps, (B, T))
    if loss_type == "dr_grpo" and normalizer is None and max_new_tokens is None:
        raise ValueError("loss_type='dr_grpo' needs max_new_tokens (or an explicit normalizer)")
    dtype = _dtype(logps, old_logps, advantages, ref_logps if beta != 0 else None)
    logps, old_logps, A = _zero_padding(mask, logps.to(dtype), old_logps.to(dtype).detach(),
                                        advantages.to(dtype).detach())

    ratio = torch.exp(logps - old_logps)  # r_{i,t} = π / π_old
    surrogate = ratio * A  # r · A
    surrogate_clipped = torch.clamp(ratio, 1 - epsilon_low, 1 + epsilon_high) * A  # clip(r, 1-ε_low, 1+ε_high) · A
    per_token = -torch.min(surrogate, surrogate_clipped)  # Eq. 3: -min(r A, clip(r) A)
    if beta != 0:
        (ref_logps,) = _zero_padding(mask, ref_logps.to(dtype))
        per_token_kl = kl_penalty(logps, ref_logps, kind=kl_estimator)  # k3 (Eq. 4): ref/π - log(ref/π) - 1
        per_token = per_token + beta * per_token_kl  # + β D_KL

    lengths = mask.sum(dim=1)  # (B,) counted tokens per sequence
    n_seq = (lengths > 0).sum()  # sequences that count
    if loss_type == "grpo":
        seq_losses = _masked_sum(per_token, mask, dim=1) / lengths.clamp(min=1)  # (1/|o_i|) Σ_t
        loss = _divide(seq_losses.sum(), normalizer, n_seq)  # (1/G) Σ_i
    elif loss_type == "dapo":
        loss = _divide(_masked_sum(per_token, mask), normalizer, mask.sum())  # 1/Σ|o_i| Σ_i Σ_t
    else:  # "dr_grpo": a constant denominator, so no length bias (the checks above ensure one exists)
        default = n_seq * max_new_tokens if normalizer is None else None
        loss = _divide(_masked_sum(per_token, mask), normalizer, default)  # 1/(G·L) Σ_i Σ_t

    is_low = (ratio < 1 - epsilon_low) & (A < 0)
    is_high = (ratio > 1 + epsilon_high) & (A > 0)
    metrics = {
        "clip_ratio/low_mean": _masked_mean(is_low.to(dtype), mask).detach(),
        "clip_ratio/high_mean": _masked_mean(is_high.to(dtype), mask).detach(),
        "clip_ratio/region_mean": _masked_mean((is_low | is_high).to(dtype), mask).detach(),
    }
    if beta != 0:
        metrics["kl"] = _masked_mean(per_token_kl, mask).detach()
    return loss, metrics


def grpo_loss(
    logps: torch.Tensor,
    old_logps: torch.Tensor,
    ref_logps: Optional[torch.Tensor],
    advantages: torch.Tensor,
    mask: torch.Tensor,
    epsilon_low: float = 0.2,
    epsilon_high: float = 0.2,
    beta: float = 0.04,
    loss_type: str = "grpo",
    max_new_tokens: Optional[int] = None,
    normalizer: Normalizer = None,
    kl_estimator: str = "k3",
) -> tuple[torch.Tensor, dict]:
    """GRPO policy loss, per token, with decoupled clipping and a k3 KL penalty to the reference.

    Per token (Shao et al. 2024 Eq. 3-4; separate ε_low / ε_high is DAPO's "clip-higher"):
        ratio     = exp(logp - old_logp)
        per_token = -min(ratio · A, clip(ratio, 1 - ε_low, 1 + ε_high) · A) + β · k3(logp, ref_logp)
    This is policy_gradient_loss with ONE advantage per completion, A_{i,t} = A_i at every token; see it
    for the reductions ("grpo", "dapo", "dr_grpo"), the normalizer, the metrics, and the gradient of each
    `kl_estimator` (k3, GRPO's, descends the forward KL; k1 in the reward is the unbiased alternative).

    Args:
        logps: (B, T) log π of the completion tokens under the policy being trained.
        old_logps: (B, T) log π_old from sampling time, treated as constant (pass logps.detach()
            when each batch is used for one step only).
        ref_logps: (B, T) log π_ref, treated as constant; may be None when beta == 0 (never read then).
        advantages: (B,) one advantage per completion (e.g. from group_advantages), treated as constant.
        mask: (B, T) bool, True = completion token that counts.
        epsilon_low, epsilon_high, beta, loss_type, max_new_tokens, normalizer, kl_estimator:
            as in policy_gradient_loss.

    Returns:
        loss (0-dim), metrics dict.
    """
    _check("logps", logps, (None, None))
    B, T = logps.shape
    _check("advantages", advantages, (B,))
    return policy_gradient_loss(logps, old_logps, ref_logps, advantages[:, None].expand(B, T), mask, epsilon_low,
                                epsilon_high, beta, loss_type, max_new_tokens, normalizer, kl_estimator)
