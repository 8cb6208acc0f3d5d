"""Tests for transforms.readers (and readers + validation end to end)."""
from __future__ import annotations

import collections
import datetime
import gzip
import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from schemas.events import (
    DEAD_LETTER_SCHEMA,
    RAW_COLUMNS,
    REASON_BAD_EVENT_TIME,
    REASON_BAD_PRICE,
    REASON_BAD_QUANTITY,
    REASON_MALFORMED_ROW,
    REASON_MISSING_USER_ID,
    REASON_OUT_OF_DAY,
)
from transforms.readers import (
    MALFORMED_TEXT_LIMIT,
    InputError,
    detect_format,
    expand_inputs,
    preflight,
    read_batches,
)
from transforms.validate import validate_batch

DAY = datetime.date(2026, 12, 2)
UTC = datetime.timezone.utc
HEADER = ["event_id", "user_id", "session_id", "event_time", "event_type", "product_id", "price", "quantity"]


def csv_line(i, **overrides):
    row = dict(
        event_id=f"e{i}", user_id=f"u{i % 5}", session_id="s1", event_time=f"2026-12-02T10:00:{i % 60:02d}Z",
        event_type="purchase", product_id="p1", price="9.99", quantity="2",
    )
    row.update(overrides)
    return ",".join("" if row[c] is None else str(row[c]) for c in HEADER)


def write_csv(path, lines, header=HEADER):
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "wt", newline="") as f:
        f.write(",".join(header) + "\n" + "".join(line + "\n" for line in lines))
    return str(path)


def json_obj(i, **overrides):
    obj = dict(
        event_id=f"e{i}", user_id=f"u{i % 5}", event_time=f"2026-12-02T10:00:{i % 60:02d}Z",
        event_type="purchase", product_id="p1", price=9.99, quantity=2,
    )
    obj.update(overrides)
    return obj


def write_jsonl(path, lines):
    text = "".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines)
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "wt") as f:
        f.write(text)
    return str(path)


def parquet_table(n, start=0):
    return pa.table(
        {
            "event_id": [f"e{i}" for i in range(start, start + n)],
            "user_id": [f"u{i % 7}" for i in range(start, start + n)],
            "event_time": pa.array(
                [datetime.datetime(2026, 12, 2, 9, 0, tzinfo=UTC) + datetime.timedelta(seconds=i) for i in range(n)],
                pa.timestamp("us", tz="UTC"),
            ),
            "event_type": ["page_view"] * n,
            "price": pa.array([float(i) for i in range(n)]),
            "unrelated": pa.array(np.arange(n)),
        }
    )


def collect(path, **kwargs):
    return list(read_batches(path, **kwargs))


def rows_and_numbers(batches):
    """[(row_number, row dict)] of parsed rows, [(row_number, text)] of malformed ones."""
    rows, malformed = [], []
    for batch, first, bad in batches:
        assert batch.schema.names == list(RAW_COLUMNS)
        for offset, row in enumerate(batch.to_pylist()):
            rows.append((first + offset, row))
        if bad is not None:
            assert bad.schema.equals(DEAD_LETTER_SCHEMA, check_metadata=True)
            assert set(bad.column("reason").to_pylist()) == {REASON_MALFORMED_ROW}
            malformed += zip(bad.column("row_number").to_pylist(), bad.column("event_id").to_pylist())
    return rows, malformed


# --------------------------------------------------------------------------
# formats and paths
# --------------------------------------------------------------------------
@pytest.mark.parametrize(
    "name,fmt",
    [
        ("a.parquet", "parquet"), ("a.pq", "parquet"), ("dir/A.PARQUET", "parquet"),
        ("a.jsonl", "jsonl"), ("a.json", "jsonl"), ("a.ndjson", "jsonl"), ("a.jsonl.gz", "jsonl"),
        ("a.csv", "csv"), ("gs://bucket/x/a.csv.gz", "csv"),
    ],
)
def test_detect_format(name, fmt):
    assert detect_format(name) == fmt


@pytest.mark.parametrize("name", ["a.txt", "a.parquet.gz", "a.csv.bz2", "csv", "a.gz", "a.avro"])
def test_detect_format_rejects(name):
    with pytest.raises(InputError, match="unknown input format"):
        detect_format(name)


