"""Writing one latent shard of the data prep (`data_prep/encode_latents.py`, the format of
`lct.latents`): under its lock, to a temporary file of this process, read back and checked,
renamed, then recorded. Values that float16 cannot hold are an error naming the sample."""

from __future__ import annotations

import hashlib
import json
import os
import socket
from pathlib import Path

import numpy as np
import torch
import webdataset as wds

from lct.buckets import CROP_BINS, BucketTable
from lct.errors import UserError
from lct.latents import FP16_MAX, JOB, ChannelStats, StatsAccumulator, write_shard_record
from lct.shards import ShardError, tar_samples


def fp16_problem(t, what: str, name: str, keys: list[str]) -> UserError:
    """The error for a tensor holding a value that float16 cannot (names the first such sample)."""
    bad = (~torch.isfinite(t) | (t.abs() > FP16_MAX)).reshape(t.shape[0], -1).any(dim=1)
    row = int(bad.nonzero()[0, 0]) if bad.any() else 0
    finite = t[torch.isfinite(t)]
    big = float(finite.abs().max()) if finite.numel() else float("nan")
    return UserError(f"shard {name}: sample {keys[row]}: {what} is not finite or outside the float16 "
                     f"range (max |x| {big:.4g} > {FP16_MAX:.0f}); it cannot be stored as float16 "
                     "(try --precision fp32, or another VAE)")


def to_fp16(t, what: str, name: str, keys: list[str]):
    """float16 numpy of a tensor; a value outside the fp16 range is an error naming the sample."""
    if (~torch.isfinite(t) | (t.abs() > FP16_MAX)).any():
        raise fp16_problem(t, what, name, keys)
    return t.to(torch.float16).cpu().numpy()


