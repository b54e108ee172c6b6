"""Issue 32 phase 2, in-process and cheap: the `eval` config section's refusals, the dry run's
measured time per step, and the config warnings for settings that will not fit the machine. The
quality eval's rows in a real run and its independence from the training draws are checked on the
trainer runs tests/test_train.py already makes (test_single_process_run_writes_everything,
test_kill_and_resume_is_bitwise_identical)."""

import os
import re

import pytest
import torch

from conftest import tiny_train_config
from lct.config import check_train_config, load_config
from lct.errors import ConfigError, cli_main
from lct.train import main as train_main


def dry(capsys, cfg, *argv):
    with pytest.raises(SystemExit) as exc:
        cli_main(train_main, ["--config", str(cfg), "--dry-run", *argv])
    out = capsys.readouterr()
    return exc.value.code, out.out, out.err


def test_dry_run_prints_a_measured_time_per_step_and_for_the_run(tmp_path, latent_data, capsys):
    cfg = tiny_train_config(tmp_path, latent_data, run={"total_steps": 3000})
    before = torch.get_rng_state()
    code, out, err = dry(capsys, cfg)
    assert code == 0, err
    (line,) = [l for l in out.splitlines() if l.startswith("time per step")]
    assert "(measured: 2 step(s) of micro-batch 8 x 1 accumulation on cpu" in line and "teacher forward" in line
    m = re.search(r"\): ([0-9.e+-]+) s; for the 3,000 step\(s\) left of run.total_steps 3,000: about (\d+):(\d\d):(\d\d)",
                  line)
    assert m, line
    per_step, eta = float(m[1]), int(m[2]) * 3600 + int(m[3]) * 60 + int(m[4])
    assert per_step > 0 and abs(eta - per_step * 3000) <= 1 + 0.005 * eta  # per step (3 digits) x steps left
    assert torch.equal(torch.get_rng_state(), before)  # measuring draws nothing from the process's generator
    code, out, _ = dry(capsys, cfg, "--no-timing")
    assert code == 0 and "time per step" not in out
    # A start that would fail is not timed; a missing eval caption file is one such failure.
    code, out, err = dry(capsys, cfg, "eval.every=3", f"eval.captions={tmp_path / 'none.jsonl'}")
    assert code == 2 and "time per step" not in out
    assert "would fail at start: eval.captions" in err and "none.jsonl not found" in err


def test_dry_run_does_not_time_a_pretrained_network():
    from lct.dry_run import time_line

    cfg = load_config(None, ["model.arch=pixart", "model.pretrained=x", "model.nsln=none", "data.latent_norm=vae",
                             "method.sigma_data=1", "model.dropout=0"])
    assert "not measured for model.arch=pixart" in time_line(cfg, None, None, 1, None)


def warning_ids(cfg, **kw) -> set[str]:
    return {re.search(r"\[(\w+): if weighed", w)[1] for w in check_train_config(cfg, **kw)}


@pytest.mark.parametrize("overrides,cuda,wid", [
    (["precision=tf32"], False, "tf32_cpu"),
    (["precision=bf16_trunk"], False, "bf16_cpu"),
    ([f"data.num_workers={(len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count()) + 1}"],
     True, "workers_over_cores"),
    (["run.save_every=101"], True, "every_beyond_run"),
    (["sample.every=101"], True, "every_beyond_run"),
    (["eval.every=101", "data.val_shards=held"], True, "every_beyond_run"),
])
def test_config_warnings_for_settings_that_will_not_fit(overrides, cuda, wid):
    base = ["run.total_steps=100", "run.save_every=50", "sample.every=50", "val.every=50", "data.num_workers=0",
            "precision=fp32", "ema.models=[{name: ema, halflife_images: 100}]"]
    assert warning_ids(load_config(None, base), cuda=cuda) == set()
    cfg = load_config(None, base + overrides)
    assert warning_ids(cfg, cuda=cuda) == {wid}
    if wid == "every_beyond_run":
        (w,) = check_train_config(cfg, cuda=cuda)
        assert overrides[0].replace("=", " ") in w and "beyond run.total_steps 100" in w
    assert warning_ids(load_config(None, base + overrides + [f"run.accept_warnings=[{wid}]"]), cuda=cuda) == set()
    if wid.endswith("_cpu"):  # with a GPU, or where it is unknown, no device warning
        assert warning_ids(cfg, cuda=True) == warning_ids(cfg, cuda=None) == set()


def test_eval_config_refusals():
    with pytest.raises(ConfigError, match=r"eval.every.*data.val_shards.*eval.captions"):
        load_config(None, ["eval.every=10"])
    with pytest.raises(ConfigError, match=r"eval.metric_arg"):
        load_config(None, ["eval.every=10", "data.val_shards=x", "eval.metric_arg=[a=1]"])
    with pytest.raises(ConfigError, match=r"eval.metrics"):
        load_config(None, ["eval.metrics=[fidd]"])
    with pytest.raises(ConfigError, match=r"eval.steps"):
        load_config(None, ["eval.steps=[0]"])
    assert load_config(None, []).eval.every == 0  # off by default
