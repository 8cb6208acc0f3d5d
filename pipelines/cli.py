"""`clickdp`: the command-line front door.

    clickdp run --spec configs/nightly.yaml --input DIR --output OUT --date YYYY-MM-DD [Beam options]
    clickdp backfill --from YYYY-MM-DD --to YYYY-MM-DD --input 'data/{date}/' --output OUT [run options]
    clickdp ledger show   [--ledger PATH | --output OUT | --spec SPEC] [--job JOB] [--json]
    clickdp ledger verify [--ledger PATH | --output OUT | --spec SPEC] [--job JOB] [--json]
    clickdp ledger abort  --run-id RUN [--ledger PATH | --output OUT | --spec SPEC]
    clickdp generate --users N --events M --date YYYY-MM-DD --out DIR [--bad-rows-fraction F]
    clickdp postprocess --release OUT --date YYYY-MM-DD [--job JOB] [--catalog products.csv]
    clickdp demo [--dir ./demo]

Exit codes: 0 ok, 1 failure, 2 bad spec or arguments, 3 bad input, 4 refused by the ledger.
"""
from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import shutil
import sys
from typing import Optional


def _quiet_logging() -> None:
    # Beam's GCP module logs a warning at import when the gcp extra is absent; keep the console clean.
    logging.basicConfig(level=logging.ERROR, format="%(message)s", force=True)
    logging.getLogger("clickdp").setLevel(logging.INFO)


def _demo(argv: list) -> int:
    parser = argparse.ArgumentParser(prog="clickdp demo",
                                     description="Generate a sample day and release it on the local runner.")
    parser.add_argument("--dir", default="demo", help="working directory (default ./demo; recreated)")
    parser.add_argument("--users", type=int, default=50_000)
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--date", default=(datetime.date.today() - datetime.timedelta(days=1)).isoformat())
    parser.add_argument("--bad-rows-fraction", type=float, default=0.002)
    args = parser.parse_args(argv)
    from transforms import generator
    if os.path.isdir(args.dir):
        shutil.rmtree(args.dir)
    date = datetime.date.fromisoformat(args.date)
    print(f"generating {args.events:,} events of {args.users:,} shoppers for {date} into {args.dir}/data ...")
    info = generator.generate(os.path.join(args.dir, "data"), n_users=args.users, n_events=args.events,
                              date=date, bad_rows_fraction=args.bad_rows_fraction)
    out = os.path.join(args.dir, "out")
    from pipelines import nightly
    spec = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "demo.yaml")
    result = nightly.run(["--spec", spec, "--input", os.path.join(args.dir, "data", "events"), "--output", out,
                          "--date", date.isoformat(), "--catalog", info["catalog"]["products"]])
    if result.exit_code == 0:
        print()
        print("demo outputs:")
        for f in result.summary["files"]:
            print(f"  {f['path']}  ({f['rows']} rows)")
        post = result.summary.get("postprocess", {})
        if "error" in post:
            print(f"  post-processing failed: {post['error']}")
        else:
            for p in post.get("neighbours", []) + post.get("features", []):
                print(f"  {p}")
            print(f"  text corpus:         {post.get('corpus')}  ({post.get('corpus_records')} records)")
            print(f"  utility report:      {post.get('report')}")
        print(f"  manifest:            {result.manifest_path}")
        print(f"  operator summary:    {result.summary_path}")
        print(f"  dead letters:        {result.summary['dead_letters']}")
        print(f"  generated input:     {len(info['event_files'])} file(s) under {args.dir}/data/events")
        print("open them with pandas: pandas.read_parquet('%s')" % result.summary["files"][0]["path"])
    return result.exit_code


# --------------------------------------------------------------------------------------
# backfill
# --------------------------------------------------------------------------------------


def _backfill(argv: list) -> int:
    """Runs dates D1..D2 in order, each charged to the ledger; stops at the first
    non-zero exit (a ledger refusal is 4). `{date}` in any argument is replaced by the date."""
    from pipelines import nightly
    parser = argparse.ArgumentParser(
        prog="clickdp backfill", description=_backfill.__doc__,
        epilog="Every other option is passed to `clickdp run` (e.g. --input 'data/{date}/' --output OUT "
               "--skip-if-released).")
    parser.add_argument("--from", dest="start", required=True, type=nightly._parse_date, help="first date")
    parser.add_argument("--to", dest="end", required=True, type=nightly._parse_date, help="last date (inclusive)")
    try:
        args, rest = parser.parse_known_args(argv)
    except SystemExit as exc:
        return 0 if exc.code == 0 else 2
    if "--date" in rest or any(a.startswith("--date=") for a in rest):
        return _usage_error("backfill: --date is set per day from --from/--to; do not pass it")
    if args.start > args.end:
        return _usage_error(f"backfill: --from {args.start} is after --to {args.end}")
    today = nightly.utc_today()
    if args.end > today:
        return _usage_error(f"backfill: --to {args.end} is in the future (today is {today} UTC); "
                            "a day can only be released once it has happened")
    days = (args.end - args.start).days + 1
    done = []
    for i in range(days):
        day = (args.start + datetime.timedelta(days=i)).isoformat()
        nightly.log_event("backfill_progress", date=day, index=i + 1, of=days)
        result = nightly.run([a.replace("{date}", day) for a in rest] + ["--date", day])
        if result.exit_code != 0:
            print(f"clickdp backfill: stopped at {day} (exit {result.exit_code}) after {len(done)} of {days} "
                  f"date(s): {result.message}", file=sys.stderr)
            return result.exit_code
        done.append(day)
    print(f"clickdp backfill: {len(done)} date(s) {args.start}..{args.end} done")
    return 0


