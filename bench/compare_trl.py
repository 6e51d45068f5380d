"""minialign vs Hugging Face TRL, side by side: same model, same data, same machine, one run (a benchmark, not a test).

Both sides train the minimind-26m architecture: minialign's CausalLM / ScalarModel, and transformers'
LlamaForCausalLM / LlamaForSequenceClassification with the same dimensions (hidden 512, 8 layers, 8 heads,
2 KV heads, SwiGLU 1408, vocab 6400, tied embeddings, RoPE theta 1e6, RMSNorm eps 1e-5, no biases, dropout 0).
The Llama model gets minialign's initial weights, and its logits are checked against ours before timing.
Data: random token ids (none of the 4 special ids, except that every response ends with <|im_end|>, as
tokenized data does), 64-token prompts and 64-token responses, no padding. The TRL side reads the same ids
as text through a word-level tokenizer (one word per id), and the ids its trainers tokenize are checked
against ours. Same optimizer on both sides: torch AdamW (betas 0.9/0.95, no weight decay, constant lr),
gradient clipping at 1.0, no gradient checkpointing, fp32 on CPU.

Rows (ratio = minialign speed / TRL speed, higher is better):
  sft              tokens/s, completion-only loss, 8 examples a step   (train_sft.py's step | SFTTrainer)
  rm               pairs/s, Bradley-Terry, 8 pairs a step                (train_rm.py's step, packed | RewardTrainer)
  dpo_live         pairs/s, sigmoid DPO, live reference, 8 pairs         (train_dpo.py, packed pairs | DPOTrainer)
  dpo_precomputed  pairs/s, reference log-probs computed before timing   (--precompute_ref | precompute_ref_log_probs=True)
  generate         new tokens/s, 16 prompts x 64 new tokens, sampling at T=1, no early stop
                                                                         (minialign.algorithms.generation.generate | model.generate)
  grpo_beta0       s/step, 8 prompts x G=4, 32 new tokens, one update per rollout, beta=0
  grpo_beta0.04    the same with beta=0.04 (a reference model forward)   (train_grpo.grpo_update | GRPOTrainer)

Timing. The two libraries alternate step by step in one process: a TrainerCallback times each TRL optimizer
step (on_step_begin -> on_step_end: forward, backward, clipping, optimizer and scheduler step, TRL's own
per-step work such as its metrics; not the dataloader) and then runs and times one minialign step, so a
neighbour's load hits both alike. minialign's batches are collated before timing (like TRL's dataloader,
which runs outside the timed window). Figures are medians over --steps timed steps after --warmup steps.

Before each row the script measures the CPU used by OTHER processes over 1 s (/proc/stat minus our own
CPU time); above --max_other_load cores it waits up to --load_wait seconds, then refuses (exit 3) unless
--allow_load, which marks the table UNDER LOAD. The same measurement is taken during each row; a row over
the limit is marked "!", and without --allow_load the script then exits with status 4 after printing.

FLOP/s (training rows): the matmul FLOPs each side executes per step, from its own token counts:
  forward(tokens, head_rows, T) = 2 * N_body * tokens + 2 * V * d * head_rows + 2 * L * d * T * tokens
    N_body = parameters other than the embedding table; head_rows = positions that go through the tied LM
    head (minialign: only positions that predict a trained token; TRL on CPU: every position); the last
    term is causal attention, 4 * d FLOPs per (query, key) pair per layer and T / 2 keys on average.
  trained model: 3 x forward (backward = 2 x forward); reference model: 1 x forward, where it runs.
  GRPO adds the sampling: prefill + one single-token forward per new token (counted with its full KV context);
    minialign prefills a prompt once for its G samples and trains on packed groups (its FLOPs count that).
The peak is the median GFLOP/s of large torch.mm at the same thread count and dtype.

Install and run (needs the bench extra; keep the torch build installed, see bench/README.md):
  pip install -e ".[bench]" "torch==2.13.0"
  python bench/compare_trl.py                                   # all rows, 2 threads, 10 timed steps each
  python bench/compare_trl.py --rows sft,rm --steps 3 --warmup 1 --threads 1 --allow_load   # a quick check
GPU (written, not tested): --device cuda --dtype bf16, both sides under bf16 autocast with fp32 weights.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
import json
import os
import platform
import random
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # no extra tokenizer threads next to torch's
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything here is local; never reach for the Hub
os.environ.setdefault("TQDM_DISABLE", "1")  # TRL's reference precompute pass shows a bar otherwise

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import train_dpo  # noqa: E402  (the steps we time are the scripts' own; train_grpo is imported by its row)
import train_rm  # noqa: E402
import train_sft  # noqa: E402
from minialign.algorithms.generation import generate  # noqa: E402
from minialign.algorithms.packing import collate_pairs, pair_count  # noqa: E402
from minialign.algorithms.reward_funcs import RewardSource  # noqa: E402
from minialign.algorithms.rollout import sample_rollout  # noqa: E402
from minialign.data.batching import collate_lm  # noqa: E402
from minialign.models.decoder import CausalLM, ScalarModel, model_config  # noqa: E402
from minialign.training import config, loop, runtime  # noqa: E402

try:
    import datasets
    import transformers
    import trl
    from tokenizers import Tokenizer as RawTokenizer
    from tokenizers import decoders
    from tokenizers import models as tok_models
    from tokenizers import pre_tokenizers
    from transformers import (LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification, PreTrainedTokenizerFast,
                              PrinterCallback, TrainerCallback)
    from trl import DPOConfig, DPOTrainer, GRPOConfig, GRPOTrainer, RewardConfig, RewardTrainer, SFTConfig, SFTTrainer
except ImportError as e:
    sys.exit(f"compare_trl.py needs the bench extra ({e}): pip install -e '.[bench]' 'torch==<the version installed now>' (see bench/README.md)")

PRESET = "minimind-26m"
PAD, IM_END = 0, 3  # minialign.data.tokenizer's fixed ids; ids 0-3 are the specials
SPECIALS = ["<pad>", "<unk>", "<|im_start|>", "<|im_end|>"]
LR = 1e-5
# row -> (title, unit, goal for minialign / TRL)
ROWS = {
    "sft": ("SFT (completion-only)", "tokens/s", 1.3),
    "rm": ("RM (Bradley-Terry)", "pairs/s", 1.5),
    "dpo_live": ("DPO, live reference", "pairs/s", 2.0),
    "dpo_precomputed": ("DPO, precomputed ref", "pairs/s", 1.5),
    "generate": ("generation (T=1)", "new tok/s", 2.0),
    "grpo_beta0": ("GRPO step, beta=0", "s/step", 2.0),
    "grpo_beta0.04": ("GRPO step, beta=0.04", "s/step", 2.0),
}
FLOP_GOAL = 0.60  # training FLOP/s as a fraction of the matmul peak


# ------------------------------------------------------------------------------------------ CPU load

PROC_STAT = Path("/proc/stat")  # Linux only; elsewhere the load columns read nan and nothing is refused


def cpu_counters() -> tuple[float, float, float]:
    """(busy CPU-seconds of the whole machine, steal CPU-seconds, CPU-seconds of this process, all threads)."""
    own = os.times()
    if not PROC_STAT.exists():
        return float("nan"), float("nan"), own.user + own.system
    user, nice, system, idle, iowait, irq, softirq, steal = [int(x) for x in PROC_STAT.read_text().split("\n", 1)[0].split()[1:9]]
    ticks = os.sysconf("SC_CLK_TCK")
    return (user + nice + system + irq + softirq) / ticks, steal / ticks, own.user + own.system


def others_load(since: tuple, wall_s: float) -> tuple[float, float]:
    """Cores used by other processes, and cores stolen by the hypervisor, since `since` (a cpu_counters())."""
    busy, steal, own = cpu_counters()
    others = (busy - since[0]) - (own - since[2])
    return max(others, 0.0) / wall_s, (steal - since[1]) / wall_s  # max(nan, 0.0) stays nan


def idle_load(seconds: float = 1.0) -> float:
    """Other processes' CPU use (cores) while we sleep."""
    start, t0 = cpu_counters(), time.perf_counter()
    time.sleep(seconds)
    return others_load(start, time.perf_counter() - t0)[0]


