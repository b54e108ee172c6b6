"""Exports as diffusers users load them (issue 30) and as data to lct (issue 31 items 1, 11, 15).

- One test per convention diffusers' `PipelineTesterMixin` / `PipelineLatentTesterMixin` check on
  `LCTPipeline` (save/load, optional components, call signature, batch vs single, dict vs tuple,
  components, dtype on load and `to()`, `encode_prompt` in isolation, callbacks,
  `num_images_per_prompt`, variants, layerwise casting, pt/np/pil), and the refusals around them.
- An export loads and generates in a fresh interpreter where `import lct`, `deepspeed` and
  `open_clip` fail (torch, diffusers, transformers, safetensors only), in bf16 and, in fp32, bit for
  bit as lct's own loader samples it; no file of an export holds an absolute path.
- lct's loaders never run a folder's code: a crafted component module is refused in one line by
  every entry point, and replaced source files are never imported.
- The model card (valid hub header, what `trust_remote_code=True` means, code that runs as
  written), `push_to_hub` with huggingface_hub's API patched at the boundary.
- PixArt exports: SPEC 9 at the exact tuned levels, the defaults, prompt case, the README recipe
  run as written.
"""

from __future__ import annotations

import inspect
import json
import math
import os
import re
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import ROOT, run_cmd
from helpers_export import tiny_parts

PROMPTS = ["a large red circle in the top left corner", "small blue square at the bottom", "a green triangle"]
BLOCK = """
import importlib.abc, sys
class _Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in ("lct", "deepspeed", "open_clip"):
            raise ModuleNotFoundError(f"No module named {name!r} (not installed here)")
        return None
sys.meta_path.insert(0, _Block())
"""


@pytest.fixture(scope="module")
def export(tiny_export):
    return tiny_export  # conftest: made once a session


@pytest.fixture
def pipe(export):
    from lct.pipeline import LCTPipeline

    p = LCTPipeline.from_pretrained(str(export))
    p.set_progress_bar_config(disable=True)
    return p


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def run(p, **kw):
    return p(**{"prompt": PROMPTS[0], "num_inference_steps": 2, "generator": gen(0), "output_type": "np", **kw})


# ---------------------------------------------------------------------------------------------
# diffusers' conventions, one test each
# ---------------------------------------------------------------------------------------------


def test_call_signature_has_the_text_to_image_parameters():
    from lct.pipeline import LCTPipeline

    sig = inspect.signature(LCTPipeline.__call__).parameters
    for name in ("prompt", "height", "width", "guidance_scale", "negative_prompt", "prompt_embeds",
                 "negative_prompt_embeds", "prompt_attention_mask", "negative_prompt_attention_mask",
                 "pooled_prompt_embeds", "negative_pooled_prompt_embeds", "sigmas", "callback_on_step_end",
                 "callback_on_step_end_tensor_inputs"):
        assert name in sig, name
    for name in ("num_inference_steps", "num_images_per_prompt", "generator", "latents", "output_type", "return_dict"):
        assert sig[name].default is not inspect.Parameter.empty, name
    enc = inspect.signature(LCTPipeline.encode_prompt).parameters
    assert list(enc)[:6] == ["self", "prompt", "device", "num_images_per_prompt", "do_classifier_free_guidance",
                             "negative_prompt"]
    assert "Examples:" in LCTPipeline.__call__.__doc__ and "LCTPipeline.from_pretrained" in LCTPipeline.__call__.__doc__


def test_components_and_none_components(pipe):
    from lct.pipeline import LCTPipeline

    comps = pipe.components
    assert set(comps) == {"transformer", "scheduler", "vae", "text_encoder", "tokenizer"}
    LCTPipeline(**{k: None for k in comps})  # every component may be None at construction (diffusers' tests build so)
    again = LCTPipeline(**comps)
    assert set(again.components) == set(comps)


@pytest.mark.slow
def test_dict_and_tuple_outputs_and_pt_np_pil_agree(pipe):
    out_np = run(pipe).images
    assert np.array_equal(out_np, run(pipe, return_dict=False)[0])
    out_pt = run(pipe, output_type="pt").images
    out_pil = run(pipe, output_type="pil").images
    assert out_np.shape == (1, 32, 32, 3) and out_pt.shape == (1, 3, 32, 32)
    assert np.abs(out_pt.numpy().transpose(0, 2, 3, 1) - out_np).max() < 1e-6
    assert np.abs(np.asarray(out_pil[0]).astype(float) - (out_np[0] * 255).round()).max() == 0


@pytest.mark.slow
def test_batch_of_generators_equals_single_and_num_images_per_prompt(pipe):
    single = run(pipe).images
    batch = run(pipe, prompt=[PROMPTS[0], PROMPTS[1], "very long " * 100], generator=[gen(0), gen(1), gen(2)]).images
    assert batch.shape[0] == 3 and np.abs(batch[0] - single[0]).max() < 1e-4
    for prompts, n in (([PROMPTS[0]], 2), (PROMPTS[:2], 2), (PROMPTS[:2], 1)):
        assert run(pipe, prompt=prompts, num_images_per_prompt=n, generator=None).images.shape[0] == len(prompts) * n


@pytest.mark.slow
def test_save_load_local_and_optional_components(pipe, tmp_path):
    from lct.pipeline import LCTPipeline

    ref = run(pipe).images
    pipe.save_pretrained(tmp_path / "full", safe_serialization=False)  # diffusers' tests save .bin
    loaded = LCTPipeline.from_pretrained(str(tmp_path / "full"))
    assert np.abs(run(loaded).images - ref).max() < 1e-5  # the same weights; another memory layout rounds differently
    # Optional components set to None stay None; sampling then takes embeds and gives latents.
    embeds = pipe.encode_prompt(PROMPTS[0], "cpu")
    lat = pipe(prompt_embeds=embeds[0], prompt_attention_mask=embeds[1], pooled_prompt_embeds=embeds[2],
               num_inference_steps=2, generator=gen(0), output_type="latent").images
    for name in pipe._optional_components:
        setattr(pipe, name, None)
    pipe.save_pretrained(tmp_path / "bare")
    bare = LCTPipeline.from_pretrained(str(tmp_path / "bare"))
    assert all(getattr(bare, n) is None for n in pipe._optional_components)
    got = bare(prompt_embeds=embeds[0], prompt_attention_mask=embeds[1], pooled_prompt_embeds=embeds[2],
               num_inference_steps=2, generator=gen(0), output_type="latent").images
    assert (got - lat).abs().max() < 1e-5
    with pytest.raises(ValueError, match="no text encoder"):
        bare(PROMPTS[0])
    with pytest.raises(ValueError, match="no VAE"):
        bare(prompt_embeds=embeds[0], prompt_attention_mask=embeds[1], pooled_prompt_embeds=embeds[2])


