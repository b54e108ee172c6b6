"""`LCTPipeline`: a trained lct model as a diffusers pipeline (SPEC 9 sampling, SPEC 7 decoding).

    from diffusers import DiffusionPipeline
    pipe = DiffusionPipeline.from_pretrained("runs/lct_coco/export/ema", trust_remote_code=True)
    image = pipe("a red bus on a street", num_inference_steps=2, seed=0).images[0]

`trust_remote_code=True` lets diffusers run the folder's `pipeline.py`, one line that imports
`lct.pipeline` (so lct must be installed); `from lct.pipeline import LCTPipeline;
LCTPipeline.from_pretrained(path)` needs no flag for folders lct wrote. Components
(`model_index.json`): `transformer` (`lct.models.dit.TextDiT`), `scheduler`
(`lct.scheduler.LCTScheduler`), `vae` (diffusers `AutoencoderKL`), `text_encoder` + `tokenizer`
(transformers `CLIPTextModelWithProjection` + `CLIPTokenizer` where the open_clip tower maps onto
them, else `lct.pipeline_text.OpenCLIPTextModel` and no tokenizer; a T5 / CLIP tower of
`lct.hf_text` as it is, `text_kind`). The
pipeline's own config holds the latent statistics (SPEC 7), the training record (the model card's
source) and, for components too large to copy into every export, their source: `vae_source` (a
hub id or local folder, loaded with `lct.vae.load_vae`) and `text_source` (the data's text
record, `lct.text.TextEncoder.from_manifest`); a referenced component is loaded when the
pipeline is built and is referenced again, not copied, by `save_pretrained`. Exports of either
format load with `lct.export.load_pipeline` (lct.sample, eval).

Noise: `seed=S` keys every sample's noise by (S, sample index, step) (`lct.rng.sampling_noise`,
what `python -m lct.sample --seed S` and eval use: the same image for a sample index in any batch,
on any rank; `sample_indices` gives the global indices of this batch, default 0..B-1);
`generator=` draws it with torch instead, as other diffusers pipelines do (reproducible for the
same batch only); `latents=` gives the unit initial noise. Precision: `pipe.to(device, dtype)`
runs the VAE and text encoder in `dtype`, keeps the transformer's weights in fp32 and runs its
per-token trunk under `dtype` autocast (SPEC 1.1); fp32 on the CPU reproduces lct.sample's
images bit for bit.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from diffusers import DiffusionPipeline, ImagePipelineOutput
from diffusers.utils import logging
from diffusers.utils.torch_utils import randn_tensor

from lct.errors import UserError
from lct.model_card import META, export_meta, model_card
from lct.models.dit import TextDiT
from lct.pipeline_text import OpenCLIPTextModel, encode_text
from lct.rng import sampling_noise
from lct.scheduler import LCTScheduler
from lct.text import text_condition

logger = logging.get_logger(__name__)

SHIM_FILE = "pipeline.py"
SHIM = ('"""Loads this folder with diffusers (`trust_remote_code=True`): the pipeline class is lct\'s '
        '(pip install lct)."""\n'
        "from lct.pipeline import LCTPipeline  # noqa: F401\n")
OUTPUT_TYPES = ("pil", "np", "pt", "latent")
_RESOLVE = [True]
# tokenizer_config.json keys transformers adds when it saves a tokenizer it loaded or called (how it
# was loaded, the last call's truncation), dropped so that save -> load -> save is a fixed point;
# sides only at their defaults.
_TOKENIZER_STATE = ("is_local", "local_files_only", "max_length", "stride", "truncation_strategy",
                    "padding_strategy", "pad_to_multiple_of", "pad_token_type_id")
_TOKENIZER_DEFAULTS = {"padding_side": "right", "truncation_side": "right"}


@contextlib.contextmanager
def references_unresolved():
    """Build pipelines without loading their referenced components (the exporter writes the
    reference only)."""
    _RESOLVE[0] = False
    try:
        yield
    finally:
        _RESOLVE[0] = True


