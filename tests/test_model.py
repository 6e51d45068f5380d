"""Tests for minialign.models.decoder: causality, KV cache, padding invariance, packed masks, MoE routing,
presets and config validation, the scalar head, and loading a causal checkpoint as a scalar model."""

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from conftest import ARCHS, tiny_config, tiny_model

from minialign.models.decoder import (CausalLM, KVCache, ModelConfig, MoE, RMSNorm, ScalarModel, last_token_index,
                                      last_token_scores, model_config)
from minialign.training import checkpoint, runtime

V = 96  # vocabulary of the tiny models


def left_pad(rows, pad_id=0):
    """list of 1-D id tensors -> left-padded ids (B, T) and mask (B, T) bool."""
    T = max(len(r) for r in rows)
    ids = torch.full((len(rows), T), pad_id, dtype=torch.long)
    mask = torch.zeros(len(rows), T, dtype=torch.bool)
    for b, r in enumerate(rows):
        ids[b, T - len(r):] = r
        mask[b, T - len(r):] = True
    return ids, mask


def random_rows(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, V, (n,), generator=g) for n in lengths]


# ------------------------------------------------------------------------------------- causality

@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("use_mask", [False, True], ids=["no_mask", "mask"])
def test_future_tokens_do_not_change_past_logits(arch, use_mask):
    model = tiny_model(**ARCHS[arch])
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, V, (2, 12), generator=g)
    t = 5
    changed_future = ids.clone()
    changed_future[:, t + 1:] = torch.randint(1, V, (2, 12 - t - 1), generator=g)
    changed_now = ids.clone()
    changed_now[:, t] = (ids[:, t] % (V - 1)) + 1  # a different, non-pad token at position t
    assert (changed_now[:, t] != ids[:, t]).all()
    mask = torch.ones_like(ids, dtype=torch.bool) if use_mask else None
    with torch.no_grad():
        base = model(ids, mask)
        future = model(changed_future, mask)
        now = model(changed_now, mask)
    torch.testing.assert_close(future[:, : t + 1], base[:, : t + 1], atol=1e-6, rtol=0)
    # the positive control: the test would notice a change, and position t sees token t
    assert (now[:, t] - base[:, t]).abs().max() > 1e-3
    torch.testing.assert_close(now[:, :t], base[:, :t], atol=1e-6, rtol=0)


# -------------------------------------------------------------------------------------- KV cache

@pytest.mark.parametrize("arch", ARCHS)
def test_kv_cache_prefill_then_steps_matches_full_forward(arch):
    model = tiny_model(**ARCHS[arch])
    # left-padded prompts with 0, 2 and 5 pads, then 4 new tokens per row
    P, n_new = 9, 4
    prompts, prompt_mask = left_pad(random_rows([9, 7, 4], seed=2))
    new = torch.randint(1, V, (3, n_new), generator=torch.Generator().manual_seed(3))
    ids = torch.cat([prompts, new], 1)  # (B, P + n_new)
    mask = torch.cat([prompt_mask, torch.ones(3, n_new, dtype=torch.bool)], 1)
    with torch.no_grad():
        full = model(ids, mask)  # (B, T, V)
        cache = KVCache(model.cfg, 3, P + n_new, "cpu", torch.float32)
        steps = [model(prompts, prompt_mask, kv_cache=cache)]
        for t in range(P, P + n_new):
            steps.append(model(ids[:, t : t + 1], mask[:, t : t + 1], kv_cache=cache))
    cached = torch.cat(steps, 1)
    assert cache.length == P + n_new
    assert cached.shape == full.shape
    torch.testing.assert_close(cached[mask], full[mask], atol=1e-5, rtol=0)


def test_kv_cache_overflow_raises():
    model = tiny_model()
    cache = KVCache(model.cfg, 1, 4, "cpu", torch.float32)
    with torch.no_grad():
        model(torch.ones(1, 3, dtype=torch.long), kv_cache=cache)
        with pytest.raises(ValueError, match="KV cache holds 4"):
            model(torch.ones(1, 2, dtype=torch.long), kv_cache=cache)


# ------------------------------------------------------------------------------ padding invariance

