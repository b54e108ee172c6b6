"""The embedded default, end to end: `make demo` (or `python -m lct.demo`).

From nothing to captioned 1- and 2-step samples on a 2-core CPU, with no model hub:

1. `data_prep/make_shapes.py`   coloured-shape images with captions (train and held-out splits)
2. `data_prep/train_vae.py`     a small diffusers AutoencoderKL fitted to them (`save_pretrained`)
3. `data_prep/encode_latents.py` latent shards with that VAE and a randomly initialised open_clip
                                 text tower (random text features are enough to condition on
                                 captions this regular: the DiT learns to read them)
4. `deepspeed --num_gpus N lct/train.py --config configs/demo_edm.yaml`   a short EDM start,
   then `... --config configs/demo.yaml`: ECT-style consistency tuning with the iLCT techniques
   (Cauchy distance, minibatch OT coupling, early-step diffusion term), started from the EDM EMA.
   N = 2 CPU ranks without a GPU (the real launcher and engine), the GPUs when there are some.
5. `eval/clip_fid.py --metrics shapes` on the held-out captions, 1 and 2 steps: samples,
   captions.jsonl, grids, results.json with colour, position and shape accuracy (chance: 1/8, 1/9,
   1/4), overall and per size, beside the same accuracies on the captions' ground-truth renders
   and on the VAE's reconstructions of them (the ceilings).

Each stage resumes: a second run reuses what exists. `--quick` is the shortened run CI uses.
`--aspects` runs it on aspect-ratio buckets (issue 33): landscape, square and portrait canvases
(`make_shapes.py --aspects 5:3,1:1,3:5 --shape-scale area`: a shape has the same pixel size on
each, so the aspects are compared on equal terms), latents at their bucket's shape (`encode_latents.py
--buckets shapes_32`) with a VAE fitted to square shapes data (train_vae crops and resizes its
images to a square, which would enlarge the non-square canvases' shapes), the same training, and
the evaluation once per trained size (`--aspect`), each beside the VAE's ceiling on that canvas.

`python -m lct.demo --data 'SHARDS' [--heldout 'SHARDS'] [--vae ID|PATH | --train-vae]` runs the
same recipe on your image-text shards (img2dataset layout), sized for the machine it finds
(`PLANS`: CPU, one GPU, several): a held-out split when --heldout is not given, a VAE fitted to
your images (or yours), latents, the EDM start and the consistency stage with
configs/custom_small_edm.yaml and configs/custom_small_ect.yaml, then 1- and 2-step samples of the
held-out captions scored with precision/recall/coverage against the held-out images and, with
`--metric module:Name`, your caption-accuracy metric. `lct.demo_data` holds it.
"""

from __future__ import annotations

if __name__ == "__main__" and __package__ in (None, ""):  # run as a file: repo root first on sys.path
    import pathlib
    import sys

    sys.path[0] = str(pathlib.Path(__file__).resolve().parents[1])

import argparse
import json
import sys
import time
from pathlib import Path

from lct.stages import header, launcher, run


# Full demo and the CI-sized one. Training steps come from configs/demo_edm.yaml (3600) and
# configs/demo.yaml (600) unless set here: the full demo takes 19 min on 2 CPU cores (README), the
# quick one about 8 min (long enough for colour to be learned well above chance: CI asserts it).
SIZES = {
    "full": {"train": 8000, "heldout": 500, "vae_steps": 2000, "edm_steps": None, "ct_steps": None,
             "eval_samples": 500},
    "quick": {"train": 4000, "heldout": 200, "vae_steps": 1000, "edm_steps": 1000, "ct_steps": 200,
              "eval_samples": 200},
}


ASPECTS = "5:3,1:1,3:5"  # width:height; with --buckets shapes_32: 24x40, 32x32, 40x24 images, nothing cropped

# 8 latent channels at 8x8: with 4 the VAE rounds half the small squares and diamonds into blobs
# (shape read right on 0.76 of its held-out reconstructions, and the DiT reaches that ceiling);
# with 8 it keeps 0.89 and the 1-step samples' shape goes from 0.76 to 0.81 (README, issue 24).
VAE_ARCH = ["--downsample", "4", "--latent-channels", "8"]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m lct.demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=None, help="working directory (default: ./demo_out, with --data ./demo_data_out)")
    p.add_argument("--quick", action="store_true", help="the shortened demo CI runs")
    p.add_argument("--ranks", type=int, default=None, help="training ranks (default: GPUs, else 2 CPU ranks)")
    p.add_argument("--aspects", action="store_true",
                   help="landscape, square and portrait canvases on aspect-ratio buckets (default out: ./demo_ar_out)")
    from lct.demo_data import add_arguments, run_data

    add_arguments(p)
    args = p.parse_args(argv)
    if args.data is not None:
        if args.aspects:
            p.error("--aspects is the shapes demo on aspect-ratio buckets; for your own shards pass --buckets to "
                    "data_prep/encode_latents.py (README, Your own data)")
        return run_data(args, p)
    if args.heldout or args.vae or args.train_vae or args.metric or args.metric_arg:
        p.error("--heldout, --vae, --train-vae, --metric and --metric-arg go with --data SHARDS")
    return run_shapes(args)


