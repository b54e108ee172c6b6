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
into the same directory and rank 0 marks it complete).
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

import torch
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
