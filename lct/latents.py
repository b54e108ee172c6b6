"""The latent-shard format (docs/ARCHITECTURE.md, "Latent shards"): sample members, per-shard
records and float64 statistics, and the manifest.

Sample members (webdataset: `{key}.{member}` in a tar, grouped by key):

| member | content |
|---|---|
| `mean.npy`, `std.npy` | float16 [C,h,w] raw posterior mean and std (no scaling factor) |
| `flip_mean.npy`, `flip_std.npy` | the same for the horizontally flipped image (`--flip`) |
| `tokens.npy` | int32 [K,L] open_clip token ids of the sample's K captions |
| `states.npy`, `pooled.npy` | float16 [K,L,D], [K,P] text-tower outputs (`--text-states`); transformers towers (T5, CLIP): [K,n,D] trimmed to the n <= L positions of the longest caption's real tokens, no `pooled.npy` for T5 (P = 0) |
| `json` | {"key", "captions": [K captions], "meta": the input sample's json; bucketed data: "bucket" (its name "HxW"), "crop" (the share of the resized image cut off)} |
| `txt` | the first caption |

`.npy` members are written with `np.save(allow_pickle=False)` and read with
`np.load(allow_pickle=False)`; reading decodes only npy, json and txt (never pickles).

Statistics (SPEC 7). Each shard's record holds float64 sums over its samples, per latent element,
of the posterior mean, the mean squared and the variance (std^2), taken from the stored float16
values of the **unflipped** latents (the flip copies are augmentation and are not counted):
`count`, `sum_mean`, `sum_mean_sq`, `sum_var` [C,h,w]. Samples are added one at a time in shard
order, so the sums do not depend on the batch size. The raw posterior *samples* `mean + std * eps`
then have E = E[mean] and Var = E[mean^2] - E[mean]^2 + E[std^2]: per element (`element`) or
pooled over each channel's h x w positions (`channel`). Merging adds the shard sums in sorted
shard-name order starting from zero, so one-rank, multi-rank and resumed jobs produce identical
float64 numbers; the manifest stores the merged sums (JSON floats round-trip exactly).

Bucketed data (`encode_latents.py --buckets`, `lct.buckets`): each sample's latents have its
bucket's shape. Statistics are then per bucket and per channel (a shape-free form): `count`
[B] samples, `positions` [B] = samples x h x w, and `sum_mean`, `sum_mean_sq`, `sum_var` [B, C]
summed over every position, float64, added sample by sample in shard order (`ChannelStats`);
merged in sorted shard order, then over the buckets in table order. The manifest's `buckets`
holds the table (name, size, ratio key, latent shape), `counts` per bucket, the crop summary,
and each shard entry its `bucket_counts` and `sample_buckets` (bucket index per sample, in order).
Its format is `lct-latents/2`, so an lct that reads only square data refuses it in one line.

Output directory of `data_prep/encode_latents.py`:

    <name>.tar               latent shard of input shard <name>.tar (same keys, same order)
    records/<name>.json      the shard's record (written last: it marks the shard complete)
    records/<name>.stats.npz its float64 statistics sums
    records/<name>.lock      while the shard is being written (lct.shards.FileLock)
    job.json                 the job's settings (a rerun with other settings is refused)
    job.lock                 held while job.json and a random text tower are checked or made
    text_tower/              the random text tower's text half, when --text-pretrained random
    text_null.npy            transformers towers: float32 [L0, D] states of the empty caption at its
                             real tokens (the initial learned null condition, SPEC 14.5)
    text_null_pooled.npy     text kind sd3: float32 [P], the empty caption's pooled vector (SPEC 15.6)
    manifest.json            merged from job.json and all records

Reading checks (`SampleLayout`, `check_latent_sample`): what the manifest says every sample holds
(latent shape and float16 dtype of mean/std and the flip copies, tokens [K>=1, context length],
text states [K, L, D] and [K, P]) and finite values; the trainer skips and counts the others.
"""

from __future__ import annotations

import io
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import webdataset as wds

