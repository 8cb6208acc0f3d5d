"""Feature tables: post-processing of released tables only (ReleasedTable), rates, delta-method stds."""
import hashlib
import json
import math
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.conftest import make_events, write_parquet
from transforms import features as F
from transforms.released import NotReleasedError, ReleasedTable, load_release

DATE = "2026-12-02"
LAPLACE_STD_PER_B = math.sqrt(2.0)

PRODUCT_METRICS = [
    {"name": "views", "type": "count", "filter": "event_type in (product_view)"},
    {"name": "add_to_carts", "type": "count", "filter": "event_type in (add_to_cart)"},
    {"name": "purchases", "type": "count", "filter": "event_type in (purchase)"},
    {"name": "distinct_buyers", "type": "privacy_id_count", "filter": "event_type in (purchase)"},
    {"name": "revenue", "type": "sum", "column": "amount", "min": 0.0, "max": 200.0,
     "filter": "event_type in (purchase)"},
    {"name": "mean_price", "type": "mean", "column": "price", "min": 0.0, "max": 300.0,
     "filter": "event_type in (product_view)"},
]
CATEGORY_METRICS = [
    {"name": "events", "type": "count", "filter": None},
    {"name": "distinct_users", "type": "privacy_id_count", "filter": None},
    {"name": "revenue", "type": "sum", "column": "amount", "min": 0.0, "max": 200.0,
     "filter": "event_type in (purchase)"},
]


def released_table(keys: dict, metrics: list, values: dict, stds: dict, output: str) -> pa.Table:
    """A table shaped like schemas.released: string keys, then <metric> and <metric>_std (tagged)."""
    fields, cols = [], {}
    for k, v in keys.items():
        fields.append(pa.field(k, pa.string(), nullable=None in v))
        cols[k] = v
    for m in metrics:
        n = m["name"]
        t = pa.int64() if m["type"] in ("count", "privacy_id_count") else pa.float64()
        fields.append(pa.field(n, t, nullable=False, metadata={b"metric": m["type"].encode()}))
        fields.append(pa.field(f"{n}_std", pa.float64(), nullable=False, metadata={b"noise_std_of": n.encode()}))
        cols[n] = values[n]
        std = stds[n]
        cols[f"{n}_std"] = std if isinstance(std, list) else [float(std)] * len(values[n])
    schema = pa.schema(fields, metadata={b"clickstream_dp.schema": f"released/{output}/v1".encode()})
    return pa.Table.from_pydict(cols, schema=schema)


def dp_metadata(output: str, metrics: list, *, epsilon=1.0, delta=1e-7, noise="laplace", date=DATE,
                run_id="run-1") -> dict:
    return {"job": "nightly", "date": date, "run_id": run_id, "spec_hash": "abc123", "output": output,
            "epsilon": epsilon, "delta": delta, "noise": noise, "privacy_unit": "user_id",
            "metrics": [dict({"column": None, "min": None, "max": None}, **m) for m in metrics],
            "mechanisms": [{"output": output, "component": "selection", "metric": None, "epsilon": epsilon / 4,
                            "delta": delta, "kind": "truncated_geometric"}] +
                          [{"output": output, "component": m["type"], "metric": m["name"],
                            "epsilon": 3 * epsilon / 4 / len(metrics), "delta": 0.0, "kind": noise,
                            "noise_std": 1.0} for m in metrics]}


def write_release(root, tables: dict, *, date=DATE, job="nightly", run_id="run-1") -> str:
    """tables: {output: (pa.Table, dp metadata)} -> files + manifest under root, like the nightly job."""
    files = []
    for output, (table, dp) in tables.items():
        path = os.path.join(root, output, f"dt={date}", "part-00000.parquet")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        md = dict(table.schema.metadata or {})
        md[b"clickdp.dp"] = json.dumps(dp, sort_keys=True).encode()
        pq.write_table(table.replace_schema_metadata(md), path)
        files.append({"output": output, "path": path, "rows": table.num_rows,
                      "sha256": hashlib.sha256(Path(path).read_bytes()).hexdigest()})
    mdir = os.path.join(root, "_manifests", job)
    os.makedirs(mdir, exist_ok=True)
    eps = sum(dp["epsilon"] for _, dp in tables.values())
    manifest = {"job": job, "date": date, "run_id": run_id, "spec_hash": "abc123", "files": files,
                "budget": {"epsilon": 3.0, "delta": 1e-6, "spent_epsilon": eps, "spent_delta": 1e-7}}
    with open(os.path.join(mdir, f"dt={date}.json"), "w") as fh:
        json.dump(manifest, fh)
    return str(root)


