"""Refuse before work (issue 18, items 6, 9-12): the trainer's start-up checks and its dry run,
config warnings, one-line exits of the CLIs, and failing fast where the hub cannot be reached.

Most tests call the tools' `main` in this process (no interpreter start, no DeepSpeed): the
refusals they check all come before the process group and the engine."""

import json
import shutil
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import ROOT, run_cmd, tiny_train_config
from lct.config import check_train_config, load_config
from lct.errors import UserError, cli_main
from lct.train import main as train_main

TRAIN = str(ROOT / "lct" / "train.py")


def cli(capsys, main, argv):
    """(exit status, stdout, stderr) of a tool's `cli_main(main)` run in this process."""
    with pytest.raises(SystemExit) as exc:
        cli_main(main, argv)
    out = capsys.readouterr()
    return exc.value.code, out.out, out.err


def dry(capsys, cfg, *overrides, world_size=None):
    argv = ["--config", str(cfg), "--dry-run", *overrides]
    return cli(capsys, train_main, argv + (["--world-size", str(world_size)] if world_size is not None else []))


def one_line_error(err: str, *needles: str) -> None:
    lines = [l for l in err.splitlines() if l.startswith("error (")]
    assert len(lines) == 1 and "Traceback" not in err, err[-3000:]
    for n in needles:
        assert n in lines[0], (n, lines[0])


@pytest.fixture(scope="module")
def other_vaes(tmp_path_factory):
    """An AutoencoderKL with another config (8 latent channels) and one with the data's config but
    other weights."""
    from helpers_data import make_tiny_vae

    root = tmp_path_factory.mktemp("vaes")
    return {"config": make_tiny_vae(root / "c8", latent_channels=8), "weights": make_tiny_vae(root / "w", seed=5)}


# ---------------------------------------------------------------------------------------------
# The dry run checks what a start checks (item 9) and plans (figures)
# ---------------------------------------------------------------------------------------------


def test_dry_run_passes_and_prints_the_planning_figures(tmp_path, latent_data, capsys):
    cfg = tiny_train_config(tmp_path, latent_data)
    code, out, err = dry(capsys, cfg)
    assert code == 0, err
    assert "would fail" not in err
    assert "memory per GPU (estimated, micro-batch 8 x 1" in out and "activations" in out
    assert "compute for run.total_steps 6:" in out and "48 training images" in out
    assert "data: 96 samples in 2 shards; 0.5 epochs" in out
    assert "resume: none, a new run in" in out
    # Planned for 4 ranks: the micro-batch and the partitioned states shrink.
    code, out4, _ = dry(capsys, cfg, world_size=4)
    assert code == 0 and "micro-batch 2 x 1 accumulation, ZeRO-2 over 4" in out4


@pytest.mark.parametrize("case,overrides,needles", [
    ("text tower", ["text.model=ViT-B-32"], ["text.model='ViT-B-32' differs from the data's 'lct-tiny-text'",
                                             "text.model: null"]),
    ("states", ["data.text=precomputed"], ["data.text=precomputed but the shards have no token states",
                                           "data.text: on_the_fly"]),
    ("manifest latin-1", ["data.manifest={tmp}/latin1.txt"], ["latin1.txt: the latent manifest could not be read"]),
    ("vae config", ["vae.id={config}"], ["vae.id", "is not the VAE the data was encoded with",
                                         "latent_channels 4 vs 8", "vae.id: null"]),
    ("vae missing", ["vae.id={tmp}/no_vae"], ["vae.id", "no such folder"]),
    ("run.dir file", ["run.dir={tmp}/afile"], ["run.dir", "is a file"]),
    ("prompts missing", ["sample.prompts_file={tmp}/none.txt"], ["sample.prompts_file", "not found"]),
    ("prompts latin-1", ["sample.prompts_file={tmp}/latin1.txt"], ["sample.prompts_file", "not UTF-8"]),
    ("init_from truncated", ["model.init_from={tmp}/cut"], ["model.init_from", "unreadable weights"]),
])
def test_dry_run_fails_where_the_start_would(tmp_path, latent_data, other_vaes, capsys, case, overrides, needles):
    """Each failure a start would meet (before DeepSpeed) is printed as "would fail at start: ..."
    with the key and the fix, and the dry run exits 2; the real start refuses with the same line."""
    (tmp_path / "afile").write_text("x")
    (tmp_path / "latin1.txt").write_bytes("a caf\xe9 on a hill\n".encode("latin-1"))
    if case == "init_from truncated":
        from helpers_export import tiny_parts
        from lct.export import export_network

        precond, tcfg, manifest = tiny_parts(tmp_path / "w")
        state = {k: v.detach().clone() for k, v in precond.state_dict().items()}
        d = export_network(precond, state, tmp_path / "cut", cfg=tcfg, manifest=manifest, ema_name="ema", step=1)
        w = d / "transformer" / "diffusion_pytorch_model.safetensors"
        w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])
    cfg = tiny_train_config(tmp_path, latent_data)
    overrides = [o.format(tmp=tmp_path, **other_vaes) for o in overrides]
    code, out, err = dry(capsys, cfg, *overrides)
    assert code == 2, err[-2000:]
    fails = [l for l in err.splitlines() if l.startswith("would fail at start: ")]
    assert len(fails) == 1, err[-3000:]
    for n in needles:
        assert n in fails[0], (n, fails[0])
    assert "parameters: trunk" in out and "Traceback" not in err  # the figures still print
    # The real start: the same refusal, one line, exit 2, before any process group or engine.
    code, out, err = cli(capsys, train_main, ["--config", str(cfg), *overrides])
    one_line_error(err, *needles)
    assert code == 2 and not (tmp_path / "run" / "deepspeed.json").exists()


