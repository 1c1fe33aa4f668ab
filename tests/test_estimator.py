"""Estimator factors (plain SVD, activation-aware), second moments and the factor cache."""

import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sparselora_compile.runtime import estimator
from sparselora_compile.runtime.estimator import (
    DEFAULT_DAMPING,
    KINDS,
    activation_aware_factors,
    estimator_factors,
    plain_svd_factors,
    residual_variance,
)
from sparselora_compile.runtime.factor_cache import FactorCache, default_cache_dir, factor_key, weight_fingerprint
from sparselora_compile.runtime.second_moment import SecondMoment
from sparselora_compile.runtime.row_split import compute_split
from sparselora_compile.runtime.selection import mlp_scores


def outlier_layer(seed, n_in=64, n_out=96, n_huge=4, magnitude=30.0):
    """A random layer whose inputs have a few huge-magnitude channels, like real LLM activations."""
    g = torch.Generator().manual_seed(seed)
    scale = torch.ones(n_in)
    scale[torch.randperm(n_in, generator=g)[:n_huge]] = magnitude
    weight = torch.randn(n_out, n_in, generator=g) / n_in**0.5

    def sample(rows):
        return torch.randn(rows, n_in, generator=g) * scale

    return weight, sample


def moment_of(*batches):
    m = SecondMoment(batches[0].shape[-1])
    for x in batches:
        m.update(x)
    return m


def relative_output_error(x, weight, a, b):
    y = x @ weight.T
    return ((y - x @ a @ b).norm() / y.norm()).item()


def captured_mass(x, weight, a, b, k):
    """Oracle mass of the estimator's top-k output channels / the oracle top-k's mass."""
    oracle = (x @ weight.T).norm(dim=0) ** 2
    est = (x @ a @ b).norm(dim=0)
    return (oracle[est.topk(k).indices].sum() / oracle.topk(k).values.sum()).item()


def tail_norm(matrix, rank):
    s = torch.linalg.svdvals(matrix.double())
    return s[rank:].pow(2).sum().sqrt().item()


# ---- plain SVD -------------------------------------------------------------------------


