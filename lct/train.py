"""Train a latent text-to-image consistency model (iCT, ECT, iLCT) or its EDM starting point.

    deepspeed lct/train.py --config configs/lct_coco.yaml [dotted.key=value ...]
    torchrun --nproc_per_node 8 lct/train.py --config ...
    python lct/train.py --config ... [--dry-run]

Reads top to bottom: `main` -> `preflight` (every check that needs no GPU: paths, data manifest,
text tower, resume state) -> `build` (ranks, network, DeepSpeed engine, EMAs, resume, objective,
data, monitor: one frozen `Run`) -> `loop` (steps, logs, grids, validation, checkpoints,
preemption) -> `train_step` (plan, early-set count, micro-batches, non-finite guard, optimizer,
EMA; no host sync of its own). Resume, save, export and the run records are `lct.run`. Re-running
the same command resumes from the newest complete checkpoint of `run.dir`.
"""

if __name__ == "__main__" and __package__ in (None, ""):  # run as a file: repo root, not lct/, on sys.path
    import pathlib
    import sys

    sys.path[0] = str(pathlib.Path(__file__).resolve().parents[1])

import argparse
import json
import os
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from lct import checkpoint as ckpt
from lct import dist
from lct.config import TrainConfig, check_train_config, dump_yaml, load_config
from lct.data import (DataDescription, DataSpec, InMemoryLatents, SkipTally, describe_data, expand_urls,
                      make_loader, manifest_path, to_device, token_ids, train_shard_urls)
from lct.dist import DistInfo
from lct.ema import PartitionedEMA
from lct.engine import batch_layout, deepspeed_config, initialize, learning_rate, set_precision
from lct.errors import UserError, cli_main
from lct.faults import Faults
from lct.hf_text import HFTextEncoder, is_hf_record
from lct.latents import TEXT_NULL, SampleLayout, load_manifest, read_text_null
from lct.models import Precond, build_dit, count_parameters
from lct.monitor import LossMeter, Monitor, Progress, RunLogger
from lct.objectives import Curriculum, Diagnostics, make_objective
from lct.run import (Run, TrainState, check_resume, find_resume, init_from, load_resume, save,
                     write_run_record)
from lct.text import TextEncoder, text_condition
from lct.timing import no_timer
from lct.vae import LatentNorm

EXIT_SIGTERM, EXIT_SIGINT, EXIT_SKIPS = 143, 130, 3


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="lct/train.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", required=True, help="YAML config (see configs/)")
    p.add_argument("--dry-run", action="store_true",
                   help="check the config, build the model on the meta device, print sizes and FLOPs, exit")
    # deepspeed passes --local_rank=N; newer launchers only set LOCAL_RANK (preferred).
    p.add_argument("--local_rank", "--local-rank", dest="local_rank", type=int, default=None,
                   help=argparse.SUPPRESS)
    p.add_argument("overrides", nargs="*", help="dotted.key=value overrides")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    info = DistInfo.from_env(args.local_rank)
    if info.is_main:
        for w in check_train_config(cfg):
            print(f"config warning: {w}", file=sys.stderr)
    if args.dry_run:
        return dry_run(cfg, info)
    run = build(cfg, info, preflight(cfg, info))
    rc = loop(run) if run is not None else 0
    dist.close()  # only after a run every rank finished (errors and signals exit on their own path)
    return rc


# ----------------------------------------------------------------------------------------------
# Before any GPU work: checks and the data description
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Start:
    """What `preflight` found: the batch split, the data, and the checkpoint to resume from."""

    micro: int
    accum: int
    manifest: dict
    desc: DataDescription
    resume: Path | None
    saved: dict | None            # the resume checkpoint's record


def preflight(cfg: TrainConfig, info: DistInfo) -> Start:
    """Every check a start makes from files alone, before the process group and DeepSpeed."""
    micro, accum = batch_layout(cfg, info.world_size)
    problems = problems_with_paths(cfg)
    if problems:
        raise UserError("; ".join(problems))
    manifest = load_manifest(manifest_path(cfg))
    check_text_compatibility(cfg, manifest)
    if cfg.model.arch == "pixart":  # its config, the data's latents and text, the null condition
        pixart_config_for(cfg, describe_data(manifest), manifest, dry_run=False)
    resume = find_resume(cfg)
    saved = check_resume(cfg, info, resume) if resume else None
    return Start(micro, accum, manifest, describe_data(manifest), resume, saved)


