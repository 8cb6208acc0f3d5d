"""Readers for raw clickstream files (Parquet, JSON Lines, CSV).

Every reader yields ``(batch, first_row_number, malformed)`` tuples:

* ``batch`` holds the columns of ``RAW_EVENT_SCHEMA`` in that order, named
  canonically (source columns are renamed through ``column_mapping``
  ``{canonical: source}``; other columns are dropped; absent optional columns
  are added as all-null). The *physical* types are whatever the file holds
  (strings for CSV, inferred types for JSONL, the stored types for Parquet);
  ``transforms.validate.validate_batch`` casts them.
* ``first_row_number`` is the 0-based position in the file of the batch's
  first row. The rows of one batch are always *contiguous* in the file, so
  row ``i`` of the batch is row ``first_row_number + i`` of the file (batches
  are cut around malformed rows and, for JSONL, blank lines).
* ``malformed`` is ``None`` or a ``DEAD_LETTER_SCHEMA`` batch of rows that
  could not be parsed at all (reason ``malformed_row``), namely those lying
  between this batch's rows and the next batch's. The raw text of such a row,
  truncated to ``MALFORMED_TEXT_LIMIT`` characters, is stored in ``event_id``;
  every other value column is null.

Row numbers:

* Parquet: row index in the file.
* JSONL: physical line index (0-based); blank lines produce no row but are
  counted.
* CSV: index of the CSV record after the header (0-based). Empty lines are
  skipped *and not counted* (that is how Arrow's CSV parser numbers rows), and a
  quoted value holding a newline keeps its record a single row. For a file
  without empty lines and multi-line values this is ``line number - 2``
  (1-based line numbers, header on line 1).

Local paths are opened with pyarrow directly; other schemes (``gs://``) go
through ``apache_beam.io.filesystems.FileSystems``.
"""
from __future__ import annotations

import csv
import json
import logging
import os
import re
from typing import Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.json as pa_json
import pyarrow.parquet as pq

from schemas.events import (
    DEAD_LETTER_SCHEMA,
    RAW_COLUMNS,
    RAW_EVENT_SCHEMA,
    REASON_MALFORMED_ROW,
    REQUIRED_COLUMNS,
)

logger = logging.getLogger(__name__)

# Raw text of a malformed row is kept (in ``event_id``) up to this many chars.
MALFORMED_TEXT_LIMIT = 1000
# How much of a JSONL/CSV file preflight reads to find the column names.
PREFLIGHT_HEAD_BYTES = 64 * 1024
_PREFLIGHT_HEAD_MAX_BYTES = 4 * 1024 * 1024

_FORMAT_BY_SUFFIX = {
    ".parquet": "parquet",
    ".pq": "parquet",
    ".jsonl": "jsonl",
    ".json": "jsonl",
    ".ndjson": "jsonl",
    ".csv": "csv",
}
_GZIP_OK = {"jsonl", "csv"}


class InputError(ValueError):
    """Unreadable file, unknown format or missing required column.

    Raised before the pipeline starts (by ``preflight``) or while reading; the
    message names the file and, where relevant, the column.
    """


# --------------------------------------------------------------------------
# paths and formats
# --------------------------------------------------------------------------
def _basename(path: str) -> str:
    return str(path).rstrip("/").rsplit("/", 1)[-1]


def detect_format(path) -> str:
    """Return ``"parquet"``, ``"jsonl"`` or ``"csv"`` from the file extension.

    ``.parquet``/``.pq``, ``.jsonl``/``.json``/``.ndjson``, ``.csv``; JSONL and
    CSV may additionally end in ``.gz``. Anything else raises ``InputError``.
    """
    name = _basename(os.fspath(path)).lower()
    gz = name.endswith(".gz")
    if gz:
        name = name[:-3]
    for suffix, fmt in _FORMAT_BY_SUFFIX.items():
        if name.endswith(suffix):
            if gz and fmt not in _GZIP_OK:
                break
            return fmt
    raise InputError(
        f"{path}: unknown input format (expected .parquet/.pq, "
        ".jsonl/.json/.ndjson[.gz] or .csv[.gz])"
    )


