"""KTO (train_kto.py): unpaired examples and their mismatched KL rows, the step-1 loss against its closed
form, and the script run for a few steps (pairs split, unpaired data, precomputed reference, and a KL row
whose borrowed completion has to be cut to fit --max_len).

At step 1 the policy IS the reference: every implicit reward r = log π - log ref is 0, and so is the
reference point z0 = max(0, mean over the KL rows of r), so each example's loss is
    desirable:    λ_D (1 - σ(β (0 - 0))) = λ_D / 2          undesirable:  λ_U (1 - σ(0)) = λ_U / 2
whatever β and the data.

The script runs start from a tiny SFT checkpoint made in a module fixture (a tokenizer trained on the
default data, then 2 steps of train_sft.py on a 256-line slice).
"""

import copy
import json
import sys
from pathlib import Path

import pytest
import torch
from conftest import ROOT, run, tiny_model

import train_kto  # the script: its collation and loss (conftest puts the repository on sys.path)
import train_sft  # to make the tiny SFT checkpoint in-process
from minialign.algorithms.packing import collate_pairs
from minialign.algorithms.preference import (collate_completions, completion_logps, kl_partner, pair_logps,
                                             tokenize_unpaired, unpair)
from minialign.data.batching import tokenize_preferences
from minialign.data.formats import load_preferences, load_unpaired
from minialign.data.tokenizer import Tokenizer
from minialign.data.tokenizer import main as tokenizer_main
from minialign.training.checkpoint import load_model

# ------------------------------------------------------------------------------------ data and rows

def test_mismatched_pairs_never_reuse_their_own_prompt():
    pairs = [{"prompt": [i], "chosen": [10 + i], "rejected": [20 + i]} for i in range(4)]
    ex = unpair(pairs)
    assert [e["label"] for e in ex] == [True] * 4 + [False] * 4
    assert [e["completion"] for e in ex] == [[10], [11], [12], [13], [20], [21], [22], [23]]
    for i, e in enumerate(ex):
        assert ex[kl_partner(i, len(ex))]["prompt"] != e["prompt"]
    assert [kl_partner(i, 8) for i in range(8)] == [1, 2, 3, 4, 5, 6, 7, 0]  # TRL's +1 offset, wrapping
    b = collate_completions([e["prompt"] for e in ex], [e["completion"] for e in ex], 0)
    assert b["response_mask"].sum() == 8 and b["input_ids"].shape == (8, 2)


def hand_examples():
    """e0: a 6-token prompt, 2-token completion; e1: a 2-token prompt, 8-token completion (both fit 10)."""
    return [{"prompt": [10, 11, 12, 13, 14, 15], "completion": [20, 3], "label": True},
            {"prompt": [16, 17], "completion": [30, 31, 32, 33, 34, 35, 36, 3], "label": False}]


def test_kl_completion_is_cut_to_fit_max_len_and_counted():
    ex = hand_examples()
    stats = {}
    # e0 borrows e1's 8 tokens but has room for 10 - 6 = 4 of them: cut (the start kept), counted
    assert train_kto.kl_completion(ex, 0, 10, stats) == [30, 31, 32, 33]
    assert stats == {"kl_completion_truncated": 1}
    # e1 borrows e0's 2 tokens, room 10 - 2 = 8: untouched, not counted
    assert train_kto.kl_completion(ex, 1, 10, stats) == [20, 3] and stats == {"kl_completion_truncated": 1}
    # at least one token is kept even when the prompt fills max_len
    assert train_kto.kl_completion([{"prompt": [5] * 10, "completion": [6]}, ex[1]], 0, 10) == [30]


