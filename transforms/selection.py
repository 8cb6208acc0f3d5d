"""Vectorized private partition selection (pure numpy, no Beam).

The keep probability of a partition depends only on its number of privacy units ``n``.
python-dp's strategy object (``pydp.algorithms.partition_selection``) is the source of
truth for those probabilities: :func:`keep_probability_table` tabulates
``probability_of_keep(n)`` once per parameter set (cached), and :func:`select_partitions`
keeps partition ``i`` iff ``U_i < p(count_i)`` with ``U_i`` CSPRNG uniforms
(:func:`transforms.noise.uniform_01`). This is exactly python-dp's ``should_keep`` in
distribution, at numpy speed.

With ``max_partitions_contributed = m`` python-dp internally uses ``eps / m`` and
``delta' = 1 - (1 - delta)**(1/m)``; we rely on python-dp for this (tested).
"""

from __future__ import annotations

import enum
import functools
import math
from typing import Optional, Union

import numpy as np

from transforms.noise import uniform_01

__all__ = [
    "SelectionStrategy",
    "keep_probability_table",
    "keep_probabilities",
    "select_partitions",
    "SecureSelector",
    "PyDPSelector",
    "get_selector",
]

#: Safety cap on the table length when no max_count is given (tiny eps or huge m).
MAX_TABLE_LENGTH = 10_000_000

#: select_partitions asks for tables at least this long (rounded to powers of two so the
#: cache sees few distinct keys).
_MIN_TABLE_REQUEST = 1024


class SelectionStrategy(str, enum.Enum):
    TRUNCATED_GEOMETRIC = "truncated_geometric"
    LAPLACE_THRESHOLDING = "laplace_thresholding"
    GAUSSIAN_THRESHOLDING = "gaussian_thresholding"


# Names understood by pydp.algorithms.partition_selection.create_partition_strategy.
_PYDP_NAMES = {
    SelectionStrategy.TRUNCATED_GEOMETRIC: "truncated_geometric",
    SelectionStrategy.LAPLACE_THRESHOLDING: "laplace",
    SelectionStrategy.GAUSSIAN_THRESHOLDING: "gaussian",
}


def _normalize(strategy, epsilon, delta, max_partitions_contributed, pre_threshold):
    strategy = SelectionStrategy(strategy)
    epsilon = float(epsilon)
    if not (epsilon > 0 and math.isfinite(epsilon)):
        raise ValueError(f"epsilon must be finite and > 0, got {epsilon!r}")
    delta = float(delta)
    # delta = 0 would never keep anything (truncated geometric never reaches 1).
    if not 0.0 < delta < 1.0:
        raise ValueError(f"delta must be in (0, 1) for partition selection, got {delta!r}")
    m = int(max_partitions_contributed)
    if m != max_partitions_contributed or m < 1:
        raise ValueError(
            f"max_partitions_contributed must be an integer >= 1, got {max_partitions_contributed!r}"
        )
    if pre_threshold is not None:
        pt = int(pre_threshold)
        if pt != pre_threshold or pt < 1:
            raise ValueError(f"pre_threshold must be None or an integer >= 1, got {pre_threshold!r}")
        pre_threshold = pt
    return strategy, epsilon, delta, m, pre_threshold


def _create_pydp_strategy(strategy, epsilon, delta, m, pre_threshold):
    from pydp.algorithms import partition_selection

    name = _PYDP_NAMES[strategy]
    if pre_threshold is None:
        return partition_selection.create_partition_strategy(name, epsilon, delta, m)
    return partition_selection.create_partition_strategy(name, epsilon, delta, m, pre_threshold)


@functools.lru_cache(maxsize=64)
def _table(strategy, epsilon, delta, m, max_count, pre_threshold) -> np.ndarray:
    pydp_strategy = _create_pydp_strategy(strategy, epsilon, delta, m, pre_threshold)
    p_keep = pydp_strategy.probability_of_keep
    limit = MAX_TABLE_LENGTH if max_count is None else max_count
    probs = [0.0]  # nobody in the partition: never kept
    n = 0
    while n < limit:
        n += 1
        p = float(p_keep(n))
        probs.append(p)
        if p >= 1.0:
            break
    else:
        if max_count is None:
            raise ValueError(
                f"keep probability did not reach 1.0 within {MAX_TABLE_LENGTH} privacy units "
                f"({strategy.value}, eps={epsilon}, delta={delta}, m={m}); pass max_count"
            )
    table = np.asarray(probs, dtype=np.float64)
    table.setflags(write=False)  # shared through the cache
    return table