def run_shapes(args) -> int:
    """The demo on lct's shapes data (module docstring), square or on aspect-ratio buckets."""

    import torch

    size = SIZES["quick" if args.quick else "full"]
    out = Path(args.out or ("demo_ar_out" if args.aspects else "demo_out")).resolve()
    out.mkdir(parents=True, exist_ok=True)
    gpus = torch.cuda.device_count()
    ranks = args.ranks or (gpus if gpus else 2)
    device = "cuda" if gpus else "cpu"
    py = sys.executable
    env = {"OMP_NUM_THREADS": "1"} if not gpus else {}
    times: dict[str, float] = {}
    t_all = time.time()

    def stage(name: str):
        header(name)
        return time.time()

    # 1. Data.
    t = stage("1/5 make_shapes: coloured shapes with captions (train + held-out)")
    shapes = out / "shapes"
    square = ["--num", str(size["train"]), "--heldout", str(size["heldout"]), "--size", "32", "--samples-per-shard",
              "1000", "--seed", "0"]
    run([py, "data_prep/make_shapes.py", "--output", str(shapes), *square,
         *(["--aspects", ASPECTS, "--shape-scale", "area"] if args.aspects else [])])
    vae_data = shapes
    if args.aspects:  # the VAE learns the shapes at their own scale (train_vae crops and resizes to a square)
        vae_data = out / "shapes_square"
        run([py, "data_prep/make_shapes.py", "--output", str(vae_data), *square])
    times["make_shapes"] = time.time() - t

    # 2. VAE.
    t = stage("2/5 train_vae: a small AutoencoderKL for 32 px shapes (8x8x8 latents)")
    vae = out / "vae"
    train_shards, heldout_shards = shard_list(shapes), shard_list(shapes / "heldout")
    cmd = [py, "data_prep/train_vae.py", "--input", shard_list(vae_data), "--heldout", shard_list(vae_data / "heldout"),
           "--output", str(vae), "--resolution", "32", *VAE_ARCH, "--device", device,
           "--min-psnr", "35"]  # README, "How good a VAE is enough": small shapes lose their colour below
    if size["vae_steps"]:
        cmd += ["--steps", str(size["vae_steps"])]
    run(cmd, env)
    times["train_vae"] = time.time() - t

    # 3. Latents.
    t = stage("3/5 encode_latents: VAE posteriors + random open_clip text tower")
    lat = out / "latents"
    common = ["--vae", str(vae), *(["--buckets", "shapes_32"] if args.aspects else ["--resolution", "32"]),
              "--text-model", "lct-tiny-text-c32", "--device", device,
              "--num-workers", "1", "--batch-size", "256"]
    run([py, "data_prep/encode_latents.py", "--input", train_shards, "--output", str(lat / "train"),
         "--text-pretrained", "random", *common], env)
    tower = lat / "train" / "text_tower" / "open_clip_model.safetensors"
    run([py, "data_prep/encode_latents.py", "--input", heldout_shards, "--output", str(lat / "heldout"),
         "--text-pretrained", str(tower), *common], env)
    times["encode_latents"] = time.time() - t

    # 4. Training: EDM start, then consistency tuning from its EMA.
    data = [f"data.shards={lat / 'train'}", f"data.val_shards={lat / 'heldout'}"]
    t = stage(f"4/5 train: EDM start on {ranks} {'GPU' if gpus else 'CPU'} rank(s) (deepspeed launcher)")
    edm_dir = out / "runs" / "edm"
    cmd = [*launcher(ranks), "lct/train.py", "--config", "configs/demo_edm.yaml", f"run.dir={edm_dir}", *data]
    if size["edm_steps"]:
        n = size["edm_steps"]  # the shortened run: saves, grids and validation at its end (no config warning)
        cmd += [f"run.total_steps={n}", f"run.save_every={n}", f"sample.every={n}", f"val.every={n}"]
    run(cmd, env)
    times["train_edm"] = time.time() - t
    t = stage("4/5 train: consistency tuning (ECT mapping + Cauchy, OT, early-step diffusion term)")
    ct_dir = out / "runs" / "demo"
    cmd = [*launcher(ranks), "lct/train.py", "--config", "configs/demo.yaml", f"run.dir={ct_dir}",
           f"model.init_from={edm_dir}", *data]
    if size["ct_steps"]:
        n = size["ct_steps"]
        cmd += [f"run.total_steps={n}", f"run.save_every={n}", f"sample.every={n}", f"val.every={n}"]
    run(cmd, env)
    times["train_consistency"] = time.time() - t

    # 5. Evaluation on held-out captions.
    t = stage("5/5 eval: shapes metric on held-out captions, 1 and 2 steps")
    evals = {}  # size name (HxW; "" square) -> eval folder
    for aspect in trained_sizes(lat / "train") if args.aspects else [""]:
        evals[aspect] = ev = out / ("eval" if not aspect else f"eval_{aspect}")
        run([py, "eval/clip_fid.py", "--checkpoint", str(ct_dir), "--protocol", "custom",
             "--captions", str(shapes / "heldout" / "captions.jsonl"), "--num-samples", str(size["eval_samples"]),
             "--steps", "1", "2", "--metrics", "shapes", "--device", device, "--batch-size", "100", "--out", str(ev),
             *(["--aspect", aspect] if aspect else ["--ref-images", heldout_shards])],  # prdc beside it (square)
            env)
    times["eval"] = time.time() - t
    times["total"] = time.time() - t_all

    if args.aspects:
        summary = {"aspects": {a: summarize(out, vae, ev, {}, a) for a, ev in evals.items()}, "times_s": times,
                   "out": str(out)}
        print_stage_times(times)
    else:
        summary = summarize(out, vae, evals[""], times)
    (out / "demo_summary.json").write_text(json.dumps(summary, indent=1))
    return 0


