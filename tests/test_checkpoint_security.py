"""Loading a checkpoint someone else made never runs code hidden in it (issue 29).

A crafted ckpt.pt holds, beside real weights, an object whose `__reduce__` would create a sentinel file when
unpickled. Every way a checkpoint comes in (checkpoint.load, --init_from, --reward_model, --resume, the evaluate
and hf_export commands, a classifier file, an HF folder's pytorch_model.bin) refuses it: one line naming the file
and the type it needs, and the sentinel does not exist afterwards. A chat template that walks attributes towards
Python (the usual jinja2 escape) fails inside the sandbox.

A checkpoint of an earlier minialign (its NumPy RNG state pickled as an array) is refused with a pointer to
`python -m minialign.training.checkpoint upgrade DIR --trust-this-file`, which converts it once; it then loads
and resumes exactly. Speed: the stages start from a random 2-layer, dim-64 model saved as if it were SFT, and
each script run stops at the refused load; only the exact-resume test trains (4 steps of SFT, 0.9M preset).
"""

import json
import random
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ROOT, run, tiny_model

from minialign.algorithms.classifier import load_classifier
from minialign.training import checkpoint, config

PY = sys.executable


class Payload:
    """Unpickled, it creates `sentinel` (stands in for os.system(...) in a shared checkpoint)."""

    def __init__(self, sentinel):
        self.sentinel = str(sentinel)

    def __reduce__(self):
        return exec, (f"open({self.sentinel!r}, 'w').close()",)


@pytest.fixture(scope="module")
def sft_dir(tmp_path_factory, tok):
    """A real checkpoint folder (ckpt.pt, config.json, tokenizer.model) of a tiny random model."""
    d = tmp_path_factory.mktemp("sft")
    model = tiny_model(vocab_size=tok.vocab_size)
    cfg = config.TrainConfig(out_dir=str(d))
    checkpoint.save(d, model=model, optimizer=torch.optim.AdamW(model.parameters()), scaler=None, step=1, cfg=cfg,
                    tokenizer_path=tok.path, finished=True)
    return d


def craft(sft_dir, folder):
    """`folder`: a copy of sft_dir whose ckpt.pt also carries a Payload; returns (folder, its sentinel)."""
    folder, sentinel = Path(folder), Path(folder).parent / f"{Path(folder).name}.PWNED"
    shutil.copytree(sft_dir, folder)
    state = torch.load(folder / "ckpt.pt", map_location="cpu", weights_only=False)  # our own file, just written
    torch.save({**state, "note": Payload(sentinel)}, folder / "ckpt.pt")
    return folder, sentinel


def refused(proc, path, needs="builtins.exec"):
    """The run failed with one line naming the file and the offending type, without a traceback."""
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    line = proc.stderr.strip().splitlines()[-1]
    assert str(path) in line and needs in line, line
    return line


def test_the_crafted_checkpoint_is_armed(sft_dir, tmp_path):
    """The control: an unrestricted unpickle (what checkpoint.load used to do) runs the payload."""
    folder, sentinel = craft(sft_dir, tmp_path / "evil")
    torch.load(folder / "ckpt.pt", weights_only=False)
    assert sentinel.exists()


def test_checkpoint_load_refuses_it_naming_the_file_and_the_type(sft_dir, tmp_path):
    folder, sentinel = craft(sft_dir, tmp_path / "evil")
    for entry in (lambda: checkpoint.load(folder), lambda: checkpoint.load(folder / "ckpt.pt"),
                  lambda: checkpoint.load_model(folder)):
        with pytest.raises(checkpoint.CheckpointError, match="builtins.exec") as err:
            entry()
        assert str(folder / "ckpt.pt") in str(err.value)
        assert "upgrade" not in str(err.value)  # not an earlier minialign's file: nothing to convert
    assert not sentinel.exists()


@pytest.mark.parametrize("script", ["train_sft.py", "train_dpo.py"])
def test_init_from(sft_dir, tmp_path, script):
    folder, sentinel = craft(sft_dir, tmp_path / "evil")
    data = "sft_train.jsonl" if script == "train_sft.py" else "pref_train.jsonl"
    proc = run([PY, ROOT / script, "--init_from", folder, "--data", ROOT / "data" / data, "--eval_data", "",
                "--out_dir", tmp_path / "out", "--max_steps", "1"], check=False)
    assert not sentinel.exists()
    refused(proc, folder / "ckpt.pt")