def wait_until_quiet(args, row: str) -> tuple[float, bool]:
    """-> (other processes' load in cores, whether it is below --max_other_load), waiting up to --load_wait s.

    Exits with status 3 when the load does not clear, unless --allow_load."""
    deadline = time.time() + args.load_wait
    load = idle_load()
    if load != load:  # nan: no /proc/stat
        print("note: cannot measure other processes' load on this system; check by hand that it is idle")
        return load, True
    if load > args.max_other_load:
        print(f"WARNING before {row}: other processes use {load:.2f} cores (limit {args.max_other_load}); waiting up to {args.load_wait:.0f} s",
              flush=True)
    while load > args.max_other_load and time.time() < deadline:
        time.sleep(2.0)
        load = idle_load()
    quiet = load <= args.max_other_load
    if not quiet and not args.allow_load:
        print(f"other processes keep {load:.2f} cores busy (> {args.max_other_load}) before {row}; not timing anything. "
              f"Stop them, or pass --allow_load to mark the table UNDER LOAD.", file=sys.stderr)
        sys.exit(3)
    return load, quiet


# ----------------------------------------------------------------------------------- the two models

def llama_config(cfg) -> LlamaConfig:
    """transformers' Llama with minialign's dimensions (see the module docstring)."""
    return LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.dim, intermediate_size=cfg.hidden_dim, num_hidden_layers=cfg.n_layers,
        num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.n_kv_heads, head_dim=cfg.head_dim,
        max_position_embeddings=cfg.max_seq_len, rms_norm_eps=cfg.norm_eps, tie_word_embeddings=True,
        rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta}, attention_bias=False, mlp_bias=False,
        attention_dropout=0.0, hidden_act="silu", pad_token_id=PAD, bos_token_id=None, eos_token_id=IM_END,
        num_labels=1,  # used by LlamaForSequenceClassification only
    )


def to_llama_state(state: dict) -> dict:
    """minialign parameter names -> transformers Llama names (the tensors are the same)."""
    renames = [("backbone.embed.", "model.embed_tokens."), ("backbone.norm.", "model.norm."), ("backbone.layers.", "model.layers."),
               (".attn_norm.", ".input_layernorm."), (".mlp_norm.", ".post_attention_layernorm."), (".attn.", ".self_attn."),
               ("score_head.", "score.")]
    out = {}
    for name, tensor in state.items():
        if name == "score_head.bias":
            continue  # Llama's score head has no bias; ours starts at 0 (one parameter of difference)
        for old, new in renames:
            name = name.replace(old, new)
        out[name] = tensor.clone()
    return out


def hf_model(cls, ours, device):
    model = cls(llama_config(ours.cfg))
    missing, unexpected = model.load_state_dict(to_llama_state(ours.state_dict()), strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)  # lm_head is tied to the embedding
    return model.to(device)


def body_params(model) -> int:
    """Parameters other than the (tied) embedding table: the ones every token multiplies."""
    return sum(p.numel() for p in model.parameters()) - model.cfg.vocab_size * model.cfg.dim


