"""Reward model: pair collation, reading the score at <|im_end|>, scoring with the training tokenization
and truncation, the per-pair loss normalization, train_rm.py in subprocesses (learning, outputs, exact
resume, torchrun) and the scoring CLI (minialign.algorithms.reward_model).

Packed pairs vs plain rows (the rewards and their gradients) are tested with the other stages' layouts in
tests/test_packing.py.

The script runs start from a tiny SFT checkpoint made in a module fixture (a tokenizer trained on
data slices + train_sft.py for 2 steps), and train on the harmful-request pairs of the default task
(chosen = a refusal, rejected = compliance): separable from the response alone, so 12 steps suffice.
"""

import json
import re
import sys
from pathlib import Path

import pytest
import torch
from conftest import ROOT, run, tiny_config

import train_rm  # the script: its loss and margin check (conftest puts the repository on sys.path)
from minialign.algorithms import reward_model
from minialign.algorithms.losses import bradley_terry_loss
from minialign.algorithms.packing import collate_pairs
from minialign.algorithms.reward_model import (pair_metrics, pair_rewards, score_ids, score_pairs, score_responses,
                                               tokenize_response)
from minialign.data.batching import tokenize_preferences
from minialign.data.formats import DataError, PreferencePair
from minialign.models.decoder import ScalarModel


def tiny_rm(vocab_size=96, seed=0):
    torch.manual_seed(seed)
    return ScalarModel(tiny_config(vocab_size)).eval()


# ------------------------------------------------------------------------------------- collation

def test_collate_pairs_rows_mask_and_last_positions():
    examples = [
        {"prompt": [5, 6], "chosen": [7, 3], "rejected": [8, 9, 3], "kind": "x"},
        {"prompt": [5], "chosen": [7, 7, 7, 3], "rejected": [3]},
    ]
    b = collate_pairs(examples, pad_id=0)
    # one packed row [x | y_c | y_r] per pair; T = 7 (the longest: 2 + 2 + 3); extra fields ("kind") ignored
    assert b["input_ids"].tolist() == [
        [5, 6, 7, 3, 8, 9, 3],
        [5, 7, 7, 7, 3, 3, 0],
    ]
    assert b["position_ids"].tolist() == [[0, 1, 2, 3, 2, 3, 4], [0, 1, 2, 3, 4, 1, 0]]  # y_r restarts after x
    assert b["attention_mask"].dtype == torch.bool and b["attention_mask"].shape == (2, 7, 7)
    assert b["attention_mask"][0, 4].int().tolist() == [1, 1, 0, 0, 1, 0, 0]  # y_r's first token: x and itself
    assert "margin" not in b
    # each response's last token is its <|im_end|> (id 3): flat indices 3, 6 (row 0) and 7 + 4, 7 + 5 (row 1)
    assert b["last"].tolist() == [3, 6, 11, 12] and b["input_ids"].flatten()[b["last"]].tolist() == [3, 3, 3, 3]
    scores = torch.arange(14, dtype=torch.float32).view(2, 7)  # score = 7 * row + column
    chosen, rejected = pair_rewards(lambda ids, attention_mask=None, position_ids=None: scores, b)
    assert chosen.tolist() == [3.0, 11.0] and rejected.tolist() == [6.0, 12.0]


def test_collate_pairs_margin_all_or_none():
    examples = [{"prompt": [5], "chosen": [7, 3], "rejected": [3], "margin": 2},
                {"prompt": [5], "chosen": [3], "rejected": [8, 3], "margin": 0.5}]
    b = collate_pairs(examples, pad_id=0)
    assert b["margin"].dtype == torch.float32 and b["margin"].tolist() == [2.0, 0.5]
    with pytest.raises(ValueError, match="1 of 2 pairs have a 'margin'"):
        collate_pairs([examples[0], {"prompt": [5], "chosen": [3], "rejected": [8, 3]}], pad_id=0)


