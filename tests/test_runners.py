"""Runners other than the local FnApiRunner, tested offline.

1. DataflowRunner: the nightly job is built and submitted to a fake Dataflow API on
   127.0.0.1 (``--dataflow_endpoint=http://localhost:PORT --no_auth``) with local staging.
   We assert what Dataflow would receive: the create-job request, the staged pipeline
   proto with the pipeline's steps, and the package built from setup.py (workflow.tar.gz)
   that workers install. Nothing runs on Dataflow, so nothing is published.
2. PortableRunner (and FlinkRunner's Python client, given a --job_endpoint): the nightly
   job runs through Beam's job API against Beam's local job service (a subprocess on
   localhost) with the LOOPBACK environment, and its released tables, counters and dead
   letters are compared with a local FnApiRunner run on the same data.
3. deploy/clickdp-nightly.sh, the cron/systemd entry point: retry policy, lock, day guard,
   and a real local run followed by a rerun that must change nothing.

No test here touches the network except the loopback interface (a guard fails the test
on any other connection made through Python sockets), and every server is stopped.
"""
import base64
import bz2
import datetime
import glob
import hashlib
import ipaddress
import json
import os
import re
import socket
import subprocess
import sys
import tarfile
import threading
import time
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from transforms import generator

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SPEC = os.path.join(ROOT, "configs", "nightly.yaml")
DATE = datetime.date(2026, 12, 2)
# Steps of the nightly job (transforms/beam_ops.py) that must reach every runner.
STEPS = ("ReadValidateAndShard", "WriteDeadLetters", "BoundAndAggregate", "MergeAndRelease", "WriteReleased")


# --------------------------------------------------------------------------------------
# Shared fixtures
# --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """One day of generated events: many shoppers over few products, so that every
    partition is far above the private-selection threshold (see _sure_partitions)."""
    base = tmp_path_factory.mktemp("runners")
    info = generator.generate(str(base / "data"), n_users=20_000, n_events=50_000, n_products=6,
                              date=DATE, seed=20261202, bad_rows_fraction=0.003, n_files=3)
    assert info["bad_rows"] > 0
    return base, info


@pytest.fixture
def loopback_only(monkeypatch):
    """Fails the test if Python code opens a TCP connection to anything but loopback."""
    blocked = []
    real_connect, real_connect_ex = socket.socket.connect, socket.socket.connect_ex

    def _check(sock, address):
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            host = address[0]
            try:
                ok = ipaddress.ip_address(host.split("%")[0]).is_loopback
            except ValueError:
                ok = host == "localhost"
            if not ok:
                blocked.append(address)
                raise OSError(f"test_runners: blocked a connection to {address} (loopback only)")

    def connect(sock, address):
        _check(sock, address)
        return real_connect(sock, address)

    def connect_ex(sock, address):
        _check(sock, address)
        return real_connect_ex(sock, address)

    monkeypatch.setattr(socket.socket, "connect", connect)
    monkeypatch.setattr(socket.socket, "connect_ex", connect_ex)
    yield blocked
    assert not blocked, f"non-loopback connections attempted: {blocked}"


def _released_state(out) -> dict:
    """What is published under an output root (nothing, when a run failed)."""
    return {
        "tables": sorted(os.path.relpath(p, out) for p in glob.glob(os.path.join(out, "*", "dt=*"))
                         if not os.path.basename(os.path.dirname(p)).startswith("_")),
        "manifests": sorted(glob.glob(os.path.join(out, "_manifests", "**", "*.json"), recursive=True)),
    }


# --------------------------------------------------------------------------------------
# 1. DataflowRunner against a fake Dataflow API
# --------------------------------------------------------------------------------------
class FakeDataflow:
    """Stands in for the Dataflow v1b3 REST API on 127.0.0.1 (Beam 2.77's client speaks REST,
    not gRPC, to an endpoint containing 'localhost'). Records every request; answers create-job with a job
    in ``final_state`` so the client stops without polling; get-job, messages and metrics
    get minimal valid answers; anything else gets a 404 (and is recorded)."""

    def __init__(self, final_state: str):
        self.final_state = final_state
        self.requests = []  # (method, path, parsed JSON body or None)
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def _reply(self, code, obj):
                data = json.dumps(obj).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_POST(self):
                n = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(n) or b"{}")
                path = self.path.split("?")[0]
                fake.requests.append(("POST", path, body))
                m = re.fullmatch(r"/v1b3/projects/([^/]+)/locations/([^/]+)/jobs", path)
                if not m:
                    return self._reply(404, {"error": {"code": 404, "message": "fake: unknown"}})
                self._reply(200, {"id": "fake-job-1", "projectId": m.group(1), "location": m.group(2),
                                  "name": body.get("name"), "clientRequestId": body.get("clientRequestId"),
                                  "currentState": fake.final_state})

            def do_GET(self):
                path = self.path.split("?")[0]
                fake.requests.append(("GET", path, None))
                if path.endswith("/messages"):
                    return self._reply(200, {"jobMessages": []})
                if path.endswith("/metrics"):
                    return self._reply(200, {"metrics": []})
                if re.fullmatch(r"/v1b3/projects/[^/]+/locations/[^/]+/jobs/[^/]+", path):
                    return self._reply(200, {"id": "fake-job-1", "currentState": fake.final_state})
                self._reply(404, {"error": {"code": 404, "message": "fake: unknown"}})

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, name="fake-dataflow", daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(10)

    def create_job_requests(self):
        return [r for r in self.requests if r[0] == "POST"]


def _decompress(data: bytes) -> bytes:
    """Beam's pickler compresses with bz2 (or zlib in older versions)."""
    try:
        return bz2.decompress(data)
    except OSError:
        return zlib.decompress(data)


