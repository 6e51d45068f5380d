"""Checkpoints: written atomically, self-describing, restored exactly; and loading a model from one.

A checkpoint (out_dir/ckpt.pt) holds the weights, the model config, the optimizer, the scaler, the
step, the RNG states of this process (and of every CUDA device, per rank) and the resolved run
config; config.json and a copy of the tokenizer sit beside it, so a folder is all the next stage needs
(`--init_from out/sft`). It is written to a temporary file, fsynced, then renamed, so a kill never
leaves a half-written one; `--resume` restores all of it, and the data order being a pure function of
(seed, epoch), the position in the data is just the step number.

A LoRA run (minialign.models.lora) stores only its adapters and trainable heads under "model", and under "lora"
the adapter shape and its base: the path given as --init_from (and its absolute form) and the sha256 of the
base's frozen weights. `load_model` rebuilds such a checkpoint as a plain model, the adapters merged into
the base after checking the hash, so every consumer (--init_from of the next stage, minialign.evaluation.evaluate,
the reward model CLI) reads it like a full one; `write_merged` (python -m minialign.training.checkpoint merge) saves that
as a full checkpoint.

A folder that holds a run is never silently replaced: `check_out_dir`, called by every training script before it
writes anything, refuses an --out_dir with a ckpt.pt or a metrics.jsonl unless --resume (continue it) or
--overwrite (replace it) says what to do with it; `run_state` is what it reads, and what the stage runner reads.

Checkpoints are what users share, so every one is read with torch.load(weights_only=True): tensors and plain
containers (dicts, lists, tuples, str, numbers, None) and nothing that unpickling could call. What save() writes
is only that: the RNG states too (NumPy's key array as an int64 tensor). A file that needs any other type is
refused with a CheckpointError naming the file and the type, and nothing in it runs. Checkpoints of earlier
versions pickled np.random.get_state() (a uint32 ndarray); they are refused with a pointer to
`python -m minialign.training.checkpoint upgrade DIR --trust-this-file`, which rewrites them once, unpickling
NumPy arrays and nothing else beyond a weights-only load.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pickle
import random
import re
import shutil
import sys
from pathlib import Path

import numpy as np
import torch

from minialign.errors import UserError, run_cli
from minialign.models import lora
from minialign.models.decoder import CausalLM, ModelConfig, ScalarModel, model_config
from minialign.training.runtime import (Runtime, all_gather_object, full_state_dicts, is_sharded,
                                        load_full_state_dicts, unwrap)


class CheckpointError(UserError, ValueError):
    """A checkpoint refused because loading it would need more than tensors and plain containers; names the file."""


# what save() pickled before weights-only loading, beyond tensors and plain containers: np.random.get_state()'s
# uint32 key array (numpy 2 writes numpy._core, numpy 1 numpy.core)
EARLIER_NUMPY_GLOBALS = ("numpy.ndarray", "numpy.dtype", "numpy._core.multiarray._reconstruct",
                         "numpy.core.multiarray._reconstruct")


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
    """This process's RNG states: Python, NumPy, torch CPU, and its own CUDA device (if any).

    Tensors and plain containers only, so a weights-only load reads them back.
    """
    state = {"python": random.getstate(), "numpy": plain_numpy_state(np.random.get_state()),
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()  # the current device: each rank has its own
    return state


def plain_numpy_state(legacy: tuple) -> dict:
    """np.random.get_state()'s tuple without NumPy types: its uint32 key array as an int64 tensor."""
    name, key, pos, has_gauss, cached_gaussian = legacy
    return {"bit_generator": str(name), "key": torch.from_numpy(np.asarray(key, dtype=np.int64)), "pos": int(pos),
            "has_gauss": int(has_gauss), "cached_gaussian": float(cached_gaussian)}


