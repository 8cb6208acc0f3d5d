"""The nightly job spec: one YAML file per job, validated before any data is read.

Every error is a ``SpecError`` whose message starts with the dotted path of the
offending field (``outputs[1].metrics[0].bounds: min 5 > max 1``), so a bad spec
fails on the launching machine, never on a worker.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import re
from typing import Any, Mapping, Optional, Sequence

import yaml

from schemas import events

NOISE_KINDS = ("laplace", "gaussian")
ACCOUNTANTS = ("naive", "pld")  # see transforms/accounting.py
METRIC_TYPES = ("count", "privacy_id_count", "sum", "mean", "variance")
VALUE_METRICS = ("sum", "mean", "variance")
SELECTION_STRATEGIES = ("truncated_geometric", "laplace_thresholding", "gaussian_thresholding")
# Columns a filter or partition key may name (validated events).
EVENT_COLUMNS = tuple(events.VALID_EVENT_SCHEMA.names)
NUMERIC_COLUMNS = ("price", "quantity", "amount")
KEY_COLUMNS = ("product_id", "category", "event_type", "device", "country", "referrer")
# Identifiers that must never be released or used as a partition key.
IDENTIFIER_COLUMNS = ("user_id", "session_id", "event_id")
_NAME_RE = re.compile(r"^[a-z][a-z0-9_]{0,62}$")


class SpecError(ValueError):
    """A job spec field is invalid; the message starts with the field's path."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field


def _require(cond: bool, field: str, message: str) -> None:
    if not cond:
        raise SpecError(field, message)


