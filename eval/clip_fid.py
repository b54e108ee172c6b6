"""Samples and metrics with a fixed protocol: FID, CLIP score and the `shapes` metric.

    python eval/clip_fid.py --checkpoint runs/lct_coco --steps 1 2 --fid-weights pt_inception.pth \\
        --ref-images 'data/coco/val2014/{00000..00008}.tar' --out eval_out/lct_coco
    python eval/clip_fid.py --checkpoint runs/lct_coco --steps 2 --tau 0.2 0.37 0.8 --guidance 1 1.5 \\
        --ref-stats coco2014val-256.npz --out eval_out/tau_sweep
    python eval/clip_fid.py --protocol custom --checkpoint runs/shapes --captions data/shapes/heldout/captions.jsonl \\
        --num-samples 1000 --steps 1 2 --metrics shapes --out eval_out/shapes
    torchrun --nproc_per_node 8 eval/clip_fid.py ...            # same samples and numbers, 8x faster
    python eval/clip_fid.py --make-captions --coco-annotations annotations/captions_val2014.json \\
        --out eval/captions/coco2014val-30k.jsonl             # the protocol's caption file + its sha256

Protocol `coco2014val-30k` (the default; `lct/protocols.py`): 30,000 MS-COCO val2014 images drawn
with numpy `default_rng(0)`, one of their captions each drawn with `default_rng(0)`, shipped as
`eval/captions/coco2014val-30k.jsonl` and checked against the sha256 the protocol pins; reference
statistics over all 40,504 val2014 images; real and generated images center-cropped on the long
edge and resized to 256 with the same rule (`lct.vae.preprocess_image_uint8`); FID with
torch-fidelity's FID Inception (weights from `--fid-weights`, the torch hub cache, or downloaded
when online); CLIP score with open_clip ViT-g-14 / laion2b_s34b_b88k as `100 * max(cos, 0)`.
Metric names carry the sample count: `fid30k`, `clip30k`, `fid10k` (`--num-samples 10000` takes the
first 10,000 pairs of the file, a uniform subsample since the file is in draw order). Any other
choice (captions, count, CLIP model) is allowed and recorded in `results.json` as a deviation
(`protocol.conforms: false`). `--protocol custom`: any caption file (`.txt`, one caption per line,
or `.jsonl` with a `caption` field, e.g. the shapes held-out `captions.jsonl`), the model's own
resolution.

Settings: every `--steps` value; for 2 steps every `--tau` value is its own setting (a tau sweep;
default: the model's tau); for k > 2 steps `--tau` gives the k - 1 intermediate sigmas; every
`--guidance` weight (1 = off). Per setting `OUT/<setting>/`: one PNG per sample (the model's
native resolution), `captions.jsonl` (file, caption, seed, index, steps, tau, guidance, nfe),
`grid.png` (the first 16) and, with FID, `fid_stats.npz` (the generated statistics). `OUT/results.json`
holds every metric with its sample count, setting, NFE, protocol, model names, weight hashes,
checkpoint (path, step, EMA), the caption file's sha256, and the eval throughput.

Reference statistics: `--ref-images` (tar shards as a brace pattern or glob, or a folder of
images) are computed once and cached as `.npz` keyed by a sha256 of the files' bytes and the
settings (resolution, preprocessing, FID weights): at `--ref-stats` when given with
`--ref-images`, else in `$LCT_CACHE_DIR` (default `~/.cache/lct`)`/fid_ref_stats/`. `--ref-stats`
alone loads them (its recorded resolution and FID weights must match this run's).

Missing weights: a metric whose weights are missing (FID Inception, CLIP) is written as
`{"skipped": true, "reason", "fix"}`; the run exits 0 when at least one metric ran, else 2. With
`HF_HUB_OFFLINE=1` or `LCT_OFFLINE=1` nothing is downloaded.

Sharding: with K ranks (torchrun, or RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT), the global sample
indices are cut into batches of `--batch-size` consecutive indices and rank r takes batches
r, r + K, r + 2K, ...; the noise is keyed per sample index and every sample is computed in the same
batch whatever K, so the PNGs are byte-identical to one process' and the gathered features and
scores (reordered by index) give the same numbers.
"""

if __name__ == "__main__" and __package__ in (None, ""):  # run as a file: repo root, not this folder, first on sys.path
    import sys, pathlib; sys.path[0] = str(pathlib.Path(__file__).resolve().parents[1])

import hashlib
import json
import os
import sys
import tarfile
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lct import dist
from lct.config import EvalConfig, cli_config
from lct.errors import UserError, cli_main
from lct.files import file_sha256, write_atomic, write_json

METRICS = ("fid", "clip", "shapes")
RESULTS_FORMAT = "lct-eval/1"
GRID_SIZE = 16
IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
FIX = {"fid": "set --fid-weights PATH (a local copy of torch-fidelity's weights-inception-2015-12-05-6726825d.pth)",
       "clip": "set --clip-pretrained PATH (a local open_clip checkpoint of --clip-model), or run online once",
       "fid_ref": "pass --ref-stats FILE.npz or --ref-images PATTERN (reference images: shards or a folder)"}


def log(rank: int, msg: str) -> None:
    if rank == 0:
        print(f"[eval] {msg}", flush=True)


def offline() -> bool:
    return any(os.environ.get(k, "").strip().lower() in ("1", "true", "yes", "on")
               for k in ("HF_HUB_OFFLINE", "LCT_OFFLINE"))


