"""Per-user local-DP feature vectors: one randomized row per shopper (pure numpy/pyarrow).

From ALL rows of each user (the Beam layer groups a user's rows on one shard first) this
computes three features and randomizes each user's row on its own, so every row is
``epsilon``-locally differentially private (LDP) for the user it describes:

* activity profile -- events per event type, each clipped to ``[0, activity_clip]``;
  Laplace noise with L1 sensitivity ``len(event_types) * activity_clip`` (the L1 diameter
  of the clipped box: any two users' vectors differ by at most that much);
* category affinity -- ``histogram`` mode: the fraction of the user's categorized events per
  category of the PUBLIC category list (a vector with L1 norm 1, or 0 for a user without
  categorized events, so any two differ by at most 2 in L1) plus Laplace noise with L1
  sensitivity 2; or ``top_krr`` mode: the user's most frequent category (ties: first in the
  list; ``none`` if no categorized event) through k-ary randomized response over the list
  plus ``none``;
* price band -- the band of the user's mean viewed price among PUBLIC band edges
  (``none`` if the user viewed nothing priced) through k-ary randomized response.

Categories not in the public list are ignored. Band edges must be public (from the spec or
from an earlier DP release): quantile edges computed from this day's raw data would leak.

Budget: the per-user local epsilon is split across the three features by the config's
weights (basic composition: the row is ``epsilon``-LDP). Noise: Laplace scales come from
``noise.calibrate_laplace`` (pipeline-dp) and noise from ``noise.SecureNoiseSampler``
(CSPRNG, snapped to a power-of-two grid); randomized response draws its coins with
``noise.uniform_01`` (CSPRNG). ``numpy.random`` is never used for released values.
Randomized response: keep the true value with probability ``p = e^eps / (e^eps + k - 1)``,
otherwise report one of the other ``k - 1`` values uniformly. The coins are 53-bit
uniforms, so probabilities are exact up to ~k * 2**-53 (a negligible additive slack).

Rows are emitted in a uniformly random order (CSPRNG), so the row order says nothing about
user ids and cannot be joined by position with another table.

Row key (``row_key``):

* ``"none"`` (default): no key column at all.
* ``"pseudonym"``: ``HMAC-SHA256(key, user_id)`` truncated to 128 bits (32 hex chars); the
  key is supplied at run time (e.g. :func:`pseudonym_key_from_env`), is never written to the
  output, and must be at least 16 bytes.

  What the pseudonym protects: without the key nobody can compute it from a raw user id,
  so the released rows cannot be joined to raw ids, to other systems' ids, or to another
  release keyed with a different key; a dictionary attack over user ids is infeasible
  without the key. What it does NOT protect: it is a stable identifier -- rows released with
  the same key on different days link to the same shopper (their noise then composes: a
  shopper seen on n days has spent n * epsilon; rotate the key per release to prevent
  linking); anyone holding the key can re-identify every row by hashing known user ids;
  and it does not hide that a row exists, i.e. that some shopper was active that day.

What local DP protects and what it does not: each row's VALUES are epsilon-LDP (whatever
the user did, every released row value is almost as likely under any other behaviour). The
NUMBER of rows (active users of the day) and, with a pseudonym, WHICH pseudonyms were active
are not randomized: the table is LDP under replacement of a user's data, not
(add/remove)-DP like the aggregate outputs. The ledger should charge ``epsilon`` per user
per release.
"""
from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import math
import os
from collections.abc import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from schemas.events import EVENT_TYPES
from transforms.noise import (
    NoiseParams,
    SecureNoiseSampler,
    calibrate_laplace,
    uniform_01,
)

__all__ = [
    "MIN_KEY_BYTES",
    "PSEUDONYM_KEY_ENV",
    "LocalDPConfig",
    "krr_keep_probability",
    "laplace_params",
    "local_dp_features",
    "pseudonym_key_from_env",
    "pseudonymize",
    "randomized_response",
]

#: Environment variable read by :func:`pseudonym_key_from_env` (hex-encoded key).
PSEUDONYM_KEY_ENV = "CLICKDP_PSEUDONYM_KEY"
MIN_KEY_BYTES = 16
PSEUDONYM_BYTES = 16  # truncated HMAC-SHA256: 128 bits, 32 hex characters

