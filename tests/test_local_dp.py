"""Per-user local-DP feature vectors: exact features, mechanism statistics, pseudonyms.

Statistical tests use distribution-free bounds with failure probability <= 1e-6:
Hoeffding, P(|mean - p| >= t) <= 2 exp(-2 n t^2), and a median-of-means variance test.
The production noise path is never seeded.
"""
import hmac
import json
import math
import os

import numpy as np
import pyarrow as pa
import pytest

from transforms import local_dp
from transforms.local_dp import LocalDPConfig

CATS = ("books", "toys", "music")
HUGE_EPS = 1e9  # noise ~1e-7, k-RR keep probability == 1.0: features come out exact


def hoeffding_t(n: int, failure: float) -> float:
    """Two-sided deviation t with P(|p_hat - p| >= t) <= failure for n Bernoulli trials."""
    return math.sqrt(math.log(2.0 / failure) / (2.0 * n))


def events(rows):
    """rows: (user_id, event_type, category, price)."""
    return pa.table({
        "user_id": pa.array([r[0] for r in rows], pa.string()),
        "event_type": pa.array([r[1] for r in rows], pa.string()),
        "category": pa.array([r[2] for r in rows], pa.string()),
        "price": pa.array([r[3] for r in rows], pa.float64()),
    })


def by_key(table, key):
    return {r[key]: r for r in table.to_pylist()}


KEY = bytes(range(32))


# --------------------------------------------------------------------------- mechanisms

def test_krr_keep_probability_formula():
    for k, eps in [(2, 1.0), (5, 0.5), (31, 3.0), (8, 1e-3)]:
        assert math.isclose(local_dp.krr_keep_probability(k, eps),
                            math.exp(eps) / (math.exp(eps) + k - 1), rel_tol=1e-12)
    assert local_dp.krr_keep_probability(5, 1000.0) == 1.0
    with pytest.raises(ValueError):
        local_dp.krr_keep_probability(1, 1.0)
    with pytest.raises(ValueError):
        local_dp.krr_keep_probability(3, 0.0)


@pytest.mark.parametrize("k,eps", [(5, 1.0), (8, 0.25)])
def test_krr_empirical_distribution_matches_epsilon(k, eps):
    """Keep rate e^eps/(e^eps+k-1) and uniform other values, each within a Hoeffding bound.

    k outcome frequencies, each off by >= t with probability <= 1e-6 / k: fails w.p. <= 1e-6.
    The measured ratio P(v | v) / P(w | v) then bounds the realized epsilon.
    """
    n = 200_000
    true = 2
    out = local_dp.randomized_response(np.full(n, true, np.int64), k, eps)
    freq = np.bincount(out, minlength=k) / n
    p = local_dp.krr_keep_probability(k, eps)
    q = (1 - p) / (k - 1)
    t = hoeffding_t(n, 1e-6 / k)
    assert abs(freq[true] - p) < t, (freq, p, t)
    others = np.delete(freq, true)
    assert np.all(np.abs(others - q) < t), (others, q, t)
    # implied epsilon within the sampling error of the stated one
    lo = math.log((p - t) / (q + t))
    hi = math.log((p + t) / (q - t))
    assert lo <= math.log(freq[true] / others.mean()) <= hi
    assert lo < eps < hi


def test_krr_rejects_bad_codes():
    with pytest.raises(ValueError):
        local_dp.randomized_response(np.array([0, 5]), 5, 1.0)
    with pytest.raises(TypeError):
        local_dp.randomized_response(np.array([0.5]), 5, 1.0)


def test_laplace_noise_matches_epsilon():
    """Activity noise of 100k users (600k draws): variance 2 b^2 and tail P(|X| > b) = 1/e.

    b = L1 / eps_activity with L1 = 6 event types * clip. Variance: median of 120 group
    means of X^2 (5000 draws each). E X^2 = 2 b^2, Var X^2 = 20 b^4, so by Chebyshev a
    group mean is off by >= 2 sd = 2 sqrt(20/5000) b^2 (6.3% of 2 b^2) with probability
    <= 1/4, and the median is off only if >= 60 groups are: probability <= exp(-120/8)
    = 3.1e-7 (Hoeffding). Tail: Hoeffding over 600k draws, failure 5e-7. Mean: 0.05 b is
    27 sd of the mean; Laplace noise is sub-exponential, so Bernstein's inequality puts
    this below 1e-100. Total < 1e-6.
    """
    n = 100_000
    rows = [(f"u{i}", "page_view", None, None) for i in range(n)]  # exact activity (1,0,...)
    cfg = LocalDPConfig(epsilon=3.0, categories=CATS, activity_clip=10,
                        category_weight=0, price_weight=0)
    out = local_dp.local_dp_features(events(rows), cfg)
    exact = np.zeros((n, 6))
    exact[:, 0] = 1.0
    cols = [f"act_{e}" for e in cfg.event_types]
    noise = np.column_stack([out.column(c).to_numpy() for c in cols]) - exact
    b = 6 * 10 / 3.0
    meta = json.loads(out.schema.metadata[b"clickdp.local_dp"])["features"]["activity"]
    assert math.isclose(meta["scale"], b) and meta["l1_sensitivity"] == 60.0
    x2 = (noise.reshape(-1)[: 120 * 5000] ** 2).reshape(120, 5000).mean(axis=1)
    est = np.median(x2)
    assert abs(est - 2 * b * b) < 2 * math.sqrt(20 / 5000) * b * b, (est, 2 * b * b)
    tail = (np.abs(noise) > b).mean()
    assert abs(tail - math.exp(-1)) < hoeffding_t(noise.size, 5e-7)
    assert abs(noise.mean()) < 0.05 * b  # sanity (mean 0; sd of the mean ~0.002 b)