from lct.errors import UserError
from lct.files import atomic_file, write_json
from lct.shards import tar_samples

FORMAT = "lct-latents/1"
FORMAT_BUCKETED = "lct-latents/2"  # --buckets: per-bucket shapes and statistics (an older lct refuses it in one line)
MANIFEST = "manifest.json"
JOB = "job.json"
RECORDS = "records"
STAT_KEYS = ("sum_mean", "sum_mean_sq", "sum_var")
ARRAY_MEMBERS = ("mean", "std", "flip_mean", "flip_std", "tokens", "states", "pooled")
TEXT_NULL = "text_null.npy"
TEXT_NULL_POOLED = "text_null_pooled.npy"  # SD3's towers: the empty caption's pooled vector [P] (SPEC 15.6)
FP16_MAX = float(np.finfo(np.float16).max)


# ----------------------------------------------------------------------------------------------
# Samples
# ----------------------------------------------------------------------------------------------


def npy_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(arr), allow_pickle=False)
    return buf.getvalue()


def npy_load(data: bytes) -> np.ndarray:
    return np.load(io.BytesIO(data), allow_pickle=False)


def encode_latent_sample(key: str, *, mean: np.ndarray, std: np.ndarray, tokens: np.ndarray,
                         captions: list[str], meta: dict | None = None, flip_mean: np.ndarray | None = None,
                         flip_std: np.ndarray | None = None, states: np.ndarray | None = None,
                         pooled: np.ndarray | None = None, bucket: str | None = None,
                         crop: float | None = None) -> dict[str, Any]:
    """Tar members of one sample (a dict for `webdataset.TarWriter(encoder=False)`); `bucket` and
    `crop` go into its json (bucketed data only)."""
    def half(name, a):
        a = np.asarray(a)
        if a.dtype != np.float16:
            raise ValueError(f"{key}: {name} must be float16, got {a.dtype}")
        return npy_bytes(a)

    if mean.ndim != 3 or mean.shape != std.shape:
        raise ValueError(f"{key}: mean/std must be [C,h,w], got {mean.shape} and {std.shape}")
    tokens = np.asarray(tokens)
    if tokens.ndim != 2 or tokens.shape[0] != len(captions) or not captions:
        raise ValueError(f"{key}: tokens {tokens.shape} must be [K,L] for K = {len(captions)} captions")
    sample = {"__key__": key, "mean.npy": half("mean", mean), "std.npy": half("std", std),
              "tokens.npy": npy_bytes(tokens.astype(np.int32))}
    if flip_mean is not None:
        sample["flip_mean.npy"] = half("flip_mean", flip_mean)
        sample["flip_std.npy"] = half("flip_std", flip_std)
    if states is not None:
        sample["states.npy"] = half("states", states)
    if pooled is not None:
        sample["pooled.npy"] = half("pooled", pooled)
    info = {"key": key, "captions": list(captions), "meta": meta or {}}
    if bucket is not None:
        info.update(bucket=bucket, crop=round(float(crop), 6))
    sample["json"] = json.dumps(info, ensure_ascii=False, sort_keys=True).encode("utf-8")
    sample["txt"] = captions[0].encode("utf-8")
    return sample


def decode_latent_sample(raw: dict) -> dict:
    """A webdataset sample dict of bytes -> {"key", "mean", "std", ["flip_mean", "flip_std"],
    ["tokens"], ["states", "pooled"], "captions", "meta", ["bucket", "crop"]} with numpy arrays
    (no unpickling).
    Raises ValueError for an incomplete sample."""
    if "mean.npy" not in raw or "std.npy" not in raw:
        raise ValueError(f"latent sample {raw.get('__key__')!r} has no mean.npy/std.npy")
    out: dict[str, Any] = {"key": raw.get("__key__", "")}
    if "__url__" in raw:
        out["url"] = raw["__url__"]
    for name in ARRAY_MEMBERS:
        data = raw.get(f"{name}.npy")
        if data is not None:
            out[name] = npy_load(data)
    captions, meta = None, {}
    if raw.get("json") is not None:
        j = json.loads(raw["json"])
        captions, meta = j.get("captions"), j.get("meta") or {}
        if "bucket" in j:
            out["bucket"], out["crop"] = j["bucket"], j.get("crop")
    if not captions and raw.get("txt") is not None:
        captions = [raw["txt"].decode("utf-8")]
    out["captions"] = list(captions or [])
    out["meta"] = meta
    return out


