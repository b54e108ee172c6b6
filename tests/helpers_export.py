"""A tiny exported model for eval and sampling tests (no downloads, CPU, about a second).

    export_dir = make_tiny_export(tmp / "work")   # tmp/work/export: a pipeline folder (lct.export)
    write_legacy_export(precond, out, cfg=cfg, manifest=manifest)   # the format before pipelines (lct-export/1)

Built the way the trainer builds one: a tiny `TextDiT` (latents 4 x 8 x 8, patch 2, width 32,
depth 2, text dims of the tiny text tower) wrapped in `Precond`, written by
`lct.export.export_network` with a real `TrainConfig` and a manifest in the format
`data_prep/encode_latents.py` writes (VAE record from `lct.vae.vae_summary`, text record from
`TextEncoder.record`, latent statistics sums). The data folder `tmp/work/data/` holds the tiny
VAE (`vae/`, downsampling 4: 32 x 32 images) and the seeded random tiny text tower
(`text_tower/`), as data prep leaves them.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch

from helpers_data import TINY_TEXT_MODEL, make_tiny_vae

LATENT_SHAPE = (4, 8, 8)
IMAGE_SIZE = 32  # LATENT_SHAPE[-1] * the tiny VAE's downsampling factor 4


def tiny_manifest(data_dir: Path, seed: int = 0) -> dict:
    """A latent-data manifest (the keys the exporter reads) with the tiny VAE and text tower."""
    import numpy as np
    import torch

    from lct.text import TextEncoder
    from lct.vae import load_vae, vae_summary

    vae_dir = make_tiny_vae(data_dir / "vae", latent_channels=LATENT_SHAPE[0], downsample=4, seed=seed)
    vae = load_vae(vae_dir, "cpu", torch.float32)
    text = TextEncoder.load(TINY_TEXT_MODEL, "random", seed=seed, save_dir=data_dir)
    shape = LATENT_SHAPE
    count = 4
    # Per-element sums of 4 samples: channel means c/10, posterior variances 1 (std ~ 1).
    mean = np.broadcast_to(np.arange(shape[0], dtype=np.float64)[:, None, None] / 10, shape)
    stats = {"count": count, "shape": list(shape), "sum_mean": (count * mean).tolist(),
             "sum_mean_sq": (count * mean * mean).tolist(), "sum_var": np.full(shape, float(count)).tolist()}
    return {"format": "lct-latents/1", "latent_shape": list(shape), "resolution": IMAGE_SIZE,
            "vae": vae_summary(vae, vae_dir), "text": text.record(manifest_dir=data_dir),
            "stats": stats, "manifest_path": str(data_dir / "manifest.json")}


def tiny_network(text_dim: int = 128, pooled_dim: int = 128, seed: int = 0, text_len: int = 77):
    """The tiny `TextDiT` in `Precond`, with random (seeded) weights everywhere, including the
    adaLN-Zero output layers (a zero-initialised DiT would output nothing but the skip path)."""
    import torch

    from lct.models import Precond, TextDiT

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = TextDiT(in_channels=LATENT_SHAPE[0], input_height=LATENT_SHAPE[1], input_width=LATENT_SHAPE[2],
                      patch_size=2, hidden_size=32, depth=2, num_heads=2, text_dim=text_dim, text_len=text_len,
                      pooled_dim=pooled_dim)
        with torch.no_grad():
            for p in net.parameters():
                if p.requires_grad and p.abs().max() == 0:
                    p.normal_(0.0, 0.02)
    return Precond(net, sigma_data=0.5, sigma_min=0.002, time_embed_scale=1000.0).eval()


def tiny_parts(work: str | os.PathLike, seed: int = 0, tau: float = 0.36931547704):
    """(precond, cfg, manifest) of the tiny model, with `work/data` (VAE, text tower) written."""
    from lct.config import load_config

    work = Path(work)
    data_dir = work / "data"
    data_dir.mkdir(parents=True, exist_ok=True)
    manifest = tiny_manifest(data_dir, seed)
    t = manifest["text"]
    precond = tiny_network(t["state_dim"], t["pooled_dim"], seed)
    cfg = load_config(None, ["model.arch=DiT-S/2", "model.hidden_size=32", "model.depth=2", "model.num_heads=2",
                             "model.patch_size=2", f"method.tau=[{tau}]", f"run.dir={work / 'run'}"])
    return precond, cfg, manifest


def make_tiny_export(work: str | os.PathLike, seed: int = 0, step: int = 123, ema: str = "ema",
                     tau: float = 0.36931547704, legacy: bool = False) -> Path:
    """Write `work/export` (a pipeline folder; with `legacy`, `work/legacy` in the format before
    pipelines) from a tiny network and `work/data` (VAE, text tower); returns the export
    directory (reused when it already exists)."""
    from lct.export import META, export_network

    work = Path(work)
    out = work / ("legacy" if legacy else "export")
    if (out / META).is_file():
        return out
    precond, cfg, manifest = tiny_parts(work, seed, tau)
    if legacy:
        return write_legacy_export(precond, out, cfg=cfg, manifest=manifest, ema_name=ema, step=step)
    ema_state = {k: v.detach().clone() for k, v in precond.state_dict().items()}
    return export_network(precond, ema_state, out, cfg=cfg, manifest=manifest, ema_name=ema, step=step)


def write_legacy_export(precond, out, *, cfg, manifest: dict, ema_name: str = "ema", step: int = 0) -> Path:
    """An export in the format lct wrote before exports became pipeline folders (lct-export/1):
    the TextDiT's `save_pretrained` files beside `lct_export.json`, the data's random text tower
    copied into `text_tower/` and a small local VAE into `vae/`. This is the old
    `lct.export.export_network`, kept verbatim in behaviour so that tests can check old exports
    still load."""
    import json
    import shutil

    import numpy as np
    import torch

    from lct.latents import latent_stats

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    net = precond.net
    with torch.random.fork_rng(devices=[]):
        cpu_net = type(net).from_config(net.config)
    cpu_net.load_state_dict(net.state_dict())
    cpu_net.save_pretrained(out, safe_serialization=True)
    mean, std = latent_stats(manifest, cfg.data.latent_norm)
    m = cfg.method
    meta = {
        "format": "lct-export/1", "ema": ema_name, "step": step,
        "method": {"objective": m.objective, "sigma_min": m.sigma_min,
                   "sample_sigma_min": m.sample_sigma_min if m.sample_sigma_min is not None else m.sigma_min,
                   "sigma_max": m.sigma_max, "sigma_data": m.sigma_data,
                   "time_embed_scale": m.time_embed_scale, "tau": list(m.tau)},
        "model": {"cond": cfg.model.cond, "arch": cfg.model.arch},
        "latent": {"norm": cfg.data.latent_norm, "shape": list(manifest["latent_shape"]),
                   "mean": np.asarray(mean, dtype=np.float64).tolist(),
                   "std": np.asarray(std, dtype=np.float64).tolist()},
        "vae": manifest.get("vae"), "text": manifest.get("text"), "resolution": manifest.get("resolution"),
        "manifest_path": manifest.get("manifest_path"), "config": cfg.model_dump(mode="json"),
    }
    text = manifest.get("text")
    if text and text.get("pretrained_relative") and Path(str(text["pretrained"])).is_file():
        rel = Path(text["pretrained_relative"])
        shutil.copytree(Path(str(text["pretrained"])).parent, out / rel.parent, dirs_exist_ok=True)
        meta["text"] = {**text, "pretrained": str(out / rel), "pretrained_relative": str(rel)}
    vae = manifest.get("vae")
    if vae and Path(str(vae.get("id"))).is_dir():
        shutil.copytree(Path(str(vae["id"])), out / "vae", dirs_exist_ok=True)
        meta["vae"] = {**vae, "id": str(out / "vae"), "id_relative": "vae", "source_id": str(vae["id"])}
    (out / "lct_export.json").write_text(json.dumps(meta, indent=1))
    return out


def legacy_parts(export_dir) -> dict:
    """What `python -m lct.sample` loaded from a legacy export before pipelines: `Precond(TextDiT)`,
    the open_clip `TextEncoder`, the VAE, the latent normalisation and the sampling constants."""
    import json

    import numpy as np
    import torch

    from lct.models import Precond, TextDiT
    from lct.text import TextEncoder
    from lct.vae import LatentNorm, load_vae

    d = Path(export_dir)
    meta = json.loads((d / "lct_export.json").read_text())
    m = meta["method"]
    return {"precond": Precond(TextDiT.from_pretrained(str(d)).eval(), sigma_data=m["sigma_data"],
                               sigma_min=m["sigma_min"], time_embed_scale=m["time_embed_scale"]).eval(),
            "text": TextEncoder.from_manifest({"text": meta["text"], "_dir": str(d)}),
            "vae": load_vae(str(d / meta["vae"]["id_relative"]), "cpu", torch.float32),
            "norm": LatentNorm(np.asarray(meta["latent"]["mean"]), np.asarray(meta["latent"]["std"])),
            "shape": meta["latent"]["shape"], "sigma_max": m["sigma_max"], "sample_sigma_min": m["sample_sigma_min"],
            "tau": m["tau"]}


def reference_images(parts: dict, captions, indices, *, seed: int, steps: int, taus=None, guidance: float = 1.0):
    """(uint8 [B,H,W,3] images, latents) by SPEC 9 written out here, independently of the pipeline:
    `Precond(TextDiT)` (the consistency function that trains) with the open_clip tower's condition
    (or `parts["condition"](captions)`: a pipeline's (states, mask, pooled)), the per-sample noise of
    `LCTPipeline.sample_generators`, guidance on f against the learned null in one batched call,
    `x + sqrt(tau^2 - sigma_min^2) z` between steps, SPEC 7's de-normalisation (`LatentNorm`),
    `lct.vae.decode`, diffusers' image post-processing."""
    import torch
    from diffusers.image_processor import VaeImageProcessor

    from lct.pipeline import LCTPipeline
    from lct.vae import decode

    if "condition" in parts:
        states, mask, pooled = parts["condition"](list(captions))
    else:
        enc = parts["text"]
        with torch.no_grad():
            states, mask, pooled = enc(enc.tokenize(list(captions)))
    taus = list(parts["tau"][: steps - 1]) if taus is None else list(taus)
    b, shape, net = len(indices), tuple(parts["shape"]), parts["precond"]
    gens = LCTPipeline.sample_generators(seed, indices)
    noise = lambda: torch.stack([torch.randn(shape, generator=g) for g in gens])
    off, on = torch.zeros(b, dtype=torch.bool), torch.ones(b, dtype=torch.bool)

    def f(x, level):
        with torch.no_grad():
            if guidance == 1.0:
                return net(x, torch.full((b,), level), text_states=states, text_mask=mask, pooled=pooled, cond_drop=off)
            two = net(torch.cat([x, x]), torch.full((2 * b,), level), text_states=torch.cat([states, states]),
                      text_mask=torch.cat([mask, mask]), pooled=torch.cat([pooled, pooled]),
                      cond_drop=torch.cat([off, on]))
            return two[b:] + guidance * (two[:b] - two[b:])

    smax, smin = parts["sigma_max"], parts["sample_sigma_min"]
    x = f(smax * noise(), smax)
    for tau in taus:
        x = f(x + math.sqrt(max(tau * tau - smin * smin, 0.0)) * noise(), tau)
    with torch.no_grad():
        img = decode(parts["vae"], parts["norm"].denormalize(x))
    u8 = (VaeImageProcessor().postprocess(img, output_type="np") * 255).round().astype("uint8")
    return u8, x


def module_tiny_export(tmp_path_factory) -> Path:
    """A tiny export for a test module's fixture: made on one thread, leaving the global RNG as it was."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.random.fork_rng(devices=[]):
            return make_tiny_export(tmp_path_factory.mktemp("tiny") / "work")
    finally:
        torch.set_num_threads(threads)
