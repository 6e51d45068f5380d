"""A MiniMind-style decoder-only transformer, small enough to read in one sitting.

Architecture (the Llama / Qwen / MiniMind family):
    token embedding (tied to the output head by default; `tie_embeddings=False` gives a separate lm_head)
    n_layers x [ x = x + Attn(RMSNorm(x));  x = x + MLP(RMSNorm(x)) ]      (pre-norm residual)
    final RMSNorm -> logits = h @ E^T
  - Attention: grouped-query attention (n_kv_heads <= n_heads) through F.scaled_dot_product_attention,
    rotary position embeddings (RoPE, "rotate-half" convention as in HF Llama, configurable theta),
    optional QK-norm (RMSNorm over each head's q and k before RoPE, as in Qwen3).
  - MLP: SwiGLU, down(silu(gate(x)) * up(x)); or a mixture of experts of SwiGLUs with top-k routing.
  - No biases by default; dropout 0 by default (RLHF needs deterministic log-probs, STYLE.md principle 10).
  - Switches that exist only so Hugging Face Llama / Qwen2 / Qwen3 checkpoints load exactly (minialign.models.hf_weights):
    qkv_bias (Qwen2), o_bias and mlp_bias (Llama's attention_bias / mlp_bias), head_dim != dim / n_heads,
    tie_embeddings=False, rope_scaling={"rope_type": "llama3", ...} (Llama 3.1+ frequency rescaling).

Padding and positions. `attention_mask` is boolean, True = a real token. Position ids default to the
count of real tokens before each position, so a left-padded row gets exactly the positions (and hence
the logits) of the same row unpadded. A (B, T, T) boolean mask may be given instead of (B, T) for
packed layouts (e.g. DPO's shared-prompt row); then `position_ids` must be given too.

KV cache. `KVCache` preallocates (n_layers, B, n_kv_heads, max_len, head_dim) keys and values and a
(B, max_len) key-validity mask; a forward with `kv_cache=` writes the new keys at the cache's current
length and attends over everything cached so far. Used by `minialign.algorithms.generation`.

Two heads share one `Backbone`:
  - `CausalLM`: next-token logits (B, T, V) for pretraining, SFT, DPO, PPO/GRPO policies.
  - `ScalarModel`: a score per position (B, T) for reward and value models; `last_token_scores`
    reads the sequence score at the last real token.

Simplified on purpose: no sliding window, no YaRN / linear / dynamic rope scaling (only "llama3"), MoE
experts computed with a plain loop over experts (fine at this size; a grouped GEMM would be the GPU-scale
choice).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint


@dataclass
class ModelConfig:
    vocab_size: int = 6400
    dim: int = 512
    n_layers: int = 8
    n_heads: int = 8
    n_kv_heads: int = 2
    hidden_dim: int = 0  # SwiGLU width; 0 = MiniMind's rule: 8/3 * dim rounded up to a multiple of 64
    max_seq_len: int = 512
    rope_theta: float = 1e6
    norm_eps: float = 1e-5
    dropout: float = 0.0
    qk_norm: bool = False
    # mixture of experts (off by default)
    n_experts: int = 0  # 0 = dense SwiGLU MLP
    n_experts_per_tok: int = 2
    moe_aux_coef: float = 0.01  # weight of the load-balancing loss (Switch Transformer, Fedus et al. 2021, Eq. 4)
    # switches for Hugging Face checkpoints (minialign.models.hf_weights); the defaults are the original minialign model
    head_dim: int = 0  # per-head width; 0 = dim // n_heads
    qkv_bias: bool = False  # biases on q/k/v projections (Qwen2; Llama with attention_bias)
    o_bias: bool = False  # bias on the attention output projection (Llama with attention_bias)
    mlp_bias: bool = False  # biases on gate/up/down projections (Llama with mlp_bias)
    tie_embeddings: bool = True  # output head = embedding matrix; False = a separate lm_head
    rope_scaling: dict | None = None  # None, or {"rope_type": "llama3", "factor", "low_freq_factor", ...}

    def __post_init__(self):
        if self.hidden_dim == 0:
            self.hidden_dim = 64 * math.ceil(int(8 * self.dim / 3) / 64)
        if self.n_heads % self.n_kv_heads or (self.head_dim == 0 and self.dim % self.n_heads):
            raise ValueError(f"dim ({self.dim}) must divide by n_heads ({self.n_heads}) and n_heads by n_kv_heads "
                             f"({self.n_kv_heads})")
        if self.head_dim == 0:
            self.head_dim = self.dim // self.n_heads
        if self.head_dim % 2:
            raise ValueError(f"head_dim ({self.head_dim}) must be even for rotary embeddings")
        if self.rope_scaling is not None and self.rope_scaling.get("rope_type") != "llama3":
            raise ValueError(f"rope_scaling must be None or of rope_type 'llama3', got {self.rope_scaling}")
        if self.n_experts and not 1 <= self.n_experts_per_tok <= self.n_experts:
            raise ValueError(f"n_experts_per_tok must be in [1, n_experts={self.n_experts}], "
                             f"got {self.n_experts_per_tok}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        names = {f.name for f in fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown model config keys: {sorted(unknown)}")
        return cls(**d)


# Named presets. "cpu" is sized so the whole default pipeline (SFT, RM, DPO, PPO, GRPO) fits in minutes
# on a 2-core laptop CPU; "minimind-26m" matches MiniMind2-small (25.8M parameters with vocab 6400).
PRESETS = {
    "cpu": dict(dim=128, n_layers=4, n_heads=4, n_kv_heads=2, max_seq_len=128, rope_theta=1e4),
    "minimind-26m": dict(dim=512, n_layers=8, n_heads=8, n_kv_heads=2, vocab_size=6400, max_seq_len=512,
                         rope_theta=1e6),
    "minimind-moe": dict(dim=512, n_layers=8, n_heads=8, n_kv_heads=2, vocab_size=6400, max_seq_len=512,
                         rope_theta=1e6, n_experts=4, n_experts_per_tok=2),
    # GPT-2 small's shape (Radford et al. 2019: 768 wide, 12 layers, 12 heads, 1024 positions) in this decoder's
    # architecture (RoPE, RMSNorm, SwiGLU, no GQA); for the IMDb experiment on a GPU (--model_preset gpt2-small)
    "gpt2-small": dict(dim=768, n_layers=12, n_heads=12, n_kv_heads=12, max_seq_len=1024, rope_theta=1e4),
}


def model_config(preset: str, **overrides) -> ModelConfig:
    if preset not in PRESETS:
        raise ValueError(f"unknown model preset {preset!r}; choose one of {sorted(PRESETS)}")
    return ModelConfig(**{**PRESETS[preset], **overrides})


class _UpcastLinear(torch.autograd.Function):
    """x W^T + b for a frozen W stored in a lower precision than x: W upcast for the matmul, and only the stored W
    kept for the backward (grad_x = grad_y W), upcast again there, so no full-precision copy outlives one matmul."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(weight)
        return F.linear(x, weight.to(x.dtype), None if bias is None else bias.to(x.dtype))

    @staticmethod
    def backward(ctx, grad_y):
        (weight,) = ctx.saved_tensors
        return grad_y @ weight.to(grad_y.dtype), None, None  # frozen: no gradient for the weight or bias


