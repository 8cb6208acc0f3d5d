"""Loads deploy/airflow/clickdp_nightly_dag.py with a real Airflow and checks it.

    .venv-airflow/bin/python deploy/airflow/check_dag.py [--clickdp-python .venv/bin/python]

(`make airflow-check` builds .venv-airflow and runs this.) Checks, in order:
 1. DagBag loads the file with no import errors; the DAG and its task exist.
 2. The task is the Apache Beam provider's BeamRunPythonPipelineOperator; retries > 0,
    max_active_runs == 1, catchup on, a data-interval timetable whose first run's {{ ds }}
    is the start day.
 3. Templates render (StrictUndefined) for a logical date, with Variables unset (defaults)
    and set; --date is that day; --force-rerelease is never passed.
 4. The operator's own execute() builds the command it would run (the provider's
    run_beam_command is replaced by a recorder, nothing is started): the interpreter, the
    script, and --runner resolving to Beam's DataflowRunner while the provider stays out
    of its Dataflow mode (see the DAG's docstring).
 5. With --clickdp-python: that exact argument list is parsed by clickdp's own argument
    parser and Beam's PipelineOptions in the project's environment (nothing is dropped as
    unparseable; Beam sees DataflowRunner, project, region, locations, setup file, job
    name), and `python pipelines/nightly.py --help` runs as the provider would start it.
Exits non-zero on the first failed check.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
DAG_FILE = os.path.join(HERE, "clickdp_nightly_dag.py")
DAY = "2026-12-02"


def check(cond, message):
    if not cond:
        print(f"FAIL: {message}", file=sys.stderr)
        sys.exit(1)
    print(f"ok: {message}")


class _Vars:
    """Stands in for Airflow's `var.value` accessor in a template context."""

    def __init__(self, values):
        self.values = values

    def get(self, name, default=None):
        return self.values.get(name, default)


def _context(variables):
    ds_nodash = DAY.replace("-", "")
    return {"ds": DAY, "ds_nodash": ds_nodash, "var": {"value": _Vars(variables)}}


def _rendered(task, dag, variables):
    env = dag.get_template_env()
    ctx = _context(variables)
    return {f: task.render_template(getattr(task, f), ctx, env) for f in ("py_file", "runner", "pipeline_options")}


def _command(task, rendered):
    """The argv the provider would start, recorded instead of run."""
    from airflow.providers.apache.beam.hooks import beam as beam_hooks
    recorded = []
    real = beam_hooks.run_beam_command
    beam_hooks.run_beam_command = lambda cmd, **kwargs: recorded.append(list(cmd))
    saved = {f: getattr(task, f) for f in rendered}
    try:
        for f, v in rendered.items():
            setattr(task, f, v)
        task.execute(context={})
    finally:
        beam_hooks.run_beam_command = real
        for f, v in saved.items():
            setattr(task, f, v)
    check(len(recorded) == 1, "the operator starts exactly one process")
    return recorded[0], task


