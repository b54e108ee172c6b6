"""Exported models: an EMA of the network as a diffusers pipeline folder (`lct.pipeline.LCTPipeline`),
and lct's loader of such folders.

    export/<ema>/
      model_index.json    the components (diffusers' community-components layout), the text kind,
                          and the sources of components referenced instead of copied
      pipeline.py         lct/pipeline.py as it is, with consistency.py and tokens.py (what it imports)
      transformer/        TextDiT: config.json + safetensors (the EMA weights) and lct_dit.py (lct/models/dit.py)
      scheduler/          LCTScheduler: scheduler_config.json (SPEC 1, 9: sigma_min of the scalings when
                          sampling, sample_sigma_min, sigma_max, sigma_data, time_embed_scale, taus) and
                          lct_scheduler.py + consistency.py (lct/scheduler.py, lct/consistency.py)
      vae/                AutoencoderKL with SPEC 7's statistics in its config (latents_mean, latents_std,
                          scaling_factor 0.5), when the data's VAE is a local folder <= CARRY_MAX_BYTES
      text_encoder/ tokenizer/   CLIPTextModelWithProjection + CLIPTokenizer where the open_clip tower
                          maps onto them; a transformers tower (T5, CLIP) of the data as it is; else
                          lct's OpenCLIPTextModel (text_encoder/lct_openclip_text.py, needs lct; no tokenizer/)
      README.md           the model card (hub YAML header)
      lct_export.json     lct's training record (format lct-export/3): ema, step, method, data, config, eval

No file of an export holds an absolute path: local paths are written relative to the export
folder (`lct.pipeline.portable`). A hub VAE, an open_clip pretrained tag or a large local file is
referenced (`vae_source` + `vae_latents`, `text_source` in model_index.json) instead of copied into
every EMA export at every checkpoint; lct's loader fills it in. `python -m lct.export SRC --out DIR
--copy-all` writes a self-contained folder (for an upload), refreshes the model card with the run's
latest eval, and converts exports of older formats (lct-export/1: TextDiT weights beside
lct_export.json; lct-export/2: statistics and record in model_index.json, a one-line shim as
pipeline.py), which `load_pipeline` also reads directly.

    python -m lct.export runs/lct_coco --out hub/lct_coco --copy-all
    hf upload USER/lct-coco hub/lct_coco .      # a plain folder upload (or pipe.push_to_hub)

Loading (`load_pipeline`, what `LCTPipeline.from_pretrained`, `lct.sample`, `eval/clip_fid.py` and
`python -m lct.export` use; what every export kind shares is `lct.export_common`): exports are data. The loader reads model_index.json, refuses in one
line a folder that names any module it does not know (KNOWN), and builds each component from lct's
own classes (TextDiT, LCTScheduler, OpenCLIPTextModel) or diffusers' / transformers' by name; it
never imports a Python file of the folder and never enables `trust_remote_code`.

The model card lists the run's latest eval: the newest `results.json` under `RUN_DIR/eval/`
(write eval there: `eval/clip_fid.py --checkpoint RUN_DIR --out RUN_DIR/eval/NAME`), or the file
given with `--results`.
"""

from __future__ import annotations

if __name__ == "__main__" and __package__ in (None, ""):  # run as a file: repo root first on sys.path
    import pathlib
    import sys

    sys.path[0] = str(pathlib.Path(__file__).resolve().parents[1])

import argparse
import copy
import json
import os
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lct.errors import UserError, cli_main
from lct.export_common import (CARRY_MAX_BYTES, INDEX, REMAKE_HINT, LoadError, _first_line, _is_export,  # noqa: F401
                               _text_component, _vae_component, check_network_weights, eval_summary, is_tokenizer_class,
                               latest_eval, load_network_weights, quiet_loading, resolve_export, resolve_text,
                               text_component, trained_sizes, training_record, weight_files)
from lct.files import atomic_dir, output_dir_problem
from lct.model_card import EXPORT_FORMAT, META, model_card

LEGACY_FORMAT = "lct-export/1"
COMPONENTS = ("transformer", "scheduler", "vae", "text_encoder", "tokenizer")
# What lct's loader loads, by component: lct's own classes under the module names an export gives
# them (the file in the component's folder; lct-export/2 named lct's modules), and diffusers' /
# transformers' classes by name. Anything else in model_index.json is refused.
OWN = {"transformer": ({"lct_dit", "lct.models.dit"}, "TextDiT"),
       "scheduler": ({"lct_scheduler", "lct.scheduler"}, "LCTScheduler"),
       "text_encoder": ({"lct_openclip_text", "lct.openclip_text", "lct.pipeline_text"}, "OpenCLIPTextModel")}
