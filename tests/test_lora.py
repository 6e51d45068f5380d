"""LoRA (minialign.models.lora) in every stage: the adapter's algebra, what trains, the adapters-off reference, the
LoRA-from-LoRA reference, checkpoints (adapters + base hash), exact resume, torchrun, merge and refusals.

Speed: a random 2-layer, dim-64 model saved as if it were the SFT checkpoint (as tests/test_reliability_stages.py),
slices of the default data, runs of 2-4 steps called through the scripts' main() in this process; one
torchrun run and one merge CLI run are subprocesses.
"""

import copy
import json
import math
import sys
from pathlib import Path

import pytest
import torch
from conftest import ARCHS, ROOT, run, tiny_config, tiny_model

import train_dpo  # noqa: E402  (conftest puts the repository on sys.path)
import train_grpo  # noqa: E402
import train_kto  # noqa: E402
import train_ppo  # noqa: E402
import train_rm  # noqa: E402
import train_sft  # noqa: E402
from minialign.algorithms.losses import token_logps
from minialign.algorithms.packing import collate_pairs
from minialign.algorithms.preference import pair_logps
from minialign.algorithms.roles import frozen, value_and_reward
from minialign.data.batching import tokenize_preferences
from minialign.data.formats import load_preferences
from minialign.data.tokenizer import Tokenizer, train_tokenizer
from minialign.models import lora
from minialign.models.decoder import CausalLM, MoE, ScalarModel
from minialign.training import checkpoint, config, loop, runtime

CPU = torch.device("cpu")
RT = runtime.Runtime(CPU, torch.float32)
LORA = ["--lora_r", "4", "--lora_alpha", "8"]


