"""Sample from a trained model: `python -m lct.sample --checkpoint RUN_OR_EXPORT --prompt "..."`.

    python -m lct.sample --checkpoint runs/lct_coco --prompt "a red bus on a street" --steps 2 --seed 0 --out out/
    python -m lct.sample --checkpoint runs/lct_coco/export/ema --prompts prompts.txt --steps 1 --out out/

Writes one PNG per sample, `captions.jsonl` (file, caption, seed, index, steps, tau, guidance, nfe)
and `grid.png`. Samples through the export's diffusers pipeline (`lct.pipeline.LCTPipeline`, either
export format): `pipe(captions, num_inference_steps=steps, tau=taus, guidance_scale=w, seed=seed,
sample_indices=...)` gives the same images; `--vae` / `--text-pretrained` replace the recorded VAE /
text-tower weights (for example a local copy). The same seed gives the same images on any device
count and batch size (noise keyed per sample).
"""

from __future__ import annotations

if __name__ == "__main__" and __package__ in (None, ""):  # run as a file: repo root first on sys.path
    import pathlib
    import sys

    sys.path[0] = str(pathlib.Path(__file__).resolve().parents[1])

import argparse
import json
import sys
from pathlib import Path

import torch

from lct.dist import pick_device
from lct.errors import UserError, cli_main


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m lct.sample", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True, help="run directory or export directory")
    p.add_argument("--ema", default=None, help="EMA name of a run directory (default: the run's sample EMA)")
    p.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
    p.add_argument("--prompts", default=None, help="file with one prompt per line")
    p.add_argument("--num-per-prompt", type=int, default=1)
    p.add_argument("--steps", type=int, default=1, help="1, 2 or more sampling steps")
    p.add_argument("--tau", type=float, nargs="+", default=None,
                   help="intermediate sigmas (steps - 1 values, decreasing); default: the model's")
    p.add_argument("--guidance", type=float, default=1.0, help="classifier-free guidance weight (1 = off)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--device", default="auto")
    p.add_argument("--vae", default=None, help="override the VAE (hub id or local dir)")
    p.add_argument("--text-pretrained", default=None, help="override the text tower weights (tag or path)")
    return p.parse_args(argv)


class Generator:
    """An export loaded as an `LCTPipeline` (the one sampling path of lct.sample and eval), with
    the batch interface they use: `images(captions, indices, seed, steps, taus, guidance)`."""

    def __init__(self, checkpoint: str, device: torch.device, ema: str | None = None,
                 vae: str | None = None, text_pretrained: str | None = None):
        from lct.export import load_pipeline, resolve_export
        from lct.model_card import export_meta

        self.path = resolve_export(checkpoint, ema)
        self.pipe = load_pipeline(self.path, vae=vae, text_pretrained=text_pretrained, device=device)
        self.meta, self.device = export_meta(self.pipe), device
        self.vae = self.pipe.vae
        if self.vae is None:
            raise UserError("the export has no VAE; pass --vae ID_OR_PATH")

    @property
    def latent_shape(self) -> tuple[int, ...]:
        return self.pipe.latent_shape

    def weight_files(self) -> list[Path]:
        from lct.export import weight_files

        return weight_files(self.path)

    def default_taus(self, steps: int) -> list[float]:
        try:
            return self.pipe.scheduler.default_taus(steps)
        except ValueError as err:
            raise UserError(f"{err} (--tau)") from None

    @torch.no_grad()
    def images(self, captions: list[str], indices: list[int], seed: int, steps: int,
               taus: list[float] | None = None, guidance: float = 1.0) -> torch.Tensor:
        """Images in [-1, 1], [B,3,H,W], for the global sample `indices`."""
        taus = self.default_taus(steps) if taus is None else list(taus)
        if len(taus) != steps - 1:
            raise UserError(f"--steps {steps} needs {steps - 1} tau value(s), got {taus}")
        try:
            lat = self.pipe(captions, num_inference_steps=steps, tau=taus, guidance_scale=guidance, seed=seed,
                            sample_indices=indices, output_type="latent").images
        except ValueError as err:  # taus not decreasing, above sigma_max
            raise UserError(f"--tau: {err}") from None
        return self.pipe.decode_latents(lat)


def main(argv=None) -> int:
    args = parse_args(argv)
    from tqdm import tqdm

    from lct.grids import caption_grid, save_png, to_uint8
    from lct.samplers import nfe

    prompts = list(args.prompt)
    if args.prompts:
        path = Path(args.prompts)
        if not path.is_file():
            raise UserError(f"--prompts {path}: file not found")
        prompts += [l.strip() for l in path.read_text().splitlines() if l.strip()]
    if not prompts:
        prompts = [""]  # unconditional models; text models get the empty caption
    prompts = [p for p in prompts for _ in range(args.num_per_prompt)]
    device = pick_device(args.device)
    gen = Generator(args.checkpoint, device, args.ema, args.vae, args.text_pretrained)
    taus = args.tau if args.tau is not None else gen.default_taus(args.steps)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    records, tiles = [], []
    for start in tqdm(range(0, len(prompts), args.batch_size), desc="sampling", unit="batch"):
        caps = prompts[start:start + args.batch_size]
        idx = list(range(start, start + len(caps)))
        imgs = to_uint8(gen.images(caps, idx, args.seed, args.steps, taus, args.guidance))
        from PIL import Image

        for i, c, img in zip(idx, caps, imgs):
            name = f"{i:06d}.png"
            Image.fromarray(img).save(out / name)
            tiles.append(img)
            records.append({"file": name, "caption": c, "seed": args.seed, "index": i, "steps": args.steps,
                            "tau": taus, "guidance": args.guidance, "nfe": nfe(args.steps, args.guidance)})
    (out / "captions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    save_png(caption_grid(tiles, [r["caption"] for r in records],
                          title=f"{args.steps}-step, tau {taus}, guidance {args.guidance}, seed {args.seed}"),
             out / "grid.png")
    print(f"wrote {len(records)} images, captions.jsonl and grid.png to {out}")
    return 0


def cli() -> None:
    cli_main(main)


if __name__ == "__main__":
    cli()