def test_encode_prompt_works_in_isolation(pipe):
    from lct.pipeline import LCTPipeline

    comps = pipe.components
    text_only = LCTPipeline(**{k: (v if "text" in k or "token" in k else None) for k, v in comps.items()})
    out = text_only.encode_prompt(PROMPTS[:2], negative_prompt="a yellow star")
    assert [o.shape[0] for o in out] == [2] * 6 and out[1].dtype == torch.bool
    names = ["prompt_embeds", "prompt_attention_mask", "pooled_prompt_embeds", "negative_prompt_embeds",
             "negative_prompt_attention_mask", "negative_pooled_prompt_embeds"]
    no_text = LCTPipeline(**{k: (None if "text" in k or "token" in k else v) for k, v in comps.items()})
    no_text.set_progress_bar_config(disable=True)
    a = no_text(**dict(zip(names, out)), guidance_scale=2.0, num_inference_steps=2, generator=gen(0), output_type="np")
    b = pipe(PROMPTS[:2], negative_prompt="a yellow star", guidance_scale=2.0, num_inference_steps=2,
             generator=gen(0), output_type="np")
    assert np.abs(a.images - b.images).max() < 1e-6
    # Without a negative prompt the negative outputs are None: the learned null condition (SPEC 9).
    assert text_only.encode_prompt(PROMPTS[:1])[3] is None


def test_callbacks_properties_and_guidance_changed_by_a_callback(pipe):
    seen = []

    def cb(p, i, t, kw):
        assert set(kw) <= set(p._callback_tensor_inputs)
        seen.append((i, sorted(kw), p.num_timesteps, p.guidance_scale))
        if i == p.num_timesteps - 1:
            kw["latents"] = torch.zeros_like(kw["latents"])
        return kw

    out = pipe(PROMPTS[0], num_inference_steps=3, callback_on_step_end=cb,
               callback_on_step_end_tensor_inputs=pipe._callback_tensor_inputs, output_type="latent").images
    assert out.abs().sum() == 0 and [s[0] for s in seen] == [0, 1, 2]
    assert seen[0][1] == sorted(pipe._callback_tensor_inputs) and seen[0][2] == 3

    def more(p, i, t, kw):
        p._guidance_scale += 1.0
        return kw

    pipe(PROMPTS[0], num_inference_steps=2, guidance_scale=2.0, callback_on_step_end=more, output_type="latent")
    assert pipe.guidance_scale == 2.0 + pipe.num_timesteps

    def stop(p, i, t, kw):
        p._interrupt = True
        return kw

    steps = []
    pipe(PROMPTS[0], num_inference_steps=3, output_type="latent",
         callback_on_step_end=lambda p, i, t, kw: (steps.append(i), stop(p, i, t, kw))[1])
    assert steps == [0] and pipe.interrupt
    with pytest.raises(ValueError, match="callback_on_step_end_tensor_inputs"):
        pipe(PROMPTS[0], callback_on_step_end=cb, callback_on_step_end_tensor_inputs=["x_in"])


@pytest.mark.slow
def test_dtype_on_load_and_to_keep_spec11_modules_fp32(export):
    from lct.pipeline import LCTPipeline

    def check(p, trunk):
        t = p.transformer
        assert p.dtype == t.dtype == t.blocks[0].attn.qkv.weight.dtype == trunk
        kept = [n for n, q in t.named_parameters() if set(t._keep_in_fp32_modules) & set(n.split("."))]
        assert kept and all(dict(t.named_parameters())[n].dtype == torch.float32 for n in kept)
        assert p.vae.dtype == trunk and p.text_encoder.dtype == trunk

    for kw in ({"torch_dtype": torch.bfloat16}, {"dtype": torch.bfloat16}):
        check(LCTPipeline.from_pretrained(str(export), **kw), torch.bfloat16)
    p = LCTPipeline.from_pretrained(str(export), dtype={"transformer": torch.bfloat16, "default": torch.float16})
    assert p.transformer.dtype == torch.bfloat16 and p.vae.dtype == p.text_encoder.dtype == torch.float16
    p = LCTPipeline.from_pretrained(str(export))
    p.set_progress_bar_config(disable=True)
    ref = run(p).images
    p.to(torch.bfloat16)  # no pipeline override: diffusers' to(); TextDiT keeps its fp32 modules
    check(p, torch.bfloat16)
    low = run(p).images
    assert np.isfinite(low).all() and np.abs(low - ref).max() < 0.1


def test_layerwise_casting_runs(pipe):
    pipe.to(dtype=torch.bfloat16)
    pipe.transformer.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=torch.bfloat16)
    t = pipe.transformer
    assert t.blocks[0].mlp.fc1.weight.dtype == torch.float8_e4m3fn  # stored in fp8
    assert t.blocks[0].adaLN_modulation[1].weight.dtype == torch.float32 and t.x_embedder.weight.dtype == torch.bfloat16
    assert np.isfinite(run(pipe).images).all()


