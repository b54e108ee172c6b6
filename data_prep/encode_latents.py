"""Image-text shards -> latent shards + manifest.json (SPEC 7, docs/ARCHITECTURE.md "Latent shards").

    python data_prep/encode_latents.py --input 'data/coco/{00000..00008}.tar' --output data/coco-lat \\
        --vae /models/sd-vae-ft-ema --resolution 256 --text-model ViT-B-32 \\
        --text-pretrained /models/open_clip_vit_b32_laion2b.bin [--flip] [--text-states]
    torchrun --nproc-per-node 8 data_prep/encode_latents.py ...        # one process per GPU
    python data_prep/encode_latents.py ... --merge-only                  # re-merge manifest.json

Input: webdataset shards in the img2dataset layout (`{key}.jpg|jpeg|png|webp`, `{key}.txt`,
`{key}.json`): local paths, directories (their *.tar), globs, brace patterns
(`data/{00000..00009}.tar`, comma lists) or URLs opened by webdataset (`pipe:CMD`, http(s),
`s3://...` is read through `pipe:aws s3 cp URL -`). Only image bytes (PIL), txt and json are
decoded; nothing is unpickled. Captions: the json's `captions` list, else its `caption`, else the
txt; empty ones are dropped and the first `--max-captions` (default 5) kept, in order: a sample
stores K = min(#captions, max) captions and `tokens.npy` [K, L] (no padding of K; L = the
tokenizer's context length, open_clip pads with 0 after EOT and truncates keeping EOT last).

Per sample: `lct.vae.preprocess_image` (8-bit RGB, high-bit grayscale scaled; center crop of the
long edge, bicubic resize to --resolution, [-1, 1]), the VAE posterior mean and std stored as float16 (values outside the
float16 range are an error naming the sample), optionally the same for the horizontally flipped
image (`--flip`), and with `--text-states` the fp16 token states [K,L,D] and pooled features
[K,P] (large: the bytes per sample and in total are logged and recorded in the manifest).
VAE precision: fp32 (TF32 matmuls/convolutions on GPU) by default; `--precision bf16|fp16` runs
the VAE in half precision and re-encodes a batch in fp32 when it produces a non-finite value
(counted as `fp32_fallback_batches`).

Output (`--output DIR`): `<name>.tar` for input shard `<name>.tar|.tar.gz|.tgz` with the input's
keys in the input's order; `records/<name>.json` + `records/<name>.stats.npz` per shard (float64
statistics sums of the unflipped posterior, SPEC 7; the record also holds the shard's size and
sha256); `job.json` (settings; a rerun with other settings is refused); `text_tower/` for a random
text tower (`--text-pretrained random`: seeded by --seed, its text half saved so the trainer loads
the same weights); `manifest.json`, merged from all records in sorted shard order (identical
numbers for any number of ranks and resumes); `job.lock` and, while a shard is written,
`records/<name>.lock`.

Scale: one process per GPU. Rank/world come from RANK/WORLD_SIZE (torchrun, deepspeed) or
SLURM_PROCID/SLURM_NTASKS; the device from LOCAL_RANK or SLURM_LOCALID. Rank r encodes input
shards r, r+W, r+2W, ... No process group is needed: with torch.distributed initialised the ranks
meet at a barrier and rank 0 merges the manifest; otherwise whichever rank finds every shard
complete merges it (or run `--merge-only`). DataLoader workers (--num-workers) read, decode,
preprocess and tokenize whole shards while the main process encodes and writes.

Resume and concurrency: a shard is written under its lock `records/<name>.lock`
(`lct.shards.FileLock`: released by the kernel when its process dies) to a temporary file of this
process (`<name>.tar.<host>-<pid>.tmp`), read back (every key once, in order, the end-of-archive
marker), renamed to `<name>.tar` and recorded with its sha256 (the record marks it complete). A
rerun skips shards with a record, redoes the others from scratch and never rewrites a completed
shard. Two jobs on one --output (a relaunch while the first runs, a SLURM array without RANK)
share the shards: a shard another live process holds is left to it (logged), and whichever
process completes the last shard writes the manifest. `job.json` (and a random text tower) is
made under `job.lock`; a job.json with other settings is refused once a shard is recorded
under it, and replaced (with a log line) when its job recorded none (it failed). An --output
holding the input shards, or a manifest.json, tars or records without job.json (or a
manifest.json of another job), is refused before any work. DataLoader workers get SIGKILL when
this process dies (`lct.data.die_with_parent`): a kill -9 leaves no orphan.

Bad input: a corrupt image (`corrupt_image`), a sample without image (`missing_image`), without
caption (`missing_caption`) or whose only caption is a txt that is not UTF-8 (`caption_not_utf8`),
and a key already seen in the shard, adjacent or not (`duplicate_key`: the first sample is kept),
are skipped and counted per reason in the record, the manifest and the log. An input shard that
yields no sample gets no output shard; the other shards are completed first, then the job fails
naming it (exit 2) and writes no manifest, unless `--skip-empty-shards` records it as empty
(listed under `empty_shards` in the manifest). An input shard that cannot be read to its end
(missing file, a tar cut anywhere: inside a member, at a member boundary or inside a header, which
tarfile alone reads as a shorter valid tar; a failed download or pipe: command) is treated the
same way but is never recorded: fix or remove it and re-run.
"""

