"""A training run and its directory: the `Run` record, the counters, resume, save, export and the
run records (above `lct.checkpoint` and `lct.export`, below `lct.train`).

    run.dir/config.yaml, deepspeed.json, environment.json     written at every start (rank 0)
    run.dir/checkpoints/stepNNNNNNNN/                          `save` (every rank), `load_resume`
    run.dir/export/<ema>/                                      `export` (rank 0, at each save)

    run.dir/locks/rank<r>.lock                                 held by every rank for the run's life

Resume is split in two: `find_resume` and `check_resume` read only files (before DeepSpeed starts,
so a run that would be refused is refused at once; a damaged checkpoint is set aside and the
previous one used), `load_resume` loads the engine (from a universal checkpoint when the world
size changed), the EMAs and the RNG state. `lock_run_dir` keeps a second trainer out of a run
directory; `prepare_run_dir` (rank 0, before DeepSpeed) moves a previous run aside for
`run.resume=never` and removes what interrupted saves left.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, replace
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import torch

from lct import checkpoint as ckpt
from lct import dist, models
from lct import rng as lct_rng  # `rng` names RNG states here
from lct.config import TrainConfig, dump_yaml
from lct.data import manifest_path
from lct.dist import DistInfo
from lct.ema import PartitionedEMA
from lct.errors import UserError
from lct.export import export_network, load_network_weights
from lct.files import write_atomic, write_json
from lct.shards import FileLock


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


def lock_run_dir(cfg: TrainConfig, info: DistInfo) -> FileLock:
    """Every rank holds `run.dir/locks/rank<r>.lock` (a kernel lock: released on any exit, also
    kill -9) for the run's life, so a second trainer on the same run.dir is refused on each of
    its ranks before any work."""
    d = Path(cfg.run.dir)
    if d.exists() and not d.is_dir():
        raise UserError(f"run.dir={d} is a file, not a directory: set run.dir to a directory")
    lock = FileLock(d / "locks" / f"rank{info.rank}.lock")
    try:
        got = lock.acquire(wait=False)
    except OSError as err:
        raise UserError(f"run.dir={d}: cannot create its lock file ({err.strerror}): "
                        "set run.dir to a writable directory") from None
    if not got:
        raise UserError(f"run.dir={d} is in use by another trainer ({lock.describe()}); two runs in one "
                        "directory overwrite each other: stop that one or set run.dir to another directory")
    return lock


def find_resume(cfg: TrainConfig, info: DistInfo | None = None, set_aside: bool = True) -> Path | None:
    """The checkpoint to resume from: `run.resume` auto (the newest complete one that passes
    `checkpoint.problems`, content hashes included: a damaged one is named in one line, moved to
    checkpoints/damaged/ by rank 0 when `set_aside`, and the previous one used; none usable left
    where there were some is a `UserError`, never a silent start from step 0), never, or a path
    (which must pass)."""
    mode, trust = cfg.run.resume, cfg.run.trust_checkpoint_code
    if mode == "never":
        return None
    if mode != "auto":
        p = Path(mode)
        if (p / "zero").is_dir() and not (p / "lct_state.json").is_file():
            raise UserError(f"run.resume={mode} is a universal checkpoint without lct's state: pass the "
                            "original checkpoint folder (lct converts it itself when the world size changed)")
        problem = ckpt.problems(p, trust)
        if problem:
            raise UserError(f"run.resume={mode}: not a usable checkpoint ({problem})")
        return p.resolve()
    main = info is None or info.is_main
    root = Path(cfg.run.dir) / "checkpoints"
    damaged = []
    for tag in reversed(ckpt.complete_tags(root)):
        problem = ckpt.problems(root / tag, trust)
        if problem is None:
            return root / tag
        damaged.append(tag)
        if main:
            where = ""
            if set_aside:
                try:
                    where = f"; moved to {ckpt.set_aside(root / tag, root)}"
                except OSError:
                    pass
            print(f"warning: checkpoint {root / tag} is damaged ({problem}){where}; trying the previous one",
                  file=sys.stderr, flush=True)
    aside = [t for t in ckpt.damaged_tags(root) if t not in damaged]
    if damaged or aside:  # a run that had checkpoints never silently starts over from step 0
        names = ", ".join(damaged + aside)
        where = f"set aside in {root / ckpt.DAMAGED}" if set_aside or aside else f"in {root}"
        raise UserError(f"run.dir={cfg.run.dir}: no usable checkpoint left, every one is damaged ({names}; "
                        f"{where}); fix one or pass run.resume=never")
    return None


def check_resume(cfg: TrainConfig, info: DistInfo, ckpt_dir: Path) -> dict:
    """The checkpoint's record, refused where it cannot continue this run (a moved curriculum, a
    world size change ZeRO-0/3 cannot make); a changed config is listed on rank 0. Reads files
    only."""
    saved = ckpt.read_state(ckpt_dir)
    old_cfg = saved["config"]
    if saved.get("rng_keys", 1) != lct_rng.KEY_SCHEME:  # SPEC 1.2: its data and noise draws cannot be continued
        raise UserError(f"checkpoint {ckpt_dir} was written with random-stream key scheme {saved.get('rng_keys', 1)}, "
                        f"this lct draws with scheme {lct_rng.KEY_SCHEME} (SPEC 1.2): finish that run with the lct "
                        "that started it, or start a new one (run.resume=never)")
    if saved["world_size"] != info.world_size:
        stages = {int(old_cfg["distributed"]["zero_stage"]), cfg.distributed.zero_stage}
        if not stages <= {1, 2}:
            raise UserError(
                f"checkpoint {ckpt_dir} was written by {saved['world_size']} ranks, this run has "
                f"{info.world_size}: lct changes the world size through DeepSpeed universal checkpoints, "
                "which need distributed.zero_stage 1 or 2 before and after; resume with "
                f"{saved['world_size']} ranks")
        if info.is_main:
            print(f"resuming a {saved['world_size']}-rank checkpoint on {info.world_size} ranks through a "
                  f"DeepSpeed universal checkpoint ({ckpt.universal_dir(ckpt_dir)})", file=sys.stderr, flush=True)
    new_cfg = json.loads(json.dumps(cfg.model_dump(mode="json")))
    if old_cfg["run"]["total_steps"] != cfg.run.total_steps and not cfg.run.allow_total_steps_change:
        raise UserError(
            f"run.total_steps changed from {old_cfg['run']['total_steps']} to {cfg.run.total_steps}: "
            "that moves the curriculum N(k) (SPEC 2.2). Keep it, or pass "
            "run.allow_total_steps_change=true to accept the change")
    per_invocation = ("run.resume", "run.trust_checkpoint_code", "run.time_budget_minutes")
    changes = [c for c in config_changes(old_cfg, new_cfg) if not c.startswith(per_invocation)]
    if changes and info.is_main:
        print("warning: resuming with a changed config:\n  " + "\n  ".join(changes), file=sys.stderr)
    return saved


def needs_universal(saved: dict | None, info: DistInfo) -> bool:
    return saved is not None and saved["world_size"] != info.world_size


def make_universal(cfg: TrainConfig, info: DistInfo, ckpt_dir: Path) -> None:
    """Rank 0 converts the checkpoint (once) while the others wait; call after the process group
    started and before the engine is built with `checkpoint.load_universal`."""
    world = info.world_size
    with dist.raised_timeout(world, cfg.run.dist_timeout_minutes * 4, cfg.run.dist_timeout_minutes):
        failed = ""
        if info.is_main:
            try:
                ckpt.to_universal(ckpt_dir, cfg.run.trust_checkpoint_code)
            except RuntimeError as err:
                failed = str(err)
        failed = dist.gather_objects(failed, world)[0]
    if failed:
        raise UserError(failed.replace("\n", " | "))


def load_resume(engine, ema: PartitionedEMA, ckpt_dir: Path, saved: dict, info: DistInfo,
                trust: bool = False) -> tuple[TrainState, dict]:
    """Load weights, optimizer and EMAs (pickles through `checkpoint.weights_only_loads`); returns
    the state to continue from and this rank's RNG state (restored by the caller just before the
    loop: building the data loader, text tower and monitor after this point may draw from the
    global RNG, which would shift the dropout masks). On another world size the engine loads the
    universal checkpoint and each rank's RNG is seeded from (seed, rank, step)."""
    universal = needs_universal(saved, info)
    load_dir, tag = (ckpt_dir, ckpt.UNIVERSAL) if universal else (ckpt_dir.parent, ckpt_dir.name)
    with ckpt.weights_only_loads(trust):
        engine.load_checkpoint(str(load_dir), tag=tag, load_module_strict=True,
                               load_optimizer_states=True, load_lr_scheduler_states=False)
        emas = ckpt.load_ema_file(ckpt_dir / "ema.safetensors")
        for name in ema.buffers:
            if name in emas:
                ema.load_state_dict_of(name, emas[name])
            elif info.is_main:
                print(f"warning: EMA {name!r} not in the checkpoint; starting it from the weights", file=sys.stderr)
        state = TrainState(**{k: saved["state"][k] for k in asdict(TrainState())})
        if universal:
            seed = int(saved["config"]["run"]["seed"])
            rng = {"cpu": torch.Generator().manual_seed(
                lct_rng.seed_int(lct_rng.Stream.TORCH_RESEED, seed, info.rank, state.applied_steps)).get_state()}
        else:
            rng = torch.load(ckpt_dir / f"rng_rank{info.rank}.pt", weights_only=True)
    if info.is_main:
        print(f"resumed from {ckpt_dir} at applied step {state.applied_steps}; restored state "
              f"{json.dumps(asdict(state))}", flush=True)
    return replace(state, resume_count=state.resume_count + 1), rng


