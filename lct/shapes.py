"""The embedded default data set: one coloured shape on a pale background, with captions that state it.

The README demo trains a text-to-image consistency model on CPU in minutes on these images and then
measures whether 1-step samples follow their captions (the `shapes` metric below).

What an image shows (one foreground shape per image):

* colour: one of `PALETTE` (8 common colour names, far apart in RGB and all far from the pale
  backgrounds; white and grey are left out because they would vanish into the background). The
  drawn colour is the palette colour plus a uniform integer jitter of at most `COLOUR_JITTER`
  per channel, so the nearest palette colour of a drawn shape is always its own (the palette's
  minimum pairwise distance is 71, the jitter moves a colour by at most 21):

  ======  ===============
  name    RGB
  ======  ===============
  red     (220, 30, 30)
  orange  (245, 130, 20)
  yellow  (240, 215, 25)
  green   (30, 150, 50)
  blue    (30, 80, 220)
  purple  (130, 50, 180)
  pink    (240, 105, 180)
  black   (25, 25, 25)
  ======  ===============

* shape: `SHAPES` = circle, square, triangle (apex up), diamond (a square on its corner).
* size: `SIZES` = small (extent 0.17 of the image side) or large (0.27), each times a uniform
  factor in `SIZE_JITTER` (extent = diameter / bounding-box side; a square's side is 0.88 extent).
  At the demo's 32 px a small shape is about 5 px, more than one cell of a 4x-downsampling VAE's
  latent (at 0.13, 4 px, the demo's 1-step samples got the colour of small shapes right only 36 %
  of the time against 84 % for large ones).
* position: one of the 9 cells of a 3x3 grid (`CELLS`, index = 3 * row + column, row 0 = top,
  column 0 = left). The shape lies inside its cell shrunk by `CELL_MARGIN` on every side; its
  centre is uniformly jittered within what that leaves, so small shapes move more than large ones.
* background: a flat pale tint, each RGB channel uniform in `BACKGROUND_RANGE` = [215, 255].

Shapes are drawn at 4x the output size and box-downsampled (antialiased, deterministic).

Randomness: every sample `i` of a split draws from its own generator,
`numpy.random.default_rng(SeedSequence([seed, SPLITS[split], i]))` (train = 0, heldout = 1), so the
held-out split never uses a seed of the train split, and any sample can be regenerated alone
(`make_sample`). The generator draws the spec first, then the captions.

Captions (`caption`, `captions`) fill one of `TEMPLATES` with the size, colour, shape and one of the
cell's `POSITION_PHRASES`, e.g. "a large red circle in the top left corner", "small blue triangle
at the bottom", "in the middle, a small black diamond". `parse_caption` reads the colour, cell,
shape and size back from any of them.

The `shapes` metric (`shapes_metric`, per image `detect_shape`): estimate the background as the
per-channel median of the border pixels, mark as foreground the pixels whose RGB distance to the
background exceeds max(40, half of the image's 99.5th-percentile distance), keep the connected
foreground component with the largest total distance (robust to stray specks of generated images),
take its centroid's 3x3 cell as the position and the per-channel median of its core pixels
(distance >= 0.75 of the component's 99th-percentile distance) as its colour, classified to the
nearest palette colour. The shape (`classify_outline`): each pixel's coverage is its share of the
way from the background to that palette colour; every shape's template, drawn with `render`'s
geometry at the coverage map's area and centroid (so only the outline differs) and blurred by the
best of `TEMPLATE_BLURS` (autoencoder reconstructions and samples are softer than renders), is
compared with the map by the sum of squared differences, and the closest wins. On the held-out
renders at 32 px it is right for every image; on an autoencoder's reconstructions it is right as
often as the reconstruction keeps the outline (README: the demo reports both ceilings beside the
samples' accuracy). Accepted image forms are listed in `lct.grids.images_to_uint8`.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, NamedTuple, Sequence

import numpy as np
from PIL import Image, ImageDraw

# --------------------------------------------------------------------------------------------
# Vocabulary
# --------------------------------------------------------------------------------------------

PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "orange": (245, 130, 20),
    "yellow": (240, 215, 25),
    "green": (30, 150, 50),
    "blue": (30, 80, 220),
    "purple": (130, 50, 180),
    "pink": (240, 105, 180),
    "black": (25, 25, 25),
}
COLOURS: tuple[str, ...] = tuple(PALETTE)
COLOUR_JITTER = 12  # per channel, uniform integer in [-12, 12]

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond")

SIZES: dict[str, float] = {"small": 0.17, "large": 0.27}  # extent, fraction of the image side
SIZE_JITTER = (0.9, 1.08)

CELLS: tuple[str, ...] = ("top left", "top", "top right", "left", "center", "right",
                          "bottom left", "bottom", "bottom right")
CELL_MARGIN = 0.02  # fraction of the image side kept free inside each cell edge

BACKGROUND_RANGE = (215, 255)  # per channel, uniform integer, inclusive

SPLITS: dict[str, int] = {"train": 0, "heldout": 1}

POSITION_PHRASES: tuple[tuple[str, ...], ...] = (
    ("in the top left corner", "at the top left", "in the upper left"),
    ("at the top", "at the top center", "in the upper middle"),
    ("in the top right corner", "at the top right", "in the upper right"),
    ("on the left", "at the left side", "in the middle left"),
    ("in the center", "in the middle", "at the center"),
    ("on the right", "at the right side", "in the middle right"),
    ("in the bottom left corner", "at the bottom left", "in the lower left"),
    ("at the bottom", "at the bottom center", "in the lower middle"),
    ("in the bottom right corner", "at the bottom right", "in the lower right"),
)

TEMPLATES: tuple[str, ...] = (
    "{a} {size} {colour} {shape} {where}",
    "{size} {colour} {shape} {where}",
    "there is {a} {size} {colour} {shape} {where}",
    "{where}, {a} {size} {colour} {shape}",
    "a drawing of {a} {size} {colour} {shape} {where}",
    "{a} {size} {shape} in {colour} {where}",
)

CHANCE_COLOUR = 1.0 / len(PALETTE)
CHANCE_POSITION = 1.0 / len(CELLS)
CHANCE_SHAPE = 1.0 / len(SHAPES)


# --------------------------------------------------------------------------------------------
# Specs and rendering
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ShapeSpec:
    """Everything needed to draw one image (coordinates are fractions of the image side)."""

    colour: str                      # key of PALETTE
    shape: str                       # one of SHAPES
    size: str                        # key of SIZES
    cell: int                        # 0..8, 3 * row + column
    cx: float                        # shape centre (bounding box), 0 = left edge
    cy: float                        # 0 = top edge
    extent: float                    # diameter / bounding-box side
    rgb: tuple[int, int, int]        # drawn colour (palette colour + jitter)
    background: tuple[int, int, int]
    scale: str = "side"              # extent of: "side" the canvas's short side, "area" sqrt(width * height)

    @property
    def cell_name(self) -> str:
        return CELLS[self.cell]

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        if self.scale == "side":  # the records of data sets made before `scale` stay the same bytes
            del d["scale"]
        d["rgb"], d["background"] = list(self.rgb), list(self.background)
        d["cell_name"] = self.cell_name
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ShapeSpec":
        names = cls.__dataclass_fields__
        kw = {k: v for k, v in d.items() if k in names}
        kw["rgb"], kw["background"] = tuple(kw["rgb"]), tuple(kw["background"])
        return cls(**kw)


def sample_rng(seed: int, split: str, index: int) -> np.random.Generator:
    """The generator of sample `index` of `split`: SeedSequence([seed, SPLITS[split], index])."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r} (known: {', '.join(SPLITS)})")
    return np.random.default_rng(np.random.SeedSequence([int(seed), SPLITS[split], int(index)]))


