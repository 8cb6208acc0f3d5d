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

import pyarrow as pa
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
    """Stands in for the Dataflow v1b3 REST API on 127.0.0.1 (Beam >= 2.5x talks REST to an
    endpoint containing 'localhost'). Records every request; answers create-job with a job
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

            def do_POST(self):  # noqa: N802 - http.server's naming
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

            def do_GET(self):  # noqa: N802
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
    assert re.search(r"^Name: clickstream[-_]dp$", meta, re.M), meta[:300]
    for module in ("pipelines/nightly.py", "transforms/beam_ops.py", "transforms/coders.py", "setup.py"):
        assert any(m.endswith("/" + module) for m in members), f"{module} not in workflow.tar.gz"

    # The fake ends the job CANCELLED: the launcher reports a failure and publishes nothing.
    assert result.exit_code == nightly.EXIT_FAILURE and "CANCELLED" in result.message
    assert _released_state(out) == {"tables": [], "manifests": []}


# `python -m pipelines.nightly ARGS` with the same loopback-only guard as in-process tests.
_GUARDED_MAIN = """
import ipaddress, runpy, socket, sys
_connect = socket.socket.connect
def connect(sock, address):
    if sock.family in (socket.AF_INET, socket.AF_INET6):
        host = address[0]
        try:
            ok = ipaddress.ip_address(host.split('%')[0]).is_loopback
        except ValueError:
            ok = host == 'localhost'
        if not ok:
            print('BLOCKED non-loopback connection to %r' % (address,), file=sys.stderr)
            raise OSError('blocked by test_runners')
    return _connect(sock, address)
socket.socket.connect = connect
sys.argv = ['pipelines.nightly'] + sys.argv[1:]
runpy.run_module('pipelines.nightly', run_name='__main__', alter_sys=True)
"""


def test_failed_dataflow_job_exits_nonzero_and_publishes_nothing(data, tmp_path):
    """What a scheduler sees when the Dataflow job fails: exit code 1, nothing published."""
    base, _ = data
    out = tmp_path / "out"
    (tmp_path / "staging").mkdir()
    with FakeDataflow("JOB_STATE_FAILED") as fake:
        proc = subprocess.run(
            [sys.executable, "-c", _GUARDED_MAIN, "--spec", SPEC, "--input", str(base / "data" / "events"),
             "--output", str(out), "--date", DATE.isoformat(),
             *_dataflow_args(fake.port, tmp_path / "staging", tmp_path / "staging")],
            cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert "BLOCKED" not in proc.stderr, proc.stderr[-3000:]
    assert len(fake.create_job_requests()) == 1
    assert proc.returncode == 1, (proc.returncode, proc.stderr[-3000:])
    assert "FAILED" in proc.stderr
    assert _released_state(out) == {"tables": [], "manifests": []}


# --------------------------------------------------------------------------------------
# 2. PortableRunner / FlinkRunner client through Beam's local job service (LOOPBACK)
# --------------------------------------------------------------------------------------
class LocalJobService:
    """``python -m apache_beam.runners.portability.local_job_service_main --port 0`` on
    localhost; the port it bound is read from its log."""

    def __init__(self, log_path):
        self.log_path = log_path
        self._log = open(log_path, "w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "apache_beam.runners.portability.local_job_service_main", "--port", "0"],
            stdout=self._log, stderr=subprocess.STDOUT, cwd=ROOT)
        self._endpoint = None

    def endpoint(self, timeout=90.0) -> str:
        deadline = time.time() + timeout
        while self._endpoint is None:
            text = open(self.log_path).read()
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
    man_p = json.loads(open(portable.manifest_path).read())
    man_l = json.loads(open(local.manifest_path).read())
    for k in ("job", "date", "spec_hash", "budget", "outputs"):
        assert man_p[k] == man_l[k], k
    assert sorted((f["output"], f["rows"]) for f in man_p["files"]) == \
        sorted((f["output"], f["rows"]) for f in man_l["files"])
