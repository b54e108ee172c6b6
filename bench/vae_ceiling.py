"""A VAE's shapes ceiling per canvas: the `shapes` metric on its reconstructions of ground-truth
renders of held-out captions, drawn on each canvas (issue 33: what a latent model on aspect-ratio
buckets can reach at each aspect).

    python bench/vae_ceiling.py --vae demo_out/vae --captions demo_out/shapes/heldout/captions.jsonl \
        --canvas 32x32 24x40 40x24 [--num 500] [--out OUT]

Canvases are HEIGHTxWIDTH; a shape's extent is a fraction of the canvas's short side and its
centre a fraction of each side (`lct.shapes.render`), as `make_shapes.py --aspects` draws them.
Prints one JSON line per canvas: colour, position, shape accuracy, overall and per size.
"""

from __future__ import annotations

if __name__ == "__main__" and __package__ in (None, ""):  # run as a file: repo root first on sys.path
    import pathlib
    import sys

    sys.path[0] = str(pathlib.Path(__file__).resolve().parents[1])

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from lct.metrics import render_scores
from lct.shapes import read_specs, summarize_scores
from lct.vae import load_vae


@torch.no_grad()
def ceiling(vae, specs, captions, height: int, width: int, batch: int = 100) -> dict:
    """The shapes scores of `vae`'s reconstructions on a height x width canvas (eval's ceiling rows)."""
    rows = []
    for i in range(0, len(specs), batch):
        scores = render_scores(vae, specs[i:i + batch], captions[i:i + batch], (width, height), "cpu")
        rows += scores["vae_reconstruction"]
    return summarize_scores(np.asarray(rows, dtype=np.float64))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--vae", required=True)
    p.add_argument("--captions", required=True, help="a make_shapes captions.jsonl (specs and captions)")
    p.add_argument("--canvas", nargs="+", default=["32x32", "24x40", "40x24"])
    p.add_argument("--num", type=int, default=500)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    records = [json.loads(line) for line in Path(args.captions).read_text().splitlines() if line.strip()][: args.num]
    captions = [r["caption"] for r in records]
    specs = read_specs(args.captions, len(captions))
    vae = load_vae(args.vae, "cpu", torch.float32)
    results = []
    for c in args.canvas:
        h, w = (int(v) for v in c.split("x"))
        m = ceiling(vae, specs, captions, h, w)
        row = {"vae": args.vae, "canvas": c, "n": m["n"], **{k: round(m[k], 3) for k in ("colour_acc", "position_acc",
                                                                                          "shape_acc")},
               "shape_small_large": [round(m["by_size"][s]["shape_acc"], 3) for s in ("small", "large")]}
        print(json.dumps(row))
        results.append(row)
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "vae_ceiling.json").write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