def sample_spec(rng: np.random.Generator) -> ShapeSpec:
    """Draw one spec (colour, shape, size, cell uniformly; then jitters; values rounded to 1e-4)."""
    colour = COLOURS[rng.integers(len(COLOURS))]
    shape = SHAPES[rng.integers(len(SHAPES))]
    size = tuple(SIZES)[rng.integers(len(SIZES))]
    cell = int(rng.integers(len(CELLS)))
    extent = round(SIZES[size] * float(rng.uniform(*SIZE_JITTER)), 4)
    row, col = divmod(cell, 3)
    slack = max(0.0, (1.0 / 3.0 - 2 * CELL_MARGIN - extent) / 2)
    cx = round((col + 0.5) / 3 + float(rng.uniform(-slack, slack)), 4)
    cy = round((row + 0.5) / 3 + float(rng.uniform(-slack, slack)), 4)
    base = np.array(PALETTE[colour])
    rgb = np.clip(base + rng.integers(-COLOUR_JITTER, COLOUR_JITTER + 1, size=3), 0, 255)
    bg = rng.integers(BACKGROUND_RANGE[0], BACKGROUND_RANGE[1] + 1, size=3)
    return ShapeSpec(colour=colour, shape=shape, size=size, cell=cell, cx=cx, cy=cy, extent=extent,
                     rgb=tuple(int(v) for v in rgb), background=tuple(int(v) for v in bg))


