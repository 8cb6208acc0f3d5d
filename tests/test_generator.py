"""Tests of the synthetic clickstream generator (transforms/generator.py)."""
import argparse
import csv
import datetime as dt
import json
import math
import os
import re

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest

from schemas.events import (
    DEAD_LETTER_REASONS,
    EVENT_TYPES,
    MAX_QUANTITY,
    PRODUCT_EVENT_TYPES,
    RAW_EVENT_SCHEMA,
    REASON_BAD_EVENT_TIME,
    REASON_BAD_PRICE,
    REASON_BAD_QUANTITY,
    REASON_MISSING_PRODUCT_ID,
    REASON_MISSING_USER_ID,
    REASON_OUT_OF_DAY,
    REASON_UNKNOWN_EVENT_TYPE,
)
from transforms import generator as gen
from transforms.generator import (
    add_cli_arguments,
    generate,
    generate_events,
    main,
    write_catalog,
    write_events,
)

DATE = dt.date(2026, 12, 2)
DAY_START = dt.datetime(2026, 12, 2, tzinfo=dt.timezone.utc)
DAY_END = DAY_START + dt.timedelta(days=1)
N_USERS = 2_000
N_EVENTS = 20_000
SEED = 7
ISO_RE = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{6}Z$")


@pytest.fixture(scope="module")
def clean():
    return generate_events(N_USERS, N_EVENTS, DATE, seed=SEED)


@pytest.fixture(scope="module")
def clean_rows(clean):
    return clean.to_pylist()


@pytest.fixture(scope="module")
def with_bad():
    return generate_events(N_USERS, N_EVENTS, DATE, seed=SEED, bad_rows_fraction=0.05)


@pytest.fixture(scope="module")
def text_with_bad():
    return generate_events(N_USERS, N_EVENTS, DATE, seed=SEED, bad_rows_fraction=0.05, text_format=True)


def _counts(table, column):
    vc = pc.value_counts(table[column]).to_pylist()
    return {d["values"]: d["counts"] for d in vc}


def expected_reason(row, typed):
    """Reference implementation of the validation order documented in schemas/events.py."""
    uid = row["user_id"]
    if uid is None or uid.strip() == "":
        return REASON_MISSING_USER_ID
    t = row["event_time"]
    if t is None:
        return REASON_BAD_EVENT_TIME
    if not typed:
        try:
            t = dt.datetime.strptime(t, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=dt.timezone.utc)
        except ValueError:
            return REASON_BAD_EVENT_TIME
    if not DAY_START <= t < DAY_END:
        return REASON_OUT_OF_DAY
    etype = row["event_type"]
    if etype not in EVENT_TYPES:
        return REASON_UNKNOWN_EVENT_TYPE
    if etype in PRODUCT_EVENT_TYPES and not row["product_id"]:
        return REASON_MISSING_PRODUCT_ID
    price = row["price"]
    if price is not None:
        try:
            price = float(price)
        except ValueError:
            return REASON_BAD_PRICE
        if not math.isfinite(price) or price < 0:
            return REASON_BAD_PRICE
    qty = row["quantity"]
    if qty is not None:
        try:
            qty = int(qty)
        except ValueError:
            return REASON_BAD_QUANTITY
        if not 1 <= qty <= MAX_QUANTITY:
            return REASON_BAD_QUANTITY
    return None


# --------------------------------------------------------------------------- clean data


def test_schema_and_row_count(clean):
    assert clean.schema.equals(RAW_EVENT_SCHEMA, check_metadata=True)
    assert clean.num_rows == N_EVENTS
    assert pc.count_distinct(clean["event_id"]).as_py() == N_EVENTS
    assert not pc.any(pc.starts_with(clean["event_id"], "bad-")).as_py()
    for name in ("event_id", "user_id", "event_time", "event_type"):
        assert clean[name].null_count == 0
    assert pc.min(clean["event_time"]).as_py() >= DAY_START
    assert pc.max(clean["event_time"]).as_py() < DAY_END
    assert set(_counts(clean, "event_type")) == set(EVENT_TYPES)
    assert set(_counts(clean, "device")) == {"desktop", "mobile", "tablet"}
    assert set(_counts(clean, "referrer")) <= {"direct", "search", "social", "email", "ads", None}
    assert all(re.fullmatch(r"[A-Z]{2}", c) for c in _counts(clean, "country"))


