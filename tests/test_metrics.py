"""lct.features: Frechet distance, FID statistics and Inception features (random weights), CLIP score."""

from __future__ import annotations

import json
import types
import urllib.error

import numpy as np
import pytest
import torch

from lct import features as M
from lct.errors import UserError


def _random_spd(rng, d, rank=None):
    a = rng.normal(size=(d, rank or d + 5))
    return a @ a.T / a.shape[1]


# ------------------------------------------------------------------------------ image forms


def test_images_to_uint8_forms():
    from PIL import Image

    rng = np.random.default_rng(0)
    u8 = rng.integers(0, 256, size=(3, 10, 12, 3), dtype=np.uint8)
    f01 = torch.from_numpy(u8).permute(0, 3, 1, 2).double() / 255
    ref = M.images_to_uint8(u8)
    assert ref.dtype == np.uint8 and ref.shape == (3, 10, 12, 3) and (ref == u8).all()
    for form in ([Image.fromarray(a) for a in u8], list(u8), torch.from_numpy(u8).permute(0, 3, 1, 2),
                 f01, f01.float() * 2 - 1, f01.numpy().transpose(0, 2, 3, 1), [f for f in f01]):
        assert (M.images_to_uint8(form) == u8).all(), type(form)
    assert (M.images_to_uint8(u8[0]) == u8[:1]).all()
    assert (M.images_to_uint8(f01 * 255, value_range=(0, 255)) == u8).all()
    assert (M.to_uint8_nchw(f01) == torch.from_numpy(u8).permute(0, 3, 1, 2)).all()
    grey = M.images_to_uint8(Image.fromarray(u8[0, ..., 0]))
    assert grey.shape == (1, 10, 12, 3)


# ------------------------------------------------------------------------------ Frechet distance


def test_frechet_distance_diagonal_closed_form():
    rng = np.random.default_rng(1)
    d = 16
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    a, b = rng.uniform(0.1, 3, d), rng.uniform(0.1, 3, d)
    want = ((mu1 - mu2) ** 2).sum() + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum()
    got = M.frechet_distance(mu1, np.diag(a), mu2, np.diag(b))
    assert isinstance(got, float) and got == pytest.approx(want, rel=1e-12)
    assert M.frechet_distance(mu1, np.diag(a), mu1, np.diag(a)) == pytest.approx(0, abs=1e-10)
    # one dimension: (m1 - m2)^2 + (s1 - s2)^2
    assert M.frechet_distance([1.0], [[4.0]], [3.0], [[9.0]]) == pytest.approx(4 + 1)


def test_frechet_distance_commuting_covariances():
    rng = np.random.default_rng(2)
    d = 24
    q, _ = np.linalg.qr(rng.normal(size=(d, d)))
    a, b = rng.uniform(0.01, 5, d), rng.uniform(0.01, 5, d)
    s1, s2 = q @ np.diag(a) @ q.T, q @ np.diag(b) @ q.T
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    want = ((mu1 - mu2) ** 2).sum() + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum()
    assert M.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(want, rel=1e-9)
    # float32 inputs are computed in float64
    got32 = M.frechet_distance(mu1.astype(np.float32), s1.astype(np.float32), mu2.astype(np.float32),
                               s2.astype(np.float32))
    assert got32 == pytest.approx(want, rel=1e-5)


@pytest.mark.parametrize("n,d", [(400, 64), (40, 64)])  # full rank, and rank-deficient covariances
def test_frechet_distance_matches_torch_fidelity(n, d):
    from torch_fidelity.metric_fid import fid_features_to_statistics, fid_statistics_to_metric

    g = torch.Generator().manual_seed(3)
    f1 = torch.randn(n, d, generator=g, dtype=torch.float64)
    f2 = torch.randn(n, d, generator=g, dtype=torch.float64) * 1.3 + 0.2
    t1, t2 = fid_features_to_statistics(f1), fid_features_to_statistics(f2)
    want = fid_statistics_to_metric(t1, t2, verbose=False)["frechet_inception_distance"]
    s1, s2 = M.FIDStats.from_features(f1), M.FIDStats.from_features(f2)
    np.testing.assert_allclose(s1.mu, t1["mu"], rtol=1e-12)
    np.testing.assert_allclose(s1.sigma, t1["sigma"], rtol=1e-10, atol=1e-14)
    assert s1.distance(s2) == pytest.approx(want, rel=1e-6)
    assert M.frechet_distance(t1["mu"], t1["sigma"], t2["mu"], t2["sigma"]) == pytest.approx(want, rel=1e-6)


def test_frechet_distance_does_not_use_sqrtm(monkeypatch):
    import scipy.linalg

    def boom(*a, **k):
        raise AssertionError("sqrtm called")

    monkeypatch.setattr(scipy.linalg, "sqrtm", boom)
    rng = np.random.default_rng(4)
    s1, s2 = _random_spd(rng, 8), _random_spd(rng, 8)
    assert M.frechet_distance(np.zeros(8), s1, np.ones(8), s2) > 0
    assert "sqrtm" not in M.frechet_distance.__code__.co_names
    with pytest.raises(ValueError):
        M.frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))


