"""Tiny stand-ins for the flow-matching families (SPEC 15), built offline from the real classes:

    gemma_dir = make_tiny_gemma(tmp / "gemma")          # Gemma2Model + a Gemma-layout BPE tokenizer
    sd3_dir = make_tiny_sd3_towers(tmp / "sd3")         # text_encoder{,_2,_3}/ + tokenizer{,_2,_3}/
    sana = tiny_sana(); sd3 = tiny_sd3()                # transformers with perturbed weights
    dc = tiny_dc_ae(); kl = tiny_sd3_vae()              # AutoencoderDC, AutoencoderKL with a shift

The Gemma tokenizer follows Gemma's layout (<pad> 0, <eos> 1, <bos> 2, <unk> 3, `<bos> $A`, no
EOS, spaces as a "▁" prefix of the next piece, as SentencePiece splits them), trained on the
captions and Sana's instruction so the instruction has real multi-character pieces.
"""

from __future__ import annotations

import os
from pathlib import Path

from helpers_hf import CAPTIONS, make_tiny_t5, make_tiny_tokenizer

GEMMA_DIM = 16          # tiny Gemma-2 hidden size = the tiny Sana's caption_channels
SD3_JOINT = 32          # tiny T5 d_model = the tiny SD3's joint_attention_dim
SD3_CLIP_DIMS = (8, 12)  # tiny CLIP-L / CLIP-G widths = their projection dims; pooled 20
SD3_POOLED = sum(SD3_CLIP_DIMS)


def _perturbed(model, seed: int, scale: float = 0.05):
    import torch

    with torch.no_grad():
        g = torch.Generator().manual_seed(seed)
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))
    return model.eval()


def make_gemma_tokenizer(directory: str | os.PathLike, vocab_size: int = 160) -> str:
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    from lct.hf_text import SANA_INSTRUCTION

    directory = Path(directory)
    if (directory / "tokenizer_config.json").is_file():
        return str(directory)
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.normalizer = normalizers.Replace(" ", "▁")
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="never")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="never")
    texts = CAPTIONS + ["\n".join(SANA_INSTRUCTION)] * 4
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=vocab_size,
                                                       special_tokens=["<pad>", "<eos>", "<bos>", "<unk>"]))
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 2)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
                                   unk_token="<unk>", padding_side="right")
    fast.save_pretrained(str(directory))
    return str(directory)


def make_tiny_gemma(directory: str | os.PathLike, seed: int = 0, layout: str = "flat") -> str:
    """A random `Gemma2Model` (2 layers, hidden GEMMA_DIM) with the Gemma-layout tokenizer;
    layout "pipeline" writes text_encoder/ and tokenizer/ subfolders."""
    import torch
    from transformers import AutoTokenizer, Gemma2Config, Gemma2Model

    directory = Path(directory)
    tok = AutoTokenizer.from_pretrained(make_gemma_tokenizer(directory / "_tok"))
    cfg = Gemma2Config(vocab_size=len(tok), hidden_size=GEMMA_DIM, intermediate_size=32, num_hidden_layers=2,
                       num_attention_heads=2, num_key_value_heads=1, head_dim=8, max_position_embeddings=1024,
                       sliding_window=64, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                       bos_token_id=tok.bos_token_id, attn_implementation="eager")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = _perturbed(Gemma2Model(cfg), seed + 1)
    model_dir, tok_dir = ((directory / "text_encoder", directory / "tokenizer") if layout == "pipeline"
                          else (directory, directory))
    model.save_pretrained(str(model_dir))
    tok.save_pretrained(str(tok_dir))
    return str(directory)


