"""data_prep/train_vae.py: a tiny run saves a loadable AutoencoderKL with train_vae.json, re-runs
skip or refuse, the loss decreases (deterministically), and bad arguments exit 2 in one line."""

import json

import pytest

from conftest import run_cli

TINY = ["--resolution", "16", "--downsample", "4", "--channels", "8,16,16", "--norm-num-groups", "4",
        "--batch-size", "8", "--steps", "20", "--warmup-steps", "2", "--seed", "0", "--device", "cpu",
        "--no-progress"]


@pytest.fixture(scope="module")
def shapes16(tmp_path_factory):
    """24 train (2 shards) and 8 held-out shapes images at 16 px."""
    from lct.data_prep import make_shapes

    root = tmp_path_factory.mktemp("vae_shapes")
    assert make_shapes.main(["--output", str(root / "s"), "--num", "24", "--size", "16",
                             "--samples-per-shard", "12", "--heldout", "8", "--seed", "0"]) == 0
    return {"input": str(root / "s" / "{00000..00001}.tar"), "heldout": str(root / "s" / "heldout" / "00000.tar"),
            "root": root}


def _train(shapes16, out, *extra):
    from lct.data_prep import train_vae

    return train_vae.main(["--input", shapes16["input"], "--heldout", shapes16["heldout"],
                           "--output", str(out), *TINY, *extra])


@pytest.mark.slow
def test_tiny_run_saves_loadable_vae_and_reruns(shapes16, tmp_path, capsys):
    import torch
    from diffusers import AutoencoderKL

    from lct.errors import UserError

    out = tmp_path / "vae"
    assert _train(shapes16, out) == 0
    vae = AutoencoderKL.from_pretrained(str(out))
    assert tuple(vae.config.block_out_channels) == (8, 16, 16) and vae.config.latent_channels == 4
    with torch.no_grad():
        lat = vae.encode(torch.zeros(2, 3, 16, 16)).latent_dist
    assert tuple(lat.mean.shape) == (2, 4, 4, 4)
    rec = json.loads((out / "train_vae.json").read_text())
    for key in ("config", "steps", "train_seconds", "final_loss", "final_rec_loss", "final_kl",
                "posterior_std_mean", "latent_shape", "heldout", "heldout_psnr", "stopped_by", "loss_curve"):
        assert key in rec, key
    assert rec["steps"] == 20 and rec["stopped_by"] == "steps" and rec["latent_shape"] == [4, 4, 4]
    assert rec["config"]["channels"] == [8, 16, 16] and rec["heldout_images"] == 8
    assert rec["train_images"] == 24 and rec["heldout"]["latent_shape"] == [4, 4, 4]
    assert 0 < rec["posterior_std_mean"] and 0 < rec["heldout_psnr"] < 100
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folder left
    capsys.readouterr()

    # Same config (a progress-bar flag differs, which does not count): skipped, files untouched.
    mtime = (out / "train_vae.json").stat().st_mtime_ns
    assert _train(shapes16, out, "--progress") == 0
    assert "skipping training" in capsys.readouterr().out
    assert (out / "train_vae.json").stat().st_mtime_ns == mtime

    # Another config: refused (names the differing option), unless --overwrite, which retrains
    # (here also reading the input as a comma list of shards).
    with pytest.raises(UserError, match="differs in: steps.*--overwrite"):
        _train(shapes16, out, "--steps", "5")
    shards = ",".join(str(shapes16["root"] / "s" / f"0000{i}.tar") for i in (0, 1))
    from lct.data_prep import train_vae
    assert train_vae.main(["--input", shards, "--heldout-fraction", "0.25", "--output", str(out), *TINY,
                           "--steps", "5", "--overwrite"]) == 0
    rec = json.loads((out / "train_vae.json").read_text())
    assert rec["steps"] == 5 and rec["train_images"] == 18 and rec["heldout_images"] == 6
    AutoencoderKL.from_pretrained(str(out))
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_loss_decreases_and_is_deterministic(shapes16):
    import torch

    from lct.data_prep import train_vae
    from lct.vae import open_image  # noqa: F401  (the shared preprocessing is what load_images uses)

    images, skipped = train_vae.load_images(shapes16["input"], 16, "--input")
    assert images.shape == (24, 3, 16, 16) and images.dtype == torch.uint8 and skipped == 0
    cfg = train_vae.TrainVAEConfig(input="unused", output="unused", resolution=16, channels=[8, 16, 16],
                                   norm_num_groups=4, batch_size=8, steps=40, warmup_steps=2, lr=3e-3,
                                   progress=False)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _, a = train_vae.train(cfg, images, torch.device("cpu"), False)
        _, b = train_vae.train(cfg, images, torch.device("cpu"), False)
    finally:
        torch.set_num_threads(threads)
    curve = a["loss_curve"]
    assert len(curve) == 20
    assert sum(curve[-4:]) / 4 < 0.6 * sum(curve[:4]) / 4, curve
    assert a["loss_curve"] == b["loss_curve"] and a["final_loss"] == b["final_loss"]


@pytest.mark.parametrize("case", ["missing_input", "channels_vs_downsample", "groups", "unknown_flag_value"])
def test_bad_arguments_exit_2_in_one_line(case, shapes16, tmp_path, capsys):
    """In this process (`cli_main`, what the script runs; the script as a file: test_layout)."""
    from lct.data_prep.train_vae import main

    args = {"missing_input": ["--input", str(tmp_path / "nope-{0..3}.tar")],
            "channels_vs_downsample": ["--input", shapes16["input"], "--downsample", "8", "--channels", "8,16,16"],
            "groups": ["--input", shapes16["input"], "--channels", "8,16,24", "--norm-num-groups", "16"],
            "unknown_flag_value": ["--input", shapes16["input"], "--downsample", "3"]}[case]
    code, _, err = run_cli(capsys, main, [*args, "--output", str(tmp_path / "out")])
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error ("), err
    assert "Traceback" not in err
    expect = {"missing_input": "no such shard file", "channels_vs_downsample": "needs 4 entries",
              "groups": "does not divide", "unknown_flag_value": "not a power of 2"}[case]
    assert expect in lines[0]
    assert not (tmp_path / "out").exists()
