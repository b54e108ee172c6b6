"""Text towers from transformers (`T5EncoderModel`, `CLIPTextModel`), with the interface of
`lct.text.TextEncoder` (the open_clip tower):

    enc = HFTextEncoder.load("PixArt-alpha/PixArt-Sigma-XL-2-1024-MS", max_length=300, device="cuda",
                             dtype="bf16")
    tokens = enc.tokenize(["a cat", "a dog"])          # LongTensor [B, L] (L = max_length)
    states, mask, pooled = enc(tokens)                 # [B,L,D] fp32, [B,L] bool, [B,P] fp32 (P may be 0)

- kind `t5`: `T5EncoderModel`; `states` = `last_hidden_state` (after T5's final RMS norm), computed
  with the tokenizer's attention mask, as diffusers' PixArt pipelines do. T5 has no pooled output:
  `pooled` is an empty [B, 0] tensor and `pooled_dim` is 0 (a TextDiT built with pooled_dim 0 has
  no pooled embedder; PixArt ignores `pooled`).
- kind `clip`: `CLIPTextModel` (`pooled` = `pooler_output`, the EOS state after the final norm) or
  `CLIPTextModelWithProjection` (`pooled` = `text_embeds`), run without an attention mask, as
  diffusers' Stable Diffusion pipelines run it (its causal attention keeps the real tokens' states
  independent of the padding anyway).
- `mask` is True for real tokens (the caption's tokens and the EOS token `</s>` / `<|endoftext|>`),
  False for padding: `tokens != pad_id`, or, where the pad token is the EOS token (CLIP), up to and
  including the first EOS. It equals the tokenizer's `attention_mask` for right padding.

Tokenisation: `padding="max_length"`, `truncation=True`, special tokens added, captions as given
(no lower-casing; diffusers' PixArt pipelines lower-case or clean prompts at inference). `max_length`
is a setting (PixArt-alpha 120, PixArt-Sigma 300); it defaults to the tokenizer's `model_max_length`.

Sources: a local folder written by `save_pretrained`, or a hub id (`lct.hub`: cache first, one-line
errors offline): the model in the folder itself or in `text_encoder/` (a diffusers pipeline), the
tokenizer beside it or in `tokenizer/` (or `tokenizer=` another source). T5 checkpoints that ship
only `spiece.model` need `sentencepiece` and `protobuf` to build the fast tokenizer (dependencies).

`dtype` is the tower's compute dtype ("fp32", "bf16", "fp16"; T5 v1.1 overflows in fp16 except
for the layers transformers keeps in fp32); outputs are always fp32. Storage precision of the
states in the shards is the data prep's choice.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from lct.errors import UserError
from lct.tokens import PROBE, token_mask

# kind -> transformers classes by architecture name (first = default), and how the tower is run.
KINDS: dict[str, dict[str, Any]] = {
    "t5": {"model_types": ("t5", "mt5", "umt5"), "classes": ("T5EncoderModel",), "pass_mask": True},
    "clip": {"model_types": ("clip_text_model", "clip"),
             "classes": ("CLIPTextModel", "CLIPTextModelWithProjection"), "pass_mask": False},
    # Sana's Gemma-2 decoder (`Gemma2Model`, the pipeline's text_encoder), run with the attention mask.
    "gemma": {"model_types": ("gemma2",), "classes": ("Gemma2Model",), "pass_mask": True},
}
# Towers of several models, loaded from a pipeline folder by kind (not inferred from one config).
MULTI_KINDS = ("sd3",)
DEFAULT_MAX_LENGTH = {"gemma": 300}  # Sana's max_sequence_length (its tokenizer's model_max_length is unbounded)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
_KEY = "text.model"


def _short(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return (text[0] if text else type(err).__name__)[:200]


def kind_of(config) -> str:
    """The tower kind of a transformers config (T5 or CLIP text), else a UserError."""
    model_type = getattr(config, "model_type", None)
    for kind, spec in KINDS.items():
        if model_type in spec["model_types"]:
            return kind
    raise UserError(f"{_KEY}: a {model_type!r} model is not a supported text tower (T5 encoder or CLIP text model)")


@contextlib.contextmanager
def _no_progress_bars():
    """transformers' "Loading weights" bars are noise in data-prep and trainer logs."""
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            hf_logging.enable_progress_bar()