def render(spec: ShapeSpec, size: int | tuple[int, int] = 64, supersample: int = 4) -> Image.Image:
    """Draw `spec` as an RGB image of `size` x `size` pixels, or on a (width, height) canvas
    (drawn at `supersample`x, box-filtered). On a canvas the centre is a fraction of each side
    (the 3x3 cells are the canvas's own thirds) and the extent a fraction of the short side
    (`spec.scale` "side"), or of sqrt(width * height) ("area": a shape has the same pixel size on
    every canvas of one area; its centre is then moved, by at most the overhang, so that the shape
    stays on the canvas)."""
    width, height = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
    sw, sh = width * supersample, height * supersample
    img = Image.new("RGB", (sw, sh), spec.background)
    draw = ImageDraw.Draw(img)
    cx, cy, h = spec.cx * sw, spec.cy * sh, spec.extent * min(sw, sh) / 2
    if spec.scale == "area":
        h = spec.extent * math.sqrt(sw * sh) / 2
        cx, cy = min(max(cx, h), sw - h), min(max(cy, h), sh - h)
    fill = tuple(spec.rgb)
    if spec.shape == "circle":
        draw.ellipse([cx - h, cy - h, cx + h, cy + h], fill=fill)
    elif spec.shape == "square":
        q = 0.88 * h
        draw.rectangle([cx - q, cy - q, cx + q, cy + q], fill=fill)
    elif spec.shape == "triangle":
        draw.polygon([(cx, cy - h), (cx + h, cy + h), (cx - h, cy + h)], fill=fill)
    elif spec.shape == "diamond":
        draw.polygon([(cx, cy - h), (cx + h, cy), (cx, cy + h), (cx - h, cy)], fill=fill)
    else:
        raise ValueError(f"unknown shape {spec.shape!r} (known: {', '.join(SHAPES)})")
    if supersample == 1:
        return img
    return img.resize((width, height), Image.Resampling.BOX)


# --------------------------------------------------------------------------------------------
# Captions
# --------------------------------------------------------------------------------------------


def _article(word: str) -> str:
    return "an" if word[:1] in "aeiou" else "a"


def format_caption(spec: ShapeSpec, template: int = 0, phrase: int = 0) -> str:
    """Caption of `spec` with `TEMPLATES[template]` and `POSITION_PHRASES[spec.cell][phrase]`."""
    t = TEMPLATES[template]
    first = t.split("{a} ", 1)[1].split(" ", 1)[0] if "{a}" in t else ""
    first = {"{size}": spec.size, "{colour}": spec.colour, "{shape}": spec.shape}.get(first, "x")
    return t.format(a=_article(first), size=spec.size, colour=spec.colour, shape=spec.shape,
                    where=POSITION_PHRASES[spec.cell][phrase])


def caption(spec: ShapeSpec, rng: np.random.Generator | None = None) -> str:
    """A caption stating colour, shape, size and position; without `rng` the canonical form
    ("a large red circle in the top left corner"), with `rng` a random template and phrase."""
    if rng is None:
        return format_caption(spec)
    return format_caption(spec, int(rng.integers(len(TEMPLATES))),
                          int(rng.integers(len(POSITION_PHRASES[spec.cell]))))


def captions(spec: ShapeSpec, rng: np.random.Generator, k: int = 3) -> list[str]:
    """`k` distinct random phrasings of the same spec (the first one is the sample's main caption)."""
    combos = [(t, p) for t in range(len(TEMPLATES)) for p in range(len(POSITION_PHRASES[spec.cell]))]
    pick = rng.choice(len(combos), size=min(k, len(combos)), replace=False)
    return [format_caption(spec, *combos[int(i)]) for i in pick]


_WORD = re.compile(r"[a-z]+")
_ROWS = {"top": 0, "upper": 0, "bottom": 2, "lower": 2}
_COLS = {"left": 0, "right": 2}
_CENTRE = {"center", "centre", "middle", "central"}


class Stated(NamedTuple):
    """What a caption states (None for what it does not)."""

    colour: str | None
    cell: int | None
    shape: str | None
    size: str | None