def test_expand_inputs(tmp_path):
    files = ["a.parquet", "sub/b.csv", "sub/deeper/c.jsonl.gz", "_tmp/x.csv", ".hidden/y.csv", "sub/.z.csv",
             "_SUCCESS", "notes.txt", "other/d.csv"]
    for name in files:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"")
    d = str(tmp_path)
    assert expand_inputs([d]) == [f"{d}/a.parquet", f"{d}/other/d.csv", f"{d}/sub/b.csv", f"{d}/sub/deeper/c.jsonl.gz"]
    # globs keep unknown extensions (preflight reports them) but skip _/. names
    assert expand_inputs([f"{d}/*"]) == [f"{d}/a.parquet", f"{d}/notes.txt"]
    assert expand_inputs([f"{d}/**.csv"]) == [f"{d}/other/d.csv", f"{d}/sub/b.csv"]
    assert expand_inputs([f"{d}/sub/*.csv", f"{d}/sub/b.csv", f"{d}/a.parquet"]) == [f"{d}/a.parquet", f"{d}/sub/b.csv"]
    assert expand_inputs([f"{d}/nothing*.csv", f"{d}/other"]) == [f"{d}/other/d.csv"]
    with pytest.raises(InputError, match="no input files"):
        expand_inputs([f"{d}/nothing*.csv", f"{d}/missing.parquet"])


# --------------------------------------------------------------------------
# preflight
# --------------------------------------------------------------------------
def test_preflight_ok(tmp_path):
    p1 = str(tmp_path / "a.parquet")
    pq.write_table(parquet_table(5), p1)
    p2 = write_csv(tmp_path / "b.csv.gz", [csv_line(0)])
    p3 = write_jsonl(tmp_path / "c.jsonl", [json_obj(0)])
    p4 = write_jsonl(tmp_path / "d.jsonl", [])  # empty JSONL: nothing to check
    info = preflight([p1, p2, p3, p4])
    assert info == {"files": 4, "bytes": sum(os.path.getsize(p) for p in (p1, p2, p3, p4))}


@pytest.mark.parametrize("fmt", ["parquet", "csv", "jsonl"])
def test_preflight_missing_required_column(tmp_path, fmt):
    path = str(tmp_path / f"events.{fmt}")
    if fmt == "parquet":
        pq.write_table(parquet_table(3).drop_columns(["event_type"]), path)
    elif fmt == "csv":
        write_csv(path, [], header=[c for c in HEADER if c != "event_type"])
    else:
        write_jsonl(path, [{k: v for k, v in json_obj(0).items() if k != "event_type"}])
    with pytest.raises(InputError, match=rf"events\.{fmt}.*'event_type'"):
        preflight([path])
    with pytest.raises(InputError, match=rf"events\.{fmt}.*'event_type'"):
        collect(path)


def test_preflight_column_mapping(tmp_path):
    path = write_csv(tmp_path / "m.csv", [], header=["id", "shopper", "ts", "kind"])
    mapping = {"event_id": "id", "user_id": "shopper", "event_time": "ts", "event_type": "kind"}
    assert preflight([path], column_mapping=mapping)["files"] == 1
    with pytest.raises(InputError, match=r"m\.csv.*'user_id'"):
        preflight([path])
    with pytest.raises(InputError, match=r"m\.csv.*'customer' \(mapped to 'user_id'\)"):
        preflight([path], column_mapping={**mapping, "user_id": "customer"})
    with pytest.raises(InputError, match="unknown canonical column"):
        preflight([path], column_mapping={**mapping, "userid": "shopper"})


@pytest.mark.parametrize(
    "name,content",
    [
        ("garbage.parquet", os.urandom(2048)),
        ("empty.parquet", b""),
        ("empty.csv", b""),
        ("broken.csv.gz", b"this is not gzip"),
        ("broken.jsonl", b"{not json\n[1, 2]\n"),
    ],
)
def test_unreadable_files(tmp_path, name, content):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(InputError, match=name.replace(".", r"\.")):
        preflight([str(path)])
    if name != "broken.jsonl":  # a JSONL file of malformed lines is readable
        with pytest.raises(InputError, match=name.replace(".", r"\.")):
            collect(str(path))