@pytest.mark.parametrize("arch", ARCHS)
def test_left_padded_rows_match_unpadded_runs(arch):
    model = tiny_model(**ARCHS[arch])
    rows = random_rows([10, 6, 3], seed=4)
    ids, mask = left_pad(rows)
    with torch.no_grad():
        batch = model(ids, mask)
        for b, r in enumerate(rows):
            alone = model(r[None])[0]  # (L, V), plain causal path, positions 0..L-1
            torch.testing.assert_close(batch[b, mask[b]], alone, atol=1e-5, rtol=0)


@pytest.mark.parametrize("arch", ARCHS)
def test_right_padded_rows_without_mask_match_unpadded_runs(arch):
    model = tiny_model(**ARCHS[arch])
    rows = random_rows([10, 6, 3], seed=5)
    ids = torch.zeros(3, 10, dtype=torch.long)
    for b, r in enumerate(rows):
        ids[b, : len(r)] = r
    with torch.no_grad():
        batch = model(ids)  # no mask: a real token never sees a later pad
        for b, r in enumerate(rows):
            torch.testing.assert_close(batch[b, : len(r)], model(r[None])[0], atol=1e-5, rtol=0)


def test_non_bool_attention_mask_is_refused():
    model = tiny_model()
    with pytest.raises(TypeError, match="torch.bool"):
        model(torch.ones(1, 3, dtype=torch.long), torch.ones(1, 3, dtype=torch.long))


# ------------------------------------------------------------------------------------ numerics

def test_rms_norm_keeps_float64_and_upcasts_bf16():
    norm = RMSNorm(8, eps=1e-5).double()
    with torch.no_grad():
        norm.weight.copy_(torch.linspace(0.5, 2.0, 8))
    x = torch.randn(3, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    want = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * norm.weight  # float64 reference
    out = norm(x)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, want, atol=1e-14, rtol=0)  # a float32 round trip errs by ~1e-7
    out16 = norm.float()(x.to(torch.bfloat16))
    assert out16.dtype == torch.bfloat16
    torch.testing.assert_close(out16.double(), want, atol=2e-2, rtol=1e-2)


# ------------------------------------------------------------------------------------ (B, T, T) mask

def test_full_causal_3d_mask_matches_standard_forward():
    model = tiny_model()
    ids = torch.randint(1, V, (2, 8), generator=torch.Generator().manual_seed(6))
    mask3 = torch.ones(8, 8, dtype=torch.bool).tril().expand(2, 8, 8)
    pos = torch.arange(8).expand(2, 8)
    with torch.no_grad():
        torch.testing.assert_close(model(ids, mask3, pos), model(ids), atol=1e-6, rtol=0)


def test_3d_mask_packs_two_sequences_in_one_row():
    model = tiny_model(qk_norm=True)
    a, b = random_rows([5, 4], seed=7)
    packed = torch.cat([a, b])[None]  # (1, 9)
    mask3 = torch.zeros(9, 9, dtype=torch.bool)
    mask3[:5, :5] = torch.ones(5, 5, dtype=torch.bool).tril()  # block-diagonal causal
    mask3[5:, 5:] = torch.ones(4, 4, dtype=torch.bool).tril()
    pos = torch.tensor([[0, 1, 2, 3, 4, 0, 1, 2, 3]])  # positions restart with each sequence
    with torch.no_grad():
        out = model(packed, mask3[None], pos)[0]
        torch.testing.assert_close(out[:5], model(a[None])[0], atol=1e-5, rtol=0)
        torch.testing.assert_close(out[5:], model(b[None])[0], atol=1e-5, rtol=0)


def test_3d_mask_requires_position_ids():
    model = tiny_model()
    mask3 = torch.ones(1, 4, 4, dtype=torch.bool).tril()
    with pytest.raises(ValueError, match="position_ids"):
        model(torch.ones(1, 4, dtype=torch.long), mask3)


# ------------------------------------------------------------------------------------------- MoE

@pytest.mark.parametrize("top_k", [1, 2])
def test_moe_router_gets_gradient_from_task_loss_alone(top_k):
    # no auxiliary loss anywhere: only the next-token cross-entropy is backpropagated
    model = tiny_model(n_experts=4, n_experts_per_tok=top_k, moe_aux_coef=0.0).train()
    ids = torch.randint(1, V, (2, 10), generator=torch.Generator().manual_seed(8))
    logits = model(ids[:, :-1])
    F.cross_entropy(logits.reshape(-1, V), ids[:, 1:].reshape(-1)).backward()
    for layer in model.backbone.layers:
        grad = layer.mlp.router.weight.grad
        assert grad is not None and grad.abs().max() > 1e-8


