"""Tests for transforms/selection.py.

Statistical tests never fix a seed (uniforms come from os.urandom). Each statistical
assertion states its failure probability; every one is <= 1e-6.
"""

import math

import numpy as np
import pytest
from scipy import stats

from transforms import selection as S
from transforms.selection import (
    PyDPSelector,
    SecureSelector,
    SelectionStrategy,
    get_selector,
    keep_probabilities,
    keep_probability_table,
    select_partitions,
)

ALPHA = 1e-6
TG = SelectionStrategy.TRUNCATED_GEOMETRIC
LAP = SelectionStrategy.LAPLACE_THRESHOLDING
GAU = SelectionStrategy.GAUSSIAN_THRESHOLDING


def binomial_bounds(n, p, alpha):
    """Exact two-sided binomial acceptance region [lo, hi] with P(outside) <= alpha."""
    return stats.binom.ppf(alpha / 2, n, p), stats.binom.isf(alpha / 2, n, p)


def truncated_geometric_recursion(eps, delta, n_max):
    """Desfontaines et al. 2020: pi(n) = min(e^eps pi(n-1) + delta, 1 - e^-eps (1 - pi(n-1) - delta), 1)."""
    pi = [0.0]
    for _ in range(n_max):
        prev = pi[-1]
        pi.append(min(math.exp(eps) * prev + delta,
                      1 - math.exp(-eps) * (1 - prev - delta), 1.0))
    return np.array(pi)


# ----------------------------------------------------------------------------- tables


def test_truncated_geometric_reference_values():
    t = keep_probability_table(TG, 1.0, 1e-5, 1)
    assert t[0] == 0.0
    assert t[1] == pytest.approx(1e-5, rel=1e-9)
    assert t[5] == pytest.approx(8.5791e-4, abs=5e-9)
    assert t[10] == pytest.approx(0.128183, abs=5e-7)
    assert t[15] == pytest.approx(0.988072, abs=5e-7)
    assert t[20] == pytest.approx(0.999925, abs=5e-7)
    t = keep_probability_table(TG, 0.5, 0.02, 1)
    for n, p in [(1, 0.02), (2, 0.05297442541), (5, 0.34475496537), (10, 0.97095416395)]:
        assert t[n] == pytest.approx(p, abs=1e-10)


@pytest.mark.parametrize("eps, delta, m", [(1.0, 1e-5, 1), (0.5, 0.02, 1), (1.0, 1e-5, 4),
                                           (2.0, 1e-8, 3)])
def test_truncated_geometric_matches_recursion_with_m_split(eps, delta, m):
    """python-dp uses eps / m and delta' = 1 - (1 - delta)^(1/m) for m partitions per user."""
    t = keep_probability_table(TG, eps, delta, m)
    delta_m = -math.expm1(math.log1p(-delta) / m)
    ref = truncated_geometric_recursion(eps / m, delta_m, len(t) - 1)
    np.testing.assert_allclose(t, ref, rtol=1e-9, atol=1e-15)
    assert ref[-1] == 1.0


def test_laplace_thresholding_reference_values():
    t = keep_probability_table(LAP, 1.0, 1e-5, 1)
    assert t[1] == pytest.approx(1e-5, rel=1e-6)
    assert t[10] == pytest.approx(0.0810308, abs=5e-8)
    # Closed form: count + Lap(1/eps) > threshold = 1 + ln(1 / (2 delta)) / eps = 11.8198.
    threshold = 1 + math.log(1 / (2 * 1e-5))
    assert threshold == pytest.approx(11.8198, abs=1e-4)
    n = np.arange(1, len(t))
    closed = np.where(n <= threshold, 0.5 * np.exp(-(threshold - n)),
                      1 - 0.5 * np.exp(-(n - threshold)))
    np.testing.assert_allclose(t[1:], closed, rtol=1e-9, atol=1e-15)


@pytest.mark.parametrize("strategy", list(SelectionStrategy))
@pytest.mark.parametrize("eps, delta", [(1.0, 1e-5), (0.5, 0.02), (0.1, 1e-8)])
def test_table_is_monotone_reaches_one_and_is_dp(strategy, eps, delta):
    t = keep_probability_table(strategy, eps, delta, 1)
    assert t[0] == 0.0 and t[-1] == 1.0
    assert (t[:-1] < 1.0).all()  # stops at the first exact 1.0
    assert (np.diff(t) >= 0).all()
    # P(keep | 1 user) <= delta, up to python-dp's float rounding (observed 5e-10 relative
    # excess for Laplace thresholding at eps=0.1, delta=1e-8).
    assert t[1] <= delta * (1 + 1e-6)
    # (eps, delta)-DP of keep/drop between n and n+1 privacy units, both outcomes.
    slack = 1e-12
    assert (t[1:] <= math.exp(eps) * t[:-1] + delta + slack).all()
    assert (1 - t[:-1] <= math.exp(eps) * (1 - t[1:]) + delta + slack).all()


def test_table_is_cached_and_read_only():
    a = keep_probability_table(TG, 1.0, 1e-5, 1)
    b = keep_probability_table("truncated_geometric", 1, 1e-5, 1)
    assert a is b
    with pytest.raises(ValueError):
        a[1] = 0.5


