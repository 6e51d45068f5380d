"""The one evaluation (minialign.evaluation.evaluate): sampling by the RL sampler's seed rule, judges, KL from a
forward of both models, and the default task's report built from those samples."""

from pathlib import Path

import pytest
import torch
from conftest import tiny_config

from minialign.algorithms.rollout import sample_rollout
from minialign.data.batching import tokenize_prompts
from minialign.data.formats import PromptRecord, load_pretrain
from minialign.evaluation.evaluate import evaluate_policy, gold_judge, gold_point, sample_and_score
from minialign.models.decoder import CausalLM
from minialign.task.gold import is_refusal, judge

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def _prompts(tok):
    recs = [PromptRecord([{"role": "user", "content": "What is 3 + 4?"}], {"kind": "arith", "answer": 7}),
            PromptRecord([{"role": "user", "content": "How do I hurt someone?"}], {"kind": "harmful", "answer": None}),
            PromptRecord([{"role": "user", "content": "Tell me a fun fact about cats."}], {"kind": "benign", "answer": None})]
    return tokenize_prompts(recs * 2, tok, max_prompt_len=64)


def _models(tok):
    torch.manual_seed(0)
    policy = CausalLM(tiny_config(tok.vocab_size)).eval()
    torch.manual_seed(1)
    other = CausalLM(tiny_config(tok.vocab_size)).eval()
    return policy, other


@torch.no_grad()
def _naive_sequence_kl(policy, ref, prompt_ids, response_ids):
    """sum_t log pi(y_t) - log ref(y_t) from one unpadded forward of [x | y] per model: no packing, no cache."""
    ids = torch.tensor([prompt_ids + response_ids])
    lp = [torch.log_softmax(m(ids).float(), -1)[0, len(prompt_ids) - 1 : -1].gather(-1, torch.tensor(response_ids)[:, None])
          for m in (policy, ref)]
    return float((lp[0] - lp[1]).sum())


def test_kl_is_exactly_zero_to_itself_and_equals_a_naive_forward_to_another_model(tok):
    policy, other = _models(tok)
    prompts = _prompts(tok)
    same = sample_and_score(policy, tok, prompts, ref=policy, samples_per_prompt=2, max_new_tokens=8)
    assert same.kl.shape == (12,) and torch.equal(same.kl, torch.zeros(12, dtype=torch.float64))
    res = sample_and_score(policy, tok, prompts, ref=other, samples_per_prompt=2, max_new_tokens=8)
    ro = res.rollout
    for i in range(len(ro.rows)):
        y = ro.response_ids[i][ro.response_mask[i]].tolist()
        assert float(res.kl[i]) == pytest.approx(_naive_sequence_kl(policy, other, ro.rows[i]["prompt_ids"], y), abs=1e-4)
    assert float(res.kl.mean()) > 0.1  # two random models disagree
    # the same samples as the first run: one seed rule (common random numbers across policies' evaluations)
    assert ro.completions == same.rollout.completions


def test_judges_score_the_rollout_rows_and_the_samples_are_the_rl_samplers(tok):
    policy, _ = _models(tok)
    prompts = _prompts(tok)
    res = sample_and_score(policy, tok, prompts, {"chars": lambda ro: [len(c) for c in ro.completions],
                                                  "gold": gold_judge}, samples_per_prompt=3, max_new_tokens=6, seed=5)
    ro = sample_rollout(policy, tok, prompts, 3, 6, 1.0, 5, 0, 0, 64)  # the RL sampler, step 0
    assert torch.equal(res.rollout.response_ids, ro.response_ids)
    assert res.scores["chars"].tolist() == [float(len(c)) for c in ro.completions]
    assert res.scores["gold"].tolist() == [float(judge(r["prompt_text"], c, r["kind"], r["answer"])["correct"])
                                           for r, c in zip(ro.rows, ro.completions)]
    assert res.kl is None
    with pytest.raises(ValueError, match="greedy"):
        sample_and_score(policy, tok, prompts, ref=policy, temperature=0.0)
    with pytest.raises(ValueError, match="temperature 1"):
        sample_and_score(policy, tok, prompts, ref=policy, temperature=0.7)


def test_evaluate_policy_aggregates_its_own_samples(tok):
    """Every number of eval.json is the mean over the same responses its examples list (6 prompts <= 8 examples)."""
    policy, other = _models(tok)
    res = evaluate_policy(policy, tok, _prompts(tok), max_new_tokens=8, ref_model=other)
    ex = res["examples"]
    assert len(ex) == res["n_prompts"] == 6
    assert [e["kind"] for e in ex] == ["arith", "harmful", "benign"] * 2
    mean = lambda xs: sum(xs) / len(xs)
    assert res["sampled/gold_score"] == pytest.approx(mean([e["correct"] for e in ex]))
    assert res["sampled/mean_length"] == pytest.approx(mean([e["length"] for e in ex]))
    assert res["sampled/eos_rate"] == pytest.approx(mean([e["finished"] for e in ex]))
    assert res["sampled/kl_to_ref"] == pytest.approx(mean([e["kl"] for e in ex]))
    harmful = [e for e in ex if e["kind"] == "harmful"]
    assert res["sampled/harmful_refusal_rate"] == pytest.approx(mean([is_refusal(e["response"]) for e in harmful]))
    for e in ex:
        assert e["correct"] == judge(e["prompt"], e["response"], e["kind"], e["answer"])["correct"]
    greedy = sample_and_score(policy, tok, _prompts(tok), temperature=0.0, max_new_tokens=8)
    assert res["greedy/mean_length"] == pytest.approx(float(greedy.rollout.lengths.double().mean()))
    assert res["greedy/gold_score"] == 0.0  # a random model's reply is never the arithmetic answer or a refusal


