"""The privacy ledger: reservations, release-once, rolling windows, reclaim, bad ledgers, concurrency."""
import datetime
import json
import os
import sqlite3
import subprocess
import sys
import textwrap

import pytest

from transforms import ledger as ledger_lib
from transforms.ledger import Ledger, LedgerError, LedgerRefused, Window

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
D0 = datetime.date(2026, 11, 1)
ONE = [{"pld": "laplace", "noise_multiplier": 1.0, "epsilon": 1.0, "delta": 0.0, "component": "count"}]
NAIVE_7 = Window(days=7, max_epsilon=3.5, delta=1e-5, accountant="naive")


def _day(i):
    return D0 + datetime.timedelta(days=i)


def _reserve(led, date, run_id, *, window=NAIVE_7, events=ONE, spec_hash="h1", force=False, job="j"):
    return led.reserve(job=job, date=date, run_id=run_id, spec_hash=spec_hash, events=events,
                       run_epsilon=1.0, run_delta=0.0, accountant=window.accountant, window=window,
                       force=force, output_root="/nowhere", manifest_path=f"/nowhere/{run_id}.json")


def _release(led, date, run_id, **kw):
    _reserve(led, date, run_id, **kw)
    led.mark_released(run_id)


@pytest.fixture
def led(tmp_path):
    with Ledger(str(tmp_path / "l" / "ledger.sqlite")) as ledger:
        yield ledger


def test_release_once_and_forced_rerelease_is_charged_again(led):
    _release(led, _day(0), "r1")
    with pytest.raises(LedgerRefused, match="already released .*--force-rerelease"):
        _reserve(led, _day(0), "r2")
    _release(led, _day(0), "r2", force=True)
    rows = led.rows("j")
    assert [r["status"] for r in rows] == ["released", "released"]
    assert rows[0]["superseded_by"] == "r2" and rows[1]["forced"] == 1
    cost = led.window_cost("j", _day(1), ONE, NAIVE_7)
    assert cost.spent_epsilon == 2.0 and cost.total_epsilon == 3.0  # both releases are charged


def test_spec_change_is_named_in_the_refusal(led):
    _release(led, _day(0), "r1", spec_hash="aaaa")
    with pytest.raises(LedgerRefused, match="spec changed since .*aaaa.*bbbb"):
        _reserve(led, _day(0), "r2", spec_hash="bbbb")
    assert len(led.rows("j")) == 1  # nothing changed


def test_rolling_window_cap(led):
    for i in range(3):
        _release(led, _day(i), f"r{i}")
    with pytest.raises(LedgerRefused) as exc:
        _reserve(led, _day(3), "r3")
    msg = str(exc.value)
    assert "epsilon 4 " in msg and "max_epsilon 3.5" in msg and "already spent 3" in msg
    assert "7-day window 2026-10-29..2026-11-04" in msg  # the first window holding days 0..3
    assert len(led.rows("j")) == 3
    # Day 0 has left every 7-day window that contains day 7: [1..7] holds days 1, 2 and now 7.
    _release(led, _day(7), "r7")
    assert led.window_cost("j", _day(7), [], NAIVE_7).spent_epsilon == 3.0


def test_window_counts_later_releases_for_a_backfilled_date(led):
    """Backfilling day 0 after days 3..5: the window starting at day 0 holds all four."""
    for i in (3, 4, 5):
        _release(led, _day(i), f"r{i}")
    with pytest.raises(LedgerRefused, match="window 2026-10-31..2026-11-06, above"):  # days 0, 3, 4, 5
        _reserve(led, _day(0), "r0")
    _release(led, _day(-5), "rm5")  # its windows reach at most day 1: one release there


def test_cap_below_one_runs_cost(led):
    tight = Window(days=30, max_epsilon=0.5, delta=1e-5, accountant="naive")
    with pytest.raises(LedgerRefused, match=r"below one run's cost: this run alone costs epsilon 1 .*cap is "
                                            r"max_epsilon 0.5"):
        _reserve(led, _day(0), "r1", window=tight)
    assert led.rows() == []


def test_pld_window_admits_more_than_naive(led):
    events = [{"pld": "laplace", "noise_multiplier": 10.0, "epsilon": 0.1, "delta": 0.0}] * 10  # eps 1 naive
    pld = Window(days=30, max_epsilon=6.0, delta=1e-5, accountant="pld")
    for i in range(9):  # naive: 9 > 6; PLD composes 90 x Laplace(eps 0.1) to ~4
        _release(led, _day(i), f"r{i}", window=pld, events=events)
    cost = led.window_cost("j", _day(8), [], pld)
    assert 3.5 < cost.spent_epsilon < 4.5
    entry = ledger_lib.show(led, "j", today=_day(20))[0]
    assert entry["releases"]["released"] == 9
    assert entry["current_window"]["spent_epsilon"] == pytest.approx(cost.spent_epsilon)
    assert entry["current_window"]["remaining_epsilon"] == pytest.approx(6 - cost.spent_epsilon)
    assert entry["worst_window"]["releases"] == 9
    assert "remaining" in ledger_lib.format_show([entry])


def test_jobs_are_separate(led):
    _release(led, _day(0), "a", job="a")
    _release(led, _day(0), "b", job="b")  # same date, other job: fine
    assert led.jobs() == ["a", "b"]


