"""What an export carries besides diffusers' files: the model card (`README.md`, the hub's YAML
header) and lct's training record (`lct_export.json`, written by `LCTPipeline.save_pretrained` from
`pipe.training_record`), so that save -> load -> save gives the same files.

The card's YAML header is a valid hub card: `library_name`, `pipeline_tag`, `license` (an id given
to `python -m lct.export --license`, else `other` with `license_name` / `license_link`, which the hub
requires for `other`), `base_model` (+ `base_model_relation: finetune`) where a hub model was
tuned, `datasets` where given (`--dataset`), `tags`. Its code blocks run as written once PATH is
replaced (tests/test_export_conventions.py runs them).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

EXPORT_FORMAT = "lct-export/3"
META = "lct_export.json"
INSTALL = "pip install lct-consistency"
UNSET_LICENSE = {"license": "other", "license_name": "unspecified", "license_link": "README.md"}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def export_meta(pipe) -> dict:
    """lct_export.json of a pipeline (its training record)."""
    return {**(pipe.training_record or {}), "format": EXPORT_FORMAT, "layout": "diffusers pipeline (model_index.json)"}


def card_header(record: dict, pipeline_tag: str, tags: list[str]) -> list[str]:
    """The hub YAML header of an export's card from its training record (`record["card"]` holds
    what `python -m lct.export --license/--dataset` set)."""
    card = record.get("card") or {}
    lic = {"license": card["license"]} if card.get("license") else dict(UNSET_LICENSE)
    if card.get("license_name"):
        lic.update(license="other", license_name=card["license_name"], license_link=card.get("license_link") or "LICENSE")
    base = str((record.get("model") or {}).get("pretrained") or "")
    lines = ["---", "library_name: diffusers", f"pipeline_tag: {pipeline_tag}",
             *[f"{k}: {v}" for k, v in lic.items()]]
    if _HUB_ID.match(base):
        lines += ["base_model:", f"- {base}", "base_model_relation: finetune"]
    if card.get("datasets"):
        lines += ["datasets:", *[f"- {d}" for d in card["datasets"]]]
    lines += ["tags:", *[f"- {t}" for t in dict.fromkeys(tags)], "---", ""]
    return lines


def license_lines(record: dict) -> list[str]:
    card = record.get("card") or {}
    if card.get("license") or card.get("license_name"):
        return [f"License: `{card.get('license') or card.get('license_name')}` (set at export)."]
    return ["License: **not set**. The weights' terms follow the training data's (and a tuned base model's); "
            "set them before an upload: `python -m lct.export RUN_DIR --out DIR --copy-all --license ID` "
            "(a hub license id such as `apache-2.0`, `cc-by-4.0`, `openrail++`)."]


def model_card(pipe, folder: str | Path | None = None) -> str:
    """README.md of an LCTPipeline export: the hub's YAML header, what was trained on what, how to
    load it (with lct: no code from the folder runs; without: `trust_remote_code=True`, which runs
    the folder's copies of lct's source), the latest eval. `folder`: where it is written (paths
    in the card are relative to it)."""
    from lct.pipeline import portable

    t = portable(pipe.training_record or {}, folder or ".")
    cfg = t.get("config") or {}
    method, model, data = t.get("method") or {}, cfg.get("model") or {}, cfg.get("data") or {}
    sched = pipe.scheduler.config
    text_model = pipe.transformer.config.cond == "text"
    preset = method.get("preset") or method.get("objective") or "lct"
    tag = "text-to-image" if text_model else "unconditional-image-generation"
    text = t.get("text") or {}
    vae = t.get("vae") or {}
    n_params = sum(p.numel() for p in pipe.transformer.parameters())
    steps = min(2, 1 + len(sched.taus))
    prompt = _example_prompt(t) if text_model else ""
    call = f"\"{prompt}\", " if text_model else ""
    lines = [
        *card_header(t, tag, ["lct", "consistency-model", tag, str(preset), "dit"]),
        f"# {Path(str((cfg.get('run') or {}).get('dir') or 'lct model')).name}: a latent consistency model trained with lct",
        "",
        f"A {model.get('arch') or 'DiT'} `TextDiT` ({n_params:,} parameters) in the latent space of "
        f"`{vae.get('id') or portable(pipe.config.vae_source, folder or '.') or 'its VAE'}`, conditioned on "
        f"{'the text tower `' + str(text.get('model')) + '` (' + str(text.get('pretrained')) + ')' if text else 'nothing (unconditional)'}, "
        f"trained with lct's `{preset}` method (objective `{method.get('objective')}`).",
        "",
        "## Use",
        "",
        f"With lct installed (`{INSTALL}`), the folder is read as data: lct loads each component with its own "
        "classes and runs no code from the folder.",
        "",
        "```python",
        "import torch",
        "from lct.pipeline import LCTPipeline",
        "",
        "pipe = LCTPipeline.from_pretrained(\"PATH_OR_HUB_ID\")",
        f"image = pipe({call}num_inference_steps={steps}, generator=torch.Generator().manual_seed(0)).images[0]",
        "```",
        "",
        "Without lct, diffusers loads it with `trust_remote_code=True`. That flag runs Python files shipped in "
        "the folder: `pipeline.py` (with `consistency.py`, `tokens.py`), `transformer/lct_dit.py` and "
        "`scheduler/lct_scheduler.py` (+ `consistency.py`)"
        + (", `text_encoder/lct_openclip_text.py`" if type(pipe.text_encoder).__name__ == "OpenCLIPTextModel" else "")
        + ": lct's own source files, copied as they are, needing torch, diffusers, transformers and safetensors "
        "only. Read them before you run them, and pin a `revision` when you load from the hub, as for any "
        "remote code.",
        "",
        "```python",
        "import torch",
        "from diffusers import DiffusionPipeline",
        "",
        "pipe = DiffusionPipeline.from_pretrained(\"PATH_OR_HUB_ID\", trust_remote_code=True, dtype=torch.bfloat16)",
        f"image = pipe({call}num_inference_steps={steps}, generator=torch.Generator().manual_seed(0)).images[0]",
        "```",
        "",
        "`num_inference_steps` 1, 2 or k (or `sigmas=[sigma_max, ...]` / `tau=[...]`: the levels), `guidance_scale` "
        "(1 = off; the unconditional branch is the learned null condition, or `negative_prompt`), "
        "`prompt_embeds` / `negative_prompt_embeds` with their masks and pooled vectors (`pipe.encode_prompt`), "
        "`num_images_per_prompt`, `generator` or `seed` (lct's per-sample noise: `python -m lct.sample --seed` "
        "gives the same images), `callback_on_step_end`, `output_type` pil / np / pt / latent.",
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
        f"| sampling defaults | 1 step; taus {list(sched.taus)} for 2+ steps (SPEC 9's Karras levels beyond); "
        "guidance 1 (off) |",
        "",
        "## Evaluation",
        "",
        *_eval_lines(t.get("eval")),
        "",
        "## Files",
        "",
        "`transformer/` (lct's `TextDiT`), `scheduler/` (`LCTScheduler`, SPEC 9 consistency sampling), "
        + ("`vae/` (SPEC 7's latent statistics in its config)" if pipe.vae is not None and not pipe.config.vae_source
           else f"the VAE `{portable(pipe.config.vae_source, folder or '.')}` (referenced, not copied)")
        + ", " + _text_line(pipe) + "; `lct_export.json` the training record and its full config. Upload this "
        "folder as it is (`pipe.push_to_hub(\"USER/NAME\")`, or `hf upload USER/NAME .`); `python -m lct.export "
        "RUN_DIR --out DIR --copy-all` first copies referenced components in.",
        "",
        "## License",
        "",
        *license_lines(t),
        "",
    ]
    return "\n".join(lines)


def _fmt(x) -> str:
    return f"{x:,.0f}" if isinstance(x, (int, float)) else "unknown"


def _text_line(pipe) -> str:
    if pipe.transformer.config.cond != "text":
        return "no text encoder (unconditional)"
    if pipe.config.text_source:
        return f"the text tower `{(pipe.config.text_source or {}).get('model')}` (referenced, not copied)"
    if type(pipe.text_encoder).__name__ == "OpenCLIPTextModel":
        return "`text_encoder/` (lct's `OpenCLIPTextModel`: an open_clip tower that needs lct and open_clip)"
    return f"`text_encoder/` + `tokenizer/` (transformers `{type(pipe.text_encoder).__name__}` + " \
           f"`{type(pipe.tokenizer).__name__}`)"


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


def _example_prompt(record: dict) -> str:
    """The card's example prompt: one from the run's own data (the training record's
    `example_prompt`), never a stock phrase about another domain."""
    return str(record.get("example_prompt") or "your prompt").replace('"', "'")