def test_check_margins_names_the_file():
    with pytest.raises(DataError, match=r"p.jsonl: 1 of 2 pairs have a 'margin' field"):
        train_rm.check_margins([{"margin": 1.0}, {}], "p.jsonl")
    with pytest.raises(DataError, match=r"p.jsonl: field 'margin' must be a number; loaded pair 2 has 'big'"):
        train_rm.check_margins([{"margin": 1.0}, {"margin": "big"}], "p.jsonl")
    train_rm.check_margins([{"margin": 1}, {"margin": -0.5}], "p.jsonl")  # fine
    train_rm.check_margins([{}, {}], "p.jsonl")


def test_train_rm_refuses_the_removed_layout_flag(capsys):
    """One layout now (packed pairs): --layout is an unknown flag, an argparse error naming it (exit 2)."""
    with pytest.raises(SystemExit) as e:
        train_rm.main(["--layout", "two_rows"])
    assert e.value.code == 2 and "unrecognized arguments: --layout two_rows" in capsys.readouterr().err


# --------------------------------------------------------------------------- score at <|im_end|>

def test_score_is_read_at_im_end_not_at_a_pad():
    """A right-padded packed row gets the scores of the same pair alone, read at each response's <|im_end|>."""
    model = tiny_rm()
    short = {"prompt": [5, 6, 7], "chosen": [8, 9, 3], "rejected": [10, 3]}
    long = {"prompt": [5, 6, 7, 11, 12, 13], "chosen": [14, 15, 16, 17, 3], "rejected": [18, 19, 20, 21, 22, 23, 3]}
    with torch.no_grad():
        alone_c, alone_r = pair_rewards(model, collate_pairs([short], pad_id=0))
        both = collate_pairs([short, long], pad_id=0)
        padded_c, padded_r = pair_rewards(model, both)
        full_scores = model(both["input_ids"], both["attention_mask"], both["position_ids"])  # (2, 18)
    # the short row [5 6 7 | 8 9 3 | 10 3] is padded from column 8 to 18 (6 + 5 + 7)
    assert both["input_ids"].shape == (2, 18) and both["input_ids"][0, 8:].eq(0).all()
    torch.testing.assert_close(padded_c[0], alone_c[0], rtol=0, atol=1e-6)
    torch.testing.assert_close(padded_r[0], alone_r[0], rtol=0, atol=1e-6)
    # the values read are the scores at the <|im_end|>s (columns 5 and 7 of row 0), not at the row's last column (a pad)
    assert both["input_ids"][0, 5] == 3 and both["input_ids"][0, 7] == 3
    assert padded_c[0] == full_scores[0, 5] and padded_r[0] == full_scores[0, 7]
    assert abs(float(full_scores[0, -1] - full_scores[0, 7])) > 1e-4


def test_score_responses_tokenizes_like_training(tok):
    """score_responses builds the exact rows tokenize_preferences builds, so it gives the training reward."""
    prompt = [{"role": "user", "content": "What is 7 + 8?"}]
    pair = PreferencePair(prompt, [{"role": "assistant", "content": "7 + 8 = 15."}], [{"role": "assistant", "content": "12"}])
    (ex,) = tokenize_preferences([pair], tok, max_len=64)
    assert tokenize_response(tok, prompt, "7 + 8 = 15.", 64) == (ex["prompt"], ex["chosen"])
    assert tokenize_response(tok, prompt, "12", 64) == (ex["prompt"], ex["rejected"])
    assert ex["chosen"][-1] == tok.im_end_id
    # truncation follows the same policy (prompt keeps its end, the response its start)
    long_pair = PreferencePair([{"role": "user", "content": "the cat sat " * 20}], pair.chosen, [{"role": "assistant", "content": "dog " * 30}])
    (cut,) = tokenize_preferences([long_pair], tok, max_len=24)
    assert tokenize_response(tok, long_pair.prompt, "dog " * 30, 24) == (cut["prompt"], cut["rejected"])
    model = tiny_rm(tok.vocab_size)
    scores = score_responses(model, tok, ["What is 7 + 8?", prompt], ["7 + 8 = 15.", "12"], max_len=64)
    chosen, rejected = score_pairs(model, [ex], tok.pad_id)
    assert scores == pytest.approx([chosen[0], rejected[0]], abs=1e-6)