def read_text_null(manifest_dir: str | os.PathLike) -> np.ndarray:
    """The data's null condition (`text_null.npy`, float32 [L0, D]: the empty caption's states at
    its real tokens, SPEC 14.5), written by the data prep for transformers text towers."""
    path = Path(manifest_dir) / TEXT_NULL
    if not path.is_file():
        raise UserError(f"{path} not found: latent data for a PixArt, Sana or SD3 network needs its text tower's null "
                        "condition; re-run data_prep/encode_latents.py with --text-kind t5, gemma or sd3 (it writes it "
                        "beside manifest.json)")
    arr = np.load(path, allow_pickle=False)
    if arr.ndim != 2 or arr.shape[0] < 1 or not np.isfinite(arr).all():
        raise UserError(f"{path}: expected finite float32 [L0 >= 1, D], got {arr.dtype} {list(arr.shape)}")
    return arr.astype(np.float32)


def read_text_null_pooled(manifest_dir: str | os.PathLike) -> np.ndarray:
    """The data's pooled null vector (`text_null_pooled.npy`, float32 [P]: SD3's CLIP-L and CLIP-G
    text_embeds of the empty caption, SPEC 15.6), written by the data prep for text kind sd3."""
    path = Path(manifest_dir) / TEXT_NULL_POOLED
    if not path.is_file():
        raise UserError(f"{path} not found: latent data for an SD3 network needs the towers' pooled null vector; "
                        "re-run data_prep/encode_latents.py --text-kind sd3 (it writes it beside manifest.json)")
    arr = np.load(path, allow_pickle=False)
    if arr.ndim != 1 or not np.isfinite(arr).all():
        raise UserError(f"{path}: expected finite float32 [P], got {arr.dtype} {list(arr.shape)}")
    return arr.astype(np.float32)


def read_latent_shard(url: str) -> list[dict]:
    """Every decoded sample of one latent shard (errors propagate, `lct.shards.ShardError` for a
    shard that cannot be read to its end-of-archive marker)."""
    return [decode_latent_sample(s) for s in tar_samples(url)]


@dataclass(frozen=True)
class SampleLayout:
    """What every sample of a latent data set holds, from its manifest: the latent shape of
    mean/std (and flip_mean/flip_std when the data has flipped copies), tokens [K, L] with
    K >= 1 and L = the context length, and with text states [K, L, D] and [K, P]. Bucketed data:
    each sample's latent shape is its own bucket's (`buckets`: (name, latent shape) per bucket)."""

    latent_shape: tuple[int, int, int]
    flip: bool = False
    context_length: int | None = None
    states: tuple[int, int] | None = None   # (D, P) when the shards store text states
    trimmed: bool = False                   # states [K, n <= L, D] (transformers towers), no pooled when P = 0
    buckets: tuple[tuple[str, tuple[int, int, int]], ...] | None = None

    @classmethod
    def from_manifest(cls, manifest: dict) -> "SampleLayout":
        t = manifest.get("text") or {}
        states = (int(t["state_dim"]), int(t["pooled_dim"])) if t.get("states") else None
        table = (manifest.get("buckets") or {}).get("table")
        buckets = tuple((b["name"], tuple(int(x) for x in b["latent_shape"])) for b in table) if table else None
        return cls(tuple(int(x) for x in manifest["latent_shape"]), bool(manifest.get("flip")),
                   int(t["context_length"]) if t.get("context_length") else None, states,
                   t.get("states_layout") == "trimmed", buckets)

    def core(self) -> "SampleLayout":
        """What every sample of any split holds (latents and tokens): for held-out shards, which
        may be encoded without --flip or --text-states."""
        return SampleLayout(self.latent_shape, False, self.context_length, None, buckets=self.buckets)

    def shape_of(self, sample: dict) -> tuple[int, int, int] | None:
        """The latent shape `sample` must have: its bucket's (None for a bucket not in the table)."""
        if self.buckets is None:
            return self.latent_shape
        return dict(self.buckets).get(sample.get("bucket"))


