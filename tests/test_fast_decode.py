"""The fast decode path (issue 20) samples what the plain path samples.

generate() on CPU runs its matmuls on oneDNN-prepacked weights (minialign.models.packed_linear), a decode step's
attention through SDPA with the query heads of a KV group as that group's queries, and a decode step's mask
without the causal/diagonal construction. None of that may change a sample: checked against
  * the tokens the code sampled before the change (recorded from commit 43aa3ed),
  * a cache-free reference loop (the training forward over the whole sequence for each new token, with the
    same random draws), on the dense, QK-norm + biases + untied-head, and MoE architectures,
  * generate(pack_weights=False).
And the packs themselves: equal to F.linear, dropped on exit (also on an exception), refused under autograd.
"""

import pytest
import torch
import torch.nn.functional as F
from conftest import left_padded_prompts, tiny_model

from minialign.algorithms.generation import generate, sample_categorical
from minialign.models.decoder import SwiGLU
from minialign.models.packed_linear import PackedLinear, available, packed_weights

PAD = 0
ARCHS = {
    "dense": {},
    "biases_qknorm_untied": {"qkv_bias": True, "o_bias": True, "mlp_bias": True, "qk_norm": True,
                             "tie_embeddings": False},
    "moe": {"n_experts": 4, "n_experts_per_tok": 2},
}
pytestmark = pytest.mark.skipif(not available(torch.zeros(1)), reason="oneDNN packing unavailable on this build")


def lively_model(seed=3, **overrides):
    """A tiny random model whose samples vary (non-embedding matrices x10, as in test_generation)."""
    model = tiny_model(seed=seed, **overrides)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2 and "embed" not in name:
                p.mul_(10.0)
            elif name.endswith(".bias"):
                p.normal_(0, 0.5)  # nonzero biases, so a dropped or misplaced bias shows
    return model


@torch.no_grad()
def sampling_reference(model, ids, mask, max_new_tokens, temperature, generator):
    """Sampling the slow way: a full forward (no cache, no packing) per new token, the same draws as generate."""
    tokens, logps = [], []
    for _ in range(max_new_tokens):
        scaled = model(ids, mask)[:, -1].float() / temperature  # (B, V)
        next_tok = torch.multinomial(F.softmax(scaled, -1), 1, generator=generator).squeeze(-1)
        tokens.append(next_tok)
        logps.append(scaled.log_softmax(-1).gather(-1, next_tok[:, None]).squeeze(-1))
        ids = torch.cat([ids, next_tok[:, None]], 1)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
    return torch.stack(tokens, 1), torch.stack(logps, 1)  # (B, N) each


# generate(lively_model(), *left_padded_prompts(), 12, eos_id=-1, pad_id=0, temperature=1.0,
#          generator=torch.Generator().manual_seed(7), num_samples=2) with the code of commit 43aa3ed
BEFORE_TOKENS = [[84, 92, 49, 5, 61, 84, 54, 90, 56, 54, 95, 2], [27, 19, 36, 90, 22, 54, 74, 1, 8, 84, 79, 87],
                 [8, 87, 19, 61, 10, 49, 36, 31, 33, 51, 66, 50], [76, 42, 57, 25, 92, 89, 36, 3, 19, 85, 6, 29],
                 [8, 32, 82, 76, 42, 88, 61, 88, 19, 88, 71, 49], [83, 86, 87, 19, 41, 39, 22, 71, 52, 92, 21, 46]]


def test_same_tokens_as_before_the_change():
    ids, mask = left_padded_prompts()
    out = generate(lively_model(), ids, mask, 12, eos_id=-1, pad_id=PAD, temperature=1.0,
                   generator=torch.Generator().manual_seed(7), num_samples=2)
    assert out.response_ids.tolist() == BEFORE_TOKENS


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_same_samples_as_the_cache_free_reference(arch, temperature):
    model = lively_model(**ARCHS[arch])
    ids, mask = left_padded_prompts()
    out = generate(model, ids, mask, 10, eos_id=-1, pad_id=PAD, temperature=temperature,
                   generator=torch.Generator().manual_seed(11))
    want_tokens, want_logps = sampling_reference(model, ids, mask, 10, temperature, torch.Generator().manual_seed(11))
    assert out.response_ids.tolist() == want_tokens.tolist()
    assert len(set(want_tokens.flatten().tolist())) > 8  # the samples vary, so a wrong logit would show
    torch.testing.assert_close(out.logps, want_logps, atol=1e-4, rtol=0)


@pytest.mark.parametrize("arch", ARCHS)
def test_packed_and_plain_generate_agree(arch):
    model = lively_model(**ARCHS[arch])
    ids, mask = left_padded_prompts()
    kw = dict(eos_id=-1, pad_id=PAD, temperature=1.0, num_samples=3)
    fast = generate(model, ids, mask, 10, generator=torch.Generator().manual_seed(5), **kw)
    plain = generate(model, ids, mask, 10, generator=torch.Generator().manual_seed(5), pack_weights=False, **kw)
    assert fast.response_ids.tolist() == plain.response_ids.tolist()
    torch.testing.assert_close(fast.logps, plain.logps, atol=1e-5, rtol=0)