if __name__ == "__main__" and __package__ in (None, ""):  # run as a file: repo root, not this folder, first on sys.path
    import sys, pathlib; sys.path[0] = str(pathlib.Path(__file__).resolve().parents[1])

import hashlib
import json
import os
import re
import sys
import time
from pathlib import Path

from torch.utils.data import IterableDataset, get_worker_info

from lct.config import EncodeLatentsConfig, cli_config
from lct.dist import DistInfo, pick_device
from lct.errors import UserError, cli_main
from lct.files import output_dir_problem

DESCRIPTION = (
    "Encode img2dataset-style webdataset shards ({key}.jpg|png|webp + .txt/.json captions) into latent shards: "
    "fp16 VAE posterior mean/std (+ flipped with --flip), open_clip token ids of up to --max-captions captions "
    "(+ fp16 token states with --text-states), one output shard per input shard with the same keys, and "
    "manifest.json with float64 latent statistics. One process per GPU (RANK/WORLD_SIZE or SLURM_PROCID/"
    "SLURM_NTASKS; rank r takes shards r, r+W, ...). Resumable: complete shards (records/<name>.json) are "
    "skipped, partial ones redone. Corrupt images and caption-less samples are skipped and counted; an input "
    "shard without any sample fails the job after the others (or is recorded with --skip-empty-shards). "
    "--text-pretrained random saves a seeded random text tower in OUTPUT/text_tower/.")
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
CRASH_ENV = "LCT_TEST_CRASH_AFTER_SHARDS"  # test hook: die mid-shard after this many shards
PREPROCESS = ("RGB, center crop of the long edge, PIL bicubic resize, x/127.5-1 (lct.vae.preprocess_image); "
              "no EXIF rotation")


# ----------------------------------------------------------------------------------------------
# Shard lists and names
# ----------------------------------------------------------------------------------------------


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
        from urllib.parse import urlparse

        s = urlparse(s).path
    base = os.path.basename(s.rstrip("/"))
    for ext in (".tar.gz", ".tgz", ".tar"):
        if base.endswith(ext):
            base = base[: -len(ext)]
            break
    if not base or base.startswith("."):
        raise UserError(f"--input: cannot name an output shard after {url!r}")
    return base


# ----------------------------------------------------------------------------------------------
# Reading and preprocessing (DataLoader workers)
# ----------------------------------------------------------------------------------------------


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


def decode_input_sample(raw: dict, resolution: int, tokenizer, max_captions: int):
    """(item, None) or (None, skip reason) for one raw input sample."""
    import numpy as np

    from lct.vae import open_image, preprocess_image_uint8

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
    captions, reason = sample_captions(meta, raw.get("txt"), max_captions)
    if reason:
        return None, reason
    try:
        image = preprocess_image_uint8(open_image(raw[ext]), resolution)
    except Exception:  # PIL raises many kinds for corrupt, truncated or exotic files
        return None, "corrupt_image"
    tokens = tokenizer(captions).numpy().astype(np.int32)
    return {"key": raw["__key__"], "image": image, "tokens": tokens, "captions": captions, "meta": meta}, None


def _identity(x):
    return x


def shard_batches(jobs, resolution: int, tokenizer, max_captions: int, batch_size: int,
                  worker: int = 0, workers: int = 1):
    """Batches of decoded samples of whole shards (shard j goes to worker j mod workers), in shard
    order, then an end marker per shard with its skip counts and read errors (`lct.shards`: a
    shard without its end-of-archive marker is a read error; a repeated key is `duplicate_key`)."""
    import torch

    from lct.shards import ShardError, tar_samples

    for j, (idx, url) in enumerate(jobs):
        if j % workers != worker:
            continue
        skipped: dict[str, int] = {}
        errors: list[str] = []

        def count(reason, skipped=skipped):
            skipped[reason] = skipped.get(reason, 0) + 1

        buf: list[dict] = []
        seen = 0
        try:
            for raw in tar_samples(open_url(url), on_duplicate=lambda key: count("duplicate_key")):
                seen += 1
                item, reason = decode_input_sample(raw, resolution, tokenizer, max_captions)
                if reason:
                    count(reason)
                    continue
                buf.append(item)
                if len(buf) == batch_size:
                    yield _batch(idx, buf, torch)
                    buf = []
        except ShardError as err:  # the shard fails as a whole and is redone by a rerun
            errors.append(str(err))
        if buf:
            yield _batch(idx, buf, torch)
        yield {"shard": idx, "done": True, "skipped": skipped, "errors": errors, "seen": seen}


