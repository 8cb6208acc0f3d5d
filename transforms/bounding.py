"""Contribution bounding and partial aggregation: pure numpy/pyarrow kernels.

Bounding is applied to ALL rows of a privacy unit at once (the Beam layer
routes every row of a unit to one shard before calling these kernels), so the
bounds hold globally, not per file or per bundle. Every sample is uniform:
rows within a (unit, partition) cell, partitions within a unit and rows within
a unit's total are chosen by independent uniform random priorities.

The sampling randomness does not need to be cryptographic (the guarantee holds
for any choice of kept rows, because the sensitivity bound is deterministic),
but it is never seeded: each call draws fresh OS entropy.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from transforms import hashing
from transforms.spec import Bounds, Filter, Metric, Output

KEY_HASH = "__key_hash"
PID_COUNT = "__pid_count"  # privacy units per partition after bounding (drives selection)
ROWS_KEPT = "__rows_kept"


def _rng(rng: Optional[np.random.Generator]) -> np.random.Generator:
    return rng if rng is not None else np.random.default_rng()


@dataclasses.dataclass
class BoundedRows:
    """Rows kept by bounding, in (unit, partition) cell order.

    rows:        indices into the input arrays of the kept rows
    cell:        cell index of each kept row (0..n_cells-1), cells are (unit, partition) pairs
    cell_part:   partition code of each cell
    cell_unit:   unit index of each cell
    """

    rows: np.ndarray
    cell: np.ndarray
    cell_part: np.ndarray
    cell_unit: np.ndarray


def _rank_within_runs(sorted_keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For a sorted key array: (run id of each element, rank of each element in its run)."""
    n = sorted_keys.size
    if n == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    starts = np.empty(n, dtype=bool)
    starts[0] = True
    np.not_equal(sorted_keys[1:], sorted_keys[:-1], out=starts[1:])
    run = np.cumsum(starts) - 1
    start_pos = np.flatnonzero(starts)
    rank = np.arange(n, dtype=np.int64) - start_pos[run]
    return run, rank


def bound_contributions(unit: np.ndarray, part: np.ndarray, bounds: Bounds,
                        rng: Optional[np.random.Generator] = None) -> BoundedRows:
    """Applies Linf, L0 and the optional total cap per unit; returns the kept rows.

    unit: uint64 privacy-unit id per row (e.g. a hash of user_id)
    part: int64 partition code per row (>= 0)
    """
    rng = _rng(rng)
    n = unit.size
    if n == 0:
        z = np.zeros(0, np.int64)
        return BoundedRows(z, z, z, z)
    # Order rows by (unit, partition, random priority): a uniform random order within each cell.
    prio = rng.integers(0, np.iinfo(np.int64).max, size=n, dtype=np.int64)
    order = np.lexsort((prio, part, unit))
    u_s, p_s = unit[order], part[order]
    cell_change = np.empty(n, dtype=bool)
    cell_change[0] = True
    cell_change[1:] = (u_s[1:] != u_s[:-1]) | (p_s[1:] != p_s[:-1])
    cell = np.cumsum(cell_change) - 1
    cell_start = np.flatnonzero(cell_change)
    rank = np.arange(n, dtype=np.int64) - cell_start[cell]
    keep = rank < bounds.max_contributions_per_partition  # Linf

    # L0: keep a uniform random subset of at most L0 cells per unit.
    n_cells = cell_start.size
    cell_unit_raw = u_s[cell_start]
    unit_change = np.empty(n_cells, dtype=bool)
    unit_change[0] = True
    unit_change[1:] = cell_unit_raw[1:] != cell_unit_raw[:-1]
    cell_unit = np.cumsum(unit_change) - 1  # dense unit index, cells already grouped by unit
    cell_prio = rng.integers(0, np.iinfo(np.int64).max, size=n_cells, dtype=np.int64)
    corder = np.lexsort((cell_prio, cell_unit))
    _, crank_sorted = _rank_within_runs(cell_unit[corder])
    crank = np.empty(n_cells, dtype=np.int64)
    crank[corder] = crank_sorted
    cell_keep = crank < bounds.max_partitions_contributed
    keep &= cell_keep[cell]

    if bounds.max_contributions is not None:
        # Total cap: a uniform random subset of the unit's remaining rows.
        idx = np.flatnonzero(keep)
        row_unit = cell_unit[cell[idx]]
        rprio = rng.integers(0, np.iinfo(np.int64).max, size=idx.size, dtype=np.int64)
        rorder = np.lexsort((rprio, row_unit))
        _, rrank_sorted = _rank_within_runs(row_unit[rorder])
        over = idx[rorder[rrank_sorted >= bounds.max_contributions]]
        keep[over] = False

    kept_sorted = np.flatnonzero(keep)
    kept_cells = cell[kept_sorted]
    # Re-number cells to those that still hold rows.
    used, new_cell = np.unique(kept_cells, return_inverse=True)
    return BoundedRows(
        rows=order[kept_sorted],
        cell=new_cell.astype(np.int64),
        cell_part=p_s[cell_start[used]].astype(np.int64),
        cell_unit=cell_unit[used].astype(np.int64),
    )


