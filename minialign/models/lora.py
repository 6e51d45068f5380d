"""LoRA: train a low-rank update of chosen projections, the base weights frozen (Hu et al. 2021, arXiv:2106.09685).

A targeted nn.Linear with frozen weight W0 (out, in) becomes, with rank r, scale alpha and input dropout,

    h = W0 x + (alpha / r) · B A drop(x)        A (r, in): Kaiming-uniform init;  B (out, r): zeros   (Eq. 3)

so a fresh adapter changes nothing (B = 0: exactly the base model's outputs) and only A, B (and whatever the
caller marks trainable, e.g. a reward model's new score head) get gradients. Targets are the projections of
minialign.models.decoder by short name: q, k, v, o (Attention), gate, up, down (SwiGLU, MoE experts included).

What this gives the stages (the scripts call it through `--lora_r`, `--lora_alpha`, `--lora_dropout`,
`--lora_targets`, `--lora_base_dtype`; minialign.training.config.LoRAConfig):
  * the reference of DPO, KTO, PPO and GRPO is the policy itself with its adapters disabled
    (`reference(model)`): no second model in memory, no precompute. That is only the starting model when the
    adapters are fresh, so a LoRA checkpoint used as --init_from is MERGED into its base when it is loaded
    (`checkpoint.load_model`), and new adapters start on those merged weights (TRL's bug, trl#4723: disabling
    the adapters of a policy that continues a LoRA SFT run gives the bare base, not the SFT model);
  * a checkpoint of a LoRA run holds the adapters (and trainable heads) only, with the path and a hash of
    its base's frozen weights (`model.lora_meta`); loading it checks the hash and merges;
    `python -m minialign.training.checkpoint merge --ckpt out/dpo --out out/dpo_merged` writes the full checkpoint
    (python -m minialign.training.hf_export takes that one, or merges a LoRA run on the fly);
  * PPO and GRPO sample with the adapters merged into temporary weights (`merged_for_sampling`), so the
    sampler's fast path applies (an fp32 base; a bf16 base samples with its adapters live).

Numerics: merging adds (alpha / r) B A to W0 in the weights' dtype, so a merged forward equals the unmerged
one to rounding (1e-6 in fp32), and `unmerge` restores W0 to rounding, not bit for bit. The adapters-off
forward is exactly the base model's (it runs W0 x alone). The CPU sampler's prepacked weights
(minialign.models.packed_linear) apply to plain nn.Linear only, so a model with adapters samples on the ordinary,
slower path unless inside `merged_for_sampling` (minialign.evaluation.evaluate's end-of-run scoring does not use it:
its KL reference is the adapters-off model, which a merged swap would hide).

A bf16 base (`--lora_base_dtype bf16`, `from_config` -> `cast_frozen`): every frozen parameter of the model (the
wrapped and the untargeted projections, the embedding and so the tied head, a separate lm_head, the norms, the MoE
routers) is stored in bfloat16, half its memory; the adapters and the heads the caller marks trainable stay float32,
so their gradients and AdamW moments are float32 too. Activations stay float32 on CPU, with no autocast: each frozen
matmul upcasts its weight for that one product (minialign.models.decoder.linear, exact since every bf16 value is a
float32 value), and its backward keeps the stored bf16 weight, not the copy, so no fp32 copy of the base outlives
one matmul (the alternative, bf16 activations, would round those too, and bf16 matmuls run 20-35x slower on
AVX2 CPUs: minialign.training.runtime).
The embedding's rows are upcast as they are looked up and RMSNorm already upcasts its weight; log-softmax and the
losses stay float32. Under CUDA bf16 autocast the matmuls take the bf16 weights as they are (no cast, no cached
copy). So the only rounding is of the base weights, to ~2-3 significant digits (relative error <= 2^-8): on the tiny
test models (random init, |logits| <= 1.6) the logits and log-probs of the bf16 base differ from the fp32 base's by
at most 2e-3 (1.3e-3 of the largest logit), 4e-3 on the cpu preset (|logits| <= 2.6); an MoE whose routing flips
for a token differs by up to 2.3e-2. The adapters-off reference is the bf16 base alone, so a fresh adapter's
forward equals it exactly. The checkpoint's base hash is of the fp32 weights as loaded, so a bf16 run's adapters
load and merge onto the fp32 base checkpoint (a full fp32 model: the adapters were trained against the rounded
base, so that merge differs from the trained forward by the rounding above). `merge` / `unmerge` refuse a bf16 base,
`merged_for_sampling` leaves its adapters live, and `merged_copy` upcasts the copy first (see each).

Simplified on purpose: one set of adapters per model (PPO's value model is a second model with its own, not a
second adapter on the policy); embeddings, norms, the output head and MoE routers are never adapted (frozen).
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import math
import sys
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from minialign.models.decoder import Attention, MoE, SwiGLU, linear

BASE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}  # --lora_base_dtype
TARGETS = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "o_proj",
           "gate": "gate_proj", "up": "up_proj", "down": "down_proj"}


class LoRALinear(nn.Module):
    """base(x) + (alpha / r) · B A dropout(x), with the wrapped nn.Linear `base` frozen (see the module docstring)."""

    def __init__(self, base: nn.Linear, r: int, alpha: float, dropout: float = 0.0):
        super().__init__()
        self.base = base.requires_grad_(False)
        self.r, self.alpha, self.scaling = r, alpha, alpha / r
        w = base.weight
        self.lora_A = nn.Parameter(torch.empty(r, base.in_features, dtype=w.dtype, device=w.device))  # (r, in)
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, r, dtype=w.dtype, device=w.device))  # (out, r)
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # as nn.Linear's init (and PEFT's)
        self.lora_dropout = nn.Dropout(dropout)
        self.disabled = False  # adapters_disabled(): the base alone
        self.merged = False  # merge(): B A already added into base.weight

    def delta_weight(self) -> torch.Tensor:
        return self.scaling * (self.lora_B @ self.lora_A)  # (out, in)

    def forward(self, x):
        y = self.base(x)  # W0 x (+ b)
        if self.disabled or self.merged:
            return y
        # + (alpha / r) B A x: the scale on the small (..., r) tensor, and added in place (the linear's backward
        # does not need its output), which measured 13% less peak memory than y + s · B A x on the cpu preset
        return y.add_(F.linear(F.linear(self.lora_dropout(x), self.lora_A) * self.scaling, self.lora_B))

    def extra_repr(self) -> str:
        return f"r={self.r}, alpha={self.alpha}"


class FrozenLinear(nn.Linear):
    """A frozen nn.Linear stored in a lower precision than the activations (a bf16 base): the same `weight` and
    `bias`, a forward that upcasts them per matmul (decoder.linear). Only `cast_frozen` makes these."""

    def forward(self, x):
        return linear(x, self.weight, self.bias)


def cast_frozen(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """In place: store every frozen floating-point parameter in `dtype` (the trainable ones, i.e. the adapters and
    marked heads, untouched), and make each frozen nn.Linear a FrozenLinear where its weight is then not float32
    (back to a plain nn.Linear where it is). Buffers (the RoPE tables) stay as they are."""
    with torch.no_grad():
        for p in model.parameters():
            if not p.requires_grad and p.is_floating_point():
                p.data = p.data.to(dtype)
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if not isinstance(child, nn.Linear) or child.weight.requires_grad:
                continue
            cls = nn.Linear if child.weight.dtype == torch.float32 else FrozenLinear
            if type(child) is not cls:
                swapped = cls(child.in_features, child.out_features, bias=child.bias is not None, device="meta")
                swapped.weight, swapped.bias = child.weight, child.bias
                setattr(module, name, swapped)
    return model


def base_is_low_precision(model: nn.Module) -> bool:
    """True when the frozen base is stored in a lower precision than the adapters (--lora_base_dtype bf16)."""
    return any(m.base.weight.dtype != m.lora_A.dtype for m in lora_layers(model))


def lora_layers(model: nn.Module) -> list[LoRALinear]:
    return [m for m in model.modules() if isinstance(m, LoRALinear)]


def is_lora(model: nn.Module) -> bool:
    return getattr(model, "lora_meta", None) is not None


def apply_lora(model: nn.Module, r: int, alpha: float, dropout: float = 0.0, targets=tuple(TARGETS),
               trainable: tuple[str, ...] = ()) -> nn.Module:
    """Replace the `targets` projections of every Attention and SwiGLU (MoE experts too) by LoRALinear, in place.

    Every other parameter is frozen except those whose name starts with one of `trainable` (e.g. "score_head."
    for a reward or value model's new head). Returns the model, with `model.lora_meta` describing the adapters
    (the caller adds the base's path and hash: `attach_base`). r is refused when it exceeds a targeted
    projection's smaller side (the update B A could not have rank r).
    """
    unknown = [t for t in targets if t not in TARGETS]
    if unknown or not targets:
        raise ValueError(f"--lora_targets {list(targets)}: choose from {' '.join(TARGETS)}")
    model.requires_grad_(False)
    for module in list(model.modules()):
        if not isinstance(module, (Attention, SwiGLU)):
            continue
        for t in targets:
            name = TARGETS[t]
            linear = getattr(module, name, None)
            if isinstance(linear, nn.Linear):
                if r > min(linear.in_features, linear.out_features):
                    raise ValueError(f"--lora_r={r} exceeds the {name} projection's smaller side "
                                     f"({linear.out_features} x {linear.in_features})")
                setattr(module, name, LoRALinear(linear, r, alpha, dropout))
    for name, p in model.named_parameters():
        if name.startswith(tuple(trainable)):
            p.requires_grad_(True)
    model.lora_meta = {"r": r, "alpha": alpha, "dropout": dropout, "targets": list(targets),
                       "trainable": list(trainable)}
    return model


def weights_hash(model: nn.Module, skip: tuple[str, ...] = ()) -> str:
    """sha256 of a plain model's state_dict: names, dtypes, shapes and bytes (keys starting with `skip` left out)."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        if name.startswith(skip):
            continue
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def from_config(model: nn.Module, cfg, base: str, trainable: tuple[str, ...] = ()) -> nn.Module:
    """A script's model with --lora_r > 0: adapters applied, the base's path and weights hash recorded for the
    checkpoint. With --lora_r 0 the model is returned unchanged (full fine-tuning). Call it on the plain model
    just loaded from `base` (before .to(device) is fine), with dropout already off where the stage wants it."""
    if not cfg.lora_r:
        return model
    digest = weights_hash(model, skip=tuple(trainable))  # of the weights as loaded (fp32), before any cast
    try:
        apply_lora(model, cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, cfg.lora_targets, trainable)
    except ValueError as e:  # a rank the model's projections cannot hold: refused like a bad flag
        raise SystemExit(f"{Path(sys.argv[0]).name}: error: {e}") from None
    if cfg.lora_base_dtype != "fp32":
        cast_frozen(model, BASE_DTYPES[cfg.lora_base_dtype])  # after apply_lora: A, B were made fp32
    model.lora_meta.update(base=str(base), base_abspath=str(Path(base).resolve()), base_sha256=digest,
                           base_dtype=cfg.lora_base_dtype)
    return model


def describe(model: nn.Module) -> str:
    """One line for the log: trainable / total parameters, and the memory of the weights and of what training
    adds per trainable parameter (its gradient and AdamW's two moments)."""
    trained = [p for p in model.parameters() if p.requires_grad]
    n_train, n_total = sum(p.numel() for p in trained), sum(p.numel() for p in model.parameters())
    mb_weights = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
    mb_train = 3 * sum(p.numel() * p.element_size() for p in trained) / 2**20
    kind = (f"LoRA r={model.lora_meta['r']} alpha={model.lora_meta['alpha']:g} on "
            f"{','.join(model.lora_meta['targets'])}, base in {model.lora_meta.get('base_dtype', 'fp32')}"
            if is_lora(model) else "full fine-tuning")
    return (f"{kind}: {n_train / 1e6:.3f}M of {n_total / 1e6:.2f}M parameters trainable; weights {mb_weights:.1f} MB "
            f"+ gradients and AdamW moments {mb_train:.1f} MB")


@contextlib.contextmanager
def adapters_disabled(model: nn.Module):
    """Within the block the model computes its base weights' outputs exactly (every adapter off)."""
    layers = lora_layers(model)
    if any(m.merged for m in layers):
        raise RuntimeError("adapters_disabled on a merged model: unmerge(model) first")
    before = [m.disabled for m in layers]
    for m in layers:
        m.disabled = True
    try:
        yield model
    finally:
        for m, d in zip(layers, before):
            m.disabled = d


class AdaptersOff:
    """The frozen starting model of a LoRA run, as a callable: `model` with its adapters disabled, no gradients.

    Not an nn.Module, so its parameters are not registered twice (and `requires_grad_` on it cannot freeze the
    adapters). The MoE routers' balance losses of the caller's last forward are kept, since training.train_step
    reads them after the loss function has also run the reference. `score_head`: for a reward model that
    shares a value model's backbone (train_ppo.py), the reward model's own frozen head replaces the value head.
    """

    def __init__(self, model: nn.Module, score_head: nn.Module | None = None):
        self.model, self.score_head, self.cfg = model, score_head, model.cfg

    def parameters(self):
        return self.model.parameters()

    def eval(self):
        return self

    def __call__(self, *args, **kwargs):
        moes = [m for m in self.model.modules() if isinstance(m, MoE)]
        kept = [m.aux_loss for m in moes]
        try:
            with torch.no_grad(), adapters_disabled(self.model):
                if self.score_head is None:
                    return self.model(*args, **kwargs)
                return self.score_head(self.model.backbone(*args, **kwargs)).squeeze(-1).float()  # as ScalarModel
        finally:
            for m, aux in zip(moes, kept):
                m.aux_loss = aux


def reference(model: nn.Module) -> AdaptersOff:
    """The reference model of a LoRA policy: the same weights with the adapters off (DDP unwrapped)."""
    return AdaptersOff(model.module if hasattr(model, "module") else model)


def _refuse_low_precision_merge(model: nn.Module, what: str):
    if base_is_low_precision(model):
        raise ValueError(f"{what} on a bf16 base would round the update away (and unmerging by subtraction would "
                         "not give W0 back): use merged_copy (fp32), or load the checkpoint (merged onto the fp32 "
                         "base)")


@torch.no_grad()
def merge(model: nn.Module) -> nn.Module:
    """W0 <- W0 + (alpha / r) B A in every adapter (the forward then skips the adapter). fp32 bases only."""
    _refuse_low_precision_merge(model, "merge")
    for m in lora_layers(model):
        if not m.merged:
            m.base.weight += m.delta_weight().to(m.base.weight.dtype)
            m.merged = True
    return model


@torch.no_grad()
def unmerge(model: nn.Module) -> nn.Module:
    """Undo `merge` (W0 back to rounding)."""
    _refuse_low_precision_merge(model, "unmerge")
    for m in lora_layers(model):
        if m.merged:
            m.base.weight -= m.delta_weight().to(m.base.weight.dtype)
            m.merged = False
    return model


@contextlib.contextmanager
def merged_for_sampling(model: nn.Module):
    """Within the block each adapter is swapped for a plain nn.Linear holding W0 + (alpha / r) B A, a NEW
    tensor (W0 is untouched, so leaving the block restores the model exactly), so the sampler runs one matmul
    per projection and its CPU fast path (minialign.models.packed_linear, plain nn.Linear only) applies: GRPO's
    rollouts on the default task ran about 1.7x slower without it. Sampling only: nothing in the block may train,
    and adapters_disabled finds no adapters in it. A model without adapters is left as it is.

    A bf16 base (--lora_base_dtype bf16) is NOT merged: the adapters stay live and sampling runs the training
    forward exactly. W0 + (alpha / r) B A rounded to bf16 would drop most of the update (bf16 rounds to within 2^-8
    of |W0|, and a young update is smaller than that), an fp32 merged copy would cost twice the base's memory, and
    the packed fast path skips bf16 weights anyway."""
    swaps = []
    with torch.no_grad():
        for module in list(model.modules()):
            for name, child in list(module.named_children()):
                if isinstance(child, LoRALinear) and not child.merged and child.base.weight.dtype == child.lora_A.dtype:
                    w = child.base.weight
                    plain = nn.Linear(child.base.in_features, child.base.out_features, bias=False, device="meta")
                    plain.weight = nn.Parameter(w + child.delta_weight().to(w.dtype), requires_grad=False)
                    plain.bias = child.base.bias
                    setattr(module, name, plain)
                    swaps.append((module, name, child))
    try:
        yield model
    finally:
        for module, name, child in swaps:
            setattr(module, name, child)


def merge_and_unload(model: nn.Module) -> nn.Module:
    """In place: merge every adapter and put the plain nn.Linear back, all parameters trainable again, no
    lora_meta. The state_dict then loads into an ordinary CausalLM / ScalarModel."""
    merge(model)
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, LoRALinear):
                setattr(module, name, child.base)
    model.requires_grad_(True)
    model.lora_meta = None
    return model


def merged_copy(model: nn.Module) -> nn.Module:
    """A plain model equal to `model` with its adapters merged; `model` itself is left as it is. A bf16 base is
    upcast to float32 in the copy first (exactly), so the copy is an fp32 model: that bf16-rounded base + s B A."""
    memo = {id(m.aux_loss): m.aux_loss.detach() for m in model.modules() if isinstance(m, MoE)}  # a non-leaf tensor
    return merge_and_unload(cast_frozen(copy.deepcopy(model, memo), torch.float32))


def lora_state_dict(model: nn.Module) -> dict:
    """What a LoRA checkpoint stores: the adapters and the trainable extras (e.g. the score head)."""
    keep = tuple(model.lora_meta["trainable"])  # name prefixes; "".startswith(()) is False
    return {k: v for k, v in model.state_dict().items() if k.endswith((".lora_A", ".lora_B")) or k.startswith(keep)}


def load_lora_state_dict(model: nn.Module, state: dict):
    """Load `lora_state_dict` output into a model with the same adapters; a key missing or extra is an error."""
    expected, given = set(lora_state_dict(model)), set(state)
    if given != expected:
        raise ValueError(f"the adapter state does not fit this model's adapters: missing "
                         f"{sorted(expected - given)[:4]}, unexpected {sorted(given - expected)[:4]}")
    model.load_state_dict(state, strict=False)


