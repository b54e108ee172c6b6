"""Image-text shards -> latent shards + manifest.json (SPEC 7, docs/ARCHITECTURE.md "Latent shards").

    python data_prep/encode_latents.py --input 'data/coco/{00000..00008}.tar' --output data/coco-lat \\
        --vae /models/sd-vae-ft-ema --resolution 256 --text-model ViT-B-32 \\
        --text-pretrained /models/open_clip_vit_b32_laion2b.bin [--flip] [--text-states]
    python data_prep/encode_latents.py ... --buckets pixart_512          # aspect-ratio buckets
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

Aspect-ratio buckets (`--buckets NAME|FILE`, `lct.buckets`): instead of the square crop, each
image goes to the bucket of the table whose aspect ratio is nearest to its own, is resized
(bicubic) to cover it and centre-cropped (PixArt's multi-scale data), and its latents are stored
at that bucket's shape; flips, text and every check are as above. The sample's json names its
bucket and crop fraction; the records and the manifest hold the table, the counts per bucket,
each sample's bucket and a crop summary (`lct.latents`: "Bucketed data"); statistics are per
channel. A worker batches samples of one bucket; the writer keeps the input order.

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

import copy
import json
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from lct import dist
from lct.buckets import BucketTable, load_table
from lct.data import existing_shards
from lct.dist import DistInfo, pick_device
from lct.errors import UserError, cli_main
from lct.faults import Faults
from lct.files import atomic_file, output_dir_problem
from lct.hf_text import HFTextEncoder
from lct.hub import resolve_pretrained
from lct.image_shards import Decoding, make_loader, shard_name
from lct.latent_output import check_job, check_output
from lct.latent_writer import ShardWriter, fp16_problem, job_digest
from lct.latents import (FP16_MAX, JOB, MANIFEST, TEXT_NULL, TEXT_NULL_POOLED, encode_latent_sample,
                         merge_manifest, read_shard_record, record_paths, write_json_atomic)
from lct.shards import FileLock
from lct.text import RANDOM, TOWER_DIR, TextEncoder, check_text_source, is_random
from lct.tool_config import EncodeLatentsConfig, cli_config
from lct.vae import (check_vae_source, downsample_factor, encode_posterior, latent_shape, load_vae, to_unit_range,
                     vae_source, vae_summary)

DESCRIPTION = (
    "Encode img2dataset-style webdataset shards ({key}.jpg|png|webp + .txt/.json captions) into latent shards: "
    "fp16 VAE posterior mean/std (+ flipped with --flip), open_clip token ids of up to --max-captions captions "
    "(+ fp16 token states with --text-states), one output shard per input shard with the same keys, and "
    "manifest.json with float64 latent statistics. One process per GPU (RANK/WORLD_SIZE or SLURM_PROCID/"
    "SLURM_NTASKS; rank r takes shards r, r+W, ...). Resumable: complete shards (records/<name>.json) are "
    "skipped, partial ones redone. Corrupt images and caption-less samples are skipped and counted; an input "
    "shard without any sample fails the job after the others (or is recorded with --skip-empty-shards). "
    "--text-pretrained random saves a seeded random text tower in OUTPUT/text_tower/. --buckets puts each image "
    "into the aspect-ratio bucket nearest to its own (PixArt's tables or a YAML list of [height, width]).")
PREPROCESS = ("RGB, center crop of the long edge, PIL bicubic resize, x/127.5-1 (lct.vae.preprocess_image); "
              "no EXIF rotation")
PREPROCESS_BUCKETS = ("RGB, the bucket of nearest aspect ratio, PIL bicubic resize to cover it, centre crop, x/127.5-1 "
                      "(lct.buckets.resize_crop); no EXIF rotation")


# ----------------------------------------------------------------------------------------------
# Encoding (main process); reading is lct.image_shards (DataLoader workers), writing lct.latent_writer
# ----------------------------------------------------------------------------------------------


class Encoder:
    """VAE (fp32, or half with an fp32 fallback per batch) and the text tower on one device."""

    def __init__(self, vae, text, device, precision: str):
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
        return encode_posterior(self.vae if (fp32 or self.half is None) else self.half, images)

    def text_states(self, tokens: list, chunk: int = 256):
        """(states [N,L,D], pooled [N,P] or None) fp32 of the captions' tokens [K_i, L] of a batch.
        Transformers towers (`trimmed`): states [N,n,D] up to the batch's longest caption (the
        later positions are padding), pooled None where the tower has none (T5)."""
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
    mask = torch.as_tensor(text.mask(torch.as_tensor(tokens).long()))
    return torch.where(mask.any(-1), mask.shape[-1] - mask.flip(-1).int().argmax(-1), torch.zeros_like(mask[:, 0], dtype=torch.long))


WHAT = {"mean": "the posterior mean", "std": "the posterior std", "states": "a text token state",
        "pooled": "a pooled text feature"}


def _to_host(enc: Encoder, tensors: dict) -> dict:
    """Queue the device-to-host copies: fp16 values and per-row non-finite / out-of-range flags."""
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
        if "bucket" in item:
            extra.update(bucket=w.buckets.names[item["bucket"]], crop=item["crops"][i])
        members = encode_latent_sample(key, mean=h["mean"][i], std=h["std"][i], tokens=item["tokens"][i],
                                       captions=item["captions"][i], meta=item["meta"][i], **extra)
        w.add(members, h["mean"][i], h["std"][i], item["pos"][i], item.get("bucket"), extra.get("crop"))
    return b


# ----------------------------------------------------------------------------------------------
# The job
# ----------------------------------------------------------------------------------------------


def job_options(cfg: EncodeLatentsConfig, table: BucketTable | None = None) -> dict:
    """The settings a rerun must repeat (checked before any model is loaded)."""
    hf = cfg.text_kind != "open_clip"
    random = not hf and is_random(cfg.text_pretrained)
    opts = {"vae": vae_source(cfg.vae), "resolution": table.base if table else cfg.resolution, "flip": cfg.flip,
            "precision": cfg.precision, "text_model": cfg.text_model,
            "text_pretrained": None if hf else RANDOM if random else cfg.text_pretrained,
            "seed": cfg.seed if random else None, "text_states": cfg.text_states,
            "max_captions": max_captions(cfg)}
    if hf:  # a transformers tower (T5, CLIP): lct.hf_text
        opts.update(text_kind=cfg.text_kind, text_tokenizer=cfg.text_tokenizer,
                    text_max_length=cfg.text_max_length, text_dtype=cfg.text_dtype)
    if table is not None:  # square data keeps its job.json byte for byte
        opts["buckets"] = {"source": table.source, "sizes": [[b.height, b.width] for b in table.buckets]}
    return opts


def bucket_table(cfg: EncodeLatentsConfig) -> BucketTable | None:
    """--buckets read and checked (before any work); an explicit --resolution must be its base."""
    if not cfg.buckets:
        return None
    table = load_table(cfg.buckets)
    if "resolution" in cfg.model_fields_set and cfg.resolution != table.base:
        raise UserError(f"--resolution {cfg.resolution} and --buckets {cfg.buckets} (base resolution {table.base}) "
                        "disagree: with --buckets the table sets the sizes; drop --resolution")
    return table


def max_captions(cfg: EncodeLatentsConfig) -> int:
    """--max-captions, default 5 for open_clip and 1 for transformers towers (T5-XXL states are
    ~8 kB per token in fp16: README, "Tune a public diffusion model")."""
    return cfg.max_captions or (5 if cfg.text_kind == "open_clip" else 1)


def log(rank: int, msg: str) -> None:
    prefix = f"encode_latents[{rank}]" if rank else "encode_latents"
    print(f"{prefix}: {msg}", file=sys.stderr, flush=True)


def fmt_skips(skipped: dict) -> str:
    return ", ".join(f"{k} {v}" for k, v in sorted(skipped.items())) or "none"


def merge(cfg: EncodeLatentsConfig, out: Path, names: list[str], rank: int, required: bool) -> dict | None:
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
    if manifest.get("buckets"):
        b = manifest["buckets"]
        used = sum(1 for v in b["counts"].values() if v)
        top = b["most_common"]
        extra += (f"; buckets: {used} of {len(b['table'])} used, most common {top} "
                  f"({b['counts'][top] / max(manifest['num_samples'], 1):.0%}), crop mean {b['crop']['mean']:.1%}, "
                  f"max {b['crop']['max']:.1%}")
    log(rank, f"wrote {out / MANIFEST}: {manifest['num_samples']} samples in {manifest['num_shards']} shards, "
              f"skipped: {fmt_skips(manifest['skipped'])}, {manifest['output_bytes'] / 1e6:.1f} MB{extra}")
    return manifest


JOB_LOCK = "job.lock"


@dataclass
class Job:
    """One rank's encoding job: what `prepare` resolved (read-only afterwards) and what `encode`
    has done so far (the progress fields), read by `finish`."""

    cfg: EncodeLatentsConfig
    rank: int
    world: int
    out: Path
    urls: list[str]
    names: list[str]
    todo: list[int]                 # input shard indices this rank encodes (not yet recorded)
    enc: Encoder
    shape: tuple[int, int, int]     # latent shape (bucketed data: the base bucket's)
    table: BucketTable | None       # --buckets
    job_id: str
    faults: Faults
    writers: dict[int, ShardWriter] = field(default_factory=dict)
    ignored: set[int] = field(default_factory=set)   # shards another process holds (or completed meanwhile)
    busy: list[str] = field(default_factory=list)
    done_recs: list[dict] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    empty: list[str] = field(default_factory=list)
    images: int = 0
    finished: int = 0
    finished_images: int = 0
    pending: dict | None = None     # the launched batch not yet written
    t0: float = field(default_factory=time.time)
    t_first: tuple[float, int] | None = None  # (time, images) after the first batch: steady rate without start-up
    bar: tqdm | None = None

    def writer_for(self, idx: int) -> ShardWriter | None:
        """The shard's writer, made once its lock is ours; None when another process has it."""
        if idx in self.ignored:
            return None
        if idx not in self.writers:
            name = self.names[idx]
            lock = FileLock(record_paths(self.out, name)[0].with_suffix(".lock"))
            if not lock.acquire():
                self.ignored.add(idx)
                self.busy.append(f"{name} ({lock.describe()})")
                log(self.rank, f"shard {name} is being encoded by {lock.describe()}; left to it")
                return None
            if read_shard_record(self.out, name) is not None:  # completed while we waited for it
                lock.release(remove=True)  # its writer removed the file; our acquire made it again
                self.ignored.add(idx)
                return None
            self.writers[idx] = ShardWriter(self.out, name, self.urls[idx], self.shape, self.job_id, lock,
                                            self.rank, self.world, self.table)
        return self.writers[idx]

    def drain(self) -> None:
        """Check and write the batch in flight (the next one is already queued on the device)."""
        if self.pending is not None:
            n = finish_batch(self.enc, self.pending)
            self.pending = None
            self.images += n
            self.bar.update(n)
            if self.t_first is None:
                self.t_first = (time.time(), self.images)

    def close_shard(self, idx: int, item: dict) -> None:
        """A shard's end marker: commit (or abort) its writer, count it, update the ETA."""
        self.drain()
        w = self.writers.pop(idx)
        url, name = self.urls[idx], self.names[idx]
        if item["errors"]:
            w.abort()
            self.failed.append(f"{name} ({item['errors'][0]})")
            log(self.rank, f"input shard {url} could not be read to its end: {item['errors'][0]}")
            return
        rec = w.commit(item["skipped"], item["seen"], self.cfg.skip_empty_shards)
        if rec is None or rec.get("empty"):
            self.empty.append(name)
            log(self.rank, f"input shard {url} yielded no sample (read {item['seen']}, skipped: "
                           f"{fmt_skips(item['skipped'])})" + ("; recorded as empty" if rec else ""))
        if rec is not None:
            self.done_recs.append(rec)
        self.finished += 1
        self.finished_images += w.count
        own = len(self.todo) - len(self.ignored)
        if self.finished < own:  # ETA: images per finished shard so far, times this process's shards
            self.bar.total = max(int(self.finished_images / self.finished * own), self.images)
            self.bar.refresh()


