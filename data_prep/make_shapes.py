"""Write the embedded shapes data set (`lct.shapes`) as img2dataset-style webdataset shards.

    python data_prep/make_shapes.py --output data/shapes --num 20000 --size 64 --heldout 1000
    python data_prep/make_shapes.py --output data/shapes-ar --num 20000 --size 32 --aspects 5:3,1:1,3:5

Output directory of a split:

    00000.tar, 00001.tar, ...   per sample `{key}.png` (lossless RGB), `{key}.txt` (main caption),
                                `{key}.json` {key, caption, captions (3 phrasings; the first is
                                the .txt), spec (lct.shapes.ShapeSpec fields), seed, split, width,
                                height}; key = 5-digit shard + 4-digit (or wider) index in shard
    captions.txt                the main caption of every sample, one per line, in key order
    captions.jsonl              {key, caption, captions, spec} per line (eval samples from these)
    shapes.json                 the settings; a rerun with other settings is refused

Seeds: sample i of a split draws from `SeedSequence([seed, split_id, i])` with split_id 0 for train
and 1 for heldout (`lct.shapes.sample_rng`), so held-out samples never reuse a train seed, and
every run with the same settings writes the same bytes (fixed tar mtime/owner, PNG without
time stamps). With `--heldout N` the held-out split (N samples, same seed) also goes to
`OUTPUT/heldout/` (or `--heldout-output`).

Aspect ratios (`--aspects W:H,...`): each sample's canvas is one of the given width:height ratios
with about `--size`^2 pixels (width round(size * sqrt(r)), height round(size / sqrt(r))), drawn
from `lct.rng` stream `SHAPES_CANVAS` (seed, split id, i) so the sample's spec and captions are
those of the square data set; cells, centre and the position words are in the canvas's own
coordinates (thirds of its width and height) and the extent a fraction of its short side
(`lct.shapes.render`), or with `--shape-scale area` of sqrt(width * height), so that a shape has
the same pixel size on every canvas (a non-square canvas otherwise draws smaller shapes: 3/4 at
5:3). The json's width/height and captions.jsonl's `canvas` [width, height] say which. Encode with a bucket table of the same ratios (`--buckets shapes_32` for `--size 32
--aspects 5:3,1:1,3:5`) so nothing is cropped.

Resumable: a shard is written to a temporary name and renamed when complete; a rerun skips the
complete shards (and the caption lists are rewritten from the seeds, not read from shards).
"""

if __name__ == "__main__" and __package__ in (None, ""):  # run as a file: repo root, not this folder, first on sys.path
    import sys, pathlib; sys.path[0] = str(pathlib.Path(__file__).resolve().parents[1])

import contextlib
import dataclasses
import io
import json
import math
import os
import time
from pathlib import Path
from typing import Literal

import webdataset as wds
from pydantic import Field
from tqdm import tqdm

from lct import shapes
from lct.config import Strict
from lct.errors import UserError, cli_main
from lct.files import atomic_file, output_dir_problem, write_atomic, write_json
from lct.rng import Stream, philox
from lct.tool_config import cli_config

FORMAT_VERSION = 1


class MakeShapesConfig(Strict):
    output: str = Field(..., description="output directory of the shards")
    num: int = Field(10_000, ge=1, description="number of samples of the split")
    size: int = Field(64, ge=16, le=1024, description="image side in pixels")
    samples_per_shard: int = Field(1000, ge=1, description="samples per tar shard")
    seed: int = Field(0, ge=0, description="data set seed (sample i uses SeedSequence([seed, split, i]))")
    split: Literal["train", "heldout"] = Field("train", description="which seed stream to write")
    heldout: int = Field(0, ge=0, description="also write this many held-out samples (train split only)")
    heldout_output: str | None = Field(None, description="directory of the --heldout split (default OUTPUT/heldout)")
    num_captions: int = Field(3, ge=1, le=18, description="caption phrasings per sample")
    aspects: list[str] | None = Field(None, description="landscape/portrait canvases: width:height ratios, e.g. "
                                      "5:3,1:1,3:5 (each sample draws one; about size x size pixels)")
    shape_scale: Literal["side", "area"] = Field("side", description="a shape's extent as a fraction of the "
                                                 "canvas's short side, or of sqrt(width * height): the same pixel "
                                                 "size on every canvas of --aspects")


def _png_bytes(img) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=False, compress_level=6)  # no time or text chunks
    return buf.getvalue()


def _key(shard: int, index: int, width: int) -> str:
    return f"{shard:05d}{index:0{width}d}"


def _check_settings(out: Path, settings: dict) -> None:
    path = out / "shapes.json"
    if path.is_file():
        try:
            old = json.loads(path.read_text())
        except ValueError:
            old = None
        if old != settings:
            diff = ", ".join(f"{k}: {(old or {}).get(k)!r} there, {v!r} now" for k, v in settings.items()
                             if (old or {}).get(k) != v)
            raise UserError(f"{out} holds a shapes data set made with other settings ({diff or 'unreadable'}"
                            f"); use another --output or delete it")
    else:
        if out.is_dir() and any(out.glob("*.tar")):
            raise UserError(f"{out} holds tar shards but no shapes.json (not written by make_shapes, or "
                            "by an older version); use another --output or delete them")
        out.mkdir(parents=True, exist_ok=True)
        write_json(path, settings, sort_keys=True)


def parse_aspects(aspects: list[str] | None) -> list[tuple[int, int]] | None:
    """[(w, h)] of `--aspects W:H,...` (one-line errors)."""
    if not aspects:
        return None
    out = []
    for a in aspects:
        w, _, h = a.partition(":")
        if not (w.isdigit() and h.isdigit() and int(w) > 0 and int(h) > 0):
            raise UserError(f"--aspects {a!r}: expected width:height with positive integers, e.g. 5:3,1:1,3:5")
        out.append((int(w), int(h)))
    return out


