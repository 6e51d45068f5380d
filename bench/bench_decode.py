"""A decode step against this machine's limits, and where its time goes (a benchmark, not a test).

One decode step = one new token for each of `rows` sequences through the whole model with a KV cache
(minialign.models.decoder, as minialign.algorithms.generation.generate runs it), plus the sampling of that token.

Its limits on this machine, both measured here:
  bandwidth  every weight is read once per step: weight bytes / (memory read bandwidth), the bandwidth
             measured as the best of a large tensor copy (read + write bytes) and a large sum (read bytes);
  compute    2 * rows * (matmul parameters) FLOPs + attention over the cache, at the machine's fp32 matmul
             peak (the faster of torch.mm and oneDNN with prepacked weights, 2048^3).
The step's roofline time is the larger of the two; "of limit" = roofline time / measured time.

Both decode paths are timed alternately, step by step: `plain` (F.linear, i.e. MKL sgemm on CPU, and
torch.multinomial) and `packed` (what generate() runs since issue 20: oneDNN-prepacked weights and
generation.sample_categorical, the same draws). Both share issue 20's attention and mask changes for a
decode step (model.py), which the plain path did not have before. Then a torch.profiler table of one step
of each, grouped: matmuls, attention, sampling (the exponential draws of torch.multinomial), and
everything else (norms, RoPE, residual adds, cache writes: many small ops). Last, whole generate() calls
for both paths, and whether they sampled the same tokens.

python bench/bench_decode.py                          # presets cpu (128 rows: GRPO's rollout) and 26M (16 rows)
python bench/bench_decode.py --presets minimind-26m --rows 16 --steps 30
"""

import argparse
import copy
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runs from a checkout without pip install -e
from minialign.algorithms.generation import generate, sample_categorical  # noqa: E402
from minialign.models.decoder import CausalLM, KVCache, model_config  # noqa: E402
from minialign.models.packed_linear import available, packed_weights  # noqa: E402


