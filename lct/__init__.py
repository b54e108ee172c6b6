"""lct: latent text-to-image consistency models (iCT, ECT, iLCT) on a text-conditioned DiT.

Importing `lct` is cheap: deepspeed, open_clip and diffusers load only where they are used.
"""

__version__ = "0.1.0"


_LAZY = {"LCTPipeline": "lct.pipeline", "LCTScheduler": "lct.scheduler", "load_pipeline": "lct.export"}


def __getattr__(name: str):
    """`from lct import LCTPipeline` imports diffusers only then (`import lct` stays light)."""
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'lct' has no attribute {name!r}")
