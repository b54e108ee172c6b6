"""Named evaluation protocols: which captions, how many samples, which reference images, which
resolution and which feature models, so that numbers from different runs (and papers) compare.

`coco2014val-30k` (the default of `eval/clip_fid.py`) and `custom` are described once, in README
("Evaluation protocol"); `PROTOCOLS` holds their definitions, `draw_coco_captions` the caption draw
and `CAPTIONS_SHA256` the pinned caption file. Results are labelled with the protocol and every
deviation from it.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lct.coco import read_caption_annotations
from lct.errors import UserError
from lct.files import read_text
from lct.features import CLIP_MODEL, CLIP_PRETRAINED, FID_MODEL, PREPROCESS

REPO_ROOT = Path(__file__).resolve().parents[1]
CAPTIONS_DIR = REPO_ROOT / "eval" / "captions"


# The sha256 of eval/captions/coco2014val-30k.jsonl; None until the file is generated from the
# official annotations and shipped (see the module docstring for the command).
CAPTIONS_SHA256: str | None = None


@dataclass(frozen=True)
class Protocol:
    """An evaluation protocol (see the module docstring)."""

    name: str
    description: str
    num_samples: int | None            # None: every caption of the file
    resolution: int | None             # None: the model's resolution (no resize)
    captions_file: str | None = None  # shipped caption file (relative to eval/captions/)
    captions_sha256: str | None = None
    caption_seed: int | None = None
    ref_images: int | None = None      # images the reference statistics cover
    ref_description: str | None = None
    clip_model: str = CLIP_MODEL
    clip_pretrained: str = CLIP_PRETRAINED
    fid_model: str = FID_MODEL
    preprocess: str = PREPROCESS
    source_images: int | None = None   # images the captions are drawn from
    notes: tuple[str, ...] = field(default_factory=tuple)

    def captions_path(self) -> Path | None:
        return CAPTIONS_DIR / self.captions_file if self.captions_file else None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["notes"] = list(self.notes)
        return d


PROTOCOLS: dict[str, Protocol] = {
    "coco2014val-30k": Protocol(
        name="coco2014val-30k",
        description=("30,000 MS-COCO val2014 images drawn with numpy default_rng(0), one caption each drawn with "
                     "default_rng(0); reference statistics over all 40,504 val2014 images; real and generated "
                     "images center-cropped on the long edge and resized to 256"),
        num_samples=30_000,
        resolution=256,
        captions_file="coco2014val-30k.jsonl",
        captions_sha256=CAPTIONS_SHA256,
        caption_seed=0,
        ref_images=40_504,
        ref_description="all 40,504 MS-COCO val2014 images (data_prep/coco_to_wds.py --split val2014 shards)",
        source_images=40_504,
    ),
    "custom": Protocol(
        name="custom",
        description="any caption file (all captions unless --num-samples), the model's resolution, no resize",
        num_samples=None,
        resolution=None,
    ),
}

DEFAULT_PROTOCOL = "coco2014val-30k"


def get_protocol(name: str) -> Protocol:
    if name not in PROTOCOLS:
        raise UserError(f"--protocol {name!r}: unknown protocol (known: {', '.join(PROTOCOLS)})")
    return PROTOCOLS[name]


def count_label(n: int) -> str:
    """The sample-count suffix of metric names: 30000 -> '30k', 10000 -> '10k', 500 -> '500'."""
    return f"{n // 1000}k" if n >= 1000 and n % 1000 == 0 else str(n)


def metric_name(metric: str, n: int) -> str:
    """`fid30k`, `clip10k`, `shapes500`."""
    return f"{metric}{count_label(n)}"


# --------------------------------------------------------------------------------------------
# Caption files
# --------------------------------------------------------------------------------------------


def read_captions(path: str | os.PathLike) -> list[dict]:
    """Caption records `{"caption", ...}` of a `.txt` file (one caption per line, blank lines
    skipped) or a `.jsonl` file (one object per line with `caption`, optionally `image_id`/`key`
    and more: the held-out `captions.jsonl` of `data_prep/make_shapes.py` and
    `data_prep/coco_to_wds.py`, and the protocol caption files, are read as they are)."""
    p = Path(path)
    text = read_text(p, "--captions")
    if p.suffix.lower() == ".jsonl":
        out = []
        for no, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except ValueError as err:
                raise UserError(f"--captions {p}: line {no} is not JSON ({err})") from None
            if not isinstance(rec, dict) or not isinstance(rec.get("caption"), str):
                raise UserError(f"--captions {p}: line {no} has no string \"caption\" field")
            keep = {"caption": rec["caption"]}
            for k in ("image_id", "key", "file_name"):
                if k in rec:
                    keep[k] = rec[k]
            out.append(keep)
        return out
    if p.suffix.lower() not in (".txt", ""):
        raise UserError(f"--captions {p}: expected a .txt (one caption per line) or .jsonl file")
    return [{"caption": line.strip()} for line in text.splitlines() if line.strip()]


def draw_coco_captions(annotations: str | os.PathLike, num: int = 30_000, seed: int = 0) -> list[dict]:
    """The protocol's (image_id, caption) draw from a COCO `captions_val2014.json` (module
    docstring): records `{"index", "image_id", "file_name", "caption"}` in draw order."""
    path = Path(annotations)
    if not path.is_file():
        raise UserError(f"--coco-annotations {path}: file not found (captions_val2014.json of MS-COCO 2014)")
    pool = [im for im in read_caption_annotations(path, "--coco-annotations") if im["captions"]]
    if num > len(pool):
        raise UserError(f"--coco-annotations {path}: {len(pool)} captioned images, fewer than the {num} to draw")
    chosen = np.random.default_rng(seed).choice(len(pool), size=num, replace=False)
    counts = np.array([len(pool[int(i)]["captions"]) for i in chosen], dtype=np.int64)
    picks = np.random.default_rng(seed).integers(0, counts)
    return [{"index": k, "image_id": pool[int(i)]["image_id"], "file_name": pool[int(i)]["file_name"],
             "caption": pool[int(i)]["captions"][int(j)]}
            for k, (i, j) in enumerate(zip(chosen, picks))]


def captions_jsonl(records: list[dict]) -> bytes:
    """The exact bytes of a protocol caption file."""
    return "".join(json.dumps(r, sort_keys=True, ensure_ascii=False) + "\n" for r in records).encode("utf-8")
