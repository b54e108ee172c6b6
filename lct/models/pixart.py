"""PixArt-alpha / PixArt-Sigma (diffusers `PixArtTransformer2DModel`) as an lct network (SPEC 14).

    net = load_pixart("PixArt-alpha/PixArt-Sigma-XL-2-512-MS", null_states=tower.null_condition())
    f = net(x_noisy, sigma, text_states=states, text_mask=mask, pooled=None, cond_drop=drop)

`load_pixart` returns a `VPDenoiser` (lct/models/vp.py: sigma -> timestep and input scaling,
epsilon / v -> denoised latent) around a `PixArtNet`, the adapter that feeds lct's condition to the
diffusers model in its own terms:

- `text_states` [B, L, caption_channels] (T5 token states) and `text_mask` [B, L] (True = real token)
  become `encoder_hidden_states` and `encoder_attention_mask`. `pooled` is ignored (PixArt has no
  pooled text input; T5 towers give pooled_dim 0).
- `cond_drop` [B] selects the learned null condition (SPEC 14.5): `null_text_states` [L0, D], the
  tower's states of the empty caption at its real tokens (T5: one token, `</s>`), padded with
  masked positions to the batch's length. It is what diffusers' pipelines use as the default
  negative prompt, so guidance at initialisation is the pipeline's.
- Micro-conditions (PixArt-alpha 1024-MS: `use_additional_conditions`): `resolution` = the image
  size in pixels (latent H, W times the VAE's downsampling) and `aspect_ratio` = H / W, per sample,
  as the diffusers PixArt-alpha pipeline passes them; both can be given per sample instead.

Precision (SPEC 1.1), applied in place by `pin_precision`: the per-sample layers (timestep and
micro-condition embedders, the adaLN-single linear, the final projection) become `FP32Linear`s
(same parameters, same state dict; autocast disabled inside), and the patch embedding's output is
cast to fp32 so the residual stream stays fp32. Only the per-token trunk (patch embedding, caption
projection, attention, feed-forward) follows the caller's autocast.

Other diffusers DiT-style noise predictors follow the same pattern: an adapter with this call
convention, `pin_precision`'s two rules for their per-sample layers, and `VPDenoiser` unchanged.
"""

from __future__ import annotations

import copy
from typing import Any, Mapping

import torch
import torch.nn as nn

from lct.errors import ConfigError, UserError
from lct.models.dit import FP32Linear
from lct.models.flow import with_null
from lct.models.vp import VPDenoiser, alphas_cumprod_from_config

# The schedule PixArt-alpha and PixArt-Sigma were trained with (IDDPM "linear": betas 1e-4..0.02,
# 1000 steps, epsilon and learned-range variance); used when the weights come without a scheduler.
PIXART_SCHEDULER: dict[str, Any] = dict(num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02,
                                        beta_schedule="linear", prediction_type="epsilon")

_XL2 = dict(num_attention_heads=16, attention_head_dim=72, in_channels=4, out_channels=8, num_layers=28,
            cross_attention_dim=1152, caption_channels=4096, patch_size=2, attention_bias=True,
            activation_fn="gelu-approximate", num_embeds_ada_norm=1000, norm_type="ada_norm_single",
            norm_elementwise_affine=False, norm_eps=1e-6)
# Transformer configs of the public checkpoints (PixArt's tools/convert_pixart_to_diffusers.py), for
# runs with random weights at full size (smoke runs, memory planning); named like the hub repos.
PIXART_ARCHS: dict[str, dict[str, Any]] = {
    "PixArt-XL-2-256x256": dict(_XL2, sample_size=32, interpolation_scale=1, use_additional_conditions=False),
    "PixArt-XL-2-512x512": dict(_XL2, sample_size=64, interpolation_scale=1, use_additional_conditions=False),
    "PixArt-XL-2-1024-MS": dict(_XL2, sample_size=128, interpolation_scale=2, use_additional_conditions=True),
    "PixArt-Sigma-XL-2-256x256": dict(_XL2, sample_size=32, interpolation_scale=0.5, use_additional_conditions=False),
    "PixArt-Sigma-XL-2-512-MS": dict(_XL2, sample_size=64, interpolation_scale=1, use_additional_conditions=False),
    "PixArt-Sigma-XL-2-1024-MS": dict(_XL2, sample_size=128, interpolation_scale=2, use_additional_conditions=False),
}


def _fp32_output(module: nn.Module, args, output: torch.Tensor) -> torch.Tensor:
    return output.float()


def pin_precision(transformer: nn.Module) -> nn.Module:
    """SPEC 1.1 for a diffusers PixArt transformer, in place (parameters and state dict unchanged):
    every `nn.Linear` of `adaln_single` (time and micro-condition embedders, the 6-way modulation)
    and `proj_out` becomes an `FP32Linear`; the patch embedding's output is cast to fp32, which
    keeps the residual stream, the timestep sinusoids (`hidden_dtype`) and the modulation fp32."""
    for module in (transformer.adaln_single, transformer.proj_out):
        for m in module.modules():
            if type(m) is nn.Linear:
                m.__class__ = FP32Linear  # FP32Linear adds no state: a class swap is exact
    if not getattr(transformer.pos_embed, "_lct_fp32_output", False):
        transformer.pos_embed.register_forward_hook(_fp32_output)
        transformer.pos_embed._lct_fp32_output = True
    return transformer


