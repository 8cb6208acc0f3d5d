"""LLM-ready text corpus (JSONL) rendered from released tables only (post-processing, no extra budget).

Every renderer takes ``ReleasedTable`` (transforms/released.py): a raw pa.Table, a path or raw events are
refused with TypeError / NotReleasedError, so no text can be rendered from unreleased data. The one other
input, a ``PublicCatalog`` (product_id -> category, e.g. the generator's ``catalog/products.csv``), is public
reference data, not shopper data; it refuses files with identifier columns or repeated product ids.

One record per line::

    {"kind": "product_summary", "provenance": {"output", "date", "epsilon", "delta", "file", "spec_hash",
     "job", "run_id"}, "text": "..."}

Each record is rendered from exactly one released table, named by its provenance. Kinds:
``category_summary``, ``category_top_products`` (needs a catalog), ``product_summary``, ``also_viewed`` /
``also_bought`` (from a released neighbours table: product_id, neighbour, rank, count, count_std) and
``popular_searches`` (from a released query table: query, optional category, users, users_std).

Wording carries the uncertainty: every number is "about" a value rounded to the decade of its 95% interval's
half width (4,594 +- 119.8 -> "about 4,600 (±120)"); a count whose interval reaches 0 is said to be "few
(under about <upper end>)" or left out; revenue, prices and rates whose interval reaches 0 (or is wider
than the value) are left out. Counts are bounded counts (each shopper adds at most a fixed number of events
per partition), so they understate heavy activity; the text says "about", never "exactly". Output is
deterministic given the inputs (fixed orders, no randomness).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
import unicodedata
from typing import Iterable, Mapping, Optional, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from transforms import features as feats
from transforms.released import (
    IDENTIFIER_COLUMNS,
    NotReleasedError,
    ReleasedTable,
    add_release_arguments,
    half_width_95,
    load_release,
    require_released,
)

MAX_QUERY_CHARS = 80


# --- public catalog ---------------------------------------------------------------------------------
class PublicCatalog:
    """product_id -> category from a public catalog file (CSV or Parquet), never from shopper data."""

    def __init__(self, mapping: Mapping[str, str], source: str = "in-memory"):
        self._map = {str(k): str(v) for k, v in mapping.items() if v is not None}
        self.source = source

    @classmethod
    def load(cls, path: str) -> "PublicCatalog":
        path = os.fspath(path)
        try:
            table = pq.read_table(path) if path.endswith(".parquet") else pacsv.read_csv(path)
        except (OSError, pa.ArrowException) as e:
            raise ValueError(f"catalog {path}: unreadable ({e})") from None
        bad = sorted(set(table.column_names) & IDENTIFIER_COLUMNS)
        if bad:
            raise NotReleasedError(f"catalog {path}: has identifier column(s) {', '.join(bad)}; a catalog is "
                                   "public product data (product_id, category), never raw events")
        if not {"product_id", "category"} <= set(table.column_names):
            raise ValueError(f"catalog {path}: needs columns product_id and category, has {table.column_names}")
        ids = table.column("product_id").cast(pa.string()).to_pylist()
        if len(set(ids)) != len(ids):
            raise NotReleasedError(f"catalog {path}: product ids repeat, so it is not a catalog (one row per "
                                   "product); raw events are never valid input")
        return cls(dict(zip(ids, table.column("category").cast(pa.string()).to_pylist())), path)

    def get(self, product_id: str) -> Optional[str]:
        return self._map.get(product_id)


# --- number wording ---------------------------------------------------------------------------------
def _step(half: float) -> float:
    """The decade of a 95% half width: values are rounded to it (half 119.8 -> 100)."""
    return 10.0 ** math.floor(math.log10(half)) if half > 0 and math.isfinite(half) else 1.0


def _decimals(step: float) -> int:
    return max(0, -math.floor(math.log10(step))) if step < 1 else 0


def _fmt(x: float, step: float, money: str = "") -> str:
    return f"{money}{round(x / step) * step:,.{_decimals(step)}f}"


def _about(value: float, half: float, money: str = "") -> tuple:
    """('about 4,600', '±120'): the value rounded to the decade of the half width, the half width to 2 digits."""
    step = _step(half)
    return f"about {_fmt(value, step, money)}", f"±{_fmt(half, step / 10, money)}"


def _under(high: float) -> str:
    """'under about 130': the interval's upper end rounded up to 2 significant digits."""
    high = max(float(high), 1.0)
    step = 10.0 ** (math.floor(math.log10(high)) - 1)
    return f"under about {_fmt(math.ceil(high / step) * step, max(step, 1.0))}"


