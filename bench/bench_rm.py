"""Reward-model training pairs/s (a benchmark, not a test).

One step = the train_rm.py step: B pairs collated into 2B rows (minialign.reward.collate_pairs), one
forward of the ScalarModel, rewards at the last real token, Bradley-Terry loss, backward, AdamW step.
Random token ids: a 64-token prompt and two 64-token responses ending with <|im_end|> per pair, so
every row is 128 tokens (no padding). fp32 on CPU (bf16 autocast on CUDA); median over the timed steps
after warm-up.

python bench/bench_rm.py                            # minimind-26m, 8 pairs, 2 threads
python bench/bench_rm.py --preset cpu --steps 20
"""

import argparse
import os
import statistics
import time

import torch

from minialign.losses import bradley_terry_loss
from minialign.model import ScalarModel, model_config
from minialign.reward import collate_pairs, pair_rewards

IM_END = 3  # minialign.tokenizer's fixed id


def random_pairs(n_pairs: int, prompt_len: int, response_len: int, vocab_size: int, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)

    def ids(n):  # ordinary tokens (ids >= 4 skip the specials)
        return torch.randint(4, vocab_size, (n,), generator=g).tolist()

    return [{"prompt": ids(prompt_len), "chosen": ids(response_len - 1) + [IM_END], "rejected": ids(response_len - 1) + [IM_END]}
            for _ in range(n_pairs)]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="minimind-26m")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--pairs", type=int, default=8, help="preference pairs per step (2x rows)")
    ap.add_argument("--prompt_len", type=int, default=64)
    ap.add_argument("--response_len", type=int, default=64)
    ap.add_argument("--steps", type=int, default=5, help="timed steps (after --warmup)")
    ap.add_argument("--warmup", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32

    torch.manual_seed(0)
    model = ScalarModel(model_config(args.preset)).to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    batch = collate_pairs(random_pairs(args.pairs, args.prompt_len, args.response_len, model.cfg.vocab_size), pad_id=0)
    batch = {k: v.to(device) for k, v in batch.items()}
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"device {device}, dtype {dtype}, torch {torch.__version__}, threads {torch.get_num_threads()}, load average {load:.2f}")
    print(f"{args.preset}: {model.num_params() / 1e6:.1f}M parameters; {args.pairs} pairs = {tuple(batch['input_ids'].shape)} rows x tokens")

    times = []
    for i in range(args.warmup + args.steps):
        t0 = time.perf_counter()
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            chosen_rewards, rejected_rewards = pair_rewards(model, batch)
            loss = bradley_terry_loss(chosen_rewards, rejected_rewards)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
    median = statistics.median(times)
    print(f"step times (s): {' '.join(f'{t:.3f}' for t in times)}")
    print(f"RM training: {args.pairs / median:.2f} pairs/s ({median:.3f} s per step, median of {len(times)})")


if __name__ == "__main__":
    main()
