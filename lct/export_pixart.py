"""PixArt exports: a consistency-tuned PixArt (SPEC 14) as a stock diffusers `PixArtSigmaPipeline`
folder (`PixArtAlphaPipeline` for 120-token text) with diffusers' stock `LCMScheduler`: it loads with
`from_pretrained(path)` and runs no code of the folder.

    export/<ema>/
      model_index.json      the stock pipeline class; scheduler ["diffusers", "LCMScheduler"]
      transformer/          PixArtTransformer2DModel with the EMA weights (still an epsilon / v predictor)
      scheduler/            LCMScheduler: the model's beta table and prediction type, timestep_scaling 1e10
                            (plain x0: the sigma_min-0 consistency function), original_inference_steps = T
      vae/ text_encoder/ tokenizer/   the data's VAE and T5 tower when local and small (else referenced
                            in lct_export.json: `load_pixart_export` fills them in)
      null_condition.safetensors   the trained null condition: `negative_prompt_embeds` [1, L, D] and
                            `negative_prompt_attention_mask` [1, L] (guidance's unconditional branch)
      README.md             the model card: the tuned sampler, whose code runs as written
      lct_export.json       lct's training record (no absolute paths): `timesteps` and `levels` of each
                            tuned step count, `start_scale`

The sampler (SPEC 14.8): `pipe(..., timesteps=record["timesteps"]["2_step"], latents=start_scale * z)`.
`LCMScheduler.step` returns `c_out x0_hat + c_skip x_t` (c_out = 1 exactly in fp32 and c_skip <= 2.5e-21
at timestep_scaling 1e10 for t >= 1) and re-noises it to `sqrt(abar_t') x0_hat + sqrt(1 - abar_t') z'`
at the next given timestep: in lct's coordinates `f + sigma_t' z'`, SPEC 9's step with the boundary and
noise sigma_min 0. It indexes integer timesteps, so the levels are SPEC 9's (sigma_max, the tuned taus,
the Karras levels beyond them) snapped to the nearest integer timestep of the model's table (0.27 % at
the configs' tau); lct's own sampling (the trainer's grids) samples the same snapped levels through the
same pipeline. `num_inference_steps=k` alone would take LCM's evenly spaced timesteps, not the tuned
levels: a scheduler config cannot hold custom timesteps, so the card passes them. `start_scale` =
sigma_max / sqrt(1 + sigma_max^2) turns SPEC 9's first input sigma_max z into the pipeline's VP
coordinates (the pipeline's own start, unit z, differs by 2e-5 of the input).

Prompts: diffusers' PixArt pipelines lower-case prompts (`_text_preprocessing`); lct tunes on the
captions as given (SPEC 14.3). The card's recipe, like lct's training grids, passes `prompt_embeds`
of the caption as given (`caption_embeds`).
"""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path
from typing import Any, Sequence

import torch

from lct.consistency import alphas_cumprod, sigma_to_timestep, vp_log_sigmas
from lct.errors import UserError
from lct.export_common import (REMAKE_HINT, LoadError, _first_line, _text_component, _vae_component,
                               is_tokenizer_class, quiet_loading, resolve_export, training_record)
from lct.files import atomic_dir
from lct.model_card import META, card_header, license_lines
from lct.scheduler import default_taus

PIXART_NULL = "null_condition.safetensors"
PIPELINES = ("PixArtSigmaPipeline", "PixArtAlphaPipeline")
SCHEDULER_KEYS = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas", "prediction_type")
LCM_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
# c_out = 1 exactly in fp32 and c_skip <= 2.5e-21 for every t >= 1, (999 x 1e10)^2 far below fp32's max (SPEC 14.8).
TIMESTEP_SCALING = 1e10
SNAP_WARN = 0.01  # a level moved by more than 1 % to its integer timestep gets a one-line warning
# What load_pixart_export loads (library, classes) by component; anything else is refused.
PIXART_KNOWN = {"transformer": ("diffusers", {"PixArtTransformer2DModel"}),
                "scheduler": ("diffusers", {"LCMScheduler"}),
                "vae": ("diffusers", {"AutoencoderKL"}),
                "text_encoder": ("transformers", {"T5EncoderModel"}),
                "tokenizer": ("transformers", None)}  # any transformers tokenizer class
# Exports written before the stock scheduler: their scheduler config is read as data (its beta table).
OLD_SCHEDULER = ("lct_scheduler", "LCTVPScheduler")