def _usage_error(message: str) -> int:
    print(f"clickdp: {message}", file=sys.stderr)
    return 2


# --------------------------------------------------------------------------------------
# ledger
# --------------------------------------------------------------------------------------


def _ledger_parser(prog: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog)
    where = parser.add_argument_group("which ledger (first given wins)")
    where.add_argument("--ledger", help="the ledger file")
    where.add_argument("--spec", help="a job spec: its ledger.path")
    where.add_argument("--output", help="a release root: <output>_quarantine/_ledger/ledger.sqlite")
    where.add_argument("--quarantine", help="with --output: the quarantine location, if not the default")
    parser.add_argument("--job", help="only this job")
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    return parser


def _open_ledger(args):
    from pipelines import nightly
    from transforms import ledger as ledger_lib
    from transforms.spec import load_spec
    path = args.ledger
    if not path and args.spec:
        spec = load_spec(args.spec)
        path = spec.ledger.path
        if not path and args.output:
            path = nightly.ledger_path_for(spec, None, args.quarantine or nightly._default_quarantine(args.output))
    if not path and args.output:
        path = ledger_lib.default_path(args.quarantine or nightly._default_quarantine(args.output.rstrip("/")))
    if not path:
        raise ValueError("say which ledger: --ledger PATH, --spec SPEC (with ledger.path) or --output OUT")
    return ledger_lib.Ledger(path, create=False)


def _ledger(argv: list) -> int:
    from transforms import ledger as ledger_lib
    from transforms.spec import SpecError
    if not argv or argv[0] not in ("show", "verify", "abort"):
        return _usage_error("usage: clickdp ledger {show,verify,abort} [options]")
    sub, rest = argv[0], argv[1:]
    parser = _ledger_parser(f"clickdp ledger {sub}")
    if sub == "abort":
        parser.add_argument("--run-id", required=True, help="the pending run to abort")
    if sub == "verify":
        parser.add_argument("--extra-output", action="append", default=[], metavar="OUT",
                            help="also check the manifests under this release root")
    try:
        args = parser.parse_args(rest)
    except SystemExit as exc:
        return 0 if exc.code == 0 else 2
    try:
        led = _open_ledger(args)
    except (ValueError, SpecError) as exc:
        return _usage_error(f"ledger {sub}: {exc}")
    except ledger_lib.LedgerError as exc:
        print(f"clickdp: ledger: {exc}", file=sys.stderr)
        return 1
    with led:
        if sub == "show":
            entries = ledger_lib.show(led, args.job)
            print(json.dumps(entries, indent=2) if args.json else
                  f"ledger {led.path}\n" + (ledger_lib.format_show(entries) or "no releases"))
            return 0
        if sub == "abort":
            return _ledger_abort(led, args.run_id)
        problems, checked = verify_ledger(led, args.job, extra_roots=args.extra_output)
        if args.json:
            print(json.dumps({"ledger": led.path, "checked": checked, "problems": problems}, indent=2))
        else:
            print(f"ledger {led.path}: {checked['released']} released entries, {checked['manifests']} manifests, "
                  f"{checked['files']} files checked")
            for p in problems:
                print(f"  PROBLEM {p['kind']}: {p['detail']}")
            print("ok: ledger and manifests agree" if not problems else f"{len(problems)} problem(s)")
        return 0 if not problems else 1


def _ledger_abort(led, run_id: str) -> int:
    from transforms import ledger as ledger_lib
    row = led.row(run_id)
    if row is None:
        return _usage_error(f"ledger abort: no run {run_id} in {led.path}")
    if row["status"] != "pending":
        print(f"clickdp: run {run_id} is {row['status']}; nothing to do")
        return 0
    if ledger_lib.manifest_run_id(row["manifest_path"]) == run_id:
        with led.transaction():
            led.settle(run_id, published=True, note="its manifest exists: it was published")
        print(f"clickdp: run {run_id} was published (its manifest exists): marked released, not aborted")
        return 4
    if ledger_lib.process_alive(row["pid"], row["hostname"], row["proc_start"]):
        print(f"clickdp: run {run_id} is still running (pid {row['pid']}); refusing to abort it", file=sys.stderr)
        return 4
    led.abort(run_id, "aborted by an operator (clickdp ledger abort)")
    print(f"clickdp: run {run_id} aborted; its budget is no longer charged")
    return 0


