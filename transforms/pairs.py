"""Product co-occurrence ("viewed together", "bought together"): pure numpy/pyarrow kernels.

Pipeline (the Beam layer routes ALL rows of each user to one shard before calling these):

    counts = session_pairs(unit, session, product, max_pairs_per_user, kind="viewed",
                           event_type=event_type)          # per shard, (a, b, __pid_count)
    merged = merge_pair_counts([...])                        # across shards
    -> private partition selection on __pid_count + noise     (release step, lead)
    top_k_neighbours(released_pairs_table, k)                # post-processing of the RELEASE

Pairs: for every session (keyed by (unit, session id), so two users never share one), the
DISTINCT products of the session's rows of the chosen kind (``viewed``: product_view,
``bought``: purchase) form all unordered pairs (a, b) with a < b (string order). A session
with fewer than two distinct products yields nothing. To bound the quadratic blow-up from
bots, at most ``max_products_per_session`` distinct products per session (uniform sample) and
at most ``max_sessions_per_user`` sessions per user (uniform sample) are considered.

Bounding (global per user): each user contributes each distinct pair at most once (Linf = 1)
and at most ``max_pairs_per_user`` distinct pairs (L0), a uniform random subset of the user's
candidate pairs (``bounding.bound_contributions``). The session/product caps only choose which
candidates exist; the privacy bound is the deterministic L0/Linf above, whatever is sampled.

Release parameters for the per-pair distinct-user counts (``__pid_count``):
    private partition selection with max_partitions_contributed = max_pairs_per_user;
    count noise with L0 = max_pairs_per_user, Linf = 1 (L1 = max_pairs_per_user,
    L2 = sqrt(max_pairs_per_user)).

Sampling randomness is numpy's (never seeded, fresh OS entropy per call), as in
``transforms/bounding.py``: the guarantee does not depend on which rows are sampled.
Everything is vectorized (sorting and offset arithmetic); there is no Python loop over
users or sessions.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from transforms.bounding import PID_COUNT, bound_contributions
from transforms.spec import Bounds

__all__ = [
    "DEFAULT_MAX_PRODUCTS_PER_SESSION",
    "DEFAULT_MAX_SESSIONS_PER_USER",
    "KIND_EVENT_TYPES",
    "PRODUCT_A",
    "PRODUCT_B",
    "bounded_session_pairs",
    "merge_pair_counts",
    "pair_user_counts",
    "session_pairs",
    "top_k_neighbours",
]

KIND_EVENT_TYPES = {"viewed": ("product_view",), "bought": ("purchase",)}
DEFAULT_MAX_PRODUCTS_PER_SESSION = 50
DEFAULT_MAX_SESSIONS_PER_USER = 100

UNIT = "unit"
PRODUCT_A = "product_a"
PRODUCT_B = "product_b"

# top_k_neighbours output columns
PRODUCT = "product"
NEIGHBOUR = "neighbour"
RANK = "rank"

_COUNTS_SCHEMA = pa.schema([pa.field(PRODUCT_A, pa.string()), pa.field(PRODUCT_B, pa.string()),
                            pa.field(PID_COUNT, pa.int64())])
_ROWS_SCHEMA = pa.schema([pa.field(UNIT, pa.uint64()), pa.field(PRODUCT_A, pa.string()),
                          pa.field(PRODUCT_B, pa.string())])


def _plain(arr) -> pa.Array:
    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks() if arr.num_chunks else pa.array([], arr.type)
    elif not isinstance(arr, pa.Array):
        arr = pa.array(arr)
    if pa.types.is_dictionary(arr.type):
        arr = arr.dictionary_decode()
    return arr


def _check_int(name: str, value, minimum: int = 1) -> int:
    v = int(value)
    if v != value or v < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return v


def _run_starts(*sorted_keys: np.ndarray) -> np.ndarray:
    n = sorted_keys[0].size
    starts = np.zeros(n, dtype=bool)
    if n:
        starts[0] = True
        for k in sorted_keys:
            starts[1:] |= k[1:] != k[:-1]
    return starts


def _rank_in_runs(starts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(run id, rank within run) for a boolean run-start mask."""
    run = np.cumsum(starts) - 1
    first = np.flatnonzero(starts)
    return run, np.arange(starts.size, dtype=np.int64) - first[run]