def pixart_scheduler(config: dict | None = None):
    """diffusers' `LCMScheduler` that samples SPEC 9 on a PixArt denoiser (SPEC 14.8): the model's
    beta table and prediction type (`config`: its diffusers scheduler config; default PixArt's),
    plain x0 as the consistency function (timestep_scaling 1e10), no clipping, and every training
    timestep allowed as a custom timestep (original_inference_steps = T: no warning)."""
    from diffusers import LCMScheduler

    from lct.models.pixart import PIXART_SCHEDULER

    cfg = {k: v for k, v in dict(config or PIXART_SCHEDULER).items() if k in SCHEDULER_KEYS and v is not None}
    cfg.setdefault("beta_schedule", "linear")
    if cfg.get("trained_betas") is None and cfg["beta_schedule"] not in LCM_SCHEDULES:
        raise UserError(f"model.scheduler: beta_schedule {cfg['beta_schedule']!r} has no LCMScheduler table "
                        f"({', '.join(LCM_SCHEDULES)} or trained_betas); a PixArt export samples with LCMScheduler")
    n = int(cfg.get("num_train_timesteps", 1000))
    return LCMScheduler(**cfg, original_inference_steps=n, timestep_scaling=TIMESTEP_SCALING, clip_sample=False,
                        thresholding=False, set_alpha_to_one=True, rescale_betas_zero_snr=False)


def log_sigmas_of(scheduler_config: dict | None) -> torch.Tensor:
    """float64 ln sigma_t of a diffusers scheduler config (SPEC 14.1)."""
    from lct.models.pixart import PIXART_SCHEDULER

    return vp_log_sigmas(alphas_cumprod(dict(scheduler_config or PIXART_SCHEDULER)))


def snap_levels(levels: Sequence[float], log_sigmas: torch.Tensor, key: str = "method.tau"):
    """(integer timesteps, their float64 levels sigma_t) nearest in t (SPEC 14.1) to the decreasing
    noise `levels`; a level the stock step cannot sample is refused in one line naming `key`, and a
    level moved by more than 1 % is reported in one line on stderr (SPEC 14.8)."""
    levels = [float(v) for v in levels]
    t = sigma_to_timestep(torch.tensor(levels, dtype=torch.float64), log_sigmas.double().cpu())
    steps = [int(math.floor(float(v) + 0.5)) for v in t]
    snapped = [float(log_sigmas[i].double().exp()) for i in steps]
    if steps[-1] < 1:
        floor = math.exp(0.5 * float(log_sigmas[0] + log_sigmas[1]))
        raise UserError(f"{key} {levels[1:]}: level {levels[-1]:g} rounds to timestep 0, where LCMScheduler's "
                        f"boundary returns its input unchanged; use levels >= {floor:.4g} (SPEC 14.8)")
    same = [(a, b) for a, b, i, j in zip(levels, levels[1:], steps, steps[1:]) if i <= j]
    if same:
        raise UserError(f"{key} {levels[1:]}: levels {same[0][0]:g} and {same[0][1]:g} fall on the same integer "
                        "timestep of the model's table; the stock LCMScheduler samples integer timesteps only "
                        "(SPEC 14.8): space them further apart")
    for want, got, i in zip(levels, snapped, steps):
        if abs(got / want - 1) > SNAP_WARN:
            print(f"warning: noise level {want:g} samples at {got:.6g} (timestep {i}), the nearest level the stock "
                  "LCMScheduler can sample (SPEC 14.8)", file=sys.stderr)
    return steps, snapped


def sampling_levels(log_sigmas: torch.Tensor, method, steps: int) -> tuple[list[int], list[float]]:
    """(timesteps, levels) of `steps`-step sampling on the stock scheduler: SPEC 9's levels (sigma_max,
    the method's taus, the Karras levels for more steps) snapped to integer timesteps (SPEC 14.8)."""
    taus = default_taus(int(steps), method.tau, float(method.sigma_max), float(method.sigma_data))
    return snap_levels([float(method.sigma_max), *taus], log_sigmas)


def start_scale(sigma_max: float) -> float:
    """SPEC 9's first input sigma_max z in the pipeline's VP coordinates (SPEC 14.1): the factor
    sigma_max / sqrt(1 + sigma_max^2) on z."""
    return float(sigma_max) / math.sqrt(1.0 + float(sigma_max) ** 2)


