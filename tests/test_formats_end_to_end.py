"""The real-schema fixtures of tests/data/formats through the scripts (issue 14): a few SFT steps from a
ShareGPT file, RM steps from a ranked-output file (each prompt's K responses one batch element), DPO steps
from a PKU-SafeRLHF file (better and safer), GRPO steps on math prompts with plain numeric answers."""

import json
import sys

import pytest
from conftest import ROOT, run

FORMATS = ROOT / "tests" / "data" / "formats"


@pytest.fixture(scope="module")
def sft(tmp_path_factory):
    """A tokenizer and a 2-step SFT checkpoint on slices of the default data."""
    d = tmp_path_factory.mktemp("formats_e2e")
    (d / "sft.jsonl").write_text("\n".join((ROOT / "data/sft_train.jsonl").read_text().splitlines()[:64]) + "\n")
    run([sys.executable, "-m", "minialign.data.tokenizer", "--data", ROOT / "data/sft_train.jsonl", "--vocab_size", "400",
         "--out", d / "tok"])
    run([sys.executable, ROOT / "train_sft.py", "--data", d / "sft.jsonl", "--tokenizer", d / "tok/tokenizer.model",
         "--eval_data", "", "--out_dir", d / "sft", "--max_steps", "2", "--micro_batch_size", "8", "--grad_accum", "1"])
    return d


def steps(out):
    return [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


COMMON = ["--max_steps", "2", "--warmup_steps", "1", "--log_every", "1"]


def test_sft_from_a_sharegpt_file(sft):
    proc = run([sys.executable, ROOT / "train_sft.py", "--init_from", sft / "sft", "--data", FORMATS / "sft_sharegpt.jsonl",
                "--eval_data", "", "--out_dir", sft / "sharegpt", "--grad_accum", "1", "--micro_batch_size", "2", *COMMON])
    assert "data: 2 conversations" in proc.stdout and len(steps(sft / "sharegpt")) == 2


def test_rm_from_a_ranked_output_file(sft):
    proc = run([sys.executable, ROOT / "train_rm.py", "--init_from", sft / "sft", "--data", FORMATS / "ranked.jsonl",
                "--eval_data", "", "--out_dir", sft / "ranked", "--grad_accum", "1", "--micro_batch_pairs", "2", *COMMON])
    n_pairs = int(proc.stdout.split("data: ")[1].split(" pairs")[0])
    n_groups = int(proc.stdout.split(" pairs in ")[1].split(" groups")[0])
    assert n_groups == 3 and n_pairs > n_groups  # 3 prompts, several ranked pairs each, one batch element each
    assert len(steps(sft / "ranked")) == 2


@pytest.mark.parametrize("choice", ["better", "safer"])
def test_dpo_from_a_pku_saferlhf_file(sft, choice):
    run([sys.executable, ROOT / "train_dpo.py", "--init_from", sft / "sft", "--data", FORMATS / "pku_saferlhf.jsonl",
         "--pku_choice", choice, "--pref_eval_data", "", "--eval_data", "", "--out_dir", sft / f"pku_{choice}",
         "--beta", "0.1", "--grad_accum", "1", "--micro_batch_pairs", "2", *COMMON])
    first = steps(sft / f"pku_{choice}")[0]
    assert abs(first["loss"] - 0.693147) < 1e-5  # step 1: policy == reference


def test_grpo_on_math_prompts_with_plain_numeric_answers(sft):
    proc = run([sys.executable, ROOT / "train_grpo.py", "--init_from", sft / "sft", "--data", FORMATS / "math_answers.jsonl",
                "--reward_funcs", "gsm8k", "--eval_data", "", "--out_dir", sft / "math", "--prompts_per_step", "2",
                "--num_generations", "2", "--max_new_tokens", "8", "--no-mask_truncated_completions",
                "--max_steps", "2", "--log_every", "1", "--micro_batch_size", "4"])
    assert "data: 7 prompts" in proc.stdout
    rows = [r for r in map(json.loads, (sft / "math" / "metrics.jsonl").read_text().splitlines()) if "reward" in r]
    assert len(rows) == 2 and all(0 <= r["rewards/gsm8k/mean"] <= 1 for r in rows)
