"""`Precond`: the consistency/EDM parameterisation of SPEC 1 around any network F, as a module.

    f(x, sigma) = c_skip(sigma) * x + c_out(sigma) * F(c_in(sigma) * x, e(sigma), **cond)

with `e = time_embed_scale * ln(sigma) / 4`. The forward is `lct.consistency.consistency_function`
(the one implementation of SPEC 1 and 1.1: everything but F in fp32 with autocast disabled, F under
the caller's autocast; float64 inputs stay float64).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from lct.consistency import consistency_function


class Precond(nn.Module):
    """`f = Precond(net)(x_noisy [B,C,H,W], sigma [B] or scalar, **cond)` -> [B,C,H,W] fp32."""

    def __init__(self, net: nn.Module, sigma_data: float = 0.5, sigma_min: float = 0.002,
                 time_embed_scale: float = 1000.0):
        super().__init__()
        self.net = net
        self.sigma_data, self.sigma_min = float(sigma_data), float(sigma_min)
        self.time_embed_scale = float(time_embed_scale)

    def forward(self, x: torch.Tensor, sigma: torch.Tensor | float, **cond) -> torch.Tensor:
        return consistency_function(self.net, x, sigma, sigma_data=self.sigma_data, sigma_min=self.sigma_min,
                                    time_embed_scale=self.time_embed_scale, **cond)
