"""Co-occurrence pairs: pair generation, global per-user bounding, top-k post-processing."""
import itertools
import math

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest

from transforms import pairs
from transforms.bounding import PID_COUNT


def _pairs(rows, max_pairs=1000, **kw):
    """rows: (unit, session, product[, event_type]) tuples -> {(a, b): count}."""
    unit = np.array([r[0] for r in rows], dtype=np.uint64)
    sess = pa.array([r[1] for r in rows], pa.string())
    prod = pa.array([r[2] for r in rows], pa.string())
    if rows and len(rows[0]) > 3:
        kw.setdefault("event_type", pa.array([r[3] for r in rows], pa.string()))
    t = pairs.session_pairs(unit, sess, prod, max_pairs, **kw)
    return {(r[pairs.PRODUCT_A], r[pairs.PRODUCT_B]): r[PID_COUNT] for r in t.to_pylist()}


def test_pairs_of_a_session():
    got = _pairs([(1, "s", "p3"), (1, "s", "p1"), (1, "s", "p2"), (1, "s", "p1")])
    assert got == {("p1", "p2"): 1, ("p1", "p3"): 1, ("p2", "p3"): 1}


def test_empty_and_single_product_sessions_yield_nothing():
    assert _pairs([]) == {}
    assert _pairs([(1, "s", "p1")]) == {}
    assert _pairs([(1, "s", "p1"), (1, "s", "p1"), (1, "t", "p2")]) == {}  # repeats, other session
    assert _pairs([(1, None, "p1"), (1, None, "p2"), (1, "s", None), (1, "s", "p3")]) == {}
    empty = pairs.session_pairs(np.zeros(0, np.uint64), pa.array([], pa.string()),
                                pa.array([], pa.string()), 5)
    assert empty.num_rows == 0 and empty.column_names == ["product_a", "product_b", PID_COUNT]


def test_pair_order_is_string_order():
    got = _pairs([(1, "s", "b10"), (1, "s", "a9"), (1, "s", "b2")])
    assert set(got) == {("a9", "b10"), ("a9", "b2"), ("b10", "b2")}
    assert all(a < b for a, b in got)


def test_counts_are_distinct_users():
    rows = [(1, "s1", "x"), (1, "s1", "y"), (1, "s2", "x"), (1, "s2", "y"),  # same pair twice: 1
            (2, "t", "x"), (2, "t", "y"), (2, "t", "z"),
            (3, "s1", "y"), (3, "s1", "z")]  # session ids are per user: no merge with user 1
    assert _pairs(rows) == {("x", "y"): 2, ("x", "z"): 1, ("y", "z"): 2}


def test_kind_filters_event_types():
    rows = [(1, "s", "a", "product_view"), (1, "s", "b", "product_view"),
            (1, "s", "c", "purchase"), (1, "s", "d", "purchase"), (1, "s", "e", None),
            (1, "s", "f", "add_to_cart")]
    assert _pairs(rows, kind="viewed") == {("a", "b"): 1}
    assert _pairs(rows, kind="bought") == {("c", "d"): 1}
    with pytest.raises(ValueError):
        _pairs(rows, kind="liked")