LIBRARY = {"vae": ("diffusers", {"AutoencoderKL"}),
           "text_encoder": ("transformers", {"CLIPTextModel", "CLIPTextModelWithProjection", "T5EncoderModel"}),
           "tokenizer": ("transformers", None)}  # any transformers tokenizer class
PIPELINE_CLASS = "LCTPipeline"


# ----------------------------------------------------------------------------------------------
# Writing
# ----------------------------------------------------------------------------------------------


def scheduler_for(method):
    """The `LCTScheduler` of a method config: SPEC 1's scalings with the sampling boundary, the
    noise floor between steps, sigma_max, sigma_data, the time input and the taus (SPEC 2.4, 9)."""
    from lct.scheduler import LCTScheduler

    boundary, sample_sigma_min = method.sampling_sigma_mins()
    return LCTScheduler(sigma_min=boundary, sigma_max=method.sigma_max, sigma_data=method.sigma_data,
                        time_embed_scale=method.time_embed_scale, sample_sigma_min=sample_sigma_min,
                        taus=list(method.tau))


def latent_config(manifest: dict, kind: str) -> dict:
    """SPEC 7's normalisation in the VAE config's terms (diffusers' `latents_mean`, `latents_std`,
    `scaling_factor`, `shift_factor`): `x = (raw - mean) / std * 0.5` is `scaling_factor` 0.5 with the
    data's statistics (per channel, or per element flattened C*H*W); `vae` keeps the VAE's own
    `scaling_factor` / `shift_factor` (SPEC 14.4) and no statistics."""
    from lct.latents import latent_stats

    if kind == "vae":
        cfg = (manifest.get("vae") or {}).get("config") or {}
        return {"latents_mean": None, "latents_std": None, "scaling_factor": cfg.get("scaling_factor"),
                "shift_factor": cfg.get("shift_factor")}
    mean, std = latent_stats(manifest, kind)  # [C,1,1] or [C,h,w]: flattened, C or C*h*w values
    return {"latents_mean": np.asarray(mean, dtype=np.float64).reshape(-1).tolist(),
            "latents_std": np.asarray(std, dtype=np.float64).reshape(-1).tolist(), "scaling_factor": 0.5,
            "shift_factor": None}


def with_latent_config(vae, latents: dict | None):
    """A shallow copy of `vae` whose config carries `latents` (its weights shared, the given module
    unchanged: the trainer's VAE or a cached component)."""
    if vae is None or not latents:
        return vae
    out = copy.copy(vae)
    out.register_to_config(**latents)
    return out


def pipeline_latent_norm(pipe):
    """SPEC 7's normalisation (`lct.vae.LatentNorm`) of a pipeline, read back from its VAE config."""
    from lct.vae import LatentNorm

    cfg = pipe.vae.config
    if getattr(cfg, "latents_mean", None) is None:
        return LatentNorm.from_vae(cfg.scaling_factor, getattr(cfg, "shift_factor", None))
    mean, std = np.asarray(cfg.latents_mean, dtype=np.float64), np.asarray(cfg.latents_std, dtype=np.float64)
    if mean.size != pipe.latent_shape[0]:  # per element
        mean, std = mean.reshape(pipe.latent_shape), std.reshape(pipe.latent_shape)
    return LatentNorm(mean, std)


def training_pipeline(net, cfg, manifest: dict, *, vae=None, text_encoder=None, tokenizer=None,
                      vae_source: str | None = None, text_source: dict | None = None):
    """An `LCTPipeline` around a network being trained (`net`: the TextDiT), sampling with the
    method's scheduler and decoding with the data's normalisation: what the exporter saves and
    what the trainer's sample grids run (in memory, around the EMA)."""
    from lct.pipeline import LCTPipeline

    latents = latent_config(manifest, cfg.data.latent_norm)
    text_rec = manifest.get("text") or {}
    return LCTPipeline(net, scheduler_for(cfg.method), with_latent_config(vae, latents), text_encoder, tokenizer,
                       text_kind=text_rec.get("kind", "open_clip"),
                       text_max_length=text_rec.get("context_length") if text_rec.get("kind") else None,
                       vae_source=vae_source, text_source=text_source,
                       vae_latents=latents if vae_source else None, sizes=trained_sizes(manifest))


