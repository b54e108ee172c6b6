"""Where the DiT's step time goes, and A/B timings of eager fusions, on synthetic inputs.

    python bench/profile_model.py --arch DiT-B/2 --batch 256 --out OUT      # on a GPU
    python bench/profile_model.py --tiny                                     # CPU smoke (CI)

One "step" here is the model part of the iLCT step that `bench/train_step.py` times: a student
forward + backward and a teacher forward (no_grad), through `Precond(TextDiT)` under the
`bf16_trunk` autocast (SPEC 1.1), on 4x32x32 latents and 77 x 512 text states. No data, optimizer
or DeepSpeed: those are a few percent of the real step (bench/RESULTS.md). Reported:
- the top CUDA kernels of the eager step (torch.profiler), to say what the time is spent on;
- ms per step for each variant of the elementwise code around the matmuls (`VARIANTS`), eager
  and, with `--compile`, with the blocks compiled;
- each variant's output and gradients against the current code on identical inputs and weights,
  in fp32 (must agree to fp32 rounding) and under the bf16 autocast.
"""

from __future__ import annotations

if __name__ == "__main__" and __package__ in (None, ""):  # run as a file: repo root first on sys.path
    import pathlib
    import sys

    sys.path[0] = str(pathlib.Path(__file__).resolve().parents[1])

import argparse
import contextlib
import copy
import json
import sys
import time
from pathlib import Path

import torch

from bench.train_step import sync
from lct.config import load_config
from lct.data import DataDescription
from lct.models import dit as D
from lct.models.build import build_network


# ----------------------------------------------------------------------------------------------
# Candidate eager fusions (same function, fewer passes over the fp32 residual stream), as
# subclasses of the model's modules; `variant` gives a copy of the network that uses them
# ----------------------------------------------------------------------------------------------


def modulate_addcmul(x, shift, scale):
    """shift + x * (1 + scale) as one kernel instead of three."""
    return torch.addcmul(shift.unsqueeze(1), x, (1 + scale).unsqueeze(1))


class BlockAddcmul(D.DiTBlock):
    """DiTBlock.forward with each gated residual x + gate * out as one addcmul (and modulate too)."""

    def forward(self, x, c, text=None, text_mask=None, dtype=None):
        mod = self.adaLN_modulation(c).chunk(self.num_mod, dim=1)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mod[:6]
        x = torch.addcmul(x, gate_msa.unsqueeze(1),
                          self.attn(D._to(modulate_addcmul(self.norm1(x), shift_msa, scale_msa), dtype)))
        if self.cross_attn is not None:
            shift_ca, scale_ca, gate_ca = mod[6:]
            ca = self.cross_attn(D._to(modulate_addcmul(self.norm_ca(x), shift_ca, scale_ca), dtype), text, text_mask)
            x = torch.addcmul(x, gate_ca.unsqueeze(1), ca)
        return torch.addcmul(x, gate_mlp.unsqueeze(1),
                             self.mlp(D._to(modulate_addcmul(self.norm2(x), shift_mlp, scale_mlp), dtype)))


class FinalAddcmul(D.FinalLayer):
    def forward(self, x, c):
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate_addcmul(self.norm_final(x.float()), shift, scale))


class NSLNVarMean(D.NonScalingLayerNorm):
    """NonScalingLayerNorm from var_mean and elementwise ops (fp32), instead of layer_norm, whose
    CUDA kernel is slow on 64-wide rows (one row per block: 625 us per call on the H200 profile).
    (A single mixed-dtype layer_norm with a unit weight was tried first: CUDA refused a bf16 input
    with fp32 weight and bias, "expected scalar type BFloat16 but found Float", torch 2.11.)"""

    def forward(self, h):
        with D.autocast_off(h.device):
            hf = h.float()
            var, mean = torch.var_mean(hf, dim=-1, keepdim=True, correction=0)
            return ((hf - mean) * torch.rsqrt(var + self.eps) + self.bias.float()).to(h.dtype)


@torch.compile(dynamic=True)
def _nsln_compiled(h, bias, eps: float):
    hf = h.float()
    var, mean = torch.var_mean(hf, dim=-1, keepdim=True, correction=0)
    return ((hf - mean) * torch.rsqrt(var + eps) + bias.float()).to(h.dtype)


class NSLNCompiled(D.NonScalingLayerNorm):
    """The same, as one compiled (fused) kernel while the rest of the model stays eager."""

    def forward(self, h):
        with D.autocast_off(h.device):
            return _nsln_compiled(h, self.bias, self.eps)


VARIANTS = {
    "current": {},
    "addcmul": {D.DiTBlock: BlockAddcmul, D.FinalLayer: FinalAddcmul},
    "nsln_var_mean": {D.NonScalingLayerNorm: NSLNVarMean},
    "nsln_compiled": {D.NonScalingLayerNorm: NSLNCompiled},
}


def variant(net: torch.nn.Module, name: str) -> torch.nn.Module:
    """`net` itself ("current"), or a copy with the same weights whose modules of the replaced
    classes are instances of the variant's subclasses (the model's classes stay untouched)."""
    swap = VARIANTS[name]
    if not swap:
        return net
    out = copy.deepcopy(net)
    for m in out.modules():
        if type(m) in swap:
            m.__class__ = swap[type(m)]
    return out


# ----------------------------------------------------------------------------------------------
# Model, inputs, step
# ----------------------------------------------------------------------------------------------