def check_latent_sample(sample: dict, layout: SampleLayout | None) -> tuple[str, str] | None:
    """(reason, detail) when a decoded sample does not match `layout` (or, without one, is not
    self-consistent), else None. Reasons: `missing_member`, `wrong_shape`, `non_finite`."""
    def shape(name):
        return list(np.shape(sample[name]))

    need = ["mean", "std"]
    if layout is not None:
        need += ["flip_mean", "flip_std"] if layout.flip else []
        need += ["tokens"] if layout.context_length else []
        need += ["states"] + (["pooled"] if not layout.trimmed or layout.states[1] else []) if layout.states else []
    missing = [n for n in need if n not in sample]
    if missing:
        return "missing_member", f"no {', '.join(m + '.npy' for m in missing)}"
    if layout is not None and layout.shape_of(sample) is None:
        return "wrong_shape", (f"bucket {sample['bucket']!r} is not in the data's bucket table" if "bucket" in sample
                               else "no bucket in its json (the data is bucketed)")
    want = list(layout.shape_of(sample)) if layout is not None else shape("mean")
    for name in ("mean", "std", "flip_mean", "flip_std"):
        if name in sample:
            a = sample[name]
            if shape(name) != want or len(want) != 3 or a.dtype != np.float16:
                return "wrong_shape", f"{name}.npy is {a.dtype} {shape(name)}, the data's latents are float16 {want}"
    if "tokens" in sample:
        tok = sample["tokens"]
        ok = tok.ndim == 2 and tok.shape[0] >= 1 and np.issubdtype(tok.dtype, np.integer)
        if ok and layout is not None and layout.context_length:
            ok = tok.shape[1] == layout.context_length
        if not ok:
            L = layout.context_length if layout is not None and layout.context_length else "L"
            return "wrong_shape", f"tokens.npy is {tok.dtype} {list(tok.shape)}, expected integer [K>=1, {L}]"
    if layout is not None and layout.states:
        k, L = sample["tokens"].shape[0], layout.context_length
        n = shape("states")[1] if layout.trimmed and sample["states"].ndim == 3 else L
        if layout.trimmed and not 1 <= n <= L:
            return "wrong_shape", f"states.npy holds {n} token positions, expected 1..{L}"
        for name, s in (("states", [k, n, layout.states[0]]), ("pooled", [k, layout.states[1]])):
            if name not in sample and name == "pooled" and layout.trimmed and not layout.states[1]:
                continue
            if shape(name) != s or sample[name].dtype != np.float16:
                return "wrong_shape", f"{name}.npy is {sample[name].dtype} {shape(name)}, expected float16 {s}"
    for name in ("mean", "std", "flip_mean", "flip_std", "states", "pooled"):
        if name in sample and not np.isfinite(sample[name]).all():
            return "non_finite", f"{name}.npy holds NaN or Inf"
    return None


# ----------------------------------------------------------------------------------------------
# Statistics
# ----------------------------------------------------------------------------------------------


