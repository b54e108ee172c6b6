"""PixArt exports: a consistency-tuned PixArt (SPEC 14) as a diffusers `PixArtSigmaPipeline` folder
(`PixArtAlphaPipeline` for 120-token text), sampled by lct's `LCTVPScheduler`.

    export/<ema>/
      model_index.json      the stock pipeline class; scheduler ["lct_scheduler", "LCTVPScheduler"]
      transformer/          PixArtTransformer2DModel with the EMA weights (still an epsilon / v predictor)
      scheduler/            LCTVPScheduler: the model's beta table and prediction type, SPEC 9's levels
                            (sigma_max, the tuned taus), and lct_scheduler.py + consistency.py (lct's source)
      vae/ text_encoder/ tokenizer/   the data's VAE and T5 tower when local and small (else referenced
                            in lct_export.json: `load_pixart_export` fills them in)
      null_condition.safetensors   the trained null condition: `negative_prompt_embeds` [1, L, D] and
                            `negative_prompt_attention_mask` [1, L] (guidance's unconditional branch)
      README.md             the model card: the tuned sampler, whose code runs as written
      lct_export.json       lct's training record (no absolute paths)

Why lct's own scheduler: no diffusers scheduler re-noises a VP model's denoised latent at an
arbitrary level. `LCMScheduler` (like every other) indexes integer timesteps, so a 2-step sample
was re-noised at the integer timestep nearest t(tau) (0.27 % of sigma at the configs' tau, 3 % for
tau in 0.05-0.2, 22 % below 0.05) and the network saw that integer instead of t(tau).
`LCTVPScheduler` samples SPEC 9's levels exactly, and its config holds the tuned taus, so
`num_inference_steps=2` samples them by default (a scheduler config rather than a documented
`timesteps=`: integer timesteps cannot express them). diffusers alone therefore loads the folder
with `trust_remote_code=True` (it runs `scheduler/lct_scheduler.py` and `consistency.py`);
`load_pixart_export` reads it as data, building the scheduler from lct's class.

Prompts: diffusers' PixArt pipelines lower-case prompts (`_text_preprocessing`); lct tunes on the
captions as given (SPEC 14.3). The card's recipe, like lct's training grids, passes `prompt_embeds`
of the caption as given (`caption_embeds`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from lct.errors import UserError
from lct.export_common import (REMAKE_HINT, LoadError, _first_line, _text_component, _vae_component,
                               is_tokenizer_class, quiet_loading, resolve_export, training_record)
from lct.files import atomic_dir
from lct.model_card import META, card_header, license_lines

PIXART_NULL = "null_condition.safetensors"
PIPELINES = ("PixArtSigmaPipeline", "PixArtAlphaPipeline")
SCHEDULER_KEYS = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas", "prediction_type")
# What load_pixart_export loads (library, classes) by component; anything else is refused.
PIXART_KNOWN = {"transformer": ("diffusers", {"PixArtTransformer2DModel"}),
                "scheduler": ("lct_scheduler", {"LCTVPScheduler"}),  # exports before lct-export/3: LCMScheduler
                "vae": ("diffusers", {"AutoencoderKL"}),
                "text_encoder": ("transformers", {"T5EncoderModel"}),
                "tokenizer": ("transformers", None)}  # any transformers tokenizer class


def pixart_scheduler(model, method):
    """The `LCTVPScheduler` of a PixArt denoiser (`VPDenoiser`): its beta table and prediction type,
    the method's sampling scalings and levels (SPEC 2.4, 9, 14)."""
    from lct.scheduler import LCTVPScheduler

    cfg = getattr(model, "scheduler_config", None) or {}
    # The boundary of the scalings is the denoiser's own (training's) sigma_min, as the grids have
    # always sampled a SPEC 14 denoiser: the ect preset's evaluation boundary 0.003 is in sigma_data
    # 0.5 units and for EDM-style scalings (SPEC 2.4), not for a VP model (SPEC 14.2, 14.4).
    return LCTVPScheduler(**{k: cfg[k] for k in SCHEDULER_KEYS if cfg.get(k) is not None},
                          sigma_min=float(getattr(model, "sigma_min", method.sigma_min)),
                          sample_sigma_min=method.sampling_sigma_mins()[1], sigma_max=method.sigma_max,
                          sigma_data=method.sigma_data, taus=list(method.tau))