def nudge_adapters(model, seed=0):
    """Give every B a nonzero value, as training would (fresh adapters are exactly 0)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in lora.lora_layers(model):
            m.lora_B.copy_(0.05 * torch.randn(m.lora_B.shape, generator=g))
    return model


# ------------------------------------------------------------------------------------ the adapter itself

@pytest.mark.parametrize("arch", list(ARCHS))
def test_fresh_disabled_and_merged_forwards(arch):
    base = tiny_model(seed=0, **ARCHS[arch])
    model = lora.apply_lora(copy.deepcopy(base), r=4, alpha=8.0)
    x = torch.randint(0, 96, (3, 12))
    with torch.no_grad():
        y_base = base(x)
        assert torch.equal(model(x), y_base)  # B = 0: exactly the base logits
        nudge_adapters(model)
        y = model(x)
        assert (y - y_base).abs().max() > 1e-3  # the adapters do something
        with lora.adapters_disabled(model):
            assert torch.equal(model(x), y_base)  # off: exactly the base again
        lora.merge(model)
        torch.testing.assert_close(model(x), y, rtol=0, atol=1e-6)  # W0 + s B A == W0 x + s B A x
        lora.unmerge(model)
        torch.testing.assert_close(model(x), y, rtol=0, atol=1e-6)
        plain = lora.merged_copy(model)  # a plain CausalLM state_dict, loadable without any LoRA code
        fresh = CausalLM(base.cfg).eval()
        fresh.load_state_dict(plain.state_dict())
        torch.testing.assert_close(fresh(x), y, rtol=0, atol=1e-6)
    # r (in + out) per adapter, r = 4: attention q, o 64 -> 64 and k, v 64 -> 32 (GQA): 2·4·128 + 2·4·96 = 1792;
    # each SwiGLU (hidden 192) gate, up, down: 3·4·256 = 3072, one per MoE expert; 2 layers
    n_swiglu = ARCHS[arch].get("n_experts") or 1
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == 2 * (1792 + 3072 * n_swiglu)


def sum_nll(model, batch):
    logits = model(batch["inputs"])
    return -token_logps(logits, batch["labels"]).sum(), {}


def test_only_adapters_and_new_heads_get_gradients_and_the_base_stays_byte_identical():
    torch.manual_seed(0)
    causal = lora.apply_lora(CausalLM(tiny_config()), 4, 8.0, targets=("q", "v", "down"))
    scalar = lora.apply_lora(ScalarModel(tiny_config()), 4, 8.0, trainable=("score_head.",))
    for model, extra in ((causal, ()), (scalar, ("score_head.weight", "score_head.bias"))):
        before = {k: v.clone() for k, v in model.state_dict().items()}
        x = torch.randint(0, 96, (4, 10))
        batch = {"inputs": x[:, :-1], "labels": x[:, 1:]}
        out = model(batch["inputs"]) if isinstance(model, ScalarModel) else sum_nll(model, batch)[0]
        out.sum().backward()
        with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
        expected = {n for n, _ in model.named_parameters() if n.endswith((".lora_A", ".lora_B"))} | set(extra)
        assert with_grad == expected
        cfg = train_sft.Config(lr=1e-2, weight_decay=0.1)
        optimizer = loop.make_optimizer(model, cfg, RT)
        assert sum(p.numel() for g in optimizer.param_groups for p in g["params"]) == sum(
            p.numel() for n, p in model.named_parameters() if n in expected)  # the optimizer sees only those
        optimizer.zero_grad()
        for _ in range(3):
            loss_fn = sum_nll if isinstance(model, CausalLM) else lambda m, b: (m(b["inputs"]).sum(), {})
            loop.train_step(model, optimizer, RT.make_scaler(), [batch], loss_fn, lambda b: 1, RT, 1.0)
        after = model.state_dict()
        for k, v in before.items():
            moved = not torch.equal(after[k], v)
            assert moved == (k.endswith(".lora_B") or k.endswith(".lora_A") or k in extra), k  # base: untouched


# ------------------------------------------------------------------------------------- script runs

@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """Data slices, a tokenizer, a random tiny base saved as the "SFT" checkpoint, a reward model from it."""
    d = tmp_path_factory.mktemp("lora")
    head = lambda name, n: (ROOT / "data" / name).read_text(encoding="utf-8").splitlines()[:n]  # noqa: E731
    for name, src, n in (("sft.jsonl", "sft_train.jsonl", 64), ("pref.jsonl", "pref_train.jsonl", 32),
                         ("rl.jsonl", "rl_train.jsonl", 16), ("eval.jsonl", "rl_eval.jsonl", 4)):
        (d / name).write_text("\n".join(head(src, n)) + "\n", encoding="utf-8")
    tok = train_tokenizer(head("sft_train.jsonl", 256) + head("pref_train.jsonl", 256), d / "tok", vocab_size=400)
    torch.manual_seed(0)
    checkpoint.save(d / "base", model=CausalLM(tiny_config(tok.vocab_size)), optimizer=None, scaler=None, step=0,
                    cfg=train_sft.Config(), tokenizer_path=tok.path, finished=True)
    checkpoint.save(d / "rm", model=checkpoint.load_model(d / "base", kind="scalar"), optimizer=None, scaler=None,
                    step=0, cfg=train_rm.Config(), tokenizer_path=tok.path, finished=True)
    return d


def args(stage, d, out, *extra, init="base"):
    init = str(d / init)
    per_stage = {
        "sft": ["--data", str(d / "sft.jsonl"), "--micro_batch_size", "8", "--grad_accum", "1"],
        "rm": ["--data", str(d / "pref.jsonl"), "--micro_batch_pairs", "4", "--grad_accum", "1"],
        "dpo": ["--data", str(d / "pref.jsonl"), "--pref_eval_data", "", "--micro_batch_pairs", "4", "--beta", "0.1"],
        "kto": ["--pairs", str(d / "pref.jsonl"), "--micro_batch_size", "4", "--beta", "0.1"],
        "ppo": ["--reward_model", str(d / "rm"), "--data", str(d / "rl.jsonl"), "--prompts_per_step", "4",
                "--max_new_tokens", "6", "--micro_batch_size", "4", "--num_ppo_epochs", "1", "--num_minibatches", "1"],
        "grpo": ["--reward_funcs", "reward_model", "--reward_model", str(d / "rm"), "--data", str(d / "rl.jsonl"),
                 "--prompts_per_step", "2", "--num_generations", "2", "--max_new_tokens", "6", "--micro_batch_size",
                 "4", "--no-mask_truncated_completions", "--beta", "0.1"],
    }[stage]
    return ["--init_from", init, *per_stage, "--out_dir", str(out), "--eval_data", "", "--max_steps", "4",
            "--save_every", "2", "--warmup_steps", "1", "--lr", "1e-2", "--log_every", "1", *LORA, *extra]


MAIN = {"sft": train_sft, "rm": train_rm, "dpo": train_dpo, "kto": train_kto, "ppo": train_ppo, "grpo": train_grpo}


def rows(out):
    """The logged training steps, without their wall-clock times."""
    lines = (Path(out) / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k != "time_s"} for line in lines if '"loss"' in line]


def ckpt(out):
    return torch.load(Path(out) / "ckpt.pt", map_location="cpu", weights_only=False)


@pytest.fixture(scope="module")
def sft_lora(workdir):
    """A LoRA SFT run from the base: the starting point of the LoRA-from-LoRA case."""
    out = workdir / "sft_lora"
    train_sft.main(args("sft", workdir, out, "--max_steps", "3"))
    return out


def test_lora_checkpoint_holds_the_adapters_and_the_base_hash(workdir, sft_lora):
    saved = ckpt(sft_lora)
    assert saved["lora"]["r"] == 4 and saved["lora"]["base"] == str(workdir / "base")
    assert saved["model"] and all(k.endswith((".lora_A", ".lora_B")) for k in saved["model"])
    base = checkpoint.load_model(workdir / "base")
    assert saved["lora"]["base_sha256"] == lora.weights_hash(base)
    merged = checkpoint.load_model(sft_lora)  # a plain CausalLM: base + s B A
    assert type(merged.backbone.layers[0].attn.q_proj) is torch.nn.Linear
    m, b = merged.state_dict(), base.state_dict()
    targets = [k for k in b if any(f"{p}.weight" in k for p in lora.TARGETS.values())]
    assert targets and all(not torch.equal(m[k], b[k]) for k in targets)  # the SFT adapters moved every target
    assert all(torch.equal(m[k], b[k]) for k in b if k not in targets)  # embedding and norms: byte-identical

    # the base changed under the adapters: refused, naming it
    bad = workdir / "sft_lora_bad"
    bad.mkdir()
    saved["lora"]["base_sha256"] = "0" * 64
    torch.save(saved, bad / "ckpt.pt")
    with pytest.raises(ValueError, match="is not the model its adapters were trained on"):
        checkpoint.load_model(bad)


def test_rm_with_lora_trains_adapters_and_its_new_head(workdir, sft_lora):
    out = workdir / "rm_lora"
    train_rm.main(args("rm", workdir, out, "--max_steps", "2", "--eval_data", "", init="sft_lora"))
    saved = ckpt(out)
    assert saved["model_kind"] == "scalar" and saved["lora"]["trainable"] == ["score_head."]
    assert {k for k in saved["model"] if not k.endswith((".lora_A", ".lora_B"))} == {"score_head.weight",
                                                                                    "score_head.bias"}
    rm = checkpoint.load_model(out, kind="scalar")  # base = the merged LoRA SFT model, then these adapters
    sft = checkpoint.load_model(sft_lora).state_dict()
    assert torch.equal(rm.backbone.embed.weight, sft["backbone.embed.weight"])


def test_dpo_reference_is_exactly_a_frozen_copy_of_the_base(workdir):
    tok = Tokenizer(workdir / "base" / "tokenizer.model")
    batch = collate_pairs(tokenize_preferences(load_preferences(workdir / "pref.jsonl"), tok, 128)[:6], tok.pad_id)
    cfg = train_dpo.Config(beta=0.1, lora_r=4, lora_alpha=8.0, init_from=str(workdir / "base"))
    policy = lora.from_config(checkpoint.load_model(workdir / "base"), cfg, cfg.init_from)
    ref_copy = frozen(checkpoint.load_model(workdir / "base"), RT)
    optimizer = torch.optim.SGD([p for p in policy.parameters() if p.requires_grad], lr=0.5)
    reference = lora.reference(policy)
    for _ in range(3):  # move the adapters
        loss, _ = train_dpo.pair_loss(policy, batch, reference, cfg)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    with torch.no_grad():
        off, copy_ = pair_logps(reference, batch), pair_logps(ref_copy, batch)
        on = pair_logps(policy, batch)
    assert torch.equal(off.chosen_logps, copy_.chosen_logps) and torch.equal(off.rejected_logps, copy_.rejected_logps)
    assert (on.chosen_logps - copy_.chosen_logps).abs().max() > 1e-3  # while the policy itself has moved


def test_lora_from_a_lora_sft_run_uses_the_sft_model_as_reference(workdir, sft_lora):
    """TRL's bug (trl#4723): disabling fresh adapters on top of a LoRA SFT run must give the SFT model, not the
    bare base. --init_from merges the SFT adapters first, so the DPO step 1 is at policy == reference."""
    cfg = train_dpo.Config(lora_r=4, init_from=str(sft_lora))
    sft = checkpoint.load_model(sft_lora).eval()
    policy = lora.from_config(checkpoint.load_model(sft_lora), cfg, cfg.init_from).eval()
    x = torch.randint(4, 400, (2, 16))
    with torch.no_grad():
        assert torch.equal(lora.reference(policy)(x), sft(x))
        assert (sft(x) - checkpoint.load_model(workdir / "base")(x)).abs().max() > 1e-3  # the bare base differs

    out = workdir / "dpo_from_sft_lora"
    stdout = run([sys.executable, str(ROOT / "train_dpo.py"), *args("dpo", workdir, out, "--max_steps", "2",
                                                                  init="sft_lora")]).stdout
    assert "reference: the policy with its adapters off" in stdout and "LoRA r=4" in stdout
    first = rows(out)[0]
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-6) and first["rewards/margins"] == 0.0
    saved = ckpt(out)
    assert saved["lora"]["base"] == str(sft_lora) and "optimizer" in saved
    dpo = checkpoint.load_model(out)  # base of the base: base -> + SFT adapters -> + DPO adapters
    assert any(not torch.equal(a, b) for a, b in zip(dpo.state_dict().values(), sft.state_dict().values()))


@pytest.mark.parametrize("stage", ["dpo", "ppo"])
def test_resume_with_lora_is_exact(workdir, stage):
    full, parts = workdir / f"{stage}_full", workdir / f"{stage}_parts"
    MAIN[stage].main(args(stage, workdir, full))
    MAIN[stage].main(args(stage, workdir, parts, "--stop_after_steps", "2"))
    assert [r["step"] for r in rows(parts)] == [1, 2]
    MAIN[stage].main(args(stage, workdir, parts, "--resume"))
    assert rows(parts) == rows(full)  # float for float
    for key in ("model", "value_model") if stage == "ppo" else ("model",):
        a, b = ckpt(full)[key], ckpt(parts)[key]
        assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a), key
        assert all(".lora_" in k or k.startswith("score_head.") for k in a), key  # adapters (+ value head) only
    if stage == "ppo":
        assert ckpt(full)["value_model_lora"]["base"] == str(workdir / "rm")
    with pytest.raises(ValueError, match="other adapters"):  # resuming with another rank is refused
        MAIN[stage].main(args(stage, workdir, parts, "--resume", "--max_steps", "5", "--lora_r", "2"))


def test_ppo_reward_is_the_value_models_backbone_with_adapters_off(workdir):
    cfg = train_ppo.Config(lora_r=4, lora_alpha=8.0)
    rm = frozen(checkpoint.load_model(workdir / "rm", kind="scalar"), RT)
    value = checkpoint.load_model(workdir / "rm", kind="scalar")
    value, reward = value_and_reward(value, rm, cfg, str(workdir / "rm"))
    nudge_adapters(value)
    with torch.no_grad():
        value.score_head.bias += 1.0  # the value head trains; the reward keeps the reward model's own head
        x = torch.randint(4, 400, (2, 9))
        assert torch.equal(reward(x), rm(x))
        assert (value(x) - rm(x)).abs().max() > 1e-3


@pytest.mark.parametrize("stage", ["kto", "grpo"])
def test_kto_and_grpo_train_adapters_only(workdir, stage):
    out = workdir / f"{stage}_lora"
    MAIN[stage].main(args(stage, workdir, out, "--max_steps", "2"))
    saved = ckpt(out)
    assert saved["lora"] and all(".lora_" in k for k in saved["model"])
    assert any(float(v.abs().max()) > 0 for k, v in saved["model"].items() if k.endswith("lora_B"))  # it trained
    assert all(math.isfinite(r["loss"]) for r in rows(out))


def test_torchrun_two_processes_match_one_with_lora(workdir):
    one, two = workdir / "dpo_one", workdir / "dpo_two"
    train_dpo.main(args("dpo", workdir, one, "--grad_accum", "2", "--max_steps", "2"))
    run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         str(ROOT / "train_dpo.py"),
         *args("dpo", workdir, two, "--grad_accum", "1", "--max_steps", "2")], timeout=300)
    a, b = ckpt(one)["model"], ckpt(two)["model"]
    assert set(a) == set(b)
    # AdamW's first steps move each weight by about ±lr whatever its gradient's size, so a component whose
    # gradient is ~0 (lora_A while B is still ~0) ends wherever rounding sent it: weights agree to ~lr/50 here,
    # the logged loss and (all-reduced) gradient norm to float error
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=2e-4, msg=k)
    assert [r["step"] for r in rows(two)] == [1, 2]
    for r1, r2 in zip(rows(one), rows(two)):
        assert r1["loss"] == pytest.approx(r2["loss"], abs=1e-6) and r1["grad_norm"] == pytest.approx(r2["grad_norm"])
    # one rank's half of the batch alone (unsynchronized gradients) ends elsewhere: the check has teeth
    half = workdir / "dpo_half"
    train_dpo.main(args("dpo", workdir, half, "--grad_accum", "1", "--max_steps", "2"))
    assert max((ckpt(half)["model"][k] - a[k]).abs().max() for k in a) > 5e-3


def test_merge_cli_writes_a_full_checkpoint(workdir, sft_lora):
    out = workdir / "sft_merged"
    run([sys.executable, "-m", "minialign.training.checkpoint", "merge", "--ckpt", str(sft_lora), "--out", str(out)])
    saved = ckpt(out)
    assert not saved["lora"] and saved["optimizer"] is None and saved["merged_from"]["ckpt"] == str(sft_lora)
    assert (out / "tokenizer.model").exists() and (out / "config.json").exists()
    plain = CausalLM(checkpoint.ModelConfig.from_dict(saved["model_config"]))
    plain.load_state_dict(saved["model"])  # strict: an ordinary full checkpoint
    a, b = plain.state_dict(), checkpoint.load_model(sft_lora).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    proc = run([sys.executable, "-m", "minialign.training.checkpoint", "merge", "--ckpt", str(workdir / "base"), "--out",
                str(workdir / "nope")], check=False)
    assert proc.returncode != 0 and "is not a LoRA run" in proc.stderr
    from minialign.training.hf_export import _load_checkpoint_model  # the export CLI merges a LoRA run on the fly
    exported = _load_checkpoint_model(sft_lora).state_dict()
    assert all(torch.equal(exported[k], a[k]) for k in a)


REFUSED = [  # (script, flags, what the error says)
    (train_dpo, ["--lora_r", "-1"], "--lora_r=-1 must be >= 0"),
    (train_dpo, ["--lora_r", "8", "--lora_targets", "q", "qkv"], "--lora_targets=['q', 'qkv'] must be distinct"),
    (train_dpo, ["--lora_r", "8", "--lora_alpha", "0"], "--lora_alpha=0.0 must be > 0"),
    (train_dpo, ["--lora_r", "8", "--ref_update_every", "2"], "--ref_update_every with --lora_r"),
    (train_sft, ["--lora_r", "8", "--init_from", ""], "--lora_r=8 needs --init_from"),
    (train_ppo, ["--lora_r", "8", "--lora_dropout", "0.1"], "--lora_dropout=0.1 must be 0 in online RL"),
    (train_grpo, ["--lora_r", "8", "--lora_dropout", "0.1"], "--lora_dropout=0.1 must be 0 in online RL"),
    (train_kto, ["--lora_r", "8", "--lora_dropout", "1"], "--lora_dropout=1.0 must be in [0, 1)"),
    (train_dpo, ["--lora_base_dtype", "bf16"], "--lora_base_dtype bf16 needs --lora_r"),
    (train_sft, ["--lora_r", "8", "--lora_base_dtype", "fp16"], "--lora_base_dtype='fp16' must be one of fp32, bf16"),
    (train_grpo, ["--lora_r", "8", "--lora_base_dtype", "bf16", "--dtype", "fp16"],
     "--lora_base_dtype bf16 with --dtype fp16"),
]


@pytest.mark.parametrize("script, flags, message", REFUSED, ids=[f"{s.__name__}{f[-2]}" for s, f, _ in REFUSED])
def test_impossible_lora_flags_are_refused_naming_the_flag(script, flags, message, capsys):
    with pytest.raises(SystemExit):
        config.parse_config(script.Config, flags)
    assert message in capsys.readouterr().err


def test_a_rank_larger_than_a_projection_is_refused(workdir):
    with pytest.raises(ValueError, match="--lora_r=40 exceeds the k_proj projection's smaller side"):
        lora.apply_lora(tiny_model(), r=40, alpha=8.0)  # k_proj is 32 x 64 in the tiny GQA model
    with pytest.raises(SystemExit, match="error: --lora_r=40 exceeds"):  # a script: an error, before training
        train_sft.main(args("sft", workdir, workdir / "sft_r40", "--lora_r", "40"))
    assert not (workdir / "sft_r40" / "ckpt.pt").exists()


def test_the_adapters_off_reference_keeps_the_policy_forwards_moe_balance_loss():
    """train_step reads the MoE balance loss after the loss function, which runs the reference after the policy."""
    model = nudge_adapters(lora.apply_lora(tiny_model(**ARCHS["moe"]).train(), 4, 8.0))
    moes = [m for m in model.modules() if isinstance(m, MoE)]
    model(torch.randint(0, 96, (2, 8)))
    kept = [m.aux_loss for m in moes]
    lora.reference(model)(torch.randint(0, 96, (3, 5)))  # another batch: other routing, other balance losses
    assert all(m.aux_loss is k for m, k in zip(moes, kept))


def test_precomputed_reference_with_lora_gives_the_adapters_off_losses(workdir):
    """--precompute_ref with --lora_r is allowed: it saves each step's adapters-off forward (not memory)."""
    live, pre = workdir / "dpo_live_off", workdir / "dpo_precomputed_off"
    train_dpo.main(args("dpo", workdir, live, "--max_steps", "2"))
    train_dpo.main(args("dpo", workdir, pre, "--max_steps", "2", "--precompute_ref"))
    for a, b in zip(rows(live), rows(pre)):  # to rounding: the precompute batches the pairs differently
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-5) and a["rewards/margins"] == pytest.approx(
            b["rewards/margins"], abs=1e-5)