def prepare_run_dir(cfg: TrainConfig, info: DistInfo) -> None:
    """Rank 0, with the run directory locked, before DeepSpeed starts: `run.resume=never` moves a
    previous run's files to `run.dir/previous/<time>/` (its checkpoints would otherwise be what
    the next automatic resume continues, its eval/ what the new model card shows); what
    interrupted saves and exports left (checkpoints without COMPLETE, `.NAME.tmpPID` folders) is
    removed."""
    if not info.is_main:
        return
    d = Path(cfg.run.dir)
    if cfg.run.resume == "never":
        names = [n for n in RUN_FILES if (d / n).exists()]
        if names:
            dest = d / "previous" / time.strftime("%Y%m%d-%H%M%S")
            dest.mkdir(parents=True, exist_ok=True)
            for n in names:
                os.replace(d / n, dest / n)
            print(f"run.resume=never: moved the previous run in {d} ({', '.join(names)}) to {dest}",
                  file=sys.stderr, flush=True)
    gone = ckpt.remove_incomplete(d / "checkpoints")
    if gone:
        print(f"removed {len(gone)} incomplete checkpoint(s) of an interrupted save: {', '.join(gone)}",
              file=sys.stderr, flush=True)
    export = d / "export"
    if export.is_dir():
        for p in export.iterdir():
            if p.name.startswith(".") and (".tmp" in p.name or p.name.endswith(".old")):
                shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)


