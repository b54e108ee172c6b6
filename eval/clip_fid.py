"""Samples a model in 1, 2 or k steps and scores them: FID, CLIP score, the shapes metric,
precision/recall/coverage, your own metrics (`--metric module:Name`).

    python eval/clip_fid.py --checkpoint runs/lct_coco --steps 1 2 --fid-weights weights-inception-2015-12-05-6726825d.pth \\
        --ref-images 'data/coco/val2014/{00000..00008}.tar' --out eval_out/lct_coco
    python eval/clip_fid.py --protocol custom --checkpoint runs/shapes --captions data/shapes/heldout/captions.jsonl \\
        --steps 1 2 --metrics shapes --out eval_out/shapes
    python eval/clip_fid.py --protocol custom --checkpoint runs/digits --captions data/digits/heldout/captions.jsonl \
        --ref-images 'data/digits/heldout/*.tar' --metrics none --metric lct.eval.digits_metric:DigitAccuracy \
        --metric-arg classifier=data/digits/classifier.safetensors --guidance 1 1.5 2 --out eval_out/digits
    torchrun --nproc_per_node 8 eval/clip_fid.py ...            # same samples and numbers, 8x faster
    python eval/clip_fid.py --make-captions --coco-annotations annotations/captions_val2014.json

The protocol (captions, reference statistics, preprocessing, feature models, metric names), the
settings swept, what is written where and how ranks share the work: README, "Evaluation protocol".
The metrics themselves: `lct.metrics` (`Metric`, `setup_metrics`); their feature models: `lct.features`.
"""

if __name__ == "__main__" and __package__ in (None, ""):  # run as a file: repo root, not this folder, first on sys.path
    import sys, pathlib; sys.path[0] = str(pathlib.Path(__file__).resolve().parents[1])

import argparse
import hashlib
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from lct import dist, rng
from lct.errors import UserError, cli_main
from lct.files import check_out_dir, file_sha256, write_atomic, write_json
from lct.grids import caption_grid, save_png
from lct.features import FID_WEIGHTS_SHA256
from lct.metrics import SETUP, metric_images, parse_metric_args, resolve_user_metric, setup_metrics
from lct.protocols import (CAPTIONS_DIR, captions_jsonl, draw_coco_captions, get_protocol, metric_name,
                           read_captions)
from lct.sample import Generator, check_sampling, grid_title
from lct.scheduler import nfe
from lct.tool_config import EvalConfig, cli_config

RESULTS_FORMAT = "lct-eval/1"
GRID_SIZE = 16
THROUGHPUT_INCLUDES = "sampling, VAE decode, PNG writing, metric features and gathering"


def log(info: dist.DistInfo, msg: str) -> None:
    if info.is_main:
        print(f"[eval] {msg}", flush=True)


@dataclass
class Setting:
    steps: int
    tau: list[float]
    guidance: float
    nfe: int = 0
    name: str = ""
    metrics: dict = field(default_factory=dict)
    throughput: dict = field(default_factory=dict)


def check_settings(cfg: EvalConfig) -> None:
    """Every --steps/--tau/--guidance value refused in one line before anything is loaded."""
    for steps in cfg.steps:
        check_sampling(steps, None, 1.0)
        if cfg.tau is not None and steps > 2 and len(cfg.tau) != steps - 1:
            raise UserError(f"--steps {steps} needs {steps - 1} --tau values (intermediate sigmas, decreasing); "
                            f"got {cfg.tau} (a tau sweep is for --steps 2)")
    for g in cfg.guidance:
        check_sampling(1, None, g)
    for t in cfg.tau or ():
        check_sampling(2, [t], 1.0)
    if cfg.tau is not None and max(cfg.steps) > 2:
        check_sampling(3, cfg.tau, 1.0)


def build_settings(cfg: EvalConfig, gen: Generator) -> list[Setting]:
    """Every --steps value; for 2 steps every --tau value is its own setting (a sweep); for k > 2
    steps --tau gives the k - 1 levels; default: the model's taus (SPEC 9); every --guidance."""
    out: list[Setting] = []
    for steps in dict.fromkeys(cfg.steps):
        if cfg.tau is None or steps == 1:
            tau_sets = [gen.taus(steps, None)]
        else:
            tau_sets = [[t] for t in dict.fromkeys(cfg.tau)] if steps == 2 else [list(cfg.tau)]
        for taus in tau_sets:
            taus = gen.taus(steps, taus)
            for g in dict.fromkeys(cfg.guidance):
                name = f"steps{steps}" + (f"_tau{'-'.join(f'{t:g}' for t in taus)}" if taus else "") + f"_g{g:g}"
                out.append(Setting(steps, taus, float(g), nfe(steps, g), name))
    return out


