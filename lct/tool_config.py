"""The flat configurations of the data-prep and eval tools (`data_prep/encode_latents.py`,
`data_prep/train_vae.py`, `eval/clip_fid.py`; the small data-prep scripts declare theirs beside
them): every field is also a `--flag`, with `--config FILE.yaml` and `key=value` overrides
(`cli_config`). The trainer's nested schema and the YAML loading they share are `lct.config`."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

from pydantic import BaseModel, Field, ValidationError, field_validator

from lct.config import COMMAND_LINE, Strict, _format_validation, _read_yaml, _set_dotted, parse_override, plain_name
from lct.errors import ConfigError

# --------------------------------------------------------------------------------------------
# Data prep and eval schemas (flat: every field is also a command-line flag)
# --------------------------------------------------------------------------------------------


class EncodeLatentsConfig(Strict):
    """`data_prep/encode_latents.py`: image-text shards to latent shards (SPEC 7)."""

    input: str = Field(..., description="input shards: path, brace pattern, or pipe:/http/s3 URL")
    output: str = Field(..., description="output directory (latent shards + manifest.json)")
    vae: str = Field("stabilityai/sd-vae-ft-ema", description="AutoencoderKL hub id or local save_pretrained dir")
    resolution: int = Field(256, ge=8, description="center-crop on the long edge, then resize to this")
    buckets: str | None = Field(None, description="aspect-ratio buckets instead of square crops: pixart_256, "
                                "pixart_512, pixart_1024, pixart_2048, shapes_32 or a YAML list of [height, width]; "
                                "each image goes to the bucket of nearest aspect ratio, resized to cover it and "
                                "centre-cropped (lct/buckets.py)")
    text_kind: Literal["open_clip", "t5", "clip", "gemma", "sd3"] = Field(
        "open_clip", description="text tower: open_clip, or a transformers T5 encoder / CLIP text model (SPEC 14.3), "
                                 "gemma (Sana), sd3 (an SD3 pipeline's three towers) (SPEC 15.3)")
    text_model: str = Field("ViT-B-32", description="open_clip model name, or (t5, clip) a transformers folder or hub id "
                            "(a pipeline's text_encoder/ is found)")
    text_tokenizer: str | None = Field(None, description="t5/clip: tokenizer folder or hub id; default: beside --text-model")
    text_max_length: int | None = Field(None, ge=1, description="t5/clip token length (PixArt-alpha 120, PixArt-Sigma 300); "
                                        "default: the tokenizer's model_max_length")
    text_dtype: Literal["fp32", "bf16", "fp16"] = Field("fp32", description="t5/clip compute dtype (states are stored fp16)")
    text_pretrained: str | None = Field("laion2b_s34b_b79k", description="open_clip tag or local path; 'random' = seeded random tower saved beside the shards")
    text_states: bool = Field(False, description="also store fp16 token states and pooled features")
    flip: bool = Field(False, description="also store the latents of the horizontally flipped image")
    batch_size: int = Field(32, ge=1)
    num_workers: int = Field(4, ge=0)
    precision: Literal["fp32", "bf16", "fp16"] = Field("fp32", description="VAE precision (fp32 + TF32 on GPU by default)")
    device: str = Field("auto", description="'auto', 'cpu' or 'cuda'")
    seed: int = Field(0, ge=0, description="seed of the random text tower ('random')")
    max_captions: int | None = Field(None, ge=1, description="captions kept per sample (the first K; fewer are not "
                                     "padded); default 5 for open_clip, 1 for t5/clip (their states are large)")
    skip_empty_shards: bool = Field(False, description="record input shards that yield no sample as empty (no output shard) instead of failing")
    merge_only: bool = Field(False, description="only (re)write manifest.json from the per-shard records")


class TrainVAEConfig(Strict):
    """`data_prep/train_vae.py`: fit a small diffusers AutoencoderKL on image shards (defaults tuned
    there for 32 px shapes, 4x8x8 latents, 2 CPU cores)."""

    input: str = Field(..., description="training shards: path, brace pattern, comma list, folder or glob (images only)")
    output: str = Field(..., description="output folder (AutoencoderKL.save_pretrained + train_vae.json)")
    heldout: str | None = Field(None, description="held-out shards for the final PSNR; default: hold out --heldout-fraction of --input")
    heldout_fraction: float = Field(0.05, ge=0, lt=1, description="share of --input held out when --heldout is not given")
    resolution: int = Field(32, ge=8, description="center-crop on the long edge, then resize to this")
    max_images: int | None = Field(None, ge=1, description="use at most this many training images")
    latent_channels: int = Field(4, ge=1)
    downsample: int = Field(4, ge=1, le=64, description="spatial downsampling factor, a power of 2 = 2**(len(channels)-1)")
    channels: list[int] | None = Field(None, description="block_out_channels, comma-separated; default: 16 then 32 per level")
    layers_per_block: int = Field(1, ge=1)
    norm_num_groups: int = Field(2, ge=1, description="GroupNorm groups (must divide every channel count); few groups let flat colours through")
    mid_attention: bool = Field(False, description="self-attention in the encoder/decoder mid blocks")
    steps: int = Field(1200, ge=1, description="optimizer steps (training stops at --steps or the time budget)")
    time_budget_minutes: float | None = Field(None, gt=0, description="stop after this much training time")
    batch_size: int = Field(16, ge=1)
    lr: float = Field(1.5e-3, gt=0, description="peak learning rate (AdamW)")
    warmup_steps: int = Field(50, ge=0, description="linear learning-rate warm-up")
    min_lr_ratio: float = Field(0.02, ge=0, le=1, description="cosine decay ends at lr * this")
    weight_decay: float = Field(0.0, ge=0)
    loss: Literal["l1", "mse"] = Field("mse", description="reconstruction loss on [-1, 1] pixels")
    kl_weight: float = Field(1e-4, ge=0, description="KL weight, LDM convention: loss = (sum of pixel errors + kl_weight * KL summed over the latent) / (3*R*R)")
    flip: bool = Field(False, description="random horizontal flips")
    seed: int = Field(0, ge=0)
    device: str = Field("auto", description="'auto', 'cpu' or 'cuda'")
    precision: Literal["auto", "fp32", "bf16"] = Field("auto", description="auto: bf16 autocast on CUDA with bf16 support, else fp32")
    threads: int | None = Field(None, ge=1, description="CPU threads; default: all cores this process may use")
    min_psnr: float = Field(30.0, description="warn when the held-out PSNR (dB) is below this: README's rule of "
                            "thumb per kind of data (shapes 35, digits 30)")
    overwrite: bool = Field(False, description="retrain when --output holds a VAE trained with another config")
    progress: bool = Field(True, description="tqdm progress bar")


class EvalConfig(Strict):
    """`eval/clip_fid.py`: samples and metrics with a fixed protocol."""

    checkpoint: str = Field(..., description="run directory or export directory")
    captions: str | None = Field(None, description="caption file (.txt one per line, or .jsonl); default: protocol's")
    protocol: str = Field("coco2014val-30k", description="named protocol (README) or 'custom'")
    num_samples: int | None = Field(None, ge=1, description="default: the protocol's")
    steps: list[int] = Field([1, 2], description="sampling steps to evaluate (each >= 1)")
    tau: list[float] | None = Field(None, description="2-step tau(s) to sweep, or the k - 1 levels of --steps k; "
                                    "default: the model's tau, the Karras levels for k > 2 (SPEC 9)")
    guidance: list[float] = Field([1.0], description="CFG weights to sweep (1 = off; finite, >= 0); a consistency "
                                  "model tolerates only mild guidance, w close to 1 (3 ruins the shapes demo)")
    metrics: list[str] = Field(["fid", "clip"], description="fid, clip, shapes, prdc (precision/recall/density/"
                               "coverage against --ref-images, added beside any caption-accuracy metric), or none "
                               "(samples only)")
    metric: list[str] = Field([], description="your own metrics: module:Name or path/to/file.py:Name, a class "
                              "following lct.metrics.Metric built as Name(ctx) (README, 'Your own metric')")
    metric_arg: list[str] = Field([], description="KEY=VALUE options for the --metric metrics (ctx.options)")
    prdc_k: int = Field(5, ge=1, description="k of the k-NN balls of precision/recall/density/coverage")
    ref_stats: str | None = Field(None, description="reference FID statistics .npz")
    ref_images: str | None = Field(None, description="reference images (shards pattern or folder) to compute stats")
    out: str = Field(..., description="output directory")
    batch_size: int = Field(32, ge=1)
    seed: int = Field(0, ge=0)
    ema: str | None = Field(None, description="EMA name of a run directory; default: the run's sample EMA")
    fid_weights: str | None = Field(None, description="local FID Inception weights: torch-fidelity's "
                                    "weights-inception-2015-12-05-6726825d.pth (= pytorch-fid's "
                                    "pt_inception-2015-12-05-6726825d.pth); default: torch hub cache or download")
    clip_model: str = Field("ViT-g-14", description="open_clip model for the CLIP score")
    clip_pretrained: str | None = Field("laion2b_s34b_b88k", description="open_clip tag or local path")
    vae: str | None = Field(None, description="override the export's VAE (hub id or local dir)")
    text_pretrained: str | None = Field(None, description="override the export's text tower weights (tag or path)")
    aspect: str | None = Field(None, description="HEIGHTxWIDTH image size to sample (e.g. 24x40): one the model "
                               "trained on aspect-ratio buckets; default its most common bucket. Metrics other than "
                               "shapes see the images centre-cropped to the protocol's square")
    device: str = "auto"

    _ema = field_validator("ema")(plain_name)


# --------------------------------------------------------------------------------------------
# Flat schemas as command-line tools (data prep, eval)
# --------------------------------------------------------------------------------------------


def _is_list(ann: Any) -> bool:
    return get_origin(ann) is list or any(get_origin(a) is list for a in get_args(ann))


def _is_bool(ann: Any) -> bool:
    return ann is bool or (get_origin(ann) is Union and bool in get_args(ann))


def cli_config(schema: type[BaseModel], argv: list[str] | None, prog: str,
               description: str = "", extra: callable = None) -> tuple[Any, argparse.Namespace]:
    """Build an argparse CLI from a flat schema: one `--flag` per field, plus `--config FILE.yaml`
    and trailing `key=value` overrides. Flags win over the file. Returns (config, parsed args)."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("--config", help="YAML file with any of the options below")
    for name, field in schema.model_fields.items():
        flag = "--" + name.replace("_", "-")
        help_ = (field.description or "") + ("" if field.is_required() else f" (default: {field.default})")
        if _is_bool(field.annotation):
            parser.add_argument(flag, dest=name, action=argparse.BooleanOptionalAction, default=None, help=help_)
        elif _is_list(field.annotation):
            parser.add_argument(flag, dest=name, nargs="+", action="extend", default=None, help=help_)  # repeatable
        else:
            parser.add_argument(flag, dest=name, default=None, help=help_)
    if extra:
        extra(parser)
    parser.add_argument("overrides", nargs="*", help="key=value overrides")
    args = parser.parse_args(argv)
    given: dict[str, Any] = {}
    for name, field in schema.model_fields.items():
        v = getattr(args, name)
        if v is None:
            continue
        if _is_list(field.annotation):
            v = [x for item in v for x in str(item).split(",") if x != ""]
        elif isinstance(v, str) and v.lower() in ("none", "null") and not field.is_required():
            v = None
        given[name] = v
    raw: dict = {}
    sources: dict[str, str] = {}
    if args.config:
        raw, sources = _read_yaml(Path(args.config))
    for text in args.overrides:
        k, v = parse_override(text)
        _set_dotted(raw, k, v)
        sources[k] = COMMAND_LINE
    raw.update(given)
    sources.update({k: COMMAND_LINE for k in given})
    try:
        cfg = schema.model_validate(raw)
    except ValidationError as err:
        # Flags are named like the fields, with dashes.
        e = _format_validation(err, schema, sources, COMMAND_LINE)
        field, _, item = (e.key or "").partition(".")
        if e.key and e.source == COMMAND_LINE and field in schema.model_fields:  # "channels.1": item 2 of --channels
            flag = "--" + field.replace("_", "-") + (f" (item {int(item) + 1})" if item.isdigit() else "")
            e = ConfigError(e.detail, key=flag, source=e.source)
        raise e from None
    return cfg, args
