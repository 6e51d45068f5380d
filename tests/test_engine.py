"""Tests for minialign.engine: the LR schedule, exact gradient accumulation, the data order under
any (world size, accumulation) split, atomic checkpoints, config flags, non-finite handling and the
metrics log on resume."""

import copy
import dataclasses
import json
import math

import pytest
import torch

from conftest import tiny_model
from minialign import engine
from minialign.data import collate_lm
from minialign.losses import token_logps

CPU = torch.device("cpu")


# ------------------------------------------------------------------------------------ LR schedule

LR, WARMUP, TOTAL, FLOOR = 1e-3, 10, 100, 0.1


def lr(step):
    return engine.lr_at(step, LR, WARMUP, TOTAL, FLOOR)


def test_lr_schedule_endpoints():
    assert lr(0) == pytest.approx(LR / WARMUP)  # (0 + 1) / 10 of the peak
    assert lr(4) == pytest.approx(LR * 5 / WARMUP)
    assert lr(WARMUP - 1) == pytest.approx(LR)  # warmup reaches the peak on its last step
    assert lr(WARMUP) == pytest.approx(LR)  # cosine starts at progress 0: cos(0) = 1
    # half-way through the decay: min + 0.5 * (max - min)
    assert lr(WARMUP + (TOTAL - WARMUP) // 2) == pytest.approx(LR * FLOOR + 0.5 * (LR - LR * FLOOR))
    # last decay step: progress 89/90, just above the floor
    last = lr(TOTAL - 1)
    assert last == pytest.approx(LR * FLOOR + 0.5 * (1 + math.cos(math.pi * 89 / 90)) * LR * (1 - FLOOR))
    assert LR * FLOOR < last < LR * FLOOR * 1.01
    assert lr(TOTAL) == lr(TOTAL + 50) == pytest.approx(LR * FLOOR)


def test_lr_schedule_monotone_after_warmup_and_no_warmup():
    values = [lr(s) for s in range(WARMUP, TOTAL + 20)]
    assert all(a >= b for a, b in zip(values, values[1:]))
    assert all(a < b for a, b in zip([lr(s) for s in range(WARMUP)], [lr(s) for s in range(1, WARMUP)]))
    assert engine.lr_at(0, LR, 0, TOTAL, FLOOR) == pytest.approx(LR)


# --------------------------------------------------------------------------- gradient accumulation

@dataclasses.dataclass
class StepConfig:
    max_grad_norm: float = 0.0


def sft_loss(model, batch):
    """Summed next-token NLL over the batch's trained labels (the engine divides by the step count)."""
    logits = model(batch["inputs"])  # (B, T, V), right-padded: no mask needed
    labels = batch["labels"].masked_fill(~batch["label_mask"], -100)
    loss_sum = -token_logps(logits, labels).sum()
    return loss_sum, {"tokens": batch["label_mask"].sum()}


def count_tokens(batch):
    return int(batch["label_mask"].sum())


def make_examples(V=96):
    """8 sequences whose trained-token counts differ a lot (2 ... 24), so micro-batch means are biased."""
    g = torch.Generator().manual_seed(0)
    out = []
    for n_prompt, n_trained in [(3, 2), (2, 24), (5, 3), (2, 20), (4, 2), (6, 18), (2, 5), (3, 2)]:
        ids = torch.randint(1, V, (n_prompt + n_trained,), generator=g).tolist()
        out.append((ids, [False] * n_prompt + [True] * n_trained))
    return out


def params_after(model, batches, grad_accum):
    model = copy.deepcopy(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    rt = engine.Runtime(CPU, torch.float32)
    metrics = engine.train_step(model, optimizer, rt.make_scaler(), batches, sft_loss, count_tokens, rt, StepConfig())
    return torch.cat([p.detach().flatten() for p in model.parameters()]), metrics


def test_accumulation_equals_one_big_batch():
    model = tiny_model(seed=1).double()
    examples = make_examples()
    micro = [collate_lm(examples[i : i + 2], 0) for i in range(0, 8, 2)]  # 4 micro-batches, own padding
    counts = [count_tokens(b) for b in micro]
    assert max(counts) > 3 * min(counts)
    whole = collate_lm(examples, 0)

    start = torch.cat([p.detach().flatten() for p in model.parameters()])
    accum, m_accum = params_after(model, micro, grad_accum=4)
    big, m_big = params_after(model, [whole], grad_accum=1)
    assert (big - start).abs().max() > 1e-4  # the step moved the weights
    torch.testing.assert_close(accum, big, atol=1e-12, rtol=1e-10)
    assert m_accum["loss"] == pytest.approx(m_big["loss"], rel=1e-12)
    assert m_accum["grad_norm"] == pytest.approx(m_big["grad_norm"], rel=1e-10)

    # the bug this guards against: the mean of micro-batch token means weights the tokens of a
    # short micro-batch more, and gives a visibly different update. (train_step divides by the sum of
    # count_fn = 4 micro-batches x 1, so each micro-batch's token mean gets weight 1/4.)
    def micro_batch_mean(model, batch):
        loss_sum, metrics = sft_loss(model, batch)
        return loss_sum / count_tokens(batch), metrics

    naive = copy.deepcopy(model)
    optimizer = torch.optim.SGD(naive.parameters(), lr=0.5)
    rt = engine.Runtime(CPU, torch.float32)
    engine.train_step(naive, optimizer, rt.make_scaler(), micro, micro_batch_mean, lambda b: 1, rt, StepConfig())
    naive_params = torch.cat([p.detach().flatten() for p in naive.parameters()])
    # off by a sizeable fraction of the update itself, not by float error
    assert (naive_params - big).abs().max() > 0.05 * (big - start).abs().max()


def test_nonfinite_gradient_skips_the_update():
    model = tiny_model(seed=2)
    before = [p.detach().clone() for p in model.parameters()]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    rt = engine.Runtime(CPU, torch.float32)
    batch = collate_lm(make_examples()[:2], 0)

    def nan_loss(model, batch):
        loss_sum, metrics = sft_loss(model, batch)
        return loss_sum * float("nan"), metrics

    metrics = engine.train_step(model, optimizer, rt.make_scaler(), [batch], nan_loss, count_tokens, rt, StepConfig())
    assert math.isnan(metrics["grad_norm"])
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters()))
    assert all(p.grad is None for p in model.parameters())  # zeroed for the next step