def test_sampling_with_merged_adapters_leaves_the_model_exactly_as_it_was():
    model = nudge_adapters(lora.apply_lora(tiny_model(), 4, 8.0))
    x = torch.randint(0, 96, (2, 8))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        y = model(x)
        with lora.merged_for_sampling(model):
            assert not lora.lora_layers(model)  # plain nn.Linear: the sampler's packed fast path applies
            torch.testing.assert_close(model(x), y, rtol=0, atol=1e-6)
        assert torch.equal(model(x), y) and len(lora.lora_layers(model)) == 14
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)


# ------------------------------------------------------------------------- a frozen bf16 base (--lora_base_dtype)

# Measured (tiny models, random init, |logits| <= 1.6, 3 seeds): the bf16 base's logits and log-probs differ from
# the fp32 base's by <= 2.0e-3 on the dense and QK-norm models; the MoE by up to 2.3e-2 where a token's routing
# flips. The bounds below leave ~1.5x room.
BF16_ATOL = {"dense": 3e-3, "qk_norm": 3e-3, "moe": 4e-2}


def bf16_lora(base, stage=train_dpo, trainable=()):
    """`base` (left as it is) with r 4 adapters on a frozen bf16 base, as a script's --lora_base_dtype bf16 makes it."""
    cfg = stage.Config(lora_r=4, lora_alpha=8.0, lora_base_dtype="bf16", init_from="base")
    return lora.from_config(copy.deepcopy(base), cfg, "base", trainable=trainable)