def _is_local(path: str) -> bool:
    return "://" not in path or path.startswith("file://")


def _local_path(path: str) -> str:
    return path[len("file://"):] if path.startswith("file://") else path


def _has_glob(pattern: str) -> bool:
    return any(ch in pattern for ch in "*?[")


def _hidden(relative: str) -> bool:
    return any(part.startswith(("_", ".")) for part in relative.split("/") if part)


def _known_format(path: str) -> bool:
    try:
        detect_format(path)
    except InputError:
        return False
    return True


def expand_inputs(patterns: Sequence[str]) -> list[str]:
    """Expand globs and directories into a sorted, de-duplicated file list.

    * A directory (local, or a remote prefix given without glob characters)
      expands recursively to every file with a known extension, skipping any
      file or sub-directory whose name starts with ``_`` or ``.``.
    * A glob keeps every matched file except those whose name, or the name of
      a directory below the glob's literal prefix, starts with ``_`` or ``.``;
      files with an unknown extension are *kept*, so ``preflight`` reports
      them instead of silently dropping data. A directory matched by a glob is
      expanded as above.
    * A plain file path is kept as is.

    Raises ``InputError`` if nothing matches at all (a pattern that alone
    matches nothing is only logged).
    """
    from apache_beam.io.filesystems import FileSystems  # slow import; lazily

    if isinstance(patterns, (str, os.PathLike)):
        patterns = [patterns]

    def match(pattern: str) -> list[str]:
        try:
            result = FileSystems.match([pattern])
        except Exception as exc:  # BeamIOError, unknown scheme, ...
            raise InputError(f"{pattern}: cannot list input: {exc}") from exc
        return [m.path for m in result[0].metadata_list]

    def expand_dir(directory: str) -> list[str]:
        root = directory.rstrip("/")
        out = []
        for path in match(root + "/**"):
            rel = path[len(root):].lstrip("/") if path.startswith(root) else _basename(path)
            if _is_local(path) and os.path.isdir(_local_path(path)):
                continue
            if not _hidden(rel) and _known_format(path):
                out.append(path)
        return out

    files: set[str] = set()
    for raw in patterns:
        pattern = os.fspath(raw)
        if _is_local(pattern):
            pattern = _local_path(pattern)
        found: list[str] = []
        if not _has_glob(pattern):
            if _is_local(pattern):
                if os.path.isdir(pattern):
                    found = expand_dir(pattern)
                elif os.path.isfile(pattern):
                    found = [pattern]
            else:
                exact = [p for p in match(pattern) if p.rstrip("/") == pattern.rstrip("/")]
                found = exact if exact and not pattern.endswith("/") else expand_dir(pattern)
        else:
            first_glob = min(pattern.find(ch) for ch in "*?[" if ch in pattern)
            root = pattern[: pattern.rfind("/", 0, first_glob) + 1]
            for path in match(pattern):
                if _is_local(path) and os.path.isdir(_local_path(path)):
                    found.extend(expand_dir(path))
                elif not _hidden(path[len(root):] if path.startswith(root) else _basename(path)):
                    found.append(path)
        if not found:
            logger.warning("input pattern %s matched no files", pattern)
        files.update(found)
    if not files:
        raise InputError(f"no input files match {list(map(str, patterns))}")
    return sorted(files)


# --------------------------------------------------------------------------
# opening files
# --------------------------------------------------------------------------
def _file_size(path: str) -> int:
    if _is_local(path):
        return os.path.getsize(_local_path(path))
    from apache_beam.io.filesystems import FileSystems

    metadata = FileSystems.match([path])[0].metadata_list
    if not metadata:
        raise FileNotFoundError(path)
    return int(metadata[0].size_in_bytes)


