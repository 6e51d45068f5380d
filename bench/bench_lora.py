"""DPO with LoRA vs full fine-tuning: trainable parameters, peak memory and step time (a benchmark, not a test).

Configurations, each run in a fresh subprocess so that its peak resident memory (ru_maxrss) is its own:
  full, live reference          the policy trains every weight (AdamW over all), the reference is a second
                                frozen copy of the model (train_dpo.py's default)
  full, precomputed reference   the same without the second copy: reference log-probs computed once
                                before timing (--precompute_ref)
  LoRA r=R, adapters-off ref    adapters on q k v o gate up down (minialign.models.lora), the base frozen; the
                                reference is the same model with the adapters off (train_dpo.py --lora_r R)
One optimizer step = the policy's forward + backward of the DPO (sigmoid) loss on a batch of packed pairs
[x | y_c | y_r], + the live reference's no-grad forward, + AdamW. Random init and random token ids (the
timing and memory do not depend on the weights), fp32 on CPU (bf16 autocast on CUDA), median over the timed
steps after warm-up. "import" is the peak RSS of the same subprocess before any model is built (Python,
torch), so "peak - import" is what the configuration itself costs. On CUDA the peak allocated GPU memory
is printed too.

python bench/bench_lora.py                          # minimind-26m, 8 pairs of 64 + 64 + 64 tokens, r = 8
python bench/bench_lora.py --preset cpu --steps 20 --lora_r 16
"""

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

CONFIGS = ("full, live reference", "full, precomputed reference", "LoRA, adapters-off reference")


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: kilobytes


def child(args) -> dict:
    """Run one configuration in this process; return its numbers."""
    import_mb = peak_rss_mb()
    import torch

    from minialign.algorithms.losses import dpo_loss
    from minialign.algorithms.packing import collate_pairs
    from minialign.algorithms.preference import pair_logps
    from minialign.data.batching import to_device
    from minialign.models import lora
    from minialign.models.decoder import CausalLM, model_config

    import_mb = max(import_mb, peak_rss_mb())
    torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    autocast = lambda: torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)  # noqa: E731
    torch.manual_seed(0)
    cfg = model_config(args.preset)
    policy = CausalLM(cfg).to(device)
    name = CONFIGS[args.child]
    if name.startswith("LoRA"):
        lora.apply_lora(policy, args.lora_r, 2.0 * args.lora_r)
        ref = lora.reference(policy)
    else:
        ref = CausalLM(cfg).to(device).eval().requires_grad_(False)
        ref.load_state_dict(policy.state_dict())
    g = torch.Generator().manual_seed(0)
    draw = lambda n: torch.randint(4, cfg.vocab_size, (n,), generator=g).tolist()  # noqa: E731
    pairs = [{"prompt": draw(args.prompt_len), "chosen": draw(args.response_len), "rejected": draw(args.response_len)}
             for _ in range(args.pairs)]
    batch = to_device(collate_pairs(pairs, 0), device)
    fixed_ref = None
    if name == "full, precomputed reference":
        with torch.no_grad(), autocast():
            fixed_ref = pair_logps(ref, batch)
        ref = None  # freed, as train_dpo.py --precompute_ref does
    params = [p for p in policy.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-6, fused=True)
    times = []
    for i in range(args.warmup + args.steps):
        t0 = time.perf_counter()
        with autocast():
            if fixed_ref is None:
                with torch.no_grad():
                    ref_out = pair_logps(ref, batch)
            else:
                ref_out = fixed_ref
            out = pair_logps(policy, batch)
            losses, _, _ = dpo_loss(out.chosen_logps, out.rejected_logps, ref_out.chosen_logps,
                                    ref_out.rejected_logps, beta=0.1)
        losses.mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
    return {"config": name, "trainable": sum(p.numel() for p in params), "total": policy.num_params(),
            "import_mb": import_mb, "peak_mb": peak_rss_mb(), "step_s": statistics.median(times),
            "min_step_s": min(times), "device": str(device),
            "gpu_peak_mb": torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else None}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="minimind-26m")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--pairs", type=int, default=8, help="pairs per step")
    ap.add_argument("--prompt_len", type=int, default=64)
    ap.add_argument("--response_len", type=int, default=64, help="tokens of the chosen and of the rejected response")
    ap.add_argument("--lora_r", type=int, default=8, help="LoRA rank (alpha = 2r)")
    ap.add_argument("--steps", type=int, default=5, help="timed steps (median), after --warmup")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--child", type=int, default=-1, help=argparse.SUPPRESS)  # run configuration i, print JSON
    args = ap.parse_args()
    if args.child >= 0:
        print(json.dumps(child(args)))
        return
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"{args.preset}, {args.pairs} pairs of {args.prompt_len}-token prompts and 2 x {args.response_len}-token "
          f"responses (packed), {args.threads} threads, LoRA r={args.lora_r} alpha={2 * args.lora_r} on all "
          f"projections; median of {args.steps} steps after {args.warmup}; load average {load:.2f}")
    print(f"{'configuration':32} {'trainable':>12} {'peak RSS MB':>12} {'- import':>9} {'s/step':>8}  GPU peak MB")
    rows = []
    for i in range(len(CONFIGS)):
        cmd = [sys.executable, __file__, "--child", str(i), *sys.argv[1:]]
        env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if proc.returncode:
            raise SystemExit(f"{CONFIGS[i]} failed:\n{proc.stderr[-3000:]}")
        r = json.loads(proc.stdout.strip().splitlines()[-1])
        rows.append(r)
        gpu = f"{r['gpu_peak_mb']:.0f}" if r["gpu_peak_mb"] is not None else "-"
        above = r["peak_mb"] - r["import_mb"]
        print(f"{r['config']:32} {r['trainable'] / 1e6:10.3f}M {r['peak_mb']:12.0f} {above:9.0f} "
              f"{r['step_s']:8.3f}  {gpu}   (of {r['total'] / 1e6:.1f}M; min {r['min_step_s']:.3f} s)", flush=True)
    live, lo = rows[0], rows[2]
    print(f"LoRA vs full with a live reference: {lo['trainable'] / live['trainable']:.4f}x trainable, peak RSS "
          f"{lo['peak_mb'] - lo['import_mb']:.0f} vs {live['peak_mb'] - live['import_mb']:.0f} MB above import, "
          f"step {lo['step_s'] / live['step_s']:.2f}x the time")


if __name__ == "__main__":
    main()
