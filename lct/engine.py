"""DeepSpeed engine from lct's config, with the method's optimizer and precision (SPEC 1.1, 12).

Library defaults are not neutral, so everything the method depends on is written explicitly:
- `gradient_clipping: 0.0` unless the config asks for clipping (DeepSpeed clips at 1.0 otherwise;
  none of iCT, ECT, iLCT clips, SPEC 12);
- RAdam (coupled weight decay, torch's default) or Adam as a *client* optimizer, so
  `zero_allow_untested_optimizer: true` (RAdam is not a DeepSpeed built-in); with `optim.fused`,
  RAdam's step is one compiled elementwise kernel per tensor (`FusedRAdam`) and Adam is torch's
  `fused=True`;
- never `bf16.enabled` / `fp16.enabled`: those cast the whole module, wrapper included, to 16 bits.
  `bf16_trunk` uses DeepSpeed's `torch_autocast` section instead, and the per-sample conditioning
  layers are `FP32Linear`, a class DeepSpeed's autocast does not mark for bf16 communication;
- fp32 gradient accumulation (`data_types.grad_accum_dtype`) and fp32 gradient reduction
  (`communication_data_type`) for the reproduction presets;
- `zero_optimization.compute_grad_norm: true` (DeepSpeed's default today): with it ZeRO-1/2 skip a
  step whose all-reduced global gradient norm is not finite, which is how a non-finite loss skips
  an update (the fp16/bf16 overflow checks are off: lct enables neither).
"""

from __future__ import annotations

import math

import torch
from torch.utils._python_dispatch import _get_current_dispatch_mode

from lct.config import TrainConfig
from lct.errors import ConfigError


def set_precision(precision: str) -> None:
    """fp32 matmul mode of the precision preset (SPEC 1.1)."""
    tf32 = precision in ("tf32", "bf16_trunk")
    torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.backends.cudnn.allow_tf32 = tf32
    torch.set_float32_matmul_precision("high" if tf32 else "highest")


def batch_layout(cfg: TrainConfig, world_size: int) -> tuple[int, int]:
    """(micro-batch per rank, gradient-accumulation steps) for the global batch."""
    batch = cfg.optim.batch_size
    if batch % world_size:
        raise ConfigError(f"the global batch {batch} does not split over {world_size} ranks; "
                          f"use a multiple of {world_size}", key="optim.batch_size")
    micro = cfg.optim.micro_batch_size or batch // world_size
    if batch % (micro * world_size):
        raise ConfigError(f"{micro} x {world_size} ranks does not divide the global batch {batch}",
                          key="optim.micro_batch_size")
    return micro, batch // (micro * world_size)


def deepspeed_config(cfg: TrainConfig, world_size: int) -> dict:
    """The DeepSpeed JSON that lct's config resolves to (asserted per preset by the tests)."""
    micro, accum = batch_layout(cfg, world_size)
    zero = {"stage": cfg.distributed.zero_stage}
    if cfg.distributed.zero_stage > 0:
        # compute_grad_norm: ZeRO-1/2 drop a step whose all-reduced global gradient norm is not
        # finite (fp32 has no overflow check); lct's NaN skip is that check (lct.train.train_step).
        zero.update(reduce_bucket_size=cfg.distributed.allreduce_bucket_size,
                    allgather_bucket_size=cfg.distributed.allreduce_bucket_size,
                    overlap_comm=False, contiguous_gradients=True, compute_grad_norm=True)
    ds = {
        "train_batch_size": cfg.optim.batch_size,
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": accum,
        "gradient_clipping": float(cfg.optim.grad_clip),
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,
        "bf16": {"enabled": False},
        "fp16": {"enabled": False},
        "data_types": {"grad_accum_dtype": "fp32"},
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
        "dump_state": False,
    }
    if cfg.distributed.fp32_reduce:
        ds["communication_data_type"] = "fp32"
    if cfg.precision == "bf16_trunk":
        ds["torch_autocast"] = {
            "enabled": True,
            "dtype": "bfloat16",
            # Which modules' gradients may be reduced in bf16: none when fp32_reduce, else the
            # trunk's plain Linear/Conv2d (the fp32 per-sample layers are FP32Linear, not matched).
            "lower_precision_safe_modules": [] if cfg.distributed.fp32_reduce
            else ["torch.nn.Linear", "torch.nn.Conv2d"],
        }
    return ds


