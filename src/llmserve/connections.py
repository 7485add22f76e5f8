"""HTTP connection limits uvicorn lacks: a deadline for a request's head (slowloris)."""

from __future__ import annotations

import asyncio
from typing import Any

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol


class HeadTimeoutH11Protocol(H11Protocol):
    """uvicorn's h11 protocol, closing connections that don't send a request head in time.

    uvicorn times out idle keep-alive connections only after a response; a client that opens a
    connection, or starts a request, and then trickles its header bytes would hold the
    connection forever. The timer runs while h11 still waits for a complete request line and
    headers; a request whose head arrived is governed by the request timeout instead.
    """

    head_timeout: float = 30.0  # replaced per server by `with_head_timeout`

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._head_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """Start the clock for the first request's head."""
        super().connection_made(transport)  # type: ignore[arg-type]
        self._arm_head_timer()

    def data_received(self, data: bytes) -> None:
        """Feed h11; stop the clock once a whole request head has arrived."""
        self._arm_head_timer()
        super().data_received(data)
        if not self._awaiting_head():
            self._cancel_head_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        """Drop the timer with the connection."""
        self._cancel_head_timer()
        super().connection_lost(exc)

    def on_response_complete(self) -> None:
        """The next request on this connection gets its own deadline when its bytes come."""
        self._cancel_head_timer()
        super().on_response_complete()

    def _awaiting_head(self) -> bool:
        # h11 leaves IDLE for the client's side as soon as a whole request head is parsed,
        # and returns to it when a keep-alive connection starts its next request.
        return self.conn.their_state is h11.IDLE

    def _arm_head_timer(self) -> None:
        if self._head_timer is None and self._awaiting_head():
            self._head_timer = self.loop.call_later(self.head_timeout, self._head_timed_out)

    def _cancel_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if self._awaiting_head() and not self.transport.is_closing():
            self.transport.close()


def with_head_timeout(seconds: float) -> type[HeadTimeoutH11Protocol]:
    """The protocol class for uvicorn's `http=` option, with this deadline for request heads."""
    return type("HeadTimeoutH11Protocol", (HeadTimeoutH11Protocol,), {"head_timeout": seconds})
