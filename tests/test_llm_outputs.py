"""Issue-5 outputs end to end with the demo spec: pairs, queries, local-DP profiles, features,
corpus and report; nothing identifying, personal or sub-threshold reaches a published file."""
import datetime
import glob
import json
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipelines import nightly
from tests.conftest import make_events, write_parquet
from transforms import generator

DATE = datetime.date(2026, 12, 2)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EMAIL_QUERY = "jane.doe.1984@example.com order"
PHONE_QUERY = "call me at +1 415 555 0199"
RARE_QUERY = "zzqx one shopper only"


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    base = tmp_path_factory.mktemp("llm")
    info = generator.generate(str(base / "data"), n_users=20_000, n_events=400_000, date=DATE,
                              bad_rows_fraction=0.001, n_files=2)
    # 600 shoppers each search personal data (would pass selection if not scrubbed), one a rare query.
    rows = []
    for i in range(600):
        rows.append({"user_id": f"pii{i}", "session_id": f"pii-s{i}", "event_type": "search",
                     "product_id": None, "category": None, "price": None,
                     "search_query": EMAIL_QUERY if i % 2 else PHONE_QUERY})
    rows.append({"user_id": "rare-user", "session_id": "rare-s", "event_type": "search", "product_id": None,
                 "category": None, "price": None, "search_query": RARE_QUERY})
    write_parquet(make_events(rows), str(base / "data" / "events" / "extra.parquet"))
    out = base / "out"
    res = nightly.run(["--spec", os.path.join(ROOT, "configs", "demo.yaml"), "--input", str(base / "data" / "events"),
                       "--output", str(out), "--date", DATE.isoformat(), "--catalog", info["catalog"]["products"]])
    assert res.exit_code == 0, res.message
    return base, out, res


def test_every_output_and_derived_artifact_is_published(release):
    base, out, res = release
    for name in ("product_day", "category_day", "viewed_together", "bought_together", "search_queries",
                 "search_queries_by_category", "shopper_profiles", "viewed_together_neighbours",
                 "product_features", "category_features"):
        assert glob.glob(str(out / name / f"dt={DATE}" / "*.parquet")), name
    pairs = pq.read_table(out / "viewed_together" / f"dt={DATE}")
    assert pairs.column_names == ["product_a", "product_b", "users", "users_std"]
    assert all(a < b for a, b in zip(pairs.column("product_a").to_pylist(), pairs.column("product_b").to_pylist()))
    nb = pq.read_table(out / "viewed_together_neighbours" / f"dt={DATE}")
    assert nb.column_names == ["product_id", "neighbour", "rank", "count", "count_std"]
    corpus = [json.loads(line) for line in open(out / "corpus" / f"dt={DATE}" / "corpus.jsonl")]
    assert corpus and all(r["text"] and r["provenance"]["epsilon"] > 0 for r in corpus)
    assert {"product_summary", "popular_searches"} <= {r["kind"] for r in corpus}
    report = out / "_reports" / "demo" / f"dt={DATE}" / "utility_report.html"
    assert report.exists() and glob.glob(str(report.parent / "*.png"))
    manifest = json.loads((out / "_manifests" / "demo" / f"dt={DATE}.json").read_text())
    assert manifest["local_dp_outputs"][0]["name"] == "shopper_profiles"
    profiles = pq.read_table(out / "shopper_profiles" / f"dt={DATE}")
    # one row per shopper with a valid event (the generator's 20k, plus the 601 searchers)
    assert 15_000 < profiles.num_rows <= 20_601
    assert "user_id" not in profiles.column_names


def test_nothing_identifying_personal_or_rare_is_published(release):
    base, out, res = release
    raw = pq.read_table(str(base / "data" / "events"), columns=["user_id", "session_id"])
    ids = {v for col in ("user_id", "session_id") for v in raw.column(col).to_pylist() if v and v.strip()}
    forbidden = ["jane.doe", "415 555", "555 0199", RARE_QUERY]
    published = [p for p in glob.glob(str(out / "**" / "*"), recursive=True) if os.path.isfile(p)]
    assert published
    for path in published:
        if path.endswith(".parquet"):
            table = pq.read_table(path)
            for name in table.column_names:
                col = table.column(name)
                if pa.types.is_string(col.type):
                    values = set(col.to_pylist())
                    assert not ids & values, (path, name)
                    assert not any(f in (v or "") for v in values for f in forbidden), (path, name)
        elif path.endswith((".jsonl", ".json", ".md", ".html")):
            text = open(path, encoding="utf-8").read()
            assert not any(f in text for f in forbidden), path
            assert "pii-s1" not in text and "rare-user" not in text, path
    queries = pq.read_table(out / "search_queries" / f"dt={DATE}").column("query").to_pylist()
    assert queries and all(q == q.strip().lower() for q in queries)  # normalized


def test_released_parquet_opens_in_duckdb_and_pandas_with_dp_metadata(release):
    import duckdb
    import pandas as pd
    _, out, _ = release
    for name in ("product_day", "search_queries", "viewed_together_neighbours", "product_features"):
        path = str(out / name / f"dt={DATE}" / "part-00000.parquet")
        df = pd.read_parquet(path)
        con = duckdb.connect()
        n = con.execute(f"SELECT count(*) FROM read_parquet('{path}')").fetchone()[0]
        assert n == len(df)
        kv = dict(con.execute(f"SELECT key, value FROM parquet_kv_metadata('{path}')").fetchall())
        meta_key = b"clickdp.dp" if b"clickdp.dp" in kv else b"clickdp.postprocessing"
        meta = json.loads(kv[meta_key])
        assert meta, name
        if meta_key == b"clickdp.dp":
            assert meta["epsilon"] > 0 and meta["date"] == DATE.isoformat()
