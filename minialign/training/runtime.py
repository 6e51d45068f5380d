"""Device, precision, the process group, and every collective the scripts use, in one place.

* Precision: CPU runs fp32 (bf16 autocast is 20-35x slower on AVX2 CPUs); CUDA runs bf16 autocast, or
  fp16 autocast with a GradScaler. The scaler exists in every run, disabled unless fp16.
* DDP: the trained model is wrapped once (`wrap_ddp`); gradients are synchronized only on the last
  micro-batch of a step (`sync_context`). Only rank 0 writes files (`print0`, checkpoint, logger).
* FSDP (--fsdp, every training script): instead of DDP, `wrap_ddp` shards the trained model with FSDP2's
  `fully_shard`, each decoder block and then the whole model; gradients are reduce-scattered (averaged over
  ranks, as DDP does, so the loop's global-count normalization is unchanged) after every micro-batch; checkpoints
  hold the full state dict gathered on save (`full_state_dicts`), so they load unsharded. A sharded forward is a
  collective, so sampling and rank 0's evaluations run inside `gathered` (weights gathered once, then local);
  frozen models stay whole on every rank unless --shard_frozen (`shard_frozen`).
* Collectives: sums, means, maxima and row gathers over ranks are the functions below; with one
  process they return their input, so a script reads the same with and without torchrun.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import random
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from minialign.models.decoder import Backbone, CausalLM, MoE, ScalarModel


@dataclass
class Runtime:
    device: torch.device
    dtype: torch.dtype  # compute dtype under autocast (float32 = autocast off)
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def ddp(self) -> bool:
        return self.world_size > 1

    def autocast(self):
        return torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32)

    def make_scaler(self):
        return torch.amp.GradScaler(self.device.type, enabled=self.dtype == torch.float16)


def setup(cfg) -> Runtime:
    """Device, precision, process group (under torchrun), seeds. Call once at the top of a script."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    want_cuda = cfg.device.startswith("cuda") or (cfg.device == "auto" and torch.cuda.is_available())
    if want_cuda and not torch.cuda.is_available():
        raise RuntimeError("--device cuda requested but CUDA is not available")
    device = torch.device(f"cuda:{local_rank}" if want_cuda and world_size > 1 else ("cuda" if want_cuda else "cpu"))
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world_size > 1 and not dist.is_initialized():
        timeout = datetime.timedelta(seconds=int(os.environ.get("MINIALIGN_DIST_TIMEOUT", "600")))
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=timeout)
    bf16_ok = device.type == "cuda" and torch.cuda.is_bf16_supported()
    dtype_name = cfg.dtype if cfg.dtype != "auto" else ("bf16" if bf16_ok else "fp32")
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype_name]
    if device.type == "cpu" and dtype == torch.float16:
        raise ValueError("--dtype fp16 needs CUDA; use fp32 on CPU")
    seed_everything(cfg.seed)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return Runtime(device, dtype, rank, local_rank, world_size)


def seed_everything(seed: int):
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def cleanup(rt: Runtime):
    """Leave the process group together: a rank that tears gloo down while another is still in it
    can abort at exit ("terminate called without an active exception")."""
    if rt.ddp and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def print0(rt: Runtime, *args):
    if rt.is_main:
        print(*args, flush=True)


def has_moe(model) -> bool:
    return any(isinstance(m, MoE) for m in model.modules())


def set_gradient_checkpointing(model, on: bool):
    """--gradient_checkpointing: every Backbone inside `model` (a policy, a value model, both in PPO's pair)
    recomputes its blocks in the backward (minialign.models.decoder.Backbone). No wrapper modules, so the
    state_dict keys do not change."""
    for m in model.modules():
        if isinstance(m, Backbone):
            m.gradient_checkpointing = on
    return model


def is_fsdp(model) -> bool:
    from torch.distributed.fsdp import FSDPModule
    return isinstance(model, FSDPModule)


def is_sharded(model) -> bool:
    """The model, or a model inside it (PPO's policy-and-value pair), is sharded with FSDP."""
    return any(is_fsdp(m) for m in model.modules())


