"""Shared test setup: the repository root, a CPU-only environment, and a subprocess helper."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# CPU everywhere, quiet libraries, no hub access.
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def run_cmd(args, cwd=ROOT, env=None, timeout=600, check=False):
    """Run a command; returns CompletedProcess with text stdout/stderr."""
    e = dict(os.environ)
    e.update(env or {})
    e.setdefault("PYTHONUNBUFFERED", "1")
    proc = subprocess.run(args, cwd=cwd, env=e, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{args} exited {proc.returncode}\nstdout:\n{proc.stdout[-4000:]}\n"
                             f"stderr:\n{proc.stderr[-4000:]}")
    return proc


@pytest.fixture
def python():
    return sys.executable
