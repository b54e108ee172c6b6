"""Shared test setup: the repository root, a CPU-only environment, and a subprocess helper."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

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


# ---------------------------------------------------------------------------------------------
# A tiny latent data set made by the real data prep (shapes -> random tiny VAE -> latents)
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def latent_data(tmp_path_factory):
    """{"train": dir, "heldout": dir, "vae": dir}: 96 shapes at 16 px, 4x4x4 latents, tiny text."""
    import torch

    from helpers_data import make_tiny_vae
    from lct.data_prep import encode_latents, make_shapes

    root = tmp_path_factory.mktemp("latents")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert make_shapes.main(["--output", str(root / "shapes"), "--num", "96", "--size", "16",
                                 "--samples-per-shard", "48", "--heldout", "32", "--seed", "0"]) == 0
        vae = make_tiny_vae(root / "vae", latent_channels=4, downsample=4)
        common = ["--vae", str(vae), "--resolution", "16", "--text-model", "lct-tiny-text",
                  "--num-workers", "0", "--device", "cpu", "--batch-size", "32"]
        assert encode_latents.main(["--input", str(root / "shapes" / "{00000..00001}.tar"),
                                    "--output", str(root / "train"), "--text-pretrained", "random",
                                    "--flip", *common]) == 0
        tower = root / "train" / "text_tower" / "open_clip_model.safetensors"
        assert encode_latents.main(["--input", str(root / "shapes" / "heldout" / "00000.tar"),
                                    "--output", str(root / "heldout"), "--text-pretrained", str(tower),
                                    *common]) == 0
    finally:
        torch.set_num_threads(threads)
    return {"train": root / "train", "heldout": root / "heldout", "vae": Path(vae), "root": root}


def tiny_train_config(tmp_path, latent_data, name="tiny.yaml", **sections):
    """A small trainer config on the tiny latent data; `sections` deep-override it."""
    import yaml

    cfg = {
        "run": {"dir": str(tmp_path / "run"), "total_steps": 6, "save_every": 3, "log_every": 1, "seed": 0},
        "method": {"preset": "ilct"},
        "model": {"arch": "DiT-S/2", "hidden_size": 32, "depth": 2, "num_heads": 2},
        "data": {"shards": str(latent_data["train"]), "val_shards": str(latent_data["heldout"]),
                 "mode": "indexed", "num_workers": 0, "text": "on_the_fly"},
        "optim": {"batch_size": 8},
        "precision": "fp32",
        "distributed": {"zero_stage": 2},
        "ema": {"models": [{"name": "ema", "halflife_images": 200}, {"name": "slow", "halflife_images": 2000}],
                "sample": "ema"},
        "sample": {"every": 3, "num": 4},
        "val": {"every": 3, "batch_size": 16, "buckets": 4},
    }
    for section, values in sections.items():
        if isinstance(values, dict):
            cfg.setdefault(section, {}).update(values)
        else:
            cfg[section] = values
    path = Path(tmp_path) / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(cfg))
    return path
