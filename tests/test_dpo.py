"""DPO family: the first-step loss of every loss type against its closed form, the config's refusals, and
train_dpo.py run for a few steps per loss type (live / precomputed reference, TR-DPO, resume).

Layouts and log-prob parity are tested once, for every stage, in tests/test_packing.py; KTO has its own
script and tests (tests/test_kto.py).

At step 1 the policy IS the reference, so every reference-based loss has a value that does not depend on
the data (the preference logit x = (π_c - ref_c) - (π_r - ref_r) is 0); the reference-free ones (simpo,
cpo, orpo) are computed here by hand from the initial model's pair log-probs.

The script runs use a tiny SFT checkpoint made in a module fixture (a tokenizer trained on the default
data, then 2 steps of train_sft.py on a 256-line slice) and slices of the preference data: 8 pairs
(= exactly one step of 8, so step 1 sees every pair and its loss can be recomputed here) for the loss
types, 64 for the 4-step sigmoid / precompute / resume runs.
"""

import copy
import json
import math
import sys
from pathlib import Path

import pytest
import torch
from conftest import ROOT, run, tiny_model

import train_dpo  # the script: its config checks and its loss (conftest puts the repository on sys.path)
import train_sft  # to make the tiny SFT checkpoint in-process
from minialign.algorithms import preference
from minialign.algorithms.packing import collate_pairs
from minialign.algorithms.preference import pair_logps
from minialign.data.batching import tokenize_preferences
from minialign.data.formats import load_preferences
from minialign.data.tokenizer import Tokenizer
from minialign.data.tokenizer import main as tokenizer_main
from minialign.training.checkpoint import load_model

LOG2 = math.log(2)


def log_sigmoid(z: float) -> float:
    return -math.log1p(math.exp(-z)) if z >= 0 else z - math.log1p(math.exp(z))


def log_odds(avg_logp: float) -> float:
    """log(p / (1 - p)) of p = exp(mean token log-prob), ORPO's odds."""
    return avg_logp - math.log(-math.expm1(avg_logp))


def expected_first_loss(loss_type, beta, eps, pl):
    """The mean over pairs of the step-1 loss (policy == reference), by hand from the policy's PairLogps.

    Reference-based types: x = (π_c - ref_c) - (π_r - ref_r) = 0 for every pair, so
        sigmoid  -(1-ε) log σ(0) - ε log σ(0)            = (1-ε) log 2 + ε log 2        = log 2  (cDPO too)
        robust   (-(1-ε) log σ(0) + ε log σ(0)) / (1-2ε) = ((1-ε) - ε) log 2 / (1-2ε)  = log 2
        hinge    max(0, 1 - β·0)                                                        = 1
        ipo      (0 - 1/(2β))²                                                          = 1 / (4β²)
    Reference-free types, per pair (c = chosen, r = rejected; sums S, means A of the token log-probs):
        simpo    -(1-ε) log σ(z) - ε log σ(-z),  z = β (A_c - A_r) - γ,  γ = 0.5 β (the default γ/β)
        cpo      -log σ(β (S_c - S_r)) + α·(-A_c),  α = 1
        orpo     -A_c - β log σ(log odds(A_c) - log odds(A_r))
        unlikelihood  -A_c - β (1/|y_r|) Σ_t log(1 - exp(l_r,t)),  l_r,t the rejected token log-probs
    """
    if loss_type in ("sigmoid", "robust"):
        return LOG2
    if loss_type == "hinge":
        return 1.0
    if loss_type == "ipo":
        return 1 / (4 * beta**2)
    S_c, S_r = pl.chosen_logps.tolist(), pl.rejected_logps.tolist()
    A_c, A_r = pl.chosen_logps_avg.tolist(), pl.rejected_logps_avg.tolist()
    if loss_type == "simpo":
        z = [beta * (c - r) - 0.5 * beta for c, r in zip(A_c, A_r)]
        per_pair = [-(1 - eps) * log_sigmoid(v) - eps * log_sigmoid(-v) for v in z]
    elif loss_type == "cpo":
        per_pair = [-log_sigmoid(beta * (c - r)) - a for c, r, a in zip(S_c, S_r, A_c)]
    elif loss_type == "unlikelihood":  # per token of y_r, from the token log-probs the PairLogps carries
        rej = [[lp for lp, m in zip(row, mrow) if m] for row, mrow in
               zip(pl.rejected_token_logps.tolist(), pl.rejected_mask.tolist())]
        per_pair = [-c - beta * sum(math.log(1 - math.exp(lp)) for lp in r) / len(r) for c, r in zip(A_c, rej)]
    else:  # orpo
        per_pair = [-c - beta * log_sigmoid(log_odds(c) - log_odds(r)) for c, r in zip(A_c, A_r)]
    return sum(per_pair) / len(per_pair)