def export_network(precond: torch.nn.Module, ema_state: dict[str, torch.Tensor], out_dir: Path, *,
                   cfg, manifest: dict, ema_name: str, step: int, images_seen: int | None = None) -> Path:
    """Write EMA weights of `precond.net` as a pipeline folder (module docstring), atomically."""
    if cfg.model.arch == "pixart":
        from lct.export_pixart import export_pixart

        return export_pixart(precond, ema_state, out_dir, cfg=cfg, manifest=manifest, ema_name=ema_name, step=step,
                             images_seen=images_seen)
    if cfg.model.arch in ("sana", "sd3"):
        from lct.export_flow import export_flow

        return export_flow(precond, ema_state, out_dir, cfg=cfg, manifest=manifest, ema_name=ema_name, step=step,
                           images_seen=images_seen)
    net = precond.net
    with torch.random.fork_rng(devices=[]):  # building the copy must not move the training RNG
        cpu_net = type(net).from_config(net.config)
    prefix = "net."
    state = {k[len(prefix):]: v for k, v in ema_state.items() if k.startswith(prefix)}
    missing, unexpected = cpu_net.load_state_dict(state, strict=False)
    frozen = {n for n, p in cpu_net.named_parameters() if not p.requires_grad} | set(dict(cpu_net.named_buffers()))
    if unexpected or [m for m in missing if m not in frozen]:
        raise RuntimeError(f"EMA does not match the network: missing {missing[:5]}, unexpected {unexpected[:5]}")
    vae, vae_source = _vae_component(manifest.get("vae"))
    text_encoder = tokenizer = text_source = None
    if cfg.model.cond == "text":
        text_encoder, tokenizer, text_source = _text_component(manifest)
    pipe = training_pipeline(cpu_net.eval(), cfg, manifest, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                             vae_source=vae_source, text_source=text_source)
    pipe.training_record = training_record(cfg, manifest, ema_name, step, images_seen)
    return write_export(pipe, Path(out_dir))


def write_export(pipe, out_dir: Path) -> Path:
    """`pipe.save_pretrained` into `out_dir` atomically, with lct's model card of its training record."""
    with atomic_dir(out_dir) as tmp:
        pipe.model_card = model_card(pipe, tmp)
        pipe.save_pretrained(tmp)
    return out_dir


# ----------------------------------------------------------------------------------------------
# Reading
# ----------------------------------------------------------------------------------------------


def _known(name: str, library, class_name) -> bool:
    own = OWN.get(name)
    if own and library in own[0] and class_name == own[1]:
        return True
    spec = LIBRARY.get(name)
    if not spec or library != spec[0] or not isinstance(class_name, str):
        return False
    return class_name in spec[1] if spec[1] is not None else is_tokenizer_class(library, class_name)


def check_export_index(d: Path, index: dict) -> None:
    """One line naming the file where model_index.json names a pipeline or a component lct does
    not load (`OWN`, `LIBRARY`: lct never imports a module of the folder), or a component's files
    are missing."""
    where = d / INDEX
    cls = index.get("_class_name")
    name = cls[1] if isinstance(cls, (list, tuple)) and len(cls) == 2 else cls
    if name in ("PixArtSigmaPipeline", "PixArtAlphaPipeline"):
        raise LoadError(f"{where}: a tuned PixArt export ({name}): load it with lct.export_pixart.load_pixart_export "
                        "or its model card's recipe (lct.sample and eval/clip_fid.py read LCTPipeline exports)")
    if name != PIPELINE_CLASS:
        raise LoadError(f"{where}: pipeline class {cls!r} is not lct's {PIPELINE_CLASS}; lct loads its own exports "
                        "(diffusers loads other pipelines)")
    for key, value in index.items():
        if key.startswith("_") or not isinstance(value, list) or len(value) != 2:
            continue
        library, class_name = value
        if key not in COMPONENTS:
            raise LoadError(f"{where}: component {key!r} ({library}.{class_name}) is not one of LCTPipeline's "
                            f"({', '.join(COMPONENTS)}); lct reads exports as data and loads nothing else")
        if library is None:
            continue
        if not _known(key, library, class_name):
            raise LoadError(f"{where}: component {key!r} names {library}.{class_name} ({d / key / f'{library}.py'}), "
                            "which lct does not load: exports are data to lct (its TextDiT, LCTScheduler and "
                            "OpenCLIPTextModel, diffusers' AutoencoderKL, transformers' text towers and tokenizers), "
                            "and no code of the folder runs")
        files = {"scheduler": ["scheduler_config.json"], "tokenizer": ["tokenizer_config.json"]}.get(key, ["config.json"])
        for f in files:
            if not (d / key / f).is_file():
                raise LoadError(f"{d / key / f} is missing (component {key!r} of model_index.json); {REMAKE_HINT}")
        if key in ("transformer", "vae", "text_encoder") and not any(
                p.suffix in (".safetensors", ".bin") for p in (d / key).iterdir()):
            raise LoadError(f"{d / key / 'diffusion_pytorch_model.safetensors'} is missing (component {key!r} of "
                            f"model_index.json); {REMAKE_HINT}")