def test_collate_kto_rows_fit_max_len_where_the_uncut_rows_crash_the_model():
    """The bug the cut fixes: the KL row [prompt of e0 | completion of e1] is 6 + 8 = 14 tokens; with a
    model whose max_seq_len is max_len = 10 the uncut row (the old collate_kto, `git show HEAD:train_dpo.py`)
    crashed with "position 13 exceeds max_seq_len=10". Cut, it fits and the loss runs."""
    ex = hand_examples()
    model = tiny_model(seed=0, vocab_size=64, max_seq_len=10).double()
    batch = train_kto.collate_kto(ex, [0, 1], pad_id=0, max_len=10)
    assert batch["input_ids"].shape[1] <= 10 and batch["kl"]["input_ids"].shape[1] <= 10
    assert batch["kl"]["input_ids"].tolist() == [[10, 11, 12, 13, 14, 15, 30, 31, 32, 33], [16, 17, 20, 3, 0, 0, 0, 0, 0, 0]]
    assert batch["is_desirable"].tolist() == [True, False]
    uncut = collate_completions([e["prompt"] for e in ex], [ex[kl_partner(i, 2)]["completion"] for i in range(2)], 0)
    assert uncut["input_ids"].shape[1] == 14
    with pytest.raises(ValueError, match="position 13 exceeds max_seq_len=10"):
        completion_logps(model, uncut)
    # the loss at policy == reference: λ_D/2 for e0 + λ_U/2 for e1 = 2/2 + 3/2 = 2.5 (β is irrelevant at r = 0)
    cfg = train_kto.Config(beta=0.7, desirable_weight=2.0, undesirable_weight=3.0)
    loss_sum, sums = train_kto.kto_batch_loss(model, batch, copy.deepcopy(model), cfg)
    assert float(loss_sum.detach()) == pytest.approx(2.5, abs=1e-12)
    assert float(sums["kl"]) == 0.0 and float(sums["rewards/chosen"]) == 0.0 and float(sums["rewards/rejected"]) == 0.0
    assert (float(sums["count/chosen"]), float(sums["count/rejected"])) == (1.0, 1.0)


@pytest.mark.parametrize("beta, w_d, w_u", [(0.1, 1.0, 1.0), (2.0, 2.0, 1.0), (5.0, 1.0, 1.33)])
def test_kto_batch_loss_at_policy_equal_reference_is_half_the_weights(beta, w_d, w_u):
    """Σ over examples of λ/2 (see the module docstring): 3 desirable, 2 undesirable random examples."""
    g = torch.Generator().manual_seed(0)
    draw = lambda n: torch.randint(4, 64, (n,), generator=g).tolist()  # noqa: E731
    ex = [{"prompt": draw(p), "completion": draw(c), "label": lab}
          for p, c, lab in [(3, 4, True), (5, 2, False), (1, 6, True), (7, 1, True), (2, 3, False)]]
    model = tiny_model(seed=2, vocab_size=64).double()
    batch = train_kto.collate_kto(ex, list(range(5)), 0, max_len=16)
    loss_sum, sums = train_kto.kto_batch_loss(model, batch, copy.deepcopy(model), train_kto.Config(
        beta=beta, desirable_weight=w_d, undesirable_weight=w_u))
    assert float(loss_sum.detach()) == pytest.approx(3 * w_d / 2 + 2 * w_u / 2, abs=1e-12)
    # the logged log-probs are the policy's sums over each completion's tokens
    want = completion_logps(model, batch)[0].detach()
    assert float(sums["logps/chosen"]) == pytest.approx(float(want[batch["is_desirable"]].sum()), abs=1e-10)


def test_config_refuses_missing_data_and_dpo_flags(capsys):
    def refused(argv):
        with pytest.raises(SystemExit) as e:
            train_kto.main(argv)
        assert e.value.code == 2
        return capsys.readouterr().err
    assert "give --data (unpaired) or --pairs" in refused(["--data", "", "--pairs", ""])
    assert "--init_from is required" in refused(["--init_from", ""])
    assert "--desirable_weight=-1.0" in refused(["--desirable_weight", "-1"])
    for gone in (["--loss_type", "kto"], ["--unpaired_data", "x.jsonl"], ["--kto_desirable_weight", "1"]):
        assert f"unrecognized arguments: {' '.join(gone)}" in refused(gone)


# ----------------------------------------------------------------------------------- the script

