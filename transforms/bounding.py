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

from schemas import events
from transforms import hashing
from transforms.spec import Bounds, Filter, Metric, Output

KEY_HASH = "__key_hash"
# event_type may travel as an int8 code into EVENT_TYPE_DICTIONARY (all rows are validated).
EVENT_TYPE_CODE = "__event_type_code"
EVENT_TYPE_DICTIONARY = pa.array(events.EVENT_TYPES, pa.string())
PID_COUNT = "__pid_count"  # privacy units per partition after bounding (drives selection)
ROWS_KEPT = "__rows_kept"


def _numpy_filled(arr, fill) -> np.ndarray:
    """arr (Arrow array or chunked array) as numpy with nulls replaced by `fill`."""
    if arr.null_count:
        arr = pc.fill_null(arr, fill)
    return arr.to_numpy(zero_copy_only=False)


def codes_in(codes: np.ndarray, hit_codes: np.ndarray, n_codes: int) -> np.ndarray:
    """np.isin(codes, hit_codes) for codes in -1..n_codes-1 (-1 = null never hits), as one
    gather from a lookup table instead of np.isin's sort."""
    lut = np.zeros(n_codes + 1, dtype=bool)  # the last slot answers code -1
    lut[np.asarray(hit_codes, dtype=np.int64)] = True
    return lut[codes]


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


def _bits(n: int) -> int:
    return max(1, int(n - 1).bit_length())


def dense_codes(values: np.ndarray) -> tuple[np.ndarray, int]:
    """Dense int64 codes 0..k-1 (hash-based, first-appearance order) and k."""
    if values.size == 0:
        return np.zeros(0, np.int64), 0
    enc = pc.dictionary_encode(pa.array(values))
    return enc.indices.to_numpy().astype(np.int64), len(enc.dictionary)


def _random_order_by_group(group: np.ndarray, n_groups: int, rng: np.random.Generator) -> np.ndarray:
    """Permutation sorting `group` (dense codes) ascending, uniformly random within each group.

    One np.sort of packed int64 keys (group << b | random rank) instead of an
    argsort/lexsort: the random ranks are a uniform permutation, so ties are
    impossible and the order within a group is uniform.
    """
    n = group.size
    rbits = _bits(n)
    if _bits(max(n_groups, 1)) + rbits > 62:
        prio = rng.permutation(n)
        return np.lexsort((prio, group))
    prio = rng.permutation(n).astype(np.int64)
    key = (group.astype(np.int64) << rbits) | prio
    key.sort()
    row_of_prio = np.empty(n, dtype=np.int64)
    row_of_prio[prio] = np.arange(n, dtype=np.int64)
    return row_of_prio[key & ((1 << rbits) - 1)]