def test_variants_save_load_and_a_missing_variant(pipe, tmp_path):
    from lct.pipeline import LCTPipeline

    pipe.save_pretrained(tmp_path / "v", variant="fp16")
    assert any(".fp16." in f.name for f in (tmp_path / "v" / "transformer").iterdir())
    loaded = LCTPipeline.from_pretrained(str(tmp_path / "v"), variant="fp16")
    assert all(torch.equal(a, b) for a, b in zip(pipe.transformer.parameters(), loaded.transformer.parameters()))
    pipe.save_pretrained(tmp_path / "plain")
    with pytest.raises(ValueError, match="You are trying to load the model files of the `variant=fp16`"):
        LCTPipeline.from_pretrained(str(tmp_path / "plain"), variant="fp16")


def test_refusals_are_one_line(pipe):
    from diffusers import DDIMScheduler, EulerDiscreteScheduler

    from lct.pipeline import LCTPipeline

    comps = pipe.components
    for foreign in (DDIMScheduler(), EulerDiscreteScheduler()):
        with pytest.raises(ValueError, match="samples with LCTScheduler only") as err:
            LCTPipeline(**{**comps, "scheduler": foreign})
        assert "\n" not in str(err.value) and "re-noises" in str(err.value)
    cases = [(dict(prompt=[]), "empty list"), (dict(generator=[gen(0), gen(1)]), "2 generators for 1 images"),
             (dict(height=64), "height 64: this model generates 32x32"), (dict(seed=1), "either seed"),
             (dict(prompt_embeds=torch.zeros(1, 77, 128)), "either prompt or prompt_embeds"),
             (dict(guidance_scale=float("nan")), "finite number >= 0"), (dict(sigmas=[40.0, 1.0]), "start at"),
             (dict(tau=[0.5, 0.8]), "decreasing"), (dict(output_type="jpeg"), "output_type")]
    for kw, msg in cases:
        with pytest.raises(ValueError, match=re.escape(msg)) as err:
            run(pipe, **kw)
        assert "\n" not in str(err.value)
    with pytest.raises(NotImplementedError, match="attention slicing is not supported"):
        pipe.enable_attention_slicing()
    with pytest.raises(ValueError, match="own attention"):
        pipe.transformer.set_attention_backend("flash")


@pytest.mark.slow
def test_sigmas_tau_and_the_default_levels(pipe):
    a = run(pipe, sigmas=[80.0, 0.5], output_type="latent").images
    assert torch.equal(a, run(pipe, tau=[0.5], output_type="latent").images)
    assert torch.equal(a, run(pipe, tau=0.5, output_type="latent").images)
    run(pipe, num_inference_steps=2)
    assert pipe.scheduler.levels == [80.0, 0.36931547704] and pipe.num_timesteps == 2


# ---------------------------------------------------------------------------------------------
# Self-contained: a fresh interpreter without lct, deepspeed, open_clip; no absolute paths
# ---------------------------------------------------------------------------------------------


def fresh(code: str, *args, env=None):
    return run_cmd([sys.executable, "-c", BLOCK + code, *map(str, args)], cwd=Path(args[0]).parent if args else None,
                   env={"OMP_NUM_THREADS": "1", "PYTHONPATH": "", **(env or {})}, timeout=300)


@pytest.mark.proc
@pytest.mark.slow
def test_export_generates_without_lct_deepspeed_open_clip(export, tmp_path):
    from lct.pipeline import LCTPipeline

    code = """
import sys, torch, numpy as np
from diffusers import DiffusionPipeline
for name in ("lct", "deepspeed", "open_clip"):
    try:
        __import__(name)
        raise SystemExit(name + " imported")
    except ImportError:
        pass
pipe = DiffusionPipeline.from_pretrained(sys.argv[1], trust_remote_code=True, torch_dtype=torch.bfloat16)
assert type(pipe).__name__ == "LCTPipeline" and pipe.dtype == torch.bfloat16, pipe.dtype
assert pipe.transformer.null_text_states.dtype == torch.float32
img = pipe("a red circle", num_inference_steps=2, generator=torch.Generator().manual_seed(0)).images[0]
assert img.size == (32, 32)
fp32 = DiffusionPipeline.from_pretrained(sys.argv[1], trust_remote_code=True)
out = fp32(["a red circle", "a blue square"], num_inference_steps=2, guidance_scale=1.5, seed=3, output_type="np")
np.save(sys.argv[2], out.images)
assert not any(m.split(".")[0] in ("lct", "deepspeed", "open_clip") for m in sys.modules)
print("ok")
"""
    proc = fresh(code, export, tmp_path / "out.npy", env={"HF_MODULES_CACHE": str(tmp_path / "modules")})
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-3000:]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        ours = LCTPipeline.from_pretrained(str(export))(["a red circle", "a blue square"], num_inference_steps=2,
                                                        guidance_scale=1.5, seed=3, output_type="np").images
    finally:
        torch.set_num_threads(threads)
    assert np.array_equal(np.load(tmp_path / "out.npy"), ours)  # the folder's code is lct's: same images


def test_export_code_is_lcts_source_copied_as_it_is_and_the_index_holds_no_record(export):
    """The community-components layout: the pipeline module at the root, each custom component's
    module in its folder, with what they import relatively; byte for byte lct's own files. The
    latent statistics live in the VAE config, the training record only in lct_export.json."""
    lct_dir = ROOT / "lct"
    for copy, src in (("pipeline.py", "pipeline.py"), ("consistency.py", "consistency.py"), ("tokens.py", "tokens.py"),
                      ("transformer/lct_dit.py", "models/dit.py"), ("scheduler/lct_scheduler.py", "scheduler.py"),
                      ("scheduler/consistency.py", "consistency.py")):
        assert (export / copy).read_bytes() == (lct_dir / src).read_bytes(), copy
    for module in ("pipeline.py", "consistency.py", "tokens.py", "transformer/lct_dit.py", "scheduler/lct_scheduler.py"):
        # diffusers' check_imports reads these lines (docstrings too) and asks users to install what is missing
        text = (export / module).read_text()  # with diffusers' own patterns (dynamic_modules_utils.check_imports)
        imports = re.findall(r"^\s*import\s+(\S+)\s*$", text, flags=re.M) + \
            re.findall(r"^\s*from\s+(\S+)\s+import", text, flags=re.M)
        assert {i.split(".")[0] for i in imports if not i.startswith(".")} <= {"__future__", "torch", "diffusers",
                                                          "transformers", "safetensors", "numpy", "contextlib", "math", "typing",
                                                          "hashlib", "html", "importlib", "inspect", "json", "os",
                                                          "shutil", "struct", "tempfile", "pathlib", "dataclasses",
                                                          "warnings", "huggingface_hub", "ot", "scipy"}, module
    index = json.loads((export / "model_index.json").read_text())
    assert not {"training", "latent_mean", "latent_std"} & set(index)
    vae = json.loads((export / "vae" / "config.json").read_text())
    assert vae["scaling_factor"] == 0.5 and len(vae["latents_mean"]) == len(vae["latents_std"]) == 4
    assert json.loads((export / "lct_export.json").read_text())["format"] == "lct-export/3"


