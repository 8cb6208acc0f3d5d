"""Tests for transforms/noise.py.

Statistical tests never fix a seed: the production sampler draws from os.urandom. Each
statistical assertion states its failure probability (false alarm when the code is
correct); every one is <= 1e-6.
"""

import ast
import inspect
import math
import os

import numpy as np
import pytest
from scipy import stats

from transforms import noise as N
from transforms.noise import (
    NoiseKind,
    NoiseParams,
    NoNoiseSampler,
    PyDPNoiseSampler,
    SecureNoiseSampler,
    calibrate,
    calibrate_gaussian,
    calibrate_laplace,
    get_sampler,
    uniform_01,
)

ALPHA = 1e-6  # per-assertion failure probability of the statistical tests
Z_TWO_SIDED = stats.norm.isf(ALPHA / 2)  # ~4.89


def ks_critical_2samp(n, m, alpha=ALPHA):
    """Asymptotic (Smirnov) critical value of the two-sample KS statistic at level alpha."""
    return math.sqrt(-math.log(alpha / 2) / 2) * math.sqrt((n + m) / (n * m))


def on_grid(values, g):
    scaled = np.asarray(values) / g  # exact: g is a power of two
    return bool(np.all(scaled == np.rint(scaled)))


LAPLACE_1 = calibrate_laplace(1.0, 1.0)  # b = 1
LAPLACE_10 = calibrate_laplace(0.5, 5.0)  # b = 10
GAUSS_1 = calibrate_gaussian(1.0, 1e-5, 1.0)  # sigma = 3.732421875


# ----------------------------------------------------------------------------- calibration


@pytest.mark.parametrize(
    "eps, delta, sigma",
    [
        (1.0, 1e-5, 3.732421875),
        (math.log(3), 1e-5, 3.42578125),
        (0.5, 1e-5, 7.03515625),
        (0.5, 1e-10, 11.4375),
    ],
)
def test_gaussian_calibration_matches_reference(eps, delta, sigma):
    p = calibrate_gaussian(eps, delta, 1.0)
    assert p.kind is NoiseKind.GAUSSIAN
    assert p.scale == sigma
    assert p.std == sigma
    assert (p.epsilon, p.delta, p.l2_sensitivity, p.l1_sensitivity) == (eps, delta, 1.0, None)
    # Rounded up from the analytic Gaussian (Balle & Wang), well below the classical formula.
    assert sigma < math.sqrt(2 * math.log(1.25 / delta)) / eps


def test_gaussian_calibration_scales_with_l2():
    assert calibrate_gaussian(1.0, 1e-5, 2.0).scale == pytest.approx(2 * 3.732421875, rel=1e-3)
    assert calibrate_gaussian(1.0, 1e-5, 2.0).scale >= 2 * 3.730632


@pytest.mark.parametrize("eps, l1", [(1.0, 1.0), (0.1, 1.0), (0.5, 3.0), (math.log(3), 2.0)])
def test_laplace_calibration_is_l1_over_eps(eps, l1):
    p = calibrate_laplace(eps, l1)
    assert p.kind is NoiseKind.LAPLACE
    assert p.scale == pytest.approx(l1 / eps, rel=1e-15)
    assert p.std == pytest.approx(math.sqrt(2) * l1 / eps, rel=1e-15)
    assert p.delta == 0.0 and p.l1_sensitivity == l1 and p.l2_sensitivity is None


def test_calibrate_dispatch_and_validation():
    assert calibrate("laplace", 1.0, 1e-5, 2.0, None) == calibrate_laplace(1.0, 2.0)
    assert calibrate(NoiseKind.GAUSSIAN, 1.0, 1e-5, None, 1.0) == GAUSS_1
    for bad in [
        lambda: calibrate_laplace(0.0, 1.0),
        lambda: calibrate_laplace(1.0, -1.0),
        lambda: calibrate_laplace(float("inf"), 1.0),
        lambda: calibrate_gaussian(1.0, 0.0, 1.0),
        lambda: calibrate_gaussian(1.0, 1.0, 1.0),
        lambda: calibrate_gaussian(1.0, 1e-5, 0.0),
        lambda: calibrate("gaussian", 1.0, 1e-5, 1.0, None),
        lambda: calibrate("poisson", 1.0, 1e-5, 1.0, 1.0),
    ]:
        with pytest.raises(ValueError):
            bad()


