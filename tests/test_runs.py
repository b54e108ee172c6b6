"""Runs lose no work (issue 18): signals to the launchers' process groups, one trainer per run
directory, damaged and malicious checkpoints, world-size changes through universal checkpoints,
stale exports, run.resume=never, the per-invocation time budget, stats logged once.

The launches are the cost: one small finished run (conftest's `finished_run`, single process) is
shared and copied; the multi-process tests chain their launches (each leg resumes the one before)."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import ROOT, copy_finished_run, finished_run_config, run_cmd, tiny_train_config
from test_multirank import deepspeed_cmd, torchrun_cmd

TRAIN = str(ROOT / "lct" / "train.py")
ENV = {"OMP_NUM_THREADS": "1"}
QUIET = dict(sample={"every": 1000}, val={"every": 1000})


def rows(run: Path, kind="train"):
    return [r for r in map(json.loads, (run / "stats.jsonl").read_text().splitlines()) if r["kind"] == kind]


def state_of(run: Path, tag: str | None = None) -> dict:
    root = run / "checkpoints"
    tag = tag or (root / "latest").read_text().strip()
    return json.loads((root / tag / "lct_state.json").read_text())["state"]


def reseal(ckpt_dir: Path) -> None:
    """Record the current content of a checkpoint's files in its COMPLETE marker (a test edits a
    checkpoint on purpose; unsealed, the edit is damage)."""
    from lct.checkpoint import COMPLETE, format_sums, read_sums
    from lct.files import file_sha256

    sums = read_sums(ckpt_dir / COMPLETE)
    (ckpt_dir / COMPLETE).write_text(format_sums({n: file_sha256(ckpt_dir / n) for n in sums}))


def model_of(ckpt_dir: Path) -> dict:
    return torch.load(ckpt_dir / "mp_rank_00_model_states.pt", weights_only=True, map_location="cpu")["module"]


def copy_run(finished_run: Path, dest: Path, latent_data, **run):
    """A copy of conftest's `finished_run` (6 steps, checkpoints at 2, 4, 6; the 1-rank reference of
    the world-size test), resumed without grids or validation."""
    return copy_finished_run(finished_run, dest, latent_data, run, **QUIET)


def test_data_workers_survive_the_signals_the_trainer_handles(latent_data):
    """SIGINT and SIGTERM reach DataLoader workers with the process group (Ctrl-C, scancel,
    launch.py's terminate); they ignore them, so the batches the save step needs keep coming."""
    from test_train import _spec

    from lct.data import make_loader

    loader = make_loader(_spec(latent_data), 0, 40, num_workers=2, prefetch_factor=2, pin_memory=False)
    it = torch.utils.data.DataLoader.__iter__(loader)  # the multiprocessing iterator itself (its workers)
    first = [next(it) for _ in range(2)]
    for w in it._workers:
        os.kill(w.pid, signal.SIGINT)
        os.kill(w.pid, signal.SIGTERM)
    time.sleep(1.0)
    more = [next(it) for _ in range(6)]
    assert all(w.is_alive() for w in it._workers)
    assert [b["worker"] for b in first + more] == [0, 1] * 4
    del it


# ---------------------------------------------------------------------------------------------
# Checkpoints: damaged, malicious
# ---------------------------------------------------------------------------------------------


class Evil:
    """Unpickling this writes a marker file (what a planted checkpoint could do instead)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


DAMAGE = {
    "model_truncated": lambda d: os.truncate(d / "mp_rank_00_model_states.pt", 1000),
    "optimizer_missing": lambda d: (d / "zero_pp_rank_0_mp_rank_00_optim_states.pt").unlink(),
    "optimizer_truncated": lambda d: os.truncate(d / "zero_pp_rank_0_mp_rank_00_optim_states.pt", 5000),
    "ema_truncated": lambda d: os.truncate(d / "ema.safetensors", 100),
    "ema_missing": lambda d: (d / "ema.safetensors").unlink(),
    "rng_missing": lambda d: (d / "rng_rank0.pt").unlink(),
    "rng_empty": lambda d: os.truncate(d / "rng_rank0.pt", 0),
    "state_torn": lambda d: (d / "lct_state.json").write_text('{"state": {"applied'),
    "state_missing": lambda d: (d / "lct_state.json").unlink(),
}


@pytest.mark.proc
@pytest.mark.slow
def test_damaged_checkpoints_are_found_set_aside_and_the_previous_one_resumes(tmp_path, latent_data, finished_run):
    """Every kind of damage to the newest checkpoint is found from files alone; the resume falls
    back to the previous complete one with one warning line, moves the damaged one aside, and
    finishes the run: every step logged once, and a saved training time far past
    run.time_budget_minutes does not stop it (the budget is per invocation)."""
    from lct.checkpoint import problems

    src = finished_run / "run" / "checkpoints" / "step00000006"
    assert problems(src) is None
    for name, damage in DAMAGE.items():
        d = tmp_path / name
        shutil.copytree(src, d)
        damage(d)
        assert problems(d) is not None, name
    cfg = copy_run(finished_run, tmp_path / "resume", latent_data, time_budget_minutes=30)
    run = tmp_path / "resume" / "run"
    DAMAGE["optimizer_truncated"](run / "checkpoints" / "step00000006")
    rec = json.loads((run / "checkpoints/step00000004/lct_state.json").read_text())
    rec["state"]["train_seconds"] = 1e6  # cumulative training time far past the budget
    (run / "checkpoints/step00000004/lct_state.json").write_text(json.dumps(rec))
    reseal(run / "checkpoints/step00000004")  # an edit on purpose, not damage
    proc = run_cmd([sys.executable, TRAIN, "--config", str(cfg)], env=ENV)
    assert proc.returncode == 0, proc.stderr[-3000:]
    warning = [l for l in proc.stderr.splitlines() if "is damaged" in l]
    assert len(warning) == 1 and "zero_pp_rank_0_mp_rank_00_optim_states.pt" in warning[0], proc.stderr[-2000:]
    assert "moved to" in warning[0] and (run / "checkpoints" / "damaged" / "step00000006").is_dir()
    assert f"resumed from {run / 'checkpoints' / 'step00000004'}" in proc.stdout
    assert state_of(run)["applied_steps"] == 6 and problems(run / "checkpoints" / "step00000006") is None
    assert [r["step"] for r in rows(run)] == [1, 2, 3, 4, 5, 6]  # steps 5 and 6 of the first run dropped
    # Same numbers as the uninterrupted run (the optimizer state came back from step 4).
    a, b = model_of(src), model_of(run / "checkpoints" / "step00000006")
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.proc
def test_malicious_checkpoint_pickles_run_no_code(tmp_path, latent_data, finished_run):
    """A pickle that would run a command, planted in the optimizer file or the model file: the
    resume check refuses it (auto: set aside; an explicit run.resume: refused in one line), and
    DeepSpeed's own loader under `weights_only_loads` cannot run it either."""
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    from lct.checkpoint import problems, weights_only_loads
    from lct.config import load_config
    from lct.errors import UserError
    from lct.run import find_resume

    marker = tmp_path / "pwned"
    cfg_path = copy_run(finished_run, tmp_path, latent_data)
    ckpts = tmp_path / "run" / "checkpoints"
    for tag, name in (("step00000006", "zero_pp_rank_0_mp_rank_00_optim_states.pt"),
                      ("step00000004", "mp_rank_00_model_states.pt")):
        f = ckpts / tag / name
        sd = torch.load(f, weights_only=False)  # our own file: fine to trust here
        sd["ds_version"] = Evil(marker)
        torch.save(sd, f)
        rec = json.loads((ckpts / tag / "lct_state.json").read_text())
        rec["files"][name] = f.stat().st_size  # a careful forger also fixes the recorded size
        (ckpts / tag / "lct_state.json").write_text(json.dumps(rec))
        assert "posix.system" in problems(ckpts / tag)
    with pytest.raises(UserError, match="posix.system"):
        find_resume(load_config(cfg_path, [f"run.resume={ckpts / 'step00000006'}"]))
    got = find_resume(load_config(cfg_path))
    assert got == ckpts / "step00000002"
    assert sorted(p.name for p in (ckpts / "damaged").iterdir()) == ["step00000004", "step00000006"]
    with weights_only_loads(), pytest.raises(Exception, match="posix.system|Unsupported global"):
        TorchCheckpointEngine().load(str(ckpts / "damaged/step00000006/zero_pp_rank_0_mp_rank_00_optim_states.pt"))
    # The allow-list is enough for DeepSpeed's real state.
    with weights_only_loads():
        TorchCheckpointEngine().load(str(ckpts / "step00000002/zero_pp_rank_0_mp_rank_00_optim_states.pt"))
    assert not marker.exists()


# ---------------------------------------------------------------------------------------------
# Exports and run.resume=never
# ---------------------------------------------------------------------------------------------


@pytest.mark.proc
@pytest.mark.slow
def test_stale_exports_are_remade_and_resume_never_moves_the_old_run_aside(tmp_path, latent_data, finished_run):
    """A kill between the final checkpoint and its export: the next start re-makes the export from
    the checkpoint (no DeepSpeed) instead of calling the run complete with old weights; an export
    of an EMA the config dropped moves to export/stale/. Then run.resume=never moves the whole
    previous run to previous/<time>/ and starts afresh (no old checkpoint left to resume)."""
    cfg = copy_run(finished_run, tmp_path, latent_data)
    run = tmp_path / "run"
    rec = json.loads((run / "export/ema/lct_export.json").read_text())
    rec["step"] = 4
    (run / "export/ema/lct_export.json").write_text(json.dumps(rec))  # the step-4 export, never replaced
    (run / "export" / ".ema.tmp99999").mkdir()                        # a killed export's temp folder
    one_ema = '[{"name": "ema", "halflife_images": 200}]'
    proc = run_cmd([sys.executable, TRAIN, "--config", str(cfg), f"ema.models={one_ema}"], env=ENV)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "re-made the final export(s) ema of step 6" in proc.stderr and "is complete" in proc.stdout
    assert json.loads((run / "export/ema/lct_export.json").read_text())["step"] == 6
    assert (run / "export/stale/slow-step00000006/lct_export.json").is_file() and not (run / "export/slow").exists()
    assert not (run / "export" / ".ema.tmp99999").exists()
    ref = run_cmd([sys.executable, TRAIN, "--config", str(cfg), "run.resume=never", "run.total_steps=2",
                   "run.allow_total_steps_change=true"], env=ENV)
    assert ref.returncode == 0, ref.stderr[-3000:]
    line = [l for l in ref.stderr.splitlines() if l.startswith("run.resume=never: moved")]
    assert len(line) == 1 and "checkpoints" in line[0]
    (prev,) = list((run / "previous").iterdir())
    assert (prev / "checkpoints" / "step00000006" / "COMPLETE").is_file() and (prev / "stats.jsonl").is_file()
    assert sorted(p.name for p in (run / "checkpoints").iterdir() if p.name.startswith("step")) == ["step00000002"]
    assert [r["step"] for r in rows(run)] == [1, 2]


# ---------------------------------------------------------------------------------------------
# Signals, the run-directory lock, world-size changes (real launchers, CPU ranks)
# ---------------------------------------------------------------------------------------------


def start(cmd, **kw):
    env = {**os.environ, **ENV, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, **kw)  # its own process group, like a terminal job


def wait_for_rows(run: Path, n: int, proc, timeout=300):
    deadline = time.time() + timeout
    while time.time() < deadline:
        f = run / "stats.jsonl"
        if f.exists() and len([l for l in f.read_text().splitlines() if '"train"' in l]) >= n:
            return
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        time.sleep(0.5)
    raise AssertionError("the run logged too few steps")


def workers_of(proc) -> list[int]:
    """pids of the DataLoader workers under a launcher (forks of the ranks: the same command line)."""
    import psutil

    def trainer(p):
        try:
            return "lct/train.py" in " ".join(p.cmdline())
        except psutil.Error:
            return False

    return [p.pid for p in psutil.Process(proc.pid).children(recursive=True) if trainer(p) and trainer(p.parent())]


def lct_traceback(err: str) -> bool:
    return f'File "{ROOT / "lct"}' in err  # the launchers' own tracebacks on a signal are upstream's


@pytest.mark.proc
def test_signals_to_the_launchers_process_groups_save_on_every_rank_then_resume(tmp_path, latent_data):
    """With DataLoader workers running (num_workers 2): a second trainer on the same run.dir is
    refused in one line; SIGINT to the process group of `deepspeed` (Ctrl-C) and SIGTERM to that of
    `torchrun` (scancel) each save a complete checkpoint on both ranks, exit 130 / 143 with one
    line, and the next launch resumes from it; SIGTERM to the top-level deepspeed runner alone
    (upstream leaves the ranks training as orphans) also saves and stops the ranks."""
    cfg = tiny_train_config(tmp_path, latent_data, run={"dir": str(tmp_path / "run"), "total_steps": 100000,
                                                        "save_every": 100000, "log_every": 1},
                            data={"num_workers": 2, "prefetch_factor": 2}, **QUIET)
    run = tmp_path / "run"
    legs = [("deepspeed", signal.SIGINT, "group"), ("torchrun", signal.SIGTERM, "group"),
            ("deepspeed", signal.SIGTERM, "runner")]
    last = 0
    for i, (launcher, sig, target) in enumerate(legs):
        proc = start([*(deepspeed_cmd() if launcher == "deepspeed" else torchrun_cmd(2)), "--config", str(cfg)])
        wait_for_rows(run, last + 2, proc)
        if i == 0:
            assert len(workers_of(proc)) >= 4  # 2 ranks x 2 workers are up
            second = run_cmd([sys.executable, TRAIN, "--config", str(cfg)], env=ENV, timeout=300)
            assert second.returncode == 2 and f"run.dir={run} is in use by another trainer" in second.stderr
            assert "Traceback" not in second.stderr
        if target == "group":
            os.killpg(proc.pid, sig)
        else:
            os.kill(proc.pid, sig)
        out, err = proc.communicate(timeout=300)  # the pipes close when the ranks are gone
        code = 130 if sig == signal.SIGINT else 143
        said = [l for l in err.splitlines() if "saved on every rank" in l]
        assert len(said) == 1 and f"exiting with {code}" in said[0], err[-4000:]
        assert "DataLoader worker" not in err and not lct_traceback(err), err[-4000:]
        if target == "runner":
            assert "the launcher deepspeed runner (pid" in err
        tag = (run / "checkpoints" / "latest").read_text().strip()
        assert tag in said[0] and (run / "checkpoints" / tag / "COMPLETE").is_file()
        st = state_of(run, tag)
        assert st["applied_steps"] > last
        if i:
            assert f"resumed from {run / 'checkpoints' / prev}" in out
        last, prev = st["applied_steps"], tag
    steps = [r["step"] for r in rows(run)]
    assert steps == sorted(set(steps))  # each step logged once across the four launches


@pytest.mark.proc
def test_world_size_2_to_1_to_2_through_universal_checkpoints(tmp_path, latent_data, finished_run):
    """2 ranks (`deepspeed` launcher, ZeRO-2; stopped after the step-2 checkpoint) -> 1 process
    (stopped after step 4) -> 2 ranks (torchrun, to the end): each change of world size goes
    through a DeepSpeed universal checkpoint, and the losses and final weights equal the
    uninterrupted 1-process run's (`finished_run`, same global batch, no dropout or OT): the same
    curriculum, data position and optimizer state. This also covers what two former tests of
    test_multirank checked: 2 ranks == 1 process (losses within rtol 1e-5 on steps 1-2 and 5-6,
    weights at the end) and the ZeRO-2 launch that saves every rank's files and resumes."""
    cfg = finished_run_config(tmp_path, latent_data, **QUIET)
    run = tmp_path / "run"
    legs = [(deepspeed_cmd(), "2"), ([sys.executable, TRAIN], "4"), (torchrun_cmd(2), None)]
    for i, (cmd, stop_after) in enumerate(legs):
        env = {**ENV, **({"LCT_FAULT_EXIT_AFTER_SAVE": stop_after} if stop_after else {})}
        proc = run_cmd([*cmd, "--config", str(cfg)], env=env)
        assert state_of(run)["applied_steps"] == 2 * (i + 1), proc.stderr[-3000:]
        if i:
            assert "through a DeepSpeed universal checkpoint" in proc.stderr, proc.stderr[-3000:]
            assert '"applied_steps": %d' % (2 * i) in proc.stdout
        else:  # two ZeRO-2 ranks each wrote their RNG and optimizer partition into the checkpoint
            assert json.loads((run / "deepspeed.json").read_text())["zero_optimization"]["stage"] == 2
            for f in ("rng_rank0.pt", "rng_rank1.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt",
                      "zero_pp_rank_1_mp_rank_00_optim_states.pt", "ema.safetensors", "COMPLETE"):
                assert (run / "checkpoints" / "step00000002" / f).is_file(), f
            assert state_of(run)["images_seen"] == 16
    assert proc.returncode == 0 and state_of(run)["applied_steps"] == 6 and state_of(run)["data_steps"] == 6
    assert state_of(run)["resume_count"] == 2
    ref = finished_run / "run"
    a, b = rows(ref), rows(run)
    assert [r["step"] for r in b] == [1, 2, 3, 4, 5, 6] and [r["N"] for r in a] == [r["N"] for r in b]
    assert torch.allclose(torch.tensor([r["loss"] for r in a], dtype=torch.float64),
                          torch.tensor([r["loss"] for r in b], dtype=torch.float64), rtol=1e-5, atol=0)
    wa, wb = model_of(ref / "checkpoints/step00000006"), model_of(run / "checkpoints/step00000006")
    for k in wa:
        assert torch.allclose(wa[k], wb[k], rtol=1e-5, atol=1e-7), k


# ---------------------------------------------------------------------------------------------
# Content hashes (issue 31): flipped bytes, every checkpoint damaged, universal folders, run.dir
# ---------------------------------------------------------------------------------------------


def flip_tensor_byte(path: Path) -> None:
    """Flip one byte inside the largest tensor of a torch zip file (same size; it still loads)."""
    import zipfile

    with zipfile.ZipFile(path) as z:
        info = max((i for i in z.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    with open(path, "r+b") as f:
        f.seek(info.header_offset + 26)
        name_len, extra_len = int.from_bytes(f.read(2), "little"), int.from_bytes(f.read(2), "little")
        at = info.header_offset + 30 + name_len + extra_len + info.file_size // 2
        f.seek(at)
        b = f.read(1)
        f.seek(at)
        f.write(bytes([b[0] ^ 0x40]))


def flip_last_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x40
    path.write_bytes(bytes(data))


def flip_state_digit(path: Path) -> None:
    """A changed counter in lct_state.json that still parses (same size)."""
    text = path.read_text()
    at = text.index('"images_seen": ') + len('"images_seen": ')
    path.write_text(text[:at] + ("1" if text[at] != "1" else "2") + text[at + 1:])


FLIPS = {
    "mp_rank_00_model_states.pt": flip_tensor_byte,
    "zero_pp_rank_0_mp_rank_00_optim_states.pt": flip_tensor_byte,
    "ema.safetensors": flip_last_byte,
    "lct_state.json": flip_state_digit,
    "rng_rank0.pt": flip_tensor_byte,
}


@pytest.mark.proc
@pytest.mark.parametrize("name", sorted(FLIPS))
def test_flipped_bytes_in_each_kind_of_checkpoint_file_are_damage(tmp_path, finished_run, name):
    """The probe's silent corruption: a byte flipped inside a file (same size, still loads, weights
    off) no longer matches the sha256 recorded when it was written; the file is named."""
    from lct.checkpoint import problems, weights_only_loads
    from lct.files import file_sha256

    d = tmp_path / "step00000006"
    shutil.copytree(finished_run / "run" / "checkpoints" / "step00000006", d)
    assert problems(d) is None
    before = file_sha256(d / name)
    size = (d / name).stat().st_size
    FLIPS[name](d / name)
    assert (d / name).stat().st_size == size and file_sha256(d / name) != before
    if name.endswith(".pt"):
        with weights_only_loads():
            torch.load(d / name, weights_only=True)  # still loads: only the hash tells
    problem = problems(d)
    assert problem is not None and problem.startswith(name) and "sha256" in problem, problem


@pytest.mark.proc
@pytest.mark.slow
def test_every_checkpoint_damaged_refuses_in_one_line_never_restarts(tmp_path, latent_data, finished_run):
    """Flipped bytes in every checkpoint (model, optimizer, EMA): the start sets each aside and
    refuses in one line (exit 2) instead of training from step 0 and exiting 0; so does the next
    start, with all of them already set aside."""
    cfg = copy_run(finished_run, tmp_path, latent_data)
    run = tmp_path / "run"
    ckpts = run / "checkpoints"
    for tag, name in (("step00000006", "ema.safetensors"), ("step00000004", "zero_pp_rank_0_mp_rank_00_optim_states.pt"),
                      ("step00000002", "mp_rank_00_model_states.pt")):
        FLIPS[name](ckpts / tag / name)
    stats = (run / "stats.jsonl").read_text()
    proc = run_cmd([sys.executable, TRAIN, "--config", str(cfg)], env=ENV)
    assert proc.returncode == 2, proc.stderr[-3000:]
    line = [l for l in proc.stderr.splitlines() if "no usable checkpoint" in l]
    assert len(line) == 1 and line[0].endswith("fix one or pass run.resume=never"), proc.stderr[-3000:]
    assert all(t in line[0] for t in ("step00000002", "step00000004", "step00000006"))
    assert len([l for l in proc.stderr.splitlines() if l.startswith("warning: checkpoint")]) == 3
    assert "Traceback" not in proc.stderr and (run / "stats.jsonl").read_text() == stats
    assert sorted(p.name for p in (ckpts / "damaged").iterdir()) == ["step00000002", "step00000004", "step00000006"]
    # The next start finds them already set aside: refused the same way, not a new run.
    from lct.config import load_config
    from lct.errors import UserError
    from lct.run import find_resume

    with pytest.raises(UserError, match="step00000002, step00000004, step00000006; set aside in .*; fix one or "
                                        "pass run.resume=never"):
        find_resume(load_config(cfg))


@pytest.mark.proc
def test_universal_folders_are_checked_before_reuse(tmp_path, finished_run, capsys):
    """`stepN/universal/` (DeepSpeed's world-size-free copy) records the sha256 of its files; one
    with flipped bytes, a planted pickle (its sum forged to match), or made before lct checked them
    (an empty COMPLETE) is set aside with one line and converted again, never loaded."""
    from lct.checkpoint import COMPLETE, read_sums, to_universal, universal_problems

    ckpt = tmp_path / "checkpoints" / "step00000006"
    shutil.copytree(finished_run / "run" / "checkpoints" / "step00000006", ckpt)
    out = to_universal(ckpt)
    sums = read_sums(out / COMPLETE)
    assert sums and universal_problems(out) is None
    assert set(sums) == {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()} - {COMPLETE}
    big = max((n for n in sums if n.endswith("fp32.pt")), key=lambda n: (out / n).stat().st_size)
    marker = tmp_path / "pwned"

    def flipped():
        flip_tensor_byte(out / big)

    def planted():
        torch.save({"param": Evil(marker)}, out / big)
        reseal(out)  # a careful forger fixes the sum too

    def old_format():
        (out / COMPLETE).write_text("")

    for damage, why in ((flipped, "does not match the sha256"), (planted, "posix.system"),
                        (old_format, "lists no sha256 sums")):
        damage()
        capsys.readouterr()
        assert to_universal(ckpt) == out
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and why in err[0] and "converting" in err[0], err
        assert universal_problems(out) is None
    aside = sorted(p.name for p in (tmp_path / "checkpoints" / "damaged").iterdir())
    assert aside == ["step00000006-universal", "step00000006-universal.1", "step00000006-universal.2"]
    assert not marker.exists()


@pytest.mark.proc
def test_an_ema_name_past_the_schema_cannot_write_outside_run_dir(tmp_path, latent_data, finished_run):
    """The one guard of every checkpoint and export path: an EMA name that got past the schema
    (`../escape`, as the probe's config had it) raises before anything is written, and the folder
    it named, pre-filled, survives (the export's atomic replace used to remove it)."""
    from lct.checkpoint import load_ema_file
    from lct.config import load_config
    from lct.dist import DistInfo
    from lct.run import export_emas
    from lct.models.build import build_network
    from lct.preflight import preflight

    cfg = load_config(copy_run(finished_run, tmp_path, latent_data))
    start = preflight(cfg, DistInfo(), monitor=False)
    net = build_network(cfg, start.desc, start.manifest)
    ema = load_ema_file(tmp_path / "run/checkpoints/step00000006/ema.safetensors")["ema"]
    target = tmp_path / "escape"
    target.mkdir()
    (target / "keep.txt").write_text("mine")
    bad = "../../escape"
    cfg.ema.models[0].__dict__["name"] = bad  # past the schema's validation
    with pytest.raises(RuntimeError, match="not inside run.dir"):
        export_emas(cfg, net, {bad: ema}, [bad], start.manifest, 6, 48)
    assert (target / "keep.txt").read_text() == "mine" and sorted(p.name for p in target.iterdir()) == ["keep.txt"]