def make_tiny_sd3_towers(directory: str | os.PathLike, seed: int = 0, t5_max_length: int = 12) -> str:
    """text_encoder/ (CLIP-L), text_encoder_2/ (CLIP-G), text_encoder_3/ (T5) and their tokenizers,
    as an SD3 pipeline folder lays them out. Both CLIP tokenizers share one vocabulary; CLIP-L pads
    with its end-of-text token, CLIP-G with another token (SD3's CLIP-G pads with "!")."""
    import torch
    from transformers import AutoTokenizer, CLIPTextConfig, CLIPTextModelWithProjection

    directory = Path(directory)
    tok_dir = make_tiny_tokenizer(directory / "_clip_tok", clip_layout=True, model_max_length=20)
    tok_l = AutoTokenizer.from_pretrained(tok_dir)
    tok_g = AutoTokenizer.from_pretrained(tok_dir)
    tok_g.pad_token = tok_g.convert_ids_to_tokens(5)
    for i, (width, sub, tok) in enumerate(zip(SD3_CLIP_DIMS, ("", "_2"), (tok_l, tok_g))):
        cfg = CLIPTextConfig(vocab_size=len(tok), hidden_size=width, intermediate_size=2 * width, num_hidden_layers=2,
                             num_attention_heads=2, max_position_embeddings=24, projection_dim=width,
                             bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok_l.pad_token_id)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed + i)
            model = _perturbed(CLIPTextModelWithProjection(cfg), seed + 10 + i)
        model.save_pretrained(str(directory / f"text_encoder{sub}"))
        tok.save_pretrained(str(directory / f"tokenizer{sub}"))
    t5 = make_tiny_t5(directory / "_t5", seed=seed + 3)
    from transformers import T5Config, T5EncoderModel

    cfg = T5Config.from_pretrained(t5)
    cfg.d_model, cfg.d_kv, cfg.d_ff = SD3_JOINT, 8, 48
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 4)
        T5EncoderModel(cfg).eval().save_pretrained(str(directory / "text_encoder_3"))
    AutoTokenizer.from_pretrained(t5).save_pretrained(str(directory / "tokenizer_3"))
    return str(directory)


def tiny_sana_config(**kw) -> dict:
    return dict(dict(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8, num_layers=2,
                     num_cross_attention_heads=2, cross_attention_head_dim=8, cross_attention_dim=16,
                     caption_channels=GEMMA_DIM, mlp_ratio=2.5, sample_size=8, patch_size=1), **kw)


def tiny_sana(seed: int = 0, **kw):
    import torch
    from diffusers import SanaTransformer2DModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return _perturbed(SanaTransformer2DModel(**tiny_sana_config(**kw)), seed + 100)


def tiny_sd3_config(**kw) -> dict:
    return dict(dict(sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=2, attention_head_dim=8,
                     num_attention_heads=2, joint_attention_dim=SD3_JOINT, caption_projection_dim=16,
                     pooled_projection_dim=SD3_POOLED, pos_embed_max_size=16, dual_attention_layers=(0,),
                     qk_norm="rms_norm"), **kw)


def tiny_sd3(seed: int = 0, **kw):
    import torch
    from diffusers import SD3Transformer2DModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return _perturbed(SD3Transformer2DModel(**tiny_sd3_config(**kw)), seed + 100)


def tiny_dc_ae(seed: int = 0):
    """An `AutoencoderDC` with 4 latent channels and downsampling 4 (Sana's is f32c32)."""
    import torch
    from diffusers import AutoencoderDC

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return AutoencoderDC(in_channels=3, latent_channels=4, attention_head_dim=4,
                             encoder_block_types=("ResBlock", "ResBlock", "EfficientViTBlock"),
                             decoder_block_types=("ResBlock", "ResBlock", "EfficientViTBlock"),
                             encoder_block_out_channels=(8, 8, 8), decoder_block_out_channels=(8, 8, 8),
                             encoder_layers_per_block=(1, 1, 1), decoder_layers_per_block=(1, 1, 1),
                             encoder_qkv_multiscales=((), (), (5,)), decoder_qkv_multiscales=((), (), (5,)),
                             scaling_factor=0.41407).eval()


def tiny_sd3_vae(seed: int = 0):
    """An `AutoencoderKL` with SD3's latent convention (shift_factor and scaling_factor), 4 channels."""
    import torch
    from diffusers import AutoencoderKL

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return AutoencoderKL(block_out_channels=(8, 8), down_block_types=("DownEncoderBlock2D",) * 2,
                             up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1, norm_num_groups=4,
                             latent_channels=4, scaling_factor=1.5305, shift_factor=0.0609,
                             use_quant_conv=False, use_post_quant_conv=False).eval()
