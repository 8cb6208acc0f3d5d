"""Secure, vectorized additive noise for released values (pure numpy, no Beam).

Privacy invariants (see DESIGN.md, "Privacy model and invariants"):

* Every random bit used for released values comes from the operating system's CSPRNG
  (``os.urandom``), fetched in bulk. ``numpy.random`` is never used here and nothing is
  ever seeded.
* Noise scales come from pipeline-dp / python-dp calibration (:func:`calibrate_laplace`,
  :func:`calibrate_gaussian`), never from hand-derived formulas.
* Outputs are snapped to a power-of-two grid, as Google's DP library does, so that the
  set of possible outputs does not depend on the low-order bits of the input (the
  floating-point attack of Mironov 2012).

Samplers:

* :class:`SecureNoiseSampler` -- the default, vectorized (several million values/s).
* :class:`PyDPNoiseSampler` -- python-dp's own mechanism called once per value; slow
  (~5 us/value) but it is the reference the secure sampler is tested against.
* :class:`NoNoiseSampler` -- TEST ONLY, returns the input unchanged.
"""

from __future__ import annotations

import dataclasses
import enum
import math
import os
import statistics
from typing import Optional, Union

import numpy as np

__all__ = [
    "NoiseKind",
    "NoiseParams",
    "calibrate_laplace",
    "calibrate_gaussian",
    "calibrate",
    "SecureNoiseSampler",
    "PyDPNoiseSampler",
    "NoNoiseSampler",
    "get_sampler",
    "uniform_01",
    "ALLOW_NO_NOISE_ENV",
]

#: Environment variable that must equal "1" for ``get_sampler("none")`` to succeed.
ALLOW_NO_NOISE_ENV = "CLICKDP_ALLOW_NO_NOISE"

#: Google's DP library: granularity = next power of two >= scale / 2**40.
_GRANULARITY_PARAM = float(2**40)

#: Values processed per os.urandom call / per vectorized block in add_noise. Large enough
#: to amortize Python overhead, small enough to stay in cache.
_BLOCK = 1 << 16

#: Largest number of 64-bit words fetched by one os.urandom call in uniform_01.
_MAX_WORDS_PER_CALL = 1 << 22

_TWO_POW_M53 = 2.0**-53
_SHIFT_11 = np.uint64(11)


# --------------------------------------------------------------------------------------
# CSPRNG uniforms
# --------------------------------------------------------------------------------------


def _random_words(n: int) -> np.ndarray:
    """``n`` uniformly random uint64 words from os.urandom, in one call (read-only)."""
    return np.frombuffer(os.urandom(8 * n), dtype=np.uint64)


def _fill_uniform_0_1_closed(out: np.ndarray) -> np.ndarray:
    """Fill float64 ``out`` with CSPRNG uniforms on the grid {k / 2**53 : k = 1..2**53}.

    These are in (0, 1], 53-bit, exactly representable; one os.urandom call.
    """
    words = _random_words(out.size)
    np.right_shift(words, _SHIFT_11, out=out, casting="unsafe")  # uint64 -> float64, exact
    out += 1.0
    out *= _TWO_POW_M53
    return out


def uniform_01(n: int) -> np.ndarray:
    """``n`` CSPRNG uniforms in the open interval (0, 1), float64, 53-bit resolution.

    Each value is ``k / 2**53`` with ``k`` uniform on ``1 .. 2**53 - 1`` (53 random bits from
    ``os.urandom``; the value 0, probability 2**-53, is redrawn). The random bytes are
    fetched in bulk: one ``os.urandom`` call per array (split only for very large ``n``).
    """
    n = int(n)
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    out = np.empty(n, dtype=np.float64)
    for start in range(0, n, _MAX_WORDS_PER_CALL):
        block = out[start : start + _MAX_WORDS_PER_CALL]
        np.right_shift(_random_words(block.size), _SHIFT_11, out=block, casting="unsafe")
        zeros = np.flatnonzero(block == 0.0)
        while zeros.size:  # probability ~ n * 2**-53 of ever running
            block[zeros] = (_random_words(zeros.size) >> _SHIFT_11).astype(np.float64)
            zeros = zeros[block[zeros] == 0.0]
        block *= _TWO_POW_M53
    return out


# --------------------------------------------------------------------------------------
# Parameters and calibration
# --------------------------------------------------------------------------------------


class NoiseKind(str, enum.Enum):
    LAPLACE = "laplace"
    GAUSSIAN = "gaussian"


