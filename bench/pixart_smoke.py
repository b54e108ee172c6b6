"""GPU smoke run of PixArt tuning at full size: PixArt-Sigma-XL-2-512-MS's architecture with random
weights, the trainer's real step (configs/ect_pixart_sigma_512.yaml: ECT with Cauchy, adaptive c,
OT coupling and the early-step diffusion term, bf16 trunk, ZeRO-2 engine), peak memory and img/s
per batch size. Target: under 3 minutes on one H200.

    python bench/pixart_smoke.py --out bench/results/pixart_smoke            # GPU
    python bench/pixart_smoke.py --tiny --out /tmp/pixart_smoke              # CPU, the same path at toy size

Data: real latent shards made by the real data prep (`make_shapes` images at 512 px -> a small
random VAE with SDXL-VAE's downsampling 8 and scaling factor -> `encode_latents --text-kind t5`
with a one-layer random T5 of T5-XXL's width 4096 and a small tokenizer trained here), so the
batches have the shapes of the real run (4x64x64 latents, 4096-wide trimmed T5 states; the shapes
captions are short, ~10 tokens, where real captions are longer: cross-attention is a small part of
the step). The random transformer is saved as a folder and loaded through `model.pretrained`, as a
user's run loads the real one. Weights are random: no timing depends on them.
"""

from __future__ import annotations

if __name__ == "__main__" and __package__ in (None, ""):  # run as a file: repo root first on sys.path
    import pathlib
    import sys

    sys.path[0] = str(pathlib.Path(__file__).resolve().parents[1])

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

from bench.train_step import Stepper, fixed_batches, free_memory, time_steps
from lct.config import load_config
from lct.dist import DistInfo
from lct.preflight import preflight
from lct.train import build

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "ect_pixart_sigma_512.yaml"
CAPTIONS = ["a red circle on a blue background", "two green squares next to a yellow triangle",
            "a small purple star in the top left corner", "an orange square below a white circle"]


