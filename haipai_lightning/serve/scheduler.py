"""The engine thread: HTTP requests join the running batch, their tokens flow back.

One thread owns the `Engine` (decode/engine.py) and ticks it while any request is in flight; it
sleeps on a condition variable when there is none. Request handlers (on the asyncio loop) never touch
the engine's slots: `submit` puts jobs in an inbox that the engine thread moves into the engine's
queue before its next tick, so a request that arrives while others run takes a free slot at the next
tick (continuous batching, as in Orca, Yu et al. OSDI 2022, applied per recursion step by the engine).
After each tick every job's new tokens, and its finish reason, go to the job's `sink` -- the app's
sink is `loop.call_soon_threadsafe(queue.put_nowait, event)`, the thread-safe way into asyncio.

`cancel` (client gone, stop string found) takes a job out of the inbox, or flags it with
`Engine.cancel`, which frees its slot at the next tick. Admission control counts every accepted job
until it finishes: at most max_batch in slots plus max_queue waiting, more is refused (QueueFull, HTTP
429), so the queue never grows without bound. A failing tick fails the requests in flight and starts
a fresh engine: a slot is never left stuck.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from typing import Any, Callable

from haipai_lightning.decode.engine import Engine, Request

log = logging.getLogger("haipai.serve")


class QueueFull(Exception):
    """More requests than max_batch slots + max_queue waiting places."""


class ShuttingDown(Exception):
    """The server is stopping: no new requests."""


@dataclass
class Event:
    """What happened to one job since the last event: new tokens, and its end."""

    index: int  # the choice (prompt) of its HTTP request
    tokens: list[int]
    finish_reason: str | None = None  # "stop" / "length" / "cancelled" once finished
    mean_depth: float | None = None  # mean recursion steps of its generated tokens, once finished
    error: str | None = None  # the engine failed or the server stopped: the job is over


@dataclass(eq=False)
class Job:
    req: Request
    index: int
    sink: Callable[[Event], None]
    sent: int = 0  # tokens of req.output already sent to the sink
    done: bool = False
    meta: dict[str, Any] = field(default_factory=dict)


class Scheduler:
    def __init__(self, make_engine: Callable[[], Engine], max_queue: int, metrics: Any = None) -> None:
        self._make_engine = make_engine
        self.engine = make_engine()
        self.max_batch, self.max_queue, self.metrics = self.engine.S, max_queue, metrics
        self._cond = threading.Condition()
        self._inbox: list[Job] = []  # accepted, not yet in the engine (guarded by _cond)
        self._jobs: list[Job] = []  # in the engine (engine thread only)
        self._reserved = 0  # accepted and not finished: inbox + engine queue + slots (guarded by _cond)
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="haipai-engine", daemon=True)

    # ----------------------------------------------------------- any thread
    def start(self) -> None:
        self._thread.start()

    def alive(self) -> bool:
        return self._thread.is_alive() and not self._stopping

    def submit(self, reqs: list[Request], sink: Callable[[Event], None]) -> list[Job]:
        """Accept the requests (choice i = reqs[i]) or refuse them all."""
        with self._cond:
            if self._stopping:
                raise ShuttingDown("the server is shutting down")
            if self._reserved + len(reqs) > self.max_batch + self.max_queue:
                waiting = max(0, self._reserved - self.max_batch)
                raise QueueFull(f"the server is at capacity ({self.max_batch} requests decoding, {waiting} "
                                f"waiting, --max_queue {self.max_queue}); retry later")
            jobs = [Job(r, i, sink) for i, r in enumerate(reqs)]
            self._inbox += jobs
            self._reserved += len(jobs)
            self._cond.notify()
        return jobs

    def cancel(self, job: Job) -> None:
        """End a job early; its slot (if it has one) is free at the engine's next tick."""
        with self._cond:
            if job.done:
                return
            if job in self._inbox:  # not in the engine yet: gone at once
                self._inbox.remove(job)
                self._reserved -= 1
                job.done = True
                self._count_cancel()
                return
        self.engine.cancel(job.req)  # a flag; the engine thread frees the slot (and finishes the job)

    def queue_length(self) -> int:
        """Accepted requests waiting for a slot."""
        return max(0, self._reserved - self.engine.active())

    def active(self) -> int:
        return self.engine.active()

    def stop(self, timeout: float = 5.0) -> None:
        """Refuse new requests, end the ones left (an error event each) and join the engine thread."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
        if self._thread.is_alive():
            self._thread.join(timeout)

    # ------------------------------------------------------ the engine thread
    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._stopping and not self._inbox and not self._jobs:
                    self._cond.wait()
                new, self._inbox = self._inbox, []
                if self._stopping:
                    break
            for job in new:
                try:
                    self.engine.submit(job.req)
                    self._jobs.append(job)
                except ValueError as e:  # validated before, so a bug: this request fails, not the server
                    self._fail([job], f"the engine refused the request: {e}")
            try:
                self._tick()
            except Exception as e:  # noqa: BLE001 -- the thread must survive anything a tick raises
                log.exception("engine tick failed; failing %d requests and starting a fresh engine", len(self._jobs))
                self._fail(self._jobs, f"internal engine error: {type(e).__name__}: {e}")
                self._jobs = []
                self.engine = self._make_engine()
            self._publish()
        self._fail(new + self._jobs, "the server is shutting down")
        self._jobs = []

    def _tick(self) -> None:
        e = self.engine
        before = (len(e.queue), e.stats["tokens"], e.stats["block_tokens"], e.stats["cancelled"])
        e.tick()
        if self.metrics is not None:
            self.metrics.on_tick(e.active(), self.max_batch)
        after = (len(e.queue), e.stats["tokens"], e.stats["block_tokens"], e.stats["cancelled"])
        if after == before and (e.queue or e.active()):  # Engine.run's guard: never spin on a stuck slot
            raise RuntimeError(f"engine made no progress in a tick ({len(e.queue)} queued, {e.active()} active)")

    def _publish(self) -> None:
        """Send each job its new tokens; finished jobs leave (and give their place back)."""
        finished = []
        for job in self._jobs:
            req = job.req
            new = req.output[job.sent:]
            job.sent += len(new)
            end = req.finish_reason
            if not new and end is None:
                continue
            depth = sum(req.depths) / len(req.depths) if end is not None and req.depths else None
            if self.metrics is not None:
                self.metrics.on_tokens(len(new))
            if end is not None:
                finished.append(job)
                if self.metrics is not None:
                    self.metrics.on_finish(req.depths)
                if end == "cancelled":
                    self._count_cancel()
            self._send(job, Event(job.index, new, end, depth))
        if finished:
            gone = set(map(id, finished))
            self._jobs = [j for j in self._jobs if id(j) not in gone]
            with self._cond:
                for job in finished:
                    job.done = True
                self._reserved -= len(finished)

    def _fail(self, jobs: list[Job], message: str) -> None:
        for job in jobs:
            self._send(job, Event(job.index, [], None, None, message))
        with self._cond:
            fresh = [j for j in jobs if not j.done]
            for job in fresh:
                job.done = True
            self._reserved -= len(fresh)

    def _send(self, job: Job, event: Event) -> None:
        try:
            job.sink(event)
        except Exception:  # noqa: BLE001 -- e.g. the event loop closed at shutdown: nobody is listening
            log.debug("dropped an event for a request whose listener is gone", exc_info=True)

    def _count_cancel(self) -> None:
        if self.metrics is not None:
            self.metrics.cancelled.inc()
