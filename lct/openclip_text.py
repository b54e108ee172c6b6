"""`OpenCLIPTextModel`: an open_clip text tower as a diffusers component, for the towers that
transformers' CLIP classes cannot express exactly (LayerScale towers such as the demo's
`lct-tiny-text-c32`, hub towers; `lct.pipeline_text.to_clip_text_model` says why for each).

It rebuilds the tower from the open_clip model name and config the data prep recorded, so it needs
lct and open_clip: an export holding one carries this file as `text_encoder/lct_openclip_text.py`, and
without lct loading it stops at one line naming the install command. This file imports only torch
and diffusers at the top.
"""

from __future__ import annotations

import importlib
import logging

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin

INSTALL = "pip install lct-consistency"


class OpenCLIPTextModel(ModelMixin, ConfigMixin):
    """`model_name` and `model_config` are the open_clip model and config the data prep recorded;
    `tokenize(prompts)` gives open_clip's token ids and `forward(tokens)` gives
    `(states [B,L,D], mask [B,L], pooled [B,P])` (`lct.text.TextEncoder`'s)."""

    @register_to_config
    def __init__(self, model_name: str, model_config: dict | None = None):
        super().__init__()
        try:
            text = importlib.import_module("lct.text")
        except ImportError:
            raise ImportError(f"this export's text encoder is an open_clip tower that lct rebuilds: {INSTALL} "
                              "(or export it with a CLIP-form text tower)") from None
        quiet = logging.root.manager.disable
        logging.disable(logging.WARNING)  # open_clip's "no pretrained weights": the weights come next
        try:
            self.encoder = text.TextEncoder.load(model_name, None, "cpu", model_config=model_config)
        finally:
            logging.disable(quiet)

    @classmethod
    def from_encoder(cls, encoder) -> "OpenCLIPTextModel":
        """The component holding the weights of a loaded `lct.text.TextEncoder`."""
        model = cls(encoder.model, encoder.model_config)
        model.encoder.text.load_state_dict(encoder.text.state_dict())
        return model.to(encoder.device)

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        # The tower is built (a forward on a probe) in __init__: no meta-device initialisation.
        kwargs["low_cpu_mem_usage"] = False
        kwargs.pop("device_map", None)
        return super().from_pretrained(*args, **kwargs)

    @property
    def context_length(self) -> int:
        return self.encoder.context_length

    def tokenize(self, prompts: list[str]) -> torch.Tensor:
        return self.encoder.tokenize(prompts)

    def forward(self, tokens: torch.Tensor):
        return self.encoder(tokens)