class StatsAccumulator:
    """float64 per-element sums of one shard (module docstring)."""

    def __init__(self, shape: tuple[int, ...]):
        self.shape = tuple(int(s) for s in shape)
        self.count = 0
        self.sums = {k: np.zeros(self.shape, dtype=np.float64) for k in STAT_KEYS}

    def add(self, mean: np.ndarray, std: np.ndarray) -> None:
        """One sample's stored (float16) posterior mean and std."""
        m = np.asarray(mean, dtype=np.float64)
        s = np.asarray(std, dtype=np.float64)
        self.sums["sum_mean"] += m
        self.sums["sum_mean_sq"] += m * m
        self.sums["sum_var"] += s * s
        self.count += 1

    def save(self, path: str | os.PathLike) -> None:
        """Atomic `.npz`."""
        with atomic_file(path) as f:
            np.savez(f, count=np.int64(self.count), **self.sums)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "StatsAccumulator":
        with np.load(path, allow_pickle=False) as z:
            acc = cls(z["sum_mean"].shape)
            acc.count = int(z["count"])
            for k in STAT_KEYS:
                acc.sums[k] = z[k].astype(np.float64)
        return acc


def merge_stats(parts: Iterable[tuple[str, StatsAccumulator]]) -> StatsAccumulator | None:
    """Sum of shard accumulators in sorted shard-name order (exact and order-independent input)."""
    total = None
    for _, acc in sorted(parts, key=lambda p: p[0]):
        if total is None:
            total = StatsAccumulator(acc.shape)
        if acc.shape != total.shape:
            raise UserError(f"shard statistics of shape {acc.shape} and {total.shape} cannot be merged")
        total.count += acc.count
        for k in STAT_KEYS:
            total.sums[k] += acc.sums[k]
    return total


class ChannelStats:
    """float64 per-bucket, per-channel sums of a bucketed shard (module docstring): `count` [B],
    `positions` [B], and `sum_mean`, `sum_mean_sq`, `sum_var` [B, C] over every latent position."""

    def __init__(self, buckets: int, channels: int):
        self.count = np.zeros(buckets, dtype=np.int64)
        self.positions = np.zeros(buckets, dtype=np.int64)
        self.sums = {k: np.zeros((buckets, channels), dtype=np.float64) for k in STAT_KEYS}

    def add(self, bucket: int, mean: np.ndarray, std: np.ndarray) -> None:
        """One sample's stored (float16) posterior mean and std [C, h, w] in bucket `bucket`."""
        m = np.asarray(mean, dtype=np.float64)
        s = np.asarray(std, dtype=np.float64)
        self.sums["sum_mean"][bucket] += m.sum(axis=(1, 2))
        self.sums["sum_mean_sq"][bucket] += (m * m).sum(axis=(1, 2))
        self.sums["sum_var"][bucket] += (s * s).sum(axis=(1, 2))
        self.count[bucket] += 1
        self.positions[bucket] += m.shape[1] * m.shape[2]

    def save(self, path: str | os.PathLike) -> None:
        with atomic_file(path) as f:
            np.savez(f, count=self.count, positions=self.positions, **self.sums)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "ChannelStats":
        with np.load(path, allow_pickle=False) as z:
            acc = cls(*z["sum_mean"].shape)
            acc.count, acc.positions = z["count"].astype(np.int64), z["positions"].astype(np.int64)
            for k in STAT_KEYS:
                acc.sums[k] = z[k].astype(np.float64)
        return acc


def merge_channel_stats(parts: Iterable[tuple[str, ChannelStats]]) -> ChannelStats | None:
    """Sum of shard accumulators in sorted shard-name order."""
    total = None
    for _, acc in sorted(parts, key=lambda p: p[0]):
        if total is None:
            total = ChannelStats(*acc.sums["sum_mean"].shape)
        if acc.sums["sum_mean"].shape != total.sums["sum_mean"].shape:
            raise UserError("bucketed shard statistics of different tables cannot be merged")
        total.count += acc.count
        total.positions += acc.positions
        for k in STAT_KEYS:
            total.sums[k] += acc.sums[k]
    return total


