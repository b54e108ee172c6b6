"""Latent-encoding throughput: the real `encode_latents` path against a bare `vae.encode` loop.

    python bench/encode.py --tiny                                   # CPU, tiny models, seconds (CI)
    python bench/encode.py --vae /models/sd-vae-ft-ema --num-images 2048 --batch-size 64 \\
        --num-workers 8 [--precision bf16] [--text-model ViT-B-32 --text-pretrained PATH]

Both paths encode the same synthetic JPEG shards (random 4:3 images, decoded, center-cropped and
resized to --resolution) on the same device and VAE precision:
- `pipeline`: `data_prep/encode_latents.run` (DataLoader workers decode/preprocess/tokenize,
  the main process encodes, checks and writes shards and statistics); images/s counted from the
  first batch request to the last write (worker start-up included, model loading excluded), and
  the steady rate after the first batch;
- `bare_vae`: `lct.vae.encode_posterior` over pre-decoded tensors already on the device, after
  one warm-up batch.
The ratio pipeline / bare says how much of the VAE's speed the data path keeps. A table goes to
stdout and the numbers to --out (JSON). The text tower defaults to a random tower (its weights do
not change the timing).
"""

if __name__ == "__main__" and __package__ in (None, ""):  # run as a file: repo root, not this folder, first on sys.path
    import sys, pathlib; sys.path[0] = str(pathlib.Path(__file__).resolve().parents[1])

import argparse
import io
import json
import tempfile
import time
from pathlib import Path


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="bench/encode.py", description="Latent-encoding throughput: the real "
                                "encode_latents path against a bare vae.encode loop (see the file's header).")
    p.add_argument("--tiny", action="store_true", help="CPU, tiny random VAE and text tower, 48 small images")
    p.add_argument("--vae", default=None, help="AutoencoderKL folder (e.g. a local stabilityai/sd-vae-ft-ema)")
    p.add_argument("--text-model", default="ViT-B-32")
    p.add_argument("--text-pretrained", default="random")
    p.add_argument("--resolution", type=int, default=256)
    p.add_argument("--num-images", type=int, default=1024)
    p.add_argument("--images-per-shard", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--num-workers", type=int, default=8)
    p.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default="fp32")
    p.add_argument("--device", default="auto")
    p.add_argument("--flip", action="store_true")
    p.add_argument("--text-states", action="store_true")
    p.add_argument("--image-size", type=int, nargs=2, default=[512, 384], metavar=("W", "H"))
    p.add_argument("--out", default="bench_encode.json", help="JSON results")
    a = p.parse_args(argv)
    if a.tiny:
        a.text_model, a.text_pretrained, a.resolution = "lct-tiny-text", "random", 32
        a.num_images, a.images_per_shard, a.batch_size = 48, 16, 8
        a.num_workers, a.device, a.image_size = min(a.num_workers, 2), "cpu", [48, 40]
    elif not a.vae:
        p.error("--vae PATH is required without --tiny (no downloads in benchmarks)")
    return a


def tiny_vae(directory: Path) -> str:
    import torch
    from diffusers import AutoencoderKL

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        vae = AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
                            block_out_channels=(8, 16, 16), layers_per_block=1, latent_channels=4, norm_num_groups=8)
    vae.save_pretrained(str(directory))
    return str(directory)


