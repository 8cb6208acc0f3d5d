"""Search-query normalization, personal-data scrubbing and per-user query bounding.

Pure pyarrow/numpy kernels (no Beam). The release path for the DP query vocabulary is:

    queries, reasons = clean_queries(raw_search_query_column)           # normalize + scrub
    rows = query_contributions(unit, queries, max_queries_per_user)     # bound per user
    counts = query_user_counts(rows)                                    # per-query user counts
    (merge_query_counts across shards) -> private partition selection + noise (release step)

``query_contributions`` runs ``clean_queries`` itself unless told the input is already clean,
so raw text never reaches the counts.

Normalization (:func:`normalize_queries`)
    Unicode NFKC and full case folding (``ß -> ss``, ``ς -> σ``, ligatures, full-width forms),
    control characters -> space, invisible format characters removed
    (zero-width space, bidi overrides, BOM, soft hyphen; the joiners ZWJ/ZWNJ are kept because
    emoji sequences and Persian/Indic text need them), whitespace of every script collapsed to
    one ASCII space, stripped, and a length cap of ``max_chars`` code points cut at the last
    word boundary when that keeps at least half of the text (otherwise, e.g. for CJK without
    spaces, a hard cut). Empty results become null. Printable ASCII rows stay in Arrow
    (``ascii_lower`` is exact there); rows with non-ASCII characters are NFKC-normalized and
    case-folded in Python (``unicodedata``), because pyarrow 25's ``utf8_normalize`` never
    composes (apache/arrow#51225); the regex steps stay vectorized.

Scrubbing (:func:`scrub_personal_data`, :func:`clean_queries`)
    A query is DROPPED (null, with a reason) -- never masked -- when it contains an e-mail
    address (anything ``x@y``, also ``(at)``/``[at]`` and ``at ... dot`` spellings), a URL
    (any ``scheme://``, ``www.``, ``mailto:``/``tel:``, or a query string ``?key=`` /
    ``&key=``), an IBAN-like string, a card-like number (13-19 digits with optional single
    space/dash separators, Luhn-agnostic), a phone-like number (>= 7 digits separated only by
    spaces or ``+ - . / ( )``), or a run of >= 6 digits. Digits of every script count
    (``\\p{Nd}``: full-width, Arabic-Indic, Devanagari ...), and detection runs on a view of
    the text with NFKC applied and all format characters and combining marks removed, so
    zero-width characters or combining marks between digits do not hide a number.

    Why drop rather than mask: a masked query keeps its context ("order 12345 for jane doe"
    -> "order <num> for jane doe"), which can itself identify someone, and masking turns many
    distinct personal strings into one frequent template that then passes selection. Dropping
    loses a few legitimate queries (dates, long model numbers, "size 10 12 14 16") and
    nothing personal. Scrubbing is a first line only: it catches well-formed patterns; free
    text such as a name is protected by private partition selection (a string searched by few
    users is never released), not by the scrubber.

Bad input
    Nothing raises on content: null stays null (no reason); strings longer than
    ``max_input_bytes`` are rejected BEFORE any decoding or regex (reason ``too_long``; in
    :func:`normalize_queries` they are cut to that many bytes instead); binary input is
    decoded as UTF-8 and rows that are not valid UTF-8 are rejected (reason ``invalid_utf8``,
    no replacement characters: a mangled string is never a useful query); string arrays
    holding invalid UTF-8 (possible with unvalidated buffers) take the same path; chunked,
    dictionary, large_string/large_binary and null-typed arrays are accepted. Output arrays
    are always ``pa.string()``.

Per-user bounding (:func:`query_contributions`)
    Each user contributes each distinct query (or ``(query, category)`` key) at most once
    (Linf = 1) and at most ``max_queries_per_user`` distinct keys, chosen uniformly at random
    (``bounding.bound_contributions`` with L0 = max_queries_per_user, Linf = 1). The input must
    hold ALL rows of each user (the Beam layer groups by user shard first): bounding is global
    per user. Release parameters: private partition selection with
    ``max_partitions_contributed = max_queries_per_user``; the distinct-user count has
    L0 = max_queries_per_user, Linf = 1 (L1 sensitivity max_queries_per_user, L2 sqrt of it).
"""
from __future__ import annotations

import re
import unicodedata
from collections.abc import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from transforms.bounding import PID_COUNT, bound_contributions
from transforms.spec import Bounds

