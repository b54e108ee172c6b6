"""VP / DDPM noise predictors as lct denoisers (SPEC 14): the formulas against SPEC 14.7, the
wrapped PixArt transformer against diffusers' own scheduler and pipelines (tiny random configs
of the same classes), precision, gradients, loading and the `vae` latent normalisation."""

import math
import time

import numpy as np
import pytest
import torch

from helpers_hf import CAPTIONS, TEXT_DIM, make_tiny_pixart_pipeline, make_tiny_t5, tiny_pixart, tiny_pixart_config
from helpers_spec import equivalent
from lct.errors import ConfigError, UserError
from lct.models.pixart import (PIXART_SCHEDULER, PixArtNet, build_pixart, check_compatible, load_pixart,
                               pixart_config, wrap_pixart)
from lct.models.vp import (VPDenoiser, alphas_cumprod_from_config, sigma_to_timestep, vp_log_sigmas,
                           vp_scalings)
from lct.vae import LatentNorm

RTOL = 1e-9  # SPEC 14.7 vectors


def close(a, b, rtol=RTOL):
    np.testing.assert_allclose(np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64), rtol=rtol, atol=0)


# ---------------------------------------------------------------------------------------------
# SPEC 14.7 vectors
# ---------------------------------------------------------------------------------------------


def test_schedule_vectors():
    abar = alphas_cumprod_from_config(PIXART_SCHEDULER)
    sig = np.exp(vp_log_sigmas(abar).numpy())
    spec = {0: (0.9999, 0.0100005000375), 1: (0.999780092072, 0.014830923709), 249: (0.524085373825, 0.952935500202),
            499: (0.0785872428818, 3.42413661904), 749: (0.00335055043894, 17.2469830099),
            999: (4.03582976538e-05, 157.40728081)}
    for t, (a, s) in spec.items():
        close(abar[t], a), close(sig[t], s)
    from diffusers import DDPMScheduler  # the same table as diffusers builds it (in float32)

    np.testing.assert_allclose(abar, DDPMScheduler(**PIXART_SCHEDULER).alphas_cumprod.double().numpy(), rtol=2e-6)
    cos = alphas_cumprod_from_config(dict(PIXART_SCHEDULER, beta_schedule="squaredcos_cap_v2"))  # diffusers' table
    np.testing.assert_allclose(cos, DDPMScheduler(beta_schedule="squaredcos_cap_v2").alphas_cumprod.double().numpy())
    with pytest.raises(ConfigError, match="model.scheduler"):
        alphas_cumprod_from_config(dict(PIXART_SCHEDULER, rescale_betas_zero_snr=True))


def test_sigma_to_timestep_vectors():
    ls = vp_log_sigmas(alphas_cumprod_from_config(PIXART_SCHEDULER))
    sigma = torch.tensor([0.002, 0.1, 0.5, 1.0, 2.0, 80.0, 157.0, 200.0], dtype=torch.float64)
    t = sigma_to_timestep(sigma, ls)
    close(t, [0, 26.409466821, 144.153871974, 258.093019695, 395.951979787, 929.618057904, 998.743531336, 999])
    knots = torch.arange(1000)
    torch.testing.assert_close(sigma_to_timestep(ls.exp(), ls), knots.double(), rtol=0, atol=1e-9)  # knot -> its t
    fine = torch.exp(torch.linspace(float(ls[0]), float(ls[-1]), 5001, dtype=torch.float64))
    steps = sigma_to_timestep(fine, ls).diff()
    assert bool((steps > 0).all())  # strictly increasing between the table's ends
    t32 = sigma_to_timestep(sigma.float(), ls)  # the fp32 path the network uses
    assert t32.dtype == torch.float32 and float((t32.double() - t).abs().max()) < 2e-3