class HFTokenizer:
    """open_clip's tokenizer call convention around a transformers tokenizer:
    `tok(captions) -> LongTensor [B, max_length]` (picklable, for data-loader workers)."""

    def __init__(self, tokenizer, max_length: int):
        self.tokenizer, self.context_length = tokenizer, int(max_length)

    def __call__(self, captions: Sequence[str] | str) -> torch.Tensor:
        captions = [captions] if isinstance(captions, str) else list(captions)
        out = self.tokenizer(captions, padding="max_length", max_length=self.context_length, truncation=True,
                             add_special_tokens=True, return_tensors="pt")
        return out["input_ids"].long()


class HFTextEncoder(nn.Module):
    """A frozen transformers text tower (see the module docstring). Build with `load` or
    `from_manifest`; call with token ids from `tokenize`."""

    def __init__(self, model: nn.Module, tokenizer, max_length: int, *, source: dict, tokenizer_source: dict,
                 dtype: str = "fp32"):
        super().__init__()
        self.kind = kind_of(model.config)
        self.pass_mask = KINDS[self.kind]["pass_mask"]
        self.model = model
        self.hf_tokenizer = tokenizer
        self.tokenizer = HFTokenizer(tokenizer, max_length)
        self.context_length = int(max_length)
        self.source, self.tokenizer_source, self.dtype = source, tokenizer_source, dtype
        self.eot_id, self.pad_id = tokenizer.eos_token_id, tokenizer.pad_token_id
        if self.pad_id is None:
            raise UserError(f"{_KEY}: the tokenizer has no pad token; a fixed-length batch needs one")
        self.requires_grad_(False)
        super().train(False)
        with torch.no_grad():
            states, _, pooled = self(self.tokenize([PROBE]))
        self.state_dim, self.pooled_dim = int(states.shape[-1]), int(pooled.shape[-1])

    # ------------------------------------------------------------------ construction

    @classmethod
    def load(cls, model: str, *, tokenizer: str | None = None, max_length: int | None = None,
             device: str | torch.device = "cpu", dtype: str = "fp32", key: str = _KEY, kind: str | None = None,
             instruction: Sequence[str] | None = None) -> "HFTextEncoder":
        """The tower of `model` (folder or hub id; `text_encoder/` of a pipeline is found), its
        tokenizer from `tokenizer` or beside the model. Errors name `key` (and `text.tokenizer`).
        `kind` (default: the model's own) must match the model; `sd3` loads the three towers of an
        SD3 pipeline (`SD3TextEncoder`). `instruction` (kind gemma): Sana's prompt template lines
        (default `SANA_INSTRUCTION`, [] for none)."""
        from lct.hub import resolve_pretrained

        if kind in MULTI_KINDS:
            return SD3TextEncoder.load(model, max_length=max_length, device=device, dtype=dtype, key=key)
        if dtype not in DTYPES:
            raise UserError(f"text.dtype {dtype!r}: expected one of {', '.join(DTYPES)}")
        src = resolve_pretrained(model, key=key, subfolders=("", "text_encoder"), what="text encoder")
        tok_key = "text.tokenizer" if tokenizer else key
        tok_src = resolve_pretrained(tokenizer or model, key=tok_key, subfolders=("", "tokenizer"),
                                     config_name="tokenizer_config.json", what="tokenizer")
        import transformers

        try:
            config = transformers.AutoConfig.from_pretrained(src.name, **src.kwargs)
        except Exception as err:
            raise UserError(f"{key} {model}: could not read the text encoder's config ({_short(err)})") from None
        found = kind_of(config)
        if kind is not None and kind != found:
            raise UserError(f"{key} {model}: holds a {found} text tower, not text kind {kind}")
        kind = found
        names = KINDS[kind]["classes"]
        arch = next((a for a in (getattr(config, "architectures", None) or []) if a in names), names[0])
        try:
            with _no_progress_bars():
                net = getattr(transformers, arch).from_pretrained(src.name, dtype=DTYPES[dtype], **src.kwargs)
        except Exception as err:  # missing or partial weights
            raise UserError(f"{key} {model}: could not load the {arch} weights ({_short(err)}); set {key} to a "
                            "folder written by save_pretrained") from None
        try:
            tok = transformers.AutoTokenizer.from_pretrained(tok_src.name, **tok_src.kwargs)
        except Exception as err:
            raise UserError(f"{tok_key} {tokenizer or model}: could not load the tokenizer ({_short(err)})") from None
        if max_length is None and kind in DEFAULT_MAX_LENGTH:
            max_length = DEFAULT_MAX_LENGTH[kind]
        if max_length is None:
            max_length = int(getattr(tok, "model_max_length", 0) or 0)
            if not 0 < max_length <= 8192:
                raise UserError("text.max_length: the tokenizer gives no usable model_max_length; set it "
                                "(PixArt-alpha 120, PixArt-Sigma 300)")
        if kind == "clip" and max_length > config.max_position_embeddings:
            raise UserError(f"text.max_length {max_length} exceeds the CLIP tower's "
                            f"{config.max_position_embeddings} positions")
        target, extra = (GemmaTextEncoder, {"instruction": instruction}) if kind == "gemma" else (HFTextEncoder, {})
        enc = target(net, tok, max_length, source=src.record(), tokenizer_source=tok_src.record(), dtype=dtype, **extra)
        return enc.to(device)

    @classmethod
    def from_manifest(cls, manifest: dict | str | os.PathLike, device: str | torch.device = "cpu",
                      model: str | None = None, pretrained: str | None = None, dtype: str | None = None
                      ) -> "HFTextEncoder":
        """The tower a latent data set was made with (its manifest's "text" record, kind t5/clip).
        `model` replaces the recorded source (e.g. a local copy; `pretrained` is the same for HF
        towers, whose weights live beside their config). The tokenizer must give the recorded
        identity."""
        if not isinstance(manifest, dict):
            from lct.latents import load_manifest

            manifest = load_manifest(manifest)
        t = manifest.get("text") or {}
        if not is_hf_record(t):
            raise UserError(f"the data's manifest records text kind {t.get('kind')!r}, not a transformers tower")
        override = model or (pretrained if pretrained and str(pretrained).lower() != "random" else None)
        source = override or (t.get("source") or {}).get("id")
        tok = None if override else (t.get("tokenizer_source") or {}).get("id")
        if not source:
            raise UserError("the data's manifest records no text model; set text.model")
        length = int(t["t5_length"]) if t["kind"] == "sd3" else int(t["context_length"])
        enc = cls.load(source, tokenizer=tok, max_length=length, device=device, dtype=dtype or t.get("dtype", "fp32"),
                       kind=t["kind"], instruction=t.get("instruction"))
        want = t.get("tokenizer")
        if want and enc.identity() != want:
            raise UserError(f"text.model {source}: its tokenizer differs from the one the shards were tokenised "
                            f"with ({enc.identity()} vs manifest {want})")
        return enc

    # ------------------------------------------------------------------ use

    def train(self, mode: bool = True) -> "HFTextEncoder":  # frozen: always eval
        return super().train(False)

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def tokenize(self, captions: Sequence[str] | str) -> torch.Tensor:
        """Token ids, LongTensor [B, max_length] on the CPU."""
        return self.tokenizer(captions)

    def mask(self, tokens: torch.Tensor) -> torch.Tensor:
        """Padding mask of token ids (True = real token), per this tokenizer (see the module docstring)."""
        return token_mask(tokens, self.eot_id, self.pad_id)

    def forward(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(states [B,L,D] fp32, mask [B,L] bool, pooled [B,P] fp32, P = 0 for T5) of token ids [B,L]."""
        tokens = torch.as_tensor(tokens).to(self.device, torch.long)
        mask = self.mask(tokens)
        with torch.no_grad():
            out = self.model(input_ids=tokens, attention_mask=mask.long() if self.pass_mask else None)
        states = out.last_hidden_state.float()
        if self.kind == "clip":
            pooled = getattr(out, "text_embeds", None)
            pooled = out.pooler_output if pooled is None else pooled
            pooled = pooled.float()
        else:
            pooled = states.new_zeros(states.shape[0], 0)
        return states, mask, pooled

    @torch.no_grad()
    def encode(self, captions: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self(self.tokenize(captions))

    def null_condition(self) -> torch.Tensor:
        """The empty caption's token states at its real tokens, [L0, D] fp32 on the CPU (T5: L0 = 1,
        the `</s>` state): the initial learned null condition of a PixArt network (SPEC 14.5)."""
        states, mask, _ = self.encode([""])
        return states[0][mask[0]].cpu()

    def identity(self) -> dict:
        """JSON-ready tokenizer identity (class, context length, vocab size, EOS and pad ids, probe hash)."""
        tok = self.hf_tokenizer
        ids = self.tokenize([PROBE])[0].tolist()
        return {"class": f"{type(tok).__module__}.{type(tok).__name__}", "context_length": self.context_length,
                "vocab_size": len(tok), "eot_id": self.eot_id, "pad_id": self.pad_id,
                "probe_sha256": hashlib.sha256(json.dumps(ids).encode()).hexdigest()}

    def record(self, manifest_dir: str | os.PathLike | None = None) -> dict:
        """The manifest's "text" section (data prep adds its own keys); `kind` selects this class in
        `lct.text.TextEncoder.from_manifest`."""
        cfg = {k: v for k, v in self.model.config.to_dict().items() if not k.startswith("_")}
        return {"kind": self.kind, "model": self.source["id"], "pretrained": self.source["id"],
                "source": self.source, "tokenizer_source": self.tokenizer_source,
                "model_type": self.model.config.model_type, "architecture": type(self.model).__name__,
                "config_sha256": hashlib.sha256(json.dumps(cfg, sort_keys=True, default=str).encode()).hexdigest(),
                "dtype": self.dtype, "random_seed": None, "tokenizer": self.identity(),
                "context_length": self.context_length, "state_dim": self.state_dim, "pooled_dim": self.pooled_dim}


def is_hf_record(text_record: dict | None) -> bool:
    """Whether a manifest's "text" record is a transformers tower (records without `kind` are open_clip)."""
    return (text_record or {}).get("kind", "open_clip") in (*KINDS, *MULTI_KINDS)




