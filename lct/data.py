"""The trainer's data path: latent shards to ready micro-batches, in DataLoader workers.

Two modes (`data.mode`):
- `stream` (default, any size): webdataset resampled shards, seeded by (seed, rank, worker,
  resume count), through a shuffle buffer. Samples are i.i.d. draws from the shards, so a resumed
  run continues with fresh draws rather than replaying a position.
- `indexed` (small data, tests, exact resume): every sample in memory; the sample at global slot
  g of data step s is `perm_e[(s * G + g) mod n]`, with `perm_e` a seeded permutation per epoch e.

Global slots: the global batch G of one optimizer step is laid out rank-major,
`slot = rank * (A * mb) + micro * mb + i` (A accumulation steps of mb samples per rank), so the
same step sees the same samples on 1 or 64 ranks.

All per-sample randomness (flip, caption choice, caption dropout, pair uniform u, ECT/EDM normal
n, posterior eps, noise z) comes from `lct.rng.philox(seed, TRAIN_SAMPLE, data step, slot)` in a
fixed order, so it depends on neither world size, workers nor accumulation. The posterior sample
`mean + std * eps` is normalised with the manifest's statistics (SPEC 7), and the OT coupling
(SPEC 6) reorders the noise of each micro-batch, here in the worker, off the GPU's critical path.
"""

from __future__ import annotations

import glob
import os
import random
from dataclasses import dataclass
from typing import Iterator

import braceexpand
import numpy as np
import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from lct import rng
from lct.consistency import ot_couple
from lct.errors import UserError
from lct.latents import decode_latent_sample
from lct.tokens import padding_mask
from lct.vae import LatentNorm


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


# ----------------------------------------------------------------------------------------------
# Samples
# ----------------------------------------------------------------------------------------------


def read_samples(url: str, counts: dict[str, int]) -> Iterator[dict]:
    """Decoded samples of one latent shard (no unpickling); bad samples are counted and skipped."""
    src = wds.SimpleShardList([url])
    for raw in wds.tarfile_to_samples(handler=wds.warn_and_continue)(src):
        try:
            yield decode_latent_sample(raw)
        except Exception:  # a corrupt or incomplete sample loses nothing else
            counts["corrupt_sample"] = counts.get("corrupt_sample", 0) + 1


class InMemoryLatents:
    """All samples of a small latent data set, for `indexed` mode and validation batches."""

    def __init__(self, urls: list[str]):
        counts: dict[str, int] = {}
        self.samples = [s for u in urls for s in read_samples(u, counts)]
        self.skipped = counts
        if not self.samples:
            raise UserError(f"no readable samples in {len(urls)} latent shard(s) {urls[:3]}...; "
                            "check data.shards (run data_prep/encode_latents.py first)")

    def __len__(self) -> int:
        return len(self.samples)


def indexed_position(seed: int, data_step: int, slot: int, global_batch: int, n: int,
                     cache: dict) -> int:
    """Sample index for (data step, global slot): seeded permutation per epoch."""
    pos = data_step * global_batch + slot
    epoch, within = divmod(pos, n)
    if epoch not in cache:
        cache.clear()
        cache[epoch] = rng.philox(seed, rng.EPOCH_PERMUTATION, epoch).permutation(n)
    return int(cache[epoch][within])


# ----------------------------------------------------------------------------------------------
# Micro-batch preparation (the per-sample randomness and OT)
# ----------------------------------------------------------------------------------------------


def draw_sample(spec: DataSpec, sample: dict, data_step: int, slot: int) -> dict:
    """One training example with its random draws, in a fixed draw order."""
    g = rng.philox(spec.seed, rng.TRAIN_SAMPLE, data_step, slot)
    flip_u, cap_u, drop_u, u = g.random(4)
    n = g.standard_normal()
    eps = g.standard_normal(spec.latent_shape, dtype=np.float32)
    z = g.standard_normal(spec.latent_shape, dtype=np.float32)
    use_flip = spec.flip and "flip_mean" in sample and flip_u < 0.5
    mean = sample["flip_mean" if use_flip else "mean"].astype(np.float32)
    std = sample["flip_std" if use_flip else "std"].astype(np.float32)
    x = spec.norm.normalize(mean + std * eps)
    out = {"x": x, "z": z, "u": u, "n": n, "cond_drop": bool(drop_u < spec.caption_dropout),
           "key": sample.get("key", ""), "caption": ""}
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
            out["pooled"] = sample["pooled"][k]
    return out


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
        batch["text_mask"] = padding_mask(tokens)
        if spec.text == "precomputed":
            batch["text_states"] = torch.from_numpy(np.stack([e["text_states"] for e in examples]))
            batch["pooled"] = torch.from_numpy(np.stack([e["pooled"] for e in examples]))
    return batch


