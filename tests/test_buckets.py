"""Aspect-ratio buckets, data side (issue 33): tables (PixArt's from diffusers, YAML), nearest-ratio
assignment against diffusers' binning, the resize-to-cover + centre-crop geometry against PixArt's
torchvision transform, square shards byte for byte as before `--buckets`, and a bucketed encode of
`make_shapes --aspects` data with a tiny AutoencoderKL (manifest records, statistics, sample
checks, independence of batch size, workers, ranks and a kill)."""

import base64
import hashlib
import io
import json
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import ROOT
from helpers_data import make_tiny_vae, read_latent_dir, run_forked, square_golden_inputs, tiny_encode_args
from lct.buckets import PIXART_TABLES, Bucket, BucketTable, cover_crop, load_table, resize_crop
from lct.errors import UserError
from lct.latents import load_manifest

GOLDEN = ROOT / "tests" / "data" / "square_golden.json"
ASPECTS = [(5, 3), (1, 1), (3, 5)]


def encode(argv):
    from lct.data_prep.encode_latents import main

    return main(argv)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# ----------------------------------------------------------------------------------------------
# Tables and assignment
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(PIXART_TABLES))
def test_pixart_tables_are_diffusers_and_bin_like_its_pipelines(name):
    import importlib

    from diffusers.image_processor import PixArtImageProcessor

    module, const = PIXART_TABLES[name]
    ref = getattr(importlib.import_module(module), const)
    table = load_table(name)
    assert [[b.height, b.width] for b in table.buckets] == [[int(h), int(w)] for h, w in ref.values()]
    assert table.base == int(name.split("_")[1]) and table.buckets[table.base_index].name == f"{table.base}x{table.base}"
    assert all(abs(b.ratio - b.height / b.width) < 0.006 for b in table.buckets)
    # The bucket of any image is the one diffusers' pipelines bin that size to.
    for h in range(40, 3000, 97):
        for w in range(40, 3000, 89):
            b = table.buckets[table.assign(h, w)]
            assert (b.height, b.width) == PixArtImageProcessor.classify_height_width_bin(h, w, ref)


def test_user_tables_from_yaml(tmp_path):
    (tmp_path / "list.yaml").write_text("- [256, 256]\n- [192, 320]\n- [320, 192]\n")
    (tmp_path / "map.yaml").write_text("buckets: [[256, 256], [192, 320], [320, 192]]\n")
    a, b = load_table(str(tmp_path / "list.yaml")), load_table(str(tmp_path / "map.yaml"))
    assert a.buckets == b.buckets and a.names == ["256x256", "192x320", "320x192"] and a.base == 256
    assert [a.assign(*hw) for hw in ((100, 100), (90, 160), (160, 90), (3, 1000))] == [0, 1, 2, 1]
    assert load_table("shapes_32").names == ["32x32", "24x40", "40x24"]


@pytest.mark.parametrize("text, needle", [
    ("- [256, 256]\n- [256]\n", "pairs of positive integers"),
    ("- [256, 0]\n", "pairs of positive integers"),
    ("- [256.5, 256]\n", "pairs of positive integers"),
    ("{a: 1}\n", "pairs of positive integers"),
    ("[]\n", "empty"),
    ("- [256, 256]\n- [512, 512]\n", "same aspect ratio"),
    ("- [256, 256\n", "cannot read"),
])
def test_bad_tables_are_one_line_errors_naming_the_flag(tmp_path, text, needle):
    p = tmp_path / "t.yaml"
    p.write_text(text)
    with pytest.raises(UserError) as err:
        load_table(str(p))
    assert needle in str(err.value) and str(err.value).startswith(f"--buckets {p}") and "\n" not in str(err.value)
    with pytest.raises(UserError, match="neither a table name .*pixart_512.*nor a YAML file"):
        load_table("pixart_384")


def test_tie_breaking_is_table_order():
    t = BucketTable((Bucket(10, 20, 0.5), Bucket(20, 10, 1.5)), "t")
    assert t.assign(1, 1) == 0  # ratio 1.0 is 0.5 from both: the first wins
    assert BucketTable(t.buckets[::-1], "t").assign(1, 1) == 0  # ... whichever it is


# ----------------------------------------------------------------------------------------------
# Geometry
# ----------------------------------------------------------------------------------------------


def pixart_transform(img: Image.Image, closest_size: list[int]) -> np.ndarray:
    """PixArt-alpha's InternalDataMS.getdata transform up to ToTensor, verbatim in its logic."""
    import torchvision.transforms as T
    from torchvision.transforms.functional import InterpolationMode

    ori_h, ori_w = img.height, img.width
    if closest_size[0] / ori_h > closest_size[1] / ori_w:
        resize_size = closest_size[0], int(ori_w * closest_size[0] / ori_h)
    else:
        resize_size = int(ori_h * closest_size[1] / ori_w), closest_size[1]
    t = T.Compose([T.Lambda(lambda im: im.convert("RGB")), T.Resize(resize_size, interpolation=InterpolationMode.BICUBIC),
                   T.CenterCrop(closest_size)])
    return np.asarray(t(img))


