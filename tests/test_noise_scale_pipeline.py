"""The released noise has the standard deviation the release reports (whole pipeline).

One run releases 4000 public partitions whose true values are known exactly (one user
with one event each), so released - true is a sample of 4000 noise draws. The mean
absolute deviation estimates the scale: for Laplace E|X| = b = std/sqrt(2) and
sd(|X|) = b; for Gaussian E|X| = sigma sqrt(2/pi) and sd(|X|) = sigma sqrt(1 - 2/pi).
The test allows 5.5 standard errors of the mean: failure probability < 4e-8 per
metric (normal approximation, n = 4000), < 1e-6 over the test.
"""
import math

import numpy as np
import pytest

from tests.conftest import make_events, run_nightly, write_parquet

N = 4000


@pytest.mark.parametrize("noise", ["laplace", "gaussian"])
def test_released_noise_matches_reported_std(tmp_path, noise):
    keys = [f"k{i:05d}" for i in range(N)]
    rows = [{"user_id": f"u{i}", "product_id": k, "price": 5.0} for i, k in enumerate(keys)]
    write_parquet(make_events(rows), str(tmp_path / "in" / "e.parquet"))
    (tmp_path / "keys.txt").write_text("\n".join(keys))
    spec = {"job": "scale", "budget": {"epsilon": 1.0, "delta": 1e-5}, "noise": noise,
            "post_processing": {"round_counts": False, "clamp_counts_at_zero": False},
            "outputs": [{"name": "o", "partition_keys": ["product_id"],
                         "selection": {"type": "public", "keys_file": str(tmp_path / "keys.txt")},
                         "bounds": {"max_partitions_contributed": 2, "max_contributions_per_partition": 2},
                         "metrics": [{"name": "n", "type": "count"},
                                     {"name": "s", "type": "sum", "column": "price", "bounds": [0, 10]}]}]}
    result, released = run_nightly(tmp_path, spec, tmp_path / "in")
    assert result.exit_code == 0, result.message
    t = released["o"]
    assert t.num_rows == N
    for name, truth in (("n", 1.0), ("s", 5.0)):
        err = t.column(name).to_numpy() - truth
        std = t.column(f"{name}_std").to_numpy()
        assert np.all(std == std[0]) and std[0] > 0
        sigma = std[0]
        if noise == "laplace":
            mean_abs, sd_abs = sigma / math.sqrt(2), sigma / math.sqrt(2)
        else:
            mean_abs, sd_abs = sigma * math.sqrt(2 / math.pi), sigma * math.sqrt(1 - 2 / math.pi)
        got = np.abs(err).mean()
        assert abs(got - mean_abs) < 5.5 * sd_abs / math.sqrt(N), (name, got, mean_abs)
        assert abs(err.mean()) < 5.5 * sigma / math.sqrt(N)  # unbiased
