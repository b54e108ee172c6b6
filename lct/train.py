"""Train a latent text-to-image consistency model (iCT, ECT, iLCT) or its EDM starting point.

    deepspeed lct/train.py --config configs/lct_coco.yaml [dotted.key=value ...]
    torchrun --nproc_per_node 8 lct/train.py --config ...
    python lct/train.py --config ... [--dry-run]

Reads top to bottom: config -> ranks -> data manifest -> network -> DeepSpeed engine -> EMAs ->
resume -> loop (micro-batches, objective, non-finite guard, step, EMA, logs, grids, validation,
checkpoints, preemption) -> final checkpoint and export. Re-running the same command resumes from
the newest complete checkpoint of `run.dir`.
"""

if __name__ == "__main__" and __package__ in (None, ""):  # run as a file: repo root, not lct/, on sys.path
    import pathlib
    import sys

    sys.path[0] = str(pathlib.Path(__file__).resolve().parents[1])

import argparse
import json
import math
import os
import signal
import sys
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from lct.config import ConfigWarning, TrainConfig, dump_yaml, load_config
from lct.errors import UserError, cli_main

EXIT_SIGTERM, EXIT_SIGINT, EXIT_SKIPS = 143, 130, 3


# ----------------------------------------------------------------------------------------------
# Arguments
# ----------------------------------------------------------------------------------------------


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


# ----------------------------------------------------------------------------------------------
# Paths and data description
# ----------------------------------------------------------------------------------------------


def problems_with_paths(cfg: TrainConfig) -> list[str]:
    """Missing inputs: warnings under --dry-run, errors (exit 2) at a real start."""
    from lct.data import expand_urls

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
    if cfg.data.val_shards:
        from lct.data import expand_urls as _e

        if not [u for u in _e(cfg.data.val_shards) if os.path.exists(u)]:
            out.append(f"data.val_shards: nothing found at {cfg.data.val_shards!r}")
    return out


def manifest_path(cfg: TrainConfig) -> str | None:
    """data.manifest, or manifest.json in the shards' folder (data prep writes it there)."""
    if cfg.data.manifest:
        return cfg.data.manifest
    shards = cfg.data.shards.split(",")[0].strip()
    if not shards:
        return None
    if os.path.isdir(shards) or not any(ch in shards for ch in "{*?[") and not shards.endswith((".tar", ".tgz", ".tar.gz")):
        return os.path.join(shards, "manifest.json")
    from lct.data import expand_urls

    urls = expand_urls(shards)
    return os.path.join(os.path.dirname(urls[0]), "manifest.json") if urls else None


@dataclass
class DataDescription:
    """What the network needs to know about the data (from the manifest, or defaults)."""

    latent_shape: tuple[int, int, int] = (4, 32, 32)
    text_dim: int = 512
    text_len: int = 77
    pooled_dim: int = 512
    from_manifest: bool = False


def describe_data(cfg: TrainConfig, manifest: dict | None) -> DataDescription:
    if manifest is None:
        return DataDescription()
    t = manifest.get("text") or {}
    return DataDescription(tuple(manifest["latent_shape"]), int(t.get("state_dim", 512)),
                           int(t.get("context_length", 77)), int(t.get("pooled_dim", 512)), True)


def build_network(cfg: TrainConfig, desc: DataDescription):
    """TextDiT wrapped in the SPEC 1 parameterisation."""
    from lct.models import Precond, build_dit

    net = build_dit(cfg.model, desc.latent_shape, text_dim=desc.text_dim, text_len=desc.text_len,
                    pooled_dim=desc.pooled_dim)
    return Precond(net, sigma_data=cfg.method.sigma_data, sigma_min=cfg.method.sigma_min,
                   time_embed_scale=cfg.method.time_embed_scale)


