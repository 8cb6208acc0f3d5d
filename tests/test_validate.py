"""Tests for transforms.validate.validate_batch."""
from __future__ import annotations

import collections
import datetime
import math

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest

import transforms.validate as validate_module
from schemas.events import (
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
from transforms.validate import ValidationResult, parse_iso_timestamps, validate_batch

DAY = datetime.date(2026, 12, 2)
UTC = datetime.timezone.utc
NOON = datetime.datetime(2026, 12, 2, 12, 0, 0, tzinfo=UTC)
# Construction schema: like RAW_EVENT_SCHEMA but every field nullable, so that
# test batches can hold the nulls that validation must catch.
TYPED_SCHEMA = pa.schema([pa.field(f.name, f.type) for f in RAW_EVENT_SCHEMA])
STRING_SCHEMA = pa.schema([pa.field(name, pa.string()) for name in RAW_COLUMNS])


def good_row(i: int = 0, **overrides) -> dict:
    row = dict(
        event_id=f"e{i}",
        user_id=f"u{i % 7}",
        session_id=f"s{i % 3}",
        event_time=NOON + datetime.timedelta(seconds=i),
        event_type="purchase",
        product_id=f"p{i % 5}",
        category="shoes",
        price=12.5,
        quantity=2,
        search_query=None,
        device="ios",
        country="DE",
        referrer=None,
    )
    row.update(overrides)
    return row


def as_text(value):
    """How a CSV/JSONL reader would hand the value over."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, datetime.datetime):
        return value.isoformat().replace("+00:00", "Z")
    return repr(value) if isinstance(value, float) else str(value)


def typed_batch(rows) -> pa.RecordBatch:
    return pa.RecordBatch.from_pylist(rows, schema=TYPED_SCHEMA)


def string_batch(rows) -> pa.RecordBatch:
    return pa.RecordBatch.from_pylist(
        [{k: as_text(v) for k, v in row.items()} for row in rows], schema=STRING_SCHEMA
    )


def run(batch, *, first_row_number=0, source_file="in/events.csv", date=DAY) -> ValidationResult:
    result = validate_batch(batch, date=date, source_file=source_file, first_row_number=first_row_number)
    assert result.valid.schema.equals(VALID_EVENT_SCHEMA, check_metadata=True)
    assert result.dead.schema.equals(DEAD_LETTER_SCHEMA, check_metadata=True)
    assert result.valid.num_rows + result.dead.num_rows == batch.num_rows
    return result


def reasons(result) -> list[str]:
    return result.dead.column("reason").to_pylist()


BUILDERS = pytest.mark.parametrize("build", [typed_batch, string_batch], ids=["typed", "strings"])


# --------------------------------------------------------------------------
# each reason
# --------------------------------------------------------------------------
COMMON_CASES = [
    (dict(user_id=None), REASON_MISSING_USER_ID),
    (dict(user_id=""), REASON_MISSING_USER_ID),
    (dict(user_id="   "), REASON_MISSING_USER_ID),
    (dict(user_id="\t\n"), REASON_MISSING_USER_ID),
    (dict(event_time=None), REASON_BAD_EVENT_TIME),
    (dict(event_time=datetime.datetime(2026, 12, 1, 23, 59, 59, 999999, tzinfo=UTC)), REASON_OUT_OF_DAY),
    (dict(event_time=datetime.datetime(2026, 12, 3, 0, 0, tzinfo=UTC)), REASON_OUT_OF_DAY),
    (dict(event_time=datetime.datetime(2025, 12, 2, 12, 0, tzinfo=UTC)), REASON_OUT_OF_DAY),
    (dict(event_type="click"), REASON_UNKNOWN_EVENT_TYPE),
    (dict(event_type="Purchase"), REASON_UNKNOWN_EVENT_TYPE),
    (dict(event_type="purchase "), REASON_UNKNOWN_EVENT_TYPE),
    (dict(event_type=""), REASON_UNKNOWN_EVENT_TYPE),
    (dict(event_type=None), REASON_UNKNOWN_EVENT_TYPE),
    (dict(product_id=None), REASON_MISSING_PRODUCT_ID),
    (dict(product_id=""), REASON_MISSING_PRODUCT_ID),
    (dict(product_id="  "), REASON_MISSING_PRODUCT_ID),
    (dict(event_type="add_to_cart", product_id=None), REASON_MISSING_PRODUCT_ID),
    (dict(price=-0.01), REASON_BAD_PRICE),
    (dict(price=float("nan")), REASON_BAD_PRICE),
    (dict(price=float("inf")), REASON_BAD_PRICE),
    (dict(price=float("-inf")), REASON_BAD_PRICE),
    (dict(quantity=0), REASON_BAD_QUANTITY),
    (dict(quantity=-3), REASON_BAD_QUANTITY),
    (dict(quantity=MAX_QUANTITY + 1), REASON_BAD_QUANTITY),
]

VALID_CASES = [
    dict(),
    dict(event_type="page_view", product_id=None),
    dict(event_type="search", product_id="", search_query="red shoes"),
    dict(price=None),
    dict(price=0.0),
    dict(quantity=None),
    dict(quantity=1),
    dict(quantity=MAX_QUANTITY),
    dict(price=None, quantity=None),
    dict(event_time=datetime.datetime(2026, 12, 2, 0, 0, tzinfo=UTC)),
    dict(event_time=datetime.datetime(2026, 12, 2, 23, 59, 59, 999999, tzinfo=UTC)),
    dict(user_id=" padded "),
]


@BUILDERS
@pytest.mark.parametrize("overrides,reason", COMMON_CASES)
def test_each_reason(build, overrides, reason):
    result = run(build([good_row(0), good_row(1, **overrides), good_row(2)]), first_row_number=40)
    assert reasons(result) == [reason]
    assert result.dead.column("row_number").to_pylist() == [41]
    assert result.dead.column("source_file").to_pylist() == ["in/events.csv"]
    assert result.valid.column("event_id").to_pylist() == ["e0", "e2"]


@BUILDERS
@pytest.mark.parametrize("overrides", VALID_CASES)
def test_valid_variants(build, overrides):
    result = run(build([good_row(5, **overrides)]))
    assert result.dead.num_rows == 0, result.dead.to_pylist()
    assert result.valid.num_rows == 1


@pytest.mark.parametrize(
    "overrides,reason",
    [
        (dict(event_time="not-a-time"), REASON_BAD_EVENT_TIME),
        (dict(event_time="2026-12-02"), REASON_BAD_EVENT_TIME),  # date only
        (dict(event_time="2026-12-02T12"), REASON_BAD_EVENT_TIME),  # hour only
        (dict(event_time="2026-12-02T25:00:00Z"), REASON_BAD_EVENT_TIME),
        (dict(event_time="2026-02-30T10:00:00Z"), REASON_BAD_EVENT_TIME),
        (dict(event_time="2026-12-02T10:00:00.Z"), REASON_BAD_EVENT_TIME),
        (dict(event_time="2026-12-02T10:00:00+2"), REASON_BAD_EVENT_TIME),
        (dict(event_time="2026-12-02T10:00:00 UTC"), REASON_BAD_EVENT_TIME),
        (dict(event_time="1733140000"), REASON_BAD_EVENT_TIME),  # epoch seconds
        (dict(event_time=""), REASON_BAD_EVENT_TIME),
        (dict(price="abc"), REASON_BAD_PRICE),
        (dict(price="12,50"), REASON_BAD_PRICE),
        (dict(price="12.5.1"), REASON_BAD_PRICE),
        (dict(price="$3"), REASON_BAD_PRICE),
        (dict(price="-3"), REASON_BAD_PRICE),
        (dict(price="nan"), REASON_BAD_PRICE),
        (dict(price="1e999"), REASON_BAD_PRICE),
        (dict(quantity="many"), REASON_BAD_QUANTITY),
        (dict(quantity="1.5"), REASON_BAD_QUANTITY),
        (dict(quantity="0"), REASON_BAD_QUANTITY),
        (dict(quantity="1e9"), REASON_BAD_QUANTITY),
        (dict(quantity="two"), REASON_BAD_QUANTITY),
    ],
)
def test_string_only_reasons(overrides, reason):
    result = run(string_batch([good_row(0), good_row(1, **overrides)]))
    assert reasons(result) == [reason]
    # the dead letter keeps the raw text
    (column, raw), = overrides.items()
    assert result.dead.column(column).to_pylist() == [raw]


@pytest.mark.parametrize(
    "price,expected",
    [("12.5", 12.5), ("-0", -0.0), ("1e3", 1000.0), ("+.5", 0.5), ("7", 7.0), (" 3.25 ", 3.25), ("", None), ("  ", None)],
)
def test_price_strings_that_parse(price, expected):
    result = run(string_batch([good_row(0, price=price, quantity="3")]))
    assert result.dead.num_rows == 0
    assert result.valid.column("price").to_pylist() == [expected]
    assert result.valid.column("amount").to_pylist() == [None if expected is None else expected * 3]


@pytest.mark.parametrize("quantity,expected", [("1", 1), ("2.0", 2), ("1e3", 1000), (" 4 ", 4), ("", None)])
def test_quantity_strings_that_parse(quantity, expected):
    result = run(string_batch([good_row(0, quantity=quantity)]))
    assert result.dead.num_rows == 0
    assert result.valid.column("quantity").to_pylist() == [expected]


def test_float_quantity_column():
    rows = [good_row(i) for i in range(4)]
    batch = typed_batch(rows).set_column(8, "quantity", pa.array([1.0, 1.5, 3.0, None], pa.float64()))
    result = run(batch)
    assert reasons(result) == [REASON_BAD_QUANTITY]
    assert result.dead.column("quantity").to_pylist() == ["1.5"]
    assert result.valid.column("quantity").to_pylist() == [1, 3, None]
    assert result.valid.column("amount").to_pylist() == [12.5, 37.5, 12.5]


def test_other_numeric_types():
    rows = [good_row(i) for i in range(3)]
    batch = typed_batch(rows)
    batch = batch.set_column(7, "price", pa.array([3, 0, -1], pa.int64()))
    batch = batch.set_column(8, "quantity", pa.array([2, 1000, 1001], pa.uint16()))
    result = run(batch)
    assert reasons(result) == [REASON_BAD_PRICE]
    assert result.valid.column("price").to_pylist() == [3.0, 0.0]
    assert result.valid.column("quantity").to_pylist() == [2, 1000]

    batch = typed_batch(rows[:2])
    batch = batch.set_column(7, "price", pa.array([1, 2], pa.decimal128(10, 2)).cast(pa.decimal128(10, 2)))
    batch = batch.set_column(8, "quantity", pa.array([True, None], pa.bool_()))
    result = run(batch)
    assert reasons(result) == [REASON_BAD_QUANTITY]  # a boolean is no quantity
    assert result.valid.column("price").to_pylist() == [2.0]


# --------------------------------------------------------------------------
# order of reasons
# --------------------------------------------------------------------------
@BUILDERS
def test_first_failing_reason_wins(build):
    broken = dict(
        user_id=" ",
        event_time=None,
        event_type="click",
        product_id=None,
        price=-1.0,
        quantity=0,
    )
    order = [
        ("user_id", REASON_MISSING_USER_ID, "u"),
        ("event_time", REASON_BAD_EVENT_TIME, NOON - datetime.timedelta(days=1)),
        ("event_time", REASON_OUT_OF_DAY, NOON),
        ("event_type", REASON_UNKNOWN_EVENT_TYPE, "purchase"),
        ("product_id", REASON_MISSING_PRODUCT_ID, "p"),
        ("price", REASON_BAD_PRICE, 1.0),
        ("quantity", REASON_BAD_QUANTITY, 1),
    ]
    rows = []
    overrides = dict(broken)
    for column, _, fix in order:
        rows.append(good_row(len(rows), **overrides))
        overrides[column] = fix
    rows.append(good_row(len(rows), **overrides))
    result = run(build(rows))
    assert reasons(result) == [reason for _, reason, _ in order]
    assert result.valid.num_rows == 1


# --------------------------------------------------------------------------
# valid rows: exact values and types
# --------------------------------------------------------------------------
def test_valid_rows_pass_through_unchanged():
    rows = [
        good_row(i, event_type=EVENT_TYPES[i % len(EVENT_TYPES)], quantity=None if i % 4 == 0 else i % 9 + 1,
                 price=None if i % 5 == 0 else round(i * 1.37, 2), search_query="q" if i % 2 else None)
        for i in range(50)
    ]
    batch = typed_batch(rows)
    result = run(batch)
    assert result.dead.num_rows == 0
    for name in RAW_COLUMNS:
        assert result.valid.column(name).equals(batch.column(name)), name
    amount = [None if r["price"] is None else r["price"] * (r["quantity"] or 1) for r in rows]
    assert result.valid.column("amount").to_pylist() == amount


def test_string_rows_cast_to_valid_schema():
    rows = [good_row(i, price=None if i == 1 else 0.1 * i, quantity=None if i == 2 else i + 1) for i in range(5)]
    result = run(string_batch(rows))
    assert result.dead.num_rows == 0
    expected = pa.RecordBatch.from_pylist(rows, schema=TYPED_SCHEMA)
    for name in RAW_COLUMNS:
        assert result.valid.column(name).equals(expected.column(name).cast(VALID_EVENT_SCHEMA.field(name).type)), name


def test_entirely_valid_batch_and_empty_batch():
    batch = typed_batch([good_row(i) for i in range(1000)])
    result = run(batch, first_row_number=10**9)
    assert result.valid.num_rows == 1000 and result.dead.num_rows == 0
    empty = run(batch.slice(0, 0))
    assert empty.valid.num_rows == 0 and empty.dead.num_rows == 0


def test_non_string_ids_are_cast_to_string():
    batch = typed_batch([good_row(i) for i in range(3)])
    batch = batch.set_column(1, "user_id", pa.array([7, 0, None], pa.int64()))
    batch = batch.set_column(5, "product_id", pa.array([11, 12, 13], pa.int32()))
    result = run(batch)
    assert reasons(result) == [REASON_MISSING_USER_ID]
    assert result.valid.column("user_id").to_pylist() == ["7", "0"]
    assert result.valid.column("product_id").to_pylist() == ["11", "12"]
    assert result.dead.column("product_id").to_pylist() == ["13"]


def test_other_string_encodings_and_column_order():
    rows = [good_row(i) for i in range(4)]
    table = pa.Table.from_batches([typed_batch(rows)])
    table = table.set_column(1, "user_id", table.column("user_id").cast(pa.large_string()))
    table = table.set_column(4, "event_type", pc.dictionary_encode(table.column("event_type")))
    # shuffle the column order, add an extra column, drop optional ones
    names = ["extra"] + list(reversed([n for n in RAW_COLUMNS if n not in ("referrer", "country")]))
    table = table.append_column("extra", pa.array([1, 2, 3, 4])).select(names)
    result = run(table.to_batches()[0])
    assert result.valid.num_rows == 4
    assert result.valid.column("user_id").to_pylist() == [r["user_id"] for r in rows]
    assert result.valid.column("country").null_count == 4


def test_missing_required_column_means_dead_rows():
    batch = typed_batch([good_row(0)]).drop_columns(["user_id"])
    assert reasons(run(batch)) == [REASON_MISSING_USER_ID]


def test_null_event_id_gets_synthetic_id():
    result = run(string_batch([good_row(0, event_id=None), good_row(1)]), first_row_number=7, source_file="gs://b/x.csv")
    assert result.valid.column("event_id").to_pylist() == ["missing:gs://b/x.csv:7", "e1"]
    assert result.valid.column("event_id").null_count == 0


# --------------------------------------------------------------------------
# timestamps
# --------------------------------------------------------------------------
@pytest.mark.parametrize(
    "text,expected",
    [
        ("2026-12-02T13:45:01Z", datetime.datetime(2026, 12, 2, 13, 45, 1)),
        ("2026-12-02T13:45:01z", datetime.datetime(2026, 12, 2, 13, 45, 1)),
        ("2026-12-02 13:45:01.123456", datetime.datetime(2026, 12, 2, 13, 45, 1, 123456)),
        ("2026-12-02T13:45:01.5", datetime.datetime(2026, 12, 2, 13, 45, 1, 500000)),
        ("2026-12-02T13:45:01.123456789Z", datetime.datetime(2026, 12, 2, 13, 45, 1, 123456)),
        ("2026-12-02T13:45:01+00:00", datetime.datetime(2026, 12, 2, 13, 45, 1)),
        ("2026-12-02T13:45:01+02:00", datetime.datetime(2026, 12, 2, 11, 45, 1)),
        ("2026-12-02T13:45:01.25-05:30", datetime.datetime(2026, 12, 2, 19, 15, 1, 250000)),
        ("2026-12-02T13:45:01+0200", datetime.datetime(2026, 12, 2, 11, 45, 1)),
        ("2026-12-02T13:45:01-03", datetime.datetime(2026, 12, 2, 16, 45, 1)),
        ("2026-12-02T13:45", datetime.datetime(2026, 12, 2, 13, 45)),
        (" 2026-12-02T13:45:01Z ", datetime.datetime(2026, 12, 2, 13, 45, 1)),
        ("2024-02-29T00:00:00", datetime.datetime(2024, 2, 29)),
        ("1969-12-31T23:59:59.999999Z", datetime.datetime(1969, 12, 31, 23, 59, 59, 999999)),
        ("2026-12-02", None),
        ("2023-02-29T00:00:00", None),
        ("2026-13-02T00:00:00", None),
        ("2026-12-02T00:60:00", None),
        ("2026-12-02T00:00:60", None),
        ("2026-12-02T00:00:00+24:00", None),
        ("2026-12-02T00:00:00.1234567890", None),
        ("2026-12-02X00:00:00", None),
        ("2026-12-02T00:00:00ZZ", None),
        ("２０２６-12-02T00:00:00", None),
        ("", None),
        (None, None),
    ],
)
def test_parse_iso_timestamps(text, expected):
    micros, ok = parse_iso_timestamps(pa.array(["pad", text, "2026-12-02T00:00:00Z"], pa.string()).slice(1, 1))
    if expected is None:
        assert not ok[0]
    else:
        assert ok[0]
        epoch = datetime.datetime(1970, 1, 1)
        assert int(micros[0]) == (expected - epoch) // datetime.timedelta(microseconds=1)


def test_offsets_move_rows_across_the_day_boundary():
    times = [
        "2026-12-02T01:30:00+02:00",  # 2026-12-01T23:30Z
        "2026-12-02T23:30:00-01:00",  # 2026-12-03T00:30Z
        "2026-12-01T23:30:00-01:00",  # 2026-12-02T00:30Z
        "2026-12-03T00:59:59+01:00",  # 2026-12-02T23:59:59Z
    ]
    result = run(string_batch([good_row(i, event_time=t) for i, t in enumerate(times)]))
    assert reasons(result) == [REASON_OUT_OF_DAY, REASON_OUT_OF_DAY]
    assert result.valid.column("event_time").to_pylist() == [
        datetime.datetime(2026, 12, 2, 0, 30, tzinfo=UTC),
        datetime.datetime(2026, 12, 2, 23, 59, 59, tzinfo=UTC),
    ]
    assert result.dead.column("event_time").to_pylist() == times[:2]


@pytest.mark.parametrize(
    "ts_type",
    [pa.timestamp("s"), pa.timestamp("ms", tz="UTC"), pa.timestamp("us", tz="America/New_York"), pa.timestamp("ns")],
)
def test_timestamp_units_and_zones(ts_type):
    instants = [
        datetime.datetime(2026, 12, 2, 0, 0, tzinfo=UTC),
        datetime.datetime(2026, 12, 2, 23, 59, 59, tzinfo=UTC),
        datetime.datetime(2026, 12, 3, 0, 0, tzinfo=UTC),
        datetime.datetime(2026, 12, 1, 23, 59, 59, tzinfo=UTC),
    ]
    naive = ts_type.tz is None
    values = pa.array([t.replace(tzinfo=None) if naive else t for t in instants], pa.timestamp("us", tz=None if naive else "UTC"))
    values = values.cast(ts_type)
    batch = typed_batch([good_row(i) for i in range(4)]).set_column(3, "event_time", values)
    result = run(batch)
    assert reasons(result) == [REASON_OUT_OF_DAY, REASON_OUT_OF_DAY]
    assert result.valid.column("event_time").to_pylist() == instants[:2]
    suffix = "" if naive else "Z"
    fraction = {"s": "", "ms": ".000", "us": ".000000", "ns": ".000000000"}[ts_type.unit]
    assert result.dead.column("event_time").to_pylist() == [
        f"2026-12-03T00:00:00{fraction}{suffix}",
        f"2026-12-01T23:59:59{fraction}{suffix}",
    ]


def test_sub_microsecond_timestamps_are_truncated():
    values = pa.array([1_796_212_800_123_456_789], pa.timestamp("ns", tz="UTC"))  # 2026-12-02T12:00:00.123456789Z
    batch = typed_batch([good_row(0)]).set_column(3, "event_time", values)
    result = run(batch)
    assert result.valid.column("event_time").cast(pa.int64()).to_pylist() == [1_796_212_800_123_456]


@pytest.mark.parametrize(
    "values",
    [
        pa.array([1_796_212_800, 1_796_212_800_000_000], pa.int64()),
        pa.array([1.7962128e9, 2.0], pa.float64()),
        pa.array([datetime.date(2026, 12, 2)] * 2, pa.date32()),
        pa.array([None, None], pa.null()),
    ],
    ids=["int", "float", "date", "null"],
)
def test_event_time_types_that_are_never_accepted(values):
    batch = typed_batch([good_row(0), good_row(1)]).set_column(3, "event_time", values)
    assert reasons(run(batch)) == [REASON_BAD_EVENT_TIME] * 2


# --------------------------------------------------------------------------
# dead letters
# --------------------------------------------------------------------------
def test_dead_letters_hold_original_values_as_strings():
    rows = [
        good_row(0, user_id=None, price=3.0, quantity=7, event_time=datetime.datetime(2026, 12, 2, 8, 0, 0, 250000, tzinfo=UTC)),
        good_row(1, event_type="teleport", price=0.1, quantity=None, search_query="ünïcode"),
        good_row(2, price=float("nan")),
    ]
    result = run(typed_batch(rows), first_row_number=100, source_file="gs://bucket/day/part-1.parquet")
    dead = result.dead.to_pylist()
    assert [d["reason"] for d in dead] == [REASON_MISSING_USER_ID, REASON_UNKNOWN_EVENT_TYPE, REASON_BAD_PRICE]
    assert [d["row_number"] for d in dead] == [100, 101, 102]
    assert {d["source_file"] for d in dead} == {"gs://bucket/day/part-1.parquet"}
    assert dead[0]["user_id"] is None
    assert dead[0]["event_time"] == "2026-12-02T08:00:00.250000Z"
    assert dead[0]["price"] == "3.0" and dead[0]["quantity"] == "7"
    assert dead[1]["event_type"] == "teleport" and dead[1]["price"] == "0.1" and dead[1]["quantity"] is None
    assert dead[1]["search_query"] == "ünïcode"
    assert dead[2]["price"] == "nan"
    assert dead[2]["event_id"] == "e2" and dead[2]["session_id"] == "s2"


def test_dead_letters_of_string_rows_are_verbatim():
    row = {k: as_text(v) for k, v in good_row(3, user_id="", price="12,50", quantity="many").items()}
    result = run(string_batch([row]))
    (dead,) = result.dead.to_pylist()
    for name in RAW_COLUMNS:
        assert dead[name] == row[name], name


def test_dead_letters_render_exotic_types():
    batch = typed_batch([good_row(0, user_id=None)])
    batch = batch.set_column(6, "category", pa.array([{"a": 1}], pa.struct([("a", pa.int64())])))
    batch = batch.set_column(10, "device", pa.array([True]))
    (dead,) = run(batch).dead.to_pylist()
    assert dead["category"] == '{"a":1}'
    assert dead["device"] == "true"


# --------------------------------------------------------------------------
# the invariant
# --------------------------------------------------------------------------
class _LosingNumpy:
    """numpy stand-in whose flatnonzero drops an index (to break the count)."""

    def __getattr__(self, name):
        return getattr(np, name)

    @staticmethod
    def flatnonzero(a):
        return np.flatnonzero(a)[1:]


def test_invariant_is_asserted(monkeypatch):
    batch = typed_batch([good_row(0, user_id=None), good_row(1, user_id=None), good_row(2)])
    monkeypatch.setattr(validate_module, "np", _LosingNumpy())
    with pytest.raises(AssertionError, match=r"1 valid \+ 1 dead != 3"):
        validate_batch(batch, date=DAY, source_file="f", first_row_number=0)


# --------------------------------------------------------------------------
# property-style: random mixes of good and bad rows
# --------------------------------------------------------------------------
def _injectors(rng, strings: bool):
    bad_time = [None] + (["not-a-time", "2026-12-02", "12/02/2026 10:00"] if strings else [])
    bad_price = [-0.5, float("nan"), float("inf")] + (["abc", "12,50", "1.2.3"] if strings else [])
    bad_qty = [0, -2, MAX_QUANTITY + 1] + (["many", "1.5", "NaN"] if strings else [])
    pick = lambda options: options[rng.integers(len(options))]  # noqa: E731
    return {
        REASON_MISSING_USER_ID: lambda: dict(user_id=pick([None, "", "  "])),
        REASON_BAD_EVENT_TIME: lambda: dict(event_time=pick(bad_time)),
        REASON_OUT_OF_DAY: lambda: dict(
            event_time=NOON + datetime.timedelta(hours=int(pick([-13, 12, 36, -24 * 400])))
        ),
        REASON_UNKNOWN_EVENT_TYPE: lambda: dict(event_type=pick([None, "click", "PURCHASE", " search"])),
        REASON_MISSING_PRODUCT_ID: lambda: dict(
            event_type=pick(list(PRODUCT_EVENT_TYPES)), product_id=pick([None, "", " "])
        ),
        REASON_BAD_PRICE: lambda: dict(price=pick(bad_price)),
        REASON_BAD_QUANTITY: lambda: dict(quantity=pick(bad_qty)),
    }


@BUILDERS
@pytest.mark.parametrize("seed", range(4))
def test_random_mixes_count_per_reason(build, seed):
    rng = np.random.default_rng(seed)
    injectors = _injectors(rng, strings=build is string_batch)
    choices = [None] + list(injectors)
    n = int(rng.integers(200, 3000))
    first = int(rng.integers(0, 10**6))
    rows, injected = [], []
    for i in range(n):
        reason = choices[rng.integers(len(choices))] if rng.random() < 0.4 else None
        overrides = dict(
            event_type=EVENT_TYPES[rng.integers(len(EVENT_TYPES))],
            price=None if rng.random() < 0.2 else float(rng.integers(0, 10_000)) / 100,
            quantity=None if rng.random() < 0.2 else int(rng.integers(1, MAX_QUANTITY + 1)),
            event_time=NOON + datetime.timedelta(microseconds=int(rng.integers(-12 * 3600e6, 12 * 3600e6))),
        )
        if reason is not None:
            overrides.update(injectors[reason]())
        rows.append(good_row(i, **overrides))
        injected.append(reason)
    result = run(build(rows), first_row_number=first)

    expected = collections.Counter(r for r in injected if r is not None)
    assert collections.Counter(reasons(result)) == expected
    bad_positions = [i for i, r in enumerate(injected) if r is not None]
    assert result.dead.column("row_number").to_pylist() == [first + i for i in bad_positions]
    assert result.dead.column("reason").to_pylist() == [injected[i] for i in bad_positions]
    good = [rows[i] for i, r in enumerate(injected) if r is None]
    assert result.valid.column("event_id").to_pylist() == [r["event_id"] for r in good]
    assert result.valid.column("event_time").to_pylist() == [r["event_time"] for r in good]
    prices = result.valid.column("price").to_pylist()
    for row, price, amount in zip(good, prices, result.valid.column("amount").to_pylist()):
        assert price == row["price"]
        if price is None:
            assert amount is None
        else:
            assert math.isclose(amount, price * (row["quantity"] or 1))


def test_float_typed_ids_render_like_ints():
    batch = typed_batch([good_row(i) for i in range(3)])
    batch = batch.set_column(1, "user_id", pa.array([123.0, 4.5, float("nan")], pa.float64()))
    result = run(batch)
    assert result.valid.column("user_id").to_pylist() == ["123", "4.5"]
    assert reasons(result) == [REASON_MISSING_USER_ID]  # NaN is pandas' null