def test_dry_run_batch_smaller_than_the_ranks_is_one_line(tmp_path, latent_data, capsys):
    code, out, err = dry(capsys, tiny_train_config(tmp_path, latent_data), world_size=16)
    assert code == 2 and "Traceback" not in err
    assert "would fail at start: optim.batch_size: the global batch 8 does not split over 16 ranks" in err
    code, _, err = dry(capsys, tiny_train_config(tmp_path, latent_data), world_size=0)
    one_line_error(err, "--world-size 0")


def test_a_loadable_vae_with_other_weights_is_named(tmp_path, latent_data, other_vaes, capsys):
    """Same config, other source: a warning naming vae.id (a local copy of the same weights is fine)."""
    code, out, err = dry(capsys, tiny_train_config(tmp_path, latent_data), f"vae.id={other_vaes['weights']}")
    assert code == 0, err
    assert f"warning: vae.id {other_vaes['weights']} is not the data's VAE" in err and "vae.id: null" in err


def test_start_loads_the_text_tower_and_vae_before_deepspeed(tmp_path, latent_data):
    """preflight hands build the models it checked: the text tower (the manifest's tokenizer) and
    the data's VAE, on the CPU."""
    from lct.dist import DistInfo
    from lct.preflight import preflight

    cfg = load_config(tiny_train_config(tmp_path, latent_data))
    start = preflight(cfg, DistInfo())
    assert start.text is not None and start.text.model == "lct-tiny-text"
    assert type(start.vae).__name__ == "AutoencoderKL" and start.vae.config.latent_channels == 4
    assert next(start.vae.parameters()).device.type == "cpu"
    bench = preflight(cfg, DistInfo(), monitor=False)  # benchmarks: no VAE
    assert bench.vae is None and bench.text is not None  # data.text on_the_fly needs the tower


# ---------------------------------------------------------------------------------------------
# Resume state under --dry-run, and save before sampling (items 6 and 9), on one real run
# ---------------------------------------------------------------------------------------------