def random_pairs(n, vocab, seed):
    g = torch.Generator().manual_seed(seed)
    draw = lambda lo, hi: torch.randint(4, vocab, (int(torch.randint(lo, hi + 1, (1,), generator=g)),), generator=g).tolist()  # noqa: E731
    return [{"prompt": draw(1, 12), "chosen": draw(1, 9), "rejected": draw(1, 9)} for _ in range(n)]


# ------------------------------------------------------------------- the loss at step 1, in-process

FIRST_STEP_CASES = [  # (loss_type, beta, label_smoothing) -> the closed form in expected_first_loss
    ("sigmoid", 0.5, 0.0),  # log 2
    ("sigmoid", 0.5, 0.2),  # cDPO: log 2
    ("robust", 2.0, 0.1),  # log 2
    ("hinge", 0.5, 0.0),  # 1
    ("ipo", 0.25, 0.0),  # 1 / (4 · 0.0625) = 4
    ("simpo", 2.0, 0.0),
    ("simpo", 2.0, 0.1),
    ("cpo", 0.1, 0.0),
    ("orpo", 0.1, 0.0),
    ("unlikelihood", 1.0, 0.0),
]


@pytest.mark.parametrize("loss_type, beta, eps", FIRST_STEP_CASES)
def test_pair_loss_at_policy_equal_reference_is_the_closed_form(loss_type, beta, eps):
    model = tiny_model(seed=1, vocab_size=64).double()
    ref_model = copy.deepcopy(model)
    batch = collate_pairs(random_pairs(6, 64, seed=3), pad_id=0)
    cfg = train_dpo.Config(loss_type=loss_type, beta=beta, label_smoothing=eps)
    loss_sum, metrics = train_dpo.pair_loss(model, batch, ref_model, cfg)
    pl = pair_logps(model, batch)
    assert float(loss_sum.detach()) / 6 == pytest.approx(expected_first_loss(loss_type, beta, eps, pl), abs=1e-10)
    used = [u.detach() for u in train_dpo.used_logps(pl, loss_type)]
    if loss_type in train_dpo.REFERENCE_FREE:  # rewards β·π (π summed for cpo, averaged for simpo, orpo)
        assert float(metrics["rewards/chosen"]) == pytest.approx(beta * float(used[0].sum()), abs=1e-10)
        if loss_type != "simpo":  # cpo, orpo, unlikelihood: the SFT term, mean token NLL of y_c, summed over pairs
            assert float(metrics["nll_loss"]) == pytest.approx(-float(pl.chosen_logps_avg.detach().sum()), abs=1e-10)
    else:  # implicit rewards β(π - ref) = 0 exactly, the reference being the same weights
        for key in ("rewards/chosen", "rewards/rejected", "rewards/margins"):
            assert float(metrics[key]) == 0.0, key
        assert float(metrics["rewards/accuracies"]) == 0.0  # 0 > 0 is false: ties count as wrong
    assert float(metrics["logps/chosen"]) == pytest.approx(float(used[0].sum()), abs=1e-10)
    loss_sum.backward()  # and it has a gradient (the first update is not a no-op)
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


# ------------------------------------------------------------------------------------------ config

def refused(argv, capsys):
    """train_dpo.main(argv) must stop at parse time with an argparse error (exit 2): its stderr."""
    with pytest.raises(SystemExit) as e:
        train_dpo.main(argv)
    assert e.value.code == 2
    return capsys.readouterr().err


