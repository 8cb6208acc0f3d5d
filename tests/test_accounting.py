"""Within-run accounting with dp_accounting: reference numbers, PLD vs naive, PLD-calibrated plans.

No noise is drawn here: everything is deterministic accounting.
"""
import dataclasses
import json
import math

import dp_accounting
import pytest
from dp_accounting import pld as dp_pld

from transforms import accounting
from transforms.budget import plan_budget
from transforms.noise import calibrate_gaussian
from transforms.spec import load_spec, parse_spec


def _ev(kind, nm=None, eps=0.0, delta=0.0):
    ev = {"pld": kind, "epsilon": eps, "delta": delta}
    if nm is not None:
        ev["noise_multiplier"] = nm
    return ev


def _spec(noise="laplace", selection="private", eps=1.0, delta=1e-6, accountant="naive", n_outputs=2):
    outputs = []
    for i in range(n_outputs):
        out = {"name": f"o{i}", "partition_keys": ["product_id"], "budget_weight": i + 1,
               "bounds": {"max_partitions_contributed": 4, "max_contributions_per_partition": 2},
               "metrics": [{"name": "c", "type": "count"}, {"name": "p", "type": "privacy_id_count"},
                           {"name": "s", "type": "sum", "column": "price", "bounds": [0, 20]},
                           {"name": "m", "type": "mean", "column": "price", "bounds": [0, 20]}]}
        if selection == "public":
            out["selection"] = {"type": "public", "keys_file": "/dev/null"}
        outputs.append(out)
    return parse_spec({"job": "acc", "budget": {"epsilon": eps, "delta": delta}, "noise": noise,
                       "accountant": accountant, "outputs": outputs})


# -- reference numbers (REFERENCE_NUMBERS.md, dp-accounting 0.6.0) ------------------------------

def test_100_gaussians_sigma_10():
    events = [_ev("gaussian", 10.0)] * 100
    assert accounting.epsilon_pld(events, 1e-5) == pytest.approx(4.37718, abs=2e-5)


def test_10_laplace_b_1():
    events = [_ev("laplace", 1.0, eps=1.0)] * 10
    assert accounting.epsilon_pld(events, 1e-5) == pytest.approx(9.98996, abs=2e-5)
    assert accounting.epsilon_naive(events, 1e-5) == 10.0


def test_analytic_gaussian_delta_at_eps_1():
    assert accounting.delta_pld([_ev("gaussian", 3.730632)], 1.0) == pytest.approx(1e-5, rel=1e-3)
    # python-dp rounds sigma up (3.732421875): the calibrated mechanism is at least as private.
    params = calibrate_gaussian(1.0, 1e-5, 1.0)
    assert params.scale == pytest.approx(3.732421875)
    assert accounting.delta_pld([_ev("gaussian", params.scale)], 1.0) <= 1e-5


def test_matches_dp_accounting_pld_accountant():
    """Laplace/Gaussian events give what dp_accounting's own PLDAccountant gives for the DpEvents."""
    events = [_ev("laplace", 2.0), _ev("laplace", 2.0), _ev("gaussian", 5.0), _ev("laplace", 0.7)]
    acc = dp_pld.PLDAccountant()
    for ev in events:
        acc.compose(accounting.dp_event(ev))
    assert accounting.epsilon_pld(events, 1e-6) == pytest.approx(acc.get_epsilon(1e-6), rel=1e-6)
    assert isinstance(accounting.dp_event(_ev("privacy_parameters", eps=1, delta=1e-6)),
                      dp_accounting.UnsupportedDpEvent)


def test_privacy_parameters_event_is_the_eps_delta_pld():
    ev = _ev("privacy_parameters", eps=0.5, delta=1e-7)
    # A generic (eps, delta) mechanism is (eps, delta)-DP and no better at any smaller delta.
    assert accounting.epsilon_pld([ev], 2e-7) == pytest.approx(0.5, abs=2e-4)
    assert accounting.epsilon_pld([ev], 0.5e-7) == math.inf


# -- events of a plan ---------------------------------------------------------------------------

def test_events_cover_every_mechanism_including_truncated_geometric_selection():
    plan = plan_budget(_spec())
    events = accounting.mechanism_events(plan)
    assert len(events) == len(plan.mechanisms())
    json.loads(accounting.events_json(events))  # serializable
    sel = [e for e in events if e["component"] == "selection"]
    assert [e["mechanism"] for e in sel] == ["truncated_geometric", "truncated_geometric"]
    assert all(e["pld"] == "privacy_parameters" and e["delta"] > 0 for e in sel)
    for m, e in zip(plan.mechanisms(), events):
        if m.component != "selection":
            assert e["noise_multiplier"] == pytest.approx(m.noise.scale / m.l1)  # Laplace: b / L1
    # Selection is charged: without it the run would look cheaper.
    without = [e for e in events if e["component"] != "selection"]
    assert accounting.compose(without, plan.delta, "pld") < accounting.compose(events, plan.delta, "pld")


def test_gaussian_event_is_sigma_over_l2():
    plan = plan_budget(_spec(noise="gaussian"))
    for m, e in zip(plan.mechanisms(), accounting.mechanism_events(plan)):
        if m.component != "selection":
            assert e["pld"] == "gaussian" and e["noise_multiplier"] == pytest.approx(m.noise.scale / m.l2)


# -- PLD vs naive, and PLD-calibrated plans -----------------------------------------------------