@pytest.mark.proc
@pytest.mark.slow
def test_resume_state_is_checked_before_deepspeed_and_saves_precede_grids(tmp_path, latent_data, capsys):
    """~40 s. A run killed right after its step-3 checkpoint (where a grid was also due) has the
    checkpoint and no step-3 grid: the save comes first, so a failing grid costs no training. Its
    dry runs then report the resume state: a changed network shape (named keys, exit 2, also at a
    real start, without DeepSpeed's state-dict traceback), a changed run.total_steps, and, once
    complete, that a start would do nothing."""
    cfg = tiny_train_config(tmp_path, latent_data, val={"every": 1000}, sample={"every": 3, "num": 2})
    env = {"OMP_NUM_THREADS": "1"}
    killed = run_cmd([sys.executable, TRAIN, "--config", str(cfg)], env={**env, "LCT_FAULT_EXIT_AFTER_SAVE": "3"})
    run = tmp_path / "run"
    assert killed.returncode == 137, killed.stderr[-3000:]
    assert (run / "checkpoints" / "step00000003" / "lct_state.json").is_file()
    assert not list((run / "samples").glob("step00000003_*")) if (run / "samples").exists() else True

    code, out, err = dry(capsys, cfg)
    assert code == 0 and "resume: " in out and "at applied step 3" in out, err
    code, out, err = dry(capsys, cfg, "model.hidden_size=64")
    assert code == 2, err
    line = next(l for l in err.splitlines() if l.startswith("would fail at start: "))
    assert "holds another network" in line and "model.hidden_size: 32 -> 64" in line
    code, out, err = cli(capsys, train_main, ["--config", str(cfg), "model.hidden_size=64"])
    assert code == 2
    one_line_error(err, "holds another network", "model.hidden_size: 32 -> 64")
    code, out, err = dry(capsys, cfg, "run.total_steps=9")
    assert code == 2 and "would fail at start: run.total_steps changed from 6 to 9" in err

    done = run_cmd([sys.executable, TRAIN, "--config", str(cfg)], env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (run / "samples" / "step00000006_1step.png").is_file()
    code, out, err = dry(capsys, cfg)
    assert code == 0 and "the run is complete (run.total_steps 6): a start would do nothing" in out


# ---------------------------------------------------------------------------------------------
# Warnings once, for inherited settings that do not fit (item 11)
# ---------------------------------------------------------------------------------------------


def test_config_warnings_for_settings_that_do_not_fit_the_data_or_machine():
    cfg = load_config(None, ["data.flip=true", "run.total_steps=100", "optim.batch_size=64",
                             "model.compile=true", "precision=bf16_trunk"])
    warns = check_train_config(cfg, manifest={"flip": False}, cuda=False)
    text = "\n".join(warns)
    assert "data.flip is true but the latents were encoded without flipped copies" in text
    assert "ema.models 'ema': a half-life of 1,267," in text and "longer than the run (6,400 images" in text
    assert "model.compile is on but there is no GPU" in text and "precision bf16_trunk without a GPU" in text
    quiet = check_train_config(load_config(None, ["data.flip=true", "run.total_steps=100000"]),
                               manifest={"flip": True}, cuda=True)
    assert not [w for w in quiet if "flip" in w or "half-life" in w or "GPU" in w], quiet


def test_custom_small_template_dry_runs_and_names_its_keys(capsys, monkeypatch):
    text = (ROOT / "configs" / "custom_small.yaml").read_text()
    for key in ("data.shards", "run.dir", "run.total_steps", "data.flip", "ema"):
        assert key.split(".")[-1] in text
    monkeypatch.chdir(ROOT)
    code, out, err = dry(capsys, "configs/custom_small.yaml")
    assert code == 2 and "would fail at start: data.shards" in err, err[-2000:]
    assert "memory per GPU (estimated" in out
    readme = (ROOT / "README.md").read_text()
    assert "configs/custom_small.yaml" in readme and "HF_HUB_OFFLINE=1" in readme


# ---------------------------------------------------------------------------------------------
# One line, exit 2 (item 10)
# ---------------------------------------------------------------------------------------------


def test_a_user_error_in_a_data_loader_worker_is_one_line(capsys):
    """A UserError raised in a DataLoader worker comes back around the worker's traceback; the CLI
    prints the error's own line."""

    class Bad(torch.utils.data.Dataset):
        def __len__(self):
            return 2

        def __getitem__(self, i):
            raise UserError("data.shards: sample 0000 lacks tokens.npy; re-run encode_latents.py")

    def main(argv):
        list(torch.utils.data.DataLoader(Bad(), num_workers=1))

    code, _, err = cli(capsys, main, [])
    assert code == 2
    one_line_error(err, "data.shards: sample 0000 lacks tokens.npy; re-run encode_latents.py "
                        "(in DataLoader worker process 0)")


def test_data_prep_output_folders_are_checked_before_work(tmp_path, capsys):
    """An output folder below a file, or a --heldout-output that is a file: one line naming the
    flag, before the train split is written."""
    from lct.data_prep import make_shapes

    (tmp_path / "afile").write_text("x")
    code, _, err = cli(capsys, make_shapes.main, ["--output", str(tmp_path / "afile" / "sub"), "--num", "2",
                                                  "--size", "16"])
    assert code == 2
    one_line_error(err, "--output", "is a file, so the folder cannot be made")
    code, _, err = cli(capsys, make_shapes.main, ["--output", str(tmp_path / "s"), "--num", "2", "--size", "16",
                                                  "--heldout", "2", "--heldout-output", str(tmp_path / "afile")])
    assert code == 2 and not (tmp_path / "s").exists()
    one_line_error(err, "--heldout-output", "is a file")


def test_export_cli_refuses_in_one_line(tmp_path, capsys):
    """python -m lct.export: --out a file or a folder of other files, missing or truncated weights."""
    from helpers_export import tiny_parts
    from lct import export as ex

    precond, cfg, manifest = tiny_parts(tmp_path / "w")
    state = {k: v.detach().clone() for k, v in precond.state_dict().items()}
    d = ex.export_network(precond, state, tmp_path / "exp", cfg=cfg, manifest=manifest, ema_name="ema", step=1)
    (tmp_path / "afile").write_text("x")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    code, _, err = cli(capsys, ex.main, [str(d), "--out", str(tmp_path / "afile")])
    assert code == 2
    one_line_error(err, "--out", "is a file")
    code, _, err = cli(capsys, ex.main, [str(d), "--out", str(tmp_path / "other")])
    assert code == 2 and (tmp_path / "other" / "notes.txt").read_text() == "mine"
    one_line_error(err, "--out", "holds other files")
    w = d / "transformer" / "diffusion_pytorch_model.safetensors"
    w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])
    with pytest.raises(UserError, match="unreadable weights"):
        ex.load_network_weights(d)
    code, _, err = cli(capsys, ex.main, [str(d), "--out", str(tmp_path / "new")])
    assert code == 2
    one_line_error(err, "could not be loaded")
    w.unlink()
    code, _, err = cli(capsys, ex.main, [str(d), "--out", str(tmp_path / "new")])
    assert code == 2
    one_line_error(err, "diffusion_pytorch_model.safetensors is missing")


