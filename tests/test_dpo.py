"""DPO: the two pair layouts (masks, shift, parity), and train_dpo.py run for a few steps per loss type.

The script runs use a tiny SFT checkpoint made in a module fixture (a tokenizer trained on the default
data, then 2 steps of train_sft.py on a 256-line slice) and 64-pair slices of the preference data.
"""

import json
import math
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import tiny_model
from minialign.losses import IGNORE_INDEX
from minialign.tokenizer import main as tokenizer_main
from minialign.preference import (collate_completions, collate_pairs_shared_prompt, collate_pairs_two_rows, kl_partner,
                                  pair_logps, unpair)

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import train_dpo  # noqa: E402  (the script, for its config checks)
import train_sft  # noqa: E402  (to make the tiny SFT checkpoint in-process)


def random_pairs(n, vocab, seed):
    """Pairs with prompt, chosen and rejected lengths all different from pair to pair."""
    rng = random.Random(seed)
    draw = lambda lo, hi: [rng.randrange(4, vocab) for _ in range(rng.randint(lo, hi))]  # noqa: E731
    return [{"prompt": draw(1, 12), "chosen": draw(1, 9), "rejected": draw(1, 9)} for _ in range(n)]


# --------------------------------------------------------------------------------------- layouts

def test_two_rows_mask_covers_exactly_the_response_tokens():
    pair = {"prompt": [5, 6, 7], "chosen": [8, 9, 3], "rejected": [10, 3]}
    b = collate_pairs_two_rows([pair], pad_id=0)
    # rows: [5 6 7 8 9 3] and [5 6 7 10 3 0]; shifted by one: inputs drop the last column, labels the first
    assert b["inputs"].tolist() == [[5, 6, 7, 8, 9], [5, 6, 7, 10, 3]]
    assert b["label_mask"].tolist() == [[False, False, True, True, True], [False, False, True, True, False]]
    assert b["labels"][b["label_mask"]].tolist() == [8, 9, 3, 10, 3]  # chosen then rejected, <|im_end|> (3) included
    assert (b["labels"][~b["label_mask"]] == IGNORE_INDEX).all()


def test_shared_prompt_layout_matches_the_docstring_diagram():
    pair = {"prompt": [11, 12, 13], "chosen": [21, 22], "rejected": [31, 32, 33]}
    short = {"prompt": [11], "chosen": [21], "rejected": [31]}
    b = collate_pairs_shared_prompt([pair, short], pad_id=0)
    assert b["input_ids"][0].tolist() == [11, 12, 13, 21, 22, 31, 32, 33]
    assert b["position_ids"][0].tolist() == [0, 1, 2, 3, 4, 3, 4, 5]  # rejected restarts at P = 3
    L = IGNORE_INDEX
    # c0 from the last prompt column 2; r0 ALSO from column 2 (not from column 4, the last chosen token)
    assert b["chosen_labels"][0].tolist() == [L, L, 21, 22, L, L, L, L]
    assert b["rejected_labels"][0].tolist() == [L, L, 31, L, L, 32, 33, L]
    mask = b["attention_mask"][0].int()
    assert mask[5].tolist() == [1, 1, 1, 0, 0, 1, 0, 0]  # r0 sees the prompt and itself, never c0, c1
    assert mask[4].tolist() == [1, 1, 1, 1, 1, 0, 0, 0]  # c1: prompt, c0, itself
    # the short row: [11 21 31] then pads, which see only themselves
    assert b["rejected_labels"][1].tolist()[:1] == [31] and b["chosen_labels"][1].tolist()[:1] == [21]
    assert b["attention_mask"][1, 5].int().tolist() == [0, 0, 0, 0, 0, 1, 0, 0]
    assert b["attention_mask"][1, 2].int().tolist() == [1, 0, 1, 0, 0, 0, 0, 0]


