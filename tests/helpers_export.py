"""A tiny exported model for eval and sampling tests (no downloads, CPU, about a second).

    export_dir = make_tiny_export(tmp / "work")   # tmp/work/export (lct_export.json + safetensors)

Built the way the trainer builds one: a tiny `TextDiT` (latents 4 x 8 x 8, patch 2, width 32,
depth 2, text dims of the tiny text tower) wrapped in `Precond`, written by
`lct.export.export_network` with a real `TrainConfig` and a manifest in the format
`data_prep/encode_latents.py` writes (VAE record from `lct.vae.vae_summary`, text record from
`TextEncoder.record`, latent statistics sums). The data folder `tmp/work/data/` holds the tiny
VAE (`vae/`, downsampling 4: 32 x 32 images) and the seeded random tiny text tower
(`text_tower/`), as data prep leaves them.
"""

from __future__ import annotations

import os
from pathlib import Path

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


def tiny_network(text_dim: int = 128, pooled_dim: int = 128, seed: int = 0):
    """The tiny `TextDiT` in `Precond`, with random (seeded) weights everywhere, including the
    adaLN-Zero output layers (a zero-initialised DiT would output nothing but the skip path)."""
    import torch

    from lct.models import Precond, TextDiT

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = TextDiT(in_channels=LATENT_SHAPE[0], input_height=LATENT_SHAPE[1], input_width=LATENT_SHAPE[2],
                      patch_size=2, hidden_size=32, depth=2, num_heads=2, text_dim=text_dim, text_len=77,
                      pooled_dim=pooled_dim)
        with torch.no_grad():
            for p in net.parameters():
                if p.requires_grad and p.abs().max() == 0:
                    p.normal_(0.0, 0.02)
    return Precond(net, sigma_data=0.5, sigma_min=0.002, time_embed_scale=1000.0).eval()


def make_tiny_export(work: str | os.PathLike, seed: int = 0, step: int = 123, ema: str = "ema",
                     tau: float = 0.36931547704) -> Path:
    """Write `work/export` (an lct export) from a tiny network and `work/data` (VAE, text tower);
    returns the export directory (reused when it already exists)."""
    from lct.config import load_config
    from lct.export import META, export_network

    work = Path(work)
    out = work / "export"
    if (out / META).is_file():
        return out
    data_dir = work / "data"
    data_dir.mkdir(parents=True, exist_ok=True)
    manifest = tiny_manifest(data_dir, seed)
    t = manifest["text"]
    precond = tiny_network(t["state_dim"], t["pooled_dim"], seed)
    cfg = load_config(None, ["model.arch=DiT-S/2", "model.hidden_size=32", "model.depth=2", "model.num_heads=2",
                             "model.patch_size=2", f"method.tau=[{tau}]", f"run.dir={work / 'run'}"])
    ema_state = {k: v.detach().clone() for k, v in precond.state_dict().items()}
    return export_network(precond, ema_state, out, cfg=cfg, manifest=manifest, ema_name=ema, step=step)