def test_no_absolute_path_in_an_export(export, tmp_path):
    from lct.pipeline import LCTPipeline

    LCTPipeline.from_pretrained(str(export)).save_pretrained(tmp_path / "resaved")
    roots = {str(Path(export).resolve().parents[2]), str(tmp_path), os.getcwd(), str(Path.home())}
    for folder in (export, tmp_path / "resaved"):
        for f in Path(folder).rglob("*"):
            if f.is_file() and f.suffix in (".json", ".md", ".py", ".txt"):
                text = f.read_text()
                assert not any(r in text for r in roots if len(r) > 1), f
                if f.suffix == ".json" and f.name != "tokenizer.json":  # a vocabulary has "/..." tokens
                    strings = re.findall(r'"((?:[^"\\]|\\.)*)"', text)
                    assert not [s for s in strings if s.startswith("/") and len(s) > 1], f


@pytest.mark.proc
@pytest.mark.slow
def test_open_clip_text_encoder_without_lct_is_one_line(tmp_path):
    """An export whose tower cannot take transformers' CLIP form (a LayerScale tower) carries
    lct's OpenCLIPTextModel: without lct, loading stops at one line naming the install command."""
    from helpers_export import tiny_network
    from lct.export import export_network
    from lct.text import TextEncoder

    precond, cfg, manifest = tiny_parts(tmp_path / "w")
    enc = TextEncoder.load("lct-tiny-text-c32", "random", seed=0, save_dir=tmp_path / "c32")
    manifest["text"] = enc.record(manifest_dir=tmp_path / "c32")
    net = tiny_network(enc.state_dim, enc.pooled_dim)
    out = export_network(net, {k: v.detach().clone() for k, v in net.state_dict().items()}, tmp_path / "export",
                         cfg=cfg, manifest=manifest, ema_name="ema", step=1)
    assert json.loads((out / "model_index.json").read_text())["text_encoder"] == ["lct_openclip_text", "OpenCLIPTextModel"]
    proc = fresh("import sys\nfrom diffusers import DiffusionPipeline\n"
                 "DiffusionPipeline.from_pretrained(sys.argv[1], trust_remote_code=True)\n", out,
                 env={"HF_MODULES_CACHE": str(tmp_path / "modules")})
    last = proc.stderr.strip().splitlines()[-1]
    assert proc.returncode == 1 and last.startswith("ImportError:") and "pip install lct-consistency" in last, proc.stderr[-2000:]


def test_exports_of_the_previous_format_still_load_and_sample_the_same(export, pipe, tmp_path):
    """lct-export/2 (statistics and record in model_index.json, lct's module names, a one-line shim
    as pipeline.py, the VAE's own config): lct's loader converts it, samples the same images, and
    `python -m lct.export` rewrites it in today's layout. The shim is never imported."""
    from lct.export import main as export_main
    from lct.pipeline import LCTPipeline

    old = tmp_path / "old"
    shutil.copytree(export, old)
    for f in ("pipeline.py", "consistency.py", "tokens.py", "transformer/lct_dit.py", "scheduler/lct_scheduler.py",
              "scheduler/consistency.py"):
        (old / f).unlink()
    (old / "pipeline.py").write_text("from lct.pipeline import LCTPipeline  # noqa: F401\n" + EVIL)
    vae = json.loads((old / "vae" / "config.json").read_text())
    index = json.loads((old / "model_index.json").read_text())
    record = json.loads((old / "lct_export.json").read_text())
    index.update(transformer=["lct.models.dit", "TextDiT"], scheduler=["lct.scheduler", "LCTScheduler"],
                 latent_mean=vae.pop("latents_mean"), latent_std=vae.pop("latents_std"), latent_norm_kind="channel",
                 training={**record, "format": "lct-export/2"})
    for k in ("vae_latents",):
        index.pop(k)
    vae["scaling_factor"] = 0.18215
    (old / "vae" / "config.json").write_text(json.dumps(vae))
    (old / "model_index.json").write_text(json.dumps(index))
    (old / "lct_export.json").write_text(json.dumps({**record, "format": "lct-export/2"}))
    loaded = LCTPipeline.from_pretrained(str(old))
    loaded.set_progress_bar_config(disable=True)
    assert np.abs(run(loaded).images - run(pipe).images).max() < 1e-6
    assert export_main([str(old), "--out", str(tmp_path / "new")]) == 0
    assert json.loads((tmp_path / "new" / "model_index.json").read_text())["transformer"] == ["lct_dit", "TextDiT"]
    assert json.loads((tmp_path / "new" / "vae" / "config.json").read_text())["scaling_factor"] == 0.5


# ---------------------------------------------------------------------------------------------
# Issue 31 item 1: exports are data to lct
# ---------------------------------------------------------------------------------------------


EVIL = "import os\nopen(os.environ.get('LCT_TEST_MARKER', '/dev/null'), 'w').write('ran')\n"