@pytest.mark.parametrize("dtype, atol", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
def test_shared_prompt_logps_and_gradients_equal_the_two_row_forward(dtype, atol):
    """The packed [prompt | chosen | rejected] row gives the plain layout's log-probs (and gradients)."""
    model = tiny_model(seed=3, vocab_size=64).to(dtype)
    pairs = random_pairs(7, 64, seed=1)
    plain = pair_logps(model, collate_pairs_two_rows(pairs, 0), "two_rows")
    packed = pair_logps(model, collate_pairs_shared_prompt(pairs, 0), "shared_prompt")
    for name in ("chosen_logps", "rejected_logps", "chosen_logps_avg", "rejected_logps_avg", "chosen_logits_mean", "rejected_logits_mean"):
        torch.testing.assert_close(getattr(packed, name), getattr(plain, name), atol=atol, rtol=0, msg=name)
    assert plain.chosen_logps.shape == (7,) and (plain.chosen_logps < 0).all()
    grads = []
    for out in (plain, packed):
        model.zero_grad()
        (out.chosen_logps.sum() - 2 * out.rejected_logps.sum()).backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for g_plain, g_packed in zip(*grads):
        torch.testing.assert_close(g_packed, g_plain, atol=atol * 10, rtol=1e-4)


def test_pair_logps_sum_response_tokens_only():
    """Against a naive full log-softmax over each row: Σ over response positions, prompt excluded."""
    model = tiny_model(seed=0, vocab_size=64).double()
    pairs = random_pairs(3, 64, seed=2)
    out = pair_logps(model, collate_pairs_two_rows(pairs, 0), "two_rows")
    for b, p in enumerate(pairs):
        for side, got in (("chosen", out.chosen_logps[b]), ("rejected", out.rejected_logps[b])):
            ids = torch.tensor([p["prompt"] + p[side]])
            logp = model(ids[:, :-1]).log_softmax(-1)[0]  # (T-1, V)
            P = len(p["prompt"])
            want = sum(logp[P - 1 + j, tok] for j, tok in enumerate(p[side]))
            torch.testing.assert_close(got, want, atol=1e-10, rtol=0)
    torch.testing.assert_close(out.chosen_nll, -out.chosen_logps / torch.tensor([len(p["chosen"]) for p in pairs]))


def test_kto_mismatched_pairs_never_reuse_their_own_prompt():
    pairs = [{"prompt": [i], "chosen": [10 + i], "rejected": [20 + i]} for i in range(4)]
    ex = unpair(pairs)
    assert [e["label"] for e in ex] == [True] * 4 + [False] * 4
    for i, e in enumerate(ex):
        assert ex[kl_partner(i, len(ex))]["prompt"] != e["prompt"]
    b = collate_completions([e["prompt"] for e in ex], [e["completion"] for e in ex], 0)
    assert b["label_mask"].sum() == 8


def test_config_refuses_unsupported_combinations():
    with pytest.raises(SystemExit, match="reference-free"):
        train_dpo.main(["--loss_type", "simpo", "--precompute_ref"])
    with pytest.raises(SystemExit, match="--loss_type kto only"):
        train_dpo.main(["--unpaired_data", "x.jsonl"])
    with pytest.raises(SystemExit, match="loss_type='nope'"):
        train_dpo.main(["--loss_type", "nope"])


# ----------------------------------------------------------------------------------- the script

def run(args, timeout=240):
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    proc = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(map(str, args))} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """Tokenizer + a 2-step SFT checkpoint (both made in-process) + slices of the preference and prompt files."""
    d = tmp_path_factory.mktemp("dpo")
    head = lambda name, n: (ROOT / "data" / name).read_text(encoding="utf-8").splitlines()[:n]  # noqa: E731
    (d / "sft.jsonl").write_text("\n".join(head("sft_train.jsonl", 256)) + "\n")
    (d / "pref.jsonl").write_text("\n".join(head("pref_train.jsonl", 64)) + "\n")
    (d / "pref_eval.jsonl").write_text("\n".join(head("pref_eval.jsonl", 16)) + "\n")
    (d / "prompts.jsonl").write_text("\n".join(head("rl_eval.jsonl", 6)) + "\n")
    unpaired = [json.dumps({"prompt": p["prompt"], "completion": p[side], "label": side == "chosen"})
                for p in map(json.loads, head("pref_train.jsonl", 16)) for side in ("chosen", "rejected")]
    (d / "unpaired.jsonl").write_text("\n".join(unpaired) + "\n")
    tokenizer_main(["--data", str(ROOT / "data/sft_train.jsonl"), str(ROOT / "data/pretrain.jsonl"), "--vocab_size", "512", "--out", str(d / "tok")])
    train_sft.main(["--data", str(d / "sft.jsonl"), "--eval_data", "", "--tokenizer", str(d / "tok/tokenizer.model"),
                    "--out_dir", str(d / "sft"), "--micro_batch_size", "8", "--grad_accum", "1", "--max_steps", "2"])
    return d