def _batch(idx: int, items: list[dict], torch) -> dict:
    return {"shard": idx, "done": False, "keys": [i["key"] for i in items],
            "images": torch.stack([i["image"] for i in items]), "tokens": [i["tokens"] for i in items],
            "captions": [i["captions"] for i in items], "meta": [i["meta"] for i in items]}


class ShardImages(IterableDataset):
    """The DataLoader's dataset: worker w of n decodes the shards j with j mod n == w."""

    def __init__(self, jobs, resolution, tokenizer, max_captions, batch_size):
        self.args = (jobs, resolution, tokenizer, max_captions, batch_size)

    def __iter__(self):
        info = get_worker_info()
        w, n = (info.id, info.num_workers) if info else (0, 1)
        return shard_batches(*self.args, worker=w, workers=n)


def make_loader(jobs, resolution, tokenizer, max_captions, batch_size, num_workers, pin_memory):
    """A DataLoader over `jobs` [(index, url)] whose workers decode whole shards (and die with
    this process, however it dies: `lct.data.die_with_parent`)."""
    import functools

    from torch.utils.data import DataLoader

    from lct.data import die_with_parent

    workers = min(num_workers, len(jobs))
    kw = {"prefetch_factor": 4, "worker_init_fn": functools.partial(die_with_parent, os.getpid())} if workers else {}
    return DataLoader(ShardImages(jobs, resolution, tokenizer, max_captions, batch_size), batch_size=None,
                      num_workers=workers, collate_fn=_identity, pin_memory=pin_memory, **kw)


# ----------------------------------------------------------------------------------------------
# Encoding and writing (main process)
# ----------------------------------------------------------------------------------------------


class Encoder:
    """VAE (fp32, or half with an fp32 fallback per batch) and the text tower on one device."""

    def __init__(self, vae, text, device, precision: str):
        import copy

        import torch

        self.vae, self.text, self.device = vae, text, device
        self.trimmed = getattr(text, "kind", "open_clip") != "open_clip"  # transformers towers: trimmed states
        self.half = None
        if precision != "fp32":
            dtype = torch.bfloat16 if precision == "bf16" else torch.float16
            if device.type == "cpu" and dtype == torch.float16:
                raise UserError("--precision fp16 needs a GPU; use fp32 (or bf16) on the CPU")
            self.half = copy.deepcopy(vae)
            for mod in self.half.modules():  # cast in place (no diffusers upcast bookkeeping)
                for name, prm in list(mod.named_parameters(recurse=False)):
                    prm.data = prm.data.to(dtype)
        self.fallback_batches = 0

    def posterior(self, images, fp32: bool = False):
        """(mean, std) fp32 of images in [-1, 1], queued on the device (no host sync)."""
        from lct.vae import encode_posterior

        return encode_posterior(self.vae if (fp32 or self.half is None) else self.half, images)

    def text_states(self, tokens: list, chunk: int = 256):
        """(states [N,L,D], pooled [N,P] or None) fp32 of the captions' tokens [K_i, L] of a batch.
        Transformers towers (`trimmed`): states [N,n,D] up to the batch's longest caption (the
        later positions are padding), pooled None where the tower has none (T5)."""
        import numpy as np
        import torch

        flat = torch.from_numpy(np.concatenate(tokens).astype(np.int64))
        states, pooled = [], []
        for s in range(0, flat.shape[0], chunk):
            st, _, po = self.text(flat[s:s + chunk].to(self.device, non_blocking=True))
            states.append(st)
            pooled.append(po)
        states, pooled = torch.cat(states), torch.cat(pooled)
        if self.trimmed:
            states = states[:, : int(real_lengths(self.text, flat).max())]
        return states, (pooled if pooled.shape[1] else None)


def real_lengths(text, tokens):
    """Per caption, the number of positions up to its last real token (mask is a prefix)."""
    import torch

    mask = torch.as_tensor(text.mask(torch.as_tensor(tokens).long()))
    return torch.where(mask.any(-1), mask.shape[-1] - mask.flip(-1).int().argmax(-1), torch.zeros_like(mask[:, 0], dtype=torch.long))


def fp16_problem(t, what: str, name: str, keys: list[str]) -> UserError:
    """The error for a tensor holding a value that float16 cannot (names the first such sample)."""
    import torch

    from lct.latents import FP16_MAX

    bad = (~torch.isfinite(t) | (t.abs() > FP16_MAX)).reshape(t.shape[0], -1).any(dim=1)
    row = int(bad.nonzero()[0, 0]) if bad.any() else 0
    finite = t[torch.isfinite(t)]
    big = float(finite.abs().max()) if finite.numel() else float("nan")
    return UserError(f"shard {name}: sample {keys[row]}: {what} is not finite or outside the float16 "
                     f"range (max |x| {big:.4g} > {FP16_MAX:.0f}); it cannot be stored as float16 "
                     "(try --precision fp32, or another VAE)")


def to_fp16(t, what: str, name: str, keys: list[str]):
    """float16 numpy of a tensor; a value outside the fp16 range is an error naming the sample."""
    import torch

    from lct.latents import FP16_MAX

    if (~torch.isfinite(t) | (t.abs() > FP16_MAX)).any():
        raise fp16_problem(t, what, name, keys)
    return t.to(torch.float16).cpu().numpy()