def median_time(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def memory_bandwidth() -> float:
    """GB/s: the best of a 256 MB copy (read + write) and a 256 MB sum (read)."""
    src = torch.randn(64 * 1024 * 1024)
    dst = torch.empty_like(src)
    copy = 2 * src.numel() * 4 / median_time(lambda: dst.copy_(src), 7)
    read = src.numel() * 4 / median_time(lambda: src.sum(), 7)
    return max(copy, read) / 1e9


def matmul_peak() -> tuple[float, float]:
    """(torch.mm, oneDNN prepacked) fp32 GFLOP/s on 2048^3."""
    n = 2048
    a, b = torch.randn(n, n), torch.randn(n, n)
    mm = 2 * n**3 / median_time(lambda: a @ b, 5) / 1e9
    dnn = float("nan")
    if available(b):
        packed = torch.ops.mkldnn._reorder_linear_weight(b, n)
        dnn = 2 * n**3 / median_time(lambda: torch.ops.mkldnn._linear_pointwise(a, packed, None, "none", [], ""), 5) / 1e9
    return mm, dnn


def step_cost(cfg, model, rows: int, cache_len: int) -> tuple[int, float]:
    """(weight bytes read per step, FLOPs per step): every matmul weight once, the head, attention over the cache."""
    matmul_params = sum(p.numel() for n, p in model.named_parameters() if p.dim() == 2 and "embed" not in n)
    head = cfg.vocab_size * cfg.dim  # tied: the embedding matrix is read as the head; untied: lm_head is counted above
    if cfg.tie_embeddings:
        matmul_params += head
    if cfg.n_experts:  # each token runs k of the n experts' MLPs
        expert = 3 * cfg.dim * cfg.hidden_dim
        matmul_params -= cfg.n_layers * (cfg.n_experts - cfg.n_experts_per_tok) * expert
    attn = 4 * cfg.n_layers * cfg.n_heads * cfg.head_dim * cache_len  # q.k and p.v per head
    weight_bytes = 4 * sum(p.numel() for p in model.parameters())
    return weight_bytes, rows * (2 * matmul_params + attn)


def profile_step(step) -> dict:
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    groups = {"matmul": 0.0, "attention": 0.0, "sampling": 0.0, "other": 0.0}
    for e in prof.key_averages():
        name = e.key
        if "linear" in name or name in ("aten::mm", "aten::addmm"):
            key = "matmul"
        elif "scaled_dot_product" in name or "flash_attention" in name:
            key = "attention"
        elif name in ("aten::exponential_", "aten::multinomial", "aten::uniform_", "aten::log1p_", "aten::_softmax",
                      "aten::_log_softmax", "aten::argmax"):
            key = "sampling"
        else:
            key = "other"
        groups[key] += e.self_cpu_time_total / 1e3  # ms
    return groups


def bench_preset(preset: str, rows: int, prompt_len: int, new_tokens: int, steps: int, bw: float, peak: float):
    torch.manual_seed(0)
    cfg = model_config(preset)
    model = CausalLM(cfg).eval()
    prompt = torch.randint(4, cfg.vocab_size, (rows, prompt_len))
    mask = torch.ones_like(prompt, dtype=torch.bool)
    ones = torch.ones(rows, 1, dtype=torch.bool)
    cache_len = prompt_len + new_tokens // 2  # the average cache length of a call's steps
    weight_bytes, flops = step_cost(cfg, model, rows, cache_len)
    t_bw, t_fl = weight_bytes / (bw * 1e9), flops / (peak * 1e9)
    g = torch.Generator().manual_seed(0)

    plain_model = copy.deepcopy(model)  # packs are set on a model's modules, so the plain path gets its own copy

    def make_step(m, packs: bool):
        cache = KVCache(cfg, rows, cache_len + 8, "cpu", torch.float32)
        m(torch.cat([prompt, prompt[:, : cache_len - prompt_len]], 1), torch.ones(rows, cache_len, dtype=torch.bool),
          kv_cache=cache, logits_to_keep=1)
        tok = prompt[:, -1:]
        race = torch.empty(rows, cfg.vocab_size, dtype=torch.float64)

        def step():
            logits = m(tok, ones, kv_cache=cache)[:, -1].float()
            cache.length -= 1  # stay at cache_len: every timed step does the same work
            probs = F.softmax(logits, -1)
            if packs:
                next_tok = sample_categorical(probs, g, race)
            else:
                next_tok = torch.multinomial(probs, 1, generator=g).squeeze(-1)
            logits.log_softmax(-1).gather(-1, next_tok[:, None])
        return step

    with torch.no_grad(), packed_weights(model, rows):
        plain_step, packed_step = make_step(plain_model, False), make_step(model, True)
        times = {"plain": [], "packed": []}
        for _ in range(2):  # warm-up
            plain_step(), packed_step()
        for _ in range(steps):  # alternate the two paths step by step
            for name, fn in (("plain", plain_step), ("packed", packed_step)):
                t0 = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t0)
        groups = {name: profile_step(fn) for name, fn in (("plain", plain_step), ("packed", packed_step))}
    results = {}
    for name, ts in times.items():
        results[name] = statistics.median(ts)
    print(f"\n{preset}: {rows} rows, cache {cache_len} positions; weights {weight_bytes / 1e6:.1f} MB, "
          f"{flops / 1e9:.2f} GFLOP per step")
    print(f"  limits: bandwidth {t_bw * 1e3:.2f} ms ({bw:.1f} GB/s), compute {t_fl * 1e3:.2f} ms ({peak:.0f} GFLOP/s) "
          f"-> roofline {max(t_bw, t_fl) * 1e3:.2f} ms ({'compute' if t_fl > t_bw else 'bandwidth'}-bound)")
    for name in ("plain", "packed"):
        t = results[name]
        print(f"  {name:7s} step {t * 1e3:6.2f} ms = {max(t_bw, t_fl) / t:5.1%} of the roofline, "
              f"{t_bw / t:5.1%} of the bandwidth limit, {flops / t / 1e9:6.1f} GFLOP/s")
    print(f"  packed / plain speed: {results['plain'] / results['packed']:.2f}x")
    for name in ("plain", "packed"):
        total = sum(groups[name].values())
        print(f"  profile of one {name} step (self CPU ms, profiler on): "
              + ", ".join(f"{k} {v:.2f} ({v / total:.0%})" for k, v in groups[name].items()))

    # whole generate() calls, alternating, and whether the two paths sampled the same tokens
    gen_times = {"plain": [], "packed": []}
    outs = {}
    for i in range(3):
        for name, packs in (("plain", False), ("packed", True)):
            t0 = time.perf_counter()
            outs[name] = generate(model, prompt, mask, new_tokens, eos_id=-1, pad_id=0, temperature=1.0,
                                  generator=torch.Generator().manual_seed(i), pack_weights=packs)
            gen_times[name].append(time.perf_counter() - t0)
    same = torch.equal(outs["plain"].response_ids, outs["packed"].response_ids)
    dlogp = float((outs["plain"].logps - outs["packed"].logps).abs().max())
    tp, tk = statistics.median(gen_times["plain"]), statistics.median(gen_times["packed"])
    print(f"  generate {rows} x ({prompt_len} + {new_tokens}): plain {tp:.3f} s, packed {tk:.3f} s -> {tp / tk:.2f}x; "
          f"same tokens: {same}, max |logp diff| {dlogp:.1e}")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--presets", nargs="+", default=["cpu", "minimind-26m"])
    p.add_argument("--rows", nargs="+", type=int, default=[128, 16], help="rows per preset (one value for all)")
    p.add_argument("--prompt_len", type=int, default=64)
    p.add_argument("--new_tokens", type=int, default=64)
    p.add_argument("--steps", type=int, default=20, help="timed decode steps per path (median)")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    rows = args.rows * len(args.presets) if len(args.rows) == 1 else args.rows
    if len(rows) != len(args.presets):
        p.error("--rows: give one value, or one per --presets entry")
    bw = memory_bandwidth()
    mm, dnn = matmul_peak()
    peak = max(mm, dnn) if dnn == dnn else mm
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"torch {torch.__version__}, {args.threads} threads, load average {load:.2f}; memory bandwidth {bw:.1f} GB/s; "
          f"fp32 matmul peak: torch.mm {mm:.0f} GFLOP/s, oneDNN prepacked {dnn:.0f} GFLOP/s")
    for preset, r in zip(args.presets, rows):
        bench_preset(preset, r, args.prompt_len, args.new_tokens, args.steps, bw, peak)


if __name__ == "__main__":
    main()