def learning_rate(cfg: TrainConfig, applied_steps: int) -> float:
    """Constant (iCT, ECT CIFAR, iLCT) or lr / sqrt(max(k / ref, 1)) (ECT ImageNet, SPEC 12); or a
    cosine decay from lr to lr * final_lr_ratio at run.total_steps, for short runs whose last steps
    should settle (the demo's EDM start) rather than the papers' long constant-lr runs."""
    o = cfg.optim
    if o.schedule == "inv_sqrt":
        return o.lr / max(applied_steps / o.ref_steps, 1.0) ** 0.5
    if o.schedule == "cosine":
        return o.lr * cosine_decay(applied_steps / cfg.run.total_steps, o.final_lr_ratio)
    return o.lr


def cosine_decay(progress: float, final_ratio: float) -> float:
    """Cosine from 1 at progress 0 to `final_ratio` at progress 1 (clamped to [0, 1]); the trainer's
    `optim.schedule: cosine` and `data_prep/train_vae.py`'s decay."""
    p = min(max(progress, 0.0), 1.0)
    return final_ratio + (1 - final_ratio) * 0.5 * (1 + math.cos(math.pi * p))


def build_optimizer(cfg: TrainConfig, params) -> torch.optim.Optimizer:
    """The method's optimizer (SPEC 12): RAdam with coupled weight decay, or Adam; torch's foreach
    path, or with `optim.fused` one fused kernel per tensor (the same method, to fp32 rounding)."""
    o = cfg.optim
    kw = dict(lr=o.lr, betas=tuple(o.betas), eps=o.eps, weight_decay=o.weight_decay)
    if o.name == "radam":
        if o.fused:
            return FusedRAdam(params, **kw)
        return torch.optim.RAdam(params, decoupled_weight_decay=False, foreach=True, **kw)
    return torch.optim.Adam(params, **kw, **({"fused": True} if o.fused else {"foreach": True}))


def radam_step_sizes(step: float, lr: float, beta1: float, beta2: float) -> tuple[float, float]:
    """RAdam's two host-side step sizes at step t (1-based), as torch's foreach RAdam computes them:
    (rectified: -lr r_t sqrt(1 - beta2^t) / (1 - beta1^t), 0 where the rectification r_t is off;
    unrectified: -lr / (1 - beta1^t) where it is off, else -0)."""
    rho_inf = 2 / (1 - beta2) - 1
    rho_t = rho_inf - 2 * step * (beta2 ** step) / (1 - beta2 ** step)
    rect = (((rho_t - 4) * (rho_t - 2) * rho_inf / ((rho_inf - 4) * (rho_inf - 2) * rho_t)) ** 0.5
            if rho_t > 5 else 0)
    bc1 = 1 - beta1 ** step
    unrect = (lr * (0 if rect > 0 else 1.0) / bc1) * -1
    return ((1 - beta2 ** step) ** 0.5) * (lr * rect / bc1) * -1, unrect


def radam_update_(p: torch.Tensor, g: torch.Tensor, m: torch.Tensor, v: torch.Tensor, rect_size: float,
                  unrect_size: float, beta1: float, beta2: float, eps: float, weight_decay: float) -> None:
    """One RAdam step of one tensor in place, torch's formula and operation order (coupled weight
    decay): g += wd p; m <- lerp(m, g, 1 - beta1); v <- beta2 v + (1 - beta2) g^2;
    p += m (1 / ((sqrt(v) + eps) / rect_size) + unrect_size). Compiled, the whole step is one
    elementwise kernel: p, g, m, v read once, p, m, v written once."""
    if weight_decay != 0:
        g = g.add(p, alpha=weight_decay)
    m.lerp_(g, 1 - beta1)
    v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
    p.addcmul_(m, torch.reciprocal((v.sqrt() + eps) / rect_size) + unrect_size)


def radam_update_hyper_(p: torch.Tensor, g: torch.Tensor, m: torch.Tensor, v: torch.Tensor, h: torch.Tensor,
                        decay: bool) -> None:
    """`radam_update_` with every number read from the tensor `h` = [rect_size, unrect_size,
    beta1 (unused), 1 - beta1, beta2, 1 - beta2, eps, weight_decay] (fp32, on p's device; the
    complements computed on the host in float64, as torch's kernels receive them). Compiled, the
    kernel holds no hyperparameter, so no cached kernel (inductor's on-disk cache is shared by
    every run on the machine) can serve another setting; only `decay` (weight decay on or off)
    changes the graph, and it is part of the graph."""
    if decay:
        g = g + p * h[7]
    m.lerp_(g, h[3])
    v.mul_(h[4]).add_(g * g * h[5])
    p.add_(m * (torch.reciprocal((v.sqrt() + h[6]) / h[0]) + h[1]))