def _open_text_source(path: str):
    """Binary stream of a JSONL/CSV file, gzip-decompressed if named ``.gz``."""
    if _is_local(path):
        gz = path.lower().endswith(".gz")
        return pa.input_stream(_local_path(path), compression="gzip" if gz else None)
    from apache_beam.io.filesystems import CompressionTypes, FileSystems

    compression = CompressionTypes.GZIP if path.lower().endswith(".gz") else CompressionTypes.UNCOMPRESSED
    return FileSystems.open(path, compression_type=compression)


def _open_parquet(path: str, read_dictionary=None) -> pq.ParquetFile:
    if _is_local(path):
        return pq.ParquetFile(_local_path(path), read_dictionary=read_dictionary)
    from apache_beam.io.filesystems import CompressionTypes, FileSystems

    return pq.ParquetFile(FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED),
                          read_dictionary=read_dictionary)


def _read_all(path: str) -> bytes:
    with _open_text_source(path) as stream:
        data = stream.read()
    return bytes(data) if not isinstance(data, bytes) else data


def _read_head(path: str) -> tuple[bytes, bool]:
    """(first ``PREFLIGHT_HEAD_BYTES`` or more -- enough to hold one full line,
    up to a cap --, whether the end of the file was reached)."""
    chunks = []
    total = 0
    eof = False
    with _open_text_source(path) as stream:
        while True:
            chunk = stream.read(PREFLIGHT_HEAD_BYTES)
            chunk = bytes(chunk) if not isinstance(chunk, bytes) else chunk
            if not chunk:
                eof = True
                break
            chunks.append(chunk)
            total += len(chunk)
            if total >= PREFLIGHT_HEAD_BYTES and (b"\n" in chunk or total >= _PREFLIGHT_HEAD_MAX_BYTES):
                break
    return b"".join(chunks), eof


# --------------------------------------------------------------------------
# column mapping
# --------------------------------------------------------------------------
def _source_names(column_mapping: dict[str, str] | None, path: str = "") -> dict[str, str]:
    """``{canonical: source}`` for every canonical column."""
    mapping = dict(column_mapping or {})
    unknown = sorted(set(mapping) - set(RAW_COLUMNS))
    if unknown:
        raise InputError(
            f"{path or 'column_mapping'}: column_mapping names unknown canonical column(s) "
            f"{unknown}; canonical columns are {list(RAW_COLUMNS)}"
        )
    for canonical, source in mapping.items():
        if not isinstance(source, str) or not source:
            raise InputError(f"column_mapping[{canonical!r}] must be a non-empty column name, got {source!r}")
    return {c: mapping.get(c, c) for c in RAW_COLUMNS}


def _check_required(path: str, present: set[str] | Sequence[str], sources: dict[str, str]) -> None:
    present = set(present)
    for canonical in REQUIRED_COLUMNS:
        source = sources[canonical]
        if source not in present:
            shown = f"'{source}' (mapped to '{canonical}')" if source != canonical else f"'{canonical}'"
            raise InputError(
                f"{path}: required column {shown} is missing; file columns: {sorted(present)}"
            )


def _canonical_batch(columns: dict[str, pa.Array], sources: dict[str, str], num_rows: int) -> pa.RecordBatch:
    """Canonically named batch in RAW_EVENT_SCHEMA column order."""
    arrays = []
    for field in RAW_EVENT_SCHEMA:
        array = columns.get(sources[field.name])
        if array is None:
            array = pa.nulls(num_rows, field.type)
        arrays.append(array)
    return pa.RecordBatch.from_arrays(arrays, names=list(RAW_COLUMNS))


# --------------------------------------------------------------------------
# preflight
# --------------------------------------------------------------------------
def _csv_header(head: bytes) -> list[str]:
    """Column names from the first line of a CSV file ([] if there is none)."""
    text = head.decode("utf-8-sig", errors="replace")
    first = text.split("\n", 1)[0].rstrip("\r")
    if not first.strip():
        return []
    return next(csv.reader([first]))