# ----------------------------------------------------------------------------------------------
# Sana: Gemma-2 with Sana's prompt template (SPEC 15.3)
# ----------------------------------------------------------------------------------------------

# The "complex human instruction" diffusers' SanaPipeline prepends by default (its __call__); Sana's
# training configs (configs/sana_config/*.yaml, text_encoder.chi_prompt) write the same lines with
# "Enhanced prompt" in double quotes, the pipeline in single quotes. lct records the lines it used.
SANA_INSTRUCTION: tuple[str, ...] = (
    "Given a user prompt, generate an 'Enhanced prompt' that provides detailed visual descriptions suitable for image generation. Evaluate the level of detail in the user prompt:",  # noqa: E501
    "- If the prompt is simple, focus on adding specifics about colors, shapes, sizes, textures, and spatial relationships to create vivid and concrete scenes.",  # noqa: E501
    "- If the prompt is already detailed, refine and enhance the existing details slightly without overcomplicating.",
    "Here are examples of how to transform or refine prompts:",
    "- User Prompt: A cat sleeping -> Enhanced: A small, fluffy white cat curled up in a round shape, sleeping peacefully on a warm sunny windowsill, surrounded by pots of blooming red flowers.",  # noqa: E501
    "- User Prompt: A busy city street -> Enhanced: A bustling city street scene at dusk, featuring glowing street lamps, a diverse crowd of people in colorful clothing, and a double-decker bus passing by towering glass skyscrapers.",  # noqa: E501
    "Please generate only the enhanced description for the prompt below and avoid including any additional commentary or evaluations:",  # noqa: E501
    "User Prompt: ",
)


