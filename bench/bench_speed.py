"""Training tokens/s and generation new-tokens/s for the model presets (a benchmark, not a test).

Training: forward + backward + AdamW step of the next-token loss on random tokens, fp32 on CPU
(bf16 autocast on CUDA), median over the timed steps after warm-up. Generation: the KV-cache sampler
(minialign.algorithms.generation.generate) at temperature 1, eos disabled so every row produces max_new_tokens.

python bench/bench_speed.py                   # both presets, 2 threads
python bench/bench_speed.py --presets cpu --steps 20
"""

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runs from a checkout without pip install -e
from minialign.algorithms.generation import generate  # noqa: E402
from minialign.algorithms.losses import token_logps  # noqa: E402
from minialign.models.decoder import CausalLM, model_config  # noqa: E402


def cpu_load() -> float:
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")


def bench_train(model, batch, seq, steps, warmup, device, dtype):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ids = torch.randint(4, model.cfg.vocab_size, (batch, seq + 1), device=device)
    times = []
    for i in range(warmup + steps):
        t0 = time.perf_counter()
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            logits = model(ids[:, :-1])
            loss = -token_logps(logits, ids[:, 1:]).mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return batch * seq / statistics.median(times)


@torch.no_grad()
def bench_generate(model, batch, prompt_len, new_tokens, reps, device):
    model.eval()
    prompt = torch.randint(4, model.cfg.vocab_size, (batch, prompt_len), device=device)
    mask = torch.ones_like(prompt, dtype=torch.bool)
    times = []
    for i in range(reps + 1):
        g = torch.Generator(device=device).manual_seed(i)
        t0 = time.perf_counter()
        out = generate(model, prompt, mask, new_tokens, eos_id=-1, pad_id=0, temperature=1.0, generator=g)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i:
            times.append(time.perf_counter() - t0)
        assert out.response_ids.shape[1] == new_tokens
    model.train()
    return batch * new_tokens / statistics.median(times)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--presets", nargs="+", default=["cpu", "minimind-26m"])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=10, help="timed training steps (after 3 warm-up)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--gen_batch", type=int, default=16)
    ap.add_argument("--prompt_len", type=int, default=64)
    ap.add_argument("--new_tokens", type=int, default=64)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    print(f"device {device}, dtype {dtype}, torch {torch.__version__}, threads {torch.get_num_threads()}, load average {cpu_load():.2f}")
    print(f"{'preset':14} {'params':>8} {'train tok/s':>12} {'gen new-tok/s':>14}   (train: batch {args.batch} x {args.seq}; "
          f"gen: batch {args.gen_batch} x ({args.prompt_len} prompt + {args.new_tokens} new))")
    for preset in args.presets:
        torch.manual_seed(0)
        cfg = model_config(preset, vocab_size=model_config(preset).vocab_size if preset != "cpu" else 1024)
        model = CausalLM(cfg).to(device)
        train = bench_train(model, args.batch, args.seq, args.steps, 3, device, dtype)
        gen = bench_generate(model, args.gen_batch, args.prompt_len, args.new_tokens, 3, device)
        print(f"{preset:14} {model.num_params() / 1e6:7.2f}M {train:12.0f} {gen:14.0f}")


if __name__ == "__main__":
    main()