def test_moe_aux_loss_is_one_under_uniform_router():
    # zero router weights -> every probability 1/E -> E * sum_e f_e * (1/E) = sum_e f_e = 1, whatever
    # way topk breaks the ties
    model = tiny_model(n_experts=4, n_experts_per_tok=2)
    for layer in model.backbone.layers:
        torch.nn.init.zeros_(layer.mlp.router.weight)
    with torch.no_grad():
        model(torch.randint(1, V, (2, 7), generator=torch.Generator().manual_seed(9)))
    for layer in model.backbone.layers:
        assert layer.mlp.aux_loss.item() == pytest.approx(1.0, abs=1e-6)
    assert model.backbone.moe_aux_loss().item() == pytest.approx(2.0, abs=1e-6)  # summed over 2 layers


def test_moe_aux_loss_collapsed_routing_hand_computed():
    # every token routed to expert 0 with top-1: f = (1, 0, 0, 0) and P_0 = e^s / (e^s + 3) where
    # s = router logit of expert 0 = 10 (router row 0 = 10/dim * ones, x = ones) and the others are 0.
    # aux = E * f_0 * P_0 = 4 * e^10 / (e^10 + 3) ~= 3.99946, near the maximum E = 4.
    cfg = tiny_config(n_experts=4, n_experts_per_tok=1)
    moe = MoE(cfg)
    with torch.no_grad():
        moe.router.weight.zero_()
        moe.router.weight[0] = 10.0 / cfg.dim
        moe(torch.ones(2, 3, cfg.dim))
    p0 = torch.tensor(10.0).exp() / (torch.tensor(10.0).exp() + 3)
    assert moe.aux_loss.item() == pytest.approx(4 * p0.item(), rel=1e-6)


def test_moe_aux_loss_changes_with_routing_and_is_finite():
    model = tiny_model(n_experts=4, n_experts_per_tok=2)
    ids = torch.randint(1, V, (2, 7), generator=torch.Generator().manual_seed(10))
    with torch.no_grad():
        model(ids)
        before = model.backbone.moe_aux_loss().item()
        model.backbone.layers[0].mlp.router.weight.mul_(50.0)  # sharper routing
        model(ids)
        after = model.backbone.moe_aux_loss().item()
    assert torch.isfinite(torch.tensor([before, after])).all() and before > 0
    assert abs(after - before) > 1e-3


def test_dense_model_aux_loss_is_zero():
    assert tiny_model().backbone.moe_aux_loss().item() == 0.0


# --------------------------------------------------------------------------- presets and validation

def test_minimind_26m_preset_size():
    cfg = model_config("minimind-26m")
    assert cfg.hidden_dim == 1408  # 8/3 * 512 = 1365 -> next multiple of 64
    with torch.device("meta"):
        n = CausalLM(cfg).num_params()
    # 6400 * 512 embedding (tied) + 8 layers * (655,360 attention + 2,162,688 MLP + 1,024 norms) + 512
    assert n == 6400 * 512 + 8 * (655_360 + 2_162_688 + 1_024) + 512
    assert abs(n - 25.8e6) < 0.1e6


def test_unknown_preset_raises():
    with pytest.raises(ValueError, match="unknown model preset"):
        model_config("gpt-5")


@pytest.mark.parametrize("overrides", [
    dict(dim=65, n_heads=4),  # dim not divisible by heads
    dict(n_heads=4, n_kv_heads=3),  # heads not divisible by kv heads
    dict(dim=12, n_heads=4, n_kv_heads=2),  # odd head_dim: no RoPE pairs
    dict(n_experts=2, n_experts_per_tok=3),
    dict(n_experts=2, n_experts_per_tok=0),
])
def test_bad_dims_raise(overrides):
    with pytest.raises(ValueError):
        tiny_config(**overrides)


def test_config_dict_round_trip_and_unknown_key():
    cfg = tiny_config(qk_norm=True)
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="unknown model config keys"):
        ModelConfig.from_dict({**cfg.to_dict(), "n_expert": 4})