# --------------------------------------------------------------------------------------------
# Captions
# --------------------------------------------------------------------------------------------


def make_captions_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="eval/clip_fid.py --make-captions",
                                description="Write a protocol's caption file from the COCO annotations.")
    p.add_argument("--make-captions", action="store_true", required=True)
    p.add_argument("--coco-annotations", required=True, help="MS-COCO captions_val2014.json")
    p.add_argument("--protocol", default="coco2014val-30k")
    p.add_argument("--num-samples", type=int, default=None, help="default: the protocol's (30000)")
    p.add_argument("--out", default=None, help="default: eval/captions/<protocol>.jsonl")
    args = p.parse_args(argv)
    proto = get_protocol(args.protocol)
    if proto.caption_seed is None:
        raise UserError(f"--protocol {proto.name} draws no captions from COCO")
    num = args.num_samples or proto.num_samples
    records = draw_coco_captions(args.coco_annotations, num, proto.caption_seed)
    data = captions_jsonl(records)
    out = Path(args.out) if args.out else CAPTIONS_DIR / (proto.captions_file or f"{proto.name}.jsonl")
    out.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(out, data)
    sha = hashlib.sha256(data).hexdigest()
    print(f"wrote {len(records)} (image_id, caption) pairs to {out}\nsha256 {sha}")
    if num == proto.num_samples:
        if proto.captions_sha256 is None:
            print(f"pin it: set CAPTIONS_SHA256 = \"{sha}\" in lct/protocols.py")
        elif proto.captions_sha256 != sha:
            print(f"warning: the protocol pins {proto.captions_sha256}; these annotations give another file",
                  file=sys.stderr)
            return 1
        else:
            print("matches the sha256 the protocol pins")
    return 0


def load_captions(cfg: EvalConfig, proto) -> tuple[list[dict], dict, list[str]]:
    """(caption records used, caption record for results, deviations)."""
    deviations: list[str] = []
    path = Path(cfg.captions).expanduser() if cfg.captions else proto.captions_path()
    if path is None:
        raise UserError(f"--protocol {proto.name} has no caption file: pass --captions FILE (.txt or .jsonl)")
    if not path.is_file() and not cfg.captions:
        raise UserError(f"the caption file of protocol {proto.name} ({path}) is not there: generate it with "
                        "`python eval/clip_fid.py --make-captions --coco-annotations annotations/captions_val2014.json`"
                        " or pass --captions FILE (and --protocol custom for other captions)")
    records = read_captions(path)
    sha = file_sha256(path)
    verified = None
    if proto.captions_file:
        if proto.captions_sha256 is None:
            deviations.append(f"the protocol pins no caption-file sha256 yet; used {path.name} with sha256 {sha}")
        elif sha != proto.captions_sha256:
            raise UserError(f"--captions {path}: sha256 {sha} is not the {proto.name} caption file's "
                            f"({proto.captions_sha256}); use the shipped eval/captions/{proto.captions_file}, or "
                            "--protocol custom to evaluate other captions")
        else:
            verified = True
    n = cfg.num_samples or proto.num_samples or len(records)
    if n > len(records):
        raise UserError(f"--num-samples {n}: {path} holds only {len(records)} captions")
    if proto.num_samples is not None and n != proto.num_samples:
        deviations.append(f"{n} samples instead of the protocol's {proto.num_samples} (the first {n} of the file)")
    rec = {"path": str(path.resolve()), "sha256": sha, "pinned_sha256": proto.captions_sha256,
           "verified": verified, "num_in_file": len(records), "num_used": n}
    return records[:n], rec, deviations


# --------------------------------------------------------------------------------------------
# The evaluation
# --------------------------------------------------------------------------------------------