def check_same_model(ours: CausalLM, device):
    """Print both parameter counts and assert the Llama copy computes our logits."""
    llama, ours_rm = hf_model(LlamaForCausalLM, ours, device), ScalarModel(ours.cfg)
    llama_rm = hf_model(LlamaForSequenceClassification, ours_rm, device)
    n = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    print(f"parameters: minialign CausalLM {n(ours):,} | LlamaForCausalLM {n(llama):,}; minialign ScalarModel {n(ours_rm):,} | "
          f"LlamaForSequenceClassification {n(llama_rm):,} (ours has a score bias)")
    assert n(ours) == n(llama) and n(ours_rm) == n(llama_rm) + 1
    ids = torch.randint(4, ours.cfg.vocab_size, (2, 64), device=device)
    with torch.no_grad():
        diff = (ours.eval()(ids) - llama.eval()(ids).logits).abs().max().item()
    print(f"same weights, max |logit difference| {diff:.2e}")
    assert diff < 1e-3, "the Llama copy does not compute minialign's logits: the architectures differ"
    ours.train()


def word_tokenizer(vocab_size: int) -> PreTrainedTokenizerFast:
    """One whitespace-separated word per id ("t123" -> 123), so the TRL trainers' tokenization yields our ids."""
    vocab = {s: i for i, s in enumerate(SPECIALS)} | {f"t{i}": i for i in range(len(SPECIALS), vocab_size)}
    raw = RawTokenizer(tok_models.WordLevel(vocab, unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    raw.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    return PreTrainedTokenizerFast(tokenizer_object=raw, pad_token="<pad>", unk_token="<unk>", eos_token="<|im_end|>")


def words(ids) -> str:
    return " ".join(SPECIALS[i] if i < len(SPECIALS) else f"t{i}" for i in ids)


# ------------------------------------------------------------------------------------------- data

def random_ids(rng: random.Random, n: int, vocab_size: int) -> list[int]:
    return [rng.randrange(len(SPECIALS), vocab_size) for _ in range(n)]  # ordinary ids only


def random_pairs(n: int, prompt_len: int, response_len: int, vocab_size: int, seed: int) -> list[dict]:
    """Token-id pairs; each response is response_len - 1 ordinary ids then <|im_end|>."""
    rng = random.Random(seed)
    return [{"prompt": random_ids(rng, prompt_len, vocab_size), "chosen": random_ids(rng, response_len - 1, vocab_size) + [IM_END],
             "rejected": random_ids(rng, response_len - 1, vocab_size) + [IM_END]} for _ in range(n)]


def text_pair(p: dict) -> dict:
    """The same pair as text. The prompt ends with a space: TRL tokenizes prompt + response as one string."""
    return {"prompt": words(p["prompt"]) + " ", "chosen": words(p["chosen"]), "rejected": words(p["rejected"])}


def to_device(batch: dict, device) -> dict:
    return {k: v.to(device) for k, v in batch.items()}


# ------------------------------------------------------------------------------------------ FLOPs

def forward_flops(cfg, n_body: int, tokens: int, head_rows: int, T: float) -> float:
    """Matmul FLOPs of one forward pass (formula in the module docstring)."""
    return 2 * n_body * tokens + 2 * cfg.vocab_size * cfg.dim * head_rows + 2 * cfg.n_layers * cfg.n_heads * cfg.head_dim * T * tokens


def trl_head_rows(device, input_ids, trained: int) -> int:
    """Rows through TRL's fused LM head: every position but the last on CPU, only the trained ones with Triton (CUDA)."""
    return trained if device.type == "cuda" else input_ids.shape[0] * (input_ids.shape[1] - 1)


def generation_flops(cfg, n_body: int, rows: int, prompt_len: int, new_tokens: int) -> float:
    """Prefill (head on the last position) + new_tokens - 1 single-token forwards; a decode query attends to all
    P + t cached keys, i.e. T = 2 * (P + t) in forward_flops' causal formula, P + N / 2 keys on average."""
    prefill = forward_flops(cfg, n_body, rows * prompt_len, rows, prompt_len)
    decode = forward_flops(cfg, n_body, rows * (new_tokens - 1), rows * (new_tokens - 1), 2 * prompt_len + new_tokens)
    return prefill + decode


def matmul_peak_gflops(device, dtype, n: int = 2048, reps: int = 10) -> float:
    """Median GFLOP/s of an (n x n) @ (n x n) matmul: the machine's practical peak at this thread count."""
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    times = []
    for i in range(reps + 1):
        sync(device)
        t0 = time.perf_counter()
        torch.mm(a, b)
        sync(device)
        if i:
            times.append(time.perf_counter() - t0)
    return 2 * n**3 / statistics.median(times) / 1e9


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


# --------------------------------------------------------------------------------- interleaved timing

def ours_adamw_fused(device) -> bool:
    """Whether minialign's loop.make_optimizer builds a fused AdamW on this device (TRL gets the same)."""
    probe = loop.make_optimizer(torch.nn.Linear(1, 1), config.TrainConfig(), runtime.Runtime(device, torch.float32))
    return bool(probe.param_groups[0]["fused"])


class Interleave(TrainerCallback):
    """Times each TRL optimizer step, then runs and times one minialign step right after it.

    on_step_begin fires after the dataloader has produced the step's batch, on_step_end after the optimizer
    and scheduler step and zero_grad, before TRL's logging/saving hooks (disabled here anyway).
    """

    def __init__(self, ours_step, device, threads: int):
        self.ours_step, self.device, self.threads = ours_step, device, threads
        self.trl_times, self.ours_times = [], []

    def on_step_begin(self, args, state, control, optimizer=None, **kwargs):
        assert torch.get_num_threads() == self.threads, f"something changed torch's thread count to {torch.get_num_threads()}"
        if not self.trl_times:  # TRL builds its optimizer in train(): check it is the one minialign uses
            opt = getattr(optimizer, "optimizer", optimizer)  # accelerate wraps it
            group = opt.param_groups[0]
            assert type(opt) is torch.optim.AdamW and group["betas"] == (0.9, 0.95) and group["eps"] == 1e-8, opt
            assert all(g["weight_decay"] == 0 for g in opt.param_groups) and bool(group["fused"]) == ours_adamw_fused(self.device), opt
        sync(self.device)
        self.t0 = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        sync(self.device)
        self.trl_times.append(time.perf_counter() - self.t0)
        t0 = time.perf_counter()
        self.ours_step(len(self.ours_times))
        sync(self.device)
        self.ours_times.append(time.perf_counter() - t0)


def run_interleaved(trainer, ours_step, n_steps: int, device, threads: int) -> tuple[list, list]:
    torch.set_num_threads(threads)  # constructing a trainer must not have changed it, but make sure
    flag = "is_activation_checkpointing" if hasattr(type(trainer.model), "is_activation_checkpointing") else "is_gradient_checkpointing"
    assert not trainer.args.gradient_checkpointing and not getattr(trainer.model, flag, False), "gradient checkpointing is on"
    assert trainer.args.gradient_accumulation_steps == 1 and trainer.args.max_grad_norm == 1.0
    trainer.remove_callback(PrinterCallback)  # it prints the end-of-training summary
    timer = Interleave(ours_step, device, threads)
    trainer.add_callback(timer)
    trainer.train()
    assert len(timer.trl_times) == len(timer.ours_times) == n_steps, (len(timer.trl_times), n_steps)
    return timer.ours_times, timer.trl_times


class RecordBatches:
    """Wraps a TRL data collator to keep the shapes it produced (to check both sides get the same tokens)."""

    def __init__(self, collator):
        self.collator, self.batches = collator, []

    def __call__(self, examples):
        batch = self.collator(examples)
        self.batches.append({k: v.clone() for k, v in batch.items() if torch.is_tensor(v) and v.dim() == 2})
        return batch


def trl_args(config_cls, args, out_dir: str, n_steps: int, batch_size: int, **extra):
    """The TrainingArguments every TRL row shares: one optimizer step per batch, nothing logged or saved."""
    on_gpu = args.device.startswith("cuda")
    # TRL configs default to gradient checkpointing ON; transformers >= 5.2x calls it activation_checkpointing
    no_checkpointing = {"activation_checkpointing" if "activation_checkpointing" in config_cls.__dataclass_fields__
                        else "gradient_checkpointing": False}
    return config_cls(
        output_dir=out_dir, per_device_train_batch_size=batch_size, gradient_accumulation_steps=1, max_steps=n_steps,
        learning_rate=LR, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0,
        optim="adamw_torch_fused" if ours_adamw_fused(torch.device(args.device)) else "adamw_torch",  # = minialign's AdamW
        adam_beta1=0.9, adam_beta2=0.95, adam_epsilon=1e-8,
        bf16=args.dtype == "bf16", fp16=False, use_cpu=not on_gpu, **no_checkpointing,
        logging_strategy="no", save_strategy="no", eval_strategy="no", report_to="none", disable_tqdm=True,
        dataloader_num_workers=0, dataloader_pin_memory=on_gpu, seed=0, **extra)


# ------------------------------------------------------------------------------------------- rows

def bench_sft(ctx) -> dict:
    """SFT on prompt/completion pairs, loss on the 64 completion tokens only."""
    B, n, args, cfg, device = ctx["batch"], ctx["n_steps"], ctx["args"], ctx["cfg"], ctx["device"]
    data = ctx["pairs"][: B * n]
    # minialign: train_sft.py's step (loop.train_step + sft_loss), one micro-batch of B examples
    model = ctx["new_ours"]()
    scfg = train_sft.Config(init_from="bench", micro_batch_size=B, grad_accum=1, lr=LR, max_grad_norm=1.0)
    optimizer, scaler = loop.make_optimizer(model, scfg, ctx["rt"]), ctx["rt"].make_scaler()
    examples = [(p["prompt"] + p["chosen"], [False] * len(p["prompt"]) + [True] * len(p["chosen"])) for p in data]
    batches = [to_device(collate_lm(examples[i * B : (i + 1) * B], PAD), device) for i in range(n)]

    def ours_step(i):
        loop.train_step(model, optimizer, scaler, [batches[i]], train_sft.sft_loss, lambda b: b["label_mask"].sum(),
                            ctx["rt"], scfg.max_grad_norm)

    # TRL: SFTTrainer on a text prompt/completion dataset (completion_only_loss)
    hf = hf_model(LlamaForCausalLM, ctx["new_ours"](), device)
    with tempfile.TemporaryDirectory() as out:
        trainer = SFTTrainer(model=hf, processing_class=ctx["tok"], train_dataset=datasets.Dataset.from_list(
            [{"prompt": t["prompt"], "completion": t["chosen"]} for t in map(text_pair, data)]),
            args=trl_args(SFTConfig, args, out, n, B, completion_only_loss=True, max_length=None))
        first = trainer.train_dataset[0]
        assert first["input_ids"] == data[0]["prompt"] + data[0]["chosen"], "TRL tokenized the SFT text differently"
        trainer.data_collator = RecordBatches(trainer.data_collator)
        ours_times, trl_times = run_interleaved(trainer, ours_step, n, device, args.threads)
        trl_batch = trainer.data_collator.batches[0]
    trl_tokens, trl_trained = trl_batch["input_ids"].numel(), int((trl_batch["labels"][:, 1:] != -100).sum())
    ours_tokens, ours_trained = batches[0]["inputs"].numel(), int(batches[0]["label_mask"].sum())
    assert ours_trained == trl_trained == B * args.response_len, (ours_trained, trl_trained)
    n_body = body_params(model)
    return {
        "ours_times": ours_times, "trl_times": trl_times, "units_per_step": B * (args.prompt_len + args.response_len),
        "ours_flops": 3 * forward_flops(cfg, n_body, ours_tokens, ours_trained, ours_tokens / B),
        "trl_flops": 3 * forward_flops(cfg, n_body, trl_tokens, trl_head_rows(device, trl_batch["input_ids"], trl_trained), trl_tokens / B),
        "per_step": f"{B} examples; model input tokens ours {ours_tokens} (last token dropped) / TRL {trl_tokens}; trained tokens {ours_trained} both",
    }


def bench_rm(ctx) -> dict:
    """Reward model, Bradley-Terry loss, score at each response's last token. minialign: train_rm.py's packed
    pairs (packing.collate_pairs: B rows [x | y_c | y_r] of 192 tokens); TRL: 2B rows of 128 tokens."""
    B, n, args, cfg, device = ctx["batch"], ctx["n_steps"], ctx["args"], ctx["cfg"], ctx["device"]
    data = ctx["pairs"][: B * n]
    # minialign: train_rm.py's step (loop.train_step + rm_loss)
    torch.manual_seed(1)
    model = ScalarModel(cfg)
    hf = hf_model(LlamaForSequenceClassification, model, device)  # same initial weights (score bias aside)
    model.to(device)
    rcfg = train_rm.Config(init_from="bench", micro_batch_pairs=B, grad_accum=1, lr=LR, max_grad_norm=1.0)
    optimizer, scaler = loop.make_optimizer(model, rcfg, ctx["rt"]), ctx["rt"].make_scaler()
    rows = [{"prompt": p["prompt"], "chosen": p["chosen"], "rejected": p["rejected"]} for p in data]
    batches = [to_device(collate_pairs(rows[i * B : (i + 1) * B], PAD), device) for i in range(n)]

    def ours_step(i):
        loop.train_step(model, optimizer, scaler, [batches[i]], lambda m, b: train_rm.rm_loss(m, b, 0.0, []),
                            pair_count, ctx["rt"], rcfg.max_grad_norm)

    # TRL: RewardTrainer with LlamaForSequenceClassification (num_labels=1, pad_token_id set)
    with tempfile.TemporaryDirectory() as out:
        trainer = RewardTrainer(model=hf, processing_class=ctx["tok"], train_dataset=datasets.Dataset.from_list(list(map(text_pair, data))),
                                args=trl_args(RewardConfig, args, out, n, B, max_length=None))
        first = trainer.train_dataset[0]
        assert first["chosen_ids"] == data[0]["prompt"] + data[0]["chosen"], "TRL tokenized the RM text differently"
        trainer.data_collator = RecordBatches(trainer.data_collator)
        ours_times, trl_times = run_interleaved(trainer, ours_step, n, device, args.threads)
        trl_batch = trainer.data_collator.batches[0]
    ours_tokens, trl_tokens = batches[0]["input_ids"].numel(), trl_batch["input_ids"].numel()
    assert trl_tokens == 2 * B * (args.prompt_len + args.response_len), trl_tokens
    assert ours_tokens == B * (args.prompt_len + 2 * args.response_len), ours_tokens  # packed: the prompt once
    n_body = body_params(model)
    T = args.prompt_len + args.response_len  # each response attends to the prompt and itself, as in its own row
    return {"ours_times": ours_times, "trl_times": trl_times, "units_per_step": B,
            "ours_flops": 3 * forward_flops(cfg, n_body, ours_tokens, 0, T), "trl_flops": 3 * forward_flops(cfg, n_body, trl_tokens, 0, T),
            "per_step": f"{B} pairs; model input tokens ours {ours_tokens} ({B} packed rows) / "
                        f"TRL {trl_tokens} ({2 * B} rows of {T})"}


def bench_dpo(ctx, precomputed: bool) -> dict:
    """Sigmoid DPO (beta 0.1). minialign: packed pairs, one row [x | y_c | y_r] each; TRL: two rows per pair."""
    B, n, args, cfg, device = ctx["batch"], ctx["n_steps"], ctx["args"], ctx["cfg"], ctx["device"]
    data = ctx["pairs"][: B * n]
    rt = ctx["rt"]
    # minialign: train_dpo.py's step (loop.train_step + pair_loss), reference live or precomputed before timing
    model = ctx["new_ours"]()
    ref = ctx["new_ours"]().eval().requires_grad_(False)
    dcfg = train_dpo.Config(init_from="bench", loss_type="sigmoid", beta=0.1, micro_batch_pairs=B, grad_accum=1, lr=LR,
                            max_grad_norm=1.0, precompute_ref=precomputed)
    optimizer, scaler = loop.make_optimizer(model, dcfg, rt), rt.make_scaler()
    ref_table = None
    if precomputed:
        with contextlib.redirect_stderr(io.StringIO()):  # its progress bar
            ref_table = train_dpo.precompute_reference(ref, data, PAD, dcfg, rt, "reference log-probs")
        ref = None  # train_dpo.py frees it too
    batches = [to_device(train_dpo.collate_pair_batch(data, list(range(i * B, (i + 1) * B)), PAD, ref_table), device)
               for i in range(n)]

    def ours_step(i):
        loop.train_step(model, optimizer, scaler, [batches[i]], lambda m, b: train_dpo.pair_loss(m, b, ref, dcfg),
                            pair_count, rt, dcfg.max_grad_norm)

    # TRL: DPOTrainer, default sigmoid loss; live: a frozen copy as ref_model; precomputed: TRL scores the
    # dataset with the (still untrained) policy in its constructor, which is not timed
    hf = hf_model(LlamaForCausalLM, ctx["new_ours"](), device)
    hf_ref = None if precomputed else copy.deepcopy(hf)
    with tempfile.TemporaryDirectory() as out:
        trainer = DPOTrainer(model=hf, ref_model=hf_ref, processing_class=ctx["tok"],
                             train_dataset=datasets.Dataset.from_list(list(map(text_pair, data))),
                             args=trl_args(DPOConfig, args, out, n, B, beta=0.1, loss_type=["sigmoid"], max_length=None,
                                           precompute_ref_log_probs=precomputed))
        first = trainer.train_dataset[0]
        assert [first["prompt_ids"], first["chosen_ids"], first["rejected_ids"]] == [data[0]["prompt"], data[0]["chosen"], data[0]["rejected"]], \
            "TRL tokenized the DPO text differently"
        trainer.data_collator = RecordBatches(trainer.data_collator)
        ours_times, trl_times = run_interleaved(trainer, ours_step, n, device, args.threads)
        trl_batch = trainer.data_collator.batches[0]
    ours_trained = int(batches[0]["response_mask"].sum())  # chosen and rejected tokens
    trl_trained = int(trl_batch["completion_mask"][:, 1:].sum())
    assert ours_trained == trl_trained == 2 * B * args.response_len, (ours_trained, trl_trained)
    n_body = body_params(model)
    ours_tokens = batches[0]["input_ids"].numel()
    ours_head = int(batches[0]["head_mask"].sum())  # the last prompt column predicts the first token of both
    T = args.prompt_len + args.response_len  # each response attends to the prompt and itself, as in its own row
    ours_fwd = forward_flops(cfg, n_body, ours_tokens, ours_head, T)
    trl_tokens = trl_batch["input_ids"].numel()
    trl_fwd = forward_flops(cfg, n_body, trl_tokens, trl_head_rows(device, trl_batch["input_ids"], trl_trained), T)
    ref_passes = 0 if precomputed else 1
    return {
        "ours_times": ours_times, "trl_times": trl_times, "units_per_step": B,
        "ours_flops": (3 + ref_passes) * ours_fwd, "trl_flops": (3 + ref_passes) * trl_fwd,
        "per_step": f"{B} pairs, {ours_trained} response tokens both; model input tokens ours {ours_tokens} "
                    f"({B} packed rows) / TRL {trl_tokens} ({2 * B} rows)" + ("" if precomputed else ", x2 with the reference"),
    }


def bench_generate(ctx) -> dict:
    """Sampling at temperature 1 (no top-k / top-p), every row runs to max_new_tokens."""
    args, cfg, device = ctx["args"], ctx["cfg"], ctx["device"]
    rows, P, N = args.gen_batch, args.prompt_len, args.gen_new_tokens
    model = ctx["new_ours"]().eval()
    hf = hf_model(LlamaForCausalLM, model, device).eval()
    g = torch.Generator().manual_seed(2)
    prompt = torch.randint(len(SPECIALS), cfg.vocab_size, (rows, P), generator=g).to(device)
    mask = torch.ones_like(prompt, dtype=torch.bool)
    autocast = lambda: torch.autocast(device.type, dtype=ctx["rt"].dtype, enabled=ctx["rt"].dtype != torch.float32)  # noqa: E731
    ours_times, trl_times = [], []
    for i in range(ctx["n_steps"]):
        gen = torch.Generator(device=device).manual_seed(i)
        sync(device)
        t0 = time.perf_counter()
        with autocast():
            out = generate(model, prompt, mask, N, eos_id=-1, pad_id=PAD, temperature=1.0, generator=gen)  # eos -1: never stops
        sync(device)
        ours_times.append(time.perf_counter() - t0)
        assert out.response_ids.shape == (rows, N)
        torch.manual_seed(i)
        t0 = time.perf_counter()
        with torch.no_grad(), autocast():
            # min_new_tokens = max_new_tokens masks <|im_end|> until the end, so no row stops early
            seq = hf.generate(input_ids=prompt, attention_mask=mask.long(), do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                              max_new_tokens=N, min_new_tokens=N, eos_token_id=IM_END, pad_token_id=PAD)
        sync(device)
        trl_times.append(time.perf_counter() - t0)
        assert seq.shape == (rows, P + N), seq.shape
    return {"ours_times": ours_times, "trl_times": trl_times, "units_per_step": rows * N, "ours_flops": None, "trl_flops": None,
            "per_step": f"{rows} prompts x ({P} prompt + {N} new) tokens on both sides"}


class NoEosTok:
    """What train_grpo needs of a tokenizer, with an eos id that never matches: every response runs to max_new_tokens."""
    pad_id, eos_id = PAD, -1

    def decode(self, ids):
        return ""


def bench_grpo(ctx, beta: float) -> dict:
    """One GRPO step = sample 8 prompts x G responses, reward, group advantages, (reference forward), one update."""
    import train_grpo  # here, not at the top: the other rows do not depend on it
    args, cfg, device, rt = ctx["args"], ctx["cfg"], ctx["device"], ctx["rt"]
    n, Pn, G, P, N = ctx["n_steps"], args.grpo_prompts, args.G, args.prompt_len, args.grpo_new_tokens
    rows = Pn * G
    prompt_rng = random.Random(3)
    prompts = [random_ids(prompt_rng, P, cfg.vocab_size) for _ in range(Pn * n)]
    assert ctx["tok"](text=[words(prompts[0])])["input_ids"][0] == prompts[0]  # how GRPOTrainer tokenizes its prompts
    # minialign: train_grpo's step (grpo_batches + grpo_update), loss_type grpo, random rewards (so no group is all-equal and skipped)
    model = ctx["new_ours"]()
    ref = ctx["new_ours"]().eval().requires_grad_(False) if beta > 0 else None
    gcfg = train_grpo.Config(init_from="bench", prompts_per_step=Pn, num_generations=G, max_new_tokens=N, beta=beta,
                             micro_batch_size=rows, lr=LR, max_grad_norm=1.0, max_len=P + N, loss_type="grpo",
                             scale_rewards="group", mask_truncated_completions=False)
    optimizer, scaler = loop.make_optimizer(model, gcfg, rt), rt.make_scaler()
    rng = random.Random(0)
    sources = [RewardSource("random", lambda prompts, completions, **fields: [rng.random() for _ in completions], 1.0)]
    step_prompts = [[{"prompt_ids": p, "prompt_text": ""} for p in prompts[i * Pn : (i + 1) * Pn]] for i in range(n)]
    ours_lengths = []

    def ours_step(i):  # the body of train_grpo.main's loop: sample, reward + advantages, one update
        with torch.no_grad(), rt.autocast():
            ro = sample_rollout(model, NoEosTok(), step_prompts[i], G, N, gcfg.temperature, gcfg.seed, i, 0,
                                gcfg.prompts_per_generate)
        batches, g = train_grpo.grpo_batches(ro, sources, None, ref, rt, gcfg)
        m = {**train_grpo.grpo_update(model, optimizer, scaler, batches, i, rt, gcfg, {}),
             **train_grpo.rollout_metrics(g, sources, G)}
        assert m["update_skipped"] == 0
        ours_lengths.append((m["completions/min_length"], m["completions/max_length"]))

    # TRL: GRPOTrainer without vLLM; generation batch = train batch = 32 rows, so one step = one rollout + one update
    trl_lengths = []  # one list per reward call, i.e. per generation batch

    def random_reward(prompts, completions, completion_ids, **kwargs):
        trl_lengths.append([len(c) for c in completion_ids])
        return [rng.random() for _ in completions]

    hf = hf_model(LlamaForCausalLM, ctx["new_ours"](), device)
    with tempfile.TemporaryDirectory() as out:
        hf.save_pretrained(out + "/init")  # GRPOTrainer builds its reference (beta > 0) from the policy's path
        hf.config.name_or_path = out + "/init"
        trainer = GRPOTrainer(
            model=hf, reward_funcs=random_reward, processing_class=ctx["tok"],
            train_dataset=datasets.Dataset.from_list([{"prompt": words(p)} for p in prompts]),
            args=trl_args(GRPOConfig, args, out, n, rows, num_generations=G, max_completion_length=N, beta=beta,
                          num_iterations=1, steps_per_generation=1, loss_type="grpo", scale_rewards="group",
                          temperature=1.0, top_p=1.0, top_k=0, use_vllm=False, shuffle_dataset=False,
                          generation_kwargs={"min_new_tokens": N}))  # <|im_end|> masked until the end: no early stop
        ours_times, trl_times = run_interleaved(trainer, ours_step, n, device, args.threads)
    assert all(lo == hi == N for lo, hi in ours_lengths), ours_lengths
    assert len(trl_lengths) == n and all(lengths == [N] * rows for lengths in trl_lengths), trl_lengths  # one rollout per step
    n_body = body_params(model)
    trl_gen = generation_flops(cfg, n_body, rows, P, N)
    # minialign prefills each prompt once for its G samples, and trains on one packed row [x | y_1 .. y_G] per
    # prompt (minialign.algorithms.packing): Pn * (P + G * N) tokens, head on G * N - G + 1 positions; a response token
    # attends to the prompt and its own response, as in its own row
    gen = trl_gen - forward_flops(cfg, n_body, (rows - Pn) * P, rows - Pn, P)
    ours_fwd = forward_flops(cfg, n_body, Pn * (P + G * N), Pn * (G * N - G + 1), P + N)
    trl_fwd = forward_flops(cfg, n_body, rows * (P + N), rows * N if device.type == "cuda" else rows * (P + N - 1), P + N)
    ref_passes = 1 if beta > 0 else 0
    return {
        "ours_times": ours_times, "trl_times": trl_times, "units_per_step": 1,
        "ours_flops": gen + (3 + ref_passes) * ours_fwd, "trl_flops": trl_gen + (3 + ref_passes) * trl_fwd,
        "per_step": f"{Pn} prompts x G={G} = {rows} responses of exactly {N} tokens on both sides",
    }


RUNNERS = {
    "sft": bench_sft,
    "rm": bench_rm,
    "dpo_live": lambda ctx: bench_dpo(ctx, precomputed=False),
    "dpo_precomputed": lambda ctx: bench_dpo(ctx, precomputed=True),
    "generate": bench_generate,
    "grpo_beta0": lambda ctx: bench_grpo(ctx, 0.0),
    "grpo_beta0.04": lambda ctx: bench_grpo(ctx, 0.04),
}


# ------------------------------------------------------------------------------------------- main

def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated subset of: {', '.join(ROWS)}")
    ap.add_argument("--steps", type=int, default=10, help="timed steps per row and side (median)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps per row and side before those")
    ap.add_argument("--threads", type=int, default=2, help="torch threads (both sides run in this one process)")
    ap.add_argument("--device", default="cpu", help="cpu | cuda (the cuda path is written but untested)")
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"], help="fp32, or bf16 autocast (cuda) on both sides")
    ap.add_argument("--json", default="", help="write the results to this file")
    ap.add_argument("--allow_load", action="store_true", help="report even when other processes load the CPU (marked UNDER LOAD)")
    ap.add_argument("--max_other_load", type=float, default=0.25, help="cores other processes may use before the numbers are suspect")
    ap.add_argument("--load_wait", type=float, default=60.0, help="seconds to wait for other load to clear before a row")
    ap.add_argument("--batch", type=int, default=8, help="SFT examples / RM and DPO pairs per step")
    ap.add_argument("--prompt_len", type=int, default=64)
    ap.add_argument("--response_len", type=int, default=64, help="SFT completion / RM and DPO response length (ends with <|im_end|>)")
    ap.add_argument("--gen_batch", type=int, default=16)
    ap.add_argument("--gen_new_tokens", type=int, default=64)
    ap.add_argument("--grpo_prompts", type=int, default=8)
    ap.add_argument("--G", type=int, default=4, help="GRPO responses per prompt")
    ap.add_argument("--grpo_new_tokens", type=int, default=32)
    args = ap.parse_args()
    rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    unknown = [r for r in rows if r not in ROWS]
    if unknown or not rows:
        ap.error(f"--rows: unknown {unknown}; choose from {', '.join(ROWS)}")
    if args.steps < 1 or args.warmup < 0:
        ap.error("--steps must be >= 1 and --warmup >= 0")
    if args.device == "cpu" and args.dtype == "bf16":
        ap.error("--dtype bf16 is for --device cuda (bf16 autocast on CPU is many times slower on both sides)")

    torch.set_num_threads(args.threads)
    transformers.logging.set_verbosity_error()
    warnings.filterwarnings("ignore", category=FutureWarning)  # transformers' deprecation notices about its own internals
    datasets.disable_progress_bars()
    device = torch.device(args.device)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    cfg = model_config(PRESET)
    torch.manual_seed(0)
    init_state = CausalLM(cfg).state_dict()

    def new_ours():
        """A fresh minialign CausalLM with the shared initial weights (every row and side starts from them)."""
        m = CausalLM(cfg)
        m.load_state_dict(init_state)
        return m.to(device).train()

    n_steps = args.warmup + args.steps
    ctx = {"args": args, "cfg": cfg, "device": device, "rt": runtime.Runtime(device, dtype), "batch": args.batch,
           "n_steps": n_steps, "new_ours": new_ours, "tok": word_tokenizer(cfg.vocab_size),
           "pairs": random_pairs(args.batch * n_steps, args.prompt_len, args.response_len, cfg.vocab_size, seed=1)}
    print(f"minialign vs TRL on {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, device {device}, dtype {args.dtype}, "
          f"{args.threads} threads; torch {torch.__version__}, transformers {transformers.__version__}, trl {trl.__version__}")
    print(f"model {PRESET}: {cfg}")
    check_same_model(new_ours(), device)
    _, quiet = wait_until_quiet(args, "the matmul peak")
    start, t0 = cpu_counters(), time.perf_counter()
    peak = matmul_peak_gflops(device, dtype, n=8192 if device.type == "cuda" else 2048)
    peak_load = others_load(start, time.perf_counter() - t0)[0]
    under_load = not quiet or peak_load > args.max_other_load
    print(f"matmul peak: {peak:.1f} GFLOP/s (median of 10 square torch.mm, {args.threads} threads, {args.dtype}; "
          f"other load {peak_load:.2f})")
    print(f"timing: {args.warmup} warm-up + {args.steps} timed steps per row and side, alternating TRL and minialign step by step\n")

    results = {}
    for name in rows:
        load_before, quiet = wait_until_quiet(args, name)
        start, t0 = cpu_counters(), time.perf_counter()
        r = RUNNERS[name](ctx)
        load_during, steal = others_load(start, time.perf_counter() - t0)
        ours_t, trl_t = r["ours_times"][args.warmup :], r["trl_times"][args.warmup :]
        ours_s, trl_s = statistics.median(ours_t), statistics.median(trl_t)
        title, unit, goal = ROWS[name]
        per_second = unit != "s/step"
        ours_fig = r["units_per_step"] / ours_s if per_second else ours_s
        trl_fig = r["units_per_step"] / trl_s if per_second else trl_s
        flagged = not quiet or load_during > args.max_other_load
        under_load |= flagged
        results[name] = {
            "title": title, "unit": unit, "minialign": ours_fig, "trl": trl_fig, "ratio": trl_s / ours_s, "goal": goal,
            "minialign_step_s": ours_t, "trl_step_s": trl_t, "per_step": r["per_step"],
            "minialign_gflops": r["ours_flops"] / ours_s / 1e9 if r["ours_flops"] else None,
            "trl_gflops": r["trl_flops"] / trl_s / 1e9 if r["trl_flops"] else None,
            "other_load_before": load_before, "other_load_during": load_during, "steal_during": steal, "under_load": flagged,
        }
        print(f"{name}: {r['per_step']}; median step ours {ours_s:.3f} s, TRL {trl_s:.3f} s -> {trl_s / ours_s:.2f}x; "
              f"other load {load_before:.2f} before, {load_during:.2f} during (steal {steal:.2f})", flush=True)

    print_table(results, peak, under_load, args)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({
            "versions": {"torch": torch.__version__, "transformers": transformers.__version__, "trl": trl.__version__,
                         "python": platform.python_version()},
            "device": args.device, "dtype": args.dtype, "threads": args.threads, "steps": args.steps, "warmup": args.warmup,
            "cpus": os.cpu_count(), "matmul_peak_gflops": peak, "matmul_peak_other_load": peak_load, "flop_goal": FLOP_GOAL,
            "under_load": under_load, "rows": results,
        }, indent=2) + "\n")
        print(f"wrote {args.json}")
    if under_load and not args.allow_load:
        print("other processes loaded the CPU during the timing (see the load column); numbers not to be reported", file=sys.stderr)
        sys.exit(4)


def print_table(results: dict, peak: float, under_load: bool, args):
    head = "UNDER LOAD: other processes used the CPU, do not publish these numbers\n" if under_load else ""
    print(f"\n{head}{'row':22} {'minialign':>10} {'TRL':>10} {'unit':10} {'ratio':>6} {'goal':>5}  "
          f"{'minialign GFLOP/s':>18} {'TRL GFLOP/s':>17}  {'load':>5}")
    for r in results.values():
        def flops(g):
            return f"{g:7.1f} ({g / peak:4.0%})" if g else ""
        fmt = (lambda v: f"{v:10.2f}") if r["unit"] == "s/step" else (lambda v: f"{v:10.1f}")
        mark = "!" if r["under_load"] else ""
        print(f"{r['title']:22} {fmt(r['minialign'])} {fmt(r['trl'])} {r['unit']:10} {r['ratio']:5.2f}x {r['goal']:4.1f}x  "
              f"{flops(r['minialign_gflops']):>18} {flops(r['trl_gflops']):>17}  {r['other_load_during']:4.2f}{mark}")
    print(f"ratio = minialign speed / TRL speed (GRPO: TRL s/step / minialign s/step); goal = the target ratio; "
          f"GFLOP/s as executed (module docstring), % of the {peak:.1f} GFLOP/s matmul peak, goal {FLOP_GOAL:.0%}; "
          f"load = other processes' cores during the row")


if __name__ == "__main__":
    main()
