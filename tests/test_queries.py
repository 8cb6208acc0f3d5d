"""Search-query normalization, personal-data scrubbing and per-user bounding (no Beam)."""
import math
import unicodedata

import numpy as np
import pyarrow as pa
import pytest

from transforms import queries as q
from transforms.bounding import PID_COUNT


def norm(values, **kw):
    return q.normalize_queries(pa.array(values, pa.string()), **kw).to_pylist()


def clean(values, **kw):
    out, reasons = q.clean_queries(pa.array(values), **kw)
    return out.to_pylist(), reasons.to_pylist()


# --------------------------------------------------------------------------- normalization

@pytest.mark.parametrize("raw,expected", [
    ("  Red   SHOES ", "red shoes"),
    ("ＲＥＤ　ｓｈｏｅｓ", "red shoes"),            # full-width letters + ideographic space (NFKC)
    ("Straße", "strasse"),                          # case folding, not just lower-casing
    ("ΣΊΣΥΦΟΣ", "\u03c3\u03af\u03c3\u03c5\u03c6\u03bf\u03c3"),  # final sigma folds to σ
    ("ﬁle\u00a0cabinet", "file cabinet"),          # ligature (NFKC) + no-break space
    ("tab\tnew\nline\r\x00nul", "tab new line nul"),  # controls -> one space
    ("zero\u200bwidth\u202eoverride\ufeff", "zerowidthoverride"),  # format chars removed
    ("東京 スカイツリー", "東京 スカイツリー"),
    ("كتب   عربية", "كتب عربية"),
    ("😀👨\u200d👩\u200d👧 gift", "😀👨\u200d👩\u200d👧 gift"),  # ZWJ emoji sequence kept
    ("Ｉｐｈｏｎｅ １５", "iphone 15"),
    ("İstanbul", unicodedata.normalize("NFKC", "İstanbul".casefold())),
])
def test_normalize(raw, expected):
    assert norm([raw]) == [expected]


def test_empty_and_null():
    assert norm(["", "   ", "\u200b", "\t\n", None]) == [None, None, None, None, None]
    assert q.normalize_queries(pa.array([], pa.string())).to_pylist() == []
    assert q.normalize_queries(pa.nulls(3)).to_pylist() == [None] * 3


def test_length_cap_at_word_boundary():
    text = "wireless noise cancelling headphones with microphone"
    out = norm([text], max_chars=30)[0]
    assert out == "wireless noise cancelling"
    assert norm([text], max_chars=25) == ["wireless noise cancelling"]  # cut falls on a space
    # no space in the second half: hard cut (CJK)
    cjk = "東京スカイツリー" * 20
    assert norm([cjk], max_chars=10) == [cjk[:10]]
    long_word = "a " + "b" * 100
    assert norm([long_word], max_chars=20) == ["a " + "b" * 18]
    assert all(len(x) <= 80 for x in norm(["x" * 500, "word " * 100]))
    assert norm(["short"], max_chars=None) == ["short"]


def test_hard_cut_drops_a_dangling_joiner():
    s = "a" * 9 + "\u200d" + "b"
    assert norm([s], max_chars=10) == ["a" * 9]


def test_nfkc_composes():
    """pyarrow 25's utf8_normalize never composes (apache/arrow#51225); ours must."""
    assert norm(["Cafe\u0301", "\u1100\u1161", "\uac00", "A\u030a"]) == ["caf\u00e9", "\uac00", "\uac00", "\u00e5"]


def test_normalize_matches_python_reference_on_mixed_text():
    samples = ["Grüße aus KÖLN", "한국어 검색", "e\u0301te\u0301", "ＭＡＣＢＯＯＫ Pro", "ǅemal", "ΌΣΟΣ", "Ⅻ roman", "ﬀ ligature",
               "Ǆ", "ﬃ", "K (kelvin) Å", "① circled", "µ micro", "ꭰ cherokee"]
    got = norm(samples, max_chars=None)
    for s, g in zip(samples, got):
        ref = unicodedata.normalize("NFKC", unicodedata.normalize("NFKC", s).casefold())
        ref = " ".join(ref.split())
        assert unicodedata.is_normalized("NFKC", g)
        assert g == ref, (s, g, ref)


