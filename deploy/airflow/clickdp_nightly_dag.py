"""clickdp nightly DP release on Dataflow, one Airflow run per day.

Install on the Airflow side: apache-airflow (3.x, or 2.10+),
apache-airflow-providers-apache-beam and apache-airflow-providers-google (under Airflow 3 the
Beam provider 6.3.1 refuses to build its operators without it). Checked by
`make airflow-check` (deploy/airflow/check_dag.py). The pipeline itself runs in its own Python
(``CLICKDP_PYTHON``, a virtualenv with ``pip install '<repo>[gcp]'``): the Beam provider
starts ``$CLICKDP_PYTHON <repo>/pipelines/nightly.py --date {{ ds }} ...`` and waits for its
exit code. That process checks the privacy ledger, submits the Dataflow job, waits for it
and publishes (see deploy/README.md).

Airflow Variables (all optional; read when the task runs, never while parsing):
    clickdp_gcp_project      GCP project of the Dataflow job        (default: my-gcp-project)
    clickdp_gcp_region       Dataflow region                        (default: europe-west1)
    clickdp_bucket           bucket for inputs, release, quarantine, temp/staging (default: clickdp-data)
    clickdp_repo             checkout of clickstream-dp on the worker (default: /opt/clickstream-dp)
    clickdp_ledger           privacy ledger (SQLite, LOCAL persistent disk of the worker that runs
                             this task; never on GCS)         (default: /var/lib/clickdp/ledger.sqlite)
    clickdp_service_account  Dataflow worker service account email (default: empty = project default)
Environment of the Airflow worker (read when the DAG file is parsed):
    CLICKDP_PYTHON           the interpreter with clickstream-dp[gcp] installed
                             (default: /opt/clickstream-dp/.venv/bin/python)
    CLICKDP_START_DATE       first day to release, YYYY-MM-DD; catchup backfills from it
                             (default: 2026-12-01)

Why retries cannot release a day twice (never add --force-rerelease here):
  * A run that fails at any point (bad input, Dataflow job failed or cancelled, launcher
    killed) publishes nothing: the job writes to a staging dir named by its run id and the
    launcher moves it into place and writes the manifest only after the job succeeded.
    Its ledger reservation is released, so the retry is an ordinary first release.
  * A retry after a run that DID publish (e.g. the worker died after the publish, before
    Airflow recorded success) is stopped by the ledger before any data is read: with
    --skip-if-released and the same spec it exits 0 doing nothing (the task goes green,
    the release stands); with a different spec it is refused, exit 4 (the task fails and
    a human decides). Without --skip-if-released every such retry would exit 4.
  * Two runs of one date cannot overlap: max_active_runs=1, the ledger reserves (job,
    date) in a transaction, and the Dataflow job name is fixed per date
    (clickdp-nightly-YYYYMMDD), which Dataflow refuses to run twice at the same time.
Exit codes of the launcher: 0 published (or already released), 1 failure (nothing
published; retried), 2 bad spec/arguments, 3 bad input (e.g. the day's files are not
there yet; retried after retry_delay), 4 refused by the ledger (double release or
budget window exceeded).

Why the operator's runner is the full class path, not "DataflowRunner":
  With runner="DataflowRunner" the provider switches to its Dataflow mode: it needs the
  Google provider, and it stops waiting for the launcher as soon as a Dataflow job id
  appears in its log, then polls the job itself. Our launcher still has work to do after
  the job ends (check counters, publish, write the manifest, mark the ledger), so Airflow
  could report success before the release exists, or kill the launcher mid-publish. The
  full path selects the same Beam DataflowRunner while the provider simply runs the
  process and waits for its exit code.
"""
from __future__ import annotations

import datetime
import os

import pendulum

try:  # Airflow 3
    from airflow.sdk import DAG, CronDataIntervalTimetable
except ImportError:  # Airflow 2.10+
    from airflow import DAG
    from airflow.timetables.interval import CronDataIntervalTimetable

from airflow.providers.apache.beam.operators.beam import BeamRunPythonPipelineOperator

DAG_ID = "clickdp_nightly"
TASK_ID = "release"
DATAFLOW_RUNNER = "apache_beam.runners.dataflow.dataflow_runner.DataflowRunner"


def _var(name: str, default: str) -> str:
    """A Jinja reference to an Airflow Variable: resolved when the task runs."""
    return "{{ var.value.get('" + name + "', '" + default + "') }}"


PROJECT = _var("clickdp_gcp_project", "my-gcp-project")
REGION = _var("clickdp_gcp_region", "europe-west1")
BUCKET = _var("clickdp_bucket", "clickdp-data")
REPO = _var("clickdp_repo", "/opt/clickstream-dp")
LEDGER = _var("clickdp_ledger", "/var/lib/clickdp/ledger.sqlite")
SERVICE_ACCOUNT = _var("clickdp_service_account", "")  # empty: Beam leaves it unset

PYTHON = os.environ.get("CLICKDP_PYTHON", "/opt/clickstream-dp/.venv/bin/python")
START = datetime.date.fromisoformat(os.environ.get("CLICKDP_START_DATE", "2026-12-01"))

with DAG(
    dag_id=DAG_ID,
    description="Nightly differentially private clickstream release (clickstream-dp) on Dataflow",
    # Runs at 03:00 UTC for the interval [D 03:00, D+1 03:00): {{ ds }} is D, the UTC day
    # whose events are complete by then. Explicit data-interval timetable, so {{ ds }} means
    # the same on Airflow 2 and 3 (Airflow 3's default cron timetable would make ds = D+1).
    schedule=CronDataIntervalTimetable("0 3 * * *", timezone="UTC"),
    start_date=pendulum.datetime(START.year, START.month, START.day, 3, tz="UTC"),
    catchup=True,            # backfill: one run per missed day, oldest first ...
    max_active_runs=1,       # ... one at a time, so days are charged to the ledger in order
    default_args={
        "owner": "clickdp",
        "retries": 2,
        "retry_delay": datetime.timedelta(minutes=20),
        "execution_timeout": datetime.timedelta(hours=6),
    },
    tags=["clickdp", "differential-privacy", "dataflow"],
    doc_md=__doc__,
) as dag:
    release = BeamRunPythonPipelineOperator(
        task_id=TASK_ID,
        py_file=REPO + "/pipelines/nightly.py",
        py_interpreter=PYTHON,
        runner=DATAFLOW_RUNNER,
        deferrable=False,  # the launcher must run (and publish) in this task, not in the triggerer
        pipeline_options={
            # clickdp arguments
            "spec": REPO + "/configs/nightly.yaml",
            "input": "gs://" + BUCKET + "/raw/dt={{ ds }}/*.parquet",
            "output": "gs://" + BUCKET + "/release",
            "quarantine": "gs://" + BUCKET + "/quarantine",
            "ledger": LEDGER,
            "date": "{{ ds }}",
            # True -> a bare flag. The key is spelled as clickdp spells it (dashes): the
            # provider passes keys through verbatim, and an unknown --skip_if_released
            # would be handed to Beam and silently dropped.
            "skip-if-released": True,
            # Beam / Dataflow options
            "project": PROJECT,
            "region": REGION,
            "temp_location": "gs://" + BUCKET + "/beam/temp",
            "staging_location": "gs://" + BUCKET + "/beam/staging",
            "setup_file": REPO + "/setup.py",  # workers pip-install this package
            "job_name": "clickdp-nightly-{{ ds_nodash }}",
            "service_account_email": SERVICE_ACCOUNT,
            "labels": {"app": "clickdp", "release-date": "{{ ds }}"},
        },
    )
