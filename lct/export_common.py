"""What every kind of export shares (`lct.export`: an LCTPipeline; `lct.export_pixart`: a tuned
PixArt): the training record (`lct_export.json`), the data's VAE and text tower as components
(copied when local and small, else referenced), the run's latest eval for the card, finding an
export (a folder, a run directory's `export/<ema>/`, a hub id), and one-line load errors.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import tarfile
from pathlib import Path

import torch

from lct.buckets import stock_binning
from lct.data import expand_urls
from lct.errors import UserError
from lct.model_card import EXPORT_FORMAT, META

INDEX = "model_index.json"
CARRY_MAX_BYTES = 200 * 2**20  # a VAE or text tower at most this large is copied into each export
REMAKE_HINT = ("the trainer writes exports at every checkpoint (lct/train.py); `python -m lct.export RUN_DIR "
               "--out DIR` rewrites one from a run directory or an older export")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def is_tokenizer_class(library, class_name) -> bool:
    """Whether model_index.json's (library, class) is a transformers tokenizer class (looked up
    in installed transformers, never in the folder)."""
    if library != "transformers" or not isinstance(class_name, str) or not class_name.isidentifier():
        return False
    import transformers

    obj = getattr(transformers, class_name, None)
    return isinstance(obj, type) and issubclass(obj, transformers.PreTrainedTokenizerBase)


def training_record(cfg, manifest: dict, ema_name: str, step: int, images_seen: int | None,
                    stock: tuple[str, int] | None = None) -> dict:
    """lct_export.json: what the model card and lct's tools read (paths made portable on saving).
    `stock`: (diffusers pipeline class name, transformer sample_size) of a tuned public model, whose
    record says what that pipeline's resolution binning does with the trained sizes."""
    m = cfg.method
    ema = next((e for e in cfg.ema.models if e.name == ema_name), None)
    buckets = bucket_record(manifest) if manifest.get("buckets") else None
    return {
        "format": EXPORT_FORMAT,
        "layout": "diffusers pipeline (model_index.json)",
        "ema": ema_name,
        "ema_halflife_images": ema.resolved_halflife() if ema is not None else None,
        "step": int(step),
        "images_seen": int(images_seen) if images_seen is not None else int(step) * int(cfg.optim.batch_size),
        "method": {"preset": m.preset, "objective": m.objective, "sigma_min": m.sigma_min,
                   "sample_boundary_sigma_min": m.sampling_sigma_mins()[0],
                   "sample_sigma_min": m.sampling_sigma_mins()[1],
                   "sigma_max": m.sigma_max, "sigma_data": m.sigma_data,
                   "time_embed_scale": m.time_embed_scale, "tau": list(m.tau)},
        "model": {"cond": cfg.model.cond, "arch": cfg.model.arch, "pretrained": getattr(cfg.model, "pretrained", None)},
        "latent": {"norm": cfg.data.latent_norm, "shape": list(manifest["latent_shape"])},
        **({"buckets": buckets} if buckets else {}),
        **({"resolution_binning": stock_binning(*stock, buckets["sizes"])} if buckets and stock else {}),
        "vae": _jsonable(manifest.get("vae")),
        "text": _jsonable(manifest.get("text")),
        "resolution": manifest.get("resolution"),
        "manifest_path": manifest.get("manifest_path"),
        "eval": latest_eval(Path(cfg.run.dir) / "eval"),
        "example_prompt": example_prompt(cfg),
        "config": cfg.model_dump(mode="json"),
    }


def bucket_record(manifest: dict) -> dict:
    """The export's record of the data's aspect-ratio buckets: the table (name, image size, ratio,
    latent shape), the samples per bucket and the most common one."""
    b = manifest["buckets"]
    return {"source": b.get("source"), "table": _jsonable(b["table"]), "counts": dict(b.get("counts") or {}),
            "most_common": b.get("most_common"), "sizes": trained_sizes(manifest)}


