"""Train a latent text-to-image consistency model (iCT, ECT, iLCT) or its EDM starting point.

    deepspeed lct/train.py --config configs/lct_coco.yaml [dotted.key=value ...]
    torchrun --nproc_per_node 8 lct/train.py --config ...
    python lct/train.py --config ... [--dry-run]

Reads top to bottom: `main` (config -> run-directory lock -> `lct.preflight` -> `build` -> `loop`)
-> `train_step` (plan, early-set count, micro-batches, non-finite guard, optimizer, EMA; no host
sync of its own). `build` makes one frozen `Run` (ranks, network, DeepSpeed engine, EMAs, resume,
objective, data, monitor); `loop` steps, logs, saves at one place and stops where `lct.stop`
says. Start checks are `lct.preflight`, the dry run `lct.dry_run`, networks `lct.models.build`,
resume, save and exports `lct.run`. Re-running the same command resumes from the newest complete
checkpoint of `run.dir`.
"""

if __name__ == "__main__" and __package__ in (None, ""):  # run as a file: repo root, not lct/, on sys.path
    import pathlib
    import sys

    sys.path[0] = str(pathlib.Path(__file__).resolve().parents[1])

import argparse
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from lct import checkpoint as ckpt
from lct import dist, rng
from lct.config import TrainConfig, check_train_config, load_config
from lct.buckets import bucket_spec
from lct.data import DataSpec, InMemoryLatents, SkipTally, make_loader, to_device, token_ids
from lct.dist import DistInfo
from lct.dry_run import dry_run
from lct.ema import PartitionedEMA
from lct.engine import initialize, learning_rate, set_precision
from lct.errors import UserError, cli_main
from lct.faults import Faults
from lct.latents import SampleLayout
from lct.models.build import build_network
from lct.monitor import LossMeter, Monitor, Progress, RunLogger
from lct.objectives import Curriculum, Diagnostics, make_objective
from lct.preflight import Start, peek_manifest, preflight
from lct.run import (Run, TrainState, init_from, load_resume, lock_run_dir, make_universal, needs_universal,
                     prepare_run_dir, refresh_exports, save, write_run_record)
from lct.stop import EXIT_SIGINT, PEERS, Stopper, data_workers, fail, invocation_start
from lct.text import text_condition
from lct.timing import no_timer
from lct.vae import LatentNorm


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="lct/train.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", required=True, help="YAML config (see configs/)")
    p.add_argument("--dry-run", action="store_true",
                   help="make every check a start makes (paths, data, text tower, VAE, resume state), print "
                        "sizes, FLOPs, memory and data figures, exit (2 if a start would fail)")
    p.add_argument("--no-timing", action="store_true",
                   help="with --dry-run: skip the measured time per step (a few steps of the network)")
    p.add_argument("--world-size", type=int, default=None,
                   help="with --dry-run: plan for this many ranks (default: the launcher's)")
    # deepspeed passes --local_rank=N; newer launchers only set LOCAL_RANK (preferred).
    p.add_argument("--local_rank", "--local-rank", dest="local_rank", type=int, default=None,
                   help=argparse.SUPPRESS)
    p.add_argument("overrides", nargs="*", help="dotted.key=value overrides")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    started = invocation_start()
    args = parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    info = DistInfo.from_env(args.local_rank)
    if args.world_size is not None:
        if args.world_size < 1:
            raise UserError(f"--world-size {args.world_size}: give the number of ranks to plan for (>= 1)")
        if not args.dry_run:
            raise UserError("--world-size plans a run under --dry-run; a start takes its ranks from the launcher")
        info = DistInfo(world_size=args.world_size, local_world_size=min(args.world_size, 8))
    if info.is_main:
        for w in check_train_config(cfg, info.world_size, manifest=peek_manifest(cfg), cuda=torch.cuda.is_available()):
            print(f"config warning: {w}", file=sys.stderr)
    if args.dry_run:
        return dry_run(cfg, info, measure=not args.no_timing)
    lock = lock_run_dir(cfg, info)  # held until this process ends: one trainer per run.dir
    try:
        start = preflight(cfg, info)
        if info.is_main:
            for note in start.notes:
                print(f"warning: {note}", file=sys.stderr, flush=True)
        prepare_run_dir(cfg, info)
        if start.saved and start.saved["state"]["applied_steps"] >= cfg.run.total_steps:
            return finish_complete(cfg, info, start)
        try:
            run = build(cfg, info, start)
            rc = loop(run, started) if run is not None else 0
        except Exception as err:  # the data workers have ended (loop): one line, the other ranks told
            return fail(cfg, info, err)
    except KeyboardInterrupt:  # Ctrl-C before the loop: nothing trained yet, nothing to save
        print("interrupted before training started; nothing to save", file=sys.stderr, flush=True)
        return EXIT_SIGINT
    finally:
        PEERS.stop()
        lock.release()
    dist.close()  # only after a run every rank finished (errors and signals exit on their own path)
    return rc


