"""Eval throughput: 1-step samples/s including VAE decode and FID Inception features.

    python bench/sample.py --arch DiT-B/2 --batch 64 --out OUT     # GPU, 256 px, SD-VAE architecture
    python bench/sample.py --tiny                                   # CPU smoke run (CI)

The path is the one `eval/clip_fid.py` runs per batch: `lct.pipeline.LCTPipeline` (SPEC 9 on the
parameterised DiT, text states of 77 tokens; `--precision bf16_trunk`: the trunk's weights in bf16
as `torch_dtype=torch.bfloat16` gives them), the VAE decode in fp32, uint8 conversion and
`lct.features.fid_features` (torch-fidelity's FID Inception, here with random weights, which
costs the same). Weights are random: none can be downloaded, and timing does not depend on them.
"""

from __future__ import annotations

if __name__ == "__main__" and __package__ in (None, ""):  # run as a file: repo root first on sys.path
    import pathlib
    import sys

    sys.path[0] = str(pathlib.Path(__file__).resolve().parents[1])

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch


def random_inception(path: Path) -> Path:
    """torch-fidelity's FID Inception with random weights, saved as a weights file."""
    from torch_fidelity import feature_extractor_inceptionv3 as tfi

    orig_url, orig_load = tfi.load_state_dict_from_url, tfi.FeatureExtractorInceptionV3.load_state_dict
    tfi.load_state_dict_from_url = lambda *a, **k: {}
    tfi.FeatureExtractorInceptionV3.load_state_dict = lambda self, sd, *a, **k: None
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model = tfi.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    finally:
        tfi.load_state_dict_from_url, tfi.FeatureExtractorInceptionV3.load_state_dict = orig_url, orig_load
    torch.save(model.state_dict(), path)
    return path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="bench/sample.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", default="DiT-B/2")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--batches", type=int, default=8)
    p.add_argument("--precision", default="bf16_trunk", choices=["bf16_trunk", "tf32", "fp32"])
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    from diffusers import AutoencoderKL

    import numpy as np

    from lct.config import load_config
    from lct.engine import set_precision
    from lct.features import fid_features, load_fid_inception
    from lct.models import build_dit
    from lct.pipeline import LCTPipeline
    from lct.scheduler import LCTScheduler

    device = torch.device("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    set_precision(args.precision)
    res, lat = (16, (4, 4, 4)) if args.tiny else (256, (4, 32, 32))
    overrides = [f"model.arch={args.arch}"] + (["model.hidden_size=32", "model.depth=2", "model.num_heads=2"]
                                               if args.tiny else [])
    cfg = load_config(None, overrides)
    torch.manual_seed(0)
    net = build_dit(cfg.model, lat, text_dim=512, text_len=77, pooled_dim=512).eval()
    with torch.no_grad():
        for q in net.parameters():
            q.add_(0.02 * torch.randn_like(q))
    if args.tiny:
        vae = AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
                            block_out_channels=(8, 16, 16), layers_per_block=1, norm_num_groups=8)
    else:
        vae = AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                            block_out_channels=(128, 256, 512, 512), layers_per_block=2, sample_size=256)
    pipe = LCTPipeline(net, LCTScheduler(), vae.eval()).to(device)
    if args.precision == "bf16_trunk":
        pipe.transformer.to(torch.bfloat16)  # SPEC 1.1's per-sample layers stay fp32 (TextDiT.to)
    pipe.set_progress_bar_config(disable=True)
    inception = load_fid_inception(random_inception(Path(tempfile.mkdtemp()) / "inception.pth"), device)
    b = args.batch if not args.tiny else 4
    cond = {"text_states": torch.randn(b, 77, 512, device=device), "text_mask": torch.ones(b, 77, dtype=torch.bool,
                                                                                            device=device),
            "pooled": torch.randn(b, 512, device=device)}
    def one_batch(i):
        out = pipe(prompt_embeds=cond["text_states"], prompt_attention_mask=cond["text_mask"],
                   pooled_prompt_embeds=cond["pooled"], seed=0, sample_indices=range(i * b, (i + 1) * b),
                   output_type="np").images
        images = (out * 255).round().astype(np.uint8)
        return fid_features(inception, images, batch_size=b)

    one_batch(0)
    if device.type == "cuda":
        torch.cuda.synchronize()
    n = args.batches if not args.tiny else 2
    t = time.perf_counter()
    for i in range(n):
        one_batch(i + 1)
    if device.type == "cuda":
        torch.cuda.synchronize()
    secs = time.perf_counter() - t
    out = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu", "arch": args.arch,
           "resolution": res, "batch": b, "precision": args.precision,
           "samples_per_s_1step_decode_features": n * b / secs, "seconds": secs}
    print(json.dumps(out, indent=1))
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "sample.json").write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