LAP_STD = 40.0 * LAPLACE_STD_PER_B  # Laplace b = 40, as the demo's product counts


def product_release(metrics=PRODUCT_METRICS, output="product_day"):
    ids = ["p3", "p1", "p2", "p4"]
    values = {"views": [4594, 3794, 100, 3000], "add_to_carts": [259, 208, 30, 3500], "purchases": [0, 54, 1, 74],
              "distinct_buyers": [80, 62, 0, 37], "revenue": [-918.5, 147.7, 10.0, 4897.9],
              "mean_price": [3.8, 14.9, 0.0, 20.3], "product_views": [4594, 3794, 100, 3000]}
    stds = {"views": LAP_STD, "add_to_carts": LAP_STD, "purchases": LAP_STD, "distinct_buyers": LAP_STD / 2,
            "revenue": 11313.7, "mean_price": [5.3, 2.0, 500.0, 7.4], "product_views": LAP_STD}
    table = released_table({"product_id": ids}, metrics, values, stds, output)
    return table, dp_metadata(output, metrics, epsilon=2.0)


def category_release():
    values = {"events": [14267, 12954, 50], "distinct_users": [8409, 7828, 20],
              "revenue": [14977.9, 20741.8, -300.0]}
    stds = {"events": 79.5, "distinct_users": 15.9, "revenue": 15909.9}
    table = released_table({"category": ["grocery", "video_games", "tiny"]}, CATEGORY_METRICS, values, stds,
                           "category_day")
    return table, dp_metadata("category_day", CATEGORY_METRICS)


@pytest.fixture
def release(tmp_path):
    root = write_release(tmp_path / "out", {"product_day": product_release(), "category_day": category_release()})
    return root, load_release(root, DATE)


def _row(table: pa.Table, key: str, value: str) -> dict:
    return next(r for r in table.to_pylist() if r[key] == value)


# --- ReleasedTable: the API that keeps raw data out ----------------------------------------------------
def test_builders_refuse_raw_tables_and_paths(tmp_path):
    raw = make_events([{"user_id": "u1"}, {"user_id": "u2"}])
    with pytest.raises(TypeError, match="ReleasedTable"):
        F.product_features(raw)
    table, _ = product_release()
    with pytest.raises(TypeError, match="no proof that it was released"):
        F.product_features(table)  # even a correctly shaped table: no metadata, no proof
    with pytest.raises(TypeError, match="Paths are not accepted"):
        F.category_features(str(tmp_path))


def test_load_refuses_raw_events_and_unreleased_files(tmp_path):
    raw_path = write_parquet(make_events([{"user_id": "u1"}]), str(tmp_path / "raw" / "events.parquet"))
    with pytest.raises(NotReleasedError, match="user_id.*raw events"):
        ReleasedTable.load(raw_path)
    table, _ = product_release()
    bare = write_parquet(table, str(tmp_path / "bare" / "part-00000.parquet"))
    with pytest.raises(NotReleasedError, match="no 'clickdp.dp'"):
        ReleasedTable.load(bare)
    # A session id sneaking into an otherwise released table is refused too.
    table, dp = product_release()
    leaky = table.append_column("session_id", pa.array(["s"] * table.num_rows))
    root = write_release(tmp_path / "leaky", {"product_day": (leaky, dp)})
    with pytest.raises(NotReleasedError, match="session_id"):
        load_release(root, DATE)
    # A numeric column without a noise std is not a released metric.
    extra = table.append_column("raw_views", pa.array([1, 2, 3, 4], pa.int64()))
    root = write_release(tmp_path / "extra", {"product_day": (extra, dp)})
    with pytest.raises(NotReleasedError, match="raw_views"):
        load_release(root, DATE)


def test_released_table_cannot_be_built_or_changed_directly(release):
    _, released = release
    with pytest.raises(TypeError, match="cannot be built directly"):
        ReleasedTable(pa.table({"a": ["x"]}), {}, "x", "x")
    rt = released["product_day"]
    with pytest.raises(AttributeError):
        rt._table = pa.table({"user_id": ["u"]})
    assert rt.keys == ("product_id",) and "views" in rt.metrics and rt.epsilon == 2.0


