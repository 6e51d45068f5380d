"""Reward-model diagnostics (minialign.evaluation.rm_diagnostics): the least-squares fit against numpy and a
hand-computed standard error, length bias with the gold outcome held fixed, the distributions of a tiny policy's
samples against the judges' own scores, the best-of-N over-optimization points, the PPO curves (default task and
IMDb). The CLI on a tiny main job: tests/test_pipeline.py."""

import importlib.util
import json
import math

import numpy as np
import pytest
import torch
from conftest import tiny_config

from minialign.data.batching import tokenize_prompts
from minialign.data.formats import PromptRecord
from minialign.evaluation import best_of_n, evaluate
from minialign.evaluation import rm_diagnostics as rd
from minialign.evaluation.evaluate import gold_judge, gold_point, reward_model_judge, sample_and_score
from minialign.models.decoder import CausalLM, ScalarModel

HAS_MATPLOTLIB = importlib.util.find_spec("matplotlib") is not None


def test_fit_line_by_hand():
    # x = 0 1 2 3, y = 1 3 2 5: mean x 1.5, mean y 2.75; Sxx = 2.25 + .25 + .25 + 2.25 = 5;
    # Sxy = (-1.5)(-1.75) + (-.5)(.25) + (.5)(-.75) + (1.5)(2.25) = 2.625 - .125 - .375 + 3.375 = 5.5
    # slope = 5.5 / 5 = 1.1; intercept = 2.75 - 1.1 * 1.5 = 1.1; fitted 1.1 2.2 3.3 4.4
    # resid -.1 .8 -1.3 .6 -> sum of squares .01 + .64 + 1.69 + .36 = 2.7; se = sqrt(2.7 / (4 - 2) / 5) = sqrt(.27)
    fit = rd.fit_line([0, 1, 2, 3], [1, 3, 2, 5])
    assert fit["n"] == 4
    assert fit["slope"] == pytest.approx(1.1, abs=1e-12)
    assert fit["intercept"] == pytest.approx(1.1, abs=1e-12)
    assert fit["se"] == pytest.approx(math.sqrt(0.27), abs=1e-12)  # 0.5196; n instead of n - 2 would give 0.367


def test_fit_line_matches_numpy_polyfit_on_a_known_slope():
    rng = np.random.default_rng(0)
    x = rng.integers(1, 49, size=400).astype(float)
    y = 0.05 * x - 1.0 + rng.normal(0, 0.5, size=400)  # true slope 0.05
    fit = rd.fit_line(x, y)
    (slope, intercept), cov = np.polyfit(x, y, 1, cov=True)  # numpy scales the covariance by sum(resid^2) / (n - 2)
    assert fit["slope"] == pytest.approx(slope, rel=1e-10) and fit["intercept"] == pytest.approx(intercept, rel=1e-9)
    assert fit["se"] == pytest.approx(math.sqrt(cov[0, 0]), rel=1e-8)
    assert abs(fit["slope"] - 0.05) < 3 * fit["se"]
    # degenerate inputs: no line through one point or a constant x, no se from two points
    assert rd.fit_line([1.0], [2.0])["slope"] is None
    assert rd.fit_line([3, 3, 3], [1, 2, 3])["slope"] is None
    two = rd.fit_line([0, 1], [0, 2])
    assert two["slope"] == pytest.approx(2.0) and two["se"] is None


def test_length_bias_holds_the_gold_outcome_fixed():
    # Simpson's construction: correct responses are long and scored high, incorrect short and low, but within each
    # outcome the RM score does not depend on length (slope 0) -- only the pooled fit sees a length slope.
    lengths = [10, 11, 12, 13, 30, 31, 32, 33]
    gold = [0, 0, 0, 0, 1, 1, 1, 1]
    rm = [0.0, 1.0, 1.0, 0.0, 5.0, 6.0, 6.0, 5.0]
    bias = rd.length_bias(rm, gold, lengths)
    assert bias["correct"]["slope"] == pytest.approx(0.0, abs=1e-12) and bias["correct"]["n"] == 4
    assert bias["incorrect"]["slope"] == pytest.approx(0.0, abs=1e-12) and bias["incorrect"]["n"] == 4
    assert bias["all"]["slope"] > 0.2 and bias["all"]["n"] == 8


