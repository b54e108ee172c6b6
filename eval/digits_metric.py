"""Caption accuracy on the digits data set: a user metric for `eval/clip_fid.py --metric`, and the
worked example of README "Your own metric".

    python eval/clip_fid.py --protocol custom --checkpoint RUN --captions data/digits/heldout/captions.jsonl \
        --ref-images 'data/digits/heldout/*.tar' --metrics none \
        --metric lct.eval.digits_metric:DigitAccuracy --metric-arg classifier=data/digits/classifier.safetensors

A small CNN trained on the real training images (`train_classifier`, run by
`data_prep/make_digits.py`, which saves it beside the shards) reads the digit of each sample; the
metric is the share of samples whose digit is the one their caption names ("a handwritten digit
seven" -> 7), with chance (0.1) and the classifier's accuracy on the real held-out images (the
ceiling a perfect generator reaches) beside it. `caption_accuracy = True`, so eval reports
precision/recall/coverage beside it (`lct.prdc`): a model drawing one averaged digit per caption
reads right and covers little.

The Metric protocol (`lct.metrics.Metric`) in five parts: `name`, `width`, `record`,
`rows(images, metric_images, captions)` per batch, `result(rows, out_dir, main)` once per setting
over all rows in sample order, `line(key, m)` for the console; built as `DigitAccuracy(ctx)` with
an `lct.metrics.MetricContext`.

As a script it scores a folder that `python -m lct.sample` or eval wrote (PNGs + captions.jsonl):

    python eval/digits_metric.py --classifier data/digits/classifier.safetensors --samples samples/
"""

if __name__ == "__main__" and __package__ in (None, ""):  # run as a file: repo root, not this folder, first on sys.path
    import sys, pathlib; sys.path[0] = str(pathlib.Path(__file__).resolve().parents[1])



import json
import re
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from lct.metrics import MetricContext, Unavailable

WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
FORMAT = "lct-digit-classifier/1"


def caption(label: int) -> str:
    return f"a handwritten digit {WORDS[label]}"


def caption_label(text: str) -> int | None:
    """The digit a caption names (a number word or a single digit), None when it names none or several."""
    found = {WORDS.index(w) for w in re.findall(r"[a-z]+", text.lower()) if w in WORDS}
    found |= {int(d) for d in re.findall(r"(?<!\d)\d(?!\d)", text)}
    return found.pop() if len(found) == 1 else None


class DigitCNN(nn.Module):
    """Three 3x3 conv blocks (16, 32, 64 channels) on grayscale, global average pool, 10 logits."""

    def __init__(self):
        super().__init__()
        def block(i, o):
            return nn.Sequential(nn.Conv2d(i, o, 3, padding=1), nn.BatchNorm2d(o), nn.ReLU())
        self.body = nn.Sequential(block(1, 16), nn.MaxPool2d(2), block(16, 32), nn.MaxPool2d(2), block(32, 64))
        self.head = nn.Linear(64, 10)

    def forward(self, x):
        return self.head(self.body(x).mean(dim=(2, 3)))


def to_input(images_u8: np.ndarray | torch.Tensor, size: int) -> torch.Tensor:
    """uint8 [B,H,W,3] (or [B,H,W]) -> float [B,1,size,size] in [0, 1], grayscale."""
    x = torch.as_tensor(np.asarray(images_u8)).float() / 255.0
    x = x.mean(-1) if x.ndim == 4 else x
    x = x[:, None]
    if x.shape[-1] != size:
        x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return x


INPUT_SIZE = 16  # the digits are 8x8 scans: 16 px keeps all they hold at a quarter of 32 px's cost


