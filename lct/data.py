"""The trainer's data path: latent shards to ready micro-batches, in DataLoader workers.

Two modes (`data.mode`):
- `stream` (default, any size): webdataset resampled shards, seeded by (seed, rank, worker,
  resume count), through a shuffle buffer. Samples are i.i.d. draws from the shards, so a resumed
  run continues with fresh draws rather than replaying a position.
- `indexed` (small data, tests, exact resume): every sample in memory; the sample at global slot
  g of data step s is `perm_e[(s * G + g) mod n]`, with `perm_e` a seeded permutation per epoch e.

Aspect-ratio buckets (`encode_latents.py --buckets`, two or more buckets with samples): each
optimizer step draws ONE bucket for its whole global batch (`BucketPlan`, SPEC 1.2: bucket epochs
of per-bucket step counts in a seeded order; indexed mode: per-bucket passes), so a micro-batch
holds one latent shape and the OT coupling pairs within it; stream mode keeps per-bucket queues
(`BucketQueues`). Square data takes neither path.

Global slots: the global batch G of one optimizer step is laid out rank-major,
`slot = rank * (A * mb) + micro * mb + i` (A accumulation steps of mb samples per rank), so the
same step sees the same samples on 1 or 64 ranks.

All per-sample randomness comes from counter-based streams keyed by (seed, data step, slot)
(`lct.rng`, SPEC 1.2): `SAMPLE_CHOICES` (flip, caption choice, caption dropout), `SIGMA_PAIR` (pair
uniform u, ECT/EDM normal n), `POSTERIOR_EPS` (eps) and `TRAIN_NOISE` (noise z), so it depends on
neither world size, workers nor accumulation. The latent is the
posterior sample `mean + std * eps` (`data.posterior: sample`, a fresh eps at every use), its
mean (`mean`), or one draw per image and flip keyed by (seed, sample key, flip) (`fixed`: as
iLCT encoded one sample offline; `fixed_posterior_eps`), normalised with the manifest's
statistics (SPEC 7), and the OT coupling
(SPEC 6) reorders the noise of each micro-batch, here in the worker, off the GPU's critical path.

Checks: `train_shard_urls` holds `data.shards` against the manifest's shard list (missing or
resized shards are refused, unlisted tars left out with a warning). Every sample is read with
`lct.shards` (a shard cut short is `unreadable_shard`) and checked against the manifest's
`SampleLayout` before any draw (bucketed data: each sample against its own bucket's latent
shape), so a wrong shape is never broadcast and a NaN never reaches the OT coupling; bad samples are skipped, counted per reason (`SKIP_REASONS`, in each batch's
`skipped`, summed by `SkipTally` for stats.jsonl) and named once. Shards without any usable
sample raise the same `UserError` in both modes (stream mode would otherwise resample forever).
"""

from __future__ import annotations

import functools
import glob
import os
import random
import signal
import sys
from dataclasses import dataclass
from typing import Iterator

import braceexpand
import numpy as np
import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from lct import rng
from lct.buckets import QUEUE_FULL, BucketPlan, BucketQueues
from lct.consistency import ot_couple
from lct.errors import UserError
from lct.latents import SampleLayout, check_latent_sample, decode_latent_sample
from lct.shards import ShardError, tar_samples
from lct.tokens import NO_PADDING, token_mask
from lct.vae import LatentNorm

# Why a latent sample was skipped (`read_samples`); the trainer logs each as `data_skipped_<reason>`.
SKIP_REASONS = ("corrupt_sample", "missing_member", "wrong_shape", "non_finite", "duplicate_key",
                "unreadable_shard", QUEUE_FULL)


@dataclass
class DataSpec:
    """Everything a worker needs to build micro-batches (picklable)."""

    urls: list[str]
    mode: str
    seed: int
    rank: int
    world_size: int
    micro_batch: int
    accum: int
    latent_shape: tuple[int, int, int]
    norm: LatentNorm                 # SPEC 7: x = (raw - mean) / std * 0.5
    caption_dropout: float
    flip: bool
    text: str                        # "precomputed" | "on_the_fly" | "none"
    ot: bool
    shuffle_buffer: int = 2000
    resume_count: int = 0
    layout: SampleLayout | None = None  # what every sample must hold (the manifest's); see read_samples
    pad_id: int | None = None        # the tokenizer's pad and EOT ids (lct.tokens.token_mask); None: open_clip's rule
    eot_id: int | None = None
    posterior: str = "sample"        # "sample" | "mean" | "fixed" (SPEC 7, `posterior_latent`)
    buckets: tuple[str, ...] | None = None   # bucketed data (>= 2 buckets with samples): names in table order
    bucket_counts: tuple[int, ...] | None = None  # the manifest's samples per bucket (stream mode's shares)

    @property
    def global_batch(self) -> int:
        return self.micro_batch * self.accum * self.world_size