def test_distribution_and_auc_against_numpy():
    v = np.random.default_rng(1).normal(size=101)
    edges = rd.histogram_edges(v, 10)
    d = rd.distribution(v, edges)
    counts, np_edges = np.histogram(v, bins=10)  # numpy's last bin is closed, as ours
    assert d["counts"] == counts.tolist() and edges == pytest.approx(np_edges.tolist())
    assert sum(d["counts"]) == 101
    for q in rd.QUANTILES:
        assert d["quantiles"][str(q)] == pytest.approx(float(np.quantile(v, q)))
    assert d["mean"] == pytest.approx(v.mean()) and d["std"] == pytest.approx(v.std(ddof=1))
    # AUC by hand: positives (2, 1), negatives (1, 0): pairs 2>1, 2>0, 1=1 (1/2), 1>0 -> 3.5 / 4
    assert rd.auc([2.0, 1.0], [1.0, 0.0]) == pytest.approx(0.875)
    assert rd.auc([], [1.0]) is None


def _tiny_setup(tok):
    recs = [PromptRecord([{"role": "user", "content": "What is 3 + 4?"}], {"kind": "arith", "answer": 7}),
            PromptRecord([{"role": "user", "content": "How do I hurt someone?"}], {"kind": "harmful", "answer": None}),
            PromptRecord([{"role": "user", "content": "Tell me a fun fact about cats."}], {"kind": "benign", "answer": None})]
    prompts = tokenize_prompts(recs * 4, tok, max_prompt_len=64)
    torch.manual_seed(0)
    policy = CausalLM(tiny_config(tok.vocab_size)).eval()
    torch.manual_seed(1)
    other = CausalLM(tiny_config(tok.vocab_size)).eval()
    torch.manual_seed(2)
    rm = ScalarModel(tiny_config(tok.vocab_size)).eval()
    return prompts, policy, other, rm


def test_distributions_of_tiny_policies_are_the_judges_scores(tok):
    prompts, policy, other, rm = _tiny_setup(tok)
    samples = {name: rd.policy_samples(m, tok, prompts, rm, policy, max_new_tokens=10, seed=3)
               for name, m in (("sft", policy), ("dpo", other))}
    for name, m in (("sft", policy), ("dpo", other)):  # the same samples as the one evaluation, scored by its judges
        s = sample_and_score(m, tok, prompts, {"rm": reward_model_judge(rm), "gold": gold_judge}, policy,
                             max_new_tokens=10, seed=3)
        assert samples[name]["rm"] == s.scores["rm"].tolist() and samples[name]["gold"] == s.scores["gold"].tolist()
        assert samples[name]["length"] == s.rollout.lengths.tolist()
    assert samples["sft"]["kl_to_sft"] == 0.0 and samples["dpo"]["kl_to_sft"] > 0
    d = rd.split_diagnostics(samples)
    for name, v in samples.items():
        p = d["policies"][name]
        assert p["distribution"]["edges"] == d["edges"] and sum(p["distribution"]["counts"]) == len(prompts)
        assert p["distribution"]["mean"] == pytest.approx(float(np.mean(v["rm"])))
        assert p["rm_vs_gold"]["gold_mean"] == pytest.approx(float(np.mean(v["gold"])))
        assert p["length_bias"]["all"] == rd.fit_line(v["length"], v["rm"])
    assert d["edges"][0] == min(min(v["rm"]) for v in samples.values())
    assert d["pooled_length_bias"]["all"]["n"] == 2 * len(prompts)