class ShardWriter:
    """One output shard, written under its lock (`records/<name>.lock`, `lct.shards.FileLock`) to a
    temporary file of this process (`<name>.tar.<host>-<pid>.tmp`), read back and checked, renamed
    to `<name>.tar`, then recorded; the lock is released and removed last."""

    def __init__(self, out: Path, name: str, url: str, latent_shape, job_id: str, lock, rank: int = 0,
                 world: int = 1):
        import socket

        import webdataset as wds

        from lct.latents import StatsAccumulator

        self.out, self.name, self.url, self.job_id, self.lock = out, name, url, job_id, lock
        self.rank, self.world = rank, world
        self.final = out / f"{name}.tar"
        for old in out.glob(f"{name}.tar.*tmp"):  # left by a dead writer (we hold the lock)
            old.unlink(missing_ok=True)
        self.tmp = out / f"{name}.tar.{socket.gethostname()}-{os.getpid()}.tmp"
        self.stream = open(self.tmp, "wb")
        self.writer = wds.TarWriter(self.stream, encoder=False, mtime=0.0, user="lct", group="lct", mode=0o644)
        self.stats = StatsAccumulator(latent_shape)
        self.keys: list[str] = []
        self.text_bytes = 0
        self.fallbacks = 0

    @property
    def count(self) -> int:
        return len(self.keys)

    def add(self, members: dict, mean16, std16) -> None:
        self.writer.write(members)
        self.stats.add(mean16, std16)
        self.keys.append(members["__key__"])
        self.text_bytes += len(members.get("states.npy", b"")) + len(members.get("pooled.npy", b""))
        self.lock.heartbeat()

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
        import hashlib

        from lct.shards import ShardError, tar_samples

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
        from lct.latents import write_shard_record

        rec = {"name": self.name, "input": self.url, "samples": self.count, "read": seen,
               "skipped": dict(sorted(skipped.items())), "text_state_bytes": self.text_bytes,
               "fp32_fallback_batches": self.fallbacks, "job": self.job_id, "rank": self.rank,
               "world_size": self.world}
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


WHAT = {"mean": "the posterior mean", "std": "the posterior std", "states": "a text token state",
        "pooled": "a pooled text feature"}


def _to_host(enc: Encoder, tensors: dict) -> dict:
    """Queue the device-to-host copies: fp16 values and per-row non-finite / out-of-range flags."""
    import torch

    from lct.latents import FP16_MAX

    nb = enc.device.type == "cuda"
    out: dict = {"dev": tensors, "half": {}, "nonfinite": {}, "bad": {}}
    for k, t in tensors.items():
        nonfinite = (~torch.isfinite(t)).reshape(t.shape[0], -1).any(dim=1)
        big = (t.abs() > FP16_MAX).reshape(t.shape[0], -1).any(dim=1)
        out["nonfinite"][k] = nonfinite.to("cpu", non_blocking=nb)
        out["bad"][k] = (nonfinite | big).to("cpu", non_blocking=nb)
        out["half"][k] = t.to(torch.float16).to("cpu", non_blocking=nb)
    return out


def launch_batch(enc: Encoder, item: dict, w: "ShardWriter", flip: bool, text_states: bool) -> dict:
    """Queue the device work of one batch (VAE, text tower, fp16 casts, copies); no host sync."""
    import torch

    from lct.vae import to_unit_range

    x = to_unit_range(item["images"].to(enc.device, non_blocking=True))
    if flip:
        x = torch.cat([x, x.flip(-1)])
    mean, std = enc.posterior(x)
    tensors = {"mean": mean, "std": std}
    if text_states:
        tensors["states"], pooled = enc.text_states(item["tokens"])
        if pooled is not None:
            tensors["pooled"] = pooled
    p = {"item": item, "w": w, "x": x, "flip": flip, **_to_host(enc, tensors)}
    if enc.device.type == "cuda":
        p["event"] = torch.cuda.Event()
        p["event"].record()
    return p