def test_granularity_and_confidence_interval():
    assert LAPLACE_1.granularity == 2.0**-40
    assert LAPLACE_10.granularity == 2.0**-36
    assert GAUSS_1.granularity == 2.0**-38  # 3.73 / 2**40 -> next power of two
    assert calibrate_laplace(1.0, 2.0**-3).granularity == 2.0**-43
    assert LAPLACE_1.confidence_interval_halfwidth(0.95) == pytest.approx(
        stats.laplace.ppf(0.975, scale=1.0), rel=1e-12)
    assert LAPLACE_10.confidence_interval_halfwidth(0.9) == pytest.approx(
        stats.laplace.ppf(0.95, scale=10.0), rel=1e-12)
    assert GAUSS_1.confidence_interval_halfwidth() == pytest.approx(
        stats.norm.ppf(0.975, scale=3.732421875), rel=1e-12)


# ----------------------------------------------------------------------------- snapping

OFF_GRID = np.array([0.1, 1 / 3, math.pi, -7.3, 1e6 + 0.1, 12345.678901, 0.0, -1e-300])


@pytest.mark.parametrize("params, g", [(LAPLACE_1, 2.0**-40), (LAPLACE_10, 2.0**-36),
                                       (GAUSS_1, 2.0**-38)])
def test_outputs_are_exact_multiples_of_granularity(params, g):
    assert params.granularity == g
    x = np.repeat(OFF_GRID, 5000)
    assert not on_grid(x, g)
    y = SecureNoiseSampler().add_noise(x, params)
    assert on_grid(y, g)
    # ...and the grid really is g, not coarser: some outputs are odd multiples of g.
    # Failure probability ~2**-40000 (each output is an odd multiple w.p. ~1/2).
    assert not on_grid(y[np.abs(y) < 2**40 * g], 2 * g)


def test_pydp_laplace_is_on_the_same_grid():
    """Reference fact: python-dp's Laplace outputs are multiples of 2**-40 (b=1) and 2**-36 (b=10)."""
    x = np.repeat(OFF_GRID[:4], 500)
    assert on_grid(PyDPNoiseSampler().add_noise(x, LAPLACE_1), 2.0**-40)
    assert on_grid(PyDPNoiseSampler().add_noise(x, LAPLACE_10), 2.0**-36)


def test_laplace_snapping_formula_with_constant_bytes(monkeypatch):
    """Arithmetic check (not a statistical test): with all-zero random bytes U1 = U2, so
    K = G1 - G2 = 0 and the output is exactly round(x / g) * g."""
    monkeypatch.setattr(N.os, "urandom", lambda k: bytes(k))
    x = OFF_GRID
    g = LAPLACE_1.granularity
    np.testing.assert_array_equal(SecureNoiseSampler().add_noise(x, LAPLACE_1), np.rint(x / g) * g)


# ----------------------------------------------------------------------------- moments

N_MOMENT = 200_000


def test_laplace_variance_matches_std():
    """Mean of squares of n Laplace(b) draws: E = 2 b^2, Var = 20 b^4 / n. Two-sided normal
    bound (CLT, n = 2e5) at failure probability 1e-6."""
    for p in (LAPLACE_1, LAPLACE_10):
        noise = SecureNoiseSampler().add_noise(np.zeros(N_MOMENT), p)
        m2 = np.mean(noise**2)
        sd = math.sqrt(20.0 / N_MOMENT) * p.scale**2
        assert abs(m2 - p.std**2) <= Z_TWO_SIDED * sd, (m2, p.std**2)


def test_gaussian_variance_matches_std():
    """sum (X / sigma)^2 ~ chi2(n) exactly (grid rounding is ~2**-40 sigma); two-sided
    chi-square quantiles at failure probability 1e-6."""
    for p in (GAUSS_1, calibrate_gaussian(0.5, 1e-10, 3.0)):
        noise = SecureNoiseSampler().add_noise(np.zeros(N_MOMENT), p)
        q = np.sum((noise / p.scale) ** 2)
        lo, hi = stats.chi2.ppf(ALPHA / 2, N_MOMENT), stats.chi2.isf(ALPHA / 2, N_MOMENT)
        assert lo <= q <= hi, (q, lo, hi)


