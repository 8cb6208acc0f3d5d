"""Vectorized validation of raw clickstream batches.

``validate_batch`` splits one batch (canonical column names, any physical
types -- see ``transforms.readers``) into

* ``valid``: rows passing every rule, cast to ``VALID_EVENT_SCHEMA`` exactly;
* ``dead``: the other rows in ``DEAD_LETTER_SCHEMA`` -- their *original* values
  rendered as strings, the first failing reason (rules are checked in the
  order of ``schemas.events``), the source file and the row number.

Everything is computed with pyarrow.compute and numpy over whole columns; no
Python loop runs per row (except when rendering exotic types such as nested
values into dead letters).

Accepted inputs, per column:

* string columns (``user_id``, ``event_type`` ...): any type; non-strings are
  cast to string (ints ``42`` -> ``"42"``; floats ``1.5`` -> ``"1.5"``,
  ``123.0`` -> ``"123"`` so that float-typed ids match int-typed ones, NaN ->
  null; timestamps ISO-8601; booleans ``"true"``/``"false"``). Values are
  otherwise kept verbatim (no trimming, no case folding).
* dead letters render non-string raw values the same way, except that
  floats of ``event_time``/``price``/``quantity`` are Python-like
  (``12.0``, ``nan``, ``inf``).
* ``event_time``: a timestamp of any unit (naive = UTC, tz-aware converted to
  UTC; sub-microsecond digits are truncated), or an ISO-8601 string
  ``YYYY-MM-DD[T| ]HH:MM[:SS[.fraction]][Z|+HH|+HHMM|+HH:MM]`` (surrounding
  whitespace ignored, no zone = UTC, up to 9 fraction digits, truncated to
  microseconds). Dates, integers, floats and anything else are
  ``bad_event_time``.
* ``price``/``quantity``: numbers (int, float, decimal) or strings holding a
  plain decimal number (``12.5``, ``-3``, ``1e3``, ``+.5``; surrounding
  whitespace ignored; an empty or blank string counts as null, like an empty
  CSV field). Quantities must be integral (``2``, ``2.0`` and ``"2.0"`` are
  fine, ``1.5`` is not). Booleans and other types are bad.

Decision: ``event_id`` is non-nullable in ``VALID_EVENT_SCHEMA`` but no reason
rejects a null ``event_id``; such rows stay valid and get the deterministic
synthetic id ``"missing:<source_file>:<row_number>"`` (the dead-letter copy,
if any, keeps the original null).
"""
from __future__ import annotations

import dataclasses
import datetime
import json

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from schemas.events import (
    DEAD_LETTER_REASONS,
    DEAD_LETTER_SCHEMA,
    EVENT_TYPES,
    MAX_QUANTITY,
    PRODUCT_EVENT_TYPES,
    RAW_COLUMNS,
    RAW_EVENT_SCHEMA,
    REASON_BAD_EVENT_TIME,
    REASON_BAD_PRICE,
    REASON_BAD_QUANTITY,
    REASON_MISSING_PRODUCT_ID,
    REASON_MISSING_USER_ID,
    REASON_OUT_OF_DAY,
    REASON_UNKNOWN_EVENT_TYPE,
    VALID_EVENT_SCHEMA,
)

SYNTHETIC_EVENT_ID_PREFIX = "missing:"

_STRING_COLUMNS = tuple(f.name for f in RAW_EVENT_SCHEMA if pa.types.is_string(f.type))
_EVENT_TYPES = pa.array(EVENT_TYPES, pa.string())
_PRODUCT_EVENT_TYPES = pa.array(PRODUCT_EVENT_TYPES, pa.string())
_REASON_CODE = {reason: code for code, reason in enumerate(DEAD_LETTER_REASONS)}
_REASON_DICTIONARY = pa.array(DEAD_LETTER_REASONS, pa.string())
_DECIMAL_RE = r"^\s*[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?\s*$"
_US_PER_DAY = 86_400_000_000
_UNIT_PER_SECOND = {"s": 1, "ms": 1_000, "us": 1_000_000, "ns": 1_000_000_000}


