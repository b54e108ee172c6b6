"""Eval's metrics: the `Metric` protocol eval/clip_fid.py (and, next, the trainer's in-training
eval) runs every metric through, the built-in metrics (FID, CLIP score, shapes, precision/recall/
density/coverage), user metrics (`--metric module:Name`, `MetricContext`) and `setup_metrics`,
which builds what can run and names what cannot. The feature models and weight files under them:
`lct.features`; the evaluation protocol: README.

`import lct.metrics` loads neither torch-fidelity nor open_clip; the functions that need them do.
"""


from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, Sequence

import numpy as np
import torch
from PIL import Image

from lct import dist, rng
from lct.dist import DistInfo
from lct.errors import UserError
from lct.features import (FID_MODEL, FID_WEIGHTS_FILE, FIDStats, clip_score, clip_weights_file, fid_features,
                          fid_weights_file, list_ref_images, load_clip, load_fid_inception, rank0_first, ref_files,
                          ref_image_rows, reference_stats)
from lct.files import file_sha256
from lct.grids import to_uint8
from lct.shapes import SCORE_FIELDS, parse_caption, read_specs, render, score_image, summarize_scores
from lct.vae import decode, downsample_factor, encode_posterior, preprocess_image_uint8


FIX = {"fid": f"set --fid-weights PATH (a local copy of torch-fidelity's {FID_WEIGHTS_FILE}, "
              "or pytorch-fid's pt_inception-2015-12-05-6726825d.pth: the same file)",
       "clip": "set --clip-pretrained PATH (a local open_clip checkpoint of --clip-model), or run online once",
       "fid_ref": "pass --ref-stats FILE.npz or --ref-images PATTERN (reference images: shards or a folder)",
       "shapes": "use the held-out captions.jsonl of data_prep/make_shapes.py, or drop shapes from --metrics",
       "prdc": "pass --ref-images PATTERN (real images of the same kind, e.g. the held-out shards)",
       "user": "see the metric's documentation (its --metric-arg options)"}


class Unavailable(UserError):
    """A metric that cannot run here (missing weights or reference): reported as skipped with `fix`."""

    def __init__(self, message: str, fix: str):
        super().__init__(message)
        self.fix = fix


# --------------------------------------------------------------------------------------------
# The metric protocol of eval/clip_fid.py
# --------------------------------------------------------------------------------------------


class Metric(Protocol):
    """A metric of eval/clip_fid.py: per-sample rows (gathered over the ranks in sample order),
    then one result per setting.

    `rows(images, metric_images, captions)`: `images` uint8 [B,H,W,3] at the model's resolution,
    `metric_images` uint8 [B,3,R,R] at the protocol's; returns [B, width]. `result(rows, out_dir,
    main)`: the metric's dictionary from all N rows (index order; rank 0 has `main`); `line(key, m)`
    its part of the console summary."""

    name: str
    width: int
    record: dict

    def rows(self, images: np.ndarray, metric_images: torch.Tensor, captions: list[str]) -> torch.Tensor: ...

    def result(self, rows: torch.Tensor, out_dir: Path, main: bool) -> dict: ...

    def line(self, key: str, m: dict) -> str: ...


@dataclass
class FID:
    model: torch.nn.Module
    ref: FIDStats
    ref_record: dict
    record: dict
    batch_size: int
    resolution: int
    name: str = "fid"
    width: int = 2048

    def rows(self, images, metric_images, captions):
        return fid_features(self.model, metric_images, batch_size=self.batch_size).float()

    def result(self, rows, out_dir, main):
        value = None
        path = out_dir / "fid_stats.npz"
        if main:  # the reference lives on rank 0
            gen = FIDStats.from_features(rows.double(), {"kind": "lct-fid-generated/1", "setting": out_dir.name,
                                                         "resolution": self.resolution, "n": int(rows.shape[0])})
            gen.save(path)
            value = gen.distance(self.ref)
        return {"metric": "fid", "value": value, "model": self.record,
                "reference": {k: v for k, v in self.ref_record.items() if k != "meta"},
                "generated_stats": str(path.resolve())}

    def line(self, key, m):
        return f"{key} {m['value']:.4f}"


