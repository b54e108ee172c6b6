"""Phase timing for benchmarks: CUDA events (no host sync until `summary`) or wall clock on CPU.
The trainer's step takes an optional timer; by default it is `no_timer`, which costs nothing."""

from __future__ import annotations

import contextlib
import time
from collections import defaultdict

import torch


@contextlib.contextmanager
def _null(name: str):
    yield


class _NoTimer:
    def __call__(self, name: str):
        return _null(name)


no_timer = _NoTimer()


class PhaseTimer:
    """`with timer("teacher"): ...` records the phase; `summary()` returns milliseconds per phase
    (summed over all calls since the last `reset`)."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.reset()

    def reset(self) -> None:
        self.events: dict[str, list] = defaultdict(list)

    @contextlib.contextmanager
    def __call__(self, name: str):
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            yield
            end.record()
            self.events[name].append((start, end))
        else:
            t = time.perf_counter()
            yield
            self.events[name].append(time.perf_counter() - t)

    def summary(self) -> dict[str, float]:
        if self.cuda:
            torch.cuda.synchronize()
            return {k: sum(s.elapsed_time(e) for s, e in v) for k, v in self.events.items()}
        return {k: 1000 * sum(v) for k, v in self.events.items()}
