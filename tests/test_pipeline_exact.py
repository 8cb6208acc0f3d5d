"""No-noise test mode: bounding and aggregation through the whole Beam pipeline, exactly.

The no-noise switch is test-only: it needs CLICKDP_ALLOW_NO_NOISE=1 and an explicit flag.
"""
import pytest

from pipelines import nightly
from tests.conftest import make_events, run_nightly, write_parquet

SPEC = {
    "job": "exact",
    "budget": {"epsilon": 1.0, "delta": 1e-6},
    "outputs": [{
        "name": "product_day",
        "partition_keys": ["product_id"],
        "bounds": {"max_partitions_contributed": 2, "max_contributions_per_partition": 3},
        "metrics": [
            {"name": "views", "type": "count"},
            {"name": "viewers", "type": "privacy_id_count"},
            {"name": "price_sum", "type": "sum", "column": "price", "bounds": [0, 20]},
        ],
    }],
}


def _write_inputs(tmp_path, n_files=12):
    """12 files; normal users within the bounds; one heavy user spread over all files."""
    normal = []
    for u in range(30):
        for p in (f"p{u % 6}", f"p{(u + 1) % 6}"):
            normal += [{"user_id": f"u{u}", "product_id": p, "price": 5.0}] * 2
    for i in range(n_files):
        rows = normal[i::n_files]
        # The heavy user: 5 rows of partition p{i % 6} in every file -> 10 rows per partition overall.
        rows += [{"user_id": "heavy", "product_id": f"p{i % 6}", "price": 50.0}] * 5
        write_parquet(make_events(rows), str(tmp_path / "in" / f"events-{i:03d}.parquet"))
    return tmp_path / "in", normal


def test_no_noise_needs_env(tmp_path, monkeypatch):
    monkeypatch.delenv("CLICKDP_ALLOW_NO_NOISE", raising=False)
    in_dir, _ = _write_inputs(tmp_path)
    result, _ = run_nightly(tmp_path, SPEC, in_dir, no_noise=True)
    assert result.exit_code == nightly.EXIT_BAD_SPEC
    assert "test-only" in result.message


@pytest.mark.parametrize("shuffle, threads", [("files", "0"), ("beam", "1")])
def test_bounding_is_global_across_files(tmp_path, allow_no_noise, shuffle, threads):
    in_dir, normal = _write_inputs(tmp_path)
    for _ in range(3):  # the heavy user's partitions are random: check several draws
        result, released = run_nightly(tmp_path, SPEC, in_dir, no_noise=True,
                                       extra=["--force-rerelease", "--shuffle", shuffle, "--threads", threads])
        assert result.exit_code == 0, result.message
        t = released["product_day"]
        views = dict(zip(t.column("product_id").to_pylist(), t.column("views").to_pylist()))
        viewers = dict(zip(t.column("product_id").to_pylist(), t.column("viewers").to_pylist()))
        sums = dict(zip(t.column("product_id").to_pylist(), t.column("price_sum").to_pylist()))
        normal_views = {f"p{p}": sum(1 for r in normal if r["product_id"] == f"p{p}") for p in range(6)}
        extra = {p: views[p] - normal_views[p] for p in views}
        # Globally bounded: the heavy user adds exactly Linf = 3 rows to exactly L0 = 2 partitions,
        # although its rows of each partition are spread over two files and it touches 6 partitions.
        assert sorted(extra.values()) == [0, 0, 0, 0, 3, 3]
        for p, e in extra.items():
            assert viewers[p] == 10 + (1 if e else 0)
            assert sums[p] == pytest.approx(normal_views[p] * 5.0 + e * 20.0)  # 50 clamped to 20
        assert result.summary["rows"]["read"] == len(normal) + 12 * 5
        assert result.summary["outputs"]["product_day"]["rows_kept"] == len(normal) + 6
        assert set(t.column_names) == {"product_id", "views", "views_std", "viewers", "viewers_std",
                                       "price_sum", "price_sum_std"}