@dataclass
class CLIPScore:
    model: torch.nn.Module
    tokenizer: Any
    preprocess: Any
    record: dict
    batch_size: int
    name: str = "clip"
    width: int = 1

    def rows(self, images, metric_images, captions):
        r = clip_score(metric_images, captions, self.model, self.tokenizer, self.preprocess,
                       batch_size=self.batch_size)
        return torch.as_tensor(np.asarray(r["per_image"], dtype=np.float64)).reshape(-1, 1)

    def result(self, rows, out_dir, main):
        scores = rows.double().reshape(-1)
        label = f"{self.record['clip_model']}/{self.record['clip_pretrained']}"
        return {"metric": "clip", "value": float(scores.mean()),
                "std": float(scores.std()) if len(scores) > 1 else 0.0,
                "label": f"CLIP score ({label}, 100*max(cos,0))", "model": self.record}

    def line(self, key, m):
        return f"{key} {m['value']:.3f} [{m['model']['clip_model']}/{m['model']['clip_pretrained']}]"


@dataclass
class Shapes:
    record: dict
    ceiling: dict | None
    name: str = "shapes"
    width: int = len(SCORE_FIELDS)
    caption_accuracy: bool = True

    def rows(self, images, metric_images, captions):
        return torch.tensor([score_image(a, c) for a, c in zip(images, captions)], dtype=torch.float64)

    def result(self, rows, out_dir, main):
        m = summarize_scores(rows.double().numpy())
        n = int(rows.shape[0])
        return {"metric": "shapes", "value": m["both_acc"], **m, "n_scored": m["n"],
                "label": f"shapes accuracy over {m['n']} of {n} captions (the ones stating a colour and a position)",
                "chance_both": m["chance_colour"] * m["chance_position"], "ceiling": self.ceiling,
                "model": self.record}

    def line(self, key, m):
        parts = [f"{key} ({m['n_scored']} of {m['n']} captions scored): colour {m['colour_acc']:.3f} (chance "
                 f"{m['chance_colour']:.3f}), position {m['position_acc']:.3f} (chance {m['chance_position']:.3f}), "
                 f"shape {m['shape_acc']:.3f} (chance {m['chance_shape']:.3f}), all three {m['all_acc']:.3f}"]
        for who, c in (m.get("ceiling") or {}).items():
            parts.append(f"{who.replace('_', ' ')}: colour {c['colour_acc']:.3f}, position {c['position_acc']:.3f}, "
                         f"shape {c['shape_acc']:.3f}")
        return "; ".join(parts)


@dataclass
class PRDC:
    """Precision, recall, density and coverage of the samples against real reference images
    (`lct.prdc`: Kynkaanniemi et al. 2019, Naeem et al. 2020) in a seeded random-VGG16 feature
    space: the diversity figure reported beside every caption-accuracy figure."""

    embed: Any
    ref: torch.Tensor
    record: dict
    k: int = 5
    name: str = "prdc"
    width: int = 512

    def rows(self, images, metric_images, captions):
        return self.embed(metric_images).float()

    def result(self, rows, out_dir, main):
        from lct.prdc import CITATION, prdc

        m = prdc(self.ref, rows, self.k)
        return {"metric": "prdc", "value": m["coverage"], **m,
                "label": f"precision/recall ({CITATION}), k {self.k}, {self.ref.shape[0]} real images; "
                         f"value = coverage; spread = mean pairwise distance of the samples over the real images'",
                "model": self.record}

    def line(self, key, m):
        return (f"{key} [vs {m['n_real']} real]: precision {m['precision']:.3f}, recall {m['recall']:.3f}, "
                f"density {m['density']:.3f}, coverage {m['coverage']:.3f}, spread {m['spread']:.3f}")


