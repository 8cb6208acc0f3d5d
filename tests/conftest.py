"""Shared test helpers: hand-built raw events and a one-call pipeline runner."""
import datetime
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from schemas.events import RAW_EVENT_SCHEMA

DAY = datetime.date(2026, 12, 2)


def make_events(rows, date=DAY):
    """rows: dicts with any raw columns; sensible defaults fill the rest (all valid)."""
    base = datetime.datetime(date.year, date.month, date.day, 12, 0, tzinfo=datetime.timezone.utc)
    out = {name: [] for name in RAW_EVENT_SCHEMA.names}
    for i, r in enumerate(rows):
        full = {"event_id": f"e{i}", "session_id": f"s-{r.get('user_id')}", "event_time": base,
                "event_type": "product_view", "product_id": "p1", "category": "c1", "price": 10.0,
                "quantity": None, "search_query": None, "device": "mobile", "country": "DE",
                "referrer": None}
        full.update(r)
        for name in out:
            out[name].append(full.get(name))
    return pa.table(out, schema=RAW_EVENT_SCHEMA)


def write_parquet(table, path):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    pq.write_table(table, path)
    return path


def write_spec(tmp_path, spec: dict, name="spec.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(spec))
    return str(path)


def run_nightly(tmp_path, spec: dict, input_dir, *, date=DAY, extra=(), no_noise=False, out_name="out"):
    """Runs the whole Beam pipeline; returns (RunResult, {output: released pa.Table})."""
    from pipelines import nightly
    spec_path = write_spec(tmp_path, spec)
    out = tmp_path / out_name
    argv = ["--spec", spec_path, "--input", str(input_dir), "--output", str(out),
            "--date", date.isoformat(), *extra]
    if no_noise:
        argv.append("--unsafe-no-noise-for-tests")
    result = nightly.run(argv)
    released = {}
    if result.exit_code == 0:
        for o in spec["outputs"]:
            released[o["name"]] = pq.read_table(out / o["name"] / f"dt={date.isoformat()}")
    return result, released


@pytest.fixture
def allow_no_noise(monkeypatch):
    monkeypatch.setenv("CLICKDP_ALLOW_NO_NOISE", "1")