def _pct(x: float, step: float) -> str:
    return _fmt(100.0 * x, max(100.0 * step, 0.1)) + "%"


class _Metric:
    """Value, 95% half width and interval of one released metric (or feature) per row."""

    def __init__(self, value, half, low, high):
        self.value, self.half, self.low, self.high = value, half, low, high

    @classmethod
    def released(cls, rt: ReleasedTable, metric: str) -> "_Metric":
        low, high = rt.ci95(metric)
        return cls(rt.values(metric), half_width_95(rt.stds(metric), rt.noise), low, high)

    def identified(self, i: int) -> bool:
        """The 95% interval excludes 0, and so does its rounded wording: 'about 100 (±120)' or an interval
        shown as '0% to 100%' would not."""
        step = _step(self.half[i])
        return bool(self.low[i] > 0 and round(self.value[i] / step) * step > self.half[i]
                    and round(self.low[i] / step) * step > 0)


_BIDI_CONTROLS = frozenset("\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")


def _clean_query(q) -> Optional[str]:
    """For rendering only: control / unassigned characters and bidi overrides become spaces (format
    characters such as the zero-width joiners that some scripts need are kept), whitespace collapses and
    the text is cut at MAX_QUERY_CHARS. Queries are normalized and scrubbed before release; this is a
    second guard for the text, not the privacy mechanism."""
    if q is None:
        return None
    text = "".join(" " if ch in _BIDI_CONTROLS or unicodedata.category(ch) in ("Cc", "Cs", "Co", "Cn") else ch
                   for ch in str(q))
    text = re.sub(r"\s+", " ", text).strip()
    if len(text) > MAX_QUERY_CHARS:
        text = text[:MAX_QUERY_CHARS - 1].rstrip() + "…"
    return text or None


def _record(kind: str, text: str, rt: ReleasedTable) -> dict:
    return {"kind": kind, "text": text, "provenance": rt.provenance()}


def _join(items: Sequence[str]) -> str:
    items = list(items)
    if len(items) <= 1:
        return "".join(items)
    return ", ".join(items[:-1]) + " and " + items[-1]


# --- renderers --------------------------------------------------------------------------------------
def _product_category(rt: ReleasedTable, catalog: Optional[PublicCatalog], i: int, pid: str) -> Optional[str]:
    if "category" in rt.keys:
        return rt.table.column("category")[i].as_py()
    return catalog.get(pid) if catalog is not None else None


