"""Issue 32, your own data: precision/recall/density/coverage (lct.prdc) against a brute-force
reference and on real digits, user metrics through eval/clip_fid.py (`--metric`, `--metric-arg`),
eval that always leaves samples, the digits data set and its caption classifier, train_vae's
reconstruction grid and PSNR warning, the sample grid's first 16, config warning ids, the model
card's example prompt, and `python -m lct.demo --data` (its inputs, split and, opt-in, end to end)."""

import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import ROOT

from lct.errors import UserError
from lct.eval import clip_fid
from lct.prdc import knn_radii, prdc

N = 8


@pytest.fixture(autouse=True)
def one_thread(monkeypatch, tmp_path):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    monkeypatch.setenv("LCT_CACHE_DIR", str(tmp_path / "lct_cache"))
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def export_dir(tiny_export):
    return tiny_export  # conftest: made once a session


@pytest.fixture(scope="module")
def digits():
    pytest.importorskip("sklearn")
    from lct.data_prep.make_digits import load_digits_data, split_indices

    images, labels = load_digits_data()
    train, held = split_indices(labels, 0.15, 0)
    return images, labels, train, held


# ------------------------------------------------------------------------------------------ prdc


def brute_force_prdc(real, fake, k):
    """The definitions of Kynkaanniemi et al. 2019 / Naeem et al. 2020 in plain loops."""
    def radius(x, i):
        d = sorted(np.linalg.norm(x - x[i], axis=1))
        return d[k]  # d[0] is the point itself
    rr = [radius(real, i) for i in range(len(real))]
    fr = [radius(fake, j) for j in range(len(fake))]
    dist = lambda a, b: float(np.linalg.norm(a - b))
    precision = np.mean([any(dist(f, r) < rr[i] for i, r in enumerate(real)) for f in fake])
    recall = np.mean([any(dist(r, f) < fr[j] for j, f in enumerate(fake)) for r in real])
    density = np.mean([sum(dist(f, r) < rr[i] for i, r in enumerate(real)) for f in fake]) / k
    coverage = np.mean([min(dist(r, f) for f in fake) < rr[i] for i, r in enumerate(real)])
    return precision, recall, density, coverage


@pytest.mark.parametrize("k", [1, 3])
def test_prdc_matches_the_definitions(k):
    g = np.random.default_rng(0)
    real = g.normal(size=(40, 3))
    fake = np.concatenate([g.normal(size=(20, 3)) * 0.3, g.normal(size=(15, 3)) + 4])  # collapsed + off-manifold
    got = prdc(torch.tensor(real), torch.tensor(fake), k, chunk=7)  # chunks smaller than the sets
    want = brute_force_prdc(real, fake, k)
    assert [got["precision"], got["recall"], got["density"], got["coverage"]] == pytest.approx(want, abs=1e-12)
    assert 0 < got["precision"] < 1 and got["recall"] < 1 and got["coverage"] < 1
    same = prdc(torch.tensor(real), torch.tensor(real), k)
    assert same["precision"] == same["recall"] == same["coverage"] == 1.0 and same["spread"] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="more than k"):
        knn_radii(torch.zeros(3, 2), 3)


def test_an_averaged_model_loses_on_recall_and_spread(digits):
    """Class-mean digits (the right digit, no variety) read right but recall none of the real
    manifold. In raw pixels their coverage stays as high as real digits' (0.80 vs 0.78): why the
    metric uses a random-VGG16 space, where their coverage falls to 0 (the slow test below)."""
    images, labels, train, held = digits
    x = torch.tensor(images, dtype=torch.float64).flatten(1)
    tr, he = torch.tensor(train[:250]), torch.tensor(held[:250])
    means = torch.stack([x[tr][torch.tensor(labels[train[:250]] == d)].mean(0) for d in range(10)])
    averaged = means[torch.tensor(labels[held[:250]])]
    real, avg = prdc(x[tr], x[he], 5), prdc(x[tr], averaged, 5)
    assert real["recall"] > 0.9 and 0.9 < real["spread"] < 1.1
    assert avg["recall"] < 0.05 and avg["spread"] < 0.8 and avg["precision"] > real["precision"]


