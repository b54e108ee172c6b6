"""TextDiT: a text-conditioned DiT for latent consistency models, in one file.

The network F of SPEC 1 (`lct.consistency.consistency_function` / `Precond` wrap it): DiT
(Peebles & Xie 2023, facebookresearch/DiT `models.py`) with adaLN-Zero blocks, plus
cross-attention to text tokens (as PixArt-alpha), a pooled-text vector added to the conditioning
vector, a learned null condition (SPEC 9) and the non-scaling LayerNorm of iLCT (SPEC 8).

    F = TextDiT(...)(x_in [B,C,H,W], e [B] fp32, text_states=, text_mask=, pooled=, class_labels=,
                     cond_drop=)  ->  [B,C,H,W] fp32

`e` is the time-embedding input `time_embed_scale * ln(sigma) / 4` (computed by the wrapper).

Conditioning vector `c = TimestepEmbedder(e) + PooledEmbedder(pooled)` (text mode), `+ class
embedding` (class mode), or the time embedding alone (unconditional). Each block:

    x = x + gate_msa * SelfAttn(modulate(LN(x), shift_msa, scale_msa))
    x = x + gate_ca  * CrossAttn(modulate(LN(x), shift_ca, scale_ca), text, mask)     (text mode)
    x = x + gate_mlp * MLP(modulate(LN(x), shift_mlp, scale_mlp))

with the 9 (text) or 6 (class / none) modulation vectors from one zero-initialised linear on SiLU(c).
Rows are ordered as DiT's six (shift/scale/gate msa, shift/scale/gate mlp), then the three
cross-attention rows, so the first 6*hidden rows are exactly a DiT block's modulation.

Precision (SPEC 1.1): the per-sample layers (time-embedding sinusoids and MLP, pooled-text MLP,
every adaLN modulation linear, the final projection), the q/k and text norms and the null
condition are fp32 and compute in fp32 (`_keep_in_fp32_modules`: diffusers keeps them fp32 under
`from_pretrained(torch_dtype=...)`, and `to(dtype)` here does too); only the per-token trunk
(patch embedding, attention, MLP, text projection) follows the caller's autocast (training) or,
without autocast, runs in the trunk's own dtype (`model.dtype`: bf16 weights after
`torch_dtype=torch.bfloat16`, or the compute dtype of diffusers' layerwise casting). The residual
stream stays fp32 (fp32 gates times the trunk's outputs), and the output is fp32.

Attention is this file's own (`attention`: torch SDPA or xformers, SPEC 8's norms on q and k), not
diffusers' `Attention` processors: those have no non-scaling LayerNorm and their q/k/v layout
would change every checkpoint's state dict. `set_use_memory_efficient_attention_xformers` switches
the backend; diffusers' attention slicing, processors and attention backends do not apply.

This file imports only torch and diffusers: exports carry it as their `transformer/lct_dit.py`, so
that `DiffusionPipeline.from_pretrained(export, trust_remote_code=True)` runs without lct. The
presets, the builder from a `ModelConfig` and the parameter counts are `lct.models.presets`.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from typing import Any, Mapping

import torch
import torch.nn as nn
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from diffusers.utils import is_accelerate_available
from torch.utils.checkpoint import checkpoint

XFORMERS_HINT = ("xformers is not installed: `pip install xformers` (or `pip install 'lct-consistency[xformers]'`), "
                 "or use model.attention=sdpa")
_AUTOCAST_DEVICES = ("cuda", "cpu", "xpu", "mps", "hpu")
# PixArt's `interpolation_scale` for positions off the trained grid: its transformer's default
# max(sample_size // 64, 1) is 1 for latents up to 64 (512 px with an 8x VAE), lct's sizes.
POS_INTERPOLATION_SCALE = 1.0


def autocast_off(device: torch.device):
    """A context that disables autocast on `device` (a no-op where autocast does not exist, e.g.
    the meta device of parameter counts). The same helper as `lct.consistency.autocast_off`,
    restated here so that this file stands alone in an export."""
    if device.type in _AUTOCAST_DEVICES:
        return torch.autocast(device_type=device.type, enabled=False)
    return contextlib.nullcontext()


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


def _to(x: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    """`x` in the trunk's dtype (a no-op for None: under autocast, or already that dtype)."""
    return x if dtype is None else x.to(dtype)


#################################################################################
#                         Precision-pinned and normalisation layers             #
#################################################################################


