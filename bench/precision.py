"""The bf16 rounding part of the consistency distance m, on trained networks, at every curriculum stage.

For each stage the script draws the stage's pairs (iCT/iLCT: the N(k) grid and its lognormal pair law,
SPEC 2.2-2.3; ECT: t ~ lognormal, r = r(t, stage), SPEC 2.4) at stratified quantiles, evaluates the
same network at the same pair in fp32 and under bf16 autocast (`precision: bf16_trunk`: only the
per-token trunk in bf16, SPEC 1.1), and reports

    m_fp32  = mean((f32(student) - f32(teacher))^2)                  the consistency distance
    m_round = mean(((fb(student) - fb(teacher)) - (f32(student) - f32(teacher)))^2)
                                                                      its bf16 rounding part

against the stage's Cauchy scale 2c^2 (adaptive c, SPEC 4). m_round / 2c^2 near or above 1 means
bf16 rounding alone moves a pair across the scale where the Cauchy loss turns logarithmic.

    python bench/precision.py --export demo_out/runs/demo --export demo_out/runs/edm \\
        --latents demo_out/latents/heldout --out bench/results/precision
    python bench/precision.py --tiny --out /tmp/p       # CI-sized, a random network

On a GPU (`--device cuda`) the reference is fp32 with TF32 off and `tf32` is measured too.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lct import consistency as C  # noqa: E402
from lct.rng import Stream, philox  # noqa: E402


def ict_stages(s0: int = 10, s1: int = 1280) -> list[dict]:
    """One entry per iCT stage: n = s0 * 2^j intervals up to s1, c = adaptive c (SPEC 2.2, 4)."""
    out, n = [], s0
    while n <= s1:
        out.append({"curriculum": "ict", "stage": len(out), "N": n + 1, "c": C.adaptive_c(n, s0)})
        n *= 2
    return out


def ect_stages(num: int = 8, s0: int = 10) -> list[dict]:
    return [{"curriculum": "ect", "stage": s, "c": C.adaptive_c_for_ect_stage(s, s0)} for s in range(num)]


def stage_pairs(stage: dict, num: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(student sigma, teacher sigma) of `num` pairs at stratified quantiles of the stage's law
    (teacher 0 = the target is the clean latent, ECT's r = 0)."""
    q = (torch.arange(num, dtype=torch.float64) + 0.5) / num
    if stage["curriculum"] == "ict":
        sigmas = C.karras_sigmas(stage["N"])
        pair = C.pair_index_from_uniform(q, C.lognormal_pair_probs(sigmas))
        return sigmas[pair + 1], sigmas[pair]
    t = C.ect_t(torch.special.ndtri(q))
    return t, C.ect_r(t, stage["stage"])


def autocast_mode(mode: str, device: torch.device):
    if mode == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def set_tf32(on: bool) -> None:
    if torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = on
        torch.backends.cudnn.allow_tf32 = on


@torch.no_grad()
def evaluate(net, method: dict, x: torch.Tensor, z: torch.Tensor, cond: dict, stage: dict, modes: list[str],
             device: torch.device, chunk: int = 64) -> dict:
    """m_fp32, and per mode m_mode and m_round of the stage's pairs (module docstring)."""
    s, t = stage_pairs(stage, x.shape[0])
    kw = dict(sigma_data=method["sigma_data"], sigma_min=method["sigma_min"],
              time_embed_scale=method["time_embed_scale"])

    def f(xb, zb, sig, cb, mode):
        sig = sig.float().to(device)
        set_tf32(mode == "tf32")
        with autocast_mode(mode, device):
            return C.consistency_function(net, xb + sig.view(-1, 1, 1, 1) * zb, sig, **kw, **cb)

    per = {"fp32": [], **{m: [] for m in modes}, **{f"round_{m}": [] for m in modes}}
    for lo in range(0, x.shape[0], chunk):
        sl = slice(lo, lo + chunk)
        xb, zb = x[sl].to(device), z[sl].to(device)
        cb = {k: v[sl].to(device) for k, v in cond.items()}
        clean = t[sl] <= 0
        t_safe = torch.where(clean, s[sl], t[sl])

        def diff(mode):
            fs = f(xb, zb, s[sl], cb, mode)
            ft = torch.where(clean.to(device).view(-1, 1, 1, 1), xb, f(xb, zb, t_safe, cb, mode))
            return (fs - ft).double()

        d32 = diff("fp32")
        per["fp32"].append(d32.square().flatten(1).mean(1).cpu())
        for m in modes:
            dm = diff(m)
            per[m].append(dm.square().flatten(1).mean(1).cpu())
            per[f"round_{m}"].append((dm - d32).square().flatten(1).mean(1).cpu())
    set_tf32(False)
    cat = {k: torch.cat(v) for k, v in per.items()}
    two_c2 = 2 * stage["c"] ** 2
    row = {**stage, "two_c2": two_c2, "m_fp32": float(cat["fp32"].mean()),
           "dsigma_median": float((s - t).median())}
    for m in modes:
        r = cat[f"round_{m}"]
        row[f"m_{m}"] = float(cat[m].mean())
        row[f"m_round_{m}"] = float(r.mean())
        row[f"m_round_{m}_p90"] = float(r.quantile(0.9))
        row[f"m_round_{m}_over_2c2"] = float(r.mean()) / two_c2
        row[f"m_round_{m}_over_m"] = float(r.mean()) / max(row["m_fp32"], 1e-30)
        row[f"frac_round_{m}_gt_tenth_2c2"] = float((r > 0.1 * two_c2).double().mean())
    return row