def setup_prdc(cfg, info, device, resolution, captions, gen) -> PRDC:
    from lct.prdc import RandomVGG16

    k = getattr(cfg, "prdc_k", 5)
    if len(captions) <= k:
        raise Unavailable(f"precision/recall needs more than k = {k} samples, --num-samples is {len(captions)}",
                          FIX["prdc"])
    if cfg.ref_images is None:
        raise Unavailable("no reference images for precision/recall/coverage", FIX["prdc"])
    try:
        entries = list_ref_images(ref_files(cfg.ref_images))
    except UserError as err:
        raise Unavailable(str(err), FIX["prdc"]) from None
    if len(entries) <= k:
        raise Unavailable(f"--ref-images {cfg.ref_images}: {len(entries)} image(s); precision/recall needs more "
                          f"than k = {k}", FIX["prdc"])
    if len(entries) > len(captions):  # as many real as generated images (Naeem et al.): a seeded subset
        keep = np.sort(rng.philox(rng.Stream.PRDC_SUBSET, 0).choice(len(entries), len(captions), replace=False))
        entries = [entries[int(i)] for i in keep]
    embed = RandomVGG16(resolution, device)
    ref = ref_image_rows(entries, cfg.batch_size, info, device, resolution, lambda x: embed(x).float(),
                         embed.width, "reference (prdc)").double()
    record = {"name": embed.label, "weights": None, "weights_sha256": None, "k": k,
              "reference": {"pattern": cfg.ref_images, "n": len(entries)}}
    return PRDC(embed, ref, record, k)


# --------------------------------------------------------------------------------------------
# User metrics: --metric module:Name (or path/to/file.py:Name)
# --------------------------------------------------------------------------------------------


@dataclass
class MetricContext:
    """What a user metric's constructor gets (`Name(ctx)`, README "Your own metric"): the captions
    being sampled in index order (`records` adds `key`/`image_id` where the caption file has them),
    the size of `metric_images` (`resolution`), the device, this rank (`info`), the batch size and
    the `--metric-arg KEY=VALUE` options. Raise `lct.metrics.Unavailable(reason, fix)` (or any
    `UserError`) when the metric cannot run here: it is reported as skipped, the samples are still
    written. Set `caption_accuracy = True` on a metric that scores how well images follow their
    captions: eval then reports precision/recall/coverage beside it (`prdc`)."""

    captions: list[str]
    records: list[dict]
    resolution: int
    device: torch.device
    info: DistInfo
    batch_size: int = 32
    options: dict[str, str] = field(default_factory=dict)


METRIC_PARTS = ("name", "width", "record", "rows", "result", "line")


def parse_metric_args(items: Sequence[str] | None) -> dict[str, str]:
    out = {}
    for item in items or ():
        key, eq, value = str(item).partition("=")
        if not eq or not key.strip():
            raise UserError(f"--metric-arg {item!r}: expected KEY=VALUE")
        out[key.strip()] = value
    return out


def resolve_user_metric(spec: str):
    """The constructor named by `module:Name` (an importable module) or `path/to/file.py:Name`;
    a bad spec is a `UserError` naming --metric (before any sampling)."""
    import importlib
    import importlib.util

    mod_part, sep, attr = str(spec).rpartition(":")
    if not sep or not mod_part or not attr.isidentifier():
        raise UserError(f"--metric {spec}: expected module:Name or path/to/file.py:Name")
    try:
        if mod_part.endswith(".py") or os.sep in mod_part:
            path = Path(mod_part).expanduser()
            if not path.is_file():
                raise UserError(f"--metric {spec}: file {path} not found")
            name = "lct_user_metric_" + hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:12]
            module_spec = importlib.util.spec_from_file_location(name, path)
            module = importlib.util.module_from_spec(module_spec)
            module_spec.loader.exec_module(module)
        else:
            module = importlib.import_module(mod_part)
    except UserError:
        raise
    except Exception as err:  # ImportError, SyntaxError, errors at import time
        raise UserError(f"--metric {spec}: could not import {mod_part} ({type(err).__name__}: "
                        f"{str(err).splitlines()[0][:200] if str(err) else ''})") from None
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise UserError(f"--metric {spec}: {mod_part} has no callable {attr}")
    return factory


