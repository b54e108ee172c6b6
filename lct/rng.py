"""Counter-based random streams: the same numbers for the same key, on any rank or worker.

Every random draw lct makes comes from a stream named by its purpose (`Stream`) and a fixed list
of non-negative integer fields, e.g. `philox(Stream.TRAIN_NOISE, seed, data_step, slot)`.
`key` turns that into the 32-bit words NumPy's `SeedSequence` hashes into the 128-bit key of a
counter-based Philox generator:

    [KEY_SCHEME, stream, number of fields, lo32(f0), hi32(f0), lo32(f1), hi32(f1), ...]

The stream tag keeps two purposes apart even for equal fields, the length word keeps keys of
different lengths apart (`SeedSequence` alone pads short entropy with zeros, so `[0, 2, 0]` and
`[0, 2, 0, 0]` used to give one stream), and every field takes exactly two words, so the word list
is an injective encoding of (scheme, stream, fields) (`decode_key` inverts it). Results do not
depend on world size, DataLoader workers or gradient accumulation. The streams and their fields
are listed in `FIELDS` and in docs/SPEC.md section 1.2; a checkpoint records `KEY_SCHEME`.
"""

from __future__ import annotations

import enum
import hashlib

import numpy as np
import torch

# Version of the key layout above. 1: the unversioned keys of lct before 2026-12 (`philox(seed,
# purpose, ...)` without purpose tags on every stream or a length word); a run checkpointed with
# them is refused on resume (lct.run.check_resume), since its draws cannot be continued exactly.
KEY_SCHEME = 2


class Stream(enum.IntEnum):
    """Every purpose lct draws random numbers for (docs/SPEC.md section 1.2)."""

    DATA_ORDER = 1        # indexed mode: the permutation of epoch e
    SHARD_CHOICE = 2      # stream mode: which shard is read next (webdataset ResampledShards)
    SHUFFLE_BUFFER = 3    # stream mode: the shuffle buffer
    SAMPLE_CHOICES = 4    # per training sample: flip, caption choice, caption dropout
    SIGMA_PAIR = 5        # per training sample: u (iCT pair index) and n (ECT/EDM normal)
    POSTERIOR_EPS = 6     # per training sample: eps of mean + std * eps (data.posterior: sample)
    TRAIN_NOISE = 7       # per training sample: the noise z (before the OT reordering)
    FIXED_POSTERIOR = 8   # data.posterior: fixed: the one eps of an image and flip
    VALIDATION = 9        # validation batch: eps, then z, of held-out sample i
    # 10 was SAMPLING_NOISE: sampling noise is keyed by the pipeline itself (lct.pipeline.noise_key),
    # since exports carry pipeline.py without lct.
    TORCH_GLOBAL = 11     # each rank's torch generator at start: network init, dropout masks
    TORCH_RESEED = 12     # each rank's torch generator after a world-size change (universal checkpoint)
    LOADER_WORKERS = 13   # the DataLoader's base seed (torch/random/numpy in workers; lct draws none there)
    VAE_INIT = 14         # data_prep/train_vae.py: the VAE's initial weights
    VAE_DATA = 15         # data_prep/train_vae.py: batch order and flips
    VAE_POSTERIOR = 16    # data_prep/train_vae.py: posterior samples
    VAE_HELDOUT = 17      # data_prep/train_vae.py: the held-out split
    EVAL_INIT = 18        # eval/clip_fid.py: the torch generator while the pipeline is built
    BENCH = 19            # bench/ scripts' own synthetic inputs
    SHAPES_CANVAS = 20    # data_prep/make_shapes.py --aspects: the canvas of sample i of a split
    DEMO_SPLIT = 21       # lct.demo --data without --heldout: which samples are held out
    DIGITS_SPLIT = 22     # data_prep/make_digits.py: the stratified train/held-out split
    PRDC_SUBSET = 23      # eval's precision/recall: the subset of reference images (as many as samples)
    PRDC_EMBED = 24       # eval's precision/recall: the random VGG16 feature network's weights
    TRAIN_EVAL = 25       # the trainer's quality eval (lct.quality): torch's generator while it runs at a step
    TRAIN_EVAL_SET = 26   # the trainer's quality eval: which held-out captions it samples (eval.num of them)
    BUCKET_DRAW = 27      # bucketed data: the order of the steps (one bucket each) of bucket epoch E
    BUCKET_ORDER = 28     # bucketed data, indexed mode: the permutation of bucket b's pass e


