"""The sum of the budgets of all mechanisms of a run never exceeds the run's budget."""
import math

import pytest

from transforms.budget import plan_budget
from transforms.spec import load_spec, parse_spec


def _spec(noise="laplace", selection="private", eps=1.0, delta=1e-6, weights=(1.0, 3.0), total_cap=None):
    outputs = []
    for i, w in enumerate(weights):
        out = {"name": f"o{i}", "partition_keys": ["product_id"], "budget_weight": w,
               "bounds": {"max_partitions_contributed": 4, "max_contributions_per_partition": 2},
               "metrics": [{"name": "c", "type": "count"}, {"name": "p", "type": "privacy_id_count"},
                           {"name": "s", "type": "sum", "column": "price", "bounds": [-5, 20]},
                           {"name": "m", "type": "mean", "column": "price", "bounds": [0, 20], "weight": 2},
                           {"name": "v", "type": "variance", "column": "price", "bounds": [0, 20]}]}
        if total_cap:
            out["bounds"]["max_contributions"] = total_cap
        if selection == "public":
            out["selection"] = {"type": "public", "keys_file": "/dev/null"}
        outputs.append(out)
    return parse_spec({"job": "b", "budget": {"epsilon": eps, "delta": delta}, "noise": noise,
                       "outputs": outputs})


@pytest.mark.parametrize("noise", ["laplace", "gaussian"])
@pytest.mark.parametrize("selection", ["private", "public"])
@pytest.mark.parametrize("eps,delta", [(1.0, 1e-6), (0.1, 1e-9), (7.3, 1e-5)])
def test_budget_never_exceeds_total(noise, selection, eps, delta):
    spec = _spec(noise, selection, eps, delta)
    plan = plan_budget(spec)
    spent_eps, spent_delta = plan.spent()
    assert spent_eps <= eps and spent_delta <= delta
    assert spent_eps == pytest.approx(eps, rel=1e-6)  # nothing wasted
    if noise == "gaussian" or selection == "private":
        assert spent_delta == pytest.approx(delta, rel=1e-6)
    for m in plan.mechanisms():
        assert m.epsilon > 0
        if m.component != "selection":
            assert (m.delta > 0) == (noise == "gaussian")
            assert m.noise is not None and m.noise.std > 0


def test_weights_split_outputs_and_metrics():
    plan = plan_budget(_spec(weights=(1.0, 3.0), eps=4.0))
    assert plan.output("o1").epsilon == pytest.approx(3 * plan.output("o0").epsilon)
    o0 = plan.output("o0")
    mean_eps = sum(m.epsilon for m in o0.metric("m").values())
    assert mean_eps == pytest.approx(2 * o0.metric("c")["count"].epsilon)
    assert len(o0.metric("v")) == 3


def test_sensitivities_follow_pipeline_dp():
    o0 = plan_budget(_spec()).output("o0")
    count = o0.metric("c")["count"]
    assert (count.l1, count.l2) == (8.0, pytest.approx(2 * 2.0))   # L0*Linf, sqrt(L0)*Linf
    pid = o0.metric("p")["privacy_id_count"]
    assert (pid.l1, pid.l2) == (4.0, pytest.approx(2.0))
    s = o0.metric("s")["sum"]
    assert s.l1 == 8 * 20.0
    nsum = o0.metric("m")["normalized_sum"]
    assert nsum.l1 == 8 * 10.0
    sq = o0.metric("v")["normalized_sum_of_squares"]
    assert sq.l1 == 8 * 100.0
    # Laplace scale b = L1 / eps as python-dp computes it.
    assert count.noise.scale == pytest.approx(count.l1 / count.epsilon)
    assert count.noise.std == pytest.approx(math.sqrt(2) * count.l1 / count.epsilon)


def test_total_cap_tightens_sensitivity():
    o0 = plan_budget(_spec(total_cap=3)).output("o0")
    count = o0.metric("c")["count"]
    assert count.l1 == 3.0 and count.l2 == pytest.approx(min(4.0, 3.0))
    pid = o0.metric("p")["privacy_id_count"]
    assert pid.l1 == 3.0 and pid.l2 == pytest.approx(math.sqrt(3))
    assert o0.selection.l0 == 3


def test_default_spec_budget():
    spec = load_spec("configs/nightly.yaml")
    eps, delta = plan_budget(spec).spent()
    assert eps <= spec.epsilon and delta <= spec.delta


@pytest.mark.parametrize("l0", [1, 2, 3, 5, 10, 64])
@pytest.mark.parametrize("linf, per_row", [(1, 1.0), (2, 1.0), (5, 200.0), (3, 0.5)])
def test_sensitivities_are_pipeline_dps_exactly(l0, linf, per_row):
    from pipeline_dp import dp_computations as dpc
    from transforms.budget import _sensitivities
    from transforms.spec import Bounds
    l1, l2 = _sensitivities(Bounds(max_partitions_contributed=l0, max_contributions_per_partition=linf),
                            per_row, distinct_units=False)
    assert l1 == dpc.compute_l1_sensitivity(l0, linf * per_row)
    assert l2 == float(dpc.compute_l2_sensitivity(l0, linf * per_row))
