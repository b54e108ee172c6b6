"""Watching a run: machine-readable logs, the progress bar, sample grids and a fixed validation batch.

- `RunLogger`: `stats.jsonl` (one JSON object per log step) and TensorBoard scalars on rank 0;
  Weights & Biases only when installed and asked for (`run.wandb`).
- `LossMeter`: the training loss per sigma bucket between log steps (summed on the device) and the
  `stats.jsonl` record of a log step; `Progress`: tqdm on rank 0 with throughput and ETA.
- `Monitor`: every `sample.every` applied steps, 1- and 2-step sample grids from the named EMA
  (`ema.sample`, in eval mode) with fixed prompts and seeds, sampled by the pipeline users run
  (`LCTPipeline` in memory around the EMA: SPEC 9 has one implementation), sharded across ranks,
  gathered on rank 0, decoded with the run's VAE in fp32, captioned, written to `samples/` and
  TensorBoard.
  Every `val.every` steps, a fixed validation batch (held-out latents, fixed noise, fixed draws of
  the objective's plan, fixed captions) gives the EMA's consistency distance per sigma bucket and
  its denoising reconstruction error: numbers comparable across steps within a stage.
  Every `eval.every` steps, the quality eval (`lct.quality.Quality`): 1- and 2-step samples of
  fixed held-out captions scored by the metrics that can run, rows of kind "eval".
"""

from __future__ import annotations

import copy
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from lct import dist, rng
from lct.consistency import mean_sq
from lct.data import SKIP_REASONS, InMemoryLatents, SkipTally, expand_urls, posterior_latent, skip_record
from lct.files import write_atomic
from lct.grids import caption_grid, save_png
from lct.latents import SampleLayout
from lct.objectives import make_objective
from lct.quality import Quality
from lct.text import load_tower, text_condition
from lct.tokens import padding_mask
from lct.vae import LatentNorm, load_vae

VAL_ASPECTS = 3  # bucketed data: validation batches of the most common aspect buckets (`by_aspect`)


class RunLogger:
    """`start_step`: the applied step the run continues from. Rows of later steps (logged by an
    invocation that stopped before its next checkpoint) are dropped from stats.jsonl and purged
    from TensorBoard, so every step is logged once."""

    def __init__(self, run_dir: Path, cfg, start_step: int = 0):
        self.path = Path(run_dir) / "stats.jsonl"
        drop_rows_after(self.path, start_step)
        self.file = open(self.path, "a", buffering=1)
        self.tb = None
        if cfg.run.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(Path(run_dir) / "tensorboard"), purge_step=start_step + 1)
            except Exception as err:  # tensorboard missing or broken: logs still go to stats.jsonl
                print(f"warning: TensorBoard disabled ({err})", file=sys.stderr)
        self.wandb = None
        if cfg.run.wandb:
            try:
                import wandb

                self.wandb = wandb.init(project=cfg.run.wandb_project, dir=str(run_dir),
                                        config=cfg.model_dump(mode="json"), resume="allow")
            except ImportError:
                print("warning: run.wandb=true but wandb is not installed (pip install wandb)", file=sys.stderr)

    def __call__(self, record: dict, kind: str = "train", tag: str | None = None) -> None:
        """One stats.jsonl row of `kind`; its numbers to TensorBoard (and W&B) as `tag`/key (default `kind`)."""
        record = {"kind": kind, **record}
        self.file.write(json.dumps(record) + "\n")
        step, tag = record.get("step", 0), tag or kind
        flat = {}
        for k, v in record.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "step":
                flat[f"{tag}/{k}"] = v
            elif isinstance(v, list):
                for i, x in enumerate(v):
                    if isinstance(x, (int, float)):
                        flat[f"{tag}/{k}/{i}"] = x
            elif isinstance(v, dict):  # e.g. val's by_aspect: {bucket: {field: number}}
                for name, sub in v.items():
                    for f, x in (sub.items() if isinstance(sub, dict) else ()):
                        if isinstance(x, (int, float)) and not isinstance(x, bool):
                            flat[f"{tag}/{k}/{name}/{f}"] = x
        if self.tb:
            for k, v in flat.items():
                if math.isfinite(v):
                    self.tb.add_scalar(k, v, step)
        if self.wandb:
            self.wandb.log(flat, step=step)

    def image(self, tag: str, image, step: int) -> None:
        if self.tb:
            self.tb.add_image(tag, np.asarray(image), step, dataformats="HWC")

    def close(self) -> None:
        self.file.close()
        if self.tb:
            self.tb.close()


