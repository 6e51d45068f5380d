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


def bernoulli_kl(q, p):
    return sum(a * math.log(a / b) for a, b in ((q, p), (1 - q, 1 - p)) if a > 0)


def test_exact_kl_for_a_judge_with_ties_is_the_bernoulli_formula():
    """A 0/1 judge (the gold rule) with pass rate p: best-of-N keeps a correct sample with probability 1 - (1 - p)^N,
    so KL(best-of-N || π) = KL(Bern(1 - (1 - p)^N) || Bern(p)), not log N - (N - 1) / N. Pass rates p = 0, .3, .6,
    .9, 1 as 20 samples per prompt (0, 6, 12, 18, 20 correct), N = 16: at p = 0.6, 0.51 nats against 1.835; the
    mean over the five prompts 0.359. A prompt whose samples all score the same has KL 0 (nothing to select)."""
    rates = [0.0, 0.3, 0.6, 0.9, 1.0]
    scores = torch.tensor([[1.0] * round(20 * p) + [0.0] * (20 - round(20 * p)) for p in rates])
    per_prompt = best_of_n.best_of_n_kl_per_prompt(scores, 16)
    expected = [0.0 if p in (0, 1) else bernoulli_kl(1 - (1 - p) ** 16, p) for p in rates]
    assert per_prompt.tolist() == pytest.approx(expected, abs=1e-12)
    assert per_prompt[2] == pytest.approx(0.5108, abs=1e-4) and best_of_n.best_of_n_kl(16) == pytest.approx(1.8351, abs=1e-4)
    assert float(per_prompt.mean()) == pytest.approx(0.359, abs=5e-4)
    assert all(k <= math.log(1 / p) + 1e-12 for k, p in zip(per_prompt[1:4].tolist(), rates[1:4]))  # <= log(1/p)
    pts = best_of_n.points(scores, scores, [1, 16])  # what the report plots and tabulates
    assert pts[0]["kl"] == 0.0 and pts[1]["kl"] == pytest.approx(0.359, abs=5e-4) and pts[1]["prompts_with_ties"] == 1.0
    assert pts[1]["kl_analytic"] == pytest.approx(1.8351, abs=1e-4)  # kept beside it, for comparison
    # distinct scores: the analytic value, exact for a continuous judge
    distinct = torch.randn(3, 16, generator=torch.Generator().manual_seed(0))
    assert best_of_n.best_of_n_kl_per_prompt(distinct, 4).tolist() == [best_of_n.best_of_n_kl(4)] * 3
    assert best_of_n.points(distinct, distinct, [4])[0]["kl"] == pytest.approx(best_of_n.best_of_n_kl(4))


def test_exact_kl_matches_a_monte_carlo_of_the_selection_code():
    """Six responses with probabilities π and judge scores (0, 0, 1, 1, 1, 2) (ties within a value): 200,000 draws
    of N = 4 samples, the one best_indices keeps (the first of the best) counted per RESPONSE. The kept response's
    distribution is q_v = F(v)^4 - F(v-)^4 per score value, shared within a value in proportion to π, and its KL to
    π over the six responses equals best_of_n_kl_per_prompt on a sample row with the same score distribution
    (P(score) = 0.3, 0.4, 0.3: ten samples 0, 0, 0, 1, 1, 1, 1, 2, 2, 2)."""
    pi = torch.tensor([0.1, 0.2, 0.15, 0.15, 0.1, 0.3], dtype=torch.float64)
    response_scores = torch.tensor([0.0, 0.0, 1.0, 1.0, 1.0, 2.0])
    g = torch.Generator().manual_seed(0)
    T, N = 200_000, 4
    responses = torch.multinomial(pi, T * N, replacement=True, generator=g).view(T, N)  # (T, N) sampled responses
    keep = best_of_n.best_indices(response_scores[responses], N)  # (T,) the selection code under test
    kept = responses.gather(1, keep[:, None]).squeeze(1)
    q_hat = torch.bincount(kept, minlength=6).double() / T
    F = torch.tensor([0.3, 0.7, 1.0], dtype=torch.float64)
    q_value = F**N - torch.cat([torch.zeros(1, dtype=torch.float64), F[:-1]]) ** N  # (0.0081, 0.2320, 0.7599)
    value_of = torch.tensor([0, 0, 1, 1, 1, 2])
    q = q_value[value_of] * pi / torch.tensor([0.3, 0.4, 0.3], dtype=torch.float64)[value_of]  # π given the value
    assert (q_hat - q).abs().max() < 4 * math.sqrt(0.25 / T)  # the selection really is this mixture
    mc_kl = float((q_hat * (q_hat / pi).log()).sum())
    row = torch.tensor([[0.0, 0, 0, 1, 1, 1, 1, 2, 2, 2]])
    exact = float(best_of_n.best_of_n_kl_per_prompt(row, N))
    assert exact == pytest.approx(float((q * (q / pi).log()).sum()), abs=1e-12)
    assert mc_kl == pytest.approx(exact, abs=3e-3)
    assert best_of_n.best_of_n_kl(N) - exact > 0.08  # the analytic log N - (N-1)/N (0.636 vs 0.551) overstates it


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
    assert pts[-1]["prompts_with_ties"] > 0 and pts[-1]["kl"] < pts[-1]["kl_analytic"]  # a 0/1 judge ties
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
        "points": [{"n": n, "gold_score": g, "judge_score": 0.0, "kl": kl, "kl_analytic": best_of_n.best_of_n_kl(n),
                    "prompts_with_ties": 0.25} for n, g, kl in ((1, 0.6, 0.0), (2, 0.75, 0.15), (4, 0.85, 0.4))]}))
    (out / "iterative_dpo").mkdir()
    rows = [{"step": 40 * r, "round": r, "sampled/gold_score": 0.6 + 0.1 * r, "sampled/kl_to_ref": 0.5 * r,
             "pairs/used": 700 - r, "pairs/ties_skipped": 300 + r} for r in (1, 2, 3)]
    (out / "iterative_dpo/metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    report.write_report(out)
    text = (out / "report.md").read_text()
    assert "| 4 | 0.850 | 0.000 | 0.400 | 0.636 |" in text  # the best-of-N table: the KL, then the analytic one
    assert "25% of the prompts have tied scores" in text
    assert "| 2 | 80 | 0.800 | 1.000 | 698 | 302 |" in text  # the iterative DPO round table
    if importlib.util.find_spec("matplotlib"):
        assert (out / "plots/gold_vs_kl.png").stat().st_size > 1000  # drawn from best-of-N and the rounds alone


def test_report_refuses_an_old_points_file_that_has_only_the_analytic_kl(tmp_path):
    (tmp_path / "best_of_n").mkdir()
    (tmp_path / "best_of_n/points.json").write_text(json.dumps({
        "ckpt": "out/sft", "judge": "1 x gold", "data": "d", "n_prompts": 2,
        "points": [{"n": 1, "gold_score": 0.5, "judge_score": 0.5, "kl_analytic": 0.0}]}))
    assert "predates the exact KL" in report.best_of_n_table(tmp_path) and not report.has_exact_kl(
        report.read_json(tmp_path / "best_of_n/points.json"))
