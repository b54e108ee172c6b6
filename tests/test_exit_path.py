"""How the trainer leaves (issue 29's `lct.stop`, issue 31 items 3 and 7): one decision after each
step, and an error never leaves a rank, a DataLoader worker or a collective behind.

The error tests run with data workers on (they ignore SIGINT/SIGTERM on purpose) and bound the
time from the injected fault (`lct.faults` prints `fault: ... (t=...)`) to the exit: EXIT_BOUND
seconds. Before the fix the processes waited on their workers (and the other rank in its
collective) until killed."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from conftest import ROOT, tiny_train_config

TRAIN = str(ROOT / "lct" / "train.py")
EXIT_BOUND = 60.0  # seconds from the fault to the last process gone (workers joined for <= 5 s, then SIGKILL)
QUIET = dict(sample={"every": 1000}, val={"every": 1000})


# ---------------------------------------------------------------------------------------------
# The Stopper's decision (in-process, no DeepSpeed)
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def stopper_factory():
    """Stoppers for one process; the signal handlers they install are put back afterwards."""
    from lct.stop import Stopper

    saved = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    yield lambda cfg, started=None: Stopper(cfg, __import__("lct.dist", fromlist=["DistInfo"]).DistInfo(),
                                            __import__("torch").device("cpu"), started)
    for s, h in saved.items():
        signal.signal(s, h)


def test_stopper_decides_end_signal_budget_and_skip_streak(tmp_path, latent_data, stopper_factory):
    """One decision per step: go on; the end (exit 0, final save); a signal (130/143, checkpoint
    only); the time budget (exit 0, saves); a streak of skipped steps (exit 3, no save), which
    wins over a signal that arrives with it."""
    from lct.config import load_config
    from lct.run import TrainState

    cfg = load_config(tiny_train_config(tmp_path, latent_data), ["run.max_consecutive_skips=2"])
    s = stopper_factory(cfg)
    at = lambda k: TrainState(applied_steps=k, data_steps=k)
    assert not s.poll(at(1), True) and not s.poll(at(1), False)  # one skip: go on
    stop = s.poll(at(1), False)
    assert (stop.reason, stop.code, stop.save) == ("skips", 3, False)
    s = stopper_factory(cfg)
    stop = s.poll(at(6), True)
    assert (stop.reason, stop.code, stop.save, stop.final, stop.quick) == ("end", 0, True, True, False)
    os.kill(os.getpid(), signal.SIGTERM)  # caught: a flag the next poll reads
    stop = s.poll(at(6), True)
    assert (stop.reason, stop.code, stop.save, stop.quick) == ("signal", 143, True, True)
    s = stopper_factory(cfg)
    os.kill(os.getpid(), signal.SIGINT)
    assert s.poll(at(2), True).code == 130
    budget = load_config(tiny_train_config(tmp_path, latent_data), ["run.time_budget_minutes=1"])
    s = stopper_factory(budget, started=time.time() - 58)
    assert not s.poll(at(1), True)  # 58 s of 60 gone; the next step fits
    s.mark -= 3  # a step of 3 s: the next one would pass the budget
    stop = s.poll(at(2), True)
    assert (stop.reason, stop.code, stop.save, stop.final) == ("budget", 0, True, False)


# ---------------------------------------------------------------------------------------------
# Errors with data workers on (item 3), a full disk (item 7)
# ---------------------------------------------------------------------------------------------


def launch(cmd, env):
    return subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **env},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)


def finish(proc, cfg_path: Path, timeout: float = 600):
    """(stdout, stderr, seconds from the fault to the exit) of a launch; a launch still running
    after `timeout` (the hang this file guards against) is killed with its process group and fails."""
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"the trainer did not exit within {timeout} s\n{err[-3000:]}")
    ended = time.time()
    fired = [float(t) for t in re.findall(r"^fault: .* \(t=([0-9.]+)\)$", err, re.M)]
    assert fired, err[-3000:]
    # Nothing of the run is left: no rank, no DataLoader worker (they carry the config path).
    left = [p for p in psutil.process_iter(["cmdline"]) if str(cfg_path) in " ".join(p.info["cmdline"] or [])]
    assert not left, [p.info["cmdline"] for p in left]
    return out, err, ended - min(fired)


@pytest.mark.proc
@pytest.mark.slow
def test_disk_full_during_a_save_is_one_line_and_the_next_start_resumes(tmp_path, latent_data):
    """~60 s. The save of step 4 meets a full disk (ENOSPC at its write, after DeepSpeed's files)
    with 2 data workers running: the trainer exits 1 within EXIT_BOUND s of the fault with one
    line naming the free space and the checkpoint that survives (step 2), no traceback; the same
    command then removes the partial checkpoint and resumes from step 2 to the end."""
    cfg = tiny_train_config(tmp_path, latent_data, run={"dir": str(tmp_path / "run"), "total_steps": 6,
                                                        "save_every": 2, "log_every": 1},
                            data={"num_workers": 2, "prefetch_factor": 2}, **QUIET)
    out, err, seconds = finish(launch([sys.executable, TRAIN, "--config", str(cfg)], {"LCT_FAULT_DISK_FULL": "4:0"}),
                               cfg)
    assert seconds < EXIT_BOUND, (seconds, err[-3000:])
    lines = [l for l in err.splitlines() if l.startswith("error (")]
    assert len(lines) == 1 and "Traceback" not in err, err[-3000:]
    run = tmp_path / "run"
    assert "disk full while writing" in lines[0] and "MiB free on" in lines[0], lines[0]
    assert f"checkpoint {run / 'checkpoints' / 'step00000002'} is complete and kept" in lines[0], lines[0]
    assert not (run / "checkpoints" / "step00000004" / "COMPLETE").exists()
    again = launch([sys.executable, TRAIN, "--config", str(cfg)], {})
    out, err = again.communicate(timeout=600)
    assert again.returncode == 0, err[-3000:]
    assert f"resumed from {run / 'checkpoints' / 'step00000002'}" in out
    assert json.loads((run / "checkpoints/step00000006/lct_state.json").read_text())["state"]["applied_steps"] == 6


@pytest.mark.proc
def test_an_error_on_one_of_two_ranks_ends_both_promptly(tmp_path, latent_data):
    """~60 s. `deepspeed --num_gpus 2`, 2 data workers per rank: rank 1 raises at data step 3 (a bug
    or CUDA out of memory) while rank 0 is in the step's collectives. Both ranks, their workers
    and the launcher are gone within EXIT_BOUND s of the fault, exit non-zero; rank 1 says what
    failed in one line (its traceback in run.dir/errors/rank1.txt), rank 0 that it stopped
    because rank 1 failed, not after dist_timeout_minutes."""
    from test_multirank import deepspeed_cmd

    cfg = tiny_train_config(tmp_path, latent_data, run={"dir": str(tmp_path / "run"), "total_steps": 100,
                                                        "save_every": 100, "log_every": 1},
                            data={"num_workers": 2, "prefetch_factor": 2}, **QUIET)
    proc = launch([*deepspeed_cmd(), "--config", str(cfg)], {"LCT_FAULT_ERROR": "3:1"})
    out, err, seconds = finish(proc, cfg)
    assert seconds < EXIT_BOUND, (seconds, err[-3000:])
    assert proc.returncode != 0
    mine = [l for l in err.splitlines() if "error (train): rank 1: RuntimeError: injected fault" in l]
    assert len(mine) == 1 and "(traceback: " in mine[0], err[-3000:]
    assert "Traceback" in (tmp_path / "run" / "errors" / "rank1.txt").read_text()
    other = [l for l in err.splitlines() if "error (train): rank 0: stopped: rank 1: RuntimeError" in l]
    assert len(other) == 1, err[-3000:]
    assert f'File "{ROOT / "lct"}' not in err  # no lct traceback on the terminal
