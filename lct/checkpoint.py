"""Atomic, rotating training checkpoints and EMA exports.

Layout of a run directory:

    checkpoints/step00001000/      DeepSpeed files (every rank writes its own ZeRO partition),
                                   rng_rank{r}.pt (each rank's RNG), ema.safetensors (all EMAs,
                                   gathered), lct_state.json (counters, curriculum, data position),
                                   COMPLETE (written last, atomically: only marked checkpoints resume)
    checkpoints/latest             tag of the newest complete checkpoint (atomic replace)
    export/<ema>/                  diffusers save_pretrained of the EMA network + lct_export.json

A crash mid-save leaves a directory without COMPLETE, which resume ignores and rotation deletes.
DeepSpeed checkpoints assume a filesystem shared by all nodes (every rank writes its partition
into the same directory and rank 0 marks it complete). `lct_state.json` lists every file of the
checkpoint with its size; `problems` checks them (present, that size, readable, no code) before a
resume loads anything, and `set_aside` moves a damaged checkpoint to `checkpoints/damaged/`.

A checkpoint is code as much as data: DeepSpeed's files are pickles. lct reads them only with
`torch.load(weights_only=True)` and an allow-list of the exact classes DeepSpeed's state holds
(`SAFE_GLOBALS`, `weights_only_loads`); a file that needs anything else is refused unless the user
trusts it (`run.trust_checkpoint_code`).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any, Iterator

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save

from lct.files import write_atomic, write_json

TAG_RE = re.compile(r"^step(\d{8,})$")
COMPLETE = "COMPLETE"


def tag_for(step: int) -> str:
    return f"step{step:08d}"


def complete_tags(root: Path) -> list[str]:
    """Tags of complete checkpoints, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    tags = [p.name for p in root.iterdir() if TAG_RE.match(p.name) and (p / COMPLETE).is_file()]
    return sorted(tags, key=lambda t: int(TAG_RE.match(t).group(1)))


def newest_complete(root: Path) -> str | None:
    tags = complete_tags(root)
    return tags[-1] if tags else None


def read_state(ckpt_dir: Path) -> dict:
    return json.loads((Path(ckpt_dir) / "lct_state.json").read_text())


def rotate(root: Path, keep_last: int) -> None:
    """Keep the newest `keep_last` complete checkpoints; delete older and abandoned ones."""
    root = Path(root)
    tags = complete_tags(root)
    keep = set(tags[-keep_last:])
    newest = int(TAG_RE.match(tags[-1]).group(1)) if tags else -1
    for p in root.iterdir():
        m = TAG_RE.match(p.name)
        if not m or p.name in keep:
            continue
        complete = (p / COMPLETE).is_file()
        if complete or int(m.group(1)) < newest:  # an incomplete one newer than all may be in flight
            shutil.rmtree(p, ignore_errors=True)


def rng_state() -> dict[str, torch.Tensor]:
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def save_ema_file(path: Path, emas: dict[str, dict[str, torch.Tensor]]) -> None:
    """All EMAs in one safetensors file, keys `<ema name>/<parameter name>`."""
    flat = {f"{name}/{k}": v.contiguous() for name, sd in emas.items() for k, v in sd.items()}
    write_atomic(path, save(flat))


def load_ema_file(path: Path) -> dict[str, dict[str, torch.Tensor]]:
    out: dict[str, dict[str, torch.Tensor]] = {}
    for key, v in load_file(str(path)).items():
        name, _, param = key.partition("/")
        out.setdefault(name, {})[param] = v
    return out


def mark_complete(ckpt_dir: Path, state: dict[str, Any], root: Path) -> None:
    """Rank 0, after every rank finished writing: state, COMPLETE marker, `latest` pointer."""
    write_json(Path(ckpt_dir) / "lct_state.json", state)
    write_atomic(Path(ckpt_dir) / COMPLETE, "")
    write_atomic(Path(root) / "latest", Path(ckpt_dir).name + "\n")


# ----------------------------------------------------------------------------------------------
# What a complete checkpoint holds, checked before anything is loaded
# ----------------------------------------------------------------------------------------------