def flops_per_step(cfg: TrainConfig, desc: DataDescription, model, micro: int) -> float:
    """Model FLOPs of one optimizer step over the global batch, counted on the meta device:
    student forward + backward (3x forward) plus, for consistency objectives, a teacher forward."""
    from torch.utils.flop_counter import FlopCounterMode

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
    forward = counter.get_total_flops() / b
    passes = 3 + (0 if cfg.method.objective == "edm" else 1)
    return forward * passes * cfg.optim.batch_size


def dry_run(cfg: TrainConfig, info) -> int:
    problems = problems_with_paths(cfg)
    for p in problems:
        print(f"warning: would fail at start: {p}", file=sys.stderr)
    manifest = None
    mpath = manifest_path(cfg)
    if mpath and os.path.exists(mpath):
        from lct.latents import load_manifest

        manifest = load_manifest(mpath)
    desc = describe_data(cfg, manifest)
    from lct.engine import deepspeed_config
    from lct.models import count_parameters

    with torch.device("meta"):
        model = build_network(cfg, desc)
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


# ----------------------------------------------------------------------------------------------
# Run directory bookkeeping
# ----------------------------------------------------------------------------------------------


def environment_record(world_size: int) -> dict:
    import platform
    import subprocess
    from importlib.metadata import PackageNotFoundError, version

    repo = Path(__file__).resolve().parents[1]

    def git(*a):
        try:
            return subprocess.run(["git", "-C", str(repo), *a], capture_output=True, text=True,
                                  timeout=10).stdout.strip()
        except Exception:
            return ""

    versions = {}
    for pkg in ("torch", "deepspeed", "diffusers", "open_clip_torch", "webdataset", "POT", "numpy",
                "einops", "pydantic", "lct"):
        try:
            versions[pkg] = version(pkg)
        except PackageNotFoundError:
            versions[pkg] = None
    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return {"git_sha": git("rev-parse", "HEAD") or None, "git_dirty": bool(git("status", "--porcelain")),
            "versions": versions, "python": platform.python_version(), "host": platform.node(),
            "cpu_count": os.cpu_count(), "gpus": gpus, "world_size": world_size,
            "started": time.strftime("%Y-%m-%dT%H:%M:%S")}


def config_changes(old: dict, new: dict, prefix: str = "") -> list[str]:
    out = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            out += config_changes(a, b, f"{prefix}{k}.")
        elif a != b:
            out.append(f"{prefix}{k}: {a!r} -> {b!r}")
    return out


# ----------------------------------------------------------------------------------------------
# Training state
# ----------------------------------------------------------------------------------------------


@dataclass
class TrainState:
    applied_steps: int = 0        # k of the curriculum: optimizer steps that changed the weights
    data_steps: int = 0           # global batches consumed (applied or skipped)
    images_seen: int = 0
    skipped_steps: int = 0
    resume_count: int = 0
    train_seconds: float = 0.0


class StopFlags:
    """SIGTERM/SIGINT only set a flag; the loop agrees on it across ranks at step boundaries."""

    def __init__(self):
        self.signal = 0
        for s in (signal.SIGTERM, signal.SIGINT):
            signal.signal(s, self._handle)

    def _handle(self, signum, frame):
        self.signal = signum


def all_reduce_max(values: list[float], device, world_size: int) -> list[float]:
    if world_size == 1:
        return values
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.tolist()


def all_reduce_sum(t: torch.Tensor, world_size: int) -> torch.Tensor:
    if world_size > 1:
        import torch.distributed as dist

        dist.all_reduce(t)
    return t


def barrier(world_size: int) -> None:
    if world_size > 1:
        import torch.distributed as dist

        dist.barrier()


def poison_loss(module: torch.nn.Module) -> torch.Tensor:
    """A loss whose gradient is NaN for every parameter: makes DeepSpeed's ZeRO overflow check skip
    the step on every rank while its backward hooks and counters run as usual."""
    return sum(p.sum() for p in module.parameters() if p.requires_grad) * float("nan")


