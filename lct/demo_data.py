"""`python -m lct.demo --data 'SHARDS'`: the demo's recipe on your own image-text shards.

Stages (each resumes: a second run reuses what is complete; the trainer resumes from its newest
checkpoint):

1. split     without --heldout: a seeded `HELDOUT_FRACTION` of the samples (at most
             `HELDOUT_MAX`) copied into OUT/data/heldout/, the rest into OUT/data/train/
2. vae       `data_prep/train_vae.py` on the training images (or --vae ID|PATH: a diffusers
             AutoencoderKL, e.g. stabilityai/sd-vae-ft-ema or a local folder)
3. latents   `data_prep/encode_latents.py`, a small random open_clip text tower (--text-model)
4. train     the EDM start (configs/custom_small_edm.yaml), then ECT + Cauchy / adaptive c / OT /
             early-step diffusion term from its EMA (configs/custom_small_ect.yaml), with the real
             deepspeed launcher; each logs 1- and 2-step quality six times (`eval` rows in its
             stats.jsonl: your metrics, precision/recall against the held-out images)
5. eval      `eval/clip_fid.py` on the held-out captions at 1 and 2 steps: samples, grids,
             precision/recall/density/coverage against the held-out images (lct.prdc) and your
             `--metric` metrics (caption accuracy)

Sizes come from `PLANS` for the machine found (CPU, one GPU, several GPUs); README "Which recipe
for your data" says where each was measured.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from lct.stages import ROOT
HELDOUT_FRACTION, HELDOUT_MAX = 0.1, 500

# Sizes per machine. cpu: the shapes demo's measured recipe (README: 19 min on 2 cores for 8,000
# images); gpu: DiT-S width at 64 px, not measured yet (no GPU where lct was built).
PLANS = {
    "cpu": {"resolution": 32, "downsample": 4, "latent_channels": 8, "vae_steps": 2000, "hidden_size": 128,
            "depth": 6, "num_heads": 4, "batch_size": 32, "edm_steps": 3600, "ct_steps": 600, "precision": "fp32",
            "eval_samples": 500, "measured": True},
    "gpu": {"resolution": 64, "downsample": 8, "latent_channels": 8, "vae_steps": 6000, "hidden_size": 384,
            "depth": 12, "num_heads": 6, "batch_size": 128, "edm_steps": 20000, "ct_steps": 4000, "precision": "tf32",
            "eval_samples": 1000, "measured": False},
}
QUICK = {"vae_steps": 300, "edm_steps": 200, "ct_steps": 40, "eval_samples": 40}


def add_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("your own data (--data)")
    g.add_argument("--data", default=None, help="training image-text shards (img2dataset layout: brace pattern, "
                                                "glob, comma list or folder)")
    g.add_argument("--heldout", default=None, help="held-out shards (default: a seeded 10%% of --data, at most 500)")
    vae = g.add_mutually_exclusive_group()
    vae.add_argument("--vae", default=None, help="use this diffusers AutoencoderKL (hub id or local folder)")
    vae.add_argument("--train-vae", action="store_true", help="fit a small VAE to your images (the default)")
    g.add_argument("--resolution", type=int, default=None, help="image side (default: 32 on a CPU, 64 on GPUs)")
    g.add_argument("--text-model", default="lct-tiny-text-c32",
                   help="open_clip text tower, randomly initialised (default: lct's 1-layer, 32-token tower)")
    g.add_argument("--metric", action="append", default=[],
                   help="caption-accuracy metric module:Name or file.py:Name for eval (repeatable)")
    g.add_argument("--metric-arg", action="append", default=[], help="KEY=VALUE for --metric (repeatable)")


def machine(ranks: int | None) -> tuple[str, int, dict]:
    import torch

    gpus = torch.cuda.device_count()
    kind = "cpu" if not gpus else ("gpu" if gpus == 1 else f"{gpus} gpus")
    plan = dict(PLANS["gpu" if gpus else "cpu"])
    n = ranks or (gpus if gpus else 2)
    if gpus > 1:
        plan["batch_size"] = 64 * n  # 64 per GPU
    return kind, n, plan


def check_inputs(args) -> None:
    """Every refusal before any work, one line each."""
    from lct.data import existing_shards
    from lct.errors import UserError
    from lct.metrics import parse_metric_args, resolve_user_metric

    existing_shards(args.data, "--data")
    if args.heldout:
        existing_shards(args.heldout, "--heldout")
    if args.vae and not (Path(args.vae).expanduser().is_dir() or "/" in args.vae):
        raise UserError(f"--vae {args.vae}: not a local folder nor a hub id (owner/name)")
    if args.resolution is not None and (args.resolution < 16 or args.resolution % 8):
        raise UserError(f"--resolution {args.resolution}: give a multiple of 8, at least 16")
    parse_metric_args(args.metric_arg)
    for spec in args.metric:
        resolve_user_metric(spec)


def samples(pattern: str):
    """Raw webdataset samples {__key__, ext: bytes} of the shards, in order (nothing decoded)."""
    import webdataset as wds

    from lct.data import existing_shards

    yield from wds.tarfile_to_samples()(wds.SimpleShardList(existing_shards(pattern, "--data")))


def split(data: str, out: Path, seed: int = 0) -> tuple[str, str]:
    """(train, heldout) shard patterns: a seeded held-out share of the samples, written once."""
    import webdataset as wds

    from lct.files import atomic_file, write_json

    done = out / "split.json"
    if done.is_file() and json.loads(done.read_text()).get("data") == data:
        rec = json.loads(done.read_text())
        print(f"split: reusing {rec['train']} train / {rec['heldout']} held-out samples in {out}")
        return str(out / "train"), str(out / "heldout")
    keys = [s["__key__"] for s in samples(data)]
    n_held = min(HELDOUT_MAX, max(1, int(round(len(keys) * HELDOUT_FRACTION))))
    if len(keys) < 2 * n_held or len(keys) < 20:
        from lct.errors import UserError

        raise UserError(f"--data {data}: {len(keys)} samples; the demo needs at least 20 (pass --heldout too)")
    from lct import rng

    held = set(rng.philox(rng.Stream.DEMO_SPLIT, seed).choice(len(keys), n_held, replace=False).tolist())
    writers, counts = {}, {"train": 0, "heldout": 0}
    ctx = {}
    for name in ("train", "heldout"):
        (out / name).mkdir(parents=True, exist_ok=True)
        ctx[name] = atomic_file(out / name / "00000.tar")
        writers[name] = wds.TarWriter(ctx[name].__enter__(), encoder=False, mtime=0.0, user="lct", group="lct",
                                      mode=0o644)
    try:
        for i, s in enumerate(samples(data)):
            name = "heldout" if i in held else "train"
            writers[name].write(s)
            counts[name] += 1
    finally:
        for name in writers:
            writers[name].close()
            ctx[name].__exit__(*sys.exc_info())
    write_json(done, {"data": data, "seed": seed, **counts})
    print(f"split: {counts['train']} train / {counts['heldout']} held-out samples -> {out}")
    return str(out / "train"), str(out / "heldout")


def heldout_captions(pattern: str, path: Path, limit: int) -> int:
    """The first `limit` held-out samples' captions as captions.jsonl ({key, caption}) for eval."""
    from lct.files import write_atomic

    rows = []
    for s in samples(pattern):
        if "txt" in s:
            rows.append({"key": s["__key__"], "caption": s["txt"].decode("utf-8", "replace").strip()})
        if len(rows) >= limit:
            break
    write_atomic(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return len(rows)


def absolute(pattern: str) -> str:
    """A local shard pattern (comma list, braces, globs) made absolute: the stages run elsewhere."""
    return ",".join(p if ("://" in p or p.startswith("pipe:") or os.path.isabs(p)) else os.path.abspath(p)
                    for p in pattern.split(","))


def run_data(args, parser) -> int:
    from lct import stages
    from lct.stages import header, launcher

    def run(cmd, env=None):  # the user's relative paths (--metric file.py, --metric-arg) mean their folder
        stages.run(cmd, env, cwd=os.getcwd())

    check_inputs(args)
    args.data = absolute(args.data)
    args.heldout = absolute(args.heldout) if args.heldout else None
    if args.vae and Path(args.vae).expanduser().is_dir():
        args.vae = str(Path(args.vae).expanduser().resolve())
    kind, ranks, plan = machine(args.ranks)
    if args.quick:
        plan.update(QUICK)
    if args.resolution:
        plan["resolution"] = args.resolution
    out = Path(args.out or "demo_data_out").resolve()
    out.mkdir(parents=True, exist_ok=True)
    py, device = sys.executable, ("cuda" if kind != "cpu" else "cpu")
    env = {"OMP_NUM_THREADS": "1"} if kind == "cpu" else {}
    res = plan["resolution"]
    print(f"demo --data on {kind} ({ranks} training rank(s)): {res}px, DiT {plan['hidden_size']} wide x "
          f"{plan['depth']} deep, batch {plan['batch_size']}, EDM {plan['edm_steps']} + consistency "
          f"{plan['ct_steps']} steps{'' if plan['measured'] else ' (sizes for GPUs not measured yet)'}", flush=True)
    times: dict[str, float] = {}
    t_all = time.time()

    t = time.time()
    header("1/5 data: training and held-out shards")
    if args.heldout:
        train, held = args.data, args.heldout
    else:
        train, held = split(args.data, out / "data")
    times["split"] = time.time() - t

    t = time.time()
    if args.vae:
        header(f"2/5 vae: {args.vae}")
        vae = args.vae
    else:
        header(f"2/5 train_vae: a small AutoencoderKL for {res}px images")
        vae = str(out / "vae")
        run([py, str(ROOT / "data_prep" / "train_vae.py"), "--input", train, "--heldout", held, "--output", vae,
             "--resolution", str(res), "--downsample", str(plan["downsample"]),
             "--latent-channels", str(plan["latent_channels"]), "--steps", str(plan["vae_steps"]), "--device", device],
            env)
    times["vae"] = time.time() - t

    t = time.time()
    header("3/5 encode_latents: VAE posteriors + a random open_clip text tower")
    lat = out / "latents"
    common = ["--vae", vae, "--resolution", str(res), "--text-model", args.text_model, "--device", device,
              "--num-workers", "1", "--batch-size", "256"]
    run([py, str(ROOT / "data_prep" / "encode_latents.py"), "--input", train, "--output", str(lat / "train"),
         "--text-pretrained", "random", *common], env)
    tower = lat / "train" / "text_tower" / "open_clip_model.safetensors"
    run([py, str(ROOT / "data_prep" / "encode_latents.py"), "--input", held, "--output", str(lat / "heldout"),
         "--text-pretrained", str(tower), *common], env)
    times["encode_latents"] = time.time() - t

    size = [f"model.hidden_size={plan['hidden_size']}", f"model.depth={plan['depth']}",
            f"model.num_heads={plan['num_heads']}", f"optim.batch_size={plan['batch_size']}",
            f"precision={plan['precision']}", f"data.shards={lat / 'train'}", f"data.val_shards={lat / 'heldout'}"]
    # Quality during training (lct.quality): 1- and 2-step samples of 64 held-out captions scored with
    # your metrics and precision/recall against the held-out images, six times per stage.
    quality = ["eval.num=64", "eval.metrics=[prdc]", f"eval.ref_images={held}",
               f"eval.metric={json.dumps(list(args.metric))}", f"eval.metric_arg={json.dumps(list(args.metric_arg))}"]
    edm_dir, ct_dir = out / "runs" / "edm", out / "runs" / "ect"
    t = time.time()
    header(f"4/5 train: EDM start on {ranks} {'CPU' if kind == 'cpu' else 'GPU'} rank(s)")
    run([*launcher(ranks), str(ROOT / "lct" / "train.py"), "--config", str(ROOT / "configs" / "custom_small_edm.yaml"), f"run.dir={edm_dir}",
         f"run.total_steps={plan['edm_steps']}", f"run.save_every={max(1, plan['edm_steps'] // 3)}",
         f"sample.every={max(1, plan['edm_steps'] // 3)}", f"val.every={max(1, plan['edm_steps'] // 3)}",
         f"eval.every={max(1, plan['edm_steps'] // 6)}", *quality, *size], env)
    times["train_edm"] = time.time() - t
    t = time.time()
    header("4/5 train: consistency tuning (ECT mapping + Cauchy, OT, early-step diffusion term)")
    ct = plan["ct_steps"]
    run([*launcher(ranks), str(ROOT / "lct" / "train.py"), "--config", str(ROOT / "configs" / "custom_small_ect.yaml"), f"run.dir={ct_dir}",
         f"model.init_from={edm_dir}", f"run.total_steps={ct}", f"run.save_every={max(1, ct // 2)}",
         f"sample.every={max(1, ct // 2)}", f"val.every={max(1, ct // 2)}",
         f"method.stage_every={max(1, ct // 5)}", f"eval.every={max(1, ct // 6)}", *quality, *size], env)
    times["train_consistency"] = time.time() - t

    t = time.time()
    header("5/5 eval: held-out captions, 1 and 2 steps")
    caps = out / "heldout_captions.jsonl"
    n = heldout_captions(held, caps, plan["eval_samples"])
    ev = out / "eval"
    cmd = [py, str(ROOT / "eval" / "clip_fid.py"), "--checkpoint", str(ct_dir), "--protocol", "custom", "--captions", str(caps),
           "--num-samples", str(n), "--steps", "1", "2", "--metrics", "prdc", "--ref-images", held,
           "--device", device, "--batch-size", "100", "--out", str(ev)]
    for spec in args.metric:
        cmd += ["--metric", spec]
    for arg in args.metric_arg:
        cmd += ["--metric-arg", arg]
    run(cmd, env)
    times["eval"] = time.time() - t
    times["total"] = time.time() - t_all
    summary = summarize(out, vae, ev, times, plan, kind)
    (out / "demo_summary.json").write_text(json.dumps(summary, indent=1))
    return 0


def summarize(out: Path, vae: str, ev: Path, times: dict, plan: dict, kind: str) -> dict:
    from lct.stages import header

    header("demo summary")
    vae_json = Path(vae) / "train_vae.json"
    vae_info = json.loads(vae_json.read_text()) if vae_json.is_file() else {"id": vae}
    results = json.loads((ev / "results.json").read_text())
    rows = []
    for s in results["settings"]:
        row = {"setting": s["name"], "steps": s["steps"], "nfe": s["nfe"], "grid": str(Path(s["dir"]) / "grid.png")}
        for key, m in s["metrics"].items():
            if m.get("skipped"):
                row[key] = "skipped"
            elif m.get("metric") == "prdc":
                row.update({k: m[k] for k in ("precision", "recall", "density", "coverage", "spread")})
            else:
                row[m.get("metric", key)] = m.get("value")
                if isinstance(m.get("ceiling"), dict):
                    row[f"{m.get('metric', key)}_ceiling"] = m["ceiling"]
        rows.append(row)
    if vae_info.get("heldout_psnr") is not None:
        print(f"VAE held-out PSNR: {vae_info['heldout_psnr']:.2f} dB (reconstructions: {Path(vae) / 'reconstructions.png'})")
    cols = [k for k in rows[0] if k not in ("setting", "steps", "nfe", "grid") and not k.endswith("_ceiling")] if rows else []
    print(f"\n{results['num_samples']} held-out captions   " + "".join(f"{c:>12}" for c in cols))
    for r in rows:
        print(f"  {r['steps']}-step (NFE {r['nfe']}){'':8}" + "".join(
            f"{r[c]:12.3f}" if isinstance(r.get(c), float) else f"{str(r.get(c)):>12}" for c in cols))
    for k, v in (rows[0] if rows else {}).items():
        if k.endswith("_ceiling") and isinstance(v.get("real_heldout_accuracy"), float):
            print(f"  {k[:-8]}: the real held-out images score {v['real_heldout_accuracy']:.3f}")
    print("precision/recall/density/coverage: Kynkaanniemi et al. 2019, Naeem et al. 2020 (random-VGG16 features, "
          "k 5) against the held-out images; spread 1 = as varied as they are")
    for r in rows:
        print(f"{r['steps']}-step grid: {r['grid']}")
    print("\nstage times:")
    for k, v in times.items():
        print(f"  {k:<18} {v / 60:6.2f} min")
    return {"machine": kind, "plan": plan, "vae": vae_info, "settings": rows, "times_s": times, "out": str(out)}
