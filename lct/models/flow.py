"""Flow-matching (rectified-flow) velocity predictors as lct denoisers (SPEC 15): Sana (diffusers
`SanaTransformer2DModel`) and Stable Diffusion 3 / 3.5 (`SD3Transformer2DModel`).

    net = load_flow("Efficient-Large-Model/Sana_600M_512px_diffusers", "sana", null_states=tower.null_condition())
    f = net(x_noisy, sigma, text_states=states, text_mask=mask, pooled=pooled, cond_drop=drop)

The models were trained on `x_t = (1 - t) x0 + t eps` to predict `v = eps - x0` at timestep input
`1000 t`. lct's noisy input is variance-exploding, `x_noisy = x0 + sigma eps`; the same point is
`x_t = x_noisy / (1 + sigma)` at `t = sigma / (1 + sigma)`, so (SPEC 15.1-15.2):

    t     = sigma / (1 + sigma)                      timestep input num_train_timesteps * t
    x_in  = x_noisy / (1 + sigma)                    c_in
    F     = net(x_in, 1000 t, **cond)                the velocity v_hat
    f     = c_skip x_noisy + c_out F                 c_skip = 1 / (1 + sigma - sigma_min), c_out = -(sigma - sigma_min) / (1 + sigma)

With sigma_min = 0, `f = x_t - t v_hat`: the flow model's own x0 prediction, exactly.

`FlowDenoiser` is the formula (everything in fp32 with autocast disabled, float64 inputs stay
float64, as `Precond` and `VPDenoiser`); `SanaNet` and `SD3Net` are the adapters that feed lct's
condition to the diffusers transformers in their own terms:

- Sana: `text_states` [B, L, 2304] (Gemma-2 states, Sana's prompt template: `lct.hf_text`, kind
  gemma) and `text_mask` [B, L] -> `encoder_hidden_states`, `encoder_attention_mask`; `pooled`
  ignored. Timestep `1000 t * timestep_scale` (the transformer config's, 1 for Sana 1.0).
- SD3: `text_states` [B, 77 + L, 4096] (CLIP-L and CLIP-G penultimate states side by side, zero
  padded to 4096, then T5-XXL: kind sd3) -> `encoder_hidden_states`; `pooled` [B, 2048] ->
  `pooled_projections`. The joint attention has no mask and every position is attended (the
  pipeline runs its towers without masks), so `text_mask` must be all True.
- `cond_drop` [B] selects the learned null condition (SPEC 15.5 = 14.5): the tower's states of the
  empty caption (Sana: its real tokens, padded with masked positions; SD3: every position, and the
  pooled vector `null_pooled`), what the stock pipelines use as the default negative prompt.

Precision (SPEC 1.1, 15.6), applied in place by `pin_precision`: the per-sample layers (timestep and
pooled-text embedders, every adaLN modulation linear, the final projection) become `FP32Linear`s
(same parameters and state dict) and the streams' entry layers (patch embedding; SD3's context
embedder) return fp32, so the residual streams stay fp32. The per-token trunk follows autocast.
"""

from __future__ import annotations

import copy
from typing import Any, Mapping

import torch
import torch.nn as nn
import torch.nn.functional as F

from lct.consistency import autocast_off, per_sample_sigma
from lct.errors import ConfigError, UserError
from lct.models.dit import FP32Linear

FLOW_FAMILIES = ("sana", "sd3")
NUM_TRAIN_TIMESTEPS = 1000
CLASS_NAMES = {"sana": "SanaTransformer2DModel", "sd3": "SD3Transformer2DModel"}

# Transformer configs of the public checkpoints, for runs with random weights at full size (dry
# runs, memory planning), named like the hub repositories. Sana: diffusers'
# scripts/convert_sana_to_diffusers.py (SanaMS_600M_P1_D28, SanaMS_1600M_P1_D20; sample_size = px / 32,
# no positional embedding at 512 and 1024 px). SD3.5-medium: its transformer/config.json.
_SANA = dict(in_channels=32, out_channels=32, caption_channels=2304, mlp_ratio=2.5, attention_bias=False, patch_size=1,
             norm_elementwise_affine=False, norm_eps=1e-6, interpolation_scale=None)