def _jsonl_keys(path: str, head: bytes, complete: bool) -> set[str] | None:
    """Union of keys of the objects in the head; None if the head is blank."""
    if head.startswith(b"\xef\xbb\xbf"):
        head = head[3:]
    lines = head.split(b"\n")
    if not complete and len(lines) > 1:
        lines = lines[:-1]  # the last line may be cut off
    keys: set[str] = set()
    seen_content = parsed = False
    for line in lines:
        if not line.strip():
            continue
        seen_content = True
        try:
            obj = json.loads(line)
        except ValueError:
            continue
        if isinstance(obj, dict):
            parsed = True
            keys.update(obj)
    if not seen_content:
        return None
    if not parsed:
        raise InputError(f"{path}: no JSON object could be parsed in the first {len(head)} bytes")
    return keys


def file_columns(path: str) -> list[str] | None:
    """Source column names of a file, read cheaply (see ``preflight``).

    ``None`` for a JSONL file without any content (no columns to check).
    """
    fmt = detect_format(path)
    try:
        if fmt == "parquet":
            if _is_local(path):
                return list(pq.read_schema(_local_path(path)).names)
            return list(_open_parquet(path).schema_arrow.names)
        head, eof = _read_head(path)
    except InputError:
        raise
    except Exception as exc:
        raise InputError(f"{path}: unreadable {fmt} file: {exc}") from exc
    if fmt == "csv":
        return _csv_header(head)
    keys = _jsonl_keys(path, head, eof)
    return None if keys is None else sorted(keys)


def preflight(paths: Sequence[str], column_mapping: dict[str, str] | None = None) -> dict:
    """Check every input cheaply before the pipeline starts.

    Opens each file's schema (Parquet footer; CSV header line; union of keys
    of the JSONL objects in the first ``PREFLIGHT_HEAD_BYTES``) and raises
    ``InputError`` naming the file if it is unreadable, has an unknown format,
    or lacks a required column (after mapping source names to canonical
    names). A JSONL file without any content passes (it has no rows). Returns
    ``{"files": n, "bytes": total_size}``.
    """
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    sources = _source_names(column_mapping)
    total = 0
    for raw in paths:
        path = os.fspath(raw)
        columns = file_columns(path)
        if columns is not None:
            _check_required(path, columns, sources)
        try:
            total += _file_size(path)
        except Exception as exc:
            raise InputError(f"{path}: cannot stat file: {exc}") from exc
    return {"files": len(paths), "bytes": total}


# --------------------------------------------------------------------------
# malformed rows and contiguous runs
# --------------------------------------------------------------------------
def malformed_batch(path: str, row_numbers: Sequence[int], texts: Sequence[str]) -> pa.RecordBatch:
    """Dead letters (reason ``malformed_row``) for unparseable rows.

    The raw text (truncated to ``MALFORMED_TEXT_LIMIT`` chars) goes into
    ``event_id``; other value columns are null.
    """
    n = len(row_numbers)
    arrays = []
    for field in DEAD_LETTER_SCHEMA:
        if field.name == "event_id":
            arrays.append(pa.array([t[:MALFORMED_TEXT_LIMIT] for t in texts], pa.string()))
        elif field.name == "reason":
            arrays.append(pa.array([REASON_MALFORMED_ROW] * n, pa.string()))
        elif field.name == "source_file":
            arrays.append(pa.array([path] * n, pa.string()))
        elif field.name == "row_number":
            arrays.append(pa.array(list(row_numbers), pa.int64()))
        else:
            arrays.append(pa.nulls(n, field.type))
    return pa.RecordBatch.from_arrays(arrays, schema=DEAD_LETTER_SCHEMA)