@pytest.mark.slow
def test_no_lct_entry_point_runs_code_from_an_export(export, tmp_path, monkeypatch):
    from eval import clip_fid
    from lct.errors import UserError
    from lct.export import main as export_main
    from lct.pipeline import LCTPipeline
    from lct.sample import main as sample_main

    marker = tmp_path / "marker"
    monkeypatch.setenv("LCT_TEST_MARKER", str(marker))
    crafted = tmp_path / "crafted"
    shutil.copytree(export, crafted)
    (crafted / "transformer" / "evil_mod.py").write_text(EVIL + "from diffusers import ModelMixin as TextDiT\n")
    index = json.loads((crafted / "model_index.json").read_text())
    index["transformer"] = ["evil_mod", "TextDiT"]
    (crafted / "model_index.json").write_text(json.dumps(index))
    captions = tmp_path / "captions.jsonl"
    captions.write_text(json.dumps({"caption": "a red circle"}) + "\n")
    calls = [lambda: LCTPipeline.from_pretrained(str(crafted)),
             lambda: sample_main(["--checkpoint", str(crafted), "--prompt", "x", "--out", str(tmp_path / "s"),
                                  "--device", "cpu"]),
             lambda: clip_fid.main(["--protocol", "custom", "--checkpoint", str(crafted), "--captions", str(captions),
                                    "--num-samples", "1", "--out", str(tmp_path / "e"), "--device", "cpu",
                                    "--metrics", "shapes"]),
             lambda: export_main([str(crafted), "--out", str(tmp_path / "x")])]
    for call in calls:
        with pytest.raises(UserError) as err:
            call()
        msg = str(err.value)
        assert "\n" not in msg and "transformer/evil_mod.py" in msg and "lct does not load" in msg, msg
        assert not marker.exists()
    assert not (tmp_path / "x").exists()
    # The folder's own source files replaced by code: lct never imports them (data, not code) ...
    swapped = tmp_path / "swapped"
    shutil.copytree(export, swapped)
    for f in ("pipeline.py", "consistency.py", "transformer/lct_dit.py", "scheduler/lct_scheduler.py"):
        (swapped / f).write_text(EVIL)
    p = LCTPipeline.from_pretrained(str(swapped))
    p.set_progress_bar_config(disable=True)
    assert run(p).images.shape == (1, 32, 32, 3) and not marker.exists()
    # ... and diffusers runs them only when asked.
    from diffusers import DiffusionPipeline

    with pytest.raises(ValueError, match="trust_remote_code"):
        DiffusionPipeline.from_pretrained(str(swapped))
    assert not marker.exists()


# ---------------------------------------------------------------------------------------------
# The model card (issue 30, issue 31 item 11) and uploads
# ---------------------------------------------------------------------------------------------


