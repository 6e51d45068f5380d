"""The training machinery every script shares, written once: config flags, device and precision,
DDP, the data order, gradient accumulation, the LR schedule, clipping, checkpoints and metrics.

Each piece is a plain function the scripts call by name; there is no trainer class. The rules it
enforces, because each one has silently broken somebody's RLHF run:

* Loss normalization. One optimizer step = `grad_accum` micro-batches on each of `world_size` ranks.
  Its loss is the mean over every counted token (or sequence) of the WHOLE step, not a mean of
  micro-batch means (those weight a short micro-batch's tokens more). A script therefore counts the
  step's tokens first, calls `step_normalizer(local_count)` (an all-reduce), and divides each
  micro-batch's *summed* loss by it. The normalizer already holds the factor world_size that DDP's
  gradient averaging divides out again.
* DDP: gradients are synchronized only on the last micro-batch (`no_sync` before), and clipped after
  that synchronization. Only rank 0 writes files.
* Precision: CPU runs fp32 (bf16 autocast is 20-35x slower on AVX2 CPUs); CUDA runs bf16 autocast, or
  fp16 autocast with a GradScaler. The scaler exists in every run, disabled unless fp16.
* Checkpoints hold weights, optimizer, scaler, step, RNG states and the resolved config; they are
  written to a temporary file, fsynced, then renamed, so a kill never leaves a half-written one.
  `--resume` restores all of it; the data order is a pure function of (seed, epoch), so the position is
  just the step number.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import json
import math
import os
import random
import shutil
import sys
import time
import typing
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from .model import CausalLM, ModelConfig, ScalarModel, model_config


# --------------------------------------------------------------------------------------------- config

def knob(default, help: str):
    """A config field with its default and a one-line help shown by --help."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help})
    return field(default=default, metadata={"help": help})


@dataclass
class TrainConfig:
    """Knobs every training script has. Each script's Config adds its own below these."""
    out_dir: str = knob("", "output folder (default out/<stage>)")
    init_from: str = knob("", "checkpoint folder to start from (e.g. out/sft); empty = random init")
    resume: bool = knob(False, "continue from out_dir/ckpt.pt exactly where it stopped")
    preset: str = knob("cpu", "model preset when starting from scratch (see minialign.model.PRESETS)")
    tokenizer: str = knob("out/tokenizer/tokenizer.model", "sentencepiece model (ignored with --init_from: the checkpoint's copy is used)")
    seed: int = knob(1337, "random seed (data order, init, sampling)")
    device: str = knob("auto", "auto | cpu | cuda")
    dtype: str = knob("auto", "auto (cpu: fp32, cuda: bf16) | fp32 | bf16 | fp16 (fp16 uses a GradScaler)")
    lr: float = knob(1e-3, "peak learning rate")
    min_lr_ratio: float = knob(0.1, "cosine floor as a fraction of lr")
    warmup_steps: int = knob(20, "linear warmup steps")
    max_steps: int = knob(300, "optimizer steps")
    micro_batch_size: int = knob(32, "sequences per forward pass per rank")
    grad_accum: int = knob(1, "micro-batches per optimizer step (per rank)")
    weight_decay: float = knob(0.0, "AdamW weight decay (matrices only)")
    max_grad_norm: float = knob(1.0, "clip the global gradient norm to this (0 = off)")
    max_len: int = knob(128, "max tokens per sequence (see the truncation policy in minialign.data)")
    log_every: int = knob(10, "log metrics every N steps")
    eval_every: int = knob(0, "evaluate every N steps (0 = only at the end)")
    save_every: int = knob(100, "write a checkpoint every N steps (and at the end)")
    skip_nonfinite: bool = knob(False, "skip (and count) steps with a non-finite loss or gradient instead of stopping")
    group_by_length: bool = knob(True, "sort each step's sequences by length before splitting them into micro-batches (less padding; the loss is unchanged, being a mean over the whole step)")
    compile: bool = knob(False, "torch.compile the trained model's forward (opt-in: on 2 CPU cores the 26M SFT step ran 1.15x faster "
                                "after ~40 s of compiling; needs a C++ compiler on CPU; each new input shape compiles again)")
    stop_after_steps: int = knob(0, "exit after this many steps of THIS invocation, checkpointing first (time-sliced jobs; continue with --resume); 0 = run to max_steps")


