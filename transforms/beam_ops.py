"""Beam PTransforms of the nightly job. Elements are Arrow batches or tables.

    paths                                   str
      -> ReadValidateAndShard               (shard, RecordBatch)      + dead: RecordBatch
      -> GroupByKey                         (shard, [RecordBatch])    all rows of a unit together
      -> BoundAndAggregate                  ((output, bucket), partial Table)
      -> GroupByKey                         ((output, bucket), [partial Table])
      -> MergeAndRelease                    (output, released Table)  the only DP step
      -> GroupByKey -> WriteReleased        staging Parquet files

After sharding, the raw ``user_id`` is replaced by its 64-bit hash (``__unit``)
and only the columns some output needs travel on.
"""
from __future__ import annotations

import dataclasses
import datetime
import json
import uuid
from typing import Iterable, Optional

import apache_beam as beam
from apache_beam.typehints import Tuple
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from apache_beam.io.filesystems import FileSystems

from schemas import events
from transforms import bounding, coders, fileshuffle, hashing, readers, validate  # noqa: F401 (coders registers)
from transforms.parallel import NAMESPACE, PooledDoFn, Tally  # noqa: F401 (NAMESPACE: metrics)
from transforms.budget import BudgetPlan
from transforms.release import Releaser, add_public_partitions
from transforms.spec import JobSpec

# Columns validation looks at (read even when no output needs them).
VALIDATED_COLUMNS = ("user_id", "event_time", "event_type", "product_id", "price", "quantity")
UNIT = "__unit"


def needed_columns(spec: JobSpec) -> list:
    cols = set()
    for o in spec.outputs:
        cols.update(o.needed_columns)
    if spec.local_outputs:
        cols.update(("event_type", "category", "price"))
    return sorted(cols)


def local_dp_rows(view: "bounding.ShardView", lo, pseudonym_key: Optional[bytes]) -> pa.Table:
    """One randomized row per unit of the shard (local DP), from all of its rows."""
    from transforms import local_dp
    etype_codes, etype_dict = view.codes("event_type")
    t = view.table
    events_t = pa.table({
        # The unit hash stands in for user_id: a deterministic function of it, so a keyed
        # pseudonym of it is as stable across days as one of the raw id, and the raw id
        # never has to travel past the first step.
        "user_id": pc.cast(t.column(UNIT), pa.string()),
        "event_type": etype_dict.take(pa.array(np.maximum(etype_codes, 0))),
        "category": bounding.plain_array(t.column("category")),
        "price": t.column("price"),
    })
    config = local_dp.LocalDPConfig(epsilon=lo.epsilon, categories=lo.categories,
                                    category_mode=lo.category_mode, activity_clip=lo.activity_clip)
    return local_dp.local_dp_features(events_t, config, row_key=lo.row_key, pseudonym_key=pseudonym_key)


def split_by_key(table: pa.Table, keys: np.ndarray, n: int) -> Iterable[Tuple[int, pa.Table]]:
    """Splits rows into (k, sub-table) for k = keys % n, one sort, no per-row work."""
    if table.num_rows == 0:
        return
    k = (keys % np.uint64(n)).astype(np.uint8 if n <= 256 else np.int64)
    order = np.argsort(k, kind="stable")  # a radix sort for uint8 keys
    ks = k[order]
    bounds = np.flatnonzero(np.diff(ks)) + 1
    starts = np.concatenate([[0], bounds])
    ends = np.concatenate([bounds, [ks.size]])
    taken = table.take(pa.array(order))
    for s, e in zip(starts, ends):
        yield int(ks[s]), taken.slice(int(s), int(e - s))


def _hash_maybe_dictionary(col) -> np.ndarray:
    """hash_strings, computed once per dictionary entry for dictionary arrays."""
    col = bounding.one_array(col)
    if pa.types.is_dictionary(col.type):
        per_entry = hashing.hash_strings(col.dictionary)
        idx = col.indices
        out = per_entry[pc.fill_null(idx, 0).to_numpy(zero_copy_only=False)]
        if idx.null_count:
            out[~np.asarray(idx.is_valid())] = 0
        return out
    return hashing.hash_strings(col)