class PixArtNet(nn.Module):
    """F(x_in, t, text_states=, text_mask=, pooled=, cond_drop=, resolution=, aspect_ratio=) -> the
    transformer's output [B, out_channels, H, W] fp32 (epsilon or v, plus learned variance when
    out_channels = 2 C; `VPDenoiser` drops it). See the module docstring."""

    def __init__(self, transformer: nn.Module, null_states: torch.Tensor, vae_downsample: int = 8):
        super().__init__()
        cfg = transformer.config
        null_states = torch.as_tensor(null_states).detach().float()
        if null_states.ndim != 2 or null_states.shape[1] != cfg.caption_channels or null_states.shape[0] < 1:
            raise ValueError(f"null_states must be [L0 >= 1, caption_channels={cfg.caption_channels}], "
                             f"got {list(null_states.shape)}")
        self.transformer = pin_precision(transformer)
        self.null_text_states = nn.Parameter(null_states.clone())  # learned, starts at the empty caption
        self.vae_downsample = int(vae_downsample)

    @property
    def config(self):
        return self.transformer.config

    def _text_condition(self, text_states, text_mask, cond_drop):
        if text_states is None:
            raise ValueError("PixArtNet needs text_states [B, L, caption_channels] (cond_drop selects the null condition)")
        if text_states.shape[-1] != self.config.caption_channels:
            raise ValueError(f"text_states have width {text_states.shape[-1]}; this PixArt transformer expects "
                             f"caption_channels = {self.config.caption_channels} (a T5-XXL tower gives 4096)")
        b, length, _ = text_states.shape
        states = text_states.float()
        mask = (torch.ones(b, length, dtype=torch.bool, device=states.device) if text_mask is None
                else text_mask.to(device=states.device, dtype=torch.bool))
        return with_null(states, mask, cond_drop, self.null_text_states)

    def _micro_conditions(self, x, resolution, aspect_ratio) -> dict:
        if not self.transformer.use_additional_conditions:
            return {"resolution": None, "aspect_ratio": None}
        b, _, h, w = x.shape
        if resolution is None:
            resolution = torch.tensor([[h * self.vae_downsample, w * self.vae_downsample]], dtype=torch.float32,
                                      device=x.device).expand(b, 2)
        if aspect_ratio is None:
            aspect_ratio = torch.full((b, 1), h / w, dtype=torch.float32, device=x.device)
        return {"resolution": resolution.float().reshape(b, 2), "aspect_ratio": aspect_ratio.float().reshape(b, 1)}

    def forward(self, x: torch.Tensor, t: torch.Tensor, text_states: torch.Tensor | None = None,
                text_mask: torch.Tensor | None = None, pooled: torch.Tensor | None = None,
                cond_drop: torch.Tensor | None = None, resolution: torch.Tensor | None = None,
                aspect_ratio: torch.Tensor | None = None) -> torch.Tensor:
        """x [B,C,H,W] (already input-scaled), t [B] fp32 continuous timesteps -> [B,out_channels,H,W] fp32."""
        states, mask = self._text_condition(text_states, text_mask, cond_drop)
        out = self.transformer(x, encoder_hidden_states=states, encoder_attention_mask=mask,
                               timestep=t.float(), added_cond_kwargs=self._micro_conditions(x, resolution, aspect_ratio),
                               return_dict=False)[0]
        return out.float()


# ----------------------------------------------------------------------------------------------
# Building and loading
# ----------------------------------------------------------------------------------------------


def check_compatible(config: Mapping[str, Any], latent_shape, text_dim: int | None = None) -> None:
    """Refuse, before any weights are read, latents or text the transformer cannot take (ConfigError
    naming the key): latent channels, a size the patch does not divide, the text width."""
    c, h, w = (int(v) for v in latent_shape)
    if c != config["in_channels"]:
        raise ConfigError(f"the transformer takes {config['in_channels']}-channel latents, the data has {c}: encode "
                          "the data with the VAE the model was trained with (SD-VAE for PixArt-alpha, SDXL-VAE for "
                          "PixArt-Sigma)", key="model.pretrained")
    if h % config["patch_size"] or w % config["patch_size"]:
        raise ConfigError(f"latent {h}x{w} is not divisible by the transformer's patch {config['patch_size']}",
                          key="data.resolution")
    if text_dim is not None and config.get("caption_channels") is not None and text_dim != config["caption_channels"]:
        raise ConfigError(f"the text tower gives {text_dim}-wide token states, the transformer expects "
                          f"{config['caption_channels']} (T5-XXL for PixArt)", key="text.model")