def write_shards(directory: Path, n: int, per_shard: int, size) -> tuple[str, list[bytes]]:
    import numpy as np
    import webdataset as wds
    from PIL import Image

    rng = np.random.default_rng(0)
    directory.mkdir(parents=True, exist_ok=True)
    w, h = size
    blobs = []
    for i in range(n):
        small = rng.integers(0, 256, (h // 8 + 1, w // 8 + 1, 3), dtype=np.uint8)
        img = Image.fromarray(small).resize((w, h), Image.BILINEAR)  # smooth, JPEG-like content
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=90)
        blobs.append(buf.getvalue())
    n_shards = (n + per_shard - 1) // per_shard
    for s in range(n_shards):
        with open(directory / f"{s:05d}.tar", "wb") as f:
            tw = wds.TarWriter(f, encoder=False)
            for i in range(s * per_shard, min(n, (s + 1) * per_shard)):
                tw.write({"__key__": f"{i:09d}", "jpg": blobs[i], "txt": f"synthetic image {i}".encode(),
                          "json": json.dumps({"captions": [f"synthetic image {i}", "a test pattern"]}).encode()})
            tw.close()
    return str(directory / f"{{00000..{n_shards - 1:05d}}}.tar"), blobs


def bare_vae(a, vae_path: str, blobs: list[bytes], device) -> dict:
    import torch

    from lct.vae import encode_posterior, load_vae, open_image, preprocess_image

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[a.precision]
    vae = load_vae(vae_path, device, dtype)
    x = torch.stack([preprocess_image(open_image(b), a.resolution) for b in blobs]).to(device)
    if a.flip:
        x = torch.cat([x, x.flip(-1)])

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    b = a.batch_size * (2 if a.flip else 1)
    encode_posterior(vae, x[:b])  # warm-up (cuDNN autotuning, allocator)
    sync()
    t0 = time.perf_counter()
    for s in range(0, x.shape[0], b):
        encode_posterior(vae, x[s:s + b])
    sync()
    dt = time.perf_counter() - t0
    return {"images": len(blobs), "seconds": dt, "images_per_s": len(blobs) / dt}


def main(argv=None) -> int:
    a = parse_args(argv)
    import torch

    try:
        from lct.data_prep.encode_latents import run
    except ImportError:  # not installed: the repository root is on sys.path
        from data_prep.encode_latents import run
    from lct.tool_config import EncodeLatentsConfig
    from lct.dist import pick_device

    device = pick_device(a.device)
    with tempfile.TemporaryDirectory(prefix="lct-bench-encode-") as tmp:
        tmp = Path(tmp)
        vae_path = tiny_vae(tmp / "vae") if a.tiny else a.vae
        pattern, blobs = write_shards(tmp / "images", a.num_images, a.images_per_shard, a.image_size)
        cfg = EncodeLatentsConfig(input=pattern, output=str(tmp / "latents"), vae=vae_path, resolution=a.resolution,
                                  text_model=a.text_model, text_pretrained=a.text_pretrained, text_states=a.text_states,
                                  flip=a.flip, batch_size=a.batch_size, num_workers=a.num_workers,
                                  precision=a.precision, device=str(device.type))
        t0 = time.perf_counter()
        summary = run(cfg)
        wall = time.perf_counter() - t0
        pipe = {"images": summary["images"], "seconds": summary["seconds"], "images_per_s": summary["images_per_s"],
                "steady_images_per_s": summary["steady_images_per_s"], "wall_seconds_with_loading": wall,
                "output_bytes": summary["bytes"]}
        bare = bare_vae(a, vae_path, blobs, device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    result = {"device": name, "precision": a.precision, "resolution": a.resolution, "batch_size": a.batch_size,
              "num_workers": a.num_workers, "flip": a.flip, "text_states": a.text_states, "vae": str(vae_path if not a.tiny else "tiny"),
              "text_model": a.text_model, "pipeline": pipe, "bare_vae": bare,
              "pipeline_over_bare": pipe["images_per_s"] / bare["images_per_s"],
              "steady_pipeline_over_bare": (pipe["steady_images_per_s"] or 0.0) / bare["images_per_s"]}
    print(f"encode throughput on {name}, {a.precision}, {a.resolution}px, batch {a.batch_size}, "
          f"{a.num_workers} workers{', flip' if a.flip else ''}{', text states' if a.text_states else ''}")
    print(f"{'path':<10} {'images':>7} {'seconds':>9} {'images/s':>10}")
    for label, r in (("pipeline", pipe), ("bare_vae", bare)):
        print(f"{label:<10} {r['images']:>7} {r['seconds']:>9.2f} {r['images_per_s']:>10.1f}")
    print(f"pipeline after its first batch (no start-up): {pipe['steady_images_per_s'] or 0:.1f} images/s")
    print(f"pipeline / bare = {result['pipeline_over_bare']:.2f} (steady {result['steady_pipeline_over_bare']:.2f})")
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
