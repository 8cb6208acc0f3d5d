"""ReleasedTable: the only input type of the post-processing modules (features, corpus, report).

A ``ReleasedTable`` can only be made from what the Release step produced:

* ``ReleasedTable.load(path)``: a released Parquet file or ``dt=`` directory whose key-value metadata carries
  ``clickdp.dp`` (the DP parameters the nightly job writes);
* ``load_release(root, date, job)``: every output listed in the run's manifest, with the files' sha256
  checked against it;
* ``ReleasedTable.from_release_step(table, dp_metadata)``: in process, the table returned by
  ``transforms.release.Releaser.release`` (its schema must be a ``released/...`` schema).

Each constructor checks that the columns are partition keys (strings), noisy metrics with their
``<metric>_std`` column, and nothing else (``rank``, an ordering of noisy values, is the one allowed
post-processed column); raw identifiers (user_id, session_id, event_id, event_time, the privacy unit) are
refused with a message saying that raw events are never valid input. Because builders accept only
``ReleasedTable``, their outputs are post-processing of DP releases and cost no extra privacy budget.
"""
from __future__ import annotations

import hashlib
import json
import os
from typing import Mapping, Optional

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from transforms.release import confidence_interval

DP_METADATA_KEY = b"clickdp.dp"
SCHEMA_METADATA_KEY = b"clickstream_dp.schema"
# Columns that identify a shopper, a session or an event: their presence means raw (or dead-letter) data.
IDENTIFIER_COLUMNS = frozenset({"user_id", "session_id", "event_id", "event_time"})
# Numeric columns without a noise std that a released table may carry: an ordering of noisy values.
POST_PROCESSED_COLUMNS = frozenset({"rank"})
REQUIRED_DP_FIELDS = ("output", "date", "epsilon", "delta", "noise")
COUNT_LIKE = ("count", "privacy_id_count")

_TOKEN = object()


class NotReleasedError(ValueError):
    """The input is not a released DP table (raw events, dead letters, an unrelated or tampered file)."""


def _refuse(source: str, why: str) -> NotReleasedError:
    return NotReleasedError(
        f"{source}: not a released DP table ({why}). Post-processing (features, corpus, report) reads only "
        "tables published by the Release step: load them with ReleasedTable.load(<out>/<output>/dt=DATE) or "
        "transforms.released.load_release(<out>, DATE, job); raw events and dead letters are never valid input.")


def require_released(obj, what: str = "input") -> "ReleasedTable":
    """Returns ``obj`` if it is a ReleasedTable; raises TypeError naming what was passed otherwise."""
    if isinstance(obj, ReleasedTable):
        return obj
    kind = type(obj).__name__
    hint = ""
    if isinstance(obj, (pa.Table, pa.RecordBatch)):
        hint = (" A bare pyarrow table carries no proof that it was released (and may be raw events): "
                "load the released file with ReleasedTable.load(path).")
    elif isinstance(obj, (str, os.PathLike)):
        hint = f" Paths are not accepted directly: use ReleasedTable.load({os.fspath(obj)!r})."
    raise TypeError(f"{what} must be a transforms.released.ReleasedTable, got {kind}.{hint}")


def _classify(schema: pa.Schema, source: str, privacy_unit: Optional[str]) -> tuple[tuple, tuple]:
    """(partition keys, metrics) of a released schema, or NotReleasedError."""
    names = schema.names
    forbidden = set(IDENTIFIER_COLUMNS) | ({privacy_unit} if privacy_unit else set())
    raw = [n for n in names if n in forbidden]
    if raw:
        raise _refuse(source, f"it has identifier column(s) {', '.join(raw)}: this looks like raw events")
    tag = (schema.metadata or {}).get(SCHEMA_METADATA_KEY, b"").decode(errors="replace")
    if tag and not tag.startswith("released/"):
        raise _refuse(source, f"its schema is {tag!r}")
    keys, metrics, stds = [], [], set()
    for f in schema:
        fmeta = f.metadata or {}
        if b"noise_std_of" in fmeta or (f.name.endswith("_std") and f.name[:-4] in names):
            of = fmeta.get(b"noise_std_of", f.name[:-4].encode()).decode()
            if of not in names or not pa.types.is_floating(f.type):
                raise _refuse(source, f"column {f.name!r} is a noise std of missing or non-float metric {of!r}")
            stds.add(of)
        elif b"metric" in fmeta or f"{f.name}_std" in names:
            if not (pa.types.is_integer(f.type) or pa.types.is_floating(f.type)):
                raise _refuse(source, f"metric column {f.name!r} is not numeric ({f.type})")
            metrics.append(f.name)
        elif f.name in POST_PROCESSED_COLUMNS and pa.types.is_integer(f.type):
            continue
        elif pa.types.is_string(f.type) or pa.types.is_large_string(f.type):
            keys.append(f.name)
        else:
            raise _refuse(source, f"column {f.name!r} ({f.type}) is neither a partition key, a noisy metric "
                                  f"with a {f.name}_std column, nor a noise std")
    lacking = [m for m in metrics if m not in stds]
    if lacking:
        raise _refuse(source, f"metric(s) {', '.join(lacking)} have no _std column")
    if not metrics:
        raise _refuse(source, "it has no noisy metric column")
    return tuple(keys), tuple(metrics)


