"""Training objectives behind one interface: EDM diffusion, iCT / iLCT, ECT (SPEC 5).

Every objective is called the same way by the trainer:

    objective = make_objective(cfg.method, latent_shape, total_steps)
    early = objective.early_mask(batch, step)                # before any forward: |S| is global
    loss, diag = objective(net, batch, step, early_count_global, grad_scale)

`net` is the same callable the engine trains (the DeepSpeed engine, whose forward applies the
precision preset's autocast), `net(x_noisy, sigma, cond_drop=..., **cond) -> f` in fp32.
`batch` carries the normalised latents `x`, unit noise `z` (already OT-coupled by the data path if
enabled), per-sample uniforms `u` (pair index on the current grid) and normals `n` (ECT's t, EDM's
sigma), the condition and the caption-dropout mask: everything random was drawn by the data path.

The teacher is the student network itself (no EMA teacher, iCT/ECT/iLCT): the same forward call
under `torch.no_grad()`, in train mode, with the same noise, condition and dropout mask. The
dropout mask is made identical by running the teacher inside `torch.random.fork_rng`, which
restores the RNG state afterwards, so the student forward draws the same masks (SPEC 5, 1.1).

Switches (each on its own, for the iLCT ablations): `distance`, `c` (number or "adaptive"),
`diffusion_weight` (early-step diffusion term, 0 = off), `ot` (data path) and `model.nsln`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from lct import consistency as C
from lct.config import MethodConfig

Net = Callable[..., torch.Tensor]


@dataclass
class Curriculum:
    """Where the curriculum is at applied step k: grid size N (iCT) or stage (ECT), and c."""

    step: int
    num_points: int | None = None
    stage: int | None = None
    c: float = 0.0


@dataclass
class Diagnostics:
    """Per-sample values (detached) and scalars the trainer aggregates and logs."""

    sigma: torch.Tensor                 # student noise level per sample
    loss: torch.Tensor                  # per-sample weighted consistency (or diffusion) loss
    m: torch.Tensor | None = None       # per-sample mean squared student-target difference
    curriculum: Curriculum | None = None
    early_local: int = 0
    diffusion: torch.Tensor | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def scalars(self) -> dict[str, float]:
        """Host-side summary (one sync): RMS of sqrt(m) and the fraction with m > 2 c^2."""
        out: dict[str, float] = {"loss": float(self.loss.mean())}
        if self.m is not None and self.curriculum is not None:
            c = self.curriculum.c
            out["rms_sqrt_m"] = float(self.m.mean().sqrt())
            out["frac_m_gt_2c2"] = float((self.m > 2 * c * c).float().mean()) if c > 0 else float("nan")
            out["c"] = c
            if self.curriculum.num_points is not None:
                out["N"] = self.curriculum.num_points
            if self.curriculum.stage is not None:
                out["stage"] = self.curriculum.stage
        if self.diffusion is not None:
            out["diffusion_term"] = float(self.diffusion)
        out["early_local"] = self.early_local
        return out


def teacher_pass(net: Net, x_noisy: torch.Tensor, sigma: torch.Tensor, cond: dict) -> torch.Tensor:
    """SPEC 5 teacher: the same forward call as the student, under no_grad, in train mode, with
    the RNG state restored afterwards, so the student that follows draws the same dropout masks.

    `fork_rng` saves and restores the CPU generator and, when the input is on a GPU, that device's
    generator only; on a CPU-only machine with a CUDA build of torch nothing touches CUDA."""
    devices = [x_noisy.device.index or 0] if x_noisy.is_cuda else []
    with torch.random.fork_rng(devices=devices), torch.no_grad():
        return net(x_noisy, sigma, **cond)


def _bcast(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return v.reshape(-1, *([1] * (like.ndim - 1)))


def _mean_sq(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a - b).square().flatten(1).mean(1)


def _dtype(x: torch.Tensor) -> torch.dtype:
    """Noise levels and weights in fp32 (SPEC 1.1), or float64 for float64 inputs (test vectors)."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