def skipped(reason: str, fix: str) -> dict:
    return {"skipped": True, "reason": reason, "fix": fix}


# --------------------------------------------------------------------------------------------
# Ranks
# --------------------------------------------------------------------------------------------


class Ranks:
    """This process' rank, world size and device, and the collectives eval needs (`lct.dist`;
    no-ops for one process)."""

    def __init__(self, device_name: str):
        info = dist.DistInfo.from_env()
        self.rank, self.world, self.local_rank = info.rank, info.world_size, info.local_rank
        self.device = dist.pick_device(device_name, info.local_rank)
        self.started = dist.init(info, self.device, timeout_minutes=60)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        dist.barrier(self.world)

    def objects(self, obj: Any) -> list:
        """Every rank's `obj`, in rank order (pickled; for small things)."""
        return dist.gather_objects(obj, self.world)

    def rows(self, indices: list[int], rows, width: int):
        """Rows [n_local, width] (float32) of the given global indices from every rank, as one
        float32 tensor [N, width] in increasing index order (on every rank)."""
        return dist.gather_rows(indices, rows, width, self.world, self.device)

    def close(self) -> None:
        if self.started:
            dist.close(barrier_first=False)


def my_batches(n: int, batch: int, rank: int, world: int) -> list[list[int]]:
    """Batches of consecutive global indices; rank r takes batches r, r + world, ... (the same
    batches whatever the world size, so the same floating-point computation per sample)."""
    starts = list(range(0, n, batch))[rank::world]
    return [list(range(s, min(s + batch, n))) for s in starts]


# --------------------------------------------------------------------------------------------
# Settings
# --------------------------------------------------------------------------------------------


@dataclass
class Setting:
    steps: int
    tau: list[float]
    guidance: float
    nfe: int = 0
    name: str = ""
    metrics: dict = field(default_factory=dict)
    throughput: dict = field(default_factory=dict)


def fmt_num(x: float) -> str:
    return f"{x:g}"


def build_settings(cfg: EvalConfig, default_taus) -> list[Setting]:
    from lct.samplers import nfe

    out: list[Setting] = []
    for steps in dict.fromkeys(cfg.steps):
        if steps < 1:
            raise UserError(f"--steps {steps}: sampling steps must be >= 1")
        if steps == 1:
            tau_sets = [[]]
        elif cfg.tau is None:
            tau_sets = [list(default_taus(steps))]
        elif steps == 2:
            tau_sets = [[t] for t in dict.fromkeys(cfg.tau)]
        else:
            if len(cfg.tau) != steps - 1:
                raise UserError(f"--steps {steps} needs {steps - 1} --tau values (intermediate sigmas, decreasing); "
                                f"got {cfg.tau} (a tau sweep is for --steps 2)")
            tau_sets = [list(cfg.tau)]
        for taus in tau_sets:
            if any(t <= 0 for t in taus) or any(b >= a for a, b in zip(taus, taus[1:])):
                raise UserError(f"--tau {taus}: taus must be positive and strictly decreasing")
            for g in dict.fromkeys(cfg.guidance):
                if g < 0:
                    raise UserError(f"--guidance {g}: must be >= 0 (1 = off)")
                name = f"steps{steps}" + (f"_tau{'-'.join(fmt_num(t) for t in taus)}" if taus else "") \
                    + f"_g{fmt_num(g)}"
                out.append(Setting(steps, [float(t) for t in taus], float(g), nfe(steps, g), name))
    return out


# --------------------------------------------------------------------------------------------
# Reference images and statistics
# --------------------------------------------------------------------------------------------


def expand_pattern(pattern: str) -> list[Path]:
    """Files of a brace pattern (`{00000..00008}.tar`), a glob, a folder (images, recursively)
    or one file."""
    import glob

    p = Path(pattern).expanduser()
    if p.is_dir():
        files = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_EXTS + (".tar",))
        tars = [f for f in files if f.suffix == ".tar"]
        return tars if tars and len(tars) == len(files) else [f for f in files if f.suffix != ".tar"]
    if "{" in pattern:
        import braceexpand

        names = list(braceexpand.braceexpand(pattern))
    elif any(c in pattern for c in "*?["):
        names = sorted(glob.glob(os.path.expanduser(pattern)))
    else:
        names = [pattern]
    files = [Path(n).expanduser() for n in names]
    missing = [str(f) for f in files if not f.is_file()]
    if missing or not files:
        raise UserError(f"--ref-images {pattern}: {len(missing)} of {len(files)} files not found "
                        f"(first: {missing[0] if missing else pattern}); give tar shards or a folder of images")
    return files


def list_ref_images(files: list[Path]) -> list[tuple[Path, str | None]]:
    """(file, tar member or None) of every reference image: one image per sample key in tars."""
    entries: list[tuple[Path, str | None]] = []
    for f in files:
        if f.suffix == ".tar":
            seen = set()
            with tarfile.open(f, "r:") as tar:
                for m in tar.getmembers():
                    if not m.isfile():
                        continue
                    base = m.name.rsplit("/", 1)[-1]
                    key = m.name[: len(m.name) - len(base)] + base.split(".", 1)[0]
                    if Path(base).suffix.lower() in IMAGE_EXTS and key not in seen:
                        seen.add(key)
                        entries.append((f, m.name))
        elif f.suffix.lower() in IMAGE_EXTS:
            entries.append((f, None))
    return entries


