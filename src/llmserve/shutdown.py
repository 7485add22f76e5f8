"""Graceful shutdown: stop accepting, let requests finish for a grace period, then end them.

The same path ends a server that cannot serve at all (its model failed to load, or its engine
died and could not be reloaded): requests in flight are answered, then the process exits with
a non-zero status so a supervisor (systemd's Restart=on-failure) restarts it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Iterator
from socket import socket
from types import FrameType

import uvicorn
from sse_starlette.sse import AppStatus

from llmserve.models.manager import ModelManager

log = logging.getLogger(__name__)

HANDLED_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class GracefulServer(uvicorn.Server):
    """uvicorn.Server whose first signal drains and whose second exits at once."""

    def __init__(self, config: uvicorn.Config, models: ModelManager, grace: float):
        super().__init__(config)
        # sse-starlette would cut every stream the moment a signal arrives; we drain instead
        # and tell it to stop only when the grace period is over.
        AppStatus.disable_automatic_graceful_drain()  # type: ignore[no-untyped-call]
        self.models = models
        self.grace = grace
        self._closing: asyncio.Future[None] | None = None
        self.companions: list[uvicorn.Server] = []  # servers that stop when this one does
        self.failure: str | None = None  # why the server cannot serve; set: exit non-zero
        models.on_fatal(self._fail)

    async def serve(self, sockets: list[socket] | None = None) -> None:
        """Serve until stopped; raise SystemExit (status 1) when stopped because of a failure."""
        await super().serve(sockets)
        if self.failure is not None:
            raise SystemExit(f"llmserve: {self.failure}")

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        """Handle SIGINT/SIGTERM ourselves; unlike uvicorn, don't re-raise them on the way out.

        A drained shutdown is a normal exit: status 0, as supervisors expect.
        """
        previous = {sig: signal.signal(sig, self.handle_exit) for sig in HANDLED_SIGNALS}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        """First signal: stop accepting, abort what still runs after the grace period."""
        if self.should_exit:
            log.warning("second signal: exiting now")
            self.force_exit = True
            for companion in self.companions:
                companion.force_exit = True
            return
        log.info("shutting down: finishing in-flight requests for up to %ss", self.grace)
        super().handle_exit(sig, frame)
        self._drain_then_stop()

    def _fail(self, reason: str) -> None:
        """Nothing can serve: answer what is in flight, then exit non-zero."""
        self.failure = reason
        if self.should_exit:
            return
        log.error("stopping: %s", reason)
        self.should_exit = True
        self._drain_then_stop()

    def _drain_then_stop(self) -> None:
        for companion in self.companions:
            companion.should_exit = True
        loop = asyncio.get_event_loop()
        loop.call_soon_threadsafe(loop.call_later, self.grace, self._end_remaining)

    def _end_remaining(self) -> None:
        # Closing the engines ends every open stream with a final chunk (finish "abort");
        # then sse-starlette may close whatever stream is left.
        self._closing = asyncio.ensure_future(self.models.close())
        self._closing.add_done_callback(lambda _: setattr(AppStatus, "should_exit", True))


class CompanionServer(uvicorn.Server):
    """A server (the separate admin port) that leaves signals to the main GracefulServer."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        """Install nothing: the main server stops this one."""
        yield
