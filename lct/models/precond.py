"""`Precond`: the consistency/EDM parameterisation of SPEC 1 around any network F.

    f(x, sigma) = c_skip(sigma) * x + c_out(sigma) * F(c_in(sigma) * x, e(sigma), **cond)

with `e = time_embed_scale * ln(sigma) / 4` (SPEC 1); the formulas are `lct.consistency.scalings`
and `lct.consistency.time_embed_input`. Everything but the network call runs with autocast
disabled in fp32 (SPEC 1.1); the call to F stays inside whatever autocast the caller set, so only
F's trunk may run in bf16. Float64 inputs stay float64 (formula tests).
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn as nn

from lct.consistency import scalings, time_embed_input

_AUTOCAST_DEVICES = ("cuda", "cpu", "xpu", "mps", "hpu")


def autocast_off(device: torch.device):
    """A context that disables autocast on `device` (a no-op where autocast does not exist, e.g.
    the meta device used for parameter and FLOP counts). A plain tuple test: compiles without breaks."""
    if device.type in _AUTOCAST_DEVICES:
        return torch.autocast(device_type=device.type, enabled=False)
    return contextlib.nullcontext()


class Precond(nn.Module):
    """`f = Precond(net)(x_noisy [B,C,H,W], sigma [B] or scalar, **cond)` -> [B,C,H,W] fp32."""

    def __init__(self, net: nn.Module, sigma_data: float = 0.5, sigma_min: float = 0.002,
                 time_embed_scale: float = 1000.0):
        super().__init__()
        self.net = net
        self.sigma_data, self.sigma_min = float(sigma_data), float(sigma_min)
        self.time_embed_scale = float(time_embed_scale)

    def forward(self, x: torch.Tensor, sigma: torch.Tensor | float, **cond) -> torch.Tensor:
        dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
        shape = (-1,) + (1,) * (x.ndim - 1)
        with autocast_off(x.device):
            x = x.to(dtype)
            sigma = torch.as_tensor(sigma, device=x.device).to(dtype)
            sigma = sigma.expand(x.shape[0]) if sigma.ndim == 0 else sigma.reshape(x.shape[0])
            c_skip, c_out, c_in = scalings(sigma, self.sigma_data, self.sigma_min)
            e = time_embed_input(sigma, self.time_embed_scale)
            x_in = c_in.view(shape) * x
        out = self.net(x_in, e, **cond)  # the caller's autocast applies here (trunk only)
        with autocast_off(x.device):
            return c_skip.view(shape) * x + c_out.view(shape) * out.to(dtype)
