"""Hugging Face checkpoints <-> minialign (minialign.models.hf_weights): logits and greedy-generation parity with
transformers on tiny random Llama / Qwen2 / Qwen3 models, export round trips, and refused configs.

The parity tests need transformers (a test-only dependency) and safetensors; without them they skip.
"""

import json

import pytest
import torch

from minialign.algorithms.generation import generate
from minialign.errors import UserError
from minialign.models.decoder import CausalLM, ModelConfig, ScalarModel, default_position_ids

PARITY_ATOL = 1e-5  # fp32 logits, max abs diff over real (non-pad) positions

# tiny configs: hidden 64, 2 layers, 4 heads, 2 kv heads (GQA), vocab 300
_BASE = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             intermediate_size=128, vocab_size=300, max_position_embeddings=128)
CASES = {
    "llama-untied": ("llama", dict(tie_word_embeddings=False, rope_theta=10000.0)),
    "llama-tied-bias": ("llama", dict(tie_word_embeddings=True, attention_bias=True, mlp_bias=True)),
    "llama-attn-bias-only": ("llama", dict(attention_bias=True, rms_norm_eps=1e-5)),
    "llama3-rope-scaling": ("llama", dict(tie_word_embeddings=True, rope_scaling=dict(
        rope_type="llama3", factor=4.0, low_freq_factor=1.0, high_freq_factor=4.0,
        original_max_position_embeddings=16))),
    "qwen2-tied": ("qwen2", dict(tie_word_embeddings=True, rope_theta=1e6)),
    "qwen2-untied": ("qwen2", dict(tie_word_embeddings=False)),
    "qwen3-head-dim": ("qwen3", dict(head_dim=24, tie_word_embeddings=True)),
}


def _transformers():
    pytest.importorskip("safetensors")
    return pytest.importorskip("transformers")


def make_hf_model(case: str, seed: int = 0):
    """A tiny random transformers model; every parameter (biases and norms too) perturbed off its init."""
    tf = _transformers()
    family, kw = CASES[case]
    config_cls = {"llama": tf.LlamaConfig, "qwen2": tf.Qwen2Config, "qwen3": tf.Qwen3Config}[family]
    torch.manual_seed(seed)
    model = tf.AutoModelForCausalLM.from_config(config_cls(**{**_BASE, **kw}), attn_implementation="eager")
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.float().eval()


def save_hf(model, folder, **kwargs):
    model.save_pretrained(folder, **kwargs)
    return folder


def left_padded_batch(lengths=(13, 7, 10), vocab=300, seed=1):
    g = torch.Generator().manual_seed(seed)
    T = max(lengths)
    ids = torch.randint(3, vocab, (len(lengths), T), generator=g)
    mask = torch.zeros(len(lengths), T, dtype=torch.bool)
    for b, n in enumerate(lengths):
        mask[b, T - n:] = True
    return ids.masked_fill(~mask, 0), mask


def hf_logits(hf_model, ids, mask):
    """HF forward with the positions our model uses for left padding (count of real tokens before)."""
    with torch.no_grad():
        return hf_model(input_ids=ids, attention_mask=mask.long(), position_ids=default_position_ids(mask)).logits


def max_diff(a, b, mask):
    return (a.float() - b.float())[mask].abs().max().item()


# ------------------------------------------------------------------------ config without transformers

def test_old_config_dicts_and_checkpoints_still_load():
    old = dict(vocab_size=96, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=0, max_seq_len=64,
               rope_theta=1e4, norm_eps=1e-5, dropout=0.0, qk_norm=False, n_experts=0, n_experts_per_tok=2,
               moe_aux_coef=0.01)  # a ModelConfig.to_dict() from before the HF switches
    cfg = ModelConfig.from_dict(old)
    assert (cfg.head_dim, cfg.tie_embeddings, cfg.qkv_bias, cfg.o_bias, cfg.mlp_bias) == (8, True, False, False, False)
    model = CausalLM(cfg)
    names = set(model.state_dict())
    assert not any(n.startswith("lm_head") or n.endswith(".bias") for n in names)  # same keys as before
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg


def test_new_switches_build_the_expected_parameters():
    cfg = ModelConfig(vocab_size=50, dim=32, n_layers=1, n_heads=4, n_kv_heads=2, head_dim=12, qkv_bias=True,
                      o_bias=True, mlp_bias=True, tie_embeddings=False)
    model = CausalLM(cfg)
    attn = model.backbone.layers[0].attn
    assert attn.q_proj.weight.shape == (48, 32) and attn.k_proj.weight.shape == (24, 32)
    assert attn.o_proj.weight.shape == (32, 48)
    assert torch.equal(attn.q_proj.bias, torch.zeros(48))  # biases start at 0
    assert model.backbone.layers[0].mlp.down_proj.bias is not None
    assert model.lm_head.weight.shape == (50, 32)
    assert model(torch.ones(1, 5, dtype=torch.long)).shape == (1, 5, 50)
    with pytest.raises(ValueError, match="rope_type 'llama3'"):
        ModelConfig(rope_scaling={"rope_type": "yarn", "factor": 2.0})


