"""How good a VAE is enough: held-out PSNR against what the generator's metric still reads in the
reconstructions, for VAEs trained a few step counts (README, "How good a VAE is enough").

    python data_prep/make_digits.py --output data/digits
    python bench/vae_psnr.py --digits data/digits --steps 80 150 300 --out bench/results/vae_psnr

For each step count: `data_prep/train_vae.py` (its defaults, 8 latent channels, 32 px), then the
digit classifier of make_digits.py on the held-out reconstructions (decode of the posterior mean)
and on the originals. One JSON line per run in OUT/results.jsonl.
"""

if __name__ == "__main__" and __package__ in (None, ""):  # run as a file: repo root, not this folder, first on sys.path
    import sys, pathlib; sys.path[0] = str(pathlib.Path(__file__).resolve().parents[1])

import argparse
import io
import json
import time
from pathlib import Path

import numpy as np
import torch


def heldout(digits: Path):
    import webdataset as wds
    from PIL import Image

    images, labels = [], []
    for s in wds.WebDataset(str(digits / "heldout" / "00000.tar"), shardshuffle=False):
        images.append(np.asarray(Image.open(io.BytesIO(s["png"])).convert("RGB")))
        labels.append(json.loads(s["json"])["label"])
    return np.stack(images), np.array(labels)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="bench/vae_psnr.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--digits", required=True, help="the --output of data_prep/make_digits.py")
    p.add_argument("--steps", type=int, nargs="+", default=[80, 150, 300])
    p.add_argument("--latent-channels", type=int, default=8)
    p.add_argument("--out", default="bench/results/vae_psnr")
    args = p.parse_args(argv)
    from diffusers import AutoencoderKL

    from lct.data_prep import train_vae
    from lct.eval.digits_metric import load_classifier, predict

    digits, out = Path(args.digits), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    net, meta = load_classifier(digits / "classifier.safetensors")
    size = int(meta["size"])
    images, labels = heldout(digits)
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1
    real = float((predict(net, images, size) == labels).mean())
    for steps in args.steps:
        vae_dir = out / f"vae_{steps}"
        t = time.time()
        train_vae.main(["--input", str(digits / "train" / "*.tar"), "--heldout", str(digits / "heldout" / "*.tar"),
                        "--output", str(vae_dir), "--resolution", str(images.shape[1]), "--downsample", "4",
                        "--latent-channels", str(args.latent_channels), "--steps", str(steps), "--no-progress"])
        vae = AutoencoderKL.from_pretrained(str(vae_dir), low_cpu_mem_usage=False).eval()
        with torch.no_grad():
            y = vae.decode(vae.encode(x).latent_dist.mean).sample.clamp(-1, 1)
        u8 = ((y + 1) * 127.5).round().clamp(0, 255).byte().permute(0, 2, 3, 1).numpy()
        rec = json.loads((vae_dir / "train_vae.json").read_text())
        row = {"steps": steps, "latent_channels": args.latent_channels, "heldout_psnr": rec["heldout_psnr"],
               "accuracy_reconstructions": float((predict(net, u8, size) == labels).mean()),
               "accuracy_originals": real, "n": int(len(labels)), "seconds": round(time.time() - t, 1)}
        print(json.dumps(row), flush=True)
        with open(out / "results.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
