"""The privacy ledger: every release of every job, in one embedded SQLite file.

One row per run that reserved budget::

    job, date, run_id, spec_hash, status (pending | released | aborted),
    events (JSON: one record per mechanism, see transforms/accounting.py),
    epsilon/delta (the run's cost), window (the cap it was checked against),
    pid/hostname/proc_start (who holds a pending reservation), output_root,
    manifest_path, superseded_by (a later forced re-release of the same date),
    created_at/updated_at/released_at (UTC), note

Rules (all checked in ONE ``BEGIN IMMEDIATE`` transaction by :meth:`Ledger.reserve`,
so two runs started at once are serialized by SQLite's write lock and cannot both
pass):

1. Reclaim: a pending row whose manifest exists (with its run id) was published:
   it becomes released. A pending row whose process is gone (same host; pid not
   alive, or alive with another start time, i.e. reused) becomes aborted: a dead
   run spends nothing. Pending rows of another host stay charged until that run
   finishes or an operator runs ``clickdp ledger abort``.
2. A (job, date) with a live pending run is refused (a run is in progress).
3. A released (job, date) is refused unless forced; a forced re-release is charged
   again (both rows stay in the window). If the spec hash changed, the message says so.
4. Window: for every window of ``window_days`` consecutive days that contains the
   date, the released + pending events of the job in it plus this run must compose
   (naive or PLD) to at most ``max_epsilon`` at ``delta``.
5. Insert this run as pending (with pid, hostname, process start time).

The ledger holds no data about shoppers, only budgets; it still lives in the
quarantine location by default (``<quarantine>/_ledger/ledger.sqlite``), never in the
published output.
"""
from __future__ import annotations

import contextlib
import dataclasses
import datetime
import json
import math
import os
import socket
import sqlite3
import time
import urllib.parse
from typing import Iterable, Optional, Sequence

from transforms import accounting

SCHEMA_VERSION = 1
SQLITE_HEADER = b"SQLite format 3\x00"
HOLD_ENV = "CLICKDP_TEST_LEDGER_HOLD_SECONDS"  # test-only: sleep inside the reservation transaction
STATUSES = ("pending", "released", "aborted")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS releases (
    id            INTEGER PRIMARY KEY AUTOINCREMENT,
    job           TEXT NOT NULL,
    date          TEXT NOT NULL,
    run_id        TEXT NOT NULL UNIQUE,
    spec_hash     TEXT NOT NULL,
    status        TEXT NOT NULL CHECK (status IN ('pending', 'released', 'aborted')),
    events        TEXT NOT NULL,
    epsilon       REAL NOT NULL,
    delta         REAL NOT NULL,
    accountant    TEXT NOT NULL,
    window        TEXT NOT NULL,
    forced        INTEGER NOT NULL DEFAULT 0,
    pid           INTEGER,
    hostname      TEXT,
    proc_start    TEXT,
    output_root   TEXT,
    manifest_path TEXT,
    superseded_by TEXT,
    created_at    TEXT NOT NULL,
    updated_at    TEXT NOT NULL,
    released_at   TEXT,
    note          TEXT
);
CREATE INDEX IF NOT EXISTS releases_job_date ON releases (job, date);
"""


class LedgerError(RuntimeError):
    """The ledger cannot be used (not SQLite, wrong schema, unwritable, unknown run)."""


class LedgerRefused(RuntimeError):
    """A release rule refuses the run (window cap, already released, run in progress)."""


@dataclasses.dataclass(frozen=True)
class Window:
    days: int
    max_epsilon: Optional[float]
    delta: float
    accountant: str

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @staticmethod
    def from_spec(spec) -> "Window":
        cfg = spec.ledger
        # Without a cap the delta only serves reports: one that the window's runs fit in.
        delta = cfg.delta if cfg.delta is not None else min(0.5, 2 * cfg.window_days * (spec.delta or 1e-9))
        return Window(cfg.window_days, cfg.max_epsilon, delta, spec.ledger_accountant)


@dataclasses.dataclass(frozen=True)
class WindowCost:
    """The worst window containing a date: its days, what is spent there, with this run."""

    start: datetime.date
    end: datetime.date
    n_releases: int
    spent_epsilon: float  # without this run
    total_epsilon: float  # with this run
    run_epsilon: float  # this run alone

    def to_json(self) -> dict:
        return {"start": self.start.isoformat(), "end": self.end.isoformat(), "releases": self.n_releases,
                "spent_epsilon": _num(self.spent_epsilon), "total_epsilon": _num(self.total_epsilon),
                "run_epsilon": _num(self.run_epsilon)}


def _num(x: float):
    return None if math.isinf(x) else x


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


# --------------------------------------------------------------------------------------
# Processes
# --------------------------------------------------------------------------------------


def _proc_stat(pid: int) -> Optional[list]:
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as fh:
            text = fh.read()
    except OSError:
        return None
    # The command name (field 2) is in parentheses and may contain spaces.
    return text[text.rfind(")") + 2:].split()


def process_start(pid: int) -> Optional[str]:
    """The process's start time in clock ticks since boot (Linux), to detect pid reuse."""
    fields = _proc_stat(pid)
    return fields[19] if fields and len(fields) > 19 else None


