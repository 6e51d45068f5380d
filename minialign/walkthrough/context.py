"""What every walkthrough starts from: the SFT checkpoint (the main job's out/sft, or a tiny one trained here in
seconds), the default task's data, a CPU runtime, one optimizer step, and the scripts' defaults.

The tiny model (no out/sft, or --tiny): a 1024-piece tokenizer trained on the SFT conversations, a 2-layer
dim-64 decoder (0.16M parameters), 150 SFT steps of 32 conversations at lr 3e-3 on data/sft_train.jsonl with
the package's own loop (loop.train_step, the SFT loss below). It writes the default task's templates with
rough arithmetic. It is written to a temporary folder as a real checkpoint, so every walkthrough loads it
exactly as it loads out/sft. One thread, seeded: the same numbers on every run (tests/test_walkthrough.py).
"""

from __future__ import annotations

import atexit
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import torch

from minialign.algorithms.losses import SUM, nll_loss, token_logps
from minialign.data.batching import collate_lm, tokenize_sft
from minialign.data.formats import load_sft
from minialign.data.tokenizer import load_tokenizer, train_tokenizer
from minialign.models.decoder import CausalLM, model_config
from minialign.training import checkpoint, loop, runtime

REPO_DATA = Path(__file__).resolve().parents[2] / "data"  # the default task, next to the package in a checkout
MAX_LEN = 128  # the scripts' --max_len

# The scripts' defaults the walkthroughs use (tests/test_walkthrough.py checks each against the script's Config).
SCRIPT_DEFAULTS = {
    "sft": {"lr": 3e-3},
    "rm": {"lr": 5e-4},
    "dpo": {"lr": 2e-4},
    "kto": {"lr": 2e-4, "beta": 2.0},
    "ppo": {"lr": 3e-4, "kl_coef": 0.5, "gamma": 1.0, "lam": 0.95, "cliprange": 0.2, "cliprange_value": 0.2,
            "vf_coef": 0.1, "temperature": 1.0},
    "grpo": {"lr": 5e-4, "beta": 0.0, "epsilon_low": 0.2, "epsilon_high": 0.2, "temperature": 1.0},
    "online_dpo": {"lr": 5e-4},
}
MAX_GRAD_NORM = 1.0  # every script's --max_grad_norm


@dataclass(frozen=True)
class TinyRecipe:
    """How the tiny SFT model is made (saved as its checkpoint's config)."""
    vocab_size: int = 1024
    dim: int = 64
    n_layers: int = 2
    n_heads: int = 4
    n_kv_heads: int = 2
    steps: int = 150
    micro_batch_size: int = 32
    lr: float = 3e-3
    warmup_steps: int = 10
    seed: int = 0


def cpu_runtime() -> runtime.Runtime:
    return runtime.Runtime(torch.device("cpu"), torch.float32)


def sft_loss(model, batch):
    """train_sft.py's loss, composed the same way: Σ -log π(y_t) over the assistant tokens (loop.train_step divides
    by the step's count). tests/test_walkthrough.py checks it equals train_sft.sft_loss."""
    mask = batch["label_mask"]  # (B, T) bool: assistant tokens
    logits = model(batch["inputs"], logits_mask=mask)  # (M, V), M = mask.sum()
    logps = token_logps(logits[None], batch["labels"][mask][None])  # (1, M)
    return nll_loss(logps, torch.ones_like(logps, dtype=torch.bool), normalizer=SUM), {}


def one_update(model, batches, loss_fn, count_fn, lr: float, rt) -> dict:
    """ONE optimizer step, the scripts' way: AdamW (loop.make_optimizer, weight decay 0) at lr, loop.train_step
    (the loss of the step = the summed loss / the step's count), clipping at MAX_GRAD_NORM."""
    optimizer = loop.make_optimizer(model, SimpleNamespace(lr=lr, weight_decay=0.0), rt)
    loop.set_lr(optimizer, lr)
    return loop.train_step(model, optimizer, rt.make_scaler(), batches, loss_fn, count_fn, rt, MAX_GRAD_NORM)


def first_step_indices(n: int, batch_size: int, seed: int, rt) -> list[int]:
    """The examples of optimizer step 0 in every script's data order (loop.step_batches), one micro-batch."""
    order = SimpleNamespace(micro_batch=batch_size, grad_accum=1, seed=seed, group_by_length=False)
    return loop.step_batches(n, 0, order, rt)[0]