def linear(x, weight, bias=None):
    """F.linear(x, weight, bias), also for a FROZEN weight stored in a lower precision than the activations x (a
    LoRA base kept in bf16, minialign.models.lora): it is upcast to x's dtype for this one matmul (exact: every
    bf16 value is a float32 value), so activations and sums stay float32; under autocast F.linear casts as usual."""
    if weight.dtype == x.dtype or torch.is_autocast_enabled(x.device.type):
        return F.linear(x, weight, bias)
    if weight.requires_grad or (bias is not None and bias.requires_grad):
        raise TypeError(f"a trainable {weight.dtype} weight under {x.dtype} activations: only a frozen one is upcast")
    return _UpcastLinear.apply(x, weight, bias)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # normalize in at least float32 whatever the autocast dtype (float64 stays float64), then cast back
        dtype = torch.promote_types(x.dtype, torch.float32)
        return F.rms_norm(x.to(dtype), (x.shape[-1],), self.weight.to(dtype), self.eps).type_as(x)


def llama3_inv_freq(inv_freq, factor: float, low_freq_factor: float, high_freq_factor: float,
                    original_max_position_embeddings: int, **_):
    """Llama 3.1 RoPE frequency rescaling (as HF `_compute_llama3_parameters`), per frequency f_i:
    wavelength w_i = 2 pi / f_i, L = original context, w_lo = L / low_freq_factor, w_hi = L / high_freq_factor;
      w_i < w_hi: f_i unchanged;   w_i > w_lo: f_i / factor;
      otherwise: (1 - s) f_i / factor + s f_i,  s = (L / w_i - low_freq_factor) / (high_freq_factor - low_freq_factor).
    """
    wavelen = 2 * math.pi / inv_freq
    low_wavelen = original_max_position_embeddings / low_freq_factor
    high_wavelen = original_max_position_embeddings / high_freq_factor
    s = (original_max_position_embeddings / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smoothed = (1 - s) * inv_freq / factor + s * inv_freq
    out = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(medium, smoothed, out)


def rope_tables(head_dim: int, max_len: int, theta: float, scaling: dict | None = None):
    """cos/sin tables (max_len, head_dim) for rotate-half RoPE (Su et al. 2021, Eq. 34)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    if scaling is not None:
        inv_freq = llama3_inv_freq(inv_freq, **{k: v for k, v in scaling.items() if k != "rope_type"})
    angles = torch.outer(torch.arange(max_len, dtype=torch.float64), inv_freq)  # (L, hd/2)
    angles = torch.cat([angles, angles], dim=-1)  # (L, hd)
    return angles.cos().float(), angles.sin().float()


def apply_rope(x, cos, sin):
    """x (B, H, T, hd); cos, sin (B, 1, T, hd). Rotates pairs (i, i + hd/2) by the position angle."""
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return x * cos + rotated * sin


class KVCache:
    """Preallocated keys/values for incremental decoding. `length` = number of positions filled."""

    def __init__(self, cfg: ModelConfig, batch_size: int, max_len: int, device, dtype):
        shape = (cfg.n_layers, batch_size, cfg.n_kv_heads, max_len, cfg.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.key_mask = torch.zeros(batch_size, max_len, dtype=torch.bool, device=device)
        self.length = 0
        self.max_len = max_len

    def repeat_rows(self, n: int):
        """Each row becomes n consecutive rows: a prompt prefilled once serves n samples."""
        self.k = self.k.repeat_interleave(n, dim=1)
        self.v = self.v.repeat_interleave(n, dim=1)
        self.key_mask = self.key_mask.repeat_interleave(n, dim=0)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.dim, cfg.n_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=cfg.o_bias)
        self.q_norm = RMSNorm(cfg.head_dim, cfg.norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(cfg.head_dim, cfg.norm_eps) if cfg.qk_norm else None
        self.dropout = cfg.dropout
        self.packed_qkv = self.packed_o = None  # set only while sampling on CPU (minialign.models.packed_linear)

    def forward(self, x, cos, sin, attn_mask, kv_cache: KVCache | None):
        B, T, _ = x.shape
        if self.packed_qkv is not None:
            q, k, v = self.packed_qkv(x).split(self.packed_qkv.sizes, dim=-1)
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        q = q.view(B, T, self.n_heads, self.head_dim)
        k = k.view(B, T, self.n_kv_heads, self.head_dim)
        v = v.view(B, T, self.n_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H, T, hd)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if kv_cache is not None:
            start = kv_cache.length
            kv_cache.k[self.layer_idx, :, :, start : start + T] = k
            kv_cache.v[self.layer_idx, :, :, start : start + T] = v
            k = kv_cache.k[self.layer_idx, :, :, : start + T]
            v = kv_cache.v[self.layer_idx, :, :, : start + T]
        if kv_cache is not None and T == 1 and not self.training:
            # one decode step: the n_heads / n_kv_heads query heads that share a KV head are at the same position,
            # so they go through SDPA as that KV head's queries (no GQA expansion; ~1.7x faster on CPU)
            g = self.n_heads // self.n_kv_heads
            y = F.scaled_dot_product_attention(q.view(B, self.n_kv_heads, g, self.head_dim), k, v, attn_mask=attn_mask)
            y = y.reshape(B, 1, -1)  # query head h = kv_head * g + j, as enable_gqa's grouping
        else:
            y = F.scaled_dot_product_attention(
                q, k, v,
                attn_mask=attn_mask,  # bool, True = may attend; None = plain causal
                is_causal=attn_mask is None,
                dropout_p=self.dropout if self.training else 0.0,
                enable_gqa=self.n_kv_heads != self.n_heads,
            ).transpose(1, 2).reshape(B, T, -1)  # (B, T, H * hd)
        return self.o_proj(y) if self.packed_o is None else self.packed_o(y)


class SwiGLU(nn.Module):
    def __init__(self, dim: int, hidden_dim: int, bias: bool = False):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden_dim, bias=bias)
        self.up_proj = nn.Linear(dim, hidden_dim, bias=bias)
        self.down_proj = nn.Linear(hidden_dim, dim, bias=bias)
        self.packed_gate_up = self.packed_down = None  # set only while sampling on CPU (minialign.models.packed_linear)

    def forward(self, x):
        if self.packed_gate_up is None:
            return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
        gate, up = self.packed_gate_up(x).chunk(2, dim=-1)
        return self.packed_down(F.silu(gate) * up)


class MoE(nn.Module):
    """Top-k mixture of SwiGLU experts (Shazeer et al. 2017; load balancing as in Switch, Fedus et al. 2021).

    Each token's output is sum over its top-k experts of p_e * expert_e(x), with p renormalized over the
    top-k when k > 1 (with k = 1 the renormalized p would be the constant 1, so top-1 keeps the raw
    probability, as in Switch, Eq. 2). Because p multiplies the expert output, the router gets gradient
    from the task loss, not only from the auxiliary loss. aux_loss = E * sum_e f_e * P_e, where f_e is
    the fraction of routed slots sent to expert e and P_e the mean router probability of e; it is 1 at
    perfect balance.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.top_k = cfg.n_experts_per_tok
        self.router = nn.Linear(cfg.dim, cfg.n_experts, bias=False)
        self.experts = nn.ModuleList(SwiGLU(cfg.dim, cfg.hidden_dim, cfg.mlp_bias) for _ in range(cfg.n_experts))
        self.aux_loss = torch.zeros(())

    def forward(self, x):
        B, T, C = x.shape
        flat = x.reshape(-1, C)  # (N, C)
        probs = F.softmax(self.router(flat).float(), dim=-1)  # (N, E)
        top_p, top_idx = probs.topk(self.top_k, dim=-1)  # (N, k)
        if self.top_k > 1:
            top_p = top_p / top_p.sum(-1, keepdim=True)
        out = torch.zeros_like(flat)
        for e, expert in enumerate(self.experts):
            token_idx, slot = (top_idx == e).nonzero(as_tuple=True)
            if token_idx.numel():
                out.index_add_(0, token_idx, expert(flat[token_idx]) * top_p[token_idx, slot, None].to(flat.dtype))
        n_experts = probs.shape[-1]
        routed_frac = F.one_hot(top_idx, n_experts).float().sum((0, 1)) / top_idx.numel()  # f_e
        self.aux_loss = n_experts * (routed_frac * probs.mean(0)).sum()
        return out.view(B, T, C)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attn = Attention(cfg, layer_idx)
        self.mlp_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.mlp = MoE(cfg) if cfg.n_experts else SwiGLU(cfg.dim, cfg.hidden_dim, cfg.mlp_bias)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x, cos, sin, attn_mask, kv_cache):
        x = x + self.drop(self.attn(self.attn_norm(x), cos, sin, attn_mask, kv_cache))
        return x + self.drop(self.mlp(self.mlp_norm(x)))