def test_cap_per_user_is_global_across_batches():
    """A heavy user whose rows come in 30 batches contributes at most the cap in total."""
    rng = np.random.default_rng()
    batches = []
    for b in range(30):
        n = 40
        unit = np.full(n, 42, np.uint64)
        unit[: n // 2] = rng.integers(0, 5, n // 2)  # a few light users mixed in
        sess = pa.array([f"s{b}-{i % 4}" for i in range(n)])
        prod = pa.array([f"p{x}" for x in rng.integers(0, 60, n)])
        batches.append((unit, sess, prod))
    cap = 7
    unit = np.concatenate([u for u, _, _ in batches])
    sess = pa.concat_arrays([s for _, s, _ in batches])
    prod = pa.concat_arrays([p for _, _, p in batches])
    rows = pairs.bounded_session_pairs(unit, sess, prod, cap)
    ru = rows.column("unit").to_numpy()
    users, per_user = np.unique(ru, return_counts=True)
    assert per_user.max() <= cap
    assert per_user[users == 42][0] == cap  # the heavy user has far more candidate pairs
    keyed = list(zip(ru.tolist(), rows.column("product_a").to_pylist(), rows.column("product_b").to_pylist()))
    assert len(keyed) == len(set(keyed))  # each pair at most once per user (Linf = 1)
    counts = pairs.session_pairs(unit, sess, prod, cap)
    assert sum(counts.column(PID_COUNT).to_pylist()) <= cap * len(set(unit.tolist()))
    merged = pairs.merge_pair_counts([counts])
    assert sum(merged.column(PID_COUNT).to_pylist()) == sum(counts.column(PID_COUNT).to_pylist())
    # Per-batch calls (wrong: not global) would let the heavy user contribute ~30 x cap.
    heavy = sum(int((pairs.bounded_session_pairs(u, s, p, cap).column("unit").to_numpy() == 42).sum())
                for u, s, p in batches)
    assert heavy > cap


def test_merge_of_disjoint_shards():
    a = _pairs([(1, "s", "x"), (1, "s", "y")])
    t1 = pairs.session_pairs(np.array([1, 1], np.uint64), pa.array(["s", "s"]), pa.array(["x", "y"]), 3)
    t2 = pairs.session_pairs(np.array([2, 2, 2], np.uint64), pa.array(["s"] * 3), pa.array(["x", "y", "z"]), 3)
    merged = {(r["product_a"], r["product_b"]): r[PID_COUNT]
              for r in pairs.merge_pair_counts([t1, t2, t1.slice(0, 0)]).to_pylist()}
    assert a == {("x", "y"): 1}
    assert merged == {("x", "y"): 2, ("x", "z"): 1, ("y", "z"): 1}
    assert pairs.merge_pair_counts([]).num_rows == 0


def test_products_per_session_cap():
    prods = [f"p{i:03d}" for i in range(200)]
    rows = [(1, "bot", p) for p in prods]
    got = _pairs(rows, max_pairs=10**6, max_products_per_session=50)
    assert len(got) == math.comb(50, 2)
    used = {p for pair in got for p in pair}
    assert len(used) == 50


def test_sessions_per_user_cap():
    rows = [(1, f"s{i}", p) for i in range(30) for p in (f"a{i}", f"b{i}")]
    got = _pairs(rows, max_pairs=10**6, max_sessions_per_user=5)
    assert len(got) == 5


def test_pair_sampling_is_uniform():
    """3000 users, each with the same 3 pairs (one in two sessions), cap 1: each pair w.p. 1/3.

    Users are bounded independently: the count per pair is Binomial(3000, 1/3), sd 25.8; a
    deviation above 5.3 sd has probability < 1.2e-7 per pair, so the test fails spuriously
    w.p. < 4e-7.
    """
    users = 3000
    base = [("s1", "a"), ("s1", "b"), ("s2", "a"), ("s2", "b"), ("s3", "c"), ("s3", "d"),
            ("s4", "e"), ("s4", "f")]
    unit = np.repeat(np.arange(users, dtype=np.uint64), len(base))
    sess = pa.array([s for s, _ in base] * users)
    prod = pa.array([p for _, p in base] * users)
    t = pairs.session_pairs(unit, sess, prod, 1)
    got = {(r["product_a"], r["product_b"]): r[PID_COUNT] for r in t.to_pylist()}
    assert sum(got.values()) == users
    sd = math.sqrt(users / 3 * 2 / 3)
    for pair in [("a", "b"), ("c", "d"), ("e", "f")]:
        assert abs(got.get(pair, 0) - users / 3) < 5.3 * sd, got


def test_product_sampling_within_session_is_uniform():
    """A session of 4 products capped to 2: each of the 6 pairs w.p. 1/6 (6000 users).

    Count per pair ~ Binomial(6000, 1/6), sd 28.9; 5.3 sd per pair: failure w.p. < 8e-7.
    """
    users = 6000
    unit = np.repeat(np.arange(users, dtype=np.uint64), 4)
    t = pairs.session_pairs(unit, pa.array(["s"] * 4 * users), pa.array(["a", "b", "c", "d"] * users),
                            5, max_products_per_session=2)
    got = {(r["product_a"], r["product_b"]): r[PID_COUNT] for r in t.to_pylist()}
    assert set(got) == set(itertools.combinations("abcd", 2)) and sum(got.values()) == users
    sd = math.sqrt(users / 6 * 5 / 6)
    assert all(abs(c - users / 6) < 5.3 * sd for c in got.values()), got


def test_bad_arguments():
    u = np.zeros(2, np.uint64)
    s, p = pa.array(["s", "s"]), pa.array(["a", "b"])
    with pytest.raises(ValueError):
        pairs.session_pairs(u, s, p, 0)
    with pytest.raises(ValueError):
        pairs.session_pairs(np.zeros(3, np.uint64), s, p, 1)
    with pytest.raises(ValueError):
        pairs.session_pairs(u, s, p, 1, max_products_per_session=1)
    with pytest.raises(TypeError):
        pairs.session_pairs(np.array(["x", "y"]), s, p, 1)


def test_moderate_scale_invariants():
    """200k rows, 20k users: bound and distinctness hold (speed is measured by the bench)."""
    rng = np.random.default_rng()
    n = 200_000
    unit = rng.integers(0, 20_000, n).astype(np.uint64)
    sess = pa.array((unit * 3 + rng.integers(0, 3, n).astype(np.uint64)).astype(str))
    prod = pa.array(np.char.add("p", rng.integers(0, 3000, n).astype(str)))
    rows = pairs.bounded_session_pairs(unit, sess, prod, 4)
    ru = rows.column("unit").to_numpy()
    assert np.unique(ru, return_counts=True)[1].max() <= 4
    assert pc.all(pc.less(rows.column("product_a"), rows.column("product_b"))).as_py()


# --------------------------------------------------------------------------- top-k

def _released(rows):
    return pa.table({"product_a": [r[0] for r in rows], "product_b": [r[1] for r in rows],
                     "users": [r[2] for r in rows], "users_std": [1.5] * len(rows)})


def test_top_k_neighbours():
    rel = _released([("a", "b", 10.0), ("a", "c", 30.0), ("b", "c", 20.0), ("a", "d", 30.0),
                     ("c", "d", -2.0)])
    t = pairs.top_k_neighbours(rel, 2)
    assert t.column_names == ["product", "neighbour", "rank", "users", "users_std"]
    got = [(r["product"], r["neighbour"], r["rank"], r["users"]) for r in t.to_pylist()]
    assert got == [("a", "c", 1, 30.0), ("a", "d", 2, 30.0),  # tie -> neighbour id order
                   ("b", "c", 1, 20.0), ("b", "a", 2, 10.0),
                   ("c", "a", 1, 30.0), ("c", "b", 2, 20.0),
                   ("d", "a", 1, 30.0), ("d", "c", 2, -2.0)]
    assert pairs.top_k_neighbours(rel, 1).num_rows == 4
    assert pairs.top_k_neighbours(rel.slice(0, 0), 3).num_rows == 0


def test_top_k_refuses_unreleased_tables():
    raw = pairs.session_pairs(np.zeros(2, np.uint64), pa.array(["s", "s"]), pa.array(["a", "b"]), 1)
    with pytest.raises(ValueError, match="RELEASED"):
        pairs.top_k_neighbours(raw, 3)
    no_std = _released([("a", "b", 1.0)]).drop_columns(["users_std"])
    with pytest.raises(ValueError):
        pairs.top_k_neighbours(no_std, 3)
    with pytest.raises(ValueError):
        pairs.top_k_neighbours(_released([("a", "b", 1.0)]), 0)
    ok = pairs.top_k_neighbours(_released([("a", "b", 1.0)]), 3, count_column="users")
    assert ok.num_rows == 2