# ------------------------------------------------------------------------------------- data order

@dataclasses.dataclass
class OrderConfig:
    micro_batch_size: int = 3
    grad_accum: int = 1
    seed: int = 7


def step_indices(n, step, world, accum, seed=7):
    """Every index the optimizer sees at `step`, rank by rank, micro-step by micro-step."""
    cfg = OrderConfig(grad_accum=accum, seed=seed)
    out = []
    for m in range(accum):
        for r in range(world):
            out += engine.micro_batch_indices(n, step, m, cfg, engine.Runtime(CPU, torch.float32, rank=r, world_size=world))
    return out


def test_global_batch_independent_of_world_size_and_accumulation():
    n = 29  # not a multiple of the global batch (12): steps straddle epochs
    for step in range(6):
        splits = [step_indices(n, step, world, accum) for world, accum in [(1, 4), (2, 2), (4, 1)]]
        assert len(splits[0]) == 12
        assert sorted(splits[0]) == sorted(splits[1]) == sorted(splits[2])
        assert splits[0] == splits[1] == splits[2]  # even the order of the stream is the same


def test_epochs_are_different_permutations_and_order_is_deterministic():
    n = 12
    cfg = OrderConfig(micro_batch_size=n)
    rt = engine.Runtime(CPU, torch.float32)
    epoch0 = engine.micro_batch_indices(n, 0, 0, cfg, rt)
    epoch1 = engine.micro_batch_indices(n, 1, 0, cfg, rt)
    assert sorted(epoch0) == sorted(epoch1) == list(range(n))
    assert epoch0 != epoch1
    assert engine.micro_batch_indices(n, 0, 0, cfg, rt) == epoch0  # after epoch 1 evicted the cache
    assert engine.micro_batch_indices(n, 0, 0, OrderConfig(micro_batch_size=n, seed=8), rt) != epoch0
    # ranks of one micro-step get disjoint slices
    a = engine.micro_batch_indices(n, 0, 0, OrderConfig(), engine.Runtime(CPU, torch.float32, rank=0, world_size=2))
    b = engine.micro_batch_indices(n, 0, 0, OrderConfig(), engine.Runtime(CPU, torch.float32, rank=1, world_size=2))
    assert not set(a) & set(b)


# ------------------------------------------------------------------------------------ checkpoints

def test_atomic_save_leaves_no_tmp_and_survives_a_failed_save(tmp_path, monkeypatch):
    path = tmp_path / "ckpt.pt"
    engine.atomic_save({"step": 1, "w": torch.arange(4)}, path)
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"]
    assert torch.load(path)["step"] == 1

    def broken_save(obj, f, *args, **kwargs):
        f.write(b"half a checkpoint")
        raise OSError("No space left on device")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="No space left"):
        engine.atomic_save({"step": 2, "w": torch.zeros(4)}, path)
    monkeypatch.undo()
    ckpt = torch.load(path)
    assert ckpt["step"] == 1 and torch.equal(ckpt["w"], torch.arange(4))
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"]  # the partial temp file is cleaned up


