"""A small real data set as img2dataset-style shards: scikit-learn's bundled handwritten digits.

    pip install scikit-learn            # ships the data (1,797 images, 8x8, 17 grey levels): no download
    python data_prep/make_digits.py --output data/digits --size 32

The UCI "Optical Recognition of Handwritten Digits" test set (43 writers) that
`sklearn.datasets.load_digits` ships inside the package, so it loads offline; real images the
project does not make, for trying lct on your own data (`python -m lct.demo --data`, README).

Output (`--output`):

    train/00000.tar ...        per sample `{key}.png` (RGB, white digit on black, upscaled from 8x8
                               with PIL bicubic to --size), `{key}.txt` ("a handwritten digit seven"),
                               `{key}.json` {key, caption, label, index (row of load_digits), split,
                               width, height}
    heldout/00000.tar ...      the held-out split (a stratified `--heldout-fraction`, seeded)
    */captions.jsonl           {key, caption, label} per line, in key order (eval reads these)
    classifier.safetensors     a small CNN trained on the train split's images
                               (`lct.eval.digits_metric`), for the caption-accuracy metric
                               `--metric lct.eval.digits_metric:DigitAccuracy`; its accuracy on the
                               held-out images is in digits.json and in the file's metadata
    digits.json                the settings and counts; a rerun with other settings is refused

A rerun with the same settings writes the same bytes (fixed tar mtime/owner, PNG without time
stamps) and skips what is complete.
"""

if __name__ == "__main__" and __package__ in (None, ""):  # run as a file: repo root, not this folder, first on sys.path
    import sys, pathlib; sys.path[0] = str(pathlib.Path(__file__).resolve().parents[1])

import io
import json
from pathlib import Path

from pydantic import Field

from lct import rng as lct_rng
from lct.config import Strict
from lct.errors import UserError, cli_main
from lct.files import atomic_file, output_dir_problem, write_atomic, write_json
from lct.tool_config import cli_config

FORMAT_VERSION = 1


class MakeDigitsConfig(Strict):
    output: str = Field(..., description="output directory (train/, heldout/, classifier.safetensors)")
    size: int = Field(32, ge=8, le=512, description="image side in pixels (upscaled from 8x8, bicubic)")
    heldout_fraction: float = Field(0.15, gt=0, lt=1, description="stratified share held out")
    samples_per_shard: int = Field(500, ge=1)
    seed: int = Field(0, ge=0, description="split and classifier seed")
    classifier_epochs: int = Field(20, ge=1, description="epochs of the caption-accuracy classifier")