def _number(value: Any, field: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise SpecError(field, f"must be a number, got {value!r}")
    if not math.isfinite(value):
        raise SpecError(field, f"must be finite, got {value!r}")
    return float(value)


def _int(value: Any, field: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise SpecError(field, f"must be an integer, got {value!r}")
    _require(value >= minimum, field, f"must be >= {minimum}, got {value}")
    return value


def _check_keys(raw: Mapping, allowed: Sequence[str], field: str) -> None:
    if not isinstance(raw, Mapping):
        raise SpecError(field, f"must be a mapping, got {type(raw).__name__}")
    unknown = sorted(set(raw) - set(allowed))
    if unknown:
        raise SpecError(f"{field}.{unknown[0]}" if field else unknown[0],
                        f"unknown field; allowed: {', '.join(allowed)}")


@dataclasses.dataclass(frozen=True)
class Filter:
    """A conjunction of ``column == value`` / ``column in (values)`` / ``!=`` terms."""

    terms: tuple  # ((column, op, (values...)), ...) with op in {"in", "not in"}

    @staticmethod
    def parse(raw: Any, field: str) -> Optional["Filter"]:
        if raw is None:
            return None
        terms = []
        if isinstance(raw, Mapping):
            for column, values in raw.items():
                vals = tuple(values) if isinstance(values, (list, tuple)) else (values,)
                terms.append((column, "in", tuple(str(v) for v in vals)))
        elif isinstance(raw, str):
            for part in re.split(r"\s+and\s+", raw.strip()):
                m = re.fullmatch(r"(\w+)\s*(==|!=|not in|in)\s*(.+)", part.strip())
                _require(m is not None, field,
                         f"cannot parse {part!r}; use 'column == value', 'column != value' "
                         "or 'column in (a, b)', joined by 'and'")
                column, op, rhs = m.group(1), m.group(2), m.group(3).strip()
                if op in ("in", "not in"):
                    _require(rhs[:1] in "([" and rhs[-1:] in ")]", field,
                             f"{op!r} needs a list like (a, b), got {rhs!r}")
                    vals = tuple(v.strip().strip("'\"") for v in rhs[1:-1].split(",") if v.strip())
                else:
                    vals = (rhs.strip("'\""),)
                terms.append((column, "in" if op in ("==", "in") else "not in", vals))
        else:
            raise SpecError(field, f"must be a string like 'event_type == purchase' or a mapping, got {raw!r}")
        for column, _, vals in terms:
            _require(column in KEY_COLUMNS, field,
                     f"unknown filter column {column!r}; allowed: {', '.join(KEY_COLUMNS)}")
            _require(len(vals) > 0, field, "empty value list")
            if column == "event_type":
                bad = [v for v in vals if v not in events.EVENT_TYPES]
                if bad:
                    raise SpecError(field, f"unknown event_type {bad[0]!r}; known: {', '.join(events.EVENT_TYPES)}")
        return Filter(tuple(terms))

    def columns(self) -> tuple:
        return tuple(sorted({c for c, _, _ in self.terms}))

    def describe(self) -> str:
        return " and ".join(f"{c} {op} ({', '.join(v)})" for c, op, v in self.terms)

    def union_key(self) -> tuple:
        return self.terms


@dataclasses.dataclass(frozen=True)
class Bounds:
    """Contribution bounds of one output, applied globally per privacy unit."""

    max_partitions_contributed: int  # L0
    max_contributions_per_partition: int  # Linf
    max_contributions: Optional[int] = None  # optional cap on a unit's total rows

    @staticmethod
    def parse(raw: Any, field: str, default: Optional["Bounds"] = None) -> "Bounds":
        raw = {} if raw is None else raw
        _check_keys(raw, ("max_partitions_contributed", "max_contributions_per_partition",
                          "max_contributions"), field)
        base = dataclasses.asdict(default) if default else {}
        merged = {**base, **raw}
        for name in ("max_partitions_contributed", "max_contributions_per_partition"):
            _require(name in merged, f"{field}.{name}", "is required")
        l0 = _int(merged["max_partitions_contributed"], f"{field}.max_partitions_contributed", 1)
        linf = _int(merged["max_contributions_per_partition"], f"{field}.max_contributions_per_partition", 1)
        total = merged.get("max_contributions")
        if total is not None:
            total = _int(total, f"{field}.max_contributions", 1)
        return Bounds(l0, linf, total)

    @property
    def max_partitions_touched(self) -> int:
        """How many partitions one unit can reach after bounding."""
        if self.max_contributions is None:
            return self.max_partitions_contributed
        return min(self.max_partitions_contributed, self.max_contributions)


@dataclasses.dataclass(frozen=True)
class Metric:
    name: str
    type: str
    column: Optional[str] = None
    min_value: Optional[float] = None
    max_value: Optional[float] = None
    filter: Optional[Filter] = None
    weight: float = 1.0

    @staticmethod
    def parse(raw: Any, field: str) -> "Metric":
        _check_keys(raw, ("name", "type", "column", "bounds", "filter", "weight"), field)
        _require("name" in raw, f"{field}.name", "is required")
        name = raw["name"]
        _require(isinstance(name, str) and bool(_NAME_RE.match(name)), f"{field}.name",
                 f"must be a lower_snake_case identifier, got {name!r}")
        mtype = raw.get("type")
        _require(mtype in METRIC_TYPES, f"{field}.type",
                 f"unknown metric {mtype!r}; known: {', '.join(METRIC_TYPES)}")
        column = raw.get("column")
        lo = hi = None
        if mtype in VALUE_METRICS:
            _require(column is not None, f"{field}.column", f"is required for a {mtype} metric")
            _require(column in NUMERIC_COLUMNS, f"{field}.column",
                     f"unknown or non-numeric column {column!r}; numeric columns: {', '.join(NUMERIC_COLUMNS)}")
            bounds = raw.get("bounds")
            _require(isinstance(bounds, (list, tuple)) and len(bounds) == 2, f"{field}.bounds",
                     f"is required for a {mtype} metric as [min, max], got {bounds!r}")
            lo = _number(bounds[0], f"{field}.bounds")
            hi = _number(bounds[1], f"{field}.bounds")
            _require(lo <= hi, f"{field}.bounds", f"min {lo:g} > max {hi:g}")
            if mtype != "sum":
                _require(lo < hi, f"{field}.bounds", f"min must be < max for a {mtype}")
        else:
            _require(column is None, f"{field}.column", f"a {mtype} metric takes no column")
            _require(raw.get("bounds") is None, f"{field}.bounds", f"a {mtype} metric takes no bounds")
        weight = _number(raw.get("weight", 1.0), f"{field}.weight")
        _require(weight > 0, f"{field}.weight", f"must be > 0, got {weight:g}")
        return Metric(name, mtype, column, lo, hi, Filter.parse(raw.get("filter"), f"{field}.filter"), weight)

    @property
    def n_mechanisms(self) -> int:
        return {"count": 1, "privacy_id_count": 1, "sum": 1, "mean": 2, "variance": 3}[self.type]


@dataclasses.dataclass(frozen=True)
class Selection:
    kind: str  # "private" | "public"
    strategy: str = "truncated_geometric"
    keys_file: Optional[str] = None
    pre_threshold: Optional[int] = None
    budget_fraction: Optional[float] = None  # share of the output's budget; default: one metric's share

    @staticmethod
    def parse(raw: Any, field: str, base_dir: str) -> "Selection":
        raw = {"type": "private"} if raw is None else raw
        _check_keys(raw, ("type", "strategy", "keys_file", "pre_threshold", "budget_fraction"), field)
        kind = raw.get("type")
        _require(kind in ("private", "public"), f"{field}.type", f"must be 'private' or 'public', got {kind!r}")
        if kind == "public":
            keys_file = raw.get("keys_file")
            _require(isinstance(keys_file, str) and keys_file != "", f"{field}.keys_file",
                     "is required for public partitions (a file with one key per line, or a CSV with the key column)")
            keys_file = os.path.expandvars(keys_file)
            if "://" not in keys_file and not os.path.isabs(keys_file):
                keys_file = os.path.normpath(os.path.join(base_dir, keys_file))
            for name in ("strategy", "pre_threshold", "budget_fraction"):
                _require(name not in raw, f"{field}.{name}", "only applies to private selection")
            return Selection("public", keys_file=keys_file)
        strategy = raw.get("strategy", "truncated_geometric")
        _require(strategy in SELECTION_STRATEGIES, f"{field}.strategy",
                 f"unknown strategy {strategy!r}; known: {', '.join(SELECTION_STRATEGIES)}")
        pre = raw.get("pre_threshold")
        if pre is not None:
            pre = _int(pre, f"{field}.pre_threshold", 1)
        frac = raw.get("budget_fraction")
        if frac is not None:
            frac = _number(frac, f"{field}.budget_fraction")
            _require(0 < frac < 1, f"{field}.budget_fraction", f"must be in (0, 1), got {frac:g}")
        _require("keys_file" not in raw, f"{field}.keys_file", "only applies to public selection")
        return Selection("private", strategy=strategy, pre_threshold=pre, budget_fraction=frac)


@dataclasses.dataclass(frozen=True)
class Output:
    name: str
    partition_keys: tuple
    metrics: tuple
    bounds: Bounds
    selection: Selection
    budget_weight: float = 1.0
    filter: Optional[Filter] = None
    kind: str = "aggregate"  # aggregate | pairs | queries
    params: tuple = ()  # kind-specific settings, ((name, value), ...)

    @property
    def options(self) -> dict:
        return dict(self.params)

    @property
    def needed_columns(self) -> tuple:
        if self.kind == "pairs":
            return ("event_type", "product_id", "session_id")
        if self.kind == "queries":
            extra = ("category", "event_time", "session_id") if self.options["by_category"] else ()
            return tuple(sorted(("event_type", "search_query") + extra))
        cols = set(self.partition_keys)
        for f in [self.filter] + [m.filter for m in self.metrics]:
            if f is not None:
                cols.update(f.columns())
        cols.update(m.column for m in self.metrics if m.column)
        return tuple(sorted(cols))


@dataclasses.dataclass(frozen=True)
class PostProcessing:
    round_counts: bool = True
    clamp_counts_at_zero: bool = True
    clamp_means_to_bounds: bool = True


@dataclasses.dataclass(frozen=True)
class LedgerConfig:
    """The privacy ledger's rolling window: at most ``max_epsilon`` at ``delta`` over any
    ``window_days`` consecutive days (see transforms/ledger.py). No cap if max_epsilon is unset."""

    path: Optional[str] = None  # default: <quarantine>/_ledger/ledger.sqlite
    window_days: int = 30
    max_epsilon: Optional[float] = None
    delta: Optional[float] = None
    accountant: Optional[str] = None  # default: the spec's accountant

    @staticmethod
    def parse(raw: Any, field: str, base_dir: str) -> "LedgerConfig":
        raw = {} if raw is None else raw
        _check_keys(raw, ("path", "window_days", "max_epsilon", "delta", "accountant"), field)
        path = raw.get("path")
        if path is not None:
            _require(isinstance(path, str) and path != "", f"{field}.path", f"must be a file path, got {path!r}")
            path = os.path.expanduser(os.path.expandvars(path))
            _require("://" not in path, f"{field}.path",
                     f"must be a local file (SQLite cannot live on an object store), got {path!r}")
            if not os.path.isabs(path):
                path = os.path.normpath(os.path.join(base_dir, path))
        window = _int(raw.get("window_days", 30), f"{field}.window_days", 1)
        _require(window <= 3660, f"{field}.window_days", f"must be <= 3660, got {window}")
        cap = raw.get("max_epsilon")
        delta = raw.get("delta")
        if cap is not None:
            cap = _number(cap, f"{field}.max_epsilon")
            _require(cap > 0, f"{field}.max_epsilon", f"must be > 0, got {cap:g}")
            _require(delta is not None, f"{field}.delta", "is required with max_epsilon (the cap is epsilon at this delta)")
        if delta is not None:
            delta = _number(delta, f"{field}.delta")
            _require(0 < delta < 1, f"{field}.delta", f"must be in (0, 1), got {delta:g}")
        accountant = raw.get("accountant")
        _require(accountant is None or accountant in ACCOUNTANTS, f"{field}.accountant",
                 f"must be one of {', '.join(ACCOUNTANTS)}, got {accountant!r}")
        return LedgerConfig(path, window, cap, delta, accountant)


@dataclasses.dataclass(frozen=True)
class JobSpec:
    job: str
    privacy_unit: str
    epsilon: float
    delta: float
    noise: str
    accountant: str
    column_mapping: tuple  # ((canonical, source), ...)
    outputs: tuple
    post_processing: PostProcessing
    spec_hash: str
    source_path: Optional[str] = None
    # Ledger settings (window and cap) are read here so the spec is validated whole.
    ledger: LedgerConfig = LedgerConfig()
    # Per-user local-DP feature tables: their own guarantee, outside the central budget.
    local_outputs: tuple = ()

    @property
    def ledger_accountant(self) -> str:
        return self.ledger.accountant or self.accountant

    def output(self, name: str) -> Output:
        for o in self.outputs:
            if o.name == name:
                return o
        raise KeyError(name)

    @property
    def mapping(self) -> dict:
        return dict(self.column_mapping)


_TOP_FIELDS = ("job", "privacy_unit", "budget", "noise", "accountant", "column_mapping",
               "contribution_bounds", "outputs", "post_processing", "ledger")


OUTPUT_KINDS = ("aggregate", "pairs", "queries", "local_dp")


@dataclasses.dataclass(frozen=True)
class LocalOutput:
    """Per-user local-DP feature vectors: each shopper's row randomized on its own.

    The guarantee is local: every row's values are epsilon-LDP. Which shoppers have a
    row (and how many rows there are) is NOT hidden, so this is not the add/remove
    guarantee of the central outputs; it is charged to the ledger as its own epsilon.
    """

    name: str
    epsilon: float
    categories: tuple
    row_key: str = "none"  # none | pseudonym (HMAC with a key given at run time)
    category_mode: str = "top_krr"
    activity_clip: int = 20

    @staticmethod
    def parse(o: Mapping, f: str, base_dir: str) -> "LocalOutput":
        _check_keys(o, ("name", "kind", "local_dp"), f)
        name = o.get("name")
        _require(isinstance(name, str) and bool(_NAME_RE.match(name)), f"{f}.name",
                 f"must be a lower_snake_case identifier, got {name!r}")
        opts = o.get("local_dp") or {}
        _check_keys(opts, ("epsilon", "categories_file", "row_key", "category_mode", "activity_clip"),
                    f"{f}.local_dp")
        _require("epsilon" in opts, f"{f}.local_dp.epsilon", "is required (the per-user local epsilon)")
        eps = _number(opts["epsilon"], f"{f}.local_dp.epsilon")
        _require(eps > 0, f"{f}.local_dp.epsilon", f"must be > 0, got {eps:g}")
        path = opts.get("categories_file")
        _require(isinstance(path, str) and path != "", f"{f}.local_dp.categories_file",
                 "is required: the PUBLIC category list (one per line)")
        path = os.path.expandvars(path)
        if not os.path.isabs(path):
            path = os.path.normpath(os.path.join(base_dir, path))
        try:
            with open(path, encoding="utf-8") as fh:
                cats = tuple(dict.fromkeys(ln.strip() for ln in fh if ln.strip()))
        except OSError as exc:
            raise SpecError(f"{f}.local_dp.categories_file", f"cannot read {path}: {exc}") from None
        _require(len(cats) > 0, f"{f}.local_dp.categories_file", f"{path} lists no categories")
        row_key = opts.get("row_key", "none")
        _require(row_key in ("none", "pseudonym"), f"{f}.local_dp.row_key",
                 f"must be 'none' or 'pseudonym', got {row_key!r}")
        mode = opts.get("category_mode", "top_krr")
        _require(mode in ("histogram", "top_krr"), f"{f}.local_dp.category_mode",
                 f"must be 'histogram' or 'top_krr', got {mode!r}")
        clip = _int(opts.get("activity_clip", 20), f"{f}.local_dp.activity_clip", 1)
        return LocalOutput(name, eps, cats, row_key, mode, clip)
_PAIR_TYPES = ("viewed", "bought")


def _parse_special_output(o: Mapping, f: str, base_dir: str) -> Output:
    """Outputs with implied keys and metric: co-occurring product pairs, search queries.

    Both release a distinct-user count per key ("users") through private partition
    selection; each user contributes each key at most once and at most
    max_*_per_user keys (L0 = that cap, Linf = 1), bounded globally per user.
    """
    kind = o.get("kind")
    _require(kind in OUTPUT_KINDS, f"{f}.kind", f"unknown output kind {kind!r}; known: {', '.join(OUTPUT_KINDS)}")
    _check_keys(o, ("name", "kind", kind, "selection", "budget_weight"), f)
    name = o.get("name")
    _require(isinstance(name, str) and bool(_NAME_RE.match(name)), f"{f}.name",
             f"must be a lower_snake_case identifier, got {name!r}")
    opts = o.get(kind) or {}
    if kind == "pairs":
        _check_keys(opts, ("type", "max_pairs_per_user", "max_products_per_session", "top_k"), f"{f}.pairs")
        ptype = opts.get("type", "viewed")
        _require(ptype in _PAIR_TYPES, f"{f}.pairs.type", f"must be one of {', '.join(_PAIR_TYPES)}, got {ptype!r}")
        cap = _int(opts.get("max_pairs_per_user", 10), f"{f}.pairs.max_pairs_per_user", 1)
        per_session = _int(opts.get("max_products_per_session", 50), f"{f}.pairs.max_products_per_session", 2)
        top_k = _int(opts.get("top_k", 10), f"{f}.pairs.top_k", 1)
        params = (("type", ptype), ("max_pairs_per_user", cap), ("max_products_per_session", per_session),
                  ("top_k", top_k))
        keys = ("product_a", "product_b")
    else:
        _check_keys(opts, ("max_queries_per_user", "by_category", "max_chars"), f"{f}.queries")
        cap = _int(opts.get("max_queries_per_user", 3), f"{f}.queries.max_queries_per_user", 1)
        by_cat = opts.get("by_category", False)
        _require(isinstance(by_cat, bool), f"{f}.queries.by_category", f"must be true or false, got {by_cat!r}")
        max_chars = _int(opts.get("max_chars", 80), f"{f}.queries.max_chars", 8)
        params = (("max_queries_per_user", cap), ("by_category", by_cat), ("max_chars", max_chars))
        keys = ("query", "category") if by_cat else ("query",)
    selection = Selection.parse(o.get("selection"), f"{f}.selection", base_dir)
    _require(selection.kind == "private", f"{f}.selection.type",
             f"{kind} keys are data-derived and are released only through private partition selection")
    weight = _number(o.get("budget_weight", 1.0), f"{f}.budget_weight")
    _require(weight > 0, f"{f}.budget_weight", f"must be > 0, got {weight:g}")
    return Output(name, keys, (Metric("users", "privacy_id_count"),), Bounds(cap, 1), selection, weight,
                  None, kind, params)


def parse_spec(raw: Any, *, base_dir: str = ".", source_path: Optional[str] = None) -> JobSpec:
    """Validates a parsed YAML document and returns the frozen JobSpec."""
    _check_keys(raw, _TOP_FIELDS, "")
    job = raw.get("job")
    _require(isinstance(job, str) and bool(_NAME_RE.match(job)), "job",
             f"must be a lower_snake_case identifier, got {job!r}")
    unit = raw.get("privacy_unit", "user_id")
    _require(unit in ("user_id",), "privacy_unit",
             f"must name the canonical privacy-unit column 'user_id' (map a source column to it "
             f"with column_mapping), got {unit!r}")
    budget = raw.get("budget")
    _check_keys(budget, ("epsilon", "delta"), "budget")
    _require("epsilon" in budget, "budget.epsilon", "is required")
    eps = _number(budget["epsilon"], "budget.epsilon")
    _require(eps > 0, "budget.epsilon", f"must be > 0, got {eps:g}")
    delta = _number(budget.get("delta", 0.0), "budget.delta")
    _require(0 <= delta < 1, "budget.delta", f"must be in [0, 1), got {delta:g}")
    noise = raw.get("noise", "laplace")
    _require(noise in NOISE_KINDS, "noise", f"must be one of {', '.join(NOISE_KINDS)}, got {noise!r}")
    _require(not (noise == "gaussian" and delta == 0), "budget.delta",
             "must be > 0 with Gaussian noise")
    accountant = raw.get("accountant", "naive")
    _require(accountant in ACCOUNTANTS, "accountant",
             f"must be one of {', '.join(ACCOUNTANTS)}, got {accountant!r}")
    mapping = raw.get("column_mapping") or {}
    _check_keys(mapping, events.RAW_COLUMNS, "column_mapping")
    for canonical, source in mapping.items():
        _require(isinstance(source, str) and source != "", f"column_mapping.{canonical}",
                 f"must be a source column name, got {source!r}")
    default_bounds = None
    if raw.get("contribution_bounds") is not None:
        default_bounds = Bounds.parse(raw["contribution_bounds"], "contribution_bounds")
    pp_raw = raw.get("post_processing") or {}
    _check_keys(pp_raw, [f.name for f in dataclasses.fields(PostProcessing)], "post_processing")
    for k, v in pp_raw.items():
        _require(isinstance(v, bool), f"post_processing.{k}", f"must be true or false, got {v!r}")
    post = PostProcessing(**pp_raw)

    outs_raw = raw.get("outputs")
    _require(isinstance(outs_raw, list) and any(
        isinstance(o, Mapping) and o.get("kind") != "local_dp" for o in outs_raw), "outputs",
        "must list at least one centrally private output (aggregate, pairs or queries)")
    _require(isinstance(outs_raw, list) and len(outs_raw) > 0, "outputs", "must be a non-empty list")
    outputs, names = [], set()
    local_outputs = []
    for i, o in enumerate(outs_raw):
        f = f"outputs[{i}]"
        if isinstance(o, Mapping) and o.get("kind") == "local_dp":
            lo = LocalOutput.parse(o, f, base_dir)
            _require(lo.name not in names, f"{f}.name", f"duplicate output name {lo.name!r}")
            names.add(lo.name)
            local_outputs.append(lo)
            continue
        if isinstance(o, Mapping) and o.get("kind", "aggregate") != "aggregate":
            out = _parse_special_output(o, f, base_dir)
            _require(out.name not in names, f"{f}.name", f"duplicate output name {out.name!r}")
            names.add(out.name)
            outputs.append(out)
            continue
        _check_keys(o, ("name", "kind", "partition_keys", "metrics", "bounds", "selection",
                        "budget_weight", "filter"), f)
        name = o.get("name")
        _require(isinstance(name, str) and bool(_NAME_RE.match(name)), f"{f}.name",
                 f"must be a lower_snake_case identifier, got {name!r}")
        _require(name not in names, f"{f}.name", f"duplicate output name {name!r}")
        names.add(name)
        keys = o.get("partition_keys")
        _require(isinstance(keys, list) and len(keys) > 0, f"{f}.partition_keys", "must be a non-empty list")
        for k in keys:
            _require(k not in IDENTIFIER_COLUMNS, f"{f}.partition_keys",
                     f"{k!r} identifies shoppers or sessions and can never be a partition key")
            _require(k in KEY_COLUMNS, f"{f}.partition_keys",
                     f"unknown key column {k!r}; allowed: {', '.join(KEY_COLUMNS)}")
        _require(len(set(keys)) == len(keys), f"{f}.partition_keys", "duplicate key column")
        mraw = o.get("metrics")
        _require(isinstance(mraw, list) and len(mraw) > 0, f"{f}.metrics", "must be a non-empty list")
        metrics = tuple(Metric.parse(m, f"{f}.metrics[{j}]") for j, m in enumerate(mraw))
        mnames = [m.name for m in metrics]
        dup = [n for n in mnames if mnames.count(n) > 1]
        _require(not dup, f"{f}.metrics", f"duplicate metric name {dup[0] if dup else ''!r}")
        clash = [n for n in mnames if n in keys or n.endswith("_std")]
        _require(not clash, f"{f}.metrics", f"metric name {clash[0] if clash else ''!r} clashes with a key or a _std column")
        if o.get("bounds") is None and default_bounds is None:
            raise SpecError(f"{f}.bounds", "is required (or set top-level contribution_bounds)")
        bounds = Bounds.parse(o.get("bounds"), f"{f}.bounds", default_bounds)
        selection = Selection.parse(o.get("selection"), f"{f}.selection", base_dir)
        weight = _number(o.get("budget_weight", 1.0), f"{f}.budget_weight")
        _require(weight > 0, f"{f}.budget_weight", f"must be > 0, got {weight:g}")
        outputs.append(Output(name, tuple(keys), metrics, bounds, selection, weight,
                              Filter.parse(o.get("filter"), f"{f}.filter")))

    if delta == 0:
        for i, o in enumerate(outputs):
            _require(o.selection.kind == "public", "budget.delta",
                     f"must be > 0: outputs[{i}] ({o.name}) uses private partition selection, "
                     "which needs delta")

    ledger = LedgerConfig.parse(raw.get("ledger"), "ledger", base_dir)

    # The hash identifies what a release computes; the ledger section (where it lives, the
    # cap) does not change a release, so raising a cap is not a "spec change".
    canonical = json.dumps({k: v for k, v in raw.items() if k != "ledger"}, sort_keys=True,
                           default=str).encode()
    return JobSpec(
        job=job, privacy_unit=unit, epsilon=eps, delta=delta, noise=noise, accountant=accountant,
        column_mapping=tuple(sorted(mapping.items())), outputs=tuple(outputs), post_processing=post,
        spec_hash=hashlib.sha256(canonical).hexdigest()[:16], source_path=source_path, ledger=ledger,
        local_outputs=tuple(local_outputs))


def load_spec(path: str) -> JobSpec:
    """Reads and validates a YAML job spec file."""
    try:
        with open(path, encoding="utf-8") as fh:
            raw = yaml.safe_load(fh)
    except FileNotFoundError:
        raise SpecError("spec", f"file not found: {path}") from None
    except yaml.YAMLError as exc:
        raise SpecError("spec", f"{path} is not valid YAML: {exc}") from None
    if raw is None:
        raise SpecError("spec", f"{path} is empty")
    return parse_spec(raw, base_dir=os.path.dirname(os.path.abspath(path)), source_path=path)