class Objective:
    name = "base"
    timer = None  # optional lct.timing.PhaseTimer (benchmarks)

    def phase(self, name: str):
        from lct.timing import no_timer

        return (self.timer or no_timer)(name)

    def __init__(self, method: MethodConfig, latent_shape: tuple[int, ...], total_steps: int):
        self.m = method
        self.latent_shape = tuple(latent_shape)
        self.total_steps = total_steps
        self.c_first = (C.resolve_c_first(method.c_first, self.latent_shape)
                        if method.objective != "edm" else 0.0)

    def curriculum(self, step: int) -> Curriculum:
        return Curriculum(step)

    def early_mask(self, batch: dict, step: int) -> torch.Tensor:
        return torch.zeros(batch["x"].shape[0], dtype=torch.bool, device=batch["x"].device)

    def __call__(self, net: Net, batch: dict, step: int, early_count_global: int = 0,
                 grad_scale: int = 1) -> tuple[torch.Tensor, Diagnostics]:
        raise NotImplementedError

    @staticmethod
    def cond_of(batch: dict) -> dict:
        cond = dict(batch.get("cond") or {})
        if batch.get("cond_drop") is not None:
            cond["cond_drop"] = batch["cond_drop"]
        return cond


class EDMObjective(Objective):
    """EDM denoising (SPEC 5): ln sigma ~ N(P_mean, P_std^2), weight (s^2 + sd^2) / (s sd)^2."""

    name = "edm"

    def __call__(self, net, batch, step, early_count_global=0, grad_scale=1):
        x, z = batch["x"], batch["z"]
        sd = self.m.sigma_data
        sigma64 = torch.exp(self.m.edm_p_mean + self.m.edm_p_std * batch["n"].double())
        sigma = sigma64.to(x.device, _dtype(x))
        with self.phase("student_forward"):
            f = net(x + _bcast(sigma, x) * z, sigma, **self.cond_of(batch))
        weight = ((sigma64 ** 2 + sd ** 2) / (sigma64 * sd) ** 2).to(x.device, _dtype(x))
        per_sample = weight * _mean_sq(f, x)
        return per_sample.mean(), Diagnostics(sigma=sigma.detach(), loss=per_sample.detach(),
                                              curriculum=Curriculum(step))