def process_identity() -> dict:
    pid = os.getpid()
    return {"pid": pid, "hostname": socket.gethostname(), "proc_start": process_start(pid)}


def process_alive(pid: Optional[int], hostname: Optional[str], proc_start: Optional[str]) -> Optional[bool]:
    """True/False on this host; None (unknown) for a process of another host."""
    if hostname is not None and hostname != socket.gethostname():
        return None
    if not pid:
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    fields = _proc_stat(int(pid))
    if fields is None:  # exited just now, or no /proc (not Linux): then trust kill(0)
        return not os.path.isdir("/proc/self")
    if fields[0] in ("Z", "X"):  # zombie or dead: exited, not yet reaped
        return False
    if proc_start is not None and len(fields) > 19 and fields[19] != proc_start:
        return False  # the pid was reused by another process
    return True


def manifest_run_id(path: Optional[str]) -> Optional[str]:
    """The run id a manifest file records, or None if it does not exist or is unreadable."""
    if not path:
        return None
    try:
        if "://" in path:
            from apache_beam.io.filesystems import FileSystems
            with FileSystems.open(path) as fh:
                return json.loads(fh.read().decode("utf-8")).get("run_id")
        with open(path, encoding="utf-8") as fh:
            return json.load(fh).get("run_id")
    except Exception:  # noqa: BLE001 - missing or unreadable: not published
        return None


# --------------------------------------------------------------------------------------
# The ledger
# --------------------------------------------------------------------------------------