def keep_probability_table(
    strategy: Union[SelectionStrategy, str],
    epsilon: float,
    delta: float,
    max_partitions_contributed: int,
    max_count: Optional[int] = None,
    pre_threshold: Optional[int] = None,
) -> np.ndarray:
    """``probs[n]`` = python-dp's ``probability_of_keep(n)`` for ``n = 0 .. N`` (read-only).

    ``probs[0] = 0``. The table stops at the first ``n`` whose probability is exactly 1.0,
    or at ``n = max_count`` (then ``probs[-1]`` may be < 1). Cached per parameters.
    """
    key = _normalize(strategy, epsilon, delta, max_partitions_contributed, pre_threshold)
    if max_count is not None:
        max_count = int(max_count)
        if max_count < 0:
            raise ValueError(f"max_count must be >= 0, got {max_count}")
    strategy, epsilon, delta, m, pre_threshold = key
    return _table(strategy, epsilon, delta, m, max_count, pre_threshold)


def _check_counts(privacy_id_counts) -> np.ndarray:
    counts = np.asarray(privacy_id_counts)
    if counts.dtype.kind not in "iu":
        raise ValueError(f"privacy-id counts must be integers, got dtype {counts.dtype}")
    if counts.size and counts.min() < 0:
        raise ValueError("privacy-id counts must be >= 0")
    return counts


def keep_probabilities(privacy_id_counts: np.ndarray, table: np.ndarray) -> np.ndarray:
    """Keep probability of each partition, looked up in ``table``.

    Counts beyond the table take ``table[-1]`` when it is 1.0. If the table was truncated
    (by ``max_count``) before reaching 1.0, every count must be within it (ValueError
    otherwise).
    """
    counts = _check_counts(privacy_id_counts)
    table = np.asarray(table, dtype=np.float64)
    last = table.size - 1
    if counts.size == 0:
        return np.zeros(counts.shape, dtype=np.float64)
    if table[-1] != 1.0 and counts.max() > last:
        raise ValueError(
            f"keep-probability table covers counts up to {last} and does not reach 1.0, but a "
            f"partition has {int(counts.max())} privacy units; build it with "
            f"max_count >= counts.max()"
        )
    return table[np.minimum(counts, last)]


def select_partitions(
    privacy_id_counts: np.ndarray,
    strategy: Union[SelectionStrategy, str],
    epsilon: float,
    delta: float,
    max_partitions_contributed: int,
    pre_threshold: Optional[int] = None,
) -> np.ndarray:
    """Boolean keep-mask: ``keep[i] = U_i < p(count_i)``, ``U_i`` CSPRNG uniforms in (0, 1).

    ``privacy_id_counts`` must be integers >= 0 (ValueError otherwise).
    """
    counts = _check_counts(privacy_id_counts)
    if counts.size == 0:
        return np.zeros(counts.shape, dtype=bool)
    # Power-of-two request: the table stops earlier anyway once p reaches 1.0.
    wanted = max(_MIN_TABLE_REQUEST, int(counts.max()))
    request = min(1 << (wanted - 1).bit_length(), MAX_TABLE_LENGTH)
    table = keep_probability_table(
        strategy, epsilon, delta, max_partitions_contributed, max_count=request,
        pre_threshold=pre_threshold,
    )
    probs = keep_probabilities(counts, table)
    return uniform_01(counts.size).reshape(counts.shape) < probs


class SecureSelector:
    """Vectorized selector (default): :func:`select_partitions` with fixed parameters."""

    name = "secure"

    def __init__(self, strategy, epsilon, delta, max_partitions_contributed, pre_threshold=None):
        self.params = _normalize(strategy, epsilon, delta, max_partitions_contributed,
                                 pre_threshold)

    def select(self, privacy_id_counts: np.ndarray) -> np.ndarray:
        strategy, epsilon, delta, m, pre_threshold = self.params
        return select_partitions(privacy_id_counts, strategy, epsilon, delta, m, pre_threshold)


class PyDPSelector:
    """Reference selector: python-dp's ``should_keep(n)`` called once per partition (slow)."""

    name = "pydp"

    def __init__(self, strategy, epsilon, delta, max_partitions_contributed, pre_threshold=None):
        self.params = _normalize(strategy, epsilon, delta, max_partitions_contributed,
                                 pre_threshold)
        self._strategy = _create_pydp_strategy(*self.params)

    def select(self, privacy_id_counts: np.ndarray) -> np.ndarray:
        counts = _check_counts(privacy_id_counts)
        should_keep = self._strategy.should_keep
        flat = counts.reshape(-1).tolist()
        keep = np.fromiter((should_keep(n) for n in flat), dtype=bool, count=len(flat))
        return keep.reshape(counts.shape)


def get_selector(name: str, strategy, epsilon, delta, max_partitions_contributed,
                 pre_threshold=None):
    """Selector by name: ``"secure"`` (vectorized, default) or ``"pydp"`` (reference)."""
    name = (name or "secure").lower()
    if name == "secure":
        return SecureSelector(strategy, epsilon, delta, max_partitions_contributed, pre_threshold)
    if name == "pydp":
        return PyDPSelector(strategy, epsilon, delta, max_partitions_contributed, pre_threshold)
    raise ValueError(f'unknown selector {name!r} (expected "secure" or "pydp")')