def test_output_scalings_vectors():
    x, f_out, s = torch.tensor([0.3, -1.2], dtype=torch.float64), torch.tensor([0.5, -0.25], dtype=torch.float64), 2.0
    sig = torch.full((2,), s, dtype=torch.float64)

    def denoise(kind, sigma_min):
        c_skip, c_out, c_in = vp_scalings(sig, kind, sigma_min)
        close(c_in, [0.4472135955] * 2, rtol=1e-10)
        return c_skip * x + c_out * f_out

    close(denoise("epsilon", 0.0), [-0.7, -0.7])
    close(denoise("epsilon", 0.002), [-0.699, -0.7005])
    close(denoise("v_prediction", 0.0), [-0.387213595500, -0.0163932022500])
    close(denoise("v_prediction", 0.002), [-0.386670276212, -0.0170012318167])
    close(vp_scalings(torch.tensor([0.5, 80.0], dtype=torch.float64), "epsilon")[2], [0.894427191, 0.0124990235519])
    for kind in ("epsilon", "v_prediction"):  # the boundary condition f(x, sigma_min) = x
        c_skip, c_out, _ = vp_scalings(torch.tensor([0.002], dtype=torch.float64), kind, 0.002)
        assert float(c_skip) == 1.0 and float(c_out) == 0.0
    with pytest.raises(ConfigError, match="model.prediction_type"):
        vp_scalings(sig, "sample")


def test_stock_sampler_vectors():
    """SPEC 14.8 in float64: the snapped level of the configs' tau, lct's start, what the stock
    LCMScheduler step computes (sigma_min-0 f) against lct's f at sigma_min 0 and 0.004."""
    from lct.export_pixart import TIMESTEP_SCALING, snap_levels, start_scale

    ls = vp_log_sigmas(alphas_cumprod_from_config(PIXART_SCHEDULER))
    close(sigma_to_timestep(torch.tensor([0.73863095408], dtype=torch.float64), ls), [203.46441648])
    steps, levels = snap_levels([157.40728081, 0.73863095408], ls)
    assert steps == [999, 203]
    close(levels, [157.40728081, 0.736606968504])
    close(start_scale(levels[0]), 0.999979820648)
    u = 203 * TIMESTEP_SCALING  # LCM's boundary scalings at t = 203: plain x0
    assert 0.25 / (u * u + 0.25) < 1e-25 and u / math.sqrt(u * u + 0.25) == 1.0
    x, out = torch.tensor([0.3, -1.2], dtype=torch.float64), torch.tensor([0.5, -0.25], dtype=torch.float64)
    sig, abar = torch.full((2,), levels[1], dtype=torch.float64), alphas_cumprod_from_config(PIXART_SCHEDULER)[203]
    y = x / math.sqrt(1 + levels[1] ** 2)  # the pipeline's VP sample
    close(y, [0.24154387173, -0.96617548692])
    stock = {"epsilon": (y - math.sqrt(1 - abar) * out) / math.sqrt(abar),
             "v_prediction": math.sqrt(abar) * y - math.sqrt(1 - abar) * out}
    spec = {("epsilon", 0.0): [-0.068303484252, -1.01584825787], ("epsilon", 0.004): [-0.066303484252, -1.01684825787],
            ("v_prediction", 0.0): [-0.102060025292, -0.629643477007],
            ("v_prediction", 0.004): [-0.0997059895146, -0.633423596443]}
    for (kind, smin), want in spec.items():
        c_skip, c_out, _ = vp_scalings(sig, kind, smin)
        close(c_skip * x + c_out * out, want, rtol=1e-10)
        close(stock[kind], spec[(kind, 0.0)], rtol=1e-10)
    close(spec[("epsilon", 0.004)][0] - spec[("epsilon", 0.0)][0], 0.004 * 0.5, rtol=1e-8)  # f - stock = sigma_min F
    z = torch.tensor([1.0, -1.0], dtype=torch.float64)  # re-noising at tau: sqrt(abar) f + sqrt(1 - abar) z
    f0 = torch.tensor(spec[("epsilon", 0.0)], dtype=torch.float64)
    close(math.sqrt(abar) * f0 + math.sqrt(1 - abar) * z, [0.538082036923, -1.41098273471])
    close((f0 + levels[1] * z) / math.sqrt(1 + levels[1] ** 2), [0.538082036923, -1.41098273471])


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_stock_lcm_step_is_the_spec9_step(prediction_type):
    """The export's LCMScheduler, stepped on a model output F at integer timesteps, returns lct's
    sigma_min-0 f at that level and re-noises it to `c_in(tau) (f + tau z')` (SPEC 14.8), fp32."""
    from lct.export_pixart import pixart_scheduler, snap_levels

    cfg = dict(PIXART_SCHEDULER, prediction_type=prediction_type)
    ls = vp_log_sigmas(alphas_cumprod_from_config(cfg))
    steps, levels = snap_levels([157.40728081, 9.7232, 0.73863095408, 0.05], ls)
    sched = pixart_scheduler(cfg)
    sched.set_timesteps(timesteps=steps)
    assert sched.timesteps.tolist() == steps
    gen = torch.Generator().manual_seed(0)
    x = 157.40728081 * torch.randn(2, 4, 3, 3, generator=gen)  # lct's noisy latent at sigma_max
    for i, (t, s) in enumerate(zip(steps, levels)):
        sigma = torch.full((2,), s, dtype=torch.float32)
        c_skip, c_out, c_in = (c.view(-1, 1, 1, 1) for c in vp_scalings(sigma, prediction_type))
        out = torch.randn(x.shape, generator=gen)
        f = c_skip * x + c_out * out
        prev, denoised = sched.step(out, sched.timesteps[i], c_in * x, generator=torch.Generator().manual_seed(i),
                                    return_dict=False)
        equivalent(denoised, f)
        if i + 1 < len(steps):
            z = torch.randn(x.shape, generator=torch.Generator().manual_seed(i))
            x = f + levels[i + 1] * z
            equivalent(prev, x / math.sqrt(1 + levels[i + 1] ** 2))
        else:
            assert torch.equal(prev, denoised)


