"""Exports as diffusers pipelines: `LCTScheduler` against SPEC 1/9, the pipeline's images against
SPEC 9 written out bit for bit (1-step, 2-step, guided), the CLIPTextModel form of the open_clip
tower, save -> load -> save, old-format exports, bad folders, and a trained run."""

import json
import math
import os

import numpy as np
import pytest
import torch

from helpers_export import legacy_parts, make_tiny_export, reference_images

PROMPTS = ["a large red circle in the top left corner", "small blue square at the bottom", "a green triangle"]


@pytest.fixture(scope="module")
def work(tiny_export):
    """conftest's tiny export (`work/export`) and the same network in the old format (`work/legacy`)."""
    torch.set_num_threads(1)
    w = tiny_export.parent
    make_tiny_export(w, legacy=True)
    return w


@pytest.fixture(scope="module")
def parts(work):
    return legacy_parts(work / "legacy")


def pil_array(images) -> np.ndarray:
    return np.stack([np.asarray(im) for im in images])


# ---------------------------------------------------------------------------------------------
# The scheduler (SPEC 1, 9)
# ---------------------------------------------------------------------------------------------


def test_scheduler_levels_and_noise_are_spec():
    from diffusers import CMStochasticIterativeScheduler

    from lct.consistency import scalings
    from lct.scheduler import LCTScheduler, karras_taus

    s = LCTScheduler()  # SPEC 1 defaults: sigma_min 0.002, sigma_data 0.5, 250 ln sigma; iLCT's tau
    assert s.init_noise_sigma == 80.0 and list(s.config.taus) == [0.36931547704]
    s.set_timesteps(2)
    assert s.levels == [80.0, 0.36931547704] and s.sigmas.tolist()[-1] == 0.0
    assert torch.allclose(s.timesteps.double(), 250 * torch.log(torch.tensor([80.0, 0.36931547704], dtype=torch.float64)),
                          rtol=1e-6)
    s.set_timesteps(taus=[2.5, 0.5, 0.1])  # k steps: any decreasing taus, not grid indices
    assert s.levels == [80.0, 2.5, 0.5, 0.1] and s.num_inference_steps == 4
    s.set_timesteps(sigmas=[80.0, 2.5, 0.5])  # diffusers' form: all levels, the first sigma_max
    assert s.levels == [80.0, 2.5, 0.5]
    with pytest.raises(ValueError, match="start at the model's sigma_max"):
        s.set_timesteps(sigmas=[40.0, 2.5])
    # SPEC 1's boundary scalings are diffusers' CM scheduler's where both can express the level.
    sig = torch.tensor([0.318283288839], dtype=torch.float64)
    cm = CMStochasticIterativeScheduler(sigma_min=0.002, sigma_data=0.5)
    c_skip, c_out = cm.get_scalings_for_boundary_condition(sig)
    ours = scalings(sig, 0.5, 0.002)
    assert math.isclose(c_skip.item(), ours[0].item(), rel_tol=1e-12) and math.isclose(c_out.item(), ours[1].item(), rel_tol=1e-11)
    # step(f, t, x, generator): f + sqrt(tau^2 - sample_sigma_min^2) z between steps, with
    # sample_sigma_min separate from the boundary's (ECT trains with sigma_min 0 and records
    # another for sampling); f itself after the last step.
    e = LCTScheduler(sigma_min=0.0, sample_sigma_min=0.003, taus=[0.821])
    e.set_timesteps(2)
    f, x = torch.full((2, 4), 0.25), torch.zeros(2, 4)
    gens = [torch.Generator().manual_seed(i) for i in (5, 6)]
    first = e.step(f, e.timesteps[0], x, generator=gens)
    z = torch.stack([torch.randn(4, generator=torch.Generator().manual_seed(i)) for i in (5, 6)])
    assert torch.equal(first.prev_sample, f + math.sqrt(0.821 ** 2 - 0.003 ** 2) * z)
    last = e.step(f, e.timesteps[1], first.prev_sample, generator=gens, return_dict=False)
    assert torch.equal(last[0], f) and torch.equal(last[1], f)
    with pytest.raises(ValueError, match="decreasing"):
        s.set_timesteps(taus=[0.5, 0.8])
    # More steps than the model records taus for: SPEC 9's Karras levels on [0.002, sigma_max].
    s.set_timesteps(3)
    assert s.levels == [80.0, *karras_taus(3, 0.002, 80.0)]
    with pytest.raises(ValueError, match="need 1 tau value"):
        s.set_timesteps(2, taus=[0.5, 0.3])


