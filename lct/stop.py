"""When and how the trainer stops: one place for every way out of the loop, and for errors.

    stopper = Stopper(cfg, info, device, started)
    stop = stopper.poll(state, applied)   # after each step: one all-reduce on every rank
    if stop.save: ...                     # the loop's one save site
    if stop: break                        # stop.reason, stop.code (the process's exit status)

A run ends at run.total_steps (`end`, exit 0, every EMA exported), on SIGTERM / SIGINT or when a
launcher above the rank is gone (`signal`, 143 / 130: the checkpoint only, quickly: the
launchers SIGKILL 30 s later), when this invocation's time budget would pass during the next step
and its save (`budget`, exit 0: re-run to continue), or after run.max_consecutive_skips
non-finite steps in a row (`skips`, exit 3, nothing saved: the last good checkpoint is kept).
Every rank reaches the same decision: the signal and budget votes are one all-reduce (max); the
end and the skip streak are the same on every rank by construction.

On an exception (a full disk, CUDA out of memory, a bug) `data_workers` ends the DataLoader
workers within seconds (they ignore SIGINT/SIGTERM on purpose, `lct.data.ignore_stop_signals`, so
nothing else would end them and the process would wait on them at exit), `fail` turns the error
into one line (a full disk: the free space and the checkpoint that survives; a bug: its type and
message, the traceback in run.dir/errors/), and posts it in the launch's store, where every other
rank's `PeerWatch` sees it within a second and leaves too: a rank blocked in a collective that
the failed rank will never join cannot time out for dist_timeout_minutes first.
"""

from __future__ import annotations

import errno
import os
import shutil
import signal
import sys
import threading
import time
import traceback
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Iterator

import psutil
import torch

from lct import checkpoint as ckpt
from lct import dist
from lct.config import TrainConfig
from lct.dist import DistInfo
from lct.errors import UserError, user_message

EXIT_ERROR, EXIT_SKIPS, EXIT_SIGINT, EXIT_SIGTERM = 1, 3, 130, 143


@dataclass(frozen=True)
class Stop:
    """The decision after a step: `reason` "" (go on), "end", "signal", "budget" or "skips"."""

    reason: str = ""
    code: int = 0
    signal: int = 0

    def __bool__(self) -> bool:
        return bool(self.reason)

    @property
    def save(self) -> bool:
        return self.reason in ("end", "signal", "budget")

    @property
    def final(self) -> bool:  # the run's end: every EMA exported, validation and grids forced
        return self.reason == "end"

    @property
    def quick(self) -> bool:  # a signal: the checkpoint only, no exports or grids (the launchers' grace is short)
        return self.reason == "signal"


def invocation_start() -> float:
    """Wall-clock start of this process (interpreter and imports included): run.time_budget_minutes
    counts from here."""
    try:
        return psutil.Process().create_time()
    except psutil.Error:
        return time.time()


class Stopper:
    """Signals, the launcher watch, the time budget, the skip streak and the end of the run,
    decided together after each step (`poll`)."""

    def __init__(self, cfg: TrainConfig, info: DistInfo, device: torch.device, started: float | None = None):
        self.cfg, self.info, self.device = cfg, info, device
        self.started = time.time() if started is None else started
        self.flags, self.watch = StopFlags(), LauncherWatch()
        self.skips, self.save_seconds, self.mark = 0, 0.0, time.time()

    def poll(self, state, applied: bool) -> Stop:
        """The decision at `state` (after its step; `applied`: whether the step changed the weights).
        Collective: one all-reduce of the signal and budget votes."""
        cfg, info = self.cfg, self.info
        self.skips = 0 if applied else self.skips + 1
        if not applied and info.is_main:
            print(f"step {state.applied_steps}: non-finite loss or gradient, update skipped "
                  f"({self.skips} in a row)", file=sys.stderr, flush=True)
        gone = self.watch.gone()
        if gone and not self.flags.signal:
            print(f"rank {info.rank}: {gone} is gone; saving and stopping as on SIGTERM", file=sys.stderr, flush=True)
            self.flags.signal = signal.SIGTERM
        now = time.time()
        budget = 60 * (cfg.run.time_budget_minutes or 0)  # the next step and its save must fit
        time_up = bool(budget and now - self.started + (now - self.mark) + self.save_seconds >= budget)
        sig, time_up = dist.all_reduce_values([float(self.flags.signal), float(time_up)], self.device,
                                              info.world_size, "max")
        self.mark = time.time()
        if self.skips >= cfg.run.max_consecutive_skips:
            return Stop("skips", EXIT_SKIPS)
        if sig:
            return Stop("signal", EXIT_SIGTERM if int(sig) == signal.SIGTERM else EXIT_SIGINT, int(sig))
        if state.applied_steps >= cfg.run.total_steps:
            return Stop("end")
        return Stop("budget") if time_up else Stop()

    @contextmanager
    def saving(self) -> Iterator[None]:
        """Times a save: the budget keeps room for the next one."""
        t = time.time()
        yield
        self.save_seconds, self.mark = time.time() - t, time.time()

    def report(self, stop: Stop, state, saved_at: Path | None, run_dir: Path) -> None:
        """The run's last line on rank 0 (stderr, or stdout for a finished run)."""
        cfg, k = self.cfg, state.applied_steps
        if not self.info.is_main or not stop:
            return
        if stop.reason == "skips":
            print(f"error: {self.skips} consecutive non-finite steps; stopping. The last good checkpoint in "
                  f"{run_dir / 'checkpoints'} is kept.", file=sys.stderr, flush=True)
        elif stop.reason == "signal":
            print(f"received {signal.Signals(stop.signal).name}: checkpoint {saved_at} (step {k}) saved on "
                  f"every rank; exiting with {stop.code}; re-run the same command to continue from it", file=sys.stderr, flush=True)
        elif stop.reason == "budget":
            print(f"time budget of {cfg.run.time_budget_minutes} min for this invocation reached: checkpoint "
                  f"{saved_at} (step {k}) saved; re-run the same command to continue", file=sys.stderr, flush=True)
        else:
            names = ", ".join(e.name for e in cfg.ema.models)
            print(f"finished: step {k} of {cfg.run.total_steps}, checkpoint {saved_at}, exports ({names}) in "
                  f"{run_dir / 'export'}; {(time.time() - self.started) / 60:.1f} min this invocation, "
                  f"{state.train_seconds / 3600:.2f} h of training in all", flush=True)


