"""`lct/train.py --dry-run`: what a start would do, without starting it.

Every `lct.preflight` check (each failure printed as "would fail at start: ..."), then the figures
a run is planned with, from the network on the meta device: parameters, FLOPs per step and for the
run, data epochs, memory per GPU (weights, gradients, optimizer moments, EMAs, frozen towers,
activations), the resolved DeepSpeed config and the resume state; and, where a start would not
fail, the time per step and for the run, measured: a few optimizer steps of the network on the
device the run will use (`measure_step`). Exit 2 when a start would fail.
"""

from __future__ import annotations

import datetime
import json
import sys
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from lct import dist, models
from lct.config import TrainConfig, dump_yaml
from lct.data import DataDescription
from lct.dist import DistInfo
from lct.engine import deepspeed_config, set_precision
from lct.errors import UserError
from lct.models.build import build_network, planned_data
from lct.preflight import Start, preflight


def dry_run(cfg: TrainConfig, info: DistInfo, measure: bool = True) -> int:
    """The module docstring's report on rank 0; the exit status a start would have (0 or 2)."""
    failures: list[str] = []
    start = preflight(cfg, info, failures=failures)
    if not info.is_main:  # under a launcher every rank checks; rank 0 reports
        return 2 if failures else 0
    desc, micro = planned_data(cfg, start.desc), start.micro
    model = build_network(cfg, desc, start.manifest, meta=True)
    counts = models.count_parameters(model.net)
    flops = flops_per_step(cfg, desc, model, micro)
    steps, batch = cfg.run.total_steps, cfg.optim.batch_size
    src = "manifest" if desc.from_manifest else "defaults (no manifest yet)"
    print(f"model: {cfg.model.arch} ({cfg.model.cond}-conditioned), latent {list(desc.latent_shape)} "
          f"and text {desc.text_len}x{desc.text_dim} from {src}")
    print(f"parameters: trunk {counts['trunk'] / 1e6:.2f} M, extra (text/null/cross-attention) "
          f"{counts['extra'] / 1e6:.2f} M, total {counts['total'] / 1e6:.2f} M")
    print(f"FLOPs per optimizer step (global batch {batch}, {cfg.method.objective}): {flops / 1e12:.3f} TFLOP")
    print(f"compute for run.total_steps {steps}: {si(flops * steps)}FLOP in all, "
          f"{si(flops * steps / info.world_size)}FLOP per GPU over {info.world_size}; "
          f"{steps * batch:,} training images")
    if start.manifest is not None:
        n = sum(int(r.get("samples", 0)) for r in start.manifest.get("shards", []))
        shards = len(start.manifest.get("shards", []))
        if n:
            print(f"data: {n:,} samples in {shards} shards; {steps * batch / n:.1f} epochs over run.total_steps")
    mem = memory_estimate(cfg, desc, model, micro, info.world_size, start)
    print(f"memory per GPU (estimated, micro-batch {micro} x {start.accum} accumulation, ZeRO-"
          f"{cfg.distributed.zero_stage} over {info.world_size}): {si(mem['total'], 1024)}B = "
          + ", ".join(f"{k} {si(v, 1024)}B" for k, v in mem.items() if k != "total")
          + " (fp32 activations" + ("; bf16_trunk keeps about half" if cfg.precision == "bf16_trunk" else "")
          + "), plus the CUDA context and allocator slack (~1-2 GiB)")
    if measure and not failures:
        print(time_line(cfg, desc, start, micro, info))
    print("deepspeed config (for this world size, "
          f"{info.world_size}): {json.dumps(deepspeed_config_or_none(cfg, info.world_size))}")
    if start.saved is not None:
        done = start.saved["state"]["applied_steps"]
        print(f"resume: {start.resume} at applied step {done}"
              + (f"; the run is complete (run.total_steps {steps}): a start would do nothing" if done >= steps else ""))
    elif not failures:
        print(f"resume: none, a new run in {cfg.run.dir}")
    for note in start.notes:
        print(f"warning: {note}", file=sys.stderr)
    print("resolved config:\n" + dump_yaml(cfg))
    for f in failures:
        print(f"would fail at start: {f}", file=sys.stderr)
    if failures:
        print(f"dry run: {len(failures)} problem{'s' * (len(failures) > 1)}; a start would exit 2", file=sys.stderr)
    return 2 if failures else 0


PRETRAINED_ARCHS = ("pixart", "sana", "sd3")


def time_line(cfg: TrainConfig, desc: DataDescription, start: Start, micro: int, info: DistInfo) -> str:
    """The measured time per step and the run's estimate, as one line."""
    if cfg.model.arch in PRETRAINED_ARCHS:
        return (f"time per step: not measured for model.arch={cfg.model.arch} (the dry run does not load the "
                "pretrained weights); run a few steps with run.total_steps to time it")
    device = dist.pick_device("auto", info.local_rank)
    seconds, timed = measure_step(cfg, desc, start.manifest, micro, start.accum, device)
    done = start.saved["state"]["applied_steps"] if start.saved is not None else 0
    left = max(0, cfg.run.total_steps - done)
    eta = datetime.timedelta(seconds=round(seconds * left))
    return (f"time per step (measured: {timed} step(s) of micro-batch {micro} x {start.accum} accumulation on "
            f"{device.type}, one rank alone: forward, backward{', teacher forward' * (cfg.method.objective != 'edm')}"
            f" and an RAdam step, uncompiled; no data loading, communication, EMA or monitoring): {seconds:.3g} s; "
            f"for the {left:,} step(s) left of run.total_steps {cfg.run.total_steps:,}: about {eta}")


