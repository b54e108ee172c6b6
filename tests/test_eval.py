"""eval/clip_fid.py on a tiny export: the shapes metric end to end, FID with random Inception weights
and cached reference statistics, CLIP with a tiny local model, missing weights, tau/guidance sweeps,
two ranks against one, the protocol caption file."""

import dataclasses
import hashlib
import json
import socket
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import ROOT, run_cmd
from helpers_data import make_image_shards
from helpers_export import IMAGE_SIZE

from lct import dist
from lct.eval import clip_fid  # eval/clip_fid.py, installed as lct.eval.clip_fid

SCRIPT = str(ROOT / "eval" / "clip_fid.py")
N = 6


@pytest.fixture(autouse=True)
def one_thread(monkeypatch, tmp_path):
    """Tiny models on a loaded 2-core machine; no downloads; caches in tmp."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    monkeypatch.setenv("LCT_CACHE_DIR", str(tmp_path / "lct_cache"))
    monkeypatch.setenv("https_proxy", "http://127.0.0.1:9")  # belt and braces: no network
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def export_dir(tiny_export):
    return tiny_export  # conftest: made once a session


@pytest.fixture(scope="module")
def shapes_captions(tmp_path_factory):
    """The held-out split of the shapes data set as data_prep/make_shapes.py writes it."""
    from lct.data_prep.make_shapes import write_split

    d = tmp_path_factory.mktemp("shapes") / "heldout"
    write_split(d, "heldout", num=N, size=16, samples_per_shard=N, seed=0, progress=False)
    return d / "captions.jsonl"


@pytest.fixture(scope="module")
def fid_weights(random_inception_weights):
    return random_inception_weights  # conftest: made once a session


def base_args(export_dir, captions, out, *extra, n=N, protocol="custom"):
    return ["--protocol", protocol, "--checkpoint", str(export_dir), "--captions", str(captions),
            "--num-samples", str(n), "--out", str(out), "--batch-size", "4", "--device", "cpu", *extra]


def results(out) -> dict:
    return json.loads((Path(out) / "results.json").read_text())


# ------------------------------------------------------------------------------------------ shapes


def test_shapes_metric_end_to_end(export_dir, shapes_captions, tmp_path, capsys):
    out = tmp_path / "out"
    rc = clip_fid.main(base_args(export_dir, shapes_captions, out, "--steps", "1", "2", "--metrics", "shapes"))
    assert rc == 0
    r = results(out)
    assert r["format"] == "lct-eval/1" and r["num_samples"] == N and r["world_size"] == 1
    assert r["protocol"]["name"] == "custom" and r["protocol"]["conforms"] is True
    sha = hashlib.sha256(shapes_captions.read_bytes()).hexdigest()
    assert r["captions"]["sha256"] == sha and r["captions"]["num_in_file"] == N
    ck = r["checkpoint"]
    assert ck["step"] == 123 and ck["ema"] == "ema" and ck["export_dir"] == str(export_dir.resolve())
    assert all(len(v) == 64 for v in ck["weights_sha256"].values()) and ck["weights_sha256"]
    assert r["resolution"] == {"generated": IMAGE_SIZE, "generated_size": [IMAGE_SIZE, IMAGE_SIZE], "metrics": IMAGE_SIZE,
                               "resized": False, "rule": r["resolution"]["rule"]}
    names = [s["name"] for s in r["settings"]]
    assert names == ["steps1_g1", "steps2_tau0.369315_g1"]
    # precision/recall is added beside the caption-accuracy metric; without --ref-images it is named as skipped
    assert set(r["skipped"]) == {"prdc"} and "--ref-images" in r["skipped"]["prdc"]["fix"]
    assert r["models"]["shapes"]["weights"] is None
    for s, steps in zip(r["settings"], (1, 2)):
        m = s["metrics"][f"shapes{N}"]
        assert m["metric"] == "shapes" and m["n"] == N and m["steps"] == steps and m["nfe"] == steps
        assert m["tau"] == ([] if steps == 1 else [0.36931547704]) and m["guidance"] == 1.0
        assert m["chance_colour"] == pytest.approx(1 / 8) and m["chance_position"] == pytest.approx(1 / 9)
        assert m["n_scored"] + m["n_unparsed"] == N and m["n_scored"] == N
        for k in ("colour_acc", "position_acc", "both_acc"):
            assert 0.0 <= m[k] <= 1.0
        assert m["value"] == m["both_acc"]
        assert m["protocol"] == "custom" and m["checkpoint_step"] == 123 and m["checkpoint_ema"] == "ema"
        assert m["captions_sha256"] == sha and m["checkpoint"] == str(export_dir.resolve())
        assert r["summary"][s["name"]] == {f"shapes{N}": m["value"], "prdc": None}
        assert s["throughput"]["samples_per_s"] > 0 and s["throughput"]["world_size"] == 1
        d = out / s["name"]
        pngs = sorted(p.name for p in d.glob("*.png") if p.name != "grid.png")
        assert pngs == [f"{i:06d}.png" for i in range(N)]
        from PIL import Image

        assert Image.open(d / "000000.png").size == (IMAGE_SIZE, IMAGE_SIZE)
        assert Image.open(d / "grid.png").size[0] > IMAGE_SIZE
        lines = [json.loads(x) for x in (d / "captions.jsonl").read_text().splitlines()]
        want_caps = [json.loads(x)["caption"] for x in shapes_captions.read_text().splitlines()]
        assert [x["caption"] for x in lines] == want_caps
        assert [x["key"] for x in lines] == [json.loads(x)["key"] for x in shapes_captions.read_text().splitlines()]
        assert lines[0].keys() >= {"file", "caption", "seed", "index", "steps", "tau", "guidance", "nfe"}
        assert [x["file"] for x in lines] == pngs and [x["index"] for x in lines] == list(range(N))
        assert lines[0]["nfe"] == steps and lines[0]["seed"] == 0
    assert r["throughput"]["samples_per_s"] > 0
    text = capsys.readouterr().out
    assert "chance 0.125" in text and "samples/s" in text


def test_tau_and_guidance_sweeps(export_dir, shapes_captions, tmp_path):
    out = tmp_path / "out"
    rc = clip_fid.main(base_args(export_dir, shapes_captions, out, "--steps", "2", "--tau", "0.2", "0.37", "0.8",
                                 "--guidance", "1", "1.5", "--metrics", "shapes", n=2))
    assert rc == 0
    r = results(out)
    got = [(s["tau"], s["guidance"], s["nfe"]) for s in r["settings"]]
    assert got == [([t], g, 2 if g == 1 else 4) for t in (0.2, 0.37, 0.8) for g in (1.0, 1.5)]
    assert [s["name"] for s in r["settings"]][:2] == ["steps2_tau0.2_g1", "steps2_tau0.2_g1.5"]
    for s in r["settings"]:
        m = s["metrics"]["shapes2"]
        assert m["tau"] == s["tau"] and m["guidance"] == s["guidance"] and m["nfe"] == s["nfe"]
        assert (out / s["name"] / "000001.png").is_file()
    # Different taus give different images.
    a, b = (out / "steps2_tau0.2_g1" / "000000.png").read_bytes(), (out / "steps2_tau0.8_g1" / "000000.png").read_bytes()
    assert a != b


# ------------------------------------------------------------------------------------------ FID and CLIP


class FrechetSpy:
    """Records the calls of `lct.features.frechet_distance`; computes each distinct input once (the
    2048 x 2048 eigenvalue problem takes 10-25 s on a loaded 2-core machine)."""

    def __init__(self, real):
        self.real, self.calls = real, []

    def __call__(self, mu1, s1, mu2, s2):
        for args, value in self.calls:
            if all(np.array_equal(a, b) for a, b in zip(args, (mu1, s1, mu2, s2))):
                self.calls.append((args, value))
                return value
        value = self.real(mu1, s1, mu2, s2)
        self.calls.append(((mu1, s1, mu2, s2), value))
        return value


@pytest.mark.slow
def test_fid_reference_cache_and_ref_stats(export_dir, shapes_captions, fid_weights, tmp_path, capsys, monkeypatch):
    import lct.features
    from lct.features import FIDStats

    spy = FrechetSpy(lct.features.frechet_distance)
    monkeypatch.setattr(lct.features, "frechet_distance", spy)
    pattern = make_image_shards(tmp_path / "ref", n_shards=2, per_shard=2, size=(40, 28))
    n = 3
    # The default protocol with other captions and fewer samples: runs, labelled as a deviation.
    args = base_args(export_dir, shapes_captions, tmp_path / "o1", "--steps", "1", "--metrics", "fid",
                     "--ref-images", pattern, "--fid-weights", str(fid_weights), n=n, protocol="coco2014val-30k")
    assert clip_fid.main(args) == 0
    assert "computing from 4 images" in capsys.readouterr().out
    r = results(tmp_path / "o1")
    assert r["resolution"]["metrics"] == 256 and r["resolution"]["resized"] is True
    assert r["protocol"]["name"] == "coco2014val-30k" and r["protocol"]["conforms"] is False
    dev = " ".join(r["protocol"]["deviations"])
    assert "pins no caption-file sha256" in dev and "3 samples instead of the protocol's 30000" in dev
    assert "4 images instead of the protocol's 40504" in dev
    ref = r["reference"]
    assert ref["source"] == "ref_images" and ref["cached"] is False and ref["n"] == 4 and ref["files"] == 2
    cache = Path(ref["path"])
    assert cache.is_file() and str(cache).startswith(str(tmp_path / "lct_cache"))
    m = r["settings"][0]["metrics"]["fid3"]
    assert m["model"]["weights_sha256"] == hashlib.sha256(fid_weights.read_bytes()).hexdigest()
    assert m["n"] == 3 and m["protocol"] == "coco2014val-30k" and m["protocol_conforms"] is False
    gen, refs = FIDStats.load(m["generated_stats"]), FIDStats.load(cache)
    assert gen.n == 3 and refs.n == 4 and np.isfinite(m["value"]) and m["value"] > 1e-4
    assert refs.meta["settings"]["resolution"] == 256
    # The reported value is frechet_distance of exactly the saved generated and reference stats.
    ((mu1, s1, mu2, s2), value), = spy.calls
    assert value == m["value"]
    for a, b in ((mu1, gen.mu), (s1, gen.sigma), (mu2, refs.mu), (s2, refs.sigma)):
        assert np.array_equal(a, b)

    # Second run: the cache is reused (not rewritten), same number.
    mtime = cache.stat().st_mtime_ns
    args2 = [a if a != str(tmp_path / "o1") else str(tmp_path / "o2") for a in args]
    assert clip_fid.main(args2) == 0
    assert "cache hit" in capsys.readouterr().out
    r2 = results(tmp_path / "o2")
    assert r2["reference"]["cached"] is True and cache.stat().st_mtime_ns == mtime
    assert r2["settings"][0]["metrics"]["fid3"]["value"] == m["value"]

    # --ref-stats alone loads them.
    args3 = base_args(export_dir, shapes_captions, tmp_path / "o3", "--steps", "1", "--metrics", "fid",
                      "--ref-stats", str(cache), "--fid-weights", str(fid_weights), n=n, protocol="coco2014val-30k")
    assert clip_fid.main(args3) == 0
    r3 = results(tmp_path / "o3")
    assert r3["reference"]["source"] == "ref_stats" and r3["reference"]["sha256"] == hashlib.sha256(
        cache.read_bytes()).hexdigest()
    assert r3["settings"][0]["metrics"]["fid3"]["value"] == m["value"]
    assert len(spy.calls) == 3  # same inputs each time (the eigenvalue problem ran once)


def test_clip_score_with_a_local_tiny_model(export_dir, shapes_captions, tmp_path):
    import open_clip

    name = "lct-test-eval-tiny-vit"
    cfg = tmp_path / f"{name}.json"
    cfg.write_text(json.dumps({"embed_dim": 32, "vision_cfg": {"image_size": 32, "layers": 1, "width": 32,
                                                               "head_width": 16, "patch_size": 8},
                               "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2,
                                            "layers": 1}}))
    open_clip.add_model_config(cfg)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = open_clip.create_model(name, pretrained=None)
    ckpt = tmp_path / "tiny_clip.pt"
    torch.save(model.state_dict(), ckpt)
    out = tmp_path / "out"
    rc = clip_fid.main(base_args(export_dir, shapes_captions, out, "--steps", "1", "--metrics", "clip,shapes",
                                 "--clip-model", name, "--clip-pretrained", str(ckpt), n=4))
    assert rc == 0
    r = results(out)
    m = r["settings"][0]["metrics"]["clip4"]
    assert 0.0 <= m["value"] <= 100.0 and m["n"] == 4
    assert m["model"]["clip_model"] == name and m["model"]["weights_sha256"] == hashlib.sha256(
        ckpt.read_bytes()).hexdigest()
    assert name in m["label"] and "100*max(cos,0)" in m["label"]
    assert r["settings"][0]["metrics"]["shapes4"]["n"] == 4


# ------------------------------------------------------------------------------------------ missing weights


def test_missing_weights_are_skipped_with_reason(export_dir, shapes_captions, tmp_path, capsys):
    pattern = make_image_shards(tmp_path / "ref", n_shards=1, per_shard=2, size=16)
    out = tmp_path / "none"
    rc = clip_fid.main(base_args(export_dir, shapes_captions, out, "--steps", "1", "--metrics", "fid",
                                 "--ref-images", pattern, n=2))
    assert rc == 0  # no metric could run: the samples and captions are written all the same
    err = capsys.readouterr().err
    assert "no metric can run" in err and "fid: skipped" in err and "--fid-weights" in err
    r = results(out)
    fid = r["skipped"]["fid"]
    assert fid["skipped"] is True and "downloads are off" in fid["reason"] and "--fid-weights" in fid["fix"]
    assert [s["name"] for s in r["settings"]] == ["steps1_g1"] and r["summary"]["steps1_g1"] == {"fid": None}
    assert sorted(p.name for p in (out / "steps1_g1").iterdir()) == ["000000.png", "000001.png", "captions.jsonl",
                                                                     "grid.png"]

    out = tmp_path / "some"
    rc = clip_fid.main(base_args(export_dir, shapes_captions, out, "--steps", "1", "--metrics", "fid,clip,shapes",
                                 "--ref-images", pattern, n=2))
    assert rc == 0
    r = results(out)
    ms = r["settings"][0]["metrics"]
    assert ms["fid"]["skipped"] and "--fid-weights" in ms["fid"]["fix"]
    assert ms["clip"]["skipped"] and "--clip-pretrained" in ms["clip"]["fix"]
    assert "ViT-g-14" in ms["clip"]["reason"]
    assert ms["shapes2"]["n"] == 2 and r["summary"]["steps1_g1"]["fid"] is None
    assert set(r["skipped"]) == {"fid", "clip", "prdc"} and r["models"]["clip"]["skipped"]
    assert "more than k = 5 samples" in r["skipped"]["prdc"]["reason"]

    # FID without any reference: skipped too, with the flags to set.
    rc = clip_fid.main(base_args(export_dir, shapes_captions, tmp_path / "noref", "--steps", "1",
                                 "--metrics", "fid,shapes", n=2))
    assert rc == 0
    assert "--ref-stats" in results(tmp_path / "noref")["skipped"]["fid"]["fix"]


# ------------------------------------------------------------------------------------------ weight files


class Evil:
    """A pickle payload: unpickling it (weights_only=False) creates the marker file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_malicious_weight_pickles_never_run(export_dir, shapes_captions, tmp_path, capsys):
    marker = tmp_path / "MARKER"
    evil = tmp_path / "evil.pth"
    torch.save({"conv.weight": torch.zeros(1), "x": Evil(marker)}, evil)
    torch.load(evil, weights_only=False)  # the payload works: this test can fail
    assert marker.exists()
    marker.unlink()
    pattern = make_image_shards(tmp_path / "ref", n_shards=1, per_shard=2, size=16)
    rc = clip_fid.main(base_args(export_dir, shapes_captions, tmp_path / "o1", "--steps", "1", "--metrics", "fid",
                                 "--ref-images", pattern, "--fid-weights", str(evil), n=2))
    assert rc == 0 and not marker.exists()
    reason = results(tmp_path / "o1")["skipped"]["fid"]["reason"]
    assert "--fid-weights" in reason and "refused" in reason and "io.open" in reason
    rc = clip_fid.main(base_args(export_dir, shapes_captions, tmp_path / "o2", "--steps", "1", "--metrics",
                                 "clip,shapes", "--clip-model", "ViT-B-32", "--clip-pretrained", str(evil), n=2))
    assert rc == 0 and not marker.exists()
    assert results(tmp_path / "o2")["skipped"]["clip"]["skipped"]
    from lct.errors import UserError

    with pytest.raises(UserError, match="--text-pretrained"):
        clip_fid.main(base_args(export_dir, shapes_captions, tmp_path / "o3", "--metrics", "shapes",
                                "--text-pretrained", str(evil), n=2))
    assert not marker.exists()


