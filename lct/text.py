"""The frozen open_clip text tower: token ids, token states, padding mask and pooled feature.

    enc = TextEncoder.load("ViT-B-32", "laion2b_s34b_b79k", device="cuda")
    tokens = enc.tokenize(["a cat", "a dog"])          # LongTensor [B, L] (L = context length)
    states, mask, pooled = enc(tokens)                 # [B,L,D] fp32, [B,L] bool, [B,P] fp32

- `states` are the token states after the text transformer's final LayerNorm (`ln_final`), for
  every position (the network masks them with `mask`).
- `mask` is True for real tokens: SOT, the caption's tokens and the EOT token; False for the
  padding after EOT (`padding_mask`).
- `pooled` is what open_clip's `encode_text(tokens)` returns: the EOT state projected by
  `text_projection`, unnormalised.

Both open_clip layouts work: `CLIP` (text tower inlined: `token_embedding`, `transformer`,
`ln_final`, `text_projection` on the model) and `CustomTextCLIP` (`model.text`, a
`TextTransformer`, or an HF text encoder whose token count matches the tokenizer's). The vision
tower is dropped after creation. The tower is frozen: no gradients, always in eval mode.

Model names: an open_clip model name (`ViT-B-32`), `hf-hub:`/`local-dir:` names, a path to an
open_clip model-config JSON (registered with `open_clip.add_model_config` under the file's stem),
or a config shipped with lct in `lct/assets/` (`lct-tiny-text`: width 128, 2 layers, context 77;
`lct-tiny-text-c32`: the demo's tower, a context of 32 tokens (its captions are short), 1 layer and
open_clip's LayerScale at 0.01 (`ls_init_value`), so that a random tower's token states keep the
word the DiT has to read instead of mixing in the neighbouring words (what that measured: README.md,
"What the demo gives").

Weights (`pretrained`): an open_clip tag (downloaded by open_clip into its cache), a local
checkpoint file (or a directory holding `open_clip_model.safetensors`/`open_clip_pytorch_model.bin`),
or `None`/`"random"`: a random tower drawn from `torch.manual_seed(seed)` on the CPU. Data prep
saves a random tower into its output directory (`text_tower/open_clip_model.safetensors`: the text
half of the open_clip state dict, every entry but `visual.*`, fp32, beside `open_clip_config.json`;
ViT-B-32's is 254 MB where the whole model is 605 MB, lct-tiny-text's 27 MB), and records the path,
its sha256 and the model config in the manifest, so the trainer and the sampler rebuild exactly the
same tower (`TextEncoder.from_manifest`). The file's bytes depend only on the weights: the same
seed gives the same file (and hash) in every output folder. `_create_clip` loads such a text-only
file into a fresh model (`load_state_dict`, the vision entries may be absent, nothing else).

Tokenizer identity (`identity()`): tokenizer class, context length, vocab size, EOT id and a hash
of the token ids of a fixed probe string; the trainer refuses a tokenizer whose identity differs
from the manifest's.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Sequence

import torch
from safetensors.torch import save_file
from torch import nn

from lct.errors import UserError
from lct.hf_text import HFTextEncoder, is_hf_record
from lct.latents import load_manifest
from lct.tokens import PROBE, padding_mask  # also lct.text's: the data path and eval import them from here
from lct.files import file_sha256, temp_path, write_json

ASSETS = Path(__file__).resolve().parent / "assets"
RANDOM = "random"
TOWER_DIR = "text_tower"
TOWER_FILE = "open_clip_model.safetensors"
TOWER_CONFIG = "open_clip_config.json"
_SCHEMAS = ("hf-hub:", "local-dir:")
_PRETRAINED_HINT = ("set --text-pretrained (text.pretrained in a config) to a local open_clip checkpoint "
                    "file (e.g. open_clip_pytorch_model.bin) or to 'random'")


def is_random(pretrained: str | None) -> bool:
    """`None`, "random" (and "none") mean a seeded random tower."""
    return pretrained is None or str(pretrained).strip().lower() in (RANDOM, "none", "")


def text_condition(encoder: "TextEncoder", tokens) -> dict[str, torch.Tensor]:
    """The network's text condition of token ids [B, L] (no gradients): `text_states` [B,L,D],
    `text_mask` [B,L] and `pooled` [B,P] on the encoder's device (trainer, monitor, sampling)."""
    with torch.no_grad():
        states, mask, pooled = encoder(tokens)
    return {"text_states": states, "text_mask": mask, "pooled": pooled}