def test_reward_model(sft_dir, tmp_path):
    folder, sentinel = craft(sft_dir, tmp_path / "evil_rm")
    proc = run([PY, ROOT / "train_ppo.py", "--init_from", sft_dir, "--reward_model", folder,
                "--data", ROOT / "data/rl_train.jsonl", "--eval_data", "", "--out_dir", tmp_path / "out",
                "--max_steps", "1"], check=False)
    assert not sentinel.exists()
    refused(proc, folder / "ckpt.pt")


def test_resume(sft_dir, tmp_path, tok):
    folder, sentinel = craft(sft_dir, tmp_path / "evil_out")
    proc = run([PY, ROOT / "train_sft.py", "--resume", "--out_dir", folder, "--tokenizer", tok.path,
                "--data", ROOT / "data/sft_train.jsonl", "--eval_data", "", "--max_steps", "2"], check=False)
    assert not sentinel.exists()
    refused(proc, folder / "ckpt.pt")


def test_evaluate_cli(sft_dir, tmp_path):
    folder, sentinel = craft(sft_dir, tmp_path / "evil")
    proc = run([PY, "-m", "minialign.evaluation.evaluate", "--ckpt", folder, "--n", "2"], check=False)
    assert not sentinel.exists()
    assert refused(proc, folder / "ckpt.pt").startswith("python -m minialign.evaluation.evaluate: error: ")


def test_hf_export_cli(sft_dir, tmp_path):
    folder, sentinel = craft(sft_dir, tmp_path / "evil")
    proc = run([PY, "-m", "minialign.training.hf_export", "--ckpt", folder / "ckpt.pt",
                "--out", tmp_path / "hf"], check=False)
    assert not sentinel.exists()
    refused(proc, folder / "ckpt.pt")
    assert not (tmp_path / "hf").exists()


def test_classifier_file(tmp_path):
    path, sentinel = tmp_path / "classifier.pt", tmp_path / "classifier.PWNED"
    torch.save({"kind": "x", "weight": torch.zeros(2), "note": Payload(sentinel)}, path)
    with pytest.raises(checkpoint.CheckpointError, match="builtins.exec") as err:
        load_classifier(path)
    assert str(path) in str(err.value) and not sentinel.exists()


def test_hf_folder_with_only_a_pickled_bin_is_refused(tmp_path):
    """An HF folder loads from safetensors only; a pytorch_model.bin (a pickle) is never opened."""
    from minialign.models.hf_weights import model_config_to_hf
    folder, sentinel = tmp_path / "hf", tmp_path / "hf.PWNED"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(model_config_to_hf(tiny_model().cfg)))
    torch.save({"note": Payload(sentinel)}, folder / "pytorch_model.bin")
    with pytest.raises(FileNotFoundError, match="pytorch_model.bin"):
        checkpoint.load_model(folder)
    assert not sentinel.exists()


@pytest.mark.parametrize("escape", ["{{ cycler.__init__.__globals__.os.system('touch %s') }}",
                                    "{{ ''.__class__.__mro__[1].__subclasses__() }}{{ open('%s', 'w') }}"])
def test_a_chat_template_renders_in_the_sandbox(tmp_path, escape):
    """A tokenizer folder's chat template is jinja2 someone else wrote: no attribute walk reaches Python."""
    pytest.importorskip("jinja2")
    from jinja2.exceptions import SecurityError, UndefinedError

    from minialign.data.hf_tokenizer import render_template
    sentinel = tmp_path / "template.PWNED"
    with pytest.raises((SecurityError, UndefinedError)):
        render_template(escape % sentinel, [{"role": "user", "content": "hi"}], True)
    assert not sentinel.exists()


# ------------------------------------------------------------------------ earlier versions' checkpoints

