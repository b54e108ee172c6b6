"""A local MS-COCO 2014 split -> img2dataset-style webdataset shards (input of encode_latents.py).

    python data_prep/coco_to_wds.py --input /data/coco --split train2014 --output data/coco/train2014
    python data_prep/coco_to_wds.py --input /data/coco --split val2014   --output data/coco/val2014

Expected input tree: `INPUT/train2014/*.jpg`, `INPUT/val2014/*.jpg`,
`INPUT/annotations/captions_train2014.json`, `INPUT/annotations/captions_val2014.json`.

Split rule: train on train2014, evaluate on val2014 (the usual text-to-image protocol: FID and
CLIP score on 30k val2014 captions). Only these two splits are accepted: train2017 contains most
of val2014's images, so a model trained on train2017 has seen the val2014 evaluation images.

Output (`--output DIR`): shards `00000.tar, 00001.tar, ...` of `--samples-per-shard` images each,
images ordered by COCO image id; per sample, with key = the 12-digit zero-padded image id:
- `{key}.jpg`: the original file's bytes (no re-encoding);
- `{key}.txt`: the first caption (lowest annotation id);
- `{key}.json`: {"key", "image_id", "file_name", "width", "height", "split", "caption" (the
  first), "captions" (all of the image's captions, usually 5, in annotation-id order)}.
Beside the shards: `captions.jsonl` ({key, image_id, file_name, caption, captions} per image, in
key order; eval reads captions from it), `coco.json` (the settings; a rerun with other settings is
refused) and `stats.json` (counts).

Images listed in the annotations but missing on disk are skipped and counted (shard boundaries
stay those of the full list). Every `file_name` must name a file inside `INPUT/<split>/`: an
absolute path, a `..` component or a symlink leading out of the folder is refused (exit 2,
naming the image id) before anything is written, so an annotation file cannot pack other files
of the machine into the shards. Resumable: a shard is written to `.NAME.tar.tmp` and renamed when
complete; a rerun skips complete shards.
"""

if __name__ == "__main__" and __package__ in (None, ""):  # run as a file: repo root, not this folder, first on sys.path
    import sys, pathlib; sys.path[0] = str(pathlib.Path(__file__).resolve().parents[1])

import json
import os
import time
from pathlib import Path

from pydantic import Field

from lct.coco import read_caption_annotations
from lct.config import Strict
from lct.errors import UserError, cli_main
from lct.files import output_dir_problem, write_atomic, write_json
from lct.tool_config import cli_config

SPLITS = ("train2014", "val2014")
SPLIT_RULE = ("train on train2014, evaluate on val2014; other splits are refused (train2017 contains most of "
              "val2014's images, so training on it leaks the evaluation images)")
FORMAT_VERSION = 1


class CocoToWdsConfig(Strict):
    input: str = Field(..., description="COCO root with train2014/, val2014/ and annotations/captions_*2014.json")
    split: str = Field(..., description=f"train2014 or val2014 ({SPLIT_RULE})")
    output: str = Field(..., description="output directory of the shards")
    samples_per_shard: int = Field(5000, ge=1, description="images per tar shard")
    limit: int | None = Field(None, ge=1, description="only the first N images (by image id), for quick tests")


def load_split(root: Path, split: str) -> list[dict]:
    """[{image_id, file_name, width, height, captions}] sorted by image id."""
    ann = root / "annotations" / f"captions_{split}.json"
    if not ann.is_file():
        raise UserError(f"--input {root}: {ann.relative_to(root)} not found (expected the COCO 2014 caption annotations)")
    if not (root / split).is_dir():
        raise UserError(f"--input {root}: image folder {split}/ not found")
    return read_caption_annotations(ann, "--input")


def check_image_paths(root: Path, split: str, items: list[dict]) -> None:
    """Refuse a `file_name` that leads outside the image folder (see the module docstring)."""
    folder = (root / split).resolve()
    for im in items:
        name = str(im["file_name"])
        path = root / split / name
        parts = Path(name).parts
        inside = (name and not Path(name).is_absolute() and ".." not in parts and "\x00" not in name)
        if inside and path.exists():
            inside = path.resolve().is_relative_to(folder)
        if not inside:
            raise UserError(f"--input {root}: image {im['image_id']} has file_name {name!r}, which is not a file "
                            f"inside {split}/; fix the annotations (only files of the image folder are packed)")