def inputs(cfg: EncodeLatentsConfig) -> tuple[Path, list[str], list[str]]:
    """(--output, input shard URLs, their output names), refused before any work: no shard, two
    shards with one output name, an --output that is a file or holds what this tool did not write."""
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
    return out, urls, names


def load_text(cfg: EncodeLatentsConfig, device: torch.device):
    """The text tower (None for a random open_clip tower: made under the job lock in `prepare`)."""
    if cfg.text_kind != "open_clip":
        text = HFTextEncoder.load(cfg.text_model, tokenizer=cfg.text_tokenizer, max_length=cfg.text_max_length,
                                  device=device, dtype=cfg.text_dtype, key="--text-model",
                                  kind="sd3" if cfg.text_kind == "sd3" else None)  # sd3: three towers, one folder
        if text.kind != cfg.text_kind:
            raise UserError(f"--text-model {cfg.text_model} is a {text.kind} tower, not --text-kind {cfg.text_kind}")
        return text
    return None if is_random(cfg.text_pretrained) else TextEncoder.load(cfg.text_model, cfg.text_pretrained, device)


def prepare(cfg: EncodeLatentsConfig, info: DistInfo, out: Path, urls: list[str], names: list[str],
            table: BucketTable | None) -> Job:
    """Settings checked against an earlier job's (before loading anything), models loaded,
    job.json (and a random text tower) made under the job lock, this rank's shards listed."""
    rank = info.rank
    say = lambda msg: log(rank, msg)
    out.mkdir(parents=True, exist_ok=True)
    options = job_options(cfg, table)
    job_lock = FileLock(out / JOB_LOCK)  # held while job.json (and a random text tower) is checked or made
    with job_lock:
        check_job(out, None, options, say)  # other settings: refuse before loading anything
    hf = cfg.text_kind != "open_clip"
    check_vae_source(cfg.vae)  # missing weights: fail before the slow imports
    if hf:
        resolve_pretrained(cfg.text_model, key="--text-model", subfolders=("", "text_encoder"), what="text encoder")
    else:
        check_text_source(cfg.text_model, cfg.text_pretrained)
    device = pick_device(cfg.device, info.local_rank)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    vae = load_vae(cfg.vae, device, torch.float32)
    if table is not None:
        table.check_divisible(downsample_factor(vae), "the VAE's downsampling factor")
        base = table.buckets[table.base_index]
        shape = (int(vae.config.latent_channels), base.height // downsample_factor(vae),
                 base.width // downsample_factor(vae))
    else:
        shape = latent_shape(vae, cfg.resolution)
    text = load_text(cfg, device)
    with job_lock:
        old = check_job(out, None, options, say)
        if text is None:  # a random tower, made once per job under the lock; one no job.json names is stale
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
            if hasattr(text, "null_pooled"):  # SD3's towers: the pooled vector of "" too (SPEC 15.6)
                with atomic_file(out / TEXT_NULL_POOLED) as f:
                    np.save(f, text.null_pooled().numpy().astype(np.float32), allow_pickle=False)
        header = {"created_by": "data_prep/encode_latents.py", "input": cfg.input, "resolution": options["resolution"],
                  "latent_shape": list(shape), "dtype": "float16", "flip": cfg.flip,
                  "preprocess": PREPROCESS_BUCKETS if table else PREPROCESS,
                  "vae": {**vae_summary(vae, cfg.vae), "precision": cfg.precision},
                  "text": trec, "options": options}
        if table is not None:
            header["buckets"] = table.record(shape[0], downsample_factor(vae))
        if check_job(out, header, options, say) is None:
            write_json_atomic(out / JOB, header)

    mine = [i for i in range(len(urls)) if i % info.world_size == rank]
    todo = [i for i in mine if read_shard_record(out, names[i]) is None]
    what = (f"{len(table)} aspect-ratio buckets of {table.source}, base {list(shape)}" if table
            else f"latents {list(shape)}")
    log(rank, f"{len(urls)} input shards, world {info.world_size}: {len(mine)} for this rank, "
              f"{len(mine) - len(todo)} already complete, {len(todo)} to encode on {device} "
              f"(VAE {cfg.precision}, {what})")
    return Job(cfg=cfg, rank=rank, world=info.world_size, out=out, urls=urls, names=names, todo=todo,
               enc=Encoder(vae, text, device, cfg.precision), shape=tuple(shape), table=table,
               job_id=job_digest(header), faults=Faults())


def encode(job: Job) -> None:
    """Encode and write this rank's shards: DataLoader workers decode whole shards while this
    process runs the VAE on one batch and writes the previous one."""
    cfg, enc = job.cfg, job.enc
    dec = Decoding(cfg.resolution, enc.text.tokenizer, max_captions(cfg), job.table)
    loader = make_loader([(i, job.urls[i]) for i in job.todo], dec, cfg.batch_size, cfg.num_workers,
                         enc.device.type == "cuda")
    job.t0 = time.time()
    job.bar = tqdm(total=None, unit="img", desc=f"encode rank {job.rank}", disable=job.rank != 0,
                   dynamic_ncols=True, mininterval=2.0, smoothing=0.05)
    try:
        for item in loader:
            idx = item["shard"]
            w = job.writer_for(idx)
            if w is None:
                continue
            if item["done"]:
                job.close_shard(idx, item)
                continue
            launched = launch_batch(enc, item, w, cfg.flip, cfg.text_states)
            job.drain()  # the previous batch is written while this one runs on the device
            job.pending = launched
            job.faults.mid_shard(len(job.done_recs), list(job.writers.values()))
        job.drain()
        job.bar.total = job.images
        job.bar.refresh()
    except BaseException:
        for w in job.writers.values():
            w.abort()
        raise
    finally:
        job.bar.close()


def finish(job: Job) -> dict:
    """Log what this rank did, merge the manifest (rank 0 after a barrier when a process group is
    running; otherwise whichever process finds every shard complete), then fail for empty or
    unreadable input shards. Returns a summary dict."""
    cfg, images, recs = job.cfg, job.images, job.done_recs
    t_end = time.time()
    dt = max(t_end - job.t0, 1e-9)
    steady = None
    if job.t_first is not None and images > job.t_first[1]:
        steady = (images - job.t_first[1]) / max(t_end - job.t_first[0], 1e-9)
    skipped: dict[str, int] = {}
    for r in recs:
        for k, v in r["skipped"].items():
            skipped[k] = skipped.get(k, 0) + v
    nbytes = sum(r["bytes"] for r in recs)
    tbytes = sum(r["text_state_bytes"] for r in recs)
    text_msg = (f", text states {tbytes / 1e6:.1f} MB ({tbytes / max(images, 1) / 1e3:.1f} kB/sample)"
                if cfg.text_states else "")
    fb = f", {job.enc.fallback_batches} batches re-encoded in fp32" if job.enc.fallback_batches else ""
    log(job.rank, f"{images} images in {len(recs)} shards, skipped: {fmt_skips(skipped)}, "
                  f"{images / dt:.1f} images/s, {nbytes / 1e6:.1f} MB written{text_msg}{fb}")
    if job.busy:
        log(job.rank, f"{len(job.busy)} shard(s) left to other processes: {', '.join(job.busy[:5])}; the process "
                      "that completes the last shard writes the manifest (a rerun redoes any that did not complete)")
    group = dist.group_world_size()  # no process group is needed; with one, rank 0 merges after the others
    dist.barrier(group)
    manifest = merge(cfg, job.out, job.names, job.rank, required=False) if group == 1 or job.rank == 0 else None
    problems = []
    if job.empty and not cfg.skip_empty_shards:
        problems.append(f"input shard(s) {', '.join(job.empty[:5])} yielded no sample and got no output shard; "
                        "fix or drop them, or pass --skip-empty-shards to record them as empty")
    if job.failed:
        problems.append(f"input shard(s) {', '.join(job.failed[:3])} could not be read to the end; fix them and "
                        "re-run (completed shards are kept)")
    if problems:
        raise UserError("; ".join(problems))
    return {"images": images, "seconds": dt, "images_per_s": images / dt, "steady_images_per_s": steady,
            "shards": len(recs), "left_to_others": job.busy,
            "skipped": skipped, "bytes": nbytes, "text_state_bytes": tbytes, "manifest": manifest,
            "fallback_batches": job.enc.fallback_batches,
            "record_paths": [str(record_paths(job.out, n)[0]) for n in job.names]}


def merge_only(cfg: EncodeLatentsConfig, out: Path, names: list[str], rank: int, table: BucketTable | None) -> dict:
    """--merge-only: the manifest from the records of a complete job (refused while one is missing)."""
    out.mkdir(parents=True, exist_ok=True)
    if check_job(out, None, job_options(cfg, table), lambda m: log(rank, m), replace=False) is None:
        raise UserError(f"{out}: no {JOB}; run without --merge-only first")
    return {"manifest": merge(cfg, out, names, rank, required=True), "images": 0}


def run(cfg: EncodeLatentsConfig) -> dict:
    """Encode this rank's shards, then merge if complete. Returns a summary dict."""
    info = DistInfo.from_env()
    table = bucket_table(cfg)
    out, urls, names = inputs(cfg)
    if cfg.merge_only:
        return merge_only(cfg, out, names, info.rank, table)
    job = prepare(cfg, info, out, urls, names, table)
    encode(job)
    return finish(job)


def main(argv: list[str] | None = None) -> int:
    cfg, _ = cli_config(EncodeLatentsConfig, argv, prog="encode_latents",
                        description=DESCRIPTION)
    run(cfg)
    return 0


def cli():
    cli_main(main)


if __name__ == "__main__":
    cli()