@dataclasses.dataclass(frozen=True)
class ValidationResult:
    valid: pa.RecordBatch  # VALID_EVENT_SCHEMA
    dead: pa.RecordBatch  # DEAD_LETTER_SCHEMA


# --------------------------------------------------------------------------
# small helpers
# --------------------------------------------------------------------------
def _flat(array, keep_dictionary: bool = False) -> pa.Array:
    """Plain (non-chunked, non-extension) array; dictionaries decoded unless kept."""
    if isinstance(array, pa.ChunkedArray):
        array = array.combine_chunks() if array.num_chunks != 1 else array.chunk(0)
    if isinstance(array, pa.ExtensionArray):
        array = array.storage
    if pa.types.is_dictionary(array.type) and not (
            keep_dictionary and pa.types.is_string(array.type.value_type)):
        array = array.dictionary_decode()
    return array


def _per_value(array: pa.Array, fn) -> np.ndarray:
    """fn(strings) -> numpy bool, evaluated once per dictionary entry for dictionary arrays."""
    if pa.types.is_dictionary(array.type):
        per_entry = fn(array.dictionary)
        idx = array.indices
        out = per_entry[pc.fill_null(idx, 0).to_numpy(zero_copy_only=False)] if len(per_entry) else \
            np.zeros(len(array), dtype=bool)
        return out, ~_np_valid(idx)
    return fn(array), ~_np_valid(array)


def _np_bool(array) -> np.ndarray:
    """Boolean Arrow array -> numpy bool, null counting as False."""
    if array.null_count:
        array = pc.fill_null(array, False)
    return array.to_numpy(zero_copy_only=False)


def _np_valid(array: pa.Array) -> np.ndarray:
    if array.null_count == 0:
        return np.ones(len(array), dtype=bool)
    return _np_bool(array.is_valid())


def _repeat_string(value: str, n: int) -> pa.Array:
    return pa.DictionaryArray.from_arrays(
        pa.array(np.zeros(n, dtype=np.int8)), pa.array([value], pa.string())
    ).dictionary_decode()


def _days_from_civil(y: np.ndarray, m: np.ndarray, d: np.ndarray) -> np.ndarray:
    """Days since 1970-01-01 of a proleptic Gregorian date (vectorized)."""
    months = ((y - 1970) * 12 + (m - 1)).astype("datetime64[M]")
    return months.astype("datetime64[D]").astype(np.int64) + d - 1


def _civil_from_days(days: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    d = days.astype("datetime64[D]")
    months = d.astype("datetime64[M]")
    year = months.astype("datetime64[Y]").astype(np.int64) + 1970
    month = months.astype(np.int64) % 12 + 1
    day = (d - months.astype("datetime64[D]")).astype(np.int64) + 1
    return year, month, day


_DAYS_IN_MONTH = np.array([31, 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31], dtype=np.int64)


# --------------------------------------------------------------------------
# rendering values as strings
# --------------------------------------------------------------------------
def _python_str(value) -> str | None:
    if value is None:
        return None
    if isinstance(value, str):
        return value
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (dict, list, tuple)):
        return json.dumps(value, default=str, ensure_ascii=False, separators=(",", ":"))
    return str(value)


def _python_render(array: pa.Array) -> pa.Array:
    return pa.array([_python_str(v) for v in array.to_pylist()], pa.string())


def _fixed_width_strings(chars: np.ndarray, valid: np.ndarray) -> pa.Array:
    """String array from an (n, width) uint8 matrix of ASCII characters."""
    n, width = chars.shape
    offsets = np.arange(0, (n + 1) * width, width, dtype=np.int32)
    validity = None if valid.all() else pa.py_buffer(np.packbits(valid, bitorder="little"))
    return pa.Array.from_buffers(
        pa.string(), n, [validity, pa.py_buffer(offsets), pa.py_buffer(np.ascontiguousarray(chars).tobytes())],
        null_count=int(n - valid.sum()),
    )


def _digits(chars: np.ndarray, col: int, value: np.ndarray, width: int) -> None:
    for k in range(width - 1, -1, -1):
        chars[:, col + k] = value % 10 + _ZERO
        value = value // 10