class Ledger:
    """A privacy ledger file. ``create=False`` refuses to create a missing ledger;
    ``read_only=True`` (implies create=False) opens it for queries only, taking no write lock."""

    def __init__(self, path: str, *, create: bool = True, timeout: float = 60.0, read_only: bool = False):
        self.path = path
        self.read_only = read_only
        create = create and not read_only
        if "://" in path:
            raise LedgerError(f"ledger {path}: must be a local file (SQLite cannot live on an object store); "
                              "set ledger.path in the spec or --ledger")
        exists = os.path.exists(path)
        if not exists and not create:
            raise LedgerError(f"no ledger at {path}")
        if exists:
            if os.path.isdir(path):
                raise LedgerError(f"ledger {path} is a directory, not a SQLite file")
            try:
                with open(path, "rb") as fh:
                    head = fh.read(16)
            except OSError as exc:
                raise LedgerError(f"ledger {path} cannot be read: {exc}") from None
            if head and head != SQLITE_HEADER:
                raise LedgerError(f"ledger {path} is not a SQLite database (corrupt or another file?); "
                                  "nothing was read or published. Restore it from a backup; do not delete it "
                                  "(the budget it records would be forgotten)")
        else:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        try:
            if read_only:
                uri = "file:" + urllib.parse.quote(os.path.abspath(path)) + "?mode=ro"
                self.conn = sqlite3.connect(uri, uri=True, timeout=timeout, isolation_level=None)
            else:
                self.conn = sqlite3.connect(path, timeout=timeout, isolation_level=None)
            with self.transaction():
                if exists and os.path.getsize(path) > 0:
                    self._check_schema()
                else:
                    for stmt in filter(None, (s.strip() for s in _SCHEMA.split(";"))):
                        self.conn.execute(stmt)
                    self.conn.execute("INSERT OR REPLACE INTO meta VALUES ('schema_version', ?)",
                                      (str(SCHEMA_VERSION),))
        except sqlite3.DatabaseError as exc:
            raise LedgerError(f"ledger {path} is not a usable SQLite database ({exc}); nothing was read or "
                              "published. Restore it from a backup") from None

    def _check_schema(self) -> None:
        tables = {r[0] for r in self.conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        if not {"meta", "releases"} <= tables:
            raise LedgerError(f"ledger {self.path} is a SQLite database but not a clickdp ledger "
                              f"(tables: {', '.join(sorted(tables)) or 'none'})")
        row = self.conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
        if row is None or int(row[0]) != SCHEMA_VERSION:
            raise LedgerError(f"ledger {self.path} has schema version {row[0] if row else None}, "
                              f"this clickdp needs {SCHEMA_VERSION}")

    def close(self) -> None:
        self.conn.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    @contextlib.contextmanager
    def transaction(self):
        """One IMMEDIATE transaction: takes SQLite's write lock at BEGIN, so check-then-write
        sequences of concurrent processes are serialized."""
        try:
            self.conn.execute("BEGIN" if self.read_only else "BEGIN IMMEDIATE")
        except sqlite3.OperationalError as exc:
            raise LedgerError(f"ledger {self.path}: could not lock it ({exc}); another run holds it") from None
        try:
            yield self.conn
        except BaseException:
            self.conn.execute("ROLLBACK")
            raise
        else:
            self.conn.execute("COMMIT")

    # -- queries ---------------------------------------------------------------------

    def rows(self, job: Optional[str] = None, statuses: Sequence[str] = STATUSES) -> list:
        q = f"SELECT * FROM releases WHERE status IN ({','.join('?' * len(statuses))})"
        args = list(statuses)
        if job is not None:
            q += " AND job = ?"
            args.append(job)
        cur = self.conn.execute(q + " ORDER BY date, id", args)
        names = [d[0] for d in cur.description]
        return [dict(zip(names, r)) for r in cur.fetchall()]

    def row(self, run_id: str) -> Optional[dict]:
        cur = self.conn.execute("SELECT * FROM releases WHERE run_id = ?", (run_id,))
        r = cur.fetchone()
        return None if r is None else dict(zip([d[0] for d in cur.description], r))

    def jobs(self) -> list:
        return [r[0] for r in self.conn.execute("SELECT DISTINCT job FROM releases ORDER BY job")]

    # -- reclaim ---------------------------------------------------------------------

    def _reclaim(self) -> list:
        """Inside a transaction: settles pending rows of dead processes. Returns what changed."""
        changed = []
        for r in self.rows(statuses=("pending",)):
            if manifest_run_id(r["manifest_path"]) == r["run_id"]:
                self._set_released(r)
                changed.append((r["run_id"], "released", "its manifest exists: it was published"))
            elif process_alive(r["pid"], r["hostname"], r["proc_start"]) is False:
                self._set(r["run_id"], "aborted", "reclaimed: its process is gone and nothing was published")
                changed.append((r["run_id"], "aborted", "process gone, nothing published"))
        return changed

    def reclaim(self) -> list:
        with self.transaction():
            return self._reclaim()

    def settle(self, run_id: str, published: bool, note: str) -> None:
        """Inside :meth:`transaction`: a run that was published becomes released (even if it
        had been aborted: its budget was spent); a pending run that was not becomes aborted."""
        r = self.row(run_id)
        if r is None:
            return
        if published and r["status"] != "released":
            self._set_released(r)
        elif not published and r["status"] == "pending":
            self._set(run_id, "aborted", note)

    def _set(self, run_id: str, status: str, note: Optional[str] = None) -> None:
        self.conn.execute("UPDATE releases SET status = ?, updated_at = ?, note = COALESCE(?, note) "
                          "WHERE run_id = ?", (status, _now(), note, run_id))

    def _set_released(self, r: dict) -> None:
        now = _now()
        self.conn.execute("UPDATE releases SET status = 'released', updated_at = ?, released_at = ? "
                          "WHERE run_id = ?", (now, now, r["run_id"]))
        self.conn.execute("UPDATE releases SET superseded_by = ?, updated_at = ? WHERE job = ? AND date = ? "
                          "AND status = 'released' AND run_id != ? AND superseded_by IS NULL",
                          (r["run_id"], now, r["job"], r["date"], r["run_id"]))

    # -- window ----------------------------------------------------------------------

    def window_cost(self, job: str, date: datetime.date, run_events: list, window: Window,
                    *, exclude_run: Optional[str] = None) -> WindowCost:
        """The worst window of ``window.days`` days containing ``date``: released + pending
        events of ``job`` there, composed with ``run_events``."""
        w = window.days
        lo, hi = date - datetime.timedelta(days=w - 1), date + datetime.timedelta(days=w - 1)
        rows = [r for r in self.rows(job, ("pending", "released"))
                if lo.isoformat() <= r["date"] <= hi.isoformat() and r["run_id"] != exclude_run]
        parsed = [(datetime.date.fromisoformat(r["date"]), json.loads(r["events"])) for r in rows]
        run_eps = accounting.compose(run_events, window.delta, window.accountant)
        # Candidate windows [s, s + w - 1] for s in [lo, date]; only maximal release sets matter
        # (composition is monotone), and in nightly operation there is one.
        sets = {}
        for i in range(w):
            s = lo + datetime.timedelta(days=i)
            e = s + datetime.timedelta(days=w - 1)
            members = frozenset(j for j, (d, _) in enumerate(parsed) if s <= d <= e)
            sets.setdefault(members, (s, e))
        maximal = [m for m in sets if not any(m < other for other in sets)]
        worst = None
        for m in maximal:
            runs = [parsed[j][1] for j in sorted(m)]
            spent = accounting.compose_runs(runs, window.delta, window.accountant)
            total = accounting.compose_runs(runs + [list(run_events)], window.delta, window.accountant)
            cost = WindowCost(sets[m][0], sets[m][1], len(m), spent, total, run_eps)
            if worst is None or cost.total_epsilon > worst.total_epsilon:
                worst = cost
        return worst

    # -- reservation -----------------------------------------------------------------

    def reserve(self, *, job: str, date: datetime.date, run_id: str, spec_hash: str, events: list,
                run_epsilon: float, run_delta: float, accountant: str, window: Window,
                force: bool = False, output_root: Optional[str] = None,
                manifest_path: Optional[str] = None) -> dict:
        """Checks every rule and inserts this run as pending, atomically. Raises LedgerRefused."""
        ident = process_identity()
        with self.transaction():
            reclaimed = self._reclaim()
            day = date.isoformat()
            same = self.rows(job, ("pending", "released"))
            same = [r for r in same if r["date"] == day]
            for r in same:
                if r["status"] == "pending":
                    raise LedgerRefused(
                        f"{job} {day} is being released by run {r['run_id']} (pid {r['pid']} on "
                        f"{r['hostname']}, started {r['created_at']}); wait for it, or if that process is "
                        f"gone for good: clickdp ledger abort --run-id {r['run_id']}")
            released = [r for r in same if r["status"] == "released"]
            if released and not force:
                last = released[-1]
                changed = (f" The spec changed since (released with spec hash {last['spec_hash']}, "
                           f"this spec hashes to {spec_hash}); a re-release with the new spec is still a "
                           f"second release of the same shoppers' data."
                           if last["spec_hash"] != spec_hash else "")
                raise LedgerRefused(
                    f"{job} {day} is already released (run {last['run_id']} at {last['released_at']}).{changed} "
                    "A second release with fresh noise would weaken the guarantee (averaging halves the "
                    "noise). Use --force-rerelease to release again and spend the budget again.")
            cost = None
            if window.max_epsilon is not None:
                cost = self.window_cost(job, date, events, window)
                check_window(job, date, cost, window)
            hold = float(os.environ.get(HOLD_ENV, "0") or 0)
            if hold > 0:
                time.sleep(hold)
            now = _now()
            self.conn.execute(
                "INSERT INTO releases (job, date, run_id, spec_hash, status, events, epsilon, delta, accountant, "
                "window, forced, pid, hostname, proc_start, output_root, manifest_path, created_at, updated_at) "
                "VALUES (?, ?, ?, ?, 'pending', ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (job, day, run_id, spec_hash, accounting.events_json(events), float(run_epsilon),
                 float(run_delta), accountant, json.dumps(window.to_json(), sort_keys=True), int(bool(released)),
                 ident["pid"], ident["hostname"], ident["proc_start"], output_root, manifest_path, now, now))
        return {"reclaimed": reclaimed, "window": cost.to_json() if cost else None,
                "forced_rerelease": bool(released)}

    def mark_released(self, run_id: str, manifest_path: Optional[str] = None) -> None:
        with self.transaction():
            r = self.row(run_id)
            if r is None:
                raise LedgerError(f"ledger {self.path}: no run {run_id}")
            if r["status"] == "released":
                return
            # An aborted row (e.g. aborted by an operator while the run was in fact alive) whose
            # release was committed is charged after all: undercounting is the unsafe direction.
            if manifest_path:
                self.conn.execute("UPDATE releases SET manifest_path = ? WHERE run_id = ?", (manifest_path, run_id))
            self._set_released(r)

    def abort(self, run_id: str, note: str) -> bool:
        """Marks a pending run aborted (its budget is no longer charged). False if not pending."""
        with self.transaction():
            r = self.row(run_id)
            if r is None or r["status"] != "pending":
                return False
            self._set(run_id, "aborted", note)
            return True


