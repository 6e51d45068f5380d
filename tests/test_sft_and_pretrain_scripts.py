"""Run train_pretrain.py and train_sft.py for a few steps in subprocesses: chaining, exact resume, torchrun DDP equivalence.

Each run uses a small slice of the committed default data and the 0.9M "cpu" preset; the whole file
takes well under a minute on 2 cores.
"""

import json
import sys
from pathlib import Path

import pytest
import torch
from conftest import ROOT, run


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A tokenizer trained on the default data and 256-line slices of the SFT and pretraining files."""
    d = tmp_path_factory.mktemp("scripts")
    for name in ("sft_train.jsonl", "pretrain.jsonl"):
        lines = (ROOT / "data" / name).read_text(encoding="utf-8").splitlines()[:256]
        (d / name).write_text("\n".join(lines) + "\n", encoding="utf-8")
    run([sys.executable, "-m", "minialign.data.tokenizer", "--data", str(ROOT / "data/sft_train.jsonl"), str(ROOT / "data/pretrain.jsonl"),
         "--vocab_size", "512", "--out", str(d / "tok")])
    return d


def sft_args(workdir, out, *extra):
    return [sys.executable, str(ROOT / "train_sft.py"), "--data", str(workdir / "sft_train.jsonl"), "--eval_data", "",
            "--tokenizer", str(workdir / "tok/tokenizer.model"), "--out_dir", str(out), "--micro_batch_size", "8",
            "--max_steps", "6", "--warmup_steps", "2", "--log_every", "1", "--save_every", "100", *extra]


def losses(out):
    rows = [json.loads(l) for l in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in rows if "loss" in r]


def params(out):
    return torch.load(Path(out) / "ckpt.pt", map_location="cpu", weights_only=False)["model"]


def test_pretrain_then_sft_chain(workdir):
    """train_pretrain.py writes a checkpoint that train_sft.py --init_from loads (weights and tokenizer)."""
    pre = workdir / "pre"
    run([sys.executable, str(ROOT / "train_pretrain.py"), "--data", str(workdir / "pretrain.jsonl"),
         "--tokenizer", str(workdir / "tok/tokenizer.model"), "--out_dir", str(pre), "--micro_batch_size", "8",
         "--max_steps", "4", "--log_every", "1"])
    assert (pre / "tokenizer.model").exists() and (pre / "config.json").exists()
    first = losses(pre)
    assert [s for s, _ in first] == [1, 2, 3, 4]
    sft = workdir / "sft_from_pre"
    run(sft_args(workdir, sft, "--init_from", str(pre), "--max_steps", "2"))
    ckpt = torch.load(sft / "ckpt.pt", map_location="cpu", weights_only=False)
    assert ckpt["finished"] and ckpt["step"] == 2 and ckpt["config"]["init_from"] == str(pre)
    # SFT started from the pretrained weights: after 2 small steps they are still close to them, not to a random init
    pre_w, sft_w = params(pre)["backbone.embed.weight"], ckpt["model"]["backbone.embed.weight"]
    assert (sft_w - pre_w).abs().max() < 0.05
    assert json.loads((sft / "config.json").read_text())["max_steps"] == 2


def test_resume_continues_the_same_loss_sequence(workdir):
    """Stop after 3 of 6 steps, --resume: the losses of steps 1..6 and the final weights equal an uninterrupted run."""
    full, parts = workdir / "full", workdir / "parts"
    run(sft_args(workdir, full))
    run(sft_args(workdir, parts, "--stop_after_steps", "3"))
    ckpt = torch.load(parts / "ckpt.pt", map_location="cpu", weights_only=False)
    assert ckpt["step"] == 3 and not ckpt["finished"]
    run(sft_args(workdir, parts, "--resume"))
    assert [s for s, _ in losses(full)] == [1, 2, 3, 4, 5, 6]
    assert losses(parts) == losses(full)  # exact, float for float
    for k, v in params(full).items():
        assert torch.equal(v, params(parts)[k]), k


def test_torchrun_two_processes_match_one(workdir):
    """2 gloo ranks x 4 sequences equal 1 process x (2 micro-batches of 4): same global batch, same update."""
    one, two = workdir / "one_proc", workdir / "two_proc"
    run(sft_args(workdir, one, "--micro_batch_size", "4", "--grad_accum", "2", "--max_steps", "3"))
    run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         *sft_args(workdir, two, "--micro_batch_size", "4", "--grad_accum", "1", "--max_steps", "3")[1:]])
    a, b = params(one), params(two)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5, msg=k)
    # the logged global losses agree too (rank 0 logs the all-reduced mean)
    for (s1, l1), (s2, l2) in zip(losses(one), losses(two)):
        assert s1 == s2 and abs(l1 - l2) < 1e-4
    # a rank training alone on its half of the batch (what an unsynced DDP step amounts to) ends elsewhere,
    # so the comparison above can fail
    half = workdir / "half_batch"
    run(sft_args(workdir, half, "--micro_batch_size", "4", "--grad_accum", "1", "--max_steps", "3"))
    assert max((params(half)[k] - a[k]).abs().max() for k in a) > 1e-3


def test_bad_flag_is_refused(workdir):
    proc = run(sft_args(workdir, workdir / "bad", "--lr", "-1"), check=False, timeout=60)
    assert proc.returncode != 0 and "--lr=-1.0 must be > 0" in proc.stderr
    proc = run(sft_args(workdir, workdir / "bad", "--no_such_flag", "1"), check=False, timeout=60)
    assert proc.returncode != 0 and "unrecognized arguments: --no_such_flag" in proc.stderr


def test_gradient_checkpointing_under_torchrun_matches_one_plain_process(workdir):
    """--gradient_checkpointing with DDP (2 gloo ranks x 4 sequences) ends at the weights of 1 process without it
    (2 micro-batches of 4): recomputing the blocks changes no gradient (same tolerance as the DDP test above)."""
    one, two = workdir / "one_plain", workdir / "two_ckpt"
    run(sft_args(workdir, one, "--micro_batch_size", "4", "--grad_accum", "2", "--max_steps", "3"))
    run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         *sft_args(workdir, two, "--micro_batch_size", "4", "--grad_accum", "1", "--max_steps", "3",
                   "--gradient_checkpointing")[1:]])
    a, b = params(one), params(two)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5, msg=k)
    for (s1, l1), (s2, l2) in zip(losses(one), losses(two)):
        assert s1 == s2 and abs(l1 - l2) < 1e-4


def torchrun2(*args):
    return run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *args[1:]])


def test_fsdp_two_ranks_match_one_process_and_resume_exactly(workdir):
    """--fsdp (FSDP2 fully_shard over 2 gloo ranks x 4 sequences) ends at the weights of 1 process x (2 micro-batches
    of 4), the same tolerance as DDP (rtol 1e-4, atol 1e-5: the same gradient summed in a different order; FSDP and
    DDP agree with each other to ~1e-10), logged losses within 1e-4; the checkpoint holds full tensors (it loads
    unsharded: load_model, --init_from), and a sharded run stopped after 2 steps and resumed ends float for float
    where the uninterrupted sharded run does; it exports to a transformers folder."""
    one, two, parts = workdir / "one_for_fsdp", workdir / "fsdp_two", workdir / "fsdp_parts"
    run(sft_args(workdir, one, "--micro_batch_size", "4", "--grad_accum", "2", "--max_steps", "4"))
    fsdp = ("--micro_batch_size", "4", "--grad_accum", "1", "--max_steps", "4", "--fsdp")
    torchrun2(*sft_args(workdir, two, *fsdp))
    a, b = params(one), params(two)
    assert a.keys() == b.keys() and all(type(v) is torch.Tensor for v in b.values())  # full tensors, no DTensor
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-5, msg=k)
    for (s1, l1), (s2, l2) in zip(losses(one), losses(two)):
        assert s1 == s2 and abs(l1 - l2) < 1e-4
    norms = [[r["grad_norm"] for r in map(json.loads, (Path(o) / "metrics.jsonl").read_text().splitlines())
              if "grad_norm" in r] for o in (one, two)]
    assert len(norms[0]) == 4 and all(abs(x - y) < 1e-4 for x, y in zip(*norms))  # the norm over both ranks' shards
    torchrun2(*sft_args(workdir, parts, *fsdp, "--stop_after_steps", "2"))
    torchrun2(*sft_args(workdir, parts, *fsdp, "--resume"))
    assert losses(parts) == losses(two)
    for k, v in params(two).items():
        assert torch.equal(v, params(parts)[k]), k
    from minialign.training.checkpoint import load_model
    assert load_model(str(two)).num_params() == sum(v.numel() for v in b.values())
    run([sys.executable, "-m", "minialign.training.hf_export", "--ckpt", str(two), "--out", str(workdir / "fsdp_hf")])
    assert (workdir / "fsdp_hf" / "model.safetensors").exists()
    proc = run(sft_args(workdir, parts, "--micro_batch_size", "4", "--grad_accum", "2", "--max_steps", "5", "--resume"),
               check=False, timeout=60)
    assert proc.returncode != 0 and "--fsdp" in proc.stderr  # a sharded run's optimizer state resumes sharded


def test_fsdp_refuses_what_it_does_not_support(workdir):
    proc = run(sft_args(workdir, workdir / "bad", "--fsdp"), check=False, timeout=60)
    assert proc.returncode == 2 and "--fsdp needs torchrun" in proc.stderr