def _dead_pid():
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(proc.stdout)


def test_reclaim_dead_pending_and_published_pending(led, tmp_path):
    _reserve(led, _day(0), "dead")
    _reserve(led, _day(1), "published")
    _reserve(led, _day(2), "alive")
    manifest = tmp_path / "m.json"
    manifest.write_text(json.dumps({"run_id": "published"}))
    with led.transaction():
        led.conn.execute("UPDATE releases SET pid = ? WHERE run_id IN ('dead', 'published')", (_dead_pid(),))
        led.conn.execute("UPDATE releases SET manifest_path = ? WHERE run_id = 'published'", (str(manifest),))
    # A pending run of this (live) process blocks its date.
    with pytest.raises(LedgerRefused, match="is being released by run alive"):
        _reserve(led, _day(2), "again")
    changed = led.reclaim()
    assert sorted(c[:2] for c in changed) == [("dead", "aborted"), ("published", "released")]
    status = {r["run_id"]: r["status"] for r in led.rows()}
    assert status == {"dead": "aborted", "published": "released", "alive": "pending"}
    _release(led, _day(0), "retry")  # the dead run's date and budget are free again


def test_pid_reuse_is_not_alive():
    me = ledger_lib.process_identity()
    assert ledger_lib.process_alive(me["pid"], me["hostname"], me["proc_start"]) is True
    assert ledger_lib.process_alive(me["pid"], me["hostname"], "1") is False  # same pid, other start time
    assert ledger_lib.process_alive(_dead_pid(), me["hostname"], None) is False
    assert ledger_lib.process_alive(me["pid"], "another-host", None) is None


def test_corrupt_ledger_is_refused_and_left_unchanged(tmp_path):
    path = tmp_path / "ledger.sqlite"
    path.write_bytes(b"this is not a database\n" * 10)
    before = path.read_bytes()
    with pytest.raises(LedgerError, match="not a SQLite database"):
        Ledger(str(path))
    assert path.read_bytes() == before
    # A valid SQLite file that is not a ledger.
    other = tmp_path / "other.sqlite"
    con = sqlite3.connect(other)
    con.execute("CREATE TABLE t (x)")
    con.commit()
    con.close()
    with pytest.raises(LedgerError, match="not a clickdp ledger"):
        Ledger(str(other))
    # Valid header, garbage pages.
    torn = tmp_path / "torn.sqlite"
    torn.write_bytes(ledger_lib.SQLITE_HEADER + b"\x00\x01" * 3000)
    with pytest.raises(LedgerError):
        Ledger(str(torn))
    with pytest.raises(LedgerError, match="no ledger at"):
        Ledger(str(tmp_path / "missing.sqlite"), create=False)


_WORKER = textwrap.dedent("""
    import datetime, json, os, sys, time
    sys.path.insert(0, {root!r})
    from transforms.ledger import Ledger, LedgerRefused, Window
    path, day, run_id, barrier = sys.argv[1:5]
    events = [{{"pld": "laplace", "noise_multiplier": 1.0, "epsilon": 1.0, "delta": 0.0}}]
    window = Window(days=7, max_epsilon=1.5, delta=1e-5, accountant="naive")
    with Ledger(path) as led:
        open(os.path.join(barrier, run_id), "w").close()  # both processes start reserving together
        while len(os.listdir(barrier)) < 2:
            time.sleep(0.005)
        start = time.time()
        try:
            led.reserve(job="j", date=datetime.date.fromisoformat(day), run_id=run_id, spec_hash="h",
                        events=events, run_epsilon=1.0, run_delta=0.0, accountant="naive", window=window)
        except LedgerRefused as exc:
            print(json.dumps({{"start": start, "end": time.time(), "refused": str(exc)}}))
            sys.exit(4)
        end = time.time()
        time.sleep(0.5)  # still alive (pending) while the other one checks
        led.mark_released(run_id)
    print(json.dumps({{"start": start, "end": end}}))
""")


def test_two_processes_cannot_both_pass_the_window_check(tmp_path):
    """Two real processes reserve at once against a cap that admits one run. Each holds the
    transaction open for 1.5 s between check and insert (test hook): without the
    BEGIN IMMEDIATE lock both would pass."""
    path = str(tmp_path / "ledger.sqlite")
    Ledger(path).close()
    script = tmp_path / "worker.py"
    script.write_text(_WORKER.format(root=ROOT))
    barrier = tmp_path / "barrier"
    barrier.mkdir()
    env = dict(os.environ, **{ledger_lib.HOLD_ENV: "1.5"})
    procs = [subprocess.Popen([sys.executable, str(script), path, day, f"run-{day}", str(barrier)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for day in ("2026-11-01", "2026-11-02")]
    outs = [p.communicate(timeout=120) for p in procs]
    codes = [p.returncode for p in procs]
    assert sorted(codes) == [0, 4], outs
    won = json.loads(outs[codes.index(0)][0])
    lost = json.loads(outs[codes.index(4)][0])
    assert "max_epsilon 1.5" in lost["refused"]
    # They really raced: the loser asked while the winner held the transaction, and had to wait for it.
    assert lost["start"] < won["end"] <= lost["end"]
    with Ledger(path) as led:
        assert [r["status"] for r in led.rows()] == ["released"]
