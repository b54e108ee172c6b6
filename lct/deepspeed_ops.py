"""DeepSpeed's CPU communication op: where it is built, and saying so before it is.

On a machine without a GPU, DeepSpeed compiles its shared-memory collective op
(`deepspeed_shm_comm`, C++) the first time a process group starts, with torch's JIT extension
builder, into `TORCH_EXTENSIONS_DIR` (torch's default: `~/.cache/torch_extensions/py311_cu130/`,
one folder for every environment on the machine, so two environments with other torch or
DeepSpeed versions rebuild it over each other at every start, minutes of silence each time).

`prepare()` (called by `lct.dist.init` before DeepSpeed starts its group) sets a per-environment
default, `<sys.prefix>/var/lct/torch_extensions/torch-<version>/` (the user's cache folder, keyed
by the environment's path, where sys.prefix is not writable); a `TORCH_EXTENSIONS_DIR` the user
set is kept. When the op is not built there yet, or its sources are newer, local rank 0 prints one
line before the build starts. `python -m lct.deepspeed_ops` builds it ahead of time (`make
install` does).
"""

from __future__ import annotations

import hashlib
import os
import sys
import time
from pathlib import Path

import torch

OP = "ShareMemCommBuilder"
ENV = "TORCH_EXTENSIONS_DIR"
BUILD_MINUTES = "1-3"  # measured: see README, "DeepSpeed's CPU op"


def extensions_dir() -> Path:
    """This environment's default build folder for torch JIT extensions."""
    tag = f"torch-{torch.__version__}"
    if os.access(sys.prefix, os.W_OK):
        return Path(sys.prefix) / "var" / "lct" / "torch_extensions" / tag
    key = hashlib.sha256(os.path.realpath(sys.prefix).encode()).hexdigest()[:12]
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "lct" / "torch_extensions" / f"env-{key}" / tag


def cpu_op():
    """DeepSpeed's op builder of the CPU communication op where DeepSpeed will JIT-build it here
    (CPU accelerator, compatible, not shipped prebuilt), else None."""
    import deepspeed.ops
    from deepspeed.accelerator import get_accelerator

    acc = get_accelerator()
    if acc.device_name() != "cpu":
        return None
    builder = acc.create_op_builder(OP)
    if builder is None or not deepspeed.ops.__compatible_ops__.get(builder.NAME, False):
        return None
    from deepspeed.git_version_info import accelerator_name, installed_ops

    if installed_ops.get(builder.name, False) and accelerator_name == acc._name:
        return None
    return builder


def needs_build(builder, root: Path) -> bool:
    """True if `root` has no built op, or one older than its sources and headers."""
    lib = root / builder.name / f"{builder.name}.so"
    if not lib.is_file():
        return True
    built = lib.stat().st_mtime
    files = [Path(builder.deepspeed_src_path(p)) for p in builder.sources()]
    for inc in builder.include_paths():
        d = Path(builder.deepspeed_src_path(inc))
        files += [f for f in d.rglob("*") if f.is_file()] if d.is_dir() else []
    return any(f.is_file() and f.stat().st_mtime > built for f in files)


def prepare(local_rank: int = 0) -> Path:
    """Set this environment's `TORCH_EXTENSIONS_DIR` unless the user set one, and (local rank 0)
    say in one line when DeepSpeed is about to build its CPU op. Returns the folder."""
    root = Path(os.environ.setdefault(ENV, str(extensions_dir())))
    builder = cpu_op()
    if builder is not None and local_rank == 0 and needs_build(builder, root):
        print(f"building DeepSpeed's CPU communication op ({builder.name}) in {root}: one time for this "
              f"environment, about {BUILD_MINUTES} min", file=sys.stderr, flush=True)
    return root


def main(argv: list[str] | None = None) -> int:
    """Build the op now (`make install`), so the first training start does not."""
    root = prepare()
    builder = cpu_op()
    if builder is None:
        print("DeepSpeed needs no CPU op build here (a GPU, or the op came prebuilt)")
        return 0
    t = time.time()
    builder.load()
    print(f"DeepSpeed's {builder.name} op is ready in {root} ({time.time() - t:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