def problems_with_paths(cfg: TrainConfig) -> list[str]:
    """Missing inputs: warnings under --dry-run, errors (exit 2) at a real start."""
    out = []
    if not cfg.data.shards:
        out.append("data.shards is empty: point it at the output of data_prep/encode_latents.py")
    else:
        urls = expand_urls(cfg.data.shards)
        local = [u for u in urls if "://" not in u and not u.startswith("pipe:")]
        if not urls:
            out.append(f"data.shards: no shards match {cfg.data.shards!r}")
        missing = [u for u in local if not os.path.exists(u)]
        if missing:
            out.append(f"data.shards: {len(missing)} of {len(urls)} shards not found, e.g. {missing[0]}")
    manifest = manifest_path(cfg)
    if manifest and not manifest.startswith(("http", "pipe:", "s3:")) and not os.path.exists(manifest):
        out.append(f"data.manifest: {manifest} not found (data prep writes it beside the shards)")
    if cfg.model.init_from and not os.path.exists(cfg.model.init_from):
        out.append(f"model.init_from: {cfg.model.init_from} not found")
    if cfg.data.val_shards and not [u for u in expand_urls(cfg.data.val_shards) if os.path.exists(u)]:
        out.append(f"data.val_shards: nothing found at {cfg.data.val_shards!r}")
    return out


def check_text_compatibility(cfg: TrainConfig, manifest: dict) -> None:
    """The trainer refuses a text model or tokenizer that differs from the manifest's."""
    if cfg.model.cond != "text":
        return
    t = manifest.get("text") or {}
    for key in ("model", "pretrained"):
        want = getattr(cfg.text, key)
        if want is not None and t.get(key) is not None and str(want) != str(t.get(key)):
            raise UserError(f"text.{key}={want!r} differs from the data's {t.get(key)!r} "
                            f"(manifest); token ids and states must come from the same text tower")
    for key, have in (("kind", t.get("kind", "open_clip")), ("max_length", t.get("context_length"))):
        want = getattr(cfg.text, key)
        if want is not None and str(want) != str(have):
            raise UserError(f"text.{key}={want!r}, but the data was encoded with {have!r} (manifest); re-encode "
                            f"with data_prep/encode_latents.py --text-{key.replace('_', '-')} {want} or drop text.{key}")


def make_text_encoder(cfg: TrainConfig, manifest: dict, device) -> TextEncoder:
    if is_hf_record(manifest.get("text")):
        return HFTextEncoder.from_manifest(manifest, device, model=cfg.text.model, dtype=cfg.text.dtype)
    enc = TextEncoder.from_manifest(manifest, device=device, model=cfg.text.model, pretrained=cfg.text.pretrained)
    want = (manifest.get("text") or {}).get("tokenizer")
    if want and enc.identity() != want:
        raise UserError("the text tower's tokenizer differs from the one the shards were "
                        f"tokenised with: {enc.identity()} vs manifest {want}")
    return enc


def build_network(cfg: TrainConfig, desc: DataDescription, manifest: dict | None = None,
                  dry_run: bool = False) -> torch.nn.Module:
    """TextDiT wrapped in the SPEC 1 parameterisation, or (`model.arch: pixart`) the pretrained
    PixArt transformer wrapped as a SPEC 14 denoiser (random weights on the meta device for
    `dry_run`)."""
    if cfg.model.arch == "pixart":
        return build_pixart_network(cfg, desc, manifest, dry_run)
    net = build_dit(cfg.model, desc.latent_shape, text_dim=desc.text_dim, text_len=desc.text_len,
                    pooled_dim=desc.pooled_dim)
    return Precond(net, sigma_data=cfg.method.sigma_data, sigma_min=cfg.method.sigma_min,
                   time_embed_scale=cfg.method.time_embed_scale)


_WARNED: set[str] = set()


