"""A memory plan: the bytes per rank a training stage needs, before anyone rents a GPU.

    python -m minialign.training.memory --model qwen2.5-1.5b --stage dpo --world_size 8 --fsdp
    python -m minialign.training.memory --model path/to/config.json --stage grpo --lora_r 16
    python -m minialign.training.memory --model qwen2.5-7b --stage dpo --lora_r 16 --lora_base_dtype bf16
    python -m minialign.training.memory --table            # the README's what-fits table

Notation: P = parameters of one model (its ModelConfig, counted exactly as minialign.models.decoder builds it),
P_t = trained parameters (P, or the LoRA adapters), W = world size, S = 1 with DDP (every rank holds a full copy),
W with --fsdp (fully_shard: parameters, gradients and optimizer state split over the ranks), N = tokens of one
micro-batch (micro_batch rows x seq_len), a = bytes of an activation (2 under bf16 / fp16 autocast, 4 in fp32).

    weights      4 P / S                     fp32 master weights of the trained model(s); with LoRA the frozen
                                             base, b P (b = 4, or 2 with --lora_base_dtype bf16), + 4 P_t
    gradients    4 P_t / S                   fp32, one per trained parameter
    adamw        8 P_t / S                   exp_avg and exp_avg_sq, fp32
    autocast     2 P_t                       bf16 copies of the trained weights that autocast caches for the
                                             backward (bf16 / fp16 only; with FSDP the gathered copies of about
                                             two blocks instead: 2 * 4 * P_block); LoRA with an fp32 base: 2 P
                                             (the base is cast too), with a bf16 base: 2 P_t (used as it is).
                                             A bf16 base without autocast: 4 d max(V, I, H hd), the one weight
                                             upcast at a time (minialign.models.decoder.linear), the head's
    frozen       4 P_frozen / S_f            reference (DPO, KTO, PPO, GRPO with beta > 0), reward model (PPO);
                                             S_f = W with --fsdp --shard_frozen, else 1 (whole on every rank);
                                             0 for the LoRA reference, which is the trained model with adapters off
    activations  N * L * per_layer + head    saved for the backward; per token and layer
                 per_layer = 4 * 2d + a * (2d + 4 H hd + 3 H_kv hd + 4 I)
                 (fp32 residual and norm inputs; normed inputs, q k v, rotated q k, attention output and its
                 copy for o_proj, gate, silu(gate), up, their product), and the head saves a * V + 4 * V + 4 * V
                 per logit row (the logits, their float32 copy for logsumexp, and the float32 gradient)
                 With --gradient_checkpointing per_layer = 4 d (each block's input), plus one block's full set
                 (the one being recomputed).
    ddp_buckets  4 P_t with DDP (W > 1)      DDP's reducer keeps its own flat copy of every gradient for the
                                             all-reduce (gradient_as_bucket_view off); 0 with FSDP or one process
    (PPO doubles the activations: the value model has its own backbone.)

The plan adds the lines up, which overstates the peak when the lines are not alive at once (e.g. activations at
the end of the forward, before this step's gradients exist). What it leaves out, on purpose: the CUDA context and
allocator fragmentation (add 1-2 GB per GPU), communication buffers, the KV cache of sampling (PPO, GRPO, online DPO) which lives while
the activations do not (`kv_cache` is printed apart: n_layers * 2 * rows * H_kv * seq_len * hd * a), and the
logit rows a stage skips (SFT computes logits on trained tokens only; the plan counts every token, an upper
bound). LoRA's --lora_base_dtype (fp32 by default, as the scripts) is the scripts' flag of that name.
Checked against measured peak memory on CPU in bench/bench_memory.py.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass

from minialign.models.decoder import PRESETS, ModelConfig, model_config
from minialign.models.hf_weights import hf_to_model_config

GB = 1e9
STAGES = ("sft", "dpo", "ppo", "grpo")

# Qwen2.5 shapes (their config.json dims; tied embeddings for 0.5B and 1.5B, a separate lm_head for 7B; qkv biases)
QWEN25 = {
    "qwen2.5-0.5b": dict(vocab_size=151936, dim=896, n_layers=24, n_heads=14, n_kv_heads=2, hidden_dim=4864,
                         qkv_bias=True, tie_embeddings=True, max_seq_len=32768),
    "qwen2.5-1.5b": dict(vocab_size=151936, dim=1536, n_layers=28, n_heads=12, n_kv_heads=2, hidden_dim=8960,
                         qkv_bias=True, tie_embeddings=True, max_seq_len=32768),
    "qwen2.5-7b": dict(vocab_size=152064, dim=3584, n_layers=28, n_heads=28, n_kv_heads=4, hidden_dim=18944,
                       qkv_bias=True, tie_embeddings=False, max_seq_len=32768),
}


def resolve_model(name: str) -> ModelConfig:
    """A minialign preset, a Qwen2.5 shape above, or a Hugging Face config.json path."""
    if name in QWEN25:
        return ModelConfig(**QWEN25[name])
    if name in PRESETS:
        return model_config(name)
    with open(name) as f:
        return hf_to_model_config(json.load(f))


def block_params(cfg: ModelConfig) -> int:
    """Parameters of one decoder block (minialign.models.decoder.Block)."""
    d, hd, H, Hkv, I = cfg.dim, cfg.head_dim, cfg.n_heads, cfg.n_kv_heads, cfg.hidden_dim
    attn = d * H * hd + 2 * d * Hkv * hd + H * hd * d
    attn += (H * hd + 2 * Hkv * hd) * cfg.qkv_bias + d * cfg.o_bias + 2 * hd * cfg.qk_norm
    mlp = 3 * d * I + (2 * I + d) * cfg.mlp_bias
    if cfg.n_experts:
        mlp = cfg.n_experts * mlp + d * cfg.n_experts
    return attn + mlp + 2 * d  # + the two RMSNorm weights


def count_params(cfg: ModelConfig, scalar: bool = False) -> int:
    """P of CausalLM(cfg) (scalar=False) or ScalarModel(cfg) (scalar=True: score head instead of an untied lm_head)."""
    p = cfg.vocab_size * cfg.dim + cfg.n_layers * block_params(cfg) + cfg.dim
    if scalar:
        return p + cfg.dim + 1
    return p + (0 if cfg.tie_embeddings else cfg.vocab_size * cfg.dim)


def lora_params(cfg: ModelConfig, r: int) -> int:
    """Adapters r * (in + out) on every q k v o gate up down projection (minialign.models.lora's default targets)."""
    d, hd, H, Hkv, I = cfg.dim, cfg.head_dim, cfg.n_heads, cfg.n_kv_heads, cfg.hidden_dim
    per_block = r * ((d + H * hd) * 2 + 2 * (d + Hkv * hd) + 3 * (d + I) * max(1, cfg.n_experts))
    return cfg.n_layers * per_block


@dataclass
class Plan:
    """Bytes per rank, one field per line of the module docstring's formula."""
    weights: float
    gradients: float
    adamw: float
    autocast: float
    frozen: float
    activations: float
    kv_cache: float
    ddp_buckets: float = 0.0

    @property
    def total(self) -> float:
        return (self.weights + self.gradients + self.adamw + self.autocast + self.frozen + self.activations
                + self.ddp_buckets)


def activation_bytes(cfg: ModelConfig, tokens: int, act_bytes: int, gradient_checkpointing: bool) -> float:
    d, hd, H, Hkv, I, V = cfg.dim, cfg.head_dim, cfg.n_heads, cfg.n_kv_heads, cfg.hidden_dim, cfg.vocab_size
    full_layer = 4 * 2 * d + act_bytes * (2 * d + 4 * H * hd + 3 * Hkv * hd + 4 * I)  # bytes per token
    head = act_bytes * V + 4 * V + 4 * V
    if gradient_checkpointing:
        return tokens * (cfg.n_layers * 4 * d + full_layer + head)
    return tokens * (cfg.n_layers * full_layer + head)


def plan(cfg: ModelConfig, stage: str, world_size: int = 1, fsdp: bool = False, lora_r: int = 0,
         gradient_checkpointing: bool = False, dtype: str = "bf16", micro_batch: int = 4, seq_len: int = 1024,
         reference: bool = True, lora_base_dtype: str = "fp32", shard_frozen: bool = False) -> Plan:
    """The bytes per rank of `stage` (sft, dpo, ppo, grpo) for the model `cfg` (see the module docstring).

    micro_batch: rows of one forward (SFT/PPO/GRPO sequences, DPO pairs packed one row each), seq_len their length.
    reference: DPO / GRPO with a reference model (GRPO's beta > 0); PPO always has one.
    dtype: the autocast dtype (fp32 = none); lora_base_dtype: what the frozen LoRA base is stored in (fp32, bf16).
    """
    if stage not in STAGES:
        raise ValueError(f"stage must be one of {STAGES}, got {stage!r}")
    if lora_base_dtype not in ("fp32", "bf16") or (lora_base_dtype == "bf16" and not lora_r):
        raise ValueError(f"lora_base_dtype {lora_base_dtype!r}: fp32, or bf16 with lora_r > 0")
    base_bytes = 2 if lora_base_dtype == "bf16" else 4
    a = 4 if dtype == "fp32" else 2
    shard = world_size if fsdp else 1
    P = count_params(cfg)
    trained_models = 2 if stage == "ppo" else 1  # PPO trains a policy and a value model
    P_train = P * trained_models
    P_t = lora_params(cfg, lora_r) * trained_models if lora_r else P_train
    n_frozen = {"sft": 0, "dpo": int(reference), "grpo": int(reference), "ppo": 2}[stage]
    if lora_r:
        n_frozen -= {"sft": 0, "dpo": int(reference), "grpo": int(reference), "ppo": 1}[stage]  # ref = adapters off
    weights = (base_bytes * P_train + (4 * P_t if lora_r else 0)) / shard
    if a == 4:  # no autocast; a bf16 base upcasts one weight at a time, the largest being the head or an MLP matrix
        autocast = 4 * cfg.dim * max(cfg.vocab_size, cfg.hidden_dim, cfg.n_heads * cfg.head_dim) * (base_bytes == 2)
    elif fsdp:
        autocast = 2 * 4 * block_params(cfg) * trained_models  # the gathered (unsharded) blocks in flight
    elif not lora_r:
        autocast = 2 * P_t
    else:  # LoRA: the fp32 frozen base is cast for the forward too; a bf16 one is used as it is
        autocast = 2 * P_t if base_bytes == 2 else 2 * P_train
    tokens = micro_batch * seq_len
    acts = activation_bytes(cfg, tokens, a, gradient_checkpointing) * trained_models
    kv = cfg.n_layers * 2 * micro_batch * cfg.n_kv_heads * seq_len * cfg.head_dim * a if stage in ("ppo", "grpo") else 0
    return Plan(weights=weights, gradients=4 * P_t / shard, adamw=8 * P_t / shard, autocast=autocast,
                frozen=4 * P * n_frozen / (shard if shard_frozen else 1), activations=acts, kv_cache=kv,
                ddp_buckets=4 * P_t if world_size > 1 and not fsdp else 0.0)


def format_plan(p: Plan) -> str:
    rows = [(k, getattr(p, k)) for k in ("weights", "gradients", "adamw", "autocast", "frozen", "activations",
                                         "ddp_buckets") if k != "ddp_buckets" or p.ddp_buckets]
    lines = [f"  {k:<12} {v / GB:9.2f} GB" for k, v in rows]
    lines.append(f"  {'total':<12} {p.total / GB:9.2f} GB per rank")
    if p.kv_cache:
        lines.append(f"  (sampling KV cache {p.kv_cache / GB:.2f} GB, while the activations are not held)")
    return "\n".join(lines)


def fits_table(micro_batch: int = 4, seq_len: int = 1024, world_size: int = 8) -> str:
    """The README table: GB per rank for the Qwen2.5 shapes, each stage, full and LoRA r 16, bf16, gradient
    checkpointing on; DDP on 1 GPU vs FSDP over `world_size`; and the smallest of 24 / 40 / 80 GB that fits."""
    def fit(gb):
        return next((f"{g}" for g in (24, 40, 80) if gb + 2 <= g), "no")  # + 2 GB for the CUDA context

    out = [f"| model | stage | tuning | 1 GPU (GB) | fits | FSDP x{world_size}, --shard_frozen (GB/GPU) | fits |",
           "|---|---|---|---|---|---|---|"]
    for name in QWEN25:
        cfg = ModelConfig(**QWEN25[name])
        for stage in STAGES:
            for r in (0, 16):
                one = plan(cfg, stage, 1, False, r, True, "bf16", micro_batch, seq_len).total / GB
                many = plan(cfg, stage, world_size, True, r, True, "bf16", micro_batch, seq_len,
                            shard_frozen=True).total / GB
                out.append(f"| {name} | {stage} | {'LoRA r16' if r else 'full'} | {one:.1f} | {fit(one)} | "
                           f"{many:.1f} | {fit(many)} |")
    return "\n".join(out)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--model", default="qwen2.5-0.5b", help=f"a preset ({', '.join(PRESETS)}), a Qwen2.5 shape "
                                                             f"({', '.join(QWEN25)}) or an HF config.json path")
    ap.add_argument("--stage", default="sft", choices=STAGES)
    ap.add_argument("--world_size", type=int, default=1, help="ranks (GPUs)")
    ap.add_argument("--fsdp", action="store_true", help="shard the trained model's weights, gradients, AdamW state")
    ap.add_argument("--shard_frozen", action="store_true", help="with --fsdp, shard the reference / reward models too")
    ap.add_argument("--lora_r", type=int, default=0, help="LoRA rank on q k v o gate up down (0 = full fine-tuning)")
    ap.add_argument("--lora_base_dtype", default="fp32", choices=("fp32", "bf16"),
                    help="what the frozen LoRA base is stored in (bf16: 2 bytes per base parameter; needs --lora_r)")
    ap.add_argument("--gradient_checkpointing", action="store_true")
    ap.add_argument("--dtype", default="bf16", choices=("bf16", "fp16", "fp32"), help="autocast dtype")
    ap.add_argument("--micro_batch", type=int, default=4, help="rows per forward (sequences; DPO: pairs)")
    ap.add_argument("--seq_len", type=int, default=1024, help="tokens per row")
    ap.add_argument("--no_reference", action="store_true", help="DPO/GRPO without a reference model (GRPO beta 0)")
    ap.add_argument("--table", action="store_true", help="print the README's what-fits table and exit")
    args = ap.parse_args(argv)
    if args.table:
        print(fits_table(args.micro_batch, args.seq_len))
        return
    if args.lora_base_dtype != "fp32" and not args.lora_r:
        ap.error(f"--lora_base_dtype {args.lora_base_dtype} needs --lora_r (only a frozen base is stored in bf16)")
    cfg = resolve_model(args.model)
    p = plan(cfg, args.stage, args.world_size, args.fsdp, args.lora_r, args.gradient_checkpointing, args.dtype,
             args.micro_batch, args.seq_len, not args.no_reference, args.lora_base_dtype,
             args.fsdp and args.shard_frozen)
    tuning = f"LoRA r {args.lora_r}, {args.lora_base_dtype} base" if args.lora_r else "full"
    print(f"{args.model}: {count_params(cfg) / 1e6:.1f}M parameters; {args.stage}, {args.world_size} rank(s) "
          f"{'FSDP' if args.fsdp else 'DDP'}, {tuning}, {args.dtype}, "
          f"{'' if args.gradient_checkpointing else 'no '}gradient checkpointing, "
          f"{args.micro_batch} x {args.seq_len} tokens per micro-batch")
    print(format_plan(p))


if __name__ == "__main__":
    main()