def test_fid_weights_sha256_and_the_pytorch_fid_layout(fid_weights, tmp_path, monkeypatch):
    """The published file is recognised by its sha256 (torch-fidelity's and pytorch-fid's files are
    the same bytes); pytorch-fid's layout (torchvision Inception3, 1008 classes, no aux head) loads
    as it is; anything else is loaded weights-only and marked unverified."""
    import torchvision

    from lct import features as metrics

    model = metrics.load_fid_inception(fid_weights)
    sha = hashlib.sha256(fid_weights.read_bytes()).hexdigest()
    assert model.lct_weights_sha256 == sha and model.lct_weights_verified is False
    monkeypatch.setattr(metrics, "FID_WEIGHTS_SHA256", sha)
    assert metrics.load_fid_inception(fid_weights).lct_weights_verified is True
    tv = torchvision.models.inception_v3(weights=None, aux_logits=False, num_classes=1008, init_weights=False)
    assert {k: v.shape for k, v in tv.state_dict().items()} == {k: v.shape for k, v in model.state_dict().items()}
    tv.load_state_dict(torch.load(fid_weights, weights_only=True))
    ptfid = tmp_path / "pt_inception-2015-12-05.pth"
    torch.save(tv.state_dict(), ptfid)
    x = torch.randint(0, 256, (2, 3, 40, 40), dtype=torch.uint8)
    assert torch.equal(metrics.fid_features(metrics.load_fid_inception(ptfid), x), metrics.fid_features(model, x))
    from lct.errors import UserError

    torch.save({"fc.weight": torch.zeros(3)}, tmp_path / "other.pth")
    with pytest.raises(UserError, match="not the FID Inception state dict"):
        metrics.load_fid_inception(tmp_path / "other.pth")


