"""Release: partition selection, noise and post-processing, all vectorized.

This is the only step whose output may reach a sink. Its input is a merged
partial-aggregate table (bounded, per partition); its output holds partition
keys, noisy metrics and their noise standard deviations, nothing else.
"""
from __future__ import annotations

import math
from typing import Optional

import numpy as np
import pyarrow as pa

from schemas.released import released_schema
from transforms import bounding, selection as selection_lib
from transforms.budget import OutputBudget
from transforms.spec import Output, PostProcessing


class Releaser:
    """Turns merged partials of one output into its released rows.

    Holds the frozen budget plan of the output and the selection's keep
    probability table (computed once, on construction).
    """

    def __init__(self, output: Output, budget: OutputBudget, post: PostProcessing, sampler,
                 *, select: bool = True):
        self.output = output
        self.budget = budget
        self.post = post
        self.sampler = sampler
        # select=False only in the explicit no-noise test mode (keeps every partition).
        self.select = select and output.selection.kind == "private"
        self.schema = released_schema(output, post)

    def _keep(self, pid_counts: np.ndarray) -> np.ndarray:
        sel = self.budget.selection
        return selection_lib.select_partitions(
            pid_counts, sel.kind, sel.epsilon, sel.delta, sel.l0,
            pre_threshold=self.output.selection.pre_threshold)

    def _noisy(self, values: np.ndarray, mech) -> np.ndarray:
        return self.sampler.add_noise(np.asarray(values, dtype=np.float64), mech.noise)

    def release(self, merged: pa.Table) -> pa.Table:
        if merged.num_rows == 0:
            return self.schema.empty_table()
        if self.select:
            pids = merged.column(bounding.PID_COUNT).to_numpy()
            keep = self._keep(pids)
            merged = merged.filter(pa.array(keep))
        n = merged.num_rows
        cols = {k: merged.column(k) for k in self.output.partition_keys}
        for m in self.output.metrics:
            mechs = self.budget.metric(m.name)
            if m.type in ("count", "privacy_id_count"):
                stat = "count" if m.type == "count" else "pids"
                mech = mechs[m.type]
                v = self._noisy(merged.column(f"{m.name}__{stat}").to_numpy(), mech)
                if self.post.clamp_counts_at_zero:
                    v = np.maximum(v, 0.0)
                if self.post.round_counts:
                    v = np.rint(v).astype(np.int64)
                cols[m.name] = v
                cols[f"{m.name}_std"] = np.full(n, mech.std)
            elif m.type == "sum":
                mech = mechs["sum"]
                cols[m.name] = self._noisy(merged.column(f"{m.name}__sum").to_numpy(), mech)
                cols[f"{m.name}_std"] = np.full(n, mech.std)
            else:
                value, std = self._mean_or_variance(m, mechs, merged)
                cols[m.name] = value
                cols[f"{m.name}_std"] = std
        return pa.Table.from_pydict({k: cols[k] for k in self.schema.names}, schema=self.schema)

    def _mean_or_variance(self, m, mechs, merged):
        mid = (m.min_value + m.max_value) / 2.0
        half = (m.max_value - m.min_value) / 2.0
        c_mech, s_mech = mechs["count"], mechs["normalized_sum"]
        nc = self._noisy(merged.column(f"{m.name}__count").to_numpy(), c_mech)
        ns = self._noisy(merged.column(f"{m.name}__nsum").to_numpy(), s_mech)
        denom = np.maximum(1.0, nc)  # as pipeline-dp: avoid dividing by tiny or negative counts
        mean_n = ns / denom
        sc, ss = c_mech.std, s_mech.std
        if m.type == "mean":
            value = mid + mean_n
            if self.post.clamp_means_to_bounds:
                value = np.clip(value, m.min_value, m.max_value)
            # Delta method: Var(S/N) ~ (sd_S^2 + (S/N)^2 sd_N^2) / N^2
            std = np.sqrt(ss ** 2 + (mean_n * sc) ** 2) / denom
            return value, std
        q_mech = mechs["normalized_sum_of_squares"]
        nq = self._noisy(merged.column(f"{m.name}__nsumsq").to_numpy(), q_mech)
        value = nq / denom - mean_n ** 2
        value = np.clip(value, 0.0, half * half)
        sq = q_mech.std
        # Delta method for V = Q/N - (S/N)^2.
        d_q = 1.0 / denom
        d_s = 2.0 * ns / denom ** 2
        d_n = -nq / denom ** 2 + 2.0 * ns ** 2 / denom ** 3
        std = np.sqrt((d_q * sq) ** 2 + (d_s * ss) ** 2 + (d_n * sc) ** 2)
        return value, std


def confidence_interval(table: pa.Table, metric: str, noise_kind: str, level: float = 0.95):
    """(low, high) arrays: an interval holding the unnoised value with prob. `level`.

    Exact for count/privacy_id_count/sum (before clamping/rounding); approximate
    (normal) for mean and variance. `noise_kind` is in the file metadata.
    """
    value = table.column(metric).to_numpy().astype(np.float64)
    std = table.column(f"{metric}_std").to_numpy()
    if noise_kind == "laplace":
        b = std / math.sqrt(2.0)
        half = b * math.log(1.0 / (1.0 - level))
    else:
        from statistics import NormalDist
        half = std * NormalDist().inv_cdf(0.5 + level / 2.0)
    return value - half, value + half


def add_public_partitions(merged: pa.Table, output: Output, public_keys: Optional[pa.Array]) -> pa.Table:
    """Adds empty (all-zero) partials for public keys that had no data."""
    if public_keys is None or len(public_keys) == 0:
        return merged
    key = output.partition_keys[0]
    present = merged.column(key)
    import pyarrow.compute as pc
    missing = public_keys.filter(pc.invert(pc.is_in(public_keys, value_set=present)))
    if len(missing) == 0:
        return merged
    schema = bounding.partial_schema(output)
    from transforms import hashing
    cols = {}
    for f in schema:
        if f.name == key:
            cols[f.name] = missing.cast(pa.string())
        elif f.name == bounding.KEY_HASH:
            cols[f.name] = pa.array(hashing.hash_columns([missing]), pa.uint64())
        else:
            cols[f.name] = pa.array(np.zeros(len(missing)), f.type) if f.type == pa.float64() \
                else pa.array(np.zeros(len(missing), np.int64), f.type)
    return pa.concat_tables([merged, pa.Table.from_pydict(cols, schema=schema)])