def check_text_source(model: str, pretrained: str | None) -> None:
    """Cheap checks before open_clip is imported: a config path or weights path that does not
    exist is a `UserError` naming the flag (tags and model names are checked when loading)."""
    m = str(model)
    if m.endswith(".json") and not m.startswith(_SCHEMAS) and not Path(m).expanduser().is_file():
        raise UserError(f"--text-model {m}: model config file not found (text.model)")
    if is_random(pretrained) or m.startswith(_SCHEMAS):
        return
    p = str(pretrained)
    looks_like_path = ("/" in p or os.sep in p or p.startswith((".", "~"))
                       or p.endswith((".bin", ".pt", ".pth", ".safetensors", ".npz")))
    if looks_like_path and not Path(p).expanduser().exists():
        raise UserError(f"--text-pretrained {p}: file not found; {_PRETRAINED_HINT}")


# ----------------------------------------------------------------------------------------------
# Model names and configs
# ----------------------------------------------------------------------------------------------


def _register_config(name: str, cfg: dict) -> None:
    """Register a model config dict under `name` (open_clip registers files by their stem)."""
    import open_clip

    tmp = Path(tempfile.mkdtemp(prefix="lct-openclip-"))
    try:
        path = tmp / f"{name}.json"
        path.write_text(json.dumps(cfg))
        open_clip.add_model_config(path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _check_model_config(cfg: Any, source: str) -> dict:
    if not (isinstance(cfg, dict) and all(k in cfg for k in ("embed_dim", "vision_cfg", "text_cfg"))):
        raise UserError(f"--text-model {source}: not an open_clip model config (needs embed_dim, "
                        "vision_cfg and text_cfg; a minimal vision_cfg is fine)")
    return cfg


def resolve_model(model: str, model_config: dict | None = None) -> tuple[str, dict | None]:
    """(open_clip model name, model config) for `model`; registers JSON configs with open_clip.

    `model_config` (from a manifest) registers the config when the name is unknown here, and must
    equal the config registered under that name otherwise."""
    import open_clip
    from open_clip.factory import get_model_config

    model = str(model)
    if model.startswith(_SCHEMAS):
        try:
            return model, get_model_config(model)
        except Exception as err:  # hub unreachable, missing folder
            raise UserError(f"--text-model {model}: config could not be read ({_short(err)}); "
                            "set --text-model (text.model) to a local open_clip config") from None
    if model.endswith(".json"):
        path = Path(model).expanduser()
        name = path.stem
        if path.is_file():
            try:
                cfg = json.loads(path.read_text())
            except ValueError as err:
                raise UserError(f"--text-model {model}: invalid JSON ({err})") from None
            _check_model_config(cfg, model)
            if get_model_config(name) != cfg:
                open_clip.add_model_config(path)
        elif model_config is not None:
            if get_model_config(name) is None:
                _register_config(name, model_config)
        else:
            raise UserError(f"--text-model {model}: model config file not found (text.model)")
    else:
        name = model
        if get_model_config(name) is None:
            bundled = ASSETS / f"{name}.json"
            if bundled.is_file():
                open_clip.add_model_config(bundled)
            elif model_config is not None:
                _register_config(name, _check_model_config(model_config, name))
            else:
                known = open_clip.list_models()
                raise UserError(f"--text-model {model}: unknown open_clip model (text.model); use one of "
                                f"{', '.join(known[:8])}, ... ({len(known)} in all), a bundled config "
                                "(lct-tiny-text) or a path to an open_clip model-config JSON")
    cfg = get_model_config(name)
    if model_config is not None and cfg is not None and _jsonable(cfg) != _jsonable(model_config):
        raise UserError(f"text model {model!r}: the open_clip config registered under {name!r} differs from "
                        "the one recorded in the manifest; the tower must be rebuilt from the recorded "
                        "config (remove the conflicting config or pass the manifest's JSON as text.model)")
    return name, cfg


def _jsonable(x):
    return json.loads(json.dumps(x))


def _short(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return (text[0] if text else type(err).__name__)[:300]


def _checkpoint_in(path: Path) -> Path | None:
    for name in (TOWER_FILE, "open_clip_pytorch_model.safetensors", "open_clip_pytorch_model.bin",
                 "open_clip_pytorch_model.pth", "model.safetensors", "pytorch_model.bin"):
        if (path / name).is_file():
            return path / name
    return None


def _create_clip(name: str, pretrained: str | None, seed: int = 0):
    """The full open_clip model on the CPU, in fp32, with clear errors for missing weights."""
    import open_clip

    if is_random(pretrained):
        quiet = logging.root.manager.disable
        logging.disable(logging.WARNING)  # "No pretrained weights loaded": expected here
        try:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                return open_clip.create_model(name, pretrained=None, device="cpu")
        finally:
            logging.disable(quiet)
    pre = str(pretrained)
    if name.startswith(_SCHEMAS):
        try:
            return open_clip.create_model(name, device="cpu")
        except Exception as err:
            raise UserError(f"text tower {name}: could not be loaded ({_short(err)}); {_PRETRAINED_HINT}") from None
    path = Path(pre).expanduser()
    tag = None if path.exists() else open_clip.get_pretrained_cfg(name, pre)
    if tag:
        from lct.hub import go_offline_if_unreachable

        offline = go_offline_if_unreachable()  # the cache still serves; no minute of hub retries
        quiet = logging.root.manager.disable
        if offline:
            logging.disable(logging.ERROR)  # open_clip logs the failed download; the error below says it
        try:
            return open_clip.create_model(name, pretrained=pre, device="cpu")
        except Exception as err:  # offline, hub errors, partial downloads
            raise UserError(f"--text-pretrained {pre}: the weights of {name}/{pre} could not be loaded "
                            f"({_short(err)}); without network access {_PRETRAINED_HINT}") from None
        finally:
            logging.disable(quiet)
    if path.is_dir():
        found = _checkpoint_in(path)
        if found is None:
            raise UserError(f"--text-pretrained {pre}: no open_clip checkpoint in this folder; {_PRETRAINED_HINT}")
        path = found
    if path.is_file() and _is_text_only(path):
        return _load_text_only(name, path)
    if not path.is_file():
        tags = open_clip.list_pretrained_tags_by_model(name)
        raise UserError(f"--text-pretrained {pre}: neither a file nor a known tag of {name} "
                        f"(tags: {', '.join(tags) or 'none'}); {_PRETRAINED_HINT}")
    try:
        return open_clip.create_model(name, pretrained=str(path), device="cpu")
    except Exception as err:
        raise UserError(f"--text-pretrained {pre}: could not load it into {name} ({_short(err)}); "
                        f"{_PRETRAINED_HINT}") from None


def save_tower(clip: nn.Module, cfg: dict, folder: str | os.PathLike) -> Path:
    """Write the text half of an open_clip model (every state-dict entry but `visual.*`) as
    `open_clip_model.safetensors`, beside `open_clip_config.json`, atomically; returns the path.
    The bytes depend only on the weights (no time, no unordered metadata): the same seed gives
    the same file."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to("cpu").contiguous().clone() for k, v in clip.state_dict().items()
             if not k.startswith("visual.")}
    target = folder / TOWER_FILE
    tmp = temp_path(target)
    save_file(state, str(tmp), metadata={"format": "pt"})  # one key: safetensors orders a dict at random
    write_json(folder / TOWER_CONFIG, {"model_cfg": cfg, "preprocess_cfg": {}}, sort_keys=True)
    os.replace(tmp, target)
    return target


def _is_text_only(path: Path) -> bool:
    """A safetensors checkpoint without `visual.*` entries (what `save_tower` writes)."""
    if path.suffix != ".safetensors":
        return False
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as f:
            keys = list(f.keys())
    except Exception:
        return False
    return bool(keys) and not any(k.startswith("visual.") for k in keys)


def _load_text_only(name: str, path: Path):
    """open_clip model `name` with the text weights of `path` (its vision half stays random and is
    dropped by `TextEncoder.load`); every non-vision entry must be there, nothing else."""
    from safetensors.torch import load_file

    clip = _create_clip(name, None)
    missing, unexpected = clip.load_state_dict(load_file(str(path)), strict=False)
    bad = [k for k in missing if not k.startswith("visual.")] + list(unexpected)
    if bad:
        raise UserError(f"--text-pretrained {path}: not a text tower of {name} (missing or unexpected: "
                        f"{', '.join(bad[:4])}); {_PRETRAINED_HINT}")
    return clip


# ----------------------------------------------------------------------------------------------
# The encoder
# ----------------------------------------------------------------------------------------------


class _InlinedText(nn.Module):
    """The text tower of open_clip's `CLIP` layout, lifted off the model (vision tower dropped)."""

    def __init__(self, clip: nn.Module):
        super().__init__()
        self.token_embedding = clip.token_embedding
        self.positional_embedding = clip.positional_embedding
        self.transformer = clip.transformer
        self.ln_final = clip.ln_final
        self.text_projection = clip.text_projection
        self.pool_type = clip.text_pool_type
        self.eos_id = getattr(clip, "text_eos_id", None)
        self.register_buffer("attn_mask", clip.attn_mask, persistent=False)

    def forward(self, text: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # open_clip CLIP.encode_text, keeping the token states after ln_final.
        from open_clip.transformer import text_global_pool

        cast_dtype = self.transformer.get_cast_dtype()
        x = self.token_embedding(text).to(cast_dtype)
        x = x + self.positional_embedding.to(cast_dtype)
        x = self.transformer(x, attn_mask=self.attn_mask)
        states = self.ln_final(x)
        pooled = text_global_pool(states, text, self.pool_type, eos_token_id=self.eos_id)
        if self.text_projection is not None:
            if isinstance(self.text_projection, nn.Linear):
                pooled = self.text_projection(pooled)
            else:
                pooled = pooled @ self.text_projection
        return pooled, states


class TextEncoder(nn.Module):
    """A frozen open_clip text tower (see the module docstring). Build with `load` or
    `from_manifest`; call with token ids from `tokenize`."""

    def __init__(self, clip: nn.Module, tokenizer, *, model: str, model_name: str, model_config: dict | None,
                 pretrained: str | None, seed: int | None = None, tower_file: Path | None = None):
        super().__init__()
        text = getattr(clip, "text", None)
        if isinstance(text, nn.Module):
            if getattr(text, "cls_emb", None) is not None:
                raise UserError(f"text model {model}: CoCa-style text towers (appended CLS token) are not "
                                "supported; use a CLIP text tower")
            if not hasattr(text, "output_tokens"):
                raise UserError(f"text model {model}: its text tower cannot return token states")
            text.output_tokens = True
            self.layout = "CustomTextCLIP"
            self.text = text
        else:
            self.layout = "CLIP"
            self.text = _InlinedText(clip)
        self.tokenizer = tokenizer
        self.model, self.model_name, self.model_config = model, model_name, model_config
        self.pretrained, self.seed, self.tower_file = pretrained, seed, tower_file
        self.requires_grad_(False)
        super().train(False)
        self.eot_id = getattr(tokenizer, "eot_token_id", None)
        hf = getattr(tokenizer, "tokenizer", None)
        self.pad_id = getattr(hf, "pad_token_id", None) if hf is not None else None
        self.context_length = int(getattr(tokenizer, "context_length", None) or 77)
        with torch.no_grad():
            pooled, states = self.text(self.tokenize([PROBE]))
        if states.shape[1] != self.context_length:
            raise UserError(f"text model {model}: the tower returns {states.shape[1]} token states for "
                            f"{self.context_length} tokens; not supported")
        self.state_dim = int(states.shape[-1])
        self.pooled_dim = int(pooled.shape[-1])

    # ------------------------------------------------------------------ construction

    @classmethod
    def load(cls, model: str, pretrained: str | None = None, device: str | torch.device = "cpu", *,
             seed: int = 0, save_dir: str | os.PathLike | None = None,
             model_config: dict | None = None) -> "TextEncoder":
        """Build the tower. `pretrained` None/"random" gives a seeded random tower; with `save_dir`
        it is saved to `save_dir/text_tower/` (or, when already there, loaded from it)."""
        import open_clip

        name, cfg = resolve_model(model, model_config)
        tower_file = None
        if is_random(pretrained) and save_dir is not None:
            tower_file = (Path(save_dir) / TOWER_DIR / TOWER_FILE).resolve()
            if tower_file.is_file():
                saved = json.loads((tower_file.parent / TOWER_CONFIG).read_text()).get("model_cfg")
                if cfg is not None and _jsonable(saved) != _jsonable(cfg):
                    raise UserError(f"{tower_file.parent} holds a random text tower of another model config; "
                                    "use another --output or delete it")
                clip = _create_clip(name, str(tower_file))
            else:
                clip = _create_clip(name, None, seed)
                save_tower(clip, cfg, tower_file.parent)
            pretrained_rec = str(tower_file)
        else:
            clip = _create_clip(name, pretrained, seed)
            pretrained_rec = RANDOM if is_random(pretrained) else str(pretrained)
        try:
            tokenizer = open_clip.get_tokenizer(name)
        except Exception as err:
            raise UserError(f"text model {model}: its tokenizer could not be loaded ({_short(err)}); "
                            "HF tokenizers need their files in the local cache") from None
        if hasattr(clip, "visual"):
            del clip.visual  # frees the vision tower
        enc = cls(clip, tokenizer, model=str(model), model_name=name, model_config=cfg,
                  pretrained=pretrained_rec, seed=seed if is_random(pretrained) else None,
                  tower_file=tower_file)
        return enc.to(device)

    @classmethod
    def from_manifest(cls, manifest: dict | str | os.PathLike, device: str | torch.device = "cpu",
                      model: str | None = None, pretrained: str | None = None):
        """`load_tower(manifest, ...)` with `model` / `pretrained` overriding the recorded ones."""
        return load_tower(manifest, SimpleNamespace(model=model, pretrained=pretrained, dtype=None), device)

    @classmethod
    def from_record(cls, manifest: dict, device: str | torch.device = "cpu", model: str | None = None,
                    pretrained: str | None = None) -> "TextEncoder":
        """The open_clip tower of a manifest's "text" record (`load_tower` checks its tokenizer)."""
        t = manifest.get("text") or {}
        if not t.get("model") and not model:
            raise UserError("the data's manifest records no text model; set text.model and text.pretrained")
        name = model or t["model"]
        same_model = model is None or str(model) == str(t.get("model"))
        cfg = t.get("model_config") if same_model else None
        recorded_random = t.get("random_seed") is not None
        if pretrained is not None and not (is_random(pretrained) and recorded_random and same_model):
            pre = pretrained
        else:
            pre = t.get("pretrained")
            if pre is None or (is_random(pre) and not recorded_random):
                raise UserError("the data's manifest records no text weights; set text.pretrained "
                                "(--text-pretrained) to the tower the shards were encoded with")
            if recorded_random or t.get("pretrained_relative"):
                pre = _locate_tower(t, manifest)
        return cls.load(name, pre, device, model_config=cfg)

    # ------------------------------------------------------------------ use

    def train(self, mode: bool = True) -> "TextEncoder":  # frozen: always eval
        return super().train(False)

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def tokenize(self, captions: Sequence[str] | str) -> torch.Tensor:
        """open_clip token ids, LongTensor [B, context_length] on the CPU."""
        if isinstance(captions, str):
            captions = [captions]
        return self.tokenizer(list(captions)).long()

    def mask(self, tokens: torch.Tensor) -> torch.Tensor:
        """Padding mask of token ids (True = real token), per this tokenizer."""
        if self.eot_id is None and self.pad_id is not None and self.pad_id != getattr(
                getattr(self.tokenizer, "tokenizer", None), "eos_token_id", None):
            return tokens != self.pad_id
        return padding_mask(tokens, self.eot_id)

    def forward(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(states [B,L,D] fp32, mask [B,L] bool, pooled [B,P] fp32) of token ids [B,L]."""
        tokens = torch.as_tensor(tokens).to(self.device, torch.long)
        with torch.no_grad():
            pooled, states = self.text(tokens)
        return states.float(), self.mask(tokens), pooled.float()

    @torch.no_grad()
    def encode(self, captions: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self(self.tokenize(captions))

    def identity(self) -> dict:
        """JSON-ready tokenizer identity (class, context length, vocab size, EOT id, probe hash)."""
        tok = self.tokenizer
        vocab = getattr(tok, "vocab_size", None)
        if vocab is None and getattr(tok, "tokenizer", None) is not None:
            vocab = len(tok.tokenizer)
        ids = self.tokenize([PROBE])[0].tolist()
        return {"class": f"{type(tok).__module__}.{type(tok).__name__}",
                "context_length": self.context_length,
                "vocab_size": int(vocab) if vocab is not None else None,
                "eot_id": self.eot_id,
                "probe_sha256": hashlib.sha256(json.dumps(ids).encode()).hexdigest()}

    def record(self, manifest_dir: str | os.PathLike | None = None) -> dict:
        """The manifest's "text" section (data prep adds its own keys)."""
        rec = {"model": self.model, "model_name": self.model_name, "model_config": self.model_config,
               "pretrained": self.pretrained, "random_seed": self.seed, "layout": self.layout,
               "tokenizer": self.identity(), "context_length": self.context_length,
               "state_dim": self.state_dim, "pooled_dim": self.pooled_dim}
        if self.tower_file is not None:
            rec["weights_sha256"] = file_sha256(self.tower_file)
            if manifest_dir is not None:
                rec["pretrained_relative"] = os.path.relpath(self.tower_file, Path(manifest_dir).resolve())
        return rec


def load_tower(manifest: dict | str | os.PathLike, text_cfg: Any = None, device: str | torch.device = "cpu"
               ) -> "TextEncoder | HFTextEncoder":
    """The frozen text tower a latent data set was made with (its manifest's "text" record): an
    open_clip `TextEncoder`, or by the record's `kind` (t5, clip) a transformers `HFTextEncoder`
    with the same interface. `text_cfg` (lct.config.TextConfig, or anything with `model`,
    `pretrained` and `dtype`) overrides the recorded source (a local copy of the weights) and the
    compute dtype. The tower's tokenizer must give the identity the shards were tokenised with.
    The one loader of a data set's tower: trainer, monitor, exports and samplers come here."""
    if not isinstance(manifest, dict):
        manifest = load_manifest(manifest)
    model, pretrained, dtype = (getattr(text_cfg, k, None) for k in ("model", "pretrained", "dtype"))
    t = manifest.get("text") or {}
    if is_hf_record(t):
        enc = HFTextEncoder.from_manifest(manifest, device, model=model, pretrained=pretrained, dtype=dtype)
    else:
        enc = TextEncoder.from_record(manifest, device, model=model, pretrained=pretrained)
    want = t.get("tokenizer")
    if want and enc.identity() != want:
        raise UserError("the text tower's tokenizer differs from the one the shards were tokenised with: "
                        f"{enc.identity()} vs manifest {want}; set text.model and text.pretrained: null to use "
                        "the data's tower")
    return enc


def _locate_tower(t: dict, manifest: dict) -> str:
    """The recorded weights file: absolute path, else relative to the manifest's folder."""
    pre = str(t.get("pretrained"))
    if Path(pre).is_file():
        return pre
    rel, base = t.get("pretrained_relative"), manifest.get("_dir")
    if rel and base and (Path(base) / rel).is_file():
        return str(Path(base) / rel)
    raise UserError(f"the text tower recorded in the manifest ({pre}) is missing; copy the data set's "
                    f"{TOWER_DIR}/ folder back or {_PRETRAINED_HINT.replace('or to ' + repr(RANDOM), '').strip()}")