def test_is_hf_folder(tmp_path):
    from minialign.models import hf_weights

    assert not hf_weights.is_hf_folder(tmp_path / "nowhere")
    (tmp_path / "ours").mkdir()
    (tmp_path / "ours" / "config.json").write_text(json.dumps({"lr": 1e-3}))  # our run config, no model_type
    assert not hf_weights.is_hf_folder(tmp_path / "ours")
    (tmp_path / "ours" / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (tmp_path / "ours" / "ckpt.pt").write_bytes(b"")
    assert not hf_weights.is_hf_folder(tmp_path / "ours")  # a checkpoint folder wins
    (tmp_path / "ours" / "ckpt.pt").unlink()
    assert hf_weights.is_hf_folder(tmp_path / "ours")


# ------------------------------------------------------------------------------- logits parity

@pytest.mark.parametrize("case", sorted(CASES))
def test_logits_match_transformers_left_padded(case, tmp_path):
    from minialign.models import hf_weights

    ref = make_hf_model(case)
    ours = hf_weights.load_hf_model(save_hf(ref, tmp_path / case)).eval()
    assert ours.cfg.tie_embeddings == ref.config.tie_word_embeddings
    assert (ours.lm_head is None) == ours.cfg.tie_embeddings
    assert (ours.cfg.rope_scaling is not None) == ("rope_scaling" in CASES[case][1])  # really exercised
    ids, mask = left_padded_batch()
    with torch.no_grad():
        got = ours(ids, mask)
    diff = max_diff(got, hf_logits(ref, ids, mask), mask)
    print(f"\n{case}: logits max abs diff {diff:.2e}")
    assert diff <= PARITY_ATOL
    # unpadded rows without a mask take the SDPA causal fast path; same logits
    with torch.no_grad():
        full = ours(ids[:1])
        diff_full = max_diff(full, ref(input_ids=ids[:1]).logits, torch.ones(1, ids.shape[1], dtype=torch.bool))
    assert diff_full <= PARITY_ATOL


@pytest.mark.parametrize("case", ["llama-untied", "qwen2-tied", "qwen3-head-dim"])
def test_greedy_generation_matches_transformers(case, tmp_path):
    from minialign.models import hf_weights

    ref = make_hf_model(case, seed=3)
    ours = hf_weights.load_hf_model(save_hf(ref, tmp_path / case)).eval()
    ids, mask = left_padded_batch((9, 5, 7), seed=4)
    eos_id, pad_id, n_new = 7, 0, 12
    got = generate(ours, ids, mask, max_new_tokens=n_new, eos_id=eos_id, pad_id=pad_id, temperature=0.0)
    with torch.no_grad():
        out = ref.generate(input_ids=ids, attention_mask=mask.long(), max_new_tokens=n_new, do_sample=False,
                           eos_token_id=eos_id, pad_token_id=pad_id, top_k=None, top_p=None, temperature=None)
    want = out[:, ids.shape[1]:]
    assert got.response_ids.tolist() == want.tolist()


def test_scalar_kind_keeps_the_backbone_and_drops_an_untied_lm_head(tmp_path):
    from minialign.models import hf_weights
    from minialign.training import hf_export

    folder = save_hf(make_hf_model("qwen2-untied"), tmp_path / "m")
    causal = hf_weights.load_hf_model(folder)
    torch.manual_seed(5)
    scalar = hf_weights.load_hf_model(folder, kind="scalar")
    assert isinstance(scalar, ScalarModel) and not hasattr(scalar, "lm_head")
    for k, v in causal.backbone.state_dict().items():
        assert torch.equal(scalar.backbone.state_dict()[k], v), k
    assert torch.equal(scalar.score_head.bias, torch.zeros(1))
    ids, mask = left_padded_batch()
    assert scalar(ids, mask).shape == ids.shape
    with pytest.raises(ValueError, match="no LM head"):
        hf_export.export_hf(scalar, None, tmp_path / "out")


def test_bf16_on_disk_loads_into_fp32(tmp_path):
    from minialign.models import hf_weights

    tf = _transformers()
    ref = make_hf_model("llama-tied-bias").to(torch.bfloat16)
    folder = save_hf(ref, tmp_path / "bf16")
    ours = hf_weights.load_hf_model(folder, dtype=torch.float32).eval()
    assert all(p.dtype == torch.float32 for p in ours.parameters())
    ref32 = tf.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="eager").eval()
    ids, mask = left_padded_batch()
    with torch.no_grad():
        diff = max_diff(ours(ids, mask), hf_logits(ref32, ids, mask), mask)
    print(f"\nbf16 on disk -> fp32: logits max abs diff {diff:.2e}")
    assert diff <= PARITY_ATOL
    ours16 = hf_weights.load_hf_model(folder, dtype=torch.bfloat16)
    assert ours16.backbone.embed.weight.dtype == torch.bfloat16


