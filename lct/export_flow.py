"""A tuned flow model (SPEC 15: Sana, Stable Diffusion 3) as its stock diffusers pipeline folder.

    export/<ema>/
      model_index.json, transformer/, scheduler/   `SanaPipeline` or `StableDiffusion3Pipeline`
      vae/, text_encoder*/, tokenizer*/            when the data's VAE / towers are local and small
                                                   (else referenced in lct_export.json)
      null_condition.safetensors                   the trained null condition, as negative embeddings
      lct_export.json                              lct's record: the sampling levels, the sources
      README.md                                    the model card; its code runs as written

The scheduler is diffusers' stock `FlowMatchEulerDiscreteScheduler(shift=1.0, stochastic_sampling=True)`.
Called with `sigmas=[t_1, ..., t_k]` (t = sigma / (1 + sigma) of lct's levels sigma_max > tau_1 > ...,
in fp32 as the trained network saw them: `flow_sigmas`), each step predicts
`x0 = x_t - t v` (the consistency function, SPEC 15.2) and re-noises it to the next level,
`(1 - t') x0 + t' eps`, which is SPEC 9's `x0 + tau z` in lct's coordinates; after the last level it
returns x0. `shift=1` because the scheduler applies its shift to given sigmas too. The pipelines'
classifier-free guidance on v is SPEC 9's guidance on f (x0 is affine in v with the same x_t
term). SPEC 15.7 states the tolerance to which these pipelines reproduce lct's sampler.

`export_flow` is the trainer's export for `model.arch: sana | sd3` (dispatched from
`lct.export.export_network`); `load_flow_export` loads one back with its null condition.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from lct.errors import UserError
from lct.export_common import CARRY_MAX_BYTES, REMAKE_HINT, quiet_loading, training_record
from lct.files import atomic_dir

PIPELINES = {"sana": "SanaPipeline", "sd3": "StableDiffusion3Pipeline"}
FLOW_NULL = "null_condition.safetensors"
META = "lct_export.json"
CARD = "README.md"


def flow_scheduler(num_train_timesteps: int = 1000):
    """The stock scheduler that samples lct's levels exactly (module docstring)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=int(num_train_timesteps), shift=1.0,
                                           stochastic_sampling=True)


def flow_sigmas(levels) -> list[float]:
    """The pipelines' `sigmas=` of lct's noise levels (sigma_max, tau_1, ...): `t = sigma / (1 + sigma)`
    computed in fp32, as `FlowDenoiser` computes the timestep it feeds the network."""
    from lct.models.flow import flow_t

    return [float(v) for v in flow_t(torch.tensor([float(s) for s in levels], dtype=torch.float32))]


def check_exportable(method) -> None:
    """The stock scheduler's step is `x0 = x_t - t v` and the re-noising `x0 + tau z`: the sampling
    sigma_mins of SPEC 1 / 9 must be 0 (what ECT trains with)."""
    boundary, noise = method.sampling_sigma_mins()
    for key, value in (("method.sample_boundary_sigma_min", boundary), ("method.sample_sigma_min", noise)):
        if value:
            raise UserError(f"{key} {value}: a flow model exports as its stock pipeline, whose Euler step is the "
                            f"sigma_min-0 consistency function; set {key}=0 (SPEC 15.7)")


def sampling_levels(method) -> dict[str, list[float]]:
    """{"1_step": sigmas, "2_step": ..., up to 1 + len(tau)}: the `sigmas=` of each step count."""
    levels = [float(method.sigma_max)] + [float(t) for t in method.tau]
    return {f"{k}_step": flow_sigmas(levels[:k]) for k in range(1, len(levels) + 1)}


def step_sigmas(method, steps: int) -> list[float]:
    """The pipelines' `sigmas=` for a `steps`-step sample at the tuned levels (SPEC 9, 15.7)."""
    levels = sampling_levels(method)
    if f"{steps}_step" not in levels:
        raise UserError(f"sample.steps {steps}: a flow model samples its tuned levels, sigma_max and method.tau "
                        f"({len(levels)} steps at most); give method.tau {steps - 1} levels or fewer sample.steps")
    return levels[f"{steps}_step"]


