"""GRPO: rollouts, the update's invariants, convergence on a tiny problem, and
train_grpo.py end to end (checkpoint, TRL metric names, exact resume, 2-process torchrun = 1 process).

The in-process tests drive `train_grpo.grpo_batches` and `train_grpo.grpo_update`, the functions the script's
loop calls every step, on a tiny model over an 8-token vocabulary; the script tests start from a 2-step SFT
checkpoint made in a fixture.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import DigitTok, answer_seven, tiny_config

from minialign.algorithms import packing
from minialign.algorithms.reward_funcs import RewardSource
from minialign.algorithms.rollout import Rollout, micro_batch_rows, packed_batch, rollout_forward, sample_rollout
from minialign.data.tokenizer import Tokenizer
from minialign.models.decoder import CausalLM, MoE
from minialign.training import checkpoint, config, loop, runtime

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import train_grpo  # noqa: E402
import train_sft  # noqa: E402

RT = runtime.Runtime(torch.device("cpu"), torch.float32)


# ----------------------------------------------------------------------- a tiny problem, in process

PROMPTS = [{"prompt_ids": [2, 4 + i % 3, 5], "prompt_text": f"q{i}"} for i in range(8)]


def tiny_setup(seed=0, **overrides):
    torch.manual_seed(seed)
    model = CausalLM(tiny_config(8, **overrides.pop("model", {})))
    cfg = train_grpo.Config(**{"init_from": "tiny", "prompts_per_step": 8, "num_generations": 8, "max_new_tokens": 4,
                               "lr": 1e-2, "micro_batch_size": 64, **overrides})
    optimizer = loop.make_optimizer(model, cfg, RT)
    return model, cfg, optimizer, RT.make_scaler()


def step(model, cfg, optimizer, scaler, reward_fn, i=0, ref=None, rt=RT):
    """One GRPO step as train_grpo.main's loop does it: sample, reward and pack, update."""
    with rt.autocast():
        ro = sample_rollout(model, DigitTok(), PROMPTS, cfg.num_generations, cfg.max_new_tokens, cfg.temperature,
                            cfg.seed, i, 0)
    sources = [RewardSource("r", reward_fn, 1.0)]
    batches, g = train_grpo.grpo_batches(ro, sources, None, ref, rt, cfg)
    return {**train_grpo.grpo_update(model, optimizer, scaler, batches, i, rt, cfg, {}),
            **train_grpo.rollout_metrics(g, sources, cfg.num_generations)}


def plain_logps(model, ro, temperature=1.0):
    """The naive reference layout: one row [x y_i] per response (packing with G = 1, the prompt repeated)."""
    rows = list(range(len(ro.rows)))
    ones = Rollout(**{**ro.__dict__, "group_size": 1})
    return packing.response_logps(model, packed_batch(ones, rows), temperature)


def test_grpo_converges_to_the_known_optimal_answer():
    """Reward 1 only for the answer "7" (a 1-in-64 chance at init): GRPO finds it and makes it greedy.
    The stated margin: the mean reward of steps 16-20 is at least 0.3 above step 1's, and the last 5 of 40 > 0.9."""
    model, cfg, optimizer, scaler = tiny_setup()
    history = [step(model, cfg, optimizer, scaler, answer_seven, i)["reward"] for i in range(40)]
    assert history[0] < 0.1  # it really starts from (almost) never answering "7"
    assert sum(history[15:20]) / 5 > history[0] + 0.3, history  # a real improvement within 20 steps
    assert sum(history[-5:]) / 5 > 0.9, history
    prompt = torch.tensor([PROMPTS[0]["prompt_ids"]])
    from minialign.algorithms.generation import generate
    g = generate(model, prompt, torch.ones_like(prompt, dtype=torch.bool), 4, eos_id=3, pad_id=0, temperature=0)
    assert g.response_ids[0].tolist() == [7, 3]


def test_equal_rewards_give_zero_advantage_and_no_update():
    """Every group all-equal -> zero advantages: the loss gradient is exactly 0 and the weights stay."""
    model, cfg, optimizer, scaler = tiny_setup()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    m = step(model, cfg, optimizer, scaler, lambda p, c, **f: [1.0] * len(c))
    assert m["frac_reward_zero_std"] == 1.0 and m["update_skipped"] == 1.0
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    # the loss itself has a zero gradient with zero advantages (beta = 0), so skipping changes nothing but the cost
    ro = sample_rollout(model, DigitTok(), PROMPTS, 8, 4, 1.0, 0, 0, 0)
    batch = packed_batch(ro, list(range(64)), loss_mask=ro.response_mask, old_logps=ro.logps, advantages=torch.zeros(64),
                         sampler_logps=ro.logps)
    loss, _, _ = train_grpo.grpo_loss_sum(model, batch, cfg)
    loss.backward()
    assert all(p.grad is None or not p.grad.any() for p in model.parameters())
    # control: rewards that differ within groups do move the weights
    m = step(model, cfg, optimizer, scaler, lambda p, c, **f: [float(len(x)) for x in c])
    assert m["update_skipped"] == 0.0 and m["frac_reward_zero_std"] < 1.0
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("num_iterations", [1, 2])
def test_first_iteration_ratio_is_one(num_iterations):
    """The sampler's log-probs (KV cache, temperature 0.7) equal the packed training forward at the same
    temperature to rounding; the ratio of the first update is exactly 1 (old_logps from the training forward)."""
    model, cfg, optimizer, scaler = tiny_setup(temperature=0.7, num_iterations=num_iterations)
    ro = sample_rollout(model, DigitTok(), PROMPTS, 8, 4, 0.7, 0, 0, 0)
    with torch.no_grad():
        same_t = plain_logps(model, ro, 0.7)
        other_t = plain_logps(model, ro, 1.0)
    assert (same_t - ro.logps).abs().max() < 1e-5
    assert (other_t - ro.logps).abs().max() > 1e-2  # a temperature mismatch would show
    m = step(model, cfg, optimizer, scaler, lambda p, c, **f: [float(len(x)) for x in c])
    assert m["update_skipped"] == 0.0 and m["ratio/first_iteration_max_abs_dev"] == 0.0
    assert 0 < m["sampler/logp_max_abs_diff"] < 1e-5  # the sampler's log-probs: rounding apart, and only logged


