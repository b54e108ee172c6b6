"""The diffusers autoencoders (`AutoencoderKL`; Sana's `AutoencoderDC`): loading, posterior
encoding, decoding, latent normalisation (SPEC 7) and the image preprocessing shared by data prep
and eval.

Image preprocessing (`preprocess_image`), the one definition used by `encode_latents` and eval:
1. decode with PIL and convert to 8-bit RGB (`to_rgb`: high-bit grayscale, PIL modes `I;16*`
   (16-bit PNG/TIFF) and `I` (32-bit integer, read as 16-bit), is scaled to 8 bits,
   `round(v / 257)`; `F` (float) is read as [0, 1] when its maximum is at most 1, else as
   [0, 255]; every other mode through `convert("RGB")`. No EXIF rotation is applied, as in the
   usual FID pipelines; palette/alpha images lose their alpha channel);
2. center-crop the long edge to a square (side = the short edge; offsets `(long - short) // 2`);
3. resize to `resolution x resolution` with PIL `BICUBIC` (antialiased when downscaling: PIL
   widens the filter support by the scale factor) unless the square already has that size;
4. uint8 HWC -> `[3, R, R]` float32 `x / 127.5 - 1` in [-1, 1].
`preprocess_image_uint8` stops before step 4 (data loaders ship uint8 and convert on the device
with `to_unit_range`, which gives the same numbers).

Latent normalisation (SPEC 7): `x = (raw - mean) / std * 0.5` and back `raw = x / 0.5 * std + mean`
with the manifest's float64 statistics of the raw posterior samples (`channel`: per channel,
`element`: per C x H x W element; sigma_data 0.5). `vae`: the model's own space of a pretrained
diffusion model (SPEC 14.4), `x = (raw - shift_factor) * scaling_factor` with the VAE config's
values, back `raw = x / scaling_factor + shift_factor`, sigma_data 1.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from lct.errors import UserError
from lct.latents import latent_stats, load_manifest

_VAE_HINT = ("set --vae (vae.id in a config) to a local folder written by AutoencoderKL.save_pretrained "
             "(e.g. a download of stabilityai/sd-vae-ft-ema; AutoencoderDC for Sana) or to a full pipeline folder "
             "with a vae/ subfolder")
# The diffusers autoencoders lct encodes with, by config `_class_name`: the KL VAEs (SD, SDXL, SD3's
# 16-channel VAE with shift_factor) and Sana's deterministic deep-compression autoencoder (DC-AE).
VAE_CLASSES = ("AutoencoderKL", "AutoencoderDC")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def _short(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return (text[0] if text else type(err).__name__)[:300]


def load_vae(id_or_path: str, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
    """A frozen `AutoencoderKL` or `AutoencoderDC` (by its config's class name) in eval mode from a
    hub id or a local `save_pretrained` folder (or a pipeline folder with a `vae/` subfolder).
    Missing or unreachable weights raise a `UserError` naming `--vae` / `vae.id`."""
    kwargs: dict[str, Any] = check_vae_source(id_or_path)  # before the (slow) diffusers import
    s = str(id_or_path)
    path = Path(s).expanduser()
    if not path.exists():  # a hub id: the cache first, offline at once where the hub cannot be reached
        from lct.hub import resolve_pretrained

        src = resolve_pretrained(s, key="--vae (vae.id)", subfolders=("", "vae"), what="VAE")
    import diffusers

    name, kw = (str(path), kwargs) if path.exists() else (src.name, src.kwargs)
    try:
        cls_name = diffusers.AutoencoderKL.load_config(name, **kw).get("_class_name") or "AutoencoderKL"
    except Exception as err:
        raise UserError(f"--vae {s}: unreadable VAE config ({_short(err)}); {_VAE_HINT}") from None
    if cls_name not in VAE_CLASSES:
        raise UserError(f"--vae {s}: holds a {cls_name}, not one of {', '.join(VAE_CLASSES)}; {_VAE_HINT}")
    cls = getattr(diffusers, cls_name)
    try:
        vae = cls.from_pretrained(name, torch_dtype=dtype, low_cpu_mem_usage=False, **kw)
    except Exception as err:  # incomplete folder, unreadable weights, a partial download
        where = "" if path.exists() else " from the hub or its cache"
        raise UserError(f"--vae {s}: could not load the {cls_name}{where} ({_short(err)}); {_VAE_HINT}") from None
    return vae.to(device=device).eval().requires_grad_(False)


def is_deterministic(vae) -> bool:
    """Whether the autoencoder encodes to one latent (AutoencoderDC) rather than a posterior."""
    return type(vae).__name__ == "AutoencoderDC"


def check_vae_source(id_or_path: str) -> dict:
    """Cheap checks of `--vae` (no diffusers import): a local folder with a config (returns the
    `from_pretrained` kwargs) or something shaped like a hub id; else a `UserError`."""
    if not id_or_path:
        raise UserError(f"no VAE given: {_VAE_HINT}")
    s = str(id_or_path)
    path = Path(s).expanduser()
    if path.exists():
        if (path / "config.json").is_file():
            return {}
        if (path / "vae" / "config.json").is_file():
            return {"subfolder": "vae"}
        raise UserError(f"--vae {s}: no config.json in this folder (nor in vae/); {_VAE_HINT}")
    if _HUB_ID.match(s) and not s.startswith((".", "~")):
        return {}
    raise UserError(f"--vae {s}: no such folder; {_VAE_HINT}")


def vae_source(id_or_path: str) -> str:
    """What the manifest records: an absolute path for local folders, else the hub id."""
    p = Path(str(id_or_path)).expanduser()
    return str(p.resolve()) if p.exists() else str(id_or_path)


def downsample_factor(vae) -> int:
    cfg = vae.config
    levels = cfg.encoder_block_out_channels if is_deterministic(vae) else cfg.block_out_channels
    return 2 ** (len(levels) - 1)


def latent_shape(vae, resolution: int) -> tuple[int, int, int]:
    f = downsample_factor(vae)
    if resolution % f:
        raise UserError(f"--resolution {resolution} is not a multiple of the VAE's downsampling factor {f}")
    return (int(vae.config.latent_channels), resolution // f, resolution // f)


def vae_summary(vae, id_or_path: str) -> dict:
    """The manifest's "vae" record: id, class and the config values that shape the latents."""
    cfg = dict(vae.config)
    keep = ("latent_channels", "block_out_channels", "encoder_block_out_channels", "down_block_types",
            "layers_per_block", "sample_size",
            "scaling_factor", "shift_factor", "force_upcast", "use_quant_conv")
    summary = {k: cfg.get(k) for k in keep if k in cfg}
    full = json.dumps({k: v for k, v in cfg.items() if not k.startswith("_")}, sort_keys=True, default=str)
    return {"id": vae_source(id_or_path), "class": type(vae).__name__, "downsample": downsample_factor(vae),
            "config": json.loads(json.dumps(summary, default=list)),
            "config_sha256": hashlib.sha256(full.encode()).hexdigest()}


@torch.no_grad()
def encode_posterior(vae, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior (mean, std) in fp32 of images [B,3,H,W] in [-1, 1] (`latent_dist.mean/std`),
    computed in the VAE's own dtype on its device. A deterministic AutoencoderDC gives its latent
    and std 0 (sampling `mean + std * eps` is then the latent itself, as Sana trains on it)."""
    p = next(vae.parameters())
    out = vae.encode(images.to(device=p.device, dtype=p.dtype))
    if is_deterministic(vae):
        return out.latent.float(), torch.zeros_like(out.latent, dtype=torch.float32)
    dist = out.latent_dist
    return dist.mean.float(), dist.std.float()


@torch.no_grad()
def decode(vae, raw_latents: torch.Tensor) -> torch.Tensor:
    """Images [B,3,H,W] fp32 in [-1, 1] from raw (unnormalised, unscaled) latents."""
    p = next(vae.parameters())
    out = vae.decode(raw_latents.to(device=p.device, dtype=p.dtype)).sample
    return out.float().clamp(-1.0, 1.0)


def latents_to_images(vae, norm: "LatentNorm", latents: torch.Tensor) -> torch.Tensor:
    """Images [B,3,H,W] fp32 in [-1, 1] from normalised latents (what the network samples): the
    SPEC 7 normalisation undone, then decoded (the trainer's grids, `lct.sample`, eval)."""
    return decode(vae, norm.denormalize(latents))


# ----------------------------------------------------------------------------------------------
# SPEC 7 normalisation
# ----------------------------------------------------------------------------------------------


class LatentNorm:
    """`x = (raw - mean) / std * 0.5` with float64 statistics shaped [C,1,1] (channel) or [C,h,w]
    (element), or `x = (raw - shift) * scale` (`vae`, built by `from_vae`); tensors keep their dtype
    (computed in fp32, or fp64 for fp64 input). `sigma_data` is the data scale the kind gives."""

    SIGMA_DATA = {"channel": 0.5, "element": 0.5, "vae": 1.0}

    def __init__(self, mean, std, kind: str | None = None):
        mean = np.asarray(mean, dtype=np.float64)
        std = np.asarray(std, dtype=np.float64)
        if mean.ndim == 1:
            mean, std = mean.reshape(-1, 1, 1), std.reshape(-1, 1, 1)
        if mean.shape != std.shape or mean.ndim != 3:
            raise ValueError(f"LatentNorm: mean {mean.shape} and std {std.shape} must be [C,1,1] or [C,h,w]")
        if not (np.all(np.isfinite(mean)) and np.all(np.isfinite(std)) and np.all(std > 0)):
            raise UserError("latent statistics are not finite and positive; re-run data_prep/encode_latents.py")
        self.mean, self.std = mean, std
        self.kind = kind or ("channel" if mean.shape[1:] == (1, 1) else "element")
        self._cache: dict = {}

    @property
    def sigma_data(self) -> float:
        return self.SIGMA_DATA[self.kind]

    @classmethod
    def from_vae(cls, scaling_factor: float, shift_factor: float | None = None) -> "LatentNorm":
        """`vae` kind (SPEC 14.4): the diffusers convention `x = (raw - shift_factor) * scaling_factor`
        (`shift_factor` None = 0), the space a pretrained diffusion model was trained in."""
        scale, shift = float(scaling_factor), float(shift_factor or 0.0)
        if not (np.isfinite(scale) and scale > 0 and np.isfinite(shift)):
            raise UserError(f"the VAE's scaling_factor {scaling_factor} / shift_factor {shift_factor} must be "
                            "finite, with scaling_factor > 0")
        # mean/std say the same map in the channel form (std = 0.5 / scale); normalize uses scale itself.
        norm = cls([shift], [0.5 / scale], kind="vae")
        norm.scale, norm.shift = scale, shift
        return norm

    @classmethod
    def from_manifest(cls, manifest: dict | str | os.PathLike, kind: str = "channel") -> "LatentNorm":
        if not isinstance(manifest, dict):
            manifest = load_manifest(manifest)
        if kind == "vae":
            cfg = (manifest.get("vae") or {}).get("config") or {}
            if cfg.get("scaling_factor") is None:
                raise UserError("latent_norm vae: the data's manifest records no VAE scaling_factor; re-run "
                                "data_prep/encode_latents.py with the model's VAE or use latent_norm channel")
            return cls.from_vae(cfg["scaling_factor"], cfg.get("shift_factor"))
        mean, std = latent_stats(manifest, kind)
        return cls(mean, std, kind)

    def _stats(self, ref):
        if isinstance(ref, np.ndarray):
            dt = np.float64 if ref.dtype == np.float64 else np.float32
            return self.mean.astype(dt), self.std.astype(dt), dt
        dt = torch.float64 if ref.dtype == torch.float64 else torch.float32
        key = (ref.device, dt)
        if key not in self._cache:
            self._cache[key] = (torch.as_tensor(self.mean, dtype=dt, device=ref.device),
                                torch.as_tensor(self.std, dtype=dt, device=ref.device))
        return (*self._cache[key], dt)

    def normalize(self, raw):
        mean, std, dt = self._stats(raw)
        out = (raw.astype(dt) if isinstance(raw, np.ndarray) else raw.to(dt)) - mean
        out = out * self.scale if self.kind == "vae" else out / std * 0.5
        return out.astype(raw.dtype) if isinstance(raw, np.ndarray) else out.to(raw.dtype)

    def denormalize(self, x):
        mean, std, dt = self._stats(x)
        out = x.astype(dt) if isinstance(x, np.ndarray) else x.to(dt)
        out = out / self.scale + mean if self.kind == "vae" else out / 0.5 * std + mean
        return out.astype(x.dtype) if isinstance(x, np.ndarray) else out.to(x.dtype)


# ----------------------------------------------------------------------------------------------
# Image preprocessing (data prep and eval)
# ----------------------------------------------------------------------------------------------


def open_image(data: bytes):
    """A fully decoded PIL image from encoded bytes (raises on corrupt or truncated data)."""
    img = Image.open(io.BytesIO(data))
    img.load()
    return img


def center_crop_square(img):
    """The centred square of side min(w, h) (the long edge is cropped)."""
    w, h = img.size
    s = min(w, h)
    left, top = (w - s) // 2, (h - s) // 2
    return img.crop((left, top, left + s, top + s)) if (w, h) != (s, s) else img


def to_rgb(img):
    """An 8-bit RGB PIL image (step 1 of the module docstring). `convert("RGB")` clips high-bit
    grayscale to 0..255 (a 16-bit PNG comes out almost white), so those modes are scaled here."""
    from PIL import Image

    if img.mode.startswith("I;16") or img.mode == "I":
        v = np.asarray(img).astype(np.float64)
        img = Image.fromarray(np.round(np.clip(v, 0, 65535) / 257.0).astype(np.uint8), "L")
    elif img.mode == "F":
        v = np.nan_to_num(np.asarray(img).astype(np.float64))
        scale = 255.0 if v.size and v.max() <= 1.0 else 1.0
        img = Image.fromarray(np.round(np.clip(v * scale, 0, 255)).astype(np.uint8), "L")
    return img if img.mode == "RGB" else img.convert("RGB")


def preprocess_image_uint8(img, resolution: int) -> torch.Tensor:
    """Steps 1-3 of the module docstring: uint8 [3, R, R]."""
    img = center_crop_square(to_rgb(img))
    if img.size != (resolution, resolution):
        img = img.resize((resolution, resolution), Image.BICUBIC)
    arr = np.array(img, dtype=np.uint8, copy=True)
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()


def to_unit_range(u8: torch.Tensor) -> torch.Tensor:
    """uint8 -> float32 in [-1, 1] (`x / 127.5 - 1`)."""
    return u8.float() / 127.5 - 1.0


def preprocess_image(img, resolution: int) -> torch.Tensor:
    """PIL image -> float32 [3, R, R] in [-1, 1] (RGB, center crop, bicubic resize)."""
    return to_unit_range(preprocess_image_uint8(img, resolution))
