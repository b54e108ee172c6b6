"""Exported models: an EMA of the network as a diffusers pipeline folder (`lct.pipeline.LCTPipeline`).

    export/<ema>/
      model_index.json    components + the latent statistics (SPEC 7) + the training record
      pipeline.py         one line importing lct.pipeline (diffusers' custom-pipeline route)
      transformer/        TextDiT (config.json + safetensors, the EMA weights)
      scheduler/          LCTScheduler: sigma_min (the scalings' boundary when sampling: the
                          training value unless method.sample_boundary_sigma_min), sample_sigma_min, sigma_max,
                          sigma_data, time_embed_scale, taus (SPEC 1, 9)
      vae/                AutoencoderKL, when the data's VAE is a local folder <= CARRY_MAX_BYTES
      text_encoder/ tokenizer/   CLIPTextModelWithProjection + CLIPTokenizer where the open_clip
                          tower maps onto them, else lct's OpenCLIPTextModel (no tokenizer/); when
                          its weights file is local and <= CARRY_MAX_BYTES
      README.md           the model card (hub YAML header)
      lct_export.json     lct's record (format lct-export/2): ema, step, method, data, config

A hub VAE, an open_clip pretrained tag or a large local file is referenced (`vae_source`,
`text_source` in model_index.json) instead of copied into every EMA export at every checkpoint;
the pipeline loads the reference when it is built. `python -m lct.export SRC --out DIR
--copy-all` writes a self-contained folder (for an upload), refreshes the model card with the
run's latest eval, and converts exports written before pipelines (format lct-export/1: TextDiT
weights beside lct_export.json), which `lct.pipeline.load_pipeline` also reads directly.

    python -m lct.export runs/lct_coco --out hub/lct_coco --copy-all
    huggingface-cli upload USER/lct-coco hub/lct_coco .      # a plain folder upload

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
import contextlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lct.errors import UserError, cli_main
from lct.files import atomic_dir, output_dir_problem
from lct.model_card import EXPORT_FORMAT, META

LEGACY_FORMAT = "lct-export/1"
INDEX = "model_index.json"
CARRY_MAX_BYTES = 200 * 2**20  # a VAE or text tower at most this large is copied into each export
REMAKE_HINT = ("the trainer writes exports at every checkpoint (lct/train.py); `python -m lct.export RUN_DIR "
               "--out DIR` rewrites one from a run directory or an older export")


# ----------------------------------------------------------------------------------------------
# Writing
# ----------------------------------------------------------------------------------------------


def export_network(precond: torch.nn.Module, ema_state: dict[str, torch.Tensor], out_dir: Path, *,
                   cfg, manifest: dict, ema_name: str, step: int, images_seen: int | None = None) -> Path:
    """Write EMA weights of `precond.net` as a pipeline folder (module docstring), atomically."""
    from lct.latents import latent_stats
    from lct.pipeline import LCTPipeline, references_unresolved
    from lct.scheduler import LCTScheduler

    net = precond.net
    if cfg.model.arch == "pixart":
        return export_pixart(precond, ema_state, out_dir, cfg=cfg, manifest=manifest, ema_name=ema_name, step=step,
                             images_seen=images_seen)
    with torch.random.fork_rng(devices=[]):  # building the copy must not move the training RNG
        cpu_net = type(net).from_config(net.config)
    prefix = "net."
    state = {k[len(prefix):]: v for k, v in ema_state.items() if k.startswith(prefix)}
    missing, unexpected = cpu_net.load_state_dict(state, strict=False)
    frozen = {n for n, p in cpu_net.named_parameters() if not p.requires_grad} | set(dict(cpu_net.named_buffers()))
    if unexpected or [m for m in missing if m not in frozen]:
        raise RuntimeError(f"EMA does not match the network: missing {missing[:5]}, unexpected {unexpected[:5]}")
    cpu_net.eval()
    m = cfg.method
    boundary_sigma_min, sample_sigma_min = m.sampling_sigma_mins()
    scheduler = LCTScheduler(sigma_min=boundary_sigma_min, sigma_max=m.sigma_max, sigma_data=m.sigma_data,
                             time_embed_scale=m.time_embed_scale, sample_sigma_min=sample_sigma_min,
                             taus=list(m.tau))
    norm = cfg.data.latent_norm
    mean, std = (None, None) if norm == "vae" else latent_stats(manifest, norm)
    vae, vae_source = _vae_component(manifest.get("vae"))
    text_encoder = tokenizer = text_source = None
    text_rec = manifest.get("text") or {}
    if cfg.model.cond == "text":
        text_encoder, tokenizer, text_source = _text_component(manifest)
    record = training_record(cfg, manifest, ema_name, step, images_seen)
    with references_unresolved():
        pipe = LCTPipeline(cpu_net, scheduler, vae, text_encoder, tokenizer,
                           latent_mean=None if mean is None else np.asarray(mean, dtype=np.float64).tolist(),
                           latent_std=None if std is None else np.asarray(std, dtype=np.float64).tolist(),
                           latent_norm_kind=norm,
                           vae_source=vae_source, text_source=text_source, training=record,
                           text_kind=text_rec.get("kind", "open_clip"),
                           text_max_length=text_rec.get("context_length") if text_rec.get("kind") else None)
    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as tmp:
        pipe.save_pretrained(tmp)
    return out_dir


PIXART_NULL = "null_condition.safetensors"


def pixart_scheduler(scheduler_config: dict):
    """SPEC 9's 1/2/k-step sampling of a tuned PixArt (an epsilon / v predictor still, SPEC 14.2) as
    diffusers' `LCMScheduler` on the model's own beta table: each step predicts x0 and re-noises it
    to the next timestep (`timesteps=[999, t(tau)]`). `timestep_scaling` 1e4 makes LCM's
    boundary-condition skip vanish (c_skip < 1e-7 for t >= 1): the denoised latent is the model's."""
    from diffusers import LCMScheduler

    keep = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas", "prediction_type")
    return LCMScheduler(**{k: scheduler_config[k] for k in keep if scheduler_config.get(k) is not None},
                        timestep_scaling=1e4, set_alpha_to_one=True, clip_sample=False, original_inference_steps=1000)


