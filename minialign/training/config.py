"""Config dataclasses -> command-line flags, each checked when it is parsed.

A script's Config is a dataclass of knobs: every field has a default, a one-line help and optionally a
check, and becomes a `--flag`. A script inherits only the groups of knobs it reads:

    TrainConfig      every training script: output (and what to do with a run already there: --resume or
                     --overwrite), seed, device/precision, the LR schedule, clipping, logging, checkpoints
    SequenceBatch    --micro_batch_size in sequences (pretrain, SFT, KTO, PPO, GRPO)
    PairBatch        --micro_batch_pairs in preference pairs (RM, DPO, online DPO)
    OfflineConfig    scripts over a fixed dataset (pretrain, SFT, RM, DPO, KTO): + gradient accumulation
                     and --compile (online RL cuts its rollouts into micro-batches itself)
    FromScratch      scripts that can start from random weights (pretrain, SFT, RM): + --preset, --tokenizer
    PairsConfig      scripts reading preference files (RM, DPO, KTO): + --pku_choice, --rank_rule
    EvalConfig       scripts that score the policy with the default task's gold rule at the end
    GoldCurveConfig  DPO, KTO, PPO, GRPO: + gold-vs-KL points logged while training
    LoRAConfig       SFT, RM, DPO, KTO (OnlineLoRAConfig: PPO, GRPO): + --lora_r and its shape (minialign.models.lora)

A knob typed `X | None` with default None is "unset": the script's `resolve()` fills in the value it
depends on (e.g. DPO's β from the loss type) when the Config is made, so config.json holds the effective value.

One validation mechanism, run by `parse_config` before anything else happens: each field's check
(`knob(..., check=positive)`; a script overriding a knob's default keeps the base class's check), then
the Config's own `problems(world_size)` for rules that involve
several flags (and a LoRAConfig's `lora_problems()` and a TrainConfig's `out_dir_problems()`, so no script has
to remember to call them). Every
failure is an argparse error naming the flag: `train_sft.py: error: --lr=-1.0 must be > 0`, exit
status 2, nothing written.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import typing
from dataclasses import dataclass, field


def knob(default, help: str, check: tuple | None = None):
    """A config field: its default, a one-line help shown by --help, and an optional (predicate, rule) check."""
    meta = {"help": help, "check": check}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


# the checks fields use, each a (predicate, rule) pair; the rule completes "--flag=value ..."
positive = (lambda v: v > 0, "must be > 0")
non_negative = (lambda v: v >= 0, "must be >= 0")


def at_least(n):
    return (lambda v: v >= n, f"must be >= {n}")


def in_range(lo, hi):
    return (lambda v: lo <= v <= hi, f"must be in [{lo}, {hi}]")


def one_of(*choices):
    return (lambda v: v in choices, f"must be one of {', '.join(map(str, choices))}")


@dataclass
class TrainConfig:
    """Knobs every training script reads."""
    out_dir: str = knob("out/run", "output folder")
    resume: bool = knob(False, "continue from out_dir/ckpt.pt exactly where it stopped")
    overwrite: bool = knob(False, "start a new run in an out_dir that already holds one (its ckpt.pt, metrics.jsonl), "
                                  "replacing it; without this or --resume such a folder is refused")
    seed: int = knob(1337, "random seed (data order, init, sampling)")
    device: str = knob("auto", "auto | cpu | cuda | cuda:N",
                       (lambda v: v in ("auto", "cpu", "cuda") or v.startswith("cuda:"), "must be auto, cpu or cuda"))
    dtype: str = knob("auto", "auto (cpu: fp32, cuda: bf16) | fp32 | bf16 | fp16 (fp16 uses a GradScaler)",
                      one_of("auto", "fp32", "bf16", "fp16"))
    lr: float = knob(1e-3, "peak learning rate", positive)
    min_lr_ratio: float = knob(0.1, "cosine floor as a fraction of lr", in_range(0, 1))
    warmup_steps: int = knob(20, "linear warmup steps", non_negative)
    max_steps: int = knob(300, "optimizer steps", at_least(1))
    weight_decay: float = knob(0.0, "AdamW weight decay (matrices only)", non_negative)
    max_grad_norm: float = knob(1.0, "clip the global gradient norm to this (0 = off)", non_negative)
    max_len: int = knob(128, "max tokens per sequence (see the truncation policy in minialign.data.batching)", at_least(8))
    group_by_length: bool = knob(True, "sort each step's sequences by length before splitting them into micro-batches "
                                       "(less padding; the loss is unchanged, being a mean over the whole step)")
    log_every: int = knob(10, "log metrics every N steps", at_least(1))
    save_every: int = knob(100, "write a checkpoint every N steps (and at the end)", at_least(1))
    skip_nonfinite: bool = knob(False, "skip (and count) steps with a non-finite loss instead of stopping")
    stop_after_steps: int = knob(0, "exit after this many steps of THIS invocation, checkpointing first (time-sliced "
                                    "jobs; continue with --resume); 0 = run to max_steps", non_negative)
    gradient_checkpointing: bool = knob(False, "recompute each decoder block in the backward instead of keeping its "
                                               "activations (torch.utils.checkpoint, non-reentrant): same gradients, "
                                               "less memory, ~1 extra forward of the blocks per step")
    tensorboard: bool = knob(False, "also write TensorBoard event files to out_dir/tb (needs the [tensorboard] extra; "
                                    "metrics.jsonl stays the record)")

    def problems(self, world_size: int) -> list[str]:
        """Rules that involve several flags (or the number of ranks); a Config overrides it to add its own."""
        return []

    def out_dir_problems(self) -> list[str]:
        """--resume and --overwrite exclude each other (checked by parse_config for every script; what an out_dir
        that holds a run needs is minialign.training.checkpoint.check_out_dir)."""
        if self.resume and self.overwrite:
            return ["--resume and --overwrite together: --resume continues the run in --out_dir, --overwrite replaces "
                    "it; pass one of them"]
        return []

    def resolve(self) -> None:
        """Fill in the unset (None) knobs whose value depends on other flags; a Config overrides it. Run when the
        Config is made (parsed or built in code), so an unset knob never reaches the script."""

    def __post_init__(self):
        self.resolve()


@dataclass
class SequenceBatch:
    """Scripts whose forward pass holds whole sequences (pretrain, SFT, KTO, PPO, GRPO)."""
    micro_batch_size: int = knob(32, "sequences (prompt + one response) per forward pass per rank", at_least(1))

    @property
    def micro_batch(self) -> int:  # what minialign.training.loop cuts a step into, in this script's unit
        return self.micro_batch_size


@dataclass
class PairBatch:
    """Scripts whose forward pass holds preference pairs (RM, DPO, online DPO): a different unit, a different name."""
    micro_batch_pairs: int = knob(32, "preference pairs per forward pass per rank (one packed row [x | y_c | y_r] "
                                      "each, i.e. 2 responses)", at_least(1))

    @property
    def micro_batch(self) -> int:
        return self.micro_batch_pairs


@dataclass
class OfflineConfig(TrainConfig):
    """A fixed dataset cut into optimizer steps of grad_accum micro-batches per rank."""
    grad_accum: int = knob(1, "micro-batches per optimizer step (per rank)", at_least(1))
    compile: bool = knob(False, "torch.compile the trained model's forward "
                                "(opt-in: on 2 CPU cores the 26M SFT step ran "
                                "1.15x faster after ~40 s of compiling; needs a C++ compiler on CPU)")


@dataclass
class FSDPConfig:
    """--fsdp (every training script): shard the trained model over the ranks instead of replicating it
    (minialign.training.runtime); --shard_frozen: the frozen reference / reward models too."""
    fsdp: bool = knob(False, "under torchrun, shard the trained model's weights, gradients and AdamW state over the "
                             "ranks (FSDP2 fully_shard, each decoder block and the whole model) instead of DDP's full "
                             "copy per rank; checkpoints hold the full state dict")
    shard_frozen: bool = knob(False, "with --fsdp, shard the frozen reference and reward models too: 1/N of their "
                                     "weights per rank, at the cost of an all-gather per block in each of their "
                                     "forwards; off = a whole copy on every rank, no communication")

    def fsdp_problems(self, world_size: int) -> list[str]:
        if not self.fsdp:
            return ["--shard_frozen needs --fsdp"] if self.shard_frozen else []
        out = [] if world_size > 1 else ["--fsdp needs torchrun with 2 or more processes (one holds the whole model)"]
        if getattr(self, "lora_r", 0):
            out.append("--fsdp with --lora_r: not supported yet (shard a full fine-tuning, or use LoRA with DDP)")
        if getattr(self, "compile", False):
            out.append("--fsdp with --compile: not supported yet")
        return out


@dataclass
class FromScratch:
    """For scripts that can start from random weights (empty --init_from)."""
    preset: str = knob("cpu", "model preset when --init_from is empty (see minialign.models.decoder.PRESETS)")
    tokenizer: str = knob("out/tokenizer/tokenizer.model", "sentencepiece model when --init_from is empty "
                                                            "(otherwise the checkpoint's own copy is used)")


@dataclass
class PairsConfig:
    """How preference files that are not plain pairs become pairs (minialign.data.formats.load_preferences)."""
    pku_choice: str = knob("better", "PKU-SafeRLHF files: the chosen response is the better or the safer one",
                           one_of("better", "safer"))
    rank_rule: str = knob("all", "ranked-output files (responses best first): all K(K-1)/2 pairs, or best_vs_rest "
                                 "(the best against each other)", one_of("all", "best_vs_rest"))

    def pair_options(self) -> dict:
        return {"pku_choice": self.pku_choice, "rank_rule": self.rank_rule}


@dataclass
class EvalConfig:
    """The end-of-training evaluation with the default task's gold rule (minialign.evaluation.evaluate)."""
    eval_data: str = knob("data/rl_eval.jsonl",
                          "held-out prompts scored by the default task's gold rule ('' = no eval)")
    eval_prompts: int = knob(600, "how many held-out prompts to evaluate at the end (0 = all)", non_negative)
    eval_max_new_tokens: int = knob(48, "generation length for the evaluation", at_least(1))