def channel_stats_record(acc: ChannelStats, names: list[str]) -> dict:
    """The manifest's "stats" of bucketed data: per-channel sums over all buckets (added in table
    order) and the derived channel statistics; per bucket its count and sums."""
    total = {k: np.zeros(acc.sums[k].shape[1], dtype=np.float64) for k in STAT_KEYS}
    for b in range(len(names)):
        for k in STAT_KEYS:
            total[k] += acc.sums[k][b]
    count, positions = int(acc.count.sum()), int(acc.positions.sum())
    mean, std = pooled_stats(positions, *(total[k] for k in STAT_KEYS))
    return {"count": count, "positions": positions, "shape": [int(acc.sums["sum_mean"].shape[1])],
            "of": "raw posterior samples mean + std * eps of the unflipped images, pooled over every latent "
                  "position of every bucket (SPEC 7)",
            "merge_order": "sorted shard names, then buckets in table order",
            **{k: total[k].tolist() for k in STAT_KEYS},
            "channel_mean": mean.reshape(-1).tolist(), "channel_std": std.reshape(-1).tolist(),
            "per_bucket": {n: {"count": int(acc.count[b]), "positions": int(acc.positions[b]),
                               **{k: acc.sums[k][b].tolist() for k in STAT_KEYS}}
                           for b, n in enumerate(names) if acc.count[b]}}


def pooled_stats(positions: int, sum_mean, sum_mean_sq, sum_var) -> tuple[np.ndarray, np.ndarray]:
    """(mean, std) float64 [C, 1, 1] of the posterior samples from per-channel sums over `positions`."""
    if positions <= 0:
        raise UserError("latent statistics cover no samples")
    sm, sq, sv = (np.asarray(a, dtype=np.float64).reshape(-1, 1, 1) for a in (sum_mean, sum_mean_sq, sum_var))
    n = float(positions)
    mean = sm / n
    var = sq / n - mean * mean + sv / n
    return mean, np.sqrt(np.maximum(var, 0.0))


def stats_from_sums(count: int, sum_mean, sum_mean_sq, sum_var, kind: str = "channel"
                    ) -> tuple[np.ndarray, np.ndarray]:
    """(mean, std) float64 of the posterior samples: [C,1,1] (channel) or [C,h,w] (element)."""
    sm, sq, sv = (np.asarray(a, dtype=np.float64) for a in (sum_mean, sum_mean_sq, sum_var))
    if count <= 0:
        raise UserError("latent statistics cover no samples")
    if kind == "element":
        n = float(count)
        mean = sm / n
        var = sq / n - mean * mean + sv / n
    elif kind == "channel":
        n = float(count) * sm.shape[1] * sm.shape[2]
        mean = sm.sum(axis=(1, 2), keepdims=True) / n
        var = sq.sum(axis=(1, 2), keepdims=True) / n - mean * mean + sv.sum(axis=(1, 2), keepdims=True) / n
    else:
        raise UserError(f"latent_norm must be 'channel' or 'element', got {kind!r}")
    return mean, np.sqrt(np.maximum(var, 0.0))


def stats_record(acc: StatsAccumulator) -> dict:
    """The manifest's "stats" section: merged float64 sums and the derived channel statistics."""
    mean, std = stats_from_sums(acc.count, *(acc.sums[k] for k in STAT_KEYS), kind="channel")
    return {"count": acc.count, "shape": list(acc.shape),
            "of": "raw posterior samples mean + std * eps of the unflipped images (SPEC 7)",
            "merge_order": "sorted shard names",
            **{k: acc.sums[k].tolist() for k in STAT_KEYS},
            "channel_mean": mean.reshape(-1).tolist(), "channel_std": std.reshape(-1).tolist()}


def latent_stats(manifest: dict, kind: str = "channel") -> tuple[np.ndarray, np.ndarray]:
    """(mean, std) float64 arrays shaped [C,1,1] (`channel`) or [C,h,w] (`element`)."""
    st = (manifest or {}).get("stats")
    if not st or any(k not in st for k in ("count", *STAT_KEYS)):
        raise UserError("the latent manifest has no statistics; re-run data_prep/encode_latents.py "
                        "(or with --merge-only once every shard is complete)")
    if "positions" in st:  # bucketed data: per-channel sums only
        if kind != "channel":
            raise UserError(f"data.latent_norm {kind}: bucketed latents (encode_latents.py --buckets) have one shape "
                            "per bucket and per-channel statistics only; use data.latent_norm channel")
        return pooled_stats(int(st["positions"]), *(st[k] for k in STAT_KEYS))
    return stats_from_sums(int(st["count"]), *(st[k] for k in STAT_KEYS), kind=kind)