def pixart_timesteps(model, taus) -> list[int]:
    """The integer timesteps of SPEC 9's sampling levels: 999 (sigma_max), then t(tau) rounded."""
    from lct.models.vp import sigma_to_timestep

    t = sigma_to_timestep(torch.tensor(list(taus), dtype=torch.float64), model.log_sigmas.double().cpu())
    return [int(model.log_sigmas.numel() - 1)] + [int(round(float(v))) for v in t]


def export_pixart(model: torch.nn.Module, ema_state: dict[str, torch.Tensor], out_dir: Path, *, cfg, manifest: dict,
                  ema_name: str, step: int, images_seen: int | None = None) -> Path:
    """A tuned PixArt as a diffusers `PixArtSigmaPipeline` folder (PixArt-alpha's text length 120:
    `PixArtAlphaPipeline`): transformer/ with the EMA weights, scheduler/ (`pixart_scheduler`), the
    data's VAE and T5 tower when local and small (else referenced in lct_export.json: pass them to
    `from_pretrained`), and the trained null condition (`null_condition.safetensors`:
    `negative_prompt_embeds` [1, L, D] and `negative_prompt_attention_mask` [1, L], for guidance)."""
    from diffusers import PixArtAlphaPipeline, PixArtSigmaPipeline, PixArtTransformer2DModel
    from safetensors.torch import save_file

    net = model.net  # PixArtNet
    with torch.random.fork_rng(devices=[]):
        transformer = PixArtTransformer2DModel.from_config(net.transformer.config)
    prefix = "net.transformer."
    state = {k[len(prefix):]: v for k, v in ema_state.items() if k.startswith(prefix)}
    transformer.load_state_dict(state, strict=True)
    null = ema_state["net.null_text_states"].float()
    text = manifest.get("text") or {}
    length = int(text.get("context_length") or null.shape[0])
    vae, vae_source = _vae_component(manifest.get("vae"))
    text_encoder, tokenizer, text_source = _text_component(manifest)
    cls = PixArtAlphaPipeline if length == 120 else PixArtSigmaPipeline
    scheduler = pixart_scheduler(getattr(model, "scheduler_config", None) or {})
    pipe = cls(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, transformer=transformer.eval(),
               scheduler=scheduler)
    record = training_record(cfg, manifest, ema_name, step, images_seen)
    record.update(pipeline=cls.__name__, vae_source=vae_source, text_source=text_source,
                  timesteps={f"{n}_step": pixart_timesteps(model, cfg.method.tau[: n - 1]) for n in (1, 2)},
                  max_sequence_length=length, null_condition=PIXART_NULL,
                  sampling=("pipe(prompt, timesteps=record['timesteps']['1_step'], guidance_scale=1.0, "
                            f"max_sequence_length={length}, use_resolution_binning=False); guidance > 1 with "
                            "negative_prompt_embeds / negative_prompt_attention_mask from null_condition.safetensors"))
    embeds = torch.nn.functional.pad(null, (0, 0, 0, max(0, length - null.shape[0])))[None]
    mask = (torch.arange(embeds.shape[1]) < null.shape[0]).long()[None]
    with atomic_dir(Path(out_dir)) as tmp:
        pipe.save_pretrained(tmp)
        save_file({"negative_prompt_embeds": embeds.contiguous(), "negative_prompt_attention_mask": mask},
                  str(Path(tmp) / PIXART_NULL))
        (Path(tmp) / META).write_text(json.dumps(_jsonable(record), indent=1) + "\n")
    return Path(out_dir)