@dataclass
class GoldCurveConfig(EvalConfig):
    """Gold-score and KL points logged while training (the gold-vs-KL curve of the report)."""
    gold_eval_every: int = knob(0, "every N steps also log the gold score (T=1) and KL to the SFT model on the first "
                                   "--gold_eval_prompts held-out prompts (0 = off)", non_negative)
    gold_eval_prompts: int = knob(200, "held-out prompts for --gold_eval_every", at_least(1))


LORA_TARGETS = ("q", "k", "v", "o", "gate", "up", "down")  # minialign.models.lora.TARGETS: the projections by short name


@dataclass
class LoRAConfig:
    """Low-rank adapters instead of full fine-tuning (minialign.models.lora); the reference becomes the adapters-off model."""
    lora_r: int = knob(0, "LoRA rank r: train (alpha/r)·B A on the --lora_targets projections, every base weight "
                          "frozen; the reference (DPO, KTO, PPO, GRPO) is the same model with the adapters off. "
                          "0 = full fine-tuning", non_negative)
    lora_alpha: float = knob(16.0, "LoRA alpha: the update is scaled by alpha / r (with r 8: x2)", positive)
    lora_dropout: float = knob(0.0, "dropout on the adapters' input while training",
                               (lambda v: 0 <= v < 1, "must be in [0, 1)"))
    lora_targets: list[str] = knob(list(LORA_TARGETS), "projections that get adapters: q k v o (attention), gate up "
                                                       "down (MLP, MoE experts too)",
                                   (lambda v: 0 < len(v) == len(set(v)) and set(v) <= set(LORA_TARGETS),
                                    f"must be distinct names among {' '.join(LORA_TARGETS)}"))
    lora_base_dtype: str = knob("fp32", "dtype the frozen base is stored in: fp32, or bf16 (half its memory; the "
                                        "adapters and AdamW state stay fp32, the matmuls run in the activations' "
                                        "dtype, logits within a few 1e-3 of the fp32 base's, and the reference is "
                                        "the bf16 base with the adapters off). Needs --lora_r", one_of("fp32", "bf16"))

    def lora_problems(self) -> list[str]:
        """LoRA's cross-flag rules, checked by parse_config for every Config that has these knobs."""
        if not self.lora_r:
            if self.lora_base_dtype != "fp32":
                return [f"--lora_base_dtype {self.lora_base_dtype} needs --lora_r: only a frozen base can be stored "
                        "in bf16 (full fine-tuning keeps fp32 master weights)"]
            return []
        out = []
        if self.lora_base_dtype == "bf16" and getattr(self, "dtype", "") == "fp16":
            out.append("--lora_base_dtype bf16 with --dtype fp16: fp16 autocast would copy every bf16 weight to fp16 "
                       "for the backward; use --dtype bf16 (or auto)")
        if not getattr(self, "init_from", ""):
            out.append(f"--lora_r={self.lora_r} needs --init_from: adapters train on top of saved weights (a random "
                       "base would be lost with the run, its checkpoint holding only the adapters)")
        if getattr(self, "ref_update_every", 0):
            out.append("--ref_update_every with --lora_r: the LoRA reference is the frozen base (adapters off), "
                       "which cannot move towards the policy; use full fine-tuning for TR-DPO")
        return out


