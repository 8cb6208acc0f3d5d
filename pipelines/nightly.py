"""Nightly DP release of one day of clickstream events.

    python -m pipelines.nightly --spec configs/nightly.yaml --input 'data/*.parquet' \\
        --output out/ --date 2026-12-02 [--ledger PATH] [Beam options, e.g. --runner DataflowRunner ...]

Everything that can be checked is checked before the pipeline starts: the spec,
the budget plan, the date (not in the future), the privacy ledger (window cap,
released-once), the inputs' readability and required columns, public key files.
The run then reserves its budget in the ledger (one SQLite transaction), writes
its outputs to ``<output>/_staging/<run_id>/`` and, only after the Beam job has
succeeded, publishes them (see "Publish protocol" below) and marks the ledger
entry released.

Publish protocol (local filesystem)
    1. ``_staging/<run_id>/_OWNER.json``: pid, host and process start time of the run.
    2. The Beam job writes ``_staging/<run_id>/<output>/dt=D/part-*.parquet``.
    3. The manifest is computed from the staged files (rows, sha256, final paths).
    4. ``_staging/<run_id>/_PUBLISH.json`` (the journal) lists the moves.
    5. Each output directory is moved into place with ``os.replace`` (a re-released
       directory is first moved aside into the staging dir).
    6. The manifest ``_manifests/<job>/dt=D.json`` is written (temp file + ``os.replace``):
       THIS is the commit point. A release without its manifest does not exist.
    7. The ledger row becomes released; the staging dir is removed.
    Every start recovers the output root first: a staging dir whose run is dead is
    rolled back if its manifest was never written (moved directories are removed, a
    moved-aside old release is put back, the ledger row becomes aborted), or completed
    if it was (the ledger row becomes released); then the dir is removed. So a run
    killed at any point leaves either its whole release (manifest present) or none
    of it, once the next run (or ``clickdp ledger verify``) has started.

Exit codes: 0 published (or nothing to do), 1 failure (nothing published),
2 bad spec or arguments (including a date in the future), 3 bad input,
4 refused by the ledger or release rules.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import hashlib
import json
import logging
import os
import re
import shutil
import sys
import time
import uuid
from typing import TYPE_CHECKING, Optional

import apache_beam as beam
import pyarrow as pa
import pyarrow.parquet as pq
from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics.metric import MetricsFilter
from apache_beam.options.pipeline_options import PipelineOptions

from transforms import accounting, beam_ops, fileshuffle, readers
from transforms import ledger as ledger_lib
from transforms.budget import BudgetPlan
from transforms.parallel import auto_threads
from transforms.spec import JobSpec, SpecError, load_spec
from pipelines.prefetch import DEFAULT_SPEC, ledger_path_for, local_dp_events, run_events
from pipelines.prefetch import default_quarantine as _default_quarantine

if TYPE_CHECKING:
    from pipelines.prefetch import Prefetch

LOG = logging.getLogger("clickdp")

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_BAD_SPEC = 2
EXIT_BAD_INPUT = 3
EXIT_REFUSED = 4

NO_NOISE_ENV = "CLICKDP_ALLOW_NO_NOISE"
# Test-only: kill the process (os._exit(137), like kill -9) at a named point of the run.
CRASH_ENV = "CLICKDP_TEST_CRASH_AT"
CRASH_POINTS = ("after_reserve", "before_publish", "mid_publish", "after_publish_before_ledger")
JOURNAL = "_PUBLISH.json"
OWNER = "_OWNER.json"
# A staging dir with neither an owner file nor a ledger row is only touched once this old.
_ORPHAN_AGE_SECONDS = 600
_RUN_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


class RefusedError(RuntimeError):
    """The run would break a release rule (e.g. the date is already released)."""


@dataclasses.dataclass
class RunResult:
    exit_code: int
    run_id: str = ""
    summary: Optional[dict] = None
    manifest_path: Optional[str] = None
    summary_path: Optional[str] = None
    message: str = ""


def add_arguments(parser: argparse.ArgumentParser, *, date_required: bool = True) -> None:
    parser.add_argument("--spec", default=DEFAULT_SPEC, help="job spec YAML (default: configs/nightly.yaml)")
    parser.add_argument("--input", action="append", required=True,
                        help="input file, directory or glob (Parquet, JSONL, CSV); repeatable")
    parser.add_argument("--output", required=True, help="release root (local path or gs://...)")
    if date_required:
        parser.add_argument("--date", required=True, type=_parse_date, help="the UTC day to release, YYYY-MM-DD")
    parser.add_argument("--quarantine", default=None,
                        help="where dead letters and operator-only run summaries go "
                             "(never published; default: <output>_quarantine)")
    parser.add_argument("--ledger", default=None,
                        help="privacy ledger (SQLite file; default: the spec's ledger.path, else "
                             "<quarantine>/_ledger/ledger.sqlite)")
    parser.add_argument("--public-keys", action="append", default=[], metavar="OUTPUT=PATH",
                        help="override the keys_file of a public-partition output")
    parser.add_argument("--force-rerelease", action="store_true",
                        help="release a date that was already released (spends budget again)")
    parser.add_argument("--skip-if-released", action="store_true",
                        help="exit 0 without doing anything if the date is already released with the same "
                             "spec (for scheduler retries and backfills)")
    parser.add_argument("--shards", type=int, default=8, help="privacy-unit shards (default 8)")
    parser.add_argument("--buckets", type=int, default=8, help="partition-key buckets (default 8)")
    parser.add_argument("--batch-rows", type=int, default=1_000_000, help="rows per read batch")
    parser.add_argument("--shuffle", choices=("auto", "beam", "files"), default="auto",
                        help="how shard parts reach the bound step: files = local Arrow files, only Beam's "
                             "grouping of their paths (in-process local runner only); beam = Beam's shuffle; "
                             "auto (default) = files on the local runner, beam elsewhere")
    parser.add_argument("--shuffle-dir", default=None,
                        help="where --shuffle files makes its private temporary directory (default: the "
                             "system temp dir; removed when the run ends, and what killed runs left there is "
                             "removed by the next run: keep it local to this machine, not shared)")
    parser.add_argument("--threads", type=int, default=0,
                        help="threads per worker for the read and bound steps (default 0 = all cores on "
                             "the local runner, 1 on distributed runners, which run a worker per core)")
    parser.add_argument("--noise-sampler", choices=("secure", "pydp"), default="secure",
                        help="secure: vectorized CSPRNG sampler (default); pydp: python-dp reference")
    parser.add_argument("--catalog", default=None,
                        help="public product catalog CSV (product_id, category) used by the text corpus")
    parser.add_argument("--no-postprocess", action="store_true",
                        help="skip neighbours/features/corpus/report after publishing")
    parser.add_argument("--run-id", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--unsafe-no-noise-for-tests", action="store_true", help=argparse.SUPPRESS)


def _parse_date(text: str) -> datetime.date:
    try:
        return datetime.date.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--date must be YYYY-MM-DD, got {text!r}") from None


def utc_today() -> datetime.date:
    return datetime.datetime.now(datetime.timezone.utc).date()


def check_not_future(date: datetime.date, flag: str = "--date") -> None:
    today = utc_today()
    if date > today:
        raise SpecError(flag, f"{date} is in the future (today is {today} UTC); a day can only be released "
                              "once it has happened")


def log_event(event: str, **fields) -> None:
    """One structured (JSON) log line on stderr."""
    rec = {"ts": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="milliseconds"),
           "event": event, **fields}
    LOG.info(json.dumps(rec, default=str))


def _crash_point(name: str) -> None:
    if os.environ.get(CRASH_ENV) == name:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(137)


def load_public_keys(spec: JobSpec, overrides: list) -> dict:
    """Reads every public key list on the launching machine (they are small)."""
    paths = {o.name: o.selection.keys_file for o in spec.outputs if o.selection.kind == "public"}
    for item in overrides:
        name, sep, path = item.partition("=")
        if not sep or name not in paths:
            raise SpecError("--public-keys", f"expected OUTPUT=PATH for a public output "
                                             f"({', '.join(paths) or 'none in this spec'}), got {item!r}")
        paths[name] = path
    keys = {}
    for name, path in paths.items():
        try:
            with FileSystems.open(path) as fh:
                text = fh.read().decode("utf-8")
        except Exception as exc:  # noqa: BLE001 - any I/O error is the same user error
            raise readers.InputError(f"public keys of output {name!r}: cannot read {path}: {exc}") from None
        lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
        if path.endswith(".csv") and lines:
            key = spec.output(name).partition_keys[0]
            header = lines[0].split(",")
            if key not in header:
                raise readers.InputError(f"public keys of output {name!r}: {path} has no column {key!r}")
            i = header.index(key)
            lines = [ln.split(",")[i] for ln in lines[1:]]
        uniq = sorted(set(lines))
        if not uniq:
            raise readers.InputError(f"public keys of output {name!r}: {path} is empty")
        keys[name] = pa.array(uniq, pa.string())
    return keys


def _file_metadata(spec: JobSpec, plan: BudgetPlan, date: datetime.date, run_id: str) -> dict:
    meta = {}
    for o in spec.outputs:
        ob = plan.output(o.name)
        meta[o.name] = {
            "job": spec.job, "date": date.isoformat(), "run_id": run_id, "spec_hash": spec.spec_hash,
            "output": o.name, "epsilon": ob.epsilon, "delta": ob.delta, "noise": spec.noise,
            "accountant": spec.accountant, "privacy_unit": spec.privacy_unit,
            "bounds": dataclasses.asdict(o.bounds),
            "partition_selection": {"type": o.selection.kind, "strategy": o.selection.strategy
                                    if o.selection.kind == "private" else None},
            "metrics": [{"name": m.name, "type": m.type, "column": m.column, "min": m.min_value,
                         "max": m.max_value, "filter": m.filter.describe() if m.filter else None}
                        for m in o.metrics],
            "mechanisms": [mech.to_json() for mech in ob.mechanisms()],
            "confidence_interval": "laplace: value +- std/sqrt(2)*ln(1/(1-level)); "
                                   "gaussian: value +- z*std (mean/variance std is a delta-method approximation)",
        }
    return meta


def _released_dir(output_root: str, name: str, date: datetime.date) -> str:
    return FileSystems.join(output_root, name, f"dt={date.isoformat()}")


def manifest_path_for(output_root: str, job: str, date: datetime.date) -> str:
    return FileSystems.join(output_root, "_manifests", job, f"dt={date.isoformat()}.json")




def _is_local(path: str) -> bool:
    return "://" not in path


def _exists(path: str) -> bool:
    """A file or a directory exists; on object stores a "directory" exists if it has objects."""
    try:
        if FileSystems.exists(path):
            return True
        if not _is_local(path):
            return bool(_objects_under(path))
        return False
    except Exception:  # noqa: BLE001
        return False


def _objects_under(prefix: str) -> list:
    """Paths of the objects under an object-store prefix (recursive)."""
    pattern = prefix.rstrip("/") + "/**"
    return [m.path for m in FileSystems.match([pattern])[0].metadata_list]


def _rename_tree(src: str, dst: str) -> None:
    """Object stores have no directories: move object by object (copy + delete each)."""
    src = src.rstrip("/")
    objects = _objects_under(src)
    if objects:
        FileSystems.rename(objects, [dst.rstrip("/") + p[len(src):] for p in objects])


def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with FileSystems.open(path) as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _counters(result) -> dict:
    out = {}
    try:
        metrics = result.metrics().query(MetricsFilter().with_namespace(beam_ops.NAMESPACE))
    except Exception:  # noqa: BLE001 - some runners do not report metrics
        return out
    for c in metrics["counters"]:
        value = c.committed if c.committed is not None else c.attempted
        out[c.key.metric.name] = out.get(c.key.metric.name, 0) + int(value or 0)
    return out


def _write_json(path: str, data: dict) -> None:
    """Writes JSON so that a reader sees the old file or the new one, never a torn one:
    temp file + fsync + os.replace locally; one object PUT on object stores."""
    body = json.dumps(data, indent=2, sort_keys=True, default=str).encode()
    if not _is_local(path):
        with FileSystems.create(path) as fh:
            fh.write(body)
        return
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    tmp = os.path.join(directory, f".{os.path.basename(path)}.{uuid.uuid4().hex[:8]}.tmp")
    with open(tmp, "wb") as fh:
        fh.write(body)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    _fsync_dir(directory)


def _fsync_dir(directory: str) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _read_json(path: str) -> Optional[dict]:
    try:
        with FileSystems.open(path) as fh:
            return json.loads(fh.read().decode("utf-8"))
    except Exception:  # noqa: BLE001 - missing or torn: absent
        return None


def _pipeline_options(beam_args: list) -> tuple:
    options = PipelineOptions(beam_args)
    runner_name = options.get_all_options().get("runner")
    if runner_name in (None, "FnApiRunner"):
        from apache_beam.runners.portability.fn_api_runner import FnApiRunner
        return options, FnApiRunner(), "FnApiRunner"
    return options, None, runner_name


def run(argv: Optional[list] = None, prefetch: Optional["Prefetch"] = None) -> RunResult:
    """Parses arguments, checks everything, runs the pipeline, publishes. Never raises
    for user errors: returns a RunResult whose exit_code a scheduler can act on.

    prefetch: accounting started ahead by pipelines.prefetch.start(argv) (optional)."""
    parser = argparse.ArgumentParser(prog="clickdp run", description=__doc__.split("\n")[0])
    add_arguments(parser)
    try:
        args, beam_args = parser.parse_known_args(argv)
    except SystemExit:
        if prefetch is not None:
            prefetch.cancel()
        raise
    try:
        return _run(args, beam_args, prefetch)
    except SpecError as exc:
        return _fail(EXIT_BAD_SPEC, f"bad job spec or arguments: {exc}")
    except readers.InputError as exc:
        return _fail(EXIT_BAD_INPUT, f"bad input: {exc}")
    except (RefusedError, ledger_lib.LedgerRefused) as exc:
        return _fail(EXIT_REFUSED, f"refused: {exc}")
    except ledger_lib.LedgerError as exc:
        return _fail(EXIT_FAILURE, f"ledger: {exc}")
    finally:
        if prefetch is not None:
            prefetch.cancel()
            accounting.clear_precomputed()


def _fail(code: int, message: str) -> RunResult:
    log_event("error", exit_code=code, message=message)
    print(f"clickdp: {message}", file=sys.stderr)
    return RunResult(exit_code=code, message=message)


def _run(args, beam_args, prefetch=None) -> RunResult:
    t0 = time.time()
    no_noise = bool(args.unsafe_no_noise_for_tests)
    if no_noise and os.environ.get(NO_NOISE_ENV) != "1":
        raise SpecError("--unsafe-no-noise-for-tests", f"is a test-only switch; it needs {NO_NOISE_ENV}=1")
    for flag, value in (("--shards", args.shards), ("--buckets", args.buckets), ("--batch-rows", args.batch_rows)):
        if value < 1:
            raise SpecError(flag, f"must be >= 1, got {value}")
    if args.threads < 0:
        raise SpecError("--threads", f"must be >= 0 (0 = automatic), got {args.threads}")
    runner_name = PipelineOptions(beam_args).get_all_options().get("runner")
    if args.shuffle == "files" and runner_name not in fileshuffle.IN_PROCESS_RUNNERS:
        raise SpecError("--shuffle", f"files needs the in-process local runner (its workers share this disk), "
                                     f"not {runner_name}")
    if args.force_rerelease and args.skip_if_released:
        raise SpecError("--skip-if-released", "contradicts --force-rerelease")
    if args.run_id is not None and not _RUN_ID_RE.match(args.run_id):
        raise SpecError("--run-id", f"must match {_RUN_ID_RE.pattern}, got {args.run_id!r}")
    check_not_future(args.date)
    spec = load_spec(args.spec)
    if prefetch is not None:  # results of the accounting calls below, computed meanwhile
        t_wait = time.time()
        calls = prefetch.install()
        log_event("prefetched", calls=calls, waited_seconds=round(time.time() - t_wait, 3))
    plan = accounting.plan_for_spec(spec)
    privacy = accounting.report(plan, spec.accountant)
    events = run_events(plan, spec)
    if any(lo.row_key == "pseudonym" for lo in spec.local_outputs):
        from transforms import local_dp
        try:
            local_dp.pseudonym_key_from_env()
        except ValueError as exc:
            raise SpecError("local_dp.row_key", f"pseudonym rows need a key at run time: {exc}") from None
    run_id = args.run_id or (f"{args.date.isoformat()}-{datetime.datetime.utcnow():%Y%m%dT%H%M%S}-"
                             f"{uuid.uuid4().hex[:8]}")
    output_root = args.output.rstrip("/")
    quarantine = (args.quarantine or _default_quarantine(output_root)).rstrip("/")
    if os.path.abspath(quarantine).startswith(os.path.abspath(output_root) + os.sep):
        raise SpecError("--quarantine", "must not be inside --output (dead letters are never published)")
    ledger_path = ledger_path_for(spec, args.ledger, quarantine)
    if not _is_local(ledger_path):
        raise SpecError("--ledger", f"the privacy ledger is a local SQLite file, not {ledger_path}; with an "
                                    "object-store --quarantine set --ledger (or ledger.path in the spec)")
    if _is_local(output_root) and os.path.abspath(ledger_path).startswith(os.path.abspath(output_root) + os.sep):
        raise SpecError("--ledger", "must not be inside --output (the ledger is never published)")
    window = ledger_lib.Window.from_spec(spec)
    manifest_path = manifest_path_for(output_root, spec.job, args.date)
    log_event("plan", run_id=run_id, job=spec.job, date=args.date.isoformat(), accountant=spec.accountant,
              epsilon=spec.epsilon, delta=spec.delta, epsilon_naive=privacy["epsilon_at_delta"]["naive"],
              epsilon_pld=privacy["epsilon_at_delta"]["pld"], mechanisms=len(events))

    # The ledger is consulted before any data is read: a refusal costs nothing.
    with ledger_lib.Ledger(ledger_path) as ledger:
        # Settle what dead runs left behind first (their budget is freed or their release
        # completed), so that the checks below see the true state.
        recovered = recover_output_root(output_root, ledger)
        reclaimed = ledger.reclaim()
        if recovered or reclaimed:
            log_event("recovered", output=output_root, staging=recovered, ledger=reclaimed)
        early = _ledger_precheck(ledger, spec, args, events, window)
        if early is not None:
            return early
        # Checks before any data is read or any noise is drawn (file schemas only).
        paths = readers.expand_inputs(args.input)
        inputs = readers.preflight(paths, column_mapping=spec.mapping)
        log_event("preflight", files=inputs["files"], bytes=inputs["bytes"])
        public_keys = load_public_keys(spec, args.public_keys)
        already = [o.name for o in spec.outputs if _exists(_released_dir(output_root, o.name, args.date))]
        released_rows = [r for r in ledger.rows(spec.job, ("released",)) if r["date"] == args.date.isoformat()]
        if already and not released_rows and not args.force_rerelease:
            raise RefusedError(
                f"{args.date} is already released for output(s) {', '.join(already)} under {output_root}, "
                f"but the ledger {ledger_path} has no record of it (another ledger?). A second release with "
                "fresh noise would weaken the guarantee (averaging halves the noise). Use --force-rerelease "
                "to release again and spend the budget again.")
        reservation = ledger.reserve(
            job=spec.job, date=args.date, run_id=run_id, spec_hash=spec.spec_hash, events=events,
            run_epsilon=privacy["spent_epsilon"], run_delta=privacy["spent_delta"], accountant=spec.accountant,
            window=window, force=args.force_rerelease, output_root=output_root, manifest_path=manifest_path)
        log_event("reserved", run_id=run_id, ledger=ledger_path, window=reservation["window"],
                  reclaimed=reservation["reclaimed"], forced_rerelease=reservation["forced_rerelease"])
        _crash_point("after_reserve")
        staging = FileSystems.join(output_root, "_staging", run_id)
        try:
            return _execute(args, beam_args, spec, plan, privacy, run_id, output_root, quarantine, staging,
                            manifest_path, paths, inputs, public_keys, ledger, ledger_path, window,
                            reservation, t0, no_noise)
        except BaseException as exc:
            action = _abandon(staging, ledger, run_id, f"failed: {type(exc).__name__}: {exc}")
            if isinstance(exc, Exception) and not isinstance(
                    exc, (SpecError, readers.InputError, RefusedError, ledger_lib.LedgerError,
                          ledger_lib.LedgerRefused)):
                what = ("its release was committed (manifest written) and stands"
                        if action == "completed" or ledger_lib.manifest_run_id(manifest_path) == run_id
                        else "nothing was published")
                return _fail(EXIT_FAILURE, f"run {run_id} failed, {what}: {type(exc).__name__}: {exc}")
            raise


def _published_names(spec: JobSpec, staging: str, date: datetime.date) -> list:
    """Central outputs always; local-DP outputs when the run produced rows for them."""
    names = [o.name for o in spec.outputs]
    names += [lo.name for lo in spec.local_outputs if _exists(_released_dir(staging, lo.name, date))]
    return names


def _ledger_precheck(ledger, spec, args, events, window) -> Optional[RunResult]:
    """Read-only ledger checks before anything is read. The same rules are checked again,
    atomically, by Ledger.reserve; this pass only refuses early (and skips released dates)."""
    day = args.date.isoformat()
    released = [r for r in ledger.rows(spec.job, ("released",)) if r["date"] == day]
    if released and args.skip_if_released:
        last = released[-1]
        if last["spec_hash"] == spec.spec_hash:
            msg = f"{spec.job} {day} is already released (run {last['run_id']}); nothing to do"
            log_event("skipped", job=spec.job, date=day, released_run=last["run_id"])
            print(f"clickdp: {msg}")
            return RunResult(EXIT_OK, last["run_id"], message=msg, manifest_path=last["manifest_path"])
    if window.max_epsilon is not None:
        cost = ledger.window_cost(spec.job, args.date, events, window)
        ledger_lib.check_window(spec.job, args.date, cost, window)
    return None


def _execute(args, beam_args, spec, plan, privacy, run_id, output_root, quarantine, staging, manifest_path,
             paths, inputs, public_keys, ledger, ledger_path, window, reservation, t0, no_noise) -> RunResult:
    if _is_local(staging):
        os.makedirs(staging, exist_ok=True)
        _write_json(os.path.join(staging, OWNER), {"run_id": run_id, **ledger_lib.process_identity(),
                                                   "ledger": os.path.abspath(ledger_path)})
    dead_dir = FileSystems.join(quarantine, "dead_letter", f"dt={args.date.isoformat()}", f"run={run_id}")
    options, runner, runner_name = _pipeline_options(beam_args)
    threads = auto_threads(runner_name, args.threads)
    use_files = args.shuffle != "beam" and runner_name in fileshuffle.IN_PROCESS_RUNNERS
    shuffle_dir = fileshuffle.make_dir(args.shuffle_dir) if use_files else None
    log_event("start", run_id=run_id, job=spec.job, date=args.date.isoformat(), files=inputs["files"],
              bytes=inputs["bytes"], runner=runner_name, threads=threads,
              shuffle="files" if use_files else "beam")
    pipeline = beam.Pipeline(runner=runner, options=options) if runner else beam.Pipeline(options=options)
    _ = (pipeline
         | "ListInputs" >> beam.Create(paths)
         | "SpreadFiles" >> beam.Reshuffle()
         | "NightlyRelease" >> beam_ops.NightlyRelease(
             spec, plan, date=args.date, staging_dir=staging, dead_dir=dead_dir,
             public_keys=public_keys, file_metadata=_file_metadata(spec, plan, args.date, run_id),
             n_shards=args.shards, n_buckets=args.buckets, batch_rows=args.batch_rows,
             sampler=args.noise_sampler, no_noise=no_noise, threads=threads, shuffle_dir=shuffle_dir))
    t_pipe = time.time()
    try:
        result = pipeline.run()
        state = result.wait_until_finish()
    finally:
        fileshuffle.remove_dir(shuffle_dir)
    pipeline_seconds = time.time() - t_pipe
    counters = _counters(result)
    log_event("pipeline_done", run_id=run_id, state=str(state), seconds=round(pipeline_seconds, 3),
              counters={k: v for k, v in counters.items() if not k.startswith("dead:")})
    if str(state).upper().split(".")[-1] not in ("DONE", "UNKNOWN"):
        _abandon(staging, ledger, run_id, f"pipeline ended in state {state}")
        return _fail(EXIT_FAILURE, f"pipeline ended in state {state}; nothing was published")

    rows_read = counters.get("rows_read", 0)
    rows_valid = counters.get("rows_valid", 0)
    rows_dead = counters.get("rows_dead", 0)
    if counters and rows_read != rows_valid + rows_dead:
        _abandon(staging, ledger, run_id, "row accounting mismatch")
        return _fail(EXIT_FAILURE, f"row accounting mismatch: read {rows_read} != valid {rows_valid} + "
                                   f"dead {rows_dead}; nothing was published")

    files = _staged_files(spec, args.date, staging, output_root)
    manifest = {
        "job": spec.job, "date": args.date.isoformat(), "run_id": run_id, "spec_hash": spec.spec_hash,
        "published_at": datetime.datetime.utcnow().isoformat() + "Z",
        "privacy_unit": spec.privacy_unit, "noise": spec.noise,
        "budget": {k: v for k, v in privacy.items() if k != "mechanisms"},
        "ledger_window": {**window.to_json(), "checked": reservation["window"]},
        "outputs": [{"name": o.name, "epsilon": plan.output(o.name).epsilon,
                     "delta": plan.output(o.name).delta, "bounds": dataclasses.asdict(o.bounds),
                     "partition_selection": o.selection.kind,
                     "mechanisms": [m.to_json() for m in plan.output(o.name).mechanisms()]}
                    for o in spec.outputs],
        "local_dp_outputs": [{"name": lo.name, "epsilon_local": lo.epsilon, "row_key": lo.row_key,
                              "guarantee": "each row epsilon_local-LDP; row presence/count not hidden"}
                             for lo in spec.local_outputs],
        "files": files,
        "forced_rerelease": reservation["forced_rerelease"],
    }
    _crash_point("before_publish")
    publish(spec, args.date, run_id, staging, output_root, manifest_path, manifest)
    log_event("committed", run_id=run_id, manifest=manifest_path)
    _crash_point("after_publish_before_ledger")
    ledger.mark_released(run_id, manifest_path)
    _remove_tree(staging)

    summary = {
        "operator_only": "NOT differentially private: raw counts for the operator; never publish",
        "run_id": run_id, "job": spec.job, "date": args.date.isoformat(), "runner": runner_name,
        "threads": threads, "shuffle": "files" if shuffle_dir else "beam", "seconds": {"total": round(time.time() - t0, 3), "pipeline": round(pipeline_seconds, 3)},
        "inputs": inputs,
        "rows": {"read": rows_read, "valid": rows_valid, "dead_lettered": rows_dead,
                 "dead_by_reason": {k.split(":", 1)[1]: v for k, v in counters.items() if k.startswith("dead:")},
                 "invariant_read_eq_valid_plus_dead": rows_read == rows_valid + rows_dead},
        "outputs": {o.name: {k: counters.get(f"out:{o.name}:{k}", 0) for k in
                             ("rows_eligible", "rows_kept", "partitions_considered", "partitions_released")}
                    for o in spec.outputs},
        "privacy": privacy,
        "ledger": {"path": ledger_path, "window": window.to_json(), "checked": reservation["window"]},
        "manifest": manifest_path,
        "dead_letters": dead_dir,
        "files": files,
        "stage_seconds": {k.split(":", 1)[1]: v / 1000.0 for k, v in counters.items() if k.startswith("ms:")},
        "local_dp_rows": {lo.name: counters.get(f"local:{lo.name}:rows", 0) for lo in spec.local_outputs},
    }
    if not args.no_postprocess and _is_local(output_root):
        from pipelines import postprocess
        try:
            summary["postprocess"] = postprocess.run(output_root, args.date.isoformat(), spec.job, spec,
                                                     catalog=args.catalog)
            log_event("postprocessed", run_id=run_id, **{k: v for k, v in summary["postprocess"].items()
                                                         if k in ("corpus", "report", "corpus_records")})
        except Exception as exc:  # noqa: BLE001 - the release stands; post-processing can be re-run
            summary["postprocess"] = {"error": f"{type(exc).__name__}: {exc}"}
            log_event("postprocess_failed", run_id=run_id, error=str(exc),
                      rerun=f"clickdp postprocess --release {output_root} --date {args.date} --job {spec.job}")
    summary_path = FileSystems.join(quarantine, "_runs", spec.job, f"dt={args.date.isoformat()}",
                                    f"{run_id}.json")
    _write_json(summary_path, summary)
    log_event("published", run_id=run_id, manifest=manifest_path, seconds=summary["seconds"])
    print(human_summary(summary, manifest, output_root))
    return RunResult(EXIT_OK, run_id, summary, manifest_path, summary_path)


# --------------------------------------------------------------------------------------
# Publish and recovery
# --------------------------------------------------------------------------------------


def _staged_files(spec: JobSpec, date: datetime.date, staging: str, output_root: str) -> list:
    """Manifest entries of the staged files, with the paths they will have once published."""
    files = []
    for name in _published_names(spec, staging, date):
        o = argparse.Namespace(name=name)
        src = _released_dir(staging, o.name, date)
        dst = _released_dir(output_root, o.name, date)
        for m in sorted(FileSystems.match([FileSystems.join(src, "*.parquet")])[0].metadata_list,
                        key=lambda m: m.path):
            md = pq.read_metadata(m.path) if _is_local(m.path) else None
            name = os.path.basename(m.path)
            files.append({"output": o.name, "path": FileSystems.join(dst, name),
                          "relative_path": f"{o.name}/dt={date.isoformat()}/{name}",
                          "bytes": m.size_in_bytes, "rows": md.num_rows if md else None,
                          "sha256": sha256_file(m.path)})
    return files


def publish(spec: JobSpec, date: datetime.date, run_id: str, staging: str, output_root: str,
            manifest_path: str, manifest: dict) -> None:
    """Moves the staged outputs into place, then writes the manifest (the commit point)."""
    moves = [{"output": name, "src": _released_dir(staging, name, date),
              "dst": _released_dir(output_root, name, date),
              "backup": FileSystems.join(staging, "_replaced", name, f"dt={date.isoformat()}")}
             for name in _published_names(spec, staging, date)]
    _write_json(FileSystems.join(staging, JOURNAL),
                {"run_id": run_id, "job": spec.job, "date": date.isoformat(), "manifest": manifest_path,
                 "moves": moves})
    for i, mv in enumerate(moves):
        _move_into_place(mv["src"], mv["dst"], mv["backup"])
        log_event("publish_progress", run_id=run_id, output=mv["output"], moved=i + 1, of=len(moves))
        if i == 0:
            _crash_point("mid_publish")
    _write_json(manifest_path, manifest)


def _move_into_place(src: str, dst: str, backup: str) -> None:
    if _is_local(dst):
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        if os.path.exists(dst):  # forced re-release: the old release is moved aside, kept until commit
            os.makedirs(os.path.dirname(backup), exist_ok=True)
            os.replace(dst, backup)
        os.replace(src, dst)
        _fsync_dir(os.path.dirname(dst))
        return
    # Object stores: rename = copy + delete per object (not atomic); readers follow the manifest.
    if _exists(dst):
        _rename_tree(dst, backup)
    _rename_tree(src, dst)


def _remove_tree(path: str) -> None:
    try:
        if _is_local(path):
            shutil.rmtree(path, ignore_errors=True)
        elif _exists(path):
            objects = _objects_under(path)
            if objects:
                FileSystems.delete(objects)
    except Exception:  # noqa: BLE001 - stale staging is harmless and cleaned at the next start
        LOG.warning("could not remove staging dir %s", path)


def _abandon(staging: str, ledger, run_id: str, reason: str) -> Optional[str]:
    """This (live) run gives up: roll back anything it moved, free its reservation.
    Returns the recovery action (see _recover_staging_dir)."""
    try:
        with ledger.transaction():
            return _recover_staging_dir(staging, run_id, ledger, reason=reason)["action"]
    except Exception as exc:  # noqa: BLE001 - the next start recovers it
        LOG.warning("could not roll back run %s: %s", run_id, exc)
        return None


def _owner_alive(staging_dir: str, run_id: str, ledger) -> Optional[bool]:
    owner = _read_json(os.path.join(staging_dir, OWNER))
    if owner is not None:
        return ledger_lib.process_alive(owner.get("pid"), owner.get("hostname"), owner.get("proc_start"))
    row = ledger.row(run_id)
    if row is not None:
        if row["status"] != "pending":
            return False
        return ledger_lib.process_alive(row["pid"], row["hostname"], row["proc_start"])
    age = time.time() - os.path.getmtime(staging_dir)
    return False if age > _ORPHAN_AGE_SECONDS else None


def recover_output_root(output_root: str, ledger) -> list:
    """Rolls back or completes the staging dirs of dead runs (local filesystems), then
    removes them. Runs inside one ledger transaction, so concurrent starters do not race."""
    root = FileSystems.join(output_root, "_staging")
    if not _is_local(root) or not os.path.isdir(root):
        return []
    actions = []
    with ledger.transaction():
        for name in sorted(os.listdir(root)):
            d = os.path.join(root, name)
            if not os.path.isdir(d):
                continue
            alive = _owner_alive(d, name, ledger)
            if alive is not False:
                actions.append({"run_id": name, "action": "left", "reason": "its process is alive"
                                if alive else "owner unknown (another host?)"})
                continue
            actions.append({"run_id": name, **_recover_staging_dir(d, name, ledger)})
    return actions


def _recover_staging_dir(d: str, run_id: str, ledger, reason: str = "its process died") -> dict:
    """Inside a ledger transaction: completes (manifest written) or rolls back (not written)
    one run's publish, settles its ledger row, removes the staging dir."""
    journal = _read_json(FileSystems.join(d, JOURNAL)) if _exists(d) else None
    if journal is not None and not _is_local(d):
        # Object stores: the manifest decides; orphaned objects are never listed by one.
        committed = ledger_lib.manifest_run_id(journal["manifest"]) == run_id
        ledger.settle(run_id, published=committed, note=f"{reason}; settled on recovery")
        return {"action": "completed" if committed else "left", "detail": "object store"}
    if journal is None:
        ledger.settle(run_id, published=False, note=f"aborted: {reason}; nothing was published")
        _remove_tree(d)
        return {"action": "removed", "detail": "nothing was published"}
    if ledger_lib.manifest_run_id(journal["manifest"]) == run_id:
        ledger.settle(run_id, published=True, note="completed on recovery: its manifest was written")
        _remove_tree(d)
        return {"action": "completed", "detail": "its manifest was written: the release stands"}
    restored = []
    for mv in reversed(journal["moves"]):
        src, dst, backup = mv["src"], mv["dst"], mv["backup"]
        if not os.path.exists(src) and os.path.exists(dst) and _dir_run_id(dst) == run_id:
            shutil.rmtree(dst)  # ours: moved in, never committed
            restored.append(f"removed {dst}")
        if os.path.exists(backup) and not os.path.exists(dst):
            os.replace(backup, dst)  # the previous release, moved aside by a forced re-release
            restored.append(f"restored {dst}")
    ledger.settle(run_id, published=False, note=f"aborted: {reason} before its manifest; rolled back")
    _remove_tree(d)
    return {"action": "rolled_back", "detail": restored}


