"""Tuning a flow-matching model end to end (SPEC 15) on tiny models of the real classes: data prep
(Gemma / SD3 towers, DC-AE / SD3 VAE), the trainer with ECT and every iLCT switch, a kill and a
resume, the sample grids through the stock pipeline, and the export that the stock diffusers class
loads and samples at 1 and 2 steps equal to SPEC 9 sampling of the trained network."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from conftest import ROOT, run_cmd
from helpers_data import make_image_shards
from helpers_flow import make_tiny_gemma, make_tiny_sd3_towers, tiny_dc_ae, tiny_sana, tiny_sd3, tiny_sd3_vae

TRAIN = str(ROOT / "lct" / "train.py")
CONFIGS = {"sana": str(ROOT / "configs" / "ect_sana_600m_512.yaml"), "sd3": str(ROOT / "configs" / "ect_sd35_medium_512.yaml")}
MAX_LEN = {"sana": 20, "sd3": 12}      # Gemma tokens; SD3: the T5 length (states 20 CLIP + 12 T5 long)
RESOLUTION = {"sana": 32, "sd3": 16}   # px: 4x8x8 latents (tiny DC-AE downsamples 4, tiny SD3 VAE 2)
ENV = {"OMP_NUM_THREADS": "1"}


def flow_data(root: Path, family: str) -> dict:
    """A tiny pipeline folder (transformer/ + scheduler/ + the family's towers), its VAE, and latent
    shards with stored text states made by the real data prep."""
    import importlib.util

    from diffusers import FlowMatchEulerDiscreteScheduler

    # This checkout's data_prep/encode_latents.py (the installed `lct.data_prep` may be another checkout's).
    spec = importlib.util.spec_from_file_location("encode_latents_of_this_checkout",
                                                  ROOT / "data_prep" / "encode_latents.py")
    encode_latents = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(encode_latents)

    pipe = root / "pipe"
    if family == "sana":
        make_tiny_gemma(pipe, layout="pipeline")
        tiny_sana().save_pretrained(str(pipe / "transformer"))
        tiny_dc_ae().save_pretrained(str(root / "vae"))
    else:
        make_tiny_sd3_towers(pipe, t5_max_length=MAX_LEN["sd3"])
        tiny_sd3().save_pretrained(str(pipe / "transformer"))
        tiny_sd3_vae().save_pretrained(str(root / "vae"))
    FlowMatchEulerDiscreteScheduler(shift=3.0).save_pretrained(str(pipe / "scheduler"))
    images = make_image_shards(root / "img", n_shards=2, per_shard=8, size=(40, 28))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert encode_latents.main(["--input", images, "--output", str(root / "lat"), "--vae", str(root / "vae"),
                                    "--resolution", str(RESOLUTION[family]), "--text-kind", "gemma" if family == "sana"
                                    else "sd3", "--text-model", str(pipe), "--text-max-length", str(MAX_LEN[family]),
                                    "--text-states", "--num-workers", "0", "--device", "cpu", "--batch-size", "8"]) == 0
    finally:
        torch.set_num_threads(threads)
    return {"pipe": str(pipe), "lat": root / "lat"}


def flow_config(path: Path, family: str, data: dict, run: Path, **sections) -> Path:
    """The shipped real-model config with the tiny model and data swapped in (ECT, Cauchy, adaptive
    c, OT, the early-step diffusion term, ZeRO-2, as shipped)."""
    cfg = {"base": CONFIGS[family],
           "run": {"dir": str(run), "total_steps": 4, "save_every": 2, "log_every": 1, "seed": 0},
           "method": {"stage_every": 1},
           "model": {"pretrained": data["pipe"], "compile": False, "checkpointing": True},
           "text": {"model": None, "max_length": MAX_LEN[family], "dtype": None},
           "vae": {"id": None},
           "data": {"shards": str(data["lat"]), "mode": "indexed", "num_workers": 0},
           "optim": {"batch_size": 8},
           "precision": "fp32",
           "ema": {"models": [{"name": "ema", "halflife_images": 100}], "sample": "ema"},
           "sample": {"every": 1000, "num": 2},
           "val": {"every": 1000}}
    for k, v in sections.items():
        cfg[k].update(v)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(cfg))
    return path


def stats(run: Path):
    return [r for r in map(json.loads, (run / "stats.jsonl").read_text().splitlines()) if r["kind"] == "train"]


def check_export_samples(family: str, export: Path, manifest: dict, cfg) -> None:
    """The export in the stock class: 1- and 2-step samples with the recorded sigmas, guided with the
    trained null, equal SPEC 9 sampling (`test_flow._reference_sample`) of the exported network
    given the same noise (SPEC 15.7 tolerance)."""
    import diffusers
    from safetensors.torch import load_file
    from test_flow import PROMPTS, _reference_sample, equivalent

    from lct.hf_text import HFTextEncoder
    from lct.models.flow import load_flow

    record = json.loads((export / "lct_export.json").read_text())
    pipe = getattr(diffusers, {"sana": "SanaPipeline", "sd3": "StableDiffusion3Pipeline"}[family]).from_pretrained(str(export))
    pipe.set_progress_bar_config(disable=True)
    assert type(pipe.scheduler).__name__ == "FlowMatchEulerDiscreteScheduler" and pipe.scheduler.config.stochastic_sampling
    null = load_file(str(export / "null_condition.safetensors"))
    n0 = int(null["negative_prompt_attention_mask"].sum()) if family == "sana" else null["negative_prompt_embeds"].shape[1]
    net = load_flow(str(export), family, null["negative_prompt_embeds"][0, :n0],
                    null.get("negative_pooled_prompt_embeds", torch.zeros(1, 1))[0] if family == "sd3" else None)
    states, mask, pooled = HFTextEncoder.from_manifest(manifest).encode(PROMPTS)
    cond = {"text_states": states, "text_mask": mask, **({"pooled": pooled} if family == "sd3" else {})}
    b, w, px = len(PROMPTS), 1.5, RESOLUTION[family]
    text_kw = ({"max_sequence_length": MAX_LEN[family], "complex_human_instruction": record["instruction"]}
               if family == "sana" else {"max_sequence_length": MAX_LEN[family]})
    for steps in (1, 2):
        g = torch.Generator().manual_seed(11)
        z = torch.randn((b, 4, 8, 8), generator=g)
        z2 = torch.randn((b, 4, 8, 8), generator=g)  # Sana's step noise: the pipeline generator's next draw
        if family == "sd3":
            torch.manual_seed(3)
            z2 = torch.randn((b, 4, 8, 8))  # SD3's step draws from the global generator
            torch.manual_seed(3)
        kw = dict(sigmas=record["sigmas"][f"{steps}_step"], guidance_scale=w, output_type="latent", height=px,
                  width=px, generator=torch.Generator().manual_seed(11))
        with torch.no_grad():
            if family == "sana":
                embeds, pmask, _, _ = pipe.encode_prompt(PROMPTS, do_classifier_free_guidance=False, **text_kw)
                want = pipe(prompt_embeds=embeds, prompt_attention_mask=pmask, negative_prompt=None,
                            negative_prompt_embeds=null["negative_prompt_embeds"].expand(b, -1, -1),
                            negative_prompt_attention_mask=null["negative_prompt_attention_mask"].expand(b, -1),
                            use_resolution_binning=False, **kw).images
            else:
                want = pipe(PROMPTS, negative_prompt_embeds=null["negative_prompt_embeds"].expand(b, -1, -1),
                            negative_pooled_prompt_embeds=null["negative_pooled_prompt_embeds"].expand(b, -1),
                            **kw, **text_kw).images
        got = _reference_sample(net, cond, [z, z2], cfg.method.sigma_max, cfg.method.tau[: steps - 1], w)
        equivalent(got, want)


@pytest.mark.slow
@pytest.mark.multiproc
def test_sana_ect_ilct_two_deepspeed_ranks_kill_resume_bitwise_and_export(tmp_path):
    """ECT + Cauchy, adaptive c, OT and the early-step term on a tiny Sana under `deepspeed --num_gpus 2`
    (CPU ranks, ZeRO-2): a run killed after its step-2 checkpoint and resumed ends at step 4 with the
    weights and EMA of an uninterrupted run, bit for bit; its grids and export go through the stock
    SanaPipeline, which samples 1 and 2 steps equal to SPEC 9 sampling of the trained network."""
    from test_multirank import deepspeed_cmd, state_of
    from test_train import checkpoint_tensors

    from lct.config import load_config
    from lct.latents import load_manifest

    data = flow_data(tmp_path / "data", "sana")
    a = flow_config(tmp_path / "a.yaml", "sana", data, tmp_path / "a")
    b = flow_config(tmp_path / "b.yaml", "sana", data, tmp_path / "b")
    c = load_config(a)
    assert (c.model.arch, c.method.distance, c.method.c, c.method.ot, c.method.diffusion_weight) == (
        "sana", "cauchy", "adaptive", True, 5.0)
    whole = run_cmd([*deepspeed_cmd(), "--config", str(a)], env=ENV)
    assert whole.returncode == 0, whole.stderr[-4000:]
    killed = run_cmd([*deepspeed_cmd(), "--config", str(b)], env={**ENV, "LCT_FAULT_EXIT_AFTER_SAVE": "2"})
    assert killed.returncode != 0 and state_of(tmp_path / "b")["applied_steps"] == 2, killed.stderr[-3000:]
    resumed = run_cmd([*deepspeed_cmd(), "--config", str(b)], env=ENV)
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert "resumed from" in resumed.stdout and state_of(tmp_path / "b")["resume_count"] == 1
    rec = stats(tmp_path / "b")
    assert [r["step"] for r in rec][-2:] == [3, 4] and all(np.isfinite(r["loss"]) for r in rec)
    assert [r["loss"] for r in stats(tmp_path / "a")][2:] == [r["loss"] for r in rec][-2:]
    ma, ea = checkpoint_tensors(tmp_path / "a/checkpoints/step00000004")
    mb, eb = checkpoint_tensors(tmp_path / "b/checkpoints/step00000004")
    assert ma.keys() == mb.keys() and all(torch.equal(ma[k], mb[k]) for k in ma)
    assert ea.keys() == eb.keys() and all(torch.equal(ea[k], eb[k]) for k in ea)
    assert not torch.equal(mb["net.null_text_states"], torch.from_numpy(np.load(data["lat"] / "text_null.npy")))
    for steps in (1, 2):  # the run's last grids, through the stock pipeline around the EMA
        assert (tmp_path / "b" / "samples" / f"step00000004_{steps}step.png").is_file()
    check_export_samples("sana", tmp_path / "b" / "export" / "ema", load_manifest(data["lat"] / "manifest.json"), c)


@pytest.mark.slow
def test_sd3_ect_ilct_one_process_kill_resume_and_export(tmp_path):
    """The same for a tiny SD3 (CLIP-L + CLIP-G pooled + T5 states, untrimmed; SD3's VAE with shift),
    cheaper: one process, killed after step 2 and resumed to step 4 (the restored state equals the
    saved one); the stock StableDiffusion3Pipeline loads the export and samples 1 and 2 steps equal
    to SPEC 9 sampling of the trained network. Then the start's one-line refusals on this data."""
    from test_multirank import state_of

    from lct.config import load_config
    from lct.dist import DistInfo
    from lct.errors import UserError
    from lct.latents import load_manifest
    from lct.preflight import preflight

    data = flow_data(tmp_path / "data", "sd3")
    assert np.load(data["lat"] / "text_null_pooled.npy").shape == (20,)
    cfg = flow_config(tmp_path / "sd3.yaml", "sd3", data, tmp_path / "run")
    killed = run_cmd([sys.executable, TRAIN, "--config", str(cfg)], env={**ENV, "LCT_FAULT_EXIT_AFTER_SAVE": "2"})
    assert killed.returncode == 137, killed.stderr[-3000:]
    saved = json.loads((tmp_path / "run/checkpoints/step00000002/lct_state.json").read_text())["state"]
    resumed = run_cmd([sys.executable, TRAIN, "--config", str(cfg)], env=ENV)
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert json.loads(resumed.stdout.split("restored state ", 1)[1].splitlines()[0]) == saved
    assert state_of(tmp_path / "run")["applied_steps"] == 4
    assert [r["step"] for r in stats(tmp_path / "run")] == [1, 2, 3, 4]
    assert (tmp_path / "run" / "samples" / "step00000004_2step.png").is_file()
    check_export_samples("sd3", tmp_path / "run" / "export" / "ema", load_manifest(data["lat"] / "manifest.json"),
                         load_config(cfg))

    # The start's checks against this data, before any weights are read: one line naming the key.
    for overrides, match in ((["model.pretrained=someone/no-such-sd3"], r"^model.pretrained someone/no-such-sd3: not in"),
                             (["model.arch=sana", "text.kind=null"], r"^data.shards: the data's text kind is 'sd3'")):
        with pytest.raises(UserError, match=match) as err:
            preflight(load_config(cfg, [*overrides, f"run.dir={tmp_path / 'other'}"]), DistInfo(), monitor=False)
        assert "\n" not in str(err.value)