def finish_batch(enc: Encoder, p: dict) -> int:
    """Wait for a launched batch, check it (a half-precision batch with a non-finite value is
    re-encoded in fp32; values must fit float16) and write its samples. Returns their number."""
    import torch

    import numpy as np

    from lct.latents import encode_latent_sample

    if "event" in p:
        p["event"].synchronize()
    item, w = p["item"], p["w"]
    keys = item["keys"]
    b = len(keys)
    if enc.half is not None and (p["nonfinite"]["mean"].any() or p["nonfinite"]["std"].any()):
        enc.fallback_batches += 1
        w.fallbacks += 1
        mean, std = enc.posterior(p["x"], fp32=True)
        p.update(_to_host(enc, {**p["dev"], "mean": mean, "std": std}))
        if enc.device.type == "cuda":
            torch.cuda.current_stream(enc.device).synchronize()
    vae_keys = keys + keys if p["flip"] else keys
    ks = [t.shape[0] for t in item["tokens"]]
    text_keys = [k for k, n in zip(keys, ks) for _ in range(n)]
    for k, bad in p["bad"].items():
        if bad.any():
            raise fp16_problem(p["dev"][k], WHAT[k], w.name, vae_keys if k in ("mean", "std") else text_keys)
    h = {k: v.numpy() for k, v in p["half"].items()}
    offsets = [0]
    for n in ks:
        offsets.append(offsets[-1] + n)
    for i, key in enumerate(keys):
        extra = {}
        if p["flip"]:
            extra.update(flip_mean=h["mean"][b + i], flip_std=h["std"][b + i])
        if "states" in h:
            states = h["states"][offsets[i]:offsets[i + 1]]
            if enc.trimmed:  # to this sample's longest caption
                states = states[:, : max(1, int(real_lengths(enc.text, item["tokens"][i]).max()))]
            extra.update(states=np.ascontiguousarray(states))
            if "pooled" in h:
                extra.update(pooled=h["pooled"][offsets[i]:offsets[i + 1]])
        members = encode_latent_sample(key, mean=h["mean"][i], std=h["std"][i], tokens=item["tokens"][i],
                                       captions=item["captions"][i], meta=item["meta"][i], **extra)
        w.add(members, h["mean"][i], h["std"][i])
    return b


# ----------------------------------------------------------------------------------------------
# The job
# ----------------------------------------------------------------------------------------------


def job_options(cfg: EncodeLatentsConfig) -> dict:
    """The settings a rerun must repeat (checked before any model is loaded)."""
    from lct.text import RANDOM, is_random
    from lct.vae import vae_source

    hf = cfg.text_kind != "open_clip"
    random = not hf and is_random(cfg.text_pretrained)
    opts = {"vae": vae_source(cfg.vae), "resolution": cfg.resolution, "flip": cfg.flip,
            "precision": cfg.precision, "text_model": cfg.text_model,
            "text_pretrained": None if hf else RANDOM if random else cfg.text_pretrained,
            "seed": cfg.seed if random else None, "text_states": cfg.text_states,
            "max_captions": max_captions(cfg)}
    if hf:  # a transformers tower (T5, CLIP): lct.hf_text
        opts.update(text_kind=cfg.text_kind, text_tokenizer=cfg.text_tokenizer,
                    text_max_length=cfg.text_max_length, text_dtype=cfg.text_dtype)
    return opts


def max_captions(cfg: EncodeLatentsConfig) -> int:
    """--max-captions, default 5 for open_clip and 1 for transformers towers (T5-XXL states are
    ~8 kB per token in fp16: README, "Tune a public diffusion model")."""
    return cfg.max_captions or (5 if cfg.text_kind == "open_clip" else 1)


def check_output(out: Path, urls: list[str], names: list[str]) -> None:
    """Refuse an --output that holds what this tool did not write (before any work): the input
    shards themselves, or a manifest.json, tars or records without this tool's job.json."""
    from lct.latents import JOB, MANIFEST, RECORDS

    if not out.is_dir():
        return
    here = out.resolve()
    for u, n in zip(urls, names):
        if "://" not in u and not u.startswith("pipe:") and Path(u).resolve() == here / f"{n}.tar":
            raise UserError(f"--output {out} is the folder of the input shards: writing {n}.tar would replace "
                            "the input; choose another --output")
    job = None
    if (out / JOB).is_file():
        try:
            job = json.loads((out / JOB).read_text())
        except ValueError:
            job = None
    theirs = ([MANIFEST] if (out / MANIFEST).exists() else []) + sorted(p.name for p in out.glob("*.tar"))
    theirs += [f"{RECORDS}/{p.name}" for p in sorted((out / RECORDS).glob("*.json"))][:1]
    if job is None and theirs:
        raise UserError(f"--output {out} holds {', '.join(theirs[:3])} but no {JOB} of data_prep/encode_latents.py: "
                        "not this tool's output, which would be replaced; choose another (or an empty) --output")
    if job is not None and (out / MANIFEST).is_file():
        try:
            m = json.loads((out / MANIFEST).read_text())
        except ValueError:
            m = None
        if not isinstance(m, dict) or m.get("options") != job.get("options") or m.get("created_by") != job.get(
                "created_by"):
            raise UserError(f"--output {out}: its {MANIFEST} was not written by the job recorded in {JOB}; move it "
                            "away (or choose another --output)")


def job_digest(header: dict) -> str:
    """The id of a job's settings (its job.json without the input list), kept in each record."""
    return hashlib.sha256(json.dumps({k: v for k, v in header.items() if k != "input"},
                                     sort_keys=True).encode()).hexdigest()[:16]


def current_job(out: Path) -> str | None:
    from lct.latents import JOB

    try:
        return job_digest(json.loads((out / JOB).read_text()))
    except (OSError, ValueError):
        return None