def drop_rows_after(path: Path, step: int) -> None:
    """Keep the rows of stats.jsonl up to `step` (atomically; unparsable lines are kept)."""
    if not path.is_file():
        return
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    keep = []
    for line in lines:
        try:
            row_step = json.loads(line).get("step", 0)
        except (ValueError, AttributeError):
            row_step = 0
        if not isinstance(row_step, (int, float)) or row_step <= step:
            keep.append(line)
    if len(keep) != len(lines):
        write_atomic(path, "".join(f"{line}\n" for line in keep))


def bucket_range(method) -> tuple[float, float]:
    """The sigma range the log-scale buckets span: [sigma_min (0.002 where it is 0), sigma_max]."""
    return method.sigma_min or 0.002, method.sigma_max


def sigma_buckets(sigma: torch.Tensor, num_buckets: int, sigma_min: float = 0.002,
                  sigma_max: float = 80.0) -> torch.Tensor:
    """Bucket index of each sigma on a log scale between sigma_min and sigma_max (for logging)."""
    lo, hi = math.log(max(sigma_min, 1e-4)), math.log(sigma_max)
    pos = (sigma.double().clamp_min(1e-4).log() - lo) / (hi - lo)
    return (pos * num_buckets).floor().clamp(0, num_buckets - 1).long()


def bucket_centres(num_buckets: int, sigma_min: float, sigma_max: float) -> list[float]:
    lo, hi = math.log(max(sigma_min, 1e-4)), math.log(sigma_max)
    return [float(math.exp(lo + (hi - lo) * (b + 0.5) / num_buckets)) for b in range(num_buckets)]


class LossMeter:
    """Per-sample training losses summed per sigma bucket on the device between log steps (no host
    sync per step), and the `stats.jsonl` record of a log step (one all-reduce)."""

    def __init__(self, cfg, device: torch.device, world_size: int, images_seen: int):
        self.cfg, self.world_size = cfg, world_size
        self.buckets = cfg.val.buckets
        self.range = bucket_range(cfg.method)
        self.acc = torch.zeros(2 + 2 * self.buckets, dtype=torch.float64, device=device)  # sums, counts
        self.last = None
        self.since, self.images = time.time(), images_seen

    def add(self, diags: list) -> None:
        """One step's micro-batch diagnostics (`lct.objectives.Diagnostics`)."""
        nb, acc = self.buckets, self.acc
        for diag in diags:
            idx = sigma_buckets(diag.sigma, nb, *self.range)
            # A micro-batch with a non-finite loss adds nothing; decided on the device (no sync).
            ok = torch.isfinite(diag.loss).all().double()
            zero = torch.zeros((), dtype=torch.float64, device=acc.device)
            acc[0] += torch.where(ok > 0, diag.loss.sum().double(), zero)
            acc[1] += ok * diag.loss.numel()
            acc[2:2 + nb].index_add_(0, idx, torch.where(ok > 0, diag.loss.double(), zero))
            acc[2 + nb:].index_add_(0, idx, ok.expand(diag.loss.shape))
        self.last = diags[-1]

    def record(self, state, lr: float, curriculum, engine, tally: SkipTally | None = None) -> dict:
        """The log line of applied step `state.applied_steps` (collective: one all-reduce of the
        loss sums and the data path's skip counts); resets the sums. Curriculum values are those the
        last update trained with."""
        skipped = tally.vector() if tally is not None else torch.zeros(len(SKIP_REASONS), dtype=torch.float64)
        both = dist.all_reduce(torch.cat([self.acc, skipped.to(self.acc.device)]), self.world_size)
        self.acc.copy_(both[:self.acc.numel()])
        now = time.time()
        ips = (state.images_seen - self.images) / max(now - self.since, 1e-9)
        acc, nb = self.acc, self.buckets
        loss = (acc[0] / acc[1].clamp_min(1)).item()
        sums, counts = acc[2:2 + nb], acc[2 + nb:]
        per_bucket = (sums / counts.clamp_min(1)).tolist()
        record = {"step": state.applied_steps, "images": state.images_seen, "loss": loss, "lr": lr,
                  "images_per_s": ips, "images_per_s_per_gpu": ips / self.world_size,
                  "skipped_steps": state.skipped_steps, "data_steps": state.data_steps,
                  "train_seconds": state.train_seconds,
                  "loss_bucket": [v if c > 0 else None for v, c in zip(per_bucket, counts.tolist())],
                  **skip_record(both[self.acc.numel():])}
        if curriculum.num_points is not None:
            record["N"] = curriculum.num_points
        if curriculum.stage is not None:
            record["stage"] = curriculum.stage
        if self.cfg.method.objective != "edm":
            record["c"] = curriculum.c
        extra = self.last.scalars() if self.last is not None else {}
        for k in ("rms_sqrt_m", "frac_m_gt_2c2", "diffusion_term", "early_local"):
            if k in extra and math.isfinite(extra[k]):  # frac_m_gt_2c2 is NaN at c = 0: not valid JSON
                record[k] = extra[k]
        gn = engine.get_global_grad_norm() if hasattr(engine, "get_global_grad_norm") else None
        if gn is not None:
            record["grad_norm"] = float(gn)
        if torch.cuda.is_available():
            record["max_memory_gb"] = torch.cuda.max_memory_allocated() / 2**30
        self.acc.zero_()
        self.since, self.images = now, state.images_seen
        return record


