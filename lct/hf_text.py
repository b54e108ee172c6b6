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
from torch import nn

from lct.errors import UserError
from lct.tokens import PROBE, token_mask

# kind -> transformers classes by architecture name (first = default), and how the tower is run.
KINDS: dict[str, dict[str, Any]] = {
    "t5": {"model_types": ("t5", "mt5", "umt5"), "classes": ("T5EncoderModel",), "pass_mask": True},
    "clip": {"model_types": ("clip_text_model", "clip"),
             "classes": ("CLIPTextModel", "CLIPTextModelWithProjection"), "pass_mask": False},
}
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
             device: str | torch.device = "cpu", dtype: str = "fp32", key: str = _KEY) -> "HFTextEncoder":
        """The tower of `model` (folder or hub id; `text_encoder/` of a pipeline is found), its
        tokenizer from `tokenizer` or beside the model. Errors name `key` (and `text.tokenizer`)."""
        from lct.hub import resolve_pretrained

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
        kind = kind_of(config)
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
        if max_length is None:
            max_length = int(getattr(tok, "model_max_length", 0) or 0)
            if not 0 < max_length <= 8192:
                raise UserError("text.max_length: the tokenizer gives no usable model_max_length; set it "
                                "(PixArt-alpha 120, PixArt-Sigma 300)")
        if kind == "clip" and max_length > config.max_position_embeddings:
            raise UserError(f"text.max_length {max_length} exceeds the CLIP tower's "
                            f"{config.max_position_embeddings} positions")
        enc = cls(net, tok, max_length, source=src.record(), tokenizer_source=tok_src.record(), dtype=dtype)
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
        if t.get("kind") not in KINDS:
            raise UserError(f"the data's manifest records text kind {t.get('kind')!r}, not a transformers tower")
        override = model or (pretrained if pretrained and str(pretrained).lower() != "random" else None)
        source = override or (t.get("source") or {}).get("id")
        tok = None if override else (t.get("tokenizer_source") or {}).get("id")
        if not source:
            raise UserError("the data's manifest records no text model; set text.model")
        enc = cls.load(source, tokenizer=tok, max_length=int(t["context_length"]), device=device,
                       dtype=dtype or t.get("dtype", "fp32"))
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
    return (text_record or {}).get("kind", "open_clip") in KINDS


