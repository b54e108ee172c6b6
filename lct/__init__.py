"""lct: latent text-to-image consistency models (iCT, ECT, iLCT) on a text-conditioned DiT.

Importing `lct` is cheap: deepspeed, open_clip and diffusers load only where they are used.
"""

__version__ = "0.1.0"