class _ConsistencyObjective(Objective):
    """Shared part of iCT/iLCT and ECT: distance with c, early-step diffusion term."""

    def distance(self, student: torch.Tensor, target: torch.Tensor, c: float) -> torch.Tensor:
        return C.distance(self.m.distance, student, target, c)

    def add_diffusion(self, per_sample_ct: torch.Tensor, student: torch.Tensor, x: torch.Tensor,
                      sigma: torch.Tensor, early: torch.Tensor, early_count_global: int,
                      grad_scale: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Total `mean(L_CT) + w * L_diff` with the globally normalised early-step term (SPEC 5)."""
        loss = per_sample_ct.mean()
        if self.m.diffusion_weight <= 0:
            return loss, None
        diff = C.diffusion_term(student, x, sigma, early, early_count_global,
                                world_size=grad_scale, sigma_data=self.m.sigma_data)
        return loss + self.m.diffusion_weight * diff, diff.detach() / grad_scale


class ICTObjective(_ConsistencyObjective):
    """iCT (and iLCT, its switches on): adjacent pair (sigma_i, sigma_{i+1}) of the Karras grid
    of N(k) points, drawn with the discretised lognormal law; loss lambda_i * d(f_s, f_t)."""

    name = "ict"

    def __init__(self, method, latent_shape, total_steps):
        super().__init__(method, latent_shape, total_steps)
        self._grids: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}

    def grid(self, num_points: int):
        """(sigmas, pair probabilities, pair weights), float64, cached per N."""
        if num_points not in self._grids:
            s = C.karras_sigmas(num_points, self.m.sigma_min, self.m.sigma_max, self.m.rho)
            self._grids[num_points] = (s, C.lognormal_pair_probs(s, self.m.p_mean, self.m.p_std),
                                       C.pair_weights(s))
        return self._grids[num_points]

    def curriculum(self, step: int) -> Curriculum:
        n_points = C.ict_num_points(step, self.total_steps, self.m.s0, self.m.s1)
        if self.m.c == "adaptive":
            c = C.adaptive_c(n_points - 1, self.m.s0, self.c_first)
        else:
            c = float(self.m.c)
        return Curriculum(step, num_points=n_points, c=c)

    def pairs(self, batch: dict, step: int) -> torch.Tensor:
        cur = self.curriculum(step)
        _, probs, _ = self.grid(cur.num_points)
        return C.pair_index_from_uniform(batch["u"].double().cpu(), probs)

    def early_mask(self, batch, step):
        cur = self.curriculum(step)
        return C.early_set_ict(self.pairs(batch, step), cur.num_points).to(batch["x"].device)

    def __call__(self, net, batch, step, early_count_global=0, grad_scale=1):
        x, z = batch["x"], batch["z"]
        cur = self.curriculum(step)
        sigmas, _, weights = self.grid(cur.num_points)
        idx = self.pairs(batch, step)
        dt = _dtype(x)
        s_student = sigmas[idx + 1].to(x.device, dt)
        s_teacher = sigmas[idx].to(x.device, dt)
        lam = weights[idx].to(x.device, dt)
        cond = self.cond_of(batch)
        with self.phase("teacher_forward"):
            target = teacher_pass(net, x + _bcast(s_teacher, x) * z, s_teacher, cond)
        with self.phase("student_forward"):
            student = net(x + _bcast(s_student, x) * z, s_student, **cond)
        per_sample = lam * self.distance(student, target, cur.c)
        early = C.early_set_ict(idx, cur.num_points).to(x.device)
        loss, diff = self.add_diffusion(per_sample, student, x, s_student, early,
                                        early_count_global, grad_scale)
        diag = Diagnostics(sigma=s_student.detach(), loss=per_sample.detach(),
                           m=_mean_sq(student.detach(), target), curriculum=cur,
                           early_local=int(early.sum()), diffusion=diff)
        return loss, diag


class ECTObjective(_ConsistencyObjective):
    """ECT (SPEC 2.4): t ~ lognormal, r = mapping(t, stage), target f(x + r z, r) or x at r = 0,
    loss d(f_t, f_r) * weight(t, r)."""

    name = "ect"

    def curriculum(self, step: int) -> Curriculum:
        stage = C.ect_stage(step, self.m.stage_every, self.m.max_stage)
        if self.m.c == "adaptive":
            c = C.adaptive_c_for_ect_stage(stage, self.m.s0, self.c_first)
        else:
            c = float(self.m.c)
        return Curriculum(step, stage=stage, c=c)

    def t_of(self, batch: dict) -> torch.Tensor:
        return C.ect_t(batch["n"].double(), self.m.p_mean, self.m.p_std)

    def early_mask(self, batch, step):
        return C.early_set_ect(self.t_of(batch), self.m.diff_sigma_max).to(batch["x"].device)

    def __call__(self, net, batch, step, early_count_global=0, grad_scale=1):
        x, z = batch["x"], batch["z"]
        cur = self.curriculum(step)
        t64 = self.t_of(batch)
        r64 = C.ect_r(t64, cur.stage, self.m.ect_q, self.m.ect_k, self.m.ect_b, self.m.ect_mapping)
        dt = _dtype(x)
        weight = C.ect_weight(t64, r64, self.m.ect_weight, self.m.sigma_data).to(x.device, dt)
        t = t64.to(x.device, dt)
        r = r64.to(x.device, dt)
        clean = r64.to(x.device) <= 0
        cond = self.cond_of(batch)
        # Where r = 0 the target is x itself; the network is never called at sigma = 0.
        r_safe = torch.where(clean, t, r)
        with self.phase("teacher_forward"):
            target = teacher_pass(net, x + _bcast(r_safe, x) * z, r_safe, cond)
            target = torch.where(_bcast(clean, x), x, target)
        with self.phase("student_forward"):
            student = net(x + _bcast(t, x) * z, t, **cond)
        per_sample = weight * self.distance(student, target, cur.c)
        early = C.early_set_ect(t64, self.m.diff_sigma_max).to(x.device)
        loss, diff = self.add_diffusion(per_sample, student, x, t, early, early_count_global, grad_scale)
        diag = Diagnostics(sigma=t.detach(), loss=per_sample.detach(),
                           m=_mean_sq(student.detach(), target), curriculum=cur,
                           early_local=int(early.sum()), diffusion=diff)
        return loss, diag


OBJECTIVES = {"edm": EDMObjective, "ict": ICTObjective, "ilct": ICTObjective, "ect": ECTObjective}


def make_objective(method: MethodConfig, latent_shape: tuple[int, ...], total_steps: int) -> Objective:
    """The objective of `method.objective`; `ilct` is the iCT pair path with iLCT's switches."""
    return OBJECTIVES[method.objective](method, latent_shape, total_steps)


def sigma_buckets(sigma: torch.Tensor, num_buckets: int, sigma_min: float = 0.002,
                  sigma_max: float = 80.0) -> torch.Tensor:
    """Bucket index of each sigma on a log scale between sigma_min and sigma_max (for logging)."""
    lo, hi = math.log(max(sigma_min, 1e-4)), math.log(sigma_max)
    pos = (sigma.double().clamp_min(1e-4).log() - lo) / (hi - lo)
    return (pos * num_buckets).floor().clamp(0, num_buckets - 1).long()
