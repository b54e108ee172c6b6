"""The trainer's network for a config: one `build_network` over a registry of architectures.

    net = build_network(cfg, desc, manifest)             # the network a run trains
    net = build_network(cfg, desc, manifest, meta=True)  # on the meta device, no weights read (planning)

An `Architecture` says how one family is built (`build`), what it checks against the data before
any weights are read (`check`, called by `lct.preflight`), and, for a dry run before data prep,
the data sizes the model takes (`planned_data`). `model.arch` picks the family: `pixart`, `sana`,
`sd3`, else a DiT preset (`DiT-B/2`, ...). Each family (a diffusers transformer behind its SPEC wrapper)
is registered below (`sana`, `sd3`: SPEC 15); the trainer, its dry run, the resume shape
check, the final exports and bench/ all build through here.

diffusers is imported by the builders, not here: `import lct.train` stays free of it until a
network is made.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn

from lct.config import TrainConfig
from lct.data import DataDescription, manifest_path
from lct.errors import UserError
from lct.latents import TEXT_NULL, TEXT_NULL_POOLED, read_text_null, read_text_null_pooled


@dataclass(frozen=True)
class Architecture:
    """One family of networks.

    build(cfg, desc, manifest, meta) -> the network as the objectives call it (`f = net(x, sigma,
        **cond)`, SPEC 1 or SPEC 14); `meta`: random weights, nothing read but configs.
    check(cfg, desc, manifest, meta) -> None: refuse (a `UserError` naming the key) a config the
        data does not fit, before any weights are read; `manifest` None before data prep.
    planned_data(cfg) -> the `DataDescription` a dry run plans with before data prep (None: the
        defaults)."""

    build: Callable[[TrainConfig, DataDescription, dict | None, bool], nn.Module]
    check: Callable[[TrainConfig, DataDescription, dict | None, bool], None] | None = None
    planned_data: Callable[[TrainConfig], DataDescription | None] | None = None


ARCHITECTURES: dict[str, Architecture] = {}


def register(name: str, arch: Architecture) -> None:
    """Make `model.arch: name` build with `arch` (the DiT family is the fall-back for its presets)."""
    ARCHITECTURES[name] = arch


def architecture(cfg: TrainConfig) -> Architecture:
    return ARCHITECTURES.get(cfg.model.arch, ARCHITECTURES["dit"])


def build_network(cfg: TrainConfig, desc: DataDescription, manifest: dict | None = None,
                  meta: bool = False) -> nn.Module:
    """The network of `cfg` for data `desc` (`manifest`: the data's, for what the network takes
    from it, e.g. PixArt's null condition). `meta`: on the meta device, uncompiled (compiled blocks
    hide their saved tensors from the planning figures), no weights read."""
    arch = architecture(cfg)
    if not meta:
        return arch.build(cfg, desc, manifest, False)
    plain = cfg.model_copy(update={"model": cfg.model.model_copy(update={"compile": False})})
    with torch.device("meta"):
        return arch.build(plain, desc, manifest, True)


def check_network(cfg: TrainConfig, desc: DataDescription, manifest: dict | None, meta: bool = False) -> None:
    """The architecture's own checks against the data (no weights read); `meta`: a dry run, which
    may plan with a named architecture where the config cannot be read."""
    check = architecture(cfg).check
    if check is not None:
        check(cfg, desc, manifest, meta)


def planned_data(cfg: TrainConfig, desc: DataDescription) -> DataDescription:
    """`desc`, or before data prep (no manifest) the sizes the architecture takes."""
    plan = architecture(cfg).planned_data
    return (plan(cfg) if plan is not None and not desc.from_manifest else None) or desc


# ----------------------------------------------------------------------------------------------
# DiT (SPEC 1, 8): TextDiT in the consistency parameterisation
# ----------------------------------------------------------------------------------------------


def _build_dit(cfg: TrainConfig, desc: DataDescription, manifest: dict | None, meta: bool) -> nn.Module:
    from lct.models.presets import build_dit
    from lct.models.precond import Precond

    net = build_dit(cfg.model, desc.latent_shape, text_dim=desc.text_dim, text_len=desc.text_len,
                    pooled_dim=desc.pooled_dim)
    return Precond(net, sigma_data=cfg.method.sigma_data, sigma_min=cfg.method.sigma_min,
                   time_embed_scale=cfg.method.time_embed_scale)


register("dit", Architecture(build=_build_dit))


# ----------------------------------------------------------------------------------------------
# PixArt (SPEC 14): the pretrained diffusers transformer as a VP denoiser
# ----------------------------------------------------------------------------------------------

_WARNED: set[str] = set()


def pixart_config_for(cfg: TrainConfig, desc: DataDescription, manifest: dict | None, meta: bool) -> dict:
    """model.pretrained's transformer config (no weights read), checked against the data. `meta`
    (a dry run) without the weights falls back to the architecture of the same name
    (`PIXART_ARCHS`), with one warning."""
    from lct.models.pixart import PIXART_ARCHS, check_compatible, pixart_config

    try:
        config = pixart_config(cfg.model.pretrained)
    except UserError as err:
        name = cfg.model.pretrained.rstrip("/").split("/")[-1]
        if not meta or name not in PIXART_ARCHS:
            raise
        if name not in _WARNED:
            _WARNED.add(name)
            print(f"warning: {err}; the dry run uses the {name} architecture", file=sys.stderr)
        config = dict(PIXART_ARCHS[name])
    check_compatible(config, desc.latent_shape, desc.text_dim if desc.from_manifest else None)
    if manifest is not None and not meta:
        read_text_null(Path(manifest_path(cfg)).parent)
    return config


def _build_pixart(cfg: TrainConfig, desc: DataDescription, manifest: dict | None, meta: bool) -> nn.Module:
    """`VPDenoiser(PixArtNet(...))` from model.pretrained, the null condition from the data's
    `text_null.npy` (SPEC 14.5); the transformer blocks compiled with model.compile."""
    from lct.models.pixart import build_pixart, load_pixart

    config = pixart_config_for(cfg, desc, manifest, meta)
    data_dir = Path(manifest_path(cfg) or ".").parent
    if manifest is not None and (data_dir / TEXT_NULL).is_file():
        null = torch.from_numpy(read_text_null(data_dir))
    else:  # a dry run before data prep
        null = torch.zeros(1, config["caption_channels"])
    kw = dict(sigma_min=cfg.method.sigma_min,
              vae_downsample=int(((manifest or {}).get("vae") or {}).get("downsample", 8)))
    if meta:
        return build_pixart(config, null, **kw)
    model = load_pixart(cfg.model.pretrained, null, gradient_checkpointing=cfg.model.checkpointing, **kw)
    if cfg.model.compile:
        for block in model.net.transformer.transformer_blocks:
            block.compile()
    return model


def _check_pixart(cfg: TrainConfig, desc: DataDescription, manifest: dict | None, meta: bool) -> None:
    pixart_config_for(cfg, desc, manifest, meta)


def _pixart_planned_data(cfg: TrainConfig) -> DataDescription:
    pc = pixart_config_for(cfg, DataDescription(), None, meta=True)
    return DataDescription((pc["in_channels"], pc["sample_size"], pc["sample_size"]), pc["caption_channels"],
                           cfg.text.max_length or 120, 0)


register("pixart", Architecture(build=_build_pixart, check=_check_pixart, planned_data=_pixart_planned_data))


# ----------------------------------------------------------------------------------------------
# Sana, SD3 (SPEC 15): the pretrained flow-matching velocity predictor as a denoiser
# ----------------------------------------------------------------------------------------------

def flow_config_for(cfg: TrainConfig, desc: DataDescription, manifest: dict | None, meta: bool) -> dict:
    """model.pretrained's transformer config (no weights read), checked against the data: latent
    channels and size, text kind and widths (SPEC 15.6). `meta` (a dry run) without the weights
    falls back to the architecture of the same name (`FLOW_ARCHS`), with one warning."""
    from lct.config import FLOW_TEXT_KINDS
    from lct.models.flow import FLOW_ARCHS, arch_config, check_compatible, flow_config

    family = cfg.model.arch
    if manifest is not None:
        kind = (manifest.get("text") or {}).get("kind", "open_clip")
        if kind != FLOW_TEXT_KINDS[family]:
            raise UserError(f"data.shards: the data's text kind is {kind!r} (manifest), model.arch {family} reads "
                            f"{FLOW_TEXT_KINDS[family]}; re-encode with data_prep/encode_latents.py --text-kind "
                            f"{FLOW_TEXT_KINDS[family]}")
    try:
        config = flow_config(cfg.model.pretrained, family)
    except UserError as err:
        name = cfg.model.pretrained.rstrip("/").split("/")[-1]
        if not meta or FLOW_ARCHS.get(name, ("",))[0] != family:
            raise
        if name not in _WARNED:
            _WARNED.add(name)
            print(f"warning: {err}; the dry run uses the {name} architecture", file=sys.stderr)
        config = arch_config(name, family)[1]
    if desc.from_manifest:  # before data prep there is nothing to check against
        check_compatible(family, config, desc.latent_shape, desc.text_dim, desc.pooled_dim)
    if manifest is not None and not meta:
        flow_null(cfg, manifest, config)  # the data's null condition is there and readable
    return config


def flow_null(cfg: TrainConfig, manifest: dict | None, config: dict, meta: bool = False, text_len: int | None = None
              ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The null condition the network starts from (SPEC 15.6): the data's `text_null.npy` (and for
    SD3 `text_null_pooled.npy`), as data prep wrote them; zeros in a dry run without them
    (`text_len` positions for SD3, whose null covers every position)."""
    from lct.models.flow import text_width

    family = cfg.model.arch
    data_dir = Path(manifest_path(cfg) or ".").parent
    files = [data_dir / TEXT_NULL] + ([data_dir / TEXT_NULL_POOLED] if family == "sd3" else [])
    if manifest is not None and (not meta or all(f.is_file() for f in files)):
        null = torch.from_numpy(read_text_null(data_dir))
        return null, torch.from_numpy(read_text_null_pooled(data_dir)) if family == "sd3" else None
    null = torch.zeros(1 if family == "sana" else int(text_len or 77 + 256), text_width(family, config))
    return null, (torch.zeros(int(config["pooled_projection_dim"])) if family == "sd3" else None)