def _index_in_maybe_dictionary(col, value_set: pa.Array) -> pa.Array:
    col = bounding.one_array(col)
    if pa.types.is_dictionary(col.type):
        per_entry = pc.index_in(col.dictionary, value_set=value_set)
        return per_entry.take(col.indices)
    return pc.index_in(col, value_set=value_set)


# Low-cardinality string columns travel through the shuffle dictionary-encoded: their
# dictionary (tens of entries) costs nothing next to 4-byte codes instead of strings.
SHUFFLE_DICTIONARY_COLUMNS = ("category",)
SHUFFLE_DICTIONARY_TYPE = pa.dictionary(pa.int32(), pa.string())


def _shuffle_columns(table: pa.Table) -> pa.Table:
    """Columns as they cross the shuffle, with one type per column whatever the input format:
    SHUFFLE_DICTIONARY_COLUMNS dictionary-encoded, every other string column plain (a large
    dictionary would travel whole with every slice of a batch)."""
    for i, field in enumerate(table.schema):
        col = table.column(i)
        if field.name in SHUFFLE_DICTIONARY_COLUMNS:
            if not pa.types.is_dictionary(field.type):
                col = pc.dictionary_encode(col.cast(pa.string()))
            if col.type != SHUFFLE_DICTIONARY_TYPE:
                col = col.cast(SHUFFLE_DICTIONARY_TYPE)
            table = table.set_column(i, pa.field(field.name, SHUFFLE_DICTIONARY_TYPE), col)
        elif pa.types.is_dictionary(field.type):
            table = table.set_column(i, field.name, col.cast(field.type.value_type))
    return table


class ReadValidateAndShardFn(PooledDoFn):
    """Reads one file, validates it, routes valid rows to shards by privacy unit.

    Files are processed on `threads` threads (see transforms.parallel); outputs keep file order.
    """

    def __init__(self, spec: JobSpec, date: datetime.date, n_shards: int, batch_rows: int, threads: int = 1,
                 shuffle_dir: Optional[str] = None):
        self.spec = spec
        self.shuffle_dir = shuffle_dir  # set: shard parts go to files there (transforms.fileshuffle)
        self.date = date
        self.n_shards = n_shards
        self.batch_rows = batch_rows
        self.threads = threads
        self.columns = needed_columns(spec)
        # Read only what validation and the outputs need; dead rows are re-read whole.
        self.read_columns = sorted((set(self.columns) | set(VALIDATED_COLUMNS)) & set(events.RAW_COLUMNS))

    def process(self, path: str, window=beam.DoFn.WindowParam, timestamp=beam.DoFn.TimestampParam):
        yield from self.submit(lambda tally: self._file(path, tally), window, timestamp)

    def _file(self, path: str, tally: Tally) -> Iterable:
        tally.inc("files_read")
        projected = readers.supports_projection(path)
        batches = readers.read_batches(path, column_mapping=self.spec.mapping, batch_rows=self.batch_rows,
                                       columns=self.read_columns if projected else None)
        while True:
            with tally.timer("read"):
                item = next(batches, None)
            if item is None:
                break
            batch, first_row, malformed = item
            if malformed is not None and malformed.num_rows:
                tally.inc("rows_read", malformed.num_rows)
                tally.inc("rows_dead", malformed.num_rows)
                tally.inc(f"dead:{events.REASON_MALFORMED_ROW}", malformed.num_rows)
                yield beam.pvalue.TaggedOutput("dead", malformed)
            if batch.num_rows == 0:
                continue
            tally.inc("rows_read", batch.num_rows)
            with tally.timer("validate"):
                result = validate.validate_batch(batch, date=self.date, source_file=path,
                                                 first_row_number=first_row,
                                                 synthesize_event_ids=not projected,
                                                 keep_dictionaries=projected)
            if result.dead.num_rows and projected:
                result = dataclasses.replace(result, dead=self._full_dead_rows(path, result.dead))
            if result.dead.num_rows:
                tally.inc("rows_dead", result.dead.num_rows)
                reasons = pc.value_counts(result.dead.column("reason")).to_pylist()
                for item in reasons:
                    tally.inc(f"dead:{item['values']}", item["counts"])
                yield beam.pvalue.TaggedOutput("dead", result.dead)
            tally.inc("rows_valid", result.valid.num_rows)
            if result.valid.num_rows == 0:
                continue
            with tally.timer("shard"):
                valid = pa.Table.from_batches([result.valid])
                unit = _hash_maybe_dictionary(valid.column("user_id"))
                slim = valid.select([c for c in self.columns if c != "event_type"])
                slim = slim.append_column(UNIT, pa.array(unit, pa.uint64()))
                if "event_type" in self.columns:  # ship the type as a 1-byte code
                    etype = _index_in_maybe_dictionary(valid.column("event_type"), bounding.EVENT_TYPE_DICTIONARY)
                    slim = slim.append_column(bounding.EVENT_TYPE_CODE, etype.cast(pa.int8()))
                # Reorder while strings are still dictionary codes, then decode each shard's part
                # once (decoding first would materialize every string twice).
                parts = [(shard, _shuffle_columns(part).combine_chunks().to_batches()[0])
                         for shard, part in split_by_key(slim, unit, self.n_shards)]
                if self.shuffle_dir is not None:
                    parts = [(shard, fileshuffle.write_part(self.shuffle_dir, batch)) for shard, batch in parts]
            yield from parts

    def _full_dead_rows(self, path: str, dead: pa.RecordBatch) -> pa.RecordBatch:
        """Dead letters with every raw column, re-read for just those rows."""
        rows = dead.column("row_number").to_numpy()
        full = readers.read_rows(path, rows, column_mapping=self.spec.mapping)
        again = validate.validate_batch(full, date=self.date, source_file=path, first_row_number=0).dead
        if again.num_rows != dead.num_rows or again.column("reason") != dead.column("reason"):
            raise RuntimeError(f"{path}: dead-letter re-read disagrees with the projected read")
        i = again.schema.get_field_index("row_number")
        return again.set_column(i, again.schema.field(i), dead.column("row_number"))


