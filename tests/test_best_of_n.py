"""Best-of-N (minialign.evaluation.best_of_n): the analytic KL, keeping the judge's favourite among the first N samples
(hand cases), the RAFT SFT records, the CLI end to end, and the report's best-of-N and per-round sections."""

import importlib.util
import json
import math
import sys

import pytest
import torch
from conftest import ROOT, run

import train_sft  # noqa: E402  (conftest put the repository on sys.path)
from minialign.evaluation import best_of_n, report


def test_analytic_kl():
    assert best_of_n.best_of_n_kl(1) == 0.0
    assert best_of_n.best_of_n_kl(2) == pytest.approx(math.log(2) - 0.5)  # 0.193
    assert best_of_n.best_of_n_kl(16) == pytest.approx(math.log(16) - 15 / 16)  # 1.835
    kls = [best_of_n.best_of_n_kl(n) for n in range(1, 65)]
    assert all(b > a for a, b in zip(kls, kls[1:]))  # strictly increasing in N
    assert kls[-1] < math.log(64)  # below log N, the KL of always picking one fixed sample of N
    with pytest.raises(ValueError):
        best_of_n.best_of_n_kl(0)


def test_keeps_the_max_reward_sample_among_the_first_n():
    scores = torch.tensor([[0.1, 0.7, 0.7, 0.2],   # best of 2 and of 4: index 1 (the first of two equal 0.7s)
                           [0.9, 0.0, 0.3, 1.5]])  # best of 1 and 2: index 0; of 4: index 3
    gold = torch.tensor([[0.0, 1.0, 0.0, 0.0],
                         [1.0, 0.0, 0.0, 0.0]])
    assert best_of_n.best_indices(scores, 1).tolist() == [0, 0]
    assert best_of_n.best_indices(scores, 2).tolist() == [1, 0]
    assert best_of_n.best_indices(scores, 4).tolist() == [1, 3]
    pts = best_of_n.points(scores, gold, [1, 2, 4])
    assert [p["n"] for p in pts] == [1, 2, 4]
    assert [p["gold_score"] for p in pts] == [0.5, 1.0, 0.5]  # the judge's favourite of 4 is gold-wrong on prompt 2
    assert [p["judge_score"] for p in pts] == pytest.approx([0.5, 0.8, 1.1])  # (0.1+0.9)/2, (0.7+0.9)/2, (0.7+1.5)/2
    assert [p["kl_analytic"] for p in pts] == [best_of_n.best_of_n_kl(n) for n in (1, 2, 4)]
    with pytest.raises(ValueError):
        best_of_n.best_indices(scores, 5)


def test_sft_records_keep_finished_responses_above_the_threshold():
    prompts = [{"messages": [{"role": "user", "content": f"q{i}"}]} for i in range(4)]
    res = {"scores": torch.tensor([[0.0, 2.0], [3.0, 1.0], [0.5, 0.0], [4.0, 0.0]]),
           "finished": torch.tensor([[True, True], [False, True], [True, True], [True, True]]),
           "completions": [["a0", "a1"], ["b0", "b1"], ["c0", "c1"], [" ", "d1"]]}
    records, counts = best_of_n.sft_records(prompts, res, 2, min_score=1.0)
    assert records == [{"messages": [{"role": "user", "content": "q0"}, {"role": "assistant", "content": "a1"}]}]
    # b0 (the best) did not finish, d0 has no text (never the runner-up instead), c0 scored 0.5 < 1
    assert counts == {"unfinished": 1, "empty": 1, "below_min_score": 1}