def canvas(size: int, aspect: tuple[int, int]) -> tuple[int, int]:
    """(width, height) of about size x size pixels with the width:height ratio `aspect`."""
    r = aspect[0] / aspect[1]
    return max(1, round(size * math.sqrt(r))), max(1, round(size / math.sqrt(r)))


def sample_canvas(seed: int, split: str, index: int, size: int, aspects: list[tuple[int, int]] | None
                  ) -> tuple[int, int]:
    """The canvas of sample `index` (size x size without `aspects`)."""
    if not aspects:
        return size, size
    g = philox(Stream.SHAPES_CANVAS, seed, shapes.SPLITS[split], index)
    return canvas(size, aspects[int(g.integers(len(aspects)))])


def write_split(out: str | os.PathLike, split: str, num: int, size: int, samples_per_shard: int,
                seed: int, num_captions: int = 3, progress: bool = True,
                aspects: list[tuple[int, int]] | None = None, shape_scale: str = "side") -> dict:
    """Write one split; returns {shards, written, skipped, samples}."""
    out = Path(out)
    settings = {"format": FORMAT_VERSION, "split": split, "num": num, "size": size,
                "samples_per_shard": samples_per_shard, "seed": seed, "num_captions": num_captions,
                "seeds": f"SeedSequence([{seed}, {shapes.SPLITS[split]}, i])"}
    if aspects:  # square data sets keep their shapes.json
        settings.update(aspects=[f"{w}:{h}" for w, h in aspects],
                        canvases=f"lct.rng SHAPES_CANVAS ({seed}, {shapes.SPLITS[split]}, i)")
    if shape_scale != "side":  # data sets of the default keep their shapes.json
        settings["shape_scale"] = shape_scale
    _check_settings(out, settings)
    n_shards = (num + samples_per_shard - 1) // samples_per_shard
    width = max(4, len(str(samples_per_shard - 1)))
    done = [s for s in range(n_shards) if (out / f"{s:05d}.tar").is_file()]
    done_samples = sum(min(samples_per_shard, num - s * samples_per_shard) for s in done)
    bar = tqdm(total=num, initial=done_samples, unit="img", desc=f"shapes {split}", disable=not progress,
               dynamic_ncols=True)
    lines, records = [], []
    written = 0
    for s in range(n_shards):
        first, last = s * samples_per_shard, min(num, (s + 1) * samples_per_shard)
        final = out / f"{s:05d}.tar"
        complete = final.is_file()
        with contextlib.nullcontext() if complete else atomic_file(final) as stream:
            writer = None if complete else wds.TarWriter(stream, encoder=False, mtime=0.0, user="lct",
                                                          group="lct", mode=0o644)
            for i in range(first, last):
                key = _key(s, i - first, width)
                spec, caps = shapes.make_spec(seed, split, i, num_captions)
                spec = dataclasses.replace(spec, scale=shape_scale)
                cw, ch = sample_canvas(seed, split, i, size, aspects)
                meta = {"key": key, "caption": caps[0], "captions": caps, "spec": spec.to_dict(),
                        "seed": [seed, shapes.SPLITS[split], i], "split": split, "width": cw, "height": ch}
                lines.append(caps[0])
                records.append({k: meta[k] for k in ("key", "caption", "captions", "spec")})
                if aspects:
                    records[-1]["canvas"] = [cw, ch]
                if writer is not None:
                    img = shapes.render(spec, size if not aspects else (cw, ch))
                    writer.write({"__key__": key, "png": _png_bytes(img), "txt": caps[0].encode(),
                                  "json": json.dumps(meta, sort_keys=True).encode()})
                    bar.update(1)
            if writer is not None:
                writer.close()  # the tar's end blocks; atomic_file then syncs and renames
                written += 1
    bar.close()
    for name, text in (("captions.txt", "".join(c + "\n" for c in lines)),
                       ("captions.jsonl", "".join(json.dumps(r, sort_keys=True) + "\n" for r in records))):
        write_atomic(out / name, text)
    return {"shards": n_shards, "written": written, "skipped": n_shards - written, "samples": num}


def main(argv: list[str] | None = None) -> int:
    cfg, _ = cli_config(MakeShapesConfig, argv, prog="make_shapes",
                        description="Write the coloured-shapes data set as webdataset shards.")
    if cfg.split == "heldout" and cfg.heldout:
        raise UserError("--heldout N adds a held-out split to a train run; with --split heldout use --num")
    jobs = [(Path(cfg.output), cfg.split, cfg.num)]
    if cfg.heldout:
        jobs.append((Path(cfg.heldout_output or Path(cfg.output) / "heldout"), "heldout", cfg.heldout))
    aspects = parse_aspects(cfg.aspects)
    for (out, _, _), flag in zip(jobs, ("--output", "--heldout-output")):  # all before any work
        problem = output_dir_problem(out, flag)
        if problem:
            raise UserError(problem)
    for out, split, num in jobs:
        t0 = time.time()
        r = write_split(out, split, num, cfg.size, cfg.samples_per_shard, cfg.seed, cfg.num_captions,
                        aspects=aspects, shape_scale=cfg.shape_scale)
        what = f"{cfg.size}px" + (f" (aspects {','.join(cfg.aspects)})" if aspects else "")
        print(f"make_shapes: {split}: {r['samples']} samples of {what} in {r['shards']} shards at "
              f"{out} ({r['written']} written, {r['skipped']} already complete) in "
              f"{time.time() - t0:.1f}s", flush=True)
    return 0


def cli():
    cli_main(main)


if __name__ == "__main__":
    cli()