class ShardWriter:
    """One output shard, written under its lock (`records/<name>.lock`, `lct.shards.FileLock`) to a
    temporary file of this process (`<name>.tar.<host>-<pid>.tmp`), read back and checked, renamed
    to `<name>.tar`, then recorded; the lock is released and removed last. Samples are written in
    input order: one that arrives ahead of an earlier one (bucketed batches) waits for it.
    Bucketed data (`buckets`): per-bucket channel statistics, and the record lists each sample's
    bucket, the count per bucket and the crop fractions."""

    def __init__(self, out: Path, name: str, url: str, latent_shape, job_id: str, lock, rank: int = 0,
                 world: int = 1, buckets: BucketTable | None = None):
        self.out, self.name, self.url, self.job_id, self.lock = out, name, url, job_id, lock
        self.rank, self.world = rank, world
        self.final = out / f"{name}.tar"
        for old in out.glob(f"{name}.tar.*tmp"):  # left by a dead writer (we hold the lock)
            old.unlink(missing_ok=True)
        self.tmp = out / f"{name}.tar.{socket.gethostname()}-{os.getpid()}.tmp"
        self.stream = open(self.tmp, "wb")
        self.writer = wds.TarWriter(self.stream, encoder=False, mtime=0.0, user="lct", group="lct", mode=0o644)
        self.buckets = buckets
        self.stats = ChannelStats(len(buckets), latent_shape[0]) if buckets else StatsAccumulator(latent_shape)
        self.sample_buckets: list[int] = []
        self.crops: list[float] = []
        self.waiting: dict[int, tuple] = {}  # position -> a sample that arrived before an earlier one
        self.keys: list[str] = []
        self.text_bytes = 0
        self.fallbacks = 0

    @property
    def count(self) -> int:
        return len(self.keys)

    def add(self, members: dict, mean16, std16, pos: int | None = None, bucket: int | None = None,
            crop: float | None = None) -> None:
        """The sample at position `pos` of the shard's kept samples (default: the next one); it is
        written once every earlier one is."""
        self.waiting[self.count + len(self.waiting) if pos is None else pos] = (members, mean16, std16, bucket, crop)
        while self.count in self.waiting:
            self._write(*self.waiting.pop(self.count))

    def _write(self, members: dict, mean16, std16, bucket: int | None, crop: float | None) -> None:
        self.writer.write(members)
        if self.buckets is not None:
            self.stats.add(bucket, mean16, std16)
            self.sample_buckets.append(bucket)
            self.crops.append(crop)
        else:
            self.stats.add(mean16, std16)
        self.keys.append(members["__key__"])
        self.text_bytes += len(members.get("states.npy", b"")) + len(members.get("pooled.npy", b""))
        self.lock.heartbeat()

    def flush(self) -> None:
        """Push the bytes written so far to the temporary file (what a kill leaves behind)."""
        self.stream.flush()

    def bucket_record(self) -> dict:
        """The record's bucket fields: counts per bucket, each sample's bucket, crop sums."""
        names = self.buckets.names
        counts = np.bincount(np.asarray(self.sample_buckets, dtype=np.int64), minlength=len(names))
        crop_sum = np.zeros(len(names))
        hist = [0] * (len(CROP_BINS) + 1)
        for b, c in zip(self.sample_buckets, self.crops):
            crop_sum[b] += c
            hist[next((i for i, e in enumerate(CROP_BINS) if c <= e), len(CROP_BINS))] += 1
        return {"bucket_counts": {n: int(k) for n, k in zip(names, counts) if k},
                "sample_buckets": list(self.sample_buckets),
                "crop": {"edges": list(CROP_BINS), "counts": hist, "sum": float(sum(self.crops)),
                         "max": float(max(self.crops, default=0.0)),
                         "bucket_sum": {n: float(v) for n, v, k in zip(names, crop_sum, counts) if k}}}

    def abort(self) -> None:
        try:
            self.writer.close()
        finally:
            self.stream.close()
            self.tmp.unlink(missing_ok=True)
            self.lock.release()

    def verify(self) -> str:
        """Read the closed temporary file back: every key once, in order, then the end-of-archive
        marker. Returns its sha256."""
        keys, dups = [], []
        try:
            keys = [s["__key__"] for s in tar_samples(str(self.tmp), on_duplicate=dups.append)]
        except ShardError as err:
            raise UserError(f"shard {self.name}: the file just written does not read back ({err}); is the "
                            f"disk of --output {self.out} full or failing?") from None
        if keys != self.keys or dups:
            raise UserError(f"shard {self.name}: the file just written holds {len(keys)} samples, "
                            f"{len(self.keys)} were written; another process may be writing to --output {self.out}")
        h = hashlib.sha256()
        with open(self.tmp, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        return h.hexdigest()

    def commit(self, skipped: dict, seen: int, record_empty: bool) -> dict | None:
        """Close, check and rename; write the record. Returns it (None for an unrecorded empty shard)."""
        rec = {"name": self.name, "input": self.url, "samples": self.count, "read": seen,
               "skipped": dict(sorted(skipped.items())), "text_state_bytes": self.text_bytes,
               "fp32_fallback_batches": self.fallbacks, "job": self.job_id, "rank": self.rank,
               "world_size": self.world}
        if self.waiting:
            raise RuntimeError(f"shard {self.name}: samples at positions {sorted(self.waiting)[:3]} arrived but "
                               f"position {self.count} never did")
        if self.buckets is not None:
            rec.update(self.bucket_record())
        if self.count == 0:
            self.writer.close()
            self.stream.close()
            self.tmp.unlink(missing_ok=True)
            if record_empty and self.lock.still_held():
                rec.update(file=None, bytes=0, empty=True)
                write_shard_record(self.out, self.name, rec, None)
            self.lock.release(remove=record_empty)
            return rec if record_empty else None
        self.writer.close()
        self.stream.flush()
        os.fsync(self.stream.fileno())
        self.stream.close()
        try:
            digest = self.verify()
            if current_job(self.out) != self.job_id:
                raise UserError(f"shard {self.name}: {self.out}/job.json was replaced by a job with other settings "
                                "while this one ran; not recorded (run one job per --output at a time)")
            if not self.lock.still_held():
                raise UserError(f"shard {self.name}: lost its lock {self.lock.path} to "
                                f"{self.lock.describe(self.lock._read())} while writing; not recorded here")
        except BaseException:
            self.tmp.unlink(missing_ok=True)
            self.lock.release()
            raise
        os.replace(self.tmp, self.final)
        rec.update(file=self.final.name, bytes=self.final.stat().st_size, sha256=digest, empty=False)
        write_shard_record(self.out, self.name, rec, self.stats)
        self.lock.release(remove=True)
        return rec


def job_digest(header: dict) -> str:
    """The id of a job's settings (its job.json without the input list), kept in each record."""
    return hashlib.sha256(json.dumps({k: v for k, v in header.items() if k != "input"},
                                     sort_keys=True).encode()).hexdigest()[:16]


def current_job(out: Path) -> str | None:
    try:
        return job_digest(json.loads((out / JOB).read_text()))
    except (OSError, ValueError):
        return None