class StopFlags:
    """SIGTERM/SIGINT only set a flag; the loop agrees on it across ranks at step boundaries and
    saves. A repeated signal changes nothing (torchrun and deepspeed's launch.py send their own
    after the terminal's; both SIGKILL the ranks 30 s later, see README)."""

    def __init__(self):
        self.signal = 0
        for s in (signal.SIGTERM, signal.SIGINT):
            signal.signal(s, self._handle)

    def _handle(self, signum, frame):
        self.signal = self.signal or signum


class LauncherWatch:
    """The launcher processes above this rank (deepspeed's runner and launch.py, torchrun). SIGTERM
    to the top-level `deepspeed` runner kills it alone and leaves the ranks training (upstream
    behaviour); a rank that finds one gone stops as on SIGTERM."""

    MARKS = (("deepspeed.launcher.runner", "deepspeed runner"), ("bin/deepspeed", "deepspeed runner"),
             ("deepspeed.launcher.launch", "deepspeed launch.py"), ("torch.distributed.run", "torchrun"),
             ("bin/torchrun", "torchrun"))

    def __init__(self):
        self.watched: list[tuple[psutil.Process, str]] = []
        try:
            for p in psutil.Process().parents():
                cmd = " ".join(p.cmdline())
                name = next((n for m, n in self.MARKS if m in cmd), None)
                if name:
                    self.watched.append((p, name))
        except psutil.Error:
            pass

    def gone(self) -> str | None:
        for p, name in self.watched:
            try:  # is_running is false for a reused pid too (psutil compares start times)
                alive = p.is_running() and p.status() != psutil.STATUS_ZOMBIE
            except psutil.Error:
                alive = False
            if not alive:
                return f"the launcher {name} (pid {p.pid})"
        return None


# ----------------------------------------------------------------------------------------------
# Errors: the data workers, one line, the other ranks
# ----------------------------------------------------------------------------------------------


@contextmanager
def data_workers(loader, seconds: float = 5.0) -> Iterator:
    """`iter(loader)`, whose worker processes end when the block does, also on an exception."""
    batches = iter(loader)
    try:
        yield batches
    finally:
        end_workers(batches, seconds)


def end_workers(batches, seconds: float = 5.0) -> None:
    """End a DataLoader iterator's workers: asked to stop (torch's own end-of-iteration message),
    then, after `seconds`, SIGKILLed (a worker ignores SIGTERM and may be blocked in a read).
    Uses the multiprocessing iterator's fields; a single-process iterator has nothing to end."""
    batches = getattr(batches, "source", batches)  # lct.data.CheckedBatches: torch's iterator inside
    workers = list(getattr(batches, "_workers", None) or [])
    if not workers or getattr(batches, "_shutdown", True):
        return
    batches._workers_done_event.set()
    for q in batches._index_queues:
        q.put(None)  # a worker leaves its loop on None (the done event alone only skips work)
    deadline = time.monotonic() + seconds
    for w in workers:
        w.join(max(0.0, deadline - time.monotonic()))
    alive = [w for w in workers if w.is_alive()]
    if alive:
        if batches._worker_pids_set:  # else torch's SIGCHLD handler reports the kill as a worker crash
            torch.utils.data._utils.signal_handling._remove_worker_pids(id(batches))
            batches._worker_pids_set = False
        for w in alive:
            w.kill()
        for w in alive:
            w.join(seconds)
    batches._shutdown_workers()  # queues and the pin-memory thread; the workers are gone


