"""One typed configuration system for the trainer, data prep and eval.

Schemas are pydantic models (types, defaults, ranges: the trainer's here, the flat data-prep and
eval tools' in `lct.tool_config`). A configuration is
YAML, optionally inheriting from other YAML files (`base: other.yaml`, paths relative to the file),
plus dotted command-line overrides (`optim.lr=2e-4`). For the trainer, `method.preset` fills the
method's reference hyperparameters (SPEC section 12) under whatever the files and overrides say.

Every user mistake becomes a `ConfigError` that names the file, the dotted key and what was
expected (with a "did you mean" for unknown keys); `lct.errors.cli_main` prints it and exits 2.
"""

from __future__ import annotations

import copy
import difflib
import importlib.util
import math
import os
import re
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from lct.consistency import C_FIRST, DIFF_SIGMA_MAX, OT_MIN_GROUP
from lct.errors import ConfigError

COMMAND_LINE = "command line"


class Strict(BaseModel):
    """Base of every schema section: unknown keys are errors, assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())


# Names from a config that become file or folder names (`export/<ema name>/`, read back by
# `model.init_ema`, `--ema`): a plain identifier, so no name can leave its folder (`..`, `/`, an
# absolute path) or collide with lct's own entries (`export/stale/`, `.NAME.tmpPID`).
NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_-]{0,63}$")
RESERVED_NAMES = ("stale",)


def plain_name(v: str | None) -> str | None:
    """`v` if it is a plain identifier that may name a folder, else ValueError (pydantic: one line)."""
    if v is None:
        return v
    if not NAME_RE.match(v):
        raise ValueError("must be a plain identifier (letters, digits, _ and -, starting with a letter "
                         "or _, at most 64): it names a folder, export/<name>/")
    if v in RESERVED_NAMES:
        raise ValueError(f"{v!r} is reserved (export/{v}/ is lct's own folder); choose another name")
    return v


# --------------------------------------------------------------------------------------------
# Trainer schema
# --------------------------------------------------------------------------------------------

def _ema(decay: float, batch: int) -> dict:
    return {"models": [{"name": "ema", "decay": decay, "decay_batch": batch}], "sample": "ema"}


# Method presets (SPEC 12 reference hyperparameters, SPEC 3 distance and c): only what differs from
# the schema defaults below, which are iLCT's. Applied under the user's files and overrides:
# anything written explicitly wins.
ILCT_OFF = {"method.ot": False, "method.diffusion_weight": 0.0, "model.nsln": "none"}  # iLCT's OT, diffusion term, NsLN
METHOD_PRESETS: dict[str, dict[str, Any]] = {
    "edm": {**ILCT_OFF, "method.objective": "edm", "method.sigma_min": 0.0, "ema": _ema(0.9999, 128)},
    "ict": {**ILCT_OFF, "method.objective": "ict", "method.distance": "pseudo_huber", "method.c": 0.00054,
            "method.tau": [0.821], "model.dropout": 0.3, "optim.batch_size": 1024, "ema": _ema(0.99993, 1024)},
    # iLCT's Table 1 baseline: iLCT's own setup (the ilct preset) with iCT's loss, c = 0.00054 sqrt(d).
    "ict_latent_baseline": {**ILCT_OFF, "method.objective": "ict", "method.distance": "pseudo_huber",
                            "method.c": 0.03456, "method.s1": 640, "optim.weight_decay": 1e-4,
                            "ema": _ema(0.99993, 128), "run.total_steps": 294_000},
    # The authors' logged baseline run (SPEC 12): quandao10/LCT khanh2 scripts/
    # train_lct_1k6_1280_nogradnorm_huber_positional.sh (batch 192, s1 1280, 1600 epochs of CelebA-HQ's
    # 30k images, EMA 0.9999 per step) and ot scripts/old/test_baseline.sh (2 steps: --ts 0,640,1280 of 1281).
    "ict_latent_baseline_logged": {**ILCT_OFF, "method.objective": "ict", "method.distance": "pseudo_huber",
                                   "method.c": 0.03456, "optim.weight_decay": 1e-4, "optim.batch_size": 192,
                                   "method.tau": [2.51521897615], "ema": _ema(0.9999, 192),
                                   "run.total_steps": 249_600},
    # ECT main: trains with sigma_min 0, evaluates with boundary scalings at 0.003 (ECMPrecond in eval
    # mode) and noise t * z; fp32 without TF32 (ct_train.py --tf32 defaults to False).
    "ect": {**ILCT_OFF, "method.objective": "ect", "method.distance": "pseudo_huber", "method.c": 0.0,
            "method.sigma_min": 0.0, "method.sample_boundary_sigma_min": 0.003, "method.tau": [0.821],
            "model.dropout": 0.2, "ema": _ema(0.9999, 128), "run.total_steps": 200_000, "precision": "fp32"},
    "ect_imagenet": {**ILCT_OFF, "method.objective": "ect", "method.distance": "pseudo_huber", "method.c": 0.000541,
                     "method.sigma_min": 0.0, "method.p_mean": -0.8, "method.p_std": 1.6, "method.ect_q": 4.0,
                     "method.ect_weight": "imagenet", "method.tau": [1.526], "model.dropout": 0.4,
                     "optim.name": "adam", "optim.lr": 1e-3, "optim.betas": [0.9, 0.99], "optim.schedule": "inv_sqrt",
                     "ema": _ema(0.9999, 128), "run.total_steps": 100_000},
    "ilct": {"method.s1": 640, "optim.weight_decay": 1e-4, "ema": _ema(0.99993, 128), "run.total_steps": 294_000},
}


class RunConfig(Strict):
    dir: str = Field("runs/default", description="run directory: checkpoints, logs, samples, exports")
    seed: int = Field(0, ge=0, description="seed of every counter-based random stream")
    total_steps: int = Field(400_000, ge=1, description="K: applied optimizer steps; sets the curriculum")
    log_every: int = Field(10, ge=1)
    save_every: int = Field(5000, ge=1, description="checkpoint every this many applied steps")
    keep_last: int = Field(3, ge=1, description="checkpoints kept by rotation")
    resume: str = Field("auto", description="'auto' (newest complete checkpoint in run.dir), 'never' (a previous "
                        "run in run.dir is moved to run.dir/previous/), or a checkpoint folder")
    trust_checkpoint_code: bool = Field(False, description="load checkpoints with full pickle (runs any code in "
                                        "them): only for checkpoints you made yourself")
    allow_total_steps_change: bool = Field(False, description="accept a changed run.total_steps on resume (moves the curriculum)")
    max_consecutive_skips: int = Field(20, ge=1, description="stop after this many non-finite steps in a row")
    time_budget_minutes: float | None = Field(None, gt=0, description="save and stop cleanly before this much wall "
                                              "clock since this invocation started (start-up included)")
    dist_timeout_minutes: float = Field(30.0, gt=0, description="process-group timeout (raised around sampling and saving)")
    tensorboard: bool = True
    wandb: bool = Field(False, description="log to Weights & Biases (needs `pip install wandb`)")
    accept_warnings: list[str] = Field([], description="ids of config warnings this config has weighed and keeps "
                                       "(each warning line names its id), e.g. [adaptive_c_ect, ot_small_group]")
    wandb_project: str = "lct"


class MethodConfig(Strict):
    preset: Literal[tuple(METHOD_PRESETS)] = "ilct"  # type: ignore[valid-type]
    objective: Literal["edm", "ict", "ect", "ilct"] = "ilct"
    distance: Literal["l2", "pseudo_huber", "cauchy"] = "cauchy"
    c: float | Literal["adaptive"] = Field("adaptive", description="distance scale (mean form, SPEC 3) or 'adaptive' (SPEC 4)")
    c_first: float | Literal["code"] = Field(C_FIRST, description="adaptive c of the first stage; 'code' = 0.00054*sqrt(C*H*W)")
    c_scale: float = Field(1.0, gt=0, description="multiplies the adaptive-c fit after the first stage (SPEC 4); "
                           "2 in a sigma_data = 1 latent space (SPEC 14.4)")
    sigma_min: float = Field(0.002, ge=0, description="training parameterisation sigma_min (SPEC 1); 0 = EDM scalings")
    sample_sigma_min: float | None = Field(None, ge=0, description="sigma_min of the noise between sampling steps, "
                                           "sqrt(tau^2 - it^2) (SPEC 9); default sigma_min")
    sample_boundary_sigma_min: float | None = Field(
        None, ge=0, description="sigma_min of SPEC 1's scalings when sampling (exports, sample grids); default "
                                "sigma_min. ECT evaluates its sigma_min-0 network with 0.003 (SPEC 2.4)")
    sigma_max: float = Field(80.0, gt=0)
    rho: float = Field(7.0, gt=0)
    sigma_data: float = Field(0.5, gt=0)
    p_mean: float = Field(-1.1, description="lognormal pair law / ECT t law mean (SPEC 2.3, 2.4)")
    p_std: float = Field(2.0, gt=0)
    edm_p_mean: float = Field(-0.4, description="EDM diffusion ln sigma mean (SPEC 5)")
    edm_p_std: float = Field(1.0, gt=0)
    s0: int = Field(10, ge=1, description="iCT curriculum initial intervals (SPEC 2.2)")
    s1: int = Field(1280, ge=1, description="iCT curriculum final intervals")
    ect_mapping: Literal["sigmoid", "const"] = "sigmoid"
    ect_q: float = Field(2.0, gt=1)
    ect_k: float = 8.0
    ect_b: float = 1.0
    stage_every: int = Field(25_000, ge=1, description="ECT: applied steps per mapping stage")
    max_stage: int | None = Field(None, ge=0, description="ECT: cap on the stage index (short runs)")
    ect_weight: Literal["inv_dt", "imagenet"] = "inv_dt"
    diffusion_weight: float = Field(5.0, ge=0, description="weight of the early-step diffusion term (SPEC 5); 0 = off")
    diff_sigma_max: float = Field(DIFF_SIGMA_MAX, gt=0, description="ECT mapping: early set is t <= this (SPEC 5)")
    ot: bool = Field(True, description="minibatch OT coupling of latents and noise (SPEC 6)")
    time_embed_scale: float = Field(1000.0, gt=0, description="time embedding input = scale * ln(sigma)/4 (SPEC 1)")
    tau: list[float] = Field([0.36931547704], description="intermediate sigmas of multi-step sampling (SPEC 9)")

    def sampling_sigma_mins(self) -> tuple[float, float]:
        """(boundary sigma_min of the scalings, sigma_min of the noise between steps) for sampling."""
        boundary = self.sigma_min if self.sample_boundary_sigma_min is None else self.sample_boundary_sigma_min
        noise = self.sigma_min if self.sample_sigma_min is None else self.sample_sigma_min
        return float(boundary), float(noise)

    @field_validator("tau")
    @classmethod
    def _tau_decreasing(cls, v: list[float]) -> list[float]:
        if any(t <= 0 for t in v) or any(b >= a for a, b in zip(v, v[1:])):
            raise ValueError("taus must be positive and strictly decreasing")
        return v


class ModelConfig(Strict):
    arch: str = Field("DiT-B/2", description="DiT-S/2, DiT-B/2, DiT-L/2, DiT-XL/2 (or /4), pixart (SPEC 14), "
                      "or the flow models sana, sd3 (SPEC 15)")
    pretrained: str | None = Field(None, description="arch pixart / sana / sd3: the pipeline or transformer folder, "
                                   "or hub id")
    hidden_size: int | None = Field(None, ge=8, description="override the preset width (tests, demo)")
    depth: int | None = Field(None, ge=1)
    num_heads: int | None = Field(None, ge=1)
    patch_size: int | None = Field(None, ge=1)
    mlp_ratio: float = Field(4.0, gt=0)
    cond: Literal["text", "class", "none"] = "text"
    num_classes: int = Field(0, ge=0, description="class-label mode only")
    dropout: float = Field(0.0, ge=0, lt=1)
    nsln: Literal["qk", "layernorm", "none"] = Field(
        "qk", description="q/k and text-input norm (SPEC 8): qk = NsLN (iLCT), layernorm = affine LayerNorm "
                          "(the authors' DiT baseline, timm qk_norm), none = no q/k norm")
    attention: Literal["sdpa", "xformers"] = "sdpa"
    checkpointing: bool = Field(False, description="per-block activation checkpointing (use_reentrant=False)")
    compile: bool = Field(False, description="torch.compile the DiT blocks")
    init_from: str | None = Field(None, description="start from an lct run or export (ECT starts from an edm run)")
    init_ema: str | None = Field(None, description="which EMA of init_from to copy into weights and EMAs (SPEC 2.4)")

    _init_ema = field_validator("init_ema")(plain_name)


class DataConfig(Strict):
    shards: str = Field("", description="latent shards: path, brace pattern or URL (encode_latents output)")
    manifest: str | None = Field(None, description="manifest.json; default: beside the shards")
    mode: Literal["stream", "indexed"] = "stream"
    shuffle_buffer: int = Field(2000, ge=0)
    num_workers: int = Field(4, ge=0)
    prefetch_factor: int = Field(4, ge=1)
    caption_dropout: float = Field(0.1, ge=0, le=1, description="rate of the learned null condition (SPEC 9)")
    flip: bool = Field(True, description="use the stored horizontal-flip latents as augmentation")
    posterior: Literal["sample", "mean", "fixed"] = Field(
        "sample", description="latent of each use (SPEC 7): sample = mean + std * a fresh eps, mean = the "
                              "posterior mean, fixed = one seeded draw per image and flip (iLCT's offline encoding)")
    latent_norm: Literal["channel", "element", "vae"] = Field(
        "channel", description="SPEC 7; vae = the VAE's scaling/shift factors, sigma_data 1 (SPEC 14.4)")
    text: Literal["precomputed", "on_the_fly"] = "precomputed"
    val_shards: str | None = Field(None, description="held-out latent shards for the validation batch")


class TextConfig(Strict):
    kind: Literal["open_clip", "t5", "clip", "gemma", "sd3"] | None = Field(
        None, description="text tower kind (gemma: Sana's Gemma-2 with its prompt template; sd3: SD3's CLIP-L + "
                          "CLIP-G + T5-XXL, SPEC 15.3); default: the manifest's")
    model: str | None = Field(None, description="open_clip model name, or a transformers folder / hub id (t5, clip); "
                              "default: the manifest's")
    pretrained: str | None = Field(None, description="open_clip tag or local path; default: the manifest's")
    tokenizer: str | None = Field(None, description="t5/clip: tokenizer folder or hub id; default: beside text.model")
    max_length: int | None = Field(None, ge=1, description="t5/clip/gemma token length (PixArt-alpha 120, PixArt-Sigma "
                                   "300, Sana 300), sd3: the T5 length; must equal the data's")
    dtype: Literal["fp32", "bf16", "fp16"] | None = Field(None, description="t5/clip compute dtype (on_the_fly); "
                                                          "default: the manifest's")


class VAEConfig(Strict):
    id: str | None = Field(None, description="diffusers AutoencoderKL hub id or local dir; default: the manifest's")


class OptimConfig(Strict):
    name: Literal["radam", "adam"] = "radam"
    lr: float = Field(1e-4, gt=0)
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = Field(1e-8, gt=0)
    weight_decay: float = Field(0.0, ge=0, description="coupled (L2) weight decay, torch default")
    schedule: Literal["constant", "inv_sqrt", "cosine"] = "constant"
    ref_steps: int = Field(2000, ge=1, description="inv_sqrt: lr / sqrt(max(step / ref_steps, 1))")
    final_lr_ratio: float = Field(0.0, ge=0, le=1, description="cosine: the lr at run.total_steps, as a fraction of lr")
    batch_size: int = Field(128, ge=1, description="global batch per optimizer step")
    micro_batch_size: int | None = Field(None, ge=1, description="per-rank micro-batch; default batch_size / world")
    grad_clip: float = Field(0.0, ge=0, description="0 = off (DeepSpeed clips at 1.0 unless told not to)")
    fused: bool = Field(False, description="the optimizer step as one fused kernel per tensor: RAdam compiled "
                        "(lct.engine.FusedRAdam; ZeRO-1/2 hand it one flat fp32 buffer per group, ZeRO-0 "
                        "each parameter; hyperparameters reach the kernel as a tensor, never compiled in), "
                        "Adam torch's fused=True; same state and, to fp32 rounding, the same steps as torch's")

    @field_validator("betas")
    @classmethod
    def _betas(cls, v: tuple[float, float]) -> tuple[float, float]:
        if not all(0 <= b < 1 for b in v):
            raise ValueError("betas must lie in [0, 1)")
        return v


class EMAEntry(Strict):
    name: str = Field(..., description="a plain identifier: the EMA's export folder export/<name>/")
    halflife_images: float | None = Field(None, gt=0, description="half-life in training images")
    decay: float | None = Field(None, gt=0, lt=1, description="per-step decay at decay_batch images/step")
    decay_batch: int | None = Field(None, ge=1)

    _name = field_validator("name")(plain_name)

    def resolved_halflife(self) -> float:
        if self.halflife_images is not None:
            return self.halflife_images
        # EMA decays transfer across batch sizes as half-lives in images (SPEC 12).
        return self.decay_batch * math.log(0.5) / math.log(self.decay)


class EMAConfig(Strict):
    models: list[EMAEntry] = Field(default_factory=lambda: [EMAEntry(name="ema", halflife_images=1.27e6)])
    sample: str = Field("ema", description="EMA used for samples, validation and export")


class DistributedConfig(Strict):
    zero_stage: int = Field(2, ge=0, le=3)
    fp32_reduce: bool = Field(True, description="reduce gradients in fp32 (SPEC 1.1)")
    allreduce_bucket_size: int = Field(500_000_000, ge=1)


class SampleConfig(Strict):
    every: int = Field(5000, ge=1, description="sample grid every this many applied steps")
    prompts: list[str] = Field(default_factory=list, description="fixed prompts; default: held-out captions")
    prompts_file: str | None = None
    num: int = Field(16, ge=1, description="images per grid")
    seed: int = 0
    steps: list[int] = Field([1, 2])
    guidance: float = Field(1.0, ge=0)


class ValConfig(Strict):
    every: int = Field(1000, ge=1)
    batch_size: int = Field(64, ge=1, description="fixed validation batch size")
    buckets: int = Field(8, ge=1, description="sigma buckets for the per-bucket consistency distance")


EVAL_METRICS = ("fid", "clip", "shapes", "prdc", "none")


class TrainEvalConfig(Strict):
    """Quality during training (lct/quality.py, README "Quality during training")."""

    every: int = Field(0, ge=0, description="sample and score the sample EMA every this many applied steps "
                       "(and at the run's end); 0 = off (it costs sampling eval.num captions per setting)")
    num: int = Field(64, ge=2, description="held-out captions sampled per setting, the same at every eval")
    captions: str | None = Field(None, description="caption file (.txt or .jsonl); default: data.val_shards' captions")
    steps: list[int] = Field([1, 2], description="sampling steps of each setting (each >= 1)")
    guidance: float = Field(1.0, ge=0, description="CFG weight (1 = off)")
    seed: int = Field(0, ge=0, description="sampling noise seed (per caption index, lct.pipeline)")
    metrics: list[Literal[EVAL_METRICS]] = Field(  # type: ignore[valid-type]
        ["fid", "clip", "shapes", "prdc"], description="built-in metrics tried (those that cannot run are named "
        "once): fid and clip need their weights on disk (the trainer never downloads), shapes lct's shapes "
        "captions, prdc (precision/recall/density/coverage) a reference: eval.ref_images or the VAE decodes of "
        "the held-out latents")
    metric: list[str] = Field([], description="your own metrics, module:Name or path/to/file.py:Name "
                              "(lct.metrics.Metric, docs/METRICS.md)")
    metric_arg: list[str] = Field([], description="KEY=VALUE options of the eval.metric metrics")
    prdc_k: int = Field(5, ge=1, description="k of the k-NN balls of precision/recall/density/coverage")
    ref_images: str | None = Field(None, description="real images (shards or folder) for FID and precision/recall")
    ref_stats: str | None = Field(None, description="reference FID statistics .npz")
    fid_weights: str | None = Field(None, description="local FID Inception weights (default: the torch hub cache)")
    clip_model: str = Field("ViT-B-32", description="open_clip model of the CLIP score")
    clip_pretrained: str | None = Field("laion2b_s34b_b79k", description="open_clip tag (cached) or local path")
    batch_size: int = Field(32, ge=1, description="samples per pipeline call and rank")

    @field_validator("steps")
    @classmethod
    def _steps(cls, v: list[int]) -> list[int]:
        if not v or any(s < 1 for s in v):
            raise ValueError("give one or more sampling step counts, each >= 1")
        return v


class TrainConfig(Strict):
    """The trainer's whole configuration (`lct/train.py --config ...`)."""

    base: list[str] | str | None = Field(None, description="YAML file(s) this one inherits from")
    run: RunConfig = Field(default_factory=RunConfig)
    method: MethodConfig = Field(default_factory=MethodConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    text: TextConfig = Field(default_factory=TextConfig)
    vae: VAEConfig = Field(default_factory=VAEConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    ema: EMAConfig = Field(default_factory=EMAConfig)
    precision: Literal["tf32", "bf16_trunk", "fp32"] = "tf32"
    distributed: DistributedConfig = Field(default_factory=DistributedConfig)
    sample: SampleConfig = Field(default_factory=SampleConfig)
    val: ValConfig = Field(default_factory=ValConfig)
    eval: TrainEvalConfig = Field(default_factory=TrainEvalConfig)


# --------------------------------------------------------------------------------------------
# Loading: YAML + inheritance + presets + dotted overrides, with source tracking
# --------------------------------------------------------------------------------------------


def _flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def _deep_merge(base: dict, top: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in top.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def _read_yaml(path: Path, chain: tuple[Path, ...] = ()) -> tuple[dict, dict[str, str]]:
    """Read one YAML file with its `base:` ancestors; returns (dict, dotted key -> source file)."""
    if not path.is_file():
        raise ConfigError("config file not found (check the path given to --config or base:)",
                          source=str(path))
    if path.resolve() in chain:
        raise ConfigError("inheritance cycle through base:", source=str(path))
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        line = raw[: err.start].count(b"\n") + 1
        raise ConfigError(f"not UTF-8 text (byte 0x{raw[err.start]:02x} on line {line}); save the file as UTF-8",
                          source=str(path)) from None
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"line {mark.line + 1}" if mark else "?"
        raise ConfigError(f"not valid YAML ({where}): {getattr(err, 'problem', err)}", source=str(path))
    if not isinstance(data, dict):
        raise ConfigError("expected a mapping of keys at the top level", source=str(path))
    bases = data.pop("base", None) or []
    merged: dict = {}
    sources: dict[str, str] = {}
    for b in [bases] if isinstance(bases, str) else bases:
        bpath = (path.parent / b) if not os.path.isabs(b) else Path(b)
        bdata, bsrc = _read_yaml(bpath, chain + (path.resolve(),))
        merged = _deep_merge(merged, bdata)
        sources.update(bsrc)
    merged = _deep_merge(merged, data)
    sources.update({k: str(path) for k in _flatten(data)})
    return merged, sources


def parse_override(text: str) -> tuple[str, Any]:
    """`a.b=value` -> ('a.b', YAML-parsed value)."""
    if "=" not in text or text.startswith("="):
        raise ConfigError(f"override {text!r} is not of the form dotted.key=value", source=COMMAND_LINE)
    key, _, raw = text.partition("=")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    # YAML 1.1 reads '2e-4' as a string; numbers are what people mean.
    if isinstance(value, str):
        try:
            value = float(value) if any(ch in value for ch in "eE.") else value
        except ValueError:
            pass
    return key.strip(), value


def _set_dotted(d: dict, key: str, value: Any) -> None:
    parts = key.split(".")
    for p in parts[:-1]:
        if not isinstance(d.get(p), dict):
            d[p] = {}
        d = d[p]
    d[parts[-1]] = value


def _schema_at(schema: type[BaseModel], loc: tuple) -> type[BaseModel] | None:
    """The pydantic model class at `loc` inside `schema` (for 'did you mean')."""
    cls: Any = schema
    for part in loc:
        if isinstance(part, int):
            continue
        if not (isinstance(cls, type) and issubclass(cls, BaseModel)) or part not in cls.model_fields:
            return None
        ann = cls.model_fields[part].annotation
        cls = next((a for a in (get_args(ann) or (ann,))
                    if isinstance(a, type) and issubclass(a, BaseModel)), ann)
        if get_origin(ann) is list:
            cls = get_args(ann)[0]
    return cls if isinstance(cls, type) and issubclass(cls, BaseModel) else None


def _source_for(key: str, sources: dict[str, str], default: str) -> str:
    """The file that set `key`, one of its parents (a list or section), or one of its children."""
    parts = key.split(".")
    for i in range(len(parts), 0, -1):
        if ".".join(parts[:i]) in sources:
            return sources[".".join(parts[:i])]
    return next((s for k, s in sources.items() if k.startswith(key + ".")), default)


def _format_validation(err: ValidationError, schema: type[BaseModel], sources: dict[str, str],
                       default_source: str) -> ConfigError:
    by_key: dict[str, list[dict]] = {}
    for e in err.errors():
        # Drop the union-member part of the location ('float', 'literal[...]').
        loc = tuple(p for p in e["loc"] if isinstance(p, int) or not (
            p in ("float", "int", "str", "bool", "list", "tuple", "function-after")
            or str(p).startswith(("literal[", "list[", "tuple[", "function-"))))
        by_key.setdefault(".".join(str(p) for p in loc), []).append(dict(e, loc=loc))
    key, errs = next(iter(by_key.items()))
    e0 = errs[0]
    source = _source_for(key, sources, default_source)
    if e0["type"] == "extra_forbidden":
        parent = _schema_at(schema, e0["loc"][:-1])
        known = list(parent.model_fields) if parent else []
        close = difflib.get_close_matches(str(e0["loc"][-1]), known, n=1, cutoff=0.5)
        prefix = ".".join(str(p) for p in e0["loc"][:-1])
        hint = f"; did you mean '{prefix + '.' if prefix else ''}{close[0]}'?" if close else ""
        msg = f"unknown key{hint} (known here: {', '.join(known)})"
    elif e0["type"] == "missing":
        msg = "required value is missing"
    else:
        got = e0.get("input")
        expected = "; or ".join(dict.fromkeys(x["msg"].removeprefix("Value error, ") for x in errs))
        msg = f"got {got!r}: {expected}"
    extra = len(by_key) - 1
    if extra:
        msg += f" (and {extra} more problem{'s' * (extra > 1)})"
    return ConfigError(msg, key=key or None, source=source)


def apply_preset(raw: dict, sources: dict[str, str]) -> dict:
    """Put the method preset's reference values under what the user wrote (SPEC 12)."""
    preset = (raw.get("method") or {}).get("preset", MethodConfig.model_fields["preset"].default)
    if preset not in METHOD_PRESETS:
        close = difflib.get_close_matches(str(preset), list(METHOD_PRESETS), n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        raise ConfigError(f"unknown preset {preset!r}{hint} (known: {', '.join(METHOD_PRESETS)})",
                          key="method.preset", source=sources.get("method.preset", COMMAND_LINE))
    values: dict = {}
    for key, value in METHOD_PRESETS[preset].items():
        _set_dotted(values, key, copy.deepcopy(value))
    return _deep_merge(values, raw)


def load_config(path: str | os.PathLike | None, overrides: list[str] | None = None,
                schema: type[BaseModel] = TrainConfig, base: dict | None = None) -> Any:
    """Load and validate a configuration; raises `ConfigError` (exit 2) on any user mistake."""
    raw: dict = copy.deepcopy(base or {})
    sources: dict[str, str] = {}
    if path is not None:
        raw, sources = _read_yaml(Path(path))
    for text in overrides or []:
        key, value = parse_override(text)
        _set_dotted(raw, key, value)
        sources[key] = COMMAND_LINE
    if schema is TrainConfig:
        raw = apply_preset(raw, sources)
    try:
        cfg = schema.model_validate(raw)
    except ValidationError as err:
        raise _format_validation(err, schema, sources, str(path) if path else COMMAND_LINE) from None
    if isinstance(cfg, TrainConfig):
        refuse_incompatible(cfg, sources)
    return cfg


def refuse_incompatible(cfg: TrainConfig, sources: dict[str, str]) -> None:
    """Option combinations that cannot train: a `ConfigError` naming the file that set the key."""

    def fail(key: str, msg: str) -> None:
        raise ConfigError(msg, key=key, source=_source_for(key, sources, "preset " + cfg.method.preset))

    m = cfg.method
    if m.objective == "ect" and m.sigma_min > 0:
        fail("method.sigma_min", "the ECT objective trains with sigma_min = 0 (SPEC 2.4: with 0.002, "
             "t < sigma_min gives c_out < 0); set method.sigma_min=0")
    if m.objective != "edm" and m.c == "adaptive" and m.distance == "l2":
        fail("method.c", "an adaptive c needs distance cauchy or pseudo_huber (l2 has no c)")
    if m.objective in ("ict", "ilct") and m.s1 < m.s0:
        fail("method.s1", f"s1 ({m.s1}) must be >= s0 ({m.s0})")
    if cfg.distributed.zero_stage == 3:
        fail("distributed.zero_stage", "ZeRO-3 is not supported: the partitioned EMA and the teacher "
             "pass need full parameters on every rank; use zero_stage 0, 1 or 2")
    if cfg.model.attention == "xformers":
        if importlib.util.find_spec("xformers") is None:
            fail("model.attention", "xformers is not installed: `pip install xformers` "
                 "(or `pip install 'lct-consistency[xformers]'`), or use model.attention=sdpa")
    if cfg.model.cond == "class" and cfg.model.num_classes < 1:
        fail("model.num_classes", "class-label mode needs model.num_classes >= 1")
    names = [e.name for e in cfg.ema.models]
    if len(set(names)) != len(names):
        fail("ema.models", f"EMA names must be unique, got {names}")
    for i, e in enumerate(cfg.ema.models):
        if (e.halflife_images is None) == (e.decay is None) or (e.decay is not None and e.decay_batch is None):
            fail(f"ema.models.{i}", "give either halflife_images, or decay with decay_batch")
    if cfg.ema.sample not in names:
        fail("ema.sample", f"no EMA named {cfg.ema.sample!r}; defined: {names}")
    if cfg.optim.micro_batch_size and cfg.optim.batch_size % cfg.optim.micro_batch_size:
        fail("optim.micro_batch_size", f"must divide optim.batch_size ({cfg.optim.batch_size})")
    if cfg.model.init_ema and not cfg.model.init_from:
        fail("model.init_ema", "init_ema needs model.init_from")
    if cfg.data.latent_norm == "vae" and m.sigma_data != 1.0:
        fail("method.sigma_data", "latent_norm vae latents have sigma_data 1 (SPEC 14.4); set method.sigma_data=1 "
             "and the noise levels that go with it")
    if cfg.eval.every and not (cfg.eval.captions or cfg.data.val_shards):
        fail("eval.every", "the quality eval samples held-out captions: set data.val_shards (held-out latent "
             "shards) or eval.captions (a caption file), or eval.every=0")
    if cfg.eval.every and cfg.eval.metric_arg and not cfg.eval.metric:
        fail("eval.metric_arg", "eval.metric_arg sets options of eval.metric metrics; none is named")
    refuse_pixart(cfg, fail)
    refuse_flow(cfg, fail)


FLOW_TEXT_KINDS = {"sana": "gemma", "sd3": "sd3"}


def refuse_flow(cfg: TrainConfig, fail) -> None:
    """What a pretrained flow model (SPEC 15: Sana, SD3) cannot train with."""
    mc, m = cfg.model, cfg.method
    if mc.arch not in FLOW_TEXT_KINDS:
        return
    name = {"sana": "Sana", "sd3": "Stable Diffusion 3"}[mc.arch]
    if not mc.pretrained:
        fail("model.pretrained", f"model.arch={mc.arch} needs model.pretrained: a {name} pipeline or transformer folder, "
             "or a hub id such as " + ("Efficient-Large-Model/Sana_600M_512px_diffusers" if mc.arch == "sana"
                                       else "stabilityai/stable-diffusion-3.5-medium"))
    if mc.nsln != "none":
        fail("model.nsln", f"{name}'s attention keeps its own q/k norm; NsLN is not swapped in: set model.nsln=none")
    if mc.dropout:
        fail("model.dropout", f"the {name} transformer has no lct dropout; set model.dropout=0")
    if mc.cond != "text":
        fail("model.cond", f"{name} is text-conditioned; set model.cond=text")
    if mc.init_from:
        fail("model.init_from", f"a {mc.arch} network starts from model.pretrained (resume a run with run.resume)")
    if cfg.data.latent_norm != "vae":
        fail("data.latent_norm", f"{name} was trained on its VAE's scaled latents (SPEC 15.4); set data.latent_norm=vae")
    if cfg.text.kind not in (None, FLOW_TEXT_KINDS[mc.arch]):
        fail("text.kind", f"{name} reads text kind {FLOW_TEXT_KINDS[mc.arch]}; set text.kind={FLOW_TEXT_KINDS[mc.arch]}")
    if max(cfg.sample.steps, default=1) > 1 + len(m.tau):
        fail("sample.steps", f"a {mc.arch} model samples its tuned levels (sigma_max, then method.tau: "
             f"{1 + len(m.tau)} steps at most, SPEC 15.7); drop the larger sample.steps or give more method.tau")
    for key, value in zip(("method.sample_boundary_sigma_min", "method.sample_sigma_min"), m.sampling_sigma_mins()):
        if value:
            fail(key, f"a {mc.arch} model samples with its stock pipeline, whose Euler step is the sigma_min-0 "
                 f"consistency function (SPEC 15.7); set {key}=0")


def refuse_pixart(cfg: TrainConfig, fail) -> None:
    """What a pretrained PixArt network (SPEC 14) cannot train with."""
    mc = cfg.model
    if mc.arch != "pixart":
        if mc.arch in FLOW_TEXT_KINDS:
            return
        if mc.pretrained:
            fail("model.pretrained", "model.pretrained is for model.arch=pixart")
        return
    if not mc.pretrained:
        fail("model.pretrained", "model.arch=pixart needs model.pretrained: a PixArt pipeline or transformer "
             "folder, or a hub id such as PixArt-alpha/PixArt-Sigma-XL-2-512-MS")
    if mc.nsln != "none":
        fail("model.nsln", "PixArt's attention has no q/k norm to swap for NsLN; set model.nsln=none")
    if mc.dropout:
        fail("model.dropout", "the PixArt transformer has no lct dropout; set model.dropout=0")
    if mc.cond != "text":
        fail("model.cond", "PixArt is text-conditioned; set model.cond=text")
    if mc.init_from:
        fail("model.init_from", "a pixart network starts from model.pretrained (resume a run with run.resume)")
    if cfg.data.latent_norm != "vae":
        fail("data.latent_norm", "PixArt was trained on VAE-scaled latents (SPEC 14.4); set data.latent_norm=vae")
    if cfg.text.kind not in (None, "t5"):
        fail("text.kind", "PixArt reads T5 token states; set text.kind=t5")


def check_train_config(cfg: TrainConfig, world_size: int = 1, manifest: dict | None = None,
                       cuda: bool | None = None) -> list[str]:
    """Warnings about allowed settings that are probably not meant (the trainer prints them once, on
    rank 0). `world_size`: the ranks the batch is split over (OT couples each rank's micro-batch);
    `manifest`: the data's, where it can be read; `cuda`: whether a GPU is there (None: unknown, no
    device warnings)."""
    m, warn = cfg.method, {}  # id -> message; a config lists the ids it has weighed in run.accept_warnings
    if m.objective == "ect" and m.c == "adaptive":
        warn["adaptive_c_ect"] = ("method.c=adaptive with the ECT mapping uses lct's stage-to-intervals extension "
                                  "(SPEC 4), not a published rule")
    if m.ot and m.objective != "edm":
        mb = cfg.optim.micro_batch_size or max(1, cfg.optim.batch_size // world_size)
        if mb < OT_MIN_GROUP:
            warn["ot_small_group"] = f"OT coupling over micro-batches of {mb} per rank (< {OT_MIN_GROUP}) pairs little (SPEC 6)"
    if manifest is not None and cfg.data.flip and not manifest.get("flip"):
        warn["flip_without_copies"] = ("data.flip is true but the latents were encoded without flipped copies "
                                       "(encode_latents.py --flip), so no sample is flipped; set data.flip: false, or "
                                       "re-encode with --flip")
    images = cfg.run.total_steps * cfg.optim.batch_size
    long = [e for e in cfg.ema.models if e.resolved_halflife() > images]
    if long:
        warn["ema_longer_than_run"] = "; ".join(
            f"ema.models {e.name!r}: a half-life of {e.resolved_halflife():,.0f} images is longer than the run "
            f"({images:,} images = run.total_steps x optim.batch_size), so it stays close to the early weights"
            for e in long) + "; use halflife_images of a few percent of the run"
    if cuda is False:
        if cfg.model.compile:
            warn["compile_cpu"] = ("model.compile is on but there is no GPU: torch.compile on the CPU spends minutes "
                                   "compiling for little gain; set model.compile: false")
        if cfg.precision == "bf16_trunk":
            warn["bf16_cpu"] = ("precision bf16_trunk without a GPU: bf16 autocast on the CPU is slow and "
                                "approximate; set precision: fp32")
        if cfg.precision == "tf32":
            warn["tf32_cpu"] = ("precision tf32 without a GPU: TF32 is a GPU matmul mode, the CPU computes in fp32; "
                                "set precision: fp32 to say what runs")
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if cfg.data.num_workers > cores:
        warn["workers_over_cores"] = (f"data.num_workers {cfg.data.num_workers} on {cores} CPU core(s) this process "
                                      f"may use: the workers and the ranks contend; set data.num_workers <= {cores}")
    late = [f"{key} {every}" for key, every in (("run.save_every", cfg.run.save_every),
                                                ("sample.every", cfg.sample.every),
                                                ("val.every", cfg.val.every if cfg.data.val_shards else 0),
                                                ("eval.every", cfg.eval.every)) if every > cfg.run.total_steps]
    if late:
        warn["every_beyond_run"] = (f"{', '.join(late)} beyond run.total_steps {cfg.run.total_steps}: nothing of it "
                                    "happens before the run's end (only the end's save, grids, validation and "
                                    "eval); lower it to see it during the run")
    return [f"{text} [{key}: if weighed, list it in run.accept_warnings]" for key, text in warn.items()
            if key not in cfg.run.accept_warnings]


def config_to_dict(cfg: BaseModel) -> dict:
    return cfg.model_dump(mode="json")


def dump_yaml(cfg: BaseModel) -> str:
    return yaml.safe_dump(config_to_dict(cfg), sort_keys=False, default_flow_style=None)