__all__ = [
    "DEFAULT_MAX_CHARS",
    "MAX_QUERY_BYTES",
    "REASONS",
    "clean_queries",
    "merge_query_counts",
    "normalize_queries",
    "query_contributions",
    "query_user_counts",
    "scrub_personal_data",
    "search_query_categories",
]

#: Default length cap of a released query, in code points.
DEFAULT_MAX_CHARS = 80

#: Raw queries longer than this many bytes are rejected (scrub/clean) or cut (normalize)
#: before any decoding or regex. Real search queries are far shorter.
MAX_QUERY_BYTES = 1024

# Drop reasons (the reason column; never released, for the quarantine / run summary only).
REASON_INVALID_UTF8 = "invalid_utf8"
REASON_TOO_LONG = "too_long"
REASON_EMPTY = "empty"
REASON_EMAIL = "email"
REASON_URL = "url"
REASON_IBAN = "iban"
REASON_CARD = "card_number"
REASON_PHONE = "phone_number"
REASON_DIGITS = "long_digit_run"

REASONS = (REASON_INVALID_UTF8, REASON_TOO_LONG, REASON_EMPTY, REASON_EMAIL, REASON_URL,
           REASON_IBAN, REASON_CARD, REASON_PHONE, REASON_DIGITS)

QUERY = "query"
CATEGORY = "category"
UNIT = "unit"

# ---------------------------------------------------------------------------------------
# Regular expressions (RE2 syntax, as used by pyarrow.compute)
# ---------------------------------------------------------------------------------------

_FORMAT_EXCEPT_JOINERS = r"[^\P{Cf}\x{200C}\x{200D}]"  # Cf minus ZWNJ/ZWJ -> removed
_SPACE_OR_CONTROL = r"[\s\p{Z}\p{Cc}]+"  # any whitespace / C0-C1 control run -> one space
_DANGLING_END = r"[\x{200C}\x{200D}]+$"  # a joiner left at the end by a hard cut

# Detection view: on normalized text, also drop the joiners and combining marks.
_DETECT_STRIP = r"[\x{200C}\x{200D}\p{M}]+"

_SEP = r"[\s\p{Pd}.()/+]"
_PATTERNS = (
    (REASON_EMAIL,
     (r"[^\s@]\s*@\s*[^\s@]"
      r"|\S\s*[\[(<{]\s*at\s*[\])>}]\s*\S"
      r"|\S\s+at\s+\S+\s*(?:[\[(<{]\s*dot\s*[\])>}]|\s+dot\s+)\s*\S")),
    (REASON_URL,
     (r"[a-z][a-z0-9+.\-]*://|(?:^|[^a-z0-9])www\.[^\s.]|(?:^|[^a-z0-9])(?:mailto|tel|sms|callto):"
      r"|[?&][^\s?&=#]+=")),
    # Prefilter only: candidates are verified in Python (_is_iban_like).
    (REASON_IBAN, r"(?:^|[^a-z0-9])[a-z]{2}[0-9]{2}(?:[ \-]?[a-z0-9]){11}"),
    (REASON_CARD, r"\p{Nd}(?:[ \-\p{Pd}]?\p{Nd}){12,18}"),
    (REASON_PHONE, r"\p{Nd}(?:" + _SEP + r"{0,3}\p{Nd}){6,}"),
    (REASON_DIGITS, r"\p{Nd}{6,}"),
)
_ANY_PATTERN = "|".join(f"(?:{p})" for _, p in _PATTERNS)

_IBAN_PY = re.compile(r"(?<![a-z0-9])[a-z]{2}[0-9]{2}(?:[ \-]?[a-z0-9]){11,30}")
_IBAN_MIN_DIGITS = 10


def _is_iban_like(text: str) -> bool:
    """2 letters + 2 check digits + 11..30 alphanumerics (optionally spaced), >= 10 digits."""
    for m in _IBAN_PY.finditer(text):
        if sum(ch.isdigit() for ch in m.group()) >= _IBAN_MIN_DIGITS:
            return True
    return False


# ---------------------------------------------------------------------------------------
# Input coercion and decoding
# ---------------------------------------------------------------------------------------

ArrayLike = pa.Array | pa.ChunkedArray | Sequence


