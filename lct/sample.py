"""Sample from a trained model: `python -m lct.sample --checkpoint RUN_OR_EXPORT --prompt "..."`.

    python -m lct.sample --checkpoint runs/lct_coco --prompt "a red bus on a street" --steps 2 --seed 0 --out out/
    python -m lct.sample --checkpoint runs/lct_coco/export/ema --prompts prompts.txt --steps 1 --out out/

Writes one PNG per sample, `captions.jsonl` (file, caption, seed, index, steps, tau, guidance, nfe)
and `grid.png` (the first `GRID_SIZE` samples). Samples through the export's diffusers pipeline (`lct.pipeline.LCTPipeline`, loaded
by lct's loader: no code from the folder runs): `pipe(captions, num_inference_steps=steps, tau=taus,
guidance_scale=w, seed=seed, sample_indices=...)` gives the same images; `--vae` /
`--text-pretrained` replace the recorded VAE / text-tower weights (for example a local copy). The
same seed gives the same images on any device count and batch size (noise keyed per sample).
"""

from __future__ import annotations

if __name__ == "__main__" and __package__ in (None, ""):  # run as a file: repo root first on sys.path
    import pathlib
    import sys

    sys.path[0] = str(pathlib.Path(__file__).resolve().parents[1])

import argparse
import json
import math
import re
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from lct.dist import pick_device
from lct.errors import UserError, cli_main
from lct.files import check_out_dir, file_sha256, read_text, write_atomic
from lct.grids import caption_grid, save_png
from lct.scheduler import nfe

GRID_SIZE = 16  # samples in grid.png (README: "the first 16"); every sample has its own PNG
GUIDANCE_HELP = ("classifier-free guidance weight w (1 = off, SPEC 9); a consistency model tolerates only "
                 "mild guidance, w close to 1 (w = 3 already ruins the shapes demo's colours): sweep it with eval")
TAU_HELP = ("intermediate sigmas, steps - 1 values, decreasing, in (0, sigma_max); default: the model's tau "
            "for 2 steps, the Karras levels for more (SPEC 9)")


def check_sampling(steps: int, taus: list[float] | None, guidance: float, prefix: str = "--") -> None:
    """One-line refusals of sampling settings, before any model is loaded (SPEC 9)."""
    if steps < 1:
        raise UserError(f"{prefix}steps {steps}: sampling needs at least 1 step (1, 2 or k)")
    if taus is not None:
        if any(not math.isfinite(t) for t in taus):
            raise UserError(f"{prefix}tau {taus}: taus must be finite numbers")
        if any(t <= 0 for t in taus) or any(b >= a for a, b in zip(taus, taus[1:])):
            raise UserError(f"{prefix}tau {taus}: taus must be positive and strictly decreasing")
    if not math.isfinite(guidance) or guidance < 0:
        raise UserError(f"{prefix}guidance {guidance}: must be a finite number >= 0 (1 = off)")


def grid_title(steps: int, taus: list[float], guidance: float, seed: int) -> str:
    tau = f", tau {', '.join(f'{t:g}' for t in taus)}" if taus else ""
    return f"{steps}-step{tau}, guidance {guidance:g}, seed {seed}"


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m lct.sample", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True, help="run directory or export directory")
    p.add_argument("--ema", default=None, help="EMA name of a run directory (default: the run's sample EMA)")
    p.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
    p.add_argument("--prompts", default=None, help="UTF-8 text file with one prompt per line")
    p.add_argument("--num-per-prompt", type=int, default=1, help="samples per prompt (>= 1)")
    p.add_argument("--steps", type=int, default=1, help="1, 2 or more sampling steps")
    p.add_argument("--tau", type=float, nargs="+", default=None, help=TAU_HELP)
    p.add_argument("--guidance", type=float, default=1.0, help=GUIDANCE_HELP)
    p.add_argument("--seed", type=int, default=0, help="noise seed (>= 0); the same seed gives the same images")
    p.add_argument("--batch-size", type=int, default=16, help="samples per forward pass (>= 1)")
    p.add_argument("--out", required=True, help="output folder (made if missing)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--vae", default=None, help="override the VAE (hub id or local dir)")
    p.add_argument("--text-pretrained", default=None, help="override the text tower weights (tag or path)")
    args = p.parse_args(argv)
    for flag, value, low in (("--seed", args.seed, 0), ("--batch-size", args.batch_size, 1),
                             ("--num-per-prompt", args.num_per_prompt, 1)):
        if value < low:
            raise UserError(f"{flag} {value}: must be >= {low}")
    if args.seed >= 2 ** 63:
        raise UserError(f"--seed {args.seed}: must be below 2**63")
    check_sampling(args.steps, args.tau, args.guidance)
    if args.tau is not None and len(args.tau) != args.steps - 1:
        raise UserError(f"--steps {args.steps} needs {args.steps - 1} --tau value(s), got {args.tau}")
    return args