def test_plain_svd_full_rank_reconstructs_exactly():
    w = torch.randn(40, 24, generator=torch.Generator().manual_seed(0))
    a, b = plain_svd_factors(w, 24)
    assert a.shape == (24, 24) and b.shape == (24, 40)
    torch.testing.assert_close(a @ b, w.T, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("rank", [1, 3, 8])
def test_plain_svd_is_best_rank_r(rank):
    g = torch.Generator().manual_seed(rank)
    w = torch.randn(30, 20, generator=g)
    a, b = plain_svd_factors(w, rank)
    err = (w.T - a @ b).double().norm().item()
    assert err == pytest.approx(tail_norm(w, rank), rel=1e-4)
    # Any other rank-r factorisation does no better (Eckart-Young), e.g. random ones.
    other = torch.randn(20, rank, generator=g) @ torch.randn(rank, 30, generator=g)
    assert (w.T - other).norm().item() > err


def test_rank_deficient_and_zero_weights_give_finite_exact_factors():
    g = torch.Generator().manual_seed(2)
    low = torch.randn(14, 2, generator=g) @ torch.randn(2, 9, generator=g)  # rank 2
    for w in (low, low.T.contiguous(), torch.zeros(7, 5)):
        a, b, _ = estimator_factors(w, 4)
        assert torch.isfinite(a).all() and torch.isfinite(b).all()
        torch.testing.assert_close(a @ b, w.T, rtol=1e-4, atol=1e-5)


# ---- activation-aware ------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(3))
def test_activation_aware_beats_plain_on_held_out_outlier_inputs(seed):
    w, sample = outlier_layer(seed)
    m = moment_of(*[sample(128) for _ in range(4)])
    held_out = sample(512)  # fresh draws, never seen by the moment
    for rank in (4, 8):
        plain = plain_svd_factors(w, rank)
        aware = activation_aware_factors(w, rank, m)
        err_plain = relative_output_error(held_out, w, *plain)
        err_aware = relative_output_error(held_out, w, *aware)
        assert err_aware < 0.5 * err_plain, (rank, err_aware, err_plain)
        mass_plain = captured_mass(held_out, w, *plain, k=24)
        mass_aware = captured_mass(held_out, w, *aware, k=24)
        assert mass_aware > mass_plain and mass_aware > 0.95, (rank, mass_aware, mass_plain)


def test_activation_aware_reaches_the_expected_error_bound_without_damping():
    w, sample = outlier_layer(7, n_in=32, n_out=48)
    m = moment_of(sample(400))
    c = m.matrix().double()
    a, b = activation_aware_factors(w, 6, m, damping=0.0)
    e = (w.T - a @ b).double()
    expected_err = torch.trace(e.T @ c @ e).sqrt().item()
    chol = torch.linalg.cholesky(c)
    assert expected_err == pytest.approx(tail_norm(chol.T @ w.T.double(), 6), rel=1e-3)


def test_activation_aware_with_isotropic_moment_equals_plain_svd():
    w = torch.randn(20, 16, generator=torch.Generator().manual_seed(3))
    iso = torch.eye(16)
    a, b = activation_aware_factors(w, 5, iso)
    pa, pb = plain_svd_factors(w, 5)
    torch.testing.assert_close(a @ b, pa @ pb, rtol=1e-4, atol=1e-5)


def test_activation_aware_survives_a_rank_deficient_moment():
    w = torch.randn(12, 10, generator=torch.Generator().manual_seed(4))
    x = torch.randn(50, 10)
    x[:, 3:] = 0.0  # channels that never fire make C singular
    a, b = activation_aware_factors(w, 4, moment_of(x), damping=0.0)
    assert torch.isfinite(a).all() and torch.isfinite(b).all()


# ---- residual variance and the corrected MLP score ---------------------------------------


def test_residual_variance_is_the_expected_squared_error():
    g = torch.Generator().manual_seed(20)
    n_in, n_out = 32, 40
    scale = torch.ones(n_in)
    scale[:3] = 20.0
    w = torch.randn(n_out, n_in, generator=g) / n_in**0.5
    x = torch.randn(300, n_in, generator=g) * scale
    m = moment_of(x)
    a, b, r = estimator_factors(w, 4, "activation_aware", m)
    assert torch.equal(r, residual_variance(w, a, b, m))
    # Exact on the rows the moment was built from: mean_t (x_t e_j)^2 = e_j^T C e_j.
    err = x.double() @ (w.double().T - (a @ b).double())
    torch.testing.assert_close(r, err.square().mean(0).float(), rtol=1e-4, atol=1e-7)
    # Monte Carlo on fresh draws against the true C = diag(scale^2).
    r_true = residual_variance(w, a, b, torch.diag(scale**2))
    fresh = torch.randn(40000, n_in, generator=g).double() * scale
    mc = (fresh @ (w.double().T - (a @ b).double())).square().mean(0)
    assert ((mc.float() - r_true).abs() / r_true).max() < 0.05
    assert r.min() > 0  # rank 4 of 32 leaves something in every channel


def test_whitened_residual_is_orthogonal_so_energies_add():
    """For the (undamped) activation-aware factors E[û ε] = 0, so E[u^2] = E[û^2] + σ²
    per channel: the identity the corrected score rests on. Plain SVD factors break it."""
    w, sample = outlier_layer(21, n_in=32, n_out=40)
    x = sample(300)
    m = moment_of(x)
    xd = x.double()
    for fa, fb, exact in [(*activation_aware_factors(w, 4, m, damping=0.0), True),
                          (*plain_svd_factors(w, 4), False)]:
        r = residual_variance(w, fa, fb, m).double()
        u_sq = (xd @ w.double().T).square().mean(0)
        u_hat_sq = (xd @ (fa @ fb).double()).square().mean(0)
        gap = (u_sq - u_hat_sq - r).abs().max() / u_sq.max()
        assert (gap < 1e-4) if exact else (gap > 1e-2), gap.item()


def gated_outlier_layer(seed, n_in=64, d_ff=256, n_huge=4, magnitude=10.0):
    """Gate/up weights whose rows differ in how much they read the ordinary (not huge)
    input channels, as real FFN rows do; inputs with a few huge channels."""
    g = torch.Generator().manual_seed(seed)
    huge = torch.randperm(n_in, generator=g)[:n_huge]
    scale = torch.ones(n_in)
    scale[huge] = magnitude
    ordinary = scale == 1

    def weight():
        w = torch.randn(d_ff, n_in, generator=g) / n_in**0.5
        w[:, ordinary] *= torch.exp(torch.randn(d_ff, 1, generator=g))
        return w

    return weight(), weight(), lambda rows: torch.randn(rows, n_in, generator=g) * scale


@pytest.mark.parametrize("seed", range(3))
def test_residual_correction_captures_more_oracle_mass_on_held_out_inputs(seed):
    wg, wu, sample = gated_outlier_layer(seed)
    m = moment_of(sample(512))
    fg, fu = (estimator_factors(w, 4, "activation_aware", m) for w in (wg, wu))
    k = wg.shape[0] // 4  # sparsity 0.75
    plain = corrected = 0.0
    for _ in range(4):  # held-out micro-batches, never seen by the moment
        x = sample(64)
        rows = torch.zeros(x.shape[0], dtype=torch.bool)
        oracle = (torch.nn.functional.silu(x @ wg.T) * (x @ wu.T)).square().sum(0)
        best = oracle.topk(k).values.sum()
        for name, rg, ru in (("plain", None, None), ("corrected", fg.residual, fu.residual)):
            est = mlp_scores(x, fg.a, fg.b, fu.a, fu.b, rg, ru, compute_split(rows))
            mass = (oracle[est.topk(k).indices].sum() / best).item() / 4
            if name == "plain":
                plain += mass
            else:
                corrected += mass
    assert corrected > plain + 0.05 and corrected > 0.9, (plain, corrected)


# ---- second moment ---------------------------------------------------------------------


def test_streamed_moment_equals_one_shot():
    g = torch.Generator().manual_seed(5)
    batches = [torch.randn(3, 7, 16, generator=g) for _ in range(4)]
    streamed = moment_of(*batches)
    flat = torch.cat([x.reshape(-1, 16) for x in batches]).double()
    assert streamed.count == flat.shape[0]
    torch.testing.assert_close(streamed.matrix(), (flat.T @ flat / flat.shape[0]).float(), rtol=1e-5, atol=1e-6)


def test_streamed_moment_with_row_mask_equals_one_shot_on_kept_rows():
    g = torch.Generator().manual_seed(6)
    batches = [torch.randn(2, 9, 8, generator=g) for _ in range(3)]
    masks = [torch.rand(2, 9, generator=g) > 0.4 for _ in range(3)]
    streamed = SecondMoment(8)
    for x, mask in zip(batches, masks):
        streamed.update(x, row_mask=mask)
    kept = torch.cat([x[mask] for x, mask in zip(batches, masks)]).double()
    assert streamed.count == kept.shape[0] == sum(int(mk.sum()) for mk in masks)
    torch.testing.assert_close(streamed.matrix(), (kept.T @ kept / kept.shape[0]).float(), rtol=1e-5, atol=1e-6)


def test_moment_merge_equals_streaming_both():
    g = torch.Generator().manual_seed(8)
    x1, x2 = torch.randn(10, 6, generator=g), torch.randn(5, 6, generator=g)
    merged = moment_of(x1).merge(moment_of(x2))
    both = moment_of(x1, x2)
    assert merged.count == both.count == 15
    torch.testing.assert_close(merged.matrix(), both.matrix())


def test_moment_errors_and_fingerprint():
    m = SecondMoment(4)
    with pytest.raises(ValueError, match="empty"):
        m.matrix()
    with pytest.raises(ValueError, match="last dimension must be 4"):
        m.update(torch.randn(3, 5))
    with pytest.raises(ValueError, match="cannot merge"):
        m.merge(SecondMoment(5))
    x = torch.randn(6, 4)
    assert moment_of(x).fingerprint() == moment_of(x.clone()).fingerprint()
    assert moment_of(x).fingerprint() != moment_of(x * 1.001).fingerprint()
    assert moment_of(x).fingerprint() != moment_of(x, x).fingerprint()  # same mean, more rows


# ---- cache -----------------------------------------------------------------------------


def forbid_recompute(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("factors were recomputed on what should be a cache hit")

    monkeypatch.setattr(estimator, "plain_svd_factors", fail)
    monkeypatch.setattr(estimator, "activation_aware_factors", fail)


@pytest.mark.parametrize("kind", KINDS)
def test_cache_hit_is_bitwise_identical(tmp_path, monkeypatch, kind):
    w, sample = outlier_layer(9, n_in=16, n_out=24)
    m = moment_of(sample(64))
    cache = FactorCache(tmp_path)
    a, b, r = estimator_factors(w, 4, kind, m, cache=cache)
    assert len(list(tmp_path.glob("*.safetensors"))) == 1
    assert not list(tmp_path.glob("*.tmp"))  # atomic write left no temp file
    forbid_recompute(monkeypatch)
    a2, b2, r2 = estimator_factors(w.clone(), 4, kind, m, cache=cache)
    assert torch.equal(a, a2) and torch.equal(b, b2) and torch.equal(r, r2)
    assert (r.abs().sum() > 0) == (kind == "activation_aware")  # the residual round-trips too


def test_cache_misses_on_changed_weight_moment_rank_or_kind(tmp_path):
    w, sample = outlier_layer(10, n_in=16, n_out=24)
    m = moment_of(sample(64))
    keys = {
        factor_key(w, 4, "activation_aware", m.fingerprint()),
        factor_key(w, 4, "svd"),
        factor_key(w, 5, "activation_aware", m.fingerprint()),
        factor_key(w, 4, "activation_aware", moment_of(sample(64)).fingerprint()),
    }
    changed = w.clone()
    changed[3, 5] = torch.nextafter(changed[3, 5], torch.tensor(1e9))  # one ulp in one element
    keys.add(factor_key(changed, 4, "activation_aware", m.fingerprint()))
    assert len(keys) == 5

    cache = FactorCache(tmp_path)
    estimator_factors(w, 4, "activation_aware", m, cache=cache)
    a, b, _ = estimator_factors(changed, 4, "activation_aware", m, cache=cache)
    estimator_factors(w, 4, "activation_aware", moment_of(sample(64)), cache=cache)
    assert len(list(tmp_path.glob("*.safetensors"))) == 3
    torch.testing.assert_close((a, b), activation_aware_factors(changed, 4, m))


def test_corrupt_cache_file_is_a_miss(tmp_path):
    w = torch.randn(24, 16, generator=torch.Generator().manual_seed(11))
    cache = FactorCache(tmp_path)
    a, b, _ = estimator_factors(w, 4, cache=cache)
    (path,) = tmp_path.glob("*.safetensors")
    path.write_bytes(b"\x00\x01 not a safetensors file")
    assert cache.get(path.stem) is None
    a2, b2, _ = estimator_factors(w, 4, cache=cache)  # recomputed and rewritten
    assert torch.equal(a, a2) and torch.equal(b, b2)
    assert cache.get(path.stem) is not None


def test_weight_fingerprint_is_content_based_on_both_paths():
    w = torch.randn(64, 33, generator=torch.Generator().manual_seed(12))
    for limit in (1 << 30, 0):  # host sha256 path, then the on-device integer hash
        fp = weight_fingerprint(w, host_hash_limit=limit)
        assert fp == weight_fingerprint(w.clone(), host_hash_limit=limit)
        for i, j in [(0, 0), (63, 32), (17, 5)]:
            changed = w.clone()
            changed[i, j] = torch.nextafter(changed[i, j], torch.tensor(1e9))
            assert weight_fingerprint(changed, host_hash_limit=limit) != fp
        swapped = w.clone()
        swapped[[0, 1]] = swapped[[1, 0]]  # same multiset of values, different positions
        assert weight_fingerprint(swapped, host_hash_limit=limit) != fp
        assert weight_fingerprint(w.to(torch.bfloat16), host_hash_limit=limit) != fp
        assert weight_fingerprint(w.reshape(33, 64), host_hash_limit=limit) != fp


def test_default_cache_dir_honours_env(monkeypatch, tmp_path):
    monkeypatch.setenv("SPARSELORA_CACHE", str(tmp_path / "c"))
    assert default_cache_dir() == tmp_path / "c"
    assert FactorCache().directory == tmp_path / "c"
    monkeypatch.delenv("SPARSELORA_CACHE")
    assert default_cache_dir().parts[-3:] == (".cache", "sparselora_compile", "factors")


# ---- degenerate inputs -----------------------------------------------------------------


@pytest.mark.parametrize("rank", [0, 9, 2.0, True])
def test_bad_rank_raises_naming_shape_and_rank(rank):
    w = torch.randn(12, 8)
    with pytest.raises(ValueError, match=r"shape \(12, 8\).*rank=") as info:
        estimator_factors(w, rank)
    assert repr(rank) in str(info.value)


def test_unknown_kind_lists_valid_kinds():
    with pytest.raises(ValueError, match="svd, activation_aware"):
        estimator_factors(torch.randn(4, 4), 2, kind="awq")


def test_non_finite_weight_raises():
    w = torch.randn(6, 5)
    w[2, 2] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        estimator_factors(w, 2)


def bad_moments():
    nonfinite = SecondMoment(8).update(torch.randn(4, 8))
    nonfinite.update(torch.full((1, 8), float("inf")))
    zero = SecondMoment(8).update(torch.zeros(5, 8))  # count > 0 but C = 0
    return {"none": None, "empty": SecondMoment(8), "non-finite": nonfinite, "all-zero": zero}


@pytest.mark.parametrize("name", ["none", "empty", "non-finite", "all-zero"])
def test_unusable_moment_falls_back_to_plain_svd_with_warning(name):
    w = torch.randn(10, 8, generator=torch.Generator().manual_seed(13))
    with pytest.warns(UserWarning, match="falling back to plain SVD"):
        a, b, r = estimator_factors(w, 3, "activation_aware", bad_moments()[name])
    pa, pb = plain_svd_factors(w, 3)
    assert torch.isfinite(a).all() and torch.isfinite(b).all()
    assert torch.equal(a, pa) and torch.equal(b, pb)
    assert r.shape == (10,) and not r.any()  # plain SVD: the paper's estimator, no residual


def test_moment_of_wrong_dim_raises():
    w = torch.randn(10, 8)
    with pytest.raises(ValueError, match="does not match the weight's input dimension 8"):
        estimator_factors(w, 3, "activation_aware", SecondMoment(6).update(torch.randn(4, 6)))


# ---- properties over shapes, ranks and dtypes -------------------------------------------


@st.composite
def weights_and_ranks(draw):
    out_dim, in_dim = draw(st.integers(1, 24)), draw(st.integers(1, 24))
    rank = draw(st.integers(1, min(out_dim, in_dim)))
    dtype = draw(st.sampled_from([torch.float32, torch.bfloat16, torch.float16]))
    seed = draw(st.integers(0, 2**16))
    w = torch.randn(out_dim, in_dim, generator=torch.Generator().manual_seed(seed)).to(dtype)
    return w, rank, seed


@settings(max_examples=60, deadline=None)
@given(weights_and_ranks())
def test_factors_shapes_dtype_and_optimality(case):
    w, rank, seed = case
    out_dim, in_dim = w.shape
    w32 = w.float()
    a, b, r = estimator_factors(w, rank)
    assert r.shape == (out_dim,) and not r.any()
    assert a.shape == (in_dim, rank) and b.shape == (rank, out_dim)
    assert a.dtype == b.dtype == torch.float32 and a.is_contiguous() and b.is_contiguous()
    assert torch.isfinite(a).all() and torch.isfinite(b).all()
    err = (w32.T - a @ b).double().norm().item()
    assert err == pytest.approx(tail_norm(w32, rank), rel=1e-3, abs=1e-4)

    g = torch.Generator().manual_seed(seed + 1)
    m = moment_of(torch.randn(2 * in_dim + 1, in_dim, generator=g) * torch.rand(in_dim, generator=g) * 10)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a usable moment must not fall back
        aa, ab, ar = estimator_factors(w, rank, "activation_aware", m)
    assert aa.shape == (in_dim, rank) and ab.shape == (rank, out_dim) and aa.dtype == torch.float32
    assert torch.isfinite(aa).all() and torch.isfinite(ab).all()
    assert ar.shape == (out_dim,) and ar.dtype == torch.float32 and (ar >= 0).all() and torch.isfinite(ar).all()
    # Optimal for the damped moment it factorises, so no worse than plain SVD there.
    c = m.matrix().double()
    c = c + DEFAULT_DAMPING * c.diagonal().mean() * torch.eye(in_dim, dtype=torch.float64)

    def expected_err(fa, fb):
        e = (w32.T - fa @ fb).double()
        return torch.trace(e.T @ c @ e).clamp_min(0).sqrt().item()

    assert expected_err(aa, ab) <= expected_err(a, b) * (1 + 1e-3) + 1e-4


def test_joined_factors_follow_in_place_refresh():
    """The joined A factors are cached per factor set, and an in-place refresh (what the
    warm-up's activation-aware refresh does) must show in the next call."""
    from sparselora_compile.runtime.selection import JoinedFactors
    joined_factors = JoinedFactors().get
    a, b = torch.randn(8, 2), torch.randn(8, 3)
    first = joined_factors((a, b), torch.float16)
    torch.testing.assert_close(first, torch.cat([a, b], 1).half())
    assert joined_factors((a, b), torch.float16) is first  # cached
    with torch.no_grad():
        a.mul_(2.0)
    torch.testing.assert_close(joined_factors((a, b), torch.float16), torch.cat([a, b], 1).half())
    assert joined_factors((a, b), torch.float32).dtype == torch.float32