@pytest.mark.slow
def test_random_vgg16_features_rank_real_above_averaged(digits):
    from lct.data_prep.make_digits import render
    from lct.prdc import RandomVGG16

    images, labels, train, held = digits
    pix = lambda rows: torch.from_numpy(np.stack([np.asarray(render(images[r], 32)) for r in rows])).permute(0, 3, 1, 2)
    ref, real = pix(train[:150]), pix(held[:150])
    means = {d: ref[torch.tensor(labels[train[:150]] == d)].float().mean(0) for d in range(10)}
    averaged = torch.stack([means[int(labels[r])] for r in held[:150]]).round().to(torch.uint8)
    embed = RandomVGG16(32)
    assert torch.equal(embed(ref[:4]), RandomVGG16(32)(ref[:4]))  # seeded: the same network every time
    f_ref = embed(ref)
    good, bad = prdc(f_ref, embed(real)), prdc(f_ref, embed(averaged))
    assert good["recall"] > 0.7 and good["coverage"] > 0.7
    assert bad["recall"] < 0.2 and bad["coverage"] < 0.2


# ------------------------------------------------------------------------------------------ user metrics

USER_METRIC = '''
import torch
from lct.metrics import Unavailable

class Brightness:
    """Mean pixel value per sample; a caption-accuracy stand-in (so prdc is added beside it)."""
    name = "bright"
    width = 1
    caption_accuracy = True

    def __init__(self, ctx):
        if ctx.options.get("scale") is None:
            raise Unavailable("needs a scale", "pass --metric-arg scale=1")
        self.scale = float(ctx.options["scale"])
        self.record = {"name": "brightness", "n_captions": len(ctx.captions), "resolution": ctx.resolution}

    def rows(self, images, metric_images, captions):
        return torch.tensor(images.reshape(len(images), -1).mean(1) * self.scale, dtype=torch.float64)[:, None]

    def result(self, rows, out_dir, main):
        return {"value": float(rows.mean()), "n": int(rows.shape[0])}

    def line(self, key, m):
        return f"{key} brightness {m['value']:.2f}"

class Broken(Brightness):
    name = "broken"

    def rows(self, images, metric_images, captions):
        raise RuntimeError("boom")
'''


def eval_args(export_dir, captions, out, *extra, n=N):
    return ["--protocol", "custom", "--checkpoint", str(export_dir), "--captions", str(captions), "--num-samples",
            str(n), "--out", str(out), "--batch-size", "4", "--device", "cpu", "--steps", "1", *extra]


@pytest.fixture
def captions(tmp_path):
    p = tmp_path / "caps.txt"
    p.write_text("".join(f"a handwritten digit {w}\n" for w in ("one", "two", "three", "four") * 2))
    return p


def test_metrics_none_writes_samples_and_exits_0(export_dir, captions, tmp_path):
    out = tmp_path / "o"
    assert clip_fid.main(eval_args(export_dir, captions, out, "--metrics", "none")) == 0
    d = out / "steps1_g1"
    assert len(list(d.glob("*.png"))) == N + 1 and (d / "grid.png").is_file()
    rows = [json.loads(l) for l in (d / "captions.jsonl").read_text().splitlines()]
    assert [r["caption"] for r in rows] == captions.read_text().splitlines()
    r = json.loads((out / "results.json").read_text())
    assert r["skipped"] == {} and r["summary"] == {"steps1_g1": {}}


