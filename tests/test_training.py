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

from minialign.algorithms.losses import token_logps
from minialign.data.batching import collate_lm
from minialign.training import checkpoint, config, logger, loop, runtime

CPU = torch.device("cpu")


# ------------------------------------------------------------------------------------ LR schedule

LR, WARMUP, TOTAL, FLOOR = 1e-3, 10, 100, 0.1


def lr(step):
    return loop.lr_at(step, LR, WARMUP, TOTAL, FLOOR)


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
    assert loop.lr_at(0, LR, 0, TOTAL, FLOOR) == pytest.approx(LR)


# --------------------------------------------------------------------------- gradient accumulation

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
    rt = runtime.Runtime(CPU, torch.float32)
    metrics = loop.train_step(model, optimizer, rt.make_scaler(), batches, sft_loss, count_tokens, rt, max_grad_norm=0.0)
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
    rt = runtime.Runtime(CPU, torch.float32)
    loop.train_step(naive, optimizer, rt.make_scaler(), micro, micro_batch_mean, lambda b: 1, rt, max_grad_norm=0.0)
    naive_params = torch.cat([p.detach().flatten() for p in naive.parameters()])
    # off by a sizeable fraction of the update itself, not by float error
    assert (naive_params - big).abs().max() > 0.05 * (big - start).abs().max()


def test_nonfinite_gradient_skips_the_update():
    model = tiny_model(seed=2)
    before = [p.detach().clone() for p in model.parameters()]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    rt = runtime.Runtime(CPU, torch.float32)
    batch = collate_lm(make_examples()[:2], 0)

    def nan_loss(model, batch):
        loss_sum, metrics = sft_loss(model, batch)
        return loss_sum * float("nan"), metrics

    metrics = loop.train_step(model, optimizer, rt.make_scaler(), [batch], nan_loss, count_tokens, rt, max_grad_norm=0.0)
    assert math.isnan(metrics["grad_norm"])
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters()))
    assert all(p.grad is None for p in model.parameters())  # zeroed for the next step


# ------------------------------------------------------------------------------------- data order

@dataclasses.dataclass
class OrderConfig:
    micro_batch: int = 3
    grad_accum: int = 1
    seed: int = 7


def step_indices(n, step, world, accum, seed=7):
    """Every index the optimizer sees at `step`, rank by rank, micro-step by micro-step."""
    cfg = OrderConfig(grad_accum=accum, seed=seed)
    out = []
    for m in range(accum):
        for r in range(world):
            out += loop.micro_batch_indices(n, step, m, cfg, runtime.Runtime(CPU, torch.float32, rank=r, world_size=world))
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
    cfg = OrderConfig(micro_batch=n)
    rt = runtime.Runtime(CPU, torch.float32)
    epoch0 = loop.micro_batch_indices(n, 0, 0, cfg, rt)
    epoch1 = loop.micro_batch_indices(n, 1, 0, cfg, rt)
    assert sorted(epoch0) == sorted(epoch1) == list(range(n))
    assert epoch0 != epoch1
    assert loop.micro_batch_indices(n, 0, 0, cfg, rt) == epoch0  # after epoch 1 evicted the cache
    assert loop.micro_batch_indices(n, 0, 0, OrderConfig(micro_batch=n, seed=8), rt) != epoch0
    # ranks of one micro-step get disjoint slices
    a = loop.micro_batch_indices(n, 0, 0, OrderConfig(), runtime.Runtime(CPU, torch.float32, rank=0, world_size=2))
    b = loop.micro_batch_indices(n, 0, 0, OrderConfig(), runtime.Runtime(CPU, torch.float32, rank=1, world_size=2))
    assert not set(a) & set(b)


# ------------------------------------------------------------------------------------ checkpoints

def test_atomic_save_leaves_no_tmp_and_survives_a_failed_save(tmp_path, monkeypatch):
    path = tmp_path / "ckpt.pt"
    checkpoint.atomic_save({"step": 1, "w": torch.arange(4)}, path)
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"]
    assert torch.load(path)["step"] == 1

    def broken_save(obj, f, *args, **kwargs):
        f.write(b"half a checkpoint")
        raise OSError("No space left on device")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="No space left"):
        checkpoint.atomic_save({"step": 2, "w": torch.zeros(4)}, path)
    monkeypatch.undo()
    ckpt = torch.load(path)
    assert ckpt["step"] == 1 and torch.equal(ckpt["w"], torch.arange(4))
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"]  # the partial temp file is cleaned up


