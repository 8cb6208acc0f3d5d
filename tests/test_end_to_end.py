"""End to end on generated data: the CLI, bad rows, schemas, metadata, no identifiers released."""
import datetime
import glob
import json
import os
import subprocess
import sys

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from schemas.events import DEAD_LETTER_SCHEMA, DEAD_LETTER_REASONS
from schemas.released import released_schema
from transforms import generator
from transforms.spec import load_spec

DATE = datetime.date(2026, 12, 2)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    base = tmp_path_factory.mktemp("gen")
    info = generator.generate(str(base / "data"), n_users=3000, n_events=60_000, date=DATE,
                              bad_rows_fraction=0.02, n_files=3)
    return base, info


def _clickdp(*args, env_extra=None):
    env = dict(os.environ, **(env_extra or {}))
    return subprocess.run([sys.executable, "-m", "pipelines.cli", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


def test_cli_run_on_generated_data(generated):
    base, info = generated
    out = base / "out"
    proc = _clickdp("run", "--spec", "configs/nightly.yaml", "--input", str(base / "data" / "events"),
                    "--output", str(out), "--date", DATE.isoformat())
    assert proc.returncode == 0, proc.stderr
    assert "dead-lettered" in proc.stdout and "DP per user_id" in proc.stdout
    spec = load_spec(os.path.join(ROOT, "configs", "nightly.yaml"))
    manifest = json.loads((out / "_manifests" / "nightly" / f"dt={DATE}.json").read_text())
    assert manifest["spec_hash"] == spec.spec_hash
    assert manifest["budget"]["spent_epsilon"] <= spec.epsilon
    assert {f["output"] for f in manifest["files"]} == {o.name for o in spec.outputs}
    for o in spec.outputs:
        path = out / o.name / f"dt={DATE}" / "part-00000.parquet"
        table = pq.read_table(path)
        assert table.schema.remove_metadata() == released_schema(o, spec.post_processing).remove_metadata()
        meta = json.loads(pq.read_schema(path).metadata[b"clickdp.dp"])
        assert meta["output"] == o.name and meta["spec_hash"] == spec.spec_hash and meta["date"] == str(DATE)
        assert 0 < meta["epsilon"] <= spec.epsilon and meta["noise"] == spec.noise
        assert all(m["epsilon"] > 0 for m in meta["mechanisms"])
        entry = next(f for f in manifest["files"] if f["output"] == o.name)
        assert entry["rows"] == table.num_rows
        for m in o.metrics:
            assert pc.all(pc.greater(table.column(f"{m.name}_std"), 0)).as_py() in (True, None)
    # Operator summary: the row invariant and dead-letter reasons.
    summary_files = glob.glob(str(base / "out_quarantine" / "_runs" / "nightly" / f"dt={DATE}" / "*.json"))
    summary = json.loads(open(summary_files[0]).read())
    rows = summary["rows"]
    assert rows["read"] == info["rows"] == rows["valid"] + rows["dead_lettered"]
    assert rows["dead_lettered"] == info["bad_rows"]
    assert rows["dead_by_reason"] == {k: v for k, v in info["bad_rows_by_reason"].items() if v}
    # A second run of the same date is refused with a distinct exit code, publishing nothing new.
    proc2 = _clickdp("run", "--input", str(base / "data" / "events"), "--output", str(out),
                     "--date", DATE.isoformat())
    assert proc2.returncode == 4 and "already released" in proc2.stderr


def test_no_identifier_reaches_a_released_file(generated):
    base, _ = generated
    out = base / "out_ids"
    proc = _clickdp("run", "--input", str(base / "data" / "events"), "--output", str(out),
                    "--date", DATE.isoformat())
    assert proc.returncode == 0, proc.stderr
    raw = pq.read_table(str(base / "data" / "events"))
    secrets = set()
    for col in ("user_id", "session_id", "event_id"):
        secrets.update(v for v in raw.column(col).to_pylist() if v and v.strip())
    released = glob.glob(str(out / "*" / "dt=*" / "*.parquet"))
    assert released
    for path in released:
        table = pq.read_table(path)
        for name in table.column_names:
            col = table.column(name)
            values = col.cast(pa.string()).to_pylist()
            assert not secrets.intersection(values), (path, name)
        blob = json.dumps({k.decode(): v.decode() for k, v in pq.read_schema(path).metadata.items()})
        assert not any(s in blob for s in list(secrets)[:2000] if len(s) >= 6)
    for path in glob.glob(str(out / "**" / "*"), recursive=True):  # nothing but releases and manifests
        assert "_quarantine" not in path and "dead" not in os.path.basename(path)


@pytest.mark.parametrize("fmt", ["parquet", "jsonl", "csv"])
def test_generated_bad_rows_are_dead_lettered_with_their_reason(tmp_path, fmt):
    info = generator.generate(str(tmp_path / "data"), n_users=500, n_events=8000, date=DATE,
                              bad_rows_fraction=0.05, fmt=fmt, n_files=2)
    result_out = tmp_path / "out"
    from pipelines import nightly
    res = nightly.run(["--input", str(tmp_path / "data" / "events"), "--output", str(result_out),
                       "--date", DATE.isoformat()])
    assert res.exit_code == 0, res.message
    dead = pq.read_table(res.summary["dead_letters"])
    assert dead.schema.remove_metadata() == DEAD_LETTER_SCHEMA.remove_metadata()
    assert dead.num_rows == info["bad_rows"]
    for event_id, reason in zip(dead.column("event_id").to_pylist(), dead.column("reason").to_pylist()):
        assert reason in DEAD_LETTER_REASONS
        assert event_id.startswith(f"bad-{reason}-"), (event_id, reason)
    # Nothing valid was lost: every clean row was counted valid.
    assert res.summary["rows"]["valid"] == info["rows"] - info["bad_rows"]
    assert sorted(set(dead.column("source_file").to_pylist())) == sorted(info["event_files"])


def test_missing_required_column_stops_before_launch(tmp_path):
    t = pa.table({"user_id": ["a"], "event_type": ["search"]})  # no event_time
    os.makedirs(tmp_path / "in")
    pq.write_table(t, tmp_path / "in" / "x.parquet")
    proc = _clickdp("run", "--input", str(tmp_path / "in"), "--output", str(tmp_path / "out"),
                    "--date", DATE.isoformat())
    assert proc.returncode == 3
    assert "event_time" in proc.stderr and "x.parquet" in proc.stderr
    assert not (tmp_path / "out").exists()


def test_bad_spec_stops_before_launch(tmp_path):
    spec = tmp_path / "s.yaml"
    spec.write_text(open(os.path.join(ROOT, "configs", "nightly.yaml")).read().replace(
        "epsilon: 3.0", "epsilon: -1"))
    proc = _clickdp("run", "--spec", str(spec), "--input", str(tmp_path), "--output", str(tmp_path / "o"),
                    "--date", DATE.isoformat())
    assert proc.returncode == 2 and "budget.epsilon" in proc.stderr