def shard_list(folder: Path) -> str:
    """The tar shards of `folder` as the tools' comma list."""
    return ",".join(str(s) for s in sorted(folder.glob("*.tar")))


def trained_sizes(latents: Path) -> list[str]:
    """HEIGHTxWIDTH of each bucket with samples in a latent folder's manifest, most common first."""
    from lct.export_common import trained_sizes as sizes

    return [f"{h}x{w}" for h, w in sizes(json.loads((latents / "manifest.json").read_text())) or []]


def print_stage_times(times: dict) -> None:
    if times:
        print("\nstage times:")
    for k, v in times.items():
        print(f"  {k:<18} {v / 60:6.2f} min")


def summarize(out: Path, vae: Path, ev: Path, times: dict, aspect: str = "") -> dict:
    """The demo's summary of one evaluation (`aspect`: its HEIGHTxWIDTH with --aspects)."""
    header(f"demo summary{f': {aspect} (height x width)' if aspect else ''}")
    vae_info = json.loads((vae / "train_vae.json").read_text()) if (vae / "train_vae.json").is_file() else {}
    results = json.loads((ev / "results.json").read_text())
    keys = ("colour_acc", "position_acc", "shape_acc", "all_acc", "both_acc")
    rows = []
    for s in results["settings"]:
        m = next((v for k, v in s["metrics"].items() if k.startswith("shapes") and "value" in v), None)
        if m:
            rows.append({"setting": s["name"], "steps": s["steps"], "tau": s["tau"], "nfe": s["nfe"],
                         **{k: m[k] for k in keys}, "by_size": m["by_size"], "n": m["n"],
                         "chance_colour": m["chance_colour"], "chance_position": m["chance_position"],
                         "chance_shape": m["chance_shape"],
                         "grid": str(ev / s["dir"] / "grid.png") if not Path(s["dir"]).is_absolute()
                         else str(Path(s["dir"]) / "grid.png")})
            p = next((v for k, v in s["metrics"].items() if k.startswith("prdc") and "value" in v), None)
            if p:
                rows[-1]["diversity"] = {k: p[k] for k in ("precision", "recall", "density", "coverage", "spread")}
    ceiling = {k: {**{a: v[a] for a in keys}, "by_size": v["by_size"], "n": v["n"]}
               for k, v in (results.get("shapes_ceiling") or {}).items()}
    print(f"VAE held-out PSNR: {vae_info.get('heldout_psnr', vae_info.get('psnr', 'n/a'))} dB")
    print(f"\nheld-out captions: accuracy of {'colour':>8} {'position':>9} {'shape':>7}   (shape: small / large)")
    lines = [(f"{r['steps']}-step samples (NFE {r['nfe']})", r) for r in rows]
    lines += [(name.replace("_", " ") + "s" if name.endswith("reconstruction") else name.replace("_", " "), c)
              for name, c in ceiling.items()]
    for label, r in lines:
        bs = r["by_size"]
        print(f"  {label:<30} {r['colour_acc']:8.3f} {r['position_acc']:9.3f} {r['shape_acc']:7.3f}   "
              f"({bs['small']['shape_acc']:.3f} / {bs['large']['shape_acc']:.3f})")
    if rows:
        r = rows[0]
        print(f"  {'chance':<30} {r['chance_colour']:8.3f} {r['chance_position']:9.3f} {r['chance_shape']:7.3f}")
    for r in rows:
        if r.get("diversity"):
            d = r["diversity"]
            print(f"{r['steps']}-step samples against the held-out images: precision {d['precision']:.3f}, recall "
                  f"{d['recall']:.3f}, density {d['density']:.3f}, coverage {d['coverage']:.3f}, spread {d['spread']:.3f} "
                  "(Kynkaanniemi et al. 2019, Naeem et al. 2020; random-VGG16 features)")
    for r in rows:
        print(f"{r['steps']}-step grid: {r['grid']}")
    print_stage_times(times)
    return {"vae": vae_info, "shapes": rows, "shapes_ceiling": ceiling, "times_s": times, "out": str(out)}


if __name__ == "__main__":
    sys.exit(main())
