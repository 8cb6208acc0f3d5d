"""Safe release: kill -9 at several points of a run, then rerun; bad inputs to the release rules.

The crashes are real process deaths: a process runs the nightly job with CLICKDP_TEST_CRASH_AT=<point>,
which calls os._exit(137) there (no cleanup, no finally blocks: as kill -9). To pay Beam's import
once, one helper subprocess imports the pipeline and forks one child per scenario (before any
pipeline has run in it); the children run in parallel and die at their crash points.
"""
import datetime
import json
import os
import shutil
import subprocess
import sys

import pyarrow.parquet as pq
import pytest
import yaml

from pipelines import cli, nightly
from transforms import generator
from transforms.ledger import Ledger

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DAY = datetime.date(2026, 12, 2)
OUTPUTS = ("product_day", "category_day")
FAST = ["--shards", "2", "--buckets", "2"]


def _argv(base, out, *extra, date=DAY):
    return ["--input", str(base / "data" / "events"), "--output", str(out), "--date", date.isoformat(),
            *FAST, *extra]


def _ledger(out):
    return Ledger(str(out) + "_quarantine/_ledger/ledger.sqlite", create=False)


def _manifest(out, date=DAY):
    path = out / "_manifests" / "nightly" / f"dt={date}.json"
    return json.loads(path.read_text()) if path.exists() else None


def _dir_runs(out, date=DAY):
    return {o: nightly._dir_run_id(str(out / o / f"dt={date}")) for o in OUTPUTS}


def _staging_left(out):
    d = out / "_staging"
    return sorted(os.listdir(d)) if d.exists() else []


_CRASHER = """
import json, os, sys
sys.path.insert(0, %r)
from pipelines import nightly
jobs = json.loads(sys.argv[1])
children = {}
for name, (point, argv) in jobs.items():
    pid = os.fork()
    if pid == 0:
        os.environ[nightly.CRASH_ENV] = point
        code = nightly.main(argv)
        os._exit(code)  # reached only if the crash point was not
    children[pid] = name
codes = {}
for _ in children:
    pid, status = os.wait()
    codes[children[pid]] = os.waitstatus_to_exitcode(status)
print(json.dumps(codes))
""" % ROOT


def _crash_all(jobs):
    """{name: (crash point, argv)} -> {name: exit code}, each in its own process."""
    proc = subprocess.run([sys.executable, "-c", _CRASHER, json.dumps(jobs)], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1]), proc.stderr


def _assert_consistent(out):
    """Manifest, released dirs and ledger agree; verify finds nothing; no staging left."""
    manifest = _manifest(out)
    assert manifest is not None
    assert _dir_runs(out) == {o: manifest["run_id"] for o in OUTPUTS}
    with _ledger(out) as led:
        problems, counts = cli.verify_ledger(led)
        assert problems == [], problems
        assert counts["files"] == len(OUTPUTS)
        assert [r["status"] for r in led.rows() if r["run_id"] == manifest["run_id"]] == ["released"]
        assert not [r for r in led.rows() if r["status"] == "pending"]
    assert _staging_left(out) == []
    return manifest


@pytest.fixture(scope="module")
def crashed(tmp_path_factory):
    """Runs every crash scenario (in parallel) and returns {scenario: (base, out, proc result)}."""
    base = tmp_path_factory.mktemp("safe")
    generator.generate(str(base / "data"), n_users=400, n_events=6000, date=DAY, n_files=1)
    # The forced re-release scenario starts from a completed release.
    prior = base / "out_forced"
    assert nightly.run(_argv(base, prior)).exit_code == 0
    scenarios = {point: (point, base / f"out_{point}", ()) for point in nightly.CRASH_POINTS}
    scenarios["forced_mid_publish"] = ("mid_publish", prior, ("--force-rerelease",))
    codes, stderr = _crash_all({name: (point, _argv(base, out, *extra))
                                for name, (point, out, extra) in scenarios.items()})
    return base, {name: (out, codes[name], stderr) for name, (_, out, _) in scenarios.items()}