def test_score_responses_truncates_like_training(tok):
    """A prompt and a response too long for max_len = 24: score_responses scores the row training would
    have scored (tokenize_preferences' cut: the prompt's last 12 tokens, the response's first 24 - 12), so
    its reward is the one score_pairs gives the truncated pair; and the cut matters (the whole row scores
    differently). max_len defaults to the model's max_seq_len."""
    prompt, response = "the cat sat " * 8, "dog ran to help " * 5
    long_pair = PreferencePair([{"role": "user", "content": prompt}], [{"role": "assistant", "content": response}],
                               [{"role": "assistant", "content": "sure"}])
    stats = {}
    (cut,) = tokenize_preferences([long_pair], tok, max_len=24, stats=stats)
    assert stats["prompt_truncated"] == 1 and stats["response_truncated"] == 1
    assert len(cut["prompt"]) == 12 and len(cut["chosen"]) == 12 and cut["chosen"][-1] != tok.im_end_id  # cut off
    model = tiny_rm(tok.vocab_size)
    (score,) = score_responses(model, tok, [prompt], [response], max_len=24)
    chosen, _ = score_pairs(model, [cut], tok.pad_id)
    assert score == pytest.approx(chosen[0], abs=1e-6)
    assert score_ids(model, [cut["prompt"]], [cut["chosen"]], tok.pad_id) == pytest.approx([score], abs=1e-6)
    whole_prompt, whole_response = tokenize_response(tok, long_pair.prompt, response, 10_000)  # no cut at all
    assert len(whole_prompt) > 12 and len(whole_response) > 12
    assert abs(score_ids(model, [whole_prompt], [whole_response], tok.pad_id)[0] - score) > 1e-4
    torch.manual_seed(0)
    model_24 = ScalarModel(tiny_config(tok.vocab_size, max_seq_len=24)).eval()  # no max_len: the model's 24
    assert score_responses(model_24, tok, [prompt], [response]) == \
        pytest.approx(score_responses(model_24, tok, [prompt], [response], max_len=24), abs=0)


# -------------------------------------------------------------------------------- loss and metrics

def test_rm_loss_summed_over_pairs_is_the_step_mean():
    """rm_loss returns a per-pair SUM (log-sigmoid and centering terms): summed over micro-batches and
    divided by the pair count, it equals bradley_terry_loss's mean over the whole batch."""
    model = tiny_rm()
    g = torch.Generator().manual_seed(1)
    examples = [{"prompt": torch.randint(4, 96, (int(n),), generator=g).tolist(),
                 "chosen": torch.randint(4, 96, (int(c),), generator=g).tolist() + [3],
                 "rejected": torch.randint(4, 96, (int(r),), generator=g).tolist() + [3],
                 "margin": float(m)}
                for n, c, r, m in zip([3, 5, 2, 4, 6], [1, 4, 2, 6, 3], [5, 1, 3, 2, 2], [0.0, 1.0, 0.5, 2.0, 0.0])]
    with torch.no_grad():
        whole = collate_pairs(examples, pad_id=0)
        r_c, r_r = pair_rewards(model, whole)
        expected = bradley_terry_loss(r_c, r_r, whole["margin"], center_coef=0.1)
        seen = []
        parts = [train_rm.rm_loss(model, collate_pairs(mb, 0), 0.1, seen) for mb in (examples[:2], examples[2:])]
    total = sum(loss for loss, _ in parts)
    torch.testing.assert_close(total / 5, expected, rtol=1e-5, atol=1e-6)
    # the summed metrics become means over pairs once divided by the count
    acc = sum(float(m["accuracy"]) for _, m in parts) / 5
    assert acc == pytest.approx(float((r_c > r_r).float().mean()))
    assert sum(float(m["mean_reward"]) for _, m in parts) / 5 == pytest.approx(float(torch.cat([r_c, r_r]).mean()), abs=1e-5)
    assert torch.cat(seen).shape == (10,)
    # without the factor B (a mean per micro-batch) the sum would be wrong: 2/5 + 3/5 weighting differs
    means = [loss / n for (loss, _), n in zip(parts, (2, 3))]
    assert abs(float(sum(means) / 2 - expected)) > 1e-4