def _dataflow_args(port, staging, temp, *extra):
    return ["--runner", "DataflowRunner", f"--dataflow_endpoint=http://localhost:{port}", "--no_auth",
            "--project=p", "--region=r", f"--temp_location={temp}", f"--staging_location={staging}",
            *extra]


def test_dataflow_job_request_captured_offline(data, tmp_path, loopback_only):
    from apache_beam.portability import common_urns
    from apache_beam.portability.api import beam_runner_api_pb2

    from pipelines import nightly

    base, _ = data
    staging, temp, out = tmp_path / "staging", tmp_path / "temp", tmp_path / "out"
    staging.mkdir()
    temp.mkdir()
    with FakeDataflow("JOB_STATE_CANCELLED") as fake:
        result = nightly.run(["--spec", SPEC, "--input", str(base / "data" / "events"), "--output", str(out),
                              "--date", DATE.isoformat(),
                              *_dataflow_args(fake.port, staging, temp, f"--setup_file={ROOT}/setup.py",
                                              "--job_name=clickdp-nightly-20261202")])

    # The job was submitted exactly once, to the project and region given.
    creates = fake.create_job_requests()
    assert len(creates) == 1, fake.requests
    _, path, job = creates[0]
    assert path == "/v1b3/projects/p/locations/r/jobs"
    assert job["name"] == "clickdp-nightly-20261202"
    assert job["type"] in (1, "JOB_TYPE_BATCH")
    env = job["environment"]
    options = env["sdkPipelineOptions"]["options"]
    assert options["project"] == "p" and options["region"] == "r"
    assert options["setup_file"] == f"{ROOT}/setup.py"
    assert "use_runner_v2" in options["experiments"]

    # Runner v2 sends the steps as a staged pipeline proto, referenced by the request.
    pipeline_pb = staging / "pipeline.pb"
    assert options["pipelineUrl"] == str(pipeline_pb)
    raw = pipeline_pb.read_bytes()
    assert options["pipelineProtoHash"] == hashlib.sha256(raw).hexdigest()
    proto = beam_runner_api_pb2.Pipeline.FromString(raw)
    names = [t.unique_name for t in proto.components.transforms.values()]
    for step in STEPS:
        assert any(step in n for n in names), f"step {step} missing from the staged pipeline: {sorted(names)}"
    # ... whose DoFns are this project's code (pickled by reference: workers need the package).
    pardo = [t for t in proto.components.transforms.values()
             if t.spec.urn == common_urns.primitives.PAR_DO.urn and "ReadValidateAndShard" in t.unique_name]
    assert len(pardo) == 1
    do_fn = beam_runner_api_pb2.ParDoPayload.FromString(pardo[0].spec.payload).do_fn
    pickled = _decompress(base64.b64decode(do_fn.payload))
    assert b"transforms.beam_ops" in pickled and b"ReadValidateAndShardFn" in pickled

    # The package built from setup.py is staged and listed for the workers.
    packages = {p["name"]: p["location"] for pool in env["workerPools"] for p in pool.get("packages", [])}
    assert "workflow.tar.gz" in packages, packages
    tarball = staging / "workflow.tar.gz"
    assert packages["workflow.tar.gz"] == str(tarball) and tarball.exists()
    staged_names = {
        beam_runner_api_pb2.ArtifactStagingToRolePayload.FromString(dep.role_payload).staged_name
        for e in proto.components.environments.values() for dep in e.dependencies
        if dep.role_urn == common_urns.artifact_roles.STAGING_TO.urn}
    assert "workflow.tar.gz" in staged_names
    with tarfile.open(tarball) as tar:
        members = tar.getnames()
        pkg_info = next(m for m in members if m.count("/") == 1 and m.endswith("/PKG-INFO"))
        meta = tar.extractfile(pkg_info).read().decode()
    assert re.search(r"^Name: clickstream[-_]dp$", meta, re.MULTILINE), meta[:300]
    for module in ("pipelines/nightly.py", "transforms/beam_ops.py", "transforms/coders.py", "setup.py"):
        assert any(m.endswith("/" + module) for m in members), f"{module} not in workflow.tar.gz"

    # The fake ends the job CANCELLED: the launcher reports a failure and publishes nothing.
    assert result.exit_code == nightly.EXIT_FAILURE and "CANCELLED" in result.message
    assert _released_state(out) == {"tables": [], "manifests": []}