@pytest.mark.parametrize("params", [LAPLACE_1, LAPLACE_10, GAUSS_1])
def test_noise_is_unbiased(params):
    """Mean of n noised copies of an off-grid value: |mean - x| <= z * std / sqrt(n) + g/2
    (two-sided normal bound, failure probability 1e-6; Gaussian exact, Laplace by CLT)."""
    x = 5.3
    y = SecureNoiseSampler().add_noise(np.full(N_MOMENT, x), params)
    bound = Z_TWO_SIDED * params.std / math.sqrt(N_MOMENT) + params.granularity
    assert abs(y.mean() - x) <= bound


# ----------------------------------------------------------------------------- distribution

N_PYDP = 60_000  # python-dp is ~5 us/value
N_SECURE = 200_000


@pytest.mark.parametrize("params", [LAPLACE_1, GAUSS_1], ids=["laplace", "gaussian"])
def test_secure_matches_pydp_two_sample_ks(params):
    """Two-sample KS, secure vs python-dp, same parameters and an off-grid input. Asymptotic
    Smirnov critical value at alpha = 1e-6 (conservative for these sample sizes)."""
    x = 0.3
    secure = SecureNoiseSampler().add_noise(np.full(N_SECURE, x), params)
    ref = PyDPNoiseSampler().add_noise(np.full(N_PYDP, x), params)
    d = stats.ks_2samp(secure, ref).statistic
    assert d <= ks_critical_2samp(N_SECURE, N_PYDP), d


def test_secure_matches_exact_distribution_one_sample_ks():
    """One-sample KS against the continuous Laplace / normal CDF (the 2**-40 grid is far
    below KS resolution); critical value from scipy.stats.kstwo at alpha = 1e-6."""
    crit = stats.kstwo.isf(ALPHA, N_SECURE)
    for params, dist in [(LAPLACE_10, stats.laplace(scale=10.0)),
                         (GAUSS_1, stats.norm(scale=GAUSS_1.scale))]:
        noise = SecureNoiseSampler().add_noise(np.zeros(N_SECURE), params)
        d = stats.kstest(noise, dist.cdf).statistic
        assert d <= crit, (params.kind, d, crit)


# ----------------------------------------------------------------------------- API behaviour


@pytest.mark.parametrize("params", [LAPLACE_1, GAUSS_1])
def test_add_noise_contract(params):
    s = SecureNoiseSampler()
    x = np.arange(12, dtype=np.int64).reshape(3, 4)
    x_copy = x.copy()
    y = s.add_noise(x, params)
    assert y.dtype == np.float64 and y.shape == (3, 4)
    np.testing.assert_array_equal(x, x_copy)
    xf = np.linspace(-3, 3, 10_001)  # odd size: exercises the Box-Muller pairing
    xf_copy = xf.copy()
    yf = s.add_noise(xf, params)
    np.testing.assert_array_equal(xf, xf_copy)
    assert yf.shape == xf.shape and np.isfinite(yf).all()
    # Fresh randomness on every call; P(two continuous-ish draws coincide) ~ 2**-40 each.
    assert not np.array_equal(yf, s.add_noise(xf, params))
    assert not np.array_equal(yf, SecureNoiseSampler().add_noise(xf, params))
    assert s.add_noise(np.array([]), params).shape == (0,)
    with pytest.raises(ValueError):
        s.add_noise(np.array([1.0, np.nan]), params)
    with pytest.raises(ValueError):
        s.add_noise(np.array([np.inf]), params)


def test_add_noise_uses_bulk_urandom(monkeypatch):
    calls = []
    real = os.urandom

    def counting(k):
        calls.append(k)
        return real(k)

    monkeypatch.setattr(N.os, "urandom", counting)
    n = 3 * N._BLOCK + 17
    SecureNoiseSampler().add_noise(np.zeros(n), LAPLACE_1)
    assert len(calls) == 4 and sum(calls) == 16 * n  # two 64-bit words per Laplace value
    calls.clear()
    uniform_01(100_000)
    assert calls == [800_000]


def test_uniform_01():
    u = uniform_01(100_000)
    assert u.dtype == np.float64 and u.shape == (100_000,)
    assert (u > 0).all() and (u < 1).all()
    k = u * 2.0**53
    assert (k == np.rint(k)).all()  # on the 53-bit grid
    # Uniform mean: sd = sqrt(1/12 / n); two-sided normal bound, failure prob 1e-6.
    assert abs(u.mean() - 0.5) <= Z_TWO_SIDED * math.sqrt(1 / 12 / u.size)
    # Low bits are random too: some draws use the 53rd bit. Failure prob 2**-100000.
    assert not (k % 2 == 0).all()
    assert uniform_01(0).shape == (0,)
    with pytest.raises(ValueError):
        uniform_01(-1)


