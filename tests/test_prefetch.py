"""Accounting computed ahead in a helper process (pipelines/prefetch.py)."""
import datetime
import json
import os
import subprocess
import sys

import pytest

from pipelines import nightly, prefetch
from transforms import accounting, generator
from transforms import ledger as ledger_lib
from transforms.spec import load_spec

DATE = datetime.date(2026, 12, 2)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SPEC = os.path.join(ROOT, "configs", "nightly.yaml")


@pytest.fixture(autouse=True)
def _clean():
    accounting.clear_precomputed()
    yield
    accounting.clear_precomputed()


def _expected(spec, ledger_path):
    """What the run computes itself, without any precomputed result."""
    plan = accounting.plan_for_spec(spec)
    report = accounting.report(plan, spec.accountant)
    window = ledger_lib.Window.from_spec(spec)
    with ledger_lib.Ledger(ledger_path, read_only=True) as ledger:
        cost = ledger.window_cost(spec.job, DATE, prefetch.run_events(plan, spec), window)
    return plan, report, cost


def _charge_days(ledger_path, spec, days):
    plan = accounting.plan_for_spec(spec)
    events = prefetch.run_events(plan, spec)
    window = ledger_lib.Window.from_spec(spec)
    with ledger_lib.Ledger(ledger_path) as ledger:
        for d in range(days):
            run_id = f"r{d}"
            ledger.reserve(job=spec.job, date=DATE - datetime.timedelta(days=d + 1), run_id=run_id,
                           spec_hash=spec.spec_hash, events=events, run_epsilon=3.0, run_delta=1e-7,
                           accountant=spec.accountant, window=window)
            ledger.mark_released(run_id)


def test_helper_results_equal_what_the_run_computes(tmp_path):
    spec = load_spec(SPEC)
    out = tmp_path / "out"
    ledger_path = ledger_lib.default_path(prefetch.default_quarantine(str(out)))
    _charge_days(ledger_path, spec, 5)
    argv = ["--input", "x", "--output", str(out), "--date", DATE.isoformat()]
    ahead = prefetch.start(argv)
    assert ahead is not None
    n = ahead.install()
    # plan_for_spec, report (+ its compose calls), the window's compose and compose_runs.
    assert n >= 5
    got = _expected(spec, ledger_path)
    assert len(accounting._PRECOMPUTED) == n
    accounting.clear_precomputed()
    want = _expected(spec, ledger_path)
    assert got == want


def test_a_call_with_other_arguments_is_computed_not_answered():
    events = [{"pld": "laplace", "noise_multiplier": 2.0, "epsilon": 0.5, "delta": 0.0}]
    right = accounting.compose(events, 1e-6, "pld")
    key_other = accounting._call_key("compose", (events, 1e-5, "pld"))
    accounting.install_precomputed({key_other: 123.0})  # a result for other arguments
    assert accounting.compose(events, 1e-6, "pld") == right
    assert accounting.compose(events, 1e-5, "pld") == 123.0  # the exact call is answered


def test_a_failed_helper_costs_nothing(tmp_path, monkeypatch):
    # A helper that dies (here: a spec it cannot read) installs nothing; the run goes on.
    argv = ["--spec", str(tmp_path / "missing.yaml"), "--input", "x", "--output", str(tmp_path / "o"),
            "--date", DATE.isoformat()]
    ahead = prefetch.start(argv)
    assert ahead is not None and ahead.install() == 0
    assert accounting._PRECOMPUTED == {}
    assert prefetch.start(["--input", "x"]) is None  # no --output/--date: nothing to compute
    monkeypatch.setenv(prefetch.DISABLE_ENV, "1")
    assert prefetch.start(argv) is None


def test_cli_run_parent_never_imports_dp_accounting(tmp_path):
    """The run's own process gets every accounting result from the helper (the point of it)."""
    info = generator.generate(str(tmp_path / "data"), n_users=500, n_events=8_000, date=DATE, n_files=1)
    out = tmp_path / "out"
    env = dict(os.environ)
    env.pop("PYTHONPROFILEIMPORTTIME", None)  # -X importtime reports the run's own process only
    env.pop("CLICKDP_NO_PREFETCH", None)
    proc = subprocess.run([sys.executable, "-X", "importtime", "-m", "pipelines.cli", "run",
                           "--input", str(tmp_path / "data" / "events"), "--output", str(out),
                           "--date", DATE.isoformat(), "--no-postprocess"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    imported = {line.rsplit("|", 1)[-1].strip() for line in proc.stderr.splitlines()
                if line.startswith("import time:")}
    assert "apache_beam" in imported
    assert not {"dp_accounting", "pipeline_dp", "scipy.signal"} & imported
    events = [json.loads(line) for line in proc.stderr.splitlines() if line.startswith("{")]
    assert next(e for e in events if e["event"] == "prefetched")["calls"] >= 5
    manifest = json.loads((out / "_manifests" / "nightly" / f"dt={DATE}.json").read_text())
    assert manifest["budget"]["spent_epsilon"] <= 3.0
    assert info["rows"] > 0


def test_nightly_reexports_the_helpers():
    assert nightly.DEFAULT_SPEC == prefetch.DEFAULT_SPEC
    assert nightly.ledger_path_for is prefetch.ledger_path_for