def test_config_refuses_unsupported_combinations_and_removed_flags(capsys):
    assert "--precompute_ref: simpo is reference-free" in refused(["--loss_type", "simpo", "--precompute_ref"], capsys)
    assert "--ref_update_every needs a live reference model" in refused(
        ["--ref_update_every", "2", "--precompute_ref"], capsys)
    assert "--loss_type='nope'" in refused(["--loss_type", "nope"], capsys)
    assert "--loss_type='kto'" in refused(["--loss_type", "kto"], capsys)  # KTO is train_kto.py now
    assert "--label_smoothing=0.6" in refused(["--label_smoothing", "0.6"], capsys)
    assert "--precompute_ref: unlikelihood is reference-free" in refused(
        ["--loss_type", "unlikelihood", "--precompute_ref"], capsys)
    assert "--label_smoothing=0.1 with --loss_type unlikelihood" in refused(
        ["--loss_type", "unlikelihood", "--label_smoothing", "0.1"], capsys)
    assert "--cpo_alpha=2.0 with --loss_type unlikelihood: it is read by cpo only" in refused(
        ["--loss_type", "unlikelihood", "--cpo_alpha", "2"], capsys)
    assert "--simpo_gamma_beta_ratio=1.0 with --loss_type sigmoid" in refused(["--simpo_gamma_beta_ratio", "1"], capsys)
    for gone in (["--layout", "two_rows"], ["--unpaired_data", "x.jsonl"], ["--kto_desirable_weight", "1"],
                 ["--max_new_tokens", "8"]):  # removed or renamed (--eval_max_new_tokens) in the restructuring
        assert f"unrecognized arguments: {' '.join(gone)}" in refused(gone, capsys)


# ----------------------------------------------------------------------------------- the script

@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """Tokenizer + a 2-step SFT checkpoint (both made in-process) + slices of the preference and prompt files."""
    d = tmp_path_factory.mktemp("dpo")
    head = lambda name, n: (ROOT / "data" / name).read_text(encoding="utf-8").splitlines()[:n]  # noqa: E731
    (d / "sft.jsonl").write_text("\n".join(head("sft_train.jsonl", 256)) + "\n")
    (d / "pref.jsonl").write_text("\n".join(head("pref_train.jsonl", 64)) + "\n")
    (d / "pref8.jsonl").write_text("\n".join(head("pref_train.jsonl", 8)) + "\n")
    (d / "pref_eval.jsonl").write_text("\n".join(head("pref_eval.jsonl", 16)) + "\n")
    (d / "prompts.jsonl").write_text("\n".join(head("rl_eval.jsonl", 6)) + "\n")
    tokenizer_main(["--data", str(ROOT / "data/sft_train.jsonl"), str(ROOT / "data/pretrain.jsonl"), "--vocab_size", "512", "--out", str(d / "tok")])
    train_sft.main(["--data", str(d / "sft.jsonl"), "--eval_data", "", "--tokenizer", str(d / "tok/tokenizer.model"),
                    "--out_dir", str(d / "sft"), "--micro_batch_size", "8", "--grad_accum", "1", "--max_steps", "2"])
    return d


def dpo_args(workdir, out, *extra, data="pref.jsonl"):
    return [sys.executable, str(ROOT / "train_dpo.py"), "--init_from", str(workdir / "sft"), "--data", str(workdir / data),
            "--pref_eval_data", str(workdir / "pref_eval.jsonl"), "--eval_data", "", "--out_dir", str(workdir / out),
            "--micro_batch_pairs", "8", "--max_steps", "2", "--warmup_steps", "1", "--lr", "1e-3", "--log_every", "1", *extra]


def dpo(workdir, out, *extra):
    return run(dpo_args(workdir, out, *extra))


def logged(workdir, out):
    return [json.loads(line) for line in (workdir / out / "metrics.jsonl").read_text().splitlines()]


def train_losses(workdir, out):
    return [(r["step"], r["loss"]) for r in logged(workdir, out) if "loss" in r]


@pytest.fixture(scope="module")
def sigmoid_run(workdir):
    """DPO (sigmoid), live reference, 4 steps: shared by the log 2, precompute and resume tests.
    β 0.1: the default β (tuned for the real SFT model) makes 4 steps of this barely trained one jumpy."""
    return dpo(workdir, "sigmoid", "--max_steps", "4", "--beta", "0.1")


def test_sigmoid_starts_at_log_2(workdir, sigmoid_run):
    """Policy == reference at step 0, so every pair's loss is -log σ(0) = log 2 and every reward 0."""
    assert "reference: frozen copy of" in sigmoid_run.stdout
    first = logged(workdir, "sigmoid")[0]
    assert first["step"] == 1
    assert abs(first["loss"] - LOG2) < 1e-6
    assert abs(first["rewards/chosen"]) < 1e-6 and abs(first["rewards/margins"]) < 1e-6
    last = train_losses(workdir, "sigmoid")[-1]
    assert last[0] == 4 and last[1] < LOG2  # and it moves: margins grow on the training pairs


