"""`LCTScheduler`: SPEC 9's consistency sampling as a diffusers scheduler, and the sampling levels.

    levels   sigma_max = s_0 > s_1 > ... > s_(k-1)          (s_i = the taus: `config.taus`, or given)
    x_0      = s_0 z                                          (`init_noise_sigma` times the unit noise)
    f_i      = f(x_i, s_i)                                    the pipeline: `lct.consistency.consistency_function`
    x_(i+1)  = f_i + sqrt(s_(i+1)^2 - sample_sigma_min^2) z_(i+1)    `step`; the last f is the sample

`step(model_output, timestep, sample, generator, return_dict)` has diffusers' signature; its
`model_output` is the consistency function's output f at the current level (guided by the pipeline
where guidance is on), so the step is the re-noising alone. `timesteps` are the network's time
inputs `e = time_embed_scale * ln(sigma) / 4` (SPEC 1, fp32), `sigmas` the levels and a final 0.

Default levels (`default_taus`, SPEC 9): the model's recorded taus when it records k - 1 of them
(the 2-step tau), otherwise the k - 1 interior levels of the (k + 1)-point Karras grid (rho 7,
sigma_min 0.002, sigma_max 80 in sigma_data 0.5 units; other sigma_data scale it as SPEC 14.4
does): the multistep levels of the consistency-model codebases iCT and iLCT build on
(`get_sigmas_karras(steps + 1, ...)`). The recorded sampling sigma_min of a model (ECT's 0.003
boundary, its 0 noise floor) plays no part in them.

Why not diffusers' `CMStochasticIterativeScheduler` (checked against diffusers 0.42.1): its
boundary scalings and its `sqrt(sigma_next^2 - sigma_min^2)` noise are SPEC 1/9's, but its levels
are integer indices into a `num_train_timesteps` Karras grid (iLCT's tau 0.36931547704 is index 440
of 641; ECT's 0.821 or a `--tau` sweep is not expressible), one sigma_min serves the scalings and
the noise (lct records the training boundary and a separate sampling floor), its time input is
hard-wired to 250 ln(sigma + 1e-44) in float64, and it clamps denoised latents to [-1, 1].

This file imports only torch and diffusers (and, relatively, `consistency.py`): exports carry it
as their `scheduler/lct_scheduler.py` beside that file. A tuned PixArt samples with diffusers' stock
`LCMScheduler` instead (`lct.export_pixart`, SPEC 14.8): its step is SPEC 9's for a VP model at
integer timesteps, so no lct scheduler travels with it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor

from .consistency import karras_sigmas, time_embed_input

# SPEC 9's default Karras grid, in sigma_data 0.5 units.
KARRAS_SIGMA_MIN, KARRAS_SIGMA_MAX, KARRAS_RHO = 0.002, 80.0, 7.0


def nfe(steps: int, guidance: float) -> int:
    """Network evaluations per sample (a guided step costs 2, SPEC 9)."""
    return steps * (1 if guidance == 1.0 else 2)


def karras_taus(steps: int, sigma_min: float = KARRAS_SIGMA_MIN, sigma_max: float = KARRAS_SIGMA_MAX,
                rho: float = KARRAS_RHO) -> list[float]:
    """The k - 1 interior levels of the (k + 1)-point Karras grid, decreasing (SPEC 9)."""
    if steps < 1:
        raise ValueError(f"sampling needs at least 1 step, got {steps}")
    levels = karras_sigmas(steps + 1, sigma_min, sigma_max, rho).flip(0).tolist()
    return [float(t) for t in levels[1:-1]]


def default_taus(steps: int, recorded: Sequence[float] = (), sigma_max: float = KARRAS_SIGMA_MAX,
                 sigma_data: float = 0.5) -> list[float]:
    """The intermediate levels of k-step sampling when none are given (SPEC 9): the model's
    `recorded` taus when there are k - 1 of them, else `karras_taus(k)` on [0.002, sigma_max]
    (0.002 scaled by sigma_data / 0.5, SPEC 14.4)."""
    if steps < 1:
        raise ValueError(f"sampling needs at least 1 step, got {steps}")
    recorded = [float(t) for t in recorded]
    if steps - 1 <= len(recorded):
        return recorded[: steps - 1]
    return karras_taus(steps, KARRAS_SIGMA_MIN * sigma_data / 0.5, sigma_max)


def check_taus(taus: Sequence[float], sigma_max: float) -> list[float]:
    """Intermediate levels must be finite, positive, decreasing and below sigma_max (SPEC 9)."""
    taus = [float(t) for t in taus]
    if any(not math.isfinite(t) or t <= 0 for t in taus) or any(b >= a for a, b in zip([sigma_max] + taus, taus)):
        raise ValueError(f"taus must be positive, decreasing and below sigma_max {sigma_max:g}: {taus}")
    return taus


@dataclass
class LCTSchedulerOutput(BaseOutput):
    """`prev_sample`: the input of the next step (the sample after the last step);
    `denoised`: f of this step (the `model_output` it was given)."""

    prev_sample: torch.Tensor
    denoised: torch.Tensor


class LCTScheduler(SchedulerMixin, ConfigMixin):
    """SPEC 9 consistency sampling (see the module docstring).

    Config: `sigma_min` (the boundary of SPEC 1's scalings when sampling: the training value, or
    the method's `sample_boundary_sigma_min`), `sigma_max`, `sigma_data`, `time_embed_scale`,
    `sample_sigma_min` (the noise floor between steps; None = `sigma_min`), `taus` (the model's
    default intermediate levels: the 2-step tau first)."""

    order = 1

    @register_to_config
    def __init__(self, sigma_min: float = 0.002, sigma_max: float = 80.0, sigma_data: float = 0.5,
                 time_embed_scale: float = 1000.0, sample_sigma_min: float | None = None,
                 taus: Sequence[float] = (0.36931547704,)):
        self.init_noise_sigma = float(sigma_max)
        self.set_timesteps(1)

    @property
    def noise_sigma_min(self) -> float:
        s = self.config.sample_sigma_min
        return float(self.config.sigma_min if s is None else s)

    def default_taus(self, num_inference_steps: int) -> list[float]:
        """The model's taus, or SPEC 9's Karras levels for more steps than it records."""
        return default_taus(int(num_inference_steps), self.config.taus, float(self.init_noise_sigma),
                            float(self.config.sigma_data))

    def set_timesteps(self, num_inference_steps: int | None = None, device: str | torch.device | None = None,
                      sigmas: Sequence[float] | None = None, taus: Sequence[float] | None = None) -> None:
        """The levels of `num_inference_steps` steps (`default_taus`), or given: `sigmas` (all k
        levels, the first sigma_max, diffusers' convention) or `taus` (the k - 1 intermediate ones)."""
        smax = float(self.init_noise_sigma)
        if sigmas is not None:
            if taus is not None:
                raise ValueError("set_timesteps takes sigmas or taus, not both")
            sigmas = [float(s) for s in sigmas]
            if not sigmas or sigmas[0] != smax:
                raise ValueError(f"sigmas must start at the model's sigma_max {smax:g} (SPEC 9 samples from pure "
                                 f"noise), got {sigmas[:3]}")
            taus = sigmas[1:]
        if taus is None:
            if num_inference_steps is None:
                raise ValueError("set_timesteps needs num_inference_steps, sigmas or taus")
            taus = self.default_taus(int(num_inference_steps))
        elif num_inference_steps is not None and len(taus) != num_inference_steps - 1:
            raise ValueError(f"{num_inference_steps} steps need {num_inference_steps - 1} tau value(s), got {list(taus)}")
        self.levels = [smax] + check_taus(taus, smax)
        self.num_inference_steps = len(self.levels)
        self.sigmas = torch.tensor(self.levels + [0.0], dtype=torch.float32)
        self.timesteps = self.time_inputs(torch.tensor(self.levels, dtype=torch.float32)).to(device)
        self._step_index = 0

    def time_inputs(self, sigmas: torch.Tensor) -> torch.Tensor:
        """The network's time input at fp32 levels: `time_embed_scale * ln(sigma) / 4` (SPEC 1)."""
        return time_embed_input(sigmas, float(self.config.time_embed_scale))

    @property
    def step_index(self) -> int:
        return self._step_index

    def scale_model_input(self, sample: torch.Tensor, timestep: float | torch.Tensor | None = None) -> torch.Tensor:
        """The sample as it is: the pipeline's network call (SPEC 1's consistency function) scales it."""
        return sample

    def step(self, model_output: torch.Tensor, timestep: float | torch.Tensor | None, sample: torch.Tensor,
             generator: torch.Generator | list[torch.Generator] | None = None,
             return_dict: bool = True) -> LCTSchedulerOutput | tuple:
        """One consistency step at the current level: `model_output` is f(sample, sigma) (fp32);
        unless this is the last step, `prev_sample = f + sqrt(tau_next^2 - sample_sigma_min^2) z`
        with z drawn by `generator` (a list: one generator per sample)."""
        if model_output.shape != sample.shape:
            raise ValueError(f"model_output {list(model_output.shape)} must be f for the sample {list(sample.shape)}")
        return self._renoise(model_output.float(), generator, return_dict)

    def _renoise(self, f: torch.Tensor, generator, return_dict: bool):
        nxt = self._step_index + 1
        if nxt < len(self.levels):
            tau, smin = self.levels[nxt], self.noise_sigma_min
            z = randn_tensor(f.shape, generator=generator, device=f.device, dtype=torch.float32)
            # sqrt(tau^2 - sigma_min^2): the boundary-conditioned model maps sigma_min to identity.
            prev = f + math.sqrt(max(tau * tau - smin * smin, 0.0)) * z
        else:
            prev = f
        self._step_index = nxt
        if not return_dict:
            return (prev, f)
        return LCTSchedulerOutput(prev_sample=prev, denoised=f)

    def __len__(self) -> int:
        return len(self.levels)


def with_sampling_sigma_min(scheduler: LCTScheduler, sigma_min: float | None = None,
                            sample_sigma_min: float | None = None) -> LCTScheduler:
    """A copy of `scheduler` with another boundary of the scalings (`sigma_min`) and/or noise
    sigma_min between steps (None keeps the recorded value). ECT's evaluation of its sigma_min-0
    network: `sigma_min=0.003, sample_sigma_min=0` (locuslab/ect ECMPrecond in eval mode, SPEC 2.4)."""
    changes = {k: float(v) for k, v in (("sigma_min", sigma_min), ("sample_sigma_min", sample_sigma_min))
               if v is not None}
    if any(v < 0 for v in changes.values()):
        raise ValueError(f"sampling sigma_min values must be >= 0: {changes}")
    return type(scheduler).from_config({**scheduler.config, **changes})
