"""Networks: `TextDiT` (diffusers ModelMixin) and the SPEC 1 wrapper `Precond`; pretrained
diffusers noise predictors (PixArt) behind the SPEC 14 wrapper `VPDenoiser`.

Importing `lct.models` imports torch and diffusers (TextDiT subclasses ModelMixin); `import lct`
alone imports neither.
"""

from lct.models.dit import NSLN_KINDS, AffineLayerNorm, FP32Linear, NonScalingLayerNorm, TextDiT
from lct.models.presets import (
    DIT_PRESETS,
    build_dit,
    count_parameters,
    dit_kwargs,
    load_state_dict_checked,
    split_parameter_count,
)
from lct.models.pixart import PIXART_ARCHS, PixArtNet, build_pixart, load_pixart, wrap_pixart
from lct.models.precond import Precond
from lct.models.vp import VPDenoiser

__all__ = [
    "AffineLayerNorm",
    "DIT_PRESETS",
    "NSLN_KINDS",
    "FP32Linear",
    "NonScalingLayerNorm",
    "PIXART_ARCHS",
    "PixArtNet",
    "Precond",
    "TextDiT",
    "VPDenoiser",
    "build_dit",
    "build_pixart",
    "count_parameters",
    "dit_kwargs",
    "load_pixart",
    "load_state_dict_checked",
    "split_parameter_count",
    "wrap_pixart",
]
