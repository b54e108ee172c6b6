"""`LCTScheduler`: consistency sampling in 1, 2 or k steps (SPEC 9) as a diffusers scheduler.

    x_0 = sigma_max z                                       (init_noise_sigma = sigma_max)
    f   = c_skip(s) x + c_out(s) F(c_in(s) x, e(s), cond)    at each level s = sigma_max, tau_1, ...
    x   = f + sqrt(tau_next^2 - sample_sigma_min^2) z'       between levels; the last f is the sample

with SPEC 1's scalings (`lct.consistency.scalings`, boundary sigma_min) and time input
`e = time_embed_scale * ln(sigma) / 4` (`lct.consistency.time_embed_input`; 250 ln sigma by
default). Classifier-free guidance combines the consistency function's outputs,
`f_w = f_null + w (f_c - f_null)` (SPEC 9), so `step` takes the 2B network outputs of a guided
evaluation and combines them itself.

Why not diffusers' `CMStochasticIterativeScheduler` (checked against diffusers 0.42.1): its
boundary scalings and its `sqrt(sigma_next^2 - sigma_min^2)` noise are SPEC 1/9's, but
- intermediate levels are integer indices into a `num_train_timesteps` Karras grid: iLCT's tau
  0.36931547704 is index 440 of 641, but any other tau (a `--tau` sweep, ECT's 0.821) is not
  expressible, and the levels are rounded to fp32 before the noise coefficient is computed;
- one `sigma_min` serves both the boundary scalings and the noise: lct records the training
  sigma_min (0 for ECT: plain EDM scalings) and a separate sampling sigma_min;
- the time input is hard-wired to 250 ln(sigma + 1e-44) in float64 (lct: `time_embed_scale`
  is a config key, computed in fp32 as in training, SPEC 1.1);
- it clamps the denoised latents to [-1, 1] by default (lct's normalised latents are not images);
- `step` draws its noise from one generator for the whole batch, so a sample's noise depends on
  the batch it is in; lct keys the noise per sample index (`lct.rng.sampling_noise`), which
  `step(noise=...)` accepts here;
- no classifier-free guidance on the consistency function's output.
So this scheduler reproduces `lct.samplers.consistency_sample` bit for bit instead.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.schedulers.scheduling_utils import SchedulerMixin  # noqa: F401  (diffusers' loader looks it up here)
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor

from lct.consistency import scalings, time_embed_input
from lct.samplers import default_taus


@dataclass
class LCTSchedulerOutput(BaseOutput):
    """`prev_sample`: the input of the next step (the sample after the last step);
    `denoised`: f(x, sigma) of this step (guided where guidance is on)."""

    prev_sample: torch.Tensor
    denoised: torch.Tensor


def check_taus(taus: Sequence[float], sigma_max: float) -> list[float]:
    """Intermediate levels must be positive, decreasing and below sigma_max (SPEC 9)."""
    taus = [float(t) for t in taus]
    if any(t <= 0 for t in taus) or any(b >= a for a, b in zip([sigma_max] + taus, taus)):
        raise ValueError(f"taus must be positive, decreasing and below sigma_max {sigma_max}: {taus}")
    return taus


class LCTScheduler(SchedulerMixin, ConfigMixin):
    """SPEC 9 consistency sampling (see the module docstring).

    Config: `sigma_min` (the boundary of SPEC 1's scalings, the training value), `sigma_max`,
    `sigma_data`, `time_embed_scale`, `sample_sigma_min` (the sigma_min of the noise between
    steps; None = `sigma_min`), `taus` (the model's default intermediate levels: 2-step tau first).
    """

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
        """The model's taus, or the Karras levels for more steps than it records (SPEC 9)."""
        return default_taus(int(num_inference_steps), self.config.taus, float(self.config.sigma_min),
                            float(self.config.sigma_max))

    def set_timesteps(self, num_inference_steps: int | None = None, device: str | torch.device | None = None,
                      taus: Sequence[float] | None = None) -> None:
        """Levels `[sigma_max, *taus]`; `taus` default to the model's (`config.taus`). With
        `taus` given, `num_inference_steps` may be omitted (it is len(taus) + 1)."""
        if taus is None:
            if num_inference_steps is None:
                raise ValueError("set_timesteps needs num_inference_steps or taus")
            taus = self.default_taus(int(num_inference_steps))
        elif num_inference_steps is not None and len(taus) != num_inference_steps - 1:
            raise ValueError(f"{num_inference_steps} steps need {num_inference_steps - 1} tau value(s), got {list(taus)}")
        self.levels = [float(self.config.sigma_max)] + check_taus(taus, float(self.config.sigma_max))
        self.num_inference_steps = len(self.levels)
        # sigmas: the levels and the final 0 (the sample); timesteps: the network's time input.
        self.sigmas = torch.tensor(self.levels + [0.0], dtype=torch.float32)
        self.timesteps = time_embed_input(torch.tensor(self.levels, dtype=torch.float32),
                                          float(self.config.time_embed_scale)).to(device)
        self._step_index = 0

    @property
    def step_index(self) -> int:
        return self._step_index

    # -------------------------------------------------------------- SPEC 1, per sample (fp32)

    def sigma(self, batch: int, device: torch.device | str, step_index: int | None = None) -> torch.Tensor:
        """The current level as a per-sample fp32 vector [batch]."""
        level = self.levels[self._step_index if step_index is None else step_index]
        return torch.full((batch,), level, device=device, dtype=torch.float32)

    def precondition_inputs(self, sample: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """c_in(sigma) x: what the network F receives."""
        _, _, c_in = scalings(sigma, self.config.sigma_data, self.config.sigma_min)
        return _bcast(c_in, sample) * sample

    def precondition_noise(self, sigma: torch.Tensor) -> torch.Tensor:
        """The network's time input e = time_embed_scale * ln(sigma) / 4 (fp32)."""
        return time_embed_input(sigma, float(self.config.time_embed_scale))

    def precondition_outputs(self, sample: torch.Tensor, model_output: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """f = c_skip(sigma) x + c_out(sigma) F: the consistency function's output (fp32)."""
        c_skip, c_out, _ = scalings(sigma, self.config.sigma_data, self.config.sigma_min)
        return _bcast(c_skip, sample) * sample + _bcast(c_out, sample) * model_output.to(sample.dtype)

    def scale_model_input(self, sample: torch.Tensor, timestep: float | torch.Tensor | None = None) -> torch.Tensor:
        """diffusers' name for `precondition_inputs` at the current level."""
        return self.precondition_inputs(sample, self.sigma(sample.shape[0], sample.device))

    # -------------------------------------------------------------- SPEC 9

    def step(self, model_output: torch.Tensor, timestep: float | torch.Tensor | None, sample: torch.Tensor, *,
             guidance_scale: float = 1.0, noise: torch.Tensor | None = None,
             generator: torch.Generator | list[torch.Generator] | None = None,
             return_dict: bool = True) -> LCTSchedulerOutput | tuple:
        """One consistency step at the current level.

        `sample` [B,...] is the noisy input x (fp32); `model_output` is F of the network: [B,...],
        or [2B,...] for a guided step (rows B.. evaluated with the null or negative condition at
        the same x), then `f = f_null + guidance_scale (f_c - f_null)`. Unless this is the last
        step, `prev_sample = f + sqrt(tau_next^2 - sample_sigma_min^2) * noise`, with `noise`
        [B,...] given (lct's per-sample keyed noise) or drawn with `generator`."""
        b = sample.shape[0]
        guided = model_output.shape[0] == 2 * b
        if not guided and model_output.shape[0] != b:
            raise ValueError(f"model_output has {model_output.shape[0]} rows for {b} samples (B or 2B)")
        x = torch.cat([sample, sample]) if guided else sample
        f = self.precondition_outputs(x, model_output, self.sigma(x.shape[0], x.device))
        if guided:
            f_c, f_null = f[:b], f[b:]
            f = f_null + guidance_scale * (f_c - f_null)
        nxt = self._step_index + 1
        if nxt < len(self.levels):
            tau = self.levels[nxt]
            if noise is None:
                noise = randn_tensor(f.shape, generator=generator, device=f.device, dtype=f.dtype)
            smin = self.noise_sigma_min
            # sqrt(tau^2 - sigma_min^2): the boundary-conditioned model maps sigma_min to identity.
            prev = f + math.sqrt(max(tau * tau - smin * smin, 0.0)) * noise.to(f.device, f.dtype)
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
    return LCTScheduler.from_config({**scheduler.config, **changes})


def _bcast(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return v.view((-1,) + (1,) * (like.ndim - 1))