def _ect_eval_reference(F, z, z2, t_max=80.0, mid_t=0.821, sigma_min=0.003, sigma_data=0.5):
    """locuslab/ect, main branch: `ct_eval.py` generator_fn with `ECMPrecond` in eval mode
    (training/networks.py), transcribed in float64; F(x_in, sigma) is the network."""
    def D(x, t):
        c_skip = sigma_data ** 2 / ((t - sigma_min) ** 2 + sigma_data ** 2)
        c_out = (t - sigma_min) * sigma_data / math.sqrt(t ** 2 + sigma_data ** 2)
        c_in = 1 / math.sqrt(sigma_data ** 2 + t ** 2)
        return c_skip * x + c_out * F(c_in * x, t)

    x = D(z.double() * t_max, t_max)
    return D(x + mid_t * z2.double(), mid_t)


def test_ect_evaluation_scalings_reproduce_the_reference(work, tmp_path):
    """ECT trains with sigma_min 0 and evaluates with boundary scalings at 0.003 and noise t * z
    (SPEC 2.4): the `ect` preset records that for its exports, and `python -m lct.export
    --boundary-sigma-min 0.003 --sample-sigma-min 0` rewrites an export so that it samples as
    ECT's evaluation does."""
    from lct.config import load_config
    from lct.export import load_pipeline
    from lct.export import main as export_main
    from lct.scheduler import with_sampling_sigma_min

    m = load_config(None, ["method.preset=ect"]).method
    assert m.sigma_min == 0.0 and m.sampling_sigma_mins() == (0.003, 0.0)
    assert load_config(None, ["method.preset=ect_imagenet"]).method.sampling_sigma_mins() == (0.0, 0.0)

    assert export_main([str(work / "export"), "--out", str(tmp_path / "ect"), "--boundary-sigma-min", "0.003",
                        "--sample-sigma-min", "0"]) == 0
    pipe = load_pipeline(tmp_path / "ect")
    assert pipe.scheduler.config.sigma_min == 0.003 and pipe.scheduler.noise_sigma_min == 0.0
    assert pipe.training_record["method"]["sample_boundary_sigma_min"] == 0.003
    got = pipe(PROMPTS[:2], num_inference_steps=2, tau=0.821, seed=4, output_type="latent").images

    states, mask, pooled = pipe.encode_prompt(PROMPTS[:2])[:3]
    cond = {"text_states": states, "text_mask": mask, "pooled": pooled, "cond_drop": torch.zeros(2, dtype=torch.bool)}
    scale = pipe.scheduler.config.time_embed_scale

    def F(x_in, t):  # lct's network call: the time input of SPEC 1, fp32
        e = torch.full((2,), scale * math.log(t) / 4, dtype=torch.float32)
        return pipe.transformer(x_in.float(), e, **cond).double()

    gens = pipe.sample_generators(4, range(2))  # seed=4's per-sample streams: z, then z'
    z = torch.stack([torch.randn(pipe.latent_shape, generator=g) for g in gens])
    z2 = torch.stack([torch.randn(pipe.latent_shape, generator=g) for g in gens])
    ref = _ect_eval_reference(F, z, z2)
    torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-5)
    # The recorded scalings of the source export (training's) give other samples: the option has teeth.
    plain = load_pipeline(work / "export")
    plain.scheduler = with_sampling_sigma_min(plain.scheduler, 0.0, 0.0)
    other = plain(PROMPTS[:2], num_inference_steps=2, tau=0.821, seed=4, output_type="latent").images
    assert (other.double() - ref).abs().max() > 1e-3
    with pytest.raises(SystemExit):
        export_main([str(work / "export"), "--out", str(tmp_path / "bad"), "--boundary-sigma-min", "nan"])


