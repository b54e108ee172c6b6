"""Fit a small diffusers `AutoencoderKL` on image-text shards (images only) and `save_pretrained` it.

    python data_prep/train_vae.py --input 'data/shapes/{00000..00007}.tar' \
        --heldout data/shapes/heldout/00000.tar --output runs/vae --resolution 32 --downsample 4

The output folder loads like a hub VAE (`AutoencoderKL.from_pretrained(DIR)`, `--vae DIR` of
`encode_latents`), so a domain that a public VAE does not cover gets its own latent space.

Data: webdataset shards (`lct.data.expand_urls`: brace pattern, comma list, folder or glob), the
first image member of each sample (png/jpg/jpeg/webp/ppm/bmp, raw bytes decoded with PIL, nothing
unpickled), preprocessed by `lct.vae.preprocess_image_uint8` (center crop of the long edge,
antialiased bicubic resize) and held in memory as uint8. Held-out images: `--heldout` shards, or
else a seeded `--heldout-fraction` of `--input`.

Model and loss: `AutoencoderKL(block_out_channels=channels, down/up blocks "DownEncoderBlock2D" /
"UpDecoderBlock2D" x len(channels), layers_per_block, norm_num_groups, latent_channels,
mid_block_add_attention=mid_attention)`; downsampling = 2**(len(channels)-1) must equal
`--downsample`. Each step encodes a batch, samples z = mean + std * eps from the posterior (fp32),
decodes it, and minimises `rec + kl_weight * KL / (3*R*R)` with `rec` the per-pixel MSE (or L1)
on [-1, 1] pixels and KL to N(0, I) summed over the latent (the LDM convention: both terms summed
per image). The KL term keeps the posterior a proper Gaussian (encode_latents stores mean and std
and the trainer samples mean + std * eps). AdamW (betas 0.9, 0.99), linear warm-up, cosine decay to
`min_lr_ratio` over the larger of the step fraction and the time-budget fraction. bf16 autocast on
CUDA GPUs with bf16 support, fp32 on CPU (all cores this process may use). Deterministic on CPU for
a given seed and thread count when stopped by `--steps` (a time budget stops wherever it stops).

Outputs: `save_pretrained(DIR)` plus `DIR/train_vae.json` (config, architecture, steps, time,
final losses, a 20-point loss curve, held-out PSNR, mean posterior std, latent shape and per-channel
latent statistics, `psnr_ok` against `--min-psnr`) and `DIR/reconstructions.png` (8 held-out images
above their reconstructions, each with its PSNR; a warning names it when the held-out PSNR is below
`--min-psnr`, README "How good a VAE is enough"), written to `.DIR.tmpPID` beside it and renamed into place. A re-run whose
output folder is complete and was trained with the same config (all options but --output,
--overwrite, --progress, --device and --threads) skips training and says so; one with another
config is refused (exit 2, naming the differing options) unless `--overwrite`, which retrains and
replaces the folder. There are no mid-run checkpoints: an interrupted run starts again.

PSNR: per held-out image 10*log10(255^2 / MSE) with pixels mapped [-1, 1] -> [0, 255] as
(x + 1) * 127.5, unrounded, reconstruction = decode(posterior mean) clamped to [-1, 1]; averaged
over images. The progress bar shows the training batch's PSNR of the *sampled* latent.

Defaults (tuned for the demo: 32 px shapes, `--downsample 4`, 4x8x8 latents, on 2 CPU cores):
channels 16,32,32 (16,32,32,32 for --downsample 8: 16 then 32 per level), layers_per_block 1,
norm_num_groups 2, no mid attention, batch 16, lr 1.5e-3, 50 warm-up steps, cosine to 2 %, MSE,
kl_weight 1e-4, 1200 steps. Measured on the 2-core AMD EPYC (Zen 3) VM with
`make_shapes.py --num 8000 --size 32 --heldout 500` (load average 1.6-2.0, i.e. this job alone):

    seed   held-out PSNR   mean posterior std   training   whole command (wall)
    0      31.5 dB         0.10                 89 s       99 s
    1      32.1 dB         0.10                 89 s       99 s
    2      29.8 dB         0.16                 90 s      100 s
    (--steps 1000: 28.8 / 28.1 dB at 83 s wall; too close to the demo's 28 dB target)
    --steps 2000 (what `python -m lct.demo` passes), seed 0, 2026-11-30: 35.6 dB in 122-135 s; the
    shapes metric on held-out reconstructions is colour 0.995 / position 1.0, where 1200 steps
    (29.5 dB that day) lose the colour of small shapes (colour 0.90), which caps the demo's samples.
    Those two lines are with the earlier 0.13 small shapes; with today's 0.17 (lct.shapes.SIZES),
    seed 0: 2000 steps 35.9 dB, colour 1.0 / position 1.0; 1200 steps 31.6 dB, colour 0.993
    (300 held-out images). The demo passes `--latent-channels 8` too since 2026-12-02 (8x8x8
    latents, 38.6 dB): the shape of small shapes survives (bench/RESULTS.md, issue 24).

    64 px, --downsample 8 (4x8x8 latents, 48x fewer numbers than pixels), default channels
    16,32,32,32: 23.5 dB after a 90 s time budget (392 steps), 27.6 dB after 1200 steps (277 s).

Under CPU contention from other jobs the time per step can grow many-fold (OpenMP threads waiting
for each other); `--time-budget-minutes` caps the training time (the schedule decays within it).

How the defaults were chosen (PSNR at a fixed step count from sweeps run on a GPU in fp32, CPU
time per step measured separately with 2 threads; differences under ~1 dB are seed noise):
* MSE beats L1 by ~2 dB at equal steps (PSNR is an MSE); no LPIPS or GAN (no weights offline).
* GroupNorm removes what is constant over an image within a group, and these images are mostly
  one flat background colour: with 8 groups the first ~700 steps reconstruct grey backgrounds and
  washed-out colours; 1-2 groups (8-16 channels per group) learn colour sooner (+1 dB at 700 steps, single seeds).
* Batch 16 beats 32 at equal time (twice the updates for the same images); batch 8 does not gain
  further on 2 cores (per-step overhead). Mid-block attention, a second layer per block, a 64-channel bottom level
  or 32 channels at full resolution cost more time than they gain; 8 channels at full resolution
  lose too much.
* The posterior noise helps: a deterministic latent (no KL, logvar ~ -20) reached 24.3 dB where
  the default reached 26.7 at 700 steps; kl_weight 1e-6 .. 1e-3 are within noise, 1e-4 keeps a
  larger std. Zero-initialising the residual branches, lr 3e-3 or a low initial logvar did not help.
"""

