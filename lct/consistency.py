"""Consistency-training math, one small named function per technique (SPEC sections 1-6, 11, 13).

Sources:
- iCT: Song & Dhariwal, "Improved Techniques for Training Consistency Models" (ICLR 2024):
  sigma_min-shifted parameterisation, Karras grid, exponential discretisation curriculum,
  discretised lognormal pair law, lambda = 1 / (sigma_{i+1} - sigma_i), pseudo-Huber distance.
- ECT: Geng et al., "Consistency Models Made Easy" (arXiv 2406.14548), reference code
  locuslab/ect `training/loss.py` (`t_to_r_sigmoid`, `t_to_r_const`, `snrplusk_wt`):
  continuous t -> r mapping by stage, weight 1 / (t - r), "target is x where r = 0".
- iLCT: Dao et al., "Improved Training Technique for Latent Consistency Models" (ICLR 2025,
  arXiv 2502.01441), authors' code quandao10/LCT: Cauchy distance, adaptive c, minibatch OT
  coupling (POT `ot.emd`), early-step diffusion loss.
- EDM / EDM2 (Karras et al., NVlabs/edm2) for the plain scalings and c_noise = ln(sigma) / 4.

Conventions (SPEC 1.1, 11):
- Noise-level grids are ascending (index 0 = sigma_min); every function that takes a grid checks
  it and says "ascending" when it is not, because the two reference codes index in opposite
  orders and a silently reversed grid trains a different model.
- Tensors in, same dtype out, computed in that dtype, but never below fp32 (a bf16/fp16 input is
  computed and returned in fp32: adjacent levels of late curriculum stages are 0.4 % apart and
  collapse in bf16). Give float64 to get float64 arithmetic throughout.
- Distances are the mean form over C*H*W (SPEC 3); the papers' sum forms differ by a constant.
- No module-level mutable state; nothing here draws random numbers (the data path does).
"""

from __future__ import annotations

import contextlib
import math
from typing import Any, Callable, Sequence

import numpy as np
import torch

Tensor = torch.Tensor
TensorOrFloat = Tensor | float

# Constants of the methods, imported from here by the config schema (its defaults) and the checks.
# Fraction of the descending grid after which a student level belongs to iLCT's early set (SPEC 5).
EARLY_FRACTION = 0.75
# ECT mapping's early-set threshold: the grid rule's boundary level sigma(1/4) = 0.16975 (SPEC 5).
DIFF_SIGMA_MAX = 0.1698
# iLCT's adaptive c of the first stage (SPEC 4).
C_FIRST = 0.03456
# SPEC 6: below this per-rank micro-batch the OT coupling does little; config validation / the
# data path warn once (not here: ot_couple runs per micro-batch in every worker).
OT_MIN_GROUP = 64

__all__ = [
    # 1 parameterisation
    "scalings", "c_noise", "time_embed_input", "consistency_function", "autocast_off",
    # 2 noise levels and curricula
    "karras_sigmas", "check_ascending", "ict_num_points", "ict_stage_length",
    "lognormal_pair_probs", "pair_weights", "pair_index_from_uniform",
    "ect_stage", "ect_t", "ect_r", "ect_weight",
    # 3 distances
    "mean_sq", "l2", "pseudo_huber", "cauchy", "distance", "DISTANCES",
    # 4 adaptive c
    "adaptive_c", "resolve_c_first", "adaptive_c_for_ect_stage",
    # 5 objectives' shared pieces
    "early_set_ict", "early_set_ect", "edm_weight", "diffusion_term",
    # 6 OT coupling
    "ot_cost_matrix", "ot_permutation", "ot_couple",
    # 14 VP / DDPM noise predictors
    "alphas_cumprod", "vp_log_sigmas", "sigma_to_timestep", "vp_scalings", "VP_PREDICTION_TYPES",
]


# ----------------------------------------------------------------------------------------------
# Dtype helpers
# ----------------------------------------------------------------------------------------------


def _at_least_fp32(t: Tensor) -> Tensor:
    """`t` as a floating tensor of at least fp32 precision (float64 stays float64)."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def per_sample_sigma(sigma: TensorOrFloat, x: Tensor) -> Tensor:
    """`sigma` (one number or [B]) in `x`'s dtype and device, one level per sample of `x` [B, ...]."""
    s = torch.as_tensor(sigma, device=x.device).to(x.dtype)
    return s.expand(x.shape[0]) if s.ndim == 0 else s.reshape(x.shape[0])


def _as_tensor64(v: Any) -> Tensor:
    """A tensor for `v`: tensors keep their dtype (>= fp32), Python numbers become float64."""
    if isinstance(v, Tensor):
        return _at_least_fp32(v)
    return torch.as_tensor(v, dtype=torch.float64)


