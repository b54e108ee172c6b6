"""Counter-based random streams: the same numbers for the same key, on any rank or worker.

Every per-sample random draw of training (posterior eps, noise z, pair uniform, caption choice,
caption dropout, flip) and of sampling (z, z' per step) comes from a generator keyed by integers
such as (seed, data step, global slot). NumPy's Philox is counter-based; `SeedSequence` hashes
the key into its 128-bit key, so nearby keys give independent streams. Results therefore do not
depend on world size, DataLoader workers or gradient accumulation.
"""

from __future__ import annotations

import hashlib

import numpy as np
import torch


def philox(*key: int) -> np.random.Generator:
    """A fresh generator for the integer key (all >= 0)."""
    return np.random.Generator(np.random.Philox(np.random.SeedSequence([int(k) for k in key])))


# Purposes, so different uses of the same (seed, step, slot) never share a stream.
TRAIN_SAMPLE = 0
SAMPLING_NOISE = 1
VALIDATION = 2
EPOCH_PERMUTATION = 3
FIXED_POSTERIOR = 4


def key_int(text: str) -> int:
    """A stable 64-bit integer for a string key (a sample's key), for use in a stream key."""
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "little")


def normal(shape, *key: int) -> torch.Tensor:
    """fp32 standard normal tensor of `shape` for the key."""
    return torch.from_numpy(philox(*key).standard_normal(shape, dtype=np.float32))


def sampling_noise(seed: int, index: int, step: int, shape) -> torch.Tensor:
    """Noise of sampling step `step` (0 = the initial z) of sample `index`: identical whether the
    sample is drawn alone, in a batch, or on another rank."""
    return normal(tuple(shape), seed, SAMPLING_NOISE, index, step)
