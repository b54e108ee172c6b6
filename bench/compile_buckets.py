"""model.compile across aspect-ratio buckets (issue 33): how many graphs the compiled DiT blocks
build when every step brings another bucket's token count, and what each costs.

    python bench/compile_buckets.py [--table shapes_32|pixart_256|...] [--downsample 4] [--steps 24]
        [--modes auto static] [--out OUT]

Builds a small TextDiT on the table's base bucket with `model.compile` as the trainer does
(`TextDiT.compile_blocks`: each block `torch.compile`d in place), then runs forward + backward
training steps whose latent shape follows the trainer's bucket draw (`BucketPlan` over equal
counts). Per mode it reports the graphs dynamo built (`unique_graphs`), recompiles, and the time
of steps that compiled against steps that did not. Modes: `auto` (torch's default, `dynamic=None`:
a second token count marks that dimension dynamic once, then every bucket reuses the graph),
`static` (`dynamic=False`: one graph per token count, so a table of more than
`torch._dynamo.config.recompile_limit` token counts falls back to eager). Each mode compiles cold
(its own empty inductor cache).
"""

from __future__ import annotations

if __name__ == "__main__" and __package__ in (None, ""):  # run as a file: repo root first on sys.path
    import pathlib
    import sys

    sys.path[0] = str(pathlib.Path(__file__).resolve().parents[1])

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import torch

from lct.buckets import BucketPlan, load_table
from lct.models.dit import TextDiT


def run_mode(mode: str, table, downsample: int, steps: int, width: int) -> dict:
    import torch._dynamo as dynamo
    from torch._dynamo.utils import counters

    os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix=f"lct_compile_{mode}_")  # cold: no cached kernels
    dynamo.reset()
    counters.clear()
    base = table.buckets[table.base_index]
    torch.manual_seed(0)
    net = TextDiT(input_height=base.height // downsample, input_width=base.width // downsample, in_channels=4,
                  hidden_size=width, depth=2, num_heads=4, patch_size=2, cond="text", text_dim=32, text_len=8,
                  pooled_dim=0)
    net.compile_blocks(**({"dynamic": False} if mode == "static" else {}))
    plan = BucketPlan([1] * len(table), 1, 0)
    rows = []
    for step in range(steps):
        b = table.buckets[plan.step(step)[0]]
        x = torch.randn(2, 4, b.height // downsample, b.width // downsample)
        before = counters["stats"]["unique_graphs"]
        t0 = time.perf_counter()
        out = net(x, torch.rand(2), text_states=torch.randn(2, 8, 32), text_mask=torch.ones(2, 8, dtype=torch.bool))
        out.square().mean().backward()
        rows.append({"step": step, "bucket": b.name, "tokens": (b.height // downsample // 2) * (b.width // downsample // 2),
                     "seconds": time.perf_counter() - t0, "new_graphs": counters["stats"]["unique_graphs"] - before})
    compiled = [r["seconds"] for r in rows if r["new_graphs"]]
    reused = [r["seconds"] for r in rows[1:] if not r["new_graphs"]]
    return {"mode": mode, "unique_graphs": int(counters["stats"]["unique_graphs"]),
            "recompiles": int(counters["recompiles"].total()) if counters.get("recompiles") else 0,
            "distinct_token_counts": len({r["tokens"] for r in rows}), "buckets_seen": len({r["bucket"] for r in rows}),
            "steps_that_compiled": len(compiled), "compile_step_s_total": round(sum(compiled), 2),
            "median_step_s_without_compile": round(sorted(reused)[len(reused) // 2], 4) if reused else None,
            "recompile_limit": int(getattr(dynamo.config, "recompile_limit", dynamo.config.cache_size_limit)),
            "steps": rows}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--table", default="shapes_32")
    p.add_argument("--downsample", type=int, default=4, help="the VAE's downsampling (latent = image / this)")
    p.add_argument("--steps", type=int, default=24)
    p.add_argument("--width", type=int, default=64)
    p.add_argument("--modes", nargs="+", default=["auto", "static"], choices=["auto", "static"])
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    table = load_table(args.table)
    results = {"table": args.table, "buckets": len(table), "torch": torch.__version__, "threads": torch.get_num_threads(),
               "modes": [run_mode(m, table, args.downsample, args.steps, args.width) for m in args.modes]}
    for r in results["modes"]:
        print(f"{args.table} ({len(table)} buckets, {r['distinct_token_counts']} token counts seen in {args.steps} steps) "
              f"{r['mode']}: {r['unique_graphs']} graphs, {r['steps_that_compiled']} steps compiled "
              f"({r['compile_step_s_total']} s), step without compiling {r['median_step_s_without_compile']} s")
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / f"compile_buckets_{args.table}.json").write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
