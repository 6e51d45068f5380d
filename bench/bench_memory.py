"""Peak memory of a training step with and without --gradient_checkpointing, against the memory plan.

    python bench/bench_memory.py                                  # minimind-26m shape, SFT and DPO, 8 x 256 tokens
    python bench/bench_memory.py --shape smollm2-135m --rows 2 --seq_len 128 --stages dpo
    python bench/bench_memory.py --shape smollm2-135m --rows 2 --seq_len 256 --stages dpo --world_size 2   # DDP vs FSDP

Each setting runs in a fresh subprocess (so one setting's freed memory cannot hide another's peak): build the
policy (and, for DPO, a frozen reference), then --steps optimizer steps of a step like the scripts' (forward,
float32 token log-probs, backward, clip, fused AdamW through minialign.training.loop.optimizer_step).
Measured: on CUDA torch.cuda.max_memory_allocated; on CPU the peak resident set size sampled every millisecond
from /proc/self/statm by a thread, minus the RSS before the model was built (glibc is told to return large
blocks to the OS at once, MALLOC_MMAP_THRESHOLD_=65536, so RSS follows the tensors' lifetimes). Predicted:
minialign.training.memory.plan for the same shape, stage, rows x seq_len and dtype (fp32 on CPU). Every token's
logits are computed here, as the plan assumes (the scripts skip prompt positions, so they use less).
With --world_size N each setting runs under torchrun on N gloo (CPU) or nccl ranks, once with DDP and once with
FSDP2 (minialign.training.runtime.wrap_ddp, as the scripts' --fsdp), and the larger rank's peak is reported.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SHAPES = {
    "minimind-26m": dict(vocab_size=6400, dim=512, n_layers=8, n_heads=8, n_kv_heads=2, max_seq_len=1024),
    "smollm2-135m": dict(vocab_size=49152, dim=576, n_layers=30, n_heads=9, n_kv_heads=3, hidden_dim=1536,
                         max_seq_len=2048, tie_embeddings=True),
}


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def one_setting(args) -> dict:
    """Runs in the subprocess: returns measured and predicted bytes."""
    import torch

    from minialign.algorithms.losses import token_logps
    from minialign.models.decoder import CausalLM, ModelConfig
    from minialign.training import loop, memory, runtime

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    cuda = torch.cuda.is_available() and not args.cpu
    world, rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
    device = torch.device(f"cuda:{rank}" if cuda and world > 1 else ("cuda" if cuda else "cpu"))
    dtype = "bf16" if cuda else "fp32"
    if world > 1:
        import torch.distributed as dist
        if cuda:
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if cuda else "gloo")
    rt = runtime.Runtime(device, torch.bfloat16 if cuda else torch.float32, rank, rank, world)
    cfg = ModelConfig(**SHAPES[args.shape])
    peak = [0]
    stop = threading.Event()

    def sample():
        while not stop.is_set():
            peak[0] = max(peak[0], rss_bytes())
            time.sleep(0.001)

    base = torch.cuda.memory_allocated() if cuda else rss_bytes()
    thread = None if cuda else threading.Thread(target=sample, daemon=True)
    if thread:
        thread.start()
    torch.manual_seed(0)
    policy = CausalLM(cfg).to(device).train()
    ref = CausalLM(cfg).to(device).eval().requires_grad_(False) if args.stage == "dpo" else None
    model = runtime.wrap_ddp(policy, rt, gradient_checkpointing=args.gradient_checkpointing, fsdp=args.fsdp)
    opt_cfg = argparse.Namespace(lr=1e-4, weight_decay=0.0)
    optimizer = loop.make_optimizer(policy, opt_cfg, rt)
    scaler = rt.make_scaler()
    torch.manual_seed(rank)  # each rank its own rows
    ids = torch.randint(0, cfg.vocab_size, (args.rows, args.seq_len + 1), device=device)
    inputs, labels = ids[:, :-1], ids[:, 1:]  # (B, T)
    t0 = time.perf_counter()
    for _ in range(args.steps):
        with rt.autocast():
            logps = token_logps(model(inputs), labels)  # (B, T) float32
            if ref is not None:
                with torch.no_grad():
                    ref_logps = token_logps(ref(inputs), labels)
                loss = -torch.nn.functional.logsigmoid(0.1 * (logps - ref_logps).sum(-1)).mean()
            else:
                loss = -logps.mean()
        loss.backward()
        loop.optimizer_step(model, optimizer, scaler, 1.0)
    seconds = (time.perf_counter() - t0) / args.steps
    if cuda:
        measured = torch.cuda.max_memory_allocated() - base
    else:
        stop.set()
        thread.join()
        measured = peak[0] - base
    p = memory.plan(cfg, args.stage, world_size=world, fsdp=args.fsdp, dtype=dtype, micro_batch=args.rows,
                    seq_len=args.seq_len, gradient_checkpointing=args.gradient_checkpointing)
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()
    return {"measured": measured, "predicted": p.total, "predicted_activations": p.activations,
            "static": p.total - p.activations, "s_per_step": seconds, "device": str(device),
            "params": memory.count_params(cfg)}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", default="minimind-26m", choices=sorted(SHAPES))
    ap.add_argument("--stages", nargs="*", default=["sft", "dpo"], choices=["sft", "dpo"])
    ap.add_argument("--rows", type=int, default=8, help="sequences (DPO: packed rows) per step")
    ap.add_argument("--seq_len", type=int, default=256)
    ap.add_argument("--steps", type=int, default=2, help="optimizer steps per setting (the first allocates AdamW)")
    ap.add_argument("--cpu", action="store_true", help="measure on CPU even where CUDA is available")
    ap.add_argument("--world_size", type=int, default=1, help="ranks (torchrun); > 1 measures DDP and FSDP")
    ap.add_argument("--child", default="", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        args.stage, ckpt, parallel = args.child.split(",")
        args.gradient_checkpointing, args.fsdp = ckpt == "1", parallel == "fsdp"
        print(json.dumps(one_setting(args)), flush=True)
        return
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    print(f"shape {args.shape}, {args.rows} rows x {args.seq_len} tokens, {args.steps} steps per setting")
    print(f"{'stage':<5} {'shard':<5} {'ckpt':<5} {'measured GB':>12} {'predicted GB':>13} {'(of it activations)':>20} "
          f"{'ratio':>6} {'s/step':>7}")
    launcher = [sys.executable] if args.world_size == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.world_size}"]
    settings = [(stage, ckpt, parallel) for stage in args.stages
                for parallel in (["none"] if args.world_size == 1 else ["ddp", "fsdp"]) for ckpt in (0, 1)]
    for stage, ckpt, parallel in settings:
        cmd = [*launcher, __file__, "--child", f"{stage},{ckpt},{parallel}", "--shape", args.shape, "--rows",
               str(args.rows), "--seq_len", str(args.seq_len), "--steps", str(args.steps)] + \
              (["--cpu"] if args.cpu else [])
        out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout
        r = max((json.loads(line) for line in out.splitlines() if line.startswith("{")),
                key=lambda x: x["measured"])  # the larger rank's
        print(f"{stage:<5} {parallel:<5} {'on' if ckpt else 'off':<5} {r['measured'] / 1e9:12.3f} "
              f"{r['predicted'] / 1e9:13.3f} {r['predicted_activations'] / 1e9:20.3f} "
              f"{r['measured'] / r['predicted']:6.2f} {r['s_per_step']:7.2f}   ({r['device']}, "
              f"{r['params'] / 1e6:.1f}M params)", flush=True)


if __name__ == "__main__":
    main()
