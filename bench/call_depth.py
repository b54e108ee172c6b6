"""How deep the trainer's code is: call frames from `lct.train.main` to the distance function.

    python bench/call_depth.py [--distance cauchy] [--work DIR]

Trains one step of a tiny iLCT run (CPU, one process, the bench's own tiny data) with a profile
hook on the distance function, and prints the chain of frames from `main` to it, both ends
counted (DiT's `train.py`: 3, edm2: 2). A readability measure for docs/ARCHITECTURE.md, not a
performance figure.
"""

from __future__ import annotations

if __name__ == "__main__" and __package__ in (None, ""):  # run as a file: repo root first on sys.path
    import pathlib
    import sys

    sys.path[0] = str(pathlib.Path(__file__).resolve().parents[1])

import argparse
import json
import sys
import tempfile
from pathlib import Path

from bench.train_step import make_latent_data


def chain_to(target_code, main_code, argv: list[str]) -> list[str]:
    """Run `lct.train.main(argv)`; the frames from main to the first call of `target_code`."""
    import lct.train

    found: list[str] = []

    def hook(frame, event, arg):
        if event == "call" and frame.f_code is target_code and not found:
            chain, f = [], frame
            while f is not None:
                chain.append(f"{Path(f.f_code.co_filename).name}:{f.f_code.co_qualname}")
                if f.f_code is main_code:
                    break
                f = f.f_back
            found.extend(reversed(chain))

    sys.setprofile(hook)
    try:
        lct.train.main(argv)
    finally:
        sys.setprofile(None)
    return found


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="bench/call_depth.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--distance", default="cauchy", choices=["cauchy", "pseudo_huber", "l2"])
    p.add_argument("--work", default=None, help="scratch directory (default: a temp dir)")
    args = p.parse_args(argv)
    import lct.consistency as C
    import lct.train

    root = Path(args.work or tempfile.mkdtemp(prefix="lct-depth-"))
    data = make_latent_data(root, 64, 16, tiny=True, device="cpu")
    (root / "empty.yaml").write_text("{}\n")
    train_argv = ["--config", str(root / "empty.yaml"), f"run.dir={root / 'run'}", "run.resume=never", "run.total_steps=1",
                  "run.tensorboard=false", f"data.shards={data}", "data.num_workers=0", "data.mode=indexed",
                  f"method.distance={args.distance}", "method.c=0.01", "optim.batch_size=8",
                  "model.hidden_size=32", "model.depth=2", "model.num_heads=2", "precision=fp32",
                  "sample.every=1000", "val.every=1000"]
    chain = chain_to(getattr(C, args.distance).__code__, lct.train.main.__code__, train_argv)
    print(json.dumps({"frames": len(chain), "chain": chain}, indent=1))
    return 0 if chain else 1


if __name__ == "__main__":
    sys.exit(main())