def _emit_runs(
    path: str,
    table: pa.Table,
    positions: np.ndarray,
    bad_positions: Sequence[int],
    bad_texts: Sequence[str],
    batch_rows: int,
) -> Iterator[tuple[pa.RecordBatch, int, pa.RecordBatch | None]]:
    """Cut ``table`` -- its rows sit at the strictly increasing file
    ``positions`` -- into batches of at most ``batch_rows`` rows that are
    contiguous in the file. Each malformed row goes with the batch whose rows
    precede it (rows before the first batch go with the first batch); a file
    without parseable rows yields one empty batch carrying them all."""
    n = table.num_rows
    positions = np.asarray(positions, dtype=np.int64)
    bad_positions = np.asarray(bad_positions, dtype=np.int64)
    order = np.argsort(bad_positions, kind="stable")
    bad_positions = bad_positions[order]
    bad_texts = [bad_texts[i] for i in order.tolist()]

    run_starts = [0] + (np.flatnonzero(np.diff(positions) != 1) + 1).tolist() + [n] if n else [0, 0]
    bounds = []
    for lo, hi in zip(run_starts[:-1], run_starts[1:]):
        for s in range(lo, hi, batch_rows):
            bounds.append((s, min(s + batch_rows, hi)))
    if not bounds:
        bounds = [(0, 0)]

    table = table.combine_chunks()
    for k, (lo, hi) in enumerate(bounds):
        first = int(positions[lo]) if hi > lo else 0
        lo_bad = 0 if k == 0 else int(np.searchsorted(bad_positions, first, "left"))
        if k + 1 < len(bounds):
            hi_bad = int(np.searchsorted(bad_positions, positions[bounds[k + 1][0]], "left"))
        else:
            hi_bad = len(bad_positions)
        malformed = None
        if hi_bad > lo_bad:
            malformed = malformed_batch(path, bad_positions[lo_bad:hi_bad].tolist(), bad_texts[lo_bad:hi_bad])
        if hi == lo and malformed is None:
            continue
        sliced = table.slice(lo, hi - lo)
        batch = pa.RecordBatch.from_arrays(
            [
                c.chunk(0) if c.num_chunks == 1 else pa.concat_arrays(c.chunks) if c.num_chunks else pa.array([], c.type)
                for c in sliced.columns
            ],
            names=sliced.column_names,
        )
        yield batch, first, malformed


def _table_columns(table: pa.Table) -> dict[str, pa.ChunkedArray]:
    out = {}
    for name, column in zip(table.column_names, table.columns):
        out.setdefault(name, column)
    return out


def _canonical_table(table: pa.Table, sources: dict[str, str]) -> pa.Table:
    present = _table_columns(table)
    arrays = []
    for field in RAW_EVENT_SCHEMA:
        column = present.get(sources[field.name])
        if column is None:
            column = pa.chunked_array([pa.nulls(table.num_rows, field.type)], field.type)
        arrays.append(column)
    return pa.Table.from_arrays(arrays, names=list(RAW_COLUMNS))


def _wanted_sources(sources: dict[str, str], available) -> list[str]:
    wanted = []
    for canonical in RAW_COLUMNS:
        source = sources[canonical]
        if source in available and source not in wanted:
            wanted.append(source)
    return wanted


# --------------------------------------------------------------------------
# format readers
# --------------------------------------------------------------------------
def _read_parquet(path, sources, batch_rows, columns=None):
    try:
        pf = _open_parquet(path)
        names = pf.schema_arrow.names
        if columns is not None:
            # Projected (pipeline) reads keep string columns dictionary-encoded: decoding
            # Parquet dictionary pages into plain strings is most of the cost of a read.
            schema = pf.schema_arrow
            dict_cols = [sources[c] for c in columns if sources[c] in names
                         and pa.types.is_string(schema.field(sources[c]).type)]
            if dict_cols:
                pf.close()
                pf = _open_parquet(path, read_dictionary=dict_cols)
    except Exception as exc:
        raise InputError(f"{path}: unreadable parquet file: {exc}") from exc
    try:
        _check_required(path, names, sources)
        wanted = _wanted_sources(sources, set(names))
        if columns is not None:  # projection: other canonical columns come back all-null
            keep = {sources[c] for c in columns}
            wanted = [w for w in wanted if w in keep]
        iterator = pf.iter_batches(batch_size=batch_rows, columns=wanted)
        first = 0
        while True:
            try:
                raw = next(iterator)
            except StopIteration:
                return
            except Exception as exc:
                raise InputError(f"{path}: error reading parquet file after row {first}: {exc}") from exc
            columns = dict(zip(raw.schema.names, raw.columns))
            yield _canonical_batch(columns, sources, raw.num_rows), first, None
            first += raw.num_rows
    finally:
        pf.close()


