"""Privacy accounting of a run and of a ledger window, with dp_accounting directly.

A run is a sequence of mechanisms on the same privacy units (one shopper's events
of one day): every output's partition selection and every noisy component of
every metric. Each becomes one JSON-serializable *event*:

    laplace   noise_multiplier = b / L1        (dp_accounting.LaplaceDpEvent)
    gaussian  noise_multiplier = sigma / L2    (dp_accounting.GaussianDpEvent)
    privacy_parameters  (epsilon, delta)       partition selection (truncated geometric,
                                               Laplace or Gaussian thresholding) as the
                                               generic (eps, delta) PLD, which dominates
                                               any (eps, delta)-DP mechanism

pipeline-dp's own PLD accountant skips truncated-geometric selection; we do not
use it. Every event also keeps the (epsilon, delta) it was planned with, so the
same list composes under either accountant:

- ``naive``: sequential composition, (sum eps, sum delta);
- ``pld``: privacy loss distributions (dp_accounting.pld, pessimistic estimates,
  add-or-remove-one neighbouring relation), epsilon at a given delta. Both are valid
  upper bounds, so the ``pld`` accountant reports the smaller of the two (PLD
  discretization can cost ~1e-4 per mechanism when a plan leaves no delta slack).

With ``accountant: pld`` the run's plan is calibrated by :func:`calibrate_pld_plan`:
the naive split of ``plan_budget`` (computed at ``(1 - PLD_DELTA_SLACK) * delta``)
gets one common factor ``k >= 1`` on every mechanism's epsilon, found by bisection,
so that the PLD composition of the whole run meets the run's (epsilon, delta). The
noise scales are recalibrated by pipeline-dp/python-dp for the scaled epsilons: less
noise for the same guarantee.
"""
from __future__ import annotations

import collections
import copy
import dataclasses
import functools
import json
import math
from typing import TYPE_CHECKING, Iterable, Optional, Sequence

if TYPE_CHECKING:  # imported lazily below: dp_accounting and pipeline-dp take seconds to import,
    from transforms.budget import BudgetPlan, Mechanism  # and the ledger's naive path needs neither
    from transforms.spec import JobSpec

ACCOUNTANTS = ("naive", "pld")
#: dp_accounting's default discretization of privacy losses.
VALUE_DISCRETIZATION = 1e-4
#: With ``accountant: pld``, the share of the run's delta left to the PLD composition
#: (the tails of Laplace/Gaussian losses); the rest goes to partition selection and to
#: the Gaussian calibration as in the naive plan.
PLD_DELTA_SLACK = 0.5
#: Bisection stops when the scale factor is known to this relative precision.
_SCALE_PRECISION = 1e-3
_MAX_SCALE = 1024.0
#: The bisection runs on this coarser grid (10x faster); the result is verified on the fine one.
_SEARCH_DISCRETIZATION = 1e-3
#: Below this many identical events, plain convolutions are faster than self_compose.
_SELF_COMPOSE_FROM = 4
#: Largest PLD grid computed (4e6 points: ~32 MB per array, a composed epsilon of ~400).
MAX_PLD_POINTS = 4_000_000
#: Smallest gain (relative epsilon per mechanism) worth giving up half of delta for.
MIN_GAIN = 0.01


# --------------------------------------------------------------------------------------
# Results computed ahead (pipelines/prefetch.py)
# --------------------------------------------------------------------------------------

# {call key: result} of calls computed by a helper process while this one imports Beam.
_PRECOMPUTED: dict = {}
# While not None, the results of prefetchable calls are recorded here (in the helper).
_RECORDING: Optional[dict] = None


def _call_key(name: str, args: tuple) -> str:
    # repr of the arguments (floats repr exactly): a hit needs identical inputs.
    return f"{name}{args!r}"


def prefetchable(fn):
    """A pure accounting call whose result may come from :func:`install_precomputed`.

    A call is answered from there only when its arguments are identical (same repr) to
    the ones the result was computed for; otherwise it is computed here, as always."""
    @functools.wraps(fn)
    def call(*args):
        key = _call_key(fn.__name__, args)
        if key in _PRECOMPUTED:
            return copy.deepcopy(_PRECOMPUTED[key])
        result = fn(*args)
        if _RECORDING is not None:
            _RECORDING[key] = copy.deepcopy(result)
        return result
    return call


def install_precomputed(results: dict) -> None:
    _PRECOMPUTED.update(results)


def clear_precomputed() -> None:
    _PRECOMPUTED.clear()