def is_disk_full(err: BaseException) -> bool:
    if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    text = str(err)  # torch.save's own writer raises RuntimeError("... file write failed")
    return "No space left on device" in text or "Disk quota exceeded" in text or "file write failed" in text


def fail(cfg: TrainConfig, info: DistInfo, err: BaseException) -> int:
    """End this rank after an exception in `build` or the loop (its data workers already ended):
    one line on stderr, posted for the other ranks; returns the exit status (a single process) or
    exits (several ranks: a collective may still hold the process group). A user error keeps its
    message (exit 2); a full disk names the free space and the checkpoint that survives; anything
    else its type and first line, its traceback written to run.dir/errors/rank<r>.txt."""
    who = f"rank {info.rank}: " if info.world_size > 1 else ""
    peer = PEERS.posted()
    if peer and not isinstance(err, UserError):  # this rank's collective failed because another rank did
        line, code = f"{who}stopped: {peer}", EXIT_ERROR
    elif isinstance(err, UserError):
        line, code = f"{who}{user_message(err)}", err.exit_code
    elif is_disk_full(err):
        root = Path(cfg.run.dir)
        free = shutil.disk_usage(root).free if root.exists() else 0
        kept = ckpt.newest_complete(root / "checkpoints")
        line = (f"{who}disk full while writing {getattr(err, 'filename', None) or 'a checkpoint'} "
                f"({free / 2**20:.1f} MiB free on {root}): "
                + (f"checkpoint {root / 'checkpoints' / kept} is complete and kept" if kept else "no complete checkpoint yet")
                + "; the partial one is removed at the next start. Free space, then re-run the same command")
        code = EXIT_ERROR
    else:
        first = (str(err).strip().splitlines() or [""])[0][:300]
        where = Path(cfg.run.dir) / "errors" / f"rank{info.rank}.txt"
        try:
            where.parent.mkdir(parents=True, exist_ok=True)
            where.write_text("".join(traceback.format_exception(err)))
            saved = f" (traceback: {where})"
        except OSError:
            saved = ""
        line, code = f"{who}{type(err).__name__}: {first}{saved}", EXIT_ERROR
    if not peer:
        PEERS.post(line)
    print(f"error (train): {line}", file=sys.stderr, flush=True)
    if info.world_size > 1:
        time.sleep(1.0)  # the store this rank may host stays up while the others read the line
        sys.stdout.flush()
        os._exit(code)
    return code


class PeerWatch:
    """The other ranks' failures, through the launch's rendezvous store (MASTER_ADDR:MASTER_PORT,
    hosted by rank 0 or the torchrun agent): a rank that fails `post`s its line; a thread on
    every rank checks twice a second and, finding a line, prints it and leaves at once (SIGKILL
    ends its DataLoader workers, `lct.data.die_with_parent`). A store that stops answering means
    its host is gone: leave too. `stop` before an orderly exit."""

    def __init__(self):
        self.store, self.key, self.info = None, "", None
        self.stopped = threading.Event()

    def start(self, info: DistInfo) -> None:
        if info.world_size < 2 or self.store is not None:
            return
        try:
            self.store = torch.distributed.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]),
                                                    is_master=False, timeout=timedelta(seconds=60))
        except (KeyError, ValueError, RuntimeError):
            return  # no store to share: the launcher ends the other ranks
        self.info, self.key = info, f"lct/failed/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}"
        self.stopped.clear()
        threading.Thread(target=self._watch, name="lct-peer-watch", daemon=True).start()

    def _watch(self) -> None:
        misses = 0
        while not self.stopped.wait(0.5):
            try:
                line = self.posted(quiet=False)
                misses = 0
            except RuntimeError:
                misses += 1
                if misses < 3 or self.stopped.is_set():
                    continue
                line = "the launch's store stopped answering (rank 0 or the launcher is gone)"
            if line and not self.stopped.is_set():
                print(f"error (train): rank {self.info.rank}: stopped: {line}", file=sys.stderr, flush=True)
                os._exit(EXIT_ERROR)

    def posted(self, quiet: bool = True) -> str | None:
        """The line another rank posted, if any (`quiet` False: a store error raises)."""
        try:
            if self.store is None or not self.store.check([self.key]):
                return None
            return self.store.get(self.key).decode()
        except RuntimeError:
            if quiet:
                return None
            raise

    def post(self, line: str) -> None:
        self.stopped.set()
        if self.store is not None:
            try:
                self.store.set(self.key, line)
            except RuntimeError:
                pass

    def stop(self) -> None:
        self.stopped.set()


PEERS = PeerWatch()  # one per process, like the signal handlers