def test_a_bf16_base_stores_frozen_weights_in_bf16_and_keeps_adapters_heads_and_adamw_fp32():
    base = tiny_model(seed=0, **ARCHS["moe"], tie_embeddings=False)  # a separate lm_head and MoE routers too
    model = bf16_lora(base)
    fp32 = base.state_dict()
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert name.endswith((".lora_A", ".lora_B")) and p.dtype == torch.float32, name
        else:  # every frozen parameter: the projections, embedding, lm_head, norms, routers; rounded, nothing else
            assert p.dtype == torch.bfloat16, name
            assert torch.equal(p, fp32[name.replace(".base.", ".")].to(torch.bfloat16)), name
    assert model.lora_meta["base_dtype"] == "bf16" and model.lora_meta["base_sha256"] == lora.weights_hash(base)
    assert model.backbone.rope_cos.dtype == torch.float32  # the activations' dtype: still float32
    scalar = bf16_lora(ScalarModel(tiny_config()), train_rm, trainable=("score_head.",))  # a reward model's new head
    assert scalar.score_head.weight.dtype == torch.float32 and scalar.backbone.embed.weight.dtype == torch.bfloat16

    x = torch.randint(0, 96, (3, 10))
    batch = {"inputs": x[:, :-1], "labels": x[:, 1:]}
    optimizer = loop.make_optimizer(model, train_sft.Config(lr=1e-2), RT)
    loop.train_step(model, optimizer, RT.make_scaler(), [batch], sum_nll, lambda b: 1, RT, 1.0)
    states = [s for s in optimizer.state.values()]
    assert states and all(s["exp_avg"].dtype == s["exp_avg_sq"].dtype == torch.float32 for s in states)