def _next_power_of_two(x: float) -> float:
    """Smallest power of two >= x (x > 0), computed exactly."""
    if not (x > 0.0 and math.isfinite(x)):
        raise ValueError(f"expected a finite positive number, got {x!r}")
    mantissa, exponent = math.frexp(x)  # x = mantissa * 2**exponent, 0.5 <= mantissa < 1
    if mantissa == 0.5:
        return x
    return math.ldexp(1.0, exponent)


@dataclasses.dataclass(frozen=True)
class NoiseParams:
    """A calibrated additive-noise mechanism.

    ``scale`` is the Laplace diversity ``b`` or the Gaussian standard deviation ``sigma``,
    exactly as python-dp computes it. ``delta`` is 0 for Laplace.
    """

    kind: NoiseKind
    scale: float
    epsilon: float
    delta: float
    l1_sensitivity: Optional[float]
    l2_sensitivity: Optional[float]

    def __post_init__(self):
        object.__setattr__(self, "kind", NoiseKind(self.kind))
        if not (self.scale > 0 and math.isfinite(self.scale)):
            raise ValueError(f"noise scale must be finite and > 0, got {self.scale!r}")

    @property
    def std(self) -> float:
        """Standard deviation of the noise: sqrt(2) * b (Laplace) or sigma (Gaussian)."""
        if self.kind is NoiseKind.LAPLACE:
            return math.sqrt(2.0) * self.scale
        return self.scale

    @property
    def granularity(self) -> float:
        """Power of two on whose multiples all noised outputs lie.

        Laplace: Google's DP library rule, next power of two >= b / 2**40
        (b = 1 -> 2**-40, b = 10 -> 2**-36). Gaussian: the same rule applied to sigma
        (coarser than python-dp's internal grid; see :class:`SecureNoiseSampler`).
        """
        return _next_power_of_two(self.scale / _GRANULARITY_PARAM)

    def confidence_interval_halfwidth(self, level: float = 0.95) -> float:
        """Half-width ``h`` such that P(|noise| <= h) = ``level`` (true value +- h).

        Laplace: ``b * ln(1 / (1 - level))``; Gaussian: ``sigma * z_{(1 + level) / 2}``.
        The snapping to ``granularity`` (~scale * 2**-40) is negligible here.
        """
        if not 0.0 < level < 1.0:
            raise ValueError(f"level must be in (0, 1), got {level!r}")
        if self.kind is NoiseKind.LAPLACE:
            return self.scale * -math.log1p(-level)
        return self.scale * statistics.NormalDist().inv_cdf(0.5 + level / 2.0)


def _check_epsilon(epsilon: float) -> float:
    epsilon = float(epsilon)
    if not (epsilon > 0 and math.isfinite(epsilon)):
        raise ValueError(f"epsilon must be finite and > 0, got {epsilon!r}")
    return epsilon


def _check_sensitivity(name: str, value) -> float:
    if value is None:
        raise ValueError(f"{name} is required")
    value = float(value)
    if not (value > 0 and math.isfinite(value)):
        raise ValueError(f"{name} must be finite and > 0, got {value!r}")
    return value


def calibrate_laplace(epsilon: float, l1_sensitivity: float) -> NoiseParams:
    """Laplace mechanism: b from python-dp (``b = l1 / eps``), the mechanism pipeline-dp's
    ``LaplaceMechanism.create_from_epsilon`` wraps (tests check both agree). python-dp is
    called directly: importing pipeline-dp pulls in Beam, dp_accounting and SciPy."""
    from pydp.algorithms import numerical_mechanisms as nm

    epsilon = _check_epsilon(epsilon)
    l1 = _check_sensitivity("l1_sensitivity", l1_sensitivity)
    mech = nm.LaplaceMechanism(epsilon=epsilon, sensitivity=l1)
    return NoiseParams(
        kind=NoiseKind.LAPLACE,
        scale=float(mech.diversity),
        epsilon=epsilon,
        delta=0.0,
        l1_sensitivity=l1,
        l2_sensitivity=None,
    )


def calibrate_gaussian(epsilon: float, delta: float, l2_sensitivity: float) -> NoiseParams:
    """Gaussian mechanism: sigma from pipeline-dp / python-dp.

    python-dp uses the analytic Gaussian mechanism (Balle & Wang 2018) and rounds sigma
    up to a power-of-two grid, e.g. eps=1, delta=1e-5, l2=1 -> 3.732421875. This is the
    mechanism pipeline-dp's ``GaussianMechanism.create_from_epsilon_delta`` wraps.
    """
    from pydp.algorithms import numerical_mechanisms as nm

    epsilon = _check_epsilon(epsilon)
    delta = float(delta)
    if not 0.0 < delta < 1.0:
        raise ValueError(f"delta must be in (0, 1) for the Gaussian mechanism, got {delta!r}")
    l2 = _check_sensitivity("l2_sensitivity", l2_sensitivity)
    mech = nm.GaussianMechanism(epsilon=epsilon, delta=delta, sensitivity=l2)
    return NoiseParams(
        kind=NoiseKind.GAUSSIAN,
        scale=float(mech.std),
        epsilon=epsilon,
        delta=delta,
        l1_sensitivity=None,
        l2_sensitivity=l2,
    )