@pytest.mark.parametrize("arch", ARCHS)
def test_packed_forward_equals_plain_forward(arch):
    model = lively_model(**ARCHS[arch])
    ids, mask = left_padded_prompts()
    with torch.no_grad():
        plain = model(ids, mask)
        with packed_weights(model, rows=ids.shape[0]):
            assert model.packed_head is not None  # the packs are in use
            packed = model(ids, mask)
    torch.testing.assert_close(packed, plain, atol=1e-4, rtol=1e-5)
    assert not torch.equal(packed, torch.zeros_like(packed))


def packs(model):
    names = ("packed_qkv", "packed_o", "packed_gate_up", "packed_down", "packed_head")
    return [getattr(m, n) for m in model.modules() for n in names if getattr(m, n, None) is not None]


def test_packs_are_dropped_on_exit_and_on_error():
    model = lively_model()
    ids, mask = left_padded_prompts()
    generate(model, ids, mask, 4, eos_id=-1, pad_id=PAD)
    assert packs(model) == []
    with pytest.raises(KeyError):
        with torch.no_grad(), packed_weights(model, rows=3):
            assert len(packs(model)) == 2 * 2 + 2 * 2 + 1  # 2 layers x (qkv, o, gate_up, down) + head
            raise KeyError("boom")
    assert packs(model) == []


def test_packs_refuse_autograd_and_training_still_works_after_sampling():
    model = lively_model()
    ids, mask = left_padded_prompts()
    with packed_weights(model, rows=3):
        with pytest.raises(RuntimeError, match="inference only"):
            model(ids, mask)  # grad enabled: a pack would silently cut the gradient
    generate(model, ids, mask, 4, eos_id=-1, pad_id=PAD)
    model.train()
    model(ids, mask).float().logsumexp(-1).mean().backward()
    q_grad = model.backbone.layers[0].attn.q_proj.weight.grad
    assert q_grad is not None and q_grad.abs().sum() > 0  # the projections got their gradients


def test_nothing_is_packed_where_packing_does_not_apply():
    model = lively_model().double()  # float64: oneDNN packing is float32 only
    with torch.no_grad(), packed_weights(model, rows=3):
        assert packs(model) == []

    class Wrapped(torch.nn.Linear):  # a projection that is not a plain nn.Linear (e.g. with adapters)
        pass

    model = lively_model()
    attn = model.backbone.layers[0].attn
    old = attn.q_proj
    attn.q_proj = Wrapped(old.in_features, old.out_features, bias=False)
    with torch.no_grad(), packed_weights(model, rows=3):
        assert attn.packed_qkv is None and model.backbone.layers[1].attn.packed_qkv is not None
        assert isinstance(model.backbone.layers[0].mlp, SwiGLU) and model.backbone.layers[0].mlp.packed_gate_up is not None


def test_packed_linear_matches_f_linear_with_fused_bias():
    g = torch.Generator().manual_seed(0)
    w1, w2 = torch.randn(5, 8, generator=g), torch.randn(3, 8, generator=g)
    b1 = torch.randn(5, generator=g)
    x = torch.randn(4, 2, 8, generator=g)
    with torch.no_grad():
        y = PackedLinear([w1, w2], [b1, None], rows=8)(x)  # a missing bias in a fused group counts as zeros
    want = torch.cat([F.linear(x, w1, b1), F.linear(x, w2)], -1)
    torch.testing.assert_close(y, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("shape,dtype", [((128, 640), torch.float32), ((3, 96), torch.float32), ((5, 50), torch.float64)])
def test_sample_categorical_is_torch_multinomial(shape, dtype):
    g = torch.Generator().manual_seed(4)
    probs = (torch.randn(shape, generator=g, dtype=dtype) * 3).softmax(-1)
    probs[:, : shape[1] // 3] = 0  # truncated tokens (top-k / top-p) are never drawn
    for seed in range(4):
        g1, g2 = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed)
        want = torch.multinomial(probs, 1, generator=g1).squeeze(-1)
        got = sample_categorical(probs, g2)
        assert got.tolist() == want.tolist()
        assert torch.equal(g1.get_state(), g2.get_state())  # the same draws consumed: later samples agree too
        assert (got >= shape[1] // 3).all()


def test_sample_categorical_refuses_nan_like_multinomial():
    probs = torch.full((2, 4), 0.25)
    probs[1, 2] = float("nan")
    with pytest.raises(RuntimeError, match="inf, nan or element < 0"):
        sample_categorical(probs, torch.Generator().manual_seed(0))