def test_resize_crop_is_pixart_training_geometry():
    rng = np.random.default_rng(0)
    table = load_table("pixart_256")
    sizes = [(300, 200), (200, 300), (256, 256), (97, 401), (640, 480), (480, 640), (33, 35), (1000, 250),
             (251, 1003), (512, 384)]
    for h, w in sizes:
        img = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        b = table.buckets[table.assign(h, w)]
        got, crop = resize_crop(img, b)
        assert got.dtype == torch.uint8 and tuple(got.shape) == (3, b.height, b.width)
        np.testing.assert_array_equal(got.permute(1, 2, 0).numpy(), pixart_transform(img, [b.height, b.width]))
        (rh, rw), (top, left), frac = cover_crop(h, w, b)
        assert rh >= b.height and rw >= b.width and (rh == b.height or rw == b.width)
        assert frac == pytest.approx(1 - b.height * b.width / (rh * rw)) and crop == frac
        assert (top, left) == (round((rh - b.height) / 2), round((rw - b.width) / 2))
    # An image of the bucket's own size is untouched; one of its ratio is only resized.
    img = Image.fromarray(rng.integers(0, 256, (192, 320, 3), dtype=np.uint8))
    same, crop = resize_crop(img, Bucket(192, 320, 0.6))
    np.testing.assert_array_equal(same.permute(1, 2, 0).numpy(), np.asarray(img))
    assert crop == 0.0 and cover_crop(384, 640, Bucket(192, 320, 0.6)) == ((192, 320), (0, 0), 0.0)
    # A 2:1 image in a square bucket loses half its area, cut equally left and right.
    assert cover_crop(100, 200, Bucket(50, 50, 1.0)) == ((50, 100), (0, 25), 0.5)


# ----------------------------------------------------------------------------------------------
# Square shards: byte for byte what the encoder wrote before --buckets
# ----------------------------------------------------------------------------------------------


def tar_members_of(path):
    with tarfile.open(path) as t:
        return {m.name: t.extractfile(m).read() for m in t.getmembers()}


def test_square_shards_are_byte_identical_to_the_encoder_before_buckets(tmp_path):
    """tests/data/square_golden.json holds what data_prep/encode_latents.py wrote at 605ee6f (before
    --buckets) for these inputs. With the same torch/diffusers/Pillow/numpy/open_clip, CPU
    capability and thread count (an environment it records) the shards must be the same bytes;
    elsewhere (another conv kernel may move a float16 rounding) every member but the latents must
    still be the same bytes and the latents within 1e-3."""
    import diffusers
    import open_clip
    import PIL

    golden = json.loads(GOLDEN.read_text())
    pattern, vae = square_golden_inputs(tmp_path / "in")
    out = tmp_path / "lat"
    assert encode(tiny_encode_args(pattern, out, vae, batch_size=2, extra=["--flip"])) == 0
    versions = {"torch": torch.__version__, "diffusers": diffusers.__version__, "pillow": PIL.__version__,
                "numpy": np.__version__, "open_clip": open_clip.__version__}
    env = f"{torch.backends.cpu.get_cpu_capability()}/{torch.get_num_threads()}"
    tars = {p.name: p for p in sorted(out.glob("*.tar"))}
    assert sorted(tars) == sorted(golden["files_by_env"]["AVX512/1"])
    if versions == golden["versions"] and env in golden["files_by_env"]:
        assert {n: hashlib.sha256(p.read_bytes()).hexdigest() for n, p in tars.items()} == golden["files_by_env"][env]
    got = {f"{n}/{m}": data for n, p in tars.items() for m, data in tar_members_of(p).items()}
    assert sorted(got) == sorted(golden["members"])  # the same members in the same shards
    for name, data in got.items():
        want = golden["members"][name]
        if name.endswith(".npy"):
            a, b = np.load(io.BytesIO(data)), np.load(io.BytesIO(base64.b64decode(want)))
            assert a.dtype == b.dtype and a.shape == b.shape, name
            if name.endswith("tokens.npy") or (versions == golden["versions"] and env == golden["members_env"]):
                np.testing.assert_array_equal(a, b, err_msg=name)
            else:
                np.testing.assert_allclose(a.astype(np.float32), b.astype(np.float32), atol=1e-3, err_msg=name)
        else:
            assert hashlib.sha256(data).hexdigest() == want, name
    m = json.loads((out / "manifest.json").read_text())
    assert "buckets" not in m and "buckets" not in m["options"] and "positions" not in m["stats"]