def bound_contributions(unit: np.ndarray, part: np.ndarray, bounds: Bounds,
                        rng: Optional[np.random.Generator] = None, *,
                        n_units: Optional[int] = None, n_parts: Optional[int] = None) -> BoundedRows:
    """Applies Linf, L0 and the optional total cap per unit; returns the kept rows.

    unit: privacy-unit id per row (any integers; dense codes 0..n_units-1 are fastest)
    part: partition code per row, dense 0..n_parts-1
    """
    rng = _rng(rng)
    n = unit.size
    if n == 0:
        z = np.zeros(0, np.int64)
        return BoundedRows(z, z, z, z)
    if n_units is None:
        unit, n_units = dense_codes(unit)
    part = part.astype(np.int64, copy=False)
    if n_parts is None:
        n_parts = int(part.max()) + 1
    # Rows ordered by cell = (unit, partition), uniformly random within each cell.
    pbits = _bits(n_parts)
    if _bits(n_units) + pbits <= 62:
        cell_key = (unit.astype(np.int64) << pbits) | part
        order = _random_order_by_group(cell_key, 1 << min(62, _bits(n_units) + pbits), rng)
    else:
        order = np.lexsort((rng.permutation(n), part, unit))
    u_s, p_s = unit[order], part[order]
    cell_change = np.empty(n, dtype=bool)
    cell_change[0] = True
    cell_change[1:] = (u_s[1:] != u_s[:-1]) | (p_s[1:] != p_s[:-1])
    cell = np.cumsum(cell_change) - 1
    cell_start = np.flatnonzero(cell_change)
    rank = np.arange(n, dtype=np.int64) - cell_start[cell]
    keep = rank < bounds.max_contributions_per_partition  # Linf

    # L0: a uniform random subset of at most L0 cells per unit.
    n_cells = cell_start.size
    cell_unit = u_s[cell_start].astype(np.int64)  # nondecreasing
    corder = _random_order_by_group(cell_unit, n_units, rng)
    _, crank_sorted = _rank_within_runs(cell_unit[corder])
    crank = np.empty(n_cells, dtype=np.int64)
    crank[corder] = crank_sorted
    keep &= (crank < bounds.max_partitions_contributed)[cell]

    if bounds.max_contributions is not None:
        # Total cap: a uniform random subset of the unit's remaining rows.
        idx = np.flatnonzero(keep)
        row_unit = cell_unit[cell[idx]]
        rorder = _random_order_by_group(row_unit, n_units, rng)
        _, rrank_sorted = _rank_within_runs(row_unit[rorder])
        keep[idx[rorder[rrank_sorted >= bounds.max_contributions]]] = False

    kept_sorted = np.flatnonzero(keep)
    kept_cells = cell[kept_sorted]  # nondecreasing
    change = np.empty(kept_cells.size, dtype=bool)
    if kept_cells.size:
        change[0] = True
        np.not_equal(kept_cells[1:], kept_cells[:-1], out=change[1:])
    used = kept_cells[change]
    return BoundedRows(
        rows=order[kept_sorted],
        cell=np.cumsum(change) - 1,
        cell_part=p_s[cell_start[used]].astype(np.int64),
        cell_unit=cell_unit[used],
    )


class ShardView:
    """Columnar view of one shard's rows with per-column codes computed once.

    String columns are dictionary-encoded once (hash-based) and reused by every
    output and filter; numeric columns are converted to numpy once.
    """

    def __init__(self, table: pa.Table, unit: np.ndarray):
        self.table = table
        self.n = table.num_rows
        self.unit, self.n_units = dense_codes(unit)
        self._codes: dict = {}
        self._values: dict = {}
        self._masks: dict = {}

    def codes(self, column: str) -> tuple[np.ndarray, pa.Array]:
        """(int64 codes with -1 for null, dictionary) of a string column."""
        if column == "event_type" and EVENT_TYPE_CODE in self.table.column_names:
            if column not in self._codes:
                codes = _numpy_filled(self.table.column(EVENT_TYPE_CODE), -1)
                self._codes[column] = (codes.astype(np.int64), EVENT_TYPE_DICTIONARY)
            return self._codes[column]
        if column not in self._codes:
            col = self.table.column(column)
            if not pa.types.is_dictionary(col.type):
                col = pc.dictionary_encode(col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col)
            elif isinstance(col, pa.ChunkedArray):
                col = col.unify_dictionaries().combine_chunks() if col.num_chunks > 1 else col.chunk(0)
            idx = col.indices
            codes = _numpy_filled(idx, -1).astype(np.int64)
            self._codes[column] = (codes, col.dictionary)
        return self._codes[column]

    def values(self, column: str) -> tuple[np.ndarray, np.ndarray]:
        """(float64 values with 0 for null, validity) of a numeric column."""
        if column not in self._values:
            col = self.table.column(column)
            valid = np.asarray(pc.is_valid(col).to_numpy(zero_copy_only=False))
            x = pc.fill_null(col.cast(pa.float64()), 0.0).to_numpy(zero_copy_only=False)
            self._values[column] = (x, valid)
        return self._values[column]

    def mask(self, flt: Optional[Filter]) -> np.ndarray:
        """Rows matching a spec filter (null never matches); cached per filter."""
        if flt is None:
            return np.ones(self.n, dtype=bool)
        key = flt.union_key()
        if key not in self._masks:
            mask = np.ones(self.n, dtype=bool)
            for column, op, values in flt.terms:
                codes, dictionary = self.codes(column)
                hit_codes = np.flatnonzero(np.asarray(
                    pc.fill_null(pc.is_in(dictionary, value_set=pa.array(values, pa.string())), False)))
                hit = codes_in(codes, hit_codes, len(dictionary))
                if op == "not in":
                    hit = ~hit & (codes >= 0)
                mask &= hit
            self._masks[key] = mask
        return self._masks[key]