_SANA_600M = dict(_SANA, num_attention_heads=36, attention_head_dim=32, num_cross_attention_heads=16,
                  cross_attention_head_dim=72, cross_attention_dim=1152, num_layers=28)
_SANA_1600M = dict(_SANA, num_attention_heads=70, attention_head_dim=32, num_cross_attention_heads=20,
                   cross_attention_head_dim=112, cross_attention_dim=2240, num_layers=20)
FLOW_ARCHS: dict[str, tuple[str, dict[str, Any]]] = {
    "Sana_600M_512px_diffusers": ("sana", dict(_SANA_600M, sample_size=16)),
    "Sana_600M_1024px_diffusers": ("sana", dict(_SANA_600M, sample_size=32)),
    "Sana_1600M_512px_diffusers": ("sana", dict(_SANA_1600M, sample_size=16)),
    "Sana_1600M_1024px_diffusers": ("sana", dict(_SANA_1600M, sample_size=32)),
    "Sana_1600M_1024px_BF16_diffusers": ("sana", dict(_SANA_1600M, sample_size=32)),
    "stable-diffusion-3.5-medium": ("sd3", dict(sample_size=128, patch_size=2, in_channels=16, out_channels=16,
                                                num_layers=24, attention_head_dim=64, num_attention_heads=24,
                                                joint_attention_dim=4096, caption_projection_dim=1536,
                                                pooled_projection_dim=2048, pos_embed_max_size=384,
                                                dual_attention_layers=tuple(range(13)), qk_norm="rms_norm")),
}


# ----------------------------------------------------------------------------------------------
# SPEC 15.1-15.2: the formulas
# ----------------------------------------------------------------------------------------------


def flow_t(sigma: torch.Tensor) -> torch.Tensor:
    """The flow time of noise level sigma, `t = sigma / (1 + sigma)` (SPEC 15.1), in sigma's dtype."""
    return sigma / (1.0 + sigma)


def flow_sigma(t: torch.Tensor) -> torch.Tensor:
    """The inverse, `sigma = t / (1 - t)` (t < 1)."""
    return t / (1.0 - t)


def flow_scalings(sigma: torch.Tensor, sigma_min: float = 0.0):
    """(c_skip, c_out, c_in) of a velocity predictor (SPEC 15.2):
    `c_skip = 1 / (1 + sigma - sigma_min)`, `c_out = -(sigma - sigma_min) / (1 + sigma)`,
    `c_in = 1 / (1 + sigma)`. sigma_min = 0 is the model's own x0 prediction `x_t - t v`;
    sigma_min > 0 makes f(x, sigma_min) = x."""
    c_in = 1.0 / (1.0 + sigma)
    return 1.0 / (1.0 + (sigma - sigma_min)), -(sigma - sigma_min) * c_in, c_in


