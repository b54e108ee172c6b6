"""The text encoder of an exported pipeline: transformers' CLIP form of an open_clip tower.

`to_clip_text_model` gives `CLIPTextModelWithProjection` + `CLIPTokenizer` where the open_clip tower
maps onto them exactly: an OpenAI-style text transformer (pre-LN blocks, causal mask, no
LayerScale, exact or quick GELU, EOT pooling, projection without bias), open_clip's
`SimpleTokenizer` (its bundled BPE vocab becomes the CLIPTokenizer's, built offline). The mapping is
checked structurally (every weight mapped) and numerically (token states and pooled feature of
probe captions within `CLIP_ATOL`) before it is used. Code without lct loads these two folders
with transformers alone. `last_hidden_state` is open_clip's state after `ln_final`, `text_embeds`
is `encode_text`'s pooled feature; the padding mask is open_clip's (`lct.tokens.padding_mask`).
Tokens: open_clip cleans captions with ftfy + html.unescape before its BPE, which a `tokenizers`
normaliser cannot do, so the pipeline applies open_clip's cleaning (`lct.pipeline.clean_prompt`)
first. Every other open_clip tower becomes `lct.openclip_text.OpenCLIPTextModel`; a transformers
tower of the data (T5, CLIP: `lct.hf_text`) is the pipeline's text encoder as it is.
"""

from __future__ import annotations

import torch

from lct.pipeline import clip_token_ids, encode_text

CLIP_ATOL = 1e-4  # fp32 token states of two implementations of the same tower (measured: ~1e-6)
PROBES = ["a photo of a cat", "", "A red bus on a street, at night; résumé & café 😀", "Tom &amp; Jerry ＡＢＣ",
          "<|endoftext|> x<|startoftext|>y <end_of_text> it's", "two small blue squares at the top left " * 9]


# ----------------------------------------------------------------------------------------------
# open_clip -> transformers
# ----------------------------------------------------------------------------------------------


def _clip_state(text: torch.nn.Module, layers: int) -> dict[str, torch.Tensor]:
    """open_clip text-tower state dict -> CLIPTextModelWithProjection's (raises KeyError on any
    weight it cannot place, e.g. LayerScale gammas)."""
    src = dict(text.state_dict())
    out: dict[str, torch.Tensor] = {}

    def take(key: str) -> torch.Tensor:
        return src.pop(key)

    out["text_model.embeddings.token_embedding.weight"] = take("token_embedding.weight")
    out["text_model.embeddings.position_embedding.weight"] = take("positional_embedding")
    for i in range(layers):
        a, b = f"transformer.resblocks.{i}.", f"text_model.encoder.layers.{i}."
        for n in ("weight", "bias"):
            q, k, v = take(f"{a}attn.in_proj_{n}").chunk(3)
            out[f"{b}self_attn.q_proj.{n}"], out[f"{b}self_attn.k_proj.{n}"], out[f"{b}self_attn.v_proj.{n}"] = q, k, v
            out[f"{b}self_attn.out_proj.{n}"] = take(f"{a}attn.out_proj.{n}")
            out[f"{b}layer_norm1.{n}"] = take(f"{a}ln_1.{n}")
            out[f"{b}layer_norm2.{n}"] = take(f"{a}ln_2.{n}")
            out[f"{b}mlp.fc1.{n}"] = take(f"{a}mlp.c_fc.{n}")
            out[f"{b}mlp.fc2.{n}"] = take(f"{a}mlp.c_proj.{n}")
    for n in ("weight", "bias"):
        out[f"text_model.final_layer_norm.{n}"] = take(f"ln_final.{n}")
    proj = take("text_projection") if "text_projection" in src else take("text_projection.weight").t()
    out["text_projection.weight"] = proj.t()
    src.pop("attn_mask", None)
    if src:
        raise KeyError(f"open_clip weights without a CLIPTextModel counterpart: {sorted(src)[:4]}")
    return {k: v.detach().clone().contiguous() for k, v in out.items()}


def _clip_tokenizer(tok, context_length: int):
    """open_clip's SimpleTokenizer as a CLIPTokenizer (same vocab, merges and special tokens;
    `clip_token_ids` pads with open_clip's id 0). `check_clip_form` compares the ids on probes,
    including literal special-token strings."""
    from transformers import CLIPTokenizer

    merges = [m for m, _ in sorted(tok.bpe_ranks.items(), key=lambda kv: kv[1])]
    sot, eot = tok.decoder[tok.sot_token_id], tok.decoder[tok.eot_token_id]
    hf = CLIPTokenizer(vocab=dict(tok.encoder), merges=merges, bos_token=sot, eos_token=eot, unk_token=eot,
                       pad_token=eot, model_max_length=context_length)
    return hf