def test_user_metric_with_prdc_beside_it_and_a_guidance_sweep(export_dir, captions, tmp_path, capsys):
    from helpers_data import make_image_shards

    mod = tmp_path / "my_metric.py"
    mod.write_text(USER_METRIC)
    ref = make_image_shards(tmp_path / "ref", n_shards=1, per_shard=N, size=16)
    out = tmp_path / "o"
    rc = clip_fid.main(eval_args(export_dir, captions, out, "--metrics", "none", "--metric", f"{mod}:Brightness",
                                 "--metric-arg", "scale=2", "--ref-images", ref, "--guidance", "1", "1.5"))
    assert rc == 0
    r = json.loads((out / "results.json").read_text())
    assert [s["name"] for s in r["settings"]] == ["steps1_g1", "steps1_g1.5"]
    for s in r["settings"]:
        m, p = s["metrics"][f"bright{N}"], s["metrics"][f"prdc{N}"]
        pngs = np.stack([np.asarray(__import__("PIL.Image").Image.open(f)) for f in sorted(Path(s["dir"]).glob("0*.png"))])
        assert m["value"] == pytest.approx(2 * pngs.reshape(N, -1).mean(1).mean(), rel=1e-6)  # scored the PNGs' pixels
        assert m["guidance"] == s["guidance"] and m["metric"] == "bright"
        assert {"precision", "recall", "density", "coverage", "spread"} <= set(p) and p["k"] == 5
        assert p["value"] == p["coverage"] and p["n_real"] == N and "Naeem" in p["label"]
    assert r["models"]["bright"]["n_captions"] == N
    text = capsys.readouterr().out
    assert "bright8 brightness" in text and "coverage" in text
    assert "setting" in text and "steps1_g1.5" in text  # the sweep table

    # Without the option: named as skipped with its fix; a metric that raises while scoring is
    # named too; the samples are written all the same.
    out2 = tmp_path / "o2"
    rc = clip_fid.main(eval_args(export_dir, captions, out2, "--metrics", "none", "--metric", f"{mod}:Broken",
                                 "--metric", f"{mod}:Brightness"))
    assert rc == 0
    r = json.loads((out2 / "results.json").read_text())
    assert r["skipped"]["Brightness"]["fix"] == "pass --metric-arg scale=1"
    assert r["skipped"]["Broken"]["skipped"]
    assert len(list((out2 / "steps1_g1").glob("0*.png"))) == N


def test_broken_user_metric_is_named_and_the_samples_survive(export_dir, captions, tmp_path):
    mod = tmp_path / "my_metric.py"
    mod.write_text(USER_METRIC)
    out = tmp_path / "o"
    rc = clip_fid.main(eval_args(export_dir, captions, out, "--metrics", "none", "--metric", f"{mod}:Broken",
                                 "--metric-arg", "scale=1"))
    assert rc == 0
    m = json.loads((out / "results.json").read_text())["settings"][0]["metrics"]["broken"]
    assert m["skipped"] and "RuntimeError: boom" in m["reason"]
    assert len(list((out / "steps1_g1").glob("0*.png"))) == N


@pytest.mark.parametrize("spec, message", [
    ("nocolon", "expected module:Name"),
    ("/no/such/file.py:X", "not found"),
    ("lct.no_such_module:X", "could not import"),
    ("lct.metrics:NoSuchThing", "has no callable NoSuchThing"),
])
def test_bad_metric_specs_are_refused_before_loading(spec, message, captions, tmp_path):
    with pytest.raises(UserError, match=f"--metric {spec}.*{message}"):
        clip_fid.main(eval_args(tmp_path / "nowhere", captions, tmp_path / "o", "--metric", spec))
    with pytest.raises(UserError, match="--metric-arg 'novalue': expected KEY=VALUE"):
        clip_fid.main(eval_args(tmp_path / "nowhere", captions, tmp_path / "o", "--metrics", "none",
                                "--metric-arg", "novalue"))
    with pytest.raises(UserError, match="your own metrics go in --metric"):
        clip_fid.main(eval_args(tmp_path / "nowhere", captions, tmp_path / "o", "--metrics", "mod:Name"))
    assert not (tmp_path / "o").exists()


def test_prdc_without_reference_is_named(export_dir, captions, tmp_path):
    rc = clip_fid.main(eval_args(export_dir, captions, tmp_path / "o", "--metrics", "prdc"))
    assert rc == 0
    sk = json.loads((tmp_path / "o" / "results.json").read_text())["skipped"]["prdc"]
    assert "no reference images" in sk["reason"] and "--ref-images" in sk["fix"]


# ------------------------------------------------------------------------------------------ digits