def output_mask(view: ShardView, output: Output) -> np.ndarray:
    """Rows an output sees: its filter AND (any metric's filter, when every metric filters)."""
    mask = view.mask(output.filter).copy()
    if all(m.filter is not None for m in output.metrics):
        any_metric = np.zeros(view.n, dtype=bool)
        for m in output.metrics:
            any_metric |= view.mask(m.filter)
        mask &= any_metric
    for key in output.partition_keys:  # rows without a partition key cannot contribute
        mask &= view.codes(key)[0] >= 0
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


def _partition_codes(view: ShardView, output: Output, rows: np.ndarray) -> tuple[np.ndarray, int, list]:
    """Dense partition codes 0..k-1 of `rows`, k, and per key column (codes, dictionary)."""
    per_key = [view.codes(k) for k in output.partition_keys]
    if len(per_key) == 1:
        # Codes of one column are already small (0..len(dictionary)-1): a lookup table
        # re-densifies them to the partitions present, 10x faster than a hash encode.
        codes = per_key[0][0][rows]
        present = np.zeros(len(per_key[0][1]), dtype=bool)
        present[codes] = True
        remap = np.cumsum(present) - 1
        return remap[codes], int(remap[-1]) + 1 if remap.size else 0, per_key
    combined = np.zeros(rows.size, dtype=np.int64)
    for codes, dictionary in per_key:
        combined = combined * (len(dictionary) + 1) + codes[rows]
    dense, k = dense_codes(combined)
    return dense, k, per_key


def bound_and_aggregate(table: pa.Table, unit: np.ndarray, output: Output,
                        public_keys: Optional[pa.Array] = None,
                        rng: Optional[np.random.Generator] = None, *,
                        view: Optional[ShardView] = None) -> tuple[pa.Table, dict]:
    """Bounds one output's contributions and aggregates per partition.

    table: validated events of whole privacy units (all rows of each unit present)
    unit:  privacy-unit id per row of `table`
    view:  a ShardView of (table, unit) shared between outputs (built if absent)
    Returns (partial table with partial_schema(output), stats dict).
    """
    view = view if view is not None else ShardView(table, unit)
    stats = {"rows_in": view.n}
    mask = output_mask(view, output)
    if public_keys is not None:
        if len(output.partition_keys) != 1:
            raise ValueError("public partitions support a single partition key column")
        codes, dictionary = view.codes(output.partition_keys[0])
        public_codes = np.flatnonzero(np.asarray(
            pc.fill_null(pc.is_in(dictionary, value_set=public_keys), False)))
        mask &= codes_in(codes, public_codes, len(dictionary))
    idx = np.flatnonzero(mask)
    stats["rows_eligible"] = int(idx.size)
    if idx.size == 0:
        stats["rows_kept"] = 0
        return empty_partial(output), stats
    # Dense codes of the partitions present among eligible rows.
    part, n_parts, per_key = _partition_codes(view, output, idx)
    some_row = np.empty(n_parts, dtype=np.int64)  # a row of each partition (for its key values)
    some_row[part] = idx

    bounded = bound_contributions(view.unit[idx], part, output.bounds, rng,
                                  n_units=view.n_units, n_parts=n_parts)
    stats["rows_kept"] = int(bounded.rows.size)
    kept_rows = idx[bounded.rows]  # rows of the shard table
    kept_part = bounded.cell_part[bounded.cell]
    cols = {}
    key_arrays = []
    for k, (codes, dictionary) in zip(output.partition_keys, per_key):
        arr = dictionary.take(pa.array(codes[some_row])).cast(pa.string())
        cols[k] = arr
        key_arrays.append(arr)
    cols[KEY_HASH] = pa.array(hashing.hash_columns(key_arrays), pa.uint64())
    cols[PID_COUNT] = pa.array(np.bincount(bounded.cell_part, minlength=n_parts).astype(np.int64))
    cols[ROWS_KEPT] = pa.array(np.bincount(kept_part, minlength=n_parts).astype(np.int64))
    for m in output.metrics:
        w_mask = view.mask(m.filter)[kept_rows]
        if m.column is not None:
            x_all, valid_all = view.values(m.column)
            w_mask = w_mask & valid_all[kept_rows]
            x = np.clip(x_all[kept_rows], m.min_value, m.max_value)
        w = w_mask.astype(np.float64)
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


