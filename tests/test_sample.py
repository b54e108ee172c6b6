"""`python -m lct.sample`: every flag's refusal comes first, in one line with exit 2; the default
k-step levels of SPEC 9; what captions.jsonl and the grid record."""

import json
import sys

import pytest
import torch

from conftest import run_cmd

from lct.errors import UserError
from lct.sample import grid_title, main
from lct.scheduler import LCTScheduler, default_taus, karras_taus


@pytest.fixture(scope="module")
def export_dir(tiny_export):
    return tiny_export  # conftest: made once a session


def test_default_k_step_levels_are_the_karras_grid_spec9():
    # SPEC 9: the model's recorded taus when it has k - 1, else the interior levels of the
    # (k + 1)-point Karras grid; 2 steps of that grid give the iLCT authors' logged 2.5152.
    assert karras_taus(1) == [] and karras_taus(2) == pytest.approx([2.515218976147159])
    assert karras_taus(3) == pytest.approx([9.72320135526012, 0.4699790579977467])
    assert karras_taus(4) == pytest.approx([17.52783196464411, 2.515218976147159, 0.16975275626876413])
    assert default_taus(2, [0.36931547704]) == [0.36931547704]
    assert default_taus(3, [0.36931547704]) == karras_taus(3)
    assert default_taus(3, [1.0, 0.5, 0.1]) == [1.0, 0.5]
    sched = LCTScheduler()  # the pipeline's default comes from the same function
    assert sched.default_taus(1) == [] and sched.default_taus(2) == [0.36931547704]
    assert sched.default_taus(4) == karras_taus(4)
    sched.set_timesteps(3)
    assert sched.levels == [80.0, *karras_taus(3)]
    with pytest.raises(ValueError, match="at least 1 step"):
        default_taus(0)


@pytest.mark.parametrize("boundary, noise", [(0.003, 0.0), (0.0, 0.0), (0.002, 0.002)])
def test_default_levels_do_not_follow_the_recorded_sampling_sigma_min(boundary, noise):
    """Issue 31 item 15: SPEC 9's default levels are the Karras grid on [0.002, sigma_max] whatever
    sampling sigma_min a model records (ECT: boundary 0.003 and noise floor 0; ect_imagenet: 0; they
    used to give [10.68, 0.625, 0.0049] for 4 steps with 0)."""
    sched = LCTScheduler(sigma_min=boundary, sample_sigma_min=noise, taus=[0.821])
    assert sched.default_taus(4) == pytest.approx([17.52783196464411, 2.515218976147159, 0.16975275626876413])
    assert sched.default_taus(2) == [0.821]
    # sigma_data 1 (SPEC 14.4: every level doubles) doubles the grid's 0.002 with sigma_max.
    assert LCTScheduler(sigma_max=160.0, sigma_data=1.0, taus=[]).default_taus(4) == pytest.approx(
        [2 * t for t in karras_taus(4)])


@pytest.mark.parametrize("flags, message", [
    (["--seed", "-5"], "--seed -5: must be >= 0"),
    (["--batch-size", "0"], "--batch-size 0: must be >= 1"),
    (["--num-per-prompt", "0"], "--num-per-prompt 0: must be >= 1"),
    (["--steps", "0"], "--steps 0: sampling needs at least 1 step"),
    (["--steps", "2", "--tau", "-1"], "positive and strictly decreasing"),
    (["--steps", "3", "--tau", "0.5", "0.8"], "positive and strictly decreasing"),
    (["--steps", "2", "--tau", "nan"], "finite"),
    (["--steps", "3", "--tau", "1"], "--steps 3 needs 2 --tau value"),
    (["--guidance", "nan"], "--guidance nan: must be a finite number >= 0"),
    (["--guidance", "-1"], "--guidance -1.0: must be a finite number >= 0"),
])
def test_bad_flags_are_refused_before_loading(tmp_path, flags, message):
    # A checkpoint that does not exist: the refusal must come before any loading.
    with pytest.raises(UserError, match=message.replace("[", r"\[")):
        main(["--checkpoint", str(tmp_path / "nowhere"), "--out", str(tmp_path / "o"), *flags])