def _coerce(arr: ArrayLike) -> pa.Array:
    """A plain (non-chunked) string/large_string/binary/large_binary array."""
    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks() if arr.num_chunks else pa.array([], arr.type)
    elif not isinstance(arr, pa.Array):
        arr = pa.array(list(arr))
    if pa.types.is_dictionary(arr.type):
        arr = arr.dictionary_decode()
    t = arr.type
    if pa.types.is_null(t):
        return pa.nulls(len(arr), pa.string())
    if (pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_binary(t)
            or pa.types.is_large_binary(t)):
        return arr
    if pa.types.is_string_view(t):
        return arr.cast(pa.large_string())
    if pa.types.is_binary_view(t) or pa.types.is_fixed_size_binary(t):
        return arr.cast(pa.large_binary())
    raise TypeError(f"queries must be a string or binary array, got {t}")


def _null_out(arr: pa.Array, mask: np.ndarray) -> pa.Array:
    if not mask.any():
        return arr
    return pc.if_else(pa.array(mask), pa.nulls(len(arr), arr.type), arr)


def _byte_lengths(arr: pa.Array) -> np.ndarray:
    return pc.fill_null(pc.binary_length(arr), 0).to_numpy(zero_copy_only=False)


def _is_text(t: pa.DataType) -> bool:
    return pa.types.is_string(t) or pa.types.is_large_string(t)


def _decode(arr: pa.Array) -> tuple[pa.Array, np.ndarray]:
    """(valid UTF-8 string array, mask of rows rejected as invalid UTF-8; those are null)."""
    n = len(arr)
    invalid = np.zeros(n, dtype=bool)
    if _is_text(arr.type):
        try:
            arr.validate(full=True)
            return arr, invalid
        except pa.ArrowInvalid:
            arr = arr.view(pa.large_binary() if pa.types.is_large_string(arr.type) else pa.binary())
    target = pa.large_string() if pa.types.is_large_binary(arr.type) else pa.string()
    try:
        return arr.cast(target), invalid
    except pa.ArrowInvalid:
        pass
    # Slow path, only for arrays holding at least one invalid row: decode row by row.
    out = []
    for i, b in enumerate(arr.to_pylist()):
        if b is None:
            out.append(None)
            continue
        try:
            out.append(b.decode("utf-8"))
        except UnicodeDecodeError:
            out.append(None)
            invalid[i] = True
    return pa.array(out, target), invalid


def _cut_bytes_utf8(b: bytes, limit: int) -> str | None:
    """First <= limit bytes of b as text, dropping a multi-byte sequence cut at the end."""
    head = b[:limit]
    for back in range(4):
        try:
            return head[: len(head) - back].decode("utf-8")
        except UnicodeDecodeError:
            continue
    return None


def _binary_view(a: pa.Array) -> pa.Array:
    if pa.types.is_large_string(a.type):
        return a.view(pa.large_binary())
    if pa.types.is_string(a.type):
        return a.view(pa.binary())
    return a


def _prepare(arr: ArrayLike, max_input_bytes: int, reject_long: bool):
    """Coerce, reject (or cut) huge rows BEFORE any decoding or regex, decode.

    Returns (string array, too_long mask, invalid mask, input-present mask). With
    ``reject_long`` huge rows are null; otherwise they hold their first ``max_input_bytes``
    bytes (an incomplete trailing UTF-8 sequence dropped; null if still not valid UTF-8).
    """
    max_input_bytes = int(max_input_bytes)
    if max_input_bytes < 1:
        raise ValueError(f"max_input_bytes must be >= 1, got {max_input_bytes!r}")
    a = _coerce(arr)
    present = np.asarray(a.is_valid(), dtype=bool)
    too_long = _byte_lengths(a) > max_input_bytes
    s, invalid = _decode(_null_out(a, too_long))
    if too_long.any() and not reject_long:
        idx = np.flatnonzero(too_long)
        raw = _binary_view(a).take(pa.array(idx))
        cut = [_cut_bytes_utf8(raw[i].as_buffer().slice(0, max_input_bytes).to_pybytes(), max_input_bytes)
               for i in range(len(raw))]
        s = pc.replace_with_mask(s, pa.array(too_long), pa.array(cut, s.type))
    return s, too_long, invalid, present


# ---------------------------------------------------------------------------------------
# Normalization
# ---------------------------------------------------------------------------------------


def _mask(x) -> np.ndarray:
    """Boolean numpy mask from a boolean Arrow array (null -> False)."""
    return np.asarray(pc.fill_null(x, False).to_numpy(zero_copy_only=False), dtype=bool)