def partial_from_counts(output: Output, counts: pa.Table) -> pa.Table:
    """Partial table of a pairs/queries output from per-key distinct-user counts.

    counts: key columns + PID_COUNT, where every user counts at most once per key and
    in at most output.bounds.max_partitions_contributed keys (already bounded).
    """
    schema = partial_schema(output)
    if counts.num_rows == 0:
        return schema.empty_table()
    keys = [counts.column(k).cast(pa.string()) for k in output.partition_keys]
    pids = counts.column(PID_COUNT).cast(pa.int64())
    cols = {k: arr for k, arr in zip(output.partition_keys, keys)}
    cols[KEY_HASH] = pa.array(hashing.hash_columns([one_array(k) for k in keys]), pa.uint64())
    cols[PID_COUNT] = pids
    cols[ROWS_KEPT] = pids
    cols[f"{output.metrics[0].name}__pids"] = pids
    return pa.Table.from_pydict(cols, schema=schema)


def one_array(col) -> pa.Array:
    """A column as one Array (a chunked array's only chunk is taken as is, not copied)."""
    if isinstance(col, pa.ChunkedArray):
        return col.chunk(0) if col.num_chunks == 1 else col.combine_chunks()
    return col


def plain_array(col) -> pa.Array:
    """A column as one plain (non-dictionary) array."""
    col = one_array(col)
    return col.cast(col.type.value_type) if pa.types.is_dictionary(col.type) else col


def special_output_counts(view: ShardView, output: Output, rng=None) -> tuple[pa.Table, dict]:
    """Bounded per-key distinct-user counts for pairs and queries outputs (one shard)."""
    from transforms import pairs as pairs_lib
    from transforms import queries as queries_lib
    opts = output.options
    if output.kind == "pairs":
        etypes = pairs_lib.KIND_EVENT_TYPES[opts["type"]]
        mask = view.mask(Filter((("event_type", "in", tuple(etypes)),)))
        mask &= view.codes("product_id")[0] >= 0
        idx = np.flatnonzero(mask)
        t = view.table
        counts = pairs_lib.session_pairs(
            view.unit[idx], one_array(t.column("session_id")).take(pa.array(idx)),
            one_array(t.column("product_id")).take(pa.array(idx)), opts["max_pairs_per_user"], opts["type"],
            max_products_per_session=opts["max_products_per_session"], rng=rng)
    else:
        mask = view.mask(Filter((("event_type", "in", ("search",)),)))
        t = view.table
        q = one_array(t.column("search_query"))
        mask &= np.asarray(pc.is_valid(q).to_numpy(zero_copy_only=False))
        categories = None
        if opts["by_category"]:
            etype_codes, etype_dict = view.codes("event_type")
            etype = etype_dict.take(pa.array(np.maximum(etype_codes, 0)))
            cats_all = queries_lib.search_query_categories(
                view.unit, one_array(t.column("session_id")), one_array(t.column("event_time")), etype,
                plain_array(t.column("category")))
            mask &= np.asarray(pc.is_valid(cats_all).to_numpy(zero_copy_only=False))
        idx = np.flatnonzero(mask)
        if opts["by_category"]:
            categories = cats_all.take(pa.array(idx))
        rows = queries_lib.query_contributions(view.unit[idx], q.take(pa.array(idx)),
                                               opts["max_queries_per_user"], categories,
                                               max_chars=opts["max_chars"], rng=rng)
        counts = queries_lib.query_user_counts(rows)
    stats = {"rows_in": view.n, "rows_eligible": int(idx.size),
             "rows_kept": int(pc.sum(counts.column(PID_COUNT)).as_py() or 0) if counts.num_rows else 0}
    return partial_from_counts(output, counts), stats