def build(arch: str, tiny: bool, device):
    """The trainer's network (`lct.models.build.build_network`: Precond(TextDiT)) at 4x32x32 latents, 77 x 512 text."""
    over = [f"model.arch={arch}", "method.preset=ilct"]
    if tiny:
        over += ["model.hidden_size=32", "model.depth=2", "model.num_heads=2"]
    net = build_network(load_config(None, over), DataDescription()).to(device)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # off adaLN-Zero, so every path carries signal (and no zeros are timed)
        for p in net.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=g).to(p))
    return net.train()


def inputs(batch: int, device, seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(3, 78, (batch,), generator=g)
    return {"x": torch.randn(batch, 4, 32, 32, generator=g).to(device),
            "sigma": torch.exp(torch.randn(batch, generator=g) * 1.6 - 0.8).to(device),
            "text_states": torch.randn(batch, 77, 512, generator=g).to(device),
            "text_mask": (torch.arange(77)[None] < lengths[:, None]).to(device),
            "pooled": torch.randn(batch, 512, generator=g).to(device),
            "cond_drop": torch.zeros(batch, dtype=torch.bool, device=device)}


def autocast(device, on: bool):
    return torch.autocast(device.type, dtype=torch.bfloat16) if on else contextlib.nullcontext()


def step(net, b: dict, bf16: bool) -> torch.Tensor:
    """Student forward + backward, teacher forward (no_grad); returns the student output."""
    device = b["x"].device
    cond = {k: b[k] for k in ("text_states", "text_mask", "pooled", "cond_drop")}
    with autocast(device, bf16):
        with torch.no_grad():
            f_t = net(b["x"] * 0.99, b["sigma"] * 0.99, **cond)
        f_s = net(b["x"], b["sigma"], **cond)
    (f_s - f_t).square().mean().backward()
    return f_s.detach()


def run_steps(net, b, bf16: bool, n: int) -> None:
    """`n` steps, gradients dropped after each, then wait for the device."""
    for _ in range(n):
        step(net, b, bf16)
        net.zero_grad(set_to_none=True)
    sync(b["x"].device)


def time_step(net, b, bf16: bool, warmup: int, steps: int) -> float:
    run_steps(net, b, bf16, warmup)
    t = time.perf_counter()
    run_steps(net, b, bf16, steps)
    return 1000 * (time.perf_counter() - t) / steps


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


def agreement(net, device, bf16: bool, batch: int) -> dict:
    """Each variant's output and gradients vs the current code, same weights and inputs."""
    b = inputs(batch, device, seed=2)
    ref = None
    out = {}
    for name in VARIANTS:
        v = variant(net, name)
        v.zero_grad(set_to_none=True)
        f = step(v, b, bf16)
        grads = torch.cat([p.grad.flatten().double() for p in v.parameters() if p.grad is not None])
        if ref is None:
            ref = (f, grads)
            continue
        out[name] = {"output_rel": rel(f, ref[0]), "grad_rel": rel(grads, ref[1])}
    net.zero_grad(set_to_none=True)
    return out


def profile_table(net, b, bf16: bool, rows: int) -> str:
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if b["x"].device.type == "cuda" else [])
    with profile(activities=acts) as prof:
        run_steps(net, b, bf16, 3)
    key = "cuda_time_total" if b["x"].device.type == "cuda" else "cpu_time_total"
    return prof.key_averages().table(sort_by=key, row_limit=rows, max_name_column_width=70)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="bench/profile_model.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", default="DiT-B/2")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--compile", nargs="*", default=None, choices=list(VARIANTS),
                   help="also time these variants with compiled blocks (no names: current)")
    p.add_argument("--rows", type=int, default=30, help="rows of the kernel table")
    p.add_argument("--tiny", action="store_true", help="CPU smoke run at tiny sizes (CI)")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)

    device = torch.device("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    bf16 = device.type == "cuda"
    batch = 4 if args.tiny else args.batch
    res: dict = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
                 "torch": torch.__version__, "arch": args.arch, "batch": batch, "argv": sys.argv}
    out = Path(args.out) if args.out else None
    if out:
        out.mkdir(parents=True, exist_ok=True)

    def save():
        if out:
            (out / "profile_model.json").write_text(json.dumps(res, indent=1))

    net = build(args.arch, args.tiny, device)
    res["agreement_fp32"] = agreement(net, device, False, min(batch, 16))
    if bf16:
        res["agreement_bf16"] = agreement(net, device, True, min(batch, 16))
    print(json.dumps({k: v for k, v in res.items() if k.startswith("agreement")}, indent=1), flush=True)
    b = inputs(batch, device)
    res["eager_ms"] = {}
    for name in VARIANTS:
        res["eager_ms"][name] = time_step(variant(net, name), b, bf16, args.warmup, args.steps)
        print(f"eager {name}: {res['eager_ms'][name]:.1f} ms/step", flush=True)
        save()
    table = profile_table(net, b, bf16, args.rows)
    print(table, flush=True)
    if out:
        (out / "profile_eager.txt").write_text(table)
    if args.compile is not None:
        res["compiled_ms"], res["compile_s"] = {}, {}
        for name in args.compile or ["current"]:
            torch._dynamo.reset()
            v = copy.deepcopy(variant(net, name))  # compiled blocks stay with the copy
            v.net.compile_blocks()
            t = time.perf_counter()
            run_steps(v, b, bf16, 1)
            res["compile_s"][name] = time.perf_counter() - t
            res["compiled_ms"][name] = time_step(v, b, bf16, args.warmup, args.steps)
            print(f"compiled {name}: {res['compiled_ms'][name]:.1f} ms/step "
                  f"(compile {res['compile_s'][name]:.0f} s)", flush=True)
            save()
    save()
    return 0


if __name__ == "__main__":
    sys.exit(main())