class BoundAndAggregateFn(PooledDoFn):
    """All rows of the units of one shard -> per-output partial aggregates by bucket.

    Shards are processed on `threads` threads (see transforms.parallel); outputs keep shard order.
    """

    def __init__(self, spec: JobSpec, public_keys: dict, n_buckets: int, threads: int = 1):
        self.spec = spec
        self.public_keys = public_keys
        self.n_buckets = n_buckets
        self.threads = threads
        self.pseudonym_key = None

    def setup(self):
        super().setup()
        # The HMAC key is read on the worker at run time and never put in the pipeline graph.
        if any(lo.row_key == "pseudonym" for lo in self.spec.local_outputs):
            from transforms import local_dp
            self.pseudonym_key = local_dp.pseudonym_key_from_env()

    def process(self, element, window=beam.DoFn.WindowParam, timestamp=beam.DoFn.TimestampParam):
        shard, parts = element
        parts = list(parts)  # materialized on the bundle thread: record batches or shuffle file paths
        if not parts:
            return
        yield from self.submit(lambda tally: self._shard(parts, tally), window, timestamp)

    def _shard(self, parts: list, tally: Tally) -> list:
        with tally.timer("bound_aggregate"):
            batches = [b for p in parts for b in (fileshuffle.read_part(p) if isinstance(p, str) else [p])
                       if b.num_rows]
            del parts[:]
            if not batches:
                return []
            table = pa.Table.from_batches(batches).combine_chunks()
            del batches[:]
            unit = table.column(UNIT).to_numpy()
            view = bounding.ShardView(table, unit)
            out = []
            for output in self.spec.outputs:
                if output.kind == "aggregate":
                    partial, stats = bounding.bound_and_aggregate(
                        table, unit, output, self.public_keys.get(output.name), view=view)
                else:
                    partial, stats = bounding.special_output_counts(view, output)
                tally.inc(f"out:{output.name}:rows_eligible", stats["rows_eligible"])
                tally.inc(f"out:{output.name}:rows_kept", stats["rows_kept"])
                keys = partial.column(bounding.KEY_HASH).to_numpy()
                out.extend(((output.name, bucket), part)
                           for bucket, part in split_by_key(partial, keys, self.n_buckets))
        if self.spec.local_outputs:
            with tally.timer("local_dp"):
                for lo in self.spec.local_outputs:
                    rows = local_dp_rows(view, lo, self.pseudonym_key)
                    tally.inc(f"local:{lo.name}:rows", rows.num_rows)
                    out.append(beam.pvalue.TaggedOutput("local", (lo.name, rows)))
        return out


