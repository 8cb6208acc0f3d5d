"""`clickdp`: the command-line front door.

    clickdp run --spec configs/nightly.yaml --input DIR --output OUT --date YYYY-MM-DD [Beam options]
    clickdp generate --users N --events M --date YYYY-MM-DD --out DIR [--bad-rows-fraction F]
    clickdp demo [--dir ./demo]
"""
from __future__ import annotations

import argparse
import datetime
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
    result = nightly.run(["--input", os.path.join(args.dir, "data", "events"), "--output", out,
                          "--date", date.isoformat()])
    if result.exit_code == 0:
        print()
        print("demo outputs:")
        for f in result.summary["files"]:
            print(f"  {f['path']}  ({f['rows']} rows)")
        print(f"  manifest:            {result.manifest_path}")
        print(f"  operator summary:    {result.summary_path}")
        print(f"  dead letters:        {result.summary['dead_letters']}")
        print(f"  generated input:     {len(info['event_files'])} file(s) under {args.dir}/data/events")
        print("open them with pandas: pandas.read_parquet('%s')" % result.summary["files"][0]["path"])
    return result.exit_code


def main(argv: Optional[list] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    _quiet_logging()
    usage = "usage: clickdp {run,generate,demo} [options]  (clickdp COMMAND --help for details)"
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__.strip() if argv else usage)
        return 0 if argv else 2
    cmd, rest = argv[0], argv[1:]
    if cmd == "run":
        from pipelines import nightly
        return nightly.run(rest).exit_code
    if cmd == "generate":
        from transforms import generator
        parser = argparse.ArgumentParser(prog="clickdp generate", description="Synthetic clickstream generator")
        generator.add_cli_arguments(parser)
        return generator.main(parser.parse_args(rest))
    if cmd == "demo":
        return _demo(rest)
    print(f"clickdp: unknown command {cmd!r}\n{usage}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