PSEUDONYM = "pseudonym"
NONE_LABEL = "none"
DEFAULT_PRICE_BAND_EDGES = (10.0, 25.0, 50.0, 100.0, 250.0, 500.0)
METADATA_KEY = b"clickdp.local_dp"


@dataclasses.dataclass(frozen=True)
class LocalDPConfig:
    """Parameters of the per-user local-DP feature vectors (all public).

    epsilon: per-user local epsilon of the whole row, split across the three features in
        proportion to the weights (a zero weight drops that feature).
    categories: the PUBLIC category list (order = column order).
    """

    epsilon: float
    categories: tuple
    activity_weight: float = 1.0
    category_weight: float = 1.0
    price_weight: float = 1.0
    activity_clip: int = 20
    event_types: tuple = EVENT_TYPES
    category_mode: str = "histogram"  # or "top_krr"
    price_band_edges: tuple = DEFAULT_PRICE_BAND_EDGES
    price_event_types: tuple = ("product_view",)

    def __post_init__(self):
        eps = float(self.epsilon)
        if not (eps > 0 and math.isfinite(eps)):
            raise ValueError(f"epsilon must be finite and > 0, got {self.epsilon!r}")
        object.__setattr__(self, "epsilon", eps)
        for name in ("categories", "event_types", "price_band_edges", "price_event_types"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        if not self.categories or len(set(self.categories)) != len(self.categories):
            raise ValueError("categories must be a non-empty list of distinct public categories")
        if NONE_LABEL in self.categories:
            raise ValueError(f"{NONE_LABEL!r} is reserved and cannot be a category")
        if not self.event_types or len(set(self.event_types)) != len(self.event_types):
            raise ValueError("event_types must be a non-empty list of distinct event types")
        weights = (self.activity_weight, self.category_weight, self.price_weight)
        if any(not (float(w) >= 0 and math.isfinite(float(w))) for w in weights) or sum(weights) <= 0:
            raise ValueError(f"feature weights must be finite, >= 0 and not all 0, got {weights}")
        clip = int(self.activity_clip)
        if clip != self.activity_clip or clip < 1:
            raise ValueError(f"activity_clip must be an integer >= 1, got {self.activity_clip!r}")
        if self.category_mode not in ("histogram", "top_krr"):
            raise ValueError(f"category_mode must be 'histogram' or 'top_krr', got {self.category_mode!r}")
        edges = [float(e) for e in self.price_band_edges]
        if not edges or any(not math.isfinite(e) for e in edges) or edges != sorted(set(edges)):
            raise ValueError(f"price_band_edges must be finite and strictly increasing, got {edges}")
        object.__setattr__(self, "price_band_edges", tuple(edges))

    def epsilon_split(self) -> dict:
        """Per-feature local epsilon; the values sum to ``epsilon``."""
        w = {"activity": float(self.activity_weight), "category": float(self.category_weight),
             "price_band": float(self.price_weight)}
        total = sum(w.values())
        split = {k: self.epsilon * v / total for k, v in w.items() if v > 0}
        # make the sum exact (never above epsilon) despite rounding
        excess = sum(split.values()) - self.epsilon
        if excess > 0:
            last = list(split)[-1]
            split[last] -= excess
        return split

    def price_band_labels(self) -> tuple:
        e = self.price_band_edges
        fmt = lambda x: f"{x:g}"
        labels = [f"<{fmt(e[0])}"] + [f"{fmt(a)}-{fmt(b)}" for a, b in itertools.pairwise(e)]
        return tuple(labels + [f">={fmt(e[-1])}", NONE_LABEL])


# ---------------------------------------------------------------------------------------
# Mechanisms
# ---------------------------------------------------------------------------------------


def krr_keep_probability(k: int, epsilon: float) -> float:
    """P(report the true value) of k-ary randomized response: e^eps / (e^eps + k - 1)."""
    k = int(k)
    if k < 2:
        raise ValueError(f"k must be >= 2, got {k}")
    epsilon = float(epsilon)
    if not (epsilon > 0 and math.isfinite(epsilon)):
        raise ValueError(f"epsilon must be finite and > 0, got {epsilon!r}")
    return 1.0 / (1.0 + (k - 1) * math.exp(-epsilon))


def randomized_response(values: np.ndarray, k: int, epsilon: float) -> np.ndarray:
    """k-ary randomized response on integer values in ``0..k-1`` (CSPRNG coins).

    Each value is kept with probability ``e^eps / (e^eps + k - 1)``, otherwise replaced by
    one of the other ``k - 1`` values chosen uniformly: every output has probability ratio
    at most ``e^eps`` between any two inputs.
    """
    v = np.asarray(values)
    if v.dtype.kind not in "iu":
        raise TypeError(f"values must be integer codes, got dtype {v.dtype}")
    v = v.astype(np.int64)
    if v.size and (v.min() < 0 or v.max() >= k):
        raise ValueError(f"values must be in 0..{k - 1}")
    p = krr_keep_probability(k, epsilon)
    n = v.size
    u = uniform_01(2 * n)
    keep = u[:n] < p
    other = np.minimum(np.floor(u[n:] * (k - 1)).astype(np.int64), k - 2)
    other += other >= v  # skip the true value: uniform over the k - 1 others
    return np.where(keep, v, other)


def laplace_params(epsilon: float, l1_sensitivity: float) -> NoiseParams:
    """Laplace mechanism parameters from pipeline-dp calibration (b = l1 / eps)."""
    return calibrate_laplace(epsilon, l1_sensitivity)


# ---------------------------------------------------------------------------------------
# Pseudonyms
# ---------------------------------------------------------------------------------------


def _check_key(key) -> bytes:
    if key is None:
        raise ValueError(
            f"row_key='pseudonym' needs a secret key supplied at run time (e.g. hex in "
            f"${PSEUDONYM_KEY_ENV}); none was given. Use row_key='none' to release without a key.")
    if isinstance(key, str):
        raise TypeError("the pseudonym key must be bytes (decode hex/base64 before passing it)")
    key = bytes(key)
    if len(key) < MIN_KEY_BYTES:
        raise ValueError(f"the pseudonym key must be at least {MIN_KEY_BYTES} bytes, got {len(key)}")
    return key


_HEX = np.frombuffer(b"0123456789abcdef", dtype=np.uint8)


def _hmac_sha256_many(key: bytes, messages: Sequence[bytes]) -> bytes:
    """Concatenated HMAC-SHA256 digests (RFC 2104), one per message.

    The inner and outer SHA-256 states after absorbing the padded key are computed once and
    copied per message (twice as fast as ``hmac.digest`` per row); tested against ``hmac``.
    """
    if len(key) > 64:  # SHA-256 block size
        key = hashlib.sha256(key).digest()
    key = key.ljust(64, b"\0")
    inner = hashlib.sha256(bytes(b ^ 0x36 for b in key))
    outer = hashlib.sha256(bytes(b ^ 0x5C for b in key))
    icopy, ocopy = inner.copy, outer.copy

    def one(m: bytes) -> bytes:
        h = icopy()
        h.update(m)
        o = ocopy()
        o.update(h.digest())
        return o.digest()

    return b"".join(map(one, messages))


def pseudonymize(user_ids, key: bytes) -> pa.Array:
    """HMAC-SHA256(key, utf-8 user id) truncated to 128 bits, as 32 hex chars per row.

    Null ids give null. About 1-2 us per id (one pair of SHA-256 state copies per id; the
    hex encoding is vectorized).
    """
    key = _check_key(key)
    if isinstance(user_ids, pa.ChunkedArray):
        user_ids = user_ids.combine_chunks() if user_ids.num_chunks else pa.array([], pa.string())
    if not isinstance(user_ids, pa.Array):
        user_ids = pa.array(list(user_ids), pa.string())
    if pa.types.is_dictionary(user_ids.type):
        user_ids = user_ids.dictionary_decode()
    if not (pa.types.is_binary(user_ids.type) or pa.types.is_large_binary(user_ids.type)):
        user_ids = user_ids.cast(pa.string()).cast(pa.binary())
    n = len(user_ids)
    valid = np.asarray(user_ids.is_valid(), dtype=bool)
    msgs = pc.fill_null(user_ids, b"").to_pylist()
    digests = np.frombuffer(_hmac_sha256_many(key, msgs), dtype=np.uint8).reshape(n, 32)
    head = digests[:, :PSEUDONYM_BYTES]
    text = np.empty((n, 2 * PSEUDONYM_BYTES), dtype=np.uint8)
    text[:, 0::2] = _HEX[head >> 4]
    text[:, 1::2] = _HEX[head & 15]
    offsets = np.arange(n + 1, dtype=np.int32) * np.int32(2 * PSEUDONYM_BYTES)
    out = pa.Array.from_buffers(pa.string(), n, [None, pa.py_buffer(offsets.tobytes()),
                                                  pa.py_buffer(text.tobytes())])
    if not valid.all():
        out = pc.if_else(pa.array(valid), out, pa.nulls(n, pa.string()))
    return out


def pseudonym_key_from_env(var: str = PSEUDONYM_KEY_ENV) -> bytes:
    """The pseudonym key from environment variable ``var`` (hex); clear error when missing."""
    raw = os.environ.get(var)
    if raw is None or not raw.strip():
        raise ValueError(f"pseudonym key missing: set ${var} to a hex-encoded secret of at least "
                         f"{MIN_KEY_BYTES} bytes (it is never written to the output)")
    try:
        key = bytes.fromhex(raw.strip())
    except ValueError:
        raise ValueError(f"${var} must be hex-encoded") from None
    return _check_key(key)


# ---------------------------------------------------------------------------------------
# Features
# ---------------------------------------------------------------------------------------


def _plain(arr) -> pa.Array:
    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks() if arr.num_chunks else pa.array([], arr.type)
    if pa.types.is_dictionary(arr.type):
        arr = arr.dictionary_decode()
    return arr


def _index_in(arr: pa.Array, values: Sequence[str]) -> np.ndarray:
    """Index of each row's value in ``values`` (-1 if absent or null)."""
    idx = pc.index_in(arr.cast(pa.string()), value_set=pa.array(list(values), pa.string()))
    return pc.fill_null(idx, -1).to_numpy(zero_copy_only=False).astype(np.int64)


def _column_names(prefix: str, values: Sequence[str]) -> list:
    return [f"{prefix}{v}" for v in values]


def _features(user: np.ndarray, n_users: int, etype: np.ndarray, cat: np.ndarray,
              price: np.ndarray, price_ok: np.ndarray, cfg: LocalDPConfig):
    """Exact (un-noised) per-user features: activity, category fractions/top, price band."""
    t, kc = len(cfg.event_types), len(cfg.categories)
    ok = etype >= 0
    act = np.bincount(user[ok] * t + etype[ok], minlength=n_users * t).reshape(n_users, t)
    act = np.minimum(act, cfg.activity_clip).astype(np.float64)
    okc = cat >= 0
    hist = np.bincount(user[okc] * kc + cat[okc], minlength=n_users * kc).reshape(n_users, kc)
    total = hist.sum(axis=1)
    frac = hist / np.maximum(total, 1)[:, None]
    top = np.where(total > 0, np.argmax(hist, axis=1), kc)  # kc = "none"
    psum = np.bincount(user[price_ok], weights=price[price_ok], minlength=n_users)
    pcnt = np.bincount(user[price_ok], minlength=n_users)
    mean = psum / np.maximum(pcnt, 1)
    band = np.searchsorted(np.asarray(cfg.price_band_edges), mean, side="right")
    band = np.where(pcnt > 0, band, len(cfg.price_band_edges) + 1)  # last label = "none"
    return act, frac, top, band


def local_dp_features(events: pa.Table, config: LocalDPConfig, *, row_key: str = "none",
                      pseudonym_key: bytes | None = None,
                      sampler=None) -> pa.Table:
    """One epsilon-LDP row per user of ``events`` (ALL rows of each user must be present).

    events: validated events with ``user_id``, ``event_type``, ``category``, ``price``.
    row_key: ``"none"`` (no key column) or ``"pseudonym"`` (needs ``pseudonym_key``).
    sampler: Laplace sampler (default ``SecureNoiseSampler``); tests may pass another.

    Columns: [``pseudonym``], ``act_<event_type>`` (noisy clipped counts), then
    ``cat_<category>`` (noisy fractions, histogram mode) or ``top_category`` (k-RR), then
    ``price_band`` (k-RR label). Rows in CSPRNG-random order. The schema metadata
    ``clickdp.local_dp`` records epsilon, its split, sensitivities, noise std and k-RR keep
    probabilities (never the key). Raw user ids never appear in the output.
    """
    if row_key not in ("none", "pseudonym"):
        raise ValueError(f"row_key must be 'none' or 'pseudonym', got {row_key!r}")
    if row_key == "pseudonym":
        pseudonym_key = _check_key(pseudonym_key)
    cfg = config
    split = cfg.epsilon_split()
    sampler = sampler if sampler is not None else SecureNoiseSampler()
    for col in ("user_id", "event_type", "category", "price"):
        if col not in events.column_names:
            raise ValueError(f"events lack column {col!r}")
    uid = _plain(events.column("user_id")).cast(pa.string())
    valid_user = np.asarray(uid.is_valid(), dtype=bool)
    if not valid_user.all():
        events = events.filter(pa.array(valid_user))
        uid = uid.filter(pa.array(valid_user))
    enc = pc.dictionary_encode(uid)
    user = enc.indices.to_numpy(zero_copy_only=False).astype(np.int64)
    n_users = len(enc.dictionary)
    etype = _index_in(_plain(events.column("event_type")), cfg.event_types)
    cat = _index_in(_plain(events.column("category")), cfg.categories)
    price_col = _plain(events.column("price")).cast(pa.float64())
    price = pc.fill_null(price_col, 0.0).to_numpy(zero_copy_only=False)
    price_ok = (np.asarray(price_col.is_valid(), dtype=bool) & np.isfinite(price) & (price >= 0)
                & (_index_in(_plain(events.column("event_type")), cfg.price_event_types) >= 0))
    # Random output order (CSPRNG): row position reveals nothing about the user id. Users
    # are renumbered by their output position before aggregation, so features come out in
    # output order without extra copies.
    perm = np.argsort(uniform_01(n_users), kind="stable") if n_users else np.zeros(0, np.int64)
    position = np.empty(n_users, dtype=np.int64)
    position[perm] = np.arange(n_users, dtype=np.int64)
    act, frac, top, band = _features(position[user], n_users, etype, cat, price, price_ok, cfg)
    del user
    cols, meta = {}, {"epsilon": cfg.epsilon, "epsilon_split": split, "row_key": row_key,
                      "features": {}}
    if row_key == "pseudonym":
        cols[PSEUDONYM] = pseudonymize(enc.dictionary.take(pa.array(perm, pa.int64())), pseudonym_key)
        meta["pseudonym"] = f"HMAC-SHA256(run-time key, user_id) truncated to {8 * PSEUDONYM_BYTES} bits"
    if "activity" in split:
        l1 = float(len(cfg.event_types) * cfg.activity_clip)
        params = laplace_params(split["activity"], l1)
        noisy = sampler.add_noise(act, params) if n_users else act
        for j, name in enumerate(_column_names("act_", cfg.event_types)):
            cols[name] = pa.array(noisy[:, j], pa.float64())
        meta["features"]["activity"] = {
            "mechanism": "laplace", "epsilon": split["activity"], "clip": [0, cfg.activity_clip],
            "l1_sensitivity": l1, "scale": params.scale, "noise_std": params.std,
            "columns": _column_names("act_", cfg.event_types)}
    if "category" in split:
        if cfg.category_mode == "histogram":
            params = laplace_params(split["category"], 2.0)
            noisy = sampler.add_noise(frac, params) if n_users else frac
            for j, name in enumerate(_column_names("cat_", cfg.categories)):
                cols[name] = pa.array(noisy[:, j], pa.float64())
            meta["features"]["category"] = {
                "mechanism": "laplace", "epsilon": split["category"], "value": "fraction of events",
                "l1_sensitivity": 2.0, "scale": params.scale, "noise_std": params.std,
                "columns": _column_names("cat_", cfg.categories)}
        else:
            labels = pa.array(list(cfg.categories) + [NONE_LABEL], pa.string())
            k = len(labels)
            rr = randomized_response(top, k, split["category"])
            cols["top_category"] = labels.take(pa.array(rr))
            meta["features"]["category"] = {
                "mechanism": "k_randomized_response", "epsilon": split["category"], "k": k,
                "keep_probability": krr_keep_probability(k, split["category"]),
                "columns": ["top_category"]}
    if "price_band" in split:
        labels = pa.array(list(cfg.price_band_labels()), pa.string())
        k = len(labels)
        rr = randomized_response(band, k, split["price_band"])
        cols["price_band"] = labels.take(pa.array(rr))
        meta["features"]["price_band"] = {
            "mechanism": "k_randomized_response", "epsilon": split["price_band"], "k": k,
            "edges": list(cfg.price_band_edges), "keep_probability":
            krr_keep_probability(k, split["price_band"]), "columns": ["price_band"]}
    table = pa.table(cols) if cols else pa.table({})
    return table.replace_schema_metadata({METADATA_KEY: json.dumps(meta, sort_keys=True).encode()})