def _parse_dp(raw, source: str) -> dict:
    if raw is None:
        raise _refuse(source, "its Parquet metadata has no 'clickdp.dp' entry")
    try:
        dp = json.loads(raw) if isinstance(raw, (bytes, str)) else json.loads(json.dumps(raw))
    except (TypeError, ValueError) as e:
        raise _refuse(source, f"its 'clickdp.dp' metadata is not valid JSON ({e})") from None
    missing = [k for k in REQUIRED_DP_FIELDS if k not in dp]
    if not isinstance(dp, dict) or missing:
        raise _refuse(source, f"its 'clickdp.dp' metadata lacks {', '.join(missing) or 'an object'}")
    return dp


class ReleasedTable:
    """A released DP table with its DP metadata. Immutable; construct only through the class methods."""

    __slots__ = ("_table", "_dp", "_source", "_relpath", "_keys", "_metrics")

    def __init__(self, *args, **kwargs):
        if kwargs.pop("_token", None) is not _TOKEN:
            raise TypeError("ReleasedTable cannot be built directly: use ReleasedTable.load(path), "
                            "transforms.released.load_release(root, date, job) or "
                            "ReleasedTable.from_release_step(table, dp_metadata)")
        table, dp, source, relpath = args
        self._keys, self._metrics = _classify(table.schema, source, dp.get("privacy_unit"))
        self._table, self._dp, self._relpath = table, dp, relpath
        self._source = source  # set last: from here on the object is frozen

    def __setattr__(self, name, value):
        if hasattr(self, "_source"):
            raise AttributeError("ReleasedTable is immutable")
        object.__setattr__(self, name, value)

    # --- constructors -------------------------------------------------------------------------------
    @classmethod
    def load(cls, path: str, *, relpath: Optional[str] = None) -> "ReleasedTable":
        """A released Parquet file, or a directory of ``part-*.parquet`` files of one release."""
        path = os.fspath(path)
        if os.path.isdir(path):
            files = sorted(os.path.join(path, f) for f in os.listdir(path) if f.endswith(".parquet"))
            if not files:
                raise _refuse(path, "the directory holds no .parquet file")
        elif os.path.isfile(path):
            files = [path]
        else:
            raise FileNotFoundError(f"no released file or directory at {path}")
        tables, dp = [], None
        for f in files:
            try:
                schema = pq.read_schema(f)
            except (OSError, pa.ArrowException) as e:
                raise _refuse(f, f"it is not a readable Parquet file: {e}") from None
            # Identifier columns are refused before the metadata so that raw files get the clearest message.
            _classify(schema, f, None)
            this = _parse_dp((schema.metadata or {}).get(DP_METADATA_KEY), f)
            if dp is not None and (this.get("run_id"), this["output"]) != (dp.get("run_id"), dp["output"]):
                raise _refuse(f, "its files come from different releases")
            dp = this
            tables.append(pq.read_table(f, schema=schema))
        table = tables[0] if len(tables) == 1 else pa.concat_tables(tables)
        source = files[0] if len(files) == 1 else path
        return cls(table, dp, source, relpath or source, _token=_TOKEN)

    @classmethod
    def from_release_step(cls, table: pa.Table, dp_metadata: Mapping) -> "ReleasedTable":
        """In process: the output of ``Releaser.release`` plus the file metadata the job writes for it."""
        if not isinstance(table, pa.Table):
            raise TypeError(f"from_release_step needs the pa.Table returned by Releaser.release, "
                            f"got {type(table).__name__}")
        dp = _parse_dp(dict(dp_metadata), "in-process table")
        source = f"in-process:{dp['output']}"
        tag = (table.schema.metadata or {}).get(SCHEMA_METADATA_KEY, b"")
        if not tag.startswith(b"released/"):
            raise _refuse(source, "its schema is not a released/... schema from schemas.released")
        for f in table.schema:
            fmeta = f.metadata or {}
            if not (pa.types.is_string(f.type) or b"metric" in fmeta or b"noise_std_of" in fmeta
                    or f.name in POST_PROCESSED_COLUMNS):
                raise _refuse(source, f"column {f.name!r} is neither a key nor a tagged metric/std column")
        return cls(table, dp, source, source, _token=_TOKEN)

    # --- accessors ----------------------------------------------------------------------------------
    @property
    def table(self) -> pa.Table:
        return self._table

    @property
    def dp(self) -> dict:
        """A copy of the DP metadata (``clickdp.dp``)."""
        return json.loads(json.dumps(self._dp))

    @property
    def output(self) -> str:
        return self._dp["output"]

    @property
    def date(self) -> str:
        return self._dp["date"]

    @property
    def epsilon(self) -> float:
        return float(self._dp["epsilon"])

    @property
    def delta(self) -> float:
        return float(self._dp["delta"])

    @property
    def noise(self) -> str:
        return self._dp["noise"]

    @property
    def keys(self) -> tuple:
        return self._keys

    @property
    def metrics(self) -> tuple:
        return self._metrics

    @property
    def source(self) -> str:
        return self._source

    @property
    def num_rows(self) -> int:
        return self._table.num_rows

    def __repr__(self) -> str:
        return (f"ReleasedTable({self.output}, {self.date}, eps={self.epsilon:g}, rows={self.num_rows}, "
                f"keys={list(self.keys)}, metrics={list(self.metrics)})")

    def provenance(self) -> dict:
        return {"output": self.output, "date": self.date, "epsilon": self.epsilon, "delta": self.delta,
                "file": self._relpath, "spec_hash": self._dp.get("spec_hash"), "job": self._dp.get("job"),
                "run_id": self._dp.get("run_id")}

    def metric_info(self, metric: str) -> dict:
        """The spec entry of a metric (name, type, column, min, max, filter); type inferred if absent."""
        for m in self._dp.get("metrics") or []:
            if m.get("name") == metric:
                return dict(m)
        field = self._table.schema.field(metric)
        mtype = (field.metadata or {}).get(b"metric", b"").decode() or \
            ("count" if pa.types.is_integer(field.type) else "sum")
        return {"name": metric, "type": mtype, "column": None, "min": None, "max": None, "filter": None}

    def values(self, metric: str) -> np.ndarray:
        return self._table.column(metric).to_numpy().astype(np.float64)

    def stds(self, metric: str) -> np.ndarray:
        return self._table.column(f"{metric}_std").to_numpy().astype(np.float64)

    def ci95(self, metric: str) -> tuple[np.ndarray, np.ndarray]:
        """95% interval of the unnoised value (release.confidence_interval), cut to the metric's support."""
        low, high = confidence_interval(self._table, metric, self.noise, 0.95)
        info = self.metric_info(metric)
        lo_b, hi_b = info.get("min"), info.get("max")
        if info.get("type") in COUNT_LIKE or (info.get("type") == "sum" and lo_b is not None and lo_b >= 0):
            low, high = np.maximum(low, 0.0), np.maximum(high, 0.0)
        elif info.get("type") == "mean" and lo_b is not None and hi_b is not None:
            low, high = np.clip(low, lo_b, hi_b), np.clip(high, lo_b, hi_b)
        return low, high


