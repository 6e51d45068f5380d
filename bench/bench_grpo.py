"""GRPO seconds per step and sampling new-tokens/s on the minimind-26m preset (a benchmark, not a test).

GRPO step: exactly what train_grpo.py's loop does each step (sample_rollout, `train_grpo.grpo_batches`:
rewards, group advantages, reference log-probs when beta > 0; `train_grpo.grpo_update`: one update), on a
randomly initialized model, in the script's shared-prompt layout (a prompt's G responses packed in one row)
and, to keep the speedup visible, the naive layout for the update (one row per response: minialign.algorithms.packing with G = 1 and
the prompt repeated), 8 prompts x G=4 responses, 64-token prompts, 32 new tokens. A random model rarely emits <|im_end|>, so
here eos is disabled and every response is the full 32 tokens (the worst case); rewards are random
numbers so that every group has a signal and the update is never skipped. Median over timed steps.
Generation: minialign.algorithms.generation.generate at temperature 1 on 16 x (64 prompt + 64 new) tokens.

python bench/bench_grpo.py                    # 2 threads, minimind-26m
python bench/bench_grpo.py --threads 1        # on a shared machine: a second thread waiting for a core is slower
python bench/bench_grpo.py --preset cpu --steps 10
"""

import argparse
import os
import random
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import train_grpo  # noqa: E402  (the step we time is the script's own)
from minialign.algorithms.generation import generate  # noqa: E402
from minialign.algorithms.reward_funcs import RewardSource  # noqa: E402
from minialign.algorithms.rollout import Rollout, micro_batch_rows, packed_batch, sample_rollout  # noqa: E402
from minialign.models.decoder import CausalLM, model_config  # noqa: E402
from minialign.training import loop, runtime  # noqa: E402


class NoEosTok:
    """Token ids only: eos -1 never matches, so every response runs to max_new_tokens."""
    pad_id, eos_id = 0, -1

    def decode(self, ids):
        return ""


def random_reward(seed):
    rng = random.Random(seed)
    return lambda prompts, completions, **fields: [rng.random() for _ in completions]


def bench_grpo_step(model, beta, layout, args, device, dtype) -> float:
    rt = runtime.Runtime(device, dtype)
    cfg = train_grpo.Config(init_from="bench", prompts_per_step=args.prompts, num_generations=args.G, max_new_tokens=args.new_tokens,
                            beta=beta, micro_batch_size=args.prompts * args.G, lr=1e-5, max_len=args.prompt_len + args.new_tokens,
                            mask_truncated_completions=False)  # every response is truncated here; they must still train
    ref = CausalLM(model.cfg).to(device).eval().requires_grad_(False) if beta > 0 else None
    if ref is not None:
        ref.load_state_dict(model.state_dict())
    optimizer = loop.make_optimizer(model, cfg, rt)
    scaler = rt.make_scaler()
    g = torch.Generator().manual_seed(0)
    prompts = [{"prompt_ids": torch.randint(4, model.cfg.vocab_size, (args.prompt_len,), generator=g).tolist(), "prompt_text": ""}
               for _ in range(args.prompts)]
    sources = [RewardSource("random", random_reward(0), 1.0)]
    times = []
    for step in range(args.warmup + args.steps):
        t0 = time.perf_counter()
        with rt.autocast():
            ro = sample_rollout(model, NoEosTok(), prompts, args.G, args.new_tokens, 1.0, cfg.seed, step, 0)
        batches, g = train_grpo.grpo_batches(ro, sources, None, ref, rt, cfg)
        if layout == "rows":  # the same micro-batches and tensors, one row [x y_i] per response
            plain = Rollout(**{**ro.__dict__, "group_size": 1})
            keep = [k for k in ("loss_mask", "advantages", "sampler_logps", "ref_logps") if k in batches[0]]
            batches = [{**packed_batch(plain, rows), **{k: b[k] for k in keep}}
                       for b, rows in zip(batches, micro_batch_rows(ro, cfg.micro_batch_size, by_length=True))]
        m = {**train_grpo.grpo_update(model, optimizer, scaler, batches, step, rt, cfg, {}),
             **train_grpo.rollout_metrics(g, sources, args.G)}
        if device.type == "cuda":
            torch.cuda.synchronize()
        assert m["update_skipped"] == 0 and m["completions/min_length"] == args.new_tokens
        if step >= args.warmup:
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


@torch.no_grad()
def bench_generate(model, args, device) -> float:
    prompt = torch.randint(4, model.cfg.vocab_size, (args.gen_batch, args.prompt_len), device=device)
    mask = torch.ones_like(prompt, dtype=torch.bool)
    times = []
    for i in range(args.warmup + args.steps):
        gen = torch.Generator(device=device).manual_seed(i)
        t0 = time.perf_counter()
        out = generate(model, prompt, mask, args.gen_new_tokens, eos_id=-1, pad_id=0, temperature=1.0, generator=gen)
        if device.type == "cuda":
            torch.cuda.synchronize()
        assert out.response_ids.shape[1] == args.gen_new_tokens
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
    return args.gen_batch * args.gen_new_tokens / statistics.median(times)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="minimind-26m")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=3, help="timed repetitions (after --warmup)")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--prompts", type=int, default=8, help="prompts per GRPO step")
    ap.add_argument("--G", type=int, default=4, help="responses per prompt")
    ap.add_argument("--prompt_len", type=int, default=64)
    ap.add_argument("--new_tokens", type=int, default=32, help="GRPO generation budget")
    ap.add_argument("--gen_batch", type=int, default=16)
    ap.add_argument("--gen_new_tokens", type=int, default=64)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"device {device}, dtype {dtype}, torch {torch.__version__}, threads {torch.get_num_threads()}, load average {load:.2f}")
    torch.manual_seed(0)
    model = CausalLM(model_config(args.preset)).to(device)
    print(f"{args.preset}: {model.num_params() / 1e6:.2f}M parameters")
    for beta in (0.0, 0.04):
        for layout in ("rows", "shared_prompt"):
            s = bench_grpo_step(model, beta, layout, args, device, dtype)
            print(f"GRPO step, beta={beta:g}, layout {layout}: {s:.2f} s/step  ({args.prompts} prompts x G={args.G}, "
                  f"{args.prompt_len}-token prompts, {args.new_tokens} new tokens, median of {args.steps})")
    tps = bench_generate(model, args, device)
    print(f"generation: {tps:.0f} new tokens/s  (batch {args.gen_batch} x ({args.prompt_len} prompt + {args.gen_new_tokens} new), temperature 1)")


if __name__ == "__main__":
    main()
