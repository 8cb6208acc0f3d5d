"""Utility report of one run: Markdown + HTML with PNG plots (matplotlib, Agg backend).

    render_report(release_root, date, job, out_dir, operator_summary=None) -> path of the HTML report

Reads the released tables through ``load_release`` (``ReleasedTable`` only, sha256 checked against the
manifest) and the published manifest; ``build_report`` accepts only ``ReleasedTable`` values. Per output:
partitions released, noise std per metric (and its 95% half width), the relative error expected from the
mechanism (noise std / |noisy value|, since true values are private) binned by partition size (the noisy
value of the output's distinct-shopper count, else its first count), and the budget split per output and
mechanism (table and bar chart).

With an operator summary (the run's ``<out>_quarantine/_runs/...json``, raw counts that are NOT differentially
private) the report gains an operator-only section (partitions considered vs released, rows read / kept) and
is written as ``utility_report.OPERATOR_ONLY.{html,md}`` with a banner; it is refused inside the release
root. Without one, the report holds only functions of DP releases and may be shared with the release.
"""
from __future__ import annotations

import argparse
import html
import json
import math
import os
import sys
from typing import Mapping, Optional, Union

import numpy as np

from transforms.released import (
    COUNT_LIKE,
    ReleasedTable,
    add_release_arguments,
    half_width_95,
    load_release,
    read_manifest,
    require_released,
)

OPERATOR_BANNER = ("OPERATOR-ONLY: this report contains counts from the operator summary that are NOT "
                   "differentially private (partitions considered, rows read and kept). Never publish it "
                   "or hand it to the LLM team.")
REL_ERR_CAP = 10.0  # relative errors above 1,000% (noisy value ~ 0) are shown at the cap


def _fmt(x, digits: int = 3) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "–"
    if isinstance(x, (int, np.integer)):
        return f"{int(x):,}"
    if x == 0:
        return "0"
    if abs(x) >= 1000:
        return f"{x:,.0f}"
    return f"{x:.{digits}g}"


def _pct(x: float) -> str:
    if not math.isfinite(x):
        return "–"
    if x >= REL_ERR_CAP:
        return f"≥{REL_ERR_CAP * 100:,.0f}%"
    return f"{100 * x:.1f}%" if x < 1 else f"{100 * x:,.0f}%"


def size_metric(rt: ReleasedTable) -> str:
    """The metric used as partition size: an unfiltered distinct-shopper count if released, else the count
    (or distinct count) with the largest median noisy value, else the first metric."""
    infos = {m: rt.metric_info(m) for m in rt.metrics}
    for m, info in infos.items():
        if info.get("type") == "privacy_id_count" and not info.get("filter"):
            return m
    counts = [m for m, info in infos.items() if info.get("type") in COUNT_LIKE]
    if counts and rt.num_rows:
        return max(counts, key=lambda m: (float(np.median(rt.values(m))), -counts.index(m)))
    return counts[0] if counts else rt.metrics[0]


def relative_errors(rt: ReleasedTable, metric: str) -> np.ndarray:
    """noise std / |noisy value| per partition, capped at REL_ERR_CAP."""
    v = np.abs(rt.values(metric))
    with np.errstate(divide="ignore", invalid="ignore"):
        rel = np.where(v > 0, rt.stds(metric) / v, np.inf)
    return np.minimum(rel, REL_ERR_CAP)


def size_bins(sizes: np.ndarray) -> tuple:
    """(bin index per partition, labels) by decade of the noisy size: <10, 10–100, 100–1k, ..."""
    decade = np.floor(np.log10(np.maximum(sizes, 1.0))).astype(int)
    decade = np.maximum(decade, 0)
    labels = {}
    for d in sorted(set(decade.tolist())):
        labels[d] = "<10" if d == 0 else f"{_short(10 ** d)}–{_short(10 ** (d + 1))}"
    return decade, labels