def test_load_release_checks_the_manifest_checksums(tmp_path):
    root = write_release(tmp_path / "out", {"product_day": product_release()})
    path = os.path.join(root, "product_day", f"dt={DATE}", "part-00000.parquet")
    table = pq.read_table(path)
    pq.write_table(table.slice(0, 2), path)  # same metadata, different content
    with pytest.raises(NotReleasedError, match="sha256"):
        load_release(root, DATE)


def test_from_release_step_accepts_only_released_schemas():
    from schemas.released import released_schema
    from transforms.spec import load_spec
    spec = load_spec(os.path.join(os.path.dirname(__file__), "..", "configs", "nightly.yaml"))
    out = next(o for o in spec.outputs if o.name == "category_day")
    schema = released_schema(out, spec.post_processing)
    table = pa.Table.from_pydict({"category": ["a"], "events": [10], "events_std": [1.0], "distinct_users": [5],
                                  "distinct_users_std": [1.0], "revenue": [3.0], "revenue_std": [2.0]},
                                 schema=schema)
    dp = dp_metadata("category_day", CATEGORY_METRICS)
    rt = ReleasedTable.from_release_step(table, dp)
    assert rt.source == "in-process:category_day"
    assert F.category_features(rt).num_rows == 1
    with pytest.raises(NotReleasedError, match="released/"):
        ReleasedTable.from_release_step(table.replace_schema_metadata({}), dp)
    with pytest.raises(NotReleasedError, match="user_id"):
        ReleasedTable.from_release_step(table.append_column("user_id", pa.array(["u"])), dp)
    with pytest.raises(NotReleasedError, match="lacks"):
        ReleasedTable.from_release_step(table, {"output": "category_day"})


# --- features ---------------------------------------------------------------------------------------
def test_product_features_values_rates_and_intervals(release):
    _, released = release
    t = F.product_features(released["product_day"])
    for f in ("views", "add_to_carts", "purchases", "distinct_buyers", "revenue", "mean_price",
              "view_to_cart_rate", "view_to_purchase_rate"):
        for suffix in ("", "_std", "_ci95_low", "_ci95_high"):
            assert f + suffix in t.column_names
    assert "user_id" not in t.column_names and "distinct_viewers" not in t.column_names
    p3 = _row(t, "product_id", "p3")
    assert p3["views"] == 4594 and p3["views_std"] == pytest.approx(LAP_STD)
    half = 40.0 * math.log(20.0)  # Laplace b * ln(1/0.05)
    assert p3["views_ci95_low"] == pytest.approx(4594 - half) and p3["views_ci95_high"] == pytest.approx(4594 + half)
    assert p3["purchases_ci95_low"] == 0.0  # counts are >= 0
    assert p3["revenue_ci95_low"] == 0.0 and p3["revenue_ci95_high"] >= 0.0  # sum of values in [0, 200]
    r = 259 / 4594
    assert p3["view_to_cart_rate"] == pytest.approx(r)
    assert p3["view_to_cart_rate_std"] == pytest.approx(math.sqrt(LAP_STD ** 2 + (r * LAP_STD) ** 2) / 4594)
    assert p3["view_to_cart_rate_ci95_low"] == pytest.approx(max(0.0, r - 1.959964 * p3["view_to_cart_rate_std"]),
                                                             rel=1e-5)
    # Rates are clipped to [0, 1] (noise can make add-to-carts exceed views).
    p4 = _row(t, "product_id", "p4")
    assert p4["view_to_cart_rate"] == 1.0 and p4["view_to_cart_rate_ci95_high"] <= 1.0
    # Not identified where the denominator's interval reaches 0: null, not a made-up rate.
    p2 = _row(t, "product_id", "p2")
    assert p2["view_to_cart_rate"] is None and p2["view_to_purchase_rate_std"] is None
    for row in t.to_pylist():
        for rate in ("view_to_cart_rate", "view_to_purchase_rate"):
            if row[rate] is not None:
                assert 0.0 <= row[f"{rate}_ci95_low"] <= row[rate] <= row[f"{rate}_ci95_high"] <= 1.0


