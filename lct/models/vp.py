"""VP / DDPM noise predictors as lct denoisers (SPEC 14): `VPDenoiser` around any network that
was trained on `x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps` with integer timesteps t.

    f = VPDenoiser(net, alphas_cumprod, prediction_type="epsilon")(x_noisy, sigma, **cond)

lct's noisy input is variance-exploding, `x_noisy = x + sigma z`. The same point in VP coordinates
is `x_t = x_noisy / sqrt(1 + sigma^2)` at the (continuous) timestep whose
`sigma_t = sqrt((1 - abar_t) / abar_t)` equals sigma. Hence (SPEC 14.1-14.3):

    t     = sigma_to_timestep(sigma, log_sigmas)     log-sigma interpolation between the knots, clamped
    x_in  = x_noisy / sqrt(1 + sigma^2)
    F     = net(x_in, t, **cond)[:, :C]              learned-variance channels dropped
    f     = c_skip x_noisy + c_out F                 epsilon: (1, -(sigma - sigma_min)); v: SPEC 1 with sigma_data 1

`net(x_in, t, **cond)` is a model adapter (e.g. `lct.models.pixart.PixArtNet`) that feeds the
condition to the wrapped diffusers model in its own terms. As `Precond`, everything here runs in
fp32 with autocast disabled (float64 inputs stay float64); only the adapter's trunk follows the
caller's autocast (SPEC 1.1).
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np
import torch
import torch.nn as nn

from lct.consistency import autocast_off, scalings
from lct.errors import ConfigError

PREDICTION_TYPES = ("epsilon", "v_prediction")


def alphas_cumprod_from_config(config: Mapping[str, Any]) -> np.ndarray:
    """float64 `abar_t`, t = 0..T-1, from a diffusers scheduler config (SPEC 14.1).

    "linear" and "scaled_linear" betas and `trained_betas` are recomputed in float64 (diffusers
    builds them in float32; the PixArt/IDDPM training code used float64); other schedules take
    diffusers' own table, upcast."""
    cfg = dict(config)
    n = int(cfg.get("num_train_timesteps", 1000))
    b0, b1 = float(cfg.get("beta_start", 0.0001)), float(cfg.get("beta_end", 0.02))
    schedule = cfg.get("beta_schedule", "linear")
    if cfg.get("rescale_betas_zero_snr"):
        raise ConfigError("rescale_betas_zero_snr makes abar_(T-1) = 0 (sigma_max infinite); not supported",
                          key="model.scheduler")
    if cfg.get("trained_betas") is not None:
        betas = np.asarray(cfg["trained_betas"], dtype=np.float64)
    elif schedule == "linear":
        betas = np.linspace(b0, b1, n, dtype=np.float64)
    elif schedule == "scaled_linear":
        betas = np.linspace(b0 ** 0.5, b1 ** 0.5, n, dtype=np.float64) ** 2
    else:
        from diffusers import DDPMScheduler

        keep = {k: cfg[k] for k in ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule") if k in cfg}
        return DDPMScheduler(**keep).alphas_cumprod.double().numpy()
    return np.cumprod(1.0 - betas)


def vp_log_sigmas(alphas_cumprod) -> torch.Tensor:
    """ln sigma_t = 0.5 ln((1 - abar_t) / abar_t), float64, ascending in t (SPEC 14.1)."""
    a = torch.as_tensor(np.asarray(alphas_cumprod, dtype=np.float64), device="cpu")  # also under a meta-device build
    if a.ndim != 1 or a.numel() < 2 or not bool(((a > 0) & (a < 1)).all()) or not bool((a[1:] < a[:-1]).all()):
        raise ValueError("alphas_cumprod must be a strictly decreasing 1-D table in (0, 1)")
    return 0.5 * torch.log((1.0 - a) / a)


def sigma_to_timestep(sigma: torch.Tensor, log_sigmas: torch.Tensor) -> torch.Tensor:
    """Continuous timestep of noise level sigma (SPEC 14.1; k-diffusion's `DiscreteSchedule.sigma_to_t`).

    With knots `l_i = ln sigma_i` (ascending): `t = i + (ln sigma - l_i) / (l_(i+1) - l_i)` for
    `l_i <= ln sigma <= l_(i+1)`; t = 0 below the table, t = T - 1 above it. At a knot, t = i."""
    ls = log_sigmas.to(device=sigma.device, dtype=sigma.dtype)
    log_sigma = torch.log(sigma.clamp_min(torch.finfo(sigma.dtype).tiny))
    low = (torch.searchsorted(ls, log_sigma.contiguous(), right=True) - 1).clamp(0, ls.numel() - 2)
    lo, hi = ls[low], ls[low + 1]
    w = ((log_sigma - lo) / (hi - lo)).clamp(0.0, 1.0)
    return low.to(sigma.dtype) + w


def vp_scalings(sigma: torch.Tensor, prediction_type: str, sigma_min: float = 0.0):
    """(c_skip, c_out, c_in) that turn the model's output F into the denoised latent (SPEC 14.2).

    epsilon:      c_skip = 1, c_out = -(sigma - sigma_min)
    v_prediction: SPEC 1's scalings with sigma_data = 1 and F = -v: c_skip = 1 / ((sigma - sigma_min)^2 + 1),
                  c_out = -(sigma - sigma_min) / sqrt(sigma^2 + 1)
    c_in = 1 / sqrt(sigma^2 + 1) (the VP input scaling sqrt(abar_t)) for both. sigma_min = 0 is the
    pretrained model's own denoiser exactly; sigma_min > 0 makes f(x, sigma_min) = x."""
    c_in = torch.rsqrt(sigma * sigma + 1.0)
    if prediction_type == "epsilon":
        return torch.ones_like(sigma), -(sigma - sigma_min), c_in
    if prediction_type == "v_prediction":
        c_skip, c_out, _ = scalings(sigma, sigma_data=1.0, sigma_min=sigma_min)
        return c_skip, -c_out, c_in
    raise ConfigError(f"prediction_type {prediction_type!r}: expected one of {', '.join(PREDICTION_TYPES)}",
                      key="model.prediction_type")


class VPDenoiser(nn.Module):
    """`f = VPDenoiser(net, alphas_cumprod, prediction_type)(x_noisy [B,C,H,W], sigma [B] or scalar, **cond)`
    -> [B,C,H,W] fp32, the SPEC 14 denoiser with the call convention of `Precond`."""

    def __init__(self, net: nn.Module, alphas_cumprod, prediction_type: str = "epsilon", sigma_min: float = 0.0):
        super().__init__()
        if prediction_type not in PREDICTION_TYPES:
            raise ConfigError(f"prediction_type {prediction_type!r}: expected one of {', '.join(PREDICTION_TYPES)}",
                              key="model.prediction_type")
        if sigma_min < 0:
            raise ConfigError(f"sigma_min {sigma_min} must be >= 0", key="method.sigma_min")
        self.net = net
        self.prediction_type, self.sigma_min = prediction_type, float(sigma_min)
        # float64, rebuilt from the scheduler config at construction (not saved: persistent=False).
        self.register_buffer("log_sigmas", vp_log_sigmas(alphas_cumprod), persistent=False)

    @property
    def sigma_range(self) -> tuple[float, float]:
        """(sigma_0, sigma_(T-1)): the noise levels the pretrained model was trained between."""
        return float(self.log_sigmas[0].exp()), float(self.log_sigmas[-1].exp())

    def forward(self, x: torch.Tensor, sigma: torch.Tensor | float, **cond) -> torch.Tensor:
        dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
        shape = (-1,) + (1,) * (x.ndim - 1)
        with autocast_off(x.device):
            x = x.to(dtype)
            sigma = torch.as_tensor(sigma, device=x.device).to(dtype)
            sigma = sigma.expand(x.shape[0]) if sigma.ndim == 0 else sigma.reshape(x.shape[0])
            t = sigma_to_timestep(sigma, self.log_sigmas)
            c_skip, c_out, c_in = vp_scalings(sigma, self.prediction_type, self.sigma_min)
            x_in = c_in.view(shape) * x
        out = self.net(x_in, t, **cond)  # the caller's autocast applies here (trunk only)
        if out.shape[1] == 2 * x.shape[1]:
            out = out[:, : x.shape[1]]  # learned variance (DDPM "learned_range"): not part of the denoiser
        with autocast_off(x.device):
            return c_skip.view(shape) * x + c_out.view(shape) * out.to(dtype)
