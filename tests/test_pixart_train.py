"""Tuning a PixArt network end to end on tiny models of the real classes (SPEC 14): T5 data prep
(trimmed fp16 states, the null condition), the trainer under the real DeepSpeed launcher with ECT
and every iLCT switch, resume, the exported diffusers pipeline, and the one-line refusals."""

import json
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from conftest import ROOT, run_cmd
from helpers_data import make_image_shards, make_tiny_vae
from helpers_hf import TEXT_DIM, make_tiny_pixart_pipeline
from lct.config import load_config
from lct.errors import ConfigError

SIGMA = str(ROOT / "configs" / "ect_pixart_sigma_512.yaml")
MAX_LEN = 16


@pytest.fixture(scope="session")
def pixart_data(tmp_path_factory):
    """A tiny PixArt pipeline folder (transformer, scheduler, T5 text_encoder/tokenizer), a tiny VAE
    and latent shards made by the real data prep with the tiny T5 (states stored)."""
    from lct.data_prep import encode_latents

    root = tmp_path_factory.mktemp("pixart")
    pipe = make_tiny_pixart_pipeline(root / "pipe")
    vae = make_tiny_vae(root / "vae", latent_channels=4, downsample=4)
    images = make_image_shards(root / "img", n_shards=2, per_shard=8, size=(40, 28))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert encode_latents.main(["--input", images, "--output", str(root / "lat"), "--vae", vae,
                                    "--resolution", "32", "--text-kind", "t5", "--text-model", pipe,
                                    "--text-max-length", str(MAX_LEN), "--text-states", "--num-workers", "0",
                                    "--device", "cpu", "--batch-size", "5"]) == 0
    finally:
        torch.set_num_threads(threads)
    return {"root": root, "pipe": pipe, "vae": vae, "lat": root / "lat", "images": images}


def pixart_config(tmp_path, data, **sections) -> Path:
    cfg = {"base": SIGMA,
           "run": {"dir": str(tmp_path / "run"), "total_steps": 2, "save_every": 2, "log_every": 1},
           "method": {"stage_every": 1},
           "model": {"pretrained": data["pipe"], "compile": False, "checkpointing": True},
           "text": {"model": None, "max_length": MAX_LEN, "dtype": None},
           "vae": {"id": None},
           "data": {"shards": str(data["lat"]), "mode": "indexed", "num_workers": 0},
           "optim": {"batch_size": 8},
           "precision": "fp32",
           "ema": {"models": [{"name": "ema", "halflife_images": 100}], "sample": "ema"},
           "sample": {"every": 1000, "num": 2},
           "val": {"every": 1000}}
    for k, v in sections.items():
        cfg.setdefault(k, {}).update(v) if isinstance(v, dict) else cfg.__setitem__(k, v)
    path = tmp_path / "pixart.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_t5_data_prep_stores_trimmed_states_and_the_null(pixart_data):
    """One caption per image, tokens int32 [1, L], fp16 states [1, n, D] cut after the caption's
    last real token (= the tower's states there), no pooled, text_null.npy = the empty caption's
    states; the data path re-pads a batch to its longest caption with the T5 padding mask."""
    from lct.data import DataSpec, collate, draw_sample
    from lct.hf_text import HFTextEncoder
    from lct.latents import SampleLayout, check_latent_sample, load_manifest, read_latent_shard
    from lct.vae import LatentNorm

    lat = pixart_data["lat"]
    manifest = load_manifest(lat / "manifest.json")
    t = manifest["text"]
    assert (t["kind"], t["max_captions"], t["pooled_dim"], t["states_layout"]) == ("t5", 1, 0, "trimmed")
    assert manifest["vae"]["config"]["scaling_factor"] == pytest.approx(0.18215)
    enc = HFTextEncoder.from_manifest(manifest)
    np.testing.assert_array_equal(np.load(lat / "text_null.npy"), enc.null_condition().numpy())
    layout = SampleLayout.from_manifest(manifest)
    samples = read_latent_shard(str(lat / "00000.tar"))
    lengths = set()
    for s in samples:
        assert check_latent_sample(s, layout) is None
        assert s["tokens"].dtype == np.int32 and s["tokens"].shape == (1, MAX_LEN) and "pooled" not in s
        n = int((s["tokens"][0] != 0).sum())  # T5: pad 0; real tokens are a prefix
        assert s["states"].shape == (1, n, TEXT_DIM) and s["states"].dtype == np.float16
        ref = enc(torch.from_numpy(s["tokens"]).long())[0][0, :n]
        np.testing.assert_allclose(s["states"][0].astype(np.float32), ref.numpy(), rtol=2e-3, atol=2e-3)
        lengths.add(n)
    spec = DataSpec(urls=[], mode="indexed", seed=0, rank=0, world_size=1, micro_batch=4, accum=1,
                    latent_shape=tuple(manifest["latent_shape"]), norm=LatentNorm.from_manifest(manifest, "vae"),
                    caption_dropout=0.0, flip=False, text="precomputed", ot=False, pad_id=0, eot_id=1)
    batch = collate(spec, [draw_sample(spec, s, 0, i) for i, s in enumerate(samples[:4])], 0, 0)
    n_max = max(int((s["tokens"][0] != 0).sum()) for s in samples[:4])
    assert batch["text_states"].shape == (4, n_max, TEXT_DIM) and batch["pooled"].shape == (4, 0)
    np.testing.assert_array_equal(batch["text_mask"].numpy(), np.stack([s["tokens"][0][:n_max] != 0 for s in samples[:4]]))