# ---------------------------------------------------------------------------------------------
# The text tower in transformers' form
# ---------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_clip_text_model_form_equals_the_open_clip_tower(tmp_path):
    """lct's tiny tower (2 layers, exact GELU) maps onto CLIPTextModelWithProjection + CLIPTokenizer;
    reloaded with transformers alone they give open_clip's token ids, token states and pooled
    feature. The demo's LayerScale tower does not map, and says why."""
    from transformers import CLIPTextModelWithProjection, CLIPTokenizer

    from lct.pipeline_text import clip_token_ids, to_clip_text_model
    from lct.text import PROBE, TextEncoder

    enc = TextEncoder.load("lct-tiny-text", "random", seed=3)
    model, tok = to_clip_text_model(enc)
    model.save_pretrained(tmp_path / "text_encoder")
    tok.save_pretrained(tmp_path / "tokenizer")
    model = CLIPTextModelWithProjection.from_pretrained(tmp_path / "text_encoder").eval()
    tok = CLIPTokenizer.from_pretrained(tmp_path / "tokenizer")
    prompts = PROMPTS + [PROBE, "", "Tom &amp; Jerry <|endoftext|> ＡＢＣ", "word " * 100]
    ids = enc.tokenize(prompts)
    assert torch.equal(clip_token_ids(tok, prompts), ids)
    states, mask, pooled = enc(ids)
    with torch.no_grad():
        out = model(input_ids=ids)
    assert (out.last_hidden_state - states).abs().max() <= 1e-5
    assert (out.text_embeds - pooled).abs().max() <= 1e-5
    c32 = TextEncoder.load("lct-tiny-text-c32", "random", seed=0)
    assert "ls_1.gamma" in to_clip_text_model(c32)


# ---------------------------------------------------------------------------------------------
# The pipeline against the sampler it replaced
# ---------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_pipeline_images_equal_spec9_written_out(work, parts):
    """DiffusionPipeline.from_pretrained(export, trust_remote_code=True) (the folder's own code)
    gives, bit for bit, the images (and latents) of SPEC 9 written out on the consistency function
    that trains (`reference_images`) on the same text condition, for 1, 2 and 3 steps and guided,
    for any batch. Its CLIPTextModel form of the tower gives open_clip's condition to fp32
    rounding (another attention kernel), hence images within one uint8 level."""
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(str(work / "export"), trust_remote_code=True)
    assert type(pipe).__name__ == "LCTPipeline" and type(pipe.text_encoder).__name__ == "CLIPTextModelWithProjection"
    assert type(pipe).__module__.startswith("diffusers_modules")  # the export's copy of lct/pipeline.py
    pipe.set_progress_bar_config(disable=True)
    same_text = {**parts, "condition": lambda caps: pipe.encode_prompt(caps, "cpu")[:3]}
    for steps, taus, w in ((1, None, 1.0), (2, None, 1.0), (3, [1.2, 0.3], 1.0), (2, None, 2.5), (1, None, 1.7)):
        ref, ref_lat = reference_images(same_text, PROMPTS, [0, 1, 2], seed=7, steps=steps, taus=taus, guidance=w)
        got = pipe(PROMPTS, num_inference_steps=steps, tau=taus, guidance_scale=w, seed=7)
        assert np.array_equal(pil_array(got.images), ref), (steps, taus, w)
        lat = pipe(PROMPTS, num_inference_steps=steps, tau=taus, guidance_scale=w, seed=7, output_type="latent").images
        assert torch.equal(lat, ref_lat)
        open_clip_ref, _ = reference_images(parts, PROMPTS, [0, 1, 2], seed=7, steps=steps, taus=taus, guidance=w)
        assert np.abs(open_clip_ref.astype(int) - ref.astype(int)).max() <= 1
    enc = parts["text"]
    states, mask, pooled = enc(enc.tokenize(PROMPTS))
    got_states, got_mask, got_pooled = pipe.encode_prompt(PROMPTS, "cpu")[:3]
    assert torch.equal(got_mask, mask) and (got_states - states).abs().max() <= 1e-5
    assert (got_pooled - pooled).abs().max() <= 1e-5
    # Noise keyed per sample index: sample 2 alone, given its index, is the same image.
    alone = pipe(PROMPTS[2], num_inference_steps=2, seed=7, sample_indices=[2]).images
    full = pipe(PROMPTS, num_inference_steps=2, seed=7).images
    assert np.array_equal(np.asarray(alone[0]), np.asarray(full[2]))