# What a run writes into run.dir (moved together by run.resume=never).
RUN_FILES = ("checkpoints", "export", "samples", "tensorboard", "eval", "wandb", "stats.jsonl", "config.yaml",
             "deepspeed.json", "environment.json")


def init_from(model: torch.nn.Module, path: str, ema_name: str | None, info: DistInfo) -> None:
    """Start from another run's EMA (ECT starts from an EDM run: weights and EMAs, SPEC 2.4)."""
    models.load_state_dict_checked(model.net, load_network_weights(path, ema_name))
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


def save(run: Run, state: TrainState, export_all: bool = False, export: bool = True) -> Path:
    """Atomic checkpoint on every rank + EMA export (`export=False`: none, for a stop on a signal,
    when the launcher's grace period is short); raises the process-group timeout around it. A
    complete checkpoint is never written twice (only its exports are refreshed). Its record
    lists every file with its size (each rank reports its own). Returns the checkpoint folder."""
    cfg, info, world = run.cfg, run.info, run.info.world_size
    with dist.raised_timeout(world, cfg.run.dist_timeout_minutes * 4, cfg.run.dist_timeout_minutes):
        tag = ckpt.tag_for(state.applied_steps)
        ckpt_dir = inside_run_dir(cfg, run.ckpt_root / tag)
        exists = (ckpt_dir / ckpt.COMPLETE).is_file()
        dist.barrier(world)  # every rank has looked before rank 0 may write the marker
        mine = {}
        if not exists:
            with ckpt.hashed_writes(run.engine) as written:  # sha256 of DeepSpeed's files as they are written
                run.engine.save_checkpoint(str(run.ckpt_root), tag=tag, save_latest=False)
            rng_file = f"rng_rank{info.rank}.pt"
            run.faults.write(state.applied_steps, info.rank, ckpt_dir / rng_file)
            written[rng_file] = ckpt.save_torch(ckpt.rng_state(), ckpt_dir / rng_file)
            mine = ckpt.rank_files(ckpt_dir, info.rank, written)
        files = {k: v for part in dist.gather_objects(mine, world) for k, v in part.items()}
        emas = {name: run.ema.state_dict_of(name) for name in run.ema.buffers}  # collective
        dist.barrier(world)
        if info.is_main:
            if not exists:
                files["ema.safetensors"] = ckpt.save_ema_file(ckpt_dir / "ema.safetensors", emas)
                record = {"state": asdict(state), "world_size": world, "files": dict(sorted(files.items())),
                          "rng_keys": lct_rng.KEY_SCHEME,
                          "config": cfg.model_dump(mode="json"), "time": time.time()}
                ckpt.mark_complete(ckpt_dir, record, run.ckpt_root)
                ckpt.rotate(run.ckpt_root, cfg.run.keep_last)
            # An export builds pipeline components (VAE, text tower: random init, then their
            # weights), which must not move the training RNG: it was saved above, and a resumed run
            # must draw the dropout masks an uninterrupted one draws.
            if export or export_all:
                with torch.random.fork_rng(devices=[]):
                    export_emas(cfg, run.engine.module, emas, list(emas) if export_all else [cfg.ema.sample],
                                run.manifest, state.applied_steps, state.images_seen, final=export_all)
        dist.barrier(world)
    return ckpt_dir