if __name__ == "__main__" and __package__ in (None, ""):  # run as a file: repo root, not this folder, first on sys.path
    import sys, pathlib; sys.path[0] = str(pathlib.Path(__file__).resolve().parents[1])

import json
import math
import os
import shutil
import sys
import tarfile
import time
from pathlib import Path

from lct.errors import UserError, cli_main
from lct.files import atomic_dir, output_dir_problem, write_json
from lct.rng import Stream, seed_int
from lct.tool_config import TrainVAEConfig, cli_config

FORMAT_VERSION = 1
GRID_IMAGES = 8  # held-out images (top row) and their reconstructions (bottom row) in reconstructions.png
IMAGE_EXTS = ("png", "jpg", "jpeg", "webp", "ppm", "bmp")
# Options that do not change what is trained: a re-run that differs only in these still skips.
NON_RESULT_KEYS = ("output", "overwrite", "progress", "device", "threads", "min_psnr")


# ----------------------------------------------------------------------------------------------
# Architecture
# ----------------------------------------------------------------------------------------------


def default_channels(downsample: int) -> list[int]:
    """Tuned on the 32 px shapes set (module docstring); deeper levels keep the last width."""
    k = int(math.log2(downsample)) + 1
    return [16] + [32] * (k - 1)


def vae_kwargs(cfg: TrainVAEConfig) -> dict:
    """AutoencoderKL constructor arguments; raises UserError on inconsistent options."""
    if cfg.downsample & (cfg.downsample - 1):
        raise UserError(f"--downsample {cfg.downsample} is not a power of 2 (1, 2, 4, 8, ...)")
    ch = list(cfg.channels) if cfg.channels else default_channels(cfg.downsample)
    k = len(ch)
    if 2 ** (k - 1) != cfg.downsample:
        need = int(math.log2(cfg.downsample)) + 1
        raise UserError(f"--channels {','.join(map(str, ch))} has {k} entries, which gives downsample "
                        f"{2 ** (k - 1)} (2**(entries-1)); --downsample {cfg.downsample} needs {need} entries")
    if any(c < 1 for c in ch):
        raise UserError(f"--channels must be positive, got {','.join(map(str, ch))}")
    bad = [c for c in ch if c % cfg.norm_num_groups]
    if bad:
        raise UserError(f"--norm-num-groups {cfg.norm_num_groups} does not divide the channel counts {bad}")
    if cfg.resolution % cfg.downsample:
        raise UserError(f"--resolution {cfg.resolution} is not a multiple of --downsample {cfg.downsample}")
    return dict(in_channels=3, out_channels=3, block_out_channels=tuple(ch),
                down_block_types=("DownEncoderBlock2D",) * k, up_block_types=("UpDecoderBlock2D",) * k,
                layers_per_block=cfg.layers_per_block, latent_channels=cfg.latent_channels,
                norm_num_groups=cfg.norm_num_groups, sample_size=cfg.resolution,
                mid_block_add_attention=cfg.mid_attention)