class FlowDenoiser(nn.Module):
    """`f = FlowDenoiser(net)(x_noisy [B,C,H,W], sigma [B] or scalar, **cond)` -> [B,C,H,W] fp32, the
    SPEC 15 denoiser with the call convention of `Precond` and `VPDenoiser`. `net(x_in, timestep,
    **cond)` receives the timestep input `num_train_timesteps * t` (fp32)."""

    def __init__(self, net: nn.Module, sigma_min: float = 0.0, num_train_timesteps: int = NUM_TRAIN_TIMESTEPS):
        super().__init__()
        if sigma_min < 0:
            raise ConfigError(f"sigma_min {sigma_min} must be >= 0", key="method.sigma_min")
        self.net = net
        self.sigma_min = float(sigma_min)
        self.num_train_timesteps = int(num_train_timesteps)

    def forward(self, x: torch.Tensor, sigma: torch.Tensor | float, **cond) -> torch.Tensor:
        dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
        shape = (-1,) + (1,) * (x.ndim - 1)
        with autocast_off(x.device):
            x = x.to(dtype)
            sigma = per_sample_sigma(sigma, x)
            timestep = (flow_t(sigma) * self.num_train_timesteps).float()  # the pipelines' 1000 t, in fp32
            c_skip, c_out, c_in = flow_scalings(sigma, self.sigma_min)
            x_in = c_in.view(shape) * x
        out = self.net(x_in, timestep, **cond)  # the caller's autocast applies here (trunk only)
        if out.shape[1] == 2 * x.shape[1]:
            out = out[:, : x.shape[1]]  # a learned-variance half, as the Sana pipeline drops it
        with autocast_off(x.device):
            return c_skip.view(shape) * x + c_out.view(shape) * out.to(dtype)


# ----------------------------------------------------------------------------------------------
# Precision (SPEC 1.1, 15.6)
# ----------------------------------------------------------------------------------------------


def _fp32_output(module: nn.Module, args, output: torch.Tensor) -> torch.Tensor:
    return output.float() if output.dtype in (torch.bfloat16, torch.float16) else output  # float64 stays


def _fp32_entry(module: nn.Module) -> None:
    if not getattr(module, "_lct_fp32_output", False):
        module.register_forward_hook(_fp32_output)
        module._lct_fp32_output = True


def _pin_linears(module: nn.Module) -> None:
    for m in module.modules():
        if type(m) is nn.Linear:
            m.__class__ = FP32Linear  # FP32Linear adds no state: a class swap is exact


def pin_precision(transformer: nn.Module, family: str) -> nn.Module:
    """SPEC 1.1 for a Sana or SD3 transformer, in place (parameters and state dict unchanged): the
    per-sample linears become `FP32Linear`s and the residual streams' entries return fp32.
    Sana: `time_embed` (timestep embedder, 6-way modulation), `proj_out`; entry `patch_embed`.
    SD3: `time_text_embed` (timestep and pooled-text embedders), every block's `norm1.linear` and
    `norm1_context.linear` (adaLN-Zero / continuous modulation), `norm_out.linear`, `proj_out`;
    entries `pos_embed` and `context_embedder` (the image and the text stream)."""
    if family == "sana":
        for module in (transformer.time_embed, transformer.proj_out):
            _pin_linears(module)
        _fp32_entry(transformer.patch_embed)
    elif family == "sd3":
        _pin_linears(transformer.time_text_embed)
        for block in transformer.transformer_blocks:
            for name in ("norm1", "norm1_context"):
                _pin_linears(getattr(block, name).linear)
        _pin_linears(transformer.norm_out.linear)
        _pin_linears(transformer.proj_out)
        _fp32_entry(transformer.pos_embed)
        _fp32_entry(transformer.context_embedder)
    else:
        raise ValueError(f"unknown flow family {family!r}")
    return transformer


# ----------------------------------------------------------------------------------------------
# The null condition (SPEC 15.5) and the adapters
# ----------------------------------------------------------------------------------------------