@pytest.mark.parametrize("arch", list(ARCHS))
def test_a_fresh_adapter_on_a_bf16_base_is_exactly_that_base_and_close_to_the_fp32_one(arch):
    base = tiny_model(seed=0, **ARCHS[arch])
    model = bf16_lora(base)
    bf16_base = lora.cast_frozen(copy.deepcopy(base).requires_grad_(False), torch.bfloat16)  # no adapters at all
    x = torch.randint(0, 96, (3, 12))
    with torch.no_grad():
        y, y_bf16, y_fp32 = model(x), bf16_base(x), base(x)
        assert y.dtype == torch.float32 and torch.equal(y, y_bf16)  # B = 0: the bf16 base's logits, bit for bit
        assert torch.equal(lora.reference(model)(x), y_bf16)  # adapters off: the bf16 base alone
        gap = (y - y_fp32).abs().max()
        assert 0 < gap <= BF16_ATOL[arch]  # the base's rounding, and only that
        assert (y.log_softmax(-1) - y_fp32.log_softmax(-1)).abs().max() <= BF16_ATOL[arch]


def test_training_on_a_bf16_base_lowers_the_loss_and_moves_only_the_adapters():
    """The upcast matmul's own backward: the adapters' gradients are those of an fp32 model holding the same rounded
    base, and what autograd keeps for the backward holds no fp32 copy of a base matrix (only the bf16 ones)."""
    model = nudge_adapters(bf16_lora(tiny_model(seed=0)))
    x = torch.randint(0, 96, (4, 12), generator=torch.Generator().manual_seed(0))
    batch = {"inputs": x[:, :-1], "labels": x[:, 1:]}
    as_fp32 = lora.cast_frozen(copy.deepcopy(model), torch.float32)  # the bf16 values, stored as float32
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append((t.dtype, tuple(t.shape))) or t, lambda t: t):
        loss = sum_nll(model, batch)[0]
    loss.backward()
    sum_nll(as_fp32, batch)[0].backward()
    for (name, p), q in zip(model.named_parameters(), as_fp32.parameters()):
        if p.requires_grad:
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6, msg=name)
    matrices = {tuple(p.shape) for p in model.parameters() if not p.requires_grad and p.dim() == 2}
    assert (torch.bfloat16, (96, 64)) in saved  # the tied head's stored weight
    assert not [s for s in saved if s[0] == torch.float32 and s[1] in matrices]
    model.zero_grad(set_to_none=True)

    before = {k: v.clone() for k, v in model.state_dict().items()}
    optimizer = loop.make_optimizer(model, train_sft.Config(lr=1e-2), RT)
    losses = [loop.train_step(model, optimizer, RT.make_scaler(), [batch], sum_nll, lambda b: 1, RT, 1.0)["loss"]
              for _ in range(5)]
    assert losses[-1] < losses[0] - 1.0, losses
    after = model.state_dict()
    for k, v in before.items():
        assert torch.equal(after[k], v) != k.endswith((".lora_A", ".lora_B")), k  # the bf16 base: bit for bit


