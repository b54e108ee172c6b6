"""Every check a training start makes before the process group and DeepSpeed, and what they load.

    start = preflight(cfg, info)                       # raises the first failure (UserError)
    start = preflight(cfg, info, failures=problems)    # --dry-run: collects each, goes on

The order is what a user meets: paths (data, manifest, init_from, val shards, run.dir, prompts),
the batch split, the manifest, `data.shards` against the manifest's shard list (missing or
truncated shards), the text tower (loaded on the CPU, its tokenizer checked against the data's)
and the architecture against the data, the VAE the grids decode with, `model.init_from`'s
weights, and the resume checkpoint (found, validated, its network shapes). Each failure is one
line naming the key or flag and the fix; none needs a GPU.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from lct import checkpoint as ckpt
from lct.config import TrainConfig
from lct.data import DataDescription, describe_data, expand_urls, manifest_path, train_shard_urls
from lct.dist import DistInfo
from lct.engine import batch_layout
from lct.errors import UserError
from lct.export import check_network_weights
from lct.files import output_dir_problem
from lct.latents import load_manifest
from lct.models.build import build_network, check_network
from lct.run import check_resume, find_resume
from lct.text import load_tower
from lct.vae import load_vae, vae_source, vae_summary


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
    text: torch.nn.Module | None = None   # the frozen text tower (on-the-fly conditions, grids, validation)
    vae: torch.nn.Module | None = None    # the AutoencoderKL the grids decode with (None without a monitor)
    notes: tuple[str, ...] = ()   # warnings for rank 0 to print (a VAE other than the data's, ...)
    urls: tuple[str, ...] = ()    # the shards to train on (data.shards checked against the manifest)


def preflight(cfg: TrainConfig, info: DistInfo, monitor: bool = True, failures: list[str] | None = None
              ) -> Start:
    """The checks of the module docstring. The first failure raises a `UserError`; with a
    `failures` list (--dry-run) each is appended and the checks go on. `monitor` False
    (benchmarks) skips the VAE."""

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
    text, vae, notes, urls = None, None, [], ()
    if manifest is not None:
        if not any(p.startswith("data.shards") for p in problems):  # else said above
            urls, note = check(train_shard_urls, cfg.data.shards, manifest, default=((), None))
            notes += [note.removeprefix("warning: ")] if note else []
        text_ok = check(check_text_compatibility, cfg, manifest, default=False) is not False
        check(check_bucketed_norm, cfg, manifest)
        check(check_network, cfg, desc, manifest, failures is not None)
        with torch.random.fork_rng(devices=[]):  # loading draws (random init, then the weights)
            if text_ok and cfg.model.cond == "text" and (monitor or cfg.data.text == "on_the_fly"):
                text = check(load_tower, manifest, cfg.text, torch.device("cpu"))
            if monitor:
                vae, note = check(load_run_vae, cfg, manifest, default=(None, None))
                notes += [note] if note else []
    if cfg.model.init_from and os.path.exists(cfg.model.init_from):
        check(check_init_from, cfg)
    resume = check(find_resume, cfg, info, failures is None)  # a dry run moves nothing aside
    saved = check(check_resume, cfg, info, resume) if resume else None
    if saved is not None and manifest is not None:
        check(check_network_shapes, cfg, desc, manifest, resume, saved)
    return Start(micro, accum, manifest, desc, resume, saved, text, vae, tuple(notes), tuple(urls))


def peek_manifest(cfg: TrainConfig) -> dict | None:
    """The data's manifest where it can be read now (for the config warnings), else None."""
    try:
        return load_manifest(manifest_path(cfg)) if manifest_path(cfg) else None
    except UserError:
        return None  # preflight names the problem


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
                        problem_with_text_file(cfg.sample.prompts_file, "sample.prompts_file"),
                        problem_with_text_file(cfg.eval.captions if cfg.eval.every else None, "eval.captions")) if p]
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
    length = t.get("t5_length") if t.get("kind") == "sd3" else t.get("context_length")  # sd3: the T5 length
    for key, have in (("kind", t.get("kind", "open_clip")), ("max_length", length)):
        want = getattr(cfg.text, key)
        if want is not None and str(want) != str(have):
            raise UserError(f"text.{key}={want!r}, but the data was encoded with {have!r} (manifest); re-encode "
                            f"with data_prep/encode_latents.py --text-{key.replace('_', '-')} {want} or drop text.{key}")


def check_bucketed_norm(cfg: TrainConfig, manifest: dict) -> None:
    """Bucketed latents have one shape per bucket: per-element statistics cannot exist (SPEC 7)."""
    if manifest.get("buckets") and cfg.data.latent_norm == "element":
        raise UserError("data.latent_norm element: bucketed latents (encode_latents.py --buckets) have one shape per "
                        "bucket and per-channel statistics only; use data.latent_norm channel")


def load_run_vae(cfg: TrainConfig, manifest: dict) -> tuple[torch.nn.Module, str | None]:
    """The VAE the grids decode with (vae.id, default the manifest's), loaded on the CPU and checked
    against the manifest's record: another config is refused (its latents are not the data's);
    another source with the same config gets a warning (a copy of the same weights is fine)."""
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


def check_network_shapes(cfg: TrainConfig, desc: DataDescription, manifest: dict, ckpt_dir: Path,
                         saved: dict) -> None:
    """Refuse a checkpoint whose network has other tensor shapes than this config builds (its
    model file, read before DeepSpeed), naming the changed keys."""
    have = ckpt.module_shapes(ckpt_dir, cfg.run.trust_checkpoint_code)
    if have is None:
        return  # no readable model file: the checkpoint validation refuses it
    want = {k: tuple(v.shape) for k, v in build_network(cfg, desc, manifest, meta=True).state_dict().items()}
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