def test_sharded_safetensors_load(tmp_path):
    from minialign.models import hf_weights

    ref = make_hf_model("qwen2-tied")
    folder = save_hf(ref, tmp_path / "sharded", max_shard_size="30KB")
    assert (folder / "model.safetensors.index.json").exists()
    ours = hf_weights.load_hf_model(folder).eval()
    ids, mask = left_padded_batch()
    with torch.no_grad():
        assert max_diff(ours(ids, mask), hf_logits(ref, ids, mask), mask) <= PARITY_ATOL


# ------------------------------------------------------------------------------------- refusals

@pytest.mark.parametrize("edit, key", [
    (dict(hidden_act="gelu"), "hidden_act"),
    (dict(attention_dropout=0.1), "attention_dropout"),
    (dict(rope_scaling={"rope_type": "yarn", "factor": 4.0}, rope_parameters=None), "rope_type 'yarn'"),
    (dict(rope_parameters={"rope_type": "linear", "rope_theta": 1e4, "factor": 2.0}), "rope_type 'linear'"),
    (dict(some_new_switch=True), "some_new_switch"),
    (dict(architectures=["MistralForCausalLM"]), "architectures"),
    (dict(model_type="gemma", architectures=None), "model_type"),
])
def test_unsupported_llama_config_keys_are_refused_by_name(edit, key, tmp_path):
    from minialign.models import hf_weights

    folder = save_hf(make_hf_model("llama-untied"), tmp_path / "m")
    cfg = json.loads((folder / "config.json").read_text())
    cfg.update(edit)
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=key):
        hf_weights.load_hf_model(folder)


def test_qwen2_sliding_window_is_refused(tmp_path):
    from minialign.models import hf_weights

    folder = save_hf(make_hf_model("qwen2-tied"), tmp_path / "m")
    cfg = json.loads((folder / "config.json").read_text())
    hf_weights.hf_to_model_config({**cfg, "use_sliding_window": True, "sliding_window": 8, "max_window_layers": 2,
                           "layer_types": None})  # window from layer 2 of 2: no layer slides, accepted
    with pytest.raises(ValueError, match="use_sliding_window"):
        hf_weights.hf_to_model_config({**cfg, "use_sliding_window": True, "sliding_window": 8, "max_window_layers": 0,
                               "layer_types": None})
    with pytest.raises(ValueError, match="sliding_attention"):
        hf_weights.hf_to_model_config({**cfg, "layer_types": ["full_attention", "sliding_attention"]})


def test_unknown_key_can_be_ignored_explicitly(tmp_path):
    from minialign.models import hf_weights

    folder = save_hf(make_hf_model("llama-untied"), tmp_path / "m")
    cfg = json.loads((folder / "config.json").read_text())
    cfg["my_metadata"] = "hello"
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="my_metadata"):
        hf_weights.load_hf_model(folder)
    assert hf_weights.load_hf_model(folder, ignore_keys=("my_metadata",)).cfg.dim == 64