# ------------------------------------------------------------------------------ FID statistics


def test_fid_stats_save_load_cache_and_fingerprint(tmp_path):
    rng = np.random.default_rng(5)
    feats = rng.normal(size=(50, 6))
    meta = {"fingerprint": "abc", "size": 64, "n": 50}
    st = M.FIDStats.from_features(feats, meta)
    assert st.n == 50 and st.mu.dtype == np.float64 and st.sigma.shape == (6, 6)
    np.testing.assert_allclose(st.sigma, np.cov(feats, rowvar=False))
    path = tmp_path / "ref" / "stats.npz"
    st.save(path)
    back = M.FIDStats.load(path)
    assert back.n == 50 and back.meta == meta and (back.mu == st.mu).all() and (back.sigma == st.sigma).all()
    assert M.load_cached_stats(path, meta) is not None
    assert M.load_cached_stats(path, dict(meta, size=32)) is None
    assert M.load_cached_stats(tmp_path / "nope.npz", meta) is None
    # a pytorch-fid / clean-fid style file with only mu and sigma
    np.savez(tmp_path / "plain.npz", mu=st.mu, sigma=st.sigma)
    assert M.FIDStats.load(tmp_path / "plain.npz").meta == {}
    (tmp_path / "bad.npz").write_bytes(b"not an npz")
    with pytest.raises(UserError):
        M.FIDStats.load(tmp_path / "bad.npz")
    with pytest.raises(UserError, match="not found"):
        M.FIDStats.load(tmp_path / "missing.npz")
    # fingerprints: file contents and settings both count
    f = tmp_path / "a.tar"
    f.write_bytes(b"x" * 10)
    k1 = M.fingerprint([f], {"size": 64})
    assert k1 == M.fingerprint([str(f)], {"size": 64})
    assert k1 != M.fingerprint([f], {"size": 32})
    f.write_bytes(b"y" * 10)
    assert k1 != M.fingerprint([f], {"size": 64})
    assert M.fingerprint([f], {"size": 64}, content=False) == M.fingerprint([f], {"size": 64}, content=False)
    json.dumps(k1)


# ------------------------------------------------------------------------------ FID Inception (random weights)

# random_inception_weights: conftest (the same file test_eval's FID tests read).


@pytest.mark.slow
def test_fid_features_random_weights(random_inception_weights):
    g = torch.Generator().manual_seed(6)
    x = torch.randint(0, 256, (3, 3, 32, 32), generator=g, dtype=torch.uint8)
    m1 = M.load_fid_inception(random_inception_weights)
    assert not m1.training and not any(p.requires_grad for p in m1.parameters())
    f1 = M.fid_features(m1, x, batch_size=2)
    assert f1.shape == (3, 2048) and f1.dtype == torch.float64 and torch.isfinite(f1).all()
    assert (f1.std(0) > 0).any()  # depends on the image
    m2 = M.load_fid_inception(random_inception_weights)
    f2 = M.fid_features(m2, x)
    torch.testing.assert_close(f1, f2, rtol=1e-5, atol=1e-7)  # deterministic (batching aside)
    assert torch.equal(M.fid_features(m2, x.float() / 255), f2)  # float [0,1] -> same uint8 input
    assert torch.equal(M.fid_features(m2, x), f2)


def test_fid_weights_errors_name_the_flag(tmp_path, monkeypatch):
    with pytest.raises(UserError, match="--fid-weights.*not found"):
        M.load_fid_inception(tmp_path / "missing.pth")
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"garbage")
    with pytest.raises(UserError, match="--fid-weights"):
        M.load_fid_inception(bad)
    from torch_fidelity import feature_extractor_inceptionv3 as tfi

    def offline(*a, **k):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(tfi, "load_state_dict_from_url", offline)
    with pytest.raises(UserError, match="could not download.*--fid-weights"):
        M.load_fid_inception(None)


# ------------------------------------------------------------------------------ CLIP score


TINY = "lct-test-tiny-vit"


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    """A small random-init open_clip ViT (no weights anywhere)."""
    import open_clip

    d = tmp_path_factory.mktemp("clipcfg")
    (d / f"{TINY}.json").write_text(json.dumps({
        "embed_dim": 32,
        "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
    }))
    open_clip.add_model_config(d / f"{TINY}.json")
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model, tok, pre = M.load_clip(TINY, pretrained=None)
    return model, tok, pre


def _shapes_pairs(n=6, size=32):
    from lct import shapes

    samples = [shapes.make_sample(9, "heldout", i, size) for i in range(n)]
    return [s[2] for s in samples], [s[1][0] for s in samples]


