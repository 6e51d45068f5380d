"""PPO seconds per iteration, and the share of it spent sampling (a benchmark, not a test).

An iteration is exactly what train_ppo.py's loop does (KV-cache rollout; `train_ppo.rollout_tensors`: old and
reference log-probs, values, reward-model scores, GAE; `train_ppo.ppo_update`: num_ppo_epochs x num_minibatches
updates of policy and value),
on randomly initialized models. A random model rarely emits <|im_end|>, so eos is disabled here and every
response is the full max_new_tokens (the worst case). Median over timed iterations; "sampling" is
minialign.algorithms.rollout.sample_rollout, timed on its own.

python bench/bench_ppo.py                                  # the default run: "cpu" preset, 64 prompts x 32 new tokens
python bench/bench_ppo.py --preset minimind-26m --prompts 8 --threads 2
"""

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import train_ppo  # noqa: E402  (the iteration we time is the script's own)
from minialign.algorithms.reward_funcs import parse_reward_funcs  # noqa: E402
from minialign.algorithms.rollout import sample_rollout  # noqa: E402
from minialign.models.decoder import CausalLM, ScalarModel, model_config  # noqa: E402
from minialign.training import loop, runtime  # noqa: E402


class NoEosTok:
    """Token ids only: eos -1 never matches, so every response runs to max_new_tokens."""
    pad_id, eos_id = 0, -1

    def decode(self, ids):
        return ""


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="cpu")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--steps", type=int, default=3, help="timed iterations (after --warmup)")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--prompts", type=int, default=64, help="prompts (= responses) per iteration")
    ap.add_argument("--prompt_len", type=int, default=20, help="prompt tokens (default-task prompts are ~10-25)")
    ap.add_argument("--new_tokens", type=int, default=32)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    rt = runtime.Runtime(device, dtype)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"device {device}, dtype {dtype}, torch {torch.__version__}, threads {torch.get_num_threads()}, load average {load:.2f}")

    torch.manual_seed(0)
    mcfg = model_config(args.preset)
    policy, value, ref, rm = CausalLM(mcfg), ScalarModel(mcfg), CausalLM(mcfg), ScalarModel(mcfg)
    ref.load_state_dict(policy.state_dict())
    ref, rm = (m.to(device).eval().requires_grad_(False) for m in (ref, rm))
    model = train_ppo.PolicyAndValue(policy, value).to(device)
    cfg = train_ppo.Config(prompts_per_step=args.prompts, max_new_tokens=args.new_tokens, micro_batch_size=args.prompts, lr=1e-5,
                           max_len=args.prompt_len + args.new_tokens)
    optimizer = loop.make_optimizer(model, cfg, rt)
    scaler = rt.make_scaler()
    g = torch.Generator().manual_seed(0)
    prompts = [{"prompt_ids": torch.randint(4, mcfg.vocab_size, (args.prompt_len,), generator=g).tolist(), "prompt_text": ""}
               for _ in range(args.prompts)]
    sources = parse_reward_funcs(["reward_model"], [], model_names=("reward_model",))
    print(f"{args.preset}: {policy.num_params() / 1e6:.2f}M parameters per model; {args.prompts} prompts x {args.prompt_len} tokens, "
          f"{args.new_tokens} new tokens, {cfg.num_ppo_epochs} epochs x {cfg.num_minibatches} minibatches")

    iteration, sampling = [], []
    for step in range(args.warmup + args.steps):
        t0 = time.perf_counter()
        with rt.autocast():
            ro = sample_rollout(policy, NoEosTok(), prompts, 1, args.new_tokens, 1.0, 0, step, 0)
        t1 = time.perf_counter()
        b = train_ppo.rollout_tensors(model, ref, rm, ro, sources, step, rt, cfg)
        m = {**train_ppo.rollout_metrics(ro, b, sources, rt), **train_ppo.ppo_update(model, optimizer, scaler, ro, b, step, rt, cfg, {})}
        if device.type == "cuda":
            torch.cuda.synchronize()
        t2 = time.perf_counter()
        assert m["completions/mean_length"] == args.new_tokens and m["policy/optimizer_steps"] == cfg.num_ppo_epochs * cfg.num_minibatches
        if step >= args.warmup:
            sampling.append(t1 - t0)
            iteration.append(t2 - t0)  # the whole iteration, sampling included
    it, smp = statistics.median(iteration), statistics.median(sampling)
    print(f"PPO iteration: {it:.2f} s (sampling {smp:.2f} s = {100 * smp / it:.0f}%), {args.prompts * args.new_tokens / smp:.0f} new tokens/s "
          f"sampled; median of {args.steps}")


if __name__ == "__main__":
    main()
