"""Shard parts through local Arrow files on the in-process runner (transforms/fileshuffle.py)."""
import os
import stat

import pyarrow as pa

from pipelines import nightly
from tests.conftest import make_events, run_nightly, write_parquet
from transforms import beam_ops, fileshuffle

SPEC = {
    "job": "fs",
    "budget": {"epsilon": 1.0, "delta": 1e-6},
    "outputs": [{"name": "product_day", "partition_keys": ["product_id"],
                 "bounds": {"max_partitions_contributed": 2, "max_contributions_per_partition": 3},
                 "metrics": [{"name": "views", "type": "count"}]}],
}


def test_roundtrip_in_a_private_directory(tmp_path):
    d = fileshuffle.make_dir(str(tmp_path))
    assert stat.S_IMODE(os.stat(d).st_mode) == 0o700  # only the running user can read the events
    batch = pa.record_batch({"category": pa.array(["a", "b", None]).dictionary_encode(),
                             "price": pa.array([1.5, None, 3.0]), "__unit": pa.array([1, 2, 3], pa.uint64())})
    p1, p2 = fileshuffle.write_part(d, batch), fileshuffle.write_part(d, batch)
    assert p1 != p2 and os.path.dirname(p1) == d
    back = fileshuffle.read_part(p1)
    assert len(back) == 1 and back[0].equals(batch)
    fileshuffle.remove_dir(d)
    assert not os.path.exists(d)


def _inputs(tmp_path):
    rows = [{"user_id": f"u{u}", "product_id": f"p{u % 5}", "price": 1.0} for u in range(200)] * 2
    for i in range(3):
        write_parquet(make_events(rows[i::3]), str(tmp_path / "in" / f"e{i}.parquet"))
    return tmp_path / "in"


def test_files_and_beam_shuffle_release_the_same(tmp_path, allow_no_noise):
    in_dir = _inputs(tmp_path)
    got = {}
    for mode in ("files", "beam"):
        sh = tmp_path / f"sh-{mode}"
        sh.mkdir()
        result, released = run_nightly(tmp_path, SPEC, in_dir, no_noise=True, out_name=f"out-{mode}",
                                       extra=["--shuffle", mode, "--shuffle-dir", str(sh)])
        assert result.exit_code == 0, result.message
        assert result.summary["shuffle"] == mode
        assert os.listdir(sh) == []  # the run's shuffle directory is gone
        t = released["product_day"].sort_by("product_id")
        got[mode] = dict(zip(t.column("product_id").to_pylist(), t.column("views").to_pylist()))
    assert got["files"] == got["beam"] == {f"p{i}": 80 for i in range(5)}


def test_shuffle_directory_is_removed_when_the_run_fails(tmp_path, allow_no_noise, monkeypatch):
    in_dir = _inputs(tmp_path)
    sh = tmp_path / "sh"
    sh.mkdir()

    def boom(self, parts, tally):
        raise RuntimeError("bound step failed")
    monkeypatch.setattr(beam_ops.BoundAndAggregateFn, "_shard", boom)
    result, _ = run_nightly(tmp_path, SPEC, in_dir, no_noise=True, extra=["--shuffle-dir", str(sh)])
    assert result.exit_code == nightly.EXIT_FAILURE and "nothing was published" in result.message
    assert "bound step failed" in result.message
    assert os.listdir(sh) == []


def test_files_shuffle_needs_the_in_process_runner(tmp_path, allow_no_noise):
    in_dir = _inputs(tmp_path)
    result, _ = run_nightly(tmp_path, SPEC, in_dir, no_noise=True,
                            extra=["--shuffle", "files", "--runner", "PortableRunner"])
    assert result.exit_code == nightly.EXIT_BAD_SPEC and "--shuffle" in result.message


def test_directories_of_killed_runs_are_swept(tmp_path):
    import subprocess
    import sys
    # A process that made a shuffle directory and died without cleaning up (kill -9).
    code = ("import sys; from transforms import fileshuffle; "
            "d = fileshuffle.make_dir(sys.argv[1]); fileshuffle.write_part(d, __import__('pyarrow').record_batch("
            "{'x': [1]})); print(d)")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    dead = subprocess.run([sys.executable, "-c", code, str(tmp_path)], cwd=root, capture_output=True,
                          text=True, check=True).stdout.strip()
    assert os.path.isdir(dead) and os.listdir(dead)
    other = tmp_path / "not-a-shuffle-dir"
    other.mkdir()
    mine = fileshuffle.make_dir(str(tmp_path))  # sweeps the dead one, keeps everything else
    assert not os.path.exists(dead)
    assert os.path.isdir(mine) and other.is_dir()
    assert fileshuffle.sweep_dead(str(tmp_path)) == []  # this process is alive: its directory stays
    fileshuffle.remove_dir(mine)