def expand_urls(pattern: str) -> list[str]:
    """Shard list from a brace pattern, a comma list, a directory or a glob."""
    urls: list[str] = []
    for part in pattern.split(","):
        part = part.strip()
        if not part:
            continue
        if os.path.isdir(part):
            urls += sorted(glob.glob(os.path.join(part, "*.tar")))
        elif any(ch in part for ch in "*?[") and "://" not in part:
            urls += sorted(glob.glob(part))
        else:
            urls += list(braceexpand.braceexpand(part))
    return urls


def existing_shards(pattern: str, flag: str) -> list[str]:
    """`expand_urls` for a data-prep input: at least one shard, and every local one must exist
    (URLs and pipe: commands are passed on). Errors name the command-line `flag`."""
    urls = expand_urls(str(pattern or ""))
    if not urls:
        raise UserError(f"{flag}: no shards match {pattern!r}")
    local = [u for u in urls if "://" not in u and not u.startswith("pipe:")]
    missing = [u for u in local if not os.path.isfile(u)]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise UserError(f"{flag}: no such shard file {missing[0]}{more}")
    return urls


def train_shard_urls(pattern: str, manifest: dict, flag: str = "data.shards") -> tuple[list[str], str | None]:
    """The shards of `pattern` to train on, checked against the manifest's shard list: a listed
    shard that `pattern` does not reach, or a local one whose size differs from its record
    (truncated or replaced), is a `UserError`; tars the manifest does not list are left out.
    Returns (urls in the pattern's order, a one-line warning about left-out tars or None)."""
    urls = expand_urls(str(pattern or ""))
    listed = [s for s in manifest.get("shards") or [] if s.get("file")]
    if not listed:
        return urls, None  # an older manifest without a shard list: nothing to check against
    by_file: dict[str, str] = {}
    for u in urls:
        if "://" in u or u.startswith("pipe:") or os.path.isfile(u):
            by_file.setdefault(os.path.basename(u.rstrip("/").split(" ")[-1]), u)
    where = manifest.get("_path") or "the manifest"
    missing = [s["file"] for s in listed if s["file"] not in by_file]
    if missing:
        raise UserError(f"{flag}: {len(missing)} of the {len(listed)} shards listed in {where} are not in "
                        f"{pattern!r} (e.g. {missing[0]}); restore them or point {flag} at the folder holding all "
                        "of them (training on part of the data is not silent)")
    keep = set()
    for s in listed:
        u = by_file[s["file"]]
        if "://" not in u and not u.startswith("pipe:") and s.get("bytes") is not None:
            size = os.path.getsize(u)
            if size != int(s["bytes"]):
                raise UserError(f"{flag}: shard {u} has {size} bytes, {where} records {s['bytes']}: it was truncated "
                                "or replaced after encoding; restore it or re-encode it (delete it and its "
                                "records/ entry, then re-run data_prep/encode_latents.py)")
        keep.add(u)
    out = [u for u in urls if u in keep]
    extra = [u for u in urls if u not in keep]
    note = None
    if extra:
        note = (f"warning: {flag}: {len(extra)} tar(s) not listed in {where} are left out "
                f"(e.g. {os.path.basename(extra[0])})")
    return out, note


# ----------------------------------------------------------------------------------------------
# Samples
# ----------------------------------------------------------------------------------------------


_WARNED: set[tuple[str, str]] = set()


def _warn_once(url: str, reason: str, what: str, quiet: bool = False) -> None:
    if quiet or (url, reason) in _WARNED:
        return
    _WARNED.add((url, reason))
    print(f"data: {url}: {what}; skipped ({reason}; more of this kind in this shard are counted in "
          "stats.jsonl, not named)", file=sys.stderr, flush=True)