def open_ref_image(entry, tars: dict):
    from lct.vae import open_image

    f, member = entry
    if member is None:
        return open_image(f.read_bytes())
    if f not in tars:
        tars[f] = tarfile.open(f, "r:")
    return open_image(tars[f].extractfile(member).read())


def default_cache_dir() -> Path:
    base = os.environ.get("LCT_CACHE_DIR")
    if base:
        return Path(base).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "lct"


def ref_settings(resolution: int, fid_sha: str) -> dict:
    from lct.protocols import FID_MODEL, PREPROCESS

    return {"kind": "lct-fid-reference/1", "resolution": resolution, "preprocess": PREPROCESS,
            "features": FID_MODEL, "fid_weights_sha256": fid_sha}


def reference_stats(cfg: EvalConfig, ranks: Ranks, fid_model, fid_sha: str, resolution: int) -> tuple:
    """(FIDStats, record) of the reference: computed from --ref-images (cached) or loaded."""
    import torch
    from tqdm import tqdm

    from lct.metrics import FIDStats, fid_features, fingerprint, load_cached_stats
    from lct.vae import preprocess_image_uint8

    settings = ref_settings(resolution, fid_sha)
    if cfg.ref_images is None:
        path = Path(cfg.ref_stats)
        stats = FIDStats.load(path)  # UserError when missing or not stats
        rec = {"source": "ref_stats", "path": str(path.resolve()), "sha256": file_sha256(path), "n": stats.n,
               "meta": stats.meta, "cached": None}
        got = stats.meta.get("settings") if isinstance(stats.meta, dict) else None
        if got:
            for k in ("resolution", "fid_weights_sha256"):
                if got.get(k) != settings[k]:
                    raise UserError(f"--ref-stats {path}: computed with {k} = {got.get(k)!r}, this run uses "
                                    f"{settings[k]!r}; FID against it would be meaningless. Recompute with "
                                    "--ref-images (and the same --fid-weights)")
        if stats.mu.shape != (2048,):
            raise UserError(f"--ref-stats {path}: mu has shape {stats.mu.shape}, FID Inception features are 2048")
        return stats, rec
    files = expand_pattern(cfg.ref_images)
    fp = fingerprint(files, settings) if ranks.is_main else None
    fp = ranks.objects(fp)[0]
    meta = {"fingerprint": fp, "settings": settings}
    cache = Path(cfg.ref_stats) if cfg.ref_stats else default_cache_dir() / "fid_ref_stats" / f"ref-{resolution}-{fp[:20]}.npz"
    hit = load_cached_stats(cache, meta) if ranks.is_main else None
    hit_any = ranks.objects(hit is not None)[0]
    rec = {"source": "ref_images", "pattern": cfg.ref_images, "files": len(files), "path": str(cache.resolve()),
           "fingerprint": fp, "cached": bool(hit_any)}
    if hit_any:
        if ranks.is_main:  # only rank 0 needs the reference (it computes the distances)
            log(ranks.rank, f"reference statistics: cache hit {cache} ({hit.n} images, fingerprint {fp[:16]})")
            rec.update(n=hit.n, sha256=file_sha256(cache), meta=hit.meta)
        return hit, rec
    if ranks.is_main and cache.is_file():
        log(ranks.rank, f"reference statistics at {cache} were made from other images or settings: recomputing")
    entries = list_ref_images(files)
    if len(entries) < 2:
        raise UserError(f"--ref-images {cfg.ref_images}: {len(entries)} image(s) found; FID needs at least 2")
    log(ranks.rank, f"reference statistics: computing from {len(entries)} images in {len(files)} file(s) "
                    f"at {resolution}px (cached at {cache})")
    tars: dict = {}
    idx_all, feats, problem = [], [], None
    bar = tqdm(total=len(entries), desc="reference", unit="img", dynamic_ncols=True, disable=not ranks.is_main)
    try:
        for batch in my_batches(len(entries), cfg.batch_size, ranks.rank, ranks.world):
            try:
                x = torch.stack([preprocess_image_uint8(open_ref_image(entries[i], tars), resolution) for i in batch])
            except Exception as err:  # unreadable image: every rank must learn it before the gather
                problem = (f"--ref-images: could not read an image of {entries[batch[0]][0]} "
                           f"({type(err).__name__}: {str(err)[:200]})")
                break
            feats.append(fid_features(fid_model, x, batch_size=cfg.batch_size).float())
            idx_all += batch
            bar.update(min(len(batch) * ranks.world, bar.total - bar.n))
    finally:
        bar.close()
        for t in tars.values():
            t.close()
    problems = [p for p in ranks.objects(problem) if p]
    if problems:
        raise UserError(problems[0])
    allf = ranks.rows(idx_all, torch.cat(feats) if feats else None, 2048)
    stats = FIDStats.from_features(allf.double(), meta)
    if ranks.is_main:
        stats.save(cache)
        rec["sha256"] = file_sha256(cache)
    rec.update(n=stats.n, meta=stats.meta)
    ranks.barrier()
    return stats, rec


# --------------------------------------------------------------------------------------------
# Feature models
# --------------------------------------------------------------------------------------------


@contextmanager
def main_rank_first(ranks: Ranks):
    """Rank 0 runs the block first (downloads, caches), then the others."""
    if not ranks.is_main:
        ranks.barrier()
    try:
        yield
    finally:
        if ranks.is_main:
            ranks.barrier()


