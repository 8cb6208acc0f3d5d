"""Synthetic e-commerce clickstream generator (vectorized: numpy + pyarrow only).

One call produces one UTC day of raw events following ``RAW_EVENT_SCHEMA``:

* users ``u0000123`` with heavy-tailed (lognormal) activity plus a handful of
  bot-like heavy users with thousands of events each;
* sessions (``s000000123``, globally unique) of events close in time (mean gap
  40 s), a user's sessions in chronological order and non-overlapping;
* funnels inside sessions: page_view / search / product_view dominate,
  add_to_cart directly follows a view of the same product, purchases and
  remove_from_cart of carted products happen later in the same session;
* a product catalog (Zipf popularity, stable category and lognormal price per
  product) that depends only on ``(seed, n_products)`` and is written as public
  lists by :func:`write_catalog`;
* optionally a fraction of malformed rows whose ``event_id`` is
  ``bad-<reason>-<n>`` where ``<reason>`` is the dead-letter reason code from
  ``schemas.events`` that validation is expected to assign.

Rows come grouped by user (users in id order) and, within a user, in time
order (a user's sessions never overlap); the table is *not* globally sorted by
``event_time``.

The random generator is seeded (``numpy.random.default_rng``); it is a data
simulator, never a source of differential-privacy noise.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import re
import sys
import time

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from schemas.events import (
    DEAD_LETTER_REASONS,
    EVENT_TYPES,
    MAX_QUANTITY,
    PRODUCT_EVENT_TYPES,
    RAW_COLUMNS,
    RAW_EVENT_SCHEMA,
    REASON_BAD_EVENT_TIME,
    REASON_BAD_PRICE,
    REASON_BAD_QUANTITY,
    REASON_MALFORMED_ROW,
    REASON_MISSING_PRODUCT_ID,
    REASON_MISSING_USER_ID,
    REASON_OUT_OF_DAY,
    REASON_UNKNOWN_EVENT_TYPE,
)

__all__ = [
    "FORMATS",
    "CATEGORIES",
    "RAW_EVENT_SCHEMA_WITH_BAD_ROWS",
    "TEXT_EVENT_SCHEMA",
    "to_text_table",
    "generate_events",
    "write_events",
    "write_catalog",
    "generate",
    "add_cli_arguments",
    "main",
]

FORMATS = ("parquet", "jsonl", "csv")
_EXTENSIONS = {"parquet": "parquet", "jsonl": "jsonl", "csv": "csv"}
ROWS_PER_FILE = 1_000_000
PARQUET_ROW_GROUP_SIZE = 256 * 1024

# Typed schema used when bad rows are present: same names, types and metadata
# as RAW_EVENT_SCHEMA but every field nullable (bad rows hold null user_id /
# event_time, which a non-nullable Parquet column cannot store).
RAW_EVENT_SCHEMA_WITH_BAD_ROWS = pa.schema(
    [f.with_nullable(True) for f in RAW_EVENT_SCHEMA], metadata=RAW_EVENT_SCHEMA.metadata
)

# text_format=True: every column a (nullable) string, as read from JSONL/CSV.
TEXT_EVENT_SCHEMA = pa.schema([pa.field(name, pa.string()) for name in RAW_COLUMNS])

_DAY_US = 86_400 * 1_000_000
_EPOCH = _dt.date(1970, 1, 1)

# ---------------------------------------------------------------------------
# Static vocabularies
# ---------------------------------------------------------------------------

# category -> median price (USD)
_CATEGORY_MEDIAN_PRICE = {
    "electronics": 120.0, "computers": 450.0, "phones": 300.0, "cameras": 250.0,
    "video_games": 45.0, "software": 40.0, "books": 14.0, "music": 12.0,
    "movies": 15.0, "clothing": 35.0, "shoes": 65.0, "jewelry": 80.0,
    "watches": 150.0, "beauty": 20.0, "health": 18.0, "grocery": 8.0,
    "home_kitchen": 30.0, "furniture": 220.0, "appliances": 180.0, "garden": 28.0,
    "tools": 45.0, "automotive": 35.0, "sports": 40.0, "outdoors": 55.0,
    "toys": 22.0, "baby": 25.0, "pet_supplies": 20.0, "office": 15.0,
    "crafts": 12.0, "luggage": 90.0,
}
CATEGORIES = tuple(_CATEGORY_MEDIAN_PRICE)

_COLORS = (
    "red", "blue", "black", "white", "green", "pink", "grey", "navy", "yellow",
    "purple", "brown", "beige", "gold", "silver", "orange",
)
_QUALITIES = (
    "wireless", "waterproof", "cheap", "organic", "vintage", "kids", "mens",
    "womens", "leather", "cotton", "stainless steel", "portable", "smart",
    "ergonomic", "bluetooth", "gaming", "running", "non stick", "led", "mini",
    "large", "small", "foldable", "rechargeable", "eco friendly",
)
_NOUNS = (
    "shoes", "headphones", "laptop", "phone case", "backpack", "water bottle",
    "dress", "jacket", "t shirt", "jeans", "sneakers", "watch", "desk lamp",
    "office chair", "coffee maker", "blender", "yoga mat", "tent", "sunglasses",
    "wallet", "charger", "keyboard", "mouse", "monitor", "camera", "speaker",
    "novel", "cookbook", "board game", "lego set", "dog bed", "cat toy",
    "face cream", "shampoo", "perfume", "vacuum cleaner", "frying pan",
    "knife set", "bed sheets", "pillow", "sofa", "bookshelf", "bike helmet",
    "running shorts", "socks", "hoodie", "earrings", "necklace", "drill",
    "garden hose",
)

_DEVICES = ("mobile", "desktop", "tablet")
_DEVICE_P = (0.55, 0.35, 0.10)

_COUNTRY_WEIGHTS = {
    "US": 30, "GB": 8, "DE": 7, "IN": 7, "FR": 5, "CA": 5, "BR": 5, "JP": 4,
    "AU": 3, "ES": 3, "IT": 3, "MX": 3, "NL": 2, "PL": 2, "SE": 1.5, "KR": 1.5,
    "TR": 1.5, "ID": 1.5, "NG": 1, "ZA": 1, "AR": 1, "CH": 1, "BE": 1, "AT": 1,
    "IE": 1, "NO": 1, "DK": 1, "FI": 1, "PT": 1, "NZ": 1,
}
_COUNTRIES = tuple(_COUNTRY_WEIGHTS)

_REFERRERS = ("direct", "search", "social", "email", "ads")
_REFERRER_P = (0.35, 0.30, 0.13, 0.08, 0.09)  # remaining 0.05: null

# quantity 1..5, mostly 1
_QUANTITY_P = np.array([0.72, 0.15, 0.07, 0.04, 0.02])

# Event type codes (indices into EVENT_TYPES) plus bad-row-only codes.
_PV, _SEARCH, _VIEW, _CART, _REMOVE, _BUY = (
    EVENT_TYPES.index(t)
    for t in ("page_view", "search", "product_view", "add_to_cart", "remove_from_cart", "purchase")
)
_BAD_TYPE_STRINGS = ("clickk", "", "PURCHASE ")
_EVENT_TYPE_DICT = pa.array(list(EVENT_TYPES) + list(_BAD_TYPE_STRINGS), pa.string())
_PRODUCT_TYPE_CODES = np.array([EVENT_TYPES.index(t) for t in PRODUCT_EVENT_TYPES])

# Behaviour parameters.
_USER_ACTIVITY_SIGMA = 1.5  # lognormal sigma of per-user activity weights
_P_NEW_SESSION = 1 / 6  # per-event probability to start a new session (users)
_P_NEW_SESSION_BOT = 1 / 400
_MEAN_GAP_S = 40.0  # mean seconds between events of a session
_MEAN_GAP_S_BOT = 4.0
# base event type thresholds (cumulative page_view, +search; rest product_view)
_TYPE_THRESHOLDS = np.array(
    [
        [0.25, 0.47],  # user, inside a session
        [0.60, 0.75],  # user, first event of a session (landing)
        [0.20, 0.25],  # bot
    ]
)
_P_CART = 0.095  # product_view followed by add_to_cart of the same product
_P_PURCHASE = 0.42  # add_to_cart later purchased (before placement losses)
_P_REMOVE = 0.12  # add_to_cart later removed
_PRODUCT_ZIPF_S = 1.05
_QUERY_ZIPF_S = 1.0
_BOT_FRACTION = 1e-4
_BOT_EVENTS = (2_000, 12_000)
_BOT_MAX_SHARE = 0.15

# ---------------------------------------------------------------------------
# Bad-row variants: (reason, variant name, text-only)
# ---------------------------------------------------------------------------
_BAD_REASONS = tuple(r for r in DEAD_LETTER_REASONS if r != REASON_MALFORMED_ROW)  # every row-level reason
_BAD_VARIANTS = (
    (REASON_MISSING_USER_ID, "user_null", False),
    (REASON_MISSING_USER_ID, "user_empty", False),
    (REASON_MISSING_USER_ID, "user_blank", False),
    (REASON_BAD_EVENT_TIME, "time_null", False),
    (REASON_BAD_EVENT_TIME, "time_garbage", True),
    (REASON_BAD_EVENT_TIME, "time_invalid", True),
    (REASON_OUT_OF_DAY, "prev_day", False),
    (REASON_OUT_OF_DAY, "next_day", False),
    (REASON_UNKNOWN_EVENT_TYPE, "type_typo", False),
    (REASON_UNKNOWN_EVENT_TYPE, "type_empty", False),
    (REASON_UNKNOWN_EVENT_TYPE, "type_upper", False),
    (REASON_MISSING_PRODUCT_ID, "view_no_product", False),
    (REASON_MISSING_PRODUCT_ID, "purchase_no_product", False),
    (REASON_BAD_PRICE, "price_negative", False),
    (REASON_BAD_PRICE, "price_nan", False),
    (REASON_BAD_PRICE, "price_inf", False),
    (REASON_BAD_PRICE, "price_abc", True),
    (REASON_BAD_PRICE, "price_comma", True),
    (REASON_BAD_QUANTITY, "qty_zero", False),
    (REASON_BAD_QUANTITY, "qty_negative", False),
    (REASON_BAD_QUANTITY, "qty_over_max", False),
    (REASON_BAD_QUANTITY, "qty_huge", False),
    (REASON_BAD_QUANTITY, "qty_many", True),
    (REASON_BAD_QUANTITY, "qty_fraction", True),
)
_VARIANT_INDEX = {name: i for i, (_, name, _) in enumerate(_BAD_VARIANTS)}


# ---------------------------------------------------------------------------
# Small helpers
# ---------------------------------------------------------------------------
_CHUNK = 1 << 14  # rows per chunk when filling byte matrices (cache friendly)


def _put_digits(block: np.ndarray, end: int, values: np.ndarray, width: int) -> None:
    """Write ``values`` as ``width`` zero-padded ASCII digits ending before column ``end``."""
    v = values
    for col in range(end - 1, end - width - 1, -1):
        q = v // 10
        block[:, col] = v - q * 10
        block[:, col] += 48
        v = q


def _strings_from_matrix(buf: np.ndarray, valid: np.ndarray | None = None) -> pa.Array:
    """String array whose i-th value is the bytes of row i of the uint8 matrix ``buf``."""
    n, length = buf.shape
    total = n * length
    bitmap, null_count = None, 0
    if valid is not None and not valid.all():
        bitmap = pa.py_buffer(np.packbits(valid, bitorder="little"))
        null_count = int(n - np.count_nonzero(valid))
    if total >= 2**31:
        offsets = np.arange(0, total + 1, length, dtype=np.int64)
        arr = pa.LargeStringArray.from_buffers(
            n, pa.py_buffer(offsets), pa.py_buffer(buf), bitmap, null_count
        )
        return arr.cast(pa.string())
    offsets = np.arange(0, total + 1, length, dtype=np.int32)
    return pa.StringArray.from_buffers(n, pa.py_buffer(offsets), pa.py_buffer(buf), bitmap, null_count)


def _format_ids(prefix: str, idx: np.ndarray, width: int) -> pa.Array:
    """Zero-padded ids ``prefix + %0{width}d`` built in one byte matrix (no Python strings)."""
    idx = np.asarray(idx, dtype=np.int64)
    n = len(idx)
    top = int(idx.max()) if n else 0
    if top >= 10**width:
        width = len(str(top))
    utype = np.uint32 if top < 2**32 else np.uint64
    p = np.frombuffer(prefix.encode(), dtype=np.uint8)
    length = len(p) + width
    buf = np.empty((n, length), dtype=np.uint8)
    buf[:, : len(p)] = p
    for s in range(0, n, _CHUNK):
        _put_digits(buf[s : s + _CHUNK], length, idx[s : s + _CHUNK].astype(utype), width)
    return _strings_from_matrix(buf)


def _take_strings(dictionary, codes: np.ndarray, valid: np.ndarray | None = None) -> pa.Array:
    """String column from small dictionary + integer codes (null where not valid)."""
    if not isinstance(dictionary, pa.Array):
        dictionary = pa.array(list(dictionary), pa.string())
    mask = None if valid is None else ~valid
    if mask is not None:
        codes = np.where(valid, codes, 0)
    indices = pa.array(np.asarray(codes, dtype=np.int32), mask=mask)
    return pc.take(dictionary, indices)


def _zipf_cdf(n: int, s: float, offset: float = 1.0) -> np.ndarray:
    w = 1.0 / np.power(np.arange(n, dtype=np.float64) + offset, s)
    cdf = np.cumsum(w)
    cdf /= cdf[-1]
    return cdf


def _sample_cdf(rng: np.random.Generator, cdf: np.ndarray, size: int) -> np.ndarray:
    out = np.searchsorted(cdf, rng.random(size), side="right")
    return np.minimum(out, len(cdf) - 1)


def _group_exclusive_cumsum(values: np.ndarray, group: np.ndarray, group_start: np.ndarray) -> np.ndarray:
    """Cumulative sum of ``values`` restarting at each group (exclusive of the element)."""
    cs = np.cumsum(values)
    cs -= values
    return cs - cs[group_start][group]


def _seed_sequences(seed):
    """(catalog, events) SeedSequences derived from one seed; catalog depends on seed only."""
    if isinstance(seed, np.random.SeedSequence):
        entropy = seed.entropy
    else:
        entropy = np.random.SeedSequence(seed).entropy
    return (
        np.random.SeedSequence(entropy, spawn_key=(0,)),
        np.random.SeedSequence(entropy, spawn_key=(1,)),
    )


def _coerce_date(date) -> _dt.date:
    if isinstance(date, _dt.datetime):
        return date.date()
    if isinstance(date, _dt.date):
        return date
    if isinstance(date, str):
        try:
            return _dt.date.fromisoformat(date)
        except ValueError as exc:
            raise ValueError(f"date must be an ISO date YYYY-MM-DD, got {date!r}") from exc
    raise ValueError(f"date must be a datetime.date, got {type(date).__name__}")


def _check_int(name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def _check_args(n_users, n_events, n_products, bad_rows_fraction):
    n_users = _check_int("n_users", n_users, 1)
    n_events = _check_int("n_events", n_events, 0)
    if n_products is None:
        n_products = max(100, n_users // 10)
    n_products = _check_int("n_products", n_products, 1)
    try:
        frac = float(bad_rows_fraction)
    except (TypeError, ValueError):
        raise ValueError(f"bad_rows_fraction must be a number in [0, 1], got {bad_rows_fraction!r}") from None
    if not (0.0 <= frac <= 1.0):
        raise ValueError(f"bad_rows_fraction must be in [0, 1], got {bad_rows_fraction!r}")
    return n_users, n_events, n_products, frac


# ---------------------------------------------------------------------------
# Catalog
# ---------------------------------------------------------------------------
class _Catalog:
    """Products (category, price, popularity) and search vocabulary for one seed."""

    def __init__(self, n_products: int, seed):
        catalog_ss, _ = _seed_sequences(seed)
        rng = np.random.default_rng(catalog_ss)
        n_cat = len(CATEGORIES)
        cat_rank = rng.permutation(n_cat)  # category popularity order
        cat_w = np.empty(n_cat)
        cat_w[cat_rank] = 1.0 / np.power(np.arange(n_cat) + 2.0, 0.8)
        cat_w /= cat_w.sum()
        self.n_products = n_products
        self.category = rng.choice(n_cat, size=n_products, p=cat_w).astype(np.int32)
        medians = np.array(list(_CATEGORY_MEDIAN_PRICE.values()))
        raw = medians[self.category] * np.exp(0.55 * rng.standard_normal(n_products))
        self.price = np.maximum(np.round(raw, 2), 0.99)
        # popularity: rank r -> product popularity_perm[r]
        self.popularity_perm = rng.permutation(n_products).astype(np.int32)
        self.popularity_cdf = _zipf_cdf(n_products, _PRODUCT_ZIPF_S, offset=5.0)
        # search vocabulary: short queries are the popular ones
        short = list(_NOUNS) + [f"{a} {n}" for a in _COLORS + _QUALITIES for n in _NOUNS]
        long = [f"{c} {q} {n}" for c in _COLORS for q in _QUALITIES for n in _NOUNS]
        short = [short[i] for i in rng.permutation(len(short))]
        long = [long[i] for i in rng.permutation(len(long))]
        self.queries = pa.array(short + long, pa.string())
        self.query_cdf = _zipf_cdf(len(self.queries), _QUERY_ZIPF_S, offset=2.0)
        self.product_ids = _format_ids("p", np.arange(n_products), 6)
        self.categories = pa.array(list(CATEGORIES), pa.string())

    def sample_products(self, rng: np.random.Generator, size: int) -> np.ndarray:
        return self.popularity_perm[_sample_cdf(rng, self.popularity_cdf, size)]


# ---------------------------------------------------------------------------
# Event simulation
# ---------------------------------------------------------------------------
def _n_bots(n_users: int) -> int:
    if n_users >= 1000:
        return max(3, round(n_users * _BOT_FRACTION))
    return 1 if n_users >= 100 else 0


def _simulate(rng: np.random.Generator, catalog: _Catalog, n_users: int, n_events: int) -> dict:
    """Clean events as numpy arrays (codes), grouped by user, session, time."""
    n = n_events
    # --- events per user: lognormal weights + a few bots -------------------
    n_bots = _n_bots(n_users)
    bot_users = np.sort(rng.choice(n_users, size=n_bots, replace=False)) if n_bots else np.zeros(0, np.int64)
    bot_counts = rng.integers(_BOT_EVENTS[0], _BOT_EVENTS[1], size=n_bots)
    budget = int(_BOT_MAX_SHARE * n)
    if bot_counts.sum() > budget:
        bot_counts = np.floor(bot_counts * (budget / bot_counts.sum())).astype(np.int64)
    weights = rng.lognormal(0.0, _USER_ACTIVITY_SIGMA, size=n_users)
    weights[bot_users] = 0.0
    weights /= weights.sum()
    counts = rng.multinomial(n - int(bot_counts.sum()), weights)
    counts[bot_users] = bot_counts
    user_is_bot = np.zeros(n_users, dtype=bool)
    user_is_bot[bot_users] = True
    user = np.repeat(np.arange(n_users, dtype=np.int32), counts)
    is_bot = user_is_bot[user]

    # --- sessions ------------------------------------------------------------
    user_first = (np.cumsum(counts) - counts)[counts > 0]
    start = rng.random(n, dtype=np.float32) < np.where(is_bot, _P_NEW_SESSION_BOT, _P_NEW_SESSION).astype(np.float32)
    start[user_first] = True
    sess_first = np.flatnonzero(start)
    n_sess = len(sess_first)
    sess = np.cumsum(start, dtype=np.int64) - 1
    sess_last = np.append(sess_first[1:], n) - 1
    sess_user = user[sess_first]
    sess_is_bot = user_is_bot[sess_user]

    # offsets inside a session: cumulative exponential gaps (microseconds)
    gap = rng.exponential(1.0, size=n)
    gap *= np.where(is_bot, _MEAN_GAP_S_BOT * 1e6, _MEAN_GAP_S * 1e6)
    gap = gap.astype(np.int64)
    gap[sess_first] = 0
    offset = _group_exclusive_cumsum(gap, sess, sess_first) + gap
    del gap
    duration = offset[sess_last]

    # session placement: a user's sessions are in time order and never overlap.
    # Sorted uniforms u_k (exponential spacings) spread the user's idle time
    # over the day: start_k = u_k * idle + (durations of earlier sessions).
    # Users active for more than 80% of a day get their gaps compressed.
    new_user = np.r_[True, sess_user[1:] != sess_user[:-1]] if n_sess else np.zeros(0, bool)
    sess_user_first = np.flatnonzero(new_user)
    sess_ugroup = np.cumsum(new_user) - 1
    spacing = rng.exponential(1.0, size=n_sess)
    incl = _group_exclusive_cumsum(spacing, sess_ugroup, sess_user_first) + spacing
    group_last = np.append(sess_user_first[1:], n_sess) - 1
    total = incl[group_last] + rng.exponential(1.0, size=len(sess_user_first))
    u = incl / total[sess_ugroup]
    user_busy = np.add.reduceat(duration.astype(np.float64), sess_user_first) if n_sess else np.zeros(0)
    user_scale = np.minimum(1.0, 0.8 * _DAY_US / np.maximum(user_busy, 1.0))
    sess_scale = user_scale[sess_ugroup]
    idle = _DAY_US - user_busy * user_scale
    earlier = _group_exclusive_cumsum(duration * sess_scale, sess_ugroup, sess_user_first)
    sess_start = np.floor(u * idle[sess_ugroup] + earlier).astype(np.int64)
    if (user_scale < 1.0).any():
        offset = np.floor(offset * sess_scale[sess]).astype(np.int64)
    t = sess_start[sess] + offset
    np.clip(t, 0, _DAY_US - 1, out=t)
    del offset

    # --- event types ---------------------------------------------------------
    cls = np.where(is_bot, 2, start.astype(np.int8)).astype(np.int8)
    r = rng.random(n, dtype=np.float32)
    etype = (r >= _TYPE_THRESHOLDS[cls, 0].astype(np.float32)).astype(np.int8)
    etype += r >= _TYPE_THRESHOLDS[cls, 1].astype(np.float32)
    del r, cls  # codes: 0 page_view, 1 search, 2 product_view (EVENT_TYPES order)

    prod = np.full(n, -1, dtype=np.int32)
    views = np.flatnonzero(etype == _VIEW)
    prod[views] = catalog.sample_products(rng, len(views))
    del views
    qty = np.zeros(n, dtype=np.int32)

    # add_to_cart right after a product_view of the same product (same session)
    if n > 1:
        cand = (etype[:-1] == _VIEW) & ~start[1:] & ~is_bot[:-1]
        cand &= rng.random(n - 1, dtype=np.float32) < _P_CART
        cand[1:] &= ~cand[:-1].copy()  # a cart slot is never itself a cart source
        src = np.flatnonzero(cand)
        del cand
    else:
        src = np.zeros(0, np.int64)
    carts = src + 1
    etype[carts] = _CART
    prod[carts] = prod[src]
    qty[carts] = 1 + _sample_cdf(rng, np.cumsum(_QUANTITY_P), len(carts))

    # purchases / removals of carted products later in the same session
    remaining = sess_last[sess[carts]] - carts
    uu = rng.random(len(carts))
    act = np.where(uu < _P_PURCHASE, _BUY, np.where(uu < _P_PURCHASE + _P_REMOVE, _REMOVE, -1))
    act[remaining <= 0] = -1
    sel = np.flatnonzero(act >= 0)
    dest = carts[sel] + 1 + np.floor(rng.random(len(sel)) * remaining[sel]).astype(np.int64)
    is_src = np.zeros(n, dtype=bool)
    is_src[src] = True
    ok = (etype[dest] <= _VIEW) & ~is_src[dest]
    sel, dest = sel[ok], dest[ok]
    dest, first = np.unique(dest, return_index=True)  # one action per slot
    sel = sel[first]
    etype[dest] = act[sel]
    prod[dest] = prod[carts[sel]]
    qty[dest] = qty[carts[sel]]
    del is_src

    # search queries
    qidx = np.zeros(n, dtype=np.int32)
    searches = np.flatnonzero(etype == _SEARCH)
    qidx[searches] = _sample_cdf(rng, catalog.query_cdf, len(searches))

    # --- context: device / referrer per session, country per user ------------
    sess_device = _sample_cdf(rng, np.cumsum(_DEVICE_P), n_sess).astype(np.int8)
    sess_device[sess_is_bot] = _DEVICES.index("desktop")
    ref_cdf = np.cumsum(_REFERRER_P + (0.05,))
    sess_ref = _sample_cdf(rng, ref_cdf / ref_cdf[-1], n_sess).astype(np.int8)  # 5 == null
    sess_ref[sess_is_bot] = np.where(rng.random(int(sess_is_bot.sum())) < 0.5, 0, len(_REFERRERS))
    cw = np.array(list(_COUNTRY_WEIGHTS.values()), dtype=np.float64)
    user_country = _sample_cdf(rng, np.cumsum(cw) / cw.sum(), n_users).astype(np.int8)

    return {
        "user": user,
        "sess": sess,
        "t": t,
        "etype": etype,
        "prod": prod,
        "qty": qty,
        "qidx": qidx,
        "device": sess_device[sess],
        "referrer": sess_ref[sess],
        "country": user_country[user],
    }


def _inject_bad_rows(rng, catalog, ev: dict, k: int, text_format: bool):
    """Overwrite k random rows (in the numpy arrays) with malformed rows.

    Adds validity masks / overrides to ``ev`` for ``_build_table`` and returns
    ``(positions, reason index per bad row)``.
    """
    n = len(ev["t"])
    pos = np.sort(rng.choice(n, size=k, replace=False)).astype(np.int64)
    allowed = [i for i, (_, _, text_only) in enumerate(_BAD_VARIANTS) if text_format or not text_only]
    by_reason = [[i for i in allowed if _BAD_VARIANTS[i][0] == reason] for reason in _BAD_REASONS]
    reason = rng.integers(len(_BAD_REASONS), size=k)
    n_var = np.array([len(v) for v in by_reason])
    offsets = np.cumsum(n_var) - n_var
    flat = np.array([i for v in by_reason for i in v])
    variant = flat[offsets[reason] + np.floor(rng.random(k) * n_var[reason]).astype(np.int64)]

    def rows(*names):
        return pos[np.isin(variant, [_VARIANT_INDEX[x] for x in names])]

    etype, prod, qty, t = ev["etype"], ev["prod"], ev["qty"], ev["t"]
    user_valid = np.ones(n, dtype=bool)
    time_valid = np.ones(n, dtype=bool)
    pid_valid = np.ones(n, dtype=bool)  # product_id present when prod >= 0

    # missing user id: null / "" / "   " (codes n_users, n_users + 1)
    user_valid[rows("user_null")] = False
    ev["user_extra"] = (rows("user_empty"), rows("user_blank"))
    # event time
    time_valid[rows("time_null")] = False
    t[rows("prev_day")] -= _DAY_US
    t[rows("next_day")] += _DAY_US
    # unknown event types (codes past EVENT_TYPES)
    for name, value in zip(("type_typo", "type_empty", "type_upper"), _BAD_TYPE_STRINGS):
        etype[rows(name)] = len(EVENT_TYPES) + _BAD_TYPE_STRINGS.index(value)

    # product-event rows: re-draw a complete, valid product event first
    def product_event(idx, type_choices):
        types = np.asarray(type_choices, dtype=np.int8)
        etype[idx] = types[rng.integers(len(types), size=len(idx))]
        prod[idx] = catalog.sample_products(rng, len(idx))
        qty[idx] = np.where(etype[idx] == _VIEW, 0, 1 + _sample_cdf(rng, np.cumsum(_QUANTITY_P), len(idx)))

    product_event(rows("view_no_product"), [_VIEW])
    product_event(rows("purchase_no_product"), [_BUY])
    pid_valid[rows("view_no_product", "purchase_no_product")] = False
    price_rows = rows("price_negative", "price_nan", "price_inf", "price_abc", "price_comma")
    product_event(price_rows, [_VIEW, _CART, _BUY])
    qty_rows = rows("qty_zero", "qty_negative", "qty_over_max", "qty_huge", "qty_many", "qty_fraction")
    product_event(qty_rows, [_CART, _REMOVE, _BUY])
    qty[rows("qty_zero")] = 0
    qty[rows("qty_negative")] = -1
    qty[rows("qty_over_max")] = MAX_QUANTITY + 1
    qty[rows("qty_huge")] = 10**6
    ev["qty_forced"] = rows("qty_zero", "qty_negative", "qty_over_max", "qty_huge")
    ev["user_valid"] = user_valid
    ev["time_valid"] = time_valid
    ev["pid_valid"] = pid_valid
    ev["price_special"] = {
        "negative": rows("price_negative"),
        "nan": rows("price_nan"),
        "inf": rows("price_inf"),
    }
    ev["text_overrides"] = {
        "event_time": [(rows("time_garbage"), "not-a-time"), (rows("time_invalid"), None)],
        "price": [(rows("price_abc"), "abc"), (rows("price_comma"), "12,50")],
        "quantity": [(rows("qty_many"), "many"), (rows("qty_fraction"), "1.5")],
    }
    reason_of_row = np.array([_BAD_REASONS.index(_BAD_VARIANTS[v][0]) for v in range(len(_BAD_VARIANTS))])[variant]
    return pos, reason_of_row


def _build_table(catalog: _Catalog, ev: dict, date: _dt.date, n_users: int, bad) -> pa.Table:
    n = len(ev["t"])
    etype, prod, qty = ev["etype"], ev["prod"], ev["qty"]
    is_product = np.isin(etype, _PRODUCT_TYPE_CODES)
    has_prod = is_product | ((etype >= len(EVENT_TYPES)) & (prod >= 0))
    prod_safe = np.where(has_prod, prod, 0)

    # user ids: dictionary of formatted ids (+ "" and "   " for bad rows)
    user_codes = ev["user"]
    user_dict = _format_ids("u", np.arange(n_users), 7)
    if bad is not None:
        user_dict = pa.concat_arrays([user_dict, pa.array(["", "   "], pa.string())])
        empty_rows, blank_rows = ev["user_extra"]
        user_codes = user_codes.copy()
        user_codes[empty_rows] = n_users
        user_codes[blank_rows] = n_users + 1
    user_id = _take_strings(user_dict, user_codes, ev.get("user_valid"))

    event_id = _format_ids("e", np.arange(n), 10)
    session_id = _format_ids("s", ev["sess"], 9)

    day_start = (date - _EPOCH).days * _DAY_US
    time_valid = ev.get("time_valid")
    event_time = pa.array(
        ev["t"] + day_start,
        type=pa.timestamp("us", tz="UTC"),
        mask=None if time_valid is None else ~time_valid,
    )
    event_type = _take_strings(_EVENT_TYPE_DICT, etype)

    pid_valid = has_prod if bad is None else has_prod & ev["pid_valid"]
    product_id = _take_strings(catalog.product_ids, prod_safe, pid_valid)
    category = _take_strings(catalog.categories, catalog.category[prod_safe], has_prod)
    price_values = catalog.price[prod_safe]
    if bad is not None:
        special = ev["price_special"]
        price_values[special["negative"]] = -price_values[special["negative"]]
        price_values[special["nan"]] = np.nan
        price_values[special["inf"]] = np.inf
    price = pa.array(price_values, type=pa.float64(), mask=~has_prod)
    qty_valid = is_product & (etype != _VIEW)
    if bad is not None:
        qty_valid = qty_valid.copy()
        qty_valid[ev["qty_forced"]] = True
    quantity = pa.array(qty, type=pa.int32(), mask=~qty_valid)
    search_query = _take_strings(catalog.queries, ev["qidx"], etype == _SEARCH)
    device = _take_strings(_DEVICES, ev["device"])
    country = _take_strings(_COUNTRIES, ev["country"])
    ref = ev["referrer"]
    referrer = _take_strings(_REFERRERS, ref, ref < len(_REFERRERS))

    schema = RAW_EVENT_SCHEMA if bad is None else RAW_EVENT_SCHEMA_WITH_BAD_ROWS
    return pa.Table.from_arrays(
        [event_id, user_id, session_id, event_time, event_type, product_id, category,
         price, quantity, search_query, device, country, referrer],
        schema=schema,
    )


def _replace_rows(column: pa.Array, rows: np.ndarray, values: pa.Array) -> pa.Array:
    """Column with ``column[rows] = values`` (rows sorted)."""
    if len(rows) == 0:
        return column
    mask = np.zeros(len(column), dtype=bool)
    mask[rows] = True
    return pc.replace_with_mask(column, pa.array(mask), values)


def _timestamps_to_text(col) -> pa.Array:
    """ISO-8601 UTC strings ``YYYY-MM-DDTHH:MM:SS.ffffffZ`` (nulls kept), vectorized."""
    if isinstance(col, pa.ChunkedArray):
        col = col.combine_chunks()
    col = pc.cast(col, pa.timestamp("us"), safe=False)
    n = len(col)
    valid = np.asarray(col.is_valid()) if col.null_count else None
    us = np.asarray(pc.cast(col, pa.int64()).fill_null(0))
    days = np.floor_divide(us, _DAY_US)
    dmin, dmax = (int(days.min()), int(days.max())) if n else (0, 0)
    lut_dates = None
    if dmax - dmin <= 200_000:
        try:
            lut_dates = [(_EPOCH + _dt.timedelta(days=d)).isoformat() for d in range(dmin, dmax + 1)]
        except OverflowError:  # outside years 1..9999
            lut_dates = None
    if lut_dates is None:
        return pc.strftime(col, format="%Y-%m-%dT%H:%M:%SZ")
    lut = np.frombuffer("".join(lut_dates).encode(), dtype=np.uint8).reshape(-1, 10)
    buf = np.empty((n, 27), dtype=np.uint8)
    buf[:, 10] = ord("T")
    buf[:, 13] = buf[:, 16] = ord(":")
    buf[:, 19] = ord(".")
    buf[:, 26] = ord("Z")
    for s in range(0, n, _CHUNK):
        d = days[s : s + _CHUNK]
        tod = (us[s : s + _CHUNK] - d * _DAY_US).astype(np.uint64)
        secs = (tod // 1_000_000).astype(np.uint32)
        frac = (tod - secs.astype(np.uint64) * 1_000_000).astype(np.uint32)
        b = buf[s : s + _CHUNK]
        b[:, :10] = lut[d - dmin]
        _put_digits(b, 13, secs // 3600, 2)
        _put_digits(b, 16, secs // 60 % 60, 2)
        _put_digits(b, 19, secs % 60, 2)
        _put_digits(b, 26, frac, 6)
    return _strings_from_matrix(buf, valid)


def to_text_table(table: pa.Table) -> pa.Table:
    """All-string variant: ISO-8601 ``...T..:..:..ffffffZ`` times, decimal numbers, nulls kept."""
    arrays = []
    for field, col in zip(table.schema, table.columns):
        if pa.types.is_string(field.type) or pa.types.is_large_string(field.type):
            arrays.append(col.cast(pa.string()))
        elif pa.types.is_timestamp(field.type):
            arrays.append(_timestamps_to_text(col))
        else:
            arrays.append(col.cast(pa.string()))
    schema = pa.schema([pa.field(f.name, pa.string()) for f in table.schema])
    return pa.Table.from_arrays(arrays, schema=schema)


def _generate(n_users, n_events, date, seed, n_products, bad_rows_fraction, text_format):
    n_users, n_events, n_products, frac = _check_args(n_users, n_events, n_products, bad_rows_fraction)
    date = _coerce_date(date)
    catalog = _Catalog(n_products, seed)
    _, events_ss = _seed_sequences(seed)
    rng = np.random.default_rng(events_ss)
    k = int(round(frac * n_events))
    by_reason = {reason: 0 for reason in _BAD_REASONS}
    if n_events == 0:
        table = RAW_EVENT_SCHEMA.empty_table()
        return (to_text_table(table) if text_format else table), 0, by_reason

    ev = _simulate(rng, catalog, n_users, n_events)
    bad = None
    if k:
        bad = _inject_bad_rows(rng, catalog, ev, k, text_format)
    table = _build_table(catalog, ev, date, n_users, bad)
    del ev["t"]
    if bad is not None:
        pos, reason_idx = bad
        prefixes = pa.array([f"bad-{r}-" for r in _BAD_REASONS], pa.string())
        bad_ids = pc.binary_join_element_wise(
            pc.take(prefixes, pa.array(reason_idx.astype(np.int32))),
            pa.array(np.arange(k, dtype=np.int64)).cast(pa.string()),
            "",
        )
        table = table.set_column(0, table.schema.field(0), _replace_rows(table.column(0).combine_chunks(), pos, bad_ids))
        counts = np.bincount(reason_idx, minlength=len(_BAD_REASONS))
        by_reason = {r: int(c) for r, c in zip(_BAD_REASONS, counts)}
    if text_format:
        table = to_text_table(table)
        if bad is not None:
            invalid_date = f"{date.year}-13-45T99:00:00Z"
            for name, overrides in ev["text_overrides"].items():
                i = table.schema.get_field_index(name)
                col = table.column(i).combine_chunks()
                for rows, value in overrides:
                    value = invalid_date if value is None else value
                    col = _replace_rows(col, rows, pa.repeat(pa.scalar(value, pa.string()), len(rows)))
                table = table.set_column(i, table.schema.field(i), col)
    return table, k, by_reason


# ---------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------
def generate_events(
    n_users: int,
    n_events: int,
    date: _dt.date,
    *,
    seed: int | None = None,
    n_products: int | None = None,
    bad_rows_fraction: float = 0.0,
    text_format: bool = False,
) -> pa.Table:
    """Generate one UTC day of synthetic clickstream events.

    Returns a table with schema ``RAW_EVENT_SCHEMA`` (clean data),
    ``RAW_EVENT_SCHEMA_WITH_BAD_ROWS`` (same types, all fields nullable) when
    bad rows are requested, or ``TEXT_EVENT_SCHEMA`` (all strings) when
    ``text_format`` is true.
    """
    table, _, _ = _generate(n_users, n_events, date, seed, n_products, bad_rows_fraction, bool(text_format))
    return table


_EVENT_FILE_RE = re.compile(r"^events-\d{5}\.(parquet|jsonl|csv)$")


def _jsonl_lines_python(batch: pa.RecordBatch) -> bytes:
    names = batch.schema.names
    dumps = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode
    cols = [c.to_pylist() for c in batch.columns]
    return "".join(dumps(dict(zip(names, row))) + "\n" for row in zip(*cols)).encode("utf-8")


def _jsonl_lines_arrow(batch: pa.RecordBatch) -> pa.Buffer | bytes | None:
    """JSON lines of an all-string batch built with Arrow kernels; None if unsupported."""
    parts = []
    for i, (name, col) in enumerate(zip(batch.schema.names, batch.columns)):
        if not pa.types.is_string(col.type):
            return None
        data = col.buffers()[2]
        raw = np.frombuffer(data, dtype=np.uint8) if data is not None else np.zeros(0, np.uint8)
        if (raw < 0x20).any():
            return None  # control characters need \\u escapes: use the json module
        if (raw == 0x5C).any():
            col = pc.replace_substring(col, "\\", "\\\\")
        if (raw == 0x22).any():
            col = pc.replace_substring(col, '"', '\\"')
        col = pc.binary_join_element_wise('"', col, '"', "").fill_null("null")
        parts.append(("{" if i == 0 else ",") + json.dumps(name) + ":")
        parts.append(col)
    parts.append("}\n")
    lines = pc.binary_join_element_wise(*parts, "")
    if len(lines) == 0:
        return b""
    offsets = np.frombuffer(lines.buffers()[1], dtype=np.int32, count=len(lines) + 1, offset=lines.offset * 4)
    return lines.buffers()[2].slice(int(offsets[0]), int(offsets[-1] - offsets[0]))


def _write_jsonl(table: pa.Table, path: str, chunk_rows: int = 262_144) -> None:
    with open(path, "wb") as fh:
        for batch in table.to_batches(max_chunksize=chunk_rows):
            data = _jsonl_lines_arrow(batch)
            fh.write(_jsonl_lines_python(batch) if data is None else data)


def write_events(table: pa.Table, out_dir: str, *, fmt: str = "parquet", n_files: int | None = None) -> list[str]:
    """Write ``table`` as ``out_dir/events-00000.<ext>``..., rows split contiguously.

    Existing ``events-NNNNN.{parquet,jsonl,csv}`` files in ``out_dir`` are removed
    first so a directory never mixes runs. jsonl/csv are written from the
    all-string variant of the table (typed tables are converted).
    """
    if fmt not in FORMATS:
        raise ValueError(f"fmt must be one of {', '.join(FORMATS)}, got {fmt!r}")
    n_rows = table.num_rows
    if n_files is None:
        n_files = max(1, math.ceil(n_rows / ROWS_PER_FILE))
    n_files = _check_int("n_files", n_files, 1)
    if fmt != "parquet" and any(not pa.types.is_string(f.type) for f in table.schema):
        table = to_text_table(table)
    os.makedirs(out_dir, exist_ok=True)
    for name in os.listdir(out_dir):
        if _EVENT_FILE_RE.match(name):
            os.remove(os.path.join(out_dir, name))
    bounds = [n_rows * i // n_files for i in range(n_files + 1)]
    paths = []
    for i in range(n_files):
        part = table.slice(bounds[i], bounds[i + 1] - bounds[i])
        path = os.path.join(out_dir, f"events-{i:05d}.{_EXTENSIONS[fmt]}")
        if fmt == "parquet":
            import pyarrow.parquet as pq

            pq.write_table(part, path, row_group_size=PARQUET_ROW_GROUP_SIZE, compression="zstd")
        elif fmt == "csv":
            import pyarrow.csv as pacsv

            pacsv.write_csv(part, path)
        else:
            _write_jsonl(part, path)
        paths.append(path)
    return paths


def write_catalog(out_dir: str, n_products: int, seed) -> dict[str, str]:
    """Write the public catalog lists for ``(n_products, seed)``.

    ``out_dir/catalog/products.csv`` (product_id,category,price for every
    product) and ``out_dir/catalog/categories.txt`` (every category, one a line;
    some may have no product). Returns ``{"products": path, "categories": path}``.
    """
    n_products = _check_int("n_products", n_products, 1)
    catalog = _Catalog(n_products, seed)
    cat_dir = os.path.join(out_dir, "catalog")
    os.makedirs(cat_dir, exist_ok=True)
    products_path = os.path.join(cat_dir, "products.csv")
    categories_path = os.path.join(cat_dir, "categories.txt")
    ids = catalog.product_ids.to_pylist()
    with open(products_path, "w", encoding="utf-8", newline="\n") as fh:
        fh.write("product_id,category,price\n")
        fh.write(
            "".join(
                f"{pid},{CATEGORIES[c]},{p:.2f}\n"
                for pid, c, p in zip(ids, catalog.category.tolist(), catalog.price.tolist())
            )
        )
    with open(categories_path, "w", encoding="utf-8", newline="\n") as fh:
        fh.write("".join(f"{c}\n" for c in CATEGORIES))
    return {"products": products_path, "categories": categories_path}


def generate(
    out_dir: str,
    *,
    n_users: int,
    n_events: int,
    date,
    seed: int | None = None,
    n_products: int | None = None,
    bad_rows_fraction: float = 0.0,
    fmt: str = "parquet",
    n_files: int | None = None,
) -> dict:
    """Generate events and catalog: ``out_dir/events/events-*.<ext>``, ``out_dir/catalog/``.

    With ``seed=None`` a random seed is drawn and reported as ``summary["seed"]``
    (the catalog and events share it).
    """
    if fmt not in FORMATS:
        raise ValueError(f"fmt must be one of {', '.join(FORMATS)}, got {fmt!r}")
    if n_files is not None:
        _check_int("n_files", n_files, 1)
    n_users, n_events, n_products, bad_rows_fraction = _check_args(n_users, n_events, n_products, bad_rows_fraction)
    date = _coerce_date(date)
    if seed is None:
        seed = int(np.random.SeedSequence().entropy)
    t0 = time.perf_counter()
    table, k, by_reason = _generate(
        n_users, n_events, date, seed, n_products, bad_rows_fraction, fmt != "parquet"
    )
    files = write_events(table, os.path.join(out_dir, "events"), fmt=fmt, n_files=n_files)
    catalog = write_catalog(out_dir, n_products, seed)
    return {
        "event_files": files,
        "catalog": catalog,
        "rows": table.num_rows,
        "bad_rows": k,
        "bad_rows_by_reason": by_reason,
        "seconds": round(time.perf_counter() - t0, 3),
        "seed": seed,
        "date": date.isoformat(),
        "n_products": n_products,
        "format": fmt,
    }


def _parse_date(value: str) -> _dt.date:
    try:
        return _dt.date.fromisoformat(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid date {value!r}, expected YYYY-MM-DD") from None


def add_cli_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``clickdp generate``."""
    parser.add_argument("--users", type=int, default=10_000, help="number of users (default 10000)")
    parser.add_argument("--events", type=int, default=100_000, help="number of events (default 100000)")
    parser.add_argument(
        "--date", type=_parse_date, default=None,
        help="UTC day of the events, YYYY-MM-DD (default: today UTC)",
    )
    parser.add_argument("--out", required=True, help="output directory (events/ and catalog/ are created)")
    parser.add_argument("--seed", type=int, default=None, help="random seed (default: random, printed)")
    parser.add_argument("--products", type=int, default=None, help="number of products (default max(100, users/10))")
    parser.add_argument(
        "--bad-rows-fraction", type=float, default=0.0,
        help="fraction of malformed rows, 0..1 (default 0)",
    )
    parser.add_argument("--format", choices=FORMATS, default="parquet", help="event file format (default parquet)")
    parser.add_argument("--files", type=int, default=None, help="number of event files (default 1 per 1M rows)")


def main(args: argparse.Namespace) -> int:
    date = args.date or _dt.datetime.now(_dt.timezone.utc).date()
    try:
        summary = generate(
            args.out,
            n_users=args.users,
            n_events=args.events,
            date=date,
            seed=args.seed,
            n_products=args.products,
            bad_rows_fraction=args.bad_rows_fraction,
            fmt=args.format,
            n_files=args.files,
        )
    except ValueError as exc:
        print(f"clickdp generate: error: {exc}", file=sys.stderr)
        return 2
    print(
        f"generated {summary['rows']} events ({summary['bad_rows']} bad) for {summary['date']} "
        f"in {summary['seconds']:.1f}s: {len(summary['event_files'])} {summary['format']} file(s) in "
        f"{os.path.join(args.out, 'events')}, catalog of {summary['n_products']} products in "
        f"{os.path.join(args.out, 'catalog')} (seed {summary['seed']})"
    )
    return 0


if __name__ == "__main__":  # python -m transforms.generator --out DIR ...
    _parser = argparse.ArgumentParser(prog="clickdp generate", description=__doc__.splitlines()[0])
    add_cli_arguments(_parser)
    sys.exit(main(_parser.parse_args()))