def test_failed_dataflow_job_exits_nonzero_and_publishes_nothing(data, tmp_path, loopback_only):
    """What a scheduler sees when the Dataflow job fails: exit code 1 (`python -m
    pipelines.nightly` exits with run(argv).exit_code), nothing published."""
    from pipelines import nightly
    base, _ = data
    out = tmp_path / "out"
    (tmp_path / "staging").mkdir()
    with FakeDataflow("JOB_STATE_FAILED") as fake:
        code = nightly.run(["--spec", SPEC, "--input", str(base / "data" / "events"), "--output", str(out),
                            "--date", DATE.isoformat(),
                            *_dataflow_args(fake.port, tmp_path / "staging", tmp_path / "staging")]).exit_code
    assert len(fake.create_job_requests()) == 1
    assert code == nightly.EXIT_FAILURE == 1
    assert _released_state(out) == {"tables": [], "manifests": []}


# --------------------------------------------------------------------------------------
# 2. PortableRunner / FlinkRunner client through Beam's local job service (LOOPBACK)
# --------------------------------------------------------------------------------------
class LocalJobService:
    """``python -m apache_beam.runners.portability.local_job_service_main --port 0`` on
    localhost; the port it bound is read from its log."""

    def __init__(self, log_path):
        self.log_path = log_path
        self._log = open(log_path, "w")  # noqa: SIM115 - the service writes to it until stop()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "apache_beam.runners.portability.local_job_service_main", "--port", "0"],
            stdout=self._log, stderr=subprocess.STDOUT, cwd=ROOT)
        self._endpoint = None

    def endpoint(self, timeout=90.0) -> str:
        deadline = time.time() + timeout
        while self._endpoint is None:
            with open(self.log_path) as fh:
                text = fh.read()
            m = re.search(r"Listening for beam jobs on port (\d+)", text)
            if m:
                self._endpoint = f"localhost:{m.group(1)}"
                break
            if self.proc.poll() is not None:
                raise RuntimeError(f"local job service exited with {self.proc.returncode}:\n{text[-3000:]}")
            if time.time() > deadline:
                raise TimeoutError(f"local job service did not start in {timeout}s:\n{text[-3000:]}")
            time.sleep(0.1)
        return self._endpoint

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(15)
        self._log.close()


@pytest.fixture(scope="module", autouse=True)
def job_service(tmp_path_factory):
    """Started when the module starts (it takes a few seconds to import Beam), stopped at
    its end whatever happens."""
    service = LocalJobService(str(tmp_path_factory.mktemp("jobservice") / "job_service.log"))
    try:
        yield service
    finally:
        service.stop()


