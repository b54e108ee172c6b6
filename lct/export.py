"""Exported models: an EMA of the network as a diffusers `save_pretrained` directory (config.json +
safetensors) plus `lct_export.json`, which records everything sampling needs: the SPEC 1
parameterisation (sigma_min for sampling, sigma_data, sigma_max, time-embedding scale, 2-step
tau), the latent normalisation statistics (SPEC 7), the VAE and the text tower the data used.

`load_model(path)` accepts an export directory or a run directory (then `export/<ema>/`).
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import yaml
from safetensors.torch import load_file

from lct.errors import UserError
from lct.files import atomic_dir, write_json
from lct.latents import latent_stats
from lct.models import Precond, TextDiT
from lct.vae import LatentNorm

EXPORT_FORMAT = "lct-export/1"
META = "lct_export.json"


def export_network(precond: torch.nn.Module, ema_state: dict[str, torch.Tensor], out_dir: Path, *,
                   cfg, manifest: dict, ema_name: str, step: int) -> Path:
    """Write EMA weights of `precond.net` with its config and the sampling metadata, atomically."""
    net = precond.net
    with torch.random.fork_rng(devices=[]):  # building the copy must not move the training RNG
        cpu_net = type(net).from_config(net.config)
    prefix = "net."
    state = {k[len(prefix):]: v for k, v in ema_state.items() if k.startswith(prefix)}
    missing, unexpected = cpu_net.load_state_dict(state, strict=False)
    frozen = {n for n, p in cpu_net.named_parameters() if not p.requires_grad} | set(dict(cpu_net.named_buffers()))
    if unexpected or [m for m in missing if m not in frozen]:
        raise RuntimeError(f"EMA does not match the network: missing {missing[:5]}, unexpected {unexpected[:5]}")
    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as tmp:
        cpu_net.save_pretrained(tmp, safe_serialization=True)
        _write_meta(tmp, out_dir, cfg, manifest, ema_name, step)
    return out_dir


def _write_meta(tmp: Path, out_dir: Path, cfg, manifest: dict, ema_name: str, step: int) -> None:
    """`lct_export.json` (format lct-export/1) and the text tower and VAE it carries."""
    mean, std = latent_stats(manifest, cfg.data.latent_norm)
    m = cfg.method
    meta = {
        "format": EXPORT_FORMAT,
        "ema": ema_name,
        "step": step,
        "method": {"objective": m.objective, "sigma_min": m.sigma_min,
                   "sample_sigma_min": m.sample_sigma_min if m.sample_sigma_min is not None else m.sigma_min,
                   "sigma_max": m.sigma_max, "sigma_data": m.sigma_data,
                   "time_embed_scale": m.time_embed_scale, "tau": list(m.tau)},
        "model": {"cond": cfg.model.cond, "arch": cfg.model.arch},
        "latent": {"norm": cfg.data.latent_norm, "shape": list(manifest["latent_shape"]),
                   "mean": np.asarray(mean, dtype=np.float64).tolist(),
                   "std": np.asarray(std, dtype=np.float64).tolist()},
        "vae": manifest.get("vae"),
        "text": manifest.get("text"),
        "resolution": manifest.get("resolution"),
        "manifest_path": manifest.get("manifest_path"),
        "config": cfg.model_dump(mode="json"),
    }
    meta["text"] = _carry_text_tower(manifest.get("text"), tmp, out_dir)
    meta["vae"] = _carry_vae(manifest.get("vae"), tmp, out_dir)
    write_json(tmp / META, meta)


def _carry_text_tower(text: dict | None, tmp: Path, final: Path) -> dict | None:
    """A text tower stored with the data (a random tower, or any local file the data prep
    recorded relative to its manifest) is copied into the export, so the export is self-contained."""
    if not text or not text.get("pretrained_relative"):
        return text
    src = Path(str(text["pretrained"]))
    if not src.is_file():
        return text
    rel = Path(text["pretrained_relative"])
    dst = tmp / rel
    shutil.copytree(src.parent, dst.parent, dirs_exist_ok=True)
    return {**text, "pretrained": str(final / rel), "pretrained_relative": str(rel)}


CARRY_VAE_MAX_BYTES = 200 * 2**20


def _carry_vae(vae: dict | None, tmp: Path, final: Path) -> dict | None:
    """A small local VAE folder (e.g. data_prep/train_vae.py's) travels with the export; a hub id
    or a large local copy (SD-VAE is 335 MB) is referenced, not copied at every checkpoint."""
    src = Path(str((vae or {}).get("id") or ""))
    if not vae or not src.is_dir():
        return vae
    size = sum(f.stat().st_size for f in src.rglob("*") if f.is_file())
    if size > CARRY_VAE_MAX_BYTES:
        return vae
    shutil.copytree(src, tmp / "vae", dirs_exist_ok=True)
    return {**vae, "id": str(final / "vae"), "id_relative": "vae", "source_id": str(src)}


def resolve_export(path: str | os.PathLike, ema: str | None = None) -> Path:
    """An export directory from an export or run directory (`export/<ema>/`, default the run's
    sample EMA)."""
    p = Path(path)
    if (p / META).is_file():
        return p
    exports = p / "export"
    if exports.is_dir():
        name = ema
        if name is None:
            cfg_file = p / "config.yaml"
            if cfg_file.is_file():
                name = (yaml.safe_load(cfg_file.read_text()).get("ema") or {}).get("sample")
        candidates = [exports / name] if name else sorted(exports.iterdir())
        for c in candidates:
            if (c / META).is_file():
                return c
        raise UserError(f"{p}: no export for EMA {name!r} (have: {[c.name for c in exports.iterdir()]}); "
                        "exports are written at each checkpoint")
    raise UserError(f"{p} is neither an lct export (no {META}) nor a run directory with export/; "
                    "pass --checkpoint RUN_DIR or RUN_DIR/export/<ema>")


def load_network_weights(path: str | os.PathLike, ema: str | None = None) -> dict[str, torch.Tensor]:
    """State dict of an exported network (for `model.init_from`)."""
    d = resolve_export(path, ema)
    files = sorted(d.glob("*.safetensors"))
    if not files:
        raise UserError(f"{d}: no safetensors weights")
    state: dict[str, torch.Tensor] = {}
    for f in files:
        state.update(load_file(str(f)))
    return state


@dataclass
class LoadedModel:
    """An exported model ready to sample: the parameterised network and what surrounds it."""

    precond: torch.nn.Module
    meta: dict
    path: Path

    def vae_id(self) -> str | None:
        """The VAE to decode with: the copy inside the export when there is one (moved exports)."""
        rec = self.meta.get("vae") or {}
        if rec.get("id_relative") and (self.path / rec["id_relative"]).is_dir():
            return str(self.path / rec["id_relative"])
        return rec.get("id")

    def text_manifest(self) -> dict:
        """The text record in the form `lct.text.TextEncoder.from_manifest` reads (paths relative
        to the export directory)."""
        return {"text": self.meta.get("text"), "_dir": str(self.path)}

    @property
    def latent_shape(self) -> tuple[int, ...]:
        return tuple(self.meta["latent"]["shape"])

    def latent_norm(self) -> LatentNorm:
        lat = self.meta["latent"]
        return LatentNorm(np.asarray(lat["mean"]), np.asarray(lat["std"]))


def load_model(path: str | os.PathLike, device: torch.device | str = "cpu", ema: str | None = None) -> LoadedModel:
    d = resolve_export(path, ema)
    meta = json.loads((d / META).read_text())
    if meta.get("format") != EXPORT_FORMAT:
        raise UserError(f"{d}: unknown export format {meta.get('format')!r}")
    net = TextDiT.from_pretrained(str(d)).to(device).eval()
    m = meta["method"]
    precond = Precond(net, sigma_data=m["sigma_data"], sigma_min=m["sigma_min"],
                      time_embed_scale=m["time_embed_scale"]).to(device).eval()
    return LoadedModel(precond, meta, d)