def test_accepts_chunked_dictionary_large_and_binary():
    arr = pa.chunked_array([["A b", None], ["C"]])
    assert q.normalize_queries(arr).to_pylist() == ["a b", None, "c"]
    d = pa.array(["X", "x", None]).dictionary_encode()
    assert q.normalize_queries(d).to_pylist() == ["x", "x", None]
    assert q.normalize_queries(pa.array(["Big"], pa.large_string())).type == pa.string()
    b = pa.array([b"Caf\xc3\xa9", b"\xff\xfe bad", None], pa.binary())
    assert q.normalize_queries(b).to_pylist() == ["café", None, None]
    assert q.normalize_queries(["plain", "List"]).to_pylist() == ["plain", "list"]
    with pytest.raises(TypeError):
        q.normalize_queries(pa.array([1, 2]))


# --------------------------------------------------------------------------- scrubbing

PERSONAL = {
    "email": ["john.doe@example.com", "mail me jane_d@web.de please", "ｊｏｈｎ＠ｇｍａｉｌ．ｃｏｍ",
              "john (at) gmail (dot) com", "john at gmail dot com", "x@y", "bob [at] corp.org"],
    "url": ["https://shop.example/p?id=123", "http://x.io/a", "www.mysite.org/user/jane",
            "search?q=shoes&uid=42", "mailto:me", "tel:+4930", "ftp://files"],
    "iban": ["DE89 3704 0044 0532 0130 00", "de89370400440532013000 refund",
             "GB82 WEST 1234 5698 7654 32", "iban fr14 2004 1010 0505 0001 3m02 606"],
    "card_number": ["4111 1111 1111 1111", "4111-1111-1111-1111", "5500000000000004",
                    "card 3782 822463 10005", "６０１１ １１１１ １１１１ １１１７"],
    "phone_number": ["+49 30 1234567", "(555) 123-4567", "call 555-1234 now", "030 123 456 7",
                     "+1 (212) 555–0199", "٠١٢٣٤٥٦٧٨", "2024-01-15 birthday"],
    "long_digit_run": ["order 123456", "ref 987654", "1\u200b2\u200b3\u200b4\u200b5\u200b6",
                       "1\u03082\u03083\u03084\u03085\u03086\u0308"],
}

HARMLESS = ["iphone 15 pro", "size 10 shoes", "4k tv 55 inch", "ps5", "2024 calendar",
            "usb-c cable 2m", "adidas ultraboost 22", "sv12 wireless headphones", "rtx 4090",
            "amazon.com", "what is 5 + 3", "t-shirt xl", "1/2 inch drill bit", "12345 zip",
            "東京 スカイツリー", "كتب عربية", "😀 gift", "macbook air m2 2023", "10 12 14",
            "@home decor", "c# programming book", "at&t phone case", "ø 30 cm pan"]


@pytest.mark.parametrize("reason,examples", sorted(PERSONAL.items()))
def test_scrub_drops_personal_data(reason, examples):
    out, reasons = q.scrub_personal_data(pa.array(examples))
    assert out.to_pylist() == [None] * len(examples)
    assert reasons.to_pylist() == [reason] * len(examples), list(zip(examples, reasons.to_pylist()))
    cout, creasons = clean(examples)
    assert cout == [None] * len(examples)
    assert creasons == [reason] * len(examples)


def test_scrub_keeps_ordinary_queries():
    out, reasons = q.scrub_personal_data(pa.array(HARMLESS))
    assert reasons.to_pylist() == [None] * len(HARMLESS), list(zip(HARMLESS, reasons.to_pylist()))
    assert out.to_pylist() == HARMLESS  # scrub alone returns the text as given
    cout, creasons = clean(HARMLESS)
    assert creasons == [None] * len(HARMLESS)
    assert cout == norm(HARMLESS)


def test_scrub_checks_the_full_text_before_the_cap():
    """An e-mail or a card split by the length cap is still caught (scrub before cutting)."""
    pad = "cheap red running shoes for men size ten "
    for tail in ("john.doe@example.com", "4111 1111 1111 1111", "+49 30 1234567"):
        raw = pad + tail
        cut_at = len(pad) + 6  # the cap falls inside the personal data
        out, reasons = clean([raw], max_chars=cut_at)
        assert out == [None] and reasons[0] is not None, (raw, reasons)