@dataclass
class OnlineLoRAConfig(LoRAConfig):
    """LoRA for online RL (PPO, GRPO): no adapter dropout, which would make π / π_old differ from 1 at the first
    update (the rollout's log-probs and the update's are two forwards that must agree)."""
    lora_dropout: float = knob(0.0, "dropout on the adapters' input: must be 0 in online RL (the first update's "
                                    "ratio π / π_old must be exactly 1)",
                               (lambda v: v == 0, "must be 0 in online RL (two forwards of a rollout must agree)"))


def _arg_type(tp):
    if tp in (int, float, str):
        return tp
    raise TypeError(f"unsupported config field type {tp}")


def _unset_able(tp):
    """X for a knob typed `X | None` (None = unset, resolved by the Config), else None."""
    args = typing.get_args(tp)
    if type(None) in args and len(args) == 2:
        return next(a for a in args if a is not type(None))
    return None


def _inherited_check(cls, name: str):
    """A field's check; a script that overrides a knob's default (and help) keeps the base class's check."""
    for base in cls.__mro__:
        for f in dataclasses.fields(base) if dataclasses.is_dataclass(base) else ():
            if f.name == name and f.metadata.get("check") is not None:
                return f.metadata["check"]
    return None


def parse_config(cls, argv=None):
    """Build argparse flags from a config dataclass, parse, and check; unknown flags are an error.

    The number of ranks is read from torchrun's WORLD_SIZE, so rank-dependent rules fail at parse time too.
    """
    hints = typing.get_type_hints(cls)
    doc = (sys.modules[cls.__module__].__doc__ or "").split("\n\n")[0]
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    for f in dataclasses.fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        tp, help = hints[f.name], f.metadata.get("help", "")
        if tp is bool:
            ap.add_argument(f"--{f.name}", action=argparse.BooleanOptionalAction, default=default, help=help)
        elif _unset_able(tp) is not None:
            ap.add_argument(f"--{f.name}", type=_arg_type(_unset_able(tp)), default=default, help=help)
        elif typing.get_origin(tp) is list:
            (item,) = typing.get_args(tp)
            ap.add_argument(f"--{f.name}", nargs="*", type=_arg_type(item), default=default, help=help)
        else:
            ap.add_argument(f"--{f.name}", type=_arg_type(tp), default=default, help=help)
    cfg = cls(**vars(ap.parse_args(argv)))
    problems = []
    for f in dataclasses.fields(cls):
        check = _inherited_check(cls, f.name)
        if check is not None and getattr(cfg, f.name) is not None and not check[0](getattr(cfg, f.name)):
            problems.append(f"--{f.name}={getattr(cfg, f.name)!r} {check[1]}")
    if not problems:  # the cross-flag rules may assume every field is individually valid
        problems = cfg.problems(int(os.environ.get("WORLD_SIZE", "1")))
        problems += cfg.lora_problems() if isinstance(cfg, LoRAConfig) else []
        problems += cfg.out_dir_problems() if isinstance(cfg, TrainConfig) else []
        problems += cfg.fsdp_problems(int(os.environ.get("WORLD_SIZE", "1"))) if isinstance(cfg, FSDPConfig) else []
    if problems:
        ap.error("; ".join(problems))
    return cfg


def rl_problems(cfg, world_size: int) -> list[str]:
    """The flag rules PPO and GRPO share (for their Config.problems): prompts split over ranks, room for a
    prompt within max_len, and a reward model exactly when a reward_model term is asked for."""
    out = []
    if cfg.prompts_per_step < world_size:
        out.append(f"--prompts_per_step={cfg.prompts_per_step} must be >= the {world_size} rank(s)")
    elif cfg.prompts_per_step % world_size:
        out.append(f"--prompts_per_step={cfg.prompts_per_step} must be divisible by the {world_size} ranks")
    if cfg.max_new_tokens >= cfg.max_len:
        out.append(f"--max_new_tokens={cfg.max_new_tokens} must be < --max_len={cfg.max_len} "
                   "(prompts get the difference)")
    if ("reward_model" in cfg.reward_funcs) != bool(cfg.reward_model):
        out.append("--reward_model PATH and 'reward_model' in --reward_funcs go together (no model: --reward_model '')")
    return out