class Progress:
    """tqdm over applied steps on rank 0 (nothing elsewhere), with the loss, img/s per GPU, N or
    stage and c of the last log line."""

    def __init__(self, cfg, info, initial: int):
        self.world_size = info.world_size
        self.bar = tqdm(total=cfg.run.total_steps, initial=initial, unit="step", dynamic_ncols=True,
                        desc=f"{cfg.method.objective}", file=sys.stdout) if info.is_main else None

    def update(self, applied: bool) -> None:
        if self.bar:
            self.bar.update(int(applied))

    def show(self, record: dict) -> None:
        if self.bar:
            self.bar.set_postfix(loss=f"{record['loss']:.4g}",
                                 img_s_gpu=f"{record['images_per_s'] / self.world_size:.1f}",
                                 **({"N": record["N"]} if "N" in record else {}),
                                 **({"stage": record["stage"]} if "stage" in record else {}),
                                 **({"c": f"{record['c']:.3g}"} if "c" in record else {}),
                                 **({"skipped": record["data_skipped"]} if record.get("data_skipped") else {}))

    def close(self) -> None:
        if self.bar:
            self.bar.close()


class Monitor:
    """Sample grids and validation from the sample EMA (collective: every rank calls it)."""

    def __init__(self, cfg, info, engine, ema, manifest, desc, device, text=None, vae=None):
        """`text` and `vae`: the models `lct.preflight.preflight` loaded and checked (else loaded here
        at first use)."""
        self.cfg, self.info, self.engine, self.ema = cfg, info, engine, ema
        self.manifest, self.desc, self.device = manifest, desc, device
        self.run_dir = Path(cfg.run.dir)
        self.norm = LatentNorm.from_manifest(manifest, cfg.data.latent_norm)
        self.objective = make_objective(cfg.method, desc.latent_shape, cfg.run.total_steps)
        self._model = None
        self._pipe = None  # (model, the pipeline around it)
        self._vae = vae.to(device) if vae is not None else None
        self._text = text.to(device) if text is not None else None
        self.prompts = self.load_prompts()
        self.val = self.load_validation()
        self.quality = Quality(self) if cfg.eval.every else None
        self.done: dict[str, int] = {}  # the last step of each kind of monitoring

    # ------------------------------------------------------------------ inputs

    def load_prompts(self) -> list[str]:
        cfg = self.cfg
        if cfg.model.cond != "text":
            return [""] * cfg.sample.num
        prompts = list(cfg.sample.prompts)
        if cfg.sample.prompts_file:
            prompts += [l.strip() for l in Path(cfg.sample.prompts_file).read_text().splitlines() if l.strip()]
        if not prompts:
            src = cfg.data.val_shards or cfg.data.shards
            mem = InMemoryLatents(expand_urls(src)[:1])
            prompts = [(s.get("captions") or [""])[0] for s in mem.samples[: cfg.sample.num]]
        return (prompts * cfg.sample.num)[: cfg.sample.num]

    def load_validation(self) -> dict[str, dict] | None:
        """The fixed validation batches: held-out latents with fixed eps, z and captions, keyed by
        aspect bucket (bucketed data: the `VAL_ASPECTS` most common buckets of the training data,
        one shape per batch, the most common first; square data: one batch under "")."""
        cfg = self.cfg
        if not cfg.data.val_shards:
            return None
        mem = InMemoryLatents(expand_urls(cfg.data.val_shards), SampleLayout.from_manifest(self.manifest).core())
        if not self.desc.most_common:
            return {"": self.validation_batch(mem.samples[: cfg.val.batch_size])}
        held: dict[str, list] = {}
        for s in mem.samples:
            held.setdefault(s.get("bucket"), []).append(s)
        first = self.desc.most_common[0]
        order = [name for name, _, n in sorted(self.desc.buckets, key=lambda b: -b[2]) if n and name != first]
        order = [n for n in [first, *order] if n in held][:VAL_ASPECTS]
        return {name: self.validation_batch(held[name][: cfg.val.batch_size]) for name in order} or None

    def validation_batch(self, samples: list[dict]) -> dict:
        cfg = self.cfg
        xs, zs, caps, toks = [], [], [], []
        for i, s in enumerate(samples):
            g = rng.philox(rng.Stream.VALIDATION, cfg.run.seed, i)
            eps = g.standard_normal(s["mean"].shape, dtype=np.float32)
            raw = posterior_latent(cfg.data.posterior, s["mean"].astype(np.float32), s["std"].astype(np.float32), eps,
                                   cfg.run.seed, s.get("key", ""), False)  # as training sees it
            xs.append(self.norm.normalize(raw))
            zs.append(g.standard_normal(s["mean"].shape, dtype=np.float32))
            caps.append((s.get("captions") or [""])[0])
            if "tokens" in s:
                toks.append(s["tokens"][0].astype(np.int64))
        val = {"x": torch.from_numpy(np.stack(xs)).float(), "z": torch.from_numpy(np.stack(zs)),
               "captions": caps}
        if toks and cfg.model.cond == "text":
            val["tokens"] = torch.from_numpy(np.stack(toks))
            val["text_mask"] = padding_mask(val["tokens"])
        return val

    # ------------------------------------------------------------------ models

    def validation_sums(self, model, val: dict, step: int):
        """([consistency distance, recon error, count] summed per sigma bucket over all ranks, the
        plan) of one validation batch."""
        cfg, info = self.cfg, self.info
        n = val["x"].shape[0]
        q = (torch.arange(n, dtype=torch.float64) + 0.5) / n
        plan = self.objective.plan({"u": q, "n": torch.special.ndtri(q)}, step)
        bucket = sigma_buckets(plan.sigma, cfg.val.buckets, *bucket_range(cfg.method))
        sums = torch.zeros(3, cfg.val.buckets, dtype=torch.float64)
        mine = list(range(info.rank, n, info.world_size))
        for chunk in [mine[i:i + 64] for i in range(0, len(mine), 64)]:
            idx = torch.tensor(chunk)
            x = val["x"][idx].to(self.device)
            cond = self.condition(tokens=val["tokens"][idx]) if "tokens" in val else {}
            batch = {"x": x, "z": val["z"][idx].to(self.device), "cond": cond,
                     "cond_drop": torch.zeros(len(chunk), dtype=torch.bool, device=self.device)}
            student, target = self.objective.pair(model, batch, plan.rows(idx))  # the pair training uses
            bk = bucket[idx]
            sums[0].index_add_(0, bk, mean_sq(student, target).double().cpu())
            sums[1].index_add_(0, bk, mean_sq(student, x).double().cpu())
            sums[2].index_add_(0, bk, torch.ones(len(chunk), dtype=torch.float64))
        if info.world_size > 1:
            sums = dist.all_reduce(sums.to(self.device), info.world_size).cpu()
        return sums, plan

    def ema_model(self):
        """A copy of the network holding the sample EMA, in eval mode (collective gather)."""
        if self._model is None:
            self._model = copy.deepcopy(self.engine.module).eval()
            for p in self._model.parameters():
                p.requires_grad_(False)
        self.ema.apply_to(self._model, self.cfg.ema.sample)
        return self._model

    def vae(self):
        if self._vae is None:
            vae_id = self.cfg.vae.id or (self.manifest.get("vae") or {}).get("id")
            self._vae = load_vae(vae_id, self.device, torch.float32)
        return self._vae

    def text(self):
        if self._text is None:
            self._text = load_tower(self.manifest, self.cfg.text, self.device)
        return self._text

    def condition(self, prompts: list[str] | None = None, tokens=None) -> dict:
        if self.cfg.model.cond != "text":
            return {}
        enc = self.text()
        return text_condition(enc, enc.tokenize(prompts) if tokens is None else tokens)

    # ------------------------------------------------------------------ work

    def maybe_run(self, step: int, logger, force: bool = False) -> None:
        """Grids every sample.every, validation every val.every and the quality eval every
        eval.every applied steps; `force` (the run's end) does whichever has not been done at this
        step yet."""
        cfg = self.cfg
        do_grid = (force or step % cfg.sample.every == 0) and self.done.get("grid") != step
        do_val = self.val is not None and (force or step % cfg.val.every == 0) and self.done.get("val") != step
        do_eval = self.quality is not None and (force or step % cfg.eval.every == 0) and self.done.get("eval") != step
        if not (do_grid or do_val or do_eval):
            return
        self.done.update({k: step for k, due in (("grid", do_grid), ("val", do_val), ("eval", do_eval)) if due})
        # The trainer saves before it samples: a resumed run must draw what an uninterrupted one
        # draws, so the monitor leaves the training RNG as it found it.
        forked = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=forked), dist.raised_timeout(
                self.info.world_size, cfg.run.dist_timeout_minutes * 4, cfg.run.dist_timeout_minutes):
            model = self.ema_model()
            if do_val:
                record = self.validate(model, step)
                if logger:
                    logger(record, kind="val")
            if do_grid:
                self.grids(model, step, logger)
            if do_eval:
                self.quality.run(model, step, logger)

    def pipeline(self, model):
        """The pipeline users run, in memory around the sample EMA `model` (built once: the EMA copy
        is updated in place): `LCTPipeline` for a TextDiT, the PixArt export's pipeline for PixArt."""
        if self._pipe is None or self._pipe[0] is not model:
            if self.cfg.model.arch == "pixart":
                from lct.export_pixart import training_pixart_pipeline

                pipe = training_pixart_pipeline(model, self.cfg, self.manifest, vae=self.vae())
            elif self.cfg.model.arch in ("sana", "sd3"):
                from lct.export_flow import training_flow_pipeline

                pipe = training_flow_pipeline(model, vae=self.vae())
            else:
                from lct.export import training_pipeline

                pipe = training_pipeline(model.net, self.cfg, self.manifest, vae=self.vae())
            pipe.set_progress_bar_config(disable=True)
            self._pipe = (model, pipe)
        return self._pipe[1]

    def grid_inputs(self, model, indices: list[int], steps: int, prompts: list[str] | None = None,
                    seed: int | None = None) -> dict:
        """The pipeline's inputs for the prompts `indices` (of `prompts`, default the grid's): their
        text condition from the run's text tower (captions as given), lct's per-sample noise (`seed`,
        default `sample.seed`, and the prompt's index); for PixArt also the levels of `steps` steps
        and the start (`export_pixart.sampling_inputs`)."""
        from lct.pipeline import LCTPipeline

        cfg = self.cfg
        prompts = self.prompts if prompts is None else prompts
        seed = cfg.sample.seed if seed is None else seed
        if cfg.model.cond != "text":
            return {"prompt": [""] * len(indices), "seed": seed, "sample_indices": indices}
        cond = self.condition([prompts[i] for i in indices])
        if cfg.model.arch == "pixart":
            from lct.export_pixart import caption_embeds, null_condition, sampling_inputs, text_length

            null = null_condition(model, text_length(model, self.manifest))
            (_, h, w), pipe = self.grid_shape, self._pipe[1]
            return {**caption_embeds(pipe, cond["text_states"], cond["text_mask"], null),
                    **sampling_inputs(model, cfg.method, steps, LCTPipeline.sample_generators(seed, indices),
                                      self.grid_shape),
                    "height": h * pipe.vae_scale_factor, "width": w * pipe.vae_scale_factor}
        if cfg.model.arch in ("sana", "sd3"):  # the stock pipeline (SPEC 15.7), lct's per-sample noise
            from lct.export_flow import caption_embeds as flow_embeds, null_condition as flow_null

            net, (_, h, w), pipe = model.net, self.grid_shape, self._pipe[1]
            null = flow_null(model.family, net.null_text_states, getattr(net, "null_pooled", None),
                             cond["text_states"].shape[1])
            return {**flow_embeds(model.family, cond, null), "height": h * pipe.vae_scale_factor,
                    "width": w * pipe.vae_scale_factor, "generator": LCTPipeline.sample_generators(seed, indices)}
        return {"prompt_embeds": cond["text_states"], "prompt_attention_mask": cond["text_mask"],
                "pooled_prompt_embeds": cond["pooled"], "seed": seed, "sample_indices": indices}

    @property
    def grid_shape(self) -> tuple[int, int, int]:
        """The latent shape grids sample at: the most common bucket's (bucketed data), else the data's."""
        return self.desc.most_common[1] if self.desc.most_common else tuple(self.desc.latent_shape)

    def step_inputs(self, steps: int) -> dict:
        """The step count as the pipeline takes it: a flow model's stock pipeline is given the tuned
        levels as `sigmas` (SPEC 15.7), the others pick their levels from `num_inference_steps`."""
        if self.cfg.model.arch in ("sana", "sd3"):
            from lct.export_flow import step_sigmas

            return {"sigmas": step_sigmas(self.cfg.method, steps)}
        return {"num_inference_steps": steps}

    @torch.no_grad()
    def grids(self, model, step: int, logger) -> list[Path]:
        """1-, 2-, k-step grids (`sample.steps`) of the fixed prompts through `pipeline(model)` with
        lct's per-sample noise (`sample.seed`, the prompt's index), sharded across ranks."""
        cfg, info = self.cfg, self.info
        mine = list(range(info.rank, len(self.prompts), info.world_size))
        pipe = self.pipeline(model)
        written = []
        for steps in cfg.sample.steps:
            images = np.zeros((0,), dtype=np.uint8)
            if mine:
                out = pipe(**self.grid_inputs(model, mine, steps), **self.step_inputs(steps),
                           guidance_scale=cfg.sample.guidance, output_type="np").images
                images = (out * 255).round().astype(np.uint8)  # diffusers' numpy_to_pil: the PIL images' pixels
            parts = dist.gather_objects((mine, images), info.world_size)
            if info.is_main:
                by_index = {}
                for idx, imgs in parts:
                    for i, img in zip(idx, imgs):
                        by_index[i] = img
                order = sorted(by_index)
                grid = caption_grid([by_index[i] for i in order], [self.prompts[i] for i in order],
                                    title=f"{steps}-step samples of EMA '{cfg.ema.sample}' at training step {step:,}")
                path = self.run_dir / "samples" / f"step{step:08d}_{steps}step.png"
                path.parent.mkdir(parents=True, exist_ok=True)
                save_png(grid, path)
                written.append(path)
                if logger:
                    logger.image(f"samples/{steps}step", grid, step)
        return written

    @torch.no_grad()
    def validate(self, model, step: int) -> dict:
        """Consistency distance per sigma bucket and denoising error of the fixed batch, at the
        objective's plan of fixed draws: stratified quantiles of the training law (uniforms u for
        iCT's pair law, normals n for ECT's and EDM's lognormal t). Bucketed data: of the most
        common aspect bucket's batch, and the means of each validated bucket in `by_aspect`."""
        cfg = self.cfg
        buckets, (s_lo, s_hi) = cfg.val.buckets, bucket_range(cfg.method)
        per_aspect = {name: self.validation_sums(model, val, step) for name, val in self.val.items()}
        sums, plan = per_aspect[next(iter(self.val))]
        cnt = sums[2].clamp_min(1)
        per_bucket = lambda v: [a if c > 0 else None for a, c in zip((v / cnt).tolist(), sums[2].tolist())]
        cur = plan.curriculum
        rec = {"step": step, "consistency_m": per_bucket(sums[0]), "recon_mse": per_bucket(sums[1]),
               "consistency_m_mean": float(sums[0].sum() / sums[2].sum()),
               "recon_mse_mean": float(sums[1].sum() / sums[2].sum()),
               "bucket_sigma": bucket_centres(buckets, s_lo, s_hi), "bucket_count": sums[2].long().tolist()}
        if len(per_aspect) > 1:
            rec["by_aspect"] = {name: {"consistency_m_mean": float(v[0].sum() / v[2].sum()),
                                       "recon_mse_mean": float(v[1].sum() / v[2].sum()), "n": int(v[2].sum())}
                                for name, (v, _) in per_aspect.items()}
        if cur.num_points is not None:
            rec["N"] = cur.num_points
        if cur.stage is not None:
            rec["stage"] = cur.stage
        return rec