def load_digits_data():
    """(images uint8 [N,8,8] on 0..255, labels [N]) of scikit-learn's bundled digits."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise UserError("make_digits needs scikit-learn, which ships the digits: pip install scikit-learn") from None
    import numpy as np

    d = load_digits()
    return np.rint(d.images * (255.0 / 16.0)).astype(np.uint8), d.target.astype(np.int64)


def render(img8, size: int):
    from PIL import Image

    return Image.fromarray(img8, "L").resize((size, size), Image.BICUBIC).convert("RGB")


def _png(img) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=False, compress_level=6)
    return buf.getvalue()


def split_indices(labels, fraction: float, seed: int):
    """(train, heldout) row indices: stratified by digit, seeded, each sorted."""
    import numpy as np

    rng = lct_rng.philox(lct_rng.Stream.DIGITS_SPLIT, seed)
    train, held = [], []
    for d in range(10):
        rows = np.flatnonzero(labels == d)
        rows = rows[rng.permutation(len(rows))]
        k = int(round(len(rows) * fraction))
        held += rows[:k].tolist()
        train += rows[k:].tolist()
    return sorted(train), sorted(held)


def write_split(out: Path, split: str, rows: list[int], images, labels, size: int, per_shard: int) -> list[dict]:
    import webdataset as wds

    from lct.eval.digits_metric import caption

    out.mkdir(parents=True, exist_ok=True)
    records = []
    for s in range(0, len(rows), per_shard):
        final = out / f"{s // per_shard:05d}.tar"
        chunk = rows[s:s + per_shard]
        metas = [{"key": f"{s // per_shard:05d}{j:04d}", "caption": caption(int(labels[r])), "label": int(labels[r]),
                  "index": int(r), "split": split, "width": size, "height": size} for j, r in enumerate(chunk)]
        records += [{k: m[k] for k in ("key", "caption", "label")} for m in metas]
        if final.is_file():
            continue
        with atomic_file(final) as stream:
            w = wds.TarWriter(stream, encoder=False, mtime=0.0, user="lct", group="lct", mode=0o644)
            for r, m in zip(chunk, metas):
                w.write({"__key__": m["key"], "png": _png(render(images[r], size)), "txt": m["caption"].encode(),
                         "json": json.dumps(m, sort_keys=True).encode()})
            w.close()
    write_atomic(out / "captions.jsonl", "".join(json.dumps(r, sort_keys=True) + "\n" for r in records))
    return records


def main(argv: list[str] | None = None) -> int:
    cfg, _ = cli_config(MakeDigitsConfig, argv, prog="make_digits",
                        description="Write scikit-learn's bundled handwritten digits as captioned webdataset shards.")
    out = Path(cfg.output)
    problem = output_dir_problem(out, "--output")
    if problem:
        raise UserError(problem)
    settings = {"format": FORMAT_VERSION, "source": "sklearn.datasets.load_digits", **cfg.model_dump(exclude={"output"})}
    info_path = out / "digits.json"
    if info_path.is_file():
        old = json.loads(info_path.read_text())
        if old.get("settings") != settings:
            raise UserError(f"--output {out} holds digits made with other settings; use another --output or delete it")
        if (out / "classifier.safetensors").is_file():
            print(f"make_digits: {out} is complete (held-out classifier accuracy "
                  f"{old.get('classifier_heldout_accuracy'):.3f}); nothing to do")
            return 0
    elif out.is_dir() and any(out.iterdir()):
        raise UserError(f"--output {out} is a non-empty folder without digits.json; use another --output")

    import numpy as np
    import torch

    from lct.eval.digits_metric import INPUT_SIZE, predict, save_classifier, train_classifier

    images, labels = load_digits_data()
    train, held = split_indices(labels, cfg.heldout_fraction, cfg.seed)
    out.mkdir(parents=True, exist_ok=True)
    write_json(info_path, {"settings": settings})  # first: a rerun with other settings is refused
    for split, rows in (("train", train), ("heldout", held)):
        write_split(out / split, split, rows, images, labels, cfg.size, cfg.samples_per_shard)
    print(f"make_digits: {len(train)} train and {len(held)} held-out images of {cfg.size}px -> {out}", flush=True)

    def pix(rows):
        return np.stack([np.asarray(render(images[r], cfg.size)) for r in rows])

    threads = torch.get_num_threads()
    torch.set_num_threads(min(threads, 2))
    try:
        net = train_classifier(pix(train), labels[train], epochs=cfg.classifier_epochs, seed=cfg.seed)
    finally:
        torch.set_num_threads(threads)
    acc = float((predict(net, pix(held), INPUT_SIZE) == labels[held]).mean())
    save_classifier(net, out / "classifier.safetensors", INPUT_SIZE, acc, len(held))
    write_json(info_path, {"settings": settings, "train": len(train), "heldout": len(held),
                           "classifier_heldout_accuracy": acc,
                           "metric": "--metric lct.eval.digits_metric:DigitAccuracy --metric-arg "
                                     f"classifier={(out / 'classifier.safetensors').resolve()}"})
    print(f"make_digits: caption classifier: held-out accuracy {acc:.3f} -> {out / 'classifier.safetensors'}")
    return 0


def cli() -> None:
    cli_main(main)


if __name__ == "__main__":
    cli()