MAX_LEN_CUT = 48


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """Tokenizer + a 2-step SFT checkpoint (made in-process), the same weights with max_seq_len 48, and data:
    8 preference pairs (= 16 examples, one step of 8 x 2), 32 unpaired examples, and the 2-example cut case."""
    d = tmp_path_factory.mktemp("kto")
    head = lambda name, n: (ROOT / "data" / name).read_text(encoding="utf-8").splitlines()[:n]  # noqa: E731
    (d / "sft.jsonl").write_text("\n".join(head("sft_train.jsonl", 256)) + "\n")
    (d / "pref8.jsonl").write_text("\n".join(head("pref_train.jsonl", 8)) + "\n")
    unpaired = [json.dumps({"prompt": p["prompt"], "completion": p[side], "label": side == "chosen"})
                for p in map(json.loads, head("pref_train.jsonl", 16)) for side in ("chosen", "rejected")]
    (d / "unpaired.jsonl").write_text("\n".join(unpaired) + "\n")
    # the cut case: e0 has a long prompt (cut to max_len // 2 = 24 tokens) and a short completion; e1 a short
    # prompt and a long completion (cut to fill its row): e0's KL row borrows e1's completion, which has
    # 48 - len(e1's prompt) > 48 - 24 tokens, more than the room left after e0's prompt
    cut = [{"prompt": "the cat sat on a mat and the dog ran " * 4, "completion": "Sure.", "label": True},
           {"prompt": "Hi", "completion": "the dog ran to help you with that please " * 6, "label": False}]
    (d / "kto_cut.jsonl").write_text("".join(json.dumps(o) + "\n" for o in cut))
    tokenizer_main(["--data", str(ROOT / "data/sft_train.jsonl"), str(ROOT / "data/pretrain.jsonl"), "--vocab_size", "512", "--out", str(d / "tok")])
    train_sft.main(["--data", str(d / "sft.jsonl"), "--eval_data", "", "--tokenizer", str(d / "tok/tokenizer.model"),
                    "--out_dir", str(d / "sft"), "--micro_batch_size", "8", "--grad_accum", "1", "--max_steps", "2"])
    ckpt = torch.load(d / "sft" / "ckpt.pt", map_location="cpu", weights_only=False)
    ckpt["model_config"]["max_seq_len"] = MAX_LEN_CUT  # the rope tables are not in the state dict: same weights
    (d / "sft48").mkdir()
    torch.save(ckpt, d / "sft48" / "ckpt.pt")
    (d / "sft48" / "tokenizer.model").write_bytes((d / "sft" / "tokenizer.model").read_bytes())
    return d


def test_tokenized_kl_rows_fit_max_len_only_when_cut(workdir):
    """The real tokenizer on the cut case: every row collate_kto builds fits max_len (and the 48-position
    model), while the uncut KL row of e0 would not."""
    tok = Tokenizer(workdir / "sft" / "tokenizer.model")
    stats = {}
    ex = tokenize_unpaired(load_unpaired(workdir / "kto_cut.jsonl"), tok, MAX_LEN_CUT, stats)
    assert stats["prompt_truncated"] == 1 and stats["response_truncated"] == 1
    assert len(ex[0]["prompt"]) == MAX_LEN_CUT // 2 and len(ex[1]["prompt"]) + len(ex[1]["completion"]) == MAX_LEN_CUT
    assert len(ex[0]["prompt"]) + len(ex[1]["completion"]) > MAX_LEN_CUT  # the uncut KL row of e0
    batch = train_kto.collate_kto(ex, [0, 1], tok.pad_id, MAX_LEN_CUT)
    assert batch["input_ids"].shape[1] <= MAX_LEN_CUT and batch["kl"]["input_ids"].shape[1] == MAX_LEN_CUT
    model = load_model(workdir / "sft48").eval()
    assert model.cfg.max_seq_len == MAX_LEN_CUT
    with torch.no_grad():
        assert torch.isfinite(completion_logps(model, batch["kl"])[0]).all()


def kto_args(workdir, out, *extra, init="sft"):
    return [sys.executable, str(ROOT / "train_kto.py"), "--init_from", str(workdir / init), "--eval_data", "",
            "--out_dir", str(workdir / out), "--micro_batch_size", "8", "--max_steps", "2", "--warmup_steps", "1",
            "--lr", "1e-3", "--log_every", "1", *extra]