# The fields of each stream, in key order (documentation and an arity check).
FIELDS: dict[Stream, tuple[str, ...]] = {
    Stream.DATA_ORDER: ("seed", "epoch"),
    Stream.SHARD_CHOICE: ("seed", "rank", "worker", "resume_count"),
    Stream.SHUFFLE_BUFFER: ("seed", "rank", "worker", "resume_count"),
    Stream.SAMPLE_CHOICES: ("seed", "data_step", "slot"),
    Stream.SIGMA_PAIR: ("seed", "data_step", "slot"),
    Stream.POSTERIOR_EPS: ("seed", "data_step", "slot"),
    Stream.TRAIN_NOISE: ("seed", "data_step", "slot"),
    Stream.FIXED_POSTERIOR: ("seed", "key_int(sample key)", "flipped"),
    Stream.VALIDATION: ("seed", "index"),
    Stream.TORCH_GLOBAL: ("seed", "rank"),
    Stream.TORCH_RESEED: ("seed", "rank", "applied_steps"),
    Stream.LOADER_WORKERS: ("seed", "rank"),
    Stream.VAE_INIT: ("seed",),
    Stream.VAE_DATA: ("seed",),
    Stream.VAE_POSTERIOR: ("seed",),
    Stream.VAE_HELDOUT: ("seed",),
    Stream.EVAL_INIT: ("seed",),
    Stream.BENCH: ("seed", "part", "index"),
    Stream.SHAPES_CANVAS: ("seed", "split", "index"),
    Stream.DEMO_SPLIT: ("seed",),
    Stream.DIGITS_SPLIT: ("seed",),
    Stream.PRDC_SUBSET: ("seed",),
    Stream.PRDC_EMBED: ("seed",),
    Stream.TRAIN_EVAL: ("seed", "applied_steps"),
    Stream.TRAIN_EVAL_SET: ("seed",),
    Stream.BUCKET_DRAW: ("seed", "epoch"),
    Stream.BUCKET_ORDER: ("seed", "bucket", "pass"),
}

_U32, _U64 = 1 << 32, 1 << 64


def key(stream: Stream, *fields: int) -> np.ndarray:
    """The uint32 words of a stream's key (module docstring). Fields are integers in [0, 2**64)."""
    if not isinstance(stream, Stream):
        raise TypeError(f"the first argument of a random-stream key is an lct.rng.Stream, got {stream!r}")
    want = FIELDS[stream]
    if len(fields) != len(want):
        raise TypeError(f"Stream.{stream.name} is keyed by ({', '.join(want)}), got {len(fields)} field(s)")
    words = [KEY_SCHEME, int(stream), len(fields)]
    for f in fields:
        f = int(f)
        if not 0 <= f < _U64:
            raise ValueError(f"Stream.{stream.name}: key field {f} is outside [0, 2**64)")
        words += [f % _U32, f // _U32]
    return np.array(words, dtype=np.uint32)


def decode_key(words) -> tuple[int, Stream, tuple[int, ...]]:
    """(scheme, stream, fields) of `key`'s words: the inverse that shows the encoding is injective."""
    w = [int(x) for x in words]
    scheme, stream, n = w[0], Stream(w[1]), w[2]
    if len(w) != 3 + 2 * n:
        raise ValueError(f"a key with {n} fields has {3 + 2 * n} words, got {len(w)}")
    return scheme, stream, tuple(w[3 + 2 * i] + w[4 + 2 * i] * _U32 for i in range(n))


def philox(stream: Stream, *fields: int) -> np.random.Generator:
    """A fresh generator for the stream's key."""
    return np.random.Generator(np.random.Philox(np.random.SeedSequence(key(stream, *fields))))


def seed_int(stream: Stream, *fields: int) -> int:
    """A 63-bit seed drawn from the stream, for APIs that take an integer seed (`torch.manual_seed`,
    `torch.Generator.manual_seed`, `random.Random`, webdataset)."""
    return int(philox(stream, *fields).integers(1 << 63))


def key_int(text: str) -> int:
    """A stable 64-bit integer for a string key (a sample's key), for use in a stream key."""
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "little")


def normal(shape, stream: Stream, *fields: int) -> torch.Tensor:
    """fp32 standard normal tensor of `shape` from the stream."""
    return torch.from_numpy(philox(stream, *fields).standard_normal(tuple(shape), dtype=np.float32))