def test_category_histogram_noise_scale():
    cfg = LocalDPConfig(epsilon=2.0, categories=CATS, activity_weight=0, price_weight=0)
    out = local_dp.local_dp_features(events([("u", "product_view", "books", 1.0)]), cfg)
    meta = json.loads(out.schema.metadata[b"clickdp.local_dp"])["features"]["category"]
    assert meta["l1_sensitivity"] == 2.0 and math.isclose(meta["scale"], 2.0 / 2.0)
    assert out.column_names == ["cat_books", "cat_toys", "cat_music"]


def test_feature_krr_keep_rate_end_to_end():
    """price_band through local_dp_features: keep rate within a Hoeffding bound (fail 1e-6)."""
    n = 60_000
    rows = [(f"u{i}", "product_view", "books", 30.0) for i in range(n)]  # band "25-50"
    cfg = LocalDPConfig(epsilon=1.5, categories=CATS, activity_weight=0, category_weight=0)
    out = local_dp.local_dp_features(events(rows), cfg)
    k = len(cfg.price_band_labels())
    p = local_dp.krr_keep_probability(k, 1.5)
    kept = np.mean(np.asarray(out.column("price_band").to_pylist()) == "25-50")
    assert abs(kept - p) < hoeffding_t(n, 1e-6), (kept, p)


# --------------------------------------------------------------------------- features

def test_exact_features_with_huge_epsilon():
    rows = [
        ("alice", "page_view", None, None), ("alice", "product_view", "books", 12.0),
        ("alice", "product_view", "books", 18.0), ("alice", "product_view", "toys", 100.0),
        ("alice", "purchase", "books", 999.0),  # purchase price is not a viewed price
        ("bob", "search", None, None),  # no categorized event, no viewed price
        ("carol", "product_view", "unlisted", 600.0),  # unknown category ignored
    ] + [("dave", "add_to_cart", "music", 5.0)] * 50  # clipped at 20
    for mode in ("histogram", "top_krr"):
        cfg = LocalDPConfig(epsilon=HUGE_EPS, categories=CATS, category_mode=mode)
        out = local_dp.local_dp_features(events(rows), cfg, row_key="pseudonym", pseudonym_key=KEY)
        assert out.num_rows == 4
        r = by_key(out, "pseudonym")
        names = ["alice", "bob", "carol", "dave"]
        ps = dict(zip(names, local_dp.pseudonymize(pa.array(names), KEY).to_pylist()))
        a, b, c, d = (r[ps[x]] for x in names)
        assert a["act_page_view"] == pytest.approx(1, abs=1e-4)
        assert a["act_product_view"] == pytest.approx(3, abs=1e-4)
        assert a["act_purchase"] == pytest.approx(1, abs=1e-4)
        assert d["act_add_to_cart"] == pytest.approx(20, abs=1e-4)
        assert a["price_band"] == "25-50"  # mean viewed (12 + 18 + 100) / 3 = 43.3
        assert b["price_band"] == "none" and d["price_band"] == "none"
        assert c["price_band"] == ">=500"
        if mode == "histogram":
            assert a["cat_books"] == pytest.approx(0.75, abs=1e-4)
            assert a["cat_toys"] == pytest.approx(0.25, abs=1e-4)
            assert b["cat_books"] == pytest.approx(0, abs=1e-4)
            assert c["cat_music"] == pytest.approx(0, abs=1e-4)
            assert d["cat_music"] == pytest.approx(1, abs=1e-4)
        else:
            assert [a["top_category"], b["top_category"], c["top_category"], d["top_category"]] == [
                "books", "none", "none", "music"]


def test_no_raw_ids_in_output():
    ids = [f"secret-user-{i:05d}" for i in range(300)]
    rows = [(u, "product_view", "books", 20.0) for u in ids]
    for row_key in ("none", "pseudonym"):
        out = local_dp.local_dp_features(events(rows), LocalDPConfig(epsilon=1.0, categories=CATS),
                                         row_key=row_key, pseudonym_key=KEY)
        sink = pa.BufferOutputStream()
        with pa.ipc.new_stream(sink, out.schema) as w:
            w.write_table(out)
        blob = sink.getvalue().to_pybytes()
        assert b"secret-user" not in blob
        assert KEY not in blob and KEY.hex().encode() not in blob
        assert ("pseudonym" in out.column_names) == (row_key == "pseudonym")