def sampling_inputs(model, method, steps: int, generators: list[torch.Generator], latent_shape) -> dict:
    """The PixArt pipeline's `timesteps`, `latents` and `generator` of lct's k-step sampling (SPEC 9,
    14.8) with per-sample generators: z is drawn from them as the pipeline would draw it, so the
    re-noising draws that follow are the pipeline's own."""
    from diffusers.utils.torch_utils import randn_tensor

    timesteps, levels = sampling_levels(model.log_sigmas, method, steps)
    shape = (len(generators), *[int(v) for v in latent_shape])
    z = randn_tensor(shape, generator=generators, dtype=torch.float32)
    return {"timesteps": timesteps, "latents": start_scale(levels[0]) * z, "generator": generators}


def sampler_notes(model, method) -> list[str]:
    """One line per way lct's trained f differs from the stock step's sigma_min-0 consistency function."""
    notes = []
    for key, value in (("method.sigma_min", float(getattr(model, "sigma_min", method.sigma_min))),
                       ("method.sample_sigma_min", method.sampling_sigma_mins()[1])):
        if value:
            notes.append(f"{key} {value:g}: the PixArt export's LCMScheduler step is the sigma_min-0 consistency "
                         "function (boundary and noise floor 0); its samples differ from the trained f by "
                         f"O({value:g}) (SPEC 14.8)")
    return notes


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
    itself): what the trainer's sample grids run, with `caption_embeds` (no text tower) and
    `sampling_inputs` (the levels). The tuned levels and the grids' step counts are checked here."""
    for steps in {1 + len(cfg.method.tau), *cfg.sample.steps}:
        sampling_levels(model.log_sigmas, cfg.method, steps)
    scheduler = pixart_scheduler(getattr(model, "scheduler_config", None))
    return pipeline_class(text_length(model, manifest))(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae,
                                                       transformer=model.net.transformer, scheduler=scheduler)


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


def tuned_sampler(log_sigmas: torch.Tensor, method) -> dict:
    """lct_export.json's sampler: `timesteps` and `levels` of each tuned step count (1 .. 1 + len(tau)),
    `start_scale` (SPEC 14.8)."""
    plans = {f"{k}_step": sampling_levels(log_sigmas, method, k) for k in range(1, len(method.tau) + 2)}
    levels = plans[f"{len(method.tau) + 1}_step"][1]
    return {"timesteps": {k: t for k, (t, _) in plans.items()}, "levels": {k: v for k, (_, v) in plans.items()},
            "start_scale": start_scale(levels[0]),
            "sampler": {"scheduler": "LCMScheduler", "timestep_scaling": TIMESTEP_SCALING, "boundary_sigma_min": 0.0,
                        "noise_sigma_min": 0.0, "requested_levels": [float(method.sigma_max), *map(float, method.tau)],
                        "note": "levels snapped to the model's nearest integer timesteps (SPEC 14.8)"}}


def export_pixart(model: torch.nn.Module, ema_state: dict[str, torch.Tensor], out_dir: Path, *, cfg, manifest: dict,
                  ema_name: str, step: int, images_seen: int | None = None) -> Path:
    """A tuned PixArt as a stock diffusers pipeline folder with the stock LCMScheduler (module docstring)."""
    from diffusers import PixArtTransformer2DModel
    from safetensors.torch import save_file

    from lct.pipeline import _write_json, portable

    sampler = tuned_sampler(model.log_sigmas, cfg.method)  # refuses levels the stock step cannot sample
    for note in sampler_notes(model, cfg.method):
        print(f"warning: {note}", file=sys.stderr)
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
    cls = pipeline_class(length)
    pipe = cls(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, transformer=transformer.eval(),
               scheduler=pixart_scheduler(getattr(model, "scheduler_config", None)))
    record = training_record(cfg, manifest, ema_name, step, images_seen,
                             stock=(cls.__name__, transformer.config.sample_size))
    record.update(pipeline=cls.__name__, vae_source=vae_source, text_source=text_source, max_sequence_length=length,
                  null_condition=PIXART_NULL, **sampler)
    with atomic_dir(Path(out_dir)) as tmp:
        pipe.save_pretrained(tmp)
        for cfg_file in tmp.glob("*/config.json"):
            c = json.loads(cfg_file.read_text())
            if c.pop("_name_or_path", None) is not None:
                _write_json(cfg_file, c)
        save_file(null_condition(null_model, length), str(tmp / PIXART_NULL))
        record = portable(record, tmp)
        (tmp / META).write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")
        (tmp / "README.md").write_text(pixart_card(cls.__name__, record, length))
    return Path(out_dir)