def _public_subset(keys: Optional[pa.Array], bucket: int, n_buckets: int) -> Optional[pa.Array]:
    if keys is None:
        return None
    h = hashing.hash_columns([keys])
    return keys.filter(pa.array((h % np.uint64(n_buckets)).astype(np.int64) == bucket))


class MergeAndReleaseFn(beam.DoFn):
    """Merges one bucket's partials and releases it: selection + noise + post-processing."""

    def __init__(self, spec: JobSpec, plan: BudgetPlan, public_keys: dict, n_buckets: int,
                 sampler_name: str, no_noise: bool = False):
        self.spec = spec
        self.plan = plan
        self.public_keys = public_keys
        self.n_buckets = n_buckets
        self.sampler_name = sampler_name
        self.no_noise = no_noise

    def setup(self):
        from transforms import noise
        if self.no_noise:
            sampler = noise.NoNoiseSampler(i_understand_this_is_not_private=True)
        else:
            sampler = noise.get_sampler(self.sampler_name)
        self.releasers = {
            o.name: Releaser(o, self.plan.output(o.name), self.spec.post_processing, sampler,
                             select=not self.no_noise)
            for o in self.spec.outputs}

    def process(self, element):
        (name, bucket), partials = element
        output = self.spec.output(name)
        tally = Tally()
        with tally.timer("merge"):
            merged = bounding.merge_partials(output, list(partials))
            public = _public_subset(self.public_keys.get(name), bucket, self.n_buckets)
            merged = add_public_partitions(merged, output, public)
        tally.inc(f"out:{name}:partitions_considered", merged.num_rows)
        with tally.timer("release"):
            released = self.releasers[name].release(merged)
        tally.inc(f"out:{name}:partitions_released", released.num_rows)
        tally.flush()
        yield name, released


class WriteReleasedFn(beam.DoFn):
    """Writes one output's released table as Parquet (with DP metadata) to staging."""

    def __init__(self, spec: JobSpec, staging_dir: str, date: datetime.date, file_metadata: dict):
        self.spec = spec
        self.staging_dir = staging_dir
        self.date = date
        self.file_metadata = file_metadata

    def process(self, element):
        name, tables = element
        output = self.spec.output(name)
        tables = [t for t in tables]
        table = pa.concat_tables(tables) if tables else None
        table = table.sort_by([(k, "ascending") for k in output.partition_keys])
        meta = dict(table.schema.metadata or {})
        meta[b"clickdp.dp"] = json.dumps(self.file_metadata[name], sort_keys=True).encode()
        table = table.replace_schema_metadata(meta)
        path = FileSystems.join(self.staging_dir, name, f"dt={self.date.isoformat()}",
                                "part-00000.parquet")
        with FileSystems.create(path) as fh:
            pq.write_table(table, fh, compression="zstd")
        yield path


class WriteLocalDPFn(beam.DoFn):
    """Writes one local-DP output (randomized per-user rows) to staging."""

    def __init__(self, staging_dir: str, date: datetime.date, file_metadata: dict):
        self.staging_dir = staging_dir
        self.date = date
        self.file_metadata = file_metadata

    def process(self, element):
        name, tables = element
        tables = [t for t in tables if t.num_rows]
        if not tables:
            return
        table = pa.concat_tables(tables, promote_options="default")
        meta = dict(table.schema.metadata or {})
        meta[b"clickdp.dp"] = json.dumps(self.file_metadata.get(name, {}), sort_keys=True).encode()
        table = table.replace_schema_metadata(meta)
        path = FileSystems.join(self.staging_dir, name, f"dt={self.date.isoformat()}", "part-00000.parquet")
        with FileSystems.create(path) as fh:
            pq.write_table(table, fh, compression="zstd")
        yield path