_PARSE = r"""
import argparse, json, logging, sys
records = []
class H(logging.Handler):
    def emit(self, r):
        records.append(r.getMessage())
logging.getLogger().addHandler(H())
from pipelines import nightly
from apache_beam.options.pipeline_options import PipelineOptions
p = argparse.ArgumentParser()
nightly.add_arguments(p)
args, beam_args = p.parse_known_args(sys.argv[1:])
opts = PipelineOptions(beam_args).get_all_options(retain_unknown_options=False)
print(json.dumps({
    "clickdp": {k: (v.isoformat() if hasattr(v, "isoformat") else v) for k, v in vars(args).items()},
    "beam": {k: opts.get(k) for k in ("runner", "project", "region", "temp_location", "staging_location",
                                      "setup_file", "job_name", "labels", "service_account_email")},
    "discarded": [m for m in records if "Discarding" in m or "unparseable" in m.lower()],
}))
"""


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--clickdp-python", help="a Python with clickstream-dp installed (e.g. .venv/bin/python)")
    opts = ap.parse_args()
    t0 = time.time()

    home = tempfile.mkdtemp(prefix="clickdp-airflow-home-")
    os.environ["AIRFLOW_HOME"] = home
    os.environ["AIRFLOW__CORE__LOAD_EXAMPLES"] = "False"
    os.environ["AIRFLOW__CORE__DAGS_FOLDER"] = HERE
    # The provider asks this interpreter for Beam's version before starting the pipeline;
    # here it is this (Airflow's) Python, which has apache-beam through the provider.
    os.environ["CLICKDP_PYTHON"] = sys.executable

    import airflow
    from airflow.providers.apache.beam.operators.beam import (
        BeamRunPythonPipelineOperator,
    )
    try:
        from airflow.dag_processing.dagbag import DagBag  # Airflow 3
    except ImportError:
        from airflow.models.dagbag import DagBag  # Airflow 2
    from apache_beam.runners.runner import create_runner

    print(f"airflow {airflow.__version__}")
    bag = DagBag(dag_folder=DAG_FILE, include_examples=False) if "include_examples" in \
        DagBag.__init__.__code__.co_varnames else DagBag(dag_folder=DAG_FILE)
    check(not bag.import_errors, f"DagBag loads {os.path.relpath(DAG_FILE, REPO)} without import errors "
                                 f"{bag.import_errors or ''}")
    check("clickdp_nightly" in bag.dags, "DAG clickdp_nightly exists")
    dag = bag.dags["clickdp_nightly"]
    check([t.task_id for t in dag.tasks] == ["release"], "one task: release")
    task = dag.get_task("release")
    check(isinstance(task, BeamRunPythonPipelineOperator),
          f"task is BeamRunPythonPipelineOperator ({type(task).__module__}.{type(task).__name__})")
    check(task.retries and task.retries > 0, f"retries > 0 ({task.retries}, every {task.retry_delay})")
    check(dag.max_active_runs == 1, "max_active_runs == 1")
    check(dag.catchup is True, "catchup is on (backfill)")
    tt = dag.timetable
    check(type(tt).__name__ == "CronDataIntervalTimetable",
          f"data-interval timetable ({type(tt).__name__} {getattr(tt, 'expression', '')!r} {tt.timezone})")
    # The scheduler's view: the first run covers [start day 03:00, next day 03:00), so its
    # {{ ds }} is the start day and it runs once that day is over.
    from airflow.timetables.base import TimeRestriction
    from airflow.timetables.interval import CronDataIntervalTimetable as CoreTimetable
    core = CoreTimetable(getattr(tt, "expression", None) or tt._expression, tt.timezone)
    first = core.next_dagrun_info(last_automated_data_interval=None,
                                  restriction=TimeRestriction(earliest=dag.start_date, latest=None, catchup=True))
    check(first.logical_date.date().isoformat() == "2026-12-01"
          and first.run_after.isoformat().startswith("2026-12-02T03:00"),
          f"first run: ds={first.logical_date.date()} runs after {first.run_after.isoformat()}")
    check(task.deferrable is False, "not deferrable (the launcher runs in the task)")

    # Templates: Variables unset -> defaults; set -> used.
    defaults = _rendered(task, dag, {})
    po = defaults["pipeline_options"]
    check(po["date"] == DAY, f"--date renders {{{{ ds }}}} to {po['date']}")
    check(not any("force" in k.replace("_", "-") for k in po), "--force-rerelease is never passed")
    check(po.get("skip-if-released") is True, "--skip-if-released (a retry of a published day is a no-op)")
    check(po["job_name"] == "clickdp-nightly-20261202", f"Dataflow job name fixed per date ({po['job_name']})")
    check(po["project"] == "my-gcp-project" and po["region"] == "europe-west1",
          f"defaults: project {po['project']}, region {po['region']}")
    check(po["temp_location"] == "gs://clickdp-data/beam/temp", f"default temp_location {po['temp_location']}")
    check(po["input"] == f"gs://clickdp-data/raw/dt={DAY}/*.parquet", f"input {po['input']}")
    check("://" not in po["ledger"], f"ledger is a local file ({po['ledger']})")
    custom = _rendered(task, dag, {"clickdp_gcp_project": "acme-prod", "clickdp_gcp_region": "us-central1",
                                   "clickdp_bucket": "acme-clickdp", "clickdp_repo": "/srv/clickdp",
                                   "clickdp_service_account": "dp@acme-prod.iam.gserviceaccount.com"})
    cpo = custom["pipeline_options"]
    check(cpo["project"] == "acme-prod" and cpo["region"] == "us-central1"
          and cpo["output"] == "gs://acme-clickdp/release" and cpo["setup_file"] == "/srv/clickdp/setup.py"
          and custom["py_file"] == "/srv/clickdp/pipelines/nightly.py"
          and cpo["service_account_email"] == "dp@acme-prod.iam.gserviceaccount.com",
          "Airflow Variables override project, region, bucket, repo, service account")

    # The command the operator would run.
    cmd, task = _command(task, defaults)
    print("command:", " ".join(cmd))
    check(cmd[0] == sys.executable and cmd[1] == "/opt/clickstream-dp/pipelines/nightly.py",
          "runs $CLICKDP_PYTHON <repo>/pipelines/nightly.py")
    runner_args = [a for a in cmd if a.startswith("--runner=")]
    check(len(runner_args) == 1, "one --runner")
    runner_cls = type(create_runner(runner_args[0].split("=", 1)[1]))
    check(runner_cls.__name__ == "DataflowRunner", f"--runner resolves to Beam's {runner_cls.__name__}")
    check(not getattr(task, "is_dataflow", False),
          "the provider is not in its Dataflow mode (it waits for the launcher's exit code)")
    check(f"--date={DAY}" in cmd and "--skip-if-released" in cmd, "--date and --skip-if-released in argv")
    check(not any(a.startswith("--force") for a in cmd), "no --force-rerelease in argv")

    if opts.clickdp_python:
        clickdp_python = os.path.abspath(opts.clickdp_python)
        env = dict(os.environ, PYTHONPATH=REPO)
        env.pop("AIRFLOW_HOME", None)
        proc = subprocess.run([clickdp_python, "-c", _PARSE, *cmd[2:]], cwd=REPO, env=env,
                              check=False, capture_output=True, text=True, timeout=300)
        check(proc.returncode == 0, f"clickdp's parser accepts the argv {proc.stderr[-2000:]}")
        parsed = json.loads(proc.stdout.strip().splitlines()[-1])
        c, b = parsed["clickdp"], parsed["beam"]
        check(c["date"] == DAY and c["skip_if_released"] is True and c["force_rerelease"] is False,
              f"clickdp sees date {c['date']}, skip_if_released, not force_rerelease")
        check(c["ledger"] == po["ledger"] and c["output"] == po["output"], "clickdp sees --ledger and --output")
        check(not parsed["discarded"], f"Beam drops no argument {parsed['discarded']}")
        check(type(create_runner(b["runner"])).__name__ == "DataflowRunner"
              and b["project"] == "my-gcp-project" and b["region"] == "europe-west1"
              and b["temp_location"] == "gs://clickdp-data/beam/temp"
              and b["staging_location"] == "gs://clickdp-data/beam/staging"
              and b["setup_file"] == "/opt/clickstream-dp/setup.py"
              and b["job_name"] == "clickdp-nightly-20261202",
              f"Beam sees {json.dumps(b)}")
        # As the provider starts it: a script path, from another directory. (PYTHONPATH
        # stands in for installing the project into that Python, as production must.)
        help_proc = subprocess.run([clickdp_python, os.path.join(REPO, "pipelines", "nightly.py"), "--help"],
                                   cwd="/", env=env, check=False, capture_output=True, text=True, timeout=300)
        check(help_proc.returncode == 0 and "--date" in help_proc.stdout,
              f"`python <repo>/pipelines/nightly.py --help` runs as a script from / {help_proc.stderr[-2000:]}")

    print(f"all checks passed in {time.time() - t0:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