# ----------------------------------------------------------------------------------------------
# Records and the manifest
# ----------------------------------------------------------------------------------------------


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
    """Records, job and manifest: sorted keys (stable files to diff)."""
    write_json(path, obj, sort_keys=True)


def record_paths(out_dir: str | os.PathLike, name: str) -> tuple[Path, Path]:
    d = Path(out_dir) / RECORDS
    return d / f"{name}.json", d / f"{name}.stats.npz"


def write_shard_record(out_dir: str | os.PathLike, name: str, record: dict,
                       stats: StatsAccumulator | None) -> None:
    """Statistics first, the record json last (its presence marks the shard complete)."""
    rec_path, npz_path = record_paths(out_dir, name)
    rec_path.parent.mkdir(parents=True, exist_ok=True)
    if stats is not None:
        stats.save(npz_path)
    write_json_atomic(rec_path, record)


def read_shard_record(out_dir: str | os.PathLike, name: str) -> dict | None:
    rec_path, _ = record_paths(out_dir, name)
    if not rec_path.is_file():
        return None
    try:
        return json.loads(rec_path.read_text())
    except ValueError:
        return None  # torn by a crash on a file system without atomic rename: redo the shard


def merge_manifest(out_dir: str | os.PathLike, names: list[str], header: dict,
                   write: bool = True) -> dict | None:
    """The manifest from `header` (job settings) and the records of all `names` (input order);
    None while a record is missing. Written atomically to `out_dir/manifest.json`."""
    out_dir = Path(out_dir)
    records = {}
    for name in names:
        rec = read_shard_record(out_dir, name)
        if rec is None:
            return None
        records[name] = rec
    jobs = sorted({str(r.get("job")) for r in records.values() if r.get("job")})
    if len(jobs) > 1:
        raise UserError(f"{out_dir}: its shard records come from {len(jobs)} jobs with different settings "
                        f"({', '.join(jobs[:3])}); delete the output and encode it again")
    bucketed = bool(header.get("buckets"))
    parts = []
    for name in names:
        if records[name].get("samples", 0) > 0:
            path = record_paths(out_dir, name)[1]
            parts.append((name, ChannelStats.load(path) if bucketed else StatsAccumulator.load(path)))
    total = merge_channel_stats(parts) if bucketed else merge_stats(parts)
    if total is None:
        raise UserError(f"{out_dir}: no shard holds any sample; nothing to write a manifest for")
    skipped: dict[str, int] = {}
    for rec in records.values():
        for k, v in (rec.get("skipped") or {}).items():
            skipped[k] = skipped.get(k, 0) + int(v)
    keys = ("name", "file", "input", "samples", "skipped", "bytes", "text_state_bytes", "fp32_fallback_batches")
    keys += ("bucket_counts", "sample_buckets") if bucketed else ()
    shards = [{k: records[n].get(k) for k in keys} for n in names]
    n_samples = sum(int(r["samples"]) for r in records.values())
    text_bytes = sum(int(r.get("text_state_bytes") or 0) for r in records.values())
    manifest = dict(header)
    manifest.update({
        "format": FORMAT_BUCKETED if bucketed else FORMAT,
        "num_samples": n_samples,
        "num_shards": sum(1 for s in shards if s["file"]),
        "skipped": dict(sorted(skipped.items())),
        "empty_shards": [s["name"] for s in shards if not s["file"]],
        "output_bytes": sum(int(s["bytes"] or 0) for s in shards),
        "fp32_fallback_batches": sum(int(s["fp32_fallback_batches"] or 0) for s in shards),
        "shards": shards,
        "stats": channel_stats_record(total, bucket_names(header)) if bucketed else stats_record(total),
    })
    if bucketed:
        manifest["buckets"] = {**header["buckets"], **bucket_summary(header, list(records.values()))}
    if manifest.get("text", {}).get("states"):
        manifest["text"] = dict(manifest["text"])
        manifest["text"]["states_bytes"] = {"total": text_bytes,
                                            "per_sample": text_bytes / max(n_samples, 1)}
    if write:
        write_json_atomic(out_dir / MANIFEST, manifest)
    return manifest