def _nfkc_casefold_py(values: list) -> list:
    """NFKC(casefold(NFKC(s))) per string, in Python (see module docstring)."""
    nf = unicodedata.normalize
    return [nf("NFKC", nf("NFKC", v).casefold()) for v in values]


def _normalize_text(s: pa.Array) -> pa.Array:
    """NFKC + case fold + control/format cleanup + whitespace collapse + strip (no cap).

    Printable-ASCII rows without a double space only need ``ascii_lower`` + strip (NFKC and
    case folding are identities beyond lower-casing on ASCII). Other ASCII rows add the
    control/whitespace regex. Non-ASCII rows get NFKC and full case folding from Python's
    ``unicodedata`` / ``str.casefold``, because pyarrow's ``utf8_normalize`` ignores its form
    and never composes (apache/arrow#51225, fixed after pyarrow 25.0.1: NFKC output comes
    back decomposed, e.g. Hangul syllables as jamo). Only those rows leave Arrow.
    """
    if len(s) == 0:
        return s
    fast = pc.utf8_trim(pc.ascii_lower(s), " ")
    is_ascii = _mask(pc.string_is_ascii(s))
    simple = is_ascii & _mask(pc.and_(pc.ascii_is_printable(s),
                                      pc.equal(pc.find_substring(s, "  "), -1)))
    work = ~simple & np.asarray(s.is_valid(), dtype=bool)
    if not work.any():
        return fast
    work_mask = pa.array(work)
    sub = s.filter(work_mask)
    non_ascii = ~is_ascii[work]
    if non_ascii.any():
        m = pa.array(non_ascii)
        folded = _nfkc_casefold_py(sub.filter(m).to_pylist())
        sub = pc.replace_with_mask(sub, m, pa.array(folded, sub.type))
    sub = pc.ascii_lower(sub)
    sub = pc.replace_substring_regex(sub, _FORMAT_EXCEPT_JOINERS, "")
    sub = pc.replace_substring_regex(sub, _SPACE_OR_CONTROL, " ")
    sub = pc.utf8_trim(sub, " ")
    return pc.replace_with_mask(fast, work_mask, sub)