def _render_timestamps(array: pa.Array) -> pa.Array:
    """ISO-8601 ``YYYY-MM-DDTHH:MM:SS[.fff|.ffffff|.fffffffff]`` in UTC, with a
    trailing ``Z`` for tz-aware input (naive input is rendered as stored)."""
    unit, tz = array.type.unit, array.type.tz
    n = len(array)
    valid = _np_valid(array)
    raw = pc.fill_null(array.cast(pa.int64()), 0).to_numpy(zero_copy_only=False)
    per_s = _UNIT_PER_SECOND[unit]
    seconds, fraction = np.divmod(raw, per_s)
    days, secs = np.divmod(seconds, 86_400)
    if len(days) and (days[valid].min(initial=0) < -719_528 or days[valid].max(initial=0) > 2_932_896):
        return _python_render(array)  # outside years 0000-9999
    year, month, day = _civil_from_days(days)
    frac_digits = {"s": 0, "ms": 3, "us": 6, "ns": 9}[unit]
    width = 19 + (frac_digits + 1 if frac_digits else 0) + (1 if tz is not None else 0)
    chars = np.empty((n, width), dtype=np.uint8)
    _digits(chars, 0, year, 4)
    chars[:, 4] = chars[:, 7] = ord("-")
    _digits(chars, 5, month, 2)
    _digits(chars, 8, day, 2)
    chars[:, 10] = ord("T")
    _digits(chars, 11, secs // 3600, 2)
    chars[:, 13] = chars[:, 16] = ord(":")
    _digits(chars, 14, secs // 60 % 60, 2)
    _digits(chars, 17, secs % 60, 2)
    if frac_digits:
        chars[:, 19] = ord(".")
        _digits(chars, 20, fraction, frac_digits)
    if tz is not None:
        chars[:, -1] = ord("Z")
    return _fixed_width_strings(chars, valid)


def _render_floats(array: pa.Array) -> pa.Array:
    """Python-like: integral values get a trailing ``.0``."""
    out = pc.cast(array, pa.string())
    values = pc.fill_null(pc.cast(array, pa.float64()), 0.5).to_numpy(zero_copy_only=False)
    with np.errstate(invalid="ignore"):
        integral = np.isfinite(values) & (np.floor(values) == values)
    if not integral.any():
        return out
    integral &= ~_np_bool(pc.match_substring(out, "e"))
    return pc.if_else(pa.array(integral), pc.binary_join_element_wise(out, pa.scalar(".0"), ""), out)


def to_string_array(array) -> pa.Array:
    """Render any Arrow array as strings (null stays null): strings as is,
    timestamps ISO-8601 (tz-aware in UTC with ``Z``), floats Python-like,
    booleans ``true``/``false``, nested values as JSON."""
    array = _flat(array)
    t = array.type
    if pa.types.is_string(t):
        return array
    if pa.types.is_null(t):
        return pa.nulls(len(array), pa.string())
    if pa.types.is_timestamp(t):
        return _render_timestamps(array)
    if pa.types.is_floating(t):
        return _render_floats(array)
    if pa.types.is_nested(t):
        return _python_render(array)
    try:
        return pc.cast(array, pa.string())
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError):
        return _python_render(array)


def _id_string_array(array, keep_dictionary: bool = False) -> pa.Array:
    """Like ``to_string_array``, but integral floats lose their ``.0``: an id
    column that became float64 somewhere upstream (pandas and NaN) must give
    ``"123"`` for 123.0, the same string as an int64 column -- otherwise one
    shopper would turn into two privacy units. NaN counts as null.
    With keep_dictionary, a dictionary<string> column is returned as is."""
    array = _flat(array, keep_dictionary)
    if pa.types.is_dictionary(array.type):
        return array
    if pa.types.is_floating(array.type):
        # NaN is how pandas spells a missing value: treat it as null
        array = pc.if_else(pc.is_nan(array), pa.scalar(None, array.type), array)
        return pc.cast(array, pa.string())
    return to_string_array(array)


# --------------------------------------------------------------------------
# parsing
# --------------------------------------------------------------------------
def _blank(strings: pa.Array) -> np.ndarray:
    """Null, empty or whitespace-only."""
    def empty_or_space(values):
        return _np_bool(pc.equal(pc.binary_length(values), 0)) | _np_bool(pc.utf8_is_space(values))
    blank, null = _per_value(strings, empty_or_space)
    return blank | null


def _is_in(strings: pa.Array, value_set: pa.Array) -> np.ndarray:
    hit, null = _per_value(strings, lambda v: _np_bool(pc.is_in(v, value_set=value_set)))
    return hit & ~null


_ZERO, _NINE = ord("0"), ord("9")
_ISO_WIDTH = 35  # "YYYY-MM-DDTHH:MM" (16) + ":SS" (3) + ".fffffffff" (10) + "+HH:MM" (6)
_ISO_CHUNK = 1 << 17


def _parse_iso_chunk(rows: np.ndarray, lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``rows``: (m, _ISO_WIDTH) bytes of each (trimmed) string, garbage past
    its length; ``lengths``: byte lengths. Returns (micros, ok)."""
    m = len(lengths)
    cols = np.ascontiguousarray(rows.T)  # column k = k-th byte of every string
    digit = cols - np.uint8(_ZERO)  # wraps around for bytes below '0'
    isdigit = digit < 10
    digit = digit.astype(np.int32)

    def number(*ks):
        value = digit[ks[0]]
        for k in ks[1:]:
            value = value * 10 + digit[k]
        return value

    ok = (lengths >= 16) & (lengths <= _ISO_WIDTH)
    for k in (0, 1, 2, 3, 5, 6, 8, 9, 11, 12, 14, 15):
        ok &= isdigit[k]
    ok &= (cols[4] == ord("-")) & (cols[7] == ord("-")) & (cols[13] == ord(":"))
    ok &= (cols[10] == ord("T")) | (cols[10] == ord("t")) | (cols[10] == ord(" "))
    year, month, day = number(0, 1, 2, 3), number(5, 6), number(8, 9)
    hour, minute = number(11, 12), number(14, 15)

    has_sec = (lengths >= 19) & (cols[16] == ord(":")) & isdigit[17] & isdigit[18]
    second = np.where(has_sec, number(17, 18), 0)
    pos = np.where(has_sec, 19, 16)
    dot = has_sec & (lengths >= 20) & (cols[19] == ord("."))
    frac_ns = np.zeros(m, dtype=np.int64)
    if dot.any():
        run = dot.copy()
        ndigits = np.zeros(m, dtype=np.int64)
        for j in range(9):
            run &= isdigit[20 + j] & (lengths > 20 + j)
            if not run.any():
                break
            ndigits += run
            frac_ns += np.where(run, digit[20 + j] * 10 ** (8 - j), 0)
        ok &= ~dot | (ndigits > 0)
        pos = np.where(dot, 20 + ndigits, pos)

    # zone designator: what follows must be "", "Z", "+HH", "+HHMM" or "+HH:MM"
    rest = lengths - pos
    offset_s = np.zeros(m, dtype=np.int64)
    has_zone = rest > 0
    if has_zone.any():
        index = np.arange(m)
        tail = [rows[index, np.minimum(pos + j, _ISO_WIDTH - 1)] for j in range(6)]
        tail_digit = [(t - np.uint8(_ZERO)) for t in tail]
        tail_isdigit = [t < 10 for t in tail_digit]
        z0 = tail[0]
        zone_z = (rest == 1) & ((z0 == ord("Z")) | (z0 == ord("z")))
        hh_ok = (rest >= 3) & ((z0 == ord("+")) | (z0 == ord("-"))) & tail_isdigit[1] & tail_isdigit[2]
        zone_h = hh_ok & (rest == 3)
        zone_hm = hh_ok & (rest == 5) & tail_isdigit[3] & tail_isdigit[4]
        zone_hcm = hh_ok & (rest == 6) & (tail[3] == ord(":")) & tail_isdigit[4] & tail_isdigit[5]
        ok &= ~has_zone | zone_z | zone_h | zone_hm | zone_hcm
        v = [t.astype(np.int64) for t in tail_digit]
        off_h = np.where(hh_ok, v[1] * 10 + v[2], 0)
        off_m = np.where(zone_hm, v[3] * 10 + v[4], np.where(zone_hcm, v[4] * 10 + v[5], 0))
        ok &= (off_h <= 23) & (off_m <= 59)
        has_offset = zone_h | zone_hm | zone_hcm
        offset_s = np.where(has_offset, np.where(z0 == ord("-"), -1, 1) * (off_h * 3600 + off_m * 60), 0)

    leap = ((year % 4 == 0) & (year % 100 != 0)) | (year % 400 == 0)
    month_ok = (month >= 1) & (month <= 12)
    dim = _DAYS_IN_MONTH[np.clip(month - 1, 0, 11)] + ((month == 2) & leap)
    ok &= month_ok & (day >= 1) & (day <= dim) & (hour <= 23) & (minute <= 59) & (second <= 59)

    days = _days_from_civil(year.astype(np.int64), np.where(month_ok, month, 1), day)
    seconds = days * 86_400 + (hour * 3600 + minute * 60 + second) - offset_s
    micros = seconds * 1_000_000 + frac_ns // 1000
    return np.where(ok, micros, 0), ok


def parse_iso_timestamps(strings: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """Parse ISO-8601 date-times (see module docstring) byte-wise with numpy.

    Returns ``(microseconds since the epoch UTC, parsed ok)`` as numpy arrays.
    """
    strings = _flat(strings)
    if not pa.types.is_string(strings.type):
        strings = pc.cast(strings, pa.string())
    n = len(strings)
    valid = _np_valid(strings)
    micros = np.zeros(n, dtype=np.int64)
    if not valid.any():
        return micros, valid
    strings = pc.utf8_trim_whitespace(strings)
    _, offsets_buf, data_buf = strings.buffers()
    offsets = np.frombuffer(offsets_buf, dtype=np.int32)[strings.offset: strings.offset + n + 1]
    data = np.frombuffer(data_buf, dtype=np.uint8) if data_buf is not None else np.zeros(0, np.uint8)
    starts = offsets[:-1].astype(np.int64)
    lengths = np.diff(offsets).astype(np.int64)
    padded = np.concatenate((data[: offsets[-1]], np.zeros(_ISO_WIDTH, dtype=np.uint8)))
    # row i of `windows` is the _ISO_WIDTH bytes starting at byte i
    windows = np.lib.stride_tricks.as_strided(padded, shape=(len(padded) - _ISO_WIDTH + 1, _ISO_WIDTH), strides=(1, 1))
    ok = np.zeros(n, dtype=bool)
    for lo in range(0, n, _ISO_CHUNK):
        hi = min(lo + _ISO_CHUNK, n)
        chunk_micros, chunk_ok = _parse_iso_chunk(windows[starts[lo:hi]], lengths[lo:hi])
        micros[lo:hi] = chunk_micros
        ok[lo:hi] = chunk_ok
    ok &= valid
    return np.where(ok, micros, 0), ok


def _event_time(array: pa.Array, lo_us: int, hi_us: int):
    """(micros UTC, parsed ok, inside [lo, hi))."""
    t = array.type
    n = len(array)
    if pa.types.is_timestamp(t):
        ok = _np_valid(array)
        raw = pc.fill_null(array.cast(pa.int64()), 0).to_numpy(zero_copy_only=False)
        per_s = _UNIT_PER_SECOND[t.unit]
        lo = lo_us * per_s // 1_000_000
        hi = hi_us * per_s // 1_000_000
        in_day = ok & (raw >= lo) & (raw < hi)
        if per_s >= 1_000_000:
            micros = np.floor_divide(raw, per_s // 1_000_000)
        else:
            micros = np.where(in_day, raw, 0) * (1_000_000 // per_s)
        return micros, ok, in_day
    if pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_string_view(t):
        micros, ok = parse_iso_timestamps(array)
        return micros, ok, ok & (micros >= lo_us) & (micros < hi_us)
    zeros = np.zeros(n, dtype=bool)
    return np.zeros(n, dtype=np.int64), zeros, zeros


def _parse_decimal_strings(strings: pa.Array) -> tuple[pa.Array, np.ndarray]:
    """(float64 values, null where absent or unparseable; unparseable mask)."""
    trimmed = pc.utf8_trim_whitespace(strings)
    try:
        # fast path: Arrow parses every value (it also takes "nan"/"inf",
        # which the callers reject as non-finite anyway)
        values = pc.cast(trimmed, pa.float64())
        return values, np.zeros(len(strings), dtype=bool)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        pass
    matches = pc.match_substring_regex(trimmed, _DECIMAL_RE)
    values = pc.cast(pc.if_else(matches, trimmed, pa.scalar(None, pa.string())), pa.float64())
    unparseable = _np_valid(strings) & ~_np_bool(matches)
    return values, unparseable


def _numeric(array: pa.Array) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(float64 values with 0 for nulls, present mask, unparseable mask)."""
    t = array.type
    n = len(array)
    present = _np_valid(array)
    if pa.types.is_null(t):
        return np.zeros(n), present, np.zeros(n, dtype=bool)
    if pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_decimal(t):
        values = pc.cast(array, pa.float64(), safe=False)
        unparseable = np.zeros(n, dtype=bool)
    elif pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_string_view(t) or pa.types.is_binary(t) or pa.types.is_large_binary(t):
        strings = to_string_array(array)
        blank = _blank(strings) & _np_valid(strings)
        if blank.any():  # "" or "  " means "no value", as an empty CSV field does
            strings = pc.if_else(pa.array(blank), pa.scalar(None, pa.string()), strings)
            present &= ~blank
        values, unparseable = _parse_decimal_strings(strings)
    else:  # booleans, timestamps, nested ...: never a price or quantity
        return np.zeros(n), present, present.copy()
    return pc.fill_null(values, 0.0).to_numpy(zero_copy_only=False), present, unparseable


# --------------------------------------------------------------------------
# validation
# --------------------------------------------------------------------------
def _day_bounds_us(date: datetime.date) -> tuple[int, int]:
    lo_days = (datetime.date(date.year, date.month, date.day) - datetime.date(1970, 1, 1)).days
    return lo_days * _US_PER_DAY, (lo_days + 1) * _US_PER_DAY


def _columns(batch, n: int, keep_dictionary: bool = False) -> dict[str, pa.Array]:
    names = batch.schema.names
    out = {}
    for field in RAW_EVENT_SCHEMA:
        if field.name in names:
            out[field.name] = _flat(batch.column(names.index(field.name)), keep_dictionary)
        else:
            out[field.name] = pa.nulls(n, field.type)
    return out


def validate_batch(
    batch: pa.RecordBatch,
    *,
    date: datetime.date,
    source_file: str,
    first_row_number: int,
    synthesize_event_ids: bool = True,
    keep_dictionaries: bool = False,
) -> ValidationResult:
    """Split ``batch`` into valid events and dead letters (see module doc).

    ``batch`` has canonical column names (missing columns count as all-null,
    extra columns are ignored). Row ``i`` gets ``row_number =
    first_row_number + i``. ``date`` is the run's UTC day.
    """
    if isinstance(batch, pa.Table):
        batch = batch.combine_chunks()
    n = batch.num_rows
    raw = _columns(batch, n, keep_dictionaries)
    strings = {name: _id_string_array(raw[name], keep_dictionaries) for name in _STRING_COLUMNS}
    lo_us, hi_us = _day_bounds_us(date)

    # ---- rules, each a numpy bool mask over all rows ----
    missing_user = _blank(strings["user_id"])
    micros, time_ok, in_day = _event_time(raw["event_time"], lo_us, hi_us)
    event_type = strings["event_type"]
    known_type = _is_in(event_type, _EVENT_TYPES)
    product_event = _is_in(event_type, _PRODUCT_EVENT_TYPES)
    missing_product = product_event & _blank(strings["product_id"])

    price, price_present, price_unparseable = _numeric(raw["price"])
    with np.errstate(invalid="ignore"):
        price_good = np.isfinite(price) & (price >= 0)
    bad_price = price_unparseable | (price_present & ~price_good)

    quantity, qty_present, qty_unparseable = _numeric(raw["quantity"])
    with np.errstate(invalid="ignore"):
        qty_good = np.isfinite(quantity) & (quantity == np.floor(quantity)) & (quantity >= 1) & (quantity <= MAX_QUANTITY)
    bad_quantity = qty_unparseable | (qty_present & ~qty_good)

    checks = (
        (REASON_MISSING_USER_ID, missing_user),
        (REASON_BAD_EVENT_TIME, ~time_ok),
        (REASON_OUT_OF_DAY, time_ok & ~in_day),
        (REASON_UNKNOWN_EVENT_TYPE, ~known_type),
        (REASON_MISSING_PRODUCT_ID, missing_product),
        (REASON_BAD_PRICE, bad_price),
        (REASON_BAD_QUANTITY, bad_quantity),
    )
    codes = np.zeros(n, dtype=np.int8)
    for reason, mask in reversed(checks):  # earlier rules overwrite later ones
        codes[mask] = _REASON_CODE[reason]
    is_valid = codes == 0
    dead_index = np.flatnonzero(~is_valid)

    # ---- valid rows ----
    event_id = strings["event_id"]
    if not synthesize_event_ids and event_id.null_count == n:
        # The caller did not read event_id (projected read) and will not use it.
        event_id = _repeat_string("", n)
    elif event_id.null_count:
        synthetic = pc.binary_join_element_wise(
            pa.scalar(f"{SYNTHETIC_EVENT_ID_PREFIX}{source_file}:"),
            pc.cast(pa.array(np.arange(first_row_number, first_row_number + n, dtype=np.int64)), pa.string()),
            "",
        )
        event_id = pc.coalesce(event_id, synthetic)
    qty_int = np.where(qty_present & qty_good, quantity, 0).astype(np.int32)
    amount = price * np.where(qty_present, qty_int, 1)
    valid_columns = {name: strings[name] for name in _STRING_COLUMNS}
    valid_columns["event_id"] = event_id
    valid_columns["event_time"] = pa.array(np.where(is_valid, micros, 0), pa.timestamp("us", tz="UTC"))
    valid_columns["price"] = pa.array(price, pa.float64(), mask=~price_present)
    valid_columns["quantity"] = pa.array(qty_int, pa.int32(), mask=~qty_present)
    valid_columns["amount"] = pa.array(amount, pa.float64(), mask=~price_present)
    schema = VALID_EVENT_SCHEMA
    if keep_dictionaries:  # string columns may stay dictionary<string>
        schema = pa.schema([f.with_type(valid_columns[f.name].type) for f in VALID_EVENT_SCHEMA],
                           metadata=VALID_EVENT_SCHEMA.metadata)
    valid = pa.RecordBatch.from_arrays([valid_columns[f.name] for f in schema], schema=schema)
    if len(dead_index):
        valid = valid.filter(pa.array(is_valid))

    # ---- dead letters: original values as strings ----
    take = pa.array(dead_index, pa.int64())
    dead_columns = []
    for name in RAW_COLUMNS:
        source = strings[name] if name in strings else raw[name]
        dead_columns.append(to_string_array(source.take(take)))
    dead_columns.append(
        pa.DictionaryArray.from_arrays(pa.array(codes[dead_index]), _REASON_DICTIONARY).dictionary_decode()
    )
    dead_columns.append(_repeat_string(source_file, len(dead_index)))
    dead_columns.append(pa.array(dead_index.astype(np.int64) + first_row_number, pa.int64()))
    dead = pa.RecordBatch.from_arrays(dead_columns, schema=DEAD_LETTER_SCHEMA)

    if valid.num_rows + dead.num_rows != n:
        raise AssertionError(
            f"validate_batch lost rows: {valid.num_rows} valid + {dead.num_rows} dead != {n} input "
            f"({source_file}, first row {first_row_number})"
        )
    return ValidationResult(valid=valid, dead=dead)
