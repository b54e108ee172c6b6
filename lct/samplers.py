"""Consistency sampling in 1, 2 or k steps, with classifier-free guidance (SPEC 9).

    x = f(sigma_max z, sigma_max)                                   1 step
    x = f(x + sqrt(tau^2 - sigma_min^2) z', tau)  for tau in taus     each further step

Guidance: f_w = f(x, s, null) + w (f(x, s, c) - f(x, s, null)) at every step, evaluated as one
batched call of 2B samples; w = 1 is off (one evaluation). NFE counts network evaluations per
sample (a guided step costs 2). Consistency models learn the unguided conditional flow, so
guidance on a 1-step model is a heuristic.

Default levels (`default_taus`): the model's recorded taus when it records k - 1 of them (the
2-step tau of SPEC 9), otherwise the k - 1 interior levels of the (k + 1)-point Karras grid
(rho 7, sigma_min..sigma_max): the multistep levels of the consistency-model codebases iCT and iLCT
build on (`get_sigmas_karras(steps + 1, ...)`); for 2 steps that level is 2.5152, the tau of the
iLCT authors' logged latent iCT baseline.

Noise is keyed by (seed, sample index, step) (`lct.rng.sampling_noise`): a sample is the same
whether drawn alone, in another batch, or on another rank.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import torch

from lct.consistency import karras_sigmas
from lct.rng import sampling_noise

Net = Callable[..., torch.Tensor]


def nfe(steps: int, guidance: float) -> int:
    """Network evaluations per sample."""
    return steps * (1 if guidance == 1.0 else 2)


def karras_taus(steps: int, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0) -> list[float]:
    """The k - 1 interior levels of the (k + 1)-point Karras grid, decreasing (SPEC 9)."""
    if steps < 1:
        raise ValueError(f"sampling needs at least 1 step, got {steps}")
    levels = karras_sigmas(steps + 1, sigma_min, sigma_max, rho).flip(0).tolist()
    return [float(t) for t in levels[1:-1]]


def default_taus(steps: int, recorded: Sequence[float] = (), sigma_min: float = 0.002,
                 sigma_max: float = 80.0) -> list[float]:
    """The intermediate levels of k-step sampling when none are given (SPEC 9): the model's
    `recorded` taus when there are k - 1 of them, else `karras_taus(k)`."""
    if steps < 1:
        raise ValueError(f"sampling needs at least 1 step, got {steps}")
    recorded = [float(t) for t in recorded]
    return recorded[: steps - 1] if steps - 1 <= len(recorded) else karras_taus(steps, sigma_min, sigma_max)


def _batch_noise(seed: int, indices: Sequence[int], step: int, shape, device) -> torch.Tensor:
    return torch.stack([sampling_noise(seed, int(i), step, shape) for i in indices]).to(device)


def guided(net: Net, x: torch.Tensor, sigma: torch.Tensor, cond: dict, guidance: float) -> torch.Tensor:
    """One (possibly guided) evaluation of f at (x, sigma) for the condition `cond`."""
    b = x.shape[0]
    drop = cond.get("cond_drop")
    if drop is None:
        drop = torch.zeros(b, dtype=torch.bool, device=x.device)
    if guidance == 1.0:
        return net(x, sigma, **{**cond, "cond_drop": drop})
    both = {k: (torch.cat([v, v]) if torch.is_tensor(v) else v) for k, v in cond.items()}
    both["cond_drop"] = torch.cat([drop, torch.ones_like(drop)])
    f = net(torch.cat([x, x]), torch.cat([sigma, sigma]), **both)
    f_c, f_null = f[:b], f[b:]
    return f_null + guidance * (f_c - f_null)


@torch.no_grad()
def consistency_sample(net: Net, cond: dict, indices: Sequence[int], shape: Sequence[int], *,
                       seed: int, sigma_max: float = 80.0, sigma_min: float = 0.002,
                       taus: Sequence[float] = (), guidance: float = 1.0,
                       device: torch.device | str = "cpu") -> torch.Tensor:
    """Samples for the given global sample `indices` in 1 + len(taus) steps; fp32 latents."""
    taus = [float(t) for t in taus]
    if any(t <= 0 for t in taus) or any(b >= a for a, b in zip([sigma_max] + taus, taus)):
        raise ValueError(f"taus must be positive, decreasing and below sigma_max: {taus}")
    b = len(indices)
    z = _batch_noise(seed, indices, 0, shape, device)
    sig = torch.full((b,), sigma_max, device=device, dtype=torch.float32)
    x = guided(net, sigma_max * z, sig, cond, guidance)
    for k, tau in enumerate(taus, start=1):
        z = _batch_noise(seed, indices, k, shape, device)
        # sqrt(tau^2 - sigma_min^2): the boundary-conditioned model maps sigma_min to identity.
        x = x + math.sqrt(max(tau * tau - sigma_min * sigma_min, 0.0)) * z
        x = guided(net, x, torch.full((b,), tau, device=device, dtype=torch.float32), cond, guidance)
    return x.float()