def test_check_writable(tmp_path):
    target = tmp_path / "a" / "b"
    checkpoint.check_writable(target)
    assert target.is_dir() and list(target.iterdir()) == []  # the probe is removed
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(RuntimeError, match="not writable"):
        checkpoint.check_writable(blocker / "out")
    with pytest.raises(RuntimeError, match="MB free"):
        checkpoint.check_writable(target, min_free_mb=10**12)


def test_save_checkpoint_is_self_describing(tmp_path):
    model = tiny_model()
    optimizer = torch.optim.AdamW(model.parameters())
    cfg = config.TrainConfig(out_dir=str(tmp_path), lr=3e-4)
    checkpoint.save(tmp_path, model=model, optimizer=optimizer, scaler=None, step=17, cfg=cfg, tokenizer_path=None)
    ckpt = checkpoint.load(tmp_path)
    assert ckpt["step"] == 17 and ckpt["model_kind"] == "causal" and ckpt["config"]["lr"] == 3e-4
    assert ckpt["model_config"] == model.cfg.to_dict()
    assert json.loads((tmp_path / "config.json").read_text())["lr"] == 3e-4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.pt", "config.json"]
    with pytest.raises(FileNotFoundError):
        checkpoint.load(tmp_path / "nothing")


# ------------------------------------------------------------------------------------------ config

@dataclasses.dataclass
class ScriptConfig(config.OfflineConfig):
    """A script's Config: overrides a default without restating the base check, adds a cross-flag rule."""
    warmup_steps: int = config.knob(2, "linear warmup steps")
    resume: bool = config.knob(True, "resume")
    max_new_tokens: int = config.knob(8, "generation budget", config.at_least(1))

    def problems(self, world_size):
        return [] if self.max_new_tokens < self.max_len else [f"--max_new_tokens={self.max_new_tokens} must be < --max_len"]


def test_parse_config_defaults_types_and_bools():
    cfg = config.parse_config(config.TrainConfig, [])
    assert cfg == config.TrainConfig()
    cfg = config.parse_config(ScriptConfig, ["--lr", "3e-4", "--max_steps", "5"])
    assert (cfg.lr, cfg.max_steps, cfg.resume, cfg.warmup_steps) == (3e-4, 5, True, 2)
    assert config.parse_config(ScriptConfig, ["--no-resume"]).resume is False


def test_overridden_knob_keeps_its_base_check_and_cross_flag_rules_run(capsys):
    with pytest.raises(SystemExit) as e:
        config.parse_config(ScriptConfig, ["--warmup_steps", "-3"])  # ScriptConfig restates no check
    assert e.value.code == 2 and "--warmup_steps=-3 must be >= 0" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        config.parse_config(ScriptConfig, ["--max_new_tokens", "200"])
    assert "--max_new_tokens=200 must be < --max_len" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        config.parse_config(ScriptConfig, ["--grad_accum", "0", "--max_new_tokens", "200"])  # field checks first
    assert "--grad_accum=0 must be >= 1" in capsys.readouterr().err


def test_parse_config_rejects_unknown_flag(capsys):
    with pytest.raises(SystemExit):
        config.parse_config(config.TrainConfig, ["--learning_rate", "1e-3"])
    assert "--learning_rate" in capsys.readouterr().err