def _bcast(v: Tensor, like: Tensor) -> Tensor:
    """Per-sample vector [B] -> [B, 1, ..., 1] broadcastable against `like` [B, ...]."""
    return v.reshape(-1, *([1] * (like.ndim - 1)))


# ----------------------------------------------------------------------------------------------
# 1. Parameterisation
# ----------------------------------------------------------------------------------------------


def scalings(sigma: TensorOrFloat, sigma_data: float = 0.5,
             sigma_min: float = 0.002) -> tuple[TensorOrFloat, TensorOrFloat, TensorOrFloat]:
    """(c_skip, c_out, c_in) of SPEC 1 (iCT's boundary-condition parameterisation).

    c_skip = sd^2 / ((sigma - sigma_min)^2 + sd^2), c_out = sd (sigma - sigma_min) / sqrt(sigma^2 + sd^2)
    (the denominator uses sigma, not sigma - sigma_min, as in the iCT / iLCT code), and
    c_in = 1 / sqrt(sigma^2 + sd^2). At sigma = sigma_min, c_skip = 1 and c_out = 0 exactly, which
    is the boundary condition f(x, sigma_min) = x. sigma_min = 0 gives the EDM scalings.
    A float gives floats; a tensor gives tensors of its dtype (at least fp32).
    """
    s = _as_tensor64(sigma)
    sd2 = sigma_data * sigma_data
    shifted = s - sigma_min
    c_skip = sd2 / (shifted * shifted + sd2)
    root = torch.sqrt(s * s + sd2)
    c_out = sigma_data * shifted / root
    c_in = 1.0 / root
    if isinstance(sigma, Tensor):
        return c_skip, c_out, c_in
    return float(c_skip), float(c_out), float(c_in)


def c_noise(sigma: TensorOrFloat) -> TensorOrFloat:
    """EDM's noise conditioning c_noise = ln(sigma) / 4 (SPEC 1), at least fp32."""
    if isinstance(sigma, Tensor):
        return torch.log(_at_least_fp32(sigma)) / 4
    return math.log(sigma) / 4


def time_embed_input(sigma: TensorOrFloat, scale: float = 1000.0) -> TensorOrFloat:
    """What the network's sinusoidal time embedding receives: `scale * ln(sigma) / 4` (SPEC 1).

    scale = 1000 (default) is 250 ln sigma, the convention of the CM / iLCT code behind the
    published numbers; scale = 1 is EDM's. Always fp32 or better (bf16 merges adjacent levels)."""
    return scale * c_noise(sigma)


_AUTOCAST_DEVICES = ("cuda", "cpu", "xpu", "mps", "hpu")


def autocast_off(device: torch.device):
    """A context that disables autocast on `device` (a no-op where autocast does not exist, e.g.
    the meta device used for parameter and FLOP counts). A plain tuple test: compiles without breaks."""
    if device.type in _AUTOCAST_DEVICES:
        return torch.autocast(device_type=device.type, enabled=False)
    return contextlib.nullcontext()


def consistency_function(net: Callable[..., Tensor], x_noisy: Tensor, sigma: TensorOrFloat, *,
                         sigma_data: float = 0.5, sigma_min: float = 0.002,
                         time_embed_scale: float = 1000.0, **cond: Any) -> Tensor:
    """f(x, sigma) = c_skip x + c_out F(c_in x, e, **cond), e = time_embed_scale * ln(sigma) / 4.

    SPEC 1, and the forward of `lct.models.Precond` (what trains): `x_noisy` [B, ...] is the noisy
    input x + sigma z, `sigma` [B] (or one number for the batch). Everything but the call to F runs
    with autocast disabled, in fp32 (float64 for float64 inputs); F runs inside whatever autocast
    the caller set, so only its trunk may run in bf16 (SPEC 1.1)."""
    with autocast_off(x_noisy.device):
        x = _at_least_fp32(x_noisy)
        s = per_sample_sigma(sigma, x)
        c_skip, c_out, c_in = scalings(s, sigma_data, sigma_min)
        e = time_embed_input(s, time_embed_scale)
        x_in = _bcast(c_in, x) * x
    out = net(x_in, e, **cond)  # the caller's autocast applies here (the trunk only)
    with autocast_off(x.device):
        return _bcast(c_skip, x) * x + _bcast(c_out, x) * out.to(x.dtype)


# ----------------------------------------------------------------------------------------------
# 2. Noise levels and curricula
# ----------------------------------------------------------------------------------------------