class FP32Linear(nn.Linear):
    """A Linear that always computes in fp32, whatever autocast is active (SPEC 1.1).

    Used for the per-sample conditioning layers (time/pooled MLPs, adaLN modulation, final
    projection). It is a subclass on purpose: DeepSpeed's `torch_autocast` marks the parameters of
    modules whose class is *exactly* one of its lower-precision-safe classes (`module.__class__ in
    [nn.Linear, nn.Conv*d]`) for bf16 gradient communication; a subclass is not matched, so these
    weights and their gradients stay fp32 end to end.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with autocast_off(x.device):
            bias = None if self.bias is None else self.bias.float()
            return F.linear(x.float(), self.weight.float(), bias)


class NonScalingLayerNorm(nn.Module):
    """Non-scaling LayerNorm (iLCT, SPEC 8): `y = (h - mean(h)) / sqrt(var(h) + eps) + beta`.

    The scale is fixed at 1: it is neither a parameter nor a buffer, so no optimizer, EMA or
    checkpoint ever sees it. Only the bias `beta` (`self.bias`) is trainable. Normalises over the
    last dimension (biased variance, as `nn.LayerNorm`).

    On CUDA, outside a compiled region, the formula runs as one compiled kernel (`fused`): eager
    layer_norm over 64-wide q/k rows plus the fp32 casts and beta take several passes and were the
    largest single cost of the eager step (bench/RESULTS.md). Inside a compiled model the compiler
    fuses it with its neighbours anyway; on the CPU it runs eagerly. `fused`: "cuda" (default),
    "always", "never" (benchmarks' before rows).
    """

    fused = "cuda"
    _fallback_reason: str | None = None  # set when compiling failed once: eager from then on

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.dim, self.eps = dim, eps
        self.bias = nn.Parameter(torch.zeros(dim))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        with autocast_off(h.device):
            if self._use_fused(h):
                try:
                    # One kernel per width (static), any batch and sequence length (dynamic).
                    torch._dynamo.mark_static(h, h.ndim - 1)
                    for d in range(h.ndim - 1):
                        torch._dynamo.maybe_mark_dynamic(h, d)
                    return _nsln_fused(h, self.bias, self.eps)
                except torch.OutOfMemoryError:
                    raise
                except Exception as err:  # noqa: BLE001 - no compiler for this device: eager is exact
                    NonScalingLayerNorm._fallback_reason = f"{type(err).__name__}: {err}"[:300]
                    warnings.warn(f"the fused non-scaling LayerNorm did not compile "
                                  f"({NonScalingLayerNorm._fallback_reason}); running it eagerly")
            return non_scaling_layer_norm(h, self.bias, self.eps)

    def _use_fused(self, h: torch.Tensor) -> bool:
        if self._fallback_reason is not None or self.fused == "never" or torch.compiler.is_compiling():
            return False
        return self.fused == "always" or h.is_cuda

    def extra_repr(self) -> str:
        return f"{self.dim}, eps={self.eps}, scale fixed at 1"


class AffineLayerNorm(nn.LayerNorm):
    """`nn.LayerNorm` with learned gamma and beta (eps 1e-5), computed in fp32 like the NsLN.

    `nsln: layernorm` (SPEC 8): the authors' DiT baseline that NsLN replaces (timm's
    `Attention(qk_norm=True)` with `norm_layer=nn.LayerNorm`). A subclass, so the state dict is
    `weight`/`bias` as timm's and `isinstance(m, nn.LayerNorm)` holds; returns the input's dtype.
    """

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        with autocast_off(h.device):
            return F.layer_norm(h.float(), self.normalized_shape, self.weight.float(), self.bias.float(),
                                self.eps).to(h.dtype)


NSLN_KINDS = ("qk", "layernorm", "none")


def qk_norm_layer(kind: str, dim: int) -> nn.Module:
    """The q/k norm over head_dim for `model.nsln` (SPEC 8): NsLN (`qk`), affine LayerNorm
    (`layernorm`), or none (`none`)."""
    if kind == "qk":
        return NonScalingLayerNorm(dim)
    if kind == "layernorm":
        return AffineLayerNorm(dim)
    if kind == "none":
        return nn.Identity()
    raise ValueError(f"nsln must be one of {NSLN_KINDS}, got {kind!r}")


def text_input_norm(kind: str, dim: int) -> nn.Module:
    """The text-token input norm for `model.nsln` (SPEC 8): NsLN with `qk`, affine otherwise."""
    if kind == "qk":
        return NonScalingLayerNorm(dim)
    return AffineLayerNorm(dim) if kind == "layernorm" else nn.LayerNorm(dim)


def non_scaling_layer_norm(h: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor:
    """SPEC 8 over the last dimension, statistics and beta in fp32 (beta is not rounded to bf16);
    returns h's dtype. beta is added outside layer_norm: CUDA's layer_norm backward returns no bias
    gradient when the weight is None (seen on an H100, torch 2.11: "invalid gradient at index 2")."""
    return (F.layer_norm(h.float(), (h.shape[-1],), None, None, eps) + bias.float()).to(h.dtype)


_nsln_fused = torch.compile(non_scaling_layer_norm)


#################################################################################
#                      Embedding layers for time, pooled text, classes           #
#################################################################################


class TimestepEmbedder(nn.Module):
    """Sinusoids of `e` (DiT's `timestep_embedding`, dim 256, max_period 10000) then an MLP; fp32."""

    def __init__(self, hidden_size: int, frequency_embedding_size: int = 256):
        super().__init__()
        self.mlp = nn.Sequential(
            FP32Linear(frequency_embedding_size, hidden_size),
            nn.SiLU(),
            FP32Linear(hidden_size, hidden_size),
        )
        self.frequency_embedding_size = frequency_embedding_size

    @staticmethod
    def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000) -> torch.Tensor:
        """[N] (fractional) -> [N, dim] fp32: cos of the first half of frequencies, then sin."""
        half = dim // 2
        freqs = torch.exp(
            -math.log(max_period) * torch.arange(start=0, end=half, dtype=torch.float32, device=t.device) / half
        )
        args = t[:, None].float() * freqs[None]
        embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        if dim % 2:
            embedding = torch.cat([embedding, torch.zeros_like(embedding[:, :1])], dim=-1)
        return embedding

    def forward(self, e: torch.Tensor) -> torch.Tensor:
        with autocast_off(e.device):
            return self.mlp(self.timestep_embedding(e.float(), self.frequency_embedding_size))