# ---------------------------------------------------------------------------------------------
# Offline: fail fast (item 12)
# ---------------------------------------------------------------------------------------------


def test_an_unreachable_hub_fails_fast_in_offline_mode(monkeypatch, capsys):
    """With HF_HUB_OFFLINE unset and the hub unreachable, a hub VAE and an open_clip tag that are
    not cached fail in seconds with one line naming the option (the hub client alone retries for
    about a minute per model), and the process switches to offline mode, saying so once."""
    import huggingface_hub.constants as hc

    from lct import hub
    from lct.text import TextEncoder
    from lct.vae import load_vae

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.delenv("LCT_OFFLINE", raising=False)
    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens: refused at once
    monkeypatch.setattr(hub, "_PROBE", {})
    t0 = time.time()
    with pytest.raises(UserError, match=r"--vae \(vae.id\) lct-test/no-such-vae: not in the local Hugging Face cache"):
        load_vae("lct-test/no-such-vae")
    with pytest.raises(UserError, match="--text-pretrained laion2b_s34b_b79k"):
        TextEncoder.load("ViT-B-32", "laion2b_s34b_b79k")
    assert time.time() - t0 < 20
    assert hc.HF_HUB_OFFLINE is True and hub.is_offline()
    assert capsys.readouterr().err.count("cannot be reached: offline mode (HF_HUB_OFFLINE=1)") == 1


# ---------------------------------------------------------------------------------------------
# data.shards against the manifest, before DeepSpeed (issue 31 item 8)
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("damage", ["truncated", "missing"])
def test_shards_are_checked_against_the_manifest_before_deepspeed(tmp_path, latent_data, capsys, damage):
    """A latent shard cut short (same name, fewer bytes) or gone from data.shards' folder: the dry
    run reports it as a start failure, and a start refuses it in one line before the process group
    and the engine (it used to pass the dry run and fail only after DeepSpeed had started)."""
    data = tmp_path / "latents"
    shutil.copytree(latent_data["train"], data)
    shard = sorted(data.glob("*.tar"))[1]
    if damage == "truncated":
        shard.write_bytes(shard.read_bytes()[:-1024])
        needles = [f"data.shards: shard {shard} has", "truncated or replaced"]
    else:
        shard.unlink()
        needles = ["data.shards: 1 of the 2 shards listed in", shard.name]
    cfg = tiny_train_config(tmp_path, latent_data, data={"shards": str(data)})
    code, out, err = dry(capsys, cfg)
    fails = [l for l in err.splitlines() if l.startswith("would fail at start: ")]
    assert code == 2 and len(fails) == 1, err[-3000:]
    for n in needles:
        assert n in fails[0], (n, fails[0])
    code, out, err = cli(capsys, train_main, ["--config", str(cfg)])
    one_line_error(err, *needles)
    assert code == 2 and not (tmp_path / "run" / "deepspeed.json").exists()
