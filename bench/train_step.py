"""Benchmark the trainer's real training step: throughput, time split, memory, MFU, and the price
of each technique, all in one process.

    python bench/train_step.py --arch DiT-XL/2 --batch 128 --compile --out OUT      # on a GPU
    python bench/train_step.py --tiny --out /tmp/bench                               # CPU, seconds (CI)

The step is `lct.train.train_step` on the `Run` that `lct.train.build` makes from a config, exactly
what `lct/train.py` runs (precision preset, SDPA, optional torch.compile and activation
checkpointing, iLCT objective by default). The data are real latent shards made by the real data
prep (`make_shapes` images at the resolution -> a random VAE of SD-VAE's architecture ->
`encode_latents` with a random open_clip ViT-B-32 text tower): 4x32x32 latents and 77 text tokens
at 256 px; weights are random because none can be downloaded, which changes no timing.

Reported per configuration: images/s, the split of the step (student forward, backward, teacher
forward, optimizer, EMA, host-to-device, data wait), peak memory, model FLOPs per step
(`torch.utils.flop_counter` on one eager step: student forward + backward, teacher forward, text
encoder when on the fly), MFU against the GPU's dense bf16 peak (H100 SXM 989 TFLOP/s, PCIe 756)
and against a bf16 matmul peak measured in the same run.
Ratios (`--ratios`, same process): our step vs the same step on a diffusers
PixArtTransformer2DModel of matching width and depth; consistency vs EDM step (the same DiT: NsLN
and dropout as the consistency run); OT on vs off; early-step diffusion term on vs off; text
encoder on the fly vs precomputed; data loading from the shards (GPU idle fraction); `bf16_trunk`
vs `tf32` on the consistency distance m of identical batches at the final stage (m / 2c^2, SPEC 1.1).
"""

from __future__ import annotations

if __name__ == "__main__" and __package__ in (None, ""):  # run as a file: repo root first on sys.path
    import pathlib
    import sys

    sys.path[0] = str(pathlib.Path(__file__).resolve().parents[1])

import argparse
import gc
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

from lct.config import load_config
from lct.dist import DistInfo
from lct.models import build_pixart
from lct.models.build import build_network
from lct.monitor import LossMeter
from lct.preflight import preflight
from lct.timing import PhaseTimer, no_timer
from lct.train import build, train_step

VARIANT_NAMES = ["pixart_block", "pixart_block_compiled", "edm_objective", "ot_off", "diffusion_term_off",
                 "text_on_the_fly", "real_data_loader"]
PEAKS_BF16 = {"H100 SXM": 989.4e12, "H100 PCIe": 756.0e12, "H200": 989.4e12, "A100": 312.0e12}


# ----------------------------------------------------------------------------------------------
# Data: real shards from the real data prep
# ----------------------------------------------------------------------------------------------


def make_latent_data(root: Path, n: int, resolution: int, tiny: bool, device: str) -> Path:
    """shapes images -> random VAE (SD-VAE architecture, or tiny) -> latent shards with states.
    The data prep scripts run as plain files (as users run them; no install needed)."""
    import subprocess

    from diffusers import AutoencoderKL

    out = root / "latents"
    if (out / "manifest.json").is_file():
        return out
    repo = Path(__file__).resolve().parents[1]
    per_shard = max(8, n // 4)
    subprocess.run([sys.executable, str(repo / "data_prep" / "make_shapes.py"), "--output", str(root / "img"),
                    "--num", str(n), "--size", str(resolution), "--samples-per-shard", str(per_shard)], check=True)
    vae_dir = root / "vae"
    torch.manual_seed(0)
    if tiny:
        vae = AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
                            block_out_channels=(8, 16, 16), layers_per_block=1, latent_channels=4,
                            norm_num_groups=8, sample_size=resolution)
    else:  # the architecture of stabilityai/sd-vae-ft-ema
        vae = AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                            block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
                            sample_size=256)
    vae.save_pretrained(str(vae_dir))
    shards = sorted((root / "img").glob("*.tar"))
    pattern = str(root / "img" / f"{{{shards[0].stem}..{shards[-1].stem}}}.tar")
    subprocess.run([sys.executable, str(repo / "data_prep" / "encode_latents.py"), "--input", pattern,
                    "--output", str(out), "--vae", str(vae_dir), "--resolution", str(resolution),
                    "--text-model", "lct-tiny-text" if tiny else "ViT-B-32", "--text-pretrained", "random",
                    "--text-states", "--device", device, "--num-workers", "0" if tiny else "8",
                    "--batch-size", "64", "--max-captions", "1"], check=True)
    return out