LOSS_RUNS = {  # run name -> (flags, β the run uses, ε); every run on the 8 pairs of pref8.jsonl, one step = all 8
    "ipo": (["--loss_type", "ipo", "--beta", "0.25"], 0.25, 0.0),  # first loss 1 / (4β²) = 4
    "hinge": (["--loss_type", "hinge"], 2.0, 0.0),  # 1
    "robust": (["--loss_type", "robust", "--label_smoothing", "0.1"], 2.0, 0.1),  # log 2
    "simpo": (["--loss_type", "simpo", "--eval_data", "PROMPTS", "--eval_prompts", "6", "--eval_max_new_tokens", "6"], 2.0, 0.0),
    "cpo": (["--loss_type", "cpo"], 0.1, 0.0),
    "orpo": (["--loss_type", "orpo"], 0.1, 0.0),
    "unlikelihood": (["--loss_type", "unlikelihood"], 1.0, 0.0),  # rewards: mean token log-probs (= β·π at β 1)
    # TR-DPO, hard copy every step, with cDPO's label smoothing: first loss log 2
    "sigmoid_trdpo": (["--loss_type", "sigmoid", "--ref_update_every", "1", "--label_smoothing", "0.2"], 2.0, 0.2),
}


@pytest.fixture(scope="module")
def loss_runs(workdir):
    """Every LOSS_RUNS entry through train_dpo.main, 2 steps each, in ONE subprocess (torch imported once,
    the suite stays fast). Returns {name: that run's stdout}."""
    argvs = []
    for name, (flags, _, _) in LOSS_RUNS.items():
        flags = [f.replace("PROMPTS", str(workdir / "prompts.jsonl")) for f in flags]
        argvs.append(dpo_args(workdir, name, *flags, data="pref8.jsonl")[2:])
    code = "import json, sys, train_dpo\nfor argv in json.loads(sys.argv[1]):\n    print('=== run', argv[argv.index('--out_dir') + 1], flush=True)\n    train_dpo.main(argv)\n"
    out = run([sys.executable, "-c", code, json.dumps(argvs)]).stdout
    chunks = out.split("=== run ")[1:]
    return {Path(c.split("\n", 1)[0]).name: c for c in chunks}


@pytest.fixture(scope="module")
def initial_pair_logps(workdir):
    """The SFT model's PairLogps on the 8 training pairs, tokenized as the script does (max_len 128)."""
    tok = Tokenizer(workdir / "sft" / "tokenizer.model")
    pairs = tokenize_preferences(load_preferences(workdir / "pref8.jsonl"), tok, 128)
    with torch.no_grad():
        return pair_logps(load_model(workdir / "sft").eval(), collate_pairs(pairs, tok.pad_id))