def calibrate(
    kind: Union[NoiseKind, str],
    epsilon: float,
    delta: float,
    l1_sensitivity: Optional[float],
    l2_sensitivity: Optional[float],
) -> NoiseParams:
    """Dispatch to :func:`calibrate_laplace` (uses eps, l1; consumes no delta) or
    :func:`calibrate_gaussian` (uses eps, delta, l2)."""
    kind = NoiseKind(kind)
    if kind is NoiseKind.LAPLACE:
        return calibrate_laplace(epsilon, l1_sensitivity)
    return calibrate_gaussian(epsilon, delta, l2_sensitivity)


# --------------------------------------------------------------------------------------
# Samplers
# --------------------------------------------------------------------------------------


def _as_float_input(values) -> np.ndarray:
    arr = np.asarray(values)
    if arr.dtype.kind not in "biuf":
        raise TypeError(f"values must be numeric, got dtype {arr.dtype}")
    arr = arr.astype(np.float64, copy=False)
    if not np.isfinite(arr).all():
        raise ValueError("values must be finite (clamp before adding noise)")
    return arr


class SecureNoiseSampler:
    """Vectorized Laplace / Gaussian noise from the OS CSPRNG, snapped to a power-of-two grid.

    Randomness: 64-bit words from ``os.urandom`` fetched in bulk (one call per block of
    ``_BLOCK`` values), turned into 53-bit uniforms ``k / 2**53`` in (0, 1].

    **Laplace** (as Google's DP library, ``LaplaceDistribution``): with ``g`` = next power of
    two >= ``b / 2**40``, the output is ``round(x / g) * g + g * K`` where ``K`` is a two-sided
    geometric, P(K = k) proportional to exp(-|k| g / b). ``K = G1 - G2`` with ``G1, G2`` iid
    geometric, ``G = floor(E / (g / b))`` and ``E = -log(U) ~ Exp(1)``. Because U >= 2**-53,
    E <= 53 ln 2 ~= 36.7: each geometric is truncated at ~36.7 b, a tail of probability
    ~e^-36.7 ~= 1e-16 (a negligible change of the distribution, far below any delta used).
    All outputs are exact multiples of ``g`` (sums of multiples of a power of two are
    multiples of it, also after float rounding for huge magnitudes).

    **Gaussian** (a documented departure from python-dp): python-dp samples a binomial
    on a grid of ``2 sigma / 2**57``, finer than the float spacing of typical outputs, so
    its "snapping" is not effective and cannot be reproduced meaningfully by a vectorized
    float sampler. Here ``g`` = next power of two >= ``sigma / 2**40`` (the Laplace rule),
    ``Z ~ N(0, 1)`` by Box-Muller on CSPRNG uniforms (both outputs of each pair used), and
    the output is ``round(x / g) * g + round(sigma * Z / g) * g``: every output lies on the
    grid ``g * Z`` and the support of the noise does not depend on the input. The grid is
    coarser than python-dp's, so the snapping is meaningful; the rounding changes the
    variance by ~g**2 / 12 (relative 2**-80) and Box-Muller truncates |Z| at
    sqrt(2 * 53 ln 2) ~= 8.6 (tail probability ~1e-16).

    ``add_noise`` never modifies its input and returns a new float64 array.
    """

    name = "secure"

    def add_noise(self, values: np.ndarray, params: NoiseParams) -> np.ndarray:
        x = _as_float_input(values)
        shape = x.shape
        flat = x.reshape(-1)
        out = np.empty(flat.size, dtype=np.float64)
        g = params.granularity
        inv_g = 1.0 / g  # exact: g is a power of two
        if params.kind is NoiseKind.LAPLACE:
            block_fn = self._laplace_block
            scratch = np.empty(2 * _BLOCK, dtype=np.float64)
            # floor(E / lambda) with lambda = g / b, i.e. floor(E * b / g).
            factor = params.scale * inv_g
        elif params.kind is NoiseKind.GAUSSIAN:
            block_fn = self._gaussian_block
            scratch = np.empty(_BLOCK + 2, dtype=np.float64)
            factor = params.scale * inv_g  # sigma / g
        else:  # pragma: no cover
            raise ValueError(f"unknown noise kind {params.kind!r}")
        for start in range(0, flat.size, _BLOCK):
            stop = min(start + _BLOCK, flat.size)
            block_fn(flat[start:stop], out[start:stop], scratch, factor, inv_g, g)
        return out.reshape(shape)

    @staticmethod
    def _laplace_block(x, out, scratch, factor, inv_g, g):
        m = x.size
        e = scratch[: 2 * m]
        _fill_uniform_0_1_closed(e)  # U in (0, 1]
        np.log(e, out=e)  # -E
        e *= -factor  # E / lambda
        np.floor(e, out=e)  # two iid geometrics G1, G2
        np.subtract(e[:m], e[m:], out=out)  # K = G1 - G2 (exact integer in float64)
        np.multiply(x, inv_g, out=e[:m])
        np.rint(e[:m], out=e[:m])  # round(x / g)
        out += e[:m]
        out *= g

    @staticmethod
    def _gaussian_block(x, out, scratch, factor, inv_g, g):
        m = x.size
        h = (m + 1) // 2
        u = scratch[: 2 * h]
        _fill_uniform_0_1_closed(u)
        r = u[:h]
        theta = u[h:]
        np.log(r, out=r)
        r *= -2.0
        np.sqrt(r, out=r)  # radius sqrt(-2 ln U1)
        r *= factor  # sigma / g * radius
        theta *= 2.0 * math.pi
        z = out
        np.cos(theta[: m - h], out=z[h:])
        z[h:] *= r[: m - h]
        np.sin(theta, out=z[:h])
        z[:h] *= r
        np.rint(z, out=z)  # round(sigma * Z / g)
        v = u[:m]  # scratch is free again
        np.multiply(x, inv_g, out=v)
        np.rint(v, out=v)  # round(x / g)
        z += v
        z *= g


