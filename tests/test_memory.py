"""Past one GPU's memory: --gradient_checkpointing gives the gradients of a plain backward, and the memory plan's
arithmetic (minialign.training.memory) adds up by hand. Peak memory itself is measured in bench/bench_memory.py,
not here (a timed or memory-measuring test on a shared CPU would be flaky)."""

import pytest
import torch
from conftest import ARCHS, tiny_config

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


# ------------------------------------------------------------------------------------- the memory plan

from minialign.models import lora  # noqa: E402
from minialign.training import memory  # noqa: E402


@pytest.mark.parametrize("overrides", [{}, {"qk_norm": True}, {"n_experts": 4, "n_experts_per_tok": 2},
                                       {"qkv_bias": True, "o_bias": True, "mlp_bias": True, "tie_embeddings": False}])
def test_the_plan_counts_parameters_as_the_model_is_built(overrides):
    cfg = tiny_config(**overrides)
    assert memory.count_params(cfg) == CausalLM(cfg).num_params()
    assert memory.count_params(cfg, scalar=True) == ScalarModel(cfg).num_params()
    model = lora.apply_lora(CausalLM(cfg), r=4, alpha=8.0)
    assert memory.lora_params(cfg, 4) == sum(p.numel() for p in model.parameters() if p.requires_grad)


def test_qwen25_shapes_have_their_published_sizes():
    """0.49B, 1.54B, 7.62B parameters (the model cards' totals, embeddings included)."""
    sizes = {k: memory.count_params(memory.resolve_model(k)) for k in memory.QWEN25}
    assert round(sizes["qwen2.5-0.5b"] / 1e9, 2) == 0.49
    assert round(sizes["qwen2.5-1.5b"] / 1e9, 2) == 1.54
    assert round(sizes["qwen2.5-7b"] / 1e9, 2) == 7.62


def test_the_plan_adds_up_by_hand():
    """A model of P = 1000 parameters would be awkward to build; take the tiny config and check each line:
    DDP fp32 SFT = 16 P (weights 4 + grads 4 + AdamW 8) + activations; DPO adds a 4 P reference; FSDP over 4
    divides the first four by 4; LoRA keeps 4 P of weights and puts grads and AdamW on the adapters only; a LoRA
    DPO has no reference (adapters off)."""
    cfg = tiny_config()
    P = memory.count_params(cfg)
    sft = memory.plan(cfg, "sft", dtype="fp32", micro_batch=2, seq_len=16)
    assert (sft.weights, sft.gradients, sft.adamw, sft.autocast, sft.frozen) == (4 * P, 4 * P, 8 * P, 0, 0)
    d, hd, V, I = cfg.dim, cfg.head_dim, cfg.vocab_size, cfg.hidden_dim
    per_layer = 8 * d + 4 * (2 * d + 4 * 4 * hd + 3 * 2 * hd + 4 * I)  # H = 4, H_kv = 2, fp32
    assert sft.activations == 2 * 16 * (cfg.n_layers * per_layer + 12 * V)
    ckpt = memory.plan(cfg, "sft", dtype="fp32", micro_batch=2, seq_len=16, gradient_checkpointing=True)
    assert ckpt.activations == 2 * 16 * (cfg.n_layers * 4 * d + per_layer + 12 * V) < sft.activations
    dpo = memory.plan(cfg, "dpo", dtype="fp32", micro_batch=2, seq_len=16)
    assert dpo.frozen == 4 * P and dpo.total == sft.total + 4 * P
    sharded = memory.plan(cfg, "dpo", world_size=4, fsdp=True, dtype="fp32", micro_batch=2, seq_len=16)
    assert (sharded.weights, sharded.gradients, sharded.adamw, sharded.frozen) == (P, P, 2 * P, 4 * P)  # ref whole
    sharded = memory.plan(cfg, "dpo", world_size=4, fsdp=True, dtype="fp32", micro_batch=2, seq_len=16,
                          shard_frozen=True)
    assert (sharded.frozen, sharded.ddp_buckets) == (P, 0)
    ddp = memory.plan(cfg, "dpo", world_size=4, dtype="fp32", micro_batch=2, seq_len=16)  # + the reducer's buckets
    assert ddp.ddp_buckets == 4 * P and ddp.total == dpo.total + 4 * P and dpo.ddp_buckets == 0
    A = memory.lora_params(cfg, 8)
    lo = memory.plan(cfg, "dpo", lora_r=8, dtype="fp32", micro_batch=2, seq_len=16)
    assert (lo.weights, lo.gradients, lo.adamw, lo.frozen) == (4 * (P + A), 4 * A, 8 * A, 0)
    ppo = memory.plan(cfg, "ppo", dtype="fp32", micro_batch=2, seq_len=16)  # policy + value trained, ref + RM frozen
    assert (ppo.weights, ppo.frozen, ppo.activations) == (8 * P, 8 * P, 2 * sft.activations)
    bf16 = memory.plan(cfg, "sft", dtype="bf16", micro_batch=2, seq_len=16)
    assert bf16.autocast == 2 * P


