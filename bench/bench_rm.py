"""Reward-model training pairs/s: plain rows vs packed pairs (a benchmark, not a test).

One step = the train_rm.py step: B pairs, one forward of the ScalarModel, rewards at each response's last
token (minialign.algorithms.reward_model.pair_rewards), Bradley-Terry loss, backward, AdamW step. Two batch layouts,
both from the one packer (minialign.algorithms.packing.pack): packed, B rows [x | y_c | y_r] (G = 2, what train_rm.py
trains on: packing.collate_pairs, the prompt computed once), and plain, 2B rows [x y] (G = 1 with the
prompt repeated, the layout of every other implementation); the rewards are the same (tests/test_packing.py).
Random token ids: a 64-token prompt and two 64-token responses ending with <|im_end|> per pair, so there
is no padding (packed rows of 192 tokens, plain rows of 128). fp32 on CPU (bf16 autocast on CUDA); the
layouts are timed round robin (one step of each per round, so a neighbour's load hits both alike), median
over the timed steps after warm-up.

python bench/bench_rm.py                            # minimind-26m, 8 pairs, 2 threads
python bench/bench_rm.py --preset cpu --steps 20
"""

import argparse
import os
import statistics
import time

import torch

from minialign.algorithms.losses import bradley_terry_loss
from minialign.algorithms.packing import collate_pairs, pack
from minialign.algorithms.reward_model import pair_rewards
from minialign.data.batching import to_device
from minialign.models.decoder import ScalarModel, model_config

IM_END = 3  # minialign.data.tokenizer's fixed id


def random_pairs(n_pairs: int, prompt_len: int, response_len: int, vocab_size: int, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)

    def ids(n):  # ordinary tokens (ids >= 4 skip the specials)
        return torch.randint(4, vocab_size, (n,), generator=g).tolist()

    return [{"prompt": ids(prompt_len), "chosen": ids(response_len - 1) + [IM_END],
             "rejected": ids(response_len - 1) + [IM_END]} for _ in range(n_pairs)]


def plain_rows(pairs: list[dict], pad_id: int) -> dict:
    """Two rows [x y_c], [x y_r] per pair: packing.pack with G = 1 and the prompt repeated (responses 2b, 2b + 1
    are pair b's chosen and rejected, as in a packed batch, so pair_rewards reads both alike)."""
    prompts = [p["prompt"] for p in pairs for _ in range(2)]
    return pack(prompts, [y for p in pairs for y in (p["chosen"], p["rejected"])], 1, pad_id)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="minimind-26m")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--pairs", type=int, default=8, help="preference pairs per step")
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
    pairs = random_pairs(args.pairs, args.prompt_len, args.response_len, model.cfg.vocab_size)
    layouts = {"plain rows (G = 1)": to_device(plain_rows(pairs, pad_id=0), device),
               "packed (G = 2)": to_device(collate_pairs(pairs, pad_id=0), device)}
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"device {device}, dtype {dtype}, torch {torch.__version__}, threads {torch.get_num_threads()}, "
          f"load average {load:.2f}")
    print(f"{args.preset}: {model.num_params() / 1e6:.1f}M parameters; {args.pairs} pairs; rows x tokens: "
          + ", ".join(f"{name} {tuple(b['input_ids'].shape)}" for name, b in layouts.items()))

    def step(batch):
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            chosen_rewards, rejected_rewards = pair_rewards(model, batch)
            loss = bradley_terry_loss(chosen_rewards, rejected_rewards)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()

    times = {name: [] for name in layouts}
    for i in range(args.warmup + args.steps):  # round robin over the layouts
        for name, batch in layouts.items():
            t0 = time.perf_counter()
            step(batch)
            if i >= args.warmup:
                times[name].append(time.perf_counter() - t0)
    first = None
    for name, t in times.items():
        median = statistics.median(t)
        rate = args.pairs / median
        first = first or rate
        print(f"RM training, {name:18}: {rate:8.2f} pairs/s ({median:.3f} s per step, median of {len(t)}; "
              f"{rate / first:.2f}x the first)  step times (s): {' '.join(f'{x:.3f}' for x in t)}")


if __name__ == "__main__":
    main()