def measure_step(cfg: TrainConfig, desc: DataDescription, manifest: dict | None, micro: int, accum: int,
                 device: torch.device, steps: int = 2, slow: float = 30.0) -> tuple[float, int]:
    """(seconds per optimizer step, steps timed): one warm-up step, then `steps` timed ones (only
    the warm-up when it takes longer than `slow` seconds) of the network itself (random weights,
    uncompiled) on `device` with zero inputs of the run's shapes; the process's RNG is left as it was."""
    set_precision(cfg.precision)
    plain = cfg.model_copy(update={"model": cfg.model.model_copy(update={"compile": False})})
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        model = build_network(plain, desc, manifest).to(device).train()
        opt = torch.optim.RAdam([p for p in model.parameters() if p.requires_grad], lr=1e-6)
        with torch.device(device):
            x, sigma, cond = meta_inputs(cfg, desc, micro)

        def one_step() -> float:
            t = time.perf_counter()
            for _ in range(accum):
                model(x, sigma, **cond).float().square().mean().backward()
                if cfg.method.objective != "edm":
                    with torch.no_grad():  # the teacher pass of a consistency objective
                        model(x, sigma, **cond)
            opt.step()
            opt.zero_grad(set_to_none=True)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            return time.perf_counter() - t

        first = one_step()
        if first > slow:
            return first, 1
        return sum(one_step() for _ in range(steps)) / steps, steps


def si(x: float, base: int = 1000) -> str:
    """`x` with a unit prefix: 3.2 T, 950 M (base 1024: 1.5 Gi, the memory units)."""
    units = ["", "K", "M", "G", "T", "P", "E", "Z"]
    i = 0
    while abs(x) >= base and i < len(units) - 1:
        x, i = x / base, i + 1
    return f"{x:.3g} {units[i]}{'i' if base == 1024 and i else ''}"


def deepspeed_config_or_none(cfg: TrainConfig, world_size: int) -> dict | None:
    try:
        return deepspeed_config(cfg, world_size)
    except UserError:
        return None  # the batch does not split: reported as a failure


def memory_estimate(cfg: TrainConfig, desc: DataDescription, model, micro: int, world: int, start: Start
                    ) -> dict[str, float]:
    """Bytes per GPU, estimated: fp32 weights, gradients (partitioned from ZeRO-2), RAdam/Adam moments
    (partitioned from ZeRO-1), the EMAs (partitioned), the frozen text tower and VAE, and the tensors
    one student forward of the micro-batch saves for backward (counted on the meta device)."""
    p = sum(t.numel() for t in model.parameters())
    z = cfg.distributed.zero_stage
    out = {"weights": 4.0 * p, "gradients": 4.0 * p / (world if z >= 2 else 1),
           "optimizer": 8.0 * p / (world if z >= 1 else 1), "EMAs": 4.0 * p * len(cfg.ema.models) / world}
    frozen = sum(t.numel() for m in (start.text, start.vae) if m is not None for t in m.parameters())
    out["text tower and VAE"] = 4.0 * frozen
    out["activations"] = activation_bytes(cfg, desc, model, micro)
    if cfg.model.checkpointing:  # the backward recomputes one block at a time
        full = build_network(cfg.model_copy(update={"model": cfg.model.model_copy(update={"checkpointing": False})}),
                             desc, start.manifest, meta=True)
        depth = getattr(full.net.config, "depth", None) or getattr(full.net.config, "num_layers", 1)  # DiT or PixArt
        out["activations"] += activation_bytes(cfg, desc, full, micro) / max(1, depth)
    out["total"] = sum(out.values())
    return out


def activation_bytes(cfg: TrainConfig, desc: DataDescription, model, micro: int) -> float:
    """Bytes autograd keeps for backward in one student forward of `micro` samples (fp32; the
    bf16_trunk preset keeps about half), measured on the meta device at up to 8 samples."""
    b = min(micro, 8)
    params = {id(t) for t in model.parameters()}
    saved = [0]

    def pack(t):
        base = t._base if t._base is not None else t
        if id(t) not in params and id(base) not in params:
            saved[0] += t.numel() * t.element_size()
        return t

    with torch.device("meta"):
        x, sigma, cond = meta_inputs(cfg, desc, b)
        model.train()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(x, sigma, **cond)
    return saved[0] / b * micro


def meta_inputs(cfg: TrainConfig, desc: DataDescription, b: int):
    """A network call's inputs for `b` samples (on the current default device: meta); bucketed
    data: at the largest bucket, the most memory a step can take."""
    x = torch.zeros(b, *desc.largest_shape)
    sigma = torch.ones(b)
    cond = {}
    if cfg.model.cond == "text":
        cond = dict(text_states=torch.zeros(b, desc.text_len, desc.text_dim),
                    text_mask=torch.ones(b, desc.text_len, dtype=torch.bool),
                    pooled=torch.zeros(b, desc.pooled_dim),
                    cond_drop=torch.zeros(b, dtype=torch.bool))
    elif cfg.model.cond == "class":
        cond = dict(class_labels=torch.zeros(b, dtype=torch.long))
    return x, sigma, cond


def flops_per_step(cfg: TrainConfig, desc: DataDescription, model, micro: int) -> float:
    """Model FLOPs of one optimizer step over the global batch, counted on the meta device:
    student forward + backward (3x forward) plus, for consistency objectives, a teacher forward."""
    b = min(micro, 8)
    with torch.device("meta"):
        x, sigma, cond = meta_inputs(cfg, desc, b)
        counter = FlopCounterMode(display=False)
        with counter:
            model(x, sigma, **cond)
    passes = 3 + (0 if cfg.method.objective == "edm" else 1)
    return counter.get_total_flops() / b * passes * cfg.optim.batch_size