def pipeline_class(text_length: int):
    from diffusers import PixArtAlphaPipeline, PixArtSigmaPipeline

    return PixArtAlphaPipeline if int(text_length) == 120 else PixArtSigmaPipeline


def null_condition(model, length: int) -> dict[str, torch.Tensor]:
    """The trained null condition as the pipeline's negative prompt: states [1, L, D] (padded) and mask [1, L]."""
    null = model.net.null_text_states.detach().float().cpu()
    embeds = torch.nn.functional.pad(null, (0, 0, 0, max(0, length - null.shape[0])))[None]
    mask = (torch.arange(embeds.shape[1]) < null.shape[0]).long()[None]
    return {"negative_prompt_embeds": embeds.contiguous(), "negative_prompt_attention_mask": mask}


def training_pixart_pipeline(model, cfg, manifest: dict, *, vae=None, text_encoder=None, tokenizer=None):
    """The export's pipeline in memory around a PixArt denoiser being trained (its transformer
    itself): what the trainer's sample grids run. Give it `caption_embeds` (no text tower)."""
    return pipeline_class(text_length(model, manifest))(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae,
                                                       transformer=model.net.transformer,
                                                       scheduler=pixart_scheduler(model, cfg.method))


def text_length(model, manifest: dict) -> int:
    """The T5 token length L of the data (PixArt-alpha 120, PixArt-Sigma 300)."""
    return int((manifest.get("text") or {}).get("context_length") or model.net.null_text_states.shape[0])


def caption_embeds(pipe, states: torch.Tensor, mask: torch.Tensor, null: dict[str, torch.Tensor]) -> dict:
    """The PixArt pipeline's text inputs for token states of the captions as given (lct's text
    tower or the recipe's T5 call) and the trained null condition, batched."""
    b = states.shape[0]
    return {"prompt_embeds": states, "prompt_attention_mask": mask.long(), "negative_prompt": None,
            "negative_prompt_embeds": null["negative_prompt_embeds"].to(states).expand(b, -1, -1),
            "negative_prompt_attention_mask": null["negative_prompt_attention_mask"].to(states.device).expand(b, -1),
            "use_resolution_binning": False, "max_sequence_length": states.shape[1]}


def export_pixart(model: torch.nn.Module, ema_state: dict[str, torch.Tensor], out_dir: Path, *, cfg, manifest: dict,
                  ema_name: str, step: int, images_seen: int | None = None) -> Path:
    """A tuned PixArt as a stock diffusers pipeline folder with lct's scheduler (module docstring)."""
    from diffusers import PixArtTransformer2DModel
    from safetensors.torch import save_file

    from lct.pipeline import _copy_module, _write_json, portable

    net = model.net  # PixArtNet
    with torch.random.fork_rng(devices=[]):
        transformer = PixArtTransformer2DModel.from_config(net.transformer.config)
    prefix = "net.transformer."
    transformer.load_state_dict({k[len(prefix):]: v for k, v in ema_state.items() if k.startswith(prefix)}, strict=True)
    null_model = torch.nn.Module()
    null_model.net = torch.nn.Module()
    null_model.net.null_text_states = torch.nn.Parameter(ema_state["net.null_text_states"].float())
    text = manifest.get("text") or {}
    length = int(text.get("context_length") or null_model.net.null_text_states.shape[0])
    vae, vae_source = _vae_component(manifest.get("vae"))
    text_encoder, tokenizer, text_source = _text_component(manifest)
    scheduler = pixart_scheduler(model, cfg.method)
    cls = pipeline_class(length)
    pipe = cls(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, transformer=transformer.eval(), scheduler=scheduler)
    record = training_record(cfg, manifest, ema_name, step, images_seen)
    record.update(pipeline=cls.__name__, vae_source=vae_source, text_source=text_source, max_sequence_length=length,
                  null_condition=PIXART_NULL, levels=[float(v) for v in scheduler.levels[:1] + list(cfg.method.tau)])
    with atomic_dir(Path(out_dir)) as tmp:
        pipe.save_pretrained(tmp)
        index = json.loads((tmp / "model_index.json").read_text())
        index["scheduler"] = [_copy_module(type(scheduler), tmp / "scheduler", "lct_scheduler.py"), type(scheduler).__name__]
        _write_json(tmp / "model_index.json", index)
        for cfg_file in tmp.glob("*/config.json"):
            c = json.loads(cfg_file.read_text())
            if c.pop("_name_or_path", None) is not None:
                _write_json(cfg_file, c)
        save_file(null_condition(null_model, length), str(tmp / PIXART_NULL))
        record = portable(record, tmp)
        (tmp / META).write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")
        (tmp / "README.md").write_text(pixart_card(cls.__name__, record, length, scheduler))
    return Path(out_dir)


