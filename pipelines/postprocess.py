"""Post-processing of a published release: neighbours, feature tables, corpus, report.

Everything here reads RELEASED tables only (transforms.released.ReleasedTable, loaded
from the release's manifest with checksums verified) and spends no privacy budget:
post-processing of DP outputs is DP. It runs after a release is published, and can be
re-run at any time for a released date (`clickdp postprocess --release OUT --date D`).

    <out>/<pairs output>_neighbours/dt=D/part-00000.parquet   top-k neighbours per product
    <out>/product_features/dt=D/..., <out>/category_features/dt=D/...
    <out>/corpus/dt=D/corpus.jsonl                              LLM text corpus with provenance
    <out>/_reports/<job>/dt=D/utility_report.html               public utility report (DP only)
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Optional

import pyarrow as pa
import pyarrow.parquet as pq

from transforms import corpus, features, pairs, report
from transforms.released import ReleasedTable, add_release_arguments, load_release


def _write_neighbours(output_root: str, date: str, name: str, released_pairs: ReleasedTable, top_k: int) -> str:
    nb = pairs.top_k_neighbours(released_pairs.table, top_k, count_column="users")
    nb = nb.rename_columns(["product_id", "neighbour", "rank", "count", "count_std"])
    dp = dict(released_pairs.dp)
    dp["postprocessing_of"] = name
    dp["output"] = f"{name}_neighbours"
    dp["metrics"] = [{"name": "count", "type": "privacy_id_count", "column": None, "min": None, "max": None,
                      "filter": f"distinct users who had both products in one session ({name})"}]
    fields = [pa.field("product_id", pa.string(), nullable=False), pa.field("neighbour", pa.string(), nullable=False),
              pa.field("rank", pa.int32(), nullable=False),
              pa.field("count", nb.schema.field("count").type, nullable=False, metadata={b"metric": b"privacy_id_count"}),
              pa.field("count_std", pa.float64(), nullable=False, metadata={b"noise_std_of": b"count"})]
    schema = pa.schema(fields, metadata={b"clickstream_dp.schema": f"released/{name}_neighbours/v1".encode(),
                                         b"clickdp.dp": json.dumps(dp, sort_keys=True).encode()})
    table = pa.Table.from_arrays([nb.column(f.name).cast(f.type) for f in fields], schema=schema)
    path = os.path.join(output_root, f"{name}_neighbours", f"dt={date}", "part-00000.parquet")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = path + ".tmp"
    pq.write_table(table, tmp)
    os.replace(tmp, path)
    return path


def run(output_root: str, date: str, job: str, spec=None, *, catalog: Optional[str] = None) -> dict:
    """Builds every post-processed artifact of one released (job, date); returns their paths."""
    released = load_release(output_root, date, job)
    paths: dict = {"neighbours": [], "features": [], "corpus": None, "report": None}
    tables = dict(released)
    pair_outputs = {o.name: o.options.get("top_k", 10) for o in (spec.outputs if spec else ())
                    if o.kind == "pairs"}
    for name, rt in released.items():
        if name in pair_outputs or (spec is None and set(rt.keys) == {"product_a", "product_b"}):
            path = _write_neighbours(output_root, date, name, rt, pair_outputs.get(name, 10))
            paths["neighbours"].append(path)
            tables[f"{name}_neighbours"] = ReleasedTable.load(path)
            del tables[name]  # the corpus reads pairs through their neighbours table
    paths["features"] = features.build_all(released, output_root)
    cat = corpus.PublicCatalog.load(catalog) if catalog else None
    records = corpus.render_release(tables, cat)
    paths["corpus"] = corpus.write_corpus(records, os.path.join(output_root, "corpus", f"dt={date}",
                                                                 "corpus.jsonl"))
    paths["corpus_records"] = len(records)
    paths["report"] = report.render_report(output_root, date, job,
                                           os.path.join(output_root, "_reports", job, f"dt={date}"))
    return paths


def main(argv: Optional[list] = None) -> int:
    parser = argparse.ArgumentParser(prog="clickdp postprocess",
                                     description="Neighbours, features, corpus and report of a released date.")
    add_release_arguments(parser)
    parser.add_argument("--catalog", help="public catalog CSV (product_id, category) for the corpus")
    args = parser.parse_args(argv)
    try:
        paths = run(args.release, args.date, args.job, catalog=args.catalog)
    except (OSError, ValueError) as exc:
        print(f"clickdp postprocess: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(paths, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
