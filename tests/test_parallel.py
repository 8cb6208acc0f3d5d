"""The ordered thread pool used by the read and bound DoFns (transforms/parallel.py)."""
import threading
import time

import apache_beam as beam
import pytest
from apache_beam.metrics.metric import MetricsFilter
from apache_beam.runners.portability.fn_api_runner import FnApiRunner

from transforms.parallel import OrderedPool, PooledDoFn, auto_threads


def _task(i, delay, record=None):
    def run(tally):
        time.sleep(delay)
        tally.inc("items")
        tally.inc("weight", i)
        if record is not None:
            record.add(threading.current_thread().name)
        yield i
        yield beam.pvalue.TaggedOutput("side", -i)
    return run


def test_pool_keeps_submission_order_and_uses_threads():
    pool = OrderedPool(2)
    names = set()
    delays = [0.5, 0.0, 0.03, 0.0, 0.01]  # task 0 holds one thread while the other runs the rest
    out = []
    for i, d in enumerate(delays):
        out.extend(pool.submit(_task(i, d, names)))
    out.extend(pool.drain())
    pool.close()
    main = [o.value if hasattr(o, "value") else o for o in out if not isinstance(o, beam.pvalue.TaggedOutput)]
    assert main == list(range(len(delays)))
    assert len(names) == 2 and all(n.startswith("clickdp") for n in names)


def test_pool_inline_with_one_thread_streams():
    pool = OrderedPool(1)
    gen = pool.submit(_task(7, 0.0))
    assert next(gen) == 7  # produced on the calling thread, before the task finished
    rest = list(gen)
    assert isinstance(rest[0], beam.pvalue.TaggedOutput) and rest[0].value == -7
    assert list(pool.drain()) == []


def test_pool_task_failure_raises_on_the_calling_thread():
    pool = OrderedPool(2)

    def boom(tally):
        raise ValueError("bad file x.parquet")

    with pytest.raises(ValueError, match="bad file"):
        for _ in range(3):
            list(pool.submit(boom))
        list(pool.drain())
    pool.close()


def test_auto_threads():
    assert auto_threads(None, 0) >= 1
    assert auto_threads("DataflowRunner", 0) == 1
    assert auto_threads("PortableRunner", 0) == 1
    assert auto_threads("DataflowRunner", 3) == 3


class _PoolFn(PooledDoFn):
    def __init__(self, threads):
        self.threads = threads

    def process(self, x, window=beam.DoFn.WindowParam, timestamp=beam.DoFn.TimestampParam):
        yield from self.submit(_task(x, 0.001 * (x % 3)), window, timestamp)


@pytest.mark.parametrize("threads", [1, 2])
def test_pool_in_a_beam_pipeline_loses_nothing_and_counts_everything(threads):
    n = 200
    p = beam.Pipeline(runner=FnApiRunner())
    res = (p | beam.Create(list(range(n))) | beam.Reshuffle()
           | beam.ParDo(_PoolFn(threads)).with_outputs("side", main="main"))
    main = res.main | "SumMain" >> beam.CombineGlobally(sum)
    side = res.side | "SumSide" >> beam.CombineGlobally(sum)
    main | "CheckMain" >> beam.Map(lambda s: assert_equal(s, n * (n - 1) // 2))
    side | "CheckSide" >> beam.Map(lambda s: assert_equal(s, -n * (n - 1) // 2))
    result = p.run()
    result.wait_until_finish()
    counters = {c.key.metric.name: c.committed for c in
                result.metrics().query(MetricsFilter().with_namespace("clickdp"))["counters"]}
    assert counters["items"] == n
    assert counters["weight"] == n * (n - 1) // 2


def assert_equal(a, b):
    assert a == b, (a, b)