def _run_nightly(base, out, *beam_args):
    from pipelines import nightly
    result = nightly.run(["--spec", SPEC, "--input", str(base / "data" / "events"), "--output", str(out),
                          "--date", DATE.isoformat(), *beam_args])
    assert result.exit_code == 0, result.message
    return result


@pytest.fixture(scope="module")
def local_run(data):
    base, _ = data
    out = base / "out_local"
    return out, _run_nightly(base, out)


def _sure_partitions(base, spec, n_bad: int) -> dict:
    """Per output: ({partition: lower bound on its privacy units after bounding}, n*), for the
    partitions that private selection keeps with probability exactly 1 on every run.

    A shopper whose rows touch at most L0 distinct keys (counted over ALL their rows with a
    key: a superset of what the output sees) keeps every partition through bounding. Taking
    only product_view rows (seen by both outputs of the default spec) as membership, and
    subtracting the number of bad rows (each can fake at most one membership), gives a lower
    bound on a partition's privacy-unit count after bounding, whatever the random bounding
    does. python-dp's truncated-geometric keep probability reaches exactly 1.0 at some n*
    (258 for product_day, 380 for category_day with the default spec), and the pipeline keeps
    a partition iff U < p(n) with U < 1: partitions above n* are released by every run, so
    comparing released key sets needs no statistical tolerance.
    """
    from transforms import selection
    from transforms.budget import plan_budget
    plan = plan_budget(spec)
    raw = pq.read_table(str(base / "data" / "events"))
    raw = raw.filter(pc.is_valid(raw["user_id"]))
    sure = {}
    for output in spec.outputs:
        assert len(output.partition_keys) == 1
        key = output.partition_keys[0]
        sel = plan.output(output.name).selection
        table = selection.keep_probability_table(sel.kind, sel.epsilon, sel.delta, sel.l0)
        assert table[-1] == 1.0, "this selection never keeps with certainty; the test needs other data"
        n_star = len(table) - 1
        l0 = output.bounds.max_partitions_contributed
        with_key = raw.filter(pc.is_valid(raw[key])).select(["user_id", key, "event_type"])
        per_user = with_key.group_by(["user_id", key]).aggregate([]).group_by("user_id").aggregate(
            [(key, "count")])
        small = per_user.filter(pc.less_equal(per_user[f"{key}_count"], l0)).column("user_id")
        views = with_key.filter(pc.equal(with_key["event_type"], "product_view"))
        members = views.filter(pc.is_in(views["user_id"], value_set=small)).group_by([key, "user_id"]).aggregate([])
        counts = members.group_by(key).aggregate([("user_id", "count")])
        bound = {k: c - n_bad for k, c in zip(counts[key].to_pylist(), counts["user_id_count"].to_pylist())}
        sure[output.name] = ({k: b for k, b in bound.items() if b >= n_star}, n_star)
    return sure


def _dead_letter_rows(out) -> int:
    files = glob.glob(os.path.join(f"{out}_quarantine", "dead_letter", f"dt={DATE}", "run=*", "*.parquet"))
    return sum(pq.read_metadata(f).num_rows for f in files)