def _short(n: int) -> str:
    for div, suffix in ((10 ** 9, "G"), (10 ** 6, "M"), (10 ** 3, "k")):
        if n >= div:
            return f"{n // div}{suffix}"
    return str(n)


# --- plots ------------------------------------------------------------------------------------------
def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def plot_budget(mechanisms: list, out_path: str, title: str) -> str:
    plt = _pyplot()
    labels = [f"{m['output']} · {m.get('metric') or 'partition selection'} ({m['component']})" for m in mechanisms]
    eps = [m["epsilon"] for m in mechanisms]
    outputs = sorted({m["output"] for m in mechanisms})
    colors = {o: plt.cm.tab10(i % 10) for i, o in enumerate(outputs)}
    fig, ax = plt.subplots(figsize=(10, 0.45 * len(mechanisms) + 1.6))
    y = np.arange(len(mechanisms))[::-1]
    ax.barh(y, eps, color=[colors[m["output"]] for m in mechanisms])
    ax.set_yticks(y, labels, fontsize=9)
    for yi, m in zip(y, mechanisms):
        note = f" ε={m['epsilon']:.3g}" + (f", δ={m['delta']:.2g}" if m.get("delta") else "")
        ax.text(m["epsilon"], yi, note, va="center", fontsize=8)
    ax.set_xlim(0, max(eps) * 1.35 if eps else 1)
    ax.set_xlabel("epsilon")
    ax.set_title(title, fontsize=11)
    handles = [plt.Rectangle((0, 0), 1, 1, color=colors[o]) for o in outputs]
    ax.legend(handles, outputs, loc="lower right", fontsize=9)
    fig.tight_layout()
    fig.savefig(out_path, dpi=110)
    plt.close(fig)
    return out_path


def plot_relative_errors(rt: ReleasedTable, out_path: str) -> str:
    plt = _pyplot()
    from matplotlib.ticker import NullLocator
    size = size_metric(rt)
    bins, labels = size_bins(rt.values(size))
    order = sorted(labels)
    n = len(rt.metrics)
    ncols = min(3, n)
    nrows = math.ceil(n / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.2 * ncols, 3.3 * nrows + 0.8), squeeze=False)
    for ax, metric in zip(axes.flat, rt.metrics):
        rel = relative_errors(rt, metric)
        data = [rel[bins == d] for d in order]
        ax.boxplot([d if len(d) else [np.nan] for d in data], showfliers=True, whis=(5, 95),
                   flierprops={"markersize": 2})
        ax.set_xticks(range(1, len(order) + 1), [f"{labels[d]}\n(n={int((bins == d).sum())})" for d in order],
                      fontsize=8)
        ax.set_yscale("log")
        finite = rel[np.isfinite(rel) & (rel > 0)]
        bottom = 10.0 ** math.floor(math.log10(max(finite.min(), 1e-4))) if len(finite) else 0.01
        ax.set_ylim(bottom, REL_ERR_CAP * 1.5)
        ticks = [10.0 ** k for k in range(int(round(math.log10(bottom))), int(math.log10(REL_ERR_CAP)) + 1)]
        ax.set_yticks(ticks, [f"{100 * t:g}%" for t in ticks])
        ax.yaxis.set_minor_locator(NullLocator())
        ax.axhline(1.0, color="crimson", lw=0.8, ls="--")
        ax.axhline(0.1, color="grey", lw=0.6, ls=":")
        ax.set_title(f"{metric} ({rt.metric_info(metric).get('type')})", fontsize=10)
        ax.set_ylabel("noise std / |noisy value|", fontsize=8)
        ax.tick_params(axis="y", labelsize=8)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    fig.suptitle(f"{rt.output} {rt.date}: expected relative error by partition size (noisy {size})\n"
                 f"boxes: quartiles, whiskers: 5-95%; red line: error = value, grey: 10%; "
                 f"{_pct(REL_ERR_CAP)} = noisy value about 0", fontsize=10)
    fig.subplots_adjust(left=0.07, right=0.98, bottom=0.7 / fig.get_figheight(), top=1 - 1.05 / fig.get_figheight(),
                        wspace=0.3, hspace=0.5)
    fig.savefig(out_path, dpi=100)
    plt.close(fig)
    return out_path


