"""--fsdp in every training script (issue 27): 2 gloo ranks, the trained model sharded with FSDP2, end where one
process ends.

SFT (with stop + resume and the transformers export) and DPO have their own --fsdp tests beside their scripts;
this file covers the rest in ONE pair of spawned processes (each script's main() run in turn, a fresh process
group per run), against the same scripts in this process: pretrain, RM, KTO, DPO, PPO (also stopped after 2
iterations and resumed), online DPO and GRPO, the frozen reference / reward models sharded too (--shard_frozen)
where a script has them, --gradient_checkpointing with FSDP (pretrain, GRPO), and the mid-run evaluations (rank 0 alone, inside runtime.gathered) on; and DPO under
plain DDP with its evaluations. Tolerance as for DDP:
weights rtol 1e-4 / atol 1e-5 (the same gradient summed in another order), logged losses within 1e-4.
"""

import json
import os
import socket
import sys
from pathlib import Path

import pytest
import torch
from conftest import ROOT, run

from minialign.training import loop

DATA = ROOT / "data"
# the RM compares with an atol of 1e-4: its score head's bias gets a zero gradient up to rounding (Bradley-Terry
# ignores a shared offset), which Adam turns into steps of ~lr (test_reward_model's DDP test says the same)
ATOL = {"rm": 1e-4}


def write_lines(src: Path, dst: Path, n: int):
    dst.write_text("\n".join(src.read_text(encoding="utf-8").splitlines()[:n]) + "\n", encoding="utf-8")


@pytest.fixture(scope="module")
def d(tmp_path_factory):
    """A tokenizer, a 2-step SFT model and a 2-step reward model on slices of the default data."""
    import train_rm
    import train_sft
    d = tmp_path_factory.mktemp("fsdp")
    for name, n in (("sft_train.jsonl", 64), ("rl_train.jsonl", 64), ("rl_eval.jsonl", 8), ("pref_train.jsonl", 32),
                    ("pref_eval.jsonl", 8), ("pretrain.jsonl", 40)):
        write_lines(DATA / name, d / name, n)
    run([sys.executable, "-m", "minialign.data.tokenizer", "--data", str(DATA / "sft_train.jsonl"),
         str(DATA / "pretrain.jsonl"), "--vocab_size", "512", "--out", str(d / "tok")])
    train_sft.main(["--data", str(d / "sft_train.jsonl"), "--eval_data", "", "--tokenizer", str(d / "tok/tokenizer.model"),
                    "--out_dir", str(d / "sft"), "--micro_batch_size", "8", "--max_steps", "2", "--warmup_steps", "1"])
    train_rm.main(["--init_from", str(d / "sft"), "--data", str(d / "pref_train.jsonl"), "--eval_data", "",
                   "--out_dir", str(d / "rm"), "--micro_batch_pairs", "4", "--max_steps", "2"])
    return d