def test_check_writable(tmp_path):
    target = tmp_path / "a" / "b"
    engine.check_writable(target)
    assert target.is_dir() and list(target.iterdir()) == []  # the probe is removed
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(RuntimeError, match="not writable"):
        engine.check_writable(blocker / "out")
    with pytest.raises(RuntimeError, match="MB free"):
        engine.check_writable(target, min_free_mb=10**12)


def test_save_checkpoint_is_self_describing(tmp_path):
    model = tiny_model()
    optimizer = torch.optim.AdamW(model.parameters())
    cfg = engine.TrainConfig(out_dir=str(tmp_path), lr=3e-4)
    engine.save_checkpoint(tmp_path, model=model, optimizer=optimizer, scaler=None, step=17, cfg=cfg, tokenizer_path=None)
    ckpt = engine.load_checkpoint(tmp_path)
    assert ckpt["step"] == 17 and ckpt["model_kind"] == "causal" and ckpt["config"]["lr"] == 3e-4
    assert ckpt["model_config"] == model.cfg.to_dict()
    assert json.loads((tmp_path / "config.json").read_text())["lr"] == 3e-4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.pt", "config.json"]
    with pytest.raises(FileNotFoundError):
        engine.load_checkpoint(tmp_path / "nothing")


# ------------------------------------------------------------------------------------------ config

def test_parse_config_defaults_types_and_bools():
    cfg = engine.parse_config(engine.TrainConfig, [])
    assert cfg == engine.TrainConfig()
    cfg = engine.parse_config(engine.TrainConfig, ["--lr", "3e-4", "--max_steps", "5", "--resume"], warmup_steps=2)
    assert (cfg.lr, cfg.max_steps, cfg.resume, cfg.warmup_steps) == (3e-4, 5, True, 2)
    assert engine.parse_config(engine.TrainConfig, ["--no-resume"], resume=True).resume is False


def test_parse_config_rejects_unknown_flag(capsys):
    with pytest.raises(SystemExit):
        engine.parse_config(engine.TrainConfig, ["--learning_rate", "1e-3"])
    assert "--learning_rate" in capsys.readouterr().err


def test_parse_config_rejects_bad_value_naming_the_flag(capsys):
    with pytest.raises(SystemExit) as e:
        engine.parse_config(engine.TrainConfig, ["--lr", "-1"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "--lr=-1.0" in err and "must be > 0" in err


def test_check_finite_raises_or_counts(tmp_path):
    cfg = engine.TrainConfig(out_dir=str(tmp_path))
    stats = {}
    engine.check_finite(1.0, 2.0, step=3, cfg=cfg, stats=stats)
    assert stats == {}
    with pytest.raises(engine.NonFiniteError, match="at step 7"):
        engine.check_finite(float("nan"), 1.0, step=7, cfg=cfg, stats=stats)
    skip = engine.TrainConfig(out_dir=str(tmp_path), skip_nonfinite=True)
    stats = {}
    engine.check_finite(1.0, float("inf"), step=8, cfg=skip, stats=stats)
    engine.check_finite(float("nan"), float("nan"), step=9, cfg=skip, stats=stats)
    assert stats == {"nonfinite_steps_skipped": 2}


# ----------------------------------------------------------------------------------------- metrics

def test_metrics_log_resume_drops_lines_after_the_checkpoint(tmp_path, capsys):
    rt = engine.Runtime(CPU, torch.float32)
    log = engine.MetricsLog(tmp_path, rt)
    for step in (10, 20, 30, 40):
        log.log(step, {"loss": 1.0 / step, "lr": torch.tensor(0.5)})
    path = tmp_path / "metrics.jsonl"
    assert [json.loads(l)["step"] for l in path.read_text().splitlines()] == [10, 20, 30, 40]
    assert json.loads(path.read_text().splitlines()[0])["lr"] == 0.5  # tensors become numbers

    engine.MetricsLog(tmp_path, engine.Runtime(CPU, torch.float32, rank=1, world_size=2), resume_step=20)
    assert len(path.read_text().splitlines()) == 4  # only rank 0 touches the file

    resumed = engine.MetricsLog(tmp_path, rt, resume_step=20)
    assert [json.loads(l)["step"] for l in path.read_text().splitlines()] == [10, 20]
    resumed.log(30, {"loss": float("nan")})
    rows = [json.loads(l) for l in path.read_text().splitlines()]
    assert [r["step"] for r in rows] == [10, 20, 30] and rows[-1]["loss"] == "nan"

    with open(path, "a") as f:  # killed while writing a line: the partial line is dropped on resume
        f.write('{"step": 40, "loss": 0.0')
    engine.MetricsLog(tmp_path, rt, resume_step=30)
    assert [json.loads(l)["step"] for l in path.read_text().splitlines()] == [10, 20, 30]

    engine.MetricsLog(tmp_path, rt)  # a fresh (not resumed) run starts a new log
    assert not path.exists()