# --- report blocks ----------------------------------------------------------------------------------
def _mechanisms(released: Mapping[str, ReleasedTable]) -> list:
    out = []
    for name in sorted(released):
        for m in released[name].dp.get("mechanisms", []):
            out.append({"output": m.get("output", name), "component": m.get("component"),
                        "metric": m.get("metric"), "epsilon": float(m.get("epsilon") or 0.0),
                        "delta": float(m.get("delta") or 0.0), "noise_std": m.get("noise_std"),
                        "kind": m.get("kind")})
    return out


def _load_operator_summary(operator_summary) -> Optional[dict]:
    if operator_summary is None or isinstance(operator_summary, Mapping):
        return operator_summary
    with open(operator_summary, encoding="utf-8") as fh:
        return json.load(fh)


def build_report(released: Mapping[str, ReleasedTable], out_dir: str, manifest: Optional[dict] = None,
                 operator_summary: Optional[dict] = None) -> list:
    """Writes the PNGs into out_dir and returns the report as blocks (see _to_markdown / _to_html)."""
    released = {k: require_released(v, f"released[{k!r}]") for k, v in released.items()}
    if not released:
        raise ValueError("nothing to report: no released table")
    os.makedirs(out_dir, exist_ok=True)
    any_rt = next(iter(released.values()))
    dp = any_rt.dp
    job, date = dp.get("job"), any_rt.date
    blocks: list = [("h1", f"Utility report: {job} {date}")]
    if operator_summary is not None:
        blocks.append(("warn", OPERATOR_BANNER))
    budget = (manifest or {}).get("budget", {})
    blocks.append(("p", f"Run {dp.get('run_id')}, spec {dp.get('spec_hash')}, {dp.get('noise')} noise, privacy "
                        f"unit {dp.get('privacy_unit')}. Run budget ε={_fmt(budget.get('epsilon'))}, "
                        f"δ={_fmt(budget.get('delta'))}; spent ε={_fmt(budget.get('spent_epsilon'))}, "
                        f"δ={_fmt(budget.get('spent_delta'))}. Every number below is computed from the "
                        "released tables and their DP metadata (true values are private), except in the "
                        "operator-only section."))
    rows = []
    for name, rt in sorted(released.items()):
        rows.append([name, ", ".join(rt.keys), f"{rt.num_rows:,}", _fmt(rt.epsilon), _fmt(rt.delta),
                     ", ".join(rt.metrics)])
    blocks += [("h2", "Outputs"),
               ("table", ["output", "partition keys", "partitions released", "ε", "δ", "metrics"], rows)]

    mechs = _mechanisms(released)
    total_eps = sum(m["epsilon"] for m in mechs)
    blocks.append(("h2", "Budget split"))
    blocks.append(("table", ["output", "mechanism", "metric", "noise", "ε", "δ", "share of ε", "noise std"],
                   [[m["output"], m["component"], m["metric"] or "–", m["kind"] or "–", _fmt(m["epsilon"]),
                     _fmt(m["delta"]), _pct(m["epsilon"] / total_eps) if total_eps else "–",
                     _fmt(m["noise_std"])] for m in mechs]))
    plot_budget(mechs, os.path.join(out_dir, "budget.png"),
                f"{job} {date}: budget split (ε total {total_eps:.3g})")
    blocks.append(("img", "budget.png", "budget split per output and mechanism"))

    for name, rt in sorted(released.items()):
        blocks.append(("h2", f"Output {name}"))
        blocks.append(("p", f"{rt.num_rows:,} partitions released, ({_fmt(rt.epsilon)}, {_fmt(rt.delta)})-DP, "
                            f"file {rt.provenance()['file']}."))
        stat_rows = []
        for metric in rt.metrics:
            std = rt.stds(metric)
            half = half_width_95(std, rt.noise)
            rel = relative_errors(rt, metric)
            mtype = rt.metric_info(metric).get("type")
            std_text = _fmt(float(std[0])) if len(std) and np.ptp(std) == 0 else \
                (f"{_fmt(float(np.median(std)))} (median; {_fmt(float(std.min()))}–{_fmt(float(std.max()))})"
                 if len(std) else "–")
            stat_rows.append([metric, mtype, std_text, _fmt(float(np.median(half))) if len(half) else "–",
                              _fmt(float(np.median(np.abs(rt.values(metric))))) if len(std) else "–",
                              _pct(float(np.median(rel))) if len(rel) else "–",
                              _pct(float(np.mean(rel < 0.1))) if len(rel) else "–"])
        blocks.append(("h3", "Noise per metric"))
        blocks.append(("table", ["metric", "type", "noise std", "95% ± (median)", "median |noisy value|",
                                 "median relative error", "partitions with error < 10%"], stat_rows))
        if rt.num_rows:
            size = size_metric(rt)
            bins, labels = size_bins(rt.values(size))
            rows = []
            for d in sorted(labels):
                sel = bins == d
                rows.append([labels[d], f"{int(sel.sum()):,}"] +
                            [_pct(float(np.median(relative_errors(rt, m)[sel]))) for m in rt.metrics])
            blocks.append(("h3", f"Relative error by partition size (noisy {size})"))
            blocks.append(("p", "Median of noise std / |noisy value| per bin; the mechanism's noise is known, "
                                "the true values are not, so this is the error one should expect, not a "
                                "measured one. Values near 0 show as large errors (capped at "
                                f"{_pct(REL_ERR_CAP)})."))
            blocks.append(("table", [f"noisy {size}", "partitions"] + list(rt.metrics), rows))
            png = f"relerr_{name}.png"
            plot_relative_errors(rt, os.path.join(out_dir, png))
            blocks.append(("img", png, f"relative error by partition size for {name}"))
        else:
            blocks.append(("p", "No partition was released: nothing to plot."))

    if operator_summary is not None:
        blocks += _operator_blocks(operator_summary, released)
    return blocks