def load_pixart_export(path: str | os.PathLike, *, vae: str | None = None, text_encoder: str | None = None):
    """(pipeline, null condition dict) of an `export_pixart` folder; components it references (a hub
    VAE or T5 tower) are loaded from `vae` / `text_encoder` or from the recorded sources."""
    import diffusers
    from safetensors.torch import load_file

    d = Path(path)
    record = json.loads((d / META).read_text())
    kw: dict[str, Any] = {}
    if vae or record.get("vae_source"):
        from lct.vae import load_vae

        kw["vae"] = load_vae(vae or record["vae_source"], "cpu", torch.float32)
    if text_encoder or record.get("text_source"):
        from lct.hf_text import HFTextEncoder

        src = text_encoder or ((record.get("text_source") or {}).get("source") or {}).get("id")
        enc = HFTextEncoder.load(src, max_length=record["max_sequence_length"], key="--text-encoder")
        kw.update(text_encoder=enc.model, tokenizer=enc.hf_tokenizer)
    try:
        with quiet_loading():
            pipe = getattr(diffusers, record["pipeline"]).from_pretrained(str(d), **kw)
    except Exception as err:
        msg = str(err).strip().splitlines()
        raise UserError(f"{d}: could not be loaded as a {record['pipeline']} "
                        f"({(msg[0] if msg else type(err).__name__)[:300]}); {REMAKE_HINT}") from None
    pipe.set_progress_bar_config(disable=True)
    return pipe, load_file(str(d / PIXART_NULL))


def training_record(cfg, manifest: dict, ema_name: str, step: int, images_seen: int | None) -> dict:
    """What the model card and lct's tools read (model_index.json `training`, lct_export.json)."""
    m = cfg.method
    ema = next((e for e in cfg.ema.models if e.name == ema_name), None)
    return {
        "format": EXPORT_FORMAT,
        "ema": ema_name,
        "ema_halflife_images": ema.resolved_halflife() if ema is not None else None,
        "step": int(step),
        "images_seen": int(images_seen) if images_seen is not None else int(step) * int(cfg.optim.batch_size),
        "method": {"preset": m.preset, "objective": m.objective, "sigma_min": m.sigma_min,
                   "sample_boundary_sigma_min": m.sampling_sigma_mins()[0],
                   "sample_sigma_min": m.sampling_sigma_mins()[1],
                   "sigma_max": m.sigma_max, "sigma_data": m.sigma_data,
                   "time_embed_scale": m.time_embed_scale, "tau": list(m.tau)},
        "model": {"cond": cfg.model.cond, "arch": cfg.model.arch},
        "latent": {"norm": cfg.data.latent_norm, "shape": list(manifest["latent_shape"])},
        "vae": _jsonable(manifest.get("vae")),
        "text": _jsonable(manifest.get("text")),
        "resolution": manifest.get("resolution"),
        "manifest_path": manifest.get("manifest_path"),
        "eval": latest_eval(Path(cfg.run.dir) / "eval"),
        "example_prompt": example_prompt(cfg),
        "config": cfg.model_dump(mode="json"),
    }


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
        import tarfile

        from lct.data import expand_urls

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
    from lct.pipeline_text import OpenCLIPTextModel, to_clip_text_model

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