def pixart_card(pipeline: str, record: dict, length: int, scheduler) -> str:
    """README.md of a PixArt export: the hub header (base_model: the tuned model) and the tuned
    sampler, whose code runs as written once PATH is a local copy of the folder."""
    cfg = record.get("config") or {}
    method = record.get("method") or {}
    taus = list(scheduler.config.taus)
    steps = 2 if taus else 1
    return "\n".join([
        *card_header(record, "text-to-image", ["lct", "consistency-model", "text-to-image", "pixart",
                                               str(method.get("preset") or "ect")]),
        f"# {Path(str((cfg.get('run') or {}).get('dir') or 'lct model')).name}: a consistency-tuned PixArt (lct)",
        "",
        f"`{(record.get('model') or {}).get('pretrained')}` tuned into a {steps}-step consistency model with lct's "
        f"`{method.get('preset')}` method ({record.get('step')} optimizer steps, docs/SPEC.md section 14), as a "
        f"diffusers `{pipeline}` whose scheduler is lct's `LCTVPScheduler`: SPEC 9's levels {scheduler.levels[0]:.6g}"
        + (f", then {', '.join(f'{t:.6g}' for t in taus)}" if taus else "")
        + " (sigma), sampled exactly; `num_inference_steps` picks them, `sigmas=[...]` gives others.",
        "",
        "## Use",
        "",
        "The tuned sampler: 2 steps at the tuned levels, the caption as lct tuned on it (diffusers' PixArt "
        "pipelines lower-case a `prompt`; pass `prompt_embeds` as below to keep its case), and classifier-free "
        "guidance against the trained null condition (`null_condition.safetensors`, with `negative_prompt=None`: the "
        "pipeline's default negative prompt is \"\"; guidance_scale 1 = off, a consistency model takes only mild "
        "guidance).",
        "",
        "```python",
        "import torch",
        f"from diffusers import {pipeline}",
        "from safetensors.torch import load_file",
        "",
        "path = \"PATH\"  # a local copy of this folder (from the hub: huggingface_hub.snapshot_download)",
        f"pipe = {pipeline}.from_pretrained(path, trust_remote_code=True)  # runs scheduler/lct_scheduler.py",
        "null = load_file(f\"{path}/null_condition.safetensors\")",
        f"ids = pipe.tokenizer([\"A red fox in the snow\"], padding=\"max_length\", max_length={length}, "
        "truncation=True, add_special_tokens=True, return_tensors=\"pt\")",
        "with torch.no_grad():",
        "    embeds = pipe.text_encoder(ids.input_ids, attention_mask=ids.attention_mask)[0]",
        "image = pipe(prompt_embeds=embeds, prompt_attention_mask=ids.attention_mask, negative_prompt=None,",
        "             negative_prompt_embeds=null[\"negative_prompt_embeds\"],",
        "             negative_prompt_attention_mask=null[\"negative_prompt_attention_mask\"],",
        f"             guidance_scale=1.5, num_inference_steps={steps}, max_sequence_length={length},",
        "             use_resolution_binning=False, generator=torch.Generator().manual_seed(0)).images[0]",
        "```",
        "",
        "`trust_remote_code=True` runs two Python files of this folder, `scheduler/lct_scheduler.py` and "
        "`scheduler/consistency.py` (lct's own source, copied as it is: torch and diffusers only); read them "
        "first, and pin a `revision` when loading from the hub. With lct installed (`pip install "
        "lct-consistency`) no code of the folder runs: `from lct.export_pixart import load_pixart_export; pipe, "
        "null = load_pixart_export(path)`. `use_resolution_binning=False`: the tuning saw one square "
        f"resolution ({record.get('resolution')} px).",
        "",
        "## License",
        "",
        *license_lines(record),
        "",
    ])


