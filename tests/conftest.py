"""Shared test setup: the repository root, a CPU-only environment, a subprocess helper, the test
tiers, and the session artefacts that several modules share.

Tiers (pyproject's markers; README, Development): `proc` marks a test that starts a process or
trains a run; `slow` one that takes more than a few seconds in process; `demo` the quick demo.
`make test-fast` deselects all three; `make test` (CI) runs everything. A test of the fast tier
that starts a Python, a launcher or a compiler (or sets up a fixture that does) fails with a line
naming the marker.

Session artefacts are made once and shared: tests that change them copy them first
(`copy_finished_run`)."""

import contextlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

ROOT = Path(__file__).resolve().parents[1]

# CPU everywhere, quiet libraries, no hub access.
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def pytest_collection_modifyitems(config, items):
    """`multiproc` (the older name) and `demo` imply `proc`: `-m "not proc"` deselects them too."""
    for item in items:
        if item.get_closest_marker("multiproc") or item.get_closest_marker("demo"):
            item.add_marker(pytest.mark.proc)


_execute_child = subprocess.Popen._execute_child


def _fast_tier(item) -> bool:
    return not any(item.get_closest_marker(m) for m in ("proc", "slow"))


# What costs seconds to start: a Python (imports), a launcher, a console script, a shell script, a
# compiler (torch.compile's C++ build). Cheap tools that libraries run (ldconfig, cat, git) are fine.
_COSTLY = ("python", "deepspeed", "torchrun", "lct-", "bash", "g++", "gcc", "c++", "cc", "nvcc")


def _costly(args) -> bool:
    argv = args if isinstance(args, (list, tuple)) else str(args).split()
    first = os.path.basename(str(argv[0])) if argv else ""
    return str(argv[0]) == sys.executable or first.startswith(_COSTLY)


@contextlib.contextmanager
def _no_processes(item):
    """The fast tier starts no costly process (`_COSTLY`), in the test or in a fixture it sets up (a
    Python process costs seconds of imports; the fast tier must stay within minutes): a test that
    does belongs in the `proc` tier."""
    if not _fast_tier(item):
        yield
        return

    def refuse(self, args, *rest, **kw):
        if _costly(args):
            raise AssertionError(f"{item.nodeid} starts a process ({str(args)[:120]}): mark it "
                                 "@pytest.mark.proc (tests/conftest.py; README, Development)")
        return _execute_child(self, args, *rest, **kw)

    subprocess.Popen._execute_child = refuse
    try:
        yield
    finally:
        subprocess.Popen._execute_child = _execute_child


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_setup(item):
    with _no_processes(item):
        yield


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item):
    with _no_processes(item):
        yield


def run_cli(capsys, main, argv):
    """(exit status, stdout, stderr) of a tool's `cli_main(main)` (what `python -m TOOL ARGV` does)
    run in this process: the refusal tests need no process of their own."""
    from lct.errors import cli_main

    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        cli_main(main, argv)
    out = capsys.readouterr()
    return exc.value.code, out.out, out.err


def run_cmd(args, cwd=ROOT, env=None, timeout=600, check=False):
    """Run a command; returns CompletedProcess with text stdout/stderr."""
    e = dict(os.environ)
    e.update(env or {})
    e.setdefault("PYTHONUNBUFFERED", "1")
    proc = subprocess.run(args, cwd=cwd, env=e, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{args} exited {proc.returncode}\nstdout:\n{proc.stdout[-4000:]}\n"
                             f"stderr:\n{proc.stderr[-4000:]}")
    return proc


@pytest.fixture
def python():
    return sys.executable


# ---------------------------------------------------------------------------------------------
# A tiny latent data set made by the real data prep (shapes -> random tiny VAE -> latents)
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def latent_data(tmp_path_factory):
    """{"train": dir, "heldout": dir, "vae": dir}: 96 shapes at 16 px, 4x4x4 latents, tiny text."""
    import torch

    from helpers_data import make_tiny_vae
    from lct.data_prep import encode_latents, make_shapes

    root = tmp_path_factory.mktemp("latents")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert make_shapes.main(["--output", str(root / "shapes"), "--num", "96", "--size", "16",
                                 "--samples-per-shard", "48", "--heldout", "32", "--seed", "0"]) == 0
        vae = make_tiny_vae(root / "vae", latent_channels=4, downsample=4)
        common = ["--vae", str(vae), "--resolution", "16", "--text-model", "lct-tiny-text",
                  "--num-workers", "0", "--device", "cpu", "--batch-size", "32"]
        assert encode_latents.main(["--input", str(root / "shapes" / "{00000..00001}.tar"),
                                    "--output", str(root / "train"), "--text-pretrained", "random",
                                    "--flip", *common]) == 0
        tower = root / "train" / "text_tower" / "open_clip_model.safetensors"
        assert encode_latents.main(["--input", str(root / "shapes" / "heldout" / "00000.tar"),
                                    "--output", str(root / "heldout"), "--text-pretrained", str(tower),
                                    *common]) == 0
    finally:
        torch.set_num_threads(threads)
    return {"train": root / "train", "heldout": root / "heldout", "vae": Path(vae), "root": root}