def test_unrepresentable_levels_are_refused_and_moved_ones_reported(capsys):
    from lct.export_pixart import sampler_notes, snap_levels

    ls = vp_log_sigmas(alphas_cumprod_from_config(PIXART_SCHEDULER))
    with pytest.raises(UserError, match=r"^method.tau .*rounds to timestep 0.*>= 0.01218") as err:
        snap_levels([157.40728081, 0.012], ls)
    assert "\n" not in str(err.value)
    with pytest.raises(UserError, match="same integer timestep"):
        snap_levels([157.40728081, 0.7386, 0.7385], ls)
    snap_levels([157.40728081, 0.73863095408], ls)
    assert capsys.readouterr().err == ""
    steps, _ = snap_levels([200.0, 0.0122], ls)  # above the table (t clamps to 999) and 21 % off at t = 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert steps == [999, 1] and len(lines) == 2 and all(l.startswith("warning: noise level") for l in lines)
    net = build_pixart(tiny_pixart_config(), sigma_min=0.004)

    class Method:
        sigma_min, tau, sigma_max, sigma_data = 0.004, [0.7386], 157.40728081, 1.0

        def sampling_sigma_mins(self):
            return 0.004, 0.0

    (note,) = sampler_notes(net, Method())
    assert note.startswith("method.sigma_min 0.004") and "SPEC 14.8" in note


