"""The benchmark scripts run end to end at tiny sizes on CPU, so they cannot rot (the numbers
are not performance claims; bench/RESULTS.md holds the GPU measurements)."""

import json
import sys

import pytest

from conftest import ROOT, run_cmd

pytestmark = pytest.mark.proc  # every test here runs a bench script as a process


@pytest.mark.slow
def test_train_step_bench_tiny(tmp_path):
    """60-100 s on 2 cores: every configuration of the H100 benchmark (ratios, compile, precision m)
    at tiny width, through the script's own data prep, one process each: the only guard that the
    GPU command in bench/RESULTS.md still runs end to end, so it is kept whole rather than split."""
    proc = run_cmd([sys.executable, str(ROOT / "bench" / "train_step.py"), "--tiny", "--arch", "DiT-S/2",
                    "--batch", "8", "--compile", "DiT-S/2", "--ratios", "--warmup", "1", "--steps", "2",
                    "--out", str(tmp_path / "out"), "--work", str(tmp_path / "work")],
                   env={"OMP_NUM_THREADS": "1"}, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    res = json.loads((tmp_path / "out" / "train_step.json").read_text())
    names = [c["name"] for c in res["configs"]]
    assert names == ["DiT-S/2 eager", "DiT-S/2 compiled", "pixart_block", "edm_objective", "ot_off",
                     "diffusion_term_off", "text_on_the_fly", "real_data_loader"]
    assert not [c for c in res["configs"] if "error" in c], [c.get("error") for c in res["configs"]]
    eager = res["configs"][0]
    assert eager["flops_per_step"] > 0 and eager["step_ms"] > 0
    assert {"student_forward", "teacher_forward", "backward", "optimizer", "ema"} <= set(eager["split_ms"])
    assert "consistency / edm step" in res["ratios"] and res["precision_m"]["bf16_equal_adjacent_time_inputs_641"] == 98
    assert "| ratio | value |" in (tmp_path / "out" / "train_step.md").read_text()


def test_sample_bench_tiny(tmp_path):
    proc = run_cmd([sys.executable, str(ROOT / "bench" / "sample.py"), "--tiny", "--out", str(tmp_path)],
                   env={"OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((tmp_path / "sample.json").read_text())["samples_per_s_1step_decode_features"] > 0


def test_profile_model_tiny(tmp_path):
    """The model-level profile and its A/B variants run, and every variant computes the same
    function as the current code (fp32: agreement to rounding)."""
    proc = run_cmd([sys.executable, str(ROOT / "bench" / "profile_model.py"), "--tiny", "--steps", "2",
                    "--rows", "5", "--out", str(tmp_path)], env={"OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads((tmp_path / "profile_model.json").read_text())
    assert set(res["eager_ms"]) == {"current", "addcmul", "nsln_var_mean", "nsln_compiled"}
    for name, agree in res["agreement_fp32"].items():
        assert agree["output_rel"] < 1e-5 and agree["grad_rel"] < 1e-4, (name, agree)
    assert "aten::" in (tmp_path / "profile_eager.txt").read_text()


def test_ot_couple_bench(tmp_path):
    """The OT timing (moved here from a test that only printed it) runs, and the coupling it times
    lowers the pair cost by about SPEC 6's 3 % at d = 4096, B = 128 (a coupling that does nothing
    or pairs the wrong way gives 0 or less)."""
    proc = run_cmd([sys.executable, str(ROOT / "bench" / "ot_couple.py"), "--reps", "2", "--out", str(tmp_path)],
                   env={"OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads((tmp_path / "ot_couple.json").read_text())
    assert res["ms_per_call_1_thread"] > 0 and res["cost_matrix_ms_1_thread"] > 0
    assert 0.01 < res["pair_cost_gain"] < 0.06


def test_precision_bench_tiny(tmp_path):
    """bench/precision.py runs end to end, and what it measures is the bf16 rounding: at the
    same pairs, m under bf16 autocast differs from fp32 by a small positive m_round, and the
    ratio to 2c^2 grows as the stages shrink c (the numbers are bench/RESULTS.md's, not asserted)."""
    proc = run_cmd([sys.executable, str(ROOT / "bench" / "precision.py"), "--tiny", "--num", "16", "--s1", "40",
                    "--ect-stages", "2", "--out", str(tmp_path)], env={"OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads((tmp_path / "precision.json").read_text())["rows"]
    assert [(r["curriculum"], r["stage"]) for r in rows] == [("ict", 0), ("ict", 1), ("ict", 2), ("ect", 0), ("ect", 1)]
    assert [r["N"] for r in rows[:3]] == [11, 21, 41]
    for r in rows:
        assert 0 < r["m_round_bf16"] < 1e-3 * r["m_fp32"] and r["m_fp32"] > 0
    ict = [r["m_round_bf16_over_2c2"] for r in rows[:3]]
    assert ict == sorted(ict)
    assert "| m_round bf16 / 2c^2 |" in (tmp_path / "precision.md").read_text()


@pytest.mark.slow
def test_gpu_check_dry_cpu_runs_every_row(tmp_path):
    """~1-2 min on 2 cores: `bench/gpu_check.sh --dry-cpu`, issue 23's GPU script with the same
    commands at tiny sizes (the after rows: optim.fused, DiT eager and compiled, the PixArt stack
    eager and compiled, EDM on the same DiT; the before rows only where a `.before` snapshot was
    prepared), so the prepared GPU call cannot rot."""
    out = tmp_path / "out"
    proc = run_cmd(["bash", str(ROOT / "bench" / "gpu_check.sh"), "--dry-cpu"],
                   env={"OMP_NUM_THREADS": "1", "PYTHON": sys.executable, "OUT_DIR": str(out),
                        "WORK": str(tmp_path / "work")}, timeout=1500)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    after = json.loads((out / "after" / "train_step.json").read_text())
    results = [after]
    if (ROOT / ".before" / "bench" / "train_step.py").is_file():  # a prepared snapshot (not in CI)
        results.append(json.loads((out / "before" / "train_step.json").read_text()))
        assert [c["name"] for c in results[1]["configs"]] == ["DiT-XL/2 eager", "DiT-XL/2 compiled", "DiT-B/2 eager"]
    assert [c["name"] for c in after["configs"]] == ["DiT-B/2 eager", "DiT-B/2 compiled", "DiT-XL/2 eager",
                                                     "DiT-XL/2 compiled", "pixart_block", "pixart_block_compiled",
                                                     "edm_objective"]
    for res in results:
        assert not [c for c in res["configs"] if "error" in c], [c.get("error") for c in res["configs"]]
    assert "optim.fused=true" in after["configs"][0]["overrides"]
    assert {"ours / pixart step time (<= 1 is faster)", "ours / pixart step time, both compiled (<= 1 is faster)",
            "consistency / edm step"} <= set(after["ratios"])
    assert (out / "env.txt").read_text().startswith("mode cpu")

@pytest.mark.slow
def test_pixart_smoke_bench_tiny(tmp_path):
    """The GPU smoke run's code path (data prep with a T5 tower, PixArt loading, trainer step) at toy size."""
    proc = run_cmd([sys.executable, str(ROOT / "bench" / "pixart_smoke.py"), "--tiny", "--steps", "2",
                    "--out", str(tmp_path)], env={"HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads((tmp_path / "results.json").read_text())["rows"]
    assert len(rows) == 2 and all(r["images_per_s"] > 0 for r in rows)



@pytest.mark.slow
def test_demo_probe_tiny(tmp_path, tiny_export):
    """bench/demo_probe.py (the demo's tuning probe) on a tiny pipeline export and make_shapes
    held-out captions: ground-truth and VAE ceilings, a Heun ODE through the pipeline's network,
    1- and 2-step consistency samples, one JSON line each (it crashed on pipeline exports)."""
    import numpy as np

    from lct.data_prep.make_shapes import main as make_shapes

    export = tiny_export
    assert make_shapes(["--output", str(tmp_path / "ho"), "--split", "heldout", "--num", "6", "--size", "32"]) == 0
    proc = run_cmd([sys.executable, str(ROOT / "bench" / "demo_probe.py"), "--checkpoint", str(export),
                    "--captions", str(tmp_path / "ho" / "captions.jsonl"), "--num", "6", "--ode-steps", "2",
                    "--steps", "1", "2", "--tau", "0.8", "--ceiling", "--batch-size", "4",
                    "--save", str(tmp_path / "ode.npy")], env={"OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert [r["setting"] for r in rows] == ["ground_truth", "vae_reconstruction", "ode2", "1step", "2step_tau0.8"]
    assert all(r["n"] == 6 and set(r["by_size"]) == {"small", "large"} for r in rows), rows
    assert rows[0]["colour_acc"] == rows[0]["position_acc"] == rows[0]["shape_acc"] == 1.0, rows[0]
    assert all(0.0 <= r["shape_acc"] <= 1.0 for r in rows)
    assert np.load(tmp_path / "ode.npy").shape == (6, 32, 32, 3)


def test_checkpoint_hash_bench_tiny(tmp_path):
    """bench/checkpoint_hash.py runs, and the file it hashes while writing is the file on disk."""
    proc = run_cmd([sys.executable, str(ROOT / "bench" / "checkpoint_hash.py"), "--gb", "0.02", "--reps", "1",
                    "--dir", str(tmp_path), "--out", str(tmp_path / "out")], env={"OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads((tmp_path / "out" / "checkpoint_hash.json").read_text())
    assert res["gb"] > 0.01 and res["save_hashed_s_per_gb"] > 0 and res["verify_s_per_gb"] > 0
    assert res["hash_while_writing_equals_file_hash"] is True