class PooledEmbedder(nn.Module):
    """Pooled text features [B, P] -> [B, hidden], an fp32 MLP added to the time embedding."""

    def __init__(self, pooled_dim: int, hidden_size: int):
        super().__init__()
        self.mlp = nn.Sequential(FP32Linear(pooled_dim, hidden_size), nn.SiLU(), FP32Linear(hidden_size, hidden_size))

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        with autocast_off(pooled.device):
            return self.mlp(pooled.float())


#################################################################################
#                                Attention and MLP                              #
#################################################################################


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
              backend: str) -> torch.Tensor:
    """q [B,N,H,d], k/v [B,L,H,d], mask [B,L] bool (True = attend) or None -> [B,N,H,d]."""
    if backend == "xformers":
        import xformers.ops as xops

        bias = None
        if mask is not None:
            b, n, h = q.shape[0], q.shape[1], q.shape[2]
            length = mask.shape[1]
            padded = -(-length // 8) * 8  # xformers wants the bias' last-dim storage 8-aligned
            bias = torch.zeros(b, 1, 1, padded, dtype=q.dtype, device=q.device)
            bias[..., :length].masked_fill_(~mask[:, None, None, :], float("-inf"))
            bias = bias[..., :length].expand(b, h, n, length)
        return xops.memory_efficient_attention(q, k, v, attn_bias=bias)
    attn_mask = None if mask is None else mask[:, None, None, :]  # broadcast to [B,1,1,L]
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=attn_mask)
    return out.transpose(1, 2)