# ----------------------------------------------------------------------------------------------
# Data: webdataset shards -> uint8 [N, 3, R, R] in memory
# ----------------------------------------------------------------------------------------------


def load_images(pattern: str, resolution: int, flag: str, limit: int | None = None,
                progress: bool = False):
    """All images of the shards (first image member of each sample, PIL-decoded, center-cropped
    and resized with `lct.vae.preprocess_image_uint8`) as a uint8 tensor [N, 3, R, R]. Samples
    without an image, or with an undecodable one, are skipped and counted."""
    import torch
    import webdataset as wds
    from tqdm import tqdm

    from lct.vae import open_image, preprocess_image_uint8

    from lct.data import existing_shards

    urls = existing_shards(pattern, flag)
    ds = wds.tarfile_to_samples()(wds.SimpleShardList(urls))  # raw bytes: nothing is unpickled
    out, skipped = [], 0
    bar = tqdm(desc=f"read {flag.lstrip('-')}", unit="img", disable=not progress, dynamic_ncols=True,
               leave=False)
    try:
        for sample in ds:
            ext = next((e for e in IMAGE_EXTS if e in sample), None)
            if ext is None:
                skipped += 1
                continue
            try:
                img = open_image(sample[ext])
            except Exception:  # corrupt or truncated image: skip it, like img2dataset readers
                skipped += 1
                continue
            out.append(preprocess_image_uint8(img, resolution))
            bar.update(1)
            if limit and len(out) >= limit:
                break
    except (OSError, ValueError, tarfile.TarError) as err:
        what = err.args[0] if err.args and isinstance(err.args[0], str) else str(err)
        where = err.args[-1] if len(err.args) > 1 and isinstance(err.args[-1], str) else pattern
        raise UserError(f"{flag}: could not read {where}: {type(err).__name__}: {what.splitlines()[0][:200]} "
                        "(a truncated or non-tar shard?)") from None
    finally:
        bar.close()
    if not out:
        raise UserError(f"{flag}: no decodable images in {pattern} ({skipped} samples without one)")
    return torch.stack(out), skipped


# ----------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------


def resolve_device(cfg: TrainVAEConfig):
    import torch

    from lct.dist import pick_device

    dev = pick_device(cfg.device)
    if cfg.precision == "bf16" and not (dev.type == "cuda" and torch.cuda.is_bf16_supported()):
        raise UserError("--precision bf16 needs a CUDA GPU with bf16 support; use --precision fp32 or auto")
    use_bf16 = dev.type == "cuda" and cfg.precision != "fp32" and torch.cuda.is_bf16_supported()
    return dev, use_bf16


