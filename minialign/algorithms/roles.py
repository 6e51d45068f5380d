"""The models an alignment step holds besides the policy: reference, reward and value models.

Every model that only scores is `frozen` (dropout off, eval mode, no gradients): RL needs the same log-probs
in every forward of a rollout, and a reward given with dropout on is a noisy reward. With LoRA the reference
is the policy with its adapters off (no second copy), and PPO's value model shares the reward model's backbone.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from minialign.models.lora import AdaptersOff, from_config, reference
from minialign.training import checkpoint


def disable_dropout(model):
    """Dropout 0 everywhere (RL needs the same log-probs in every forward of a rollout)."""
    model.cfg.dropout = 0.0
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
        elif isinstance(getattr(m, "dropout", None), float):
            m.dropout = 0.0  # Attention passes it to scaled_dot_product_attention
    return model


def frozen(model, rt):
    """A model that only scores (reference, reward model): no dropout, eval mode, no gradients, on the device."""
    return disable_dropout(model).to(rt.device).eval().requires_grad_(False)


def load_reward_model(path: str, rt, prog: str):
    """A frozen ScalarModel from a train_rm.py folder; a causal checkpoint is refused naming --reward_model."""
    kind = checkpoint.load(path)["model_kind"]
    if kind != "scalar":
        raise SystemExit(f"{prog}: error: --reward_model {path} holds a {kind} model, not a reward model "
                         "(train_rm.py output)")
    return frozen(checkpoint.load_model(path, kind="scalar"), rt)


def sft_reference(model: nn.Module, cfg, rt):
    """The frozen starting model (a reference, or the baseline of the evaluation's KL): with --lora_r the
    policy's adapters-off forward, nothing loaded; otherwise a frozen copy of --init_from, loaded again."""
    if cfg.lora_r:
        return reference(model)
    return frozen(checkpoint.load_model(cfg.init_from), rt)


def value_and_reward(value: nn.Module, reward_model, cfg, base: str):
    """PPO with --lora_r: the value model is adapters plus a trainable score head on `base`'s backbone (the
    reward model's, or the SFT model's when there is none). With a reward model, its scores become the value
    model's adapters-off forward with the reward model's own frozen head, so its second copy of the backbone is
    dropped: two backbones in memory (policy and value), not four. With --lora_r 0 both come back unchanged."""
    if not cfg.lora_r:
        return value, reward_model
    value = from_config(value, cfg, base, trainable=("score_head.",))
    return value, (AdaptersOff(value, reward_model.score_head) if reward_model is not None else None)
