"""Ranks, devices and collectives: the one home of distributed plumbing for the trainer, the monitor,
sampling, data prep and eval.

    info = DistInfo.from_env()                 # rank, world size, local rank (deepspeed, torchrun, SLURM)
    device = pick_device("auto", info.local_rank)
    started = init(info, device, timeout_minutes=30)   # the process group (gloo on CPU, NCCL on GPUs)
    ...  barrier / all_reduce / gather_objects / gather_rows / raised_timeout ...
    close(started)

Every collective is a no-op for one process (world size 1), so single-process code paths call them
unconditionally. `deepspeed` is imported only where the trainer starts its process group.
"""

from __future__ import annotations

import datetime
import os
import socket
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as tdist

from lct.deepspeed_ops import prepare as prepare_ops
from lct.errors import UserError


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_env(cls, local_rank_arg: int | None = None) -> "DistInfo":
        """Ranks from the launcher's environment (deepspeed, torchrun: RANK/WORLD_SIZE/LOCAL_RANK;
        SLURM: SLURM_PROCID/SLURM_NTASKS/SLURM_LOCALID) or one process. `LOCAL_RANK` is preferred
        over `--local_rank` (newer launchers only set the variable)."""
        env = os.environ
        rank = int(env.get("RANK", env.get("SLURM_PROCID", 0)))
        world = int(env.get("WORLD_SIZE", env.get("SLURM_NTASKS", 1)))
        local = env.get("LOCAL_RANK", env.get("SLURM_LOCALID"))
        local_rank = int(local) if local is not None else (local_rank_arg or 0)
        local_world = int(env.get("LOCAL_WORLD_SIZE", env.get("SLURM_NTASKS_PER_NODE", world)))
        if not 0 <= rank < world:
            raise UserError(f"rank {rank} is outside world size {world} "
                            "(RANK/WORLD_SIZE or SLURM_PROCID/SLURM_NTASKS)")
        return cls(rank, world, local_rank, local_world)


