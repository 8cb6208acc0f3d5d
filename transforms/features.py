"""Entity feature tables (product_features, category_features) as post-processing of released tables.

Inputs are ``ReleasedTable`` only (see transforms/released.py), so every feature is a function of DP
releases and costs no extra budget: the feature table inherits the (epsilon, delta) of the release it was
computed from, which its metadata ``clickdp.postprocessing`` names (output, date, epsilon, delta, file,
spec hash, run id).

Columns, per feature ``x``: ``x`` (value), ``x_std`` (noise std) and ``x_ci95_low`` / ``x_ci95_high``.

* Released metrics (views, distinct_viewers, add_to_carts, purchases, distinct_buyers, revenue, mean_price;
  events, distinct_users for categories) are found by name, or, if the spec renames them, by their metric
  type and event-type filter from the DP metadata. The value and std are copied; the interval is
  ``transforms.release.confidence_interval`` (exact for Laplace/Gaussian counts and sums, approximate for
  means), cut to the metric's support (counts and sums of non-negative values are >= 0).
* Rates (view_to_cart_rate = add_to_carts / views, view_to_purchase_rate = purchases / views) are ratios of
  noisy counts, clipped to [0, 1]. Std by the delta method with independent noise:
  ``sd(A/V) ~ sqrt(sd_A^2 + (A/V)^2 sd_V^2) / V``; the interval is normal (value +- 1.96 sd), cut to [0, 1].
  A rate is null where the denominator's own 95% interval reaches 0 (the ratio is not identified there).
  Counts are *bounded* counts (each shopper adds at most max_contributions_per_partition events per
  partition), so rates are rates of bounded counts, not of raw events.
* events_per_user (category) = events / distinct_users, same method, not clipped to [0, 1].
* Any other released metric is passed through under its own name with its std and interval.

A feature whose inputs are not released is left out and listed under ``missing`` in the metadata with the
reason (the default spec releases no distinct_viewers, so that one is missing there).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Optional

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from transforms.release import confidence_interval
from transforms.released import (
    ReleasedTable,
    add_release_arguments,
    load_release,
    require_released,
)

POSTPROCESSING_METADATA_KEY = b"clickdp.postprocessing"

# feature -> (metric types, value column or None, event types of the metric's filter: None = no filter,
# ANY_FILTER = whatever filter)
ANY_FILTER = "any"
METRIC_ROLES = {
    "views": (("count",), None, ("product_view",)),
    "distinct_viewers": (("privacy_id_count",), None, ("product_view",)),
    "add_to_carts": (("count",), None, ("add_to_cart",)),
    "purchases": (("count",), None, ("purchase",)),
    "distinct_buyers": (("privacy_id_count",), None, ("purchase",)),
    "revenue": (("sum",), "amount", ("purchase",)),
    "mean_price": (("mean",), "price", ANY_FILTER),
    "events": (("count",), None, None),
    "distinct_users": (("privacy_id_count",), None, None),
}
PRODUCT_FEATURES = ("views", "distinct_viewers", "add_to_carts", "purchases", "distinct_buyers", "revenue",
                    "mean_price")
CATEGORY_FEATURES = ("events", "distinct_users", "views", "add_to_carts", "purchases", "distinct_buyers",
                     "revenue", "mean_price")
# ratio -> (numerator feature, denominator feature, clip to [0, 1])
RATIOS = {
    "view_to_cart_rate": ("add_to_carts", "views", True),
    "view_to_purchase_rate": ("purchases", "views", True),
    "events_per_user": ("events", "distinct_users", False),
}
PRODUCT_RATIOS = ("view_to_cart_rate", "view_to_purchase_rate")
CATEGORY_RATIOS = ("view_to_cart_rate", "view_to_purchase_rate", "events_per_user")


def _event_types(filter_desc: Optional[str]) -> Optional[tuple]:
    """Event types a metric filter keeps ('event_type in (a, b)'), None if unfiltered, () if other terms."""
    if not filter_desc:
        return None
    from transforms.spec import Filter
    terms = Filter.parse(filter_desc, "metric filter").terms
    if len(terms) == 1 and terms[0][0] == "event_type" and terms[0][1] == "in":
        return tuple(sorted(terms[0][2]))
    return ()


def _matches(info: dict, role) -> bool:
    types, column, events = role
    if info.get("type") not in types or (column is not None and info.get("column") not in (None, column)):
        return False
    if events == ANY_FILTER:
        return True
    return _event_types(info.get("filter")) == (tuple(sorted(events)) if events else None)


def resolve_metrics(rt: ReleasedTable, features) -> dict:
    """{feature: released metric name} for the features the release allows (by name, else by signature)."""
    found, used = {}, set()
    infos = {m: rt.metric_info(m) for m in rt.metrics}
    for feat in features:
        types = METRIC_ROLES[feat][0]
        if feat in infos and infos[feat].get("type") in types:
            found[feat] = feat
            used.add(feat)
    for feat in features:
        if feat in found:
            continue
        for m in rt.metrics:
            if m not in used and m not in METRIC_ROLES and _matches(infos[m], METRIC_ROLES[feat]):
                found[feat] = m
                used.add(m)
                break
    return found


def _normal_ci(value: np.ndarray, std: np.ndarray):
    return confidence_interval(pa.table({"x": value, "x_std": std}), "x", "gaussian", 0.95)


def ratio_feature(num: np.ndarray, num_std: np.ndarray, den: np.ndarray, den_std: np.ndarray,
                  den_identified: np.ndarray, clip01: bool):
    """(value, std, ci_low, ci_high) of num/den by the delta method; NaN where den is not identified."""
    safe = np.maximum(den, 1.0)
    r = num / safe
    std = np.sqrt(num_std ** 2 + (r * den_std) ** 2) / safe
    low, high = _normal_ci(r, std)
    if clip01:
        r, low, high = np.clip(r, 0.0, 1.0), np.clip(low, 0.0, 1.0), np.clip(high, 0.0, 1.0)
    else:
        low = np.maximum(low, 0.0)
    nan = ~den_identified
    return tuple(np.where(nan, np.nan, a) for a in (r, std, low, high))


def _entity_features(rt: ReleasedTable, kind: str, key: str, features, ratios) -> pa.Table:
    if key not in rt.keys:
        raise ValueError(f"{kind} needs a released table keyed by {key!r}; {rt.output} is keyed by "
                         f"{list(rt.keys)}")
    resolved = resolve_metrics(rt, features)
    cols: dict = {k: rt.table.column(k) for k in rt.keys}
    described, missing = {}, {}
    num = {}
    for feat in features:
        m = resolved.get(feat)
        if m is None:
            missing[feat] = "no released metric " + _role_text(METRIC_ROLES[feat])
            continue
        low, high = rt.ci95(m)
        num[feat] = (rt.values(m), rt.stds(m), low > 0)
        cols[feat] = rt.table.column(m)
        cols[f"{feat}_std"], cols[f"{feat}_ci95_low"], cols[f"{feat}_ci95_high"] = rt.stds(m), low, high
        described[feat] = {"from": m, "method": f"released value; 95% interval for {rt.noise} noise"}
    for name in ratios:
        a, b, clip01 = RATIOS[name]
        if a not in num or b not in num:
            missing[name] = f"needs released {a} and {b}"
            continue
        (av, asd, _), (bv, bsd, b_ok) = num[a], num[b]
        value, std, low, high = ratio_feature(av, asd, bv, bsd, b_ok, clip01)
        for suffix, arr in (("", value), ("_std", std), ("_ci95_low", low), ("_ci95_high", high)):
            cols[name + suffix] = pa.array(arr, pa.float64(), from_pandas=True)  # NaN -> null
        described[name] = {"from": f"{resolved[a]} / {resolved[b]}",
                           "method": "ratio of noisy counts" + (", clipped to [0, 1]" if clip01 else "")
                           + "; delta-method std; normal 95% interval; null where the denominator's "
                             "95% interval reaches 0"}
    for m in rt.metrics:  # pass through whatever else the spec releases
        if m not in resolved.values() and m not in cols:
            low, high = rt.ci95(m)
            cols[m] = rt.table.column(m)
            cols[f"{m}_std"], cols[f"{m}_ci95_low"], cols[f"{m}_ci95_high"] = rt.stds(m), low, high
            described[m] = {"from": m, "method": "released value passed through"}
    meta = {
        "kind": kind, "version": 1, "date": rt.date, "epsilon": rt.epsilon, "delta": rt.delta,
        "additional_epsilon": 0.0, "additional_delta": 0.0,
        "post_processing_of": [rt.provenance()],
        "statement": f"post-processing of the released table {rt.output} for {rt.date}: no additional "
                     f"privacy budget; the ({rt.epsilon:g}, {rt.delta:g})-DP guarantee of that release applies",
        "features": described, "missing": missing,
    }
    table = pa.table(cols)
    return table.replace_schema_metadata({
        POSTPROCESSING_METADATA_KEY: json.dumps(meta, sort_keys=True).encode(),
        b"clickstream_dp.schema": f"features/{kind}/v1".encode()})


def _role_text(role) -> str:
    types, column, events = role
    text = "/".join(types)
    if column:
        text += f" of {column}"
    if events == ANY_FILTER:
        return text
    return text + (f" with filter event_type in ({', '.join(events)})" if events else " without filter")


def product_features(released_product_day: ReleasedTable) -> pa.Table:
    """Per-product features from the released product_day table (keyed by product_id)."""
    rt = require_released(released_product_day, "product_features input")
    return _entity_features(rt, "product_features", "product_id", PRODUCT_FEATURES, PRODUCT_RATIOS)


def category_features(released_category_day: ReleasedTable) -> pa.Table:
    """Per-category features from the released category_day table (keyed by category)."""
    rt = require_released(released_category_day, "category_features input")
    return _entity_features(rt, "category_features", "category", CATEGORY_FEATURES, CATEGORY_RATIOS)


def features_metadata(table: pa.Table) -> dict:
    return json.loads((table.schema.metadata or {})[POSTPROCESSING_METADATA_KEY])


def write_features(table: pa.Table, out_root: str, date: Optional[str] = None) -> str:
    """Writes ``<out_root>/<kind>/dt=DATE/part-00000.parquet`` atomically; returns the path."""
    meta = features_metadata(table)
    directory = os.path.join(os.fspath(out_root), meta["kind"], f"dt={date or meta['date']}")
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, "part-00000.parquet")
    tmp = path + ".tmp"
    pq.write_table(table, tmp)
    os.replace(tmp, path)
    return path


def build_all(released: dict, out_root: str, product_output: str = "product_day",
              category_output: str = "category_day") -> list:
    """Features of whichever of the two outputs are in ``released`` ({output: ReleasedTable}); paths."""
    paths = []
    if product_output in released:
        paths.append(write_features(product_features(released[product_output]), out_root))
    if category_output in released:
        paths.append(write_features(category_features(released[category_output]), out_root))
    return paths


def main(argv: Optional[list] = None) -> int:
    parser = argparse.ArgumentParser(prog="clickdp features",
                                     description="Feature tables from released tables (post-processing).")
    add_release_arguments(parser)
    parser.add_argument("--out", required=True, help="root for <kind>/dt=DATE/part-00000.parquet")
    parser.add_argument("--product-output", default="product_day")
    parser.add_argument("--category-output", default="category_day")
    args = parser.parse_args(argv)
    try:
        released = load_release(args.release, args.date, args.job)
        paths = build_all(released, args.out, args.product_output, args.category_output)
    except (OSError, ValueError) as e:
        print(f"clickdp features: {e}", file=sys.stderr)
        return 1
    if not paths:
        print(f"clickdp features: neither {args.product_output} nor {args.category_output} was released",
              file=sys.stderr)
        return 1
    for p in paths:
        print(p)
    return 0


if __name__ == "__main__":
    sys.exit(main())