def test_the_plan_prints(capsys):
    memory.main(["--model", "cpu", "--stage", "grpo", "--world_size", "2", "--fsdp", "--gradient_checkpointing"])
    out = capsys.readouterr().out
    assert "total" in out and "FSDP" in out and "KV cache" in out
    memory.main(["--table"])
    assert capsys.readouterr().out.count("| qwen2.5-") == 3 * 4 * 2


def test_a_bf16_lora_base_counts_two_bytes_per_frozen_parameter():
    """--lora_base_dtype bf16: weights 2 P (the frozen base) + 4 A (the fp32 adapters) instead of 4 P + 4 A;
    gradients and AdamW unchanged (4 A, 8 A). Under bf16 autocast the base is not cast again: the autocast line
    drops from 2 P to 2 A. In fp32 (no autocast) it holds the one weight upcast at a time: the largest of the
    tiny model's V x d = 96 x 64, I x d = 192 x 64 and (H hd) x d = 64 x 64 is the MLP's, 4 * 192 * 64 bytes."""
    cfg = tiny_config()
    P, A = memory.count_params(cfg), memory.lora_params(cfg, 8)
    fp32 = memory.plan(cfg, "dpo", lora_r=8, dtype="fp32", micro_batch=2, seq_len=16)
    bf16 = memory.plan(cfg, "dpo", lora_r=8, dtype="fp32", micro_batch=2, seq_len=16, lora_base_dtype="bf16")
    assert (bf16.weights, bf16.gradients, bf16.adamw, bf16.frozen) == (2 * P + 4 * A, 4 * A, 8 * A, 0)
    assert (fp32.weights, fp32.autocast) == (4 * P + 4 * A, 0) and bf16.autocast == 4 * 192 * 64
    assert fp32.total - bf16.total == 2 * P - 4 * 192 * 64
    auto = memory.plan(cfg, "dpo", lora_r=8, dtype="bf16", micro_batch=2, seq_len=16, lora_base_dtype="bf16")
    assert auto.autocast == 2 * A and memory.plan(cfg, "dpo", lora_r=8, dtype="bf16").autocast == 2 * P
    ppo = memory.plan(cfg, "ppo", lora_r=8, dtype="fp32", micro_batch=2, seq_len=16, lora_base_dtype="bf16")
    assert (ppo.weights, ppo.frozen) == (2 * 2 * P + 4 * 2 * A, 4 * P)  # policy + value bases; the RM stays fp32
    with pytest.raises(ValueError, match="bf16 with lora_r > 0"):
        memory.plan(cfg, "sft", lora_base_dtype="bf16")


def test_the_plan_cli_takes_the_lora_base_dtype(capsys):
    memory.main(["--model", "cpu", "--stage", "dpo", "--lora_r", "8", "--lora_base_dtype", "bf16"])
    assert "LoRA r 8, bf16 base" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        memory.main(["--model", "cpu", "--stage", "dpo", "--lora_base_dtype", "bf16"])
    assert "--lora_base_dtype bf16 needs --lora_r" in capsys.readouterr().err