def record_calls(run) -> dict:
    """Runs ``run()`` and returns the results of the prefetchable calls it made."""
    global _RECORDING
    _RECORDING = {}
    try:
        run()
        return _RECORDING
    finally:
        _RECORDING = None


# --------------------------------------------------------------------------------------
# Events
# --------------------------------------------------------------------------------------


def mechanism_event(m: Mechanism) -> dict:
    """One JSON-serializable record describing a mechanism's privacy loss."""
    ev = {"output": m.output, "metric": m.metric, "component": m.component, "mechanism": m.kind,
          "epsilon": float(m.epsilon), "delta": float(m.delta)}
    if m.component == "selection":
        ev["pld"] = "privacy_parameters"
    elif m.kind == "laplace":
        ev["pld"] = "laplace"
        ev["noise_multiplier"] = float(m.noise.scale / m.l1)
    elif m.kind == "gaussian":
        ev["pld"] = "gaussian"
        ev["noise_multiplier"] = float(m.noise.scale / m.l2)
    else:  # pragma: no cover - budget.py only plans the kinds above
        raise ValueError(f"no accounting for mechanism kind {m.kind!r}")
    return ev


def mechanism_events(plan: BudgetPlan) -> list:
    """One event per mechanism of the plan, in plan order."""
    return [mechanism_event(m) for m in plan.mechanisms()]


def dp_event(ev: dict):
    """The dp_accounting DpEvent of an event (selection has none: UnsupportedDpEvent)."""
    import dp_accounting
    if ev["pld"] == "laplace":
        return dp_accounting.LaplaceDpEvent(ev["noise_multiplier"])
    if ev["pld"] == "gaussian":
        return dp_accounting.GaussianDpEvent(ev["noise_multiplier"])
    return dp_accounting.UnsupportedDpEvent()


def _event_key(ev: dict) -> tuple:
    if ev["pld"] in ("laplace", "gaussian"):
        return ev["pld"], float(ev["noise_multiplier"])
    if ev["pld"] != "privacy_parameters":
        raise ValueError(f"unknown event type {ev.get('pld')!r}")
    return "privacy_parameters", float(ev["epsilon"]), float(ev["delta"])


@functools.lru_cache(maxsize=4096)
def _pld(key: tuple, vdi: float = VALUE_DISCRETIZATION):
    from dp_accounting.pld import common as pld_common
    from dp_accounting.pld import privacy_loss_distribution as pld_lib
    kind = key[0]
    if kind == "laplace":
        return pld_lib.from_laplace_mechanism(key[1], value_discretization_interval=vdi)
    if kind == "gaussian":
        return pld_lib.from_gaussian_mechanism(key[1], value_discretization_interval=vdi)
    return pld_lib.from_privacy_parameters(pld_common.DifferentialPrivacyParameters(key[1], key[2]),
                                          value_discretization_interval=vdi)


# --------------------------------------------------------------------------------------
# Composition
# --------------------------------------------------------------------------------------


def naive_spent(events: Iterable[dict]) -> tuple[float, float]:
    """(sum of epsilons, sum of deltas): sequential composition."""
    events = list(events)
    return math.fsum(e["epsilon"] for e in events), math.fsum(e["delta"] for e in events)


def epsilon_naive(events: Iterable[dict], delta: float) -> float:
    """Smallest epsilon naive composition proves at ``delta`` (inf if the deltas exceed it)."""
    eps, spent_delta = naive_spent(events)
    return eps if spent_delta <= delta else math.inf


def _loss_range(key: tuple) -> float:
    """Rough width of the privacy-loss support of one event (what the PLD grid must cover)."""
    if key[0] == "laplace":
        return 1.0 / key[1]
    if key[0] == "gaussian":  # losses up to ~10 sigma out, as dp_accounting truncates
        return 10.0 / key[1] + 0.5 / key[1] ** 2
    return key[1]


def pld_feasible(events: Iterable[dict], vdi: float = VALUE_DISCRETIZATION) -> bool:
    """False when the composed PLD would need more than MAX_PLD_POINTS grid points (huge
    epsilons, e.g. test specs at epsilon 1e5): PLD accounting is then skipped (naive is used;
    at such epsilons PLD gains nothing that matters)."""
    total = math.fsum(_loss_range(_event_key(e)) for e in events)
    return total / vdi <= MAX_PLD_POINTS


