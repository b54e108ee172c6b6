"""PixArt exports: a consistency-tuned PixArt (SPEC 14) as a stock diffusers pipeline folder.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from lct.errors import UserError
from lct.export import (REMAKE_HINT, _jsonable, _text_component, _vae_component, quiet_loading, training_record)
from lct.files import atomic_dir
from lct.model_card import META

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