def lr_factor(step: int, progress: float, cfg: TrainVAEConfig) -> float:
    """Linear warm-up over `warmup_steps`, then cosine from 1 to `min_lr_ratio` over `progress`
    (the larger of the step and time fractions used, so a time budget decays the rate too)."""
    from lct.engine import cosine_decay

    warm = min(1.0, (step + 1) / cfg.warmup_steps) if cfg.warmup_steps else 1.0
    return warm * cosine_decay(progress, cfg.min_lr_ratio)


def psnr_from_mse(mse_pm1):
    """PSNR in dB on the [0, 255] scale of an MSE on [-1, 1] pixels (x255 = (x + 1) * 127.5)."""
    import torch

    mse255 = torch.as_tensor(mse_pm1, dtype=torch.float64) * 127.5 ** 2
    return 10 * torch.log10(255.0 ** 2 / mse255.clamp_min(1e-12))


def evaluate(vae, images_u8, device, use_bf16: bool, batch_size: int = 250) -> dict:
    """Held-out metrics: reconstructions decode the posterior mean, clamp to [-1, 1]; PSNR per
    image on the [0, 255] scale (unrounded floats), averaged over images."""
    import torch

    from lct.vae import to_unit_range

    vae.eval()
    psnrs, stds, means = [], [], []
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
        for i in range(0, len(images_u8), batch_size):
            x = to_unit_range(images_u8[i:i + batch_size].to(device))
            dist = vae.encode(x).latent_dist
            y = vae.decode(dist.mean).sample.float().clamp(-1, 1)
            psnrs.append(psnr_from_mse(((y - x) ** 2).mean(dim=(1, 2, 3)).double().cpu()))
            if i == 0:
                first = (x[:GRID_IMAGES].float().cpu(), y[:GRID_IMAGES].cpu())
            stds.append(dist.std.float().cpu())
            means.append(dist.mean.float().cpu())
    vae.train()
    std, mean = torch.cat(stds), torch.cat(means)
    per_image = torch.cat(psnrs)
    return {"psnr": float(per_image.mean()), "num_images": int(len(images_u8)),
            "psnr_min": float(per_image.min()), "grid": (*first, per_image[:GRID_IMAGES].tolist()),
            "posterior_std_mean": float(std.mean()),
            "latent_shape": list(mean.shape[1:]),
            "latent_mean_channel_mean": [round(float(v), 5) for v in mean.mean(dim=(0, 2, 3))],
            "latent_mean_channel_std": [round(float(v), 5) for v in mean.std(dim=(0, 2, 3))]}