def pixart_config_for(cfg: TrainConfig, desc: DataDescription, manifest: dict | None, dry_run: bool) -> dict:
    """model.pretrained's transformer config (no weights read), checked against the data. A dry
    run without the weights falls back to the architecture of the same name (`PIXART_ARCHS`)."""
    from lct.models.pixart import PIXART_ARCHS, check_compatible, pixart_config

    try:
        config = pixart_config(cfg.model.pretrained)
    except UserError as err:
        name = cfg.model.pretrained.rstrip("/").split("/")[-1]
        if not dry_run or name not in PIXART_ARCHS:
            raise
        if name not in _WARNED:
            _WARNED.add(name)
            print(f"warning: {err}; the dry run uses the {name} architecture", file=sys.stderr)
        config = dict(PIXART_ARCHS[name])
    check_compatible(config, desc.latent_shape, desc.text_dim if desc.from_manifest else None)
    if manifest is not None and not dry_run:
        read_text_null(Path(manifest_path(cfg)).parent)
    return config


def build_pixart_network(cfg: TrainConfig, desc: DataDescription, manifest: dict | None, dry_run: bool):
    """`VPDenoiser(PixArtNet(...))` from model.pretrained, the null condition from the data's
    `text_null.npy` (SPEC 14.5); the transformer blocks compiled with model.compile."""
    from lct.models.pixart import build_pixart, load_pixart

    config = pixart_config_for(cfg, desc, manifest, dry_run)
    data_dir = Path(manifest_path(cfg) or ".").parent
    if manifest is not None and (data_dir / TEXT_NULL).is_file():
        null = torch.from_numpy(read_text_null(data_dir))
    else:  # dry run before data prep
        null = torch.zeros(1, config["caption_channels"])
    kw = dict(sigma_min=cfg.method.sigma_min, vae_downsample=int(((manifest or {}).get("vae") or {}).get("downsample", 8)))
    if dry_run:
        return build_pixart(config, null, **kw)
    model = load_pixart(cfg.model.pretrained, null, gradient_checkpointing=cfg.model.checkpointing, **kw)
    if cfg.model.compile:
        for block in model.net.transformer.transformer_blocks:
            block.compile()
    return model


def dry_run(cfg: TrainConfig, info: DistInfo) -> int:
    for p in problems_with_paths(cfg):
        print(f"warning: would fail at start: {p}", file=sys.stderr)
    mpath = manifest_path(cfg)
    manifest = load_manifest(mpath) if mpath and os.path.exists(mpath) else None
    desc = describe_data(manifest)
    if cfg.model.arch == "pixart" and manifest is None:  # before data prep: the sizes the model takes
        pc = pixart_config_for(cfg, desc, None, dry_run=True)
        desc = DataDescription((pc["in_channels"], pc["sample_size"], pc["sample_size"]), pc["caption_channels"],
                               cfg.text.max_length or 120, 0)
    with torch.device("meta"):
        model = build_network(cfg, desc, manifest, dry_run=True)
    counts = count_parameters(model.net)
    micro = cfg.optim.micro_batch_size or cfg.optim.batch_size // info.world_size
    flops = flops_per_step(cfg, desc, model, micro)
    src = "manifest" if desc.from_manifest else "defaults (no manifest yet)"
    print(f"model: {cfg.model.arch} ({cfg.model.cond}-conditioned), latent {list(desc.latent_shape)} "
          f"and text {desc.text_len}x{desc.text_dim} from {src}")
    print(f"parameters: trunk {counts['trunk'] / 1e6:.2f} M, extra (text/null/cross-attention) "
          f"{counts['extra'] / 1e6:.2f} M, total {counts['total'] / 1e6:.2f} M")
    print(f"FLOPs per optimizer step (global batch {cfg.optim.batch_size}, {cfg.method.objective}): "
          f"{flops / 1e12:.3f} TFLOP")
    print("deepspeed config (for this world size, "
          f"{info.world_size}): {json.dumps(deepspeed_config(cfg, info.world_size))}")
    print("resolved config:\n" + dump_yaml(cfg))
    return 0