def stats(run: Path):
    return [r for r in map(json.loads, (run / "stats.jsonl").read_text().splitlines()) if r["kind"] == "train"]


@pytest.mark.proc
def test_pixart_ect_ilct_two_deepspeed_ranks_resume_and_export(tmp_path, pixart_data):
    """ECT with Cauchy, adaptive c, OT and the early-step diffusion term on the tiny PixArt under
    `deepspeed --num_gpus 2` (CPU ranks, ZeRO-2); a second invocation resumes; the export loads as
    diffusers' PixArtSigmaPipeline (with the stock LCMScheduler) whose 1-step sample is lct's f(sigma_max z)."""
    from lct.export_pixart import caption_embeds, load_pixart_export
    from lct.hf_text import HFTextEncoder
    from lct.models.pixart import load_pixart
    from test_multirank import ENV, deepspeed_cmd, state_of

    cfg = pixart_config(tmp_path, pixart_data)
    c = load_config(cfg)
    assert (c.method.distance, c.method.c, c.method.ot, c.method.diffusion_weight) == ("cauchy", "adaptive", True, 2.5)
    first = run_cmd([*deepspeed_cmd(), "--config", str(cfg)], env=ENV)
    assert first.returncode == 0, first.stderr[-4000:]
    run = tmp_path / "run"
    assert state_of(run)["applied_steps"] == 2
    second = run_cmd([*deepspeed_cmd(), "--config", str(cfg), "run.total_steps=4",
                      "run.allow_total_steps_change=true"], env=ENV)
    assert second.returncode == 0, second.stderr[-4000:]
    assert "resumed from" in second.stdout
    st = state_of(run)
    assert st["applied_steps"] == 4 and st["resume_count"] == 1
    rec = stats(run)
    assert [r["step"] for r in rec] == [1, 2, 3, 4] and all(np.isfinite(r["loss"]) for r in rec)
    assert [r["stage"] for r in rec] == [0, 1, 2, 3] and rec[-1]["c"] == pytest.approx(2 * np.exp(-1.15 * np.log(10 * 2 ** (3 - 1)) - 0.85))  # SPEC 4: stage 3 -> n = s0 2^2, c x 2 (14.4)

    export = run / "export" / "ema"
    pipe, null, record = load_pixart_export(export)  # lct's loader: the folder as data
    assert type(pipe).__name__ == "PixArtSigmaPipeline" and type(pipe.scheduler).__name__ == "LCMScheduler"
    assert record["timesteps"]["2_step"][0] == 999
    assert record["sampler"]["requested_levels"] == [c.method.sigma_max, *c.method.tau]
    assert (run / "samples" / "step00000004_1step.png").is_file()  # the run's last grid, through this pipeline
    trained_null = torch.from_numpy(np.load(pixart_data["lat"] / "text_null.npy"))
    assert null["negative_prompt_embeds"].shape == (1, MAX_LEN, TEXT_DIM)
    model = load_pixart(str(export), null["negative_prompt_embeds"][0, : trained_null.shape[0]])
    enc = HFTextEncoder(pipe.text_encoder, pipe.tokenizer, MAX_LEN, source={}, tokenizer_source={})
    states, mask, _ = enc.encode(["a red circle on a blue background"])
    z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    smax = c.method.sigma_max
    with torch.no_grad():
        f = model(smax * z, torch.tensor([smax]), text_states=states, text_mask=mask)
    out = pipe(**caption_embeds(pipe, states, mask, null), timesteps=record["timesteps"]["1_step"], guidance_scale=1.0,
               latents=record["start_scale"] * z, output_type="latent", height=32, width=32).images  # lct's start
    assert float((out - f).abs().max()) <= 1e-5 * max(1.0, float(f.abs().max()))


@pytest.mark.parametrize("override, key", [
    ("model.nsln=qk", "model.nsln"), ("model.dropout=0.1", "model.dropout"),
    ("data.latent_norm=channel", "data.latent_norm"), ("method.sigma_data=0.5", "method.sigma_data"),
    ("model.pretrained=null", "model.pretrained"), ("text.kind=clip", "text.kind"),
])
def test_pixart_config_refusals_name_the_key(override, key):
    with pytest.raises(ConfigError) as err:
        load_config(SIGMA, [override])
    assert err.value.key == key and "\n" not in str(err.value)


def test_unloadable_model_id_offline_is_one_line_naming_the_key(tmp_path, pixart_data, capsys):
    """A hub id that is not cached (offline) and a folder without weights: exit 2, one line naming
    model.pretrained, before DeepSpeed starts, in seconds (the trainer's main in this process;
    HF_HUB_OFFLINE=1 is conftest's)."""
    from conftest import run_cli
    from lct.train import main as train_main

    cfg = pixart_config(tmp_path, pixart_data)
    empty = tmp_path / "empty_pipe"
    (empty / "transformer").mkdir(parents=True)
    for pretrained in ("someone/no-such-pixart", str(empty)):
        t0 = time.time()
        code, _, err = run_cli(capsys, train_main, ["--config", str(cfg), f"model.pretrained={pretrained}"])
        lines = [line for line in err.splitlines() if line.strip() and "Warning" not in line
                 and "warn(" not in line and "real_accelerator" not in line]
        assert code == 2, err[-2000:]
        assert "Traceback" not in err and "model.pretrained" in lines[-1], lines
        assert time.time() - t0 < 60
