"""Tiny stand-ins for the real data-prep inputs, for tests (no downloads, CPU, seconds).

    vae_dir = make_tiny_vae(tmp / "vae")                      # AutoencoderKL.save_pretrained folder
    pattern = make_image_shards(tmp / "img", n_shards=2, per_shard=4, size=(40, 28))
    text_model, text_pretrained = tiny_text_model(), "random"  # lct-tiny-text, seeded random tower
    argv = tiny_encode_args(pattern, tmp / "lat", vae_dir)    # argv for data_prep/encode_latents.py
    samples = read_latent_dir(tmp / "lat")                    # {key: decoded sample}

Keys of `make_image_shards`: `f"{shard:05d}{index:04d}"`; shard files `{shard:05d}.tar`.
"""

from __future__ import annotations

import io
import json
import os
import sys
import tarfile
from pathlib import Path
from typing import Callable, Iterable

import numpy as np

TINY_TEXT_MODEL = "lct-tiny-text"  # lct/assets/lct-tiny-text.json (width 128, 2 layers, context 77)


def make_tiny_vae(directory: str | os.PathLike, latent_channels: int = 4, downsample: int = 4,
                  seed: int = 0) -> str:
    """A small random `AutoencoderKL` (downsampling factor `downsample`, a power of 2) saved with
    `save_pretrained`; returns the folder (reused when it already holds one)."""
    import torch
    from diffusers import AutoencoderKL

    directory = Path(directory)
    if (directory / "config.json").is_file():
        return str(directory)
    blocks = int(round(np.log2(downsample))) + 1
    if 2 ** (blocks - 1) != downsample:
        raise ValueError(f"downsample must be a power of 2, got {downsample}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * blocks,
                            up_block_types=("UpDecoderBlock2D",) * blocks,
                            block_out_channels=tuple([8] + [16] * (blocks - 1)), layers_per_block=1,
                            latent_channels=latent_channels, norm_num_groups=8, sample_size=32)
    vae.save_pretrained(str(directory))
    return str(directory)


def tiny_text_model() -> str:
    """The open_clip model name of lct's tiny text config (use with pretrained "random")."""
    return TINY_TEXT_MODEL


def make_tiny_text_tower(directory: str | os.PathLike, seed: int = 0) -> tuple[str, str]:
    """Save a seeded random tiny tower as an open_clip checkpoint; returns (model, checkpoint path),
    usable as `--text-model`, `--text-pretrained`."""
    from lct.text import TextEncoder

    enc = TextEncoder.load(TINY_TEXT_MODEL, "random", seed=seed, save_dir=directory)
    return TINY_TEXT_MODEL, str(enc.tower_file)


def _image_bytes(rng: np.random.Generator, size: tuple[int, int], fmt: str) -> bytes:
    from PIL import Image

    w, h = size
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([xx * 255 / max(w - 1, 1), yy * 255 / max(h - 1, 1), np.full_like(xx, rng.integers(256))], -1)
    arr = np.clip(base + rng.normal(0, 30, (h, w, 3)), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format={"jpg": "JPEG", "png": "PNG", "webp": "WEBP"}[fmt],
                              **({"quality": 95} if fmt == "jpg" else {}))
    return buf.getvalue()


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o644
    tar.addfile(info, io.BytesIO(data))