@pytest.mark.parametrize("num_iterations", [1, 2])
def test_first_iteration_ratio_is_exactly_one_under_bf16_autocast(num_iterations):
    """Issue 13b. Under bf16 autocast the KV-cache sampler's log-probs differ from the training forward's by
    far more than fp32 rounding; old_logps come from the training forward, so the first ratio is exactly 1.
    (Before: old_logps were the sampler's, so the first update's max |ratio - 1| was ~2e-3 here.)"""
    bf16 = runtime.Runtime(torch.device("cpu"), torch.bfloat16)
    model, cfg, optimizer, scaler = tiny_setup(num_iterations=num_iterations)
    m = step(model, cfg, optimizer, scaler, lambda p, c, **f: [float(len(x)) for x in c], rt=bf16)
    assert m["update_skipped"] == 0.0
    assert m["sampler/logp_max_abs_diff"] > 1e-3  # the sampler really disagrees under autocast
    assert m["ratio/first_iteration_max_abs_dev"] < 1e-6


def test_moe_balance_loss_reaches_the_router_in_a_grpo_step():
    """Issue 13c. A GRPO step on an MoE policy trains the router with the load-balancing term too
    (loop.train_step adds it): with plain SGD (no clipping) the router's update differs between
    moe_aux_coef 0 and 1, and is the same for the same coefficient (the rollout is seeded).
    (Before: the RL scripts' train_step had no balance term, so the two updates were equal.)"""
    def router_update(coef):
        model, cfg, _, scaler = tiny_setup(max_grad_norm=0.0, model={"n_experts": 4, "n_experts_per_tok": 2})
        model.cfg.moe_aux_coef = coef
        routers = [m.router.weight for m in model.modules() if isinstance(m, MoE)]
        before = [w.detach().clone() for w in routers]
        m = step(model, cfg, torch.optim.SGD(model.parameters(), lr=1.0), scaler, lambda p, c, **f: [float(len(x)) for x in c])
        assert m["update_skipped"] == 0.0
        return torch.cat([(w.detach() - b).flatten() for w, b in zip(routers, before)])

    off, on = router_update(0.0), router_update(1.0)
    assert off.abs().max() > 0  # the task loss alone also trains the router (p_e scales the expert output)
    torch.testing.assert_close(router_update(0.0), off, atol=0, rtol=0)
    assert (on - off).abs().max() > 1e-4


def test_mask_truncated_completions_removes_truncated_rows():
    model, cfg, optimizer, scaler = tiny_setup()
    ro = sample_rollout(model, DigitTok(), PROMPTS, 8, 3, 1.0, 0, 0, 0)
    assert ro.finished.any() and (~ro.finished).any()  # a random 8-token model: some stop within 3 tokens, some not
    kept = train_grpo.completion_mask(ro.response_mask, ro.finished, mask_truncated=True)
    assert not kept[~ro.finished].any()  # truncated rows count for nothing
    assert torch.equal(kept[ro.finished], ro.response_mask[ro.finished])  # finished rows keep every token
    assert torch.equal(train_grpo.completion_mask(ro.response_mask, ro.finished, mask_truncated=False), ro.response_mask)
    # and the loss's unit count drops them: grpo counts sequences with a counted token
    assert int(train_grpo.count_units({"loss_mask": kept}, "grpo")) == int(ro.finished.sum())
    assert int(train_grpo.count_units({"loss_mask": kept}, "dapo")) == int(ro.response_mask[ro.finished].sum())


@pytest.mark.parametrize("loss_type", ["grpo", "dapo", "dr_grpo"])
def test_micro_batch_sums_equal_one_big_batch(loss_type):
    """grpo_loss_sum over 3 packed micro-batches, divided by the step's count as train_step does, equals
    grpo_loss on the whole batch (plain rows) with its own default normalization (the exact-normalization contract)."""
    from minialign.algorithms.losses import grpo_loss
    model, cfg, _, _ = tiny_setup(loss_type=loss_type, beta=0.1, micro_batch_size=24)
    ro = sample_rollout(model, DigitTok(), PROMPTS, 8, 4, 1.0, 0, 0, 0)
    torch.manual_seed(1)
    mask = train_grpo.completion_mask(ro.response_mask, ro.finished, mask_truncated=True)
    t = {"loss_mask": mask, "old_logps": ro.logps + 0.1 * torch.randn_like(ro.logps), "advantages": torch.randn(64),
         "ref_logps": ro.logps + 0.1 * torch.randn_like(ro.logps), "sampler_logps": ro.logps}
    batches = [packed_batch(ro, rows, **t) for rows in micro_batch_rows(ro, 24, by_length=True)]
    assert len(batches) == 3 and len({b["response_ids"].shape[1] for b in batches}) >= 1
    with torch.no_grad():
        count = sum(float(train_grpo.count_units(b, loss_type)) for b in batches)
        split = sum(train_grpo.grpo_loss_sum(model, b, cfg)[0] for b in batches) / count
        logps = plain_logps(model, ro)
        whole, _ = grpo_loss(logps, t["old_logps"], t["ref_logps"], t["advantages"], mask, beta=0.1, loss_type=loss_type,
                             max_new_tokens=4)
    torch.testing.assert_close(split, whole, rtol=1e-5, atol=1e-6)


