"""Job spec validation: bad specs fail before launch with a message naming the field."""
import copy

import pytest
import yaml

from transforms.budget import plan_budget
from transforms.spec import SpecError, load_spec, parse_spec

BASE = {
    "job": "t",
    "budget": {"epsilon": 1.0, "delta": 1e-6},
    "noise": "laplace",
    "contribution_bounds": {"max_partitions_contributed": 2, "max_contributions_per_partition": 1},
    "outputs": [{
        "name": "o",
        "partition_keys": ["product_id"],
        "metrics": [
            {"name": "n", "type": "count"},
            {"name": "s", "type": "sum", "column": "price", "bounds": [0, 10]},
        ],
    }],
}


def _with(path, value):
    raw = copy.deepcopy(BASE)
    node = raw
    for p in path[:-1]:
        node = node[p]
    if value is KeyError:
        del node[path[-1]]
    else:
        node[path[-1]] = value
    return raw


def test_default_spec_is_valid_and_within_budget():
    spec = load_spec("configs/nightly.yaml")
    eps, delta = plan_budget(spec).spent()
    assert eps <= spec.epsilon and delta <= spec.delta
    names = {o.name for o in spec.outputs}
    assert {"product_day", "category_day"} <= names
    product = spec.output("product_day")
    assert {m.name for m in product.metrics} >= {"views", "add_to_carts", "purchases", "distinct_buyers",
                                                 "revenue", "mean_price"}
    assert {m.name for m in spec.output("category_day").metrics} >= {"events", "distinct_users", "revenue"}


@pytest.mark.parametrize("path,value,field", [
    (("budget", "epsilon"), 0, "budget.epsilon"),
    (("budget", "epsilon"), -1, "budget.epsilon"),
    (("budget", "epsilon"), "big", "budget.epsilon"),
    (("budget", "delta"), 1.0, "budget.delta"),
    (("budget", "delta"), 1.5, "budget.delta"),
    (("noise",), "cauchy", "noise"),
    (("outputs", 0, "metrics", 1, "bounds"), [5, 1], "outputs[0].metrics[1].bounds"),
    (("outputs", 0, "metrics", 1, "column"), "nope", "outputs[0].metrics[1].column"),
    (("outputs", 0, "metrics", 1, "column"), KeyError, "outputs[0].metrics[1].column"),
    (("outputs", 0, "metrics", 0, "type"), "median", "outputs[0].metrics[0].type"),
    (("outputs", 0, "partition_keys"), ["user_id"], "outputs[0].partition_keys"),
    (("outputs", 0, "partition_keys"), ["colour"], "outputs[0].partition_keys"),
    (("contribution_bounds", "max_partitions_contributed"), 0, "contribution_bounds.max_partitions_contributed"),
    (("contribution_bounds", "max_contributions_per_partition"), 0,
     "contribution_bounds.max_contributions_per_partition"),
    (("outputs", 0, "metrics", 0, "filter"), "event_type == clicked", "outputs[0].metrics[0].filter"),
    (("outputs", 0, "metrics", 0, "filter"), "event_type ~ x", "outputs[0].metrics[0].filter"),
    (("outputs", 0, "selection"), {"type": "public"}, "outputs[0].selection.keys_file"),
    (("outputs", 0, "selection"), {"type": "private", "strategy": "magic"}, "outputs[0].selection.strategy"),
    (("outputs", 0, "surprise"), 1, "outputs[0].surprise"),
    (("outputs",), [], "outputs"),
    (("accountant",), "rdp", "accountant"),
    (("job",), "Bad Name", "job"),
])
def test_bad_spec_names_field(path, value, field):
    with pytest.raises(SpecError) as exc:
        parse_spec(_with(path, value))
    assert exc.value.field == field
    assert str(exc.value).startswith(field + ":")


def test_gaussian_needs_delta():
    raw = _with(("noise",), "gaussian")
    raw["budget"]["delta"] = 0
    with pytest.raises(SpecError) as exc:
        parse_spec(raw)
    assert exc.value.field == "budget.delta"


def test_private_selection_needs_delta():
    with pytest.raises(SpecError) as exc:
        parse_spec(_with(("budget", "delta"), 0))
    assert exc.value.field == "budget.delta" and "private partition selection" in str(exc.value)


def test_public_selection_with_zero_delta_is_fine(tmp_path):
    keys = tmp_path / "keys.txt"
    keys.write_text("a\nb\n")
    raw = _with(("budget", "delta"), 0)
    raw["outputs"][0]["selection"] = {"type": "public", "keys_file": "keys.txt"}
    spec = parse_spec(raw, base_dir=str(tmp_path))
    assert spec.output("o").selection.keys_file == str(keys)
    assert plan_budget(spec).spent()[1] == 0


def test_load_spec_errors(tmp_path):
    with pytest.raises(SpecError, match="not found"):
        load_spec(str(tmp_path / "missing.yaml"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("job: [unclosed")
    with pytest.raises(SpecError, match="not valid YAML"):
        load_spec(str(bad))
    ok = tmp_path / "ok.yaml"
    ok.write_text(yaml.safe_dump(BASE))
    assert load_spec(str(ok)).job == "t"


def test_spec_hash_changes_with_content():
    a = parse_spec(BASE).spec_hash
    b = parse_spec(_with(("budget", "epsilon"), 2.0)).spec_hash
    assert a != b and a == parse_spec(copy.deepcopy(BASE)).spec_hash
