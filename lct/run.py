"""A training run and its directory: the `Run` record, the counters, resume, save, export and the
run records (above `lct.checkpoint` and `lct.export`, below `lct.train`).

    run.dir/config.yaml, deepspeed.json, environment.json     written at every start (rank 0)
    run.dir/checkpoints/stepNNNNNNNN/                          `save` (every rank), `load_resume`
    run.dir/export/<ema>/                                      `export` (rank 0, at each save)

Resume is split in two: `find_resume` and `check_resume` read only files (before DeepSpeed starts,
so a run that would be refused is refused at once), `load_resume` loads the engine, the EMAs and
the RNG state.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, replace
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import torch

from lct import checkpoint as ckpt
from lct import dist
from lct.config import TrainConfig, dump_yaml
from lct.data import manifest_path
from lct.dist import DistInfo
from lct.ema import PartitionedEMA
from lct.errors import UserError
from lct.export import export_network, load_network_weights
from lct.files import write_atomic, write_json
from lct.models import load_state_dict_checked


@dataclass(frozen=True)
class TrainState:
    """The counters a checkpoint saves; the loop replaces the state after every step."""

    applied_steps: int = 0        # k of the curriculum: optimizer steps that changed the weights
    data_steps: int = 0           # global batches consumed (applied or skipped)
    images_seen: int = 0
    skipped_steps: int = 0
    resume_count: int = 0
    train_seconds: float = 0.0

    def after_step(self, applied: bool, batch_size: int, train_seconds: float) -> "TrainState":
        return replace(self, applied_steps=self.applied_steps + applied, data_steps=self.data_steps + 1,
                       images_seen=self.images_seen + batch_size * applied,
                       skipped_steps=self.skipped_steps + (not applied), train_seconds=train_seconds)


@dataclass(frozen=True)
class Run:
    """Everything `lct.train.build` makes for one run; the loop changes none of it (the counters
    live in the `TrainState` it carries)."""

    cfg: TrainConfig
    info: DistInfo
    device: torch.device
    micro: int                     # micro-batch per rank
    accum: int                     # gradient-accumulation steps
    manifest: dict
    desc: Any                      # lct.data.DataDescription
    engine: Any                    # the DeepSpeed engine around Precond(TextDiT)
    ema: PartitionedEMA
    objective: Any                 # lct.objectives.Objective
    loader: Any                    # torch DataLoader of micro-batches
    text_encoder: Any              # lct.text.TextEncoder (data.text: on_the_fly) or None
    monitor: Any                   # lct.monitor.Monitor or None (benchmarks)
    logger: Any                    # lct.monitor.RunLogger on rank 0, else None
    faults: Any                    # lct.faults.Faults
    state: TrainState              # where the run starts (after resume)

    @property
    def run_dir(self) -> Path:
        return Path(self.cfg.run.dir)

    @property
    def ckpt_root(self) -> Path:
        return Path(self.cfg.run.dir) / "checkpoints"


# ----------------------------------------------------------------------------------------------
# Resume
# ----------------------------------------------------------------------------------------------


def find_resume(cfg: TrainConfig) -> Path | None:
    """The checkpoint to resume from: `run.resume` auto (newest complete one), never, or a path."""
    mode = cfg.run.resume
    if mode == "never":
        return None
    if mode != "auto":
        p = Path(mode)
        if not (p / ckpt.COMPLETE).is_file():
            raise UserError(f"run.resume={mode}: not a complete checkpoint directory")
        return p.resolve()
    tag = ckpt.newest_complete(Path(cfg.run.dir) / "checkpoints")
    return Path(cfg.run.dir) / "checkpoints" / tag if tag else None


def check_resume(cfg: TrainConfig, info: DistInfo, ckpt_dir: Path) -> dict:
    """The checkpoint's record, refused where it cannot continue this run (world size, a moved
    curriculum); a changed config is listed on rank 0. Reads files only."""
    saved = ckpt.read_state(ckpt_dir)
    if saved["world_size"] != info.world_size:
        raise UserError(
            f"checkpoint {ckpt_dir} was written by {saved['world_size']} ranks, this run has "
            f"{info.world_size}. Convert it with DeepSpeed's universal checkpoint tool "
            f"(python -m deepspeed.checkpoint.ds_to_universal --input_folder {ckpt_dir} "
            f"--output_folder {ckpt_dir}_universal) or resume with {saved['world_size']} ranks")
    old_cfg = saved["config"]
    new_cfg = json.loads(json.dumps(cfg.model_dump(mode="json")))
    if old_cfg["run"]["total_steps"] != cfg.run.total_steps and not cfg.run.allow_total_steps_change:
        raise UserError(
            f"run.total_steps changed from {old_cfg['run']['total_steps']} to {cfg.run.total_steps}: "
            "that moves the curriculum N(k) (SPEC 2.2). Keep it, or pass "
            "run.allow_total_steps_change=true to accept the change")
    changes = [c for c in config_changes(old_cfg, new_cfg) if not c.startswith("run.resume")]
    if changes and info.is_main:
        print("warning: resuming with a changed config:\n  " + "\n  ".join(changes), file=sys.stderr)
    return saved


def load_resume(engine, ema: PartitionedEMA, ckpt_dir: Path, saved: dict, info: DistInfo
                ) -> tuple[TrainState, dict]:
    """Load weights, optimizer and EMAs; returns the state to continue from and this rank's RNG
    state (restored by the caller just before the loop: building the data loader, text tower and
    monitor after this point may draw from the global RNG, which would shift the dropout masks)."""
    engine.load_checkpoint(str(ckpt_dir.parent), tag=ckpt_dir.name, load_module_strict=True,
                           load_optimizer_states=True, load_lr_scheduler_states=False)
    emas = ckpt.load_ema_file(ckpt_dir / "ema.safetensors")
    for name in ema.buffers:
        if name in emas:
            ema.load_state_dict_of(name, emas[name])
        elif info.is_main:
            print(f"warning: EMA {name!r} not in the checkpoint; starting it from the weights", file=sys.stderr)
    rng = torch.load(ckpt_dir / f"rng_rank{info.rank}.pt", weights_only=True)
    state = TrainState(**{k: saved["state"][k] for k in asdict(TrainState())})
    if info.is_main:
        print(f"resumed from {ckpt_dir} at applied step {state.applied_steps}; restored state "
              f"{json.dumps(asdict(state))}", flush=True)
    return replace(state, resume_count=state.resume_count + 1), rng


def init_from(model: torch.nn.Module, path: str, ema_name: str | None, info: DistInfo) -> None:
    """Start from another run's EMA (ECT starts from an EDM run: weights and EMAs, SPEC 2.4)."""
    load_state_dict_checked(model.net, load_network_weights(path, ema_name))
    if info.is_main:
        print(f"initialised the network from {path} (EMA {ema_name or 'sample EMA'})", flush=True)


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
# Save and export
# ----------------------------------------------------------------------------------------------


