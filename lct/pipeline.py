"""`LCTPipeline`: a trained lct model as a diffusers text-to-image pipeline (SPEC 9 sampling, SPEC 7
decoding), following diffusers' text-to-image conventions.

    >>> from lct.pipeline import LCTPipeline             # lct installed: no code from the folder runs
    >>> pipe = LCTPipeline.from_pretrained("runs/lct_coco/export/ema")
    >>> image = pipe("a red bus", num_inference_steps=2, generator=torch.Generator().manual_seed(0)).images[0]

(Code samples in this file carry `>>>`: diffusers scans the files it runs for import lines and
would ask users of an export to install "lct".)

Without lct, `DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)` runs the copies of
this file, `transformer/lct_dit.py` and `scheduler/lct_scheduler.py` that the folder carries (it needs
torch, diffusers, transformers and safetensors only). `trust_remote_code=True` means exactly
that: Python files from the folder are executed, so read them (or use lct's loader) first.

Sampling (SPEC 9): every step evaluates the consistency function `f(x, sigma)` of SPEC 1 with
`lct.consistency.consistency_function` (the one that trains) around the `transformer` (`TextDiT`,
the network F), applies classifier-free guidance to f (`f_w = f_u + w (f_c - f_u)`: for a fixed x
and sigma that is guidance on F, as SPEC 9 and every diffusers pipeline apply it), and hands f to
`LCTScheduler.step`, which re-noises it to the next level. The unconditional branch is the learned
null condition (SPEC 9), or a `negative_prompt` / `negative_prompt_embeds` where given. Levels:
`num_inference_steps` (the model's recorded taus, else SPEC 9's Karras levels) or `sigmas=[sigma_max,
tau_1, ...]` (`tau=[...]`: the intermediate ones only).

Text (`encode_prompt`): the text encoder is transformers' CLIP form of the data's open_clip tower
(captions cleaned as open_clip cleans them: ftfy where installed, HTML entities, whitespace, lower
case), a transformers tower of the data (T5 / CLIP, `text_kind` "t5" / "clip": `lct.hf_text`'s
tokenisation, captions as given), or lct's `OpenCLIPTextModel` (which needs lct and open_clip).

Noise: `generator` as in every diffusers pipeline (a list gives each sample its own stream), or
`seed=S`: lct's per-sample noise, one generator per sample keyed by (S, sample index) (`sample_indices`
gives the global indices of this batch), so a sample is the same image in any batch and on any rank:
what `python -m lct.sample --seed S` and eval use. `latents=` gives the unit initial noise.

Latents: the sampled latents are normalised as in training (SPEC 7); the VAE config holds the
statistics (`latents_mean`, `latents_std`, `scaling_factor` 0.5 for lct's `channel` / `element`
normalisation; the VAE's own `scaling_factor` / `shift_factor` for `vae`), decoded as diffusers'
pipelines decode: `raw = x * std / scaling_factor + mean`.

Precision: as every diffusers model (`torch_dtype=` / `dtype=` at loading, `pipe.to(dtype)`); the
transformer keeps SPEC 1.1's per-sample layers, norms and null condition fp32 (`TextDiT`). On the
CPU in fp32 a pipeline sample equals `python -m lct.sample` bit for bit.

This file imports only torch, diffusers and transformers (and, relatively, `consistency.py` and
`tokens.py`, which import torch and numpy): exports carry it as their `pipeline.py` beside those two.
"""

from __future__ import annotations

import hashlib
import html
import importlib
import inspect
import json
import os
import shutil
import struct
import tempfile
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from diffusers import DiffusionPipeline, ImagePipelineOutput
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.image_processor import VaeImageProcessor
from diffusers.utils import logging, replace_example_docstring
from diffusers.utils.dynamic_modules_utils import get_relative_imports
from diffusers.utils.torch_utils import randn_tensor

from .consistency import consistency_function
from .tokens import padding_mask, token_mask

logger = logging.get_logger(__name__)

INSTALL = "pip install lct-consistency"
SCHEDULER_CLASS = "LCTScheduler"
PIPELINE_FILE = "pipeline.py"
META = "lct_export.json"
CARD = "README.md"
OUTPUT_TYPES = ("pil", "np", "pt", "latent")
# The VAE config keys of SPEC 7's normalisation (diffusers' names).
LATENT_KEYS = ("latents_mean", "latents_std", "scaling_factor", "shift_factor")
# tokenizer_config.json keys transformers adds when it saves a tokenizer it loaded or called (how it
# was loaded, the last call's truncation), dropped so that save -> load -> save is a fixed point;
# sides only at their defaults.
_TOKENIZER_STATE = ("is_local", "local_files_only", "max_length", "stride", "truncation_strategy",
                    "padding_strategy", "pad_to_multiple_of", "pad_token_type_id", "name_or_path")
_TOKENIZER_DEFAULTS = {"padding_side": "right", "truncation_side": "right"}