def train_classifier(images_u8: np.ndarray, labels: np.ndarray, epochs: int = 20, seed: int = 0,
                     batch_size: int = 64, size: int = INPUT_SIZE) -> DigitCNN:
    """On `size` px grayscale; Adam 3e-3 with cosine decay, random shifts of up to 1/16 of the
    side; deterministic on CPU for a given thread count."""
    g = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = DigitCNN()
    x, y = to_input(images_u8, size), torch.as_tensor(labels, dtype=torch.long)
    pad = max(1, size // 16)
    steps = epochs * ((len(x) + batch_size - 1) // batch_size)
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    net.train()
    for _ in range(epochs):
        perm = torch.randperm(len(x), generator=g)
        for i in range(0, len(x), batch_size):
            idx = perm[i:i + batch_size]
            xb = F.pad(x[idx], (pad,) * 4)
            dx, dy = torch.randint(0, 2 * pad + 1, (2,), generator=g).tolist()
            xb = xb[..., dy:dy + size, dx:dx + size]
            loss = F.cross_entropy(net(xb), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    return net.eval()


@torch.no_grad()
def predict(net: DigitCNN, images_u8, size: int, batch_size: int = 256) -> np.ndarray:
    x = to_input(images_u8, size)
    return np.concatenate([net(x[i:i + batch_size]).argmax(1).numpy() for i in range(0, len(x), batch_size)]) \
        if len(x) else np.zeros(0, dtype=np.int64)


def save_classifier(net: DigitCNN, path: str | Path, size: int, heldout_accuracy: float, heldout_n: int) -> None:
    from safetensors.torch import save_file

    meta = {"format": FORMAT, "size": str(size), "heldout_accuracy": repr(float(heldout_accuracy)),
            "heldout_n": str(heldout_n), "labels": json.dumps(list(WORDS))}
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(path), metadata=meta)


def load_classifier(path: str | Path) -> tuple[DigitCNN, dict]:
    """(network, metadata) of a `save_classifier` file (safetensors: no code is unpickled)."""
    from safetensors import safe_open

    path = Path(path).expanduser()
    if not path.is_file():
        raise Unavailable(f"digit classifier {path} not found",
                          "pass --metric-arg classifier=DIR/classifier.safetensors (written by data_prep/make_digits.py)")
    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
        state = {k: f.get_tensor(k) for k in f.keys()}
    if meta.get("format") != FORMAT:
        raise Unavailable(f"{path} is not a digit classifier of data_prep/make_digits.py ({meta.get('format')!r})",
                          "pass the classifier.safetensors that make_digits.py wrote")
    net = DigitCNN()
    net.load_state_dict(state)
    return net.eval(), meta


class DigitAccuracy:
    """Share of samples showing the digit their caption names (module docstring)."""

    name = "digits"
    width = 2                # per sample: the caption's digit (-1: names none), the classifier's reading
    caption_accuracy = True  # eval adds precision/recall/coverage beside it

    def __init__(self, ctx: MetricContext):
        if "classifier" not in ctx.options:
            raise Unavailable("the digits metric needs its classifier",
                              "pass --metric-arg classifier=DIR/classifier.safetensors (data_prep/make_digits.py)")
        self.net, meta = load_classifier(ctx.options["classifier"])
        self.size = int(meta["size"])
        self.ceiling = {"real_heldout_accuracy": float(meta["heldout_accuracy"]), "n": int(meta["heldout_n"])}
        named = sum(caption_label(c) is not None for c in ctx.captions)
        if 2 * named <= len(ctx.captions):
            raise Unavailable(f"only {named} of {len(ctx.captions)} captions name one digit: the digits metric is for "
                              "the digits data set", "use the held-out captions.jsonl of data_prep/make_digits.py")
        path = Path(ctx.options["classifier"]).expanduser().resolve()
        self.record = {"name": "lct.eval.digits_metric.DigitAccuracy (CNN trained on the real training images)",
                       "weights": str(path), "weights_sha256": _sha256(path), "input_size": self.size}

    def rows(self, images, metric_images, captions):
        want = [caption_label(c) for c in captions]
        got = predict(self.net, images, self.size)
        return torch.tensor([[-1 if w is None else w, g] for w, g in zip(want, got)], dtype=torch.float64)

    def result(self, rows, out_dir, main):
        want, got = rows[:, 0].long().numpy(), rows[:, 1].long().numpy()
        named = want >= 0
        acc = float((want[named] == got[named]).mean()) if named.any() else None
        per_digit = {WORDS[d]: float((got[want == d] == d).mean()) for d in range(10) if (want == d).any()}
        return {"metric": self.name, "value": acc, "accuracy": acc, "n_scored": int(named.sum()), "chance": 0.1,
                "ceiling": self.ceiling, "per_digit": per_digit,
                "predicted_counts": np.bincount(got, minlength=10).tolist(),
                "label": f"digit accuracy over {int(named.sum())} of {len(want)} captions (classifier on the real "
                         f"images; real held-out images score {self.ceiling['real_heldout_accuracy']:.3f})",
                "model": self.record}

    def line(self, key, m):
        return (f"{key}: digit accuracy {m['accuracy']:.3f} (chance 0.100, real held-out images "
                f"{m['ceiling']['real_heldout_accuracy']:.3f})")


def _sha256(path: Path) -> str:
    from lct.files import file_sha256

    return file_sha256(path)


def main(argv: list[str] | None = None) -> int:
    import argparse

    from PIL import Image

    from lct.dist import DistInfo
    from lct.errors import UserError
    from lct.protocols import read_captions

    p = argparse.ArgumentParser(prog="eval/digits_metric.py",
                                description="Digit accuracy of a samples folder (PNGs + captions.jsonl with file, caption).")
    p.add_argument("--classifier", required=True, help="classifier.safetensors of data_prep/make_digits.py")
    p.add_argument("--samples", required=True, help="a folder written by python -m lct.sample or eval/clip_fid.py")
    args = p.parse_args(argv)
    folder = Path(args.samples)
    if not (folder / "captions.jsonl").is_file():
        raise UserError(f"--samples {folder}: no captions.jsonl (a folder of lct.sample or eval/clip_fid.py)")
    rows = [json.loads(l) for l in (folder / "captions.jsonl").read_text().splitlines() if l.strip()]
    caps = [r["caption"] for r in read_captions(folder / "captions.jsonl")]
    ctx = MetricContext(caps, rows, 0, torch.device("cpu"), DistInfo(), options={"classifier": args.classifier})
    metric = DigitAccuracy(ctx)
    images = np.stack([np.asarray(Image.open(folder / r["file"]).convert("RGB")) for r in rows])
    m = metric.result(metric.rows(images, None, caps), folder, True)
    print(metric.line(f"digits{len(rows)}", m))
    return 0


if __name__ == "__main__":
    from lct.errors import cli_main

    cli_main(main)
