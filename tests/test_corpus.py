"""Text corpus: rendered from ReleasedTable only, wording carries the noise, deterministic."""
import json
import os
from pathlib import Path

import pyarrow as pa
import pytest

from tests.conftest import make_events, write_parquet
from tests.test_features import DATE, category_release, dp_metadata, product_release, released_table, \
    write_release
from transforms import corpus as C
from transforms.released import NotReleasedError, ReleasedTable, load_release

NEIGHBOUR_METRICS = [{"name": "count", "type": "count", "filter": None}]
QUERY_METRICS = [{"name": "users", "type": "privacy_id_count", "filter": None}]


def neighbours_release(output="viewed_together_neighbours"):
    table = released_table({"product_id": ["p3", "p3", "p3", "p1"], "neighbour": ["p2", "p1", "p4", "p3"]},
                           NEIGHBOUR_METRICS, {"count": [400, 900, 5, 900]}, {"count": 20.0}, output)
    table = table.add_column(2, "rank", pa.array([2, 1, 3, 1], pa.int64()))
    return table, dp_metadata(output, NEIGHBOUR_METRICS, epsilon=0.5)


def query_release():
    table = released_table({"query": ["wireless  earbuds", "usb\x00 cable", "tv", "rare thing", "tv stand"],
                            "category": ["electronics", "electronics", None, "electronics", None]},
                           QUERY_METRICS, {"users": [1200, 300, 5000, 3, 800]}, {"users": 10.0}, "search_queries")
    return table, dp_metadata("search_queries", QUERY_METRICS, epsilon=0.5)


@pytest.fixture
def released(tmp_path):
    root = write_release(tmp_path / "out", {"product_day": product_release(), "category_day": category_release(),
                                            "viewed_together_neighbours": neighbours_release(),
                                            "search_queries": query_release()})
    return load_release(root, DATE)


@pytest.fixture
def catalog(tmp_path):
    path = tmp_path / "catalog.csv"
    path.write_text("product_id,category,price\np1,grocery,2.5\np2,toys,9\np3,electronics,99\np4,toys,5\n")
    return C.PublicCatalog.load(str(path))


def _texts(records, kind):
    return [r["text"] for r in records if r["kind"] == kind]


def test_renderer_refuses_raw_input(tmp_path, catalog):
    raw = make_events([{"user_id": "u1", "product_id": "p1"}, {"user_id": "u2", "product_id": "p1"}])
    for call in (lambda: C.render_corpus(product_day=raw), lambda: C.render_corpus(category_day=raw),
                 lambda: C.render_corpus(neighbours=[raw]), lambda: C.render_corpus(queries=raw),
                 lambda: C.product_summaries(raw), lambda: C.popular_searches(raw)):
        with pytest.raises(TypeError, match="ReleasedTable"):
            call()
    raw_path = write_parquet(raw, str(tmp_path / "raw" / "events.parquet"))
    with pytest.raises(TypeError, match="Paths are not accepted"):
        C.render_corpus(product_day=raw_path)
    with pytest.raises(NotReleasedError, match="raw events"):
        C.render_corpus(product_day=ReleasedTable.load(raw_path))
    # Raw events cannot pose as the public catalog either.
    with pytest.raises(NotReleasedError, match="user_id"):
        C.PublicCatalog.load(raw_path)
    no_ids = raw.drop_columns(["user_id", "session_id", "event_id", "event_time"])
    with pytest.raises(NotReleasedError, match="repeat"):
        C.PublicCatalog.load(write_parquet(no_ids, str(tmp_path / "raw2" / "events.parquet")))


def test_numbers_are_rounded_to_the_noise():
    assert C._about(4594, 119.83) == ("about 4,600", "±120")
    assert C._about(5001, 33.7) == ("about 5,000", "±34")
    assert C._about(1.4637, 0.0326) == ("about 1.46", "±0.033")
    assert C._about(21380.7, 4000.0, "$") == ("about $21,000", "±$4,000")
    assert C._under(122.8) == "under about 130" and C._under(59.9) == "under about 60"
    assert C._pct(0.0563, 0.01) == "6%" and C._pct(0.0563, 0.001) == "5.6%"


