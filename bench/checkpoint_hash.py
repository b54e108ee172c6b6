"""What a checkpoint's content hashes cost (issue 31): sha256 while writing, and the check before a
resume.

    python bench/checkpoint_hash.py [--gb 1.0] [--reps 3] [--dir /tmp] [--out OUT]

Times, per GB of checkpoint (one fp32 state dict of `--gb` GB, in 64 MB tensors, as DeepSpeed's
files hold them): `torch.save` to a path (what DeepSpeed does alone), `lct.checkpoint.save_torch`
(the same bytes through a file object that hashes them as they pass: what a save now does),
sha256 of bytes in memory (the CPU cost alone) and `lct.files.file_sha256` of the
written file (the check before a resume; the file is in the page cache right after writing, so
this is the CPU-bound figure, not a cold-disk one). Reports the median of `--reps`.
"""

from __future__ import annotations

if __name__ == "__main__" and __package__ in (None, ""):  # run as a file: repo root first on sys.path
    import pathlib
    import sys

    sys.path[0] = str(pathlib.Path(__file__).resolve().parents[1])

import argparse
import hashlib
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from lct.checkpoint import save_torch
from lct.files import file_sha256


def median_s(fn, reps: int) -> float:
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="bench/checkpoint_hash.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--gb", type=float, default=1.0, help="state dict size in GB (1e9 bytes)")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--dir", default=None, help="where to write the files (default: the system temp folder)")
    p.add_argument("--out", default=None, help="write checkpoint_hash.json here")
    args = p.parse_args(argv)
    chunk = 16 * 2**20  # fp32 elements per tensor: 64 MB
    n = max(1, int(args.gb * 1e9 / 4))
    g = torch.Generator().manual_seed(0)
    state = {f"t{i}": torch.randn(min(chunk, n - i * chunk), generator=g) for i in range((n + chunk - 1) // chunk)}
    gb = sum(t.numel() * 4 for t in state.values()) / 1e9
    with tempfile.TemporaryDirectory(dir=args.dir) as d:
        plain, hashed = Path(d) / "plain.pt", Path(d) / "hashed.pt"

        t_plain = median_s(lambda: torch.save(state, plain), args.reps)
        t_hashed = median_s(lambda: save_torch(state, hashed), args.reps)
        data = hashed.read_bytes()
        t_mem = median_s(lambda: hashlib.sha256(data).hexdigest(), args.reps)
        del data
        t_read = median_s(lambda: file_sha256(hashed), args.reps)
        same = save_torch(state, hashed)["sha256"] == file_sha256(hashed)
    res = {
        "gb": round(gb, 3), "reps": args.reps, "host": platform.node(), "cpu_count": os.cpu_count(),
        "torch": torch.__version__, "python": platform.python_version(),
        "save_s_per_gb": t_plain / gb, "save_hashed_s_per_gb": t_hashed / gb,
        "hash_cost_s_per_gb": (t_hashed - t_plain) / gb, "sha256_memory_s_per_gb": t_mem / gb,
        "verify_s_per_gb": t_read / gb, "hash_while_writing_equals_file_hash": same,
    }
    print(json.dumps(res, indent=1))
    print(f"per GB: torch.save {res['save_s_per_gb']:.2f} s, hashed while writing {res['save_hashed_s_per_gb']:.2f} s "
          f"(+{res['hash_cost_s_per_gb']:.2f} s), sha256 alone {res['sha256_memory_s_per_gb']:.2f} s, "
          f"check before resume {res['verify_s_per_gb']:.2f} s", file=sys.stderr)
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "checkpoint_hash.json").write_text(json.dumps(res, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