class Attention(nn.Module):
    """Multi-head self-attention, or cross-attention to `context` (with a key-padding mask).

    q and k are normalised over head_dim as `qk_norm` says (`qk_norm_layer`, SPEC 8).
    Dropout (rate `dropout`, training mode, global torch RNG) on the output projection.
    """

    def __init__(self, dim: int, num_heads: int, cross: bool = False, qk_norm: str = "none",
                 dropout: float = 0.0, backend: str = "sdpa"):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.cross, self.dropout, self.backend = cross, dropout, backend
        if cross:
            self.q = nn.Linear(dim, dim)
            self.kv = nn.Linear(dim, 2 * dim)
        else:
            self.qkv = nn.Linear(dim, 3 * dim)
        self.q_norm = qk_norm_layer(qk_norm, self.head_dim)
        self.k_norm = qk_norm_layer(qk_norm, self.head_dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        b, n, dim = x.shape
        h, d = self.num_heads, self.head_dim
        if self.cross:
            q = self.q(x).view(b, n, h, d)
            k, v = self.kv(context).view(b, context.shape[1], 2, h, d).unbind(2)
        else:
            q, k, v = self.qkv(x).view(b, n, 3, h, d).unbind(2)
        # Under CUDA autocast layer_norm returns fp32: bring q, k back to the trunk's dtype.
        q, k = self.q_norm(q).to(v.dtype), self.k_norm(k).to(v.dtype)
        out = attention(q, k, v, mask, self.backend).reshape(b, n, dim)
        return F.dropout(self.proj(out), self.dropout, self.training)


class Mlp(nn.Module):
    """fc1 -> GELU(tanh) -> dropout -> fc2 (DiT's MLP, with the consistency papers' dropout)."""

    def __init__(self, dim: int, hidden: int, dropout: float = 0.0):
        super().__init__()
        self.fc1, self.fc2, self.dropout = nn.Linear(dim, hidden), nn.Linear(hidden, dim), dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.dropout(F.gelu(self.fc1(x), approximate="tanh"), self.dropout, self.training))


#################################################################################
#                                  Blocks                                       #
#################################################################################


class DiTBlock(nn.Module):
    """adaLN-Zero block: self-attention, (text mode) cross-attention, MLP."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0, cross: bool = False,
                 qk_norm: str = "none", dropout: float = 0.0, backend: str = "sdpa"):
        super().__init__()
        self.num_mod = 9 if cross else 6
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads, qk_norm=qk_norm, dropout=dropout, backend=backend)
        if cross:
            self.norm_ca = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
            self.cross_attn = Attention(hidden_size, num_heads, cross=True, qk_norm=qk_norm, dropout=dropout,
                                        backend=backend)
        else:
            self.norm_ca = self.cross_attn = None
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio), dropout)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), FP32Linear(hidden_size, self.num_mod * hidden_size))

    def forward(self, x: torch.Tensor, c: torch.Tensor, text: torch.Tensor | None = None,
                text_mask: torch.Tensor | None = None, dtype: torch.dtype | None = None) -> torch.Tensor:
        """`dtype`: the trunk's compute dtype without autocast (None under autocast, which casts)."""
        mod = self.adaLN_modulation(c).chunk(self.num_mod, dim=1)  # fp32
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mod[:6]
        x = x + gate_msa.unsqueeze(1) * self.attn(_to(modulate(self.norm1(x), shift_msa, scale_msa), dtype))
        if self.cross_attn is not None:
            shift_ca, scale_ca, gate_ca = mod[6:]
            ca = self.cross_attn(_to(modulate(self.norm_ca(x), shift_ca, scale_ca), dtype), text, text_mask)
            x = x + gate_ca.unsqueeze(1) * ca
        x = x + gate_mlp.unsqueeze(1) * self.mlp(_to(modulate(self.norm2(x), shift_mlp, scale_mlp), dtype))
        return x


class FinalLayer(nn.Module):
    """adaLN shift/scale then the (fp32) projection to patch pixels."""

    def __init__(self, hidden_size: int, patch_size: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = FP32Linear(hidden_size, patch_size * patch_size * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), FP32Linear(hidden_size, 2 * hidden_size))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x.float()), shift, scale))


