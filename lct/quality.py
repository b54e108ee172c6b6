"""Quality during training (README, "Quality during training"): every `eval.every` applied steps
(and at the run's end) the sample EMA samples a fixed set of held-out captions at 1 and 2 steps
(`eval.steps`) through the pipeline users run (the monitor's in-memory `LCTPipeline`, the one the
grids use), and the metrics that can run score them (`lct.metrics`, the eval's `Metric` protocol):
FID and CLIP where their weights are on disk (the trainer never downloads), the shapes metric on
shapes captions, user metrics (`eval.metric: [module:Name]`), and precision/recall/density/
coverage (SPEC 16, `lct.prdc`) against real images, `eval.ref_images`, or by default the VAE
decodes of the same held-out latents (what a perfect latent model would draw): the diversity
figure beside any caption-accuracy figure, so a model of averaged images cannot read as the best.
Each metric that cannot run is named once.

Every rank samples its share of the captions (as the grids do); rank 0 gathers the images and does
the metric work. One stats.jsonl row of kind "eval" per setting (`step`, `objective`, `stage` or `N`, `setting`,
`steps`, `guidance`, `n`, then `<metric>` and `<metric>_<field>` numbers), the same numbers in
TensorBoard under `eval_<setting>/`. The eval runs inside the monitor's forked RNG with torch
seeded from `Stream.TRAIN_EVAL` (SPEC 1.2): a run with the eval on trains the same weights as one
without, and a resumed run stays bitwise.
"""

from __future__ import annotations

import math
import os
import sys
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

from lct import dist, rng
from lct.data import InMemoryLatents, expand_urls
from lct.dist import DistInfo
from lct.errors import UserError
from lct.grids import to_uint8
from lct.latents import SampleLayout
from lct.metrics import PRDC, metric_images, resolve_user_metric, setup_metrics
from lct.protocols import read_captions
from lct.tool_config import EvalConfig
from lct.vae import decode