# ----------------------------------------------------------------------------------------------
# Networks compared
# ----------------------------------------------------------------------------------------------


def pixart_like(cfg, desc) -> torch.nn.Module:
    """lct's PixArt network (`lct.models.build_pixart`: diffusers' PixArt-alpha transformer behind
    the SPEC 14 wrapper) at the width, depth, heads and patch of the DiT `cfg` builds, random weights."""
    c = build_network(cfg, desc, meta=True).net.config
    latent = desc.latent_shape
    network = build_pixart(dict(num_attention_heads=c.num_heads, attention_head_dim=c.hidden_size // c.num_heads,
                                in_channels=latent[0], out_channels=latent[0], num_layers=c.depth,
                                cross_attention_dim=c.hidden_size, caption_channels=desc.text_dim,
                                sample_size=latent[1], patch_size=c.patch_size, use_additional_conditions=False),
                           sigma_min=cfg.method.sigma_min)
    if cfg.model.compile:
        for block in network.net.transformer.transformer_blocks:
            block.compile()
    return network


# ----------------------------------------------------------------------------------------------
# Measurement
# ----------------------------------------------------------------------------------------------


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def bf16_peak(device) -> tuple[str, float | None, float | None]:
    """(device name, datasheet dense bf16 peak, measured bf16 matmul FLOP/s)."""
    if device.type != "cuda":
        return platform.processor() or "cpu", None, None
    name = torch.cuda.get_device_name(device)
    sheet = None
    if "H100" in name:
        sheet = PEAKS_BF16["H100 PCIe"] if "PCIe" in name else PEAKS_BF16["H100 SXM"]
    elif "H200" in name:
        sheet = PEAKS_BF16["H200"]
    elif "A100" in name:
        sheet = PEAKS_BF16["A100"]
    n = 8192
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    sync(device)
    t = time.perf_counter()
    for _ in range(10):
        a @ b
    sync(device)
    measured = 10 * 2 * n ** 3 / (time.perf_counter() - t)
    del a, b
    return name, sheet, measured


def build_run(overrides: list[str], run_dir: Path, network_kind: str = "dit"):
    """The trainer's `Run` for a config (no monitor); `network_kind` "pixart" swaps in PixArt."""
    cfg = load_config(None, [f"run.dir={run_dir}", "run.resume=never", "run.tensorboard=false", *overrides])
    info = DistInfo.from_env()
    start = preflight(cfg, info, monitor=False)  # no grids: the VAE is not loaded
    network = pixart_like(cfg, start.desc) if network_kind == "pixart" else None
    run = build(cfg, info, start, network=network, monitor=False)
    assert run is not None
    return run


def fixed_batches(run, n_steps: int) -> list[list[dict]]:
    it = iter(run.loader)
    return [[next(it) for _ in range(run.accum)] for _ in range(n_steps)]


class Stepper:
    """Steps of one run from its start state, as `lct.train.loop` makes them: `train_step`, the
    next state, and the loss meter's per-step accumulation (logging itself is not timed)."""

    def __init__(self, run):
        self.run, self.state = run, run.state
        self.meter = LossMeter(run.cfg, run.device, run.info.world_size, run.state.images_seen)

    def __call__(self, batches: list[dict], timer=no_timer) -> None:
        result = train_step(self.run, batches, self.state, timer)
        self.state = self.state.after_step(result.applied, self.run.cfg.optim.batch_size, 0.0)
        self.meter.add(result.diagnostics)