def finish_complete(cfg: TrainConfig, info: DistInfo, start: Start) -> int:
    """A run whose newest checkpoint is its last step: re-make missing or stale final exports (a
    kill between the checkpoint and the export) from the checkpoint, on rank 0, without DeepSpeed."""
    step = start.saved["state"]["applied_steps"]
    if info.is_main:
        remade = refresh_exports(cfg, build_network(cfg, start.desc, start.manifest), start.manifest, start.resume)
        if remade:
            print(f"re-made the final export(s) {', '.join(remade)} of step {step} from {start.resume}",
                  file=sys.stderr, flush=True)
        print(f"run {cfg.run.dir} is complete at step {step} of {cfg.run.total_steps}; nothing to do "
              "(raise run.total_steps with run.allow_total_steps_change=true to go on)", flush=True)
    return 0


def build(cfg: TrainConfig, info: DistInfo, start: Start, network: torch.nn.Module | None = None,
          monitor: bool = True) -> Run | None:
    """Ranks, network, engine, EMAs, resume, objective, data, monitor; None if the run is already
    complete. `network` replaces the configured one (benchmarks compare others). The order of the
    steps that draw from the global RNG (network init, text tower) is part of the results."""
    device = dist.pick_device("auto", info.local_rank)
    dist.init(info, device, cfg.run.dist_timeout_minutes, deepspeed=True)
    PEERS.start(info)  # from here a failing rank makes the others leave (lct.stop)
    set_precision(cfg.precision)
    if device.type == "cpu" and "OMP_NUM_THREADS" not in os.environ:
        # CPU ranks share the cores; oversubscribed threads make small matmuls many times slower.
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // info.local_world_size))
    torch.manual_seed(rng.seed_int(rng.Stream.TORCH_GLOBAL, cfg.run.seed, info.rank))  # init, dropout; saved
    if info.is_main:
        Path(cfg.run.dir).mkdir(parents=True, exist_ok=True)

    model = (network if network is not None else build_network(cfg, start.desc, start.manifest)).to(device)
    if cfg.model.init_from:
        init_from(model, cfg.model.init_from, cfg.model.init_ema, info)
    universal = needs_universal(start.saved, info)  # another world size: load a universal checkpoint
    if universal:
        make_universal(cfg, info, start.resume)
    engine, ds_json = initialize(model, cfg, info.world_size, load_universal=universal)
    ckpt.enable_universal(engine)
    ema = PartitionedEMA(engine.module, {e.name: e.resolved_halflife() for e in cfg.ema.models},
                         info.rank, info.world_size)
    state, rng_state = TrainState(), None
    if start.resume:
        state, rng_state = load_resume(engine, ema, start.resume, start.saved, info, cfg.run.trust_checkpoint_code)
    dist.barrier(info.world_size)
    if info.is_main:
        write_run_record(cfg, info.world_size, ds_json)
    if state.applied_steps >= cfg.run.total_steps:
        if info.is_main:
            print(f"run {cfg.run.dir} is complete at step {state.applied_steps} of {cfg.run.total_steps}; "
                  "nothing to do (raise run.total_steps with run.allow_total_steps_change=true to go on)")
        return None

    text_mode = "none" if cfg.model.cond != "text" else cfg.data.text
    text = start.text.to(device) if start.text is not None else None
    spec = DataSpec(urls=list(start.urls), mode=cfg.data.mode, seed=cfg.run.seed, rank=info.rank,
                    world_size=info.world_size, micro_batch=start.micro, accum=start.accum,
                    latent_shape=start.desc.latent_shape, norm=LatentNorm.from_manifest(start.manifest, cfg.data.latent_norm),
                    caption_dropout=cfg.data.caption_dropout, flip=cfg.data.flip, text=text_mode,
                    ot=cfg.method.ot and cfg.method.objective != "edm", shuffle_buffer=cfg.data.shuffle_buffer,
                    resume_count=state.resume_count, layout=SampleLayout.from_manifest(start.manifest),
                    posterior=cfg.data.posterior, **token_ids(start.manifest), **bucket_spec(start.manifest))
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
              text_encoder=text if text_mode == "on_the_fly" else None,
              monitor=Monitor(cfg, info, engine, ema, start.manifest, start.desc, device, text=text,
                              vae=start.vae) if monitor else None,
              logger=RunLogger(Path(cfg.run.dir), cfg, state.applied_steps) if info.is_main else None,
              faults=Faults(), state=state)
    if rng_state is not None:
        ckpt.set_rng_state(rng_state)  # last: building the loader, text tower and monitor may draw
    return run