def parse_caption(text: str) -> Stated:
    """(colour, cell, shape, size) stated by a caption; None for what it does not state.

    The colour, shape and size are the first palette, `SHAPES` and `SIZES` words. The row is top
    for 'top'/'upper', bottom for 'bottom'/'lower', else middle; the column is left/right for
    'left'/'right', else middle; a caption with none of these words nor 'center'/'centre'/'middle'
    has no cell.
    """
    words = _WORD.findall(text.lower())
    colour = next((w for w in words if w in PALETTE), None)
    shape = next((w for w in words if w in SHAPES), None)
    size = next((w for w in words if w in SIZES), None)
    row = next((_ROWS[w] for w in words if w in _ROWS), None)
    col = next((_COLS[w] for w in words if w in _COLS), None)
    if row is None and col is None and not _CENTRE.intersection(words):
        return Stated(colour, None, shape, size)
    return Stated(colour, 3 * (1 if row is None else row) + (1 if col is None else col), shape, size)


def make_spec(seed: int, split: str, index: int, num_captions: int = 3) -> tuple[ShapeSpec, list[str]]:
    """(spec, captions) of sample `index` of `split`, without drawing it."""
    rng = sample_rng(seed, split, index)
    spec = sample_spec(rng)
    return spec, captions(spec, rng, num_captions)


def read_specs(path: str | Path, n: int | None = None) -> list[ShapeSpec] | None:
    """The specs of the first `n` records of a `captions.jsonl` written by make_shapes (the
    ground truth of those captions), or None when the file is not one (any record without a spec)."""
    import json

    p = Path(path)
    if p.suffix.lower() != ".jsonl" or not p.is_file():
        return None
    specs = []
    for line in p.read_text(encoding="utf-8").splitlines():
        if n is not None and len(specs) >= n:
            break
        if not line.strip():
            continue
        rec = json.loads(line)
        if not isinstance(rec, dict) or not isinstance(rec.get("spec"), dict):
            return None
        specs.append(ShapeSpec.from_dict(rec["spec"]))
    return specs


def make_sample(seed: int, split: str, index: int, size: int = 64,
                num_captions: int = 3) -> tuple[ShapeSpec, list[str], Image.Image]:
    """Sample `index` of `split`: (spec, captions, image), the same on every call and machine."""
    spec, caps = make_spec(seed, split, index, num_captions)
    return spec, caps, render(spec, size)


# --------------------------------------------------------------------------------------------
# The `shapes` metric
# --------------------------------------------------------------------------------------------

MIN_FOREGROUND_DISTANCE = 40.0  # RGB distance (0..255 scale) below which nothing is foreground

# Shape templates, in units of the half extent h (`render`'s geometry): area, and how far below
# the bounding-box centre the centroid lies (a triangle with its apex up: h/3).
_TEMPLATE_AREA = {"circle": math.pi, "square": (2 * 0.88) ** 2, "triangle": 2.0, "diamond": 2.0}
_TEMPLATE_DROP = {"circle": 0.0, "square": 0.0, "triangle": 1.0 / 3.0, "diamond": 0.0}
# Blurs (Gaussian sigma, pixels) a template may take to match the image: an autoencoder's
# reconstruction and a generator's samples are softer than the antialiased renders.
TEMPLATE_BLURS = (0.0, 0.5, 0.75, 1.0, 1.25, 1.5)
_SUB = 8  # template coverage: sub-pixel samples per pixel side


class Detected(NamedTuple):
    """What `detect_shape` finds in one image (all None when it finds no foreground)."""

    colour: str | None
    cell: int | None
    shape: str | None


def nearest_colour(rgb: Sequence[float]) -> str:
    """Palette name nearest to `rgb` (Euclidean, 0..255 scale)."""
    names = list(PALETTE)
    ref = np.array([PALETTE[n] for n in names], dtype=np.float64)
    return names[int(np.argmin(((ref - np.asarray(rgb, dtype=np.float64)) ** 2).sum(1)))]