# ----------------------------------------------------------------------------------------------
# Bucketed encode of make_shapes --aspects data
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def aspect_data(tmp_path_factory):
    """2 shards of 6 shapes on 5:3, 1:1 and 3:5 canvases (32 px), the square set of the same seed,
    a tiny 4x VAE, and their encode with --buckets shapes_32 --flip (batch 2)."""
    from lct.data_prep.make_shapes import write_split

    base = tmp_path_factory.mktemp("buckets")
    write_split(base / "ar", "train", 12, 32, 6, seed=3, aspects=ASPECTS, progress=False)
    write_split(base / "sq", "train", 12, 32, 6, seed=3, progress=False)
    vae = make_tiny_vae(base / "vae", latent_channels=4, downsample=4)
    out = base / "lat"
    argv = tiny_encode_args(str(base / "ar" / "{00000..00001}.tar"), out, vae, resolution=32, batch_size=2,
                            extra=["--buckets", "shapes_32", "--flip"])  # --resolution: the table's base, accepted
    assert encode(argv) == 0
    return {"base": base, "vae": vae, "out": out, "argv": argv,
            "manifest": json.loads((out / "manifest.json").read_text()),
            "records": [json.loads(line) for line in (base / "ar" / "captions.jsonl").read_text().splitlines()]}


def test_make_shapes_aspects_keep_captions_and_positions_in_canvas_coordinates(aspect_data, tmp_path):
    from lct import shapes
    from lct.data_prep.make_shapes import canvas, main

    base, recs = aspect_data["base"], aspect_data["records"]
    assert (base / "ar" / "captions.txt").read_text() == (base / "sq" / "captions.txt").read_text()
    square = [json.loads(line) for line in (base / "sq" / "captions.jsonl").read_text().splitlines()]
    assert [{k: v for k, v in r.items() if k != "canvas"} for r in recs] == square  # keys, captions, specs
    canvases = {canvas(32, a) for a in ASPECTS}
    assert canvases == {(41, 25), (32, 32), (25, 41)}
    assert {tuple(r["canvas"]) for r in recs} <= canvases and len({tuple(r["canvas"]) for r in recs}) == 3
    settings = json.loads((base / "ar" / "shapes.json").read_text())
    assert settings["aspects"] == ["5:3", "1:1", "3:5"]
    assert "aspects" not in json.loads((base / "sq" / "shapes.json").read_text())  # square sets unchanged
    with tarfile.open(base / "ar" / "00000.tar") as t:
        names = [m.name for m in t.getmembers()]
        for r in recs[:6]:
            img = Image.open(io.BytesIO(t.extractfile(f"{r['key']}.png").read()))
            meta = json.loads(t.extractfile(f"{r['key']}.json").read())
            assert img.size == tuple(r["canvas"]) == (meta["width"], meta["height"])
            spec = shapes.ShapeSpec.from_dict(r["spec"])
            got = shapes.detect_shape(img)  # the position word holds in the canvas's own thirds
            assert (got.colour, got.cell) == (spec.colour, spec.cell)
            assert shapes.parse_caption(r["caption"]).cell == spec.cell
    assert len(names) == 18
    # A square canvas given as (width, height) draws the same pixels as the square size.
    spec = shapes.ShapeSpec.from_dict(recs[0]["spec"])
    assert shapes.render(spec, (32, 32)).tobytes() == shapes.render(spec, 32).tobytes()
    with pytest.raises(UserError, match=r"--aspects '4x3': expected width:height"):
        main(["--output", str(tmp_path / "x"), "--num", "2", "--aspects", "4x3"])
    assert not (tmp_path / "x").exists()  # refused before any work