def test_help_names_the_fid_weight_files(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "400")  # argparse wraps at the terminal width
    with pytest.raises(SystemExit):
        clip_fid.main(["--help"])
    text = capsys.readouterr().out.replace("\n", " ")
    text = " ".join(text.split())
    assert "weights-inception-2015-12-05-6726825d.pth" in text and "pt_inception-2015-12-05-6726825d.pth" in text
    assert "mild guidance" in text


# ------------------------------------------------------------------------------------------ shapes labels


def test_shapes_label_counts_and_refuses_other_captions(export_dir, tmp_path, capsys):
    mostly = tmp_path / "mostly.txt"
    mostly.write_text("a red circle in the top left\na blue square at the bottom\na green triangle on the right\n"
                      "a photo of a bus\n")
    rc = clip_fid.main(base_args(export_dir, mostly, tmp_path / "o1", "--steps", "1", "--metrics", "shapes", n=4))
    assert rc == 0
    m = results(tmp_path / "o1")["settings"][0]["metrics"]["shapes4"]
    assert m["n_scored"] == 3 and m["n"] == 4 and "over 3 of 4 captions" in m["label"]
    assert "shapes4 (3 of 4 captions scored)" in capsys.readouterr().out
    few = tmp_path / "few.txt"
    few.write_text("a red circle in the top left\na photo of a bus\ntwo dogs\na cat on a sofa\n")
    rc = clip_fid.main(base_args(export_dir, few, tmp_path / "o2", "--steps", "1", "--metrics", "shapes", n=4))
    assert rc == 0 and (tmp_path / "o2" / "steps1_g1" / "captions.jsonl").is_file()
    reason = results(tmp_path / "o2")["skipped"]["shapes"]["reason"]
    assert "only 1 of 4 captions state a shapes colour and position" in reason