def shape_coverage(shape: str, cx: float, cy: float, h: float, x0: int, y0: int, width: int,
                   height: int) -> np.ndarray:
    """Fraction of each pixel of the window [x0, x0+width) x [y0, y0+height) covered by `shape`
    with bounding-box centre (cx, cy) and half extent h (pixel j spans [j, j+1)), `render`'s
    geometry: a square's side is 0.88 extent, a triangle has its apex up, a diamond is a square on
    its corner."""
    o = (np.arange(_SUB) + 0.5) / _SUB
    xs = (x0 + np.arange(width)[:, None] + o[None]).reshape(-1)[None, :] - cx
    ys = (y0 + np.arange(height)[:, None] + o[None]).reshape(-1)[:, None] - cy
    if shape == "circle":
        inside = xs * xs + ys * ys <= h * h
    elif shape == "square":
        inside = (np.abs(xs) <= 0.88 * h) & (np.abs(ys) <= 0.88 * h)
    elif shape == "triangle":
        inside = (ys >= -h) & (ys <= h) & (np.abs(xs) <= (ys + h) / 2)
    elif shape == "diamond":
        inside = np.abs(xs) + np.abs(ys) <= h
    else:
        raise ValueError(f"unknown shape {shape!r} (known: {', '.join(SHAPES)})")
    return inside.reshape(height, _SUB, width, _SUB).mean((1, 3))


def classify_outline(alpha: np.ndarray) -> str:
    """The shape of `SHAPES` whose template best explains a coverage map (a window around one
    shape: 1 inside, 0 outside, soft at the edges).

    Each template gets the map's area (sum of `alpha`) and centroid, so only the outline differs;
    it is blurred by each of `TEMPLATE_BLURS` and the sum of squared differences to `alpha` of its
    best blur is its score; the lowest score wins.
    """
    from scipy import ndimage

    height, width = alpha.shape
    area = max(float(alpha.sum()), 1e-3)
    ys, xs = np.mgrid[0:height, 0:width] + 0.5
    mx, my = float((alpha * xs).sum()) / area, float((alpha * ys).sum()) / area
    best, score = SHAPES[0], math.inf
    for shape in SHAPES:
        h = math.sqrt(area / _TEMPLATE_AREA[shape])
        t = shape_coverage(shape, mx, my - _TEMPLATE_DROP[shape] * h, h, 0, 0, width, height)
        for sigma in TEMPLATE_BLURS:
            tb = ndimage.gaussian_filter(t, sigma, mode="constant") if sigma else t
            e = float(((tb - alpha) ** 2).sum())
            if e < score:
                best, score = shape, e
    return best


