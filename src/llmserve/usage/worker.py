"""One thread runs every database operation of this process, in the order they were asked for.

Order matters: a request's lease is released (queued) before its last bytes are sent, so the
same client's next request, queued after it, finds the slot free. Operations queued together
share one transaction (a group commit), which keeps writes cheap under load; an operation that
fails is retried alone, so one bad write never loses the others.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from sqlalchemy import Connection, Engine

log = logging.getLogger(__name__)
T = TypeVar("T")
Operation = Callable[[Connection], Any]
Done = Callable[[Any, BaseException | None], None]


@dataclass
class _Job:
    operation: Operation
    done: Done | None  # None: nobody waits (fire and forget)
    committed: Callable[[], None] | None = None  # a posted operation's "it is written"


class DatabaseWorker:
    """Runs operations on `engine` in one thread: `call` waits for a result, `post` does not."""

    def __init__(self, engine: Engine, name: str = "llmserve-db"):
        self.engine = engine
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    async def call(
        self,
        operation: Callable[[Connection], T],
        abandoned: Callable[[T], None] | None = None,
    ) -> T:
        """Run `operation` in its turn and return its result (or raise its exception).

        `abandoned` gets the result instead when the caller was cancelled meanwhile.
        """
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()

        def done(result: Any, error: BaseException | None) -> None:
            loop.call_soon_threadsafe(_settle, future, result, error, abandoned)

        self._jobs.put(_Job(operation, done))
        return await future

    def post(self, operation: Operation, done: Callable[[], None] | None = None) -> None:
        """Queue `operation`; its errors are logged; `done` runs (here) once it is committed."""
        self._jobs.put(_Job(operation, None, done))

    def call_blocking(self, operation: Callable[[Connection], T]) -> T:
        """`call` for code outside the event loop (start-up, the command line)."""
        event = threading.Event()
        outcome: list[Any] = [None, None]

        def done(result: Any, error: BaseException | None) -> None:
            outcome[:] = [result, error]
            event.set()

        self._jobs.put(_Job(operation, done))
        event.wait()
        if outcome[1] is not None:
            raise outcome[1]
        return outcome[0]  # type: ignore[no-any-return]

    def close(self) -> None:
        """Finish every queued operation, then stop the thread."""
        self._jobs.put(None)
        self._thread.join()

    def _run(self) -> None:
        while True:
            first = self._jobs.get()
            batch = [first]
            while first is not None:
                try:
                    nxt = self._jobs.get_nowait()
                except queue.Empty:
                    break
                batch.append(nxt)
                if nxt is None:
                    break
            stopping = batch[-1] is None
            jobs = [job for job in batch if job is not None]
            if jobs:
                self._run_batch(jobs)
            if stopping:
                return

    def _run_batch(self, jobs: list[_Job]) -> None:
        try:
            with self.engine.begin() as conn:
                results = [job.operation(conn) for job in jobs]
        except Exception as exc:
            if len(jobs) == 1:
                self._finish(jobs[0], None, exc)
                return
            for job in jobs:  # one of them failed: each alone, so the rest still land
                self._run_batch([job])
            return
        for job, result in zip(jobs, results, strict=True):
            self._finish(job, result, None)

    def _finish(self, job: _Job, result: Any, error: BaseException | None) -> None:
        if job.done is not None:
            job.done(result, error)
        elif error is not None:
            log.error("a usage database write failed: %s", error)
        elif job.committed is not None:
            job.committed()


def _settle(
    future: asyncio.Future[Any],
    result: Any,
    error: BaseException | None,
    abandoned: Callable[[Any], None] | None,
) -> None:
    if future.cancelled():
        if error is None and abandoned is not None:
            abandoned(result)  # the caller left: undo what the operation took (a lease)
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)