def _load_component(d: Path, name: str, library: str, class_name: str, dtype, variant: str | None):
    """A component of an export by lct's class for it, or diffusers' / transformers' class by name."""
    if name == "transformer":
        from lct.models.dit import TextDiT

        return TextDiT.from_pretrained(str(d), subfolder=name, torch_dtype=dtype, variant=variant)
    if name == "scheduler":
        from lct.scheduler import LCTScheduler

        return LCTScheduler.from_pretrained(str(d), subfolder=name)
    if name == "vae":
        from diffusers import AutoencoderKL
        from diffusers.utils import is_accelerate_available

        return AutoencoderKL.from_pretrained(str(d), subfolder=name, torch_dtype=dtype, variant=variant,
                                             low_cpu_mem_usage=is_accelerate_available()).eval()
    if name == "text_encoder" and class_name == OWN["text_encoder"][1]:
        from lct.openclip_text import OpenCLIPTextModel

        return OpenCLIPTextModel.from_pretrained(str(d), subfolder=name, torch_dtype=dtype)
    import transformers

    cls = getattr(transformers, class_name)
    if name == "tokenizer":
        return cls.from_pretrained(str(d / name))
    return cls.from_pretrained(str(d / name), dtype=dtype, variant=variant).eval()


def load_pipeline(path: str | os.PathLike, ema: str | None = None, *, vae=None, text_pretrained: str | None = None,
                  device: str | torch.device | None = None, **kwargs):
    """The `LCTPipeline` of an export (a folder or hub id) or run directory (`export/<ema>/`), in
    any format (module docstring): exports are data, loaded by class, never a file's code.

    `vae` / `text_pretrained` replace the recorded VAE / text-tower weights (a path or id, e.g. a
    local copy; `vae` may also be a module); `transformer=`, `scheduler=`, `text_encoder=`,
    `tokenizer=` pass components as diffusers' loader takes them. diffusers' loading options:
    `torch_dtype` / `dtype` (a dtype, or {"component": dtype, "default": dtype}), `variant`,
    `device_map` (a device: the components are moved there), and for hub ids `revision`, `token`,
    `cache_dir`, `local_files_only`. `trust_remote_code` changes nothing: no folder code runs."""
    from lct.pipeline import LCTPipeline, localize
    from diffusers.utils import logging as dlogging

    dtype, torch_dtype = kwargs.pop("dtype", None), kwargs.pop("torch_dtype", None)
    dtype = torch_dtype if dtype is None else dtype
    variant, device_map = kwargs.pop("variant", None), kwargs.pop("device_map", None)
    hub = {k: kwargs.pop(k) for k in ("revision", "token", "cache_dir", "local_files_only", "force_download",
                                      "proxies") if k in kwargs}
    passed = {k: kwargs.pop(k) for k in COMPONENTS if k in kwargs}
    for k in ("trust_remote_code", "low_cpu_mem_usage", "use_safetensors"):
        kwargs.pop(k, None)
    if kwargs.get("custom_pipeline") is not None:
        raise LoadError("custom_pipeline: lct's loader builds LCTPipeline only; use DiffusionPipeline.from_pretrained")
    kwargs.pop("custom_pipeline", None)
    if kwargs:
        raise TypeError(f"load_pipeline got unexpected arguments {sorted(kwargs)}")
    if vae is not None and not isinstance(vae, (str, os.PathLike)):
        passed["vae"], vae = vae, None
    d = resolve_export(path, ema, **hub)
    if not (d / INDEX).is_file():
        with quiet_loading():
            return pipeline_from_legacy(d, vae=vae, text_pretrained=text_pretrained)
    try:
        index = json.loads((d / INDEX).read_text())
    except (OSError, ValueError) as err:
        raise LoadError(f"{d / INDEX}: unreadable ({_first_line(err)}); {REMAKE_HINT}") from None
    check_export_index(d, index)
    if variant is not None:
        have = {n for n in COMPONENTS if (d / n).is_dir() and any(variant in f.name.split(".")[1:-1] for f in (d / n).iterdir())}
        if not have:
            raise LoadError(f"You are trying to load the model files of the `variant={variant}`, but no such modeling "
                            f"files are available in {d}.")
    else:
        have = set()
    log = dlogging.get_logger("diffusers.pipelines.pipeline_utils")
    comp: dict[str, Any] = {}
    for name in COMPONENTS:
        library, class_name = index.get(name) or [None, None]
        if name in passed:
            comp[name] = passed[name]
            continue
        if library is None:
            comp[name] = None
            continue
        dt = dtype.get(name, dtype.get("default", torch.float32)) if isinstance(dtype, dict) else dtype
        try:
            comp[name] = _load_component(d, name, library, class_name, dt, variant if name in have else None)
        except UserError:
            raise
        except Exception as err:  # a truncated weight file, a config from another version
            raise LoadError(f"{d / name}: could not be loaded as {class_name} ({_first_line(err)}); {REMAKE_HINT}") from None
        log.info(f"Loaded {name} as {class_name} from `{name}` subfolder of {path}.")
    latents = index.get("vae_latents") or _legacy_latents(index)
    vae_source, text_source = localize(index.get("vae_source"), d), localize(index.get("text_source"), d)
    if vae or (comp["vae"] is None and vae_source and "vae" not in passed):
        from lct.vae import load_vae

        if latents is None and (d / "vae" / "config.json").is_file():
            vcfg = json.loads((d / "vae" / "config.json").read_text())
            latents = {k: vcfg.get(k) for k in ("latents_mean", "latents_std", "scaling_factor", "shift_factor")}
        comp["vae"] = load_vae(vae or vae_source, "cpu", torch.float32)
        vae_source = None if vae else vae_source
    if latents is not None and comp["vae"] is not None and "vae" not in passed:
        comp["vae"] = with_latent_config(comp["vae"], latents)
    cond_text = (json.loads((d / "transformer" / "config.json").read_text()).get("cond", "text")
                 if (d / "transformer" / "config.json").is_file() else "text")
    record = _read_record(d, index)
    if text_pretrained:
        rec = text_source or (record or {}).get("text")
        if not rec:
            raise UserError("--text-pretrained: this export records no text tower")
        comp["text_encoder"], comp["tokenizer"] = resolve_text(rec, text_pretrained, d)
        text_source = None
    elif comp["text_encoder"] is None and text_source and cond_text == "text" and "text_encoder" not in passed:
        comp["text_encoder"], comp["tokenizer"] = resolve_text(text_source, None, d)
    pipe = LCTPipeline(**comp, text_kind=index.get("text_kind") or "open_clip",
                       text_max_length=index.get("text_max_length"), vae_source=vae_source, text_source=text_source,
                       vae_latents=latents if vae_source else None, sizes=index.get("sizes"))
    pipe.training_record = record
    pipe.model_card = (d / "README.md").read_text() if (d / "README.md").is_file() else None
    target = device_map if device_map is not None else device
    return pipe.to(target) if target is not None else pipe