def test_clean_rows_are_valid_and_fields_apply(clean_rows):
    for row in clean_rows:
        assert expected_reason(row, typed=True) is None, row
        etype = row["event_type"]
        if etype in PRODUCT_EVENT_TYPES:
            assert re.fullmatch(r"p\d{6}", row["product_id"])
            assert row["category"] and row["price"] is not None and row["price"] > 0
            assert row["search_query"] is None
            if etype == "product_view":
                assert row["quantity"] is None
            else:
                assert 1 <= row["quantity"] <= 5
        else:
            assert row["product_id"] is None and row["category"] is None
            assert row["price"] is None and row["quantity"] is None
            assert (row["search_query"] is not None) == (etype == "search")
        assert re.fullmatch(r"u\d{7}", row["user_id"])
        assert re.fullmatch(r"e\d{10}", row["event_id"])


def test_hourly_spread_is_roughly_uniform(clean):
    hours = np.asarray(pc.hour(clean["event_time"]))
    assert (np.bincount(hours, minlength=24) > 0).all()
    big = generate_events(10_000, 200_000, DATE, seed=2)
    per_hour = np.bincount(np.asarray(pc.hour(big["event_time"])), minlength=24)
    assert per_hour.min() > 0.75 * big.num_rows / 24
    assert per_hour.max() < 1.25 * big.num_rows / 24


def test_funnel_rates_and_order(clean, clean_rows):
    counts = _counts(clean, "event_type")
    views, carts, buys = counts["product_view"], counts["add_to_cart"], counts["purchase"]
    assert buys < carts < views
    assert 0.04 <= carts / views <= 0.12
    assert 0.15 <= buys / carts <= 0.45
    assert 0 < counts["remove_from_cart"] < carts
    assert counts["page_view"] + counts["search"] + views > 0.85 * N_EVENTS

    carted = set()
    prev = None
    for row in clean_rows:
        etype = row["event_type"]
        key = (row["session_id"], row["product_id"])
        if etype == "add_to_cart":
            # directly after a view of the same product in the same session
            assert prev["event_type"] == "product_view"
            assert (prev["session_id"], prev["product_id"]) == key
            assert prev["event_time"] <= row["event_time"]
            carted.add(key)
        elif etype in ("purchase", "remove_from_cart"):
            assert key in carted  # a carted product, earlier in the same session
        prev = row


