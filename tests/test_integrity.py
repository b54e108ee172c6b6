"""What the third fault probe found (issue 31): config names that become paths, config files that
are not UTF-8, run.resume=never and eval/, the fused optimizer's compiled kernels, the mechanism
behind the NaN skip, the diffusion term's weight in a sigma_data = 1 latent space. The checkpoint
tests that need a trained run are at the end of test_runs.py (they share its finished run)."""

import json
import os
import sys
from pathlib import Path

import pytest
import torch

from conftest import ROOT, run_cmd
from lct.config import EvalConfig, load_config
from lct.errors import ConfigError

TRAIN = str(ROOT / "lct" / "train.py")


# ---------------------------------------------------------------------------------------------
# Names from configs that become paths; config files that are not UTF-8
# ---------------------------------------------------------------------------------------------

BAD_NAMES = ["../escape", "../../x", "/tmp/abs", "", "a/b", ".hidden", "a b", "stale", "x" * 65]


@pytest.mark.parametrize("name", BAD_NAMES)
def test_ema_names_are_plain_identifiers(name):
    """An EMA name is the folder export/<name>/ (and the key prefix of ema.safetensors, split at the
    first '/'): anything but a plain identifier is refused in one line naming the key."""
    models = json.dumps([{"name": name, "halflife_images": 100}])
    with pytest.raises(ConfigError) as err:
        load_config(None, [f"ema.models={models}", f"ema.sample={json.dumps(name)}"])
    msg = str(err.value)
    assert "ema.models.0.name" in msg and ("plain identifier" in msg or "reserved" in msg) and "\n" not in msg
    for good in ("ema", "ema_fast", "slow-2", "_x"):
        models = json.dumps([{"name": good, "halflife_images": 100}])
        assert load_config(None, [f"ema.models={models}", f"ema.sample={good}"]).ema.sample == good


def test_other_ema_names_read_as_paths_are_checked_too():
    with pytest.raises(ConfigError, match="model.init_ema.*plain identifier"):
        load_config(None, ["model.init_from=/some/run", "model.init_ema=../ema"])
    with pytest.raises(Exception, match="plain identifier"):
        EvalConfig(checkpoint="r", out="o", ema="../../ema")


def test_trainer_refuses_an_escaping_ema_name_before_writing_anything(tmp_path):
    """The probe's reproduction: `../escape` as an EMA name with a pre-filled target folder beside
    run.dir. The start is refused in one line (exit 2) and the folder keeps its file; a config
    file that is not UTF-8 is one line too, not a UnicodeDecodeError traceback."""
    target = tmp_path / "escape"
    target.mkdir()
    (target / "keep.txt").write_text("mine")
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"run: {{dir: {tmp_path}/run}}\nema:\n  models: [{{name: ../../escape, halflife_images: 100}}]\n"
                   "  sample: ../../escape\n")
    proc = run_cmd([sys.executable, TRAIN, "--config", str(cfg)])
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [l for l in proc.stderr.splitlines() if "ema.models.0.name" in l]
    assert len(lines) == 1 and "plain identifier" in lines[0] and "Traceback" not in proc.stderr
    assert (target / "keep.txt").read_text() == "mine" and not (tmp_path / "run").exists()

    latin1 = tmp_path / "latin1.yaml"
    latin1.write_bytes("# réglages\nrun: {dir: x}\n".encode("latin-1"))
    proc = run_cmd([sys.executable, TRAIN, "--config", str(latin1), "--dry-run"])
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert f"{latin1}: not UTF-8 text (byte 0xe9 on line 1); save the file as UTF-8" in proc.stderr


def test_a_base_file_that_is_not_utf8_is_named(tmp_path):
    (tmp_path / "base.yaml").write_bytes("optim: {lr: 1.0e-4}  # \xb5\n".encode("latin-1"))
    (tmp_path / "child.yaml").write_text("base: base.yaml\n")
    with pytest.raises(ConfigError, match="base.yaml: not UTF-8 text \\(byte 0xb5 on line 1\\)"):
        load_config(tmp_path / "child.yaml")


def test_inside_run_dir_is_the_guard_of_every_checkpoint_and_export_path(tmp_path):
    from lct.run import inside_run_dir

    cfg = load_config(None, [f"run.dir={tmp_path / 'run'}"])
    run = tmp_path / "run"
    assert inside_run_dir(cfg, run / "export" / "ema") == run / "export" / "ema"
    for bad in (run / "export" / ".." / ".." / "x", Path("/tmp/abs"), run, run / "export" / "/etc"):
        with pytest.raises(RuntimeError, match="not inside run.dir"):
            inside_run_dir(cfg, bad)


# ---------------------------------------------------------------------------------------------
# run.resume=never moves eval/ with the rest
# ---------------------------------------------------------------------------------------------


def test_resume_never_moves_eval_with_the_rest_of_the_old_run(tmp_path):
    """The model card shows the newest RUN_DIR/eval/ results: left behind, the new run's card would
    show the old run's evaluation under the same step number."""
    from lct.dist import DistInfo
    from lct.run import prepare_run_dir

    run = tmp_path / "run"
    for name in ("eval/ckpt6/results.json", "checkpoints/step00000006/COMPLETE", "stats.jsonl", "locks/rank0.lock"):
        (run / name).parent.mkdir(parents=True, exist_ok=True)
        (run / name).write_text("{}")
    prepare_run_dir(load_config(None, [f"run.dir={run}", "run.resume=never"]), DistInfo())
    (prev,) = list((run / "previous").iterdir())
    assert (prev / "eval/ckpt6/results.json").is_file() and (prev / "checkpoints").is_dir()
    assert not (run / "eval").exists() and not (run / "checkpoints").exists() and (run / "locks").is_dir()