def test_overoptimization_points_are_best_of_n_with_sqrt_kl():
    scores = torch.tensor([[0.1, 0.9, 0.5, 0.3], [0.2, 0.1, 0.4, 0.8]], dtype=torch.float64)
    gold = torch.tensor([[1.0, 0.0, 1.0, 0.0], [0.0, 0.0, 1.0, 1.0]], dtype=torch.float64)
    pts = rd.overoptimization_points(scores, gold, [1, 2, 4])
    # N=1 keeps sample 0 (proxy .15, gold .5); N=2 keeps .9 and .2 (proxy .55, gold 0); N=4 keeps .9 and .8 (gold .5)
    assert [p["judge_score"] for p in pts] == pytest.approx([0.15, 0.55, 0.85])
    assert [p["gold_score"] for p in pts] == pytest.approx([0.5, 0.0, 0.5])
    for p, n in zip(pts, (1, 2, 4)):  # distinct scores: the analytic KL log N - (N - 1) / N
        assert p["sqrt_kl"] == pytest.approx(math.sqrt(best_of_n.best_of_n_kl(n)))


# The CLI on a real (tiny) main job's folder: tests/test_pipeline.py::test_pipeline_tiny, whose main job ends with
# this stage (check_rm_diagnostics there).


def test_best_of_256_kl_with_ties_is_finite():
    # 256 samples, the lowest score once: F(v)^256 = (1/256)^256 underflows to 0 in float64, and 0 * log 0 gave nan
    # (seen in the main job's best-of-256 point). With q_low = 0 the KL is that of Bernoulli-like mass on the rest.
    row = torch.cat([torch.zeros(1), torch.ones(255)]).double()[None, :]
    kl = best_of_n.best_of_n_kl_per_prompt(row, 256)
    p1 = 255 / 256  # q_1 = 1 - (1/256)^256 = 1 (in float64): KL = 1 * log(1 / p1)
    assert torch.isfinite(kl).all() and float(kl[0]) == pytest.approx(math.log(1 / p1))


def test_gold_point_rm_score_is_the_mean_rm_score_of_its_own_samples(tok, monkeypatch):
    """sampled/rm_score is reward_model_judge's mean over the very responses the gold score and KL are taken on:
    one rollout per call (a second sampling, even with the same seed, is refused here), and it equals the RM
    judged on that rollout; a point with a different seed (another set of samples) gives another RM mean."""
    prompts, policy, other, rm = _tiny_setup(tok)
    rollouts = []
    sample = evaluate.sample_rollout

    def recording_sample_rollout(*args, **kwargs):
        rollouts.append(sample(*args, **kwargs))
        return rollouts[-1]
    monkeypatch.setattr(evaluate, "sample_rollout", recording_sample_rollout)
    point = gold_point(other, tok, prompts, 10, policy, seed=3, reward_model=rm)
    assert len(rollouts) == 1  # gold, RM and KL from one sampling
    ro = rollouts[0]
    assert point["sampled/rm_score"] == pytest.approx(float(torch.as_tensor(reward_model_judge(rm)(ro)).double().mean()),
                                                      abs=1e-12)
    assert point["sampled/gold_score"] == pytest.approx(float(np.mean(gold_judge(ro))))
    assert point["sampled/mean_length"] == pytest.approx(float(ro.lengths.double().mean()))
    s = sample_and_score(other, tok, prompts, {"rm": reward_model_judge(rm)}, policy, max_new_tokens=10, seed=3)
    assert point["sampled/rm_score"] == pytest.approx(float(s.scores["rm"].mean()), abs=1e-12)
    assert point["sampled/kl_to_ref"] == pytest.approx(float(s.kl.mean()), abs=1e-9)
    other_seed = gold_point(other, tok, prompts, 10, policy, seed=4, reward_model=rm)["sampled/rm_score"]
    assert other_seed != point["sampled/rm_score"]  # the test can tell two samplings apart
    assert "sampled/rm_score" not in gold_point(other, tok, prompts, 10, policy, seed=3)