class Generator:
    """An export loaded as an `LCTPipeline` (the one sampling path of lct.sample and eval), with
    the batch interface they use: `images(captions, indices, seed, steps, taus, guidance)`."""

    def __init__(self, checkpoint: str, device: torch.device, ema: str | None = None,
                 vae: str | None = None, text_pretrained: str | None = None):
        from lct.export import load_pipeline, quiet_loading, resolve_export
        from lct.model_card import export_meta

        self.path = resolve_export(checkpoint, ema)
        with quiet_loading():
            self.pipe = load_pipeline(self.path, vae=vae, text_pretrained=text_pretrained, device=device)
        self.pipe.set_progress_bar_config(disable=True)
        self.meta, self.device = export_meta(self.pipe), device
        self.vae = self.pipe.vae
        if ema is not None and self.meta.get("ema") not in (None, ema):
            raise UserError(f"--ema {ema}: {self.path} is the export of EMA {self.meta.get('ema')!r}; pass the run "
                            "directory to choose an EMA, or drop --ema")
        if self.vae is None:
            raise UserError("the export has no VAE; pass --vae ID_OR_PATH")
        self.size: tuple[int, int] | None = None  # (height, width) of `use_size`; None: the pipeline's default

    @property
    def latent_shape(self) -> tuple[int, ...]:
        return self.pipe.latent_shape_for(*(self.size or (None, None)))

    @property
    def image_size(self) -> tuple[int, int]:
        """(height, width) of the images sampled."""
        _, h, w = self.latent_shape
        return h * self.pipe.vae_scale_factor, w * self.pipe.vae_scale_factor

    def use_size(self, aspect: str, flag: str = "--aspect") -> None:
        """Sample HEIGHTxWIDTH images: a size the model trained (aspect-ratio buckets), else a one-line error."""
        m = re.fullmatch(r"\s*(\d+)\s*x\s*(\d+)\s*", str(aspect))
        if not m:
            raise UserError(f"{flag} {aspect!r}: expected HEIGHTxWIDTH in pixels, e.g. 24x40")
        try:
            self.pipe.latent_shape_for(int(m[1]), int(m[2]))
        except ValueError as err:
            raise UserError(f"{flag} {aspect}: {err}") from None
        self.size = (int(m[1]), int(m[2]))

    def weight_files(self) -> list[Path]:
        from lct.export import weight_files

        return weight_files(self.path)

    def record(self, checkpoint: str, vae: str | None = None) -> dict:
        """What was sampled, for results files: paths, step, EMA, model, weight hashes."""
        meta, model, text = self.meta, self.meta.get("model") or {}, self.meta.get("text") or {}
        return {"path": str(Path(checkpoint).resolve()), "export_dir": str(Path(self.path).resolve()),
                "step": meta.get("step"), "ema": meta.get("ema"), "arch": model.get("arch"),
                "cond": model.get("cond"), "weights_sha256": {f.name: file_sha256(f) for f in self.weight_files()},
                "vae": vae or (meta.get("vae") or {}).get("id"), "text_model": text.get("model"),
                "text_weights_sha256": text.get("weights_sha256"), "method": meta.get("method")}

    def default_taus(self, steps: int) -> list[float]:
        return self.pipe.scheduler.default_taus(steps)

    def taus(self, steps: int, taus: list[float] | None, flag: str = "--tau") -> list[float]:
        """`taus` (checked against the model's sigma_max) or the model's default for `steps`."""
        taus = self.default_taus(steps) if taus is None else [float(t) for t in taus]
        sigma_max = float(self.pipe.scheduler.config.sigma_max)
        if taus and taus[0] >= sigma_max:
            raise UserError(f"{flag} {taus}: taus must be below the model's sigma_max {sigma_max:g}")
        return taus

    @torch.no_grad()
    def images(self, captions: list[str], indices: list[int], seed: int, steps: int,
               taus: list[float] | None = None, guidance: float = 1.0) -> np.ndarray:
        """uint8 images [B,H,W,3] for the global sample `indices`: the pipeline's PIL images' pixels."""
        taus = self.default_taus(steps) if taus is None else list(taus)
        if len(taus) != steps - 1:
            raise UserError(f"--steps {steps} needs {steps - 1} tau value(s), got {taus}")
        try:
            h, w = self.size or (None, None)
            out = self.pipe(captions, num_inference_steps=steps, tau=taus, guidance_scale=guidance, seed=seed,
                            sample_indices=indices, height=h, width=w, output_type="np").images
        except ValueError as err:  # taus not decreasing, above sigma_max
            raise UserError(f"--tau: {err}") from None
        return (out * 255).round().astype(np.uint8)  # diffusers' numpy_to_pil


def main(argv=None) -> int:
    args = parse_args(argv)
    prompts = list(args.prompt)
    if args.prompts:
        prompts += [l.strip() for l in read_text(args.prompts, "--prompts").splitlines() if l.strip()]
    prompts = [p for p in (prompts or [""]) for _ in range(args.num_per_prompt)]  # "": unconditional
    out = check_out_dir(args.out, "--out")
    device = pick_device(args.device)
    gen = Generator(args.checkpoint, device, args.ema, args.vae, args.text_pretrained)
    taus = gen.taus(args.steps, args.tau)
    out.mkdir(parents=True, exist_ok=True)
    records, tiles = [], []
    for start in tqdm(range(0, len(prompts), args.batch_size), desc="sampling", unit="batch"):
        caps = prompts[start:start + args.batch_size]
        idx = list(range(start, start + len(caps)))
        imgs = gen.images(caps, idx, args.seed, args.steps, taus, args.guidance)
        for i, c, img in zip(idx, caps, imgs):
            name = f"{i:06d}.png"
            Image.fromarray(img).save(out / name)
            if len(tiles) < GRID_SIZE:
                tiles.append(img)
            records.append({"file": name, "caption": c, "seed": args.seed, "index": i, "steps": args.steps,
                            "tau": taus, "guidance": args.guidance, "nfe": nfe(args.steps, args.guidance)})
    write_atomic(out / "captions.jsonl", "".join(json.dumps(r, ensure_ascii=False, allow_nan=False) + "\n"
                                                 for r in records))
    save_png(caption_grid(tiles, [r["caption"] for r in records[:GRID_SIZE]],
                          title=grid_title(args.steps, taus, args.guidance, args.seed)), out / "grid.png")
    print(f"wrote {len(records)} images, captions.jsonl and grid.png (the first {len(tiles)}) to {out}")
    return 0


def cli() -> None:
    cli_main(main)


if __name__ == "__main__":
    cli()