def product_summaries(product_day: ReleasedTable, catalog: Optional[PublicCatalog] = None,
                      currency: str = "$") -> list:
    rt = require_released(product_day, "product_day")
    if "product_id" not in rt.keys:
        raise ValueError(f"product summaries need a table keyed by product_id; {rt.output} has {list(rt.keys)}")
    resolved = feats.resolve_metrics(rt, feats.PRODUCT_FEATURES)
    m = {f: _Metric.released(rt, name) for f, name in resolved.items()}
    ftable = feats.product_features(rt)
    rates = {r: _Metric(*(ftable.column(r + s).to_numpy(zero_copy_only=False) for s in
                          ("", "_std", "_ci95_low", "_ci95_high")))
             for r in feats.PRODUCT_RATIOS if r in ftable.column_names}
    for r in rates.values():
        r.half = 1.96 * r.half  # normal 95% half width from the delta-method std
    ids = rt.table.column("product_id").to_pylist()
    out = []
    for i in sorted(range(len(ids)), key=lambda j: ids[j]):
        pid = ids[i]
        cat = _product_category(rt, catalog, i, pid)
        name = f"Product {pid}" + (f" (category {cat})" if cat else "")
        s = []
        if "views" in m and m["views"].identified(i):
            a, pm = _about(m["views"].value[i], m["views"].half[i])
            s.append(f"{name} was viewed {a} times on {rt.date} ({pm}, 95% interval).")
        elif "views" in m:
            s.append(f"{name} had few views on {rt.date} ({_under(m['views'].high[i])}).")
        else:
            s.append(f"{name} was among the products released for {rt.date}.")
        few = []
        phrases = {"add_to_carts": ("It was added to a cart {} times ({}).", "add-to-carts"),
                   "purchases": ("It was bought {} times ({}).", "purchases"),
                   "distinct_buyers": ("It had {} different buyers ({}).", "buyers")}
        for f in ("add_to_carts", "purchases", "distinct_buyers"):
            if f not in m:
                continue
            if m[f].identified(i):
                s.append(phrases[f][0].format(*_about(m[f].value[i], m[f].half[i])))
            else:
                few.append(f"few {phrases[f][1]} ({_under(m[f].high[i])})")
        if few:
            s.append("It had " + _join(few) + ".")
        if "revenue" in m and m["revenue"].identified(i):
            s.append("It brought in {} in revenue ({}).".format(
                *_about(m["revenue"].value[i], m["revenue"].half[i], currency)))
        mp = m.get("mean_price")
        if mp is not None and mp.half[i] < 0.5 * mp.value[i]:
            s.append("Its average viewed price was {} ({}).".format(*_about(mp.value[i], mp.half[i], currency)))
        for r, what in (("view_to_cart_rate", "an add-to-cart"), ("view_to_purchase_rate", "a purchase")):
            rm = rates.get(r)
            if rm is None or not np.isfinite(rm.value[i]) or not rm.identified(i):
                continue
            step = _step(rm.half[i])
            s.append(f"About {_pct(rm.value[i], step)} of its views led to {what} "
                     f"(95% interval {_pct(rm.low[i], step)} to {_pct(rm.high[i], step)}).")
        out.append(_record("product_summary", " ".join(s), rt))
    return out


def category_summaries(category_day: ReleasedTable, currency: str = "$") -> list:
    rt = require_released(category_day, "category_day")
    if "category" not in rt.keys:
        raise ValueError(f"category summaries need a table keyed by category; {rt.output} has {list(rt.keys)}")
    resolved = feats.resolve_metrics(rt, feats.CATEGORY_FEATURES)
    m = {f: _Metric.released(rt, name) for f, name in resolved.items()}
    ftable = feats.category_features(rt)
    epu = None
    if "events_per_user" in ftable.column_names:
        epu = [ftable.column("events_per_user" + s).to_numpy(zero_copy_only=False) for s in ("", "_std")]
    cats = rt.table.column("category").to_pylist()
    out = []
    for i in sorted(range(len(cats)), key=lambda j: cats[j]):
        s = []
        lead = f"In the {cats[i]} category on {rt.date}"
        if "events" in m and m["events"].identified(i):
            a, pm = _about(m["events"].value[i], m["events"].half[i])
            s.append(f"{lead}, shoppers generated {a} shopping events ({pm}, 95% interval).")
        elif "events" in m:
            s.append(f"{lead}, shoppers generated few shopping events ({_under(m['events'].high[i])}).")
        else:
            s.append(f"{lead}:")
        du = m.get("distinct_users")
        if du is not None and du.identified(i):
            a, pm = _about(du.value[i], du.half[i])
            s.append(f"{a.capitalize()} different shoppers were active there ({pm}).")
            if epu is not None and np.isfinite(epu[0][i]):
                s.append("Each of them had {} events there on average ({}).".format(
                    *_about(epu[0][i], 1.96 * epu[1][i])))
        elif du is not None:
            s.append(f"Few different shoppers were active there ({_under(du.high[i])}).")
        for f, text in (("views", "Products were viewed {} times ({})."),
                        ("purchases", "Products were bought {} times ({}).")):
            if f in m and m[f].identified(i):
                s.append(text.format(*_about(m[f].value[i], m[f].half[i])))
        if "revenue" in m and m["revenue"].identified(i):
            s.append("Purchases brought in {} ({}).".format(
                *_about(m["revenue"].value[i], m["revenue"].half[i], currency)))
        out.append(_record("category_summary", " ".join(s), rt))
    return out


