"""Score a demo run on held-out captions with the `shapes` metric, cheaply: the tool that tuned
the demo (README, "What the demo gives"; numbers in bench/RESULTS.md).

    python bench/demo_probe.py --checkpoint demo_out/runs/edm --captions demo_out/shapes/heldout/captions.jsonl \
        --ode-steps 16 --num 500          # an EDM start, by its deterministic Heun ODE (EDM's sampler)
    python bench/demo_probe.py --checkpoint demo_out/runs/demo --captions ... --steps 1 2   # consistency

An EDM start is what the consistency tuning keeps; its ODE samples say what it has learned long
before a consistency model is trained from it, so start-stage settings are screened here. Prints
one JSON line per setting: colour, position and shape accuracy, overall and per size, with the
ground-truth and VAE-reconstruction ceilings (`--ceiling`). Single process, the run's sample EMA.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


@torch.no_grad()
def heun_ode(pipe, captions: list[str], indices, *, steps: int, seed: int, sigma_max: float = 80.0,
             sigma_min: float = 0.002, rho: float = 7.0) -> torch.Tensor:
    """EDM's deterministic 2nd-order sampler (Karras et al. 2022, Algorithm 1) on the Karras grid,
    through the pipeline's own network call and output scalings (an EDM export's scheduler has
    sigma_min 0: EDM's), from the same keyed noise as its consistency sampling; 2 * steps - 1
    evaluations. Returns normalised latents."""
    i = torch.arange(steps, dtype=torch.float64)
    t = (sigma_max ** (1 / rho) + i / (steps - 1) * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
    t = torch.cat([t, torch.zeros(1, dtype=torch.float64)]).tolist()
    from lct.consistency import consistency_function

    device = pipe._execution_device
    cond = {}
    if pipe.transformer.config.cond == "text":
        states, mask, pooled = pipe.encode_prompt(captions, device)[:3]
        cond = {"text_states": states, "text_mask": mask, "pooled": pooled}
    cond["cond_drop"] = torch.zeros(len(captions), dtype=torch.bool, device=device)
    x = sigma_max * pipe.prepare_latents(len(captions), device, pipe.sample_generators(seed, indices), None) \
        / pipe.scheduler.init_noise_sigma
    m = pipe.scheduler.config

    def d(x, s):
        sig = torch.full((x.shape[0],), s, device=device)
        denoised = consistency_function(pipe.transformer, x, sig, sigma_data=m.sigma_data, sigma_min=m.sigma_min,
                                        time_embed_scale=m.time_embed_scale, **cond)
        return (x - denoised) / s

    for k in range(steps):
        s, s_next = t[k], t[k + 1]
        dx = d(x, s)
        x_next = x + (s_next - s) * dx
        if s_next > 0:
            x_next = x + (s_next - s) * 0.5 * (dx + d(x_next, s_next))
        x = x_next
    return x.float()


def score(u8: np.ndarray, captions: list[str]) -> dict:
    from lct.shapes import shapes_metric

    return brief(shapes_metric(u8, captions))


def brief(m: dict) -> dict:
    """The accuracies of a `shapes_metric` dictionary, rounded, overall and per size."""
    keep = ("colour_acc", "position_acc", "shape_acc", "all_acc")
    out = {k: round(m[k], 4) for k in keep}
    out["by_size"] = {s: {k: round(v[k], 4) for k in ("colour_acc", "position_acc", "shape_acc")}
                      for s, v in m["by_size"].items()}
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--captions", required=True, help="held-out captions.jsonl of make_shapes")
    p.add_argument("--num", type=int, default=500)
    p.add_argument("--ode-steps", type=int, nargs="*", default=[], help="Heun ODE steps (EDM start)")
    p.add_argument("--steps", type=int, nargs="*", default=[], help="consistency sampling steps")
    p.add_argument("--tau", type=float, nargs="*", default=None, help="2-step tau(s) to try")
    p.add_argument("--ceiling", action="store_true", help="also score ground truth and VAE reconstructions")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--ema", default=None)
    p.add_argument("--save", default=None, help="write the first setting's images here (.npy)")
    a = p.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))

    from lct.grids import to_uint8
    from lct.metrics import render_scores
    from lct.sample import Generator
    from lct.shapes import read_specs, summarize_scores

    gen = Generator(a.checkpoint, torch.device("cpu"), a.ema)
    recs = [json.loads(x) for x in Path(a.captions).read_text().splitlines()[: a.num]]
    caps = [r["caption"] for r in recs]
    size = int(gen.latent_shape[-1]) * (2 ** (len(gen.vae.config.block_out_channels) - 1))
    m = gen.meta["method"]
    settings = [("ode", k, None) for k in a.ode_steps] + [("cm", s, None) for s in a.steps if s == 1]
    for s in (x for x in a.steps if x > 1):
        for tau in (a.tau or [None]):
            settings.append(("cm", s, tau))
    head = {"checkpoint": a.checkpoint, "step": gen.meta.get("step"), "n": len(caps)}
    if a.ceiling:
        rows = render_scores(gen.vae, read_specs(a.captions, a.num), caps, (size, size), "cpu")
        for name in ("ground_truth", "vae_reconstruction"):
            print(json.dumps({**head, "setting": name, **brief(summarize_scores(rows[name]))}), flush=True)
    for n_set, (kind, k, tau) in enumerate(settings):
        t0 = time.process_time()
        out = []
        for s in range(0, len(caps), a.batch_size):
            idx = list(range(s, min(s + a.batch_size, len(caps))))
            if kind == "ode":
                lat = heun_ode(gen.pipe, [caps[i] for i in idx], idx, steps=k, seed=a.seed,
                               sigma_max=m["sigma_max"])
                out.append(to_uint8(gen.pipe.decode_latents(lat)))
            else:
                taus = None if tau is None else [tau]
                out.append(gen.images([caps[i] for i in idx], idx, a.seed, k, taus))
        u8 = np.concatenate(out)
        if a.save and n_set == 0:
            np.save(a.save, u8)
        name = f"ode{k}" if kind == "ode" else f"{k}step" + (f"_tau{tau}" if tau else "")
        print(json.dumps({**head, "setting": name, **score(u8, caps),
                          "cpu_s": round(time.process_time() - t0, 1)}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