def _build_flow(cfg: TrainConfig, desc: DataDescription, manifest: dict | None, meta: bool) -> nn.Module:
    """`FlowDenoiser(SanaNet | SD3Net)` from model.pretrained, the null condition from the data
    (SPEC 15.6); the transformer blocks compiled with model.compile."""
    from lct.models.flow import build_flow, load_flow

    config = flow_config_for(cfg, desc, manifest, meta)
    null, pooled = flow_null(cfg, manifest, config, meta, text_len=desc.text_len)
    if meta:
        return build_flow(cfg.model.arch, config, null, pooled, sigma_min=cfg.method.sigma_min)
    model = load_flow(cfg.model.pretrained, cfg.model.arch, null, pooled, sigma_min=cfg.method.sigma_min,
                      gradient_checkpointing=cfg.model.checkpointing)
    if cfg.model.compile:
        for block in model.net.transformer.transformer_blocks:
            block.compile()
    return model


def _check_flow(cfg: TrainConfig, desc: DataDescription, manifest: dict | None, meta: bool) -> None:
    flow_config_for(cfg, desc, manifest, meta)


def _flow_planned_data(cfg: TrainConfig) -> DataDescription:
    """The data a dry run plans with before data prep: the transformer's own resolution, the
    family's text sizes (Sana: Gemma-2 2304 x max_length; SD3: 4096 x (77 + T5 length), pooled 2048)."""
    from lct.models.flow import text_width

    family = cfg.model.arch
    fc = flow_config_for(cfg, DataDescription(), None, meta=True)
    size = int(fc["sample_size"])
    if family == "sana":
        return DataDescription((fc["in_channels"], size, size), text_width(family, fc), cfg.text.max_length or 300, 0)
    return DataDescription((fc["in_channels"], size, size), text_width(family, fc), 77 + (cfg.text.max_length or 256),
                           int(fc["pooled_projection_dim"]))


for _family in ("sana", "sd3"):
    register(_family, Architecture(build=_build_flow, check=_check_flow, planned_data=_flow_planned_data))