def test_delta_method_std_and_interval_match_simulation():
    """The rate's delta-method std and normal interval, checked by simulating the Laplace mechanism.

    Test-only simulation with a fixed seed (this is not the production noise path). With 200,000 draws
    the empirical std is within 1% of the truth and coverage within 0.5% with probability > 1 - 1e-6.
    """
    rng = np.random.default_rng(20261202)
    true_v, true_a, b = 3000.0, 300.0, 40.0
    n = 200_000
    v = true_v + rng.laplace(0, b, n)
    a = true_a + rng.laplace(0, b, n)
    std_b = b * math.sqrt(2)
    _, std, low, high = F.ratio_feature(a, np.full(n, std_b), v, np.full(n, std_b), np.ones(n, bool), True)
    emp = np.std(a / v)
    assert np.median(std) == pytest.approx(emp, rel=0.03)
    coverage = np.mean((low <= true_a / true_v) & (true_a / true_v <= high))
    assert 0.935 <= coverage <= 0.965


def test_missing_and_renamed_metrics_are_handled(tmp_path):
    renamed = [dict(PRODUCT_METRICS[0], name="product_views")] + \
              [m for m in PRODUCT_METRICS[1:] if m["name"] != "add_to_carts"]
    root = write_release(tmp_path / "out", {"product_day": product_release(renamed)})
    t = F.product_features(load_release(root, DATE)["product_day"])
    meta = F.features_metadata(t)
    assert "views" in t.column_names and "product_views" not in t.column_names  # found by type + filter
    assert meta["features"]["views"]["from"] == "product_views"
    assert "view_to_cart_rate" not in t.column_names and "add_to_carts" not in t.column_names
    assert "view_to_purchase_rate" in t.column_names
    assert set(meta["missing"]) >= {"add_to_carts", "view_to_cart_rate", "distinct_viewers"}


def test_unknown_metrics_pass_through(tmp_path):
    metrics = PRODUCT_METRICS[:1] + [{"name": "wishlist_adds", "type": "count", "filter": None}]
    table, _ = product_release(PRODUCT_METRICS)
    t2 = released_table({"product_id": table.column("product_id").to_pylist()}, metrics,
                        {"views": [1, 2, 3, 4], "wishlist_adds": [5, 6, 7, 8]}, {"views": 1.0, "wishlist_adds": 2.0},
                        "product_day")
    root = write_release(tmp_path / "out", {"product_day": (t2, dp_metadata("product_day", metrics))})
    t = F.product_features(load_release(root, DATE)["product_day"])
    assert {"wishlist_adds", "wishlist_adds_std", "wishlist_adds_ci95_low"} <= set(t.column_names)


def test_category_features_and_wrong_table(release):
    _, released = release
    t = F.category_features(released["category_day"])
    g = _row(t, "category", "grocery")
    assert g["events_per_user"] == pytest.approx(14267 / 8409)
    assert g["events_per_user_ci95_low"] < g["events_per_user"] < g["events_per_user_ci95_high"]
    assert _row(t, "category", "tiny")["events_per_user"] is None  # 20 shoppers ± 34: not identified
    with pytest.raises(ValueError, match="keyed by 'product_id'"):
        F.product_features(released["category_day"])


def test_written_features_carry_provenance_and_no_extra_budget(release, tmp_path):
    _, released = release
    paths = F.build_all(released, str(tmp_path / "features"))
    assert [os.path.relpath(p, tmp_path / "features") for p in paths] == [
        f"product_features/dt={DATE}/part-00000.parquet", f"category_features/dt={DATE}/part-00000.parquet"]
    md = json.loads(pq.read_schema(paths[0]).metadata[b"clickdp.postprocessing"])
    assert md["additional_epsilon"] == 0.0 and md["epsilon"] == 2.0
    prov = md["post_processing_of"][0]
    assert prov["output"] == "product_day" and prov["date"] == DATE and prov["epsilon"] == 2.0
    assert prov["file"] == f"product_day/dt={DATE}/part-00000.parquet" and prov["spec_hash"] == "abc123"
    assert pq.read_table(paths[0]).num_rows == 4


def test_cli(release, tmp_path, capsys):
    root, _ = release
    assert F.main(["--release", root, "--date", DATE, "--out", str(tmp_path / "f")]) == 0
    assert "product_features" in capsys.readouterr().out
    assert F.main(["--release", root, "--date", "2026-12-01", "--out", str(tmp_path / "f")]) == 1
    assert "no manifest" in capsys.readouterr().err