def default_position_ids(attention_mask):
    """Positions that skip padding: (B, T) bool -> (B, T) long, 0 at each row's first real token."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


class Backbone(nn.Module):
    """Embedding + blocks + final norm; returns hidden states (B, T, dim).

    gradient_checkpointing (set by minialign.training.runtime.wrap_ddp for --gradient_checkpointing): in a
    training forward that builds a graph and uses no KV cache, each block runs under torch.utils.checkpoint
    (non-reentrant): only its input is kept, and its activations are recomputed in the backward. Same
    gradients (the recompute replays the RNG state, so dropout agrees), about n_layers x fewer saved
    activations, one extra forward of the blocks per backward.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.gradient_checkpointing = False
        self.embed = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.drop = nn.Dropout(cfg.dropout)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        cos, sin = rope_tables(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta, cfg.rope_scaling)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    def forward(self, input_ids, attention_mask=None, position_ids=None, kv_cache: KVCache | None = None):
        B, T = input_ids.shape
        past = kv_cache.length if kv_cache is not None else 0
        if attention_mask is not None and attention_mask.dtype != torch.bool:
            raise TypeError(f"attention_mask must be torch.bool (True = real token), got {attention_mask.dtype}")
        if attention_mask is not None and attention_mask.dim() == 3:
            if position_ids is None or kv_cache is not None:
                raise ValueError("a (B, T, T) attention_mask needs explicit position_ids and no kv_cache")
            attn_mask = attention_mask[:, None]  # (B, 1, T, T)
        elif attention_mask is None and kv_cache is None:
            attn_mask = None  # plain causal: SDPA's fast path
            if position_ids is None:
                position_ids = torch.arange(T, device=input_ids.device).expand(B, T)
        else:
            if attention_mask is None:
                attention_mask = torch.ones(B, T, dtype=torch.bool, device=input_ids.device)
            if kv_cache is not None:
                if past + T > kv_cache.max_len:
                    raise ValueError(f"KV cache holds {kv_cache.max_len} positions; {past} + {T} requested")
                kv_cache.key_mask[:, past : past + T] = attention_mask
                key_mask = kv_cache.key_mask[:, : past + T]  # (B, S)
                if position_ids is None:
                    position_ids = default_position_ids(key_mask)[:, past:]
            else:
                key_mask = attention_mask
                if position_ids is None:
                    position_ids = default_position_ids(attention_mask)
            S = past + T
            if kv_cache is not None and T == 1:
                # a decode step: the one new query is causally after every key, and it always sees itself
                attn_mask = key_mask.clone()
                attn_mask[:, -1] = True
                attn_mask = attn_mask[:, None, None]  # (B, 1, 1, S)
            else:
                causal = torch.ones(T, S, dtype=torch.bool, device=input_ids.device).tril(diagonal=past)
                attn_mask = causal[None] & key_mask[:, None, :]  # (B, T, S)
                # a query at a pad position would see no key at all (SDPA -> NaN); let it see itself.
                # Its output is never used: pads are masked out of every loss.
                diag = (torch.arange(S, device=input_ids.device)[None, :]
                        == torch.arange(past, past + T, device=input_ids.device)[:, None])
                attn_mask = (attn_mask | diag[None])[:, None]  # (B, 1, T, S)
        if int(position_ids.max()) >= self.cfg.max_seq_len:
            raise ValueError(f"position {int(position_ids.max())} exceeds max_seq_len={self.cfg.max_seq_len}")
        cos = self.rope_cos[position_ids][:, None]  # (B, 1, T, hd)
        sin = self.rope_sin[position_ids][:, None]
        x = self.drop(self.embed(input_ids).to(self.act_dtype))  # (B, T, dim); a bf16 embedding upcast exactly
        recompute = self.gradient_checkpointing and self.training and torch.is_grad_enabled() and kv_cache is None
        for layer in self.layers:
            if recompute:
                x = torch.utils.checkpoint.checkpoint(layer, x, cos, sin, attn_mask, None, use_reentrant=False)
            else:
                x = layer(x, cos, sin, attn_mask, kv_cache)
        if kv_cache is not None:
            kv_cache.length += T
        return self.norm(x)

    @property
    def act_dtype(self) -> torch.dtype:
        """The activations' dtype outside autocast: the RoPE tables' (float32; float64 after .double()), also when
        the frozen weights are stored in bf16 (minialign.models.lora's --lora_base_dtype)."""
        return self.rope_cos.dtype

    def moe_aux_loss(self):
        """Sum of the MoE load-balancing losses of the last forward (0 for a dense model)."""
        losses = [layer.mlp.aux_loss for layer in self.layers if isinstance(layer.mlp, MoE)]
        return sum(losses) if losses else torch.zeros((), device=self.embed.weight.device)


