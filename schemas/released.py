"""Explicit schemas of released tables.

A released table has the output's partition-key columns (strings), then for
each metric its noisy value and ``<metric>_std``, the standard deviation of
the noise in that value (exact for count/privacy_id_count/sum; a delta-method
approximation for mean and variance, which are ratios of noisy values).
Nothing else: no identifiers, no raw counts, no unnoised values.
"""
import pyarrow as pa

COUNT_LIKE = ("count", "privacy_id_count")


def metric_value_type(metric_type: str, round_counts: bool) -> pa.DataType:
    if metric_type in COUNT_LIKE and round_counts:
        return pa.int64()
    return pa.float64()


def released_schema(output, post_processing) -> pa.Schema:
    """The schema of `output`'s released table (spec.Output, spec.PostProcessing)."""
    fields = [pa.field(k, pa.string(), nullable=False) for k in output.partition_keys]
    for m in output.metrics:
        fields.append(pa.field(m.name, metric_value_type(m.type, post_processing.round_counts),
                               nullable=False, metadata={b"metric": m.type.encode()}))
        fields.append(pa.field(f"{m.name}_std", pa.float64(), nullable=False,
                               metadata={b"noise_std_of": m.name.encode()}))
    return pa.schema(fields, metadata={b"clickstream_dp.schema": f"released/{output.name}/v1".encode()})
