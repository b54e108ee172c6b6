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
checkpoint with its size and sha256, hashed while it is written (`save_torch`, `hashed_writes`
around DeepSpeed's checkpoint engine, the EMA file's bytes); COMPLETE holds the sha256 of every
file, lct_state.json included, in `sha256sum` format (`cd stepN && sha256sum -c COMPLETE`).
`problems` checks them (present, that size, readable, no code, then the hashes) before a resume
loads anything, and `set_aside` moves a damaged checkpoint to `checkpoints/damaged/`. The same
holds for `stepN/universal/` (`universal_problems`).

A checkpoint is code as much as data: DeepSpeed's files are pickles. lct reads them only with
`torch.load(weights_only=True)` and an allow-list of the exact classes DeepSpeed's state holds
(`SAFE_GLOBALS`, `weights_only_loads`); a file that needs anything else is refused unless the user
trusts it (`run.trust_checkpoint_code`).
"""

from __future__ import annotations

import contextlib
import hashlib
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

from lct.files import file_sha256, write_atomic

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


# ----------------------------------------------------------------------------------------------
# Writing with content hashes
# ----------------------------------------------------------------------------------------------


class HashingWriter:
    """A write-only file object that hashes (sha256) what passes through it: `torch.save` into it
    streams each record to the file and the hash, so no byte is read back."""

    def __init__(self, f):
        self.f, self.sha, self.bytes = f, hashlib.sha256(), 0

    def write(self, data) -> int:
        self.sha.update(data)
        self.bytes += memoryview(data).nbytes
        return self.f.write(data)

    def flush(self) -> None:
        self.f.flush()

    def record(self) -> dict:
        return {"bytes": self.bytes, "sha256": self.sha.hexdigest()}


def save_torch(obj: Any, path: Path, **kw) -> dict:
    """`torch.save(obj, path)`, hashed while written; returns {"bytes", "sha256"}. Not fsynced,
    as DeepSpeed's own writes: a file the OS lost after COMPLETE was written fails its hash."""
    with open(path, "wb") as f:
        w = HashingWriter(f)
        torch.save(obj, w, **kw)
    return w.record()


@contextlib.contextmanager
def hashed_writes(engine) -> Iterator[dict[str, dict]]:
    """Within the block, the files DeepSpeed's `TorchCheckpointEngine` writes (model states, ZeRO
    partitions: plain `torch.save` of a state dict) are written through `save_torch` instead;
    yields {file name: record} as they are written. Another checkpoint engine is left alone (its
    files are hashed by reading them back, `file_record`)."""
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    written: dict[str, dict] = {}
    ce = getattr(engine, "checkpoint_engine", None)
    if type(ce) is not TorchCheckpointEngine:
        yield written
        return

    def save_hashed(state_dict, path):
        written[os.path.basename(path)] = save_torch(
            state_dict, Path(path), _use_new_zipfile_serialization=ce.zipfile_serialization)

    ce.save = save_hashed
    try:
        yield written
    finally:
        del ce.save  # the class's method again


def file_record(path: Path) -> dict:
    """{"bytes", "sha256"} of a file on disk (one streaming read)."""
    return {"bytes": Path(path).stat().st_size, "sha256": file_sha256(path)}