def _arg_type(tp):
    if tp in (int, float, str):
        return tp
    raise TypeError(f"unsupported config field type {tp}")


def parse_config(cls, argv=None, **defaults):
    """Build argparse flags from a config dataclass; unknown flags are an error."""
    hints = typing.get_type_hints(cls)
    ap = argparse.ArgumentParser(description=(sys.modules[cls.__module__].__doc__ or "").split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    for f in dataclasses.fields(cls):
        default = defaults.get(f.name, f.default if f.default is not dataclasses.MISSING else f.default_factory())
        tp = hints[f.name]
        if tp is bool:
            ap.add_argument(f"--{f.name}", action=argparse.BooleanOptionalAction, default=default, help=f.metadata.get("help", ""))
        elif typing.get_origin(tp) is list:
            (item,) = typing.get_args(tp)
            ap.add_argument(f"--{f.name}", nargs="*", type=_arg_type(item), default=default, help=f.metadata.get("help", ""))
        else:
            ap.add_argument(f"--{f.name}", type=_arg_type(tp), default=default, help=f.metadata.get("help", ""))
    cfg = cls(**vars(ap.parse_args(argv)))
    try:
        validate_config(cfg)
    except ValueError as e:
        ap.error(str(e))
    return cfg


def validate_config(cfg):
    """Refuse impossible values with a message naming the flag."""
    checks = [
        ("lr", lambda v: v > 0, "must be > 0"),
        ("max_steps", lambda v: v >= 1, "must be >= 1"),
        ("micro_batch_size", lambda v: v >= 1, "must be >= 1"),
        ("grad_accum", lambda v: v >= 1, "must be >= 1"),
        ("warmup_steps", lambda v: v >= 0, "must be >= 0"),
        ("min_lr_ratio", lambda v: 0 <= v <= 1, "must be in [0, 1]"),
        ("max_grad_norm", lambda v: v >= 0, "must be >= 0 (0 = no clipping)"),
        ("weight_decay", lambda v: v >= 0, "must be >= 0"),
        ("eval_every", lambda v: v >= 0, "must be >= 0 (0 = only at the end)"),
        ("eval_prompts", lambda v: v >= 0, "must be >= 0 (0 = all)"),
        ("gold_eval_every", lambda v: v >= 0, "must be >= 0 (0 = off)"),
        ("gold_eval_prompts", lambda v: v >= 1, "must be >= 1"),
        ("max_new_tokens", lambda v: v >= 1, "must be >= 1"),
        ("max_len", lambda v: v >= 8, "must be >= 8"),
        ("stop_after_steps", lambda v: v >= 0, "must be >= 0"),
        ("save_every", lambda v: v >= 1, "must be >= 1"),
        ("log_every", lambda v: v >= 1, "must be >= 1"),
        ("device", lambda v: v in ("auto", "cpu", "cuda") or v.startswith("cuda:"), "must be auto, cpu or cuda"),
        ("dtype", lambda v: v in ("auto", "fp32", "bf16", "fp16"), "must be auto, fp32, bf16 or fp16"),
    ]
    for name, ok, msg in checks:
        if hasattr(cfg, name) and not ok(getattr(cfg, name)):
            raise ValueError(f"--{name}={getattr(cfg, name)!r} {msg}")


# ---------------------------------------------------------------------------------------- runtime

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


def setup_runtime(cfg) -> Runtime:
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
    dtype_name = cfg.dtype if cfg.dtype != "auto" else ("bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32")
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


def wrap_ddp(model, rt: Runtime, cfg=None):
    """DDP-wrap the trained model under torchrun; with --compile, compile its forward first (in place, so
    the state_dict keys do not change)."""
    if cfg is not None and getattr(cfg, "compile", False):
        model.compile()
        print0(rt, f"--compile: {type(model).__name__}.forward is compiled by torch.compile on first use (the first steps are slow)")
    if not rt.ddp:
        return model
    ids = [rt.device.index] if rt.device.type == "cuda" else None
    return torch.nn.parallel.DistributedDataParallel(model, device_ids=ids)


def unwrap(model):
    return model.module if hasattr(model, "module") else model


def all_reduce_sum(x: float | int, rt: Runtime) -> float:
    if not rt.ddp:
        return float(x)
    t = torch.tensor(float(x), dtype=torch.float64, device=rt.device if rt.device.type == "cuda" else "cpu")
    dist.all_reduce(t)
    return float(t)


def all_reduce_mean(metrics: dict, rt: Runtime) -> dict:
    """Average a dict of floats over ranks (for logging)."""
    return {k: v / rt.world_size for k, v in all_reduce_sum_dict(metrics, rt).items()}


def step_normalizer(local_count: float, rt: Runtime) -> float:
    """Divide each micro-batch's summed loss by this to get the exact global mean of the step.

    = (counted tokens or sequences of the whole step, all micro-batches, all ranks) / world_size.
    The / world_size cancels DDP's gradient averaging (it divides the summed gradients by world_size).
    """
    total = all_reduce_sum(local_count, rt)
    if total <= 0:
        raise ValueError("an optimizer step with no counted tokens: check the loss masks")
    return total / rt.world_size


def sync_context(model, rt: Runtime, last_micro_step: bool):
    """Skip DDP's gradient all-reduce on every micro-batch but the last of a step."""
    if rt.ddp and not last_micro_step:
        return model.no_sync()
    return contextlib.nullcontext()


# ------------------------------------------------------------------------------------- data order

def micro_batch_indices(n_examples: int, step: int, micro_step: int, cfg, rt: Runtime) -> list[int]:
    """Example indices for (step, micro_step) on this rank.

    The data stream is the concatenation of per-epoch permutations, each a pure function of
    (seed, epoch). Optimizer step s consumes stream[s*G : (s+1)*G] with G = micro * accum * world;
    within it, micro-step m of rank r takes the slice (m*world + r). The same global batch therefore
    reaches the optimizer whatever the split into ranks and micro-batches, and resuming needs only s.
    """
    mb = cfg.micro_batch_size
    global_batch = mb * cfg.grad_accum * rt.world_size
    start = step * global_batch + (micro_step * rt.world_size + rt.rank) * mb
    return [int(_epoch_permutation(n_examples, cfg.seed, (start + i) // n_examples)[(start + i) % n_examples]) for i in range(mb)]


def step_batches(n_examples: int, step: int, cfg, rt: Runtime, lengths=None) -> list[list[int]]:
    """This rank's grad_accum micro-batches (lists of example indices) for optimizer step `step`.

    With cfg.group_by_length and `lengths` given, the rank's examples of the step are sorted by length
    before being cut into micro-batches, so each micro-batch pads to similar lengths (1.6x faster SFT
    on the default task). The set of examples of the step, and hence the update, is unchanged.
    """
    idx = [i for m in range(cfg.grad_accum) for i in micro_batch_indices(n_examples, step, m, cfg, rt)]
    if cfg.group_by_length and lengths is not None:
        idx.sort(key=lambda i: lengths[i])
    mb = cfg.micro_batch_size
    return [idx[m * mb : (m + 1) * mb] for m in range(cfg.grad_accum)]


_perm_cache: dict = {}


def _epoch_permutation(n: int, seed: int, epoch: int):
    key = (n, seed, epoch)
    if key not in _perm_cache:
        g = torch.Generator().manual_seed(seed * 100_003 + epoch)
        _perm_cache.clear()  # keep one epoch around
        _perm_cache[key] = torch.randperm(n, generator=g)
    return _perm_cache[key]


# ----------------------------------------------------------------------------------- optimization

def lr_at(step: int, max_lr: float, warmup_steps: int, total_steps: int, min_lr_ratio: float) -> float:
    """Linear warmup, cosine decay, then a floor (step counts from 0).

    1) warmup: step < warmup_steps          -> max_lr * (step + 1) / warmup_steps
    2) decay:  warmup_steps <= step < total -> min_lr + 0.5 * (1 + cos(pi * progress)) * (max_lr - min_lr)
    3) floor:  step >= total_steps           -> min_lr = max_lr * min_lr_ratio
    """
    min_lr = max_lr * min_lr_ratio
    if step < warmup_steps:
        return max_lr * (step + 1) / warmup_steps
    if step >= total_steps:
        return min_lr
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (max_lr - min_lr)


def make_optimizer(model, cfg, rt: Runtime):
    """AdamW; weight decay on matrices only (not norms, biases).

    fused=True: one kernel over all parameters instead of a loop of small ops per tensor, on CUDA and
    on CPU (torch >= 2.4); on the 26M model on 2 CPU cores the update drops from ~60 ms to ~19 ms.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.95), fused=rt.device.type in ("cuda", "cpu"))


def set_lr(optimizer, lr: float):
    for group in optimizer.param_groups:
        group["lr"] = lr


def train_step(model, optimizer, scaler, batches: list, loss_fn, count_fn, rt: Runtime, cfg) -> dict:
    """One optimizer step over this rank's micro-batches; returns metrics averaged over the global step.

    loss_fn(model, batch) -> (loss_sum, metric_sums): the loss SUMMED over the batch's counted units
    (tokens or sequences) and a dict of metrics also summed over those units.
    count_fn(batch) -> number of counted units in the batch.
    Every micro-batch's loss_sum is divided by the step's global count (`step_normalizer`), so the
    gradient is that of the mean over the whole step, whatever the micro-batch and rank split.
    """
    normalizer = step_normalizer(sum(float(count_fn(b)) for b in batches), rt)
    sums: dict = {}
    for i, batch in enumerate(batches):
        with sync_context(model, rt, last_micro_step=i == len(batches) - 1):
            with rt.autocast():
                loss_sum, metric_sums = loss_fn(model, batch)
            scaler.scale(loss_sum / normalizer).backward()
        for k, v in {"loss": loss_sum, **metric_sums}.items():
            sums[k] = sums.get(k, 0.0) + float(v.detach() if torch.is_tensor(v) else v)
    grad_norm = optimizer_step(model, optimizer, scaler, cfg.max_grad_norm)
    total = normalizer * rt.world_size
    metrics = {k: v / total for k, v in all_reduce_sum_dict(sums, rt).items()}
    metrics["grad_norm"] = grad_norm
    return metrics


def all_reduce_sum_dict(values: dict, rt: Runtime) -> dict:
    if not rt.ddp:
        return values
    keys = sorted(values)
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=rt.device if rt.device.type == "cuda" else "cpu")
    dist.all_reduce(t)
    return dict(zip(keys, t.tolist()))


class NonFiniteError(RuntimeError):
    pass


def optimizer_step(model, optimizer, scaler, max_grad_norm: float) -> float:
    """Unscale (fp16), clip the synchronized gradients, step, zero. Returns the pre-clip grad norm.

    Call after the last micro-batch's backward, i.e. after DDP's all-reduce, so every rank clips the
    same global gradient. A non-finite norm skips the update (the GradScaler's rule) and is returned
    as is, for the caller to stop or count.
    """
    scaler.unscale_(optimizer)
    params = [p for p in model.parameters() if p.grad is not None]
    if max_grad_norm > 0:
        grad_norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
    else:
        grad_norm = torch.linalg.vector_norm(torch.stack([p.grad.detach().norm() for p in params]))
    grad_norm = float(grad_norm)
    if math.isfinite(grad_norm):
        scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return grad_norm


def check_finite(loss: float, grad_norm: float, step: int, cfg, stats: dict):
    """Stop (or, with --skip_nonfinite, count and go on) when the loss or gradient is NaN/inf."""
    if math.isfinite(loss) and math.isfinite(grad_norm):
        return
    stats["nonfinite_steps_skipped"] = stats.get("nonfinite_steps_skipped", 0) + 1
    if cfg.skip_nonfinite:
        return
    last = Path(cfg.out_dir) / "ckpt.pt"
    raise NonFiniteError(
        f"non-finite loss ({loss}) or gradient norm ({grad_norm}) at step {step}; the update was not applied. "
        f"Last good checkpoint: {last if last.exists() else 'none yet'}. Lower --lr, or pass --skip_nonfinite to skip such steps."
    )


# ------------------------------------------------------------------------------------ checkpoints

def check_writable(out_dir: str | os.PathLike, min_free_mb: int = 50):
    """Fail before training, not at the first save, when the output folder cannot be written."""
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write_probe"
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as e:
        raise RuntimeError(f"output folder {out} is not writable: {e}") from e
    free_mb = shutil.disk_usage(out).free / 2**20
    if free_mb < min_free_mb:
        raise RuntimeError(f"only {free_mb:.0f} MB free in {out}; need at least {min_free_mb} MB for checkpoints")


def atomic_save(obj, path: str | os.PathLike):
    """torch.save to a temp file in the same folder, fsync, then rename over `path` (atomic on POSIX)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)  # don't leave a partial checkpoint filling the disk (e.g. after ENOSPC)
        raise


def write_json(obj, path: str | os.PathLike):
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict):
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(out_dir, *, model, optimizer, scaler, step: int, cfg, tokenizer_path: str | None,
                    finished: bool = False, extra: dict | None = None, rt: Runtime | None = None):
    """Write out_dir/ckpt.pt atomically (rank 0 only), plus config.json and a copy of the tokenizer."""
    if rt is not None and not rt.is_main:
        return
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    base = unwrap(model)
    state = {
        "model": base.state_dict(),
        "model_kind": "scalar" if isinstance(base, ScalarModel) else "causal",
        "model_config": base.cfg.to_dict(),
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "scaler": scaler.state_dict() if scaler is not None else None,
        "step": step,
        "rng": rng_state(),
        "config": dataclasses.asdict(cfg),
        "finished": finished,
        **(extra or {}),
    }
    atomic_save(state, out / "ckpt.pt")
    write_json(dataclasses.asdict(cfg), out / "config.json")
    if tokenizer_path and Path(tokenizer_path).resolve() != (out / "tokenizer.model").resolve():
        tmp = out / "tokenizer.model.tmp"
        shutil.copyfile(tokenizer_path, tmp)
        os.replace(tmp, out / "tokenizer.model")


def load_checkpoint(path_or_dir, map_location="cpu") -> dict:
    path = Path(path_or_dir)
    if path.is_dir():
        path = path / "ckpt.pt"
    if not path.exists():
        raise FileNotFoundError(f"no checkpoint at {path}")
    return torch.load(path, map_location=map_location, weights_only=False)


def load_model(path_or_dir, kind: str = "causal", map_location="cpu"):
    """Build a model from a checkpoint folder's weights and config.

    kind="causal" -> CausalLM; kind="scalar" -> ScalarModel. Loading a causal checkpoint as a scalar
    model keeps the backbone and starts a fresh score head (how a reward model starts from SFT).
    """
    ckpt = load_checkpoint(path_or_dir, map_location)
    cfg = ModelConfig.from_dict(ckpt["model_config"])
    model = CausalLM(cfg) if kind == "causal" else ScalarModel(cfg)
    missing, unexpected = model.load_state_dict(ckpt["model"], strict=False)
    allowed_missing = {"score_head.weight", "score_head.bias"} if kind == "scalar" and ckpt["model_kind"] == "causal" else set()
    if set(missing) - allowed_missing or unexpected:
        raise ValueError(f"checkpoint {path_or_dir} does not fit a {kind} model: missing {missing}, unexpected {unexpected}")
    return model


def resume_from_checkpoint(cfg, model, optimizer, scaler) -> int:
    """With --resume, restore weights, optimizer, scaler and RNG from out_dir/ckpt.pt; return its step."""
    if not cfg.resume:
        return 0
    ckpt = load_checkpoint(cfg.out_dir)
    unwrap(model).load_state_dict(ckpt["model"])
    optimizer.load_state_dict(ckpt["optimizer"])
    if ckpt.get("scaler") is not None:
        scaler.load_state_dict(ckpt["scaler"])
    set_rng_state(ckpt["rng"])
    return int(ckpt["step"])


def should_save(step_done: int, start_step: int, cfg) -> bool:
    """Checkpoint every save_every steps, at the end, and before a --stop_after_steps exit."""
    return (step_done % cfg.save_every == 0 or step_done == cfg.max_steps
            or (cfg.stop_after_steps and step_done - start_step >= cfg.stop_after_steps))


def should_stop(step_done: int, start_step: int, cfg) -> bool:
    return bool(cfg.stop_after_steps) and step_done - start_step >= cfg.stop_after_steps and step_done < cfg.max_steps


def tokenizer_path_for(cfg) -> str:
    """The tokenizer that goes with the weights: the init checkpoint's copy if there is one."""
    if cfg.init_from:
        p = Path(cfg.init_from) / "tokenizer.model"
        if not p.exists():
            raise FileNotFoundError(f"{cfg.init_from} has no tokenizer.model next to its checkpoint")
        return str(p)
    if not Path(cfg.tokenizer).exists():
        raise FileNotFoundError(f"tokenizer {cfg.tokenizer} not found; train one with: python -m minialign.tokenizer")
    return cfg.tokenizer


def new_model(cfg, vocab_size: int, kind: str = "causal"):
    mcfg = model_config(cfg.preset, vocab_size=vocab_size, max_seq_len=max(cfg.max_len, model_config(cfg.preset).max_seq_len))
    return CausalLM(mcfg) if kind == "causal" else ScalarModel(mcfg)


# ---------------------------------------------------------------------------------------- metrics

class MetricsLog:
    """Appends one JSON object per logged step to out_dir/metrics.jsonl (rank 0 only)."""

    def __init__(self, out_dir, rt: Runtime, resume_step: int | None = None):
        self.path = Path(out_dir) / "metrics.jsonl"
        self.enabled = rt.is_main
        self.t0 = time.time()
        if self.enabled and resume_step is not None and self.path.exists():
            # drop lines logged after the checkpoint we resume from (they will be logged again), and a
            # last line cut short by the kill (no newline: it was being written)
            lines = [l for l in self.path.read_text().splitlines(keepends=True) if l.endswith("\n") and l.strip()]
            keep = [l.rstrip("\n") for l in lines if json.loads(l).get("step", 0) <= resume_step]
            self.path.write_text("".join(l + "\n" for l in keep))
        elif self.enabled and resume_step is None and self.path.exists():
            self.path.unlink()

    def log(self, step: int, metrics: dict, bar=None):
        if not self.enabled:
            return
        row = {"step": step, "time_s": round(time.time() - self.t0, 3), **{k: _jsonable(v) for k, v in metrics.items()}}
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        text = " ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items() if k != "time_s")
        (bar.write if bar is not None else print)(text)


def _jsonable(v):
    if isinstance(v, torch.Tensor):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    return v