def fid_weights_file(cfg: EvalConfig, rank0: bool) -> Path:
    """The local FID Inception weights file: --fid-weights, the torch hub cache, or a download
    (rank 0). Raises UserError when there is none."""
    import torch

    from lct.metrics import FID_WEIGHTS_FILE

    if cfg.fid_weights:
        p = Path(cfg.fid_weights).expanduser()
        if not p.is_file():
            raise UserError(f"--fid-weights {p}: file not found")
        return p
    cached = Path(torch.hub.get_dir()) / "checkpoints" / FID_WEIGHTS_FILE
    if cached.is_file():
        return cached
    if offline():
        raise UserError(f"no --fid-weights given, none in the torch hub cache ({cached}), and downloads are off "
                        "(HF_HUB_OFFLINE/LCT_OFFLINE)")
    if rank0:
        from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3

        try:
            cached.parent.mkdir(parents=True, exist_ok=True)
            torch.hub.download_url_to_file(URL_INCEPTION_V3, str(cached), progress=True)
        except Exception as err:
            raise UserError(f"no --fid-weights given and the download of {URL_INCEPTION_V3} failed "
                            f"({type(err).__name__}: {str(err)[:200]})") from None
    if not cached.is_file():
        raise UserError(f"the FID Inception weights could not be downloaded to {cached}")
    return cached


def clip_weights_file(cfg: EvalConfig) -> Path:
    """The local open_clip checkpoint of --clip-model/--clip-pretrained (downloaded into the
    open_clip/HF cache when online). Raises UserError when there is none."""
    import open_clip

    pre = cfg.clip_pretrained
    if pre is None or str(pre).strip().lower() in ("", "none", "random"):
        raise UserError("--clip-pretrained is none: a CLIP score of a random model means nothing")
    if ":" not in cfg.clip_model and cfg.clip_model not in open_clip.list_models():
        raise UserError(f"--clip-model {cfg.clip_model}: unknown open_clip model")
    p = Path(str(pre)).expanduser()
    if p.is_file():
        return p
    pcfg = open_clip.get_pretrained_cfg(cfg.clip_model, pre)
    if not pcfg:
        if "/" in str(pre) or str(pre).endswith((".pt", ".pth", ".bin", ".safetensors")):
            raise UserError(f"--clip-pretrained {pre}: file not found")
        raise UserError(f"--clip-pretrained {pre}: not a tag of {cfg.clip_model} "
                        f"(tags: {', '.join(open_clip.list_pretrained_tags_by_model(cfg.clip_model)) or 'none'})")
    from open_clip import pretrained as ocp

    if offline() and pcfg.get("url") and not pcfg.get("hf_hub"):
        target = Path(os.path.expanduser("~/.cache/clip")) / os.path.basename(pcfg["url"].split("?")[0])
        if target.is_file():
            return target
        raise UserError(f"the weights of {cfg.clip_model}/{pre} are not cached and downloads are off")
    try:
        target = ocp.download_pretrained(pcfg)
    except Exception as err:
        raise UserError(f"the weights of {cfg.clip_model}/{pre} could not be found or downloaded "
                        f"({type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ''})") from None
    if not target or not Path(target).is_file():
        raise UserError(f"the weights of {cfg.clip_model}/{pre} could not be found or downloaded")
    return Path(target)


def setup_metrics(cfg: EvalConfig, ranks: Ranks, resolution: int, n: int, captions: list[str]) -> dict:
    """{metric: state} for the requested metrics; a state is {"ok": bool, "record": ..., ...}."""
    from lct.protocols import FID_MODEL
    from lct.shapes import parse_caption

    states: dict[str, dict] = {}
    wanted = list(dict.fromkeys(cfg.metrics))
    if "fid" in wanted:
        st: dict[str, Any] = {"ok": False}
        try:
            if n < 2:
                raise UserError(f"FID needs at least 2 samples, --num-samples is {n}")
            if cfg.ref_images is None and cfg.ref_stats is None:
                st["fix"] = FIX["fid_ref"]
                raise UserError("no reference statistics")
            with main_rank_first(ranks):
                err = None
                try:
                    path = fid_weights_file(cfg, ranks.is_main)
                except UserError as e:
                    err = e
            if err is not None:
                raise err
            from lct.metrics import load_fid_inception

            model = load_fid_inception(path, ranks.device)
            sha = file_sha256(path)
            st.update(model=model, record={"name": FID_MODEL, "weights": str(path.resolve()), "weights_sha256": sha})
            st["ref"], st["ref_record"] = reference_stats(cfg, ranks, model, sha, resolution)
            st["ok"] = True
        except UserError as err:
            st.update(reason=str(err), fix=st.get("fix", FIX["fid"]))
        states["fid"] = st
    if "clip" in wanted:
        st = {"ok": False}
        try:
            with main_rank_first(ranks):
                err = None
                try:
                    path = clip_weights_file(cfg)
                except UserError as e:
                    err = e
            if err is not None:
                raise err
            from lct.metrics import load_clip

            pre = str(cfg.clip_pretrained)
            model, tok, prep = load_clip(cfg.clip_model, pre if not Path(pre).expanduser().is_file() else str(path),
                                         ranks.device)
            label = f"{cfg.clip_model}/{cfg.clip_pretrained}"
            st.update(model=model, tokenizer=tok, preprocess=prep, ok=True,
                      record={"name": f"CLIP score, open_clip {label}, 100 * max(cos, 0) per image, mean",
                              "clip_model": cfg.clip_model, "clip_pretrained": cfg.clip_pretrained,
                              "weights": str(path.resolve()), "weights_sha256": file_sha256(path)})
        except UserError as err:
            st.update(reason=str(err), fix=FIX["clip"])
        states["clip"] = st
    if "shapes" in wanted:
        parsed = sum(all(v is not None for v in parse_caption(c)) for c in captions)
        if parsed == 0:
            states["shapes"] = {"ok": False, "reason": "no caption states a shapes colour and position (the shapes "
                                "metric is for lct's shapes data set)",
                                "fix": "use the held-out captions.jsonl of data_prep/make_shapes.py, or drop shapes "
                                       "from --metrics"}
        else:
            from lct.shapes import read_specs

            states["shapes"] = {"ok": True, "record": {"name": "lct.shapes.shapes_metric (colour, 3x3 position and "
                                                       "shape accuracy; no weights)", "weights": None,
                                                       "weights_sha256": None},
                                "specs": read_specs(cfg.captions, n) if cfg.captions else None}
    # A metric is used only when every rank could set it up.
    oks = ranks.objects({k: s["ok"] for k, s in states.items()})
    for k, s in states.items():
        if s["ok"] and not all(o[k] for o in oks):
            s.update(ok=False, reason="not available on every rank", fix=FIX.get(k, ""))
    return states


