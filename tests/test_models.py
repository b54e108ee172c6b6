"""TextDiT, NonScalingLayerNorm and Precond (SPEC 1, 1.1, 8, 9): tiny widths, CPU, seconds."""

import math
import sys

import pytest
import torch
import torch.nn as nn

from lct.config import ModelConfig
from lct.errors import ConfigError, UserError
from lct.models import (DIT_PRESETS, FP32Linear, NonScalingLayerNorm, Precond, TextDiT, build_dit,
                        count_parameters, load_state_dict_checked)
from lct.models import dit as dit_module
from lct.consistency import scalings

TINY = dict(in_channels=4, input_height=8, input_width=8, patch_size=2, hidden_size=32, depth=2,
            num_heads=4, text_dim=24, text_len=6, pooled_dim=12)


def make(seed: int = 0, **kw) -> TextDiT:
    torch.manual_seed(seed)
    return TextDiT(**{**TINY, **kw})


def perturb(model: nn.Module, std: float = 0.1, seed: int = 1) -> nn.Module:
    """Move every parameter off its (zero) initialisation so outputs and gradients are non-trivial."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * std)
    return model


def inputs(b: int = 3, length: int = 6, real: int = 4, seed: int = 0, text_dim: int = 24, pooled_dim: int = 12):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, 4, 8, 8, generator=g)
    e = 250 * torch.log(torch.rand(b, generator=g) * 80 + 0.002)
    states = torch.randn(b, length, text_dim, generator=g)
    mask = torch.arange(length)[None].expand(b, length) < real
    pooled = torch.randn(b, pooled_dim, generator=g)
    return x, e, dict(text_states=states, text_mask=mask, pooled=pooled)


# ----------------------------------------------------------------------------------------------
# Shapes, presets, builder
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", list(DIT_PRESETS))
@pytest.mark.parametrize("cond", ["text", "class", "none"])
def test_every_preset_at_tiny_width(arch, cond):
    cfg = ModelConfig(arch=arch, hidden_size=32, depth=1, num_heads=4, cond=cond, num_classes=5, dropout=0.1)
    model = build_dit(cfg, (4, 8, 16), text_dim=24, text_len=6, pooled_dim=12)
    assert model.config.patch_size == DIT_PRESETS[arch]["patch_size"]
    assert len(model.blocks) == 1 and model.config.hidden_size == 32
    x = torch.randn(2, 4, 8, 16)
    e = torch.tensor([-1500.0, 1000.0])
    cond_kw = {"cond_drop": torch.tensor([True, False])}  # samplers always pass it; 'none' ignores it
    if cond == "text":
        _, _, t = inputs(2)
        cond_kw.update(t)
    elif cond == "class":
        cond_kw["class_labels"] = torch.tensor([0, 4])
    out = perturb(model)(x, e, **cond_kw)
    assert out.shape == x.shape and out.dtype == torch.float32 and torch.isfinite(out).all()
    assert out.abs().sum() > 0


def test_builder_overrides_and_unknown_arch():
    model = build_dit(ModelConfig(arch="DiT-S/4", hidden_size=48, depth=3, num_heads=6, patch_size=2), (4, 8, 8),
                      text_dim=24, text_len=6, pooled_dim=12)
    assert (model.config.hidden_size, len(model.blocks), model.config.num_heads, model.config.patch_size) == (48, 3, 6, 2)
    with pytest.raises(ConfigError, match=r"model\.arch.*did you mean 'DiT-B/2'"):
        build_dit(ModelConfig(arch="DiT-b/2"), (4, 32, 32))
    with pytest.raises(ConfigError, match="model.num_heads"):  # the builder: the trainer's one-line refusal
        build_dit(ModelConfig(arch="DiT-S/2", hidden_size=32, num_heads=5), (4, 8, 8))
    with pytest.raises(ValueError, match="model.num_heads"):  # the class itself (no lct imports: exports carry it)
        TextDiT(**{**TINY, "num_heads": 5})
    m = build_dit(ModelConfig(arch="DiT-S/2", hidden_size=32, depth=1, num_heads=4, checkpointing=True), (4, 8, 8),
                  text_dim=24, text_len=6, pooled_dim=12)
    assert m.is_gradient_checkpointing


def test_positional_embedding_and_unpatchify_layout():
    from einops import rearrange

    pos = dit_module.sincos_pos_embed_2d(8, 2, 3)  # omega = [1, 1/100]; token 5 = row 1, column 2
    want = [math.sin(2), math.sin(0.02), math.cos(2), math.cos(0.02),  # first half: column (as DiT)
            math.sin(1), math.sin(0.01), math.cos(1), math.cos(0.01)]  # second half: row
    torch.testing.assert_close(pos[5], torch.tensor(want), rtol=0, atol=1e-7)
    model = make(input_height=8, input_width=12, patch_size=4)
    tokens = torch.randn(2, 2 * 3, 4 * 4 * 4)
    ref = rearrange(tokens, "b (h w) (p q c) -> b c (h p) (w q)", h=2, w=3, p=4, q=4, c=4)
    assert torch.equal(model.unpatchify(tokens), ref)
    assert model.pos_embed.shape == (1, 6, 32) and "pos_embed" not in model.state_dict()



@pytest.mark.parametrize("grid", [(3, 5), (5, 3), (8, 8), (4, 4)])
def test_positions_off_the_trained_grid_are_pixarts(grid):
    """Any latent grid gets diffusers' PatchEmbed positions for a model trained on 4x4 patches
    (base_size 4, interpolation_scale 1: PixArt's); the trained grid keeps its own table exactly."""
    from diffusers.models.embeddings import get_2d_sincos_pos_embed

    model = make()
    got = model.pos_embed_for(*grid, torch.device("cpu"))
    ref = get_2d_sincos_pos_embed(32, grid, base_size=4, interpolation_scale=1.0, output_type="pt").float()
    torch.testing.assert_close(got[0], ref, rtol=0, atol=1e-6)
    if grid == (4, 4):
        assert got is model.pos_embed and torch.equal(got[0], dit_module.sincos_pos_embed_2d(32, 4, 4))
    assert model.pos_embed_for(*grid, torch.device("cpu")) is got  # cached per shape


def test_non_square_latents_forward_and_square_is_unchanged():
    model = perturb(make())
    x, e, t = inputs()
    square = model(x, e, **t)
    # The square path is the plain table (what every earlier checkpoint trained with).
    assert torch.equal(model.pos_embed[0], dit_module.sincos_pos_embed_2d(32, 4, 4)) and not model._pos_cache
    assert square.shape == x.shape
    wide = torch.randn(3, 4, 6, 10)
    out = model(wide, e, **t)
    assert out.shape == wide.shape and torch.isfinite(out).all()
    # Token order on a non-square grid: each sample alone gives the same result (no mixing).
    torch.testing.assert_close(model(wide[:1], e[:1], **{k: v[:1] for k, v in t.items()}), out[:1])
    with pytest.raises(ValueError, match="multiples of the patch size 2"):
        model(torch.randn(1, 4, 6, 9), e[:1], **{k: v[:1] for k, v in t.items()})

# ----------------------------------------------------------------------------------------------
# adaLN-Zero initialisation and the Precond wrapper (SPEC 1)
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cond", ["text", "class", "none"])
def test_fresh_model_outputs_exact_zeros_and_precond_is_the_skip_path(cond):
    model = make(cond=cond, num_classes=3, dropout=0.2).train()
    x, e, t = inputs()
    kw = t if cond == "text" else {"class_labels": torch.tensor([0, 1, 2])} if cond == "class" else {}
    F = model(x, e, **kw)
    assert torch.equal(F, torch.zeros_like(x))
    pre = Precond(model)
    sigma = torch.tensor([0.002, 0.318283288839, 80.0])
    f = pre(x, sigma, **kw)
    c_skip, _, _ = scalings(sigma)
    assert f.dtype == torch.float32 and torch.equal(f, c_skip.view(-1, 1, 1, 1) * x)
    assert torch.equal(f[0], x[0])  # boundary condition f(x, sigma_min) = x


def test_precond_formulas_spec_vector_and_toy_net():
    pre = Precond(lambda x_in, e: 0.1 * x_in * (1 + 0.001 * e.view(-1, 1, 1, 1)))  # SPEC 13 toy net
    assert (pre.sigma_data, pre.sigma_min, pre.time_embed_scale) == (0.5, 0.002, 1000.0)
    s = karras(11)[3:4]  # the grid level printed as 0.318283288839 in SPEC 1 (exact value here)
    c_skip, c_out, c_in = scalings(s)
    assert c_skip.item() == pytest.approx(0.7142140504581, abs=5e-14)
    assert c_out.item() == pytest.approx(0.266811501783, abs=5e-13)
    assert c_in.item() == pytest.approx(1.687167872587, abs=5e-13)
    x = torch.randn(2, 1, 2, 2, dtype=torch.float64)
    sigma = torch.tensor([12.3815761385, 0.0850872027], dtype=torch.float64)
    f = pre(x, sigma)
    assert f.dtype == torch.float64  # float64 stays float64 (formula tests)
    cs, co, ci = scalings(sigma)
    e = 1000 * torch.log(sigma) / 4
    ref = cs.view(-1, 1, 1, 1) * x + co.view(-1, 1, 1, 1) * 0.1 * ci.view(-1, 1, 1, 1) * x * (1 + 0.001 * e.view(-1, 1, 1, 1))
    torch.testing.assert_close(f, ref, rtol=1e-14, atol=0)
    # scalar sigma broadcasts; fp32 inputs give fp32
    f32 = pre(x.float(), 0.5)
    assert f32.dtype == torch.float32
    torch.testing.assert_close(f32, pre(x.float(), torch.full((2,), 0.5)), rtol=0, atol=0)
    # sigma_min = 0: plain EDM scalings
    edm = Precond(lambda x_in, e: torch.zeros_like(x_in), sigma_min=0.0)
    torch.testing.assert_close(edm(x, sigma), (0.25 / (sigma**2 + 0.25)).view(-1, 1, 1, 1) * x, rtol=1e-15, atol=0)


# ----------------------------------------------------------------------------------------------
# Non-scaling LayerNorm (SPEC 8)
# ----------------------------------------------------------------------------------------------


def test_nsln_has_only_a_trainable_bias_and_the_right_formula():
    n = NonScalingLayerNorm(8)
    assert [name for name, p in n.named_parameters() if p.requires_grad] == ["bias"]
    assert list(n.buffers()) == [] and list(n.state_dict()) == ["bias"]
    with torch.no_grad():
        n.bias.copy_(torch.linspace(-1, 1, 8))
    h = torch.randn(3, 5, 8) * 3 + 2
    manual = (h - h.mean(-1, keepdim=True)) / torch.sqrt(h.var(-1, unbiased=False, keepdim=True) + 1e-5) + n.bias
    torch.testing.assert_close(n(h), manual, rtol=1e-5, atol=1e-5)
    n(h).sum().backward()
    assert n.bias.grad is not None


@pytest.mark.slow
def test_fused_nsln_matches_the_formula(monkeypatch):
    """~20 s (two CPU compiles): the fused path (what CUDA runs outside a compiled model: the same
    function through inductor, here its CPU backend) on the strided q view attention hands it gives
    SPEC 8 in float64 to 1e-5, output and both gradients, and the eager path to fp32 rounding; any
    batch and sequence length reuse its kernels (no recompile)."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    n = NonScalingLayerNorm(16)
    with torch.no_grad():
        n.bias.copy_(torch.linspace(-1, 1, 16))

    def run(mode, b, t, seed=0):
        monkeypatch.setattr(NonScalingLayerNorm, "fused", mode)
        g = torch.Generator().manual_seed(seed)
        qkv = (torch.randn(b, t, 3, 2, 16, generator=g) * 3 + 1).requires_grad_()
        q = qkv.unbind(2)[0]  # strided, as in Attention.forward
        n.bias.grad = None
        y = n(q)
        (y * torch.linspace(-2, 2, 16)).sum().backward()
        return y.detach(), qkv.grad.clone(), n.bias.grad.clone(), qkv.detach()

    y, gx, gb, qkv = run("always", 3, 5)
    h = qkv.unbind(2)[0].double()
    ref = (h - h.mean(-1, keepdim=True)) / torch.sqrt(h.var(-1, unbiased=False, keepdim=True) + 1e-5) + n.bias.double()
    torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-5)
    ye, gxe, gbe, _ = run("never", 3, 5)
    torch.testing.assert_close(y, ye, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gx, gxe, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gb, gbe, rtol=1e-5, atol=1e-5)
    graphs = counters["stats"]["unique_graphs"]
    assert graphs >= 1 and NonScalingLayerNorm._fallback_reason is None  # it did compile
    run("always", 4, 7, seed=1)
    assert counters["stats"]["unique_graphs"] == graphs  # dynamic batch and length: no recompile
    torch._dynamo.reset()


def test_nsln_placement():
    qk = make(nsln="qk")
    nslns = [name for name, m in qk.named_modules() if isinstance(m, NonScalingLayerNorm)]
    expected = ["text_norm"] + [f"blocks.{i}.{a}.{q}" for i in range(2) for a in ("attn", "cross_attn")
                                for q in ("q_norm", "k_norm")]
    assert sorted(nslns) == sorted(expected)
    assert not any(name.endswith("norm.weight") for name, _ in qk.named_parameters())  # no scale anywhere
    plain = make(nsln="none")
    assert not any(isinstance(m, NonScalingLayerNorm) for m in plain.modules())
    assert isinstance(plain.text_norm, nn.LayerNorm) and plain.text_norm.elementwise_affine
    assert isinstance(plain.blocks[0].attn.q_norm, nn.Identity) and isinstance(plain.blocks[0].cross_attn.k_norm, nn.Identity)
    for model in (qk, plain):  # adaLN pre-norms stay affine-free, eps 1e-6 (DiT)
        for blk in model.blocks:
            for ln in (blk.norm1, blk.norm_ca, blk.norm2):
                assert type(ln) is nn.LayerNorm and not ln.elementwise_affine and ln.eps == 1e-6


def test_layernorm_is_the_affine_qk_norm_of_the_authors_dit_baseline():
    """nsln: layernorm = timm `Attention(qk_norm=True)` (norm_layer nn.LayerNorm, eps 1e-5, learned
    gamma and beta), which the authors' DiT baseline uses and NsLN replaces (SPEC 8)."""
    from timm.layers import Attention as TimmAttention

    ln = make(nsln="layernorm")
    for blk in ln.blocks:
        for attn in (blk.attn, blk.cross_attn):
            for norm in (attn.q_norm, attn.k_norm):
                assert isinstance(norm, dit_module.AffineLayerNorm) and norm.elementwise_affine
                assert norm.normalized_shape == (8,) and norm.eps == 1e-5  # head_dim = 32 / 4
    assert isinstance(ln.text_norm, nn.LayerNorm) and ln.text_norm.elementwise_affine
    assert not any(isinstance(m, NonScalingLayerNorm) for m in ln.modules())
    # Same keys as the NsLN model plus the gammas: q/k weight per attention, and the text norm's.
    qk_keys, ln_keys = set(make(nsln="qk").state_dict()), set(ln.state_dict())
    assert ln_keys - qk_keys == {k.replace(".bias", ".weight") for k in qk_keys
                                 if k.endswith(("q_norm.bias", "k_norm.bias", "text_norm.bias"))}

    # Self-attention against timm's, weights copied (gamma, beta off their init so they matter).
    ours = perturb(dit_module.Attention(32, 4, qk_norm="layernorm"), std=0.3).eval()
    ref = TimmAttention(32, num_heads=4, qkv_bias=True, qk_norm=True, norm_layer=nn.LayerNorm).eval()  # as the authors pass it
    ref.load_state_dict(ours.state_dict(), strict=True)
    x = torch.randn(2, 10, 32, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(ours(x), ref(x), rtol=1e-5, atol=1e-6)
    # ... and it is a different network from NsLN and from no norm at the same weights.
    for other in ("qk", "none"):
        alt = dit_module.Attention(32, 4, qk_norm=other).eval()
        alt.load_state_dict(ours.state_dict(), strict=False)
        assert not torch.allclose(alt(x), ours(x), atol=1e-4)


def test_unknown_nsln_is_refused():
    with pytest.raises(ValueError, match="model.nsln"):
        make(nsln="groupnorm")


# ----------------------------------------------------------------------------------------------
# Activation checkpointing, dropout and torch.compile
# ----------------------------------------------------------------------------------------------


def _grads(model, seed):
    model.zero_grad(set_to_none=True)
    x, e, t = inputs()
    torch.manual_seed(seed)
    out = model(x, e, **t, cond_drop=torch.tensor([False, True, False]))
    (out**2).mean().backward()
    return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_checkpointing_gives_the_same_gradients_with_dropout(monkeypatch):
    model = perturb(make(dropout=0.3)).train()
    out_a, ga = _grads(model, seed=123)
    out_other, _ = _grads(model, seed=7)
    assert not torch.allclose(out_a, out_other)  # dropout is active: the test has teeth
    calls = []
    real = dit_module.checkpoint
    monkeypatch.setattr(dit_module, "checkpoint", lambda *a, **k: calls.append(k) or real(*a, **k))
    model.enable_gradient_checkpointing()
    out_b, gb = _grads(model, seed=123)
    assert len(calls) == 2 and all(k == {"use_reentrant": False} for k in calls)
    torch.testing.assert_close(out_b, out_a, rtol=0, atol=0)
    assert ga.keys() == gb.keys() and len(ga) == len(list(model.parameters()))
    for name in ga:
        torch.testing.assert_close(gb[name], ga[name], rtol=1e-6, atol=1e-7, msg=name)
    assert any(g.abs().sum() > 0 for n, g in ga.items() if "cross_attn" in n)


def test_dropout_uses_the_global_rng_so_fork_rng_reproduces_it():
    model = perturb(make(dropout=0.5)).train()
    x, e, t = inputs()
    torch.manual_seed(5)
    with torch.random.fork_rng(devices=[]):
        a = model(x, e, **t)
    b = model(x, e, **t)  # the RNG state is where fork_rng restored it
    assert torch.equal(a, b)
    assert not torch.equal(b, model(x, e, **t))


@pytest.mark.parametrize("autocast", [False, True])
def test_block_compiles_without_graph_breaks(autocast):
    torch._dynamo.reset()
    model = perturb(make(dropout=0.2, nsln="qk")).train()
    block = model.blocks[0]
    h = torch.randn(3, 16, 32)
    c = torch.randn(3, 32)
    text = torch.randn(3, 6, 32)
    mask = torch.tensor([[True] * 4 + [False] * 2] * 3)
    compiled = torch.compile(block, fullgraph=True, backend="eager")  # a graph break raises here
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        torch.manual_seed(0)
        ref = block(h, c, text, mask)
        torch.manual_seed(0)
        out = compiled(h, c, text, mask)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    torch._dynamo.reset()


def test_compiled_blocks_with_checkpointing_match_eager():
    torch._dynamo.reset()
    model = perturb(make(dropout=0.2)).train()
    out_a, ga = _grads(model, seed=11)
    model.enable_gradient_checkpointing()
    model.compile_blocks(backend="eager", fullgraph=True)
    assert set(model.state_dict()) == set(make().state_dict())  # names unchanged by compile
    out_b, gb = _grads(model, seed=11)
    torch.testing.assert_close(out_b, out_a, rtol=1e-6, atol=1e-6)
    for name in ga:
        torch.testing.assert_close(gb[name], ga[name], rtol=1e-5, atol=1e-6, msg=name)
    torch._dynamo.reset()


@pytest.mark.proc
def test_inductor_compiled_blocks_match_eager():
    """What `model.compile: true` runs (configs/lct_coco.yaml): inductor-generated kernels, NsLN on
    q and k, no dropout (the ilct preset). Same function as eager to fp32 rounding, output and
    every gradient (fused kernels reorder fp32 sums, hence not bitwise)."""
    torch._dynamo.reset()
    model = perturb(make(dropout=0.0, nsln="qk")).train()
    out_a, ga = _grads(model, seed=3)
    model.compile_blocks()
    assert all(b._compiled_call_impl is not None for b in model.blocks)
    out_b, gb = _grads(model, seed=3)
    torch.testing.assert_close(out_b, out_a, rtol=1e-5, atol=1e-6)
    assert ga.keys() == gb.keys()
    for name in ga:
        torch.testing.assert_close(gb[name], ga[name], rtol=1e-4, atol=1e-6, msg=name)
    torch._dynamo.reset()


# ----------------------------------------------------------------------------------------------
# Text conditioning: padding, null condition (SPEC 9)
# ----------------------------------------------------------------------------------------------


def test_caption_padding_does_not_change_outputs():
    model = perturb(make()).eval()
    x, e, t = inputs(real=4)
    base = model(x, e, **t)
    # different garbage in the padded positions
    garbage = t["text_states"].clone()
    garbage[:, 4:] = torch.randn(3, 2, 24) * 100
    torch.testing.assert_close(model(x, e, **{**t, "text_states": garbage}), base, rtol=0, atol=1e-6)
    # padded to a longer length L' = 11 (with garbage), also with the null condition in the batch
    longer = torch.cat([t["text_states"][:, :4], torch.randn(3, 7, 24)], dim=1)
    long_mask = torch.arange(11)[None].expand(3, 11) < 4
    out = model(x, e, text_states=longer, text_mask=long_mask, pooled=t["pooled"])
    torch.testing.assert_close(out, base, rtol=0, atol=1e-6)
    drop = torch.tensor([True, False, True])
    torch.testing.assert_close(model(x, e, text_states=longer, text_mask=long_mask, pooled=t["pooled"], cond_drop=drop),
                               model(x, e, **t, cond_drop=drop), rtol=0, atol=1e-6)
    assert (out - model(x, e, **{**t, "text_mask": torch.ones(3, 6, dtype=torch.bool)})).abs().max() > 1e-3


def test_mask_with_only_the_first_token_real_gives_no_nan():
    model = perturb(make()).eval()
    x, e, t = inputs(real=1)
    out = model(x, e, **t)
    assert torch.isfinite(out).all()
    first_only = model(x, e, text_states=t["text_states"][:, :1], text_mask=t["text_mask"][:, :1], pooled=t["pooled"])
    torch.testing.assert_close(out, first_only, rtol=0, atol=1e-6)
    none_real = model(x, e, **{**t, "text_mask": torch.zeros(3, 6, dtype=torch.bool)})
    assert torch.isfinite(none_real).all()


def test_cond_drop_uses_the_learned_null_condition():
    model = perturb(make()).eval()
    x, e, t = inputs()
    drop = torch.tensor([True, False, False])
    a = model(x, e, **t, cond_drop=drop)
    other = {k: v.clone() for k, v in t.items()}
    other["text_states"][0] = torch.randn(6, 24)
    other["pooled"][0] = torch.randn(12)
    other["text_mask"][0] = torch.tensor([True, False, False, False, False, False])
    b = model(x, e, **other, cond_drop=drop)
    torch.testing.assert_close(a[0], b[0], rtol=0, atol=1e-6)  # independent of the dropped sample's text
    null = dict(text_states=model.null_text_states.detach()[None].expand(3, -1, -1),
                text_mask=torch.ones(3, 6, dtype=torch.bool),
                pooled=model.null_pooled.detach()[None].expand(3, -1))
    torch.testing.assert_close(a[0], model(x, e, **null)[0], rtol=0, atol=1e-6)  # = explicit null states
    torch.testing.assert_close(a[1:], model(x, e, **t)[1:], rtol=0, atol=1e-6)  # others untouched
    assert (a[0] - model(x, e, **t)[0]).abs().max() > 1e-3
    # the null condition is learned: gradients reach it through dropped samples only
    model.train()
    model(x, e, **t, cond_drop=drop).square().mean().backward()
    assert model.null_text_states.grad.abs().sum() > 0 and model.null_pooled.grad.abs().sum() > 0
    model.zero_grad(set_to_none=True)
    model(x, e, **t, cond_drop=torch.zeros(3, dtype=torch.bool)).square().mean().backward()
    assert model.null_text_states.grad is None or model.null_text_states.grad.abs().sum() == 0


def test_class_mode_cond_drop_selects_the_null_row():
    model = perturb(make(cond="class", num_classes=3)).eval()
    x, e, _ = inputs()
    labels = torch.tensor([0, 1, 2])
    a = model(x, e, class_labels=labels, cond_drop=torch.tensor([True, False, True]))
    b = model(x, e, class_labels=torch.tensor([3, 1, 3]))
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert model.class_embedder.num_embeddings == 4


# ----------------------------------------------------------------------------------------------
# Save / load
# ----------------------------------------------------------------------------------------------


def test_save_pretrained_round_trip_is_exact(tmp_path):
    model = perturb(make(dropout=0.1, nsln="qk")).eval()
    model.save_pretrained(tmp_path)
    assert (tmp_path / "diffusion_pytorch_model.safetensors").is_file() and (tmp_path / "config.json").is_file()
    loaded = TextDiT.from_pretrained(tmp_path).eval()
    public = lambda cfg: {k: v for k, v in dict(cfg).items() if not k.startswith("_")}  # noqa: E731
    assert public(loaded.config) == public(model.config)
    x, e, t = inputs()
    drop = torch.tensor([False, True, False])
    assert torch.equal(loaded(x, e, **t, cond_drop=drop), model(x, e, **t, cond_drop=drop))


def test_checked_load_names_the_mismatches():
    src = perturb(make())
    same = make(seed=3)
    load_state_dict_checked(same, src.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(same.state_dict().values(), src.state_dict().values()))
    deeper = make(depth=3)
    with pytest.raises(UserError, match=r"missing keys \(\d+\): blocks\.2\."):
        load_state_dict_checked(deeper, src.state_dict(), source="runs/edm/checkpoint")
    with pytest.raises(UserError, match=r"unexpected keys .*text_norm\.weight.*shape mismatches"):
        load_state_dict_checked(make(nsln="qk", text_dim=16), make(nsln="none").state_dict())
    with pytest.raises(UserError, match=r"runs/edm.*shape mismatches \(\d+\): x_embedder\.weight \(checkpoint"):
        load_state_dict_checked(make(hidden_size=48), src.state_dict(), source="runs/edm")


# ----------------------------------------------------------------------------------------------
# Precision contract (SPEC 1.1)
# ----------------------------------------------------------------------------------------------


def karras(n, sigma_min=0.002, sigma_max=80.0, rho=7.0):
    i = torch.arange(n, dtype=torch.float64)
    return (sigma_min ** (1 / rho) + i / (n - 1) * (sigma_max ** (1 / rho) - sigma_min ** (1 / rho))) ** rho


@pytest.mark.parametrize("n", [641, 1281])
def test_time_embeddings_of_adjacent_grid_levels_differ_under_bf16_autocast(n):
    model = make()
    sigma = karras(n).float()
    e = 1000 * torch.log(sigma) / 4
    assert (e.bfloat16()[1:] == e.bfloat16()[:-1]).sum() > 0  # in bf16 they would collide
    with torch.autocast("cpu", dtype=torch.bfloat16):
        sinus = model.t_embedder.timestep_embedding(e, 256)
        emb = model.t_embedder(e)
    assert sinus.dtype == emb.dtype == torch.float32
    assert (sinus[1:] != sinus[:-1]).any(dim=1).all()
    assert (emb[1:] != emb[:-1]).any(dim=1).all()


@pytest.mark.parametrize("nsln", ["qk", "none"])
def test_per_sample_layers_run_in_fp32_under_bf16_autocast(nsln):
    model = perturb(make(nsln=nsln, dropout=0.1)).train()
    fp32_outputs, trunk_outputs = [], []
    for m in model.modules():
        if isinstance(m, FP32Linear):
            m.register_forward_hook(lambda mod, inp, out: fp32_outputs.append(out.dtype))
    model.blocks[0].attn.qkv.register_forward_hook(lambda mod, inp, out: trunk_outputs.append(out.dtype))
    # 2 time MLP + 2 pooled MLP + one adaLN per block + final adaLN + final projection
    assert sum(isinstance(m, FP32Linear) for m in model.modules()) == 4 + 2 + 2
    assert all(type(m.adaLN_modulation[-1]) is FP32Linear for m in [*model.blocks, model.final_layer])
    x, e, t = inputs()
    pre = Precond(model)
    sigma = torch.tensor([0.01, 1.0, 50.0])
    torch.manual_seed(0)
    ref = pre(x, sigma, **t)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        torch.manual_seed(0)
        out = pre(x, sigma, **t)
    assert out.dtype == torch.float32
    assert trunk_outputs[-1] == torch.bfloat16  # autocast is really on for the trunk
    assert fp32_outputs and all(d == torch.float32 for d in fp32_outputs)
    assert (out - ref).abs().max() < 0.1 * ref.abs().max()
    # fp32 communication for DeepSpeed: no per-sample linear is exactly nn.Linear
    assert all(type(m) is not nn.Linear for m in model.t_embedder.modules())


# ----------------------------------------------------------------------------------------------
# Attention backends
# ----------------------------------------------------------------------------------------------


def _has_xformers() -> bool:
    try:
        import xformers.ops  # noqa: F401
        return True
    except ImportError:
        return False


@pytest.mark.skipif(_has_xformers(), reason="xformers is installed")
def test_xformers_missing_is_a_config_error():
    with pytest.raises(ConfigError, match=r"model\.attention.*pip install xformers"):
        build_dit(ModelConfig(arch="DiT-S/2", hidden_size=32, depth=1, num_heads=4, attention="xformers"), (4, 8, 8))
    with pytest.raises(ValueError, match=r"model\.attention.*pip install xformers"):
        make(attention="xformers")


@pytest.mark.skipif(not (_has_xformers() and torch.cuda.is_available()),
                    reason="needs xformers and a CUDA GPU (set CUDA_VISIBLE_DEVICES: conftest.py hides GPUs)")
def test_xformers_matches_sdpa():
    sdpa = perturb(make()).eval().cuda()
    xf = make(attention="xformers").eval().cuda()
    xf.load_state_dict(sdpa.state_dict())
    x, e, t = inputs(real=3)
    t = {k: v.cuda() for k, v in t.items()}
    torch.testing.assert_close(xf(x.cuda(), e.cuda(), **t), sdpa(x.cuda(), e.cuda(), **t), rtol=1e-4, atol=1e-4)


# ----------------------------------------------------------------------------------------------
# Parameter counts (meta device)
# ----------------------------------------------------------------------------------------------

# DiT paper, Table 1 "Params" (class-conditional ImageNet 256: 1000 classes + the null row,
# 4x32x32 latents, learn_sigma=True so 8 output channels). The /4 variants differ by a few
# thousand parameters only (patch embedding and final projection).
PAPER = {"S": 33e6, "B": 130e6, "L": 458e6, "XL": 675e6}

# Text extras for the default text tower (open_clip ViT-B-32: 77x512 states, 512 pooled), nsln qk;
# these are the numbers in README.md's "Model sizes" table.
EXTRA = {"S": 13_003_776, "B": 51_032_064, "L": 178_480_128, "XL": 262_897_536}


def dit_reference_count(hidden, depth, patch, classes=1000, in_ch=4, out_ch=8, freq=256):
    """Trainable parameters of facebookresearch/DiT `models.py`, layer by layer (its pos_embed is a
    frozen nn.Parameter, counted by sum(p.numel()) but not trainable; here a buffer: left out)."""
    d = hidden
    patch_embed = in_ch * patch * patch * d + d
    t_embed = freq * d + d + d * d + d
    y_embed = (classes + 1) * d
    block = (d * 3 * d + 3 * d) + (d * d + d) + (d * 4 * d + 4 * d) + (4 * d * d + d) + (d * 6 * d + 6 * d)
    final = (d * 2 * d + 2 * d) + (d * patch * patch * out_ch + patch * patch * out_ch)
    return patch_embed + t_embed + y_embed + depth * block + final


@pytest.mark.parametrize("arch", list(DIT_PRESETS))
def test_parameter_counts_match_the_dit_paper(arch):
    size = arch.split("-")[1].split("/")[0]
    p = DIT_PRESETS[arch]
    # Apples to apples: build what DiT counted (class mode, 1000 classes, 8 output channels, no NsLN).
    paper_cfg = count_parameters(ModelConfig(arch=arch, cond="class", num_classes=1000, nsln="none"), out_channels=8)
    assert paper_cfg["extra"] == 0
    assert paper_cfg["trunk"] == dit_reference_count(p["hidden_size"], p["depth"], p["patch_size"])
    assert paper_cfg["trunk"] == pytest.approx(PAPER[size], rel=0.02)
    if arch == "DiT-XL/2":  # DiT's train.py prints 675,129,632, which counts its frozen pos_embed
        assert paper_cfg["trunk"] + 256 * 1152 == 675_129_632
    # Text mode: 4 output channels and no class table, so the trunk is a little smaller.
    text = count_parameters(ModelConfig(arch=arch), text_dim=512, text_len=77, pooled_dim=512)
    assert text["trunk"] == pytest.approx(PAPER[size], rel=0.02)
    assert text["extra"] == EXTRA[size] and text["total"] == text["trunk"] + text["extra"]


def test_meta_count_equals_a_real_model_count():
    model = make()
    real = sum(p.numel() for p in model.parameters())
    cfg = ModelConfig(arch="DiT-S/2", hidden_size=32, depth=2, num_heads=4)
    counted = count_parameters(cfg, (4, 8, 8), text_dim=24, text_len=6, pooled_dim=12)
    assert counted["total"] == real
    assert count_parameters(model) == counted  # a model instance is counted as it is
    with torch.device("meta"):
        meta = Precond(build_dit(cfg, (4, 8, 8), text_dim=24, text_len=6, pooled_dim=12))
    assert count_parameters(meta.net) == counted  # how the trainer counts


def test_forward_on_the_meta_device_for_flop_counts():
    from torch.utils.flop_counter import FlopCounterMode

    cfg = ModelConfig(arch="DiT-S/2", hidden_size=32, depth=2, num_heads=4)
    with torch.device("meta"):
        model = Precond(build_dit(cfg, (4, 8, 8), text_dim=24, text_len=6, pooled_dim=12))
        _, _, t = inputs()
        t = {k: v.to("meta") for k, v in t.items()}
        counter = FlopCounterMode(display=False)
        with counter:
            out = model(torch.zeros(3, 4, 8, 8), torch.ones(3), **t, cond_drop=torch.zeros(3, dtype=torch.bool))
    assert out.shape == (3, 4, 8, 8) and out.device.type == "meta" and counter.get_total_flops() > 0


@pytest.mark.proc
def test_importing_lct_models_does_not_import_deepspeed_or_open_clip(python):
    from conftest import run_cmd

    proc = run_cmd([python, "-c", "import sys, lct.models; "
                    "print([m for m in ('deepspeed', 'open_clip') if m in sys.modules])"], check=True)
    assert proc.stdout.strip() == "[]"