@pytest.mark.parametrize("point", ["after_reserve", "before_publish", "mid_publish"])
def test_crash_before_commit_publishes_nothing_charges_nothing_and_rerun_completes(crashed, point):
    base, results = crashed
    out, code, stderr = results[point]
    assert code == 137, stderr
    assert _manifest(out) is None  # the commit record was never written
    with _ledger(out) as led:
        (row,) = led.rows()
        assert row["status"] == "pending"  # until someone notices the process is gone
        crashed_run = row["run_id"]
    if point == "before_publish":
        assert _staging_left(out) == [crashed_run]  # a complete, unpublished staging dir
    if point == "mid_publish":  # one output moved, the other not, no manifest
        runs = _dir_runs(out)
        assert runs["product_day"] == crashed_run and runs["category_day"] is None
    res = nightly.run(_argv(base, out))
    assert res.exit_code == 0, res.message
    manifest = _assert_consistent(out)
    assert manifest["run_id"] == res.run_id != crashed_run
    with _ledger(out) as led:
        status = {r["run_id"]: r["status"] for r in led.rows()}
    assert status == {crashed_run: "aborted", res.run_id: "released"}  # the dead run spent nothing


def test_crash_after_commit_keeps_the_release_and_is_reconciled(crashed):
    base, results = crashed
    out, code, stderr = results["after_publish_before_ledger"]
    assert code == 137, stderr
    manifest = _manifest(out)
    assert manifest is not None and _dir_runs(out) == {o: manifest["run_id"] for o in OUTPUTS}
    # A scheduler retry with --skip-if-released settles the ledger and succeeds without a second release.
    res = nightly.run(_argv(base, out, "--skip-if-released"))
    assert res.exit_code == 0 and "nothing to do" in res.message
    assert _assert_consistent(out)["run_id"] == manifest["run_id"]
    # A plain rerun is refused: the date is released (by the run that crashed after its commit).
    res = nightly.run(_argv(base, out))
    assert res.exit_code == nightly.EXIT_REFUSED and "already released" in res.message
    with _ledger(out) as led:
        assert [(r["run_id"], r["status"]) for r in led.rows()] == [(manifest["run_id"], "released")]


def test_crash_during_forced_rerelease_restores_the_previous_release(crashed):
    base, results = crashed
    out, code, stderr = results["forced_mid_publish"]
    assert code == 137, stderr
    with _ledger(out) as led:
        first, second = led.rows()
    assert (first["status"], second["status"]) == ("released", "pending")
    assert _manifest(out)["run_id"] == first["run_id"]
    assert _dir_runs(out)["product_day"] == second["run_id"]  # moved in, not committed
    # The next start rolls the crashed run back; without --force-rerelease it is then refused.
    res = nightly.run(_argv(base, out))
    assert res.exit_code == nightly.EXIT_REFUSED and "already released" in res.message
    assert _assert_consistent(out)["run_id"] == first["run_id"]
    with _ledger(out) as led:
        assert [r["status"] for r in led.rows()] == ["released", "aborted"]


def test_verify_reports_missing_manifest_tampered_file_and_unrecorded_manifest(crashed, tmp_path):
    base, _ = crashed
    out = tmp_path / "out"
    assert nightly.run(_argv(base, out)).exit_code == 0
    ledger_args = ["ledger", "verify", "--output", str(out)]
    assert cli.main(ledger_args) == 0
    mpath = out / "_manifests" / "nightly" / f"dt={DAY}.json"
    saved = mpath.read_bytes()
    # A manifest for which the ledger has no released entry.
    fake = json.loads(saved)
    fake["run_id"] = "not-in-the-ledger"
    (mpath.parent / "dt=2026-11-30.json").write_text(json.dumps(fake))
    # A released file changed after publishing.
    part = out / "category_day" / f"dt={DAY}" / "part-00000.parquet"
    table = pq.read_table(part)
    pq.write_table(table.slice(0, max(0, table.num_rows - 1)), part)
    mpath.unlink()
    with _ledger(out) as led:
        problems, _ = cli.verify_ledger(led)
    kinds = sorted(p["kind"] for p in problems)
    assert kinds == ["manifest_without_release", "missing_manifest"]
    assert cli.main(ledger_args) == 1
    mpath.write_bytes(saved)
    with _ledger(out) as led:
        problems, _ = cli.verify_ledger(led)
    assert sorted(p["kind"] for p in problems) == ["checksum_mismatch", "manifest_without_release"]