def build_user_metric(spec: str, factory, ctx: MetricContext, taken: set[str]):
    """`factory(ctx)`, checked against the Metric protocol."""
    metric = factory(ctx)
    missing = [a for a in METRIC_PARTS if not hasattr(metric, a)]
    if missing:
        raise UserError(f"--metric {spec}: {type(metric).__name__} lacks {', '.join(missing)} of lct.metrics.Metric")
    if not isinstance(metric.name, str) or not metric.name.isidentifier() or metric.name in taken:
        raise UserError(f"--metric {spec}: name {metric.name!r} must be an identifier other than {sorted(taken)}")
    return metric


def is_caption_accuracy(metric) -> bool:
    return bool(getattr(metric, "caption_accuracy", False))


def metric_images(u8: np.ndarray, res: int) -> torch.Tensor:
    """Samples uint8 [B,H,W,3] as the metrics' uint8 [B,3,res,res], resized with the reference
    images' rule (`lct.vae.preprocess_image_uint8`) when they are another size."""
    if u8.shape[1] == res and u8.shape[2] == res:
        return torch.from_numpy(np.ascontiguousarray(u8)).permute(0, 3, 1, 2).contiguous()
    return torch.stack([preprocess_image_uint8(Image.fromarray(a), res) for a in u8])


def setup_fid(cfg, info, device, resolution, captions, gen) -> FID:
    if len(captions) < 2:
        raise UserError(f"FID needs at least 2 samples, --num-samples is {len(captions)}")
    if cfg.ref_images is None and cfg.ref_stats is None:
        raise Unavailable("no reference statistics", FIX["fid_ref"])
    with rank0_first(info):
        path = fid_weights_file(cfg.fid_weights, info.is_main)
    model = load_fid_inception(path, device)
    sha = model.lct_weights_sha256
    record = {"name": FID_MODEL, "weights": str(path.resolve()), "weights_sha256": sha,
              "weights_verified": model.lct_weights_verified}
    try:
        ref, ref_record = reference_stats(cfg, info, device, model, sha, resolution)
    except Unavailable:
        raise
    except UserError as err:
        raise Unavailable(str(err), FIX["fid_ref"]) from None
    return FID(model, ref, ref_record, record, cfg.batch_size, resolution)


def setup_clip(cfg, info, device, resolution, captions, gen) -> CLIPScore:
    with rank0_first(info):
        path = clip_weights_file(cfg.clip_model, cfg.clip_pretrained)
    pre = str(cfg.clip_pretrained)
    model, tok, prep = load_clip(cfg.clip_model, pre if not Path(pre).expanduser().is_file() else str(path), device)
    label = f"{cfg.clip_model}/{cfg.clip_pretrained}"
    record = {"name": f"CLIP score, open_clip {label}, 100 * max(cos, 0) per image, mean",
              "clip_model": cfg.clip_model, "clip_pretrained": cfg.clip_pretrained,
              "weights": str(path.resolve()), "weights_sha256": file_sha256(path)}
    return CLIPScore(model, tok, prep, record, cfg.batch_size)


def setup_shapes(cfg, info, device, resolution, captions, gen) -> Shapes:
    parsed = sum(all(v is not None for v in parse_caption(c)[:2]) for c in captions)
    if 2 * parsed <= len(captions):
        raise Unavailable(f"only {parsed} of {len(captions)} captions state a shapes colour and position: the shapes "
                          "metric is for lct's shapes data set, and a number over a minority of captions would "
                          "mislead", FIX["shapes"])
    record = {"name": "lct.shapes.shapes_metric (colour, 3x3 position and shape accuracy; no weights)", "weights": None,
              "weights_sha256": None}
    specs = read_specs(cfg.captions, len(captions)) if cfg.captions else None
    return Shapes(record, shapes_ceiling(specs, captions, gen, cfg.batch_size, info, device) if specs else None)


def render_scores(vae, specs, captions, canvas: tuple[int, int], device) -> dict[str, list]:
    """`score_image` rows of the specs' ground-truth renders on `canvas` (width, height) and of
    `vae`'s reconstructions of them: {"ground_truth": rows, "vae_reconstruction": rows}."""
    gt = np.stack([np.asarray(render(s, canvas)) for s in specs])
    x = torch.from_numpy(gt).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)
    rec = to_uint8(decode(vae, encode_posterior(vae, x.to(device))[0]))
    return {"ground_truth": [score_image(a, c) for a, c in zip(gt, captions)],
            "vae_reconstruction": [score_image(b, c) for b, c in zip(rec, captions)]}