def test_reward_model_scores_each_unpadded_sequence_at_its_last_token():
    """Scoring a rollout in packed micro-batches gives each response the score of its own unpadded prompt + response."""
    from minialign.models.decoder import ScalarModel
    model, _, _, _ = tiny_setup()
    torch.manual_seed(3)
    rm = ScalarModel(tiny_config(8)).eval()
    prompts = [{"prompt_ids": [2, 4, 5], "prompt_text": "a"}, {"prompt_ids": [2, 6, 6, 6, 5], "prompt_text": "b"}]
    ro = sample_rollout(model, DigitTok(), prompts, 4, 5, 1.0, 0, 0, 0)
    assert ro.lengths.min() < ro.lengths.max()  # responses of different lengths in a group
    batched = rollout_forward(lambda b: packing.response_scores(rm, b), ro, micro_batch_rows(ro, 4))
    with torch.no_grad():
        alone = [rm(torch.tensor([r["prompt_ids"] + ro.response_ids[i][ro.response_mask[i]].tolist()]))[0, -1]
                 for i, r in enumerate(ro.rows)]
    torch.testing.assert_close(batched, torch.stack(alone), rtol=1e-5, atol=1e-5)


# ----------------------------------------------------- shared-prompt training forward, prefill-once sampling

def test_micro_batches_are_whole_groups_sorted_by_packed_length():
    model, _, _, _ = tiny_setup()
    ro = sample_rollout(model, DigitTok(), PROMPTS[:4], 4, 4, 1.0, 0, 0, 0)
    cut = micro_batch_rows(ro, 9, by_length=True)  # 9 // 4 = 2 groups per micro-batch
    assert [len(rows) for rows in cut] == [8, 8] and sorted(r for rows in cut for r in rows) == list(range(16))
    packed = [3 + sum(int(ro.lengths[r]) for r in range(g * 4, g * 4 + 4)) for g in range(4)]
    assert [packed[rows[0] // 4] for rows in cut for rows in [rows[:4], rows[4:]]] == sorted(packed)
    assert micro_batch_rows(ro, 1) == [list(range(g * 4, g * 4 + 4)) for g in range(4)]  # at least one group
    with pytest.raises(ValueError, match="whole groups"):
        micro_batch_rows(ro, 8, rows=[1, 2, 3, 4])


def test_packed_groups_and_gradients_equal_one_row_per_response():
    """The packed layout computes every response token's log-prob (and gradient) of the plain layout (float64)."""
    torch.manual_seed(0)
    model = CausalLM(tiny_config(8)).double()
    prompts = [{"prompt_ids": [2, 4, 5], "prompt_text": "a"}, {"prompt_ids": [2, 6, 6, 6, 5], "prompt_text": "b"},
               {"prompt_ids": [1], "prompt_text": "c"}]
    ro = sample_rollout(model, DigitTok(), prompts, 3, 5, 1.0, 0, 0, 0)
    assert ro.lengths.min() < ro.lengths.max() == 5
    plain = plain_logps(model, ro, 0.7)
    batch = packed_batch(ro, list(range(9)))
    assert batch["input_ids"].shape[0] == 3  # one row per prompt
    packed = packing.response_logps(model, batch, 0.7)
    torch.testing.assert_close(packed, plain[:, : packed.shape[1]], atol=1e-10, rtol=0)
    weights = torch.randn(packed.shape, dtype=packed.dtype)
    params = list(model.parameters())
    for g_plain, g_packed in zip(torch.autograd.grad((plain[:, : packed.shape[1]] * weights).sum(), params),
                                 torch.autograd.grad((packed * weights).sum(), params)):
        torch.testing.assert_close(g_packed, g_plain, atol=1e-9, rtol=1e-4)


def test_prefill_once_samples_what_repeated_prompts_sample():
    """generate(num_samples=G) copies each prompt's KV cache G times: same tokens and log-probs as the
    prompts repeated G times (float64 so that no rounding difference can flip a draw)."""
    from minialign.algorithms.generation import generate
    from minialign.data.batching import collate_prompts
    torch.manual_seed(0)
    model = CausalLM(tiny_config(8)).double().eval()
    ids, mask = collate_prompts([[2, 4, 5], [2, 6, 6, 6, 5]], pad_id=0)
    rep_ids, rep_mask = ids.repeat_interleave(4, 0), mask.repeat_interleave(4, 0)
    once = generate(model, ids, mask, 6, 3, 0, generator=torch.Generator().manual_seed(5), num_samples=4)
    repeated = generate(model, rep_ids, rep_mask, 6, 3, 0, generator=torch.Generator().manual_seed(5))
    assert once.response_ids.shape[0] == 8 and len(set(map(tuple, once.response_ids.tolist()))) > 2  # real samples
    assert torch.equal(once.response_ids, repeated.response_ids) and torch.equal(once.response_mask, repeated.response_mask)
    torch.testing.assert_close(once.logps, repeated.logps, atol=1e-12, rtol=0)


def test_packed_update_equals_the_plain_rows_update():
    """One GRPO step with β > 0 (so the reference log-probs go through the layout too) equals the same step
    computed on the naive layout (one row per response: packing with G = 1, prompts repeated): same weights.
    (float64: Adam's first step is ≈ lr·sign(g), so float32 rounding in a near-zero gradient shows.)"""
    results = []
    for naive in (True, False):
        model, cfg, optimizer, scaler = tiny_setup(beta=0.1, micro_batch_size=16)
        model.double()  # in place: the optimizer keeps the same parameters
        torch.manual_seed(1)
        ref = CausalLM(tiny_config(8)).double().eval()
        with torch.no_grad():
            ro = sample_rollout(model, DigitTok(), PROMPTS, 8, 4, 1.0, 0, 0, 0)
        sources = [RewardSource("r", lambda prompts, completions, **kw: [float(len(c)) for c in completions], 1.0)]
        batches, _ = train_grpo.grpo_batches(ro, sources, None, ref, RT, cfg)
        if naive:  # the same rows and tensors, packed one response per row
            ones = Rollout(**{**ro.__dict__, "group_size": 1})
            keep = ("loss_mask", "advantages", "sampler_logps", "ref_logps")
            batches = [{**packed_batch(ones, b_rows), **{k: b[k] for k in keep}}
                       for b, b_rows in zip(batches, micro_batch_rows(ro, 16, by_length=True))]
        m = train_grpo.grpo_update(model, optimizer, scaler, batches, 0, RT, cfg, {})
        assert m["update_skipped"] == 0.0
        results.append((m, [p.detach().clone() for p in model.parameters()]))
    (m_rows, p_rows), (m_packed, p_packed) = results
    for a, b in zip(p_rows, p_packed):
        torch.testing.assert_close(a, b, atol=1e-9, rtol=0)
    assert m_rows["kl"] == pytest.approx(m_packed["kl"], abs=1e-9) and m_rows["loss"] == pytest.approx(m_packed["loss"], abs=1e-9)


# --------------------------------------------------------------------------------- the script

def run(args, timeout=240):
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    proc = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(map(str, args))} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


@pytest.fixture(scope="module")
def sft(tmp_path_factory):
    """A tokenizer on the default data and a 2-step SFT checkpoint (made in process), plus prompt slices."""
    d = tmp_path_factory.mktemp("grpo")
    lines = (ROOT / "data/sft_train.jsonl").read_text(encoding="utf-8").splitlines()[:64]
    (d / "sft.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    for name, n in (("rl_train.jsonl", 64), ("rl_eval.jsonl", 8)):
        (d / name).write_text("\n".join((ROOT / "data" / name).read_text(encoding="utf-8").splitlines()[:n]) + "\n", encoding="utf-8")
    run([sys.executable, "-m", "minialign.data.tokenizer", "--data", str(ROOT / "data/sft_train.jsonl"), str(ROOT / "data/pretrain.jsonl"),
         "--vocab_size", "512", "--out", str(d / "tok")])
    train_sft.main(["--data", str(d / "sft.jsonl"), "--eval_data", "", "--tokenizer", str(d / "tok/tokenizer.model"),
                    "--out_dir", str(d / "sft"), "--micro_batch_size", "8", "--max_steps", "2", "--warmup_steps", "1"])
    return d


def grpo_args(d, out, *extra):
    # rewards: gold (almost always 0 for a 2-step SFT model) + a length penalty, so groups differ and updates happen
    return ["--init_from", str(d / "sft"), "--data", str(d / "rl_train.jsonl"), "--eval_data", "", "--out_dir", str(out),
            "--prompts_per_step", "4", "--num_generations", "4", "--max_new_tokens", "8", "--micro_batch_size", "8",
            "--prompts_per_generate", "2", "--reward_funcs", "gold", "length", "--reward_weights", "1", "0.5",
            "--beta", "0.04", "--num_iterations", "2", "--max_steps", "4", "--warmup_steps", "1", "--log_every", "1", *extra]


def metric_rows(out):
    return [json.loads(l) for l in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def params(out):
    return torch.load(Path(out) / "ckpt.pt", map_location="cpu", weights_only=False)["model"]


TRL_NAMES = ["loss", "grad_norm", "learning_rate", "reward", "reward_std", "rewards/gold/mean", "rewards/gold/std",
             "rewards/length/mean", "rewards/length/std", "frac_reward_zero_std", "clip_ratio/low_mean", "clip_ratio/high_mean",
             "clip_ratio/region_mean", "kl", "completions/mean_length", "completions/min_length", "completions/max_length",
             "completions/clipped_ratio"]


def test_script_resume_and_torchrun(sft):
    """4 steps in process; the same as 2 steps in a subprocess + --resume; and as 2 gloo ranks under torchrun."""
    d = sft
    train_grpo.main(grpo_args(d, d / "full"))
    full = metric_rows(d / "full")
    # what the run left out is in every line of its log (prompts dropped at load, steps skipped)
    assert all(r["dropped_prompt_too_long"] == 0 and r["nonfinite_steps_skipped"] == 0 for r in full if "loss" in r)
    assert [r["step"] for r in full] == [1, 2, 3, 4]
    assert not any(r["update_skipped"] for r in full) and all(r["grad_norm"] > 0 for r in full)
    assert all(abs(r["ratio/first_iteration_max_abs_dev"]) < 1e-4 for r in full)

    # 2 steps in a subprocess: checkpoint and metrics with TRL's names
    run([sys.executable, str(ROOT / "train_grpo.py"), *grpo_args(d, d / "parts", "--stop_after_steps", "2")])
    ckpt = torch.load(d / "parts/ckpt.pt", map_location="cpu", weights_only=False)
    assert ckpt["step"] == 2 and not ckpt["finished"] and ckpt["config"]["loss_type"] == "grpo"
    first = metric_rows(d / "parts")
    assert [r["step"] for r in first] == [1, 2]
    missing = [k for k in TRL_NAMES if k not in first[0]]
    assert not missing, missing
    # --resume continues the same run exactly (the sampler is re-seeded from (seed, step))
    train_grpo.main(grpo_args(d, d / "parts", "--resume"))
    parts = metric_rows(d / "parts")
    assert [(r["step"], r["loss"], r["reward"]) for r in parts] == [(r["step"], r["loss"], r["reward"]) for r in full]
    for k, v in params(d / "full").items():
        assert torch.equal(v, params(d / "parts")[k]), k

    # 2 gloo ranks x 2 prompts = 1 process x 4 prompts: same rollouts, same global normalization, same weights
    run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(ROOT / "train_grpo.py"),
         *grpo_args(d, d / "two")], timeout=300)
    a, b = params(d / "full"), params(d / "two")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5, msg=k)
    for r1, r2 in zip(full, metric_rows(d / "two")):
        assert r1["reward"] == r2["reward"] and abs(r1["loss"] - r2["loss"]) < 1e-5 and abs(r1["kl"] - r2["kl"]) < 1e-5
    # and the weights did move: the comparison above could fail
    assert max((a[k] - params(d / "sft")[k]).abs().max() for k in a) > 1e-3