def null_condition(family: str, null_states: torch.Tensor, null_pooled: torch.Tensor | None, length: int
                   ) -> dict[str, torch.Tensor]:
    """The trained null condition as the pipeline's negative embeddings (SPEC 15.6): Sana's states
    padded to `length` with their mask, SD3's states (every position) and pooled vector."""
    null = null_states.detach().float().cpu()
    if family == "sana":
        return {"negative_prompt_embeds": torch.nn.functional.pad(null, (0, 0, 0, length - null.shape[0]))[None],
                "negative_prompt_attention_mask": (torch.arange(length) < null.shape[0]).long()[None]}
    return {"negative_prompt_embeds": null[None], "negative_pooled_prompt_embeds": null_pooled.detach().float().cpu()[None]}


def caption_embeds(family: str, cond: dict, null: dict[str, torch.Tensor]) -> dict:
    """The stock pipeline's text inputs for lct's text condition (`text_states`, `text_mask`,
    `pooled` of the captions as given) and the trained null, batched."""
    states = cond["text_states"]
    b = states.shape[0]
    neg = {k: v.to(states.device, v.dtype if v.dtype == torch.long else states.dtype).expand(b, *v.shape[1:])
           for k, v in null.items()}
    if family == "sana":
        return {"prompt_embeds": states, "prompt_attention_mask": cond["text_mask"].long(), "negative_prompt": None,
                "use_resolution_binning": False, **neg}
    return {"prompt_embeds": states, "pooled_prompt_embeds": cond["pooled"], **neg}


def training_flow_pipeline(model, *, vae=None):
    """The export's stock pipeline in memory around a flow denoiser being trained (its transformer
    itself, no text towers): what the trainer's sample grids run (`caption_embeds`, `step_sigmas`)."""
    import diffusers

    names = ("text_encoder", "tokenizer") if model.family == "sana" else (
        "text_encoder", "text_encoder_2", "text_encoder_3", "tokenizer", "tokenizer_2", "tokenizer_3")
    return getattr(diffusers, PIPELINES[model.family])(transformer=model.net.transformer, vae=vae,
                                                       scheduler=flow_scheduler(model.num_train_timesteps),
                                                       **dict.fromkeys(names))


def _size(path: Path) -> int:
    return path.stat().st_size if path.is_file() else sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _local_small(source_id: str | None) -> bool:
    p = Path(str(source_id or ""))
    return bool(source_id) and p.is_dir() and _size(p) <= CARRY_MAX_BYTES


def _vae(manifest: dict):
    """(vae, None) for a small local VAE folder, else (None, its id)."""
    rec = manifest.get("vae") or {}
    if not rec.get("id"):
        raise UserError("the data's manifest records no VAE; re-run data_prep/encode_latents.py")
    if not _local_small(rec["id"]):
        return None, str(rec["id"])
    from lct.vae import load_vae

    return load_vae(str(rec["id"]), "cpu", torch.float32), None


def text_components(family: str, enc) -> dict[str, Any]:
    """The pipeline's text components of a loaded tower (`lct.hf_text`)."""
    if family == "sana":
        return {"text_encoder": enc.model, "tokenizer": enc.hf_tokenizer}
    return {"text_encoder": enc.clip_l, "text_encoder_2": enc.clip_g, "text_encoder_3": enc.t5,
            "tokenizer": enc.tok_l, "tokenizer_2": enc.tok_g, "tokenizer_3": enc.tok_t5}


def _text(family: str, manifest: dict):
    """(components, None) for a small local tower, else ({names: None}, the manifest's text record)."""
    from lct.hf_text import HFTextEncoder

    rec = manifest.get("text") or {}
    want = {"sana": "gemma", "sd3": "sd3"}[family]
    if rec.get("kind") != want:
        raise UserError(f"the data's text kind is {rec.get('kind')!r}; a {family} model reads text kind {want}")
    names = ("text_encoder", "tokenizer") if family == "sana" else (
        "text_encoder", "text_encoder_2", "text_encoder_3", "tokenizer", "tokenizer_2", "tokenizer_3")
    if not _local_small((rec.get("source") or {}).get("id")):
        return dict.fromkeys(names), json.loads(json.dumps(rec, default=str))
    enc = HFTextEncoder.from_manifest(manifest, dtype="fp32")
    return text_components(family, enc), None