def test_bucketed_manifest_records(aspect_data):
    m, recs, out = aspect_data["manifest"], aspect_data["records"], aspect_data["out"]
    b = m["buckets"]
    assert [t["name"] for t in b["table"]] == ["32x32", "24x40", "40x24"]
    assert [t["latent_shape"] for t in b["table"]] == [[4, 8, 8], [4, 6, 10], [4, 10, 6]]
    assert b["source"] == "shapes_32" and b["base_resolution"] == 32 and "get_closest_ratio" in b["assign"]
    bucket_of = {(32, 32): "32x32", (41, 25): "24x40", (25, 41): "40x24"}  # canvas (w, h) -> bucket
    want = {n: sum(1 for r in recs if bucket_of[tuple(r["canvas"])] == n) for n in bucket_of.values()}
    assert b["counts"] == want and sum(want.values()) == m["num_samples"] == 12
    assert b["most_common"] == max(want, key=lambda n: (want[n], -list(want).index(n)))
    assert b["crop"]["max"] == 0.0 and b["crop"]["share"]["<= 0"] == 1.0  # canvases of the buckets' ratios
    assert m["latent_shape"] == [4, 8, 8] and m["resolution"] == 32 and m["options"]["buckets"]["source"] == "shapes_32"
    assert m["format"] == "lct-latents/2"  # an lct without buckets refuses it in one line instead of misreading it
    assert load_manifest(out)["buckets"]["counts"] == b["counts"]
    assert m["preprocess"].startswith("RGB, the bucket of nearest aspect ratio")
    samples = read_latent_dir(out)
    names = [t["name"] for t in b["table"]]
    # The input's keys in the input's order, though each batch holds one bucket.
    assert [k for got in samples.values() for k in got] == [r["key"] for r in recs]
    for shard in m["shards"]:
        got = samples[shard["name"]]
        keys = list(got)
        assert [names[i] for i in shard["sample_buckets"]] == [got[k]["bucket"] for k in keys]
        assert shard["bucket_counts"] == {n: c for n in names if (c := sum(got[k]["bucket"] == n for k in keys))}
        for k in keys:
            s = got[k]
            shape = next(t["latent_shape"] for t in b["table"] if t["name"] == s["bucket"])
            assert list(s["mean"].shape) == list(s["flip_mean"].shape) == shape and s["crop"] == 0.0
            assert s["bucket"] == bucket_of[(s["meta"]["width"], s["meta"]["height"])]


def test_bucketed_statistics_are_per_channel_over_every_position(aspect_data):
    from lct.latents import latent_stats
    from lct.vae import LatentNorm

    m, out = aspect_data["manifest"], aspect_data["out"]
    names = [t["name"] for t in m["buckets"]["table"]]
    sums = {k: np.zeros((3, 4)) for k in ("sum_mean", "sum_mean_sq", "sum_var")}
    positions = np.zeros(3, dtype=np.int64)
    for shard, got in sorted(read_latent_dir(out).items()):
        for s in got.values():  # the writer's order: shard by shard, samples in order
            i = names.index(s["bucket"])
            mm, sd = s["mean"].astype(np.float64), s["std"].astype(np.float64)
            sums["sum_mean"][i] += mm.sum(axis=(1, 2))
            sums["sum_mean_sq"][i] += (mm * mm).sum(axis=(1, 2))
            sums["sum_var"][i] += (sd * sd).sum(axis=(1, 2))
            positions[i] += mm.shape[1] * mm.shape[2]
    st = m["stats"]
    assert st["count"] == 12 and st["positions"] == int(positions.sum()) and st["shape"] == [4]
    for k, v in sums.items():
        assert st[k] == (v[0] + v[1] + v[2]).tolist()  # exactly: float64 sums in the same order
        for i, n in enumerate(names):
            if positions[i]:
                assert st["per_bucket"][n][k] == v[i].tolist()
    mean, std = latent_stats(m, "channel")
    n = positions.sum()
    exp_mean = sums["sum_mean"].sum(0) / n
    np.testing.assert_allclose(mean.reshape(-1), exp_mean, rtol=1e-12)
    np.testing.assert_allclose(std.reshape(-1) ** 2, sums["sum_mean_sq"].sum(0) / n - exp_mean ** 2
                               + sums["sum_var"].sum(0) / n, rtol=1e-10)
    assert LatentNorm.from_manifest(m, "channel").sigma_data == 0.5
    with pytest.raises(UserError, match="latent_norm element: bucketed latents .* use data.latent_norm channel"):
        latent_stats(m, "element")


def test_bucketed_latents_equal_a_direct_vae_encode(aspect_data):
    from diffusers import AutoencoderKL

    from lct.vae import open_image, to_rgb, to_unit_range

    base, out = aspect_data["base"], aspect_data["out"]
    table = load_table("shapes_32")
    vae = AutoencoderKL.from_pretrained(aspect_data["vae"]).eval()
    samples = read_latent_dir(out)
    with tarfile.open(base / "ar" / "00001.tar") as t:
        for key, s in samples["00001"].items():
            img = to_rgb(open_image(t.extractfile(f"{key}.png").read()))
            i = table.assign(img.height, img.width)
            assert table.names[i] == s["bucket"]
            u8, _ = resize_crop(img, table.buckets[i])
            x = to_unit_range(u8[None])
            with torch.no_grad():
                d = vae.encode(torch.cat([x, x.flip(-1)])).latent_dist
            np.testing.assert_allclose(s["mean"].astype(np.float32), d.mean[0].numpy(), atol=2e-3, rtol=1e-3)
            np.testing.assert_allclose(s["flip_std"].astype(np.float32), d.std[1].numpy(), atol=2e-3, rtol=1e-3)