@pytest.mark.parametrize("runner", ["PortableRunner", "FlinkRunner"])
def test_job_api_run_matches_local_run(runner, data, local_run, job_service, tmp_path):
    """PortableRunner: the documented way to run on any Beam job server (Flink's included).
    FlinkRunner given --job_endpoint: FlinkRunner's Python client (its options, environment
    defaults and job-API submission) against the same local job service; the job still
    executes on Beam's Python runner behind the job API, not on Flink."""
    from transforms.spec import load_spec
    base, info = data
    out_local, local = local_run
    out = tmp_path / "out"
    extra = ["--flink_master=localhost:8081", "--parallelism=1"] if runner == "FlinkRunner" else []
    portable = _run_nightly(base, out, "--runner", runner, f"--job_endpoint={job_service.endpoint()}",
                            "--environment_type=LOOPBACK", *extra)
    spec = load_spec(SPEC)

    # Counters come back through the job API: the summary is complete and deterministic parts agree.
    ps, ls = portable.summary, local.summary
    assert ps["runner"] == runner and ls["runner"] == "FnApiRunner"
    assert ps["rows"]["read"] == info["rows"] > 0, "the runner returned no Beam counters"
    for k in ("read", "valid", "dead_lettered", "dead_by_reason", "invariant_read_eq_valid_plus_dead"):
        assert ps["rows"][k] == ls["rows"][k], k
    assert ps["rows"]["dead_lettered"] == info["bad_rows"]
    # Dead letters written to quarantine: same number of rows.
    assert _dead_letter_rows(out) == _dead_letter_rows(out_local) == info["bad_rows"]

    sure = _sure_partitions(base, spec, info["bad_rows"])
    for o in spec.outputs:
        assert ps["outputs"][o.name]["rows_eligible"] == ls["outputs"][o.name]["rows_eligible"]
        assert ps["outputs"][o.name]["partitions_considered"] == ls["outputs"][o.name]["partitions_considered"]
        tp = pq.read_table(str(out / o.name / f"dt={DATE}"))
        tl = pq.read_table(str(out_local / o.name / f"dt={DATE}"))
        # Same table, same columns and types, same DP metadata (but the run id).
        assert tp.schema.remove_metadata() == tl.schema.remove_metadata()
        mp = json.loads(pq.read_schema(str(out / o.name / f"dt={DATE}" / "part-00000.parquet")).metadata[b"clickdp.dp"])
        ml = json.loads(pq.read_schema(str(out_local / o.name / f"dt={DATE}" / "part-00000.parquet")).metadata[b"clickdp.dp"])
        assert mp.pop("run_id") != ml.pop("run_id")
        assert mp == ml
        # Same partitions released. The data is chosen so that every partition is sure to be
        # selected (precondition), hence both runs must release exactly these.
        sure_keys, n_star = sure[o.name]
        assert len(sure_keys) == ls["outputs"][o.name]["partitions_considered"] > 0, \
            f"{o.name}: not every partition is above n*={n_star} ({sure_keys}); the test data is too thin"
        keys_p = set(tp.column(o.partition_keys[0]).to_pylist())
        keys_l = set(tl.column(o.partition_keys[0]).to_pylist())
        assert keys_p == keys_l == set(sure_keys), (o.name, keys_p ^ keys_l)
        assert ps["outputs"][o.name]["partitions_released"] == ls["outputs"][o.name]["partitions_released"] \
            == tp.num_rows == tl.num_rows

    # Manifests describe the same release.
    with open(portable.manifest_path) as fp, open(local.manifest_path) as fl:
        man_p, man_l = json.load(fp), json.load(fl)
    for k in ("job", "date", "spec_hash", "budget", "outputs"):
        assert man_p[k] == man_l[k], k
    assert sorted((f["output"], f["rows"]) for f in man_p["files"]) == \
        sorted((f["output"], f["rows"]) for f in man_l["files"])


# --------------------------------------------------------------------------------------
# 3. The cron/systemd entry point (deploy/clickdp-nightly.sh)
# --------------------------------------------------------------------------------------
SCRIPT = os.path.join(ROOT, "deploy", "clickdp-nightly.sh")


def _script_env(tmp_path, **extra):
    env = {k: v for k, v in os.environ.items() if not k.startswith("CLICKDP_")}
    env.update({"CLICKDP_HOME": ROOT, "CLICKDP_SPEC": SPEC, "CLICKDP_LOCK": str(tmp_path / "nightly.lock"),
                "CLICKDP_LEDGER": str(tmp_path / "ledger.sqlite"), "CLICKDP_OUTPUT": str(tmp_path / "out"),
                "CLICKDP_QUARANTINE": str(tmp_path / "quarantine")})
    env.update(extra)
    return env


def _fake_python(tmp_path, codes):
    """A stand-in for the clickdp Python: records its argv, exits with the next code."""
    (tmp_path / "codes").write_text("\n".join(str(c) for c in codes) + "\n")
    fake = tmp_path / "fake-python"
    fake.write_text(
        "#!/usr/bin/env bash\n"
        f"printf '%s\\n' \"$*\" >> {tmp_path}/calls\n"
        f"code=$(head -n1 {tmp_path}/codes); sed -i 1d {tmp_path}/codes\n"
        "exit \"${code:-0}\"\n")
    fake.chmod(0o755)
    return str(fake)