def test_bad_input_never_crashes():
    huge = "a" * (5 * 1024 * 1024)  # 5 MB
    values = [huge, "", None, "ok", "x" * 1024, "y" * 1025, "東" * 400]
    out, reasons = clean(values)
    assert reasons == ["too_long", "empty", None, None, None, "too_long", "too_long"]
    assert out[2:5] == [None, "ok", "x" * 80]
    _, sreasons = q.scrub_personal_data(pa.array(values))
    assert sreasons.to_pylist()[0] == "too_long"
    # normalize alone cuts huge rows (before any regex) instead of rejecting them
    assert norm([huge], max_chars=10) == ["a" * 10]


def test_binary_and_invalid_utf8():
    b = pa.array([b"Caf\xc3\xa9", b"\xff\xfe\x00", b"\xc3", None, b"a@b.c", b""], pa.binary())
    out, reasons = q.clean_queries(b)
    assert out.to_pylist() == ["café", None, None, None, None, None]
    assert reasons.to_pylist() == [None, "invalid_utf8", "invalid_utf8", None, "email", "empty"]
    # a string array holding invalid UTF-8 (unvalidated buffers) takes the same path
    bad = pa.Array.from_buffers(pa.string(), 2, b.slice(0, 2).buffers()[:3])
    out, reasons = q.clean_queries(bad)
    assert reasons.to_pylist() == [None, "invalid_utf8"]
    # huge binary rows are rejected before decoding; normalize cuts them at a char boundary
    big = pa.array([("é" * 3000).encode()], pa.binary())
    assert q.clean_queries(big)[1].to_pylist() == ["too_long"]
    cut = q.normalize_queries(big, max_chars=None, max_input_bytes=1001).to_pylist()[0]
    assert cut == "é" * 500


def test_random_bytes_never_crash():
    rng = np.random.default_rng()
    rows = [bytes(rng.integers(0, 256, rng.integers(0, 300)).astype(np.uint8)) for _ in range(2000)]
    out, _ = q.clean_queries(pa.array(rows, pa.binary()))
    assert len(out) == len(rows)
    # every kept row is valid, normalized text without a personal-data pattern
    kept = [x for x in out.to_pylist() if x is not None]
    again, r2 = q.clean_queries(pa.array(kept, pa.string()))
    assert again.to_pylist() == kept and set(r2.to_pylist()) == {None}


def test_clean_is_idempotent_on_mixed_scripts():
    values = ["ＲＥＤ　ｓｈｏｅｓ", "Straße  Köln", "東京スカイツリー" * 20, "كتب عربية", "😀👨\u200d👩\u200d👧",
              "ΣΊΣΥΦΟΣ", "word " * 40, "ǅ ﬀ Ⅻ"]
    once, _ = q.clean_queries(pa.array(values))
    twice, _ = q.clean_queries(once)
    assert twice.to_pylist() == once.to_pylist()


# --------------------------------------------------------------------------- bounding

def _contrib(unit, queries, m, **kw):
    return q.query_contributions(np.asarray(unit, dtype=np.uint64), pa.array(queries), m, **kw)


def test_contributions_distinct_and_capped():
    rng = np.random.default_rng()
    n = 20_000
    unit = rng.integers(0, 200, n).astype(np.uint64)
    words = [f"query {i}" for i in range(40)]
    raw = [words[i] if i % 7 else words[i].upper() + "  " for i in rng.integers(0, 40, n)]
    rows = q.query_contributions(unit, pa.array(raw), 5)
    ru = rows.column("unit").to_numpy()
    rq = rows.column("query").to_pylist()
    pairs = list(zip(ru.tolist(), rq))
    assert len(pairs) == len(set(pairs))  # each (user, query) once (Linf = 1)
    _, per_user = np.unique(ru, return_counts=True)
    assert per_user.max() <= 5  # L0
    assert set(rq) <= set(words)  # normalized ("QUERY 3  " -> "query 3")
    for u in np.unique(unit)[:50]:  # keeps as much as the bound allows
        distinct = {r.lower().strip() for r, x in zip(raw, unit) if x == u}
        assert (ru == u).sum() == min(5, len(distinct))
    counts = q.query_user_counts(rows)
    assert counts.column_names == ["query", PID_COUNT]
    assert sum(counts.column(PID_COUNT).to_pylist()) == rows.num_rows


def test_contributions_drop_personal_data_and_nulls():
    rows = _contrib([1, 1, 2, 2, 3], ["Shoes", "john@x.com", None, "4111 1111 1111 1111", "SHOES"], 3)
    assert sorted(zip(rows.column("unit").to_pylist(), rows.column("query").to_pylist())) == [
        (1, "shoes"), (3, "shoes")]
    counts = q.query_user_counts(rows).to_pylist()
    assert counts == [{"query": "shoes", PID_COUNT: 2}]