def test_vae_latent_norm_vectors_and_round_trip():
    raw = np.array([[[[1.0]], [[-2.0]]]])  # [1, 2, 1, 1]
    sd, sdxl = LatentNorm.from_vae(0.18215), LatentNorm.from_vae(0.13025, None)
    close(sd.normalize(raw).ravel(), [0.18215, -0.3643])
    close(sdxl.normalize(raw).ravel(), [0.13025, -0.2605])
    shifted = LatentNorm.from_vae(1.5305, 0.0609)  # SD3's convention, with a shift
    close(shifted.normalize(raw).ravel(), [(1.0 - 0.0609) * 1.5305, (-2.0 - 0.0609) * 1.5305])
    x = torch.randn(3, 4, 5, 5)
    for norm in (sd, shifted):
        torch.testing.assert_close(norm.denormalize(norm.normalize(x)), x, rtol=1e-6, atol=1e-6)
        assert norm.normalize(x).dtype == torch.float32 and norm.normalize(x.double()).dtype == torch.float64
    assert (sd.kind, sd.sigma_data) == ("vae", 1.0)
    assert LatentNorm([0.0] * 4, [1.0] * 4).sigma_data == 0.5
    manifest = {"vae": {"config": {"scaling_factor": 0.13025, "shift_factor": None}}}
    assert LatentNorm.from_manifest(manifest, "vae").scale == 0.13025
    with pytest.raises(UserError, match="latent_norm vae"):
        LatentNorm.from_manifest({"vae": {"config": {}}}, "vae")
    with pytest.raises(UserError, match="scaling_factor"):
        LatentNorm.from_vae(0.0)


# ---------------------------------------------------------------------------------------------
# The wrapped network against diffusers' own math
# ---------------------------------------------------------------------------------------------


def _cond(b=3, length=6, seed=1):
    g = torch.Generator().manual_seed(seed)
    states = torch.randn(b, length, TEXT_DIM, generator=g)
    lengths = torch.tensor([3, length, 1, 4][:b])
    mask = torch.arange(length)[None] < lengths[:, None]
    return states, mask


def _direct(transformer, x, t, states, mask, micro=None):
    out = transformer(x, encoder_hidden_states=states, encoder_attention_mask=mask, timestep=t,
                      added_cond_kwargs=micro or {"resolution": None, "aspect_ratio": None}, return_dict=False)[0]
    return out


@pytest.mark.parametrize("prediction_type,out_channels,micro", [
    ("epsilon", 8, False), ("epsilon", 4, False), ("v_prediction", 4, False), ("epsilon", 8, True)])
def test_denoiser_equals_ddpm_pred_original_sample(prediction_type, out_channels, micro):
    from diffusers import DDPMScheduler

    ref = tiny_pixart(out_channels=out_channels, micro=micro)
    net = wrap_pixart(tiny_pixart(out_channels=out_channels, micro=micro), torch.zeros(1, TEXT_DIM),
                      dict(PIXART_SCHEDULER, prediction_type=prediction_type))
    sched = DDPMScheduler(**dict(PIXART_SCHEDULER, prediction_type=prediction_type), clip_sample=False,
                          variance_type="learned_range" if out_channels == 8 else "fixed_small")
    g = torch.Generator().manual_seed(0)
    b = 3
    x0, eps = torch.randn(b, 4, 8, 8, generator=g), torch.randn(b, 4, 8, 8, generator=g)
    states, mask = _cond(b)
    micro_kw = ({"resolution": torch.tensor([[64.0, 64.0]] * b), "aspect_ratio": torch.ones(b, 1)} if micro else None)
    abar = torch.as_tensor(alphas_cumprod_from_config(PIXART_SCHEDULER))
    with torch.no_grad():
        for t in (0, 1, 250, 500, 999):
            a = abar[t]
            x_t = (a.sqrt() * x0 + (1 - a).sqrt() * eps).float()
            out = _direct(ref, x_t, torch.full((b,), t), states, mask, micro_kw)  # the pipeline's call
            want = torch.cat([sched.step(out[i:i + 1], t, x_t[i:i + 1]).pred_original_sample for i in range(b)])
            sigma = ((1 - a) / a).sqrt()
            f = net((x_t.double() / a.sqrt()).float(), sigma.float().expand(b), text_states=states, text_mask=mask)
            assert f.dtype == torch.float32 and f.shape == (b, 4, 8, 8)
            equivalent(f, want)