def test_position_beyond_max_seq_len_raises():
    model = tiny_model(max_seq_len=8)
    with pytest.raises(ValueError, match="max_seq_len"):
        model(torch.ones(1, 9, dtype=torch.long))


# ------------------------------------------------------------------------------------ scalar model

def test_last_token_index_and_scores_hand_built():
    scores = torch.arange(15, dtype=torch.float32).view(3, 5)
    mask = torch.tensor([
        [False, False, True, True, True],  # left-padded: last real at 4 -> 4.0
        [True, True, True, False, False],  # right-padded: last real at 2 -> 7.0
        [True, False, False, False, False],  # one token: index 0 -> 10.0
    ])
    assert last_token_index(mask).tolist() == [4, 2, 0]
    assert last_token_scores(scores, mask).tolist() == [4.0, 7.0, 10.0]


def test_last_token_index_raises_on_empty_row():
    with pytest.raises(ValueError, match="at least one real token"):
        last_token_index(torch.tensor([[True, False], [False, False]]))


def test_scalar_model_is_deterministic_and_padding_invariant():
    assert ModelConfig().dropout == 0.0
    torch.manual_seed(0)
    model = ScalarModel(tiny_config())
    rows = random_rows([6, 3], seed=11)
    ids, mask = left_pad(rows)
    with torch.no_grad():
        model.train()  # dropout 0: even train mode is deterministic
        torch.testing.assert_close(model(ids, mask), model(ids, mask), atol=0, rtol=0)
        model.eval()
        scores = model(ids, mask)  # (B, T) float32
        seq_scores = last_token_scores(scores, mask)
        for b, r in enumerate(rows):
            assert seq_scores[b].item() == pytest.approx(model(r[None])[0, -1].item(), abs=1e-5)
    assert scores.shape == (2, 6) and scores.dtype == torch.float32


def test_load_causal_checkpoint_as_scalar_model(tmp_path):
    @dataclasses.dataclass
    class Cfg:
        lr: float = 1e-3

    causal = tiny_model(seed=12)
    optimizer = torch.optim.SGD(causal.parameters(), lr=0.1)
    scaler = runtime.Runtime(torch.device("cpu"), torch.float32).make_scaler()
    checkpoint.save(tmp_path, model=causal, optimizer=optimizer, scaler=scaler, step=3, cfg=Cfg(), tokenizer_path=None)

    torch.manual_seed(99)  # the fresh head comes from this seed, not from the checkpoint
    scalar = checkpoint.load_model(tmp_path, kind="scalar")
    assert isinstance(scalar, ScalarModel)
    want = causal.backbone.state_dict()
    got = scalar.backbone.state_dict()
    assert want.keys() == got.keys()
    for k in want:
        assert torch.equal(got[k], want[k]), k
    assert torch.equal(scalar.score_head.bias, torch.zeros(1))
    assert scalar.score_head.weight.shape == (1, causal.cfg.dim) and scalar.score_head.weight.abs().sum() > 0

    again = checkpoint.load_model(tmp_path, kind="causal")
    for k, v in causal.state_dict().items():
        assert torch.equal(again.state_dict()[k], v), k

    # a scalar checkpoint does not silently load as a causal LM (the score head would be dropped)
    (tmp_path / "rm").mkdir()
    checkpoint.save(tmp_path / "rm", model=scalar, optimizer=None, scaler=None, step=0, cfg=Cfg(), tokenizer_path=None)
    with pytest.raises(ValueError, match="does not fit a causal model"):
        checkpoint.load_model(tmp_path / "rm", kind="causal")


def test_logits_mask_and_logits_to_keep_select_the_full_logits():
    """The head-skipping paths return exactly the full forward's logits at the kept positions."""
    torch.manual_seed(0)
    model = CausalLM(model_config("cpu", vocab_size=97, dim=32, n_layers=2, n_heads=4, n_kv_heads=2)).eval()
    ids = torch.randint(0, 97, (3, 9))
    mask = torch.rand(3, 9) > 0.5
    full = model(ids)  # (3, 9, 97)
    torch.testing.assert_close(model(ids, logits_mask=mask), full[mask])
    torch.testing.assert_close(model(ids, logits_to_keep=4), full[:, -4:])
    assert model(ids, logits_mask=mask).shape == (int(mask.sum()), 97)