def category_top_products(product_day: ReleasedTable, catalog: Optional[PublicCatalog], top_k: int = 5) -> list:
    """'Among the most viewed products in <category>: ...' (needs categories: a catalog or a category key)."""
    rt = require_released(product_day, "product_day")
    if catalog is None and "category" not in rt.keys:
        return []
    resolved = feats.resolve_metrics(rt, ("views",))
    if "views" not in resolved:
        return []
    v = _Metric.released(rt, resolved["views"])
    ids = rt.table.column("product_id").to_pylist()
    by_cat: dict = {}
    for i, pid in enumerate(ids):
        cat = _product_category(rt, catalog, i, pid)
        if cat and v.identified(i):
            by_cat.setdefault(cat, []).append(i)
    out = []
    for cat in sorted(by_cat):
        rows = sorted(by_cat[cat], key=lambda j: (-v.value[j], ids[j]))[:top_k]
        items = ["{} ({} views, {})".format(ids[j], *_about(v.value[j], v.half[j])) for j in rows]
        out.append(_record("category_top_products",
                           f"Among the most viewed products in the {cat} category on {rt.date}: "
                           f"{_join(items)}.", rt))
    return out


def _single_metric(rt: ReleasedTable, preferred: Sequence[str]) -> str:
    for name in preferred:
        if name in rt.metrics:
            return name
    return rt.metrics[0]


def also_viewed(neighbours: ReleasedTable, catalog: Optional[PublicCatalog] = None, top_k: int = 5) -> list:
    """'Shoppers who viewed X also viewed Y (about N times together, ±H), ...' from a released neighbours table.

    The verb is 'bought' when the output's name mentions buying or purchases, else 'viewed'.
    """
    rt = require_released(neighbours, "neighbours")
    if not {"product_id", "neighbour"} <= set(rt.keys):
        raise ValueError(f"a neighbours table needs keys product_id and neighbour; {rt.output} has {list(rt.keys)}")
    bought = any(w in rt.output.lower() for w in ("bought", "purchase", "buy"))
    verb, kind = ("bought", "also_bought") if bought else ("viewed", "also_viewed")
    c = _Metric.released(rt, _single_metric(rt, ("count", "sessions", "users")))
    pids = rt.table.column("product_id").to_pylist()
    nbs = rt.table.column("neighbour").to_pylist()
    ranks = rt.table.column("rank").to_pylist() if "rank" in rt.table.column_names else [0] * len(pids)
    by_pid: dict = {}
    for i, pid in enumerate(pids):
        if c.identified(i) and nbs[i] != pid:
            by_pid.setdefault(pid, []).append(i)
    out = []
    for pid in sorted(by_pid):
        rows = sorted(by_pid[pid], key=lambda j: (ranks[j] if ranks[j] is not None else 1 << 30,
                                                  -c.value[j], nbs[j]))[:top_k]
        items = []
        for j in rows:
            cat = catalog.get(nbs[j]) if catalog is not None else None
            a, pm = _about(c.value[j], c.half[j])
            items.append(f"{nbs[j]} (" + (f"{cat}, " if cat else "") + f"{a} times together, {pm})")
        out.append(_record(kind, f"Shoppers who {verb} {pid} on {rt.date} also {verb} {_join(items)}.", rt))
    return out


