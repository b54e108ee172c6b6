"""Networks: `TextDiT` (diffusers ModelMixin) and the SPEC 1 wrapper `Precond`; pretrained
diffusers noise predictors (PixArt) behind the SPEC 14 wrapper `VPDenoiser`; `build_network`
(lct/models/build.py), the one place a config becomes a network.

The names below are loaded on first use (PEP 562): `from lct.models import Precond` imports torch
only, `TextDiT` and the PixArt names import diffusers. `import lct` alone imports neither.
"""

from __future__ import annotations

_DIT = ("AffineLayerNorm", "FP32Linear", "NSLN_KINDS", "NonScalingLayerNorm", "TextDiT")
_PRESETS = ("DIT_PRESETS", "build_dit", "count_parameters", "dit_kwargs", "load_state_dict_checked",
            "split_parameter_count")
_PIXART = ("PIXART_ARCHS", "PixArtNet", "build_pixart", "load_pixart", "wrap_pixart")
_BUILD = ("ARCHITECTURES", "Architecture", "build_network", "register")

__all__ = sorted([*_DIT, *_PRESETS, *_PIXART, *_BUILD, "Precond", "VPDenoiser"])


def __getattr__(name: str):
    if name in _DIT:
        from lct.models import dit as module
    elif name in _PRESETS:
        from lct.models import presets as module
    elif name in _PIXART:
        from lct.models import pixart as module
    elif name in _BUILD:
        from lct.models import build as module
    elif name == "Precond":
        from lct.models import precond as module
    elif name == "VPDenoiser":
        from lct.models import vp as module
    else:
        raise AttributeError(f"module 'lct.models' has no attribute {name!r}")
    return getattr(module, name)