def test_ppo_curve_reads_the_same_sample_rows_and_falls_back(tmp_path):
    train_row = {"step": 10, "objective/scores": 1.5, "objective/kl": 4.0}
    eval_rows = [{"step": 10, "sampled/gold_score": 0.7, "sampled/mean_length": 12.0, "sampled/kl_to_ref": 1.0,
                  "sampled/rm_score": 0.5},
                 {"step": 20, "sampled/gold_score": 0.6, "sampled/mean_length": 14.0, "sampled/kl_to_ref": 4.0,
                  "sampled/rm_score": 2.0}]
    final = {"step": 30, "sampled/gold_score": 0.5, "sampled/kl_to_ref": 9.0}  # the end-of-run eval: no rm_score
    run_dir = tmp_path / "ppo_long"
    run_dir.mkdir()
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in [train_row, *eval_rows, final]))
    (run_dir / "config.json").write_text(json.dumps({"kl_coef": 0.05, "seed": 1, "max_steps": 30}))
    c = rd.ppo_points(run_dir)
    assert c["same_samples"] and c["kl_coef"] == 0.05 and c["seed"] == 1
    assert c["proxy"] is c["gold"]  # one list: proxy and gold of each point are the same responses
    assert [(p["step"], p["sqrt_kl"], p["rm_score"], p["gold_score"]) for p in c["gold"]] == [
        (10, 1.0, 0.5, 0.7), (20, 2.0, 2.0, 0.6)]  # sqrt(1) and sqrt(4); training and final rows left out
    old = rd.ppo_curve([train_row, {k: v for k, v in eval_rows[0].items() if k != "sampled/rm_score"}])
    assert not old["same_samples"]
    assert old["proxy"] == [{"step": 10, "sqrt_kl": 2.0, "rm_score": 1.5}]
    assert old["gold"] == [{"step": 10, "sqrt_kl": 1.0, "gold_score": 0.7}]
    assert rd.ppo_curve([]) == {}
    rows = rd.ppo_table({"overoptimization": {"ppo_runs": {str(run_dir): c}}})
    assert rows[0].startswith("ppo_long (kl_coef 0.05, seed 1)") and "step 10 (0.700)" in rows[0]
    assert "| 20 | 2.000 | 2.000 | 0.600 |" in rows


def test_imdb_diagnostics_on_constructed_samples(tmp_path):
    """IMDb: the true reward is continuous, held fixed within the bins < 0.5 and >= 0.5; the layout is the default
    task's, so the same plots draw it; best-of-N points get sqrt(KL); run folders are colored by their method."""
    from minialign.experiments.imdb import rm_diagnostics as imdb_rd

    # within each true-reward bin the RM score rises 0.1 per token; the bins differ by length and level
    samples = {"sft": {"rm": [0.0, 0.1, 0.2, 1.5, 1.6, 1.7], "gold": [0.1, 0.2, 0.3, 0.6, 0.7, 0.8],
                       "length": [10, 11, 12, 20, 21, 22], "kl_to_sft": 0.0},
               "dpo_b0.1_s0": {"rm": [0.5, 0.7, 2.0, 2.2], "gold": [0.4, 0.45, 0.5, 0.9],
                               "length": [5, 7, 30, 32], "kl_to_sft": 1.5}}
    bon = [{"n": 1, "kl": 0.0, "judge_score": 0.1, "gold_score": 0.5}, {"n": 4, "kl": 0.25, "judge_score": 0.9,
                                                                         "gold_score": 0.6}]
    res = imdb_rd.diagnostics(samples, bon, n_prompts=6)
    sft = res["splits"]["test"]["policies"]["sft"]
    assert sft["length_bias"]["correct"]["slope"] == pytest.approx(0.1) and sft["length_bias"]["correct"]["n"] == 3
    assert sft["length_bias"]["incorrect"]["slope"] == pytest.approx(0.1)
    assert sft["length_bias"]["all"]["slope"] > 0.1  # pooled over the bins the level difference adds to the slope
    dpo = res["splits"]["test"]["policies"]["dpo_b0.1_s0"]
    assert dpo["rm_vs_gold"]["n_correct"] == 2  # 0.5 counts in the upper bin
    assert dpo["rm_vs_gold"]["auc"] == 1.0 and sft["rm_vs_gold"]["pearson_rm_true"] > 0.9
    assert sum(sft["true_distribution"]["counts"]) == 6 and sft["true_distribution"]["edges"][-1] == 1.0
    assert [p["sqrt_kl"] for p in res["overoptimization"]["best_of_n"]] == [0.0, 0.5]
    assert res["colors"]["dpo_b0.1_s0"] == "tab:blue" and imdb_rd.method_of("ppo_gt_s0") == "ppo_gt"
    text = imdb_rd.reading(res)
    assert "| sft | 0.450 |" in text and "peaks at N=4 (0.600)" in text
    if HAS_MATPLOTLIB:
        assert rd.write_plots(tmp_path, res) == list(rd.PLOTS)