def _sample_within(groups: np.ndarray, cap: int, rng: np.random.Generator) -> np.ndarray:
    """Mask keeping a uniform random subset of at most ``cap`` elements per group value."""
    n = groups.size
    if n == 0:
        return np.zeros(0, dtype=bool)
    _, counts = np.unique(groups, return_counts=True)
    if counts.max() <= cap:
        return np.ones(n, dtype=bool)
    prio = rng.integers(0, np.iinfo(np.int64).max, size=n, dtype=np.int64)
    order = np.lexsort((prio, groups))
    _, rank = _rank_in_runs(_run_starts(groups[order]))
    keep = np.empty(n, dtype=bool)
    keep[order] = rank < cap
    return keep


def _bits(n: int) -> int:
    return max(1, int(n - 1).bit_length())


def _dense(values) -> tuple[np.ndarray, pa.Array]:
    """Dense int64 codes (hash-based dictionary encoding) and the dictionary."""
    enc = pc.dictionary_encode(values if isinstance(values, pa.Array) else pa.array(values))
    return enc.indices.to_numpy(zero_copy_only=False).astype(np.int64), enc.dictionary


class _Bounded:
    """Kept (user, pair) rows as codes: unit value, dense pair code, pair key table."""

    def __init__(self, unit, part, pair_keys, n_products, dictionary):
        self.unit = unit  # uint64 unit id per kept row
        self.part = part  # dense pair code per kept row (index into pair_keys)
        self.pair_keys = pair_keys  # a * n_products + b per dense pair code
        self.n_products = n_products
        self.dictionary = dictionary  # product strings in sorted order (code -> string)

    def ab(self, part):
        key = self.pair_keys[part]
        return key // self.n_products, key % self.n_products


def _empty_bounded(dictionary=None) -> _Bounded:
    z = np.zeros(0, np.int64)
    return _Bounded(np.zeros(0, np.uint64), z, z, 1,
                    dictionary if dictionary is not None else pa.array([], pa.string()))