def inside_run_dir(cfg: TrainConfig, path: Path) -> Path:
    """`path`, if it lies strictly inside run.dir (by its name: `..` and absolute parts resolved,
    links not followed); else a RuntimeError before anything is written. Every checkpoint and
    export the trainer writes goes through here; the config schema refuses the names that would
    fail it (`lct.config.plain_name`), so this failing is a bug, never a user's mistake."""
    root = os.path.normpath(os.path.abspath(cfg.run.dir))
    target = os.path.normpath(os.path.abspath(path))
    if target == root or os.path.commonpath([root, target]) != root:
        raise RuntimeError(f"refusing to write {path}: it is not inside run.dir={cfg.run.dir}")
    return Path(path)


def export_emas(cfg: TrainConfig, precond: torch.nn.Module, emas: dict, names: list[str], manifest: dict,
                step: int, images_seen: int, final: bool = False) -> None:
    """export/<name>/ for the named EMAs; at the run's end (`final`) the exports of EMAs the
    config no longer has move to export/stale/<name>-step<N>/ (never mistaken for this run's
    models)."""
    root = Path(cfg.run.dir) / "export"
    for name in names:
        export_network(precond, emas[name], inside_run_dir(cfg, root / name), cfg=cfg,
                       manifest=manifest_record(cfg, manifest), ema_name=name, step=step, images_seen=images_seen)
    if final:
        keep = {e.name for e in cfg.ema.models}
        for name, old_step in exported_steps(root).items():
            if name not in keep:
                dest = inside_run_dir(cfg, root / "stale" / f"{name}-step{old_step:08d}")
                dest.parent.mkdir(parents=True, exist_ok=True)
                shutil.rmtree(dest, ignore_errors=True)
                os.replace(root / name, dest)
                print(f"export/{name} (step {old_step}) is of an EMA this config no longer has: moved to {dest}",
                      file=sys.stderr, flush=True)


def exported_steps(root: Path) -> dict[str, int]:
    """{ema name: step} of the pipeline folders in `root` (export/)."""
    out = {}
    if Path(root).is_dir():
        for p in sorted(Path(root).iterdir()):
            try:
                out[p.name] = int(json.loads((p / "lct_export.json").read_text())["step"])
            except (OSError, ValueError, KeyError, TypeError):
                continue
    return out


def refresh_exports(cfg: TrainConfig, network: torch.nn.Module, manifest: dict, ckpt_dir: Path) -> list[str]:
    """A complete run whose final exports are missing or older than its last checkpoint (a kill
    between the two) gets them re-made from the checkpoint's EMAs, on the CPU; returns the names
    re-made."""
    saved = ckpt.read_state(ckpt_dir)
    step = int(saved["state"]["applied_steps"])
    have = exported_steps(Path(cfg.run.dir) / "export")
    stale = [e.name for e in cfg.ema.models if have.get(e.name) != step]
    if not stale:
        return []
    emas = ckpt.load_ema_file(ckpt_dir / "ema.safetensors")
    missing = [n for n in stale if n not in emas]
    if missing:
        raise UserError(f"run {cfg.run.dir} is complete but its checkpoint has no EMA {missing[0]!r} to export: "
                        "remove it from ema.models or export with python -m lct.export")
    with torch.random.fork_rng(devices=[]):
        export_emas(cfg, network, emas, stale, manifest, step, int(saved["state"]["images_seen"]), final=True)
    return stale


def manifest_record(cfg: TrainConfig, manifest: dict) -> dict:
    """What an export keeps of the data's manifest."""
    return {k: manifest.get(k) for k in ("vae", "text", "latent_shape", "resolution", "stats", "format", "buckets")
            if k != "buckets" or manifest.get(k)} | {
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
                "einops", "pydantic", "lct-consistency"):  # lct's distribution name
        try:
            versions[pkg] = version(pkg)
        except PackageNotFoundError:
            versions[pkg] = None
    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return {"git_sha": git("rev-parse", "HEAD") or None, "git_dirty": bool(git("status", "--porcelain")),
            "versions": versions, "python": platform.python_version(), "host": platform.node(),
            "cpu_count": os.cpu_count(), "gpus": gpus, "world_size": world_size,
            "started": time.strftime("%Y-%m-%dT%H:%M:%S")}