def test_bad_files_and_devices_are_refused_before_loading(tmp_path):
    base = ["--checkpoint", str(tmp_path / "nowhere")]
    bad = tmp_path / "prompts.txt"
    bad.write_bytes(b"a red circle\n\xff\xfe a blue square\n")
    with pytest.raises(UserError, match=r"--prompts .*prompts.txt: not UTF-8 text \(byte 0xff on line 2\)"):
        main([*base, "--out", str(tmp_path / "o"), "--prompts", str(bad)])
    with pytest.raises(UserError, match="--prompts .*: file not found"):
        main([*base, "--out", str(tmp_path / "o"), "--prompts", str(tmp_path / "none.txt")])
    afile = tmp_path / "afile"
    afile.write_text("x")
    with pytest.raises(UserError, match="--out .*afile: is a file, not a folder"):
        main([*base, "--out", str(afile)])
    with pytest.raises(UserError, match="--out .*afile/sub: .*afile is a file"):
        main([*base, "--out", str(afile / "sub")])
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="--device cuda: CUDA is not available; use --device cpu"):
            main([*base, "--out", str(tmp_path / "o"), "--device", "cuda"])
    assert not (tmp_path / "o").exists()


@pytest.mark.proc
def test_refusals_are_one_line_with_exit_2(tmp_path):
    proc = run_cmd([sys.executable, "-m", "lct.sample", "--checkpoint", str(tmp_path), "--out", str(tmp_path / "o"),
                    "--guidance", "nan"], timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()] and "--guidance nan" in proc.stderr


def test_export_weights_and_taus_above_sigma_max(export_dir, tmp_path):
    with pytest.raises(UserError, match="below the model's sigma_max 80"):
        main(["--checkpoint", str(export_dir), "--out", str(tmp_path / "o"), "--device", "cpu",
              "--steps", "2", "--tau", "100"])
    with pytest.raises(UserError, match="--ema nope: .* is the export of EMA 'ema'"):
        main(["--checkpoint", str(export_dir), "--out", str(tmp_path / "o"), "--device", "cpu", "--ema", "nope"])
    import shutil

    trunc = tmp_path / "trunc"
    shutil.copytree(export_dir, trunc)
    (w,) = (trunc / "transformer").glob("*.safetensors")
    w.write_bytes(w.read_bytes()[:2000])
    with pytest.raises(UserError, match="could not be loaded"):
        main(["--checkpoint", str(trunc), "--out", str(tmp_path / "o"), "--device", "cpu"])
    w.unlink()
    with pytest.raises(UserError, match="missing"):
        main(["--checkpoint", str(trunc), "--out", str(tmp_path / "o"), "--device", "cpu"])
    assert not (tmp_path / "o").exists()


def test_three_steps_use_the_default_levels_and_records_are_json(export_dir, tmp_path):
    out = tmp_path / "o"
    assert main(["--checkpoint", str(export_dir), "--out", str(out), "--device", "cpu", "--steps", "3",
                 "--prompt", "a red circle", "--guidance", "1.5"]) == 0
    (rec,) = [json.loads(line) for line in (out / "captions.jsonl").read_text().splitlines()]
    assert rec["tau"] == pytest.approx(karras_taus(3)) and rec["steps"] == 3 and rec["nfe"] == 6
    assert rec["guidance"] == 1.5 and (out / "grid.png").is_file() and (out / "000000.png").is_file()
    assert grid_title(1, [], 1.0, 0) == "1-step, guidance 1, seed 0"
    assert grid_title(2, [0.36931547704], 1.5, 3) == "2-step, tau 0.369315, guidance 1.5, seed 3"


def test_help_states_the_guidance_range_and_the_default_levels(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "400")  # argparse wraps at the terminal width
    with pytest.raises(SystemExit):
        main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "tolerates only mild guidance" in text and "Karras levels" in text