def _dir_run_id(directory: str) -> Optional[str]:
    """The run id in the DP metadata of a released directory's first Parquet file."""
    try:
        part = sorted(f for f in os.listdir(directory) if f.endswith(".parquet"))[0]
        meta = pq.read_schema(os.path.join(directory, part)).metadata
        return json.loads(meta[b"clickdp.dp"]).get("run_id")
    except Exception:  # noqa: BLE001 - unreadable: not provably ours, leave it
        return None


def human_summary(summary: dict, manifest: dict, output_root: str) -> str:
    rows = summary["rows"]
    budget = manifest["budget"]
    at = budget["epsilon_at_delta"]
    lines = [
        f"clickdp {summary['job']} {summary['date']} (run {summary['run_id']}, {summary['runner']}) "
        f"finished in {summary['seconds']['total']:.1f}s",
        f"  rows: {rows['read']:,} read, {rows['valid']:,} valid, {rows['dead_lettered']:,} dead-lettered"
        + (f" ({', '.join(f'{k}: {v:,}' for k, v in sorted(rows['dead_by_reason'].items()))})"
           if rows["dead_by_reason"] else ""),
        f"  privacy: ({budget['spent_epsilon']:.4g}, {budget['spent_delta']:.3g})-DP "
        f"per {manifest['privacy_unit']} for this day, {manifest['noise']} noise, of a budget of "
        f"({budget['epsilon']:g}, {budget['delta']:g}); epsilon at delta {budget['delta']:g}: "
        f"naive {_fmt_eps(at['naive'])}, PLD {_fmt_eps(at['pld'])} ({budget['accountant']} accountant)",
    ]
    for o in manifest["outputs"]:
        st = summary["outputs"][o["name"]]
        lines.append(f"  {o['name']}: eps {o['epsilon']:.4g}, {st['rows_kept']:,} rows kept after bounding, "
                     f"{st['partitions_released']:,} of {st['partitions_considered']:,} partitions released "
                     f"({o['partition_selection']} selection)")
    led = summary["ledger"]
    checked = led["checked"]
    if checked:
        lines.append(f"  ledger: {checked['start']}..{checked['end']} spends epsilon "
                     f"{_fmt_eps(checked['total_epsilon'])} of {led['window']['max_epsilon']:g} at delta "
                     f"{led['window']['delta']:g} ({led['window']['accountant']}); {led['path']}")
    else:
        lines.append(f"  ledger: recorded in {led['path']} (no window cap in the spec)")
    lines.append(f"  released: {output_root}/<output>/dt={summary['date']}/part-00000.parquet")
    lines.append(f"  manifest: {summary['manifest']}")
    lines.append(f"  dead letters (quarantine, never publish): {summary['dead_letters']}")
    return "\n".join(lines)


def _fmt_eps(x) -> str:
    return "inf" if x is None else f"{x:.4g}"


def main(argv: Optional[list] = None) -> int:
    logging.basicConfig(level=logging.ERROR, format="%(message)s", force=True)
    LOG.setLevel(logging.INFO)
    return run(argv).exit_code


if __name__ == "__main__":
    sys.exit(main())
