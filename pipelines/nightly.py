"""Nightly DP release of one day of clickstream events.

    python -m pipelines.nightly --spec configs/nightly.yaml --input 'data/*.parquet' \
        --output out/ --date 2026-12-02 [Beam options, e.g. --runner DataflowRunner ...]

Everything that can be checked is checked before the pipeline starts: the spec,
the budget plan, the inputs' readability and required columns, public key
files, and whether the date was already released. Outputs are written to a
staging directory and published only after the Beam job has succeeded.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import hashlib
import json
import logging
import os
import sys
import time
import uuid
from typing import Optional

import apache_beam as beam
import pyarrow as pa
import pyarrow.parquet as pq
from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics.metric import MetricsFilter
from apache_beam.options.pipeline_options import PipelineOptions

from transforms import beam_ops, readers
from transforms.budget import BudgetPlan, plan_budget
from transforms.spec import JobSpec, SpecError, load_spec

LOG = logging.getLogger("clickdp")

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_BAD_SPEC = 2
EXIT_BAD_INPUT = 3
EXIT_REFUSED = 4

DEFAULT_SPEC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                            "configs", "nightly.yaml")
NO_NOISE_ENV = "CLICKDP_ALLOW_NO_NOISE"


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


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--spec", default=DEFAULT_SPEC, help="job spec YAML (default: configs/nightly.yaml)")
    parser.add_argument("--input", action="append", required=True,
                        help="input file, directory or glob (Parquet, JSONL, CSV); repeatable")
    parser.add_argument("--output", required=True, help="release root (local path or gs://...)")
    parser.add_argument("--date", required=True, type=_parse_date, help="the UTC day to release, YYYY-MM-DD")
    parser.add_argument("--quarantine", default=None,
                        help="where dead letters and operator-only run summaries go "
                             "(never published; default: <output>_quarantine)")
    parser.add_argument("--public-keys", action="append", default=[], metavar="OUTPUT=PATH",
                        help="override the keys_file of a public-partition output")
    parser.add_argument("--force-rerelease", action="store_true",
                        help="release a date that was already released (spends budget again)")
    parser.add_argument("--shards", type=int, default=8, help="privacy-unit shards (default 8)")
    parser.add_argument("--buckets", type=int, default=8, help="partition-key buckets (default 8)")
    parser.add_argument("--batch-rows", type=int, default=1_000_000, help="rows per read batch")
    parser.add_argument("--noise-sampler", choices=("secure", "pydp"), default="secure",
                        help="secure: vectorized CSPRNG sampler (default); pydp: python-dp reference")
    parser.add_argument("--run-id", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--unsafe-no-noise-for-tests", action="store_true", help=argparse.SUPPRESS)


def _parse_date(text: str) -> datetime.date:
    try:
        return datetime.date.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--date must be YYYY-MM-DD, got {text!r}") from None


def _default_quarantine(output: str) -> str:
    return output.rstrip("/") + "_quarantine"


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
            "privacy_unit": spec.privacy_unit,
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


def _manifest_path(output_root: str, job: str, date: datetime.date) -> str:
    return FileSystems.join(output_root, "_manifests", job, f"dt={date.isoformat()}.json")


def _exists(path: str) -> bool:
    try:
        return FileSystems.exists(path)
    except Exception:  # noqa: BLE001
        return False


def _sha256(path: str) -> str:
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
    with FileSystems.create(path) as fh:
        fh.write(json.dumps(data, indent=2, sort_keys=True, default=str).encode())


def _pipeline_options(beam_args: list) -> tuple:
    options = PipelineOptions(beam_args)
    runner_name = options.get_all_options().get("runner")
    if runner_name in (None, "FnApiRunner"):
        from apache_beam.runners.portability.fn_api_runner import FnApiRunner
        return options, FnApiRunner(), "FnApiRunner"
    return options, None, runner_name


def run(argv: Optional[list] = None) -> RunResult:
    """Parses arguments, checks everything, runs the pipeline, publishes. Never raises
    for user errors: returns a RunResult whose exit_code a scheduler can act on."""
    parser = argparse.ArgumentParser(prog="clickdp run", description=__doc__.split("\n")[0])
    add_arguments(parser)
    args, beam_args = parser.parse_known_args(argv)
    try:
        return _run(args, beam_args)
    except SpecError as exc:
        return _fail(EXIT_BAD_SPEC, f"bad job spec: {exc}")
    except readers.InputError as exc:
        return _fail(EXIT_BAD_INPUT, f"bad input: {exc}")
    except RefusedError as exc:
        return _fail(EXIT_REFUSED, f"refused: {exc}")


def _fail(code: int, message: str) -> RunResult:
    LOG.error(message)
    print(f"clickdp: {message}", file=sys.stderr)
    return RunResult(exit_code=code, message=message)


def _run(args, beam_args) -> RunResult:
    t0 = time.time()
    no_noise = bool(args.unsafe_no_noise_for_tests)
    if no_noise and os.environ.get(NO_NOISE_ENV) != "1":
        raise SpecError("--unsafe-no-noise-for-tests", f"is a test-only switch; it needs {NO_NOISE_ENV}=1")
    for flag, value in (("--shards", args.shards), ("--buckets", args.buckets), ("--batch-rows", args.batch_rows)):
        if value < 1:
            raise SpecError(flag, f"must be >= 1, got {value}")
    spec = load_spec(args.spec)
    plan = plan_budget(spec)
    run_id = args.run_id or (f"{args.date.isoformat()}-{datetime.datetime.utcnow():%Y%m%dT%H%M%S}-"
                             f"{uuid.uuid4().hex[:8]}")
    output_root = args.output.rstrip("/")
    quarantine = (args.quarantine or _default_quarantine(output_root)).rstrip("/")
    if os.path.abspath(quarantine).startswith(os.path.abspath(output_root) + os.sep):
        raise SpecError("--quarantine", "must not be inside --output (dead letters are never published)")

    # Checks before any data is read or any noise is drawn.
    paths = readers.expand_inputs(args.input)
    inputs = readers.preflight(paths, column_mapping=spec.mapping)
    public_keys = load_public_keys(spec, args.public_keys)
    already = [o.name for o in spec.outputs if _exists(_released_dir(output_root, o.name, args.date))]
    if already and not args.force_rerelease:
        raise RefusedError(
            f"{args.date} is already released for output(s) {', '.join(already)} under {output_root}; "
            "a second release with fresh noise would weaken the guarantee (averaging halves the noise). "
            "Use --force-rerelease to release again and spend the budget again.")

    staging = FileSystems.join(output_root, "_staging", run_id)
    dead_dir = FileSystems.join(quarantine, "dead_letter", f"dt={args.date.isoformat()}", f"run={run_id}")
    options, runner, runner_name = _pipeline_options(beam_args)
    LOG.info(json.dumps({"event": "start", "run_id": run_id, "job": spec.job, "date": args.date.isoformat(),
                         "files": inputs["files"], "bytes": inputs["bytes"], "runner": runner_name}))
    pipeline = beam.Pipeline(runner=runner, options=options) if runner else beam.Pipeline(options=options)
    _ = (pipeline
         | "ListInputs" >> beam.Create(paths)
         | "SpreadFiles" >> beam.Reshuffle()
         | "NightlyRelease" >> beam_ops.NightlyRelease(
             spec, plan, date=args.date, staging_dir=staging, dead_dir=dead_dir,
             public_keys=public_keys, file_metadata=_file_metadata(spec, plan, args.date, run_id),
             n_shards=args.shards, n_buckets=args.buckets, batch_rows=args.batch_rows,
             sampler=args.noise_sampler, no_noise=no_noise))
    t_pipe = time.time()
    result = pipeline.run()
    state = result.wait_until_finish()
    pipeline_seconds = time.time() - t_pipe
    if str(state).upper().split(".")[-1] not in ("DONE", "UNKNOWN"):
        return _fail(EXIT_FAILURE, f"pipeline ended in state {state}; nothing was published")
    counters = _counters(result)

    rows_read = counters.get("rows_read", 0)
    rows_valid = counters.get("rows_valid", 0)
    rows_dead = counters.get("rows_dead", 0)
    if counters and rows_read != rows_valid + rows_dead:
        return _fail(EXIT_FAILURE, f"row accounting mismatch: read {rows_read} != valid {rows_valid} + "
                                   f"dead {rows_dead}; nothing was published")

    # Publish: staging -> final, then the manifest (the commit record).
    files = []
    for o in spec.outputs:
        src = _released_dir(staging, o.name, args.date)
        dst = _released_dir(output_root, o.name, args.date)
        _publish_dir(src, dst)
        for m in FileSystems.match([FileSystems.join(dst, "*.parquet")])[0].metadata_list:
            md = pq.read_metadata(m.path) if "://" not in m.path else None
            files.append({"output": o.name, "path": m.path, "bytes": m.size_in_bytes,
                          "rows": md.num_rows if md else None, "sha256": _sha256(m.path)})
    _cleanup(staging)
    eps_spent, delta_spent = plan.spent()
    manifest = {
        "job": spec.job, "date": args.date.isoformat(), "run_id": run_id, "spec_hash": spec.spec_hash,
        "published_at": datetime.datetime.utcnow().isoformat() + "Z",
        "privacy_unit": spec.privacy_unit, "noise": spec.noise,
        "budget": {"epsilon": spec.epsilon, "delta": spec.delta, "spent_epsilon": eps_spent,
                   "spent_delta": delta_spent, "accountant": spec.accountant},
        "outputs": [{"name": o.name, "epsilon": plan.output(o.name).epsilon,
                     "delta": plan.output(o.name).delta, "bounds": dataclasses.asdict(o.bounds),
                     "partition_selection": o.selection.kind,
                     "mechanisms": [m.to_json() for m in plan.output(o.name).mechanisms()]}
                    for o in spec.outputs],
        "files": files,
        "forced_rerelease": bool(already),
    }
    manifest_path = _manifest_path(output_root, spec.job, args.date)
    _write_json(manifest_path, manifest)

    summary = {
        "operator_only": "NOT differentially private: raw counts for the operator; never publish",
        "run_id": run_id, "job": spec.job, "date": args.date.isoformat(), "runner": runner_name,
        "seconds": {"total": round(time.time() - t0, 3), "pipeline": round(pipeline_seconds, 3)},
        "inputs": inputs,
        "rows": {"read": rows_read, "valid": rows_valid, "dead_lettered": rows_dead,
                 "dead_by_reason": {k.split(":", 1)[1]: v for k, v in counters.items() if k.startswith("dead:")},
                 "invariant_read_eq_valid_plus_dead": rows_read == rows_valid + rows_dead},
        "outputs": {o.name: {k: counters.get(f"out:{o.name}:{k}", 0) for k in
                             ("rows_eligible", "rows_kept", "partitions_considered", "partitions_released")}
                    for o in spec.outputs},
        "privacy": plan.to_json(),
        "manifest": manifest_path,
        "dead_letters": dead_dir,
        "files": files,
    }
    summary_path = FileSystems.join(quarantine, "_runs", spec.job, f"dt={args.date.isoformat()}",
                                    f"{run_id}.json")
    _write_json(summary_path, summary)
    LOG.info(json.dumps({"event": "published", "run_id": run_id, "manifest": manifest_path,
                         "seconds": summary["seconds"]}))
    print(human_summary(summary, manifest, output_root))
    return RunResult(EXIT_OK, run_id, summary, manifest_path, summary_path)


def _publish_dir(src: str, dst: str) -> None:
    """Moves a staged partition directory into place (a rename on local filesystems)."""
    if "://" not in dst:
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        if os.path.exists(dst):  # forced re-release: swap the old directory out first
            old = f"{dst}.replaced-{uuid.uuid4().hex[:8]}"
            os.replace(dst, old)
            os.replace(src, dst)
            import shutil
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(src, dst)
        return
    if _exists(dst):
        FileSystems.delete([dst])
    FileSystems.rename([src], [dst])


def _cleanup(staging: str) -> None:
    try:
        if _exists(staging):
            FileSystems.delete([staging])
    except Exception:  # noqa: BLE001 - stale staging is harmless and cleaned later
        LOG.warning("could not remove staging dir %s", staging)


def human_summary(summary: dict, manifest: dict, output_root: str) -> str:
    rows = summary["rows"]
    lines = [
        f"clickdp {summary['job']} {summary['date']} (run {summary['run_id']}, {summary['runner']}) "
        f"finished in {summary['seconds']['total']:.1f}s",
        f"  rows: {rows['read']:,} read, {rows['valid']:,} valid, {rows['dead_lettered']:,} dead-lettered"
        + (f" ({', '.join(f'{k}: {v:,}' for k, v in sorted(rows['dead_by_reason'].items()))})"
           if rows["dead_by_reason"] else ""),
        f"  privacy: ({manifest['budget']['spent_epsilon']:.4g}, {manifest['budget']['spent_delta']:.3g})-DP "
        f"per {manifest['privacy_unit']} for this day, {manifest['noise']} noise, of a budget of "
        f"({manifest['budget']['epsilon']:g}, {manifest['budget']['delta']:g})",
    ]
    for o in manifest["outputs"]:
        st = summary["outputs"][o["name"]]
        lines.append(f"  {o['name']}: eps {o['epsilon']:.4g}, {st['rows_kept']:,} rows kept after bounding, "
                     f"{st['partitions_released']:,} of {st['partitions_considered']:,} partitions released "
                     f"({o['partition_selection']} selection)")
    lines.append(f"  released: {output_root}/<output>/dt={summary['date']}/part-00000.parquet")
    lines.append(f"  manifest: {summary['manifest']}")
    lines.append(f"  dead letters (quarantine, never publish): {summary['dead_letters']}")
    return "\n".join(lines)


def main(argv: Optional[list] = None) -> int:
    logging.basicConfig(level=logging.ERROR, format="%(message)s", force=True)
    LOG.setLevel(logging.INFO)
    return run(argv).exit_code


if __name__ == "__main__":
    sys.exit(main())