EXAMPLE_DOC_STRING = """
    Examples:
        ```py
        >>> import torch
        >>> from lct.pipeline import LCTPipeline  # pip install lct-consistency: loads the folder as data

        >>> pipe = LCTPipeline.from_pretrained("runs/lct_coco/export/ema", dtype=torch.bfloat16)
        >>> image = pipe("a red bus on a city street", num_inference_steps=2,
        ...              generator=torch.Generator().manual_seed(0)).images[0]

        >>> # Without lct: diffusers runs the folder's own pipeline.py, transformer/lct_dit.py and
        >>> # scheduler/lct_scheduler.py (read them first; that is what trust_remote_code=True means).
        >>> from diffusers import DiffusionPipeline
        >>> pipe = DiffusionPipeline.from_pretrained("runs/lct_coco/export/ema", trust_remote_code=True)
        >>> image = pipe("a red bus on a city street", num_inference_steps=2, guidance_scale=1.2).images[0]
        ```
"""


# ----------------------------------------------------------------------------------------------
# Text: the conventions of the data's tower (lct.text / lct.hf_text), without lct
# ----------------------------------------------------------------------------------------------


def clean_prompt(text: str) -> str:
    """open_clip's caption cleaning (`open_clip.tokenizer._clean_lower`): ftfy's fix_text where ftfy
    is installed (as diffusers' pipelines use it), HTML entities twice, whitespace, lower case."""
    try:
        text = importlib.import_module("ftfy").fix_text(text)
    except ImportError:
        pass
    text = html.unescape(html.unescape(text)).strip()
    return " ".join(text.split()).strip().lower()


def clip_token_ids(tokenizer, prompts: Sequence[str]) -> torch.Tensor:
    """open_clip's token ids [B, context_length] through a CLIPTokenizer: cleaned as open_clip
    cleans, truncated to keep EOT last, padded with id 0 as open_clip pads (the tokenizer's own
    pad token is EOT, as OpenAI's CLIP tokenizer on the hub: id 0 is "!", a real token)."""
    length = tokenizer.model_max_length
    rows = tokenizer([clean_prompt(p) for p in prompts], truncation=True, max_length=length)["input_ids"]
    out = torch.zeros(len(rows), length, dtype=torch.long)
    for i, r in enumerate(rows):
        out[i, :len(r)] = torch.tensor(r, dtype=torch.long)
    return out


