"""A small ordered thread pool for DoFns whose work is numpy/Arrow kernels.

numpy sorts and gathers and Arrow's compute and Parquet kernels release the GIL,
so on the local runner (one SDK worker inside this process) two threads keep
both cores busy. On a distributed runner the workers already run one SDK
process per core, so the pipeline asks for one thread there and the work runs
inline on the bundle thread, exactly as without this module.

Beam metrics are bound to the bundle thread, so a task records its counter
increments in a :class:`Tally` and the bundle thread applies them when it emits
the task's outputs. Outputs leave in input order; a failed task raises on the
bundle thread, which fails the bundle as usual.
"""
from __future__ import annotations

import collections
import os
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor

import apache_beam as beam
from apache_beam.metrics import Metrics
from apache_beam.utils.windowed_value import WindowedValue

NAMESPACE = "clickdp"


def auto_threads(runner_name: str | None, requested: int) -> int:
    """Threads per DoFn: `requested` if > 0, else all cores on the in-process runner, else 1."""
    if requested > 0:
        return requested
    if runner_name in (None, "FnApiRunner", "DirectRunner", "BundleBasedDirectRunner"):
        return max(1, min(os.cpu_count() or 1, 8))
    return 1


class Tally:
    """Counter increments (and stage milliseconds, ``ms:<stage>``, summed over threads and
    workers) recorded where Beam metrics cannot be: off the bundle thread, or in one batch."""

    def __init__(self):
        self.counts: collections.Counter = collections.Counter()

    def inc(self, name: str, n: int = 1) -> None:
        self.counts[name] += int(n)

    def timer(self, stage: str) -> _TallyTimer:
        return _TallyTimer(self, f"ms:{stage}")

    def flush(self) -> None:
        """Applies the increments to Beam metrics; call on the bundle thread."""
        for name, n in self.counts.items():
            if n:
                Metrics.counter(NAMESPACE, name).inc(n)
        self.counts.clear()


class _TallyTimer:
    def __init__(self, tally: Tally, name: str):
        self.tally, self.name = tally, name

    def __enter__(self):
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.tally.inc(self.name, int((time.perf_counter() - self.t0) * 1000))
        return False


Task = Callable[[Tally], Iterable]


class OrderedPool:
    """Runs tasks on up to `threads` threads; yields their outputs in submission order.

    Each task is called with a fresh Tally and returns an iterable of DoFn outputs
    (values or TaggedOutputs). With threads == 1 tasks run inline and stream their
    outputs; on threads, a task's outputs are collected until the bundle thread takes them.
    """

    def __init__(self, threads: int):
        self.threads = max(1, int(threads))
        self._executor = ThreadPoolExecutor(self.threads, thread_name_prefix="clickdp") if self.threads > 1 else None
        self._pending: collections.deque = collections.deque()

    def reset(self) -> None:
        """Forgets tasks of an abandoned bundle (their results are dropped)."""
        for future, _, _, _ in self._pending:
            future.cancel()
        self._pending.clear()

    def submit(self, task: Task, window=None, timestamp=None) -> Iterator:
        """Starts `task`; yields the outputs of the oldest tasks while the pool is full."""
        tally = Tally()
        if self._executor is None:
            yield from task(tally)
            tally.flush()
            return
        future = self._executor.submit(lambda: list(task(tally)))
        self._pending.append((future, tally, window, timestamp))
        while len(self._pending) > self.threads:
            yield from self._pop()

    def drain(self) -> Iterator:
        """Outputs of every remaining task, windowed for finish_bundle."""
        while self._pending:
            window, timestamp = self._pending[0][2], self._pending[0][3]
            for out in self._pop():
                yield _windowed(out, window, timestamp)

    def _pop(self) -> list:
        future, tally, _, _ = self._pending.popleft()
        outputs = _result(future)
        tally.flush()
        return outputs

    def close(self) -> None:
        self.reset()
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None


class PooledDoFn(beam.DoFn):
    """A DoFn that runs the work of each element on an OrderedPool of ``self.threads``
    threads: ``process`` yields from ``self.submit(task, window, timestamp)``."""

    threads = 1
    pool = None

    def setup(self):
        self.pool = OrderedPool(self.threads)

    def start_bundle(self):
        self.pool.reset()

    def submit(self, task: Task, window, timestamp) -> Iterator:
        return self.pool.submit(task, window, timestamp)

    def finish_bundle(self):
        yield from self.pool.drain()

    def teardown(self):
        if self.pool is not None:
            self.pool.close()


def _result(future: Future) -> list:
    return future.result()


def _windowed(out, window, timestamp):
    if window is None:  # elements of the global window (what the nightly graph uses)
        window = beam.transforms.window.GlobalWindow()
    if timestamp is None:
        timestamp = beam.utils.timestamp.MIN_TIMESTAMP
    if isinstance(out, beam.pvalue.TaggedOutput):
        return beam.pvalue.TaggedOutput(out.tag, WindowedValue(out.value, timestamp, (window,)))
    return WindowedValue(out, timestamp, (window,))