def _legacy_latents(index: dict) -> dict | None:
    """The VAE config statistics of an lct-export/2 model_index.json (pipeline config `latent_mean`,
    `latent_std`, `latent_norm_kind`)."""
    kind = index.get("latent_norm_kind")
    if kind == "vae":
        return {"latents_mean": None, "latents_std": None}
    if index.get("latent_mean") is None:
        return None
    return {"latents_mean": np.asarray(index["latent_mean"], dtype=np.float64).reshape(-1).tolist(),
            "latents_std": np.asarray(index["latent_std"], dtype=np.float64).reshape(-1).tolist(),
            "scaling_factor": 0.5, "shift_factor": None}


def _read_record(d: Path, index: dict) -> dict | None:
    """The training record (lct_export.json; lct-export/2 kept it in model_index.json), its paths
    made absolute again where they exist."""
    from lct.pipeline import localize

    record = None
    if (d / META).is_file():
        try:
            record = json.loads((d / META).read_text())
        except (OSError, ValueError) as err:
            raise LoadError(f"{d / META}: unreadable ({_first_line(err)}); {REMAKE_HINT}") from None
    if isinstance(index.get("training"), dict):  # lct-export/2
        record = {**index["training"], "format": EXPORT_FORMAT}
    if record is not None:
        record = {**record, "format": EXPORT_FORMAT, "layout": "diffusers pipeline (model_index.json)"}
    return localize(record, d)