@pytest.mark.parametrize("name", list(LOSS_RUNS))
def test_every_loss_type_starts_at_its_closed_form_and_trains(workdir, loss_runs, initial_pair_logps, name):
    flags, beta, eps = LOSS_RUNS[name]
    loss_type = flags[1]
    stdout = loss_runs[name]
    assert f"loss {loss_type}, beta {beta}" in stdout
    if loss_type in train_dpo.REFERENCE_FREE:
        assert f"reference: none ({loss_type} is reference-free)" in stdout
        assert "reference: frozen" not in stdout
    else:
        assert "reference: frozen copy of" in stdout
    rows = logged(workdir, name)
    train = [r for r in rows if "loss" in r and "grad_norm" in r]
    assert [r["step"] for r in train] == [1, 2]
    # step 1 is all 8 pairs at the initial weights: the closed form (see expected_first_loss)
    want = expected_first_loss(loss_type, beta, eps, initial_pair_logps)
    assert train[0]["loss"] == pytest.approx(want, abs=1e-5), (name, train[0]["loss"], want)
    if loss_type in train_dpo.REFERENCE_FREE:
        avg = loss_type in preference.LENGTH_AVERAGED
        pi_c = (initial_pair_logps.chosen_logps_avg if avg else initial_pair_logps.chosen_logps).mean()
        assert train[0]["rewards/chosen"] == pytest.approx(beta * float(pi_c), abs=1e-5)
    else:
        assert abs(train[0]["rewards/chosen"]) < 1e-6 and abs(train[0]["rewards/margins"]) < 1e-6
    if name == "sigmoid_trdpo":  # the hard copy after step 1 makes policy == reference again: log 2 again
        assert train[1]["loss"] == pytest.approx(LOG2, abs=1e-5) and abs(train[1]["rewards/margins"]) < 1e-6
    else:
        assert train[1]["loss"] != train[0]["loss"]
    for r in train:
        for key in ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen", "logps/rejected", "logits/chosen"):
            assert math.isfinite(r[key]), (key, r)
    evals = [r for r in rows if "eval_logps/chosen" in r]
    assert len(evals) == 1 and math.isfinite(evals[0]["eval_rewards/margins"])
    ckpt = torch.load(workdir / name / "ckpt.pt", map_location="cpu", weights_only=False)
    sft = torch.load(workdir / "sft" / "ckpt.pt", map_location="cpu", weights_only=False)
    assert ckpt["step"] == 2 and ckpt["finished"] and ckpt["config"]["loss_type"] == loss_type
    assert any(not torch.equal(ckpt["model"][k], v) for k, v in sft["model"].items())  # the policy was updated
    if name == "sigmoid_trdpo":  # the reference followed the policy, and is checkpointed for --resume
        assert all(torch.equal(ckpt["ref_model"][k], v) for k, v in ckpt["model"].items())
    if name == "simpo":  # the gold-rule eval ran, with the SFT model loaded as the KL reference
        res = json.loads((workdir / name / "eval.json").read_text())
        assert res["n_prompts"] == 6 and math.isfinite(res["sampled/kl_to_ref"])
        assert "dpo (simpo) eval on 6 held-out prompts" in stdout


def test_precomputed_reference_gives_the_live_losses(workdir, sigmoid_run):
    proc = dpo(workdir, "precomputed", "--max_steps", "4", "--beta", "0.1", "--precompute_ref")
    assert "precomputed then freed" in proc.stdout
    live, pre = train_losses(workdir, "sigmoid"), train_losses(workdir, "precomputed")
    assert [s for s, _ in pre] == [1, 2, 3, 4]
    for (_, a), (_, b) in zip(live, pre):
        assert abs(a - b) < 1e-5
    ev_live = [r for r in logged(workdir, "sigmoid") if "eval_loss" in r][0]
    ev_pre = [r for r in logged(workdir, "precomputed") if "eval_loss" in r][0]
    assert abs(ev_live["eval_loss"] - ev_pre["eval_loss"]) < 1e-5


def test_resume_reproduces_the_loss_sequence(workdir, sigmoid_run):
    dpo(workdir, "parts", "--max_steps", "4", "--beta", "0.1", "--stop_after_steps", "2")
    assert [s for s, _ in train_losses(workdir, "parts")] == [1, 2]
    dpo(workdir, "parts", "--max_steps", "4", "--beta", "0.1", "--resume")
    assert train_losses(workdir, "parts") == train_losses(workdir, "sigmoid")  # exact, float for float
    a = torch.load(workdir / "parts" / "ckpt.pt", map_location="cpu", weights_only=False)["model"]
    b = torch.load(workdir / "sigmoid" / "ckpt.pt", map_location="cpu", weights_only=False)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_dropout_is_off_in_the_policy(workdir):
    """Issue 13: an SFT checkpoint trained with dropout 0.1. DPO disables dropout in the policy (as in the
    reference), so at step 1 policy == reference exactly and the loss is log 2 to rounding. (Before: the
    policy ran in train mode with dropout 0.1 while the reference did not: the first loss was off by ~1e-2.)"""
    ckpt = torch.load(workdir / "sft" / "ckpt.pt", map_location="cpu", weights_only=False)
    ckpt["model_config"]["dropout"] = 0.1
    drop = workdir / "sft_dropout"
    drop.mkdir(exist_ok=True)
    torch.save(ckpt, drop / "ckpt.pt")
    (drop / "tokenizer.model").write_bytes((workdir / "sft" / "tokenizer.model").read_bytes())
    run([*dpo_args(workdir, "dpo_dropout", "--max_steps", "1", "--beta", "0.1", "--pref_eval_data", ""),
         "--init_from", str(drop)])
    first = logged(workdir, "dpo_dropout")[0]
    assert abs(first["loss"] - LOG2) < 1e-6 and abs(first["rewards/margins"]) < 1e-6

