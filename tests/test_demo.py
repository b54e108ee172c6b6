"""The shortened demo, end to end, as a newcomer would run it (`python -m lct.demo --quick`): shapes,
VAE fit, latent encoding, EDM start and consistency tuning under the real `deepspeed` launcher on two
CPU ranks, and the shapes evaluation. Slow by nature (7 to 12 minutes on 2 cores): it is the only
test that drives every stage of the product together, so a broken hand-off between stages (paths,
manifests, exports, the VAE folder, the text tower) fails here and nowhere else. A second run reusing
every stage is not repeated here (3 min on the slower VM): each tool's reuse of finished work has its
own test (test_train_vae, test_encode_latents, test_train's finished run found complete)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from conftest import ROOT

pytestmark = [pytest.mark.demo, pytest.mark.proc]


@pytest.mark.timeout(1800)  # a hang guard, not a time budget: the quick demo took 7 min on one VM, 13 on another
def test_quick_demo_end_to_end(tmp_path):
    out = tmp_path / "demo"
    proc = subprocess.run([sys.executable, "-m", "lct.demo", "--quick", "--out", str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=1700)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]

    # Every stage left its artefacts where the next one (and the user) finds them.
    assert (out / "shapes" / "heldout" / "captions.jsonl").is_file()
    assert (out / "vae" / "config.json").is_file() and (out / "vae" / "train_vae.json").is_file()
    for split in ("train", "heldout"):
        assert (out / "latents" / split / "manifest.json").is_file(), split
    for run in ("edm", "demo"):
        ckpt = out / "runs" / run / "checkpoints"
        assert (ckpt / "latest").is_file(), run
        assert (ckpt / (ckpt / "latest").read_text().strip() / "COMPLETE").exists(), run
        assert list((out / "runs" / run / "samples").glob("*.png")), run
    ds = json.loads((out / "runs" / "demo" / "deepspeed.json").read_text())
    assert ds["gradient_clipping"] == 0.0

    summary = json.loads((out / "demo_summary.json").read_text())
    assert set(summary["times_s"]) >= {"make_shapes", "train_vae", "encode_latents", "train_edm",
                                       "train_consistency", "eval", "total"}
    assert summary["vae"]["heldout_psnr"] > 20
    rows = {r["steps"]: r for r in summary["shapes"]}
    assert set(rows) == {1, 2}
    for steps, r in rows.items():
        grid = Image.open(r["grid"])
        assert grid.size[0] > 200 and grid.size[1] > 200
        captions = Path(r["grid"]).parent / "captions.jsonl"
        assert len(captions.read_text().splitlines()) == r["n"]
    # Far above chance (1/8 colour, 1/9 position) after about eight minutes of CPU work: the model
    # reads its captions. Measured on the 2-core VM (2026-12-07, 1,000 + 200 steps, one VAE and its
    # latents, training seeds 0 and 1 and the 2026-12-02 trainer on the same latents): colour
    # 0.270-0.325 / 0.440-0.510, position 0.960-0.975 / 0.985-1.0 at 1 / 2 steps. Colour at 1 step
    # depends on the VAE's draw (0.505 with the 2026-12-02 VAE), hence its lower bar.
    for steps in (1, 2):
        r = rows[steps]
        assert r["colour_acc"] > (1.6 if steps == 1 else 2.5) * r["chance_colour"], r
        assert r["position_acc"] > 5 * r["chance_position"], r
        assert 0.0 <= r["shape_acc"] <= 1.0 and r["chance_shape"] == 0.25, r
        assert set(r["by_size"]) == {"small", "large"} and all("shape_acc" in v for v in r["by_size"].values()), r
        d = r["diversity"]  # precision/recall/coverage beside the accuracies (issue 32)
        assert all(0.0 <= d[k] <= 1.0 for k in ("precision", "recall", "coverage")) and d["spread"] > 0, d
    # The shape word is measured too, beside its ceilings: the held-out captions' own renders are
    # read right (1.0 on 500 held-out renders) and the VAE keeps colour and position. The quick
    # demo's samples are not asserted on shape: its short VAE keeps the outline of few small shapes
    # (bench/RESULTS.md, issue 24).
    ceiling = summary["shapes_ceiling"]
    assert set(ceiling) == {"ground_truth", "vae_reconstruction"}, ceiling
    gt, rec = ceiling["ground_truth"], ceiling["vae_reconstruction"]
    assert gt["n"] == rows[1]["n"] and min(gt["colour_acc"], gt["position_acc"], gt["shape_acc"]) >= 0.98, gt
    assert rec["colour_acc"] >= 0.95 and rec["position_acc"] >= 0.95, rec