def check_window(job: str, date: datetime.date, cost: WindowCost, window: Window) -> None:
    """Raises LedgerRefused if the window with this run would exceed the cap."""
    cap = window.max_epsilon
    if cap is None or cost.total_epsilon <= cap:
        return
    at = f"at delta {window.delta:g} ({window.accountant} accounting)"
    if cost.run_epsilon > cap:
        raise LedgerRefused(
            f"the ledger cap is below one run's cost: this run alone costs epsilon "
            f"{_fmt(cost.run_epsilon)} {at}, the cap is max_epsilon {cap:g} per {window.days} days. "
            "Lower budget.epsilon (or budget.delta) or raise ledger.max_epsilon in the spec.")
    raise LedgerRefused(
        f"releasing {job} {date} would spend epsilon {_fmt(cost.total_epsilon)} {at} in the "
        f"{window.days}-day window {cost.start}..{cost.end}, above the cap max_epsilon {cap:g}: "
        f"{cost.n_releases} release(s) there already spent {_fmt(cost.spent_epsilon)}, this run costs "
        f"{_fmt(cost.run_epsilon)} alone. Wait until older releases leave the window, or raise "
        "ledger.max_epsilon deliberately.")


def _fmt(x: float) -> str:
    return "infinite (the deltas exceed the ledger's delta)" if math.isinf(x) else f"{x:.4g}"