class FusedRAdam(torch.optim.RAdam):
    """`torch.optim.RAdam` (coupled weight decay; the same hyperparameters, state and state_dict,
    so checkpoints move freely between the two) whose step is one compiled kernel per tensor
    (`radam_update_hyper_`) instead of torch's ~15 foreach passes over the weights. DeepSpeed
    ZeRO-1/2 give a client optimizer one flat fp32 partition per parameter group, so there a step
    is one kernel; under ZeRO-0 it is one per parameter. The hyperparameters and step sizes reach
    the kernel as a small device tensor (copied without a host sync), never as constants compiled
    into it. `compiled=False` runs `radam_update_` eagerly (bitwise torch's RAdam)."""

    def __init__(self, params, lr: float, betas=(0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0,
                 compiled: bool = True):
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                         decoupled_weight_decay=False, foreach=False)
        self.compiled = compiled
        self._update = (torch.compile(radam_update_hyper_, dynamic=True, fullgraph=True) if compiled
                        else radam_update_)

    @staticmethod
    def hyper(step: float, group: dict, device: torch.device) -> torch.Tensor:
        """[rect_size, unrect_size, beta1, 1 - beta1, beta2, 1 - beta2, eps, wd] of this step, on
        `device` (from pinned memory, without waiting)."""
        beta1, beta2 = group["betas"]
        rect, unrect = radam_step_sizes(step, float(group["lr"]), beta1, beta2)
        h = torch.tensor([rect, unrect, beta1, 1 - beta1, beta2, 1 - beta2, group["eps"], group["weight_decay"]],
                         dtype=torch.float32)
        if device.type == "cuda":
            return h.pin_memory().to(device, non_blocking=True)
        return h.to(device)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        # Under a dispatch mode (FlopCounterMode, profilers) torch.compile cannot run: eagerly.
        eager = not self.compiled or _get_current_dispatch_mode() is not None
        for group in self.param_groups:
            if group["maximize"] or group["decoupled_weight_decay"] or group["capturable"]:
                raise ValueError("FusedRAdam: maximize, decoupled_weight_decay and capturable are not supported")
            params, grads, exp_avgs, exp_avg_sqs, steps = [], [], [], [], []
            if self._init_group(group, params, grads, exp_avgs, exp_avg_sqs, steps):
                raise ValueError("FusedRAdam: complex parameters are not supported")
            beta1, beta2 = group["betas"]
            lr = float(group["lr"])
            hypers: dict = {}
            for p, g, m, v, t in zip(params, grads, exp_avgs, exp_avg_sqs, steps):
                t += 1  # a host tensor, as in torch's RAdam: no device sync
                if eager:
                    rect_size, unrect_size = radam_step_sizes(float(t), lr, beta1, beta2)
                    radam_update_(p, g, m, v, rect_size, unrect_size, beta1, beta2, group["eps"],
                                  group["weight_decay"])
                    continue
                key = (float(t), p.device)  # ZeRO-0: one tensor per parameter, mostly at one step
                if key not in hypers:
                    hypers[key] = self.hyper(float(t), group, p.device)
                if not (p.is_contiguous() and m.is_contiguous() and v.is_contiguous()):
                    rect_size, unrect_size = radam_step_sizes(float(t), lr, beta1, beta2)
                    radam_update_(p, g, m, v, rect_size, unrect_size, beta1, beta2, group["eps"],
                                  group["weight_decay"])
                    continue
                # Flat views: ZeRO-0's parameters of every rank and shape share one kernel (one graph
                # per shape would pass dynamo's recompile limit at the first step).
                self._update(p.view(-1), g.reshape(-1), m.view(-1), v.view(-1), hypers[key],
                             group["weight_decay"] != 0)
        return loss


def initialize(model: torch.nn.Module, cfg: TrainConfig, world_size: int, load_universal: bool = False):
    """`deepspeed.initialize` with the client optimizer; returns (engine, ds_config).
    `load_universal`: the resume reads a universal checkpoint (another world size)."""
    import deepspeed

    ds = deepspeed_config(cfg, world_size)
    if load_universal:
        ds["checkpoint"] = {"load_universal": True}
    optimizer = build_optimizer(cfg, [p for p in model.parameters() if p.requires_grad])
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds)
    return engine, ds
