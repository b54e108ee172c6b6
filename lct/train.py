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

import psutil
import torch
from torch.utils.flop_counter import FlopCounterMode

from lct import checkpoint as ckpt
from lct import dist, rng
from lct.config import TrainConfig, check_train_config, dump_yaml, load_config
from lct.data import (DataDescription, DataSpec, InMemoryLatents, SkipTally, describe_data, expand_urls,
                      make_loader, manifest_path, to_device, token_ids, train_shard_urls)
from lct.dist import DistInfo
from lct.ema import PartitionedEMA
from lct.engine import batch_layout, deepspeed_config, initialize, learning_rate, set_precision
from lct.errors import UserError, cli_main
from lct.export import check_network_weights
from lct.faults import Faults
from lct.files import output_dir_problem
from lct.hf_text import HFTextEncoder, is_hf_record
from lct.latents import TEXT_NULL, SampleLayout, load_manifest, read_text_null
from lct.models import Precond, build_dit, count_parameters
from lct.monitor import LossMeter, Monitor, Progress, RunLogger
from lct.objectives import Curriculum, Diagnostics, make_objective
from lct.run import (Run, TrainState, check_resume, find_resume, init_from, load_resume, lock_run_dir,
                     make_universal, needs_universal, prepare_run_dir, refresh_exports, save, write_run_record)
from lct.text import TextEncoder, text_condition
from lct.timing import no_timer
from lct.vae import LatentNorm, load_vae

EXIT_SIGTERM, EXIT_SIGINT, EXIT_SKIPS = 143, 130, 3


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="lct/train.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", required=True, help="YAML config (see configs/)")
    p.add_argument("--dry-run", action="store_true",
                   help="make every check a start makes (paths, data, text tower, VAE, resume state), print "
                        "sizes, FLOPs, memory and data figures, exit (2 if a start would fail)")
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
        return dry_run(cfg, info)
    lock = lock_run_dir(cfg, info)  # held until this process ends: one trainer per run.dir
    try:
        start = preflight(cfg, info)
        if info.is_main:
            for note in start.notes:
                print(f"warning: {note}", file=sys.stderr, flush=True)
        prepare_run_dir(cfg, info)
        if start.saved and start.saved["state"]["applied_steps"] >= cfg.run.total_steps:
            return finish_complete(cfg, info, start)
        run = build(cfg, info, start)
        rc = loop(run, started) if run is not None else 0
    except KeyboardInterrupt:  # Ctrl-C before the loop: nothing trained yet, nothing to save
        print("interrupted before training started; nothing to save", file=sys.stderr, flush=True)
        return EXIT_SIGINT
    finally:
        lock.release()
    dist.close()  # only after a run every rank finished (errors and signals exit on their own path)
    return rc


def invocation_start() -> float:
    """Wall-clock start of this process (interpreter and imports included): run.time_budget_minutes
    counts from here."""
    try:
        return psutil.Process().create_time()
    except psutil.Error:
        return time.time()


def finish_complete(cfg: TrainConfig, info: DistInfo, start: "Start") -> int:
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


def peek_manifest(cfg: TrainConfig) -> dict | None:
    """The data's manifest where it can be read now (for the config warnings), else None."""
    try:
        return load_manifest(manifest_path(cfg)) if manifest_path(cfg) else None
    except UserError:
        return None  # preflight names the problem


# ----------------------------------------------------------------------------------------------
# Before any GPU work: checks and the data description
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Start:
    """What `preflight` found: the batch split, the data, the models the run decodes and encodes
    with (loaded on the CPU), and the checkpoint to resume from."""

    micro: int
    accum: int
    manifest: dict
    desc: DataDescription
    resume: Path | None
    saved: dict | None            # the resume checkpoint's record
    text: TextEncoder | None = None   # the frozen text tower (on-the-fly conditions, grids, validation)
    vae: torch.nn.Module | None = None  # the AutoencoderKL the grids decode with (None without a monitor)
    notes: tuple[str, ...] = ()   # warnings for rank 0 to print (a VAE other than the data's, ...)