def test_sessions(clean, clean_rows):
    session_users = {}
    first_last = {}
    for row in clean_rows:
        session_users.setdefault(row["session_id"], set()).add(row["user_id"])
        t = row["event_time"]
        lo, hi = first_last.get(row["session_id"], (t, t))
        assert t >= hi  # events of a session are in time order
        first_last[row["session_id"]] = (lo, t)
    assert all(len(u) == 1 for u in session_users.values())
    n_users_active = pc.count_distinct(clean["user_id"]).as_py()
    assert len(session_users) > 1.5 * n_users_active  # several sessions per active user
    durations = sorted((hi - lo).total_seconds() for lo, hi in first_last.values())
    assert durations[len(durations) // 2] < 30 * 60  # median session shorter than 30 minutes


def test_heavy_tailed_users_and_bots(clean):
    per_user = np.array(pc.value_counts(clean["user_id"]).field("counts"))
    assert per_user.max() >= 50 * np.median(per_user)
    top3 = np.sort(per_user)[-3:]
    assert top3.min() >= 500  # at least 3 bot-like heavy users
    assert np.sort(per_user)[-10:].sum() <= 0.3 * N_EVENTS  # bots stay a minority
    assert np.median(per_user) <= 10


def test_bots_scale_with_large_runs():
    table = generate_events(20_000, 300_000, DATE, seed=1)
    per_user = np.sort(np.array(pc.value_counts(table["user_id"]).field("counts")))
    assert per_user[-3] >= 2_000  # thousands of events each
    assert per_user[-3:].sum() <= 0.2 * table.num_rows


def test_products_have_stable_category_and_price(clean_rows):
    seen = {}
    for row in clean_rows:
        if row["product_id"] is not None:
            value = (row["category"], row["price"])
            assert seen.setdefault(row["product_id"], value) == value
    categories = {c for c, _ in seen.values()}
    assert 5 <= len(categories) <= 50
    assert all(p == round(p, 2) for _, p in seen.values())


def test_product_popularity_is_skewed(clean):
    views = clean.filter(pc.equal(clean["event_type"], "product_view"))
    counts = np.sort(np.array(pc.value_counts(views["product_id"]).field("counts")))[::-1]
    assert counts[:10].sum() > 0.15 * counts.sum()


def test_search_queries_are_multi_word_and_skewed(clean):
    searches = clean.filter(pc.equal(clean["event_type"], "search"))
    counts = _counts(searches, "search_query")
    assert None not in counts
    assert sum(1 for q in counts if " " in q) > 0.5 * len(counts)
    top = sorted(counts.values(), reverse=True)
    assert top[0] >= 5 * np.median(top)


def test_determinism(clean):
    again = generate_events(N_USERS, N_EVENTS, DATE, seed=SEED)
    assert again.equals(clean)
    other = generate_events(N_USERS, N_EVENTS, DATE, seed=SEED + 1)
    assert not other.equals(clean)
    assert other.column("user_id").to_pylist() != clean.column("user_id").to_pylist()


def test_small_and_empty_sizes():
    empty = generate_events(10, 0, DATE, seed=1)
    assert empty.num_rows == 0 and empty.schema.equals(RAW_EVENT_SCHEMA, check_metadata=True)
    one_user = generate_events(1, 50, DATE, seed=1, n_products=1)
    assert one_user.num_rows == 50
    assert pc.count_distinct(one_user["user_id"]).as_py() == 1
    tiny = generate_events(5, 3, DATE, seed=1, bad_rows_fraction=1.0, text_format=True)
    assert tiny.num_rows == 3
    assert all(e.startswith("bad-") for e in tiny["event_id"].to_pylist())


def test_date_as_datetime_or_string_accepted():
    a = generate_events(50, 100, "2026-12-02", seed=3)
    b = generate_events(50, 100, dt.datetime(2026, 12, 2, 15, 0), seed=3)
    assert a.equals(b)


@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(n_users=0), "n_users"),
        (dict(n_events=-1), "n_events"),
        (dict(bad_rows_fraction=1.5), "bad_rows_fraction"),
        (dict(bad_rows_fraction=-0.1), "bad_rows_fraction"),
        (dict(n_products=0), "n_products"),
        (dict(date="2026-13-01"), "date"),
    ],
)
def test_argument_validation(kwargs, name):
    args = dict(n_users=10, n_events=10, date=DATE)
    args.update(kwargs)
    with pytest.raises(ValueError, match=name):
        generate_events(**args)


def test_format_validation(tmp_path, clean):
    with pytest.raises(ValueError, match="fmt"):
        write_events(clean, str(tmp_path), fmt="xml")
    with pytest.raises(ValueError, match="fmt"):
        generate(str(tmp_path), n_users=10, n_events=10, date=DATE, fmt="avro")
    with pytest.raises(ValueError, match="n_files"):
        write_events(clean, str(tmp_path), n_files=0)


# --------------------------------------------------------------------------- bad rows


@pytest.mark.parametrize("fixture", ["with_bad", "text_with_bad"])
def test_bad_rows_count_prefix_and_single_reason(request, fixture):
    table = request.getfixturevalue(fixture)
    typed = fixture == "with_bad"
    assert table.num_rows == N_EVENTS
    ids = table["event_id"].to_pylist()
    bad_positions = [i for i, e in enumerate(ids) if e.startswith("bad-")]
    assert len(bad_positions) == round(0.05 * N_EVENTS)
    # spread over the whole table
    assert bad_positions[0] < N_EVENTS * 0.05 and bad_positions[-1] > N_EVENTS * 0.95
    assert len(set(ids)) == len(ids)
    reasons_seen = set()
    for row in table.to_pylist():
        expected = expected_reason(row, typed)
        if row["event_id"].startswith("bad-"):
            m = re.fullmatch(r"bad-([a-z_]+)-(\d+)", row["event_id"])
            assert m and m.group(1) in DEAD_LETTER_REASONS
            assert m.group(1) == expected, row
            reasons_seen.add(expected)
        else:
            assert re.fullmatch(r"e\d{10}", row["event_id"])
            assert expected is None, row
    assert reasons_seen == set(gen._BAD_REASONS)