@pytest.mark.parametrize("noise", ["laplace", "gaussian"])
@pytest.mark.parametrize("selection", ["private", "public"])
@pytest.mark.parametrize("eps,delta", [(1.0, 1e-6), (3.0, 1e-7), (0.3, 1e-9)])
def test_pld_never_worse_than_naive(noise, selection, eps, delta):
    plan = plan_budget(_spec(noise, selection, eps, delta))
    events = accounting.mechanism_events(plan)
    naive = accounting.compose(events, delta, "naive")
    pld = accounting.compose(events, delta, "pld")
    assert naive <= eps
    assert pld <= naive
    # The raw PLD bound is within its discretization (1e-4 per mechanism) of naive once the
    # selections' delta (its mass at infinity) leaves any slack at all.
    assert accounting.epsilon_pld(events, delta * 1.01) <= naive + len(events) * accounting.VALUE_DISCRETIZATION


@pytest.mark.parametrize("noise,eps,delta,gain", [("gaussian", 1.0, 1e-6, True), ("laplace", 0.5, 1e-6, True),
                                                   ("laplace", 3.0, 1e-7, False)])
def test_pld_calibrated_plan_meets_the_run_budget(noise, eps, delta, gain):
    spec = _spec(noise, "private", eps, delta, accountant="pld", n_outputs=3)
    plan = accounting.plan_for_spec(spec)
    _, k = accounting.calibrate_pld_plan(spec)
    events = accounting.mechanism_events(plan)
    assert accounting.compose(events, delta, "pld") <= eps
    assert accounting.run_epsilon(plan, "pld") <= eps
    naive_plan = plan_budget(spec)
    if not gain:  # few Laplace mechanisms at a large epsilon: PLD gains < 1%, keep the naive plan
        assert k == 1.0 and plan.mechanisms() == naive_plan.mechanisms()
        return
    assert k > 1.05
    eps_sum, delta_sum = accounting.naive_spent(events)
    assert eps_sum > 1.05 * eps and delta_sum <= delta  # more epsilon per mechanism, same guarantee
    for m, n in zip(plan.mechanisms(), naive_plan.mechanisms()):
        assert m.epsilon == pytest.approx(n.epsilon * k)
        if m.noise is not None:  # less noise; Laplace exactly 1/k of it
            assert m.noise.std < n.noise.std
            if noise == "laplace":
                assert m.noise.std == pytest.approx(n.noise.std / k)
    for o in plan.outputs:  # each output alone is reported at the run's delta
        assert 0 < o.epsilon <= eps and o.delta == delta


def test_calibration_falls_back_when_pld_cannot_help():
    spec = _spec("laplace", "public", 1.0, 0.0, accountant="pld")
    assert accounting.plan_for_spec(spec) == plan_budget(spec)


def test_huge_epsilon_does_not_build_a_huge_pld():
    events = [_ev("laplace", 1e-5, eps=1e5)] * 3  # epsilon 1e5 (test specs): 2e9 grid points
    assert not accounting.pld_feasible(events)
    assert accounting.compose(events, 1e-6, "pld") == 3e5


def test_report_has_both_accountants_and_every_mechanism():
    spec = load_spec("configs/nightly.yaml")
    plan = accounting.plan_for_spec(spec)
    rep = accounting.report(plan, spec.accountant)
    assert rep["accountant"] == spec.accountant
    assert set(rep["epsilon_at_delta"]) == {"naive", "pld"}
    assert rep["epsilon_at_delta"]["pld"] <= rep["epsilon_at_delta"]["naive"] <= spec.epsilon
    assert rep["spent_epsilon"] <= spec.epsilon
    assert len(rep["mechanisms"]) == len(plan.mechanisms())
    assert all("epsilon" in m and "dp_event" in m for m in rep["mechanisms"])
    json.dumps(rep)


def test_default_spec_window_composes_under_the_ledger_cap():
    """The default ledger cap admits the nightly schedule: 30 runs in a 30-day window."""
    spec = load_spec("configs/nightly.yaml")
    events = accounting.mechanism_events(accounting.plan_for_spec(spec))
    cfg = spec.ledger
    month = accounting.compose_runs([events] * cfg.window_days, cfg.delta, spec.ledger_accountant)
    assert month <= cfg.max_epsilon
    assert accounting.compose_runs([events] * (cfg.window_days + 3), cfg.delta, "pld") > cfg.max_epsilon
    assert accounting.compose_runs([events] * cfg.window_days, cfg.delta, "naive") > 2 * cfg.max_epsilon
    # Grouping runs is only an optimization: same as composing every event.
    assert accounting.compose(events * 3, cfg.delta, "pld") == pytest.approx(
        accounting.compose_runs([events] * 3, cfg.delta, "pld"), abs=1e-6)


def test_scale_plan_keeps_structure():
    spec = _spec()
    plan = plan_budget(spec)
    scaled = accounting.scale_plan(plan, 2.0, epsilon=spec.epsilon, delta=spec.delta)
    for a, b in zip(plan.mechanisms(), scaled.mechanisms()):
        assert b.epsilon == pytest.approx(2 * a.epsilon) and b.delta == a.delta
        assert (a.output, a.metric, a.component, a.kind, a.l1, a.l2) == (b.output, b.metric, b.component,
                                                                          b.kind, b.l1, b.l2)
        if a.noise is not None:
            assert b.noise.scale == pytest.approx(a.noise.scale / 2)  # Laplace b = L1 / eps
    assert dataclasses.replace(scaled, outputs=()).epsilon == spec.epsilon