KTO_RUNS = {  # run name -> flags (DATA = the work folder)
    # 8 pairs split = 16 examples (8 desirable, 8 undesirable) = one step of 8 x 2: step 1 is all of them
    "pairs": ["--pairs", "DATA/pref8.jsonl", "--grad_accum", "2", "--desirable_weight", "2"],
    "pairs_pre": ["--pairs", "DATA/pref8.jsonl", "--grad_accum", "2", "--desirable_weight", "2", "--precompute_ref"],
    "unpaired": ["--data", "DATA/unpaired.jsonl"],
    # a model with max_seq_len == max_len: the uncut KL row crashed it ("position ... exceeds max_seq_len")
    "cut": ["--init_from", "DATA/sft48", "--data", "DATA/kto_cut.jsonl", "--max_len", str(MAX_LEN_CUT),
            "--micro_batch_size", "2", "--max_steps", "1"],
}


@pytest.fixture(scope="module")
def kto_runs(workdir):
    """Every KTO_RUNS entry through train_kto.main in ONE subprocess (torch imported once). {name: stdout}."""
    argvs = [kto_args(workdir, name, *[f.replace("DATA", str(workdir)) for f in flags])[2:] for name, flags in KTO_RUNS.items()]
    code = "import json, sys, train_kto\nfor argv in json.loads(sys.argv[1]):\n    print('=== run', argv[argv.index('--out_dir') + 1], flush=True)\n    train_kto.main(argv)\n"
    out = run([sys.executable, "-c", code, json.dumps(argvs)]).stdout
    return {Path(c.split("\n", 1)[0]).name: c for c in out.split("=== run ")[1:]}