def popular_searches(queries: ReleasedTable, top_k: int = 10) -> list:
    """'Popular searches in <category> on D: "q" (about N shoppers, ±H), ...' from a released query table."""
    rt = require_released(queries, "queries")
    if "query" not in rt.keys:
        raise ValueError(f"a query table needs the key 'query'; {rt.output} has {list(rt.keys)}")
    u = _Metric.released(rt, _single_metric(rt, ("users", "distinct_users", "count")))
    qs = [_clean_query(q) for q in rt.table.column("query").to_pylist()]
    cats = rt.table.column("category").to_pylist() if "category" in rt.keys else [None] * len(qs)
    groups: dict = {}
    for i, q in enumerate(qs):
        if q and u.identified(i):
            groups.setdefault(cats[i] or "", []).append(i)
    out = []
    for cat in sorted(groups):
        rows = sorted(groups[cat], key=lambda j: (-u.value[j], qs[j]))[:top_k]
        items = ["\"{}\" ({} shoppers, {})".format(qs[j], *_about(u.value[j], u.half[j])) for j in rows]
        where = f" in the {cat} category" if cat else ""
        out.append(_record("popular_searches", f"Popular searches{where} on {rt.date}: {_join(items)}.", rt))
    return out


def _as_list(x) -> list:
    if x is None:
        return []
    return [x] if not isinstance(x, (list, tuple)) else list(x)


def render_corpus(product_day: Optional[ReleasedTable] = None, category_day: Optional[ReleasedTable] = None,
                  *, neighbours=None, queries=None, catalog: Optional[PublicCatalog] = None,
                  currency: str = "$") -> list:
    """All records, in a fixed order. Every table argument must be a ReleasedTable (or None / a list)."""
    records = []
    if category_day is not None:
        records += category_summaries(category_day, currency)
    if product_day is not None:
        records += category_top_products(product_day, catalog)
        records += product_summaries(product_day, catalog, currency)
    for nb in _as_list(neighbours):
        records += also_viewed(nb, catalog)
    for q in _as_list(queries):
        records += popular_searches(q)
    return records


def classify_release(released: Mapping[str, ReleasedTable]) -> dict:
    """Sorts a release's tables into the renderers' inputs by their keys."""
    roles = {"product_day": None, "category_day": None, "neighbours": [], "queries": []}
    for name in sorted(released):
        rt = require_released(released[name], name)
        keys = set(rt.keys)
        if {"product_id", "neighbour"} <= keys:
            roles["neighbours"].append(rt)
        elif "query" in keys:
            roles["queries"].append(rt)
        elif rt.keys == ("product_id",) and roles["product_day"] is None:
            roles["product_day"] = rt
        elif rt.keys == ("category",) and roles["category_day"] is None:
            roles["category_day"] = rt
    return roles


def render_release(released: Mapping[str, ReleasedTable], catalog: Optional[PublicCatalog] = None) -> list:
    return render_corpus(**classify_release(released), catalog=catalog)


def to_jsonl(records: Iterable[dict]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n" for r in records)


def write_corpus(records: Iterable[dict], path: str) -> str:
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8", newline="\n") as fh:
        fh.write(to_jsonl(records))
    os.replace(tmp, path)
    return path


def main(argv: Optional[list] = None) -> int:
    parser = argparse.ArgumentParser(prog="clickdp corpus",
                                     description="JSONL text corpus from released tables (post-processing).")
    add_release_arguments(parser)
    parser.add_argument("--catalog", help="public catalog (CSV/Parquet with product_id, category)")
    parser.add_argument("--out", required=True, help="output .jsonl path")
    args = parser.parse_args(argv)
    try:
        catalog = PublicCatalog.load(args.catalog) if args.catalog else None
        records = render_release(load_release(args.release, args.date, args.job), catalog)
        write_corpus(records, args.out)
    except (OSError, ValueError) as e:
        print(f"clickdp corpus: {e}", file=sys.stderr)
        return 1
    kinds: dict = {}
    for r in records:
        kinds[r["kind"]] = kinds.get(r["kind"], 0) + 1
    print(f"{args.out}: {len(records)} records ({', '.join(f'{k}: {v}' for k, v in sorted(kinds.items()))})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