def loop(run: Run, started: float | None = None) -> int:
    """Steps until `lct.stop.Stopper` says stop (the run's end, a signal or a launcher gone, the
    time budget from `started`, a streak of skipped steps); saves at one place; returns the exit code."""
    cfg, info, state = run.cfg, run.info, run.state
    stopper = Stopper(cfg, info, run.device, started)
    meter = LossMeter(cfg, run.device, info.world_size, state.images_seen)
    progress = Progress(cfg, info, state.applied_steps)
    tally = SkipTally()  # samples the data path skipped, per reason (lct.data.SKIP_REASONS)
    t_start, saved_at = time.time() - state.train_seconds, None
    with data_workers(run.loader) as batches:  # ended on any exit, an exception's too
        while True:
            step_batches = [next(batches) for _ in range(run.accum)]
            tally.update(step_batches)
            result = train_step(run, step_batches, state)
            state = state.after_step(result.applied, cfg.optim.batch_size, time.time() - t_start)
            meter.add(result.diagnostics)
            progress.update(result.applied)
            k = state.applied_steps
            if result.applied and k % cfg.run.log_every == 0:
                record = meter.record(state, result.lr, result.curriculum, run.engine, tally)  # collective
                if run.logger:
                    run.logger(record)
                progress.show(record)
            stop = stopper.poll(state, result.applied)  # first: end, signals, budget, skips (one all-reduce)
            if stop.save or (result.applied and k % cfg.run.save_every == 0):
                with stopper.saving():
                    saved_at = save(run, state, export=not stop.quick, export_all=stop.final)
                run.faults.after_save(k)
            if run.monitor and result.applied and not stop.quick:  # after the save: a failing grid costs no training
                run.monitor.maybe_run(k, run.logger, force=stop.final)
            if stop:
                break
    progress.close()
    stopper.report(stop, state, saved_at, run.run_dir)
    if run.logger:
        run.logger.close()
    dist.barrier(info.world_size)
    return stop.code


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
    the gradients themselves (`finite_or_nan` makes them NaN on every rank once reduced). ZeRO-1/2:
    DeepSpeed drops a step whose all-reduced global gradient norm is not finite
    (`zero_optimization.compute_grad_norm`, set in lct.engine; its fp16/bf16 overflow check is off,
    lct enables neither), the step's one host sync; ZeRO-0: `grads_finite` on the reduced gradients."""
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


def cli() -> None:
    cli_main(main)


if __name__ == "__main__":
    cli()