def make_image_shards(directory: str | os.PathLike, n_shards: int = 2, per_shard: int = 4,
                      size: int | tuple[int, int] = (40, 28), *, corrupt: Iterable[tuple[int, int]] = (),
                      missing_caption: Iterable[tuple[int, int]] = (), empty: Iterable[int] = (),
                      captions_per_sample: int = 3, fmt: str = "jpg", seed: int = 0) -> str:
    """img2dataset-style shards `{shard:05d}.tar` with `{key}.{fmt}`, `{key}.txt` and `{key}.json`
    (`captions`: a list, `caption`: the first). `size` is (width, height) (non-square exercises the
    center crop). `corrupt` / `missing_caption`: (shard, index) pairs that get invalid image bytes /
    no caption at all (no txt, json without captions). `empty`: shard indices written with no
    sample. Returns the brace pattern of the shards."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    size = (size, size) if isinstance(size, int) else tuple(size)
    corrupt, missing_caption, empty = set(map(tuple, corrupt)), set(map(tuple, missing_caption)), set(empty)
    rng = np.random.default_rng(seed)
    for s in range(n_shards):
        with tarfile.open(directory / f"{s:05d}.tar", "w", format=tarfile.USTAR_FORMAT) as tar:
            if s in empty:
                continue
            for i in range(per_shard):
                key = f"{s:05d}{i:04d}"
                caps = [f"caption {j} of image {key}: a {['red', 'green', 'blue'][j % 3]} thing"
                        for j in range(captions_per_sample)]
                data = _image_bytes(rng, size, fmt)
                if (s, i) in corrupt:
                    data = b"\xff\xd8\xff\xe0 this is not a jpeg" + data[len(data) // 2:][:50]
                meta = {"key": key, "status": "success", "width": size[0], "height": size[1]}
                if (s, i) not in missing_caption:
                    meta.update(caption=caps[0], captions=caps)
                _add(tar, f"{key}.{fmt}", data)
                if (s, i) not in missing_caption:
                    _add(tar, f"{key}.txt", caps[0].encode())
                _add(tar, f"{key}.json", json.dumps(meta).encode())
    last = n_shards - 1
    if n_shards == 1:
        return str(directory / "00000.tar")
    return str(directory / f"{{00000..{last:05d}}}.tar")


def write_tar(path: str | os.PathLike, members: Iterable[tuple[str, bytes]]) -> Path:
    """A USTAR tar of (name, bytes) members in order (what img2dataset and TarWriter write)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members:
            _add(tar, name, data)
    return path


def tar_members(path: str | os.PathLike) -> list[tuple[str, bytes]]:
    with tarfile.open(path) as tar:
        return [(m.name, tar.extractfile(m).read()) for m in tar.getmembers() if m.isreg()]