# ----------------------------------------------------------------------------------------------
# Reading
# ----------------------------------------------------------------------------------------------


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


def check_pipeline_folder(d: Path) -> None:
    """One line naming the first missing file of a pipeline folder and the command that makes it."""
    index_file = d / "model_index.json"
    try:
        index = json.loads(index_file.read_text())
    except (OSError, ValueError) as err:
        raise UserError(f"{index_file}: unreadable ({err}); {REMAKE_HINT}") from None
    weights = {"transformer": ("diffusion_pytorch_model.safetensors",), "vae": ("diffusion_pytorch_model.safetensors",),
               "text_encoder": ("model.safetensors", "diffusion_pytorch_model.safetensors"),
               "tokenizer": ("tokenizer.json",), "scheduler": ()}
    for name, value in index.items():
        if name.startswith("_") or not isinstance(value, list) or len(value) != 2 or value[0] is None:
            continue
        cfg = "scheduler_config.json" if name == "scheduler" else (
            "tokenizer_config.json" if name == "tokenizer" else "config.json")
        for f in (cfg, *weights.get(name, ())[:1]):
            alts = [f] if f == cfg else list(weights[name])
            if not any((d / name / a).is_file() for a in alts):
                raise UserError(f"{d / name / alts[0]} is missing (component {name!r} of model_index.json); "
                                f"{REMAKE_HINT}")


def load_pipeline(path: str | os.PathLike, ema: str | None = None, *, vae: str | None = None,
                  text_pretrained: str | None = None, device: str | torch.device | None = None):
    """The pipeline of an export or run directory (`export/<ema>/`), in either format: a
    pipeline folder (model_index.json) or an export written before pipelines
    (`lct_export.json` format lct-export/1 beside the TextDiT weights). `vae` / `text_pretrained`
    replace the recorded VAE / text-tower weights (e.g. a local copy). Returns an `LCTPipeline`."""
    from lct.pipeline import LCTPipeline, resolve_text

    d = resolve_export(path, ema)
    overrides: dict[str, Any] = {}
    if (d / "model_index.json").is_file():
        check_pipeline_folder(d)
        index = json.loads((d / "model_index.json").read_text())
        if vae:
            from lct.vae import load_vae

            overrides["vae"] = load_vae(vae, "cpu", torch.float32)
        if text_pretrained and index.get("text_source") is None and (index.get("text_encoder") or [None])[0] is None:
            raise UserError("--text-pretrained: this export records no text tower")
        if text_pretrained:
            rec = index.get("text_source") or (index.get("training") or {}).get("text")
            if not rec:
                raise UserError("--text-pretrained: the export does not record which open_clip model its text tower is")
            overrides["text_encoder"], overrides["tokenizer"] = resolve_text(rec, text_pretrained)
        try:
            with quiet_loading():
                pipe = LCTPipeline.from_pretrained(str(d), **overrides)
        except UserError:
            raise
        except Exception as err:  # a truncated weight file, a config from another version
            msg = str(err).strip().splitlines()
            raise UserError(f"{d}: could not be loaded as a pipeline ({(msg[0] if msg else type(err).__name__)[:300]}); "
                            f"{REMAKE_HINT}") from None
    else:
        with quiet_loading():
            pipe = pipeline_from_legacy(d, vae=vae, text_pretrained=text_pretrained)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device) if device is not None else pipe


def _is_export(p: Path) -> bool:
    return (p / INDEX).is_file() or (p / META).is_file()