def _bounded_pair_codes(unit, session, product, max_pairs_per_user, kind, event_type,
                        max_products_per_session, max_sessions_per_user, rng) -> _Bounded:
    max_pairs_per_user = _check_int("max_pairs_per_user", max_pairs_per_user)
    max_products_per_session = _check_int("max_products_per_session", max_products_per_session, 2)
    if max_sessions_per_user is not None:
        max_sessions_per_user = _check_int("max_sessions_per_user", max_sessions_per_user)
    if kind not in KIND_EVENT_TYPES:
        raise ValueError(f"kind must be one of {sorted(KIND_EVENT_TYPES)}, got {kind!r}")
    rng = rng if rng is not None else np.random.default_rng()
    session = _plain(session)
    product = _plain(product).cast(pa.string())
    n = len(product)
    unit = np.asarray(unit)
    if unit.ndim != 1 or unit.size != n or len(session) != n:
        raise ValueError(f"unit, session and product must be 1-d with equal length "
                         f"(got {unit.shape}, {len(session)}, {n})")
    if unit.dtype.kind not in "iu":
        raise TypeError(f"unit must be integer privacy-unit ids, got dtype {unit.dtype}")
    unit = unit.astype(np.uint64, copy=False)
    ok = np.asarray(session.is_valid(), dtype=bool) & np.asarray(product.is_valid(), dtype=bool)
    if event_type is not None:
        et = _plain(event_type)
        if len(et) != n:
            raise ValueError(f"event_type has length {len(et)}, expected {n}")
        ok &= np.asarray(pc.fill_null(pc.is_in(et, value_set=pa.array(KIND_EVENT_TYPES[kind])),
                                      False).to_numpy(zero_copy_only=False), dtype=bool)
    idx = np.flatnonzero(ok)
    if idx.size < 2:
        return _empty_bounded()
    take = pa.array(idx)
    # Product codes in string order, so that a < b by code <=> a < b as strings.
    pcode, dictionary = _dense(product.take(take))
    sorted_pos = pc.sort_indices(dictionary).to_numpy(zero_copy_only=False)
    remap = np.empty(len(dictionary), dtype=np.int64)
    remap[sorted_pos] = np.arange(len(dictionary), dtype=np.int64)
    pcode = remap[pcode]
    dictionary = dictionary.take(pa.array(sorted_pos))
    n_p = len(dictionary)
    ucode, unit_values = _dense(unit[idx])
    unit_values = unit_values.to_numpy(zero_copy_only=False).astype(np.uint64)
    scode, sdict = _dense(session.take(take))
    n_u, n_s = len(unit_values), len(sdict)

    # Distinct (user, session, product), sorted by (user, session, product).
    ub, sb, pb = _bits(n_u), _bits(n_s), _bits(n_p)
    if ub + sb + pb <= 62:
        key = np.sort((ucode << (sb + pb)) | (scode << pb) | pcode)
        key = key[_run_starts(key)]
        u, scode, pcode = key >> (sb + pb), (key >> pb) & ((1 << sb) - 1), key & ((1 << pb) - 1)
    else:
        order = np.lexsort((pcode, scode, ucode))
        u, scode, pcode = ucode[order], scode[order], pcode[order]
        distinct = _run_starts(u, scode, pcode)
        u, scode, pcode = u[distinct], scode[distinct], pcode[distinct]
    sess_start = _run_starts(u, scode)
    sess_id, _ = _rank_in_runs(sess_start)

    # Drop single-product sessions early (they yield nothing).
    sizes = np.bincount(sess_id)
    multi = sizes[sess_id] >= 2
    if max_sessions_per_user is not None and multi.any():
        # Uniform sample of at most max_sessions_per_user multi-product sessions per user.
        s_first = np.flatnonzero(sess_start & multi)
        s_keep = _sample_within(u[s_first], max_sessions_per_user, rng)
        keep_sess = np.zeros(sizes.size, dtype=bool)
        keep_sess[sess_id[s_first[s_keep]]] = True
        multi &= keep_sess[sess_id]
    u, pcode, sess_id = u[multi], pcode[multi], sess_id[multi]
    if u.size == 0:
        return _empty_bounded(dictionary)
    # Uniform sample of at most max_products_per_session products per session.
    keep = _sample_within(sess_id, max_products_per_session, rng)
    if not keep.all():
        u, pcode, sess_id = u[keep], pcode[keep], sess_id[keep]  # still sorted
    run, rank = _rank_in_runs(_run_starts(sess_id))
    size = np.bincount(run)[run]
    # Element i pairs with the (size - 1 - rank) elements after it in its session.
    reps = size - 1 - rank
    total = int(reps.sum())
    if total == 0:
        return _empty_bounded(dictionary)
    first = np.repeat(np.arange(u.size, dtype=np.int64), reps)
    second = first + 1 + (np.arange(total, dtype=np.int64)
                          - np.repeat(np.cumsum(reps) - reps, reps))
    pair_key = pcode[first] * np.int64(n_p) + pcode[second]
    pu = u[first]
    del first, second
    part, pair_keys_arr = _dense(pair_key)  # dense pair codes, hash-based
    pair_keys = pair_keys_arr.to_numpy(zero_copy_only=False).astype(np.int64, copy=False)
    del pair_key

    # Global per-user bounding: Linf = 1 (each pair once), L0 = max_pairs_per_user (uniform).
    bounded = bound_contributions(pu, part, Bounds(max_pairs_per_user, 1), rng)
    rows = bounded.rows
    return _Bounded(unit_values[pu[rows]], part[rows], pair_keys, np.int64(n_p), dictionary)