def composed_pld(events: Iterable[dict], vdi: float = VALUE_DISCRETIZATION):
    """The PLD of the composition of the events, or None for no events. Identical events
    are self-composed (FFT), so a window of days run with one spec costs a few convolutions."""
    groups = collections.Counter(_event_key(e) for e in events)
    total = None
    for key, n in sorted(groups.items()):
        p = _pld(key, vdi)
        if n > _SELF_COMPOSE_FROM:
            p = p.self_compose(n)
        else:
            for _ in range(n - 1):
                p = p.compose(_pld(key, vdi))
        total = p if total is None else total.compose(p)
    return total


def epsilon_pld(events: Iterable[dict], delta: float, vdi: float = VALUE_DISCRETIZATION) -> float:
    """Epsilon at ``delta`` of the PLD composition of the events (pessimistic estimate);
    inf if the composition is too large to compute (see :func:`pld_feasible`)."""
    events = list(events)
    if not pld_feasible(events, vdi):
        return math.inf
    total = composed_pld(events, vdi)
    return 0.0 if total is None else float(total.get_epsilon_for_delta(delta))


@prefetchable
def compose_runs(runs: Sequence[Sequence[dict]], delta: float, accountant: str) -> float:
    """Like :func:`compose` on all events of several runs, faster for a ledger window:
    runs with identical events (nights of one spec) are composed once, then self-composed."""
    runs = [list(r) for r in runs]
    events = [e for r in runs for e in r]
    naive = epsilon_naive(events, delta)
    if accountant == "naive":
        return naive
    if accountant != "pld":
        raise ValueError(f"accountant must be one of {ACCOUNTANTS}, got {accountant!r}")
    if not events or not pld_feasible(events):
        return min(naive, 0.0 if not events else math.inf)
    groups = collections.Counter(tuple(sorted(_event_key(e) for e in r)) for r in runs if r)
    total = None
    for keys, n in sorted(groups.items()):
        p = _runs_pld(keys, n)
        total = p if total is None else total.compose(p)
    return min(naive, float(total.get_epsilon_for_delta(delta)))


@functools.lru_cache(maxsize=64)
def _runs_pld(keys: tuple, n: int):
    """PLD of n runs with the events ``keys`` (cached: nightly ledger checks repeat them)."""
    p = composed_pld([_key_event(k) for k in keys])
    return p.self_compose(n) if n > 1 else p


def _key_event(key: tuple) -> dict:
    if key[0] == "privacy_parameters":
        return {"pld": key[0], "epsilon": key[1], "delta": key[2]}
    return {"pld": key[0], "noise_multiplier": key[1], "epsilon": 0.0, "delta": 0.0}


def delta_pld(events: Iterable[dict], epsilon: float) -> float:
    """Delta at ``epsilon`` of the PLD composition of the events (pessimistic estimate)."""
    total = composed_pld(events)
    return 0.0 if total is None else float(total.get_delta_for_epsilon(epsilon))


@prefetchable
def compose(events: Sequence[dict], delta: float, accountant: str) -> float:
    """Epsilon at ``delta`` of the composition of ``events`` under ``accountant``.

    ``pld`` returns min(PLD, naive): both are valid bounds on the same mechanisms.
    """
    events = list(events)
    naive = epsilon_naive(events, delta)
    if accountant == "naive":
        return naive
    if accountant != "pld":
        raise ValueError(f"accountant must be one of {ACCOUNTANTS}, got {accountant!r}")
    return min(naive, epsilon_pld(events, delta))


# --------------------------------------------------------------------------------------
# Plans
# --------------------------------------------------------------------------------------


def _scaled_mechanism(m: Mechanism, k: float) -> Mechanism:
    from transforms import noise as noise_lib
    eps = m.epsilon * k
    if m.noise is None:  # partition selection: its (eps, delta) is used directly
        return dataclasses.replace(m, epsilon=eps)
    params = noise_lib.calibrate(m.kind, eps, m.delta, m.l1, m.l2)
    return dataclasses.replace(m, epsilon=eps, noise=params)


def scale_plan(plan: BudgetPlan, k: float, *, epsilon: float, delta: float) -> BudgetPlan:
    """The plan with every mechanism's epsilon multiplied by ``k`` (noise recalibrated).

    Output-level epsilon/delta are set to the outputs' naive sums; call
    :func:`annotate_outputs` for their PLD values."""
    from transforms.budget import BudgetPlan, OutputBudget
    outputs = []
    for o in plan.outputs:
        sel = _scaled_mechanism(o.selection, k) if o.selection is not None else None
        metrics = tuple((name, tuple(_scaled_mechanism(m, k) for m in mechs)) for name, mechs in o.metrics)
        ob = OutputBudget(o.output, 0.0, 0.0, sel, metrics)
        e, d = naive_spent(mechanism_event(m) for m in ob.mechanisms())
        outputs.append(dataclasses.replace(ob, epsilon=e, delta=d))
    return BudgetPlan(epsilon, delta, tuple(outputs))


