"""Aspect-ratio buckets: tables of (height, width) of about equal area, the bucket of an image, and
the resize-to-cover + centre-crop geometry that puts an image into its bucket (data prep), and the
trainer's draw of one bucket per optimizer step (`BucketPlan`, `BucketQueues`; SPEC 1.2).

Tables (`load_table`): `pixart_256`, `pixart_512`, `pixart_1024` are PixArt-alpha's multi-scale
tables as diffusers ships them for the PixArt pipelines' resolution binning
(`diffusers.pipelines.pixart_alpha.pipeline_pixart_alpha.ASPECT_RATIO_{256,512,1024}_BIN`, 33
buckets from 1:4 to 4:1, read from the installed diffusers so they are the ones its pipelines bin
to), `pixart_2048` PixArt-Sigma's (`pipeline_pixart_sigma.ASPECT_RATIO_2048_BIN`). Their keys are
the ratio height / width rounded to two decimals; a table maps it to [height, width].
`shapes_32` is lct's table for the 32 px shapes data with `make_shapes.py --aspects 5:3,1:1,3:5`:
32x32, 24x40, 40x24 (about equal area; multiples of 8, so a 4x VAE gives latents a DiT patch of
2 divides). A user's
table is a YAML list of [height, width] pairs (or a mapping with such a list under `buckets`),
whose ratio keys are the exact height / width.

Assignment (`BucketTable.assign`): the bucket whose ratio key is nearest to the image's height /
width, ties to the first in table order: PixArt's `get_closest_ratio`
(PixArt-alpha/PixArt-alpha `diffusion/data/datasets/InternalData_ms.py`; diffusers'
`PixArtImageProcessor.classify_height_width_bin` bins generated sizes the same way).

Geometry (`cover_crop`, `resize_crop`), as PixArt's multi-scale training data
(`InternalDataMS.getdata`: `T.Resize(resize_size, BICUBIC)` then `T.CenterCrop(closest_size)`):
scale the image by s = max(H / h, W / w) so that it covers the H x W bucket, the other side
truncated to an integer (in integer arithmetic here; PixArt's float `int(w * H / h)` gives the
same for sides below 2^26), resize with PIL bicubic (what torchvision's `Resize` does to a PIL
image), then crop the centre at torchvision `center_crop`'s offsets (`round((h' - H) / 2)`,
`round((w' - W) / 2)`; with PIL's crop: importing torchvision cost every trainer process seconds).
The crop fraction is the share of the resized image's area cut off, 1 - H W / (h' w').
"""

from __future__ import annotations

import importlib
import math
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
import yaml
from PIL import Image

from lct import rng
from lct.errors import UserError

# name -> (diffusers module, table constant)
PIXART_TABLES = {
    "pixart_256": ("diffusers.pipelines.pixart_alpha.pipeline_pixart_alpha", "ASPECT_RATIO_256_BIN"),
    "pixart_512": ("diffusers.pipelines.pixart_alpha.pipeline_pixart_alpha", "ASPECT_RATIO_512_BIN"),
    "pixart_1024": ("diffusers.pipelines.pixart_alpha.pipeline_pixart_alpha", "ASPECT_RATIO_1024_BIN"),
    "pixart_2048": ("diffusers.pipelines.pixart_alpha.pipeline_pixart_sigma", "ASPECT_RATIO_2048_BIN"),
}
# lct's own tables: name -> [height, width] pairs (ratio keys height / width)
TABLES = {"shapes_32": ((32, 32), (24, 40), (40, 24))}
ASSIGN = "nearest ratio key to height / width, ties to the first in table order (PixArt get_closest_ratio)"
GEOMETRY = ("PIL bicubic resize to cover the bucket (scale max(H/h, W/w), the other side truncated), torchvision "
            "center_crop to H x W (PixArt InternalDataMS)")
CROP_BINS = (0.0, 0.05, 0.1, 0.25, 0.5)  # crop summary: samples with crop <= each edge, and above the last
QUEUE_FLOOR = 256  # stream mode: samples held across the bucket queues, at least (BucketQueues)
QUEUE_FULL = "bucket_queue_full"  # the skip reason of a sample passed over by a full queue


@dataclass(frozen=True)
class Bucket:
    height: int
    width: int
    ratio: float  # the key an image's height / width is compared with

    @property
    def name(self) -> str:
        return f"{self.height}x{self.width}"


