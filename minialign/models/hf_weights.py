"""Hugging Face checkpoints in and out: Llama / Qwen2 / Qwen3 folders <-> minialign's CausalLM and ScalarModel.

Reading (`load_hf_model`): config.json is translated key by key into a `ModelConfig`; every key that
changes the forward pass is either mapped or refused with an error naming it (a rope_scaling type we
lack, sliding-window attention, a hidden_act other than silu, attention_dropout != 0, ...). Keys that
only describe metadata, generation defaults or token ids are ignored; any other key is refused too, so
an unknown switch never silently gives a different model (pass `ignore_keys=` once you have checked
that it does not change the math). Weights come from model.safetensors or a sharded
model.safetensors.index.json, in whatever dtype is on disk (bf16 is common), and are cast to `dtype`.

config.json -> ModelConfig:
    vocab_size -> vocab_size            hidden_size -> dim               intermediate_size -> hidden_dim
    num_hidden_layers -> n_layers       num_attention_heads -> n_heads   num_key_value_heads -> n_kv_heads
    head_dim -> head_dim                max_position_embeddings -> max_seq_len (or the max_seq_len argument)
    rms_norm_eps -> norm_eps            rope_theta (or rope_parameters.rope_theta) -> rope_theta
    rope_scaling / rope_parameters of rope_type "llama3" -> rope_scaling (others refused)
    tie_word_embeddings -> tie_embeddings
    Llama: attention_bias -> qkv_bias and o_bias; mlp_bias -> mlp_bias
    Qwen2: qkv_bias = True, o_bias = False (hard-wired in HF's Qwen2Attention)
    Qwen3: attention_bias -> qkv_bias and o_bias; qk_norm = True
Missing keys take the defaults of transformers' LlamaConfig / Qwen2Config / Qwen3Config (`_DEFAULTS`).

Parameter names, HF -> ours ({i} = layer index; the same table read backwards by `export_hf`):
    model.embed_tokens.weight                          -> backbone.embed.weight
    model.layers.{i}.input_layernorm.weight            -> backbone.layers.{i}.attn_norm.weight
    model.layers.{i}.self_attn.{q,k,v,o}_proj.{weight,bias}  -> backbone.layers.{i}.attn.{q,k,v,o}_proj.*
    model.layers.{i}.self_attn.{q,k}_norm.weight       -> backbone.layers.{i}.attn.{q,k}_norm.weight (Qwen3)
    model.layers.{i}.post_attention_layernorm.weight   -> backbone.layers.{i}.mlp_norm.weight
    model.layers.{i}.mlp.{gate,up,down}_proj.{weight,bias}  -> backbone.layers.{i}.mlp.{gate,up,down}_proj.*
    model.norm.weight                                  -> backbone.norm.weight
    lm_head.weight                                     -> lm_head.weight (untied only; tied: the embedding)
No tensor is transposed or permuted: both sides use nn.Linear (out, in) weights and the same
rotate-half RoPE (q/k rows are NOT interleaved as in Meta's original Llama release).
kind="scalar" builds a ScalarModel: the same backbone plus a fresh score head (a reward or value
model started from a chat model); an untied lm_head is then dropped.

Numerics: our RoPE tables are computed in float64 and rounded once, HF's in float32; fp32 logits agree
to ~1e-6 (measured on tiny random models: <= 7e-7 at 13 positions, 1.5e-6 at positions 3072-4096; a
random SmolLM2-135M-shaped model: 1.8e-6), and greedy decoding gives the same tokens.

Writing (`export_hf`, `python -m minialign.training.hf_export --ckpt out/dpo --out out/dpo_hf`): config.json
(LlamaForCausalLM, Qwen2ForCausalLM or Qwen3ForCausalLM, whichever holds our switches exactly; MoE
models are refused) + model.safetensors, loadable by transformers.AutoModelForCausalLM with the same
logits; plus the tokenizer: an HF tokenizer folder's files are copied; our sentencepiece
tokenizer.model is converted by `minialign.data.hf_tokenizer.write_hf_tokenizer` (see there for what
round-trips). Dropout is not exported (HF Llama has none outside attention; eval logits are equal).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from minialign.models.decoder import CausalLM, ModelConfig, ScalarModel

ARCHITECTURES = {"LlamaForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2", "Qwen3ForCausalLM": "qwen3"}

# transformers' defaults for keys a config.json may omit (LlamaConfig / Qwen2Config / Qwen3Config, v4 and v5)
_COMMON_DEFAULTS = dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                        num_attention_heads=32, num_key_value_heads=None, head_dim=None, hidden_act="silu",
                        rms_norm_eps=1e-6, rope_theta=10000.0, tie_word_embeddings=False, attention_dropout=0.0)
_DEFAULTS = {
    "llama": {**_COMMON_DEFAULTS, "max_position_embeddings": 2048, "attention_bias": False, "mlp_bias": False},
    "qwen2": {**_COMMON_DEFAULTS, "vocab_size": 151936, "intermediate_size": 22016, "max_position_embeddings": 32768,
              "use_sliding_window": False, "sliding_window": None, "max_window_layers": 28},
    "qwen3": {**_COMMON_DEFAULTS, "vocab_size": 151936, "intermediate_size": 22016, "max_position_embeddings": 32768,
              "head_dim": 128, "attention_bias": False, "use_sliding_window": False, "sliding_window": None,
              "max_window_layers": 28},
}

# keys that never change the forward pass: metadata, token ids, generation and initialization defaults
_IGNORED = {
    "architectures", "model_type", "transformers_version", "_name_or_path", "torch_dtype", "dtype", "use_cache",
    "bos_token_id", "eos_token_id", "pad_token_id", "sep_token_id", "decoder_start_token_id", "initializer_range",
    "pretraining_tp",  # Llama: the same matmul split into slices; equal math
    "rope_interleaved",  # written by nanotron (SmolLM2); transformers ignores it and uses rotate-half
    "is_llama_config", "transformers.js_config", "auto_map", "tokenizer_class", "id2label", "label2id",
    "return_dict", "output_hidden_states", "output_attentions", "torchscript", "use_bfloat16", "tf_legacy_loss",
    "chunk_size_feed_forward", "is_encoder_decoder", "is_decoder", "add_cross_attention", "tie_encoder_decoder",
    "problem_type", "finetuning_task", "prefix", "task_specific_params", "pruned_heads", "cross_attention_hidden_size",
    "max_length", "min_length", "do_sample", "early_stopping", "num_beams", "num_beam_groups", "diversity_penalty",
    "temperature", "top_k", "top_p", "typical_p", "repetition_penalty", "length_penalty", "no_repeat_ngram_size",
    "encoder_no_repeat_ngram_size", "bad_words_ids", "num_return_sequences", "output_scores", "return_dict_in_generate",
    "forced_bos_token_id", "forced_eos_token_id", "remove_invalid_values", "exponential_decay_length_penalty",
    "suppress_tokens", "begin_suppress_tokens", "attn_implementation", "_attn_implementation_autoset",
}


def is_hf_folder(path) -> bool:
    """True for a folder holding an HF model (config.json with a model_type or architectures), not our checkpoint."""
    p = Path(path)
    if not p.is_dir() or (p / "ckpt.pt").exists() or not (p / "config.json").exists():
        return False
    try:
        cfg = json.loads((p / "config.json").read_text())
    except json.JSONDecodeError:
        return False
    return isinstance(cfg, dict) and ("model_type" in cfg or "architectures" in cfg)


def _model_type(hf: dict) -> str:
    archs = hf.get("architectures") or []
    for a in archs:
        if a not in ARCHITECTURES:
            raise ValueError(f"config.json architectures {archs}: only {sorted(ARCHITECTURES)} are supported")
    model_type = hf.get("model_type") or (ARCHITECTURES[archs[0]] if archs else None)
    if model_type not in _DEFAULTS:
        raise ValueError(f"config.json model_type {model_type!r}: only {sorted(_DEFAULTS)} are supported")
    return model_type


def _rope(hf: dict, max_position_embeddings: int) -> tuple[float, dict | None]:
    """(rope_theta, rope_scaling) from either the v4 keys (rope_theta, rope_scaling) or v5's rope_parameters."""
    params = dict(hf.get("rope_parameters") or {})
    legacy = dict(hf.get("rope_scaling") or {})
    if params and legacy and any(params.get(k, v) != v for k, v in legacy.items() if k not in ("type", "rope_type")):
        raise ValueError(f"config.json has both rope_parameters {params} and rope_scaling {legacy}, and they differ")
    params = {**legacy, **params}
    if any(isinstance(v, dict) for v in params.values()):
        raise ValueError(f"config.json rope_parameters per layer type {sorted(params)} are not supported")
    theta = float(params.pop("rope_theta", None) or hf.get("rope_theta") or 10000.0)
    rope_type = params.pop("rope_type", None) or params.pop("type", None) or "default"
    params.pop("type", None)
    partial = params.pop("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0))
    if partial not in (None, 1.0):
        raise ValueError(f"config.json partial_rotary_factor={partial} is not supported (only full rotary)")
    if rope_type == "default":
        if params:
            raise ValueError(f"config.json rope parameters {sorted(params)} are not supported with rope_type 'default'")
        return theta, None
    if rope_type != "llama3":
        raise ValueError(f"config.json rope_scaling / rope_parameters rope_type {rope_type!r} is not supported "
                         "(only 'default' and 'llama3')")
    scaling = {"rope_type": "llama3", "original_max_position_embeddings": max_position_embeddings}
    for k in ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"):
        if k in params:
            scaling[k] = params.pop(k)
    if params.get("attention_factor", 1.0) in (None, 1.0):  # llama3 never rescales the attention logits
        params.pop("attention_factor", None)
    missing = {"factor", "low_freq_factor", "high_freq_factor"} - set(scaling)
    if missing or params:
        raise ValueError(f"config.json llama3 rope_scaling: missing {sorted(missing)}, not understood {sorted(params)}")
    return theta, scaling


def hf_to_model_config(hf: dict, max_seq_len: int | None = None, ignore_keys=()) -> ModelConfig:
    """An HF config.json dict -> ModelConfig (see the module docstring's table); refuses what we cannot run."""
    model_type = _model_type(hf)
    known = set(_DEFAULTS[model_type]) | {"rope_scaling", "rope_parameters", "partial_rotary_factor", "layer_types"}
    unknown = sorted(set(hf) - known - _IGNORED - set(ignore_keys))
    if unknown:
        raise ValueError(f"config.json keys {unknown} are not understood by minialign.models.hf_weights for model_type "
                         f"{model_type!r}; if they do not change the forward pass, pass ignore_keys=")
    c = {**_DEFAULTS[model_type], **{k: v for k, v in hf.items() if v is not None or k not in _DEFAULTS[model_type]}}
    if c["hidden_act"] != "silu":
        raise ValueError(f"config.json hidden_act={c['hidden_act']!r} is not supported (only 'silu': SwiGLU)")
    if c["attention_dropout"]:
        raise ValueError(f"config.json attention_dropout={c['attention_dropout']} is not supported (only 0)")
    if c.get("layer_types") is not None:  # v5 writes each layer's kind; it overrides use_sliding_window
        if set(c["layer_types"]) != {"full_attention"}:
            raise ValueError(f"config.json layer_types {sorted(set(c['layer_types']))}: only 'full_attention' is "
                             "supported (no sliding-window attention)")
    elif c.get("use_sliding_window") and c.get("sliding_window") is not None:
        # Qwen2/3 slide only in layers i >= max_window_layers (transformers' Qwen2Config.__post_init__)
        if c["max_window_layers"] < c["num_hidden_layers"]:
            raise ValueError("config.json use_sliding_window=true: sliding-window attention is not supported")
    theta, scaling = _rope(c, c["max_position_embeddings"])
    if model_type == "qwen2":
        qkv_bias, o_bias, mlp_bias, qk_norm = True, False, False, False
    else:
        qkv_bias = o_bias = bool(c["attention_bias"])
        mlp_bias, qk_norm = bool(c.get("mlp_bias", False)), model_type == "qwen3"
    return ModelConfig(
        vocab_size=c["vocab_size"], dim=c["hidden_size"], n_layers=c["num_hidden_layers"],
        n_heads=c["num_attention_heads"], n_kv_heads=c["num_key_value_heads"] or c["num_attention_heads"],
        hidden_dim=c["intermediate_size"], head_dim=c["head_dim"] or c["hidden_size"] // c["num_attention_heads"],
        max_seq_len=max_seq_len or c["max_position_embeddings"], rope_theta=theta, rope_scaling=scaling,
        norm_eps=c["rms_norm_eps"], dropout=0.0, qk_norm=qk_norm, qkv_bias=qkv_bias, o_bias=o_bias,
        mlp_bias=mlp_bias, tie_embeddings=bool(c["tie_word_embeddings"]),
    )


# (ours, HF) substrings, applied in order; see the module docstring's table
_RENAMES = [
    ("backbone.embed.", "model.embed_tokens."),
    ("backbone.norm.", "model.norm."),
    ("backbone.layers.", "model.layers."),
    (".attn_norm.", ".input_layernorm."),
    (".mlp_norm.", ".post_attention_layernorm."),
    (".attn.", ".self_attn."),
]


def hf_name(ours: str) -> str:
    """Our parameter name -> the HF Llama/Qwen name, e.g. backbone.layers.0.attn.q_proj.weight ->
    model.layers.0.self_attn.q_proj.weight."""
    for a, b in _RENAMES:
        ours = ours.replace(a, b)
    return ours


def read_hf_state_dict(folder, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """All tensors of model.safetensors or of the shards listed in model.safetensors.index.json, cast to dtype."""
    from safetensors.torch import load_file

    folder = Path(folder)
    index = folder / "model.safetensors.index.json"
    if index.exists():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (folder / "model.safetensors").exists():
        files = ["model.safetensors"]
    else:
        raise FileNotFoundError(f"{folder} has no model.safetensors or model.safetensors.index.json "
                                "(pytorch_model.bin checkpoints are not supported: convert them to safetensors)")
    state = {}
    for f in files:
        for k, v in load_file(folder / f).items():
            state[k] = v.to(dtype) if dtype is not None else v
    return state


def load_hf_model(folder, kind: str = "causal", dtype: torch.dtype = torch.float32, max_seq_len: int | None = None,
                  ignore_keys=()):
    """An HF Llama/Qwen2/Qwen3 folder -> CausalLM (kind="causal") or ScalarModel with a fresh head ("scalar").

    max_seq_len: cap the RoPE table (default: max_position_embeddings, which can be 128k rows for Llama 3).
    """
    if kind not in ("causal", "scalar"):
        raise ValueError(f"kind must be 'causal' or 'scalar', got {kind!r}")
    folder = Path(folder)
    cfg = hf_to_model_config(json.loads((folder / "config.json").read_text()), max_seq_len, ignore_keys)
    model = CausalLM(cfg) if kind == "causal" else ScalarModel(cfg)
    hf_state = read_hf_state_dict(folder, dtype=torch.float32)
    state, missing = {}, []
    for name in model.state_dict():
        if name.startswith("score_head."):
            continue  # a fresh head: kept from ScalarModel's init
        key = hf_name(name)
        if key in hf_state:
            state[name] = hf_state.pop(key)
        else:
            missing.append(key)
    hf_state = {k: v for k, v in hf_state.items() if not k.endswith("rotary_emb.inv_freq")}  # old checkpoints
    if cfg.tie_embeddings or kind == "scalar":
        hf_state.pop("lm_head.weight", None)  # tied: HF ignores it too; scalar: no LM head
    if missing or hf_state:
        raise ValueError(f"{folder} does not fit a {kind} model of its config.json: missing {missing}, "
                         f"unexpected {sorted(hf_state)}")
    model.load_state_dict(state, strict=False)
    return model.to(dtype)


def model_config_to_hf(cfg: ModelConfig) -> dict:
    """ModelConfig -> an HF config.json dict for the one architecture that holds our switches exactly."""
    if cfg.n_experts:
        raise ValueError("a mixture-of-experts model (n_experts > 0) has no Hugging Face equivalent here")
    hf = {}
    if cfg.qk_norm:
        if cfg.qkv_bias != cfg.o_bias or cfg.mlp_bias:
            raise ValueError("qk_norm exports as Qwen3, which needs qkv_bias == o_bias and no mlp_bias")
        arch, model_type, hf["attention_bias"] = "Qwen3ForCausalLM", "qwen3", cfg.qkv_bias
    elif cfg.qkv_bias and not cfg.o_bias and not cfg.mlp_bias:
        arch, model_type = "Qwen2ForCausalLM", "qwen2"
    elif cfg.qkv_bias == cfg.o_bias:
        arch, model_type = "LlamaForCausalLM", "llama"
        hf.update(attention_bias=cfg.qkv_bias, mlp_bias=cfg.mlp_bias)
    else:
        raise ValueError("o_bias without qkv_bias matches no Hugging Face architecture")
    if model_type != "llama":
        hf.update(use_sliding_window=False, sliding_window=None)
    return {
        "architectures": [arch], "model_type": model_type, "vocab_size": cfg.vocab_size, "hidden_size": cfg.dim,
        "intermediate_size": cfg.hidden_dim, "num_hidden_layers": cfg.n_layers, "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads, "head_dim": cfg.head_dim, "hidden_act": "silu",
        "max_position_embeddings": cfg.max_seq_len, "rms_norm_eps": cfg.norm_eps, "rope_theta": cfg.rope_theta,
        "rope_scaling": dict(cfg.rope_scaling) if cfg.rope_scaling else None, "attention_dropout": 0.0,
        "tie_word_embeddings": cfg.tie_embeddings, **hf,
    }