def to_clip_text_model(encoder) -> tuple[object, object] | str:
    """(CLIPTextModelWithProjection, CLIPTokenizer) equal to the open_clip `encoder`
    (`lct.text.TextEncoder`), or the reason the tower does not map."""
    try:
        from open_clip.tokenizer import SimpleTokenizer
        from open_clip.transformer import QuickGELU
        from transformers import CLIPTextConfig, CLIPTextModelWithProjection
    except ImportError as err:
        return f"transformers is not installed ({err})"
    text = encoder.text
    if encoder.layout != "CLIP":
        return f"open_clip layout {encoder.layout} (only the inlined CLIP text tower maps)"
    if not isinstance(encoder.tokenizer, SimpleTokenizer) or encoder.tokenizer.reduction_fn is not None \
            or encoder.tokenizer.clean_fn.__name__ != "_clean_lower":
        return f"tokenizer {type(encoder.tokenizer).__name__} is not open_clip's default SimpleTokenizer"
    if text.pool_type != "argmax" or text.attn_mask is None:
        return f"pooling {text.pool_type!r} / attention mask: not CLIP's EOT pooling with a causal mask"
    blocks = list(text.transformer.resblocks)
    act = blocks[0].mlp.gelu
    if isinstance(act, QuickGELU):
        hidden_act = "quick_gelu"
    elif isinstance(act, torch.nn.GELU) and act.approximate == "none":
        hidden_act = "gelu"
    else:
        return f"activation {type(act).__name__}"
    width = text.token_embedding.weight.shape[1]
    proj = text.text_projection
    proj_dim = proj.out_features if isinstance(proj, torch.nn.Linear) else proj.shape[1]
    if isinstance(proj, torch.nn.Linear) and proj.bias is not None:
        return "text projection with a bias"
    cfg = CLIPTextConfig(vocab_size=text.token_embedding.weight.shape[0], hidden_size=width,
                         intermediate_size=blocks[0].mlp.c_fc.out_features, projection_dim=proj_dim,
                         num_hidden_layers=len(blocks), num_attention_heads=blocks[0].attn.num_heads,
                         max_position_embeddings=text.positional_embedding.shape[0], hidden_act=hidden_act,
                         layer_norm_eps=float(blocks[0].ln_1.eps), attention_dropout=0.0,
                         bos_token_id=encoder.tokenizer.sot_token_id, eos_token_id=encoder.eot_id, pad_token_id=0)
    try:
        state = _clip_state(text, len(blocks))
    except KeyError as err:
        return str(err).strip("'\"")
    with torch.random.fork_rng(devices=[]):
        model = CLIPTextModelWithProjection(cfg)
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [m for m in missing if not m.endswith("position_ids")]
    if missing or unexpected:
        return f"CLIPTextModel weights not filled: {missing[:3]} {unexpected[:3]}"
    model = model.eval().requires_grad_(False)
    try:
        tokenizer = _clip_tokenizer(encoder.tokenizer, encoder.context_length)
    except TypeError as err:  # transformers 4's CLIPTokenizer takes vocab/merges files
        return f"CLIPTokenizer could not be built from open_clip's vocab ({err}); needs transformers >= 5"
    reason = check_clip_form(encoder, model, tokenizer)
    return reason if reason else (model, tokenizer)


def check_clip_form(encoder, model, tokenizer, prompts: list[str] = PROBES) -> str | None:
    """None when the transformers form gives open_clip's token ids, states, mask and pooled
    feature on `prompts` (states and pooled within CLIP_ATOL); else what differs."""
    from lct.tokens import PROBE

    prompts = list(prompts) + [PROBE]
    dev = encoder.device
    model = model.to(dev)
    ids = encoder.tokenize(prompts)
    hf_ids = clip_token_ids(tokenizer, prompts)
    if not torch.equal(ids, hf_ids):
        return "CLIPTokenizer's token ids differ from open_clip's"
    states, mask, pooled = encoder(ids)
    got_states, got_mask, got_pooled = encode_text(model, tokenizer, prompts, dev)
    if not torch.equal(mask, got_mask):
        return "padding masks differ"
    for name, a, b in (("token states", states, got_states), ("pooled", pooled, got_pooled)):
        err = (a - b).abs().max().item()
        if not err <= CLIP_ATOL:
            return f"{name} differ by {err:.3g} (> {CLIP_ATOL})"
    return None