def tiny_train_config(tmp_path, latent_data, name="tiny.yaml", **sections):
    """A small trainer config on the tiny latent data; `sections` deep-override it."""
    import yaml

    cfg = {
        "run": {"dir": str(tmp_path / "run"), "total_steps": 6, "save_every": 3, "log_every": 1, "seed": 0},
        "method": {"preset": "ilct"},
        "model": {"arch": "DiT-S/2", "hidden_size": 32, "depth": 2, "num_heads": 2},
        "data": {"shards": str(latent_data["train"]), "val_shards": str(latent_data["heldout"]),
                 "mode": "indexed", "num_workers": 0, "text": "on_the_fly"},
        "optim": {"batch_size": 8},
        "precision": "fp32",
        "distributed": {"zero_stage": 2},
        "ema": {"models": [{"name": "ema", "halflife_images": 200}, {"name": "slow", "halflife_images": 2000}],
                "sample": "ema"},
        "sample": {"every": 3, "num": 4},
        "val": {"every": 3, "batch_size": 16, "buckets": 4},
    }
    for section, values in sections.items():
        if isinstance(values, dict):
            cfg.setdefault(section, {}).update(values)
        else:
            cfg[section] = values
    path = Path(tmp_path) / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(cfg))
    return path


# ---------------------------------------------------------------------------------------------
# Session artefacts: a finished tiny run, a tiny export, random Inception weights (made once)
# ---------------------------------------------------------------------------------------------

# 1 rank and 2 ranks train the same numbers with these (no dropout, no OT: the world-size test).
EXACT = dict(method={"preset": "ilct", "ot": False}, model={"arch": "DiT-S/2", "hidden_size": 32, "depth": 2,
                                                            "num_heads": 2, "dropout": 0.0})


BRIGHTNESS = '''
import torch

class Brightness:
    """Mean pixel value per sample: a user metric (lct.metrics.Metric) marked as caption accuracy."""
    name, width, caption_accuracy = "bright", 1, True

    def __init__(self, ctx):
        self.record = {"name": "brightness", "n": len(ctx.captions)}

    def rows(self, images, metric_images, captions):
        return torch.tensor(images.reshape(len(images), -1).mean(1), dtype=torch.float64)[:, None]

    def result(self, rows, out_dir, main):
        return {"value": float(rows.mean())}

    def line(self, key, m):
        return f"{key} {m['value']:.2f}"
'''


def finished_run_config(dest: Path, latent_data, run: dict | None = None, **sections) -> Path:
    """The config of `finished_run` with run.dir under `dest` (`run`, `sections` override it)."""
    return tiny_train_config(dest, latent_data, run={"dir": str(Path(dest) / "run"), "total_steps": 6,
                                                     "save_every": 2, "log_every": 1, "seed": 0, "keep_last": 3,
                                                     **(run or {})}, **{**EXACT, **sections})


@pytest.fixture(scope="session")
def finished_run(tmp_path_factory, latent_data):
    """A finished single-process run of the trainer as a process (its smoke test): 6 steps,
    checkpoints at 2, 4, 6, grids and validation at 3 and 6, exports of `ema` and `slow`. The
    1-process reference of the world-size test; the quality eval on at 3 and 6 (it must not move the
    training draws, which the world-size test's comparisons also check). Read it in place; copy it (`copy_finished_run`)
    to change or resume it."""
    base = tmp_path_factory.mktemp("finished")
    metric = base / "bright.py"  # a user metric for the quality eval (lct/quality.py)
    metric.write_text(BRIGHTNESS)
    cfg = finished_run_config(base, latent_data, eval={
        "every": 3, "num": 8, "batch_size": 4, "metrics": ["shapes", "fid"], "fid_weights": str(base / "no.pth"),
        "metric": [f"{metric}:Brightness"]})
    proc = run_cmd([sys.executable, str(ROOT / "lct" / "train.py"), "--config", str(cfg)],
                   env={"OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    (base / "stderr.txt").write_text(proc.stderr)
    assert "finished: step 6 of 6" in proc.stdout and "export" in proc.stdout  # the end-of-run summary
    return base


def copy_finished_run(finished_run: Path, dest: Path, latent_data, run: dict | None = None, **sections) -> Path:
    """A copy of `finished_run`'s run folder under `dest` and its config pointing there."""
    import shutil

    shutil.copytree(finished_run / "run", Path(dest) / "run", ignore=shutil.ignore_patterns("locks"))
    return finished_run_config(dest, latent_data, run, **sections)


@pytest.fixture(scope="session")
def tiny_export(tmp_path_factory):
    """A tiny export (helpers_export.make_tiny_export: a pipeline folder of a random tiny network
    with the tiny data's VAE and text tower), made once for every module that reads one."""
    from helpers_export import module_tiny_export

    return module_tiny_export(tmp_path_factory)


@pytest.fixture(scope="session")
def random_inception_weights(tmp_path_factory):
    """torch-fidelity's FID Inception with random weights, saved as a weights file (offline; test_eval,
    test_metrics)."""
    import torch
    from torch_fidelity import feature_extractor_inceptionv3 as tfi

    mp = pytest.MonkeyPatch()
    mp.setattr(tfi, "load_state_dict_from_url", lambda *a, **k: {})
    mp.setattr(tfi.FeatureExtractorInceptionV3, "load_state_dict", lambda self, sd, *a, **k: None)
    try:
        with torch.random.fork_rng():
            torch.manual_seed(0)
            model = tfi.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    finally:
        mp.undo()
    # He-scaled convolutions: with PyTorch's default init the activations vanish through the
    # network and every image gets the same features (FID ~ 1e-13, which tests nothing).
    state = model.state_dict()
    g = torch.Generator().manual_seed(0)
    for k, v in state.items():
        if k.endswith("conv.weight"):
            state[k] = torch.randn(v.shape, generator=g) * (2.0 / v[0].numel()) ** 0.5
    path = tmp_path_factory.mktemp("fid") / "inception-random.pth"
    torch.save(state, path)
    return path