_TINY: dict = {}


def tiny_sft(data_dir: Path, log=None, recipe: TinyRecipe = TinyRecipe(), fresh: bool = False) -> str:
    """The tiny SFT checkpoint folder, trained once per process and recipe (fresh: again) in a temporary folder
    removed at exit."""
    if recipe in _TINY and not fresh:
        return _TINY[recipe]
    t0 = time.time()
    r = recipe
    out = Path(tempfile.mkdtemp(prefix="minialign_walkthrough_"))
    atexit.register(shutil.rmtree, out, ignore_errors=True)
    convs = load_sft(str(data_dir / "sft_train.jsonl"))
    tok = train_tokenizer([m["content"] for c in convs for m in c], out / "tok", vocab_size=r.vocab_size)
    examples = tokenize_sft(convs, tok, MAX_LEN)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one thread: the same sums in the same order on every run
    try:
        runtime.seed_everything(r.seed)
        model = CausalLM(model_config("cpu", vocab_size=tok.vocab_size, dim=r.dim, n_layers=r.n_layers,
                                      n_heads=r.n_heads, n_kv_heads=r.n_kv_heads, max_seq_len=MAX_LEN))
        rt = cpu_runtime()
        optimizer = loop.make_optimizer(model, SimpleNamespace(lr=r.lr, weight_decay=0.0), rt)
        order = SimpleNamespace(micro_batch=r.micro_batch_size, grad_accum=1, seed=r.seed, group_by_length=True)
        lengths = [len(ids) for ids, _ in examples]
        for step in range(r.steps):
            loop.set_lr(optimizer, loop.lr_at(step, r.lr, r.warmup_steps, r.steps, 0.1))
            batches = [collate_lm([examples[i] for i in idx], tok.pad_id)
                       for idx in loop.step_batches(len(examples), step, order, rt, lengths)]
            metrics = loop.train_step(model, optimizer, rt.make_scaler(), batches, sft_loss,
                                      lambda b: b["label_mask"].sum(), rt, MAX_GRAD_NORM)
    finally:
        torch.set_num_threads(threads)
    checkpoint.save(out / "sft", model=model, optimizer=None, scaler=None, step=r.steps, cfg=r,
                    tokenizer_path=tok.path, finished=True)
    _TINY[r] = str(out / "sft")
    if log is not None:
        print(f"[walkthrough] tiny SFT model: {model.num_params() / 1e6:.2f}M parameters, {r.steps} steps, final "
              f"loss {metrics['loss']:.3f}, trained in {time.time() - t0:.1f}s", file=log)
    return _TINY[r]


@dataclass
class Context:
    """Where a walkthrough starts: the SFT checkpoint and its tokenizer, the reward model (or none), the data."""
    ckpt: str
    tok: object
    tiny: bool
    reward_model: str  # '' = none (PPO, GRPO, online DPO then score with the gold rule)
    data_dir: Path
    seed: int
    rt: runtime.Runtime

    @property
    def where(self) -> str:
        return "the tiny SFT model (trained here in seconds; its text is rough)" if self.tiny else self.ckpt


def prepare(ckpt: str = "", reward_model: str | None = None, tiny: bool = False, seed: int = 1337,
            data_dir: str | Path = "", log=sys.stderr) -> Context:
    """--ckpt, else out/sft when the main job has written it, else (or with tiny) the tiny model; --reward_model,
    else out/rm next to out/sft (not with the tiny model, whose vocabulary differs), else none."""
    data_dir = Path(data_dir) if data_dir else (REPO_DATA if REPO_DATA.exists() else Path("data"))
    use_tiny = tiny or (not ckpt and not (Path("out/sft") / "ckpt.pt").exists())
    if use_tiny:
        if log is not None and not tiny and TinyRecipe() not in _TINY:
            print("[walkthrough] no --ckpt and no out/sft: training a tiny SFT model (seconds; rough text)", file=log)
        path = tiny_sft(data_dir, log)
    else:
        path = ckpt or "out/sft"
    if reward_model is None:
        reward_model = "out/rm" if not use_tiny and not ckpt and (Path("out/rm") / "ckpt.pt").exists() else ""
    tok = load_tokenizer(checkpoint.tokenizer_path_for(path))
    return Context(path, tok, use_tiny, reward_model, data_dir, seed, cpu_runtime())
