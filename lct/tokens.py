"""Token-id conventions every text tower and the data path share: the padding mask of token ids
and the probe string whose token ids identify a tokenizer (`identity()` of the towers)."""

from __future__ import annotations

import numpy as np
import torch

# The pad id of a tokenizer none of whose positions is padding (SD3's towers: the MMDiT attends to
# every position, SPEC 15.6): no token has it, so `token_mask` is all True.
NO_PADDING = -1

PROBE = "A photo of 2 cats & a dog: résumé, naïve café 😀 — lct tokenizer probe!"


def padding_mask(tokens, eot_id: int | None = None):
    """True for real tokens up to and including the EOT token, False for the padding after it.

    open_clip's tokenizer writes `[SOT, tokens..., EOT, 0, 0, ...]` (it keeps EOT as the last token
    when it truncates). Id 0 is a real token of the CLIP vocabulary ("!"), so the mask is decided by
    the EOT position, not by `tokens != 0`: the first position holding `eot_id`, or, with
    `eot_id=None`, the position of the largest id (EOT is the largest id of the default
    tokenizer; open_clip's `text_global_pool` relies on the same rule). A row without EOT is all
    True. Works on torch tensors and numpy arrays of shape [..., L]."""
    if isinstance(tokens, np.ndarray):
        return padding_mask(torch.from_numpy(np.ascontiguousarray(tokens)), eot_id).numpy()
    length = tokens.shape[-1]
    if eot_id is None:
        pos = tokens.argmax(dim=-1)  # the first maximum
    else:
        hit = tokens == eot_id
        pos = torch.where(hit.any(dim=-1), hit.int().argmax(dim=-1),
                          torch.full(hit.shape[:-1], length - 1, dtype=torch.long, device=tokens.device))
    return torch.arange(length, device=tokens.device) <= pos.unsqueeze(-1)


def token_mask(tokens, eot_id: int | None = None, pad_id: int | None = None):
    """The padding mask of a tokenizer's ids (True = real token): `tokens != pad_id` where the pad
    token is not the EOT token (T5: pad 0, `</s>` 1), else `padding_mask` (open_clip, CLIP: up to
    and including the first EOT). `pad_id` None: open_clip's rule."""
    if pad_id is not None and pad_id != eot_id:
        return tokens != pad_id
    return padding_mask(tokens, eot_id)