def shard_fsdp(model, rt: Runtime, frozen: bool = False):
    """FSDP2: every decoder block its own unit (gathered for its forward and backward, then freed), then the
    root (embedding, final norm, heads). Parameters become DTensors sharded on dim 0 over the ranks; build the
    optimizer after this call. A container of models (PPO's policy-and-value pair) gets one root per model, so
    each model's own forward (sampling with the policy alone) enters through its root. A trained root keeps its
    weights gathered from its forward to its backward (FSDP2's default for a root); a frozen one (`frozen`: a
    reference or reward model, no backward) frees them after every forward.

    Precision: on CUDA with bf16/fp16 FSDP2's MixedPrecisionPolicy casts the gathered weights to that dtype
    (param_dtype) and reduce-scatters gradients in fp32 (reduce_dtype), so the sharded master weights and the
    AdamW state stay fp32; autocast still runs around the forward. On CPU (fp32) there is no policy."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    mesh = init_device_mesh(rt.device.type, (rt.world_size,))
    kwargs = {"mesh": mesh}
    if rt.device.type == "cuda" and rt.dtype != torch.float32:
        kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=rt.dtype, reduce_dtype=torch.float32)
    roots = [model] if isinstance(model, (CausalLM, ScalarModel)) else [
        m for m in model.children() if isinstance(m, (CausalLM, ScalarModel))]
    for root in roots:
        for layer in root.backbone.layers:
            fully_shard(layer, **kwargs)
        fully_shard(root, **kwargs, **({"reshard_after_forward": True} if frozen else {}))
        root._reshards_after_forward = frozen  # for `gathered` to restore (blocks: True, FSDP2's default)
    return model


def shard_frozen(model, rt: Runtime, cfg):
    """--fsdp with --shard_frozen: a frozen model (reference, reward model) sharded like the policy, so each rank
    holds 1/world_size of its weights and every forward all-gathers one block at a time (each of its forwards is
    then a collective: the scripts run them on every rank alike, or inside `gathered`). Without the flag (the
    default) it stays whole on every rank: its full weights in memory, no communication. None stays None."""
    if model is None or not getattr(cfg, "fsdp", False) or not getattr(cfg, "shard_frozen", False) or not rt.ddp:
        return model
    if not isinstance(model, torch.nn.Module):  # LoRA's adapters-off view of the policy: nothing of its own
        return model
    return shard_fsdp(model, rt, frozen=True)


def full_state_dicts(model, optimizer) -> tuple[dict, dict | None]:
    """An FSDP model's weights and its optimizer's state as full (unsharded) CPU tensors, keyed by parameter
    name; every rank must call it (it all-gathers), rank 0 writes them."""
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         get_optimizer_state_dict)
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    model_sd = get_model_state_dict(model, options=options)
    optim_sd = get_optimizer_state_dict(model, optimizer, options=options) if optimizer is not None else None
    return model_sd, optim_sd


def load_full_state_dicts(model, optimizer, model_sd: dict, optim_sd: dict | None):
    """The inverse of `full_state_dicts`: each rank keeps its shard of the full tensors."""
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                         set_optimizer_state_dict)
    options = StateDictOptions(full_state_dict=True)
    set_model_state_dict(model, model_sd, options=options)
    if optimizer is not None and optim_sd is not None:
        set_optimizer_state_dict(model, optimizer, optim_sd, options=options)


@contextlib.contextmanager
def gathered(*models):
    """No-grad forwards (sampling, scoring a rollout, rank 0's evaluation) on FSDP models with their full weights.

    FSDP2 all-gathers a block's weights in its forward and frees them after, so a forward is a collective: every
    rank must run the same number. Sampling breaks that (ranks stop generating at different steps), rank 0's
    evaluation runs on rank 0 alone, and the CPU sampler reads the weights directly
    (minialign.models.packed_linear). Inside this context every FSDP unit of `models` is all-gathered ONCE on entry
    and kept through any number of forwards, which then communicate nothing; on exit the shards are restored
    (memory: one full copy of those weights per rank while inside). Every rank must enter it. Models that are not
    sharded (or None) are left alone, so without --fsdp it does nothing."""
    units = [m for model in models if isinstance(model, torch.nn.Module) for m in model.modules() if is_fsdp(m)]
    after = [getattr(m, "_reshards_after_forward", True) for m in units]  # what each unit does outside
    for m in units:
        m.set_reshard_after_forward(False, recurse=False)
        m.unshard()
    try:
        yield
    finally:
        for m, reshard in zip(units, after):
            m.set_reshard_after_forward(reshard, recurse=False)
            m.reshard()


def to_float(t) -> float:
    """A scalar tensor -> float; a DTensor (e.g. clip_grad_norm_'s norm over FSDP shards) is reduced first."""
    return float(t.full_tensor() if hasattr(t, "full_tensor") else t)


def wrap_ddp(model, rt: Runtime, compile: bool = False, gradient_checkpointing: bool = False, fsdp: bool = False):
    """DDP-wrap the trained model under torchrun; with compile, compile its forward first (in place, so
    the state_dict keys do not change); with gradient_checkpointing, its blocks recompute in the backward
    (`set_gradient_checkpointing`; DDP sees the same parameters and hooks, so the two combine).

    An MoE model may route no token of a micro-batch to some expert, whose parameters then get no
    gradient on that rank: DDP must be told to look for unused parameters, or it waits for them forever
    ("Expected to have finished reduction in the prior iteration").
    """
    set_gradient_checkpointing(model, gradient_checkpointing)
    if compile:
        model.compile()
        print0(rt, f"--compile: {type(model).__name__}.forward is compiled by torch.compile on first use "
                   "(slow first steps)")
    if not rt.ddp:
        return model
    if fsdp:
        return shard_fsdp(model, rt, frozen=True)
    ids = [rt.device.index] if rt.device.type == "cuda" else None
    return torch.nn.parallel.DistributedDataParallel(model, device_ids=ids, find_unused_parameters=has_moe(model))


def unwrap(model):
    return model.module if hasattr(model, "module") else model


def sync_context(model, rt: Runtime, last_micro_step: bool):
    """Skip DDP's gradient all-reduce on every micro-batch but the last of a step."""
    if rt.ddp and not last_micro_step and not is_sharded(model):  # FSDP reduce-scatters every micro-batch's gradients
        return model.no_sync()
    return contextlib.nullcontext()


# ---------------------------------------------------------------------------------------- collectives

def _comm_device(rt: Runtime):
    return rt.device if rt.device.type == "cuda" else torch.device("cpu")  # gloo works on CPU tensors


def all_reduce_sum(x: float | int, rt: Runtime) -> float:
    if not rt.ddp:
        return float(x)
    t = torch.tensor(float(x), dtype=torch.float64, device=_comm_device(rt))
    dist.all_reduce(t)
    return float(t)


def all_reduce_max(x: float, rt: Runtime) -> float:
    if not rt.ddp:
        return float(x)
    t = torch.tensor(float(x), dtype=torch.float64, device=_comm_device(rt))
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t)


def all_reduce_sum_dict(values: dict, rt: Runtime) -> dict:
    """Sum a dict of floats over ranks (every rank must hold the same keys)."""
    if not rt.ddp:
        return values
    keys = sorted(values)
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=_comm_device(rt))
    dist.all_reduce(t)
    return dict(zip(keys, t.tolist()))