def grads_finite(module: torch.nn.Module) -> bool:
    grads = [p.grad for p in module.parameters() if p.grad is not None]
    if not grads:
        return True
    norms = torch._foreach_norm(grads)
    return bool(torch.isfinite(torch.stack(norms)).all())


# ----------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConfigWarning)
        cfg = load_config(args.config, args.overrides)
    from lct.engine import dist_info_from_env

    info = dist_info_from_env(args.local_rank)
    if info.is_main:
        for w in caught:
            print(f"config warning: {w.message}", file=sys.stderr)
    if args.dry_run:
        return dry_run(cfg, info)
    problems = problems_with_paths(cfg)
    if problems:
        raise UserError("; ".join(problems))
    rc = Trainer(cfg, info).run()
    from lct.engine import close_distributed

    close_distributed()  # only after a run every rank finished (errors and signals exit on their own path)
    return rc


class Trainer:
    def __init__(self, cfg: TrainConfig, info):
        self.cfg, self.info = cfg, info

    # The whole run, top to bottom.
    def run(self) -> int:
        if not self.setup():
            return 0
        return self.loop()

    def setup(self, network: torch.nn.Module | None = None, monitor: bool = True) -> bool:
        """Ranks, data, network, engine, EMAs, resume, objective, loader. False if the run is
        already complete. `network` replaces the configured DiT (benchmarks compare others)."""
        cfg, info = self.cfg, self.info
        from lct.data import DataSpec, InMemoryLatents, make_loader, train_shard_urls
        from lct.ema import PartitionedEMA
        from lct.engine import batch_layout, init_distributed, initialize, set_precision
        from lct.faults import Faults
        from lct.latents import SampleLayout, latent_stats, load_manifest
        from lct.objectives import make_objective

        # Ranks, devices, precision.
        self.micro, self.accum = batch_layout(cfg, info.world_size)
        self.device = device = init_distributed(info, cfg.run.dist_timeout_minutes)
        set_precision(cfg.precision)
        if device.type == "cpu" and "OMP_NUM_THREADS" not in os.environ:
            # CPU ranks share the cores; oversubscribed threads make small matmuls many times slower.
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // info.local_world_size))
        torch.manual_seed(cfg.run.seed + info.rank)  # dropout masks; saved and restored on resume
        self.run_dir = Path(cfg.run.dir)
        self.ckpt_root = self.run_dir / "checkpoints"
        if info.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)

        # Data description and the network.
        self.manifest = manifest = load_manifest(manifest_path(cfg))
        self.desc = desc = describe_data(cfg, manifest)
        self.check_text_compatibility(manifest)
        urls, note = train_shard_urls(cfg.data.shards, manifest)  # data.shards vs the manifest's shard list
        if note and info.is_main:
            print(note, file=sys.stderr, flush=True)
        model = (network if network is not None else build_network(cfg, desc)).to(device)
        if cfg.model.init_from:
            self.init_from(model, cfg.model.init_from, cfg.model.init_ema)
        self.engine, ds_json = initialize(model, cfg, info.world_size)
        halflives = {e.name: e.resolved_halflife() for e in cfg.ema.models}
        self.ema = PartitionedEMA(self.engine.module, halflives, info.rank, info.world_size)

        # Resume from the newest complete checkpoint, or start.
        self.state = TrainState()
        resume_tag = self.find_resume(self.ckpt_root)
        if resume_tag:
            self.state = self.resume(self.engine, self.ema, self.ckpt_root, resume_tag)
        barrier(info.world_size)
        if info.is_main:
            self.write_run_record(self.run_dir, ds_json)
        if self.state.applied_steps >= cfg.run.total_steps:
            if info.is_main:
                print(f"run {self.run_dir} is complete at step {self.state.applied_steps} of "
                      f"{cfg.run.total_steps}; nothing to do (raise run.total_steps with "
                      "run.allow_total_steps_change=true to go on)")
            return False

        # Objective and data.
        self.objective = make_objective(cfg.method, desc.latent_shape, cfg.run.total_steps)
        mean, std = latent_stats(manifest, cfg.data.latent_norm)
        text_mode = "none" if cfg.model.cond != "text" else cfg.data.text
        spec = DataSpec(urls=urls, mode=cfg.data.mode, seed=cfg.run.seed,
                        rank=info.rank, world_size=info.world_size, micro_batch=self.micro, accum=self.accum,
                        latent_shape=desc.latent_shape, norm_mean=mean.astype("float32"),
                        norm_std=std.astype("float32"), caption_dropout=cfg.data.caption_dropout,
                        flip=cfg.data.flip, text=text_mode,
                        ot=cfg.method.ot and cfg.method.objective != "edm",
                        shuffle_buffer=cfg.data.shuffle_buffer, resume_count=self.state.resume_count,
                        layout=SampleLayout.from_manifest(manifest))
        memory = InMemoryLatents(spec.urls, spec.layout, quiet=not info.is_main) if cfg.data.mode == "indexed" else None
        remaining = cfg.run.total_steps - self.state.applied_steps
        # Skipped steps consume data too; leave room for the allowed number of them.
        self.loader = make_loader(spec, self.state.data_steps, remaining + cfg.run.max_consecutive_skips * 4,
                                  cfg.data.num_workers, cfg.data.prefetch_factor, device.type == "cuda", memory)
        self.text_encoder = self.make_text_encoder(manifest, device) if text_mode == "on_the_fly" else None
        self.monitor = self.make_monitor(self.engine, self.ema, manifest, desc, device) if monitor else None
        self.logger = self.make_logger(self.run_dir) if info.is_main else None
        self.faults = Faults()
        self.buckets = cfg.val.buckets
        self.acc = torch.zeros(2 + 2 * self.buckets, dtype=torch.float64, device=device)  # loss sums, counts
        self.extra: dict = {}
        if getattr(self, "rng_to_restore", None) is not None:
            from lct import checkpoint as ckpt

            ckpt.set_rng_state(self.rng_to_restore)
        return True

    def train_step(self, step_batches: list[dict], timer=None) -> bool:
        """One optimizer step over this rank's micro-batches; True if the update was applied.
        `timer` (lct.timing.PhaseTimer) times its phases for benchmarks."""
        from lct.data import to_device
        from lct.engine import learning_rate
        from lct.objectives import sigma_buckets
        from lct.timing import no_timer

        cfg, info, engine, objective, state = self.cfg, self.info, self.engine, self.objective, self.state
        timer = timer or no_timer
        step, data_step, world, accum = state.applied_steps, state.data_steps, info.world_size, self.accum
        self.lr = learning_rate(cfg, step)
        for g in engine.optimizer.param_groups:
            g["lr"] = self.lr
        state.data_steps += 1
        objective.timer = timer

        # |S| of the early-step diffusion term over the global batch of this step (SPEC 5).
        early = sum(int(objective.early_mask(b, step).sum()) for b in step_batches)
        early_global = int(all_reduce_sum(torch.tensor([early], device=self.device), world).item())

        bad = False
        for b in step_batches:
            with timer("to_device"):
                b = to_device(b, self.device)
                b["cond"] = self.condition(b, self.text_encoder)
            loss, diag = objective(engine, b, step, early_global, grad_scale=world * accum)
            loss = self.faults.loss(loss, data_step, info.rank)
            finite = torch.isfinite(loss.detach()).double()
            finite = all_reduce_sum(finite.reshape(1), world).item() == world
            with timer("backward"):
                if finite and not bad:
                    engine.backward(loss)
                else:  # every rank skips this step's update (never train on a non-finite loss)
                    bad = True
                    engine.backward(poison_loss(engine.module))
            if engine.is_gradient_accumulation_boundary() and cfg.distributed.zero_stage == 0:
                # ZeRO-0 in fp32 has no overflow check: inspect the reduced gradients ourselves.
                ok = all_reduce_sum(torch.tensor([float(grads_finite(engine.module))], device=self.device),
                                    world).item() == world
                if bad or not ok:
                    bad = True
                    engine.optimizer.zero_grad(set_to_none=True)
            with timer("optimizer"):
                engine.step()
            with torch.no_grad():
                idx = sigma_buckets(diag.sigma, self.buckets, cfg.method.sigma_min or 0.002, cfg.method.sigma_max)
                if torch.isfinite(diag.loss).all():
                    nb, acc = self.buckets, self.acc
                    acc[0] += diag.loss.sum().double()
                    acc[1] += diag.loss.numel()
                    acc[2:2 + nb].index_add_(0, idx, diag.loss.double())
                    acc[2 + nb:].index_add_(0, idx, torch.ones_like(diag.loss, dtype=torch.float64))
            if (step + 1) % cfg.run.log_every == 0:
                self.extra = diag.scalars()

        applied = not bad and engine.was_step_applied()
        if applied:
            with timer("ema"):
                state.applied_steps += 1
                state.images_seen += cfg.optim.batch_size
                self.ema.update(engine.module, cfg.optim.batch_size)
        else:
            state.skipped_steps += 1
        return applied

    def loop(self) -> int:
        from lct.data import SkipTally, skip_record

        cfg, info, state = self.cfg, self.info, self.state
        engine, ema, logger, monitor = self.engine, self.ema, self.logger, self.monitor
        flags = StopFlags()
        consecutive_skips, last_log, t_start = 0, time.time(), time.time() - state.train_seconds
        images_at_log = state.images_seen
        pbar = self.progress(state)
        batches = iter(self.loader)
        skips = SkipTally()  # samples the data path skipped, per reason (lct.data.SKIP_REASONS)
        exit_code = 0
        while state.applied_steps < cfg.run.total_steps:
            step = state.applied_steps
            step_batches = [next(batches) for _ in range(self.accum)]
            skips.update(step_batches)
            applied = self.train_step(step_batches)
            if applied:
                consecutive_skips = 0
            else:
                consecutive_skips += 1
                if info.is_main:
                    print(f"step {step}: non-finite loss or gradient, update skipped "
                          f"({consecutive_skips} in a row)", file=sys.stderr, flush=True)
                if consecutive_skips >= cfg.run.max_consecutive_skips:
                    if info.is_main:
                        print(f"error: {consecutive_skips} consecutive non-finite steps; stopping. "
                              f"The last good checkpoint in {self.ckpt_root} is kept.", file=sys.stderr)
                    exit_code = EXIT_SKIPS
                    break
            state.train_seconds = time.time() - t_start
            if pbar:
                pbar.update(int(applied))

            # Logs, grids, validation, checkpoints (at applied-step boundaries).
            k = state.applied_steps
            if applied and k % cfg.run.log_every == 0:
                all_reduce_sum(self.acc, info.world_size)
                now = time.time()
                ips = (state.images_seen - images_at_log) / max(now - last_log, 1e-9)
                record = self.log_record(state, step, self.acc, self.buckets, self.lr, ips, self.extra,
                                         engine, self.objective)
                record.update(skip_record(all_reduce_sum(skips.vector(self.device), info.world_size)))
                if logger:
                    logger(record)
                if pbar:
                    pbar.set_postfix(loss=f"{record['loss']:.4g}", img_s_gpu=f"{ips / info.world_size:.1f}",
                                     **({"N": record["N"]} if "N" in record else {}),
                                     **({"stage": record["stage"]} if "stage" in record else {}),
                                     **({"c": f"{record['c']:.3g}"} if "c" in record else {}),
                                     **({"skipped": record["data_skipped"]} if record["data_skipped"] else {}))
                self.acc.zero_()
                last_log, images_at_log = now, state.images_seen
            if monitor and applied:
                monitor.maybe_run(k, logger)

            time_up = bool(cfg.run.time_budget_minutes and state.train_seconds > 60 * cfg.run.time_budget_minutes)
            sig, time_up = all_reduce_max([float(flags.signal), float(time_up)], self.device, info.world_size)
            if sig or time_up or (applied and k % cfg.run.save_every == 0):
                self.save(engine, ema, self.ckpt_root, state)
                self.faults.after_save(k)
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

        if pbar:
            pbar.close()
        if exit_code == 0 and state.applied_steps >= cfg.run.total_steps:
            self.save(engine, ema, self.ckpt_root, state, export_all=True)
            if monitor:
                monitor.maybe_run(state.applied_steps, logger, force=True)
        if logger:
            logger.close()
        barrier(info.world_size)
        return exit_code

    # ------------------------------------------------------------------------------------------
    # Pieces of the run
    # ------------------------------------------------------------------------------------------

    def check_text_compatibility(self, manifest: dict) -> None:
        """The trainer refuses a text model or tokenizer that differs from the manifest's."""
        cfg = self.cfg
        if cfg.model.cond != "text":
            return
        t = manifest.get("text") or {}
        for key in ("model", "pretrained"):
            want = getattr(cfg.text, key)
            if want is not None and t.get(key) is not None and str(want) != str(t.get(key)):
                raise UserError(f"text.{key}={want!r} differs from the data's {t.get(key)!r} "
                                f"(manifest); token ids and states must come from the same text tower")

    def make_text_encoder(self, manifest: dict, device):
        from lct.text import TextEncoder

        enc = TextEncoder.from_manifest(manifest, device=device,
                                        model=self.cfg.text.model, pretrained=self.cfg.text.pretrained)
        want = (manifest.get("text") or {}).get("tokenizer")
        if want and enc.identity() != want:
            raise UserError("the text tower's tokenizer differs from the one the shards were "
                            f"tokenised with: {enc.identity()} vs manifest {want}")
        return enc

    def condition(self, batch: dict, text_encoder) -> dict:
        """Network condition of a micro-batch: precomputed or on-the-fly token states."""
        if self.cfg.model.cond != "text":
            return {}
        if text_encoder is not None:
            with torch.no_grad():
                states, mask, pooled = text_encoder(batch["tokens"])
            return {"text_states": states, "text_mask": mask, "pooled": pooled}
        return {"text_states": batch["text_states"], "text_mask": batch["text_mask"],
                "pooled": batch["pooled"]}

    def init_from(self, model, path: str, ema_name: str | None) -> None:
        """Start from another run's EMA (ECT starts from an EDM run: weights and EMAs, SPEC 2.4)."""
        from lct.export import load_network_weights

        state = load_network_weights(path, ema_name)
        from lct.models import load_state_dict_checked

        load_state_dict_checked(model.net, state)
        if self.info.is_main:
            print(f"initialised the network from {path} (EMA {ema_name or 'sample EMA'})", flush=True)

    def find_resume(self, ckpt_root: Path) -> str | None:
        from lct import checkpoint as ckpt

        mode = self.cfg.run.resume
        if mode == "never":
            return None
        if mode != "auto":
            p = Path(mode)
            if not (p / ckpt.COMPLETE).is_file():
                raise UserError(f"run.resume={mode}: not a complete checkpoint directory")
            return str(p.resolve())
        return ckpt.newest_complete(ckpt_root)

    def resume(self, engine, ema, ckpt_root: Path, tag: str) -> TrainState:
        from lct import checkpoint as ckpt

        cfg, info = self.cfg, self.info
        ckpt_dir = Path(tag) if os.path.isabs(tag) else ckpt_root / tag
        saved = ckpt.read_state(ckpt_dir)
        if saved["world_size"] != info.world_size:
            raise UserError(
                f"checkpoint {ckpt_dir} was written by {saved['world_size']} ranks, this run has "
                f"{info.world_size}. Convert it with DeepSpeed's universal checkpoint tool "
                f"(python -m deepspeed.checkpoint.ds_to_universal --input_folder {ckpt_dir} "
                f"--output_folder {ckpt_dir}_universal) or resume with {saved['world_size']} ranks")
        old_cfg = saved["config"]
        new_cfg = json.loads(json.dumps(self.cfg.model_dump(mode="json")))
        if old_cfg["run"]["total_steps"] != cfg.run.total_steps and not cfg.run.allow_total_steps_change:
            raise UserError(
                f"run.total_steps changed from {old_cfg['run']['total_steps']} to {cfg.run.total_steps}: "
                "that moves the curriculum N(k) (SPEC 2.2). Keep it, or pass "
                "run.allow_total_steps_change=true to accept the change")
        changes = [c for c in config_changes(old_cfg, new_cfg) if not c.startswith("run.resume")]
        if changes and info.is_main:
            print("warning: resuming with a changed config:\n  " + "\n  ".join(changes), file=sys.stderr)
        engine.load_checkpoint(str(ckpt_dir.parent), tag=ckpt_dir.name, load_module_strict=True,
                               load_optimizer_states=True, load_lr_scheduler_states=False)
        emas = ckpt.load_ema_file(ckpt_dir / "ema.safetensors")
        for name in ema.buffers:
            if name in emas:
                ema.load_state_dict_of(name, emas[name])
            elif info.is_main:
                print(f"warning: EMA {name!r} not in the checkpoint; starting it from the weights",
                      file=sys.stderr)
        # Restored just before the loop: building the data loader, text tower and monitor after
        # this point may draw from the global RNG, which would shift the dropout masks.
        self.rng_to_restore = torch.load(ckpt_dir / f"rng_rank{info.rank}.pt", weights_only=True)
        st = TrainState(**{k: saved["state"][k] for k in asdict(TrainState())})
        if info.is_main:
            print(f"resumed from {ckpt_dir} at applied step {st.applied_steps}; restored state "
                  f"{json.dumps(asdict(st))}", flush=True)
        st.resume_count += 1
        return st

    def save(self, engine, ema, ckpt_root: Path, state: TrainState, export_all: bool = False) -> None:
        """Atomic checkpoint on every rank + EMA export; raises the process-group timeout around it.
        A complete checkpoint is never written twice (only its exports are refreshed)."""
        from lct import checkpoint as ckpt

        info, cfg = self.info, self.cfg
        with raised_timeout(info.world_size, cfg.run.dist_timeout_minutes * 4, cfg.run.dist_timeout_minutes):
            tag = ckpt.tag_for(state.applied_steps)
            ckpt_dir = ckpt_root / tag
            exists = (ckpt_dir / ckpt.COMPLETE).is_file()
            barrier(info.world_size)  # every rank has looked before rank 0 may write the marker
            if not exists:
                engine.save_checkpoint(str(ckpt_root), tag=tag, save_latest=False)
                torch.save(ckpt.rng_state(), ckpt_dir / f"rng_rank{info.rank}.pt")
            emas = {name: ema.state_dict_of(name) for name in ema.buffers}  # collective
            barrier(info.world_size)
            if info.is_main:
                if not exists:
                    ckpt.save_ema_file(ckpt_dir / "ema.safetensors", emas)
                    record = {"state": asdict(state), "world_size": info.world_size,
                              "config": cfg.model_dump(mode="json"), "time": time.time()}
                    ckpt.mark_complete(ckpt_dir, record, ckpt_root)
                    ckpt.rotate(ckpt_root, cfg.run.keep_last)
                names = list(emas) if export_all else [cfg.ema.sample]
                for name in names:
                    self.export(engine, emas[name], name, state)
            barrier(info.world_size)

    def export(self, engine, ema_state: dict, name: str, state: TrainState) -> None:
        from lct.export import export_network

        export_network(engine.module, ema_state, Path(self.cfg.run.dir) / "export" / name,
                       cfg=self.cfg, manifest=self.manifest_record(), ema_name=name,
                       step=state.applied_steps)

    def manifest_record(self) -> dict:
        from lct.latents import load_manifest

        m = load_manifest(manifest_path(self.cfg))
        return {k: m.get(k) for k in ("vae", "text", "latent_shape", "resolution", "stats", "format")} | {
            "manifest_path": os.path.abspath(manifest_path(self.cfg))}

    def write_run_record(self, run_dir: Path, ds_json: dict) -> None:
        from lct.checkpoint import write_atomic

        write_atomic(run_dir / "config.yaml", dump_yaml(self.cfg))
        write_atomic(run_dir / "deepspeed.json", json.dumps(ds_json, indent=1))
        write_atomic(run_dir / "environment.json", json.dumps(environment_record(self.info.world_size), indent=1))

    def make_monitor(self, engine, ema, manifest, desc, device):
        from lct.monitor import Monitor

        return Monitor.create(self.cfg, self.info, engine, ema, manifest, desc, device)

    def make_logger(self, run_dir: Path):
        from lct.monitor import RunLogger

        return RunLogger(run_dir, self.cfg)

    def progress(self, state: TrainState):
        if not self.info.is_main:
            return None
        from tqdm import tqdm

        return tqdm(total=self.cfg.run.total_steps, initial=state.applied_steps, unit="step",
                    dynamic_ncols=True, desc=f"{self.cfg.method.objective}", file=sys.stdout)

    def log_record(self, state, step, acc, buckets, lr, ips, extra, engine, objective) -> dict:
        """One stats.jsonl line; curriculum values are those the last update trained with."""
        loss = (acc[0] / acc[1].clamp_min(1)).item()
        sums, counts = acc[2:2 + buckets], acc[2 + buckets:]
        per_bucket = (sums / counts.clamp_min(1)).tolist()
        cur = objective.curriculum(step)
        record = {"step": state.applied_steps, "images": state.images_seen, "loss": loss, "lr": lr,
                  "images_per_s": ips, "images_per_s_per_gpu": ips / self.info.world_size,
                  "skipped_steps": state.skipped_steps, "data_steps": state.data_steps,
                  "train_seconds": state.train_seconds,
                  "loss_bucket": [v if c > 0 else None for v, c in zip(per_bucket, counts.tolist())]}
        if cur.num_points is not None:
            record["N"] = cur.num_points
        if cur.stage is not None:
            record["stage"] = cur.stage
        if self.cfg.method.objective != "edm":
            record["c"] = cur.c
        for k in ("rms_sqrt_m", "frac_m_gt_2c2", "diffusion_term", "early_local"):
            if k in extra:
                record[k] = extra[k]
        gn = engine.get_global_grad_norm() if hasattr(engine, "get_global_grad_norm") else None
        if gn is not None:
            record["grad_norm"] = float(gn)
        if torch.cuda.is_available():
            record["max_memory_gb"] = torch.cuda.max_memory_allocated() / 2**30
        return record


class raised_timeout:
    """Raise the process-group timeout around slow collective sections (sampling, saving): a
    rank that is still writing a large checkpoint must not make the others time out."""

    def __init__(self, world_size: int, minutes: float, normal_minutes: float):
        self.world_size, self.minutes, self.normal = world_size, minutes, normal_minutes

    def _set(self, minutes: float) -> None:
        if self.world_size > 1:
            import datetime

            import torch.distributed as dist

            dist.distributed_c10d.set_timeout(datetime.timedelta(minutes=minutes))

    def __enter__(self):
        self._set(self.minutes)
        return self

    def __exit__(self, *exc):
        self._set(self.normal)
        return False


def cli() -> None:
    cli_main(main)


if __name__ == "__main__":
    cli()