def pick_device(name: str = "auto", local_rank: int = 0, flag: str = "--device") -> torch.device:
    """'auto' (this rank's GPU if there is one, else the CPU), 'cpu', 'cuda' (this rank's GPU:
    local_rank modulo the visible GPUs) or 'cuda:N'. A CUDA device becomes the current one. Errors
    name `flag` (the option that chose the device) and the fix."""
    want = ("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else str(name)
    try:
        device = torch.device(want)
    except RuntimeError:
        raise UserError(f"{flag} {name}: expected 'auto', 'cpu' or 'cuda[:N]'") from None
    if device.type not in ("cpu", "cuda"):
        raise UserError(f"{flag} {name}: expected 'auto', 'cpu' or 'cuda[:N]'")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"{flag} {name}: CUDA is not available; use {flag} cpu")
        if device.index is None:
            device = torch.device("cuda", local_rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
    return device


def init(info: DistInfo, device: torch.device, timeout_minutes: float, *, deepspeed: bool = False) -> bool:
    """Start the process group (NCCL on GPUs, gloo on CPU); True if this call started it.

    `deepspeed=True` (the trainer) starts it through `deepspeed.init_distributed`, also for one
    process (`python lct/train.py`: DeepSpeed's engine needs a group); otherwise a group is started
    only for several ranks."""
    if tdist.is_initialized():
        return False
    backend = "nccl" if device.type == "cuda" else "gloo"
    timeout = datetime.timedelta(minutes=timeout_minutes)
    if deepspeed:
        import deepspeed as ds

        prepare_ops(info.local_rank)  # this environment's op build folder; one line before a CPU op build
        os.environ.setdefault("RANK", str(info.rank))
        os.environ.setdefault("WORLD_SIZE", str(info.world_size))
        os.environ.setdefault("LOCAL_RANK", str(info.local_rank))
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        if "MASTER_PORT" not in os.environ:
            if info.world_size > 1:
                raise UserError("MASTER_PORT is not set: start several ranks with deepspeed, torchrun or srun")
            os.environ["MASTER_PORT"] = str(free_port())
        ds.init_distributed(dist_backend=backend, timeout=timeout)
        return True
    if info.world_size == 1:
        return False
    for k in ("MASTER_ADDR", "MASTER_PORT"):
        if k not in os.environ:
            raise UserError(f"WORLD_SIZE={info.world_size} but {k} is not set: start the ranks with torchrun")
    tdist.init_process_group(backend, timeout=timeout)
    return True


def close(barrier_first: bool = True) -> None:
    """Orderly end: all ranks meet, then the process group is destroyed (a rank that exits while
    gloo or NCCL still holds its connections can abort at interpreter exit)."""
    if tdist.is_available() and tdist.is_initialized():
        if barrier_first:
            tdist.barrier()
        tdist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ----------------------------------------------------------------------------------------------
# Collectives (no-ops for one process)
# ----------------------------------------------------------------------------------------------


def group_world_size() -> int:
    """The size of the running process group, 1 without one (for tools that run either way)."""
    return tdist.get_world_size() if tdist.is_available() and tdist.is_initialized() else 1


def barrier(world_size: int) -> None:
    if world_size > 1:
        tdist.barrier()


def all_reduce(t: torch.Tensor, world_size: int, op: str = "sum") -> torch.Tensor:
    """In-place all-reduce (`op` "sum" or "max") of `t` over the ranks; returns `t`."""
    if world_size > 1:
        tdist.all_reduce(t, op={"sum": tdist.ReduceOp.SUM, "max": tdist.ReduceOp.MAX}[op])
    return t


def all_reduce_values(values: list[float], device: torch.device, world_size: int, op: str = "sum") -> list[float]:
    """Host numbers reduced over the ranks (one float64 collective)."""
    if world_size == 1:
        return list(values)
    return all_reduce(torch.tensor(values, dtype=torch.float64, device=device), world_size, op).tolist()


def gather_objects(obj: Any, world_size: int) -> list:
    """Every rank's `obj` (pickled; for small things), in rank order, on every rank."""
    if world_size == 1:
        return [obj]
    out = [None] * world_size
    tdist.all_gather_object(out, obj)
    return out


def gather_rows(indices: list[int], rows: torch.Tensor | None, width: int, world_size: int,
                device: torch.device) -> torch.Tensor:
    """Rows [n_local, width] (float32) of the given global sample indices from every rank, as one
    float32 tensor [N, width] in increasing index order, on every rank (indices 0..N-1 exactly once)."""
    local = rows if rows is not None and len(indices) else torch.zeros(0, width)
    local = local.float().reshape(len(indices), width)
    idx = torch.as_tensor(indices, dtype=torch.long)
    if world_size > 1:
        counts = [int(c) for c in gather_objects(len(indices), world_size)]
        most = max(counts + [1])
        dev = device if tdist.get_backend() == "nccl" else torch.device("cpu")
        pad = torch.zeros(most, width, dtype=torch.float32, device=dev)
        pad[: len(indices)] = local.to(dev)
        ipad = torch.full((most,), -1, dtype=torch.long, device=dev)
        ipad[: len(indices)] = idx.to(dev)
        parts = [torch.empty_like(pad) for _ in range(world_size)]
        iparts = [torch.empty_like(ipad) for _ in range(world_size)]
        tdist.all_gather(parts, pad)
        tdist.all_gather(iparts, ipad)
        local = torch.cat([p[:c].cpu() for p, c in zip(parts, counts)])
        idx = torch.cat([p[:c].cpu() for p, c in zip(iparts, counts)])
    order = torch.argsort(idx)
    if len(idx) and not torch.equal(idx[order], torch.arange(int(idx.max()) + 1)):
        raise RuntimeError("gathered sample indices are not 0..N-1 exactly once")
    return local[order]


def rank_batches(n: int, batch: int, rank: int, world_size: int) -> list[list[int]]:
    """Batches of `batch` consecutive sample indices of 0..n-1; rank r takes batches r, r + K, ...
    (the same batches whatever the world size K, so every sample gets the same floating-point
    computation on any number of ranks)."""
    starts = list(range(0, n, batch))[rank::world_size]
    return [list(range(s, min(s + batch, n))) for s in starts]


class raised_timeout:
    """Raise the process-group timeout around slow collective sections (sampling, saving): a rank
    still writing a large checkpoint must not make the others time out."""

    def __init__(self, world_size: int, minutes: float, normal_minutes: float):
        self.world_size, self.minutes, self.normal = world_size, minutes, normal_minutes

    def _set(self, minutes: float) -> None:
        if self.world_size > 1:
            tdist.distributed_c10d.set_timeout(datetime.timedelta(minutes=minutes))

    def __enter__(self):
        self._set(self.minutes)
        return self

    def __exit__(self, *exc):
        self._set(self.normal)
        return False