def test_digit_captions_and_the_split(digits):
    from lct.eval.digits_metric import WORDS, caption, caption_label

    images, labels, train, held = digits
    assert images.shape == (1797, 8, 8) and images.dtype == np.uint8 and images.max() == 255
    assert caption(7) == "a handwritten digit seven" and all(caption_label(caption(d)) == d for d in range(10))
    assert caption_label("the digit 3") == 3 and caption_label("a cat") is None and caption_label("one or two") is None
    assert not set(train) & set(held) and len(train) + len(held) == 1797
    share = np.bincount(labels[held], minlength=10) / np.bincount(labels, minlength=10)
    assert np.all(np.abs(share - 0.15) < 0.01)  # stratified
    assert len(WORDS) == 10


@pytest.mark.slow
def test_make_digits_shards_classifier_and_metric(tmp_path, capsys):
    pytest.importorskip("sklearn")
    import webdataset as wds

    from lct.data_prep import make_digits
    from lct.eval.digits_metric import DigitAccuracy, caption_label
    from lct.metrics import MetricContext, Unavailable
    from lct.dist import DistInfo

    out = tmp_path / "digits"
    assert make_digits.main(["--output", str(out), "--size", "16", "--classifier-epochs", "8"]) == 0
    info = json.loads((out / "digits.json").read_text())
    assert info["train"] + info["heldout"] == 1797 and info["classifier_heldout_accuracy"] > 0.9
    s = next(iter(wds.WebDataset(str(out / "heldout" / "00000.tar"), shardshuffle=False)))
    meta = json.loads(s["json"])
    assert s["txt"].decode() == meta["caption"] and caption_label(meta["caption"]) == meta["label"]
    assert s["png"][:8] == b"\x89PNG\r\n\x1a\n"
    before = (out / "train" / "00000.tar").read_bytes()
    assert make_digits.main(["--output", str(out), "--size", "16", "--classifier-epochs", "8"]) == 0
    assert "nothing to do" in capsys.readouterr().out and (out / "train" / "00000.tar").read_bytes() == before
    with pytest.raises(UserError, match="other settings"):
        make_digits.main(["--output", str(out), "--size", "32"])

    caps = [json.loads(l) for l in (out / "heldout" / "captions.jsonl").read_text().splitlines()]
    ctx = MetricContext([c["caption"] for c in caps], caps, 16, torch.device("cpu"), DistInfo(),
                        options={"classifier": str(out / "classifier.safetensors")})
    metric = DigitAccuracy(ctx)
    from PIL import Image

    imgs = np.stack([np.asarray(Image.open(__import__("io").BytesIO(x["png"])))
                     for x in wds.WebDataset(str(out / "heldout" / "00000.tar"), shardshuffle=False)])
    rows = metric.rows(imgs, None, ctx.captions)
    m = metric.result(rows, tmp_path, True)
    assert m["accuracy"] == pytest.approx(info["classifier_heldout_accuracy"])  # the real images' own score
    wrong = metric.result(metric.rows(imgs, None, ctx.captions[1:] + ctx.captions[:1]), tmp_path, True)
    assert wrong["accuracy"] < 0.3
    with pytest.raises(Unavailable, match="classifier"):
        DigitAccuracy(MetricContext(ctx.captions, caps, 16, torch.device("cpu"), DistInfo()))
    with pytest.raises(Unavailable, match="name one digit"):
        DigitAccuracy(MetricContext(["a cat"] * 4, [], 16, torch.device("cpu"), DistInfo(), options=ctx.options))

    # As a script, on a samples folder as lct.sample writes it (PNGs + captions.jsonl).
    from lct.eval import digits_metric

    folder = tmp_path / "samples"
    folder.mkdir()
    for i, (a, c) in enumerate(zip(imgs[:20], ctx.captions[:20])):
        Image.fromarray(a).save(folder / f"{i:06d}.png")
    (folder / "captions.jsonl").write_text("".join(json.dumps({"file": f"{i:06d}.png", "caption": c}) + "\n"
                                                   for i, c in enumerate(ctx.captions[:20])))
    capsys.readouterr()
    assert digits_metric.main(["--classifier", str(out / "classifier.safetensors"), "--samples", str(folder)]) == 0
    line = capsys.readouterr().out
    assert line.startswith("digits20: digit accuracy ") and "chance 0.100" in line


# ------------------------------------------------------------------------------------------ smaller items