def read_samples(url: str, counts: dict[str, int], layout: SampleLayout | None = None,
                 quiet: bool = False) -> Iterator[dict]:
    """Decoded samples of one latent shard that match `layout` (`lct.latents.check_latent_sample`;
    no unpickling). A bad sample is skipped, counted per reason (SKIP_REASONS) in `counts` and
    named with its shard and key once per process; a repeated key is `duplicate_key`; a shard
    that cannot be read to its end (`lct.shards`) counts once as `unreadable_shard` (its samples
    before the problem are kept)."""
    def skip(reason, what):
        counts[reason] = counts.get(reason, 0) + 1
        _warn_once(url, reason, what, quiet)

    try:
        for raw in tar_samples(url, on_duplicate=lambda k: skip("duplicate_key", f"sample {k!r}: a repeated key")):
            absent = [m for m in ("mean.npy", "std.npy") if m not in raw]
            if absent:  # e.g. image shards where latent shards belong
                skip("missing_member", f"sample {raw['__key__']!r}: no {', '.join(absent)}")
                continue
            try:
                sample = decode_latent_sample(raw)
            except Exception as err:  # a corrupt or incomplete sample loses nothing else
                skip("corrupt_sample", f"sample {raw.get('__key__')!r}: {type(err).__name__}: {str(err)[:200]}")
                continue
            bad = check_latent_sample(sample, layout)
            if bad is not None:
                skip(bad[0], f"sample {sample['key']!r}: {bad[1]}")
                continue
            yield sample
    except ShardError as err:
        skip("unreadable_shard", str(err))


def no_samples_error(urls: list[str], counts: dict[str, int]) -> UserError:
    """The error for shards that yield no usable latent sample (both modes)."""
    skipped = ", ".join(f"{k} {v}" for k, v in sorted(counts.items())) or "none"
    names = ", ".join(os.path.basename(u) for u in urls[:3]) + (", ..." if len(urls) > 3 else "")
    return UserError(f"no usable latent samples in {len(set(urls))} shard(s) ({names}; skipped: {skipped}); "
                     "check data.shards: it must point at the output of data_prep/encode_latents.py")


class InMemoryLatents:
    """All samples of a small latent data set, for `indexed` mode and validation batches;
    `skipped` counts the dropped ones per reason (`read_samples`)."""

    def __init__(self, urls: list[str], layout: SampleLayout | None = None, quiet: bool = False):
        counts: dict[str, int] = {}
        self.samples = [s for u in urls for s in read_samples(u, counts, layout, quiet)]
        self.skipped = counts
        if not self.samples:
            raise no_samples_error(urls, counts)

    def __len__(self) -> int:
        return len(self.samples)


def stream_samples(src, spec: "DataSpec", counts: dict[str, int]) -> Iterator[dict]:
    """webdataset stage: the samples of each shard URL {"url"} of `src` (resampled shards); a
    `UserError` once every shard was read and none gave a usable sample (instead of an endless loop)."""
    distinct = set(spec.urls)
    empty_reads: set[str] = set()
    reads = good = 0
    for item in src:
        url = item["url"]
        for sample in read_samples(url, counts, spec.layout):
            good += 1
            yield sample
        reads += 1
        if not good:
            empty_reads.add(url)
            if empty_reads >= distinct or reads >= 20 * len(distinct):
                raise no_samples_error(spec.urls, counts)


def indexed_position(seed: int, data_step: int, slot: int, global_batch: int, n: int,
                     cache: dict) -> int:
    """Sample index for (data step, global slot): seeded permutation per epoch."""
    pos = data_step * global_batch + slot
    epoch, within = divmod(pos, n)
    if epoch not in cache:
        cache.clear()
        cache[epoch] = rng.philox(rng.Stream.DATA_ORDER, seed, epoch).permutation(n)
    return int(cache[epoch][within])


# ----------------------------------------------------------------------------------------------
# Micro-batch preparation (the per-sample randomness and OT)
# ----------------------------------------------------------------------------------------------


POSTERIORS = ("sample", "mean", "fixed")


def fixed_posterior_eps(seed: int, key: str, flipped: bool, shape) -> np.ndarray:
    """The one posterior draw of `data.posterior: fixed` for the image `key` (its flip apart):
    the same at every epoch, on every rank and worker, for the same run seed."""
    g = rng.philox(rng.Stream.FIXED_POSTERIOR, seed, rng.key_int(key), int(flipped))
    return g.standard_normal(tuple(shape), dtype=np.float32)


