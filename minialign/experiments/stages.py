"""The one stage runner: the main job (minialign.pipeline) and every experiment driver run their stages with it.

A stage is a command a user could type (a training script, a `python -m` module), run from the repository root
in a subprocess, so each stage is exactly the script you can read. The runner
  - prints the command before it runs (`[name] $ python train_dpo.py ...`),
  - skips a stage whose `done()` says its output exists (unless --force), printing where it is,
  - tells a training script what to do with a run already in its --out_dir (`continue_flags`: --resume an unfinished
    checkpoint, --overwrite with --force or leftovers without a checkpoint), since the scripts refuse such a folder
    otherwise (minialign.training.checkpoint.check_out_dir),
  - records each stage's wall time in OUT/timings.json (the report's "wall s" column),
  - runs stages that do not need each other at once when asked (`jobs` > 1; the main job does on a CPU machine):
    each concurrent stage writes OUT/logs/<stage>.log and gets cores // (stages running) OpenMP threads unless
    OMP_NUM_THREADS is set; a stage that is alone runs in the foreground with its progress bar; a failing stage
    stops the others and prints the end of its log.

On 2 CPU cores two 1-thread stages finished 1.3x sooner than the same two one after the other at 2 threads (DPO and
GRPO, 40 steps each: 34.6 s vs 23.2 + 22.2 s; the small models use a second thread poorly).
"""

from __future__ import annotations

import os
import shlex
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from minialign.evaluation.report import load_timings, record_timing
from minialign.training import checkpoint

ROOT = Path(__file__).resolve().parents[2]  # the repository root: scripts run from here


@dataclass
class Stage:
    name: str
    cmd: list  # the command, items str()-ed when it runs
    done: Callable[[], bool] = lambda: False  # True when the stage's output exists (then it is skipped)
    needs: tuple[str, ...] = ()  # stages whose outputs this one reads (for concurrent runs)
    where: str = ""  # what to print when skipped ("already done in WHERE")
    timing: str = ""  # key in timings.json (default: name)
    env: dict = field(default_factory=dict)  # extra environment variables


def show(cmd) -> str:
    return " ".join(shlex.quote(str(c)) for c in cmd)


def run_finished(run_dir: Path) -> bool:
    state = checkpoint.run_state(run_dir)
    return bool(state and state["finished"])


def continue_flags(run_dir: Path, force: bool = False) -> list[str]:
    """What a driver passes a training script about the run already in run_dir, which it must name (the scripts
    refuse a folder holding a run otherwise): nothing for an empty folder; --overwrite to redo it (force) or when it
    holds leftovers and no checkpoint; --resume to continue an unfinished checkpoint. (A finished run is skipped.)"""
    state = checkpoint.run_state(run_dir)
    if state is None:
        return []
    if state["checkpoint"] and not state["finished"] and not force:
        return ["--resume"]
    return ["--overwrite"]


def add_time(out: Path, key: str, seconds: float) -> None:
    """Add `seconds` to OUT/timings.json[key] (a stage run in several invocations sums its parts)."""
    record_timing(out, key, load_timings(out).get(key, 0.0) + seconds)


def skipped(stage: Stage) -> bool:
    if stage.done():
        print(f"[{stage.name}] already done{f' in {stage.where}' if stage.where else ''}, skipping", flush=True)
        return True
    return False


def run(stage: Stage, out: Path, force: bool = False, accumulate: bool = False) -> float | None:
    """Run one stage in the foreground (its progress bar on this terminal) unless done; its wall seconds (None if
    skipped). The time replaces the stage's entry in timings.json, or adds to it with accumulate=True."""
    if not force and skipped(stage):
        return None
    print(f"[{stage.name}] $ {show(stage.cmd)}", flush=True)
    t0 = time.time()
    subprocess.run([str(c) for c in stage.cmd], cwd=ROOT, check=True, env={**os.environ, **stage.env})
    seconds = time.time() - t0
    (add_time if accumulate else record_timing)(out, stage.timing or stage.name, seconds)
    return seconds


def run_all(stages: list[Stage], out: Path, force: bool = False, jobs: int = 1,
            on_done: Callable[[str, float], None] | None = None) -> None:
    """Run `stages` (in their order of priority), up to `jobs` at once, each as soon as the stages it needs are
    done (a needed stage not in `stages` must already be finished). on_done(name, seconds) after each."""
    def report_done(name, seconds):
        if on_done is not None:
            on_done(name, seconds)

    if jobs <= 1:
        for stage in stages:
            seconds = run(stage, out, force)
            if seconds is not None:
                report_done(stage.name, seconds)
        return
    by_name = {s.name: s for s in stages}
    pending = [s.name for s in stages if force or not skipped(s)]
    cores = os.cpu_count() or 1
    running: dict[str, tuple] = {}  # name -> (process, log file, start time, log path)
    (out / "logs").mkdir(parents=True, exist_ok=True)
    while pending or running:
        ready = [n for n in pending if not any(d in pending or d in running for d in by_name[n].needs)]
        if not running and len(ready) == 1:  # alone (e.g. SFT, which every other stage needs): in the foreground
            pending.remove(ready[0])
            report_done(ready[0], run(by_name[ready[0]], out, force=True))
            continue
        width = min(jobs, len(running) + len(ready)) or 1
        for name in ready[: jobs - len(running)]:
            pending.remove(name)
            stage = by_name[name]
            env = {**os.environ, **stage.env}
            env["OMP_NUM_THREADS"] = env.get("OMP_NUM_THREADS") or str(max(1, cores // width))
            log_path = out / "logs" / f"{name}.log"
            log = open(log_path, "w")
            print(f"[{name}] $ OMP_NUM_THREADS={env['OMP_NUM_THREADS']} {show(stage.cmd)}  (log: {log_path})",
                  flush=True)
            proc = subprocess.Popen([str(c) for c in stage.cmd], cwd=ROOT, env=env, stdout=log,
                                    stderr=subprocess.STDOUT)
            running[name] = (proc, log, time.time(), log_path)
        if not running:  # cannot happen when `needs` has no cycle; never spin
            raise RuntimeError(f"no stage of {pending} can start")
        time.sleep(0.2)
        for name, (proc, log, t0, log_path) in list(running.items()):
            if proc.poll() is None:
                continue
            log.close()
            del running[name]
            if proc.returncode:
                for other, other_log, _, _ in running.values():
                    other.terminate()
                    other.wait()
                    other_log.close()
                tail = "".join(log_path.read_text(errors="replace").replace("\r", "\n").splitlines(True)[-30:])
                raise SystemExit(f"[{name}] failed (exit {proc.returncode}); the end of {log_path}:\n{tail}")
            seconds = time.time() - t0
            record_timing(out, by_name[name].timing or name, seconds)
            report_done(name, seconds)