def resolve_export(path: str | os.PathLike, ema: str | None = None) -> Path:
    """An export directory from an export or run directory (`export/<ema>/`, default the run's
    sample EMA)."""
    p = Path(path)
    if _is_export(p):
        return p
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


def pipeline_from_legacy(d: Path, vae: str | None = None, text_pretrained: str | None = None):
    """An `LCTPipeline` from an export written before pipelines (lct-export/1); what it
    referenced from outside the folder stays referenced when it is saved."""
    from lct.models import TextDiT
    from lct.pipeline import LCTPipeline
    from lct.pipeline_text import OpenCLIPTextModel
    from lct.scheduler import LCTScheduler
    from lct.vae import load_vae

    meta = json.loads((d / META).read_text())
    if meta.get("format") != LEGACY_FORMAT:
        raise UserError(f"{d / META}: unknown export format {meta.get('format')!r} and no {INDEX}; {REMAKE_HINT}")
    if not any(d.glob("*.safetensors")) or not (d / "config.json").is_file():
        raise UserError(f"{d}: config.json or the network's safetensors file is missing; {REMAKE_HINT}")
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
    vae_model = load_vae(vae_id, "cpu", torch.float32)
    text_encoder = tokenizer = None
    text_rec = meta.get("text") or {}
    text_copied = bool(text_rec.get("pretrained_relative")) and (d / text_rec["pretrained_relative"]).is_file()
    if meta["model"]["cond"] == "text":
        from lct.text import TextEncoder

        # open_clip's own tower, as lct.sample ran it: an old export samples the same images.
        enc = TextEncoder.from_manifest({"text": text_rec, "_dir": str(d)}, pretrained=text_pretrained)
        text_encoder = OpenCLIPTextModel.from_encoder(enc)
    lat = meta["latent"]
    training = {k: v for k, v in meta.items() if k != "format"} | {"format": EXPORT_FORMAT, "converted_from": LEGACY_FORMAT}
    training.setdefault("images_seen", None)
    training.setdefault("eval", None)
    pipe = LCTPipeline(net, scheduler, vae_model, text_encoder, tokenizer, latent_mean=lat["mean"],
                       latent_std=lat["std"], training=training, latent_norm_kind=lat.get("norm", "channel"))
    if not copied and not vae:
        pipe._referenced.add("vae")
        pipe.register_to_config(vae_source=vae_id)
    if meta["model"]["cond"] == "text" and not text_copied and not text_pretrained:
        pipe._referenced.add("text_encoder")
        pipe.register_to_config(text_source=text_rec)
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
    p.add_argument("--sample-sigma-min", type=float, default=None, metavar="S",
                   help="sigma_min of the noise between steps, sqrt(tau^2 - S^2) (default: as recorded); ECT's: 0")
    args = p.parse_args(argv)
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
    pipe = load_pipeline(src)
    training = dict(pipe.config.training or {})
    if args.results:
        training["eval"] = eval_summary(Path(args.results))
    else:
        run_dir = Path(str((training.get("config") or {}).get("run", {}).get("dir") or ""))
        found = latest_eval(run_dir / "eval") if str(run_dir) not in ("", ".") else None
        training["eval"] = found or training.get("eval")
    if args.boundary_sigma_min is not None or args.sample_sigma_min is not None:
        from lct.scheduler import with_sampling_sigma_min

        pipe.register_modules(scheduler=with_sampling_sigma_min(pipe.scheduler, args.boundary_sigma_min,
                                                                args.sample_sigma_min))
        method = dict(training.get("method") or {})
        method["sample_boundary_sigma_min"] = pipe.scheduler.config.sigma_min
        method["sample_sigma_min"] = pipe.scheduler.noise_sigma_min
        training["method"] = method
    pipe.register_to_config(training=training)
    if args.copy_all:
        pipe.copy_referenced()
    with atomic_dir(out) as tmp:
        pipe.save_pretrained(tmp)
    refs = sorted(pipe._referenced)
    print(f"wrote the pipeline folder {out}" + (f" (referenced, not copied: {', '.join(refs)}; --copy-all copies them)"
                                                 if refs else ""))
    return 0


def cli() -> None:
    cli_main(main)


if __name__ == "__main__":
    cli()