def test_pydp_sampler_handles_ints_and_checks_params():
    y = PyDPNoiseSampler().add_noise(np.array([1, 2, 3]), LAPLACE_1)
    assert y.dtype == np.float64
    # python-dp returns an int for int input; we pass floats, so outputs are on the grid, not integers.
    # Failure probability: all three outputs integral ~ (2**-40)**3.
    assert not np.all(y == np.rint(y))
    forged = NoiseParams(NoiseKind.LAPLACE, 2.0, 1.0, 0.0, 1.0, None)  # b inconsistent with eps, l1
    with pytest.raises(ValueError):
        PyDPNoiseSampler().add_noise(np.zeros(3), forged)


def test_no_noise_sampler_requires_explicit_flag():
    with pytest.raises(ValueError):
        NoNoiseSampler()
    with pytest.raises(ValueError):
        NoNoiseSampler(i_understand_this_is_not_private=False)
    with pytest.raises(TypeError):
        NoNoiseSampler(True)  # keyword only
    s = NoNoiseSampler(i_understand_this_is_not_private=True)
    x = np.array([1, 2, 3])
    y = s.add_noise(x, LAPLACE_1)
    assert y.dtype == np.float64
    np.testing.assert_array_equal(y, [1.0, 2.0, 3.0])


def test_get_sampler(monkeypatch):
    assert isinstance(get_sampler(), SecureNoiseSampler)
    assert isinstance(get_sampler("secure"), SecureNoiseSampler)
    assert isinstance(get_sampler("pydp"), PyDPNoiseSampler)
    monkeypatch.delenv(N.ALLOW_NO_NOISE_ENV, raising=False)
    with pytest.raises(ValueError):
        get_sampler("none")
    monkeypatch.setenv(N.ALLOW_NO_NOISE_ENV, "true")
    with pytest.raises(ValueError):
        get_sampler("none")
    monkeypatch.setenv(N.ALLOW_NO_NOISE_ENV, "1")
    assert isinstance(get_sampler("none"), NoNoiseSampler)
    with pytest.raises(ValueError):
        get_sampler("fast")


FORBIDDEN_IDENTIFIERS = {
    "seed", "default_rng", "RandomState", "SeedSequence", "Generator", "PCG64", "MT19937",
    "Philox", "SFC64", "laplace", "normal", "random",
}


@pytest.mark.parametrize("module_name", ["transforms.noise", "transforms.selection"])
def test_no_seeded_or_numpy_random_generator_in_source(module_name):
    """The production path draws from os.urandom only: no numpy.random / random module,
    no seeds, anywhere in the code (docstrings are not inspected)."""
    import importlib

    tree = ast.parse(inspect.getsource(importlib.import_module(module_name)))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Name):
            names.add(node.id)
        elif isinstance(node, ast.Attribute):
            names.add(node.attr)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            for alias in node.names:
                names.update(alias.name.split("."))
                if alias.asname:
                    names.add(alias.asname)
            if isinstance(node, ast.ImportFrom) and node.module:
                names.update(node.module.split("."))
        elif isinstance(node, ast.keyword) and node.arg:
            names.add(node.arg)
    assert not names & FORBIDDEN_IDENTIFIERS, names & FORBIDDEN_IDENTIFIERS


@pytest.mark.parametrize("eps", [0.01, 0.25, 1.0, math.log(3), 3.7, 20.0])
@pytest.mark.parametrize("sens", [1.0, 2.5, 12.0, 600.0])
def test_calibration_is_pipeline_dps_exactly(eps, sens):
    # The run calls python-dp directly (importing pipeline-dp costs seconds); the scales
    # must be bit-for-bit what pipeline-dp's dp_computations gives.
    from pipeline_dp import dp_computations as dpc
    assert calibrate_laplace(eps, sens).scale == dpc.LaplaceMechanism.create_from_epsilon(eps, sens).noise_parameter
    for delta in (1e-10, 1e-7, 1e-5):
        assert (calibrate_gaussian(eps, delta, sens).scale
                == dpc.GaussianMechanism.create_from_epsilon_delta(eps, delta, sens).std)