# ------------------------------------------------------------------------------------------ refusals


@pytest.mark.parametrize("flags, message", [
    (["--seed", "-5"], "--seed"),
    (["--batch-size", "0"], "--batch-size"),
    (["--steps", "0"], "--steps 0: sampling needs at least 1 step"),
    (["--steps", "2", "--tau", "-1"], "positive"),
    (["--steps", "2", "--tau", "nan"], "finite"),
    (["--steps", "3", "--tau", "1"], "--steps 3 needs 2 --tau values"),
    (["--guidance", "nan"], "--guidance nan: must be a finite number"),
    (["--device", "tpu"], "--device tpu"),
])
def test_bad_flags_are_refused_before_loading(shapes_captions, tmp_path, flags, message):
    from lct.errors import UserError

    with pytest.raises(UserError, match=message):
        clip_fid.main(base_args(tmp_path / "nowhere", shapes_captions, tmp_path / "o", "--metrics", "shapes", *flags))
    assert not (tmp_path / "o").exists()


def test_bad_files_are_refused_in_one_line(export_dir, shapes_captions, fid_weights, tmp_path):
    from lct.errors import UserError

    notnpz = tmp_path / "stats.npz"
    notnpz.write_bytes(b"")
    rc = clip_fid.main(base_args(export_dir, shapes_captions, tmp_path / "r", "--metrics", "fid", "--ref-stats",
                                 str(notnpz), "--fid-weights", str(fid_weights), n=2))
    fid = results(tmp_path / "r")["skipped"]["fid"]
    assert rc == 0 and "is not an FID statistics .npz" in fid["reason"] and "--ref-stats" in fid["fix"]

    bad = tmp_path / "caps.txt"
    bad.write_bytes(b"a red circle\n\xff\xfe\n")
    with pytest.raises(UserError, match=r"--captions .*caps.txt: not UTF-8 text \(byte 0xff on line 2\)"):
        clip_fid.main(base_args(tmp_path / "nowhere", bad, tmp_path / "o", "--metrics", "shapes", n=1))
    afile = tmp_path / "afile"
    afile.write_text("x")
    with pytest.raises(UserError, match="--out .*afile: is a file"):
        clip_fid.main(base_args(tmp_path / "nowhere", shapes_captions, afile, "--metrics", "shapes"))
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="--device cuda: CUDA is not available"):
            clip_fid.main(base_args(tmp_path / "nowhere", shapes_captions, tmp_path / "o", "--metrics", "shapes",
                                    "--device", "cuda"))
    import shutil

    trunc = tmp_path / "trunc"
    shutil.copytree(export_dir, trunc)
    (w,) = (trunc / "transformer").glob("*.safetensors")
    w.write_bytes(w.read_bytes()[:2000])
    with pytest.raises(UserError, match="could not be loaded"):
        clip_fid.main(base_args(trunc, shapes_captions, tmp_path / "o", "--metrics", "shapes"))
    with pytest.raises(UserError, match="below the model's sigma_max"):
        clip_fid.main(base_args(export_dir, shapes_captions, tmp_path / "o", "--metrics", "shapes", "--steps", "2",
                                "--tau", "100"))
    assert not (tmp_path / "o").exists()