# The classes DeepSpeed's ZeRO-1/2 state pickles besides tensors and builtins (its optimizer file:
# the loss scaler, the stage enum, parameter fragment addresses). Nothing else is unpickled.
SAFE_GLOBALS = (
    "deepspeed.runtime.zero.config.ZeroStageEnum",
    "deepspeed.runtime.fp16.loss_scaler.LossScaler",
    "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
    "deepspeed.utils.tensor_fragment.fragment_address",
)
DAMAGED = "damaged"


def safe_globals() -> list:
    """The allow-listed classes themselves (imports deepspeed)."""
    import importlib

    out = []
    for name in SAFE_GLOBALS:
        module, _, attr = name.rpartition(".")
        out.append(getattr(importlib.import_module(module), attr))
    return out


@contextlib.contextmanager
def weights_only_loads(trust: bool = False) -> Iterator[None]:
    """Every `torch.load` inside the block (DeepSpeed's too, which asks for weights_only=False)
    unpickles tensors, builtins and `SAFE_GLOBALS` only; `trust=True` leaves torch's defaults."""
    if trust:
        yield
        return
    saved = {k: os.environ.pop(k, None) for k in ("TORCH_FORCE_WEIGHTS_ONLY_LOAD", "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD")}
    os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"
    try:
        with torch.serialization.safe_globals(safe_globals()):
            yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def rank_files(ckpt_dir: Path, rank: int) -> dict[str, int]:
    """Sizes of the files rank `rank` wrote into a checkpoint (its ZeRO partition and RNG state;
    rank 0 also the model states)."""
    out = {}
    for p in Path(ckpt_dir).iterdir():
        n = p.name
        mine = f"_rank_{rank}_" in n or n == f"rng_rank{rank}.pt" or (rank == 0 and n.startswith("mp_rank_"))
        if p.is_file() and mine and not n.startswith("."):
            out[n] = p.stat().st_size
    return out