def with_null(states: torch.Tensor, mask: torch.Tensor, cond_drop: torch.Tensor | None,
              null_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of `cond_drop` replaced by the null condition `null_states` [L0, D], padded with masked
    positions to the batch's length L (mask True on its L0 positions). States fp32."""
    if cond_drop is None:
        return states, mask
    b, length, _ = states.shape
    drop = cond_drop.to(device=states.device, dtype=torch.bool)
    null_len = null_states.shape[0]
    if length < null_len:
        raise ValueError(f"text_states have {length} tokens, fewer than the null condition's {null_len}")
    null = F.pad(null_states, (0, 0, 0, length - null_len))
    null_mask = torch.arange(length, device=states.device) < null_len
    return (torch.where(drop[:, None, None], null[None].to(states.dtype), states),
            torch.where(drop[:, None], null_mask[None], mask))


def _checked_states(text_states, width: int, what: str, like: torch.Tensor) -> torch.Tensor:
    """fp32 text states (float64 when the input `like` is: a float64 network)."""
    if text_states is None:
        raise ValueError(f"{what} needs text_states [B, L, {width}] (cond_drop selects the null condition)")
    if text_states.shape[-1] != width:
        raise ValueError(f"text_states have width {text_states.shape[-1]}; this {what} transformer expects {width}")
    return text_states.to(torch.float64 if like.dtype == torch.float64 else torch.float32)


class SanaNet(nn.Module):
    """F(x_in, timestep, text_states=, text_mask=, pooled=, cond_drop=) -> the Sana transformer's
    velocity [B, C, H, W] fp32 (see the module docstring). `null_text_states` [L0, 2304] is learned."""

    family = "sana"

    def __init__(self, transformer: nn.Module, null_states: torch.Tensor):
        super().__init__()
        cfg = transformer.config
        if getattr(cfg, "guidance_embeds", False):
            raise UserError("model.pretrained: a Sana transformer with guidance embeddings (Sana-Sprint, a TrigFlow "
                            "model) is already a few-step model; tune a Sana flow model (Sana_600M / Sana_1600M)")
        null_states = torch.as_tensor(null_states).detach().float()
        if null_states.ndim != 2 or null_states.shape[1] != cfg.caption_channels or null_states.shape[0] < 1:
            raise ValueError(f"null_states must be [L0 >= 1, caption_channels={cfg.caption_channels}], "
                             f"got {list(null_states.shape)}")
        self.transformer = pin_precision(transformer, "sana")
        self.null_text_states = nn.Parameter(null_states.clone())  # learned, starts at the empty caption

    @property
    def config(self):
        return self.transformer.config

    def forward(self, x: torch.Tensor, timestep: torch.Tensor, text_states: torch.Tensor | None = None,
                text_mask: torch.Tensor | None = None, pooled: torch.Tensor | None = None,
                cond_drop: torch.Tensor | None = None) -> torch.Tensor:
        states = _checked_states(text_states, self.config.caption_channels, "Sana", x)
        b, length, _ = states.shape
        mask = (torch.ones(b, length, dtype=torch.bool, device=states.device) if text_mask is None
                else text_mask.to(device=states.device, dtype=torch.bool))
        states, mask = with_null(states, mask, cond_drop, self.null_text_states)
        scale = float(getattr(self.config, "timestep_scale", 1.0) or 1.0)
        out = self.transformer(x, encoder_hidden_states=states, encoder_attention_mask=mask,
                               timestep=timestep.float() * scale, return_dict=False)[0]
        return out.float()


class SD3Net(nn.Module):
    """F(x_in, timestep, text_states=, text_mask=, pooled=, cond_drop=) -> the SD3 transformer's
    velocity [B, C, H, W] fp32 (see the module docstring). `null_text_states` [L, 4096] and
    `null_pooled` [2048] are learned."""

    family = "sd3"

    def __init__(self, transformer: nn.Module, null_states: torch.Tensor, null_pooled: torch.Tensor):
        super().__init__()
        cfg = transformer.config
        null_states = torch.as_tensor(null_states).detach().float()
        null_pooled = torch.as_tensor(null_pooled).detach().float().reshape(-1)
        if null_states.ndim != 2 or null_states.shape[1] != cfg.joint_attention_dim:
            raise ValueError(f"null_states must be [L, joint_attention_dim={cfg.joint_attention_dim}], "
                             f"got {list(null_states.shape)}")
        if null_pooled.numel() != cfg.pooled_projection_dim:
            raise ValueError(f"null_pooled must have pooled_projection_dim={cfg.pooled_projection_dim} values, "
                             f"got {null_pooled.numel()}")
        self.transformer = pin_precision(transformer, "sd3")
        self.null_text_states = nn.Parameter(null_states.clone())
        self.null_pooled = nn.Parameter(null_pooled.clone())

    @property
    def config(self):
        return self.transformer.config

    def forward(self, x: torch.Tensor, timestep: torch.Tensor, text_states: torch.Tensor | None = None,
                text_mask: torch.Tensor | None = None, pooled: torch.Tensor | None = None,
                cond_drop: torch.Tensor | None = None) -> torch.Tensor:
        states = _checked_states(text_states, self.config.joint_attention_dim, "SD3", x)
        b, length, _ = states.shape
        # Checked where it costs no device sync (CPU tensors); the trainer's mask is all True by
        # construction (lct.data.token_ids: NO_PADDING for kind sd3; the tower's own mask).
        if text_mask is not None and text_mask.device.type == "cpu" and not bool(text_mask.all()):
            raise ValueError("SD3's joint attention attends to every text position (the pipeline runs CLIP and T5 "
                             "without masks): text_mask must be all True, the states untrimmed")
        if pooled is None or pooled.shape != (b, self.config.pooled_projection_dim):
            raise ValueError(f"SD3 needs pooled [B, {self.config.pooled_projection_dim}] (CLIP-L and CLIP-G "
                             f"text_embeds), got {None if pooled is None else list(pooled.shape)}")
        pooled = pooled.to(states.dtype)
        if cond_drop is not None:
            if length != self.null_text_states.shape[0]:
                raise ValueError(f"text_states have {length} positions, the null condition {self.null_text_states.shape[0]}"
                                 " (77 CLIP positions + the T5 length the data was encoded with)")
            drop = cond_drop.to(device=states.device, dtype=torch.bool)
            states = torch.where(drop[:, None, None], self.null_text_states[None].to(states.dtype), states)
            pooled = torch.where(drop[:, None], self.null_pooled[None].to(pooled.dtype), pooled)
        out = self.transformer(x, encoder_hidden_states=states, pooled_projections=pooled, timestep=timestep.float(),
                               return_dict=False)[0]
        return out.float()


# ----------------------------------------------------------------------------------------------
# Building and loading
# ----------------------------------------------------------------------------------------------


def _transformer_class(family: str):
    import diffusers

    if family not in CLASS_NAMES:
        raise ConfigError(f"model.arch {family!r}: expected one of {', '.join(FLOW_FAMILIES)}", key="model.arch")
    return getattr(diffusers, CLASS_NAMES[family])


def text_width(family: str, config: Mapping[str, Any]) -> int:
    """The token-state width the transformer reads (Sana: caption_channels, SD3: joint_attention_dim)."""
    return int(config["caption_channels"] if family == "sana" else config["joint_attention_dim"])


def check_compatible(family: str, config: Mapping[str, Any], latent_shape, text_dim: int | None = None,
                     pooled_dim: int | None = None) -> None:
    """Refuse, before any weights are read, latents or text the transformer cannot take (ConfigError
    naming the key): latent channels, a size the patch does not divide, text and pooled widths."""
    c, h, w = (int(v) for v in latent_shape)
    vae = {"sana": "the DC-AE (mit-han-lab/dc-ae-f32c32-sana-1.0, 32 channels)",
           "sd3": "SD3's VAE (16 channels, the pipeline's vae/)"}[family]
    if c != config["in_channels"]:
        raise ConfigError(f"the transformer takes {config['in_channels']}-channel latents, the data has {c}: encode "
                          f"the data with {vae}", key="model.pretrained")
    p = int(config["patch_size"])
    if h % p or w % p:
        raise ConfigError(f"latent {h}x{w} is not divisible by the transformer's patch {p}", key="data.resolution")
    if family == "sd3" and max(h, w) // p > int(config.get("pos_embed_max_size") or 10**9):
        raise ConfigError(f"latent {h}x{w} exceeds SD3's positional table ({config['pos_embed_max_size']} patches)",
                          key="data.resolution")
    tower = {"sana": "Gemma-2 (text.kind gemma)", "sd3": "SD3's CLIP-L + CLIP-G + T5-XXL (text.kind sd3)"}[family]
    if text_dim is not None and text_dim != text_width(family, config):
        raise ConfigError(f"the text tower gives {text_dim}-wide token states, the transformer expects "
                          f"{text_width(family, config)} ({tower})", key="text.model")
    if family == "sd3" and pooled_dim is not None and pooled_dim != config["pooled_projection_dim"]:
        raise ConfigError(f"the text tower gives a {pooled_dim}-wide pooled vector, SD3 expects "
                          f"{config['pooled_projection_dim']} ({tower})", key="text.model")


def scheduler_timesteps(scheduler: Mapping[str, Any] | None, key: str = "model.pretrained") -> int:
    """num_train_timesteps of a flow model's scheduler config, refusing non-flow schedulers: diffusers'
    `FlowMatchEulerDiscreteScheduler` (SD3), or `DPMSolverMultistepScheduler` with
    `prediction_type: flow_prediction` (Sana's pipelines). None: 1000."""
    if not scheduler:
        return NUM_TRAIN_TIMESTEPS
    name = scheduler.get("_class_name")
    flow = name in (None, "FlowMatchEulerDiscreteScheduler") or scheduler.get("prediction_type") == "flow_prediction"
    if not flow:
        raise UserError(f"{key}: its scheduler ({name}, prediction_type {scheduler.get('prediction_type')!r}) is not a "
                        "flow-matching schedule; model.arch sana / sd3 tunes velocity predictors (SPEC 15)")
    return int(scheduler.get("num_train_timesteps") or NUM_TRAIN_TIMESTEPS)


def wrap_flow(transformer: nn.Module, family: str, null_states: torch.Tensor, null_pooled: torch.Tensor | None = None,
              scheduler: Mapping[str, Any] | None = None, sigma_min: float = 0.0) -> FlowDenoiser:
    """`FlowDenoiser(SanaNet | SD3Net)` around a diffusers transformer (the family's class)."""
    if family == "sana":
        net: nn.Module = SanaNet(transformer, null_states)
    elif family == "sd3":
        if null_pooled is None:
            raise ValueError("SD3 needs null_pooled, the tower's pooled vector of the empty caption")
        net = SD3Net(transformer, null_states, null_pooled)
    else:
        raise ConfigError(f"model.arch {family!r}: expected one of {', '.join(FLOW_FAMILIES)}", key="model.arch")
    model = FlowDenoiser(net, sigma_min=sigma_min, num_train_timesteps=scheduler_timesteps(scheduler))
    model.scheduler_config = {k: v for k, v in dict(scheduler or {}).items() if not k.startswith("_")}
    model.family = family
    return model


def arch_config(name: str, family: str | None = None) -> tuple[str, dict]:
    """(family, transformer config) of a `FLOW_ARCHS` name (full-size random weights)."""
    if name not in FLOW_ARCHS or (family is not None and FLOW_ARCHS[name][0] != family):
        known = [k for k, (fam, _) in FLOW_ARCHS.items() if family in (None, fam)]
        raise ConfigError(f"unknown {family or 'flow'} architecture {name!r} (known: {', '.join(known)})",
                          key="model.pretrained")
    fam, cfg = FLOW_ARCHS[name]
    return fam, copy.deepcopy(cfg)


def build_flow(family: str, config: Mapping[str, Any] | str, null_states: torch.Tensor | None = None,
               null_pooled: torch.Tensor | None = None, **kwargs) -> FlowDenoiser:
    """A flow network with random weights from a transformer config (or a `FLOW_ARCHS` name); the null
    condition defaults to zeros ([1, width] for Sana, [77 + 256, 4096] and [2048] for SD3). kwargs go
    to `wrap_flow`."""
    if isinstance(config, str):
        family, config = arch_config(config, family)
    transformer = _transformer_class(family).from_config(copy.deepcopy(dict(config)))
    width = text_width(family, transformer.config)
    if null_states is None:
        null_states = torch.zeros(1 if family == "sana" else 77 + 256, width)
    if family == "sd3" and null_pooled is None:
        null_pooled = torch.zeros(transformer.config.pooled_projection_dim)
    return wrap_flow(transformer, family, null_states, null_pooled, **kwargs)


def _source(pretrained: str, family: str, key: str):
    from lct.hub import resolve_pretrained

    return resolve_pretrained(pretrained, key=key, subfolders=("", "transformer"),
                              what=f"{CLASS_NAMES[family]} (model.arch {family})")


def flow_config(pretrained: str, family: str, key: str = "model.pretrained") -> dict:
    """The transformer config of `pretrained` alone (no weights read): for `check_compatible` and for
    a meta-device build (`build_flow(family, config)`) before any real work."""
    src = _source(pretrained, family, key)
    cfg = dict(_transformer_class(family).load_config(src.name, **src.kwargs))
    if cfg.get("_class_name") not in (None, CLASS_NAMES[family]):
        raise UserError(f"{key} {pretrained}: holds a {cfg['_class_name']}, not a {CLASS_NAMES[family]} "
                        f"(model.arch {family})")
    return {k: v for k, v in cfg.items() if not k.startswith("_")}


def flow_scheduler_config(pretrained: str, key: str = "model.pretrained") -> dict | None:
    """The weights' own `scheduler/scheduler_config.json` (a pipeline folder or hub repo, or
    `../scheduler/` beside a local transformer folder), None where there is none."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    from lct.hub import resolve_pretrained

    try:
        src = resolve_pretrained(pretrained, key=key, subfolders=("", "transformer"))
        subs = ("scheduler", "../scheduler") if src.local and not src.subfolder else ("scheduler",)
        found = resolve_pretrained(pretrained, key=key, subfolders=subs, config_name="scheduler_config.json")
    except UserError:
        return None
    return dict(FlowMatchEulerDiscreteScheduler.load_config(found.name, **found.kwargs))


def load_flow(pretrained: str, family: str, null_states: torch.Tensor, null_pooled: torch.Tensor | None = None, *,
              key: str = "model.pretrained", sigma_min: float = 0.0,
              gradient_checkpointing: bool = False) -> FlowDenoiser:
    """The pretrained transformer of `pretrained` (a pipeline folder or hub id with a `transformer/`
    subfolder, or a transformer folder) in fp32, wrapped as an lct denoiser (SPEC 15).

    `null_states` (and for SD3 `null_pooled`): the text tower's empty-caption condition (SPEC 15.5).
    Missing or unreachable weights raise a one-line `UserError` naming `key`, without hub retries."""
    src = _source(pretrained, family, key)
    cls = _transformer_class(family)
    try:
        transformer = cls.from_pretrained(src.name, torch_dtype=torch.float32, low_cpu_mem_usage=False, **src.kwargs)
    except Exception as err:  # incomplete download, another model class, unreadable weights
        text = str(err).strip().splitlines()
        raise UserError(f"{key} {pretrained}: could not load a {cls.__name__} "
                        f"({(text[0] if text else type(err).__name__)[:200]}); set {key} to a "
                        f"{'Sana' if family == 'sana' else 'Stable Diffusion 3'} pipeline or transformer folder "
                        "written by save_pretrained") from None
    if gradient_checkpointing:
        transformer.enable_gradient_checkpointing()
    return wrap_flow(transformer, family, null_states, null_pooled, flow_scheduler_config(pretrained, key),
                     sigma_min=sigma_min)