def flops_per_step(cfg: TrainConfig, desc: DataDescription, model, micro: int) -> float:
    """Model FLOPs of one optimizer step over the global batch, counted on the meta device:
    student forward + backward (3x forward) plus, for consistency objectives, a teacher forward."""
    b = min(micro, 8)
    with torch.device("meta"):
        x = torch.zeros(b, *desc.latent_shape)
        sigma = torch.ones(b)
        cond = {}
        if cfg.model.cond == "text":
            cond = dict(text_states=torch.zeros(b, desc.text_len, desc.text_dim),
                        text_mask=torch.ones(b, desc.text_len, dtype=torch.bool),
                        pooled=torch.zeros(b, desc.pooled_dim),
                        cond_drop=torch.zeros(b, dtype=torch.bool))
        elif cfg.model.cond == "class":
            cond = dict(class_labels=torch.zeros(b, dtype=torch.long))
        counter = FlopCounterMode(display=False)
        with counter:
            model(x, sigma, **cond)
    passes = 3 + (0 if cfg.method.objective == "edm" else 1)
    return counter.get_total_flops() / b * passes * cfg.optim.batch_size


# ----------------------------------------------------------------------------------------------
# Build: one frozen record of the run
# ----------------------------------------------------------------------------------------------


def build(cfg: TrainConfig, info: DistInfo, start: Start, network: torch.nn.Module | None = None,
          monitor: bool = True) -> Run | None:
    """Ranks, network, engine, EMAs, resume, objective, data, monitor; None if the run is already
    complete. `network` replaces the configured DiT (benchmarks compare others). The order of the
    steps that draw from the global RNG (network init, text tower) is part of the results."""
    device = dist.pick_device("auto", info.local_rank)
    dist.init(info, device, cfg.run.dist_timeout_minutes, deepspeed=True)
    set_precision(cfg.precision)
    if device.type == "cpu" and "OMP_NUM_THREADS" not in os.environ:
        # CPU ranks share the cores; oversubscribed threads make small matmuls many times slower.
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // info.local_world_size))
    torch.manual_seed(cfg.run.seed + info.rank)  # dropout masks; saved and restored on resume
    if info.is_main:
        Path(cfg.run.dir).mkdir(parents=True, exist_ok=True)

    model = (network if network is not None else build_network(cfg, start.desc, start.manifest)).to(device)
    if cfg.model.init_from:
        init_from(model, cfg.model.init_from, cfg.model.init_ema, info)
    engine, ds_json = initialize(model, cfg, info.world_size)
    ema = PartitionedEMA(engine.module, {e.name: e.resolved_halflife() for e in cfg.ema.models},
                         info.rank, info.world_size)
    state, rng_state = TrainState(), None
    if start.resume:
        state, rng_state = load_resume(engine, ema, start.resume, start.saved, info)
    dist.barrier(info.world_size)
    if info.is_main:
        write_run_record(cfg, info.world_size, ds_json)
    if state.applied_steps >= cfg.run.total_steps:
        if info.is_main:
            print(f"run {cfg.run.dir} is complete at step {state.applied_steps} of {cfg.run.total_steps}; "
                  "nothing to do (raise run.total_steps with run.allow_total_steps_change=true to go on)")
        return None

    text_mode = "none" if cfg.model.cond != "text" else cfg.data.text
    urls, note = train_shard_urls(cfg.data.shards, start.manifest)  # data.shards vs the manifest's shard list
    if note and info.is_main:
        print(note, file=sys.stderr, flush=True)
    spec = DataSpec(urls=urls, mode=cfg.data.mode, seed=cfg.run.seed, rank=info.rank,
                    world_size=info.world_size, micro_batch=start.micro, accum=start.accum,
                    latent_shape=start.desc.latent_shape, norm=LatentNorm.from_manifest(start.manifest, cfg.data.latent_norm),
                    caption_dropout=cfg.data.caption_dropout, flip=cfg.data.flip, text=text_mode,
                    ot=cfg.method.ot and cfg.method.objective != "edm", shuffle_buffer=cfg.data.shuffle_buffer,
                    resume_count=state.resume_count, layout=SampleLayout.from_manifest(start.manifest),
                    posterior=cfg.data.posterior, **token_ids(start.manifest))
    memory = InMemoryLatents(spec.urls, spec.layout, quiet=not info.is_main) if cfg.data.mode == "indexed" else None
    # Skipped steps consume data too; leave room for the allowed number of them.
    steps = cfg.run.total_steps - state.applied_steps + cfg.run.max_consecutive_skips * 4
    loader = make_loader(spec, state.data_steps, steps, cfg.data.num_workers, cfg.data.prefetch_factor,
                         device.type == "cuda", memory)
    run = Run(cfg=cfg, info=info, device=device, micro=start.micro, accum=start.accum, manifest=start.manifest,
              desc=start.desc, engine=engine, ema=ema,
              objective=make_objective(cfg.method, start.desc.latent_shape, cfg.run.total_steps,
                                       grad_scale=info.world_size * start.accum),
              loader=loader,
              text_encoder=make_text_encoder(cfg, start.manifest, device) if text_mode == "on_the_fly" else None,
              monitor=Monitor(cfg, info, engine, ema, start.manifest, start.desc, device) if monitor else None,
              logger=RunLogger(Path(cfg.run.dir), cfg) if info.is_main else None, faults=Faults(), state=state)
    if rng_state is not None:
        ckpt.set_rng_state(rng_state)  # last: building the loader, text tower and monitor may draw
    return run