def test_parse_config_rejects_bad_value_naming_the_flag(capsys):
    with pytest.raises(SystemExit) as e:
        config.parse_config(config.TrainConfig, ["--lr", "-1"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "--lr=-1.0" in err and "must be > 0" in err


def m(loss, grad_norm):
    return {"loss": loss, "grad_norm": grad_norm}


def test_check_finite_raises_or_counts(tmp_path):
    cfg = config.TrainConfig(out_dir=str(tmp_path))
    stats = {}
    loop.check_finite(m(1.0, 2.0), step=3, cfg=cfg, stats=stats)
    assert stats == {}
    with pytest.raises(loop.NonFiniteError, match="at step 7"):
        loop.check_finite(m(float("nan"), 1.0), step=7, cfg=cfg, stats=stats)
    with pytest.raises(loop.NonFiniteError, match="at step 8"):  # without a GradScaler an inf gradient stops too
        loop.check_finite(m(1.0, float("inf")), step=8, cfg=cfg, stats=stats)
    skip = config.TrainConfig(out_dir=str(tmp_path), skip_nonfinite=True)
    stats = {}
    loop.check_finite(m(1.0, float("inf")), step=8, cfg=skip, stats=stats)
    loop.check_finite(m(float("nan"), float("nan")), step=9, cfg=skip, stats=stats)
    assert stats == {"nonfinite_steps_skipped": 2}


def test_fp16_gradscaler_overflow_is_skipped_and_training_goes_on(tmp_path):
    """An inf gradient under an enabled GradScaler is routine: the scaler skips that update and halves its
    scale; the run must count it and go on (it used to stop with NonFiniteError "Lower --lr"). A non-finite
    LOSS still stops. Driven through train_step + check_finite with a real GradScaler on CPU."""
    model = tiny_model(seed=2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    rt = runtime.Runtime(CPU, torch.float32)
    scaler = torch.amp.GradScaler("cpu", enabled=True, init_scale=65536.0)
    batch = collate_lm(make_examples()[:2], 0)
    cfg = config.TrainConfig(out_dir=str(tmp_path))

    def overflowing_loss(model, batch):  # a finite loss whose scaled gradient overflows
        loss_sum, metrics = sft_loss(model, batch)
        return loss_sum * 1e36, metrics

    before = [p.detach().clone() for p in model.parameters()]
    stats = {}
    metrics = loop.train_step(model, optimizer, scaler, [batch], overflowing_loss, count_tokens, rt, max_grad_norm=1.0)
    assert math.isfinite(metrics["loss"]) and not math.isfinite(metrics["grad_norm"])
    loop.check_finite(metrics, step=0, cfg=cfg, stats=stats, scaler=scaler)  # no raise
    assert stats == {"overflow_steps_skipped": 1}
    assert scaler.get_scale() == 32768.0  # halved
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters()))  # the update was skipped
    metrics = loop.train_step(model, optimizer, scaler, [batch], sft_loss, count_tokens, rt, max_grad_norm=1.0)
    loop.check_finite(metrics, step=1, cfg=cfg, stats=stats, scaler=scaler)
    assert math.isfinite(metrics["grad_norm"]) and not all(torch.equal(a, p) for a, p in zip(before, model.parameters()))
    with pytest.raises(loop.NonFiniteError, match="at step 2"):
        loop.check_finite(m(float("nan"), float("nan")), step=2, cfg=cfg, stats=stats, scaler=scaler)


# ----------------------------------------------------------------------------------------- metrics

def test_metrics_log_resume_drops_lines_after_the_checkpoint(tmp_path, capsys):
    rt = runtime.Runtime(CPU, torch.float32)
    log = logger.MetricsLog(tmp_path, rt)
    for step in (10, 20, 30, 40):
        log.log(step, {"loss": 1.0 / step, "lr": torch.tensor(0.5)})
    path = tmp_path / "metrics.jsonl"
    assert [json.loads(l)["step"] for l in path.read_text().splitlines()] == [10, 20, 30, 40]
    assert json.loads(path.read_text().splitlines()[0])["lr"] == 0.5  # tensors become numbers

    logger.MetricsLog(tmp_path, runtime.Runtime(CPU, torch.float32, rank=1, world_size=2), resume_step=20)
    assert len(path.read_text().splitlines()) == 4  # only rank 0 touches the file

    resumed = logger.MetricsLog(tmp_path, rt, resume_step=20)
    assert [json.loads(l)["step"] for l in path.read_text().splitlines()] == [10, 20]
    resumed.log(30, {"loss": float("nan")})
    rows = [json.loads(l) for l in path.read_text().splitlines()]
    assert [r["step"] for r in rows] == [10, 20, 30] and rows[-1]["loss"] == "nan"

    with open(path, "a") as f:  # killed while writing a line: the partial line is dropped on resume
        f.write('{"step": 40, "loss": 0.0')
    logger.MetricsLog(tmp_path, rt, resume_step=30)
    assert [json.loads(l)["step"] for l in path.read_text().splitlines()] == [10, 20, 30]

    logger.MetricsLog(tmp_path, rt)  # a fresh (not resumed) run starts a new log
    assert not path.exists()


# ------------------------------------------------------------------------------------ MoE under DDP

def _moe_ddp_worker(rank, world_size, init_file, out_file):
    import torch.distributed as dist
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    rt = runtime.Runtime(CPU, torch.float32, rank=rank, world_size=world_size)
    model = tiny_model(seed=0, n_experts=4, n_experts_per_tok=2).train()
    with torch.no_grad():  # a collapsed router: every token's top-2 are experts 0 and 1; experts 2 and 3 sit idle
        for layer in model.backbone.layers:
            layer.mlp.router.weight.zero_()
    ddp = runtime.wrap_ddp(model, rt)
    optimizer = loop.make_optimizer(model, config.TrainConfig(lr=1e-3), rt)
    batch = collate_lm(make_examples()[rank * 2 : rank * 2 + 2], 0)
    metrics = loop.train_step(ddp, optimizer, rt.make_scaler(), [batch], sft_loss, count_tokens, rt, max_grad_norm=1.0)
    metrics = loop.train_step(ddp, optimizer, rt.make_scaler(), [batch], sft_loss, count_tokens, rt, max_grad_norm=1.0)
    if rank == 0:
        router = model.backbone.layers[0].mlp.router.weight
        json.dump({"loss": metrics["loss"], "router_moved": float(router.abs().sum())}, open(out_file, "w"))
    dist.barrier()
    dist.destroy_process_group()


def test_moe_with_an_idle_expert_trains_under_two_gloo_ranks(tmp_path):
    """An expert that gets no token of a micro-batch has no gradient on that rank; DDP without
    find_unused_parameters then fails with "Expected to have finished reduction in the prior iteration"
    at the next step. runtime.wrap_ddp turns it on for MoE models; the balance term (added by train_step)
    moves the collapsed router."""
    import torch.multiprocessing as mp
    out = tmp_path / "out.json"
    mp.spawn(_moe_ddp_worker, args=(2, str(tmp_path / "init"), str(out)), nprocs=2, join=True)
    res = json.loads(out.read_text())
    assert math.isfinite(res["loss"])
    assert res["router_moved"] > 0  # the router started at exactly 0


def test_moe_balance_term_is_added_for_any_module_holding_moe_backbones():
    """loop.moe_balance_loss finds every MoE backbone inside the trained module (a policy, or PPO's
    policy + value pair), so no script can forget it; it is 0 for dense models."""
    dense = tiny_model(seed=0)
    assert loop.moe_balance_loss(dense) == 0
    moe = tiny_model(seed=0, n_experts=4, n_experts_per_tok=2)
    pair = torch.nn.ModuleDict({"policy": moe, "value": tiny_model(seed=1, n_experts=4, n_experts_per_tok=1)})
    batch = collate_lm(make_examples()[:2], 0)
    pair["policy"](batch["inputs"]), pair["value"](batch["inputs"])
    want = sum(b.cfg.moe_aux_coef * b.backbone.moe_aux_loss() for b in (pair["policy"], pair["value"]))
    assert float(want.detach()) > 0
    assert torch.allclose(loop.moe_balance_loss(pair), want)


def test_each_rank_restores_its_own_rng_state(tmp_path):
    """checkpoint.save gathers every rank's RNG state; resume gives rank r its own (it used to give every
    rank rank 0's CUDA state). Simulated with one process: states saved as two ranks' list."""
    torch.manual_seed(0)
    states = [checkpoint.rng_state()]
    torch.manual_seed(1)
    states.append(checkpoint.rng_state())
    model = tiny_model(seed=0)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    cfg = config.TrainConfig(out_dir=str(tmp_path), resume=True)
    checkpoint.save(tmp_path, model=model, optimizer=optimizer, scaler=None, step=5, cfg=cfg, tokenizer_path=None)
    ck = checkpoint.load(tmp_path)
    ck["rng"] = states
    torch.save(ck, tmp_path / "ckpt.pt")
    draws = []
    for rank in (0, 1):
        checkpoint.resume(cfg, model, optimizer, torch.amp.GradScaler("cpu", enabled=False),
                          runtime.Runtime(CPU, torch.float32, rank=rank, world_size=2))
        draws.append(torch.rand(3))
    torch.manual_seed(0)
    assert torch.equal(draws[0], torch.rand(3))
    torch.manual_seed(1)
    assert torch.equal(draws[1], torch.rand(3))


def test_tensorboard_writes_the_same_scalars_as_metrics_jsonl(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    log = logger.MetricsLog(tmp_path, runtime.Runtime(CPU, torch.float32), tensorboard=True)
    log.log(10, {"loss": 1.5, "rewards/margins": 0.25, "note": "text is not a scalar"})
    log.log(20, {"loss": 1.25})
    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("loss")] == [(10, 1.5), (20, 1.25)]
    assert [e.value for e in events.Scalars("rewards/margins")] == [0.25]
    assert "note" not in events.Tags()["scalars"]
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["loss"] for r in rows] == [1.5, 1.25]  # metrics.jsonl stays the record