def load_data(latents: str | None, pipe, num: int, seed: int) -> tuple[torch.Tensor, list[str]]:
    """Held-out latents (posterior samples with fixed eps, normalised as in training) and their
    first captions; without `latents`, N(0, 0.5^2) latents and empty captions."""
    shape = tuple(pipe.latent_shape)
    if latents is None:
        g = philox(Stream.BENCH, seed, 0, 0)
        return torch.from_numpy(0.5 * g.standard_normal((num, *shape), dtype=np.float32)), [""] * num
    from lct.data import InMemoryLatents, expand_urls

    urls = expand_urls(latents) if not Path(latents).is_dir() else sorted(str(p) for p in Path(latents).glob("*.tar"))
    samples = InMemoryLatents(urls).samples[:num]
    from lct.export import pipeline_latent_norm

    norm = pipeline_latent_norm(pipe)
    xs, caps = [], []
    for i, smp in enumerate(samples):
        eps = philox(Stream.BENCH, seed, 1, i).standard_normal(smp["mean"].shape, dtype=np.float32)
        xs.append(norm.normalize(smp["mean"].astype(np.float32) + smp["std"].astype(np.float32) * eps))
        caps.append((smp.get("captions") or [""])[0])
    return torch.from_numpy(np.stack(xs)).float(), caps


def tiny_pipe(work: Path):
    sys.path.insert(0, str(ROOT / "tests"))
    from helpers_export import make_tiny_export  # the tests' tiny export (random weights, tiny VAE/text)

    from lct.export import load_pipeline

    torch.manual_seed(0)
    pipe = load_pipeline(make_tiny_export(work))
    with torch.no_grad():  # off the zero initialisation of adaLN-Zero, so F is not 0
        for p in pipe.transformer.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return pipe


def markdown(rows: list[dict], modes: list[str]) -> str:
    head = "| network | curriculum | stage | N | 2c^2 | median dsigma | m fp32 |"
    sep = "|---|---|---|---|---|---|---|"
    for m in modes:
        head += f" m_round {m} | m_round {m} / 2c^2 | m_round {m} / m | frac > 0.1 * 2c^2 |"
        sep += "---|---|---|---|"
    lines = [head, sep]
    for r in rows:
        line = (f"| {r['network']} | {r['curriculum']} | {r['stage']} | {r.get('N', '')} | {r['two_c2']:.3g} | "
                f"{r['dsigma_median']:.3g} | {r['m_fp32']:.3g} |")
        for m in modes:
            line += (f" {r[f'm_round_{m}']:.3g} | {r[f'm_round_{m}_over_2c2']:.3g} | "
                     f"{r[f'm_round_{m}_over_m']:.3g} | {r[f'frac_round_{m}_gt_tenth_2c2']:.2f} |")
        lines.append(line)
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--export", action="append", default=[], help="run or export directory (repeatable)")
    p.add_argument("--latents", default=None, help="held-out latent shards (a directory or pattern)")
    p.add_argument("--num", type=int, default=256, help="pairs per stage")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--ect-stages", type=int, default=8)
    p.add_argument("--s1", type=int, default=1280, help="last iCT stage's intervals (iCT 1280, iLCT 640)")
    p.add_argument("--tiny", action="store_true", help="a tiny random network (CI)")
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    from lct.export import load_pipeline

    device = torch.device(args.device)
    modes = ["bf16"] + (["tf32"] if device.type == "cuda" else [])
    torch.backends.cuda.matmul.allow_tf32 = False
    nets = [("tiny", tiny_pipe(Path(args.out) / "tiny_work"))] if args.tiny else \
        [(str(e), load_pipeline(e)) for e in args.export]
    if not nets:
        p.error("give --export DIR (repeatable) or --tiny")
    stages = ict_stages(s1=args.s1) + ect_stages(args.ect_stages)
    rows = []
    for name, pipe in nets:
        method = dict((pipe.training_record or {})["method"])
        net = pipe.transformer.to(device).eval()
        x, caps = load_data(args.latents, pipe, args.num, args.seed)
        z = torch.from_numpy(philox(Stream.BENCH, args.seed, 2, 0).standard_normal(tuple(x.shape), dtype=np.float32))
        cond = {}
        if pipe.transformer.config.cond == "text":
            states, mask, pooled = pipe.encode_prompt(caps, "cpu")[:3]
            cond = {"text_states": states.cpu(), "text_mask": mask.cpu(), "pooled": pooled.cpu()}
        cond["cond_drop"] = torch.zeros(x.shape[0], dtype=torch.bool)
        for st in stages:
            row = {"network": name, "step": (pipe.training_record or {}).get("step"),
                   "objective": method.get("objective"), **evaluate(net, method, x, z, cond, st, modes, device)}
            rows.append(row)
            print(json.dumps(row), flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = {"device": str(device), "torch": torch.__version__, "num": args.num, "modes": modes,
            "latents": args.latents, "command": " ".join(sys.argv)}
    (out / "precision.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    (out / "precision.md").write_text(markdown(rows, modes))
    print(markdown(rows, modes))
    return 0


if __name__ == "__main__":
    sys.exit(main())