def to_old_format(ckpt_dir):
    """Rewrite ckpt.pt the way save() wrote it before issue 29: NumPy's RNG state as np.random.get_state()
    (a tuple holding a uint32 ndarray, which a weights-only load refuses). Returns those states."""
    path = Path(ckpt_dir) / "ckpt.pt"
    state = torch.load(path, map_location="cpu", weights_only=False)  # our own file, just written
    old = []
    for rank_rng in state["rng"]:
        checkpoint.set_rng_state(rank_rng)
        rank_rng["numpy"] = np.random.get_state()
        old.append(rank_rng["numpy"])
    torch.save(state, path)
    return old


def sft_args(out, tok, *extra):
    return [PY, ROOT / "train_sft.py", "--data", ROOT / "data/sft_train.jsonl", "--eval_data", "",
            "--tokenizer", tok.path, "--out_dir", out, "--micro_batch_size", "4", "--max_steps", "4",
            "--warmup_steps", "1", "--log_every", "1", "--save_every", "100", *extra]


def losses(out):
    rows = [json.loads(l) for l in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in rows if "loss" in r]


def test_old_checkpoint_is_refused_then_upgraded_once_and_resumes_exactly(tmp_path, tok):
    full, parts = tmp_path / "full", tmp_path / "parts"
    run(sft_args(full, tok))
    run(sft_args(parts, tok, "--stop_after_steps", "2"))
    old_numpy = to_old_format(parts)
    ckpt_path = parts / "ckpt.pt"

    # refused, pointing at the opt-in conversion
    proc = run(sft_args(parts, tok, "--resume"), check=False)
    line = refused(proc, ckpt_path, needs="numpy")
    assert f"python -m minialign.training.checkpoint upgrade {parts} --trust-this-file" in line
    with pytest.raises(checkpoint.CheckpointError, match="upgrade"):
        checkpoint.load(parts)

    # the conversion needs the explicit flag
    before = ckpt_path.read_bytes()
    proc = run([PY, "-m", "minialign.training.checkpoint", "upgrade", parts], check=False)
    assert proc.returncode != 0 and "--trust-this-file" in proc.stderr
    assert ckpt_path.read_bytes() == before

    proc = run([PY, "-m", "minialign.training.checkpoint", "upgrade", parts, "--trust-this-file"])
    assert str(ckpt_path) in proc.stdout
    ckpt = checkpoint.load(parts)  # weights-only now
    assert ckpt["step"] == 2 and not ckpt["finished"]
    checkpoint.set_rng_state(ckpt["rng"][0])
    name, key, pos, has_gauss, gauss = np.random.get_state()
    assert (name, pos, has_gauss, gauss) == (old_numpy[0][0], *old_numpy[0][2:])
    assert np.array_equal(key, old_numpy[0][1])
    # a second upgrade has nothing to do
    assert "nothing to convert" in run([PY, "-m", "minialign.training.checkpoint", "upgrade", parts,
                                        "--trust-this-file"]).stdout

    run(sft_args(parts, tok, "--resume"))
    assert [s for s, _ in losses(full)] == [1, 2, 3, 4]
    assert losses(parts) == losses(full)  # exact, float for float
    a, b = checkpoint.load(full)["model"], checkpoint.load(parts)["model"]
    for k, v in a.items():
        assert torch.equal(v, b[k]), k


def test_upgrade_converts_nothing_but_numpy_arrays(sft_dir, tmp_path):
    """Even with --trust-this-file, upgrade unpickles only what earlier versions wrote: a payload is refused."""
    folder, sentinel = craft(sft_dir, tmp_path / "evil")
    proc = run([PY, "-m", "minialign.training.checkpoint", "upgrade", folder, "--trust-this-file"], check=False)
    assert not sentinel.exists()
    refused(proc, folder / "ckpt.pt")


def test_rng_state_round_trips_through_a_weights_only_load(tmp_path):
    """What save() stores of the RNGs is tensors and plain containers, restored to the same streams."""
    torch.save(checkpoint.rng_state(), tmp_path / "rng.pt")
    expected = (random.random(), np.random.rand(3), torch.rand(3))
    checkpoint.set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    again = (random.random(), np.random.rand(3), torch.rand(3))
    assert expected[0] == again[0] and np.array_equal(expected[1], again[1]) and torch.equal(expected[2], again[2])