class PyDPNoiseSampler:
    """Reference sampler: python-dp's mechanism applied once per value (~5 us/value).

    Laplace: ``pydp.algorithms.numerical_mechanisms.LaplaceMechanism(epsilon, l1)``;
    Gaussian: ``GaussianMechanism(epsilon, delta, l2)``. Values are passed as Python floats
    (python-dp returns an *integer* when given an int).
    """

    name = "pydp"

    def __init__(self):
        self._cache = {}

    def _mechanism(self, params: NoiseParams):
        mech = self._cache.get(params)
        if mech is not None:
            return mech
        from pydp.algorithms import numerical_mechanisms as nm

        if params.kind is NoiseKind.LAPLACE:
            mech = nm.LaplaceMechanism(params.epsilon, params.l1_sensitivity)
            got = mech.diversity
        else:
            mech = nm.GaussianMechanism(params.epsilon, params.delta, params.l2_sensitivity)
            got = mech.std
        if not math.isclose(got, params.scale, rel_tol=1e-12):
            raise ValueError(
                f"python-dp scale {got} does not match params.scale {params.scale}; "
                "NoiseParams must come from calibrate()"
            )
        self._cache[params] = mech
        return mech

    def add_noise(self, values: np.ndarray, params: NoiseParams) -> np.ndarray:
        x = _as_float_input(values)
        add = self._mechanism(params).add_noise
        out = np.fromiter((add(v) for v in x.reshape(-1).tolist()), dtype=np.float64,
                          count=x.size)
        return out.reshape(x.shape)


class NoNoiseSampler:
    """TEST ONLY: returns the values unchanged (as float64). NOT differentially private.

    Construction requires ``NoNoiseSampler(i_understand_this_is_not_private=True)``.
    """

    name = "none"

    def __init__(self, *, i_understand_this_is_not_private: bool = False):
        if i_understand_this_is_not_private is not True:
            raise ValueError(
                "NoNoiseSampler releases exact values and is not private; pass "
                "i_understand_this_is_not_private=True (tests only)"
            )

    def add_noise(self, values: np.ndarray, params: NoiseParams) -> np.ndarray:
        return np.array(values, dtype=np.float64, copy=True)


def get_sampler(name: str = "secure"):
    """Sampler by name: ``"secure"`` (default) or ``"pydp"``.

    ``"none"`` (exact values, tests only) is refused unless the environment variable
    ``CLICKDP_ALLOW_NO_NOISE`` equals ``"1"``.
    """
    name = (name or "secure").lower()
    if name == "secure":
        return SecureNoiseSampler()
    if name == "pydp":
        return PyDPNoiseSampler()
    if name == "none":
        if os.environ.get(ALLOW_NO_NOISE_ENV) != "1":
            raise ValueError(
                f'noise sampler "none" is not private; it requires {ALLOW_NO_NOISE_ENV}=1'
            )
        return NoNoiseSampler(i_understand_this_is_not_private=True)
    raise ValueError(f'unknown noise sampler {name!r} (expected "secure", "pydp" or "none")')