def detect_shape(image: Any) -> Detected:
    """(colour, cell, shape) of the foreground shape of one image; all None when none is found.

    `image`: one image in any form `lct.grids.images_to_uint8` accepts (PIL, HWC/CHW arrays...).
    """
    from scipy import ndimage

    from lct.grids import images_to_uint8

    arr = images_to_uint8([image] if not _is_batch(image) else image)
    if arr.shape[0] != 1:
        raise ValueError(f"detect_shape takes one image, got {arr.shape[0]}")
    x = arr[0].astype(np.float64)  # [H, W, 3]
    h, w = x.shape[:2]
    b = max(1, min(h, w) // 16)
    border = np.concatenate([x[:b].reshape(-1, 3), x[-b:].reshape(-1, 3),
                             x[:, :b].reshape(-1, 3), x[:, -b:].reshape(-1, 3)])
    bg = np.median(border, axis=0)
    d = np.sqrt(((x - bg) ** 2).sum(-1))
    peak = float(np.quantile(d, 0.995))
    if peak < MIN_FOREGROUND_DISTANCE:
        return Detected(None, None, None)
    mask = d > max(MIN_FOREGROUND_DISTANCE, 0.5 * peak)
    labels, n = ndimage.label(mask, structure=np.ones((3, 3), dtype=bool))
    if n == 0:
        return Detected(None, None, None)
    weight = ndimage.sum(d, labels, index=np.arange(1, n + 1))
    comp = labels == (int(np.argmax(weight)) + 1)
    ys, xs = np.nonzero(comp)
    cx, cy = (xs.mean() + 0.5) / w, (ys.mean() + 0.5) / h
    cell = 3 * min(int(cy * 3), 2) + min(int(cx * 3), 2)
    dc = d[comp]
    core = comp & (d >= 0.75 * float(np.quantile(dc, 0.99)))
    colour = nearest_colour(np.median(x[core], axis=0))
    # Coverage map: each pixel's share of the way from the background to the palette colour, in a
    # window around the shape (3 pixels of margin for soft edges), other foreground blobs removed.
    v = np.asarray(PALETTE[colour], dtype=np.float64) - bg
    alpha = ((x - bg) @ v) / float(v @ v)
    alpha[ndimage.binary_dilation(mask & ~comp, iterations=1) & ~comp] = 0.0
    pad = 3
    y0, y1, x0, x1 = max(0, ys.min() - pad), min(h, ys.max() + 1 + pad), max(0, xs.min() - pad), min(w, xs.max() + 1 + pad)
    return Detected(colour, cell, classify_outline(alpha[y0:y1, x0:x1]))


def _is_batch(images: Any) -> bool:
    if isinstance(images, (list, tuple)):
        return True
    shape = getattr(images, "shape", None)
    return shape is not None and len(shape) == 4


# One image's score, as a row of numbers (`score_image`; eval gathers these over ranks).
SCORE_FIELDS = ("scored", "colour", "position", "shape", "both", "all", "shape_stated", "unparsed",
                "no_shape", "size")


def score_image(image: Any, caption: str) -> list[float]:
    """Whether one image shows what its caption states, as numbers in `SCORE_FIELDS` order.

    `scored` is 1 when the caption states a colour and a position (else `unparsed` is 1 and the
    rest 0); `colour`, `position` and `shape` are 1 for a right attribute (`shape` only when the
    caption names one: `shape_stated`), `both` for colour and position, `all` for every stated
    attribute; `no_shape` for an image without foreground (counted wrong); `size` is the index of
    the stated size in `SIZES`, -1 when none.
    """
    want = parse_caption(caption)
    size = float(tuple(SIZES).index(want.size)) if want.size else -1.0
    if want.colour is None or want.cell is None:
        return [0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0, 0.0, size]
    got = detect_shape(image)
    c, p = got.colour == want.colour, got.cell == want.cell
    s = want.shape is not None and got.shape == want.shape
    full = c and p and (s or want.shape is None)
    return [1.0, float(c), float(p), float(s), float(c and p), float(full),
            float(want.shape is not None), 0.0, float(got.colour is None), size]


def summarize_scores(rows: Any) -> dict[str, Any]:
    """The `shapes_metric` dictionary from `score_image` rows (`[N, len(SCORE_FIELDS)]`)."""
    r = np.asarray(rows, dtype=np.float64).reshape(-1, len(SCORE_FIELDS))
    col = {k: r[:, i] for i, k in enumerate(SCORE_FIELDS)}

    def accs(keep: np.ndarray) -> dict[str, Any]:
        n = float((col["scored"] * keep).sum())
        ns = float((col["shape_stated"] * keep).sum())
        frac = (lambda k, d: float((col[k] * keep).sum()) / d if d else math.nan)
        return {"n": int(n), "colour_acc": frac("colour", n), "position_acc": frac("position", n),
                "shape_acc": frac("shape", ns), "both_acc": frac("both", n), "all_acc": frac("all", n),
                "n_shape": int(ns)}

    out = accs(np.ones(len(r)))
    out.update(n_unparsed=int(col["unparsed"].sum()), no_shape=int(col["no_shape"].sum()),
               chance_colour=CHANCE_COLOUR, chance_position=CHANCE_POSITION, chance_shape=CHANCE_SHAPE,
               by_size={name: accs((col["size"] == i).astype(np.float64)) for i, name in enumerate(SIZES)})
    return out


def shapes_metric(images: Any, captions: Sequence[str],
                  value_range: tuple[float, float] | None = None) -> dict[str, Any]:
    """Whether images show the colour, position and shape their captions state.

    `images`: a list of PIL images / arrays, a uint8 array `[N,H,W,3]` or `[N,3,H,W]`, or a float
    tensor/array in [0,1] or [-1,1] (see `lct.grids.images_to_uint8`; `value_range` overrides its
    guess of the float range). `captions`: one per image.

    Returns `colour_acc`, `position_acc`, `both_acc` (colour and position), `shape_acc` (over the
    `n_shape` captions that name a shape), `all_acc` (every stated attribute), as fractions of the
    scored images; `n` (images scored: captions stating a colour and a position), `n_unparsed`
    (the others; not scored), `no_shape` (scored images where no foreground was found; counted
    wrong), `chance_colour` = 1/8, `chance_position` = 1/9, `chance_shape` = 1/4 (what captions
    unrelated to the images score on average), and `by_size`: the accuracies per stated size.
    """
    from lct.grids import images_to_uint8

    arr = images_to_uint8(images, value_range)
    if arr.shape[0] != len(captions):
        raise ValueError(f"{arr.shape[0]} images but {len(captions)} captions")
    return summarize_scores([score_image(img, text) for img, text in zip(arr, captions)])