# --------------------------------------------------------------------------------------------
# Captions
# --------------------------------------------------------------------------------------------


def make_captions_main(argv: list[str]) -> int:
    import argparse

    from lct.protocols import CAPTIONS_DIR, captions_jsonl, draw_coco_captions, get_protocol

    p = argparse.ArgumentParser(prog="eval/clip_fid.py --make-captions",
                                description="Write a protocol's caption file from the COCO annotations.")
    p.add_argument("--make-captions", action="store_true", required=True)
    p.add_argument("--coco-annotations", required=True, help="MS-COCO captions_val2014.json")
    p.add_argument("--protocol", default="coco2014val-30k")
    p.add_argument("--num-samples", type=int, default=None, help="default: the protocol's (30000)")
    p.add_argument("--out", default=None, help="default: eval/captions/<protocol>.jsonl")
    args = p.parse_args(argv)
    proto = get_protocol(args.protocol)
    if proto.caption_seed is None:
        raise UserError(f"--protocol {proto.name} draws no captions from COCO")
    num = args.num_samples or proto.num_samples
    records = draw_coco_captions(args.coco_annotations, num, proto.caption_seed)
    data = captions_jsonl(records)
    out = Path(args.out) if args.out else CAPTIONS_DIR / (proto.captions_file or f"{proto.name}.jsonl")
    out.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(out, data)
    sha = hashlib.sha256(data).hexdigest()
    print(f"wrote {len(records)} (image_id, caption) pairs to {out}")
    print(f"sha256 {sha}")
    if num == proto.num_samples:
        if proto.captions_sha256 is None:
            print(f"pin it: set CAPTIONS_SHA256 = \"{sha}\" in lct/protocols.py")
        elif proto.captions_sha256 != sha:
            print(f"warning: the protocol pins {proto.captions_sha256}; these annotations give another file",
                  file=sys.stderr)
            return 1
        else:
            print("matches the sha256 the protocol pins")
    return 0


def load_captions(cfg: EvalConfig, proto) -> tuple[list[dict], dict, list[str]]:
    """(caption records used, caption record for results, deviations)."""
    from lct.protocols import read_captions

    deviations: list[str] = []
    path = Path(cfg.captions).expanduser() if cfg.captions else proto.captions_path()
    if path is None:
        raise UserError(f"--protocol {proto.name} has no caption file: pass --captions FILE (.txt or .jsonl)")
    if not path.is_file():
        if cfg.captions:
            raise UserError(f"--captions {path}: file not found")
        raise UserError(f"the caption file of protocol {proto.name} ({path}) is not there: generate it with "
                        "`python eval/clip_fid.py --make-captions --coco-annotations annotations/captions_val2014.json`"
                        " or pass --captions FILE (and --protocol custom for other captions)")
    sha = file_sha256(path)
    verified = None
    if proto.captions_file:
        if proto.captions_sha256 is None:
            deviations.append(f"the protocol pins no caption-file sha256 yet; used {path.name} with sha256 {sha}")
        elif sha != proto.captions_sha256:
            raise UserError(f"--captions {path}: sha256 {sha} is not the {proto.name} caption file's "
                            f"({proto.captions_sha256}); use the shipped eval/captions/{proto.captions_file}, or "
                            "--protocol custom to evaluate other captions")
        else:
            verified = True
    records = read_captions(path)
    n = cfg.num_samples or proto.num_samples or len(records)
    if n > len(records):
        raise UserError(f"--num-samples {n}: {path} holds only {len(records)} captions")
    if proto.num_samples is not None and n != proto.num_samples:
        deviations.append(f"{n} samples instead of the protocol's {proto.num_samples} (the first {n} of the file)")
    rec = {"path": str(path.resolve()), "sha256": sha, "pinned_sha256": proto.captions_sha256,
           "verified": verified, "num_in_file": len(records), "num_used": n}
    return records[:n], rec, deviations


# --------------------------------------------------------------------------------------------
# The evaluation
# --------------------------------------------------------------------------------------------


