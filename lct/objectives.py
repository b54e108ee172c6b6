"""Training objectives: EDM diffusion, iCT / iLCT, ECT (SPEC 5). Each plans a micro-batch, then
computes its loss:

    objective = make_objective(cfg.method, latent_shape, total_steps, grad_scale=W * A)
    plan = objective.plan(batch, step)                            # host, before any forward pass
    loss, diag = objective.loss(net, batch, plan, early_global)

`plan` holds the student and teacher levels, the per-sample weights, c and the early set; it depends
only on the data path's draws and the curriculum at applied step `step`, so the trainer can count
the early set of the whole global batch (`early_global`, one all-reduce per step) before the
first forward pass. `net` is the callable the engine trains (the DeepSpeed engine, whose forward
applies the precision preset's autocast), `net(x_noisy, sigma, cond_drop=..., **cond) -> f` in fp32.
`batch` carries the normalised latents `x`, unit noise `z`, per-sample uniforms `u` (pair index on
the current grid) and normals `n` (ECT's t, EDM's sigma), the condition and the caption-dropout
mask: everything random was drawn by the data path (`lct.data`). With `method.ot` the data workers
have already OT-coupled `z` to `x` (`lct.data.collate` -> `consistency.ot_couple`, SPEC 6).

The teacher is the student network itself (no EMA teacher, iCT/ECT/iLCT): the same forward call
under `torch.no_grad()`, in train mode, with the same noise, condition and dropout mask. The
dropout mask is made identical by running the teacher inside `torch.random.fork_rng`, which
restores the RNG state afterwards, so the student forward draws the same masks (SPEC 5, 1.1).

Switches (each on its own, for the iLCT ablations): `distance`, `c` (number or "adaptive"),
`diffusion_weight` (early-step diffusion term, 0 = off), `ot` (data path) and `model.nsln`.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Callable

import torch

from lct import consistency as C
from lct.config import MethodConfig
from lct.timing import no_timer

Net = Callable[..., torch.Tensor]


@dataclass(frozen=True)
class Curriculum:
    """Where the curriculum is at applied step k: grid size N (iCT) or stage (ECT), and c."""

    step: int
    num_points: int | None = None
    stage: int | None = None
    c: float = 0.0


@dataclass(frozen=True)
class Plan:
    """An objective's choices for one micro-batch (host tensors, float64 levels and weights)."""

    sigma: torch.Tensor           # [B] student level (iCT sigma_{i+1}, ECT t, EDM sigma)
    sigma_teacher: torch.Tensor   # [B] teacher level (iCT sigma_i, ECT r: 0 = the target is x; EDM 0)
    weight: torch.Tensor          # [B] per-sample loss weight
    early: torch.Tensor           # [B] bool, iLCT's early set (SPEC 5)
    curriculum: Curriculum

    def rows(self, idx) -> "Plan":
        """The plan of some of its samples (validation's chunks)."""
        return replace(self, sigma=self.sigma[idx], sigma_teacher=self.sigma_teacher[idx],
                       weight=self.weight[idx], early=self.early[idx])


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


def cond_of(batch: dict) -> dict:
    """The network's condition keywords of a batch: its `cond` dict plus the caption-dropout mask."""
    cond = dict(batch.get("cond") or {})
    if batch.get("cond_drop") is not None:
        cond["cond_drop"] = batch["cond_drop"]
    return cond