def running_writers(out: Path) -> list[str]:
    """Descriptions of the processes holding a shard lock in `out` (other live jobs)."""
    from lct.latents import RECORDS
    from lct.shards import FileLock

    held = []
    for p in sorted((out / RECORDS).glob("*.lock")):
        lock = FileLock(p)
        who = lock.probe()
        if who is not None:
            held.append(f"{p.stem} ({lock.describe(who)})")
    return held


def check_job(out: Path, header: dict | None, options: dict, rank: int = 0, replace: bool = True
              ) -> dict | None:
    """Compare with the job.json of an earlier run; returns it (None when there is none). Call
    under the output's job lock. A job.json with other settings is refused once a shard has been
    recorded under it or while another process writes shards; an earlier job that recorded no
    shard (it failed) is replaced, with its temporary files and a random text tower of other settings."""
    import shutil

    from lct.latents import JOB, RECORDS
    from lct.text import TOWER_DIR

    path = out / JOB
    if not path.is_file():
        return None
    try:
        old = json.loads(path.read_text())
    except ValueError:
        old = {}
    cmp = [("options", options)] + ([("header", header)] if header is not None else [])
    for what, new in cmp:
        a = old.get("options") if what == "options" else {k: v for k, v in old.items() if k != "input"}
        b = new if what == "options" else {k: v for k, v in new.items() if k != "input"}
        if json.loads(json.dumps(a)) != json.loads(json.dumps(b)):
            diff = sorted(k for k in set(a or {}) | set(b) if (a or {}).get(k) != b.get(k))
            recorded = sorted(p.stem for p in (out / RECORDS).glob("*.json"))
            busy = running_writers(out)
            if recorded or busy or not replace:
                what_ = (f"{len(recorded)} shard(s) recorded" if recorded else
                     f"another job writing {busy[0]}" if busy else "no shard recorded yet")
                raise UserError(f"{out} holds latents encoded with other settings (differing: {', '.join(diff)}; "
                                f"{what_}); use another --output, or delete it to start over")
            log(rank, f"{out}: replacing the settings of an earlier job that recorded no shard "
                      f"(differing: {', '.join(diff)})")
            path.unlink()
            was = old.get("options") or {}
            if was.get("text_pretrained") == "random" and any(
                    was.get(k) != options.get(k) for k in ("text_model", "text_pretrained", "seed")):
                shutil.rmtree(out / TOWER_DIR, ignore_errors=True)  # its tower is not this job's
            for tmp in out.glob("*.tar.*tmp"):
                tmp.unlink(missing_ok=True)
            return None
    return old


def log(rank: int, msg: str) -> None:
    prefix = f"encode_latents[{rank}]" if rank else "encode_latents"
    print(f"{prefix}: {msg}", file=sys.stderr, flush=True)


def fmt_skips(skipped: dict) -> str:
    return ", ".join(f"{k} {v}" for k, v in sorted(skipped.items())) or "none"


def merge(cfg: EncodeLatentsConfig, out: Path, names: list[str], rank: int, required: bool) -> dict | None:
    from lct.latents import JOB, MANIFEST, merge_manifest, record_paths

    job = json.loads((out / JOB).read_text()) if (out / JOB).is_file() else None
    if job is None:
        raise UserError(f"{out}: no {JOB}; run without --merge-only first")
    manifest = merge_manifest(out, names, job)
    if manifest is None:
        missing = [n for n in names if not record_paths(out, n)[0].is_file()]
        msg = (f"{len(missing)} of {len(names)} shards are not complete yet ({', '.join(missing[:5])}"
               f"{', ...' if len(missing) > 5 else ''})")
        if required:
            raise UserError(f"{out}: {msg}; run the encoding for them first")
        log(rank, f"{msg}; the rank that completes the last one writes {MANIFEST} (or run --merge-only)")
        return None
    t = manifest["text"]
    extra = ""
    if t.get("states"):
        sb = t["states_bytes"]
        extra = f", text states {sb['total'] / 1e6:.1f} MB ({sb['per_sample'] / 1e3:.1f} kB/sample)"
    log(rank, f"wrote {out / MANIFEST}: {manifest['num_samples']} samples in {manifest['num_shards']} shards, "
              f"skipped: {fmt_skips(manifest['skipped'])}, {manifest['output_bytes'] / 1e6:.1f} MB{extra}")
    return manifest


JOB_LOCK = "job.lock"