# ----------------------------------------------------------------------------------------------
# The loop and the step
# ----------------------------------------------------------------------------------------------


def loop(run: Run) -> int:
    cfg, info = run.cfg, run.info
    state, flags = run.state, StopFlags()
    meter = LossMeter(cfg, run.device, info.world_size, state.images_seen)
    progress = Progress(cfg, info, state.applied_steps)
    batches = iter(run.loader)
    tally = SkipTally()  # samples the data path skipped, per reason (lct.data.SKIP_REASONS)
    t_start, skips, exit_code = time.time() - state.train_seconds, 0, 0
    while state.applied_steps < cfg.run.total_steps:
        step_batches = [next(batches) for _ in range(run.accum)]
        tally.update(step_batches)
        result = train_step(run, step_batches, state)
        state = state.after_step(result.applied, cfg.optim.batch_size, time.time() - t_start)
        meter.add(result.diagnostics)
        progress.update(result.applied)
        skips = 0 if result.applied else skips + 1
        if not result.applied:
            if info.is_main:
                print(f"step {state.applied_steps}: non-finite loss or gradient, update skipped "
                      f"({skips} in a row)", file=sys.stderr, flush=True)
            if skips >= cfg.run.max_consecutive_skips:
                if info.is_main:
                    print(f"error: {skips} consecutive non-finite steps; stopping. "
                          f"The last good checkpoint in {run.ckpt_root} is kept.", file=sys.stderr)
                exit_code = EXIT_SKIPS
                break

        # Logs, grids, validation, checkpoints (at applied-step boundaries).
        k = state.applied_steps
        if result.applied and k % cfg.run.log_every == 0:
            record = meter.record(state, result.lr, result.curriculum, run.engine, tally)  # collective
            if run.logger:
                run.logger(record)
            progress.show(record)
        if run.monitor and result.applied:
            run.monitor.maybe_run(k, run.logger)
        time_up = bool(cfg.run.time_budget_minutes and state.train_seconds > 60 * cfg.run.time_budget_minutes)
        sig, time_up = dist.all_reduce_values([float(flags.signal), float(time_up)], run.device,
                                              info.world_size, "max")
        if sig or time_up or (result.applied and k % cfg.run.save_every == 0):
            save(run, state)
            run.faults.after_save(k)
        if sig:
            exit_code = EXIT_SIGTERM if int(sig) == signal.SIGTERM else EXIT_SIGINT
            if info.is_main:
                print(f"received signal {int(sig)}: checkpoint saved at step {k}; exiting",
                      file=sys.stderr, flush=True)
            break
        if time_up:
            if info.is_main:
                print(f"time budget of {cfg.run.time_budget_minutes} min reached at step {k}; "
                      "checkpoint saved", file=sys.stderr, flush=True)
            break

    progress.close()
    if exit_code == 0 and state.applied_steps >= cfg.run.total_steps:
        save(run, state, export_all=True)
        if run.monitor:
            run.monitor.maybe_run(state.applied_steps, run.logger, force=True)
    if run.logger:
        run.logger.close()
    dist.barrier(info.world_size)
    return exit_code


@dataclass(frozen=True)
class StepResult:
    """What one optimizer step did."""

    applied: bool                    # False: a non-finite loss or gradient skipped it on every rank
    lr: float
    curriculum: Curriculum           # what the step trained with (N or stage, c)
    diagnostics: list[Diagnostics]   # per micro-batch, detached