def export_flow(model: torch.nn.Module, ema_state: dict[str, torch.Tensor], out_dir: str | os.PathLike, *, cfg,
                manifest: dict, ema_name: str, step: int, images_seen: int | None = None) -> Path:
    """Write the EMA `ema_state` of a `FlowDenoiser` as its stock pipeline folder (module docstring),
    atomically. `cfg`: the run's TrainConfig; `manifest`: the data's."""
    import diffusers
    from safetensors.torch import save_file

    family = model.family
    check_exportable(cfg.method)
    net = model.net
    with torch.random.fork_rng(devices=[]):  # building the copy must not move the training RNG
        transformer = type(net.transformer).from_config(net.transformer.config)
    prefix = "net.transformer."
    missing, unexpected = transformer.load_state_dict({k[len(prefix):]: v for k, v in ema_state.items()
                                                       if k.startswith(prefix)}, strict=False)
    buffers = set(dict(transformer.named_buffers()))  # the EMA holds parameters; buffers (SD3's sin-cos table) are the config's
    if unexpected or [m for m in missing if m not in buffers]:
        raise RuntimeError(f"EMA does not match the transformer: missing {missing[:5]}, unexpected {unexpected[:5]}")
    vae, vae_source = _vae(manifest)
    text, text_source = _text(family, manifest)
    pipe = getattr(diffusers, PIPELINES[family])(transformer=transformer.eval(), vae=vae,
                                                 scheduler=flow_scheduler(model.num_train_timesteps), **text)
    trec = manifest.get("text") or {}
    null = ema_state["net.null_text_states"].float()
    length = int(trec.get("context_length") or null.shape[0])
    tensors = null_condition(family, null, ema_state.get("net.null_pooled"), length)
    record = training_record(cfg, manifest, ema_name, step, images_seen,
                             stock=(PIPELINES[family], transformer.config.sample_size))
    record.update(pipeline=PIPELINES[family], family=family, pretrained=cfg.model.pretrained, vae_source=vae_source,
                  text_source=text_source, sigmas=sampling_levels(cfg.method), null_condition=FLOW_NULL,
                  resolution=manifest.get("resolution"),
                  max_sequence_length=int(trec.get("t5_length") or length) if family == "sd3" else length,
                  instruction=trec.get("instruction") if family == "sana" else None)
    record = json.loads(json.dumps(record, default=str))
    with atomic_dir(Path(out_dir)) as tmp:
        pipe.save_pretrained(tmp)
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(Path(tmp) / FLOW_NULL))
        (Path(tmp) / META).write_text(json.dumps(record, indent=1) + "\n")
        (Path(tmp) / CARD).write_text(model_card(record))
    return Path(out_dir)


# ----------------------------------------------------------------------------------------------
# Reading and the model card
# ----------------------------------------------------------------------------------------------


def _loader_lines(record: dict) -> list[str]:
    """`from_pretrained` keyword lines for the components the export references (not copied)."""
    out = []
    vae = record.get("vae_source")
    if vae:
        cls = "AutoencoderDC" if record["family"] == "sana" else "AutoencoderKL"
        out.append(f"    vae=diffusers.{cls}.from_pretrained({vae!r}, subfolder='vae'),  # or the VAE folder itself")
    text = record.get("text_source")
    if text:
        comps = (text.get("source") or {}).get("components") or {}
        src = (text.get("source") or {}).get("id")
        if record["family"] == "sana":
            sub = (text.get("source") or {}).get("subfolder")
            tsrc = (text.get("tokenizer_source") or {})
            out.append(f"    text_encoder=transformers.Gemma2Model.from_pretrained({src!r}"
                       + (f", subfolder={sub!r}" if sub else "") + "),")
            out.append(f"    tokenizer=transformers.AutoTokenizer.from_pretrained({tsrc.get('id') or src!r}"
                       + (f", subfolder={tsrc.get('subfolder')!r}" if tsrc.get("subfolder") else "") + "),")
        else:
            for name, cls in (("text_encoder", "CLIPTextModelWithProjection"), ("text_encoder_2", "CLIPTextModelWithProjection"),
                              ("text_encoder_3", "T5EncoderModel")):
                rid = (comps.get(name) or {}).get("id") or src
                out.append(f"    {name}=transformers.{cls}.from_pretrained({rid!r}, subfolder={name!r}),")
                tok = name.replace("text_encoder", "tokenizer")
                out.append(f"    {tok}=transformers.AutoTokenizer.from_pretrained({rid!r}, subfolder={tok!r}),")
    return out