def read_manifest(root: str, date: str, job: str) -> dict:
    path = os.path.join(os.fspath(root), "_manifests", job, f"dt={date}.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no manifest for job {job!r} on {date} at {path}: was the date released?")
    with open(path, encoding="utf-8") as fh:
        return json.load(fh)


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def add_release_arguments(parser) -> None:
    """--release/--date/--job: which published release a post-processing command reads."""
    parser.add_argument("--release", required=True, help="release root (the job's --output)")
    parser.add_argument("--date", required=True)
    parser.add_argument("--job", default="nightly")


def load_release(root: str, date: str, job: str = "nightly", *, verify: bool = True,
                 outputs=None) -> dict:
    """{output: ReleasedTable} of every file listed in the run's manifest (local paths).

    Files are looked up under ``root`` (so a copied release still loads) and, with ``verify``, their sha256
    must match the manifest's.
    """
    root = os.fspath(root)
    manifest = read_manifest(root, date, job)
    by_output: dict = {}
    local = {lo["name"] for lo in manifest.get("local_dp_outputs", [])}
    for entry in manifest.get("files", []):
        if entry["output"] in local or (outputs is not None and entry["output"] not in outputs):
            continue  # local-DP rows are per-shopper tables, not released aggregates
        rel = os.path.join(entry["output"], f"dt={date}", os.path.basename(entry["path"]))
        path = os.path.join(root, rel)
        if verify and entry.get("sha256") and _sha256(path) != entry["sha256"]:
            raise _refuse(path, "its sha256 differs from the manifest's")
        by_output.setdefault(entry["output"], []).append((path, rel))
    out = {}
    for output, files in sorted(by_output.items()):
        if len(files) == 1:
            out[output] = ReleasedTable.load(files[0][0], relpath=files[0][1])
        else:
            out[output] = ReleasedTable.load(os.path.dirname(files[0][0]),
                                             relpath=os.path.dirname(files[0][1]))
    return out


def half_width_95(std: np.ndarray, noise: str) -> np.ndarray:
    """Half width of the 95% interval of a value with noise std ``std`` (laplace exact, else normal)."""
    std = np.asarray(std, dtype=np.float64)
    lo, _ = confidence_interval(pa.table({"v": np.zeros_like(std), "v_std": std}), "v", noise, 0.95)
    return -lo