def test_rows_are_in_random_order():
    """Two runs over 500 users give different orders (same order: probability 1/500!)."""
    ids = [f"u{i:04d}" for i in range(500)]
    rows = [(u, "product_view", "books", 20.0) for u in ids]
    cfg = LocalDPConfig(epsilon=HUGE_EPS, categories=CATS)
    orders = [local_dp.local_dp_features(events(rows), cfg, row_key="pseudonym",
                                         pseudonym_key=KEY).column("pseudonym").to_pylist()
              for _ in range(2)]
    assert sorted(orders[0]) == sorted(orders[1]) and orders[0] != orders[1]


def test_empty_input():
    out = local_dp.local_dp_features(events([]), LocalDPConfig(epsilon=1.0, categories=CATS))
    assert out.num_rows == 0 and "act_page_view" in out.column_names


# --------------------------------------------------------------------------- pseudonyms

def test_pseudonym_stable_keyed_and_standard():
    ids = pa.array(["u1", "u2", "ü✓", "", None])
    p1 = local_dp.pseudonymize(ids, KEY).to_pylist()
    assert p1 == local_dp.pseudonymize(ids, KEY).to_pylist()  # stable for the same key
    p2 = local_dp.pseudonymize(ids, bytes(reversed(KEY))).to_pylist()
    assert all(a != b for a, b in zip(p1[:4], p2[:4]))  # different for another key
    assert p1[4] is None
    for uid, got in zip(["u1", "u2", "ü✓", ""], p1):
        assert got == hmac.new(KEY, uid.encode(), "sha256").hexdigest()[:32]
        assert len(got) == 32 and uid not in got or uid == ""
    long_key = os.urandom(100)  # keys longer than a SHA-256 block are hashed first (RFC 2104)
    assert local_dp.pseudonymize(["x"], long_key).to_pylist() == [
        hmac.new(long_key, b"x", "sha256").hexdigest()[:32]]


def test_missing_or_bad_key_is_a_clear_error(monkeypatch):
    ev = events([("u", "page_view", None, None)])
    cfg = LocalDPConfig(epsilon=1.0, categories=CATS)
    with pytest.raises(ValueError, match="secret key"):
        local_dp.local_dp_features(ev, cfg, row_key="pseudonym")
    with pytest.raises(ValueError, match="at least 16 bytes"):
        local_dp.local_dp_features(ev, cfg, row_key="pseudonym", pseudonym_key=b"short")
    with pytest.raises(TypeError):
        local_dp.pseudonymize(["u"], "a string key")
    with pytest.raises(ValueError):
        local_dp.local_dp_features(ev, cfg, row_key="raw_user_id")
    monkeypatch.delenv(local_dp.PSEUDONYM_KEY_ENV, raising=False)
    with pytest.raises(ValueError, match=local_dp.PSEUDONYM_KEY_ENV):
        local_dp.pseudonym_key_from_env()
    monkeypatch.setenv(local_dp.PSEUDONYM_KEY_ENV, "zz-not-hex")
    with pytest.raises(ValueError, match="hex"):
        local_dp.pseudonym_key_from_env()
    monkeypatch.setenv(local_dp.PSEUDONYM_KEY_ENV, KEY.hex())
    assert local_dp.pseudonym_key_from_env() == KEY


# --------------------------------------------------------------------------- config

def test_config_validation_and_split():
    cfg = LocalDPConfig(epsilon=1.0, categories=CATS, activity_weight=1, category_weight=1,
                        price_weight=1)
    split = cfg.epsilon_split()
    assert set(split) == {"activity", "category", "price_band"}
    assert sum(split.values()) <= 1.0 and math.isclose(sum(split.values()), 1.0)
    assert cfg.price_band_labels() == ("<10", "10-25", "25-50", "50-100", "100-250", "250-500",
                                       ">=500", "none")
    only = LocalDPConfig(epsilon=2.0, categories=CATS, activity_weight=0, category_weight=0)
    assert only.epsilon_split() == {"price_band": 2.0}
    for bad in [{"epsilon": 0}, {"epsilon": float("inf")}, {"categories": ()},
                {"categories": ("a", "a")}, {"categories": ("none",)},
                {"price_band_edges": (5, 5)}, {"price_band_edges": (10, 5)},
                {"category_mode": "top"}, {"activity_clip": 0},
                {"activity_weight": 0, "category_weight": 0, "price_weight": 0},
                {"activity_weight": -1}]:
        kw = {"epsilon": 1.0, "categories": CATS}
        kw.update(bad)
        with pytest.raises(ValueError):
            LocalDPConfig(**kw)
