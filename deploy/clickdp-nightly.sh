#!/usr/bin/env bash
# One nightly clickdp release, for cron and systemd (deploy/cron, deploy/systemd).
#
#   deploy/clickdp-nightly.sh [YYYY-MM-DD]      default: yesterday (UTC)
#
# The day is fixed once, when the script starts; failed attempts are retried inside this
# script for that same day (a restart after midnight must not move on to another day).
# Exit codes are clickdp's: 0 published (or already released: --skip-if-released),
# 1 failure (nothing published), 2 bad spec/arguments, 3 bad input, 4 refused by the
# ledger; 75 if another run holds the lock. 1 and 3 (e.g. the day's files are late) are
# retried; 0, 2 and 4 are final. Never add --force-rerelease here: a retry after a
# successful publish must be a no-op, not a second release with fresh noise.
#
# Configuration (environment; systemd: /etc/clickdp/nightly.env, see clickdp-nightly.env):
#   CLICKDP_HOME         checkout of clickstream-dp                  (/opt/clickstream-dp)
#   CLICKDP_PYTHON       Python with clickstream-dp[gcp] installed   ($CLICKDP_HOME/.venv/bin/python)
#   CLICKDP_SPEC         job spec                                    ($CLICKDP_HOME/configs/nightly.yaml)
#   CLICKDP_BUCKET       GCS bucket for the defaults below           (clickdp-data)
#   CLICKDP_INPUT        input glob, {date} is replaced              (gs://$CLICKDP_BUCKET/raw/dt={date}/*.parquet)
#   CLICKDP_OUTPUT       release root                                (gs://$CLICKDP_BUCKET/release)
#   CLICKDP_QUARANTINE   dead letters and run summaries              (gs://$CLICKDP_BUCKET/quarantine)
#   CLICKDP_LEDGER       privacy ledger, a LOCAL persistent file     (/var/lib/clickdp/ledger.sqlite)
#   CLICKDP_LOCK         lock file: one run at a time                (/var/lib/clickdp/nightly.lock)
#   CLICKDP_GCP_PROJECT, CLICKDP_GCP_REGION, CLICKDP_SERVICE_ACCOUNT   (my-gcp-project, europe-west1, unset)
#   CLICKDP_BEAM_ARGS    Beam options, replacing the DataflowRunner defaults when set
#                        (e.g. "--runner FlinkRunner --flink_master flink:8081 ...", or
#                        "--runner FnApiRunner" to run locally)
#   CLICKDP_ATTEMPTS, CLICKDP_RETRY_DELAY   attempts and seconds between them (3, 1200)
set -euo pipefail

HOME_DIR="${CLICKDP_HOME:-/opt/clickstream-dp}"
PY="${CLICKDP_PYTHON:-$HOME_DIR/.venv/bin/python}"
SPEC="${CLICKDP_SPEC:-$HOME_DIR/configs/nightly.yaml}"
BUCKET="${CLICKDP_BUCKET:-clickdp-data}"
DEFAULT_INPUT="gs://$BUCKET/raw/dt={date}/*.parquet"  # (a literal } cannot sit inside ${...:-...})
INPUT="${CLICKDP_INPUT:-$DEFAULT_INPUT}"
OUTPUT="${CLICKDP_OUTPUT:-gs://$BUCKET/release}"
QUARANTINE="${CLICKDP_QUARANTINE:-gs://$BUCKET/quarantine}"
LEDGER="${CLICKDP_LEDGER:-/var/lib/clickdp/ledger.sqlite}"
LOCK="${CLICKDP_LOCK:-/var/lib/clickdp/nightly.lock}"
ATTEMPTS="${CLICKDP_ATTEMPTS:-3}"
RETRY_DELAY="${CLICKDP_RETRY_DELAY:-1200}"

DAY="${1:-$(date -u -d yesterday +%F)}"
if ! [[ "$DAY" =~ ^[0-9]{4}-[0-9]{2}-[0-9]{2}$ ]]; then
  echo "clickdp-nightly: expected YYYY-MM-DD, got '$DAY'" >&2
  exit 2
fi
if [[ ! "$DAY" < "$(date -u +%F)" ]]; then  # ISO dates compare as strings
  echo "clickdp-nightly: $DAY is not over yet (UTC); refusing to release a partial day" >&2
  exit 2
fi

if [[ -n "${CLICKDP_BEAM_ARGS+set}" ]]; then
  read -r -a BEAM_ARGS <<< "$CLICKDP_BEAM_ARGS"
else
  BEAM_ARGS=(
    --runner DataflowRunner
    --project "${CLICKDP_GCP_PROJECT:-my-gcp-project}"
    --region "${CLICKDP_GCP_REGION:-europe-west1}"
    --temp_location "gs://$BUCKET/beam/temp"
    --staging_location "gs://$BUCKET/beam/staging"
    --setup_file "$HOME_DIR/setup.py"
    --job_name "clickdp-nightly-${DAY//-/}"
  )
  if [[ -n "${CLICKDP_SERVICE_ACCOUNT:-}" ]]; then
    BEAM_ARGS+=(--service_account_email "$CLICKDP_SERVICE_ACCOUNT")
  fi
fi

mkdir -p "$(dirname "$LOCK")"
exec 9>>"$LOCK"
if ! flock -n 9; then
  echo "clickdp-nightly: another run holds $LOCK; not starting" >&2
  exit 75
fi

cd "$HOME_DIR"  # `python -m pipelines.nightly` finds the project from here
attempt=1
while :; do
  echo "clickdp-nightly: $DAY attempt $attempt of $ATTEMPTS" >&2
  set +e
  "$PY" -m pipelines.nightly --spec "$SPEC" --input "${INPUT//\{date\}/$DAY}" --output "$OUTPUT" \
    --quarantine "$QUARANTINE" --ledger "$LEDGER" --date "$DAY" --skip-if-released "${BEAM_ARGS[@]}"
  rc=$?
  set -e
  case "$rc" in
    0 | 2 | 4) exit "$rc" ;;
  esac
  if (( attempt >= ATTEMPTS )); then
    echo "clickdp-nightly: $DAY failed $attempt time(s), last exit $rc; giving up" >&2
    exit "$rc"
  fi
  echo "clickdp-nightly: $DAY attempt $attempt exited $rc (nothing published); retrying in ${RETRY_DELAY}s" >&2
  sleep "$RETRY_DELAY"
  attempt=$((attempt + 1))
done