def expected_files(record: dict) -> list[str]:
    """Files a checkpoint must hold when its record predates the file list (`files`)."""
    world = int(record["world_size"])
    stage = int(((record.get("config") or {}).get("distributed") or {}).get("zero_stage", 2))
    names = ["ema.safetensors", "mp_rank_00_model_states.pt"] + [f"rng_rank{r}.pt" for r in range(world)]
    if stage in (1, 2):
        names += [f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt" for r in range(world)]
    return names


def pickle_problem(path: Path, trust: bool = False) -> str | None:
    """Why a torch file cannot be loaded safely (unreadable, or it names code), else None. Reads
    the archive's directory and its pickle, not the tensor data."""
    try:
        names = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
    except Exception as err:  # truncated, not a zip archive, a torn pickle
        return f"{path.name} is unreadable ({type(err).__name__}: {str(err).splitlines()[0][:120] if str(err) else ''})"
    bad = sorted(set(names) - set(SAFE_GLOBALS))
    if bad and not trust:
        return (f"{path.name} refers to {', '.join(bad[:3])}, which a training checkpoint never "
                "needs (loading it would run code)")
    return None


def module_shapes(ckpt_dir: Path, trust: bool = False) -> dict[str, tuple[int, ...]] | None:
    """{parameter or buffer name: shape} of the network a checkpoint holds (DeepSpeed's model
    file, memory-mapped, weights-only), without DeepSpeed; None where there is no readable model
    file (`problems` names what is wrong)."""
    files = sorted(Path(ckpt_dir).glob("mp_rank_*_model_states.pt"))
    if not files:
        return None
    try:
        with weights_only_loads(trust):
            held = torch.load(files[0], map_location="cpu", mmap=True).get("module") or {}
    except Exception:  # noqa: BLE001 - unreadable: the checkpoint checks refuse it
        return None
    return {k: tuple(v.shape) for k, v in held.items() if hasattr(v, "shape")}


def problems(ckpt_dir: Path, trust: bool = False) -> str | None:
    """None if `ckpt_dir` is a complete checkpoint whose every file is present, of the recorded
    size and readable (lct_state.json parses, EMA header, each pickle's directory and its
    classes); else what is wrong, in a few words. Reads no tensor data."""
    d = Path(ckpt_dir)
    if not (d / COMPLETE).is_file():
        return "no COMPLETE marker"
    try:
        record = read_state(d)
        record["state"], record["world_size"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        return f"lct_state.json is unreadable ({type(err).__name__})"
    files = record.get("files") or {n: None for n in expected_files(record)}
    for name, size in sorted(files.items()):
        p = d / name
        if not p.is_file():
            return f"{name} is missing"
        actual = p.stat().st_size
        if (size is not None and actual != size) or actual == 0:
            return f"{name} has {actual} bytes, {size} were written" if size is not None else f"{name} is empty"
        if name.endswith(".safetensors"):
            try:
                with safe_open(str(p), "pt") as f:
                    f.keys()
            except Exception as err:
                return f"{name} is unreadable ({type(err).__name__})"
        elif name.endswith(".pt"):
            problem = pickle_problem(p, trust)
            if problem:
                return problem
    return None


def set_aside(ckpt_dir: Path, root: Path) -> Path:
    """Move a damaged checkpoint to `root/damaged/<tag>[.N]` (kept for inspection, never resumed
    or rotated); returns the new place."""
    dest_root = Path(root) / DAMAGED
    dest_root.mkdir(parents=True, exist_ok=True)
    dest = dest_root / Path(ckpt_dir).name
    n = 1
    while dest.exists():
        dest, n = dest_root / f"{Path(ckpt_dir).name}.{n}", n + 1
    os.replace(ckpt_dir, dest)
    return dest


def remove_incomplete(root: Path) -> list[str]:
    """Delete checkpoint folders without COMPLETE (saves a crash interrupted); only while the run
    directory is locked, so no save is in flight. Returns their tags."""
    root = Path(root)
    if not root.is_dir():
        return []
    gone = []
    for p in root.iterdir():
        if TAG_RE.match(p.name) and p.is_dir() and not (p / COMPLETE).is_file():
            shutil.rmtree(p, ignore_errors=True)
            gone.append(p.name)
    return sorted(gone)


# ----------------------------------------------------------------------------------------------
# Another world size: DeepSpeed universal checkpoints
# ----------------------------------------------------------------------------------------------

UNIVERSAL = "universal"


def enable_universal(engine) -> None:
    """Mark the engine's saves convertible by `deepspeed.checkpoint.ds_to_universal` (it refuses a
    checkpoint without `universal_checkpoint_info`; a plain data-parallel model needs no more)."""
    from deepspeed.checkpoint.constants import (UNIVERSAL_CHECKPOINT_INFO, UNIVERSAL_CHECKPOINT_VERSION_KEY,
                                                UNIVERSAL_CHECKPOINT_VERSION_VALUE)

    if getattr(engine.module, UNIVERSAL_CHECKPOINT_INFO, None) is None:
        setattr(engine.module, UNIVERSAL_CHECKPOINT_INFO,
                {UNIVERSAL_CHECKPOINT_VERSION_KEY: UNIVERSAL_CHECKPOINT_VERSION_VALUE})


def universal_dir(ckpt_dir: Path) -> Path:
    return Path(ckpt_dir) / UNIVERSAL


def to_universal(ckpt_dir: Path, trust: bool = False) -> Path:
    """Convert a ZeRO-1/2 checkpoint into `ckpt_dir/universal/` (once; marked COMPLETE), which
    DeepSpeed loads on any number of ranks. Runs DeepSpeed's converter in a child process, with
    the same weights-only loading as a resume."""
    out = universal_dir(ckpt_dir)
    if (out / COMPLETE).is_file():
        return out
    tmp = out.with_name(f".{UNIVERSAL}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    workers = str(max(1, min(4, (os.cpu_count() or 1))))
    cmd = [sys.executable, "-c", "import sys; from lct.checkpoint import _convert; _convert(sys.argv[1:])",
           str(ckpt_dir), str(tmp), workers, "1" if trust else "0"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-3:])
        raise RuntimeError(f"converting {ckpt_dir} to a universal checkpoint failed:\n{tail}")
    write_atomic(tmp / COMPLETE, "")
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    return out


def _convert(argv: list[str]) -> None:
    """Child process of `to_universal`: DeepSpeed's ds_to_universal with its own arguments."""
    src, dst, workers, trust = argv
    if trust != "1":
        os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"  # its workers inherit both
        torch.serialization.add_safe_globals(safe_globals())
    from deepspeed.checkpoint import ds_to_universal

    sys.argv = ["ds_to_universal", "--input_folder", src, "--output_folder", dst, "--inject_missing_state",
                "--num_extract_workers", workers, "--num_merge_workers", "1"]
    ds_to_universal.main(ds_to_universal.parse_arguments())