def runs(d: Path) -> dict[str, tuple[str, list[str], list[str], list[str]]]:
    """name -> (script module, common flags, flags of the 1-process run, flags of the sharded run). The global batch
    is the same: 1 process x 2 micro-batches = 2 ranks x 1."""
    sft, rm, gold = str(d / "sft"), str(d / "rm"), ["--gold_eval_every", "2", "--gold_eval_prompts", "4"]
    ev = ["--eval_data", str(d / "rl_eval.jsonl"), "--eval_prompts", "8"]
    one, two = ["--micro_batch_size", "4", "--grad_accum", "2"], ["--micro_batch_size", "4", "--grad_accum", "1", "--fsdp"]
    rl = ["--init_from", sft, "--data", str(d / "rl_train.jsonl"), *ev, "--max_new_tokens", "8", "--warmup_steps", "1",
          "--log_every", "1"]
    ppo = [*rl, "--reward_model", rm, "--prompts_per_step", "8", "--prompts_per_generate", "2", "--micro_batch_size",
           "2", "--num_ppo_epochs", "2", "--num_minibatches", "2", "--missing_eos_penalty", "1", "--kl_coef", "0.2",
           "--whiten_rewards", "--max_steps", "4"]
    dpo = ["--init_from", sft, "--data", str(d / "pref_train.jsonl"), "--pref_eval_data", str(d / "pref_eval.jsonl"),
           *ev, *gold, "--eval_every", "2", "--max_steps", "3", "--warmup_steps", "1", "--lr", "1e-3", "--log_every", "1"]
    return {
        "pretrain": ("train_pretrain", ["--init_from", sft, "--data", str(d / "pretrain.jsonl"), "--max_len", "64",
                                        "--max_steps", "3", "--log_every", "1"], one, [*two, "--gradient_checkpointing"]),
        "rm": ("train_rm", ["--init_from", sft, "--data", str(d / "pref_train.jsonl"), "--eval_data",
                            str(d / "pref_eval.jsonl"), "--eval_every", "2", "--max_steps", "3", "--log_every", "1"],
               ["--micro_batch_pairs", "4", "--grad_accum", "2"],
               ["--micro_batch_pairs", "4", "--grad_accum", "1", "--fsdp"]),
        # KTO's z0 is estimated per micro-batch, so the micro-batches must hold the same examples: no length sort
        "kto": ("train_kto", ["--init_from", sft, "--pairs", str(d / "pref_train.jsonl"), *ev, *gold, "--max_steps",
                              "3", "--log_every", "1", "--no-group_by_length"], one, [*two, "--shard_frozen"]),
        "dpo": ("train_dpo", dpo, ["--micro_batch_pairs", "4", "--grad_accum", "2"],
                ["--micro_batch_pairs", "4", "--grad_accum", "1", "--fsdp", "--shard_frozen"]),
        # plain DDP with the end-of-run and mid-run evaluations (it failed: model.cfg read on the DDP wrapper)
        "dpo_ddp": ("train_dpo", dpo, ["--micro_batch_pairs", "4", "--grad_accum", "2"],
                    ["--micro_batch_pairs", "4", "--grad_accum", "1"]),
        "ppo": ("train_ppo", ppo, [], ["--fsdp", "--shard_frozen", *gold]),
        # 6 prompts: some steps keep an odd number of pairs, so the ranks' shares differ (loop.micro_batches)
        "online_dpo": ("train_online_dpo", [*rl, "--prompts_per_step", "6", "--num_generations", "4",
                                            "--micro_batch_pairs", "2", "--prompts_per_generate", "3", "--reward_funcs",
                                            "gold", "length", "--reward_weights", "1", "0.5", "--max_steps", "4",
                                            "--lr", "1e-3"], [], ["--fsdp", "--shard_frozen", *gold]),
        "grpo": ("train_grpo", [*rl, "--reward_model", rm, "--reward_funcs", "gold", "reward_model", "--prompts_per_step",
                                "4", "--num_generations", "4", "--micro_batch_size", "8", "--prompts_per_generate", "2",
                                "--beta", "0.04", "--num_iterations", "2", "--max_steps", "3"],
                 [], ["--fsdp", "--shard_frozen", "--gradient_checkpointing", *gold]),
    }


def _worker(rank: int, world: int, ports: list[int], jobs: list[tuple[str, list[str]]], out: str):
    import importlib

    import torch.distributed as dist

    from minialign.models.decoder import CausalLM
    from minialign.training import runtime
    torch.set_num_threads(1)
    os.environ.update(WORLD_SIZE=str(world), RANK=str(rank), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MINIALIGN_DIST_TIMEOUT="120")
    # 1. inside runtime.gathered the ranks may run different numbers of forwards (sampling stops at different
    # steps): they communicate nothing there; outside, a sharded forward is a collective
    os.environ["MASTER_PORT"] = str(ports[0])
    dist.init_process_group("gloo")
    from conftest import tiny_config
    torch.manual_seed(0)
    whole = CausalLM(tiny_config(vocab_size=64))
    sharded = CausalLM(tiny_config(vocab_size=64))
    sharded.load_state_dict(whole.state_dict())
    rt = runtime.Runtime(torch.device("cpu"), torch.float32, rank, rank, world)
    runtime.shard_fsdp(sharded, rt)
    x = torch.randint(0, 64, (2, 5))
    with torch.no_grad(), runtime.gathered(sharded):
        outs = [sharded(x) for _ in range(1 + 3 * rank)]
        plain_weight = type(sharded.backbone.embed.weight).__name__  # the gathered tensor, not a DTensor
    dist.barrier()
    result = {"gathered_max_diff": max(float((o - whole(x)).abs().max()) for o in outs), "inside": plain_weight,
              "after": type(sharded.backbone.embed.weight).__name__}
    dist.destroy_process_group()
    if rank == 0:
        Path(out).write_text(json.dumps(result))
    # 2. the scripts, one process group each
    for port, (module, argv) in zip(ports[1:], jobs):
        os.environ["MASTER_PORT"] = str(port)
        importlib.import_module(module).main(argv)


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def params(out: Path) -> dict:
    ckpt = torch.load(out / "ckpt.pt", map_location="cpu", weights_only=True)
    return {**{k: v for k, v in ckpt["model"].items()},
            **{"value." + k: v for k, v in (ckpt.get("value_model") or {}).items()}}