class WriteDeadLettersFn(beam.DoFn):
    """Writes rejected rows to the quarantine location (never published)."""

    def __init__(self, dead_dir: str):
        self.dead_dir = dead_dir

    def process(self, batch: pa.RecordBatch):
        path = FileSystems.join(self.dead_dir, f"part-{uuid.uuid4().hex}.parquet")
        with FileSystems.create(path) as fh:
            pq.write_table(pa.Table.from_batches([batch]), fh, compression="zstd")
        yield path


class NightlyRelease(beam.PTransform):
    """paths -> released Parquet in staging; dead letters to quarantine."""

    def __init__(self, spec: JobSpec, plan: BudgetPlan, *, date: datetime.date, staging_dir: str,
                 dead_dir: str, public_keys: dict, file_metadata: dict, n_shards: int = 8,
                 n_buckets: int = 8, batch_rows: int = 1_000_000, sampler: str = "secure",
                 no_noise: bool = False, threads: int = 1, shuffle_dir: Optional[str] = None):
        super().__init__()
        self.spec, self.plan, self.date = spec, plan, date
        self.staging_dir, self.dead_dir = staging_dir, dead_dir
        self.public_keys, self.file_metadata = public_keys, file_metadata
        self.n_shards, self.n_buckets, self.batch_rows = n_shards, n_buckets, batch_rows
        self.sampler, self.no_noise = sampler, no_noise
        self.threads, self.shuffle_dir = threads, shuffle_dir

    def expand(self, paths):
        spec = self.spec
        read = (paths
                | "ReadValidateAndShard" >> beam.ParDo(
                    ReadValidateAndShardFn(spec, self.date, self.n_shards, self.batch_rows, self.threads,
                                           self.shuffle_dir)
                ).with_outputs("dead", main="valid"))
        # Declare element types so Beam picks the Arrow IPC coders for the shuffles.
        read.dead.element_type = pa.RecordBatch
        read.valid.element_type = Tuple[int, str if self.shuffle_dir is not None else pa.RecordBatch]
        _ = (read.dead
             | "WriteDeadLetters" >> beam.ParDo(WriteDeadLettersFn(self.dead_dir)))
        bounded = (read.valid
                   | "GroupByUnitShard" >> beam.GroupByKey()
                   | "BoundAndAggregate" >> beam.ParDo(
                       BoundAndAggregateFn(spec, self.public_keys, self.n_buckets, self.threads)
                   ).with_outputs("local", main="partials"))
        partials = bounded.partials
        partials.element_type = Tuple[Tuple[str, int], pa.Table]
        if spec.local_outputs:
            bounded.local.element_type = Tuple[str, pa.Table]
            _ = (bounded.local
                 | "GroupLocalDP" >> beam.GroupByKey()
                 | "WriteLocalDP" >> beam.ParDo(WriteLocalDPFn(self.staging_dir, self.date, self.file_metadata)))
        # One empty partial per (output, bucket) so that every bucket is released
        # (public partitions without data) and every output gets a file.
        seeds = [(o.name, b) for o in spec.outputs for b in range(self.n_buckets)]
        empties = (paths.pipeline
                   | "BucketSeeds" >> beam.Create(seeds)
                   | "EmptyPartials" >> beam.Map(_empty_partial, spec).with_output_types(
                       Tuple[Tuple[str, int], pa.Table]))
        released = ((partials, empties)
                    | "FlattenPartials" >> beam.Flatten()
                    | "GroupByPartitionBucket" >> beam.GroupByKey()
                    | "MergeAndRelease" >> beam.ParDo(MergeAndReleaseFn(
                        spec, self.plan, self.public_keys, self.n_buckets, self.sampler,
                        self.no_noise)).with_output_types(Tuple[str, pa.Table]))
        return (released
                | "GroupByOutput" >> beam.GroupByKey()
                | "WriteReleased" >> beam.ParDo(
                    WriteReleasedFn(spec, self.staging_dir, self.date, self.file_metadata)))


def _empty_partial(seed, spec: JobSpec):
    name, bucket = seed
    return (name, bucket), bounding.empty_partial(spec.output(name))