def _read_text_file(path: str, fmt: str) -> bytes:
    """A whole CSV/JSONL file's bytes, without a UTF-8 byte-order mark."""
    try:
        data = _read_all(path)
    except Exception as exc:
        raise InputError(f"{path}: unreadable {fmt} file: {exc}") from exc
    return data[3:] if data.startswith(b"\xef\xbb\xbf") else data


def _read_csv(path, sources, batch_rows):
    data = _read_text_file(path, "csv")
    header = _csv_header(data[:_PREFLIGHT_HEAD_MAX_BYTES])
    _check_required(path, header, sources)
    newline = data.find(b"\n")
    if newline < 0 or not data[newline + 1:].strip():
        return  # header only: no data rows

    bad_numbers: list[int] = []
    bad_texts: list[str] = []

    def on_invalid(row):
        # row.number: 1-based record number counting the header and skipping
        # empty lines; known because the parser runs single-threaded.
        bad_numbers.append(-1 if row.number is None else row.number - 2)
        bad_texts.append(row.text.rstrip("\r\n"))
        return "skip"

    try:
        table = pa_csv.read_csv(
            pa.BufferReader(data),
            read_options=pa_csv.ReadOptions(use_threads=False, block_size=16 << 20),
            parse_options=pa_csv.ParseOptions(invalid_row_handler=on_invalid),
            convert_options=pa_csv.ConvertOptions(
                column_types={name: pa.string() for name in header},
                include_columns=_wanted_sources(sources, set(header)),
                strings_can_be_null=True,
                quoted_strings_can_be_null=True,
                null_values=[""],
            ),
        )
    except Exception as exc:
        raise InputError(f"{path}: unreadable csv file: {exc}") from exc

    total = table.num_rows + len(bad_numbers)
    bad = np.asarray(bad_numbers, dtype=np.int64)
    if len(bad) and (bad.min() < 0 or bad.max() >= total or len(np.unique(bad)) != len(bad)):
        raise InputError(f"{path}: cannot number CSV rows (invalid rows at {bad_numbers[:5]})")
    keep = np.ones(total, dtype=bool)
    keep[bad] = False
    yield from _emit_runs(path, _canonical_table(table, sources), np.flatnonzero(keep), bad_numbers, bad_texts, batch_rows)


def _line_count(data: bytes) -> int:
    return data.count(b"\n") + (1 if data and not data.endswith(b"\n") else 0)


_BLANK_AFTER_NEWLINE = re.compile(rb"\n[ \t\r]*(?=\n|$)")
_BLANK_FIRST_LINE = re.compile(rb"[ \t\r]*(?:\n|$)")


def _nonblank_lines(data: bytes) -> np.ndarray:
    """Indices of the lines of ``data`` holding anything but JSON whitespace.

    Blank lines are found with a regex anchored on newlines (fast: it only
    stops at newlines), so files without blank lines cost one scan.
    """
    n_lines = _line_count(data)
    if n_lines == 0:
        return np.zeros(0, dtype=np.int64)
    blank = []
    if _BLANK_FIRST_LINE.match(data):
        blank.append(0)
    matches = [m.start() for m in _BLANK_AFTER_NEWLINE.finditer(data) if m.end() < len(data) or m.end() - m.start() > 1]
    if matches:
        newlines = np.flatnonzero(np.frombuffer(data, dtype=np.uint8) == 0x0A)
        blank.extend((np.searchsorted(newlines, matches) + 1).tolist())
    return np.delete(np.arange(n_lines, dtype=np.int64), np.asarray(blank, dtype=np.int64))


