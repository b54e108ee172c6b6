"""Flow-matching velocity predictors as lct denoisers (SPEC 15): the formulas against SPEC 15.8,
the wrapped Sana / SD3 transformers against diffusers' own scheduler and pipelines (tiny random
configs of the real classes, fp32), the text kinds against the pipelines' encode_prompt,
precision, the DC-AE / SD3 VAE, the stock-pipeline export and the config refusals."""

import json
import math
import runpy
import time

import numpy as np
import pytest
import torch

from helpers_flow import (GEMMA_DIM, SD3_JOINT, SD3_POOLED, make_tiny_gemma, make_tiny_sd3_towers, tiny_dc_ae,
                          tiny_sana, tiny_sana_config, tiny_sd3, tiny_sd3_config, tiny_sd3_vae)
from helpers_spec import equivalent
from lct.errors import ConfigError, UserError
from lct.models.flow import (FLOW_ARCHS, FlowDenoiser, SanaNet, SD3Net, build_flow, check_compatible, flow_config,
                             flow_scalings, flow_sigma, flow_t, load_flow, wrap_flow)

RTOL = 1e-10  # SPEC 15.8 vectors, printed with 12 digits
SIGMA_MAX = 1e8  # SPEC 15.3: t = 1 in fp32


def close(a, b, rtol=RTOL):
    np.testing.assert_allclose(np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64), rtol=rtol, atol=0)


# ---------------------------------------------------------------------------------------------
# SPEC 15.8 vectors
# ---------------------------------------------------------------------------------------------


def test_level_and_scaling_vectors():
    sigma = torch.tensor([0.0, 0.004, 0.5, 1.0, 2.0, 160.0, 1e8], dtype=torch.float64)
    close(flow_t(sigma), [0.0, 0.00398406374502, 1 / 3, 0.5, 2 / 3, 0.993788819876, 0.99999999])
    close(flow_sigma(torch.tensor([0.5, 0.75, 0.999], dtype=torch.float64)), [1.0, 3.0, 999.0])
    assert float(flow_t(torch.tensor(1e8, dtype=torch.float32))) == 1.0  # the pipelines' first level, t = 1
    x, v = torch.tensor([0.3, -1.2], dtype=torch.float64), torch.tensor([0.5, -0.25], dtype=torch.float64)
    s = torch.full((2,), 2.0, dtype=torch.float64)
    c_skip, c_out, c_in = flow_scalings(s)
    close(c_skip, [1 / 3] * 2), close(c_out, [-2 / 3] * 2), close(c_in, [1 / 3] * 2)
    close(c_skip * x + c_out * v, [-0.233333333333, -0.233333333333])
    c_skip, c_out, _ = flow_scalings(s, 0.004)
    close(c_skip * x + c_out * v, [-0.232533155318, -0.234200712061])
    for smin in (0.0, 0.004):  # the boundary condition f(x, sigma_min) = x
        c_skip, c_out, _ = flow_scalings(torch.tensor([smin], dtype=torch.float64), smin)
        assert float(c_skip) == 1.0 and float(c_out) == 0.0
    # x_t - t v with x_t = x_noisy / (1 + sigma): the flow model's x0 prediction
    xn = torch.tensor([3.0, -1.5], dtype=torch.float64)
    c_skip, c_out, c_in = flow_scalings(s)
    close(c_skip * xn + c_out * v, c_in * xn - flow_t(s) * v)


def test_shift_is_a_sigma_scale():
    """SPEC 15.4: the timestep shift t' = s t / (1 + (s - 1) t) multiplies sigma = t / (1 - t) by s."""
    t = torch.linspace(0.01, 0.99, 50, dtype=torch.float64)
    for shift in (3.0, 6.0):
        shifted = shift * t / (1 + (shift - 1) * t)
        close(flow_sigma(shifted), shift * flow_sigma(t))


# ---------------------------------------------------------------------------------------------
# The wrapped transformers against diffusers' scheduler
# ---------------------------------------------------------------------------------------------