def pixart_card(pipeline: str, record: dict, length: int) -> str:
    """README.md of a PixArt export: the hub header (base_model: the tuned model) and the tuned
    sampler, whose code runs as written once PATH is a local copy of the folder."""
    cfg = record.get("config") or {}
    method = record.get("method") or {}
    plans = record["timesteps"]
    steps = len(plans)
    last = f"{steps}_step"
    levels = ", ".join(f"{v:.6g} (t = {t})" for v, t in zip(record["levels"][last], plans[last]))
    size_lines, size_kw, size_note = card_sizes(record)
    return "\n".join([
        *card_header(record, "text-to-image", ["lct", "consistency-model", "text-to-image", "pixart",
                                               str(method.get("preset") or "ect")]),
        f"# {Path(str((cfg.get('run') or {}).get('dir') or 'lct model')).name}: a consistency-tuned PixArt (lct)",
        "",
        f"`{(record.get('model') or {}).get('pretrained')}` tuned into a {steps}-step consistency model with lct's "
        f"`{method.get('preset')}` method ({record.get('step')} optimizer steps, docs/SPEC.md section 14), as a "
        f"stock diffusers `{pipeline}` with the stock `LCMScheduler`: no code of this folder runs. The tuned "
        f"levels (sigma) are {levels}: the tuned taus {method.get('tau')} snapped to the model's nearest integer "
        "timesteps, which is what `LCMScheduler` samples. Pass them as `timesteps=` (in `lct_export.json`): "
        "`num_inference_steps` alone takes LCM's evenly spaced timesteps instead.",
        "",
        "## Use",
        "",
        "The tuned sampler: the tuned timesteps, lct's start (`start_scale * z`, SPEC 9's sigma_max z in the "
        "pipeline's coordinates; the pipeline's own unit-noise start differs by 2e-5), the caption as lct tuned on "
        "it (diffusers' PixArt pipelines lower-case a `prompt`; pass `prompt_embeds` as below to keep its case), and "
        "classifier-free guidance against the trained null condition (`null_condition.safetensors`, with "
        "`negative_prompt=None`: the pipeline's default negative prompt is \"\"; guidance_scale 1 = off, a "
        "consistency model takes only mild guidance).",
        "",
        "```python",
        "import json",
        "",
        "import torch",
        f"from diffusers import {pipeline}",
        "from safetensors.torch import load_file",
        "",
        "path = \"PATH\"  # a local copy of this folder (from the hub: huggingface_hub.snapshot_download)",
        f"pipe = {pipeline}.from_pretrained(path)",
        "record = json.load(open(f\"{path}/lct_export.json\"))",
        "null = load_file(f\"{path}/null_condition.safetensors\")",
        f"ids = pipe.tokenizer([\"A red fox in the snow\"], padding=\"max_length\", max_length={length}, "
        "truncation=True, add_special_tokens=True, return_tensors=\"pt\")",
        "with torch.no_grad():",
        "    embeds = pipe.text_encoder(ids.input_ids, attention_mask=ids.attention_mask)[0]",
        "generator = torch.Generator().manual_seed(0)",
        *size_lines,
        "image = pipe(prompt_embeds=embeds, prompt_attention_mask=ids.attention_mask, negative_prompt=None,",
        "             negative_prompt_embeds=null[\"negative_prompt_embeds\"],",
        "             negative_prompt_attention_mask=null[\"negative_prompt_attention_mask\"],",
        f"             guidance_scale=1.5, timesteps=record[\"timesteps\"][\"{last}\"], latents=latents,",
        f"             generator=generator, max_sequence_length={length}, {size_kw}).images[0]",
        "```",
        "",
        f"`record[\"timesteps\"]` holds every tuned step count ({', '.join(plans)}). With lct installed "
        "(`pip install lct-consistency`): `from lct.export_pixart import load_pixart_export; pipe, null, record = "
        f"load_pixart_export(path)` fills in a referenced VAE or text tower. {size_note}",
        *(["", f"Trained with sigma_min {method.get('sigma_min')} (noise sigma_min {method.get('sample_sigma_min')}): "
            "the stock step samples the sigma_min-0 consistency function of this network, O(sigma_min) away from "
            "the trained f (docs/SPEC.md 14.8)."] if method.get("sigma_min") or method.get("sample_sigma_min") else []),
        "",
        "## License",
        "",
        *license_lines(record),
        "",
    ])


