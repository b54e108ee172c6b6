"""The demos' stages as subprocesses: a banner per stage, a command that stops the demo with its
exit code when it fails, and the real DeepSpeed launcher (`lct.demo`, `lct.demo_data`)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def header(title: str) -> None:
    print(f"\n{'=' * 100}\n== {title}\n{'=' * 100}", flush=True)


def run(cmd: list[str], env: dict | None = None, cwd: Path | str = ROOT) -> None:
    print("$ " + " ".join(cmd), flush=True)
    proc = subprocess.run(cmd, cwd=cwd, env={**os.environ, **(env or {})})
    if proc.returncode != 0:
        print(f"demo: stage failed (exit {proc.returncode}): {' '.join(cmd)}", file=sys.stderr)
        sys.exit(proc.returncode)


def launcher(num_ranks: int) -> list[str]:
    """The real DeepSpeed launcher: GPUs when there are some, else CPU ranks (gloo)."""
    return [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(num_ranks),
            "--master_port", str(29500 + os.getpid() % 1000)]