def _operator_blocks(summary: dict, released: Mapping[str, ReleasedTable]) -> list:
    blocks = [("h2", "Operator-only: partitions considered vs released (NOT DP, never publish)"),
              ("warn", OPERATOR_BANNER)]
    rows = []
    for name, o in sorted((summary.get("outputs") or {}).items()):
        considered, rel = o.get("partitions_considered"), o.get("partitions_released")
        if rel is None and name in released:
            rel = released[name].num_rows
        share = _pct(rel / considered) if considered and rel is not None else "–"
        rows.append([name, _fmt(considered), _fmt(rel), share, _fmt(o.get("rows_eligible")),
                     _fmt(o.get("rows_kept"))])
    blocks.append(("table", ["output", "partitions considered", "partitions released", "released share",
                             "rows eligible", "rows kept after bounding"], rows))
    r = summary.get("rows") or {}
    if r:
        dead = r.get("dead_by_reason") or {}
        blocks.append(("p", f"Rows read {_fmt(r.get('read'))}, valid {_fmt(r.get('valid'))}, dead-lettered "
                            f"{_fmt(r.get('dead_lettered'))}" +
                            (" (" + ", ".join(f"{k}: {_fmt(v)}" for k, v in sorted(dead.items())) + ")"
                             if dead else "") + "."))
    return blocks


# --- renderers --------------------------------------------------------------------------------------
def _md_cell(c) -> str:
    return str(c).replace("|", "\\|")


def _to_markdown(blocks: list) -> str:
    out = []
    for b in blocks:
        kind = b[0]
        if kind in ("h1", "h2", "h3"):
            out.append("#" * int(kind[1]) + " " + b[1])
        elif kind == "p":
            out.append(b[1])
        elif kind == "warn":
            out.append(f"> **{b[1]}**")
        elif kind == "img":
            out.append(f"![{b[2]}]({b[1]})")
        elif kind == "table":
            headers, rows = b[1], b[2]
            out.append("| " + " | ".join(_md_cell(h) for h in headers) + " |")
            out.append("|" + "---|" * len(headers))
            out += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in rows]
        out.append("")
    return "\n".join(out)