def test_bad_row_kinds_present(with_bad, text_with_bad):
    typed_bad = with_bad.filter(pc.starts_with(with_bad["event_id"], "bad-")).to_pylist()
    users = {r["user_id"] for r in typed_bad if r["event_id"].startswith("bad-missing_user_id")}
    assert users == {None, "", "   "}
    types = {r["event_type"] for r in typed_bad if r["event_id"].startswith("bad-unknown_event_type")}
    assert types == {"clickk", "", "PURCHASE "}
    qtys = {r["quantity"] for r in typed_bad if r["event_id"].startswith("bad-bad_quantity")}
    assert qtys == {0, -1, MAX_QUANTITY + 1, 10**6}
    prices = [r["price"] for r in typed_bad if r["event_id"].startswith("bad-bad_price")]
    assert any(math.isnan(p) for p in prices) and any(p == math.inf for p in prices)
    assert any(p < 0 for p in prices)
    days = {r["event_time"].date() for r in typed_bad if r["event_id"].startswith("bad-out_of_day")}
    assert days == {DATE - dt.timedelta(days=1), DATE + dt.timedelta(days=1)}
    missing = {r["event_type"] for r in typed_bad if r["event_id"].startswith("bad-missing_product_id")}
    assert missing == {"product_view", "purchase"}
    # typed tables with bad rows keep the types (nullability relaxed for null user_id/event_time)
    assert [f.type for f in with_bad.schema] == [f.type for f in RAW_EVENT_SCHEMA]
    assert with_bad.schema.names == RAW_EVENT_SCHEMA.names

    text_bad = text_with_bad.filter(pc.starts_with(text_with_bad["event_id"], "bad-")).to_pylist()
    times = {r["event_time"] for r in text_bad if r["event_id"].startswith("bad-bad_event_time")}
    assert {None, "not-a-time", "2026-13-45T99:00:00Z"} <= times
    prices = {r["price"] for r in text_bad if r["event_id"].startswith("bad-bad_price")}
    assert {"abc", "12,50", "nan", "inf"} <= prices
    qtys = {r["quantity"] for r in text_bad if r["event_id"].startswith("bad-bad_quantity")}
    assert {"many", "1.5", "0", "-1", str(MAX_QUANTITY + 1), "1000000"} <= qtys


# --------------------------------------------------------------------------- text format


def test_text_format_all_strings(clean):
    text = generate_events(N_USERS, N_EVENTS, DATE, seed=SEED, text_format=True)
    assert text.schema.names == RAW_EVENT_SCHEMA.names
    assert all(f.type == pa.string() for f in text.schema)
    assert all(ISO_RE.match(t) for t in text["event_time"].to_pylist())
    # same data as the typed table, rendered as text
    for name in ("price", "quantity"):
        assert text[name].null_count == clean[name].null_count
    typed_times = clean["event_time"].to_pylist()
    text_times = text["event_time"].to_pylist()
    for i in range(0, N_EVENTS, 97):
        expected = typed_times[i].strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        assert text_times[i] == expected
    typed_prices = clean["price"].to_pylist()
    for a, b in zip(typed_prices[:2000], text["price"].to_pylist()[:2000]):
        assert (a is None and b is None) or float(b) == a
    assert text.drop_columns(["event_time", "price", "quantity"]).equals(
        clean.drop_columns(["event_time", "price", "quantity"]).cast(
            text.drop_columns(["event_time", "price", "quantity"]).schema
        )
    )


def test_timestamp_text_helper_matches_strftime():
    values = np.array([0, 1, 999_999, 86_399_999_999, 1_796_212_800_123_456, -1_000_001], dtype=np.int64)
    arr = pa.array(values, pa.timestamp("us", tz="UTC"), mask=np.array([0, 0, 0, 0, 0, 1], bool))
    out = gen._timestamps_to_text(arr).to_pylist()
    expected = [
        (dt.datetime(1970, 1, 1, tzinfo=dt.timezone.utc) + dt.timedelta(microseconds=int(v))).strftime(
            "%Y-%m-%dT%H:%M:%S.%fZ"
        )
        for v in values[:5]
    ]
    assert out == expected + [None]


