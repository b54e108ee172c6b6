"""Watching a run: machine-readable logs, sample grids and a fixed validation batch.

- `RunLogger`: `stats.jsonl` (one JSON object per log step) and TensorBoard scalars on rank 0;
  Weights & Biases only when installed and asked for (`run.wandb`).
- `Monitor`: every `sample.every` applied steps, 1- and 2-step sample grids from the named EMA
  (`ema.sample`, in eval mode) with fixed prompts and seeds, sharded across ranks, gathered on
  rank 0, decoded with the run's VAE in fp32, captioned, written to `samples/` and TensorBoard.
  Every `val.every` steps, a fixed validation batch (held-out latents, fixed noise, fixed noise
  levels per sigma bucket, fixed captions) gives the EMA's consistency distance per bucket and its
  denoising reconstruction error: numbers comparable across steps within a stage.
"""

from __future__ import annotations

import copy
import json
import math
import sys
from pathlib import Path

import numpy as np
import torch

from lct import rng


class RunLogger:
    def __init__(self, run_dir: Path, cfg):
        self.path = Path(run_dir) / "stats.jsonl"
        self.file = open(self.path, "a", buffering=1)
        self.tb = None
        if cfg.run.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(Path(run_dir) / "tensorboard"))
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

    def __call__(self, record: dict, kind: str = "train") -> None:
        record = {"kind": kind, **record}
        self.file.write(json.dumps(record) + "\n")
        step = record.get("step", 0)
        flat = {}
        for k, v in record.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "step":
                flat[f"{kind}/{k}"] = v
            elif isinstance(v, list):
                for i, x in enumerate(v):
                    if isinstance(x, (int, float)):
                        flat[f"{kind}/{k}/{i}"] = x
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


def gather_objects(obj, world_size: int) -> list:
    if world_size == 1:
        return [obj]
    import torch.distributed as dist

    out = [None] * world_size
    dist.all_gather_object(out, obj)
    return out