def test_beta_zero_builds_no_reference_model(sft, monkeypatch):
    d = sft
    calls = []
    real = checkpoint.load_model
    monkeypatch.setattr(checkpoint, "load_model", lambda *a, **k: calls.append(a[0]) or real(*a, **k))
    train_grpo.main(grpo_args(d, d / "beta0", "--beta", "0", "--max_steps", "1", "--num_iterations", "1"))
    assert calls == [str(d / "sft")]  # the policy only
    assert "kl" not in metric_rows(d / "beta0")[0]
    calls.clear()
    train_grpo.main(grpo_args(d, d / "beta", "--max_steps", "1", "--num_iterations", "1", "--eval_data", str(d / "rl_eval.jsonl"),
                              "--eval_prompts", "8"))
    assert calls == [str(d / "sft")] * 2  # policy + reference (the eval reuses the reference for its KL)
    # (8 eval prompts, so every kind is present: evaluate.format_result cannot print a rate of None)
    res = json.loads((d / "beta/eval.json").read_text())
    assert res["n_prompts"] == 8 and "sampled/kl_to_ref" in res
    # the eval's numbers are the ones logged (whether RL improves the reward is tested on the tiny problem with
    # a known optimum, test_grpo_converges_to_the_known_optimal_answer: a 1-step run from a 2-step SFT model
    # cannot show it)
    last = metric_rows(d / "beta")[-1]
    assert all(last[k] == res[k] for k in ("sampled/gold_score", "greedy/gold_score", "sampled/kl_to_ref"))