def bounded_session_pairs(unit: np.ndarray, session, product, max_pairs_per_user: int,
                          kind: str = "viewed", *, event_type=None,
                          max_products_per_session: int = DEFAULT_MAX_PRODUCTS_PER_SESSION,
                          max_sessions_per_user: int | None = DEFAULT_MAX_SESSIONS_PER_USER,
                          rng: np.random.Generator | None = None) -> pa.Table:
    """Bounded co-occurrence rows (unit, product_a, product_b): one row per kept (user, pair).

    unit: uint64 privacy-unit id per row; session, product: string arrays; event_type:
    optional event-type column; when given, only rows of ``kind``'s event types
    (:data:`KIND_EVENT_TYPES`) are used, otherwise the caller has filtered already. Rows with
    a null session or product are ignored. Pass ALL rows of each user (bounding is global
    per user). Holds unit ids: never released; see :func:`pair_user_counts`.
    """
    bd = _bounded_pair_codes(unit, session, product, max_pairs_per_user, kind, event_type,
                             max_products_per_session, max_sessions_per_user, rng)
    a, b = bd.ab(bd.part)
    return pa.table({UNIT: pa.array(bd.unit, pa.uint64()),
                     PRODUCT_A: bd.dictionary.take(pa.array(a, pa.int64())),
                     PRODUCT_B: bd.dictionary.take(pa.array(b, pa.int64()))}, schema=_ROWS_SCHEMA)


def pair_user_counts(rows: pa.Table) -> pa.Table:
    """(product_a, product_b, ``__pid_count``) from :func:`bounded_session_pairs` rows."""
    if rows.num_rows == 0:
        return _COUNTS_SCHEMA.empty_table()
    g = rows.group_by([PRODUCT_A, PRODUCT_B], use_threads=False).aggregate([(UNIT, "count")])
    return pa.table({PRODUCT_A: g.column(PRODUCT_A), PRODUCT_B: g.column(PRODUCT_B),
                     PID_COUNT: g.column(f"{UNIT}_count")}, schema=_COUNTS_SCHEMA)


def session_pairs(unit: np.ndarray, session, product, max_pairs_per_user: int,
                  kind: str = "viewed", *, event_type=None,
                  max_products_per_session: int = DEFAULT_MAX_PRODUCTS_PER_SESSION,
                  max_sessions_per_user: int | None = DEFAULT_MAX_SESSIONS_PER_USER,
                  rng: np.random.Generator | None = None) -> pa.Table:
    """Per-pair distinct-user counts after global per-user bounding.

    Returns (product_a, product_b, ``__pid_count``) with product_a < product_b, one row per
    pair that some kept user contributed; raw (unnoised) counts for private selection and
    noise, mergeable across shards with :func:`merge_pair_counts`. Release with
    L0 = max_pairs_per_user, Linf = 1. See :func:`bounded_session_pairs` for the arguments.
    """
    bd = _bounded_pair_codes(unit, session, product, max_pairs_per_user, kind, event_type,
                             max_products_per_session, max_sessions_per_user, rng)
    if bd.part.size == 0:
        return _COUNTS_SCHEMA.empty_table()
    # Each (user, pair) is kept at most once, so rows per pair = distinct users per pair.
    counts = np.bincount(bd.part, minlength=bd.pair_keys.size)
    present = np.flatnonzero(counts)
    a, b = bd.ab(present)
    return pa.table({PRODUCT_A: bd.dictionary.take(pa.array(a, pa.int64())),
                     PRODUCT_B: bd.dictionary.take(pa.array(b, pa.int64())),
                     PID_COUNT: pa.array(counts[present].astype(np.int64))}, schema=_COUNTS_SCHEMA)


def merge_pair_counts(tables: Sequence[pa.Table]) -> pa.Table:
    """Sums partial per-pair counts from different shards (whose users are disjoint)."""
    tables = [t for t in tables if t.num_rows]
    if not tables:
        return _COUNTS_SCHEMA.empty_table()
    t = pa.concat_tables([t.select(_COUNTS_SCHEMA.names).cast(_COUNTS_SCHEMA) for t in tables])
    g = t.group_by([PRODUCT_A, PRODUCT_B], use_threads=False).aggregate([(PID_COUNT, "sum")])
    return pa.table({PRODUCT_A: g.column(PRODUCT_A), PRODUCT_B: g.column(PRODUCT_B),
                     PID_COUNT: g.column(f"{PID_COUNT}_sum")}, schema=_COUNTS_SCHEMA)


