"""Fidelity and diversity of a sample set against real images: improved precision and recall
(Kynkaanniemi et al. 2019, "Improved Precision and Recall Metric for Assessing Generative Models")
and density and coverage (Naeem et al. 2020, "Reliable Fidelity and Diversity Metrics for
Generative Models"), from k-nearest-neighbour balls in a feature space; docs/SPEC.md section 16.

Why beside every caption-accuracy figure: a model whose samples are averages of each caption's
images (blurry means, one mode per caption) can read the caption better than a model drawing
varied images, and score higher on accuracy. Recall and coverage fall for such a model (recall
and coverage 0 for class-mean images of the digits set, 0.97 and 0.96 for real held-out images;
tests/test_prdc.py), so the two figures together rank it right.

Feature space: a seeded randomly initialised VGG16 (torchvision, no weights to download), the
"random embedding" Naeem et al. (section 4.3) show to give reliable figures outside ImageNet-like
domains; images resized to `vgg_input_size(resolution)` and normalised with ImageNet statistics,
global average of the last convolutional block (512-d). The same seed gives the same network on
every machine with the same torch. Numbers are comparable within one feature space only: the
record says which.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lct import rng

PRDC_K = 5  # Naeem et al.'s recommended k for density and coverage
FEATURES = "torchvision vgg16 (random init, seed 0) conv features, global average pool, 512-d"
CITATION = ("precision, recall: Kynkaanniemi et al. 2019 (improved P&R); density, coverage: Naeem et al. 2020; "
            "k-NN balls in the feature space")


def knn_radii(x: torch.Tensor, k: int, chunk: int = 2048) -> torch.Tensor:
    """Distance of each row of `x` to its k-th nearest other row (the row itself excluded)."""
    if x.shape[0] <= k:
        raise ValueError(f"need more than k = {k} feature rows, got {x.shape[0]}")
    return torch.cat([torch.cdist(x[i:i + chunk], x).kthvalue(k + 1, dim=1).values
                      for i in range(0, x.shape[0], chunk)])


def prdc(real: torch.Tensor, fake: torch.Tensor, k: int = PRDC_K, chunk: int = 2048) -> dict:
    """Precision, recall, density and coverage of `fake` [M, D] against `real` [N, D] (features),
    with k-NN balls as the `prdc` reference code of Naeem et al. (strict `<`, self excluded):

        precision = mean_j [ exists i: |f_j - r_i| < rad_r(i) ]      (fakes inside the real manifold)
        recall    = mean_i [ exists j: |r_i - f_j| < rad_f(j) ]      (reals inside the fake manifold)
        density   = 1/(k M) sum_j #{i: |f_j - r_i| < rad_r(i)}
        coverage  = mean_i [ min_j |r_i - f_j| < rad_r(i) ]

    plus `spread`, the mean pairwise distance among the fakes over that among the reals (1: as
    varied as the real images, in this feature space). float64 throughout."""
    real, fake = real.double(), fake.double()
    if real.ndim != 2 or fake.ndim != 2 or real.shape[1] != fake.shape[1]:
        raise ValueError(f"features must be [N, D] and [M, D], got {tuple(real.shape)} and {tuple(fake.shape)}")
    r_rad, f_rad = knn_radii(real, k, chunk), knn_radii(fake, k, chunk)
    inside_real = torch.zeros(fake.shape[0], dtype=torch.float64)  # per fake: real balls holding it
    recalled = torch.zeros(real.shape[0], dtype=torch.bool)
    covered = torch.zeros(real.shape[0], dtype=torch.bool)
    for i in range(0, real.shape[0], chunk):
        d = torch.cdist(real[i:i + chunk], fake)                    # [n, M]
        inside = d < r_rad[i:i + chunk, None]
        inside_real += inside.sum(0)
        recalled[i:i + chunk] = (d < f_rad[None, :]).any(1)
        covered[i:i + chunk] = d.min(1).values < r_rad[i:i + chunk]
    return {"precision": float((inside_real > 0).double().mean()), "recall": float(recalled.double().mean()),
            "density": float(inside_real.mean() / k), "coverage": float(covered.double().mean()),
            "spread": mean_pairwise(fake, chunk) / max(mean_pairwise(real, chunk), 1e-12),
            "k": k, "n_real": int(real.shape[0]), "n_fake": int(fake.shape[0])}


def mean_pairwise(x: torch.Tensor, chunk: int = 2048) -> float:
    n = x.shape[0]
    total = sum(float(torch.cdist(x[i:i + chunk], x).sum()) for i in range(0, n, chunk))
    return total / (n * (n - 1)) if n > 1 else 0.0


def vgg_input_size(resolution: int) -> int:
    """64 px at least (five max-pools), 224 at most (the network's design size)."""
    return max(64, min(224, int(resolution)))


class RandomVGG16:
    """uint8 images [B,3,H,W] -> float64 features [B,512] of a seeded randomly initialised VGG16
    (module docstring). Built under a forked RNG, so the caller's random stream is untouched."""

    width = 512

    def __init__(self, resolution: int, device: torch.device | str = "cpu", seed: int = 0):
        import torchvision

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(rng.seed_int(rng.Stream.PRDC_EMBED, seed))
            self.net = torchvision.models.vgg16(weights=None).features.eval().to(device)
        for p in self.net.parameters():
            p.requires_grad_(False)
        self.size, self.device = vgg_input_size(resolution), torch.device(device)
        self.mean = torch.tensor([0.485, 0.456, 0.406], device=device).view(1, 3, 1, 1)
        self.std = torch.tensor([0.229, 0.224, 0.225], device=device).view(1, 3, 1, 1)
        self.label = FEATURES + f", {self.size}px input"

    @torch.no_grad()
    def __call__(self, images_u8: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
        out = []
        for i in range(0, images_u8.shape[0], batch_size):
            x = images_u8[i:i + batch_size].to(self.device).float() / 255.0
            x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", antialias=True, align_corners=False)
            out.append(self.net((x - self.mean) / self.std).mean(dim=(2, 3)).double().cpu())
        return torch.cat(out) if out else torch.zeros(0, self.width, dtype=torch.float64)