def test_reward_model_term(sft):
    """--reward_funcs gold reward_model --reward_model PATH: the model's scores are logged and weighted in;
    a causal (policy) checkpoint is refused as a reward model."""
    d = sft
    rm = checkpoint.load_model(d / "sft", kind="scalar")  # an untrained head: any scalar model will do here
    checkpoint.save(d / "rm", model=rm, optimizer=None, scaler=None, step=0, cfg=train_grpo.Config(), tokenizer_path=None)
    train_grpo.main(grpo_args(d, d / "with_rm", "--reward_funcs", "gold", "reward_model", "--reward_weights", "1", "2",
                              "--reward_model", str(d / "rm"), "--max_steps", "1"))
    row = metric_rows(d / "with_rm")[0]
    assert row["rewards/reward_model/std"] > 0  # a real score per response, not a constant
    assert abs(row["reward"] - (row["rewards/gold/mean"] + 2 * row["rewards/reward_model/mean"])) < 1e-6
    with pytest.raises(SystemExit, match="holds a causal model, not a reward model"):
        train_grpo.main(grpo_args(d, d / "bad", "--reward_funcs", "reward_model", "--reward_weights", "--reward_model", str(d / "sft")))


def test_bad_flags_are_refused(sft, capsys):
    """Flag checks are argparse errors naming the flag (exit status 2, message on stderr)."""
    d = sft
    for flags, message in [(["--num_generations", "1"], "--num_generations=1 must be >= 2"),
                           (["--reward_funcs", "reward_model", "--reward_weights"], "--reward_model PATH and 'reward_model'"),
                           (["--layout", "rows"], "unrecognized arguments: --layout"),  # the packed layout is the only one
                           (["--grad_accum", "2"], "unrecognized arguments: --grad_accum")]:
        with pytest.raises(SystemExit):
            train_grpo.main(grpo_args(d, d / "bad_flags", *flags))
        assert message in capsys.readouterr().err
    with pytest.raises(SystemExit, match="unknown reward function"):
        train_grpo.main(grpo_args(d, d / "bad_flags", "--reward_funcs", "gold", "nope", "--reward_weights"))
    assert not (d / "bad_flags").exists()


