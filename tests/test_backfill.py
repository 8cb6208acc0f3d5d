"""`clickdp backfill`: dates in order, each charged to the ledger, stopping at the first refusal."""
import datetime
import os

import pytest
import yaml

from pipelines import cli, nightly
from transforms import generator
from transforms.ledger import Ledger

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
D1 = datetime.date(2026, 11, 20)
DAYS = [D1 + datetime.timedelta(days=i) for i in range(3)]


@pytest.fixture(scope="module")
def days_data(tmp_path_factory):
    base = tmp_path_factory.mktemp("backfill")
    for d in DAYS:
        generator.generate(str(base / "data" / d.isoformat()), n_users=200, n_events=2000, date=d, n_files=1)
    return base


def _spec(tmp_path, max_epsilon):
    spec = yaml.safe_load(open(os.path.join(ROOT, "configs", "nightly.yaml")))
    spec["ledger"]["max_epsilon"] = max_epsilon
    path = tmp_path / f"spec-{max_epsilon}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return str(path)


def _backfill(base, out, spec, start, end, *extra):
    return cli.main(["backfill", "--from", start.isoformat(), "--to", end.isoformat(), "--spec", spec,
                     "--input", str(base / "data" / "{date}" / "events"), "--output", str(out),
                     "--shards", "2", "--buckets", "2", *extra])


def test_backfill_runs_in_order_and_stops_at_the_first_refusal(days_data, tmp_path, capsys):
    out = tmp_path / "out"
    # One run costs 2.97 (PLD at 1e-5), two 5.5: a cap of 6 admits two of the three days.
    code = _backfill(days_data, out, _spec(tmp_path, 6), DAYS[0], DAYS[2])
    assert code == nightly.EXIT_REFUSED
    err = capsys.readouterr().err
    assert f"stopped at {DAYS[2]} (exit 4) after 2 of 3" in err and "max_epsilon 6" in err
    with Ledger(str(out) + "_quarantine/_ledger/ledger.sqlite", create=False) as led:
        rows = led.rows()
    assert [(r["date"], r["status"]) for r in rows] == [(DAYS[0].isoformat(), "released"),
                                                        (DAYS[1].isoformat(), "released")]
    assert rows[0]["released_at"] <= rows[1]["released_at"]  # in date order
    for d in DAYS[:2]:
        assert (out / "_manifests" / "nightly" / f"dt={d}.json").exists()
    assert not (out / "product_day" / f"dt={DAYS[2]}").exists()
    # With a larger cap, the same backfill again skips the released dates and does the third.
    code = _backfill(days_data, out, _spec(tmp_path, 34), DAYS[0], DAYS[2], "--skip-if-released")
    assert code == 0
    assert "3 date(s)" in capsys.readouterr().out
    with Ledger(str(out) + "_quarantine/_ledger/ledger.sqlite", create=False) as led:
        assert [r["status"] for r in led.rows()] == ["released"] * 3
        assert cli.verify_ledger(led)[0] == []


@pytest.mark.parametrize("start,end,message", [
    (DAYS[2], DAYS[0], "is after --to"),
    (DAYS[0], datetime.date(2999, 1, 1), "in the future"),
])
def test_bad_ranges_are_refused_before_anything_runs(days_data, tmp_path, capsys, start, end, message):
    out = tmp_path / "out"
    assert _backfill(days_data, out, _spec(tmp_path, 34), start, end) == nightly.EXIT_BAD_SPEC
    assert message in capsys.readouterr().err
    assert not out.exists() and not (tmp_path / "out_quarantine").exists()


def test_backfill_rejects_a_date_option(days_data, tmp_path, capsys):
    code = cli.main(["backfill", "--from", "2026-11-20", "--to", "2026-11-21", "--date", "2026-11-20",
                     "--input", "x", "--output", str(tmp_path / "o")])
    assert code == 2 and "--date" in capsys.readouterr().err