def run_setting(s: Setting, cfg: EvalConfig, info: dist.DistInfo, device, gen: Generator, metrics: list,
                records: list[dict], d: Path, res: int) -> tuple[dict, dict, dict]:
    """Sample this rank's batches, score them, gather in index order: ({metric: result}, grid tiles,
    throughput)."""
    n, caps_all = len(records), [r["caption"] for r in records]
    if info.is_main:
        d.mkdir(parents=True, exist_ok=True)
    dist.barrier(info.world_size)
    idx: list[int] = []
    rows: dict[str, list] = {m.name: [] for m in metrics}
    grid: dict[int, np.ndarray] = {}
    failed: dict[str, str] = {}
    t0 = time.perf_counter()
    bar = tqdm(total=n, desc=s.name, unit="img", dynamic_ncols=True, disable=not info.is_main)
    for batch in dist.rank_batches(n, cfg.batch_size, info.rank, info.world_size):
        caps = [caps_all[i] for i in batch]
        u8 = gen.images(caps, batch, cfg.seed, s.steps, s.tau, s.guidance)  # uint8, the pipeline's pixels
        for i, a in zip(batch, u8):
            Image.fromarray(a).save(d / f"{i:06d}.png")
            if i < GRID_SIZE:
                grid[i] = a
        x = metric_images(u8, res)
        for m in metrics:
            if m.name not in failed:
                try:
                    rows[m.name].append(torch.as_tensor(m.rows(u8, x, caps)).reshape(len(batch), m.width))
                    continue
                except Exception as err:  # a metric's bug never costs the samples: named, then skipped
                    failed[m.name] = f"failed while scoring: {type(err).__name__}: {str(err)[:300]}"
            rows[m.name].append(torch.zeros(len(batch), m.width))  # keeps the ranks' gathers the same size
        idx += batch
        bar.update(min(len(batch) * info.world_size, bar.total - bar.n))
    bar.close()
    gathered = {m.name: dist.gather_rows(idx, torch.cat(rows[m.name]) if rows[m.name] else None, m.width,
                                         info.world_size, device) for m in metrics}
    tiles = {k: v for g in dist.gather_objects(grid, info.world_size) for k, v in g.items()}
    dist.barrier(info.world_size)
    seconds = time.perf_counter() - t0  # not the final reductions (covariance, Frechet distance)
    for part in dist.gather_objects(failed, info.world_size):
        failed = {**part, **failed}
    results = {}
    for m in metrics:
        try:
            results[m.name] = ({"skipped": True, "reason": failed[m.name], "fix": "fix the metric's code"}
                               if m.name in failed else m.result(gathered[m.name], d, info.is_main))
        except Exception as err:  # as above: the samples and the other metrics survive
            results[m.name] = {"skipped": True, "reason": f"failed in result(): {type(err).__name__}: {str(err)[:300]}",
                               "fix": "fix the metric's code"}
    throughput = {"samples_per_s": n / seconds if seconds > 0 else None, "seconds": seconds, "samples": n,
                  "world_size": info.world_size, "device": str(device), "includes": THROUGHPUT_INCLUDES}
    return results, tiles, throughput


def write_setting(s: Setting, cfg: EvalConfig, records: list[dict], d: Path, tiles: dict) -> None:
    lines = []
    for i, rec in enumerate(records):
        row = {"file": f"{i:06d}.png", "caption": rec["caption"], "seed": cfg.seed, "index": i, "steps": s.steps,
               "tau": s.tau, "guidance": s.guidance, "nfe": s.nfe, **{k: rec[k] for k in ("image_id", "key") if k in rec}}
        lines.append(json.dumps(row, ensure_ascii=False, allow_nan=False) + "\n")
    write_atomic(d / "captions.jsonl", "".join(lines))
    if tiles:
        order = sorted(tiles)
        save_png(caption_grid([tiles[i] for i in order], [records[i]["caption"] for i in order],
                              title=grid_title(s.steps, s.tau, s.guidance, cfg.seed)), d / "grid.png")


def summary_line(s: Setting, metrics: dict) -> str:
    def part(key, m):
        if m.get("skipped"):
            return f"{key}: skipped"
        try:
            return metrics[m["metric"]].line(key, m)
        except Exception:  # a user metric's line(): the value is in results.json all the same
            return f"{key} {m.get('value')}"

    parts = [part(key, m) for key, m in s.metrics.items()] or ["samples only (no metric ran)"]
    tp = s.throughput.get("samples_per_s")
    return f"{s.name} (NFE {s.nfe}): " + "; ".join(parts) + (f" | {tp:.2f} samples/s" if tp else "")