def save(run: Run, state: TrainState, export_all: bool = False) -> None:
    """Atomic checkpoint on every rank + EMA export; raises the process-group timeout around it.
    A complete checkpoint is never written twice (only its exports are refreshed)."""
    cfg, info, world = run.cfg, run.info, run.info.world_size
    with dist.raised_timeout(world, cfg.run.dist_timeout_minutes * 4, cfg.run.dist_timeout_minutes):
        tag = ckpt.tag_for(state.applied_steps)
        ckpt_dir = run.ckpt_root / tag
        exists = (ckpt_dir / ckpt.COMPLETE).is_file()
        dist.barrier(world)  # every rank has looked before rank 0 may write the marker
        if not exists:
            run.engine.save_checkpoint(str(run.ckpt_root), tag=tag, save_latest=False)
            torch.save(ckpt.rng_state(), ckpt_dir / f"rng_rank{info.rank}.pt")
        emas = {name: run.ema.state_dict_of(name) for name in run.ema.buffers}  # collective
        dist.barrier(world)
        if info.is_main:
            if not exists:
                ckpt.save_ema_file(ckpt_dir / "ema.safetensors", emas)
                record = {"state": asdict(state), "world_size": world,
                          "config": cfg.model_dump(mode="json"), "time": time.time()}
                ckpt.mark_complete(ckpt_dir, record, run.ckpt_root)
                ckpt.rotate(run.ckpt_root, cfg.run.keep_last)
            # An export builds pipeline components (VAE, text tower: random init, then their
            # weights), which must not move the training RNG: it was saved above, and a resumed run
            # must draw the dropout masks an uninterrupted one draws.
            with torch.random.fork_rng(devices=[]):
                for name in (list(emas) if export_all else [cfg.ema.sample]):
                    export_network(run.engine.module, emas[name], run.run_dir / "export" / name, cfg=cfg,
                                   manifest=manifest_record(cfg, run.manifest), ema_name=name,
                                   step=state.applied_steps, images_seen=state.images_seen)
        dist.barrier(world)


def manifest_record(cfg: TrainConfig, manifest: dict) -> dict:
    """What an export keeps of the data's manifest."""
    return {k: manifest.get(k) for k in ("vae", "text", "latent_shape", "resolution", "stats", "format")} | {
        "manifest_path": os.path.abspath(manifest_path(cfg))}


# ----------------------------------------------------------------------------------------------
# Run records
# ----------------------------------------------------------------------------------------------


def write_run_record(cfg: TrainConfig, world_size: int, ds_json: dict) -> None:
    """config.yaml (resolved), deepspeed.json and environment.json of this start (rank 0)."""
    run_dir = Path(cfg.run.dir)
    write_atomic(run_dir / "config.yaml", dump_yaml(cfg))
    write_json(run_dir / "deepspeed.json", ds_json)
    write_json(run_dir / "environment.json", environment_record(world_size))


def environment_record(world_size: int) -> dict:
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