_CSS = ("body{font-family:sans-serif;max-width:1100px;margin:2em auto;color:#222}"
        "table{border-collapse:collapse;margin:.5em 0 1em}td,th{border:1px solid #ccc;padding:3px 8px;"
        "font-size:13px;text-align:left}th{background:#f2f2f2}img{max-width:100%;border:1px solid #ddd}"
        ".warn{background:#fde2e1;border:2px solid #c0392b;padding:.6em;font-weight:bold}")


def _to_html(blocks: list, title: str) -> str:
    e = html.escape
    out = [f"<!doctype html><html><head><meta charset='utf-8'><title>{e(title)}</title>"
           f"<style>{_CSS}</style></head><body>"]
    for b in blocks:
        kind = b[0]
        if kind in ("h1", "h2", "h3"):
            out.append(f"<{kind}>{e(b[1])}</{kind}>")
        elif kind == "p":
            out.append(f"<p>{e(b[1])}</p>")
        elif kind == "warn":
            out.append(f"<p class='warn'>{e(b[1])}</p>")
        elif kind == "img":
            out.append(f"<p><img src='{e(b[1])}' alt='{e(b[2])}'></p>")
        elif kind == "table":
            out.append("<table><tr>" + "".join(f"<th>{e(str(h))}</th>" for h in b[1]) + "</tr>")
            out += ["<tr>" + "".join(f"<td>{e(str(c))}</td>" for c in row) + "</tr>" for row in b[2]]
            out.append("</table>")
    out.append("</body></html>")
    return "\n".join(out)


def _inside(path: str, root: str) -> bool:
    path, root = os.path.realpath(path), os.path.realpath(root)
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def render_report(release_root: str, date: str, job: str, out_dir: str,
                  operator_summary: Union[str, Mapping, None] = None) -> str:
    """Writes the report (HTML + Markdown + PNGs) into out_dir; returns the HTML path."""
    summary = _load_operator_summary(operator_summary)
    if summary is not None and _inside(out_dir, release_root):
        raise ValueError(f"out_dir {out_dir} is inside the release root {release_root}: a report with the "
                         "operator summary (not DP) must never be written next to released data")
    released = load_release(release_root, date, job)
    manifest = read_manifest(release_root, date, job)
    if summary is not None:
        for field in ("job", "date", "run_id"):
            if summary.get(field) is not None and summary.get(field) != manifest.get(field):
                raise ValueError(f"operator summary is for {field} {summary.get(field)!r}, the release for "
                                 f"{manifest.get(field)!r}")
    blocks = build_report(released, out_dir, manifest, summary)
    base = "utility_report.OPERATOR_ONLY" if summary is not None else "utility_report"
    title = f"Utility report {job} {date}"
    with open(os.path.join(out_dir, base + ".md"), "w", encoding="utf-8") as fh:
        fh.write(_to_markdown(blocks))
    path = os.path.join(out_dir, base + ".html")
    with open(path, "w", encoding="utf-8") as fh:
        fh.write(_to_html(blocks, title))
    return path


def main(argv: Optional[list] = None) -> int:
    parser = argparse.ArgumentParser(prog="clickdp report", description="Utility report of one released run.")
    add_release_arguments(parser)
    parser.add_argument("--out", required=True, help="directory for the report and its PNGs")
    parser.add_argument("--operator-summary", help="operator summary JSON (adds an operator-only section)")
    args = parser.parse_args(argv)
    try:
        path = render_report(args.release, args.date, args.job, args.out, args.operator_summary)
    except (OSError, ValueError) as e:
        print(f"clickdp report: {e}", file=sys.stderr)
        return 1
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