def test_k_step_default_levels_and_the_one_step_grid(export_dir, shapes_captions, tmp_path):
    from lct.scheduler import karras_taus

    rc = clip_fid.main(base_args(export_dir, shapes_captions, tmp_path / "o", "--steps", "3", "--metrics", "shapes",
                                 n=2))
    assert rc == 0
    (s,) = results(tmp_path / "o")["settings"]
    assert s["tau"] == pytest.approx(karras_taus(3)) and s["nfe"] == 3
    line = json.loads((tmp_path / "o" / s["name"] / "captions.jsonl").read_text().splitlines()[0])
    assert line["tau"] == s["tau"]


# ------------------------------------------------------------------------------------------ ranks


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.proc
@pytest.mark.slow
def test_two_ranks_give_the_same_samples_and_numbers(export_dir, shapes_captions, tmp_path):
    ref = make_image_shards(tmp_path / "ref", n_shards=1, per_shard=N, size=16)  # prdc's real images
    common = ["--steps", "2", "--metrics", "shapes", "--batch-size", "2", "--ref-images", ref]
    one = tmp_path / "one"
    assert clip_fid.main(base_args(export_dir, shapes_captions, one, *common)) == 0
    two = tmp_path / "two"
    torchrun = str(Path(sys.executable).parent / "torchrun")
    proc = run_cmd([torchrun, "--nnodes", "1", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
                    "--master_port", str(_free_port()), SCRIPT,
                    *base_args(export_dir, shapes_captions, two, *common)],
                   env={"OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "LCT_CACHE_DIR": str(tmp_path / "c")},
                   timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    r1, r2 = results(one), results(two)
    assert r2["world_size"] == 2
    s1, s2 = r1["settings"][0], r2["settings"][0]
    assert s1["name"] == s2["name"]
    for k in ("colour_acc", "position_acc", "both_acc", "n", "no_shape"):
        assert s1["metrics"][f"shapes{N}"][k] == s2["metrics"][f"shapes{N}"][k]
    for k in ("precision", "recall", "density", "coverage", "spread"):
        assert s1["metrics"][f"prdc{N}"][k] == pytest.approx(s2["metrics"][f"prdc{N}"][k], abs=1e-9), k
    d1, d2 = one / s1["name"], two / s2["name"]
    for i in range(N):
        assert (d1 / f"{i:06d}.png").read_bytes() == (d2 / f"{i:06d}.png").read_bytes(), i
    assert (d1 / "captions.jsonl").read_text() == (d2 / "captions.jsonl").read_text()
    assert (d1 / "grid.png").read_bytes() == (d2 / "grid.png").read_bytes()


def test_rank_batches_cover_every_index_once():
    for n, b, k in [(10, 3, 1), (10, 3, 2), (7, 2, 3), (2, 4, 4)]:
        got = sorted(i for r in range(k) for batch in dist.rank_batches(n, b, r, k) for i in batch)
        assert got == list(range(n))
        # The same batches whatever the world size.
        assert sorted(map(tuple, (bb for r in range(k) for bb in dist.rank_batches(n, b, r, k)))) == \
            [tuple(x) for x in dist.rank_batches(n, b, 0, 1)]


# ------------------------------------------------------------------------------------------ captions


def _coco_annotations(path: Path, n_images=12):
    rng = np.random.default_rng(5)
    images = [{"id": int(i), "file_name": f"COCO_val2014_{int(i):012d}.jpg", "width": 64, "height": 48}
              for i in rng.permutation(1000)[:n_images] + 1]
    anns, aid = [], 100
    for im in images:
        for j in range(int(rng.integers(4, 7))):
            aid += int(rng.integers(1, 5))
            anns.append({"id": aid, "image_id": im["id"], "caption": f"  A photo  of image {im['id']}\n number {j} "})
    rng.shuffle(anns)
    path.write_text(json.dumps({"images": images, "annotations": anns}))
    return images, anns


def test_make_captions_is_deterministic_and_documented(tmp_path, capsys):
    from lct.protocols import draw_coco_captions, read_captions

    ann = tmp_path / "captions_val2014.json"
    images, anns = _coco_annotations(ann)
    outs = []
    for k in range(2):
        out = tmp_path / f"c{k}.jsonl"
        assert clip_fid.main(["--make-captions", "--coco-annotations", str(ann), "--num-samples", "5",
                              "--out", str(out)]) == 0
        outs.append(out.read_bytes())
    text = capsys.readouterr().out
    sha = hashlib.sha256(outs[0]).hexdigest()
    assert outs[0] == outs[1] and f"sha256 {sha}" in text
    recs = [json.loads(x) for x in outs[0].decode().splitlines()]
    assert [r["index"] for r in recs] == list(range(5)) and len({r["image_id"] for r in recs}) == 5
    # The documented draw: images sorted by id, default_rng(0).choice without replacement, then
    # default_rng(0).integers(0, n_captions); captions in annotation-id order, whitespace collapsed.
    ids = sorted(im["id"] for im in images)
    chosen = np.random.default_rng(0).choice(len(ids), size=5, replace=False)
    by_img = {i: [" ".join(a["caption"].split()) for a in sorted(anns, key=lambda a: a["id"]) if a["image_id"] == i]
              for i in ids}
    picks = np.random.default_rng(0).integers(0, np.array([len(by_img[ids[c]]) for c in chosen]))
    assert [r["image_id"] for r in recs] == [ids[c] for c in chosen]
    assert [r["caption"] for r in recs] == [by_img[ids[c]][p] for c, p in zip(chosen, picks)]
    assert recs == draw_coco_captions(ann, 5, 0)
    assert [r["caption"] for r in read_captions(tmp_path / "c0.jsonl")] == [r["caption"] for r in recs]


def test_pinned_caption_hash_is_verified(tmp_path, monkeypatch, export_dir):
    from lct import protocols
    from lct.errors import UserError

    caps = tmp_path / "caps.txt"
    caps.write_text("a red circle\n\na blue square at the top\n")
    assert [r["caption"] for r in protocols.read_captions(caps)] == ["a red circle", "a blue square at the top"]
    proto = dataclasses.replace(protocols.PROTOCOLS["coco2014val-30k"], captions_sha256="0" * 64)
    monkeypatch.setitem(protocols.PROTOCOLS, "coco2014val-30k", proto)
    with pytest.raises(UserError, match="sha256 .* is not the coco2014val-30k caption file's"):
        clip_fid.main(["--checkpoint", str(export_dir), "--captions", str(caps), "--out", str(tmp_path / "o"),
                       "--metrics", "shapes"])
    with pytest.raises(UserError, match="--num-samples 5: .* holds only 2 captions"):
        clip_fid.main(base_args(export_dir, caps, tmp_path / "o", "--metrics", "shapes", n=5))
    with pytest.raises(UserError, match="unknown"):
        clip_fid.main(base_args(export_dir, caps, tmp_path / "o", "--metrics", "fid,bogus", n=2))
    # The default protocol without its (not yet shipped) caption file says how to make it.
    if not protocols.PROTOCOLS["coco2014val-30k"].captions_path().is_file():
        with pytest.raises(UserError, match="--make-captions"):
            clip_fid.main(["--checkpoint", str(export_dir), "--out", str(tmp_path / "o")])