# --------------------------------------------------------------------------- writing


def _read_csv_as_text(path):
    names = RAW_EVENT_SCHEMA.names
    return pacsv.read_csv(
        path,
        convert_options=pacsv.ConvertOptions(
            column_types={n: pa.string() for n in names},
            strings_can_be_null=True,
            quoted_strings_can_be_null=False,
        ),
    )


def test_write_parquet_round_trip(tmp_path, with_bad):
    paths = write_events(with_bad, str(tmp_path / "ev"), fmt="parquet", n_files=3)
    assert [os.path.basename(p) for p in paths] == [f"events-0000{i}.parquet" for i in range(3)]
    parts = [pq.read_table(p) for p in paths]
    assert [t.num_rows for t in parts] == [6666, 6667, 6667]
    back = pa.concat_tables(parts)
    assert back.schema.equals(with_bad.schema, check_metadata=True)
    # NaN prices compare unequal in Table.equals: compare them separately
    assert back.drop_columns(["price"]).equals(with_bad.drop_columns(["price"]))
    np.testing.assert_array_equal(
        back["price"].to_numpy(zero_copy_only=False), with_bad["price"].to_numpy(zero_copy_only=False)
    )
    assert back["price"].is_null().equals(with_bad["price"].is_null())
    # stale files of an earlier run are removed
    paths2 = write_events(with_bad.slice(0, 10), str(tmp_path / "ev"), fmt="parquet")
    assert sorted(os.listdir(tmp_path / "ev")) == ["events-00000.parquet"] and len(paths2) == 1


def test_write_clean_parquet_keeps_schema(tmp_path, clean):
    (path,) = write_events(clean, str(tmp_path), fmt="parquet")
    back = pq.read_table(path)
    assert back.schema.equals(RAW_EVENT_SCHEMA, check_metadata=True)
    assert back.equals(clean)
    assert pq.ParquetFile(path).metadata.num_row_groups == 1


def test_write_csv_round_trip(tmp_path, text_with_bad):
    paths = write_events(text_with_bad, str(tmp_path), fmt="csv", n_files=2)
    with open(paths[0], newline="") as fh:
        assert next(csv.reader(fh)) == RAW_EVENT_SCHEMA.names
    back = pa.concat_tables([_read_csv_as_text(p) for p in paths])
    assert back.equals(text_with_bad.cast(back.schema))


def test_write_jsonl_round_trip(tmp_path, text_with_bad):
    paths = write_events(text_with_bad, str(tmp_path), fmt="jsonl")
    assert [os.path.basename(p) for p in paths] == ["events-00000.jsonl"]
    with open(paths[0], encoding="utf-8") as fh:
        rows = [json.loads(line) for line in fh]
    assert rows == text_with_bad.to_pylist()


def test_write_jsonl_escapes_and_typed_input(tmp_path, clean):
    odd = pa.table({"a": ['x"y\\z', None, "ü", "tab\there"], "b": ["1", "2", None, "4"]})
    (path,) = write_events(odd, str(tmp_path / "odd"), fmt="jsonl")
    with open(path, encoding="utf-8") as fh:
        assert [json.loads(line) for line in fh] == odd.to_pylist()
    # typed tables are written in their text form
    (path,) = write_events(clean.slice(0, 100), str(tmp_path / "typed"), fmt="jsonl")
    with open(path, encoding="utf-8") as fh:
        first = json.loads(fh.readline())
    assert ISO_RE.match(first["event_time"]) and first["event_id"] == "e0000000000"


# --------------------------------------------------------------------------- catalog / generate / CLI


def _read_catalog(paths):
    with open(paths["products"], newline="") as fh:
        products = {r["product_id"]: (r["category"], float(r["price"])) for r in csv.DictReader(fh)}
    with open(paths["categories"]) as fh:
        categories = [line.rstrip("\n") for line in fh]
    return products, categories