def test_learned_variance_channels_do_not_reach_f():
    net = wrap_pixart(tiny_pixart(out_channels=8), torch.zeros(1, TEXT_DIM))
    x, (states, mask) = torch.randn(2, 4, 8, 8), _cond(2)
    sigma = torch.tensor([0.7, 5.0])
    with torch.no_grad():
        before = net(x, sigma, text_states=states, text_mask=mask)
        proj = net.net.transformer.proj_out
        rows = torch.arange(proj.out_features).reshape(-1, 8)[:, 4:].reshape(-1)  # (p, q, c) order, c >= 4
        proj.weight[rows] += 1.0
        proj.bias[rows] += 1.0
        after = net(x, sigma, text_states=states, text_mask=mask)
    torch.testing.assert_close(before, after, rtol=0, atol=0)


def test_cond_drop_uses_the_null_and_micro_conditions_are_fed():
    null = torch.randn(2, TEXT_DIM)
    net = wrap_pixart(tiny_pixart(micro=True), null, vae_downsample=8)
    x, (states, mask) = torch.randn(3, 4, 8, 8), _cond(3)
    sigma = torch.tensor([0.3, 2.0, 40.0])
    drop = torch.tensor([True, False, True])
    with torch.no_grad():
        f = net(x, sigma, text_states=states, text_mask=mask, cond_drop=drop)
        null_states = torch.zeros_like(states)
        null_states[:, :2] = null
        null_mask = torch.arange(states.shape[1])[None].expand(3, -1) < 2
        want = net(x, sigma, text_states=torch.where(drop[:, None, None], null_states, states),
                   text_mask=torch.where(drop[:, None], null_mask, mask))
        torch.testing.assert_close(f, want, rtol=0, atol=0)
        # micro-conditions: default (64, 64) px and 1.0 here; another size changes the output
        other = net(x, sigma, text_states=states, text_mask=mask, resolution=torch.tensor([[512.0, 256.0]] * 3),
                    aspect_ratio=torch.full((3, 1), 2.0))
        default = net(x, sigma, text_states=states, text_mask=mask)
        explicit = net(x, sigma, text_states=states, text_mask=mask, resolution=torch.tensor([[64.0, 64.0]] * 3),
                       aspect_ratio=torch.ones(3, 1))
    torch.testing.assert_close(default, explicit, rtol=0, atol=0)
    assert float((other - default).abs().max()) > 1e-3
    with pytest.raises(ValueError, match="caption_channels = 16"):
        net(x, sigma, text_states=torch.randn(3, 6, 7))


def test_micro_conditions_come_from_the_batchs_bucket():
    """SPEC 14.3 with aspect-ratio buckets: a batch of one bucket's latents (6 x 10, VAE /8) feeds
    resolution (48, 80) px and aspect ratio 0.6, what PixArtAlphaPipeline feeds at that size."""
    net = wrap_pixart(tiny_pixart(micro=True), torch.randn(1, TEXT_DIM), vae_downsample=8)
    x, (states, mask) = torch.randn(2, 4, 6, 10), _cond(2)
    sigma = torch.tensor([0.5, 8.0])
    with torch.no_grad():
        default = net(x, sigma, text_states=states, text_mask=mask)
        explicit = net(x, sigma, text_states=states, text_mask=mask, resolution=torch.tensor([[48.0, 80.0]] * 2),
                       aspect_ratio=torch.full((2, 1), 0.6))
        square = net(x, sigma, text_states=states, text_mask=mask, resolution=torch.tensor([[64.0, 64.0]] * 2),
                     aspect_ratio=torch.ones(2, 1))
    torch.testing.assert_close(default, explicit, rtol=0, atol=0)
    assert float((square - default).abs().max()) > 1e-3