@pytest.mark.slow
def test_pipeline_options(work):
    from lct.pipeline import LCTPipeline

    pipe = LCTPipeline.from_pretrained(str(work / "export"))  # lct's own class: no trust_remote_code needed
    pipe.set_progress_bar_config(disable=True)
    two = pipe(PROMPTS[:2], num_images_per_prompt=2, seed=0, output_type="np").images
    rep = pipe([PROMPTS[0]] * 2 + [PROMPTS[1]] * 2, seed=0, output_type="np").images
    assert two.shape == (4, 32, 32, 3) and two.dtype == np.float32 and 0 <= two.min() and two.max() <= 1
    # Each prompt repeated consecutively, as diffusers pipelines do (encoded once and repeated: the
    # text tower's batch of 2 vs 4 rounds differently in the last bits).
    assert np.allclose(two, rep, atol=1e-5)
    pt = pipe(PROMPTS[:2], seed=0, output_type="pt").images
    assert pt.shape == (2, 3, 32, 32)
    null = pipe(PROMPTS[:1], guidance_scale=3.0, seed=0, output_type="latent").images
    neg = pipe(PROMPTS[:1], guidance_scale=3.0, negative_prompt="a yellow star", seed=0, output_type="latent").images
    plain = pipe(PROMPTS[:1], seed=0, output_type="latent").images
    assert not torch.equal(null, neg) and not torch.equal(null, plain)
    g1 = pipe(PROMPTS[:2], num_inference_steps=2, generator=torch.Generator().manual_seed(5), output_type="latent").images
    g2 = pipe(PROMPTS[:2], num_inference_steps=2, generator=torch.Generator().manual_seed(5), output_type="latent").images
    assert torch.equal(g1, g2) and not torch.equal(g1, pipe(PROMPTS[:2], num_inference_steps=2, seed=5,
                                                             output_type="latent").images)
    z = torch.randn(1, *pipe.latent_shape, generator=torch.Generator().manual_seed(1))
    assert pipe(PROMPTS[:1], latents=z, output_type="latent").images.shape == (1, *pipe.latent_shape)
    # bf16 as every diffusers model: the trunk's weights in bf16, SPEC 1.1's per-sample layers,
    # norms and null condition in fp32; pipe.dtype says so.
    pipe.to("cpu", torch.bfloat16)
    t = pipe.transformer
    assert pipe.dtype == t.dtype == t.blocks[0].mlp.fc1.weight.dtype == pipe.vae.dtype == torch.bfloat16
    assert {p.dtype for n, p in t.named_parameters() if "adaLN" in n or "t_embedder" in n or "null_" in n} == {torch.float32}
    low = pipe(PROMPTS[:1], seed=0, output_type="latent").images
    assert low.dtype == torch.float32 and torch.isfinite(low).all() and (low - plain).abs().max() < 0.1


def test_bucket_sizes_height_width_and_refusals(work, tmp_path):
    """A model trained on aspect-ratio buckets samples each trained size (default: the most common,
    first in `sizes`), refuses any other in one line, keeps `sizes` through save/load; its square
    size is the square model's image; a square model refuses another size as before."""
    from lct.pipeline import LCTPipeline

    sq = LCTPipeline.from_pretrained(str(work / "export"))
    sq.set_progress_bar_config(disable=True)
    sizes = [[24, 40], [32, 32], [40, 24]]
    pipe = LCTPipeline(sq.transformer, sq.scheduler, sq.vae, sq.text_encoder, sq.tokenizer, sizes=sizes)
    pipe.set_progress_bar_config(disable=True)
    assert pipe.latent_shape == (4, 6, 10) and pipe(PROMPTS[:1], seed=0, output_type="np").images.shape == (1, 24, 40, 3)
    assert pipe(PROMPTS[:2], height=40, width=24, seed=0, output_type="np").images.shape == (2, 40, 24, 3)
    assert pipe(PROMPTS[:1], width=40, seed=0, output_type="pt").images.shape == (1, 3, 24, 40)  # height: the default's
    assert torch.equal(pipe(PROMPTS[:1], height=32, width=32, seed=0, output_type="latent").images,
                       sq(PROMPTS[:1], seed=0, output_type="latent").images)
    with pytest.raises(ValueError, match=r"^height 48, width 48: this model was trained at \(height x width\) "
                                         r"24x40, 32x32, 40x24 only; pass one of those \(default 24x40\)$"):
        pipe(PROMPTS[:1], height=48, width=48)
    with pytest.raises(ValueError, match=r"^height 24: this model generates 32x32 images"):
        sq(PROMPTS[:1], height=24, width=40)
    pipe.save_pretrained(tmp_path / "b")
    assert json.loads((tmp_path / "b" / "model_index.json").read_text())["sizes"] == sizes
    assert "sizes" not in json.loads((work / "export" / "model_index.json").read_text())
    assert LCTPipeline.from_pretrained(str(tmp_path / "b")).config.sizes == sizes

