"""Bounding and partial aggregation kernels, tested without Beam."""
import math

import numpy as np
import pyarrow as pa
import pytest

from transforms import bounding
from transforms.spec import Bounds, parse_spec


def _cells(unit, part, kept):
    return {(int(u), int(p)) for u, p in zip(unit[kept.rows], part[kept.rows])}


def test_no_binding_keeps_everything():
    unit = np.array([1, 1, 2, 2, 2, 3], dtype=np.uint64)
    part = np.array([0, 1, 0, 0, 1, 2], dtype=np.int64)
    kept = bounding.bound_contributions(unit, part, Bounds(5, 5))
    assert sorted(kept.rows.tolist()) == list(range(6))


@pytest.mark.parametrize("l0,linf,cap", [(1, 1, None), (2, 3, None), (3, 2, 4), (10, 10, 7)])
def test_bounds_hold_per_unit(l0, linf, cap):
    rng = np.random.default_rng()
    n = 20_000
    unit = rng.integers(0, 300, n).astype(np.uint64)
    part = rng.integers(0, 25, n).astype(np.int64)
    kept = bounding.bound_contributions(unit, part, Bounds(l0, linf, cap))
    ku, kp = unit[kept.rows], part[kept.rows]
    assert len(set(kept.rows.tolist())) == kept.rows.size
    for u in np.unique(unit):
        mine = ku == u
        parts, counts = np.unique(kp[mine], return_counts=True)
        total_avail = {p: int(((unit == u) & (part == p)).sum()) for p in np.unique(part[unit == u])}
        assert parts.size <= l0
        assert counts.max(initial=0) <= linf
        if cap is not None:
            assert mine.sum() <= cap
        # Bounding keeps as much as the bounds allow (it does not throw rows away needlessly).
        expected = sum(sorted((min(c, linf) for c in total_avail.values()), reverse=True)[:l0]) \
            if cap is None else None
        if expected is not None and len(total_avail) <= l0:
            assert mine.sum() == expected
    # cell bookkeeping is consistent
    assert np.array_equal(kept.cell_part[kept.cell], kp)


def test_partition_sampling_is_uniform():
    """One unit with 4 partitions, L0 = 1: each partition kept with probability 1/4.

    Over 4000 trials the count per partition is Binomial(4000, 1/4), sd 27.4; a deviation
    above 5.3 sd has probability < 1.2e-7 per partition, so the test fails spuriously with
    probability < 5e-7.
    """
    unit = np.zeros(8, dtype=np.uint64)
    part = np.array([0, 0, 0, 0, 0, 1, 2, 3], dtype=np.int64)  # partition 0 has more rows
    trials = 4000
    hits = np.zeros(4)
    for _ in range(trials):
        kept = bounding.bound_contributions(unit, part, Bounds(1, 1))
        hits[part[kept.rows[0]]] += 1
    sd = math.sqrt(trials * 0.25 * 0.75)
    assert np.all(np.abs(hits - trials / 4) < 5.3 * sd), hits


def test_row_sampling_within_cell_is_uniform():
    """Linf = 1 of 5 rows: each row kept with probability 1/5 (same bound, fails w.p. < 6e-7)."""
    unit = np.zeros(5, dtype=np.uint64)
    part = np.zeros(5, dtype=np.int64)
    trials = 4000
    hits = np.zeros(5)
    for _ in range(trials):
        hits[bounding.bound_contributions(unit, part, Bounds(1, 1)).rows[0]] += 1
    sd = math.sqrt(trials * 0.2 * 0.8)
    assert np.all(np.abs(hits - trials / 5) < 5.3 * sd), hits


SPEC = parse_spec({
    "job": "t", "budget": {"epsilon": 1, "delta": 1e-6},
    "outputs": [{
        "name": "prod", "partition_keys": ["product_id"],
        "bounds": {"max_partitions_contributed": 10, "max_contributions_per_partition": 10},
        "metrics": [
            {"name": "views", "type": "count", "filter": "event_type == product_view"},
            {"name": "buyers", "type": "privacy_id_count", "filter": "event_type == purchase"},
            {"name": "revenue", "type": "sum", "column": "amount", "bounds": [0, 50],
             "filter": "event_type == purchase"},
            {"name": "price", "type": "mean", "column": "price", "bounds": [0, 100]},
            {"name": "price_var", "type": "variance", "column": "price", "bounds": [0, 100]},
        ]}]})


def _table(rows):
    cols = ["user_id", "event_type", "product_id", "price", "amount"]
    return pa.table({c: [r[i] for r in rows] for i, c in enumerate(cols)},
                    schema=pa.schema([("user_id", pa.string()), ("event_type", pa.string()),
                                      ("product_id", pa.string()), ("price", pa.float64()),
                                      ("amount", pa.float64())]))


