"""Splits a run's (epsilon, delta) over outputs, metrics and partition selection.

The whole plan is computed on the launching machine before any data is read,
and frozen into the pipeline: workers never decide budgets. Shares are scaled
by (1 - 1e-9) so rounding can never make their sum exceed the run's budget.

Split rules (naive sequential composition):
- outputs share the run budget in proportion to ``budget_weight``;
- within an output, private partition selection takes ``selection.budget_fraction``
  (default: one metric's share, 1 / (n_metrics + 1) with equal weights) and the
  metrics share the rest by ``weight``; a metric made of several mechanisms
  (mean: count + normalized sum; variance: + normalized sum of squares) splits
  its share equally between them;
- delta: with Laplace noise all of an output's delta goes to its partition
  selection; with Gaussian noise delta is split like epsilon.

Sensitivities follow pipeline-dp's formulas (L1 = L0 * Linf, L2 = sqrt(L0) * Linf,
or L1 = L2 = C with a total cap C; the smaller of the two valid bounds is used
when both apply) and noise scales come from pipeline-dp/python-dp calibration.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Optional


from transforms import noise as noise_lib
from transforms.spec import Bounds, JobSpec, Metric, Output

SAFETY = 1.0 - 1e-9

COMPONENTS = {
    "count": ("count",),
    "privacy_id_count": ("privacy_id_count",),
    "sum": ("sum",),
    "mean": ("count", "normalized_sum"),
    "variance": ("count", "normalized_sum", "normalized_sum_of_squares"),
}


@dataclasses.dataclass(frozen=True)
class Mechanism:
    output: str
    metric: Optional[str]  # None for partition selection
    component: str  # count | privacy_id_count | sum | normalized_sum | ... | selection
    kind: str  # laplace | gaussian | truncated_geometric | laplace_thresholding | gaussian_thresholding
    epsilon: float
    delta: float
    l0: int
    linf: float
    l1: Optional[float] = None
    l2: Optional[float] = None
    noise: Optional[noise_lib.NoiseParams] = None

    @property
    def std(self) -> Optional[float]:
        return None if self.noise is None else self.noise.std

    def to_json(self) -> dict:
        d = {k: getattr(self, k) for k in ("output", "metric", "component", "kind", "epsilon", "delta",
                                              "l0", "linf", "l1", "l2")}
        if self.noise is not None:
            d["noise_scale"] = self.noise.scale
            d["noise_std"] = self.noise.std
            d["granularity"] = self.noise.granularity
        return d


@dataclasses.dataclass(frozen=True)
class OutputBudget:
    output: str
    epsilon: float
    delta: float
    selection: Optional[Mechanism]
    metrics: tuple  # ((metric name, (Mechanism, ...)), ...)

    def mechanisms(self) -> list:
        out = [self.selection] if self.selection is not None else []
        for _, mechs in self.metrics:
            out.extend(mechs)
        return out

    def metric(self, name: str) -> dict:
        for n, mechs in self.metrics:
            if n == name:
                return {m.component: m for m in mechs}
        raise KeyError(name)


@dataclasses.dataclass(frozen=True)
class BudgetPlan:
    epsilon: float
    delta: float
    outputs: tuple  # (OutputBudget, ...)

    def output(self, name: str) -> OutputBudget:
        for o in self.outputs:
            if o.output == name:
                return o
        raise KeyError(name)

    def mechanisms(self) -> list:
        return [m for o in self.outputs for m in o.mechanisms()]

    def spent(self) -> tuple[float, float]:
        """(epsilon, delta) under naive sequential composition."""
        mechs = self.mechanisms()
        return math.fsum(m.epsilon for m in mechs), math.fsum(m.delta for m in mechs)

    def to_json(self) -> dict:
        eps, delta = self.spent()
        return {"epsilon": self.epsilon, "delta": self.delta, "accountant": "naive",
                "spent_epsilon": eps, "spent_delta": delta,
                "mechanisms": [m.to_json() for m in self.mechanisms()]}


def _sensitivities(bounds: Bounds, per_row: float, distinct_units: bool) -> tuple[float, float]:
    """(L1, L2) of a per-partition statistic whose rows each move it by at most per_row."""
    l0 = bounds.max_partitions_contributed
    linf = 1 if distinct_units else bounds.max_contributions_per_partition
    # pipeline-dp's compute_l1_sensitivity / compute_l2_sensitivity (tests check they agree);
    # not imported: pipeline-dp's import pulls in Beam, dp_accounting and SciPy.
    l1 = l0 * (linf * per_row)
    l2 = math.sqrt(l0) * (linf * per_row)
    if bounds.max_contributions is not None:
        c = bounds.max_contributions
        l1 = min(l1, c * per_row)
        l2 = min(l2, (math.sqrt(c) if distinct_units else c) * per_row)
    return float(l1), float(l2)


def _component_per_row(metric: Metric, component: str) -> float:
    if component in ("count", "privacy_id_count"):
        return 1.0
    if component == "sum":
        return max(abs(metric.min_value), abs(metric.max_value))
    half = (metric.max_value - metric.min_value) / 2.0
    if component == "normalized_sum":
        return half
    if component == "normalized_sum_of_squares":
        return half * half
    raise ValueError(component)


def _metric_mechanisms(spec: JobSpec, output: Output, metric: Metric, eps: float, delta: float) -> tuple:
    comps = COMPONENTS[metric.type]
    e, d = eps / len(comps), delta / len(comps)
    mechs = []
    for comp in comps:
        per_row = _component_per_row(metric, comp)
        l1, l2 = _sensitivities(output.bounds, per_row, comp == "privacy_id_count")
        linf = per_row * (1 if comp == "privacy_id_count" else output.bounds.max_contributions_per_partition)
        if per_row == 0:  # e.g. sum with bounds [0, 0]: nothing to hide, still noise a zero
            l1 = l2 = 1e-12
        params = noise_lib.calibrate(spec.noise, e, d if spec.noise == "gaussian" else 0.0, l1, l2)
        mechs.append(Mechanism(output.name, metric.name, comp, spec.noise, e,
                               d if spec.noise == "gaussian" else 0.0,
                               output.bounds.max_partitions_contributed, linf, l1, l2, params))
    return tuple(mechs)


def plan_budget(spec: JobSpec) -> BudgetPlan:
    total_w = math.fsum(o.budget_weight for o in spec.outputs)
    outputs = []
    for o in spec.outputs:
        eps_o = spec.epsilon * o.budget_weight / total_w * SAFETY
        delta_o = spec.delta * o.budget_weight / total_w * SAFETY
        metric_w = math.fsum(m.weight for m in o.metrics)
        selection = None
        if o.selection.kind == "private":
            frac = o.selection.budget_fraction
            if frac is None:
                frac = (metric_w / len(o.metrics)) / (metric_w + metric_w / len(o.metrics))
            sel_eps = eps_o * frac
            sel_delta = delta_o if spec.noise == "laplace" else delta_o * frac
            selection = Mechanism(o.name, None, "selection", o.selection.strategy, sel_eps, sel_delta,
                                  o.bounds.max_partitions_touched, 1)
            eps_m_total = eps_o - sel_eps
            delta_m_total = delta_o - sel_delta
        else:
            eps_m_total, delta_m_total = eps_o, (delta_o if spec.noise == "gaussian" else 0.0)
        metrics = []
        for m in o.metrics:
            share = m.weight / metric_w
            metrics.append((m.name, _metric_mechanisms(spec, o, m, eps_m_total * share,
                                                       delta_m_total * share)))
        outputs.append(OutputBudget(o.name, eps_o, delta_o, selection, tuple(metrics)))
    plan = BudgetPlan(spec.epsilon, spec.delta, tuple(outputs))
    eps, delta = plan.spent()
    if eps > spec.epsilon or delta > spec.delta:  # cannot happen; a guard for future edits
        raise AssertionError(f"budget plan spends ({eps}, {delta}) > ({spec.epsilon}, {spec.delta})")
    return plan