def test_config_warnings_carry_ids_and_the_recipes_print_none():
    from lct.config import check_train_config, load_config

    cfg = load_config(None, ["method.preset=ect", "method.c=adaptive", "method.ot=true", "optim.batch_size=32"])
    warns = check_train_config(cfg, world_size=2, cuda=False)
    assert any("[adaptive_c_ect:" in w for w in warns) and any("[ot_small_group:" in w for w in warns)
    cfg = load_config(None, ["method.preset=ect", "method.c=adaptive", "method.ot=true", "optim.batch_size=32",
                             "run.accept_warnings=[adaptive_c_ect]"])
    warns = check_train_config(cfg, world_size=2, cuda=False)
    assert not any("adaptive_c_ect" in w for w in warns) and any("ot_small_group" in w for w in warns)
    for c in ("demo_edm.yaml", "demo.yaml", "custom_small_edm.yaml", "custom_small_ect.yaml"):
        assert check_train_config(load_config(ROOT / "configs" / c), 2, manifest={"flip": False}, cuda=False) == [], c


def test_small_data_config_pair_is_the_demo_recipe():
    from lct.config import load_config

    edm, ect = (load_config(ROOT / "configs" / c) for c in ("custom_small_edm.yaml", "custom_small_ect.yaml"))
    demo_edm, demo = (load_config(ROOT / "configs" / c) for c in ("demo_edm.yaml", "demo.yaml"))
    for a, b in ((edm, demo_edm), (ect, demo)):
        assert a.method == b.method and a.optim == b.optim and a.ema == b.ema
        assert (a.model.hidden_size, a.model.depth, a.model.nsln) == (b.model.hidden_size, b.model.depth, b.model.nsln)
    assert ect.model.init_from == edm.run.dir and edm.data.flip is False


def test_model_card_example_prompt_comes_from_the_data(tmp_path):
    from lct.config import load_config
    from lct.export_common import example_prompt
    from lct.model_card import _example_prompt

    assert example_prompt(load_config(None, ["sample.prompts=[a handwritten digit seven]"])) == "a handwritten digit seven"
    pf = tmp_path / "p.txt"
    pf.write_text("\n  a digit two\nx\n")
    assert example_prompt(load_config(None, [f"sample.prompts_file={pf}"])) == "a digit two"
    assert example_prompt(load_config(None, [f"data.shards={tmp_path}/none.tar"])) is None
    assert _example_prompt({"example_prompt": "a handwritten digit seven"}) == "a handwritten digit seven"
    assert "bus" not in _example_prompt({})


def test_sample_grid_holds_the_first_16(export_dir, tmp_path):
    from PIL import Image

    from lct import sample
    from lct.grids import caption_grid

    prompts = tmp_path / "p.txt"
    prompts.write_text("".join(f"prompt {i}\n" for i in range(18)))
    assert sample.main(["--checkpoint", str(export_dir), "--prompts", str(prompts), "--out", str(tmp_path / "s"),
                        "--device", "cpu", "--batch-size", "9"]) == 0
    assert len(list((tmp_path / "s").glob("0*.png"))) == 18
    tiles = [np.asarray(Image.open(tmp_path / "s" / f"{i:06d}.png")) for i in range(16)]
    want = caption_grid(tiles, [f"prompt {i}" for i in range(16)], title="x")
    assert Image.open(tmp_path / "s" / "grid.png").size == want.size


def test_train_vae_writes_reconstructions_and_warns_below_min_psnr(tmp_path, capsys):
    from lct.data_prep import make_shapes, train_vae

    make_shapes.main(["--output", str(tmp_path / "s"), "--num", "16", "--size", "16", "--samples-per-shard", "16",
                      "--heldout", "8", "--seed", "0"])
    args = ["--input", str(tmp_path / "s" / "00000.tar"), "--heldout", str(tmp_path / "s" / "heldout" / "00000.tar"),
            "--output", str(tmp_path / "vae"), "--resolution", "16", "--downsample", "2", "--channels", "8,8",
            "--norm-num-groups", "4", "--batch-size", "8", "--steps", "3", "--device", "cpu", "--no-progress"]
    assert train_vae.main([*args, "--min-psnr", "99"]) == 0
    err = capsys.readouterr().err
    assert "below --min-psnr 99 dB" in err and "reconstructions.png" in err
    from PIL import Image

    grid = Image.open(tmp_path / "vae" / "reconstructions.png")
    assert grid.size[0] > 8 * 16  # 8 held-out images across, reconstructions under them
    rec = json.loads((tmp_path / "vae" / "train_vae.json").read_text())
    assert rec["psnr_ok"] is False and rec["min_psnr"] == 99 and "grid" not in rec["heldout"]
    assert train_vae.main([*args, "--min-psnr", "5"]) == 0  # --min-psnr changes nothing trained: skips
    assert "skipping training" in capsys.readouterr().out