class LCTPipeline(DiffusionPipeline):
    """Text-to-image consistency sampling in 1, 2 or k steps with lct's `TextDiT` (see the module
    docstring). `pipe(prompt, num_inference_steps=1, tau=None, guidance_scale=1.0, seed=0)`."""

    model_cpu_offload_seq = "text_encoder->transformer->vae"
    _optional_components = ["vae", "text_encoder", "tokenizer"]

    def __init__(self, transformer: TextDiT, scheduler: LCTScheduler, vae, text_encoder, tokenizer,
                 latent_mean: list | None = None, latent_std: list | None = None,
                 vae_source: str | None = None, text_source: dict | None = None, training: dict | None = None,
                 text_kind: str = "open_clip", text_max_length: int | None = None, latent_norm_kind: str = "channel"):
        super().__init__()
        self._referenced: set[str] = set()
        if vae is None and vae_source:
            self._referenced.add("vae")
            if _RESOLVE[0]:
                from lct.vae import load_vae

                vae = load_vae(vae_source, "cpu", torch.float32)
        if text_encoder is None and text_source and transformer.config.cond == "text":
            self._referenced.add("text_encoder")
            tokenizer = None
            if _RESOLVE[0]:
                text_encoder, tokenizer = resolve_text(text_source)
        self._trunk_dtype = torch.float32
        if transformer.dtype != torch.float32:  # e.g. torch_dtype=torch.float16 at loading (SPEC 1.1)
            logger.warning(f"the transformer keeps fp32 weights (SPEC 1.1); its trunk runs under {transformer.dtype} "
                           "autocast instead (load with torch_dtype={'transformer': torch.float32, 'default': ...} "
                           "to keep the stored fp32 weights exact)")
            self._trunk_dtype = transformer.dtype
            transformer = transformer.float()
        self.register_modules(transformer=transformer, scheduler=scheduler, vae=vae, text_encoder=text_encoder,
                              tokenizer=tokenizer)
        self.register_to_config(latent_mean=latent_mean, latent_std=latent_std, vae_source=vae_source,
                                text_source=text_source, training=training, text_kind=text_kind,
                                text_max_length=text_max_length, latent_norm_kind=latent_norm_kind)

    # ------------------------------------------------------------------ loading and saving

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        """diffusers' loader; a folder whose `pipeline.py` is exactly lct's one-line shim needs no
        `trust_remote_code` here (the shim only imports this module)."""
        shim = Path(str(pretrained_model_name_or_path)) / SHIM_FILE
        if shim.is_file() and shim.read_text() == SHIM:
            kwargs.setdefault("trust_remote_code", True)
        from diffusers.utils import is_accelerate_available

        if not is_accelerate_available():  # what diffusers falls back to, without its "accelerate was not found" per component
            kwargs.setdefault("low_cpu_mem_usage", False)
        return super().from_pretrained(pretrained_model_name_or_path, **kwargs)

    def save_pretrained(self, save_directory: str | os.PathLike, safe_serialization: bool = True, **kwargs) -> None:
        """diffusers' folder plus `pipeline.py` (the shim), the model card `README.md` and
        `lct_export.json`; referenced components stay referenced (`copy_referenced()` first to
        copy them in)."""
        refs = {n: getattr(self, n) for n in sorted(self._referenced)}
        self.register_modules(**{n: None for n in refs})
        if "text_encoder" in refs:
            self.register_modules(tokenizer=None)
        try:
            super().save_pretrained(save_directory, safe_serialization=safe_serialization, **kwargs)
        finally:
            self.register_modules(**refs)
        d = Path(save_directory)
        index = json.loads((d / "model_index.json").read_text())
        index["_class_name"] = ["pipeline", type(self).__name__]
        index.pop("_name_or_path", None)  # where it was loaded from: not part of the model
        (d / "model_index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
        for cfg_file in d.glob("*/config.json"):  # diffusers records where a component was loaded from
            cfg = json.loads(cfg_file.read_text())
            if cfg.pop("_name_or_path", None) is not None:
                cfg_file.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
        tok_cfg = d / "tokenizer" / "tokenizer_config.json"
        if tok_cfg.is_file():
            cfg = json.loads(tok_cfg.read_text())
            tok_cfg.write_text(json.dumps({k: v for k, v in cfg.items() if k not in _TOKENIZER_STATE
                                           and _TOKENIZER_DEFAULTS.get(k, object()) != v},
                                          indent=2, sort_keys=True, ensure_ascii=False) + "\n")
        (d / SHIM_FILE).write_text(SHIM)
        (d / "README.md").write_text(model_card(self))
        (d / META).write_text(json.dumps(export_meta(self), indent=1, sort_keys=True) + "\n")

    def copy_referenced(self) -> None:
        """Copy referenced components into the next `save_pretrained` (a self-contained folder)."""
        self._referenced.clear()
        self.register_to_config(vae_source=None, text_source=None)

    def to(self, *args, **kwargs):
        """`pipe.to(device, dtype)`: VAE and text encoder in `dtype`; the transformer keeps fp32
        weights and its trunk runs under `dtype` autocast (SPEC 1.1)."""
        dtype = kwargs.pop("dtype", None)
        rest = []
        for a in args:
            if isinstance(a, torch.dtype):
                dtype = a
            else:
                rest.append(a)
        super().to(*rest, **kwargs)
        if dtype is not None:
            for name in ("vae", "text_encoder"):
                module = getattr(self, name, None)
                if module is not None:
                    module.to(dtype=dtype)
            self._trunk_dtype = dtype
        return self

    # ------------------------------------------------------------------ pieces

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        c = self.transformer.config
        return (int(c.in_channels), int(c.input_height), int(c.input_width))

    def latent_norm(self):
        """SPEC 7's normalisation: the data's statistics, or (`latent_norm_kind` "vae", SPEC 14.4)
        the VAE config's scaling and shift factors."""
        from lct.vae import LatentNorm

        if self.config.latent_norm_kind == "vae":
            if self.vae is None:
                raise UserError("latent_norm vae needs the VAE's scaling_factor: pass vae= to from_pretrained")
            return LatentNorm.from_vae(self.vae.config.scaling_factor, getattr(self.vae.config, "shift_factor", None))
        if self.config.latent_mean is None:
            raise UserError("this pipeline records no latent statistics (latent_mean/latent_std in model_index.json)")
        return LatentNorm(np.asarray(self.config.latent_mean, dtype=np.float64),
                          np.asarray(self.config.latent_std, dtype=np.float64))

    @torch.no_grad()
    def encode_prompt(self, prompts: Sequence[str], device=None) -> dict:
        """The network's condition {text_states, text_mask, pooled} of `prompts` ({} without text)."""
        if self.transformer.config.cond != "text":
            return {}
        if self.text_encoder is None:
            raise UserError("this pipeline has no text encoder: pass text_encoder= to from_pretrained")
        device = device or self._execution_device
        if (self.config.text_kind or "open_clip") == "open_clip":
            return encode_text(self.text_encoder, self.tokenizer, list(prompts), device)
        # A transformers tower (T5, CLIP) of the data: its tokenisation and outputs are lct.hf_text's.
        from lct.hf_text import HFTextEncoder

        w = getattr(self, "_hf_text", None)
        if w is None or w.model is not self.text_encoder or w.hf_tokenizer is not self.tokenizer:
            length = self.config.text_max_length or self.tokenizer.model_max_length
            w = self._hf_text = HFTextEncoder(self.text_encoder, self.tokenizer, int(length), source={},
                                              tokenizer_source={})
        return text_condition(w, w.tokenize(list(prompts)))

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Images [B,3,H,W] fp32 in [-1, 1] from sampled (normalised, SPEC 7) latents."""
        from lct.vae import latents_to_images

        if self.vae is None:
            raise UserError("this pipeline has no VAE: pass vae= to from_pretrained, or use output_type='latent'")
        return latents_to_images(self.vae, self.latent_norm(), latents)

    def _noise(self, seed: int | None, indices: list[int], step: int, generator, device) -> torch.Tensor | None:
        if seed is None:
            return None if step else randn_tensor((len(indices), *self.latent_shape), generator=generator,
                                                  device=device, dtype=torch.float32)
        return torch.stack([sampling_noise(seed, i, step, self.latent_shape) for i in indices]).to(device)

    def _network(self, x: torch.Tensor, sigma: torch.Tensor, cond: dict) -> torch.Tensor:
        x_in = self.scheduler.precondition_inputs(x, sigma)
        e = self.scheduler.precondition_noise(sigma)
        if self._trunk_dtype == torch.float32:
            return self.transformer(x_in, e, **cond)
        with torch.autocast(x.device.type, dtype=self._trunk_dtype):
            return self.transformer(x_in, e, **cond)

    # ------------------------------------------------------------------ sampling

    @torch.no_grad()
    def __call__(self, prompt: str | list[str] | None = None, num_inference_steps: int = 1,
                 tau: float | Sequence[float] | None = None, guidance_scale: float = 1.0,
                 negative_prompt: str | list[str] | None = None, num_images_per_prompt: int = 1,
                 seed: int | None = None, sample_indices: Sequence[int] | None = None,
                 generator: torch.Generator | list[torch.Generator] | None = None,
                 latents: torch.Tensor | None = None, output_type: str = "pil", return_dict: bool = True):
        """Generate images.

        prompt: a caption or a list (unconditional models: ignored, `num_images_per_prompt`
            images); each is repeated `num_images_per_prompt` times, consecutively.
        num_inference_steps: 1, 2 or k; tau: the k - 1 intermediate sigmas, decreasing (default:
            the model's, `scheduler.config.taus`).
        guidance_scale: classifier-free guidance weight w of SPEC 9 (1 = off); the unconditional
            branch is the learned null condition, or `negative_prompt` where given.
        seed / sample_indices: lct's per-sample noise (module docstring); generator / latents:
            the usual diffusers noise sources (used when seed is None).
        output_type: "pil" (PIL images, rounded as lct.sample's PNGs), "np" (float32 [B,H,W,3] in
            [0, 1]), "pt" (float32 [B,3,H,W] in [0, 1]) or "latent" (the sampled latents,
            normalised as in training, SPEC 7).
        """
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type must be one of {OUTPUT_TYPES}, got {output_type!r}")
        device = self._execution_device
        text = self.transformer.config.cond == "text"
        prompts = [prompt] if isinstance(prompt, str) else list(prompt if prompt is not None else [""])
        prompts = [p for p in prompts for _ in range(num_images_per_prompt)]
        b = len(prompts)
        indices = list(range(b)) if sample_indices is None else [int(i) for i in sample_indices]
        if len(indices) != b:
            raise ValueError(f"sample_indices has {len(indices)} entries for {b} images")
        taus = [tau] if isinstance(tau, (int, float)) else tau
        self.scheduler.set_timesteps(num_inference_steps, device=device, taus=taus)
        guided = guidance_scale != 1.0
        cond = self.encode_prompt(prompts, device) if text else {}
        drop = torch.zeros(b, dtype=torch.bool, device=device)
        if guided:
            if text and negative_prompt is not None:
                neg = [negative_prompt] * b if isinstance(negative_prompt, str) else \
                    [p for p in negative_prompt for _ in range(num_images_per_prompt)]
                if len(neg) != b:
                    raise ValueError(f"{len(neg) // num_images_per_prompt} negative prompts for "
                                     f"{b // num_images_per_prompt} prompts")
                uncond, null = self.encode_prompt(neg, device), torch.zeros_like(drop)
            else:  # SPEC 9: the learned null condition
                uncond, null = cond, torch.ones_like(drop)
            cond = {k: torch.cat([v, uncond[k]]) for k, v in cond.items()}
            cond["cond_drop"] = torch.cat([drop, null])
        else:
            cond["cond_drop"] = drop
        if latents is None:
            z = self._noise(seed, indices, 0, generator, device)
        else:
            z = latents.to(device=device, dtype=torch.float32)
        x = self.scheduler.init_noise_sigma * z
        for k, t in enumerate(self.progress_bar(self.scheduler.timesteps)):
            model_in = torch.cat([x, x]) if guided else x
            out = self._network(model_in, self.scheduler.sigma(model_in.shape[0], device), cond)
            x = self.scheduler.step(out, t, x, guidance_scale=guidance_scale, generator=generator,
                                    noise=self._noise(seed, indices, k + 1, generator, device)).prev_sample
        x = x.float()
        if output_type == "latent":
            images = x
        else:
            from lct.grids import to_uint8

            img = self.decode_latents(x)
            if output_type == "pil":
                from PIL import Image

                images = [Image.fromarray(a) for a in to_uint8(img)]
            elif output_type == "np":
                images = ((img + 1) / 2).permute(0, 2, 3, 1).cpu().numpy()
            else:
                images = (img + 1) / 2
        self.maybe_free_model_hooks()
        if not return_dict:
            return (images,)
        return ImagePipelineOutput(images=images)


def resolve_text(record: dict, pretrained: str | None = None):
    """(text_encoder, tokenizer) of a manifest's text record: open_clip -> `OpenCLIPTextModel`
    (tokenizes itself), transformers T5 / CLIP -> the model and its tokenizer."""
    from lct.text import TextEncoder

    enc = TextEncoder.from_manifest({"text": record}, pretrained=pretrained)
    if hasattr(enc, "hf_tokenizer"):
        return enc.model, enc.hf_tokenizer
    return OpenCLIPTextModel.from_encoder(enc), None


