"""Prepacked oneDNN weights for the matmuls of sampling on CPU.

Why this exists. On CPU, an fp32 `F.linear` runs MKL's sgemm. A decode step multiplies a few rows (one per
sequence) by every weight matrix of the model, and at those shapes MKL ran at about a third of the speed of
oneDNN's matmul with its weights reordered ahead of time into oneDNN's blocked layout ("prepacked"); at the
1024 rows of a prefill oneDNN was still 1.4x faster (AMD EPYC, 2 cores, torch 2.13; `bench/bench_decode.py`
measures it on your machine). Reordering costs about one copy of the weights, so `generation.generate`
packs once per call, uses the packs for the prefill and every decode step, and drops them on exit.

What changes. Only the summation order inside each matmul: outputs equal F.linear's to float32 rounding
(~1e-6 relative), so sampled tokens are the same and log-probs agree to ~1e-6 (tests/test_generation.py).
q/k/v are packed as one (q | k | v) matrix and gate/up as one (gate | up) matrix: one call each instead of
three and two.

Packs are read-only snapshots of the weights. They exist only inside `packed_weights(...)`, and using one
while autograd records raises (the packed op has no backward), so they can neither be trained through nor
outlive a weight update. Off CPU, for non-float32 weights, under autocast, or for projections that are not
plain nn.Linear (e.g. with adapters), nothing is packed and the model runs its ordinary F.linear path.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn as nn


def available(weight: torch.Tensor) -> bool:
    """True where packing applies: a float32 CPU weight, oneDNN present, no CPU autocast active."""
    return (weight.device.type == "cpu" and weight.dtype == torch.float32 and torch.backends.mkldnn.is_available()
            and hasattr(torch.ops.mkldnn, "_reorder_linear_weight") and not torch.is_autocast_enabled("cpu"))


class PackedLinear:
    """y = x @ W^T + b with W (out, in) reordered for oneDNN; `rows` is the expected number of input rows."""

    def __init__(self, weights: list[torch.Tensor], biases: list[torch.Tensor | None], rows: int):
        weight = torch.cat([w.detach() for w in weights]) if len(weights) > 1 else weights[0].detach()
        if any(b is not None for b in biases):
            self.bias = torch.cat([(b.detach() if b is not None else torch.zeros(w.shape[0], dtype=w.dtype))
                                   for w, b in zip(weights, biases)])
        else:
            self.bias = None
        self.weight = torch.ops.mkldnn._reorder_linear_weight(weight, rows)
        self.sizes = [w.shape[0] for w in weights]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled():
            raise RuntimeError("packed weights are for inference only (no backward): call under torch.no_grad()")
        return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "none", [], "")


def _plain(*layers) -> bool:
    return all(type(layer) is nn.Linear for layer in layers)


def _pack(layers: list[nn.Linear], rows: int) -> PackedLinear:
    return PackedLinear([layer.weight for layer in layers], [layer.bias for layer in layers], rows)


@contextlib.contextmanager
def packed_weights(model: nn.Module, rows: int):
    """Within the block, `model`'s attention, MLP and output-head matmuls use packed weights (see above).

    model: a CausalLM (unwrapped). rows: the batch size of the decode steps (a layout hint for oneDNN).
    Does nothing where `available` is False. The packs are dropped on exit, also on an exception.
    """
    from minialign.models.decoder import Attention, CausalLM, SwiGLU  # here: model.py does not depend on this module

    head = model.backbone.embed.weight if getattr(model, "lm_head", None) is None else model.lm_head.weight
    if not available(head):
        yield
        return
    touched = []
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, Attention) and _plain(module.q_proj, module.k_proj, module.v_proj, module.o_proj):
                module.packed_qkv = _pack([module.q_proj, module.k_proj, module.v_proj], rows)
                module.packed_o = _pack([module.o_proj], rows)
                touched.append((module, ("packed_qkv", "packed_o")))
            elif isinstance(module, SwiGLU) and _plain(module.gate_proj, module.up_proj, module.down_proj):
                module.packed_gate_up = _pack([module.gate_proj, module.up_proj], rows)
                module.packed_down = _pack([module.down_proj], rows)
                touched.append((module, ("packed_gate_up", "packed_down")))
            elif isinstance(module, CausalLM):
                module.packed_head = PackedLinear([head], [None], rows)
                touched.append((module, ("packed_head",)))
    try:
        yield
    finally:
        for module, names in touched:
            for name in names:
                setattr(module, name, None)