# ------------------------------------------------------------------------------------------ demo --data


def test_demo_data_refuses_bad_inputs_before_any_work(tmp_path):
    from lct import demo

    with pytest.raises(UserError, match="--data: no such shard file"):
        demo.main(["--data", str(tmp_path / "none.tar"), "--out", str(tmp_path / "o")])
    shard = tmp_path / "a.tar"
    shard.write_bytes(b"")
    with pytest.raises(UserError, match="--metric x: expected module:Name"):
        demo.main(["--data", str(shard), "--metric", "x", "--out", str(tmp_path / "o")])
    with pytest.raises(SystemExit):
        demo.main(["--vae", "x/y", "--out", str(tmp_path / "o")])  # --vae without --data
    with pytest.raises(SystemExit):
        demo.main(["--data", str(shard), "--vae", "x/y", "--train-vae"])
    with pytest.raises(SystemExit):  # --aspects is the shapes demo's; own shards take --buckets in data prep
        demo.main(["--data", str(shard), "--aspects", "--out", str(tmp_path / "o")])
    assert not (tmp_path / "o").exists()


def test_demo_data_split_is_seeded_and_reused(tmp_path, capsys):
    from helpers_data import make_image_shards

    from lct.demo_data import heldout_captions, split

    pattern = make_image_shards(tmp_path / "in", n_shards=2, per_shard=20, size=8)
    train, held = split(pattern, tmp_path / "d")
    import webdataset as wds

    keys = lambda p: [s["__key__"] for s in wds.WebDataset(p + "/00000.tar", shardshuffle=False)]
    k_train, k_held = keys(train), keys(held)
    assert len(k_held) == 4 and len(k_train) == 36 and not set(k_train) & set(k_held)
    assert split(pattern, tmp_path / "d") == (train, held) and "reusing" in capsys.readouterr().out
    assert heldout_captions(held, tmp_path / "c.jsonl", 3) == 3
    rows = [json.loads(l) for l in (tmp_path / "c.jsonl").read_text().splitlines()]
    assert [r["key"] for r in rows] == k_held[:3] and all(r["caption"] for r in rows)


@pytest.mark.slow
@pytest.mark.proc
@pytest.mark.skipif(not os.environ.get("LCT_TEST_DEMO_DATA"), reason="opt-in (several minutes): LCT_TEST_DEMO_DATA=1")
def test_demo_data_on_digits_end_to_end(tmp_path):
    pytest.importorskip("sklearn")
    import subprocess

    digits = tmp_path / "digits"
    subprocess.run([sys.executable, str(ROOT / "data_prep" / "make_digits.py"), "--output", str(digits)], check=True)
    out = tmp_path / "demo"
    subprocess.run([sys.executable, "-m", "lct.demo", "--data", str(digits / "train" / "*.tar"), "--heldout",
                    str(digits / "heldout" / "*.tar"), "--quick", "--out", str(out), "--metric",
                    "lct.eval.digits_metric:DigitAccuracy", "--metric-arg",
                    f"classifier={digits / 'classifier.safetensors'}"], check=True, cwd=tmp_path)
    summary = json.loads((out / "demo_summary.json").read_text())
    assert [r["steps"] for r in summary["settings"]] == [1, 2]
    for r in summary["settings"]:
        assert 0 <= r["digits"] <= 1 and 0 <= r["coverage"] <= 1 and Path(r["grid"]).is_file()
    assert (out / "vae" / "reconstructions.png").is_file()