def posterior_latent(posterior: str, mean: np.ndarray, std: np.ndarray, eps: np.ndarray | None, seed: int,
                     key: str, flipped: bool) -> np.ndarray:
    """The raw latent of one use of an image (SPEC 7): `mean + std * eps` with this use's eps
    (`sample`), the posterior mean (`mean`), or `mean + std * fixed_posterior_eps` (`fixed`; `eps`
    is not used by these two)."""
    if posterior == "mean":
        return mean
    if posterior == "fixed":
        eps = fixed_posterior_eps(seed, key, flipped, mean.shape)
    elif posterior != "sample":
        raise ValueError(f"data.posterior must be one of {POSTERIORS}, got {posterior!r}")
    return mean + std * eps


def draw_sample(spec: DataSpec, sample: dict, data_step: int, slot: int) -> dict:
    """One training example with its random draws (SPEC 1.2: one stream per purpose, keyed by
    (seed, data step, slot))."""
    key = (spec.seed, data_step, slot)
    shape = spec.latent_shape if spec.buckets is None else sample["mean"].shape  # bucketed: the sample's bucket
    flip_u, cap_u, drop_u = rng.philox(rng.Stream.SAMPLE_CHOICES, *key).random(3)
    pair = rng.philox(rng.Stream.SIGMA_PAIR, *key)
    u, n = pair.random(), pair.standard_normal()
    eps = (rng.philox(rng.Stream.POSTERIOR_EPS, *key).standard_normal(shape, dtype=np.float32)
           if spec.posterior == "sample" else None)
    z = rng.philox(rng.Stream.TRAIN_NOISE, *key).standard_normal(shape, dtype=np.float32)
    use_flip = spec.flip and "flip_mean" in sample and flip_u < 0.5
    mean = sample["flip_mean" if use_flip else "mean"].astype(np.float32)
    std = sample["flip_std" if use_flip else "std"].astype(np.float32)
    x = spec.norm.normalize(posterior_latent(spec.posterior, mean, std, eps, spec.seed, sample.get("key", ""),
                                             use_flip))
    out = {"x": x, "z": z, "u": u, "n": n, "cond_drop": bool(drop_u < spec.caption_dropout),
           "key": sample.get("key", ""), "caption": ""}
    if spec.buckets is not None:
        out["bucket"] = sample["bucket"]
    if spec.text != "none":
        tokens = sample["tokens"]
        k = min(int(cap_u * tokens.shape[0]), tokens.shape[0] - 1)
        out["tokens"] = tokens[k].astype(np.int64)
        caps = sample.get("captions") or [""]
        out["caption"] = caps[min(k, len(caps) - 1)]
        if spec.text == "precomputed":
            if "states" not in sample:
                raise UserError("data.text=precomputed but the shards have no token states; "
                                "re-encode with --text-states or set data.text=on_the_fly")
            out["text_states"] = sample["states"][k]
            out["pooled"] = sample["pooled"][k] if "pooled" in sample else np.zeros(0, np.float16)
    return out


def stack_states(states: list[np.ndarray]) -> np.ndarray:
    """[B, n, D] of token states [n_i, D], zero-padded to the longest (trimmed states cover every
    real token of their caption; the positions after them are masked)."""
    n = max(s.shape[0] for s in states)
    return np.stack([np.pad(s, ((0, n - s.shape[0]), (0, 0))) if s.shape[0] < n else s for s in states])