def _bcast(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return v.reshape(-1, *([1] * (like.ndim - 1)))


def _on(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """A plan's float64 host vector on x's device, in fp32 (SPEC 1.1), or float64 for float64 x
    (test vectors)."""
    return v.to(x.device, torch.float64 if x.dtype == torch.float64 else torch.float32)


class Objective:
    name = "base"

    def __init__(self, method: MethodConfig, latent_shape: tuple[int, ...], total_steps: int,
                 grad_scale: int = 1):
        """`grad_scale` = data-parallel world size x gradient-accumulation steps (SPEC 5)."""
        self.m = method
        self.latent_shape = tuple(latent_shape)
        self.total_steps = total_steps
        self.grad_scale = grad_scale
        self.c_first = (C.resolve_c_first(method.c_first, self.latent_shape)
                        if method.objective != "edm" else 0.0)
        self.distance = C.DISTANCES[method.distance]  # d(student, target, c), SPEC 3

    def curriculum(self, step: int) -> Curriculum:
        return Curriculum(step)

    def plan(self, batch: dict, step: int) -> Plan:
        raise NotImplementedError

    def pair(self, net: Net, batch: dict, plan: Plan, timer=no_timer) -> tuple[torch.Tensor, torch.Tensor]:
        """(student, target): f(x + sigma z, sigma) and, under stopgrad, the teacher
        f(x + sigma_t z, sigma_t) with the same noise direction z, condition and dropout masks
        (`teacher_pass`), or x itself where sigma_t = 0 (ECT's r = 0, EDM): the network is never
        called at sigma = 0. Validation calls it too."""
        x, z, cond = batch["x"], batch["z"], cond_of(batch)
        sigma, sigma_t = _on(plan.sigma, x), _on(plan.sigma_teacher, x)
        clean = plan.sigma_teacher <= 0  # on the host: which passes run is known without a sync
        target = x
        if not bool(clean.all()):
            if bool(clean.any()):
                sigma_t = torch.where(clean.to(x.device), sigma, sigma_t)
            with timer("teacher_forward"):
                target = teacher_pass(net, x + _bcast(sigma_t, x) * z, sigma_t, cond)
                if bool(clean.any()):
                    target = torch.where(_bcast(clean.to(x.device), x), x, target)
        with timer("student_forward"):
            student = net(x + _bcast(sigma, x) * z, sigma, **cond)
        return student, target

    def loss(self, net: Net, batch: dict, plan: Plan, early_global: int = 0,
             timer=no_timer) -> tuple[torch.Tensor, Diagnostics]:
        """weight * d(student, target) (SPEC 3, 5), plus w * L_diff over the early set (iLCT)."""
        student, target = self.pair(net, batch, plan, timer)
        x, sigma = batch["x"], _on(plan.sigma, batch["x"])
        per_sample = _on(plan.weight, x) * self.distance(student, target, plan.curriculum.c)
        loss, diffusion = self.with_diffusion(per_sample, student, x, sigma, plan, early_global)
        return loss, Diagnostics(sigma=sigma.detach(), loss=per_sample.detach(),
                                 m=C.mean_sq(student.detach(), target), curriculum=plan.curriculum,
                                 early_local=int(plan.early.sum()), diffusion=diffusion)

    def with_diffusion(self, per_sample: torch.Tensor, student: torch.Tensor, x: torch.Tensor,
                       sigma: torch.Tensor, plan: Plan, early_global: int
                       ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """`mean(L_CT) + w * L_diff` with the globally normalised early-step term (SPEC 5), and this
        micro-batch's unscaled share of L_diff for the logs."""
        loss = per_sample.mean()
        if self.m.diffusion_weight <= 0:
            return loss, None
        diff = C.diffusion_term(student, x, sigma, plan.early, early_global,
                                world_size=self.grad_scale, sigma_data=self.m.sigma_data)
        return loss + self.m.diffusion_weight * diff, diff.detach() / self.grad_scale


class EDMObjective(Objective):
    """EDM denoising (SPEC 5): ln sigma ~ N(P_mean, P_std^2), weight (s^2 + sd^2) / (s sd)^2."""

    name = "edm"

    def plan(self, batch, step):
        sigma = torch.exp(self.m.edm_p_mean + self.m.edm_p_std * batch["n"].double())
        return Plan(sigma, torch.zeros_like(sigma), C.edm_weight(sigma, self.m.sigma_data),
                    torch.zeros(sigma.shape[0], dtype=torch.bool), Curriculum(step))

    def loss(self, net, batch, plan, early_global=0, timer=no_timer):
        """weight(sigma) * mean((f(x + sigma z, sigma) - x)^2): the pair's target is x (sigma_t = 0)."""
        f, x = self.pair(net, batch, plan, timer)
        sigma = _on(plan.sigma, x)
        per_sample = _on(plan.weight, x) * C.mean_sq(f, x)
        return per_sample.mean(), Diagnostics(sigma=sigma.detach(), loss=per_sample.detach(),
                                              curriculum=plan.curriculum)


class ICTObjective(Objective):
    """iCT (and iLCT, its switches on): adjacent pair (sigma_i, sigma_{i+1}) of the Karras grid
    of N(k) points, drawn with the discretised lognormal law; loss lambda_i * d(f_s, f_t)."""

    name = "ict"

    def __init__(self, method, latent_shape, total_steps, grad_scale=1):
        super().__init__(method, latent_shape, total_steps, grad_scale)
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
        c = C.adaptive_c(n_points - 1, self.m.s0, self.c_first, self.m.c_scale) if self.m.c == "adaptive" else float(self.m.c)
        return Curriculum(step, num_points=n_points, c=c)

    def plan(self, batch, step):
        cur = self.curriculum(step)
        sigmas, probs, weights = self.grid(cur.num_points)
        pair = C.pair_index_from_uniform(batch["u"].double().cpu(), probs)
        return Plan(sigmas[pair + 1], sigmas[pair], weights[pair], C.early_set_ict(pair, cur.num_points), cur)


class ECTObjective(Objective):
    """ECT (SPEC 2.4): t ~ lognormal, r = mapping(t, stage), target f(x + r z, r) or x at r = 0,
    loss d(f_t, f_r) * weight(t, r)."""

    name = "ect"

    def curriculum(self, step: int) -> Curriculum:
        stage = C.ect_stage(step, self.m.stage_every, self.m.max_stage)
        c = (C.adaptive_c_for_ect_stage(stage, self.m.s0, self.c_first, self.m.c_scale) if self.m.c == "adaptive"
             else float(self.m.c))
        return Curriculum(step, stage=stage, c=c)

    def plan(self, batch, step):
        cur = self.curriculum(step)
        t = C.ect_t(batch["n"].double(), self.m.p_mean, self.m.p_std)
        r = C.ect_r(t, cur.stage, self.m.ect_q, self.m.ect_k, self.m.ect_b, self.m.ect_mapping)
        return Plan(t, r, C.ect_weight(t, r, self.m.ect_weight, self.m.sigma_data),
                    C.early_set_ect(t, self.m.diff_sigma_max), cur)


OBJECTIVES = {"edm": EDMObjective, "ict": ICTObjective, "ilct": ICTObjective, "ect": ECTObjective}


def make_objective(method: MethodConfig, latent_shape: tuple[int, ...], total_steps: int,
                   grad_scale: int = 1) -> Objective:
    """The objective of `method.objective`; `ilct` is the iCT pair path with iLCT's switches."""
    return OBJECTIVES[method.objective](method, latent_shape, total_steps, grad_scale)