def test_clip_score_matches_torchmetrics(tiny_clip):
    from torchmetrics.functional.multimodal.clip_score import _clip_score_update
    from torchmetrics.functional.multimodal.clip_score import clip_score as tm_clip_score
    from torchvision.transforms.functional import pil_to_tensor, to_pil_image

    model, tok, pre = tiny_clip
    images, caps = _shapes_pairs()
    ours = M.clip_score(images, caps, model, tok, pre, batch_size=4)
    assert ours["n"] == 6 and ours["model"] == TINY and ours["per_image"].shape == (6,)

    class TMModel(torch.nn.Module):  # torchmetrics' model interface around the open_clip model
        def __init__(self):
            super().__init__()
            self.m, self.config = model, types.SimpleNamespace()

        def get_image_features(self, pixel_values):
            return self.m.encode_image(pixel_values)

        def get_text_features(self, input_ids, attention_mask=None):
            return self.m.encode_text(input_ids)

    def processor(images=None, text=None, return_tensors="pt", padding=True):
        if images is not None:
            return {"pixel_values": torch.stack([pre(to_pil_image(i)) for i in images])}
        ids = tok(text)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}

    tensors = [pil_to_tensor(im) for im in images]  # uint8 [3,H,W], torchmetrics' image form
    with torch.no_grad():
        raw, n = _clip_score_update(tensors, caps, TMModel(), processor)
        tm_mean = tm_clip_score(tensors, caps, lambda: (TMModel(), processor))
    assert n == 6
    np.testing.assert_allclose(ours["per_image"], torch.clamp(raw, min=0).numpy(), rtol=1e-4, atol=1e-4)
    assert ours["clip_score"] == pytest.approx(float(torch.clamp(raw, min=0).mean()), abs=1e-4)
    assert ours["clip_score_tm"] == pytest.approx(float(tm_mean), abs=1e-4)
    # the formula written out: 100 * max(cos, 0) on the same embeddings
    with torch.no_grad():
        e_i = model.encode_image(torch.stack([pre(im) for im in images]))
        e_t = model.encode_text(tok(caps))
    want = 100 * torch.clamp(torch.nn.functional.cosine_similarity(e_i, e_t), min=0)
    np.testing.assert_allclose(ours["per_image"], want.numpy(), rtol=1e-4, atol=1e-4)


def test_clip_score_clamps_each_image_and_reports_torchmetrics_aggregate():
    """Negative cosines: per-image clamp (our clip_score) vs torchmetrics' clamp of the mean."""

    class Stub(torch.nn.Module):  # image i -> e_i, caption j -> t_j, chosen cosines
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))

        def encode_image(self, pix):
            return torch.tensor([[3.0, 0.0], [0.0, 2.0]])[: pix.shape[0]]

        def encode_text(self, tok):
            return torch.tensor([[1.0, 1.0], [0.6, -0.8]])[: tok.shape[0]]

    pre = lambda im: torch.zeros(3, 4, 4)  # noqa: E731
    tok = lambda caps: torch.zeros(len(caps), 2, dtype=torch.long)  # noqa: E731
    r = M.clip_score(np.zeros((2, 4, 4, 3), np.uint8), ["a", "b"], Stub(), tok, pre, label="stub")
    cos = np.array([1 / np.sqrt(2), -0.8])
    np.testing.assert_allclose(r["per_image"], [100 * cos[0], 0.0], rtol=1e-6)
    assert r["clip_score"] == pytest.approx(100 * cos[0] / 2, rel=1e-6)
    assert r["clip_score_tm"] == pytest.approx(max(100 * cos.mean(), 0), rel=1e-6)
    assert r["model"] == "stub" and r["n"] == 2


def test_load_clip_from_a_local_file_and_errors(tiny_clip, tmp_path):
    model, tok, pre = tiny_clip
    path = tmp_path / "tiny.pt"
    torch.save(model.state_dict(), path)
    m2, tok2, pre2 = M.load_clip(TINY, pretrained=str(path))
    assert m2.lct_label == f"{TINY}/{path}"
    images, caps = _shapes_pairs(3)
    a = M.clip_score(images, caps, model, tok, pre)
    b = M.clip_score(images, caps, m2, tok2, pre2, label="x")
    np.testing.assert_allclose(a["per_image"], b["per_image"], rtol=1e-5, atol=1e-5)
    assert b["model"] == "x"
    with pytest.raises(UserError, match="--clip-pretrained.*not found"):
        M.load_clip(TINY, pretrained=str(tmp_path / "missing.safetensors"))
    with pytest.raises(UserError, match="--clip-pretrained"):
        M.load_clip(TINY, pretrained="no_such_tag")
    with pytest.raises(UserError, match="--clip-model"):
        M.load_clip("no-such-model", pretrained=None)
    with pytest.raises(ValueError):
        M.clip_score(images, caps[:2], model, tok, pre)


@pytest.mark.proc
def test_import_lct_metrics_is_light():
    import subprocess
    import sys

    code = ("import sys, lct.metrics, lct.features, lct.shapes; "
            "print(any(m in sys.modules for m in ('open_clip', 'torch_fidelity', 'torchmetrics')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "False", out.stderr
