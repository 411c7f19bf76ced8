"""The worker: one thread that runs the slow jobs (copies, rsync, a candidate's size) in order,
so that the loop keeps answering `rampipectl` and the watchdog while a sync runs. Each result
goes back to the loop through a pipe the selector waits on."""

from __future__ import annotations

import contextlib
import os
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

JobReply = Callable[[Any, BaseException | None], None]


@dataclass
class SyncWait:
    """`rampipectl sync` of a pin that was busy with another operation: its checkpoint is made
    when that operation ends, unless `deadline` (monotonic) passes first."""

    deadline: float
    limit: float  # seconds it was allowed to wait, for the message
    reply: JobReply


@dataclass
class Job:
    kind: str  # pin | unpin | checkpoint | measure (a candidate's size)
    path: str
    fn: Callable[[], Any]
    reason: str = ""
    mode: str = ""  # the pin's mode (overlay, copy), for the metrics
    reply: JobReply | None = None  # told the result once the loop has taken it in


class Worker:
    """One thread that runs jobs in order and reports each result through a pipe."""

    def __init__(self) -> None:
        self.jobs: queue.Queue[Job | None] = queue.Queue()
        self.done: queue.Queue[tuple[Job, Any, BaseException | None]] = queue.Queue()
        self.rfd, self.wfd = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.pending = 0
        self.thread = threading.Thread(target=self._run, name="rampiped-worker", daemon=True)
        self.thread.start()

    def submit(self, job: Job) -> None:
        self.pending += 1
        self.jobs.put(job)

    def _run(self) -> None:
        while True:
            job = self.jobs.get()
            if job is None:
                return
            result: Any = None
            exc: BaseException | None = None
            try:
                result = job.fn()
            except BaseException as e:  # reported to the loop, which decides
                exc = e
            self.done.put((job, result, exc))
            with contextlib.suppress(BlockingIOError):
                os.write(self.wfd, b"x")

    def collect(self) -> list[tuple[Job, Any, BaseException | None]]:
        with contextlib.suppress(BlockingIOError):
            while os.read(self.rfd, 4096):
                pass
        out: list[tuple[Job, Any, BaseException | None]] = []
        while True:
            try:
                item = self.done.get_nowait()
            except queue.Empty:
                return out
            self.pending -= 1
            out.append(item)

    def stop(self) -> None:
        self.jobs.put(None)
        self.thread.join(timeout=5)