def make_tokenizer(directory: Path) -> None:
    """A Unigram tokenizer with T5's special-token layout (pad 0, </s> 1, unk 2)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.Unigram())
    tok.normalizer, tok.pre_tokenizer, tok.decoder = normalizers.NFKC(), pre_tokenizers.Metaspace(), decoders.Metaspace()
    words = " ".join(CAPTIONS + [f"a {c} {s}" for c in ("red", "green", "blue", "yellow", "purple", "orange", "white")
                                 for s in ("circle", "square", "triangle", "star")])
    tok.train_from_iterator([words], trainers.UnigramTrainer(vocab_size=80, special_tokens=["<pad>", "</s>", "<unk>"],
                                                             unk_token="<unk>"))
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", pad_token="<pad>", unk_token="<unk>",
                            model_max_length=300).save_pretrained(str(directory))


def make_parts(root: Path, tiny: bool, device: str) -> dict:
    """The random transformer folder, a T5 of width 4096 (tiny: 16), a VAE, and latent shards."""
    from diffusers import AutoencoderKL, PixArtTransformer2DModel
    from transformers import AutoTokenizer, T5Config, T5EncoderModel

    from lct.models.pixart import PIXART_ARCHS

    arch = dict(PIXART_ARCHS["PixArt-Sigma-XL-2-512-MS"])
    width, res = 4096, 512
    if tiny:
        arch.update(num_attention_heads=2, attention_head_dim=12, num_layers=2, cross_attention_dim=24,
                    caption_channels=16, sample_size=8)
        width, res = 16, 64
    torch.manual_seed(0)
    pipe = root / "pixart"
    if not (pipe / "transformer" / "config.json").is_file():
        PixArtTransformer2DModel(**arch).save_pretrained(str(pipe / "transformer"))
    t5 = root / "t5"
    if not (t5 / "config.json").is_file():
        make_tokenizer(t5)
        tok = AutoTokenizer.from_pretrained(str(t5))
        cfg = T5Config(vocab_size=len(tok), d_model=width, d_kv=64, d_ff=256, num_layers=1, num_heads=width // 64 or 1,
                       feed_forward_proj="gated-gelu", pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
        T5EncoderModel(cfg).save_pretrained(str(t5))
    vae = root / "vae"
    if not (vae / "config.json").is_file():  # SDXL-VAE's downsampling and scaling factor, few channels
        AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                      block_out_channels=(16, 32, 32, 32), layers_per_block=1, latent_channels=4, norm_num_groups=8,
                      sample_size=res, scaling_factor=0.13025).save_pretrained(str(vae))
    lat = root / "latents"
    if not (lat / "manifest.json").is_file():
        n = 16 if tiny else 256
        subprocess.run([sys.executable, str(REPO / "data_prep" / "make_shapes.py"), "--output", str(root / "img"),
                        "--num", str(n), "--size", str(res), "--samples-per-shard", str(n // 2)], check=True)
        subprocess.run([sys.executable, str(REPO / "data_prep" / "encode_latents.py"), "--input",
                        str(root / "img" / "{00000..00001}.tar"), "--output", str(lat), "--vae", str(vae),
                        "--resolution", str(res), "--text-kind", "t5", "--text-model", str(t5), "--text-max-length",
                        "300", "--text-states", "--device", device, "--num-workers", "0", "--batch-size", "64"],
                       check=True)
    return {"pretrained": str(pipe), "latents": str(lat)}


def run_one(parts: dict, root: Path, batch: int, checkpointing: bool, compile_: bool, tiny: bool, steps: int) -> dict:
    overrides = [f"run.dir={root / 'run'}", "run.resume=never", "run.tensorboard=false",
                 f"model.pretrained={parts['pretrained']}", f"data.shards={parts['latents']}", "data.mode=indexed",
                 "data.num_workers=0", f"optim.batch_size={batch}", f"model.checkpointing={checkpointing}",
                 f"model.compile={compile_}", "text.model=null", "vae.id=null"]
    if tiny:
        overrides += ["precision=fp32", "distributed.zero_stage=0"]
    cfg = load_config(str(CONFIG), overrides)
    info = DistInfo.from_env()
    run = build(cfg, info, preflight(cfg, info), monitor=False)
    step = Stepper(run)
    batches = fixed_batches(run, 2)
    out = time_steps(step, batches, warmup=2 if not compile_ else 3, steps=steps)
    out.update(batch=batch, checkpointing=checkpointing, compile=compile_,
               parameters_m=sum(p.numel() for p in run.engine.module.parameters()) / 1e6)
    del run, step, batches
    free_memory()
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--tiny", action="store_true", help="toy sizes on the CPU (the same code path)")
    p.add_argument("--batches", default="32,64", help="global = micro batch sizes to try (one GPU)")
    p.add_argument("--steps", type=int, default=5, help="timed steps per configuration")
    p.add_argument("--compile", action="store_true", help="also time model.compile (adds minutes of compilation)")
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    t0 = time.time()
    parts = make_parts(out / "work", args.tiny, device)
    rows = []
    batches = [4] if args.tiny else [int(b) for b in args.batches.split(",")]
    for batch in batches:
        for ckpt in (True, False):
            for comp in ((False, True) if args.compile else (False,)):
                try:
                    row = run_one(parts, out / "work", batch, ckpt, comp, args.tiny, args.steps)
                except torch.cuda.OutOfMemoryError as err:
                    row = {"batch": batch, "checkpointing": ckpt, "compile": comp, "error": f"OOM: {str(err)[:120]}"}
                    free_memory()
                rows.append(row)
                print(json.dumps(row), flush=True)
    result = {"bench": "pixart_smoke", "arch": "PixArt-Sigma-XL-2-512-MS" if not args.tiny else "tiny",
              "device": torch.cuda.get_device_name(0) if device == "cuda" else platform.processor() or "cpu",
              "torch": torch.__version__, "seconds": time.time() - t0, "rows": rows}
    (out / "results.json").write_text(json.dumps(result, indent=1) + "\n")
    print("| batch | checkpointing | compile | img/s | step ms | peak GiB |\n|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['batch']} | {r['checkpointing']} | {r['compile']} | {r.get('images_per_s', float('nan')):.1f} | "
              f"{r.get('step_ms', float('nan')):.0f} | {r.get('peak_memory_gb', float('nan')):.1f} | {r.get('error', '')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