def test_bound_and_aggregate_exact():
    rows = [
        ("a", "product_view", "p1", 10.0, 10.0),
        ("a", "product_view", "p1", 10.0, 10.0),
        ("a", "purchase", "p1", 10.0, 80.0),  # amount clamped to 50
        ("b", "product_view", "p1", 30.0, 30.0),
        ("b", "purchase", "p2", 200.0, 200.0),  # price clamped to 100, amount to 50
        ("c", "page_view", None, None, None),  # no partition key: not eligible
        ("c", "search", "p3", None, None),  # eligible (no metric filter on mean), null value
    ]
    t = _table(rows)
    unit = np.array([1, 1, 1, 2, 2, 3, 3], dtype=np.uint64)
    partial, stats = bounding.bound_and_aggregate(t, unit, SPEC.output("prod"))
    assert stats == {"rows_in": 7, "rows_eligible": 6, "rows_kept": 6}
    got = {r["product_id"]: r for r in partial.to_pylist()}
    assert got["p1"]["views__count"] == 3 and got["p1"]["buyers__pids"] == 1
    assert got["p1"]["revenue__sum"] == 50.0 and got["p2"]["revenue__sum"] == 50.0
    assert got["p1"][bounding.PID_COUNT] == 2 and got["p3"][bounding.PID_COUNT] == 1
    # mean over price, mid = 50: p1 prices 10,10,10,30 -> normalized sum -40*3 - 20
    assert got["p1"]["price__count"] == 4 and got["p1"]["price__nsum"] == -140.0
    assert got["p1"]["price_var__nsumsq"] == 3 * 1600 + 400
    assert got["p2"]["price__nsum"] == 50.0  # clamped 100 - 50
    assert got["p3"]["price__count"] == 0  # null price does not count
    assert partial.schema == bounding.partial_schema(SPEC.output("prod"))


def test_merge_partials_sums_shards():
    t = _table([("a", "product_view", "p1", 10.0, 10.0), ("b", "product_view", "p2", 1.0, 1.0)])
    out = SPEC.output("prod")
    p1, _ = bounding.bound_and_aggregate(t, np.array([1, 2], np.uint64), out)
    p2, _ = bounding.bound_and_aggregate(t.slice(0, 1), np.array([3], np.uint64), out)
    merged = {r["product_id"]: r for r in bounding.merge_partials(out, [p1, p2]).to_pylist()}
    assert merged["p1"]["views__count"] == 2 and merged["p1"][bounding.PID_COUNT] == 2
    assert merged["p2"]["views__count"] == 1
    assert bounding.merge_partials(out, []).num_rows == 0


def test_public_keys_drop_other_partitions_before_bounding():
    t = _table([("a", "product_view", "p1", 1.0, 1.0), ("a", "product_view", "p9", 1.0, 1.0)])
    out = parse_spec({"job": "t", "budget": {"epsilon": 1, "delta": 0},
                      "outputs": [{"name": "o", "partition_keys": ["product_id"],
                                   "selection": {"type": "public", "keys_file": "/dev/null"},
                                   "bounds": {"max_partitions_contributed": 1,
                                              "max_contributions_per_partition": 1},
                                   "metrics": [{"name": "n", "type": "count"}]}]}).output("o")
    for _ in range(20):  # with L0 = 1, the non-public p9 must never take the unit's only slot
        partial, _ = bounding.bound_and_aggregate(t, np.array([1, 1], np.uint64), out,
                                                  public_keys=pa.array(["p1", "p2"]))
        assert partial.column("product_id").to_pylist() == ["p1"]


def test_codes_in_matches_isin_and_never_hits_null():
    from transforms.bounding import codes_in
    rng = np.random.default_rng()
    for n_codes in (1, 2, 7, 1000):
        codes = rng.integers(-1, n_codes, size=5000)
        hit = rng.choice(n_codes, size=min(3, n_codes), replace=False)
        assert np.array_equal(codes_in(codes, hit, n_codes), np.isin(codes, hit))
        assert not codes_in(codes, hit, n_codes)[codes == -1].any()
    assert codes_in(np.array([-1, 0]), np.array([], dtype=np.int64), 1).tolist() == [False, False]


def _subset_frequencies_ok(counts: dict, k: int, trials: int) -> bool:
    """Each of k equally likely outcomes: Binomial(trials, 1/k); 5.5 sd bounds each count
    (two-sided tail < 3.8e-8 per outcome)."""
    p = 1.0 / k
    sd = math.sqrt(trials * p * (1 - p))
    return len(counts) == k and all(abs(c - trials * p) < 5.5 * sd for c in counts.values())


def test_every_k_subset_is_equally_likely():
    """L0 = 2 of 4 partitions (6 pairs) and Linf = 2 of 5 rows (10 pairs) and a total cap of
    2 of 4 single-row cells (6 pairs): each subset has probability 1/6, 1/10, 1/6. With 16
    outcomes checked at 5.5 sd, the test fails spuriously with probability < 7e-7."""
    import collections
    trials = 3000
    l0, linf, cap = collections.Counter(), collections.Counter(), collections.Counter()
    u4 = np.zeros(4, dtype=np.uint64)
    p4 = np.arange(4, dtype=np.int64)
    u5 = np.zeros(5, dtype=np.uint64)
    p5 = np.zeros(5, dtype=np.int64)
    # Another unit within every bound must always be kept whole, whatever the first one draws.
    u_mixed = np.array([0, 0, 0, 0, 1, 1], dtype=np.uint64)
    p_mixed = np.array([0, 1, 2, 3, 0, 1], dtype=np.int64)
    for _ in range(trials):
        kept = bounding.bound_contributions(u4, p4, Bounds(2, 1))
        l0[tuple(sorted(p4[kept.rows]))] += 1
        kept = bounding.bound_contributions(u5, p5, Bounds(1, 2))
        linf[tuple(sorted(kept.rows))] += 1
        kept = bounding.bound_contributions(u_mixed, p_mixed, Bounds(4, 1, max_contributions=2))
        rows = sorted(kept.rows)
        assert rows[-2:] == [4, 5] and len(rows) == 4
        cap[tuple(rows[:2])] += 1
    assert _subset_frequencies_ok(l0, 6, trials), l0
    assert _subset_frequencies_ok(linf, 10, trials), linf
    assert _subset_frequencies_ok(cap, 6, trials), cap