def pipeline_from_legacy(d: Path, vae: str | None = None, text_pretrained: str | None = None):
    """An `LCTPipeline` from an export written before pipelines (lct-export/1); what it
    referenced from outside the folder stays referenced when it is saved."""
    from lct.models.dit import TextDiT
    from lct.openclip_text import OpenCLIPTextModel
    from lct.pipeline import LCTPipeline
    from lct.scheduler import LCTScheduler
    from lct.vae import load_vae

    meta = json.loads((d / META).read_text())
    if meta.get("format") != LEGACY_FORMAT:
        raise LoadError(f"{d / META}: unknown export format {meta.get('format')!r} and no {INDEX}; {REMAKE_HINT}")
    if not any(d.glob("*.safetensors")) or not (d / "config.json").is_file():
        raise LoadError(f"{d}: config.json or the network's safetensors file is missing; {REMAKE_HINT}")
    net = TextDiT.from_pretrained(str(d)).eval()
    m = meta["method"]
    scheduler = LCTScheduler(sigma_min=m["sigma_min"], sigma_max=m["sigma_max"], sigma_data=m["sigma_data"],
                             time_embed_scale=m["time_embed_scale"], sample_sigma_min=m["sample_sigma_min"],
                             taus=list(m["tau"]))
    rec = meta.get("vae") or {}
    copied = rec.get("id_relative") and (d / rec["id_relative"]).is_dir()
    vae_id = vae or (str(d / rec["id_relative"]) if copied else rec.get("id"))
    if not vae_id:
        raise UserError("the export records no VAE; pass --vae ID_OR_PATH")
    lat = meta["latent"]
    latents = _legacy_latents({"latent_norm_kind": lat.get("norm", "channel"), "latent_mean": lat["mean"],
                               "latent_std": lat["std"]})
    vae_model = with_latent_config(load_vae(vae_id, "cpu", torch.float32), latents)
    text_encoder = text_source = None
    text_rec = meta.get("text") or {}
    text_copied = bool(text_rec.get("pretrained_relative")) and (d / text_rec["pretrained_relative"]).is_file()
    if meta["model"]["cond"] == "text":
        from lct.text import TextEncoder

        # open_clip's own tower, as lct.sample ran it: an old export samples the same images.
        enc = TextEncoder.from_manifest({"text": text_rec, "_dir": str(d)}, pretrained=text_pretrained)
        text_encoder = OpenCLIPTextModel.from_encoder(enc)
        if not text_copied and not text_pretrained:
            text_source = text_rec
    referenced = not copied and not vae
    pipe = LCTPipeline(net, scheduler, vae_model, text_encoder, None, vae_source=vae_id if referenced else None,
                       text_source=text_source, vae_latents=latents if referenced else None)
    record = {k: v for k, v in meta.items() if k != "format"} | {"format": EXPORT_FORMAT, "converted_from": LEGACY_FORMAT}
    record.setdefault("images_seen", None)
    record.setdefault("eval", None)
    pipe.training_record = record
    return pipe