def all_reduce_tensor_(t: torch.Tensor, rt: Runtime) -> torch.Tensor:
    """Sum a tensor over ranks, in place (e.g. a table each rank filled a shard of, zeros elsewhere)."""
    if rt.ddp:
        buf = t.to(_comm_device(rt))
        dist.all_reduce(buf)
        t.copy_(buf)
    return t


def all_gather_rows(x: torch.Tensor, rt: Runtime) -> torch.Tensor:
    """Concatenate every rank's (n, ...) tensor in rank order (all ranks must pass the same shape)."""
    if not rt.ddp:
        return x
    device = _comm_device(rt)
    parts = [torch.empty_like(x, device=device) for _ in range(rt.world_size)]
    dist.all_gather(parts, x.to(device).contiguous())
    return torch.cat(parts).to(x.device)


def all_gather_object(obj, rt: Runtime) -> list:
    """[rank 0's obj, rank 1's obj, ...] (any picklable object)."""
    if not rt.ddp:
        return [obj]
    out = [None] * rt.world_size
    dist.all_gather_object(out, obj)
    return out


def gather_columns(columns: dict[str, torch.Tensor], rt) -> dict[str, torch.Tensor]:
    """Per-response statistics of this rank ((R,) each) -> the same names over every rank's rows
    ((R * world,) each, rank order = global prompt order), in one all-gather."""
    names = list(columns)
    table = torch.stack([columns[k].double() for k in names], dim=1)  # (R, K)
    return dict(zip(names, all_gather_rows(table, rt).T))


def gather_token_rows(x: torch.Tensor, rt) -> torch.Tensor:
    """This rank's (B, N) per-token tensor -> every rank's rows (B * world, N_max) in rank order, padded on the
    right with 0 / False to the widest rank's N (B equal on every rank). Bool tensors stay bool."""
    if not rt.ddp:
        return x
    width = int(all_reduce_max(x.shape[1], rt))
    padded = F.pad(x.to(torch.uint8) if x.dtype == torch.bool else x, (0, width - x.shape[1]))
    out = all_gather_rows(padded, rt)  # gloo gathers no bool
    return out.bool() if x.dtype == torch.bool else out