def sincos_pos_embed_2d(dim: int, grid_h: int, grid_w: int, base_size: int | None = None,
                        interpolation_scale: float = 1.0) -> torch.Tensor:
    """DiT/MAE fixed 2-D sin-cos embedding [grid_h*grid_w, dim], row-major tokens; float64 math.

    As in DiT (numpy meshgrid with w first), the first dim/2 channels encode the column index and
    the last dim/2 the row index; each half is [sin(pos*omega), cos(pos*omega)], omega_k =
    10000^(-k/(dim/4)). With `base_size` (the trained grid's side in patches), positions are
    PixArt's for any grid (diffusers `get_2d_sincos_pos_embed`, which `PatchEmbed` recomputes for
    another latent size): row i at `i / (grid_h / base_size) / interpolation_scale`, column j at
    `j / (grid_w / base_size) / interpolation_scale`, computed in float32 as diffusers does; on
    the base grid with scale 1 these are the integers of the plain table.
    """
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4))
    if base_size is None:
        rows_1d, cols_1d = torch.arange(grid_h, dtype=torch.float64), torch.arange(grid_w, dtype=torch.float64)
    else:
        rows_1d = (torch.arange(grid_h, dtype=torch.float32) / (grid_h / base_size) / interpolation_scale).double()
        cols_1d = (torch.arange(grid_w, dtype=torch.float32) / (grid_w / base_size) / interpolation_scale).double()
    rows, cols = torch.meshgrid(rows_1d, cols_1d, indexing="ij")

    def one_d(pos: torch.Tensor) -> torch.Tensor:
        out = pos.reshape(-1)[:, None] * omega[None]
        return torch.cat([torch.sin(out), torch.cos(out)], dim=1)

    return torch.cat([one_d(cols), one_d(rows)], dim=1).float()


#################################################################################
#                                  TextDiT                                      #
#################################################################################