def test_sample_checks_use_each_samples_bucket(aspect_data, tmp_path):
    from helpers_data import tampered_latent_dir

    from lct.data import InMemoryLatents, describe_data
    from lct.latents import SampleLayout, check_latent_sample

    m, out = aspect_data["manifest"], aspect_data["out"]
    layout = SampleLayout.from_manifest(m)
    assert dict(layout.buckets) == {"32x32": (4, 8, 8), "24x40": (4, 6, 10), "40x24": (4, 10, 6)}
    mem = InMemoryLatents(sorted(str(p) for p in out.glob("*.tar")), layout)
    assert len(mem) == 12 and not mem.skipped
    s = dict(mem.samples[0])
    other = next(n for n, _ in layout.buckets if n != s["bucket"])
    assert check_latent_sample({**s, "bucket": other}, layout)[0] == "wrong_shape"
    assert "not in the data's bucket table" in check_latent_sample({**s, "bucket": "7x7"}, layout)[1]
    assert "no bucket" in check_latent_sample({k: v for k, v in s.items() if k != "bucket"}, layout)[1]
    assert check_latent_sample(s, layout.core()) is None
    # A sample whose latents are not its bucket's shape is skipped and counted by the reader.
    def swap_bucket(members):
        j = json.loads(members["json"])
        j["bucket"] = "24x40" if j["bucket"] != "24x40" else "40x24"
        return {**members, "json": json.dumps(j).encode()}
    bad = tampered_latent_dir(out, tmp_path / "bad", "00000", {0: swap_bucket})
    mem = InMemoryLatents(sorted(str(p) for p in bad.glob("*.tar")), layout, quiet=True)
    assert len(mem) == 11 and mem.skipped == {"wrong_shape": 1}
    d = describe_data(m)
    assert d.latent_shape == (4, 8, 8) and [b[:2] for b in d.buckets] == [(n, s) for n, s in layout.buckets]
    assert d.largest_shape == (4, 8, 8) and d.most_common[0] == max(m["buckets"]["counts"], key=m["buckets"]["counts"].get)


def test_bucketed_encode_refusals(aspect_data, tmp_path):
    pattern = str(aspect_data["base"] / "ar" / "00000.tar")
    vae = aspect_data["vae"]
    with pytest.raises(UserError, match=r"--resolution 16 and --buckets shapes_32 \(base resolution 32\) disagree"):
        encode(tiny_encode_args(pattern, tmp_path / "a", vae, extra=["--buckets", "shapes_32"]))
    assert not (tmp_path / "a").exists()
    odd = tmp_path / "odd.yaml"
    odd.write_text("- [30, 30]\n- [20, 42]\n")
    args = tiny_encode_args(pattern, tmp_path / "b", vae, extra=["--buckets", str(odd)])
    args = args[:args.index("--resolution")] + args[args.index("--resolution") + 2:]
    with pytest.raises(UserError, match=r"bucket\(s\) 30x30, 20x42 are not multiples of the VAE's downsampling factor 4"):
        encode(args)
    assert not list((tmp_path / "b").glob("*.tar"))


@pytest.mark.proc
def test_bucketed_output_does_not_depend_on_batches_workers_ranks_or_a_kill(aspect_data, tmp_path):
    """Batches hold one bucket and the writer restores the input order: batch size 1 with two
    workers, two ranks without a process group, and a kill mid-shard then a rerun all write the
    same shards and the same manifest numbers as the fixture's run."""
    ref_out, argv = aspect_data["out"], aspect_data["argv"]
    ref = {p.name: p.read_bytes() for p in sorted(ref_out.glob("*.tar"))}

    def same(out):
        assert {p.name: p.read_bytes() for p in sorted(out.glob("*.tar"))} == ref
        m = json.loads((out / "manifest.json").read_text())
        for k in ("stats", "buckets", "num_samples"):
            assert m[k] == aspect_data["manifest"][k], k
        assert [s["sample_buckets"] for s in m["shards"]] == [s["sample_buckets"] for s in aspect_data["manifest"]["shards"]]

    def with_out(out, **kw):
        a = list(argv)
        a[a.index("--output") + 1] = str(out)
        for flag, v in kw.items():
            a[a.index(flag) + 1] = v
        return a

    assert encode(with_out(tmp_path / "w", **{"--batch-size": "1", "--num-workers": "2"})) == 0
    same(tmp_path / "w")
    assert run_forked(with_out(tmp_path / "r"), [{"RANK": str(r), "WORLD_SIZE": "2"} for r in (0, 1)]) == [0, 0]
    same(tmp_path / "r")
    assert run_forked(with_out(tmp_path / "k"), [{"LCT_FAULT_EXIT_MID_SHARD": "0"}]) == [137]
    assert not list((tmp_path / "k").glob("*.tar")) and list((tmp_path / "k").glob("00000.tar.*.tmp"))
    assert encode(with_out(tmp_path / "k")) == 0
    same(tmp_path / "k")