def test_dropout_is_off_in_the_policy(sft):
    """Issue 13a. A checkpoint whose config has dropout 0.1: every forward of the step (sampler, old-logps pass,
    training) runs without dropout, so with μ = 2 the first update's ratio is exactly 1 and the sampler agrees to
    rounding. (Before: the GRPO policy kept its dropout, max |ratio - 1| = 0.227 on the first update.)"""
    d = sft
    ckpt = torch.load(d / "sft/ckpt.pt", map_location="cpu", weights_only=False)
    ckpt["model_config"]["dropout"] = 0.1
    (d / "sft_dropout").mkdir(exist_ok=True)
    torch.save(ckpt, d / "sft_dropout/ckpt.pt")
    shutil.copy(d / "sft/tokenizer.model", d / "sft_dropout/tokenizer.model")
    assert checkpoint.load_model(d / "sft_dropout").cfg.dropout == 0.1
    train_grpo.main(grpo_args(d, d / "dropout", "--init_from", str(d / "sft_dropout"), "--beta", "0",
                              "--max_steps", "1", "--dtype", "fp32"))
    row = metric_rows(d / "dropout")[0]
    assert row["update_skipped"] == 0.0
    assert row["ratio/first_iteration_max_abs_dev"] == 0.0 and row["sampler/logp_max_abs_diff"] < 1e-4


def test_torchrun_moe_policy_with_an_idle_expert(sft, tmp_path):
    """Issue 13c. 2 gloo ranks, an MoE policy whose router (all zeros: a tie, so experts 2 and 3 take every
    token) leaves experts 0 and 1 without gradient: DDP must be told to look for unused parameters
    (runtime.wrap_ddp), or the second step fails with "Expected to have finished reduction in the prior
    iteration". (Before: the RL scripts' DDP wrapper never set find_unused_parameters.)"""
    d = sft
    torch.manual_seed(0)
    moe = CausalLM(tiny_config(Tokenizer(str(d / "tok/tokenizer.model")).vocab_size, n_experts=4, n_experts_per_tok=2))
    for m in moe.modules():
        if isinstance(m, MoE):
            torch.nn.init.zeros_(m.router.weight)
    checkpoint.save(tmp_path / "moe", model=moe, optimizer=None, scaler=None, step=0, cfg=train_grpo.Config(),
                    tokenizer_path=str(d / "tok/tokenizer.model"))
    run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(ROOT / "train_grpo.py"),
         *grpo_args(d, tmp_path / "out", "--init_from", str(tmp_path / "moe"), "--beta", "0", "--num_iterations", "1",
                    "--max_steps", "2")], timeout=120)
    rows = metric_rows(tmp_path / "out")
    assert [r["step"] for r in rows] == [1, 2] and all(r["update_skipped"] == 0.0 for r in rows)


# ------------------------------------------- the REINFORCE family: RLOO, REINFORCE++, ReMax, the KL in the reward

def length_reward(prompts, completions, **fields):
    return [float(len(c)) for c in completions]


@pytest.mark.parametrize("estimator", ["rloo", "reinforce_pp", "remax"])
def test_every_estimator_converges_to_the_known_optimal_answer(estimator):
    """The tiny problem of test_grpo_converges_to_the_known_optimal_answer (reward 1 only for "7"), learned by
    each --advantage_estimator through the script's functions (ReMax with its greedy rollout every step)."""
    from minialign.algorithms.rollout import greedy_rollout
    model, cfg, optimizer, scaler = tiny_setup(advantage_estimator=estimator)
    sources, history = [RewardSource("r", answer_seven, 1.0)], []
    for i in range(40):
        ro = sample_rollout(model, DigitTok(), PROMPTS, cfg.num_generations, cfg.max_new_tokens, 1.0, cfg.seed, i, 0)
        greedy = greedy_rollout(model, DigitTok(), PROMPTS, cfg.max_new_tokens) if estimator == "remax" else None
        batches, g = train_grpo.grpo_batches(ro, sources, None, None, RT, cfg, model, greedy)
        train_grpo.grpo_update(model, optimizer, scaler, batches, i, RT, cfg, {})
        history.append(float(g["reward"].mean()))
    assert history[0] < 0.1 and sum(history[-5:]) / 5 > 0.9, history


def test_remax_baseline_is_the_greedy_responses_reward():
    """ReMax: every sample of a prompt is compared with the reward of that prompt's greedy response, decoded
    here independently by generate(temperature=0); the greedy responses are rewarded, not trained on."""
    from minialign.algorithms.generation import generate
    from minialign.algorithms.rollout import greedy_rollout
    model, cfg, _, _ = tiny_setup(advantage_estimator="remax")
    ro = sample_rollout(model, DigitTok(), PROMPTS, 8, 4, 1.0, 0, 0, 0)
    greedy = greedy_rollout(model, DigitTok(), PROMPTS, 4, prompts_per_generate=3)
    def digit_sum(prompts, completions, **fields):  # the digits of the answer + the prompt's number ("q3" -> 3)
        return [float(sum(int(x) for x in c.split()) + int(p[1:])) for p, c in zip(prompts, completions)]

    batches, g = train_grpo.grpo_batches(ro, [RewardSource("r", digit_sum, 1.0)], None, None, RT, cfg, model, greedy)
    baselines = []
    for b, p in enumerate(PROMPTS):
        ids = torch.tensor([p["prompt_ids"]])
        gen = generate(model, ids, torch.ones_like(ids, dtype=torch.bool), 4, eos_id=3, pad_id=0, temperature=0)
        text = DigitTok().decode(gen.response_ids[0][gen.response_mask[0]].tolist())
        baselines.append(digit_sum([p["prompt_text"]], [text])[0])
        assert g["greedy_reward"][b] == baselines[-1]
        assert torch.equal(g["advantage"][b * 8 : (b + 1) * 8], g["reward"][b * 8 : (b + 1) * 8] - baselines[-1])
    assert len(set(baselines)) == 8  # one baseline per prompt
    assert sum(len(b["advantages"]) for b in batches) == 64  # the 64 samples only