def collate(spec: DataSpec, examples: list[dict], data_step: int, micro: int) -> dict:
    batch = {
        "x": torch.from_numpy(np.stack([e["x"] for e in examples])),
        "z": torch.from_numpy(np.stack([e["z"] for e in examples])),
        "u": torch.tensor([e["u"] for e in examples], dtype=torch.float64),
        "n": torch.tensor([e["n"] for e in examples], dtype=torch.float64),
        "cond_drop": torch.tensor([e["cond_drop"] for e in examples]),
        "keys": [e["key"] for e in examples],
        "captions": [e["caption"] for e in examples],
        "data_step": data_step,
        "micro": micro,
    }
    if spec.ot:  # minibatch OT (SPEC 6), here in the worker, off the GPU's critical path
        batch["z"] = ot_couple(batch["x"], batch["z"])
    if spec.text != "none":
        tokens = torch.from_numpy(np.stack([e["tokens"] for e in examples]))
        batch["tokens"] = tokens
        batch["text_mask"] = token_mask(tokens, spec.eot_id, spec.pad_id)
        if spec.text == "precomputed":
            batch["text_states"] = torch.from_numpy(stack_states([e["text_states"] for e in examples]))
            batch["pooled"] = torch.from_numpy(np.stack([e["pooled"] for e in examples]))
            # Trimmed states (transformers towers): the positions past the longest are padding.
            batch["text_mask"] = batch["text_mask"][:, : batch["text_states"].shape[1]]
    return batch


# ----------------------------------------------------------------------------------------------
# The iterable the DataLoader runs in its workers
# ----------------------------------------------------------------------------------------------


class TrainBatches(IterableDataset):
    """Micro-batches j = start, start+1, ... of this rank; worker w makes those with j = w mod W
    (the DataLoader hands them out round-robin, so they arrive in order). Each batch carries
    `skipped` (this worker's counts so far per reason; in indexed mode the data set's, on rank 0
    worker 0 only, so that summing over ranks and workers counts each once) and `worker`."""

    def __init__(self, spec: DataSpec, start_data_step: int, num_data_steps: int,
                 memory: InMemoryLatents | None = None):
        self.spec = spec
        self.start_micro = start_data_step * spec.accum
        self.num_micro = num_data_steps * spec.accum
        self.memory = memory

    def _stream_samples(self, worker: int, counts: dict[str, int]) -> Iterator[dict]:
        s = self.spec
        key = (s.seed, s.rank, worker, s.resume_count)
        shards = wds.ResampledShards(s.urls, seed=rng.seed_int(rng.Stream.SHARD_CHOICE, *key), worker_seed=lambda: 0,
                                     deterministic=True)
        pipeline = wds.DataPipeline(
            shards,
            functools.partial(stream_samples, spec=s, counts=counts),
            wds.shuffle(s.shuffle_buffer, initial=min(s.shuffle_buffer, 100),
                        rng=random.Random(rng.seed_int(rng.Stream.SHUFFLE_BUFFER, *key))),
        )
        return iter(pipeline)

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        try:
            yield from self._batches(*((info.id, info.num_workers) if info else (0, 1)))
        except UserError as err:
            if info is None:
                raise
            yield {"error": str(err)}  # re-raised as this UserError by TrainLoader in the main process

    def _bucket_picker(self, stream: Iterator[dict] | None, counts: dict[str, int]):
        """Bucketed data: `pick(data_step, slot, cache)` -> the slot's sample, of the step's bucket
        (`BucketPlan`; indexed mode: over the samples in memory, grouped by bucket; stream mode:
        `BucketQueues`, which counts what a full queue passes over in `counts`)."""
        s = self.spec
        if stream is not None:
            plan = BucketPlan(s.bucket_counts, s.global_batch, s.seed)
            queues = BucketQueues(stream, s.buckets, s, counts)
            return lambda step, slot, cache: queues.next(plan.step(step)[0])
        members: list[list[int]] = [[] for _ in s.buckets]
        where = {n: i for i, n in enumerate(s.buckets)}
        for i, sample in enumerate(self.memory.samples):
            members[where[sample["bucket"]]].append(i)
        plan = BucketPlan([len(m) for m in members], s.global_batch, s.seed)

        def pick(step: int, slot: int, cache: dict) -> dict:
            b, local = plan.step(step)
            return self.memory.samples[members[b][plan.member(b, local, slot, cache)]]
        return pick

    def _batches(self, worker: int, workers: int) -> Iterator[dict]:
        s = self.spec
        if s.mode == "indexed" and self.memory is None:
            self.memory = InMemoryLatents(s.urls, s.layout, quiet=s.rank != 0)
        counts: dict[str, int] = {}
        if s.mode == "indexed" and s.rank == 0 and worker == 0:
            counts = self.memory.skipped
        stream = self._stream_samples(worker, counts) if s.mode == "stream" else None
        cache: dict = {}
        pick = self._bucket_picker(stream, counts) if s.buckets is not None else None
        for j in range(self.start_micro + worker, self.start_micro + self.num_micro, workers):
            data_step, micro = divmod(j, s.accum)
            base = s.rank * s.accum * s.micro_batch + micro * s.micro_batch
            examples = []
            for i in range(s.micro_batch):
                slot = base + i
                if pick is not None:
                    sample = pick(data_step, slot, cache)
                elif stream is not None:
                    sample = next(stream)
                else:
                    idx = indexed_position(s.seed, data_step, slot, s.global_batch, len(self.memory), cache)
                    sample = self.memory.samples[idx]
                examples.append(draw_sample(s, sample, data_step, slot))
            batch = collate(s, examples, data_step, micro)
            if pick is not None:
                batch["bucket"] = examples[0]["bucket"]
            batch["skipped"] = dict(counts)
            batch["worker"] = worker
            yield batch