def check_ascending(sigmas: Tensor, name: str = "sigmas") -> Tensor:
    """Refuse anything but a strictly ascending 1-D grid of >= 2 levels (SPEC 2.1).

    The iCT code numbers its grid ascending, the iLCT code descending: a grid in the wrong order
    would silently swap student and teacher, so the error names the expected order."""
    s = sigmas if isinstance(sigmas, Tensor) else torch.as_tensor(sigmas, dtype=torch.float64)
    if s.ndim != 1 or s.numel() < 2:
        raise ValueError(f"{name} must be an ascending 1-D grid of at least 2 levels, "
                         f"got shape {tuple(s.shape)}")
    if not bool((s[1:] > s[:-1]).all()):
        raise ValueError(f"{name} must be strictly ascending (index 0 = sigma_min); got "
                         f"{s[0].item():.6g} ... {s[-1].item():.6g} not ascending "
                         "(iLCT's code numbers its grid descending: flip it)")
    return s


def karras_sigmas(n: int, sigma_min: float = 0.002, sigma_max: float = 80.0,
                  rho: float = 7.0) -> Tensor:
    """Ascending Karras grid of n levels, float64 (SPEC 2.1; iCT, iLCT):

    sigma_i = (sigma_min^(1/rho) + (i-1)/(n-1) (sigma_max^(1/rho) - sigma_min^(1/rho)))^rho.

    The end points are set to exactly sigma_min and sigma_max (the power round trip is off by an
    ulp), so that c_out(sigma_min) is exactly 0 on the grid and the boundary condition holds
    bit for bit."""
    if int(n) != n or n < 2:
        raise ValueError(f"a Karras grid needs n >= 2 levels, got {n}")
    if not (0 <= sigma_min < sigma_max) or rho <= 0:
        raise ValueError(f"need 0 <= sigma_min < sigma_max and rho > 0, got "
                         f"sigma_min={sigma_min}, sigma_max={sigma_max}, rho={rho}")
    n = int(n)
    lo, hi = sigma_min ** (1.0 / rho), sigma_max ** (1.0 / rho)
    frac = torch.arange(n, dtype=torch.float64) / (n - 1)
    sigmas = (lo + frac * (hi - lo)) ** rho
    sigmas[0], sigmas[-1] = sigma_min, sigma_max
    return sigmas