def test_bound_is_global_per_user_across_batches():
    """A heavy user's rows from many batches, concatenated, contribute at most the cap."""
    batches = [(np.full(50, 7, np.uint64), [f"q{b}-{i}" for i in range(50)]) for b in range(20)]
    unit = np.concatenate([u for u, _ in batches])
    texts = [t for _, t in batches for t in t]
    rows = q.query_contributions(unit, pa.array(texts), 4)
    assert rows.num_rows == 4
    merged = q.merge_query_counts([q.query_user_counts(rows)])
    assert sum(merged.column(PID_COUNT).to_pylist()) == 4
    # Calling per batch (wrong: not global) would let the user contribute 20 x 4.
    per_batch = sum(q.query_contributions(u, pa.array(t), 4).num_rows for u, t in batches)
    assert per_batch == 80


def test_query_sampling_is_uniform():
    """4000 users with the same 4 distinct queries, cap 1: each query kept w.p. 1/4.

    Users are bounded independently, so the count per query is Binomial(4000, 1/4), sd 27.4;
    a deviation above 5.3 sd has probability < 1.2e-7 per query, so the test fails
    spuriously w.p. < 5e-7.
    """
    trials = 4000
    texts = ["a", "a", "a", "a", "b", "c", "d"]  # "a" has more rows: still 1/4
    unit = np.repeat(np.arange(trials, dtype=np.uint64), len(texts))
    rows = q.query_contributions(unit, pa.array(texts * trials), 1, clean=False)
    assert rows.num_rows == trials
    kept = rows.column("query").to_pylist()
    sd = math.sqrt(trials * 0.25 * 0.75)
    hits = {t: kept.count(t) for t in "abcd"}
    assert all(abs(h - trials / 4) < 5.3 * sd for h in hits.values()), hits


def test_per_category_variant():
    unit = np.array([1, 1, 1, 2, 2, 3], np.uint64)
    texts = pa.array(["tv", "tv", "tv", "tv", "tv", "tv"])
    cats = pa.array(["electronics", "electronics", "toys", "electronics", None, "toys"])
    rows = q.query_contributions(unit, texts, 5, categories=cats)
    counts = {(r["query"], r["category"]): r[PID_COUNT] for r in q.query_user_counts(rows).to_pylist()}
    assert counts == {("tv", "electronics"): 2, ("tv", "toys"): 2}
    capped = q.query_contributions(unit, texts, 1, categories=cats)
    assert np.unique(capped.column("unit").to_numpy(), return_counts=True)[1].max() == 1
    merged = q.merge_query_counts([q.query_user_counts(rows), q.query_user_counts(rows)])
    assert {(r["query"], r["category"]): r[PID_COUNT] for r in merged.to_pylist()} == {
        k: 2 * v for k, v in counts.items()}


def test_empty_inputs():
    rows = q.query_contributions(np.zeros(0, np.uint64), pa.array([], pa.string()), 3)
    assert rows.num_rows == 0 and rows.column_names == ["unit", "query"]
    assert q.query_user_counts(rows).num_rows == 0
    assert q.merge_query_counts([]).num_rows == 0
    with pytest.raises(ValueError):
        q.query_contributions(np.zeros(1, np.uint64), pa.array(["a"]), 0)
    with pytest.raises(ValueError):
        q.query_contributions(np.zeros(2, np.uint64), pa.array(["a"]), 1)


def test_search_query_categories():
    unit = np.array([1, 1, 1, 1, 2, 2, 1], np.uint64)
    sess = pa.array(["s1", "s1", "s1", "s2", "s3", "s3", "s1"])
    t = pa.array([5, 1, 9, 2, 1, 2, 7], pa.int64())
    et = pa.array(["product_view", "search", "search", "search", "search", "product_view", "add_to_cart"])
    cat = pa.array(["books", None, None, None, None, "toys", "music"])
    got = q.search_query_categories(unit, sess, t, et, cat).to_pylist()
    # row1 (t=1) -> next categorized in s1 is t=5 books; row2 (t=9) -> nothing after;
    # row3 s2 -> nothing; row4 user 2 s3 -> toys; non-search rows -> null
    assert got == [None, "books", None, None, "toys", None, None]