def _cond(family, b=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    if family == "sana":
        length = 6
        lengths = torch.tensor([3, 6, 1, 4][:b])
        return {"text_states": torch.randn(b, length, GEMMA_DIM, generator=g),
                "text_mask": torch.arange(length)[None] < lengths[:, None]}
    return {"text_states": torch.randn(b, 9, SD3_JOINT, generator=g), "pooled": torch.randn(b, SD3_POOLED, generator=g)}


def _direct(family, transformer, x_t, timestep, cond):
    if family == "sana":
        return transformer(x_t, encoder_hidden_states=cond["text_states"], encoder_attention_mask=cond["text_mask"],
                           timestep=timestep, return_dict=False)[0]
    return transformer(x_t, encoder_hidden_states=cond["text_states"], pooled_projections=cond["pooled"],
                       timestep=timestep, return_dict=False)[0]


def _wrapped(family, seed=0, null=None, null_pooled=None, **kw):
    if family == "sana":
        return wrap_flow(tiny_sana(seed), "sana", torch.zeros(1, GEMMA_DIM) if null is None else null, **kw)
    return wrap_flow(tiny_sd3(seed), "sd3", torch.zeros(9, SD3_JOINT) if null is None else null,
                     torch.zeros(SD3_POOLED) if null_pooled is None else null_pooled, **kw)


@pytest.mark.parametrize("family", ["sana", "sd3"])
def test_denoiser_equals_the_schedulers_x0(family):
    """f(x_noisy, sigma(t)) = FlowMatchEulerDiscreteScheduler's x0 of the unwrapped transformer."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    ref = tiny_sana() if family == "sana" else tiny_sd3()
    net = _wrapped(family)
    g = torch.Generator().manual_seed(0)
    b = 3
    x0, eps = torch.randn(b, 4, 8, 8, generator=g), torch.randn(b, 4, 8, 8, generator=g)
    cond = _cond(family, b)
    for t_want in (0.0, 1e-3, 0.5, 1 - 1e-3):
        sigma = torch.full((b,), t_want / (1 - t_want), dtype=torch.float32)
        t = float(flow_t(sigma)[0])  # the fp32 timestep the wrapper feeds (SPEC 15.1)
        s64 = sigma.double()[0]
        x_noisy = x0.double() + s64 * eps.double()  # = x_t / (1 - t) at t = s / (1 + s), in float64
        x_t = x_noisy / (1 + s64)
        x_noisy = x_noisy.float()
        sched = FlowMatchEulerDiscreteScheduler(stochastic_sampling=True)
        sched.set_timesteps(sigmas=[t])
        with torch.no_grad():
            v = _direct(family, ref, x_t.float(), sched.timesteps.expand(b), cond)
            want = sched.step(v, sched.timesteps[0], x_t.float(), generator=torch.Generator().manual_seed(1)).prev_sample
            got = net(x_noisy, sigma, **cond)
        equivalent(got, want)
    with torch.no_grad():  # sigma = 0 is the identity
        torch.testing.assert_close(net(x0, torch.zeros(b), **cond), x0, rtol=0, atol=0)


@pytest.mark.parametrize("family", ["sana", "sd3"])
def test_null_condition_and_refusals(family):
    null = torch.randn(1 if family == "sana" else 9, GEMMA_DIM if family == "sana" else SD3_JOINT)
    net = _wrapped(family, null=null, null_pooled=torch.randn(SD3_POOLED))
    x = torch.randn(3, 4, 8, 8)
    cond = _cond(family, 3)
    drop = torch.tensor([False, True, False])
    with torch.no_grad():
        mixed = net(x, torch.full((3,), 2.0), **cond, cond_drop=drop)
        plain = net(x, torch.full((3,), 2.0), **cond)
        if family == "sana":
            only_null = {"text_states": torch.nn.functional.pad(null, (0, 0, 0, 5))[None].expand(3, -1, -1),
                         "text_mask": (torch.arange(6) < 1)[None].expand(3, -1)}
        else:
            only_null = {"text_states": null[None].expand(3, -1, -1),
                         "pooled": net.net.null_pooled.detach()[None].expand(3, -1)}
        nulled = net(x, torch.full((3,), 2.0), **only_null)
    torch.testing.assert_close(mixed[[0, 2]], plain[[0, 2]], rtol=0, atol=0)
    torch.testing.assert_close(mixed[1], nulled[1], rtol=1e-6, atol=1e-6)
    assert float((mixed[1] - plain[1]).abs().max()) > 1e-3
    with pytest.raises(ValueError, match="width"):
        net(x, 1.0, **{**cond, "text_states": torch.randn(3, 6, 7)})
    if family == "sd3":
        with pytest.raises(ValueError, match="text_mask must be all True"):
            net(x, 1.0, **cond, text_mask=torch.zeros(3, 9, dtype=torch.bool))
        with pytest.raises(ValueError, match="pooled"):
            net(x, 1.0, text_states=cond["text_states"])


def test_sana_sprint_is_refused():
    with pytest.raises(UserError, match="Sana-Sprint"):
        SanaNet(tiny_sana(guidance_embeds=True), torch.zeros(1, GEMMA_DIM))


@pytest.mark.parametrize("family", ["sana", "sd3"])
def test_gradients_reach_every_trained_part(family):
    net = _wrapped(family, null=torch.randn(1 if family == "sana" else 9, GEMMA_DIM if family == "sana" else SD3_JOINT),
                   null_pooled=torch.randn(SD3_POOLED))
    net.train()
    cond = _cond(family, 4)
    f = net(torch.randn(4, 4, 8, 8), torch.tensor([0.05, 0.8, 6.0, 90.0]), **cond,
            cond_drop=torch.tensor([False, True, False, False]))
    f.square().mean().backward()
    grads = {n: p.grad for n, p in net.named_parameters()}
    assert all(g is not None and torch.isfinite(g).all() for g in grads.values())
    parts = (["null_text_states", "patch_embed", "time_embed", "caption_projection", "attn1.to_q", "attn2.to_k",
              "ff.conv", "proj_out"] if family == "sana" else
             ["null_text_states", "null_pooled", "pos_embed", "time_text_embed.timestep_embedder",
              "time_text_embed.text_embedder", "context_embedder", "norm1.linear", "attn.to_q", "attn.add_k_proj",
              "attn2", "ff.net", "proj_out"])
    for part in parts:
        hit = [n for n in grads if part in n]
        assert hit and any(float(grads[n].abs().sum()) > 0 for n in hit), part


@pytest.mark.parametrize("family", ["sana", "sd3"])
def test_bf16_autocast_only_inside_the_trunk(family):
    transformer = tiny_sana() if family == "sana" else tiny_sd3()
    keys = {k: v.clone() for k, v in transformer.state_dict().items()}
    net = _wrapped(family)
    net.net.transformer = None  # replaced below by the pinned copy of `transformer`
    net = wrap_flow(transformer, family, torch.zeros(1 if family == "sana" else 9, GEMMA_DIM if family == "sana" else SD3_JOINT),
                    torch.zeros(SD3_POOLED))
    state = net.net.transformer.state_dict()
    assert state.keys() == keys.keys() and all(torch.equal(state[k], v) for k, v in keys.items())
    seen = {}

    def record(name):
        def hook(module, args, out):
            seen[name] = (out[0] if isinstance(out, tuple) else out).dtype
        return hook

    tr = net.net.transformer
    if family == "sana":
        probes = {"entry": tr.patch_embed, "time": tr.time_embed.emb.timestep_embedder.linear_1, "ada": tr.time_embed.linear,
                  "proj_out": tr.proj_out, "block": tr.transformer_blocks[0], "to_q": tr.transformer_blocks[0].attn1.to_q,
                  "cross_k": tr.transformer_blocks[0].attn2.to_k, "caption": tr.caption_projection.linear_1}
        fp32 = ("entry", "time", "ada", "proj_out", "block")
        bf16 = ("to_q", "cross_k", "caption")
    else:
        blk = tr.transformer_blocks[0]
        probes = {"entry": tr.pos_embed, "context": tr.context_embedder, "time": tr.time_text_embed.timestep_embedder.linear_1,
                  "pooled": tr.time_text_embed.text_embedder.linear_1, "ada": blk.norm1.linear,
                  "ada_ctx": blk.norm1_context.linear, "out_ada": tr.norm_out.linear, "proj_out": tr.proj_out,
                  "to_q": blk.attn.to_q, "add_k": blk.attn.add_k_proj, "ff": blk.ff}
        fp32 = ("entry", "context", "time", "pooled", "ada", "ada_ctx", "out_ada", "proj_out")
        bf16 = ("to_q", "add_k", "ff")
    for name, module in probes.items():
        module.register_forward_hook(record(name))
    x, cond = torch.randn(2, 4, 8, 8), _cond(family, 2)
    sigma = torch.tensor([0.4, 12.0])
    with torch.no_grad():
        full = net(x, sigma, **cond)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            mixed = net(x, sigma, **cond)
    assert mixed.dtype == torch.float32
    for name in fp32:
        assert seen[name] == torch.float32, (name, seen[name])
    for name in bf16:
        assert seen[name] == torch.bfloat16, (name, seen[name])
    assert all(p.dtype == torch.float32 for p in net.parameters())
    assert float((mixed - full).abs().max()) < 0.05 * float(full.abs().max())


def test_float64_stays_float64():
    net = _wrapped("sana").double()
    cond = {k: (v.double() if v.is_floating_point() else v) for k, v in _cond("sana", 2).items()}
    out = net(torch.randn(2, 4, 8, 8, dtype=torch.float64), torch.tensor([0.3, 3.0], dtype=torch.float64), **cond)
    assert out.dtype == torch.float64


# ---------------------------------------------------------------------------------------------
# Text kinds against the pipelines' encode_prompt; guided steps against the stock pipelines
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def towers(tmp_path_factory):
    d = tmp_path_factory.mktemp("flow_towers")
    return {"gemma": make_tiny_gemma(d / "gemma", layout="pipeline"), "sd3": make_tiny_sd3_towers(d / "sd3")}


@pytest.fixture(scope="module")
def gemma(towers):
    from lct.hf_text import HFTextEncoder

    return HFTextEncoder.load(towers["gemma"], max_length=20)


@pytest.fixture(scope="module")
def sd3_text(towers):
    from lct.hf_text import HFTextEncoder

    return HFTextEncoder.load(towers["sd3"], kind="sd3", max_length=12)


def sana_pipe(gemma, transformer=None):
    from diffusers import SanaPipeline

    from lct.export_flow import flow_scheduler

    pipe = SanaPipeline(tokenizer=gemma.hf_tokenizer, text_encoder=gemma.model, vae=tiny_dc_ae(),
                        transformer=transformer if transformer is not None else tiny_sana(), scheduler=flow_scheduler())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def sd3_pipe(sd3_text, transformer=None):
    from diffusers import StableDiffusion3Pipeline

    from lct.export_flow import flow_scheduler, text_components

    pipe = StableDiffusion3Pipeline(transformer=transformer if transformer is not None else tiny_sd3(),
                                    scheduler=flow_scheduler(), vae=tiny_sd3_vae(), **text_components("sd3", sd3_text))
    pipe.set_progress_bar_config(disable=True)
    return pipe


PROMPTS = ["a red circle on a blue background", "a small dog running across the grass with boats and a city street"]


def test_gemma_kind_equals_sana_encode_prompt(gemma, towers):
    from lct.hf_text import SANA_INSTRUCTION, HFTextEncoder

    pipe = sana_pipe(gemma)
    assert gemma.kind == "gemma" and gemma.context_length == 20 and gemma.pooled_dim == 0
    with torch.no_grad():
        want, want_mask, neg, neg_mask = pipe.encode_prompt(PROMPTS, do_classifier_free_guidance=True,
                                                            max_sequence_length=20,
                                                            complex_human_instruction=list(SANA_INSTRUCTION))
    states, mask, pooled = gemma.encode(PROMPTS)
    torch.testing.assert_close(states, want.float(), rtol=0, atol=0)
    assert torch.equal(mask, want_mask.bool()) and pooled.shape == (2, 0)
    null = gemma.null_condition()  # the pipeline's negative prompt "" (no instruction): <bos> alone
    assert int(neg_mask[0].sum()) == null.shape[0] == 1
    torch.testing.assert_close(null, neg[0][neg_mask[0].bool()].float(), rtol=0, atol=0)
    torch.testing.assert_close(states[:, 0], null.expand(2, -1), rtol=0, atol=0)  # <bos> state = every caption's first
    plain = HFTextEncoder.load(towers["gemma"], max_length=20, instruction=[])
    with torch.no_grad():
        want, want_mask, _, _ = pipe.encode_prompt(PROMPTS, do_classifier_free_guidance=False, max_sequence_length=20,
                                                   complex_human_instruction=None)
    states, mask, _ = plain.encode(PROMPTS)
    torch.testing.assert_close(states, want.float(), rtol=0, atol=0)
    assert torch.equal(mask, want_mask.bool())
    rec = gemma.record()
    assert rec["kind"] == "gemma" and rec["instruction"] == list(SANA_INSTRUCTION) and rec["context_length"] == 20
    again = HFTextEncoder.from_manifest({"text": rec})  # the instruction travels with the data's manifest
    assert again.identity() == gemma.identity() and again.identity() != plain.identity()


def test_sd3_kind_equals_sd3_encode_prompt(sd3_text):
    pipe = sd3_pipe(sd3_text)
    with torch.no_grad():
        want, neg, want_pooled, neg_pooled = pipe.encode_prompt(PROMPTS, None, None, do_classifier_free_guidance=True,
                                                                max_sequence_length=12)
    states, mask, pooled = sd3_text.encode(PROMPTS)
    assert states.shape == (2, 20 + 12, SD3_JOINT) and bool(mask.all()) and pooled.shape == (2, SD3_POOLED)
    torch.testing.assert_close(states, want.float(), rtol=0, atol=0)
    torch.testing.assert_close(pooled, want_pooled.float(), rtol=0, atol=0)
    # the pipeline encoded "" in a batch of 2: other matmul blocking, fp32 rounding apart
    torch.testing.assert_close(sd3_text.null_condition(), neg[0].float(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(sd3_text.null_pooled(), neg_pooled[0].float(), rtol=1e-6, atol=1e-6)
    from lct.hf_text import HFTextEncoder

    rec = sd3_text.record()
    assert (rec["kind"], rec["context_length"], rec["t5_length"], rec["pooled_dim"]) == ("sd3", 32, 12, SD3_POOLED)
    assert HFTextEncoder.from_manifest({"text": rec}).identity() == sd3_text.identity()


def _guided_lct(net, x_noisy, sigma, cond, w):
    """SPEC 9's guided f of the network that trains, written out here as the reference:
    f_null + w (f_c - f_null), the unconditional half on the learned null (cond_drop)."""
    b = x_noisy.shape[0]
    drop = torch.zeros(b, dtype=torch.bool)
    with torch.no_grad():
        if w == 1.0:
            return net(x_noisy, sigma, **cond, cond_drop=drop)
        both = {k: torch.cat([v, v]) for k, v in cond.items()}
        f = net(torch.cat([x_noisy, x_noisy]), torch.cat([sigma, sigma]), **both,
                cond_drop=torch.cat([drop, torch.ones_like(drop)]))
    f_c, f_null = f.chunk(2)
    return f_null + w * (f_c - f_null)


def _reference_sample(net, cond, noise, sigma_max, taus, w):
    """SPEC 9 multistep consistency sampling with sigma_min = 0: x = f(sigma_max z_0), then for each
    tau_k: x = f(x + tau_k z_k)."""
    b = noise[0].shape[0]
    x = _guided_lct(net, sigma_max * noise[0], torch.full((b,), float(sigma_max)), cond, w)
    for k, tau in enumerate(taus, start=1):
        x = _guided_lct(net, x + tau * noise[k], torch.full((b,), float(tau)), cond, w)
    return x.float()


@pytest.mark.parametrize("trained_null", [False, True])
def test_guided_step_equals_sana_pipeline(gemma, trained_null):
    """One guided stock-pipeline step at t = 1 (sigmas=[1.0]) = lct's guided f at sigma_max (SPEC 9),
    with the tower's null and with a trained (changed) null passed as negative embeddings."""
    from lct.hf_text import SANA_INSTRUCTION

    transformer = tiny_sana()
    pipe = sana_pipe(gemma, transformer)
    net = wrap_flow(transformer, "sana", gemma.null_condition())
    if trained_null:
        with torch.no_grad():
            net.net.null_text_states.add_(0.3 * torch.randn_like(net.net.null_text_states))
    w, b = 3.0, 2
    z = torch.randn(b, 4, 8, 8, generator=torch.Generator().manual_seed(5))
    kw = dict(sigmas=[1.0], guidance_scale=w, latents=z.clone(), output_type="latent", height=32, width=32,
              use_resolution_binning=False, max_sequence_length=20, complex_human_instruction=list(SANA_INSTRUCTION))
    with torch.no_grad():
        if trained_null:
            embeds, mask, _, _ = pipe.encode_prompt(PROMPTS, do_classifier_free_guidance=False, max_sequence_length=20,
                                                    complex_human_instruction=list(SANA_INSTRUCTION))
            null = net.net.null_text_states.detach()
            kw.pop("complex_human_instruction")
            want = pipe(prompt_embeds=embeds, prompt_attention_mask=mask, negative_prompt=None,
                        negative_prompt_embeds=torch.nn.functional.pad(null, (0, 0, 0, 20 - 1))[None].expand(b, -1, -1),
                        negative_prompt_attention_mask=(torch.arange(20) < 1).long()[None].expand(b, -1), **kw).images
        else:
            want = pipe(prompt=PROMPTS, **kw).images
    states, mask, _ = gemma.encode(PROMPTS)
    got = _guided_lct(net, SIGMA_MAX * z, torch.full((b,), SIGMA_MAX), {"text_states": states, "text_mask": mask}, w)
    equivalent(got, want)


@pytest.mark.parametrize("trained_null", [False, True])
def test_guided_step_equals_sd3_pipeline(sd3_text, trained_null):
    transformer = tiny_sd3()
    pipe = sd3_pipe(sd3_text, transformer)
    net = wrap_flow(transformer, "sd3", sd3_text.null_condition(), sd3_text.null_pooled())
    if trained_null:
        with torch.no_grad():
            net.net.null_text_states.add_(0.3 * torch.randn_like(net.net.null_text_states))
            net.net.null_pooled.add_(0.3 * torch.randn_like(net.net.null_pooled))
    w, b = 3.0, 2
    z = torch.randn(b, 4, 8, 8, generator=torch.Generator().manual_seed(5))
    kw = dict(sigmas=[1.0], guidance_scale=w, latents=z.clone(), output_type="latent", height=16, width=16,
              max_sequence_length=12)
    if trained_null:
        kw.update(negative_prompt_embeds=net.net.null_text_states.detach()[None].expand(b, -1, -1),
                  negative_pooled_prompt_embeds=net.net.null_pooled.detach()[None].expand(b, -1))
    with torch.no_grad():
        want = pipe(prompt=PROMPTS, **kw).images
    states, mask, pooled = sd3_text.encode(PROMPTS)
    got = _guided_lct(net, SIGMA_MAX * z, torch.full((b,), SIGMA_MAX),
                      {"text_states": states, "text_mask": mask, "pooled": pooled}, w)
    equivalent(got, want)


# ---------------------------------------------------------------------------------------------
# VAEs
# ---------------------------------------------------------------------------------------------


def test_dc_ae_and_sd3_vae_load_encode_and_normalise(tmp_path):
    from lct.vae import LatentNorm, downsample_factor, encode_posterior, latent_shape, load_vae, vae_summary

    dc, kl = tmp_path / "dc", tmp_path / "pipe"
    tiny_dc_ae().save_pretrained(str(dc))
    tiny_sd3_vae().save_pretrained(str(kl / "vae"))
    images = torch.rand(2, 3, 16, 16) * 2 - 1
    vae = load_vae(str(dc))
    assert type(vae).__name__ == "AutoencoderDC" and downsample_factor(vae) == 4 and latent_shape(vae, 16) == (4, 4, 4)
    mean, std = encode_posterior(vae, images)
    assert mean.shape == (2, 4, 4, 4) and float(std.abs().max()) == 0.0  # deterministic: the latent itself
    torch.testing.assert_close(mean, vae.encode(images).latent, rtol=0, atol=0)
    assert vae_summary(vae, str(dc))["config"]["scaling_factor"] == 0.41407
    vae = load_vae(str(kl))
    assert type(vae).__name__ == "AutoencoderKL" and downsample_factor(vae) == 2
    cfg = vae_summary(vae, str(kl))["config"]
    norm = LatentNorm.from_manifest({"vae": {"config": cfg}}, "vae")
    raw = torch.tensor([1.0, -2.0]).reshape(1, 2, 1, 1)
    close(norm.normalize(raw.double()).ravel(), [1.43729255, -3.15420745])  # SPEC 15.8
    dc_norm = LatentNorm.from_manifest({"vae": vae_summary(load_vae(str(dc)), str(dc))}, "vae")
    close(dc_norm.normalize(raw.double()).ravel(), [0.41407, -0.82814])
    (tmp_path / "other").mkdir()
    tiny_sana().save_config(str(tmp_path / "other"))
    with pytest.raises(UserError, match="holds a SanaTransformer2DModel"):
        load_vae(str(tmp_path / "other"))


# ---------------------------------------------------------------------------------------------
# Loading, full-size architectures, refusals
# ---------------------------------------------------------------------------------------------


def test_load_pipeline_and_transformer_folders(tmp_path):
    from diffusers import FlowMatchEulerDiscreteScheduler

    for family, model in (("sana", tiny_sana()), ("sd3", tiny_sd3())):
        folder = tmp_path / family
        model.save_pretrained(str(folder / "transformer"))
        FlowMatchEulerDiscreteScheduler(shift=3.0).save_pretrained(str(folder / "scheduler"))
        null = torch.randn(1 if family == "sana" else 9, GEMMA_DIM if family == "sana" else SD3_JOINT)
        pooled = torch.randn(SD3_POOLED)
        net = load_flow(str(folder), family, null, pooled)
        same = load_flow(str(folder / "transformer"), family, null, pooled, gradient_checkpointing=True)
        assert isinstance(net, FlowDenoiser) and net.scheduler_config["shift"] == 3.0 and same.scheduler_config
        assert same.net.transformer.gradient_checkpointing
        ref = _wrapped(family, null=null, null_pooled=pooled)
        x, cond = torch.randn(2, 4, 8, 8), _cond(family, 2)
        with torch.no_grad():
            torch.testing.assert_close(net(x, torch.tensor([0.2, 9.0]), **cond), ref(x, torch.tensor([0.2, 9.0]), **cond),
                                       rtol=0, atol=0)
        cfg = flow_config(str(folder), family)
        check_compatible(family, cfg, (4, 8, 8), GEMMA_DIM if family == "sana" else SD3_JOINT,
                         SD3_POOLED if family == "sd3" else None)
        with torch.device("meta"):
            meta = build_flow(family, cfg)
        assert sum(p.numel() for p in meta.parameters()) == sum(p.numel() for p in net.parameters()) - (
            null.numel() - meta.net.null_text_states.numel())
    with pytest.raises(UserError, match="not a SD3Transformer2DModel|holds a SanaTransformer2DModel"):
        flow_config(str(tmp_path / "sana"), "sd3")


def test_missing_weights_one_line_naming_the_key_fast(tmp_path):
    t0 = time.time()
    with pytest.raises(UserError, match=r"^model.pretrained Efficient-Large-Model/Sana_600M_512px_diffusers: not in the local"):
        load_flow("Efficient-Large-Model/Sana_600M_512px_diffusers", "sana", torch.zeros(1, 2304))  # offline (conftest)
    assert time.time() - t0 < 5
    weightless = tmp_path / "weightless"
    weightless.mkdir()
    tiny_sd3().save_config(str(weightless))
    with pytest.raises(UserError, match="could not load a SD3Transformer2DModel"):
        load_flow(str(weightless), "sd3", torch.zeros(9, SD3_JOINT), torch.zeros(SD3_POOLED))
    (tmp_path / "sched").mkdir()
    tiny_sana().save_pretrained(str(tmp_path / "sched" / "transformer"))
    from diffusers import DDPMScheduler

    DDPMScheduler().save_pretrained(str(tmp_path / "sched" / "scheduler"))
    with pytest.raises(UserError, match="not a flow-matching schedule"):
        load_flow(str(tmp_path / "sched"), "sana", torch.zeros(1, GEMMA_DIM))


@pytest.mark.parametrize("name,low,high", [("Sana_600M_512px_diffusers", 0.55e9, 0.65e9),
                                           ("Sana_1600M_1024px_diffusers", 1.55e9, 1.70e9),
                                           # 2.47 B with the 384^2 x 1536 positional table, a buffer in diffusers
                                           ("stable-diffusion-3.5-medium", 2.20e9, 2.30e9)])
def test_full_size_architectures_on_meta(name, low, high):
    family = FLOW_ARCHS[name][0]
    with torch.device("meta"):
        net = build_flow(family, name)
    n = sum(p.numel() for p in net.net.transformer.parameters())
    assert low < n < high, n


def test_check_compatible_refuses_before_loading():
    cfg = tiny_sana_config()
    with pytest.raises(ConfigError, match="model.pretrained.*4-channel latents, the data has 32"):
        check_compatible("sana", cfg, (32, 8, 8))
    with pytest.raises(ConfigError, match="text.model.*expects 16"):
        check_compatible("sana", cfg, (4, 8, 8), 2304)
    cfg = tiny_sd3_config()
    with pytest.raises(ConfigError, match="data.resolution"):
        check_compatible("sd3", cfg, (4, 9, 8))
    with pytest.raises(ConfigError, match="pooled"):
        check_compatible("sd3", cfg, (4, 8, 8), SD3_JOINT, 768)


@pytest.mark.parametrize("name", ["sana_600m_512", "sana_1600m_1024", "sd35_medium_512"])
def test_real_configs_load(name):
    from pathlib import Path

    from lct.config import load_config

    cfg = load_config(Path(__file__).resolve().parents[1] / "configs" / f"ect_{name}.yaml")
    assert cfg.model.arch in ("sana", "sd3") and cfg.data.latent_norm == "vae" and cfg.method.sigma_max == 1e8
    assert cfg.method.sampling_sigma_mins() == (0.0, 0.0) and cfg.distributed.zero_stage == 2


def test_config_refusals():
    from lct.config import load_config

    base = ["model.arch=sana", "data.latent_norm=vae", "method.sigma_data=1", "model.nsln=none", "method.preset=ect",
            "method.sample_boundary_sigma_min=0", "model.dropout=0"]
    with pytest.raises(ConfigError, match="model.pretrained.*Sana_600M_512px_diffusers"):
        load_config(None, base)
    ok = base + ["model.pretrained=x/y"]
    load_config(None, ok)
    for extra, key in (("text.kind=t5", "text.kind"), ("data.latent_norm=channel", "data.latent_norm"),
                       ("method.sample_boundary_sigma_min=0.003", "method.sample_boundary_sigma_min"),
                       ("model.nsln=qk", "model.nsln"), ("model.dropout=0.1", "model.dropout"),
                       ("sample.steps=[1,2,3]", "sample.steps")):
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            load_config(None, ok + [extra] + (["method.sigma_data=0.5"] if "channel" in extra else []))
    load_config(None, ["model.arch=sd3", "model.pretrained=x/y", "data.latent_norm=vae", "method.sigma_data=1",
                       "model.nsln=none", "text.kind=sd3", "method.preset=ect", "method.sample_boundary_sigma_min=0",
                       "model.dropout=0"])


# ---------------------------------------------------------------------------------------------
# Export: the stock pipelines load it and sample lct's levels
# ---------------------------------------------------------------------------------------------


def _manifest(tmp_path, family, text_rec, vae):
    vdir = tmp_path / "vae"
    vae.save_pretrained(str(vdir))
    from lct.vae import vae_summary

    return {"latent_shape": [4, 8, 8], "resolution": 32 if family == "sana" else 16, "vae": vae_summary(vae, str(vdir)),
            "text": text_rec, "manifest_path": str(tmp_path / "manifest.json")}


def _cfg(tmp_path, family):
    from lct.config import load_config

    return load_config(None, [f"model.arch={family}", "model.pretrained=local/tiny", "data.latent_norm=vae",
                              "method.sigma_data=1", "model.nsln=none", "method.preset=ect", "method.sigma_max=1e8",
                              "method.sample_boundary_sigma_min=0", "method.tau=[0.73863095408]", "model.dropout=0",
                              f"run.dir={tmp_path / 'run'}", "precision=fp32"])


@pytest.mark.slow
@pytest.mark.parametrize("family", ["sana", "sd3"])
def test_export_loads_in_the_stock_pipeline_and_samples_lcts_levels(family, gemma, sd3_text, tmp_path, monkeypatch):
    """export_flow -> diffusers.SanaPipeline / StableDiffusion3Pipeline.from_pretrained -> 1 and 2
    steps with the recorded sigmas equal SPEC 9 sampling of the network that trains, with the same noise."""
    import diffusers

    from lct.export_flow import export_flow, load_flow_export

    text = gemma if family == "sana" else sd3_text
    null_pooled = None if family == "sana" else text.null_pooled()
    net = wrap_flow(tiny_sana() if family == "sana" else tiny_sd3(), family, text.null_condition(), null_pooled)
    with torch.no_grad():  # a "trained" null, so that guidance sees it
        net.net.null_text_states.add_(0.2 * torch.randn_like(net.net.null_text_states))
    state = {k: v.detach().clone() for k, v in net.state_dict().items()}
    manifest = _manifest(tmp_path, family, text.record(), tiny_dc_ae() if family == "sana" else tiny_sd3_vae())
    cfg = _cfg(tmp_path, family)
    out = export_flow(net, state, tmp_path / "export", cfg=cfg, manifest=manifest, ema_name="ema", step=7)
    record = json.loads((out / "lct_export.json").read_text())
    assert record["sigmas"]["1_step"] == [1.0] and len(record["sigmas"]["2_step"]) == 2
    close(record["sigmas"]["2_step"][1], 0.73863095408 / 1.73863095408, rtol=1e-7)
    cls = getattr(diffusers, record["pipeline"])
    pipe = cls.from_pretrained(str(out))  # the stock class, nothing of lct's
    pipe.set_progress_bar_config(disable=True)
    assert type(pipe.scheduler).__name__ == "FlowMatchEulerDiscreteScheduler" and pipe.scheduler.config.stochastic_sampling
    b, shape = 2, (4, 8, 8)
    states, mask, pooled = text.encode(PROMPTS)
    cond = {"text_states": states, "text_mask": mask, **({"pooled": pooled} if family == "sd3" else {})}
    size = {"height": 32, "width": 32, "use_resolution_binning": False} if family == "sana" else {"height": 16, "width": 16}
    text_kw = ({"max_sequence_length": 20, "complex_human_instruction": record["instruction"]} if family == "sana"
               else {"max_sequence_length": 12})
    for steps in (1, 2):
        for w in (1.0, 2.0):
            g = torch.Generator().manual_seed(11)
            z = torch.randn((b, *shape), generator=g)
            z2 = torch.randn((b, *shape), generator=g)  # the pipeline's next draw: Sana's step noise
            if family == "sd3":
                torch.manual_seed(3)
                z2 = torch.randn((b, *shape))  # SD3's step draws from the global generator
                torch.manual_seed(3)
            kw = dict(sigmas=record["sigmas"][f"{steps}_step"], guidance_scale=w, output_type="latent",
                      generator=torch.Generator().manual_seed(11), **size)
            with torch.no_grad():
                if w == 1.0:
                    want = pipe(PROMPTS, **kw, **text_kw).images
                elif family == "sana":
                    null = load_flow_export(out)[1]
                    embeds, pmask, _, _ = pipe.encode_prompt(PROMPTS, do_classifier_free_guidance=False, **text_kw)
                    want = pipe(prompt_embeds=embeds, prompt_attention_mask=pmask, negative_prompt=None,
                                negative_prompt_embeds=null["negative_prompt_embeds"].expand(b, -1, -1),
                                negative_prompt_attention_mask=null["negative_prompt_attention_mask"].expand(b, -1),
                                **kw).images
                else:
                    null = load_flow_export(out)[1]
                    want = pipe(PROMPTS, negative_prompt_embeds=null["negative_prompt_embeds"].expand(b, -1, -1),
                                negative_pooled_prompt_embeds=null["negative_pooled_prompt_embeds"].expand(b, -1),
                                **kw, **text_kw).images
            got = _reference_sample(net, cond, [z, z2], cfg.method.sigma_max, cfg.method.tau[: steps - 1], w)
            equivalent(got, want)


@pytest.mark.parametrize("family,bucketed", [("sana", False), ("sd3", False), ("sana", True)])
def test_model_card_code_runs_as_written(family, bucketed, gemma, sd3_text, tmp_path, monkeypatch):
    """The card's code runs as written; a run on aspect-ratio buckets samples its most common
    trained size (here a landscape one) with the pipeline's binning off, since this tiny Sana's
    sample_size has no bin table (issue 33)."""
    from lct.buckets import Bucket, BucketTable
    from lct.export_flow import export_flow

    text = gemma if family == "sana" else sd3_text
    net = wrap_flow(tiny_sana() if family == "sana" else tiny_sd3(), family, text.null_condition(),
                    None if family == "sana" else text.null_pooled())
    manifest = _manifest(tmp_path, family, text.record(), tiny_dc_ae() if family == "sana" else tiny_sd3_vae())
    if bucketed:
        table = BucketTable((Bucket(32, 32, 1.0), Bucket(32, 64, 0.5), Bucket(64, 32, 2.0)), "mine.yaml")
        counts = {"32x32": 3, "32x64": 5, "64x32": 2}  # Sana sizes: multiples of 32
        manifest["buckets"] = {**table.record(4, 4), "counts": counts, "most_common": "32x64"}
    out = export_flow(net, net.state_dict(), tmp_path / "export", cfg=_cfg(tmp_path, family), manifest=manifest,
                      ema_name="ema", step=1)
    card = (out / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: diffusers") and "FlowMatchEulerDiscreteScheduler" in card
    code = card.split("```python\n", 1)[1].split("```", 1)[0]
    (tmp_path / "card.py").write_text(code)
    monkeypatch.chdir(out)
    runpy.run_path(str(tmp_path / "card.py"), run_name="__main__")
    assert (out / "sample.png").is_file()
    if bucketed:
        from PIL import Image

        record = json.loads((out / "lct_export.json").read_text())
        assert record["buckets"]["sizes"] == [[32, 64], [32, 32], [64, 32]]
        assert record["resolution_binning"]["covers_training"] is False and "use_resolution_binning=False" in code
        assert Image.open(out / "sample.png").size == (64, 32) and "32x64, 32x32, 64x32" in card


def test_export_refuses_sampling_sigma_mins(tmp_path):
    from lct.export_flow import check_exportable

    cfg = _cfg(tmp_path, "sana")
    check_exportable(cfg.method)
    with pytest.raises(UserError, match="method.sample_sigma_min"):
        check_exportable(cfg.method.model_copy(update={"sample_sigma_min": 0.002}))
    assert math.isclose(float(flow_t(torch.tensor(cfg.method.sigma_max))), 1.0)


def test_sana_data_prep_gemma_and_dc_ae(towers, tmp_path):
    """encode_latents with --text-kind gemma and an AutoencoderDC: deterministic latents (std 0),
    Gemma states trimmed to the caption's last real token (= the tower's, Sana's template), the
    instruction in the manifest, text_null.npy = the <bos> state."""
    from helpers_data import make_image_shards

    from lct.data_prep import encode_latents
    from lct.hf_text import SANA_INSTRUCTION, HFTextEncoder
    from lct.latents import SampleLayout, check_latent_sample, load_manifest, read_latent_shard

    tiny_dc_ae().save_pretrained(str(tmp_path / "dc"))
    images = make_image_shards(tmp_path / "img", n_shards=1, per_shard=4, size=(40, 28))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert encode_latents.main(["--input", images, "--output", str(tmp_path / "lat"), "--vae", str(tmp_path / "dc"),
                                    "--resolution", "32", "--text-kind", "gemma", "--text-model", towers["gemma"],
                                    "--text-max-length", "20", "--text-states", "--num-workers", "0", "--device", "cpu",
                                    "--batch-size", "3"]) == 0
    finally:
        torch.set_num_threads(threads)
    m = load_manifest(tmp_path / "lat" / "manifest.json")
    assert (m["text"]["kind"], m["text"]["context_length"], m["vae"]["class"]) == ("gemma", 20, "AutoencoderDC")
    assert m["text"]["instruction"] == list(SANA_INSTRUCTION) and m["latent_shape"] == [4, 8, 8]
    enc = HFTextEncoder.from_manifest(m)
    np.testing.assert_array_equal(np.load(tmp_path / "lat" / "text_null.npy"), enc.null_condition().numpy())
    layout = SampleLayout.from_manifest(m)
    for s in read_latent_shard(str(tmp_path / "lat" / "00000.tar")):
        assert check_latent_sample(s, layout) is None and float(np.abs(s["std"]).max()) == 0.0
        n = int((s["tokens"][0] != 0).sum())
        ref = enc(torch.from_numpy(s["tokens"]).long())[0][0, :n]
        assert s["states"].shape == (1, n, GEMMA_DIM)
        np.testing.assert_allclose(s["states"][0].astype(np.float32), ref.numpy(), rtol=2e-3, atol=2e-3)