def _calls(tmp_path):
    path = tmp_path / "calls"
    return path.read_text().splitlines() if path.exists() else []


@pytest.mark.parametrize("codes,attempts,expected_rc,expected_calls", [
    ([0], 3, 0, 1),             # published (or already released: --skip-if-released)
    ([1, 0], 3, 0, 2),          # failed (nothing published): retried for the same day
    ([3, 3, 3], 3, 3, 3),       # input missing every time: gives up after the attempts
    ([4], 3, 4, 1),             # refused by the ledger: final, for a human
    ([2], 3, 2, 1),             # bad spec: final
])
def test_nightly_script_retry_policy(tmp_path, codes, attempts, expected_rc, expected_calls):
    env = _script_env(tmp_path, CLICKDP_PYTHON=_fake_python(tmp_path, codes),
                      CLICKDP_ATTEMPTS=str(attempts), CLICKDP_RETRY_DELAY="0")
    proc = subprocess.run(["bash", SCRIPT, "2026-12-02"], env=env, check=False, capture_output=True, text=True, timeout=60)
    assert proc.returncode == expected_rc, proc.stderr
    calls = _calls(tmp_path)
    assert len(calls) == expected_calls
    for call in calls:  # every attempt is the same day, never forced
        assert "--date 2026-12-02" in call and "--skip-if-released" in call and "force" not in call
        assert "--runner DataflowRunner" in call and "--job_name clickdp-nightly-20261202" in call
        assert "--setup_file " + os.path.join(ROOT, "setup.py") in call
        assert "--input gs://clickdp-data/raw/dt=2026-12-02/*.parquet" in call


def test_nightly_script_refuses_unfinished_day_and_concurrent_run(tmp_path):
    env = _script_env(tmp_path, CLICKDP_PYTHON=_fake_python(tmp_path, [0]))
    utc_today = datetime.datetime.now(datetime.timezone.utc).date()  # noqa: UP017 (Python 3.10)
    today = utc_today.isoformat()
    proc = subprocess.run(["bash", SCRIPT, today], env=env, check=False, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "not over yet" in proc.stderr and not _calls(tmp_path)
    # Default day: yesterday (UTC).
    proc = subprocess.run(["bash", SCRIPT], env=env, check=False, capture_output=True, text=True, timeout=60)
    yesterday = (utc_today - datetime.timedelta(days=1)).isoformat()
    assert proc.returncode == 0 and f"--date {yesterday}" in _calls(tmp_path)[0]
    # A run still holding the lock blocks the next one.
    with open(tmp_path / "nightly.lock", "a") as lock:
        import fcntl
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        proc = subprocess.run(["bash", SCRIPT, "2026-12-02"], env=env, check=False, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 75 and "another run" in proc.stderr and len(_calls(tmp_path)) == 1


def test_nightly_script_publishes_once(data, tmp_path):
    """The real thing, locally: the script releases the day; run again (as cron would after
    a crash, or by hand), it does nothing and the release stands."""
    base, _ = data
    env = _script_env(tmp_path, CLICKDP_PYTHON=sys.executable, CLICKDP_BEAM_ARGS="--runner FnApiRunner",
                      CLICKDP_INPUT=str(base / "data" / "events"), CLICKDP_ATTEMPTS="1")
    proc = subprocess.run(["bash", SCRIPT, DATE.isoformat()], env=env, check=False, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    manifest = tmp_path / "out" / "_manifests" / "nightly" / f"dt={DATE}.json"
    first = json.loads(manifest.read_text())
    proc = subprocess.run(["bash", SCRIPT, DATE.isoformat()], env=env, check=False, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "already released" in proc.stdout + proc.stderr
    assert json.loads(manifest.read_text())["run_id"] == first["run_id"]
    # The release plus its post-processed artifacts (features, corpus), each written once.
    assert _released_state(tmp_path / "out")["tables"] == [
        f"category_day/dt={DATE}", f"category_features/dt={DATE}", f"corpus/dt={DATE}",
        f"product_day/dt={DATE}", f"product_features/dt={DATE}"]