# ----------------------------------------------------------------------------------------------
# python -m lct.export: rewrite / convert an export
# ----------------------------------------------------------------------------------------------


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m lct.export", description=(
        "Write an export as a diffusers pipeline folder: converts exports written before pipelines, "
        "refreshes the model card (latest eval), and with --copy-all copies referenced components in."))
    p.add_argument("checkpoint", help="run directory or export directory (either format)")
    p.add_argument("--out", required=True, help="output folder (a pipeline folder; must not be the source)")
    p.add_argument("--ema", default=None, help="EMA name of a run directory (default: the run's sample EMA)")
    p.add_argument("--copy-all", action="store_true",
                   help="copy the referenced VAE / text tower into the folder (self-contained, for an upload)")
    p.add_argument("--results", default=None, help="eval results.json for the model card (default: the newest "
                                                    "under RUN_DIR/eval/)")
    p.add_argument("--boundary-sigma-min", type=float, default=None, metavar="S",
                   help="sigma_min of the scalings when sampling (default: as recorded); ECT's evaluation: 0.003")
    p.add_argument("--license", default=None, metavar="ID",
                   help="the weights' license for the model card: a hub license id (apache-2.0, cc-by-4.0, "
                        "openrail++, ...); with --license-link, the name of another license")
    p.add_argument("--license-link", default=None, metavar="URL", help="link to the text of a --license not on the hub's list")
    p.add_argument("--dataset", action="append", default=[], metavar="ID",
                   help="a hub dataset id the model was trained on, for the card's `datasets` (repeatable)")
    p.add_argument("--sample-sigma-min", type=float, default=None, metavar="S",
                   help="sigma_min of the noise between steps, sqrt(tau^2 - S^2) (default: as recorded); ECT's: 0")
    args = p.parse_args(argv)
    if args.license is not None and not re.fullmatch(r"[a-z0-9][a-z0-9.+-]*", args.license):
        p.error(f"--license {args.license}: a hub license id is lower case letters, digits, '.', '+', '-'")
    if args.license_link and not args.license:
        p.error("--license-link needs --license NAME")
    for flag, v in (("--boundary-sigma-min", args.boundary_sigma_min), ("--sample-sigma-min", args.sample_sigma_min)):
        if v is not None and not (v >= 0 and v < 1):  # also refuses nan
            p.error(f"{flag} {v}: must lie in [0, 1) (a noise level below every sampling level)")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    src = resolve_export(args.checkpoint, args.ema)
    out = Path(args.out)
    if out.resolve() == src.resolve():
        raise UserError(f"--out {out}: is the source export; write to another folder")
    problem = output_dir_problem(out, "--out")
    if problem:
        raise UserError(problem)
    if out.is_dir() and any(out.iterdir()) and not _is_export(out):
        raise UserError(f"--out {out}: a folder that holds other files (not an lct export), which writing "
                        "the pipeline would replace; give a new or empty folder")
    if args.results and not Path(args.results).is_file():
        raise UserError(f"--results {args.results}: file not found")
    if (src / INDEX).is_file() and json.loads((src / INDEX).read_text()).get("_class_name") in (
            "PixArtSigmaPipeline", "PixArtAlphaPipeline"):
        raise UserError(f"{src}: a PixArt export is a stock diffusers pipeline folder already; copy it as it is")
    with quiet_loading():
        pipe = load_pipeline(src)
    record = dict(pipe.training_record or {})
    if args.results:
        record["eval"] = eval_summary(Path(args.results))
    else:
        run_dir = Path(str((record.get("config") or {}).get("run", {}).get("dir") or ""))
        if not run_dir.is_dir() and src.parent.name == "export":  # a run's export/<ema>/
            run_dir = src.parent.parent
        found = latest_eval(run_dir / "eval") if str(run_dir) not in ("", ".") else None
        record["eval"] = found or record.get("eval")
    if args.boundary_sigma_min is not None or args.sample_sigma_min is not None:
        from lct.scheduler import with_sampling_sigma_min

        pipe.register_modules(scheduler=with_sampling_sigma_min(pipe.scheduler, args.boundary_sigma_min,
                                                                args.sample_sigma_min))
        method = dict(record.get("method") or {})
        method["sample_boundary_sigma_min"] = pipe.scheduler.config.sigma_min
        method["sample_sigma_min"] = pipe.scheduler.noise_sigma_min
        record["method"] = method
    card = dict(record.get("card") or {})
    if args.license:
        card.update({"license": None, "license_name": args.license, "license_link": args.license_link}
                    if args.license_link else {"license": args.license, "license_name": None, "license_link": None})
    if args.dataset:
        card["datasets"] = list(dict.fromkeys(args.dataset))
    if card:
        record["card"] = card
    pipe.training_record = record
    if args.copy_all:
        pipe.register_to_config(vae_source=None, text_source=None, vae_latents=None)
    write_export(pipe, out)
    refs = [n for n, k in (("vae", "vae_source"), ("text tower", "text_source")) if pipe.config[k] is not None]
    print(f"wrote the pipeline folder {out}" + (f" (referenced, not copied: {', '.join(refs)}; --copy-all copies them)"
                                                 if refs else ""))
    return 0


def cli() -> None:
    cli_main(main)


if __name__ == "__main__":
    cli()
