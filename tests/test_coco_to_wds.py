"""data_prep/coco_to_wds.py on a fake COCO 2014 tree: bytes kept, captions, split rule, resume."""

import io
import json
import os
import tarfile
from pathlib import Path

import numpy as np
import pytest

from lct.errors import UserError


def fake_coco(root: Path) -> dict[int, bytes]:
    """train2014 with 5 images (ids 9, 3, 25, 7, 12; id 12 has no file on disk), val2014 with 2."""
    from PIL import Image

    rng = np.random.default_rng(0)
    files = {}
    (root / "annotations").mkdir(parents=True)
    for split, ids in (("train2014", [9, 3, 25, 7, 12]), ("val2014", [42, 5])):
        (root / split).mkdir()
        images, anns = [], []
        for n, i in enumerate(ids):
            name = f"COCO_{split}_{i:012d}.jpg"
            w, h = 20 + n, 16
            images.append({"id": i, "file_name": name, "width": w, "height": h})
            for j in range(5):  # annotation ids out of order: captions are sorted by annotation id
                anns.append({"id": 1000 * i + (5 - j), "image_id": i, "caption": f" img {i} caption {5 - j}\n"})
            if i == 12:
                continue
            buf = io.BytesIO()
            Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(buf, format="JPEG", quality=80)
            (root / split / name).write_bytes(buf.getvalue())
            files[i] = buf.getvalue()
        (root / "annotations" / f"captions_{split}.json").write_text(
            json.dumps({"images": images, "annotations": anns[::-1]}))
    return files


def read_tar(path: Path) -> dict[str, bytes]:
    with tarfile.open(path) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers()}


def test_coco_train2014_to_shards_and_resume(tmp_path):
    from lct.data_prep.coco_to_wds import main

    files = fake_coco(tmp_path / "coco")
    out = tmp_path / "shards"
    argv = ["--input", str(tmp_path / "coco"), "--split", "train2014", "--output", str(out), "--samples-per-shard", "2"]
    assert main(argv) == 0
    assert sorted(p.name for p in out.glob("*.tar")) == ["00000.tar", "00001.tar", "00002.tar"]
    s0, s2 = read_tar(out / "00000.tar"), read_tar(out / "00002.tar")
    assert sorted(s0) == ["000000000003.jpg", "000000000003.json", "000000000003.txt",
                          "000000000007.jpg", "000000000007.json", "000000000007.txt"]  # sorted by image id
    assert s0["000000000003.jpg"] == files[3]  # original bytes
    meta = json.loads(s0["000000000007.json"])
    assert meta["captions"] == [f"img 7 caption {k}" for k in range(1, 6)] and meta["image_id"] == 7
    assert s0["000000000007.txt"].decode() == "img 7 caption 1" == meta["caption"]
    assert (meta["width"], meta["height"], meta["split"], meta["file_name"]) == (23, 16, "train2014", "COCO_train2014_000000000007.jpg")
    assert [k for k in s2 if k.endswith(".jpg")] == ["000000000025.jpg"]  # id 12 (no file) skipped
    stats = json.loads((out / "stats.json").read_text())
    assert stats["images"] == 4 and stats["missing"] == 1 and stats["written"] == 3
    lines = [json.loads(l) for l in (out / "captions.jsonl").read_text().splitlines()]
    assert [l["image_id"] for l in lines] == [3, 7, 9, 25]
    # resume: complete shards are kept as they are, a partial one is redone
    mtimes = {p.name: p.stat().st_mtime_ns for p in out.glob("*.tar")}
    (out / "00001.tar").unlink()
    (out / ".00001.tar.tmp").write_bytes(b"partial")
    assert main(argv) == 0
    assert not list(out.glob(".*.tmp"))
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.tar") if p.name != "00001.tar"} == \
        {k: v for k, v in mtimes.items() if k != "00001.tar"}
    assert sorted(k for k in read_tar(out / "00001.tar") if k.endswith(".jpg")) == ["000000000009.jpg"]
    assert json.loads((out / "stats.json").read_text())["already_complete"] == 2
    with pytest.raises(UserError, match="other settings"):
        main([*argv[:-1], "3"])