def test_gradients_flow_to_every_trained_part():
    net = wrap_pixart(tiny_pixart(out_channels=8, micro=True), torch.randn(1, TEXT_DIM))
    net.train()
    x, (states, mask) = torch.randn(4, 4, 8, 8), _cond(4)
    f = net(x, torch.tensor([0.05, 0.8, 6.0, 90.0]), text_states=states, text_mask=mask,
            cond_drop=torch.tensor([False, True, False, False]))
    f.square().mean().backward()
    grads = {n: p.grad for n, p in net.named_parameters()}
    assert all(g is not None and torch.isfinite(g).all() for g in grads.values())
    for part in ("null_text_states", "pos_embed.proj", "adaln_single.emb.timestep_embedder", "adaln_single.emb.resolution",
                 "adaln_single.linear", "caption_projection", "attn1.to_q", "attn2.to_k", "ff.net", "scale_shift_table",
                 "proj_out"):
        hit = [n for n in grads if part in n]
        assert hit and any(float(grads[n].abs().sum()) > 0 for n in hit), part
    rows = torch.arange(net.net.transformer.proj_out.out_features).reshape(-1, 8)[:, 4:].reshape(-1)
    assert float(net.net.transformer.proj_out.weight.grad[rows].abs().max()) == 0.0  # variance head: no gradient


def test_bf16_autocast_only_inside_the_trunk():
    transformer = tiny_pixart(out_channels=8, micro=True)
    keys = {k: v.clone() for k, v in transformer.state_dict().items()}
    net = wrap_pixart(transformer, torch.randn(1, TEXT_DIM))
    assert {k: v for k, v in net.net.transformer.state_dict().items()}.keys() == keys.keys()
    assert all(torch.equal(net.net.transformer.state_dict()[k], v) for k, v in keys.items())  # pinning changes no state
    seen = {}

    def record(name):
        def hook(module, args, out):
            seen[name] = (args[0].dtype if args and torch.is_tensor(args[0]) else None,
                          (out[0] if isinstance(out, tuple) else out).dtype)
        return hook

    tr = net.net.transformer
    probes = {"pos_embed": tr.pos_embed, "time_mlp": tr.adaln_single.emb.timestep_embedder.linear_1,
              "resolution_mlp": tr.adaln_single.emb.resolution_embedder.linear_1, "adaln": tr.adaln_single.linear,
              "caption": tr.caption_projection, "to_q": tr.transformer_blocks[0].attn1.to_q,
              "cross_k": tr.transformer_blocks[0].attn2.to_k, "ff": tr.transformer_blocks[0].ff,
              "block": tr.transformer_blocks[0], "proj_out": tr.proj_out}
    for name, module in probes.items():
        module.register_forward_hook(record(name))
    x, (states, mask) = torch.randn(2, 4, 8, 8), _cond(2)
    sigma = torch.tensor([0.4, 12.0])
    with torch.no_grad():
        full = net(x, sigma, text_states=states, text_mask=mask)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            mixed = net(x, sigma, text_states=states, text_mask=mask)
    assert mixed.dtype == torch.float32
    for name in ("time_mlp", "resolution_mlp", "adaln", "proj_out"):  # per-sample layers: fp32 in and out
        assert seen[name] == (torch.float32, torch.float32), (name, seen[name])
    assert seen["pos_embed"][1] == torch.float32 and seen["block"][1] == torch.float32  # fp32 residual stream
    for name in ("to_q", "cross_k", "ff", "caption"):  # the per-token trunk runs in bf16
        assert seen[name][1] == torch.bfloat16, (name, seen[name])
    assert all(p.dtype == torch.float32 for p in net.parameters())
    assert float((mixed - full).abs().max()) < 0.05 * float(full.abs().max())