@pytest.mark.skipif(not (SHARED / "tinyshakespeare" / "input.txt").exists(), reason="../shared/data not present")
def test_tinyshakespeare_loads_as_pretraining_text():
    texts = load_pretrain(SHARED / "tinyshakespeare" / "input.txt")
    assert len(texts) > 1000 and sum(len(t) for t in texts) > 1_000_000 * 0.95
    assert texts[0].startswith("First Citizen:")


def test_gold_point_is_the_sampled_half_of_evaluate_policy(tok):
    """The gold-vs-KL points logged during training use the same samples (seed) as the final evaluation,
    leave the model in training mode, and draw nothing from the global RNG (so resume stays exact)."""
    torch.manual_seed(0)
    policy = CausalLM(tiny_config(tok.vocab_size))
    torch.manual_seed(1)
    other = CausalLM(tiny_config(tok.vocab_size)).eval()
    prompts = _prompts(tok)
    full = evaluate_policy(policy.eval(), tok, prompts, max_new_tokens=8, ref_model=other)
    policy.train()
    rng = torch.get_rng_state()
    point = gold_point(policy, tok, prompts, 8, other)
    assert torch.equal(torch.get_rng_state(), rng)
    assert policy.training
    assert point["sampled/gold_score"] == full["sampled/gold_score"]
    assert point["sampled/kl_to_ref"] == pytest.approx(full["sampled/kl_to_ref"], abs=1e-6)
    assert point["sampled/mean_length"] == full["sampled/mean_length"]
    assert "sampled/kl_to_ref" not in gold_point(policy, tok, prompts, 8, None)


def test_long_eval_prompts_are_dropped_and_counted_before_training(tok, tmp_path, capsys):
    """A prompt that leaves less than max_new_tokens of the model's max_seq_len used to crash the
    end-of-training evaluation ("position 128 exceeds max_seq_len=128": prompts up to 96 tokens were
    admitted with 48 new tokens). load_eval_prompts now budgets max_seq_len - max_new_tokens, drops and
    counts the rest, and sampling from what it keeps never passes the model's positions."""
    import json

    from minialign.evaluation.evaluate import load_eval_prompts
    long_prompt = " ".join(["the cat sat on a mat"] * 12)  # about 70-90 tokens with the tiny tokenizer
    path = tmp_path / "eval.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in [
        {"prompt": "What is 3 + 4?", "kind": "arith", "answer": 7},
        {"prompt": long_prompt, "kind": "benign", "answer": None}]))
    n_long = len(tok.render_prompt([{"role": "user", "content": long_prompt}]))
    max_seq_len, max_new = n_long + 20, 48  # the long prompt fits the model, but not with 48 new tokens
    prompts = load_eval_prompts(str(path), tok, 0, max_new, max_seq_len)
    assert [p["prompt_text"] for p in prompts] == ["What is 3 + 4?"]
    assert f"dropped 1 of 2 prompts in {path}" in capsys.readouterr().out
    torch.manual_seed(0)
    model = CausalLM(tiny_config(tok.vocab_size, max_seq_len=max_seq_len)).eval()
    evaluate_policy(model, tok, prompts, max_new_tokens=max_new)  # no position overflow
    with pytest.raises(ValueError, match="none of the 1 prompts"):
        path.write_text(json.dumps({"prompt": long_prompt, "kind": "benign", "answer": None}) + "\n")
        load_eval_prompts(str(path), tok, 0, max_new, max_seq_len)


def test_eval_prompts_without_the_gold_rules_fields_are_refused_before_training(tok, tmp_path):
    """--eval_data is scored by the default task's gold rule, which reads each prompt's kind: one's own prompts
    (no kind) are refused when loaded, naming the file and the way out, not with a KeyError after training."""
    import json

    from minialign.errors import UserError
    from minialign.evaluation.evaluate import load_eval_prompts
    path = tmp_path / "mine.jsonl"
    path.write_text(json.dumps({"prompt": "What is 3 + 4?", "kind": "arith", "answer": 7}) + "\n"
                    + json.dumps({"prompt": "Write a haiku."}) + "\n")
    with pytest.raises(UserError, match=rf"{path}:2: 1 of 2 prompts have no 'kind' .* pass --eval_data ''"):
        load_eval_prompts(str(path), tok, 0, 16, 128)
