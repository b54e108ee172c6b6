"""Tiny transformers / diffusers stand-ins for the PixArt path, built offline from the real classes.

    tok_dir = make_tiny_tokenizer(tmp / "tok")          # a Unigram tokenizer trained on CAPTIONS
    t5_dir = make_tiny_t5(tmp / "t5", tok_dir)          # T5EncoderModel + tokenizer (save_pretrained)
    pipe_dir = make_tiny_pixart_pipeline(tmp / "pipe")  # transformer/ scheduler/ text_encoder/ tokenizer/
    transformer = tiny_pixart(out_channels=8)           # PixArtTransformer2DModel, non-trivial weights

The tokenizer is a `tokenizers` Unigram model trained on a few captions, wrapped as a transformers
fast tokenizer with T5's special-token layout (<pad> = 0, </s> = 1, <unk> = 2, `$A </s>`).
"""

from __future__ import annotations

import os
from pathlib import Path

CAPTIONS = [
    "a red circle on a blue background", "two green squares next to a yellow triangle",
    "a photo of a cat sitting on a wooden chair", "a small dog running across the grass",
    "an orange sunset over the sea with boats", "a bowl of fruit: apples, pears and grapes",
    "three people walking in the rain under umbrellas", "a city street at night with neon lights",
]
TEXT_DIM = 16  # the tiny T5's d_model = the tiny PixArt's caption_channels


def make_tiny_tokenizer(directory: str | os.PathLike, *, clip_layout: bool = False, vocab_size: int = 96,
                        model_max_length: int = 16) -> str:
    """Train a Unigram tokenizer on CAPTIONS and save it as a transformers fast tokenizer.
    T5 layout: pad 0, eos 1, unk 2, `$A </s>`. `clip_layout`: bos 0, eos 1 = pad, unk 2, `<s> $A </s>`."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    directory = Path(directory)
    if (directory / "tokenizer_config.json").is_file():
        return str(directory)
    specials = ["<s>", "</s>", "<unk>"] if clip_layout else ["<pad>", "</s>", "<unk>"]
    tok = Tokenizer(models.Unigram())
    tok.normalizer = normalizers.NFKC()
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    tok.train_from_iterator(CAPTIONS, trainers.UnigramTrainer(vocab_size=vocab_size, special_tokens=specials,
                                                              unk_token="<unk>"))
    if clip_layout:
        tok.post_processor = processors.TemplateProcessing(single="<s> $A </s>", special_tokens=[("<s>", 0), ("</s>", 1)])
        fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="</s>",
                                       unk_token="<unk>", model_max_length=model_max_length)
    else:
        tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
        fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", pad_token="<pad>", unk_token="<unk>",
                                       model_max_length=model_max_length)
    fast.save_pretrained(str(directory))
    return str(directory)


def make_tiny_t5(directory: str | os.PathLike, tokenizer_dir: str | None = None, seed: int = 0,
                 layout: str = "flat") -> str:
    """A random T5 v1.1-style encoder (gated GELU, d_model TEXT_DIM) with the tiny tokenizer.
    layout "flat": model and tokenizer files in one folder; "pipeline": `text_encoder/` and
    `tokenizer/` subfolders (as a diffusers pipeline)."""
    import torch
    from transformers import AutoTokenizer, T5Config, T5EncoderModel

    directory = Path(directory)
    tok = AutoTokenizer.from_pretrained(tokenizer_dir or make_tiny_tokenizer(directory / "_tok"))
    cfg = T5Config(vocab_size=len(tok), d_model=TEXT_DIM, d_kv=4, d_ff=32, num_layers=2, num_heads=4,
                   relative_attention_num_buckets=8, relative_attention_max_distance=16,
                   feed_forward_proj="gated-gelu", pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                   decoder_start_token_id=tok.pad_token_id, dropout_rate=0.0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = T5EncoderModel(cfg).eval()
    model_dir, tok_dir = ((directory / "text_encoder", directory / "tokenizer") if layout == "pipeline"
                          else (directory, directory))
    model.save_pretrained(str(model_dir))
    tok.save_pretrained(str(tok_dir))
    return str(directory)


def make_tiny_clip_text(directory: str | os.PathLike, projection: bool = False, seed: int = 0) -> str:
    """A random `CLIPTextModel` (or `...WithProjection`) with a CLIP-layout tiny tokenizer."""
    import torch
    from transformers import AutoTokenizer, CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    directory = Path(directory)
    tok = AutoTokenizer.from_pretrained(make_tiny_tokenizer(directory / "_tok", clip_layout=True,
                                                            model_max_length=24))
    cfg = CLIPTextConfig(vocab_size=len(tok), hidden_size=TEXT_DIM, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=32, projection_dim=12,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = (CLIPTextModelWithProjection if projection else CLIPTextModel)(cfg).eval()
    model.save_pretrained(str(directory))
    tok.save_pretrained(str(directory))
    return str(directory)


def tiny_pixart_config(out_channels: int = 8, sample_size: int = 8, micro: bool = False, **kw) -> dict:
    # inner dim 24: a multiple of 3 (micro-conditions split it in thirds), = cross_attention_dim as in PixArt
    return dict(num_attention_heads=2, attention_head_dim=12, in_channels=4, out_channels=out_channels, num_layers=2,
                cross_attention_dim=24, caption_channels=TEXT_DIM, sample_size=sample_size, patch_size=2,
                norm_type="ada_norm_single", num_embeds_ada_norm=1000, use_additional_conditions=micro, **kw)


def tiny_pixart(seed: int = 0, **kw):
    """A tiny `PixArtTransformer2DModel` whose weights are all perturbed away from their init (so
    no path is trivially zero)."""
    import torch
    from diffusers import PixArtTransformer2DModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = PixArtTransformer2DModel(**tiny_pixart_config(**kw))
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.05 * torch.randn_like(p))
    return model.eval()


def make_tiny_pixart_pipeline(directory: str | os.PathLike, prediction_type: str = "epsilon", **kw) -> str:
    """A diffusers-pipeline-shaped folder: transformer/ (tiny PixArt), scheduler/ (DDPM, PixArt's
    betas), text_encoder/ + tokenizer/ (tiny T5)."""
    from diffusers import DDPMScheduler

    directory = Path(directory)
    tiny_pixart(**kw).save_pretrained(str(directory / "transformer"))
    DDPMScheduler(num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear",
                  prediction_type=prediction_type, variance_type="learned_range",
                  clip_sample=False).save_pretrained(str(directory / "scheduler"))
    make_tiny_t5(directory, layout="pipeline")
    return str(directory)