def sampling_code(record: dict) -> str:
    """The model card's Python: load the stock pipeline, sample at 1 and 2 steps, guide with the
    trained null condition. Runs as written in the export folder (`path = "."`)."""
    family, res = record["family"], int(record.get("resolution") or 0)
    cls = record["pipeline"]
    sizes = (record.get("buckets") or {}).get("sizes") or ([[res, res]] if res else None)
    binned = (record.get("resolution_binning") or {}).get("covers_training")  # bins only to trained sizes
    size = (f"height={sizes[0][0]}, width={sizes[0][1]}, " if sizes else "") + (
        "use_resolution_binning=False, " if family == "sana" and not binned else "")
    lines = ["import json", "", "import diffusers", "import torch", "import transformers",
             "from safetensors.torch import load_file", "",
             'path = "."  # this folder (huggingface-cli download USER/REPO --local-dir DIR; then cd DIR)',
             f"pipe = diffusers.{cls}.from_pretrained(", "    path,", *_loader_lines(record), ")",
             'record = json.load(open(f"{path}/lct_export.json"))',
             f'null = load_file(f"{{path}}/{record["null_condition"]}")  # the trained null condition (guidance)',
             'prompt = ["a photo of a corgi wearing sunglasses on a beach"]']
    if family == "sana":
        text_kw = f'max_sequence_length={record["max_sequence_length"]}, complex_human_instruction=record["instruction"]'
        lines += [
            "# 1 step, then 2 steps (record['sigmas'] holds every tuned step count); guidance_scale 1 = off",
            f'image = pipe(prompt, sigmas=record["sigmas"]["1_step"], guidance_scale=1.0, {size}{text_kw},',
            "             generator=torch.Generator().manual_seed(0)).images[0]",
            f'image = pipe(prompt, sigmas=record["sigmas"]["2_step"], guidance_scale=1.0, {size}{text_kw},',
            "             generator=torch.Generator().manual_seed(0)).images[0]",
            "# guidance w > 1 against the trained null condition (SanaPipeline takes embeddings for both sides)",
            f"embeds, mask, _, _ = pipe.encode_prompt(prompt, do_classifier_free_guidance=False, {text_kw})",
            "b = embeds.shape[0]",
            'image = pipe(prompt_embeds=embeds, prompt_attention_mask=mask, negative_prompt=None,',
            '             negative_prompt_embeds=null["negative_prompt_embeds"].expand(b, -1, -1).to(embeds.dtype),',
            '             negative_prompt_attention_mask=null["negative_prompt_attention_mask"].expand(b, -1),',
            f'             sigmas=record["sigmas"]["1_step"], guidance_scale=1.5, {size}',
            "             generator=torch.Generator().manual_seed(0)).images[0]",
        ]
    else:
        text_kw = f'max_sequence_length={record["max_sequence_length"]}'
        lines += [
            "# 1 step, then 2 steps (record['sigmas'] holds every tuned step count); guidance_scale 1 = off.",
            "# The scheduler's re-noising draws from torch's global generator: seed it for repeatable samples.",
            "torch.manual_seed(0)",
            f'image = pipe(prompt, sigmas=record["sigmas"]["1_step"], guidance_scale=1.0, {size}{text_kw},',
            "             generator=torch.Generator().manual_seed(0)).images[0]",
            f'image = pipe(prompt, sigmas=record["sigmas"]["2_step"], guidance_scale=1.0, {size}{text_kw},',
            "             generator=torch.Generator().manual_seed(0)).images[0]",
            "# guidance w > 1 against the trained null condition",
            "b = len(prompt)",
            'image = pipe(prompt, negative_prompt_embeds=null["negative_prompt_embeds"].expand(b, -1, -1),',
            '             negative_pooled_prompt_embeds=null["negative_pooled_prompt_embeds"].expand(b, -1),',
            f'             sigmas=record["sigmas"]["1_step"], guidance_scale=1.5, {size}{text_kw},',
            "             generator=torch.Generator().manual_seed(0)).images[0]",
        ]
    lines.append('image.save("sample.png")')
    return "\n".join(lines) + "\n"