def train(cfg: TrainVAEConfig, train_u8, device, use_bf16: bool) -> tuple[object, dict]:
    """The training loop; returns (vae, record). Deterministic on CPU given the seed (and the
    thread count) when stopped by --steps."""
    import torch
    from diffusers import AutoencoderKL
    from tqdm import tqdm

    from lct.vae import to_unit_range

    torch.manual_seed(seed_int(Stream.VAE_INIT, cfg.seed))
    vae = AutoencoderKL(**vae_kwargs(cfg)).to(device).train()
    params = [p for p in vae.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, betas=(0.9, 0.99), weight_decay=cfg.weight_decay,
                            foreach=True)
    gen = torch.Generator().manual_seed(seed_int(Stream.VAE_DATA, cfg.seed))  # data order, flips
    noise_gen = torch.Generator(device=device).manual_seed(seed_int(Stream.VAE_POSTERIOR, cfg.seed))
    n = len(train_u8)
    bs = min(cfg.batch_size, n)
    data = train_u8.to(device) if device.type == "cuda" else train_u8
    n_pix = 3 * cfg.resolution ** 2
    budget = cfg.time_budget_minutes * 60 if cfg.time_budget_minutes else None
    perm, pos = torch.randperm(n, generator=gen), 0
    losses, recs, kls = [], [], []
    stop = "steps"
    # miniters=1: tqdm's dynamic miniters stop redrawing when steps slow down (a loaded machine), which
    # froze the bar on one "left" value; the time left is from the last 50 steps' pace.
    bar = tqdm(total=cfg.steps, desc="train_vae", unit="step", disable=not cfg.progress, dynamic_ncols=True,
               miniters=1, mininterval=0.5)
    t0 = time.perf_counter()
    marks: list[tuple[int, float]] = []
    step = 0
    for step in range(cfg.steps):
        elapsed = time.perf_counter() - t0
        if budget is not None and elapsed >= budget:
            stop = "time budget"
            break
        progress = max(step / cfg.steps, elapsed / budget if budget else 0.0)
        for g in opt.param_groups:
            g["lr"] = cfg.lr * lr_factor(step, progress, cfg)
        if pos + bs > n:
            perm, pos = torch.randperm(n, generator=gen), 0
        idx = perm[pos:pos + bs]
        pos += bs
        x = data[idx.to(data.device)]
        if cfg.flip:
            f = (torch.rand(bs, generator=gen) < 0.5).to(x.device)
            x = torch.where(f[:, None, None, None], x.flip(-1), x)
        x = to_unit_range(x.to(device, non_blocking=True))
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
            dist = vae.encode(x).latent_dist
            # The posterior in fp32 (as diffusers: logvar clamped to [-30, 20]); z = mean + std * eps.
            mean, logvar = dist.mean.float(), dist.logvar.float()
            std = torch.exp(0.5 * logvar)
            z = mean + std * torch.randn(mean.shape, generator=noise_gen, device=device, dtype=mean.dtype)
            y = vae.decode(z).sample
        err = y.float() - x
        rec = err.abs().mean() if cfg.loss == "l1" else (err * err).mean()
        kl = 0.5 * (mean * mean + std * std - 1.0 - logvar).sum(dim=(1, 2, 3)).mean()  # KL to N(0, I)
        loss = rec + cfg.kl_weight * kl / n_pix
        opt.zero_grad(set_to_none=True)
        loss.backward()
        loss_value = loss.item()
        if not math.isfinite(loss_value):
            raise UserError(f"non-finite loss at step {step}; lower --lr (now {cfg.lr:g})")
        opt.step()
        losses.append(loss_value)
        recs.append(rec.item())
        kls.append(kl.item())
        if cfg.progress and (step % 10 == 0 or step == cfg.steps - 1):
            mse = (err.detach() ** 2).mean().item()  # the bar's PSNR, whatever --loss is
            el = time.perf_counter() - t0
            marks = (marks + [(step, el)])[-6:]
            (s0, e0), (s1, e1) = marks[0], marks[-1]
            pace = (e1 - e0) / (s1 - s0) if s1 > s0 else el / (step + 1)
            left = (cfg.steps - step - 1) * pace
            if budget is not None:
                left = min(left, budget - el)
            bar.set_postfix_str(f"loss {sum(losses[-10:]) / len(losses[-10:]):.4f} "
                                f"psnr {float(psnr_from_mse(mse)):.1f} left {max(left, 0):.0f}s", refresh=False)
        bar.update(1)
    else:
        step = cfg.steps
    bar.close()
    seconds = time.perf_counter() - t0
    done = len(losses)
    tail = max(1, min(50, done // 10 or 1))
    chunks = min(20, done)
    curve = [sum(losses[i * done // chunks:(i + 1) * done // chunks]) /
             max(1, (i + 1) * done // chunks - i * done // chunks) for i in range(chunks)] if done else []
    record = {"steps": done, "stopped_by": stop, "train_seconds": round(seconds, 2),
              "images_seen": done * bs, "epochs": round(done * bs / n, 3),
              "final_loss": sum(losses[-tail:]) / tail if done else None,
              "final_rec_loss": sum(recs[-tail:]) / tail if done else None,
              "final_kl": sum(kls[-tail:]) / tail if done else None,
              "final_train_psnr_sampled": None,
              "loss_curve": [round(v, 6) for v in curve]}
    if done and cfg.loss == "mse":
        record["final_train_psnr_sampled"] = float(psnr_from_mse(record["final_rec_loss"]))
    return vae, record


# ----------------------------------------------------------------------------------------------
# Output: atomic save_pretrained, resume semantics
# ----------------------------------------------------------------------------------------------


def result_config(cfg: TrainVAEConfig) -> dict:
    return {k: v for k, v in cfg.model_dump(mode="json").items() if k not in NON_RESULT_KEYS}


def complete_output(out: Path) -> dict | None:
    """The train_vae.json of a complete output folder, else None."""
    rec = out / "train_vae.json"
    if not (rec.is_file() and (out / "config.json").is_file()
            and any(out.glob("diffusion_pytorch_model.*"))):
        return None
    try:
        return json.loads(rec.read_text())
    except ValueError:
        return None


def remove_stale_temporaries(out: Path) -> None:
    """Temporary folders of killed runs (`.NAME.tmpPID`, `.NAME.oldPID` whose process is gone)."""
    if not out.parent.is_dir():
        return
    for p in out.parent.glob(f".{out.name}.*"):
        pid = p.name.rsplit(".", 1)[-1].removeprefix("tmp").removeprefix("old")
        if not (p.is_dir() and pid.isdigit()):
            continue
        try:
            os.kill(int(pid), 0)
            continue  # still running (another run into the same folder)
        except ProcessLookupError:
            pass
        except OSError:
            continue
        shutil.rmtree(p, ignore_errors=True)


def reconstruction_grid(grid):
    """Held-out images (top row) above their reconstructions (bottom row, with PSNR)."""
    from lct.grids import caption_grid, to_uint8

    x, y, psnrs = grid
    n = x.shape[0]
    tiles = list(to_uint8(x)) + list(to_uint8(y))
    captions = [f"held-out {i}" for i in range(n)] + [f"recon. {p:.1f} dB" for p in psnrs]
    return caption_grid(tiles, captions, cols=n, title="held-out images (top) and reconstructions (bottom)")


def save_atomic(vae, record: dict, out: Path, grid=None) -> None:
    """save_pretrained into a temporary folder beside `out`, write train_vae.json last, then swap
    it in (`lct.files.atomic_dir`: a crash leaves the old folder or the new one, never half)."""
    from lct.grids import save_png

    with atomic_dir(out) as tmp:
        vae.save_pretrained(str(tmp), safe_serialization=True)
        if grid is not None:
            save_png(reconstruction_grid(grid), tmp / "reconstructions.png")
        write_json(tmp / "train_vae.json", record)


def main(argv: list[str] | None = None) -> int:
    cfg, _ = cli_config(TrainVAEConfig, argv, prog="train_vae",
                        description="Fit a small diffusers AutoencoderKL on image shards and save_pretrained it.")
    arch = vae_kwargs(cfg)  # validate the options and the shard names before reading any image
    from lct.data import existing_shards

    existing_shards(cfg.input, "--input")
    if cfg.heldout:
        existing_shards(cfg.heldout, "--heldout")
    out = Path(cfg.output)
    problem = output_dir_problem(out, "--output")
    if problem:
        raise UserError(problem)
    remove_stale_temporaries(out)
    prev = complete_output(out) if out.is_dir() else None
    wanted = result_config(cfg)
    if prev is not None:
        if prev.get("config") == wanted:
            psnr = prev.get("heldout_psnr")
            print(f"train_vae: {out} already holds a VAE trained with this config (held-out PSNR "
                  f"{'n/a' if psnr is None else f'{psnr:.2f} dB'}); skipping training", flush=True)
            if psnr is not None and psnr < cfg.min_psnr:
                print(f"warning: held-out PSNR {psnr:.1f} dB is below --min-psnr {cfg.min_psnr:g} dB (README, 'How "
                      "good a VAE is enough')", file=sys.stderr, flush=True)
            return 0
        if not cfg.overwrite:
            had = prev.get("config", {})
            diff = sorted(k for k in set(had) | set(wanted) if had.get(k) != wanted.get(k))
            raise UserError(f"--output {out} holds a VAE trained with another config (differs in: "
                            f"{', '.join(diff)}); use another --output, or --overwrite to retrain and replace it")
        print(f"train_vae: --overwrite: retraining and replacing {out}", flush=True)
    elif out.is_dir() and any(out.iterdir()):
        raise UserError(f"--output {out} is a non-empty folder without a complete train_vae output; "
                        "use another --output or delete it")

    import torch

    device, use_bf16 = resolve_device(cfg)
    if device.type == "cpu":
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        torch.set_num_threads(cfg.threads or cores)
    t_start = time.perf_counter()
    images, skipped = load_images(cfg.input, cfg.resolution, "--input", progress=cfg.progress)
    if cfg.heldout:
        held, skipped_h = load_images(cfg.heldout, cfg.resolution, "--heldout", progress=cfg.progress)
        train_u8 = images
    else:
        skipped_h = 0
        n_held = int(round(len(images) * cfg.heldout_fraction))
        if n_held >= len(images):
            raise UserError(f"--heldout-fraction {cfg.heldout_fraction} leaves no training image")
        split = torch.Generator().manual_seed(seed_int(Stream.VAE_HELDOUT, cfg.seed))
        perm = torch.randperm(len(images), generator=split)
        held, train_u8 = images[perm[:n_held]], images[perm[n_held:]]
    if cfg.max_images:
        train_u8 = train_u8[:cfg.max_images]
    data_seconds = time.perf_counter() - t_start
    print(f"train_vae: {len(train_u8)} training and {len(held)} held-out images of {cfg.resolution}px "
          f"read in {data_seconds:.1f}s ({skipped + skipped_h} samples skipped); device {device}"
          f"{' (bf16 autocast)' if use_bf16 else ''}, {torch.get_num_threads()} threads", flush=True)

    vae, rec = train(cfg, train_u8, device, use_bf16)
    heldout = evaluate(vae, held, device, use_bf16) if len(held) else None
    grid = heldout.pop("grid") if heldout else None
    vae = vae.float().cpu().eval()
    record = {"format": FORMAT_VERSION, "config": wanted,
              "vae_config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in arch.items()},
              "num_parameters": sum(p.numel() for p in vae.parameters()),
              "train_images": len(train_u8), "heldout_images": len(held),
              "heldout_source": cfg.heldout or f"fraction {cfg.heldout_fraction} of --input",
              "device": str(device), "precision": "bf16 autocast" if use_bf16 else "fp32",
              "threads": torch.get_num_threads(), "data_seconds": round(data_seconds, 2), **rec,
              "latent_shape": [cfg.latent_channels, cfg.resolution // cfg.downsample,
                               cfg.resolution // cfg.downsample],
              "heldout_psnr": round(heldout["psnr"], 3) if heldout else None,
              "min_psnr": cfg.min_psnr, "psnr_ok": (heldout["psnr"] >= cfg.min_psnr) if heldout else None,
              "posterior_std_mean": heldout["posterior_std_mean"] if heldout else None,
              "heldout": heldout,
              "psnr_definition": "mean over held-out images of 10*log10(255^2/MSE), pixels mapped "
                                 "[-1,1] -> [0,255] as (x+1)*127.5 without rounding, reconstruction = "
                                 "decode(posterior mean) clamped to [-1,1]"}
    save_atomic(vae, record, out, grid)
    total = time.perf_counter() - t_start
    psnr = f"{heldout['psnr']:.2f} dB" if heldout else "n/a (no held-out images)"
    print(f"train_vae: {rec['steps']} steps (stopped by {rec['stopped_by']}) in {rec['train_seconds']:.1f}s, "
          f"{total:.1f}s in all; held-out PSNR {psnr}; final loss {rec['final_loss']:.4f} (rec "
          f"{rec['final_rec_loss']:.4f}, KL {rec['final_kl']:.1f}); mean posterior std "
          f"{record['posterior_std_mean'] if heldout else float('nan'):.4f}; latent "
          f"{'x'.join(map(str, record['latent_shape']))} -> {out} (reconstructions.png: held-out images and "
          "their reconstructions)", flush=True)
    if heldout and heldout["psnr"] < cfg.min_psnr:
        print(f"warning: held-out PSNR {heldout['psnr']:.1f} dB is below --min-psnr {cfg.min_psnr:g} dB, the rule of "
              "thumb for this kind of data (README, 'How good a VAE is enough'): the generator cannot draw what "
              f"the VAE loses. Look at {out / 'reconstructions.png'}; train longer (--steps {2 * cfg.steps}) or with "
              "more --latent-channels", file=sys.stderr, flush=True)
    return 0


def cli():
    cli_main(main)


if __name__ == "__main__":
    cli()