def bucket_names(header: dict) -> list[str]:
    return [b["name"] for b in header["buckets"]["table"]]


def bucket_summary(header: dict, records: list[dict]) -> dict:
    """`counts` per bucket (table order), the most common bucket and the crop summary (mean, max,
    share of samples per crop range, mean per bucket) from the shard records."""
    names = bucket_names(header)
    counts = {n: sum(int((r.get("bucket_counts") or {}).get(n, 0)) for r in records) for n in names}
    crops = [r["crop"] for r in records if r.get("crop")]
    n = sum(counts.values())
    edges = crops[0]["edges"] if crops else []
    hist = [sum(c["counts"][i] for c in crops) for i in range(len(edges) + 1)]
    by_bucket = {b: sum(float(c["bucket_sum"].get(b, 0.0)) for c in crops) for b in names}
    labels = [f"<= {e:g}" for e in edges] + ([f"> {edges[-1]:g}"] if edges else [])
    return {"counts": counts, "most_common": max(names, key=lambda b: counts[b]),
            "crop": {"of": "share of the resized image's area cut off by the centre crop",
                     "mean": sum(float(c["sum"]) for c in crops) / max(n, 1),
                     "max": max((float(c["max"]) for c in crops), default=0.0),
                     "share": {lab: h / max(n, 1) for lab, h in zip(labels, hist)},
                     "mean_per_bucket": {b: by_bucket[b] / counts[b] for b in names if counts[b]}}}


def load_manifest(path_or_dir: str | os.PathLike) -> dict:
    """The manifest of a latent data set: a manifest.json path, its folder, or a URL (pipe:,
    http(s), ...). Adds "_path"/"_dir" (where it was read) for local files."""
    s = str(path_or_dir)
    if "://" in s or s.startswith("pipe:"):
        try:
            with wds.gopen(s if s.endswith(".json") else s.rstrip("/") + "/" + MANIFEST) as f:
                text = f.read().decode("utf-8")
        except Exception as err:
            raise UserError(f"{s}: latent manifest could not be read ({err})") from None
        where = None
    else:
        p = Path(s).expanduser()
        if p.is_dir():
            p = p / MANIFEST
        if not p.is_file():
            raise UserError(f"{p}: latent manifest not found; data_prep/encode_latents.py writes it beside the "
                            "shards when every shard is complete (re-run it, or use --merge-only)")
        try:
            text, where = p.read_text(encoding="utf-8"), p.resolve()
        except (OSError, UnicodeDecodeError) as err:
            raise UserError(f"{p}: the latent manifest could not be read ({err}); point data.manifest at the "
                            "manifest.json data_prep/encode_latents.py wrote") from None
    try:
        m = json.loads(text)
    except ValueError as err:
        raise UserError(f"{s}: the latent manifest is not valid JSON ({err})") from None
    fmt = m.get("format") if isinstance(m, dict) else None
    if not (isinstance(fmt, str) and fmt.startswith("lct-latents/")):
        raise UserError(f"{s}: not a latent manifest (format {fmt!r}); point at the output of "
                        "data_prep/encode_latents.py")
    if fmt not in (FORMAT, FORMAT_BUCKETED):
        raise UserError(f"{s}: latent format {fmt} is not supported by this lct (reads {FORMAT}, {FORMAT_BUCKETED}); "
                        "re-encode the data or update lct")
    missing = [k for k in ("latent_shape", "stats", "vae", "text") if k not in m]
    if missing:
        raise UserError(f"{s}: the latent manifest lacks {', '.join(missing)}")
    if where is not None:
        m["_path"], m["_dir"] = str(where), str(where.parent)
    return m