def trained_sizes(manifest: dict) -> list[list[int]] | None:
    """[height, width] image sizes of the buckets with samples, most common first (ties in table
    order): LCTPipeline's `sizes`; None for square data (one size)."""
    b = manifest.get("buckets") or {}
    counts = b.get("counts") or {}
    used = [t for t in b.get("table") or [] if counts.get(t["name"], 0) > 0]
    if len(used) < 2:
        return None
    order = sorted(range(len(used)), key=lambda i: (-counts[used[i]["name"]], i))
    return [[int(x) for x in used[i]["size"]] for i in order]


def example_prompt(cfg) -> str | None:
    """A prompt from the run's own data for the model card: the first sample prompt, else the
    first caption of the first (validation) latent shard; None for unconditional models."""
    if cfg.model.cond != "text":
        return None
    if cfg.sample.prompts:
        return cfg.sample.prompts[0]
    try:
        if cfg.sample.prompts_file:
            return next(l.strip() for l in Path(cfg.sample.prompts_file).read_text().splitlines() if l.strip())
        with tarfile.open(expand_urls(cfg.data.val_shards or cfg.data.shards)[0], "r:") as tar:
            for m in tar:
                if m.isfile() and m.name.endswith(".json"):
                    caps = json.loads(tar.extractfile(m).read()).get("captions") or []
                    return str(caps[0]) if caps else None
    except Exception:  # StopIteration, unreadable or remote shards: the card says "your prompt"
        return None
    return None


def _jsonable(x):
    return json.loads(json.dumps(x, default=str)) if x is not None else None


def _size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


_COMPONENT_CACHE: dict = {}  # per process: the trainer exports the same VAE / tower at every checkpoint


def _cached(kind: str, key, build):
    """The latest component of each kind ("vae", "text"), rebuilt when its source files change."""
    hit = _COMPONENT_CACHE.get(kind)
    if hit is None or hit[0] != key:
        _COMPONENT_CACHE[kind] = hit = (key, build())
    return hit[1]


