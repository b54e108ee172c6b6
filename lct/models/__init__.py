"""Networks: `TextDiT` (diffusers ModelMixin) and the SPEC 1 wrapper `Precond`.

Importing `lct.models` imports torch and diffusers (TextDiT subclasses ModelMixin); `import lct`
alone imports neither.
"""

from lct.models.dit import (
    DIT_PRESETS,
    FP32Linear,
    NonScalingLayerNorm,
    TextDiT,
    build_dit,
    count_parameters,
    dit_kwargs,
    load_state_dict_checked,
    split_parameter_count,
)
from lct.models.precond import Precond

__all__ = [
    "DIT_PRESETS",
    "FP32Linear",
    "NonScalingLayerNorm",
    "Precond",
    "TextDiT",
    "build_dit",
    "count_parameters",
    "dit_kwargs",
    "load_state_dict_checked",
    "split_parameter_count",
]