def logged(workdir, out):
    return [json.loads(line) for line in (workdir / out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("name", ["pairs", "pairs_pre", "unpaired"])
def test_kto_runs_start_at_the_closed_form_and_train(workdir, kto_runs, name):
    stdout = kto_runs[name]
    assert "reference: frozen copy" in stdout
    train = [r for r in logged(workdir, name) if "loss" in r]
    assert [r["step"] for r in train] == [1, 2]
    first = train[0]
    if name == "unpaired":
        assert "data: 32 examples (16 desirable, 16 undesirable)" in stdout
        assert first["loss"] == pytest.approx(0.5, abs=1e-6)  # λ_D = λ_U = 1: every example 1/2, whichever 8
    else:
        assert "data: 16 examples (8 desirable, 8 undesirable)" in stdout and "(pairs split)" in stdout
        assert first["loss"] == pytest.approx((8 * 2 / 2 + 8 * 1 / 2) / 16, abs=1e-6)  # λ_D = 2, λ_U = 1: 0.75
    for key in ("kl", "rewards/chosen", "rewards/rejected", "rewards/margins"):
        assert abs(first[key]) < 1e-6, key
    for r in train:
        for key in ("loss", "kl", "rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen",
                    "logps/rejected", "logits/chosen", "grad_norm"):
            assert key in r and r[key] == r[key], (key, r)  # present and not NaN
    assert train[1]["loss"] != first["loss"]
    ckpt = torch.load(workdir / name / "ckpt.pt", map_location="cpu", weights_only=False)
    sft = torch.load(workdir / "sft" / "ckpt.pt", map_location="cpu", weights_only=False)
    assert ckpt["step"] == 2 and ckpt["finished"] and ckpt["config"]["beta"] == 2.0
    assert any(not torch.equal(ckpt["model"][k], v) for k, v in sft["model"].items())  # the policy was updated


def test_kto_step_one_logps_are_the_initial_models(workdir, kto_runs):
    """logps/chosen at step 1 = the mean over the 8 desirable examples (the chosen responses) of the SFT
    model's summed log-probs, computed here through the pair path (G = 2) instead of KTO's rows (G = 1)."""
    tok = Tokenizer(workdir / "sft" / "tokenizer.model")
    pairs = tokenize_preferences(load_preferences(workdir / "pref8.jsonl"), tok, 128)
    with torch.no_grad():
        pl = pair_logps(load_model(workdir / "sft").eval(), collate_pairs(pairs, tok.pad_id))
    first = logged(workdir, "pairs")[0]
    assert first["logps/chosen"] == pytest.approx(float(pl.chosen_logps.mean()), abs=1e-4)
    assert first["logps/rejected"] == pytest.approx(float(pl.rejected_logps.mean()), abs=1e-4)


def test_precomputed_reference_gives_the_live_losses(workdir, kto_runs):
    assert "precomputed then freed" in kto_runs["pairs_pre"]
    live = [(r["step"], r["loss"], r["kl"]) for r in logged(workdir, "pairs") if "loss" in r]
    pre = [(r["step"], r["loss"], r["kl"]) for r in logged(workdir, "pairs_pre") if "loss" in r]
    assert [s for s, _, _ in pre] == [1, 2]
    for (_, a, kl_a), (_, b, kl_b) in zip(live, pre):
        assert abs(a - b) < 1e-5 and abs(kl_a - kl_b) < 1e-5


def test_borrowed_completion_longer_than_the_room_is_cut_and_the_run_succeeds(workdir, kto_runs):
    """--max_len 48 with a model of max_seq_len 48: e0's KL row borrows e1's too-long completion; it is cut to
    fit (1 cut, counted in the data line) and the step runs (before the cut it crashed)."""
    stdout = kto_runs["cut"]
    assert "1 borrowed KL completions (max_len=48)" in stdout
    (row,) = [r for r in logged(workdir, "cut") if "loss" in r]
    assert row["step"] == 1 and row["loss"] == pytest.approx(0.5, abs=1e-6)  # 1 desirable, 1 undesirable, λ = 1
    assert torch.load(workdir / "cut" / "ckpt.pt", map_location="cpu", weights_only=False)["finished"]


def test_without_the_cut_the_same_run_crashes(workdir, tmp_path, monkeypatch):
    """The cut case has teeth: with the old, uncut KL completion (HEAD's collate_kto) the same run dies on
    the 48-position model."""
    uncut = lambda examples, i, max_len, stats=None: examples[kl_partner(i, len(examples))]["completion"]  # noqa: E731
    monkeypatch.setattr(train_kto, "kl_completion", uncut)
    argv = kto_args(workdir, tmp_path / "uncut", *[f.replace("DATA", str(workdir)) for f in KTO_RUNS["cut"]])[2:]
    with pytest.raises(ValueError, match=rf"position \d+ exceeds max_seq_len={MAX_LEN_CUT}"):
        train_kto.main(argv)


def test_collate_kto_never_exceeds_max_len_on_random_examples():
    """Examples shaped as tokenize_unpaired makes them (prompt <= max_len // 2, prompt + completion <= max_len):
    every main row and every KL row fits max_len, and each KL completion is a non-empty prefix of the partner's."""
    g = torch.Generator().manual_seed(3)
    rand = lambda lo, hi: int(torch.randint(lo, hi + 1, (1,), generator=g))  # noqa: E731
    max_len, ex = 16, []
    for i in range(20):
        P = rand(1, max_len // 2)
        ex.append({"prompt": [4 + i] * P, "completion": [40 + i] * rand(1, max_len - P), "label": i % 3 == 0})
    stats = {}
    for i in range(20):
        kl = train_kto.kl_completion(ex, i, max_len, stats)
        partner = ex[kl_partner(i, 20)]["completion"]
        assert 1 <= len(kl) and kl == partner[: len(kl)] and len(ex[i]["prompt"]) + len(kl) <= max_len
    assert stats["kl_completion_truncated"] > 0  # the draw has cuts, so the check has teeth
    for idx in ([0, 1, 2, 3, 4], list(range(5, 20))):
        batch = train_kto.collate_kto(ex, idx, 0, max_len)
        assert batch["input_ids"].shape[1] <= max_len and batch["kl"]["input_ids"].shape[1] <= max_len