def encode_text(text_encoder, tokenizer, prompts: Sequence[str], device, text_kind: str = "open_clip",
                max_length: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(states [B,L,D] fp32, mask [B,L] bool, pooled [B,P] fp32) of a text encoder for `prompts`:
    lct's `OpenCLIPTextModel` (tokenizes itself), transformers' CLIP form of an open_clip tower
    (`text_kind` "open_clip": `clip_token_ids`, open_clip's mask), or a transformers tower of the
    data (`text_kind` "t5" / "clip": `lct.hf_text`'s tokenisation, mask and outputs)."""
    prompts = list(prompts)
    if hasattr(text_encoder, "tokenize"):
        states, mask, pooled = text_encoder(text_encoder.tokenize(prompts).to(device))
    elif text_kind == "open_clip":
        ids = clip_token_ids(tokenizer, prompts).to(device)
        out = text_encoder(input_ids=ids)
        states, mask, pooled = out.last_hidden_state, padding_mask(ids, tokenizer.eos_token_id), out.text_embeds
    else:
        length = int(max_length or tokenizer.model_max_length)
        ids = tokenizer(prompts, padding="max_length", max_length=length, truncation=True, add_special_tokens=True,
                        return_tensors="pt")["input_ids"].to(device)
        mask = token_mask(ids, tokenizer.eos_token_id, tokenizer.pad_token_id)
        out = text_encoder(input_ids=ids, attention_mask=mask.long() if text_kind == "t5" else None)
        states = out.last_hidden_state
        if text_kind == "clip":
            pooled = getattr(out, "text_embeds", None)
            pooled = out.pooler_output if pooled is None else pooled
        else:
            pooled = states.new_zeros(states.shape[0], 0)
    return states.float(), mask.to(torch.bool), pooled.float()


def portable(obj: Any, base: str | os.PathLike) -> Any:
    """`obj` (JSON-like) with every absolute path string rewritten relative to the folder `base`:
    an export holds no absolute path (`localize` reads them back)."""
    if isinstance(obj, dict):
        return {k: portable(v, base) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [portable(v, base) for v in obj]
    if isinstance(obj, str) and len(obj) > 1 and os.path.isabs(obj):
        return os.path.relpath(obj, os.path.abspath(base))
    return obj


def localize(obj: Any, base: str | os.PathLike) -> Any:
    """The inverse of `portable`: every relative path string that leaves `base` ("../...") or names
    an existing file or folder under it made absolute."""
    if isinstance(obj, dict):
        return {k: localize(v, base) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [localize(v, base) for v in obj]
    if isinstance(obj, str) and obj and not os.path.isabs(obj) and (
            obj.startswith(".." + os.sep) or os.path.exists(os.path.join(base, obj))):
        return os.path.normpath(os.path.abspath(os.path.join(base, obj)))
    return obj


def noise_key(seed: int, index: int) -> int:
    """The torch seed of sample `index`'s noise under `seed=`: a 63-bit hash of (purpose, seed, index)."""
    data = b"lct/sampling-noise\0" + struct.pack("<QQ", int(seed), int(index))
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little") >> 1


class LCTPipeline(DiffusionPipeline):
    """Text-to-image consistency sampling in 1, 2 or k steps with lct's `TextDiT` (module docstring).

    Components: `transformer` (`TextDiT`), `scheduler` (`LCTScheduler`), `vae` (`AutoencoderKL`,
    with SPEC 7's statistics in its config), `text_encoder` + `tokenizer` (see `encode_prompt`).
    Config: `text_kind` ("open_clip", "t5", "clip"), `text_max_length` (transformers towers),
    `vae_source` / `text_source` / `vae_latents` (components an export references instead of
    holding: lct's loader fills them in), `sizes` (a model trained on aspect-ratio buckets: the
    [height, width] image sizes it trained, most common first; `height=` / `width=` pick one, the
    first by default; absent for square models)."""

    model_cpu_offload_seq = "text_encoder->transformer->vae"
    _optional_components = ["vae", "text_encoder", "tokenizer"]
    _callback_tensor_inputs = ["latents", "prompt_embeds", "negative_prompt_embeds"]

    def __init__(self, transformer, scheduler, vae=None, text_encoder=None, tokenizer=None,
                 text_kind: str = "open_clip", text_max_length: int | None = None, vae_source: str | None = None,
                 text_source: dict | None = None, vae_latents: dict | None = None,
                 sizes: Sequence[Sequence[int]] | None = None):
        super().__init__()
        check_scheduler(scheduler)
        self.register_modules(transformer=transformer, scheduler=scheduler, vae=vae, text_encoder=text_encoder,
                              tokenizer=tokenizer)
        self.register_to_config(text_kind=text_kind, text_max_length=text_max_length, vae_source=vae_source,
                                text_source=text_source, vae_latents=vae_latents)
        if sizes:  # aspect-ratio buckets: the trained image sizes, most common first (the default)
            self.register_to_config(sizes=[[int(h), int(w)] for h, w in sizes])
        self.vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1) if getattr(vae, "config", None) else 8
        self.image_processor = VaeImageProcessor(vae_scale_factor=self.vae_scale_factor)
        # What lct's loader and exporter attach: the training record (lct_export.json) and the model
        # card (README.md), written by save_pretrained.
        self.training_record: dict | None = None
        self.model_card: str | None = None

    # ------------------------------------------------------------------ properties (diffusers' names)

    @property
    def guidance_scale(self) -> float:
        return self._guidance_scale

    @property
    def do_classifier_free_guidance(self) -> bool:
        """SPEC 9: w = 1 is off; any other w (w = 0: the unconditional branch alone) is guidance."""
        return self._guidance_scale != 1.0 and self._text_conditioned()

    @property
    def num_timesteps(self) -> int:
        return self._num_timesteps

    @property
    def interrupt(self) -> bool:
        return self._interrupt

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        """The default latents: the most common trained bucket's, or the model's square size."""
        c = self.transformer.config
        sizes = self.config.get("sizes")
        if sizes:
            return (int(c.in_channels), int(sizes[0][0]) // self.vae_scale_factor, int(sizes[0][1]) // self.vae_scale_factor)
        return (int(c.in_channels), int(c.input_height), int(c.input_width))

    def latent_shape_for(self, height: int | None, width: int | None) -> tuple[int, int, int]:
        """Latents [C, h, w] of an image of `height` x `width` (None: the default size's side);
        a size the model never trained is a one-line ValueError."""
        size = self.vae_scale_factor
        c, h, w = self.latent_shape
        height = h * size if height is None else int(height)
        width = w * size if width is None else int(width)
        sizes = self.config.get("sizes")
        if sizes:
            if [height, width] not in [list(x) for x in sizes]:
                trained = ", ".join(f"{a}x{b}" for a, b in sizes)
                raise ValueError(f"height {height}, width {width}: this model was trained at (height x width) {trained} "
                                 f"only; pass one of those (default {sizes[0][0]}x{sizes[0][1]})")
            return (c, height // size, width // size)
        if (height, width) != (h * size, w * size):
            name, value = ("height", height) if height != h * size else ("width", width)
            raise ValueError(f"{name} {value}: this model generates {w * size}x{h * size} images "
                             f"(latents {c}x{h}x{w}); leave height/width unset")
        return (c, h, w)

    def _text_conditioned(self) -> bool:
        return self.transformer is not None and self.transformer.config.cond == "text"

    # ------------------------------------------------------------------ loading and saving

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        """lct's loader, `lct.export.load_pipeline`: loads the components it knows by class, never a
        Python file from the folder, and refuses (one line) a folder whose model_index.json names
        any other module. Without lct: `DiffusionPipeline.from_pretrained(path, trust_remote_code=True)`."""
        try:
            export = importlib.import_module("lct.export")
        except ImportError:
            raise ImportError(f"LCTPipeline.from_pretrained is lct's loader ({INSTALL}); without lct, "
                              "DiffusionPipeline.from_pretrained(path, trust_remote_code=True) runs the "
                              "folder's own code") from None
        return export.load_pipeline(pretrained_model_name_or_path, **kwargs)

    def save_pretrained(self, save_directory: str | os.PathLike, safe_serialization: bool = True,
                        variant: str | None = None, max_shard_size: int | str | None = None,
                        push_to_hub: bool = False, **kwargs) -> None:
        """diffusers' folder in its community-components layout (this file at the root, each custom
        component's module in its folder, with the modules they import relatively), the model
        card `README.md` and `lct_export.json`. Referenced components stay referenced. With
        `push_to_hub`, the finished folder is uploaded (`repo_id`, `token`, `private`,
        `commit_message`, `create_pr` as diffusers takes them)."""
        hub = {k: kwargs.pop(k) for k in ("repo_id", "token", "private", "commit_message", "create_pr") if k in kwargs}
        refs = {n: getattr(self, n) for n in ("vae", "text_encoder") if getattr(self.config, _SOURCE[n]) is not None}
        if "text_encoder" in refs:
            refs["tokenizer"] = self.tokenizer
        sources = {k: self.config[k] for k in _SOURCE.values()}
        self.register_modules(**{n: None for n in refs})
        self.register_to_config(**portable(sources, save_directory))
        try:
            super().save_pretrained(save_directory, safe_serialization=safe_serialization, variant=variant,
                                    max_shard_size=max_shard_size, push_to_hub=False, **kwargs)
        finally:
            self.register_modules(**refs)
            self.register_to_config(**sources)
        d = Path(save_directory)
        index = json.loads((d / "model_index.json").read_text())
        index["_class_name"] = [Path(PIPELINE_FILE).stem, type(self).__name__]
        index.pop("_name_or_path", None)  # where it was loaded from: not part of the model
        _copy_module(type(self), d, PIPELINE_FILE)
        for name in ("transformer", "scheduler", "vae", "text_encoder", "tokenizer"):
            module = None if name in refs else getattr(self, name, None)
            if module is not None and type(module).__module__.split(".")[0] not in ("diffusers", "transformers"):
                # lct_ names: diffusers resolves a library named like one of its pipelines ("dit") there.
                src = Path(inspect.getsourcefile(type(module))).stem.removeprefix("lct_")
                index[name] = [_copy_module(type(module), d / name, f"lct_{src}.py"), type(module).__name__]
        _write_json(d / "model_index.json", index)
        for cfg_file in d.glob("*/config.json"):  # diffusers / transformers record where it was loaded from
            cfg = json.loads(cfg_file.read_text())
            if cfg.pop("_name_or_path", None) is not None:
                _write_json(cfg_file, cfg)
        tok_cfg = d / "tokenizer" / "tokenizer_config.json"
        if tok_cfg.is_file():
            cfg = json.loads(tok_cfg.read_text())
            _write_json(tok_cfg, {k: v for k, v in cfg.items()
                                  if k not in _TOKENIZER_STATE and _TOKENIZER_DEFAULTS.get(k, object()) != v})
        card, record = self.model_card, self.training_record
        src = Path(str(self.config.get("_name_or_path") or ""))
        if card is None and (src / CARD).is_file() and (src / META).is_file():  # loaded by diffusers from an export
            card, record = (src / CARD).read_text(), localize(json.loads((src / META).read_text()), src)
        if card is not None:
            (d / CARD).write_text(card)
        if record is not None:
            (d / META).write_text(json.dumps(portable(record, d), indent=1, sort_keys=True) + "\n")
        if push_to_hub:
            from huggingface_hub import HfApi

            api = HfApi(token=hub.get("token"))
            repo_id = api.create_repo(hub.get("repo_id", d.name), private=hub.get("private"), exist_ok=True).repo_id
            api.upload_folder(repo_id=repo_id, folder_path=str(d), commit_message=hub.get("commit_message")
                              or f"Upload {type(self).__name__}", create_pr=hub.get("create_pr", False))

    def push_to_hub(self, repo_id: str, commit_message: str | None = None, private: bool | None = None,
                    token: str | None = None, create_pr: bool = False, safe_serialization: bool = True,
                    variant: str | None = None, subfolder: str | None = None) -> None:
        """diffusers' `push_to_hub`, uploading the folder `save_pretrained` writes as it is (diffusers'
        own replaces the model card with its blank template)."""
        if subfolder:
            raise ValueError("LCTPipeline.push_to_hub uploads a whole pipeline folder: subfolder is not supported")
        with tempfile.TemporaryDirectory() as tmp:
            self.save_pretrained(tmp, safe_serialization=safe_serialization, variant=variant, push_to_hub=True,
                                 repo_id=repo_id, commit_message=commit_message, private=private, token=token,
                                 create_pr=create_pr)

    def enable_attention_slicing(self, slice_size: str | int | None = "auto"):
        raise NotImplementedError("LCTPipeline: attention slicing is not supported: TextDiT's attention is its own "
                                  "(SPEC 8's non-scaling LayerNorm on q and k), not diffusers' Attention processors; "
                                  "lower the batch size or use enable_xformers_memory_efficient_attention()")

    # ------------------------------------------------------------------ pieces

    def check_inputs(self, prompt, prompt_embeds, prompt_attention_mask, pooled_prompt_embeds, negative_prompt,
                     negative_prompt_embeds, negative_prompt_attention_mask, negative_pooled_prompt_embeds,
                     num_inference_steps, sigmas, guidance_scale, height, width, generator, latents, seed,
                     sample_indices, num_images_per_prompt, output_type, callback_on_step_end_tensor_inputs):
        """One-line ValueErrors for what cannot sample, before any network call."""
        check_scheduler(self.scheduler)
        if self.transformer is None:
            raise ValueError("this pipeline has no transformer")
        cond = self.transformer.config.cond
        if cond == "class":
            raise ValueError("LCTPipeline samples text-conditioned and unconditional TextDiTs, not class-conditional ones")
        if prompt is not None and prompt_embeds is not None:
            raise ValueError("pass either prompt or prompt_embeds, not both")
        if prompt is not None and not isinstance(prompt, (str, list, tuple)):
            raise ValueError(f"prompt must be a string or a list of strings, got {type(prompt).__name__}")
        if isinstance(prompt, (list, tuple)) and not prompt:
            raise ValueError("prompt is an empty list: give at least one prompt")
        if cond == "text":
            if prompt is None and prompt_embeds is None:
                raise ValueError("give a prompt or prompt_embeds")
            if prompt_embeds is not None:
                if prompt_embeds.ndim != 3 or prompt_embeds.shape[-1] != self.transformer.config.text_dim:
                    raise ValueError(f"prompt_embeds must be [batch, tokens, {self.transformer.config.text_dim}], "
                                     f"got {list(prompt_embeds.shape)}")
                if prompt_attention_mask is None:
                    raise ValueError("prompt_embeds need prompt_attention_mask (True / 1 = real token)")
                if self.transformer.config.pooled_dim > 0 and pooled_prompt_embeds is None:
                    raise ValueError(f"this model takes a pooled text vector: give pooled_prompt_embeds "
                                     f"[batch, {self.transformer.config.pooled_dim}] with prompt_embeds")
            if negative_prompt is not None and negative_prompt_embeds is not None:
                raise ValueError("pass either negative_prompt or negative_prompt_embeds, not both")
            if negative_prompt_embeds is not None:
                if prompt_embeds is not None and negative_prompt_embeds.shape != prompt_embeds.shape:
                    raise ValueError(f"negative_prompt_embeds {list(negative_prompt_embeds.shape)} and prompt_embeds "
                                     f"{list(prompt_embeds.shape)} must have the same shape")
                if negative_prompt_attention_mask is None:
                    raise ValueError("negative_prompt_embeds need negative_prompt_attention_mask")
            if prompt is None and prompt_embeds is not None and self.text_encoder is None and negative_prompt is not None:
                raise ValueError("negative_prompt needs a text encoder: give negative_prompt_embeds instead")
        if int(num_inference_steps) < 1 and sigmas is None:
            raise ValueError(f"num_inference_steps {num_inference_steps}: sampling needs at least 1 step")
        if not (guidance_scale == guidance_scale and 0 <= guidance_scale < float("inf")):
            raise ValueError(f"guidance_scale {guidance_scale}: must be a finite number >= 0 (1 = off, SPEC 9)")
        c, h, w = self.latent_shape_for(height, width)
        batch = self._batch_size(prompt, prompt_embeds) * int(num_images_per_prompt)
        if int(num_images_per_prompt) < 1:
            raise ValueError(f"num_images_per_prompt {num_images_per_prompt}: must be >= 1")
        if seed is not None and generator is not None:
            raise ValueError("pass either seed (lct's per-sample noise) or generator, not both")
        if seed is not None and not 0 <= int(seed) < 2 ** 63:
            raise ValueError(f"seed {seed}: must lie in [0, 2**63)")
        if isinstance(generator, list) and len(generator) != batch:
            raise ValueError(f"generator is a list of {len(generator)} generators for {batch} images (one per image)")
        if sample_indices is not None and len(sample_indices) != batch:
            raise ValueError(f"sample_indices has {len(sample_indices)} entries for {batch} images")
        if latents is not None and tuple(latents.shape) != (batch, c, h, w):
            raise ValueError(f"latents must be [{batch}, {c}, {h}, {w}], got {list(latents.shape)}")
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type must be one of {OUTPUT_TYPES}, got {output_type!r}")
        bad = [k for k in (callback_on_step_end_tensor_inputs or []) if k not in self._callback_tensor_inputs]
        if bad:
            raise ValueError(f"callback_on_step_end_tensor_inputs {bad}: allowed are {self._callback_tensor_inputs}")

    @staticmethod
    def _batch_size(prompt, prompt_embeds) -> int:
        if prompt_embeds is not None:
            return int(prompt_embeds.shape[0])
        if isinstance(prompt, (list, tuple)):
            return len(prompt)
        return 1

    @staticmethod
    def sample_generators(seed: int, indices: Sequence[int]) -> list[torch.Generator]:
        """lct's per-sample noise (`seed=`): one CPU generator per sample, seeded by `noise_key(seed,
        index)`; it draws the sample's initial noise and then each step's noise."""
        return [torch.Generator("cpu").manual_seed(noise_key(seed, int(i))) for i in indices]

    def _encode_text(self, prompts: list[str], device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if self.text_encoder is None:
            hint = (f" (this export references its text tower: load it with lct's loader, {INSTALL})"
                    if self.config.text_source else "")
            raise ValueError("this pipeline has no text encoder: pass prompt_embeds, prompt_attention_mask and "
                             f"pooled_prompt_embeds, or text_encoder=/tokenizer= to from_pretrained{hint}")
        return encode_text(self.text_encoder, self.tokenizer, prompts, device, self.config.text_kind,
                           self.config.text_max_length)

    @torch.no_grad()
    def encode_prompt(self, prompt: str | list[str] | None, device: torch.device | None = None,
                      num_images_per_prompt: int = 1, do_classifier_free_guidance: bool = True,
                      negative_prompt: str | list[str] | None = None, prompt_embeds: torch.Tensor | None = None,
                      negative_prompt_embeds: torch.Tensor | None = None,
                      prompt_attention_mask: torch.Tensor | None = None,
                      negative_prompt_attention_mask: torch.Tensor | None = None,
                      pooled_prompt_embeds: torch.Tensor | None = None,
                      negative_pooled_prompt_embeds: torch.Tensor | None = None):
        """The transformer's text condition.

        Returns `(prompt_embeds [B*n, L, D], prompt_attention_mask [B*n, L] bool (True = real token),
        pooled_prompt_embeds [B*n, P], negative_prompt_embeds, negative_prompt_attention_mask,
        negative_pooled_prompt_embeds)`, each prompt's rows repeated `num_images_per_prompt` (n) times
        consecutively. The negative ones are None unless guidance is on and a `negative_prompt` (or
        `negative_prompt_embeds`) is given: None means the model's learned null condition (SPEC 9)."""
        device = device or self._execution_device
        if prompt_embeds is None:
            prompts = [prompt] if isinstance(prompt, str) else list(prompt)
            prompt_embeds, prompt_attention_mask, pooled_prompt_embeds = self._encode_text(prompts, device)
        batch = prompt_embeds.shape[0]
        if prompt_attention_mask is None:
            prompt_attention_mask = torch.ones(prompt_embeds.shape[:2], dtype=torch.bool, device=prompt_embeds.device)
        if pooled_prompt_embeds is None:
            pooled_prompt_embeds = prompt_embeds.new_zeros(batch, 0)
        if do_classifier_free_guidance and negative_prompt_embeds is None and negative_prompt is not None:
            negatives = [negative_prompt] * batch if isinstance(negative_prompt, str) else list(negative_prompt)
            if len(negatives) != batch:
                raise ValueError(f"{len(negatives)} negative prompts for {batch} prompts")
            negative_prompt_embeds, negative_prompt_attention_mask, negative_pooled_prompt_embeds = \
                self._encode_text(negatives, device)
        if negative_prompt_embeds is not None:
            if negative_prompt_attention_mask is None:
                negative_prompt_attention_mask = torch.ones(negative_prompt_embeds.shape[:2], dtype=torch.bool,
                                                            device=negative_prompt_embeds.device)
            if negative_pooled_prompt_embeds is None:
                negative_pooled_prompt_embeds = negative_prompt_embeds.new_zeros(batch, pooled_prompt_embeds.shape[1])
        n = int(num_images_per_prompt)
        prompt_embeds, prompt_attention_mask, pooled_prompt_embeds, negative_prompt_embeds, \
            negative_prompt_attention_mask, negative_pooled_prompt_embeds = (
                None if t is None else t.repeat_interleave(n, dim=0).to(device)
                for t in (prompt_embeds, prompt_attention_mask, pooled_prompt_embeds, negative_prompt_embeds,
                          negative_prompt_attention_mask, negative_pooled_prompt_embeds))
        return (prompt_embeds, prompt_attention_mask, pooled_prompt_embeds, negative_prompt_embeds,
                negative_prompt_attention_mask, negative_pooled_prompt_embeds)

    def prepare_latents(self, batch: int, device, generator, latents: torch.Tensor | None,
                        shape: Sequence[int] | None = None) -> torch.Tensor:
        """sigma_max z: the unit noise z [batch, *shape] (default `latent_shape`) drawn (or `latents`)
        times the scheduler's first level."""
        if latents is None:
            latents = randn_tensor((batch, *(shape or self.latent_shape)), generator=generator, device=device,
                                   dtype=torch.float32)
        return self.scheduler.init_noise_sigma * latents.to(device=device, dtype=torch.float32)

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Images [B,3,H,W] fp32 in [-1, 1] from sampled (normalised, SPEC 7) latents, with the VAE
        config's statistics: `raw = x * latents_std / scaling_factor + latents_mean` (per channel
        or per element), or `raw = x / scaling_factor + shift_factor` without them."""
        if self.vae is None:
            hint = (f" (this export references its VAE {self.config.vae_source!r}: lct's loader fills it in, "
                    f"{INSTALL}, or pass vae=)" if self.config.vae_source else "")
            raise ValueError(f"this pipeline has no VAE: pass vae= to from_pretrained, or use output_type='latent'{hint}")
        cfg = self.vae.config
        mean, std = getattr(cfg, "latents_mean", None), getattr(cfg, "latents_std", None)
        scale = float(getattr(cfg, "scaling_factor", None) or 1.0)
        x = latents.float()
        if mean is not None and std is not None:
            shape = (1, -1, 1, 1) if len(mean) == x.shape[1] else (1, *x.shape[1:])
            mean = torch.tensor(mean, dtype=torch.float32, device=x.device).view(shape)
            std = torch.tensor(std, dtype=torch.float32, device=x.device).view(shape)
            raw = x * std / scale + mean
        else:
            raw = x / scale + float(getattr(cfg, "shift_factor", None) or 0.0)
        image = self.vae.decode(raw.to(device=self.vae.device, dtype=self.vae.dtype), return_dict=False)[0]
        return image.float().clamp(-1.0, 1.0)

    # ------------------------------------------------------------------ sampling

    @torch.no_grad()
    @replace_example_docstring(EXAMPLE_DOC_STRING)
    def __call__(self, prompt: str | list[str] | None = None, num_inference_steps: int = 1,
                 sigmas: Sequence[float] | None = None, guidance_scale: float = 1.0,
                 negative_prompt: str | list[str] | None = None, num_images_per_prompt: int = 1,
                 height: int | None = None, width: int | None = None,
                 generator: torch.Generator | list[torch.Generator] | None = None, latents: torch.Tensor | None = None,
                 prompt_embeds: torch.Tensor | None = None, prompt_attention_mask: torch.Tensor | None = None,
                 pooled_prompt_embeds: torch.Tensor | None = None, negative_prompt_embeds: torch.Tensor | None = None,
                 negative_prompt_attention_mask: torch.Tensor | None = None,
                 negative_pooled_prompt_embeds: torch.Tensor | None = None, output_type: str = "pil",
                 return_dict: bool = True, callback_on_step_end: Callable | PipelineCallback | None = None,
                 callback_on_step_end_tensor_inputs: list[str] = ["latents"], seed: int | None = None,
                 sample_indices: Sequence[int] | None = None, tau: float | Sequence[float] | None = None):
        """Generate images.

        Args:
            prompt: a caption or a list (unconditional models: only counted; default one image).
            num_inference_steps: 1, 2 or k steps at the model's levels (`scheduler.config.taus`, else
                SPEC 9's Karras levels).
            sigmas: the k levels, decreasing, the first the model's sigma_max (`scheduler.init_noise_sigma`);
                `tau`: the k - 1 intermediate ones only (an alias). Either replaces num_inference_steps.
            guidance_scale: classifier-free guidance weight w of SPEC 9 (1 = off; a consistency model
                takes only mild guidance, w close to 1). The unconditional branch is the learned null
                condition, or `negative_prompt` / `negative_prompt_embeds`.
            num_images_per_prompt: images per prompt, consecutive in the output.
            height, width: the image size: one the model trained (default: its most common bucket,
                or its square size); others are refused.
            generator, latents: diffusers' noise sources; `seed` / `sample_indices`: lct's per-sample
                noise (module docstring).
            prompt_embeds, prompt_attention_mask, pooled_prompt_embeds (and the negative_ ones): the
                text condition from `encode_prompt` (masks: True / 1 = real token).
            output_type: "pil", "np" ([B,H,W,3] in [0, 1]), "pt" ([B,3,H,W] in [0, 1]) or "latent"
                (the sampled latents, normalised as in training, SPEC 7).
            callback_on_step_end, callback_on_step_end_tensor_inputs: called after each step with the
                tensors named (of `_callback_tensor_inputs`); what it returns replaces them.

        Examples:
        """
        if isinstance(callback_on_step_end, (PipelineCallback, MultiPipelineCallbacks)):
            callback_on_step_end_tensor_inputs = callback_on_step_end.tensor_inputs
        if tau is not None:
            if sigmas is not None:
                raise ValueError("pass either sigmas or tau (the intermediate sigmas), not both")
            sigmas = [self.scheduler.init_noise_sigma, *([tau] if isinstance(tau, (int, float)) else list(tau))]
        self.check_inputs(prompt, prompt_embeds, prompt_attention_mask, pooled_prompt_embeds, negative_prompt,
                          negative_prompt_embeds, negative_prompt_attention_mask, negative_pooled_prompt_embeds,
                          num_inference_steps, sigmas, guidance_scale, height, width, generator, latents, seed,
                          sample_indices, num_images_per_prompt, output_type, callback_on_step_end_tensor_inputs)
        self._guidance_scale = float(guidance_scale)
        self._interrupt = False
        device = self._execution_device
        text = self._text_conditioned()
        batch = self._batch_size(prompt, prompt_embeds) * int(num_images_per_prompt)
        guided = self.do_classifier_free_guidance

        # 1. The levels (SPEC 9)
        self.scheduler.set_timesteps(None if sigmas is not None else int(num_inference_steps), device=device,
                                     sigmas=sigmas)
        timesteps = self.scheduler.timesteps
        self._num_timesteps = len(timesteps)

        # 2. The condition
        if text:
            (prompt_embeds, prompt_attention_mask, pooled_prompt_embeds, negative_prompt_embeds,
             negative_prompt_attention_mask, negative_pooled_prompt_embeds) = self.encode_prompt(
                prompt, device, num_images_per_prompt, guided, negative_prompt, prompt_embeds,
                negative_prompt_embeds, prompt_attention_mask, negative_prompt_attention_mask, pooled_prompt_embeds,
                negative_pooled_prompt_embeds)

        # 3. The initial noise
        if seed is not None:
            indices = range(batch) if sample_indices is None else sample_indices
            generator = self.sample_generators(int(seed), indices)
        latents = self.prepare_latents(batch, device, generator, latents, self.latent_shape_for(height, width))

        # 4. Consistency steps
        m = self.scheduler.config
        for i, t in enumerate(self.progress_bar(timesteps)):
            if self.interrupt:
                continue
            cond = self._condition(text, guided, batch, device, prompt_embeds, prompt_attention_mask,
                                   pooled_prompt_embeds, negative_prompt_embeds, negative_prompt_attention_mask,
                                   negative_pooled_prompt_embeds)
            x = torch.cat([latents, latents]) if guided else latents
            sigma = torch.full((x.shape[0],), float(self.scheduler.sigmas[i]), dtype=torch.float32, device=device)
            f = consistency_function(self.transformer, x, sigma, sigma_data=m.sigma_data, sigma_min=m.sigma_min,
                                     time_embed_scale=m.time_embed_scale, **cond)
            if guided:
                f_c, f_u = f.chunk(2)
                f = f_u + self.guidance_scale * (f_c - f_u)
            latents = self.scheduler.step(f, t, latents, generator=generator, return_dict=False)[0]
            if callback_on_step_end is not None:
                callback_kwargs = {}
                for k in callback_on_step_end_tensor_inputs:
                    callback_kwargs[k] = locals()[k]
                callback_outputs = callback_on_step_end(self, i, t, callback_kwargs)
                latents = callback_outputs.pop("latents", latents)
                prompt_embeds = callback_outputs.pop("prompt_embeds", prompt_embeds)
                negative_prompt_embeds = callback_outputs.pop("negative_prompt_embeds", negative_prompt_embeds)

        # 5. Decoding (SPEC 7)
        latents = latents.float()
        if output_type == "latent":
            image = latents
        else:
            image = self.image_processor.postprocess(self.decode_latents(latents), output_type=output_type)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (image,)
        return ImagePipelineOutput(images=image)

    @staticmethod
    def _condition(text: bool, guided: bool, batch: int, device, prompt_embeds, prompt_attention_mask,
                   pooled_prompt_embeds, negative_prompt_embeds, negative_prompt_attention_mask,
                   negative_pooled_prompt_embeds) -> dict:
        """The transformer's condition keywords for the (guided: [conditional; unconditional]) batch;
        unconditional rows without negative embeds take the learned null condition (`cond_drop`)."""
        drop = torch.zeros(batch, dtype=torch.bool, device=device)
        if not text:
            return {}
        cond = {"text_states": prompt_embeds, "text_mask": prompt_attention_mask, "pooled": pooled_prompt_embeds}
        if not guided:
            return {**cond, "cond_drop": drop}
        if negative_prompt_embeds is None:  # SPEC 9: the learned null condition
            uncond, null = cond, torch.ones_like(drop)
        else:
            uncond = {"text_states": negative_prompt_embeds, "text_mask": negative_prompt_attention_mask,
                      "pooled": negative_pooled_prompt_embeds}
            null = drop
        return {**{k: torch.cat([v, uncond[k].to(v.dtype)]) for k, v in cond.items()},
                "cond_drop": torch.cat([drop, null])}


_SOURCE = {"vae": "vae_source", "text_encoder": "text_source"}


def check_scheduler(scheduler) -> None:
    """A foreign scheduler is refused: it cannot sample a consistency model."""
    if scheduler is not None and type(scheduler).__name__ != SCHEDULER_CLASS:
        raise ValueError(f"LCTPipeline samples with {SCHEDULER_CLASS} only, not {type(scheduler).__name__}: the "
                         "transformer is a consistency function whose every step denoises in one evaluation and "
                         "re-noises to the next level (SPEC 9), while diffusion schedulers integrate an ODE/SDE "
                         "from noise predictions this model does not make")


def _copy_module(cls: type, folder: Path, name: str | None = None) -> str:
    """Copy the source file of `cls` into `folder` (as `name`), with the files it imports relatively
    (what diffusers' dynamic-module loader copies); returns the module name."""
    src = Path(inspect.getsourcefile(cls))
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / (name or src.name)
    shutil.copyfile(src, target)
    for rel in get_relative_imports(str(src)):
        shutil.copyfile(src.parent / f"{rel}.py", folder / f"{rel}.py")
    return target.stem


def _write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n")