def test_gradient_checkpointing_same_values_and_grads():
    outs = []
    for ckpt in (False, True):
        transformer = tiny_pixart(out_channels=8)
        if ckpt:
            transformer.enable_gradient_checkpointing()
        net = wrap_pixart(transformer, torch.randn(1, TEXT_DIM, generator=torch.Generator().manual_seed(3)))
        net.train()
        x, (states, mask) = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(4)), _cond(2)
        f = net(x, torch.tensor([0.5, 3.0]), text_states=states, text_mask=mask)
        f.sum().backward()
        outs.append((f.detach(), net.net.transformer.transformer_blocks[0].attn1.to_q.weight.grad.clone()))
    torch.testing.assert_close(outs[0][0], outs[1][0], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(outs[0][1], outs[1][1], rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# Against the diffusers pipelines (text encoding, guidance, micro-conditions)
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def t5_tower(tmp_path_factory):
    from lct.hf_text import HFTextEncoder

    return HFTextEncoder.load(make_tiny_t5(tmp_path_factory.mktemp("pix_t5")), max_length=12)


@pytest.mark.parametrize("which", ["sigma", "alpha"])
def test_guided_step_equals_the_pipeline(t5_tower, which):
    """One guided DDIM step (trailing spacing, alpha_prev = 1, eta 0) returns the pipeline's
    guided pred_original_sample at t = 999: it must equal lct's guided f with the null condition."""
    from diffusers import AutoencoderKL, DDIMScheduler, PixArtAlphaPipeline, PixArtSigmaPipeline

    alpha = which == "alpha"
    sample = 128 if alpha else 8  # PixArtAlphaPipeline feeds micro-conditions only at sample_size 128
    transformer = tiny_pixart(out_channels=8, sample_size=sample, micro=alpha)
    vae = AutoencoderKL(block_out_channels=(8, 8, 8, 8), down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=1, norm_num_groups=4,
                        latent_channels=4)
    scheduler = DDIMScheduler(**PIXART_SCHEDULER, clip_sample=False, set_alpha_to_one=True, timestep_spacing="trailing")
    cls = PixArtAlphaPipeline if alpha else PixArtSigmaPipeline
    pipe = cls(tokenizer=t5_tower.hf_tokenizer, text_encoder=t5_tower.model, vae=vae, transformer=transformer,
               scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    prompts, w, b = ["a red circle on a blue background", "a small dog"], 4.5, 2
    x_t = torch.randn(b, 4, sample, sample, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        want = pipe(prompt=prompts, guidance_scale=w, num_inference_steps=1, latents=x_t.clone(), output_type="latent",
                    max_sequence_length=12, clean_caption=False, use_resolution_binning=False).images
    net = wrap_pixart(transformer, t5_tower.null_condition(), vae_downsample=pipe.vae_scale_factor)
    abar = alphas_cumprod_from_config(PIXART_SCHEDULER)[999]
    sigma = torch.full((b,), math.sqrt((1 - abar) / abar))
    states, mask, _ = t5_tower.encode(prompts)
    x_noisy = (x_t.double() / math.sqrt(abar)).float()
    with torch.no_grad():
        cond = net(x_noisy, sigma, text_states=states, text_mask=mask)
        null = net(x_noisy, sigma, text_states=states, text_mask=mask, cond_drop=torch.ones(b, dtype=torch.bool))
    equivalent(null + w * (cond - null), want)


# ---------------------------------------------------------------------------------------------
# Loading and refusals
# ---------------------------------------------------------------------------------------------


def test_load_pipeline_folder_and_transformer_folder(tmp_path):
    folder = make_tiny_pixart_pipeline(tmp_path / "pipe", prediction_type="v_prediction", out_channels=8)
    null = torch.randn(1, TEXT_DIM)
    net = load_pixart(folder, null)
    assert isinstance(net, VPDenoiser) and isinstance(net.net, PixArtNet)
    assert net.prediction_type == "v_prediction" and net.scheduler_config["beta_schedule"] == "linear"
    same = load_pixart(str(tmp_path / "pipe" / "transformer"), null)  # finds ../scheduler
    assert same.prediction_type == "v_prediction"
    lone = tmp_path / "lone"
    tiny_pixart().save_pretrained(str(lone))
    assert load_pixart(str(lone), null).prediction_type == "epsilon"  # no scheduler: PixArt's own schedule
    x, (states, mask) = torch.randn(2, 4, 8, 8), _cond(2)
    ref = wrap_pixart(tiny_pixart(out_channels=8), null, dict(PIXART_SCHEDULER, prediction_type="v_prediction"))
    with torch.no_grad():
        torch.testing.assert_close(net(x, torch.tensor([0.2, 9.0]), text_states=states, text_mask=mask),
                                   ref(x, torch.tensor([0.2, 9.0]), text_states=states, text_mask=mask), rtol=0, atol=0)
    ckpt = load_pixart(folder, null, gradient_checkpointing=True)
    assert ckpt.net.transformer.gradient_checkpointing
    cfg = pixart_config(folder)  # config only: the pre-flight check and a meta-device build
    check_compatible(cfg, (4, 8, 8), TEXT_DIM)
    with torch.device("meta"):
        meta = build_pixart(cfg)
    assert sum(p.numel() for p in meta.parameters()) == sum(p.numel() for p in net.parameters())


def test_missing_weights_one_line_naming_the_key_fast(tmp_path):
    t0 = time.time()
    with pytest.raises(UserError, match=r"^model.pretrained PixArt-alpha/PixArt-Sigma-XL-2-512-MS: not in the local"):
        load_pixart("PixArt-alpha/PixArt-Sigma-XL-2-512-MS", torch.zeros(1, 4096))  # HF_HUB_OFFLINE=1 (conftest)
    assert time.time() - t0 < 5
    with pytest.raises(UserError, match="model.pretrained .*no such folder"):
        load_pixart(str(tmp_path / "nowhere" / "x"), torch.zeros(1, 4096))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(UserError, match="model.pretrained .*transformer/config.json"):
        load_pixart(str(empty), torch.zeros(1, 4096))
    weightless = tmp_path / "weightless"
    weightless.mkdir()
    tiny_pixart().save_config(str(weightless))
    with pytest.raises(UserError, match="could not load a PixArtTransformer2DModel"):
        load_pixart(str(weightless), torch.zeros(1, TEXT_DIM))


@pytest.mark.proc
@pytest.mark.slow
def test_hub_cache_is_used_offline(tmp_path, python):
    """A hub id already in the local cache loads with no network (local_files_only)."""
    from conftest import run_cmd

    pipe = make_tiny_pixart_pipeline(tmp_path / "pipe")
    snap = tmp_path / "hub" / "models--lct-test--tiny-pixart" / "snapshots" / ("0" * 40)
    snap.parent.mkdir(parents=True)
    import shutil

    shutil.copytree(pipe, snap)
    (snap.parents[1] / "refs").mkdir()
    (snap.parents[1] / "refs" / "main").write_text("0" * 40)
    code = ("import torch; from lct.models.pixart import load_pixart; "
            "n = load_pixart('lct-test/tiny-pixart', torch.zeros(1, 16)); print('ok', n.prediction_type)")
    proc = run_cmd([python, "-c", code], env={"HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"},
                   timeout=300)
    assert proc.returncode == 0 and "ok epsilon" in proc.stdout, proc.stderr[-2000:]


def test_check_compatible_refuses_before_loading():
    cfg = tiny_pixart_config()
    check_compatible(cfg, (4, 8, 8), TEXT_DIM)
    with pytest.raises(ConfigError, match="model.pretrained.*4-channel latents, the data has 16"):
        check_compatible(cfg, (16, 8, 8))
    with pytest.raises(ConfigError, match="data.resolution"):
        check_compatible(cfg, (4, 9, 8))
    with pytest.raises(ConfigError, match="text.model.*expects 16"):
        check_compatible(cfg, (4, 8, 8), 512)
    with pytest.raises(ValueError, match="null_states"):
        PixArtNet(tiny_pixart(), torch.zeros(1, 7))