def ict_stage_length(total_steps: int, s0: int = 10, s1: int = 1280) -> int:
    """K' = floor(K / (log2(floor(s1 / s0)) + 1)), applied steps per curriculum stage (SPEC 2.2).

    lct extension: at least 1, so that a run shorter than the number of stages (tests, demos)
    walks through the stages one step each instead of dividing by zero."""
    if total_steps < 1 or s0 < 1 or s1 < s0:
        raise ValueError(f"need total_steps >= 1 and 1 <= s0 <= s1, got K={total_steps}, "
                         f"s0={s0}, s1={s1}")
    return max(1, math.floor(total_steps / (math.log2(s1 // s0) + 1)))


def ict_num_points(step: int, total_steps: int, s0: int = 10, s1: int = 1280) -> int:
    """N(k) = min(s0 * 2^floor(k / K'), s1) + 1 grid points at applied step k (SPEC 2.2, iCT's
    exponential curriculum). N counts levels; there are N - 1 adjacent pairs (intervals)."""
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    stage = step // ict_stage_length(total_steps, s0, s1)
    # s0 * 2^stage reaches s1 after log2(s1/s0) stages; cap the exponent to keep ints small.
    return min(s0 * 2 ** min(stage, 64), s1) + 1


def lognormal_pair_probs(sigmas: Tensor, p_mean: float = -1.1, p_std: float = 2.0) -> Tensor:
    """Probabilities of the len(sigmas) - 1 adjacent pairs (SPEC 2.3, iCT's discretised lognormal):

    p(i) ∝ erf((ln sigma_{i+1} - P_mean) / (sqrt(2) P_std)) - erf((ln sigma_i - P_mean) / (sqrt(2) P_std)),

    i.e. the lognormal mass of each interval, normalised. Computed in float64 as differences of
    normal CDFs, taken on the tail side closer to zero (ndtr(-a) - ndtr(-b) above the mean) so
    that the far-tail intervals keep their relative precision. Returned in the grid's dtype."""
    s = check_ascending(sigmas)
    if s.min() <= 0:
        raise ValueError("lognormal pair law needs positive levels (ln sigma)")
    if p_std <= 0:
        raise ValueError(f"p_std must be > 0, got {p_std}")
    u = (torch.log(s.double()) - p_mean) / p_std
    a, b = u[:-1], u[1:]
    upper = a > 0  # whole interval above the mean: use the survival function
    mass = torch.where(upper, torch.special.ndtr(-a) - torch.special.ndtr(-b),
                       torch.special.ndtr(b) - torch.special.ndtr(a))
    probs = mass / mass.sum()
    return probs.to(_at_least_fp32(s).dtype)


def pair_weights(sigmas: Tensor) -> Tensor:
    """iCT's pair weight lambda_i = 1 / (sigma_{i+1} - sigma_i) (SPEC 2.3), len(sigmas) - 1."""
    s = _at_least_fp32(check_ascending(sigmas))
    return 1.0 / (s[1:] - s[:-1])


def pair_index_from_uniform(u: Tensor, probs: Tensor) -> Tensor:
    """Inverse-CDF map of per-sample uniforms u in [0, 1) to pair indices (SPEC 2.3).

    The data path draws u (independent of the grid); the objective maps it on the current grid.
    Index i is returned for cdf[i-1] <= u < cdf[i], so P(i) = probs[i] and a zero-probability pair
    is never returned. The cdf is taken in float64 and its last entry pinned to 1, and the
    result is clamped, so u close to 1 (or float rounding of the cumsum) can never give an
    out-of-range index. Returns int64 on u's device."""
    p = torch.as_tensor(probs, dtype=torch.float64).flatten()
    if p.numel() < 1 or bool((p < 0).any()) or not float(p.sum()) > 0:
        raise ValueError("probs must be a non-empty vector of non-negative probabilities")
    cdf = torch.cumsum(p, 0) / p.sum()
    cdf[-1] = 1.0
    uu = torch.as_tensor(u).to(torch.float64)
    idx = torch.searchsorted(cdf.to(uu.device), uu.contiguous(), right=True)
    return idx.clamp_(0, p.numel() - 1)


def ect_stage(step: int, stage_every: int, max_stage: int | None = None) -> int:
    """ECT mapping stage s = floor(k / stage_every), k = applied optimizer steps so far (SPEC 2.4).

    lct's choice: the stage changes exactly at k = stage_every (25000 for ECT CIFAR). The
    reference code's training loop switches one step later (at 25001); the difference is one
    step per stage and is not observable in the results. `max_stage` caps s (short runs)."""
    if step < 0 or stage_every < 1:
        raise ValueError(f"need step >= 0 and stage_every >= 1, got {step}, {stage_every}")
    s = step // stage_every
    return s if max_stage is None else min(s, max_stage)


def ect_t(n: Tensor, p_mean: float = -1.1, p_std: float = 2.0) -> Tensor:
    """ECT's student level t = exp(P_mean + P_std * n), n ~ N(0, 1) from the data path, no
    clipping (SPEC 2.4)."""
    return torch.exp(p_mean + p_std * _as_tensor64(n))


def ect_r(t: Tensor, stage: int, q: float = 2.0, k: float = 8.0, b: float = 1.0,
          mapping: str = "sigmoid") -> Tensor:
    """ECT's teacher level r for student level t at mapping stage s (SPEC 2.4, locuslab/ect
    `t_to_r_sigmoid` / `t_to_r_const`):

    sigmoid: r = max(0, t (1 - q^-(s+1) (1 + k sigmoid(-b t))))
    const:   r = t (1 - q^-(s+1))

    The sigmoid term widens the gap at small t, where the consistency difference is otherwise
    too small to learn from; r = 0 means "the target is the clean x". Same shape as t."""
    if stage < 0:
        raise ValueError(f"stage must be >= 0, got {stage}")
    tt = _as_tensor64(t)
    decay = float(q) ** -(stage + 1)
    if mapping == "sigmoid":
        ratio = 1.0 - decay * (1.0 + k * torch.sigmoid(-b * tt))
    elif mapping == "const":
        ratio = torch.full_like(tt, 1.0 - decay)
    else:
        raise ValueError(f"unknown ECT mapping {mapping!r} (expected 'sigmoid' or 'const')")
    return torch.clamp(tt * ratio, min=0.0)


def ect_weight(t: Tensor, r: Tensor, kind: str = "inv_dt", sigma_data: float = 0.5) -> Tensor:
    """ECT's per-sample weight (SPEC 2.4): "inv_dt" = 1 / (t - r) (main branch, CIFAR; equals
    1 / t where r = 0), "imagenet" = 1 / t^2 + 1 / sigma_data^2 (ImageNet branch's `snrplusk_wt`,
    (t^2 + sd^2) / (t sd)^2). r < t as long as q^-(s+1) does not underflow (s < ~1000 at q = 2),
    so 1 / (t - r) is finite."""
    tt, rr = _as_tensor64(t), _as_tensor64(r)
    if kind == "inv_dt":
        return 1.0 / (tt - rr)
    if kind == "imagenet":
        return edm_weight(tt, sigma_data)
    raise ValueError(f"unknown ECT weight {kind!r} (expected 'inv_dt' or 'imagenet')")


# ----------------------------------------------------------------------------------------------
# 3. Distances (per sample, mean form)
# ----------------------------------------------------------------------------------------------


def mean_sq(a: Tensor, b: Tensor) -> Tensor:
    """m = mean over all non-batch elements of (a - b)^2, shape [B], at least fp32 (SPEC 3)."""
    if a.shape != b.shape:
        raise ValueError(f"shape mismatch {tuple(a.shape)} vs {tuple(b.shape)}")
    dtype = torch.promote_types(torch.promote_types(a.dtype, b.dtype), torch.float32)
    d = a.to(dtype) - b.to(dtype)
    return d.square().reshape(d.shape[0], -1).mean(1)


def l2(a: Tensor, b: Tensor, c: TensorOrFloat = 0.0) -> Tensor:
    """Squared-L2 distance in mean form: m (SPEC 3; `c` is ignored). Not ECT's distance (that is
    sqrt(m), pseudo-Huber with c = 0)."""
    return mean_sq(a, b)


def pseudo_huber(a: Tensor, b: Tensor, c: TensorOrFloat) -> Tensor:
    """iCT's pseudo-Huber distance in mean form, sqrt(m + c^2) - c (SPEC 3).

    Evaluated as m / (sqrt(m + c^2) + c), the same number without the cancellation that loses
    the small m of late stages (m << c^2) in fp32. c = 0 gives sqrt(m), ECT's released CIFAR
    distance (its gradient is infinite at m = 0, as in the reference code). The papers' sum form
    over d elements with c_sum = c sqrt(d) is sqrt(d) times this value."""
    m = mean_sq(a, b)
    if isinstance(c, Tensor):
        cc = c.to(m.dtype)
        return torch.where(cc > 0, m / (torch.sqrt(m + cc * cc) + cc), torch.sqrt(m))
    if c < 0:
        raise ValueError(f"pseudo-Huber c must be >= 0, got {c}")
    if c == 0:
        return torch.sqrt(m)
    return m / (torch.sqrt(m + c * c) + c)


def cauchy(a: Tensor, b: Tensor, c: TensorOrFloat) -> Tensor:
    """iLCT's Cauchy distance in mean form, log(1 + m / (2 c^2)) (SPEC 3): robust to the
    impulsive outliers of latent data. Identical to the sum form with c_sum = c sqrt(d)."""
    m = mean_sq(a, b)
    if isinstance(c, Tensor):
        cc = c.to(m.dtype)
    else:
        if c <= 0:
            raise ValueError(f"Cauchy c must be > 0, got {c}")
        cc = c
    return torch.log1p(m / (2 * cc * cc))


DISTANCES: dict[str, Callable[..., Tensor]] = {"l2": l2, "pseudo_huber": pseudo_huber,
                                               "cauchy": cauchy}


def distance(name: str, a: Tensor, b: Tensor, c: TensorOrFloat = 0.0) -> Tensor:
    """Per-sample distance `method.distance` ("l2" ignores c), shape [B] (SPEC 3)."""
    if name not in DISTANCES:
        raise ValueError(f"unknown distance {name!r} (expected one of {sorted(DISTANCES)})")
    return DISTANCES[name](a, b, c)


# ----------------------------------------------------------------------------------------------
# 4. Adaptive scaling c (iLCT)
# ----------------------------------------------------------------------------------------------


def adaptive_c(num_intervals: int, s0: int = 10, c_first: float = C_FIRST, scale: float = 1.0) -> float:
    """iLCT's adaptive Cauchy / pseudo-Huber scale for a grid of n = N - 1 intervals (SPEC 4):

    c(n) = c_first while n <= s0 (first stage), else scale * exp(-1.15 ln n - 0.85) (scale 2 in a
    sigma_data = 1 latent space, SPEC 14.4).

    The fit (iLCT authors, SD-VAE 4x32x32 latents) follows the shrinking spread of consistency
    differences as the grid refines, so the robust loss keeps treating typical pairs as inliers."""
    if num_intervals < 1:
        raise ValueError(f"need >= 1 interval, got {num_intervals}")
    if num_intervals <= s0:
        return float(c_first)
    return scale * math.exp(-1.15 * math.log(num_intervals) - 0.85)


def resolve_c_first(c_first: float | str, latent_shape: Sequence[int]) -> float:
    """c_first as a number (SPEC 4): a number is taken as is; "code" = 0.00054 sqrt(C H W), what
    the iLCT code computes (0.03456 at 4x32x32). `latent_shape` is [C, H, W], no batch."""
    if isinstance(c_first, str):
        if c_first != "code":
            raise ValueError(f"c_first must be a number or 'code', got {c_first!r}")
        if len(latent_shape) != 3:
            raise ValueError(f"latent_shape must be [C, H, W], got {tuple(latent_shape)}")
        return 0.00054 * math.sqrt(math.prod(int(v) for v in latent_shape))
    if not c_first > 0:
        raise ValueError(f"c_first must be > 0, got {c_first}")
    return float(c_first)


def adaptive_c_for_ect_stage(stage: int, s0: int = 10, c_first: float = C_FIRST, scale: float = 1.0) -> float:
    """lct's extension of adaptive c to the ECT mapping (SPEC 4, not from a paper): stage s plays
    the iCT stage with n = s0 2^(s-1) intervals for s >= 1 (then the relative gap at t = 1 matches
    iCT's within about 20 %), and stage 0 uses c_first. Note that s = 1 gives n = s0, hence
    c_first too: the first two ECT stages share c_first."""
    if stage < 0:
        raise ValueError(f"stage must be >= 0, got {stage}")
    if stage == 0:
        return float(c_first)
    return adaptive_c(s0 * 2 ** (stage - 1), s0, c_first, scale)


# ----------------------------------------------------------------------------------------------
# 5. Objectives' shared pieces: early set and early-step diffusion term (iLCT)
# ----------------------------------------------------------------------------------------------


def early_set_ict(pair_index: Tensor, num_points: int) -> Tensor:
    """iLCT's early set on an N-point grid (SPEC 5): bool mask [B] of the samples whose student
    level (ascending index pair_index + 1) has descending index j = N - 1 - (pair_index + 1) >=
    floor(0.75 N), i.e. the smallest quarter of the levels, where consistency targets are nearly
    the data and a direct denoising loss helps. N = 11: the student levels 0.0167208 and
    0.0850872; for every N this is sigma <= sigma(1/4 of the grid) = 0.1697528 on the default
    grid. Integer arithmetic, no floating-point boundary."""
    if num_points < 2:
        raise ValueError(f"need num_points >= 2, got {num_points}")
    idx = torch.as_tensor(pair_index)
    if bool(((idx < 0) | (idx > num_points - 2)).any()):
        raise ValueError(f"pair indices must lie in [0, {num_points - 2}] for N = {num_points}")
    j = num_points - 1 - (idx + 1)
    return j >= math.floor(EARLY_FRACTION * num_points)


def early_set_ect(t: Tensor, diff_sigma_max: float = DIFF_SIGMA_MAX) -> Tensor:
    """Early set with the ECT mapping: t <= diff_sigma_max (SPEC 5; 0.1698 matches the grid
    rule's boundary level 0.16975)."""
    return _as_tensor64(t) <= diff_sigma_max


def edm_weight(sigma: TensorOrFloat, sigma_data: float = 0.5) -> Tensor:
    """EDM's loss weight 1 / sigma^2 + 1 / sigma_data^2 = (sigma^2 + sd^2) / (sigma sd)^2 (SPEC 5):
    the EDM objective's, iLCT's early-step diffusion term's and ECT's ImageNet weight
    (`snrplusk_wt`). Computed in the input's dtype (at least fp32; numbers give float64)."""
    s = _as_tensor64(sigma)
    return 1.0 / (s * s) + 1.0 / (sigma_data * sigma_data)


def diffusion_term(student: Tensor, x: Tensor, sigma: Tensor, early: Tensor,
                   global_count: int | Tensor, world_size: int = 1, sigma_data: float = 0.5,
                   *, grad_accum_steps: int = 1) -> Tensor:
    """iLCT's early-step diffusion loss, globally normalised (SPEC 5), as this micro-batch's share:

        world_size * grad_accum_steps * sum_{i in S here} (1/sigma_i^2 + 1/sd^2) mean((student_i - x_i)^2)
        ------------------------------------------------------------------------------------------
                                        max(1, global_count)

    `student` [B, ...] is the student output f (with gradients), `x` [B, ...] the clean latents,
    `sigma` [B] the student levels, `early` bool [B] this micro-batch's early mask, and
    `global_count` = |S| over the whole global batch of the optimizer step. Returns a 0-d tensor
    (dtype of student, at least fp32). iLCT's rule is sum_S(...) / max(1, |S|) over its one-GPU
    batch; an empty S gives exactly 0 (with a gradient path: zero gradients, never NaN).

    Contract with the trainer (W = data-parallel world size, A = gradient accumulation steps,
    micro-batches of equal size b, global batch W * A * b):
    1. Before the forward passes of an optimizer step, each rank computes the early masks of all
       its A micro-batches (they depend only on the data path's u or n and the curriculum, not on
       the network: `objective.plan(...).early`), sums them, and one all-reduce (SUM) over ranks gives
       global_count = |S|, identical on every rank.
    2. On rank r, micro-batch j, the loss handed to DeepSpeed's `engine.backward` is
           loss_rj = mean_{i in B_rj} L_CT_i + w * diffusion_term(..., global_count=|S|,
                                                                  world_size=W, grad_accum_steps=A)
       (w = diffusion_weight of the config, 5 for iLCT).
    3. DeepSpeed scales each micro-batch loss by 1 / A (`scale_wrt_gas`, its default) and averages
       the accumulated gradients over the W ranks, so the applied gradient is
           (1 / (W A)) sum_{r, j} grad loss_rj
             = grad [ mean_{global batch} L_CT + w sum_{i in S} g_i / max(1, |S|) ],
       exactly the single-process gradient of the iLCT loss on the global batch. This is why the
       factor W * A multiplies here: it undoes the averaging for the diffusion term, whose
       normaliser is already global. Only the product matters, so a caller may pass
       world_size = W * A and leave grad_accum_steps = 1 (lct.objectives does: its `grad_scale`).
       A trainer that weights micro-batch losses differently must pass the reciprocal of the
       weight its reduction gives each micro-batch loss.
    For logging, this micro-batch's unscaled contribution to L_diff is value / (W A); those
    contributions summed over ranks and micro-batches give L_diff.

    Non-early samples are masked with torch.where on the difference and on sigma before any
    product ("double where"), not by multiplying with a 0/1 mask: a huge or non-finite value
    outside S (x overflowing, sigma = 0) would otherwise turn 0 * inf into NaN in the value or
    the gradient. Sync-free on GPU (no boolean indexing)."""
    if student.shape != x.shape:
        raise ValueError(f"student {tuple(student.shape)} and x {tuple(x.shape)} differ in shape")
    if world_size < 1 or grad_accum_steps < 1:
        raise ValueError("world_size and grad_accum_steps must be >= 1")
    dtype = torch.promote_types(student.dtype, torch.float32)
    mask = torch.as_tensor(early, device=student.device).to(torch.bool).reshape(-1)
    if mask.numel() != student.shape[0]:
        raise ValueError(f"early has {mask.numel()} entries for a batch of {student.shape[0]}")
    diff = torch.where(_bcast(mask, student), student.to(dtype) - x.to(dtype).detach(),
                       torch.zeros((), dtype=dtype, device=student.device))
    m = diff.square().reshape(diff.shape[0], -1).mean(1)
    s = torch.where(mask, sigma.to(device=student.device, dtype=dtype),
                    torch.ones((), dtype=dtype, device=student.device))
    w = torch.where(mask, edm_weight(s, sigma_data).to(dtype),
                    torch.zeros((), dtype=dtype, device=student.device))
    total = (w * m).sum()
    if isinstance(global_count, Tensor):
        denom = global_count.to(device=student.device, dtype=dtype).clamp_min(1)
    else:
        if global_count < 0:
            raise ValueError(f"global_count must be >= 0, got {global_count}")
        denom = float(max(1, int(global_count)))
    return total * float(world_size * grad_accum_steps) / denom


# ----------------------------------------------------------------------------------------------
# 6. Minibatch OT coupling (iLCT)
# ----------------------------------------------------------------------------------------------


def ot_cost_matrix(x: Tensor, z: Tensor) -> Tensor:
    """M[a, b] = ||x_a - z_b||^2 of the flattened tensors, float64 [B, B] (SPEC 6).

    |x|^2 + |z|^2 - 2 x z^T with one float64 matmul (torch, so inside DataLoader workers it runs
    on the worker's single thread: the DataLoader sets torch.set_num_threads(1) there)."""
    if x.shape[0] != z.shape[0] or x[0].numel() != z[0].numel():
        raise ValueError(f"x {tuple(x.shape)} and z {tuple(z.shape)} must have the same batch and "
                         "per-sample size")
    xf = x.detach().reshape(x.shape[0], -1).to(torch.float64)
    zf = z.detach().reshape(z.shape[0], -1).to(torch.float64)
    cost = (xf * xf).sum(1)[:, None] + (zf * zf).sum(1)[None, :] - 2.0 * (xf @ zf.T)
    return cost.clamp_min_(0.0)


def ot_permutation(x: Tensor, z: Tensor) -> Tensor:
    """perm [B] (int64, CPU) such that z[perm[a]] is paired with x[a] by the exact minibatch
    optimal transport plan (SPEC 6, iLCT): POT's network simplex `ot.emd` with uniform marginals
    on the squared-distance cost. With uniform marginals the optimal plan is a vertex of the
    Birkhoff polytope, i.e. a permutation scaled by 1/B; it is read off by argmax per row and
    checked. Should `ot.emd` stop early or return a non-permutation (degenerate ties, iteration
    limit), the same assignment problem is solved exactly by scipy's `linear_sum_assignment`.
    Single-threaded (numThreads=1): it runs in the data workers beside the trainer."""
    import ot  # POT, imported here: `import lct` stays light

    n = x.shape[0]
    if n <= 1:
        return torch.zeros(n, dtype=torch.int64)
    cost = ot_cost_matrix(x, z).cpu().numpy()
    w = np.full(n, 1.0 / n)
    plan, log = ot.emd(w, w, cost, numItermax=max(100_000, 50 * n * n), log=True, numThreads=1)
    perm = np.asarray(plan).argmax(axis=1)
    is_perm = np.array_equal(np.sort(perm), np.arange(n))
    if not is_perm or log.get("warning") is not None or log.get("result_code", 1) != 1:
        import scipy.optimize  # POT's own dependency (exports carry this file: no bare from-import for them to flag)

        rows, perm = scipy.optimize.linear_sum_assignment(cost)
        assert np.array_equal(rows, np.arange(n))
    perm_t = torch.from_numpy(np.ascontiguousarray(perm, dtype=np.int64))
    assert torch.equal(torch.sort(perm_t).values, torch.arange(n)), "OT plan is not a permutation"
    return perm_t


def ot_couple(x: Tensor, z: Tensor) -> Tensor:
    """z reordered along the batch so that row a of the result is paired with x[a] (SPEC 6, 11).

    The latent keeps its caption; only the noise moves. Per rank and micro-batch (iLCT: 128), on
    the unit noise before any sigma scaling, no gathering across ranks, in the data workers
    (`lct.data.collate`). The coupling ignores the caption, so in training z depends on the
    caption's latent while at sampling it does not (how much it lowers the pair cost: SPEC 6)."""
    perm = ot_permutation(x, z)
    return z[perm.to(z.device)]


# ----------------------------------------------------------------------------------------------
# 14. VP / DDPM noise predictors as lct denoisers (PixArt): the formulas of lct.models.vp.VPDenoiser
# and of the PixArt exports' levels (lct.export_pixart, SPEC 14.8)
# ----------------------------------------------------------------------------------------------

VP_PREDICTION_TYPES = ("epsilon", "v_prediction")


def alphas_cumprod(config: dict) -> np.ndarray:
    """float64 `abar_t`, t = 0..T-1, from a diffusers scheduler config (SPEC 14.1).

    "linear" and "scaled_linear" betas and `trained_betas` are recomputed in float64 (diffusers
    builds them in float32; the PixArt/IDDPM training code used float64); other schedules take
    diffusers' own table, upcast. Zero-terminal-SNR schedules are refused (ValueError)."""
    cfg = dict(config)
    n = int(cfg.get("num_train_timesteps", 1000))
    b0, b1 = float(cfg.get("beta_start", 0.0001)), float(cfg.get("beta_end", 0.02))
    schedule = cfg.get("beta_schedule", "linear")
    if cfg.get("rescale_betas_zero_snr"):
        raise ValueError("rescale_betas_zero_snr makes abar_(T-1) = 0 (sigma_max infinite); not supported")
    if cfg.get("trained_betas") is not None:
        betas = np.asarray(cfg["trained_betas"], dtype=np.float64)
    elif schedule == "linear":
        betas = np.linspace(b0, b1, n, dtype=np.float64)
    elif schedule == "scaled_linear":
        betas = np.linspace(b0 ** 0.5, b1 ** 0.5, n, dtype=np.float64) ** 2
    else:
        from diffusers import DDPMScheduler  # diffusers' own table for its other schedules

        keep = {k: cfg[k] for k in ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule") if k in cfg}
        return DDPMScheduler(**keep).alphas_cumprod.double().numpy()
    return np.cumprod(1.0 - betas)


def vp_log_sigmas(abar) -> Tensor:
    """ln sigma_t = 0.5 ln((1 - abar_t) / abar_t), float64, ascending in t (SPEC 14.1)."""
    a = torch.as_tensor(np.asarray(abar, dtype=np.float64), device="cpu")  # also under a meta-device build
    if a.ndim != 1 or a.numel() < 2 or not bool(((a > 0) & (a < 1)).all()) or not bool((a[1:] < a[:-1]).all()):
        raise ValueError("alphas_cumprod must be a strictly decreasing 1-D table in (0, 1)")
    return 0.5 * torch.log((1.0 - a) / a)


def sigma_to_timestep(sigma: Tensor, log_sigmas: Tensor) -> Tensor:
    """Continuous timestep of noise level sigma (SPEC 14.1; k-diffusion's `DiscreteSchedule.sigma_to_t`).

    With knots `l_i = ln sigma_i` (ascending): `t = i + (ln sigma - l_i) / (l_(i+1) - l_i)` for
    `l_i <= ln sigma <= l_(i+1)`; t = 0 below the table, t = T - 1 above it. At a knot, t = i."""
    ls = log_sigmas.to(device=sigma.device, dtype=sigma.dtype)
    log_sigma = torch.log(sigma.clamp_min(torch.finfo(sigma.dtype).tiny))
    low = (torch.searchsorted(ls, log_sigma.contiguous(), right=True) - 1).clamp(0, ls.numel() - 2)
    lo, hi = ls[low], ls[low + 1]
    w = ((log_sigma - lo) / (hi - lo)).clamp(0.0, 1.0)
    return low.to(sigma.dtype) + w


def vp_scalings(sigma: Tensor, prediction_type: str, sigma_min: float = 0.0):
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
    raise ValueError(f"prediction_type {prediction_type!r}: expected one of {', '.join(VP_PREDICTION_TYPES)}")
