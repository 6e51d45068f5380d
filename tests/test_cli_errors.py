"""User errors read as one line (file:line and what is wrong, exit status 1); internal errors keep their traceback."""

import os
import subprocess
import sys

import pytest
from conftest import ROOT

from minialign.data.formats import DataError
from minialign.errors import run_cli


def _run(args, tmp_path, **env):
    return subprocess.run([sys.executable, *map(str, args)], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "MINIALIGN_DEBUG": "", **env})


@pytest.fixture
def bad_jsonl(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}\n'
                    '{bad json\n')
    return path


def test_a_malformed_data_line_is_one_line_naming_the_file_and_line(tmp_path, bad_jsonl, tok):
    tokenizer_path = tok.path
    proc = _run(["train_sft.py", "--data", bad_jsonl, "--tokenizer", tokenizer_path, "--max_steps", 1,
                 "--out_dir", tmp_path / "out"], tmp_path)
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith(f"train_sft.py: error: {bad_jsonl}:2: malformed JSON")
    debug = _run(["train_sft.py", "--data", bad_jsonl, "--tokenizer", tokenizer_path, "--max_steps", 1,
                  "--out_dir", tmp_path / "out"], tmp_path, MINIALIGN_DEBUG="1")
    assert debug.returncode == 1 and "Traceback" in debug.stderr and "DataError" in debug.stderr


def test_a_missing_checkpoint_is_one_line_for_a_module_command(tmp_path):
    proc = _run(["-m", "minialign.evaluation.evaluate", "--ckpt", tmp_path / "nothing_here"], tmp_path)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    line = proc.stderr.strip().splitlines()[-1]
    assert line.startswith("python -m minialign.evaluation.evaluate: error: ") and "nothing_here" in line


def test_internal_errors_keep_their_traceback():
    def buggy():
        return {}["missing"]

    with pytest.raises(KeyError):
        run_cli(buggy)
    with pytest.raises(SystemExit) as err:
        run_cli(lambda: (_ for _ in ()).throw(DataError("x.jsonl", 3, "bad")))
    assert err.value.code == 1