@pytest.fixture(scope="module")
def sft(tmp_path_factory):
    d = tmp_path_factory.mktemp("best_of_n")
    lines = (ROOT / "data/sft_train.jsonl").read_text(encoding="utf-8").splitlines()[:64]
    (d / "sft.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    text = (ROOT / "data/rl_eval.jsonl").read_text(encoding="utf-8").splitlines()[:8]
    (d / "rl_eval.jsonl").write_text("\n".join(text) + "\n", encoding="utf-8")
    run([sys.executable, "-m", "minialign.data.tokenizer", "--data", ROOT / "data/sft_train.jsonl",
         ROOT / "data/pretrain.jsonl", "--vocab_size", "512", "--out", d / "tok"])
    train_sft.main(["--data", str(d / "sft.jsonl"), "--eval_data", "", "--tokenizer", str(d / "tok/tokenizer.model"),
                    "--out_dir", str(d / "sft"), "--micro_batch_size", "8", "--max_steps", "2", "--warmup_steps", "1"])
    return d


def test_cli_points_and_rft_data(sft):
    """With the gold rule as the judge, the kept response's gold score is the judge's score and cannot fall as
    N grows (the first N samples are nested); with a length judge the judge's score cannot fall either."""
    d = sft
    common = ["--ckpt", str(d / "sft"), "--data", str(d / "rl_eval.jsonl"), "--n_prompts", "8", "--max_n", "6",
              "--max_new_tokens", "12"]
    best_of_n.main([*common, "--reward_funcs", "gold", "--out_dir", str(d / "gold")])
    pts = json.loads((d / "gold/points.json").read_text())["points"]
    assert [p["n"] for p in pts] == [1, 2, 4, 6]  # powers of two, and max_n
    assert all(p["gold_score"] == p["judge_score"] for p in pts)
    assert all(b["gold_score"] >= a["gold_score"] for a, b in zip(pts, pts[1:]))
    best_of_n.main([*common, "--reward_funcs", "length", "--out_dir", str(d / "length"), "--sft_out",
                    str(d / "rft/data.jsonl")])
    res = json.loads((d / "length/points.json").read_text())
    assert res["judge"] == "1 x length" and res["n_prompts"] == 8
    assert all(b["judge_score"] >= a["judge_score"] for a, b in zip(res["points"], res["points"][1:]))
    records = [json.loads(line) for line in (d / "rft/data.jsonl").read_text().splitlines()]
    assert all([m["role"] for m in r["messages"]] == ["user", "assistant"] for r in records)
    # the file is SFT data train_sft.py reads (one step is enough to show it)
    assert records  # (this seed keeps one: the others did not finish within 12 tokens, or were empty)
    train_sft.main(["--init_from", str(d / "sft"), "--data", str(d / "rft/data.jsonl"), "--eval_data", "",
                    "--out_dir", str(d / "rft"), "--micro_batch_size", "4", "--grad_accum", "1",
                    "--max_steps", "1", "--warmup_steps", "1"])
    assert (d / "rft/ckpt.pt").exists()
    proc = run([sys.executable, "-m", "minialign.evaluation.best_of_n", "--ckpt", str(d / "sft")], check=False)
    assert proc.returncode == 2 and "no judge" in proc.stderr


def test_report_draws_best_of_n_and_the_rounds(tmp_path):
    out = tmp_path
    (out / "sft").mkdir()
    (out / "sft/eval.json").write_text(json.dumps({"sampled/gold_score": 0.6, "greedy/gold_score": 0.8,
                                                   "sampled/mean_length": 12.0, "n_prompts": 600}))
    (out / "best_of_n").mkdir()
    (out / "best_of_n/points.json").write_text(json.dumps({
        "ckpt": "out/sft", "judge": "1 x reward_model", "data": "data/rl_eval.jsonl", "n_prompts": 200,
        "points": [{"n": n, "gold_score": g, "judge_score": 0.0, "kl_analytic": best_of_n.best_of_n_kl(n)}
                   for n, g in ((1, 0.6), (2, 0.75), (4, 0.85))]}))
    (out / "iterative_dpo").mkdir()
    rows = [{"step": 40 * r, "round": r, "sampled/gold_score": 0.6 + 0.1 * r, "sampled/kl_to_ref": 0.5 * r,
             "pairs/used": 700 - r, "pairs/ties_skipped": 300 + r} for r in (1, 2, 3)]
    (out / "iterative_dpo/metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    report.write_report(out)
    text = (out / "report.md").read_text()
    assert "| 4 | 0.850 | 0.000 | 0.636 |" in text  # the best-of-N table
    assert "| 2 | 80 | 0.800 | 1.000 | 698 | 302 |" in text  # the iterative DPO round table
    if importlib.util.find_spec("matplotlib"):
        assert (out / "plots/gold_vs_kl.png").stat().st_size > 1000  # drawn from best-of-N and the rounds alone
