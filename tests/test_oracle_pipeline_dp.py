"""pipeline-dp's DPEngine on its LocalBackend is the oracle for our whole pipeline.

Both run on the same events with the same bounds. pipeline-dp runs at epsilon = 1e7
(its noise is negligible); ours runs the production path (secure sampler, no seed)
at epsilon = 1e5 and the comparison allows 20 noise scales of ours: a Laplace value
exceeds 20 b with probability e^-20 = 2.1e-9, so over the <= 60 compared values the
test fails spuriously with probability < 1.3e-7.
"""
import math

import numpy as np
import pipeline_dp
import pytest

from tests.conftest import make_events, run_nightly, write_parquet

METRICS = [
    {"name": "n", "type": "count"},
    {"name": "users", "type": "privacy_id_count"},
    {"name": "s", "type": "sum", "column": "price", "bounds": [0, 10]},
    {"name": "m", "type": "mean", "column": "price", "bounds": [0, 10]},
    {"name": "v", "type": "variance", "column": "price", "bounds": [0, 10]},
]
PARTS = [f"p{i}" for i in range(6)]


def _spec(l0, linf, keys_file):
    return {"job": "oracle", "budget": {"epsilon": 1e5, "delta": 1e-6}, "noise": "laplace",
            "post_processing": {"round_counts": False, "clamp_counts_at_zero": False,
                                "clamp_means_to_bounds": False},
            "outputs": [{"name": "o", "partition_keys": ["product_id"],
                         "selection": {"type": "public", "keys_file": keys_file},
                         "bounds": {"max_partitions_contributed": l0, "max_contributions_per_partition": linf},
                         "metrics": METRICS}]}


def _pipeline_dp(rows, l0, linf):
    acc = pipeline_dp.NaiveBudgetAccountant(total_epsilon=1e7, total_delta=1e-6)
    engine = pipeline_dp.DPEngine(acc, pipeline_dp.LocalBackend())
    params = pipeline_dp.AggregateParams(
        noise_kind=pipeline_dp.NoiseKind.LAPLACE,
        metrics=[pipeline_dp.Metrics.COUNT, pipeline_dp.Metrics.PRIVACY_ID_COUNT, pipeline_dp.Metrics.SUM,
                 pipeline_dp.Metrics.MEAN, pipeline_dp.Metrics.VARIANCE],
        max_partitions_contributed=l0, max_contributions_per_partition=linf, min_value=0.0, max_value=10.0)
    ex = pipeline_dp.DataExtractors(privacy_id_extractor=lambda r: r["user_id"],
                                    partition_extractor=lambda r: r["product_id"],
                                    value_extractor=lambda r: r["price"])
    res = engine.aggregate(rows, params, ex, public_partitions=PARTS)
    acc.compute_budgets()
    return {k: v._asdict() for k, v in res}


def _ours(tmp_path, rows, l0, linf):
    write_parquet(make_events(rows), str(tmp_path / "in" / "events.parquet"))
    keys = tmp_path / "keys.txt"
    keys.write_text("\n".join(PARTS) + "\n")
    result, released = run_nightly(tmp_path, _spec(l0, linf, str(keys)), tmp_path / "in")
    assert result.exit_code == 0, result.message
    return {r["product_id"]: r for r in released["o"].to_pylist()}


def test_matches_pipeline_dp_where_bounds_do_not_bind(tmp_path):
    rng = np.random.default_rng()
    rows = []
    for u in range(300):  # every user: 1-2 partitions, 1-3 rows each: within L0 = 2, Linf = 3
        for p in rng.choice(5, size=rng.integers(1, 3), replace=False):  # p5 stays empty
            for _ in range(rng.integers(1, 4)):
                rows.append({"user_id": f"u{u}", "product_id": f"p{p}", "price": float(rng.uniform(0, 13))})
    theirs = _pipeline_dp(rows, 2, 3)
    ours = _ours(tmp_path, rows, 2, 3)
    assert set(ours) == set(PARTS) == set(theirs)  # public partitions, the empty one included
    for p in PARTS:
        for ours_name, their_name in (("n", "count"), ("users", "privacy_id_count"), ("s", "sum"),
                                      ("m", "mean"), ("v", "variance")):
            tol = 20 * ours[p][f"{ours_name}_std"] / math.sqrt(2) + 1e-6
            if p == "p5" and ours_name in ("m", "v"):
                continue  # mean/variance of an empty partition is noise around the midpoint
            assert ours[p][ours_name] == pytest.approx(theirs[p][their_name], abs=tol), (p, ours_name)


def test_matches_pipeline_dp_in_expectation_where_bounds_bind(tmp_path):
    """Every user: 4 partitions x 5 rows with L0 = 2, Linf = 3. Totals are fixed (2 x 3 rows per
    user); per partition, each of its n_p users keeps it with probability 1/2, so
    count_p = 3 Binomial(n_p, 1/2). Both implementations must sit within 5.5 sd of that
    expectation (P < 4e-8 per value, < 1e-6 over the test)."""
    rows = []
    users = 200
    for u in range(users):
        for p in [(u + k) % 5 for k in range(4)]:
            rows += [{"user_id": f"u{u}", "product_id": f"p{p}", "price": 4.0}] * 5
    theirs = _pipeline_dp(rows, 2, 3)
    ours = _ours(tmp_path, rows, 2, 3)
    tot_ours = sum(ours[p]["n"] for p in PARTS)
    tot_theirs = sum(theirs[p]["count"] for p in PARTS)
    tol = 20 * 6 * ours["p0"]["n_std"] / math.sqrt(2)  # 6 partitions' noise
    assert tot_ours == pytest.approx(users * 6, abs=tol)
    assert tot_theirs == pytest.approx(users * 6, abs=1.0)
    for p in PARTS[:5]:
        n_p = sum(1 for u in range(users) if p in [f"p{(u + k) % 5}" for k in range(4)])
        mean, sd = 3 * n_p / 2, 3 * math.sqrt(n_p / 4)
        for value in (ours[p]["n"], theirs[p]["count"]):
            assert abs(value - mean) < 5.5 * sd + 1.0, (p, value, mean)
        assert ours[p]["s"] == pytest.approx(4.0 * ours[p]["n"], rel=1e-3)