class Monitor:
    """Sample grids and validation from the sample EMA (collective: every rank calls it)."""

    def __init__(self, cfg, info, engine, ema, manifest, desc, device):
        self.cfg, self.info, self.engine, self.ema = cfg, info, engine, ema
        self.manifest, self.desc, self.device = manifest, desc, device
        self.run_dir = Path(cfg.run.dir)
        self._model = None
        self._vae = None
        self._text = None
        self.prompts = self.load_prompts()
        self.val = self.load_validation()

    @classmethod
    def create(cls, cfg, info, engine, ema, manifest, desc, device):
        return cls(cfg, info, engine, ema, manifest, desc, device)

    # ------------------------------------------------------------------ inputs

    def load_prompts(self) -> list[str]:
        cfg = self.cfg
        if cfg.model.cond != "text":
            return [""] * cfg.sample.num
        prompts = list(cfg.sample.prompts)
        if cfg.sample.prompts_file:
            prompts += [l.strip() for l in Path(cfg.sample.prompts_file).read_text().splitlines() if l.strip()]
        if not prompts:
            from lct.data import InMemoryLatents, expand_urls

            src = cfg.data.val_shards or cfg.data.shards
            urls = expand_urls(src)[:1]
            mem = InMemoryLatents(urls)
            prompts = [(s.get("captions") or [""])[0] for s in mem.samples[: cfg.sample.num]]
        return (prompts * cfg.sample.num)[: cfg.sample.num]

    def load_validation(self) -> dict | None:
        """The fixed validation batch: held-out latents with fixed eps, z and captions."""
        cfg = self.cfg
        if not cfg.data.val_shards:
            return None
        from lct.data import InMemoryLatents, expand_urls
        from lct.latents import SampleLayout, latent_stats
        from lct.text import padding_mask

        mem = InMemoryLatents(expand_urls(cfg.data.val_shards), SampleLayout.from_manifest(self.manifest).core())
        samples = mem.samples[: cfg.val.batch_size]
        mean, std = latent_stats(self.manifest, cfg.data.latent_norm)
        xs, zs, caps, toks = [], [], [], []
        for i, s in enumerate(samples):
            g = rng.philox(cfg.run.seed, rng.VALIDATION, i)
            eps = g.standard_normal(s["mean"].shape, dtype=np.float32)
            xs.append(((s["mean"].astype(np.float32) + s["std"].astype(np.float32) * eps) - mean) / std * 0.5)
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

    def ema_model(self):
        """A copy of the network holding the sample EMA, in eval mode (collective gather)."""
        state = self.ema.state_dict_of(self.cfg.ema.sample)
        if self._model is None:
            self._model = copy.deepcopy(self.engine.module).eval()
            for p in self._model.parameters():
                p.requires_grad_(False)
        named = dict(self._model.named_parameters())
        with torch.no_grad():
            for k, v in state.items():
                named[k].copy_(v.to(named[k]))
        return self._model

    def vae(self):
        if self._vae is None:
            from lct.vae import load_vae

            vae_id = self.cfg.vae.id or (self.manifest.get("vae") or {}).get("id")
            self._vae = load_vae(vae_id, self.device, torch.float32)
        return self._vae

    def text(self):
        if self._text is None:
            from lct.text import TextEncoder

            self._text = TextEncoder.from_manifest(self.manifest, device=self.device,
                                                   model=self.cfg.text.model,
                                                   pretrained=self.cfg.text.pretrained)
        return self._text

    def condition(self, prompts: list[str] | None = None, tokens=None) -> dict:
        if self.cfg.model.cond != "text":
            return {}
        enc = self.text()
        if tokens is None:
            tokens = enc.tokenize(prompts)
        with torch.no_grad():
            states, mask, pooled = enc(tokens.to(self.device))
        return {"text_states": states, "text_mask": mask, "pooled": pooled}

    # ------------------------------------------------------------------ work

    def maybe_run(self, step: int, logger, force: bool = False) -> None:
        cfg = self.cfg
        do_grid = force or step % cfg.sample.every == 0
        do_val = self.val is not None and (force or step % cfg.val.every == 0)
        if not (do_grid or do_val):
            return
        from lct.train import raised_timeout

        with raised_timeout(self.info.world_size, cfg.run.dist_timeout_minutes * 4, cfg.run.dist_timeout_minutes):
            model = self.ema_model()
            if do_val:
                record = self.validate(model, step)
                if logger:
                    logger(record, kind="val")
            if do_grid:
                self.grids(model, step, logger)

    @torch.no_grad()
    def grids(self, model, step: int, logger) -> list[Path]:
        from lct.grids import caption_grid, save_png, to_uint8
        from lct.samplers import consistency_sample
        from lct.vae import LatentNorm, decode

        cfg, info = self.cfg, self.info
        m = cfg.method
        mine = list(range(info.rank, len(self.prompts), info.world_size))
        norm = LatentNorm.from_manifest(self.manifest, cfg.data.latent_norm)
        sample_sigma_min = m.sample_sigma_min if m.sample_sigma_min is not None else m.sigma_min
        written = []
        for steps in cfg.sample.steps:
            taus = list(m.tau[: steps - 1]) if steps > 1 else []
            if steps > 1 and len(taus) < steps - 1:
                continue
            images = np.zeros((0,), dtype=np.uint8)
            if mine:
                cond = self.condition([self.prompts[i] for i in mine])
                lat = consistency_sample(model, cond, mine, self.desc.latent_shape, seed=cfg.sample.seed,
                                         sigma_max=m.sigma_max, sigma_min=sample_sigma_min, taus=taus,
                                         guidance=cfg.sample.guidance, device=self.device)
                raw = norm.denormalize(lat)
                images = to_uint8(decode(self.vae(), raw))
            parts = gather_objects((mine, images), info.world_size)
            if info.is_main:
                by_index = {}
                for idx, imgs in parts:
                    for i, img in zip(idx, imgs):
                        by_index[i] = img
                order = sorted(by_index)
                grid = caption_grid([by_index[i] for i in order], [self.prompts[i] for i in order],
                                    title=f"step {step}, {steps}-step, EMA {cfg.ema.sample}")
                path = self.run_dir / "samples" / f"step{step:08d}_{steps}step.png"
                path.parent.mkdir(parents=True, exist_ok=True)
                save_png(grid, path)
                written.append(path)
                if logger:
                    logger.image(f"samples/{steps}step", grid, step)
        return written

    @torch.no_grad()
    def validate(self, model, step: int) -> dict:
        """Consistency distance per sigma bucket and denoising error of the fixed batch."""
        from lct import consistency as C
        from lct.objectives import make_objective

        cfg, info = self.cfg, self.info
        val = self.val
        n = val["x"].shape[0]
        obj = make_objective(cfg.method, self.desc.latent_shape, cfg.run.total_steps)
        cur = obj.curriculum(step)
        buckets = cfg.val.buckets
        # Fixed student levels: bucket b gets the levels spread evenly in log sigma.
        lo, hi = math.log(max(cfg.method.sigma_min, 0.002)), math.log(cfg.method.sigma_max)
        pos = (torch.arange(n, dtype=torch.float64) + 0.5) / n
        sigma_s = torch.exp(lo + (hi - lo) * pos)
        if cfg.method.objective in ("ict", "ilct"):
            grid = C.karras_sigmas(cur.num_points, cfg.method.sigma_min, cfg.method.sigma_max, cfg.method.rho)
            hi_idx = torch.searchsorted(grid, sigma_s).clamp(1, len(grid) - 1)
            sigma_s, sigma_t = grid[hi_idx], grid[hi_idx - 1]
        elif cfg.method.objective == "ect":
            sigma_t = C.ect_r(sigma_s, cur.stage, cfg.method.ect_q, cfg.method.ect_k, cfg.method.ect_b,
                              cfg.method.ect_mapping)
        else:
            sigma_t = torch.zeros_like(sigma_s)
        bucket = (pos * buckets).floor().long().clamp(max=buckets - 1)
        sums = torch.zeros(3, buckets, dtype=torch.float64)
        mine = list(range(info.rank, n, info.world_size))
        for chunk in [mine[i:i + 64] for i in range(0, len(mine), 64)]:
            idx = torch.tensor(chunk)
            x = val["x"][idx].to(self.device)
            z = val["z"][idx].to(self.device)
            cond = {}
            if "tokens" in val:
                cond = self.condition(tokens=val["tokens"][idx])
            cond["cond_drop"] = torch.zeros(len(chunk), dtype=torch.bool, device=self.device)
            ss = sigma_s[idx].float().to(self.device)
            st = sigma_t[idx].float().to(self.device)
            b4 = lambda v: v.view(-1, 1, 1, 1)
            f_s = model(x + b4(ss) * z, ss, **cond)
            clean = st <= 0
            st_safe = torch.where(clean, ss, st)
            f_t = torch.where(b4(clean), x, model(x + b4(st_safe) * z, st_safe, **cond))
            mdist = (f_s - f_t).square().flatten(1).mean(1).double().cpu()
            recon = (f_s - x).square().flatten(1).mean(1).double().cpu()
            bk = bucket[idx]
            sums[0].index_add_(0, bk, mdist)
            sums[1].index_add_(0, bk, recon)
            sums[2].index_add_(0, bk, torch.ones(len(chunk), dtype=torch.float64))
        if info.world_size > 1:
            import torch.distributed as dist

            t = sums.to(self.device)
            dist.all_reduce(t)
            sums = t.cpu()
        cnt = sums[2].clamp_min(1)
        rec = {"step": step, "consistency_m": (sums[0] / cnt).tolist(), "recon_mse": (sums[1] / cnt).tolist(),
               "consistency_m_mean": float(sums[0].sum() / sums[2].sum()),
               "recon_mse_mean": float(sums[1].sum() / sums[2].sum()),
               "bucket_sigma": [float(math.exp(lo + (hi - lo) * (b + 0.5) / buckets)) for b in range(buckets)]}
        if cur.num_points is not None:
            rec["N"] = cur.num_points
        if cur.stage is not None:
            rec["stage"] = cur.stage
        return rec