def test_merging_never_touches_a_bf16_base():
    """merged_for_sampling leaves a bf16 base's adapters live (the training forward, exactly); merge / unmerge in place
    are refused; merged_copy is an fp32 model equal to the live forward to fp32 rounding. Merging into bf16 would
    miss that by ~1e-3 (most of the update rounds away), and unmerging by subtraction would not give W0 back."""
    model = nudge_adapters(bf16_lora(tiny_model(seed=0)))
    x = torch.randint(0, 96, (2, 8))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        y = model(x)
        with lora.merged_for_sampling(model):
            assert len(lora.lora_layers(model)) == 14 and torch.equal(model(x), y)
        for fn in (lora.merge, lora.unmerge):
            with pytest.raises(ValueError, match="bf16 base"):
                fn(model)
        plain = lora.merged_copy(model)
        assert all(p.dtype == torch.float32 for p in plain.parameters()) and not lora.lora_layers(plain)
        assert type(plain.backbone.layers[0].attn.q_proj) is torch.nn.Linear
        torch.testing.assert_close(plain(x), y, rtol=0, atol=1e-5)
        assert torch.equal(model(x), y)
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)


def test_sampling_from_a_bf16_base_gives_the_training_forwards_log_probs():
    """The KV cache holds float32 activations (not the bf16 weights' dtype), and the log-probs of the sampled tokens
    are those of a full training forward to float32 rounding."""
    from minialign.algorithms.generation import generate
    model = nudge_adapters(bf16_lora(tiny_model(seed=0))).eval()
    prompt = torch.randint(1, 96, (2, 5))
    with torch.no_grad(), lora.merged_for_sampling(model):
        gen = generate(model, prompt, torch.ones_like(prompt, dtype=torch.bool), 6, eos_id=-1, pad_id=0,
                       generator=torch.Generator().manual_seed(0))
        full = torch.cat([prompt, gen.response_ids], dim=1)
        logps = token_logps(model(full)[:, 4:-1], gen.response_ids)
    assert bool(gen.response_mask.all())
    torch.testing.assert_close(gen.logps, logps, rtol=0, atol=1e-5)


