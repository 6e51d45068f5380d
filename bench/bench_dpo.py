"""DPO training pairs/s: live vs precomputed reference, plain rows vs packed pairs (a benchmark, not a test).

One optimizer step = the policy's forward + backward of the DPO (sigmoid) loss on a batch of pairs,
+ the reference's no-grad forward when it is live, + AdamW. Two batch layouts, both from the one packer
(minialign.algorithms.packing.pack): packed, one row [x | y_c | y_r] per pair (G = 2, what train_dpo.py trains on,
the prompt computed once), and plain, two rows [x y_c], [x y_r] per pair (G = 1 with the prompt repeated,
the layout of every other implementation). Both give the same log-probs (tests/test_packing.py); the
difference is the speedup of packing. The configurations are timed round robin (one step of each per
round), so load from other processes on a shared machine hits them alike. Random token ids, fp32 on CPU
(bf16 autocast on CUDA), median over the timed steps after warm-up. With a precomputed reference the
reference log-probs are computed once before timing (what --precompute_ref does before training).

python bench/bench_dpo.py                       # minimind-26m, 64-token prompts and responses, 8 pairs, 2 threads
python bench/bench_dpo.py --preset cpu --steps 20
"""

import argparse
import os
import random
import statistics
import time

import torch

from minialign.algorithms.losses import dpo_loss
from minialign.algorithms.packing import collate_pairs, pack
from minialign.algorithms.preference import pair_logps
from minialign.data.batching import to_device
from minialign.models.decoder import CausalLM, model_config

CONFIGS = [  # (name, packed pairs, precomputed reference)
    ("live reference, plain rows", False, False),
    ("precomputed reference, plain rows", False, True),
    ("live reference, packed", True, False),
    ("precomputed reference, packed", True, True),
]


def plain_rows(pairs, pad_id):
    """Two rows [x y_c], [x y_r] per pair: packing.pack with G = 1 and the prompt repeated.

    Responses 2b, 2b + 1 are pair b's chosen and rejected, as in a packed batch, so pair_logps reads both alike."""
    prompts = [p["prompt"] for p in pairs for _ in range(2)]
    return pack(prompts, [y for p in pairs for y in (p["chosen"], p["rejected"])], 1, pad_id)


def make_step(policy, ref, opt, pairs, packed, precomputed, device, dtype):
    """A closure running one DPO optimizer step of this configuration (reference precomputed here if asked)."""
    batch = to_device(collate_pairs(pairs, 0) if packed else plain_rows(pairs, 0), device)
    autocast = lambda: torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)  # noqa: E731
    fixed_ref = None
    if precomputed:
        with torch.no_grad(), autocast():
            fixed_ref = pair_logps(ref, batch)

    def step():
        with autocast():
            ref_out = fixed_ref
            if ref_out is None:
                with torch.no_grad():
                    ref_out = pair_logps(ref, batch)
            out = pair_logps(policy, batch)
            losses, _, _ = dpo_loss(out.chosen_logps, out.rejected_logps, ref_out.chosen_logps,
                                    ref_out.rejected_logps, beta=0.1)
        losses.mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()

    return step


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="minimind-26m")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--pairs", type=int, default=8, help="pairs per step")
    ap.add_argument("--prompt_len", type=int, default=64)
    ap.add_argument("--response_len", type=int, default=64, help="tokens of the chosen and of the rejected response")
    ap.add_argument("--steps", type=int, default=5, help="timed steps (median), after --warmup")
    ap.add_argument("--warmup", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.manual_seed(0)
    cfg = model_config(args.preset, vocab_size=model_config(args.preset).vocab_size if args.preset != "cpu" else 1024)
    policy = CausalLM(cfg).to(device)
    ref = CausalLM(cfg).to(device).eval().requires_grad_(False)
    ref.load_state_dict(policy.state_dict())  # the policy drifts a little over the rounds; irrelevant to timing
    rng = random.Random(0)
    draw = lambda n: [rng.randrange(4, cfg.vocab_size) for _ in range(n)]  # noqa: E731
    pairs = [{"prompt": draw(args.prompt_len), "chosen": draw(args.response_len), "rejected": draw(args.response_len)}
             for _ in range(args.pairs)]
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"device {device}, dtype {dtype}, torch {torch.__version__}, threads {torch.get_num_threads()}, "
          f"load average {load:.2f}")
    print(f"{args.preset}: {policy.num_params() / 1e6:.1f}M parameters; {args.pairs} pairs of {args.prompt_len}-token "
          f"prompts and {args.response_len}-token responses; median of {args.steps} steps after {args.warmup} warm-up")
    print("plain rows: 2 rows [x y] per pair (packing.pack, G = 1, prompt repeated); "
          "packed: 1 row [x | y_c | y_r] per pair (G = 2)")
    print(f"{'configuration':40} {'pairs/s':>8} {'s/step':>8} {'vs first':>9}")
    opt = torch.optim.AdamW(policy.parameters(), lr=1e-6)
    steps = [make_step(policy, ref, opt, pairs, packed, precomputed, device, dtype)
             for _, packed, precomputed in CONFIGS]
    times = [[] for _ in CONFIGS]
    # round robin: each round times one step of every configuration, so a neighbour's load on a shared
    # machine slows them all alike instead of whichever configuration happened to run at that moment
    for i in range(args.warmup + args.steps):
        for k, step in enumerate(steps):
            t0 = time.perf_counter()
            step()
            if i >= args.warmup:
                times[k].append(time.perf_counter() - t0)
    first = None
    for (name, _, _), t in zip(CONFIGS, times):
        sec = statistics.median(t)
        rate = args.pairs / sec
        first = first or rate
        print(f"{name:40} {rate:8.2f} {sec:8.3f} {rate / first:8.2f}x   (min {min(t):.3f} s)")


if __name__ == "__main__":
    main()