class TrainLoader(DataLoader):
    """The DataLoader of `make_loader`: a `UserError` raised in a worker (e.g. no usable sample)
    reaches the trainer as that one-line `UserError`, not as a worker traceback."""

    def __iter__(self) -> "CheckedBatches":
        return CheckedBatches(super().__iter__())


class CheckedBatches:
    """The batches of a `TrainLoader`; `.source` is torch's iterator, which owns the worker
    processes (`lct.stop.end_workers` ends them)."""

    def __init__(self, source):
        self.source = source

    def __iter__(self) -> "CheckedBatches":
        return self

    def __next__(self) -> dict:
        batch = next(self.source)
        if "error" in batch:
            raise UserError(batch["error"])
        return batch


def make_loader(spec: DataSpec, start_data_step: int, num_data_steps: int, num_workers: int,
                prefetch_factor: int, pin_memory: bool, memory: InMemoryLatents | None = None) -> DataLoader:
    ds = TrainBatches(spec, start_data_step, num_data_steps, memory)
    kw = dict(prefetch_factor=prefetch_factor, persistent_workers=False) if num_workers > 0 else {}
    # Its own generator: creating the iterator must not draw from the global RNG (dropout masks),
    # or a resumed run would diverge from an uninterrupted one.
    return TrainLoader(ds, batch_size=None, num_workers=num_workers, pin_memory=pin_memory,
                       worker_init_fn=functools.partial(_worker_init, os.getpid()),
                       generator=torch.Generator().manual_seed(rng.seed_int(rng.Stream.LOADER_WORKERS, spec.seed,
                                                                           spec.rank)), **kw)


def _worker_init(parent_pid: int, _: int) -> None:
    # Workers must not fight the trainer for cores (OT and decoding are single-threaded work).
    torch.set_num_threads(1)
    ignore_stop_signals()
    die_with_parent(parent_pid)


def ignore_stop_signals() -> None:
    """DataLoader workers ignore SIGINT and SIGTERM: Ctrl-C, `scancel` and the launchers signal the
    whole process group, and a worker that died of it would make the trainer's iterator raise
    inside the save the trainer makes on that very signal. The trainer ends its workers itself
    (and PR_SET_PDEATHSIG ends them if the trainer is killed)."""
    for s in (signal.SIGINT, signal.SIGTERM):
        signal.signal(s, signal.SIG_IGN)


def die_with_parent(parent_pid: int, *_) -> None:
    """DataLoader `worker_init_fn`: on Linux the worker gets SIGKILL when the process that made it
    dies (PR_SET_PDEATHSIG), so a kill -9 of the main process leaves no orphan worker holding
    memory, a download or a shard half read. Elsewhere the DataLoader's own watchdog applies."""
    if sys.platform.startswith("linux"):
        import ctypes

        try:
            ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGKILL), 0, 0, 0)  # 1 = PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass
    if os.getppid() != parent_pid:  # it died before the line above
        os._exit(1)


class SkipTally:
    """The trainer's view of skipped samples: the latest cumulative counts of each worker of this
    rank (`update` with each step's batches); `vector` to sum over ranks, `skip_record` for the log."""

    def __init__(self):
        self.latest: dict[int, dict[str, int]] = {}

    def update(self, batches: list[dict]) -> None:
        for b in batches:
            self.latest[int(b.get("worker", 0))] = b.get("skipped") or {}

    def vector(self, device=None) -> torch.Tensor:
        v = torch.zeros(len(SKIP_REASONS), dtype=torch.float64)
        for counts in self.latest.values():
            for i, r in enumerate(SKIP_REASONS):
                v[i] += counts.get(r, 0)
        return v.to(device) if device is not None else v