def test_preflight_unknown_format(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("hello")
    with pytest.raises(InputError, match="notes.txt"):
        preflight([str(path)])


# --------------------------------------------------------------------------
# parquet
# --------------------------------------------------------------------------
def test_parquet_batches_columns_and_row_numbers(tmp_path):
    path = str(tmp_path / "p.parquet")
    pq.write_table(parquet_table(25), path, row_group_size=10)
    batches = collect(path, batch_rows=4)
    assert all(bad is None for _, _, bad in batches)
    assert all(b.num_rows <= 4 for b, _, _ in batches)
    rows, _ = rows_and_numbers(batches)
    assert [n for n, _ in rows] == list(range(25))
    assert [r["event_id"] for _, r in rows] == [f"e{i}" for i in range(25)]
    batch = batches[0][0]
    assert batch.schema.field("event_time").type == pa.timestamp("us", tz="UTC")
    assert batch.column("price").type == pa.float64()
    assert batch.column("quantity").type == pa.int32() and batch.column("quantity").null_count == batch.num_rows
    assert batch.column("session_id").type == pa.string()


def test_parquet_reads_only_needed_columns(tmp_path, monkeypatch):
    path = str(tmp_path / "p.parquet")
    pq.write_table(parquet_table(5), path)
    seen = {}
    original = pq.ParquetFile.iter_batches

    def spy(self, *args, **kwargs):
        seen["columns"] = kwargs.get("columns")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(pq.ParquetFile, "iter_batches", spy)
    collect(path)
    assert set(seen["columns"]) == {"event_id", "user_id", "event_time", "event_type", "price"}


def test_parquet_column_mapping_and_types(tmp_path):
    table = parquet_table(6).rename_columns(["id", "customer", "ts", "kind", "amount_eur", "unrelated"])
    table = table.set_column(2, "ts", table.column("ts").cast(pa.timestamp("ns")))
    table = table.append_column("user_id", pa.array(["WRONG"] * 6))  # not the mapped source
    path = str(tmp_path / "m.parquet")
    pq.write_table(table, path)
    mapping = {"event_id": "id", "user_id": "customer", "event_time": "ts", "event_type": "kind", "price": "amount_eur"}
    ((batch, first, bad),) = collect(path, column_mapping=mapping)
    assert first == 0 and bad is None
    assert batch.column("user_id").to_pylist() == [f"u{i % 7}" for i in range(6)]
    assert batch.column("event_time").type == pa.timestamp("ns")
    result = validate_batch(batch, date=DAY, source_file=path, first_row_number=first)
    assert result.valid.num_rows == 6
    assert result.valid.column("price").to_pylist() == [float(i) for i in range(6)]


def test_parquet_corrupted_mid_read(tmp_path):
    path = str(tmp_path / "mid.parquet")
    pq.write_table(parquet_table(4000), path, row_group_size=1000, compression="snappy")
    column = pq.ParquetFile(path).metadata.row_group(2).column(0)
    data = bytearray(open(path, "rb").read())
    start, size = column.data_page_offset, column.total_compressed_size
    data[start + 10: start + size - 5] = b"\xff" * (size - 15)
    open(path, "wb").write(bytes(data))
    preflight([path])  # the footer is fine
    seen = []
    with pytest.raises(InputError, match=r"mid\.parquet"):
        for batch, first, _ in read_batches(path, batch_rows=1000):
            seen.append(first)
    assert seen == [0, 1000]


# --------------------------------------------------------------------------
# CSV
# --------------------------------------------------------------------------
def test_csv_all_strings_nulls_and_values(tmp_path):
    path = write_csv(tmp_path / "a.csv", [
        csv_line(0),
        csv_line(1, user_id="", price="", quantity=""),
        csv_line(2, user_id="  ", price="abc", quantity="many", event_time="not-a-time"),
        '"e3","u3","s,1","2026-12-02T10:00:03Z","search","","1e3","3"',
    ])
    ((batch, first, bad),) = collect(path)
    assert first == 0 and bad is None
    for name in RAW_COLUMNS:
        assert batch.schema.field(name).type == pa.string()
    assert batch.column("user_id").to_pylist() == ["u0", None, "  ", "u3"]
    assert batch.column("session_id").to_pylist() == ["s1", "s1", "s1", "s,1"]
    assert batch.column("price").to_pylist() == ["9.99", None, "abc", "1e3"]
    assert batch.column("category").null_count == 4
    result = validate_batch(batch, date=DAY, source_file=path, first_row_number=first)
    assert result.dead.column("reason").to_pylist() == [REASON_MISSING_USER_ID, REASON_MISSING_USER_ID]
    assert result.valid.column("price").to_pylist() == [9.99, 1000.0]


def test_csv_malformed_rows_keep_exact_row_numbers(tmp_path):
    lines, expected_bad = [], {}
    for i in range(23):
        if i % 5 == 3:
            lines.append(csv_line(i) + ",surplus")
            expected_bad[i] = lines[-1]
        elif i == 11:
            lines.append("e11,u11,too-short")
            expected_bad[i] = lines[-1]
        else:
            lines.append(csv_line(i))
    lines.append("x" * (MALFORMED_TEXT_LIMIT + 50))
    expected_bad[23] = "x" * MALFORMED_TEXT_LIMIT
    path = write_csv(tmp_path / "m.csv", lines)
    for batch_rows in (1, 3, 100):
        batches = collect(path, batch_rows=batch_rows)
        rows, malformed = rows_and_numbers(batches)
        assert dict(malformed) == expected_bad
        assert [n for n, _ in rows] == [i for i in range(23) if i not in expected_bad]
        assert all(r["event_id"] == f"e{n}" for n, r in rows)
        assert all(b.num_rows <= batch_rows for b, _, _ in batches)


def test_csv_empty_lines_are_not_counted(tmp_path):
    path = tmp_path / "blank.csv"
    path.write_text(",".join(HEADER) + "\n" + csv_line(0) + "\n\n" + csv_line(1) + "\n\n\n" + "bad,row\n" + csv_line(3) + "\n\n")
    rows, malformed = rows_and_numbers(collect(str(path)))
    assert [(n, r["event_id"]) for n, r in rows] == [(0, "e0"), (1, "e1"), (3, "e3")]
    assert malformed == [(2, "bad,row")]


def test_csv_header_only_and_gzip(tmp_path):
    assert collect(write_csv(tmp_path / "h.csv", [])) == []
    path = write_csv(tmp_path / "z.csv.gz", [csv_line(i) for i in range(5)])
    rows, malformed = rows_and_numbers(collect(path, batch_rows=2))
    assert [n for n, _ in rows] == list(range(5)) and malformed == []


def test_csv_column_mapping(tmp_path):
    header = ["ts", "kind", "shopper", "id", "noise"]
    path = write_csv(tmp_path / "m.csv", ["2026-12-02T01:02:03Z,page_view,42,e0,zzz"], header=header)
    mapping = {"event_time": "ts", "event_type": "kind", "user_id": "shopper", "event_id": "id"}
    ((batch, _, _),) = collect(path, column_mapping=mapping)
    assert batch.to_pylist()[0] == {**dict.fromkeys(RAW_COLUMNS), "event_time": "2026-12-02T01:02:03Z",
                                    "event_type": "page_view", "user_id": "42", "event_id": "e0"}


def test_csv_only_malformed_rows(tmp_path):
    path = write_csv(tmp_path / "bad.csv", ["a,b", "c"])
    ((batch, first, bad),) = collect(path)
    assert batch.num_rows == 0
    assert bad.column("row_number").to_pylist() == [0, 1]
    assert bad.column("event_id").to_pylist() == ["a,b", "c"]


# --------------------------------------------------------------------------
# JSONL
# --------------------------------------------------------------------------
def test_jsonl_fast_path_types_and_blank_lines(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", [json_obj(0), "", "   ", json_obj(3, extra={"x": 1}), json_obj(4, quantity=None)])
    batches = collect(path)
    rows, malformed = rows_and_numbers(batches)
    assert malformed == []
    assert [(n, r["event_id"]) for n, r in rows] == [(0, "e0"), (3, "e3"), (4, "e4")]
    batch = batches[0][0]
    assert batch.column("price").type == pa.float64()
    assert batch.column("event_time").type == pa.string()  # never inferred
    assert [r["quantity"] for _, r in rows] == [2, 2, None]


def test_jsonl_date_only_strings_are_not_inferred_as_timestamps(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [json_obj(0, event_time="2026-12-02", category="2026-12-02")] * 3)
    ((batch, _, _),) = collect(path)
    assert batch.column("event_time").to_pylist() == ["2026-12-02"] * 3
    assert batch.column("category").to_pylist() == ["2026-12-02"] * 3
    result = validate_batch(batch, date=DAY, source_file=path, first_row_number=0)
    assert result.dead.column("reason").to_pylist() == [REASON_BAD_EVENT_TIME] * 3


def test_jsonl_mixed_types_fall_back_to_strings(tmp_path):
    path = write_jsonl(tmp_path / "mixed.jsonl", [
        json_obj(0, price=12.50),
        '{"event_id": "e1", "user_id": 17, "event_time": "2026-12-02T10:00:01+01:00", "event_type": "purchase", '
        '"product_id": "p1", "price": "abc", "quantity": "many"}',
        json_obj(2, event_time="not-a-time", price="1.50", quantity=1.5, device=True, category={"a": [1, 2.5]}),
        json_obj(3, event_time=1796212800),
        json_obj(4, price=3, quantity="7"),
    ])
    ((batch, first, bad),) = collect(path)
    assert bad is None
    assert all(t == pa.string() for t in batch.schema.types)
    rows = batch.to_pylist()
    assert rows[0]["price"] == "12.5" and rows[0]["quantity"] == "2"
    assert rows[1]["user_id"] == "17"
    assert rows[2]["device"] == "true" and rows[2]["category"] == '{"a":[1,2.5]}' and rows[2]["quantity"] == "1.5"
    assert rows[3]["event_time"] == "1796212800"
    result = validate_batch(batch, date=DAY, source_file=path, first_row_number=first)
    assert result.dead.column("reason").to_pylist() == [REASON_BAD_PRICE, REASON_BAD_EVENT_TIME, REASON_BAD_EVENT_TIME]
    assert result.dead.column("row_number").to_pylist() == [1, 2, 3]
    assert result.dead.column("price").to_pylist() == ["abc", "1.50", "9.99"]
    assert result.valid.column("event_id").to_pylist() == ["e0", "e4"]
    assert result.valid.column("quantity").to_pylist() == [2, 7]


def test_jsonl_malformed_lines(tmp_path):
    lines = [json_obj(0), "{broken", "", "[1, 2]", json_obj(4), '"just a string"', json_obj(6),
             '{"a": 1}{"b": 2}', "\xff garbage", json_obj(9)]
    path = tmp_path / "m.jsonl"
    path.write_bytes(b"".join((l if isinstance(l, str) else json.dumps(l)).encode("utf-8", "surrogateescape") + b"\n" for l in lines)
                     + b"\xc3\x28 not utf8\n")
    for batch_rows in (1, 2, 100):
        rows, malformed = rows_and_numbers(collect(str(path), batch_rows=batch_rows))
        assert [(n, r["event_id"]) for n, r in rows] == [(0, "e0"), (4, "e4"), (6, "e6"), (9, "e9")]
        assert [n for n, _ in malformed] == [1, 3, 5, 7, 8, 10]
        assert dict(malformed)[1] == "{broken"


def test_jsonl_missing_key_everywhere_is_an_input_error(tmp_path):
    path = write_jsonl(tmp_path / "k.jsonl", [{k: v for k, v in json_obj(i).items() if k != "event_time"} for i in range(3)])
    with pytest.raises(InputError, match=r"k\.jsonl.*'event_time'"):
        collect(path)
    # a key present only with null values is fine: rows are dead letters
    path = write_jsonl(tmp_path / "n.jsonl", [json_obj(i, user_id=None) for i in range(3)] + ["not json"])
    rows, malformed = rows_and_numbers(collect(path))
    assert len(rows) == 3 and malformed == [(3, "not json")]


def test_jsonl_column_mapping_and_gzip(tmp_path):
    objs = [{"id": f"e{i}", "uid": f"u{i}", "time": "2026-12-02T10:00:00Z", "type": "page_view"} for i in range(4)]
    path = write_jsonl(tmp_path / "g.jsonl.gz", objs)
    mapping = {"event_id": "id", "user_id": "uid", "event_time": "time", "event_type": "type"}
    preflight([path], column_mapping=mapping)
    rows, _ = rows_and_numbers(collect(path, column_mapping=mapping, batch_rows=3))
    assert [(n, r["user_id"]) for n, r in rows] == [(i, f"u{i}") for i in range(4)]


# --------------------------------------------------------------------------
# end to end: every input row accounted for exactly once
# --------------------------------------------------------------------------
def test_every_row_accounted_for_across_files(tmp_path):
    rng = np.random.default_rng(7)
    expected = {}  # (file, row_number) -> reason or "valid"
    paths = []

    csv_lines = []
    for i in range(200):
        kind = rng.choice(["valid", "malformed", REASON_BAD_PRICE, REASON_OUT_OF_DAY, REASON_BAD_QUANTITY])
        if kind == "malformed":
            csv_lines.append(f"e{i},only,three")
        elif kind == REASON_BAD_PRICE:
            csv_lines.append(csv_line(i, price='"12,50"'))
        elif kind == REASON_OUT_OF_DAY:
            csv_lines.append(csv_line(i, event_time="2026-12-03T00:00:00Z"))
        elif kind == REASON_BAD_QUANTITY:
            csv_lines.append(csv_line(i, quantity="1.5"))
        else:
            csv_lines.append(csv_line(i))
        expected[("c.csv", i)] = "malformed_row" if kind == "malformed" else kind
    paths.append(write_csv(tmp_path / "c.csv", csv_lines))

    json_lines = []
    for i in range(150):
        kind = rng.choice(["valid", "malformed", "blank", REASON_MISSING_USER_ID, REASON_BAD_EVENT_TIME])
        if kind == "malformed":
            json_lines.append('{"event_id": ')
        elif kind == "blank":
            json_lines.append("")
        elif kind == REASON_MISSING_USER_ID:
            json_lines.append(json_obj(i, user_id=""))
        elif kind == REASON_BAD_EVENT_TIME:
            json_lines.append(json_obj(i, event_time="2026-12-02T10:00:00+25:00"))
        else:
            json_lines.append(json_obj(i))
        if kind != "blank":
            expected[("j.jsonl", i)] = "malformed_row" if kind == "malformed" else kind
    paths.append(write_jsonl(tmp_path / "j.jsonl", json_lines))

    pq.write_table(parquet_table(120), tmp_path / "p.parquet", row_group_size=50)
    paths.append(str(tmp_path / "p.parquet"))
    expected.update({("p.parquet", i): "valid" for i in range(120)})

    files = expand_inputs([str(tmp_path)])
    assert files == sorted(paths)
    preflight(files)
    seen = collections.Counter()
    outcome = {}
    for path in files:
        name = os.path.basename(path)
        for batch, first, malformed in read_batches(path, batch_rows=17):
            result = validate_batch(batch, date=DAY, source_file=path, first_row_number=first)
            dead = [result.dead] + ([malformed] if malformed is not None else [])
            for d in dead:
                for n, reason in zip(d.column("row_number").to_pylist(), d.column("reason").to_pylist()):
                    outcome[(name, n)] = reason
                    seen[(name, n)] += 1
            for event_id in result.valid.column("event_id").to_pylist():
                n = int(event_id[1:])
                outcome[(name, n)] = "valid"
                seen[(name, n)] += 1
    assert set(seen.values()) == {1}
    assert outcome == expected


@pytest.mark.parametrize(
    "data,expected",
    [
        (b"", []), (b"a", [0]), (b"a\n", [0]), (b"\na\n", [1]), (b"a\n\nb", [0, 2]),
        (b"a\n  \r\n\t\nb\n", [0, 3]), (b"a\n   ", [0]), (b" \n\n", []), (b"a\n\n\n", [0]),
    ],
)
def test_nonblank_line_indices(data, expected):
    from transforms.readers import _nonblank_lines

    assert _nonblank_lines(data).tolist() == expected


def test_csv_crlf_and_bom(tmp_path):
    path = tmp_path / "w.csv"
    text = ",".join(HEADER) + "\r\n" + csv_line(0) + "\r\n" + "oops\r\n" + csv_line(2) + "\r\n"
    path.write_bytes(b"\xef\xbb\xbf" + text.encode())
    preflight([str(path)])
    rows, malformed = rows_and_numbers(collect(str(path)))
    assert [(n, r["event_id"], r["quantity"]) for n, r in rows] == [(0, "e0", "2"), (2, "e2", "2")]
    assert malformed == [(1, "oops")]