def train_step(run: Run, batches: list[dict], state: TrainState, timer=no_timer) -> StepResult:
    """One optimizer step over this rank's micro-batches at `state` (applied step k, data step).
    `timer` (lct.timing.PhaseTimer) times its phases for benchmarks.

    Nothing here waits on the device: the early-set count is one all-reduce of a device tensor per
    step (only with an early-step term), and a non-finite loss on any rank skips the update through
    the gradients themselves (`finite_or_nan`), which DeepSpeed reduces and checks anyway (ZeRO-1/2:
    its overflow check, the step's one host sync; ZeRO-0: `grads_finite` on the reduced gradients)."""
    cfg, engine = run.cfg, run.engine
    lr = learning_rate(cfg, state.applied_steps)
    for g in engine.optimizer.param_groups:
        g["lr"] = lr
    plans = [run.objective.plan(b, state.applied_steps) for b in batches]
    early_global = early_set_size(run, plans)

    skipped, diagnostics = False, []
    for b, plan in zip(batches, plans):
        with timer("to_device"):
            b = to_device(b, run.device)
            b["cond"] = condition(run, b)
        loss, diag = run.objective.loss(engine, b, plan, early_global, timer)
        loss = run.faults.loss(loss, state.data_steps, run.info.rank)
        with timer("backward"):
            engine.backward(finite_or_nan(loss))
        if engine.is_gradient_accumulation_boundary() and cfg.distributed.zero_stage == 0:
            # ZeRO-0 in fp32 has no overflow check: inspect the reduced (so identical) gradients.
            skipped = not grads_finite(engine.module)
            if skipped:
                engine.optimizer.zero_grad(set_to_none=True)
        with timer("optimizer"):
            engine.step()
        diagnostics.append(diag)

    applied = not skipped and engine.was_step_applied()
    if applied:
        with timer("ema"):
            run.ema.update(engine.module, cfg.optim.batch_size)
    return StepResult(applied, lr, plans[-1].curriculum, diagnostics)


def early_set_size(run: Run, plans: list) -> int | torch.Tensor:
    """|S|, the early set of the whole global batch of this step (SPEC 5), before the first forward:
    the plans' masks counted on the host, then summed over ranks in one all-reduce of a device
    tensor that the diffusion term divides by (no host sync). 0 without an early-step term."""
    if run.cfg.method.objective == "edm" or run.cfg.method.diffusion_weight <= 0:
        return 0
    local = torch.tensor(float(sum(int(p.early.sum()) for p in plans)), device=run.device)
    return dist.all_reduce(local, run.info.world_size)


def finite_or_nan(loss: torch.Tensor) -> torch.Tensor:
    """The loss itself (times exactly 1) where it is finite, else NaN with a NaN gradient for every
    parameter it depends on, decided on the device: a non-finite loss on any rank then makes the
    reduced gradients non-finite on every rank, which skips the update everywhere (never train on
    a non-finite loss) with no vote of our own and no host sync."""
    ok = torch.isfinite(loss.detach())
    return loss * torch.where(ok, torch.ones_like(loss), torch.full_like(loss, float("nan"))).detach()


def condition(run: Run, batch: dict) -> dict:
    """Network condition of a micro-batch: precomputed or on-the-fly token states."""
    if run.cfg.model.cond != "text":
        return {}
    if run.text_encoder is not None:
        return text_condition(run.text_encoder, batch["tokens"])
    return {k: batch[k] for k in ("text_states", "text_mask", "pooled")}


def grads_finite(module: torch.nn.Module) -> bool:
    grads = [p.grad for p in module.parameters() if p.grad is not None]
    if not grads:
        return True
    return bool(torch.isfinite(torch.stack(torch._foreach_norm(grads))).all())


class StopFlags:
    """SIGTERM/SIGINT only set a flag; the loop agrees on it across ranks at step boundaries."""

    def __init__(self):
        self.signal = 0
        for s in (signal.SIGTERM, signal.SIGINT):
            signal.signal(s, self._handle)

    def _handle(self, signum, frame):
        self.signal = signum


def cli() -> None:
    cli_main(main)


if __name__ == "__main__":
    cli()