class TextDiT(ModelMixin, ConfigMixin):
    """Text- (or class-) conditioned DiT with adaLN-Zero: F(x_in, e, **cond) -> [B,C,H,W] fp32.

    cond: "text" (cross-attention to `text_states` [B,L,text_dim] with `text_mask` [B,L] bool, plus
    `pooled` [B,pooled_dim] added to c; pooled_dim 0 = no pooled input), "class" (`class_labels`
    [B] with a null row at index num_classes), "none" (unconditional; condition kwargs ignored).
    `cond_drop` [B] bool selects the learned null condition per sample (SPEC 9).
    """

    _supports_gradient_checkpointing = True
    _no_split_modules = ["DiTBlock"]
    # SPEC 1.1: per-sample layers, the q/k and text norms and the null condition stay fp32 under any
    # torch_dtype (diffusers matches these names against parameter-name components).
    _keep_in_fp32_modules = ["t_embedder", "pooled_embedder", "class_embedder", "adaLN_modulation", "final_layer",
                             "q_norm", "k_norm", "text_norm", "null_text_states", "null_pooled"]
    # Layerwise casting (fp8 storage) leaves these alone: the above, and the patch embedding as
    # diffusers leaves every model's ("patch_embed").
    _skip_layerwise_casting_patterns = ["x_embedder", "t_embedder", "pooled_embedder", "class_embedder",
                                        "adaLN_modulation", "final_layer", "norm"]

    @register_to_config
    def __init__(
        self,
        in_channels: int = 4,
        input_height: int = 32,
        input_width: int = 32,
        patch_size: int = 2,
        hidden_size: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        out_channels: int | None = None,
        cond: str = "text",
        num_classes: int = 0,
        text_dim: int = 512,
        text_len: int = 77,
        pooled_dim: int = 512,
        dropout: float = 0.0,
        nsln: str = "qk",
        attention: str = "sdpa",
    ):
        super().__init__()
        problem = config_problem(locals())
        if problem:
            raise ValueError(f"TextDiT: {problem[0]}: {problem[1]}")
        self.cond = cond
        self.in_channels = in_channels
        self.out_ch = out_channels or in_channels
        self.patch = patch_size
        self.grid = (input_height // patch_size, input_width // patch_size)
        self.gradient_checkpointing = False

        self.x_embedder = nn.Conv2d(in_channels, hidden_size, kernel_size=patch_size, stride=patch_size)
        # Fixed, recomputed at construction, so not saved (persistent=False). Other latent sizes
        # (aspect-ratio buckets, another resolution) get PixArt's positions (`pos_embed_for`).
        self.register_buffer("pos_embed", sincos_pos_embed_2d(hidden_size, *self.grid)[None], persistent=False)
        self._pos_cache: dict = {}
        self.t_embedder = TimestepEmbedder(hidden_size)
        if cond == "text":
            self.text_proj = nn.Linear(text_dim, hidden_size)
            self.text_norm = text_input_norm(nsln, hidden_size)  # SPEC 8
            self.pooled_embedder = PooledEmbedder(pooled_dim, hidden_size) if pooled_dim > 0 else None
            # Learned null condition (SPEC 9): token states, and a pooled vector; saved with the model.
            self.null_text_states = nn.Parameter(torch.zeros(text_len, text_dim))
            self.null_pooled = nn.Parameter(torch.zeros(pooled_dim)) if pooled_dim > 0 else None
        elif cond == "class":
            self.class_embedder = nn.Embedding(num_classes + 1, hidden_size)  # row num_classes = null
        self.blocks = nn.ModuleList([
            DiTBlock(hidden_size, num_heads, mlp_ratio, cross=cond == "text", qk_norm=nsln, dropout=dropout,
                     backend=attention)
            for _ in range(depth)
        ])
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_ch)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """DiT's initialisation: xavier-uniform linears, adaLN-Zero, zero final layer (F = 0)."""

        def _basic_init(module: nn.Module) -> None:
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.constant_(module.bias, 0)

        self.apply(_basic_init)
        w = self.x_embedder.weight.data  # patch embedding like nn.Linear
        nn.init.xavier_uniform_(w.view([w.shape[0], -1]))
        nn.init.constant_(self.x_embedder.bias, 0)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        if self.cond == "text":
            if self.pooled_embedder is not None:
                nn.init.normal_(self.pooled_embedder.mlp[0].weight, std=0.02)
                nn.init.normal_(self.pooled_embedder.mlp[2].weight, std=0.02)
                nn.init.normal_(self.null_pooled, std=0.02)
            nn.init.normal_(self.null_text_states, std=0.02)
        elif self.cond == "class":
            nn.init.normal_(self.class_embedder.weight, std=0.02)
        # adaLN-Zero: every gate (self-attention, cross-attention, MLP) starts at 0, so each block is
        # the identity. Only the gates are zeroed on the cross-attention path: zeroing its output
        # projection as well would leave both factors with zero gradient forever.
        for block in self.blocks:
            nn.init.constant_(block.adaLN_modulation[-1].weight, 0)
            nn.init.constant_(block.adaLN_modulation[-1].bias, 0)
        nn.init.constant_(self.final_layer.adaLN_modulation[-1].weight, 0)
        nn.init.constant_(self.final_layer.adaLN_modulation[-1].bias, 0)
        nn.init.constant_(self.final_layer.linear.weight, 0)
        nn.init.constant_(self.final_layer.linear.bias, 0)

    # ------------------------------------------------------------------ diffusers conventions

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        """diffusers' loader. Without accelerate (`low_cpu_mem_usage` unavailable) diffusers refuses
        every model that declares `_keep_in_fp32_modules`; then the stored weights are loaded as
        they are and `torch_dtype` / `dtype` is applied by `to`, which keeps those modules fp32:
        the same model as diffusers' own path gives."""
        if is_accelerate_available() or kwargs.get("low_cpu_mem_usage") or kwargs.get("device_map") is not None:
            return super().from_pretrained(pretrained_model_name_or_path, **kwargs)
        dtype = kwargs.pop("dtype", None) or kwargs.pop("torch_dtype", None)
        kwargs.pop("torch_dtype", None)
        kwargs["low_cpu_mem_usage"] = False
        keep = cls._keep_in_fp32_modules
        cls._keep_in_fp32_modules = None
        try:
            model = super().from_pretrained(pretrained_model_name_or_path, **kwargs)
        finally:
            cls._keep_in_fp32_modules = keep
        return model.to(dtype) if isinstance(dtype, torch.dtype) else model

    def to(self, *args, **kwargs):
        """`torch.nn.Module.to`; the modules of `_keep_in_fp32_modules` and the positional embedding
        stay fp32 whatever dtype the rest takes (SPEC 1.1), so `pipe.to(torch.bfloat16)` gives what
        `torch_dtype=torch.bfloat16` gives."""
        out = super().to(*args, **kwargs)
        self._keep_fp32()
        return out

    def _keep_fp32(self) -> None:
        keep = set(self._keep_in_fp32_modules or ())
        for name, p in self.named_parameters():
            if p.is_floating_point() and p.dtype != torch.float32 and keep.intersection(name.split(".")):
                p.data = p.data.float()
        if self.pos_embed.is_floating_point() and self.pos_embed.dtype != torch.float32:
            self.pos_embed = self.pos_embed.float()

    def _trunk_dtype(self) -> torch.dtype:
        """The trunk's compute dtype, what `self.dtype` says, read off one trunk layer (`self.dtype`
        walks every module: measurable per forward in fp32 / TF32 training): its layerwise-casting
        compute dtype where diffusers' hook is on, else its weights' dtype."""
        layer = self.blocks[0].mlp.fc1
        registry = getattr(layer, "_diffusers_hook", None)
        hook = registry.get_hook("layerwise_casting") if registry is not None else None
        return hook.compute_dtype if hook is not None else layer.weight.dtype

    def set_use_memory_efficient_attention_xformers(self, valid: bool = True, attention_op=None) -> None:
        """diffusers' xformers switch (`pipe.enable_xformers_memory_efficient_attention()`): the
        attention backend of every block (the config's `attention` is what training used)."""
        if valid:
            problem = config_problem({**self.config, "attention": "xformers"})
            if problem:
                raise ValueError(problem[1])
        backend = "xformers" if valid else "sdpa"
        for m in self.modules():
            if isinstance(m, Attention):
                m.backend = backend

    def set_attention_backend(self, backend: str) -> None:
        raise ValueError(f"TextDiT runs its own attention (torch SDPA or xformers, with SPEC 8's q/k norms), not "
                         f"diffusers' attention processors: backend {backend!r} does not apply; "
                         "use enable_xformers_memory_efficient_attention() for xformers")

    def compile_blocks(self, **kwargs: Any) -> None:
        """`torch.compile` each block in place (parameter names unchanged); kwargs go to compile."""
        for block in self.blocks:
            block.compile(**kwargs)

    def pos_embed_for(self, grid_h: int, grid_w: int, device: torch.device) -> torch.Tensor:
        """[1, grid_h*grid_w, hidden] fp32 positions of a latent grid: the table itself on the
        trained grid, else PixArt's (`sincos_pos_embed_2d` with base_size = the trained grid's
        height in patches, as diffusers' `PatchEmbed`, and `POS_INTERPOLATION_SCALE`), cached per
        grid and device."""
        if (grid_h, grid_w) == self.grid:
            return self.pos_embed
        key = (grid_h, grid_w, str(device))
        if key not in self._pos_cache:
            self._pos_cache[key] = sincos_pos_embed_2d(self.pos_embed.shape[-1], grid_h, grid_w, self.grid[0],
                                                       POS_INTERPOLATION_SCALE)[None].to(device)
        return self._pos_cache[key]

    def unpatchify(self, x: torch.Tensor, grid: tuple[int, int] | None = None) -> torch.Tensor:
        """[B, T, p*p*C] -> [B, C, H, W] on `grid` (patches; default the trained one)."""
        p, c, (gh, gw) = self.patch, self.out_ch, grid or self.grid
        x = x.reshape(x.shape[0], gh, gw, p, p, c)
        x = torch.einsum("nhwpqc->nchpwq", x)
        return x.reshape(x.shape[0], c, gh * p, gw * p)

    def _text_condition(self, text_states, text_mask, pooled, cond_drop):
        """Apply the learned null condition where cond_drop; returns (states, mask, pooled)."""
        if text_states is None:
            raise ValueError("TextDiT(cond='text') needs text_states [B, L, text_dim] "
                             "(cond_drop selects the null condition)")
        b, length, _ = text_states.shape
        text_states = text_states.to(self.null_text_states.dtype)
        if text_mask is None:
            text_mask = torch.ones(b, length, dtype=torch.bool, device=text_states.device)
        text_mask = text_mask.to(torch.bool)
        if self.pooled_embedder is not None:
            if pooled is None:
                raise ValueError("TextDiT(cond='text', pooled_dim > 0) needs pooled [B, pooled_dim]")
            pooled = pooled.to(self.null_pooled.dtype)
        if cond_drop is not None:
            drop = cond_drop.to(device=text_states.device, dtype=torch.bool)
            null, null_len = self.null_text_states, self.null_text_states.shape[0]
            if length < null_len:
                raise ValueError(f"text_states have {length} tokens, fewer than the learned null "
                                 f"condition's {null_len}")
            # Longer (padded) captions: the null condition is padded with masked-out positions.
            null = F.pad(null, (0, 0, 0, length - null_len))
            null_mask = torch.arange(length, device=drop.device) < null_len
            text_states = torch.where(drop[:, None, None], null[None], text_states)
            text_mask = torch.where(drop[:, None], null_mask[None], text_mask)
            if self.pooled_embedder is not None:
                pooled = torch.where(drop[:, None], self.null_pooled[None], pooled)
        # A caption with no real token would make the softmax 0/0 (NaN): let it attend everywhere.
        text_mask = text_mask | ~text_mask.any(dim=1, keepdim=True)
        return text_states, text_mask, pooled

    def forward(
        self,
        x: torch.Tensor,
        e: torch.Tensor,
        text_states: torch.Tensor | None = None,
        text_mask: torch.Tensor | None = None,
        pooled: torch.Tensor | None = None,
        class_labels: torch.Tensor | None = None,
        cond_drop: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x [B,C,H,W] (already c_in-scaled), e [B] fp32 time-embedding input -> F [B,C,H,W] fp32."""
        b, ch, hgt, wid = x.shape
        if ch != self.in_channels or hgt % self.patch or wid % self.patch or not hgt or not wid:
            raise ValueError(f"TextDiT expects inputs [B, {self.in_channels}, H, W] with H and W multiples of the "
                             f"patch size {self.patch}, got {list(x.shape)}")
        grid = (hgt // self.patch, wid // self.patch)
        # Without autocast the trunk computes in its own dtype (bf16 weights, or layerwise casting's
        # compute dtype); fp32 inputs are cast at its entries. Under autocast, autocast casts.
        autocast = x.device.type in _AUTOCAST_DEVICES and torch.is_autocast_enabled(x.device.type)
        dt = None if autocast else self._trunk_dtype()
        x = x if dt is None else x.to(self.x_embedder.weight.dtype)  # not layerwise-cast: its own dtype
        pos = self.pos_embed_for(*grid, x.device).float()
        h = self.x_embedder(x).flatten(2).transpose(1, 2).float() + pos  # [B, T, hidden], fp32
        c = self.t_embedder(e.reshape(b) if e.numel() == b else e.expand(b))
        text = mask = None
        if self.cond == "text":
            text_states, mask, pooled = self._text_condition(text_states, text_mask, pooled, cond_drop)
            # Once per forward, shared by all blocks; the norm runs in fp32 (CUDA autocast does too).
            text = _to(self.text_norm(self.text_proj(_to(text_states, dt)).float()), dt)
            if self.pooled_embedder is not None:
                c = c + self.pooled_embedder(pooled)
        elif self.cond == "class":
            if class_labels is None:
                raise ValueError("TextDiT(cond='class') needs class_labels [B]")
            labels = class_labels.long()
            if cond_drop is not None:
                labels = torch.where(cond_drop.to(torch.bool), torch.full_like(labels, self.config.num_classes), labels)
            c = c + self.class_embedder(labels).float()
        for block in self.blocks:
            if self.gradient_checkpointing and torch.is_grad_enabled():
                # use_reentrant=False re-runs the block with the saved RNG state: same dropout masks.
                h = checkpoint(block, h, c, text, mask, dt, use_reentrant=False)
            else:
                h = block(h, c, text, mask, dt)
        return self.unpatchify(self.final_layer(h, c), grid).float()


def config_problem(args: Mapping[str, Any]) -> tuple[str, str] | None:
    """(config key, what is wrong) for TextDiT arguments that cannot build a network, else None:
    the installed attention backend and the sizes that must divide each other (the values of the
    config's keys are checked by its schema). `lct.models.presets.dit_kwargs` raises it as the
    trainer's one-line ConfigError; the constructor raises it as a ValueError."""
    if args["nsln"] not in NSLN_KINDS:
        return "model.nsln", f"{args['nsln']!r} is not one of {', '.join(NSLN_KINDS)}"
    if args["attention"] not in ("sdpa", "xformers"):
        return "model.attention", f"{args['attention']!r} is not one of sdpa, xformers"
    if args["attention"] == "xformers":
        try:
            import xformers.ops  # noqa: F401
        except ImportError:
            return "model.attention", XFORMERS_HINT
    hidden, heads, p = args["hidden_size"], args["num_heads"], args["patch_size"]
    if hidden % heads:
        return "model.num_heads", f"hidden_size {hidden} is not divisible by num_heads {heads}"
    if hidden % 4:
        return "model.hidden_size", f"{hidden} must be a multiple of 4 (2-D sin-cos positional embedding)"
    if args["input_height"] % p or args["input_width"] % p:
        return "model.patch_size", f"latent {args['input_height']}x{args['input_width']} is not divisible by patch {p}"
    if args["cond"] == "text" and (args["text_dim"] < 1 or args["text_len"] < 1 or args["pooled_dim"] < 0):
        return "model.cond", "text mode needs text_dim >= 1, text_len >= 1 and pooled_dim >= 0"
    return None