@pytest.mark.slow
def test_save_load_save_gives_identical_files(work, tmp_path):
    from lct.pipeline import LCTPipeline

    src = work / "export"
    again = work / "again_save_load"  # beside the source: the record's relative paths stay the same
    LCTPipeline.from_pretrained(str(src)).save_pretrained(again)
    files = sorted(p.relative_to(src) for p in src.rglob("*") if p.is_file())
    assert sorted(p.relative_to(again) for p in again.rglob("*") if p.is_file()) == files
    for f in files:
        assert (src / f).read_bytes() == (again / f).read_bytes(), f
    # Elsewhere, the record's paths are rebased to the new folder (an export holds no absolute path).
    LCTPipeline.from_pretrained(str(src)).save_pretrained(tmp_path / "elsewhere")
    rebased = json.loads((tmp_path / "elsewhere" / "lct_export.json").read_text())
    assert (tmp_path / "elsewhere" / rebased["manifest_path"]).resolve() == (src / json.loads(
        (src / "lct_export.json").read_text())["manifest_path"]).resolve()
    index = json.loads((src / "model_index.json").read_text())
    assert index["_class_name"] == ["pipeline", "LCTPipeline"]
    assert index["transformer"] == ["lct_dit", "TextDiT"] and index["scheduler"] == ["lct_scheduler", "LCTScheduler"]
    assert index["text_encoder"] == ["transformers", "CLIPTextModelWithProjection"]
    card = (src / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: diffusers\npipeline_tag: text-to-image\nlicense:")
    assert "trust_remote_code=True" in card and "123 optimizer steps" in card and "`ema`" in card


@pytest.mark.slow
def test_old_format_export_loads_and_converts(work, parts, tmp_path):
    """An export written before pipelines samples as it did (bit for bit: it keeps open_clip's
    tower), directly and after conversion to a pipeline folder."""
    from lct.export import main as export_main
    from lct.export import load_pipeline

    old = load_pipeline(work / "legacy")
    ref, _ = reference_images(parts, PROMPTS, [0, 1, 2], seed=3, steps=2, guidance=2.0)
    assert np.array_equal(pil_array(old(PROMPTS, num_inference_steps=2, guidance_scale=2.0, seed=3).images), ref)
    assert export_main([str(work / "legacy"), "--out", str(tmp_path / "converted")]) == 0
    new = load_pipeline(tmp_path / "converted")
    assert np.array_equal(pil_array(new(PROMPTS, num_inference_steps=2, guidance_scale=2.0, seed=3).images), ref)
    assert json.loads((tmp_path / "converted" / "lct_export.json").read_text())["converted_from"] == "lct-export/1"


def test_bad_export_folders_give_one_line(work, tmp_path, capsys):
    import shutil

    from conftest import run_cli
    from lct.sample import main as sample_main

    from lct.errors import UserError
    from lct.export import load_pipeline

    broken = tmp_path / "broken"
    shutil.copytree(work / "export", broken)
    (broken / "transformer" / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(UserError, match=r"transformer/diffusion_pytorch_model.safetensors is missing.*python -m lct.export"):
        load_pipeline(broken)
    (broken / "model_index.json").unlink()
    (broken / "lct_export.json").unlink()
    with pytest.raises(UserError, match=r"model_index.json is missing"):
        load_pipeline(broken)
    code, _, err = run_cli(capsys, sample_main, ["--checkpoint", str(tmp_path / "nowhere"), "--prompt", "x",
                                                 "--out", str(tmp_path / "o")])
    assert code == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1


# ---------------------------------------------------------------------------------------------
# A trained run, end to end
# ---------------------------------------------------------------------------------------------


@pytest.mark.proc
@pytest.mark.slow
def test_trained_run_exports_a_pipeline_that_samples_like_lct_sample(tmp_path, latent_data, finished_run):
    """A trained run (conftest's `finished_run`, 6 steps on the tiny data, copied): its export loads
    with DiffusionPipeline.from_pretrained, and its images equal `python -m lct.sample`'s PNGs and
    SPEC 9 sampling written out (1-step, 2-step, guided)."""
    import shutil

    from diffusers import DiffusionPipeline
    from PIL import Image

    from lct.latents import latent_stats, load_manifest
    from lct.models import Precond, TextDiT
    from lct.sample import main as sample_main
    from lct.vae import LatentNorm, load_vae

    shutil.copytree(finished_run / "run", tmp_path / "run", ignore=shutil.ignore_patterns("locks"))
    export = tmp_path / "run" / "export" / "ema"
    assert (export / "model_index.json").is_file() and (export / "README.md").is_file()
    pipe = DiffusionPipeline.from_pretrained(str(export), trust_remote_code=True)
    pipe.set_progress_bar_config(disable=True)
    manifest = load_manifest(latent_data["train"])
    m = pipe.scheduler.config
    parts = {"precond": Precond(TextDiT.from_pretrained(str(export / "transformer")).eval(), sigma_data=m.sigma_data,
                                sigma_min=m.sigma_min, time_embed_scale=m.time_embed_scale).eval(),
             "condition": lambda caps: pipe.encode_prompt(caps, "cpu")[:3], "vae": load_vae(str(latent_data["vae"])),
             "norm": LatentNorm(*latent_stats(manifest, "channel")), "shape": manifest["latent_shape"],
             "sigma_max": m.sigma_max, "sample_sigma_min": pipe.scheduler.noise_sigma_min, "tau": list(m.taus)}
    caps = PROMPTS[:2]
    for steps, w in ((1, 1.0), (2, 1.0), (2, 2.0)):
        out = tmp_path / f"s{steps}_{w}"
        assert sample_main(["--checkpoint", str(tmp_path / "run"), *sum([["--prompt", c] for c in caps], []),
                            "--steps", str(steps), "--guidance", str(w), "--seed", "4", "--out", str(out),
                            "--device", "cpu"]) == 0
        cli = np.stack([np.asarray(Image.open(out / f"{i:06d}.png").convert("RGB")) for i in range(2)])
        got = pil_array(pipe(caps, num_inference_steps=steps, guidance_scale=w, seed=4).images)
        ref, _ = reference_images(parts, caps, [0, 1], seed=4, steps=steps, guidance=w)
        assert np.array_equal(got, cli) and np.array_equal(got, ref), (steps, w)


@pytest.mark.slow
def test_hub_or_large_components_are_referenced_not_copied(tmp_path, monkeypatch):
    """A VAE or text tower over the copy cap (or a hub id) is recorded as a source and loaded when
    the pipeline is built; save keeps the reference; `python -m lct.export --copy-all` copies it in;
    an unreachable hub VAE is one line naming --vae."""
    from helpers_export import tiny_parts
    from lct import export as ex
    from lct.errors import UserError
    from lct.export import load_pipeline

    precond, cfg, manifest = tiny_parts(tmp_path / "w")
    state = {k: v.detach().clone() for k, v in precond.state_dict().items()}
    from lct import export_common

    monkeypatch.setattr(export_common, "CARRY_MAX_BYTES", 0)
    out = ex.export_network(precond, state, tmp_path / "ref", cfg=cfg, manifest=manifest, ema_name="ema", step=1)
    index = json.loads((out / "model_index.json").read_text())
    assert index["vae"] == [None, None] and index["text_encoder"] == [None, None] and index["tokenizer"] == [None, None]
    # referenced, by paths relative to the export (no absolute path in an export)
    assert index["vae_source"] == os.path.relpath(manifest["vae"]["id"], out) and index["text_source"]["model"] == "lct-tiny-text"
    assert not (out / "vae").exists() and not (out / "text_encoder").exists()
    pipe = load_pipeline(out)
    assert pipe.vae is not None and type(pipe.text_encoder).__name__ == "OpenCLIPTextModel"
    images = pil_array(pipe(PROMPTS[:2], num_inference_steps=2, seed=1).images)
    pipe.save_pretrained(tmp_path / "again")
    assert json.loads((tmp_path / "again" / "model_index.json").read_text()) == index
    assert ex.main([str(out), "--out", str(tmp_path / "full"), "--copy-all"]) == 0
    full = json.loads((tmp_path / "full" / "model_index.json").read_text())
    assert full["vae"] == ["diffusers", "AutoencoderKL"] and full["vae_source"] is None and full["text_source"] is None
    copied = load_pipeline(tmp_path / "full")
    assert np.array_equal(pil_array(copied(PROMPTS[:2], num_inference_steps=2, seed=1).images), images)
    hub = dict(manifest, vae={**manifest["vae"], "id": "stabilityai/sd-vae-ft-ema"})
    out2 = ex.export_network(precond, state, tmp_path / "hub", cfg=cfg, manifest=hub, ema_name="ema", step=1)
    assert json.loads((out2 / "model_index.json").read_text())["vae_source"] == "stabilityai/sd-vae-ft-ema"
    with pytest.raises(UserError, match="--vae"):
        load_pipeline(out2)
    assert load_pipeline(out2, vae=manifest["vae"]["id"]).vae is not None


@pytest.mark.slow
def test_transformers_text_tower_is_the_pipelines_text_encoder(tmp_path):
    """Data encoded with a T5 tower (lct.hf_text): the export's text_encoder/tokenizer are the
    T5EncoderModel and its tokenizer, the condition is HFTextEncoder's, and the images equal the
    pre-pipeline sampler's with that condition."""
    from helpers_export import tiny_network, tiny_parts
    from helpers_hf import make_tiny_t5, make_tiny_tokenizer
    from lct.export import export_network
    from lct.hf_text import HFTextEncoder
    from lct.export import load_pipeline
    from lct.pipeline import LCTPipeline

    t5 = make_tiny_t5(tmp_path / "t5", make_tiny_tokenizer(tmp_path / "tok"))
    enc = HFTextEncoder.load(t5, max_length=16)
    _, cfg, manifest = tiny_parts(tmp_path / "w")
    manifest["text"] = enc.record()
    precond = tiny_network(enc.state_dim, 0, seed=0, text_len=16)
    state = {k: v.detach().clone() for k, v in precond.state_dict().items()}
    out = export_network(precond, state, tmp_path / "export", cfg=cfg, manifest=manifest, ema_name="ema", step=1)
    index = json.loads((out / "model_index.json").read_text())
    assert index["text_encoder"] == ["transformers", "T5EncoderModel"] and index["text_kind"] == "t5"
    pipe = load_pipeline(out)
    states, mask, pooled = enc(enc.tokenize(PROMPTS))
    got_states, got_mask, got_pooled = pipe.encode_prompt(PROMPTS, "cpu")[:3]
    assert torch.equal(got_states, states) and torch.equal(got_mask, mask) and pooled.shape[1] == got_pooled.shape[1] == 0
    from lct.latents import latent_stats
    from lct.vae import LatentNorm

    parts = {"precond": precond, "condition": lambda caps: pipe.encode_prompt(caps, "cpu")[:3], "vae": pipe.vae,
             "norm": LatentNorm(*latent_stats(manifest, "channel")), "shape": list(pipe.latent_shape), "sigma_max": 80.0,
             "sample_sigma_min": 0.002, "tau": [0.36931547704]}
    ref, _ = reference_images(parts, PROMPTS, [0, 1, 2], seed=2, steps=2, guidance=1.5)
    assert np.array_equal(pil_array(pipe(PROMPTS, num_inference_steps=2, guidance_scale=1.5, seed=2).images), ref)
    LCTPipeline.from_pretrained(str(out)).save_pretrained(tmp_path / "again")
    for f in sorted(p.relative_to(out) for p in out.rglob("*") if p.is_file()):
        assert (out / f).read_bytes() == (tmp_path / "again" / f).read_bytes(), f