def filter_mask(table: pa.Table, flt: Optional[Filter]) -> np.ndarray:
    """Boolean mask of rows matching a spec filter (null never matches)."""
    n = table.num_rows
    if flt is None:
        return np.ones(n, dtype=bool)
    mask = np.ones(n, dtype=bool)
    for column, op, values in flt.terms:
        hit = pc.is_in(table.column(column), value_set=pa.array(values, pa.string()))
        hit = pc.fill_null(hit, False).to_numpy(zero_copy_only=False)
        if op == "not in":
            hit = ~hit & np.asarray(pc.is_valid(table.column(column)).to_numpy(zero_copy_only=False))
        mask &= hit
    return mask


def output_row_filter(output: Output) -> list:
    """Rows an output sees: its own filter AND (any metric's filter, if all metrics filter)."""
    return [output.filter] + ([None] if any(m.filter is None for m in output.metrics)
                              else [m.filter for m in output.metrics])


def output_mask(table: pa.Table, output: Output) -> np.ndarray:
    mask = filter_mask(table, output.filter)
    if all(m.filter is not None for m in output.metrics):
        any_metric = np.zeros(table.num_rows, dtype=bool)
        for m in output.metrics:
            any_metric |= filter_mask(table, m.filter)
        mask &= any_metric
    for key in output.partition_keys:  # rows without a partition key cannot contribute
        mask &= np.asarray(pc.is_valid(table.column(key)).to_numpy(zero_copy_only=False))
    return mask


def stat_columns(metric: Metric) -> list[tuple[str, pa.DataType]]:
    """The sufficient statistics a metric needs per partition."""
    n = metric.name
    if metric.type == "count":
        return [(f"{n}__count", pa.int64())]
    if metric.type == "privacy_id_count":
        return [(f"{n}__pids", pa.int64())]
    if metric.type == "sum":
        return [(f"{n}__sum", pa.float64())]
    if metric.type == "mean":
        return [(f"{n}__count", pa.int64()), (f"{n}__nsum", pa.float64())]
    if metric.type == "variance":
        return [(f"{n}__count", pa.int64()), (f"{n}__nsum", pa.float64()), (f"{n}__nsumsq", pa.float64())]
    raise ValueError(metric.type)


def partial_schema(output: Output) -> pa.Schema:
    fields = [pa.field(k, pa.string()) for k in output.partition_keys]
    fields += [pa.field(KEY_HASH, pa.uint64()), pa.field(PID_COUNT, pa.int64()), pa.field(ROWS_KEPT, pa.int64())]
    for m in output.metrics:
        fields += [pa.field(c, t) for c, t in stat_columns(m)]
    return pa.schema(fields)


def empty_partial(output: Output) -> pa.Table:
    return partial_schema(output).empty_table()