def default_path(quarantine: str) -> str:
    return os.path.join(quarantine, "_ledger", "ledger.sqlite")


# --------------------------------------------------------------------------------------
# Reports
# --------------------------------------------------------------------------------------


def show(ledger: Ledger, job: Optional[str] = None, today: Optional[datetime.date] = None) -> list:
    """Per job: counts, the window ending today (spent, cap, remaining) and the worst window."""
    today = today or datetime.datetime.now(datetime.timezone.utc).date()
    out = []
    for j in ([job] if job else ledger.jobs()):
        rows = ledger.rows(j)
        if not rows:
            out.append({"job": j, "releases": 0})
            continue
        last = max(rows, key=lambda r: r["id"])
        window = Window(**json.loads(last["window"]))
        charged = [r for r in rows if r["status"] in ("pending", "released")]
        counts = {s: sum(r["status"] == s for r in rows) for s in STATUSES}
        start = today - datetime.timedelta(days=window.days - 1)
        current = [r for r in charged if start.isoformat() <= r["date"] <= today.isoformat()]
        spent = accounting.compose_runs([json.loads(r["events"]) for r in current], window.delta,
                                        window.accountant)
        worst = _worst_window(charged, window)
        entry = {
            "job": j, "releases": counts, "first_date": rows[0]["date"], "last_date": rows[-1]["date"],
            "window": window.to_json(),
            "current_window": {"start": start.isoformat(), "end": today.isoformat(), "releases": len(current),
                               "spent_epsilon": _num(spent),
                               "remaining_epsilon": (None if window.max_epsilon is None
                                                     else _num(window.max_epsilon - spent))},
            "worst_window": worst,
            "last_release": {k: last[k] for k in ("run_id", "date", "status", "spec_hash", "epsilon", "delta")},
        }
        out.append(entry)
    return out