def test_coco_split_rule(tmp_path):
    from lct.data_prep.coco_to_wds import main

    fake_coco(tmp_path / "coco")
    for split in ("train2017", "val2017", "test2014"):
        with pytest.raises(UserError, match="val2014") as err:
            main(["--input", str(tmp_path / "coco"), "--split", split, "--output", str(tmp_path / split)])
        assert "train2014" in str(err.value)
    assert not (tmp_path / "train2017").exists()
    assert main(["--input", str(tmp_path / "coco"), "--split", "val2014", "--output", str(tmp_path / "val"),
                 "--samples-per-shard", "10"]) == 0
    keys = sorted(k for k in read_tar(tmp_path / "val" / "00000.tar") if k.endswith(".jpg"))
    assert keys == ["000000000005.jpg", "000000000042.jpg"]
    with pytest.raises(UserError, match="captions_val2014.json"):
        os.remove(tmp_path / "coco" / "annotations" / "captions_val2014.json")
        main(["--input", str(tmp_path / "coco"), "--split", "val2014", "--output", str(tmp_path / "v2")])


def test_coco_shards_encode_with_all_captions(tmp_path):
    import torch

    from helpers_data import make_tiny_vae, read_latent_dir, tiny_encode_args
    from lct.data_prep.coco_to_wds import main as coco
    from lct.data_prep.encode_latents import main as encode

    fake_coco(tmp_path / "coco")
    coco(["--input", str(tmp_path / "coco"), "--split", "val2014", "--output", str(tmp_path / "val")])
    vae = make_tiny_vae(tmp_path / "vae")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        encode(tiny_encode_args(str(tmp_path / "val" / "00000.tar"), tmp_path / "lat", vae, extra=["--max-captions", "4"]))
    finally:
        torch.set_num_threads(threads)
    s = read_latent_dir(tmp_path / "lat")["00000"]["000000000042"]
    assert s["captions"] == [f"img 42 caption {k}" for k in range(1, 5)] and s["tokens"].shape == (4, 77)
    assert s["meta"]["image_id"] == 42 and len(s["meta"]["captions"]) == 5


def test_file_names_outside_the_image_folder_are_refused(tmp_path):
    """An annotation file cannot pack other files of the machine: an absolute path, a `..`
    component or a symlink out of the folder is refused before anything is written."""
    from lct.data_prep.coco_to_wds import main

    fake_coco(tmp_path / "coco")
    secret = tmp_path / "secret.txt"
    secret.write_text("do not pack me")
    (tmp_path / "coco" / "train2014" / "link.jpg").symlink_to(secret)
    ann = tmp_path / "coco" / "annotations" / "captions_train2014.json"
    original = json.loads(ann.read_text())
    for i, name in enumerate([str(secret), "../../secret.txt", "link.jpg", "sub/../../../secret.txt"]):
        data = json.loads(json.dumps(original))
        data["images"][1]["file_name"] = name
        ann.write_text(json.dumps(data))
        out = tmp_path / f"out{i}"
        with pytest.raises(UserError, match=f"image {data['images'][1]['id']} has file_name"):
            main(["--input", str(tmp_path / "coco"), "--split", "train2014", "--output", str(out)])
        assert not out.exists() or not list(out.iterdir())
    # a symlink to an image inside the folder is fine
    (tmp_path / "coco" / "train2014" / "alias.jpg").symlink_to(tmp_path / "coco" / "train2014" /
                                                              original["images"][0]["file_name"])
    data = json.loads(json.dumps(original))
    data["images"][1]["file_name"] = "alias.jpg"
    ann.write_text(json.dumps(data))
    assert main(["--input", str(tmp_path / "coco"), "--split", "train2014", "--output", str(tmp_path / "ok")]) == 0