def _vae_component(vae: dict | None):
    """(AutoencoderKL, None) for a small local VAE folder, else (None, its id or path)."""
    src = Path(str((vae or {}).get("id") or ""))
    if not vae or not vae.get("id"):
        return None, None
    if not src.is_dir() or _size(src) > CARRY_MAX_BYTES:
        return None, str(vae["id"])
    from lct.vae import load_vae

    stamp = tuple((f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in sorted(src.rglob("*")) if f.is_file())
    return _cached("vae", (str(src), stamp), lambda: load_vae(str(src), "cpu", torch.float32)), None


def _text_component(manifest: dict):
    """(text_encoder, tokenizer, None) for a local text tower <= CARRY_MAX_BYTES, else (None, None,
    the manifest's text record: loaded when the pipeline is). open_clip towers take the form of
    `text_component`; transformers towers (T5, CLIP: `lct.hf_text`) are copied as they are."""
    from lct.hf_text import is_hf_record
    from lct.text import is_random, load_tower

    rec = manifest.get("text") or {}
    if not rec:
        raise UserError("the data's manifest records no text model; re-run data_prep/encode_latents.py")
    base = {"text": rec, "_dir": str(Path(str(manifest.get("manifest_path") or ".")).parent)}
    if is_hf_record(rec):
        src = Path(str((rec.get("source") or {}).get("id") or ""))
        if not src.is_dir() or _size(src) > CARRY_MAX_BYTES:
            return None, None, _jsonable(rec)
        stamp = tuple((str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in sorted(src.rglob("*")) if f.is_file())

        def build_hf():
            enc = load_tower(base)
            return enc.model, enc.hf_tokenizer

        enc, tok = _cached("text", stamp, build_hf)
        return enc, tok, None
    pre = rec.get("pretrained")
    local = None
    if pre and not is_random(pre):
        for cand in (Path(str(pre)), Path(base["_dir"]) / str(rec.get("pretrained_relative") or "")):
            if cand.is_file():
                local = cand
                break
    if local is None or _size(local) > CARRY_MAX_BYTES:
        return None, None, _jsonable(rec)
    stamp = (str(local), local.stat().st_size, local.stat().st_mtime_ns)
    enc, tok = _cached("text", stamp, lambda: text_component(load_tower(base)))
    return enc, tok, None


def text_component(encoder):
    """(CLIPTextModelWithProjection, CLIPTokenizer) where the open_clip tower maps onto them
    exactly (`lct.pipeline_text.to_clip_text_model`), else (OpenCLIPTextModel, None)."""
    from lct.openclip_text import OpenCLIPTextModel
    from lct.pipeline_text import to_clip_text_model

    form = to_clip_text_model(encoder)
    if isinstance(form, str):
        return OpenCLIPTextModel.from_encoder(encoder), None
    return form


def latest_eval(folder: Path) -> dict | None:
    """The newest eval `results.json` under `folder` (recursively), summarised for the card."""
    files = sorted(Path(folder).rglob("results.json"), key=lambda f: f.stat().st_mtime) if Path(folder).is_dir() else []
    return eval_summary(files[-1]) if files else None


def eval_summary(path: Path) -> dict:
    try:
        r = json.loads(Path(path).read_text())
    except (OSError, ValueError) as err:
        raise UserError(f"--results {path}: not a readable eval results.json ({err})") from None
    ck = r.get("checkpoint") or {}
    return {"path": str(Path(path).resolve()), "time": r.get("time"), "protocol": (r.get("protocol") or {}).get("name"),
            "conforms": (r.get("protocol") or {}).get("conforms"), "num_samples": r.get("num_samples"),
            "checkpoint_step": ck.get("step"), "checkpoint_ema": ck.get("ema"),
            "settings": [{"name": s.get("name"), "steps": s.get("steps"), "tau": s.get("tau"),
                          "guidance": s.get("guidance"), "nfe": s.get("nfe"),
                          "metrics": {k: v.get("value") for k, v in (s.get("metrics") or {}).items()
                                      if isinstance(v, dict) and not v.get("skipped")}}
                         for s in r.get("settings") or []]}


class LoadError(UserError, ValueError):
    """A folder lct's loader does not load: one line (a `UserError`) that is also the `ValueError`
    diffusers' loaders raise."""


@contextlib.contextmanager
def quiet_loading():
    """No per-component progress bars or 'install accelerate' notes while lct's tools load a pipeline."""
    import diffusers.utils.logging as dlog

    level, bars = dlog.get_verbosity(), dlog.is_progress_bar_enabled()
    dlog.set_verbosity_error()
    dlog.disable_progress_bar()
    try:
        import transformers.utils.logging as tlog
    except ImportError:
        tlog = None
    if tlog is not None:
        t_level, t_bars = tlog.get_verbosity(), tlog.is_progress_bar_enabled()
        tlog.set_verbosity_error()
        tlog.disable_progress_bar()
    try:
        yield
    finally:
        dlog.set_verbosity(level)
        if bars:
            dlog.enable_progress_bar()
        if tlog is not None:
            tlog.set_verbosity(t_level)
            if t_bars:
                tlog.enable_progress_bar()


def resolve_text(record: dict, pretrained: str | None = None, base: Path | None = None):
    """(text_encoder, tokenizer) of a manifest's text record: open_clip -> `OpenCLIPTextModel`
    (open_clip's own tower; tokenizes itself), transformers T5 / CLIP -> the model and its tokenizer."""
    from lct.openclip_text import OpenCLIPTextModel
    from lct.text import TextEncoder

    enc = TextEncoder.from_manifest({"text": record, "_dir": str(base) if base else None}, pretrained=pretrained)
    if hasattr(enc, "hf_tokenizer"):
        return enc.model, enc.hf_tokenizer
    return OpenCLIPTextModel.from_encoder(enc), None


def hub_export(repo_id: str, **hub) -> Path:
    """The local snapshot of an export on the hub, without its Python files (lct never runs them):
    the cache first, one-line errors offline."""
    from huggingface_hub import snapshot_download

    from lct.hub import go_offline_if_unreachable

    try:
        return Path(snapshot_download(repo_id, ignore_patterns=["*.py"], **{**hub, "local_files_only": True}))
    except Exception:
        if hub.get("local_files_only"):
            raise LoadError(f"{repo_id}: not in the local Hugging Face cache (local_files_only)") from None
    if go_offline_if_unreachable():
        raise LoadError(f"{repo_id}: not in the local Hugging Face cache and the hub is offline; download it first "
                        f"(`hf download {repo_id}`) or pass a local folder")
    try:
        return Path(snapshot_download(repo_id, ignore_patterns=["*.py"], **hub))
    except Exception as err:
        raise LoadError(f"{repo_id}: could not be downloaded ({_first_line(err)})") from None


def _is_export(p: Path) -> bool:
    return (p / INDEX).is_file() or (p / META).is_file()


def resolve_export(path: str | os.PathLike, ema: str | None = None, **hub) -> Path:
    """An export directory from an export or run directory (`export/<ema>/`, default the run's
    sample EMA), or a hub id (`hub_export`; `hub`: its download options)."""
    p = Path(path)
    if _is_export(p):
        return p
    if not p.exists() and _HUB_ID.match(str(path)) and not str(path).startswith((".", "~")):
        return hub_export(str(path), **hub)
    exports = p / "export"
    if exports.is_dir():
        name = ema
        if name is None:
            cfg_file = p / "config.yaml"
            if cfg_file.is_file():
                import yaml

                name = (yaml.safe_load(cfg_file.read_text()).get("ema") or {}).get("sample")
        candidates = [exports / name] if name else sorted(exports.iterdir())
        for c in candidates:
            if _is_export(c):
                return c
        raise UserError(f"{p}: no export for EMA {name!r} (have: {[c.name for c in exports.iterdir()]}); "
                        "exports are written at each checkpoint")
    if p.is_dir() and any(p.iterdir()):
        raise UserError(f"{p / INDEX} is missing: {p} is neither an lct export nor a run directory with export/; "
                        f"{REMAKE_HINT}")
    raise UserError(f"{p}: no such export or run directory (pass --checkpoint RUN_DIR or RUN_DIR/export/<ema>)")


def load_network_weights(path: str | os.PathLike, ema: str | None = None) -> dict[str, torch.Tensor]:
    """State dict of an exported network (for `model.init_from`), from either export format."""
    from safetensors.torch import load_file

    d = resolve_export(path, ema)
    folder = d / "transformer" if (d / INDEX).is_file() else d
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise UserError(f"{folder}: no safetensors weights; {REMAKE_HINT}")
    state: dict[str, torch.Tensor] = {}
    for f in files:
        try:
            state.update(load_file(str(f)))
        except Exception as err:  # a truncated or overwritten weight file (safetensors' own errors)
            raise UserError(f"{f}: unreadable weights ({_first_line(err)}); {REMAKE_HINT}") from None
    return state


def check_network_weights(path: str | os.PathLike, ema: str | None = None) -> Path:
    """The export `path` names (a run or export directory), its network weight files present and
    whole (safetensors headers read and every tensor's bytes inside the file), without loading
    them; `UserError` otherwise. Returns the export directory."""
    from safetensors import safe_open

    d = resolve_export(path, ema)
    files = weight_files(d)
    if not files:
        raise UserError(f"{d}: no safetensors weights of the network; {REMAKE_HINT}")
    for f in files:
        try:
            with safe_open(str(f), framework="pt") as sf:
                for key in sf.keys():
                    sf.get_slice(key)
        except Exception as err:
            raise UserError(f"{f}: unreadable weights ({_first_line(err)}); {REMAKE_HINT}") from None
    return d


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return (text[0] if text else type(err).__name__)[:300]


def weight_files(d: Path) -> list[Path]:
    """The network's weight files of an export (either format)."""
    folder = d / "transformer" if (d / INDEX).is_file() else d
    return sorted(folder.glob("*.safetensors"))