class Quality:
    """The held-out captions (and latents) of the quality eval, its metrics (set up at the first
    eval, on rank 0) and `run`, called by `Monitor.maybe_run` on every rank."""

    def __init__(self, monitor):
        self.mon, self.cfg, self.info = monitor, monitor.cfg, monitor.info
        self.ecfg = self.cfg.eval
        self.records, self.latents = held_out(self.cfg, monitor.manifest)
        self.captions = [r["caption"] for r in self.records]
        self.user = {}
        for spec in dict.fromkeys(self.ecfg.metric):
            try:
                self.user[spec] = resolve_user_metric(spec)
            except UserError as err:  # refused at build, before any step: the key, not eval's flag
                raise UserError(str(err).replace("--metric ", "eval.metric ", 1)) from None
        self.metrics: list | None = None  # rank 0, after the first eval's setup
        self.skipped: dict = {}

    # ------------------------------------------------------------------ setup (rank 0)

    def setup(self, resolution: int) -> None:
        """The metrics that can run here (rank 0 alone, as one process: no collective); those that
        cannot are named once on stderr and in every row's `skipped`."""
        e = self.ecfg
        ecfg = EvalConfig(checkpoint=self.cfg.run.dir, out=str(self.out_dir()), protocol="custom",
                          metrics=[m for m in e.metrics if m != "prdc" or e.ref_images] or ["none"],
                          metric=e.metric, metric_arg=e.metric_arg, prdc_k=e.prdc_k, ref_stats=e.ref_stats,
                          ref_images=e.ref_images, batch_size=e.batch_size, fid_weights=e.fid_weights,
                          clip_model=e.clip_model, clip_pretrained=e.clip_pretrained)
        gen = SimpleNamespace(latent_shape=self.mon.desc.latent_shape, vae=self.mon.vae(), device=self.mon.device)
        one = DistInfo()  # rank 0 alone does the metric work
        with no_downloads():
            metrics, skipped = setup_metrics(ecfg, one, self.mon.device, resolution, self.captions, gen,
                                             self.records, self.user)
        want_prdc = "prdc" in e.metrics or any(getattr(m, "caption_accuracy", False) for m in metrics)
        if want_prdc and "prdc" not in {m.name for m in metrics} and not e.ref_images:
            skipped.pop("prdc", None)
            try:
                metrics.append(self.decoded_prdc(resolution))
            except UserError as err:
                skipped["prdc"] = {"skipped": True, "reason": str(err), "fix": "set eval.ref_images"}
        self.metrics, self.skipped = metrics, skipped
        ran = ", ".join(m.name for m in metrics) or "none"
        print(f"[eval] quality every {e.every} steps on {len(self.captions)} held-out captions, steps "
              f"{e.steps}: metrics {ran}", file=sys.stderr, flush=True)
        for name, s in skipped.items():
            print(f"[eval] {name}: cannot run: {s['reason']} (fix: {s['fix']})", file=sys.stderr, flush=True)

    def decoded_prdc(self, resolution: int) -> PRDC:
        """Precision/recall/density/coverage against the VAE decodes of the held-out latents whose
        captions are sampled (as many real as generated images, Naeem et al.)."""
        from lct.prdc import RandomVGG16

        k = self.ecfg.prdc_k
        if self.latents is None:
            raise UserError("no reference images: eval.captions has no latents to decode")
        if len(self.latents) <= k:
            raise UserError(f"precision/recall needs more than k = {k} held-out images, eval.num gives "
                            f"{len(self.latents)}")
        vae, bs = self.mon.vae(), self.ecfg.batch_size
        images = np.concatenate([to_uint8(decode(vae, torch.from_numpy(np.stack(self.latents[i:i + bs]))))
                                 for i in range(0, len(self.latents), bs)])
        embed = RandomVGG16(resolution, self.mon.device)
        ref = embed(metric_images(images, resolution)).double()
        record = {"name": embed.label, "weights": None, "weights_sha256": None, "k": k,
                  "reference": {"pattern": "VAE decodes of the held-out latents (data.val_shards)",
                                "n": len(self.latents)}}
        return PRDC(embed, ref, record, k)

    def out_dir(self) -> Path:
        return Path(self.cfg.run.dir) / "quality"

    # ------------------------------------------------------------------ the eval (every rank)

    @torch.no_grad()
    def run(self, model, step: int, logger) -> list[dict]:
        """Sample every setting (this rank's share), score on rank 0, log one row per setting."""
        cfg, info, e = self.cfg, self.info, self.ecfg
        # The generators the monitor's fork restores.
        torch.default_generator.manual_seed(rng.seed_int(rng.Stream.TRAIN_EVAL, cfg.run.seed, step))
        if self.mon.device.type == "cuda":
            with torch.cuda.device(self.mon.device):
                torch.cuda.manual_seed(rng.seed_int(rng.Stream.TRAIN_EVAL, cfg.run.seed, step))
        pipe = self.mon.pipeline(model)
        mine = list(range(info.rank, len(self.captions), info.world_size))
        rows = []
        for steps in dict.fromkeys(e.steps):
            images = []
            for i in range(0, len(mine), e.batch_size):
                idx = mine[i:i + e.batch_size]
                out = pipe(**self.mon.grid_inputs(model, idx, steps, self.captions, e.seed), **self.mon.step_inputs(steps),
                           guidance_scale=e.guidance, output_type="np").images
                images.append((out * 255).round().astype(np.uint8))  # the PIL images' pixels
            u8 = np.concatenate(images) if images else np.zeros((0,), dtype=np.uint8)
            parts = dist.gather_objects((mine, u8), info.world_size)
            if info.is_main:
                by_index = {i: a for idx, imgs in parts for i, a in zip(idx, imgs)}
                u8 = np.stack([by_index[i] for i in range(len(self.captions))])
                if self.metrics is None:
                    self.setup(int(u8.shape[1]))
                row = self.score(u8, steps, step)
                rows.append(row)
                if logger:
                    logger(row, kind="eval", tag=f"eval_{row['setting']}")
        if info.is_main and rows:
            print("[eval] step " + f"{step:,}: " + " | ".join(summary(r) for r in rows), file=sys.stderr, flush=True)
        return rows

    def score(self, u8: np.ndarray, steps: int, step: int) -> dict:
        """The stats.jsonl row of one setting: each metric's value and numeric fields."""
        e = self.ecfg
        setting = f"{steps}step" + (f"_g{e.guidance:g}" if e.guidance != 1 else "")
        row = {"step": step, "objective": self.cfg.method.objective, "setting": setting, "steps": steps,
               "guidance": e.guidance, "n": len(u8)}
        cur = self.mon.objective.curriculum(step)
        if cur.stage is not None:
            row["stage"] = cur.stage
        if cur.num_points is not None:
            row["N"] = cur.num_points
        res = int(u8.shape[1])
        failed = {}
        for m in self.metrics:
            try:
                rows = torch.cat([torch.as_tensor(m.rows(u8[i:i + e.batch_size],
                                                         metric_images(u8[i:i + e.batch_size], res),
                                                         self.captions[i:i + e.batch_size])).reshape(-1, m.width)
                                  for i in range(0, len(u8), e.batch_size)])
                out = self.out_dir() / f"step{step:08d}_{setting}"
                if m.name == "fid":
                    out.mkdir(parents=True, exist_ok=True)
                row.update(flatten(m.name, m.result(rows, out, True)))
            except Exception as err:  # a metric's bug never stops training: named in the row
                failed[m.name] = f"{type(err).__name__}: {str(err)[:200]}"
        skipped = {**{k: v["reason"] for k, v in self.skipped.items()}, **failed}
        if skipped:
            row["skipped"] = skipped
        return row


