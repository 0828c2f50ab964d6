"""The engine thread on its own (no HTTP): events, admission control, cancellation, a failing tick, stop."""

from __future__ import annotations

import queue

import pytest
import torch

from haipai_lightning.decode.engine import Engine, Request
from haipai_lightning.serve.scheduler import QueueFull, Scheduler, ShuttingDown
from serve_helpers import load_reference


@pytest.fixture(scope="module")
def model():
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matmuls: 2 threads spin against each other on a busy 2-core machine
    yield load_reference()[0]
    torch.set_num_threads(before)


def collect(q: queue.Queue, n_jobs: int, timeout: float = 30) -> dict[int, dict]:
    """Events of n_jobs jobs until each finished or failed: {index: {"tokens", "finish", "error"}}."""
    out = {i: {"tokens": [], "finish": None, "error": None} for i in range(n_jobs)}
    while any(o["finish"] is None and o["error"] is None for o in out.values()):
        ev = q.get(timeout=timeout)
        o = out[ev.index]
        o["tokens"] += ev.tokens
        o["finish"], o["error"] = ev.finish_reason or o["finish"], ev.error or o["error"]
    return out


def test_jobs_stream_their_tokens_and_finish(model):
    prompts = [[5, 6, 7], [8, 9], [10, 11, 12, 13]]
    expected = Engine(model, max_batch=2).generate(prompts, max_new_tokens=8)
    s = Scheduler(lambda: Engine(model, max_batch=2), max_queue=1)
    s.start()
    try:
        q: queue.Queue = queue.Queue()
        s.submit([Request(p, 8) for p in prompts], q.put)
        out = collect(q, 3)
        assert [out[i]["tokens"] for i in range(3)] == expected
        assert {o["finish"] for o in out.values()} == {"length"}
        assert s.queue_length() == 0 and s.active() == 0
    finally:
        s.stop()
    with pytest.raises(ShuttingDown):
        s.submit([Request([1], 2)], q.put)


def test_admission_control_and_cancelling_queued_jobs(model):
    s = Scheduler(lambda: Engine(model, max_batch=2), max_queue=1)  # not started: jobs stay in the inbox
    jobs = s.submit([Request([1], 4), Request([2], 4)], lambda ev: None)
    s.submit([Request([3], 4)], lambda ev: None)
    with pytest.raises(QueueFull, match="max_queue 1"):
        s.submit([Request([4], 4)], lambda ev: None)
    s.cancel(jobs[0])  # gives its place back at once
    s.submit([Request([4], 4)], lambda ev: None)
    with pytest.raises(QueueFull):
        s.submit([Request([5], 4)], lambda ev: None)


def test_a_failing_tick_fails_its_requests_and_the_server_goes_on(model):
    engines = []

    def make():
        e = Engine(model, max_batch=2)
        if not engines:  # the first engine breaks on its third tick
            real, n = e.tick, [0]

            def tick():
                n[0] += 1
                if n[0] == 3:
                    raise RuntimeError("boom")
                real()

            e.tick = tick
        engines.append(e)
        return e

    s = Scheduler(make, max_queue=4)
    s.start()
    try:
        q: queue.Queue = queue.Queue()
        s.submit([Request([1, 2], 10)], q.put)
        assert "boom" in collect(q, 1)[0]["error"]
        s.submit([Request([1, 2], 5)], q.put)
        assert collect(q, 1)[0]["finish"] == "length"  # a fresh engine took over, no slot stuck
        assert len(engines) == 2
    finally:
        s.stop()


def test_cancel_in_flight_and_stop_fails_what_is_left(model):
    s = Scheduler(lambda: Engine(model, max_batch=2), max_queue=4)
    s.start()
    q: queue.Queue = queue.Queue()
    jobs = s.submit([Request([1, 2], 60), Request([3], 60)], q.put)
    first = q.get(timeout=30)
    s.cancel(jobs[first.index])
    s.stop()
    assert not s._thread.is_alive()
    events = [first]
    while not q.empty():
        events.append(q.get())
    ends = {ev.index: ev.finish_reason or ev.error for ev in events if ev.finish_reason or ev.error}
    assert ends[first.index] in ("cancelled", "the server is shutting down")
    assert len(ends) == 2  # the other one finished or was failed by stop(): nobody waits forever