def host_syncs(step: Stepper, batches) -> dict:
    """Host-device synchronisations during one step (torch's sync debug mode), by source line."""
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            step(batches)
            sync(step.run.device)
        finally:
            torch.cuda.set_sync_debug_mode(0)
    where: dict[str, int] = {}
    for w in caught:
        if "synchroniz" in str(w.message):
            key = f"{Path(w.filename).name}:{w.lineno}"
            where[key] = where.get(key, 0) + 1
    return {"total": sum(where.values()), "by_line": dict(sorted(where.items(), key=lambda kv: -kv[1]))}


def count_flops(step: Stepper, batches) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        step(batches)
    return float(counter.get_total_flops())


def time_steps(step: Stepper, batches, warmup: int, steps: int, from_loader: bool = False) -> dict:
    """Uninstrumented throughput, then an instrumented pass for the split of the step."""
    run = step.run
    device = run.device
    it = iter(run.loader) if from_loader else None

    def get(i):
        if it is None:
            return batches[i % len(batches)]
        return [next(it) for _ in range(run.accum)]

    for i in range(warmup):
        step(get(i))
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    data_wait = 0.0
    t0 = time.perf_counter()
    for i in range(steps):
        td = time.perf_counter()
        b = get(i)
        data_wait += time.perf_counter() - td
        step(b)
    sync(device)
    total = time.perf_counter() - t0
    timer = PhaseTimer(device)
    n_inst = min(steps, 5)
    for i in range(n_inst):
        step(get(i), timer=timer)
    split = {k: v / n_inst for k, v in timer.summary().items()}
    batch = run.cfg.optim.batch_size
    out = {"step_ms": 1000 * total / steps, "images_per_s": batch * steps / total, "split_ms": split,
           "data_wait_ms": 1000 * data_wait / steps,
           "gpu_idle_fraction": data_wait / total if from_loader else None}
    if device.type == "cuda":
        out["peak_memory_gb"] = torch.cuda.max_memory_allocated(device) / 2**30
    return out


