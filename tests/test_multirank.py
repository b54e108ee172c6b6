"""The trainer across ranks with the real launchers (deepspeed, torchrun) on CPU ranks (gloo):
partitioned EMA, non-finite steps, preemption, two "nodes". Each test launches real processes:
they are slow by nature (marked proc)."""

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from conftest import ROOT, run_cmd, tiny_train_config

pytestmark = pytest.mark.proc
TRAIN = str(ROOT / "lct" / "train.py")
ENV = {"OMP_NUM_THREADS": "1"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def deepspeed_cmd(n=2):
    return [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(n),
            "--master_port", str(free_port()), TRAIN]


def torchrun_cmd(n=2, *extra):
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(n),
            "--master_port", str(free_port()), *extra, TRAIN]


def state_of(run: Path, tag: str | None = None) -> dict:
    root = run / "checkpoints"
    tag = tag or (root / "latest").read_text().strip()
    return json.loads((root / tag / "lct_state.json").read_text())["state"]


def stats(run: Path, kind="train"):
    return [r for r in map(json.loads, (run / "stats.jsonl").read_text().splitlines()) if r["kind"] == kind]


def quiet(**sections):
    return dict(sample={"every": 1000}, val={"every": 1000}, **sections)


# The ZeRO-2 launch that saves every rank's files and resumes, and 2 ranks == 1 process (losses and
# weights), are checked by tests/test_runs.py::test_world_size_2_to_1_to_2_through_universal_checkpoints
# (its legs: `deepspeed` 2 ranks ZeRO-2, 1 process, torchrun 2 ranks, each compared with the 1-process
# run); a same-world-size resume on 2 ranks by test_sigterm_to_one_rank_saves_and_both_exit_then_resume
# and test_runs.py::test_signals_to_the_launchers_process_groups_save_on_every_rank_then_resume.


def test_partitioned_ema_gathers_to_the_full_ema_bitwise(tmp_path):
    """Two gloo ranks keep EMA slices of the same fp32 weights; the gathered EMA equals the EMA a
    single process keeps of the whole vector, bit for bit."""
    script = tmp_path / "ema_check.py"
    script.write_text(textwrap.dedent("""
        import os, sys, torch, torch.distributed as dist
        from lct.ema import PartitionedEMA
        dist.init_process_group("gloo")
        rank, world = dist.get_rank(), dist.get_world_size()
        torch.manual_seed(0)
        module = torch.nn.Sequential(torch.nn.Linear(13, 7), torch.nn.Linear(7, 5), torch.nn.LayerNorm(5))
        part = PartitionedEMA(module, {"ema": 50.0, "slow": 900.0}, rank, world)
        full = PartitionedEMA(module, {"ema": 50.0, "slow": 900.0})
        g = torch.Generator().manual_seed(1)
        for _ in range(7):
            with torch.no_grad():
                for p in module.parameters():
                    p.add_(torch.randn(p.shape, generator=g))
            part.update(module, 16)
            full.update(module, 16)
        assert part.buffers["ema"].numel() < full.buffers["ema"].numel()
        for name in ("ema", "slow"):
            gathered, ref = part.state_dict_of(name), full.state_dict_of(name)
            assert all(torch.equal(gathered[k], ref[k]) for k in ref), name
        os.write(1, f"rank {rank} ok\\n".encode())  # one write each: print's pieces interleave across ranks
        # An orderly shutdown: a rank that exits while gloo still holds its pair can abort
        # ("terminate called without an active exception", seen once in 2026-11-30's run).
        dist.barrier()
        dist.destroy_process_group()
    """))
    proc = run_cmd([*torchrun_cmd(2)[:-1], str(script)], env=ENV)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(l for l in proc.stdout.splitlines() if l.startswith("rank")) == ["rank 0 ok", "rank 1 ok"], proc.stdout