class GemmaTextEncoder(HFTextEncoder):
    """Sana's text condition (`SanaPipeline.encode_prompt`): the caption behind the instruction
    `chi = "\\n".join(instruction)`, tokenised to `N + L - 2` positions (N = the instruction's own
    token count with <bos>, L = max_length), Gemma-2 run with the attention mask, and the states of
    positions `[0] + [N - 1, ..., N + L - 3]` kept: <bos> and the L - 1 positions after the
    instruction's first N - 1 tokens.

    Token ids are those L kept positions ([B, L], padding mask `ids != pad`, so the states trim
    like T5's); the model input is rebuilt as `chi_ids[:N-1] + ids[1:]`, exact whenever the
    caption does not change how the instruction's first N - 1 tokens are split (`tokenize` checks
    each caption and refuses one that does). The null condition is the pipeline's negative
    prompt: "" without the instruction, <bos> alone (its state equals every caption's position 0)."""

    def __init__(self, model: nn.Module, tokenizer, max_length: int, *, source: dict, tokenizer_source: dict,
                 dtype: str = "fp32", instruction: Sequence[str] | None = None):
        lines = tuple(SANA_INSTRUCTION if instruction is None else instruction)
        tokenizer.padding_side = "right"
        self.instruction = lines
        if lines:
            chi_ids = tokenizer.encode("\n".join(lines))
            if len(chi_ids) < 2 or chi_ids[0] != tokenizer.bos_token_id:
                raise UserError(f"{_KEY}: the tokenizer does not start the instruction with <bos>; not a Gemma tokenizer")
            self.prefix_ids = torch.tensor(chi_ids[:-1], dtype=torch.long)
        else:
            self.prefix_ids = torch.zeros(0, dtype=torch.long)
        super().__init__(model, tokenizer, max_length, source=source, tokenizer_source=tokenizer_source, dtype=dtype)

    def tokenize(self, captions: Sequence[str] | str) -> torch.Tensor:
        captions = [captions] if isinstance(captions, str) else list(captions)
        n0, length = self.prefix_ids.numel(), self.context_length
        if not n0:
            return self.tokenizer(captions)
        chi = "\n".join(self.instruction)
        full = self.hf_tokenizer([chi + c for c in captions], padding="max_length", max_length=n0 + length - 1,
                                 truncation=True, add_special_tokens=True, return_tensors="pt")["input_ids"].long()
        bad = (full[:, :n0] != self.prefix_ids).any(dim=1)
        if bad.any():
            raise UserError(f"caption {captions[int(bad.nonzero()[0, 0])][:80]!r} changes how Sana's instruction is "
                            "tokenised before its last token; its states cannot be stored as the pipeline computes them")
        return torch.cat([full[:, :1], full[:, n0:]], dim=1)

    def forward(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        tokens = torch.as_tensor(tokens).to(self.device, torch.long)
        mask = self.mask(tokens)
        n0 = self.prefix_ids.numel()
        full = torch.cat([self.prefix_ids.to(tokens.device).expand(tokens.shape[0], -1), tokens[:, 1:]], 1) if n0 else tokens
        with torch.no_grad():
            out = self.model(input_ids=full, attention_mask=(full != self.pad_id).long())
        states = out.last_hidden_state
        if n0:
            states = torch.cat([states[:, :1], states[:, n0:]], dim=1)
        return states.float(), mask, states.new_zeros(states.shape[0], 0).float()

    def null_condition(self) -> torch.Tensor:
        """The pipeline's default negative prompt, "" without the instruction: the <bos> state [1, D]."""
        ids = self.tokenizer([""]).to(self.device)
        mask = self.mask(ids)
        with torch.no_grad():
            states = self.model(input_ids=ids, attention_mask=mask.long()).last_hidden_state.float()
        return states[0][mask[0].to(states.device)].cpu()

    def record(self, manifest_dir: str | os.PathLike | None = None) -> dict:
        return {**super().record(manifest_dir), "instruction": list(self.instruction), "template": "sana"}


# ----------------------------------------------------------------------------------------------
# Stable Diffusion 3: CLIP-L + CLIP-G + T5-XXL (SPEC 15.3)
# ----------------------------------------------------------------------------------------------


def _clip_ids(tok, captions, length: int) -> torch.Tensor:
    return tok(captions, padding="max_length", max_length=length, truncation=True, return_tensors="pt")["input_ids"].long()


class SD3Tokenizer:
    """SD3's token ids of captions, [B, 77 + L]: CLIP-L's ids, then T5's (padding max_length,
    truncation, special tokens). A plain object (the tokenizers alone): the data workers get a copy."""

    def __init__(self, tok_l, tok_t5, clip_length: int, t5_length: int):
        self.tok_l, self.tok_t5, self.clip_length, self.t5_length = tok_l, tok_t5, int(clip_length), int(t5_length)

    def __call__(self, captions: Sequence[str] | str) -> torch.Tensor:
        captions = [captions] if isinstance(captions, str) else list(captions)
        t5 = self.tok_t5(captions, padding="max_length", max_length=self.t5_length, truncation=True,
                         add_special_tokens=True, return_tensors="pt")["input_ids"].long()
        return torch.cat([_clip_ids(self.tok_l, captions, self.clip_length), t5], dim=1)


class SD3TextEncoder(nn.Module):
    """SD3's text condition (`StableDiffusion3Pipeline.encode_prompt`, clip_skip None), with the
    interface of `HFTextEncoder`:

    - CLIP-L and CLIP-G (`CLIPTextModelWithProjection`, 77 tokens, run without a mask): the
      penultimate hidden states side by side [B, 77, 768 + 1280], zero-padded to T5's width, and
      `pooled` = their `text_embeds` side by side [B, 2048];
    - T5-XXL (`T5EncoderModel`, `max_length` tokens, default 256 as the pipeline, run without a
      mask): `last_hidden_state` [B, L, 4096];
    - states = CLIP then T5 along the sequence [B, 77 + L, 4096]. No position is padding for the
      MMDiT (it attends to all of them): `mask` is all True and the states are not trimmed.

    Token ids [B, 77 + L]: the CLIP-L ids then the T5 ids. The CLIP-G ids are the CLIP-L ids with
    the padding after the first end-of-text replaced by CLIP-G's pad token ("!"), which `load`
    checks against CLIP-G's own tokenizer. The null condition is "" through all three (the
    pipeline's default negative prompt): `null_condition()` [77 + L, 4096], `null_pooled()` [2048]."""

    kind = "sd3"
    pass_mask = False

    def __init__(self, clip_l: nn.Module, clip_g: nn.Module, t5: nn.Module, tokenizers: Sequence, max_length: int, *,
                 source: dict, dtype: str = "fp32"):
        super().__init__()
        self.clip_l, self.clip_g, self.t5 = clip_l, clip_g, t5
        self.tok_l, self.tok_g, self.tok_t5 = tokenizers
        self.clip_length = int(self.tok_l.model_max_length)
        if not 0 < self.clip_length <= clip_l.config.max_position_embeddings:
            raise UserError(f"{_KEY}: the CLIP tokenizer's model_max_length {self.clip_length} does not fit the tower")
        self.t5_length = int(max_length)
        self.context_length = self.clip_length + self.t5_length
        self.source, self.dtype = source, dtype
        self.eot_id, self.pad_id = self.tok_l.eos_token_id, None  # mask: every position (see the docstring)
        self.tokenizer = SD3Tokenizer(self.tok_l, self.tok_t5, self.clip_length, self.t5_length)
        self.pad_g = self.tok_g.pad_token_id
        probe = self._clip_ids(self.tok_l, [PROBE])
        if not torch.equal(self._g_ids(probe), self._clip_ids(self.tok_g, [PROBE])):
            raise UserError(f"{_KEY}: the pipeline's tokenizer_2 splits text differently from tokenizer (not SD3's "
                            "CLIP-L / CLIP-G pair)")
        self.requires_grad_(False)
        super().train(False)
        with torch.no_grad():
            states, _, pooled = self(self.tokenize([PROBE]))
        self.state_dim, self.pooled_dim = int(states.shape[-1]), int(pooled.shape[-1])

    @classmethod
    def load(cls, model: str, *, max_length: int | None = None, device: str | torch.device = "cpu",
             dtype: str = "fp32", key: str = _KEY) -> "SD3TextEncoder":
        """The towers of an SD3 pipeline `model` (folder or hub id): text_encoder/ (CLIP-L),
        text_encoder_2/ (CLIP-G), text_encoder_3/ (T5-XXL) and tokenizer/, tokenizer_2/, tokenizer_3/."""
        from lct.hub import resolve_pretrained

        if dtype not in DTYPES:
            raise UserError(f"text.dtype {dtype!r}: expected one of {', '.join(DTYPES)}")
        import transformers

        parts, toks, records = [], [], {}
        for i, (arch, sub) in enumerate((("CLIPTextModelWithProjection", "text_encoder"),
                                         ("CLIPTextModelWithProjection", "text_encoder_2"),
                                         ("T5EncoderModel", "text_encoder_3"))):
            src = resolve_pretrained(model, key=key, subfolders=(sub,), what=f"SD3 text encoder {sub}/")
            tsub = sub.replace("text_encoder", "tokenizer")
            tsrc = resolve_pretrained(model, key=key, subfolders=(tsub,), config_name="tokenizer_config.json",
                                      what=f"SD3 tokenizer {tsub}/")
            try:
                with _no_progress_bars():
                    parts.append(getattr(transformers, arch).from_pretrained(src.name, dtype=DTYPES[dtype], **src.kwargs))
            except Exception as err:
                raise UserError(f"{key} {model}: could not load the {arch} of {sub}/ ({_short(err)}); set {key} to an "
                                "SD3 pipeline folder written by save_pretrained") from None
            try:
                toks.append(transformers.AutoTokenizer.from_pretrained(tsrc.name, **tsrc.kwargs))
            except Exception as err:
                raise UserError(f"{key} {model}: could not load {tsub}/ ({_short(err)})") from None
            records[sub] = src.record()
        source = {**records["text_encoder"], "components": records}
        return cls(*parts, toks, 256 if max_length is None else max_length, source=source, dtype=dtype).to(device)

    # ------------------------------------------------------------------ use

    def train(self, mode: bool = True) -> "SD3TextEncoder":  # frozen: always eval
        return super().train(False)

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def _clip_ids(self, tok, captions) -> torch.Tensor:
        return _clip_ids(tok, captions, self.clip_length)

    def _g_ids(self, ids_l: torch.Tensor) -> torch.Tensor:
        """CLIP-G's ids from CLIP-L's: the same up to the first end-of-text, CLIP-G's pad after it."""
        return torch.where(token_mask(ids_l, self.eot_id, self.eot_id), ids_l, torch.full_like(ids_l, self.pad_g))

    def tokenize(self, captions: Sequence[str] | str) -> torch.Tensor:
        """[B, 77 + L]: CLIP-L ids, then T5 ids (padding max_length, truncation, special tokens)."""
        return self.tokenizer(captions)

    def mask(self, tokens: torch.Tensor) -> torch.Tensor:
        """All True: the MMDiT attends to every position."""
        return torch.ones(tokens.shape, dtype=torch.bool, device=torch.as_tensor(tokens).device)

    def forward(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        tokens = torch.as_tensor(tokens).to(self.device, torch.long)
        ids_l, ids_t5 = tokens[:, : self.clip_length], tokens[:, self.clip_length:]
        with torch.no_grad():
            states, pooled = [], []
            for enc, ids in ((self.clip_l, ids_l), (self.clip_g, self._g_ids(ids_l))):
                out = enc(input_ids=ids, output_hidden_states=True)
                states.append(out.hidden_states[-2].float())
                pooled.append(out.text_embeds.float())
            t5 = self.t5(input_ids=ids_t5).last_hidden_state.float()
        clip = F.pad(torch.cat(states, dim=-1), (0, t5.shape[-1] - sum(s.shape[-1] for s in states)))
        return torch.cat([clip, t5], dim=1), self.mask(tokens), torch.cat(pooled, dim=-1)

    @torch.no_grad()
    def encode(self, captions: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self(self.tokenize(captions))

    def null_condition(self) -> torch.Tensor:
        """The empty caption's states at every position [77 + L, D] fp32 on the CPU (SPEC 15.5)."""
        return self.encode([""])[0][0].cpu()

    def null_pooled(self) -> torch.Tensor:
        """The empty caption's pooled vector [2048] fp32 on the CPU."""
        return self.encode([""])[2][0].cpu()

    def identity(self) -> dict:
        ids = self.tokenize([PROBE])[0].tolist()
        return {"class": "lct.hf_text.SD3TextEncoder", "context_length": self.context_length,
                "clip_length": self.clip_length, "t5_length": self.t5_length,
                "vocab_size": [len(self.tok_l), len(self.tok_t5)], "eot_id": self.eot_id, "pad_id": None,
                "probe_sha256": hashlib.sha256(json.dumps(ids).encode()).hexdigest()}

    def record(self, manifest_dir: str | os.PathLike | None = None) -> dict:
        cfgs = {n: {k: v for k, v in m.config.to_dict().items() if not k.startswith("_")}
                for n, m in (("clip_l", self.clip_l), ("clip_g", self.clip_g), ("t5", self.t5))}
        return {"kind": "sd3", "model": self.source["id"], "pretrained": self.source["id"], "source": self.source,
                "tokenizer_source": None, "model_type": "sd3", "architecture": "SD3TextEncoder",
                "config_sha256": hashlib.sha256(json.dumps(cfgs, sort_keys=True, default=str).encode()).hexdigest(),
                "dtype": self.dtype, "random_seed": None, "tokenizer": self.identity(),
                "context_length": self.context_length, "clip_length": self.clip_length, "t5_length": self.t5_length,
                "state_dim": self.state_dim, "pooled_dim": self.pooled_dim}

    from_manifest = HFTextEncoder.from_manifest