def _worst_window(charged: list, window: Window) -> Optional[dict]:
    if not charged:
        return None
    dates = sorted({datetime.date.fromisoformat(r["date"]) for r in charged})
    best = None
    seen = set()
    for d in dates:  # windows starting at a release date cover every maximal set
        e = d + datetime.timedelta(days=window.days - 1)
        members = tuple(r["run_id"] for r in charged if d.isoformat() <= r["date"] <= e.isoformat())
        if members in seen:
            continue
        seen.add(members)
        eps = accounting.compose_runs([json.loads(r["events"]) for r in charged if r["run_id"] in members],
                                      window.delta, window.accountant)
        if best is None or eps > best[0]:
            best = (eps, d, e, len(members))
    return {"start": best[1].isoformat(), "end": best[2].isoformat(), "releases": best[3],
            "spent_epsilon": _num(best[0])}


def format_show(entries: Iterable[dict]) -> str:
    lines = []
    for e in entries:
        if not e["releases"]:
            lines.append(f"{e['job']}: no releases")
            continue
        c, w, cw = e["releases"], e["window"], e["current_window"]
        cap = "no cap" if w["max_epsilon"] is None else f"cap {w['max_epsilon']:g}"
        lines.append(f"{e['job']}: {c['released']} released, {c['pending']} pending, {c['aborted']} aborted "
                     f"({e['first_date']}..{e['last_date']}); window {w['days']} days, {cap} at delta "
                     f"{w['delta']:g} ({w['accountant']})")
        spent = "inf" if cw["spent_epsilon"] is None else f"{cw['spent_epsilon']:.4g}"
        rem = "" if cw["remaining_epsilon"] is None and w["max_epsilon"] is None else (
            f", remaining {cw['remaining_epsilon']:.4g}" if cw["remaining_epsilon"] is not None else ", remaining -inf")
        lines.append(f"  window {cw['start']}..{cw['end']}: {cw['releases']} release(s), spent epsilon {spent}{rem}")
        ww = e["worst_window"]
        if ww:
            ws = "inf" if ww["spent_epsilon"] is None else f"{ww['spent_epsilon']:.4g}"
            lines.append(f"  worst window {ww['start']}..{ww['end']}: {ww['releases']} release(s), "
                         f"spent epsilon {ws}")
        lr = e["last_release"]
        lines.append(f"  last run {lr['run_id']} ({lr['date']}, {lr['status']}, spec {lr['spec_hash']})")
    return "\n".join(lines)