def set_rng_state(state: dict):
    random.setstate(state["python"])
    s = state["numpy"]
    np.random.set_state((s["bit_generator"], s["key"].numpy().astype(np.uint32), s["pos"], s["has_gauss"],
                         s["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def save(out_dir, *, model, optimizer, scaler, step: int, cfg, tokenizer_path: str | None,
         finished: bool = False, extra: dict | None = None, rt: Runtime | None = None, root=None):
    """Write out_dir/ckpt.pt atomically (rank 0 only), plus config.json and a copy of the tokenizer.

    Every rank must call it (at the same steps): the RNG states of all ranks are gathered first, so each
    rank restores its own on --resume. root: the module the optimizer was built over when it is more than `model`
    (PPO's policy-and-value pair); with FSDP the optimizer's state is gathered over it, keyed by names under it.
    """
    rngs = all_gather_object(rng_state(), rt) if rt is not None else [rng_state()]
    base = unwrap(model)
    holder = unwrap(root) if root is not None else base
    sharded = is_sharded(holder)
    if sharded:  # every rank takes part in gathering the full tensors
        full_sd, optim_sd = full_state_dicts(holder, optimizer)
        prefix = _prefix(holder, base)
        model_sd = {k[len(prefix):]: v for k, v in full_sd.items() if k.startswith(prefix)}
    if rt is not None and not rt.is_main:
        return
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if not sharded:
        model_sd = model_state(base)
        optim_sd = optimizer.state_dict() if optimizer is not None else None
    state = {
        "model": model_sd,
        "optimizer_by_name": sharded,  # FSDP: the optimizer state is keyed by parameter name (full_state_dicts)
        "lora": base.lora_meta if lora.is_lora(base) else None,
        "model_kind": "scalar" if isinstance(base, ScalarModel) else "causal",
        "model_config": base.cfg.to_dict(),
        "optimizer": optim_sd,
        "scaler": scaler.state_dict() if scaler is not None else None,
        "step": step,
        "rng": rngs,  # one entry per rank
        "config": dataclasses.asdict(cfg),
        "script": script_of(cfg),
        "finished": finished,
        **(extra or {}),
    }
    atomic_save(state, out / "ckpt.pt")
    write_json(dataclasses.asdict(cfg), out / "config.json")
    copy_tokenizer(tokenizer_path, out)


def script_of(cfg) -> str:
    """The file name of the script whose Config `cfg` is (train_sft.py), for the checkpoint to say who wrote it."""
    path = getattr(sys.modules.get(type(cfg).__module__), "__file__", None)
    return Path(path).name if path else type(cfg).__module__


RUN_FILES = ("ckpt.pt", "metrics.jsonl", "config.json", "eval.json", "completions.jsonl")  # what a run leaves


def run_state(run_dir) -> dict | None:
    """What the run in run_dir is, or None when it holds none (no ckpt.pt and no metrics.jsonl):
        {"script": "train_sft.py" or None, "step": int, "max_steps": int or None, "finished": bool,
         "checkpoint": bool (ckpt.pt exists), "files": [the RUN_FILES present]}
    Read from ckpt.pt (memory-mapped: the weights are not read) or, without one, from metrics.jsonl's last step."""
    run_dir = Path(run_dir)
    files = [f for f in RUN_FILES if (run_dir / f).is_file()]
    if "ckpt.pt" in files:
        ckpt = load(run_dir, mmap=True)
        return {"script": ckpt.get("script"), "step": int(ckpt["step"]),
                "max_steps": (ckpt.get("config") or {}).get("max_steps"), "finished": bool(ckpt.get("finished")),
                "checkpoint": True, "files": files}
    if "metrics.jsonl" in files:
        steps = []
        for line in (run_dir / "metrics.jsonl").read_text(errors="replace").splitlines():
            try:
                steps.append(int(json.loads(line).get("step", 0)))
            except (ValueError, AttributeError, TypeError):  # a last line cut short by a kill
                pass
        return {"script": None, "step": max(steps, default=0), "max_steps": None, "finished": False,
                "checkpoint": False, "files": files}
    return None


def describe_run(state: dict) -> str:
    """run_state as a phrase: 'train_sft.py, step 600 of 600, finished; ckpt.pt, metrics.jsonl, eval.json'."""
    if not state["checkpoint"]:
        return (f"metrics.jsonl logged up to step {state['step']} and no checkpoint (a run stopped before its first "
                f"save); {', '.join(state['files'])}")
    of = f" of {state['max_steps']}" if state["max_steps"] else ""
    return (f"{state['script'] or 'a run'}, step {state['step']}{of}, {'finished' if state['finished'] else 'not finished'}"
            f"; {', '.join(state['files'])}")


def check_out_dir(cfg) -> None:
    """The rule for an --out_dir that already holds a run (a ckpt.pt or a metrics.jsonl): refused, naming the folder
    and what it holds, unless --resume (continue it from its ckpt.pt) or --overwrite (start a new run there; the old
    files are replaced as the new run writes its own: metrics.jsonl at once, ckpt.pt at the first checkpoint).

    Every training script calls it right after parsing its flags, on every rank, before anything is written; it only
    reads. (Under torchrun rank 0 writes no run file before the DDP wrap, a collective every rank reaches after its
    own check, so no rank sees rank 0's new files. --resume with --overwrite is refused when the flags are parsed:
    minialign.training.config.)"""
    state = run_state(cfg.out_dir)
    if cfg.resume and not (state and state["checkpoint"]):
        held = f" ({describe_run(state)})" if state else ""
        raise UserError(f"--resume: --out_dir {cfg.out_dir} holds no checkpoint (ckpt.pt) to continue{held}; "
                        "without --resume a new run starts there")
    if state and not (cfg.resume or cfg.overwrite):
        raise UserError(f"--out_dir {cfg.out_dir} already holds a run ({describe_run(state)}): pass --resume to "
                        "continue it, --overwrite to replace it, or another --out_dir")


def copy_tokenizer(tokenizer_path: str | None, out: Path):
    """Put the tokenizer next to the weights: an HF tokenizer folder's files, or our tokenizer.model."""
    if tokenizer_path and Path(tokenizer_path).is_dir():  # an HF tokenizer: tokenizer.json and its config
        from minialign.data.hf_tokenizer import copy_tokenizer_files
        copy_tokenizer_files(tokenizer_path, out)
    elif tokenizer_path and Path(tokenizer_path).resolve() != (out / "tokenizer.model").resolve():
        tmp = out / "tokenizer.model.tmp"
        shutil.copyfile(tokenizer_path, tmp)
        os.replace(tmp, out / "tokenizer.model")


def ckpt_file(path_or_dir) -> Path:
    """A checkpoint folder's ckpt.pt, or the file itself."""
    path = Path(path_or_dir)
    path = path / "ckpt.pt" if path.is_dir() else path
    if not path.exists():
        raise FileNotFoundError(f"no checkpoint at {path}")
    return path


def load(path_or_dir, map_location="cpu", mmap: bool = False) -> dict:
    """A checkpoint (the folder's ckpt.pt, or the file), loaded weights-only (see the module docstring); mmap=True
    maps the tensors instead of reading them."""
    return load_file(ckpt_file(path_or_dir), map_location, mmap)


def load_file(path, map_location="cpu", mmap: bool = False):
    """torch.load(weights_only=True): a file someone else made cannot run code; one that needs more is refused."""
    try:
        return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:  # what the weights-only unpickler raises for every type it does not allow
        needs = unsafe_globals(path, e)
        if not needs:
            raise  # no type refused: a damaged or foreign file, as torch reports it
        raise CheckpointError(refusal(path, needs)) from None


def unsafe_globals(path, err: Exception) -> list[str]:
    """The types and functions the pickle in `path` names beyond a weights-only load (read, never run)."""
    try:  # all of them, from the pickle's opcodes
        return torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception:  # torch < 2.5, or not a zip checkpoint: the one torch's message names
        return re.findall(r"GLOBAL (\S+)", str(err))


def refusal(path, needs: list[str]) -> str:
    """Why `path` is refused: the types it needs (an earlier minialign's NumPy arrays point at `upgrade`)."""
    if set(needs) <= set(EARLIER_NUMPY_GLOBALS):
        folder = Path(path).parent if Path(path).name == "ckpt.pt" else path
        return (f"{path} was written by an earlier minialign: it holds NumPy arrays ({', '.join(needs)}), which a "
                "weights-only load refuses; if you trust where this file came from, convert it once: "
                f"python -m minialign.training.checkpoint upgrade {folder} --trust-this-file")
    return (f"{path}: refused: loading it needs {', '.join(needs)}, not only tensors and plain containers; "
            "unpickling it could run code hidden in the file (nothing was run)")


def upgrade(path_or_dir) -> bool:
    """Rewrite an earlier minialign's checkpoint (NumPy RNG states) so that a weights-only load reads it; in place.

    Only NumPy's array reconstruction is allowed beyond a weights-only load: a file that needs anything else
    is refused like any other. Returns False when there was nothing to convert.
    """
    path = ckpt_file(path_or_dir)
    try:
        load_file(path)
        return False
    except CheckpointError:
        pass
    reconstruct = (np._core if hasattr(np, "_core") else np.core).multiarray._reconstruct
    arrays = [(np.ndarray, "numpy.ndarray"), (np.dtype, "numpy.dtype"), type(np.dtype(np.uint32))] + [
        (reconstruct, name) for name in EARLIER_NUMPY_GLOBALS if name.endswith("._reconstruct")]
    with torch.serialization.safe_globals(arrays):
        ckpt = load_file(path)
    for rank_rng in ckpt["rng"] if isinstance(ckpt["rng"], list) else [ckpt["rng"]]:
        if isinstance(rank_rng["numpy"], tuple):
            rank_rng["numpy"] = plain_numpy_state(rank_rng["numpy"])
    tmp = path.with_name(path.name + ".upgraded")
    atomic_save(ckpt, tmp)
    try:
        load_file(tmp)  # every NumPy array it held was an RNG state: it now loads weights-only
    except BaseException:
        tmp.unlink()
        raise
    os.replace(tmp, path)
    return True


def load_model(path_or_dir, kind: str = "causal", map_location="cpu", max_seq_len: int | None = None):
    """Build a model from a checkpoint folder's weights and config, ours or a Hugging Face model folder.

    kind="causal" -> CausalLM; kind="scalar" -> ScalarModel. Loading a causal checkpoint as a scalar
    model keeps the backbone and starts a fresh score head (how a reward model starts from SFT).
    A Hugging Face folder (config.json + safetensors, Llama / Qwen2 / Qwen3; minialign.models.hf_weights) loads into our
    model in fp32 master weights; max_seq_len caps its RoPE table (default: max_position_embeddings).
    """
    from minialign.models import \
        hf_weights  # safetensors is an optional extra: imported only when an HF folder is loaded

    if hf_weights.is_hf_folder(path_or_dir):
        return hf_weights.load_hf_model(path_or_dir, kind, max_seq_len=max_seq_len)
    ckpt = load(path_or_dir, map_location)
    cfg = ModelConfig.from_dict(ckpt["model_config"])
    state = merged_lora_state(path_or_dir, ckpt) if ckpt.get("lora") else dict(ckpt["model"])
    model = CausalLM(cfg) if kind == "causal" else ScalarModel(cfg)
    if kind == "scalar" and ckpt["model_kind"] == "causal":
        state.pop("lm_head.weight", None)  # an untied causal model's output head: a reward model has none
    missing, unexpected = model.load_state_dict(state, strict=False)
    allowed_missing = ({"score_head.weight", "score_head.bias"}
                       if kind == "scalar" and ckpt["model_kind"] == "causal" else set())
    if set(missing) - allowed_missing or unexpected:
        raise ValueError(f"checkpoint {path_or_dir} does not fit a {kind} model: missing {missing}, "
                         f"unexpected {unexpected}")
    return model


def lora_base_path(meta: dict) -> str:
    """Where a LoRA checkpoint's base is: the path as given at training time, else its absolute form."""
    for p in (meta["base"], meta["base_abspath"]):
        if Path(p).exists():
            return p
    raise FileNotFoundError(f"the base of this LoRA checkpoint, {meta['base']} ({meta['base_abspath']}), is gone")


def merged_lora_state(path_or_dir, ckpt: dict) -> dict:
    """A LoRA checkpoint's full state_dict: its base loaded (itself merged if it is a LoRA run), checked against
    the recorded hash of its frozen weights, the adapters applied and merged in."""
    meta = ckpt["lora"]
    base = load_model(lora_base_path(meta), kind=ckpt["model_kind"])
    digest = lora.weights_hash(base, skip=tuple(meta["trainable"]))
    if digest != meta["base_sha256"]:
        raise ValueError(f"{path_or_dir}: its base {meta['base']} is not the model its adapters were trained on "
                         f"(frozen weights sha256 {digest[:12]}..., recorded {meta['base_sha256'][:12]}...)")
    lora.apply_lora(base, meta["r"], meta["alpha"], meta["dropout"], meta["targets"], tuple(meta["trainable"]))
    lora.load_lora_state_dict(base, ckpt["model"])
    return lora.merge_and_unload(base).state_dict()


def write_merged(ckpt_dir, out_dir) -> Path:
    """A LoRA run's folder -> a full checkpoint folder (merged weights, its config and tokenizer; no optimizer)."""
    ckpt = load(ckpt_dir)
    if not ckpt.get("lora"):
        raise ValueError(f"{ckpt_dir} is not a LoRA run (its checkpoint holds full weights already)")
    model = load_model(ckpt_dir, kind=ckpt["model_kind"])
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    keep = ("model_kind", "model_config", "step", "config", "finished")
    atomic_save({**{k: ckpt[k] for k in keep}, "model": model.state_dict(), "lora": None, "optimizer": None,
                 "scaler": None, "rng": ckpt["rng"], "merged_from": {"ckpt": str(ckpt_dir), **ckpt["lora"]}},
                out / "ckpt.pt")
    write_json(ckpt["config"], out / "config.json")
    src = Path(ckpt_dir) if Path(ckpt_dir).is_dir() else Path(ckpt_dir).parent
    tok = src if (src / "tokenizer.json").exists() else src / "tokenizer.model"
    copy_tokenizer(str(tok) if tok.exists() else None, out)
    return out


def model_state(model) -> dict:
    """The weights a checkpoint stores: all of them, or for a LoRA model its adapters and trainable heads."""
    return lora.lora_state_dict(model) if lora.is_lora(model) else model.state_dict()


def load_model_state(model, state: dict, lora_meta: dict | None, where):
    """Restore `model_state` output into the model of a resumed run, which must have the same adapters and base."""
    if lora.is_lora(model) != bool(lora_meta):
        held = f"a LoRA run (r={lora_meta['r']})" if lora_meta else "a full fine-tuning run"
        raise ValueError(f"{where} holds {held}: resume it with the same --lora_r, --lora_targets, --init_from")
    if not lora_meta:
        model.load_state_dict(state)
        return
    keys = ("r", "alpha", "dropout", "targets", "trainable", "base_sha256", "base_dtype")
    ours, saved = ({"base_dtype": "fp32", **meta} for meta in (model.lora_meta, lora_meta))  # older runs: fp32
    changed = [k for k in keys if ours[k] != saved[k]]
    if changed:
        raise ValueError(f"{where} was trained with other adapters or another base ({', '.join(changed)} differ): "
                         "resume with the same --lora_* flags and --init_from")
    lora.load_lora_state_dict(model, state)


def extra_model(name: str, model) -> dict:
    """A second trained model (PPO's value model) for save(extra=...): its weights (or adapters), LoRA and config.
    Every rank must call it (a sharded model's full weights are gathered; rank 0 keeps them)."""
    state = full_state_dicts(model, None)[0] if is_sharded(model) else model_state(model)
    return {name: state, f"{name}_lora": getattr(model, "lora_meta", None), f"{name}_config": model.cfg.to_dict()}


def _prefix(root, module) -> str:
    """The state-dict key prefix of `module` inside `root` ('' for root itself, 'policy.' in PPO's pair)."""
    name = next(n for n, m in root.named_modules() if m is module)
    return name + "." if name else ""


def resume(cfg, model, optimizer, scaler, rt: Runtime | None = None, root=None, extra_models: dict | None = None) -> int:
    """With --resume, restore weights, optimizer, scaler and this rank's RNG from out_dir/ckpt.pt; return its step.
    root: as for `save`; extra_models: {name: model} saved with `extra_model` (PPO's value model), restored too.
    With FSDP call it after sharding and after building the optimizer (each rank keeps its shards)."""
    if not cfg.resume:
        return 0
    ckpt = load(cfg.out_dir)
    holder = unwrap(root) if root is not None else unwrap(model)
    extra_models = extra_models or {}
    if is_sharded(holder) != bool(ckpt.get("optimizer_by_name")):
        raise UserError(f"{cfg.out_dir} was written by a run {'with' if ckpt.get('optimizer_by_name') else 'without'} "
                        "--fsdp: resume it the same way (its weights load anywhere: --init_from)")
    if is_sharded(holder):
        full = {}
        for module, state in [(unwrap(model), ckpt["model"])] + [(m, ckpt[n]) for n, m in extra_models.items()]:
            prefix = _prefix(holder, module)
            full.update({prefix + k: v for k, v in state.items()})
        load_full_state_dicts(holder, optimizer, full, ckpt["optimizer"])
    else:
        load_model_state(unwrap(model), ckpt["model"], ckpt.get("lora"), cfg.out_dir)
        for name, m in extra_models.items():
            load_model_state(m, ckpt[name], ckpt.get(f"{name}_lora"), cfg.out_dir)
        optimizer.load_state_dict(ckpt["optimizer"])
    if ckpt.get("scaler") is not None:
        scaler.load_state_dict(ckpt["scaler"])
    rngs = ckpt["rng"] if isinstance(ckpt["rng"], list) else [ckpt["rng"]]
    rank = rt.rank if rt is not None else 0
    set_rng_state(rngs[rank] if rank < len(rngs) else rngs[0])  # a run resumed on more ranks: rank 0's for the new ones
    return int(ckpt["step"])


def should_save(step_done: int, start_step: int, cfg) -> bool:
    """Checkpoint every save_every steps, at the end, and before a --stop_after_steps exit."""
    return (step_done % cfg.save_every == 0 or step_done == cfg.max_steps
            or (cfg.stop_after_steps and step_done - start_step >= cfg.stop_after_steps))


def should_stop(step_done: int, start_step: int, cfg) -> bool:
    return bool(cfg.stop_after_steps) and step_done - start_step >= cfg.stop_after_steps and step_done < cfg.max_steps


def tokenizer_path_for(init_from: str, tokenizer: str = "") -> str:
    """The tokenizer that goes with the weights: the init checkpoint's copy if there is one, else `tokenizer`.

    Ours is a tokenizer.model file; a folder with tokenizer.json (an HF model, or a checkpoint that started
    from one) is returned as the folder. Load either with minialign.data.tokenizer.load_tokenizer.
    """
    if init_from:
        if (Path(init_from) / "tokenizer.json").exists():
            return str(init_from)
        p = Path(init_from) / "tokenizer.model"
        if not p.exists():
            raise FileNotFoundError(f"{init_from} has neither tokenizer.model nor tokenizer.json next to its weights")
        return str(p)
    if not Path(tokenizer).exists():
        raise FileNotFoundError(f"tokenizer {tokenizer} not found; train one with: python -m minialign.data.tokenizer")
    return tokenizer


def new_model(cfg, vocab_size: int, kind: str = "causal"):
    mcfg = model_config(cfg.preset, vocab_size=vocab_size,
                        max_seq_len=max(cfg.max_len, model_config(cfg.preset).max_seq_len))
    return CausalLM(mcfg) if kind == "causal" else ScalarModel(mcfg)


def main(argv=None):
    """python -m minialign.training.checkpoint merge --ckpt out/dpo --out out/dpo_merged: a LoRA run -> a full checkpoint.
    python -m minialign.training.checkpoint upgrade out/sft --trust-this-file: an earlier version's checkpoint -> today's."""
    ap = argparse.ArgumentParser(prog="python -m minialign.training.checkpoint",
                                 description="Checkpoint folders: merge a LoRA run into a full checkpoint; upgrade "
                                             "an earlier version's checkpoint so that it loads weights-only.")
    sub = ap.add_subparsers(dest="cmd", required=True)
    mg = sub.add_parser("merge", help="merge a LoRA run's adapters into its base: a full checkpoint folder "
                                      "(any stage's --init_from, python -m minialign.training.hf_export --ckpt)")
    mg.add_argument("--ckpt", required=True, help="folder of a LoRA run (its ckpt.pt names and hashes its base)")
    mg.add_argument("--out", required=True, help="output folder: ckpt.pt (merged weights), config.json, tokenizer")
    up = sub.add_parser("upgrade", help="rewrite a checkpoint of an earlier minialign (NumPy RNG state pickled) "
                                        "so that it loads weights-only; in place, once")
    up.add_argument("ckpt", help="checkpoint folder (with ckpt.pt) or the file itself")
    up.add_argument("--trust-this-file", action="store_true",
                    help="required: say you trust where the file came from (only NumPy arrays are unpickled beyond "
                         "a weights-only load; a file that needs anything else is still refused)")
    args = ap.parse_args(argv)
    if args.cmd == "upgrade":
        if not args.trust_this_file:
            ap.error(f"upgrade {args.ckpt}: add --trust-this-file if you trust where this checkpoint came from")
        path = ckpt_file(args.ckpt)
        print(f"upgraded {path}" if upgrade(path) else f"{path} loads weights-only already: nothing to convert")
        return
    try:
        out = write_merged(args.ckpt, args.out)
    except (FileNotFoundError, ValueError) as e:
        raise UserError(str(e)) from e
    print(f"merged {args.ckpt} -> {out}")


if __name__ == "__main__":
    run_cli(main)