def shapes_ceiling(specs, captions, gen, batch_size: int, info: DistInfo, device) -> dict:
    """The `shapes` accuracies of the captions' own ground-truth renders and of the generator's VAE
    reconstructions of them (what a perfect latent model could reach), sharded like the samples."""
    f = downsample_factor(gen.vae)
    canvas = (int(gen.latent_shape[-1]) * f, int(gen.latent_shape[-2]) * f)  # (width, height): the generated size
    rows: dict[str, list] = {"ground_truth": [], "vae_reconstruction": []}
    idx: list[int] = []
    for batch in dist.rank_batches(len(specs), batch_size, info.rank, info.world_size):
        for k, v in render_scores(gen.vae, [specs[i] for i in batch], [captions[i] for i in batch], canvas,
                                  gen.device).items():
            rows[k] += v
        idx += batch
    return {k: {**summarize_scores(dist.gather_rows(idx, torch.tensor(v, dtype=torch.float64) if v else None,
                                                    len(SCORE_FIELDS), info.world_size, device).double().numpy()),
                "size": [canvas[1], canvas[0]]}  # height, width: the samples' canvas
            for k, v in rows.items()}


SETUP = {"fid": setup_fid, "clip": setup_clip, "shapes": setup_shapes, "prdc": setup_prdc}


def setup_metrics(cfg, info: DistInfo, device, resolution: int, captions: list[str], gen,
                  records: list[dict] | None = None, user: dict | None = None) -> tuple[list, dict]:
    """(metrics that run, {name: skipped record} for those that cannot) of `cfg.metrics` and the
    user metrics `user` ({--metric spec: constructor}); a metric runs only where every rank could
    set it up. `prdc` is added beside any caption-accuracy metric."""
    ready, skipped = {}, {}
    names = [m for m in dict.fromkeys(cfg.metrics) if m != "none"]
    for name in names:
        if name == "prdc":
            continue  # last: it is added beside the caption-accuracy metrics
        try:
            ready[name] = SETUP[name](cfg, info, device, resolution, captions, gen)
        except UserError as err:
            skipped[name] = {"skipped": True, "reason": str(err), "fix": getattr(err, "fix", FIX[name])}
    ctx = MetricContext(list(captions), list(records or [{"caption": c} for c in captions]), resolution,
                        torch.device(device), info, cfg.batch_size, parse_metric_args(getattr(cfg, "metric_arg", None)))
    for spec, factory in (user or {}).items():
        try:
            m = build_user_metric(spec, factory, ctx, set(SETUP) | set(ready))
            ready[m.name] = m
        except UserError as err:
            key = spec.rpartition(":")[2]
            skipped[key] = {"skipped": True, "reason": str(err), "fix": getattr(err, "fix", FIX["user"]),
                            "metric": spec}
        except Exception as err:  # a bug in the user's metric: named, the samples are still written
            key = spec.rpartition(":")[2]
            skipped[key] = {"skipped": True, "reason": f"{spec} failed to set up: {type(err).__name__}: {err}",
                            "fix": "fix the metric's code", "metric": spec}
    if "prdc" in names or any(is_caption_accuracy(m) for m in ready.values()):
        try:
            ready["prdc"] = setup_prdc(cfg, info, device, resolution, captions, gen)
        except UserError as err:
            skipped["prdc"] = {"skipped": True, "reason": str(err), "fix": getattr(err, "fix", FIX["prdc"])}
    everywhere = set.intersection(*[set(r) for r in dist.gather_objects(list(ready), info.world_size)])
    for name in list(ready):
        if name not in everywhere:
            del ready[name]
            skipped[name] = {"skipped": True, "reason": "not available on every rank", "fix": FIX.get(name, FIX["user"])}
    return list(ready.values()), skipped