def cut_points(path: str | os.PathLike) -> dict[str, int]:
    """Byte offsets at which to truncate a tar: at the member boundary in the middle (a header
    starts there), inside that header block, inside that member's data, and where the
    end-of-archive marker starts (after the last member)."""
    with tarfile.open(path) as tar:
        members = tar.getmembers()
    mid = members[len(members) // 2]
    last = members[-1]
    end = last.offset_data + ((last.size + 511) // 512) * 512
    return {"member_boundary": mid.offset, "inside_header": mid.offset + 100,
            "inside_data": mid.offset_data + max(1, mid.size // 2), "before_end_marker": end}


def expected_keys(n_shards: int, per_shard: int, skip: Iterable[tuple[int, int]] = (),
                  empty: Iterable[int] = ()) -> dict[str, list[str]]:
    """{shard name: keys in order} that `make_image_shards` produces minus skipped samples."""
    skip, empty = set(map(tuple, skip)), set(empty)
    return {f"{s:05d}": [f"{s:05d}{i:04d}" for i in range(per_shard) if (s, i) not in skip]
            for s in range(n_shards) if s not in empty}


def tiny_encode_args(input_pattern: str, output: str | os.PathLike, vae: str, *, resolution: int = 16,
                     batch_size: int = 3, num_workers: int = 0, extra: Iterable[str] = ()) -> list[str]:
    """argv for `data_prep/encode_latents.py` with the tiny VAE and the tiny random text tower."""
    return ["--input", str(input_pattern), "--output", str(output), "--vae", str(vae),
            "--resolution", str(resolution), "--text-model", TINY_TEXT_MODEL, "--text-pretrained", "random",
            "--batch-size", str(batch_size), "--num-workers", str(num_workers), "--device", "cpu", *extra]


def read_latent_dir(directory: str | os.PathLike) -> dict[str, dict[str, dict]]:
    """{shard name: {key: decoded sample}} of every `*.tar` in a latent output folder."""
    from lct.latents import read_latent_shard

    out = {}
    for p in sorted(Path(directory).glob("*.tar")):
        samples = read_latent_shard(str(p))
        out[p.stem] = {s["key"]: s for s in samples}
        if len(out[p.stem]) != len(samples):
            raise AssertionError(f"{p}: duplicate keys")
    return out


def tampered_latent_dir(src: str | os.PathLike, dst: str | os.PathLike, shard: str,
                        edits: dict[int, "Callable[[dict], list | dict | None]"]) -> Path:
    """A copy of the latent data set `src` in which sample i of `shard` (e.g. "00000") is replaced
    by `edits[i](members)`: a members dict, a list of them (repeats), or None (dropped). The
    manifest's record of the shard's size is updated, as if the shard had been encoded that way."""
    import shutil

    src, dst = Path(src), Path(dst)
    shutil.copytree(src, dst)
    path = dst / f"{shard}.tar"
    samples: list[dict] = []
    for name, data in tar_members(path):
        key, suffix = name.split(".", 1)
        if not samples or samples[-1]["__key__"] != key:
            samples.append({"__key__": key})
        samples[-1][suffix] = data
    out = []
    for i, s in enumerate(samples):
        new = edits[i](dict(s)) if i in edits else s
        out += new if isinstance(new, list) else ([new] if new is not None else [])
    write_tar(path, [(f"{s['__key__']}.{k}", v) for s in out for k, v in s.items() if k != "__key__"])
    m = json.loads((dst / "manifest.json").read_text())
    for rec in m["shards"]:
        if rec["name"] == shard:
            rec["bytes"] = path.stat().st_size
    (dst / "manifest.json").write_text(json.dumps(m))
    return dst


def npy(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    return buf.getvalue()


def from_npy(data: bytes) -> np.ndarray:
    return np.load(io.BytesIO(data), allow_pickle=False)


def hold_lock(path: str | os.PathLike):
    """A subprocess holding `lct.shards.FileLock(path)` until its stdin closes (`p.stdin.close()`);
    returned once the lock is held."""
    import subprocess
    import sys

    code = ("import sys; from lct.shards import FileLock; lock = FileLock(sys.argv[1]); "
            "ok = lock.acquire(); print('held' if ok else 'busy', flush=True); sys.stdin.read()")
    p = subprocess.Popen([sys.executable, "-c", code, str(path)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                         text=True)
    if p.stdout.readline().strip() != "held":
        p.kill()
        raise AssertionError(f"could not take {path}")
    return p


def square_golden_inputs(directory: str | os.PathLike) -> tuple[str, str]:
    """(input pattern, tiny VAE folder) of tests/data/square_golden.json: 3 PNG shards (lossless, so
    the pixels do not depend on a JPEG codec) of landscape, portrait and square images."""
    directory = Path(directory)
    vae = make_tiny_vae(directory / "vae", latent_channels=4, downsample=4)
    for i, (size, n) in enumerate((((40, 28), 3), ((24, 44), 3), ((30, 30), 2))):
        src = make_image_shards(directory / f"src{i}", n_shards=1, per_shard=n, size=size, fmt="png", seed=10 + i)
        (directory / "img").mkdir(parents=True, exist_ok=True)
        os.replace(src, directory / "img" / f"{i:05d}.tar")
    return str(directory / "img" / "{00000..00002}.tar"), vae


def run_forked(argv, envs: list[dict], timeout: float = 120) -> list[int]:
    """Run encode_latents' main in forked child processes, one per env dict, concurrently (no
    import cost; each is an independent process reading its own RANK/WORLD_SIZE); returns their
    exit codes."""
    import multiprocessing as mp

    import torch

    from lct.data_prep.encode_latents import main as encode

    def target(env):
        os.environ.update(env)
        torch.set_num_threads(1)
        try:
            code = encode(argv)
        except BaseException as err:
            print(f"forked encode_latents failed: {err!r}", file=sys.stderr, flush=True)
            os._exit(1)
        os._exit(code or 0)

    procs = [mp.get_context("fork").Process(target=target, args=(env,)) for env in envs]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout)
    for p in procs:
        if p.exitcode is None:
            p.kill()
            p.join()
            raise AssertionError("forked encode_latents timed out")
    return [p.exitcode for p in procs]
