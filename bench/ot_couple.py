"""Minibatch OT coupling cost (SPEC 6): `lct.consistency.ot_couple` at iLCT's micro-batch.

    python bench/ot_couple.py [--batch 128] [--shape 4 32 32] [--reps 7] [--out OUT]

Times one call single-threaded, as in a DataLoader worker (the DataLoader sets
torch.set_num_threads(1) there), and with this process's default thread count, plus the cost
matrix alone and the share of the mean pair cost the coupling removes (SPEC 6: about 3 % at
d = 4096, B = 128). CPU timings; the trainer runs OT in its data workers, off the GPU's path.
"""

from __future__ import annotations

if __name__ == "__main__" and __package__ in (None, ""):  # run as a file: repo root first on sys.path
    import pathlib
    import sys

    sys.path[0] = str(pathlib.Path(__file__).resolve().parents[1])

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from lct import consistency as C


def median_ms(fn, reps: int) -> float:
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * float(np.median(times))


def pair_cost(x: torch.Tensor, z: torch.Tensor) -> float:
    return (x.double() - z.double()).flatten(1).square().sum(1).mean().item()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="bench/ot_couple.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--shape", type=int, nargs="+", default=[4, 32, 32])
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--out", default=None, help="write ot_couple.json here")
    args = p.parse_args(argv)
    g = torch.Generator().manual_seed(12)
    x = 0.5 * torch.randn(args.batch, *args.shape, generator=g)
    z = torch.randn(args.batch, *args.shape, generator=g)
    C.ot_couple(x, z)  # warm-up (POT import)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = median_ms(lambda: C.ot_couple(x, z), args.reps)
        cost = median_ms(lambda: C.ot_cost_matrix(x, z), args.reps)
    finally:
        torch.set_num_threads(threads)
    many = median_ms(lambda: C.ot_couple(x, z), args.reps)
    res = {"batch": args.batch, "shape": args.shape, "ms_per_call_1_thread": one, "cost_matrix_ms_1_thread": cost,
           f"ms_per_call_{threads}_threads": many,
           "pair_cost_gain": 1 - pair_cost(x, C.ot_couple(x, z)) / pair_cost(x, z)}
    print(json.dumps(res, indent=1))
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "ot_couple.json").write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