def save_ema_file(path: Path, emas: dict[str, dict[str, torch.Tensor]]) -> dict:
    """All EMAs in one safetensors file, keys `<ema name>/<parameter name>`; returns its record."""
    flat = {f"{name}/{k}": v.contiguous() for name, sd in emas.items() for k, v in sd.items()}
    data = save(flat)
    write_atomic(path, data)
    return {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def load_ema_file(path: Path) -> dict[str, dict[str, torch.Tensor]]:
    out: dict[str, dict[str, torch.Tensor]] = {}
    for key, v in load_file(str(path)).items():
        name, _, param = key.partition("/")
        out.setdefault(name, {})[param] = v
    return out


def mark_complete(ckpt_dir: Path, state: dict[str, Any], root: Path) -> None:
    """Rank 0, after every rank finished writing: state (its `files`: {name: {"bytes", "sha256"}}),
    COMPLETE (the sha256 of every file, lct_state.json's included), `latest` pointer."""
    text = (json.dumps(state, indent=1, ensure_ascii=False) + "\n").encode()
    write_atomic(Path(ckpt_dir) / "lct_state.json", text)
    sums = {n: r["sha256"] for n, r in state["files"].items()} | {"lct_state.json": hashlib.sha256(text).hexdigest()}
    write_atomic(Path(ckpt_dir) / COMPLETE, format_sums(sums))
    write_atomic(Path(root) / "latest", Path(ckpt_dir).name + "\n")


def format_sums(sums: dict[str, str]) -> str:
    """`sha256sum` format: one `<hex>  <name>` line per file, sorted."""
    return "".join(f"{h}  {n}\n" for n, h in sorted(sums.items()))


SUM_LINE = re.compile(r"^([0-9a-f]{64})  ([^\n]+)$")


def read_sums(path: Path) -> dict[str, str] | None:
    """{name: sha256} of a COMPLETE marker; {} for an empty one (lct before content hashes), None
    if it is not a list of sums."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError):
        return None
    matches = [SUM_LINE.match(line) for line in lines if line]
    if not all(matches) or any(m.group(2).startswith("/") or ".." in m.group(2).split("/") for m in matches):
        return None  # not sums, or a name that points outside the folder
    return {m.group(2): m.group(1) for m in matches}


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


def rank_files(ckpt_dir: Path, rank: int, written: dict[str, dict] | None = None) -> dict[str, dict]:
    """{name: {"bytes", "sha256"}} of the files rank `rank` wrote into a checkpoint (its ZeRO
    partition and RNG state; rank 0 also the model states): the records made while writing
    (`written`), else (another checkpoint engine) one streaming read of the file."""
    out = {}
    for p in Path(ckpt_dir).iterdir():
        n = p.name
        mine = f"_rank_{rank}_" in n or n == f"rng_rank{rank}.pt" or (rank == 0 and n.startswith("mp_rank_"))
        if p.is_file() and mine and not n.startswith("."):
            rec = (written or {}).get(n)
            out[n] = rec if rec is not None and rec["bytes"] == p.stat().st_size else file_record(p)
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


def file_problem(p: Path, size: int | None, trust: bool = False) -> str | None:
    """Why one checkpoint file cannot be loaded (missing, another size, unreadable header, a pickle
    that names code), from its directory and header alone; None if it can."""
    name = p.name
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
        return pickle_problem(p, trust)
    return None


def hash_problem(d: Path, sums: dict[str, str]) -> str | None:
    """The first file of `sums` whose content no longer has the recorded sha256 (one streaming
    read of each), else None."""
    for name, expected in sorted(sums.items()):
        if file_sha256(d / name) != expected:
            return f"{name} does not match the sha256 recorded when it was written (its bytes changed)"
    return None


def problems(ckpt_dir: Path, trust: bool = False) -> str | None:
    """None if `ckpt_dir` is a complete checkpoint whose every file is present, of the recorded
    size, readable (lct_state.json parses, EMA header, each pickle's directory and its classes)
    and, last, of the recorded content (sha256, every byte read once); else what is wrong, in a
    few words. Checkpoints of lct before content hashes (an empty COMPLETE) get all but the last."""
    d = Path(ckpt_dir)
    if not (d / COMPLETE).is_file():
        return "no COMPLETE marker"
    sums = read_sums(d / COMPLETE)
    if sums is None:
        return f"{COMPLETE} is not a list of sha256 sums"
    try:
        record = read_state(d)
        record["state"], record["world_size"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        return f"lct_state.json is unreadable ({type(err).__name__})"
    files = record.get("files") or {n: None for n in expected_files(record)}
    for name, rec in sorted(files.items()):
        problem = file_problem(d / name, rec["bytes"] if isinstance(rec, dict) else rec, trust)
        if problem:
            return problem
    if sums:
        if set(sums) != set(files) | {"lct_state.json"}:
            return f"{COMPLETE} and lct_state.json list different files"
        return hash_problem(d, sums)
    return None


def set_aside(ckpt_dir: Path, root: Path, name: str | None = None) -> Path:
    """Move a damaged checkpoint (or universal folder) to `root/damaged/<name or tag>[.N]` (kept
    for inspection, never resumed or rotated); returns the new place."""
    dest_root = Path(root) / DAMAGED
    dest_root.mkdir(parents=True, exist_ok=True)
    name = name or Path(ckpt_dir).name
    dest, n = dest_root / name, 1
    while dest.exists():
        dest, n = dest_root / f"{name}.{n}", n + 1
    os.replace(ckpt_dir, dest)
    return dest


def damaged_tags(root: Path) -> list[str]:
    """What `set_aside` holds in `root/damaged/`."""
    d = Path(root) / DAMAGED
    return sorted(p.name for p in d.iterdir()) if d.is_dir() else []


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


def universal_problems(out: Path, trust: bool = False) -> str | None:
    """None if `out` (a `universal/` folder) holds exactly the files its COMPLETE lists, none of
    whose pickles names code, each of its recorded sha256; else what is wrong."""
    sums = read_sums(out / COMPLETE)
    if not sums:
        return f"{COMPLETE} lists no sha256 sums" if sums is not None else f"{COMPLETE} is not a list of sha256 sums"
    present = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file() or p.is_symlink()} - {COMPLETE}
    if present != set(sums):
        odd = sorted(present ^ set(sums))
        return f"{odd[0]} is {'missing' if odd[0] in sums else 'not one of the files it was written with'}"
    for name in sorted(sums):
        p = out / name
        if p.is_symlink():
            return f"{name} is a link"
        if name.endswith(".pt"):
            problem = pickle_problem(p, trust)
            if problem:
                return f"{name}: {problem}"
    return hash_problem(out, sums)


def to_universal(ckpt_dir: Path, trust: bool = False) -> Path:
    """Convert a ZeRO-1/2 checkpoint into `ckpt_dir/universal/` (once; COMPLETE lists the sha256 of
    every file it holds), which DeepSpeed loads on any number of ranks. An existing one is used
    only if `universal_problems` finds nothing; else it is set aside (checkpoints/damaged/) with one
    line and made again. Runs DeepSpeed's converter in a child process, with the same
    weights-only loading as a resume; its files are hashed by reading them once after it ends
    (its worker processes write them with `torch.save`)."""
    ckpt_dir = Path(ckpt_dir)
    out = universal_dir(ckpt_dir)
    if (out / COMPLETE).is_file():
        problem = universal_problems(out, trust)
        if problem is None:
            return out
        where = set_aside(out, ckpt_dir.parent, f"{ckpt_dir.name}-{UNIVERSAL}")
        print(f"warning: universal checkpoint {out} is damaged ({problem}); moved to {where}; converting "
              f"{ckpt_dir} again", file=sys.stderr, flush=True)
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
    sums = {p.relative_to(tmp).as_posix(): file_sha256(p) for p in sorted(tmp.rglob("*")) if p.is_file()}
    write_atomic(tmp / COMPLETE, format_sums(sums))
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