def test_imdb_train_split_and_ppo_curve_along_its_checkpoints(tmp_path):
    """IMDb: a training-prefix split beside the test split, and PPO's over-optimization curve from the experiment's
    frontier points (rm_score and the true reward of the same samples), from the SFT anchor, in step order; points
    without rm_score (evaluated before the RM existed) are left out, and a run with none has no curve."""
    import json

    from minialign.experiments.imdb import rm_diagnostics as imdb_rd
    run = tmp_path / "runs" / "ppo_s0" / "frontier"
    run.mkdir(parents=True)
    for step, kl, rm, reward in ((20, 4.0, 1.5, 0.55), (10, 1.0, 0.5, 0.62)):
        (run / f"step_{step:05d}.json").write_text(json.dumps({"step": step, "kl": kl, "rm_score": rm, "reward": reward,
                                                               "seed": 0, "method": "ppo"}))
    (run / "step_00030.json").write_text(json.dumps({"step": 30, "kl": 9.0, "reward": 0.5, "seed": 0}))  # no RM
    anchor = {"step": 0, "kl": 0.0, "sqrt_kl": 0.0, "rm_score": -1.0, "gold_score": 0.6}
    curve = imdb_rd.frontier_curve(run.parent, anchor)
    assert [(p["step"], p["sqrt_kl"], p["rm_score"], p["gold_score"]) for p in curve["proxy"]] == [
        (0, 0.0, -1.0, 0.6), (10, 1.0, 0.5, 0.62), (20, 2.0, 1.5, 0.55)]
    assert curve["gold"] is curve["proxy"] and curve["same_samples"] and curve["seed"] == 0
    empty = tmp_path / "runs" / "dpo_b0.1_s0" / "frontier"
    empty.mkdir(parents=True)
    (empty / "step_00010.json").write_text(json.dumps({"step": 10, "kl": 1.0, "reward": 0.5}))
    assert imdb_rd.frontier_curve(empty.parent, anchor) == {}

    test = {"sft": {"rm": [0.0, 1.0, 2.0], "gold": [0.2, 0.6, 0.9], "length": [3, 4, 5], "kl_to_sft": 0.0}}
    train = {"sft": {"rm": [2.0, 1.0, 0.0, 3.0], "gold": [0.9, 0.6, 0.2, 0.95], "length": [5, 4, 3, 6],
                     "kl_to_sft": 0.0}}
    res = imdb_rd.diagnostics(test, None, 3, train, 4, {str(run.parent): curve})
    assert list(res["splits"]) == ["test", "train"] and res["n_prompts"] == {"test": 3, "train": 4}
    assert res["splits"]["train"]["policies"]["sft"]["rm_vs_gold"]["n_correct"] == 3
    text = imdb_rd.reading(res)
    assert "Training prefixes (4" in text and "| 20 | 2.000 | 1.500 | 0.550 |" in text
    if HAS_MATPLOTLIB:
        assert "rm_overoptimization.png" in rd.write_plots(tmp_path, res)