def code_blocks(markdown: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", markdown, flags=re.S)


def test_model_card_is_a_valid_hub_card_that_says_what_trust_remote_code_runs(export):
    from huggingface_hub import ModelCard

    from lct.model_card import card_header

    text = (export / "README.md").read_text()
    data = ModelCard(text).data.to_dict()
    assert data["library_name"] == "diffusers" and data["pipeline_tag"] == "text-to-image"
    assert data["license"] == "other" and data["license_name"] and data["license_link"]
    assert "runs Python files" in text or "runs Python files shipped" in text or "trust_remote_code=True` runs" in text
    assert "pip install lct-consistency" in text and "LCTPipeline.from_pretrained" in text
    assert "transformer/lct_dit.py" in text and "scheduler/lct_scheduler.py" in text
    rec = {"model": {"pretrained": "PixArt-alpha/PixArt-Sigma-XL-2-512-MS"},
           "card": {"license": "openrail++", "datasets": ["user/my-captions"]}}
    header = ModelCard("\n".join(card_header(rec, "text-to-image", ["lct"]))).data.to_dict()
    assert header["base_model"] == ["PixArt-alpha/PixArt-Sigma-XL-2-512-MS"] and header["license"] == "openrail++"
    assert header["datasets"] == ["user/my-captions"] and header["base_model_relation"] == "finetune"


@pytest.mark.slow
def test_model_card_code_runs_as_written(export, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_MODULES_CACHE", str(tmp_path / "modules"))
    blocks = code_blocks((export / "README.md").read_text())
    assert len(blocks) == 2
    for block in blocks:
        scope: dict = {}
        exec(block.replace("PATH_OR_HUB_ID", str(export)), scope)
        assert scope["image"].size == (32, 32)


def test_export_license_and_dataset_flags(export, tmp_path):
    from huggingface_hub import ModelCard

    from lct.export import main as export_main

    assert export_main([str(export), "--out", str(tmp_path / "o"), "--license", "apache-2.0",
                        "--dataset", "user/shapes"]) == 0
    data = ModelCard((tmp_path / "o" / "README.md").read_text()).data.to_dict()
    assert data["license"] == "apache-2.0" and data["datasets"] == ["user/shapes"] and "license_name" not in data
    assert json.loads((tmp_path / "o" / "lct_export.json").read_text())["card"]["license"] == "apache-2.0"


@pytest.mark.slow
def test_push_to_hub_uploads_a_folder_that_loads_with_lcts_card(pipe, tmp_path, monkeypatch):
    from diffusers import DiffusionPipeline
    from huggingface_hub import HfApi

    from lct.pipeline import LCTPipeline

    uploads = []

    class Repo:
        def __init__(self, repo_id):
            self.repo_id = repo_id

    def create_repo(self, repo_id, **kw):
        return Repo(f"user/{repo_id.split('/')[-1]}")

    def upload_folder(self, *, repo_id, folder_path, **kw):
        dest = tmp_path / f"upload{len(uploads)}"
        shutil.copytree(folder_path, dest)
        uploads.append((repo_id, dest, kw))
        return f"https://huggingface.co/{repo_id}"

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    monkeypatch.setenv("HF_MODULES_CACHE", str(tmp_path / "modules"))
    pipe.push_to_hub("lct-tiny")
    pipe.save_pretrained(tmp_path / "saved", push_to_hub=True, repo_id="lct-tiny-2")
    assert [u[0] for u in uploads] == ["user/lct-tiny", "user/lct-tiny-2"]
    ref = run(pipe).images
    for _, folder, _ in uploads:
        card = (folder / "README.md").read_text()
        assert card == pipe.model_card and "a latent consistency model trained with lct" in card
        assert (folder / "pipeline.py").is_file() and (folder / "lct_export.json").is_file()
        for loaded in (LCTPipeline.from_pretrained(str(folder)),
                       DiffusionPipeline.from_pretrained(str(folder), trust_remote_code=True)):
            loaded.set_progress_bar_config(disable=True)
            assert np.abs(run(loaded).images - ref).max() < 1e-5


# ---------------------------------------------------------------------------------------------
# One SPEC 9 sampler: the trainer's grids are the pipeline's images
# ---------------------------------------------------------------------------------------------


def test_training_grids_are_the_pipelines_images(export, tmp_path, monkeypatch):
    """`Monitor.grids` samples through `LCTPipeline` in memory around the EMA: its tiles equal,
    pixel for pixel, what the pipeline gives users for the same text condition, seed and indices."""
    from lct import monitor as mon_mod
    from lct.dist import DistInfo
    from lct.export import training_pipeline
    from lct.text import TextEncoder
    from lct.vae import load_vae

    precond, cfg, manifest = tiny_parts(export.parent)
    cfg = cfg.model_copy(update={"sample": cfg.sample.model_copy(update={"steps": [1, 2], "seed": 5, "guidance": 1.5})})
    text = TextEncoder.from_manifest({**manifest, "_dir": str(export.parent / "data")})
    vae = load_vae(manifest["vae"]["id"], "cpu", torch.float32)
    m = mon_mod.Monitor.__new__(mon_mod.Monitor)
    m.cfg, m.info, m.manifest, m.device = cfg, DistInfo(), manifest, torch.device("cpu")
    m.prompts, m.run_dir, m._vae, m._text, m._pipe = PROMPTS, tmp_path, vae, text, None
    tiles = []
    monkeypatch.setattr(mon_mod, "caption_grid", lambda images, captions, **kw: tiles.append(np.stack(images)) or
                        __import__("PIL.Image").Image.new("RGB", (4, 4)))
    m.grids(precond, 7, None)
    pipe = training_pipeline(precond.net, cfg, manifest, vae=vae)
    states, mask, pooled = text(text.tokenize(PROMPTS))
    for steps, got in zip((1, 2), tiles):
        want = pipe(prompt_embeds=states, prompt_attention_mask=mask, pooled_prompt_embeds=pooled, seed=5,
                    num_inference_steps=steps, guidance_scale=1.5, output_type="pil").images
        assert np.array_equal(got, np.stack([np.asarray(w) for w in want])), steps


# ---------------------------------------------------------------------------------------------
# PixArt exports (issue 30's PixArt items, issue 31 item 15)
# ---------------------------------------------------------------------------------------------

PIXART_LEN = 300  # the README recipe's max_length, as PixArt-Sigma's


@pytest.fixture(scope="module")
def pixart(tmp_path_factory):
    """A tiny PixArt tuned (perturbed) and exported as the trainer exports it: T5 of 300 tokens,
    a tiny VAE, the ect_pixart_sigma_512 config."""
    from helpers_data import make_tiny_vae
    from helpers_hf import make_tiny_pixart_pipeline
    from lct.config import load_config
    from lct.export_pixart import export_pixart
    from lct.hf_text import HFTextEncoder
    from lct.models.pixart import load_pixart
    from lct.vae import load_vae, vae_summary

    root = tmp_path_factory.mktemp("pixart_export")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        src = make_tiny_pixart_pipeline(root / "pipe")
        vae_dir = make_tiny_vae(root / "vae", latent_channels=4, downsample=4)
        enc = HFTextEncoder.load(src, max_length=PIXART_LEN)
        manifest = {"latent_shape": [4, 8, 8], "resolution": 32, "manifest_path": str(root / "lat" / "manifest.json"),
                    "vae": vae_summary(load_vae(vae_dir), vae_dir), "text": enc.record()}
        cfg = load_config(str(ROOT / "configs" / "ect_pixart_sigma_512.yaml"),
                          [f"model.pretrained={src}", f"run.dir={root / 'run'}", f"text.max_length={PIXART_LEN}"])
        model = load_pixart(src, enc.null_condition(), sigma_min=cfg.method.sigma_min, vae_downsample=4).eval()
        with torch.random.fork_rng(devices=[]), torch.no_grad():
            torch.manual_seed(3)
            for p in model.parameters():
                p.add_(0.01 * torch.randn_like(p))
        out = export_pixart(model, {k: v.clone() for k, v in model.state_dict().items()}, root / "export", cfg=cfg,
                            manifest=manifest, ema_name="ema", step=5)
    finally:
        torch.set_num_threads(threads)
    return {"export": out, "model": model, "cfg": cfg, "enc": enc, "root": root}


def pixart_reference(model, states, mask, z_gens, levels, smin, w=1.0):
    """SPEC 9 written out on lct's PixArt denoiser (the network that trained), fp32."""
    shape = (4, 8, 8)
    b = states.shape[0]
    noise = lambda: torch.stack([torch.randn(shape, generator=g) for g in z_gens])
    off, on = torch.zeros(b, dtype=torch.bool), torch.ones(b, dtype=torch.bool)

    def f(x, s):
        with torch.no_grad():
            c = model(x, torch.full((b,), s), text_states=states, text_mask=mask, cond_drop=off)
            if w == 1.0:
                return c
            u = model(x, torch.full((b,), s), text_states=states, text_mask=mask, cond_drop=on)
            return u + w * (c - u)

    x = f(levels[0] * noise(), levels[0])
    for tau in levels[1:]:
        x = f(x + math.sqrt(max(tau * tau - smin * smin, 0.0)) * noise(), tau)
    return x


def record_inputs(record: dict, steps: int, gens) -> dict:
    """The card's sampler from the export's record: tuned timesteps, lct's start, the generators."""
    z = torch.stack([torch.randn(record["latent"]["shape"], generator=g) for g in gens])
    return {"timesteps": record["timesteps"][f"{steps}_step"], "latents": record["start_scale"] * z, "generator": gens}


@pytest.mark.slow
def test_pixart_export_is_stock_and_samples_spec9_at_the_snapped_levels(pixart):
    """Issue 30: the export is a stock PixArtSigmaPipeline + LCMScheduler folder without a .py
    file; `from_pretrained` (no trust_remote_code) samples 1 and 2 steps, guided and not, equal to
    SPEC 9 written out on the network that trained, at the tuned levels snapped to integer
    timesteps (SPEC 14.8); lct's loader and the grids' `sampling_inputs` give the same."""
    from diffusers import LCMScheduler, PixArtSigmaPipeline

    from lct.export_pixart import caption_embeds, load_pixart_export, sampling_inputs
    from lct.pipeline import LCTPipeline

    export, m, model = pixart["export"], pixart["cfg"].method, pixart["model"]
    assert not list(export.rglob("*.py"))
    assert json.loads((export / "model_index.json").read_text())["scheduler"] == ["diffusers", "LCMScheduler"]
    record = json.loads((export / "lct_export.json").read_text())
    assert record["timesteps"] == {"1_step": [999], "2_step": [999, 203]}
    levels = record["levels"]["2_step"]
    assert levels == [float(model.log_sigmas[999].exp()), float(model.log_sigmas[203].exp())]
    assert abs(levels[1] / m.tau[0] - 1) < 3e-3 and record["sampler"]["requested_levels"] == [m.sigma_max, *m.tau]
    stock = PixArtSigmaPipeline.from_pretrained(str(export))
    stock.set_progress_bar_config(disable=True)
    lct_pipe, null, lct_record = load_pixart_export(export)  # lct's loader: the folder as data
    assert type(stock.scheduler) is LCMScheduler and type(lct_pipe.scheduler) is LCMScheduler
    assert lct_record["timesteps"] == record["timesteps"]
    states, mask, _ = pixart["enc"].encode(["A red circle", "a blue square"])
    for steps in (1, 2):
        grid = sampling_inputs(model, m, steps, LCTPipeline.sample_generators(4, range(2)), record["latent"]["shape"])
        card = record_inputs(record, steps, LCTPipeline.sample_generators(4, range(2)))
        assert grid["timesteps"] == card["timesteps"] and torch.equal(grid["latents"], card["latents"])
        for pipe in (stock, lct_pipe):
            for w in (1.0, 1.5):
                got = pipe(**caption_embeds(pipe, states, mask, null), guidance_scale=w, output_type="latent",
                           **record_inputs(record, steps, LCTPipeline.sample_generators(4, range(2)))).images
                ref = pixart_reference(model, states, mask, LCTPipeline.sample_generators(4, range(2)),
                                       record["levels"][f"{steps}_step"], 0.0, w)
                assert float((got - ref).abs().max()) <= 1e-5 * max(1.0, float(ref.abs().max())), (steps, w)


@pytest.mark.slow
def test_pixart_card_and_readme_recipes_run_as_written(pixart):
    """The PixArt card's recipe and README's guided recipe run as written (only the folder path
    replaced), without trust_remote_code; their caption keeps its case, as lct's sampler (the
    grids) does."""
    from huggingface_hub import ModelCard

    export = pixart["export"]
    card = (export / "README.md").read_text()
    assert ModelCard(card).data.to_dict()["license"] == "other" and "trust_remote_code" not in card
    (block,) = code_blocks(card)
    readme = [b for b in code_blocks((ROOT / "README.md").read_text()) if "PixArtSigmaPipeline" in b]
    assert len(readme) == 1 and "trust_remote_code" not in readme[0]
    for code in (block.replace('"PATH"', repr(str(export))),
                 readme[0].replace('"runs/ect_pixart_sigma_512/export/ema"', repr(str(export)))):
        assert str(export) in code
        scope: dict = {}
        exec(code, scope)
        assert scope["image"].size == (32, 32)
        states, mask, _ = pixart["enc"].encode(["A red fox in the snow"])  # lct's tower: the caption as given
        assert torch.allclose(scope["embeds"], states, atol=1e-6) and torch.equal(scope["ids"].attention_mask.bool(), mask)


def test_pixart_export_written_with_lct_scheduler_still_loads(pixart, tmp_path):
    """An export of the former layout (scheduler ["lct_scheduler", "LCTVPScheduler"], its .py files,
    a flat `levels` record) loads through lct's loader with the stock scheduler, its record
    completed with the snapped timesteps; its .py files are never imported."""
    from diffusers import LCMScheduler

    from lct.export_pixart import load_pixart_export

    old = tmp_path / "old"
    shutil.copytree(pixart["export"], old)
    m = pixart["cfg"].method
    index = json.loads((old / "model_index.json").read_text())
    index["scheduler"] = ["lct_scheduler", "LCTVPScheduler"]
    (old / "model_index.json").write_text(json.dumps(index))
    sched = json.loads((old / "scheduler" / "scheduler_config.json").read_text())
    sched.update(_class_name="LCTVPScheduler", sigma_min=0.0, sigma_max=m.sigma_max, taus=list(m.tau))
    (old / "scheduler" / "scheduler_config.json").write_text(json.dumps(sched))
    (old / "scheduler" / "lct_scheduler.py").write_text("raise SystemExit('imported')\n")
    record = json.loads((old / "lct_export.json").read_text())
    for key in ("timesteps", "start_scale", "sampler"):
        record.pop(key)
    record["levels"] = [m.sigma_max, *m.tau]
    (old / "lct_export.json").write_text(json.dumps(record))
    pipe, _, got = load_pixart_export(old)
    new = json.loads((pixart["export"] / "lct_export.json").read_text())
    assert type(pipe.scheduler) is LCMScheduler and pipe.scheduler.config.timestep_scaling == 1e10
    assert got["timesteps"] == new["timesteps"] and got["levels"] == new["levels"]
    assert got["start_scale"] == new["start_scale"]


def test_pixart_export_holds_no_absolute_path_and_refuses_crafted_modules(pixart, tmp_path, monkeypatch):
    from lct.errors import UserError
    from lct.export_pixart import load_pixart_export

    export = pixart["export"]
    for f in export.rglob("*"):
        if f.is_file() and f.suffix in (".json", ".md"):
            assert str(pixart["root"]) not in f.read_text(), f
    marker = tmp_path / "marker"
    monkeypatch.setenv("LCT_TEST_MARKER", str(marker))
    crafted = tmp_path / "crafted"
    shutil.copytree(export, crafted)
    (crafted / "scheduler" / "evil.py").write_text(EVIL)
    index = json.loads((crafted / "model_index.json").read_text())
    index["scheduler"] = ["evil", "LCTVPScheduler"]
    (crafted / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(UserError, match="scheduler/evil.py.*lct does not load"):
        load_pixart_export(crafted)
    assert not marker.exists()


def bucketed_manifest(table: str, counts: dict[str, int], channels: int, downsample: int) -> dict:
    """A manifest's `buckets` record as data prep writes it (table, counts, most common)."""
    from lct.buckets import load_table

    rec = load_table(table).record(channels, downsample)
    return {**rec, "counts": {t["name"]: counts.get(t["name"], 0) for t in rec["table"]},
            "most_common": max(counts, key=counts.get)}


@pytest.mark.slow
def test_bucketed_pixart_export_bins_to_its_trained_sizes(tmp_path):
    """Issue 33: a PixArt tuned on PixArt's own bucket table (pixart_256 at sample_size 32) exports
    the trained sizes and what the stock pipeline's resolution binning does with them; the stock
    pipeline generates a requested 330 x 200 at the nearest trained bucket (the transformer sees
    its latents) and resizes to the request; the card's code
    runs as written at the most common trained size, with binning on."""
    from diffusers import PixArtAlphaPipeline

    from helpers_data import make_tiny_vae
    from helpers_hf import make_tiny_pixart_pipeline
    from lct.config import load_config
    from lct.export_pixart import export_pixart
    from lct.hf_text import HFTextEncoder
    from lct.models.pixart import load_pixart
    from lct.vae import load_vae, vae_summary

    src = make_tiny_pixart_pipeline(tmp_path / "pipe", sample_size=32)  # as PixArt-alpha 256: no micro-conditions
    vae_dir = make_tiny_vae(tmp_path / "vae", latent_channels=4, downsample=8)
    enc = HFTextEncoder.load(src, max_length=120)  # PixArt-alpha's length: PixArtAlphaPipeline
    counts = {"256x256": 9, "192x320": 5, "320x192": 4}
    manifest = {"latent_shape": [4, 32, 32], "resolution": None, "manifest_path": str(tmp_path / "lat" / "manifest.json"),
                "vae": vae_summary(load_vae(vae_dir), vae_dir), "text": enc.record(),
                "buckets": bucketed_manifest("pixart_256", counts, 4, 8)}
    cfg = load_config(str(ROOT / "configs" / "ect_pixart_alpha_256.yaml"),
                      [f"model.pretrained={src}", f"run.dir={tmp_path / 'run'}", "text.max_length=120"])
    model = load_pixart(src, enc.null_condition(), sigma_min=cfg.method.sigma_min, vae_downsample=8).eval()
    out = export_pixart(model, {k: v.clone() for k, v in model.state_dict().items()}, tmp_path / "export", cfg=cfg,
                        manifest=manifest, ema_name="ema", step=3)
    record = json.loads((out / "lct_export.json").read_text())
    assert record["buckets"]["sizes"] == [[256, 256], [192, 320], [320, 192]]
    assert record["resolution_binning"] == {"pipeline": "PixArtAlphaPipeline", "table": "ASPECT_RATIO_256_BIN",
                                            "sample_size": 32, "covers_training": True}
    pipe = PixArtAlphaPipeline.from_pretrained(str(out))
    pipe.set_progress_bar_config(disable=True)
    seen = []
    hook = pipe.transformer.register_forward_pre_hook(
        lambda m, args: seen.append(tuple(args[0].shape[-2:])))
    states, mask, _ = enc.encode(["a red circle"])
    image = pipe(prompt_embeds=states, prompt_attention_mask=mask.long(), guidance_scale=1.0, height=330, width=200,
                 timesteps=record["timesteps"]["1_step"], generator=torch.Generator().manual_seed(0)).images[0]
    hook.remove()
    assert image.size == (200, 330) and seen == [(40, 24)]  # 330 / 200 = 1.65: bucket 320 x 192 (1.67)
    card = (out / "README.md").read_text()
    assert "ASPECT_RATIO_256_BIN" in card and "256x256, 192x320, 320x192" in card
    (block,) = code_blocks(card)
    assert "use_resolution_binning" not in block
    scope: dict = {}
    exec(block.replace('"PATH"', repr(str(out))).replace("A red fox in the snow", "a red circle"), scope)
    assert scope["image"].size == (256, 256)


def test_card_sizes_without_the_pipelines_table_turn_binning_off():
    """A bucketed run on a table the stock pipeline does not bin to (a user's, or a sample_size
    without a bin table): the card passes use_resolution_binning=False and a trained size."""
    from lct.buckets import stock_binning
    from lct.export_pixart import card_sizes

    sizes = [[240, 280], [280, 240]]  # not PixArt sizes
    for binning in (stock_binning("PixArtSigmaPipeline", 32, sizes), stock_binning("PixArtSigmaPipeline", 8, sizes)):
        assert binning["covers_training"] is False
        lines, kw, note = card_sizes({"buckets": {"source": "mine.yaml", "sizes": sizes}, "resolution_binning": binning})
        assert kw == "height=height, width=width, use_resolution_binning=False" and "240x280, 280x240" in note
    assert stock_binning("PixArtSigmaPipeline", 32, [[240, 272]])["covers_training"] is True
    assert stock_binning("SD3Pipeline", 64, sizes) is None  # no binning in that pipeline
    lines, kw, note = card_sizes({"resolution": 512})
    assert kw == "use_resolution_binning=False" and "512 px" in note