def test_catalog_consistent_with_events(tmp_path, clean_rows):
    n_products = max(100, N_USERS // 10)
    paths = write_catalog(str(tmp_path), n_products, SEED)
    assert paths["products"] == str(tmp_path / "catalog" / "products.csv")
    assert paths["categories"] == str(tmp_path / "catalog" / "categories.txt")
    products, categories = _read_catalog(paths)
    assert len(products) == n_products
    assert 20 <= len(categories) <= 50 and len(set(categories)) == len(categories)
    assert {c for c, _ in products.values()} <= set(categories)
    for row in clean_rows:
        if row["product_id"] is not None:
            assert products[row["product_id"]] == (row["category"], row["price"])
    # the catalog depends on the seed only
    paths2 = write_catalog(str(tmp_path / "other"), n_products, SEED + 1)
    assert _read_catalog(paths2)[0] != products


@pytest.mark.parametrize("fmt", ["parquet", "jsonl", "csv"])
def test_generate_writes_events_and_catalog(tmp_path, fmt):
    summary = generate(
        str(tmp_path), n_users=300, n_events=3000, date=DATE, seed=5, bad_rows_fraction=0.02, fmt=fmt, n_files=2
    )
    assert summary["rows"] == 3000 and summary["bad_rows"] == 60
    assert sum(summary["bad_rows_by_reason"].values()) == 60
    assert set(summary["bad_rows_by_reason"]) <= set(DEAD_LETTER_REASONS)
    assert summary["seconds"] >= 0
    assert [os.path.dirname(p) for p in summary["event_files"]] == [str(tmp_path / "events")] * 2
    assert all(p.endswith("." + fmt) for p in summary["event_files"])
    assert os.path.exists(summary["catalog"]["products"]) and os.path.exists(summary["catalog"]["categories"])
    products, _ = _read_catalog(summary["catalog"])
    if fmt == "parquet":
        events = pa.concat_tables([pq.read_table(p) for p in summary["event_files"]]).to_pylist()
    elif fmt == "csv":
        events = pa.concat_tables([_read_csv_as_text(p) for p in summary["event_files"]]).to_pylist()
    else:
        events = []
        for p in summary["event_files"]:
            with open(p) as fh:
                events += [json.loads(line) for line in fh]
    assert len(events) == 3000
    n_bad = 0
    for row in events:
        if row["event_id"].startswith("bad-"):
            n_bad += 1
            reason = row["event_id"].split("-")[1]
            assert summary["bad_rows_by_reason"][reason] > 0
            continue
        if row["product_id"] is not None:
            category, price = products[row["product_id"]]
            assert row["category"] == category and float(row["price"]) == price
    assert n_bad == 60


def test_generate_without_seed_reports_consistent_seed(tmp_path):
    summary = generate(str(tmp_path), n_users=100, n_events=500, date=DATE)
    table = pq.read_table(summary["event_files"][0])
    again = generate_events(100, 500, DATE, seed=summary["seed"])
    assert table.equals(again)


def test_cli(tmp_path, capsys):
    parser = argparse.ArgumentParser()
    add_cli_arguments(parser)
    args = parser.parse_args(
        ["--users", "100", "--events", "1000", "--date", "2026-12-02", "--out", str(tmp_path),
         "--seed", "3", "--bad-rows-fraction", "0.01", "--format", "csv", "--files", "2"]
    )
    assert main(args) == 0
    out = capsys.readouterr().out.strip()
    assert "\n" not in out and "1000 events" in out
    assert sorted(os.listdir(tmp_path / "events")) == ["events-00000.csv", "events-00001.csv"]
    assert sorted(os.listdir(tmp_path / "catalog")) == ["categories.txt", "products.csv"]
    bad = parser.parse_args(["--out", str(tmp_path), "--users", "0"])
    assert main(bad) == 2
    assert "n_users" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parser.parse_args(["--out", str(tmp_path), "--format", "xml"])


def test_rows_are_time_ordered_within_each_user(clean):
    users = clean["user_id"].to_pylist()
    times = np.asarray(clean["event_time"].cast(pa.int64()))
    same_user = np.array(users[1:]) == np.array(users[:-1])
    assert (np.diff(times)[same_user] >= 0).all()
    assert (np.array(users[1:]) >= np.array(users[:-1])).all()
