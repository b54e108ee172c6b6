"""The feature models behind eval's metrics and their data: Frechet distance, FID Inception
features and statistics, CLIP score, their weight files, and reference images (FID's cached
statistics, the real images of precision/recall). The metrics built on them: `lct.metrics`.

* `frechet_distance`: the Frechet distance of two Gaussians in the eigenvalue form (no `sqrtm`).
* FID features: torch-fidelity's FID Inception (`FeatureExtractorInceptionV3`, the TF-2015-12-05
  graph ported bit-exactly, feature '2048'), fed uint8 `[N,3,H,W]` images; it resizes to 299 x 299
  itself (TF1-compatible bilinear) and scales to [-1, 1]. Weights come from `--fid-weights` (a
  local file) or torch-fidelity's release URL when online; `FIDStats` holds mu/sigma (float64) and
  caches them as `.npz` with a metadata dict.
* CLIP score (open_clip): `100 * max(cos(E_image, E_text), 0)` per image, and its mean.
* Weight files: read with `weights_only=True` (a pickle that would run code is refused); the FID
  Inception file's sha256 is checked against the published one and recorded.

`import lct.features` loads neither torch-fidelity nor open_clip; the functions that need them do.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from lct import dist
from lct.data import expand_urls
from lct.dist import DistInfo
from lct.errors import UserError
from lct.files import atomic_file, file_sha256
from lct.grids import images_to_uint8, to_uint8_nchw
from lct.vae import open_image, preprocess_image_uint8

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
        except Exception as err:  # KeyError, ValueError, OSError, EOFError, BadZipFile
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

FID_WEIGHTS_FILE = "weights-inception-2015-12-05-6726825d.pth"  # torch-fidelity's release file
# The same bytes are pytorch-fid's `pt_inception-2015-12-05-6726825d.pth` (both names end in this
# hash's first 8 hex digits, torch hub's convention; torchvision's Inception3 with 1008 classes and
# no aux head has exactly torch-fidelity's state-dict keys and shapes): either name is accepted.
FID_WEIGHTS_SHA256 = "6726825d0af5f729cebd5821db510b11b1cfad8faad88a03f1befd49fb9129b2"
FID_WEIGHTS_URL = ("https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/"
                   "weights-inception-2015-12-05-6726825d.pth")


def safe_state_dict(path: str | os.PathLike, flag: str) -> tuple[dict[str, torch.Tensor], str]:
    """(state dict, sha256) of a `.pth`/`.pt`/`.bin` weight file read with `weights_only=True`:
    a pickle that would run code or build anything but tensors is refused, never executed."""
    data = Path(path).read_bytes()
    sha = hashlib.sha256(data).hexdigest()
    try:
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as err:  # UnpicklingError for code, RuntimeError/EOFError for torn files
        lines = [l.strip() for l in str(err).splitlines() if l.strip()] or [type(err).__name__]
        why = next((l.split("error:", 1)[1].split(". ")[0].strip() for l in lines if "WeightsUnpickler error:" in l),
                   lines[0][:200])
        raise UserError(f"{flag} {path}: refused: not a readable plain tensor checkpoint (read with torch.load "
                        f"weights_only=True, which runs no code: {why})") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"{flag} {path}: not a state dict of tensors")
    return state, sha


def load_fid_inception(weights_path: str | os.PathLike | None = None,
                       device: str | torch.device = "cpu") -> torch.nn.Module:
    """torch-fidelity's FID Inception v3 returning the '2048' pool features, in eval mode.

    `weights_path`: a local copy of torch-fidelity's `weights-inception-2015-12-05-6726825d.pth`
    (or pytorch-fid's `pt_inception-2015-12-05-6726825d.pth`, the same file); None looks in the
    torch hub cache and downloads when online (`fid_weights_file`). The file is read with
    `weights_only=True` (torch-fidelity itself unpickles it fully); `model.lct_weights_sha256`
    and `model.lct_weights_verified` (the sha256 is the published file's) say what was loaded.
    Failures are a `UserError` naming `--fid-weights`.
    """
    try:
        from torch_fidelity import feature_extractor_inceptionv3 as tfi
    except ImportError:
        raise UserError("FID needs torch-fidelity: `pip install torch-fidelity` "
                        "(or `pip install 'lct-consistency[eval]'`)") from None
    path = fid_weights_file(weights_path, rank0=True)
    state, sha = safe_state_dict(path, "--fid-weights")
    buf = io.BytesIO()
    torch.save(state, buf)  # tensors only: torch-fidelity's full unpickling of these bytes runs no code
    buf.seek(0)
    try:
        model = tfi.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"], feature_extractor_weights_path=buf)
    except Exception as err:  # wrong keys or shapes
        first = str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__
        raise UserError(f"--fid-weights {path}: not the FID Inception state dict ({first}); pass a local "
                        f"copy of {FID_WEIGHTS_FILE}") from None
    model.lct_weights_sha256, model.lct_weights_verified = sha, sha == FID_WEIGHTS_SHA256
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


# --------------------------------------------------------------------------------------------
# Weight resolution
# --------------------------------------------------------------------------------------------

def offline() -> bool:
    return any(os.environ.get(k, "").strip().lower() in ("1", "true", "yes", "on")
               for k in ("HF_HUB_OFFLINE", "LCT_OFFLINE"))


def fid_weights_file(path: str | os.PathLike | None, rank0: bool) -> Path:
    """The local FID Inception weights: `path` (--fid-weights), the torch hub cache, or a download
    checked against the published sha256 (rank 0 only)."""
    if path:
        p = Path(path).expanduser()
        if not p.is_file():
            raise UserError(f"--fid-weights {p}: file not found")
        return p
    cached = Path(torch.hub.get_dir()) / "checkpoints" / FID_WEIGHTS_FILE
    if cached.is_file():
        return cached
    if offline():
        raise UserError(f"could not download the FID Inception weights: none in the torch hub cache ({cached}) "
                        "and downloads are off (HF_HUB_OFFLINE/LCT_OFFLINE); pass --fid-weights PATH")
    if rank0:
        try:
            cached.parent.mkdir(parents=True, exist_ok=True)
            torch.hub.download_url_to_file(FID_WEIGHTS_URL, str(cached), hash_prefix=FID_WEIGHTS_SHA256)
        except Exception as err:
            raise UserError(f"could not download the FID Inception weights from {FID_WEIGHTS_URL} "
                            f"({type(err).__name__}: {str(err)[:200]}); pass --fid-weights PATH") from None
    if not cached.is_file():
        raise UserError(f"the FID Inception weights could not be downloaded to {cached}")
    return cached


def clip_weights_file(model_name: str, pretrained: str | None) -> Path:
    """The local open_clip checkpoint of --clip-model/--clip-pretrained (downloaded into the
    open_clip/HF cache when online)."""
    import open_clip
    from open_clip import pretrained as ocp

    pre = pretrained
    if pre is None or str(pre).strip().lower() in ("", "none", "random"):
        raise UserError("--clip-pretrained is none: a CLIP score of a random model means nothing")
    if ":" not in model_name and model_name not in open_clip.list_models():
        raise UserError(f"--clip-model {model_name}: unknown open_clip model")
    p = Path(str(pre)).expanduser()
    if p.is_file():
        return p
    pcfg = open_clip.get_pretrained_cfg(model_name, pre)
    if not pcfg:
        if "/" in str(pre) or str(pre).endswith((".pt", ".pth", ".bin", ".safetensors")):
            raise UserError(f"--clip-pretrained {pre}: file not found")
        raise UserError(f"--clip-pretrained {pre}: not a tag of {model_name} "
                        f"(tags: {', '.join(open_clip.list_pretrained_tags_by_model(model_name)) or 'none'})")
    if offline() and pcfg.get("url") and not pcfg.get("hf_hub"):
        target = Path(os.path.expanduser("~/.cache/clip")) / os.path.basename(pcfg["url"].split("?")[0])
        if target.is_file():
            return target
        raise UserError(f"the weights of {model_name}/{pre} are not cached and downloads are off")
    try:
        target = ocp.download_pretrained(pcfg)
    except Exception as err:
        raise UserError(f"the weights of {model_name}/{pre} could not be found or downloaded "
                        f"({type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ''})") from None
    if not target or not Path(target).is_file():
        raise UserError(f"the weights of {model_name}/{pre} could not be found or downloaded")
    return Path(target)


@contextlib.contextmanager
def rank0_first(info: DistInfo):
    """Rank 0 runs the block first (downloads, caches), then the others; errors pass through."""
    if not info.is_main:
        dist.barrier(info.world_size)
    try:
        yield
    finally:
        if info.is_main:
            dist.barrier(info.world_size)


# --------------------------------------------------------------------------------------------
# Reference statistics (FID)
# --------------------------------------------------------------------------------------------

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
FID_MODEL = "torch-fidelity inception-v3-compat pool3 '2048' (FID Inception, TF 2015-12-05)"
PREPROCESS = "center crop of the long edge + PIL bicubic resize (antialiased), lct.vae.preprocess_image_uint8"


def ref_files(pattern: str) -> list[Path]:
    """Files of --ref-images: tar shards (`lct.data.expand_urls`: brace pattern, glob, comma list,
    folder of shards) or a folder of images (recursively)."""
    p = Path(pattern).expanduser()
    if p.is_dir() and not any(p.glob("*.tar")):
        return sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_EXTS)
    files = [Path(u).expanduser() for u in expand_urls(os.path.expanduser(pattern))]
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
                    base = m.name.rsplit("/", 1)[-1]
                    key = m.name[: len(m.name) - len(base)] + base.split(".", 1)[0]
                    if m.isfile() and Path(base).suffix.lower() in IMAGE_EXTS and key not in seen:
                        seen.add(key)
                        entries.append((f, m.name))
        elif f.suffix.lower() in IMAGE_EXTS:
            entries.append((f, None))
    return entries


def default_cache_dir() -> Path:
    base = os.environ.get("LCT_CACHE_DIR")
    if base:
        return Path(base).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "lct"


def reference_stats(cfg, info: DistInfo, device, model, fid_sha: str, resolution: int) -> tuple[FIDStats, dict]:
    """(FIDStats, record) of the reference: loaded from --ref-stats, or computed from --ref-images
    (sharded like the samples) and cached under a fingerprint of the files and settings."""
    settings = {"kind": "lct-fid-reference/1", "resolution": resolution, "preprocess": PREPROCESS,
                "features": FID_MODEL, "fid_weights_sha256": fid_sha}
    if cfg.ref_images is None:
        path = Path(cfg.ref_stats)
        stats = FIDStats.load(path)
        rec = {"source": "ref_stats", "path": str(path.resolve()), "sha256": file_sha256(path), "n": stats.n,
               "meta": stats.meta, "cached": None}
        got = stats.meta.get("settings") if isinstance(stats.meta, dict) else None
        for k in ("resolution", "fid_weights_sha256") if got else ():
            if got.get(k) != settings[k]:
                raise UserError(f"--ref-stats {path}: computed with {k} = {got.get(k)!r}, this run uses "
                                f"{settings[k]!r}; FID against it would be meaningless. Recompute with "
                                "--ref-images (and the same --fid-weights)")
        if stats.mu.shape != (2048,):
            raise UserError(f"--ref-stats {path}: mu has shape {stats.mu.shape}, FID Inception features are 2048")
        return stats, rec
    files = ref_files(cfg.ref_images)
    fp = dist.gather_objects(fingerprint(files, settings) if info.is_main else None, info.world_size)[0]
    meta = {"fingerprint": fp, "settings": settings}
    cache = Path(cfg.ref_stats) if cfg.ref_stats else \
        default_cache_dir() / "fid_ref_stats" / f"ref-{resolution}-{fp[:20]}.npz"
    hit = load_cached_stats(cache, meta) if info.is_main else None
    rec = {"source": "ref_images", "pattern": cfg.ref_images, "files": len(files), "path": str(cache.resolve()),
           "fingerprint": fp, "cached": bool(dist.gather_objects(hit is not None, info.world_size)[0])}
    if rec["cached"]:
        if info.is_main:  # only rank 0 needs the reference (it computes the distances)
            print(f"[eval] reference statistics: cache hit {cache} ({hit.n} images, fingerprint {fp[:16]})", flush=True)
            rec.update(n=hit.n, sha256=file_sha256(cache), meta=hit.meta)
        return hit, rec
    entries = list_ref_images(files)
    if len(entries) < 2:
        raise UserError(f"--ref-images {cfg.ref_images}: {len(entries)} image(s) found; FID needs at least 2")
    if info.is_main:
        print(f"[eval] reference statistics: computing from {len(entries)} images in {len(files)} file(s) "
              f"at {resolution}px (cached at {cache})", flush=True)
    rows = ref_image_rows(entries, cfg.batch_size, info, device, resolution,
                          lambda x: fid_features(model, x, batch_size=cfg.batch_size).float(), 2048, "reference")
    stats = FIDStats.from_features(rows.double(), meta)
    if info.is_main:
        stats.save(cache)
        rec["sha256"] = file_sha256(cache)
    rec.update(n=stats.n, meta=stats.meta)
    dist.barrier(info.world_size)
    return stats, rec


def ref_image_rows(entries: list, batch_size: int, info: DistInfo, device, resolution: int, features,
                   width: int, desc: str) -> torch.Tensor:
    """`features(uint8 [B,3,R,R])` of the reference images `entries` (from `list_ref_images`),
    sharded over the ranks like the samples and gathered in index order (every rank gets them)."""
    tars: dict = {}
    idx, feats, problem = [], [], None
    bar = tqdm(total=len(entries), desc=desc, unit="img", dynamic_ncols=True, disable=not info.is_main)
    try:
        for batch in dist.rank_batches(len(entries), batch_size, info.rank, info.world_size):
            try:
                ims = []
                for i in batch:
                    f, member = entries[i]
                    if member is not None and f not in tars:
                        tars[f] = tarfile.open(f, "r:")
                    raw = f.read_bytes() if member is None else tars[f].extractfile(member).read()
                    ims.append(preprocess_image_uint8(open_image(raw), resolution))
            except Exception as err:  # unreadable image: every rank must learn it before the gather
                problem = (f"--ref-images: could not read an image of {entries[batch[0]][0]} "
                           f"({type(err).__name__}: {str(err)[:200]})")
                break
            feats.append(features(torch.stack(ims)))
            idx += batch
            bar.update(min(len(batch) * info.world_size, bar.total - bar.n))
    finally:
        bar.close()
        for t in tars.values():
            t.close()
    problems = [p for p in dist.gather_objects(problem, info.world_size) if p]
    if problems:
        raise UserError(problems[0])
    return dist.gather_rows(idx, torch.cat(feats) if feats else None, width, info.world_size, device)