def flatten(name: str, result: dict) -> dict:
    """`name`: the metric's value; `name_field`: its other finite numbers (accuracies, recall...)."""
    out = {name: result.get("value")} if is_number(result.get("value")) else {}
    for k, v in result.items():
        if k not in ("value", "n", "k", "n_real", "n_fake", "n_scored", "steps", "guidance", "nfe", "seed",
                     "resolution") and not k.startswith("chance") and is_number(v):  # chance: constant
            out[f"{name}_{k}"] = v
    return out


def is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def summary(row: dict) -> str:
    keys = [k for k in row if k not in ("step", "objective", "setting", "steps", "guidance", "n", "stage", "N", "skipped")
            and "_" not in k] + [k for k in ("prdc_precision", "prdc_recall") if k in row]
    return f"{row['setting']}: " + (", ".join(f"{k} {row[k]:.4g}" for k in keys) or "no metric")


def held_out(cfg, manifest: dict) -> tuple[list[dict], list[np.ndarray] | None]:
    """The eval's fixed caption records, `eval.num` of them (a seeded subset, `Stream.TRAIN_EVAL_SET`,
    when there are more), and their raw latents when they come from `data.val_shards`."""
    e = cfg.eval
    if e.captions:
        records, latents = read_captions(e.captions), None
    else:
        mem = InMemoryLatents(expand_urls(cfg.data.val_shards), SampleLayout.from_manifest(manifest).core(), quiet=True)
        records = [{"caption": (s.get("captions") or [""])[0], "key": s.get("key", "")} for s in mem.samples]
        latents = [np.asarray(s["mean"], dtype=np.float32) for s in mem.samples]
    if len(records) < 2:
        raise UserError(f"eval: {len(records)} held-out caption(s) in {e.captions or cfg.data.val_shards}; "
                        "the quality eval needs at least 2")
    if len(records) > e.num:
        keep = np.sort(rng.philox(rng.Stream.TRAIN_EVAL_SET, cfg.run.seed).choice(len(records), e.num, replace=False))
        records = [records[int(i)] for i in keep]
        latents = [latents[int(i)] for i in keep] if latents is not None else None
    return records, latents


@contextmanager
def no_downloads():
    """FID/CLIP weights only from disk while the trainer sets up its metrics (no download mid-run)."""
    saved = {k: os.environ.get(k) for k in ("LCT_OFFLINE", "HF_HUB_OFFLINE")}
    os.environ.update({k: "1" for k in saved})
    hub = sys.modules.get("huggingface_hub.constants")  # read at import: the environment alone is late
    hub_offline = getattr(hub, "HF_HUB_OFFLINE", None)
    if hub is not None:
        hub.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        if hub is not None:
            hub.HF_HUB_OFFLINE = hub_offline
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