def _truncate(s: pa.Array, max_chars: int) -> pa.Array:
    """Cap at max_chars code points, at the last word boundary when that keeps >= half."""
    lengths = pc.fill_null(pc.utf8_length(s), 0).to_numpy(zero_copy_only=False)
    over = lengths > max_chars
    if not over.any():
        return s
    idx = pa.array(np.flatnonzero(over))
    sub = s.take(idx)
    head = pc.utf8_slice_codeunits(sub, 0, max_chars)
    at_boundary = pc.equal(pc.utf8_slice_codeunits(sub, max_chars, max_chars + 1), " ")
    word_cut = pc.utf8_rtrim(pc.replace_substring_regex(head, r" [^ ]*$", ""), " ")
    long_enough = pc.greater_equal(pc.utf8_length(word_cut), max(1, max_chars // 2))
    cut = pc.if_else(at_boundary, head, pc.if_else(long_enough, word_cut, head))
    cut = pc.utf8_rtrim(pc.replace_substring_regex(cut, _DANGLING_END, ""), " ")
    return pc.replace_with_mask(s, pa.array(over), cut)


def _empty_to_null(s: pa.Array) -> pa.Array:
    empty = pc.fill_null(pc.equal(s, ""), False)
    if pc.any(empty).as_py():
        s = pc.if_else(empty, pa.nulls(len(s), s.type), s)
    return s


def _to_string(s: pa.Array) -> pa.Array:
    return s if s.type == pa.string() else s.cast(pa.string())


def normalize_queries(arr: ArrayLike, max_chars: int | None = DEFAULT_MAX_CHARS, *,
                      max_input_bytes: int = 4 * MAX_QUERY_BYTES) -> pa.Array:
    """Normalized queries (``pa.string()``, same length); empty or undecodable -> null.

    NFKC, case fold, controls -> space, invisible format characters removed (joiners kept),
    whitespace collapsed, stripped, capped at ``max_chars`` code points (word boundary when
    possible; ``None`` = no cap). Rows longer than ``max_input_bytes`` are cut to that many
    bytes first (before any regex); rows that are not valid UTF-8 become null.

    Not a release path on its own: cutting can split a personal-data pattern. Use
    :func:`clean_queries` (scrubs before cutting).
    """
    if max_chars is not None and int(max_chars) < 1:
        raise ValueError(f"max_chars must be >= 1 or None, got {max_chars!r}")
    s, _, _, _ = _prepare(arr, max_input_bytes, reject_long=False)
    s = _normalize_text(s)
    if max_chars is not None:
        s = _truncate(s, int(max_chars))
    return _to_string(_empty_to_null(s))


# ---------------------------------------------------------------------------------------
# Personal-data detection
# ---------------------------------------------------------------------------------------


def _detection_view(normalized: pa.Array) -> pa.Array:
    """Normalized text with joiners and combining marks removed (non-ASCII rows only)."""
    if len(normalized) == 0:
        return normalized
    non_ascii = ~_mask(pc.string_is_ascii(normalized)) & np.asarray(normalized.is_valid(), dtype=bool)
    if not non_ascii.any():
        return normalized
    m = pa.array(non_ascii)
    view = pc.replace_substring_regex(normalized.filter(m), _DETECT_STRIP, "")
    return pc.replace_with_mask(normalized, m, view)


def _detect(view: pa.Array) -> np.ndarray:
    """Reason code per row (int8: 0 = keep, i + 1 = REASONS[i]) for the detection view."""
    n = len(view)
    reasons = np.zeros(n, dtype=np.int8)
    if n == 0:
        return reasons
    hit = pc.fill_null(pc.match_substring_regex(view, _ANY_PATTERN), False)
    hit = hit.to_numpy(zero_copy_only=False)
    if not hit.any():
        return reasons
    idx = np.flatnonzero(hit)
    cand = view.take(pa.array(idx))
    undecided = np.ones(idx.size, dtype=bool)
    for reason, pattern in _PATTERNS:
        m = pc.fill_null(pc.match_substring_regex(cand, pattern), False).to_numpy(
            zero_copy_only=False) & undecided
        if reason == REASON_IBAN and m.any():
            texts = cand.take(pa.array(np.flatnonzero(m))).to_pylist()
            verified = np.array([_is_iban_like(t) for t in texts], dtype=bool)
            m[np.flatnonzero(m)] = verified
        reasons[idx[m]] = _CODE[reason]
        undecided &= ~m
    return reasons


_CODE = {r: i + 1 for i, r in enumerate(REASONS)}
_REASON_VALUES = pa.array([None, *REASONS], pa.string())


def _reason_array(codes: np.ndarray) -> pa.Array:
    return _REASON_VALUES.take(pa.array(codes.astype(np.int32)))


def scrub_personal_data(arr: ArrayLike, *, max_input_bytes: int = MAX_QUERY_BYTES
                        ) -> tuple[pa.Array, pa.Array]:
    """(queries with personal-data rows set to null, reason per row or null).

    The kept rows are returned as given (decoded to ``pa.string()``), not normalized;
    detection itself runs on a normalized view (NFKC, case fold, format characters and
    combining marks removed), so it works on raw or normalized input. Dropped rows get a
    reason from :data:`REASONS`; null inputs stay null with a null reason. For the release
    path use :func:`clean_queries`, which also normalizes.
    """
    s, too_long, invalid, _ = _prepare(arr, max_input_bytes, reject_long=True)
    reasons = _detect(_detection_view(_normalize_text(s)))
    reasons[invalid] = _CODE[REASON_INVALID_UTF8]
    reasons[too_long] = _CODE[REASON_TOO_LONG]
    return _to_string(_null_out(s, reasons != 0)), _reason_array(reasons)


def clean_queries(arr: ArrayLike, max_chars: int = DEFAULT_MAX_CHARS, *,
                  max_input_bytes: int = MAX_QUERY_BYTES) -> tuple[pa.Array, pa.Array]:
    """The release path: (normalized, scrubbed, capped queries; drop reason per row).

    Order: reject huge (> ``max_input_bytes``) and invalid UTF-8 rows, normalize without a
    cap, scrub the FULL normalized text (so a cut cannot split an e-mail or a card number
    into an undetected fragment), cap at ``max_chars`` at a word boundary, and scrub the
    capped text again. Rows that normalize to nothing get reason ``empty``. Idempotent.
    """
    if int(max_chars) < 1:
        raise ValueError(f"max_chars must be >= 1, got {max_chars!r}")
    s, too_long, invalid, present = _prepare(arr, max_input_bytes, reject_long=True)
    norm = _normalize_text(s)
    reasons = _detect(_detection_view(norm))
    capped = _truncate(norm, int(max_chars))
    cut = _mask(pc.greater(pc.utf8_length(norm), int(max_chars))) if len(s) else np.zeros(0, bool)
    cut &= reasons == 0
    if cut.any():  # defense in depth: re-scrub the rows the cap changed
        idx = np.flatnonzero(cut)
        reasons[idx] = _detect(_detection_view(capped.take(pa.array(idx))))
    out = _empty_to_null(capped)
    empty = present & ~too_long & ~invalid & ~np.asarray(out.is_valid(), dtype=bool)
    reasons[empty] = _CODE[REASON_EMPTY]
    reasons[invalid] = _CODE[REASON_INVALID_UTF8]
    reasons[too_long] = _CODE[REASON_TOO_LONG]
    return _to_string(_null_out(out, reasons != 0)), _reason_array(reasons)


# ---------------------------------------------------------------------------------------
# Per-user bounding and counts
# ---------------------------------------------------------------------------------------


def _as_units(user_unit, n: int) -> np.ndarray:
    unit = np.asarray(user_unit)
    if unit.ndim != 1 or unit.size != n:
        raise ValueError(f"user_unit must be a 1-d array of length {n}, got shape {unit.shape}")
    if unit.dtype.kind not in "iu":
        raise TypeError(f"user_unit must be integer privacy-unit ids, got dtype {unit.dtype}")
    return unit.astype(np.uint64, copy=False)


def _codes(arr: pa.Array) -> tuple[np.ndarray, pa.Array]:
    enc = pc.dictionary_encode(arr)
    if isinstance(enc, pa.ChunkedArray):  # pragma: no cover - _coerce gives plain arrays
        enc = enc.combine_chunks()
    return enc.indices.to_numpy(zero_copy_only=False).astype(np.int64), enc.dictionary


def query_contributions(user_unit: np.ndarray, queries: ArrayLike, max_queries_per_user: int,
                        categories: ArrayLike | None = None, *, clean: bool = True,
                        max_chars: int = DEFAULT_MAX_CHARS,
                        rng: np.random.Generator | None = None) -> pa.Table:
    """Bounded (unit, query[, category]) rows: one row per kept (user, key).

    ``user_unit``: uint64 privacy-unit id per row; ``queries``: the raw (or, with
    ``clean=False``, already :func:`clean_queries`-cleaned) search queries, same length;
    ``categories``: optional category per row for the ``query x category`` variant.
    Rows with a null (or dropped) query or a null category are ignored. Each user keeps
    each distinct key once and at most ``max_queries_per_user`` distinct keys, a uniform
    random subset (L0 = max_queries_per_user, Linf = 1), GLOBALLY: pass all rows of each
    user. The result holds unit ids and is never released; feed it to
    :func:`query_user_counts`.
    """
    m = int(max_queries_per_user)
    if m != max_queries_per_user or m < 1:
        raise ValueError(f"max_queries_per_user must be an integer >= 1, got {max_queries_per_user!r}")
    if clean:
        q, _ = clean_queries(queries, max_chars)
    else:
        q = _to_string(_decode(_coerce(queries))[0])
    n = len(q)
    unit = _as_units(user_unit, n)
    valid = np.asarray(q.is_valid(), dtype=bool)
    cat = None
    if categories is not None:
        cat = _to_string(_decode(_coerce(categories))[0])
        if len(cat) != n:
            raise ValueError(f"categories has length {len(cat)}, expected {n}")
        valid &= np.asarray(cat.is_valid(), dtype=bool)
    idx = np.flatnonzero(valid)
    names = [UNIT, QUERY] + ([CATEGORY] if cat is not None else [])
    if idx.size == 0:
        return pa.table({k: pa.array([], pa.uint64() if k == UNIT else pa.string()) for k in names})
    take = pa.array(idx)
    qsub = q.take(take)
    qcode, _ = _codes(qsub)
    part = qcode
    csub = None
    if cat is not None:
        csub = cat.take(take)
        ccode, cdict = _codes(csub)
        part, _ = _codes(pa.array(qcode * np.int64(max(1, len(cdict))) + ccode))  # dense
    bounded = bound_contributions(unit[idx], part, Bounds(m, 1), rng)
    rows = pa.array(bounded.rows)
    cols = {UNIT: pa.array(unit[idx][bounded.rows], pa.uint64()), QUERY: qsub.take(rows)}
    if csub is not None:
        cols[CATEGORY] = csub.take(rows)
    return pa.table(cols)


def query_user_counts(contributions: pa.Table) -> pa.Table:
    """Distinct-user count per key: (query[, category], ``__pid_count``), partial per shard.

    Input: :func:`query_contributions` output (one row per kept (user, key)). The counts are
    raw (unnoised): they drive private partition selection and get noise in the release
    step; merge shards with :func:`merge_query_counts`.
    """
    keys = [QUERY] + ([CATEGORY] if CATEGORY in contributions.column_names else [])
    schema = pa.schema([pa.field(k, pa.string()) for k in keys] + [pa.field(PID_COUNT, pa.int64())])
    if contributions.num_rows == 0:
        return schema.empty_table()
    g = contributions.group_by(keys, use_threads=False).aggregate([(UNIT, "count")])
    g = g.rename_columns([f"{UNIT}_count" if c == f"{UNIT}_count" else c for c in g.column_names])
    return pa.table({**{k: g.column(k) for k in keys}, PID_COUNT: g.column(f"{UNIT}_count")},
                    schema=schema)


def merge_query_counts(tables: Sequence[pa.Table]) -> pa.Table:
    """Sums partial :func:`query_user_counts` tables from different shards (units disjoint)."""
    tables = [t for t in tables if t.num_rows]
    if not tables:
        return pa.schema([pa.field(QUERY, pa.string()), pa.field(PID_COUNT, pa.int64())]).empty_table()
    t = pa.concat_tables(tables)
    keys = [c for c in t.column_names if c != PID_COUNT]
    g = t.group_by(keys, use_threads=False).aggregate([(PID_COUNT, "sum")])
    return pa.table({**{k: g.column(k) for k in keys}, PID_COUNT: g.column(f"{PID_COUNT}_sum")})


def search_query_categories(user_unit: np.ndarray, session: ArrayLike, event_time: ArrayLike,
                            event_type: ArrayLike, category: ArrayLike) -> pa.Array:
    """Category to attribute each search to, for the ``query x category`` variant.

    Search events carry no category; a search row gets the category of the next event of the
    same user and session (by time, ties in input order) that has one, i.e. what the shopper
    looked at after searching. Non-search rows and searches followed by nothing categorized
    get null. Pure function of one user's own rows (per-user, so bounding is unaffected).
    """
    cat = _to_string(_decode(_coerce(category))[0])
    n = len(cat)
    unit = _as_units(user_unit, n)
    sess = _coerce(session)
    et = _coerce(event_type)
    if len(sess) != n or len(et) != n:
        raise ValueError("user_unit, session, event_time, event_type and category must have equal length")
    if n == 0:
        return pa.array([], pa.string())
    scode, _ = _codes(sess)
    scode = np.where(np.asarray(sess.is_valid(), dtype=bool), scode, -1)
    t = event_time.combine_chunks() if isinstance(event_time, pa.ChunkedArray) else event_time
    if isinstance(t, pa.Array):
        t = pc.fill_null(t.cast(pa.int64()), np.iinfo(np.int64).max).to_numpy(zero_copy_only=False)
    t = np.asarray(t).astype(np.int64, copy=False)
    order = np.lexsort((np.arange(n), t, scode, unit))
    u_s, s_s = unit[order], scode[order]
    group_start = np.ones(n, dtype=bool)
    group_start[1:] = (u_s[1:] != u_s[:-1]) | (s_s[1:] != s_s[:-1])
    group = np.cumsum(group_start)
    has_cat = np.asarray(cat.is_valid(), dtype=bool)[order]
    pos = np.where(has_cat, np.arange(n), n)
    nxt = np.minimum.accumulate(pos[::-1])[::-1]  # first categorized position >= i
    # the next categorized event strictly after i: look at i + 1
    after = np.empty(n, dtype=np.int64)
    after[:-1] = nxt[1:]
    after[-1] = n
    ok = after < n
    ok[ok] &= group[after[ok]] == group[ok]
    is_search = pc.fill_null(pc.equal(et, "search"), False).to_numpy(zero_copy_only=False)[order]
    ok &= is_search & (s_s >= 0)
    src = np.full(n, -1, dtype=np.int64)
    src[order[ok]] = order[after[ok]]
    mask = src >= 0
    out = cat.take(pa.array(np.where(mask, src, 0)))
    return pc.if_else(pa.array(mask), out, pa.nulls(n, pa.string()))