def verify_ledger(led, job: Optional[str] = None, extra_roots=()) -> tuple:
    """Ledger vs manifests. Every released (not superseded) entry has its manifest, the
    manifest names the same run and every file's checksum matches; every manifest under
    the release roots the ledger knows has a released entry. Returns (problems, counts)."""
    from apache_beam.io.filesystems import FileSystems

    from pipelines import nightly
    problems, counts = [], {"released": 0, "manifests": 0, "files": 0}
    rows = led.rows(job)
    by_run = {r["run_id"]: r for r in rows}
    for r in rows:
        if r["status"] == "pending":
            published = _read_manifest(r["manifest_path"])
            if published is not None and published.get("run_id") == r["run_id"]:
                problems.append({"kind": "pending_but_published", "run_id": r["run_id"],
                                 "detail": f"{r['job']} {r['date']} run {r['run_id']} is pending but its manifest "
                                           "exists (settled at the next run's start)"})
            continue
        if r["status"] != "released" or r["superseded_by"]:
            continue
        counts["released"] += 1
        where = f"{r['job']} {r['date']} (run {r['run_id']})"
        manifest = _read_manifest(r["manifest_path"])
        if manifest is None:
            problems.append({"kind": "missing_manifest", "run_id": r["run_id"],
                             "detail": f"{where} is released in the ledger but its manifest "
                                       f"{r['manifest_path']} is missing or unreadable"})
            continue
        if manifest.get("run_id") != r["run_id"]:
            problems.append({"kind": "manifest_of_other_run", "run_id": r["run_id"],
                             "detail": f"{where}: manifest {r['manifest_path']} names run {manifest.get('run_id')}"})
            continue
        if manifest.get("spec_hash") != r["spec_hash"]:
            problems.append({"kind": "spec_hash_mismatch", "run_id": r["run_id"],
                             "detail": f"{where}: manifest spec hash {manifest.get('spec_hash')} != ledger "
                                       f"{r['spec_hash']}"})
        for f in manifest.get("files", []):
            counts["files"] += 1
            try:
                digest = nightly.sha256_file(f["path"])
            except Exception:  # noqa: BLE001
                problems.append({"kind": "missing_file", "run_id": r["run_id"],
                                 "detail": f"{where}: file {f['path']} is missing"})
                continue
            if digest != f["sha256"]:
                problems.append({"kind": "checksum_mismatch", "run_id": r["run_id"],
                                 "detail": f"{where}: file {f['path']} has sha256 {digest[:12]}..., the manifest "
                                           f"says {f['sha256'][:12]}..."})
    roots = {r["output_root"] for r in rows if r["output_root"]} | set(extra_roots)
    for root in sorted(roots):
        pattern = FileSystems.join(root, "_manifests", job or "*", "dt=*.json")
        try:
            found = FileSystems.match([pattern])[0].metadata_list
        except Exception:  # noqa: BLE001 - no manifests there
            found = []
        for m in sorted(found, key=lambda m: m.path):
            counts["manifests"] += 1
            manifest = _read_manifest(m.path)
            run_id = (manifest or {}).get("run_id")
            row = by_run.get(run_id) if run_id else None
            if row is None and run_id:
                row = led.row(run_id)
            if row is None or row["status"] != "released":
                state = "no entry" if row is None else f"status {row['status']}"
                problems.append({"kind": "manifest_without_release", "run_id": run_id,
                                 "detail": f"manifest {m.path} (run {run_id}) has no released ledger entry "
                                           f"({state})"})
    return problems, counts


def _read_manifest(path: Optional[str]) -> Optional[dict]:
    if not path:
        return None
    from apache_beam.io.filesystems import FileSystems
    try:
        with FileSystems.open(path) as fh:
            return json.loads(fh.read().decode("utf-8"))
    except Exception:  # noqa: BLE001
        return None


def main(argv: Optional[list] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    _quiet_logging()
    usage = ("usage: clickdp {run,backfill,ledger,generate,postprocess,demo} [options]  "
             "(clickdp COMMAND --help for details)")
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__.strip() if argv else usage)
        return 0 if argv else 2
    cmd, rest = argv[0], argv[1:]
    if cmd == "run":
        # The run's accounting (dp_accounting, SciPy) is computed in a helper process
        # while this one imports Beam; see pipelines/prefetch.py.
        from pipelines import prefetch
        ahead = prefetch.start(rest)
        from pipelines import nightly
        return nightly.run(rest, prefetch=ahead).exit_code
    if cmd == "backfill":
        return _backfill(rest)
    if cmd == "ledger":
        return _ledger(rest)
    if cmd == "generate":
        from transforms import generator
        parser = argparse.ArgumentParser(prog="clickdp generate", description="Synthetic clickstream generator")
        generator.add_cli_arguments(parser)
        return generator.main(parser.parse_args(rest))
    if cmd == "demo":
        return _demo(rest)
    if cmd == "postprocess":
        from pipelines import postprocess
        return postprocess.main(rest)
    print(f"clickdp: unknown command {cmd!r}\n{usage}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
