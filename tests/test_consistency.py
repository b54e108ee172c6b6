"""lct.consistency against every vector of SPEC.md (sections 1-4, 13) plus property tests.

Tolerance rule (SPEC 3): a value printed with 13 or more significant digits is checked to rtol
1e-12; one printed with fewer digits to half a unit of its last printed digit (`assert_spec`).
The section 13 vectors go through the same library functions the objectives call.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.optimize import linear_sum_assignment

from helpers_spec import assert_spec, spec_tolerance
from lct import consistency as C

F64 = torch.float64


def test_spec_tolerance_rule():
    assert spec_tolerance("8.182944745182603") == (1e-12, 0.0)
    assert spec_tolerance("2.75058506253309") == (1e-12, 0.0)
    assert spec_tolerance("0.01363531562796") == (1e-12, 0.0)   # 13 significant digits
    assert spec_tolerance("0.0626329925063") == (0.0, pytest.approx(5e-14))
    assert spec_tolerance("8.34736667932") == (0.0, pytest.approx(5e-12))
    assert spec_tolerance("0.169753") == (0.0, pytest.approx(5e-7))
    with pytest.raises(AssertionError):
        assert_spec(8.3473666793, "8.34736667932")


# ----------------------------------------------------------------------------------------------
# 1. Parameterisation
# ----------------------------------------------------------------------------------------------


def test_scalings_spec_check():
    c_skip, c_out, c_in = C.scalings(torch.tensor([0.318283288839], dtype=F64))
    assert c_skip.dtype == F64
    assert_spec(c_skip, "0.7142140504581")
    assert_spec(c_out, "0.266811501783")
    assert_spec(c_in, "1.687167872587")
    # floats give floats
    fs = C.scalings(0.318283288839)
    assert all(isinstance(v, float) for v in fs)
    assert_spec(fs[0], "0.7142140504581")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_boundary_condition_f_at_sigma_min_is_x(dtype):
    c_skip, c_out, _ = C.scalings(torch.tensor([0.002], dtype=dtype))
    assert c_skip.item() == 1.0 and c_out.item() == 0.0
    grid = C.karras_sigmas(11)
    assert grid[0].item() == 0.002  # exactly, so the boundary condition holds on the grid
    x = torch.randn(3, 4, 8, 8, dtype=dtype)
    net = lambda x_in, e: 1e3 * torch.tanh(x_in) + e.reshape(-1, 1, 1, 1)  # noqa: E731
    f = C.consistency_function(net, x, grid[:1].expand(3).to(dtype), sigma_min=0.002)
    assert f.dtype == dtype
    assert torch.equal(f, x)


def test_dtype_policy():
    s32 = torch.tensor([0.5, 2.0], dtype=torch.float32)
    assert all(v.dtype == torch.float32 for v in C.scalings(s32))
    assert all(v.dtype == torch.float32 for v in C.scalings(s32.to(torch.bfloat16)))  # never below fp32
    assert C.time_embed_input(s32.to(torch.bfloat16)).dtype == torch.float32
    assert C.ect_r(s32, 1).dtype == torch.float32
    a = torch.randn(2, 3, dtype=torch.float32)
    assert C.cauchy(a, a * 0.5, 0.1).dtype == torch.float32
    assert C.cauchy(a.double(), a.double() * 0.5, 0.1).dtype == F64


def test_time_embedding_conventions():
    s = torch.tensor([0.002, 1.0, 80.0], dtype=F64)
    assert torch.allclose(C.time_embed_input(s), 250 * torch.log(s), rtol=1e-15, atol=0)
    assert torch.allclose(C.time_embed_input(s, 1.0), torch.log(s) / 4, rtol=1e-15, atol=0)
    assert C.c_noise(math.e ** 4) == pytest.approx(1.0, rel=1e-15)


def test_sigma_min_zero_gives_the_edm_scalings():
    s = torch.tensor([0.1, 1.0, 10.0], dtype=F64)
    c_skip, c_out, c_in = C.scalings(s, 0.5, 0.0)
    assert torch.allclose(c_skip, 0.25 / (s ** 2 + 0.25), rtol=1e-15)
    assert torch.allclose(c_out, 0.5 * s / (s ** 2 + 0.25).sqrt(), rtol=1e-15)


# ----------------------------------------------------------------------------------------------
# 2. Noise levels and curricula
# ----------------------------------------------------------------------------------------------

GRID_11 = ["0.002", "0.016720753235", "0.0850872026894", "0.318283288839", "0.965416926332",
           "2.51521897615", "5.83894763101", "12.3815761385", "24.4083417866", "45.3137340752", "80"]


def test_karras_grid_n11():
    s = C.karras_sigmas(11)
    assert s.dtype == F64 and s.shape == (11,)
    for v, p in zip(s.tolist(), GRID_11):
        assert_spec(v, p)
    assert s[0].item() == 0.002 and s[-1].item() == 80.0
    assert bool((s[1:] > s[:-1]).all())


@pytest.mark.parametrize("n", [1, 0, -3])
def test_karras_refuses_fewer_than_two_levels(n):
    with pytest.raises(ValueError, match="n >= 2"):
        C.karras_sigmas(n)


def test_ict_num_points_spec_values():
    K = 400_000
    assert C.ict_stage_length(K, 10, 1280) == 50_000
    expected = {0: 11, 49_999: 11, 50_000: 21, 100_000: 41, 349_999: 641, 350_000: 1281,
                399_999: 1281, 10**9: 1281}
    for k, n in expected.items():
        assert C.ict_num_points(k, K, 10, 1280) == n, k
    # iLCT's runs: s0 10, s1 640, 7 stages
    assert C.ict_stage_length(294_000, 10, 640) == 42_000
    assert C.ict_num_points(293_999, 294_000, 10, 640) == 641
    # a run shorter than the number of stages does not divide by zero
    assert [C.ict_num_points(k, 3, 10, 1280) for k in range(3)] == [11, 21, 41]


PROBS_11 = ["0.0626329925063", "0.181736979711", "0.245501421967", "0.213494447023",
            "0.142446058024", "0.0806046216768", "0.0410799062224", "0.0195800922413",
            "0.00894386841377", "0.00397961221431"]


def test_pair_probs_n11():
    p = C.lognormal_pair_probs(C.karras_sigmas(11))
    assert p.dtype == F64 and p.shape == (10,)
    for v, q in zip(p.tolist(), PROBS_11):
        assert_spec(v, q)


def test_pair_probs_match_erf_formula():
    s = C.karras_sigmas(641)
    e = torch.special.erf((torch.log(s) + 1.1) / (math.sqrt(2) * 2.0))
    ref = (e[1:] - e[:-1]) / (e[1:] - e[:-1]).sum()
    assert torch.allclose(C.lognormal_pair_probs(s), ref, rtol=1e-10, atol=0)


@pytest.mark.parametrize("n", [2, 3, 11, 21, 41, 81, 161, 321, 641, 1281, 1000])
def test_pair_probs_sum_to_one(n):
    p = C.lognormal_pair_probs(C.karras_sigmas(n))
    assert p.shape == (n - 1,)
    assert bool((p > 0).all())
    assert abs(p.sum().item() - 1.0) < 1e-14


def test_descending_grid_is_refused():
    desc = C.karras_sigmas(11).flip(0)
    for fn in (C.lognormal_pair_probs, C.pair_weights, C.check_ascending):
        with pytest.raises(ValueError, match="ascending"):
            fn(desc)
    with pytest.raises(ValueError, match="ascending"):
        C.lognormal_pair_probs(torch.tensor([0.1, 0.2, 0.2, 0.3], dtype=F64))


def test_pair_weights():
    s = C.karras_sigmas(11)
    lam = C.pair_weights(s)
    assert lam.shape == (10,)
    assert torch.equal(lam, 1.0 / (s[1:] - s[:-1]))


def test_pair_index_from_uniform_edges_and_law():
    probs = C.lognormal_pair_probs(C.karras_sigmas(11))
    one_minus = [0.0, 1 - 1e-16, float(np.nextafter(np.float64(1), 0))]
    idx = C.pair_index_from_uniform(torch.tensor(one_minus, dtype=F64), probs)
    assert idx.dtype == torch.int64 and idx.tolist() == [0, 9, 9]
    u32 = torch.tensor([np.nextafter(np.float32(1), np.float32(0)), 0.0], dtype=torch.float32)
    assert C.pair_index_from_uniform(u32, probs).tolist() == [9, 0]
    # out-of-range inputs are clamped, never an invalid index
    assert C.pair_index_from_uniform(torch.tensor([1.0, 2.0, -1.0], dtype=F64), probs).tolist() == [9, 9, 0]
    # a cumsum that rounds below 1 (probabilities not exactly normalised) is still safe
    rough = probs.to(torch.float32) * (1 - 1e-6)
    assert C.pair_index_from_uniform(torch.tensor([1 - 1e-16], dtype=F64), rough).item() == 9
    # stratified uniforms reproduce the law to one count per pair
    m = 100_000
    u = (torch.arange(m, dtype=F64) + 0.5) / m
    counts = torch.bincount(C.pair_index_from_uniform(u, probs), minlength=10).double()
    assert (counts - probs * m).abs().max().item() <= 1.0
    # a zero-probability pair is never returned, also at u = 0
    p = torch.tensor([0.0, 0.5, 0.0, 0.5, 0.0], dtype=F64)
    got = C.pair_index_from_uniform(torch.tensor([0.0, 0.25, 0.5, 0.75, 1 - 1e-16], dtype=F64), p)
    assert got.tolist() == [1, 1, 3, 3, 3]


def test_ect_stage():
    assert [C.ect_stage(k, 25_000) for k in (0, 24_999, 25_000, 50_000, 99_999)] == [0, 0, 1, 2, 3]
    assert C.ect_stage(10**6, 25_000, max_stage=3) == 3


ECT_R = {  # t: values at stages 0..3 (SPEC 2.4)
    10.0: ["4.99818408525", "7.49909204263", "8.74954602131", "9.37477301066"],
    1.0: ["0", "0.21211715726", "0.60605857863", "0.803029289315"],
}


def test_ect_r_spec_values():
    t = torch.tensor([10.0, 1.0, 0.1, 0.002], dtype=F64)
    for s in range(4):
        r = C.ect_r(t, s)
        assert r.shape == t.shape and r.dtype == F64
        assert_spec(r[0], ECT_R[10.0][s])
        assert_spec(r[1], ECT_R[1.0][s])
        if s <= 1:
            assert r[2].item() == 0.0 and r[3].item() == 0.0
    assert C.ect_r(t, 0)[1].item() == 0.0  # printed "0": exactly zero (clamped)


def test_ect_r_shapes_const_mapping_and_weights():
    t = torch.exp(torch.randn(3, 4, dtype=F64))
    r = C.ect_r(t, 2, q=4.0, mapping="const")
    assert r.shape == (3, 4)
    assert torch.allclose(r, t * (1 - 4.0 ** -3), rtol=1e-15)
    r = C.ect_r(t, 5)
    assert bool((r < t).all()) and bool((r >= 0).all())
    assert torch.allclose(C.ect_weight(t, r), 1 / (t - r), rtol=1e-15)
    assert torch.allclose(C.ect_weight(t, r, "imagenet"), (t ** 2 + 0.25) / (t * 0.5) ** 2, rtol=1e-14)
    assert torch.allclose(C.ect_t(torch.zeros(2, dtype=F64), -1.1, 2.0), torch.full((2,), math.exp(-1.1), dtype=F64))
    with pytest.raises(ValueError, match="mapping"):
        C.ect_r(t, 0, mapping="linear")


# ----------------------------------------------------------------------------------------------
# 3. Distances
# ----------------------------------------------------------------------------------------------


def _ab(shape=(1, 4)):
    d = torch.tensor([0.1, -0.2, 0.3, 0.0], dtype=F64)
    b = torch.tensor([0.7, 0.1, -0.4, 0.2], dtype=F64)
    return (b + d).reshape(shape), b.reshape(shape)


@pytest.mark.parametrize("shape", [(1, 4), (1, 1, 2, 2)])
def test_distances_spec_check(shape):
    a, b = _ab(shape)
    assert_spec(C.l2(a, b), "0.035")
    assert_spec(C.cauchy(a, b, 0.03456), "2.75058506253309")
    assert_spec(C.cauchy(a, b, 0.1), "1.01160091167848")
    assert_spec(C.pseudo_huber(a, b, 0.03456), "0.155688242041812")
    assert_spec(C.pseudo_huber(a, b, 0.1), "0.112132034355964")
    assert_spec(C.distance("pseudo_huber", a, b, 0.1), "0.112132034355964")
    assert_spec(C.distance("cauchy", a, b, 0.1), "1.01160091167848")
    assert C.pseudo_huber(a, b, 0.0).item() == pytest.approx(math.sqrt(0.035), rel=1e-15)
    assert C.cauchy(a, b, 0.1).shape == (1,)
    with pytest.raises(ValueError):
        C.distance("huber", a, b, 0.1)
    with pytest.raises(ValueError):
        C.cauchy(a, b, 0.0)


def test_sum_form_conversion_at_d4096():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(3, 4, 32, 32, generator=g, dtype=F64)
    b = a + 0.01 * torch.randn(3, 4, 32, 32, generator=g, dtype=F64)
    c_sum = 0.03456
    s = (a - b).square().flatten(1).sum(1)
    ph_sum = torch.sqrt(s + c_sum ** 2) - c_sum
    assert torch.allclose(C.pseudo_huber(a, b, c_sum / 64) * 64, ph_sum, rtol=1e-12, atol=0)
    cauchy_sum = torch.log1p(s / (2 * c_sum ** 2))
    assert torch.allclose(C.cauchy(a, b, c_sum / 64), cauchy_sum, rtol=1e-12, atol=0)


def test_pseudo_huber_keeps_small_m_in_fp32():
    a = torch.zeros(1, 4096)
    b = torch.full((1, 4096), 1e-6)
    exact = (torch.tensor(1e-12, dtype=F64) + 0.00054 ** 2).sqrt() - 0.00054
    got = C.pseudo_huber(a, b, 0.00054)
    assert got.dtype == torch.float32
    assert abs(got.item() / exact.item() - 1) < 1e-5


# ----------------------------------------------------------------------------------------------
# 4. Adaptive c
# ----------------------------------------------------------------------------------------------

ADAPTIVE_C = {20: "0.01363531562796", 40: "0.006144417258773", 80: "0.002768829448472",
              160: "0.001247704410663", 320: "0.0005622470886557", 640: "0.0002533627243763",
              1280: "0.0001141716362762"}


def test_adaptive_c_spec_values():
    for n, printed in ADAPTIVE_C.items():
        assert_spec(C.adaptive_c(n), printed)
    for n in range(1, 11):
        assert C.adaptive_c(n) == 0.03456
        assert C.adaptive_c(n, 10, 0.05) == 0.05
    assert C.adaptive_c(11) == pytest.approx(math.exp(-1.15 * math.log(11) - 0.85), rel=1e-15)


def test_resolve_c_first_and_ect_extension():
    assert C.resolve_c_first("code", (4, 32, 32)) == pytest.approx(0.03456, rel=1e-15)
    assert C.resolve_c_first("code", (4, 64, 64)) == pytest.approx(0.06912, rel=1e-15)
    assert C.resolve_c_first(0.03456, (16, 32, 32)) == 0.03456
    with pytest.raises(ValueError):
        C.resolve_c_first("paper", (4, 32, 32))
    assert C.adaptive_c_for_ect_stage(0) == 0.03456
    assert C.adaptive_c_for_ect_stage(1) == 0.03456           # n = s0
    assert_spec(C.adaptive_c_for_ect_stage(2), ADAPTIVE_C[20])
    assert_spec(C.adaptive_c_for_ect_stage(5), ADAPTIVE_C[160])


# ----------------------------------------------------------------------------------------------
# 5. Early set and diffusion term
# ----------------------------------------------------------------------------------------------


def test_early_set_n11_is_two_smallest_student_levels():
    s = C.karras_sigmas(11)
    pairs = torch.arange(10)
    early = C.early_set_ict(pairs, 11)
    assert early.tolist() == [True, True] + [False] * 8
    student = s[pairs[early] + 1]
    assert_spec(student[0], "0.0167208")
    assert_spec(student[1], "0.0850872")


@pytest.mark.parametrize("n", list(range(2, 60)) + [81, 161, 321, 641, 1281])
def test_early_set_is_sigma_below_grid_quarter(n):
    s = C.karras_sigmas(n)
    pairs = torch.arange(n - 1)
    by_index = C.early_set_ict(pairs, n)
    by_sigma = s[pairs + 1] <= 0.169753
    assert torch.equal(by_index, by_sigma)
    if n >= 21 and (n - 1) % 4 == 0:  # the boundary level is on the grid: sigma(1/4) = 0.169753
        assert_spec(s[pairs[by_index][-1] + 1], "0.169753")
    assert torch.equal(C.early_set_ect(s[pairs + 1], 0.1698), by_sigma)


def _toy_problem(b: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, 2, 3, 3, generator=g, dtype=F64)
    sigma = torch.exp(torch.randn(b, generator=g, dtype=F64) - 1.5)
    theta = torch.randn(2, 3, 3, generator=g, dtype=F64).requires_grad_()
    dirs = torch.randn(b, 2, 3, 3, generator=g, dtype=F64)
    return x, sigma, theta, dirs


def _student(x, sigma, theta, dirs):
    return x + sigma.reshape(-1, 1, 1, 1) * torch.tanh(theta * dirs)


@pytest.mark.parametrize("counts", [(3, 0), (2, 5), (0, 0), (0, 4)])
def test_diffusion_term_two_ranks_equals_one_process(counts):
    per_rank = 6
    x, sigma, theta, dirs = _toy_problem(2 * per_rank, seed=sum(counts))
    early = torch.zeros(2 * per_rank, dtype=torch.bool)
    for r, k in enumerate(counts):
        early[r * per_rank: r * per_rank + k] = True
    global_count = int(early.sum())

    one = C.diffusion_term(_student(x, sigma, theta, dirs), x, sigma, early, global_count)
    (g_one,) = torch.autograd.grad(one, theta)

    values, grads = [], []
    for r in range(2):
        sl = slice(r * per_rank, (r + 1) * per_rank)
        v = C.diffusion_term(_student(x[sl], sigma[sl], theta, dirs[sl]), x[sl], sigma[sl],
                             early[sl], global_count, world_size=2)
        values.append(v)
        grads.append(torch.autograd.grad(v, theta)[0])
    # DeepSpeed averages gradients over ranks: (sum over ranks) / world size
    assert torch.allclose((values[0] + values[1]) / 2, one, rtol=1e-13, atol=1e-300)
    assert torch.allclose((grads[0] + grads[1]) / 2, g_one, rtol=1e-12, atol=1e-15)
    if global_count == 0:
        assert one.item() == 0.0 and torch.all(g_one == 0)
    else:  # against iLCT's formula written out
        ref = ((1 / sigma ** 2 + 4) * (_student(x, sigma, theta, dirs) - x).square().flatten(1).mean(1))[early].sum()
        assert torch.allclose(one, ref / global_count, rtol=1e-13)


def test_diffusion_term_with_gradient_accumulation():
    """2 ranks x 2 micro-batches: loss_rj gets factor W*A, DeepSpeed scales by 1/A and averages
    over W; equals the one-process gradient on the global batch (CT mean included)."""
    W, A, mb = 2, 2, 4
    x, sigma, theta, dirs = _toy_problem(W * A * mb, seed=7)
    early = torch.tensor([1, 0, 1, 1, 0, 0, 0, 0, 1, 0, 0, 0, 1, 1, 1, 1], dtype=torch.bool)
    count = int(early.sum())

    def ct(student, xx):  # stand-in for the per-sample CT loss
        return C.cauchy(student, xx, 0.1)

    student = _student(x, sigma, theta, dirs)
    one = ct(student, x).mean() + 5 * C.diffusion_term(student, x, sigma, early, count)
    (g_one,) = torch.autograd.grad(one, theta)

    total = torch.zeros((), dtype=F64)
    grad = torch.zeros_like(theta)
    for r in range(W):
        for j in range(A):
            sl = slice((r * A + j) * mb, (r * A + j + 1) * mb)
            st = _student(x[sl], sigma[sl], theta, dirs[sl])
            loss = ct(st, x[sl]).mean() + 5 * C.diffusion_term(
                st, x[sl], sigma[sl], early[sl], count, world_size=W, grad_accum_steps=A)
            total = total + loss / (A * W)
            grad += torch.autograd.grad(loss / A, theta)[0] / W
    assert torch.allclose(total, one, rtol=1e-13)
    assert torch.allclose(grad, g_one, rtol=1e-12, atol=1e-15)
    # passing the product as world_size is the same thing
    st = _student(x[:mb], sigma[:mb], theta, dirs[:mb])
    assert torch.equal(C.diffusion_term(st, x[:mb], sigma[:mb], early[:mb], count, world_size=W * A),
                       C.diffusion_term(st, x[:mb], sigma[:mb], early[:mb], count, world_size=W,
                                        grad_accum_steps=A))


def test_diffusion_term_empty_and_hostile_values():
    x, sigma, theta, dirs = _toy_problem(4, seed=3)
    x = x.clone()
    x[1] = float("inf")        # would overflow in a masked product
    x[2, 0, 0, 0] = 1e200      # squares to inf
    sigma = sigma.clone()
    sigma[1], sigma[3] = 1e300, 0.0
    student = _student(torch.where(torch.isfinite(x), x, 0), sigma.clamp(max=1.0), theta, dirs)
    for global_count in (0, 5, torch.tensor(0), torch.tensor(7)):
        v = C.diffusion_term(student, x, sigma, torch.zeros(4, dtype=torch.bool), global_count)
        assert v.item() == 0.0 and v.requires_grad
        (g,) = torch.autograd.grad(v, theta, retain_graph=True)
        assert bool(torch.isfinite(g).all()) and bool((g == 0).all())
    # one finite early sample among hostile non-early ones: finite value and gradient
    early = torch.tensor([True, False, False, False])
    v = C.diffusion_term(student, x, sigma, early, torch.tensor(1))
    (g,) = torch.autograd.grad(v, theta)
    assert math.isfinite(v.item()) and v.item() > 0 and bool(torch.isfinite(g).all())


# ----------------------------------------------------------------------------------------------
# 6. OT coupling
# ----------------------------------------------------------------------------------------------


def _pair_cost(x, z):
    return (x.double() - z.double()).flatten(1).square().sum(1).mean().item()


@pytest.mark.parametrize("b,shape,seed", [(1, (4,), 0), (2, (3,), 1), (7, (5,), 2),
                                          (32, (4, 8, 8), 3), (64, (16,), 4), (128, (4, 32, 32), 5)])
def test_ot_matches_linear_sum_assignment(b, shape, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, *shape, generator=g) * 0.5
    z = torch.randn(b, *shape, generator=g)
    zc = C.ot_couple(x, z)
    assert zc.shape == z.shape and zc.dtype == z.dtype
    perm = C.ot_permutation(x, z)
    assert torch.equal(zc, z[perm])
    assert sorted(perm.tolist()) == list(range(b))  # a permutation of z's rows
    cost = torch.cdist(x.double().flatten(1), z.double().flatten(1)).square().numpy()
    rows, cols = linear_sum_assignment(cost)
    assert cost[np.arange(b), perm.numpy()].sum() == pytest.approx(cost[rows, cols].sum(), rel=1e-12)
    assert perm.tolist() == cols.tolist()
    assert _pair_cost(x, zc) <= _pair_cost(x, z) + 1e-9


def test_ot_ties_and_fallback_still_give_a_permutation(monkeypatch):
    # identical latents: every assignment is optimal (a fully degenerate problem)
    x = torch.ones(16, 8)
    z = torch.randn(16, 8, generator=torch.Generator().manual_seed(0))
    assert sorted(C.ot_permutation(x, z).tolist()) == list(range(16))
    # a solver answer that is not a permutation falls back to the exact assignment
    import ot

    def bad_emd(a, b, M, **kw):
        return np.full(M.shape, 1.0 / M.size), {"warning": "numItermax reached", "result_code": 3}

    monkeypatch.setattr(ot, "emd", bad_emd)
    x = torch.randn(9, 5, generator=torch.Generator().manual_seed(1))
    perm = C.ot_permutation(x, z[:9, :5])
    cost = torch.cdist(x.double(), z[:9, :5].double()).square().numpy()
    assert perm.tolist() == linear_sum_assignment(cost)[1].tolist()


def test_ot_lowers_mean_pair_cost_a_little_at_d4096():
    """SPEC 6: at d = 4096, B = 128 the coupling lowers the mean pair cost by only about 3 %."""
    g = torch.Generator().manual_seed(11)
    x = 0.5 * torch.randn(128, 4, 32, 32, generator=g)
    z = torch.randn(128, 4, 32, 32, generator=g)
    gain = 1 - _pair_cost(x, C.ot_couple(x, z)) / _pair_cost(x, z)
    assert 0.01 < gain < 0.06


# ----------------------------------------------------------------------------------------------
# 13. End-to-end vectors
# ----------------------------------------------------------------------------------------------


def _e2e_inputs():
    n = torch.arange(4096, dtype=F64)
    b = torch.arange(5, dtype=F64)[:, None]
    x = (0.5 * torch.sin(0.37 * n + 1.3 * b + 0.1)).reshape(5, 4, 32, 32)
    z = (1.2 * torch.cos(0.23 * n + 0.9 * b)).reshape(5, 4, 32, 32)
    return x, z


def _zero_net(x_in: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
    return torch.zeros_like(x_in)


def _bc(v, like):
    return v.reshape(-1, *([1] * (like.ndim - 1)))


ICT_E2E = ["51.9599308295", "41.7980673819", "0.88488504147", "0.0420971732607", "0.00287845276822"]


def test_e2e_ict():
    x, z = _e2e_inputs()
    sigmas = C.karras_sigmas(11)
    idx = torch.tensor([0, 2, 5, 7, 9])
    s_student, s_teacher = sigmas[idx + 1], sigmas[idx]
    lam = C.pair_weights(sigmas)[idx]
    student = C.consistency_function(_zero_net, x + _bc(s_student, x) * z, s_student, sigma_min=0.002)
    target = C.consistency_function(_zero_net, x + _bc(s_teacher, x) * z, s_teacher, sigma_min=0.002)
    c_sum = 0.03456
    per_sample = lam * C.distance("pseudo_huber", student, target, c_sum / 64) * 64  # sum form
    for v, p in zip(per_sample.tolist(), ICT_E2E):
        assert_spec(v, p)


ECT_E2E = {
    0: ["54.2957448889", "52.9104951601", "21.085677434", "0.269102794891", "0.00424127130076"],
    1: ["54.2957448889", "52.9104951601", "18.6382047387", "0.180082881544", "0.00282767968198"],
    2: ["54.2954257799", "52.4357040215", "13.3464887234", "0.154483631171", "0.00242375588249"],
    3: ["54.2950386496", "51.8108514068", "11.3329621702", "0.144227398438", "0.00226218234995"],
}


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_e2e_ect(stage):
    """Where r = 0 the target is x itself and the weight is 1 / (t - 0) = 1 / t."""
    x, z = _e2e_inputs()
    t = torch.tensor([0.002, 0.1, 1.0, 10.0, 80.0], dtype=F64)
    r = C.ect_r(t, stage)
    clean = r <= 0
    weight = C.ect_weight(t, r, "inv_dt")
    student = C.consistency_function(_zero_net, x + _bc(t, x) * z, t, sigma_min=0.0)
    r_safe = torch.where(clean, t, r)  # the network is never evaluated at sigma = 0
    target = C.consistency_function(_zero_net, x + _bc(r_safe, x) * z, r_safe, sigma_min=0.0)
    target = torch.where(_bc(clean, x), x, target)
    per_sample = C.distance("pseudo_huber", student, target, 0.0) * 64 * weight  # sum form
    for v, p in zip(per_sample.tolist(), ECT_E2E[stage]):
        assert_spec(v, p)


ILCT_X = [[[[0.5, -0.25], [0.1, 0.0]]], [[[-0.4, 0.3], [0.2, -0.1]]]]
ILCT_Z = [[[[1.0, -1.0], [0.5, 0.2]]], [[[-0.3, 0.8], [-1.2, 0.4]]]]


def _toy_F(x_in: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
    return 0.1 * x_in * (1 + 0.001 * _bc(e, x_in))


def _ilct_toy(time_embed_scale: float, world_split: bool = False):
    x = torch.tensor(ILCT_X, dtype=F64)
    z = torch.tensor(ILCT_Z, dtype=F64)
    n_points = 11
    sigmas = C.karras_sigmas(n_points)
    descending = torch.tensor([3, 8])
    pair = (n_points - 1 - descending) - 1          # ascending student index minus one
    s_student, s_teacher = sigmas[pair + 1], sigmas[pair]
    kw = dict(sigma_min=0.002, sigma_data=0.5, time_embed_scale=time_embed_scale)
    with torch.no_grad():
        target = C.consistency_function(_toy_F, x + _bc(s_teacher, x) * z, s_teacher, **kw)
    student = C.consistency_function(_toy_F, x + _bc(s_student, x) * z, s_student, **kw)
    c = C.adaptive_c(n_points - 1, 10, 0.03456)
    ct = C.pair_weights(sigmas)[pair] * C.distance("cauchy", student, target, c)
    early = C.early_set_ict(pair, n_points)
    diff = C.diffusion_term(student, x, s_student, early, int(early.sum()))
    return s_student, s_teacher, ct, early, diff, ct.mean() + 5 * diff


def test_e2e_ilct_toy():
    s_student, s_teacher, ct, early, diff, total = _ilct_toy(1000.0)
    assert_spec(s_student[0], "12.3815761385")
    assert_spec(s_student[1], "0.0850872027")
    assert_spec(s_teacher[0], "5.83894763101")
    assert_spec(s_teacher[1], "0.0167207532")
    assert_spec(ct[0], "0.009777124401")
    assert_spec(ct[1], "10.660027232223")
    assert early.tolist() == [False, True]
    assert_spec(diff, "0.5696085134")
    assert_spec(total, "8.182944745182603")


def test_e2e_ilct_toy_edm_time_embedding():
    *_, total = _ilct_toy(1.0)
    assert_spec(total, "8.34736667932")
    # the two conventions are told apart far beyond the tolerance
    assert abs(total.item() - 8.182944745182603) > 0.1