def run(cfg: EncodeLatentsConfig) -> dict:
    """Encode this rank's shards, then merge if complete. Returns a summary dict."""
    import shutil

    import torch

    from lct.data import existing_shards
    import numpy as np

    from lct.files import atomic_file
    from lct.latents import JOB, TEXT_NULL, read_shard_record, record_paths, write_json_atomic
    from lct.shards import FileLock
    from lct.text import TOWER_DIR, TextEncoder, check_text_source, is_random
    from lct.vae import check_vae_source, latent_shape, load_vae, vae_summary

    info = DistInfo.from_env()
    rank, world, local_rank = info.rank, info.world_size, info.local_rank
    urls = existing_shards(cfg.input, "--input")
    names = [shard_name(u) for u in urls]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise UserError(f"--input: several input shards share the output name(s) {', '.join(dup[:5])}")
    out = Path(cfg.output)
    problem = output_dir_problem(out, "--output")
    if problem:
        raise UserError(problem)
    check_output(out, urls, names)
    out.mkdir(parents=True, exist_ok=True)
    options = job_options(cfg)
    job_lock = FileLock(out / JOB_LOCK)  # held while job.json (and a random text tower) is checked or made
    if cfg.merge_only:
        if check_job(out, None, options, rank, replace=False) is None:
            raise UserError(f"{out}: no {JOB}; run without --merge-only first")
        manifest = merge(cfg, out, names, rank, required=True)
        return {"manifest": manifest, "images": 0}
    with job_lock:
        check_job(out, None, options, rank)  # other settings: refuse before loading anything

    hf = cfg.text_kind != "open_clip"
    check_vae_source(cfg.vae)  # missing weights: fail before the slow imports
    if not hf:
        check_text_source(cfg.text_model, cfg.text_pretrained)
    else:
        from lct.hf_text import HFTextEncoder
        from lct.hub import resolve_pretrained

        resolve_pretrained(cfg.text_model, key="--text-model", subfolders=("", "text_encoder"), what="text encoder")
    device = pick_device(cfg.device, local_rank)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    vae = load_vae(cfg.vae, device, torch.float32)
    shape = latent_shape(vae, cfg.resolution)
    random_tower = not hf and is_random(cfg.text_pretrained)
    if hf:
        text = HFTextEncoder.load(cfg.text_model, tokenizer=cfg.text_tokenizer, max_length=cfg.text_max_length,
                                  device=device, dtype=cfg.text_dtype, key="--text-model")
        if text.kind != cfg.text_kind:
            raise UserError(f"--text-model {cfg.text_model} is a {text.kind} tower, not --text-kind {cfg.text_kind}")
    else:
        text = None if random_tower else TextEncoder.load(cfg.text_model, cfg.text_pretrained, device)
    with job_lock:
        old = check_job(out, None, options, rank)
        if random_tower:  # made once per job, under the lock; a tower no job.json names is stale
            if old is None:
                shutil.rmtree(out / TOWER_DIR, ignore_errors=True)
            text = TextEncoder.load(cfg.text_model, cfg.text_pretrained, device, seed=cfg.seed, save_dir=out)
        trec = text.record(manifest_dir=out)
        trec.update(max_captions=max_captions(cfg), states=cfg.text_states, token_dtype="int32",
                    states_dtype="float16" if cfg.text_states else None)
        if hf:  # states trimmed to the real tokens; the empty caption's states for the null condition
            trec.update(states_layout="trimmed" if cfg.text_states else None, null_file=TEXT_NULL)
            with atomic_file(out / TEXT_NULL) as f:
                np.save(f, text.null_condition().numpy().astype(np.float32), allow_pickle=False)
        header = {"created_by": "data_prep/encode_latents.py", "input": cfg.input, "resolution": cfg.resolution,
                  "latent_shape": list(shape), "dtype": "float16", "flip": cfg.flip, "preprocess": PREPROCESS,
                  "vae": {**vae_summary(vae, cfg.vae), "precision": cfg.precision},
                  "text": trec, "options": options}
        if check_job(out, header, options, rank) is None:
            write_json_atomic(out / JOB, header)
    job_id = job_digest(header)

    mine = [i for i in range(len(urls)) if i % world == rank]
    todo = [i for i in mine if read_shard_record(out, names[i]) is None]
    log(rank, f"{len(urls)} input shards, world {world}: {len(mine)} for this rank, {len(mine) - len(todo)} "
              f"already complete, {len(todo)} to encode on {device} (VAE {cfg.precision}, latents {list(shape)})")
    enc = Encoder(vae, text, device, cfg.precision)
    loader = make_loader([(i, urls[i]) for i in todo], cfg.resolution, text.tokenizer, max_captions(cfg),
                         cfg.batch_size, cfg.num_workers, device.type == "cuda")
    crash_after = int(os.environ[CRASH_ENV]) if os.environ.get(CRASH_ENV) else None

    from tqdm import tqdm

    bar = tqdm(total=None, unit="img", desc=f"encode rank {rank}", disable=rank != 0, dynamic_ncols=True,
               mininterval=2.0, smoothing=0.05)
    writers: dict[int, ShardWriter] = {}
    ignored: set[int] = set()  # shards another process holds (or completed meanwhile)
    busy: list[str] = []
    done_recs: list[dict] = []
    failed: list[str] = []
    empty: list[str] = []
    images = finished = finished_images = 0
    pending = None
    t0 = time.time()
    t_first = None  # (time, images) after the first batch: the steady rate leaves start-up out

    def drain():
        """Check and write the batch in flight (the next one is already queued on the device)."""
        nonlocal pending, images, t_first
        if pending is not None:
            n = finish_batch(enc, pending)
            pending = None
            images += n
            bar.update(n)
            if t_first is None:
                t_first = (time.time(), images)

    def writer_for(idx: int) -> ShardWriter | None:
        """The shard's writer, made once its lock is ours; None when another process has it."""
        if idx in ignored:
            return None
        if idx not in writers:
            lock = FileLock(record_paths(out, names[idx])[0].with_suffix(".lock"))
            if not lock.acquire():
                ignored.add(idx)
                busy.append(f"{names[idx]} ({lock.describe()})")
                log(rank, f"shard {names[idx]} is being encoded by {lock.describe()}; left to it")
                return None
            if read_shard_record(out, names[idx]) is not None:  # completed while we waited for it
                lock.release()
                ignored.add(idx)
                return None
            writers[idx] = ShardWriter(out, names[idx], urls[idx], shape, job_id, lock, rank, world)
        return writers[idx]

    try:
        for item in loader:
            idx = item["shard"]
            w = writer_for(idx)
            if w is None:
                continue
            if item["done"]:
                drain()
                del writers[idx]
                if item["errors"]:
                    w.abort()
                    failed.append(f"{names[idx]} ({item['errors'][0]})")
                    log(rank, f"input shard {urls[idx]} could not be read to its end: {item['errors'][0]}")
                    continue
                rec = w.commit(item["skipped"], item["seen"], cfg.skip_empty_shards)
                if rec is None or rec.get("empty"):
                    empty.append(names[idx])
                    log(rank, f"input shard {urls[idx]} yielded no sample (read {item['seen']}, skipped: "
                              f"{fmt_skips(item['skipped'])})" + ("; recorded as empty" if rec else ""))
                if rec is not None:
                    done_recs.append(rec)
                finished += 1
                finished_images += w.count
                own = len(todo) - len(ignored)
                if finished < own:  # ETA: images per finished shard so far, times this process's shards
                    bar.total = max(int(finished_images / finished * own), images)
                    bar.refresh()
                continue
            launched = launch_batch(enc, item, w, cfg.flip, cfg.text_states)
            drain()  # the previous batch is written while this one runs on the device
            pending = launched
            if crash_after is not None and len(done_recs) >= crash_after and any(x.count for x in writers.values()):
                for x in writers.values():
                    x.stream.flush()
                os._exit(17)  # test hook: a kill in the middle of a shard
        drain()
        bar.total = images
        bar.refresh()
    except BaseException:
        for w in writers.values():
            w.abort()
        raise
    finally:
        bar.close()
    t_end = time.time()
    dt = max(t_end - t0, 1e-9)
    steady = None
    if t_first is not None and images > t_first[1]:
        steady = (images - t_first[1]) / max(t_end - t_first[0], 1e-9)
    skipped: dict[str, int] = {}
    for r in done_recs:
        for k, v in r["skipped"].items():
            skipped[k] = skipped.get(k, 0) + v
    nbytes = sum(r["bytes"] for r in done_recs)
    tbytes = sum(r["text_state_bytes"] for r in done_recs)
    text_msg = (f", text states {tbytes / 1e6:.1f} MB ({tbytes / max(images, 1) / 1e3:.1f} kB/sample)"
                if cfg.text_states else "")
    fb = f", {enc.fallback_batches} batches re-encoded in fp32" if enc.fallback_batches else ""
    log(rank, f"{images} images in {len(done_recs)} shards, skipped: {fmt_skips(skipped)}, "
              f"{images / dt:.1f} images/s, {nbytes / 1e6:.1f} MB written{text_msg}{fb}")
    if busy:
        log(rank, f"{len(busy)} shard(s) left to other processes: {', '.join(busy[:5])}; the process that "
                  "completes the last shard writes the manifest (a rerun redoes any that did not complete)")

    manifest = None
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
        if rank == 0:
            manifest = merge(cfg, out, names, rank, required=False)
    else:
        manifest = merge(cfg, out, names, rank, required=False)
    problems = []
    if empty and not cfg.skip_empty_shards:
        problems.append(f"input shard(s) {', '.join(empty[:5])} yielded no sample and got no output shard; "
                        "fix or drop them, or pass --skip-empty-shards to record them as empty")
    if failed:
        problems.append(f"input shard(s) {', '.join(failed[:3])} could not be read to the end; fix them and "
                        "re-run (completed shards are kept)")
    if problems:
        raise UserError("; ".join(problems))
    return {"images": images, "seconds": dt, "images_per_s": images / dt, "steady_images_per_s": steady,
            "shards": len(done_recs), "left_to_others": busy,
            "skipped": skipped, "bytes": nbytes, "text_state_bytes": tbytes, "manifest": manifest,
            "fallback_batches": enc.fallback_batches, "record_paths": [str(record_paths(out, n)[0]) for n in names]}


def main(argv: list[str] | None = None) -> int:
    cfg, _ = cli_config(EncodeLatentsConfig, argv, prog="encode_latents",
                        description=DESCRIPTION)
    run(cfg)
    return 0


def cli():
    cli_main(main)


if __name__ == "__main__":
    cli()
