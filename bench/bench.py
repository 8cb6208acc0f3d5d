"""Benchmark: the nightly job vs pipeline-dp on Beam vs DuckDB SQL, on the same machine.

    python bench/bench.py --events 10000000 --users 1000000 --products 100000 --runs 3
    make bench          # bench-10m
    make bench-small    # bench-1m

Generates (and caches under bench-data/) the data set with the project's generator,
runs the default nightly spec on the local runner `--runs` times in fresh processes
(wall time, peak RSS of the process, time per stage from the operator summary),
then times (a) pipeline-dp's DPEngine on its BeamBackend doing COUNT + SUM per
product with the same bounds on a 200k-event sample, (b) DuckDB SQL doing the same
bounding and aggregation (both outputs of the nightly spec, every metric) on the full data, (c) the secure noise sampler, and prints
ratios. Figures go to bench-data/results-<name>.json.
"""
from __future__ import annotations

import argparse
import datetime
import glob
import json
import os
import shutil
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
DATE = datetime.date(2026, 12, 2)


def _dataset(name: str, users: int, events: int, products: int) -> str:
    base = os.path.join(ROOT, "bench-data", name)
    marker = os.path.join(base, "_done.json")
    if os.path.exists(marker):
        return base
    shutil.rmtree(base, ignore_errors=True)
    from transforms import generator
    print(f"[bench] generating {name}: {events:,} events, {users:,} users, {products:,} products ...", flush=True)
    t0 = time.time()
    info = generator.generate(base, n_users=users, n_events=events, date=DATE, seed=20261202,
                              n_products=products)
    with open(marker, "w") as fh:
        json.dump({"seconds": time.time() - t0, "rows": info["rows"]}, fh)
    return base


def _run_nightly(data: str, workdir: str) -> dict:
    out = os.path.join(workdir, "out")
    shutil.rmtree(workdir, ignore_errors=True)
    # The DP release itself; post-processing (corpus, report) is timed separately below.
    cmd = [sys.executable, "-m", "pipelines.cli", "run", "--input", os.path.join(data, "events"),
           "--output", out, "--date", DATE.isoformat(), "--no-postprocess"]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    stdout, stderr = proc.stdout.read(), proc.stderr.read()
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"nightly run failed:\n{stdout}\n{stderr}")
    summaries = glob.glob(os.path.join(workdir, "out_quarantine", "_runs", "*", "*", "*.json"))
    summary = json.load(open(summaries[0])) if summaries else {}
    t1 = time.perf_counter()
    post = subprocess.run([sys.executable, "-m", "pipelines.cli", "postprocess", "--release", out,
                           "--date", DATE.isoformat()], cwd=ROOT, capture_output=True, text=True)
    post_s = time.perf_counter() - t1 if post.returncode == 0 else None
    return {"wall_s": wall, "postprocess_wall_s": post_s,
            "cpu_s": usage.ru_utime + usage.ru_stime, "peak_rss_mb": usage.ru_maxrss / 1024,
            "pipeline_s": summary.get("seconds", {}).get("pipeline"),
            "stages_s": summary.get("stage_seconds", {}), "rows": summary.get("rows", {}).get("read")}


def _pipeline_dp_beam(data: str, sample: int) -> dict:
    """pipeline-dp DPEngine on BeamBackend (FnApiRunner): COUNT + SUM per product, same bounds."""
    import apache_beam as beam
    import pipeline_dp
    import pyarrow.parquet as pq
    from apache_beam.runners.portability.fn_api_runner import FnApiRunner

    from transforms.spec import load_spec
    product = load_spec(os.path.join(ROOT, "configs", "nightly.yaml")).output("product_day")
    files = sorted(glob.glob(os.path.join(data, "events", "*.parquet")))
    t = pq.read_table(files[0], columns=["user_id", "product_id", "price", "event_type"]).slice(0, sample)
    rows = [r for r in t.to_pylist() if r["product_id"] is not None]
    params = pipeline_dp.AggregateParams(
        noise_kind=pipeline_dp.NoiseKind.LAPLACE, metrics=[pipeline_dp.Metrics.COUNT, pipeline_dp.Metrics.SUM],
        max_partitions_contributed=product.bounds.max_partitions_contributed,
        max_contributions_per_partition=product.bounds.max_contributions_per_partition,
        min_value=0.0, max_value=200.0)
    extractors = pipeline_dp.DataExtractors(privacy_id_extractor=lambda r: r["user_id"],
                                            partition_extractor=lambda r: r["product_id"],
                                            value_extractor=lambda r: r["price"] or 0.0)
    t0 = time.perf_counter()
    with beam.Pipeline(runner=FnApiRunner()) as p:
        acc = pipeline_dp.NaiveBudgetAccountant(total_epsilon=2.0, total_delta=1e-6)
        engine = pipeline_dp.DPEngine(acc, pipeline_dp.BeamBackend())
        col = p | beam.Create(rows)
        res = engine.aggregate(col, params, extractors)
        acc.compute_budgets()
        _ = res | beam.combiners.Count.Globally()
    secs = time.perf_counter() - t0
    return {"events": len(rows), "seconds": secs, "events_per_s": len(rows) / secs}


