"""Vectorized 64-bit hashing of Arrow string columns.

Used to route rows to shards (by privacy unit) and partials to buckets (by
partition key), and as the privacy-unit identity inside bounding. Two units
whose ids collide are bounded as one unit, which only removes contributions,
so a collision can cost utility but never privacy. The hash is deterministic
across processes and machines (no per-process salt), which Beam's shuffles need.
"""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from numpy.lib.stride_tricks import as_strided

_WORD_KEYS = None  # per-word multipliers, built lazily


def mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64 finalizer: a bijection on uint64 with good avalanche."""
    x = x.astype(np.uint64, copy=True)
    with np.errstate(over="ignore"):
        x ^= x >> np.uint64(30)
        x *= np.uint64(0xBF58476D1CE4E5B9)
        x ^= x >> np.uint64(27)
        x *= np.uint64(0x94D049BB133111EB)
        x ^= x >> np.uint64(31)
    return x


def hash_strings(arr: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """uint64 hash per element of a string array; nulls hash to 0, others never do.

    Reads each string as little-endian 8-byte words gathered straight from the
    Arrow data buffer (no per-byte temporaries), so cost is one gather per word
    of the longest string rather than per byte.
    """
    if isinstance(arr, pa.ChunkedArray):
        if arr.num_chunks == 0:
            return np.zeros(0, dtype=np.uint64)
        return np.concatenate([hash_strings(c) for c in arr.chunks])
    if not (pa.types.is_string(arr.type) or pa.types.is_large_string(arr.type)
            or pa.types.is_binary(arr.type) or pa.types.is_large_binary(arr.type)):
        arr = pc.cast(arr, pa.string())
    n = len(arr)
    if n == 0:
        return np.zeros(0, dtype=np.uint64)
    large = pa.types.is_large_string(arr.type) or pa.types.is_large_binary(arr.type)
    bufs = arr.buffers()
    offsets = np.frombuffer(bufs[1], dtype=np.int64 if large else np.int32)[arr.offset: arr.offset + n + 1]
    offsets = offsets.astype(np.int64)
    start, end = int(offsets[0]), int(offsets[-1])
    padded = np.zeros(end - start + 8, dtype=np.uint8)
    if bufs[2] is not None and end > start:
        padded[: end - start] = np.frombuffer(bufs[2], dtype=np.uint8)[start:end]
    # Row i of `words` is the 8 bytes starting at byte i (overlapping, zero-copy view).
    words = as_strided(padded, shape=(end - start + 1, 8), strides=(1, 1))
    rel = offsets[:-1] - start
    lengths = offsets[1:] - offsets[:-1]
    with np.errstate(over="ignore"):
        h = lengths.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15)
        max_len = int(lengths.max())
        rows = None
        for k in range(0, max_len, 8):
            if rows is None:
                rows_idx = slice(None)
                pos = rel + k
                remaining = lengths - k
            else:
                rows_idx = rows
                pos = rel[rows] + k
                remaining = lengths[rows] - k
            w = np.ascontiguousarray(words[pos]).view(np.uint64)[:, 0]
            short = remaining < 8
            if short.any():
                shift = (np.clip(remaining[short], 0, 8) * 8).astype(np.uint64)
                mask = np.where(shift >= 64, np.uint64(0xFFFFFFFFFFFFFFFF),
                                (np.uint64(1) << np.minimum(shift, np.uint64(63))) - np.uint64(1))
                mask[shift == 0] = 0
                w[short] &= mask
            h[rows_idx] = mix64(h[rows_idx] ^ w) + np.uint64(k + 1)
            nxt = np.flatnonzero(lengths > k + 8)
            if nxt.size == 0:
                break
            rows = nxt
        h = mix64(h) | np.uint64(1)  # never 0, which marks null
    if arr.null_count:
        h[~np.asarray(arr.is_valid())] = 0
    return h


def hash_columns(columns: list) -> np.ndarray:
    """Combined hash of several key columns (row-wise)."""
    h = np.zeros(len(columns[0]) if columns else 0, dtype=np.uint64)
    with np.errstate(over="ignore"):
        for col in columns:
            h = mix64(h * np.uint64(31) + hash_strings(col))
    return h