def test_legacy_v4_config_keys_are_read(tmp_path):
    """transformers v4 wrote rope_theta / rope_scaling at the top level; v5 writes rope_parameters."""
    from minialign.models import hf_weights

    v4 = dict(architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=64, intermediate_size=128,
              num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=300, rope_theta=5e5,
              rope_scaling={"type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                            "original_max_position_embeddings": 64}, max_position_embeddings=256,
              torch_dtype="bfloat16", transformers_version="4.45.0", pretraining_tp=1, tie_word_embeddings=True)
    cfg = hf_weights.hf_to_model_config(v4)
    assert cfg.rope_theta == 5e5 and cfg.rope_scaling["factor"] == 8.0 and cfg.tie_embeddings
    assert hf_weights.hf_to_model_config({k: v for k, v in v4.items() if k != "rope_scaling"}).rope_scaling is None
    assert hf_weights.hf_to_model_config(v4, max_seq_len=100).max_seq_len == 100


# --------------------------------------------------------------------------------------- export

def _ours(seed=0, **overrides):
    torch.manual_seed(seed)
    cfg = ModelConfig(**{**dict(vocab_size=300, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=96,
                                max_seq_len=64, rope_theta=1e4), **overrides})
    model = CausalLM(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


EXPORT_CASES = {
    "default (tied, no bias) -> Llama": dict(),
    "qkv bias -> Qwen2": dict(qkv_bias=True, tie_embeddings=False),
    "all biases -> Llama attention_bias+mlp_bias": dict(qkv_bias=True, o_bias=True, mlp_bias=True),
    "qk_norm + head_dim -> Qwen3": dict(qk_norm=True, head_dim=24),
    "llama3 rope scaling": dict(rope_scaling=dict(rope_type="llama3", factor=4.0, low_freq_factor=1.0,
                                                  high_freq_factor=4.0, original_max_position_embeddings=16)),
}


@pytest.mark.parametrize("case", sorted(EXPORT_CASES))
def test_export_ours_to_transformers_same_logits(case, tmp_path):
    from minialign.models import hf_weights
    from minialign.training import hf_export

    tf = _transformers()
    ours = _ours(**EXPORT_CASES[case])
    out = hf_export.export_hf(ours, None, tmp_path / "out")
    ref = tf.AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager").float().eval()
    ids, mask = left_padded_batch()
    with torch.no_grad():
        diff = max_diff(ours(ids, mask), hf_logits(ref, ids, mask), mask)
    print(f"\nexport {case}: logits max abs diff {diff:.2e}")
    assert diff <= PARITY_ATOL
    again = hf_weights.load_hf_model(out)  # and back: identical weights and config
    assert again.cfg == ours.cfg
    for k, v in ours.state_dict().items():
        assert torch.equal(again.state_dict()[k], v), k


@pytest.mark.parametrize("case", ["llama-tied-bias", "qwen2-untied", "qwen3-head-dim"])
def test_hf_to_ours_to_export_to_transformers(case, tmp_path):
    from minialign.models import hf_weights
    from minialign.training import hf_export

    tf = _transformers()
    ref = make_hf_model(case)
    ours = hf_weights.load_hf_model(save_hf(ref, tmp_path / "in"))
    out = hf_export.export_hf(ours, None, tmp_path / "out")
    back = tf.AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager").float().eval()
    assert type(back) is type(ref)
    ids, mask = left_padded_batch()
    diff = max_diff(hf_logits(back, ids, mask), hf_logits(ref, ids, mask), mask)
    assert diff == 0.0  # the same weights in the same architecture


def test_moe_and_odd_bias_combinations_are_refused(tmp_path):
    from minialign.training import hf_export

    with pytest.raises(ValueError, match="mixture-of-experts"):
        hf_export.export_hf(_ours(n_experts=2), None, tmp_path / "a")
    with pytest.raises(ValueError, match="o_bias without qkv_bias"):
        hf_export.export_hf(_ours(o_bias=True), None, tmp_path / "b")


def test_cli_exports_checkpoint_with_our_tokenizer(tok, tmp_path):
    from minialign.training import hf_export

    tf = _transformers()
    ours = _ours(vocab_size=tok.vocab_size)
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    torch.save({"model": ours.state_dict(), "model_kind": "causal", "model_config": ours.cfg.to_dict()},
               ckpt / "ckpt.pt")
    (ckpt / "tokenizer.model").write_bytes(open(tok.path, "rb").read())
    hf_export.main(["--ckpt", str(ckpt), "--out", str(tmp_path / "out")])
    out = tmp_path / "out"
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "tokenizer.model"} <= names
    assert json.loads((out / "config.json").read_text())["eos_token_id"] == tok.im_end_id
    ref = tf.AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager").eval()
    hf_tok = tf.AutoTokenizer.from_pretrained(out)
    conv = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 12 + 30?"},
            {"role": "assistant", "content": "42, the answer. 你好"}]
    ids = tok.render_chat(conv)[0]
    got = hf_tok.apply_chat_template(conv, tokenize=True)
    assert list(got["input_ids"] if hasattr(got, "keys") else got) == ids
    x = torch.tensor([ids])
    with torch.no_grad():
        assert (ours(x) - ref(input_ids=x).logits).abs().max().item() <= PARITY_ATOL

    # a scalar checkpoint: tied embeddings -> the backbone exports as a causal LM; untied -> refused
    scalar = ScalarModel(ours.cfg)
    torch.save({"model": scalar.state_dict(), "model_kind": "scalar", "model_config": scalar.cfg.to_dict()},
               ckpt / "ckpt.pt")
    hf_export.main(["--ckpt", str(ckpt / "ckpt.pt"), "--out", str(tmp_path / "rm")])
    assert (tmp_path / "rm" / "model.safetensors").exists()
    untied = ScalarModel(ModelConfig.from_dict({**ours.cfg.to_dict(), "tie_embeddings": False}))
    torch.save({"model": untied.state_dict(), "model_kind": "scalar", "model_config": untied.cfg.to_dict()},
               ckpt / "ckpt.pt")
    with pytest.raises(UserError, match="no LM head"):
        hf_export.main(["--ckpt", str(ckpt), "--out", str(tmp_path / "rm2")])