def dpo_args(workdir, out, *extra):
    return [sys.executable, str(ROOT / "train_dpo.py"), "--init_from", str(workdir / "sft"), "--data", str(workdir / "pref.jsonl"),
                "--pref_eval_data", str(workdir / "pref_eval.jsonl"), "--eval_data", "", "--out_dir", str(workdir / out),
                "--micro_batch_size", "8", "--max_steps", "2", "--warmup_steps", "1", "--lr", "1e-3", "--log_every", "1", *extra]


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
    assert abs(first["loss"] - math.log(2)) < 1e-6
    assert abs(first["rewards/chosen"]) < 1e-6 and abs(first["rewards/margins"]) < 1e-6
    last = train_losses(workdir, "sigmoid")[-1]
    assert last[0] == 4 and last[1] < math.log(2)  # and it moves: margins grow on the training pairs


LOSS_RUNS = {  # run name -> flags; a few use the plain two-row layout so both layouts run in the script
    "ipo": ["--loss_type", "ipo", "--layout", "two_rows"],
    "hinge": ["--loss_type", "hinge"],
    "robust": ["--loss_type", "robust", "--label_smoothing", "0.1"],
    "simpo": ["--loss_type", "simpo", "--eval_data", "PROMPTS", "--eval_prompts", "6", "--max_new_tokens", "6"],
    "cpo": ["--loss_type", "cpo", "--layout", "two_rows"],
    "orpo": ["--loss_type", "orpo"],
    "kto": ["--loss_type", "kto"],
    "kto_unpaired": ["--loss_type", "kto", "--unpaired_data", "UNPAIRED"],
    "sigmoid_trdpo": ["--loss_type", "sigmoid", "--ref_update_every", "1"],  # TR-DPO, hard copy every step
}


@pytest.fixture(scope="module")
def loss_runs(workdir):
    """Every LOSS_RUNS entry through train_dpo.main, 2 steps each, in ONE subprocess (torch imported once,
    the suite stays fast). Returns {name: that run's stdout}."""
    argvs = []
    for name, flags in LOSS_RUNS.items():
        flags = [f.replace("PROMPTS", str(workdir / "prompts.jsonl")).replace("UNPAIRED", str(workdir / "unpaired.jsonl")) for f in flags]
        argvs.append(dpo_args(workdir, name, *flags)[2:])
    code = "import json, sys, train_dpo\nfor argv in json.loads(sys.argv[1]):\n    print('=== run', argv[argv.index('--out_dir') + 1], flush=True)\n    train_dpo.main(argv)\n"
    out = run([sys.executable, "-c", code, json.dumps(argvs)]).stdout
    chunks = out.split("=== run ")[1:]
    return {Path(c.split("\n", 1)[0]).name: c for c in chunks}


@pytest.mark.parametrize("name", list(LOSS_RUNS))
def test_every_loss_type_trains(workdir, loss_runs, name):
    loss_type = LOSS_RUNS[name][1]
    stdout = loss_runs[name]
    if loss_type in train_dpo.REFERENCE_FREE:
        assert f"reference: none ({loss_type} is reference-free)" in stdout
        assert "reference: frozen" not in stdout
    else:
        assert "reference: frozen copy of" in stdout
    rows = logged(workdir, name)
    train = [r for r in rows if "loss" in r and "grad_norm" in r]
    assert [r["step"] for r in train] == [1, 2]
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
    if name == "kto_unpaired":
        assert "32 kto examples (16 desirable, 16 undesirable)" in stdout
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