def _init_weights(model: nn.Module, n_layers: int):
    for name, p in model.named_parameters():
        if p.dim() >= 2:
            # GPT-2 init: N(0, 0.02), residual output projections scaled by 1/sqrt(2 * n_layers)
            std = 0.02 / math.sqrt(2 * n_layers) if name.endswith(("o_proj.weight", "down_proj.weight")) else 0.02
            nn.init.normal_(p, mean=0.0, std=std)
        elif name.endswith(".bias"):
            nn.init.zeros_(p)  # the optional projection biases (qkv_bias, o_bias, mlp_bias) start at 0


class CausalLM(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.backbone = Backbone(cfg)
        self.lm_head = None if cfg.tie_embeddings else nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        self.packed_head = None  # set only while sampling on CPU (minialign.models.packed_linear)
        _init_weights(self, cfg.n_layers)

    def forward(self, input_ids, attention_mask=None, position_ids=None, kv_cache=None, logits_to_keep: int = 0,
                logits_mask=None):
        """input_ids (B, T) -> logits (B, T, V).

        The output head is the transposed embedding (tied weights), or lm_head with tie_embeddings=False.
        Two ways to skip positions whose logits nobody needs (the head and the log-softmax are a large share
        of a small model's work):
          logits_to_keep=N  -> (B, N, V): only the last N positions (generation, response log-probs);
          logits_mask (B, T) bool -> (M, V): only the M True positions, in row-major order (SFT: the
          trained tokens). Going through forward (not the backbone directly) keeps DDP's hooks.
        """
        h = self.backbone(input_ids, attention_mask, position_ids, kv_cache)  # (B, T, dim)
        if logits_to_keep:
            h = h[:, -logits_to_keep:]
        if logits_mask is not None:
            h = h[logits_mask]  # (M, dim)
        if self.packed_head is not None:
            return self.packed_head(h)
        head = self.backbone.embed.weight if self.lm_head is None else self.lm_head.weight  # (V, dim)
        return linear(h, head)  # (B, T, V) or (M, V)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())


class ScalarModel(nn.Module):
    """Backbone + linear score head: a score per position (B, T). For reward and value models."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.backbone = Backbone(cfg)
        self.score_head = nn.Linear(cfg.dim, 1)
        _init_weights(self, cfg.n_layers)
        nn.init.normal_(self.score_head.weight, std=1.0 / math.sqrt(cfg.dim + 1))
        nn.init.zeros_(self.score_head.bias)

    def forward(self, input_ids, attention_mask=None, position_ids=None):
        h = self.backbone(input_ids, attention_mask, position_ids)
        return self.score_head(h).squeeze(-1).float()  # (B, T)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())


def last_token_index(mask):
    """Index of the last True in each row of a (B, T) bool mask (works for left and right padding)."""
    T = mask.shape[-1]
    if not bool(mask.any(-1).all()):
        raise ValueError("every row needs at least one real token")
    return T - 1 - mask.flip(-1).int().argmax(-1)


def last_token_scores(scores, mask):
    """scores (B, T), mask (B, T) bool -> (B,): the score at each row's last real token."""
    return scores.gather(-1, last_token_index(mask)[:, None]).squeeze(-1)