# ----------------------------------------------------------------------------------------------
# Trainer side: one bucket per optimizer step (lct.buckets.BucketPlan)
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("counts,G", [([50, 30, 7], 8), ([5, 0, 3, 1], 4), ([3, 2], 16)])
def test_bucket_plan_shares_passes_and_remainders(counts, G):
    """Through bucket epoch E bucket b has had exactly ceil((E+1) n_b / G) steps, so its share of
    the steps is n_b / n up to one step per epoch, its local steps count 0, 1, 2, ... in step
    order, and every pass of the bucket is complete by the end of epoch E (no sample dropped)."""
    from lct.buckets import BucketPlan

    plan = BucketPlan(counts, G, seed=5)
    E = 6
    steps = [plan.step(s) for s in range(plan.steps_before(E))]
    for b, n_b in enumerate(counts):
        local = [j for bb, j in steps if bb == b]
        assert local == list(range(-(-E * n_b // G)))
        assert len(local) * G >= E * n_b > (len(local) - 1) * G if n_b else not local
    # The order within an epoch is drawn (seeded): another seed, another order, same counts.
    other = [BucketPlan(counts, G, seed=6).step(s)[0] for s in range(len(steps))]
    assert sorted(other) == sorted(b for b, _ in steps) and (other != [b for b, _ in steps] or len(set(other)) == 1)
    # A fresh plan (a resume) at any step gives the same draw as one that stepped there.
    assert [BucketPlan(counts, G, seed=5).step(s) for s in range(len(steps) - 1, -1, -3)] == steps[::-1][::3]


def test_bucket_draw_is_proportional_to_the_data():
    from lct.buckets import BucketPlan

    counts, G = [600, 300, 100], 32
    plan = BucketPlan(counts, G, seed=0)
    n = plan.steps_before(40)
    got = np.bincount([plan.step(s)[0] for s in range(n)], minlength=3) / n
    np.testing.assert_allclose(got, np.array(counts) / 1000, atol=0.01)


def bucket_spec_for(m, rank=0, world=1, micro=4, accum=1, mode="indexed"):
    from lct.buckets import bucket_spec
    from lct.data import DataSpec, expand_urls
    from lct.latents import SampleLayout
    from lct.vae import LatentNorm

    urls = expand_urls(str(m["_dir"]))
    return DataSpec(urls=urls, mode=mode, seed=3, rank=rank, world_size=world, micro_batch=micro, accum=accum,
                    latent_shape=tuple(m["latent_shape"]), norm=LatentNorm.from_manifest(m, "channel"),
                    caption_dropout=0.1, flip=True, text="on_the_fly", ot=True, layout=SampleLayout.from_manifest(m),
                    **bucket_spec(m))


def train_batches(spec, start, steps):
    from lct.data import TrainBatches

    return list(TrainBatches(spec, start, steps))


def test_indexed_bucket_batches_ranks_resume_and_passes(aspect_data):
    """Each step is one bucket on every rank and micro-batch (the same samples on 1 or 2 ranks
    and with accumulation), OT within it, a resumed loader gives the same batches, and each pass
    of a bucket visits every one of its samples once."""
    m = {**aspect_data["manifest"], "_dir": aspect_data["out"]}
    one = train_batches(bucket_spec_for(m, micro=4), 0, 12)
    shapes = {n: tuple(s) for n, s in ((t["name"], t["latent_shape"]) for t in m["buckets"]["table"])}
    for b in one:
        assert b["x"].shape[1:] == shapes[b["bucket"]] and b["z"].shape == b["x"].shape
    split = [train_batches(bucket_spec_for(m, rank=r, world=2, micro=1, accum=2), 0, 12) for r in (0, 1)]
    for s, b in enumerate(one):
        parts = split[0][2 * s: 2 * s + 2] + split[1][2 * s: 2 * s + 2]
        assert {p["bucket"] for p in parts} == {b["bucket"]}
        assert sum((p["keys"] for p in parts), []) == b["keys"]
        assert torch.equal(torch.cat([p["x"] for p in parts]), b["x"])
    resumed = train_batches(bucket_spec_for(m, micro=4), 5, 7)
    for a, b in zip(resumed, one[5:]):
        assert a["keys"] == b["keys"] and torch.equal(a["x"], b["x"]) and torch.equal(a["z"], b["z"])
    # Passes: the positions of each bucket, in step order, run through its samples once per pass.
    counts = m["buckets"]["counts"]
    for name, n_b in counts.items():
        keys = [k for b in one if b["bucket"] == name for k in b["keys"]]
        for start in range(0, len(keys) - n_b + 1, n_b):
            assert len(set(keys[start:start + n_b])) == n_b, name
    assert {b["bucket"] for b in one} == {n for n, c in counts.items() if c}


def test_stream_bucket_batches_hold_one_bucket(aspect_data):
    m = {**aspect_data["manifest"], "_dir": aspect_data["out"]}
    spec = bucket_spec_for(m, micro=3, mode="stream")
    from lct.buckets import BucketPlan

    from lct.data import InMemoryLatents

    bucket_of = {x["key"]: x["bucket"] for x in InMemoryLatents(spec.urls, spec.layout).samples}
    plan = BucketPlan(spec.bucket_counts, 3, 3)
    for s, b in enumerate(train_batches(spec, 0, 10)):
        assert b["bucket"] == spec.buckets[plan.step(s)[0]] and b["x"].shape[0] == 3
        assert {bucket_of[k] for k in b["keys"]} == {b["bucket"]}


def test_stream_bucket_queues_are_bounded_and_count_what_they_pass_over():
    """Shards that group samples by shape (here 600 of bucket a, then b): waiting for b holds at
    most max(data.shuffle_buffer, 256) samples of a, passes over the oldest and counts them."""
    from types import SimpleNamespace

    from lct.buckets import QUEUE_FULL, BucketQueues

    stream = iter([{"bucket": "a", "i": i} for i in range(600)] + [{"bucket": "b", "i": i} for i in range(600)])
    counts: dict[str, int] = {}
    q = BucketQueues(stream, ("a", "b"), SimpleNamespace(shuffle_buffer=10, bucket_counts=(600, 600)), counts)
    assert q.next(1) == {"bucket": "b", "i": 0}  # read with 256 held: one more a passed over
    assert q.held == 255 and counts == {QUEUE_FULL: 600 - 255}
    assert q.next(0) == {"bucket": "a", "i": 600 - 255}  # the newest 255 of a were kept, oldest first
    assert [q.next(1)["i"] for _ in range(3)] == [1, 2, 3] and q.held == 254 and counts[QUEUE_FULL] == 345


def test_square_data_has_no_bucket_plan(latent_data):
    from lct.buckets import bucket_spec
    from lct.data import describe_data
    from lct.latents import load_manifest

    m = load_manifest(latent_data["train"] / "manifest.json")
    assert bucket_spec(m) == {} and describe_data(m).buckets == () and describe_data(m).most_common is None


def test_element_statistics_are_refused_with_buckets_in_one_line(aspect_data):
    from types import SimpleNamespace

    from lct.preflight import check_bucketed_norm

    cfg = SimpleNamespace(data=SimpleNamespace(latent_norm="element"))
    with pytest.raises(UserError, match=r"^data.latent_norm element: bucketed latents .* use data.latent_norm channel$"):
        check_bucketed_norm(cfg, aspect_data["manifest"])
    check_bucketed_norm(SimpleNamespace(data=SimpleNamespace(latent_norm="channel")), aspect_data["manifest"])


@pytest.mark.slow
@pytest.mark.multiproc
def test_bucketed_run_under_deepspeed_resumes_bitwise_and_exports_each_aspect(aspect_data, tmp_path, capsys):
    """Three aspect ratios under `deepspeed --num_gpus 2` with OT and the early-step term (iLCT):
    a run killed after its step-2 checkpoint and resumed trains the same losses and weights, bit
    for bit, as an uninterrupted one; its export generates each trained aspect (default: the most
    common bucket) and records the table."""
    from conftest import run_cmd, tiny_train_config
    from test_multirank import deepspeed_cmd
    from test_runs import model_of, rows, state_of

    from lct.buckets import BucketPlan, bucket_spec
    from lct.pipeline import LCTPipeline

    data = {"train": aspect_data["out"], "heldout": aspect_data["out"]}

    def config(name):
        return tiny_train_config(tmp_path / name, data, run={"dir": str(tmp_path / name / "run"), "total_steps": 6,
                                                             "save_every": 2, "log_every": 1, "seed": 0, "keep_last": 5},
                                 optim={"batch_size": 4}, sample={"every": 6, "num": 2},
                                 val={"every": 6, "batch_size": 8, "buckets": 4})

    env = {"OMP_NUM_THREADS": "1"}
    ref = run_cmd([*deepspeed_cmd(), "--config", str(config("ref"))], env=env)
    assert ref.returncode == 0, ref.stderr[-3000:]
    cut = config("cut")
    run = tmp_path / "cut" / "run"
    killed = run_cmd([*deepspeed_cmd(), "--config", str(cut)], env={**env, "LCT_FAULT_EXIT_AFTER_SAVE": "2"})
    assert killed.returncode != 0 and state_of(run)["applied_steps"] == 2, killed.stderr[-3000:]
    resumed = run_cmd([*deepspeed_cmd(), "--config", str(cut)], env=env)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a, b = rows(tmp_path / "ref" / "run"), rows(run)
    assert [r["step"] for r in b] == list(range(1, 7)) and [r["loss"] for r in a] == [r["loss"] for r in b]
    wa, wb = model_of(tmp_path / "ref" / "run" / "checkpoints/step00000006"), model_of(run / "checkpoints/step00000006")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    assert state_of(run)["images_seen"] == 6 * 4  # data.batch_size: images per step, whatever the bucket
    (val,) = rows(run, "val")  # validation of each aspect bucket, the most common first
    names = [n for n, _ in sorted(aspect_data["manifest"]["buckets"]["counts"].items(), key=lambda kv: -kv[1])]
    assert list(val["by_aspect"]) == names and all(v["n"] > 0 and v["recon_mse_mean"] > 0 for v in val["by_aspect"].values())
    assert val["recon_mse_mean"] == val["by_aspect"][names[0]]["recon_mse_mean"]
    m = aspect_data["manifest"]
    spec = bucket_spec(m)
    plan = BucketPlan(spec["bucket_counts"], 4, 0)
    assert {plan.step(s)[0] for s in range(6)} == {0, 1, 2}  # every bucket trained in these 6 steps
    # The export: each trained aspect, the most common by default, another size refused.
    pipe = LCTPipeline.from_pretrained(str(run / "export" / "ema"))
    pipe.set_progress_bar_config(disable=True)
    counts = m["buckets"]["counts"]
    sizes = pipe.config.sizes
    assert sorted(map(tuple, sizes)) == sorted((t["size"][0], t["size"][1]) for t in m["buckets"]["table"])
    assert counts[f"{sizes[0][0]}x{sizes[0][1]}"] == max(counts.values())
    for h, w in sizes:
        img = pipe(["a red circle"], height=h, width=w, seed=0, output_type="np").images
        assert img.shape == (1, h, w, 3) and np.isfinite(img).all() and img.std() > 0
    assert pipe(["a red circle"], seed=0, output_type="np").images.shape[1:3] == tuple(sizes[0])
    with pytest.raises(ValueError, match="trained at"):
        pipe(["a red circle"], height=48, width=24)
    record = json.loads((run / "export" / "ema" / "lct_export.json").read_text())
    assert record["buckets"]["counts"] == counts and [t["name"] for t in record["buckets"]["table"]] == \
        [t["name"] for t in m["buckets"]["table"]]
    assert list((run / "samples").glob("step00000006_*step.png"))  # grids at the most common bucket
    # eval --aspect: another bucket's images, scored by the shapes metric in their own coordinates.
    import sys

    caps = aspect_data["base"] / "ar" / "captions.jsonl"
    args = [sys.executable, str(ROOT / "eval" / "clip_fid.py"), "--protocol", "custom", "--checkpoint", str(run),
            "--captions", str(caps), "--num-samples", "3", "--steps", "1", "--metrics", "shapes", "--batch-size", "3",
            "--device", "cpu"]
    h, w = sizes[-1]
    proc = run_cmd([*args, "--out", str(tmp_path / "eval"), "--aspect", f"{h}x{w}"], env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert r["resolution"]["generated_size"] == [h, w] and r["settings"][0]["metrics"]["shapes3"]["n"] == 3
    assert r["shapes_ceiling"]["vae_reconstruction"]["size"] == [h, w]  # the ceiling on the same canvas
    assert Image.open(tmp_path / "eval" / "steps1_g1" / "000000.png").size == (w, h)
    from lct.errors import cli_main  # the refusal, in this process (a process costs its imports)
    from lct.eval import clip_fid

    with pytest.raises(SystemExit) as exc:
        cli_main(clip_fid.main, [*args[2:], "--out", str(tmp_path / "e2"), "--aspect", "48x24"])
    assert exc.value.code == 2
    assert "--aspect 48x24: height 48, width 24: this model was trained at" in capsys.readouterr().err


def test_dry_run_memory_inputs_take_the_largest_bucket():
    from types import SimpleNamespace

    from lct.data import DataDescription
    from lct.dry_run import meta_inputs

    desc = DataDescription((4, 8, 8), buckets=(("32x32", (4, 8, 8), 5), ("24x48", (4, 6, 12), 1),
                                               ("48x24", (4, 12, 6), 0), ("40x40", (4, 10, 10), 0)))
    cfg = SimpleNamespace(model=SimpleNamespace(cond="none"))
    with torch.device("meta"):
        x, _, _ = meta_inputs(cfg, desc, 2)
    assert tuple(x.shape) == (2, 4, 6, 12)  # 72 > 64 positions; an empty bucket is never drawn
    assert desc.most_common == ("32x32", (4, 8, 8)) and DataDescription().largest_shape == (4, 32, 32)