@pytest.mark.parametrize("kl_in", ["reward", "loss"])
def test_kl_in_the_reward_or_in_the_loss(kl_in):
    """--kl_in reward: no reference log-probs in the loss; one advantage per response, RLOO's of the KL-penalised
    R_i = r_i - β Σ_t k1_t (Ahmadian et al. 2024), with k1 recomputed here from plain-rows forwards of the policy
    and the reference; "kl" is the rollout's mean k1 per token. --kl_in loss: the
    advantages are per response, the reference goes into the loss (k2 here) and "kl" is its mean."""
    from minialign.algorithms.losses import rloo_advantages
    model, cfg, optimizer, scaler = tiny_setup(advantage_estimator="rloo", beta=0.1, kl_in=kl_in,
                                               kl_estimator="k2" if kl_in == "loss" else "auto",
                                               mask_truncated_completions=False)
    torch.manual_seed(1)
    ref = CausalLM(tiny_config(8)).eval()
    ro = sample_rollout(model, DigitTok(), PROMPTS, 8, 4, 1.0, 0, 0, 0)
    with torch.no_grad():  # before any update: k1_t = log π_old(y_t) - log π_ref(y_t)
        k1 = (plain_logps(model, ro) - plain_logps(ref, ro)).masked_fill(~ro.response_mask, 0.0)
    sources = [RewardSource("r", length_reward, 1.0)]
    batches, g = train_grpo.grpo_batches(ro, sources, None, ref, RT, cfg, model)
    m = {**train_grpo.grpo_update(model, optimizer, scaler, batches, 0, RT, cfg, {}),
         **train_grpo.rollout_metrics(g, sources, 8)}
    assert m["update_skipped"] == 0.0
    if kl_in == "loss":
        assert all(b["advantages"].dim() == 1 and "ref_logps" in b for b in batches)
        torch.testing.assert_close(g["advantage"], rloo_advantages(g["reward"], 8))
        assert "kl" not in g and m["kl"] > 0  # k2 >= 0, and the reference differs
        return
    assert all(b["advantages"].dim() == 1 and "ref_logps" not in b for b in batches)
    torch.testing.assert_close(g["kl"], k1.sum(-1).double(), rtol=1e-5, atol=1e-5)
    assert m["kl"] == pytest.approx(float(k1.sum() / ro.response_mask.sum()), abs=1e-5)
    expected = rloo_advantages(g["reward"] - 0.1 * k1.sum(-1).double(), 8)  # R_i - mean_{j≠i} R_j
    torch.testing.assert_close(g["advantage"], expected, rtol=1e-5, atol=1e-5)
    assert (expected != rloo_advantages(g["reward"], 8)).all()  # the KL term is really there
    assert abs(float(expected.view(-1, 8).sum(-1).abs().max())) < 1e-6  # each group's advantages sum to 0


def test_rloo_script_resume_and_torchrun(sft):
    """--advantage_estimator rloo (the KL in the reward, auto; β = 0.04, μ = 2): 4 steps in process equal 2 steps
    + --resume, and 2 gloo ranks x 2 prompts equal 1 process x 4 prompts (the advantages and the KL rewards are
    computed on every rank's rows)."""
    d = sft
    rloo = ("--advantage_estimator", "rloo", "--no-mask_truncated_completions")  # every response counts
    train_grpo.main(grpo_args(d, d / "rloo_full", *rloo))
    full = metric_rows(d / "rloo_full")
    assert [r["step"] for r in full] == [1, 2, 3, 4] and not any(r["update_skipped"] for r in full)
    assert full[0]["kl"] == 0 and all(r["kl"] != 0 for r in full[1:])  # the rollout's k1; step 1: π = π_ref
    train_grpo.main(grpo_args(d, d / "rloo_parts", *rloo, "--stop_after_steps", "2"))
    assert torch.load(d / "rloo_parts/ckpt.pt", weights_only=False)["config"]["advantage_estimator"] == "rloo"
    train_grpo.main(grpo_args(d, d / "rloo_parts", *rloo, "--resume"))
    keys = ("step", "loss", "reward", "kl", "grad_norm")
    assert [[r[k] for k in keys] for r in metric_rows(d / "rloo_parts")] == [[r[k] for k in keys] for r in full]
    for k, v in params(d / "rloo_full").items():
        assert torch.equal(v, params(d / "rloo_parts")[k]), k
    run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         str(ROOT / "train_grpo.py"), *grpo_args(d, d / "rloo_two", *rloo)], timeout=300)
    a, b = params(d / "rloo_full"), params(d / "rloo_two")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5, msg=k)
    for r1, r2 in zip(full, metric_rows(d / "rloo_two")):
        assert r1["reward"] == r2["reward"] and abs(r1["loss"] - r2["loss"]) < 1e-5 and abs(r1["kl"] - r2["kl"]) < 1e-5
    assert max((a[k] - params(d / "sft")[k]).abs().max() for k in a) > 1e-3  # the weights did move