def test_product_and_category_summaries(released, catalog):
    records = C.render_release(released, catalog)
    products = _texts(records, "product_summary")
    p3 = next(t for t in products if t.startswith("Product p3 "))
    assert p3.startswith("Product p3 (category electronics) was viewed about 4,600 times on 2026-12-02 "
                         "(±120, 95% interval).")
    assert "added to a cart about 300 times (±120)" in p3  # 259 +- 119.8, rounded to the hundred
    assert "few purchases (under about 120)" in p3  # 0 purchases: the interval reaches 0
    assert "revenue" not in p3  # revenue +- 24,000: not reported
    assert "About 6% of its views led to an add-to-cart (95% interval 3% to 8%)." in p3  # 259 / 4594
    assert "led to a purchase" not in p3
    assert "average viewed price" not in p3  # 3.8 +- 11: wider than the value
    p1 = next(t for t in products if t.startswith("Product p1 "))
    assert "p1 (category grocery)" in p1 and "Its average viewed price was about $15 (±$4.2)." in p1
    cats = _texts(records, "category_summary")
    assert cats[0].startswith("In the grocery category on 2026-12-02, shoppers generated about 14,300 shopping "
                              "events (±170, 95% interval). About 8,410 different shoppers were active there (±34).")
    tiny = next(t for t in cats if "tiny" in t)
    assert "few different shoppers" in tiny.lower() and "on average" not in tiny
    top = _texts(records, "category_top_products")
    assert any(t.startswith("Among the most viewed products in the electronics category on 2026-12-02: p3 "
                            "(about 4,600 views, ±120)") for t in top)


def test_hooks_for_neighbours_and_searches(released, catalog):
    records = C.render_release(released, catalog)
    (also,) = _texts(records, "also_viewed")[:1]
    assert also.startswith("Shoppers who viewed p1 on 2026-12-02 also viewed p3 (electronics, about 900 times "
                           "together, ±42)")
    p3 = next(t for t in _texts(records, "also_viewed") if "viewed p3 on" in t)
    assert p3.index("p1 (") < p3.index("p2 (") and "p4" not in p3  # by rank; 5 +- 42 is left out
    searches = _texts(records, "popular_searches")
    assert searches[0] == 'Popular searches on 2026-12-02: "tv" (about 5,000 shoppers, ±21) and "tv stand" ' \
                          '(about 800 shoppers, ±21).'
    assert searches[1].startswith('Popular searches in the electronics category on 2026-12-02: "wireless earbuds"')
    assert '"usb cable"' in searches[1] and "rare thing" not in searches[1]
    assert C._clean_query("a\u202eb\tc  " + "x" * 200).startswith("a b c x") and \
        len(C._clean_query("x" * 200)) == C.MAX_QUERY_CHARS
    assert C._clean_query("می\u200cخواهم") == "می\u200cخواهم"  # ZWNJ kept (Persian)
    table, dp = neighbours_release("bought_together_neighbours")
    rt = ReleasedTable.from_release_step(table, dp)
    assert C.also_viewed(rt)[0]["kind"] == "also_bought"
    assert "also bought" in C.also_viewed(rt)[0]["text"]


def test_records_carry_provenance(released, tmp_path):
    records = C.render_release(released)
    kinds = {r["kind"] for r in records}
    assert kinds == {"product_summary", "category_summary", "also_viewed", "popular_searches"}  # no catalog
    for r in records:
        assert set(r) == {"text", "kind", "provenance"}
        p = r["provenance"]
        assert {"output", "date", "epsilon", "delta", "file", "spec_hash"} <= set(p)
        assert p["date"] == DATE and p["file"] == f"{p['output']}/dt={DATE}/part-00000.parquet"
    by_kind = {r["kind"]: r["provenance"] for r in records}
    assert by_kind["product_summary"]["epsilon"] == 2.0 and by_kind["also_viewed"]["epsilon"] == 0.5
    path = C.write_corpus(records, str(tmp_path / "c" / "corpus.jsonl"))
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    assert len(lines) == len(records) and json.loads(lines[0]) == records[0]


def test_deterministic_and_independent_of_row_order(tmp_path, catalog):
    def render(shuffle):
        table, dp = product_release()
        if shuffle:
            table = table.take([3, 1, 0, 2])
        root = write_release(tmp_path / f"out{shuffle}", {"product_day": (table, dp)})
        return C.to_jsonl(C.render_release(load_release(root, DATE), catalog))
    assert render(False) == render(True)


def test_cli(tmp_path, capsys):
    root = write_release(tmp_path / "out", {"product_day": product_release(), "category_day": category_release()})
    out = tmp_path / "corpus.jsonl"
    assert C.main(["--release", root, "--date", DATE, "--out", str(out)]) == 0
    assert "7 records" in capsys.readouterr().out
    assert all(json.loads(line)["text"] for line in out.read_text().splitlines())
    raw = write_parquet(make_events([{"user_id": "u1"}]), str(tmp_path / "raw.parquet"))
    assert C.main(["--release", root, "--date", DATE, "--catalog", raw, "--out", str(out)]) == 1
    assert "never raw events" in capsys.readouterr().err
    assert os.path.getsize(out) > 0