def free_memory() -> None:
    """After the caller dropped its run: collect it, so the next configuration gets the memory."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def run_config(name: str, overrides: list[str], root: Path, args, network_kind="dit", flops=True,
               from_loader=False, peaks=None) -> dict:
    """Measure one configuration. Out of GPU memory, the same per-GPU batch is retried as 2 and 4
    accumulated micro-batches (the batch is fixed; only its split changes); then it is reported."""
    res = _guarded(name, overrides, root, args, network_kind, flops, from_loader, peaks)
    batch = int(next(o for o in overrides if o.startswith("optim.batch_size=")).split("=")[1])
    for parts in (2, 4):
        if "out of memory" not in res.get("error", "") or any(o.startswith("optim.micro_batch_size=")
                                                               for o in overrides):
            break
        res = _guarded(name, overrides + [f"optim.micro_batch_size={batch // parts}"], root, args,
                       network_kind, flops, from_loader, peaks)
    return res


def _guarded(*a) -> dict:
    """A failing configuration is recorded and the benchmark goes on (GPU time is scarce)."""
    try:
        return _run_config(*a)
    except Exception as err:  # noqa: BLE001 - reported in the results, with its type
        import traceback

        traceback.print_exc()
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        return {"name": a[0], "error": f"{type(err).__name__}: {err}"[:400]}


def _run_config(name, overrides, root, args, network_kind, flops, from_loader, peaks) -> dict:
    print(f"\n== {name}: {' '.join(overrides)}", flush=True)
    try:
        run = build_run(overrides, root / "runs" / name.replace("/", "_"), network_kind)
    except torch.cuda.OutOfMemoryError as err:
        free_memory()
        return {"name": name, "error": f"out of memory at setup: {err}"[:300]}
    res = {"name": name, "overrides": overrides, "micro_batch": run.micro, "accum": run.accum}
    try:
        step = Stepper(run)
        batches = fixed_batches(run, 2)
        if flops:
            res["flops_per_step"] = count_flops(step, batches[0])
        res.update(time_steps(step, batches, args.warmup, args.steps, from_loader))
        if run.device.type == "cuda":
            res["host_syncs_per_step"] = host_syncs(step, batches[0])
    except torch.cuda.OutOfMemoryError as err:
        res["error"] = f"out of memory: {err}"[:300]
    finally:  # also on other errors: the next configuration needs the memory
        run = step = batches = None
        free_memory()
    if "flops_per_step" in res and "step_ms" in res and peaks:
        achieved = res["flops_per_step"] / (res["step_ms"] / 1000)
        res["achieved_tflops"] = achieved / 1e12
        if peaks[1]:
            res["mfu_datasheet"] = achieved / peaks[1]
        if peaks[2]:
            res["mfu_measured_peak"] = achieved / peaks[2]
    print(json.dumps(res, indent=1), flush=True)
    return res


@torch.no_grad()
def precision_m(root: Path, base: list[str], steps_total: int) -> dict:
    """Consistency distance m of identical batches at the final curriculum stage under tf32 and
    bf16_trunk (same weights, slightly perturbed from adaLN-Zero so outputs are non-trivial)."""
    from lct import consistency as C
    from lct.data import to_device
    from lct.objectives import cond_of, teacher_pass
    from lct.train import condition

    out = {}
    state = None
    for precision in ("tf32", "bf16_trunk"):
        run = build_run([*base, f"precision={precision}"], root / "runs" / f"m_{precision}")
        net = run.engine.module
        if state is None:
            g = torch.Generator().manual_seed(0)
            for p in net.parameters():
                p.add_(0.02 * torch.randn(p.shape, generator=g).to(p))
            state = {k: v.clone() for k, v in net.state_dict().items()}
        net.load_state_dict(state)
        b = to_device(next(iter(run.loader)), run.device)
        b["cond"] = condition(run, b)
        plan = run.objective.plan(b, steps_total - 1)
        cur = plan.curriculum
        x, z = b["x"], b["z"]
        s_hi = plan.sigma.to(x.device, torch.float32).view(-1, 1, 1, 1)
        s_lo = plan.sigma_teacher.to(x.device, torch.float32).view(-1, 1, 1, 1)
        cond = cond_of(b)
        f_t = teacher_pass(run.engine, x + s_lo * z, s_lo.flatten(), cond)
        f_s = teacher_pass(run.engine, x + s_hi * z, s_hi.flatten(), cond)
        mm = (f_s - f_t).square().flatten(1).mean(1).double()
        ratio = (mm / (2 * cur.c ** 2)).cpu()
        out[precision] = {"N": cur.num_points, "c": cur.c, "m_over_2c2_mean": float(ratio.mean()),
                          "m_over_2c2_median": float(ratio.median()), "m_mean": float(mm.mean())}
        out[precision + "_f_student"] = f_s.float().cpu()
        run = net = b = x = z = cond = None
        free_memory()
    a, b = out.pop("tf32_f_student"), out.pop("bf16_trunk_f_student")
    rounding = (a - b).square().flatten(1).mean(1).double()
    out["bf16_vs_tf32_output_msd_over_2c2_mean"] = float((rounding / (2 * out["tf32"]["c"] ** 2)).mean())
    # SPEC 1.1: identical c_noise in bf16 for adjacent levels of the 641-point grid, if it were bf16.
    grid = C.karras_sigmas(641)
    e = C.time_embed_input(grid).to(torch.bfloat16)
    out["bf16_equal_adjacent_time_inputs_641"] = int((e[1:] == e[:-1]).sum())
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="bench/train_step.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", nargs="+", default=["DiT-B/2"], help="DiT presets to time")
    p.add_argument("--batch", type=int, nargs="+", default=[256], help="per-GPU batch per arch")
    p.add_argument("--micro", type=int, nargs="+", default=None, help="micro-batch per arch (accumulate)")
    p.add_argument("--precision", default="bf16_trunk", choices=["bf16_trunk", "tf32", "fp32"])
    p.add_argument("--objective", default="ilct")
    p.add_argument("--compile", nargs="*", default=[], help="archs to time compiled too (after eager)")
    p.add_argument("--checkpointing", action="store_true")
    p.add_argument("--ratios", action="store_true", help="the technique-price ratios (on the first arch)")
    p.add_argument("--variants", nargs="+", default=None, choices=VARIANT_NAMES,
                   help="with --ratios: only these ratio configurations (default: all but "
                   "pixart_block_compiled), and no precision check")
    p.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE",
                   help="config overrides for every configuration (e.g. optim.fused=true)")
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--tiny", action="store_true", help="CPU smoke run at tiny sizes (CI)")
    p.add_argument("--workers", type=int, default=8)
    p.add_argument("--out", default=None, help="write results.json here")
    p.add_argument("--work", default=None, help="scratch directory (default: a temp dir)")
    args = p.parse_args(argv)

    device = torch.device("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    root = Path(args.work or tempfile.mkdtemp(prefix="lct-bench-"))
    resolution = 16 if args.tiny else 256
    n_images = 2 * max(args.batch) + 64 if not args.tiny else 64
    t0 = time.time()
    data = make_latent_data(root, n_images, resolution, args.tiny, device.type)
    print(f"data: {data} ({time.time() - t0:.1f} s)", flush=True)
    peaks = bf16_peak(device)
    print(f"device: {peaks[0]}; datasheet bf16 peak {peaks[1]}; measured bf16 matmul {peaks[2]}", flush=True)

    def base(arch: str, batch: int, micro: int | None) -> list[str]:
        o = [f"data.shards={data}", "data.mode=stream", f"data.num_workers={0 if args.tiny else args.workers}",
             "data.text=precomputed", f"method.preset={args.objective}", f"model.arch={arch}",
             f"optim.batch_size={batch}", f"precision={args.precision}", "distributed.zero_stage=2",
             f"model.checkpointing={str(args.checkpointing).lower()}", "run.total_steps=400000",
             "data.shuffle_buffer=64"]
        if micro:
            o.append(f"optim.micro_batch_size={micro}")
        if args.tiny:
            o += ["model.hidden_size=32", "model.depth=2", "model.num_heads=2"]
        return o + list(args.set)

    micros = args.micro or [None] * len(args.arch)

    def save_partial():
        if args.out:
            Path(args.out).mkdir(parents=True, exist_ok=True)
            (Path(args.out) / "train_step.json").write_text(json.dumps(results, indent=1, default=str))

    results: dict = {"device": peaks[0], "datasheet_bf16_peak": peaks[1], "measured_bf16_matmul": peaks[2],
                     "torch": torch.__version__, "argv": sys.argv, "configs": [], "ratios": {}}
    for arch, batch, micro in zip(args.arch, args.batch, micros):
        r = run_config(f"{arch} eager", base(arch, batch, micro), root, args, peaks=peaks)
        results["configs"].append(r)
        save_partial()
        if arch in args.compile:
            rc = run_config(f"{arch} compiled", base(arch, batch, micro) + ["model.compile=true"], root, args,
                            flops=False, peaks=peaks)
            if "flops_per_step" in r and "step_ms" in rc:
                rc["flops_per_step"] = r["flops_per_step"]
                achieved = r["flops_per_step"] / (rc["step_ms"] / 1000)
                rc["achieved_tflops"] = achieved / 1e12
                rc["mfu_datasheet"] = achieved / peaks[1] if peaks[1] else None
                rc["mfu_measured_peak"] = achieved / peaks[2] if peaks[2] else None
            results["configs"].append(rc)
            save_partial()

    if args.ratios:
        arch, batch, micro = args.arch[0], args.batch[0], micros[0]
        b0 = base(arch, batch, micro)
        ref = results["configs"][0]
        # The same DiT for the EDM step: its preset would drop NsLN (and set dropout), which on the
        # H200 cost more than the objective itself (2026-11-30: 2.09x with NsLN only in the iLCT run).
        m = load_config(None, [f"run.dir={root / 'runs' / 'resolve'}", *b0]).model
        variants = {
            "pixart_block": (b0, "pixart", {}),
            "pixart_block_compiled": (b0 + ["model.compile=true"], "pixart", {}),
            "edm_objective": (b0 + ["method.preset=edm", f"model.nsln={m.nsln}", f"model.dropout={m.dropout}"],
                              "dit", {}),
            "ot_off": (b0 + ["method.ot=false"], "dit", {}),
            "diffusion_term_off": (b0 + ["method.diffusion_weight=0"], "dit", {}),
            "text_on_the_fly": (b0 + ["data.text=on_the_fly"], "dit", {}),
            "real_data_loader": (b0, "dit", {"from_loader": True}),
        }
        ours_compiled = next((c for c in results["configs"] if c.get("name") == f"{arch} compiled"), {})
        for name, (ov, kind, kw) in variants.items():
            if name not in (args.variants or [v for v in VARIANT_NAMES if v != "pixart_block_compiled"]):
                continue
            r = run_config(name, ov, root, args, network_kind=kind, peaks=peaks, **kw)
            results["configs"].append(r)
            save_partial()
            if name == "pixart_block_compiled":
                if "step_ms" in r and "step_ms" in ours_compiled:
                    results["ratios"]["ours / pixart step time, both compiled (<= 1 is faster)"] = (
                        ours_compiled["step_ms"] / r["step_ms"])
            elif "step_ms" in r and "step_ms" in ref:
                results["ratios"][f"{name} / ilct_dit"] = r["step_ms"] / ref["step_ms"]
        ratios = results["ratios"]
        if "edm_objective / ilct_dit" in ratios:
            ratios["consistency / edm step"] = 1 / ratios.pop("edm_objective / ilct_dit")
        if "pixart_block / ilct_dit" in ratios:
            ratios["ours / pixart step time (<= 1 is faster)"] = 1 / ratios["pixart_block / ilct_dit"]
        loader = next((c for c in results["configs"] if c.get("name") == "real_data_loader"), {})
        if loader.get("gpu_idle_fraction") is not None:
            ratios["data wait fraction of step (real loader)"] = loader["gpu_idle_fraction"]
        split = ref.get("split_ms", {})
        if split and "step_ms" in ref:
            ot_diff = ratios.get("ot_off / ilct_dit")
            ratios["OT plus data share of step"] = (
                (1 - ot_diff if ot_diff else 0.0) + (loader.get("gpu_idle_fraction") or 0.0))
        if not args.variants:
            try:
                results["precision_m"] = precision_m(root, b0, 400000)
            except Exception as err:  # noqa: BLE001
                results["precision_m"] = {"error": f"{type(err).__name__}: {err}"[:400]}
            print(json.dumps(results["precision_m"], indent=1), flush=True)

    print("\n" + table(results), flush=True)
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "train_step.json").write_text(json.dumps(results, indent=1, default=str))
        (Path(args.out) / "train_step.md").write_text(table(results))
    return 0


def table(results: dict) -> str:
    lines = [f"device: {results['device']}; torch {results['torch']}; "
             f"measured bf16 matmul peak {fmt(results.get('measured_bf16_matmul'), 1e12)} TFLOP/s", "",
             "| config | micro x accum | step ms | img/s | TFLOP/step | TFLOP/s | MFU (sheet) | MFU (measured) | peak GB |",
             "|---|---|---|---|---|---|---|---|---|"]
    for c in results["configs"]:
        if "error" in c:
            lines.append(f"| {c['name']} | | {c['error'][:60]} | | | | | | |")
            continue
        lines.append(f"| {c['name']} | {c['micro_batch']} x {c['accum']} | {c['step_ms']:.1f} | {c['images_per_s']:.1f} | "
                     f"{fmt(c.get('flops_per_step'), 1e12)} | {fmt(c.get('achieved_tflops'), 1)} | "
                     f"{pct(c.get('mfu_datasheet'))} | {pct(c.get('mfu_measured_peak'))} | "
                     f"{fmt(c.get('peak_memory_gb'), 1)} |")
    ref = results["configs"][0] if results["configs"] else {}
    if ref.get("split_ms"):
        lines += ["", "split of the step (ms, instrumented, first config): " +
                  ", ".join(f"{k} {v:.1f}" for k, v in sorted(ref["split_ms"].items()))]
    if results["ratios"]:
        lines += ["", "| ratio | value |", "|---|---|"]
        lines += [f"| {k} | {v:.3f} |" for k, v in results["ratios"].items()]
    return "\n".join(lines) + "\n"


def fmt(v, scale) -> str:
    return "" if v is None else f"{v / scale:.2f}"


def pct(v) -> str:
    return "" if v is None else f"{100 * v:.1f}%"


if __name__ == "__main__":
    sys.exit(main())