def sweep_table(settings: list[Setting]) -> list[str]:
    """One row per setting (a --steps/--tau/--guidance sweep at a glance): each metric's value."""
    keys = list(dict.fromkeys(k for s in settings for k, m in s.metrics.items() if not m.get("skipped")))
    if len(settings) < 2 or not keys:
        return []
    width = max(len(s.name) for s in settings) + 2
    lines = ["setting".ljust(width) + "NFE  " + "".join(k.rjust(max(10, len(k) + 2)) for k in keys)]
    for s in settings:
        vals = [s.metrics.get(k, {}).get("value") for k in keys]
        lines.append(s.name.ljust(width) + f"{s.nfe:<5d}" + "".join(
            ("-" if v is None else f"{v:.4f}").rjust(max(10, len(k) + 2)) for k, v in zip(keys, vals)))
    return lines


def evaluate(cfg: EvalConfig, argv: list[str]) -> int:
    proto = get_protocol(cfg.protocol)
    unknown = [m for m in cfg.metrics if m not in SETUP and m != "none"]
    if unknown or not (cfg.metrics or cfg.metric):
        hint = "; your own metrics go in --metric module:Name" if any(":" in m for m in unknown) else ""
        raise UserError(f"--metrics {','.join(cfg.metrics)}: unknown {unknown} (known: {', '.join(SETUP)}, none){hint}")
    parse_metric_args(cfg.metric_arg)
    user = {spec: resolve_user_metric(spec) for spec in dict.fromkeys(cfg.metric)}  # bad specs: refused now
    check_settings(cfg)
    out = check_out_dir(cfg.out, "--out")
    records, cap_rec, deviations = load_captions(cfg, proto)
    n, captions = len(records), [r["caption"] for r in records]
    if "clip" in cfg.metrics and (cfg.clip_model, cfg.clip_pretrained) != (proto.clip_model, proto.clip_pretrained):
        deviations.append(f"CLIP model {cfg.clip_model}/{cfg.clip_pretrained} instead of "
                          f"{proto.clip_model}/{proto.clip_pretrained}")
    info = dist.DistInfo.from_env()
    device = dist.pick_device(cfg.device, info.local_rank)
    started = dist.init(info, device, timeout_minutes=60)
    try:
        torch.manual_seed(rng.seed_int(rng.Stream.EVAL_INIT, cfg.seed))
        gen = Generator(cfg.checkpoint, device, cfg.ema, cfg.vae, cfg.text_pretrained)
        if cfg.aspect:
            gen.use_size(cfg.aspect)
        settings = build_settings(cfg, gen)
        gen_size = gen.image_size
        gen_res = min(gen_size)  # what a square protocol's centre crop keeps
        res = proto.resolution or gen_res
        if res != gen_res:
            log(info, f"generated images are {gen_res}px: resized to the protocol's {res}px for the metrics "
                      "(center crop + bicubic, as the reference images)")
        log(info, f"protocol {proto.name}: {n} samples, {len(settings)} setting(s), metrics "
                  f"{','.join([*cfg.metrics, *cfg.metric])}, {info.world_size} rank(s) on {device}")
        metrics, skipped = setup_metrics(cfg, info, device, res, captions, gen, records, user)
        if info.is_main:
            out.mkdir(parents=True, exist_ok=True)
        by_name = {m.name: m for m in metrics}
        ref_rec = by_name["fid"].ref_record if "fid" in by_name else None
        if ref_rec and proto.ref_images and ref_rec.get("n") != proto.ref_images:
            deviations.append(f"reference statistics over {ref_rec.get('n')} images instead of the protocol's "
                              f"{proto.ref_images} ({proto.ref_description})")
        if ref_rec and ref_rec.get("source") == "ref_stats" and not (ref_rec.get("meta") or {}).get("settings"):
            deviations.append("reference statistics of unknown provenance (no lct metadata in the .npz)")
        if "fid" in by_name and not by_name["fid"].record["weights_verified"]:
            deviations.append(f"FID Inception weights with sha256 {by_name['fid'].record['weights_sha256']}, not the "
                              f"published file's {FID_WEIGHTS_SHA256}")
        ckpt = gen.record(cfg.checkpoint, cfg.vae)
        common = {"protocol": proto.name, "protocol_conforms": not deviations, "checkpoint": ckpt["path"],
                  "checkpoint_step": ckpt["step"], "checkpoint_ema": ckpt["ema"], "captions_sha256": cap_rec["sha256"],
                  "seed": cfg.seed, "resolution": res}
        shapes = by_name.get("shapes")
        result: dict[str, Any] = {
            "format": RESULTS_FORMAT, "command": ["eval/clip_fid.py", *argv],
            "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "checkpoint": ckpt, "captions": cap_rec,
            "protocol": {"name": proto.name, "conforms": not deviations, "deviations": deviations,
                         "definition": proto.to_dict()},
            "num_samples": n, "seed": cfg.seed, "world_size": info.world_size, "device": str(device),
            "resolution": {"generated": gen_res, "generated_size": list(gen_size), "metrics": res,
                           "resized": gen_res != res or gen_size[0] != gen_size[1],
                           "rule": "center crop of the long edge + PIL bicubic (lct.vae.preprocess_image_uint8)"},
            "models": {**{m.name: m.record for m in metrics}, **skipped}, "reference": ref_rec, "skipped": skipped,
            **({"shapes_ceiling": shapes.ceiling} if shapes and shapes.ceiling else {}), "settings": [], "summary": {}}
        for k, st in skipped.items():  # the samples are written all the same
            if info.is_main:
                print(f"[eval] {k}: skipped: {st['reason']} (fix: {st['fix']})", file=sys.stderr, flush=True)
        if not metrics and info.is_main:
            print("[eval] no metric can run: writing the samples, captions.jsonl and grids only", file=sys.stderr,
                  flush=True)
        for s in settings:
            d = out / s.name
            values, tiles, s.throughput = run_setting(s, cfg, info, device, gen, metrics, records, d, res)
            base = {"n": n, "setting": s.name, "steps": s.steps, "tau": s.tau, "guidance": s.guidance, "nfe": s.nfe,
                    **common}
            s.metrics = {**{metric_name(k, n): {**v, **base, "metric": k} for k, v in values.items() if not v.get("skipped")},
                         **{k: v for k, v in values.items() if v.get("skipped")}, **skipped}
            for k, v in values.items():
                if v.get("skipped"):
                    log(info, f"{k}: skipped for {s.name}: {v['reason']}")
            result["settings"].append({"name": s.name, "steps": s.steps, "tau": s.tau, "guidance": s.guidance,
                                       "nfe": s.nfe, "dir": str(d.resolve()), "metrics": s.metrics,
                                       "throughput": s.throughput})
            result["summary"][s.name] = {k: (None if m.get("skipped") else m.get("value")) for k, m in s.metrics.items()}
            if info.is_main:
                write_setting(s, cfg, records, d, tiles)
                log(info, summary_line(s, by_name))
                write_json(out / "results.json", result)  # partial results survive an interruption
        tot = sum(s.throughput["seconds"] for s in settings)
        result["throughput"] = {"samples_per_s": n * len(settings) / tot if tot > 0 else None, "seconds": tot,
                                "samples": n * len(settings), "world_size": info.world_size,
                                "includes": THROUGHPUT_INCLUDES}
        if info.is_main:
            write_json(out / "results.json", result)
            for line in sweep_table(settings):
                log(info, line)
            log(info, f"eval throughput {result['throughput']['samples_per_s']:.2f} samples/s "
                      f"({info.world_size} rank(s)); results in {out / 'results.json'}")
        dist.barrier(info.world_size)
        return 0
    finally:
        if started:
            dist.close(barrier_first=False)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--make-captions" in argv:
        return make_captions_main(argv)

    def extra(p):
        p.add_argument("--make-captions", action="store_true",
                       help="write the protocol's caption file instead: --make-captions --coco-annotations "
                            "captions_val2014.json [--out FILE.jsonl] (prints its sha256)")
        p.add_argument("--coco-annotations", default=None, help="with --make-captions: MS-COCO captions_val2014.json")

    cfg, _ = cli_config(EvalConfig, argv, prog="eval/clip_fid.py", description=__doc__.split("\n\n")[0], extra=extra)
    return evaluate(cfg, argv)


def cli() -> None:
    cli_main(main)


if __name__ == "__main__":
    cli()