def model_card(record: dict) -> str:
    """README.md of a flow export: the hub's YAML header, what was tuned from what, the code."""
    method = record.get("method") or {}
    cfg = record.get("config") or {}
    base = record.get("pretrained")
    steps = ", ".join(k.split("_")[0] for k in record.get("sigmas", {}))
    lines = [
        "---", "library_name: diffusers", "pipeline_tag: text-to-image",
        "license: other  # the base model's license applies; set it before uploading",
        *([f"base_model: {base}"] if base and "/" in str(base) and not Path(str(base)).exists() else []),
        "tags:", "- lct", "- consistency-model", "- text-to-image", f"- {record['family']}", f"- {method.get('preset')}",
        "---", "",
        f"# {Path(str((cfg.get('run') or {}).get('dir') or 'lct model')).name}: "
        f"{record['family']} consistency-tuned with lct",
        "",
        f"`{base}` tuned without a teacher by lct's `{method.get('preset')}` method (objective "
        f"`{method.get('objective')}`; SPEC 15: the velocity predictor wrapped as a consistency function). "
        f"It samples in {steps} steps with the stock `diffusers.{record['pipeline']}` and "
        "`FlowMatchEulerDiscreteScheduler(shift=1.0, stochastic_sampling=True)`: pass the tuned levels as "
        "`sigmas` (in `lct_export.json`), not `num_inference_steps`.",
        "", "```python", sampling_code(record).rstrip("\n"), "```", "",
        "## Training", "", "| | |", "|---|---|",
        f"| method | `{json.dumps(cfg.get('method') or {}, sort_keys=True)}` |",
        f"| levels | sigma_max {method.get('sigma_max')}, taus {method.get('tau')} (t = sigma / (1 + sigma): "
        f"{record.get('sigmas')}) |",
        f"| data | `{(cfg.get('data') or {}).get('shards')}` ({data_sizes(record)}) |",
        f"| steps | {record.get('step')} optimizer steps, batch {(cfg.get('optim') or {}).get('batch_size')}, "
        f"EMA `{record.get('ema')}` |",
        "",
    ]
    return "\n".join(lines)


def data_sizes(record: dict) -> str:
    """The card's data sizes: the square resolution, or the trained buckets (most common first)."""
    b = record.get("buckets")
    if not b:
        return f"{record.get('resolution')} px, latents {(record.get('latent') or {}).get('shape')}"
    binning = record.get("resolution_binning") or {}
    note = (f"; the pipeline's resolution binning (`{binning['table']}`) holds every one of them" if
            binning.get("covers_training") else "")
    return (f"aspect-ratio buckets `{b.get('source')}`, height x width "
            f"{', '.join(f'{h}x{w}' for h, w in b['sizes'])}, most common first (the code's size){note}")


def load_flow_export(path: str | os.PathLike, *, vae: str | None = None, text_encoder: str | None = None):
    """(pipeline, null condition tensors, record) of an `export_flow` folder. Components it references
    (a hub VAE or text tower) come from `vae` / `text_encoder` or the recorded sources."""
    import diffusers
    from safetensors.torch import load_file


    d = Path(path)
    try:
        record = json.loads((d / META).read_text())
    except (OSError, ValueError) as err:
        raise UserError(f"{d / META}: unreadable ({err}); {REMAKE_HINT}") from None
    kw: dict[str, Any] = {}
    if vae or record.get("vae_source"):
        from lct.vae import load_vae

        kw["vae"] = load_vae(vae or record["vae_source"], "cpu", torch.float32)
    if text_encoder or record.get("text_source"):
        from lct.hf_text import HFTextEncoder

        rec = record.get("text_source") or {}
        src = text_encoder or (rec.get("source") or {}).get("id")
        enc = HFTextEncoder.load(src, max_length=record["max_sequence_length"], kind={"sana": "gemma"}.get(record["family"], "sd3"),
                                 instruction=record.get("instruction") or [], key="--text-encoder")
        kw.update(text_components(record["family"], enc))
    try:
        with quiet_loading():
            pipe = getattr(diffusers, record["pipeline"]).from_pretrained(str(d), **kw)
    except Exception as err:
        msg = str(err).strip().splitlines()
        raise UserError(f"{d}: could not be loaded as a {record['pipeline']} "
                        f"({(msg[0] if msg else type(err).__name__)[:300]}); {REMAKE_HINT}") from None
    pipe.set_progress_bar_config(disable=True)
    return pipe, load_file(str(d / FLOW_NULL)), record