def load_pixart_export(path: str | os.PathLike, *, vae: str | None = None, text_encoder: str | None = None):
    """(pipeline, null condition dict) of an `export_pixart` folder, loaded as data: each component
    by its class (`PIXART_KNOWN`; lct's `LCTVPScheduler`, never the folder's copy), anything else
    refused in one line; components it references (a hub VAE or T5 tower) are loaded from `vae` /
    `text_encoder` or from the recorded sources."""
    import diffusers
    import transformers
    from safetensors.torch import load_file

    from lct.pipeline import localize
    from lct.scheduler import LCTVPScheduler

    d = resolve_export(path)
    try:
        index = json.loads((d / "model_index.json").read_text())
        record = localize(json.loads((d / META).read_text()), d)
    except (OSError, ValueError) as err:
        raise LoadError(f"{d}: not a readable PixArt export ({_first_line(err)}); {REMAKE_HINT}") from None
    if index.get("_class_name") not in PIPELINES:
        raise LoadError(f"{d / 'model_index.json'}: pipeline class {index.get('_class_name')!r} is not a PixArt export's")
    kw: dict[str, Any] = {}
    for name, value in index.items():
        if name.startswith("_") or not isinstance(value, list) or len(value) != 2 or value[0] is None:
            continue
        lib, cls = value
        known = PIXART_KNOWN.get(name)
        if (name, lib, cls) == ("scheduler", "diffusers", "LCMScheduler"):
            continue
        if not known or lib != known[0] or not (cls in known[1] if known[1] else is_tokenizer_class(lib, cls)):
            raise LoadError(f"{d / 'model_index.json'}: component {name!r} names {lib}.{cls} ({d / name / f'{lib}.py'}), "
                            "which lct does not load: exports are data to lct, and no code of the folder runs")
    try:
        with quiet_loading():
            if vae or record.get("vae_source"):
                from lct.vae import load_vae

                kw["vae"] = load_vae(vae or record["vae_source"], "cpu", torch.float32)
            elif index.get("vae", [None])[0]:
                kw["vae"] = diffusers.AutoencoderKL.from_pretrained(str(d), subfolder="vae")
            if text_encoder or record.get("text_source"):
                from lct.hf_text import HFTextEncoder

                src = text_encoder or ((record.get("text_source") or {}).get("source") or {}).get("id")
                enc = HFTextEncoder.load(src, max_length=record["max_sequence_length"], key="--text-encoder")
                kw.update(text_encoder=enc.model, tokenizer=enc.hf_tokenizer)
            elif index.get("text_encoder", [None])[0]:
                kw["text_encoder"] = transformers.T5EncoderModel.from_pretrained(str(d / "text_encoder")).eval()
                kw["tokenizer"] = getattr(transformers, index["tokenizer"][1]).from_pretrained(str(d / "tokenizer"))
            kw["transformer"] = diffusers.PixArtTransformer2DModel.from_pretrained(str(d), subfolder="transformer").eval()
            sched = LCTVPScheduler if index["scheduler"][1] == "LCTVPScheduler" else diffusers.LCMScheduler
            kw["scheduler"] = sched.from_pretrained(str(d), subfolder="scheduler")
    except UserError:
        raise
    except Exception as err:
        raise LoadError(f"{d}: could not be loaded as a {index['_class_name']} ({_first_line(err)}); {REMAKE_HINT}") from None
    kw.setdefault("vae", None)
    kw.setdefault("text_encoder", None)
    kw.setdefault("tokenizer", None)
    pipe = getattr(diffusers, index["_class_name"])(**kw)
    pipe.set_progress_bar_config(disable=True)
    return pipe, load_file(str(d / PIXART_NULL))
