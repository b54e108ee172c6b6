"""Evaluation metrics: Frechet distance, FID Inception features and statistics, CLIP score.

* `frechet_distance`: the Frechet distance of two Gaussians in the eigenvalue form (no `sqrtm`).
* FID features: torch-fidelity's FID Inception (`FeatureExtractorInceptionV3`, the TF-2015-12-05
  graph ported bit-exactly, feature '2048'), fed uint8 `[N,3,H,W]` images; it resizes to 299 x 299
  itself (TF1-compatible bilinear) and scales to [-1, 1]. Weights come from `--fid-weights` (a
  local file) or torch-fidelity's release URL when online; `FIDStats` holds mu/sigma (float64) and
  caches them as `.npz` with a metadata dict.
* CLIP score (open_clip): `100 * max(cos(E_image, E_text), 0)` per image, and its mean.

`import lct.metrics` loads neither torch-fidelity nor open_clip; the functions that need them do.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import torch

from lct.errors import UserError
from lct.files import atomic_file

# --------------------------------------------------------------------------------------------
# Image forms
# --------------------------------------------------------------------------------------------


def images_to_uint8(images: Any, value_range: tuple[float, float] | None = None) -> np.ndarray:
    """Any batch of RGB images as a uint8 numpy array `[N, H, W, 3]`.

    Accepted: a list/tuple of PIL images (any mode; converted to RGB) or of single images in the
    array forms below; a numpy array or torch tensor `[N,H,W,3]`, `[N,3,H,W]` (or one image
    `[H,W,3]` / `[3,H,W]`, or grey `[N,H,W]`/`[N,1,H,W]`). uint8 values are taken as they are.
    Floating values are in `value_range`; by default [-1, 1] when any value is below -0.01
    (generator outputs; a shapes image in [-1, 1] always has negative values), else [0, 1]. Values
    are clipped to the range and rounded.
    """
    from PIL import Image

    if isinstance(images, Image.Image):
        images = [images]
    if isinstance(images, (list, tuple)):
        if len(images) == 0:
            return np.zeros((0, 0, 0, 3), dtype=np.uint8)
        parts = [np.asarray(im.convert("RGB"))[None] if isinstance(im, Image.Image)
                 else images_to_uint8(im if _ndim(im) == 4 else im[None], value_range) for im in images]
        return np.concatenate(parts, 0)
    if isinstance(images, torch.Tensor):
        images = images.detach().cpu()
        images = images.numpy() if images.dtype != torch.bfloat16 else images.float().numpy()
    x = np.asarray(images)
    if x.ndim == 3:
        # One image [H,W,3] / [3,H,W], or a grey batch [N,H,W].
        x = x[None] if (x.shape[-1] in (1, 3) or x.shape[0] in (1, 3)) else x[..., None]
    if x.ndim != 4:
        raise ValueError(f"expected images [N,H,W,3] or [N,3,H,W], got shape {x.shape}")
    if x.shape[-1] not in (1, 3) and x.shape[1] in (1, 3):
        x = x.transpose(0, 2, 3, 1)
    if x.shape[-1] == 1:
        x = np.repeat(x, 3, axis=-1)
    if x.shape[-1] != 3:
        raise ValueError(f"expected 3 colour channels, got shape {x.shape}")
    if x.dtype == np.uint8:
        return np.ascontiguousarray(x)
    if x.dtype == bool or np.issubdtype(x.dtype, np.integer):
        return np.clip(x, 0, 255).astype(np.uint8)
    x = x.astype(np.float64)
    if value_range is None:
        value_range = (-1.0, 1.0) if x.size and float(np.nanmin(x)) < -0.01 else (0.0, 1.0)
    lo, hi = value_range
    x = np.nan_to_num((x - lo) / (hi - lo), nan=0.0)
    return np.round(np.clip(x, 0.0, 1.0) * 255.0).astype(np.uint8)


def _ndim(x: Any) -> int:
    return len(getattr(x, "shape", ()))


def to_uint8_nchw(images: Any, value_range: tuple[float, float] | None = None) -> torch.Tensor:
    """`images_to_uint8` as a uint8 tensor `[N, 3, H, W]` (the form FID Inception takes)."""
    if isinstance(images, torch.Tensor) and images.dtype == torch.uint8 and images.ndim == 4 \
            and images.shape[1] == 3:
        return images
    return torch.from_numpy(images_to_uint8(images, value_range)).permute(0, 3, 1, 2).contiguous()


# --------------------------------------------------------------------------------------------
# Frechet distance
# --------------------------------------------------------------------------------------------


def frechet_distance(mu1: Any, sigma1: Any, mu2: Any, sigma2: Any) -> float:
    """Frechet distance between N(mu1, sigma1) and N(mu2, sigma2), in float64:

        ||mu1 - mu2||^2 + tr(S1) + tr(S2) - 2 * sum_i sqrt(lambda_i(S1 @ S2))

    tr(sqrt(S1 S2)) is computed from the eigenvalues of S1 @ S2, not with `scipy.linalg.sqrtm`:
    SciPy >= 1.18 removed `sqrtm(disp=...)`, which broke clean-fid and pytorch-fid, and sqrtm is
    slow and can return spurious complex parts. The eigenvalues of S1 S2 equal those of
    sqrt(S1) S2 sqrt(S1) (similar matrices), which is symmetric PSD for PSD inputs, so they are
    real and non-negative up to rounding: we take real parts and clip tiny negatives to 0. This is
    the form torch-fidelity uses (`fid_statistics_to_metric`).
    """
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    s1, s2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != (mu1.size, mu1.size):
        raise ValueError(f"shape mismatch: mu {mu1.shape}/{mu2.shape}, sigma {s1.shape}/{s2.shape}")
    diff = mu1 - mu2
    eig = np.linalg.eigvals(s1 @ s2)
    tr_covmean = float(np.sqrt(np.clip(eig.real, 0.0, None)).sum())
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * tr_covmean)


# --------------------------------------------------------------------------------------------
# FID statistics
# --------------------------------------------------------------------------------------------


@dataclass
class FIDStats:
    """Gaussian statistics of FID features: mean `mu` [D] and covariance `sigma` [D,D] (float64,
    unbiased like torch-fidelity and pytorch-fid), the number of images `n`, and `meta` (what was
    measured: a `fingerprint` of the files and settings, for cache checks)."""

    mu: np.ndarray
    sigma: np.ndarray
    n: int
    meta: dict = field(default_factory=dict)

    @classmethod
    def from_features(cls, features: Any, meta: dict | None = None) -> "FIDStats":
        f = features.detach().cpu().double().numpy() if isinstance(features, torch.Tensor) \
            else np.asarray(features, np.float64)
        if f.ndim != 2 or f.shape[0] < 2:
            raise ValueError(f"need features [N>=2, D], got {f.shape}")
        return cls(mu=f.mean(0), sigma=np.cov(f, rowvar=False), n=int(f.shape[0]), meta=dict(meta or {}))

    def distance(self, other: "FIDStats") -> float:
        return frechet_distance(self.mu, self.sigma, other.mu, other.sigma)

    def save(self, path: str | os.PathLike) -> None:
        """Write `.npz` (mu, sigma, n, meta as JSON) atomically."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_file(path) as f:
            np.savez(f, mu=self.mu, sigma=self.sigma, n=np.int64(self.n),
                     meta=np.array(json.dumps(self.meta, sort_keys=True)))

    @classmethod
    def load(cls, path: str | os.PathLike) -> "FIDStats":
        """Read stats written by `save`, or a pytorch-fid/clean-fid style `.npz` with mu and sigma."""
        path = Path(path)
        if not path.is_file():
            raise UserError(f"FID statistics file not found: {path}")
        try:
            with np.load(path, allow_pickle=False) as z:
                mu, sigma = np.asarray(z["mu"], np.float64), np.asarray(z["sigma"], np.float64)
                n = int(z["n"]) if "n" in z else 0
                meta = json.loads(str(z["meta"])) if "meta" in z else {}
        except (KeyError, ValueError, OSError) as err:
            raise UserError(f"{path} is not an FID statistics .npz with mu and sigma ({err})") from None
        return cls(mu=mu, sigma=sigma, n=n, meta=meta)