def _json_keys_present(data: bytes, names: Sequence[str]) -> set[str]:
    """Which of ``names`` occur as a key of at least one object (slow scan,
    preceded by a cheap substring test)."""
    candidates = {n for n in names if json.dumps(n).encode() in data}
    found: set[str] = set()
    if not candidates:
        return found
    for line in data.split(b"\n"):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except ValueError:
            continue
        if isinstance(obj, dict):
            found.update(candidates.intersection(obj))
            if found == candidates:
                break
    return found


def _json_fast(path: str, data: bytes, sources: dict[str, str]) -> tuple[pa.Table, np.ndarray] | None:
    """pyarrow.json with type inference: ``(table, line index of each row)``,
    or None if the file needs the slow path.

    ``event_time`` is always read as a string (Arrow would infer timestamps
    even from date-only strings, which validation must reject); any other
    canonical column that Arrow infers as temporal is re-read as a string, so
    Arrow never reformats a value. Nested values, mixed types, broken lines or
    a line holding several objects send the file to the slow path.
    """
    forced = {sources["event_time"]}
    positions = None
    for _ in range(3):
        schema = pa.schema([(name, pa.string()) for name in sorted(forced)])
        try:
            table = pa_json.read_json(
                pa.BufferReader(data),
                read_options=pa_json.ReadOptions(use_threads=True, block_size=16 << 20),
                parse_options=pa_json.ParseOptions(explicit_schema=schema, unexpected_field_behavior="infer"),
            )
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError):
            return None
        if positions is None:
            positions = _nonblank_lines(data)
        if table.num_rows != len(positions):
            return None  # e.g. two objects on one line: rows cannot be numbered
        columns = _table_columns(table)
        retry = set()
        for source in set(sources.values()):
            column = columns.get(source)
            if column is None:
                continue
            if pa.types.is_temporal(column.type):
                retry.add(source)
            elif pa.types.is_nested(column.type) or pa.types.is_binary(column.type):
                return None
        if not retry:
            # explicit-schema columns exist even if no object has the key
            present = set(columns)
            absent_forced = [n for n in forced if columns[n].null_count == table.num_rows]
            if absent_forced:
                present -= set(absent_forced) - _json_keys_present(data, absent_forced)
            _check_required(path, present, sources)
            return table, positions
        forced |= retry
    return None


def _json_value_str(value) -> str | None:
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "true" if value else "false"
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


_TEXT_NUMBERS_DECODER = json.JSONDecoder(parse_float=str, parse_int=str, parse_constant=str)


def _json_column(objs: list[dict], lines: list[bytes], name: str) -> pa.Array:
    column = [obj.get(name) for obj in objs]
    try:
        return pa.array(column, pa.string())  # all strings / nulls
    except (pa.ArrowInvalid, pa.ArrowTypeError):
        pass
    out = []
    for value, line in zip(column, lines):
        if isinstance(value, (dict, list)):
            # numbers were kept as text; re-parse so that nested numbers are
            # rendered as JSON numbers, not as quoted strings
            value = json.loads(line)[name]
        out.append(_json_value_str(value))
    return pa.array(out, pa.string())


def _json_slow(path: str, data: bytes, sources: dict[str, str]):
    """Per-line JSON parsing; every value becomes its string form (numbers
    keep their literal text, ``true``/``false``, nested values as compact
    JSON, null stays null). Unparseable and non-object lines are malformed."""
    objs: list[dict] = []
    good_lines: list[bytes] = []
    positions: list[int] = []
    bad_numbers: list[int] = []
    bad_texts: list[str] = []
    decode = _TEXT_NUMBERS_DECODER.decode
    for index, line in enumerate(data.split(b"\n")):
        if not line.strip(b" \t\r\n"):
            continue
        try:
            obj = decode(line.decode("utf-8"))
        except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError
            obj = None
        if type(obj) is dict:
            objs.append(obj)
            good_lines.append(line)
            positions.append(index)
        else:
            bad_numbers.append(index)
            bad_texts.append(line.decode("utf-8", errors="replace").rstrip("\r"))
    keys: set[str] = set()
    for obj in objs:
        keys.update(obj)
    if objs:
        _check_required(path, keys, sources)
    present = [name for name in _wanted_sources(sources, keys)]
    table = pa.Table.from_arrays([_json_column(objs, good_lines, name) for name in present], names=present)
    if not table.num_columns:
        table = pa.table({"": pa.nulls(len(positions))})
    return table, np.asarray(positions, dtype=np.int64), bad_numbers, bad_texts