def annotate_outputs(plan: BudgetPlan, accountant: str) -> BudgetPlan:
    """Sets each output's (epsilon, delta) to what ``accountant`` proves for that output
    alone at the run's delta (with ``naive``: the sums of its mechanisms)."""
    if accountant == "naive":
        return plan
    outputs = []
    for o in plan.outputs:
        events = [mechanism_event(m) for m in o.mechanisms()]
        outputs.append(dataclasses.replace(o, epsilon=compose(events, plan.delta, "pld"), delta=plan.delta))
    return dataclasses.replace(plan, outputs=tuple(outputs))


def calibrate_pld_plan(spec: JobSpec) -> tuple[BudgetPlan, float]:
    """(plan, k): the naive plan scaled by the largest k (to ``_SCALE_PRECISION``) whose PLD
    composition is <= the run's (epsilon, delta). Falls back to the naive plan (k = 1)
    when scaling gains less than ``MIN_GAIN`` (e.g. delta = 0, or a few Laplace mechanisms:
    PLD composition only beats the sum with many mechanisms or with Gaussian noise)."""
    from transforms.budget import plan_budget
    naive_plan = plan_budget(spec)
    if spec.delta <= 0:
        return naive_plan, 1.0
    base = plan_budget(dataclasses.replace(spec, delta=spec.delta * (1.0 - PLD_DELTA_SLACK)))

    def cost(k: float, vdi: float = _SEARCH_DISCRETIZATION) -> float:
        plan = scale_plan(base, k, epsilon=spec.epsilon, delta=spec.delta)
        return epsilon_pld(mechanism_events(plan), spec.delta, vdi)

    # Scaling must gain at least MIN_GAIN, else the naive plan (all of delta to selection) is better.
    floor = 1.0 + MIN_GAIN
    if cost(floor) > spec.epsilon:
        return naive_plan, 1.0
    lo, hi = floor, 2.0
    while hi <= _MAX_SCALE and cost(hi) <= spec.epsilon:
        lo, hi = hi, hi * 2.0
    while hi / lo > 1.0 + _SCALE_PRECISION and hi <= _MAX_SCALE:
        mid = math.sqrt(lo * hi)
        if cost(mid) <= spec.epsilon:
            lo = mid
        else:
            hi = mid
    # The decision is made on the fine grid, which is what every report uses.
    while cost(lo, VALUE_DISCRETIZATION) > spec.epsilon:
        lo /= 1.0 + _SCALE_PRECISION
        if lo < floor:
            return naive_plan, 1.0
    return scale_plan(base, lo, epsilon=spec.epsilon, delta=spec.delta), lo


@prefetchable
def plan_for_spec(spec: JobSpec) -> BudgetPlan:
    """The run's frozen budget plan under the spec's accountant."""
    if spec.accountant == "pld":
        plan, _ = calibrate_pld_plan(spec)
        return annotate_outputs(plan, "pld")
    from transforms.budget import plan_budget
    return plan_budget(spec)


def run_epsilon(plan: BudgetPlan, accountant: str) -> float:
    """Epsilon of the whole run at the run's delta under ``accountant``."""
    return compose(mechanism_events(plan), plan.delta, accountant)


@prefetchable
def report(plan: BudgetPlan, accountant: str) -> dict:
    """What the run summary and the manifest say about the run's privacy."""
    events = mechanism_events(plan)
    naive_eps, naive_delta = naive_spent(events)
    eps_naive = epsilon_naive(events, plan.delta)
    eps_pld = compose(events, plan.delta, "pld")
    spent = eps_pld if accountant == "pld" else eps_naive
    mechs = []
    for m, ev in zip(plan.mechanisms(), events):
        d = m.to_json()
        d["dp_event"] = {k: v for k, v in ev.items() if k in ("pld", "noise_multiplier")}
        mechs.append(d)
    return {
        "epsilon": plan.epsilon, "delta": plan.delta, "accountant": accountant,
        "spent_epsilon": spent, "spent_delta": plan.delta if accountant == "pld" else naive_delta,
        "epsilon_at_delta": {"naive": _finite(eps_naive), "pld": _finite(eps_pld)},
        "naive_sum": {"epsilon": naive_eps, "delta": naive_delta},
        "mechanisms": mechs,
    }


def _finite(x: float) -> Optional[float]:
    return None if math.isinf(x) else x


def events_json(events: Sequence[dict]) -> str:
    return json.dumps(list(events), sort_keys=True)