@dataclass(frozen=True)
class BucketTable:
    """Buckets in table order, and where the table came from (a shipped name or a file)."""

    buckets: tuple[Bucket, ...]
    source: str

    def __len__(self) -> int:
        return len(self.buckets)

    @property
    def names(self) -> list[str]:
        return [b.name for b in self.buckets]

    @property
    def base(self) -> int:
        """The table's base resolution: the side of a square of its largest area (PixArt: 256,
        512, 1024, 2048)."""
        return int(round(math.sqrt(max(b.height * b.width for b in self.buckets))))

    @property
    def base_index(self) -> int:
        """The bucket a square image goes to."""
        return self.assign(1, 1)

    def assign(self, height: int, width: int) -> int:
        """Index of the bucket of an image of `height` x `width` (module docstring)."""
        r = height / width
        return min(range(len(self.buckets)), key=lambda i: abs(self.buckets[i].ratio - r))

    def index(self, name: str) -> int:
        return self.names.index(name)

    def check_divisible(self, factor: int, what: str) -> None:
        """Every side a multiple of `factor` (the VAE's downsampling), else a one-line error."""
        bad = [b.name for b in self.buckets if b.height % factor or b.width % factor]
        if bad:
            raise UserError(f"--buckets {self.source}: bucket(s) {', '.join(bad[:4])} are not multiples of {what} "
                            f"{factor}; use sides divisible by {factor}")

    def record(self, channels: int, downsample: int) -> dict:
        """The manifest's `buckets` record of the table (counts and crops are added by the merge)."""
        return {"source": self.source, "assign": ASSIGN, "geometry": GEOMETRY, "base_resolution": self.base,
                "table": [{"name": b.name, "size": [b.height, b.width], "ratio": b.ratio,
                           "latent_shape": [channels, b.height // downsample, b.width // downsample]}
                          for b in self.buckets]}

    @classmethod
    def from_record(cls, rec: dict) -> "BucketTable":
        return cls(tuple(Bucket(int(b["size"][0]), int(b["size"][1]), float(b["ratio"])) for b in rec["table"]),
                   str(rec.get("source", "manifest")))


def _pixart(name: str) -> BucketTable:
    module, const = PIXART_TABLES[name]
    try:
        table = getattr(importlib.import_module(module), const)
    except (ImportError, AttributeError) as err:
        raise UserError(f"--buckets {name}: the installed diffusers has no {module}.{const} ({err}); "
                        "pass the table as a YAML file of [height, width] pairs instead") from None
    return BucketTable(tuple(Bucket(int(h), int(w), float(k)) for k, (h, w) in table.items()), name)


def _from_file(path: Path) -> BucketTable:
    flag = f"--buckets {path}"
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as err:
        detail = " ".join(str(err).split())[:160]
        raise UserError(f"{flag}: cannot read the bucket table ({type(err).__name__}: {detail})") from None
    if isinstance(data, dict):
        data = data.get("buckets")
    pairs = []
    for item in data if isinstance(data, list) else [None]:
        ok = (isinstance(item, (list, tuple)) and len(item) == 2
              and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in item))
        if not ok:
            raise UserError(f"{flag}: expected a YAML list of [height, width] pairs of positive integers "
                            f"(e.g. [[256, 256], [192, 320], [320, 192]]), got {item!r}")
        pairs.append((int(item[0]), int(item[1])))
    if not pairs:
        raise UserError(f"{flag}: the bucket table is empty")
    buckets = tuple(Bucket(h, w, h / w) for h, w in pairs)
    seen: dict[float, str] = {}
    for b in buckets:
        if b.ratio in seen:
            raise UserError(f"{flag}: buckets {seen[b.ratio]} and {b.name} have the same aspect ratio; a table "
                            "holds one size per ratio")
        seen[b.ratio] = b.name
    return BucketTable(buckets, str(path.resolve()))  # a rerun from another folder is the same job


def load_table(spec: str) -> BucketTable:
    """A shipped table by name (`PIXART_TABLES`, `TABLES`) or a user's YAML file; errors name --buckets."""
    if spec in PIXART_TABLES:
        return _pixart(spec)
    if spec in TABLES:
        return BucketTable(tuple(Bucket(h, w, h / w) for h, w in TABLES[spec]), spec)
    path = Path(spec).expanduser()
    if path.is_file():
        return _from_file(path)
    raise UserError(f"--buckets {spec}: neither a table name ({', '.join([*PIXART_TABLES, *TABLES])}) nor a YAML file")


# The stock diffusers pipelines' resolution binning (`use_resolution_binning=True`, their default):
# the table each bins a requested height x width to, by the transformer's `sample_size`, as their
# `__call__` picks it. pipeline class -> (module, {sample_size: table constant}).
STOCK_BINNING = {
    "PixArtAlphaPipeline": ("diffusers.pipelines.pixart_alpha.pipeline_pixart_alpha",
                            {128: "ASPECT_RATIO_1024_BIN", 64: "ASPECT_RATIO_512_BIN", 32: "ASPECT_RATIO_256_BIN"}),
    "PixArtSigmaPipeline": ("diffusers.pipelines.pixart_alpha.pipeline_pixart_sigma",
                            {256: "ASPECT_RATIO_2048_BIN", 128: "ASPECT_RATIO_1024_BIN", 64: "ASPECT_RATIO_512_BIN",
                             32: "ASPECT_RATIO_256_BIN"}),
    "SanaPipeline": ("diffusers.pipelines.sana.pipeline_sana",
                     {128: "ASPECT_RATIO_4096_BIN", 64: "ASPECT_RATIO_2048_BIN", 32: "ASPECT_RATIO_1024_BIN",
                      16: "ASPECT_RATIO_512_BIN"}),
}


def stock_binning(pipeline: str, sample_size: int, sizes) -> dict | None:
    """What `pipeline`'s resolution binning does for a transformer of `sample_size` trained at
    `sizes` ([height, width] image sizes): None where the pipeline has no binning; else the table
    it bins to (None: this sample_size makes the pipeline refuse binning) and whether every
    trained size is one of its buckets, so that binning generates only at trained sizes."""
    if pipeline not in STOCK_BINNING:
        return None
    module, by_size = STOCK_BINNING[pipeline]
    const = by_size.get(int(sample_size))
    table = getattr(importlib.import_module(module), const, None) if const else None
    values = {(int(float(h)), int(float(w))) for h, w in (table or {}).values()}
    return {"pipeline": pipeline, "table": const, "sample_size": int(sample_size),
            "covers_training": bool(table) and all((int(h), int(w)) in values for h, w in sizes)}


def cover_crop(height: int, width: int, bucket: Bucket) -> tuple[tuple[int, int], tuple[int, int], float]:
    """((resized height, resized width), (top, left) of the crop, crop fraction) of an image of
    `height` x `width` put into `bucket` (module docstring)."""
    H, W = bucket.height, bucket.width
    if H * width > W * height:  # H / height > W / width: the height sets the scale
        rh, rw = H, width * H // height
    else:
        rh, rw = height * W // width, W
    top, left = int(round((rh - H) / 2.0)), int(round((rw - W) / 2.0))
    return (rh, rw), (top, left), 1.0 - (H * W) / (rh * rw)


def resize_crop(img: Image.Image, bucket: Bucket) -> tuple[torch.Tensor, float]:
    """(uint8 [3, H, W], crop fraction) of an 8-bit RGB PIL image put into `bucket`."""
    (rh, rw), (top, left), crop = cover_crop(img.height, img.width, bucket)
    if (img.height, img.width) != (rh, rw):
        img = img.resize((rw, rh), Image.BICUBIC)
    img = img.crop((left, top, left + bucket.width, top + bucket.height))
    arr = np.array(img, dtype=np.uint8, copy=True)
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous(), crop


# ----------------------------------------------------------------------------------------------
# Aspect-ratio buckets: one bucket per optimizer step (issue 33)
# ----------------------------------------------------------------------------------------------


def bucket_spec(manifest: dict) -> dict:
    """DataSpec's `buckets` / `bucket_counts` of a manifest: set only for bucketed data with
    samples in two or more buckets (anything else trains exactly as square data)."""
    b = manifest.get("buckets") or {}
    names = [t["name"] for t in b.get("table") or []]
    counts = [int((b.get("counts") or {}).get(n, 0)) for n in names]
    if sum(1 for c in counts if c) < 2:
        return {}
    return {"buckets": tuple(names), "bucket_counts": tuple(counts)}


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


class BucketPlan:
    """Which bucket each optimizer step (data step) draws, and which sample fills each slot.

    Bucket epochs: in bucket epoch E, bucket b (n_b samples, global batch G) gets
    `ceil((E+1) n_b / G) - ceil(E n_b / G)` steps, in the order of
    `philox(BUCKET_DRAW, seed, E).permutation` of that list (buckets in table order, each
    repeated). A step is therefore bucket b with probability = its share of the epoch's steps,
    ~ n_b / n, from counter-based draws only: any data step's bucket is computed from
    (seed, step) alone, identically on every rank, worker and after a resume.
    Remainders: bucket b's j-th step (counted over all epochs) fills its slots with bucket b's
    positions c = j G + slot; in indexed mode position c is sample `perm_{b,e}[c mod n_b]` with
    e = c div n_b and `perm_{b,e} = philox(BUCKET_ORDER, seed, b, e).permutation(n_b)`, so a
    bucket's last step of a pass is topped up with the start of its next pass (as square data
    wraps at an epoch's end): nothing is dropped, every sample is seen once per pass of its
    bucket, and by the end of bucket epoch E every bucket has completed pass E.
    """

    def __init__(self, counts, global_batch: int, seed: int):
        self.counts = [int(c) for c in counts]
        self.n = sum(self.counts)
        self.G = int(global_batch)
        self.seed = int(seed)
        self._epoch: tuple[int, np.ndarray, np.ndarray] | None = None  # (E, bucket per step, local step)

    def steps_before(self, epoch: int) -> int:
        """Data steps of the bucket epochs before `epoch`."""
        return sum(_ceil_div(epoch * c, self.G) for c in self.counts)

    def epoch_of(self, step: int) -> int:
        lo, hi = 0, _ceil_div((step + 1) * self.G, self.n)  # steps_before(hi) >= hi n / G > step
        while lo < hi:  # the largest E with steps_before(E) <= step
            mid = (lo + hi + 1) // 2
            lo, hi = (mid, hi) if self.steps_before(mid) <= step else (lo, mid - 1)
        return lo

    def schedule(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """(bucket of each step of `epoch`, its count among that bucket's steps over all epochs)."""
        if self._epoch is None or self._epoch[0] != epoch:
            per = [_ceil_div((epoch + 1) * c, self.G) - _ceil_div(epoch * c, self.G) for c in self.counts]
            order = np.repeat(np.arange(len(per)), per)
            order = order[rng.philox(rng.Stream.BUCKET_DRAW, self.seed, epoch).permutation(len(order))]
            local = np.zeros(len(order), dtype=np.int64)
            seen = [_ceil_div(epoch * c, self.G) for c in self.counts]
            for i, b in enumerate(order):
                local[i], seen[b] = seen[b], seen[b] + 1
            self._epoch = (epoch, order, local)
        return self._epoch[1], self._epoch[2]

    def step(self, data_step: int) -> tuple[int, int]:
        """(bucket index, the bucket's own step count j) of a data step."""
        epoch = self.epoch_of(data_step)
        order, local = self.schedule(epoch)
        p = data_step - self.steps_before(epoch)
        return int(order[p]), int(local[p])

    def member(self, bucket: int, local_step: int, slot: int, cache: dict) -> int:
        """Indexed mode: the index among bucket `bucket`'s samples of a slot (class docstring)."""
        n_b = self.counts[bucket]
        e, within = divmod(local_step * self.G + slot, n_b)
        if cache.get(bucket, (None,))[0] != e:
            cache[bucket] = (e, rng.philox(rng.Stream.BUCKET_ORDER, self.seed, bucket, e).permutation(n_b))
        return int(cache[bucket][1][within])


class BucketQueues:
    """Stream mode: this worker's samples held per bucket, so that a step takes samples of its
    bucket in the order the stream gives them (the others wait for a step of theirs). Steps draw
    buckets in proportion to their shares, so the queues stay short, but their imbalance is a
    random walk over a long run (and long where shards group samples by shape): past
    `max(data.shuffle_buffer, QUEUE_FLOOR)` held samples the oldest of the longest other queue
    is passed over and counted (`bucket_queue_full` in `counts`, the run's skip counts). The
    stream draws shards with replacement, so such a sample comes round again. `spec`: the
    worker's `lct.data.DataSpec`."""

    def __init__(self, stream: Iterator[dict], names: tuple[str, ...], spec, counts: dict[str, int] | None = None):
        self.stream, self.index = stream, {n: i for i, n in enumerate(names)}
        self.queues: list[deque[dict]] = [deque() for _ in names]
        self.names, self.spec = names, spec
        self.counts = counts if counts is not None else {}
        self.cap = max(int(spec.shuffle_buffer), QUEUE_FLOOR)

    @property
    def held(self) -> int:
        return sum(len(q) for q in self.queues)

    def next(self, bucket: int) -> dict:
        q = self.queues[bucket]
        pulled = 0
        while not q:
            sample = next(self.stream)
            self.queues[self.index[sample["bucket"]]].append(sample)
            pulled += 1
            if self.held > self.cap:  # pass over the oldest sample of the longest other queue
                longest = max((i for i in range(len(self.queues)) if i != bucket), key=lambda i: len(self.queues[i]))
                self.queues[longest].popleft()
                self.counts[QUEUE_FULL] = self.counts.get(QUEUE_FULL, 0) + 1
            if pulled > 100 * max(sum(self.spec.bucket_counts), 1):
                raise UserError(f"data.shards: no usable sample of bucket {self.names[bucket]} in "
                                f"{pulled} reads, though the manifest counts {self.spec.bucket_counts[bucket]}; "
                                "check the shards against their manifest (re-encode them)")
        return q.popleft()