def _duckdb_bounded(src: str, where: str, key: str, linf: int, l0: int, aggs: str) -> str:
    """SQL: rows per (user, key) capped at linf and keys per user capped at l0, both uniformly
    at random (window row_number over random()), then `aggs` per key over the kept rows."""
    return f"""
    WITH e AS (SELECT *, random() AS rnd FROM {src} WHERE {where}),
    r AS (SELECT *, row_number() OVER (PARTITION BY user_id, {key} ORDER BY rnd) AS rn FROM e),
    k AS (SELECT * FROM r WHERE rn <= {linf}),
    c AS (SELECT user_id, {key}, random() AS rnd2 FROM k GROUP BY user_id, {key}),
    p AS (SELECT user_id, {key}, row_number() OVER (PARTITION BY user_id ORDER BY rnd2) AS pn FROM c)
    SELECT k.{key}, count(DISTINCT k.user_id) AS users, {aggs}
    FROM k JOIN p USING (user_id, {key}) WHERE p.pn <= {l0} GROUP BY k.{key}"""


def _duckdb(data: str) -> dict:
    """DuckDB SQL doing the nightly spec's bounding and aggregation (both outputs, every
    metric, uniform sampling), and the older product-only COUNT + SUM variant."""
    import duckdb
    from transforms.spec import load_spec
    spec = load_spec(os.path.join(ROOT, "configs", "nightly.yaml"))
    product, category = spec.output("product_day"), spec.output("category_day")
    glob_path = os.path.join(data, "events", "*.parquet")
    src = (f"(SELECT user_id, product_id, category, event_type, price, "
           f"price * coalesce(quantity, 1) AS amount FROM read_parquet('{glob_path}'))")
    product_sql = _duckdb_bounded(
        src, "product_id IS NOT NULL AND event_type IN ('product_view', 'add_to_cart', 'purchase')",
        "product_id", product.bounds.max_contributions_per_partition, product.bounds.max_partitions_contributed,
        """count(*) FILTER (WHERE event_type = 'product_view') AS views,
           count(*) FILTER (WHERE event_type = 'add_to_cart') AS add_to_carts,
           count(*) FILTER (WHERE event_type = 'purchase') AS purchases,
           count(DISTINCT k.user_id) FILTER (WHERE event_type = 'purchase') AS distinct_buyers,
           sum(least(greatest(amount, 0), 200)) FILTER (WHERE event_type = 'purchase') AS revenue,
           count(price) FILTER (WHERE event_type = 'product_view') AS price_n,
           sum(least(greatest(price, 0), 300) - 150) FILTER (WHERE event_type = 'product_view') AS price_nsum""")
    category_sql = _duckdb_bounded(
        src, "category IS NOT NULL AND event_type IN ('product_view', 'add_to_cart', 'remove_from_cart', "
             "'purchase')",
        "category", category.bounds.max_contributions_per_partition, category.bounds.max_partitions_contributed,
        """count(*) AS events,
           sum(least(greatest(amount, 0), 200)) FILTER (WHERE event_type = 'purchase') AS revenue""")
    linf, l0 = product.bounds.max_contributions_per_partition, product.bounds.max_partitions_contributed
    product_only_sql = f"""
    WITH e AS (
      SELECT user_id, product_id, least(greatest(coalesce(price, 0), 0), 200) AS v, random() AS rnd
      FROM read_parquet('{glob_path}')
      WHERE product_id IS NOT NULL AND event_type IN ('product_view', 'add_to_cart', 'purchase')),
    r AS (SELECT *, row_number() OVER (PARTITION BY user_id, product_id ORDER BY rnd) AS rn FROM e),
    c AS (SELECT user_id, product_id, count(*) AS n, sum(v) AS s, random() AS rnd2
          FROM r WHERE rn <= {linf} GROUP BY user_id, product_id),
    p AS (SELECT *, row_number() OVER (PARTITION BY user_id ORDER BY rnd2) AS pn FROM c)
    SELECT product_id, sum(n) AS n, sum(s) AS s, count(*) AS users FROM p WHERE pn <= {l0} GROUP BY ALL"""
    con = duckdb.connect()
    t0 = time.perf_counter()
    n_product = len(con.execute(product_sql).fetchall())
    n_category = len(con.execute(category_sql).fetchall())
    full = time.perf_counter() - t0
    t0 = time.perf_counter()
    n = len(con.execute(product_only_sql).fetchall())
    product_only = time.perf_counter() - t0
    t0 = time.perf_counter()
    con.execute(f"SELECT product_id, count(*), sum(price) FROM read_parquet('{glob_path}') GROUP BY ALL").fetchall()
    plain = time.perf_counter() - t0
    return {"seconds": full, "partitions": {"product_day": n_product, "category_day": n_category},
            "product_count_sum_only_seconds": product_only, "product_count_sum_only_partitions": n,
            "plain_groupby_seconds": plain, "duckdb_version": duckdb.__version__,
            "threads": con.execute("SELECT current_setting('threads')").fetchone()[0]}