def test_pre_threshold_shifts_table():
    for strategy in SelectionStrategy:
        base = keep_probability_table(strategy, 1.0, 1e-5, 1)
        pre = keep_probability_table(strategy, 1.0, 1e-5, 1, pre_threshold=5)
        assert (pre[:5] == 0).all()
        np.testing.assert_allclose(pre[5:5 + 10], base[1:11], rtol=1e-12)
    with pytest.raises(ValueError):
        keep_probability_table(TG, 1.0, 1e-5, 1, pre_threshold=0)


def test_max_count_truncation():
    t = keep_probability_table(TG, 1.0, 1e-5, 1, max_count=5)
    assert len(t) == 6 and t[-1] < 1.0
    assert keep_probabilities(np.array([0, 3, 5]), t)[2] == t[5]
    with pytest.raises(ValueError):
        keep_probabilities(np.array([0, 6]), t)
    full = keep_probability_table(TG, 1.0, 1e-5, 1)
    np.testing.assert_array_equal(keep_probabilities(np.array([0, 1, 10**9]), full),
                                  [0.0, full[1], 1.0])
    # max_count beyond the point where p reaches 1.0 gives the full table.
    np.testing.assert_array_equal(keep_probability_table(TG, 1.0, 1e-5, 1, max_count=1000), full)


@pytest.mark.parametrize("kwargs", [
    dict(epsilon=0.0), dict(epsilon=float("nan")), dict(delta=0.0), dict(delta=1.0),
    dict(max_partitions_contributed=0), dict(max_partitions_contributed=1.5),
    dict(strategy="exponential"),
])
def test_bad_parameters_rejected(kwargs):
    args = dict(strategy=TG, epsilon=1.0, delta=1e-5, max_partitions_contributed=1)
    args.update(kwargs)
    with pytest.raises(ValueError):
        keep_probability_table(**args)


# ----------------------------------------------------------------------------- selection


@pytest.mark.parametrize("bad", [
    np.array([1.0, 2.0]), np.array([1, -1]), np.array([True, False]), np.array(["1"]),
])
def test_bad_counts_rejected(bad):
    with pytest.raises(ValueError):
        select_partitions(bad, TG, 1.0, 1e-5, 1)


def test_deterministic_edges_and_shapes():
    counts = np.array([[0, 0, 10**9], [10**6, 0, 50]], dtype=np.int32)
    keep = select_partitions(counts, TG, 1.0, 1e-5, 1)
    assert keep.dtype == bool and keep.shape == (2, 3)
    # p = 0 is never kept, p = 1.0 always (uniforms are in (0, 1)).
    np.testing.assert_array_equal(keep, [[False, False, True], [True, False, True]])
    assert select_partitions(np.array([], dtype=np.int64), TG, 1.0, 1e-5, 1).shape == (0,)


def test_empirical_keep_rates_match_probabilities():
    """eps = 0.5, delta = 0.02 (so pi(1) = 0.02 is measurable; pi(5) = 0.3448 and
    pi(10) = 0.9710 are both < 1); 400k partitions each with 1, 5 and 10 users in one call. Each group's keep count lies in its exact binomial acceptance
    region; union bound over the 3 groups: total failure probability <= 1e-6."""
    eps, delta, n = 0.5, 0.02, 400_000
    table = keep_probability_table(TG, eps, delta, 1)
    sizes = [1, 5, 10]
    counts = np.repeat(np.array(sizes, dtype=np.int64), n)
    rng_perm = np.argsort(S.uniform_01(counts.size))  # mix groups (CSPRNG, not seeded)
    counts = counts[rng_perm]
    keep = select_partitions(counts, TG, eps, delta, 1)
    assert 0 < table[10] < 1
    for size in sizes:
        kept = int(keep[counts == size].sum())
        lo, hi = binomial_bounds(n, table[size], ALPHA / len(sizes))
        assert lo <= kept <= hi, (size, kept, lo, hi, table[size])


@pytest.mark.parametrize("strategy", list(SelectionStrategy))
def test_vectorized_agrees_with_pydp_selector(strategy):
    """Keep rates of the vectorized selector and of python-dp's should_keep, 100k partitions
    each with 1, 2 and 4 users (all with 0 < p < 1). Each of the 6 counts lies in the exact binomial acceptance
    region of the tabulated probability; union bound: failure probability <= 1e-6."""
    eps, delta, n = 1.0, 0.05, 100_000
    table = keep_probability_table(strategy, eps, delta, 1)
    sizes = (1, 2, 4)
    counts = np.repeat(np.array(sizes, dtype=np.int64), n)
    assert 0 < table[1] and table[4] < 1
    results = {"secure": SecureSelector(strategy, eps, delta, 1).select(counts),
               "pydp": PyDPSelector(strategy, eps, delta, 1).select(counts)}
    for name, keep in results.items():
        assert keep.dtype == bool and keep.shape == counts.shape
        for size in sizes:
            kept = int(keep[counts == size].sum())
            lo, hi = binomial_bounds(n, table[size], ALPHA / 6)
            assert lo <= kept <= hi, (name, size, kept, lo, hi, table[size])


def test_get_selector():
    assert isinstance(get_selector("secure", TG, 1.0, 1e-5, 1), SecureSelector)
    assert isinstance(get_selector("pydp", TG, 1.0, 1e-5, 1), PyDPSelector)
    with pytest.raises(ValueError):
        get_selector("fast", TG, 1.0, 1e-5, 1)
