"""The one stage runner (minialign.experiments.stages), used by the main job and the IMDb driver."""

import json
import os
import sys

import pytest

from minialign.experiments.stages import Stage, add_time, run, run_all


def _writer(path, text="x", sleep=0.0):
    return [sys.executable, "-c", f"import time; time.sleep({sleep}); open(r'{path}', 'a').write('{text}')"]


def test_run_prints_the_command_skips_what_is_done_and_force_redoes_it(tmp_path, capsys):
    out, marker = tmp_path / "out", tmp_path / "ran.txt"
    st = Stage("sft", _writer(marker), done=lambda: marker.exists(), where="somewhere")
    seconds = run(st, out)
    assert seconds is not None and marker.read_text() == "x"
    printed = capsys.readouterr().out
    assert printed.startswith("[sft] $ ") and "ran.txt" in printed  # the command as a user would type it
    assert run(st, out) is None and marker.read_text() == "x"  # done: skipped, not run again
    assert "[sft] already done in somewhere, skipping" in capsys.readouterr().out
    assert run(st, out, force=True) is not None and marker.read_text() == "xx"
    assert set(json.loads((out / "timings.json").read_text())) == {"sft"}


def test_times_replace_or_accumulate(tmp_path):
    out = tmp_path / "out"
    add_time(out, "ppo/train", 2.0)
    add_time(out, "ppo/train", 3.0)  # a run trained in two segments sums them
    assert json.loads((out / "timings.json").read_text())["ppo/train"] == 5.0
    run(Stage("ppo", _writer(tmp_path / "a.txt", sleep=0.2), timing="ppo/train"), out, accumulate=True)
    assert json.loads((out / "timings.json").read_text())["ppo/train"] > 5.0
    run(Stage("rm", _writer(tmp_path / "b.txt")), out)
    run(Stage("rm", _writer(tmp_path / "b.txt")), out)
    assert json.loads((out / "timings.json").read_text())["rm"] < 5.0  # replaced, not summed


def test_a_failing_foreground_stage_raises(tmp_path):
    with pytest.raises(Exception):
        run(Stage("bad", [sys.executable, "-c", "raise SystemExit(4)"]), tmp_path)


def test_concurrent_stages_wait_for_what_they_need_and_a_failure_stops_the_others(tmp_path, monkeypatch):
    """run_all with jobs=2: ppo starts only after rm is done, independent stages overlap, each concurrent stage gets
    cores // running threads unless OMP_NUM_THREADS is set, and a failing stage stops the rest naming its log."""
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)

    def stage(name, seconds, code=0):  # a fake stage: records when it ran and its thread count
        return [sys.executable, "-c", f"import os, time; t0 = time.time(); time.sleep({seconds}); "
                f"open(r'{tmp_path}/{name}.txt', 'w').write(f'{{t0}} {{time.time()}} ' "
                f"+ os.environ.get('OMP_NUM_THREADS', 'unset')); print('{name} says bye'); raise SystemExit({code})"]

    def span(name):
        t0, t1, threads = (tmp_path / f"{name}.txt").read_text().split()
        return float(t0), float(t1), threads

    out = tmp_path / "out"
    run_all([Stage("rm", stage("rm", 0.5)), Stage("dpo", stage("dpo", 2.0)), Stage("ppo", stage("ppo", 0.1), needs=("rm",))],
            out, jobs=2)
    rm, dpo, ppo = span("rm"), span("dpo"), span("ppo")
    assert ppo[0] >= rm[1]  # ppo needs rm
    assert dpo[0] < rm[1] and ppo[0] < dpo[1]  # dpo overlapped both
    assert rm[2] == dpo[2] == ppo[2] == str(max(1, (os.cpu_count() or 1) // 2))
    assert "rm says bye" in (out / "logs" / "rm.log").read_text()
    assert json.loads((out / "timings.json").read_text()).keys() == {"rm", "dpo", "ppo"}

    monkeypatch.setenv("OMP_NUM_THREADS", "3")  # the user's setting wins
    run_all([Stage("rm", stage("rm3", 0.1)), Stage("dpo", stage("dpo3", 0.1))], tmp_path / "out3", jobs=2)
    assert span("rm3")[2] == span("dpo3")[2] == "3"

    with pytest.raises(SystemExit) as err:
        run_all([Stage("rm", stage("rm2", 30)), Stage("dpo", stage("dpo2", 0.1, code=3))], tmp_path / "out2", jobs=2)
    assert "[dpo] failed (exit 3)" in str(err.value) and "dpo2 says bye" in str(err.value)
    assert not (tmp_path / "rm2.txt").exists()  # stopped, not left to finish its 30 s