def checkpoint_record(gen, cfg: EvalConfig) -> dict:
    d = Path(gen.path)
    meta = gen.meta
    weights = {f.name: file_sha256(f) for f in gen.weight_files()}
    return {"path": str(Path(cfg.checkpoint).resolve()), "export_dir": str(d.resolve()), "step": meta.get("step"),
            "ema": meta.get("ema"), "arch": (meta.get("model") or {}).get("arch"),
            "cond": (meta.get("model") or {}).get("cond"), "weights_sha256": weights,
            "vae": (meta.get("vae") or {}).get("id") if not cfg.vae else cfg.vae,
            "text_model": (meta.get("text") or {}).get("model"),
            "text_weights_sha256": (meta.get("text") or {}).get("weights_sha256"),
            "method": meta.get("method")}


def to_metric_images(u8, gen_res: int, res: int):
    """uint8 [B,H,W,3] (numpy) -> uint8 [B,3,res,res] with the protocol's resize rule."""
    import numpy as np
    import torch
    from PIL import Image

    from lct.vae import preprocess_image_uint8

    if u8.shape[1] == res and u8.shape[2] == res:
        return torch.from_numpy(np.ascontiguousarray(u8)).permute(0, 3, 1, 2).contiguous()
    return torch.stack([preprocess_image_uint8(Image.fromarray(a), res) for a in u8])


def shapes_ceiling(specs: list, captions: list[str], gen, cfg: EvalConfig, ranks: Ranks, size: int) -> dict:
    """The `shapes` accuracies of the captions' own ground-truth renders and of the generator's VAE
    reconstructions of them (what a perfect latent model could reach), sharded like the samples."""
    import numpy as np
    import torch

    from lct.grids import to_uint8
    from lct.shapes import SCORE_FIELDS, render, score_image, summarize_scores
    from lct.vae import decode, encode_posterior

    rows: dict[str, list] = {"ground_truth": [], "vae_reconstruction": []}
    idx: list[int] = []
    for batch in my_batches(len(specs), cfg.batch_size, ranks.rank, ranks.world):
        gt = np.stack([np.asarray(render(specs[i], size)) for i in batch])
        x = torch.from_numpy(gt).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)
        rec = to_uint8(decode(gen.vae, encode_posterior(gen.vae, x.to(gen.device))[0]))
        for i, a, b in zip(batch, gt, rec):
            rows["ground_truth"].append(score_image(a, captions[i]))
            rows["vae_reconstruction"].append(score_image(b, captions[i]))
        idx += batch
    return {k: summarize_scores(ranks.rows(idx, torch.tensor(v, dtype=torch.float64) if v else None,
                                           len(SCORE_FIELDS)).double().numpy()) for k, v in rows.items()}


def run_setting(s: Setting, cfg: EvalConfig, ranks: Ranks, gen, states: dict, records: list[dict],
                out: Path, gen_res: int, res: int, common: dict) -> None:
    import numpy as np
    import torch
    from PIL import Image
    from tqdm import tqdm

    from lct.grids import caption_grid, save_png, to_uint8
    from lct.metrics import FIDStats, clip_score, fid_features
    from lct.protocols import metric_name
    from lct.shapes import SCORE_FIELDS, score_image

    n = len(records)
    d = out / s.name
    if ranks.is_main:
        d.mkdir(parents=True, exist_ok=True)
    ranks.barrier()
    caps_all = [r["caption"] for r in records]
    idx_done: list[int] = []
    fid_rows, clip_rows, shape_rows, grid = [], [], [], {}
    ranks.barrier()
    t0 = time.perf_counter()
    bar = tqdm(total=n, desc=s.name, unit="img", dynamic_ncols=True, disable=not ranks.is_main)
    for batch in my_batches(n, cfg.batch_size, ranks.rank, ranks.world):
        caps = [caps_all[i] for i in batch]
        u8 = to_uint8(gen.images(caps, batch, cfg.seed, s.steps, s.tau, s.guidance))
        for i, a in zip(batch, u8):
            Image.fromarray(a).save(d / f"{i:06d}.png")
            if i < GRID_SIZE:
                grid[i] = a
        if states.get("fid", {}).get("ok") or states.get("clip", {}).get("ok"):
            x = to_metric_images(u8, gen_res, res)
            if states.get("fid", {}).get("ok"):
                fid_rows.append(fid_features(states["fid"]["model"], x, batch_size=cfg.batch_size).float())
            if states.get("clip", {}).get("ok"):
                c = states["clip"]
                r = clip_score(x, caps, c["model"], c["tokenizer"], c["preprocess"], batch_size=cfg.batch_size)
                clip_rows.append(torch.as_tensor(np.asarray(r["per_image"], dtype=np.float64)).reshape(-1, 1))
        if states.get("shapes", {}).get("ok"):
            shape_rows += [score_image(a, c) for a, c in zip(u8, caps)]
        idx_done += batch
        bar.update(min(len(batch) * ranks.world, bar.total - bar.n))
    bar.close()

    # Gather per-sample features and scores in global index order; rank 0 reduces and writes.
    feats = scores = rows = None
    if states.get("fid", {}).get("ok"):
        feats = ranks.rows(idx_done, torch.cat(fid_rows) if fid_rows else None, 2048).double()
    if states.get("clip", {}).get("ok"):
        scores = ranks.rows(idx_done, torch.cat(clip_rows) if clip_rows else None, 1).double().reshape(-1)
    if states.get("shapes", {}).get("ok"):
        rows = ranks.rows(idx_done, torch.tensor(shape_rows, dtype=torch.float64) if shape_rows else None,
                          len(SCORE_FIELDS))
    grids = ranks.objects(grid)
    ranks.barrier()
    # Throughput: sampling, decoding, PNG writing, features and gathering; not the final reductions
    # (covariance, Frechet distance), a fixed cost per setting.
    seconds = time.perf_counter() - t0
    per_metric: dict[str, dict] = {}
    base = {"n": n, "setting": s.name, "steps": s.steps, "tau": s.tau, "guidance": s.guidance, "nfe": s.nfe,
            **common}
    if feats is not None:
        st = states["fid"]
        value = None
        if ranks.is_main:  # the reference lives on rank 0
            gstats = FIDStats.from_features(feats, {"kind": "lct-fid-generated/1", "setting": s.name,
                                                    "resolution": res, "n": n})
            gstats.save(d / "fid_stats.npz")
            value = gstats.distance(st["ref"])
        per_metric[metric_name("fid", n)] = {"metric": "fid", "value": value, **base, "model": st["record"],
                                             "reference": {k: v for k, v in st["ref_record"].items() if k != "meta"},
                                             "generated_stats": str((d / "fid_stats.npz").resolve())}
    if scores is not None:
        st = states["clip"]
        per_metric[metric_name("clip", n)] = {
            "metric": "clip", "value": float(scores.mean()), "std": float(scores.std()) if n > 1 else 0.0,
            "label": f"CLIP score ({st['record']['clip_model']}/{st['record']['clip_pretrained']}, 100*max(cos,0))",
            **base, "model": st["record"]}
    if rows is not None:
        from lct.shapes import summarize_scores

        m = summarize_scores(rows.double().numpy())
        per_metric[metric_name("shapes", n)] = {
            "metric": "shapes", "value": m["both_acc"], **m, "chance_both": m["chance_colour"] * m["chance_position"],
            "n_scored": m["n"], **base, "ceiling": states["shapes"].get("ceiling"), "model": states["shapes"]["record"]}
    for k, st in states.items():
        if not st["ok"]:
            per_metric[k] = skipped(st["reason"], st["fix"])
    s.metrics = per_metric
    s.throughput = {"samples_per_s": n / seconds if seconds > 0 else None, "seconds": seconds, "samples": n,
                    "world_size": ranks.world, "device": str(ranks.device),
                    "includes": "sampling, VAE decode, PNG writing, metric features and gathering"}
    if ranks.is_main:
        tiles = {k: v for g in grids for k, v in g.items()}
        order = sorted(tiles)
        lines = []
        for r_i, rec in enumerate(records):
            row = {"file": f"{r_i:06d}.png", "caption": rec["caption"], "seed": cfg.seed, "index": r_i,
                   "steps": s.steps, "tau": s.tau, "guidance": s.guidance, "nfe": s.nfe}
            for k in ("image_id", "key"):
                if k in rec:
                    row[k] = rec[k]
            lines.append(json.dumps(row, ensure_ascii=False) + "\n")
        write_atomic(d / "captions.jsonl", "".join(lines))
        if order:
            save_png(caption_grid([tiles[i] for i in order], [caps_all[i] for i in order],
                                  title=f"{s.steps}-step, tau {s.tau}, guidance {fmt_num(s.guidance)}, seed {cfg.seed}"),
                     d / "grid.png")


