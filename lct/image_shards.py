"""Reading img2dataset image-text shards for the data prep (`data_prep/encode_latents.py`): shard
names, captions, decoding and preprocessing in DataLoader workers, whole shards per worker.

Input: webdataset shards in the img2dataset layout (`{key}.jpg|jpeg|png|webp`, `{key}.txt`,
`{key}.json`). Only image bytes (PIL), txt and json are decoded; nothing is unpickled. Captions:
the json's `captions` list, else its `caption`, else the txt; empty ones are dropped and the
first `max_captions` kept, in order. A sample without image, caption or a decodable image is
skipped with its reason (`missing_image`, `missing_caption`, `caption_not_utf8`, `corrupt_image`);
a repeated key is `duplicate_key`; a shard that cannot be read to its end is a read error.
"""

from __future__ import annotations

import functools
import json
import os
import re
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlparse

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from lct.buckets import BucketTable, resize_crop
from lct.data import die_with_parent
from lct.errors import UserError
from lct.shards import ShardError, tar_samples
from lct.vae import open_image, preprocess_image_uint8, to_rgb

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")


def open_url(url: str) -> str:
    """The URL webdataset opens (s3:// through the aws CLI)."""
    return f"pipe:aws s3 cp {url} -" if url.startswith("s3://") else url


def shard_name(url: str) -> str:
    """Output name of an input shard: its basename without .tar/.tar.gz/.tgz."""
    s = url
    if s.startswith("pipe:"):
        words = s[5:].split()
        tars = [w for w in words if re.search(r"\.(tar|tgz|tar\.gz)$", w)]
        s = tars[-1] if tars else (words[-1] if words else "")
    if "://" in s:
        s = urlparse(s).path
    base = os.path.basename(s.rstrip("/"))
    for ext in (".tar.gz", ".tgz", ".tar"):
        if base.endswith(ext):
            base = base[: -len(ext)]
            break
    if not base or base.startswith("."):
        raise UserError(f"--input: cannot name an output shard after {url!r}")
    return base


def sample_captions(meta: dict, txt: bytes | None, max_captions: int) -> tuple[list[str], str | None]:
    """(captions, None) of an img2dataset sample: json `captions`, else json `caption`, else the
    txt; whitespace is normalised, empty ones dropped, the first `max_captions` kept. Without a
    caption: ([], "missing_caption"), or ([], "caption_not_utf8") when the txt is not UTF-8."""
    def clean(caps):
        return [c for c in (" ".join(x.split()) for x in caps if isinstance(x, str)) if c]

    caps = clean(meta.get("captions")) if isinstance(meta.get("captions"), list) else []
    if not caps and isinstance(meta.get("caption"), str):
        caps = clean([meta["caption"]])
    if not caps and txt is not None:
        try:
            caps = clean([txt.decode("utf-8")])
        except UnicodeDecodeError:
            return [], "caption_not_utf8"
    return caps[:max_captions], (None if caps else "missing_caption")


@dataclass(frozen=True)
class Decoding:
    """How a worker turns a raw input sample into an item (picklable): a square `resolution`
    (`lct.vae.preprocess_image_uint8`) or, with `buckets`, the image's aspect-ratio bucket
    (`lct.buckets.resize_crop`)."""

    resolution: int
    tokenizer: Any
    max_captions: int
    buckets: BucketTable | None = None


def decode_input_sample(raw: dict, dec: Decoding):
    """(item, None) or (None, skip reason) for one raw input sample."""
    meta = {}
    if raw.get("json") is not None:
        try:
            meta = json.loads(raw["json"])
        except ValueError:  # includes UnicodeDecodeError
            meta = {}
        if not isinstance(meta, dict):
            meta = {"value": meta}
    ext = next((e for e in IMAGE_EXTS if raw.get(e) is not None), None)
    if ext is None:
        return None, "missing_image"
    captions, reason = sample_captions(meta, raw.get("txt"), dec.max_captions)
    if reason:
        return None, reason
    item = {"key": raw["__key__"]}
    try:
        if dec.buckets is None:
            item["image"] = preprocess_image_uint8(open_image(raw[ext]), dec.resolution)
        else:
            img = to_rgb(open_image(raw[ext]))
            item["bucket"] = dec.buckets.assign(img.height, img.width)
            item["image"], item["crop"] = resize_crop(img, dec.buckets.buckets[item["bucket"]])
    except Exception:  # PIL raises many kinds for corrupt, truncated or exotic files
        return None, "corrupt_image"
    tokens = dec.tokenizer(captions).numpy().astype(np.int32)
    return {**item, "tokens": tokens, "captions": captions, "meta": meta}, None