def test_completions_log_with_remax_and_resume(sft, capsys):
    """--log_completions_every 1: one row per completion (4 prompts x G = 4) per step with its prompt, completion,
    each reward function's value, the weighted reward, advantage and length; 3 lines printed per step; ReMax's
    advantages share the baseline within a group; a --resume drops the rows logged after the checkpoint."""
    d = sft
    args = ("--advantage_estimator", "remax", "--no-mask_truncated_completions", "--log_completions_every", "1",
            "--beta", "0", "--num_iterations", "1")
    train_grpo.main(grpo_args(d, d / "logged", *args, "--max_steps", "3", "--stop_after_steps", "2"))
    train_grpo.main(grpo_args(d, d / "logged", *args, "--max_steps", "3", "--resume"))
    rows = [json.loads(l) for l in (d / "logged/completions.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1] * 16 + [2] * 16 + [3] * 16
    assert set(rows[0]) == {"step", "prompt", "completion", "rewards/gold", "rewards/length", "reward", "advantage",
                            "length"}
    for r in rows:
        assert r["reward"] == pytest.approx(r["rewards/gold"] + 0.5 * r["rewards/length"]) and r["length"] >= 1
        assert isinstance(r["prompt"], str) and r["prompt"] and isinstance(r["completion"], str)
    for i in range(0, 48, 4):  # A_i - A_j = r_i - r_j inside a group: one baseline, the greedy reward
        group = rows[i : i + 4]
        baselines = {round(r["reward"] - r["advantage"], 9) for r in group}
        assert len(baselines) == 1, group
    out = capsys.readouterr().out
    assert sum(f"step {s} reward" in line for s in (1, 2, 3) for line in out.splitlines()) == 9
    # a new run over it (--overwrite) starts a new file
    train_grpo.main(grpo_args(d, d / "logged", *args, "--max_steps", "1", "--overwrite"))
    assert len((d / "logged/completions.jsonl").read_text().splitlines()) == 16


def test_reinforce_family_bad_flags_are_refused(sft, capsys):
    d = sft
    for flags, message in [
            (["--advantage_estimator", "ppo"], "--advantage_estimator='ppo' must be one of grpo, rloo, reinforce_pp"),
            (["--advantage_estimator", "rloo", "--scale_rewards", "batch"],
             "--scale_rewards=batch is read by --advantage_estimator grpo only"),
            (["--kl_in", "reward", "--kl_estimator", "k3"], "--kl_estimator=k3 with the KL in the reward"),
            (["--advantage_estimator", "reinforce_pp", "--kl_estimator", "k2"],  # auto: REINFORCE++'s is the reward
             "--kl_estimator=k2 with the KL in the reward"),
            (["--kl_in", "both"], "--kl_in='both' must be one of auto, loss, reward"),
            (["--advantage_estimator", "remax"],  # ReMax's uncentred advantages and the default mask: refused
             "--advantage_estimator remax with --mask_truncated_completions (the default) is refused"),
            (["--log_completions_every", "-1"], "--log_completions_every=-1 must be >= 0")]:
        with pytest.raises(SystemExit):
            train_grpo.main(grpo_args(d, d / "bad_rf_flags", *flags))
        assert message in capsys.readouterr().err
    assert not (d / "bad_rf_flags").exists()
    # accepted: REINFORCE++ with the KL in the loss (OpenRLHF's --use_kl_loss variant), k2 there
    cfg = config.parse_config(train_grpo.Config, ["--advantage_estimator", "reinforce_pp", "--kl_in", "loss",
                                                  "--kl_estimator", "k2", "--beta", "0.01"])
    assert cfg.kl_placement() == "loss" and cfg.loss_kl() == (0.01, "k2")
    assert config.parse_config(train_grpo.Config, []).loss_kl() == (0.0, "k3")  # GRPO's default: k3 in the loss
    remax = config.parse_config(train_grpo.Config, ["--advantage_estimator", "remax", "--no-mask_truncated_completions"])
    assert remax.kl_placement() == "reward" and remax.loss_type == "grpo"  # β = 0: nothing in the reward, auto = grpo
    # --loss_type auto: a constant normalizer (dr_grpo) when β·KL is in the reward, as its unbiasedness needs
    assert config.parse_config(train_grpo.Config, ["--advantage_estimator", "rloo", "--beta", "0.1"]).loss_type == "dr_grpo"
    assert config.parse_config(train_grpo.Config, ["--beta", "0.1"]).loss_type == "grpo"  # KL in the loss (GRPO's)
    assert config.parse_config(train_grpo.Config, ["--advantage_estimator", "rloo", "--beta", "0.1", "--loss_type",
                                                   "grpo"]).loss_type == "grpo"  # an explicit choice is kept


def test_gradient_checkpointing_changes_no_update(sft):
    """--gradient_checkpointing in GRPO (policy blocks recomputed in the backward; sampling and the no-grad
    log-prob forwards never checkpoint): the same losses (1e-6) and weights (rtol 1e-5, atol 1e-6) as without it."""
    d = sft
    train_grpo.main(grpo_args(d, d / "plain_gc", "--max_steps", "2"))
    train_grpo.main(grpo_args(d, d / "ckpt_gc", "--max_steps", "2", "--gradient_checkpointing"))
    a, b = metric_rows(d / "plain_gc"), metric_rows(d / "ckpt_gc")
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for ra, rb in zip(a, b):
        if "loss" in ra:
            assert abs(ra["loss"] - rb["loss"]) < 1e-6
    pa, pb = params(d / "plain_gc"), params(d / "ckpt_gc")
    for k in pa:
        torch.testing.assert_close(pb[k], pa[k], rtol=1e-5, atol=1e-6, msg=k)