@pytest.mark.parametrize("zero_stage", [2, 0])
def test_nonfinite_loss_and_gradient_are_skipped_on_both_ranks(tmp_path, latent_data, zero_stage):
    """A NaN loss on rank 1 (data step 1) and an infinite gradient on rank 0 (data step 3) are each
    skipped on both ranks and counted; the run continues to its total of applied steps. ZeRO-2
    relies on DeepSpeed's overflow check; ZeRO-0 (no check in fp32) on lct's gradient check."""
    cfg = tiny_train_config(tmp_path, latent_data, **quiet(run={"dir": str(tmp_path / "run"), "total_steps": 5,
                                                                "save_every": 100, "log_every": 1},
                                                           distributed={"zero_stage": zero_stage}))
    proc = run_cmd([*deepspeed_cmd(), "--config", str(cfg)],
                   env={**ENV, "LCT_FAULT_NAN_LOSS": "1:1", "LCT_FAULT_INF_GRAD": "3:0"})
    assert proc.returncode == 0, proc.stderr[-4000:]
    st = state_of(tmp_path / "run")
    assert st["applied_steps"] == 5 and st["skipped_steps"] == 2 and st["data_steps"] == 7
    assert "step 1: non-finite loss or gradient, update skipped" in proc.stderr
    assert "step 2: non-finite loss or gradient, update skipped" in proc.stderr  # applied index 2 = data step 3
    model = torch.load(tmp_path / "run/checkpoints/step00000005/mp_rank_00_model_states.pt", weights_only=False)
    assert all(torch.isfinite(v).all() for v in model["module"].values())
    assert stats(tmp_path / "run")[-1]["skipped_steps"] == 2


def test_sigterm_to_one_rank_saves_and_both_exit_then_resume(tmp_path, latent_data):
    """SIGTERM to one rank of a 2-rank run: at the next step boundary every rank saves a complete
    checkpoint and exits; the next invocation resumes from it."""
    cfg = tiny_train_config(tmp_path, latent_data, **quiet(run={"dir": str(tmp_path / "run"), "total_steps": 100000,
                                                                "save_every": 100000, "log_every": 1}))
    env = {**os.environ, **ENV, "PYTHONUNBUFFERED": "1"}
    launcher = subprocess.Popen([*torchrun_cmd(2), "--config", str(cfg)], cwd=ROOT, env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    stats_file = tmp_path / "run" / "stats.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline and (not stats_file.exists() or len(stats_file.read_text().splitlines()) < 3):
        time.sleep(0.5)
    children = subprocess.run(["pgrep", "-P", str(launcher.pid)], capture_output=True, text=True).stdout.split()
    assert len(children) == 2, children
    os.kill(int(children[1]), signal.SIGTERM)
    out, err = launcher.communicate(timeout=240)
    assert launcher.returncode != 0
    assert "received SIGTERM" in err and "saved on every rank; exiting with 143" in err
    tag = (tmp_path / "run" / "checkpoints" / "latest").read_text().strip()
    saved = state_of(tmp_path / "run", tag)
    assert saved["applied_steps"] >= 3 and (tmp_path / "run/checkpoints" / tag / "COMPLETE").is_file()
    for c in children:  # both ranks are gone
        assert subprocess.run(["kill", "-0", c], capture_output=True).returncode != 0
    again = run_cmd([*torchrun_cmd(2), "--config", str(cfg), "run.time_budget_minutes=0.02"], env=ENV)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"resumed from {tmp_path / 'run' / 'checkpoints' / tag}" in again.stdout
    assert state_of(tmp_path / "run")["applied_steps"] > saved["applied_steps"]


def test_two_nodes_on_one_machine(tmp_path, latent_data):
    """torchrun --nnodes 2 (one process per "node"): LOCAL_RANK 0 on both, RANK 0/1, each rank its
    own data slots, every rank writes its checkpoint files."""
    cfg = tiny_train_config(tmp_path, latent_data, **quiet(run={"dir": str(tmp_path / "run"), "total_steps": 3,
                                                                "save_every": 3, "log_every": 1}))
    port = free_port()
    env = {**os.environ, **ENV}
    procs = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node_rank",
                               str(node), "--nproc_per_node", "1", "--master_addr", "127.0.0.1",
                               "--master_port", str(port), TRAIN, "--config", str(cfg)],
                              cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for node in (0, 1)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), outs[0][1][-3000:] + outs[1][1][-3000:]
    ckpt = tmp_path / "run" / "checkpoints" / "step00000003"
    for r in (0, 1):
        assert (ckpt / f"rng_rank{r}.pt").is_file()
        assert (ckpt / f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt").is_file()
    env_rec = json.loads((tmp_path / "run" / "environment.json").read_text())
    assert env_rec["world_size"] == 2
    assert state_of(tmp_path / "run")["applied_steps"] == 3