def _released_count_column(table: pa.Table, count_column: str | None) -> str:
    names = table.column_names
    internal = [c for c in names if c.startswith("__")]
    if internal:
        raise ValueError(
            f"top_k_neighbours takes a RELEASED pairs table; columns {internal} are internal "
            "(unnoised) values: release the pairs (selection + noise) first")
    for c in (PRODUCT_A, PRODUCT_B):
        if c not in names:
            raise ValueError(f"released pairs table lacks column {c!r} (has {names})")
    if count_column is None:
        candidates = [c for c in names if c not in (PRODUCT_A, PRODUCT_B)
                      and not c.endswith("_std") and f"{c}_std" in names]
        if len(candidates) != 1:
            raise ValueError(f"cannot tell the noisy count column among {names}; pass count_column")
        count_column = candidates[0]
    if count_column not in names:
        raise ValueError(f"count column {count_column!r} not in {names}")
    if f"{count_column}_std" not in names:
        raise ValueError(
            f"{count_column!r} has no {count_column + '_std'!r} column: top_k_neighbours takes a "
            "released table (every released metric carries its noise std)")
    return count_column


def top_k_neighbours(released_pairs: pa.Table, k: int, *,
                     count_column: str | None = None) -> pa.Table:
    """Top-k neighbours per product from a RELEASED pairs table (post-processing, no budget).

    ``released_pairs``: the released co-occurrence table (product_a, product_b, a noisy
    count column ``<c>`` and its ``<c>_std``); tables with internal ``__`` columns (raw
    counts) or without the ``_std`` column are refused. Each released pair (a, b) makes b a
    candidate neighbour of a and a of b; per product the k candidates with the largest
    noisy count are kept (ties: neighbour id ascending).

    Returns (product, neighbour, rank (1 = best), ``<c>``, ``<c>_std``), sorted by product
    then rank.
    """
    k = _check_int("k", k)
    c = _released_count_column(released_pairs, count_column)
    std = f"{c}_std"
    cols = [PRODUCT_A, PRODUCT_B, c, std]
    t = released_pairs.select(cols)
    a = t.column(PRODUCT_A).cast(pa.string())
    b = t.column(PRODUCT_B).cast(pa.string())
    edges = pa.table({
        PRODUCT: pa.chunked_array(a.chunks + b.chunks, pa.string()),
        NEIGHBOUR: pa.chunked_array(b.chunks + a.chunks, pa.string()),
        c: pa.chunked_array(t.column(c).chunks * 2, t.column(c).type),
        std: pa.chunked_array(t.column(std).chunks * 2, t.column(std).type),
    })
    out_schema = pa.schema([pa.field(PRODUCT, pa.string()), pa.field(NEIGHBOUR, pa.string()),
                            pa.field(RANK, pa.int32()), pa.field(c, t.column(c).type),
                            pa.field(std, t.column(std).type)])
    valid = pc.and_(pc.is_valid(edges.column(PRODUCT)), pc.is_valid(edges.column(NEIGHBOUR)))
    edges = edges.filter(valid)
    if edges.num_rows == 0:
        return out_schema.empty_table()
    edges = edges.sort_by([(PRODUCT, "ascending"), (c, "descending"), (NEIGHBOUR, "ascending")])
    prod_codes = pc.dictionary_encode(edges.column(PRODUCT).combine_chunks()).indices
    pcodes = prod_codes.to_numpy(zero_copy_only=False)
    _, rank = _rank_in_runs(_run_starts(pcodes))
    keep = rank < k
    edges = edges.filter(pa.array(keep))
    return pa.table({PRODUCT: edges.column(PRODUCT), NEIGHBOUR: edges.column(NEIGHBOUR),
                     RANK: pa.array((rank[keep] + 1).astype(np.int32)),
                     c: edges.column(c), std: edges.column(std)}, schema=out_schema)


def max_candidate_pairs(max_products_per_session: int = DEFAULT_MAX_PRODUCTS_PER_SESSION,
                        max_sessions_per_user: int = DEFAULT_MAX_SESSIONS_PER_USER) -> int:
    """Upper bound on the candidate pairs materialized for one user (memory planning)."""
    return math.comb(max_products_per_session, 2) * max_sessions_per_user