def _scheduler_config(src, scheduler: Mapping[str, Any] | None, key: str) -> dict:
    """The scheduler config: given > the weights' own (`scheduler/` of the pipeline folder or repo,
    or `../scheduler/` beside a local transformer folder) > PixArt's training schedule."""
    if scheduler is not None:
        return dict(scheduler)
    from diffusers import DDPMScheduler

    from lct.hub import resolve_pretrained

    subs = ("scheduler", "../scheduler") if src.local and not src.subfolder else ("scheduler",)
    try:
        found = resolve_pretrained(src.name, key=key, subfolders=subs, config_name="scheduler_config.json")
    except UserError:
        return dict(PIXART_SCHEDULER)
    return dict(DDPMScheduler.load_config(found.name, **found.kwargs))


def wrap_pixart(transformer: nn.Module, null_states: torch.Tensor, scheduler: Mapping[str, Any] | None = None,
                sigma_min: float = 0.0, vae_downsample: int = 8) -> VPDenoiser:
    """`VPDenoiser(PixArtNet(transformer))` with the schedule and prediction type of `scheduler`
    (a diffusers scheduler config; default: PixArt's training schedule)."""
    cfg = dict(PIXART_SCHEDULER if scheduler is None else scheduler)
    net = VPDenoiser(PixArtNet(transformer, null_states, vae_downsample), alphas_cumprod_from_config(cfg),
                     prediction_type=cfg.get("prediction_type", "epsilon"), sigma_min=sigma_min)
    net.scheduler_config = {k: v for k, v in cfg.items() if not k.startswith("_")}  # for records and export
    return net


def build_pixart(config: Mapping[str, Any] | str, null_states: torch.Tensor | None = None, **kwargs) -> VPDenoiser:
    """A PixArt network with random weights from a transformer config (or a `PIXART_ARCHS` name);
    `null_states` default zeros [1, caption_channels]. kwargs go to `wrap_pixart`."""
    from diffusers import PixArtTransformer2DModel

    if isinstance(config, str):
        if config not in PIXART_ARCHS:
            raise ConfigError(f"unknown PixArt architecture {config!r} (known: {', '.join(PIXART_ARCHS)})",
                              key="model.arch")
        config = PIXART_ARCHS[config]
    transformer = PixArtTransformer2DModel.from_config(copy.deepcopy(dict(config)))
    if null_states is None:
        null_states = torch.zeros(1, transformer.config.caption_channels)
    return wrap_pixart(transformer, null_states, **kwargs)


def pixart_config(pretrained: str, key: str = "model.pretrained") -> dict:
    """The transformer config of `pretrained` alone (no weights read): for `check_compatible` and
    for building the network on the meta device (`build_pixart(config)`) before any real work."""
    from lct.hub import resolve_pretrained

    src = resolve_pretrained(pretrained, key=key, subfolders=("", "transformer"), what="PixArt transformer")
    from diffusers import PixArtTransformer2DModel

    cfg = dict(PixArtTransformer2DModel.load_config(src.name, **src.kwargs))
    if cfg.get("_class_name") not in (None, "PixArtTransformer2DModel", "Transformer2DModel"):
        raise UserError(f"{key} {pretrained}: holds a {cfg['_class_name']}, not a PixArtTransformer2DModel")
    return {k: v for k, v in cfg.items() if not k.startswith("_")}


def load_pixart(pretrained: str, null_states: torch.Tensor, *, key: str = "model.pretrained",
                scheduler: Mapping[str, Any] | None = None, sigma_min: float = 0.0, vae_downsample: int = 8,
                gradient_checkpointing: bool = False) -> VPDenoiser:
    """The pretrained PixArt transformer of `pretrained` (a pipeline folder or hub id with a
    `transformer/` subfolder, or a transformer folder) in fp32, wrapped as an lct denoiser.

    `null_states` [L0, caption_channels]: the text tower's empty-caption states (SPEC 14.5). The
    schedule comes from `scheduler`, else the weights' `scheduler/scheduler_config.json`, else
    PixArt's training schedule. Missing or unreachable weights raise a one-line `UserError` naming
    `key`, without waiting on hub retries (lct.hub)."""
    from lct.hub import resolve_pretrained

    src = resolve_pretrained(pretrained, key=key, subfolders=("", "transformer"), what="PixArt transformer")
    from diffusers import PixArtTransformer2DModel

    try:
        transformer = PixArtTransformer2DModel.from_pretrained(src.name, torch_dtype=torch.float32,
                                                               low_cpu_mem_usage=False, **src.kwargs)
    except Exception as err:  # incomplete download, another model class, unreadable weights
        text = str(err).strip().splitlines()
        raise UserError(f"{key} {pretrained}: could not load a PixArtTransformer2DModel "
                        f"({(text[0] if text else type(err).__name__)[:200]}); set {key} to a PixArt pipeline or "
                        "transformer folder written by save_pretrained") from None
    if gradient_checkpointing:
        transformer.enable_gradient_checkpointing()
    return wrap_pixart(transformer, null_states, _scheduler_config(src, scheduler, key), sigma_min=sigma_min,
                       vae_downsample=vae_downsample)