# ----------------------------------------------------------------------------------------------
# The iterable the DataLoader runs in its workers
# ----------------------------------------------------------------------------------------------


class TrainBatches(IterableDataset):
    """Micro-batches j = start, start+1, ... of this rank; worker w makes those with j = w mod W
    (the DataLoader hands them out round-robin, so they arrive in order)."""

    def __init__(self, spec: DataSpec, start_data_step: int, num_data_steps: int,
                 memory: InMemoryLatents | None = None):
        self.spec = spec
        self.start_micro = start_data_step * spec.accum
        self.num_micro = num_data_steps * spec.accum
        self.memory = memory

    def _stream_samples(self, worker: int) -> Iterator[dict]:
        s = self.spec
        seed = int(rng.philox(s.seed, s.rank, worker, s.resume_count).integers(2**62))
        shards = wds.ResampledShards(s.urls, seed=seed, worker_seed=lambda: 0, deterministic=True)
        pipeline = wds.DataPipeline(
            shards,
            wds.tarfile_to_samples(handler=wds.warn_and_continue),
            wds.shuffle(s.shuffle_buffer, initial=min(s.shuffle_buffer, 100),
                        rng=random.Random(seed)),
        )
        self.skipped: dict[str, int] = {}
        for raw in pipeline:
            try:
                yield decode_latent_sample(raw)
            except Exception:
                self.skipped["corrupt_sample"] = self.skipped.get("corrupt_sample", 0) + 1

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        s = self.spec
        if s.mode == "indexed" and self.memory is None:
            self.memory = InMemoryLatents(s.urls)
        stream = self._stream_samples(worker) if s.mode == "stream" else None
        cache: dict = {}
        for j in range(self.start_micro + worker, self.start_micro + self.num_micro, workers):
            data_step, micro = divmod(j, s.accum)
            base = s.rank * s.accum * s.micro_batch + micro * s.micro_batch
            examples = []
            for i in range(s.micro_batch):
                slot = base + i
                if stream is not None:
                    sample = next(stream)
                else:
                    idx = indexed_position(s.seed, data_step, slot, s.global_batch, len(self.memory), cache)
                    sample = self.memory.samples[idx]
                examples.append(draw_sample(s, sample, data_step, slot))
            batch = collate(s, examples, data_step, micro)
            batch["skipped"] = dict(getattr(self, "skipped", {}))
            yield batch


def make_loader(spec: DataSpec, start_data_step: int, num_data_steps: int, num_workers: int,
                prefetch_factor: int, pin_memory: bool, memory: InMemoryLatents | None = None) -> DataLoader:
    ds = TrainBatches(spec, start_data_step, num_data_steps, memory)
    kw = dict(prefetch_factor=prefetch_factor, persistent_workers=False) if num_workers > 0 else {}
    # Its own generator: creating the iterator must not draw from the global RNG (dropout masks),
    # or a resumed run would diverge from an uninterrupted one.
    return DataLoader(ds, batch_size=None, num_workers=num_workers, pin_memory=pin_memory,
                      worker_init_fn=_worker_init, generator=torch.Generator().manual_seed(spec.seed), **kw)


def _worker_init(_: int) -> None:
    # Workers must not fight the trainer for cores (OT and decoding are single-threaded work).
    torch.set_num_threads(1)


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
    """Latent shape and text sizes (from the manifest, or defaults before data prep has run)."""

    latent_shape: tuple[int, int, int] = (4, 32, 32)
    text_dim: int = 512
    text_len: int = 77
    pooled_dim: int = 512
    from_manifest: bool = False


def describe_data(manifest: dict | None) -> DataDescription:
    if manifest is None:
        return DataDescription()
    t = manifest.get("text") or {}
    return DataDescription(tuple(manifest["latent_shape"]), int(t.get("state_dim", 512)),
                           int(t.get("context_length", 77)), int(t.get("pooled_dim", 512)), True)


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