def _noise_rate() -> dict:
    import numpy as np
    from transforms import noise
    sampler = noise.SecureNoiseSampler()
    out = {}
    for kind in ("laplace", "gaussian"):
        params = noise.calibrate(kind, 1.0, 1e-6 if kind == "gaussian" else 0.0, 1.0, 1.0)
        x = np.zeros(5_000_000)
        t0 = time.perf_counter()
        sampler.add_noise(x, params)
        out[kind] = 5_000_000 / (time.perf_counter() - t0)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--name", default="bench-10m")
    ap.add_argument("--events", type=int, default=10_000_000)
    ap.add_argument("--users", type=int, default=1_000_000)
    ap.add_argument("--products", type=int, default=100_000)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--pipeline-dp-sample", type=int, default=200_000)
    ap.add_argument("--skip-baselines", action="store_true")
    args = ap.parse_args(argv)

    data = _dataset(args.name, args.users, args.events, args.products)
    work = os.path.join(ROOT, "bench-data", f"run-{args.name}")
    runs = []
    for i in range(args.runs):
        r = _run_nightly(data, work)
        runs.append(r)
        print(f"[bench] run {i + 1}/{args.runs}: wall {r['wall_s']:.1f}s (pipeline {r['pipeline_s']}s), "
              f"cpu {r['cpu_s']:.1f}s, peak RSS {r['peak_rss_mb']:.0f} MB", flush=True)
    wall = statistics.median(r["wall_s"] for r in runs)
    result = {"name": args.name, "events": args.events, "users": args.users, "products": args.products,
              "runs": runs, "median_wall_s": wall, "events_per_s": args.events / wall,
              "median_peak_rss_mb": statistics.median(r["peak_rss_mb"] for r in runs),
              "machine": {"cpus": os.cpu_count(), "python": sys.version.split()[0]},
              "date": datetime.datetime.utcnow().isoformat() + "Z"}
    stages = {}
    for r in runs:
        for k, v in (r["stages_s"] or {}).items():
            stages.setdefault(k, []).append(v)
    result["median_stage_s"] = {k: statistics.median(v) for k, v in stages.items()}
    result["noise_values_per_s"] = _noise_rate()
    if not args.skip_baselines:
        print("[bench] pipeline-dp BeamBackend ...", flush=True)
        result["pipeline_dp_beam"] = _pipeline_dp_beam(data, args.pipeline_dp_sample)
        print("[bench] DuckDB ...", flush=True)
        result["duckdb"] = _duckdb(data)
        result["speedup_vs_pipeline_dp"] = result["events_per_s"] / result["pipeline_dp_beam"]["events_per_s"]
        result["speedup_vs_duckdb"] = result["duckdb"]["seconds"] / wall
    path = os.path.join(ROOT, "bench-data", f"results-{args.name}.json")
    with open(path, "w") as fh:
        json.dump(result, fh, indent=2)

    print(f"\n== {args.name}: {args.events:,} events, median of {args.runs} runs ==")
    print(f"clickdp nightly      {wall:7.1f} s wall   {result['events_per_s']:>12,.0f} events/s   "
          f"peak RSS {result['median_peak_rss_mb']:,.0f} MB   (pipeline only: "
          f"{statistics.median(r['pipeline_s'] or 0 for r in runs):.1f} s; post-processing "
          f"{statistics.median(r['postprocess_wall_s'] or 0 for r in runs):.1f} s more)")
    for k, v in sorted(result["median_stage_s"].items(), key=lambda kv: -kv[1]):
        print(f"  stage {k:18s} {v:7.2f} s (summed over worker threads)")
    if not args.skip_baselines:
        pdp, duck = result["pipeline_dp_beam"], result["duckdb"]
        print(f"pipeline-dp on Beam  {pdp['events_per_s']:>12,.0f} events/s ({pdp['events']:,} events in "
              f"{pdp['seconds']:.1f} s)   -> clickdp is {result['speedup_vs_pipeline_dp']:,.0f}x faster")
        print(f"DuckDB SQL bounding  {duck['seconds']:7.1f} s for the nightly spec's two outputs   "
              f"-> clickdp is {result['speedup_vs_duckdb']:.2f}x faster")
        print(f"  (product COUNT+SUM only {duck['product_count_sum_only_seconds']:.1f} s; plain group-by "
              f"{duck['plain_groupby_seconds']:.2f} s; DuckDB {duck['duckdb_version']}, "
              f"{duck['threads']} threads)")
    print(f"secure noise         laplace {result['noise_values_per_s']['laplace']:,.0f}/s, "
          f"gaussian {result['noise_values_per_s']['gaussian']:,.0f}/s")
    print(f"results: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