def card_sizes(record: dict) -> tuple[list[str], str, str]:
    """The card's (code lines that set the start `latents`, the pipeline's size arguments, the
    sentence on sizes): one square size, or the most common trained bucket with the stock
    pipeline's resolution binning where its table holds every trained size (`stock_binning`)."""
    start = "generator=generator) * record[\"start_scale\"]"
    b = record.get("buckets")
    if not b:
        return ([f"latents = torch.randn(1, *record[\"latent\"][\"shape\"], {start}"], "use_resolution_binning=False",
                f"`use_resolution_binning=False`: the tuning saw one square resolution ({record.get('resolution')} px).")
    lines = ["height, width = record[\"buckets\"][\"sizes\"][0]  # the most common trained size; all: "
             "record[\"buckets\"][\"sizes\"]",
             "f = pipe.vae_scale_factor",
             f"latents = torch.randn(1, pipe.transformer.config.in_channels, height // f, width // f, {start}"]
    binning = record.get("resolution_binning") or {}
    sizes = ", ".join(f"{h}x{w}" for h, w in b["sizes"])
    head = f"Tuned on aspect-ratio buckets (`{b.get('source')}`; height x width {sizes}, most common first)"
    if binning.get("covers_training"):
        return (lines, "height=height, width=width",
                f"{head}: with `use_resolution_binning=True`, the pipeline's default, any requested height and width "
                f"are generated at the nearest size of diffusers' `{binning['table']}`, the table this model tuned on, "
                "and the image is resized to the request (`latents=`, when given, must have the binned size).")
    return (lines, "height=height, width=width, use_resolution_binning=False",
            f"{head}: the pipeline's resolution binning would pick sizes of "
            f"{('`' + binning['table'] + '`') if binning.get('table') else 'no table (it refuses this sample_size)'}, "
            "not the trained ones, so pass `use_resolution_binning=False` and one of the trained sizes.")


def load_pixart_export(path: str | os.PathLike, *, vae: str | None = None, text_encoder: str | None = None):
    """(pipeline, null condition dict, record) of an `export_pixart` folder, loaded as data: each
    component by its class (`PIXART_KNOWN`), anything else refused in one line; components it
    references (a hub VAE or T5 tower) are loaded from `vae` / `text_encoder` or the recorded sources.
    The scheduler is always `pixart_scheduler` of the folder's beta table, so exports written with
    lct's former `LCTVPScheduler` (or an older LCMScheduler config) load too; their record gets the
    `timesteps`, `levels` and `start_scale` of its recorded levels (SPEC 14.8)."""
    import diffusers
    import transformers
    from safetensors.torch import load_file

    from lct.pipeline import localize

    d = resolve_export(path)
    try:
        index = json.loads((d / "model_index.json").read_text())
        record = localize(json.loads((d / META).read_text()), d)
        sched_cfg = json.loads((d / "scheduler" / "scheduler_config.json").read_text())
    except (OSError, ValueError) as err:
        raise LoadError(f"{d}: not a readable PixArt export ({_first_line(err)}); {REMAKE_HINT}") from None
    if index.get("_class_name") not in PIPELINES:
        raise LoadError(f"{d / 'model_index.json'}: pipeline class {index.get('_class_name')!r} is not a PixArt export's")
    for name, value in index.items():
        if name.startswith("_") or not isinstance(value, list) or len(value) != 2 or value[0] is None:
            continue
        lib, cls = value
        known = PIXART_KNOWN.get(name)
        if name == "scheduler" and tuple(value) == OLD_SCHEDULER:
            continue  # its config is data: the beta table and prediction type
        if not known or lib != known[0] or not (cls in known[1] if known[1] else is_tokenizer_class(lib, cls)):
            raise LoadError(f"{d / 'model_index.json'}: component {name!r} names {lib}.{cls} ({d / name / f'{lib}.py'}), "
                            "which lct does not load: exports are data to lct, and no code of the folder runs")
    kw: dict[str, Any] = {}
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
            kw["scheduler"] = pixart_scheduler(sched_cfg)
    except UserError:
        raise
    except Exception as err:
        raise LoadError(f"{d}: could not be loaded as a {index['_class_name']} ({_first_line(err)}); {REMAKE_HINT}") from None
    if "timesteps" not in record:  # written with LCTVPScheduler: levels [sigma_max, taus...] as a list
        from types import SimpleNamespace

        levels = [float(v) for v in record.get("levels") or [sched_cfg.get("sigma_max") or 157.40728081]]
        method = SimpleNamespace(sigma_max=levels[0], tau=levels[1:], sigma_data=1.0)
        record.update(tuned_sampler(log_sigmas_of(sched_cfg), method))
    kw.setdefault("vae", None)
    kw.setdefault("text_encoder", None)
    kw.setdefault("tokenizer", None)
    pipe = getattr(diffusers, index["_class_name"])(**kw)
    pipe.set_progress_bar_config(disable=True)
    return pipe, load_file(str(d / PIXART_NULL)), record
