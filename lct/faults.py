"""Fault injection for the fault-tolerance tests of the trainer and the data prep (off unless the
variables are set).

    LCT_FAULT_NAN_LOSS="3:1,5:0"   loss of data step 3 on rank 1 (and step 5 on rank 0) becomes NaN
    LCT_FAULT_INF_GRAD="4:0"       data step 4 on rank 0: finite loss, infinite gradient
    LCT_FAULT_EXIT_AFTER_SAVE="6"  hard exit (status 137, like SIGKILL) right after the checkpoint
                                   of applied step 6 is complete: a crash between steps
    LCT_FAULT_ERROR="3:1"          data step 3 on rank 1 raises RuntimeError in the step (a bug, CUDA
                                   out of memory): the exit path of an unexpected error
    LCT_FAULT_DISK_FULL="4:0"      the save of applied step 4 on rank 0 raises OSError(ENOSPC) at its
                                   write, after DeepSpeed's files: a disk that fills during a save
    LCT_FAULT_EXIT_MID_SHARD="1"   data_prep/encode_latents.py: hard exit (137) in the middle of a
                                   shard once 1 shard is complete: a crash while a shard is half written

Each fault prints one line `fault: ... (t=<unix time>)` to stderr as it fires (tests bound the
time from it to the exit).

The trainer and the data prep call these at fixed points, so tests exercise the real code paths
(DeepSpeed's overflow skip, the ZeRO-0 gradient check, resume) rather than a stand-in.
"""

from __future__ import annotations

import errno
import os
import sys
import time

import torch


def _pairs(name: str) -> set[tuple[int, int]]:
    out = set()
    for item in filter(None, os.environ.get(name, "").split(",")):
        step, _, rank = item.partition(":")
        out.add((int(step), int(rank or 0)))
    return out


class _InfGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        return g * float("inf")


class Faults:
    def __init__(self):
        self.nan_loss = _pairs("LCT_FAULT_NAN_LOSS")
        self.inf_grad = _pairs("LCT_FAULT_INF_GRAD")
        self.error = _pairs("LCT_FAULT_ERROR")
        self.disk_full = _pairs("LCT_FAULT_DISK_FULL")
        v = os.environ.get("LCT_FAULT_EXIT_AFTER_SAVE")
        self.exit_after_save = int(v) if v else None
        v = os.environ.get("LCT_FAULT_EXIT_MID_SHARD")
        self.exit_mid_shard = int(v) if v else None

    def loss(self, loss: torch.Tensor, data_step: int, rank: int) -> torch.Tensor:
        if (data_step, rank) in self.error:
            _said(f"RuntimeError at data step {data_step} on rank {rank}")
            raise RuntimeError(f"injected fault (LCT_FAULT_ERROR) at data step {data_step} on rank {rank}")
        if (data_step, rank) in self.nan_loss:
            return loss * float("nan")
        if (data_step, rank) in self.inf_grad:
            return _InfGrad.apply(loss)
        return loss

    def write(self, applied_step: int, rank: int, path) -> None:
        """Called before a save's write of `path`: a full disk there (LCT_FAULT_DISK_FULL)."""
        if (applied_step, rank) in self.disk_full:
            _said(f"ENOSPC at the save of step {applied_step} on rank {rank}")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    def after_save(self, applied_step: int) -> None:
        if self.exit_after_save is not None and applied_step == self.exit_after_save:
            os._exit(137)

    def mid_shard(self, shards_done: int, writers: list) -> None:
        """After each batch of the data prep: exit once `shards_done` shards are complete and an open
        shard writer holds samples, its bytes flushed (the temporary file a kill leaves)."""
        if self.exit_mid_shard is not None and shards_done >= self.exit_mid_shard and any(w.count for w in writers):
            for w in writers:
                w.flush()
            os._exit(137)


def _said(what: str) -> None:
    print(f"fault: {what} (t={time.time():.3f})", file=sys.stderr, flush=True)