def _check_settings(out: Path, settings: dict) -> None:
    path = out / "coco.json"
    if path.is_file():
        try:
            old = json.loads(path.read_text())
        except ValueError:
            old = None
        if old != settings:
            diff = ", ".join(f"{k}: {(old or {}).get(k)!r} there, {v!r} now" for k, v in settings.items()
                             if (old or {}).get(k) != v)
            raise UserError(f"{out} holds shards made with other settings ({diff or 'unreadable coco.json'}); "
                            "use another --output or delete it")
    else:
        out.mkdir(parents=True, exist_ok=True)
        write_json(path, settings, sort_keys=True)


def convert(root: str | os.PathLike, split: str, out: str | os.PathLike, samples_per_shard: int,
            limit: int | None = None, progress: bool = True) -> dict:
    """Write the shards; returns counts {images, shards, written, already_complete, missing, no_caption}."""
    import webdataset as wds
    from tqdm import tqdm

    if split not in SPLITS:
        raise UserError(f"--split {split}: {SPLIT_RULE}")
    root, out = Path(root), Path(out)
    problem = output_dir_problem(out, "--output")
    if problem:
        raise UserError(problem)
    items = load_split(root, split)
    if limit:
        items = items[:limit]
    if not items:
        raise UserError(f"{root}: the {split} annotations list no image")
    check_image_paths(root, split, items)
    _check_settings(out, {"format": FORMAT_VERSION, "split": split, "samples_per_shard": samples_per_shard,
                          "limit": limit, "images": len(items)})
    n_shards = (len(items) + samples_per_shard - 1) // samples_per_shard
    counts = {"images": 0, "shards": n_shards, "written": 0, "already_complete": 0, "missing": 0, "no_caption": 0}
    bar = tqdm(total=len(items), unit="img", desc=f"coco {split}", disable=not progress, dynamic_ncols=True)
    records = []
    for s in range(n_shards):
        chunk = items[s * samples_per_shard:(s + 1) * samples_per_shard]
        final = out / f"{s:05d}.tar"
        complete = final.is_file()
        tmp = out / f".{s:05d}.tar.tmp"
        writer = stream = None
        if not complete:
            tmp.unlink(missing_ok=True)
            stream = open(tmp, "wb")
            writer = wds.TarWriter(stream, encoder=False, mtime=0.0, user="lct", group="lct", mode=0o644)
        try:
            for im in chunk:
                path = root / split / im["file_name"]
                if not im["captions"]:
                    counts["no_caption"] += 1
                    continue
                if not path.is_file():
                    counts["missing"] += 1
                    continue
                key = f"{im['image_id']:012d}"
                meta = {"key": key, "image_id": im["image_id"], "file_name": im["file_name"], "width": im["width"],
                        "height": im["height"], "split": split, "caption": im["captions"][0],
                        "captions": im["captions"]}
                records.append({k: meta[k] for k in ("key", "image_id", "file_name", "caption", "captions")})
                counts["images"] += 1
                if writer is not None:
                    writer.write({"__key__": key, "jpg": path.read_bytes(), "txt": im["captions"][0].encode("utf-8"),
                                  "json": json.dumps(meta, sort_keys=True, ensure_ascii=False).encode("utf-8")})
                bar.update(1)
        except BaseException:
            if writer is not None:
                writer.close()
                stream.close()
                tmp.unlink(missing_ok=True)
            raise
        if writer is not None:
            writer.close()
            stream.flush()
            os.fsync(stream.fileno())
            stream.close()
            os.replace(tmp, final)
            counts["written"] += 1
        else:
            counts["already_complete"] += 1
    bar.close()
    write_atomic(out / "captions.jsonl", "".join(json.dumps(r, sort_keys=True, ensure_ascii=False) + "\n"
                                                  for r in records))
    write_atomic(out / "stats.json", json.dumps(counts, indent=1, sort_keys=True) + "\n")
    return counts


def main(argv: list[str] | None = None) -> int:
    cfg, _ = cli_config(CocoToWdsConfig, argv, prog="coco_to_wds",
                        description="MS-COCO 2014 (local files) to img2dataset-style webdataset shards. "
                                    f"Split rule: {SPLIT_RULE}.")
    t0 = time.time()
    c = convert(cfg.input, cfg.split, cfg.output, cfg.samples_per_shard, cfg.limit)
    print(f"coco_to_wds: {cfg.split}: {c['images']} images in {c['shards']} shards at {cfg.output} "
          f"({c['written']} written, {c['already_complete']} already complete; skipped: {c['missing']} missing "
          f"files, {c['no_caption']} without caption) in {time.time() - t0:.1f}s", flush=True)
    return 0


def cli():
    cli_main(main)


if __name__ == "__main__":
    cli()