def preflight(cfg: TrainConfig, info: DistInfo, monitor: bool = True, failures: list[str] | None = None
              ) -> Start:
    """Every check a start makes before the process group and DeepSpeed: paths, batch split, the
    manifest, the text tower and the VAE (loaded, on the CPU, and checked against the manifest),
    the resume checkpoint (world size, total_steps, network shapes). The first failure raises a
    `UserError`; with a `failures` list (--dry-run) each is appended and the checks go on.
    `monitor` False (benchmarks) skips the VAE."""

    def check(fn, *args, default=None):
        if failures is None:
            return fn(*args)
        try:
            return fn(*args)
        except UserError as err:
            failures.append(str(err))
            return default

    problems = problems_with_paths(cfg)
    if problems and failures is None:
        raise UserError("; ".join(problems))
    if failures is not None:
        failures += problems
    micro, accum = check(batch_layout, cfg, info.world_size,
                         default=(max(1, cfg.optim.batch_size // info.world_size), 1))
    mpath = manifest_path(cfg)
    readable = failures is None or (mpath and ("://" in mpath or mpath.startswith("pipe:") or os.path.exists(mpath)))
    manifest = check(load_manifest, mpath) if readable else None  # (a missing one is a problem above)
    desc = describe_data(manifest)
    text, vae, notes = None, None, []
    if manifest is not None:
        text_ok = check(check_text_compatibility, cfg, manifest, default=False) is not False
        if cfg.model.arch == "pixart":  # its config, the data's latents and text, the null condition
            check(pixart_config_for, cfg, desc, manifest, failures is not None)
        with torch.random.fork_rng(devices=[]):  # loading draws (random init, then the weights)
            if text_ok and cfg.model.cond == "text" and (monitor or cfg.data.text == "on_the_fly"):
                text = check(make_text_encoder, cfg, manifest, torch.device("cpu"))
            if monitor:
                vae, note = check(load_run_vae, cfg, manifest, default=(None, None))
                notes += [note] if note else []
    if cfg.model.init_from and os.path.exists(cfg.model.init_from):
        check(check_init_from, cfg)
    resume = check(find_resume, cfg, info, failures is None)  # a dry run moves nothing aside
    saved = check(check_resume, cfg, info, resume) if resume else None
    if saved is not None and manifest is not None:
        check(check_network_shapes, cfg, desc, resume, saved)
    return Start(micro, accum, manifest, desc, resume, saved, text, vae, tuple(notes))


def problems_with_paths(cfg: TrainConfig) -> list[str]:
    """Missing or unusable inputs and outputs: each one line naming the key (exit 2 at a start,
    "would fail at start" under --dry-run)."""
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
    out += [p for p in (output_dir_problem(cfg.run.dir, "run.dir"),
                        problem_with_text_file(cfg.sample.prompts_file, "sample.prompts_file")) if p]
    return out


def problem_with_text_file(path: str | None, key: str) -> str | None:
    """A text file (one entry per line) that is missing or not UTF-8."""
    if not path:
        return None
    p = Path(path).expanduser()
    if not p.is_file():
        return f"{key} {path} not found (a text file, one entry per line)"
    try:
        p.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        return f"{key} {path} is not UTF-8 text (byte {err.start}); save it as UTF-8"
    except OSError as err:
        return f"{key} {path} cannot be read ({err.strerror})"
    return None


def check_init_from(cfg: TrainConfig) -> None:
    """model.init_from names an export (or a run with one) whose weights are whole."""
    try:
        check_network_weights(cfg.model.init_from, cfg.model.init_ema)
    except UserError as err:
        raise UserError(f"model.init_from {cfg.model.init_from}"
                        f"{f' (model.init_ema {cfg.model.init_ema})' if cfg.model.init_ema else ''}: {err}") from None


def check_text_compatibility(cfg: TrainConfig, manifest: dict) -> None:
    """The trainer refuses a text model or tokenizer that differs from the manifest's."""
    if cfg.model.cond != "text":
        return
    t = manifest.get("text") or {}
    if cfg.data.text == "precomputed" and not t.get("states"):
        raise UserError("data.text=precomputed but the shards have no token states (manifest); re-encode "
                        "with --text-states or set data.text: on_the_fly")
    for key in ("model", "pretrained"):
        want = getattr(cfg.text, key)
        if want is not None and t.get(key) is not None and str(want) != str(t.get(key)):
            raise UserError(f"text.{key}={want!r} differs from the data's {t.get(key)!r} (manifest): token ids "
                            f"and states must come from the same text tower; set text.{key}: null to use "
                            "the data's (or re-encode the data with this tower)")
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
                        f"tokenised with: {enc.identity()} vs manifest {want}; set text.model and "
                        "text.pretrained: null to use the data's tower")
    return enc


def load_run_vae(cfg: TrainConfig, manifest: dict) -> tuple[torch.nn.Module, str | None]:
    """The VAE the grids decode with (vae.id, default the manifest's), loaded on the CPU and checked
    against the manifest's record: another config is refused (its latents are not the data's);
    another source with the same config gets a warning (a copy of the same weights is fine)."""
    from lct.vae import vae_source, vae_summary

    rec = manifest.get("vae") or {}
    source = cfg.vae.id or rec.get("id")
    if not source:
        raise UserError("vae.id: the data's manifest records no VAE; set vae.id to the AutoencoderKL "
                        "the shards were encoded with")
    try:
        vae = load_vae(source, "cpu", torch.float32)
    except UserError as err:
        fix = "set vae.id to a local copy of it" if not cfg.vae.id else "fix vae.id (null = the data's VAE)"
        raise UserError(f"vae.id {source}{'' if cfg.vae.id else ' (from the manifest)'}: {err}; {fix}") from None
    got = vae_summary(vae, source)
    if rec.get("config_sha256") and got["config_sha256"] != rec["config_sha256"]:
        old, new = rec.get("config") or {}, got["config"]
        diff = [f"{k} {old.get(k)} vs {new.get(k)}" for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
        raise UserError(f"vae.id {source} is not the VAE the data was encoded with ({rec.get('id')}, manifest): "
                        f"another config ({'; '.join(diff[:4]) or 'config_sha256 differs'}); set vae.id: null "
                        "to decode with the data's VAE")
    note = None
    if cfg.vae.id and rec.get("id") and vae_source(cfg.vae.id) != rec["id"]:
        note = (f"vae.id {cfg.vae.id} is not the data's VAE {rec['id']} (manifest), though its config matches: "
                "grids decode with it, right for a copy of the same weights, wrong otherwise (vae.id: null "
                "uses the data's)")
    return vae, note


def check_network_shapes(cfg: TrainConfig, desc: DataDescription, ckpt_dir: Path, saved: dict) -> None:
    """Refuse a checkpoint whose network has other tensor shapes than this config builds (read from
    the checkpoint's model file, memory-mapped, before DeepSpeed), naming the changed keys."""
    files = sorted(ckpt_dir.glob("mp_rank_*_model_states.pt"))
    if not files:
        return  # an incomplete checkpoint: lct.run / lct.checkpoint refuse it
    try:
        with ckpt.weights_only_loads(cfg.run.trust_checkpoint_code):  # a checkpoint is code (issue 19)
            held = torch.load(files[0], map_location="cpu", mmap=True).get("module") or {}
    except Exception:
        return  # unreadable: the checkpoint validation refuses it
    with torch.device("meta"):
        want = {k: tuple(v.shape) for k, v in build_network(cfg, desc, dry_run=True).state_dict().items()}
    have = {k: tuple(v.shape) for k, v in held.items() if hasattr(v, "shape")}
    bad = sorted(k for k in set(want) | set(have) if want.get(k) != have.get(k))
    if not bad:
        return
    old, new = saved.get("config", {}).get("model", {}), cfg.model.model_dump(mode="json")
    keys = [f"model.{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in sorted(new) if k in old and old[k] != new[k]]
    k0 = bad[0]
    raise UserError(f"checkpoint {ckpt_dir} holds another network: {len(bad)} tensors differ (e.g. {k0}: "
                    f"{list(have[k0]) if k0 in have else 'absent'} in the checkpoint, "
                    f"{list(want[k0]) if k0 in want else 'absent'} here)"
                    + (f"; changed: {', '.join(keys)}" if keys else "; the data's latent or text sizes changed")
                    + ". Keep the run's settings, or train the new network in another run.dir")


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
    """What a start would do, without starting it: every `preflight` check (each failure printed as
    "would fail at start: ..."), the network on the meta device, and the figures a run is planned
    with. Exit 2 when a start would fail."""
    failures: list[str] = []
    start = preflight(cfg, info, failures=failures)
    if not info.is_main:  # under a launcher every rank checks; rank 0 reports
        return 2 if failures else 0
    desc, micro = start.desc, start.micro
    plain = cfg.model_copy(update={"model": cfg.model.model_copy(update={"compile": False})})
    if cfg.model.arch == "pixart" and start.manifest is None:  # before data prep: the sizes the model takes
        pc = pixart_config_for(cfg, desc, None, dry_run=True)
        desc = DataDescription((pc["in_channels"], pc["sample_size"], pc["sample_size"]), pc["caption_channels"],
                               cfg.text.max_length or 120, 0)
    with torch.device("meta"):  # compiled blocks hide their saved tensors; shapes and FLOPs are the same
        model = build_network(plain, desc, start.manifest, dry_run=True)
    counts = count_parameters(model.net)
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
    mem = memory_estimate(plain, desc, model, micro, info.world_size, start)
    print(f"memory per GPU (estimated, micro-batch {micro} x {start.accum} accumulation, ZeRO-"
          f"{cfg.distributed.zero_stage} over {info.world_size}): {si(mem['total'], 1024)}B = "
          + ", ".join(f"{k} {si(v, 1024)}B" for k, v in mem.items() if k != "total")
          + " (fp32 activations" + ("; bf16_trunk keeps about half" if cfg.precision == "bf16_trunk" else "")
          + "), plus the CUDA context and allocator slack (~1-2 GiB)")
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
        with torch.device("meta"):
            full = build_network(cfg.model_copy(update={"model": cfg.model.model_copy(update={"checkpointing": False})}),
                                 desc, start.manifest, dry_run=True)
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
              text_encoder=text if text_mode == "on_the_fly" else None,
              monitor=Monitor(cfg, info, engine, ema, start.manifest, start.desc, device, text=text,
                              vae=start.vae) if monitor else None,
              logger=RunLogger(Path(cfg.run.dir), cfg, state.applied_steps) if info.is_main else None,
              faults=Faults(), state=state)
    if rng_state is not None:
        ckpt.set_rng_state(rng_state)  # last: building the loader, text tower and monitor may draw
    return run


# ----------------------------------------------------------------------------------------------
# The loop and the step
# ----------------------------------------------------------------------------------------------


def loop(run: Run, started: float | None = None) -> int:
    """Steps until run.total_steps; a signal (SIGTERM, SIGINT, a launcher gone) or the time budget
    (wall clock since `started`, this invocation's start) saves on every rank and stops."""
    cfg, info = run.cfg, run.info
    state, flags, watch = run.state, StopFlags(), LauncherWatch()
    started = time.time() if started is None else started
    meter = LossMeter(cfg, run.device, info.world_size, state.images_seen)
    progress = Progress(cfg, info, state.applied_steps)
    batches = iter(run.loader)
    tally = SkipTally()  # samples the data path skipped, per reason (lct.data.SKIP_REASONS)
    t_start, skips, exit_code = time.time() - state.train_seconds, 0, 0
    save_seconds, saved_at = 0.0, None
    while state.applied_steps < cfg.run.total_steps:
        t_step = time.time()
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
        # Stop before the budget would pass during the next step and its save.
        budget = 60 * (cfg.run.time_budget_minutes or 0)
        time_up = bool(budget and time.time() - started + (time.time() - t_step) + save_seconds >= budget)
        gone = watch.gone()
        if gone and not flags.signal:
            print(f"rank {info.rank}: {gone} is gone; saving and stopping as on SIGTERM", file=sys.stderr, flush=True)
            flags.signal = signal.SIGTERM
        sig, time_up = dist.all_reduce_values([float(flags.signal), float(time_up)], run.device,
                                              info.world_size, "max")
        if sig or time_up or (result.applied and k % cfg.run.save_every == 0):
            t_save = time.time()
            saved_at = save(run, state, export=not sig)  # on a signal: the checkpoint only, quickly
            save_seconds = time.time() - t_save
            run.faults.after_save(k)
        if run.monitor and result.applied and not sig:  # after the save: a failing grid costs no training
            run.monitor.maybe_run(k, run.logger)
        if sig:
            exit_code = EXIT_SIGTERM if int(sig) == signal.SIGTERM else EXIT_SIGINT
            if info.is_main:
                print(f"received {signal.Signals(int(sig)).name}: checkpoint {saved_at} (step {k}) saved on "
                      f"every rank; exiting with {exit_code}", file=sys.stderr, flush=True)
            break
        if time_up:
            if info.is_main:
                print(f"time budget of {cfg.run.time_budget_minutes} min for this invocation reached: checkpoint "
                      f"{saved_at} (step {k}) saved; re-run the same command to continue", file=sys.stderr, flush=True)
            break

    progress.close()
    if exit_code == 0 and state.applied_steps >= cfg.run.total_steps:
        saved_at = save(run, state, export_all=True)
        if run.monitor:
            run.monitor.maybe_run(state.applied_steps, run.logger, force=True)
        if info.is_main:
            names = ", ".join(e.name for e in cfg.ema.models)
            print(f"finished: step {state.applied_steps} of {cfg.run.total_steps}, checkpoint {saved_at}, exports "
                  f"({names}) in {run.run_dir / 'export'}; {(time.time() - started) / 60:.1f} min this invocation, "
                  f"{state.train_seconds / 3600:.2f} h of training in all", flush=True)
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
    """SIGTERM/SIGINT only set a flag; the loop agrees on it across ranks at step boundaries and
    saves. A repeated signal changes nothing (torchrun and deepspeed's launch.py send their own
    after the terminal's; both SIGKILL the ranks 30 s later, see README)."""

    def __init__(self):
        self.signal = 0
        for s in (signal.SIGTERM, signal.SIGINT):
            signal.signal(s, self._handle)

    def _handle(self, signum, frame):
        self.signal = self.signal or signum


class LauncherWatch:
    """The launcher processes above this rank (deepspeed's runner and launch.py, torchrun). SIGTERM
    to the top-level `deepspeed` runner kills it alone and leaves the ranks training (upstream
    behaviour); a rank that finds one gone stops as on SIGTERM."""

    MARKS = (("deepspeed.launcher.runner", "deepspeed runner"), ("bin/deepspeed", "deepspeed runner"),
             ("deepspeed.launcher.launch", "deepspeed launch.py"), ("torch.distributed.run", "torchrun"),
             ("bin/torchrun", "torchrun"))

    def __init__(self):
        self.watched: list[tuple[psutil.Process, str]] = []
        try:
            for p in psutil.Process().parents():
                cmd = " ".join(p.cmdline())
                name = next((n for m, n in self.MARKS if m in cmd), None)
                if name:
                    self.watched.append((p, name))
        except psutil.Error:
            pass

    def gone(self) -> str | None:
        for p, name in self.watched:
            try:  # is_running is false for a reused pid too (psutil compares start times)
                alive = p.is_running() and p.status() != psutil.STATUS_ZOMBIE
            except psutil.Error:
                alive = False
            if not alive:
                return f"the launcher {name} (pid {p.pid})"
        return None


def cli() -> None:
    cli_main(main)


if __name__ == "__main__":
    cli()
