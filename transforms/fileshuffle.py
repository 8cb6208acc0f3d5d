"""Shard parts through local Arrow IPC files instead of the in-process runner's shuffle.

On the local runner (FnApiRunner, in this process) a GroupByKey of Arrow batches decodes
and re-encodes every byte several times on one thread: for 10M events about 2 s in which
nothing else runs. With a shuffle directory, the read step writes each shard's part of a
batch to its own file there (on its worker thread) and only ``(shard, path)`` goes through
Beam's GroupByKey; the bound step memory-maps the files. Beam still decides what is
grouped with what and when, so the bounding sees exactly the same rows either way.

The files hold validated events (hashed user ids, not raw ones) and live in a directory
only the running user can read (``tempfile.mkdtemp``), removed when the run ends; what a
killed run left behind is removed by the next run that shuffles in the same place. A file
name is unique per write (a retried bundle writes new files; only the paths Beam groups
are read). Distributed runners keep Beam's shuffle: their workers do not share a disk.
"""
from __future__ import annotations

import os
import shutil
import tempfile
import uuid

import pyarrow as pa

IN_PROCESS_RUNNERS = (None, "FnApiRunner")


PREFIX = "clickdp-shuffle-"


def make_dir(parent: str | None = None) -> str:
    """A fresh private directory for one run's shuffle files, named after this process.

    First removes what runs killed before their cleanup (kill -9, a scheduler's timeout)
    left in ``parent``: directories of processes that no longer exist."""
    parent = parent or tempfile.gettempdir()
    sweep_dead(parent)
    return tempfile.mkdtemp(prefix=f"{PREFIX}{os.getpid()}-", dir=parent)


def sweep_dead(parent: str) -> list:
    """Removes the shuffle directories under ``parent`` whose process is gone; returns them."""
    removed = []
    try:
        names = os.listdir(parent)
    except OSError:
        return removed
    for name in names:
        pid = name[len(PREFIX):].split("-", 1)[0] if name.startswith(PREFIX) else ""
        path = os.path.join(parent, name)
        if pid.isdigit() and not _alive(int(pid)) and os.path.isdir(path):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: alive
        return True
    return True


def remove_dir(path: str | None) -> None:
    if path:
        shutil.rmtree(path, ignore_errors=True)


def write_part(directory: str, batch: pa.RecordBatch) -> str:
    """Writes one batch as an Arrow IPC file; returns its path."""
    path = os.path.join(directory, f"{uuid.uuid4().hex}.arrow")
    with pa.OSFile(path, "wb") as sink, pa.ipc.new_file(sink, batch.schema) as writer:
        writer.write_batch(batch)
    return path


def read_part(path: str) -> list:
    """The batches of a file written by write_part (memory-mapped, not copied)."""
    with pa.memory_map(path, "r") as source:
        reader = pa.ipc.open_file(source)
        return [reader.get_batch(i) for i in range(reader.num_record_batches)]
