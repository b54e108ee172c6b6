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

from lct.consistency import VP_PREDICTION_TYPES as PREDICTION_TYPES
from lct.consistency import alphas_cumprod, autocast_off, per_sample_sigma, sigma_to_timestep, vp_log_sigmas
from lct.consistency import vp_scalings as _vp_scalings
from lct.errors import ConfigError

__all__ = ["VPDenoiser", "alphas_cumprod_from_config", "sigma_to_timestep", "vp_log_sigmas", "vp_scalings",
           "PREDICTION_TYPES"]


def alphas_cumprod_from_config(config: Mapping[str, Any]) -> np.ndarray:
    """`lct.consistency.alphas_cumprod` (SPEC 14.1), its refusal a ConfigError naming the key."""
    try:
        return alphas_cumprod(dict(config))
    except ValueError as err:
        raise ConfigError(str(err), key="model.scheduler") from None


def vp_scalings(sigma: torch.Tensor, prediction_type: str, sigma_min: float = 0.0):
    """`lct.consistency.vp_scalings` (SPEC 14.2), its refusal a ConfigError naming the key."""
    try:
        return _vp_scalings(sigma, prediction_type, sigma_min)
    except ValueError as err:
        raise ConfigError(str(err), key="model.prediction_type") from None


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
            sigma = per_sample_sigma(sigma, x)
            t = sigma_to_timestep(sigma, self.log_sigmas)
            c_skip, c_out, c_in = vp_scalings(sigma, self.prediction_type, self.sigma_min)
            x_in = c_in.view(shape) * x
        out = self.net(x_in, t, **cond)  # the caller's autocast applies here (trunk only)
        if out.shape[1] == 2 * x.shape[1]:
            out = out[:, : x.shape[1]]  # learned variance (DDPM "learned_range"): not part of the denoiser
        with autocast_off(x.device):
            return c_skip.view(shape) * x + c_out.view(shape) * out.to(dtype)