def skip_record(vector: torch.Tensor) -> dict:
    """`data_skipped` (all reasons) and `data_skipped_<reason>` for stats.jsonl and TensorBoard,
    from a (rank-summed) `SkipTally.vector`."""
    counts = [int(x) for x in vector.tolist()]
    return {"data_skipped": sum(counts), **{f"data_skipped_{r}": n for r, n in zip(SKIP_REASONS, counts)}}


def to_device(batch: dict, device: torch.device) -> dict:
    """Move the tensors the network needs; u and n stay on the host (per-sample scalars)."""
    out = dict(batch)
    for k in ("x", "z", "cond_drop", "tokens", "text_mask", "text_states", "pooled"):
        if k in out:
            v = out[k].to(device, non_blocking=True)
            out[k] = v.float() if v.dtype == torch.float16 else v
    return out


# ----------------------------------------------------------------------------------------------
# What the network needs to know about the data
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DataDescription:
    """Latent shape and text sizes (from the manifest, or defaults before data prep has run).
    Bucketed data: `latent_shape` is the base (square) bucket's, the network's base grid;
    `buckets` holds (name, latent shape, samples) per bucket in table order."""

    latent_shape: tuple[int, int, int] = (4, 32, 32)
    text_dim: int = 512
    text_len: int = 77
    pooled_dim: int = 512
    from_manifest: bool = False
    buckets: tuple[tuple[str, tuple[int, int, int], int], ...] = ()

    @property
    def largest_shape(self) -> tuple[int, int, int]:
        """The latent shape of most positions a step can draw (the memory estimate's)."""
        shapes = [s for _, s, n in self.buckets if n] or [self.latent_shape]
        return max(shapes, key=lambda s: (s[1] * s[2], s))

    @property
    def most_common(self) -> tuple[str, tuple[int, int, int]] | None:
        """(name, latent shape) of the bucket with most samples (None: square data)."""
        if not self.buckets:
            return None
        name, shape, _ = max(self.buckets, key=lambda b: b[2])  # ties: the first in table order
        return name, shape


def describe_data(manifest: dict | None) -> DataDescription:
    if manifest is None:
        return DataDescription()
    t = manifest.get("text") or {}
    b = manifest.get("buckets") or {}
    buckets = tuple((r["name"], tuple(int(x) for x in r["latent_shape"]), int((b.get("counts") or {}).get(r["name"], 0)))
                    for r in b.get("table") or [])
    return DataDescription(tuple(manifest["latent_shape"]), int(t.get("state_dim", 512)),
                           int(t.get("context_length", 77)), int(t.get("pooled_dim", 512)), True,
                           buckets if sum(1 for x in buckets if x[2]) >= 2 else ())


def token_ids(manifest: dict) -> dict:
    """DataSpec's `pad_id` / `eot_id` for the data's tokenizer: a transformers tower's ids (its
    padding mask is `tokens != pad`, lct.tokens.token_mask); None for open_clip's EOT rule."""
    t = manifest.get("text") or {}
    if t.get("kind", "open_clip") == "open_clip":
        return {"pad_id": None, "eot_id": None}
    tok = t.get("tokenizer") or {}
    if t.get("kind") == "sd3":  # every position is real (SPEC 15.6)
        return {"pad_id": NO_PADDING, "eot_id": tok.get("eot_id")}
    return {"pad_id": tok.get("pad_id"), "eot_id": tok.get("eot_id")}


def manifest_path(cfg) -> str | None:
    """data.manifest, or manifest.json in the shards' folder (data prep writes it there)."""
    if cfg.data.manifest:
        return cfg.data.manifest
    shards = cfg.data.shards.split(",")[0].strip()
    if not shards:
        return None
    if os.path.isdir(shards) or not any(ch in shards for ch in "{*?[") and not shards.endswith((".tar", ".tgz", ".tar.gz")):
        return os.path.join(shards, "manifest.json")
    urls = expand_urls(shards)
    return os.path.join(os.path.dirname(urls[0]), "manifest.json") if urls else None