def test_dpo_on_a_bf16_base_end_to_end_and_its_checkpoint_merges_onto_the_fp32_base(workdir):
    """The script takes the flag: step 1 is at policy == reference exactly (loss log 2, both the bf16 base); the
    checkpoint holds fp32 adapters and the fp32 base's hash, and loads as a full fp32 model (base + s B A); a resume
    without the flag is refused."""
    out = workdir / "dpo_bf16"
    train_dpo.main(args("dpo", workdir, out, "--max_steps", "2", "--lora_base_dtype", "bf16"))
    first = rows(out)[0]
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-6) and first["rewards/margins"] == 0.0
    saved = ckpt(out)
    base = checkpoint.load_model(workdir / "base")
    assert saved["lora"]["base_dtype"] == "bf16" and saved["lora"]["base_sha256"] == lora.weights_hash(base)
    assert all(k.endswith((".lora_A", ".lora_B")) and v.dtype == torch.float32 for k, v in saved["model"].items())
    assert {v.dtype for v in saved["optimizer"]["state"][0].values() if v.dim()} == {torch.float32}
    merged = checkpoint.load_model(out)
    assert all(p.dtype == torch.float32 for p in merged.parameters()) and not lora.lora_layers(merged)
    expected = lora.apply_lora(checkpoint.load_model(workdir / "base"), 4, 8.0)  # by hand: fp32 base + adapters
    lora.load_lora_state_dict(expected, saved["model"])
    x = torch.randint(4, 400, (2, 16))
    trained = bf16_lora(base)  # the forward the run trained: the bf16 base + the same adapters
    lora.load_lora_state_dict(trained, saved["model"])
    with torch.no_grad():
        torch.testing.assert_close(merged(x), expected(x), rtol=0, atol=1e-5)
        assert (merged(x) - trained(x)).abs().max() <= BF16_ATOL["dense"]
    with pytest.raises(ValueError, match="base_dtype differ"):
        train_dpo.main(args("dpo", workdir, out, "--max_steps", "3", "--resume"))


@pytest.mark.parametrize("stage", ["ppo", "grpo"])
def test_online_rl_samples_and_trains_on_a_bf16_base(workdir, stage):
    """Sampling runs the live adapters on the bf16 base (merged_for_sampling does not merge it), with PPO's value
    model on a bf16 base too; the KV-cache sampler's log-probs agree with the training forward's to float32
    rounding, and the policy starts at its reference (KL 0 at step 1)."""
    out = workdir / f"{stage}_bf16"
    MAIN[stage].main(args(stage, workdir, out, "--max_steps", "2", "--lora_base_dtype", "bf16"))
    saved = ckpt(out)
    assert saved["lora"]["base_dtype"] == "bf16" and all(v.dtype == torch.float32 for v in saved["model"].values())
    assert any(float(v.abs().max()) > 0 for k, v in saved["model"].items() if k.endswith("lora_B"))  # it trained
    if stage == "ppo":
        assert saved["value_model_lora"]["base_dtype"] == "bf16"
    assert all(math.isfinite(r["loss"]) for r in rows(out))
    first = rows(out)[0]
    assert first["sampler/logp_max_abs_diff"] < 1e-5 and abs(first["objective/kl" if stage == "ppo" else "kl"]) < 1e-6
