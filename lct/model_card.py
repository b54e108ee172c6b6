"""What an export carries besides diffusers' files: the model card (`README.md`, the hub's YAML
header) and lct's record (`lct_export.json`), both written from a pipeline's `training` record
(`lct.export.training_record`) by `LCTPipeline.save_pretrained`, so that save -> load -> save
gives the same files.
"""

from __future__ import annotations

import json
from pathlib import Path

EXPORT_FORMAT = "lct-export/2"
META = "lct_export.json"


def export_meta(pipe) -> dict:
    """lct_export.json of a pipeline (the training record; sampling reads model_index.json)."""
    return {**(pipe.config.training or {}), "format": EXPORT_FORMAT, "layout": "diffusers pipeline (model_index.json)"}


def model_card(pipe) -> str:
    """README.md of an export: the hub's YAML header, what was trained on what, the latest eval
    and the three lines that generate an image."""
    t = pipe.config.training or {}
    cfg = t.get("config") or {}
    method, model, data = t.get("method") or {}, cfg.get("model") or {}, cfg.get("data") or {}
    sched = pipe.scheduler.config
    preset = method.get("preset") or method.get("objective") or "lct"
    tags = ["lct", "consistency-model", "text-to-image" if pipe.transformer.config.cond == "text" else "unconditional-image-generation",
            str(preset), "dit"]
    text = t.get("text") or {}
    vae = t.get("vae") or {}
    n_params = sum(p.numel() for p in pipe.transformer.parameters())
    lines = [
        "---",
        "library_name: diffusers",
        f"pipeline_tag: {'text-to-image' if pipe.transformer.config.cond == 'text' else 'unconditional-image-generation'}",
        "license: other  # set the license of your data and weights before uploading",
        "tags:", *[f"- {x}" for x in dict.fromkeys(tags)],
        "---",
        "",
        f"# {Path(str((cfg.get('run') or {}).get('dir') or 'lct model')).name}: a latent consistency model trained with lct",
        "",
        f"A {model.get('arch') or 'DiT'} `TextDiT` ({n_params:,} parameters) in the latent space of "
        f"`{vae.get('id') or pipe.config.vae_source or 'its VAE'}`, conditioned on "
        f"{'the text tower `' + str(text.get('model')) + '` (' + str(text.get('pretrained')) + ')' if text else 'nothing (unconditional)'}, "
        f"trained with lct's `{preset}` method (objective `{method.get('objective')}`).",
        "",
        "```python",
        "from diffusers import DiffusionPipeline  # pip install lct (the pipeline class is lct's)",
        "pipe = DiffusionPipeline.from_pretrained(\"PATH_OR_HUB_ID\", trust_remote_code=True)",
        f"image = pipe(\"{_example_prompt(pipe)}\", num_inference_steps={min(2, 1 + len(sched.taus))}, seed=0).images[0]",
        "```",
        "",
        "`num_inference_steps` 1, 2 or k (`tau=[...]`: the k - 1 intermediate sigmas), `guidance_scale` "
        "(1 = off; the null condition is learned), `negative_prompt`, `num_images_per_prompt`, `seed` (lct's "
        "per-sample noise: `python -m lct.sample --seed` gives the same images) or `generator`, "
        "`output_type` pil / np / pt / latent.",
        "",
        "## Training",
        "",
        "| | |",
        "|---|---|",
        f"| method | `{preset}`: objective `{method.get('objective')}`, sigma_min {method.get('sigma_min')} "
        f"(sampling {method.get('sample_sigma_min')}), sigma_max {method.get('sigma_max')}, sigma_data "
        f"{method.get('sigma_data')}, time input {method.get('time_embed_scale')} * ln(sigma) / 4 |",
        f"| method config | `{json.dumps(cfg.get('method') or {}, sort_keys=True)}` |",
        f"| network | {model.get('arch')}: hidden {pipe.transformer.config.hidden_size}, depth "
        f"{pipe.transformer.config.depth}, heads {pipe.transformer.config.num_heads}, patch "
        f"{pipe.transformer.config.patch_size}, nsln `{pipe.transformer.config.nsln}` |",
        f"| data | `{data.get('shards')}` ({t.get('resolution')} px, latents {t.get('latent', {}).get('shape')}, "
        f"normalisation `{t.get('latent', {}).get('norm')}`) |",
        f"| steps | {t.get('step')} optimizer steps, batch {(cfg.get('optim') or {}).get('batch_size')} |",
        f"| images seen | {t.get('images_seen'):,} |" if t.get("images_seen") is not None else "| images seen | unknown |",
        f"| EMA | `{t.get('ema')}`, half-life {_fmt(t.get('ema_halflife_images'))} images |",
        f"| precision | `{cfg.get('precision')}` |",
        f"| sampling defaults | 1 step; taus {list(sched.taus)} for 2+ steps; guidance 1 (off) |",
        "",
        "## Evaluation",
        "",
        *_eval_lines(t.get("eval")),
        "",
        "## Files",
        "",
        "`transformer/` (lct's `TextDiT`), `scheduler/` (`LCTScheduler`, SPEC 9 consistency sampling), "
        + ("`vae/`" if pipe.vae is not None and "vae" not in pipe._referenced else f"the VAE `{pipe.config.vae_source}` (referenced, not copied)")
        + ", " + _text_line(pipe) + "; `model_index.json` holds the latent statistics; `lct_export.json` the "
        "training record and its full config. Upload this folder as it is (e.g. `huggingface-cli upload "
        "USER/NAME .`); `python -m lct.export RUN_DIR --out DIR --copy-all` first copies referenced components in.",
        "",
    ]
    return "\n".join(lines)


def _fmt(x) -> str:
    return f"{x:,.0f}" if isinstance(x, (int, float)) else "unknown"


def _example_prompt(pipe) -> str:
    if pipe.transformer.config.cond != "text":
        return ""
    return str((pipe.config.training or {}).get("example_prompt") or "your prompt").replace('"', "'")


def _text_line(pipe) -> str:
    if pipe.transformer.config.cond != "text":
        return "no text encoder (unconditional)"
    if "text_encoder" in pipe._referenced:
        return f"the text tower `{(pipe.config.text_source or {}).get('model')}` (referenced, not copied)"
    if pipe.tokenizer is not None:
        return "`text_encoder/` + `tokenizer/` (transformers `CLIPTextModelWithProjection` + `CLIPTokenizer`)"
    return "`text_encoder/` (lct's `OpenCLIPTextModel`, tokenizes itself)"


def _eval_lines(ev: dict | None) -> list[str]:
    if not ev:
        return ["No eval yet. `python eval/clip_fid.py --checkpoint RUN_DIR --out RUN_DIR/eval/NAME`, then "
                "`python -m lct.export RUN_DIR --out DIR` puts its numbers here."]
    out = [f"From `{ev.get('path')}` ({ev.get('time')}): protocol `{ev.get('protocol')}`"
           f"{'' if ev.get('conforms') else ' (with deviations, see the file)'}, {ev.get('num_samples')} samples, "
           f"checkpoint step {ev.get('checkpoint_step')}, EMA `{ev.get('checkpoint_ema')}`.", "",
           "| setting | steps | tau | guidance | NFE | metrics |", "|---|---|---|---|---|---|"]
    for s in ev.get("settings") or []:
        metrics = ", ".join(f"{k} {v:.4g}" if isinstance(v, (int, float)) else f"{k} {v}" for k, v in s["metrics"].items())
        out.append(f"| {s['name']} | {s['steps']} | {s['tau']} | {s['guidance']} | {s['nfe']} | {metrics or 'skipped'} |")
    return out