def _spec_copy(tmp_path, **changes):
    spec = yaml.safe_load(open(os.path.join(ROOT, "configs", "nightly.yaml")))
    for key, value in changes.items():
        node = spec
        *path, last = key.split(".")
        for p in path:
            node = node[p]
        node[last] = value
    path = tmp_path / f"spec-{len(os.listdir(tmp_path))}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return str(path)


def test_spec_change_needs_force_and_is_charged_again(crashed, tmp_path):
    base, _ = crashed
    out = tmp_path / "out"
    assert nightly.run(_argv(base, out)).exit_code == 0
    changed = _spec_copy(tmp_path, **{"budget.epsilon": 2.5})
    res = nightly.run(["--spec", changed, *_argv(base, out)])
    assert res.exit_code == nightly.EXIT_REFUSED
    assert "spec changed since" in res.message and "--force-rerelease" in res.message
    res = nightly.run(["--spec", changed, *_argv(base, out, "--force-rerelease")])
    assert res.exit_code == 0, res.message
    manifest = _assert_consistent(out)
    assert manifest["forced_rerelease"] is True and manifest["run_id"] == res.run_id
    with _ledger(out) as led:
        first, second = led.rows()
        assert first["superseded_by"] == second["run_id"] and first["spec_hash"] != second["spec_hash"]
        assert second["status"] == "released"
        # The superseded release stays charged but is no longer checked against files.
        assert cli.verify_ledger(led)[1]["released"] == 1
        window = nightly.ledger_lib.Window.from_spec(nightly.load_spec(changed))
        cost = led.window_cost("nightly", DAY, [], window)
        assert cost.n_releases == 2 and cost.spent_epsilon > 4.5  # both releases are charged (3 + 2.5)


def test_cap_below_one_run_is_refused_before_reading_data(tmp_path):
    spec = _spec_copy(tmp_path, **{"ledger.max_epsilon": 1})
    out = tmp_path / "out"
    res = nightly.run(["--spec", spec, "--input", str(tmp_path / "no-such-input"), "--output", str(out),
                       "--date", DAY.isoformat()])
    # Refused (4), not "bad input" (3): the ledger is consulted before any input is opened.
    assert res.exit_code == nightly.EXIT_REFUSED, res.message
    assert "this run alone costs epsilon 2.97" in res.message and "max_epsilon 1 " in res.message
    assert not out.exists()
    with _ledger(out) as led:
        assert led.rows() == []


def test_corrupt_ledger_changes_nothing(tmp_path):
    bad = tmp_path / "ledger.sqlite"
    bad.write_bytes(b"\x00garbage" * 100)
    before = bad.read_bytes()
    out = tmp_path / "out"
    res = nightly.run(["--ledger", str(bad), "--input", str(tmp_path), "--output", str(out),
                       "--date", DAY.isoformat()])
    assert res.exit_code == nightly.EXIT_FAILURE and "not a SQLite database" in res.message
    assert bad.read_bytes() == before and not out.exists()
    assert cli.main(["ledger", "show", "--ledger", str(bad)]) == 1


def test_future_date_is_refused_and_touches_nothing(tmp_path):
    future = datetime.datetime.now(datetime.timezone.utc).date() + datetime.timedelta(days=2)
    out = tmp_path / "out"
    res = nightly.run(["--input", str(tmp_path), "--output", str(out), "--date", future.isoformat()])
    assert res.exit_code == nightly.EXIT_BAD_SPEC and "in the future" in res.message
    assert not out.exists() and not (tmp_path / "out_quarantine").exists()


def test_stale_orphan_staging_is_cleaned_and_live_staging_left(crashed, tmp_path):
    base, _ = crashed
    out = tmp_path / "out"
    orphan = out / "_staging" / "old-run"
    (orphan / "product_day").mkdir(parents=True)
    old = 1_000_000_000
    os.utime(orphan, (old, old))
    live = out / "_staging" / "live-run"
    live.mkdir(parents=True)
    nightly._write_json(str(live / nightly.OWNER), {"run_id": "live-run", **nightly.ledger_lib.process_identity()})
    res = nightly.run(_argv(base, out))
    assert res.exit_code == 0, res.message
    assert _staging_left(out) == ["live-run"]
    shutil.rmtree(live)