def _identity(x):
    return x


def shard_batches(jobs, dec: Decoding, batch_size: int, worker: int = 0, workers: int = 1):
    """Batches of decoded samples of whole shards (shard j goes to worker j mod workers), in shard
    order, then an end marker per shard with its skip counts and read errors (`lct.shards`: a
    shard without its end-of-archive marker is a read error; a repeated key is `duplicate_key`).
    Each item has its position among the shard's kept samples (`pos`). Square data: batches of
    consecutive samples. Bucketed data: a batch holds one bucket's samples; a bucket's batch goes
    out when full, or early once its oldest sample is `window` samples behind, so the writer,
    which writes in input order, waits for at most about `window` samples."""
    window = 4 * batch_size
    for j, (idx, url) in enumerate(jobs):
        if j % workers != worker:
            continue
        skipped: dict[str, int] = {}
        errors: list[str] = []

        def count(reason, skipped=skipped):
            skipped[reason] = skipped.get(reason, 0) + 1

        bufs: dict[int, list[dict]] = {}  # by bucket (square data: one buffer)
        seen = kept = 0
        try:
            for raw in tar_samples(open_url(url), on_duplicate=lambda key: count("duplicate_key")):
                seen += 1
                item, reason = decode_input_sample(raw, dec)
                if reason:
                    count(reason)
                    continue
                item["pos"] = kept
                kept += 1
                buf = bufs.setdefault(item.get("bucket", 0), [])
                buf.append(item)
                if len(buf) == batch_size:
                    yield _batch(idx, bufs.pop(item.get("bucket", 0)))
                while bufs:
                    oldest = min(bufs, key=lambda b: bufs[b][0]["pos"])
                    if kept - bufs[oldest][0]["pos"] < window:
                        break
                    yield _batch(idx, bufs.pop(oldest))
        except ShardError as err:  # the shard fails as a whole and is redone by a rerun
            errors.append(str(err))
        for b in sorted(bufs, key=lambda b: bufs[b][0]["pos"]):
            yield _batch(idx, bufs[b])
        yield {"shard": idx, "done": True, "skipped": skipped, "errors": errors, "seen": seen}


def _batch(idx: int, items: list[dict]) -> dict:
    batch = {"shard": idx, "done": False, "keys": [i["key"] for i in items], "pos": [i["pos"] for i in items],
             "images": torch.stack([i["image"] for i in items]), "tokens": [i["tokens"] for i in items],
             "captions": [i["captions"] for i in items], "meta": [i["meta"] for i in items]}
    if "bucket" in items[0]:
        batch.update(bucket=items[0]["bucket"], crops=[i["crop"] for i in items])
    return batch


class ShardImages(IterableDataset):
    """The DataLoader's dataset: worker w of n decodes the shards j with j mod n == w."""

    def __init__(self, jobs, dec: Decoding, batch_size: int):
        self.args = (jobs, dec, batch_size)

    def __iter__(self):
        info = get_worker_info()
        w, n = (info.id, info.num_workers) if info else (0, 1)
        return shard_batches(*self.args, worker=w, workers=n)


def make_loader(jobs, dec: Decoding, batch_size: int, num_workers: int, pin_memory: bool):
    """A DataLoader over `jobs` [(index, url)] whose workers decode whole shards (and die with
    this process, however it dies: `lct.data.die_with_parent`)."""
    workers = min(num_workers, len(jobs))
    kw = {"prefetch_factor": 4, "worker_init_fn": functools.partial(die_with_parent, os.getpid())} if workers else {}
    return DataLoader(ShardImages(jobs, dec, batch_size), batch_size=None,
                      num_workers=workers, collate_fn=_identity, pin_memory=pin_memory, **kw)
