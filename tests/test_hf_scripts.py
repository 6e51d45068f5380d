"""The training scripts start from a Hugging Face model folder (issue 15): a tiny random Qwen2 model made
with transformers, with our tokenizer written as tokenizer.json + a ChatML chat template, trains 3 steps of
SFT, of a reward model (the HF causal LM with a fresh scalar head) and of DPO; the outputs chain; an
unsupported config key stops the script with its name. Skipped without the [hf] extra and transformers.
"""

import json
import sys

import pytest
import torch
from conftest import ROOT, run

from minialign.training import checkpoint

transformers = pytest.importorskip("transformers")
pytest.importorskip("safetensors")
pytest.importorskip("tokenizers")


@pytest.fixture(scope="module")
def hf_folder(tok, tmp_path_factory):
    from minialign.data.hf_tokenizer import write_hf_tokenizer

    d = tmp_path_factory.mktemp("hf")
    folder = d / "qwen2-tiny"
    torch.manual_seed(0)
    config = transformers.Qwen2Config(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                      intermediate_size=128, vocab_size=tok.vocab_size, max_position_embeddings=128,
                                      tie_word_embeddings=True)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    write_hf_tokenizer(tok.path, folder)
    for name in ("sft_train.jsonl", "pref_train.jsonl", "pref_eval.jsonl", "rl_eval.jsonl"):
        lines = (ROOT / "data" / name).read_text(encoding="utf-8").splitlines()[:64]
        (d / name).write_text("\n".join(lines) + "\n", encoding="utf-8")
    return folder


def common(out, *extra, unit="--micro_batch_size"):
    """Flags every run shares; `unit`: --micro_batch_size (sequences) or --micro_batch_pairs (RM, DPO)."""
    return ["--out_dir", str(out), "--max_steps", "3", "--warmup_steps", "1", "--log_every", "1",
            unit, "4", "--grad_accum", "1", *extra]


def logged(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_sft_rm_and_dpo_start_from_an_hf_folder_and_chain(hf_folder, tmp_path):
    d = hf_folder.parent
    run([sys.executable, ROOT / "train_sft.py", "--init_from", hf_folder, "--data", d / "sft_train.jsonl",
         "--eval_data", d / "rl_eval.jsonl", "--eval_prompts", "4", "--eval_max_new_tokens", "8",
         *common(tmp_path / "sft")])
    assert (tmp_path / "sft" / "tokenizer.json").exists()  # the HF tokenizer travels with the checkpoint
    assert len([r for r in logged(tmp_path / "sft") if "loss" in r]) == 3
    run([sys.executable, ROOT / "train_rm.py", "--init_from", hf_folder, "--data", d / "pref_train.jsonl",
         "--eval_data", d / "pref_eval.jsonl", *common(tmp_path / "rm", unit="--micro_batch_pairs")])
    rm_rows = [r for r in logged(tmp_path / "rm") if "accuracy" in r]
    assert len(rm_rows) == 3 and all(0 <= r["accuracy"] <= 1 for r in rm_rows)
    run([sys.executable, ROOT / "train_dpo.py", "--init_from", tmp_path / "sft", "--data", d / "pref_train.jsonl",
         "--pref_eval_data", "", "--eval_data", "", *common(tmp_path / "dpo", unit="--micro_batch_pairs")])  # chains: the SFT output as init
    first = [r for r in logged(tmp_path / "dpo") if "loss" in r][0]
    assert first["loss"] == pytest.approx(0.6931, abs=1e-3)  # step 1: policy == reference, the loss is log 2
    # and straight from the HF folder: the reference is the HF model (step 1 at log 2), and the policy moved from it
    run([sys.executable, ROOT / "train_dpo.py", "--init_from", hf_folder, "--data", d / "pref_train.jsonl",
         "--pref_eval_data", "", "--eval_data", "", *common(tmp_path / "dpo_hf", unit="--micro_batch_pairs")])
    rows = [r for r in logged(tmp_path / "dpo_hf") if "loss" in r]
    assert len(rows) == 3 and rows[0]["loss"] == pytest.approx(0.6931, abs=1e-3)
    assert rows[0]["rewards/margins"] == pytest.approx(0.0, abs=1e-4) and rows[-1]["rewards/margins"] != 0.0
    hf, trained = checkpoint.load_model(hf_folder).state_dict(), checkpoint.load_model(tmp_path / "dpo_hf").state_dict()
    assert hf.keys() == trained.keys() and any(not torch.equal(hf[k], trained[k]) for k in hf)


def test_an_unsupported_config_key_stops_the_script_naming_it(hf_folder, tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in hf_folder.iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    cfg = json.loads((bad / "config.json").read_text())
    cfg["hidden_act"] = "gelu"  # our MLP is SwiGLU (silu): a gelu model would silently be a different model
    (bad / "config.json").write_text(json.dumps(cfg))
    proc = run([sys.executable, ROOT / "train_sft.py", "--init_from", bad, "--data", hf_folder.parent / "sft_train.jsonl",
                "--eval_data", "", *common(tmp_path / "out")], check=False)
    assert proc.returncode != 0 and "hidden_act" in proc.stderr