def summary_line(s: Setting) -> str:
    parts = []
    for name, m in s.metrics.items():
        if m.get("skipped"):
            parts.append(f"{name}: skipped")
        elif m["metric"] == "shapes":
            parts.append(f"{name}: colour {m['colour_acc']:.3f} (chance {m['chance_colour']:.3f}), position "
                         f"{m['position_acc']:.3f} (chance {m['chance_position']:.3f}), shape {m['shape_acc']:.3f} "
                         f"(chance {m['chance_shape']:.3f}), all three {m['all_acc']:.3f}")
            for who, c in (m.get("ceiling") or {}).items():
                parts.append(f"{who.replace('_', ' ')}: colour {c['colour_acc']:.3f}, position {c['position_acc']:.3f}, "
                             f"shape {c['shape_acc']:.3f}")
        elif m["metric"] == "clip":
            parts.append(f"{name} {m['value']:.3f} [{m['model']['clip_model']}/{m['model']['clip_pretrained']}]")
        else:
            parts.append(f"{name} {m['value']:.4f}")
    tp = s.throughput.get("samples_per_s")
    return f"{s.name} (NFE {s.nfe}): " + "; ".join(parts) + (f" | {tp:.2f} samples/s" if tp else "")


def evaluate(cfg: EvalConfig, argv: list[str]) -> int:
    import torch

    from lct.protocols import get_protocol
    from lct.vae import downsample_factor

    proto = get_protocol(cfg.protocol)
    unknown = [m for m in cfg.metrics if m not in METRICS]
    if unknown or not cfg.metrics:
        raise UserError(f"--metrics {','.join(cfg.metrics)}: unknown {unknown} (known: {', '.join(METRICS)})")
    records, cap_rec, deviations = load_captions(cfg, proto)
    n = len(records)
    if "clip" in cfg.metrics and (cfg.clip_model, cfg.clip_pretrained) != (proto.clip_model, proto.clip_pretrained):
        deviations.append(f"CLIP model {cfg.clip_model}/{cfg.clip_pretrained} instead of "
                          f"{proto.clip_model}/{proto.clip_pretrained}")
    ranks = Ranks(cfg.device)
    try:
        torch.manual_seed(cfg.seed)
        out = Path(cfg.out)
        if ranks.is_main:
            out.mkdir(parents=True, exist_ok=True)
        from lct.sample import Generator

        gen = Generator(cfg.checkpoint, ranks.device, cfg.ema, cfg.vae, cfg.text_pretrained)
        settings = build_settings(cfg, gen.default_taus)
        gen_res = int(gen.latent_shape[-1]) * downsample_factor(gen.vae)
        res = proto.resolution or gen_res
        if proto.resolution and gen_res != proto.resolution:
            log(ranks.rank, f"generated images are {gen_res}px: resized to the protocol's {res}px for the metrics "
                            "(center crop + bicubic, as the reference images)")
        log(ranks.rank, f"protocol {proto.name}: {n} samples, {len(settings)} setting(s), metrics "
                        f"{','.join(cfg.metrics)}, {ranks.world} rank(s) on {ranks.device}")
        states = setup_metrics(cfg, ranks, res, n, [r["caption"] for r in records])
        ckpt = checkpoint_record(gen, cfg)
        ref_rec = states.get("fid", {}).get("ref_record")
        if ref_rec and proto.ref_images and ref_rec.get("n") != proto.ref_images:
            deviations.append(f"reference statistics over {ref_rec.get('n')} images instead of the protocol's "
                              f"{proto.ref_images} ({proto.ref_description})")
        if ref_rec and ref_rec.get("source") == "ref_stats" and not (ref_rec.get("meta") or {}).get("settings"):
            deviations.append("reference statistics of unknown provenance (no lct metadata in the .npz)")
        protocol_rec = {"name": proto.name, "conforms": not deviations, "deviations": deviations,
                        "definition": proto.to_dict()}
        common = {"protocol": proto.name, "protocol_conforms": not deviations, "checkpoint": ckpt["path"],
                  "checkpoint_step": ckpt["step"], "checkpoint_ema": ckpt["ema"], "captions_sha256": cap_rec["sha256"],
                  "seed": cfg.seed, "resolution": res}
        result: dict[str, Any] = {
            "format": RESULTS_FORMAT, "command": ["eval/clip_fid.py", *argv],
            "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "protocol": protocol_rec, "checkpoint": ckpt,
            "captions": cap_rec, "num_samples": n, "seed": cfg.seed,
            "resolution": {"generated": gen_res, "metrics": res, "resized": gen_res != res,
                           "rule": "center crop of the long edge + PIL bicubic (lct.vae.preprocess_image_uint8)"},
            "world_size": ranks.world, "device": str(ranks.device),
            "models": {k: (st["record"] if st["ok"] else skipped(st["reason"], st["fix"])) for k, st in states.items()},
            "reference": ({k: v for k, v in ref_rec.items()} if ref_rec else None),
            "skipped": {k: skipped(st["reason"], st["fix"]) for k, st in states.items() if not st["ok"]},
            "settings": [], "summary": {},
        }
        ran = [k for k, st in states.items() if st["ok"]]
        if not ran:
            if ranks.is_main:
                write_json(out / "results.json", result)
                reasons = "; ".join(f"{k}: {st['reason']} (fix: {st['fix']})" for k, st in states.items())
                print(f"error (clip_fid): no metric could run, nothing evaluated: {reasons}", file=sys.stderr, flush=True)
            return 2
        for k in result["skipped"]:
            log(ranks.rank, f"{k}: skipped: {states[k]['reason']} (fix: {states[k]['fix']})")
        if states.get("shapes", {}).get("ok") and states["shapes"]["specs"]:
            states["shapes"]["ceiling"] = result["shapes_ceiling"] = shapes_ceiling(
                states["shapes"]["specs"], [r["caption"] for r in records], gen, cfg, ranks, gen_res)
        for s in settings:
            run_setting(s, cfg, ranks, gen, states, records, out, gen_res, res, common)
            result["settings"].append({"name": s.name, "steps": s.steps, "tau": s.tau, "guidance": s.guidance,
                                       "nfe": s.nfe, "dir": str((out / s.name).resolve()), "metrics": s.metrics,
                                       "throughput": s.throughput})
            result["summary"][s.name] = {k: (None if m.get("skipped") else m["value"]) for k, m in s.metrics.items()}
            if ranks.is_main:
                log(ranks.rank, summary_line(s))
                write_json(out / "results.json", result)  # partial results survive an interruption
        if ranks.is_main:
            tot = sum(s.throughput["seconds"] for s in settings)
            result["throughput"] = {"samples_per_s": n * len(settings) / tot if tot > 0 else None, "seconds": tot,
                                    "samples": n * len(settings), "world_size": ranks.world,
                                    "includes": "sampling, VAE decode, PNG writing, metric features and gathering"}
            write_json(out / "results.json", result)
            log(ranks.rank, f"eval throughput {result['throughput']['samples_per_s']:.2f} samples/s "
                            f"({ranks.world} rank(s)); results in {out / 'results.json'}")
        ranks.barrier()
        return 0
    finally:
        ranks.close()


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--make-captions" in argv:
        return make_captions_main(argv)

    def extra(p):
        p.add_argument("--make-captions", action="store_true",
                       help="write the protocol's caption file instead: --make-captions --coco-annotations "
                            "captions_val2014.json [--out FILE.jsonl] (prints its sha256)")
        p.add_argument("--coco-annotations", default=None, help="with --make-captions: MS-COCO captions_val2014.json")

    cfg, _ = cli_config(EvalConfig, argv, prog="eval/clip_fid.py",
                        description=__doc__.split("\n\n")[0], extra=extra)
    return evaluate(cfg, argv)


def cli() -> None:
    cli_main(main)


if __name__ == "__main__":
    cli()
