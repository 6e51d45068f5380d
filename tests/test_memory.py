"""Past one GPU's memory: --gradient_checkpointing gives the gradients of a plain backward, and the memory plan's
arithmetic (minialign.training.memory) adds up by hand. Peak memory itself is measured in bench/bench_memory.py,
not here (a timed or memory-measuring test on a shared CPU would be flaky)."""

import sys

import pytest
import torch
from conftest import ARCHS, ROOT, run, tiny_config

from minialign.models.decoder import CausalLM, ScalarModel
from minialign.training import runtime


def grads(model, ids, mask):
    model.zero_grad(set_to_none=True)
    logits = model(ids, attention_mask=mask)
    (logits.float().square().mean() if logits.dim() == 3 else logits.sum()).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("arch", sorted(ARCHS))
@pytest.mark.parametrize("head", [CausalLM, ScalarModel])
def test_gradient_checkpointing_gives_the_same_gradients(arch, head):
    """Each block recomputed in the backward: the same gradients, to float32 rounding (rtol 1e-5, atol 1e-6; the
    recompute runs the same kernels on the same inputs, so they are in fact bitwise equal on CPU), dropout included
    (checkpoint replays the RNG state)."""
    torch.manual_seed(0)
    model = head(tiny_config(**ARCHS[arch], dropout=0.1)).train()
    ids = torch.randint(1, 96, (3, 10))
    mask = torch.ones(3, 10, dtype=torch.bool)
    mask[0, :4] = False  # a left-padded row: the (B, 1, T, T) mask path
    torch.manual_seed(1)
    plain = grads(model, ids, mask)
    runtime.set_gradient_checkpointing(model, True)
    assert all(b.gradient_checkpointing for b in [model.backbone])
    torch.manual_seed(1)
    recomputed = grads(model, ids, mask)
    assert plain.keys() == recomputed.keys() and len(plain) == len(list(model.parameters()))
    for k in plain:
        torch.testing.assert_close(recomputed[k], plain[k], rtol=1e-5, atol=1e-6, msg=k)


def test_gradient_checkpointing_is_off_without_a_graph():
    """Sampling (KV cache) and no_grad forwards never checkpoint: nothing to recompute, and the output is unchanged."""
    torch.manual_seed(0)
    model = CausalLM(tiny_config()).train()
    runtime.set_gradient_checkpointing(model, True)
    ids = torch.randint(1, 96, (2, 8))
    with torch.no_grad():
        a = model(ids)
    runtime.set_gradient_checkpointing(model, False)
    with torch.no_grad():
        b = model(ids)
    assert torch.equal(a, b)
