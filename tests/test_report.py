"""Utility report (Markdown + HTML + PNG) and the post-processing chain on a real released run."""
import datetime
import glob
import json
import os
import re
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from tests.conftest import make_events
from tests.test_features import DATE, category_release, product_release, write_release
from transforms import corpus as C
from transforms import features as F
from transforms import report as R
from transforms.released import load_release

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
SUMMARY = {"job": "nightly", "date": DATE, "run_id": "run-1",
           "outputs": {"product_day": {"partitions_considered": 5000, "partitions_released": 4,
                                       "rows_eligible": 499220, "rows_kept": 148385},
                       "category_day": {"partitions_considered": 30, "partitions_released": 3}},
           "rows": {"read": 1000, "valid": 990, "dead_lettered": 10, "dead_by_reason": {"bad_price": 10}}}


@pytest.fixture(scope="module")
def release_root(tmp_path_factory):
    return write_release(tmp_path_factory.mktemp("rel") / "out",
                         {"product_day": product_release(), "category_day": category_release()})


def test_report_sections_and_plots(release_root, tmp_path):
    out = tmp_path / "report"
    path = R.render_report(release_root, DATE, "nightly", str(out))
    assert path == str(out / "utility_report.html")
    md = (out / "utility_report.md").read_text(encoding="utf-8")
    page = Path(path).read_text(encoding="utf-8")
    for png in ("budget.png", "relerr_product_day.png", "relerr_category_day.png"):
        assert (out / png).read_bytes()[:8] == PNG_MAGIC and f"({png})" in md and f"src='{png}'" in page
    for section in ("## Outputs", "## Budget split", "## Output product_day", "### Noise per metric",
                    "### Relative error by partition size (noisy views)",
                    "### Relative error by partition size (noisy distinct_users)"):
        assert section in md
    assert "| product_day | product_id | 4 | 2 |" in md  # partitions released, epsilon
    assert "| product_day | count | views | laplace |" in md  # budget split rows come from the DP metadata
    # Noise std per metric, and relative error = std / |value| (views 4594 +- 56.6 -> 1.2%).
    assert re.search(r"\| views \| count \| 56\.6 \| 120 \|", md)
    assert "| noisy views | partitions | views |" in md and "| 1k–10k | 3 | 1.5% |" in md  # median 56.6 / 3,794
    assert "OPERATOR" not in md and "considered" not in md


def test_relative_error_binning():
    import numpy as np
    bins, labels = R.size_bins(np.array([0.0, 5.0, 50.0, 4594.0, 12000.0]))
    assert [labels[b] for b in bins] == ["<10", "<10", "10–100", "1k–10k", "10k–100k"]


def test_operator_section_is_marked_and_kept_away_from_the_release(release_root, tmp_path):
    out = tmp_path / "op"
    path = R.render_report(release_root, DATE, "nightly", str(out), SUMMARY)
    assert os.path.basename(path) == "utility_report.OPERATOR_ONLY.html"
    md = (out / "utility_report.OPERATOR_ONLY.md").read_text(encoding="utf-8")
    assert md.count("OPERATOR-ONLY") >= 2 and "NOT differentially private" in md
    assert "| product_day | 5,000 | 4 | 0.1% |" in md and "Rows read 1,000" in md
    assert "OPERATOR-ONLY" in Path(path).read_text(encoding="utf-8")
    with pytest.raises(ValueError, match="inside the release root"):
        R.render_report(release_root, DATE, "nightly", os.path.join(release_root, "report"), SUMMARY)
    with pytest.raises(ValueError, match="run_id"):
        R.render_report(release_root, DATE, "nightly", str(tmp_path / "op2"), dict(SUMMARY, run_id="other"))


def test_report_refuses_raw_input(release_root, tmp_path):
    raw = make_events([{"user_id": "u1"}])
    with pytest.raises(TypeError, match="ReleasedTable"):
        R.build_report({"product_day": raw}, str(tmp_path / "r"))
    released = load_release(release_root, DATE)
    with pytest.raises(TypeError, match="ReleasedTable"):
        R.build_report(dict(released, raw_events=raw), str(tmp_path / "r"))
    assert not glob.glob(str(tmp_path / "r" / "*.png"))


# --- the whole chain on a real (small) nightly run --------------------------------------------------
@pytest.fixture(scope="module")
def real_run(tmp_path_factory):
    from pipelines import nightly
    from transforms import generator
    base = tmp_path_factory.mktemp("real")
    generator.generate(str(base / "data"), n_users=5000, n_events=100_000,
                       date=datetime.date.fromisoformat(DATE), bad_rows_fraction=0.01)
    result = nightly.run(["--input", str(base / "data" / "events"), "--output", str(base / "out"),
                          "--date", DATE])
    assert result.exit_code == 0
    return base, result


def test_post_processing_chain_on_a_real_release(real_run, capsys):
    base, result = real_run
    root = str(base / "out")
    assert F.main(["--release", root, "--date", DATE, "--out", str(base / "features")]) == 0
    catalog = str(base / "data" / "catalog" / "products.csv")
    corpus_path = base / "corpus.jsonl"
    assert C.main(["--release", root, "--date", DATE, "--catalog", catalog, "--out", str(corpus_path)]) == 0
    assert R.main(["--release", root, "--date", DATE, "--out", str(base / "report"),
                   "--operator-summary", result.summary_path]) == 0
    capsys.readouterr()

    manifest = json.loads((base / "out" / "_manifests" / "nightly" / f"dt={DATE}.json").read_text())
    released_rows = {f["output"]: f["rows"] for f in manifest["files"]}
    pf = pq.read_table(base / "features" / "product_features" / f"dt={DATE}" / "part-00000.parquet")
    assert pf.num_rows == released_rows["product_day"]
    records = [json.loads(line) for line in corpus_path.read_text(encoding="utf-8").splitlines()]
    kinds = [r["kind"] for r in records]
    assert kinds.count("product_summary") == released_rows["product_day"]
    assert kinds.count("category_summary") == released_rows["category_day"]
    for r in records:
        assert r["provenance"]["spec_hash"] == manifest["spec_hash"]
        assert r["provenance"]["run_id"] == manifest["run_id"] and "about" in r["text"].lower()
    # Nothing that identifies a shopper, a session or an event reaches the corpus.
    events = pq.read_table(glob.glob(str(base / "data" / "events" / "*.parquet"))[0],
                           columns=["user_id", "session_id", "event_id"])
    secret = set()
    for col in events.column_names:
        secret.update(v for v in events.column(col).to_pylist() if v)
    words = set(re.findall(r"[\w-]+", corpus_path.read_text(encoding="utf-8")))
    assert not words & secret
    assert (base / "report" / "utility_report.OPERATOR_ONLY.html").exists()


def test_an_empty_release_renders_without_crashing(tmp_path):
    table, dp = product_release()
    root = write_release(tmp_path / "out", {"product_day": (table.slice(0, 0), dp), "category_day": category_release()})
    released = load_release(root, DATE)
    assert F.product_features(released["product_day"]).num_rows == 0
    assert not [r for r in C.render_release(released) if r["kind"] == "product_summary"]
    md = Path(R.render_report(root, DATE, "nightly", str(tmp_path / "r"))).with_suffix(".md").read_text()
    assert "No partition was released" in md