def bound_and_aggregate(table: pa.Table, unit: np.ndarray, output: Output,
                        public_keys: Optional[pa.Array] = None,
                        rng: Optional[np.random.Generator] = None) -> tuple[pa.Table, dict]:
    """Bounds one output's contributions and aggregates per partition.

    table: validated events of whole privacy units (all rows of each unit present)
    unit:  uint64 unit id per row of `table`
    Returns (partial table with partial_schema(output), stats dict).
    """
    stats = {"rows_in": table.num_rows}
    mask = output_mask(table, output)
    if public_keys is not None:
        key_col = table.column(output.partition_keys[0]) if len(output.partition_keys) == 1 else None
        if key_col is None:
            raise ValueError("public partitions support a single partition key column")
        mask &= pc.fill_null(pc.is_in(key_col, value_set=public_keys), False).to_numpy(zero_copy_only=False)
    idx = np.flatnonzero(mask)
    stats["rows_eligible"] = int(idx.size)
    if idx.size == 0:
        stats["rows_kept"] = 0
        return empty_partial(output), stats
    sub = table.take(pa.array(idx))
    keys = [sub.column(k) for k in output.partition_keys]
    key_hash = hashing.hash_columns(keys)
    uniq_hash, rep, part = np.unique(key_hash, return_index=True, return_inverse=True)
    part = part.astype(np.int64)  # rep: first row of each partition
    for k in keys:  # a 64-bit hash collision would merge partitions: refuse instead
        same = pc.equal(k, pc.take(k, pa.array(rep[part])))
        if not pc.all(same).as_py():
            raise RuntimeError("partition key hash collision; rerun (keys are hashed without salt)")

    bounded = bound_contributions(unit[idx], part, output.bounds, rng)
    n_parts = uniq_hash.size
    stats["rows_kept"] = int(bounded.rows.size)
    kept_part = bounded.cell_part[bounded.cell]
    cols = {}
    for i, k in enumerate(output.partition_keys):
        cols[k] = pc.take(keys[i], pa.array(rep)).cast(pa.string())
    cols[KEY_HASH] = pa.array(uniq_hash, pa.uint64())
    cols[PID_COUNT] = pa.array(np.bincount(bounded.cell_part, minlength=n_parts).astype(np.int64))
    cols[ROWS_KEPT] = pa.array(np.bincount(kept_part, minlength=n_parts).astype(np.int64))
    kept_table = sub.take(pa.array(bounded.rows))
    for m in output.metrics:
        mmask = filter_mask(kept_table, m.filter)
        if m.column is not None:
            values = kept_table.column(m.column)
            mmask &= np.asarray(pc.is_valid(values).to_numpy(zero_copy_only=False))
            x = pc.fill_null(values.cast(pa.float64()), 0.0).to_numpy(zero_copy_only=False)
            x = np.clip(x, m.min_value, m.max_value)
        w = mmask.astype(np.float64)
        if m.type in ("count", "mean", "variance"):
            cols[f"{m.name}__count"] = pa.array(
                np.bincount(kept_part, weights=w, minlength=n_parts).round().astype(np.int64))
        if m.type == "privacy_id_count":
            cell_hit = np.bincount(bounded.cell, weights=w, minlength=bounded.cell_part.size) > 0
            cols[f"{m.name}__pids"] = pa.array(
                np.bincount(bounded.cell_part, weights=cell_hit, minlength=n_parts).round().astype(np.int64))
        if m.type == "sum":
            cols[f"{m.name}__sum"] = pa.array(np.bincount(kept_part, weights=x * w, minlength=n_parts))
        if m.type in ("mean", "variance"):
            mid = (m.min_value + m.max_value) / 2.0
            d = (x - mid) * w
            cols[f"{m.name}__nsum"] = pa.array(np.bincount(kept_part, weights=d, minlength=n_parts))
            if m.type == "variance":
                cols[f"{m.name}__nsumsq"] = pa.array(np.bincount(kept_part, weights=d * d, minlength=n_parts))
    return pa.Table.from_pydict(cols, schema=partial_schema(output)), stats


def merge_partials(output: Output, partials: list) -> pa.Table:
    """Sums partial aggregates of the same partition coming from different shards."""
    schema = partial_schema(output)
    tables = [t for t in partials if t.num_rows]
    if not tables:
        return schema.empty_table()
    t = pa.concat_tables(tables)
    keys = list(output.partition_keys) + [KEY_HASH]
    sums = [c for c in schema.names if c not in keys]
    merged = t.group_by(keys, use_threads=False).aggregate([(c, "sum") for c in sums])
    merged = merged.rename_columns([c[:-4] if c.endswith("_sum") and c[:-4] in sums else c
                                    for c in merged.column_names])
    return merged.select(schema.names).cast(schema)