def losses(out: Path) -> list[tuple[int, float]]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in rows if "loss" in r]


def test_every_script_under_fsdp_matches_one_process(d):
    import importlib

    import torch.multiprocessing as mp
    table = runs(d)
    jobs = []
    for name, (module, common, _, sharded) in table.items():
        jobs.append((module, [*common, *sharded, "--out_dir", str(d / f"{name}_fsdp")]))
    ppo_module, ppo_common, _, ppo_sharded = table["ppo"]
    parts = [*ppo_common, *ppo_sharded, "--out_dir", str(d / "ppo_parts")]
    jobs += [(ppo_module, [*parts, "--stop_after_steps", "2"]), (ppo_module, [*parts, "--resume"])]
    mp.spawn(_worker, args=(2, free_ports(len(jobs) + 1), jobs, str(d / "gathered.json")), nprocs=2, join=True)

    gathered = json.loads((d / "gathered.json").read_text())
    assert gathered == {"gathered_max_diff": 0.0, "inside": "Parameter", "after": "DTensor"}, gathered
    for name, (module, common, one, _) in table.items():
        importlib.import_module(module).main([*common, *one, "--out_dir", str(d / f"{name}_one")])
        a, b = params(d / f"{name}_one"), params(d / f"{name}_fsdp")
        assert a.keys() == b.keys() and all(type(v) is torch.Tensor for v in b.values()), name  # full tensors
        for k in a:
            torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=ATOL.get(name, 1e-5), msg=f"{name}: {k}")
        la, lb = losses(d / f"{name}_one"), losses(d / f"{name}_fsdp")
        assert len(la) >= 3 and [s for s, _ in la] == [s for s, _ in lb], name
        assert all(abs(x - y) < 1e-4 for (_, x), (_, y) in zip(la, lb)), (name, la, lb)
        start = torch.load(d / "sft/ckpt.pt", map_location="cpu", weights_only=True)["model"]
        moved = max(float((a[k] - start[k]).abs().max()) for k in a if k in start)
        assert moved > 1e-4, name  # the runs trained: the comparison above could fail
    # the gold points logged mid-run by rank 0 on the gathered weights (sampled/gold_score at step 2)
    for name in ("kto", "dpo", "dpo_ddp", "ppo", "online_dpo", "grpo"):
        rows = [json.loads(line) for line in (d / f"{name}_fsdp/metrics.jsonl").read_text().splitlines()]
        assert any(r["step"] == 2 and "sampled/gold_score" in r for r in rows), name
    # online DPO kept an odd number of pairs at some step: ranks with different shares, the same micro-batch count
    used = [r["pairs/used"] for r in map(json.loads, (d / "online_dpo_fsdp/metrics.jsonl").read_text().splitlines())
            if "pairs/used" in r]
    assert any(n % 2 for n in used), used
    # PPO stopped after 2 iterations and resumed (policy, value model and the optimizer state over both, by name)
    # ends float for float where the uninterrupted sharded run ends
    assert losses(d / "ppo_parts") == losses(d / "ppo_fsdp")
    whole, resumed = params(d / "ppo_fsdp"), params(d / "ppo_parts")
    assert all(torch.equal(whole[k], resumed[k]) for k in whole)


def test_micro_batches_give_every_rank_the_same_count_under_fsdp():
    # 5 pairs over 2 ranks (3 and 2), 2 per micro-batch: DDP cuts 2 + 1 and 2; FSDP cuts each share in ceil(2/2) = 1
    assert loop.micro_batches([0, 2, 4], 2, 2, fsdp=False) == [[0, 2], [4]]
    assert loop.micro_batches([0, 2, 4], 2, 2, fsdp=True) == [[0, 2, 4]]
    assert loop.micro_batches([1, 3], 2, 2, fsdp=True) == [[1, 3]]
    # 9 pairs, 1 per micro-batch: shares 5 and 4 -> 4 micro-batches each, one of them holding 2 on the larger rank
    assert loop.micro_batches(list(range(5)), 1, 4, fsdp=True) == [[0, 1], [2], [3], [4]]
    assert loop.micro_batches(list(range(4)), 1, 4, fsdp=True) == [[0], [1], [2], [3]]
    # nothing is dropped or repeated
    for n, size, fewest in ((7, 3, 6), (12, 5, 12), (1, 4, 1)):
        parts = loop.micro_batches(list(range(n)), size, fewest, fsdp=True)
        assert [i for p in parts for i in p] == list(range(n)) and len(parts) == max(1, -(-fewest // size))