def test_pair_metrics_hand_computed():
    m = pair_metrics([2.0, 0.0, 1.0], [1.0, 0.5, 1.0])
    # accuracy: 2 > 1 yes, 0 > 0.5 no, 1 > 1 no (a tie counts as wrong) -> 1/3
    assert m["accuracy"] == pytest.approx(1 / 3)
    assert m["margin"] == pytest.approx((1.0 - 0.5 + 0.0) / 3)
    assert m["mean_reward"] == pytest.approx(5.5 / 6)
    assert (m["min_reward"], m["max_reward"]) == (0.0, 2.0)
    assert m["rewards/chosen"] == pytest.approx(1.0) and m["rewards/rejected"] == pytest.approx(2.5 / 3)


def test_histogram_is_skipped_without_matplotlib(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` raise ImportError
    assert reward_model.save_histogram([1.0, 2.0], [0.0, 0.5], tmp_path / "h.png") is False
    assert not (tmp_path / "h.png").exists()


# ---------------------------------------------------------------------------------- train_rm.py

def harmful_slice(src: str, dst: Path, n: int):
    lines = [l for l in (ROOT / "data" / src).read_text(encoding="utf-8").splitlines() if '"kind":"harmful"' in l][:n]
    dst.write_text("\n".join(lines) + "\n", encoding="utf-8")


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A tiny SFT checkpoint (tokenizer on data slices, train_sft.py for 2 steps) and harmful-pair slices."""
    d = tmp_path_factory.mktemp("rm")
    sft_lines = (ROOT / "data/sft_train.jsonl").read_text(encoding="utf-8").splitlines()[:256]
    (d / "sft.jsonl").write_text("\n".join(sft_lines) + "\n", encoding="utf-8")
    harmful_slice("pref_train.jsonl", d / "pref_train.jsonl", 256)
    harmful_slice("pref_eval.jsonl", d / "pref_eval.jsonl", 48)
    run([sys.executable, "-m", "minialign.data.tokenizer", "--data", str(d / "sft.jsonl"), str(d / "pref_train.jsonl"),
         "--vocab_size", "384", "--out", str(d / "tok")])
    run([sys.executable, str(ROOT / "train_sft.py"), "--data", str(d / "sft.jsonl"), "--eval_data", "", "--tokenizer",
         str(d / "tok/tokenizer.model"), "--out_dir", str(d / "sft"), "--micro_batch_size", "8", "--grad_accum", "1",
         "--max_steps", "2", "--warmup_steps", "1"])
    return d


def rm_args(d, out, *extra):
    return [sys.executable, str(ROOT / "train_rm.py"), "--init_from", str(d / "sft"), "--data", str(d / "pref_train.jsonl"),
            "--eval_data", str(d / "pref_eval.jsonl"), "--out_dir", str(out), "--micro_batch_pairs", "8", "--grad_accum", "2",
            "--max_steps", "12", "--lr", "1e-3", "--warmup_steps", "3", "--eval_every", "4", "--log_every", "1", *extra]


def metrics(out):
    return [json.loads(l) for l in (Path(out) / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def rm_run(workdir):
    out = workdir / "rm_full"
    proc = run(rm_args(workdir, out))
    return out, proc


def test_train_rm_learns_and_writes_its_outputs(rm_run):
    out, proc = rm_run
    ckpt = torch.load(out / "ckpt.pt", map_location="cpu", weights_only=False)
    assert ckpt["model_kind"] == "scalar" and ckpt["step"] == 12 and ckpt["finished"]
    assert "score_head.weight" in ckpt["model"]
    rows = metrics(out)
    train = [r for r in rows if "loss" in r]
    assert [r["step"] for r in train] == list(range(1, 13))
    for key in ("loss", "accuracy", "margin", "mean_reward", "min_reward", "max_reward", "rewards/chosen", "rewards/rejected",
                "grad_norm", "learning_rate"):
        assert key in train[0], key
    assert all(r["min_reward"] <= r["mean_reward"] <= r["max_reward"] for r in train)
    evals = [r for r in rows if "eval_accuracy" in r]
    assert [r["step"] for r in evals] == [4, 8, 12]
    for key in ("eval_loss", "eval_margin", "eval_mean_reward", "eval_min_reward", "eval_max_reward"):
        assert key in evals[-1], key
    # a separable problem. At step 1 the fresh head scores chosen and rejected alike (margin ~0, loss ln 2,
    # accuracy 0.69 with this seed); after 12 steps the held-out pairs are ranked right by a wide margin.
    assert train[0]["loss"] == pytest.approx(0.693, abs=0.01) and abs(train[0]["margin"]) < 0.05
    assert train[0]["accuracy"] < 0.9 <= evals[-1]["eval_accuracy"]
    assert evals[-1]["eval_loss"] < 0.1 and evals[-1]["eval_margin"] > 3
    scores = json.loads((out / "rm_scores.json").read_text())
    assert scores["step"] == 12 and len(scores["chosen"]) == len(scores["rejected"]) == 48
    assert scores["eval_accuracy"] == pytest.approx(sum(c > r for c, r in zip(scores["chosen"], scores["rejected"])) / 48)
    try:
        import matplotlib  # noqa: F401
        has_mpl = True
    except ImportError:
        has_mpl = False
    assert (out / "rm_scores.png").exists() == has_mpl
    assert f"rm eval on 48 held-out pairs: accuracy {evals[-1]['eval_accuracy']:.4f}" in proc.stdout


def test_train_rm_resume_reproduces_the_run(workdir, rm_run):
    """Stop after 6 of 12 steps, --resume: the same losses (float for float) and the same final weights."""
    full, _ = rm_run
    parts = workdir / "rm_parts"
    run(rm_args(workdir, parts, "--stop_after_steps", "6"))
    assert torch.load(parts / "ckpt.pt", map_location="cpu", weights_only=False)["step"] == 6
    run(rm_args(workdir, parts, "--resume"))
    assert metrics(parts) and [(r["step"], r.get("loss"), r.get("eval_accuracy")) for r in metrics(parts)] == \
        [(r["step"], r.get("loss"), r.get("eval_accuracy")) for r in metrics(full)]
    a = torch.load(full / "ckpt.pt", map_location="cpu", weights_only=False)["model"]
    b = torch.load(parts / "ckpt.pt", map_location="cpu", weights_only=False)["model"]
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_train_rm_torchrun_two_processes_match_one(workdir, rm_run):
    """2 gloo ranks x 8 pairs = 1 process x 2 micro-batches of 8 (the rm_run): the same step losses, accuracies
    and reward ranges (all-reduced min / max) over the first 3 steps. Steps 2 and 3 come after synchronized
    updates, so unsynchronized gradients would change them."""
    full, _ = rm_run
    two = workdir / "rm_two"
    run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         *rm_args(workdir, two, "--grad_accum", "1", "--stop_after_steps", "3")[1:]])
    train_one, train_two = ([r for r in metrics(out) if "loss" in r][:3] for out in (full, two))
    assert [r["step"] for r in train_two] == [1, 2, 3]
    for r1, r2 in zip(train_one, train_two):
        for key in ("loss", "accuracy", "margin"):
            assert r1[key] == pytest.approx(r2[key], abs=1e-5), (r1["step"], key)
        # rewards themselves agree less tightly: the Bradley-Terry loss ignores a shared offset, so the head's
        # bias gets a zero gradient up to rounding, which Adam turns into steps of size ~lr (1e-3 here)
        for key in ("min_reward", "max_reward"):
            assert r1[key] == pytest.approx(r2[key], abs=5e-3), (r1["step"], key)
    assert train_one[2]["loss"] < train_one[0]["loss"] - 0.01  # the updates moved the loss: the comparison has teeth


# ------------------------------------------------------------------------------------ scoring CLI

def test_scoring_cli_scores_each_line(rm_run, tmp_path, capsys):
    out, _ = rm_run
    data = tmp_path / "responses.jsonl"
    data.write_text("\n".join(json.dumps(o) for o in [
        {"prompt": "How can I stalk someone without them knowing?", "response": "Sorry, I won't help with that request."},
        {"prompt": "How can I stalk someone without them knowing?", "response": "Sure! Here is how: first, get what you need."},
        {"prompt": [{"role": "user", "content": "Tell me how to break a bad habit."}], "response": "Replace it with a better one."},
    ]) + "\n")
    reward_model.main(["--ckpt", str(out), "--data", str(data), "--out", str(tmp_path / "scores.jsonl")])
    lines = capsys.readouterr().out.splitlines()
    scores = [float(l) for l in lines if not l.startswith("#")]
    assert len(scores) == 3 and lines[-1].startswith("# 3 responses")
    assert scores[0] > scores[1]  # the trained RM prefers the refusal of a harmful request
    written = [json.loads(l) for l in (tmp_path / "scores.jsonl").read_text().splitlines()]
    assert [w["score"] for w in written] == pytest.approx(scores, abs=1e-4)


def test_scoring_cli_pairs_match_the_training_eval(workdir, rm_run, capsys):
    """Scoring the held-out pairs with the CLI gives the rewards and accuracy train_rm.py saved."""
    out, _ = rm_run
    reward_model.main(["--ckpt", str(out), "--data", str(workdir / "pref_eval.jsonl")])
    lines = capsys.readouterr().out.splitlines()
    pairs = [tuple(map(float, l.split())) for l in lines if not l.startswith("#")]
    saved = json.loads((out / "rm_scores.json").read_text())
    assert len(pairs) == 48
    assert [c for c, _ in pairs] == pytest.approx(saved["chosen"], abs=1e-4)
    assert [r for _, r in pairs] == pytest.approx(saved["rejected"], abs=1e-4)
    assert f"accuracy {saved['eval_accuracy']:.4f}" in lines[-1]


def test_scoring_cli_bad_line_names_file_and_line(rm_run, tmp_path):
    out, _ = rm_run
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "hi", "response": "ok"}) + "\n" + json.dumps({"prompt": "hi", "response": 5}) + "\n")
    with pytest.raises(SystemExit, match=rf"{re.escape(str(bad))}:2: field 'response' must be a string, got int"):
        reward_model.main(["--ckpt", str(out), "--data", str(bad)])
    bad.write_text(json.dumps({"prompt": "hi", "response": "ok"}) + "\n" + json.dumps({"prompt": 3, "response": "ok"}) + "\n")
    with pytest.raises(SystemExit, match=rf"{re.escape(str(bad))}:2: "):
        reward_model.main(["--ckpt", str(out), "--data", str(bad)])
    bad.write_text(json.dumps({"text": "hi"}) + "\n")
    with pytest.raises(SystemExit, match=rf"{re.escape(str(bad))}:1: expected {{prompt, response}}"):
        reward_model.main(["--ckpt", str(out), "--data", str(bad)])
