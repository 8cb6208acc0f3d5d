"""A run's privacy accounting, computed in a helper process while the run imports Beam.

Planning a run (the PLD calibration of its noise, the composition of the ledger window)
needs dp_accounting and SciPy, about 2 s to import, and Beam takes about 3 s more: one
after the other they were a quarter of a 10M-event nightly run. ``clickdp run`` calls
:func:`start` before it imports Beam; the helper (``python -m pipelines.prefetch``)
makes the same accounting calls the run is about to make, reading the ledger only, and
sends back their results keyed by their exact arguments. :meth:`Prefetch.install` hands
them to ``transforms.accounting``, which answers a call from them only when its
arguments are identical and computes it otherwise. A stale, failed or slow helper
therefore costs time, never correctness: the run's own checks (the atomic ledger
reservation included) run exactly as without it.

This module imports no Beam and no dp_accounting (the parent must stay light).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import pickle
import subprocess
import sys

DEFAULT_SPEC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                            "configs", "nightly.yaml")
#: How long the run waits for the helper before computing everything itself.
WAIT_SECONDS = 60.0
DISABLE_ENV = "CLICKDP_NO_PREFETCH"


def default_quarantine(output: str) -> str:
    return output.rstrip("/") + "_quarantine"


def ledger_path_for(spec, ledger: str | None, quarantine: str) -> str:
    from transforms import ledger as ledger_lib
    if ledger:
        return ledger
    if spec is not None and spec.ledger.path:
        return spec.ledger.path
    return ledger_lib.default_path(quarantine)


def local_dp_events(spec) -> list:
    """Ledger events of the local-DP outputs: a pure epsilon per shopper (own guarantee)."""
    return [{"output": lo.name, "metric": None, "component": "local_dp", "mechanism": "local_dp",
             "epsilon": float(lo.epsilon), "delta": 0.0, "pld": "privacy_parameters"}
            for lo in spec.local_outputs]


def run_events(plan, spec) -> list:
    """Everything the run charges to the ledger."""
    from transforms import accounting
    return accounting.mechanism_events(plan) + local_dp_events(spec)


def _parse(argv: list) -> argparse.Namespace | None:
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--spec", default=DEFAULT_SPEC)
    parser.add_argument("--output")
    parser.add_argument("--quarantine")
    parser.add_argument("--ledger")
    parser.add_argument("--date")
    try:
        args, _ = parser.parse_known_args(argv)
        args.date = datetime.date.fromisoformat(args.date) if args.date else None
    except (SystemExit, ValueError):
        return None
    return args if args.output and args.date else None


def _compute(argv: list) -> dict:
    """In the helper: the accounting calls of the run's start, recorded with their results."""
    from transforms import accounting
    from transforms import ledger as ledger_lib
    from transforms.spec import load_spec
    args = _parse(argv)
    if args is None:
        return {}
    spec = load_spec(args.spec)

    def calls():
        plan = accounting.plan_for_spec(spec)
        accounting.report(plan, spec.accountant)
        window = ledger_lib.Window.from_spec(spec)
        quarantine = (args.quarantine or default_quarantine(args.output)).rstrip("/")
        path = ledger_path_for(spec, args.ledger, quarantine)
        if window.max_epsilon is None or "://" in path:
            return
        # Read only: the helper never writes a ledger (a run's first ledger does not exist
        # yet: an empty one in memory stands for it), and the run's own reservation, inside
        # its transaction, is what decides.
        exists = os.path.isfile(path)
        with ledger_lib.Ledger(path if exists else ":memory:", read_only=exists) as ledger:
            ledger.window_cost(spec.job, args.date, run_events(plan, spec), window)

    return accounting.record_calls(calls)


class Prefetch:
    def __init__(self, proc: subprocess.Popen):
        self.proc = proc

    def install(self, timeout: float = WAIT_SECONDS) -> int:
        """Waits for the helper and installs its results; returns how many (0 on any failure)."""
        from transforms import accounting
        try:
            out, _ = self.proc.communicate(timeout=timeout)
        except (subprocess.TimeoutExpired, OSError, ValueError):
            self.cancel()
            return 0
        if self.proc.returncode != 0 or not out:
            return 0
        try:
            results = pickle.loads(out)  # our own helper, same code, same user
        except Exception:  # noqa: BLE001 - a broken helper only means computing here
            return 0
        accounting.install_precomputed(results)
        return len(results)

    def cancel(self) -> None:
        """Stops the helper if it is still running (idempotent)."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()


def start(argv: list) -> Prefetch | None:
    """Starts the helper on the run's arguments (None if they cannot be read or it is disabled)."""
    if os.environ.get(DISABLE_ENV) == "1" or _parse(argv) is None:
        return None
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ)
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    try:
        proc = subprocess.Popen([sys.executable, "-m", "pipelines.prefetch", json.dumps(argv)],
                                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env)
    except OSError:
        return None
    return Prefetch(proc)


def main() -> int:
    argv = json.loads(sys.argv[1])
    results = _compute(argv)
    sys.stdout.buffer.write(pickle.dumps(results, protocol=pickle.HIGHEST_PROTOCOL))
    return 0


if __name__ == "__main__":
    sys.exit(main())
