"""DiT presets, the `TextDiT` builder from a `ModelConfig`, parameter counts and checked loading
(the lct side of `lct.models.dit`, which stays free of lct imports so that exports can carry it).

Presets: widths/depths/heads of the DiT paper (Table 1). `count_parameters` and
`split_parameter_count` count a model as the paper counted DiT ("trunk") plus what text
conditioning adds ("extra"); the counts of every preset are tabulated in README.md ("Model sizes").
"""

from __future__ import annotations

import difflib
from typing import Any, Mapping

import torch
import torch.nn as nn

from lct.config import ModelConfig
from lct.errors import ConfigError, UserError
from lct.models.dit import TextDiT, config_problem

DIT_PRESETS: dict[str, dict[str, int]] = {
    "DiT-S/2": dict(hidden_size=384, depth=12, num_heads=6, patch_size=2),
    "DiT-S/4": dict(hidden_size=384, depth=12, num_heads=6, patch_size=4),
    "DiT-B/2": dict(hidden_size=768, depth=12, num_heads=12, patch_size=2),
    "DiT-B/4": dict(hidden_size=768, depth=12, num_heads=12, patch_size=4),
    "DiT-L/2": dict(hidden_size=1024, depth=24, num_heads=16, patch_size=2),
    "DiT-L/4": dict(hidden_size=1024, depth=24, num_heads=16, patch_size=4),
    "DiT-XL/2": dict(hidden_size=1152, depth=28, num_heads=16, patch_size=2),
    "DiT-XL/4": dict(hidden_size=1152, depth=28, num_heads=16, patch_size=4),
}


def dit_kwargs(model_cfg, latent_shape, text_dim: int = 512, text_len: int = 77,
               pooled_dim: int = 512) -> dict[str, Any]:
    """TextDiT constructor arguments from a `ModelConfig` (preset + overrides) and the data shapes;
    a `ConfigError` naming the key where they cannot build a network."""
    if model_cfg.arch not in DIT_PRESETS:
        lower = {k.lower(): k for k in DIT_PRESETS}
        close = difflib.get_close_matches(model_cfg.arch.lower(), list(lower), n=1)
        hint = f"; did you mean '{lower[close[0]]}'?" if close else ""
        raise ConfigError(f"unknown arch {model_cfg.arch!r}{hint} (known: {', '.join(DIT_PRESETS)})", key="model.arch")
    arch = dict(DIT_PRESETS[model_cfg.arch])
    for key in ("hidden_size", "depth", "num_heads", "patch_size"):
        if getattr(model_cfg, key) is not None:
            arch[key] = getattr(model_cfg, key)
    c, h, w = (int(v) for v in latent_shape)
    kwargs = dict(in_channels=c, input_height=h, input_width=w, mlp_ratio=model_cfg.mlp_ratio, cond=model_cfg.cond,
                  num_classes=model_cfg.num_classes, text_dim=text_dim, text_len=text_len, pooled_dim=pooled_dim,
                  dropout=model_cfg.dropout, nsln=model_cfg.nsln, attention=model_cfg.attention, **arch)
    problem = config_problem(kwargs)
    if problem:
        raise ConfigError(problem[1], key=problem[0])
    return kwargs


def build_dit(model_cfg, latent_shape, text_dim: int = 512, text_len: int = 77, pooled_dim: int = 512) -> TextDiT:
    """TextDiT for `model_cfg` (lct.config.ModelConfig) and latents [C, H, W]; applies the preset,
    the hidden_size/depth/num_heads/patch_size overrides, checkpointing and compile."""
    model = TextDiT(**dit_kwargs(model_cfg, latent_shape, text_dim, text_len, pooled_dim))
    if model_cfg.checkpointing:
        model.enable_gradient_checkpointing()
    if model_cfg.compile:
        model.compile_blocks()
    return model


def split_parameter_count(model: nn.Module) -> dict[str, int]:
    """{'trunk', 'extra', 'total'}: trunk = what the DiT paper counts for a DiT of this size,
    extra = text conditioning (cross-attention, extra adaLN rows, text projection and norm,
    pooled MLP, null condition) and the q/k norms' parameters (NsLN betas, LayerNorm gammas and betas). Other networks count as all trunk."""
    if not isinstance(model, TextDiT):
        total = sum(p.numel() for p in model.parameters())
        return {"trunk": total, "extra": 0, "total": total}
    trunk = extra = 0
    hidden = model.config.hidden_size
    for name, p in model.named_parameters():
        n = p.numel()
        if (name.startswith(("text_proj.", "text_norm.", "pooled_embedder.", "null_")) or ".cross_attn." in name
                or (".attn." in name and "_norm." in name)):
            extra += n
        elif name.startswith("blocks.") and "adaLN_modulation" in name and p.shape[0] == 9 * hidden:
            per_row = n // p.shape[0]
            trunk += 6 * hidden * per_row
            extra += 3 * hidden * per_row
        else:
            trunk += n
    return {"trunk": trunk, "extra": extra, "total": trunk + extra}


def count_parameters(model_or_cfg=None, latent_shape=(4, 32, 32), text_dim: int = 512, text_len: int = 77,
                     pooled_dim: int = 512, **overrides: Any) -> dict[str, int]:
    """{'trunk', 'extra', 'total'} parameter counts (see `split_parameter_count`).

    Given a TextDiT (e.g. one built under `with torch.device("meta")`), counts it. Given a
    `ModelConfig` (or None for the defaults), builds what `build_dit` would on the meta device (no
    memory); `overrides` replace TextDiT arguments (e.g. out_channels=8, cond='class')."""
    if isinstance(model_or_cfg, nn.Module):
        return split_parameter_count(model_or_cfg)
    kwargs = dit_kwargs(model_or_cfg or ModelConfig(), latent_shape, text_dim, text_len, pooled_dim)
    kwargs.update(overrides)
    with torch.device("meta"):
        model = TextDiT(**kwargs)
    return split_parameter_count(model)


def load_state_dict_checked(model: nn.Module, state_dict: Mapping[str, torch.Tensor],
                            source: str = "state dict") -> None:
    """Load `state_dict` strictly; on any mismatch raise `UserError` naming the missing, unexpected
    and shape-mismatched keys (e.g. ECT starting from an lct `edm` checkpoint of another arch)."""
    own = model.state_dict()
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    shapes = [f"{k} (checkpoint {tuple(state_dict[k].shape)}, model {tuple(own[k].shape)})"
              for k in own if k in state_dict and tuple(state_dict[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or shapes:

        def listing(title: str, items: list[str]) -> str:
            more = f", ... ({len(items) - 8} more)" if len(items) > 8 else ""
            return f"{title} ({len(items)}): {', '.join(items[:8])}{more}" if items else ""

        parts = [listing("missing keys", missing), listing("unexpected keys", unexpected),
                 listing("shape mismatches", shapes)]
        raise UserError(f"{source} does not fit the model ({type(model).__name__}): "
                        + "; ".join(p for p in parts if p)
                        + ". Check that model.arch, the overrides, model.cond and model.nsln match the checkpoint's")
    model.load_state_dict(state_dict, strict=True)