def fingerprint(files: Iterable[str | os.PathLike] = (), settings: dict | None = None,
                content: bool = True) -> str:
    """sha256 over the files (base name, size and, with `content`, their bytes) and the settings
    (JSON, sorted keys): the cache key of reference statistics."""
    h = hashlib.sha256()
    h.update(json.dumps(settings or {}, sort_keys=True, default=str).encode())
    for p in sorted(Path(f) for f in files):
        h.update(f"\0{p.name}\0{p.stat().st_size}\0".encode())
        if content:
            with open(p, "rb") as fh:
                for chunk in iter(lambda: fh.read(1 << 20), b""):
                    h.update(chunk)
    return h.hexdigest()


def load_cached_stats(path: str | os.PathLike, meta: dict) -> FIDStats | None:
    """Stats cached at `path` if they exist and their `meta` equals `meta`, else None."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        stats = FIDStats.load(path)
    except UserError:
        return None
    return stats if stats.meta == json.loads(json.dumps(meta, sort_keys=True, default=str)) else None


# --------------------------------------------------------------------------------------------
# FID Inception features
# --------------------------------------------------------------------------------------------

FID_WEIGHTS_FILE = "weights-inception-2015-12-05-6726825d.pth"


def load_fid_inception(weights_path: str | os.PathLike | None = None,
                       device: str | torch.device = "cpu") -> torch.nn.Module:
    """torch-fidelity's FID Inception v3 returning the '2048' pool features, in eval mode.

    `weights_path`: a local copy of torch-fidelity's `weights-inception-2015-12-05-6726825d.pth`;
    None downloads it (or finds it in the torch hub cache). Failing either is a `UserError` naming
    `--fid-weights` (the eval script marks FID skipped).
    """
    try:
        from torch_fidelity import feature_extractor_inceptionv3 as tfi
    except ImportError:
        raise UserError("FID needs torch-fidelity: `pip install torch-fidelity` "
                        "(or `pip install 'lct[eval]'`)") from None
    if weights_path is not None:
        if not Path(weights_path).is_file():
            raise UserError(f"--fid-weights: FID Inception weights file not found: {weights_path} "
                            f"(download {tfi.URL_INCEPTION_V3})")
        weights_path = str(weights_path)
    try:
        model = tfi.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"],
                                                feature_extractor_weights_path=weights_path)
    except Exception as err:  # network errors, corrupt or wrong files: all fixable by the user
        what = (f"could not load FID Inception weights from {weights_path}" if weights_path else
                f"could not download the FID Inception weights ({tfi.URL_INCEPTION_V3})")
        raise UserError(f"{what}: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}; "
                        f"pass a local copy of {FID_WEIGHTS_FILE} with --fid-weights PATH") from None
    return model.to(device).eval()


@torch.no_grad()
def fid_features(model: torch.nn.Module, images: Any, batch_size: int = 50,
                 value_range: tuple[float, float] | None = None) -> torch.Tensor:
    """'2048' features `[N, 2048]` (float64, CPU) of `images`, given as uint8 `[N,3,H,W]` (as
    torch-fidelity expects: it resizes to 299 itself) or any form `images_to_uint8` accepts."""
    x = to_uint8_nchw(images, value_range)
    device = next(model.parameters()).device
    out = []
    for i in range(0, x.shape[0], batch_size):
        (feat,) = model(x[i:i + batch_size].to(device))
        out.append(feat.double().cpu())
    return torch.cat(out, 0) if out else torch.zeros(0, 2048, dtype=torch.float64)


# --------------------------------------------------------------------------------------------
# CLIP score
# --------------------------------------------------------------------------------------------

CLIP_MODEL = "ViT-g-14"
CLIP_PRETRAINED = "laion2b_s34b_b88k"


def load_clip(model_name: str = CLIP_MODEL, pretrained: str | None = CLIP_PRETRAINED,
              device: str | torch.device = "cpu") -> tuple[torch.nn.Module, Any, Any]:
    """(model, tokenizer, preprocess) of an open_clip model; default ViT-g-14 / laion2b_s34b_b88k.

    `pretrained`: an open_clip tag or a local checkpoint path. A missing model name or weight file
    (or no network) is a `UserError` naming `--clip-model` / `--clip-pretrained`.
    """
    try:
        import open_clip
    except ImportError:
        raise UserError("the CLIP score needs open_clip: `pip install open_clip_torch`") from None
    if ":" not in model_name and model_name not in open_clip.list_models():
        raise UserError(f"--clip-model: unknown open_clip model {model_name!r} "
                        "(see open_clip.list_models())")
    if pretrained and ("/" in pretrained or os.sep in pretrained or
                       pretrained.endswith((".bin", ".pt", ".pth", ".safetensors"))) \
            and not Path(pretrained).is_file():
        raise UserError(f"--clip-pretrained: open_clip weight file not found: {pretrained}")
    try:
        model, _, preprocess = open_clip.create_model_and_transforms(model_name, pretrained=pretrained,
                                                                     device=device)
        tokenizer = open_clip.get_tokenizer(model_name)
    except Exception as err:  # unknown tag, missing file, no network
        raise UserError(f"--clip-pretrained: could not load open_clip weights {pretrained!r} for "
                        f"{model_name}: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
                        "; pass a local checkpoint path or a tag from open_clip.list_pretrained()") from None
    model.eval()
    model.lct_label = f"{model_name}/{pretrained}" if pretrained else model_name
    return model, tokenizer, preprocess


@torch.no_grad()
def clip_embeddings(images: Any, captions: Sequence[str], model: torch.nn.Module, tokenizer: Any,
                    preprocess: Any, batch_size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """Unnormalised image and text embeddings (float32, CPU) of the pairs."""
    from PIL import Image

    arr = images_to_uint8(images)
    if arr.shape[0] != len(captions):
        raise ValueError(f"{arr.shape[0]} images but {len(captions)} captions")
    device = next(model.parameters()).device
    img_emb, txt_emb = [], []
    for i in range(0, len(captions), batch_size):
        pix = torch.stack([preprocess(Image.fromarray(a)) for a in arr[i:i + batch_size]]).to(device)
        tok = tokenizer(list(captions[i:i + batch_size])).to(device)
        img_emb.append(model.encode_image(pix).float().cpu())
        txt_emb.append(model.encode_text(tok).float().cpu())
    if not img_emb:
        return torch.zeros(0, 0), torch.zeros(0, 0)
    return torch.cat(img_emb), torch.cat(txt_emb)


def clip_score(images: Any, captions: Sequence[str], model: torch.nn.Module, tokenizer: Any,
               preprocess: Any, batch_size: int = 32, label: str | None = None) -> dict[str, Any]:
    """CLIP score of image-caption pairs with an open_clip model (from `load_clip`).

    Per image `100 * max(cos(E_I, E_C), 0)` (Hessel et al. 2021 with w = 100, the torchmetrics
    scale; embeddings normalised as torchmetrics does, `e / e.norm(p=2, dim=-1, keepdim=True)`).
    Returns `clip_score` (mean of the per-image scores), `per_image` (numpy), `clip_score_tm`
    (torchmetrics' aggregate `max(mean(100 cos), 0)`, which clamps the mean rather than each image;
    equal to `clip_score` when no cosine is negative, as with trained CLIP models), `n`, and `model`
    (the label, default the `lct_label` set by `load_clip`: results depend on the CLIP model).
    """
    img, txt = clip_embeddings(images, captions, model, tokenizer, preprocess, batch_size)
    if img.shape[0] == 0:
        return {"clip_score": float("nan"), "per_image": np.zeros(0), "clip_score_tm": float("nan"),
                "n": 0, "model": label or getattr(model, "lct_label", type(model).__name__)}
    img = img / img.norm(p=2, dim=-1, keepdim=True)
    txt = txt / txt.norm(p=2, dim=-1, keepdim=True)
    raw = 100 * (img * txt).sum(dim=-1)
    per_image = torch.clamp(raw, min=0)
    return {"clip_score": float(per_image.mean()), "per_image": per_image.numpy(),
            "clip_score_tm": float(torch.clamp(raw.mean(), min=0)), "n": int(raw.shape[0]),
            "model": label or getattr(model, "lct_label", type(model).__name__)}