def _read_jsonl(path, sources, batch_rows):
    data = _read_text_file(path, "jsonl")
    if not data.strip():
        return
    fast = _json_fast(path, data, sources)
    if fast is not None:
        table, positions = fast
        yield from _emit_runs(path, _canonical_table(table, sources), positions, [], [], batch_rows)
        return
    table, positions, bad_numbers, bad_texts = _json_slow(path, data, sources)
    yield from _emit_runs(path, _canonical_table(table, sources), positions, bad_numbers, bad_texts, batch_rows)


def read_batches(
    path,
    *,
    column_mapping: dict[str, str] | None = None,
    batch_rows: int = 1_000_000,
    columns: Sequence[str] | None = None,
) -> Iterator[tuple[pa.RecordBatch, int, pa.RecordBatch | None]]:
    """Yield ``(batch, first_row_number, malformed)`` for one file.

    See the module docstring for the batch layout, row numbering and the
    malformed-row dead letters. Parquet is streamed (only the needed columns
    are read); CSV and JSONL are read whole and then cut into batches of at
    most ``batch_rows`` rows. Raises ``InputError`` naming the file if it is
    unreadable (also mid-read) or lacks a required column.
    """
    path = os.fspath(path)
    if batch_rows < 1:
        raise ValueError("batch_rows must be >= 1")
    fmt = detect_format(path)
    sources = _source_names(column_mapping, path)
    if fmt == "parquet":
        yield from _read_parquet(path, sources, batch_rows, columns)
        return
    reader = {"csv": _read_csv, "jsonl": _read_jsonl}[fmt]
    yield from reader(path, sources, batch_rows)


def supports_projection(path) -> bool:
    """Whether read_batches(columns=...) reads only those columns (Parquet)."""
    return detect_format(os.fspath(path)) == "parquet"


def read_rows(path, row_numbers, *, column_mapping: dict[str, str] | None = None) -> pa.RecordBatch:
    """All canonical columns of the given 0-based data rows of a Parquet file, in the given order.

    Used to fill dead letters with every raw value when the main read was projected.
    """
    path = os.fspath(path)
    sources = _source_names(column_mapping, path)
    rows = np.asarray(row_numbers, dtype=np.int64)
    pf = _open_parquet(path)
    try:
        names = set(pf.schema_arrow.names)
        starts = np.cumsum([0] + [pf.metadata.row_group(i).num_rows for i in range(pf.num_row_groups)])
        groups = np.unique(np.searchsorted(starts, rows, side="right") - 1)
        table = pf.read_row_groups([int(g) for g in groups], columns=_wanted_sources(sources, names))
        # row r of the file is at (r - starts[g]) + (rows of earlier selected groups)
        offsets = np.cumsum([0] + [pf.metadata.row_group(int(g)).num_rows for g in groups])
        local = np.searchsorted(groups, np.searchsorted(starts, rows, side="right") - 1)
        positions = rows - starts[groups[local]] + offsets[local]
        taken = table.take(pa.array(positions)).combine_chunks()
    finally:
        pf.close()
    columns = dict(zip(taken.schema.names, taken.columns))
    return _canonical_batch({k: v.chunk(0) if v.num_chunks else pa.array([], v.type)
                             for k, v in columns.items()}, sources, len(rows))
